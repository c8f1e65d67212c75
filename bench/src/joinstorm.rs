//! `chat-bench joinstorm`: new connections joining one room at a steady rate, against the
//! embedded store in its AWS-like mode (per-call latency, optimistic writers colliding on the
//! room's counter, each partition's 1,000 write units/s): the room's join ceiling.
//!
//! API Gateway admits 500 new connections per second per account, so a popular room can see
//! that many `$connect` + `setName` pairs at once. Each join here is exactly that pair of store
//! operations, started on schedule whether or not the earlier ones have finished (as
//! independent clients would), so a store that cannot keep up shows as latency and errors, not
//! as a slower schedule. Afterwards the room's log must hold one `MemberJoined` per completed
//! join, with ids dense (1..=n) and each join's id unique.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use chat_shared::config::Retention;
use chat_shared::events::ChatEvent;
use chat_shared::keys;
use chat_shared::store::aws_like::StoreBehaviour;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::{ChatStore, EventRange, StoreError};
use chat_shared::validation::validate_name;
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
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct JoinstormReport {
    pub rate: u32,
    pub duration_secs: u64,
    pub write_latency_ms: u64,
    pub aws_like: bool,
    pub offered: usize,
    pub completed: usize,
    /// Failed joins by error (the store's message, without the connection id).
    pub errors: BTreeMap<String, usize>,
    /// `$connect` to the `setName`'s return, completed joins only.
    pub latency: Latency,
    /// Completed joins per second, from the first start to the last completion.
    pub completed_per_s: f64,
    /// Appends that lost the counter to another writer and retried.
    pub counter_collisions: u64,
    /// The room's log after the storm: `MemberJoined` events, and whether their ids are exactly
    /// 1..=n with one per completed join.
    pub joined_events: usize,
    pub ids_dense: bool,
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
    let store = Arc::new(EmbeddedStore::new(Retention::default()).with_behaviour(behaviour));
    let offered = (u64::from(opts.rate) * opts.duration) as usize;
    progress(format_args!(
        "{offered} joins at {}/s into {}",
        opts.rate,
        keys::DEFAULT_ROOM
    ));
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
    let mut last_done = began;
    for task in tasks {
        match task.await? {
            Ok((latency, done, _)) => {
                latencies.push(latency);
                last_done = last_done.max(done);
            }
            Err(e) => *errors.entry(error_kind(&e)).or_insert(0) += 1,
        }
    }
    let completed = latencies.len();
    let span = last_done.duration_since(began).as_secs_f64();

    // The log: one MemberJoined per completed join, ids exactly 1..=n.
    let now = chat_shared::now_ms();
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .read_events(keys::DEFAULT_ROOM, EventRange::After(after), 1_000, now)
            .await?;
        for event in &page.events {
            if matches!(event.event, ChatEvent::MemberJoined { .. }) {
                ids.push(event.seq);
            }
            after = event.seq;
        }
        if page.events.is_empty() {
            break;
        }
    }
    let ids_dense = ids.len() == completed && ids.iter().copied().eq(1..=completed as u64);
    let ok = errors.is_empty() && completed == offered && ids_dense;
    Ok(JoinstormReport {
        rate: opts.rate,
        duration_secs: opts.duration,
        write_latency_ms: opts.write_latency_ms,
        aws_like: !opts.ideal,
        offered,
        completed,
        errors,
        latency: Latency::of(latencies),
        completed_per_s: if span > 0.0 {
            completed as f64 / span
        } else {
            0.0
        },
        counter_collisions: store.counter_collisions(),
        joined_events: ids.len(),
        ids_dense,
        ok,
    })
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
        "chat-bench joinstorm: {}/s for {} s into one room, store {store}",
        r.rate, r.duration_secs
    );
    println!(
        "offered {}  completed {}  errors {}  -> {:.0} joins/s completed",
        r.offered,
        r.completed,
        r.errors.values().sum::<usize>(),
        r.completed_per_s
    );
    for (kind, n) in &r.errors {
        println!("  {n} × {kind}");
    }
    println!(
        "latency p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; counter collisions {}",
        r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms, r.counter_collisions
    );
    println!(
        "log: {} MemberJoined, ids dense 1..=n: {} -> {}",
        r.joined_events,
        r.ids_dense,
        if r.ok { "OK" } else { "FAILED" }
    );
}
