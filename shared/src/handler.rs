//! chat-api-handler's logic: one API Gateway WebSocket event in, one response out.
//!
//! It validates the request and writes the state change with its event; it never calls
//! `@connections`. A refused request is answered with one error frame as the route's
//! response, which API Gateway sends to the caller only (the message routes are two-way);
//! so are the answers to `join` and `leave` (`{"joined":…}`, `{"left":…}`, see
//! [`crate::protocol::joined_response`]) and `history`, and — only to a request that carried a
//! `requestId` — the `ok` answers of `setName`, `sendPublic` and `sendPrivate`
//! ([`crate::protocol::ok_response`]). Every answer to a request with a `requestId` echoes it,
//! and a write with one is performed at most once ([`crate::store::requests`]): a resend is
//! answered from the first's request item. A presence change (a rename, `join`, first
//! `setName`, `leave`) is first charged to its rooms' presence budgets ([`crate::presence`]);
//! when one is spent, a join goes ahead unannounced (unsequenced) and a rename or `leave` is
//! refused with `presence_rate_limited` before anything is written.

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use lambda_runtime::Diagnostic;
use thiserror::Error;
use tracing::{error, info, warn};

use crate::auth::TOKEN_PARAMETER;
use crate::config::HandlerConfig;
use crate::events::LeaveReason;
use crate::history::history_response;
use crate::keys::DEFAULT_ROOM;
use crate::presence::BudgetVerdict;
use crate::protocol::{
    joined_response, left_response, ok_response, parse_frame, ClientRequest, ErrorCode, EventRef,
    Refusal,
};
use crate::ratelimit::{self, PrincipalLimit, RequestLimits, Verdict};
use crate::store::items::RequestItem;
use crate::store::requests::{event_refs, Once, RequestKey};
use crate::store::{Admission, ChatStore, Joined, StoreError};
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
    crate::metrics::refused(refusal.code.as_str());
    // 200: the refusal is a normal answer, delivered as the route response.
    response(200, Some(refusal.to_frame()))
}

/// What the client is told when the store failed in a way that may have written: the write
/// may have committed, so "nothing was written" would be a lie (a timeout or a 5xx on a
/// `TransactWriteItems`, a `setName` that stopped between its transactions).
pub const UNCONFIRMED_MESSAGE: &str = "The chat could not confirm this request was stored; it may have been. Resend it with the same requestId to be sure it is stored once.";

/// [`UNCONFIRMED_MESSAGE`] for a request without a `requestId`, which cannot be resent safely.
pub const UNCONFIRMED_NO_ID_MESSAGE: &str = "The chat could not confirm this request was stored; it may have been, and resending it may store it twice. Send a requestId with each request to make resends safe.";

/// What the client is told when the store failed before anything could be written.
pub const NOTHING_WRITTEN_MESSAGE: &str =
    "The chat could not store this request; nothing was written. Try again.";

/// Maps a store refusal to what the client is told.
pub fn refusal_for(err: &StoreError, action: &str) -> Refusal {
    refusal_for_request(err, action, None)
}

/// [`refusal_for`] for a request that carried `request_id` (its refusal echoes it).
pub fn refusal_for_request(err: &StoreError, action: &str, request_id: Option<&str>) -> Refusal {
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
        StoreError::RequestIdReused(id) => (
            ErrorCode::InvalidField,
            format!(
                "requestId \"{id}\" was already used for another request; use a new requestId for each request."
            ),
        ),
        // Certain: contention gives up before committing, a backend failure of a
        // single-transaction write is a read or a write refused before it ran. A setName is
        // several transactions, so a failure part-way may follow a committed one.
        StoreError::Contention(_) | StoreError::Backend { .. } if action != "setName" => (
            ErrorCode::InternalError,
            NOTHING_WRITTEN_MESSAGE.to_owned(),
        ),
        StoreError::Contention(_)
        | StoreError::Backend { .. }
        | StoreError::Unconfirmed { .. }
        | StoreError::Malformed(_) => (
            ErrorCode::InternalError,
            if request_id.is_some() {
                UNCONFIRMED_MESSAGE
            } else {
                UNCONFIRMED_NO_ID_MESSAGE
            }
            .to_owned(),
        ),
    };
    Refusal::new(code, message, Some(action)).answering(request_id)
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
            let principal = principal_of(config, identity.as_deref(), &request);
            let admission = principal.as_deref().map(|principal| Admission {
                principal,
                max_connections: config.principal_limit.max_connections,
            });
            // `?batch=1`: the fan-out packs this connection's frames (crate::batching).
            let batch = crate::batching::opts_in(
                request
                    .query_string_parameters
                    .first(crate::batching::BATCH_PARAMETER),
            );
            match store
                .open_connection(connection_id, identity.as_deref(), admission, batch, now_ms)
                .await
            {
                Ok(None) => {
                    // 429 refuses the handshake, as API Gateway's own throttling does.
                    warn!(
                        connection_id,
                        principal = principal.as_deref(),
                        max = config.principal_limit.max_connections,
                        "connection refused: too many connections at once"
                    );
                    Ok(response(429, None))
                }
                Ok(Some(_)) => {
                    info!(
                        connection_id,
                        authenticated = identity.is_some(),
                        batch,
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
            let parsed = parse_frame(request.body.as_deref());
            // A valid requestId is in every answer to the frame, refusals included.
            let request_id = match &parsed {
                Ok(p) => p.request_id.clone(),
                Err(r) => r.request_id.clone(),
            };
            let request_id = request_id.as_deref();
            // Every frame counts against the limit, malformed ones too: a flood of garbage is
            // still a flood.
            let fallback = principal_of(config, None, &request);
            let limit =
                within_rate_limit(store, config, connection_id, fallback.as_deref(), now_ms).await;
            let action = parsed.as_ref().ok().map(|p| p.request.action());
            let writes = parsed.as_ref().is_ok_and(|p| p.request.writes());
            if limit == Limit::Unknown && writes {
                // Failing open would let a client that can make the limiter's store fail (or a
                // store in trouble) write without a limit; reads and refusals still answer.
                let refusal = Refusal::new(
                    ErrorCode::InternalError,
                    "The chat could not check this connection's request rate; nothing was done. Try again.",
                    action,
                )
                .answering(request_id);
                return Ok(refused(&refusal));
            }
            if limit == Limit::PrincipalExceeded {
                let refusal = Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "Too many requests from your connections together (one account, or one address when not signed in): at most {} per second. Nothing was done; slow down and retry.",
                        config.principal_limit.per_second
                    ),
                    action,
                )
                .answering(request_id);
                warn!(connection_id, "rate limited across connections");
                return Ok(refused(&refusal));
            }
            if limit == Limit::Exceeded {
                let limit = config.rate_limit;
                let refusal = Refusal::new(
                    ErrorCode::RateLimited,
                    format!(
                        "Too many requests: at most {} per second (bursts of {}). Nothing was done; slow down and retry.",
                        limit.per_second, limit.burst
                    ),
                    action,
                )
                .answering(request_id);
                warn!(connection_id, "rate limited");
                return Ok(refused(&refusal));
            }
            let outcome = match parsed {
                Ok(p) => {
                    perform(
                        store,
                        config,
                        connection_id,
                        p.request,
                        p.request_id.as_deref(),
                        now_ms,
                    )
                    .await
                }
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
    /// Over the principal's budget across its connections.
    PrincipalExceeded,
    /// The limiter's store failed: writes are refused (fail closed), reads go ahead.
    Unknown,
}

/// The principal a request counts against when the limits across connections are on: the
/// identity if there is one, else the caller's source IP (see [`crate::ratelimit`]).
fn principal_of(
    config: &HandlerConfig,
    identity: Option<&str>,
    request: &ApiGatewayWebsocketProxyRequest,
) -> Option<String> {
    if config.principal_limit == PrincipalLimit::OFF {
        return None;
    }
    ratelimit::principal(
        identity,
        request.request_context.identity.source_ip.as_deref(),
    )
}

/// Whether the connection may make another request.
async fn within_rate_limit(
    store: &dyn ChatStore,
    config: &HandlerConfig,
    connection_id: &str,
    fallback_principal: Option<&str>,
    now_ms: i64,
) -> Limit {
    let limits = RequestLimits {
        connection: config.rate_limit,
        principal_per_second: config.principal_limit.per_second,
        fallback_principal,
    };
    match store
        .take_request_token(connection_id, &limits, now_ms)
        .await
    {
        Ok(Verdict::Allowed) => Limit::Within,
        Ok(Verdict::ConnectionLimited) => Limit::Exceeded,
        Ok(Verdict::PrincipalLimited) => Limit::PrincipalExceeded,
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
    request_id: Option<&str>,
    now_ms: i64,
) -> Result<Option<String>, Refusal> {
    let action = req.action();
    let refuse = |e: StoreError| log_and_refuse(connection_id, action, request_id, &e);
    // With a requestId, a write is performed at most once (see `store::requests`).
    let key = request_id.map(|id| RequestKey::new(id, action, &req.canonical()));
    let key = key.as_ref();
    let answer = |name: Option<&str>, events: &[EventRef]| {
        request_id.map(|id| ok_response(action, id, name, events))
    };
    match &req {
        ClientRequest::SetName { name } => {
            let name = validate_name(name).map_err(|r| r.answering(request_id))?;
            let (rooms, joins) = set_name_rooms(store, connection_id, &name.display, now_ms)
                .await
                .map_err(|e| match e {
                    // Only a read ran: certainly nothing was written.
                    StoreError::Backend { .. } => Refusal::new(
                        ErrorCode::InternalError,
                        NOTHING_WRITTEN_MESSAGE,
                        Some(action),
                    )
                    .answering(request_id),
                    e => refuse(e),
                })?;
            let presence = within_presence_budget(
                store,
                config,
                connection_id,
                action,
                request_id,
                &rooms,
                joins,
                now_ms,
            )
            .await?;
            let outcome = written(presence, async {
                match key {
                    Some(key) => store.set_name_once(connection_id, &name, key, now_ms).await,
                    None => store
                        .set_name(connection_id, &name, now_ms)
                        .await
                        .map(Once::First),
                }
            })
            .await
            .map_err(refuse)?;
            match outcome {
                Once::First(events) => {
                    for event in &events {
                        info!(
                            connection_id,
                            room = event.room.as_str(),
                            event_id = event.seq,
                            kind = event.event.type_name(),
                            "name set"
                        );
                    }
                    Ok(answer(Some(&name.display), &event_refs(&events)))
                }
                Once::Again(done) => {
                    resent(connection_id, action, &done);
                    Ok(answer(done.name.as_deref(), &done.events))
                }
            }
        }
        ClientRequest::SendPublic { message, room } => {
            validate_message(message, config.max_message_bytes, action)
                .map_err(|r| r.answering(request_id))?;
            let outcome = match key {
                Some(key) => {
                    store
                        .post_to_room_once(connection_id, room, message, key, now_ms)
                        .await
                }
                None => store
                    .post_to_room(connection_id, room, message, now_ms)
                    .await
                    .map(Once::First),
            }
            .map_err(refuse)?;
            match outcome {
                Once::First(event) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        event_id = event.seq,
                        "public message stored"
                    );
                    Ok(answer(None, &event_refs([&event])))
                }
                Once::Again(done) => {
                    resent(connection_id, action, &done);
                    Ok(answer(None, &done.events))
                }
            }
        }
        ClientRequest::SendPrivate { to, message } => {
            validate_message(message, config.max_message_bytes, action)
                .map_err(|r| r.answering(request_id))?;
            let outcome = match key {
                Some(key) => {
                    store
                        .post_private_once(connection_id, to, message, key, now_ms)
                        .await
                }
                None => store
                    .post_private(connection_id, to, message, now_ms)
                    .await
                    .map(Once::First),
            }
            .map_err(refuse)?;
            match outcome {
                Once::First(event) => {
                    info!(
                        connection_id,
                        event_id = event.seq,
                        "private message stored"
                    );
                    Ok(answer(None, &event_refs([&event])))
                }
                Once::Again(done) => {
                    resent(connection_id, action, &done);
                    Ok(answer(None, &done.events))
                }
            }
        }
        ClientRequest::Join { room } => {
            let presence = within_presence_budget(
                store,
                config,
                connection_id,
                action,
                request_id,
                std::slice::from_ref(room),
                true,
                now_ms,
            )
            .await?;
            let outcome = written(presence, async {
                match key {
                    Some(key) => {
                        store
                            .join_room_once(connection_id, room, config.max_rooms, key, now_ms)
                            .await
                    }
                    None => store
                        .join_room(connection_id, room, config.max_rooms, now_ms)
                        .await
                        .map(Once::First),
                }
            })
            .await
            .map_err(refuse)?;
            let (id, already) = match outcome {
                Once::First(Joined::Now(event)) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        event_id = event.seq,
                        "joined a room"
                    );
                    (event.seq, false)
                }
                Once::First(Joined::Unsequenced { last }) => {
                    // No event (a large or contended room): catch up from the room's last id.
                    info!(
                        connection_id,
                        room = room.as_str(),
                        last_event_id = last,
                        "joined a room unsequenced"
                    );
                    (last, false)
                }
                Once::First(Joined::Already { last }) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        last_event_id = last,
                        "already a member of the room"
                    );
                    (last, true)
                }
                Once::Again(done) => {
                    resent(connection_id, action, &done);
                    (recorded_id(&done, connection_id, action)?, false)
                }
            };
            Ok(Some(joined_response(room, id, already, request_id)))
        }
        ClientRequest::Leave { room } => {
            within_presence_budget(
                store,
                config,
                connection_id,
                action,
                request_id,
                std::slice::from_ref(room),
                false,
                now_ms,
            )
            .await?;
            let outcome = match key {
                Some(key) => {
                    store
                        .leave_room_once(connection_id, room, key, now_ms)
                        .await
                }
                None => store
                    .leave_room(connection_id, room, LeaveReason::Left, now_ms)
                    .await
                    .map(Once::First),
            }
            .map_err(refuse)?;
            let id = match outcome {
                Once::First(event) => {
                    info!(
                        connection_id,
                        room = room.as_str(),
                        event_id = event.seq,
                        "left a room"
                    );
                    event.seq
                }
                Once::Again(done) => {
                    resent(connection_id, action, &done);
                    recorded_id(&done, connection_id, action)?
                }
            };
            Ok(Some(left_response(room, id, request_id)))
        }
        ClientRequest::History(request) => {
            // Any known connection may read public history, named or not: a client catching up
            // after a reconnect asks before it has set its name again. Its identity (when
            // authenticated) adds the private messages it sent or received.
            match store.connection(connection_id, now_ms).await {
                Ok(Some(conn)) => {
                    history_response(store, request, conn.identity.as_deref(), request_id, now_ms)
                        .await
                        .map(Some)
                        .map_err(refuse)
                }
                Ok(None) => Err(refuse(StoreError::NotConnected(connection_id.to_owned()))),
                Err(e) => Err(refuse(e)),
            }
        }
    }
}

/// The rooms whose presence a `setName` changes: `lobby` for a first name (or a connection that
/// left lobby), every room of the connection for a rename, none for the same name again. An
/// unknown connection changes none (the store refuses it). And whether the change is only a
/// join of `lobby` (no rename), which the presence budget lets through unannounced.
async fn set_name_rooms(
    store: &dyn ChatStore,
    connection_id: &str,
    display: &str,
    now_ms: i64,
) -> Result<(Vec<String>, bool), StoreError> {
    let Some(conn) = store.connection(connection_id, now_ms).await? else {
        return Ok((Vec::new(), false));
    };
    let renames = conn.name.as_deref().is_some_and(|old| old != display);
    let mut rooms = if renames {
        conn.rooms.clone()
    } else {
        Vec::new()
    };
    if !conn.rooms.iter().any(|r| r == DEFAULT_ROOM) {
        rooms.push(DEFAULT_ROOM.to_owned());
    }
    Ok((rooms, !renames))
}

/// How a presence change the budget has seen goes ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Presence {
    /// Within every room's budget: written as usual (sequenced, broadcast).
    Announced,
    /// A join over its room's budget: written unsequenced, not broadcast
    /// ([`crate::presence`], *Joins are not refused*).
    Unannounced,
}

/// Runs a store call for a change the budget admitted as `presence`: an unannounced one with
/// its joins unsequenced.
async fn written<F: std::future::Future>(presence: Presence, store_call: F) -> F::Output {
    match presence {
        Presence::Announced => store_call.await,
        Presence::Unannounced => crate::presence::unsequenced_joins(store_call).await,
    }
}

/// Charges one presence change to each of `rooms`' budgets ([`crate::presence`]) before the
/// change is written. Over a room's budget, a join (`joins`: a `join`, or a first `setName`)
/// goes ahead unannounced; anything else is refused with `presence_rate_limited` (and when to
/// retry), so a refused change writes nothing. A room charged before another refused keeps
/// the charge: the budget errs on the side of fewer POSTs. A store error fails closed.
#[allow(clippy::too_many_arguments)]
async fn within_presence_budget(
    store: &dyn ChatStore,
    config: &HandlerConfig,
    connection_id: &str,
    action: &str,
    request_id: Option<&str>,
    rooms: &[String],
    joins: bool,
    now_ms: i64,
) -> Result<Presence, Refusal> {
    if config.presence_budget.is_off() || rooms.is_empty() {
        return Ok(Presence::Announced);
    }
    let verdicts = futures::future::try_join_all(
        rooms
            .iter()
            .map(|room| store.take_presence_budget(room, config.presence_budget, now_ms)),
    )
    .await
    .map_err(|e| {
        error!(connection_id, action, error = %e, cause = ?std::error::Error::source(&e), "presence budget unavailable; refusing");
        Refusal::new(ErrorCode::InternalError, NOTHING_WRITTEN_MESSAGE, Some(action))
            .answering(request_id)
    })?;
    let wait = verdicts
        .iter()
        .zip(rooms)
        .filter_map(|(v, room)| match v {
            BudgetVerdict::Allowed => None,
            BudgetVerdict::Exceeded { retry_after_ms } => Some((*retry_after_ms, room)),
        })
        .max();
    let Some((retry_after_ms, room)) = wait else {
        return Ok(Presence::Announced);
    };
    if joins {
        info!(
            connection_id,
            action,
            room = room.as_str(),
            "presence budget spent; joining unannounced"
        );
        return Ok(Presence::Unannounced);
    }
    warn!(
        connection_id,
        action,
        room = room.as_str(),
        retry_after_ms,
        "presence budget spent"
    );
    Err(Refusal::new(
        ErrorCode::PresenceRateLimited,
        format!(
            "Room \"{room}\" has had as many joins, leaves and renames this second as its members can be told about (at most {} deliveries per second). Nothing was done; retry in {retry_after_ms} ms.",
            config.presence_budget.posts_per_second
        ),
        Some(action),
    )
    .answering(request_id)
    .retry_after(retry_after_ms))
}

/// Logs a resend answered from its request item (nothing was written).
fn resent(connection_id: &str, action: &str, done: &RequestItem) {
    info!(
        connection_id,
        action,
        first_connection_id = done.connection_id.as_str(),
        events = done.events.len(),
        "resend answered from its request item"
    );
}

/// The one event id a join's or leave's request item holds.
fn recorded_id(done: &RequestItem, connection_id: &str, action: &str) -> Result<u64, Refusal> {
    done.events.first().map(|e| e.id).ok_or_else(|| {
        let e = StoreError::Malformed(format!("{action} request item without its event"));
        log_and_refuse(connection_id, action, None, &e)
    })
}

fn log_and_refuse(
    connection_id: &str,
    action: &str,
    request_id: Option<&str>,
    e: &StoreError,
) -> Refusal {
    if e.is_failure() {
        error!(connection_id, action, error = %e, cause = ?std::error::Error::source(e), "store failed");
    }
    refusal_for_request(e, action, request_id)
}
