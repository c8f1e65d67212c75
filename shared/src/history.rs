//! The `history` route: pages of public history, framed exactly like live frames, in one
//! route response under API Gateway's 128 KB message limit.
//!
//! The response is one frame (a route response is one WebSocket message):
//!
//! ```json
//! {"history":{"frames":[{"publicMessage":"alice: hi","id":41,"ts":…}, …],
//!             "next":{"action":"history","after":57,"limit":50}}}
//! ```
//!
//! `frames` are in id order (oldest first) whichever way the request pages; `next` is the
//! request that continues (absent when there is nothing more). Public history is every
//! `publicMessage` and every join/leave/rename `systemMessage`; `members` frames are state, not
//! history, and private messages are never served (a name is not an identity: a later user
//! could take a departed user's name).

use serde::Serialize;
use serde_json::value::RawValue;

use crate::events::{ChatEvent, StoredEvent};
use crate::protocol::{HistoryDirection, HistoryRequest};
use crate::store::{ChatStore, EventRange, StoreError};

/// The most frame bytes in one response: API Gateway's 128 KB message limit less room for the
/// envelope. A single chat frame (messages are at most 16 KB, template.yaml) always fits.
pub const HISTORY_MAX_BYTES: usize = 120 * 1024;

#[derive(Serialize)]
struct Next {
    action: &'static str,
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
    next: Option<Next>,
}

#[derive(Serialize)]
struct Response<'a> {
    history: Page<'a>,
}

/// The frame a history reader sees for an event, or `None` if it is not public history.
pub fn public_frame(event: &StoredEvent) -> Option<String> {
    match event.event {
        ChatEvent::PrivateMessageSent { .. } => None,
        _ => Some(event.message_frame().to_json()),
    }
}

/// Reads one page of public history and frames it as the route response.
pub async fn history_response(
    store: &dyn ChatStore,
    request: HistoryRequest,
    now_ms: i64,
) -> Result<String, StoreError> {
    let mut range = match request.direction {
        HistoryDirection::After(after) => EventRange::After(after),
        HistoryDirection::Before(before) => EventRange::Before(before),
    };
    let mut frames: Vec<(u64, String)> = Vec::new();
    let mut bytes = 0;
    // The last id this response accounts for (served, or skipped as private): `next` resumes
    // right after it, so nothing is skipped or repeated.
    let mut resume: Option<u64> = None;
    let mut exhausted = false;
    'pages: while frames.len() < request.limit {
        let page = store
            .read_events(range, request.limit - frames.len(), now_ms)
            .await?;
        for event in &page.events {
            if let Some(frame) = public_frame(event) {
                if bytes + frame.len() + 1 > HISTORY_MAX_BYTES && !frames.is_empty() {
                    break 'pages;
                }
                bytes += frame.len() + 1;
                frames.push((event.seq, frame));
            }
            resume = Some(event.seq);
            if frames.len() == request.limit {
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
                after: Some(id),
                before: None,
                limit: request.limit,
            },
            HistoryDirection::Before(_) => Next {
                action: "history",
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
        },
    };
    serde_json::to_string(&response)
        .map_err(|e| StoreError::Malformed(format!("history response: {e}")))
}
