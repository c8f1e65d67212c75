//! The fan-out: turns the events on the event table's stream into deliveries through
//! `@connections`, and prunes connections that answer 410 Gone.
//!
//! - **Order.** Records are processed in stream order, one unit at a time (that keeps the
//!   room's order); the deliveries of a unit run concurrently, at most `concurrency` at once.
//! - **Streaming.** A broadcast reads the members page by page while it sends, never holding
//!   every recipient; each frame is serialised once and shared by all recipients.
//! - **Rooms.** An event of room r goes to r's members only: the fan-out reads r's member
//!   shard count, then r's shards, [`SHARDS_AT_ONCE`] in parallel, page by page. Records of a
//!   room's counter item (`type` `Counter`) are skipped before decoding. A private message
//!   goes to its recipient's connection, whatever rooms either party is in.
//! - **Presence.** Consecutive joins, renames and leaves of one room in one batch are one
//!   unit, read the member list once: each member gets one `systemMessage` per change (the
//!   frame `history` serves for it, with its own id) and one `members` snapshot with the run's
//!   last id ([`crate::presence`] owns the frames and why they do not depend on batch
//!   boundaries). A single change gets exactly the tutorial's two frames.
//! - **Large rooms.** Above `presence_limit` members of the room (default 1,000) presence is
//!   not broadcast at all: a list of a few thousand names no longer fits API Gateway's 128 KB
//!   frame, and each change would cost a broadcast. Messages are unaffected; joins and leaves
//!   stay in history.
//! - **Retries.** 429 and 5xx are retried with exponential backoff and full jitter, bounded by
//!   the invocation's deadline: 5xx up to `max_attempts` from `base_backoff` (50 ms), 429 up to
//!   `max_throttled_attempts` from `throttle_backoff` (8 from 200 ms, capped at 5 s each: a
//!   throttled account needs seconds, not the ~350 ms of 5xx retries); 410 is never retried
//!   (the connection is pruned), nor are 403 and 413 (reported).
//! - **Pacing.** Every attempt waits its turn under `config.pacer` (5,000 calls/s by default,
//!   halved on each wave of 429s and restored as calls succeed: [`crate::pacing`]), so a big
//!   broadcast cannot use the account's whole API Gateway quota.
//! - **Recipients that keep failing** (5xx, or 429 after every attempt) do not fail the
//!   record: what they are owed is written as a redelivery item, which the stream brings back
//!   as a round of its own ([`crate::redelivery`]); everyone else gets the event once. Rounds
//!   run beside the batch's in-order units, never holding the room.
//! - **Failures.** A unit that cannot finish (out of time, a store error) stops the batch and
//!   its first record is reported as the batch item failure, so Lambda retries from there —
//!   nothing is dropped silently, and records before it are done. A unit that starts after
//!   the deadline fails at once. A record that can never be decoded is logged and skipped.
//! - **Batched delivery.** A room's units of one stream batch (two or more) go to each member
//!   together, in id order, packed into `{"batch":[…]}` POSTs of at most 32 KB for connections
//!   that opted in with `?batch=1` ([`crate::batching`]); a room with one unit in the batch
//!   goes unit by unit as above.
//! - **Pruning in batches.** The 410s of a unit are removed together after it
//!   ([`ChatStore::remove_connections`]); their leave events go through the stream like any other.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use futures::stream::{self, BoxStream, Stream, StreamExt};
use rand::Rng;
use thiserror::Error;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::FanoutConfig;
use crate::delivery::{Deliver, DeliveryError};
use crate::events::{ChatEvent, DecodeError, EventItem, LeaveReason, StoredEvent};
use crate::keys;
use crate::redelivery::{self, Redelivery, RedeliveryItem};
use crate::store::{ChatStore, Member, StoreError};

#[derive(Debug, Error)]
pub enum FanoutError {
    #[error("reading or pruning connections failed")]
    Store(#[from] StoreError),
    #[error("the invocation ran out of time")]
    OutOfTime,
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

/// What one unit's fan-out did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Recipients whose frames `@connections` accepted.
    pub delivered: usize,
    /// Connections that answered 410 and were pruned.
    pub pruned: Vec<String>,
    /// Recipients refused for good (403, 413, other): logged, not retried.
    pub rejected: usize,
    /// Recipients still failing after their attempts, handed to the next redelivery round.
    pub redelivering: usize,
    /// Recipients still failing after the last redelivery round: given up.
    pub given_up: usize,
    /// Presence not broadcast because the room is over `presence_limit`.
    pub presence_skipped: bool,
}

/// Decodes the new image of an INSERT or MODIFY record into an event.
pub fn decode_record(record: &EventRecord) -> Result<StoredEvent, RecordError> {
    if record.change.new_image.is_empty() {
        return Err(RecordError::NoImage);
    }
    let item: EventItem = serde_dynamo::from_item(record.change.new_image.clone())?;
    Ok(StoredEvent::try_from(item)?)
}

/// The redelivery round a record carries, if it is a redelivery item (not an event).
pub fn decode_redelivery(record: &EventRecord) -> Option<Result<Redelivery, RecordError>> {
    let image = &record.change.new_image;
    match image.get(keys::TYPE) {
        Some(serde_dynamo::AttributeValue::S(kind)) if kind == redelivery::ITEM_TYPE => Some(
            serde_dynamo::from_item::<_, RedeliveryItem>(image.clone())
                .map(RedeliveryItem::into_redelivery)
                .map_err(RecordError::Item),
        ),
        _ => None,
    }
}

/// Whether a record is a deletion, which the fan-out skips: a REMOVE carries no new image and
/// is never a chat event. Events are immutable, so on the event table a REMOVE should be a TTL
/// expiry, which DynamoDB marks with `userIdentity` `{"type": "Service", "principalId":
/// "dynamodb.amazonaws.com"}`. A REMOVE without that mark means someone deleted an event item
/// (an operator, a script): it is skipped all the same — there is nothing to deliver, and
/// retrying cannot change it — but logged as a warning, since history lost an event.
pub fn is_removal(record: &EventRecord) -> bool {
    if record.event_name != "REMOVE" {
        return false;
    }
    let by_ttl = record.user_identity.as_ref().is_some_and(|identity| {
        identity.type_ == "Service" && identity.principal_id == "dynamodb.amazonaws.com"
    });
    if !by_ttl {
        warn!(
            sequence_number = ?record.change.sequence_number,
            event_id = %record.event_id,
            principal = ?record.user_identity.as_ref().map(|i| i.principal_id.as_str()),
            "an event item was deleted, not by TTL expiry; skipping its REMOVE record"
        );
    }
    true
}

/// Whether a record is of a room's counter item (`type` `Counter`, seq 0 of the room's
/// partition), which moves on every append and is never a chat event. Checked on the raw
/// image, before any decoding, so skipping it costs one attribute lookup.
pub fn is_counter(record: &EventRecord) -> bool {
    let image = if record.change.new_image.is_empty() {
        &record.change.old_image
    } else {
        &record.change.new_image
    };
    matches!(image.get(keys::TYPE), Some(serde_dynamo::AttributeValue::S(kind)) if kind == keys::COUNTER_TYPE)
}

/// What is delivered together: one event, or a run of presence changes of one room.
pub(crate) enum Unit {
    Single(StoredEvent),
    Presence(Vec<StoredEvent>),
}

impl Unit {
    /// Its events, in id order.
    pub(crate) fn events(&self) -> &[StoredEvent] {
        match self {
            Unit::Single(e) => std::slice::from_ref(e),
            Unit::Presence(run) => run,
        }
    }
}

/// The Lambda handler's logic: every record in order, with a partial batch response.
/// `deadline` is when the invocation must have answered (Lambda's context deadline); the
/// fan-out keeps `config.time_margin` in hand to answer in time.
pub async fn handle_stream_event(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    event: Event,
    now_ms: impl Fn() -> i64,
    deadline: Option<Instant>,
) -> DynamoDbEventResponse {
    crate::metrics::stream_batch(&event);
    // The connections table's stream (its own mapping): TTL deletions of connections, whose
    // leaves `crate::expiry` performs; their `MemberLeft`s come back on the event table's.
    let mut event = event;
    let (conns, rest): (Vec<EventRecord>, Vec<EventRecord>) = std::mem::take(&mut event.records)
        .into_iter()
        .partition(crate::expiry::is_connections_record);
    event.records = rest;
    let expiry_failures = crate::expiry::handle_records(store, &conns, &now_ms).await;
    let deadline = deadline.map(|d| d.checked_sub(config.time_margin).unwrap_or(d));
    let mut units: Vec<(Option<String>, Unit)> = Vec::new();
    let mut rounds: Vec<(Option<String>, Redelivery)> = Vec::new();
    for record in &event.records {
        let seq_no = record.change.sequence_number.clone();
        if is_counter(record) {
            // Every append moves its room's counter; nothing to deliver (the template's
            // filter keeps these from Lambda on AWS; this covers any that get through).
            continue;
        }
        if is_removal(record) {
            debug!(sequence_number = ?seq_no, "skipping a removal");
            continue;
        }
        match decode_redelivery(record) {
            Some(Ok(round)) => {
                rounds.push((seq_no, round));
                continue;
            }
            Some(Err(e)) => {
                error!(sequence_number = ?seq_no, error = %e, "skipping a redelivery item that cannot be decoded");
                continue;
            }
            None => {}
        }
        let stored = match decode_record(record) {
            Ok(stored) => stored,
            Err(e) => {
                // Retrying cannot make it decodable; blocking the shard on it would stop the chat.
                error!(sequence_number = ?seq_no, event_id = %record.event_id, error = %e, cause = ?std::error::Error::source(&e), "skipping a stream record that is not a chat event");
                continue;
            }
        };
        match (units.last_mut(), stored.event.changes_membership()) {
            // A run coalesces consecutive changes of one room only: each room's members get
            // their own room's list.
            (Some((_, Unit::Presence(run))), true)
                if run.last().is_some_and(|e| e.room == stored.room) =>
            {
                run.push(stored)
            }
            (_, true) => units.push((seq_no, Unit::Presence(vec![stored]))),
            (_, false) => units.push((seq_no, Unit::Single(stored))),
        }
    }

    // Redelivery rounds go beside the in-order units: their recipients already missed the
    // order, and a round waiting out its backoff must not hold the room.
    let now_ms = &now_ms;
    let redeliveries = stream::iter(rounds)
        .map(|(seq_no, round)| async move {
            let outcome =
                deliver_redelivery(store, deliver, config, &round, now_ms(), deadline).await;
            match outcome {
                Ok(report) => {
                    crate::metrics::redelivery_done(&report);
                    info!(
                        room = round.room.as_str(),
                        event_id = round.event_id,
                        round = round.round,
                        delivered = report.delivered,
                        pruned = report.pruned.len(),
                        rejected = report.rejected,
                        redelivering = report.redelivering,
                        given_up = report.given_up,
                        "redelivered"
                    );
                    None
                }
                Err(e) => {
                    warn!(room = round.room.as_str(), event_id = round.event_id, round = round.round, error = %e, "redelivery failed; Lambda will retry it");
                    Some(seq_no)
                }
            }
        })
        .buffer_unordered(REDELIVERY_ROUNDS_AT_ONCE)
        .filter_map(|failed| async move { failed })
        .collect::<Vec<_>>();
    let (mut response, failed_rounds) = futures::join!(
        deliver_in_order(store, deliver, config, units, now_ms, deadline),
        redeliveries
    );
    response.batch_item_failures.extend(expiry_failures);
    for seq_no in failed_rounds {
        let mut failure = DynamoDbBatchItemFailure::default();
        failure.item_identifier = seq_no;
        response.batch_item_failures.push(failure);
    }
    crate::metrics::batch_response(&response);
    response
}

/// Redelivery rounds of one batch run one at a time, in stream order: a connection owed
/// several frames gets them in id order when it recovers.
const REDELIVERY_ROUNDS_AT_ONCE: usize = 1;

/// The batch's events, one unit at a time in stream order, stopping at the first that fails.
async fn deliver_in_order(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    units: Vec<(Option<String>, Unit)>,
    now_ms: &impl Fn() -> i64,
    deadline: Option<Instant>,
) -> DynamoDbEventResponse {
    let mut response = DynamoDbEventResponse::default();
    // A room's units of one batch go together, so a recipient that opted in gets them packed
    // in as few POSTs as fit ([`crate::batching`]); a room with one unit goes as before.
    for (first_seq_no, group) in crate::batching::by_room(units) {
        // A unit that starts after the deadline cannot send anything; without this check it
        // would "finish" on its first poll (every send refused as out of time) and be
        // checkpointed past unsent — the `timeout_at` backstop below never fires for a future
        // that is already ready.
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        let started = crate::metrics::broadcast_started();
        let ends = crate::batching::ends(&group);
        // Every line logged for this unit (retries, refusals, its outcome) names its room and ids.
        let span = crate::telemetry::unit_span(&ends);
        let work = async {
            if out_of_time {
                return Err(FanoutError::OutOfTime);
            }
            match group.as_slice() {
                [Unit::Single(event)] => {
                    deliver_event_until(store, deliver, config, event, now_ms(), deadline).await
                }
                [Unit::Presence(run)] => {
                    deliver_presence(store, deliver, config, run, now_ms(), deadline).await
                }
                units => {
                    crate::batching::deliver_group(
                        store,
                        deliver,
                        config,
                        units,
                        now_ms(),
                        deadline,
                    )
                    .await
                }
            }
        };
        // A backstop for a store call that hangs: the per-delivery checks stop sending in time.
        let work = tracing::Instrument::instrument(work, span.clone());
        let outcome = match deadline {
            Some(d) => tokio::time::timeout_at(d, work)
                .await
                .unwrap_or(Err(FanoutError::OutOfTime)),
            None => work.await,
        };
        let _in_unit = span.enter();
        let first = ends.first().map_or(0, |e| e.seq);
        match outcome {
            Ok(report) => {
                crate::metrics::broadcast_done(&report, started);
                // One outcome line per unit, in its own span (room, ids), as before grouping:
                // a message is followed from its commit to its delivery by room and id. A
                // group's units share its counts.
                drop(_in_unit);
                for unit in &group {
                    let events = unit.events();
                    let _unit = crate::telemetry::unit_span(events).entered();
                    info!(
                        first_event_id = events.first().map_or(0, |e| e.seq),
                        last_event_id = events.last().map_or(0, |e| e.seq),
                        delivered = report.delivered,
                        pruned = report.pruned.len(),
                        rejected = report.rejected,
                        redelivering = report.redelivering,
                        presence_skipped = report.presence_skipped,
                        "fanned out"
                    )
                }
            }
            Err(e) => {
                warn!(first_event_id = first, error = %e, cause = ?std::error::Error::source(&e), "fan-out failed; Lambda will retry from this record");
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = first_seq_no;
                response.batch_item_failures.push(failure);
                // Later records wait: delivering them now would reorder the room.
                break;
            }
        }
    }
    response
}

/// How many of a room's member shards are read at once. Each shard is read a page at a time,
/// so a broadcast holds at most this many pages (plus the frames in flight), whatever the
/// room's size: memory stays flat in the number of members.
pub const SHARDS_AT_ONCE: usize = 8;

/// The members of `room`, as one stream: the room's shard count (strongly consistent, so every
/// member whose join committed is in shards `0..shards`), then the shards' pages read lazily,
/// [`SHARDS_AT_ONCE`] shards in parallel, each page handed on as it arrives (the next page of a
/// shard is fetched while the previous one is still being delivered). Only `room`'s members
/// are read: a broadcast's read cost is proportional to its room. Also what every other
/// reader of a whole room (`chat-replay redeliver --dry-run`, `chat-bench`) walks it with.
pub fn members<'a>(
    store: &'a dyn ChatStore,
    room: &'a str,
    now_ms: i64,
) -> impl Stream<Item = Result<Member, StoreError>> + Send + 'a {
    stream::once(store.member_shards(room, now_ms))
        .map(move |shards| match shards {
            Ok(shards) => stream::iter(0..shards)
                .map(move |shard| shard_pages(store, room, shard, now_ms))
                .flatten_unordered(SHARDS_AT_ONCE)
                .left_stream(),
            Err(e) => stream::once(async { Err(e) }).right_stream(),
        })
        .flatten()
        .flat_map(|page| match page {
            Ok(members) => stream::iter(members.into_iter().map(Ok)).left_stream(),
            Err(e) => stream::once(async { Err(e) }).right_stream(),
        })
}

/// One shard's member pages, in order, each read when the previous one has been taken.
fn shard_pages<'a>(
    store: &'a dyn ChatStore,
    room: &'a str,
    shard: u32,
    now_ms: i64,
) -> BoxStream<'a, Result<Vec<Member>, StoreError>> {
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
        match store
            .members_page(room, shard, after.as_deref(), now_ms)
            .await
        {
            Ok(page) => {
                let next = page.next.map_or(Cursor::Done, Cursor::After);
                Some((Ok(page.members), next))
            }
            Err(e) => Some((Err(e), Cursor::Done)),
        }
    })
    .boxed()
}

/// Delivers one event to whoever should see it, then prunes the connections found gone.
pub async fn deliver_event(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    stored: &StoredEvent,
    now_ms: i64,
) -> Result<DeliveryReport, FanoutError> {
    deliver_event_until(store, deliver, config, stored, now_ms, None).await
}

/// [`deliver_event`] that stops retrying at `deadline`.
pub async fn deliver_event_until(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    stored: &StoredEvent,
    now_ms: i64,
    deadline: Option<Instant>,
) -> Result<DeliveryReport, FanoutError> {
    let sender = Sender {
        deliver,
        config,
        deadline,
    };
    let outcomes = match &stored.event {
        ChatEvent::PrivateMessageSent {
            to_connection_id, ..
        } => {
            let frames: Arc<[Vec<u8>]> = Arc::new([stored.message_frame().to_json().into_bytes()]);
            let mut tally = Tally::default();
            tally.record(
                to_connection_id.clone(),
                sender.send_all(to_connection_id, &frames).await,
            );
            (tally, frames)
        }
        ChatEvent::MessagePosted { .. } => {
            let frames: Arc<[Vec<u8>]> = Arc::new([stored.message_frame().to_json().into_bytes()]);
            let mut failed_read = None;
            let outcomes = sender
                .broadcast(
                    members(store, &stored.room, now_ms).filter_map(|m| {
                        let member = match m {
                            Ok(member) => Some(member.connection_id),
                            Err(e) => {
                                failed_read.get_or_insert(e);
                                None
                            }
                        };
                        async move { member }
                    }),
                    &frames,
                )
                .await;
            if let Some(e) = failed_read {
                return Err(e.into());
            }
            (outcomes, frames)
        }
        ChatEvent::MemberJoined { .. }
        | ChatEvent::MemberRenamed { .. }
        | ChatEvent::MemberLeft { .. } => {
            return deliver_presence(
                store,
                deliver,
                config,
                std::slice::from_ref(stored),
                now_ms,
                deadline,
            )
            .await;
        }
    };
    let (outcomes, frames) = outcomes;
    let owed = Owed {
        room: &stored.room,
        event_id: stored.seq,
        frames: &frames,
        round: 0,
    };
    settle(store, outcomes, owed, now_ms).await
}

/// Delivers a run of presence changes: each member gets one `members` snapshot and one
/// `systemMessage` per change ([`crate::presence`]), unless the room is over `presence_limit`.
pub async fn deliver_presence(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    run: &[StoredEvent],
    now_ms: i64,
    deadline: Option<Instant>,
) -> Result<DeliveryReport, FanoutError> {
    let Some(last) = run.last() else {
        return Ok(DeliveryReport::default());
    };
    // A run is of one room (see `handle_stream_event`): its members get its frames.
    let room = last.room.as_str();
    // The `members` frame needs the whole list, so this is the one place members are held;
    // the limit (counted in this room) bounds it.
    let mut all: Vec<Member> = Vec::new();
    let mut listing = pin!(members(store, room, now_ms));
    while let Some(member) = listing.next().await {
        all.push(member?);
        if all.len() > config.presence_limit {
            debug!(
                limit = config.presence_limit,
                "room over the presence limit; not broadcasting presence"
            );
            return Ok(DeliveryReport {
                presence_skipped: true,
                ..DeliveryReport::default()
            });
        }
    }
    all.sort_by_key(|m| m.name.to_lowercase());
    let names = all.iter().map(|m| m.name.clone()).collect();
    let frames: Arc<[Vec<u8>]> = presence_frames(run, names)
        .iter()
        .map(|f| f.to_json().into_bytes())
        .collect();
    let sender = Sender {
        deliver,
        config,
        deadline,
    };
    let outcomes = sender
        .broadcast(stream::iter(all).map(|m| m.connection_id), &frames)
        .await;
    let owed = Owed {
        room: &last.room,
        event_id: last.seq,
        frames: &frames,
        round: 0,
    };
    settle(store, outcomes, owed, now_ms).await
}

/// Sends one redelivery round (see [`crate::redelivery`]): one more try for each connection
/// (two for 429), after its backoff; those still failing go to the next round, or are given up
/// after the last.
pub async fn deliver_redelivery(
    store: &dyn ChatStore,
    deliver: &dyn Deliver,
    config: &FanoutConfig,
    round: &Redelivery,
    now_ms: i64,
    deadline: Option<Instant>,
) -> Result<DeliveryReport, FanoutError> {
    let wait = Duration::from_millis(round.not_before_ms.saturating_sub(now_ms).max(0) as u64)
        .min(redelivery::MAX_WAIT);
    if deadline.is_some_and(|d| Instant::now() + wait >= d) {
        return Err(FanoutError::OutOfTime);
    }
    tokio::time::sleep(wait).await;
    let config = FanoutConfig {
        max_attempts: 1,
        max_throttled_attempts: 2,
        ..config.clone()
    };
    let sender = Sender {
        deliver,
        config: &config,
        deadline,
    };
    let frames: Arc<[Vec<u8>]> = round
        .frames
        .iter()
        .map(|f| f.clone().into_bytes())
        .collect();
    let outcomes = sender
        .broadcast(stream::iter(round.connection_ids.iter().cloned()), &frames)
        .await;
    let owed = Owed {
        room: &round.room,
        event_id: round.event_id,
        frames: &frames,
        round: round.round,
    };
    settle(store, outcomes, owed, now_ms + wait.as_millis() as i64).await
}

pub use crate::presence::presence_frames;

/// The outcomes of a unit's deliveries, counted as they complete: a broadcast keeps counts
/// and the (few) gone connections, never one entry per recipient.
#[derive(Default)]
struct Tally {
    report: DeliveryReport,
    /// Recipients still failing after their attempts (5xx, 429): owed a redelivery.
    failing: Vec<String>,
    /// A recipient was not tried, or not finished, for lack of time.
    out_of_time: bool,
}

impl Tally {
    fn record(&mut self, connection_id: String, outcome: Result<(), DeliveryError>) {
        match outcome {
            Ok(()) => self.report.delivered += 1,
            Err(DeliveryError::Gone) => self.report.pruned.push(connection_id),
            // Out of time is "not yet", never "refused": the unit must fail so Lambda retries
            // it (a broadcast cut short does not even know who it has not reached).
            Err(DeliveryError::OutOfTime) => self.out_of_time = true,
            Err(e) if e.is_retryable() => {
                debug!(connection_id, error = %e, "still failing after retries");
                self.failing.push(connection_id);
            }
            Err(e) => {
                warn!(connection_id, error = %e, "frame refused; not retrying");
                self.report.rejected += 1;
            }
        }
    }
}

/// What a unit's failing recipients are owed: its frames, and which round this was (0: the
/// broadcast itself).
struct Owed<'a> {
    room: &'a str,
    event_id: u64,
    frames: &'a [Vec<u8>],
    round: u32,
}

/// Prunes the connections found gone, hands recipients still failing to the next redelivery
/// round (or gives them up after the last), and fails if the unit ran out of time.
async fn settle(
    store: &dyn ChatStore,
    tally: Tally,
    owed: Owed<'_>,
    now_ms: i64,
) -> Result<DeliveryReport, FanoutError> {
    let Tally {
        mut report,
        failing,
        out_of_time,
    } = tally;
    if !report.pruned.is_empty() {
        // Their MemberLeft events go through the stream like any other, so others see them leave.
        store
            .remove_connections(&report.pruned, LeaveReason::Gone, now_ms)
            .await?;
    }
    if out_of_time {
        return Err(FanoutError::OutOfTime);
    }
    if failing.is_empty() {
        return Ok(report);
    }
    let next = owed.round + 1;
    if next > redelivery::MAX_ROUNDS {
        // History keeps the event: a client that catches up by id still gets it.
        error!(
            event_id = owed.event_id,
            recipients = failing.len(),
            rounds = redelivery::MAX_ROUNDS,
            "giving up on recipients still failing after every redelivery round"
        );
        report.given_up = failing.len();
        return Ok(report);
    }
    report.redelivering = failing.len();
    let frames: Vec<String> = owed
        .frames
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect();
    let not_before = now_ms + redelivery::backoff(next).as_millis() as i64;
    for round in redelivery::chunks(owed.room, owed.event_id, &frames, failing, next, not_before) {
        // Written before the record is checkpointed: if this fails, the unit fails and Lambda
        // retries it whole, so nothing owed is lost.
        store.schedule_redelivery(&round, now_ms).await?;
    }
    Ok(report)
}

/// Sends frames with bounded concurrency, retries and the deadline.
pub(crate) struct Sender<'a> {
    pub(crate) deliver: &'a dyn Deliver,
    pub(crate) config: &'a FanoutConfig,
    pub(crate) deadline: Option<Instant>,
}

impl Sender<'_> {
    /// Sends `frames` to every connection of the stream, `concurrency` recipients at a time.
    async fn broadcast(
        &self,
        recipients: impl Stream<Item = String>,
        frames: &Arc<[Vec<u8>]>,
    ) -> Tally {
        recipients
            .map(|connection_id| {
                let frames = Arc::clone(frames);
                async move {
                    let r = self.send_all(&connection_id, &frames).await;
                    (connection_id, r)
                }
            })
            .buffer_unordered(self.config.concurrency)
            .fold(Tally::default(), |mut tally, (id, outcome)| async move {
                tally.record(id, outcome);
                tally
            })
            .await
    }

    /// A recipient's frames in order (a join's `members` before its `systemMessage`), each
    /// with retries; stops at the first frame that cannot be delivered.
    async fn send_all(&self, connection_id: &str, frames: &[Vec<u8>]) -> Result<(), DeliveryError> {
        for frame in frames {
            self.send_with_retry(connection_id, frame).await?;
        }
        Ok(())
    }

    pub(crate) async fn send_with_retry(
        &self,
        connection_id: &str,
        data: &[u8],
    ) -> Result<(), DeliveryError> {
        let pacer = &self.config.pacer;
        let mut attempt = 1;
        loop {
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(DeliveryError::OutOfTime);
            }
            pacer.acquire().await;
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(DeliveryError::OutOfTime);
            }
            let outcome = self.deliver.post(connection_id, data).await;
            let (max_attempts, base) = match &outcome {
                Ok(()) => {
                    pacer.accepted();
                    (0, Duration::ZERO)
                }
                Err(DeliveryError::Throttled(_)) => {
                    crate::metrics::throttled();
                    // The whole account is over its quota, not this recipient: slow every
                    // call down, and give this one longer to get through.
                    pacer.throttled();
                    (
                        self.config.max_throttled_attempts,
                        self.config.throttle_backoff,
                    )
                }
                Err(_) => (self.config.max_attempts, self.config.base_backoff),
            };
            match outcome {
                Err(e) if e.is_retryable() && attempt < max_attempts => {
                    // Full jitter: spreads the retries of a throttled broadcast instead of
                    // sending them back in one synchronised wave.
                    let cap = (base.as_millis() as u64)
                        .saturating_mul(1 << (attempt - 1).min(10))
                        .min(self.config.max_backoff.as_millis() as u64);
                    let wait = Duration::from_millis(rand::rng().random_range(0..=cap.max(1)));
                    if self.deadline.is_some_and(|d| Instant::now() + wait >= d) {
                        // No time to wait and try again: leave it to Lambda's retry.
                        return Err(e);
                    }
                    debug!(connection_id, attempt, ?wait, error = %e, "retrying delivery");
                    crate::metrics::retried();
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }
}
