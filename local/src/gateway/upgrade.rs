//! The WebSocket handshake at `/{stage}`: `$connect` runs while the upgrade request waits, and
//! only a 2xx from the integration completes it (API Gateway developer guide, "Managing
//! connected users and client apps: $connect and $disconnect routes").

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::connection;
use super::events::{self, ConnectionInfo};
use super::{Entry, Shared};

/// Handles `GET /{stage}`.
pub(super) async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
) -> Response {
    if *shared.shutdown.borrow() {
        // Shutting down: the listener is only still open for the fan-out's drain.
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let key = match check_handshake(request.headers()) {
        Ok(key) => key,
        Err(rejection) => return rejection.into_response(),
    };
    // Over the account's new connections per second (or its request rate, which `$connect`
    // counts against too): refused with 429 before `$connect` runs.
    if !shared.admit_connection() || !shared.admit_request() {
        return StatusCode::TOO_MANY_REQUESTS.into_response();
    }
    let accept = derive_accept_key(key.as_bytes());
    let headers = request.headers();
    let connection = ConnectionInfo {
        id: events::new_id(),
        connected_at_ms: events::now_ms(),
        source_ip: peer.ip().to_string(),
        user_agent: header_str(headers, header::USER_AGENT).map(str::to_owned),
        domain_name: header_str(headers, header::HOST)
            .unwrap_or("localhost")
            .to_owned(),
    };
    let event = events::connect(&shared.config, &connection, headers, request.uri().query());

    // The connection is not registered yet: a POST to it from inside $connect answers 410,
    // as on AWS.
    let response = match shared.invoke(event).await {
        Ok(response) => response,
        Err(error) => {
            tracing::warn!(connection_id = %connection.id, %error, "$connect integration failed");
            return reject(StatusCode::INTERNAL_SERVER_ERROR, &connection);
        }
    };
    if !(200..300).contains(&response.status_code) {
        // A status that cannot be an HTTP error (1xx, out of range) is a malformed Lambda
        // proxy response, which API Gateway answers with 502.
        let status = u16::try_from(response.status_code)
            .ok()
            .and_then(|code| StatusCode::from_u16(code).ok())
            .filter(|status| !status.is_informational())
            .unwrap_or(StatusCode::BAD_GATEWAY);
        return reject(status, &connection);
    }

    let mut switching = Response::new(Body::empty());
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let switching_headers = switching.headers_mut();
    switching_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    switching_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    switching_headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    // A client asking for subprotocols needs $connect to pick one (API Gateway forwards the
    // integration's `Sec-WebSocket-Protocol` header).
    if let Some(protocol) = response.headers.get(header::SEC_WEBSOCKET_PROTOCOL) {
        switching_headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol.clone());
    }

    // Registered before the 101 goes out, so a backend that stored the id during $connect can
    // post to it as soon as the client can read; frames wait in the queue until the socket
    // task starts.
    let (outbound_tx, outbound_rx) = mpsc::channel(shared.config.send_buffer.max(1));
    let (delete_tx, delete_rx) = oneshot::channel();
    let last_active_ms = Arc::new(AtomicI64::new(connection.connected_at_ms));
    shared.registry.lock().insert(
        connection.id.clone(),
        Entry {
            outbound: outbound_tx.clone(),
            delete: delete_tx,
            connected_at_ms: connection.connected_at_ms,
            last_active_ms: Arc::clone(&last_active_ms),
            source_ip: connection.source_ip.clone(),
            user_agent: connection.user_agent.clone(),
        },
    );
    tracing::info!(
        connection_id = %connection.id,
        source_ip = %connection.source_ip,
        "connected"
    );
    let guard = shared.track_task();
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(connection::run(connection::Parts {
        shared: Arc::clone(&shared),
        connection: Arc::new(connection),
        on_upgrade,
        outbound_tx,
        outbound_rx,
        delete_rx,
        last_active_ms,
        guard,
    }));
    switching
}

/// Why an upgrade request is refused before `$connect` runs.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("This endpoint only accepts WebSocket upgrade requests")]
    NotAnUpgrade,
    #[error("Unsupported Sec-WebSocket-Version")]
    UnsupportedVersion,
    #[error("Missing Sec-WebSocket-Key")]
    MissingKey,
}

impl IntoResponse for HandshakeError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        match self {
            Self::NotAnUpgrade => (
                StatusCode::UPGRADE_REQUIRED,
                [(header::UPGRADE, "websocket")],
                message,
            )
                .into_response(),
            Self::UnsupportedVersion => (
                StatusCode::BAD_REQUEST,
                [(header::SEC_WEBSOCKET_VERSION, "13")],
                message,
            )
                .into_response(),
            Self::MissingKey => (StatusCode::BAD_REQUEST, message).into_response(),
        }
    }
}

/// The `Sec-WebSocket-Key` of a valid upgrade request.
fn check_handshake(headers: &HeaderMap) -> Result<&str, HandshakeError> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(HandshakeError::NotAnUpgrade);
    }
    if header_str(headers, header::SEC_WEBSOCKET_VERSION) != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    header_str(headers, header::SEC_WEBSOCKET_KEY).ok_or(HandshakeError::MissingKey)
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Refuses the handshake. The integration's body is not forwarded (AWS does not either).
fn reject(status: StatusCode, connection: &ConnectionInfo) -> Response {
    tracing::info!(
        connection_id = %connection.id,
        status = status.as_u16(),
        "$connect rejected the connection"
    );
    status.into_response()
}
