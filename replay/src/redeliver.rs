//! `redeliver`: re-drives the fan-out of a stretch of the log to whoever is a member now,
//! through the same [`deliver_event`] the stream fan-out uses.
//!
//! Events go one at a time in id order, so each member receives them in the room's order; the
//! deliveries of one event run concurrently (`concurrency` at once). Every frame carries the
//! event's id, so a client that already has an event recognises the copy and drops it: a
//! redelivery only fills gaps. What it cannot restore is the past: a join's `members` frame lists
//! the members of now, and members who joined later receive events from before they joined.
//! Like the stream fan-out it prunes connections that answer 410 Gone, which records their
//! `MemberLeft`: the one write a redelivery makes. A dry run posts and writes nothing. Above the
//! fan-out's `presence_limit` members, joins, renames and leaves are not broadcast at all, by
//! the fan-out's own rule; a redelivery follows it (and its dry run counts them as 0).

use std::io::Write;

use chat_shared::config::FanoutConfig;
use chat_shared::delivery::Deliver;
use chat_shared::events::{ChatEvent, StoredEvent};
use chat_shared::fanout::deliver_event;
use chat_shared::store::ChatStore;
use futures::TryStreamExt;
use indicatif::ProgressBar;
use serde::Serialize;
use tracing::warn;

use crate::error::ReplayError;
use crate::log::{Entry, EventLog, Expired};
use crate::range::EventFilter;

#[derive(Debug, Clone)]
pub struct RedeliverOptions {
    pub filter: EventFilter,
    /// List what would be delivered; post nothing, write nothing.
    pub dry_run: bool,
    /// One JSON object per event instead of a line of text.
    pub json: bool,
    pub fanout: FanoutConfig,
}

/// What happened to one event (one line of the output).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventOutcome {
    pub id: u64,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Dry run: the connections it would be posted to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<usize>,
    /// Connections that accepted every frame.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<usize>,
    /// Connections that answered 410 and were pruned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruned: Option<Vec<String>>,
    /// Connections that refused a frame for good (403, 413).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<usize>,
}

/// Totals of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedeliverSummary {
    pub events: u64,
    /// Dry run: posts it would make (per connection, not per frame).
    pub recipients: usize,
    pub delivered: usize,
    pub pruned: usize,
    pub rejected: usize,
    /// Items skipped because they do not decode as events.
    pub malformed: u64,
}

/// Redelivers (or, dry, lists) the events `options.filter` selects, writing one line per event
/// to `out`. `now_ms` is read per event, as the fan-out reads members as of now.
pub async fn redeliver(
    log: &EventLog,
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    options: &RedeliverOptions,
    now_ms: impl Fn() -> i64,
    out: &mut dyn Write,
    progress: &ProgressBar,
) -> Result<RedeliverSummary, ReplayError> {
    let mut summary = RedeliverSummary::default();
    // Membership does not change during a dry run (nothing is written), so count it once.
    let members = if options.dry_run {
        Some(count_members(store, log.room(), now_ms()).await?)
    } else {
        None
    };
    // Expired events are not history any more (the `history` route skips them too).
    let mut pages = log.pages(&options.filter, Expired::Skip, now_ms());
    while let Some(page) = pages.next().await {
        for entry in page? {
            let event = match entry {
                Entry::Event(event) => event,
                Entry::Malformed { seq, detail } => {
                    // The stream fan-out skips such a record too: it can never be delivered.
                    warn!(seq, detail, "skipping an event item that does not decode");
                    summary.malformed += 1;
                    progress.inc(1);
                    continue;
                }
            };
            let outcome = match members {
                Some(members) => {
                    let recipients = recipients(&event, members, options.fanout.presence_limit);
                    summary.recipients += recipients;
                    EventOutcome {
                        id: event.seq,
                        kind: event.event.type_name(),
                        recipients: Some(recipients),
                        delivered: None,
                        pruned: None,
                        rejected: None,
                    }
                }
                None => {
                    let report = deliver_event(store, deliver, &options.fanout, &event, now_ms())
                        .await
                        .map_err(|source| ReplayError::Redeliver {
                            id: event.seq,
                            source,
                        })?;
                    summary.delivered += report.delivered;
                    summary.pruned += report.pruned.len();
                    summary.rejected += report.rejected;
                    EventOutcome {
                        id: event.seq,
                        kind: event.event.type_name(),
                        recipients: None,
                        delivered: Some(report.delivered),
                        pruned: Some(report.pruned),
                        rejected: Some(report.rejected),
                    }
                }
            };
            summary.events += 1;
            write_outcome(out, &outcome, options.json)?;
            progress.inc(1);
        }
    }
    out.flush()?;
    Ok(summary)
}

/// How many connections [`deliver_event`] posts an event to when `members` connections are
/// members.
fn recipients(event: &StoredEvent, members: usize, presence_limit: usize) -> usize {
    match event.event {
        ChatEvent::PrivateMessageSent { .. } => 1,
        _ if event.event.changes_membership() && members > presence_limit => 0,
        _ => members,
    }
}

async fn count_members(
    store: &dyn ChatStore,
    room: &str,
    now_ms: i64,
) -> Result<usize, ReplayError> {
    // The room's members exactly as the fan-out reads them (every shard, page by page).
    let members = chat_shared::fanout::members(store, room, now_ms);
    Ok(members.try_fold(0, |n, _| async move { Ok(n + 1) }).await?)
}

fn write_outcome(out: &mut dyn Write, o: &EventOutcome, json: bool) -> std::io::Result<()> {
    if json {
        serde_json::to_writer(&mut *out, o)?;
        return out.write_all(b"\n");
    }
    match (o.recipients, o.delivered) {
        (Some(recipients), _) => writeln!(
            out,
            "event {} {}: would post to {recipients} connection(s)",
            o.id, o.kind
        ),
        (None, delivered) => {
            let pruned = o.pruned.as_ref().map_or(0, Vec::len);
            writeln!(
                out,
                "event {} {}: delivered to {}, pruned {pruned}, rejected {}",
                o.id,
                o.kind,
                delivered.unwrap_or(0),
                o.rejected.unwrap_or(0)
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(event: ChatEvent) -> StoredEvent {
        StoredEvent {
            room: "lobby".into(),
            seq: 1,
            ts: 0,
            event,
        }
    }

    #[test]
    fn a_dry_run_counts_recipients_as_the_fan_out_chooses_them() {
        let join = stored(ChatEvent::MemberJoined {
            connection_id: "a".into(),
            name: "alice".into(),
        });
        let post = stored(ChatEvent::MessagePosted {
            connection_id: "a".into(),
            name: "alice".into(),
            message: "hi".into(),
        });
        let whisper = stored(ChatEvent::PrivateMessageSent {
            connection_id: "a".into(),
            name: "alice".into(),
            to_connection_id: "b".into(),
            to_name: "bob".into(),
            message: "psst".into(),
            identity: None,
            to_identity: None,
        });
        // GIVEN 5 members and a presence limit of 10  THEN everyone, and one for a whisper
        assert_eq!(recipients(&join, 5, 10), 5);
        assert_eq!(recipients(&post, 5, 10), 5);
        assert_eq!(recipients(&whisper, 5, 10), 1);
        // GIVEN 11 members  THEN presence is not broadcast, messages still are
        assert_eq!(recipients(&join, 11, 10), 0);
        assert_eq!(recipients(&post, 11, 10), 11);
    }
}
