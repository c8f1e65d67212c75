//! The embedded (in-process) adapter of [`ChatStore`], and its change feed.
//!
//! This module owns the whole state of a chat that runs without DynamoDB: connections, name
//! claims, the room's sequence counter and the event log, all behind one mutex so every
//! operation checks and writes atomically, the way one `TransactWriteItems` does in
//! [`super::dynamodb::DynamoStore`]. It keeps that adapter's contract exactly (the shared
//! contract suite in `tests/tests/store_contract.rs` runs against both): the same conditions,
//! the same errors, the same TTL arithmetic (`expiresAt` in epoch seconds, and every read
//! treating `expiresAt <= now` as absent), the same member order and pagination.
//!
//! Every committed event also becomes a stream record, shaped exactly as DynamoDB Streams
//! hands it to Lambda (`INSERT`, `Keys`, `NewImage` = the same [`EventItem`] the DynamoDB
//! adapter writes, a `SequenceNumber` whose string order is its numeric order). An
//! [`EmbeddedFeed`] reads those records as a [`RecordSource`], so the local event source
//! mapping drives the fan-out from it as Lambda would from the table's stream.
//! [`EmbeddedStore::expire`] plays DynamoDB's TTL sweeper: expired items go, and each expired
//! event leaves a `REMOVE` record marked as done by the DynamoDB service.
//!
//! By default the store is ideal: every call is instant and every read strongly consistent.
//! [`EmbeddedStore::with_behaviour`] makes it behave like DynamoDB
//! ([`super::aws_like::StoreBehaviour`]): each operation takes the time of the calls the
//! DynamoDB adapter makes for it, reads the adapter makes without `ConsistentRead`
//! ([`super::aws_like::ReadOp`]) miss recent writes, appends collide on the room's counter as
//! optimistic transactions do, and the room's partitions have DynamoDB's throughput. In every
//! mode it enforces DynamoDB's limits with DynamoDB's errors ([`super::limits`]) and meters the
//! request units DynamoDB would bill ([`EmbeddedStore::consumed`]).
//!
//! The feed keeps every record for the life of the process (DynamoDB Streams trims after
//! 24 h; a local run is not expected to live long enough for that to matter).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::{EventRecord, StreamRecord, StreamViewType, UserIdentity};
use serde_dynamo::{AttributeValue, Item};
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::warn;

use super::aws_like::{PartitionThroughput, ReadOp, ReadTally, StoreBehaviour};
use super::limits;
use super::{
    epoch_secs, ChatStore, Connection, EventRange, EventsPage, Joined, Member, MembersPage,
    StoreError, NAME_RESERVATION_SECS,
};
use crate::config::Retention;
use crate::events::{ChatEvent, EventItem, LeaveReason, StoredEvent};
use crate::keys;
use crate::ratelimit::{self, Bucket, RateLimit};
use crate::redelivery::{Redelivery, RedeliveryItem};
use crate::stream::{RecordSource, SourceError};
use crate::validation::{recipient_key, ValidName};

/// The region, account and stream label of the ARN every record carries. Nothing routes on
/// them; they only have to look like a DynamoDB stream ARN.
const STREAM_ARN_PREFIX: &str = "arn:aws:dynamodb:local:000000000000:table/";
const REGION: &str = "local";
/// Digits of a stream sequence number: zero-padded so comparing the strings compares the
/// numbers, as with DynamoDB's own (21-digit) sequence numbers.
const SEQUENCE_DIGITS: usize = 21;

/// A connection item (`CONN#<id>`).
#[derive(Debug, Clone)]
struct ConnItem {
    connection_id: String,
    connected_at: i64,
    /// TTL, epoch seconds.
    expires_at: i64,
    /// Set by `setName`: the display name and its claim key, always together.
    name: Option<Named>,
    /// The rate-limit bucket (`rlTokens`, `rlAt`).
    bucket: Option<Bucket>,
    /// The authenticated subject, when `$connect` authentication is on.
    identity: Option<String>,
}

#[derive(Debug, Clone)]
struct Named {
    display: String,
    key: String,
}

/// A name claim (`NAME#<nameKey>`): who holds the name, until when.
#[derive(Debug, Clone)]
struct Claim {
    /// `None` once released by an authenticated holder: the name is then reserved for its
    /// identity until `expires_at`.
    connection_id: Option<String>,
    identity: Option<String>,
    /// Kept as the DynamoDB claim item keeps it, though nothing here reads it back.
    #[allow(dead_code)]
    name: String,
    /// The holder's connection expiry: an abandoned name frees itself.
    expires_at: i64,
}

/// An event item in the event table.
#[derive(Debug, Clone)]
struct StoredItem {
    event: StoredEvent,
    expires_at: i64,
    /// When it was written, for eventually consistent reads.
    committed: Instant,
}

/// A connection item as it was before a write changed it (`None`: it did not exist), kept
/// while an eventually consistent read may still see the old version.
#[derive(Debug)]
struct ConnChange {
    at: Instant,
    sk: String,
    before: Option<ConnItem>,
}

/// Everything the mutex guards: one operation sees and changes all of it at once.
#[derive(Debug, Default)]
struct State {
    /// Keyed by the connection's sort key (`CONN#<id>`), so iterating the map is the order of
    /// DynamoDB's member query (byte-wise lexicographic on the sort key) and a page cursor is
    /// the same string in both adapters.
    connections: BTreeMap<String, ConnItem>,
    /// Keyed by the lower-cased name.
    claims: HashMap<String, Claim>,
    /// The last event id given out in the room (the `SEQ` item).
    seq: u64,
    /// The event table, by id.
    events: BTreeMap<u64, StoredItem>,
    /// The event table's stream, in commit order, with each record's sequence number.
    log: Vec<(u64, EventRecord)>,
    /// The last stream sequence number given out (INSERTs and REMOVEs share it).
    stream_seq: u64,
    /// Write operations still to fail, for tests of failure handling.
    failures_left: usize,
    /// Recent changes to connection items, oldest first, kept for `lag` (the longest an
    /// eventually consistent read can lag; zero keeps none).
    conn_changes: VecDeque<ConnChange>,
    lag: Duration,
    /// Reads served, by kind and consistency.
    reads: BTreeMap<ReadOp, ReadTally>,
    /// Appends that found the room's counter moved since they read it (AWS-like mode).
    collisions: u64,
    /// Request units left in the room's partition of each table (AWS-like mode).
    capacity: Capacity,
    /// Request units used, as DynamoDB on-demand would bill them.
    consumed: Consumed,
}

/// DynamoDB request units an embedded store has used, by the DynamoDB adapter's calls for the
/// same operations: a write unit per KB per item written or checked (twice in a transaction),
/// a read unit per 4 KB read strongly consistent and half of one eventually consistent (as each
/// read's `ConsistentRead` flag asks, whatever the mode). Conditional writes that fail are not
/// counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Consumed {
    /// Halves of read units, so eventually consistent reads count exactly.
    pub read_half_units: u64,
    pub write_units: u64,
}

impl Consumed {
    pub fn read_units(&self) -> f64 {
        self.read_half_units as f64 / 2.0
    }
}

/// The room's partition in each table: units left, and when they were last topped up. Every
/// item of the chat sits under the room's partition key, so the whole room shares them.
#[derive(Debug, Default)]
struct Capacity {
    conn_write: Units,
    conn_read: Units,
    event_write: Units,
    event_read: Units,
}

#[derive(Debug, Default)]
struct Units {
    /// `None` until first used: a partition starts with a full second's worth.
    left: Option<(f64, Instant)>,
}

impl Units {
    /// Tops up at `per_sec` (holding at most one second's worth) and says whether `need`
    /// units are there.
    fn has(&mut self, per_sec: f64, need: f64) -> bool {
        let now = Instant::now();
        let (left, at) = self.left.unwrap_or((per_sec, now));
        let left = (left + now.duration_since(at).as_secs_f64() * per_sec).min(per_sec);
        self.left = Some((left, now));
        left >= need
    }

    /// Uses `units` (after [`Units::has`]; may go below zero for a read that turned out
    /// bigger, which the next requests then wait out, as DynamoDB's own accounting does).
    fn spend(&mut self, units: f64) {
        if let Some((left, _)) = &mut self.left {
            *left -= units;
        }
    }
}

/// DynamoDB's answer to a request over a partition's throughput, as the SDK surfaces it once
/// its own retries are spent.
pub const THROTTLED: &str = "ProvisionedThroughputExceededException";
const THROTTLED_MESSAGE: &str = "The level of configured provisioned throughput for the table was exceeded. Consider increasing your provisioning level with the UpdateTable API.";
/// Attempts the SDK makes (its standard retry mode) before it surfaces a throttle.
const SDK_ATTEMPTS: u32 = 3;

impl State {
    fn live_conn(&self, connection_id: &str, now_s: i64) -> Option<&ConnItem> {
        self.connections
            .get(&keys::conn_sk(connection_id))
            .filter(|c| c.expires_at > now_s)
    }

    /// Writes (or, with `None`, deletes) a connection item, keeping its old version while an
    /// eventually consistent read may still see it.
    fn put_conn(&mut self, sk: String, item: Option<ConnItem>) {
        let before = match item {
            Some(item) => self.connections.insert(sk.clone(), item),
            None => self.connections.remove(&sk),
        };
        if self.lag.is_zero() {
            return;
        }
        let now = Instant::now();
        while self
            .conn_changes
            .front()
            .is_some_and(|c| now.duration_since(c.at) > self.lag)
        {
            self.conn_changes.pop_front();
        }
        self.conn_changes.push_back(ConnChange {
            at: now,
            sk,
            before,
        });
    }

    /// Every connection item changed after `cutoff`, as it was before its first change since.
    fn conns_before(&self, cutoff: Instant) -> BTreeMap<String, Option<ConnItem>> {
        let mut older = BTreeMap::new();
        // Newest first, so the oldest change's "before" is the one that stays.
        for change in self.conn_changes.iter().rev() {
            if change.at <= cutoff {
                break;
            }
            older.insert(change.sk.clone(), change.before.clone());
        }
        older
    }

    /// A connection item as a read sees it: now (`None`), or as of `cutoff`.
    fn conn_as_of(&self, sk: &str, cutoff: Option<Instant>) -> Option<&ConnItem> {
        if let Some(cutoff) = cutoff {
            let first_since = self
                .conn_changes
                .iter()
                .find(|c| c.at > cutoff && c.sk == sk);
            if let Some(change) = first_since {
                return change.before.as_ref();
            }
        }
        self.connections.get(sk)
    }

    fn live_claim(&self, key: &str, now_s: i64) -> Option<&Claim> {
        self.claims.get(key).filter(|c| c.expires_at > now_s)
    }

    /// Fails the operation `op` if a failure was injected; checked before anything is read or
    /// written, so a failed operation leaves no trace.
    /// Gives up a name claim the connection still holds (an expired one may belong to someone
    /// else by now): removed, or kept for an authenticated holder's identity as a reservation.
    fn release(&mut self, key: &str, connection_id: &str, identity: Option<&str>, now_s: i64) {
        let Some(claim) = self.claims.get_mut(key) else {
            return;
        };
        if claim.connection_id.as_deref() != Some(connection_id) {
            return;
        }
        match identity {
            Some(_) => {
                claim.connection_id = None;
                claim.expires_at = now_s + NAME_RESERVATION_SECS;
            }
            None => {
                self.claims.remove(key);
            }
        }
    }

    fn injected_failure(&mut self, op: &'static str) -> Result<(), StoreError> {
        if self.failures_left == 0 {
            return Ok(());
        }
        self.failures_left -= 1;
        Err(StoreError::backend(
            op,
            "injected failure (EmbeddedStore::fail_next_writes)",
        ))
    }

    /// Gives the next stream sequence number to `record` and appends it to the stream.
    fn publish(&mut self, instance: u64, mut record: EventRecord) {
        self.stream_seq += 1;
        record.change.sequence_number = Some(format!(
            "{:0width$}",
            self.stream_seq,
            width = SEQUENCE_DIGITS
        ));
        // Unique across stores in one process and across runs, like DynamoDB's event ids.
        record.event_id = format!("{instance:016x}{:016x}", self.stream_seq);
        self.log.push((self.stream_seq, record));
    }

    /// Commits a prepared event: the counter moves to its id, the item is stored and its
    /// INSERT record is published. Infallible, so it runs only once every check has passed.
    fn commit(&mut self, instance: u64, mut pending: PendingEvent) -> StoredEvent {
        pending.item.committed = Instant::now();
        self.seq = pending.item.event.seq;
        let stored = pending.item.event.clone();
        self.events.insert(stored.seq, pending.item);
        self.publish(instance, pending.record);
        stored
    }
}

/// An event with its id and stream record built, not yet committed. Building is the only
/// fallible part of an append, so it happens before any state changes.
struct PendingEvent {
    item: StoredItem,
    record: EventRecord,
}

/// What the store and its feeds share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Woken after every change to the stream, so waiting feeds need not poll.
    changed: Notify,
    retention: Retention,
    room: String,
    room_pk: String,
    stream_arn: String,
    /// Random per store: the high half of every record's `eventID`.
    instance: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation checks and builds everything fallible before its first change, so a
        // panic under the lock cannot have left half an operation behind; the state is sound.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Builds event `seq = current + 1` and its stream record, as the DynamoDB adapter's
    /// `append` does: the event expires after the history's retention.
    fn prepare(
        &self,
        current: u64,
        event: ChatEvent,
        now_ms: i64,
    ) -> Result<PendingEvent, StoreError> {
        let stored = StoredEvent {
            room: self.room.clone(),
            seq: current + 1,
            ts: now_ms,
            event,
        };
        let expires_at = epoch_secs(now_ms) + self.retention.event_retention.as_secs() as i64;
        // The same item the DynamoDB adapter writes: `EventItem` is the one source of its shape.
        let image: Item = serde_dynamo::to_item(EventItem::new(&stored, expires_at))
            .map_err(|e| StoreError::Malformed(format!("event item: {e}")))?;
        // DynamoDB refuses the whole transaction for one item over 400 KB.
        limits::check_item(&image).map_err(|e| StoreError::backend("TransactWriteItems", e))?;
        let keys = event_keys(&self.room_pk, stored.seq);
        let change = stream_change(now_ms, keys, image)
            .map_err(|e| StoreError::Malformed(format!("stream record: {e}")))?;
        let record = self.record("INSERT", change);
        Ok(PendingEvent {
            item: StoredItem {
                event: stored,
                expires_at,
                committed: Instant::now(),
            },
            record,
        })
    }

    /// A stream record of the event table, everything but its sequence number and id.
    fn record(&self, event_name: &str, change: StreamRecord) -> EventRecord {
        let mut record = EventRecord::default();
        record.aws_region = REGION.to_owned();
        record.change = change;
        record.event_name = event_name.to_owned();
        record.event_source = Some("aws:dynamodb".to_owned());
        record.event_version = Some("1.1".to_owned());
        record.event_source_arn = Some(self.stream_arn.clone());
        record
    }

    /// Records after stream sequence number `after`, at most `max`.
    fn records_after(&self, after: u64, max: usize) -> Vec<EventRecord> {
        let state = self.lock();
        let start = state.log.partition_point(|(seq, _)| *seq <= after);
        state.log[start..]
            .iter()
            .take(max)
            .map(|(_, record)| record.clone())
            .collect()
    }
}

/// The key of an event item (`pk`, `seq`), as a stream record's `Keys`.
fn event_keys(room_pk: &str, seq: u64) -> Item {
    Item::from(HashMap::from([
        (keys::PK.to_owned(), AttributeValue::S(room_pk.to_owned())),
        (keys::SEQ.to_owned(), AttributeValue::N(seq.to_string())),
    ]))
}

/// The `dynamodb` member of a record. `ApproximateCreationDateTime` is set by deserialising
/// whole epoch seconds, which is what Lambda sends (and chrono is not a dependency here).
fn stream_change(
    now_ms: i64,
    keys: Item,
    new_image: Item,
) -> Result<StreamRecord, serde_json::Error> {
    let mut change: StreamRecord = serde_json::from_value(json!({
        "ApproximateCreationDateTime": epoch_secs(now_ms),
        "SizeBytes": limits::item_size(&keys) + limits::item_size(&new_image),
    }))?;
    change.keys = keys;
    change.new_image = new_image;
    // The event table's stream view type (template.yaml): images of new items only, so a
    // REMOVE carries its keys and no image.
    change.stream_view_type = Some(StreamViewType::NewImage);
    Ok(change)
}

/// Member items per page when no limit is set (see [`EmbeddedStore`]'s `page_limit`).
pub const DEFAULT_PAGE_ITEMS: usize = 1_000;

/// The embedded store: cheap to clone, every clone (and every [`EmbeddedFeed`]) sees the same
/// chat.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// Connection items evaluated per member page, like DynamoDB's `Limit`. DynamoDB ends a
    /// page at 1 MB (a few thousand member items) even without one; [`DEFAULT_PAGE_ITEMS`]
    /// stands in for that, so a broadcast streams its recipients here as it does on AWS.
    page_limit: Option<usize>,
    /// Ideal, or like DynamoDB (latency, eventual consistency, contention).
    behaviour: StoreBehaviour,
    /// A read served eventually consistent although the adapter asks for it strongly
    /// consistent: for tests of the emulator itself, now that every read the adapter makes is
    /// strongly consistent ([`EmbeddedStore::reading_eventually`]).
    forced_eventual: Option<ReadOp>,
}

impl EmbeddedStore {
    /// A store for the one room ([`keys::DEFAULT_ROOM`]) with the given item lifetimes.
    pub fn new(retention: Retention) -> Self {
        let room = keys::DEFAULT_ROOM.to_owned();
        EmbeddedStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                retention,
                room_pk: keys::room_pk(&room),
                room,
                stream_arn: format!("{STREAM_ARN_PREFIX}events/stream/embedded"),
                instance: rand::random(),
            }),
            page_limit: Some(DEFAULT_PAGE_ITEMS),
            behaviour: StoreBehaviour::IDEAL,
            forced_eventual: None,
        }
    }

    /// Serves reads of `op` eventually consistent, whatever the adapter asks (only in a
    /// lagging AWS-like mode): lets a test show what an eventually consistent read of that
    /// kind would miss.
    pub fn reading_eventually(mut self, op: ReadOp) -> Self {
        self.forced_eventual = Some(op);
        self
    }

    /// Whether reads of `op` are served strongly consistent (as the adapter asks them).
    fn consistent(&self, op: ReadOp) -> bool {
        op.consistent_read() && self.forced_eventual != Some(op)
    }

    /// Behaves as `behaviour` says (this store and the clones made from it after). An
    /// eventually consistent read of a store switched to lagging only misses writes made
    /// after the switch.
    pub fn with_behaviour(mut self, behaviour: StoreBehaviour) -> Self {
        self.shared.lock().lag = behaviour.eventual_max;
        self.behaviour = behaviour;
        self
    }

    pub fn behaviour(&self) -> StoreBehaviour {
        self.behaviour
    }

    /// The reads served so far, by kind: how many were strongly consistent and how many
    /// eventually consistent (in ideal mode every read is strongly consistent).
    pub fn reads(&self) -> BTreeMap<ReadOp, ReadTally> {
        self.shared.lock().reads.clone()
    }

    /// The DynamoDB request units used so far (see [`Consumed`]).
    pub fn consumed(&self) -> Consumed {
        self.shared.lock().consumed
    }

    /// How many times a writer found the room's sequence counter moved between its read and
    /// its commit, and had to try again (AWS-like mode only; DynamoDB cancels the
    /// transaction then).
    pub fn counter_collisions(&self) -> u64 {
        self.shared.lock().collisions
    }

    /// Evaluates at most `limit` connection items per member page (for tests of pagination),
    /// as [`super::dynamodb::DynamoStore::with_page_limit`] does. DynamoDB rejects a `Limit`
    /// of 0, so 0 is taken as 1.
    pub fn with_page_limit(mut self, limit: usize) -> Self {
        self.page_limit = Some(limit.max(1));
        self
    }

    /// A new reader of the change feed, starting at the oldest record (TRIM_HORIZON) with its
    /// own checkpoint.
    pub fn feed(&self) -> EmbeddedFeed {
        EmbeddedFeed {
            shared: Arc::clone(&self.shared),
            checkpoint: 0,
        }
    }

    /// The events in the event table, in id order (expired events stay until [`Self::expire`]
    /// removes them, as in DynamoDB).
    pub fn events(&self) -> Vec<StoredEvent> {
        self.shared
            .lock()
            .events
            .values()
            .map(|item| item.event.clone())
            .collect()
    }

    /// DynamoDB's TTL sweeper: deletes every item whose `expiresAt` has passed at `now_ms`
    /// (events, connections and name claims; never the sequence counter). Each deleted event
    /// appears in the feed as a `REMOVE` record by the DynamoDB service, as TTL deletions do on
    /// a real stream. Returns how many items were deleted.
    pub fn expire(&self, now_ms: i64) -> usize {
        let now_s = epoch_secs(now_ms);
        let mut state = self.shared.lock();
        let expired: Vec<u64> = state
            .events
            .iter()
            .filter(|(_, item)| item.expires_at <= now_s)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &expired {
            state.events.remove(seq);
            match stream_change(
                now_ms,
                event_keys(&self.shared.room_pk, *seq),
                Item::default(),
            ) {
                Ok(change) => {
                    let mut record = self.shared.record("REMOVE", change);
                    let mut identity = UserIdentity::default();
                    identity.type_ = "Service".to_owned();
                    identity.principal_id = "dynamodb.amazonaws.com".to_owned();
                    record.user_identity = Some(identity);
                    state.publish(self.shared.instance, record);
                }
                // Cannot happen for a timestamp and a size; the item is gone either way, and
                // the fan-out skips removals, so only the log line is lost.
                Err(e) => warn!(seq, error = %e, "could not build the REMOVE record"),
            }
        }
        let connections = state.connections.len();
        state.connections.retain(|_, c| c.expires_at > now_s);
        let claims = state.claims.len();
        state.claims.retain(|_, c| c.expires_at > now_s);
        let removed =
            expired.len() + (connections - state.connections.len()) + (claims - state.claims.len());
        drop(state);
        if !expired.is_empty() {
            self.shared.changed.notify_waiters();
        }
        removed
    }

    /// Makes the next `n` write operations (`add_connection`, `set_name`, `post_public`,
    /// `post_private`, `remove_connection`, whatever their outcome would have been) fail with
    /// [`StoreError::Backend`] before they read or change anything.
    pub fn fail_next_writes(&self, n: usize) {
        self.shared.lock().failures_left = n;
    }

    /// Commits `pending` (after the caller's state changes) and wakes the feeds.
    fn finish(&self, state: &mut State, pending: PendingEvent) -> StoredEvent {
        let stored = state.commit(self.shared.instance, pending);
        self.shared.changed.notify_waiters();
        stored
    }
}

/// The DynamoDB calls one trait operation makes on its way to a commit (the DynamoDB adapter's
/// happy path), which is what the operation costs in AWS-like mode.
#[derive(Debug, Clone, Copy)]
struct Calls {
    /// Strongly consistent GetItems before the write (the last one reads the counter).
    reads: u32,
    /// Items of the connections table the write puts, updates, deletes or checks (all under
    /// the room's partition key), each under 1 KB: a write unit each, two in a transaction.
    conn_items: u32,
    /// Whether the write is a `TransactWriteItems` (every unit counts twice).
    transaction: bool,
    /// Whether the write appends an event, i.e. commits on the condition that the room's
    /// sequence counter has not moved since it was read.
    appends: bool,
}

const PUT_CONNECTION: Calls = Calls {
    reads: 0,
    conn_items: 1,
    transaction: false,
    appends: false,
};
/// Connection, claim, counter.
const SET_NAME: Calls = Calls {
    reads: 3,
    conn_items: 3,
    transaction: true,
    appends: true,
};
/// Connection, counter.
const POST_PUBLIC: Calls = Calls {
    reads: 2,
    conn_items: 2,
    transaction: true,
    appends: true,
};
/// Sender, recipient's claim, recipient, counter.
const POST_PRIVATE: Calls = Calls {
    reads: 4,
    conn_items: 3,
    transaction: true,
    appends: true,
};
/// Connection, claim, counter.
const REMOVE_CONNECTION: Calls = Calls {
    reads: 3,
    conn_items: 3,
    transaction: true,
    appends: true,
};
/// One PutItem in the event table, outside the room's partitions (its units are not metered
/// against the room's keys; redelivery items are rare and small).
const PUT_REDELIVERY: Calls = Calls {
    reads: 0,
    conn_items: 0,
    transaction: false,
    appends: false,
};
/// Connection, then a conditional UpdateItem.
const TAKE_TOKEN: Calls = Calls {
    reads: 1,
    conn_items: 1,
    transaction: false,
    appends: false,
};

/// An event item's attributes besides its message, roughly (keys, type, ids, names, times).
const EVENT_OVERHEAD: usize = 300;

/// Gives up after this many collisions on the counter, as the DynamoDB adapter does.
const MAX_ATTEMPTS: u32 = 40;

/// The SDK's backoff between attempts of a throttled request: full jitter, doubling from 50 ms.
async fn sdk_backoff(attempt: u32) {
    use rand::Rng;
    let cap_ms = 50u64 << attempt.min(8);
    let ms = rand::rng().random_range(0..=cap_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// Jittered exponential backoff between attempts, the DynamoDB adapter's.
async fn backoff(attempt: u32) {
    use rand::Rng;
    let cap_ms = 2u64.saturating_pow(attempt.min(7)).max(2);
    let ms = rand::rng().random_range(1..=cap_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

impl EmbeddedStore {
    /// Runs one write operation `f` under the lock. In AWS-like mode it first takes the time
    /// of the adapter's reads and transaction, and an appending operation commits only if the
    /// room's counter did not move meanwhile — otherwise it backs off and tries again, as the
    /// DynamoDB adapter's optimistic writers do: that is what caps one room's commit rate.
    async fn write<T>(
        &self,
        op: &'static str,
        calls: Calls,
        event_bytes: usize,
        mut f: impl FnMut(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let b = self.behaviour;
        // Write units: one per KB per item, twice in a transaction; the event item is the
        // only one that can pass 1 KB.
        let factor = if calls.transaction { 2.0 } else { 1.0 };
        let conn_units = factor * f64::from(calls.conn_items);
        let event_units = if calls.appends {
            factor * event_bytes.div_ceil(1024).max(1) as f64
        } else {
            0.0
        };
        let meter = |state: &mut State, done: bool| {
            // The adapter's GetItems are strongly consistent: a unit each.
            state.consumed.read_half_units += 2 * u64::from(calls.reads);
            if done {
                state.consumed.write_units += (conn_units + event_units) as u64;
            }
        };
        if b.read_latency.is_zero()
            && b.write_latency.is_zero()
            && !b.contention
            && b.partition.is_none()
        {
            let mut state = self.shared.lock();
            let done = f(&mut state);
            meter(&mut state, done.is_ok());
            return done;
        }
        for attempt in 1..=MAX_ATTEMPTS {
            sleep(b.read_latency * calls.reads).await;
            self.take_units(
                op,
                |c| &mut c.conn_read,
                |p| p.read_units_per_sec,
                f64::from(calls.reads),
                true,
            )
            .await?;
            let seen = self.shared.lock().seq;
            sleep(b.write_latency).await;
            self.take_units(
                op,
                |c| &mut c.conn_write,
                |p| p.write_units_per_sec,
                conn_units,
                false,
            )
            .await?;
            self.take_units(
                op,
                |c| &mut c.event_write,
                |p| p.write_units_per_sec,
                event_units,
                false,
            )
            .await?;
            {
                let mut state = self.shared.lock();
                if !(b.contention && calls.appends) || state.seq == seen {
                    let done = f(&mut state);
                    meter(&mut state, done.is_ok());
                    // A write DynamoDB refuses before it starts (a limit) uses no units.
                    if done.is_ok() && b.partition.is_some() {
                        state.capacity.conn_write.spend(conn_units);
                        state.capacity.event_write.spend(event_units);
                    }
                    return done;
                }
                state.collisions += 1;
            }
            backoff(attempt).await;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// Waits for `need` units in one of the room's partitions (and takes them if `spend`),
    /// retrying as the SDK does while they are short; a request still short after the SDK's
    /// attempts fails with DynamoDB's throttling error. Nothing to do without a partition
    /// limit or a need.
    async fn take_units(
        &self,
        op: &'static str,
        units: impl Fn(&mut Capacity) -> &mut Units,
        rate: impl Fn(&PartitionThroughput) -> f64,
        need: f64,
        spend: bool,
    ) -> Result<(), StoreError> {
        let Some(partition) = self.behaviour.partition else {
            return Ok(());
        };
        if need <= 0.0 {
            return Ok(());
        }
        let per_sec = rate(&partition);
        for attempt in 1..=SDK_ATTEMPTS {
            {
                let mut state = self.shared.lock();
                let u = units(&mut state.capacity);
                if u.has(per_sec, need.min(per_sec)) {
                    if spend {
                        u.spend(need);
                    }
                    return Ok(());
                }
            }
            if attempt < SDK_ATTEMPTS {
                sdk_backoff(attempt).await;
            }
        }
        Err(StoreError::backend(
            op,
            limits::ServiceError::new(THROTTLED, THROTTLED_MESSAGE),
        ))
    }

    /// Takes one read call's time, then gives the state and the point in time the read sees:
    /// `None` for everything (a strongly consistent read, or ideal mode), else the moment
    /// before which writes are visible. The read is tallied either way.
    /// Meters a read of `bytes`, billed as the adapter asks for it, and charges the
    /// partition what it cost beyond the units `read` already took.
    fn charge_read(&self, state: &mut State, op: ReadOp, bytes: usize) {
        let units = bytes.div_ceil(4096).max(1) as u64;
        state.consumed.read_half_units += if self.consistent(op) {
            2 * units
        } else {
            units
        };
        if self.behaviour.partition.is_none() {
            return;
        }
        // Served as the adapter asks; in ideal mode nothing is charged anyway.
        let consistent = self.consistent(op) || !self.behaviour.lags();
        let taken = if consistent { 1.0 } else { 0.5 };
        let extra = read_units(bytes, consistent) - taken;
        if extra > 0.0 {
            match op {
                ReadOp::QueryEvents | ReadOp::QueryNewestEvent => {
                    state.capacity.event_read.spend(extra)
                }
                _ => state.capacity.conn_read.spend(extra),
            }
        }
    }

    async fn read(
        &self,
        op: ReadOp,
    ) -> Result<(MutexGuard<'_, State>, Option<Instant>), StoreError> {
        sleep(self.behaviour.read_latency).await;
        // At least one unit must be there (half of one for an eventually consistent read);
        // what the read turns out to cost is charged after it by `charge_read`.
        let need = if self.consistent(op) || !self.behaviour.lags() {
            1.0
        } else {
            0.5
        };
        match op {
            ReadOp::QueryEvents | ReadOp::QueryNewestEvent => {
                self.take_units(
                    op_name(op),
                    |c| &mut c.event_read,
                    |p| p.read_units_per_sec,
                    need,
                    true,
                )
                .await?
            }
            _ => {
                self.take_units(
                    op_name(op),
                    |c| &mut c.conn_read,
                    |p| p.read_units_per_sec,
                    need,
                    true,
                )
                .await?
            }
        }
        let eventual = !self.consistent(op) && self.behaviour.lags();
        let cutoff = eventual.then(|| {
            let now = Instant::now();
            now.checked_sub(self.behaviour.draw_window()).unwrap_or(now)
        });
        let mut state = self.shared.lock();
        let tally = state.reads.entry(op).or_default();
        match cutoff {
            Some(_) => tally.eventually_consistent += 1,
            None => tally.strongly_consistent += 1,
        }
        Ok((state, cutoff))
    }
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn message_len(event: &ChatEvent) -> usize {
    match event {
        ChatEvent::MessagePosted { message, .. }
        | ChatEvent::PrivateMessageSent { message, .. } => message.len(),
        _ => 0,
    }
}

fn op_name(op: ReadOp) -> &'static str {
    match op {
        ReadOp::GetConnection => "GetItem connection",
        ReadOp::GetNameClaim => "GetItem name claim",
        ReadOp::GetSequence => "GetItem sequence",
        ReadOp::QueryMembers => "Query members",
        ReadOp::QueryEvents => "Query events",
        ReadOp::QueryNewestEvent => "Query newest event",
    }
}

/// Read units of `bytes` read: one per 4 KB, half for an eventually consistent read.
fn read_units(bytes: usize, consistent: bool) -> f64 {
    let units = bytes.div_ceil(4096).max(1) as f64;
    if consistent {
        units
    } else {
        units / 2.0
    }
}

fn key_error(e: limits::ServiceError, op: &'static str) -> StoreError {
    StoreError::backend(op, e)
}

/// Layout 1 operations, behind the layout 2 port below until this adapter moves to it.
impl EmbeddedStore {
    async fn v1_add_identified_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        let expires_at = epoch_secs(now_ms) + self.shared.retention.connection_ttl.as_secs() as i64;
        let sk = keys::conn_sk(connection_id);
        self.write("PutItem connection", PUT_CONNECTION, 0, |state| {
            state.injected_failure("PutItem connection")?;
            limits::check_key(&self.shared.room_pk, &sk)
                .map_err(|e| key_error(e, "PutItem connection"))?;
            // A put replaces the whole item, as PutItem does (a reused id starts without a name).
            state.put_conn(
                sk.clone(),
                Some(ConnItem {
                    connection_id: connection_id.to_owned(),
                    connected_at: now_ms,
                    expires_at,
                    name: None,
                    bucket: None,
                    identity: identity.map(str::to_owned),
                }),
            );
            Ok(Connection {
                connection_id: connection_id.to_owned(),
                connected_at: now_ms,
                expires_at,
                name: None,
                identity: identity.map(str::to_owned),
                rooms: Vec::new(),
            })
        })
        .await
    }

    async fn v1_connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        let sk = keys::conn_sk(connection_id);
        limits::check_key(&self.shared.room_pk, &sk)
            .map_err(|e| key_error(e, "GetItem connection"))?;
        let (mut state, cutoff) = self.read(ReadOp::GetConnection).await?;
        let item = state.conn_as_of(&sk, cutoff);
        let bytes = item.map_or(0, |c| conn_item_size(&self.shared.room_pk, &sk, c));
        let found = item
            .filter(|c| c.expires_at > epoch_secs(now_ms))
            .map(|c| Connection {
                connection_id: c.connection_id.clone(),
                connected_at: c.connected_at,
                expires_at: c.expires_at,
                name: c.name.as_ref().map(|n| n.display.clone()),
                identity: c.identity.clone(),
                rooms: c
                    .name
                    .iter()
                    .map(|_| keys::DEFAULT_ROOM.to_owned())
                    .collect(),
            });
        self.charge_read(&mut state, ReadOp::GetConnection, bytes);
        Ok(found)
    }

    async fn v1_set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        self.write(
            "TransactWriteItems setName",
            SET_NAME,
            EVENT_OVERHEAD,
            |state| {
                state.injected_failure("TransactWriteItems setName")?;
                let conn = state
                    .live_conn(connection_id, now_s)
                    .cloned()
                    .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                let old = conn.name.clone();
                if old.as_ref().map(|n| n.display.as_str()) == Some(name.display.as_str()) {
                    return Ok(None);
                }
                // The adapter reads the claim next: a claim key over DynamoDB's sort key limit is
                // refused there.
                limits::check_key(&self.shared.room_pk, &keys::name_sk(&name.key))
                    .map_err(|e| key_error(e, "GetItem name claim"))?;
                // The claim condition: free, ours already, expired (its holder is gone), or held
                // for the same identity — which takes it back, evicting its own older connection.
                let mut evict = None;
                if let Some(holder) = state.live_claim(&name.key, now_s) {
                    let mine = holder.connection_id.as_deref() == Some(connection_id);
                    let same_owner = conn.identity.is_some() && holder.identity == conn.identity;
                    if !mine && !same_owner {
                        return Err(StoreError::NameTaken(name.display.clone()));
                    }
                    if !mine {
                        evict = holder
                            .connection_id
                            .clone()
                            .and_then(|old_id| {
                                state.connections.get(&keys::conn_sk(&old_id)).cloned()
                            })
                            .filter(|old| old.name.as_ref().is_some_and(|n| n.key == name.key));
                    }
                }
                let event = match &old {
                    None => ChatEvent::MemberJoined {
                        connection_id: connection_id.to_owned(),
                        name: name.display.clone(),
                    },
                    Some(old) => ChatEvent::MemberRenamed {
                        connection_id: connection_id.to_owned(),
                        old_name: old.display.clone(),
                        name: name.display.clone(),
                    },
                };
                let evicted = match evict {
                    Some(old) => {
                        let left = ChatEvent::MemberLeft {
                            connection_id: old.connection_id.clone(),
                            name: old.name.map(|n| n.display).unwrap_or_default(),
                            reason: LeaveReason::Replaced,
                        };
                        Some((
                            old.connection_id,
                            self.shared.prepare(state.seq, left, now_ms)?,
                        ))
                    }
                    None => None,
                };
                let after = state.seq + u64::from(evicted.is_some());
                let pending = self.shared.prepare(after, event, now_ms)?;
                if let Some((old_id, left)) = evicted {
                    state.put_conn(keys::conn_sk(&old_id), None);
                    self.finish(state, left);
                }
                if let Some(old) = old.filter(|o| o.key != name.key) {
                    state.release(&old.key, connection_id, conn.identity.as_deref(), now_s);
                }
                state.claims.insert(
                    name.key.clone(),
                    Claim {
                        connection_id: Some(connection_id.to_owned()),
                        identity: conn.identity.clone(),
                        name: name.display.clone(),
                        expires_at: conn.expires_at,
                    },
                );
                let mut named = conn.clone();
                named.name = Some(Named {
                    display: name.display.clone(),
                    key: name.key.clone(),
                });
                state.put_conn(keys::conn_sk(connection_id), Some(named));
                Ok(Some(self.finish(state, pending)))
            },
        )
        .await
    }

    async fn v1_post_public(
        &self,
        connection_id: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        let bytes = EVENT_OVERHEAD + message.len();
        self.write(
            "TransactWriteItems sendPublic",
            POST_PUBLIC,
            bytes,
            |state| {
                state.injected_failure("TransactWriteItems sendPublic")?;
                let conn = state
                    .live_conn(connection_id, epoch_secs(now_ms))
                    .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                let name = conn.name.as_ref().ok_or(StoreError::NameRequired)?;
                let event = ChatEvent::MessagePosted {
                    connection_id: connection_id.to_owned(),
                    name: name.display.clone(),
                    message: message.to_owned(),
                };
                let pending = self.shared.prepare(state.seq, event, now_ms)?;
                Ok(self.finish(state, pending))
            },
        )
        .await
    }

    async fn v1_post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        let now_s = epoch_secs(now_ms);
        // `None`: no valid name has this key, and it may be too long to be a DynamoDB key.
        let to_key = recipient_key(to);
        let bytes = EVENT_OVERHEAD + message.len();
        self.write(
            "TransactWriteItems sendPrivate",
            POST_PRIVATE,
            bytes,
            |state| {
                state.injected_failure("TransactWriteItems sendPrivate")?;
                let conn = state
                    .live_conn(connection_id, now_s)
                    .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                let name = conn.name.as_ref().ok_or(StoreError::NameRequired)?;
                let Some(to_key) = to_key.as_deref() else {
                    return Err(StoreError::UnknownRecipient(to.to_owned()));
                };
                if name.key == to_key {
                    return Err(StoreError::SelfRecipient);
                }
                // The adapter reads the recipient's claim next: DynamoDB refuses a key that long.
                limits::check_key(&self.shared.room_pk, &keys::name_sk(to_key))
                    .map_err(|e| key_error(e, "GetItem name claim"))?;
                let unknown = || StoreError::UnknownRecipient(to.to_owned());
                let recipient = state.live_claim(to_key, now_s).ok_or_else(unknown)?;
                let to_conn = state
                    .live_conn(
                        recipient.connection_id.as_deref().unwrap_or_default(),
                        now_s,
                    )
                    .filter(|c| c.name.as_ref().is_some_and(|n| n.key == to_key))
                    .ok_or_else(unknown)?;
                let event = ChatEvent::PrivateMessageSent {
                    connection_id: connection_id.to_owned(),
                    name: name.display.clone(),
                    to_connection_id: to_conn.connection_id.clone(),
                    to_name: to_conn
                        .name
                        .as_ref()
                        .map(|n| n.display.clone())
                        .unwrap_or_default(),
                    message: message.to_owned(),
                    identity: conn.identity.clone(),
                    to_identity: to_conn.identity.clone(),
                };
                let pending = self.shared.prepare(state.seq, event, now_ms)?;
                Ok(self.finish(state, pending))
            },
        )
        .await
    }

    async fn v1_remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let sk = keys::conn_sk(connection_id);
        self.write(
            "TransactWriteItems $disconnect",
            REMOVE_CONNECTION,
            EVENT_OVERHEAD,
            |state| {
                state.injected_failure("TransactWriteItems $disconnect")?;
                // Expired connections are removed too: `$disconnect` for them is still real.
                let Some(conn) = state.connections.get(&sk).cloned() else {
                    return Ok(None);
                };
                let Some(named) = conn.name else {
                    state.put_conn(sk.clone(), None);
                    return Ok(None);
                };
                let event = ChatEvent::MemberLeft {
                    connection_id: connection_id.to_owned(),
                    name: named.display,
                    reason,
                };
                let pending = self.shared.prepare(state.seq, event, now_ms)?;
                state.put_conn(sk.clone(), None);
                state.release(
                    &named.key,
                    connection_id,
                    conn.identity.as_deref(),
                    epoch_secs(now_ms),
                );
                Ok(Some(self.finish(state, pending)))
            },
        )
        .await
    }

    async fn v1_schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let seq = crate::redelivery::unique_seq(now_ms);
        // The same item the DynamoDB adapter writes; only its stream record is kept here, as
        // nothing reads redelivery items back but the fan-out, from the stream.
        let image: Item = serde_dynamo::to_item(RedeliveryItem::new(redelivery, seq, now_ms))
            .map_err(|e| StoreError::Malformed(format!("redelivery item: {e}")))?;
        let keys = event_keys(&keys::redelivery_pk(&redelivery.room), seq);
        let change = stream_change(now_ms, keys, image)
            .map_err(|e| StoreError::Malformed(format!("stream record: {e}")))?;
        let record = self.shared.record("INSERT", change);
        self.write("PutItem redelivery", PUT_REDELIVERY, 0, |state| {
            state.injected_failure("PutItem redelivery")?;
            state.publish(self.shared.instance, record.clone());
            Ok(())
        })
        .await?;
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn v1_take_request_token(
        &self,
        connection_id: &str,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        if limit.is_off() {
            return Ok(true);
        }
        self.write("UpdateItem rate limit", TAKE_TOKEN, 0, |state| {
            let Some(conn) = state.connections.get_mut(&keys::conn_sk(connection_id)) else {
                return Ok(true);
            };
            match ratelimit::take(limit, conn.bucket, now_ms) {
                Some(next) => {
                    conn.bucket = Some(next);
                    Ok(true)
                }
                None => Ok(false),
            }
        })
        .await
    }

    async fn v1_members_page(
        &self,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        let now_s = epoch_secs(now_ms);
        let (mut state, cutoff) = self.read(ReadOp::QueryMembers).await?;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        // An eventually consistent query sees each item changed since the cutoff as it was
        // before its first change since then.
        let older = cutoff.map(|c| state.conns_before(c)).unwrap_or_default();
        let mut current = state
            .connections
            .range::<str, _>((start, Bound::Unbounded))
            .filter(|(sk, _)| !older.contains_key(*sk))
            .peekable();
        let mut previous = older
            .range::<str, _>((start, Bound::Unbounded))
            .filter_map(|(sk, c)| c.as_ref().map(|c| (sk, c)))
            .peekable();
        let mut members = Vec::new();
        let mut evaluated = 0;
        let mut bytes = 0;
        let mut last = None;
        let mut full = false;
        // Like a DynamoDB Query with `Limit` and a filter: `Limit` counts the items read, the
        // filter (named and not expired) applies after, and a page that stopped at `Limit`
        // (or at 1 MB read) carries a cursor even when nothing follows (the caller finds an
        // empty page then).
        loop {
            let next = match (current.peek(), previous.peek()) {
                (Some((a, _)), Some((b, _))) if a < b => current.next(),
                (Some(_), Some(_)) | (None, Some(_)) => previous.next(),
                (Some(_), None) => current.next(),
                (None, None) => None,
            };
            let Some((sk, conn)) = next else {
                break;
            };
            if self.page_limit.is_some_and(|limit| evaluated == limit)
                || bytes >= limits::QUERY_PAGE_MAX_BYTES
            {
                full = true;
                break;
            }
            evaluated += 1;
            bytes += conn_item_size(&self.shared.room_pk, sk, conn);
            last = Some(sk);
            if let (Some(name), true) = (&conn.name, conn.expires_at > now_s) {
                members.push(Member {
                    connection_id: conn.connection_id.clone(),
                    name: name.display.clone(),
                });
            }
        }
        let full = full
            || self.page_limit.is_some_and(|limit| evaluated == limit)
            || bytes >= limits::QUERY_PAGE_MAX_BYTES;
        let next = if full { last.cloned() } else { None };
        drop((current, previous));
        self.charge_read(&mut state, ReadOp::QueryMembers, bytes);
        Ok(MembersPage { members, next })
    }

    async fn v1_read_events(
        &self,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        let limit = limit.max(1);
        let now_s = epoch_secs(now_ms);
        let (mut state, cutoff) = self.read(ReadOp::QueryEvents).await?;
        let visible = |item: &&StoredItem| {
            item.expires_at > now_s && cutoff.is_none_or(|c| item.committed <= c)
        };
        let events: Vec<StoredEvent> = match range {
            EventRange::After(after) => state
                .events
                .range((Bound::Excluded(after), Bound::Unbounded))
                .map(|(_, item)| item)
                .filter(visible)
                .take(limit)
                .map(|item| item.event.clone())
                .collect(),
            EventRange::Before(before) => state
                .events
                .range((
                    Bound::Unbounded,
                    before.map_or(Bound::Unbounded, Bound::Excluded),
                ))
                .rev()
                .map(|(_, item)| item)
                .filter(visible)
                .take(limit)
                .map(|item| item.event.clone())
                .collect(),
        };
        let bytes = events
            .iter()
            .map(|e| EVENT_OVERHEAD + message_len(&e.event))
            .sum();
        self.charge_read(&mut state, ReadOp::QueryEvents, bytes);
        // As DynamoDB with `Limit`: a full page carries a cursor even if nothing follows.
        let next = (events.len() == limit)
            .then(|| events.last().map(|e| e.seq))
            .flatten();
        Ok(EventsPage { events, next })
    }
}

#[async_trait]
impl ChatStore for EmbeddedStore {
    async fn add_identified_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        self.v1_add_identified_connection(connection_id, identity, now_ms)
            .await
    }

    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.v1_connection(connection_id, now_ms).await
    }

    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .v1_set_name(connection_id, name, now_ms)
            .await?
            .into_iter()
            .collect())
    }

    async fn join_room(
        &self,
        _connection_id: &str,
        _room: &str,
        _max_rooms: usize,
        _now_ms: i64,
    ) -> Result<Joined, StoreError> {
        Err(StoreError::Malformed("layout 1 has no rooms".into()))
    }

    async fn leave_room(
        &self,
        _connection_id: &str,
        room: &str,
        _reason: LeaveReason,
        _now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        Err(StoreError::NotAMember(room.to_owned()))
    }

    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        if room != keys::DEFAULT_ROOM {
            return Err(StoreError::NotAMember(room.to_owned()));
        }
        self.v1_post_public(connection_id, message, now_ms).await
    }

    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.v1_post_private(connection_id, to, message, now_ms)
            .await
    }

    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .v1_remove_connection(connection_id, reason, now_ms)
            .await?
            .into_iter()
            .collect())
    }

    async fn take_request_token(
        &self,
        connection_id: &str,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.v1_take_request_token(connection_id, limit, now_ms)
            .await
    }

    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.v1_schedule_redelivery(redelivery, now_ms).await
    }

    async fn member_shards(&self, _room: &str, _now_ms: i64) -> Result<u32, StoreError> {
        Ok(1)
    }

    async fn members_page(
        &self,
        room: &str,
        _shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        if room != keys::DEFAULT_ROOM {
            return Ok(MembersPage::default());
        }
        self.v1_members_page(after, now_ms).await
    }

    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        if room != keys::DEFAULT_ROOM {
            return Ok(EventsPage::default());
        }
        self.v1_read_events(range, limit, now_ms).await
    }
}

/// A connection item's size as DynamoDB counts it (names and values of its attributes), for
/// the 1 MB a Query page reads at most.
fn conn_item_size(room_pk: &str, sk: &str, c: &ConnItem) -> usize {
    let mut size = keys::PK.len() + room_pk.len() + keys::SK.len() + sk.len();
    size += keys::CONNECTION_ID.len() + c.connection_id.len();
    size += keys::CONNECTED_AT.len() + 8 + keys::EXPIRES_AT.len() + 6;
    if let Some(n) = &c.name {
        size += keys::NAME.len() + n.display.len() + keys::NAME_KEY.len() + n.key.len();
    }
    if let Some(i) = &c.identity {
        size += keys::IDENTITY.len() + i.len();
    }
    if c.bucket.is_some() {
        size += keys::RATE_TOKENS.len() + keys::RATE_AT.len() + 14;
    }
    size
}

/// A reader of an [`EmbeddedStore`]'s change feed with its own checkpoint.
#[derive(Debug)]
pub struct EmbeddedFeed {
    shared: Arc<Shared>,
    /// Every record up to this stream sequence number is done.
    checkpoint: u64,
}

impl EmbeddedFeed {
    /// The stream ARN every record carries as `eventSourceARN`.
    pub fn stream_arn(&self) -> &str {
        &self.shared.stream_arn
    }
}

#[async_trait]
impl RecordSource for EmbeddedFeed {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<EventRecord>, SourceError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            // Registered before looking, so a commit between the look and the wait still
            // wakes this reader.
            changed.as_mut().enable();
            let batch = self.shared.records_after(self.checkpoint, max);
            if !batch.is_empty() || max == 0 {
                return Ok(batch);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    fn checkpoint(&mut self, sequence_number: &str) {
        match sequence_number.parse::<u64>() {
            // Only forward: an older sequence number is already done.
            Ok(seq) => self.checkpoint = self.checkpoint.max(seq),
            Err(e) => {
                warn!(sequence_number, error = %e, "ignoring a checkpoint that is not one of this feed's sequence numbers")
            }
        }
    }
}
