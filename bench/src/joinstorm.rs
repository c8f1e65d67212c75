//! `chat-bench joinstorm`: new connections joining one room at a steady rate, against the
//! embedded store in its AWS-like mode (per-call latency, optimistic writers colliding on the
//! room's counter, each partition's 1,000 write units/s and 3,000 read units/s): the room's
//! join ceiling, and with `--prefill` the cost of a join storm and a broadcast in a large room.
//!
//! API Gateway admits 500 new connections per second per account, so a popular room can see
//! that many `$connect` + `setName` pairs at once. Each join here is exactly that pair of store
//! operations, started on schedule whether or not the earlier ones have finished (as
//! independent clients would), so a store that cannot keep up shows as latency and errors, not
//! as a slower schedule. A join is a sequenced `MemberJoined` while the room is under its
//! large-room limit and its counter keeps up; past the limit, or after losing the counter
//! three times, it is unsequenced (see `chat_shared::keys`). Afterwards the room's log must
//! have ids exactly 1..=n (dense, in order) with one `MemberJoined` per sequenced join, and
//! the fan-out's member walk must find every joiner.
//!
//! `--prefill N` first fills the room with N members through the same store in its ideal mode
//! (instant; the same items), then runs the storm in the AWS-like mode, then one broadcast's
//! member walk (`fanout::members`, the reads a broadcast makes). The embedded store meters
//! every partition's request units; the report gives the highest units any one partition used
//! in any one second of the storm and the broadcast, next to DynamoDB's 1,000 WCU/s and
//! 3,000 RCU/s per partition, and how many requests were throttled.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use chat_shared::config::{Retention, DEFAULT_PRESENCE_BROADCAST_LIMIT};
use chat_shared::events::ChatEvent;
use chat_shared::keys;
use chat_shared::store::aws_like::StoreBehaviour;
use chat_shared::store::embedded::{Consumed, EmbeddedStore, THROTTLED};
use chat_shared::store::{ChatStore, EventRange, StoreError};
use chat_shared::validation::validate_name;
use futures::StreamExt;
use serde::Serialize;

use crate::agent::client_name;
use crate::progress;
use crate::stats::Latency;

#[derive(Debug, Clone, clap::Args)]
pub struct JoinstormOptions {
    /// Joins (a `$connect` then a `setName`) started per second.
    #[arg(long, default_value_t = 500)]
    pub rate: u32,
    /// Seconds of joining.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// The store's time per write call (ms); reads take half.
    #[arg(long, default_value_t = 10)]
    pub write_latency_ms: u64,
    /// Run against the ideal store instead (instant, no contention, no throughput limit).
    #[arg(long)]
    pub ideal: bool,
    /// Members the room has before the storm (filled through the ideal store, then the storm
    /// and a broadcast's member walk run AWS-like).
    #[arg(long, default_value_t = 0)]
    pub prefill: usize,
    /// The large-room limit (`PRESENCE_BROADCAST_LIMIT`).
    #[arg(long, default_value_t = DEFAULT_PRESENCE_BROADCAST_LIMIT)]
    pub presence_limit: usize,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// The most request units one partition used in one second.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Peak {
    pub units_per_s: f64,
    pub partition: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct JoinstormReport {
    pub rate: u32,
    pub duration_secs: u64,
    pub write_latency_ms: u64,
    pub aws_like: bool,
    pub presence_limit: usize,
    pub prefill: usize,
    pub prefill_secs: f64,
    pub offered: usize,
    pub completed: usize,
    /// Failed joins by error (the store's message, without the connection id).
    pub errors: BTreeMap<String, usize>,
    /// Failed requests that were DynamoDB throttling (`ProvisionedThroughputExceeded`).
    pub throttled: usize,
    /// `$connect` to the `setName`'s return, completed joins only.
    pub latency: Latency,
    /// Completed joins per second, from the first start to the last completion.
    pub completed_per_s: f64,
    /// Completed joins that recorded `MemberJoined`, and those that joined unsequenced.
    pub sequenced: usize,
    pub unsequenced: usize,
    /// Appends that lost the counter to another writer and retried.
    pub counter_collisions: u64,
    /// The room's log after the storm: its events, whether their ids are exactly 1..=n, and
    /// whether its `MemberJoined` are one per sequenced join (prefill's included).
    pub log_events: usize,
    pub ids_dense: bool,
    /// The fan-out's member walk after the storm: members found, and whether every member
    /// (prefilled and joined) is among them exactly once.
    pub members_found: usize,
    pub every_member_found: bool,
    /// The broadcast's member walk (AWS-like store): its time and the room's shards.
    pub broadcast_walk_ms: f64,
    pub shards: u32,
    /// The busiest partition's write and read units in any one second of the storm and the
    /// broadcast (DynamoDB allows 1,000 WCU/s and 3,000 RCU/s per partition).
    pub peak_write: Peak,
    pub peak_read: Peak,
    pub ok: bool,
}

pub async fn run(opts: &JoinstormOptions) -> anyhow::Result<JoinstormReport> {
    if opts.rate == 0 || opts.duration == 0 {
        bail!("--rate and --duration must be positive");
    }
    let behaviour = if opts.ideal {
        StoreBehaviour::IDEAL
    } else {
        StoreBehaviour {
            write_latency: Duration::from_millis(opts.write_latency_ms),
            read_latency: Duration::from_millis(opts.write_latency_ms / 2),
            ..StoreBehaviour::aws_like()
        }
    };
    let room = keys::DEFAULT_ROOM;
    let ideal = EmbeddedStore::new(Retention::default()).with_large_room_limit(opts.presence_limit);
    let prefill_began = Instant::now();
    let mut prefilled_sequenced = 0;
    for i in 0..opts.prefill {
        let id = format!("P{i:09}=");
        let name = validate_name(&format!("pre{i}"))
            .map_err(|r| anyhow!("invalid generated name: {}", r.message))?;
        let now = chat_shared::now_ms();
        ideal.add_connection(&id, now).await?;
        prefilled_sequenced += ideal.set_name(&id, &name, now).await?.len();
        if (i + 1) % 20_000 == 0 {
            progress(format_args!("prefilled {} members", i + 1));
        }
    }
    let prefill_secs = prefill_began.elapsed().as_secs_f64();
    // The same items, now served as DynamoDB would serve them.
    let store = Arc::new(ideal.clone().with_behaviour(behaviour));
    let offered = (u64::from(opts.rate) * opts.duration) as usize;
    progress(format_args!(
        "{offered} joins at {}/s into {room} ({} members before)",
        opts.rate, opts.prefill
    ));

    // The meter, sampled every second: each partition's units used in that second.
    let baseline = store.consumed_by_partition();
    let metering = Arc::clone(&store);
    let meter = tokio::spawn(async move {
        let mut before = baseline;
        let mut peaks = (Peak::default(), Peak::default());
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = metering.consumed_by_partition();
            record_peaks(&before, &now, &mut peaks);
            before = now;
            if Arc::strong_count(&metering) == 1 {
                return peaks;
            }
        }
    });

    let period = Duration::from_secs_f64(1.0 / f64::from(opts.rate));
    let start = tokio::time::Instant::now();
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(offered);
    for i in 0..offered {
        tokio::time::sleep_until(start + period.mul_f64(i as f64)).await;
        let store = Arc::clone(&store);
        let name = validate_name(&client_name(i, offered))
            .map_err(|r| anyhow!("invalid generated name: {}", r.message))?;
        tasks.push(tokio::spawn(async move {
            let id = format!("J{i:09}=");
            let at = Instant::now();
            let now = chat_shared::now_ms();
            store.add_connection(&id, now).await?;
            let events = store.set_name(&id, &name, now).await?;
            Ok::<_, StoreError>((at.elapsed(), Instant::now(), events.len()))
        }));
    }
    let mut latencies = Vec::with_capacity(offered);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut throttled = 0;
    let mut last_done = began;
    let mut sequenced = 0;
    for task in tasks {
        match task.await? {
            Ok((latency, done, events)) => {
                latencies.push(latency);
                last_done = last_done.max(done);
                sequenced += events;
            }
            Err(e) => {
                if e.to_string().contains(THROTTLED) || format!("{e:?}").contains(THROTTLED) {
                    throttled += 1;
                }
                *errors.entry(error_kind(&e)).or_insert(0) += 1;
            }
        }
    }
    let completed = latencies.len();
    let span = last_done.duration_since(began).as_secs_f64();

    // One broadcast: the fan-out's walk of the room's members, as DynamoDB would serve it.
    let now = chat_shared::now_ms();
    let walk_began = Instant::now();
    let mut found: HashSet<String> = HashSet::new();
    let mut duplicates = 0;
    {
        let mut walk = std::pin::pin!(chat_shared::fanout::members(store.as_ref(), room, now));
        while let Some(member) = walk.next().await {
            if !found.insert(member?.connection_id) {
                duplicates += 1;
            }
        }
    }
    let broadcast_walk_ms = walk_began.elapsed().as_secs_f64() * 1_000.0;
    let shards = store.member_shards(room, now).await?;
    drop(store);
    let (peak_write, peak_read) = meter.await?;

    // The log (read from the ideal view: not part of the storm's cost): ids exactly 1..=n, one
    // MemberJoined per sequenced join.
    let mut ids = Vec::new();
    let mut joined_events = 0;
    let mut after = 0;
    loop {
        let page = ideal
            .read_events(room, EventRange::After(after), 1_000, now)
            .await?;
        for event in &page.events {
            if matches!(event.event, ChatEvent::MemberJoined { .. }) {
                joined_events += 1;
            }
            ids.push(event.seq);
            after = event.seq;
        }
        if page.events.is_empty() {
            break;
        }
    }
    let ids_dense = ids.iter().copied().eq(1..=ids.len() as u64)
        && joined_events == prefilled_sequenced + sequenced;
    let every_member_found = duplicates == 0
        && found.len() == opts.prefill + completed
        && (0..opts.prefill).all(|i| found.contains(&format!("P{i:09}=")));
    let ok = errors.is_empty() && completed == offered && ids_dense && every_member_found;
    Ok(JoinstormReport {
        rate: opts.rate,
        duration_secs: opts.duration,
        write_latency_ms: opts.write_latency_ms,
        aws_like: !opts.ideal,
        presence_limit: opts.presence_limit,
        prefill: opts.prefill,
        prefill_secs,
        offered,
        completed,
        errors,
        throttled,
        latency: Latency::of(latencies),
        completed_per_s: if span > 0.0 {
            completed as f64 / span
        } else {
            0.0
        },
        sequenced,
        unsequenced: completed - sequenced,
        counter_collisions: ideal.counter_collisions(),
        log_events: ids.len(),
        ids_dense,
        members_found: found.len(),
        every_member_found,
        broadcast_walk_ms,
        shards,
        peak_write,
        peak_read,
        ok,
    })
}

/// Raises `peaks` (write, read) to the busiest partition's units between two meter readings
/// a second apart.
fn record_peaks(
    before: &HashMap<String, Consumed>,
    now: &HashMap<String, Consumed>,
    peaks: &mut (Peak, Peak),
) {
    for (pk, c) in now {
        let was = before.get(pk).copied().unwrap_or_default();
        let write = c.write_units.saturating_sub(was.write_units) as f64;
        let read = c.read_half_units.saturating_sub(was.read_half_units) as f64 / 2.0;
        if write > peaks.0.units_per_s {
            peaks.0 = Peak {
                units_per_s: write,
                partition: pk.clone(),
            };
        }
        if read > peaks.1.units_per_s {
            peaks.1 = Peak {
                units_per_s: read,
                partition: pk.clone(),
            };
        }
    }
}

/// A failed join's error, without the parts that differ per join.
fn error_kind(e: &StoreError) -> String {
    match e {
        StoreError::Contention(n) => format!("contention (gave up after {n} attempts)"),
        StoreError::Backend { op, source } => format!("{op}: {source}"),
        other => other.to_string(),
    }
}

pub fn print(r: &JoinstormReport) {
    let store = if r.aws_like {
        format!("AWS-like (writes {} ms)", r.write_latency_ms)
    } else {
        "ideal".to_owned()
    };
    println!(
        "chat-bench joinstorm: {}/s for {} s into one room of {} members (large past {}), store {store}",
        r.rate, r.duration_secs, r.prefill, r.presence_limit
    );
    if r.prefill > 0 {
        println!(
            "prefill: {} members in {:.1} s (ideal store)",
            r.prefill, r.prefill_secs
        );
    }
    println!(
        "offered {}  completed {}  errors {} (throttled {})  -> {:.0} joins/s completed",
        r.offered,
        r.completed,
        r.errors.values().sum::<usize>(),
        r.throttled,
        r.completed_per_s
    );
    for (kind, n) in &r.errors {
        println!("  {n} × {kind}");
    }
    println!(
        "sequenced {}  unsequenced {}; latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; counter collisions {}",
        r.sequenced,
        r.unsequenced,
        r.latency.p50_ms,
        r.latency.p99_ms,
        r.latency.max_ms,
        r.counter_collisions
    );
    println!(
        "log: {} events, ids dense 1..=n with one MemberJoined per sequenced join: {}",
        r.log_events, r.ids_dense
    );
    println!(
        "broadcast walk: {} members over {} shards in {:.0} ms, every member once: {}",
        r.members_found, r.shards, r.broadcast_walk_ms, r.every_member_found
    );
    println!(
        "busiest partition per second: {:.0} WCU ({}), {:.0} RCU ({}); DynamoDB allows 1,000 / 3,000",
        r.peak_write.units_per_s, r.peak_write.partition, r.peak_read.units_per_s, r.peak_read.partition
    );
    println!("{}", if r.ok { "OK" } else { "FAILED" });
}
