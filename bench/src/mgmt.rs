//! Direct `@connections` traffic, through the same SDK client the fan-out uses
//! ([`ManagementApi`]): the raw capacity measurement, the naive baseline, and checks that the
//! gateway has noticed vanished clients.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_credential_types::Credentials;
use aws_sdk_apigatewaymanagement::operation::get_connection::GetConnectionError;
use chat_shared::delivery::{Deliver, DeliveryError, ManagementApi};
use futures::StreamExt;
use serde::Serialize;

/// The SDK configuration the local stack gives its fan-out: placeholder credentials (the
/// local endpoint does not verify signatures, but the SDK still signs every request).
pub fn local_sdk_config() -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "local",
            "local",
            None,
            None,
            "chat-bench",
        )))
        .build()
}

/// A fresh client with its own connection pool, configured as the fan-out's.
pub fn management_api(endpoint: &str) -> ManagementApi {
    ManagementApi::new(&local_sdk_config(), endpoint)
}

/// How a round of POSTs went, as the SDK saw it.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PostOutcome {
    pub ok: usize,
    pub gone: usize,
    pub throttled: usize,
    pub failed: usize,
    /// From the first POST sent to the last answer received.
    #[serde(skip)]
    pub elapsed: Duration,
}

impl PostOutcome {
    fn count(&mut self, result: Result<(), DeliveryError>) {
        match result {
            Ok(()) => self.ok += 1,
            Err(DeliveryError::Gone) => self.gone += 1,
            Err(DeliveryError::Throttled(_)) => self.throttled += 1,
            Err(e) => {
                tracing::debug!(error = %e, "POST failed");
                self.failed += 1;
            }
        }
    }

    pub fn errors(&self) -> usize {
        self.gone + self.throttled + self.failed
    }
}

/// One POST per id, at most `concurrency` in flight: the fan-out's shape, with no chat logic
/// (no store read, no retries, no pruning).
pub async fn post_bounded(
    api: &ManagementApi,
    ids: &[String],
    frame: &[u8],
    concurrency: usize,
) -> PostOutcome {
    let start = Instant::now();
    let mut outcome = PostOutcome::default();
    // By index: a stream of `&String` would make the future lifetime-generic, which
    // `tokio::spawn` cannot prove `Send` for.
    let mut answers = futures::stream::iter(0..ids.len())
        .map(|i| api.post(&ids[i], frame))
        .buffer_unordered(concurrency.max(1));
    while let Some(result) = answers.next().await {
        outcome.count(result);
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// The tutorial's way: every POST at once, one task each (`Promise.all(connections.map(post))`),
/// with no bound on what is in flight.
pub async fn post_naive(api: &ManagementApi, ids: &[String], frame: &[u8]) -> PostOutcome {
    let start = Instant::now();
    let frame: Arc<[u8]> = frame.into();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let api = api.clone();
            let frame = Arc::clone(&frame);
            let id = id.clone();
            tokio::spawn(async move { api.post(&id, &frame).await })
        })
        .collect();
    let mut outcome = PostOutcome::default();
    for task in tasks {
        match task.await {
            Ok(result) => outcome.count(result),
            Err(_) => outcome.failed += 1,
        }
    }
    outcome.elapsed = start.elapsed();
    outcome
}

/// Waits until `GET @connections/{id}` answers 410 for every id (the gateway has seen the
/// socket end); returns how many are still registered when `timeout` passes.
pub async fn wait_unregistered(endpoint: &str, ids: &[String], timeout: Duration) -> usize {
    let conf = aws_sdk_apigatewaymanagement::config::Builder::from(&local_sdk_config())
        .endpoint_url(endpoint)
        .build();
    let client = aws_sdk_apigatewaymanagement::Client::from_conf(conf);
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&String> = ids.iter().collect();
    loop {
        let answers: Vec<(&String, bool)> = futures::stream::iter(pending.iter().copied())
            .map(|id| {
                let client = client.clone();
                async move {
                    let gone = matches!(
                        client.get_connection().connection_id(id).send().await,
                        Err(e) if matches!(e.as_service_error(), Some(GetConnectionError::GoneException(_)))
                    );
                    (id, gone)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        pending = answers
            .into_iter()
            .filter(|(_, gone)| !gone)
            .map(|(id, _)| id)
            .collect();
        if pending.is_empty() || Instant::now() >= deadline {
            return pending.len();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
