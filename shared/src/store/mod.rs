//! The store port: every state change the chat makes, each one atomic with the event that
//! records it, plus the reads the fan-out and the history need.
//!
//! Rooms: events, ids, members and history are per room ([`crate::keys`] documents the
//! layout). A change that touches more rooms than one transaction can hold (a rename, a
//! disconnect of a connection in 50 rooms) is one transaction per room, each atomic with its
//! own event, done in an order that a retry (or the fan-out's 410 pruning) can finish.
//!
//! The trait is deliberately domain-shaped ("set this connection's name") rather than
//! CRUD-shaped, because each operation must check and write several items at once (the name
//! claim, the connection, the room's sequence counter and the event) and an adapter can only
//! guarantee that if it owns the whole operation. [`dynamodb::DynamoStore`] does it with one
//! `TransactWriteItems` per change; an embedded adapter must keep exactly the same contract.

pub mod aws_like;
pub mod dynamodb;
pub mod embedded;
pub mod items;
pub mod limits;
pub mod requests;

use async_trait::async_trait;
use thiserror::Error;

use crate::events::{LeaveReason, StoredEvent};
use crate::presence::{BudgetVerdict, PresenceBudget};
use crate::ratelimit::{RequestLimits, Verdict};
use crate::redelivery::Redelivery;
use crate::validation::ValidName;
use requests::{Once, RequestKey};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A connection as recorded at `$connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub connection_id: String,
    /// ms since the epoch.
    pub connected_at: i64,
    /// TTL, epoch seconds.
    pub expires_at: i64,
    /// Set once the connection has joined with `setName`.
    pub name: Option<String>,
    /// The authenticated subject, when `$connect` authentication is on.
    pub identity: Option<String>,
    /// The rooms it is a member of, in name order (`lobby` once it has set a name, unless it
    /// left it).
    pub rooms: Vec<String>,
    /// It opted in to batched frames at `$connect` (see [`crate::batching`]).
    pub batch: bool,
}

/// The most rooms one connection may be a member of, unless configured otherwise.
pub const DEFAULT_MAX_ROOMS: usize = 50;

/// A principal's claim on a connection slot at `$connect` (see [`crate::ratelimit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission<'a> {
    /// `id:<identity>` or `ip:<source IP>` ([`crate::ratelimit::principal`]).
    pub principal: &'a str,
    /// Live connections the principal may have at once (0: no limit; the principal is still
    /// recorded, for its request counter).
    pub max_connections: u32,
}

/// What a `join` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Joined {
    /// The connection became a member: its `MemberJoined` event.
    Now(StoredEvent),
    /// It was a member already; nothing changed. `last` is the room's newest event id, where
    /// a catch-up can start.
    Already { last: u64 },
    /// The connection became a member without an event (the room is large, or its counter
    /// was contended; see [`crate::keys`]): `last` is the room's newest event id, read
    /// strongly consistent before the join committed, where its catch-up starts.
    Unsequenced { last: u64 },
}

/// How long a name stays reserved for an authenticated identity after its connection lets it
/// go (disconnect, prune, rename): only the same identity can claim it meanwhile.
pub const NAME_RESERVATION_SECS: i64 = 24 * 3600;

/// A connection that has set a name: someone who receives the chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub connection_id: String,
    pub name: String,
    /// The connection opted in to batched frames (see [`crate::batching`]).
    pub batch: bool,
}

/// Which stretch of the event log to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRange {
    /// Ids greater than this, oldest first.
    After(u64),
    /// Ids smaller than this (`None`: from the newest), newest first.
    Before(Option<u64>),
}

/// One page of the event log, in the range's order. `next` is the cursor to continue from (an
/// id to pass as the new `After`/`Before` bound) when more events may follow.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventsPage {
    pub events: Vec<StoredEvent>,
    pub next: Option<u64>,
}

/// One page of members; `next` continues after it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MembersPage {
    pub members: Vec<Member>,
    pub next: Option<String>,
}

#[derive(Debug, Error)]
pub enum StoreError {
    /// The connection is not recorded (closed, pruned or expired).
    #[error("connection {0} is not connected")]
    NotConnected(String),
    /// The connection has not set a name.
    #[error("the connection has not set a name")]
    NameRequired,
    /// Another live connection holds the name (ignoring case).
    #[error("the name {0:?} is taken")]
    NameTaken(String),
    /// No current member has that name.
    #[error("no member is named {0:?}")]
    UnknownRecipient(String),
    /// Sending to (or leaving) a room the connection is not a member of.
    #[error("the connection is not a member of room {0:?}")]
    NotAMember(String),
    /// Joining one more room would take the connection over its room limit.
    #[error("the connection is already in {0} rooms, the most allowed")]
    TooManyRooms(usize),
    /// A private message to oneself.
    #[error("a private message cannot be sent to oneself")]
    SelfRecipient,
    /// Concurrent writers kept winning the room's sequence number.
    #[error("gave up after {0} attempts: concurrent writers kept winning")]
    Contention(u32),
    /// The backing store failed, and certainly wrote nothing: a read failed, or a write was
    /// refused before it could commit (a validation error, a missing table).
    #[error("store operation {op} failed")]
    Backend {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    /// A write whose outcome is unknown: it may have committed (a timeout, a 5xx, a dropped
    /// connection, or a throttle after one of those in the SDK's retries). A resend with the
    /// same `requestId` finds out without writing twice.
    #[error("store operation {op} may or may not have committed")]
    Unconfirmed {
        op: &'static str,
        #[source]
        source: BoxError,
    },
    /// The `requestId` was already used, in the same scope, for another request.
    #[error("requestId {0:?} was already used for another request")]
    RequestIdReused(String),
    /// An item in the store does not have the shape this code writes.
    #[error("stored item is malformed: {0}")]
    Malformed(String),
}

impl StoreError {
    pub fn backend(op: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Backend {
            op,
            source: source.into(),
        }
    }

    pub fn unconfirmed(op: &'static str, source: impl Into<BoxError>) -> Self {
        StoreError::Unconfirmed {
            op,
            source: source.into(),
        }
    }

    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Backend { .. } | StoreError::Unconfirmed { .. } | StoreError::Contention(_)
        )
    }

    /// Whether the store failed (as opposed to refusing the request for a reason of its own).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            StoreError::Backend { .. }
                | StoreError::Unconfirmed { .. }
                | StoreError::Contention(_)
                | StoreError::Malformed(_)
        )
    }
}

#[async_trait]
pub trait ChatStore: Send + Sync {
    /// Records a new connection (`$connect`), expiring after the connection TTL.
    async fn add_connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        self.add_identified_connection(connection_id, None, now_ms)
            .await
    }

    /// [`ChatStore::add_connection`] for an authenticated connection: its names are then
    /// bound to `identity` — an identity takes back a name its own older connection holds,
    /// and a name it lets go stays reserved for it for [`NAME_RESERVATION_SECS`].
    async fn add_identified_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        self.open_connection(connection_id, identity, None, false, now_ms)
            .await?
            // Without an admission there is no limit to refuse by.
            .ok_or_else(|| StoreError::Malformed("a connection without a limit was refused".into()))
    }

    /// Records a new connection (`$connect`) as [`ChatStore::add_identified_connection`] does,
    /// and, with an `admission`, records its principal and takes one of the principal's
    /// connection slots in the same transaction (see [`crate::ratelimit`]): `Ok(None)` when the
    /// principal already has `max_connections` live connections (nothing is written). Slots
    /// of expired connections do not count. `batch` records its opt-in to batched frames
    /// (`?batch=1`), which every member item it writes then carries.
    async fn open_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        admission: Option<Admission<'_>>,
        batch: bool,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError>;

    /// The connection, if recorded and not expired.
    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError>;

    /// Claims `name` for the connection, atomically: of two connections racing for one name
    /// exactly one wins. A different later name releases the old claim and records
    /// `MemberRenamed` in every room the connection is a member of; then, if the connection is
    /// not a member of [`crate::keys::DEFAULT_ROOM`], it joins it (`MemberJoined`), as the
    /// tutorial's `setName` joins the chat. Returns the events recorded, lobby's first; the
    /// same name again, already in the lobby, changes nothing and returns none.
    ///
    /// A rename that failed part-way (a store error after its first transaction) is finished
    /// by the next `setName` of the connection, the same name retried or another, before
    /// anything else: each room whose member item still has another name than the connection
    /// gets its `MemberRenamed` from that name, and those events come first in the answer.
    /// The connection item's `renaming` marker ([`crate::keys`]) says one is unfinished, so a
    /// `setName` without one reads no member item.
    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Makes a named connection a member of `room` (a valid room name), recording
    /// `MemberJoined` there — or unsequenced ([`Joined::Unsequenced`], no event) when the room
    /// is past the store's large-room limit or its counter is contended. `NameRequired` without a name; `TooManyRooms` when it is already
    /// in `max_rooms` rooms; joining a room it is in changes nothing.
    async fn join_room(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        now_ms: i64,
    ) -> Result<Joined, StoreError>;

    /// [`ChatStore::set_name`] performed at most once per `request` in its scope
    /// ([`requests`]): the request item goes in the transaction that moves the claim (or
    /// joins lobby), with that transaction's events. A resend gets `Once::Again` with the
    /// first's item; one that changed nothing records nothing.
    async fn set_name_once(
        &self,
        connection_id: &str,
        name: &ValidName,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Vec<StoredEvent>>, StoreError>;

    /// [`ChatStore::join_room`] performed at most once per `request` (a join of a room it is
    /// in already records nothing).
    async fn join_room_once(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Joined>, StoreError>;

    /// [`ChatStore::leave_room`] (reason `left`) performed at most once per `request`.
    async fn leave_room_once(
        &self,
        connection_id: &str,
        room: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError>;

    /// [`ChatStore::post_to_room`] performed at most once per `request`: the request item is
    /// in the event's transaction.
    async fn post_to_room_once(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError>;

    /// [`ChatStore::post_private`] performed at most once per `request`.
    async fn post_private_once(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError>;

    /// Ends the connection's membership of `room`, recording `MemberLeft` with `reason` there
    /// (a `leave` request says `left`). `NotAMember` if it was not one.
    async fn leave_room(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError>;

    /// Records `MessagePosted` from a member of `room`: `NameRequired` without a name,
    /// `NotAMember` if it is not in the room.
    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError>;

    /// [`ChatStore::post_to_room`] in [`crate::keys::DEFAULT_ROOM`], the tutorial's
    /// `sendPublic`.
    async fn post_public(
        &self,
        connection_id: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.post_to_room(connection_id, crate::keys::DEFAULT_ROOM, message, now_ms)
            .await
    }

    /// Records `PrivateMessageSent` from a named connection to the connection named `to`
    /// (ignoring case), in [`crate::keys::DEFAULT_ROOM`]'s log (private messages are not
    /// room-scoped; they are numbered there).
    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError>;

    /// Removes the connection and releases its name; records `MemberLeft` in every room it
    /// was a member of (except a large room, which it leaves unsequenced: see
    /// [`crate::keys`]) (with the name that room knows it by: the old one in a room an
    /// unfinished rename has not reached) (one transaction per room, then the connection itself last, so a
    /// retry after a failure part-way finishes the job). Idempotent: an unknown connection
    /// is `Ok(vec![])`.
    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Leaves every room a connection was in when DynamoDB's TTL deleted its item: `gone` is
    /// that item's last image (the `OldImage` of its `REMOVE` on the connections table's
    /// stream, see [`crate::expiry`]). Each room of its `rooms` whose member item is still
    /// there gets a `MemberLeft` (reason `expired`; unsequenced in a large room) in a
    /// transaction with the member item's delete, on the condition that the item exists, one
    /// transaction per room; then its name claim (only if still this connection's) and its
    /// principal's slot are given back, as [`ChatStore::remove_connection`] does. Idempotent:
    /// a room whose member item is gone (left already: `$disconnect`, a prune, a `leave`, or
    /// an earlier delivery of the same record) writes nothing. If the connection item is still
    /// there (the record is stale or not a TTL deletion) it is removed the ordinary way if it
    /// has expired, and left alone if it is live.
    async fn remove_expired(
        &self,
        gone: &items::ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Removes many connections at once (the fan-out's pruning after 410s): the same as
    /// [`ChatStore::remove_connection`] for each, returning the `MemberLeft` events recorded.
    /// Adapters batch it; this default does them one by one.
    async fn remove_connections(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut left = Vec::new();
        for id in connection_ids {
            left.extend(self.remove_connection(id, reason, now_ms).await?);
        }
        Ok(left)
    }

    /// Checks a request against its limits (atomically, so every Lambda instance shares
    /// them): first the principal's request counter for the current window (the connection's
    /// recorded principal, else `limits.fallback_principal`), then the connection's own
    /// bucket. `Ok(Verdict::Allowed)` if the request may go ahead. A request refused by the connection's
    /// bucket still counts against its principal. An unknown connection has no bucket, but its
    /// requests count against the fallback principal (its source IP) like any other.
    async fn take_request_token(
        &self,
        connection_id: &str,
        limits: &RequestLimits<'_>,
        now_ms: i64,
    ) -> Result<Verdict, StoreError>;

    /// Charges one presence change of `room` to the room's budget for the current second
    /// ([`crate::presence`]): its cost from the room's counter as read (2 × (members + 1), 0 in
    /// a large room), added to the window's count with one conditional write, unless that
    /// would take the window past `budget` (a window with nothing charged yet admits any one
    /// change). `Exceeded` changes nothing. Off (`budget.is_off()`) allows without a call.
    async fn take_presence_budget(
        &self,
        room: &str,
        budget: PresenceBudget,
        now_ms: i64,
    ) -> Result<BudgetVerdict, StoreError>;

    /// Gives back a principal's connection slot (done by [`ChatStore::remove_connection`] for
    /// a connection that recorded one; idempotent).
    async fn release_connection_slot(
        &self,
        principal: &str,
        connection_id: &str,
    ) -> Result<(), StoreError>;

    /// Writes what a broadcast still owes a few connections as a redelivery item in the event
    /// table, so it comes back to the fan-out on the stream (see [`crate::redelivery`]).
    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// How many member shards `room` uses now (at least 1). Read strongly consistent: every
    /// member whose join has committed is in shards `0..member_shards`.
    async fn member_shards(&self, room: &str, now_ms: i64) -> Result<u32, StoreError>;

    /// A page of the current members of one shard of `room`, in a stable order, starting
    /// after the cursor `after`. Reads only that room's members of that shard, strongly
    /// consistent (a member whose join has committed is in it).
    async fn members_page(
        &self,
        room: &str,
        shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError>;

    /// Up to `limit` events of `room`'s log in `range`, every kind, skipping events whose
    /// retention has passed (TTL deletion is only eventual). Strongly consistent: an event
    /// whose write has returned is in the next read.
    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError>;
}

/// Epoch seconds of a ms timestamp, for TTL comparisons.
pub fn epoch_secs(now_ms: i64) -> i64 {
    now_ms.div_euclid(1000)
}
