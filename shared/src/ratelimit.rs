//! The per-connection rate limit: a token bucket (rate per second, burst), kept on the
//! connection's item so every Lambda instance sees the same bucket — API Gateway may hand one
//! connection's messages to different instances at once, so a bucket in memory would be a
//! per-instance limit, not a per-connection one.
//!
//! Tokens are stored in thousandths so the arithmetic is exact integers in both stores.
//!
//! A bucket per connection alone can be reset (reconnect for a fresh burst) and multiplied
//! (open many connections). So every connection also belongs to a **principal** — its
//! identity when authenticated, else its source IP (`requestContext.identity.sourceIp`) — and
//! a principal is bounded across all its connections ([`PrincipalLimit`]): connections open at
//! once (a slot per connection, taken at `$connect` in the same transaction that records the
//! connection, given back when it is removed) and requests per second (a counter per window of
//! [`PRINCIPAL_WINDOW_SECS`], one atomic `ADD` per request). Both live in the principal's own
//! partition (`keys::limit_pk`), so one principal's traffic never lands on another's.

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

/// `PRINCIPAL_MAX_CONNECTIONS` and `PRINCIPAL_RATE_PER_SECOND`: what one principal (an
/// identity, or without authentication a source IP) may do across all its connections.
/// 0 turns either off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrincipalLimit {
    /// Connections open at once; `$connect` over it is refused with 429.
    pub max_connections: u32,
    /// Requests per second over all its connections, counted per window of
    /// [`PRINCIPAL_WINDOW_SECS`]: at most `per_second × PRINCIPAL_WINDOW_SECS` requests in a
    /// window (so at most twice that across a window's boundary).
    pub per_second: u32,
}

/// Defaults sized for a person with a few tabs and devices, or a small office behind one
/// NAT address without authentication: ten connections' worth of the per-connection rate.
pub const DEFAULT_PRINCIPAL_MAX_CONNECTIONS: u32 = 50;
pub const DEFAULT_PRINCIPAL_RATE_PER_SECOND: u32 = 50;
/// A fixed window: one counter item per principal per window, updated with one atomic `ADD`
/// (no read, no compare-and-swap to retry), at the price of allowing up to twice the budget
/// across a boundary. Ten seconds keeps that burst short and the items few.
pub const PRINCIPAL_WINDOW_SECS: i64 = 10;

impl Default for PrincipalLimit {
    fn default() -> Self {
        PrincipalLimit {
            max_connections: DEFAULT_PRINCIPAL_MAX_CONNECTIONS,
            per_second: DEFAULT_PRINCIPAL_RATE_PER_SECOND,
        }
    }
}

impl PrincipalLimit {
    /// No limit across connections.
    pub const OFF: PrincipalLimit = PrincipalLimit {
        max_connections: 0,
        per_second: 0,
    };

    /// Requests allowed in one window (0: no limit).
    pub fn per_window(&self) -> u32 {
        self.per_second.saturating_mul(PRINCIPAL_WINDOW_SECS as u32)
    }
}

/// Which window `now_ms` falls in, and when that window's counter may expire (epoch seconds:
/// a minute after the window ends, so a late request never finds it gone early).
pub fn window(now_ms: i64) -> (i64, i64) {
    let index = now_ms.div_euclid(PRINCIPAL_WINDOW_SECS * 1000);
    (index, (index + 1) * PRINCIPAL_WINDOW_SECS + 60)
}

/// The principal of a connection, as stored: `id:<identity>` when authenticated, else
/// `ip:<source IP>`; `None` when neither is known (no cross-connection limit applies).
pub fn principal(identity: Option<&str>, source_ip: Option<&str>) -> Option<String> {
    match (identity, source_ip) {
        (Some(id), _) => Some(format!("id:{id}")),
        (None, Some(ip)) if !ip.is_empty() => Some(format!("ip:{ip}")),
        _ => None,
    }
}

/// What the limits said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// Over the connection's own bucket.
    ConnectionLimited,
    /// Over its principal's requests per window, across all its connections.
    PrincipalLimited,
}

/// What a request is checked against before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits<'a> {
    /// The connection's own bucket.
    pub connection: RateLimit,
    /// Requests per second across the principal's connections (0: no limit).
    pub principal_per_second: u32,
    /// The principal to charge when the connection has none recorded (an unknown or expired
    /// connection, or one recorded before principals): the request's source IP, so no
    /// request goes uncounted.
    pub fallback_principal: Option<&'a str>,
}

impl RequestLimits<'static> {
    /// The connection's bucket only.
    pub fn connection_only(connection: RateLimit) -> Self {
        RequestLimits {
            connection,
            principal_per_second: 0,
            fallback_principal: None,
        }
    }
}

impl RequestLimits<'_> {
    /// Requests allowed per window to the principal (0: no limit).
    pub fn principal_per_window(&self) -> u32 {
        PrincipalLimit {
            max_connections: 0,
            per_second: self.principal_per_second,
        }
        .per_window()
    }
}

/// The live slots of a principal after dropping those expired at `now_s`, if one more
/// connection fits under `max`.
pub fn admit(
    slots: &std::collections::BTreeMap<String, i64>,
    max: u32,
    now_s: i64,
) -> Option<std::collections::BTreeMap<String, i64>> {
    let live: std::collections::BTreeMap<String, i64> = slots
        .iter()
        .filter(|(_, &exp)| exp > now_s)
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    (live.len() < max as usize).then_some(live)
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
    fn slots_expire_and_fill() {
        // GIVEN a principal with 2 slots, one expired at t = 100
        let mut slots = std::collections::BTreeMap::new();
        slots.insert("a".to_owned(), 100);
        slots.insert("b".to_owned(), 500);
        // WHEN a third connection comes at t = 100 THEN it fits (the expired slot is dropped)
        let live = admit(&slots, 2, 100).expect("one live slot of two");
        assert_eq!(live.keys().collect::<Vec<_>>(), ["b"]);
        // AND at t = 99 both are live: it does not fit
        assert_eq!(admit(&slots, 2, 99), None);
    }

    #[test]
    fn principal_prefers_the_identity_and_windows_are_aligned() {
        assert_eq!(
            principal(Some("u1"), Some("10.0.0.1")).as_deref(),
            Some("id:u1")
        );
        assert_eq!(
            principal(None, Some("10.0.0.1")).as_deref(),
            Some("ip:10.0.0.1")
        );
        assert_eq!(principal(None, Some("")), None);
        assert_eq!(window(19_999), (1, 80));
        assert_eq!(window(20_000), (2, 90));
    }

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
