//! chat-bench: how fast and how safely the chat's fan-out delivers, measured over loopback.
//!
//! - [`fanout`]: one public message to N real WebSocket clients through the whole local stack,
//!   against the raw capacity of `@connections` and a naive unbounded fan-out;
//! - [`fanout_only`]: the fan-out alone against a sink in another process, for its memory;
//! - [`soak`]: steady public traffic; every member must get every message once, in order;
//! - [`busy_room`]: one busy room, batched and unbatched members side by side: POSTs per
//!   event, latency, loss, duplicates and order through the mapping's batching window;
//! - [`cost`]: scripted scenarios priced by the local stack's bill meter;
//! - [`sink`]: the stand-in `@connections` endpoint `fanout_only` runs as a child process;
//! - [`agent`]: the process holding a block of WebSocket clients (`chat-bench clients`);
//! - [`client`], [`stack`], [`mgmt`], [`stats`], [`sys`]: what those are built from.
//!
//! Everything stays on 127.0.0.0/8, and every wait has a bound.

pub mod agent;
pub mod busy_room;
pub mod client;
pub mod cost;
pub mod fanout;
pub mod fanout_only;
pub mod joinstorm;
pub mod mgmt;
pub mod sink;
pub mod soak;
pub mod stack;
pub mod stats;
pub mod sys;

/// A progress line on stderr (stdout carries the results), with the time since start.
pub fn progress(message: std::fmt::Arguments<'_>) {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    eprintln!("[{:>7.1}s] {message}", start.elapsed().as_secs_f64());
}
