//! The DynamoDB adapter of [`ChatStore`] on layout 2 ([`crate::keys`]), and the table
//! definitions it relies on.
//!
//! Every state change is a `TransactWriteItems` per room: the state items, the room's
//! counter and the event commit together or not at all ([`txn`] owns the loop that numbers
//! events; a change that spans rooms is one transaction per room, in an order a retry can
//! finish). The submodules split the adapter by concern:
//! - [`expr`]: expressions, placeholders, keys and transaction actions;
//! - [`txn`]: the read–build–commit–retry loop with the counter's compare-and-swap;
//! - [`connections`]: connections, names (claims, take-back, reservations), rate limits,
//!   removal;
//! - [`rooms`]: joins, leaves, members and their shards;
//! - [`expired`]: the leaves of a connection whose item DynamoDB's TTL deleted;
//! - [`log`]: posts, private messages, history reads, redelivery items;
//! - [`principals`]: connection slots and request counters across a principal's connections;
//! - [`presence`]: a room's presence budget, per second;
//! - [`tables`]: creating the tables as the template does.
//!
//! The calls each operation makes when nothing collides (reads are `GetItem`s, strongly
//! consistent; a transaction's actions in brackets). A cancelled transaction costs the
//! room's counter, the connection (and, for `setName`, the claim) again, then the transaction.
//! | operation | reads | writes |
//! |-----------|-------|--------|
//! | `$connect` | — (with a connection limit: the principal's slots) | `PutItem` connection (with a connection limit: [slots put, connection put]) |
//! | `connection` | connection | — |
//! | `setName`, first name | connection, claim, lobby's counter | [claim put, connection update, member put, counter, event] |
//! | `setName`, rename | connection, claim, first room's counter, old claim; then the connection once more, and per other room its counter and the connection | [claim put, old claim release, connection update, member put, counter, event], then per other room [connection check, member put, counter, event] |
//! | `setName`, same name | connection (+ a lobby join if it left lobby) | — |
//! | `join` | room's counter, connection | [connection update, member put, counter, event]; unsequenced (a large room, or after 3 lost counters): [connection update, member put], and one join in 16 then a `Query` `Select: COUNT` of its shard (+ `UpdateItem` counter when the room needs more shards or turns large) |
//! | `leave` | room's counter, connection | [connection update, member delete, counter, event] |
//! | `post_to_room` | room's counter, connection | [connection check, counter, event] |
//! | `post_private` | lobby's counter, sender, recipient's claim, recipient | [sender check, claim check, counter, event] |
//! | any write with a `requestId` | as without; `setName` also its request item first; a refused or cancelled one also its request item | as without, plus [request item put] in the (first) transaction |
//! | `remove_connection` | connection, then per room a `leave`'s reads; the connection again (if it had rooms), its claim (if named) | per room a `leave`'s, then [connection delete, claim release], then `UpdateItem` the principal's slots (if it has one) |
//! | `remove_expired` (a TTL deletion) | the connection (gone, normally), per room its counter and member item; the claim (if named) | per room still a member [member delete, counter, event] (large: [member delete]), then [claim release] if still its own, then `UpdateItem` the principal's slots |
//! | `take_presence_budget` | room's counter (none with the budget off) | `UpdateItem` the room's window (not in a large room) |
//! | `take_request_token` | connection | `UpdateItem` principal's window counter (with a principal limit), `UpdateItem` connection |
//! | `member_shards` | room's counter | — |
//! | `members_page` | one `Query` of `MEMBERS#<room>#<shard>` | — |
//! | `read_events` | `Query` pages of `ROOM#<room>` until the page is full | — |

mod connections;
mod expired;
mod expr;
mod log;
mod presence;
mod principals;
mod requests;
mod rooms;
mod tables;
mod txn;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;

pub use tables::{create_tables, wait_active};

use super::{
    Admission, ChatStore, Connection, EventRange, EventsPage, Joined, MembersPage, StoreError,
};
use crate::config::{Retention, Tables};
use crate::events::{LeaveReason, StoredEvent};
use crate::presence::{BudgetVerdict, PresenceBudget};
use crate::ratelimit::{RequestLimits, Verdict};
use crate::redelivery::Redelivery;
use crate::store::requests::{Once, RequestKey};
use crate::validation::ValidName;

pub struct DynamoStore {
    client: Client,
    tables: Tables,
    retention: Retention,
    /// `Limit` for member queries; `None` lets DynamoDB fill 1 MB pages. Tests set it low to
    /// exercise pagination.
    page_limit: Option<i32>,
    /// Joins past this many members make a room large (see [`crate::keys`]).
    large_limit: u64,
}

impl DynamoStore {
    pub fn new(client: Client, tables: Tables, retention: Retention) -> Self {
        DynamoStore {
            client,
            tables,
            retention,
            page_limit: None,
            large_limit: crate::config::DEFAULT_PRESENCE_BROADCAST_LIMIT as u64,
        }
    }

    /// Joins past `limit` members make a room large: its joins and disconnects are then
    /// unsequenced (see [`crate::keys`]). The deployment passes `PRESENCE_BROADCAST_LIMIT`.
    pub fn with_large_room_limit(mut self, limit: usize) -> Self {
        self.large_limit = limit as u64;
        self
    }

    /// Caps each member query page at `limit` items (for tests of pagination).
    pub fn with_page_limit(mut self, limit: i32) -> Self {
        self.page_limit = Some(limit);
        self
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }
}

#[async_trait]
impl ChatStore for DynamoStore {
    async fn open_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        admission: Option<Admission<'_>>,
        batch: bool,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.add_connection_item(connection_id, identity, admission, batch, now_ms)
            .await
    }

    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.read_connection(connection_id, now_ms).await
    }

    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.claim_name(connection_id, name, None, now_ms)
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
        self.claim_name(connection_id, name, Some(request), now_ms)
            .await
    }

    async fn join_room(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        now_ms: i64,
    ) -> Result<Joined, StoreError> {
        self.join(connection_id, room, max_rooms, None, now_ms)
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
        self.join(connection_id, room, max_rooms, Some(request), now_ms)
            .await
    }

    async fn leave_room(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.leave(connection_id, room, reason, true, None, now_ms)
            .await?
            .first()?
            .ok_or_else(no_leave_event)
    }

    async fn leave_room_once(
        &self,
        connection_id: &str,
        room: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        // An explicit leave is always sequenced: it records its event.
        Ok(
            match self
                .leave(
                    connection_id,
                    room,
                    LeaveReason::Left,
                    true,
                    Some(request),
                    now_ms,
                )
                .await?
            {
                Once::First(event) => Once::First(event.ok_or_else(no_leave_event)?),
                Once::Again(done) => Once::Again(done),
            },
        )
    }

    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.post(connection_id, room, message, None, now_ms)
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
        self.post(connection_id, room, message, Some(request), now_ms)
            .await
    }

    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.whisper(connection_id, to, message, None, now_ms)
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
        self.whisper(connection_id, to, message, Some(request), now_ms)
            .await
    }

    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.remove(connection_id, reason, now_ms).await
    }

    async fn remove_connections(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.remove_many(connection_ids, reason, now_ms).await
    }

    async fn remove_expired(
        &self,
        gone: &crate::store::items::ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.leave_expired(gone, now_ms).await
    }

    async fn take_request_token(
        &self,
        connection_id: &str,
        limits: &RequestLimits<'_>,
        now_ms: i64,
    ) -> Result<Verdict, StoreError> {
        self.take_token(connection_id, limits, now_ms).await
    }

    async fn release_connection_slot(
        &self,
        principal: &str,
        connection_id: &str,
    ) -> Result<(), StoreError> {
        self.release_slot(principal, connection_id).await
    }

    async fn take_presence_budget(
        &self,
        room: &str,
        budget: PresenceBudget,
        now_ms: i64,
    ) -> Result<BudgetVerdict, StoreError> {
        self.charge_presence(room, budget, now_ms).await
    }

    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.put_redelivery(redelivery, now_ms).await
    }

    async fn member_shards(&self, room: &str, _now_ms: i64) -> Result<u32, StoreError> {
        Ok(self.read_counter(room).await?.shards)
    }

    async fn members_page(
        &self,
        room: &str,
        shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        self.query_members(room, shard, after, now_ms).await
    }

    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        self.query_events(room, range, limit, now_ms).await
    }
}

/// A `leave` request is never unsequenced (only a disconnect of a large room is).
fn no_leave_event() -> StoreError {
    StoreError::Malformed("a leave recorded no event".into())
}
