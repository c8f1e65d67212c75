//! TTL expiry leaves every room: what happens when DynamoDB's TTL deletes a connection item
//! whose `$disconnect` was lost and that never met a 410.
//!
//! Without this, such a connection drops out of every member list once it expires (every
//! read treats its items as absent from then: its member items' `liveUntil`, the connection's
//! `expiresAt`), but no room hears of it: no `MemberLeft`,
//! the room counter's `members` stays high, its name claim and principal slot linger until
//! their own TTL. With it, the connections table has a stream (`OLD_IMAGE`) and a second event
//! source mapping into the fan-out whose filter ([`crate::stream::EXPIRY_FILTER_PATTERN`])
//! passes only TTL deletions of connection items. For each such record this module decodes
//! the expired item's last image ([`ConnItem`], the one definition of its shape) and hands it
//! to [`ChatStore::remove_expired`], which leaves each room still in its `rooms` map — a
//! sequenced `MemberLeft` with reason `expired` (unsequenced in a large room), conditioned on
//! the connection's member item still being there — then gives back its name claim (only if
//! still its own) and its principal's slot. The `MemberLeft`s reach the rooms' members through
//! the event table's stream like any other event.
//!
//! The member items are there to find: their TTL is [`crate::keys::MEMBER_TTL_GRACE_SECS`]
//! after the connection's, so DynamoDB's TTL, which deletes in no set order, deletes the
//! connection item (and so sends its record here) well before them.
//!
//! Safe to repeat and to race: a redelivered record, or one for a connection another path
//! (`$disconnect`, a prune) already took out of a room, finds the member item gone and writes
//! nothing; a newer holder of the name keeps it. A failure reports the record as the batch
//! item failure (Lambda retries from there, as with event records); a record that can never
//! be decoded is logged and skipped.
//!
//! Which stream a record comes from: the event table's key is (`pk`, `seq`), the connections
//! table's (`pk`, `sk`), so a record's `Keys` say which table wrote it (its `eventSourceARN`
//! names the table too, but the fan-out is not told the tables' names). A batch from one
//! mapping is all one table's.

use aws_lambda_events::event::dynamodb::EventRecord;
use aws_lambda_events::event::streams::DynamoDbBatchItemFailure;
use thiserror::Error;
use tracing::{debug, error, info, warn};

use crate::keys;
use crate::store::items::ConnItem;
use crate::store::ChatStore;
use crate::stream::passes_expiry_filter;

#[derive(Debug, Error)]
pub enum ExpiryError {
    #[error("the record has no old image (the stream's view type must include OLD_IMAGE)")]
    NoOldImage,
    #[error("the old image is not a connection item")]
    Item(#[from] serde_dynamo::Error),
}

/// Whether a record comes from the connections table's stream (its key has `sk`; the event
/// table's has `seq`).
pub fn is_connections_record(record: &EventRecord) -> bool {
    record.change.keys.get(keys::SK).is_some() && record.change.keys.get(keys::SEQ).is_none()
}

/// The expired connection item, from a TTL `REMOVE` record's old image.
pub fn decode_expired(record: &EventRecord) -> Result<ConnItem, ExpiryError> {
    if record.change.old_image.is_empty() {
        return Err(ExpiryError::NoOldImage);
    }
    Ok(serde_dynamo::from_item(record.change.old_image.clone())?)
}

/// Handles the connections table's records in stream order: each TTL deletion of a connection
/// item leaves its rooms ([`ChatStore::remove_expired`]); anything else (which the template's
/// filter keeps from Lambda) is skipped. Stops at the first record whose leaves fail and
/// returns it as the batch item failure, so Lambda retries from it.
pub async fn handle_records(
    store: &dyn ChatStore,
    records: &[EventRecord],
    now_ms: impl Fn() -> i64,
) -> Vec<DynamoDbBatchItemFailure> {
    for record in records {
        let seq_no = record.change.sequence_number.clone();
        if !passes_expiry_filter(record) {
            // An ordinary delete ($disconnect's, a prune's) or any other write: those leaves
            // were done by whoever deleted it.
            debug!(sequence_number = ?seq_no, event_name = %record.event_name, "skipping a connections-table record that is not a TTL deletion of a connection");
            continue;
        }
        let gone = match decode_expired(record) {
            Ok(gone) => gone,
            Err(e) => {
                // Retrying cannot make it decodable; blocking the shard on it would stop expiry.
                error!(sequence_number = ?seq_no, event_id = %record.event_id, error = %e, cause = ?std::error::Error::source(&e), "skipping a TTL removal whose old image is not a connection item");
                continue;
            }
        };
        let rooms = gone.rooms.as_ref().map_or(0, |r| r.len());
        match store.remove_expired(&gone, now_ms()).await {
            Ok(left) => info!(
                connection_id = gone.connection_id.as_str(),
                rooms,
                left = left.len(),
                "an expired connection left its rooms"
            ),
            Err(e) => {
                warn!(connection_id = gone.connection_id.as_str(), sequence_number = ?seq_no, error = %e, cause = ?std::error::Error::source(&e), "the leaves of an expired connection failed; Lambda will retry from this record");
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = seq_no;
                return vec![failure];
            }
        }
    }
    Vec::new()
}
