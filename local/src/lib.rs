//! The local stack: everything `chat-local` runs, as a library so tests can start it on port 0.
//!
//! - [`gateway`]: an API Gateway WebSocket API emulator with a real `@connections` endpoint;
//! - [`esm`]: Lambda's DynamoDB event source mapping (batches, checkpoints, retries);
//! - [`streams_api`]: a DynamoDB Streams API poller, for runs against a real DynamoDB API;
//! - [`stack`]: all of it wired together (what `chat-local` runs);
//! - [`aws_like`]: the AWS-like mode's figures (latency, eventual consistency, polling);
//! - [`bill`]: what AWS would charge for the run;
//! - [`metrics`]: the chat's metrics at `GET /metrics` (Prometheus text);
//! - [`page`]: the chat's web page and the client library, embedded.

pub mod aws_like;
pub mod bill;
pub mod esm;
pub mod gateway;
pub mod metrics;
pub mod page;
pub mod stack;
pub mod streams_api;
