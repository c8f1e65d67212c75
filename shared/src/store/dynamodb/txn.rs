//! The one read–build–commit–retry loop every append goes through.
//!
//! An event's id comes from its room's counter (`ROOM#<room>` / seq 0 in the events table): a
//! writer reads the counter `n` (strongly consistent), builds its transaction — the state
//! items the change needs, the counter moved from `n` to `n + k` on the condition that it is
//! still `n`, and the events put at `n + 1 ..= n + k` — and commits it. Two writers that read
//! the same `n` cannot both commit, so ids are dense and committed in id order: a reader that
//! has seen id `k` can never later find a new event below `k`. The loser (or a writer whose
//! state condition failed) backs off with jitter, re-reads and builds again; that is what caps
//! one room near DynamoDB's per-partition write rate (documented in the README).
//!
//! A missing counter reads as 0. A counter behind its log (a table written by layout 1, whose
//! counter was elsewhere; a restore) makes every append collide with an existing event, so
//! after a few cancelled attempts the loop moves the counter up to the log's newest id.

use std::time::Duration;

use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};
use futures::future::BoxFuture;
use rand::Rng;

use super::expr::{event_key, n, placeholders, put, s, update, Expr, Item};
use super::DynamoStore;
use crate::events::{ChatEvent, EventItem, StoredEvent};
use crate::keys;
use crate::store::aws_like::ReadOp;
use crate::store::items::CounterItem;
use crate::store::{epoch_secs, StoreError};

/// How many times a change is re-read and re-tried when a concurrent writer took the
/// sequence number (or changed the state it depended on) first.
pub(super) const MAX_ATTEMPTS: u32 = 40;

/// The attempt after which a cancelled writer checks that its room's counter is not behind
/// the log.
const HEAL_AFTER: u32 = 2;

/// A room's counter as read (absent: all zero, one shard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counter {
    /// Whether the item exists.
    pub exists: bool,
    pub last: u64,
    pub members: u64,
    pub shards: u32,
    /// Past the large-room limit: joins and disconnects are unsequenced.
    pub large: bool,
}

/// What a change does to the room's member count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Membership {
    Unchanged,
    /// One member more; the room uses `shards` shards from this join on.
    Join {
        shards: u32,
    },
    /// This many members fewer.
    Leave(u64),
}

/// One transaction's worth of a change, apart from the counter and event items.
pub(super) struct Change {
    /// The state items: conditions on what was read, and the writes.
    pub items: Vec<TransactWriteItem>,
    /// The events recorded with it, in the room the loop numbers.
    pub events: Vec<ChatEvent>,
    pub membership: Membership,
}

/// What one attempt's build decided.
pub(super) enum Attempt<T> {
    /// Nothing to write: the operation's answer as it stands (refusals are `Err`s instead).
    Done(T),
    Commit(Change),
}

/// One attempt's build: given the room's counter as read and the attempt's number (from 1),
/// it reads what else it depends on and decides. A boxed future, so the loop's own future is
/// `Send` (an `async` closure's is not provably so).
pub(super) type Build<'b, T> = BoxFuture<'b, Result<Attempt<T>, StoreError>>;

/// What the loop ended with.
pub(super) enum Outcome<T> {
    Done(T),
    Committed(Vec<StoredEvent>),
}

impl DynamoStore {
    /// Reads `room`'s counter, then builds a change from it with `build` and commits it with
    /// the counter's compare-and-swap and the events, until it commits or `build` decides.
    /// `build` runs once per attempt, and re-reads (after the first) whatever else it
    /// depends on: a cancelled transaction means something it read has changed.
    pub(super) async fn append_loop<'b, T>(
        &self,
        op: &'static str,
        room: &str,
        now_ms: i64,
        mut build: impl FnMut(Counter, u32) -> Build<'b, T>,
    ) -> Result<Outcome<T>, StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let counter = self.read_counter(room).await?;
            let change = match build(counter, attempt).await? {
                Attempt::Done(answer) => return Ok(Outcome::Done(answer)),
                Attempt::Commit(change) => change,
            };
            let (stored, appended) =
                self.append_items(room, counter, change.events, change.membership, now_ms)?;
            let mut items = change.items;
            items.extend(appended);
            if self.transact(op, items).await? {
                return Ok(Outcome::Committed(stored));
            }
            backoff(attempt).await;
            if attempt == HEAL_AFTER {
                self.heal_counter(room).await?;
            }
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// [`Self::append_loop`] for a change that records exactly one event when it commits.
    pub(super) async fn append_one<'b, T>(
        &self,
        op: &'static str,
        room: &str,
        now_ms: i64,
        build: impl FnMut(Counter, u32) -> Build<'b, T>,
    ) -> Result<Result<StoredEvent, T>, StoreError> {
        match self.append_loop(op, room, now_ms, build).await? {
            Outcome::Done(answer) => Ok(Err(answer)),
            Outcome::Committed(mut events) if events.len() == 1 => Ok(Ok(events.remove(0))),
            Outcome::Committed(events) => Err(StoreError::Malformed(format!(
                "{op}: {} events committed, one expected",
                events.len()
            ))),
        }
    }

    /// The room's shards and whether it is large after one more sequenced join: doubled as
    /// [`keys::shards_for`] says, large past the limit (then at least
    /// [`keys::LARGE_ROOM_SHARDS`]).
    pub(super) fn join_sizing(&self, counter: Counter) -> (u32, bool) {
        let members = counter.members + 1;
        let mut shards = keys::shards_for(members, counter.shards);
        let large = counter.large || members > self.large_limit;
        if large {
            shards = shards.max(keys::LARGE_ROOM_SHARDS);
        }
        (shards, large)
    }

    /// The room's counter, strongly consistent; absent reads as 0.
    pub(super) async fn read_counter(&self, room: &str) -> Result<Counter, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.events)
            .set_key(Some(event_key(room, keys::COUNTER_SEQ)))
            .consistent_read(ReadOp::GetSequence.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend("GetItem counter", e))?;
        let Some(item) = out.item else {
            return Ok(Counter {
                exists: false,
                last: 0,
                members: 0,
                shards: 1,
                large: false,
            });
        };
        let c: CounterItem = serde_dynamo::from_item(item)
            .map_err(|e| StoreError::Malformed(format!("counter of room {room}: {e}")))?;
        Ok(Counter {
            exists: true,
            last: c.last,
            members: c.members(),
            shards: c.shards(),
            large: c.large(),
        })
    }

    /// The counter update (`last` from `counter.last` to `+ events`, only if nobody moved it)
    /// and the event puts, with the events as stored. No events, no items.
    fn append_items(
        &self,
        room: &str,
        counter: Counter,
        events: Vec<ChatEvent>,
        membership: Membership,
        now_ms: i64,
    ) -> Result<(Vec<StoredEvent>, Vec<TransactWriteItem>), StoreError> {
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let last = counter.last + events.len() as u64;
        let members = match membership {
            Membership::Unchanged => None,
            Membership::Join { .. } => Some(counter.members + 1),
            Membership::Leave(k) => Some(counter.members.saturating_sub(k)),
        };
        let shards = match membership {
            Membership::Join { shards } => Some(shards),
            _ => None,
        };
        // The join that takes the room past the limit makes it large.
        let large = matches!(membership, Membership::Join { .. })
            && !counter.large
            && self.join_sizing(counter).1;
        let counter_item = if counter.exists {
            let mut set = Expr::new("SET #type = :counter, #last = :next")
                .value(":counter", s(keys::COUNTER_TYPE))
                .value(":next", n(last));
            if let Some(members) = members {
                set.text.push_str(", #members = :members");
                set = set.value(":members", n(members));
            }
            let mut cond = unmoved(counter);
            if let Some(shards) = shards {
                set.text.push_str(", #shards = :shards");
                set = set.value(":shards", n(shards));
                // A sampler may have doubled the shards since the read (it does not move
                // `last`): never write them back down.
                cond = cond.and(shards_unmoved(counter.shards));
            }
            if large {
                set.text.push_str(", #large = :large");
                set = set.value(":large", AttributeValue::Bool(true));
            }
            update(
                &self.tables.events,
                event_key(room, keys::COUNTER_SEQ),
                set,
                Some(cond),
            )?
        } else {
            // Created whole with a put rather than an update: the stream's INSERT record then
            // carries the whole counter (moto records an update that creates an item as a
            // key-only INSERT followed by a MODIFY).
            let item = CounterItem {
                kind: keys::COUNTER_TYPE.to_owned(),
                last,
                members,
                shards,
                large: large.then_some(true),
            };
            let mut item: super::expr::Item = serde_dynamo::to_item(&item)
                .map_err(|e| StoreError::Malformed(format!("counter item: {e}")))?;
            item.extend(event_key(room, keys::COUNTER_SEQ));
            put(&self.tables.events, item, Some(unmoved(counter)))?
        };
        let mut items = vec![counter_item];
        let expires = epoch_secs(now_ms) + self.retention.event_retention.as_secs() as i64;
        let mut stored_events = Vec::with_capacity(events.len());
        for (seq, event) in (counter.last + 1..).zip(events) {
            let stored = StoredEvent {
                room: room.to_owned(),
                seq,
                ts: now_ms,
                event,
            };
            let item = serde_dynamo::to_item(EventItem::new(&stored, expires))
                .map_err(|e| StoreError::Malformed(format!("event item: {e}")))?;
            items.push(put(
                &self.tables.events,
                item,
                Some(Expr::new("attribute_not_exists(#seq)")),
            )?);
            stored_events.push(stored);
        }
        Ok((stored_events, items))
    }

    /// Moves the room's counter up to the newest event of its log, if it is behind it.
    async fn heal_counter(&self, room: &str) -> Result<(), StoreError> {
        let counter = self.read_counter(room).await?;
        let newest = self
            .client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", keys::PK)
            .expression_attribute_values(":pk", s(keys::room_pk(room)))
            .scan_index_forward(false)
            .limit(1)
            .consistent_read(ReadOp::QueryNewestEvent.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend("Query newest event", e))?
            .items
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|item| {
                item.get(keys::SEQ)
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .unwrap_or(0);
        if newest <= counter.last {
            return Ok(());
        }
        tracing::warn!(
            room,
            counter = counter.last,
            newest,
            "the room's sequence counter was behind its log; moving it forward"
        );
        let item = update(
            &self.tables.events,
            event_key(room, keys::COUNTER_SEQ),
            Expr::new("SET #type = :counter, #last = :next")
                .value(":counter", s(keys::COUNTER_TYPE))
                .value(":next", n(newest)),
            Some(unmoved(counter)),
        )?;
        // A concurrent writer may have moved it first; either way the next read is right.
        self.transact("TransactWriteItems heal counter", vec![item])
            .await?;
        Ok(())
    }

    /// Commits the items; `Ok(false)` when DynamoDB cancelled the transaction (a condition
    /// failed or a concurrent transaction touched the same items), so the caller re-reads.
    pub(super) async fn transact(
        &self,
        op: &'static str,
        items: Vec<TransactWriteItem>,
    ) -> Result<bool, StoreError> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if matches!(
                    e.err(),
                    TransactWriteItemsError::TransactionCanceledException(_)
                ) =>
            {
                Ok(false)
            }
            Err(e) if unconfirmed(&e) => Err(StoreError::unconfirmed(op, e)),
            Err(e) => Err(StoreError::backend(op, e)),
        }
    }

    /// One conditional `UpdateItem` on the connections table: `Ok(false)` when its condition
    /// does not hold (nothing was written).
    pub(super) async fn update_if(
        &self,
        op: &'static str,
        key: Item,
        update: Expr,
        cond: Expr,
    ) -> Result<bool, StoreError> {
        let (names, values) = placeholders(&[&update, &cond]);
        let result = self
            .client
            .update_item()
            .table_name(&self.tables.connections)
            .set_key(Some(key))
            .update_expression(update.text)
            .condition_expression(cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(false)
            }
            Err(e) => Err(StoreError::backend(op, e)),
        }
    }
}

/// Whether a failed `TransactWriteItems` may have committed. Certain failures are those
/// DynamoDB answers before doing anything and the SDK does not retry (a request it could not
/// build, a validation error, a missing table): they fail the first attempt the same way.
/// Everything else is unknown: no answer (a timeout, a dropped connection, an unreadable
/// response), a 5xx, and the errors the SDK retries (throttling, a transaction in progress),
/// since an earlier attempt of the same call may have timed out after committing.
fn unconfirmed(e: &SdkError<TransactWriteItemsError, HttpResponse>) -> bool {
    use aws_sdk_dynamodb::error::ProvideErrorMetadata;
    match e {
        SdkError::ConstructionFailure(_) => false,
        SdkError::ServiceError(service) => {
            let err = service.err();
            let transient = matches!(
                err.code(),
                Some(
                    "ThrottlingException"
                        | "ProvisionedThroughputExceededException"
                        | "RequestLimitExceeded"
                        | "TransactionInProgressException"
                        | "InternalServerError"
                        | "ServiceUnavailable"
                )
            );
            transient
                || matches!(err, TransactWriteItemsError::InternalServerError(_))
                || service.raw().status().is_server_error()
        }
        _ => true,
    }
}

/// The condition that the counter's `shards` is `shards` as read (absent reads as 1).
pub(super) fn shards_unmoved(shards: u32) -> Expr {
    if shards <= 1 {
        Expr::new("attribute_not_exists(#shards) OR #shards = :readshards")
            .value(":readshards", n(1))
    } else {
        Expr::new("#shards = :readshards").value(":readshards", n(shards))
    }
}

/// The condition that the counter is as it was read.
fn unmoved(counter: Counter) -> Expr {
    if counter.exists {
        Expr::new("#last = :cur").value(":cur", n(counter.last))
    } else {
        Expr::new("attribute_not_exists(#pk)")
    }
}

/// Jittered exponential backoff between attempts, so colliding writers spread out.
pub(super) async fn backoff(attempt: u32) {
    let cap_ms = 2u64.saturating_pow(attempt.min(7)).max(2);
    let ms = rand::rng().random_range(1..=cap_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}
