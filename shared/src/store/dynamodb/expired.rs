//! The leaves of a connection whose item DynamoDB's TTL deleted (no `$disconnect` came, no
//! broadcast met a 410): [`crate::store::ChatStore::remove_expired`], driven by the item's
//! last image from the connections table's stream ([`crate::expiry`]).
//!
//! The connection item is gone, so nothing can be conditioned on it; each room's leave is
//! conditioned on the connection's **member item** instead (its key is the connection id, so
//! it can only be this connection's). A member item exists exactly while no leave of that
//! membership has committed: `$disconnect`, a prune, a `leave` and an earlier delivery of
//! the same record all delete it in the transaction of their leave. So a redelivered record,
//! or one arriving after another path left the room, finds it gone and writes nothing, and
//! two deliveries at once cannot both commit (one cancels on the condition).

use futures::{StreamExt, TryStreamExt};

use super::expr::{delete, member_key, Expr};
use super::txn::{Attempt, Change, Membership, Outcome};
use super::DynamoStore;
use crate::events::{ChatEvent, LeaveReason, StoredEvent};
use crate::store::items::ConnItem;
use crate::store::{epoch_secs, StoreError};

/// Rooms left at once: each is its own room's transaction (its own counter, its own
/// partitions), so they do not contend with each other.
const ROOMS_AT_ONCE: usize = 8;

impl DynamoStore {
    pub(super) async fn leave_expired(
        &self,
        gone: &ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let id = gone.connection_id.as_str();
        if let Some(now) = self.get_conn(id).await? {
            // Not a TTL deletion after all (or a stale record): the item decides.
            if now.expires_at > epoch_secs(now_ms) {
                tracing::warn!(
                    connection_id = id,
                    "a TTL removal of a connection that is still live; leaving it alone"
                );
                return Ok(Vec::new());
            }
            return self.remove(id, LeaveReason::Expired, now_ms).await;
        }
        let rooms: Vec<(String, u32)> = gone
            .rooms
            .iter()
            .flatten()
            .map(|(room, shard)| (room.clone(), *shard))
            .collect();
        let left: Vec<Option<StoredEvent>> =
            futures::stream::iter(rooms)
                .map(|(room, shard)| async move {
                    self.leave_expired_room(id, &room, shard, now_ms).await
                })
                .buffered(ROOMS_AT_ONCE)
                .try_collect()
                .await?;
        // After the rooms, so a failure there leaves the claim for the record's retry to find.
        if let Some(release) = self.release_if_ours(gone, None, now_ms).await? {
            // Cancelled: the claim changed hands since the read (a newer holder keeps it).
            self.transact("TransactWriteItems release expired claim", vec![release])
                .await?;
        }
        if let Some(principal) = &gone.principal {
            if let Err(e) = self.release_slot(principal, id).await {
                tracing::warn!(connection_id = id, error = %e, "could not give back the expired connection's slot; it expires with the connection");
            }
        }
        Ok(left.into_iter().flatten().collect())
    }

    /// The leave of one room by an expired connection, if its member item (in `shard`, as its
    /// `rooms` said) is still there: the item's delete on the condition that it exists, and
    /// `MemberLeft` with the name the item has (the name the room knows, even mid-rename), or
    /// no event in a large room.
    async fn leave_expired_room(
        &self,
        connection_id: &str,
        room: &str,
        shard: u32,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let outcome = self
            .append_loop(
                "TransactWriteItems expired leave",
                room,
                now_ms,
                move |counter, _attempt| {
                    Box::pin(async move {
                        let Some(member) = self.get_member(room, shard, connection_id).await?
                        else {
                            return Ok(Attempt::Done(()));
                        };
                        let items = vec![delete(
                            &self.tables.connections,
                            member_key(room, shard, connection_id),
                            Some(Expr::new("attribute_exists(#pk)")),
                        )?];
                        if counter.large {
                            return Ok(Attempt::Commit(Change {
                                items,
                                events: Vec::new(),
                                membership: Membership::Unchanged,
                            }));
                        }
                        Ok(Attempt::Commit(Change {
                            items,
                            events: vec![ChatEvent::MemberLeft {
                                connection_id: connection_id.to_owned(),
                                name: member.name,
                                reason: LeaveReason::Expired,
                            }],
                            membership: Membership::Leave(1),
                        }))
                    })
                },
            )
            .await?;
        match outcome {
            Outcome::Done(()) => Ok(None),
            Outcome::Committed(mut events) if events.len() <= 1 => Ok(events.pop()),
            Outcome::Committed(events) => Err(StoreError::Malformed(format!(
                "expired leave: {} events committed, one expected",
                events.len()
            ))),
        }
    }
}
