//! The local stack as the benchmarks run it, and what they read from its store.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use chat_local::aws_like::AwsLike;
use chat_local::esm::EsmConfig;
use chat_local::gateway::GatewayConfig;
use chat_local::stack::{self, LocalOptions, RunningStack, StoreChoice};
use chat_shared::config::HandlerConfig;
use chat_shared::config::{FanoutConfig, Retention};
use chat_shared::pacing::Pacer;
use chat_shared::ratelimit::PrincipalLimit;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::{ChatStore, Member};
use futures::TryStreamExt;

/// What a benchmark varies in the stack.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// Added to every `@connections` call by the gateway.
    pub management_latency: Duration,
    /// Never run `$disconnect`, so vanished clients stay members until a 410 prunes them.
    pub drop_disconnect: bool,
    /// The fan-out's `@connections` calls in flight.
    pub concurrency: usize,
    /// Run the stack in AWS-like mode (its `management_latency` then replaces the one above).
    pub aws_like: Option<AwsLike>,
}

/// A running stack on an ephemeral loopback port, with a handle on its embedded store.
pub struct Stack {
    pub running: RunningStack,
    pub store: EmbeddedStore,
}

impl Stack {
    pub async fn start(settings: &StackSettings) -> anyhow::Result<Stack> {
        let store = EmbeddedStore::new(Retention::default());
        let mut options = LocalOptions {
            host: "127.0.0.1".into(),
            port: 0,
            store: StoreChoice::Embedded(store.clone()),
            gateway: GatewayConfig {
                management_latency: settings.management_latency,
                drop_disconnect: settings.drop_disconnect,
                // Clients only listen during a run; they must not be closed for idling.
                idle_timeout: Duration::from_secs(24 * 3600),
                max_duration: Duration::from_secs(24 * 3600),
                // A client reading behind a presence storm must not turn deliveries into 429s
                // (retries would distort every figure); the queue's memory is only what is used.
                send_buffer: 1 << 16,
                ..GatewayConfig::default()
            },
            fanout: FanoutConfig {
                concurrency: settings.concurrency,
                // The benchmark measures capacity: the fan-out's own quota pacing would cap
                // every figure at its rate.
                pacer: Pacer::unpaced(),
                // Message fan-out is measured, not presence: each join announced to every
                // member (one frame per change, crate::presence) would make a setup of N
                // joins cost O(N²) posts before anything is timed, with the presence budget
                // (off here, below) no longer spreading it. Joins are still sequenced events.
                presence_limit: 0,
                ..FanoutConfig::default()
            },
            esm: EsmConfig::default(),
            handler: HandlerConfig {
                // Every benchmark client is one address (127.0.0.1): limits across a
                // principal's connections would refuse all but the first 50.
                principal_limit: PrincipalLimit::OFF,
                // Capacity, not the per-room presence budget: a benchmark's joins come in
                // storms the budget would spread out.
                presence_budget: chat_shared::presence::PresenceBudget::OFF,
                ..HandlerConfig::default()
            },
            ..LocalOptions::default()
        };
        if let Some(aws_like) = &settings.aws_like {
            aws_like.apply(&mut options);
        }
        let running = stack::start(options)
            .await
            .context("starting the local stack")?;
        Ok(Stack { running, store })
    }

    /// The Management API endpoint (`http://host:port/{stage}`), to which the SDK appends
    /// `/@connections/{id}`.
    pub fn management_endpoint(&self) -> String {
        self.running
            .connection_url
            .trim_end_matches("/@connections")
            .to_owned()
    }

    /// Stops the stack; a stack that does not stop in time is left to the process's end.
    pub async fn shutdown(self) {
        match tokio::time::timeout(Duration::from_secs(30), self.running.shutdown()).await {
            Ok(Ok(stopped)) if stopped.drained => {}
            Ok(Ok(_)) => tracing::warn!("the stack stopped without draining its stream"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the stack stopped with an error"),
            Err(_) => tracing::warn!("the stack did not stop within 30 s"),
        }
    }
}

/// Every current member, as name → connection id.
pub async fn members(store: &dyn ChatStore) -> anyhow::Result<HashMap<String, String>> {
    Ok(member_list(store)
        .await?
        .into_iter()
        .map(|m| (m.name, m.connection_id))
        .collect())
}

/// Every current member's connection id, in the order the fan-out reads them.
pub async fn member_ids(store: &dyn ChatStore) -> anyhow::Result<Vec<String>> {
    Ok(member_list(store)
        .await?
        .into_iter()
        .map(|m| m.connection_id)
        .collect())
}

/// Every current member of the lobby, as the fan-out reads them.
async fn member_list(store: &dyn ChatStore) -> anyhow::Result<Vec<Member>> {
    room_members(store, chat_shared::keys::DEFAULT_ROOM).await
}

/// Every current member of `room`, read as the fan-out reads them.
pub async fn room_members(store: &dyn ChatStore, room: &str) -> anyhow::Result<Vec<Member>> {
    chat_shared::fanout::members(store, room, chat_shared::now_ms())
        .try_collect()
        .await
        .context("reading the members")
}

/// Waits until the store has exactly `count` members; returns the last list read, and
/// whether the count was reached before `timeout`.
pub async fn wait_for_members(
    store: &dyn ChatStore,
    count: usize,
    timeout: Duration,
) -> anyhow::Result<(HashMap<String, String>, bool)> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = members(store).await?;
        if now.len() == count {
            return Ok((now, true));
        }
        if Instant::now() >= deadline {
            return Ok((now, false));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
