//! The fan-out: turns each event from the event table's stream into deliveries through
//! `@connections`, and prunes connections that answer 410 Gone.
//!
//! Records are processed in stream order, one at a time (that keeps each room's order);
//! the deliveries of one record run concurrently, at most `concurrency` at once, while the
//! next page of members is read. A record that fails for a retryable reason stops the batch
//! and is reported as the batch item failure, so Lambda retries from it (the records before
//! it are done); a record that can never be decoded is logged and skipped.

use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use futures::stream::{self, Stream, StreamExt};
use rand::Rng;
use thiserror::Error;
use tracing::{debug, error, info, warn};

use crate::config::FanoutConfig;
use crate::delivery::{Deliver, DeliveryError};
use crate::events::{ChatEvent, DecodeError, EventItem, LeaveReason, StoredEvent};
use crate::store::{ChatStore, Member, StoreError};

#[derive(Debug, Error)]
pub enum FanoutError {
    #[error("reading or pruning connections failed")]
    Store(#[from] StoreError),
    #[error("{failed} deliveries still failing after retries")]
    Undelivered {
        failed: usize,
        #[source]
        last: DeliveryError,
    },
}

#[derive(Debug, Error)]
pub enum RecordError {
    #[error("stream record has no new image")]
    NoImage,
    #[error("new image is not an event item")]
    Item(#[from] serde_dynamo::Error),
    #[error("event item cannot be decoded")]
    Event(#[from] DecodeError),
}

/// What one event's fan-out did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Frames accepted by `@connections`.
    pub delivered: usize,
    /// Connections that answered 410 and were pruned.
    pub pruned: Vec<String>,
    /// Frames refused for good (403, 413, other): logged, not retried.
    pub rejected: usize,
}

/// Decodes the new image of an INSERT or MODIFY record into an event.
pub fn decode_record(record: &EventRecord) -> Result<StoredEvent, RecordError> {
    if record.change.new_image.is_empty() {
        return Err(RecordError::NoImage);
    }
    let item: EventItem = serde_dynamo::from_item(record.change.new_image.clone())?;
    Ok(StoredEvent::try_from(item)?)
}

/// Whether a record is a deletion: events are immutable, so on the event table every REMOVE is
/// a TTL expiry (`userIdentity.principalId = dynamodb.amazonaws.com`), never a chat event.
pub fn is_removal(record: &EventRecord) -> bool {
    record.event_name == "REMOVE"
}

/// The Lambda handler's logic: every record in order, with a partial batch response.
pub async fn handle_stream_event(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    event: Event,
    now_ms: impl Fn() -> i64,
) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    for record in &event.records {
        let seq_no = record.change.sequence_number.clone();
        if is_removal(record) {
            debug!(sequence_number = ?seq_no, "skipping a removal (TTL expiry)");
            continue;
        }
        let stored = match decode_record(record) {
            Ok(stored) => stored,
            Err(e) => {
                // Retrying cannot make it decodable; blocking the shard on it would stop the chat.
                error!(sequence_number = ?seq_no, event_id = %record.event_id, error = %e, cause = ?std::error::Error::source(&e), "skipping a stream record that is not a chat event");
                continue;
            }
        };
        match deliver_event(store, deliver, config, &stored, now_ms()).await {
            Ok(report) => info!(
                event_id = stored.seq,
                kind = stored.event.type_name(),
                delivered = report.delivered,
                pruned = report.pruned.len(),
                rejected = report.rejected,
                "fanned out"
            ),
            Err(e) => {
                warn!(event_id = stored.seq, error = %e, cause = ?std::error::Error::source(&e), "fan-out failed; Lambda will retry from this record");
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = seq_no;
                response.batch_item_failures.push(failure);
                // Later records wait: delivering them now would reorder the room.
                break;
            }
        }
    }
    response
}

/// Pages of members as one stream, read lazily so the next page is fetched while the
/// previous one is still being delivered.
fn members(
    store: &dyn ChatStore,
    now_ms: i64,
) -> impl Stream<Item = Result<Member, StoreError>> + '_ {
    enum Cursor {
        Start,
        After(String),
        Done,
    }
    stream::unfold(Cursor::Start, move |cursor| async move {
        let after = match cursor {
            Cursor::Start => None,
            Cursor::After(sk) => Some(sk),
            Cursor::Done => return None,
        };
        match store.members_page(after.as_deref(), now_ms).await {
            Ok(page) => {
                let next = page.next.map_or(Cursor::Done, Cursor::After);
                Some((Ok(page.members), next))
            }
            Err(e) => Some((Err(e), Cursor::Done)),
        }
    })
    .flat_map(|page| match page {
        Ok(members) => stream::iter(members.into_iter().map(Ok)).left_stream(),
        Err(e) => stream::once(async { Err(e) }).right_stream(),
    })
}

/// Delivers one event to whoever should see it, then prunes the connections found gone.
pub async fn deliver_event(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    stored: &StoredEvent,
    now_ms: i64,
) -> Result<DeliveryReport, FanoutError> {
    // Each frame is serialised once and shared by every recipient.
    let outcomes: Vec<(String, Result<(), DeliveryError>)> = match &stored.event {
        ChatEvent::PrivateMessageSent {
            to_connection_id, ..
        } => {
            let frame: Arc<[Vec<u8>]> = Arc::new([stored.message_frame().to_json().into_bytes()]);
            vec![(
                to_connection_id.clone(),
                send_all(deliver, config, to_connection_id, &frame).await,
            )]
        }
        ChatEvent::MessagePosted { .. } => {
            let frame: Arc<[Vec<u8>]> = Arc::new([stored.message_frame().to_json().into_bytes()]);
            let mut failed_read = None;
            let outcomes = members(store, now_ms)
                .filter_map(|m| {
                    let member = match m {
                        Ok(member) => Some(member),
                        Err(e) => {
                            failed_read.get_or_insert(e);
                            None
                        }
                    };
                    async move { member }
                })
                .map(|m| {
                    let frame = Arc::clone(&frame);
                    async move {
                        let r = send_all(deliver, config, &m.connection_id, &frame).await;
                        (m.connection_id, r)
                    }
                })
                .buffer_unordered(config.concurrency)
                .collect::<Vec<_>>()
                .await;
            if let Some(e) = failed_read {
                return Err(e.into());
            }
            outcomes
        }
        ChatEvent::MemberJoined { .. }
        | ChatEvent::MemberRenamed { .. }
        | ChatEvent::MemberLeft { .. } => {
            // The member list is needed whole for the `members` frame anyway.
            let mut all: Vec<Member> = members(store, now_ms)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            all.sort_by_key(|m| m.name.to_lowercase());
            let names = all.iter().map(|m| m.name.clone()).collect();
            let frames: Arc<[Vec<u8>]> = stored
                .membership_frames(names)
                .iter()
                .map(|f| f.to_json().into_bytes())
                .collect();
            stream::iter(all)
                .map(|m| {
                    let frames = Arc::clone(&frames);
                    async move {
                        let r = send_all(deliver, config, &m.connection_id, &frames).await;
                        (m.connection_id, r)
                    }
                })
                .buffer_unordered(config.concurrency)
                .collect()
                .await
        }
    };

    let mut report = DeliveryReport::default();
    let mut retryable = 0;
    let mut last_retryable = None;
    for (connection_id, outcome) in outcomes {
        match outcome {
            Ok(()) => report.delivered += 1,
            Err(DeliveryError::Gone) => report.pruned.push(connection_id),
            Err(e) if e.is_retryable() => {
                retryable += 1;
                last_retryable = Some(e);
            }
            Err(e) => {
                warn!(connection_id, error = %e, "frame refused; not retrying");
                report.rejected += 1;
            }
        }
    }
    for connection_id in &report.pruned {
        // Its MemberLeft event goes through the stream like any other, so others see it leave.
        store
            .remove_connection(connection_id, LeaveReason::Gone, now_ms)
            .await?;
    }
    match last_retryable {
        Some(last) => Err(FanoutError::Undelivered {
            failed: retryable,
            last,
        }),
        None => Ok(report),
    }
}

/// Sends a recipient its frames in order (a join's `members` before its `systemMessage`),
/// each with retries; stops at the first frame that cannot be delivered.
async fn send_all(
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    connection_id: &str,
    frames: &[Vec<u8>],
) -> Result<(), DeliveryError> {
    for frame in frames {
        send_with_retry(deliver, config, connection_id, frame).await?;
    }
    Ok(())
}

async fn send_with_retry(
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    connection_id: &str,
    data: &[u8],
) -> Result<(), DeliveryError> {
    let mut attempt = 1;
    loop {
        match deliver.post(connection_id, data).await {
            Err(e) if e.is_retryable() && attempt < config.max_attempts => {
                // Full jitter: spreads the retries of a throttled broadcast instead of
                // sending them back in one synchronised wave.
                let cap = config.base_backoff.as_millis() as u64 * (1 << (attempt - 1).min(10));
                let wait = rand::rng().random_range(0..=cap.max(1));
                debug!(connection_id, attempt, wait_ms = wait, error = %e, "retrying delivery");
                tokio::time::sleep(Duration::from_millis(wait)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}
