//! `config::*::from_env`: the Lambdas' settings read from the process environment, with the
//! README's defaults and refusals (*Configuration*), including the TTL of at least 7,200 s.
//!
//! The environment is process-global, so everything is one `#[test]`, alone in its own test
//! binary: no other test can read or write a variable while it changes them.

use std::time::Duration;

use chat_shared::config::{
    connections_endpoint_from_env, ConfigError, FanoutConfig, HandlerConfig, Retention, Tables,
};

/// Every variable `config` reads.
const VARIABLES: [&str; 16] = [
    "EVENTS_TABLE",
    "CONNECTIONS_TABLE",
    "CONNECTION_TTL_SECONDS",
    "EVENT_RETENTION_DAYS",
    "MAX_MESSAGE_BYTES",
    "RATE_LIMIT_PER_SECOND",
    "RATE_LIMIT_BURST",
    "AUTH_JWT_SECRET",
    "MAX_ROOMS",
    "PRINCIPAL_MAX_CONNECTIONS",
    "PRINCIPAL_RATE_PER_SECOND",
    "ROOM_PRESENCE_POSTS_PER_SECOND",
    "FANOUT_CONCURRENCY",
    "PRESENCE_BROADCAST_LIMIT",
    "CONNECTIONS_ENDPOINT",
    // Not read by config: it must not matter.
    "UNRELATED",
];

/// Sets exactly `vars` (every other variable of [`VARIABLES`] unset).
fn env(vars: &[(&str, &str)]) {
    for name in VARIABLES {
        std::env::remove_var(name);
    }
    for (name, value) in vars {
        std::env::set_var(name, value);
    }
}

/// A variable, a value the README refuses for it, and the read that must refuse it (returning
/// the variable its error names).
type Refusal = (&'static str, &'static str, fn() -> String);

/// The variable an `Invalid` error names, or a description of another result.
fn invalid_name<T: std::fmt::Debug>(result: Result<T, ConfigError>) -> String {
    match result {
        Err(ConfigError::Invalid { name, .. }) => name.to_owned(),
        other => format!("not Invalid: {other:?}"),
    }
}

#[test]
fn settings_come_from_the_environment_with_the_documented_defaults_and_limits() {
    // GIVEN nothing set
    env(&[]);
    // THEN the table names and the endpoint are required, everything else has its default
    assert!(matches!(
        Tables::from_env(),
        Err(ConfigError::Missing("EVENTS_TABLE"))
    ));
    assert!(matches!(
        connections_endpoint_from_env(),
        Err(ConfigError::Missing("CONNECTIONS_ENDPOINT"))
    ));
    let retention = Retention::from_env().expect("defaults");
    assert_eq!(retention.connection_ttl, Duration::from_secs(10_800));
    assert_eq!(retention.event_retention, Duration::from_secs(30 * 86_400));
    let handler = HandlerConfig::from_env().expect("defaults");
    assert_eq!(handler.max_message_bytes, 4096);
    assert_eq!(
        (handler.rate_limit.per_second, handler.rate_limit.burst),
        (5, 20)
    );
    assert!(handler.auth.is_none());
    assert_eq!(handler.max_rooms, 50);
    assert_eq!(
        (
            handler.principal_limit.max_connections,
            handler.principal_limit.per_second
        ),
        (50, 50)
    );
    assert_eq!(handler.presence_budget.posts_per_second, 2_000);
    let fanout = FanoutConfig::from_env().expect("defaults");
    assert_eq!((fanout.concurrency, fanout.presence_limit), (512, 1_000));

    // GIVEN a blank value  THEN it counts as unset
    env(&[("EVENTS_TABLE", "  "), ("CONNECTIONS_TABLE", "c")]);
    assert!(matches!(
        Tables::from_env(),
        Err(ConfigError::Missing("EVENTS_TABLE"))
    ));

    // GIVEN everything set (numbers may be padded)
    env(&[
        ("EVENTS_TABLE", "events"),
        ("CONNECTIONS_TABLE", "connections"),
        ("CONNECTION_TTL_SECONDS", " 9000 "),
        ("EVENT_RETENTION_DAYS", "7"),
        ("MAX_MESSAGE_BYTES", "100"),
        ("RATE_LIMIT_PER_SECOND", "2"),
        ("RATE_LIMIT_BURST", "3"),
        ("AUTH_JWT_SECRET", "s3cret"),
        ("MAX_ROOMS", " 3 "),
        ("PRINCIPAL_MAX_CONNECTIONS", "4"),
        ("PRINCIPAL_RATE_PER_SECOND", "0"),
        ("ROOM_PRESENCE_POSTS_PER_SECOND", " 300 "),
        ("FANOUT_CONCURRENCY", "64"),
        ("PRESENCE_BROADCAST_LIMIT", "10"),
        (
            "CONNECTIONS_ENDPOINT",
            "https://abc.execute-api.us-east-1.amazonaws.com/prod",
        ),
    ]);
    // THEN each is read
    let tables = Tables::from_env().expect("tables");
    assert_eq!(
        (tables.events.as_str(), tables.connections.as_str()),
        ("events", "connections")
    );
    assert_eq!(
        connections_endpoint_from_env().expect("endpoint"),
        "https://abc.execute-api.us-east-1.amazonaws.com/prod"
    );
    let retention = Retention::from_env().expect("retention");
    assert_eq!(retention.connection_ttl, Duration::from_secs(9_000));
    assert_eq!(retention.event_retention, Duration::from_secs(7 * 86_400));
    let handler = HandlerConfig::from_env().expect("handler");
    assert_eq!(handler.max_message_bytes, 100);
    assert_eq!(
        (handler.rate_limit.per_second, handler.rate_limit.burst),
        (2, 3)
    );
    assert!(handler.auth.is_some());
    assert_eq!(handler.max_rooms, 3);
    assert_eq!(handler.presence_budget.posts_per_second, 300);
    assert_eq!(
        (
            handler.principal_limit.max_connections,
            handler.principal_limit.per_second
        ),
        (4, 0)
    );
    let fanout = FanoutConfig::from_env().expect("fan-out");
    assert_eq!((fanout.concurrency, fanout.presence_limit), (64, 10));

    // GIVEN the connection TTL at API Gateway's 2 h maximum duration  THEN it is accepted
    env(&[("CONNECTION_TTL_SECONDS", "7200")]);
    assert_eq!(
        Retention::from_env().expect("7200").connection_ttl,
        Duration::from_secs(7_200)
    );
    // GIVEN a rate of 0 and a burst of 0  THEN the limit is off, which is allowed
    env(&[("RATE_LIMIT_PER_SECOND", "0"), ("RATE_LIMIT_BURST", "0")]);
    assert!(HandlerConfig::from_env()
        .expect("rate limit off")
        .rate_limit
        .is_off());

    // GIVEN each value the README refuses  THEN an error naming its variable
    let refused: [Refusal; 14] = [
        ("CONNECTION_TTL_SECONDS", "7199", || {
            invalid_name(Retention::from_env())
        }),
        ("CONNECTION_TTL_SECONDS", "0", || {
            invalid_name(Retention::from_env())
        }),
        ("CONNECTION_TTL_SECONDS", "3h", || {
            invalid_name(Retention::from_env())
        }),
        ("EVENT_RETENTION_DAYS", "0", || {
            invalid_name(Retention::from_env())
        }),
        ("EVENT_RETENTION_DAYS", "-1", || {
            invalid_name(Retention::from_env())
        }),
        ("MAX_MESSAGE_BYTES", "0", || {
            invalid_name(HandlerConfig::from_env())
        }),
        ("MAX_MESSAGE_BYTES", "4 KB", || {
            invalid_name(HandlerConfig::from_env())
        }),
        ("RATE_LIMIT_PER_SECOND", "-5", || {
            invalid_name(HandlerConfig::from_env())
        }),
        ("RATE_LIMIT_BURST", "0", || {
            invalid_name(HandlerConfig::from_env())
        }),
        ("MAX_ROOMS", "0", || invalid_name(HandlerConfig::from_env())),
        (
            "MAX_ROOMS",
            "-2",
            || invalid_name(HandlerConfig::from_env()),
        ),
        ("FANOUT_CONCURRENCY", "0", || {
            invalid_name(FanoutConfig::from_env())
        }),
        ("FANOUT_CONCURRENCY", "many", || {
            invalid_name(FanoutConfig::from_env())
        }),
        ("PRESENCE_BROADCAST_LIMIT", "1e3", || {
            invalid_name(FanoutConfig::from_env())
        }),
    ];
    for (name, value, read) in refused {
        env(&[(name, value)]);
        assert_eq!(read(), name, "{name}={value:?}");
    }
    env(&[]);
}
