//! `chat-bench soak`: N members, random senders posting public messages at a steady aggregate
//! rate for a while; afterwards every member must hold every message exactly once after
//! dedupe by event id, in id order. Loss and disorder fail the run.
//!
//! With `--rooms R` the members are spread over R rooms (client `i` joins room `s<i mod R>`,
//! besides the lobby), message `k` goes to room `k mod R` from one of its members, and every
//! member must hold exactly its own room's messages: once each after dedupe by (room, id), in
//! id order per room, none from another room (a cross-room leak fails the run).

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
use crate::stack::{room_members, wait_for_members, Stack, StackSettings};
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
    /// Spread the members over this many rooms (0: everyone in the lobby only).
    #[arg(long, default_value_t = 0)]
    pub rooms: usize,
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
            rooms: 0,
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
    /// Receipts of a message of another room than the member's (with `--rooms`).
    pub cross_room: usize,
    /// Send → receipt, first receipt of each message at each member.
    pub latency: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub clients: usize,
    pub rooms: usize,
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
    if opts.rooms > opts.clients {
        bail!("--rooms must be at most --clients (every room needs a member)");
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
    let rooms = Rooms::new(opts.rooms, n);
    if rooms.count > 0 {
        progress(format_args!("joining {} rooms", rooms.count));
        for i in 0..n {
            let room = rooms.name(rooms.of_client(i));
            swarm
                .send(i, &json!({"action": "join", "room": room}))
                .await?;
        }
        for r in 0..rooms.count {
            let want = rooms.members(r);
            let deadline = Instant::now() + timeout;
            while room_members(&stack.store, &rooms.name(r)).await?.len() != want {
                if Instant::now() >= deadline {
                    bail!("room {} did not reach {want} members", rooms.name(r));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        // The joins' presence frames go out through the stream; let them pass before timing.
        swarm.wait_quiet(Duration::from_millis(500), timeout).await;
    }
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
        let message = format!("{PREFIX}{k:06}");
        let (sender, frame) = if rooms.count == 0 {
            let sender = rng.random_range(0..n);
            (sender, json!({"action": "sendPublic", "message": message}))
        } else {
            let room = k % rooms.count;
            let sender = rooms.client(room, rng.random_range(0..rooms.members(room)));
            let frame =
                json!({"action": "sendPublic", "room": rooms.name(room), "message": message});
            (sender, frame)
        };
        texts.push((
            format!("{}: {message}", swarm.clients[sender].name),
            rooms.audience(k, n),
        ));
        let at = swarm.send(sender, &frame).await?;
        sent_at.push(at);
    }
    let send_secs = start.elapsed().as_secs_f64();

    progress(format_args!("sent; draining"));
    let drain = Instant::now() + Duration::from_secs(opts.drain_secs);
    for (text, audience) in &texts {
        let left = drain.saturating_duration_since(Instant::now());
        if !swarm.wait_for(text, *audience, left).await {
            break;
        }
    }
    // Late duplicates arrive after the last first copy, if at all.
    swarm
        .wait_quiet(Duration::from_millis(500), Duration::from_secs(10))
        .await;
    let refused = swarm.error_frames() - refused_before;
    let peak_memory_kib = sys::memory().peak_kib;
    let check = analyse(&swarm, &sent_at, &rooms);
    swarm.close().await;
    // The closes run `$disconnect`s whose leaves go out through the stream; let them finish
    // while the gateway still answers, or the fan-out meets a closed port at shutdown.
    let _ = wait_for_members(&stack.store, 0, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.shutdown().await;

    let ok = check.loss == 0
        && check.out_of_order == 0
        && check.id_mismatch == 0
        && check.cross_room == 0
        && refused == 0;
    Ok(SoakReport {
        clients: n,
        rooms: opts.rooms,
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

/// How the members are spread over rooms (`count` 0: everyone in the lobby only). Client `i`
/// is in room `i mod count`; message `k` goes to room `k mod count`.
#[derive(Debug, Clone, Copy)]
struct Rooms {
    count: usize,
    clients: usize,
}

impl Rooms {
    fn new(count: usize, clients: usize) -> Self {
        Rooms { count, clients }
    }

    fn name(&self, room: usize) -> String {
        format!("s{room:05}")
    }

    fn of_client(&self, client: usize) -> usize {
        client % self.count.max(1)
    }

    /// Members of room `room`.
    fn members(&self, room: usize) -> usize {
        (self.clients + self.count - 1 - room) / self.count
    }

    /// The `j`-th member of room `room`.
    fn client(&self, room: usize, j: usize) -> usize {
        room + j * self.count
    }

    /// Whether client `client` should receive message `k`.
    fn hears(&self, client: usize, k: usize) -> bool {
        self.count == 0 || self.of_client(client) == k % self.count
    }

    /// How many members should receive message `k`.
    fn audience(&self, k: usize, n: usize) -> usize {
        if self.count == 0 {
            n
        } else {
            self.members(k % self.count)
        }
    }
}

/// Checks every member's receipts against the messages sent at `sent_at` (mono ns, by index).
fn analyse(swarm: &Swarm, sent_at: &[u64], rooms: &Rooms) -> Check {
    let sent = sent_at.len();
    let live: Vec<usize> = swarm.live().map(|(i, _)| i).collect();
    let mut received = 0;
    let mut duplicates = 0;
    let mut out_of_order = 0;
    let mut cross_room = 0;
    let mut distinct = 0;
    let expected: usize = live
        .iter()
        .map(|&c| (0..sent).filter(|&k| rooms.hears(c, k)).count())
        .sum();
    let mut latencies = Vec::with_capacity(expected);
    // Message index → the event id it was first seen with.
    let mut ids: HashMap<usize, u64> = HashMap::new();
    let mut mismatched: HashSet<usize> = HashSet::new();
    swarm.with_logs(|logs| {
        for &c in &live {
            // Dedupe by (room, id), order per room: what a client of several rooms does.
            let mut seen: HashSet<(Option<&str>, u64)> = HashSet::new();
            let mut highest: HashMap<Option<&str>, u64> = HashMap::new();
            for r in &logs[c].receipts {
                let Some(index) = soak_index(&r.text).filter(|&k| k < sent) else {
                    continue;
                };
                received += 1;
                if !rooms.hears(c, index) {
                    cross_room += 1;
                    continue;
                }
                // A frame without an id cannot be deduplicated; count it as out of order.
                let Some(id) = r.id else {
                    out_of_order += 1;
                    continue;
                };
                if *ids.entry(index).or_insert(id) != id {
                    mismatched.insert(index);
                }
                let room = r.room.as_deref();
                if !seen.insert((room, id)) {
                    duplicates += 1;
                    continue;
                }
                distinct += 1;
                let top = highest.entry(room).or_insert(0);
                if id < *top {
                    out_of_order += 1;
                }
                *top = (*top).max(id);
                latencies.push(Duration::from_nanos(r.at_ns.saturating_sub(sent_at[index])));
            }
        }
    });
    Check {
        sent,
        expected,
        received,
        duplicates,
        out_of_order,
        loss: expected.saturating_sub(distinct),
        id_mismatch: mismatched.len(),
        cross_room,
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
    let rooms = match r.rooms {
        0 => String::new(),
        n => format!(" in {n} rooms"),
    };
    println!(
        "chat-bench soak: {} members{rooms}, {}/s for {} s (sent in {:.1} s; setup {:.1} s)",
        r.clients, r.rate, r.duration_secs, r.send_secs, r.setup_secs
    );
    println!(
        "sent {}  refused {}  expected deliveries {}  received {}  duplicates (before dedupe) {}",
        c.sent, r.refused, c.expected, c.received, c.duplicates
    );
    println!(
        "out of order {}  id mismatches {}  cross-room {}  loss {}  latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        c.out_of_order, c.id_mismatch, c.cross_room, c.loss, c.latency.p50_ms, c.latency.p99_ms, c.latency.max_ms
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
    fn rooms_split_the_members_and_the_messages_evenly() {
        // GIVEN 10 clients over 3 rooms: rooms of 4, 3 and 3
        let rooms = Rooms::new(3, 10);
        assert_eq!(
            (0..3).map(|r| rooms.members(r)).collect::<Vec<_>>(),
            [4, 3, 3]
        );
        // THEN each room's members are the clients that say they are in it
        for r in 0..3 {
            for j in 0..rooms.members(r) {
                assert_eq!(rooms.of_client(rooms.client(r, j)), r);
            }
        }
        // AND a message reaches its room's members only
        assert!(rooms.hears(4, 1) && !rooms.hears(4, 2));
        assert_eq!(rooms.audience(0, 10), 4);
        // AND without rooms everyone hears everything
        let lobby = Rooms::new(0, 10);
        assert!(lobby.hears(4, 2));
        assert_eq!(lobby.audience(7, 10), 10);
    }

    #[test]
    fn soak_texts_parse_back_to_their_index() {
        assert_eq!(soak_index("u00042: soak-000017"), Some(17));
        assert_eq!(soak_index("u00042: sync-join"), None);
        assert_eq!(soak_index("u00042: soak-x"), None);
    }
}
