//! API Gateway's account-level throttles, as token buckets: the requests per second (and
//! burst) that inbound messages and `@connections` calls share, and the new connections per
//! second. Sources: API Gateway developer guide, "Protect your WebSocket APIs" (token bucket,
//! 429 Too Many Requests) and "Amazon API Gateway quotas" (10,000 requests/s with a burst of
//! 5,000 per account and Region; 500 new WebSocket connections per second).

use std::sync::{Mutex, PoisonError};

use tokio::time::Instant;

/// A steady rate and the bucket's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleLimit {
    pub per_second: f64,
    pub burst: f64,
}

impl ThrottleLimit {
    /// The account's requests: 10,000 per second, burst 5,000.
    pub const ACCOUNT_REQUESTS: ThrottleLimit = ThrottleLimit {
        per_second: 10_000.0,
        burst: 5_000.0,
    };
    /// New WebSocket connections: 500 per second (the bucket holds one second's worth).
    pub const NEW_CONNECTIONS: ThrottleLimit = ThrottleLimit {
        per_second: 500.0,
        burst: 500.0,
    };
}

/// A token bucket, full at the start.
#[derive(Debug)]
pub(super) struct Bucket {
    limit: ThrottleLimit,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub(super) fn new(limit: ThrottleLimit) -> Self {
        Bucket {
            limit,
            state: Mutex::new((limit.burst, Instant::now())),
        }
    }

    /// Takes one token: `false` when the request is throttled.
    pub(super) fn take(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, at) = &mut *state;
        let now = Instant::now();
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.limit.per_second)
            .min(self.limit.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
