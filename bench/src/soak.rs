//! `chat-bench soak`: N members, random senders posting public messages at a steady aggregate
//! rate for a while; afterwards every member must hold every message exactly once after
//! dedupe by event id, in id order. Loss and disorder fail the run.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use chat_shared::config::DEFAULT_FANOUT_CONCURRENCY;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use crate::client::Swarm;
use crate::fanout::{join, sync};
use crate::progress;
use crate::stack::{wait_for_members, Stack, StackSettings};
use crate::stats::Latency;
use crate::sys::{self, FdLimit};

/// The prefix of every soak message's text; what follows is its index, 0-based.
const PREFIX: &str = "soak-";

#[derive(Debug, Clone, clap::Args)]
pub struct SoakOptions {
    /// Members in the room, all listening; senders are picked among them at random.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Public messages per second, over all senders.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Seconds of sending.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Seconds allowed after the last send for every delivery to arrive.
    #[arg(long, default_value_t = 60)]
    pub drain_secs: u64,
    /// The fan-out's @connections calls in flight.
    #[arg(long, default_value_t = DEFAULT_FANOUT_CONCURRENCY)]
    pub concurrency: usize,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
    /// Upper bound on each setup wait (joins accepted, presence settled).
    #[arg(long, default_value_t = 600)]
    pub timeout_secs: u64,
}

impl Default for SoakOptions {
    fn default() -> Self {
        SoakOptions {
            clients: 1000,
            rate: 10.0,
            duration: 60,
            drain_secs: 60,
            concurrency: DEFAULT_FANOUT_CONCURRENCY,
            json: false,
            timeout_secs: 600,
        }
    }
}

/// What the members' receipts show.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `sendPublic` frames sent.
    pub sent: usize,
    /// sent × members.
    pub expected: usize,
    /// Receipts of soak messages, duplicates included.
    pub received: usize,
    /// Receipts of an event id a member already had.
    pub duplicates: usize,
    /// After dedupe: receipts whose id is lower than one the member received before.
    pub out_of_order: usize,
    /// Deliveries that never arrived: expected − distinct receipts.
    pub loss: usize,
    /// Messages that arrived with different event ids at different members.
    pub id_mismatch: usize,
    /// Send → receipt, first receipt of each message at each member.
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub clients: usize,
    pub rate: f64,
    pub duration_secs: u64,
    #[serde(flatten)]
    pub check: Check,
    /// Sends refused with an error frame.
    pub refused: u64,
    /// How long the sends took (the schedule is `duration`).
    pub send_secs: f64,
    pub peak_memory_kib: u64,
    pub fd_limit: FdLimit,
    pub setup_secs: f64,
    pub ok: bool,
}

/// Runs the soak; `exe` is this program (its client agents run as `exe clients`).
pub async fn run(opts: &SoakOptions, exe: &Path) -> anyhow::Result<SoakReport> {
    if opts.clients == 0 || !opts.rate.is_finite() || opts.rate <= 0.0 || opts.concurrency == 0 {
        bail!("--clients, --rate and --concurrency must be positive");
    }
    let n = opts.clients;
    let timeout = Duration::from_secs(opts.timeout_secs);
    let total = (opts.rate * opts.duration as f64).round() as usize;
    let fd_limit = sys::raise_fd_limit((n + 4 * opts.concurrency + 1024) as u64)?;
    sys::memory();

    let setup = Instant::now();
    let stack = Stack::start(&StackSettings {
        management_latency: Duration::ZERO,
        drop_disconnect: false,
        concurrency: opts.concurrency,
        aws_like: None,
    })
    .await?;
    progress(format_args!(
        "stack on {}; connecting {n} clients",
        stack.running.addr
    ));
    let mut swarm =
        Swarm::connect(exe, &stack.running.websocket_url, stack.running.addr, n).await?;
    progress(format_args!("connected; joining"));
    join(&stack, &mut swarm, timeout).await?;
    progress(format_args!("joined; waiting for presence to settle"));
    sync(&mut swarm, "sync-join", timeout).await?;
    let setup_secs = setup.elapsed().as_secs_f64();
    let refused_before = swarm.error_frames();

    progress(format_args!("sending {total} messages at {}/s", opts.rate));
    let period = Duration::from_secs_f64(1.0 / opts.rate);
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let mut sent_at = Vec::with_capacity(total);
    let mut texts = Vec::with_capacity(total);
    let start = tokio::time::Instant::now();
    for k in 0..total {
        tokio::time::sleep_until(start + period.mul_f64(k as f64)).await;
        let sender = rng.random_range(0..n);
        let message = format!("{PREFIX}{k:06}");
        texts.push(format!("{}: {message}", swarm.clients[sender].name));
        let at = swarm
            .send(sender, &json!({"action": "sendPublic", "message": message}))
            .await?;
        sent_at.push(at);
    }
    let send_secs = start.elapsed().as_secs_f64();

    progress(format_args!("sent; draining"));
    let drain = Instant::now() + Duration::from_secs(opts.drain_secs);
    for text in &texts {
        let left = drain.saturating_duration_since(Instant::now());
        if !swarm.wait_for(text, n, left).await {
            break;
        }
    }
    // Late duplicates arrive after the last first copy, if at all.
    swarm
        .wait_quiet(Duration::from_millis(500), Duration::from_secs(10))
        .await;
    let refused = swarm.error_frames() - refused_before;
    let peak_memory_kib = sys::memory().peak_kib;
    let check = analyse(&swarm, &sent_at);
    swarm.close().await;
    // The closes run `$disconnect`s whose leaves go out through the stream; let them finish
    // while the gateway still answers, or the fan-out meets a closed port at shutdown.
    let _ = wait_for_members(&stack.store, 0, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.shutdown().await;

    let ok = check.loss == 0 && check.out_of_order == 0 && check.id_mismatch == 0 && refused == 0;
    Ok(SoakReport {
        clients: n,
        rate: opts.rate,
        duration_secs: opts.duration,
        check,
        refused,
        send_secs,
        peak_memory_kib,
        fd_limit,
        setup_secs,
        ok,
    })
}

/// Checks every member's receipts against the messages sent at `sent_at` (mono ns, by index).
fn analyse(swarm: &Swarm, sent_at: &[u64]) -> Check {
    let sent = sent_at.len();
    let members = swarm.live_count();
    let mut received = 0;
    let mut duplicates = 0;
    let mut out_of_order = 0;
    let mut distinct = 0;
    let mut latencies = Vec::with_capacity(sent * members);
    // Message index → the event id it was first seen with.
    let mut ids: HashMap<usize, u64> = HashMap::new();
    let mut mismatched: HashSet<usize> = HashSet::new();
    let live: Vec<usize> = swarm.live().map(|(i, _)| i).collect();
    swarm.with_logs(|logs| {
        for &c in &live {
            let mut seen = HashSet::new();
            let mut highest = 0;
            for r in &logs[c].receipts {
                let Some(index) = soak_index(&r.text).filter(|&k| k < sent) else {
                    continue;
                };
                received += 1;
                // A frame without an id cannot be deduplicated; count it as out of order.
                let Some(id) = r.id else {
                    out_of_order += 1;
                    continue;
                };
                if *ids.entry(index).or_insert(id) != id {
                    mismatched.insert(index);
                }
                if !seen.insert(id) {
                    duplicates += 1;
                    continue;
                }
                distinct += 1;
                if id < highest {
                    out_of_order += 1;
                }
                highest = highest.max(id);
                latencies.push(Duration::from_nanos(r.at_ns.saturating_sub(sent_at[index])));
            }
        }
    });
    let expected = sent * members;
    Check {
        sent,
        expected,
        received,
        duplicates,
        out_of_order,
        loss: expected.saturating_sub(distinct),
        id_mismatch: mismatched.len(),
        latency: Latency::of(latencies),
    }
}

/// The index of a soak message from its frame text (`"u00042: soak-000017"` → 17).
fn soak_index(text: &str) -> Option<usize> {
    let (_, message) = text.split_once(": ")?;
    message.strip_prefix(PREFIX)?.parse().ok()
}

pub fn print(r: &SoakReport) {
    let c = &r.check;
    println!(
        "chat-bench soak: {} members, {}/s for {} s (sent in {:.1} s; setup {:.1} s)",
        r.clients, r.rate, r.duration_secs, r.send_secs, r.setup_secs
    );
    println!(
        "sent {}  refused {}  expected deliveries {}  received {}  duplicates (before dedupe) {}",
        c.sent, r.refused, c.expected, c.received, c.duplicates
    );
    println!(
        "out of order {}  id mismatches {}  loss {}  latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        c.out_of_order, c.id_mismatch, c.loss, c.latency.p50_ms, c.latency.p99_ms, c.latency.max_ms
    );
    println!(
        "peak memory (VmHWM of the stack process) = {:.1} MiB -> {}",
        sys::mib(r.peak_memory_kib),
        if r.ok { "OK" } else { "FAILED" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_texts_parse_back_to_their_index() {
        assert_eq!(soak_index("u00042: soak-000017"), Some(17));
        assert_eq!(soak_index("u00042: sync-join"), None);
        assert_eq!(soak_index("u00042: soak-x"), None);
    }
}
