//! A discrete-event simulation of one broadcast split across W fan-out workers, under the
//! account's API Gateway quota: time to last delivery against W. See docs/fanout-scaling.md.
//!
//! ```sh
//! cargo run --release -p chat-local --example fanout_workers -- [per-worker-rate]
//! ```
//!
//! Model (each knob is a constant below, from AWS documentation or our measurements):
//! - the account token bucket: 10,000 requests/s, burst 5,000, shared by every worker;
//! - each worker keeps `CONCURRENCY` calls in flight, and can *start* at most
//!   `per_worker_rate` calls per second (its CPU: signing, TLS, serialising — measured locally
//!   by `chat-bench fanout --latency-ms 0`);
//! - each call takes `latency` × U(0.5, 1.5) (the round trip to `@connections`);
//! - splitting costs a start-up delay per extra worker (queueing the segment and the worker's
//!   invocation and first member page, `SPLIT_OVERHEAD`); one worker starts at once;
//! - a call that finds no token waits for one (paced, as a client honouring 429s with backoff
//!   would be at best).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rand::{Rng, SeedableRng};

const QUOTA_PER_S: f64 = 10_000.0;
const BURST: f64 = 5_000.0;
const CONCURRENCY: usize = 256;
const SPLIT_OVERHEAD_S: f64 = 0.150;

/// Seconds until the last of `n` recipients has its frame, with `workers` workers.
fn simulate(n: usize, workers: usize, latency_s: f64, per_worker_rate: f64, seed: u64) -> f64 {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // Completions in flight: (time in ns, worker).
    let mut in_flight: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let ns = |s: f64| (s * 1e9) as u64;
    let share = |w: usize| n / workers + usize::from(w < n % workers);
    let mut remaining: Vec<usize> = (0..workers).map(share).collect();
    let mut next_start: Vec<f64> = (0..workers)
        .map(|w| if w == 0 { 0.0 } else { SPLIT_OVERHEAD_S })
        .collect();
    let mut busy = vec![0usize; workers];
    let (mut tokens, mut bucket_time) = (BURST, 0.0_f64);
    let mut done = 0;
    let mut last = 0.0_f64;
    let mut now = 0.0_f64;
    while done < n {
        // Start every call that can start now (round-robin over workers).
        let mut progressed = true;
        while progressed {
            progressed = false;
            for w in 0..workers {
                if remaining[w] == 0 || busy[w] == CONCURRENCY || next_start[w] > now {
                    continue;
                }
                tokens = (tokens + (now - bucket_time) * QUOTA_PER_S).min(BURST);
                bucket_time = now;
                // A hair of tolerance: refills computed in floating point land a rounding
                // error short of a whole token at the instant one is due.
                if tokens < 1.0 - 1e-6 {
                    continue;
                }
                tokens -= 1.0;
                remaining[w] -= 1;
                busy[w] += 1;
                next_start[w] = now + 1.0 / per_worker_rate;
                let took = latency_s * rng.random_range(0.5..1.5);
                in_flight.push(Reverse((ns(now + took), w)));
                progressed = true;
            }
        }
        // Advance to the next moment something can change.
        let token_at = bucket_time + (1.0 - tokens).max(0.0) / QUOTA_PER_S;
        let start_at = (0..workers)
            .filter(|&w| remaining[w] > 0 && busy[w] < CONCURRENCY)
            .map(|w| next_start[w].max(token_at))
            .fold(f64::INFINITY, f64::min);
        let complete_at = in_flight
            .peek()
            .map_or(f64::INFINITY, |Reverse((t, _))| *t as f64 / 1e9);
        if complete_at <= start_at {
            if let Some(Reverse((t, w))) = in_flight.pop() {
                now = t as f64 / 1e9;
                busy[w] -= 1;
                done += 1;
                last = now;
            }
        } else {
            // Always move forward, even when rounding puts the next start at `now`.
            now = start_at.max(now + 1e-9);
        }
    }
    last
}

fn main() {
    let per_worker_rate: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(12_000.0);
    println!(
        "time to last delivery (s); quota {QUOTA_PER_S}/s burst {BURST}; {CONCURRENCY} in flight per worker; \
         per-worker start rate {per_worker_rate}/s; split overhead {SPLIT_OVERHEAD_S} s"
    );
    for latency_ms in [20.0, 50.0] {
        println!("\nlatency {latency_ms} ms");
        println!(
            "{:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "N", "W=1", "W=2", "W=4", "W=8", "W=16"
        );
        for n in [10_000usize, 100_000, 1_000_000] {
            let row: Vec<String> = [1, 2, 4, 8, 16]
                .iter()
                .map(|&w| {
                    format!(
                        "{:>9.2}",
                        simulate(n, w, latency_ms / 1e3, per_worker_rate, 7)
                    )
                })
                .collect();
            println!("{n:>10} {}", row.join(" "));
        }
    }
}
