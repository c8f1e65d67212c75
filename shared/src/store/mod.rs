//! The store port: every state change the chat makes, each one atomic with the event that
//! records it, plus the reads the fan-out needs.
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

use async_trait::async_trait;
use thiserror::Error;

use crate::events::{LeaveReason, StoredEvent};
use crate::ratelimit::RateLimit;
use crate::redelivery::Redelivery;
use crate::validation::ValidName;

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
}

/// How long a name stays reserved for an authenticated identity after its connection lets it
/// go (disconnect, prune, rename): only the same identity can claim it meanwhile.
pub const NAME_RESERVATION_SECS: i64 = 24 * 3600;

/// A connection that has set a name: someone who receives the chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub connection_id: String,
    pub name: String,
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
    /// A private message to oneself.
    #[error("a private message cannot be sent to oneself")]
    SelfRecipient,
    /// Concurrent writers kept winning the room's sequence number.
    #[error("gave up after {0} attempts: concurrent writers kept winning")]
    Contention(u32),
    /// The backing store failed; nothing was written.
    #[error("store operation {op} failed")]
    Backend {
        op: &'static str,
        #[source]
        source: BoxError,
    },
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

    /// Whether trying the same operation again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Backend { .. } | StoreError::Contention(_))
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
    ) -> Result<Connection, StoreError>;

    /// The connection, if recorded and not expired.
    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError>;

    /// Claims `name` for the connection, atomically: of two connections racing for one name
    /// exactly one wins. The first name records `MemberJoined`; a different later name
    /// releases the old claim and records `MemberRenamed`; the same name again changes
    /// nothing and returns `None`.
    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError>;

    /// Records `MessagePosted` from a member.
    async fn post_public(
        &self,
        connection_id: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError>;

    /// Records `PrivateMessageSent` from a member to the member named `to` (ignoring case).
    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError>;

    /// Removes the connection and releases its name; records `MemberLeft` if it had joined.
    /// Idempotent: an unknown connection is `Ok(None)`.
    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError>;

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

    /// Takes one request token from the connection's rate-limit bucket (atomically, so every
    /// Lambda instance shares it): `Ok(true)` if the request may go ahead. An unknown
    /// connection is let through (its request then fails as `not_connected`).
    async fn take_request_token(
        &self,
        connection_id: &str,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Writes what a broadcast still owes a few connections as a redelivery item in the event
    /// table, so it comes back to the fan-out on the stream (see [`crate::redelivery`]).
    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError>;

    /// A page of current members, in a stable order, starting after the cursor `after`.
    async fn members_page(
        &self,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError>;

    /// Up to `limit` events of the room's log in `range`, every kind, skipping events whose
    /// retention has passed (TTL deletion is only eventual). Strongly consistent: an event
    /// whose write has returned is in the next read.
    async fn read_events(
        &self,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError>;
}

/// Epoch seconds of a ms timestamp, for TTL comparisons.
pub fn epoch_secs(now_ms: i64) -> i64 {
    now_ms.div_euclid(1000)
}
