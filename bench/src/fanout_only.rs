//! `chat-bench fanout-only`: the fan-out's own cost, with nothing else in the process. No
//! WebSockets and no gateway: N named connections go straight into an embedded store, one
//! public message is recorded, and `deliver_event` sends it through the real SDK client to a
//! sink in another process that answers 200 and counts.
//!
//! Memory: the store grows with N, so besides the process's peak (VmHWM) the report gives
//! the resident size just before `deliver_event` and the peak during it (VmHWM is reset first
//! where the kernel allows); their difference is what the fan-out added to the resident size
//! of a warm process.
//!
//! Before that the SDK client is warmed up as a warm Lambda's is: [`WARMUP_ROUNDS`] rounds
//! of `concurrency` POSTs, so its connection pool is in its steady state (see there why one
//! round is not enough), and what the warm-up added is reported apart. The allocator keeps
//! and reuses what the warm-up freed, so the RSS delta is not the fan-out's working set: built
//! with the `heap-stats` feature the report also gives the live heap (requested bytes not yet
//! freed) before, at its peak during, and after `deliver_event`, whatever the allocator keeps.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chat_shared::config::{FanoutConfig, Retention, DEFAULT_FANOUT_CONCURRENCY};
use chat_shared::fanout::{deliver_event, handle_stream_event};
use chat_shared::keys;
use chat_shared::pacing::Pacer;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::ChatStore;
use chat_shared::stream::RecordSource;
use chat_shared::validation::validate_name;
use serde::Serialize;

use crate::agent::client_name;
use crate::mgmt;
use crate::progress;
use crate::sink::{SinkProcess, SinkStats};
use crate::sys::{self, FdLimit};

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutOnlyOptions {
    /// Named connections in the store, each of which gets one POST.
    #[arg(long, default_value_t = 5000)]
    pub clients: usize,
    /// The fan-out's @connections calls in flight.
    #[arg(long, default_value_t = DEFAULT_FANOUT_CONCURRENCY)]
    pub concurrency: usize,
    /// Delay the sink adds before answering each POST (the round trip to AWS from a Lambda).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Rounds of `concurrency` POSTs through the fan-out's client before the measurement.
    #[arg(long, default_value_t = WARMUP_ROUNDS)]
    pub warmup_rounds: usize,
    /// Members per store page, as DynamoDB's 1 MB pages would cut them (default: the
    /// embedded store's one page).
    #[arg(long)]
    pub page_limit: Option<usize>,
    /// The fan-out's pacer (`FANOUT_MAX_RPS`): @connections calls per second; 0 (the default
    /// here) measures raw capacity, unpaced.
    #[arg(long, default_value_t = 0)]
    pub max_rps: u32,
    /// The sink answers 429 over this many POSTs per second (the account quota); 0: never.
    #[arg(long, default_value_t = 0)]
    pub throttle_rps: u64,
    /// This many recipients (spread over the room) answer 500 forever: the fan-out must reach
    /// everyone else once and retry only them (its redelivery rounds run after the broadcast,
    /// from the store's stream, and are counted in the POSTs per recipient).
    #[arg(long, default_value_t = 0)]
    pub failing: usize,
    /// Rooms in the store. 1 (the default): the N members and the message are in the lobby.
    /// More: the N members also join a room `big`, where the message is posted, and the other
    /// rooms get `--other-members` members each (connections of their own), so the fan-out
    /// must read `big`'s members only, over its member shards.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub rooms: u32,
    /// Members of each room other than `big` (with `--rooms` above 1).
    #[arg(long, default_value_t = 100)]
    pub other_members: usize,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// The room the message goes to when the store has more than one room.
pub const BIG_ROOM: &str = "big";

impl Default for FanoutOnlyOptions {
    fn default() -> Self {
        FanoutOnlyOptions {
            clients: 5000,
            concurrency: DEFAULT_FANOUT_CONCURRENCY,
            latency_ms: 0,
            warmup_rounds: WARMUP_ROUNDS,
            page_limit: None,
            max_rps: 0,
            throttle_rps: 0,
            failing: 0,
            rooms: 1,
            other_members: 100,
            json: false,
        }
    }
}

/// Memory figures of the measuring process, in KiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FanoutMemory {
    /// VmHWM after filling the store (the peak of everything before the fan-out).
    pub peak_before_kib: u64,
    /// VmRSS just before `deliver_event`.
    pub rss_before_kib: u64,
    /// VmHWM after `deliver_event`: the peak during it when `peak_reset`, else the process's.
    pub peak_after_kib: u64,
    /// Whether VmHWM was reset just before `deliver_event`.
    pub peak_reset: bool,
    /// `peak_after - rss_before`: what the fan-out added at its peak.
    pub delta_kib: u64,
    /// The process's peak over the whole run.
    pub peak_kib: u64,
    /// VmRSS the warm-up added (the warm pool's connections and buffers), not in `delta_kib`.
    pub warmup_kib: u64,
    /// The live heap around `deliver_event` (only with the `heap-stats` feature).
    pub heap: Option<HeapDuring>,
}

/// Live heap bytes (allocated, not yet freed), in KiB.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeapDuring {
    /// Just before `deliver_event`.
    pub before_kib: u64,
    /// Its peak during `deliver_event`, less `before_kib`: what the fan-out held at once.
    pub peak_delta_kib: i64,
    /// After `deliver_event`, less `before_kib`: what it left behind.
    pub after_delta_kib: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutOnlyReport {
    pub clients: usize,
    /// Rooms in the store, and the member shards of the room the message went to.
    pub rooms: u32,
    pub shards: u32,
    /// Members of the store's other rooms, all together.
    pub other_members: usize,
    pub concurrency: usize,
    pub latency_ms: u64,
    pub page_limit: Option<usize>,
    pub max_rps: u32,
    pub throttle_rps: u64,
    pub failing: usize,
    /// Redelivery rounds run after the broadcast (for the failing recipients).
    pub redelivery_rounds: usize,
    /// Time from the broadcast's start to the end of the last redelivery round.
    pub with_redelivery_ms: f64,
    /// POSTs sent to warm the client up before the measurement.
    pub warmup_posts: usize,
    pub delivered: usize,
    pub pruned: usize,
    pub rejected: usize,
    pub elapsed_ms: f64,
    pub deliveries_per_s: f64,
    /// Every POST the sink answered (accepted or 429) per recipient: 1.0 when nothing was
    /// throttled or retried.
    pub posts_per_recipient: f64,
    /// The pacer's rate when `deliver_event` returned (`None`: unpaced).
    pub pacer_rate_after: Option<f64>,
    /// CPU time (user + system, all threads) this process spent in `deliver_event`: the
    /// fan-out's own cost, the sink's being in its own process.
    pub cpu_ms: f64,
    pub cpu_us_per_delivery: f64,
    /// What one fully busy core would sustain at that cost (1 s / CPU per delivery).
    pub one_core_deliveries_per_s: f64,
    pub memory: FanoutMemory,
    /// What the sink counted during `deliver_event`.
    pub sink: SinkStats,
    pub fd_limit: FdLimit,
    /// Every connection got exactly one POST.
    pub ok: bool,
}

/// Runs the measurement; `exe` is this program (it runs the sink as `exe sink`).
pub async fn run(opts: &FanoutOnlyOptions, exe: &Path) -> anyhow::Result<FanoutOnlyReport> {
    if opts.clients == 0 || opts.concurrency == 0 {
        bail!("--clients and --concurrency must be at least 1");
    }
    let n = opts.clients;
    if opts.failing > n {
        bail!("--failing must be at most --clients");
    }
    let fd_limit = sys::raise_fd_limit((2 * opts.concurrency + 256) as u64)?;
    let sink = SinkProcess::spawn(
        exe,
        opts.latency_ms,
        opts.throttle_rps,
        &failing_ids(n, opts.failing),
    )
    .await?;
    let result = measure(opts, n, &sink, fd_limit).await;
    sink.stop().await;
    result
}

async fn measure(
    opts: &FanoutOnlyOptions,
    n: usize,
    sink: &SinkProcess,
    fd_limit: FdLimit,
) -> anyhow::Result<FanoutOnlyReport> {
    let mut store = EmbeddedStore::new(Retention::default());
    if let Some(limit) = opts.page_limit {
        store = store.with_page_limit(limit);
    }
    progress(format_args!("filling the store with {n} members"));
    let now = chat_shared::now_ms();
    let room = if opts.rooms > 1 {
        BIG_ROOM
    } else {
        keys::DEFAULT_ROOM
    };
    let others = (1..opts.rooms)
        .map(|r| format!("r{r:05}"))
        .collect::<Vec<_>>();
    let other_members = others.len() * opts.other_members;
    let total = n + other_members;
    let mut first = None;
    for i in 0..total {
        let id = connection_id(i);
        store
            .add_connection(&id, now)
            .await
            .context("adding a connection")?;
        let name = validate_name(&client_name(i, total))
            .map_err(|r| anyhow!("invalid generated name: {}", r.message))?;
        store
            .set_name(&id, &name, now)
            .await
            .context("setting a name")?;
        // The first N are the big room's; the rest fill the other rooms in turn.
        let joins = if i < n {
            (room != keys::DEFAULT_ROOM).then_some(room)
        } else {
            Some(others[(i - n) % others.len()].as_str())
        };
        if let Some(r) = joins {
            store
                .join_room(&id, r, 2, now)
                .await
                .context("joining a room")?;
        }
        first.get_or_insert(id);
    }
    let sender = first.ok_or_else(|| anyhow!("no connection"))?;
    let event = store
        .post_to_room(&sender, room, "bench-fanout-only", now)
        .await
        .context("recording the public message")?;
    let shards = store.member_shards(room, now).await?;

    // Past everything so far (the joins and the message): only redelivery rounds follow.
    let mut feed = store.feed();
    while let Some(last) = feed
        .poll(100_000, Duration::ZERO)
        .await
        .context("reading the store's stream")?
        .last()
        .and_then(|r| r.change.sequence_number.clone())
    {
        feed.checkpoint(&last);
    }
    let api = mgmt::management_api(&sink.endpoint);
    let config = FanoutConfig {
        concurrency: opts.concurrency,
        pacer: Pacer::per_second(opts.max_rps),
        ..FanoutConfig::default()
    };
    // A warm Lambda has a warm pool: its connections exist, and have carried earlier
    // broadcasts, before the event arrives, so they are neither timed nor counted in the
    // fan-out's memory (the warm-up's own cost is reported apart).
    let warmup_posts = opts.concurrency.saturating_mul(opts.warmup_rounds);
    progress(format_args!(
        "warming the client up with {warmup_posts} POSTs"
    ));
    let cold = sys::memory();
    let warm: Vec<String> = (0..warmup_posts).map(|i| format!("warmup{i}")).collect();
    mgmt::post_bounded(&api, &warm, b"{}", opts.concurrency).await;
    drop(warm);
    sink.reset().await?;

    let before = sys::memory();
    let peak_reset = sys::reset_peak_memory();
    sys::reset_heap_peak();
    let heap_before = sys::heap();
    progress(format_args!("fanning out to {n}"));
    let start = Instant::now();
    let cpu_start = sys::cpu_ns();
    let report = tokio::time::timeout(
        TIMEOUT,
        deliver_event(&store, &api, &config, &event, chat_shared::now_ms()),
    )
    .await
    .context("deliver_event did not finish in time")?
    .context("deliver_event")?;
    let elapsed = start.elapsed();
    let cpu = Duration::from_nanos(sys::cpu_ns().saturating_sub(cpu_start));
    // What the failing recipients are owed comes back on the stream, round after round, as
    // it would to the fan-out Lambda.
    let mut redelivery_rounds = 0;
    loop {
        let records = feed
            .poll(1_000, Duration::from_millis(50))
            .await
            .context("reading the store's stream")?;
        let Some(last) = records
            .last()
            .and_then(|r| r.change.sequence_number.clone())
        else {
            break;
        };
        let mut batch = aws_lambda_events::event::dynamodb::Event::default();
        batch.records = records;
        let response =
            handle_stream_event(&store, &api, &config, batch, chat_shared::now_ms, None).await;
        if !response.batch_item_failures.is_empty() {
            bail!("a redelivery round failed: {response:?}");
        }
        feed.checkpoint(&last);
        redelivery_rounds += 1;
    }
    let with_redelivery = start.elapsed();
    let after = sys::memory();
    let heap = heap_before.zip(sys::heap()).map(|(before, after)| {
        let kib = |bytes: u64| (bytes / 1024) as i64;
        HeapDuring {
            before_kib: before.live_bytes / 1024,
            peak_delta_kib: kib(after.peak_bytes) - kib(before.live_bytes),
            after_delta_kib: kib(after.live_bytes) - kib(before.live_bytes),
        }
    });
    let stats = sink.stats().await?;

    let peak_after_kib = after.peak_kib;
    let memory = FanoutMemory {
        peak_before_kib: before.peak_kib,
        rss_before_kib: before.rss_kib,
        peak_after_kib,
        peak_reset,
        delta_kib: peak_after_kib.saturating_sub(before.rss_kib),
        peak_kib: before.peak_kib.max(peak_after_kib),
        warmup_kib: before.rss_kib.saturating_sub(cold.rss_kib),
        heap,
    };
    let reachable = (n - opts.failing) as u64;
    // Every reachable recipient got exactly one accepted POST (in the broadcast, or in a
    // redelivery round after it was throttled too long).
    let ok = stats.posts == reachable
        && stats.distinct == reachable
        && stats.max_per_id == 1
        && report.pruned.is_empty()
        && report.rejected == 0;
    Ok(FanoutOnlyReport {
        clients: n,
        rooms: opts.rooms,
        shards,
        other_members,
        concurrency: opts.concurrency,
        latency_ms: opts.latency_ms,
        page_limit: opts.page_limit,
        max_rps: opts.max_rps,
        throttle_rps: opts.throttle_rps,
        warmup_posts,
        delivered: report.delivered,
        pruned: report.pruned.len(),
        rejected: report.rejected,
        elapsed_ms: elapsed.as_secs_f64() * 1000.0,
        deliveries_per_s: n as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
        posts_per_recipient: (stats.posts + stats.throttled + stats.failed) as f64 / n as f64,
        failing: opts.failing,
        redelivery_rounds,
        with_redelivery_ms: with_redelivery.as_secs_f64() * 1000.0,
        pacer_rate_after: config.pacer.current_rate(),
        cpu_ms: cpu.as_secs_f64() * 1000.0,
        cpu_us_per_delivery: cpu.as_secs_f64() * 1e6 / n as f64,
        one_core_deliveries_per_s: n as f64 / cpu.as_secs_f64().max(f64::MIN_POSITIVE),
        memory,
        sink: stats,
        fd_limit,
        ok,
    })
}

/// `count` connection ids spread evenly over the `n` members.
fn failing_ids(n: usize, count: usize) -> Vec<String> {
    (0..count).map(|k| connection_id(k * n / count)).collect()
}

/// A connection id shaped like API Gateway's (12 characters), and safe in a URL path.
fn connection_id(i: usize) -> String {
    format!("B{i:011}")
}

/// Warm-up rounds by default. One POST per connection would leave the pool short of its
/// steady state: hyper hands each request to its connection through an unbounded tokio
/// channel whose 32-slot blocks (about 11.5 KiB each here) are recycled, but a second one is
/// only allocated at a connection's 33rd request. Measured after one round, a broadcast of
/// 50,000 (about 100 requests per connection) paid for that block on most of the 512
/// connections (5–6 MiB, dhat) and one of 5,000 (about 10 each) on none: a one-off cost of the
/// pool, bounded by its size (the same at 100,000), that read as the fan-out growing with N.
/// One round also left hyper-util's checkout racing new connects: some 5,000 runs opened 90–136
/// connections during the broadcast (the sink counts them). 64 rounds put nearly every
/// connection past the block and opened none afterwards, as any earlier large broadcast would.
pub const WARMUP_ROUNDS: usize = 64;

/// A stuck sink must not hang the run.
const TIMEOUT: Duration = Duration::from_secs(600);

pub fn print(r: &FanoutOnlyReport) {
    let m = &r.memory;
    let per_s = |rps: u64| {
        if rps == 0 {
            "off".to_owned()
        } else {
            format!("{rps}/s")
        }
    };
    println!(
        "chat-bench fanout-only: N={} concurrency={} latency={}ms page_limit={} pacer={} sink throttle={}",
        r.clients,
        r.concurrency,
        r.latency_ms,
        r.page_limit.map_or("none".to_owned(), |l| l.to_string()),
        per_s(u64::from(r.max_rps)),
        per_s(r.throttle_rps),
    );
    if r.rooms > 1 {
        println!(
            "rooms: {} ({} members in room {BIG_ROOM}, {} shards; {} in the others)",
            r.rooms, r.clients, r.shards, r.other_members
        );
    }
    println!(
        "deliver_event: {:.1} ms, {:.0} deliveries/s (delivered {}, pruned {}, rejected {})",
        r.elapsed_ms, r.deliveries_per_s, r.delivered, r.pruned, r.rejected
    );
    println!(
        "POSTs per recipient: {:.4} ({} answered 429, {} answered 500 to the {} failing recipients; {} redelivery rounds, done after {:.0} ms); pacer rate after: {}",
        r.posts_per_recipient,
        r.sink.throttled,
        r.sink.failed,
        r.failing,
        r.redelivery_rounds,
        r.with_redelivery_ms,
        r.pacer_rate_after
            .map_or("unpaced".to_owned(), |rate| format!("{rate:.0}/s"))
    );
    println!(
        "CPU in deliver_event: {:.1} ms, {:.1} µs per delivery -> {:.0} deliveries/s per busy core",
        r.cpu_ms, r.cpu_us_per_delivery, r.one_core_deliveries_per_s
    );
    println!(
        "memory: peak (VmHWM) {:.1} MiB; before deliver_event: RSS {:.1} MiB (peak {:.1} MiB); \
         peak during deliver_event {:.1} MiB{} -> fan-out delta {:.1} MiB",
        sys::mib(m.peak_kib),
        sys::mib(m.rss_before_kib),
        sys::mib(m.peak_before_kib),
        sys::mib(m.peak_after_kib),
        if m.peak_reset {
            ""
        } else {
            " (VmHWM not resettable: process peak)"
        },
        sys::mib(m.delta_kib)
    );
    println!(
        "warm-up: {} POSTs before the measurement added RSS {:.1} MiB (not in the delta)",
        r.warmup_posts,
        sys::mib(m.warmup_kib)
    );
    if let Some(h) = &m.heap {
        println!(
            "live heap: {:.1} MiB before deliver_event, peak during {:+.1} MiB, after {:+.1} MiB",
            sys::mib(h.before_kib),
            h.peak_delta_kib as f64 / 1024.0,
            h.after_delta_kib as f64 / 1024.0
        );
    }
    println!(
        "sink: {} POSTs to {} distinct ids, at most {} per id, {} connections opened -> {}",
        r.sink.posts,
        r.sink.distinct,
        r.sink.max_per_id,
        r.sink.connections,
        if r.ok { "OK" } else { "FAILED" }
    );
}
