//! Integration-test harness for the chat: real services on loopback, real event JSON.
//!
//! This crate owns everything an integration test needs that is not the chat itself, and
//! the chat wired onto it:
//! - [`moto`]: a private moto server (a real DynamoDB + DynamoDB Streams HTTP API) per test;
//! - [`connections`]: a real HTTP `@connections` endpoint that records what the chat posts and
//!   answers with the same statuses, headers and bodies API Gateway uses (410 Gone, 429, ...);
//! - [`streams`]: reads a table's stream back from moto and turns it into the exact event a
//!   Lambda event source mapping delivers;
//! - [`fixtures`]: event JSON as AWS sends it, from `tests/fixtures/`;
//! - [`world`]: the chat's handler and fan-out wired onto all of the above, for the end-to-end
//!   suites;
//! - [`logs`]: what the code under test logged, for tests whose claim is "logged";
//! - [`runtime_api`]: a Lambda Runtime API with a function's real bootstrap behind it.
//!
//! The harness modules (all but [`world`]) deliberately use nothing from `chat-shared` or
//! `chat-local`, so the harness can be trusted on its own (see `tests/harness_selftest.rs`);
//! [`world`] is where the chat comes in.

pub mod connections;
pub mod fixtures;
pub mod logs;
pub mod moto;
pub mod runtime_api;
pub mod streams;
pub mod world;

pub use connections::ConnectionsEndpoint;
pub use fixtures::{fixture, fixture_as, fixture_json};
pub use moto::{unique_name, Moto};
pub use streams::{as_ttl_removal, lambda_event_json, StreamReader};
pub use world::{World, WorldConfig};
