//! The JSON frames on the wire: client requests in, chat frames and error frames out.
//!
//! The frames are those of the classic API Gateway WebSocket chat tutorial, kept exactly;
//! what we add is additive (`room`, `id` and `ts` on chat frames, the `error` frame, the
//! `join`/`leave` requests and their answers, `requestId` and the `ok` answers), so the old
//! client keeps working in `lobby`. Parsing is done by hand over `serde_json::Value` rather than with a
//! tagged serde enum because every way a frame can be wrong deserves its own precise error
//! code, and serde's messages are neither stable nor meant for end users.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::keys::DEFAULT_ROOM;
use crate::validation::validate_room;

/// A request a client sends, selected by its `action` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientRequest {
    /// `{"action":"setName","name":"alice"}`: join, or rename when sent again.
    SetName { name: String },
    /// `{"action":"sendPublic","message":"hello","room":"r"}`: say something to every member
    /// of the room (`room` optional: [`DEFAULT_ROOM`]).
    SendPublic { message: String, room: String },
    /// `{"action":"sendPrivate","to":"bob","message":"psst"}`: to one member only.
    SendPrivate { to: String, message: String },
    /// `{"action":"history","limit":50,"before":120}` pages backwards through public history;
    /// `{"action":"history","after":97}` reads forwards from an id (catch-up after a reconnect).
    History(HistoryRequest),
    /// `{"action":"join","room":"r"}`: become a member of a room.
    Join { room: String },
    /// `{"action":"leave","room":"r"}`: stop being a member of a room.
    Leave { room: String },
}

/// The public history a client asks for. At most one of `before` and `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryRequest {
    /// Whose history: a valid room name (`room` optional: [`DEFAULT_ROOM`]).
    pub room: String,
    /// Frames per response, 1..=[`HISTORY_MAX_LIMIT`]; default [`HISTORY_DEFAULT_LIMIT`].
    pub limit: usize,
    pub direction: HistoryDirection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryDirection {
    /// Events with ids greater than this, oldest first.
    After(u64),
    /// Events with ids smaller than this (or the newest), newest first.
    Before(Option<u64>),
}

pub const HISTORY_DEFAULT_LIMIT: usize = 50;
pub const HISTORY_MAX_LIMIT: usize = 100;

impl ClientRequest {
    pub fn action(&self) -> &'static str {
        match self {
            ClientRequest::SetName { .. } => "setName",
            ClientRequest::SendPublic { .. } => "sendPublic",
            ClientRequest::SendPrivate { .. } => "sendPrivate",
            ClientRequest::History(_) => "history",
            ClientRequest::Join { .. } => "join",
            ClientRequest::Leave { .. } => "leave",
        }
    }

    /// Whether the request changes state (and so is performed at most once per `requestId`).
    pub fn writes(&self) -> bool {
        !matches!(self, ClientRequest::History(_))
    }

    /// The request as one canonical string (its action and fields, JSON-quoted so no two
    /// requests share one): what a `requestId` is bound to, so the same id reused for another
    /// request is told apart from a resend.
    pub fn canonical(&self) -> String {
        let parts: Vec<&str> = match self {
            ClientRequest::SetName { name } => vec![name],
            ClientRequest::SendPublic { message, room } => vec![room, message],
            ClientRequest::SendPrivate { to, message } => vec![to, message],
            ClientRequest::Join { room } | ClientRequest::Leave { room } => vec![room],
            ClientRequest::History(h) => vec![&h.room],
        };
        serde_json::to_string(&(self.action(), parts)).expect("strings serialise")
    }
}

/// Every reason a request can be refused. The snake_case names are part of the public API
/// (documented in the README); never rename one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is empty or not valid JSON.
    InvalidJson,
    /// The frame is JSON but not an object.
    InvalidRequest,
    /// `action` is missing, not a string, or not one of ours (case matters).
    UnknownAction,
    /// A key the action needs is missing.
    MissingField,
    /// A key has the wrong JSON type.
    InvalidField,
    /// The name breaks a naming rule (length, control or bidi characters).
    InvalidName,
    /// Another connection holds this name (ignoring case).
    NameTaken,
    /// The connection must `setName` before it can send.
    NameRequired,
    /// The message is empty or only whitespace.
    InvalidMessage,
    /// The message is over the configured byte limit.
    MessageTooLarge,
    /// `to` is not the name of a current member.
    UnknownRecipient,
    /// `to` names the sender.
    InvalidRecipient,
    /// The connection is not known (already closed or expired).
    NotConnected,
    /// The store failed. Its message says whether nothing was written (certain) or the write
    /// may have committed (an ambiguous failure: resend with the same `requestId`).
    InternalError,
    /// The connection sent more requests than its rate limit allows; nothing was done.
    RateLimited,
    /// `room` is not a valid room name.
    InvalidRoom,
    /// Sending to (or leaving) a room the connection has not joined.
    NotAMember,
    /// Joining would take the connection over its room limit.
    TooManyRooms,
    /// The room's presence budget for this second is spent ([`crate::presence`]): the join,
    /// leave or rename was not done; retry after `retryAfterMs`.
    PresenceRateLimited,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownAction,
        ErrorCode::MissingField,
        ErrorCode::InvalidField,
        ErrorCode::InvalidName,
        ErrorCode::NameTaken,
        ErrorCode::NameRequired,
        ErrorCode::InvalidMessage,
        ErrorCode::MessageTooLarge,
        ErrorCode::UnknownRecipient,
        ErrorCode::InvalidRecipient,
        ErrorCode::NotConnected,
        ErrorCode::InternalError,
        ErrorCode::RateLimited,
        ErrorCode::InvalidRoom,
        ErrorCode::NotAMember,
        ErrorCode::TooManyRooms,
        ErrorCode::PresenceRateLimited,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::MissingField => "missing_field",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::NameRequired => "name_required",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::UnknownRecipient => "unknown_recipient",
            ErrorCode::InvalidRecipient => "invalid_recipient",
            ErrorCode::NotConnected => "not_connected",
            ErrorCode::InternalError => "internal_error",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::NotAMember => "not_a_member",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::PresenceRateLimited => "presence_rate_limited",
        }
    }
}

/// A refused request: what goes back to its sender, and only to its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: ErrorCode,
    /// One sentence for a person.
    pub message: String,
    /// The request's action, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// The request's `requestId`, when it carried a valid one: the client matches the error
    /// to its request by it.
    #[serde(default, rename = "requestId", skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// When retrying may succeed, in ms from now (`presence_rate_limited`).
    #[serde(
        default,
        rename = "retryAfterMs",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after_ms: Option<u64>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>, action: Option<&str>) -> Self {
        Refusal {
            code,
            message: message.into(),
            action: action.map(str::to_owned),
            request_id: None,
            retry_after_ms: None,
        }
    }

    /// This refusal, saying when a retry may succeed.
    pub fn retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }

    /// This refusal, answering the request `request_id` (if any).
    pub fn answering(mut self, request_id: Option<&str>) -> Self {
        self.request_id = request_id.map(str::to_owned);
        self
    }

    /// The frame `{"error":{"code","message","action","requestId","retryAfterMs"}}`.
    pub fn to_frame(&self) -> String {
        #[derive(Serialize)]
        struct ErrorFrame<'a> {
            error: &'a Refusal,
        }
        serde_json::to_string(&ErrorFrame { error: self })
            .expect("an error frame holds only strings")
    }
}

/// The most characters a `requestId` may have.
pub const REQUEST_ID_MAX_CHARS: usize = 64;

/// A parsed frame: the request, and the `requestId` it carried (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub request: ClientRequest,
    pub request_id: Option<String>,
}

/// Parses the body of a WebSocket message into a request, or says precisely why not.
pub fn parse_request(body: Option<&str>) -> Result<ClientRequest, Refusal> {
    parse_frame(body).map(|p| p.request)
}

/// [`parse_request`] with the frame's `requestId`: a valid one is in the answer, and in the
/// refusal when the rest of the frame is refused; an invalid one is itself refused
/// (`invalid_field`) before the action's own keys are looked at.
pub fn parse_frame(body: Option<&str>) -> Result<Parsed, Refusal> {
    let body = body.unwrap_or("");
    if body.trim().is_empty() {
        return Err(Refusal::new(
            ErrorCode::InvalidJson,
            "The frame is empty; send a JSON object with an \"action\" key.",
            None,
        ));
    }
    let value: Value = serde_json::from_str(body).map_err(|e| {
        Refusal::new(
            ErrorCode::InvalidJson,
            format!("The frame is not valid JSON ({e})."),
            None,
        )
    })?;
    let Value::Object(object) = value else {
        return Err(Refusal::new(
            ErrorCode::InvalidRequest,
            "The frame must be a JSON object with an \"action\" key.",
            None,
        ));
    };
    let action = match object.get("action") {
        Some(Value::String(action)) => Some(action.as_str()),
        _ => None,
    };
    let request_id = request_id_field(&object, action)?;
    parse_object(&object, action)
        .map(|request| Parsed {
            request,
            request_id: request_id.clone(),
        })
        .map_err(|r| r.answering(request_id.as_deref()))
}

/// The frame's `requestId`: absent or `null` is none; otherwise 1–[`REQUEST_ID_MAX_CHARS`]
/// characters, each an ASCII letter, digit, `-`, `_`, `.` or `:` (a UUID fits).
fn request_id_field(
    object: &Map<String, Value>,
    action: Option<&str>,
) -> Result<Option<String>, Refusal> {
    let refuse = |why: &str| {
        Err(Refusal::new(
            ErrorCode::InvalidField,
            format!(
                "\"requestId\" must be 1–{REQUEST_ID_MAX_CHARS} characters of ASCII letters, digits, '-', '_', '.' or ':'{why}."
            ),
            action,
        ))
    };
    match object.get("requestId") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(id)) => {
            if id.is_empty() {
                refuse(" (it is empty)")
            } else if id.chars().count() > REQUEST_ID_MAX_CHARS {
                refuse(" (it is longer)")
            } else if !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
            {
                refuse(" (it has other characters)")
            } else {
                Ok(Some(id.clone()))
            }
        }
        Some(_) => refuse(" (it is not a string)"),
    }
}

fn parse_object(
    object: &Map<String, Value>,
    action: Option<&str>,
) -> Result<ClientRequest, Refusal> {
    let action = match (object.get("action"), action) {
        (_, Some(action)) => action,
        (None, _) => {
            return Err(Refusal::new(
                ErrorCode::UnknownAction,
                "The frame has no \"action\" key.",
                None,
            ))
        }
        (Some(_), None) => {
            return Err(Refusal::new(
                ErrorCode::UnknownAction,
                "\"action\" must be a string.",
                None,
            ))
        }
    };
    let field = |key: &str| string_field(object, action, key);
    match action {
        "setName" => Ok(ClientRequest::SetName {
            name: field("name")?,
        }),
        "sendPublic" => Ok(ClientRequest::SendPublic {
            message: field("message")?,
            room: room_field(object, action, false)?,
        }),
        "sendPrivate" => Ok(ClientRequest::SendPrivate {
            to: field("to")?,
            message: field("message")?,
        }),
        "history" => parse_history(object).map(ClientRequest::History),
        "join" => Ok(ClientRequest::Join {
            room: room_field(object, action, true)?,
        }),
        "leave" => Ok(ClientRequest::Leave {
            room: room_field(object, action, true)?,
        }),
        other => Err(Refusal::new(
            ErrorCode::UnknownAction,
            format!(
                "Unknown action \"{}\"; use setName, sendPublic, sendPrivate, history, join or leave.",
                truncate_for_display(other)
            ),
            Some(other),
        )),
    }
}

/// An optional whole number `key`, at most `max`.
fn number_field(object: &Map<String, Value>, key: &str, max: u64) -> Result<Option<u64>, Refusal> {
    match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= max => Ok(Some(v)),
            _ => Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("\"{key}\" must be a whole number from 0 to {max}."),
                Some("history"),
            )),
        },
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("\"{key}\" must be a number."),
            Some("history"),
        )),
    }
}

fn parse_history(object: &Map<String, Value>) -> Result<HistoryRequest, Refusal> {
    // Ids stay below 2^53 so every JavaScript client can hold them exactly.
    const MAX_ID: u64 = (1 << 53) - 1;
    let limit = match number_field(object, "limit", HISTORY_MAX_LIMIT as u64)? {
        Some(0) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                format!("\"limit\" must be from 1 to {HISTORY_MAX_LIMIT}."),
                Some("history"),
            ))
        }
        Some(n) => n as usize,
        None => HISTORY_DEFAULT_LIMIT,
    };
    let direction = match (
        number_field(object, "before", MAX_ID)?,
        number_field(object, "after", MAX_ID)?,
    ) {
        (Some(_), Some(_)) => {
            return Err(Refusal::new(
                ErrorCode::InvalidField,
                "Use either \"before\" or \"after\", not both.",
                Some("history"),
            ))
        }
        (_, Some(after)) => HistoryDirection::After(after),
        (before, None) => HistoryDirection::Before(before),
    };
    let room = room_field(object, "history", false)?;
    Ok(HistoryRequest {
        room,
        limit,
        direction,
    })
}

/// The request's `room`: a valid room name. Optional (then [`DEFAULT_ROOM`]) unless
/// `required` (`join`, `leave`); `null` counts as absent, like every other key.
fn room_field(
    object: &Map<String, Value>,
    action: &str,
    required: bool,
) -> Result<String, Refusal> {
    if !required && matches!(object.get("room"), None | Some(Value::Null)) {
        return Ok(DEFAULT_ROOM.to_owned());
    }
    let room = string_field(object, action, "room")?;
    validate_room(&room, action)?;
    Ok(room)
}

fn string_field(object: &Map<String, Value>, action: &str, key: &str) -> Result<String, Refusal> {
    match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err(Refusal::new(
            ErrorCode::MissingField,
            format!("{action} needs a \"{key}\" string."),
            Some(action),
        )),
        Some(_) => Err(Refusal::new(
            ErrorCode::InvalidField,
            format!("\"{key}\" must be a string."),
            Some(action),
        )),
    }
}

/// Client-chosen text echoed in an error message is cut short so a huge frame cannot
/// produce a huge error.
fn truncate_for_display(s: &str) -> String {
    const MAX: usize = 40;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        let mut cut: String = s.chars().take(MAX).collect();
        cut.push('…');
        cut
    }
}

/// What a chat frame says; the key names are the tutorial client's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FrameBody {
    Members(Vec<String>),
    SystemMessage(String),
    PublicMessage(String),
    PrivateMessage(String),
}

/// A frame the fan-out delivers. `room` is the room of the event it comes from, `id` that
/// event's id (dense and ordered per room) and `ts` its commit time (ms): additive keys the
/// tutorial client ignores, which newer clients use to tell rooms apart and drop
/// redeliveries (dedupe on (`room`, `id`, the frame's kind): one join yields both a
/// `members` and a `systemMessage` frame with the same `id`). Each presence change has its own
/// `systemMessage`, the same live and in history; `members` is a snapshot carrying the id of
/// the newest change it reflects, applied only if newer than the last list applied
/// ([`crate::presence`]). Every room-scoped frame has a
/// `room`, `lobby`'s included; a `privateMessage` has none — private messages are addressed
/// to a name, not a room, and their `id` is in `lobby`'s sequence (where they are logged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    #[serde(flatten)]
    pub body: FrameBody,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
}

impl Frame {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a chat frame holds only strings and numbers")
    }
}

/// The answer to a `join`, sent to its sender only (the route response):
/// `{"joined":{"room":"r","id":17}}`, where `id` is the join's `MemberJoined` event. Joining a
/// room the connection is already in changes nothing and says so:
/// `{"joined":{"room":"r","id":42,"already":true}}`, where `id` is the room's newest event id.
/// Either way a client can catch up with `history` `after` that id without waiting for a
/// `members` frame (which a room over the presence limit never sends).
/// With a `requestId`, the answer carries it: `{"joined":{"room":"r","id":17,"requestId":"r2"}}`.
pub fn joined_response(room: &str, id: u64, already: bool, request_id: Option<&str>) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        room: &'a str,
        id: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        already: bool,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Joined<'a> {
        joined: Body<'a>,
    }
    serde_json::to_string(&Joined {
        joined: Body {
            room,
            id,
            already,
            request_id,
        },
    })
    .expect("a join response holds only strings and numbers")
}

/// The answer to a `leave`, to its sender only: `{"left":{"room":"r","id":18}}`, where `id`
/// is the leave's `MemberLeft` event in that room (and `requestId` when the request had one).
pub fn left_response(room: &str, id: u64, request_id: Option<&str>) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        room: &'a str,
        id: u64,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Left<'a> {
        left: Body<'a>,
    }
    serde_json::to_string(&Left {
        left: Body {
            room,
            id,
            request_id,
        },
    })
    .expect("a leave response holds only strings and numbers")
}

/// One event a request recorded: its room and id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRef {
    pub room: String,
    pub id: u64,
}

/// The answer to a `sendPublic`, `sendPrivate` or `setName` that carried a `requestId` (those
/// without one have no answer, as in the tutorial):
/// - `{"ok":{"action":"sendPublic","requestId":"r5","room":"lobby","id":42}}`
/// - `{"ok":{"action":"sendPrivate","requestId":"r6","id":43}}` (the id in lobby's log)
/// - `{"ok":{"action":"setName","requestId":"r7","name":"alice","events":[{"room":"lobby","id":12}]}}`
///   (`events`: what the setName recorded, per room; `[]` when it changed nothing)
///
/// `events` are the recorded events, whatever the action: the single event of a send.
pub fn ok_response(
    action: &str,
    request_id: &str,
    name: Option<&str>,
    events: &[EventRef],
) -> String {
    #[derive(Serialize)]
    struct Body<'a> {
        action: &'a str,
        #[serde(rename = "requestId")]
        request_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        room: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        events: Option<&'a [EventRef]>,
    }
    #[derive(Serialize)]
    struct Ok<'a> {
        ok: Body<'a>,
    }
    let first = events.first();
    let body = match action {
        "sendPublic" => Body {
            action,
            request_id,
            room: first.map(|e| e.room.as_str()),
            id: first.map(|e| e.id),
            name: None,
            events: None,
        },
        "sendPrivate" => Body {
            action,
            request_id,
            room: None,
            id: first.map(|e| e.id),
            name: None,
            events: None,
        },
        _ => Body {
            action,
            request_id,
            room: None,
            id: None,
            name,
            events: Some(events),
        },
    };
    serde_json::to_string(&Ok { ok: body }).expect("an ok answer holds only strings and numbers")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refusal(body: &str) -> Refusal {
        parse_request(Some(body)).expect_err("should be refused")
    }

    #[test]
    fn parses_the_three_tutorial_actions() {
        // GIVEN the tutorial client's frames  WHEN parsed  THEN each maps to its request
        assert_eq!(
            parse_request(Some(r#"{"action":"setName","name":"alice"}"#)),
            Ok(ClientRequest::SetName {
                name: "alice".into()
            })
        );
        assert_eq!(
            parse_request(Some(r#"{"action":"sendPublic","message":"hi"}"#)),
            Ok(ClientRequest::SendPublic {
                message: "hi".into(),
                room: "lobby".into()
            })
        );
        assert_eq!(
            parse_request(Some(
                r#"{"action":"sendPrivate","to":"bob","message":"psst"}"#
            )),
            Ok(ClientRequest::SendPrivate {
                to: "bob".into(),
                message: "psst".into()
            })
        );
    }

    #[test]
    fn extra_keys_are_ignored_so_clients_can_add_fields() {
        let parsed = parse_request(Some(r#"{"action":"sendPublic","message":"hi","x":[1]}"#));
        assert_eq!(
            parsed,
            Ok(ClientRequest::SendPublic {
                message: "hi".into(),
                room: "lobby".into()
            })
        );
    }

    #[test]
    fn room_requests_parse_and_room_defaults_to_lobby() {
        let parse = |b: &str| parse_request(Some(b));
        // GIVEN join and leave frames  WHEN parsed  THEN each names its room
        assert_eq!(
            parse(r#"{"action":"join","room":"rust-lang.dev_1"}"#),
            Ok(ClientRequest::Join {
                room: "rust-lang.dev_1".into()
            })
        );
        assert_eq!(
            parse(r#"{"action":"leave","room":"lobby"}"#),
            Ok(ClientRequest::Leave {
                room: "lobby".into()
            })
        );
        // AND sendPublic and history take an optional room, lobby when absent or null
        assert_eq!(
            parse(r#"{"action":"sendPublic","message":"m","room":"Ops"}"#),
            Ok(ClientRequest::SendPublic {
                message: "m".into(),
                room: "Ops".into()
            })
        );
        assert_eq!(
            parse(r#"{"action":"sendPublic","message":"m","room":null}"#),
            Ok(ClientRequest::SendPublic {
                message: "m".into(),
                room: "lobby".into()
            })
        );
        assert_eq!(
            parse(r#"{"action":"history","room":"ops","after":3}"#),
            Ok(ClientRequest::History(HistoryRequest {
                room: "ops".into(),
                limit: HISTORY_DEFAULT_LIMIT,
                direction: HistoryDirection::After(3)
            }))
        );
        // AND a bad room is refused with the action it came with
        let cases: &[(&str, ErrorCode, &str)] = &[
            (r#"{"action":"join"}"#, ErrorCode::MissingField, "join"),
            (
                r#"{"action":"leave","room":null}"#,
                ErrorCode::MissingField,
                "leave",
            ),
            (
                r#"{"action":"join","room":7}"#,
                ErrorCode::InvalidField,
                "join",
            ),
            (
                r#"{"action":"join","room":""}"#,
                ErrorCode::InvalidRoom,
                "join",
            ),
            (
                r#"{"action":"leave","room":"a b"}"#,
                ErrorCode::InvalidRoom,
                "leave",
            ),
            (
                r#"{"action":"sendPublic","message":"m","room":"é"}"#,
                ErrorCode::InvalidRoom,
                "sendPublic",
            ),
            (
                r#"{"action":"sendPublic","message":"m","room":["r"]}"#,
                ErrorCode::InvalidField,
                "sendPublic",
            ),
            (
                r#"{"action":"history","room":"a/b"}"#,
                ErrorCode::InvalidRoom,
                "history",
            ),
            (
                r#"{"action":"history","room":1}"#,
                ErrorCode::InvalidField,
                "history",
            ),
        ];
        for (body, code, action) in cases {
            let r = refusal(body);
            assert_eq!(r.code, *code, "body {body:?}: {r:?}");
            assert_eq!(r.action.as_deref(), Some(*action), "body {body:?}");
        }
    }

    #[test]
    fn a_request_id_is_parsed_on_every_action_and_kept_in_refusals() {
        // GIVEN each action with a valid requestId  WHEN parsed  THEN the id comes with it
        for body in [
            r#"{"action":"setName","name":"a","requestId":"r1"}"#,
            r#"{"action":"sendPublic","message":"m","requestId":"r1"}"#,
            r#"{"action":"sendPrivate","to":"b","message":"m","requestId":"r1"}"#,
            r#"{"action":"history","requestId":"r1"}"#,
            r#"{"action":"join","room":"r","requestId":"r1"}"#,
            r#"{"action":"leave","room":"r","requestId":"r1"}"#,
        ] {
            let parsed = parse_frame(Some(body)).expect(body);
            assert_eq!(parsed.request_id.as_deref(), Some("r1"), "{body}");
        }
        // AND a UUID, 64 characters and every allowed punctuation are valid; null is absent
        let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let max = "a".repeat(REQUEST_ID_MAX_CHARS);
        for id in [uuid, max.as_str(), "A.b_c-d:9"] {
            let body = json!({"action":"history","requestId":id}).to_string();
            assert_eq!(
                parse_frame(Some(&body))
                    .expect("valid")
                    .request_id
                    .as_deref(),
                Some(id)
            );
        }
        let null = parse_frame(Some(r#"{"action":"history","requestId":null}"#)).expect("null");
        assert_eq!(null.request_id, None);
        // AND anything else is invalid_field, with the action, and without the bad id
        let long = "a".repeat(REQUEST_ID_MAX_CHARS + 1);
        for bad in [
            json!(7),
            json!(""),
            json!(long),
            json!("a b"),
            json!("é"),
            json!("a#b"),
            json!("a/b"),
            json!(["r1"]),
            json!({"id":"r1"}),
            json!(true),
        ] {
            let body = json!({"action":"sendPublic","message":"m","requestId":bad}).to_string();
            let r = refusal(&body);
            assert_eq!(r.code, ErrorCode::InvalidField, "{body}");
            assert_eq!(r.action.as_deref(), Some("sendPublic"), "{body}");
            assert_eq!(r.request_id, None, "{body}");
            assert!(r.message.contains("requestId"), "{body}: {}", r.message);
        }
        // AND a valid id stays in the refusal of the rest of the frame
        let r = refusal(r#"{"action":"sendPublic","requestId":"r9"}"#);
        assert_eq!(
            (r.code, r.request_id.as_deref()),
            (ErrorCode::MissingField, Some("r9"))
        );
        let r = refusal(r#"{"requestId":"r9"}"#);
        assert_eq!(
            (r.code, r.action.as_deref(), r.request_id.as_deref()),
            (ErrorCode::UnknownAction, None, Some("r9"))
        );
        assert_eq!(
            r.to_frame(),
            r#"{"error":{"code":"unknown_action","message":"The frame has no \"action\" key.","requestId":"r9"}}"#
        );
    }

    #[test]
    fn ok_answers_have_the_documented_shape() {
        let lobby = |id| EventRef {
            room: "lobby".into(),
            id,
        };
        assert_eq!(
            ok_response("sendPublic", "r5", None, &[lobby(42)]),
            r#"{"ok":{"action":"sendPublic","requestId":"r5","room":"lobby","id":42}}"#
        );
        assert_eq!(
            ok_response("sendPrivate", "r6", None, &[lobby(43)]),
            r#"{"ok":{"action":"sendPrivate","requestId":"r6","id":43}}"#
        );
        assert_eq!(
            ok_response("setName", "r7", Some("alice"), &[lobby(12)]),
            r#"{"ok":{"action":"setName","requestId":"r7","name":"alice","events":[{"room":"lobby","id":12}]}}"#
        );
        assert_eq!(
            ok_response("setName", "r8", Some("alice"), &[]),
            r#"{"ok":{"action":"setName","requestId":"r8","name":"alice","events":[]}}"#
        );
    }

    #[test]
    fn the_canonical_form_tells_requests_apart() {
        let c = |b: &str| parse_request(Some(b)).expect(b).canonical();
        assert_eq!(
            c(r#"{"action":"sendPublic","message":"hi"}"#),
            c(r#"{"action":"sendPublic","message":"hi","room":"lobby","requestId":"x"}"#)
        );
        assert_ne!(
            c(r#"{"action":"sendPublic","message":"hi"}"#),
            c(r#"{"action":"sendPublic","message":"hi","room":"ops"}"#)
        );
        assert_ne!(
            c(r#"{"action":"join","room":"ops"}"#),
            c(r#"{"action":"leave","room":"ops"}"#)
        );
        assert_ne!(
            c(r#"{"action":"sendPrivate","to":"a\u0000b","message":"c"}"#),
            c(r#"{"action":"sendPrivate","to":"a","message":"b\u0000c"}"#)
        );
    }

    #[test]
    fn join_and_leave_answers_have_the_documented_shape() {
        assert_eq!(
            joined_response("r", 17, false, None),
            r#"{"joined":{"room":"r","id":17}}"#
        );
        assert_eq!(
            joined_response("r", 42, true, None),
            r#"{"joined":{"room":"r","id":42,"already":true}}"#
        );
        assert_eq!(
            left_response("r", 18, None),
            r#"{"left":{"room":"r","id":18}}"#
        );
        // AND with a requestId, each carries it
        assert_eq!(
            joined_response("ops", 17, false, Some("r2")),
            r#"{"joined":{"room":"ops","id":17,"requestId":"r2"}}"#
        );
        assert_eq!(
            joined_response("ops", 42, true, Some("r2")),
            r#"{"joined":{"room":"ops","id":42,"already":true,"requestId":"r2"}}"#
        );
        assert_eq!(
            left_response("ops", 18, Some("r3")),
            r#"{"left":{"room":"ops","id":18,"requestId":"r3"}}"#
        );
    }

    #[test]
    fn each_malformation_gets_its_own_code() {
        let cases: &[(&str, ErrorCode, Option<&str>)] = &[
            ("", ErrorCode::InvalidJson, None),
            ("hello", ErrorCode::InvalidJson, None),
            ("{\"action\":", ErrorCode::InvalidJson, None),
            ("[1,2]", ErrorCode::InvalidRequest, None),
            ("\"setName\"", ErrorCode::InvalidRequest, None),
            ("{}", ErrorCode::UnknownAction, None),
            (r#"{"action":7}"#, ErrorCode::UnknownAction, None),
            (
                r#"{"action":"dance"}"#,
                ErrorCode::UnknownAction,
                Some("dance"),
            ),
            (
                r#"{"action":"SetName","name":"a"}"#,
                ErrorCode::UnknownAction,
                Some("SetName"),
            ),
            (
                r#"{"action":"setName"}"#,
                ErrorCode::MissingField,
                Some("setName"),
            ),
            (
                r#"{"action":"setName","name":null}"#,
                ErrorCode::MissingField,
                Some("setName"),
            ),
            (
                r#"{"action":"setName","name":5}"#,
                ErrorCode::InvalidField,
                Some("setName"),
            ),
            (
                r#"{"action":"sendPublic"}"#,
                ErrorCode::MissingField,
                Some("sendPublic"),
            ),
            (
                r#"{"action":"sendPublic","message":{"a":1}}"#,
                ErrorCode::InvalidField,
                Some("sendPublic"),
            ),
            (
                r#"{"action":"sendPrivate","message":"x"}"#,
                ErrorCode::MissingField,
                Some("sendPrivate"),
            ),
            (
                r#"{"action":"sendPrivate","to":["bob"],"message":"x"}"#,
                ErrorCode::InvalidField,
                Some("sendPrivate"),
            ),
        ];
        for (body, code, action) in cases {
            let r = refusal(body);
            assert_eq!(r.code, *code, "body {body:?}: {r:?}");
            assert_eq!(r.action.as_deref(), *action, "body {body:?}");
            assert!(!r.message.is_empty());
        }
    }

    #[test]
    fn history_requests_parse_with_defaults_and_bounds() {
        let parse = |b: &str| parse_request(Some(b));
        assert_eq!(
            parse(r#"{"action":"history"}"#),
            Ok(ClientRequest::History(HistoryRequest {
                room: "lobby".into(),
                limit: HISTORY_DEFAULT_LIMIT,
                direction: HistoryDirection::Before(None)
            }))
        );
        assert_eq!(
            parse(r#"{"action":"history","limit":5,"before":40}"#),
            Ok(ClientRequest::History(HistoryRequest {
                room: "lobby".into(),
                limit: 5,
                direction: HistoryDirection::Before(Some(40))
            }))
        );
        assert_eq!(
            parse(r#"{"action":"history","after":0}"#),
            Ok(ClientRequest::History(HistoryRequest {
                room: "lobby".into(),
                limit: HISTORY_DEFAULT_LIMIT,
                direction: HistoryDirection::After(0)
            }))
        );
        for bad in [
            r#"{"action":"history","limit":0}"#,
            r#"{"action":"history","limit":101}"#,
            r#"{"action":"history","limit":2.5}"#,
            r#"{"action":"history","after":-1}"#,
            r#"{"action":"history","after":"7"}"#,
            r#"{"action":"history","after":1,"before":9}"#,
            r#"{"action":"history","before":9007199254740992}"#,
        ] {
            let r = parse(bad).expect_err(bad);
            assert_eq!(r.code, ErrorCode::InvalidField, "{bad}");
            assert_eq!(r.action.as_deref(), Some("history"));
        }
    }

    #[test]
    fn deep_nesting_and_huge_numbers_are_refused_without_panicking() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(refusal(&deep).code, ErrorCode::InvalidJson);
        assert_eq!(
            refusal(r#"{"action":"sendPublic","message":1e999}"#).code,
            ErrorCode::InvalidJson
        );
    }

    #[test]
    fn error_frame_has_the_documented_shape() {
        let frame = Refusal::new(ErrorCode::NameTaken, "Taken.", Some("setName")).to_frame();
        let v: Value = serde_json::from_str(&frame).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"error":{"code":"name_taken","message":"Taken.","action":"setName"}})
        );
        let no_action = Refusal::new(ErrorCode::InvalidJson, "Bad.", None).to_frame();
        assert_eq!(
            no_action,
            r#"{"error":{"code":"invalid_json","message":"Bad."}}"#
        );
    }

    #[test]
    fn error_codes_serialise_as_their_documented_names() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).expect("json");
            assert_eq!(json, Value::String(code.as_str().to_owned()));
        }
    }

    #[test]
    fn chat_frames_keep_the_tutorial_keys_and_add_room_id_and_ts() {
        let cases = [
            (
                FrameBody::Members(vec!["alice".into(), "bob".into()]),
                r#"{"members":["alice","bob"]"#,
            ),
            (
                FrameBody::SystemMessage("alice has joined the chat".into()),
                r#"{"systemMessage":"alice has joined the chat""#,
            ),
            (
                FrameBody::PublicMessage("alice: hello".into()),
                r#"{"publicMessage":"alice: hello""#,
            ),
            (
                FrameBody::PrivateMessage("alice: psst".into()),
                r#"{"privateMessage":"alice: psst""#,
            ),
        ];
        for (body, prefix) in cases {
            let frame = Frame {
                body,
                room: Some("lobby".into()),
                id: Some(7),
                ts: Some(1_700_000_000_000),
            };
            let json = frame.to_json();
            assert!(json.starts_with(prefix), "{json}");
            assert!(
                json.ends_with(r#","room":"lobby","id":7,"ts":1700000000000}"#),
                "{json}"
            );
            let back: Frame = serde_json::from_str(&json).expect("round trip");
            assert_eq!(back, frame);
        }
        let bare = Frame {
            body: FrameBody::SystemMessage("x".into()),
            room: None,
            id: None,
            ts: None,
        };
        assert_eq!(bare.to_json(), r#"{"systemMessage":"x"}"#);
    }
}
