//! Property tests ("fuzzing" on the stable toolchain, see docs/fuzzing.md): every input a client
//! or the stream can hand the chat, generated at random, must be answered without a panic and
//! exactly as the README's rules say.
//!
//! The number of cases per property comes from `PROPTEST_CASES` (proptest reads it; 256 when
//! unset, so CI runs this file in seconds). The long run:
//! `PROPTEST_CASES=150000 cargo test --release -p chat-shared --test fuzz` (8 properties:
//! 1.2 million inputs).
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
    match action.as_str() {
        "setName" => Ok(ClientRequest::SetName {
            name: string("name")?,
        }),
        "sendPublic" => Ok(ClientRequest::SendPublic {
            message: string("message")?,
        }),
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
    Ok(HistoryRequest { limit, direction })
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
        && !t.chars().any(|c| c.is_control() || is_bidi_control(c))
        && !t.chars().all(|c| c.is_whitespace() || is_invisible(c))
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
            "action", "name", "message", "to", "limit", "before", "after",
        ])
        .prop_map(str::to_owned),
        1 => tricky_string(8),
    ]
}

fn action_name() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["setName", "sendPublic", "sendPrivate", "history"])
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

fn batch_record() -> impl Strategy<Value = BatchRecord> {
    prop_oneof![
        3 => stored_event().prop_map(BatchRecord::Valid),
        2 => (stored_event(), item_mutation()).prop_map(|(e, m)| BatchRecord::Mutated(e, m)),
        1 => prop::collection::hash_map(attribute_name(), attribute_value(), 0..8)
            .prop_map(BatchRecord::Arbitrary),
        1 => stored_event().prop_map(BatchRecord::Removal),
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

/// A `Deliver` that accepts every frame and remembers it.
#[derive(Default)]
struct Recorder {
    posts: Mutex<Vec<(String, Vec<u8>)>>,
}

#[async_trait]
impl Deliver for Recorder {
    async fn post(&self, connection_id: &str, data: &[u8]) -> Result<(), DeliveryError> {
        self.posts
            .lock()
            .expect("recorder lock")
            .push((connection_id.to_owned(), data.to_vec()));
        Ok(())
    }
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
        image in prop::collection::hash_map(attribute_name(), attribute_value(), 0..10),
        name in prop::sample::select(vec!["INSERT", "MODIFY", "REMOVE", ""]),
    ) {
        // GIVEN a stream record whose new image is any set of attributes
        let record = record_with_image(image, name, 0);
        // WHEN decoded  THEN no panic; whatever decodes re-encodes to an item that decodes the same
        if let Ok(stored) = decode_record(&record) {
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
        // WHEN one attribute is missing, of the wrong type, or replaced
        let mutated = record_with_image(apply_item_mutation(image, &mutation), "INSERT", 1);
        // THEN decoding does not panic, and an unknown extra attribute changes nothing
        let decoded = decode_record(&mutated);
        if let ItemMutation::Extra(key, value) = &mutation {
            if well_formed(value)
                && !matches!(key.as_str(), "pk" | "seq" | "type" | "v" | "ts" | "expiresAt")
            {
                prop_assert_eq!(decoded.ok(), Some(stored));
            }
        }
    }

    #[test]
    fn the_fanout_skips_what_it_cannot_decode_and_delivers_the_rest(
        batch in prop::collection::vec(batch_record(), 0..12),
    ) {
        // GIVEN a batch mixing valid events, poison items and removals, and an empty room
        let records: Vec<EventRecord> = batch
            .iter()
            .enumerate()
            .map(|(i, r)| match r {
                BatchRecord::Valid(e) => record_with_image(image_of(e, 0), "INSERT", i),
                BatchRecord::Mutated(e, m) => {
                    record_with_image(apply_item_mutation(image_of(e, 0), m), "INSERT", i)
                }
                BatchRecord::Arbitrary(image) => record_with_image(image.clone(), "INSERT", i),
                BatchRecord::Removal(e) => record_with_image(image_of(e, 0), "REMOVE", i),
                BatchRecord::Empty => record_with_image(HashMap::new(), "INSERT", i),
            })
            .collect();
        let expected_private: Vec<(String, Vec<u8>)> = records
            .iter()
            .filter(|r| r.event_name != "REMOVE")
            .filter_map(|r| decode_record(r).ok())
            .filter_map(|e| match &e.event {
                ChatEvent::PrivateMessageSent { to_connection_id, .. } => Some((
                    to_connection_id.clone(),
                    e.message_frame().to_json().into_bytes(),
                )),
                _ => None,
            })
            .collect();
        let mut event = Event::default();
        event.records = records;
        let store = EmbeddedStore::new(chat_shared::config::Retention::default());
        let recorder = Recorder::default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        // WHEN the fan-out handles it
        let response = runtime.block_on(handle_stream_event(
            &store,
            &recorder,
            &FanoutConfig::default(),
            event,
            || 1_700_000_000_000,
            None,
        ));
        // THEN nothing is reported failed (poison is skipped, not retried forever) and every
        // decodable private message reached its recipient, in stream order
        prop_assert!(response.batch_item_failures.is_empty(), "{:?}", response);
        let posts = recorder.posts.lock().expect("recorder lock").clone();
        prop_assert_eq!(posts, expected_private);
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
