//! The library behind both chat Lambdas (and, later, the local stack).
//!
//! Each module owns one concern:
//! - [`auth`]: optional JWT authentication at `$connect`;
//! - [`protocol`]: the JSON frames on the wire, parsed and serialised;
//! - [`validation`]: the rules a name or a message must meet;
//! - [`events`]: what happened in the chat, as immutable past-tense events;
//! - [`keys`]: every table name, key format and attribute name, in one place;
//! - [`ratelimit`]: the per-connection token bucket;
//! - [`store`]: the narrow store port and its DynamoDB adapter;
//! - [`delivery`]: sending frames through the API Gateway Management API (`@connections`);
//! - [`pacing`]: keeping those calls under the account's API Gateway quota;
//! - [`handler`]: the chat-api-handler logic (routes → validated state changes + events);
//! - [`history`]: the `history` route's pages of public history;
//! - [`fanout`]: the stream fan-out logic (events → deliveries, pruning on 410);
//! - [`expiry`]: TTL deletions of connections (the connections table's stream) → their leaves;
//! - [`presence`]: presence frames (a function of the events) and a room's presence budget;
//! - [`redelivery`]: what a broadcast still owes a few failing connections, retried on its own;
//! - [`stream`]: the stream-record source port the local event source mapping polls;
//! - [`config`]: settings read from the environment, with their defaults.

pub mod auth;
pub mod batching;
pub mod config;
pub mod delivery;
pub mod events;
pub mod expiry;
pub mod fanout;
pub mod handler;
pub mod history;
pub mod keys;
pub mod metrics;
pub mod pacing;
pub mod presence;
pub mod protocol;
pub mod ratelimit;
pub mod redelivery;
pub mod store;
pub mod stream;
pub mod telemetry;
pub mod validation;

/// Milliseconds since the Unix epoch, as the chat's one notion of "now".
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        // A clock before 1970 is a broken host; 0 keeps the arithmetic defined.
        .unwrap_or(0)
}
