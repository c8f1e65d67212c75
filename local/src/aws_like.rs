//! The local stack's AWS-like mode: the figures that make the stand-ins behave like AWS where
//! it hurts (latency, eventual consistency, the stream's polling delay), gathered in one place
//! and applied to a stack's options. Ideal mode (everything instant and consistent) stays the
//! default; `chat-local --aws-like` and the benchmarks' `--aws-like` switch to this.
//!
//! Sources: API Gateway's account throttles (see [`crate::gateway::ThrottleLimit`]); DynamoDB's single-digit-millisecond latency and read consistency (DynamoDB
//! developer guide, "Read consistency"); a Lambda in the same Region reaching the
//! `@connections` endpoint in tens of milliseconds; Lambda polling each DynamoDB stream shard
//! about four times a second (Lambda developer guide, "Using AWS Lambda with Amazon DynamoDB").

use std::time::Duration;

use chat_shared::store::aws_like::StoreBehaviour;

use crate::gateway::ThrottleLimit;
use crate::stack::{LocalOptions, StoreChoice};

/// Every AWS-like figure, each one a knob of `chat-local`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwsLike {
    /// The embedded store: per-call latency, eventual consistency, counter contention,
    /// per-partition throughput. Not applied to a real DynamoDB API, which has its own.
    pub store: StoreBehaviour,
    /// Added to every `@connections` call (a Lambda's round trip to API Gateway).
    pub management_latency: Duration,
    /// The event source mapping's pause between polls of an idle stream.
    pub stream_poll_interval: Duration,
    /// The account's requests (inbound messages and `@connections` calls share them).
    pub account_throttle: Option<ThrottleLimit>,
    /// New connections per second.
    pub connect_throttle: Option<ThrottleLimit>,
}

impl Default for AwsLike {
    fn default() -> Self {
        AwsLike {
            store: StoreBehaviour::aws_like(),
            management_latency: Duration::from_millis(20),
            stream_poll_interval: Duration::from_millis(250),
            account_throttle: Some(ThrottleLimit::ACCOUNT_REQUESTS),
            connect_throttle: Some(ThrottleLimit::NEW_CONNECTIONS),
        }
    }
}

impl AwsLike {
    /// Switches `options` to this behaviour: the gateway's `@connections` latency, the
    /// mapping's polling, and an embedded store's behaviour.
    pub fn apply(&self, options: &mut LocalOptions) {
        options.gateway.management_latency = self.management_latency;
        options.esm.poll_interval = self.stream_poll_interval;
        options.gateway.account_throttle = self.account_throttle;
        options.gateway.connect_throttle = self.connect_throttle;
        if let StoreChoice::Embedded(store) = &mut options.store {
            *store = store.clone().with_behaviour(self.store);
        }
    }
}
