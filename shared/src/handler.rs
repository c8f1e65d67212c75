//! chat-api-handler's logic: one API Gateway WebSocket event in, one response out.
//!
//! It validates the request and writes the state change with its event; it never calls
//! `@connections`. A refused request is answered with one error frame as the route's
//! response, which API Gateway sends to the caller only (the message routes are two-way);
//! so are the answers to `join` and `leave` (`{"joined":…}`, `{"left":…}`, see
//! [`crate::protocol::joined_response`]) and `history`.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use lambda_runtime::Diagnostic;
use thiserror::Error;
use tracing::{error, info, warn};

use crate::auth::TOKEN_PARAMETER;
use crate::config::HandlerConfig;
use crate::events::LeaveReason;
use crate::history::history_response;
use crate::protocol::{
    joined_response, left_response, parse_request, ClientRequest, ErrorCode, Refusal,
};
use crate::store::{ChatStore, Joined, StoreError};
use crate::validation::{validate_message, validate_name};

#[derive(Debug, Error)]
pub enum HandlerError {
    /// Not an API Gateway WebSocket event: a wiring mistake, not a client's.
    #[error("the event has no requestContext.connectionId")]
    MissingConnectionId,
    /// `$disconnect` could not be recorded; the connection will be pruned on 410 or expire.
    #[error("recording the disconnect failed")]
    Store(#[from] StoreError),
}

impl From<HandlerError> for Diagnostic {
    fn from(e: HandlerError) -> Diagnostic {
        let error_type = match &e {
            HandlerError::MissingConnectionId => "NonRetryable.BadEvent",
            HandlerError::Store(s) if s.is_retryable() => "Retryable.Store",
            HandlerError::Store(_) => "NonRetryable.Store",
        };
        Diagnostic {
            error_type: error_type.into(),
            error_message: e.to_string(),
        }
    }
}

fn response(status: i64, body: Option<String>) -> ApiGatewayProxyResponse {
    let mut r = ApiGatewayProxyResponse::default();
    r.status_code = status;
    r.body = body.map(Body::Text);
    r
}

fn refused(refusal: &Refusal) -> ApiGatewayProxyResponse {
    // 200: the refusal is a normal answer, delivered as the route response.
    response(200, Some(refusal.to_frame()))
}

/// Maps a store refusal to what the client is told.
pub fn refusal_for(err: &StoreError, action: &str) -> Refusal {
    let (code, message) = match err {
        StoreError::NotConnected(_) => (
            ErrorCode::NotConnected,
            "This connection is not known; reconnect and try again.".to_owned(),
        ),
        StoreError::NameRequired if action == "join" => (
            ErrorCode::NameRequired,
            "Set a name with setName before joining a room.".to_owned(),
        ),
        StoreError::NameRequired => (
            ErrorCode::NameRequired,
            "Set a name with setName before sending messages.".to_owned(),
        ),
        StoreError::NameTaken(name) => (
            ErrorCode::NameTaken,
            format!("The name \"{name}\" is taken; choose another."),
        ),
        StoreError::UnknownRecipient(_) => (
            ErrorCode::UnknownRecipient,
            "No member has that name.".to_owned(),
        ),
        StoreError::NotAMember(room) => (
            ErrorCode::NotAMember,
            format!("You are not a member of room \"{room}\"; join it first."),
        ),
        StoreError::TooManyRooms(max) => (
            ErrorCode::TooManyRooms,
            format!("You are already in {max} rooms, the most allowed; leave one first."),
        ),
        StoreError::SelfRecipient => (
            ErrorCode::InvalidRecipient,
            "You cannot send a private message to yourself.".to_owned(),
        ),
        StoreError::Contention(_) | StoreError::Backend { .. } | StoreError::Malformed(_) => (
            ErrorCode::InternalError,
            "The chat could not store this request; nothing was sent. Try again.".to_owned(),
        ),
    };
    Refusal::new(code, message, Some(action))
}

pub async fn handle_request(
    store: &dyn ChatStore,
    config: &HandlerConfig,
    request: ApiGatewayWebsocketProxyRequest,
    now_ms: i64,
) -> Result<ApiGatewayProxyResponse, HandlerError> {
    let ctx = &request.request_context;
    let connection_id = ctx
        .connection_id
        .as_deref()
        .ok_or(HandlerError::MissingConnectionId)?;
    match ctx.route_key.as_deref() {
        Some("$connect") => {
            let identity = match &config.auth {
                None => None,
                Some(auth) => {
                    let token = request.query_string_parameters.first(TOKEN_PARAMETER);
                    match auth.identity(token) {
                        Ok(identity) => Some(identity),
                        Err(e) => {
                            // 401 refuses the handshake; the token itself is never logged.
                            info!(connection_id, reason = %e, "connection refused: not authenticated");
                            return Ok(response(401, None));
                        }
                    }
                }
            };
            match store
                .add_identified_connection(connection_id, identity.as_deref(), now_ms)
                .await
            {
                Ok(_) => {
                    info!(
                        connection_id,
                        authenticated = identity.is_some(),
                        "connected"
                    );
                    Ok(response(200, None))
                }
                Err(e) => {
                    // A non-2xx status makes API Gateway refuse the handshake: better than a
                    // connection the chat has no record of.
                    error!(connection_id, error = %e, cause = ?std::error::Error::source(&e), "could not record the connection; refusing it");
                    Ok(response(500, None))
                }
            }
        }
        Some("$disconnect") => {
            let left = store
                .remove_connection(connection_id, LeaveReason::Disconnected, now_ms)
                .await?;
            info!(connection_id, rooms_left = left.len(), "disconnected");
            Ok(response(200, None))
        }
        _ => {
            if request.is_base64_encoded {
                let refusal = Refusal::new(
                    ErrorCode::InvalidJson,
                    "Binary frames are not supported; send JSON text.",
                    None,
                );
                return Ok(refused(&refusal));
            }
            let parsed = parse_request(request.body.as_deref());
            // Every frame counts against the limit, malformed ones too: a flood of garbage is
            // still a flood.
            let limit = within_rate_limit(store, config, connection_id, now_ms).await;
            let writes = matches!(
                parsed,
                Ok(ClientRequest::SetName { .. }
                    | ClientRequest::SendPublic { .. }
                    | ClientRequest::SendPrivate { .. }
                    | ClientRequest::Join { .. }
                    | ClientRequest::Leave { .. })
            );
            if limit == Limit::Unknown && writes {
                // Failing open would let a client that can make the limiter's store fail (or a
                // store in trouble) write without a limit; reads and refusals still answer.
                let refusal = Refusal::new(
                    ErrorCode::InternalError,
                    "The chat could not check this connection's request rate; nothing was done. Try again.",
                    parsed.as_ref().ok().map(ClientRequest::action),
                );
                return Ok(refused(&refusal));
            }
            if limit == Limit::Exceeded {
                let action = parsed.as_ref().ok().map(ClientRequest::action);
                let limit = config.rate_limit;
                let refusal = Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "Too many requests: at most {} per second (bursts of {}). Nothing was done; slow down and retry.",
                        limit.per_second, limit.burst
                    ),
                    action,
                );
                warn!(connection_id, "rate limited");
                return Ok(refused(&refusal));
            }
            let outcome = match parsed {
                Ok(req) => perform(store, config, connection_id, req, now_ms).await,
                Err(refusal) => Err(refusal),
            };
            match outcome {
                Ok(body) => Ok(response(200, body)),
                Err(refusal) => {
                    warn!(
                        connection_id,
                        code = refusal.code.as_str(),
                        action = refusal.action.as_deref(),
                        "request refused"
                    );
                    Ok(refused(&refusal))
                }
            }
        }
    }
}

/// What the rate limiter said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    Within,
    Exceeded,
    /// The limiter's store failed: writes are refused (fail closed), reads go ahead.
    Unknown,
}

/// Whether the connection may make another request.
async fn within_rate_limit(
    store: &dyn ChatStore,
    config: &HandlerConfig,
    connection_id: &str,
    now_ms: i64,
) -> Limit {
    match store
        .take_request_token(connection_id, config.rate_limit, now_ms)
        .await
    {
        Ok(true) => Limit::Within,
        Ok(false) => Limit::Exceeded,
        Err(e) => {
            error!(connection_id, error = %e, cause = ?std::error::Error::source(&e), "rate limit unavailable; refusing writes");
            Limit::Unknown
        }
    }
}

async fn perform(
    store: &dyn ChatStore,
    config: &HandlerConfig,
    connection_id: &str,
    req: ClientRequest,
    now_ms: i64,
) -> Result<Option<String>, Refusal> {
    let action = req.action();
    let result = match &req {
        ClientRequest::SetName { name } => {
            let name = validate_name(name)?;
            store
                .set_name(connection_id, &name, now_ms)
                .await
                .map(|events| {
                    for event in events {
                        info!(
                            connection_id,
                            room = event.room.as_str(),
                            event_id = event.seq,
                            kind = event.event.type_name(),
                            "name set"
                        );
                    }
                })
        }
        ClientRequest::SendPublic { message, room } => {
            validate_message(message, config.max_message_bytes, action)?;
            store
                .post_to_room(connection_id, room, message, now_ms)
                .await
                .map(|event| {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        event_id = event.seq,
                        "public message stored"
                    )
                })
        }
        ClientRequest::Join { room } => {
            return match store
                .join_room(connection_id, room, config.max_rooms, now_ms)
                .await
            {
                Ok(Joined::Now(event)) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        event_id = event.seq,
                        "joined a room"
                    );
                    Ok(Some(joined_response(room, event.seq, false)))
                }
                Ok(Joined::Unsequenced { last }) => {
                    // No event (a large or contended room): catch up from the room's last id.
                    info!(
                        connection_id,
                        room = room.as_str(),
                        last_event_id = last,
                        "joined a room unsequenced"
                    );
                    Ok(Some(joined_response(room, last, false)))
                }
                Ok(Joined::Already { last }) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        last_event_id = last,
                        "already a member of the room"
                    );
                    Ok(Some(joined_response(room, last, true)))
                }
                Err(e) => Err(log_and_refuse(connection_id, action, &e)),
            };
        }
        ClientRequest::Leave { room } => {
            return match store
                .leave_room(connection_id, room, LeaveReason::Left, now_ms)
                .await
            {
                Ok(event) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        event_id = event.seq,
                        "left a room"
                    );
                    Ok(Some(left_response(room, event.seq)))
                }
                Err(e) => Err(log_and_refuse(connection_id, action, &e)),
            };
        }
        ClientRequest::SendPrivate { to, message } => {
            validate_message(message, config.max_message_bytes, action)?;
            store
                .post_private(connection_id, to, message, now_ms)
                .await
                .map(|event| {
                    info!(
                        connection_id,
                        event_id = event.seq,
                        "private message stored"
                    )
                })
        }
        ClientRequest::History(request) => {
            // Any known connection may read public history, named or not: a client catching up
            // after a reconnect asks before it has set its name again. Its identity (when
            // authenticated) adds the private messages it sent or received.
            match store.connection(connection_id, now_ms).await {
                Ok(Some(conn)) => {
                    return history_response(store, request, conn.identity.as_deref(), now_ms)
                        .await
                        .map(Some)
                        .map_err(|e| log_and_refuse(connection_id, action, &e));
                }
                Ok(None) => Err(StoreError::NotConnected(connection_id.to_owned())),
                Err(e) => Err(e),
            }
        }
    };
    result
        .map(|()| None)
        .map_err(|e| log_and_refuse(connection_id, action, &e))
}

fn log_and_refuse(connection_id: &str, action: &str, e: &StoreError) -> Refusal {
    if matches!(
        e,
        StoreError::Backend { .. } | StoreError::Contention(_) | StoreError::Malformed(_)
    ) {
        error!(connection_id, action, error = %e, cause = ?std::error::Error::source(e), "store failed");
    }
    refusal_for(e, action)
}
