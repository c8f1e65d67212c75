//! Where the tool talks to: the SDK configuration for AWS or for a local endpoint (moto,
//! DynamoDB Local), and the translation of SDK errors into what an operator must fix.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::Client;

use crate::error::ReplayError;

/// A DynamoDB API to talk to: AWS in a region, or an explicit endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `None`: AWS, with the default credential chain.
    pub endpoint: Option<String>,
    pub region: String,
}

impl Target {
    /// How errors name the target: the endpoint URL, or "AWS region R".
    pub fn label(&self) -> String {
        match &self.endpoint {
            Some(endpoint) => endpoint.clone(),
            None => format!("AWS region {}", self.region),
        }
    }

    /// The SDK configuration for this target.
    ///
    /// With an endpoint, credentials come from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` when
    /// set and are placeholders otherwise: local servers accept any signature, and the default
    /// chain would otherwise end at the instance metadata service, i.e. traffic off this
    /// machine and a multi-second stall, for credentials nobody checks.
    pub async fn sdk_config(&self) -> SdkConfig {
        // Fail fast on a dead endpoint: the SDK's default connect timeout is generous, and an
        // operator waiting on a typo learns nothing from it.
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(3))
            .operation_attempt_timeout(Duration::from_secs(30))
            .build();
        let retries = RetryConfig::standard().with_max_attempts(3);
        match &self.endpoint {
            Some(endpoint) => SdkConfig::builder()
                .behavior_version(BehaviorVersion::latest())
                .endpoint_url(endpoint)
                .region(Region::new(self.region.clone()))
                .credentials_provider(SharedCredentialsProvider::new(local_credentials()))
                .timeout_config(timeouts)
                .retry_config(retries)
                .build(),
            None => {
                aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region.clone()))
                    .timeout_config(timeouts)
                    .retry_config(retries)
                    .load()
                    .await
            }
        }
    }
}

fn local_credentials() -> Credentials {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
        (Some(key), Some(secret)) => {
            Credentials::new(key, secret, var("AWS_SESSION_TOKEN"), None, "environment")
        }
        _ => Credentials::new("placeholder", "placeholder", None, None, "chat-replay"),
    }
}

/// What an SDK error means for the operator: a missing table, an unreachable endpoint, or
/// the service's own message.
pub fn classify<E, R>(err: SdkError<E, R>, op: &'static str, table: &str, at: &str) -> ReplayError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(service)
            if service.err().code() == Some("ResourceNotFoundException") =>
        {
            ReplayError::TableNotFound {
                table: table.to_owned(),
                at: at.to_owned(),
            }
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => ReplayError::Unreachable {
            at: at.to_owned(),
            detail: root_cause(&err),
        },
        SdkError::ServiceError(service) => ReplayError::Dynamo {
            op,
            table: table.to_owned(),
            detail: format!(
                "{}: {}",
                service.err().code().unwrap_or("unknown error"),
                service.err().message().unwrap_or("no message")
            ),
        },
        _ => ReplayError::Dynamo {
            op,
            table: table.to_owned(),
            detail: DisplayErrorContext(&err).to_string(),
        },
    }
}

/// The innermost cause ("Connection refused (os error 111)"): the SDK's own layers around it
/// ("dispatch failure: io error: client error (Connect)") tell an operator nothing more.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Checks that `table` exists before a command starts, so a typo is one clear line instead of
/// an error from deep inside a page or a fan-out.
pub async fn ensure_table(client: &Client, table: &str, at: &str) -> Result<(), ReplayError> {
    client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| classify(e, "DescribeTable", table, at))
}
