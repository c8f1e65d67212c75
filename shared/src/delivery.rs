//! Sending frames to connections through the API Gateway Management API
//! (`POST @connections/{id}`), and what its answers mean.
//!
//! The fan-out owns retries (with its own backoff and its own view of the Lambda's remaining
//! time), so the SDK client built here has the SDK's retries turned off: two retry loops
//! stacked would multiply the attempts against a throttled endpoint.
//!
//! Stalled-stream protection is off too: it watches the throughput of request and response
//! bodies, which here are a few hundred bytes each way, so the attempt timeout already bounds
//! any stall — and its per-request bookkeeping cost about 13% of the fan-out's CPU per delivery
//! (`chat-bench fanout-only --clients 20000`, 4 interleaved runs: 48–62 µs against 56–77 µs).

use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_apigatewaymanagement::config::StalledStreamProtectionConfig;
use aws_sdk_apigatewaymanagement::error::SdkError;
use aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use thiserror::Error;

use crate::store::BoxError;

#[derive(Debug, Error)]
pub enum DeliveryError {
    /// 410: the connection no longer exists. Never retried; the connection is pruned.
    #[error("the connection is gone (410)")]
    Gone,
    /// 429: throttled, or the client's buffer is full. Retried with backoff.
    #[error("throttled (429)")]
    Throttled(#[source] BoxError),
    /// 413: the frame is over 128 KB. Never retried.
    #[error("payload too large (413)")]
    PayloadTooLarge,
    /// 403: not allowed (IAM, or the wrong stage). Never retried.
    #[error("forbidden (403)")]
    Forbidden(#[source] BoxError),
    /// 5xx, a timeout or a broken connection. Retried with backoff.
    #[error("transient failure")]
    Transient(#[source] BoxError),
    /// The invocation's deadline came first: left for Lambda to retry.
    #[error("out of time before the frame could be sent")]
    OutOfTime,
    /// Anything else: reported, not retried.
    #[error("delivery failed")]
    Other(#[source] BoxError),
}

impl DeliveryError {
    /// Whether sending again, after a backoff, may succeed within this invocation.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeliveryError::Throttled(_) | DeliveryError::Transient(_)
        )
    }
}

/// The port the fan-out sends through.
#[async_trait]
pub trait Deliver: Send + Sync {
    async fn post(&self, connection_id: &str, data: &[u8]) -> Result<(), DeliveryError>;
}

/// The real `@connections` API, through one shared `aws-sdk-apigatewaymanagement` client
/// (one connection pool, reused by every call).
#[derive(Clone, Debug)]
pub struct ManagementApi {
    client: aws_sdk_apigatewaymanagement::Client,
}

impl ManagementApi {
    /// `endpoint` is `https://{api-id}.execute-api.{region}.amazonaws.com/{stage}` on AWS,
    /// or a local `@connections` endpoint; the SDK appends `/@connections/{id}`.
    pub fn new(sdk_config: &aws_config::SdkConfig, endpoint: &str) -> Self {
        let conf = aws_sdk_apigatewaymanagement::config::Builder::from(sdk_config)
            .endpoint_url(endpoint)
            .retry_config(RetryConfig::disabled())
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .build(),
            )
            .build();
        ManagementApi {
            client: aws_sdk_apigatewaymanagement::Client::from_conf(conf),
        }
    }
}

fn classify(err: SdkError<PostToConnectionError>) -> DeliveryError {
    match err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            match ctx.into_err() {
                PostToConnectionError::GoneException(_) => DeliveryError::Gone,
                PostToConnectionError::LimitExceededException(e) => {
                    DeliveryError::Throttled(e.into())
                }
                PostToConnectionError::PayloadTooLargeException(_) => {
                    DeliveryError::PayloadTooLarge
                }
                PostToConnectionError::ForbiddenException(e) => DeliveryError::Forbidden(e.into()),
                other => match status {
                    410 => DeliveryError::Gone,
                    429 => DeliveryError::Throttled(other.into()),
                    413 => DeliveryError::PayloadTooLarge,
                    403 => DeliveryError::Forbidden(other.into()),
                    500..=599 => DeliveryError::Transient(other.into()),
                    _ => DeliveryError::Other(other.into()),
                },
            }
        }
        e @ (SdkError::TimeoutError(_)
        | SdkError::DispatchFailure(_)
        | SdkError::ResponseError(_)) => DeliveryError::Transient(e.into()),
        other => DeliveryError::Other(other.into()),
    }
}

#[async_trait]
impl Deliver for ManagementApi {
    async fn post(&self, connection_id: &str, data: &[u8]) -> Result<(), DeliveryError> {
        self.client
            .post_to_connection()
            .connection_id(connection_id)
            .data(Blob::new(data))
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }
}
