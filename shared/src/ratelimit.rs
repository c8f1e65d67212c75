//! The per-connection rate limit: a token bucket (rate per second, burst), kept on the
//! connection's item so every Lambda instance sees the same bucket — API Gateway may hand one
//! connection's messages to different instances at once, so a bucket in memory would be a
//! per-instance limit, not a per-connection one.
//!
//! Tokens are stored in thousandths so the arithmetic is exact integers in both stores.

/// `RATE_LIMIT_PER_SECOND` and `RATE_LIMIT_BURST` (defaults 5 and 20). A rate of 0 turns the
/// limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

pub const DEFAULT_RATE_PER_SECOND: u32 = 5;
pub const DEFAULT_RATE_BURST: u32 = 20;

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: DEFAULT_RATE_PER_SECOND,
            burst: DEFAULT_RATE_BURST,
        }
    }
}

impl RateLimit {
    pub fn is_off(&self) -> bool {
        self.per_second == 0
    }
}

/// A bucket as stored: thousandths of a token, and when it was last updated (ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub milli_tokens: i64,
    pub at_ms: i64,
}

/// Takes one token from `bucket` (a full bucket if there is none yet) at `now_ms`: the new
/// bucket if a token was available, `None` if the request must be refused.
pub fn take(limit: RateLimit, bucket: Option<Bucket>, now_ms: i64) -> Option<Bucket> {
    let full = i64::from(limit.burst) * 1000;
    let refilled = match bucket {
        None => full,
        Some(b) => {
            let elapsed = (now_ms - b.at_ms).max(0);
            (b.milli_tokens + elapsed.saturating_mul(i64::from(limit.per_second))).min(full)
        }
    };
    (refilled >= 1000).then_some(Bucket {
        milli_tokens: refilled - 1000,
        at_ms: now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        // GIVEN 2/s with a burst of 3
        let limit = RateLimit {
            per_second: 2,
            burst: 3,
        };
        let mut bucket = None;
        // WHEN 4 requests come at once THEN 3 pass and the 4th is refused
        for _ in 0..3 {
            bucket = Some(take(limit, bucket, 1_000).expect("within the burst"));
        }
        assert_eq!(take(limit, bucket, 1_000), None);
        // AND half a second later one more passes (2/s), but not two
        bucket = Some(take(limit, bucket, 1_500).expect("refilled one"));
        assert_eq!(take(limit, bucket, 1_500), None);
        // AND after a long pause the bucket holds only the burst
        let b = take(limit, bucket, 100_000).expect("full");
        assert_eq!(b.milli_tokens, 2_000);
    }
}
