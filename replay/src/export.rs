//! `export`: a stretch of the log as JSON Lines, one event per line in id order, written as
//! each page arrives so memory stays constant however long the range is.
//!
//! A line carries the event's id, commit time, type and every field of the event, private
//! messages included: this is the operator's view of the log, not the public history the
//! `history` route serves.

use std::io::Write;
use std::time::{Duration, Instant};

use chat_shared::events::{EventItem, LeaveReason, StoredEvent};
use indicatif::ProgressBar;
use serde::Serialize;
use tracing::warn;

use crate::error::ReplayError;
use crate::log::{Entry, EventLog, Expired};
use crate::range::EventFilter;

/// One line of the export: the event's item (`events::EventItem`, the one flat form of every
/// event) without its storage keys (`pk`, `v`, `expiresAt`), with `seq` named `id` and the
/// room it is an id of.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportLine {
    pub id: u64,
    pub ts: i64,
    #[serde(rename = "type")]
    pub kind: String,
    pub room: String,
    pub connection_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_connection_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<LeaveReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_identity: Option<String>,
}

impl From<&StoredEvent> for ExportLine {
    fn from(stored: &StoredEvent) -> Self {
        // Which fields each kind of event has is decided once, by the item.
        let EventItem {
            seq,
            ts,
            kind,
            connection_id,
            name,
            old_name,
            message,
            to_connection_id,
            to_name,
            reason,
            identity,
            to_identity,
            pk: _,
            v: _,
            expires_at: _,
        } = EventItem::new(stored, 0);
        ExportLine {
            id: seq,
            ts,
            kind,
            room: stored.room.clone(),
            connection_id,
            name,
            old_name,
            message,
            to_connection_id,
            to_name,
            reason,
            identity,
            to_identity,
        }
    }
}

/// What one export did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSummary {
    /// Lines written.
    pub exported: u64,
    /// Items skipped because they do not decode as events (each is logged).
    pub malformed: u64,
    pub elapsed: Duration,
}

impl ExportSummary {
    pub fn events_per_sec(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.exported as f64 / secs
        } else {
            0.0
        }
    }
}

/// Writes the events `filter` selects to `out` as JSON Lines, in id order. Events past their
/// retention are skipped as the chat's own reads skip them. `out` should be buffered; it is
/// flushed at the end.
pub async fn export(
    log: &EventLog,
    filter: &EventFilter,
    now_ms: i64,
    out: &mut dyn Write,
    progress: &ProgressBar,
) -> Result<ExportSummary, ReplayError> {
    let began = Instant::now();
    let mut summary = ExportSummary {
        exported: 0,
        malformed: 0,
        elapsed: Duration::ZERO,
    };
    let mut pages = log.pages(filter, Expired::Skip, now_ms);
    while let Some(page) = pages.next().await {
        for entry in page? {
            match entry {
                Entry::Event(event) => {
                    serde_json::to_writer(&mut *out, &ExportLine::from(&event))
                        .map_err(std::io::Error::from)?;
                    out.write_all(b"\n")?;
                    summary.exported += 1;
                }
                Entry::Malformed { seq, detail } => {
                    // One unreadable item should not cost the operator the rest of the export.
                    warn!(seq, detail, "skipping an event item that does not decode");
                    summary.malformed += 1;
                }
            }
            progress.inc(1);
        }
    }
    out.flush()?;
    summary.elapsed = began.elapsed();
    Ok(summary)
}
