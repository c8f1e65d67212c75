//! The embedded (in-process) adapter of [`ChatStore`] on layout 2, and its change feed.
//!
//! This module owns the whole state of a chat that runs without DynamoDB, item for item as
//! [`crate::keys`] lays it out: connection items (`CONN#<id>`), name claims (`NAME#<key>`),
//! member items (`MEMBERS#<room>#<shard>`), each room's counter and event log (`ROOM#<room>`)
//! and redelivery items (`REDELIVERY#<room>`). Everything sits behind one mutex, so each write
//! step checks and writes atomically, as one `TransactWriteItems` does in
//! [`super::dynamodb::DynamoStore`]. An operation that adapter splits into several transactions
//! (a rename in several rooms, a disconnect: one transaction per room, the connection item
//! last) is the same steps here, in the same order, so a failure part-way
//! ([`EmbeddedStore::fail_writes_after`]) leaves what DynamoDB would leave, and a retry
//! finishes the job. It keeps that adapter's contract exactly (the shared contract suite in
//! `tests/tests/store_contract.rs` runs against both): the same conditions, the same errors,
//! the same TTL arithmetic (`expiresAt` in epoch seconds, every read treating
//! `expiresAt <= now` as absent — a member item's `liveUntil`, its connection's expiry, since
//! its `expiresAt` is a grace later), the same member order and pagination.
//!
//! Every write to the event table also becomes a stream record, shaped exactly as DynamoDB
//! Streams hands it to Lambda (`Keys`, `NewImage`, a `SequenceNumber` whose string order is its
//! numeric order): the `INSERT` of each event item (the same [`EventItem`] the DynamoDB adapter
//! writes), the `INSERT` then `MODIFY` records of each room's counter item (`type` `Counter`,
//! `seq` 0, which every append changes), and the `INSERT` of each redelivery item. An
//! [`EmbeddedFeed`] reads those records as a [`RecordSource`], so the local event source mapping
//! drives the fan-out from it as Lambda would from the table's stream.
//! [`EmbeddedStore::expire`] plays DynamoDB's TTL sweeper: expired items go (events, redelivery
//! items, connections, claims, member items; never a counter), and each expired item of the
//! event table leaves a `REMOVE` record marked as done by the DynamoDB service.
//!
//! The connections table has a stream of its own (template.yaml: `OLD_IMAGE`), read by
//! [`EmbeddedStore::connections_feed`]: the `REMOVE` record of every deleted connection item,
//! with its last image ([`super::items::ConnItem`], the DynamoDB adapter's shape) — marked as
//! done by the DynamoDB service when the TTL sweeper deleted it ([`EmbeddedStore::expire`]),
//! unmarked when `$disconnect` (or a prune) did. The
//! other writes to that table would be on DynamoDB's stream too; the connections mapping's
//! filter drops them before Lambda ([`crate::stream::passes_expiry_filter`]), so the feed does
//! not carry them.
//!
//! By default the store is ideal: every call is instant and every read strongly consistent.
//! [`EmbeddedStore::with_behaviour`] makes it behave like DynamoDB
//! ([`super::aws_like::StoreBehaviour`]): each write step takes the time of the calls the
//! DynamoDB adapter makes for it, reads the adapter makes without `ConsistentRead`
//! ([`super::aws_like::ReadOp`]) miss recent writes, appends collide on their room's counter as
//! optimistic transactions do, and every partition key has DynamoDB's throughput of its own
//! (`CONN#<id>`, `NAME#<key>`, `MEMBERS#<room>#<shard>`, `ROOM#<room>`, `REDELIVERY#<room>`).
//! In every mode it enforces DynamoDB's limits with DynamoDB's errors ([`super::limits`]) and
//! meters the request units DynamoDB would bill ([`EmbeddedStore::consumed`], and per partition
//! [`EmbeddedStore::consumed_in`]).
//!
//! The feed keeps every record for the life of the process (DynamoDB Streams trims after
//! 24 h; a local run is not expected to live long enough for that to matter).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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

use super::aws_like::{ReadOp, ReadTally, StoreBehaviour};
use super::items::{RequestItem, SlotsItem};
use super::limits;
use super::requests::{event_refs, scope, Once, RequestKey};
use super::{
    epoch_secs, Admission, ChatStore, Connection, EventRange, EventsPage, Joined, Member,
    MembersPage, StoreError, NAME_RESERVATION_SECS,
};
use crate::config::Retention;
use crate::events::{ChatEvent, EventItem, LeaveReason, StoredEvent};
use crate::keys::{self, DEFAULT_ROOM};
use crate::presence::{self, BudgetVerdict, PresenceBudget};
use crate::protocol::EventRef;
use crate::ratelimit::{self, Bucket, RequestLimits, Verdict};
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

/// A connection item (`CONN#<id>`/`CONN`).
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
    /// `rooms`: every room it is a member of, and the member shard its item is in there.
    rooms: BTreeMap<String, u32>,
    /// `renaming`: the old name while a rename is not yet recorded in every room (some member
    /// items may still have it); the next `setName` finishes the rename.
    renaming: Option<String>,
    /// `principal`: whom its requests and its connection slot count against.
    principal: Option<String>,
    /// `batch`: opted in to batched frames at `$connect`; every member item it writes copies it.
    batch: bool,
}

impl ConnItem {
    fn to_connection(&self) -> Connection {
        Connection {
            connection_id: self.connection_id.clone(),
            connected_at: self.connected_at,
            expires_at: self.expires_at,
            name: self.name.as_ref().map(|n| n.display.clone()),
            identity: self.identity.clone(),
            rooms: self.rooms.keys().cloned().collect(),
            batch: self.batch,
        }
    }

    /// The item as the DynamoDB adapter stores it (its one shape, [`super::items::ConnItem`]).
    fn to_item(&self) -> super::items::ConnItem {
        super::items::ConnItem {
            connection_id: self.connection_id.clone(),
            connected_at: self.connected_at,
            expires_at: self.expires_at,
            name: self.name.as_ref().map(|n| n.display.clone()),
            name_key: self.name.as_ref().map(|n| n.key.clone()),
            rl_tokens: self.bucket.map(|b| b.milli_tokens),
            rl_at: self.bucket.map(|b| b.at_ms),
            identity: self.identity.clone(),
            rooms: Some(self.rooms.clone()),
            renaming: self.renaming.clone(),
            principal: self.principal.clone(),
            batch: self.batch.then_some(true),
        }
    }

    fn display_name(&self) -> String {
        self.name
            .as_ref()
            .map(|n| n.display.clone())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
struct Named {
    display: String,
    key: String,
}

/// A name claim (`NAME#<nameKey>`/`NAME`): who holds the name, until when.
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

/// A member item (`MEMBERS#<room>#<shard>`/`<connId>`).
#[derive(Debug, Clone)]
struct MemberItem {
    connection_id: String,
    name: String,
    /// TTL (`expiresAt`): the connection's expiry plus [`keys::MEMBER_TTL_GRACE_SECS`], so the
    /// sweeper deletes it only well after the connection item (whose removal leaves the room
    /// by it).
    expires_at: i64,
    /// The connection's `batch` opt-in.
    batch: bool,
    /// `liveUntil`: the connection's expiry, after which every read treats it as absent.
    live_until: i64,
}

impl MemberItem {
    /// The member item of a connection expiring at `conn_expires_at` (the DynamoDB adapter's
    /// [`super::items::MemberItem::new`]).
    fn new(connection_id: &str, name: String, conn_expires_at: i64) -> Self {
        let item = super::items::MemberItem::new(connection_id.to_owned(), name, conn_expires_at);
        MemberItem {
            live_until: item.live_until(),
            expires_at: item.expires_at,
            connection_id: item.connection_id,
            name: item.name,
            batch: false,
        }
    }

    fn is_live(&self, now_s: i64) -> bool {
        self.live_until > now_s
    }
}

/// A room's counter item (`ROOM#<room>`, `seq` 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomCounter {
    /// The last event id given out in the room.
    pub last: u64,
    /// Members, kept with each sequenced join and leave (TTL expiry does not count).
    pub members: u64,
    /// Member shards the room uses.
    pub shards: u32,
    /// Past the large-room limit: joins and disconnects are unsequenced (see [`crate::keys`]).
    pub large: bool,
}

/// A room's counter item as stored: `members` and `shards` are set by the first join (a room
/// numbered by other events first has only `last`), as the DynamoDB adapter's updates set them.
#[derive(Debug, Clone, Copy, Default)]
struct CounterItem {
    last: u64,
    members: Option<u64>,
    shards: Option<u32>,
    large: Option<bool>,
}

impl CounterItem {
    fn view(self) -> RoomCounter {
        RoomCounter {
            last: self.last,
            members: self.members.unwrap_or(0),
            shards: self.shards.unwrap_or(1).max(1),
            large: self.large.unwrap_or(false),
        }
    }
}

/// An event item in the event table.
#[derive(Debug, Clone)]
struct StoredItem {
    event: StoredEvent,
    expires_at: i64,
    /// When it was written, for eventually consistent reads.
    committed: Instant,
}

/// One room's partition of the event table: its counter and its log.
#[derive(Debug, Default)]
struct Room {
    /// `None` until the room's first append (then its stream record is an `INSERT`).
    counter: Option<CounterItem>,
    events: BTreeMap<u64, StoredItem>,
}

/// Items keyed by sort key, with the versions an eventually consistent read may still see:
/// every item as it was before each change, for `lag` after the change.
#[derive(Debug)]
struct Versioned<V> {
    items: BTreeMap<String, V>,
    /// Oldest first.
    changes: VecDeque<Change<V>>,
}

#[derive(Debug)]
struct Change<V> {
    at: Instant,
    key: String,
    before: Option<V>,
}

impl<V> Default for Versioned<V> {
    fn default() -> Self {
        Versioned {
            items: BTreeMap::new(),
            changes: VecDeque::new(),
        }
    }
}

impl<V: Clone> Versioned<V> {
    fn get(&self, key: &str) -> Option<&V> {
        self.items.get(key)
    }

    /// Writes (or, with `None`, deletes) an item, keeping its old version while an eventually
    /// consistent read (lagging at most `lag`) may still see it.
    fn put(&mut self, key: String, item: Option<V>, lag: Duration) {
        let before = match item {
            Some(item) => self.items.insert(key.clone(), item),
            None => self.items.remove(&key),
        };
        if lag.is_zero() {
            return;
        }
        let now = Instant::now();
        while self
            .changes
            .front()
            .is_some_and(|c| now.duration_since(c.at) > lag)
        {
            self.changes.pop_front();
        }
        self.changes.push_back(Change {
            at: now,
            key,
            before,
        });
    }

    /// An item as a read sees it: now (`None`), or as of `cutoff`.
    fn as_of(&self, key: &str, cutoff: Option<Instant>) -> Option<&V> {
        if let Some(cutoff) = cutoff {
            if let Some(change) = self.changes.iter().find(|c| c.at > cutoff && c.key == key) {
                return change.before.as_ref();
            }
        }
        self.items.get(key)
    }

    /// The items after `after` in sort key order (a Query's order), as a read at `cutoff`
    /// sees them, until `visit` says stop.
    fn scan(
        &self,
        after: Option<&str>,
        cutoff: Option<Instant>,
        mut visit: impl FnMut(&str, &V) -> bool,
    ) {
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let range = self.items.range::<str, _>((start, Bound::Unbounded));
        let Some(cutoff) = cutoff else {
            for (key, item) in range {
                if !visit(key, item) {
                    return;
                }
            }
            return;
        };
        // Each item changed since the cutoff as it was before its first change since then
        // (newest first, so the oldest change's "before" is the one that stays).
        let mut older: BTreeMap<&str, Option<&V>> = BTreeMap::new();
        for change in self.changes.iter().rev() {
            if change.at <= cutoff {
                break;
            }
            older.insert(&change.key, change.before.as_ref());
        }
        let mut view: BTreeMap<&str, &V> = range.map(|(k, v)| (k.as_str(), v)).collect();
        for (key, before) in older {
            if after.is_some_and(|a| key <= a) {
                continue;
            }
            match before {
                Some(item) => view.insert(key, item),
                None => view.remove(key),
            };
        }
        for (key, item) in view {
            if !visit(key, item) {
                return;
            }
        }
    }
}

/// Write steps to let through, then to fail, for tests of failure handling.
#[derive(Debug, Default)]
struct Failures {
    skip: usize,
    left: usize,
}

/// Everything the mutex guards: one write step sees and changes all of it at once.
#[derive(Debug, Default)]
struct State {
    /// Connection items, by connection id (each its own partition `CONN#<id>`).
    conns: Versioned<ConnItem>,
    /// Name claims, by name key (each its own partition `NAME#<key>`).
    claims: HashMap<String, Claim>,
    /// Request items, by scope and `requestId` (`REQUEST#<scope>` / `<requestId>`).
    requests: HashMap<(String, String), RequestItem>,
    /// Member items: by partition key (`MEMBERS#<room>#<shard>`), then connection id (the
    /// sort key, so iterating is the order of DynamoDB's member query and a page cursor is the
    /// same string in both adapters).
    members: HashMap<String, Versioned<MemberItem>>,
    /// The event table's room partitions, by room name.
    rooms: BTreeMap<String, Room>,
    /// Redelivery items' keys (`REDELIVERY#<room>`, seq) and expiry: only their stream records
    /// are read (by the fan-out), so only what the TTL sweeper needs is kept.
    redeliveries: BTreeMap<(String, u64), i64>,
    /// The event table's stream, in commit order, with each record's sequence number.
    log: Vec<(u64, EventRecord)>,
    /// The connections table's stream: the `REMOVE` records of connection items.
    conn_log: Vec<(u64, EventRecord)>,
    /// The last stream sequence number given out (INSERTs, MODIFYs and REMOVEs of both
    /// streams share it, so each stream's numbers only grow).
    stream_seq: u64,
    failures: Failures,
    /// The longest an eventually consistent read can lag (zero keeps no old versions).
    lag: Duration,
    /// Reads served, by kind and consistency.
    reads: BTreeMap<ReadOp, ReadTally>,
    /// Appends that found their room's counter moved since they read it (AWS-like mode).
    collisions: u64,
    /// Request units left in each partition (AWS-like mode), by partition key.
    capacity: HashMap<String, Partition>,
    /// Request units used, as DynamoDB on-demand would bill them.
    consumed: Consumed,
    /// The same, by partition key.
    consumed_by_partition: HashMap<String, Consumed>,
    /// The large-room limit (`None`: [`crate::config::DEFAULT_PRESENCE_BROADCAST_LIMIT`]).
    large_limit: Option<u64>,
    /// Appends to a room to treat as having lost its counter, by room (a test's forced
    /// contention, in every mode).
    forced_collisions: HashMap<String, u32>,
    /// Principals' connection slots (`LIMIT#<principal>`/`CONNS`), by principal.
    slots: HashMap<String, SlotsItem>,
    /// Principals' request counters (`LIMIT#<principal>`/`REQ#<window>`): only the current
    /// window's matters, so each principal keeps its latest (window index, count).
    windows: HashMap<String, (i64, u32)>,
    /// Rooms' presence budgets (`PRESENCE#<room>`/`W#<second>`): only the current second's
    /// matters, so each room keeps its latest (second, POSTs charged).
    presence_windows: HashMap<String, (i64, u64)>,
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

/// One partition key's throughput: read and write units left.
#[derive(Debug, Default)]
struct Partition {
    read: Units,
    write: Units,
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
    /// The scope and `requestId` of `request` sent by the live connection `connection_id`
    /// (`None` without a request or a live connection: the write then refuses as it would).
    fn request_slot(
        &self,
        request: Option<&RequestKey>,
        connection_id: &str,
        now_s: i64,
    ) -> Option<(String, String)> {
        let conn = self.live_conn(connection_id, now_s)?;
        request.map(|r| {
            (
                scope(connection_id, conn.identity.as_deref()),
                r.request_id.clone(),
            )
        })
    }

    /// The live request item of `request`, if it was done already (`RequestIdReused` if the
    /// item recorded another request): checked in the same step as the write, as the
    /// DynamoDB adapter's condition on the item does.
    fn request_done(
        &self,
        request: Option<&RequestKey>,
        connection_id: &str,
        now_s: i64,
    ) -> Result<Option<RequestItem>, StoreError> {
        let (Some(key), Some(slot)) = (request, self.request_slot(request, connection_id, now_s))
        else {
            return Ok(None);
        };
        match self.requests.get(&slot) {
            Some(item) if item.expires_at > now_s => key.matches(item.clone()).map(Some),
            _ => Ok(None),
        }
    }

    /// Records `request` as done with `events` (and `name`), in the step that wrote them.
    fn record_request(
        &mut self,
        request: Option<&RequestKey>,
        connection_id: &str,
        name: Option<&str>,
        events: Vec<EventRef>,
        now_ms: i64,
    ) {
        let Some(key) = request else { return };
        if let Some(slot) = self.request_slot(request, connection_id, epoch_secs(now_ms)) {
            let item = key.record(connection_id, name, events, now_ms);
            self.requests.insert(slot, item);
        }
    }

    fn live_conn(&self, connection_id: &str, now_s: i64) -> Option<&ConnItem> {
        self.conns
            .get(connection_id)
            .filter(|c| c.expires_at > now_s)
    }

    fn put_conn(&mut self, connection_id: &str, item: Option<ConnItem>) {
        let lag = self.lag;
        self.conns.put(connection_id.to_owned(), item, lag);
    }

    fn put_member(
        &mut self,
        room: &str,
        shard: u32,
        connection_id: &str,
        item: Option<MemberItem>,
    ) {
        let lag = self.lag;
        self.members
            .entry(keys::members_pk(room, shard))
            .or_default()
            .put(connection_id.to_owned(), item, lag);
    }

    /// The connection's member item in `room`'s `shard`, live or not (its connection's item
    /// decides that, or on the expiry path is gone).
    fn member(&self, room: &str, shard: u32, connection_id: &str) -> Option<&MemberItem> {
        self.members
            .get(&keys::members_pk(room, shard))
            .and_then(|m| m.get(connection_id))
    }

    /// The name `room` knows `conn` by (for its `MemberLeft`): its member item's, which is the
    /// connection's unless a rename of it is unfinished (`renaming`; the DynamoDB adapter reads
    /// the member item only then).
    fn name_in_room(&self, conn: &ConnItem, room: &str, shard: u32) -> String {
        conn.renaming
            .as_ref()
            .and_then(|_| self.member(room, shard, &conn.connection_id))
            .map_or_else(|| conn.display_name(), |m| m.name.clone())
    }

    fn live_claim(&self, key: &str, now_s: i64) -> Option<&Claim> {
        self.claims.get(key).filter(|c| c.expires_at > now_s)
    }

    /// The room's counter item, if it has one yet.
    fn counter(&self, room: &str) -> Option<CounterItem> {
        self.rooms.get(room).and_then(|r| r.counter)
    }

    /// The room's last event id (a missing counter is 0).
    fn last(&self, room: &str) -> u64 {
        self.counter(room).map_or(0, |c| c.last)
    }

    fn large_limit(&self) -> u64 {
        self.large_limit
            .unwrap_or(crate::config::DEFAULT_PRESENCE_BROADCAST_LIMIT as u64)
    }

    /// Whether the room is large (its joins and disconnects unsequenced).
    fn large(&self, room: &str) -> bool {
        self.counter(room).is_some_and(|c| c.view().large)
    }

    /// The room's shards now (1 for a room without a counter).
    fn shards(&self, room: &str) -> u32 {
        self.counter(room).map_or(1, |c| c.view().shards)
    }

    /// Takes one forced collision of `room`'s counter, if a test asked for any.
    fn forced_collision(&mut self, room: &str) -> bool {
        match self.forced_collisions.get_mut(room) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }

    /// Live member items in one shard (a sampler's `Query` with `Select: COUNT`), and their
    /// size in bytes (what the query reads).
    fn count_shard(&self, room: &str, shard: u32, now_s: i64) -> (u64, usize) {
        let pk = keys::members_pk(room, shard);
        let Some(items) = self.members.get(&pk) else {
            return (0, 0);
        };
        let mut count = 0;
        let mut bytes = 0;
        for m in items.items.values() {
            bytes += member_item_size(&pk, m);
            if m.is_live(now_s) {
                count += 1;
            }
        }
        (count, bytes)
    }

    /// The room's counter before and after one more append that changes its members by
    /// `members` (+1 a join, -1 a leave, floored at 0; a join may double the shards).
    fn next_counter(&self, room: &str, members: i8) -> (Option<CounterItem>, CounterItem) {
        match members {
            1.. => self.advance(room, 1, Members::Join),
            0 => self.advance(room, 1, Members::Same),
            _ => self.advance(room, 1, Members::Leave(1)),
        }
    }

    /// The room's counter before and after `events` more appends in one transaction.
    fn advance(
        &self,
        room: &str,
        events: u64,
        members: Members,
    ) -> (Option<CounterItem>, CounterItem) {
        let before = self.counter(room);
        let c = before.unwrap_or_default();
        let now = c.view();
        let mut after = CounterItem {
            last: c.last + events,
            ..c
        };
        match members {
            Members::Join => {
                after.members = Some(now.members + 1);
                let mut shards = keys::shards_for(now.members + 1, now.shards);
                // The join that takes the room past the limit makes it large.
                if now.members + 1 > self.large_limit() {
                    after.large = Some(true);
                    shards = shards.max(keys::LARGE_ROOM_SHARDS);
                }
                after.shards = Some(shards);
            }
            Members::Same => {}
            Members::Leave(n) => after.members = Some(now.members.saturating_sub(n)),
        }
        (before, after)
    }

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

    /// Fails the write step `op` if a failure was injected; called after a step's checks and
    /// before its first change, so a failed step writes nothing (as DynamoDB refusing the call).
    fn injected_failure(&mut self, op: &'static str) -> Result<(), StoreError> {
        let f = &mut self.failures;
        if f.left == 0 {
            return Ok(());
        }
        if f.skip > 0 {
            f.skip -= 1;
            return Ok(());
        }
        f.left -= 1;
        Err(StoreError::backend(
            op,
            "injected failure (EmbeddedStore::fail_next_writes)",
        ))
    }

    /// Gives `record` the next stream sequence number (shared by both tables' streams) and its
    /// event id; returns the number.
    fn stamp(&mut self, instance: u64, record: &mut EventRecord) -> u64 {
        self.stream_seq += 1;
        record.change.sequence_number = Some(format!(
            "{:0width$}",
            self.stream_seq,
            width = SEQUENCE_DIGITS
        ));
        // Unique across stores in one process and across runs, like DynamoDB's event ids.
        record.event_id = format!("{instance:016x}{:016x}", self.stream_seq);
        self.stream_seq
    }

    /// Appends `record` to the events table's stream.
    fn publish(&mut self, instance: u64, mut record: EventRecord) {
        let seq = self.stamp(instance, &mut record);
        self.log.push((seq, record));
    }

    /// Appends `record` to the connections table's stream.
    fn publish_conn(&mut self, instance: u64, mut record: EventRecord) {
        let seq = self.stamp(instance, &mut record);
        self.conn_log.push((seq, record));
    }

    /// Commits a prepared append: the counter moves, the event item is stored, and the
    /// counter's then the event's stream records are published (the order of the items in the
    /// DynamoDB adapter's transaction). Infallible, so it runs only once every check passed.
    fn commit(&mut self, instance: u64, pending: PendingEvent) -> StoredEvent {
        let PendingEvent {
            counter,
            mut item,
            event_record,
        } = pending;
        item.committed = Instant::now();
        let stored = item.event.clone();
        let room = self.rooms.entry(stored.room.clone()).or_default();
        room.events.insert(stored.seq, item);
        if let Some((counter, counter_record)) = counter {
            room.counter = Some(counter);
            self.publish(instance, counter_record);
        }
        self.publish(instance, event_record);
        stored
    }

    /// Meters one write step's calls: its reads always (the adapter made them), its writes
    /// when they were done.
    fn meter(&mut self, calls: &Calls, done: bool) {
        for pk in &calls.reads {
            self.consumed.read_half_units += 2;
            self.consumed_by_partition
                .entry(pk.clone())
                .or_default()
                .read_half_units += 2;
        }
        if !done {
            return;
        }
        for (pk, units) in calls.write_units() {
            let units = units as u64;
            self.consumed.write_units += units;
            self.consumed_by_partition
                .entry(pk)
                .or_default()
                .write_units += units;
        }
    }

    fn partition(&mut self, pk: &str) -> &mut Partition {
        self.capacity.entry(pk.to_owned()).or_default()
    }
}

/// What an append does to its room's member count.
#[derive(Debug, Clone, Copy)]
enum Members {
    Same,
    /// One more; a join may double the shards.
    Join,
    /// This many fewer (floored at 0).
    Leave(u64),
}

/// An append with its id, its item and its stream records built, not yet committed. Building
/// is the only fallible part of an append, so it happens before any state changes.
struct PendingEvent {
    /// The counter as the transaction leaves it, and its stream record: on the first event
    /// of a transaction only.
    counter: Option<(CounterItem, EventRecord)>,
    item: StoredItem,
    event_record: EventRecord,
}

/// What the store and its feeds share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Woken after every change to the stream, so waiting feeds need not poll.
    changed: Notify,
    retention: Retention,
    stream_arn: String,
    /// The connections table's stream ARN.
    conn_stream_arn: String,
    /// Random per store: the high half of every record's `eventID`.
    instance: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every write step checks and builds everything fallible before its first change, so
        // a panic under the lock cannot have left half a step behind; the state is sound.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Builds the append of `event` to `room` as the DynamoDB adapter's transaction writes it:
    /// the counter moved from `before` (absent: an `INSERT` record) to `after`, and the event
    /// at id `after.last`, which expires after the history's retention.
    fn prepare(
        &self,
        room: &str,
        before: Option<CounterItem>,
        after: CounterItem,
        event: ChatEvent,
        now_ms: i64,
    ) -> Result<PendingEvent, StoreError> {
        let mut pending = self.prepare_all(room, before, after, vec![event], now_ms)?;
        pending
            .pop()
            .ok_or_else(|| StoreError::Malformed("no event prepared".into()))
    }

    /// [`Self::prepare`] for several events in one transaction: ids up to `after.last`, one
    /// counter move (its record first, as DynamoDB's stream has the transaction's items).
    fn prepare_all(
        &self,
        room: &str,
        before: Option<CounterItem>,
        after: CounterItem,
        events: Vec<ChatEvent>,
        now_ms: i64,
    ) -> Result<Vec<PendingEvent>, StoreError> {
        let room_pk = keys::room_pk(room);
        limits::check_key(&room_pk, "0").map_err(|e| key_error(e, "TransactWriteItems"))?;
        let expires_at = epoch_secs(now_ms) + self.retention.event_retention.as_secs() as i64;
        let counter_change = stream_change(
            now_ms,
            event_keys(&room_pk, keys::COUNTER_SEQ),
            counter_image(&room_pk, after),
        )
        .map_err(|e| StoreError::Malformed(format!("stream record: {e}")))?;
        let mut counter = Some((
            after,
            self.record(
                if before.is_some() { "MODIFY" } else { "INSERT" },
                counter_change,
            ),
        ));
        let first = after.last + 1 - events.len() as u64;
        let mut pending = Vec::with_capacity(events.len());
        for (seq, event) in (first..).zip(events) {
            let stored = StoredEvent {
                room: room.to_owned(),
                seq,
                ts: now_ms,
                event,
            };
            // The same item the DynamoDB adapter writes: `EventItem` is the one source of its
            // shape.
            let image: Item = serde_dynamo::to_item(EventItem::new(&stored, expires_at))
                .map_err(|e| StoreError::Malformed(format!("event item: {e}")))?;
            // DynamoDB refuses the whole transaction for one item over 400 KB.
            limits::check_item(&image).map_err(|e| StoreError::backend("TransactWriteItems", e))?;
            let change = stream_change(now_ms, event_keys(&room_pk, stored.seq), image)
                .map_err(|e| StoreError::Malformed(format!("stream record: {e}")))?;
            pending.push(PendingEvent {
                counter: counter.take(),
                item: StoredItem {
                    event: stored,
                    expires_at,
                    committed: Instant::now(),
                },
                event_record: self.record("INSERT", change),
            });
        }
        Ok(pending)
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

    /// A TTL deletion's record: the keys, no image, by the DynamoDB service.
    fn removal(&self, now_ms: i64, keys: Item) -> Option<EventRecord> {
        match stream_change(now_ms, keys, Item::default()) {
            Ok(change) => {
                let mut record = self.record("REMOVE", change);
                let mut identity = UserIdentity::default();
                identity.type_ = "Service".to_owned();
                identity.principal_id = "dynamodb.amazonaws.com".to_owned();
                record.user_identity = Some(identity);
                Some(record)
            }
            // Cannot happen for a timestamp and a size; the item is gone either way, and the
            // fan-out skips removals, so only the log line is lost.
            Err(e) => {
                warn!(error = %e, "could not build the REMOVE record");
                None
            }
        }
    }

    /// The `REMOVE` record of a deleted connection item on the connections table's stream,
    /// with its last image (the DynamoDB adapter's item: keys and [`super::items::ConnItem`]);
    /// `by_ttl`: marked as done by the DynamoDB service, as a TTL deletion is.
    fn conn_removal(&self, now_ms: i64, conn: &ConnItem, by_ttl: bool) -> Option<EventRecord> {
        let keys = Item::from(HashMap::from([
            (
                keys::PK.to_owned(),
                AttributeValue::S(keys::conn_pk(&conn.connection_id)),
            ),
            (
                keys::SK.to_owned(),
                AttributeValue::S(keys::CONN_SK.to_owned()),
            ),
        ]));
        let built = || -> Result<StreamRecord, String> {
            let mut image: Item =
                serde_dynamo::to_item(conn.to_item()).map_err(|e| e.to_string())?;
            image.insert(
                keys::PK.to_owned(),
                AttributeValue::S(keys::conn_pk(&conn.connection_id)),
            );
            image.insert(
                keys::SK.to_owned(),
                AttributeValue::S(keys::CONN_SK.to_owned()),
            );
            let mut change: StreamRecord = serde_json::from_value(json!({
                "ApproximateCreationDateTime": epoch_secs(now_ms),
                "SizeBytes": limits::item_size(&keys) + limits::item_size(&image),
            }))
            .map_err(|e| e.to_string())?;
            change.keys = keys;
            change.old_image = image;
            change.stream_view_type = Some(StreamViewType::OldImage);
            Ok(change)
        };
        match built() {
            Ok(change) => {
                let mut record = self.record("REMOVE", change);
                record.event_source_arn = Some(self.conn_stream_arn.clone());
                if by_ttl {
                    let mut identity = UserIdentity::default();
                    identity.type_ = "Service".to_owned();
                    identity.principal_id = "dynamodb.amazonaws.com".to_owned();
                    record.user_identity = Some(identity);
                }
                Some(record)
            }
            Err(e) => {
                warn!(connection_id = conn.connection_id, error = %e, "could not build the connection's REMOVE record");
                None
            }
        }
    }

    /// Records after stream sequence number `after`, at most `max`, of the event table's
    /// stream or (`connections`) the connections table's.
    fn records_after(&self, after: u64, max: usize, connections: bool) -> Vec<EventRecord> {
        let state = self.lock();
        let log = if connections {
            &state.conn_log
        } else {
            &state.log
        };
        let start = log.partition_point(|(seq, _)| *seq <= after);
        log[start..]
            .iter()
            .take(max)
            .map(|(_, record)| record.clone())
            .collect()
    }
}

/// The key of an item of the event table (`pk`, `seq`), as a stream record's `Keys`.
fn event_keys(pk: &str, seq: u64) -> Item {
    Item::from(HashMap::from([
        (keys::PK.to_owned(), AttributeValue::S(pk.to_owned())),
        (keys::SEQ.to_owned(), AttributeValue::N(seq.to_string())),
    ]))
}

/// A room's counter item as the DynamoDB adapter writes it (keys.rs documents it): the whole
/// item, as a `NEW_IMAGE` stream record carries it.
fn counter_image(room_pk: &str, c: CounterItem) -> Item {
    let n = |v: u64| AttributeValue::N(v.to_string());
    let mut item = HashMap::from([
        (keys::PK.to_owned(), AttributeValue::S(room_pk.to_owned())),
        (keys::SEQ.to_owned(), n(keys::COUNTER_SEQ)),
        (
            keys::TYPE.to_owned(),
            AttributeValue::S(keys::COUNTER_TYPE.to_owned()),
        ),
        (keys::COUNTER_LAST.to_owned(), n(c.last)),
    ]);
    if let Some(members) = c.members {
        item.insert(keys::COUNTER_MEMBERS.to_owned(), n(members));
    }
    if let Some(shards) = c.shards {
        item.insert(keys::COUNTER_SHARDS.to_owned(), n(u64::from(shards)));
    }
    if let Some(large) = c.large {
        item.insert(keys::COUNTER_LARGE.to_owned(), AttributeValue::Bool(large));
    }
    Item::from(item)
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
    /// Member items evaluated per member page, like DynamoDB's `Limit`. DynamoDB ends a page
    /// at 1 MB (thousands of member items) even without one; [`DEFAULT_PAGE_ITEMS`] stands in
    /// for that, so a broadcast streams its recipients here as it does on AWS.
    page_limit: Option<usize>,
    /// Ideal, or like DynamoDB (latency, eventual consistency, contention, throughput).
    behaviour: StoreBehaviour,
    /// A read served eventually consistent although the adapter asks for it strongly
    /// consistent: for tests of the emulator itself, now that every read the adapter makes is
    /// strongly consistent ([`EmbeddedStore::reading_eventually`]).
    forced_eventual: Option<ReadOp>,
}

impl EmbeddedStore {
    /// An empty store (any number of rooms) with the given item lifetimes.
    pub fn new(retention: Retention) -> Self {
        EmbeddedStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                retention,
                stream_arn: format!("{STREAM_ARN_PREFIX}events/stream/embedded"),
                conn_stream_arn: format!("{STREAM_ARN_PREFIX}connections/stream/embedded"),
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

    /// The reads served so far by the read operations (`connection`, `member_shards`,
    /// `members_page`, `read_events`), by kind: how many were strongly consistent and how many
    /// eventually consistent (in ideal mode every read is strongly consistent). The reads a
    /// write operation makes first are metered in [`Self::consumed`], not here.
    pub fn reads(&self) -> BTreeMap<ReadOp, ReadTally> {
        self.shared.lock().reads.clone()
    }

    /// The DynamoDB request units used so far (see [`Consumed`]).
    pub fn consumed(&self) -> Consumed {
        self.shared.lock().consumed
    }

    /// The request units used so far in one partition (`keys::conn_pk(..)`,
    /// `keys::room_pk(..)`, ...): which partitions an operation loads, and how hot they run.
    pub fn consumed_in(&self, partition_key: &str) -> Consumed {
        self.shared
            .lock()
            .consumed_by_partition
            .get(partition_key)
            .copied()
            .unwrap_or_default()
    }

    /// How many times a writer found its room's sequence counter moved between its read and
    /// its commit, and had to try again (AWS-like mode only; DynamoDB cancels the
    /// transaction then).
    pub fn counter_collisions(&self) -> u64 {
        self.shared.lock().collisions
    }

    /// Joins past `limit` members make a room large: its joins and disconnects are then
    /// unsequenced (see [`crate::keys`]). The deployment passes `PRESENCE_BROADCAST_LIMIT`.
    pub fn with_large_room_limit(self, limit: usize) -> Self {
        self.shared.lock().large_limit = Some(limit as u64);
        self
    }

    /// Makes the next `n` appends to `room` lose its counter (as if another writer had moved
    /// it between their read and their commit), in every mode: a test's way to force
    /// contention rather than hope for it.
    pub fn force_collisions(&self, room: &str, n: u32) {
        self.shared
            .lock()
            .forced_collisions
            .insert(room.to_owned(), n);
    }

    /// The request units used so far, every partition key's (see [`Self::consumed_in`]).
    pub fn consumed_by_partition(&self) -> HashMap<String, Consumed> {
        self.shared.lock().consumed_by_partition.clone()
    }

    /// Evaluates at most `limit` member items per member page (for tests of pagination), as
    /// [`super::dynamodb::DynamoStore::with_page_limit`] does. DynamoDB rejects a `Limit` of
    /// 0, so 0 is taken as 1.
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
            connections: false,
        }
    }

    /// A new reader of the connections table's stream (the `REMOVE` records of connection
    /// items, see the module's documentation), from its oldest record.
    pub fn connections_feed(&self) -> EmbeddedFeed {
        EmbeddedFeed {
            shared: Arc::clone(&self.shared),
            checkpoint: 0,
            connections: true,
        }
    }

    /// Sets when a connection expires (its item, its member items' `liveUntil` — their
    /// `expiresAt` a grace later — and its name claim), as if `$connect` had given it that TTL: a test's way to make one
    /// connection expire without waiting hours, or every connection with it. `false` if there
    /// is no such connection.
    pub fn set_connection_expiry(&self, connection_id: &str, expires_at: i64) -> bool {
        let mut state = self.shared.lock();
        let Some(mut conn) = state.conns.get(connection_id).cloned() else {
            return false;
        };
        conn.expires_at = expires_at;
        for (room, shard) in conn.rooms.clone() {
            if let Some(member) = state.member(&room, shard, connection_id).cloned() {
                let member = MemberItem {
                    batch: member.batch,
                    ..MemberItem::new(connection_id, member.name, expires_at)
                };
                state.put_member(&room, shard, connection_id, Some(member));
            }
        }
        if let Some(named) = &conn.name {
            if let Some(claim) = state.claims.get_mut(&named.key) {
                if claim.connection_id.as_deref() == Some(connection_id) {
                    claim.expires_at = expires_at;
                }
            }
        }
        state.put_conn(connection_id, Some(conn));
        true
    }

    /// Deletes the expired connection items, publishing their TTL `REMOVE` records.
    fn sweep_connections(shared: &Shared, state: &mut State, now_s: i64, now_ms: i64) -> usize {
        let conns: Vec<ConnItem> = state
            .conns
            .items
            .values()
            .filter(|c| c.expires_at <= now_s)
            .cloned()
            .collect();
        for conn in &conns {
            state.put_conn(&conn.connection_id, None);
            if let Some(record) = shared.conn_removal(now_ms, conn, true) {
                state.publish_conn(shared.instance, record);
            }
        }
        conns.len()
    }

    /// Every event item in the event table: room by room (in name order), each in id order.
    /// Expired events stay until [`Self::expire`] removes them, as in DynamoDB.
    pub fn events(&self) -> Vec<StoredEvent> {
        self.shared
            .lock()
            .rooms
            .values()
            .flat_map(|room| room.events.values().map(|item| item.event.clone()))
            .collect()
    }

    /// The event items of one room, in id order.
    pub fn events_in(&self, room: &str) -> Vec<StoredEvent> {
        self.shared
            .lock()
            .rooms
            .get(room)
            .map(|r| r.events.values().map(|item| item.event.clone()).collect())
            .unwrap_or_default()
    }

    /// A room's counter item, if the room has had an event.
    pub fn counter(&self, room: &str) -> Option<RoomCounter> {
        self.shared.lock().counter(room).map(CounterItem::view)
    }

    /// DynamoDB's TTL sweeper: deletes every item whose `expiresAt` has passed at `now_ms`
    /// (events, redelivery items, connections, name claims, member items; never a room's
    /// counter). Each deleted item of the event table appears in the feed as a `REMOVE` record
    /// by the DynamoDB service, as TTL deletions do on a real stream; each deleted connection
    /// item likewise on the connections feed, with its last image. A member item goes only
    /// [`keys::MEMBER_TTL_GRACE_SECS`] after its connection (its `expiresAt`), so the expiry
    /// path finds it after the connection item's removal. Returns how many items were deleted.
    pub fn expire(&self, now_ms: i64) -> usize {
        let now_s = epoch_secs(now_ms);
        let mut state = self.shared.lock();
        let mut removals = Vec::new();
        for (name, room) in state.rooms.iter_mut() {
            let expired: Vec<u64> = room
                .events
                .iter()
                .filter(|(_, item)| item.expires_at <= now_s)
                .map(|(seq, _)| *seq)
                .collect();
            for seq in expired {
                room.events.remove(&seq);
                removals.push(event_keys(&keys::room_pk(name), seq));
            }
        }
        let redeliveries: Vec<(String, u64)> = state
            .redeliveries
            .iter()
            .filter(|(_, expires)| **expires <= now_s)
            .map(|(key, _)| key.clone())
            .collect();
        for key in redeliveries {
            state.redeliveries.remove(&key);
            removals.push(event_keys(&key.0, key.1));
        }
        let stream_removals = removals.len();
        for keys in removals {
            if let Some(record) = self.shared.removal(now_ms, keys) {
                state.publish(self.shared.instance, record);
            }
        }
        let conns = Self::sweep_connections(&self.shared, &mut state, now_s, now_ms);
        let claims = state.claims.len() + state.requests.len();
        state.claims.retain(|_, c| c.expires_at > now_s);
        state.requests.retain(|_, r| r.expires_at > now_s);
        let claims = claims - state.claims.len() - state.requests.len();
        let lag = state.lag;
        let mut members = 0;
        for partition in state.members.values_mut() {
            let expired: Vec<String> = partition
                .items
                .iter()
                .filter(|(_, m)| m.expires_at <= now_s)
                .map(|(id, _)| id.clone())
                .collect();
            members += expired.len();
            for id in expired {
                partition.put(id, None, lag);
            }
        }
        drop(state);
        if stream_removals + conns > 0 {
            self.shared.changed.notify_waiters();
        }
        stream_removals + conns + claims + members
    }

    /// Makes the next `n` write steps fail with [`StoreError::Backend`], writing nothing: every
    /// write call the DynamoDB adapter would make (a `PutItem` of a connection or a redelivery
    /// item, each `TransactWriteItems`), except the rate limit's `UpdateItem`. An operation
    /// that is several transactions (a rename in several rooms, a disconnect) fails at its
    /// first.
    pub fn fail_next_writes(&self, n: usize) {
        self.fail_writes_after(0, n);
    }

    /// Lets the next `ok` write steps through, then fails `n` (see [`Self::fail_next_writes`]):
    /// a failure part-way through an operation of several transactions, leaving what DynamoDB
    /// would leave after the same failure.
    pub fn fail_writes_after(&self, ok: usize, n: usize) {
        self.shared.lock().failures = Failures { skip: ok, left: n };
    }

    /// Commits `pending` (after the caller's state changes) and wakes the feeds.
    fn finish(&self, state: &mut State, pending: PendingEvent) -> StoredEvent {
        let stored = state.commit(self.shared.instance, pending);
        self.shared.changed.notify_waiters();
        stored
    }
}

/// The DynamoDB calls of one write step as the DynamoDB adapter makes them on its way to a
/// commit: what the step costs in time, partition throughput and billed units.
#[derive(Debug, Clone, Default)]
struct Calls {
    /// Strongly consistent GetItems before the write, by partition key (each under 4 KB: a
    /// read unit each).
    reads: Vec<String>,
    /// The items the write puts, updates, deletes or checks: partition key and size in write
    /// units (one per KB; doubled in a transaction).
    writes: Vec<(String, u64)>,
    /// Whether the write is a `TransactWriteItems`.
    transaction: bool,
    /// The room whose counter the write moves, on the condition that it has not moved since
    /// it was read.
    appends: Option<String>,
}

impl Calls {
    fn get(mut self, pk: String) -> Self {
        self.reads.push(pk);
        self
    }

    fn get_if(self, yes: bool, pk: impl FnOnce() -> String) -> Self {
        if yes {
            self.get(pk())
        } else {
            self
        }
    }

    /// One more item in the write.
    fn item(mut self, pk: String, units: u64) -> Self {
        self.writes.push((pk, units.max(1)));
        self
    }

    /// The request item a write with a `requestId` puts in its transaction (one unit).
    fn request(
        self,
        state: &State,
        request: Option<&RequestKey>,
        connection_id: &str,
        now_s: i64,
    ) -> Self {
        match state.request_slot(request, connection_id, now_s) {
            Some((scope, _)) => self.item(keys::request_pk(&scope), 1),
            None => self,
        }
    }

    fn transaction(mut self) -> Self {
        self.transaction = true;
        self
    }

    /// The room's counter and an event of about `event_bytes`, in a transaction.
    fn append(mut self, room: &str, event_bytes: usize) -> Self {
        let pk = keys::room_pk(room);
        self.writes.push((pk.clone(), 1));
        self.writes.push((pk, units_of(event_bytes, 1024)));
        self.appends = Some(room.to_owned());
        self.transaction = true;
        self
    }

    /// Write units by partition, as billed (twice in a transaction).
    fn write_units(&self) -> Vec<(String, f64)> {
        let factor = if self.transaction { 2.0 } else { 1.0 };
        let mut by_pk: Vec<(String, f64)> = Vec::new();
        for (pk, units) in &self.writes {
            let units = factor * *units as f64;
            match by_pk.iter_mut().find(|(p, _)| p == pk) {
                Some((_, u)) => *u += units,
                None => by_pk.push((pk.clone(), units)),
            }
        }
        by_pk
    }
}

/// Request units of `bytes`: one per `unit` bytes, at least one.
fn units_of(bytes: usize, unit: usize) -> u64 {
    bytes.div_ceil(unit).max(1) as u64
}

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
    /// Runs one write step `f` under the lock; `plan` says which calls the DynamoDB adapter
    /// makes for it in the state it finds. In AWS-like mode the step first takes the time of
    /// those reads and of the write, each partition it reads or writes must have the units
    /// (DynamoDB throttles a transaction when any one of its partitions is short), and an
    /// appending step commits only if its room's counter did not move meanwhile — otherwise it
    /// backs off and tries again, as the DynamoDB adapter's optimistic writers do: that is
    /// what caps one room's commit rate.
    async fn write<T>(
        &self,
        op: &'static str,
        plan: impl Fn(&State) -> Calls,
        mut f: impl FnMut(&mut State) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.write_attempts(op, |state, _| plan(state), |state, _| f(state))
            .await
    }

    /// [`Self::write`] for a step that changes with its attempt's number (from 1): a join
    /// whose append lost the counter [`keys::SEQUENCED_JOIN_ATTEMPTS`] times joins
    /// unsequenced. A collision forced by [`Self::force_collisions`] counts in every mode.
    async fn write_attempts<T>(
        &self,
        op: &'static str,
        plan: impl Fn(&State, u32) -> Calls,
        mut f: impl FnMut(&mut State, u32) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let b = self.behaviour;
        if b.read_latency.is_zero()
            && b.write_latency.is_zero()
            && !b.contention
            && b.partition.is_none()
        {
            for attempt in 1..=MAX_ATTEMPTS {
                let mut state = self.shared.lock();
                let calls = plan(&state, attempt);
                if let Some(room) = calls.appends.as_deref() {
                    if state.forced_collision(room) {
                        state.collisions += 1;
                        continue;
                    }
                }
                let done = f(&mut state, attempt);
                state.meter(&calls, done.is_ok());
                return done;
            }
            return Err(StoreError::Contention(MAX_ATTEMPTS));
        }
        for attempt in 1..=MAX_ATTEMPTS {
            let calls = plan(&self.shared.lock(), attempt);
            sleep(b.read_latency * calls.reads.len() as u32).await;
            for pk in &calls.reads {
                self.take_units(op, &[(pk.clone(), 1.0)], true, true)
                    .await?;
            }
            // The counter is the last thing the adapter reads before its transaction.
            let seen = calls
                .appends
                .as_deref()
                .map(|room| self.shared.lock().last(room));
            let units = calls.write_units();
            if !units.is_empty() {
                sleep(b.write_latency).await;
                self.take_units(op, &units, false, false).await?;
            }
            {
                let mut state = self.shared.lock();
                let now = calls.appends.as_deref().map(|room| state.last(room));
                let forced = match calls.appends.as_deref() {
                    Some(room) => state.forced_collision(room),
                    None => false,
                };
                if !(forced || b.contention && now != seen) {
                    let done = f(&mut state, attempt);
                    state.meter(&calls, done.is_ok());
                    // A write DynamoDB refuses before it starts (a limit) uses no units.
                    if done.is_ok() && b.partition.is_some() {
                        for (pk, u) in &units {
                            state.partition(pk).write.spend(*u);
                        }
                    }
                    return done;
                }
                state.collisions += 1;
            }
            backoff(attempt).await;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// Waits until every partition in `need` has its units (and takes them if `spend`),
    /// retrying as the SDK does while any is short; a request still short after the SDK's
    /// attempts fails with DynamoDB's throttling error. Nothing to do without a partition
    /// limit.
    async fn take_units(
        &self,
        op: &'static str,
        need: &[(String, f64)],
        read: bool,
        spend: bool,
    ) -> Result<(), StoreError> {
        let Some(partition) = self.behaviour.partition else {
            return Ok(());
        };
        if need.iter().all(|(_, n)| *n <= 0.0) {
            return Ok(());
        }
        let per_sec = if read {
            partition.read_units_per_sec
        } else {
            partition.write_units_per_sec
        };
        for attempt in 1..=SDK_ATTEMPTS {
            {
                let mut state = self.shared.lock();
                let mut all = true;
                for (pk, n) in need {
                    let p = state.partition(pk);
                    let units = if read { &mut p.read } else { &mut p.write };
                    all &= units.has(per_sec, n.min(per_sec));
                }
                if all {
                    if spend {
                        for (pk, n) in need {
                            let p = state.partition(pk);
                            let units = if read { &mut p.read } else { &mut p.write };
                            units.spend(*n);
                        }
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

    /// Takes one read call's time and units in partition `pk`, then gives the state and the
    /// point in time the read sees: `None` for everything (a strongly consistent read, or
    /// ideal mode), else the moment before which writes are visible. The read is tallied
    /// either way; what it cost beyond its first unit is charged after it by
    /// [`Self::charge_read`].
    async fn read(
        &self,
        op: ReadOp,
        pk: &str,
    ) -> Result<(MutexGuard<'_, State>, Option<Instant>), StoreError> {
        sleep(self.behaviour.read_latency).await;
        // At least one unit must be there (half of one for an eventually consistent read).
        let need = if self.consistent(op) || !self.behaviour.lags() {
            1.0
        } else {
            0.5
        };
        self.take_units(op_name(op), &[(pk.to_owned(), need)], true, true)
            .await?;
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

    /// Meters a read of `bytes` in partition `pk`, billed as the adapter asks for it, and
    /// charges the partition what it cost beyond the units `read` already took.
    fn charge_read(&self, state: &mut State, op: ReadOp, pk: &str, bytes: usize) {
        let units = units_of(bytes, 4096);
        let half_units = if self.consistent(op) {
            2 * units
        } else {
            units
        };
        state.consumed.read_half_units += half_units;
        state
            .consumed_by_partition
            .entry(pk.to_owned())
            .or_default()
            .read_half_units += half_units;
        if self.behaviour.partition.is_none() {
            return;
        }
        // Served as the adapter asks; in ideal mode nothing is charged anyway.
        let consistent = self.consistent(op) || !self.behaviour.lags();
        let taken = if consistent { 1.0 } else { 0.5 };
        let extra = read_units(bytes, consistent) - taken;
        if extra > 0.0 {
            state.partition(pk).read.spend(extra);
        }
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
        ReadOp::GetSequence => "GetItem counter",
        ReadOp::QueryMembers => "Query members",
        ReadOp::QueryEvents => "Query events",
        ReadOp::QueryNewestEvent => "Query newest event",
        ReadOp::GetMember => "GetItem member",
        ReadOp::CountMembers => "Query count members",
        ReadOp::GetRequest => "GetItem request",
    }
}

/// Read units of `bytes` read: one per 4 KB, half for an eventually consistent read.
fn read_units(bytes: usize, consistent: bool) -> f64 {
    let units = units_of(bytes, 4096) as f64;
    if consistent {
        units
    } else {
        units / 2.0
    }
}

fn key_error(e: limits::ServiceError, op: &'static str) -> StoreError {
    StoreError::backend(op, e)
}

/// A connection item's size as DynamoDB counts it (names and values of its attributes).
fn conn_item_size(c: &ConnItem) -> usize {
    let mut size = keys::PK.len()
        + keys::conn_pk(&c.connection_id).len()
        + keys::SK.len()
        + keys::CONN_SK.len();
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
    if !c.rooms.is_empty() {
        // A map: 3 bytes, and per entry 1 byte, the room's name and its shard number.
        size += keys::ROOMS.len() + 3 + c.rooms.keys().map(|r| 1 + r.len() + 2).sum::<usize>();
    }
    if let Some(old) = &c.renaming {
        size += keys::RENAMING.len() + old.len();
    }
    if let Some(p) = &c.principal {
        size += keys::PRINCIPAL.len() + p.len();
    }
    if c.batch {
        size += keys::BATCH.len() + 1;
    }
    size
}

/// A principal's slots item's size in write units (a map entry: 1 byte, the id, a number).
fn slots_units(principal: &str, slots: &SlotsItem) -> u64 {
    let size = keys::PK.len()
        + keys::limit_pk(principal).len()
        + keys::SK.len()
        + keys::LIMIT_SLOTS_SK.len()
        + keys::LIMIT_CONNS.len()
        + 3
        + slots.conns.keys().map(|id| 1 + id.len() + 6).sum::<usize>()
        + keys::LIMIT_VERSION.len()
        + 4
        + keys::EXPIRES_AT.len()
        + 6;
    units_of(size, 1024)
}

/// A connection item's size in write units.
fn conn_units(c: &ConnItem) -> u64 {
    units_of(conn_item_size(c), 1024)
}

/// A member item's size as DynamoDB counts it, for the 1 MB a Query page reads at most.
fn member_item_size(pk: &str, m: &MemberItem) -> usize {
    keys::PK.len()
        + pk.len()
        + keys::SK.len()
        + m.connection_id.len()
        + keys::CONNECTION_ID.len()
        + m.connection_id.len()
        + keys::NAME.len()
        + m.name.len()
        + keys::EXPIRES_AT.len()
        + 6
        + if m.batch { keys::BATCH.len() + 1 } else { 0 }
        + keys::LIVE_UNTIL.len()
        + 6
}

/// Where the first transaction of a name change announces it (the DynamoDB adapter's order).
#[derive(Debug, Clone)]
enum First {
    /// The connection joins lobby with the name: a first name, or a rename of a connection in
    /// no room.
    JoinLobby,
    /// A rename, announced first in this room (lobby if it is a member, else its first room
    /// by name), where its member item is in `shard`.
    Rename { room: String, shard: u32 },
}

impl First {
    fn of(conn: &ConnItem) -> First {
        let first = conn
            .rooms
            .get_key_value(DEFAULT_ROOM)
            .or_else(|| conn.rooms.iter().next());
        match first {
            Some((room, &shard)) if conn.name.is_some() => First::Rename {
                room: room.clone(),
                shard,
            },
            _ => First::JoinLobby,
        }
    }

    fn room(&self) -> &str {
        match self {
            First::JoinLobby => DEFAULT_ROOM,
            First::Rename { room, .. } => room,
        }
    }
}

/// Leaves per pruning transaction, as the DynamoDB adapter groups them: a connection update
/// and a member item delete each, plus one counter and an event each, within
/// `TransactWriteItems`' 100 actions.
const LEAVES_PER_TRANSACTION: usize = 33;
const _: () = assert!(LEAVES_PER_TRANSACTION * 3 < limits::TRANSACT_MAX_ACTIONS);

/// What the first step of `setName` finds to do.
enum NameStep {
    /// The same name again: nothing to claim (a join of lobby follows if it left it).
    Same,
    /// The name is held by an older connection of the same identity: it is removed first
    /// (the take-back), then the claim is tried again.
    Evict(String),
    /// The claim moves (the old one released), the connection's name changes, and the first
    /// room hears of it, in one transaction.
    Claim(First),
}

/// What the first step of `setName` did.
enum Claimed {
    /// The same name again; whether the connection is in lobby.
    Same {
        in_lobby: bool,
    },
    Evict(String),
    /// The first transaction's event; for a rename, the room it was announced in and the old
    /// name, so the other rooms can hear of it next.
    First(Box<StoredEvent>, Option<(String, String)>),
    /// The name is set and the connection joined lobby unsequenced (no event).
    Unsequenced,
    /// A resend of a `setName` done already: its request item.
    Again(Box<RequestItem>),
}

const SET_NAME: &str = "TransactWriteItems setName";
const RENAME: &str = "TransactWriteItems rename";
const JOIN: &str = "TransactWriteItems join";
const LEAVE: &str = "TransactWriteItems leave";
const POST: &str = "TransactWriteItems post";
const PRIVATE: &str = "TransactWriteItems sendPrivate";
const REMOVE: &str = "TransactWriteItems remove connection";

fn not_connected(connection_id: &str) -> StoreError {
    StoreError::NotConnected(connection_id.to_owned())
}

/// `evicted`: the take-back has removed the older connection already; the claim's condition
/// now lets this identity take the name whoever of its connections holds it.
fn name_step(
    state: &State,
    connection_id: &str,
    name: &ValidName,
    evicted: bool,
    now_s: i64,
) -> Result<NameStep, StoreError> {
    let conn = state
        .live_conn(connection_id, now_s)
        .ok_or_else(|| not_connected(connection_id))?;
    if conn.name.as_ref().map(|n| n.display.as_str()) == Some(name.display.as_str()) {
        return Ok(NameStep::Same);
    }
    // The adapter reads the claim next: DynamoDB refuses a key over its limits there.
    limits::check_key(&keys::name_pk(&name.key), keys::NAME_SK)
        .map_err(|e| key_error(e, "GetItem name claim"))?;
    // The claim condition: free, ours already, expired (its holder is gone), or held for the
    // same identity — which takes it back, removing its own older connection first.
    if let Some(holder) = state.live_claim(&name.key, now_s) {
        let mine = holder.connection_id.as_deref() == Some(connection_id);
        let same_owner = conn.identity.is_some() && holder.identity == conn.identity;
        if !mine && !same_owner {
            return Err(StoreError::NameTaken(name.display.clone()));
        }
        if let (false, false, Some(old)) = (mine, evicted, holder.connection_id.as_deref()) {
            return Ok(NameStep::Evict(old.to_owned()));
        }
    }
    Ok(NameStep::Claim(First::of(conn)))
}

/// The sender of a post to a room it is a member of.
fn post_check<'s>(
    state: &'s State,
    connection_id: &str,
    room: &str,
    now_s: i64,
) -> Result<&'s ConnItem, StoreError> {
    let conn = state
        .live_conn(connection_id, now_s)
        .ok_or_else(|| not_connected(connection_id))?;
    conn.name.as_ref().ok_or(StoreError::NameRequired)?;
    if !conn.rooms.contains_key(room) {
        return Err(StoreError::NotAMember(room.to_owned()));
    }
    Ok(conn)
}

/// Where a join stands: `Err` for a refusal, `Ok(Err(last))` for a member already, else the
/// shard the member item goes to.
fn join_step(
    state: &State,
    connection_id: &str,
    room: &str,
    max_rooms: usize,
    quiet: bool,
    now_s: i64,
) -> Result<Result<u32, u64>, StoreError> {
    let conn = state
        .live_conn(connection_id, now_s)
        .ok_or_else(|| not_connected(connection_id))?;
    conn.name.as_ref().ok_or(StoreError::NameRequired)?;
    if conn.rooms.contains_key(room) {
        return Ok(Err(state.last(room)));
    }
    if conn.rooms.len() >= max_rooms {
        return Err(StoreError::TooManyRooms(max_rooms));
    }
    if quiet {
        return Ok(Ok(keys::member_shard(connection_id, state.shards(room))));
    }
    let (_, after) = state.next_counter(room, 1);
    Ok(Ok(keys::member_shard(connection_id, after.view().shards)))
}

/// Whether a join of `room` on attempt `attempt` is unsequenced: the room is large, or the
/// join has lost the counter [`keys::SEQUENCED_JOIN_ATTEMPTS`] times already, or the room's
/// presence budget could not pay for it ([`crate::presence::joins_unsequenced`]).
fn quiet_join(state: &State, room: &str, attempt: u32) -> bool {
    attempt > keys::SEQUENCED_JOIN_ATTEMPTS
        || state.large(room)
        || crate::presence::joins_unsequenced()
}

/// The sender and the recipient of a private message.
fn private_check<'s>(
    state: &'s State,
    connection_id: &str,
    to: &str,
    to_key: Option<&str>,
    now_s: i64,
) -> Result<(&'s ConnItem, &'s ConnItem), StoreError> {
    let conn = state
        .live_conn(connection_id, now_s)
        .ok_or_else(|| not_connected(connection_id))?;
    let name = conn.name.as_ref().ok_or(StoreError::NameRequired)?;
    let unknown = || StoreError::UnknownRecipient(to.to_owned());
    // `None`: no valid name has this key, and it may be too long to be a DynamoDB key.
    let to_key = to_key.ok_or_else(unknown)?;
    if name.key == to_key {
        return Err(StoreError::SelfRecipient);
    }
    // The adapter reads the recipient's claim next: DynamoDB refuses a key that long.
    limits::check_key(&keys::name_pk(to_key), keys::NAME_SK)
        .map_err(|e| key_error(e, "GetItem name claim"))?;
    let recipient = state.live_claim(to_key, now_s).ok_or_else(unknown)?;
    let to_conn = state
        .live_conn(
            recipient.connection_id.as_deref().unwrap_or_default(),
            now_s,
        )
        .filter(|c| c.name.as_ref().is_some_and(|n| n.key == to_key))
        .ok_or_else(unknown)?;
    Ok((conn, to_conn))
}

impl EmbeddedStore {
    /// The first step of `setName` (see [`NameStep`]).
    async fn claim_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        evicted: bool,
        request: Option<&RequestKey>,
        earlier: &[StoredEvent],
        now_ms: i64,
    ) -> Result<Claimed, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        let name_pk = keys::name_pk(&name.key);
        let plan = |state: &State, attempt: u32| {
            let base = Calls::default().get(conn_pk.clone());
            let step = name_step(state, connection_id, name, evicted, now_s);
            let (Ok(NameStep::Claim(first)), Some(conn)) =
                (&step, state.live_conn(connection_id, now_s))
            else {
                // The same name (or no connection) costs the connection's read only.
                return match step {
                    Ok(NameStep::Same) | Err(StoreError::NotConnected(_)) => base,
                    _ => base.get(name_pk.clone()),
                };
            };
            let first = first.clone();
            // The claim, the counter, and the old claim (to release it if still ours).
            let mut calls = base
                .get(name_pk.clone())
                .get(keys::room_pk(first.room()))
                .item(name_pk.clone(), 1);
            if let Some(old) = conn.name.as_ref().filter(|o| o.key != name.key) {
                let old_pk = keys::name_pk(&old.key);
                calls = calls.get(old_pk.clone());
                if state
                    .claims
                    .get(&old.key)
                    .is_some_and(|c| c.connection_id.as_deref() == Some(connection_id))
                {
                    calls = calls.item(old_pk, 1);
                }
            }
            let quiet =
                matches!(first, First::JoinLobby) && quiet_join(state, DEFAULT_ROOM, attempt);
            let shard = match &first {
                First::JoinLobby if quiet => {
                    keys::member_shard(connection_id, state.shards(DEFAULT_ROOM))
                }
                First::JoinLobby => keys::member_shard(
                    connection_id,
                    state.next_counter(DEFAULT_ROOM, 1).1.view().shards,
                ),
                First::Rename { shard, .. } => *shard,
            };
            let marker = match (&first, &conn.name) {
                (First::Rename { .. }, Some(old)) if conn.rooms.len() > 1 => {
                    keys::RENAMING.len() + old.display.len()
                }
                _ => 0,
            };
            let renamed = conn_item_size(conn) + 2 * name.display.len() + 16 + marker;
            let calls = calls
                .item(conn_pk.clone(), units_of(renamed, 1024))
                .item(keys::members_pk(first.room(), shard), 1)
                .request(state, request, connection_id, now_s);
            if quiet {
                // An unsequenced join of lobby: no counter, no event.
                calls.transaction()
            } else {
                calls.append(first.room(), EVENT_OVERHEAD)
            }
        };
        self.write_attempts(SET_NAME, plan, |state, attempt| {
            if let Some(done) = state.request_done(request, connection_id, now_s)? {
                return Ok(Claimed::Again(Box::new(done)));
            }
            let first = match name_step(state, connection_id, name, evicted, now_s)? {
                NameStep::Same => {
                    let in_lobby = state
                        .live_conn(connection_id, now_s)
                        .is_some_and(|c| c.rooms.contains_key(DEFAULT_ROOM));
                    return Ok(Claimed::Same { in_lobby });
                }
                NameStep::Evict(old) => return Ok(Claimed::Evict(old)),
                NameStep::Claim(first) => first,
            };
            let conn = state
                .live_conn(connection_id, now_s)
                .cloned()
                .ok_or_else(|| not_connected(connection_id))?;
            let room = first.room().to_owned();
            let joins = matches!(first, First::JoinLobby);
            let quiet = joins && quiet_join(state, DEFAULT_ROOM, attempt);
            let (before, after) = state.next_counter(&room, i8::from(joins));
            let (event, shard) = match &first {
                First::JoinLobby if quiet => (
                    ChatEvent::MemberJoined {
                        connection_id: connection_id.to_owned(),
                        name: name.display.clone(),
                    },
                    keys::member_shard(connection_id, state.shards(DEFAULT_ROOM)),
                ),
                First::JoinLobby => (
                    ChatEvent::MemberJoined {
                        connection_id: connection_id.to_owned(),
                        name: name.display.clone(),
                    },
                    keys::member_shard(connection_id, after.view().shards),
                ),
                First::Rename { shard, .. } => (
                    ChatEvent::MemberRenamed {
                        connection_id: connection_id.to_owned(),
                        old_name: conn.display_name(),
                        name: name.display.clone(),
                    },
                    *shard,
                ),
            };
            limits::check_key(&keys::members_pk(&room, shard), connection_id)
                .map_err(|e| key_error(e, SET_NAME))?;
            let pending = if quiet {
                None
            } else {
                Some(self.shared.prepare(&room, before, after, event, now_ms)?)
            };
            state.injected_failure(SET_NAME)?;
            if let Some(old) = conn.name.as_ref().filter(|o| o.key != name.key) {
                state.release(&old.key, connection_id, conn.identity.as_deref(), now_s);
            }
            // The claim lives as long as the connection, so an abandoned name frees itself.
            state.claims.insert(
                name.key.clone(),
                Claim {
                    connection_id: Some(connection_id.to_owned()),
                    identity: conn.identity.clone(),
                    name: name.display.clone(),
                    expires_at: conn.expires_at,
                },
            );
            let old_name = conn.display_name();
            let mut named = conn;
            named.name = Some(Named {
                display: name.display.clone(),
                key: name.key.clone(),
            });
            // Other rooms still know the old name until their own transactions: the marker
            // says so until the last of them is done, for a retry to finish. A rename in its
            // only room is whole in this one.
            if !joins {
                named.renaming = (named.rooms.len() > 1).then(|| old_name.clone());
            }
            named.rooms.insert(room.clone(), shard);
            let member = MemberItem {
                batch: named.batch,
                ..MemberItem::new(connection_id, name.display.clone(), named.expires_at)
            };
            state.put_conn(connection_id, Some(named));
            state.put_member(&room, shard, connection_id, Some(member));
            let Some(pending) = pending else {
                // Recorded with the events of the rename it finished first, if any: a resend
                // gets the same answer.
                state.record_request(
                    request,
                    connection_id,
                    Some(&name.display),
                    event_refs(earlier),
                    now_ms,
                );
                return Ok(Claimed::Unsequenced);
            };
            let event = Box::new(self.finish(state, pending));
            let mut refs = event_refs(earlier);
            refs.extend(event_refs([event.as_ref()]));
            state.record_request(request, connection_id, Some(&name.display), refs, now_ms);
            Ok(Claimed::First(event, (!joins).then_some((room, old_name))))
        })
        .await
    }

    /// After the first room heard of a rename: `MemberRenamed` in each other room the
    /// connection is a member of (name order), one transaction each, then the `renaming`
    /// marker goes, then a join of lobby if it is not in it. A room it has left meanwhile is
    /// skipped, and a rename made meanwhile announces itself.
    async fn announce_rename(
        &self,
        connection_id: &str,
        first_room: &str,
        old_name: &str,
        display: &str,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        // The adapter reads the connection once more, for the rooms to announce it in.
        let read = self
            .write(
                RENAME,
                |_| Calls::default().get(conn_pk.clone()),
                |state| {
                    Ok(state.live_conn(connection_id, now_s).map(|c| {
                        (
                            c.rooms.keys().cloned().collect::<Vec<_>>(),
                            c.renaming.is_some(),
                        )
                    }))
                },
            )
            .await?;
        let Some((rooms, marked)) = read else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        for room in rooms.iter().filter(|r| *r != first_room) {
            events.extend(
                self.rename_in(connection_id, room, display, Some(old_name), now_ms)
                    .await?,
            );
        }
        if marked {
            self.clear_renaming(connection_id, display).await?;
        }
        if !rooms.iter().any(|r| r == DEFAULT_ROOM) {
            if let Joined::Now(event) = self
                .join_room(connection_id, DEFAULT_ROOM, usize::MAX, now_ms)
                .await?
            {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// Finishes a rename that stopped part-way (the connection's `renaming` is set):
    /// `MemberRenamed` in each room (name order) whose member item still has another name
    /// than the connection, from that name, then the marker goes. Nothing (and no write)
    /// without the marker, the common case: the connection has been read already.
    async fn finish_rename(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let pending = {
            let state = self.shared.lock();
            state
                .live_conn(connection_id, epoch_secs(now_ms))
                .filter(|c| c.renaming.is_some())
                .and_then(|c| {
                    let rooms = c.rooms.keys().cloned().collect::<Vec<_>>();
                    c.name.as_ref().map(|n| (rooms, n.display.clone()))
                })
        };
        let Some((rooms, display)) = pending else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        for room in &rooms {
            events.extend(
                self.rename_in(connection_id, room, &display, None, now_ms)
                    .await?,
            );
        }
        self.clear_renaming(connection_id, &display).await?;
        Ok(events)
    }

    /// `MemberRenamed` to `display` in `room` from the name its member item has, with the
    /// put of that item, if that name is another one; nothing if the connection has left the
    /// room or been renamed again (that rename announces itself). `old`: the name the rename
    /// started from, which the DynamoDB adapter assumes on its first try instead of reading
    /// the member item (on the condition that the item has it; `None`: it reads it).
    async fn rename_in(
        &self,
        connection_id: &str,
        room: &str,
        display: &str,
        old: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        // The connection, its shard in the room and the name the room knows it by, if the
        // room has a rename to hear of.
        let renaming = |state: &State| {
            let conn = state
                .live_conn(connection_id, now_s)
                .filter(|c| c.name.as_ref().map(|n| n.display.as_str()) == Some(display))?;
            let shard = *conn.rooms.get(room)?;
            let known = state.member(room, shard, connection_id)?.name.clone();
            (known != display).then(|| (conn.clone(), shard, known))
        };
        let plan = |state: &State| {
            let base = Calls::default()
                .get(keys::room_pk(room))
                .get(conn_pk.clone());
            let shard = state
                .live_conn(connection_id, now_s)
                .and_then(|c| c.rooms.get(room).copied());
            let base = match (old, shard) {
                (None, Some(shard)) => base.get(keys::members_pk(room, shard)),
                _ => base,
            };
            match renaming(state) {
                Some((conn, shard, _)) => base
                    .item(conn_pk.clone(), conn_units(&conn))
                    .item(keys::members_pk(room, shard), 1)
                    .append(room, EVENT_OVERHEAD),
                None => base,
            }
        };
        self.write(RENAME, plan, |state| {
            let Some((conn, shard, known)) = renaming(state) else {
                return Ok(None);
            };
            let (before, after) = state.next_counter(room, 0);
            let event = ChatEvent::MemberRenamed {
                connection_id: connection_id.to_owned(),
                old_name: known,
                name: display.to_owned(),
            };
            let pending = self.shared.prepare(room, before, after, event, now_ms)?;
            state.injected_failure(RENAME)?;
            // A put of the whole member item, as the DynamoDB adapter writes it.
            let member = MemberItem {
                batch: conn.batch,
                ..MemberItem::new(connection_id, display.to_owned(), conn.expires_at)
            };
            state.put_member(room, shard, connection_id, Some(member));
            Ok(Some(self.finish(state, pending)))
        })
        .await
    }

    /// Removes the `renaming` marker once every room has heard of the rename to `display`
    /// (an `UpdateItem`); not if the connection has been renamed again since (that rename
    /// owns the marker now).
    async fn clear_renaming(&self, connection_id: &str, display: &str) -> Result<(), StoreError> {
        const OP: &str = "UpdateItem renaming";
        let conn_pk = keys::conn_pk(connection_id);
        let plan = |state: &State| match state.conns.get(connection_id) {
            Some(conn) => Calls::default().item(conn_pk.clone(), conn_units(conn)),
            None => Calls::default(),
        };
        self.write(OP, plan, |state| {
            let Some(mut done) = state.conns.get(connection_id).cloned() else {
                return Ok(());
            };
            if done.name.as_ref().map(|n| n.display.as_str()) != Some(display) {
                return Ok(());
            }
            state.injected_failure(OP)?;
            done.renaming = None;
            state.put_conn(connection_id, Some(done));
            Ok(())
        })
        .await
    }

    /// The leaves of `ids` from `room` in one transaction (those still members of it), with
    /// one counter move for them all.
    async fn leave_many(
        &self,
        room: &str,
        ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        const PRUNE: &str = "TransactWriteItems prune";
        let leaving = |state: &State| -> Vec<(ConnItem, u32)> {
            ids.iter()
                .filter_map(|id| state.conns.get(id))
                .filter_map(|c| c.rooms.get(room).map(|&shard| (c.clone(), shard)))
                .collect()
        };
        let plan = |state: &State| {
            let mut calls = Calls::default().get(keys::room_pk(room));
            for id in ids {
                calls = calls.get(keys::conn_pk(id));
            }
            let leaving = leaving(state);
            if leaving.is_empty() {
                return calls;
            }
            for (conn, shard) in &leaving {
                calls = calls
                    .get_if(conn.renaming.is_some(), || keys::members_pk(room, *shard))
                    .item(keys::conn_pk(&conn.connection_id), conn_units(conn))
                    .item(keys::members_pk(room, *shard), 1);
            }
            if state.large(room) {
                // Unsequenced: the connections and member items only.
                return calls.transaction();
            }
            let pk = keys::room_pk(room);
            calls.writes.push((pk.clone(), 1));
            for _ in &leaving {
                calls
                    .writes
                    .push((pk.clone(), units_of(EVENT_OVERHEAD, 1024)));
            }
            calls.appends = Some(room.to_owned());
            calls.transaction()
        };
        self.write(PRUNE, plan, |state| {
            let leaving = leaving(state);
            if leaving.is_empty() {
                return Ok(Vec::new());
            }
            if state.large(room) {
                state.injected_failure(PRUNE)?;
                for (conn, shard) in leaving {
                    let id = conn.connection_id.clone();
                    let mut gone = conn;
                    gone.rooms.remove(room);
                    state.put_conn(&id, Some(gone));
                    state.put_member(room, shard, &id, None);
                }
                return Ok(Vec::new());
            }
            let k = leaving.len() as u64;
            let (before, after) = state.advance(room, k, Members::Leave(k));
            let events = leaving
                .iter()
                .map(|(conn, shard)| ChatEvent::MemberLeft {
                    connection_id: conn.connection_id.clone(),
                    name: state.name_in_room(conn, room, *shard),
                    reason,
                })
                .collect();
            let pending = self
                .shared
                .prepare_all(room, before, after, events, now_ms)?;
            state.injected_failure(PRUNE)?;
            for (conn, shard) in leaving {
                let id = conn.connection_id.clone();
                let mut gone = conn;
                gone.rooms.remove(room);
                state.put_conn(&id, Some(gone));
                state.put_member(room, shard, &id, None);
            }
            Ok(pending.into_iter().map(|p| self.finish(state, p)).collect())
        })
        .await
    }

    /// After an unsequenced join of `connection_id` into `room`: if it is one of the samplers
    /// ([`keys::samples_size`]), counts the room's newest shard (a `Query` with
    /// `Select: COUNT`)
    /// and updates the counter's `shards` and `large` if the estimate calls for it (an
    /// `UpdateItem` on the condition that `shards` is as read). The join has committed
    /// already, so a failure here is only logged: the next sampler sizes the room.
    async fn size_room_logged(&self, room: &str, connection_id: &str, now_ms: i64) {
        if !keys::samples_size(connection_id) {
            return;
        }
        if let Err(e) = self.size_room(room, now_ms).await {
            warn!(room, error = %e, "sizing the room after an unsequenced join failed");
        }
    }

    async fn size_room(&self, room: &str, now_ms: i64) -> Result<(), StoreError> {
        const OP: &str = "UpdateItem counter size";
        // The counter first (GetItem), for the newest shard to count.
        let room_pk = keys::room_pk(room);
        let shard = {
            let (mut state, _) = self.read(ReadOp::GetSequence, &room_pk).await?;
            self.charge_read(&mut state, ReadOp::GetSequence, &room_pk, 100);
            state.shards(room) - 1
        };
        let pk = keys::members_pk(room, shard);
        let (shards_read, large_read, counted) = {
            let (mut state, _) = self.read(ReadOp::CountMembers, &pk).await?;
            let (counted, bytes) = state.count_shard(room, shard, epoch_secs(now_ms));
            self.charge_read(&mut state, ReadOp::CountMembers, &pk, bytes);
            (state.shards(room), state.large(room), counted)
        };
        let limit = self.shared.lock().large_limit();
        let (shards, large) = keys::sized(counted, shards_read, large_read, limit);
        if shards == shards_read && (!large || large_read) {
            return Ok(());
        }
        self.write(
            OP,
            |_| Calls::default().item(room_pk.clone(), 1),
            |state| {
                // The condition: `shards` as read (else another sampler or join moved it).
                if state.shards(room) != shards_read {
                    return Ok(());
                }
                state.injected_failure(OP)?;
                let before = state.counter(room);
                let mut after = before.unwrap_or_default();
                after.shards = Some(shards);
                if large {
                    after.large = Some(true);
                }
                let change = stream_change(
                    now_ms,
                    event_keys(&room_pk, keys::COUNTER_SEQ),
                    counter_image(&room_pk, after),
                )
                .map_err(|e| StoreError::Malformed(format!("stream record: {e}")))?;
                let record = self
                    .shared
                    .record(if before.is_some() { "MODIFY" } else { "INSERT" }, change);
                state.rooms.entry(room.to_owned()).or_default().counter = Some(after);
                state.publish(self.shared.instance, record);
                self.shared.changed.notify_waiters();
                Ok(())
            },
        )
        .await
    }

    /// Ends the membership of `conn` in `room` (its item in `shard`): `conn`'s `rooms` loses
    /// the room, the member item goes, the counter's `members` goes down and `MemberLeft` is
    /// appended, all at once.
    #[allow(clippy::too_many_arguments)]
    fn leave(
        &self,
        state: &mut State,
        conn: &ConnItem,
        room: &str,
        shard: u32,
        reason: LeaveReason,
        now_ms: i64,
        op: &'static str,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let id = conn.connection_id.as_str();
        // A disconnect of a large room is unsequenced; an explicit `leave` never is.
        if op != LEAVE && state.large(room) {
            state.injected_failure(op)?;
            let mut left = conn.clone();
            left.rooms.remove(room);
            state.put_conn(id, Some(left));
            state.put_member(room, shard, id, None);
            return Ok(None);
        }
        let (before, after) = state.next_counter(room, -1);
        let event = ChatEvent::MemberLeft {
            connection_id: id.to_owned(),
            name: state.name_in_room(conn, room, shard),
            reason,
        };
        let pending = self.shared.prepare(room, before, after, event, now_ms)?;
        state.injected_failure(op)?;
        let mut left = conn.clone();
        left.rooms.remove(room);
        state.put_conn(id, Some(left));
        state.put_member(room, shard, id, None);
        Ok(Some(self.finish(state, pending)))
    }
}

/// The writes a request with a `requestId` may make, at most once per request (the trait's
/// `*_once` methods; without one, the plain methods).
impl EmbeddedStore {
    /// `setName`, with `request` at most once (see [`ChatStore::set_name_once`]).
    async fn set_name_in(
        &self,
        connection_id: &str,
        name: &ValidName,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<Vec<StoredEvent>>, StoreError> {
        let mut evicted = false;
        // An earlier rename stopped part-way (its client got an error): the rooms it did not
        // reach hear of it first, whatever this call goes on to do.
        if let Some(done) = {
            let state = self.shared.lock();
            state.request_done(request, connection_id, epoch_secs(now_ms))?
        } {
            // A resend of a setName done already (checked before finishing a rename, as the
            // DynamoDB adapter reads the item first).
            return Ok(Once::Again(done));
        }
        let mut events = self.finish_rename(connection_id, now_ms).await?;
        loop {
            match self
                .claim_name(connection_id, name, evicted, request, &events, now_ms)
                .await?
            {
                Claimed::Again(done) => return Ok(Once::Again(*done)),
                Claimed::Unsequenced => {
                    self.size_room_logged(DEFAULT_ROOM, connection_id, now_ms)
                        .await;
                    return Ok(Once::First(events));
                }
                Claimed::Same { in_lobby: true } => return Ok(Once::First(events)),
                Claimed::Same { in_lobby: false } => {
                    // Nothing to claim; back into lobby, which it left.
                    if let Joined::Now(event) = self
                        .join_room(connection_id, DEFAULT_ROOM, usize::MAX, now_ms)
                        .await?
                    {
                        events.push(event);
                    }
                    return Ok(Once::First(events));
                }
                Claimed::Evict(old) => {
                    // The same identity takes its name back: its older connection (a stale
                    // one, typically) is removed first, leaving every room it is in as a
                    // disconnect would (those leaves are its own, not in this answer); its
                    // claim becomes this identity's reservation.
                    evicted = true;
                    let holds_it = self
                        .shared
                        .lock()
                        .conns
                        .get(&old)
                        .is_some_and(|c| c.name.as_ref().is_some_and(|n| n.key == name.key));
                    if holds_it {
                        self.remove_connection(&old, LeaveReason::Replaced, now_ms)
                            .await?;
                    }
                }
                Claimed::First(first, renamed) => {
                    events.push(*first);
                    let recorded = events.len();
                    if let Some((room, old_name)) = renamed {
                        events.extend(
                            self.announce_rename(
                                connection_id,
                                &room,
                                &old_name,
                                &name.display,
                                now_ms,
                            )
                            .await?,
                        );
                    }
                    if events.len() > recorded {
                        // The other rooms' events complete the answer a resend gets.
                        let mut state = self.shared.lock();
                        if let Some(slot) =
                            state.request_slot(request, connection_id, epoch_secs(now_ms))
                        {
                            if let Some(item) = state.requests.get_mut(&slot) {
                                item.events = event_refs(&events);
                            }
                        }
                    }
                    return Ok(Once::First(events));
                }
            }
        }
    }

    /// `join`, with `request` at most once. A join of a large room, or one whose append lost
    /// the counter [`keys::SEQUENCED_JOIN_ATTEMPTS`] times, is unsequenced: its member item
    /// and rooms entry only (and its request item, recording the room's last id as its answer).
    async fn join_in(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<Joined>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        let plan = |state: &State, attempt: u32| {
            let base = Calls::default()
                .get(keys::room_pk(room))
                .get(conn_pk.clone());
            let quiet = quiet_join(state, room, attempt);
            match (
                join_step(state, connection_id, room, max_rooms, quiet, now_s),
                state.conns.get(connection_id),
            ) {
                (Ok(Ok(shard)), Some(conn)) => {
                    let calls = base
                        .item(
                            conn_pk.clone(),
                            units_of(conn_item_size(conn) + room.len() + 3, 1024),
                        )
                        .item(keys::members_pk(room, shard), 1)
                        .request(state, request, connection_id, now_s);
                    if quiet {
                        calls.transaction()
                    } else {
                        calls.append(room, EVENT_OVERHEAD)
                    }
                }
                _ => base,
            }
        };
        let (joined, quiet) = self
            .write_attempts(JOIN, plan, |state, attempt| {
                if let Some(done) = state.request_done(request, connection_id, now_s)? {
                    return Ok((Once::Again(done), false));
                }
                let quiet = quiet_join(state, room, attempt);
                let shard = match join_step(state, connection_id, room, max_rooms, quiet, now_s)? {
                    Ok(shard) => shard,
                    Err(last) => return Ok((Once::First(Joined::Already { last }), false)),
                };
                limits::check_key(&keys::members_pk(room, shard), connection_id)
                    .map_err(|e| key_error(e, JOIN))?;
                let mut conn = state
                    .live_conn(connection_id, now_s)
                    .cloned()
                    .ok_or_else(|| not_connected(connection_id))?;
                let pending = if quiet {
                    None
                } else {
                    let (before, after) = state.next_counter(room, 1);
                    let event = ChatEvent::MemberJoined {
                        connection_id: connection_id.to_owned(),
                        name: conn.display_name(),
                    };
                    Some(self.shared.prepare(room, before, after, event, now_ms)?)
                };
                state.injected_failure(JOIN)?;
                let member = MemberItem {
                    batch: conn.batch,
                    ..MemberItem::new(connection_id, conn.display_name(), conn.expires_at)
                };
                conn.rooms.insert(room.to_owned(), shard);
                state.put_conn(connection_id, Some(conn));
                state.put_member(room, shard, connection_id, Some(member));
                Ok(match pending {
                    Some(pending) => {
                        let event = self.finish(state, pending);
                        state.record_request(
                            request,
                            connection_id,
                            None,
                            event_refs([&event]),
                            now_ms,
                        );
                        (Once::First(Joined::Now(event)), false)
                    }
                    None => {
                        // The counter as it stands when the join commits: the catch-up point,
                        // and the answer a resend gets.
                        let last = state.last(room);
                        let answer = EventRef {
                            room: room.to_owned(),
                            id: last,
                        };
                        state.record_request(request, connection_id, None, vec![answer], now_ms);
                        (Once::First(Joined::Unsequenced { last }), true)
                    }
                })
            })
            .await?;
        if quiet {
            self.size_room_logged(room, connection_id, now_ms).await;
        }
        Ok(joined)
    }

    /// A `leave`, with `request` at most once.
    async fn leave_in(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        let membership = |state: &State| -> Result<(ConnItem, u32), StoreError> {
            let conn = state
                .live_conn(connection_id, now_s)
                .ok_or_else(|| not_connected(connection_id))?;
            let shard = conn
                .rooms
                .get(room)
                .copied()
                .ok_or_else(|| StoreError::NotAMember(room.to_owned()))?;
            Ok((conn.clone(), shard))
        };
        let plan = |state: &State| {
            let base = Calls::default()
                .get(keys::room_pk(room))
                .get(conn_pk.clone());
            match membership(state) {
                // The member item too while a rename is unfinished: its name is the room's.
                Ok((conn, shard)) => base
                    .get_if(conn.renaming.is_some(), || keys::members_pk(room, shard))
                    .item(conn_pk.clone(), conn_units(&conn))
                    .item(keys::members_pk(room, shard), 1)
                    .request(state, request, connection_id, now_s)
                    .append(room, EVENT_OVERHEAD),
                Err(_) => base,
            }
        };
        self.write(LEAVE, plan, |state| {
            if let Some(done) = state.request_done(request, connection_id, now_s)? {
                return Ok(Once::Again(done));
            }
            let (conn, shard) = membership(state)?;
            // An explicit leave is always sequenced.
            let event = self
                .leave(state, &conn, room, shard, reason, now_ms, LEAVE)?
                .ok_or_else(|| StoreError::Malformed("a leave recorded no event".into()))?;
            state.record_request(request, connection_id, None, event_refs([&event]), now_ms);
            Ok(Once::First(event))
        })
        .await
    }

    /// A post to a room, with `request` at most once.
    async fn post_in(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        let plan = |state: &State| {
            let base = Calls::default()
                .get(keys::room_pk(room))
                .get(conn_pk.clone());
            match post_check(state, connection_id, room, now_s) {
                Ok(conn) => base
                    .item(conn_pk.clone(), conn_units(conn))
                    .request(state, request, connection_id, now_s)
                    .append(room, EVENT_OVERHEAD + message.len()),
                Err(_) => base,
            }
        };
        self.write(POST, plan, |state| {
            if let Some(done) = state.request_done(request, connection_id, now_s)? {
                return Ok(Once::Again(done));
            }
            let conn = post_check(state, connection_id, room, now_s)?;
            let event = ChatEvent::MessagePosted {
                connection_id: connection_id.to_owned(),
                name: conn.display_name(),
                message: message.to_owned(),
            };
            let (before, after) = state.next_counter(room, 0);
            let pending = self.shared.prepare(room, before, after, event, now_ms)?;
            state.injected_failure(POST)?;
            let event = self.finish(state, pending);
            state.record_request(request, connection_id, None, event_refs([&event]), now_ms);
            Ok(Once::First(event))
        })
        .await
    }

    /// A private message, with `request` at most once.
    async fn private_in(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let to_key = recipient_key(to);
        let conn_pk = keys::conn_pk(connection_id);
        let plan = |state: &State| {
            let base = Calls::default()
                .get(keys::room_pk(DEFAULT_ROOM))
                .get(conn_pk.clone());
            let Some(key) = to_key.as_deref() else {
                return base;
            };
            let base = base.get(keys::name_pk(key));
            match private_check(state, connection_id, to, Some(key), now_s) {
                // The sender's connection and the recipient's claim are the conditions.
                Ok((conn, to_conn)) => base
                    .get(keys::conn_pk(&to_conn.connection_id))
                    .item(conn_pk.clone(), conn_units(conn))
                    .item(keys::name_pk(key), 1)
                    .request(state, request, connection_id, now_s)
                    .append(DEFAULT_ROOM, EVENT_OVERHEAD + message.len()),
                Err(_) => base,
            }
        };
        self.write(PRIVATE, plan, |state| {
            if let Some(done) = state.request_done(request, connection_id, now_s)? {
                return Ok(Once::Again(done));
            }
            let (conn, to_conn) =
                private_check(state, connection_id, to, to_key.as_deref(), now_s)?;
            let event = ChatEvent::PrivateMessageSent {
                connection_id: connection_id.to_owned(),
                name: conn.display_name(),
                to_connection_id: to_conn.connection_id.clone(),
                to_name: to_conn.display_name(),
                message: message.to_owned(),
                identity: conn.identity.clone(),
                to_identity: to_conn.identity.clone(),
            };
            // Numbered in the lobby's log, whoever is in the lobby (see `keys`).
            let (before, after) = state.next_counter(DEFAULT_ROOM, 0);
            let pending = self
                .shared
                .prepare(DEFAULT_ROOM, before, after, event, now_ms)?;
            state.injected_failure(PRIVATE)?;
            let event = self.finish(state, pending);
            state.record_request(request, connection_id, None, event_refs([&event]), now_ms);
            Ok(Once::First(event))
        })
        .await
    }
}

/// One step of `remove_connection`.
enum Removal {
    /// It left one room (more may follow), with its event unless unsequenced (a large room).
    Left(Option<StoredEvent>),
    /// The connection is gone; its principal's slot is still to give back.
    Gone(Option<String>),
    /// There was no such connection.
    Unknown,
}

#[async_trait]
impl ChatStore for EmbeddedStore {
    async fn open_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        admission: Option<Admission<'_>>,
        batch: bool,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        const OP: &str = "PutItem connection";
        let now_s = epoch_secs(now_ms);
        let expires_at = now_s + self.shared.retention.connection_ttl.as_secs() as i64;
        let item = ConnItem {
            connection_id: connection_id.to_owned(),
            connected_at: now_ms,
            expires_at,
            name: None,
            bucket: None,
            identity: identity.map(str::to_owned),
            rooms: BTreeMap::new(),
            renaming: None,
            principal: admission.map(|a| a.principal.to_owned()),
            batch,
        };
        let pk = keys::conn_pk(connection_id);
        let units = conn_units(&item);
        let limited = admission.filter(|a| a.max_connections > 0);
        self.write(
            OP,
            |state| match limited {
                // The adapter reads the slots, then puts them and the connection together.
                Some(a) => {
                    let lpk = keys::limit_pk(a.principal);
                    let slots = state.slots.get(a.principal).cloned().unwrap_or_default();
                    Calls::default()
                        .get(lpk.clone())
                        .item(lpk, slots_units(a.principal, &slots))
                        .item(pk.clone(), units)
                        .transaction()
                }
                None => Calls::default().item(pk.clone(), units),
            },
            |state| {
                limits::check_key(&pk, keys::CONN_SK).map_err(|e| key_error(e, OP))?;
                if let Some(a) = limited {
                    limits::check_key(&keys::limit_pk(a.principal), keys::LIMIT_SLOTS_SK)
                        .map_err(|e| key_error(e, OP))?;
                }
                state.injected_failure(OP)?;
                if let Some(a) = limited {
                    let current = state.slots.get(a.principal).cloned().unwrap_or_default();
                    let Some(mut live) = ratelimit::admit(&current.conns, a.max_connections, now_s)
                    else {
                        return Ok(None);
                    };
                    live.insert(connection_id.to_owned(), expires_at);
                    let next = SlotsItem {
                        expires_at: live.values().copied().max().unwrap_or(expires_at),
                        conns: live,
                        v: current.v + 1,
                    };
                    state.slots.insert(a.principal.to_owned(), next);
                }
                // A put replaces the whole item, as PutItem does (a reused id starts without a
                // name or rooms).
                state.put_conn(connection_id, Some(item.clone()));
                Ok(Some(item.to_connection()))
            },
        )
        .await
    }

    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        let pk = keys::conn_pk(connection_id);
        limits::check_key(&pk, keys::CONN_SK).map_err(|e| key_error(e, "GetItem connection"))?;
        let (mut state, cutoff) = self.read(ReadOp::GetConnection, &pk).await?;
        let item = state.conns.as_of(connection_id, cutoff);
        let bytes = item.map_or(0, conn_item_size);
        let found = item
            .filter(|c| c.expires_at > epoch_secs(now_ms))
            .map(ConnItem::to_connection);
        self.charge_read(&mut state, ReadOp::GetConnection, &pk, bytes);
        Ok(found)
    }

    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.set_name_in(connection_id, name, None, now_ms)
            .await?
            .first()
    }

    async fn set_name_once(
        &self,
        connection_id: &str,
        name: &ValidName,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Vec<StoredEvent>>, StoreError> {
        self.set_name_in(connection_id, name, Some(request), now_ms)
            .await
    }

    async fn join_room(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        now_ms: i64,
    ) -> Result<Joined, StoreError> {
        self.join_in(connection_id, room, max_rooms, None, now_ms)
            .await?
            .first()
    }

    async fn join_room_once(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Joined>, StoreError> {
        self.join_in(connection_id, room, max_rooms, Some(request), now_ms)
            .await
    }

    async fn leave_room(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.leave_in(connection_id, room, reason, None, now_ms)
            .await?
            .first()
    }

    async fn leave_room_once(
        &self,
        connection_id: &str,
        room: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.leave_in(
            connection_id,
            room,
            LeaveReason::Left,
            Some(request),
            now_ms,
        )
        .await
    }

    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.post_in(connection_id, room, message, None, now_ms)
            .await?
            .first()
    }

    async fn post_to_room_once(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.post_in(connection_id, room, message, Some(request), now_ms)
            .await
    }

    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.private_in(connection_id, to, message, None, now_ms)
            .await?
            .first()
    }

    async fn post_private_once(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.private_in(connection_id, to, message, Some(request), now_ms)
            .await
    }

    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        let conn_pk = keys::conn_pk(connection_id);
        let mut left = Vec::new();
        for step in 0.. {
            // The adapter reads the connection, then each room's counter and the connection
            // before its leave, then the connection again and its claim before removing it.
            let first = step == 0;
            let plan = |state: &State| {
                let base = Calls::default().get_if(first, || conn_pk.clone());
                let Some(conn) = state.conns.get(connection_id) else {
                    return base;
                };
                if let Some((room, shard)) = conn.rooms.iter().next() {
                    let calls = base
                        .get(keys::room_pk(room))
                        .get(conn_pk.clone())
                        .get_if(conn.renaming.is_some(), || keys::members_pk(room, *shard))
                        .item(conn_pk.clone(), conn_units(conn))
                        .item(keys::members_pk(room, *shard), 1);
                    return if state.large(room) {
                        calls.transaction()
                    } else {
                        calls.append(room, EVENT_OVERHEAD)
                    };
                }
                // Read again only after leaves, for a room joined meanwhile.
                let last = base
                    .get_if(!first, || conn_pk.clone())
                    .item(conn_pk.clone(), conn_units(conn))
                    .transaction();
                match &conn.name {
                    Some(n) => {
                        let released = state
                            .claims
                            .get(&n.key)
                            .is_some_and(|c| c.connection_id.as_deref() == Some(connection_id));
                        let last = last.get(keys::name_pk(&n.key));
                        if released {
                            last.item(keys::name_pk(&n.key), 1)
                        } else {
                            last
                        }
                    }
                    None => last,
                }
            };
            let done = self
                .write(REMOVE, plan, |state| {
                    // Expired connections are removed too: `$disconnect` for them is still real.
                    let Some(conn) = state.conns.get(connection_id).cloned() else {
                        return Ok(Removal::Unknown);
                    };
                    // One room per transaction, in name order; the connection item goes last,
                    // so after a failure its `rooms` tells a retry what is left.
                    if let Some((room, &shard)) = conn.rooms.iter().next() {
                        let room = room.clone();
                        return self
                            .leave(state, &conn, &room, shard, reason, now_ms, REMOVE)
                            .map(Removal::Left);
                    }
                    state.injected_failure(REMOVE)?;
                    state.put_conn(connection_id, None);
                    // An ordinary delete: on the connections table's stream, unmarked.
                    if let Some(record) = self.shared.conn_removal(now_ms, &conn, false) {
                        state.publish_conn(self.shared.instance, record);
                    }
                    if let Some(named) = &conn.name {
                        state.release(&named.key, connection_id, conn.identity.as_deref(), now_s);
                    }
                    Ok(Removal::Gone(conn.principal.clone()))
                })
                .await?;
            // `Left`: one room left (with its event, unless unsequenced).
            match done {
                Removal::Left(event) => left.extend(event),
                Removal::Gone(principal) => {
                    // After the connection is gone, and never failing the removal, as the adapter
                    // does it.
                    if let Some(principal) = principal {
                        if let Err(e) = self
                            .release_connection_slot(&principal, connection_id)
                            .await
                        {
                            warn!(connection_id, error = %e, "could not give back the connection's slot; it expires with the connection");
                        }
                    }
                    break;
                }
                Removal::Unknown => break,
            }
        }
        Ok(left)
    }

    /// As the DynamoDB adapter batches the fan-out's pruning: the connections (each once) are
    /// read, their leaves are grouped by room, [`LEAVES_PER_TRANSACTION`] to a transaction (one
    /// counter move for them all), then each connection goes as `remove_connection` ends.
    /// The leaves come room by room (name order), each room's in connection id order.
    async fn remove_connections(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let ids: BTreeSet<&str> = connection_ids.iter().map(String::as_str).collect();
        // The reads go out together (one call's time), each to its connection's partition.
        sleep(self.behaviour.read_latency).await;
        for id in &ids {
            self.take_units(
                "GetItem connection",
                &[(keys::conn_pk(id), 1.0)],
                true,
                true,
            )
            .await?;
        }
        let by_room: BTreeMap<String, Vec<String>> = {
            let mut state = self.shared.lock();
            let mut by_room: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for id in &ids {
                // The adapter's GetItem of each connection, before anything else.
                let pk = keys::conn_pk(id);
                state.consumed.read_half_units += 2;
                state
                    .consumed_by_partition
                    .entry(pk)
                    .or_default()
                    .read_half_units += 2;
                if let Some(conn) = state.conns.get(id) {
                    for room in conn.rooms.keys() {
                        by_room
                            .entry(room.clone())
                            .or_default()
                            .push((*id).to_owned());
                    }
                }
            }
            by_room
        };
        let mut left = Vec::new();
        for (room, members) in &by_room {
            for chunk in members.chunks(LEAVES_PER_TRANSACTION) {
                left.extend(self.leave_many(room, chunk, reason, now_ms).await?);
            }
        }
        for id in ids {
            left.extend(self.remove_connection(id, reason, now_ms).await?);
        }
        Ok(left)
    }

    async fn remove_expired(
        &self,
        gone: &super::items::ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        const OP: &str = "TransactWriteItems expired leave";
        const RELEASE: &str = "TransactWriteItems release expired claim";
        let id = gone.connection_id.as_str();
        let now_s = epoch_secs(now_ms);
        // As the adapter: the connection first; still there, it decides.
        let existing = {
            let (mut state, _) = self.read(ReadOp::GetConnection, &keys::conn_pk(id)).await?;
            let found = state.conns.get(id).cloned();
            self.charge_read(
                &mut state,
                ReadOp::GetConnection,
                &keys::conn_pk(id),
                found.as_ref().map_or(0, conn_item_size),
            );
            found
        };
        if let Some(conn) = existing {
            if conn.expires_at > now_s {
                warn!(
                    connection_id = id,
                    "a TTL removal of a connection that is still live; leaving it alone"
                );
                return Ok(Vec::new());
            }
            return self
                .remove_connection(id, LeaveReason::Expired, now_ms)
                .await;
        }
        let mut left = Vec::new();
        for (room, &shard) in gone.rooms.iter().flatten() {
            let mpk = keys::members_pk(room, shard);
            let plan = |state: &State| {
                let calls = Calls::default().get(keys::room_pk(room)).get(mpk.clone());
                if state.member(room, shard, id).is_none() {
                    return calls;
                }
                let calls = calls.item(mpk.clone(), 1);
                if state.large(room) {
                    calls.transaction()
                } else {
                    calls.append(room, EVENT_OVERHEAD)
                }
            };
            let event = self
                .write(OP, plan, |state| {
                    // The condition: the member item is still there (no leave yet).
                    let Some(member) = state.member(room, shard, id).cloned() else {
                        return Ok(None);
                    };
                    if state.large(room) {
                        state.injected_failure(OP)?;
                        state.put_member(room, shard, id, None);
                        return Ok(None);
                    }
                    let (before, after) = state.next_counter(room, -1);
                    let event = ChatEvent::MemberLeft {
                        connection_id: id.to_owned(),
                        name: member.name,
                        reason: LeaveReason::Expired,
                    };
                    let pending = self.shared.prepare(room, before, after, event, now_ms)?;
                    state.injected_failure(OP)?;
                    state.put_member(room, shard, id, None);
                    Ok(Some(self.finish(state, pending)))
                })
                .await?;
            left.extend(event);
        }
        if let Some(key) = gone.name_key.as_deref() {
            let npk = keys::name_pk(key);
            self.write(
                RELEASE,
                |state| {
                    let ours = state
                        .claims
                        .get(key)
                        .is_some_and(|c| c.connection_id.as_deref() == Some(id));
                    let calls = Calls::default().get(npk.clone());
                    if ours {
                        calls.item(npk.clone(), 1).transaction()
                    } else {
                        calls
                    }
                },
                |state| {
                    // Only a claim still this connection's: a newer holder keeps the name.
                    let ours = state
                        .claims
                        .get(key)
                        .is_some_and(|c| c.connection_id.as_deref() == Some(id));
                    if ours {
                        state.injected_failure(RELEASE)?;
                        state.release(key, id, gone.identity.as_deref(), now_s);
                    }
                    Ok(())
                },
            )
            .await?;
        }
        if let Some(principal) = &gone.principal {
            if let Err(e) = self.release_connection_slot(principal, id).await {
                warn!(connection_id = id, error = %e, "could not give back the expired connection's slot; it expires with the connection");
            }
        }
        Ok(left)
    }

    async fn take_request_token(
        &self,
        connection_id: &str,
        limits: &RequestLimits<'_>,
        now_ms: i64,
    ) -> Result<Verdict, StoreError> {
        let per_window = limits.principal_per_window();
        let limit = limits.connection;
        if limit.is_off() && per_window == 0 {
            return Ok(Verdict::Allowed);
        }
        let pk = keys::conn_pk(connection_id);
        if per_window > 0 {
            // The adapter reads the connection for its principal, then counts the request in
            // the principal's window with one update.
            let principal = {
                let state = self.shared.lock();
                state
                    .conns
                    .get(connection_id)
                    .and_then(|c| c.principal.clone())
                    .or(limits.fallback_principal.map(str::to_owned))
            };
            if let Some(principal) = principal {
                let (index, _) = ratelimit::window(now_ms);
                let lpk = keys::limit_pk(&principal);
                let admitted = self
                    .write(
                        "UpdateItem principal requests",
                        |_| Calls::default().get(pk.clone()).item(lpk.clone(), 1),
                        |state| {
                            let entry =
                                state.windows.entry(principal.clone()).or_insert((index, 0));
                            if entry.0 != index {
                                *entry = (index, 0);
                            }
                            if entry.1 >= per_window {
                                return Ok(false);
                            }
                            entry.1 += 1;
                            Ok(true)
                        },
                    )
                    .await?;
                if !admitted {
                    return Ok(Verdict::PrincipalLimited);
                }
            }
        }
        if limit.is_off() {
            return Ok(Verdict::Allowed);
        }
        let plan = |state: &State| {
            let base = Calls::default().get_if(per_window == 0, || pk.clone());
            match state.conns.get(connection_id) {
                Some(conn) => base.item(pk.clone(), conn_units(conn)),
                None => base,
            }
        };
        // Not a failure-injection point: the handler takes a token before every request, and
        // the injected failures are meant for the request's own writes.
        self.write("UpdateItem rate limit", plan, |state| {
            let Some(mut conn) = state.conns.get(connection_id).cloned() else {
                return Ok(Verdict::Allowed);
            };
            match ratelimit::take(limit, conn.bucket, now_ms) {
                Some(next) => {
                    conn.bucket = Some(next);
                    state.put_conn(connection_id, Some(conn));
                    Ok(Verdict::Allowed)
                }
                None => Ok(Verdict::ConnectionLimited),
            }
        })
        .await
    }

    async fn release_connection_slot(
        &self,
        principal: &str,
        connection_id: &str,
    ) -> Result<(), StoreError> {
        let lpk = keys::limit_pk(principal);
        self.write(
            "UpdateItem release slot",
            |state| {
                let slots = state.slots.get(principal).cloned().unwrap_or_default();
                Calls::default().item(lpk.clone(), slots_units(principal, &slots))
            },
            |state| {
                if let Some(slots) = state.slots.get_mut(principal) {
                    if slots.conns.remove(connection_id).is_some() {
                        slots.v += 1;
                    }
                }
                Ok(())
            },
        )
        .await
    }

    async fn take_presence_budget(
        &self,
        room: &str,
        budget: PresenceBudget,
        now_ms: i64,
    ) -> Result<BudgetVerdict, StoreError> {
        if budget.is_off() {
            return Ok(BudgetVerdict::Allowed);
        }
        // As the adapter: the room's counter is read for the cost, then one conditional
        // update of the room's window (none in a large room).
        let rpk = keys::room_pk(room);
        let bpk = keys::presence_budget_pk(room);
        let (index, _) = presence::window(now_ms);
        // Not a failure-injection point: like the rate limiter, it runs before the request's
        // own writes, which the injected failures are meant for.
        self.write(
            "UpdateItem presence budget",
            |state| {
                let c = state.counter(room).unwrap_or_default().view();
                let calls = Calls::default().get(rpk.clone());
                if PresenceBudget::cost(c.members, c.large) == 0 {
                    calls
                } else {
                    calls.item(bpk.clone(), 1)
                }
            },
            |state| {
                let c = state.counter(room).unwrap_or_default().view();
                let cost = PresenceBudget::cost(c.members, c.large);
                if cost == 0 {
                    return Ok(BudgetVerdict::Allowed);
                }
                let entry = state
                    .presence_windows
                    .entry(room.to_owned())
                    .or_insert((index, 0));
                if entry.0 != index {
                    *entry = (index, 0);
                }
                // An empty window admits any one change (see `crate::presence`).
                if entry.1 > 0 && entry.1 as i64 > budget.admits_up_to(cost) {
                    return Ok(BudgetVerdict::Exceeded {
                        retry_after_ms: presence::retry_after_ms(now_ms),
                    });
                }
                entry.1 += cost;
                Ok(BudgetVerdict::Allowed)
            },
        )
        .await
    }

    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        const OP: &str = "PutItem redelivery";
        let seq = crate::redelivery::unique_seq(now_ms);
        // The same item the DynamoDB adapter writes; only its key, expiry and stream record are
        // kept here, as nothing reads redelivery items back but the fan-out, from the stream.
        let item = RedeliveryItem::new(redelivery, seq, now_ms);
        let expires_at = item.expires_at;
        let image: Item = serde_dynamo::to_item(item)
            .map_err(|e| StoreError::Malformed(format!("redelivery item: {e}")))?;
        let size = limits::check_item(&image).map_err(|e| key_error(e, OP))?;
        let pk = keys::redelivery_pk(&redelivery.room);
        let change = stream_change(now_ms, event_keys(&pk, seq), image)
            .map_err(|e| StoreError::Malformed(format!("stream record: {e}")))?;
        let record = self.shared.record("INSERT", change);
        self.write(
            OP,
            |_| Calls::default().item(pk.clone(), units_of(size, 1024)),
            |state| {
                state.injected_failure(OP)?;
                state.redeliveries.insert((pk.clone(), seq), expires_at);
                state.publish(self.shared.instance, record.clone());
                Ok(())
            },
        )
        .await?;
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn member_shards(&self, room: &str, _now_ms: i64) -> Result<u32, StoreError> {
        let pk = keys::room_pk(room);
        limits::check_key(&pk, "0").map_err(|e| key_error(e, "GetItem counter"))?;
        // Counter versions are not kept: a forced eventually consistent read of it sees now.
        let (mut state, _) = self.read(ReadOp::GetSequence, &pk).await?;
        let shards = state.counter(room).map_or(1, |c| c.view().shards);
        self.charge_read(&mut state, ReadOp::GetSequence, &pk, 64);
        Ok(shards)
    }

    async fn members_page(
        &self,
        room: &str,
        shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        let now_s = epoch_secs(now_ms);
        let pk = keys::members_pk(room, shard);
        limits::check_key(&pk, after.unwrap_or_default())
            .map_err(|e| key_error(e, "Query members"))?;
        let (mut state, cutoff) = self.read(ReadOp::QueryMembers, &pk).await?;
        let mut members = Vec::new();
        let mut evaluated = 0;
        let mut bytes = 0;
        let mut last: Option<String> = None;
        let mut full = false;
        let at_limit = |evaluated: usize, bytes: usize| {
            self.page_limit.is_some_and(|limit| evaluated == limit)
                || bytes >= limits::QUERY_PAGE_MAX_BYTES
        };
        // Like a DynamoDB Query with `Limit` and a filter: `Limit` counts the items read, the
        // filter (not expired) applies after, and a page that stopped at `Limit` (or at 1 MB
        // read) carries a cursor even when nothing follows (the caller finds an empty page
        // then).
        if let Some(partition) = state.members.get(&pk) {
            partition.scan(after, cutoff, |sk, m| {
                if at_limit(evaluated, bytes) {
                    full = true;
                    return false;
                }
                evaluated += 1;
                bytes += member_item_size(&pk, m);
                last = Some(sk.to_owned());
                if m.is_live(now_s) {
                    members.push(Member {
                        connection_id: m.connection_id.clone(),
                        name: m.name.clone(),
                        batch: m.batch,
                    });
                }
                true
            });
        }
        let full = full || at_limit(evaluated, bytes);
        let next = if full { last } else { None };
        self.charge_read(&mut state, ReadOp::QueryMembers, &pk, bytes);
        Ok(MembersPage { members, next })
    }

    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        let limit = limit.max(1);
        let now_s = epoch_secs(now_ms);
        let pk = keys::room_pk(room);
        limits::check_key(&pk, "1").map_err(|e| key_error(e, "Query events"))?;
        let (mut state, cutoff) = self.read(ReadOp::QueryEvents, &pk).await?;
        let visible = |item: &&StoredItem| {
            item.expires_at > now_s && cutoff.is_none_or(|c| item.committed <= c)
        };
        let events: Vec<StoredEvent> = match state.rooms.get(room) {
            None => Vec::new(),
            // `seq >= 1` always: the counter (seq 0) is not kept among the events here.
            Some(r) => match range {
                EventRange::After(after) => r
                    .events
                    .range((Bound::Excluded(after), Bound::Unbounded))
                    .map(|(_, item)| item)
                    .filter(visible)
                    .take(limit)
                    .map(|item| item.event.clone())
                    .collect(),
                EventRange::Before(before) => r
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
            },
        };
        let bytes = events
            .iter()
            .map(|e| EVENT_OVERHEAD + message_len(&e.event))
            .sum();
        self.charge_read(&mut state, ReadOp::QueryEvents, &pk, bytes);
        // As DynamoDB with `Limit`: a full page carries a cursor even if nothing follows.
        let next = (events.len() == limit)
            .then(|| events.last().map(|e| e.seq))
            .flatten();
        Ok(EventsPage { events, next })
    }
}

/// A reader of an [`EmbeddedStore`]'s change feed with its own checkpoint.
#[derive(Debug)]
pub struct EmbeddedFeed {
    shared: Arc<Shared>,
    /// Every record up to this stream sequence number is done.
    checkpoint: u64,
    /// Reads the connections table's stream rather than the event table's.
    connections: bool,
}

impl EmbeddedFeed {
    /// The stream ARN every record carries as `eventSourceARN`.
    pub fn stream_arn(&self) -> &str {
        if self.connections {
            &self.shared.conn_stream_arn
        } else {
            &self.shared.stream_arn
        }
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
            let batch = self
                .shared
                .records_after(self.checkpoint, max, self.connections);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_member_page_ends_at_1_mb_read_as_a_query_page_does() {
        // GIVEN a member shard of 600 items over 2 KB each (1.2 MB; names that long cannot
        // come through validation, so the items are put in directly), and no item-count limit
        let store = EmbeddedStore::new(Retention::default()).with_page_limit(10_000);
        let now = crate::now_ms();
        let long = "n".repeat(2_000);
        {
            let mut state = store.shared.lock();
            for i in 0..600 {
                let id = format!("c{i:03}");
                let member = MemberItem {
                    batch: false,
                    ..MemberItem::new(&id, format!("{long}{i}"), epoch_secs(now) + 3_600)
                };
                state.put_member("big", 0, &id, Some(member));
            }
        }

        // WHEN the shard is read page by page
        let first = store.members_page("big", 0, None, now).await.expect("page");
        let mut all = first.members.clone();
        let mut after = first.next.clone();
        while let Some(cursor) = after {
            let page = store
                .members_page("big", 0, Some(&cursor), now)
                .await
                .expect("page");
            all.extend(page.members);
            after = page.next;
        }

        // THEN the first page stopped at 1 MB read (under 600 members, with a cursor), and the
        // pages together list everyone once, in sort key order
        assert!(first.members.len() < 600, "{}", first.members.len());
        assert!(first.members.len() >= limits::QUERY_PAGE_MAX_BYTES / 2_200);
        assert!(first.next.is_some());
        let ids: Vec<String> = all.iter().map(|m| m.connection_id.clone()).collect();
        let expected: Vec<String> = (0..600).map(|i| format!("c{i:03}")).collect();
        assert_eq!(ids, expected);
    }
}
