//! Pacing `@connections` calls under the account's API Gateway quota.
//!
//! Every `POST @connections/{id}` counts against one quota shared by the whole account and
//! Region — 10,000 requests/s with a burst of 5,000 — and inbound WebSocket messages count
//! against the same quota. 512 calls in flight at a 20 ms round trip is ~25,000/s: unpaced,
//! one big broadcast would throttle every other user of the account, the chat's own senders
//! included. So the fan-out paces itself:
//!
//! - a **rate** (`FANOUT_MAX_RPS`, default 5,000/s: half the quota, the other half left for
//!   inbound messages and anything else in the account) with a **burst** of a fifth of a second
//!   of it, as a GCRA (the "virtual scheduling" form of a token bucket: one timestamp, no
//!   refill timer);
//! - **adaptive**: a 429 halves the current rate (at most once per 100 ms, so one wave of
//!   throttled answers counts once), down to a floor of 1% of the rate; while calls are
//!   accepted the rate grows back by a tenth of the configured rate per second, so full speed
//!   returns within 10 s once the throttling stops (additive increase, multiplicative decrease
//!   — what TCP does for the same reason). The increase is per second, not per call: per call,
//!   a sender would climb back faster the more it sends, and keep hitting the quota (measured:
//!   at 1/500 of the rate per call, a fan-out paced at 5,000/s against a 1,000/s quota stayed
//!   near 2,200/s and had 40% of its calls answered 429).
//!
//! One pacer per process: [`Pacer`] clones share their state, and a Lambda instance builds
//! its configuration once. Each fan-out instance (one per stream shard) paces itself; with S
//! shards the fan-out's total is S × the rate.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// The account's API Gateway quota is 10,000 requests/s; this leaves half for everything else.
pub const DEFAULT_MAX_RPS: u32 = 5_000;

/// How much the rate may be cut, as a fraction of the configured rate.
const FLOOR_FRACTION: f64 = 0.01;
/// One cut per this long: a throttled wave is many 429s for one cause.
const CUT_INTERVAL: Duration = Duration::from_millis(100);
/// The burst, as seconds of the configured rate.
const BURST_SECONDS: f64 = 0.2;
/// While calls are accepted, this fraction of the configured rate comes back per second.
const INCREASE_PER_SECOND: f64 = 0.1;

/// A shared pacer; `Pacer::unpaced()` lets everything through at once.
#[derive(Clone)]
pub struct Pacer {
    inner: Option<Arc<Mutex<State>>>,
}

struct State {
    max_rate: f64,
    rate: f64,
    /// GCRA's theoretical arrival time of the next call at the current rate.
    tat: Instant,
    last_cut: Option<Instant>,
    /// When the rate last grew (or was cut): the increase is proportional to the time since.
    last_change: Instant,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Pacer(unpaced)"),
            Some(state) => {
                let s = state.lock().unwrap_or_else(PoisonError::into_inner);
                write!(f, "Pacer({:.0}/s of {:.0}/s)", s.rate, s.max_rate)
            }
        }
    }
}

impl Default for Pacer {
    fn default() -> Self {
        Pacer::per_second(DEFAULT_MAX_RPS)
    }
}

impl Pacer {
    /// At most `max_rps` calls per second; 0 means unpaced.
    pub fn per_second(max_rps: u32) -> Self {
        if max_rps == 0 {
            return Pacer::unpaced();
        }
        let rate = f64::from(max_rps);
        Pacer {
            inner: Some(Arc::new(Mutex::new(State {
                max_rate: rate,
                rate,
                tat: Instant::now(),
                last_cut: None,
                last_change: Instant::now(),
            }))),
        }
    }

    pub fn unpaced() -> Self {
        Pacer { inner: None }
    }

    fn state(&self) -> Option<std::sync::MutexGuard<'_, State>> {
        // The state is a few numbers, valid after any panic.
        self.inner
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// The current rate (calls per second), `None` when unpaced.
    pub fn current_rate(&self) -> Option<f64> {
        self.state().map(|s| s.rate)
    }

    /// Waits for this call's turn.
    pub async fn acquire(&self) {
        let slot = {
            let Some(mut s) = self.state() else { return };
            let now = Instant::now();
            let interval = Duration::from_secs_f64(1.0 / s.rate);
            // A burst of BURST_SECONDS × rate calls, each `interval` apart in theory: the
            // tolerance is BURST_SECONDS whatever the current rate.
            let tolerance = Duration::from_secs_f64(BURST_SECONDS);
            let tat = s.tat.max(now);
            s.tat = tat + interval;
            // Allowed once the theoretical time is within the burst tolerance of now.
            tat.checked_sub(tolerance).unwrap_or(now)
        };
        if slot > Instant::now() {
            tokio::time::sleep_until(slot).await;
        }
    }

    /// A call was throttled (429): halve the rate, at most once per [`CUT_INTERVAL`].
    pub fn throttled(&self) {
        let Some(mut s) = self.state() else { return };
        let now = Instant::now();
        if s.last_cut.is_some_and(|at| now < at + CUT_INTERVAL) {
            return;
        }
        s.last_cut = Some(now);
        s.last_change = now;
        s.rate = (s.rate / 2.0).max(s.max_rate * FLOOR_FRACTION).max(1.0);
    }

    /// A call was accepted: the rate grows back with the time since it last changed.
    pub fn accepted(&self) {
        self.accepted_at(Instant::now());
    }

    fn accepted_at(&self, now: Instant) {
        let Some(mut s) = self.state() else { return };
        if s.rate < s.max_rate {
            let elapsed = now.saturating_duration_since(s.last_change).as_secs_f64();
            s.rate = (s.rate + s.max_rate * INCREASE_PER_SECOND * elapsed).min(s.max_rate);
        }
        s.last_change = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time: the assertions are lower bounds ("never faster than the rate"), which a
    // loaded machine cannot break.

    #[tokio::test]
    async fn calls_are_paced_to_the_rate_after_the_burst() {
        // GIVEN 1,000 calls/s (a burst of 200)
        let pacer = Pacer::per_second(1_000);
        let start = Instant::now();
        // WHEN the burst goes through THEN it is not held back much
        for _ in 0..200 {
            pacer.acquire().await;
        }
        let burst = start.elapsed();
        // WHEN 300 more calls go through
        for _ in 0..300 {
            pacer.acquire().await;
        }
        // THEN they took at least 300 ms at the rate (the burst's 200 ms of credit is spent)
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(295),
            "{took:?} (burst {burst:?})"
        );
    }

    #[tokio::test]
    async fn a_429_halves_the_rate_once_per_wave_and_acceptance_restores_it() {
        let pacer = Pacer::per_second(1_000);
        // WHEN a wave of 429s arrives at once THEN the rate is halved once
        for _ in 0..50 {
            pacer.throttled();
        }
        assert_eq!(pacer.current_rate(), Some(500.0));
        // AND again only after the cut interval
        tokio::time::sleep(CUT_INTERVAL).await;
        pacer.throttled();
        assert_eq!(pacer.current_rate(), Some(250.0));
        // AND never below the floor
        for _ in 0..8 {
            tokio::time::sleep(CUT_INTERVAL).await;
            pacer.throttled();
        }
        assert_eq!(pacer.current_rate(), Some(10.0));
        // AND at the floor, calls really are that slow: 5 calls past a 2-call burst at 10/s
        let start = Instant::now();
        for _ in 0..5 {
            pacer.acquire().await;
        }
        assert!(
            start.elapsed() >= Duration::from_millis(190),
            "{:?}",
            start.elapsed()
        );
        // WHEN calls are accepted again THEN the rate climbs back with time, not with the
        // number of calls: a tenth of the configured rate per second, up to it
        let now = Instant::now();
        pacer.accepted_at(now);
        let start = pacer.current_rate().expect("paced");
        for _ in 0..10_000 {
            pacer.accepted_at(now);
        }
        assert_eq!(
            pacer.current_rate(),
            Some(start),
            "many calls at once are not time"
        );
        pacer.accepted_at(now + Duration::from_secs(2));
        let rate = pacer.current_rate().expect("paced");
        assert!(
            (rate - start - 200.0).abs() < 1e-6,
            "{rate} after 2 s from {start}"
        );
        pacer.accepted_at(now + Duration::from_secs(60));
        assert_eq!(pacer.current_rate(), Some(1_000.0));
    }

    #[tokio::test]
    async fn unpaced_lets_everything_through() {
        let pacer = Pacer::per_second(0);
        for _ in 0..100_000 {
            pacer.acquire().await;
        }
        pacer.throttled();
        assert_eq!(pacer.current_rate(), None);
    }
}
