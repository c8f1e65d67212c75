//! `export`: a stretch of the log as JSON Lines, one event per line in id order, written as
//! each page arrives so memory stays constant however long the range is.
//!
//! A line carries the event's id, commit time, type and every field of the event, private
//! messages included: this is the operator's view of the log, not the public history the
//! `history` route serves.

use std::io::Write;
use std::time::{Duration, Instant};

use chat_shared::events::{ChatEvent, LeaveReason, StoredEvent};
use indicatif::ProgressBar;
use serde::Serialize;
use tracing::warn;

use crate::error::ReplayError;
use crate::log::{Entry, EventLog, Expired};
use crate::range::EventFilter;

/// One line of the export.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExportLine<'a> {
    pub id: u64,
    pub ts: i64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub connection_id: &'a str,
    pub name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_connection_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<LeaveReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_identity: Option<&'a str>,
}

impl<'a> From<&'a StoredEvent> for ExportLine<'a> {
    fn from(stored: &'a StoredEvent) -> Self {
        let mut line = ExportLine {
            id: stored.seq,
            ts: stored.ts,
            kind: stored.event.type_name(),
            connection_id: "",
            name: "",
            old_name: None,
            message: None,
            to_connection_id: None,
            to_name: None,
            reason: None,
            identity: None,
            to_identity: None,
        };
        match &stored.event {
            ChatEvent::MemberJoined {
                connection_id,
                name,
            } => {
                line.connection_id = connection_id;
                line.name = name;
            }
            ChatEvent::MemberRenamed {
                connection_id,
                old_name,
                name,
            } => {
                line.connection_id = connection_id;
                line.name = name;
                line.old_name = Some(old_name);
            }
            ChatEvent::MemberLeft {
                connection_id,
                name,
                reason,
            } => {
                line.connection_id = connection_id;
                line.name = name;
                line.reason = Some(*reason);
            }
            ChatEvent::MessagePosted {
                connection_id,
                name,
                message,
            } => {
                line.connection_id = connection_id;
                line.name = name;
                line.message = Some(message);
            }
            ChatEvent::PrivateMessageSent {
                connection_id,
                name,
                to_connection_id,
                to_name,
                message,
                identity,
                to_identity,
            } => {
                line.connection_id = connection_id;
                line.name = name;
                line.to_connection_id = Some(to_connection_id);
                line.to_name = Some(to_name);
                line.message = Some(message);
                line.identity = identity.as_deref();
                line.to_identity = to_identity.as_deref();
            }
        }
        line
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
