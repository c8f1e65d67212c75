//! Rooms: joins and leaves (each one transaction with the room's counter and its event),
//! the member items they write, and the reads of a room's members, shard by shard.

use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};

use super::expr::{conn_key, delete, member_key, n, put, s, update, with_key, Expr, Item};
use super::requests::requested;
use super::txn::{Attempt, Change, Counter, Membership, Outcome};
use super::DynamoStore;
use crate::events::{ChatEvent, LeaveReason, StoredEvent};
use crate::keys;
use crate::protocol::EventRef;
use crate::store::aws_like::ReadOp;
use crate::store::items::{ConnItem, MemberItem};
use crate::store::requests::{Once, RequestKey};
use crate::store::{epoch_secs, Joined, Member, MembersPage, StoreError};
use crate::validation::ValidName;

use super::connections::live;

/// The filter of a live member item (`:now` in epoch seconds): its `liveUntil` (the
/// connection's expiry) has not passed — or, on an item written before `liveUntil` existed,
/// its `expiresAt`. Not `expiresAt` alone: a member item's TTL is a grace later than its
/// connection's (see [`keys::MEMBER_TTL_GRACE_SECS`]).
pub(super) const LIVE_MEMBER: &str =
    "#live > :now OR (attribute_not_exists(#live) AND #exp > :now)";

/// Whether a join on attempt `attempt` (from 1) with the room's counter as read is
/// unsequenced: the room is large, or the join lost the counter
/// [`keys::SEQUENCED_JOIN_ATTEMPTS`] times already (see [`crate::keys`]), or the room's
/// presence budget could not pay for it ([`crate::presence::joins_unsequenced`]).
pub(super) fn unsequenced_join(counter: Counter, attempt: u32) -> bool {
    counter.large || attempt > keys::SEQUENCED_JOIN_ATTEMPTS || crate::presence::joins_unsequenced()
}

/// Locks a small piece of state shared between a loop's attempts (never held across an
/// await; a poisoned lock's value is still sound: it is written whole).
pub(super) fn lock<T: Copy>(m: &std::sync::Mutex<T>) -> T {
    *m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sets what [`lock`] reads.
pub(super) fn set<T>(m: &std::sync::Mutex<T>, value: T) {
    *m.lock().unwrap_or_else(|p| p.into_inner()) = value;
}

/// The condition that the connection still has the name it was read with.
pub(super) fn name_unchanged(conn: &ConnItem) -> Expr {
    match &conn.name {
        Some(name) => Expr::new("#name = :was").value(":was", s(name)),
        None => Expr::new("attribute_exists(#pk) AND attribute_not_exists(#name)"),
    }
}

impl DynamoStore {
    pub(super) async fn join(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<Joined>, StoreError> {
        // An unsequenced join's counter as read (its catch-up point).
        let unsequenced: std::sync::Mutex<Option<u64>> = std::sync::Mutex::new(None);
        let unsequenced = &unsequenced;
        let outcome = self
            .append_loop(
                "TransactWriteItems join",
                room,
                now_ms,
                move |counter, attempt| {
                    Box::pin(async move {
                        let conn = live(self.get_conn(connection_id).await?, now_ms)
                            .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                        // A request with a requestId: a resend of one done already is answered
                        // from its request item (see `super::requests`).
                        let req = requested(request, &conn);
                        if let Some(done) = self.done_before(req.as_ref(), attempt, now_ms).await? {
                            return Ok(Attempt::Done(Once::Again(done)));
                        }
                        let refused = |e| async {
                            self.unless_done(req.as_ref(), e, now_ms)
                                .await
                                .map(|done| Attempt::Done(Once::Again(done)))
                        };
                        let Some(name) = conn.name.clone() else {
                            return refused(StoreError::NameRequired).await;
                        };
                        if conn.shard_in(room).is_some() {
                            if let Some(r) = &req {
                                if let Some(done) = self.find_request(r, now_ms).await? {
                                    return Ok(Attempt::Done(Once::Again(done)));
                                }
                            }
                            return Ok(Attempt::Done(Once::First(counter.last)));
                        }
                        if conn.room_names().len() >= max_rooms {
                            return refused(StoreError::TooManyRooms(max_rooms)).await;
                        }
                        let quiet = unsequenced_join(counter, attempt);
                        let (mut items, shards) =
                            self.join_items(&conn, room, &name, counter, max_rooms, None, quiet)?;
                        if let Some(r) = &req {
                            // The answer a resend gets: the join's event id, or an unsequenced
                            // join's catch-up point (the room's last id as read).
                            let id = EventRef {
                                room: room.to_owned(),
                                id: if quiet {
                                    counter.last
                                } else {
                                    counter.last + 1
                                },
                            };
                            items.push(self.request_put(
                                r,
                                connection_id,
                                None,
                                vec![id],
                                now_ms,
                            )?);
                        }
                        if quiet {
                            set(unsequenced, Some(counter.last));
                            return Ok(Attempt::Commit(Change {
                                items,
                                events: Vec::new(),
                                membership: Membership::Unchanged,
                            }));
                        }
                        set(unsequenced, None);
                        Ok(Attempt::Commit(Change {
                            items,
                            events: vec![ChatEvent::MemberJoined {
                                connection_id: connection_id.to_owned(),
                                name,
                            }],
                            membership: Membership::Join { shards },
                        }))
                    })
                },
            )
            .await?;
        Ok(match outcome {
            Outcome::Done(Once::First(last)) => Once::First(Joined::Already { last }),
            Outcome::Done(Once::Again(done)) => Once::Again(done),
            Outcome::Committed(mut events) if events.len() == 1 => {
                Once::First(Joined::Now(events.remove(0)))
            }
            Outcome::Committed(events) if events.is_empty() => {
                let last = lock(unsequenced).ok_or_else(|| {
                    StoreError::Malformed("an unsequenced join without its read".into())
                })?;
                self.size_room_logged(room, connection_id, now_ms).await;
                Once::First(Joined::Unsequenced { last })
            }
            Outcome::Committed(events) => {
                return Err(StoreError::Malformed(format!(
                    "join: {} events committed, one expected",
                    events.len()
                )))
            }
        })
    }

    /// After an unsequenced join of `connection_id` into `room`: one of the samplers
    /// ([`keys::samples_size`]) counts the room's newest shard and updates the counter's `shards`
    /// and `large` if the estimate calls for it (see [`crate::keys`]). The join has committed,
    /// so a failure is only logged: the next sampler sizes the room.
    pub(super) async fn size_room_logged(&self, room: &str, connection_id: &str, now_ms: i64) {
        if !keys::samples_size(connection_id) {
            return;
        }
        if let Err(e) = self.size_room(room, now_ms).await {
            tracing::warn!(room, error = %e, "sizing the room after an unsequenced join failed");
        }
    }

    async fn size_room(&self, room: &str, now_ms: i64) -> Result<(), StoreError> {
        // The newest shard: it holds only joins since the last doubling (see `keys`).
        let counter = self.read_counter(room).await?;
        let pk = keys::members_pk(room, counter.shards - 1);
        let mut counted: u64 = 0;
        let mut start: Option<Item> = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.tables.connections)
                .key_condition_expression("#pk = :pk")
                .filter_expression(LIVE_MEMBER)
                .expression_attribute_names("#pk", keys::PK)
                .expression_attribute_names("#exp", keys::EXPIRES_AT)
                .expression_attribute_names("#live", keys::LIVE_UNTIL)
                .expression_attribute_values(":pk", s(pk.clone()))
                .expression_attribute_values(":now", n(epoch_secs(now_ms)))
                .select(aws_sdk_dynamodb::types::Select::Count)
                .set_exclusive_start_key(start)
                .consistent_read(ReadOp::CountMembers.consistent_read())
                .send()
                .await
                .map_err(|e| StoreError::backend("Query count members", e))?;
            counted += u64::try_from(out.count).unwrap_or(0);
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        let (shards, large) = keys::sized(counted, counter.shards, counter.large, self.large_limit);
        if shards == counter.shards && (!large || counter.large) {
            return Ok(());
        }
        let mut set = Expr::new(
            "SET #type = if_not_exists(#type, :counter), #last = if_not_exists(#last, :zero), #shards = :shards",
        )
        .value(":counter", s(keys::COUNTER_TYPE))
        .value(":zero", n(0))
        .value(":shards", n(shards));
        if large {
            set.text.push_str(", #large = :large");
            set = set.value(":large", AttributeValue::Bool(true));
        }
        let cond = super::txn::shards_unmoved(counter.shards);
        let (names, values) = super::expr::placeholders(&[&set, &cond]);
        match self
            .client
            .update_item()
            .table_name(&self.tables.events)
            .set_key(Some(super::expr::event_key(room, keys::COUNTER_SEQ)))
            .update_expression(&set.text)
            .condition_expression(&cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            // Another sampler (or a sequenced join) moved the shards first: its count stands.
            Err(aws_sdk_dynamodb::error::SdkError::ServiceError(e))
                if e.err().is_conditional_check_failed_exception() =>
            {
                Ok(())
            }
            Err(e) => Err(StoreError::backend("UpdateItem counter size", e)),
        }
    }

    /// The state items of `conn` joining `room` as `name`: its `rooms` entry (and, with
    /// `new_name`, its new name) on the condition that it is as read and under `max_rooms`
    /// rooms, and its member item in the shard its id hashes to among the room's shards after
    /// this join (`unsequenced`: the shards as read, which it does not change). Returns
    /// those shards too.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn join_items(
        &self,
        conn: &ConnItem,
        room: &str,
        name: &str,
        counter: Counter,
        max_rooms: usize,
        new_name: Option<&ValidName>,
        unsequenced: bool,
    ) -> Result<(Vec<TransactWriteItem>, u32), StoreError> {
        let shards = if unsequenced {
            counter.shards.max(1)
        } else {
            self.join_sizing(counter).0
        };
        let shard = keys::member_shard(&conn.connection_id, shards);
        let mut cond = name_unchanged(conn);
        let mut set = match conn.rooms {
            Some(_) => {
                cond =
                    cond.and(Expr::new("attribute_not_exists(#rooms.#room)").name("#room", room));
                if max_rooms < usize::MAX {
                    cond = cond.and(Expr::new("size(#rooms) < :max").value(":max", n(max_rooms)));
                }
                Expr::new("SET #rooms.#room = :shard")
                    .name("#room", room)
                    .value(":shard", n(shard))
            }
            // An item from before layout 2 has no map to set an entry in.
            None => {
                cond = cond.and(Expr::new("attribute_not_exists(#rooms)"));
                Expr::new("SET #rooms = :rooms").value(
                    ":rooms",
                    AttributeValue::M([(room.to_owned(), n(shard))].into()),
                )
            }
        };
        if let Some(new_name) = new_name {
            set.text.push_str(", #name = :name, #nkey = :nkey");
            set = set
                .value(":name", s(&new_name.display))
                .value(":nkey", s(&new_name.key));
        }
        let items = vec![
            update(
                &self.tables.connections,
                conn_key(&conn.connection_id),
                set,
                Some(cond),
            )?,
            self.put_member(room, shard, conn, name, None)?,
        ];
        Ok((items, shards))
    }

    /// The member item of `conn` in `room`'s `shard`, named `name`, live until the connection
    /// expires (its TTL a grace later, see [`keys::MEMBER_TTL_GRACE_SECS`]); with `was`, only if the item is there with that name (a rename the room
    /// has not heard of yet: two finishers of one rename cannot both announce it). A put (not
    /// an update): a rename rewrites it whole, so it can never be left as a partial item.
    pub(super) fn put_member(
        &self,
        room: &str,
        shard: u32,
        conn: &ConnItem,
        name: &str,
        was: Option<&str>,
    ) -> Result<TransactWriteItem, StoreError> {
        let member = MemberItem {
            batch: conn.batch,
            ..MemberItem::new(conn.connection_id.clone(), name.to_owned(), conn.expires_at)
        };
        let item = serde_dynamo::to_item(&member)
            .map_err(|e| StoreError::Malformed(format!("member item: {e}")))?;
        put(
            &self.tables.connections,
            with_key(item, member_key(room, shard, &conn.connection_id)),
            was.map(|old| Expr::new("#name = :old").value(":old", s(old))),
        )
    }

    /// The connection's member item in `room`'s `shard`, if there is one (strongly
    /// consistent, live or not: every caller acts for its connection, whose own item decides
    /// whether it is live — or, on the expiry path, is gone).
    pub(super) async fn get_member(
        &self,
        room: &str,
        shard: u32,
        connection_id: &str,
    ) -> Result<Option<MemberItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(member_key(room, shard, connection_id)))
            .consistent_read(ReadOp::GetMember.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend("GetItem member", e))?;
        out.item
            .map(|item| {
                serde_dynamo::from_item(item)
                    .map_err(|e| StoreError::Malformed(format!("member item: {e}")))
            })
            .transpose()
    }

    /// The name `room` knows `conn` by, for its `MemberLeft`, and the condition of the delete
    /// of its member item. The connection's name, unconditionally, unless a rename of it is
    /// unfinished (`renaming`): then the room may not have heard of the new name, so the
    /// member item is read and its name used, and the delete is on the condition that it
    /// still has it (a concurrent finishing of the rename makes the leave read again).
    async fn name_in_room(
        &self,
        conn: &ConnItem,
        room: &str,
        shard: u32,
    ) -> Result<(String, Option<Expr>), StoreError> {
        let name = conn.name.clone().unwrap_or_default();
        if conn.renaming.is_none() {
            return Ok((name, None));
        }
        Ok(
            match self.get_member(room, shard, &conn.connection_id).await? {
                Some(member) => {
                    let cond = Expr::new("#name = :known").value(":known", s(&member.name));
                    (member.name, Some(cond))
                }
                None => (name, None),
            },
        )
    }

    /// Ends the membership of `room`: `MemberLeft` with `reason`. `live_only`: an expired
    /// connection counts as not connected (a `leave` request); a removal leaves its rooms
    /// whether or not it has expired (its `$disconnect` is still real), and leaves a large
    /// room unsequenced (`None`: no event, no counter move).
    pub(super) async fn leave(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        live_only: bool,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<Option<StoredEvent>>, StoreError> {
        let left = self
            .append_loop(
                "TransactWriteItems leave",
                room,
                now_ms,
                move |counter, attempt| {
                    Box::pin(async move {
                        let conn = self.get_conn(connection_id).await?;
                        let conn = if live_only { live(conn, now_ms) } else { conn }
                            .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
                        let req = requested(request, &conn);
                        if let Some(done) = self.done_before(req.as_ref(), attempt, now_ms).await? {
                            return Ok(Attempt::Done(done));
                        }
                        let Some(shard) = conn.shard_in(room) else {
                            let e = StoreError::NotAMember(room.to_owned());
                            return self
                                .unless_done(req.as_ref(), e, now_ms)
                                .await
                                .map(Attempt::Done);
                        };
                        let (name, known) = self.name_in_room(&conn, room, shard).await?;
                        let mut items = vec![
                            update(
                                &self.tables.connections,
                                conn_key(connection_id),
                                Expr::new("REMOVE #rooms.#room").name("#room", room),
                                Some(name_unchanged(&conn).and(
                                    Expr::new("attribute_exists(#rooms.#room)").name("#room", room),
                                )),
                            )?,
                            delete(
                                &self.tables.connections,
                                member_key(room, shard, connection_id),
                                known,
                            )?,
                        ];
                        if !live_only && counter.large {
                            // A disconnect (no requestId) of a large room: no event, no
                            // counter move.
                            return Ok(Attempt::Commit(Change {
                                items,
                                events: Vec::new(),
                                membership: Membership::Unchanged,
                            }));
                        }
                        if let Some(r) = &req {
                            let id = EventRef {
                                room: room.to_owned(),
                                id: counter.last + 1,
                            };
                            items.push(self.request_put(
                                r,
                                connection_id,
                                None,
                                vec![id],
                                now_ms,
                            )?);
                        }
                        Ok(Attempt::Commit(Change {
                            items,
                            events: vec![ChatEvent::MemberLeft {
                                connection_id: connection_id.to_owned(),
                                name,
                                reason,
                            }],
                            membership: Membership::Leave(1),
                        }))
                    })
                },
            )
            .await?;
        match left {
            Outcome::Committed(mut events) if events.len() <= 1 => Ok(Once::First(events.pop())),
            Outcome::Committed(events) => Err(StoreError::Malformed(format!(
                "leave: {} events committed, one expected",
                events.len()
            ))),
            Outcome::Done(done) => Ok(Once::Again(done)),
        }
    }

    /// One transaction of `MemberLeft`s (`reason`) in `room` for those of `ids` that are
    /// still members of it (the fan-out's pruning: many gone connections, one counter move).
    pub(super) async fn leave_many(
        &self,
        room: &str,
        ids: &[&str],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let outcome = self
            .append_loop(
                "TransactWriteItems prune",
                room,
                now_ms,
                move |counter, _attempt| {
                    Box::pin(async move {
                        let conns =
                            futures::future::try_join_all(ids.iter().map(|id| self.get_conn(id)))
                                .await?;
                        let mut items = Vec::new();
                        let mut events = Vec::new();
                        for conn in conns.into_iter().flatten() {
                            let Some(shard) = conn.shard_in(room) else {
                                continue;
                            };
                            let id = conn.connection_id.as_str();
                            let (name, known) = self.name_in_room(&conn, room, shard).await?;
                            items.push(update(
                                &self.tables.connections,
                                conn_key(id),
                                Expr::new("REMOVE #rooms.#room").name("#room", room),
                                Some(name_unchanged(&conn).and(
                                    Expr::new("attribute_exists(#rooms.#room)").name("#room", room),
                                )),
                            )?);
                            items.push(delete(
                                &self.tables.connections,
                                member_key(room, shard, id),
                                known,
                            )?);
                            events.push(ChatEvent::MemberLeft {
                                connection_id: id.to_owned(),
                                name,
                                reason,
                            });
                        }
                        if events.is_empty() {
                            return Ok(Attempt::Done(()));
                        }
                        let leaving = events.len() as u64;
                        if counter.large {
                            // A large room: the disconnects are unsequenced.
                            return Ok(Attempt::Commit(Change {
                                items,
                                events: Vec::new(),
                                membership: Membership::Unchanged,
                            }));
                        }
                        Ok(Attempt::Commit(Change {
                            items,
                            events,
                            membership: Membership::Leave(leaving),
                        }))
                    })
                },
            )
            .await?;
        Ok(match outcome {
            Outcome::Done(()) => Vec::new(),
            Outcome::Committed(events) => events,
        })
    }

    pub(super) async fn query_members(
        &self,
        room: &str,
        shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        let pk = keys::members_pk(room, shard);
        let start: Option<Item> = after.map(|sk| super::expr::key(pk.clone(), sk));
        let out = self
            .client
            .query()
            .table_name(&self.tables.connections)
            .key_condition_expression("#pk = :pk")
            .filter_expression(LIVE_MEMBER)
            .expression_attribute_names("#pk", keys::PK)
            .expression_attribute_names("#exp", keys::EXPIRES_AT)
            .expression_attribute_names("#live", keys::LIVE_UNTIL)
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":now", n(epoch_secs(now_ms)))
            .set_exclusive_start_key(start)
            .consistent_read(ReadOp::QueryMembers.consistent_read())
            .set_limit(self.page_limit)
            .send()
            .await
            .map_err(|e| StoreError::backend("Query members", e))?;
        let mut members = Vec::with_capacity(out.items().len());
        for item in out.items.unwrap_or_default() {
            let m: MemberItem = serde_dynamo::from_item(item)
                .map_err(|e| StoreError::Malformed(format!("member item: {e}")))?;
            members.push(Member {
                connection_id: m.connection_id,
                name: m.name,
                batch: m.batch.unwrap_or(false),
            });
        }
        let next = out
            .last_evaluated_key
            .and_then(|k| k.get(keys::SK).and_then(|v| v.as_s().ok()).cloned());
        Ok(MembersPage { members, next })
    }
}
