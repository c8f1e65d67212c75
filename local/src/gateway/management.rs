//! The Management API, `/{stage}/@connections/{connectionId}`: POST sends a frame, GET
//! describes the connection, DELETE closes it. Errors carry `x-amzn-ErrorType` and a JSON
//! `{"message": ...}` body, which is what `aws-sdk-apigatewaymanagement` parses into
//! `GoneException`, `PayloadTooLargeException`, `LimitExceededException` and
//! `ForbiddenException`.
//!
//! The SDK signs every request with SigV4 (service `execute-api`); the signature is accepted
//! without verification.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::mpsc::error::TrySendError;
use tokio_tungstenite::tungstenite::Message;

use super::events;
use super::Shared;

/// Largest `Data` of a PostToConnection (the Smithy model's `Data` length constraint, and the
/// 128 KB message quota).
pub(super) const MAX_POST_BYTES: usize = 128 * 1024;

/// A POST body beyond this is not even read to the end (the answer is 413 anyway).
const MAX_READ_BYTES: usize = 16 * 1024 * 1024;

/// The Management API's modelled errors.
#[derive(Debug, thiserror::Error)]
pub(super) enum ManagementError {
    /// The connection does not exist (never did, is still in `$connect`, or is closed).
    #[error("the connection no longer exists")]
    Gone,
    #[error("the data is larger than {MAX_POST_BYTES} bytes")]
    PayloadTooLarge,
    /// The client's outgoing queue is full: retry with backoff.
    #[error("the connection's outgoing buffer is full")]
    LimitExceeded,
    /// Over the account's request rate (AWS-like mode): retry with backoff.
    #[error("Too Many Requests")]
    Throttled,
    /// No such stage or resource.
    #[error("forbidden")]
    Forbidden,
    #[error("the request body could not be read")]
    BadRequest,
}

impl ManagementError {
    fn status_and_type(&self) -> (StatusCode, &'static str) {
        match self {
            Self::Gone => (StatusCode::GONE, "GoneException"),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PayloadTooLargeException"),
            Self::LimitExceeded | Self::Throttled => {
                (StatusCode::TOO_MANY_REQUESTS, "LimitExceededException")
            }
            Self::Forbidden => (StatusCode::FORBIDDEN, "ForbiddenException"),
            Self::BadRequest => (StatusCode::BAD_REQUEST, "BadRequestException"),
        }
    }
}

impl IntoResponse for ManagementError {
    fn into_response(self) -> Response {
        let (status, error_type) = self.status_and_type();
        let body = serde_json::json!({ "message": self.to_string() }).to_string();
        with_request_id(
            (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (HeaderName::from_static("x-amzn-errortype"), error_type),
                ],
                body,
            )
                .into_response(),
        )
    }
}

/// Every API Gateway response carries a request id; the SDK attaches it to errors.
fn with_request_id(mut response: Response) -> Response {
    if let Ok(id) = HeaderValue::from_str(&events::new_id()) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-amzn-requestid"), id);
    }
    response
}

/// `POST @connections/{id}`: the body goes to the client as one frame, text if it is UTF-8,
/// else binary.
pub(super) async fn post_to_connection(
    State(shared): State<Arc<Shared>>,
    Path(connection_id): Path<String>,
    body: Body,
) -> Result<Response, ManagementError> {
    let data = read_body(body).await?;
    if !shared.admit_request() {
        return Err(ManagementError::Throttled);
    }
    let latency = shared.config.management_latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let frame = match String::from_utf8(data) {
        Ok(text) => Message::text(text),
        Err(not_utf8) => Message::binary(not_utf8.into_bytes()),
    };
    let outbound = shared
        .registry
        .lock()
        .get(&connection_id)
        .map(|entry| entry.outbound.clone())
        .ok_or(ManagementError::Gone)?;
    if let Message::Text(text) = &frame {
        tracing::debug!(%connection_id, body = %text, "@connections POST");
    }
    let bytes = match &frame {
        Message::Text(text) => text.len(),
        other => other.len(),
    };
    match outbound.try_send(frame) {
        Ok(()) => {
            shared.meter.message(bytes);
            Ok(with_request_id(StatusCode::OK.into_response()))
        }
        Err(TrySendError::Full(_)) => Err(ManagementError::LimitExceeded),
        Err(TrySendError::Closed(_)) => Err(ManagementError::Gone),
    }
}

/// Reads a POST body of at most [`MAX_POST_BYTES`].
async fn read_body(body: Body) -> Result<Vec<u8>, ManagementError> {
    let mut data = Vec::new();
    let mut received = 0_usize;
    let mut chunks = body.into_data_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| ManagementError::BadRequest)?;
        received = received.saturating_add(chunk.len());
        if received > MAX_READ_BYTES {
            break;
        }
        // Over the limit the rest is still read, so the client is not cut off mid-request
        // and sees the 413.
        if received <= MAX_POST_BYTES {
            data.extend_from_slice(&chunk);
        }
    }
    if received > MAX_POST_BYTES {
        return Err(ManagementError::PayloadTooLarge);
    }
    Ok(data)
}

/// `GET @connections/{id}`: `connectedAt`, `identity` and `lastActiveAt`, in the lower camel
/// case the SDK's deserialiser reads.
pub(super) async fn get_connection(
    State(shared): State<Arc<Shared>>,
    Path(connection_id): Path<String>,
) -> Result<Response, ManagementError> {
    if !shared.admit_request() {
        return Err(ManagementError::Throttled);
    }
    let body = {
        let registry = shared.registry.lock();
        let entry = registry.get(&connection_id).ok_or(ManagementError::Gone)?;
        serde_json::json!({
            "connectedAt": events::iso8601(entry.connected_at_ms),
            "identity": {
                "sourceIp": entry.source_ip,
                "userAgent": entry.user_agent.as_deref().unwrap_or_default(),
            },
            "lastActiveAt": events::iso8601(entry.last_active_ms.load(Ordering::Relaxed)),
        })
    };
    Ok(with_request_id(
        (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response(),
    ))
}

/// `DELETE @connections/{id}`: unregisters the connection at once (a POST after this answers
/// 410) and has it closed with 1000; `$disconnect` follows. Answers 204.
pub(super) async fn delete_connection(
    State(shared): State<Arc<Shared>>,
    Path(connection_id): Path<String>,
) -> Result<Response, ManagementError> {
    if !shared.admit_request() {
        return Err(ManagementError::Throttled);
    }
    let entry = shared
        .registry
        .lock()
        .remove(&connection_id)
        .ok_or(ManagementError::Gone)?;
    tracing::debug!(%connection_id, "@connections DELETE");
    // The connection task may be closing already; then there is nothing left to do.
    let _ = entry.delete.send(());
    Ok(with_request_id(StatusCode::NO_CONTENT.into_response()))
}

/// Any other path: API Gateway answers 403 for a stage or resource that does not exist.
pub(super) async fn forbidden() -> ManagementError {
    ManagementError::Forbidden
}
