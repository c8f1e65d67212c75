//! The `history` route: pages of one room's public history, framed exactly like live frames
//! (each with its `room`), in one route response under API Gateway's 128 KB message limit.
//! Any known connection may read any room's history; membership is not needed.
//!
//! The response is one frame (a route response is one WebSocket message):
//!
//! ```json
//! {"history":{"frames":[{"publicMessage":"alice: hi","room":"lobby","id":41,"ts":…}, …],
//!             "next":{"action":"history","room":"lobby","after":57,"limit":50}}}
//! ```
//!
//! `frames` are in id order (oldest first) whichever way the request pages; `next` is the
//! request that continues (absent when there is nothing more). Public history is every
//! `publicMessage` and every join/leave/rename `systemMessage`; `members` frames are state, not
//! history.
//!
//! Private messages are logged in `lobby` (not room-scoped), so only `lobby`'s history has
//! them. A private message is served only to its two parties: when the reader's connection is
//! authenticated and its identity is the sender's or the recipient's identity recorded with
//! the message. A name is not an identity (a later user could take a departed user's name),
//! so without authentication private messages are never served. The frame is the live one
//! plus `to`, so the sender's own messages say whom they went to:
//! `{"privateMessage":"alice: psst","to":"bob","id":42,"ts":…}`.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::events::{ChatEvent, StoredEvent};
use crate::protocol::{HistoryDirection, HistoryRequest};
use crate::store::{ChatStore, EventRange, StoreError};

/// The most frame bytes in one response: API Gateway's 128 KB message limit less room for the
/// envelope. A single chat frame (messages are at most 16 KB, template.yaml) always fits.
pub const HISTORY_MAX_BYTES: usize = 120 * 1024;
/// What the response adds around its frames (`{"history":{"frames":[…],"next":{…}}}`, with
/// the longest `next`): kept out of the frames' budget so the whole message stays under
/// [`HISTORY_MAX_BYTES`].
/// With a 64-character room in `next` the envelope is about 170 bytes.
const ENVELOPE_BYTES: usize = 256;

/// How many stored events one `history` request may examine, per frame asked for. A reader
/// sees only some events (not others' private messages), so "read until `limit` frames" is
/// unbounded: behind a run of 100,000 private messages, `{"after":0,"limit":1}` would read
/// them all. Past the cap the response carries what was found (possibly nothing) and a `next`
/// that resumes after the last event examined.
pub const HISTORY_EXAMINE_PER_FRAME: usize = 10;
/// The least a request may examine, so a small `limit` still gets through short private runs.
pub const HISTORY_EXAMINE_MIN: usize = 100;
/// The most events asked of the store in one read.
const HISTORY_READ_MAX: usize = 100;

#[derive(Serialize)]
struct Next<'a> {
    action: &'static str,
    room: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<u64>,
    limit: usize,
}

#[derive(Serialize)]
struct Page<'a> {
    frames: Vec<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<Next<'a>>,
    /// The request's `requestId`, echoed (at most 64 characters: within `ENVELOPE_BYTES`).
    #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
}

#[derive(Serialize)]
struct Response<'a> {
    history: Page<'a>,
}

/// A private message as history serves it: the live frame plus its recipient.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PrivateFrame<'a> {
    private_message: String,
    to: &'a str,
    id: u64,
    ts: i64,
}

/// The frame `reader` (the authenticated identity of the connection asking, if any) sees for
/// an event, or `None` if it is not history `reader` may read.
pub fn history_frame(event: &StoredEvent, reader: Option<&str>) -> Option<String> {
    match &event.event {
        ChatEvent::PrivateMessageSent {
            name,
            to_name,
            message,
            identity,
            to_identity,
            ..
        } => {
            let reader = reader?;
            let party = |id: &Option<String>| id.as_deref() == Some(reader);
            if !(party(identity) || party(to_identity)) {
                return None;
            }
            let frame = PrivateFrame {
                private_message: format!("{name}: {message}"),
                to: to_name,
                id: event.seq,
                ts: event.ts,
            };
            serde_json::to_string(&frame).ok()
        }
        _ => Some(event.message_frame().to_json()),
    }
}

/// Reads one page of the history of `request.room` that `reader` may read (see the module
/// docs) and frames it as the route response.
pub async fn history_response(
    store: &dyn ChatStore,
    request: &HistoryRequest,
    reader: Option<&str>,
    request_id: Option<&str>,
    now_ms: i64,
) -> Result<String, StoreError> {
    let mut range = match request.direction {
        HistoryDirection::After(after) => EventRange::After(after),
        HistoryDirection::Before(before) => EventRange::Before(before),
    };
    let mut frames: Vec<(u64, String)> = Vec::new();
    let mut bytes = 0;
    // The last id this response accounts for (served, or skipped as not the reader's): `next`
    // resumes right after it, so nothing is skipped or repeated.
    let mut resume: Option<u64> = None;
    let mut exhausted = false;
    let examine_cap = (request.limit * HISTORY_EXAMINE_PER_FRAME).max(HISTORY_EXAMINE_MIN);
    let mut examined = 0;
    'pages: while frames.len() < request.limit && examined < examine_cap {
        // Ask for what is still wanted, more when earlier events were not the reader's (a
        // private run is read in few calls), never past the cap.
        let wanted = request.limit - frames.len();
        let skipped = examined - frames.len();
        let read = (wanted + skipped)
            .min(HISTORY_READ_MAX)
            .min(examine_cap - examined)
            .max(1);
        let page = store
            .read_events(&request.room, range, read, now_ms)
            .await?;
        for event in &page.events {
            examined += 1;
            if let Some(frame) = history_frame(event, reader) {
                if bytes + frame.len() + 1 > HISTORY_MAX_BYTES - ENVELOPE_BYTES
                    && !frames.is_empty()
                {
                    break 'pages;
                }
                bytes += frame.len() + 1;
                frames.push((event.seq, frame));
            }
            resume = Some(event.seq);
            if frames.len() == request.limit || examined == examine_cap {
                break 'pages;
            }
        }
        match page.next {
            Some(cursor) => {
                range = match range {
                    EventRange::After(_) => EventRange::After(cursor),
                    EventRange::Before(_) => EventRange::Before(Some(cursor)),
                };
            }
            None => {
                exhausted = true;
                break;
            }
        }
    }
    let next = match (exhausted, resume) {
        (false, Some(id)) => Some(match request.direction {
            HistoryDirection::After(_) => Next {
                action: "history",
                room: &request.room,
                after: Some(id),
                before: None,
                limit: request.limit,
            },
            HistoryDirection::Before(_) => Next {
                action: "history",
                room: &request.room,
                after: None,
                before: Some(id),
                limit: request.limit,
            },
        }),
        _ => None,
    };
    frames.sort_by_key(|(seq, _)| *seq);
    let raw: Vec<Box<RawValue>> = frames
        .into_iter()
        .map(|(_, f)| {
            RawValue::from_string(f).map_err(|e| StoreError::Malformed(format!("frame: {e}")))
        })
        .collect::<Result<_, _>>()?;
    let response = Response {
        history: Page {
            frames: raw.iter().map(AsRef::as_ref).collect(),
            next,
            request_id,
        },
    };
    serde_json::to_string(&response)
        .map_err(|e| StoreError::Malformed(format!("history response: {e}")))
}
