//! `chat-bench busy-room`: one busy room, M members of which some opted in to batched frames
//! (`?batch=1`), E public events a second from a few senders, the event source mapping's
//! batching window W — what batching saves, side by side with unbatched members in the same
//! run.
//!
//! No WebSockets: the members are connections in an embedded store (opened with and without
//! the opt-in, as `$connect` records them), the events are written to it at a steady rate, the
//! local stack's event source mapping ([`chat_local::esm`], honouring W and `BatchSize`) invokes
//! the real fan-out, and the fan-out posts through the real SDK client to a stand-in
//! `@connections` ([`crate::sink`], its own process) that counts POSTs, unpacks batches, and
//! keeps per connection the ids it received, with each frame's latency (arrival − the event's
//! commit time `ts`). `--limit-posts-per-second` makes the stand-in answer 429 over that rate,
//! as API Gateway's account quota does. Batched members' ids start with `b`, unbatched ones'
//! with `u`: the report has one row for each.
//!
//! `--window` and `--batched-pct` take lists, and every window runs with every share, one
//! after another in one command (a fresh store, stand-in and mapping each), so a sweep's
//! figures are measured side by side. `--aws-like` gives the run DynamoDB's latencies and
//! consistency ([`chat_shared::store::aws_like::StoreBehaviour::aws_like`], switched on after
//! the members are set up) and the stand-in API Gateway's 20 ms and 10,000 POSTs/s.
//!
//! Checked per group: nothing lost (every member has every event), nothing duplicated after
//! dedupe, order by id kept per member.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use chat_local::aws_like::AwsLike;
use chat_local::esm::{self, EsmConfig, Mapping, StreamTarget};
use chat_shared::config::{FanoutConfig, Retention, DEFAULT_FANOUT_CONCURRENCY};
use chat_shared::delivery::ManagementApi;
use chat_shared::fanout::handle_stream_event;
use chat_shared::pacing::Pacer;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::ChatStore;
use chat_shared::stream::RecordSource;
use chat_shared::validation::validate_name;
use serde::Serialize;

use crate::mgmt;
use crate::progress;
use crate::sink::{FrameGroup, SinkProcess, SinkStats};
use crate::sys::{self, FdLimit};

#[derive(Debug, Clone, clap::Args)]
pub struct BusyRoomOptions {
    /// Members of the room (lobby).
    #[arg(long, default_value_t = 1000)]
    pub members: usize,
    /// Percentage of them that opted in to batched frames. Several (comma-separated, e.g.
    /// `100,0`) run one after another in this command, reported side by side.
    #[arg(long, value_delimiter = ',', default_value = "50",
          value_parser = clap::value_parser!(u8).range(0..=100))]
    pub batched_pct: Vec<u8>,
    /// Public events per second, over all senders.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Senders (the first members; they receive like the others).
    #[arg(long, default_value_t = 3)]
    pub senders: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// The mapping's batching window (`MaximumBatchingWindowInSeconds`), seconds. Several
    /// (comma-separated, e.g. `0,1,2`) sweep it: every window with every `--batched-pct`.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub window: Vec<f64>,
    /// The mapping's `BatchSize` (stream records per invocation).
    #[arg(long, default_value_t = 100)]
    pub batch_size: usize,
    /// The stand-in answers 429 to POSTs over this many per second (API Gateway's account
    /// quota is 10,000/s, burst 5,000); 0: never.
    #[arg(long, default_value_t = 0)]
    pub limit_posts_per_second: u64,
    /// Delay the stand-in adds before answering each POST (the round trip from a Lambda).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// The fan-out's @connections calls in flight.
    #[arg(long, default_value_t = DEFAULT_FANOUT_CONCURRENCY)]
    pub concurrency: usize,
    /// The fan-out's pacer (`FANOUT_MAX_RPS`); 0: unpaced.
    #[arg(long, default_value_t = chat_shared::pacing::DEFAULT_MAX_RPS)]
    pub max_rps: u32,
    /// Seconds allowed after the last event for every delivery to arrive.
    #[arg(long, default_value_t = 120)]
    pub drain_secs: u64,
    /// AWS-like mode: the embedded store behaves like DynamoDB during the run (5 ms reads,
    /// 10 ms writes, eventual consistency, counter contention, partition throughput), the
    /// stand-in answers after 20 ms and limits POSTs to the account's 10,000/s — unless
    /// `--latency-ms` / `--limit-posts-per-second` say otherwise.
    #[arg(long)]
    pub aws_like: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

impl Default for BusyRoomOptions {
    fn default() -> Self {
        BusyRoomOptions {
            members: 1000,
            batched_pct: vec![50],
            rate: 10.0,
            senders: 3,
            duration: 20,
            window: vec![1.0],
            batch_size: 100,
            limit_posts_per_second: 0,
            latency_ms: 0,
            concurrency: DEFAULT_FANOUT_CONCURRENCY,
            max_rps: chat_shared::pacing::DEFAULT_MAX_RPS,
            drain_secs: 120,
            aws_like: false,
            json: false,
        }
    }
}

/// One group's figures (batched or unbatched members).
#[derive(Debug, Clone, Serialize)]
pub struct GroupReport {
    pub members: usize,
    /// Deliveries owed: events × members.
    pub expected: u64,
    #[serde(flatten)]
    pub received: FrameGroup,
    /// expected − distinct.
    pub loss: u64,
    /// POSTs ÷ distinct deliveries: what one event costs per member.
    pub posts_per_delivered_event: f64,
    /// Events ÷ (the group's last arrival − the first event's commit): the rate every member
    /// received at, over the run.
    pub events_per_sec_to_every_member: f64,
}

/// Every run of one command: each `--window` with each `--batched-pct`, in that order.
#[derive(Debug, Clone, Serialize)]
pub struct BusyRoomReport {
    /// `ideal` or `aws-like`.
    pub mode: &'static str,
    pub runs: Vec<RunReport>,
    pub ok: bool,
}

/// One run: one window, one share of batched members.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub members: usize,
    pub batched_pct: u8,
    /// What the stand-in added to each POST, ms.
    pub latency_ms: u64,
    /// The fan-out's pacer, POSTs/s (0: unpaced).
    pub max_rps: u32,
    pub rate: f64,
    pub duration_secs: u64,
    pub window_secs: f64,
    pub batch_size: usize,
    pub limit_posts_per_second: u64,
    pub events: usize,
    pub send_secs: f64,
    pub batched: Option<GroupReport>,
    pub unbatched: Option<GroupReport>,
    pub sink: SinkStats,
    pub invocations: u64,
    pub failed_invocations: u64,
    pub fd_limit: FdLimit,
    pub ok: bool,
}

/// The fan-out, invoked by the mapping, counting its invocations.
struct Fanout {
    store: EmbeddedStore,
    api: ManagementApi,
    config: FanoutConfig,
    invocations: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl StreamTarget for Fanout {
    async fn invoke(&self, event: Event) -> Result<DynamoDbEventResponse, esm::BoxError> {
        self.invocations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(handle_stream_event(
            &self.store,
            &self.api,
            &self.config,
            event,
            chat_shared::now_ms,
            Some(tokio::time::Instant::now() + Duration::from_secs(60)),
        )
        .await)
    }
}

fn member_id(i: usize, batched: usize) -> String {
    if i < batched {
        format!("b{i:06}")
    } else {
        format!("u{i:06}")
    }
}

/// Runs the busy room; `exe` is this program (the stand-in runs as `exe sink`).
pub async fn run(opts: &BusyRoomOptions, exe: &Path) -> anyhow::Result<BusyRoomReport> {
    if opts.members == 0 || !opts.rate.is_finite() || opts.rate <= 0.0 || opts.senders == 0 {
        bail!("--members, --rate and --senders must be positive");
    }
    if opts.senders > opts.members {
        bail!("--senders must be at most --members");
    }
    if opts.window.is_empty() || opts.batched_pct.is_empty() {
        bail!("--window and --batched-pct need at least one value");
    }
    if let Some(w) = opts.window.iter().find(|w| !(0.0..=300.0).contains(*w)) {
        bail!("--window must be 0 to 300 seconds (got {w})");
    }
    let mut runs = Vec::new();
    for &window in &opts.window {
        for &pct in &opts.batched_pct {
            runs.push(run_one(opts, window, pct, exe).await?);
        }
    }
    let ok = runs.iter().all(|r| r.ok);
    Ok(BusyRoomReport {
        mode: if opts.aws_like { "aws-like" } else { "ideal" },
        runs,
        ok,
    })
}

/// One run: a fresh store, stand-in and mapping.
async fn run_one(
    opts: &BusyRoomOptions,
    window: f64,
    batched_pct: u8,
    exe: &Path,
) -> anyhow::Result<RunReport> {
    // AWS-like figures where the options leave them open (see `chat_local::aws_like`).
    let aws_like = opts.aws_like.then(AwsLike::default);
    let latency_ms = match aws_like {
        Some(a) if opts.latency_ms == 0 => a.management_latency.as_millis() as u64,
        _ => opts.latency_ms,
    };
    let limit_posts_per_second = match aws_like.and_then(|a| a.account_throttle) {
        Some(limit) if opts.limit_posts_per_second == 0 => limit.per_second as u64,
        _ => opts.limit_posts_per_second,
    };
    let m = opts.members;
    let batched = m * usize::from(batched_pct) / 100;
    let fd_limit = sys::raise_fd_limit((4 * opts.concurrency + 1024) as u64)?;

    let sink = SinkProcess::spawn_with(exe, latency_ms, limit_posts_per_second, &[], true).await?;
    progress(format_args!(
        "stand-in @connections at {}; {m} members, {batched} batched",
        sink.endpoint
    ));
    let store = EmbeddedStore::new(Retention::default());
    let now = chat_shared::now_ms();
    for i in 0..m {
        let id = member_id(i, batched);
        store
            .open_connection(&id, None, None, i < batched, now)
            .await
            .context("opening a connection")?;
        let name = validate_name(&format!("member{i}"))
            .map_err(|r| anyhow!("invalid generated name: {}", r.message))?;
        store
            .set_name(&id, &name, now)
            .await
            .context("setting a name")?;
    }
    // The members are set up instantly; the run itself pays DynamoDB's latencies.
    let store = match aws_like {
        Some(a) => store.with_behaviour(a.store),
        None => store,
    };
    // Past the joins: only the events of the run are fanned out.
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
    let target = Arc::new(Fanout {
        store: store.clone(),
        api,
        config: FanoutConfig {
            concurrency: opts.concurrency,
            pacer: Pacer::per_second(opts.max_rps),
            ..FanoutConfig::default()
        },
        invocations: Default::default(),
    });
    let mapping = Mapping::spawn(
        Box::new(feed),
        target.clone(),
        EsmConfig {
            batch_size: opts.batch_size,
            // As Lambda's poller: about four polls a second of an idle shard.
            poll_wait: Duration::from_millis(250),
            poll_interval: Duration::from_millis(250),
            batching_window: Duration::from_secs_f64(window),
            ..EsmConfig::default()
        },
    );

    let total = (opts.rate * opts.duration as f64).round() as usize;
    progress(format_args!(
        "sending {total} events at {}/s, window {window} s",
        opts.rate
    ));
    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let start = tokio::time::Instant::now();
    let first_ms = chat_shared::now_ms();
    for k in 0..total {
        tokio::time::sleep_until(start + period.mul_f64(k as f64)).await;
        let sender = member_id(k % opts.senders, batched);
        store
            .post_public(&sender, &format!("busy-{k:06}"), chat_shared::now_ms())
            .await
            .context("posting an event")?;
    }
    let send_secs = start.elapsed().as_secs_f64();

    progress(format_args!("sent; waiting for every delivery"));
    let expected_b = (total * batched) as u64;
    let expected_u = (total * (m - batched)) as u64;
    let deadline = Instant::now() + Duration::from_secs(opts.drain_secs);
    let mut groups;
    loop {
        groups = sink.frames().await?;
        let distinct = |k: &str| groups.get(k).map_or(0, |g| g.distinct);
        if distinct("b") >= expected_b && distinct("u") >= expected_u {
            break;
        }
        if Instant::now() >= deadline {
            progress(format_args!("gave up waiting after {} s", opts.drain_secs));
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let stats = mapping
        .drain(Duration::from_secs(30))
        .await
        .unwrap_or_default();
    let sink_stats = sink.stats().await?;
    sink.stop().await;

    let group = |key: &str, members: usize, expected: u64| -> Option<GroupReport> {
        (members > 0).then(|| {
            let received = groups.get(key).cloned().unwrap_or_default();
            let span_secs = (received.last_arrival_ms - first_ms).max(1) as f64 / 1000.0;
            GroupReport {
                members,
                expected,
                loss: expected.saturating_sub(received.distinct),
                posts_per_delivered_event: received.posts as f64
                    / (received.distinct.max(1)) as f64,
                events_per_sec_to_every_member: if received.min_per_member as usize == total {
                    total as f64 / span_secs
                } else {
                    0.0
                },
                received,
            }
        })
    };
    let batched_report = group("b", batched, expected_b);
    let unbatched_report = group("u", m - batched, expected_u);
    let ok = [&batched_report, &unbatched_report]
        .into_iter()
        .flatten()
        // Duplicates are counted (delivery is at least once: a POST retried after a lost
        // answer arrives twice) and dropped by dedupe; loss and disorder fail the run.
        .all(|g| g.loss == 0 && g.received.out_of_order == 0);
    Ok(RunReport {
        members: m,
        batched_pct,
        latency_ms,
        max_rps: opts.max_rps,
        rate: opts.rate,
        duration_secs: opts.duration,
        window_secs: window,
        batch_size: opts.batch_size,
        limit_posts_per_second,
        events: total,
        send_secs,
        batched: batched_report,
        unbatched: unbatched_report,
        sink: sink_stats,
        invocations: target
            .invocations
            .load(std::sync::atomic::Ordering::Relaxed),
        failed_invocations: stats.failed_invocations,
        fd_limit,
        ok,
    })
}

/// The text report: the settings, then one row per run and group (batched, unbatched).
pub fn print(r: &BusyRoomReport) {
    let Some(first) = r.runs.first() else {
        return;
    };
    println!(
        "busy room ({}): {} members, {} events/s for {} s ({} events), BatchSize {}, stand-in limit {}, latency {} ms, pacer {}",
        r.mode,
        first.members,
        first.rate,
        first.duration_secs,
        first.events,
        first.batch_size,
        if first.limit_posts_per_second == 0 {
            "none".to_owned()
        } else {
            format!("{} POSTs/s", first.limit_posts_per_second)
        },
        first.latency_ms,
        if first.max_rps == 0 {
            "off".to_owned()
        } else {
            format!("{}/s", first.max_rps)
        },
    );
    println!(
        "{:>6} {:>8} {:<9} {:>7} {:>9} {:>10} {:>11} {:>7} {:>7} {:>7} {:>9} {:>5} {:>4} {:>4} {:>5} {:>5}",
        "window",
        "batched%",
        "group",
        "members",
        "POSTs",
        "delivered",
        "POSTs/event",
        "p50 ms",
        "p99 ms",
        "max ms",
        "events/s",
        "loss",
        "dup",
        "ooo",
        "invoc",
        "429s"
    );
    for run in &r.runs {
        for (label, group) in [("batched", &run.batched), ("unbatched", &run.unbatched)] {
            let Some(g) = group else { continue };
            println!(
                "{:>6} {:>8} {:<9} {:>7} {:>9} {:>10} {:>11.3} {:>7} {:>7} {:>7} {:>9.2} {:>5} {:>4} {:>4} {:>5} {:>5}",
                run.window_secs,
                run.batched_pct,
                label,
                g.members,
                g.received.posts,
                g.received.distinct,
                g.posts_per_delivered_event,
                g.received.latency_p50_ms,
                g.received.latency_p99_ms,
                g.received.latency_max_ms,
                g.events_per_sec_to_every_member,
                g.loss,
                g.received.duplicates,
                g.received.out_of_order,
                run.invocations,
                run.sink.throttled,
            );
        }
        if run.failed_invocations > 0 {
            println!(
                "  (window {} s, {}% batched: {} failed invocations)",
                run.window_secs, run.batched_pct, run.failed_invocations
            );
        }
    }
    println!(
        "events/s: events ÷ (the group's last arrival − the first event's commit); dup: POSTs delivered twice (at least once), dropped by dedupe; ooo: out of order after dedupe"
    );
    println!("{}", if r.ok { "OK" } else { "FAILED" });
}
