//! Connections and their names: `$connect`, reads, `setName` (claims, renames announced in
//! every room, an identity taking its name back, reservations), the rate-limit bucket, and
//! removal (a leave per room, then the connection and its claim).

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_dynamodb::types::TransactWriteItem;
use futures::future::BoxFuture;

use super::expr::{
    check, claim_key, conn_key, delete, n, placeholders, put, s, update, with_key, Expr,
};
use super::requests::{requested, Requested};
use super::rooms::name_unchanged;
use super::txn::{backoff, Attempt, Change, Membership, Outcome, MAX_ATTEMPTS};
use super::DynamoStore;
use crate::events::{ChatEvent, LeaveReason, StoredEvent};
use crate::keys::DEFAULT_ROOM;
use crate::protocol::EventRef;
use crate::ratelimit::{self, Bucket, RequestLimits, Verdict};
use crate::store::aws_like::ReadOp;
use crate::store::items::{ClaimItem, ConnItem};
use crate::store::limits::TRANSACT_MAX_ACTIONS;
use crate::store::requests::{event_refs, Once, RequestKey};
use crate::store::{epoch_secs, Admission, Connection, Joined, StoreError, NAME_RESERVATION_SECS};
use crate::validation::ValidName;

/// Leaves per pruning transaction: two items each (the connection's `rooms` entry, the member
/// item) and its event, plus the room's counter, within `TransactWriteItems`' 100 actions.
const LEAVES_PER_TRANSACTION: usize = 33;
const _: () = assert!(LEAVES_PER_TRANSACTION * 3 < TRANSACT_MAX_ACTIONS);

/// Connections removed at once by [`DynamoStore::remove_many`] once they are in no room.
const PARALLEL_REMOVALS: usize = 8;

/// Where a connection stands with respect to an existing claim on the name it wants.
#[derive(Debug, PartialEq, Eq)]
enum Standing {
    /// Free to take: no live holder, or it is this connection's already.
    Free,
    /// Held (or reserved) for this connection's own identity by another of its connections.
    OwnOtherConnection(String),
    /// Someone else's.
    Taken,
}

fn claim_standing(
    claim: &ClaimItem,
    connection_id: &str,
    identity: Option<&str>,
    now_s: i64,
) -> Standing {
    let mine = claim.connection_id.as_deref() == Some(connection_id);
    if mine || claim.expires_at <= now_s {
        return Standing::Free;
    }
    if identity.is_some() && claim.identity.as_deref() == identity {
        return match &claim.connection_id {
            Some(other) => Standing::OwnOtherConnection(other.clone()),
            None => Standing::Free,
        };
    }
    Standing::Taken
}

pub(super) fn live(conn: Option<ConnItem>, now_ms: i64) -> Option<ConnItem> {
    conn.filter(|c| c.expires_at > epoch_secs(now_ms))
}

/// What the first transaction of a `setName` does besides moving the claim and the name.
enum FirstStep {
    /// The connection joins lobby with the name: a first name, or a rename of a connection
    /// in no room.
    JoinLobby,
    /// A rename, announced first in this room (lobby if it is a member, else its first room
    /// by name), where its member item is in `shard`.
    Rename { room: String, shard: u32 },
}

impl FirstStep {
    fn of(conn: &ConnItem) -> FirstStep {
        let rooms = conn.rooms.clone().unwrap_or_default();
        let first = rooms
            .get_key_value(DEFAULT_ROOM)
            .or_else(|| rooms.iter().next());
        match first {
            Some((room, shard)) if conn.name.is_some() => FirstStep::Rename {
                room: room.clone(),
                shard: *shard,
            },
            _ => FirstStep::JoinLobby,
        }
    }

    fn room(&self) -> &str {
        match self {
            FirstStep::JoinLobby => DEFAULT_ROOM,
            FirstStep::Rename { room, .. } => room,
        }
    }
}

impl DynamoStore {
    pub(super) async fn add_connection_item(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        admission: Option<Admission<'_>>,
        batch: bool,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        let expires_at = epoch_secs(now_ms) + self.retention.connection_ttl.as_secs() as i64;
        let conn = ConnItem {
            connection_id: connection_id.to_owned(),
            connected_at: now_ms,
            expires_at,
            name: None,
            name_key: None,
            rl_tokens: None,
            rl_at: None,
            identity: identity.map(str::to_owned),
            rooms: Some(BTreeMap::new()),
            renaming: None,
            principal: admission.map(|a| a.principal.to_owned()),
            batch: batch.then_some(true),
        };
        let item = serde_dynamo::to_item(&conn)
            .map_err(|e| StoreError::Malformed(format!("connection item: {e}")))?;
        let item = with_key(item, conn_key(connection_id));
        if let Some(admission) = admission.filter(|a| a.max_connections > 0) {
            if !self
                .admit(admission, connection_id, item, expires_at, now_ms)
                .await?
            {
                return Ok(None);
            }
            return Ok(Some(to_connection(conn)));
        }
        self.client
            .put_item()
            .table_name(&self.tables.connections)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| StoreError::backend("PutItem connection", e))?;
        Ok(Some(to_connection(conn)))
    }

    pub(super) async fn read_connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        Ok(live(self.get_conn(connection_id).await?, now_ms).map(to_connection))
    }

    /// The connection item, expired or not (strongly consistent).
    pub(super) async fn get_conn(
        &self,
        connection_id: &str,
    ) -> Result<Option<ConnItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(conn_key(connection_id)))
            .consistent_read(ReadOp::GetConnection.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend("GetItem connection", e))?;
        out.item
            .map(|item| {
                serde_dynamo::from_item(item)
                    .map_err(|e| StoreError::Malformed(format!("connection {connection_id}: {e}")))
            })
            .transpose()
    }

    pub(super) async fn get_claim(&self, key: &str) -> Result<Option<ClaimItem>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(claim_key(key)))
            .consistent_read(ReadOp::GetNameClaim.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend("GetItem name claim", e))?;
        out.item
            .map(|item| {
                serde_dynamo::from_item(item)
                    .map_err(|e| StoreError::Malformed(format!("name claim {key}: {e}")))
            })
            .transpose()
    }

    /// `setName`: the claim, then a transaction per room (see
    /// [`crate::store::ChatStore::set_name`]).
    pub(super) async fn claim_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        request: Option<&RequestKey>,
        now_ms: i64,
    ) -> Result<Once<Vec<StoredEvent>>, StoreError> {
        let mut evicted = false;
        // The events of an interrupted rename this call finished first (at most once).
        let mut finished: Option<Vec<StoredEvent>> = None;
        for attempt in 1..=MAX_ATTEMPTS {
            let conn = live(self.get_conn(connection_id).await?, now_ms)
                .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
            // With a requestId, its item is read first (setName is rare; a resend must not
            // rename back after a later rename, nor answer `[]` for a name it set itself).
            let req = requested(request, &conn);
            if let Some(r) = &req {
                if let Some(done) = self.find_request(r, now_ms).await? {
                    return Ok(Once::Again(done));
                }
            }
            if conn.renaming.is_some() && finished.is_none() {
                // An earlier rename stopped part-way (its client got an error): the rooms it
                // did not reach hear of it first, whatever this call goes on to do.
                finished = Some(self.finish_rename(&conn, now_ms).await?);
            }
            let mut events = finished.clone().unwrap_or_default();
            if conn.name.as_deref() == Some(name.display.as_str()) {
                // The same name again: nothing to claim; back into lobby if it left it.
                if conn.shard_in(DEFAULT_ROOM).is_none() {
                    if let Joined::Now(event) = self
                        .join(connection_id, DEFAULT_ROOM, usize::MAX, None, now_ms)
                        .await?
                        .first()?
                    {
                        events.push(event);
                    }
                }
                return Ok(Once::First(events));
            }
            match self.standing(&conn, name, now_ms).await? {
                Standing::Taken => return Err(StoreError::NameTaken(name.display.clone())),
                Standing::OwnOtherConnection(old_id) if !evicted => {
                    // The same identity takes its name back: its older connection (a stale
                    // one, typically) is removed first, leaving every room it is in as a
                    // disconnect would; its claim becomes this identity's reservation.
                    evicted = true;
                    if let Some(old) = self.get_conn(&old_id).await? {
                        if old.name_key.as_deref() == Some(name.key.as_str()) {
                            self.remove(&old_id, LeaveReason::Replaced, now_ms).await?;
                        }
                    }
                    continue;
                }
                // Evicted already (or free): the claim's condition lets this identity take it.
                Standing::OwnOtherConnection(_) | Standing::Free => {}
            }
            let first = &FirstStep::of(&conn);
            let conn = &conn;
            // Whether the join of lobby was unsequenced, for sizing the room.
            let unsequenced = std::sync::Mutex::new(false);
            let unsequenced = &unsequenced;
            let before = events.clone();
            let record = req.as_ref().map(|r| (r, before.as_slice()));
            let committed = self
                .append_loop(
                    "TransactWriteItems setName",
                    first.room(),
                    now_ms,
                    move |counter, attempt| {
                        Box::pin(async move {
                            // After a cancelled try, re-read: what is there now tells a taken name
                            // (final) from a changed connection (start over) from a lost race for
                            // the room's counter (build again).
                            if attempt > 1 {
                                let Some(now_conn) =
                                    live(self.get_conn(connection_id).await?, now_ms)
                                else {
                                    return Err(StoreError::NotConnected(connection_id.to_owned()));
                                };
                                if !same_standing(&now_conn, conn) {
                                    return Ok(Attempt::Done(()));
                                }
                                match self.standing(conn, name, now_ms).await? {
                                    Standing::Taken => {
                                        return Err(StoreError::NameTaken(name.display.clone()))
                                    }
                                    Standing::OwnOtherConnection(_) if !evicted => {
                                        return Ok(Attempt::Done(()))
                                    }
                                    _ => {}
                                }
                            }
                            let quiet = matches!(first, FirstStep::JoinLobby)
                                && super::rooms::unsequenced_join(counter, attempt);
                            super::rooms::set(unsequenced, quiet);
                            self.first_name_change(
                                conn, name, first, counter, quiet, record, now_ms,
                            )
                            .await
                        })
                    },
                )
                .await?;
            let first_event = match committed {
                Outcome::Committed(mut committed) if committed.len() == 1 => committed.remove(0),
                Outcome::Committed(committed) if committed.is_empty() => {
                    // Named, and in lobby unsequenced: no event to answer with.
                    if super::rooms::lock(unsequenced) {
                        self.size_room_logged(DEFAULT_ROOM, connection_id, now_ms)
                            .await;
                    }
                    return Ok(Once::First(events));
                }
                Outcome::Committed(committed) => {
                    return Err(StoreError::Malformed(format!(
                        "setName: {} events committed, one expected",
                        committed.len()
                    )))
                }
                Outcome::Done(()) => {
                    // The connection changed under us (a concurrent join, leave or rename):
                    // start over from what it is now.
                    backoff(attempt).await;
                    continue;
                }
            };
            events.push(first_event);
            let recorded = events.len();
            if let (FirstStep::Rename { room, .. }, Some(old)) = (first, &conn.name) {
                events.extend(
                    self.announce_rename(connection_id, room, old, name, now_ms)
                        .await?,
                );
            }
            if let Some(r) = &req {
                if events.len() > recorded {
                    // The other rooms' events, known only now, complete the answer a resend
                    // gets. If this fails, the item keeps the first transaction's events.
                    self.complete_request(r, event_refs(&events)).await?;
                }
            }
            return Ok(Once::First(events));
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// Where the connection stands with the name's current claim.
    async fn standing(
        &self,
        conn: &ConnItem,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Standing, StoreError> {
        // Read the claim first: a name that is plainly taken costs one read instead of a
        // cancelled transaction. The transaction's condition still settles races.
        Ok(match self.get_claim(&name.key).await? {
            None => Standing::Free,
            Some(holder) => claim_standing(
                &holder,
                &conn.connection_id,
                conn.identity.as_deref(),
                epoch_secs(now_ms),
            ),
        })
    }

    /// The first transaction of a name change: the claim moves (the old one released), the
    /// connection's name changes, and the first room hears of it.
    #[allow(clippy::too_many_arguments)]
    async fn first_name_change(
        &self,
        conn: &ConnItem,
        name: &ValidName,
        first: &FirstStep,
        counter: super::txn::Counter,
        unsequenced: bool,
        // With a requestId: its request, and the events this setName recorded before.
        req: Option<(&Requested<'_>, &[StoredEvent])>,
        now_ms: i64,
    ) -> Result<Attempt<()>, StoreError> {
        let id = conn.connection_id.as_str();
        // The claim lives as long as the connection, so an abandoned name frees itself.
        let claim = ClaimItem {
            connection_id: Some(id.to_owned()),
            identity: conn.identity.clone(),
            name: Some(name.display.clone()),
            expires_at: conn.expires_at,
        };
        let mut free = Expr::new("attribute_not_exists(#pk) OR #conn = :me OR #exp <= :now")
            .value(":me", s(id))
            .value(":now", n(epoch_secs(now_ms)));
        if let Some(identity) = &conn.identity {
            // This identity's own claim or reservation.
            free.text.push_str(" OR #ident = :ident");
            free = free.value(":ident", s(identity));
        }
        let claim_item = serde_dynamo::to_item(&claim)
            .map_err(|e| StoreError::Malformed(format!("claim item: {e}")))?;
        let mut items = vec![put(
            &self.tables.connections,
            with_key(claim_item, claim_key(&name.key)),
            Some(free),
        )?];
        if let Some(release) = self.release_if_ours(conn, Some(&name.key), now_ms).await? {
            items.push(release);
        }
        let (event, membership) = match first {
            FirstStep::JoinLobby => {
                let (join, shards) = self.join_items(
                    conn,
                    DEFAULT_ROOM,
                    &name.display,
                    counter,
                    usize::MAX,
                    Some(name),
                    unsequenced,
                )?;
                items.extend(join);
                if unsequenced {
                    // A large (or contended) lobby: named and a member, without an event; the
                    // request item records the events an interrupted rename's finishing
                    // recorded first, if any (a resend gets the same answer).
                    if let Some((r, before)) = req {
                        items.push(self.request_put(
                            r,
                            id,
                            Some(&name.display),
                            event_refs(before),
                            now_ms,
                        )?);
                    }
                    return Ok(Attempt::Commit(Change {
                        items,
                        events: Vec::new(),
                        membership: Membership::Unchanged,
                    }));
                }
                (
                    ChatEvent::MemberJoined {
                        connection_id: id.to_owned(),
                        name: name.display.clone(),
                    },
                    Membership::Join { shards },
                )
            }
            FirstStep::Rename { room, shard } => {
                let mut set = Expr::new("SET #name = :name, #nkey = :nkey")
                    .value(":name", s(&name.display))
                    .value(":nkey", s(&name.key));
                let mut cond = name_unchanged(conn)
                    .and(Expr::new("attribute_exists(#rooms.#room)").name("#room", room.clone()));
                match (conn.room_names().len() > 1, &conn.name) {
                    // Other rooms still know the old name until their own transactions: the
                    // marker says so until the last of them is done, for a retry to finish.
                    (true, Some(old)) => {
                        set.text.push_str(", #renaming = :old");
                        set = set.value(":old", s(old));
                    }
                    // This room is its only one: the rename is whole in this transaction (if a
                    // join has added a room since the read, build again: it needs the marker).
                    _ => {
                        set.text.push_str(" REMOVE #renaming");
                        cond = cond.and(Expr::new("size(#rooms) = :one").value(":one", n(1)));
                    }
                }
                items.push(update(
                    &self.tables.connections,
                    conn_key(id),
                    set,
                    Some(cond),
                )?);
                items.push(self.put_member(room, *shard, conn, &name.display, None)?);
                (
                    ChatEvent::MemberRenamed {
                        connection_id: id.to_owned(),
                        old_name: conn.name.clone().unwrap_or_default(),
                        name: name.display.clone(),
                    },
                    Membership::Unchanged,
                )
            }
        };
        if let Some((r, before)) = req {
            // The request item records this transaction's event (after any an interrupted
            // rename's finishing recorded first), with the name it set.
            let mut refs = event_refs(before);
            refs.push(EventRef {
                room: first.room().to_owned(),
                id: counter.last + 1,
            });
            items.push(self.request_put(r, id, Some(&name.display), refs, now_ms)?);
        }
        Ok(Attempt::Commit(Change {
            items,
            events: vec![event],
            membership,
        }))
    }

    /// After the first room heard of a rename: `MemberRenamed` in each other room the
    /// connection is a member of (name order), one transaction each, then the `renaming`
    /// marker goes, then a join of lobby if it is not in it. A room it has left meanwhile is
    /// skipped.
    async fn announce_rename(
        &self,
        connection_id: &str,
        first_room: &str,
        old_name: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let Some(conn) = live(self.get_conn(connection_id).await?, now_ms) else {
            return Ok(Vec::new());
        };
        let mut events = Vec::new();
        for room in conn.room_names().iter().filter(|r| *r != first_room) {
            events.extend(
                self.rename_in(connection_id, room, &name.display, Some(old_name), now_ms)
                    .await?,
            );
        }
        if conn.renaming.is_some() {
            self.clear_renaming(connection_id, &name.display).await?;
        }
        if conn.shard_in(DEFAULT_ROOM).is_none() {
            if let Joined::Now(event) = self
                .join(connection_id, DEFAULT_ROOM, usize::MAX, None, now_ms)
                .await?
                .first()?
            {
                events.push(event);
            }
        }
        Ok(events)
    }

    /// Finishes a rename that stopped part-way (`renaming` set): `MemberRenamed` in each room
    /// (name order) whose member item still has another name than the connection, from that
    /// name, then the marker goes. Reads each room's member item: only ever after a failure.
    async fn finish_rename(
        &self,
        conn: &ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let Some(name) = conn.name.as_deref() else {
            return Ok(Vec::new());
        };
        let id = conn.connection_id.as_str();
        let mut events = Vec::new();
        for room in conn.room_names() {
            events.extend(self.rename_in(id, &room, name, None, now_ms).await?);
        }
        self.clear_renaming(id, name).await?;
        Ok(events)
    }

    /// `MemberRenamed` to `name` in `room`, with the put of the connection's member item
    /// there, if it still has another name: `old`, the name the rename started from, on a
    /// first try (no read: the member item of an unfinished rename has it), else the member
    /// item's as read (finishing an interrupted rename, or after a cancelled try). The put is
    /// on the condition that the item still has that name, so two finishers of one rename
    /// announce it once. Nothing if the connection has left the room or been renamed again
    /// (that rename announces itself).
    async fn rename_in(
        &self,
        connection_id: &str,
        room: &str,
        name: &str,
        old: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let renamed = self
            .append_one(
                "TransactWriteItems rename",
                room,
                now_ms,
                move |_counter, attempt| {
                    Box::pin(async move {
                        let Some(conn) = live(self.get_conn(connection_id).await?, now_ms) else {
                            return Ok(Attempt::Done(()));
                        };
                        let Some(shard) = conn.shard_in(room) else {
                            return Ok(Attempt::Done(()));
                        };
                        if conn.name.as_deref() != Some(name) {
                            return Ok(Attempt::Done(()));
                        }
                        let was = match old.filter(|_| attempt == 1) {
                            Some(old) => old.to_owned(),
                            None => match self.get_member(room, shard, connection_id).await? {
                                Some(member) if member.name != name => member.name,
                                // Renamed there already (or never written): nothing to tell.
                                _ => return Ok(Attempt::Done(())),
                            },
                        };
                        let items = vec![
                            check(
                                &self.tables.connections,
                                conn_key(connection_id),
                                name_unchanged(&conn).and(
                                    Expr::new("attribute_exists(#rooms.#room)")
                                        .name("#room", room.to_owned()),
                                ),
                            )?,
                            self.put_member(room, shard, &conn, name, Some(&was))?,
                        ];
                        Ok(Attempt::Commit(Change {
                            items,
                            events: vec![ChatEvent::MemberRenamed {
                                connection_id: connection_id.to_owned(),
                                old_name: was,
                                name: name.to_owned(),
                            }],
                            membership: Membership::Unchanged,
                        }))
                    })
                },
            )
            .await?;
        Ok(renamed.ok())
    }

    /// Removes the `renaming` marker once every room has heard of the rename to `name`; not
    /// if the connection has been renamed again since (that rename owns the marker now).
    async fn clear_renaming(&self, connection_id: &str, name: &str) -> Result<(), StoreError> {
        let remove = Expr::new("REMOVE #renaming");
        let cond = Expr::new("#name = :name").value(":name", s(name));
        let (names, values) = placeholders(&[&remove, &cond]);
        match self
            .client
            .update_item()
            .table_name(&self.tables.connections)
            .set_key(Some(conn_key(connection_id)))
            .update_expression(remove.text)
            .condition_expression(cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(StoreError::backend("UpdateItem renaming", e)),
        }
    }

    /// The item that gives up the name claim the connection holds (its current name's, unless
    /// that is `keep`), if the claim is still its own: deleted, or — for an authenticated
    /// connection — kept as its identity's reservation for [`NAME_RESERVATION_SECS`]. An
    /// expired claim may already belong to someone else, and deleting theirs would be wrong.
    pub(super) async fn release_if_ours(
        &self,
        conn: &ConnItem,
        keep: Option<&str>,
        now_ms: i64,
    ) -> Result<Option<TransactWriteItem>, StoreError> {
        let Some(key) = conn.name_key.as_deref().filter(|k| Some(*k) != keep) else {
            return Ok(None);
        };
        let id = conn.connection_id.as_str();
        match self.get_claim(key).await? {
            Some(claim) if claim.connection_id.as_deref() == Some(id) => {}
            _ => return Ok(None),
        }
        let ours = Expr::new("#conn = :me").value(":me", s(id));
        Ok(Some(match conn.identity {
            None => delete(&self.tables.connections, claim_key(key), Some(ours))?,
            Some(_) => update(
                &self.tables.connections,
                claim_key(key),
                Expr::new("REMOVE #conn SET #exp = :until")
                    .value(":until", n(epoch_secs(now_ms) + NAME_RESERVATION_SECS)),
                Some(ours),
            )?,
        }))
    }

    /// Removes the connection: a leave (`reason`) of each of its rooms in name order, each its
    /// own transaction, then the connection item and its claim on the condition that it is in
    /// no room any more. The connection goes last, so a failure part-way leaves `rooms`
    /// telling a retry what is left.
    pub(super) async fn remove(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let mut left = Vec::new();
        // Expired connections are removed too: `$disconnect` for them is still real.
        let Some(mut conn) = self.get_conn(connection_id).await? else {
            return Ok(left);
        };
        for attempt in 1..=MAX_ATTEMPTS {
            let rooms = conn.room_names();
            for room in &rooms {
                match self
                    .leave(connection_id, room, reason, false, None, now_ms)
                    .await
                    .and_then(Once::first)
                {
                    Ok(event) => left.extend(event),
                    // Left (or removed) concurrently: nothing left to do there.
                    Err(StoreError::NotAMember(_)) => {}
                    Err(StoreError::NotConnected(_)) => return Ok(left),
                    Err(e) => return Err(e),
                }
            }
            if !rooms.is_empty() {
                // Read again what the leaves left: a room joined meanwhile is left too.
                let Some(now) = self.get_conn(connection_id).await? else {
                    return Ok(left);
                };
                conn = now;
                if !conn.room_names().is_empty() {
                    continue;
                }
            }
            let gone = name_unchanged(&conn).and(
                Expr::new("attribute_not_exists(#rooms) OR size(#rooms) = :zero")
                    .value(":zero", n(0)),
            );
            let mut items = vec![delete(
                &self.tables.connections,
                conn_key(connection_id),
                Some(gone),
            )?];
            items.extend(self.release_if_ours(&conn, None, now_ms).await?);
            if self
                .transact("TransactWriteItems remove connection", items)
                .await?
            {
                if let Some(principal) = &conn.principal {
                    // After the connection is gone, so a failure here costs the principal a
                    // slot until the connection's expiry, never a connection without a slot;
                    // and it does not fail the removal, which is done (a retry would find
                    // nothing left to remove, and give back nothing).
                    if let Err(e) = self.release_slot(principal, connection_id).await {
                        tracing::warn!(connection_id, error = %e, "could not give back the connection's slot; it expires with the connection");
                    }
                }
                return Ok(left);
            }
            backoff(attempt).await;
            let Some(now) = self.get_conn(connection_id).await? else {
                return Ok(left);
            };
            conn = now;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// Removes many connections (the fan-out's pruning): first their leaves, grouped by room,
    /// [`LEAVES_PER_TRANSACTION`] to a transaction (one counter move for them all instead of
    /// one each, on the room's one hot partition), then each connection as
    /// [`Self::remove`] does (by then in no room, unless it joined one meanwhile), a few at
    /// a time: those are on partitions of their own. The same end state and events as
    /// removing each; the events come grouped by room.
    pub(super) async fn remove_many(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        use futures::{StreamExt, TryStreamExt};
        let ids: Vec<&str> = connection_ids
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let conns = futures::future::try_join_all(ids.iter().map(|id| self.get_conn(id))).await?;
        let mut by_room: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for conn in conns.iter().flatten() {
            for room in conn.room_names() {
                by_room
                    .entry(room)
                    .or_default()
                    .push(conn.connection_id.as_str());
            }
        }
        let mut left = Vec::new();
        for (room, members) in &by_room {
            for chunk in members.chunks(LEAVES_PER_TRANSACTION) {
                left.extend(self.leave_many(room, chunk, reason, now_ms).await?);
            }
        }
        // Boxed: the futures then have one type, whatever borrow each holds.
        let removals: Vec<BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>>> = conns
            .iter()
            .flatten()
            .map(|c| {
                Box::pin(self.remove(&c.connection_id, reason, now_ms))
                    as BoxFuture<'_, Result<Vec<StoredEvent>, StoreError>>
            })
            .collect();
        let rest: Vec<Vec<StoredEvent>> = futures::stream::iter(removals)
            .buffered(PARALLEL_REMOVALS)
            .try_collect()
            .await?;
        left.extend(rest.into_iter().flatten());
        Ok(left)
    }

    pub(super) async fn take_token(
        &self,
        connection_id: &str,
        limits: &RequestLimits<'_>,
        now_ms: i64,
    ) -> Result<Verdict, StoreError> {
        let per_window = limits.principal_per_window();
        if limits.connection.is_off() && per_window == 0 {
            return Ok(Verdict::Allowed);
        }
        let first = self.get_conn(connection_id).await?;
        if per_window > 0 {
            let principal = first
                .as_ref()
                .and_then(|c| c.principal.as_deref())
                .or(limits.fallback_principal);
            if let Some(principal) = principal {
                if !self
                    .take_principal_token(principal, per_window, now_ms)
                    .await?
                {
                    return Ok(Verdict::PrincipalLimited);
                }
            }
        }
        let limit = limits.connection;
        if limit.is_off() {
            return Ok(Verdict::Allowed);
        }
        let mut read = first;
        for attempt in 1..=5 {
            let conn = match read.take() {
                Some(conn) => conn,
                None if attempt == 1 => return Ok(Verdict::Allowed),
                None => match self.get_conn(connection_id).await? {
                    Some(conn) => conn,
                    None => return Ok(Verdict::Allowed),
                },
            };
            let bucket = conn.rl_at.map(|at_ms| Bucket {
                milli_tokens: conn.rl_tokens.unwrap_or(0),
                at_ms,
            });
            let Some(next) = ratelimit::take(limit, bucket, now_ms) else {
                return Ok(Verdict::ConnectionLimited);
            };
            // Optimistic: the write only lands if nobody took a token since the read.
            let set = Expr::new("SET #tokens = :tokens, #at = :now")
                .value(":tokens", n(next.milli_tokens))
                .value(":now", n(next.at_ms));
            let cond = match bucket {
                Some(b) => {
                    Expr::new("attribute_exists(#pk) AND #at = :old").value(":old", n(b.at_ms))
                }
                None => Expr::new("attribute_exists(#pk) AND attribute_not_exists(#at)"),
            };
            if self
                .update_if("UpdateItem rate limit", conn_key(connection_id), set, cond)
                .await?
            {
                return Ok(Verdict::Allowed);
            }
            backoff(attempt).await;
        }
        // Requests from this one connection keep colliding: it is sending too fast.
        Ok(Verdict::ConnectionLimited)
    }
}

/// Whether two reads of a connection agree on what a name change builds on (its rate-limit
/// bucket may change in between without mattering).
fn same_standing(a: &ConnItem, b: &ConnItem) -> bool {
    a.name == b.name && a.name_key == b.name_key && a.rooms == b.rooms
}

fn to_connection(c: ConnItem) -> Connection {
    Connection {
        rooms: c.room_names(),
        connection_id: c.connection_id,
        connected_at: c.connected_at,
        expires_at: c.expires_at,
        name: c.name,
        identity: c.identity,
        batch: c.batch.unwrap_or(false),
    }
}
