//! Settings read from the environment (the Lambdas' `Environment` in template.yaml), with
//! the defaults used when a variable is unset.

use std::time::Duration;

use thiserror::Error;

use crate::auth::Authenticator;
use crate::pacing::{Pacer, DEFAULT_MAX_RPS};
use crate::presence::{PresenceBudget, DEFAULT_ROOM_PRESENCE_POSTS_PER_SECOND};
use crate::ratelimit::{
    PrincipalLimit, RateLimit, DEFAULT_PRINCIPAL_MAX_CONNECTIONS,
    DEFAULT_PRINCIPAL_RATE_PER_SECOND, DEFAULT_RATE_BURST, DEFAULT_RATE_PER_SECOND,
};
use crate::store::DEFAULT_MAX_ROOMS;
use crate::validation::DEFAULT_MAX_MESSAGE_BYTES;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("environment variable {0} is required")]
    Missing(&'static str),
    #[error("environment variable {name} = {value:?} is not valid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The two table names.
#[derive(Debug, Clone)]
pub struct Tables {
    /// `EVENTS_TABLE`: the immutable event log (message history), with a stream.
    pub events: String,
    /// `CONNECTIONS_TABLE`: connections, name claims and the room's sequence counter.
    pub connections: String,
}

/// Lifetimes of stored items.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `CONNECTION_TTL_SECONDS` (default 10,800 = 3 h): a connection and its name claim expire
    /// this long after connecting. API Gateway closes every connection after 2 h at most, so
    /// this must be at least 7,200; the extra hour covers a `$disconnect` that never came.
    pub connection_ttl: Duration,
    /// `EVENT_RETENTION_DAYS` (default 30): how long the history keeps an event.
    pub event_retention: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            connection_ttl: Duration::from_secs(DEFAULT_CONNECTION_TTL_SECONDS),
            event_retention: Duration::from_secs(DEFAULT_EVENT_RETENTION_DAYS * 86_400),
        }
    }
}

pub const DEFAULT_CONNECTION_TTL_SECONDS: u64 = 10_800;
pub const MIN_CONNECTION_TTL_SECONDS: u64 = 7_200;
pub const DEFAULT_EVENT_RETENTION_DAYS: u64 = 30;
pub const DEFAULT_FANOUT_CONCURRENCY: usize = 512;
pub const DEFAULT_PRESENCE_BROADCAST_LIMIT: usize = 1_000;

/// What chat-api-handler needs.
#[derive(Debug, Clone)]
pub struct HandlerConfig {
    /// `MAX_MESSAGE_BYTES` (default 4096).
    pub max_message_bytes: usize,
    /// `RATE_LIMIT_PER_SECOND` / `RATE_LIMIT_BURST` (default 5/s, burst 20; rate 0 turns it off).
    pub rate_limit: RateLimit,
    /// `AUTH_JWT_SECRET`: when set, `$connect` requires a JWT signed with it (HS256) in the
    /// query string. Unset (the default): anyone may connect, as in the tutorial.
    pub auth: Option<Authenticator>,
    /// `MAX_ROOMS` (default 50, at least 1): the most rooms one connection may be a member of
    /// at once, `lobby` included. It bounds what a disconnect must undo (one transaction per
    /// room) and how many `rooms` entries the connection item carries.
    pub max_rooms: usize,
    /// `PRESENCE_BROADCAST_LIMIT` (default 1,000), the fan-out's setting: past this many
    /// members a room is large, and its joins and disconnects are unsequenced (the store is
    /// built with it: `with_large_room_limit`; see [`crate::keys`]).
    pub presence_limit: usize,
    /// `PRINCIPAL_MAX_CONNECTIONS` / `PRINCIPAL_RATE_PER_SECOND` (default 50 connections at
    /// once, 50 requests/s; 0 turns either off): what one identity, or without authentication
    /// one source IP, may do across all its connections ([`crate::ratelimit`]).
    pub principal_limit: PrincipalLimit,
    /// `ROOM_PRESENCE_POSTS_PER_SECOND` (default 2,000; 0 turns it off): the `@connections`
    /// POSTs per second one room's joins, leaves and renames may cost ([`crate::presence`]).
    pub presence_budget: PresenceBudget,
}

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            rate_limit: RateLimit::default(),
            auth: None,
            max_rooms: DEFAULT_MAX_ROOMS,
            presence_limit: DEFAULT_PRESENCE_BROADCAST_LIMIT,
            principal_limit: PrincipalLimit::default(),
            presence_budget: PresenceBudget::default(),
        }
    }
}

/// What the fan-out needs.
#[derive(Debug, Clone)]
pub struct FanoutConfig {
    /// `FANOUT_CONCURRENCY` (default 512: a 20 ms round trip then allows ~25,000 calls/s, above the
    /// account quota of 10,000/s; measured with chat-bench): `@connections` calls in flight at once.
    pub concurrency: usize,
    /// Attempts per delivery for throttling (429) and server errors (5xx), with exponential
    /// backoff and jitter between them.
    pub max_attempts: u32,
    /// The first backoff; each retry doubles it.
    pub base_backoff: Duration,
    /// `PRESENCE_BROADCAST_LIMIT` (default 1,000): above this many members, joins, renames and
    /// leaves are not broadcast (see the fan-out's module docs).
    pub presence_limit: usize,
    /// Time kept in hand before the invocation's deadline to answer Lambda with a partial
    /// batch response instead of being cut off.
    pub time_margin: Duration,
    /// Attempts per delivery answered 429 (throttled): more, and further apart, than for
    /// 5xx — a throttled account recovers in seconds, and giving up re-sends the whole record.
    pub max_throttled_attempts: u32,
    /// The first backoff after a 429; each retry doubles it, up to `max_backoff`.
    pub throttle_backoff: Duration,
    /// The longest single backoff.
    pub max_backoff: Duration,
    /// `FANOUT_MAX_RPS` (default 5,000; 0: unpaced): `@connections` calls per second, shared
    /// by every clone of this configuration (see [`crate::pacing`]).
    pub pacer: Pacer,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            concurrency: DEFAULT_FANOUT_CONCURRENCY,
            max_attempts: 4,
            base_backoff: Duration::from_millis(50),
            presence_limit: DEFAULT_PRESENCE_BROADCAST_LIMIT,
            time_margin: Duration::from_millis(1500),
            max_throttled_attempts: 8,
            throttle_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            pacer: Pacer::default(),
        }
    }
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_var<T: std::str::FromStr>(
    name: &'static str,
    default: T,
    why: &'static str,
) -> Result<T, ConfigError> {
    match var(name) {
        None => Ok(default),
        Some(value) => value
            .trim()
            .parse()
            .map_err(|_| ConfigError::Invalid { name, value, why }),
    }
}

impl Tables {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Tables {
            events: var("EVENTS_TABLE").ok_or(ConfigError::Missing("EVENTS_TABLE"))?,
            connections: var("CONNECTIONS_TABLE")
                .ok_or(ConfigError::Missing("CONNECTIONS_TABLE"))?,
        })
    }
}

impl Retention {
    pub fn from_env() -> Result<Self, ConfigError> {
        let ttl = parse_var(
            "CONNECTION_TTL_SECONDS",
            DEFAULT_CONNECTION_TTL_SECONDS,
            "expected whole seconds",
        )?;
        if ttl < MIN_CONNECTION_TTL_SECONDS {
            return Err(ConfigError::Invalid {
                name: "CONNECTION_TTL_SECONDS",
                value: ttl.to_string(),
                why: "must be at least 7200, API Gateway's maximum connection duration",
            });
        }
        let days = parse_var(
            "EVENT_RETENTION_DAYS",
            DEFAULT_EVENT_RETENTION_DAYS,
            "expected whole days",
        )?;
        if days == 0 {
            return Err(ConfigError::Invalid {
                name: "EVENT_RETENTION_DAYS",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        Ok(Retention {
            connection_ttl: Duration::from_secs(ttl),
            event_retention: Duration::from_secs(days * 86_400),
        })
    }
}

impl HandlerConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let max = parse_var(
            "MAX_MESSAGE_BYTES",
            DEFAULT_MAX_MESSAGE_BYTES,
            "expected a number of bytes",
        )?;
        if max == 0 {
            return Err(ConfigError::Invalid {
                name: "MAX_MESSAGE_BYTES",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        let rate_limit = RateLimit {
            per_second: parse_var(
                "RATE_LIMIT_PER_SECOND",
                DEFAULT_RATE_PER_SECOND,
                "expected requests per second (0 turns the limit off)",
            )?,
            burst: parse_var(
                "RATE_LIMIT_BURST",
                DEFAULT_RATE_BURST,
                "expected a number of requests",
            )?,
        };
        if !rate_limit.is_off() && rate_limit.burst == 0 {
            return Err(ConfigError::Invalid {
                name: "RATE_LIMIT_BURST",
                value: "0".into(),
                why: "must be at least 1 when the rate limit is on",
            });
        }
        let max_rooms = parse_var("MAX_ROOMS", DEFAULT_MAX_ROOMS, "expected a number of rooms")?;
        if max_rooms == 0 {
            return Err(ConfigError::Invalid {
                name: "MAX_ROOMS",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        let principal_limit = PrincipalLimit {
            max_connections: parse_var(
                "PRINCIPAL_MAX_CONNECTIONS",
                DEFAULT_PRINCIPAL_MAX_CONNECTIONS,
                "expected a number of connections (0 turns the limit off)",
            )?,
            per_second: parse_var(
                "PRINCIPAL_RATE_PER_SECOND",
                DEFAULT_PRINCIPAL_RATE_PER_SECOND,
                "expected requests per second (0 turns the limit off)",
            )?,
        };
        Ok(HandlerConfig {
            max_message_bytes: max,
            rate_limit,
            auth: var("AUTH_JWT_SECRET").map(|secret| Authenticator::hs256(secret.as_bytes())),
            max_rooms,
            presence_limit: parse_var(
                "PRESENCE_BROADCAST_LIMIT",
                DEFAULT_PRESENCE_BROADCAST_LIMIT,
                "expected a number of members",
            )?,
            principal_limit,
            presence_budget: PresenceBudget {
                posts_per_second: parse_var(
                    "ROOM_PRESENCE_POSTS_PER_SECOND",
                    DEFAULT_ROOM_PRESENCE_POSTS_PER_SECOND,
                    "expected @connections calls per second (0 turns the budget off)",
                )?,
            },
        })
    }
}

impl FanoutConfig {
    pub fn from_env() -> Result<Self, ConfigError> {
        let concurrency = parse_var(
            "FANOUT_CONCURRENCY",
            DEFAULT_FANOUT_CONCURRENCY,
            "expected a positive number",
        )?;
        if concurrency == 0 {
            return Err(ConfigError::Invalid {
                name: "FANOUT_CONCURRENCY",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        let presence_limit = parse_var(
            "PRESENCE_BROADCAST_LIMIT",
            DEFAULT_PRESENCE_BROADCAST_LIMIT,
            "expected a number of members",
        )?;
        let max_rps = parse_var(
            "FANOUT_MAX_RPS",
            DEFAULT_MAX_RPS,
            "expected calls per second (0 turns pacing off)",
        )?;
        Ok(FanoutConfig {
            concurrency,
            presence_limit,
            pacer: Pacer::per_second(max_rps),
            ..FanoutConfig::default()
        })
    }
}

/// `CONNECTIONS_ENDPOINT`: the Management API endpoint, `https://{api-id}.execute-api.{region}.amazonaws.com/{stage}`.
pub fn connections_endpoint_from_env() -> Result<String, ConfigError> {
    var("CONNECTIONS_ENDPOINT").ok_or(ConfigError::Missing("CONNECTIONS_ENDPOINT"))
}
