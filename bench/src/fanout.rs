//! `chat-bench fanout`: one public message to N real WebSocket clients through the whole local
//! stack, against two references on the same clients and the same `@connections` endpoint:
//!
//! - **raw**: the endpoint's capacity, as signed POSTs from the fan-out's SDK client at the
//!   fan-out's concurrency, with no chat logic at all;
//! - **naive**: the tutorial's fan-out, one unbounded task per recipient, all at once.
//!
//! Every figure is taken the same way: from just before the first send to the last client's
//! receipt of the frame, as the clients recorded it. Each measurement starts from a quiet
//! system (no frame in flight, every earlier event fanned out), the reference POSTs run on a
//! client whose pool was warmed first (the fan-out's own pool is warm from the join), and a
//! round runs raw, fan-out, naive in that order; with `--rounds` the median is reported.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use chat_shared::config::DEFAULT_FANOUT_CONCURRENCY;
use chat_shared::delivery::ManagementApi;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;
use serde_json::json;

use crate::client::Swarm;
use crate::mgmt::{self, PostOutcome};
use crate::progress;
use crate::stack::{self, Stack, StackSettings};
use crate::stats::{median, ms, Latency};
use crate::sys::{self, mono_ns, FdLimit};
use chat_local::aws_like::AwsLike;

/// How long to wait after a measurement's last expected receipt for late duplicates.
const LINGER: Duration = Duration::from_millis(200);
/// No frame for this long means the stack has settled.
const QUIET: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, clap::Args)]
pub struct FanoutOptions {
    /// WebSocket clients that join the room.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Delay the gateway adds to every @connections call (the round trip to AWS from a Lambda).
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Percentage of the clients that vanish (socket dropped, no close frame, no $disconnect)
    /// before the measurements; the fan-out meets their 410s and must prune them.
    #[arg(long, default_value_t = 0.0)]
    pub gone_pct: f64,
    /// @connections calls in flight, for the fan-out and for the raw measurement.
    #[arg(long, default_value_t = DEFAULT_FANOUT_CONCURRENCY)]
    pub concurrency: usize,
    /// Rounds of raw, fan-out, naive; the median of each is reported.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print one JSON object (the whole result) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Upper bound on each wait (joins accepted, a message everywhere, the stack settling).
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
    /// Run the stack in AWS-like mode (chat-local --aws-like with its default figures; a
    /// non-zero --latency-ms replaces its 20 ms `@connections` round trip). The room's
    /// per-partition write limit is left off: the clients all join at once, and a few hundred
    /// joins in the same second overrun one partition's 1,000 write units (as they would on
    /// DynamoDB) before anything is measured.
    #[arg(long)]
    pub aws_like: bool,
}

impl Default for FanoutOptions {
    fn default() -> Self {
        FanoutOptions {
            clients: 1000,
            latency_ms: 0,
            gone_pct: 0.0,
            concurrency: DEFAULT_FANOUT_CONCURRENCY,
            rounds: 1,
            json: false,
            timeout_secs: 600,
            aws_like: false,
        }
    }
}

/// Which way the frame went out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Raw,
    Fanout,
    Naive,
}

impl Kind {
    /// The message text, all of one length so every kind sends a frame of the same size.
    fn message(self, round: usize) -> String {
        let label = match self {
            Kind::Raw => "raw---",
            Kind::Fanout => "fanout",
            Kind::Naive => "naive-",
        };
        format!("bench-{label}-{round:03}")
    }
}

/// One measurement: one frame to every live client.
#[derive(Debug, Clone, Serialize)]
pub struct Delivery {
    pub kind: Kind,
    pub round: usize,
    /// Live clients, each of which should receive the frame exactly once.
    pub recipients: usize,
    /// Live clients that received it (at least once).
    pub received: usize,
    pub missing: usize,
    /// Receipts beyond the first, over all clients.
    pub duplicates: usize,
    /// For raw and naive: POSTs the SDK saw fail (the fan-out's own are inside the stack).
    pub post: Option<PostOutcome>,
    /// From just before the first send to the last receipt.
    pub time_to_last_ms: f64,
    /// Recipients / time to last delivery.
    pub deliveries_per_s: f64,
    /// Per recipient, from the send to its receipt.
    pub latency: Latency,
    /// CPU the measuring process (gateway, handler, fan-out, store, and this benchmark's
    /// bookkeeping; not the clients) used from the send to the last receipt, per recipient.
    pub stack_cpu_us_per_delivery: f64,
}

impl Delivery {
    /// Recipients that did not get the frame exactly once, or whose POST failed.
    fn errors(&self) -> usize {
        self.missing + self.duplicates + self.post.map_or(0, |p| p.errors())
    }
}

/// The median of each kind's rounds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Summary {
    pub deliveries_per_s: f64,
    pub time_to_last_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl Summary {
    fn of(deliveries: &[&Delivery]) -> Summary {
        let pick =
            |f: fn(&Delivery) -> f64| median(&deliveries.iter().map(|d| f(d)).collect::<Vec<_>>());
        Summary {
            deliveries_per_s: pick(|d| d.deliveries_per_s),
            time_to_last_ms: pick(|d| d.time_to_last_ms),
            p50_ms: pick(|d| d.latency.p50_ms),
            p99_ms: pick(|d| d.latency.p99_ms),
        }
    }
}

/// Whether the fan-out pruned every vanished client.
#[derive(Debug, Clone, Serialize)]
pub struct PruneCheck {
    pub vanished: usize,
    /// Vanished clients still recorded as members after the first fan-out.
    pub still_members: usize,
    /// Live clients no longer members (pruned by mistake).
    pub live_missing: usize,
    pub all_pruned: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    pub clients: usize,
    pub live: usize,
    pub vanished: usize,
    pub concurrency: usize,
    /// The `@connections` round trip the gateway added.
    pub latency_ms: u64,
    /// `ideal` or `aws-like` (chat-local's modes).
    pub mode: &'static str,
    pub rounds: usize,
    pub raw: Summary,
    pub fanout: Summary,
    pub naive: Summary,
    /// fan-out deliveries/s ÷ raw deliveries/s (medians).
    pub fanout_over_raw: f64,
    /// fan-out deliveries/s ÷ naive deliveries/s (medians).
    pub fanout_over_naive: f64,
    pub measurements: Vec<Delivery>,
    pub prune: Option<PruneCheck>,
    /// Error frames clients received (refused requests): none are expected.
    pub error_frames: u64,
    /// Missing receipts + duplicates + failed POSTs of the fan-out and raw measurements.
    pub errors: usize,
    /// The same for the naive baseline: where it cannot open a connection per recipient (a
    /// descriptor limit), its POSTs fail, as the tutorial's would.
    pub naive_errors: usize,
    /// VmHWM of the measuring process (the stack: gateway, handler, fan-out, store; the
    /// clients are in their agent processes) at the end.
    pub peak_memory_kib: u64,
    pub fd_limit: FdLimit,
    /// Seconds spent connecting and joining (setup, not measured).
    pub setup_secs: f64,
    pub ok: bool,
}

/// Runs the benchmark; `exe` is this program (its client agents run as `exe clients`).
pub async fn run(opts: &FanoutOptions, exe: &Path) -> anyhow::Result<FanoutReport> {
    if opts.clients < 2 {
        bail!("--clients must be at least 2");
    }
    if !(0.0..100.0).contains(&opts.gone_pct) {
        bail!("--gone-pct must be in 0..100");
    }
    if opts.concurrency == 0 || opts.rounds == 0 {
        bail!("--concurrency and --rounds must be at least 1");
    }
    let n = opts.clients;
    let timeout = Duration::from_secs(opts.timeout_secs);
    // The gateway's end of every client, and both ends of the fan-out's and the raw
    // measurement's connection pools. The naive baseline is not budgeted: it opens a
    // connection per recipient (two descriptors here), and where that does not fit it fails
    // as the tutorial's code would, which the report shows.
    let fd_limit = sys::raise_fd_limit((n + 4 * opts.concurrency + 1024) as u64)?;
    // Opens /proc/self/status while descriptors are plentiful (see `sys::memory`).
    sys::memory();

    let setup = Instant::now();
    let aws_like = opts.aws_like.then(|| {
        let mut aws_like = AwsLike::default();
        aws_like.store.partition = None;
        if opts.latency_ms > 0 {
            aws_like.management_latency = Duration::from_millis(opts.latency_ms);
        }
        aws_like
    });
    let latency_ms = aws_like.map_or(opts.latency_ms, |a| a.management_latency.as_millis() as u64);
    let stack = Stack::start(&StackSettings {
        management_latency: Duration::from_millis(opts.latency_ms),
        drop_disconnect: true,
        concurrency: opts.concurrency,
        aws_like,
    })
    .await?;
    let endpoint = stack.management_endpoint();
    progress(format_args!(
        "stack on {}; connecting {n} clients",
        stack.running.addr
    ));
    let mut swarm =
        Swarm::connect(exe, &stack.running.websocket_url, stack.running.addr, n).await?;
    progress(format_args!("connected; joining"));
    let members = join(&stack, &mut swarm, timeout).await?;
    progress(format_args!(
        "{} members; waiting for presence to settle",
        members
    ));
    sync(&mut swarm, "sync-join", timeout).await?;

    // The sender (client 0) never vanishes.
    let vanished = vanish(&mut swarm, opts.gone_pct).await?;
    if !vanished.is_empty() {
        let ids: Vec<String> = vanished
            .iter()
            .filter_map(|&i| swarm.clients[i].connection_id.clone())
            .collect();
        let left = mgmt::wait_unregistered(&endpoint, &ids, timeout).await;
        if left > 0 {
            bail!("{left} vanished clients are still registered at the gateway");
        }
        progress(format_args!("{} clients vanished", vanished.len()));
    }
    // Raw and naive post in the order the fan-out reads the members (the store's key order),
    // not in client order: the clients are grouped into agent processes by index, and posting
    // to one agent's clients in a row made raw far faster than any real order would (about
    // 22k against 15–17k deliveries/s at 0 ms; README, Benchmarks).
    let live: HashSet<String> = swarm
        .live()
        .filter_map(|(_, c)| c.connection_id.clone())
        .collect();
    let live_ids: Vec<String> = stack::member_ids(&stack.store)
        .await?
        .into_iter()
        .filter(|id| live.contains(id))
        .collect();
    if live_ids.len() != live.len() {
        bail!(
            "{} of {} live clients are not members",
            live.len() - live_ids.len(),
            live.len()
        );
    }
    let setup_secs = setup.elapsed().as_secs_f64();

    // Warm-up: the reference client's pool gets its connections before it is timed, as the
    // fan-out's pool got its own during the join.
    let reference = mgmt::management_api(&endpoint);
    let warm = post_frame(&swarm.clients[0].name, "bench-warmup-000");
    mgmt::post_bounded(&reference, &live_ids, &warm.1, opts.concurrency).await;
    if !swarm.wait_for(&warm.0, live_ids.len(), timeout).await {
        bail!("the warm-up frame did not reach every live client");
    }
    swarm.wait_quiet(QUIET, timeout).await;

    let mut measurements = Vec::new();
    let mut prune = None;
    for round in 1..=opts.rounds {
        progress(format_args!("round {round}: raw"));
        let raw = measure_post(
            &swarm,
            &reference,
            &live_ids,
            Kind::Raw,
            round,
            opts,
            timeout,
        )
        .await;
        measurements.push(raw);
        swarm.wait_quiet(QUIET, timeout).await;

        progress(format_args!("round {round}: fan-out"));
        let fanout = measure_fanout(&mut swarm, round, timeout).await?;
        measurements.push(fanout);
        if prune.is_none() && !vanished.is_empty() {
            prune = Some(check_pruned(&stack, &swarm, &vanished, timeout).await?);
        }
        // The pruned members' leaves go through the stream and out to everyone: let them
        // pass before the next measurement.
        sync(&mut swarm, &format!("sync-{round:03}"), timeout).await?;

        progress(format_args!("round {round}: naive"));
        // A new client each round, warmed like the reference one: every naive round starts
        // from the same pool, not from the thousands of connections the previous one left.
        let naive_api = mgmt::management_api(&endpoint);
        let warm = post_frame(&swarm.clients[0].name, &format!("bench-warmup-{round:03}"));
        mgmt::post_bounded(&naive_api, &live_ids, &warm.1, opts.concurrency).await;
        swarm.wait_for(&warm.0, live_ids.len(), timeout).await;
        swarm.wait_quiet(QUIET, timeout).await;
        let naive = measure_post(
            &swarm,
            &naive_api,
            &live_ids,
            Kind::Naive,
            round,
            opts,
            timeout,
        )
        .await;
        measurements.push(naive);
        drop(naive_api);
        swarm.wait_quiet(QUIET, timeout).await;
    }

    let peak_memory_kib = sys::memory().peak_kib;
    let error_frames = swarm.error_frames();
    swarm.close().await;
    stack.shutdown().await;

    let of = |kind: Kind| {
        Summary::of(
            &measurements
                .iter()
                .filter(|d| d.kind == kind)
                .collect::<Vec<_>>(),
        )
    };
    let (raw, fanout, naive) = (of(Kind::Raw), of(Kind::Fanout), of(Kind::Naive));
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    // The naive baseline's failures are its own finding, not the fan-out's.
    let (naive_runs, checked): (Vec<&Delivery>, Vec<&Delivery>) =
        measurements.iter().partition(|d| d.kind == Kind::Naive);
    let errors = checked.iter().map(|d| d.errors()).sum();
    let naive_errors = naive_runs.iter().map(|d| d.errors()).sum();
    let ok = errors == 0 && error_frames == 0 && prune.as_ref().is_none_or(|p| p.all_pruned);
    Ok(FanoutReport {
        clients: n,
        live: live_ids.len(),
        vanished: vanished.len(),
        concurrency: opts.concurrency,
        latency_ms,
        mode: if opts.aws_like { "aws-like" } else { "ideal" },
        rounds: opts.rounds,
        raw,
        fanout,
        naive,
        fanout_over_raw: ratio(fanout.deliveries_per_s, raw.deliveries_per_s),
        fanout_over_naive: ratio(fanout.deliveries_per_s, naive.deliveries_per_s),
        measurements,
        prune,
        error_frames,
        errors,
        naive_errors,
        peak_memory_kib,
        fd_limit,
        setup_secs,
        ok,
    })
}

/// Every client joins; returns once the store lists all of them as members (a join has no
/// route response, and presence frames may be coalesced, so the store is the witness), with
/// each client's connection id filled in.
pub(crate) async fn join(
    stack: &Stack,
    swarm: &mut Swarm,
    timeout: Duration,
) -> anyhow::Result<usize> {
    swarm.send_joins().await?;
    let n = swarm.clients.len();
    let (members, all) = stack::wait_for_members(&stack.store, n, timeout).await?;
    if swarm.error_frames() > 0 {
        let first = swarm.with_logs(|logs| logs.iter().find_map(|l| l.errors.first().cloned()));
        bail!(
            "{} joins were refused; first: {}",
            swarm.error_frames(),
            first.unwrap_or_default()
        );
    }
    if !all {
        bail!("only {} of {n} joins were recorded in time", members.len());
    }
    for c in &mut swarm.clients {
        c.connection_id = members.get(&c.name).cloned();
        if c.connection_id.is_none() {
            bail!("{} is not among the members", c.name);
        }
    }
    Ok(members.len())
}

/// Client 0 posts `message`; returns once every live client has it and no frame has come for
/// a while. The stream is processed in order, so everything committed before (presence,
/// leaves of pruned members) has been fanned out by then.
pub(crate) async fn sync(
    swarm: &mut Swarm,
    message: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let text = format!("{}: {message}", swarm.clients[0].name);
    swarm
        .send(0, &json!({"action": "sendPublic", "message": message}))
        .await?;
    let live = swarm.live_count();
    if !swarm.wait_for(&text, live, timeout).await {
        bail!(
            "{message:?} reached {} of {live} clients in {timeout:?}",
            swarm.tally(&text)
        );
    }
    if !swarm.wait_quiet(QUIET, timeout).await {
        bail!("frames kept coming for {timeout:?} after {message:?}");
    }
    Ok(())
}

/// Drops `pct` % of the clients (never client 0, the sender), picked at random.
async fn vanish(swarm: &mut Swarm, pct: f64) -> anyhow::Result<Vec<usize>> {
    let n = swarm.clients.len();
    let count = ((n as f64) * pct / 100.0).round() as usize;
    let count = count.min(n - 1);
    // A fixed seed: the same clients vanish in every run of the same size.
    let mut rng = StdRng::seed_from_u64(0x6368_6174);
    let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, n - 1, count)
        .into_iter()
        .map(|i| i + 1)
        .collect();
    picked.sort_unstable();
    swarm.vanish(&picked).await?;
    Ok(picked)
}

/// The frame text and bytes of a public message the benchmark posts itself, shaped as the
/// fan-out's (`publicMessage`, `id`, `ts`).
fn post_frame(sender: &str, message: &str) -> (String, Vec<u8>) {
    let text = format!("{sender}: {message}");
    let frame = json!({"publicMessage": text, "id": 0, "ts": chat_shared::now_ms()});
    (text, frame.to_string().into_bytes())
}

async fn measure_post(
    swarm: &Swarm,
    api: &ManagementApi,
    ids: &[String],
    kind: Kind,
    round: usize,
    opts: &FanoutOptions,
    timeout: Duration,
) -> Delivery {
    let (text, frame) = post_frame(&swarm.clients[0].name, &kind.message(round));
    let (api, owned_ids, concurrency) = (api.clone(), ids.to_vec(), opts.concurrency);
    let cpu = sys::cpu_ns();
    let start = mono_ns();
    // Driven from a runtime worker, as the stack drives the fan-out (its event source mapping
    // is a spawned task): polled from this function, on the thread that blocks on `main`, the
    // requests' SDK work would get a thread of its own that the fan-out does not have.
    let posting = tokio::spawn(async move {
        match kind {
            Kind::Naive => mgmt::post_naive(&api, &owned_ids, &frame).await,
            _ => mgmt::post_bounded(&api, &owned_ids, &frame, concurrency).await,
        }
    });
    let outcome = posting.await.unwrap_or(PostOutcome {
        failed: ids.len(),
        ..PostOutcome::default()
    });
    swarm.wait_for(&text, outcome.ok, timeout).await;
    let cpu = sys::cpu_ns().saturating_sub(cpu);
    tokio::time::sleep(LINGER).await;
    let mut d = tally(swarm, kind, round, &text, start, cpu);
    d.post = Some(outcome);
    d
}

async fn measure_fanout(
    swarm: &mut Swarm,
    round: usize,
    timeout: Duration,
) -> anyhow::Result<Delivery> {
    let message = Kind::Fanout.message(round);
    let text = format!("{}: {message}", swarm.clients[0].name);
    let live = swarm.live_count();
    let frame = json!({"action": "sendPublic", "message": message});
    let cpu = sys::cpu_ns();
    let start = swarm
        .send(0, &frame)
        .await
        .context("sending the measured public message")?;
    swarm.wait_for(&text, live, timeout).await;
    let cpu = sys::cpu_ns().saturating_sub(cpu);
    tokio::time::sleep(LINGER).await;
    Ok(tally(swarm, Kind::Fanout, round, &text, start, cpu))
}

/// What the live clients recorded of the frame `text` sent at `start` (mono ns), with the
/// CPU time (ns) the measuring process used meanwhile.
fn tally(swarm: &Swarm, kind: Kind, round: usize, text: &str, start: u64, cpu_ns: u64) -> Delivery {
    let mut latencies = Vec::new();
    let (mut recipients, mut missing, mut duplicates) = (0, 0, 0);
    let mut last = start;
    swarm.with_logs(|logs| {
        for (i, _) in swarm.live() {
            recipients += 1;
            let mut receipts = logs[i].receipts.iter().filter(|r| &*r.text == text);
            match receipts.next() {
                None => missing += 1,
                Some(first) => {
                    latencies.push(Duration::from_nanos(first.at_ns.saturating_sub(start)));
                    last = last.max(first.at_ns);
                    duplicates += receipts.count();
                }
            }
        }
    });
    let received = latencies.len();
    let to_last = Duration::from_nanos(last - start);
    let secs = to_last.as_secs_f64();
    Delivery {
        kind,
        round,
        recipients,
        received,
        missing,
        duplicates,
        post: None,
        time_to_last_ms: ms(to_last),
        deliveries_per_s: if secs > 0.0 {
            received as f64 / secs
        } else {
            0.0
        },
        latency: Latency::of(latencies),
        stack_cpu_us_per_delivery: cpu_ns as f64 / 1000.0 / received.max(1) as f64,
    }
}

/// After the first fan-out met the vanished clients: waits for the store to list exactly the
/// live clients, and says who is left over.
async fn check_pruned(
    stack: &Stack,
    swarm: &Swarm,
    vanished: &[usize],
    timeout: Duration,
) -> anyhow::Result<PruneCheck> {
    let live = swarm.live_count();
    let (members, _) = stack::wait_for_members(&stack.store, live, timeout).await?;
    let ids: HashSet<&String> = members.values().collect();
    let still_members = vanished
        .iter()
        .filter(|&&i| {
            swarm.clients[i]
                .connection_id
                .as_ref()
                .is_some_and(|id| ids.contains(id))
        })
        .count();
    let live_missing = swarm
        .live()
        .filter(|(_, c)| c.connection_id.as_ref().is_none_or(|id| !ids.contains(id)))
        .count();
    Ok(PruneCheck {
        vanished: vanished.len(),
        still_members,
        live_missing,
        all_pruned: still_members == 0 && live_missing == 0,
    })
}

/// The report for people.
pub fn print(report: &FanoutReport) {
    println!(
        "chat-bench fanout: mode={} N={} live={} vanished={} concurrency={} latency={}ms rounds={} (setup {:.1}s)",
        report.mode,
        report.clients,
        report.live,
        report.vanished,
        report.concurrency,
        report.latency_ms,
        report.rounds,
        report.setup_secs
    );
    println!(
        "{:<8} {:>11} {:>14} {:>14} {:>9} {:>9} {:>8} {:>5} {:>12} {:>12}",
        "",
        "first (ms)",
        "to last (ms)",
        "deliveries/s",
        "p50 (ms)",
        "p99 (ms)",
        "missing",
        "dup",
        "POST errors",
        "CPU µs/dlv"
    );
    for d in &report.measurements {
        let label = match d.kind {
            Kind::Raw => "raw",
            Kind::Fanout => "fan-out",
            Kind::Naive => "naive",
        };
        println!(
            "{:<8} {:>11.1} {:>14.1} {:>14.0} {:>9.1} {:>9.1} {:>8} {:>5} {:>12} {:>12.1}   (round {})",
            label,
            d.latency.min_ms,
            d.time_to_last_ms,
            d.deliveries_per_s,
            d.latency.p50_ms,
            d.latency.p99_ms,
            d.missing,
            d.duplicates,
            d.post.map_or(0, |p| p.errors()),
            d.stack_cpu_us_per_delivery,
            d.round
        );
    }
    if report.rounds > 1 {
        for (label, s) in [
            ("raw", report.raw),
            ("fan-out", report.fanout),
            ("naive", report.naive),
        ] {
            println!(
                "median {label:<8} {:>8.1} ms {:>10.0}/s  p50 {:.1} ms  p99 {:.1} ms",
                s.time_to_last_ms, s.deliveries_per_s, s.p50_ms, s.p99_ms
            );
        }
    }
    println!(
        "fan-out/raw = {:.2}   fan-out/naive = {:.2}",
        report.fanout_over_raw, report.fanout_over_naive
    );
    if let Some(p) = &report.prune {
        println!(
            "pruning: {} vanished, {} still members, {} live clients missing from the members -> {}",
            p.vanished,
            p.still_members,
            p.live_missing,
            if p.all_pruned { "all pruned" } else { "NOT all pruned" }
        );
    }
    println!(
        "peak memory (VmHWM of the stack process) = {:.1} MiB; error frames = {}; errors = {} \
         (naive: {}); {}",
        sys::mib(report.peak_memory_kib),
        report.error_frames,
        report.errors,
        report.naive_errors,
        if report.ok { "OK" } else { "FAILED" }
    );
}
