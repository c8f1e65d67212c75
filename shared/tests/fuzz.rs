//! Property tests ("fuzzing" on the stable toolchain, see docs/fuzzing.md): every input a client
//! or the stream can hand the chat, generated at random, must be answered without a panic and
//! exactly as the README's rules say.
//!
//! The number of cases per property comes from `PROPTEST_CASES` (proptest reads it; 256 when
//! unset, which is what CI runs, in seconds). A long run sets it higher, e.g.
//! `PROPTEST_CASES=150000 cargo test --release -p chat-shared --test fuzz` (docs/fuzzing.md).
//! Failures are not persisted to files: a failing case is printed, shrunk, with its seed.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use chat_shared::config::FanoutConfig;
use chat_shared::delivery::{Deliver, DeliveryError};
use chat_shared::events::{ChatEvent, EventItem, LeaveReason, StoredEvent};
use chat_shared::fanout::{decode_record, handle_stream_event};
use chat_shared::protocol::{
    parse_request, ClientRequest, ErrorCode, HistoryDirection, HistoryRequest, Refusal,
    HISTORY_DEFAULT_LIMIT, HISTORY_MAX_LIMIT,
};
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::ChatStore;
use chat_shared::validation::{name_key, validate_message, validate_name, NAME_MAX_CHARS};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_dynamo::AttributeValue;
use serde_json::{json, Map, Number, Value};

/// The README, whose error-code table is the public list of codes.
const README: &str = include_str!("../../README.md");

/// Ids stay below 2^53 (README, *Message history*).
const MAX_ID: u64 = (1 << 53) - 1;

// ---------------------------------------------------------------------------------------------
// The rules, written from the README (not from the code under test).
// ---------------------------------------------------------------------------------------------

type Expected<T = ClientRequest> = Result<T, (ErrorCode, Option<String>)>;

/// What the README says a frame must produce: the request, or the error code and the action
/// the error frame names ("present when it could be read").
fn rules(body: &str) -> Expected {
    if body.trim().is_empty() {
        return Err((ErrorCode::InvalidJson, None));
    }
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        return Err((ErrorCode::InvalidJson, None));
    };
    let Value::Object(object) = value else {
        return Err((ErrorCode::InvalidRequest, None));
    };
    let action = match object.get("action") {
        Some(Value::String(a)) => a.clone(),
        _ => return Err((ErrorCode::UnknownAction, None)),
    };
    let string = |key: &str| match object.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) => Err((ErrorCode::MissingField, Some(action.clone()))),
        Some(_) => Err((ErrorCode::InvalidField, Some(action.clone()))),
    };
    let room = |required: bool| match object.get("room") {
        None | Some(Value::Null) if !required => Ok("lobby".to_owned()),
        _ => {
            let room = string("room")?;
            if room_is_acceptable(&room) {
                Ok(room)
            } else {
                Err((ErrorCode::InvalidRoom, Some(action.clone())))
            }
        }
    };
    match action.as_str() {
        "setName" => Ok(ClientRequest::SetName {
            name: string("name")?,
        }),
        "sendPublic" => Ok(ClientRequest::SendPublic {
            message: string("message")?,
            room: room(false)?,
        }),
        "join" => Ok(ClientRequest::Join { room: room(true)? }),
        "leave" => Ok(ClientRequest::Leave { room: room(true)? }),
        "sendPrivate" => Ok(ClientRequest::SendPrivate {
            to: string("to")?,
            message: string("message")?,
        }),
        "history" => history_rules(&object).map(ClientRequest::History),
        _ => Err((ErrorCode::UnknownAction, Some(action))),
    }
}

fn history_rules(object: &Map<String, Value>) -> Expected<HistoryRequest> {
    let bad = || (ErrorCode::InvalidField, Some("history".to_owned()));
    let whole = |key: &str, min: u64, max: u64| match object.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    };
    let limit =
        whole("limit", 1, HISTORY_MAX_LIMIT as u64)?.map_or(HISTORY_DEFAULT_LIMIT, |l| l as usize);
    let before = whole("before", 0, MAX_ID)?;
    let after = whole("after", 0, MAX_ID)?;
    let direction = match (before, after) {
        (Some(_), Some(_)) => return Err(bad()),
        (_, Some(after)) => HistoryDirection::After(after),
        (before, None) => HistoryDirection::Before(before),
    };
    let room = match object.get("room") {
        None | Some(Value::Null) => "lobby".to_owned(),
        Some(Value::String(r)) if room_is_acceptable(r) => r.clone(),
        Some(Value::String(_)) => return Err((ErrorCode::InvalidRoom, Some("history".to_owned()))),
        Some(_) => return Err(bad()),
    };
    Ok(HistoryRequest {
        room,
        limit,
        direction,
    })
}

/// README *Rooms*: 1–64 characters, each an ASCII letter, digit, `-`, `_` or `.`.
fn room_is_acceptable(room: &str) -> bool {
    (1..=64).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// README *Rules*: trimmed, then 1–32 characters, no control characters, no bidi overrides
/// or isolates.
fn name_is_acceptable(raw: &str) -> bool {
    let t = raw.trim();
    let n = t.chars().count();
    (1..=NAME_MAX_CHARS).contains(&n)
        && !t
            .chars()
            .any(|c| c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}'))
        && !t.chars().all(|c| c.is_whitespace() || is_invisible(c))
        // The key becomes part of a DynamoDB sort key (README, Rules: at most 256 bytes).
        && name_key(t).len() <= 256
}

/// Format characters (general category Cf) and Hangul fillers: they draw nothing.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}'
        | '\u{FFA0}' | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E0FFF}')
}

// ---------------------------------------------------------------------------------------------
// Checks shared by the properties.
// ---------------------------------------------------------------------------------------------

/// A refusal is a documented code, a sentence for a person, and a valid error frame.
fn check_refusal(refusal: &Refusal) -> Result<(), TestCaseError> {
    let code = refusal.code.as_str();
    prop_assert!(
        README.contains(&format!("`{code}`")),
        "code {code} is not documented in the README"
    );
    prop_assert!(
        !refusal.message.trim().is_empty(),
        "empty message: {refusal:?}"
    );
    // Client-chosen text is cut short in the message, so any frame gives a short message.
    prop_assert!(
        refusal.message.chars().count() <= 200,
        "message too long: {refusal:?}"
    );
    let frame: Value = match serde_json::from_str(&refusal.to_frame()) {
        Ok(v) => v,
        Err(e) => return Err(TestCaseError::fail(format!("error frame is not JSON: {e}"))),
    };
    let mut expected = json!({"code": code, "message": refusal.message});
    if let Some(action) = &refusal.action {
        expected["action"] = json!(action);
    }
    prop_assert_eq!(frame, json!({ "error": expected }));
    Ok(())
}

/// `parse_request` on `body` never panics and agrees with the README's rules.
fn check_parse(body: &str) -> Result<(), TestCaseError> {
    let got = parse_request(Some(body));
    match (&got, rules(body)) {
        (Ok(request), Ok(expected)) => prop_assert_eq!(request, &expected, "body {:?}", body),
        (Err(refusal), Err((code, action))) => {
            prop_assert_eq!(refusal.code, code, "body {:?}: {:?}", body, refusal);
            prop_assert_eq!(&refusal.action, &action, "body {:?}", body);
            // Only the parse-level codes can come from a frame alone.
            prop_assert!(matches!(
                code,
                ErrorCode::InvalidJson
                    | ErrorCode::InvalidRequest
                    | ErrorCode::UnknownAction
                    | ErrorCode::MissingField
                    | ErrorCode::InvalidField
                    | ErrorCode::InvalidRoom
            ));
            check_refusal(refusal)?;
        }
        (got, expected) => prop_assert!(
            false,
            "body {:?}: parse_request gave {:?}, the rules say {:?}",
            body,
            got,
            expected
        ),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------------------

/// Characters that break naive text handling: whitespace of every kind, controls, bidi and
/// invisible format characters, combining marks, full-width and compatibility forms, letters
/// whose case mapping changes length, astral characters.
fn tricky_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => prop::char::range('a', 'z'),
        2 => prop::char::range('A', 'Z'),
        1 => prop::char::range('0', '9'),
        2 => prop::sample::select(vec![
            ' ', '\t', '\n', '\r', '\u{0B}', '\u{0C}', '\u{85}', '\u{A0}', '\u{1680}', '\u{2000}',
            '\u{2007}', '\u{2028}', '\u{2029}', '\u{202F}', '\u{205F}', '\u{3000}',
        ]),
        2 => prop::char::range('\u{0}', '\u{1F}'),
        1 => prop::sample::select(vec!['\u{7F}', '\u{80}', '\u{9F}']),
        2 => prop::char::range('\u{202A}', '\u{202E}'),
        2 => prop::char::range('\u{2066}', '\u{2069}'),
        2 => prop::sample::select(vec![
            '\u{200B}', '\u{200C}', '\u{200D}', '\u{200E}', '\u{200F}', '\u{2060}', '\u{FEFF}',
            '\u{AD}', '\u{61C}', '\u{3164}', '\u{E0041}',
        ]),
        2 => prop::char::range('\u{300}', '\u{36F}'),
        2 => prop::char::range('\u{FF01}', '\u{FF5E}'),
        2 => prop::sample::select(vec![
            'ß', 'ẞ', 'ς', 'σ', 'Σ', 'İ', 'ı', 'ﬁ', 'ǅ', 'K', 'Å', 'é', 'É', 'ſ', 'Ω', '①',
            '\u{1F642}', '\u{10FFFF}', '"', '\\', '{', '}', '[', ']', ':', ',',
        ]),
        2 => any::<char>(),
    ]
}

fn tricky_string(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::collection::vec(tricky_char(), 0..max).prop_map(String::from_iter),
        1 => any::<String>(),
    ]
}

/// Text that looks like JSON: brackets, quotes, escapes, numbers and keywords, shuffled.
fn json_like_text() -> impl Strategy<Value = String> {
    let token = prop::sample::select(vec![
        "{",
        "}",
        "[",
        "]",
        ":",
        ",",
        "\"",
        "\\",
        "\\u",
        "\\ud800",
        "\\udc00",
        "\\n",
        "\"action\"",
        "\"setName\"",
        "\"sendPublic\"",
        "\"sendPrivate\"",
        "\"history\"",
        "\"name\"",
        "\"message\"",
        "\"to\"",
        "\"limit\"",
        "\"after\"",
        "\"before\"",
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1e999",
        "2.5",
        "9007199254740993",
        " ",
        "\n",
        "\u{FEFF}",
        "x",
        "é",
    ]);
    prop::collection::vec(token, 0..40).prop_map(|tokens| tokens.concat())
}

fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "action", "name", "message", "to", "limit", "before", "after", "room",
        ])
        .prop_map(str::to_owned),
        1 => tricky_string(8),
    ]
}

fn action_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "setName", "sendPublic", "sendPrivate", "history", "join", "leave",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "SetName", "SENDPUBLIC", "sendprivate", "History", "", " setName", "setName ",
            "$default", "$connect", "sendPublic\u{0}",
        ])
        .prop_map(str::to_owned),
        1 => tricky_string(12),
    ]
}

fn json_number() -> impl Strategy<Value = Number> {
    prop_oneof![
        (0u64..200).prop_map(Number::from),
        any::<u64>().prop_map(Number::from),
        any::<i64>().prop_map(Number::from),
        Just(Number::from(MAX_ID)),
        Just(Number::from(MAX_ID + 1)),
        any::<f64>().prop_filter_map("finite", Number::from_f64),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number().prop_map(Value::Number),
        tricky_string(24).prop_map(Value::String),
        action_name().prop_map(Value::String),
    ]
}

/// Any JSON value, up to a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(json_key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An object with an `action` key and some of the keys the actions use.
fn request_like() -> impl Strategy<Value = Value> {
    (
        action_name(),
        prop::collection::btree_map(json_key(), json_value(), 0..5),
    )
        .prop_map(|(action, rest)| {
            let mut object: Map<String, Value> = rest.into_iter().collect();
            object.insert("action".into(), Value::String(action));
            Value::Object(object)
        })
}

/// A frame that the README says is valid.
fn valid_frame() -> impl Strategy<Value = Value> {
    let text = || tricky_string(40);
    prop_oneof![
        text().prop_map(|name| json!({"action": "setName", "name": name})),
        text().prop_map(|message| json!({"action": "sendPublic", "message": message})),
        (text(), room_name()).prop_map(
            |(message, room)| json!({"action": "sendPublic", "message": message, "room": room})
        ),
        room_name().prop_map(|room| json!({"action": "join", "room": room})),
        room_name().prop_map(|room| json!({"action": "leave", "room": room})),
        (text(), text()).prop_map(
            |(to, message)| json!({"action": "sendPrivate", "to": to, "message": message})
        ),
        (
            prop::option::of(1u64..=100),
            prop::option::of(0..=MAX_ID),
            any::<bool>()
        )
            .prop_map(|(limit, bound, after)| {
                let mut f = json!({"action": "history"});
                if after && bound.is_some_and(|b| b % 2 == 0) {
                    f["room"] = json!("ops");
                }
                if let Some(limit) = limit {
                    f["limit"] = json!(limit);
                }
                if let Some(bound) = bound {
                    f[if after { "after" } else { "before" }] = json!(bound);
                }
                f
            }),
    ]
}

/// A valid room name (mutations then make many invalid ones).
fn room_name() -> impl Strategy<Value = String> {
    prop_oneof![Just("lobby".to_owned()), "[A-Za-z0-9._-]{1,64}",]
}

/// One change to a valid frame.
#[derive(Debug, Clone)]
enum FrameMutation {
    RemoveKey(prop::sample::Index),
    ReplaceValue(prop::sample::Index, Value),
    AddKey(String, Value),
    FlipActionCase(prop::sample::Index),
    TruncateText(prop::sample::Index),
    InsertChar(prop::sample::Index, char),
    DeleteChar(prop::sample::Index),
    Wrap(bool),
}

fn frame_mutation() -> impl Strategy<Value = FrameMutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(FrameMutation::RemoveKey),
        (any::<prop::sample::Index>(), json_value())
            .prop_map(|(i, v)| FrameMutation::ReplaceValue(i, v)),
        (json_key(), json_value()).prop_map(|(k, v)| FrameMutation::AddKey(k, v)),
        any::<prop::sample::Index>().prop_map(FrameMutation::FlipActionCase),
        any::<prop::sample::Index>().prop_map(FrameMutation::TruncateText),
        (any::<prop::sample::Index>(), tricky_char())
            .prop_map(|(i, c)| FrameMutation::InsertChar(i, c)),
        any::<prop::sample::Index>().prop_map(FrameMutation::DeleteChar),
        any::<bool>().prop_map(FrameMutation::Wrap),
    ]
}

/// The frame's text after the mutation.
fn mutate(frame: &Value, mutation: &FrameMutation) -> String {
    let mut frame = frame.clone();
    let keys: Vec<String> = frame
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let text_edit = |edit: &dyn Fn(&mut Vec<char>)| {
        let mut chars: Vec<char> = frame.to_string().chars().collect();
        edit(&mut chars);
        String::from_iter(chars)
    };
    match mutation {
        FrameMutation::RemoveKey(i) => {
            if let Some(o) = frame.as_object_mut() {
                o.remove(&keys[i.index(keys.len())]);
            }
        }
        FrameMutation::ReplaceValue(i, v) => {
            frame[&keys[i.index(keys.len())]] = v.clone();
        }
        FrameMutation::AddKey(k, v) => frame[k] = v.clone(),
        FrameMutation::FlipActionCase(i) => {
            if let Some(Value::String(a)) = frame.get_mut("action") {
                let chars: Vec<char> = a.chars().collect();
                let at = i.index(chars.len().max(1));
                *a = chars
                    .iter()
                    .enumerate()
                    .map(|(n, c)| {
                        if n != at {
                            *c
                        } else if c.is_ascii_lowercase() {
                            c.to_ascii_uppercase()
                        } else {
                            c.to_ascii_lowercase()
                        }
                    })
                    .collect();
            }
        }
        FrameMutation::TruncateText(i) => {
            return text_edit(&|chars| chars.truncate(i.index(chars.len())));
        }
        FrameMutation::InsertChar(i, c) => {
            return text_edit(&|chars| chars.insert(i.index(chars.len() + 1), *c));
        }
        FrameMutation::DeleteChar(i) => {
            return text_edit(&|chars| {
                chars.remove(i.index(chars.len()));
            });
        }
        FrameMutation::Wrap(in_array) => {
            return if *in_array {
                format!("[{frame}]")
            } else {
                format!("{{\"frame\":{frame}}}")
            };
        }
    }
    frame.to_string()
}

/// Any DynamoDB attribute value, nested a little.
fn attribute_value() -> impl Strategy<Value = AttributeValue> {
    let number_text = prop_oneof![
        "-?[0-9]{1,22}(\\.[0-9]{1,4})?(e-?[0-9]{1,3})?",
        Just("18446744073709551616".to_owned()),
        Just("9223372036854775808".to_owned()),
        Just("-9223372036854775809".to_owned()),
        Just("NaN".to_owned()),
        Just("1e400".to_owned()),
        tricky_string(6),
    ];
    let leaf = prop_oneof![
        number_text.clone().prop_map(AttributeValue::N),
        tricky_string(16).prop_map(AttributeValue::S),
        prop::sample::select(vec![
            "ROOM#lobby",
            "ROOM#",
            "MemberJoined",
            "MemberRenamed",
            "MemberLeft",
            "MessagePosted",
            "PrivateMessageSent",
            "disconnected",
            "gone",
        ])
        .prop_map(|s| AttributeValue::S(s.to_owned())),
        any::<bool>().prop_map(AttributeValue::Bool),
        any::<bool>().prop_map(AttributeValue::Null),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(AttributeValue::B),
        prop::collection::vec(tricky_string(4), 0..3).prop_map(AttributeValue::Ss),
        prop::collection::vec(number_text, 0..3).prop_map(AttributeValue::Ns),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 0..4), 0..3)
            .prop_map(AttributeValue::Bs),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(AttributeValue::L),
            prop::collection::hash_map(attribute_name(), inner, 0..4).prop_map(AttributeValue::M),
        ]
    })
}

/// The event item's attribute names, and others.
fn attribute_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "pk", "seq", "type", "v", "ts", "expiresAt", "connectionId", "name", "oldName",
            "message", "toConnectionId", "toName", "reason", "identity", "toIdentity",
        ])
        .prop_map(str::to_owned),
        1 => tricky_string(8),
    ]
}

fn chat_event() -> impl Strategy<Value = ChatEvent> {
    let s = || tricky_string(12);
    prop_oneof![
        (s(), s()).prop_map(|(connection_id, name)| ChatEvent::MemberJoined {
            connection_id,
            name
        }),
        (s(), s(), s()).prop_map(|(connection_id, old_name, name)| ChatEvent::MemberRenamed {
            connection_id,
            old_name,
            name
        }),
        (s(), s(), any::<bool>()).prop_map(|(connection_id, name, gone)| ChatEvent::MemberLeft {
            connection_id,
            name,
            reason: if gone {
                LeaveReason::Gone
            } else {
                LeaveReason::Disconnected
            },
        }),
        (s(), s(), s()).prop_map(|(connection_id, name, message)| ChatEvent::MessagePosted {
            connection_id,
            name,
            message
        }),
        (
            (s(), s(), s(), s(), s()),
            prop::option::of(s()),
            prop::option::of(s())
        )
            .prop_map(
                |(
                    (connection_id, name, to_connection_id, to_name, message),
                    identity,
                    to_identity,
                )| {
                    ChatEvent::PrivateMessageSent {
                        connection_id,
                        name,
                        to_connection_id,
                        to_name,
                        message,
                        identity,
                        to_identity,
                    }
                }
            ),
    ]
}

fn stored_event() -> impl Strategy<Value = StoredEvent> {
    (tricky_string(8), any::<u64>(), any::<i64>(), chat_event()).prop_map(
        |(room, seq, ts, event)| StoredEvent {
            room,
            seq,
            ts,
            event,
        },
    )
}

/// The event table item of a stored event, as the stream's `NewImage` carries it.
fn image_of(stored: &StoredEvent, expires_at: i64) -> HashMap<String, AttributeValue> {
    serde_dynamo::to_item(EventItem::new(stored, expires_at)).expect("an event item serialises")
}

/// Whether DynamoDB could have produced this value: numbers that are numbers, `NULL` only ever
/// `true`. (serde_dynamo refuses the others even in attributes it ignores.)
fn well_formed(value: &AttributeValue) -> bool {
    let number = |n: &String| n.parse::<f64>().is_ok();
    match value {
        AttributeValue::N(n) => number(n),
        AttributeValue::Ns(ns) => ns.iter().all(number),
        AttributeValue::Null(is_null) => *is_null,
        AttributeValue::L(list) => list.iter().all(well_formed),
        AttributeValue::M(map) => map.values().all(well_formed),
        AttributeValue::S(_)
        | AttributeValue::Bool(_)
        | AttributeValue::B(_)
        | AttributeValue::Ss(_)
        | AttributeValue::Bs(_) => true,
    }
}

/// What an event item decodes to by the event table's rules (`keys.rs`: each attribute and its
/// type; `v` is 1; `pk` is `ROOM#<room>`; each event type's own attributes), written out here
/// rather than taken from the decoder: `None` when the item is not a chat event. Ids are `u64`
/// (README: below 2^53), times `i64` ms, the version `u32`; a `NULL` optional attribute is an
/// absent one; attributes the table does not define are ignored if DynamoDB could have
/// stored them.
fn event_by_the_rules(image: &HashMap<String, AttributeValue>) -> Option<StoredEvent> {
    use AttributeValue as A;
    if !image.values().all(well_formed) {
        return None;
    }
    // A string attribute: `Some(Some(s))`, `Some(None)` when absent, `None` when of another type.
    let text = |key: &str| match image.get(key) {
        None | Some(A::Null(true)) => Some(None),
        Some(A::S(s)) => Some(Some(s.clone())),
        Some(_) => None,
    };
    fn number<T: std::str::FromStr>(
        image: &HashMap<String, AttributeValue>,
        key: &str,
    ) -> Option<T> {
        match image.get(key) {
            Some(AttributeValue::N(n)) => n.parse().ok(),
            _ => None,
        }
    }
    let room = text("pk")??.strip_prefix("ROOM#")?.to_owned();
    let seq: u64 = number(image, "seq")?;
    let ts: i64 = number(image, "ts")?;
    let _expires_at: i64 = number(image, "expiresAt")?;
    if number::<u32>(image, "v")? != 1 {
        return None;
    }
    let kind = text("type")??;
    let connection_id = text("connectionId")??;
    let name = text("name")??;
    // Every attribute the table defines must have its type, whatever the event type.
    let old_name = text("oldName")?;
    let message = text("message")?;
    let to_connection_id = text("toConnectionId")?;
    let to_name = text("toName")?;
    let identity = text("identity")?;
    let to_identity = text("toIdentity")?;
    let reason = match image.get("reason") {
        None | Some(A::Null(true)) => None,
        Some(A::S(s)) => Some(match s.as_str() {
            "disconnected" => LeaveReason::Disconnected,
            "gone" => LeaveReason::Gone,
            "replaced" => LeaveReason::Replaced,
            _ => return None,
        }),
        Some(_) => return None,
    };
    let event = match kind.as_str() {
        "MemberJoined" => ChatEvent::MemberJoined {
            connection_id,
            name,
        },
        "MemberRenamed" => ChatEvent::MemberRenamed {
            connection_id,
            old_name: old_name?,
            name,
        },
        "MemberLeft" => ChatEvent::MemberLeft {
            connection_id,
            name,
            reason: reason?,
        },
        "MessagePosted" => ChatEvent::MessagePosted {
            connection_id,
            name,
            message: message?,
        },
        "PrivateMessageSent" => ChatEvent::PrivateMessageSent {
            connection_id,
            name,
            to_connection_id: to_connection_id?,
            to_name: to_name?,
            message: message?,
            identity,
            to_identity,
        },
        _ => return None,
    };
    Some(StoredEvent {
        room,
        seq,
        ts,
        event,
    })
}

/// The attributes an event of `kind` cannot do without (`keys.rs`).
fn required_attributes(kind: &str) -> Vec<&'static str> {
    let mut required = vec![
        "pk",
        "seq",
        "type",
        "v",
        "ts",
        "expiresAt",
        "connectionId",
        "name",
    ];
    required.extend(match kind {
        "MemberRenamed" => &["oldName"][..],
        "MemberLeft" => &["reason"][..],
        "MessagePosted" => &["message"][..],
        "PrivateMessageSent" => &["toConnectionId", "toName", "message"][..],
        _ => &[][..],
    });
    required
}

/// An image near a valid one: a real event's item with up to three attributes removed,
/// replaced by any value, or added — so that a good share of them still decode.
fn near_valid_image() -> impl Strategy<Value = HashMap<String, AttributeValue>> {
    (
        stored_event(),
        any::<i64>(),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                prop::option::of(attribute_value()),
                attribute_name(),
            ),
            0..3,
        ),
    )
        .prop_map(|(stored, expires_at, changes)| {
            let mut image = image_of(&stored, expires_at);
            for (i, value, extra) in changes {
                let mut keys: Vec<String> = image.keys().cloned().collect();
                keys.sort();
                let key = keys
                    .get(i.index(keys.len().max(1)))
                    .cloned()
                    .unwrap_or(extra);
                match value {
                    Some(v) => image.insert(key, v),
                    None => image.remove(&key),
                };
            }
            image
        })
}

/// One change to a valid event item.
#[derive(Debug, Clone)]
enum ItemMutation {
    Remove(prop::sample::Index),
    Replace(prop::sample::Index, AttributeValue),
    /// A string attribute sent as a number, or the other way round.
    WrongType(prop::sample::Index),
    Retype(String),
    /// An attribute this code does not know: must be ignored (items can gain attributes).
    Extra(String, AttributeValue),
}

fn item_mutation() -> impl Strategy<Value = ItemMutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(ItemMutation::Remove),
        (any::<prop::sample::Index>(), attribute_value())
            .prop_map(|(i, v)| ItemMutation::Replace(i, v)),
        any::<prop::sample::Index>().prop_map(ItemMutation::WrongType),
        prop_oneof![
            prop::sample::select(vec![
                "MemberJoined",
                "MemberRenamed",
                "MemberLeft",
                "MessagePosted",
                "PrivateMessageSent",
                "memberjoined",
                "",
            ])
            .prop_map(str::to_owned),
            tricky_string(6),
        ]
        .prop_map(ItemMutation::Retype),
        ("x[A-Za-z]{0,6}", attribute_value()).prop_map(|(k, v)| ItemMutation::Extra(k, v)),
    ]
}

fn record_with_image(
    image: HashMap<String, AttributeValue>,
    name: &str,
    seq: usize,
) -> EventRecord {
    let mut record = EventRecord::default();
    record.event_name = name.to_owned();
    record.event_id = format!("event-{seq}");
    record.change.sequence_number = Some(format!("{:021}", seq + 1));
    record.change.new_image = image.into();
    record
}

/// One record of a fuzzed stream batch.
#[derive(Debug, Clone)]
enum BatchRecord {
    Valid(StoredEvent),
    Mutated(StoredEvent, ItemMutation),
    Arbitrary(HashMap<String, AttributeValue>),
    Removal(StoredEvent),
    Empty,
}

/// A stored event of the fan-out property's room (lobby, where its members are), of another
/// room (no members), or of any room.
fn batch_event() -> impl Strategy<Value = StoredEvent> {
    (stored_event(), 0..4u8).prop_map(|(mut e, pick)| {
        match pick {
            0 | 1 => e.room = "lobby".into(),
            2 => e.room = "ops".into(),
            _ => {}
        }
        e
    })
}

fn batch_record() -> impl Strategy<Value = BatchRecord> {
    prop_oneof![
        3 => batch_event().prop_map(BatchRecord::Valid),
        2 => (batch_event(), item_mutation()).prop_map(|(e, m)| BatchRecord::Mutated(e, m)),
        1 => prop::collection::hash_map(attribute_name(), attribute_value(), 0..8)
            .prop_map(BatchRecord::Arbitrary),
        1 => batch_event().prop_map(BatchRecord::Removal),
        1 => Just(BatchRecord::Empty),
    ]
}

fn apply_item_mutation(
    mut image: HashMap<String, AttributeValue>,
    mutation: &ItemMutation,
) -> HashMap<String, AttributeValue> {
    let mut keys: Vec<String> = image.keys().cloned().collect();
    keys.sort();
    let pick = |i: &prop::sample::Index| keys[i.index(keys.len())].clone();
    match mutation {
        ItemMutation::Remove(i) => {
            image.remove(&pick(i));
        }
        ItemMutation::Replace(i, v) => {
            image.insert(pick(i), v.clone());
        }
        ItemMutation::WrongType(i) => {
            let key = pick(i);
            let swapped = match image.remove(&key) {
                Some(AttributeValue::S(s)) => AttributeValue::N(s),
                Some(AttributeValue::N(n)) => AttributeValue::S(n),
                Some(other) => AttributeValue::L(vec![other]),
                None => AttributeValue::Null(true),
            };
            image.insert(key, swapped);
        }
        ItemMutation::Retype(kind) => {
            image.insert("type".into(), AttributeValue::S(kind.clone()));
        }
        ItemMutation::Extra(k, v) => {
            image.insert(k.clone(), v.clone());
        }
    }
    image
}

/// The members of the fan-out property's room, `(connection id, name)`, and how their
/// `@connections` behaves: ann's accepts everything, bea's fails every frame's first attempt
/// with a 5xx (retried), cid's refuses everything with 403 (reported, not retried), dan's
/// answers 410 (pruned). Any other connection (a private message's recipient) accepts.
const ROOM: [(&str, &str); 4] = [("m0", "ann"), ("m1", "bea"), ("m2", "cid"), ("m3", "dan")];
const FLAKY: &str = "m1";
const REFUSING: &str = "m2";
const GONE: &str = "m3";

/// A `Deliver` with the failures of [`ROOM`], remembering what it accepted.
#[derive(Default)]
struct Endpoint {
    delivered: Mutex<Vec<(String, Value)>>,
    attempts: Mutex<HashMap<(String, Vec<u8>), usize>>,
}

#[async_trait]
impl Deliver for Endpoint {
    async fn post(&self, connection_id: &str, data: &[u8]) -> Result<(), DeliveryError> {
        let attempt = {
            let mut attempts = self.attempts.lock().expect("attempts lock");
            let n = attempts
                .entry((connection_id.to_owned(), data.to_vec()))
                .or_default();
            *n += 1;
            *n
        };
        match connection_id {
            FLAKY if attempt == 1 => Err(DeliveryError::Transient("injected 500".into())),
            REFUSING => Err(DeliveryError::Forbidden("injected 403".into())),
            GONE => Err(DeliveryError::Gone),
            _ => {
                let frame = serde_json::from_slice(data).expect("frames are JSON");
                self.delivered
                    .lock()
                    .expect("delivered lock")
                    .push((connection_id.to_owned(), frame));
                Ok(())
            }
        }
    }
}

/// A frame a recipient must get: its id and key, and its whole body when it is known (the
/// summary of several presence changes is only checked to be a `systemMessage`).
#[derive(Debug, Clone, PartialEq)]
struct ExpectedFrame {
    id: u64,
    key: &'static str,
    body: Option<Value>,
}

/// What each recipient must receive for `events` (the decodable records of a batch, in
/// order), worked out from the README's rules: a message to every member, a private one to its
/// recipient, a run of consecutive joins, renames and leaves as one `members` list (the run's
/// last id) and one `systemMessage` per change (its own id: the frame history serves; the
/// tutorial's two frames, in its order, for a single change) to every member. Members are read when each unit is sent: dan is gone after the first unit sent to
/// him; cid and dan never receive anything.
fn expected_deliveries(events: &[StoredEvent]) -> HashMap<String, Vec<ExpectedFrame>> {
    let mut members: Vec<(&str, &str)> = ROOM.to_vec();
    let mut expected: HashMap<String, Vec<ExpectedFrame>> = HashMap::new();
    let mut units: Vec<Vec<&StoredEvent>> = Vec::new();
    // README: consecutive presence changes of one room are one unit.
    for event in events {
        let presence = event.event.changes_membership();
        match units.last_mut() {
            Some(run)
                if presence && run[0].event.changes_membership() && run[0].room == event.room =>
            {
                run.push(event)
            }
            _ => units.push(vec![event]),
        }
    }
    // A room's units of one batch go out together (chat_shared::batching): the member list
    // is read once, before them, so a member pruned on the way leaves the lists after them.
    let mut groups: Vec<Vec<Vec<&StoredEvent>>> = Vec::new();
    for unit in units {
        match groups.iter_mut().find(|g| g[0][0].room == unit[0].room) {
            Some(group) => group.push(unit),
            None => groups.push(vec![unit]),
        }
    }
    for group in groups {
        let mut pruned = false;
        for unit in group {
            let last = unit[unit.len() - 1];
            // README: an event of a room goes to that room's members; only lobby has members here.
            let room_members: Vec<String> = if last.room == "lobby" {
                members.iter().map(|(id, _)| (*id).to_owned()).collect()
            } else {
                Vec::new()
            };
            let private = matches!(last.event, ChatEvent::PrivateMessageSent { .. });
            let frame = |key: &'static str, body: Option<Value>| ExpectedFrame {
                id: last.seq,
                key,
                body: body.map(|mut b| {
                    // Every room-scoped frame carries its room; a private message none.
                    if !private {
                        b["room"] = json!(last.room);
                    }
                    b["id"] = json!(last.seq);
                    b["ts"] = json!(last.ts);
                    b
                }),
            };
            let (recipients, frames): (Vec<String>, Vec<ExpectedFrame>) = match &last.event {
                ChatEvent::MessagePosted { name, message, .. } => (
                    room_members,
                    vec![frame(
                        "publicMessage",
                        Some(json!({ "publicMessage": format!("{name}: {message}") })),
                    )],
                ),
                ChatEvent::PrivateMessageSent {
                    to_connection_id,
                    name,
                    message,
                    ..
                } => (
                    vec![to_connection_id.clone()],
                    vec![frame(
                        "privateMessage",
                        Some(json!({ "privateMessage": format!("{name}: {message}") })),
                    )],
                ),
                _ => {
                    let mut names: Vec<&str> = members.iter().map(|(_, n)| *n).collect();
                    names.sort_by_key(|n| n.to_lowercase());
                    let list = frame("members", Some(json!({ "members": names })));
                    // crate::presence: each change its own systemMessage (its own id and ts, the
                    // text history serves), one list per run with the run's last id.
                    let said: Vec<ExpectedFrame> = unit
                        .iter()
                        .map(|e| {
                            let text = match &e.event {
                                ChatEvent::MemberJoined { name, .. } => {
                                    format!("{name} has joined the chat")
                                }
                                ChatEvent::MemberLeft { name, .. } => {
                                    format!("{name} has left the chat")
                                }
                                ChatEvent::MemberRenamed { old_name, name, .. } => {
                                    format!("{old_name} is now known as {name}")
                                }
                                other => panic!("not a presence change: {other:?}"),
                            };
                            ExpectedFrame {
                                id: e.seq,
                                key: "systemMessage",
                                body: Some(json!({
                                    "systemMessage": text,
                                    "room": e.room,
                                    "id": e.seq,
                                    "ts": e.ts,
                                })),
                            }
                        })
                        .collect();
                    let only_leaves = unit
                        .iter()
                        .all(|e| matches!(e.event, ChatEvent::MemberLeft { .. }));
                    (
                        room_members,
                        if only_leaves {
                            said.into_iter().chain([list]).collect()
                        } else {
                            [list].into_iter().chain(said).collect()
                        },
                    )
                }
            };
            for recipient in recipients {
                if recipient == GONE {
                    pruned = true;
                } else if recipient != REFUSING {
                    expected
                        .entry(recipient)
                        .or_default()
                        .extend(frames.iter().cloned());
                }
            }
        }
        if pruned {
            members.retain(|(id, _)| *id != GONE);
        }
    }
    expected
}

// ---------------------------------------------------------------------------------------------
// The properties.
// ---------------------------------------------------------------------------------------------

proptest! {
    // Cases from PROPTEST_CASES (ProptestConfig::default() reads it); no regression files are
    // written into the source tree.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn parse_request_on_arbitrary_text(body in prop_oneof![
        any::<String>(),
        tricky_string(64),
        json_like_text(),
    ]) {
        // GIVEN any text  WHEN parsed  THEN no panic, and the README's answer
        check_parse(&body)?;
    }

    #[test]
    fn parse_request_on_arbitrary_json(value in prop_oneof![json_value(), request_like()]) {
        // GIVEN any JSON value, or an object with an action and random keys
        // WHEN parsed  THEN no panic, and the README's answer
        check_parse(&value.to_string())?;
    }

    #[test]
    fn parse_request_on_near_valid_frames(
        frame in valid_frame(),
        mutation in frame_mutation(),
        nesting in 0usize..3,
    ) {
        // GIVEN a valid frame, which parses to exactly what it says
        check_parse(&frame.to_string())?;
        prop_assert!(parse_request(Some(&frame.to_string())).is_ok(), "{}", frame);
        // WHEN one thing about it is wrong (and perhaps it is nested deep)
        let mut body = mutate(&frame, &mutation);
        if nesting == 2 {
            body = format!("{}{body}{}", "[".repeat(130), "]".repeat(130));
        }
        // THEN no panic, and the README's answer
        check_parse(&body)?;
    }

    #[test]
    fn validate_name_on_arbitrary_unicode(raw in tricky_string(40)) {
        // GIVEN any text as a name  WHEN validated
        match validate_name(&raw) {
            Ok(name) => {
                // THEN an accepted name meets every rule, shown trimmed, keyed by NFKC + case
                prop_assert!(name_is_acceptable(&raw), "accepted {:?}", raw);
                prop_assert_eq!(&name.display, raw.trim());
                prop_assert_eq!(&name.key, &name_key(&name.display));
                // AND validating is idempotent and ignores padding
                prop_assert_eq!(&validate_name(&name.display), &Ok(name.clone()));
                prop_assert_eq!(validate_name(&format!(" \t{}\u{3000}", name.display)), Ok(name.clone()));
                // AND names differing only in ASCII case claim one name
                if let Ok(upper) = validate_name(&name.display.to_ascii_uppercase()) {
                    prop_assert_eq!(&upper.key, &name.key, "{:?}", raw);
                }
            }
            Err(refusal) => {
                // THEN a refused name breaks a rule and gets invalid_name for setName
                prop_assert!(!name_is_acceptable(&raw), "refused {:?}: {:?}", raw, refusal);
                prop_assert_eq!(refusal.code, ErrorCode::InvalidName);
                prop_assert_eq!(refusal.action.as_deref(), Some("setName"));
                check_refusal(&refusal)?;
            }
        }
    }

    #[test]
    fn validate_message_on_arbitrary_unicode(
        raw in prop_oneof![
            tricky_string(64),
            any::<String>(),
            (1usize..3000).prop_map(|n| "é".repeat(n)),
        ],
        max in prop_oneof![Just(4096usize), 1usize..9000],
        private in any::<bool>(),
    ) {
        // GIVEN any text as a message  WHEN validated against a byte limit
        let action = if private { "sendPrivate" } else { "sendPublic" };
        let result = validate_message(&raw, max, action);
        // THEN it is accepted exactly when it has a non-blank character and fits in the bytes
        let want = if raw.trim().is_empty() {
            Some(ErrorCode::InvalidMessage)
        } else if raw.len() > max {
            Some(ErrorCode::MessageTooLarge)
        } else {
            None
        };
        match result {
            Ok(()) => prop_assert_eq!(want, None, "accepted {:?}", raw),
            Err(refusal) => {
                prop_assert_eq!(Some(refusal.code), want, "{:?}", raw);
                prop_assert_eq!(refusal.action.as_deref(), Some(action));
                check_refusal(&refusal)?;
            }
        }
    }

    #[test]
    fn decode_record_on_arbitrary_images(
        image in prop_oneof![
            prop::collection::hash_map(attribute_name(), attribute_value(), 0..10),
            near_valid_image(),
        ],
        name in prop::sample::select(vec!["INSERT", "MODIFY", "REMOVE", ""]),
    ) {
        // GIVEN a stream record whose new image is any set of attributes, or a real event's
        // item with a few attributes removed, replaced or added
        let record = record_with_image(image.clone(), name, 0);
        // WHEN decoded
        let decoded = decode_record(&record);
        // THEN no panic, and it decodes exactly when the table's rules say it is an event,
        // to exactly the event they say
        let by_the_rules = event_by_the_rules(&image);
        prop_assert_eq!(decoded.as_ref().ok(), by_the_rules.as_ref(), "{:?}", image);
        // AND whatever decodes re-encodes to an item that decodes the same
        if let Ok(stored) = decoded {
            let again = record_with_image(image_of(&stored, 0), "INSERT", 1);
            prop_assert_eq!(decode_record(&again).ok(), Some(stored));
        }
    }

    #[test]
    fn decode_record_on_near_valid_items(
        stored in stored_event(),
        expires_at in any::<i64>(),
        mutation in item_mutation(),
    ) {
        // GIVEN the item of a real event, which decodes to exactly that event
        let image = image_of(&stored, expires_at);
        let valid = record_with_image(image.clone(), "INSERT", 0);
        prop_assert_eq!(decode_record(&valid).ok(), Some(stored.clone()));
        // WHEN one attribute is missing, of the wrong type, replaced, the type changed, or an
        // attribute added
        let mutated_image = apply_item_mutation(image.clone(), &mutation);
        let mutated = record_with_image(mutated_image.clone(), "INSERT", 1);
        let decoded = decode_record(&mutated);
        // THEN it decodes exactly as the table's rules say
        let by_the_rules = event_by_the_rules(&mutated_image);
        prop_assert_eq!(decoded.as_ref().ok(), by_the_rules.as_ref(), "{:?}", mutation);
        // AND in particular: a required attribute removed or given the wrong type, or an
        // unknown type, is never an event (no default fills the gap)
        let mut keys: Vec<String> = image.keys().cloned().collect();
        keys.sort();
        let required = required_attributes(stored.event.type_name());
        match &mutation {
            ItemMutation::Remove(i) | ItemMutation::WrongType(i)
                if required.contains(&keys[i.index(keys.len())].as_str()) =>
            {
                prop_assert!(decoded.is_err(), "{:?} on {:?} decoded", mutation, keys[i.index(keys.len())]);
            }
            ItemMutation::Retype(kind)
                if !matches!(
                    kind.as_str(),
                    "MemberJoined" | "MemberRenamed" | "MemberLeft" | "MessagePosted" | "PrivateMessageSent"
                ) =>
            {
                prop_assert!(decoded.is_err(), "type {:?} decoded", kind);
            }
            // AND an unknown, well-formed extra attribute changes nothing
            ItemMutation::Extra(key, value)
                if well_formed(value) && !image.contains_key(key) =>
            {
                prop_assert_eq!(decoded.ok(), Some(stored));
            }
            _ => {}
        }
    }

    #[test]
    fn the_fanout_skips_what_it_cannot_decode_and_delivers_the_rest(
        batch in prop::collection::vec(batch_record(), 0..12),
    ) {
        // GIVEN a room of four members — one whose endpoint fails each first attempt, one that
        // refuses with 403, one that is gone (410) — and a batch mixing valid events, poison
        // items and removals
        let images: Vec<(HashMap<String, AttributeValue>, &str)> = batch
            .iter()
            .map(|r| match r {
                BatchRecord::Valid(e) => (image_of(e, 0), "INSERT"),
                BatchRecord::Mutated(e, m) => (apply_item_mutation(image_of(e, 0), m), "INSERT"),
                BatchRecord::Arbitrary(image) => (image.clone(), "INSERT"),
                BatchRecord::Removal(e) => (image_of(e, 0), "REMOVE"),
                BatchRecord::Empty => (HashMap::new(), "INSERT"),
            })
            .collect();
        // What must be delivered comes from the generated items and the table's rules, not
        // from the decoder under test.
        let events: Vec<StoredEvent> = images
            .iter()
            .filter(|(_, name)| *name != "REMOVE")
            .filter_map(|(image, _)| event_by_the_rules(image))
            .collect();
        let expected = expected_deliveries(&events);
        let mut event = Event::default();
        event.records = images
            .into_iter()
            .enumerate()
            .map(|(i, (image, name))| record_with_image(image, name, i))
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let now = 1_700_000_000_000;
        let store = EmbeddedStore::new(chat_shared::config::Retention::default());
        runtime.block_on(async {
            for (id, name) in ROOM {
                store.add_connection(id, now).await.expect("connect");
                store
                    .set_name(id, &validate_name(name).expect("name"), now)
                    .await
                    .expect("join");
            }
        });
        let endpoint = Endpoint::default();
        let config = FanoutConfig {
            base_backoff: std::time::Duration::ZERO,
            ..FanoutConfig::default()
        };
        // WHEN the fan-out handles it
        let response = runtime.block_on(handle_stream_event(
            &store, &endpoint, &config, event, || now, None,
        ));
        // THEN nothing is reported failed (poison is skipped, a 5xx retried, a 403 reported,
        // a 410 pruned — none is for Lambda to retry)
        prop_assert!(response.batch_item_failures.is_empty(), "{:?}", response);
        // AND each recipient got exactly its frames, in order, each once
        let delivered = endpoint.delivered.lock().expect("delivered lock").clone();
        let mut got: HashMap<String, Vec<Value>> = HashMap::new();
        for (id, frame) in delivered {
            got.entry(id).or_default().push(frame);
        }
        let recipients: std::collections::BTreeSet<&String> =
            got.keys().chain(expected.keys()).collect();
        for id in recipients {
            let frames = got.get(id).cloned().unwrap_or_default();
            let want = expected.get(id).cloned().unwrap_or_default();
            prop_assert_eq!(frames.len(), want.len(), "{}: got {:?}, want {:?}", id, frames, want);
            for (frame, want) in frames.iter().zip(&want) {
                prop_assert_eq!(frame["id"].as_u64(), Some(want.id), "{}: {:?}", id, frame);
                prop_assert!(frame.get(want.key).is_some(), "{}: {:?} is not a {}", id, frame, want.key);
                if let Some(body) = &want.body {
                    prop_assert_eq!(frame, body, "{}", id);
                }
            }
        }
        // AND the gone member was pruned if anything was sent to it, and only then
        let sent_to_gone = endpoint
            .attempts
            .lock()
            .expect("attempts lock")
            .keys()
            .any(|(id, _)| id == GONE);
        let still_there = runtime
            .block_on(store.connection(GONE, now))
            .expect("read")
            .is_some();
        prop_assert_eq!(still_there, !sent_to_gone);
    }
}

#[test]
fn a_missing_body_is_invalid_json() {
    // GIVEN a MESSAGE event without a body  WHEN parsed  THEN invalid_json
    let refusal = parse_request(None).expect_err("refused");
    assert_eq!(refusal.code, ErrorCode::InvalidJson);
    assert_eq!(refusal.action, None);
}

#[test]
fn deep_nesting_and_huge_numbers_follow_the_rules() {
    // GIVEN frames nested around the depth limit, and numbers past f64's range
    for depth in [1, 100, 127, 128, 129, 10_000] {
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        check_parse(&body).expect("nested arrays");
        let body = format!(
            r#"{{"action":"sendPublic","message":{}"x"{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        check_parse(&body).expect("nested message");
    }
    for number in ["1e999", "-1e999", &"9".repeat(400), "1e308", "5.0", "-0"] {
        check_parse(&format!(r#"{{"action":"history","limit":{number}}}"#)).expect(number);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn accepted_names_have_a_visible_character(raw in tricky_string(12)) {
        // GIVEN any name that is accepted
        if let Ok(name) = validate_name(&raw) {
            // THEN it draws something ("at least one visible character")
            prop_assert!(
                name.display.chars().any(|c| !c.is_whitespace() && !is_invisible(c)),
                "accepted an invisible name {:?}", name.display
            );
        }
    }

    #[test]
    fn names_differing_only_in_case_claim_one_name(raw in tricky_string(12)) {
        // GIVEN an accepted name, and the same name upper-cased — where upper-casing loses no
        // letter: the Turkish dotless ı upper-cases to I, yet is a different letter from i, and
        // Unicode's case folding (which the key follows) keeps them apart.
        let round_trips = raw.to_uppercase().to_lowercase() == raw.to_lowercase();
        if let (true, Ok(name), Ok(upper)) = (round_trips, validate_name(&raw), validate_name(&raw.to_uppercase())) {
            // THEN both claim the same key
            prop_assert_eq!(&upper.key, &name.key, "{:?} vs {:?}", name.display, upper.display);
        }
    }
}

#[test]
fn a_zero_width_character_does_not_make_a_new_name() {
    // GIVEN "bob" is a name  WHEN someone asks for "bob" with an invisible character in it
    for lookalike in ["bob\u{200B}", "b\u{2060}ob", "\u{FEFF}bob", "bo\u{00AD}b"] {
        // THEN it is refused, or it claims the same name as "bob"
        if let Ok(name) = validate_name(lookalike) {
            assert_eq!(
                name.key,
                name_key("bob"),
                "{lookalike:?} renders as \"bob\""
            );
        }
    }
}

#[test]
fn names_in_full_upper_case_claim_the_same_name() {
    // GIVEN names whose upper case is longer than they are
    for name in ["Straße", "ῷ", "ﬅ"] {
        let upper = name.to_uppercase();
        // WHEN both are keyed  THEN they claim one name
        assert_eq!(name_key(name), name_key(&upper), "{name} / {upper}");
    }
}
