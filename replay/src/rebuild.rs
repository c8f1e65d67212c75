//! `rebuild`: derives what the connections table should hold for one room from the room's
//! event log, reports where it differs (drift), and with `apply` fixes it.
//!
//! The log is the source of truth. From it: the room's counter (the events table's item at
//! `seq = 0`) must be at least the highest event id (or the next write would collide with an
//! existing event), and each connection's standing in the room is its last
//! `MemberJoined`/`MemberRenamed` (a member, under that name) unless a `MemberLeft` follows.
//! Against that, the room's live member items (`MEMBERS#<room>#<shard>` whose `liveUntil`,
//! else `expiresAt`, has not passed: see `chat_shared::keys`), the connections they belong to
//! (`CONN#<id>`) and their name claims (`NAME#<key>`) drift in the ways [`Drift`] lists, each
//! with its fix. Name claims are global (one per name, not per
//! room), so a claim nobody in this room holds is no drift of this room's: a claim whose
//! holder is gone frees itself when it expires with its holder's connection.
//!
//! Joins and disconnects need not be events (see `chat_shared::keys`: a large room's, and a
//! join whose counter was contended, are *unsequenced*): a member item whose connection's
//! `rooms` names the room with the item's shard is a member the log need not list (counted as
//! an unsequenced member, not drift), and in a large room (its counter's `large`) a member per
//! the log with neither a member item nor a `rooms` entry left unsequenced (counted as an
//! unsequenced leave, not drift). Only one of the two missing is still drift.
//!
//! Connections the log says are members but that have no live `CONN#` item (expired by TTL, or
//! deleted without an event) are reported as "members without a connection" and left alone:
//! recording their `MemberLeft` needs the store's append (counter and event in one transaction),
//! and `ChatStore::remove_connection` only does that for a connection it can still read.
//!
//! The member items are read *before* the log, the connections and claims after it (which
//! connections matter is known only then). A change committed meanwhile may be in one read and
//! not the other, so every fix is a conditional write on the item as it was read: a change the
//! reads missed makes the fix fail its condition (reported as skipped) instead of undoing it.
//! Memory: the room's member items, and one entry per connection the log says is a member
//! (plus the departures of connections that have member items), never the events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use aws_sdk_dynamodb::Client;
use chat_shared::events::ChatEvent;
use chat_shared::keys;
use chat_shared::store::epoch_secs;
use chat_shared::store::items::{ClaimItem, ConnItem, CounterItem, MemberItem};
use chat_shared::validation::name_key;
use indicatif::ProgressBar;
use serde::Serialize;
use tracing::info;

use crate::aws::classify;
use crate::error::ReplayError;
use crate::log::{Entry, EventLog, Expired};
use crate::range::EventFilter;

/// BatchGetItem's most keys per request.
const BATCH_GET_MAX_KEYS: usize = 100;

/// One way the tables differ from the room's log, and what `--apply` does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Drift {
    /// (1) The room's counter is missing or below the highest event id.
    /// Fix: set it to that id (only if it is still below).
    CounterBehind { found: Option<u64>, expected: u64 },
    /// (2) A live connection the log says is a member of the room has no member item there
    /// (`item_missing`) or no entry for the room in its `rooms` (`entry_missing`).
    /// Fix: put the member item in `shard` (the one its `rooms` entry names, else the room's
    /// shard for it now) and the entry, live until the connection expires (`expires_at`, the
    /// connection's; the item's TTL is a grace later, as the chat writes it), carrying the
    /// connection's `batch` opt-in as the chat's own writes of the item do, so a batched
    /// client stays batched.
    MemberMissing {
        connection_id: String,
        name: String,
        shard: u32,
        expires_at: i64,
        item_missing: bool,
        entry_missing: bool,
        /// The connection opted in to batched frames (its `CONN#` item's `batch`).
        batch: bool,
    },
    /// (3) A member item whose name differs from the log. Fix: set it from the log.
    MemberNameDiffers {
        connection_id: String,
        shard: u32,
        found: String,
        expected: String,
    },
    /// (4) A member item of a connection the log says has left the room (or never joined it).
    /// Fix: delete it, and the room from the connection's `rooms`.
    LeftButPresent {
        connection_id: String,
        shard: u32,
        name: String,
    },
    /// (5) A member item whose connection is gone (no live `CONN#` item): a ghost the fan-out
    /// would keep posting to. Fix: delete it.
    OrphanMember {
        connection_id: String,
        shard: u32,
        name: String,
    },
    /// (6) A member's live `CONN#` item has another `name`/`nameKey` than the log's.
    /// Fix: set them from the log.
    NameDiffers {
        connection_id: String,
        found: Option<String>,
        found_key: Option<String>,
        expected: String,
    },
    /// (7) A member's `NAME#` claim is missing (`found_owner: None`), held by another
    /// connection, or only an identity's reservation (`found_reservation`). Fix: put the
    /// claim, expiring with the member's connection and bound to its identity (if any), so an
    /// authenticated member can still take its name back.
    ClaimMissing {
        connection_id: String,
        name: String,
        name_key: String,
        expires_at: i64,
        found_owner: Option<String>,
        found_reservation: bool,
        identity: Option<String>,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Drift::CounterBehind { found, expected } => match found {
                Some(found) => write!(f, "the room's counter is {found}, below the highest event id {expected}"),
                None => write!(f, "the room's counter is missing; the highest event id is {expected}"),
            },
            Drift::MemberMissing {
                connection_id,
                name,
                item_missing,
                entry_missing,
                ..
            } => {
                let what = match (item_missing, entry_missing) {
                    (true, true) => "no member item and no rooms entry",
                    (true, false) => "no member item",
                    _ => "no rooms entry",
                };
                write!(f, "member {connection_id} ({name:?}) per the log has {what}")
            }
            Drift::MemberNameDiffers {
                connection_id,
                found,
                expected,
                ..
            } => write!(
                f,
                "member item of {connection_id} says {found:?}, the log says {expected:?}"
            ),
            Drift::LeftButPresent {
                connection_id,
                name,
                ..
            } => write!(
                f,
                "member item of {connection_id} ({name:?}) is present but the log says it is not a member"
            ),
            Drift::OrphanMember {
                connection_id,
                name,
                ..
            } => write!(
                f,
                "member item of {connection_id} ({name:?}) has no live connection"
            ),
            Drift::NameDiffers {
                connection_id,
                found,
                expected,
                ..
            } => write!(
                f,
                "CONN#{connection_id} has {}, the log says {expected:?}",
                found
                    .as_deref()
                    .map_or("no name".to_owned(), |n| format!("{n:?}"))
            ),
            Drift::ClaimMissing {
                connection_id,
                name,
                name_key,
                found_owner,
                found_reservation,
                ..
            } => match found_owner {
                None if *found_reservation => write!(
                    f,
                    "NAME#{name_key} is only a reservation, not held by member {connection_id} ({name:?})"
                ),
                None => write!(f, "NAME#{name_key} is missing for member {connection_id} ({name:?})"),
                Some(owner) => write!(
                    f,
                    "NAME#{name_key} points to {owner}, not to member {connection_id} ({name:?})"
                ),
            },
        }
    }
}

/// A member per the log without a live `CONN#` item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberRef {
    pub connection_id: String,
    pub name: String,
}

/// What applying one fix did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    Fixed,
    /// The item changed since it was read (its condition failed): nothing was written.
    Skipped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriftEntry {
    #[serde(flatten)]
    pub drift: Drift,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}

/// The drift report (`--json` prints it as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    pub room: String,
    /// Event items read (including expired ones not yet deleted).
    pub events_read: u64,
    pub max_event_id: u64,
    pub drift: Vec<DriftEntry>,
    pub members_without_connection: Vec<MemberRef>,
    /// Members whose connection has a rename in progress (its `renaming` marker): their names
    /// are not compared, because the chat completes the rename at their next `setName`.
    pub renames_pending: Vec<String>,
    /// Members the log does not list but whose member item and connection's `rooms` entry
    /// agree: joined unsequenced (a large room, or a contended counter). Not drift.
    pub unsequenced_members: usize,
    /// Members per the log with neither a member item nor a `rooms` entry, in a large room:
    /// left unsequenced (a disconnect whose connection item was not removed yet). Not drift.
    pub unsequenced_leaves: usize,
    /// Whether fixes were attempted (`--apply`).
    pub applied: bool,
    pub fixed: usize,
    pub skipped: usize,
}

impl RebuildReport {
    pub fn drifts(&self) -> Vec<&Drift> {
        self.drift.iter().map(|d| &d.drift).collect()
    }
}

impl fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "room {}: {} events read, highest id {}",
            self.room, self.events_read, self.max_event_id
        )?;
        if self.drift.is_empty() {
            writeln!(f, "no drift: the connections table matches the log")?;
        } else {
            writeln!(f, "drift ({}):", self.drift.len())?;
            for entry in &self.drift {
                match &entry.outcome {
                    None => writeln!(f, "  {}", entry.drift)?,
                    Some(Outcome::Fixed) => writeln!(f, "  fixed: {}", entry.drift)?,
                    Some(Outcome::Skipped) => {
                        writeln!(f, "  skipped (changed since read): {}", entry.drift)?
                    }
                }
            }
        }
        if !self.members_without_connection.is_empty() {
            writeln!(
                f,
                "members without a connection ({}), reported only (no MemberLeft is recorded):",
                self.members_without_connection.len()
            )?;
            for m in &self.members_without_connection {
                writeln!(f, "  {} ({:?})", m.connection_id, m.name)?;
            }
        }
        if self.unsequenced_members > 0 || self.unsequenced_leaves > 0 {
            writeln!(
                f,
                "unsequenced (no event, not drift): {} members joined, {} left",
                self.unsequenced_members, self.unsequenced_leaves
            )?;
        }
        if !self.renames_pending.is_empty() {
            writeln!(
                f,
                "renames in progress ({}), left to the chat (completed at the connection's next setName): {}",
                self.renames_pending.len(),
                self.renames_pending.join(", ")
            )?;
        }
        if self.applied {
            writeln!(f, "applied: {} fixed, {} skipped", self.fixed, self.skipped)
        } else if self.drift.is_empty() {
            Ok(())
        } else {
            writeln!(
                f,
                "dry run: nothing was changed; run with --apply to fix {} drift(s)",
                self.drift.len()
            )
        }
    }
}

/// One room's state in the two tables: its counter in the events table, its members, their
/// connections and their name claims in the connections table.
#[derive(Debug, Clone)]
pub struct ConnectionsTable {
    client: Client,
    table: String,
    events_table: String,
    room: String,
    at: String,
}

/// A member item as read, with the shard it is in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Membership {
    shard: u32,
    item: MemberItem,
}

/// The live state of one room, as read.
#[derive(Debug, Default)]
struct Snapshot {
    /// The counter's `last` (`None`: no counter item), and its shard count.
    counter: Option<u64>,
    shards: u32,
    /// The counter's `large`: joins and disconnects are unsequenced.
    large: bool,
    /// Member items by connection id.
    members: BTreeMap<String, Membership>,
    /// Live connection items of the members and of the log's members, by connection id.
    conns: BTreeMap<String, ConnItem>,
    /// Live claims of the names those members hold per the log, by name key.
    claims: BTreeMap<String, ClaimItem>,
}

/// What the log says about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Member(String),
    Left,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

type Key = HashMap<String, AttributeValue>;

fn key(pk: String, sk: String) -> Key {
    HashMap::from([(keys::PK.to_owned(), s(pk)), (keys::SK.to_owned(), s(sk))])
}

fn conn_key(connection_id: &str) -> Key {
    key(keys::conn_pk(connection_id), keys::CONN_SK.to_owned())
}

fn claim_key(name_key: &str) -> Key {
    key(keys::name_pk(name_key), keys::NAME_SK.to_owned())
}

fn member_key(room: &str, shard: u32, connection_id: &str) -> Key {
    key(keys::members_pk(room, shard), connection_id.to_owned())
}

impl ConnectionsTable {
    pub fn new(client: Client, table: &str, events_table: &str, room: &str, at: &str) -> Self {
        ConnectionsTable {
            client,
            table: table.to_owned(),
            events_table: events_table.to_owned(),
            room: room.to_owned(),
            at: at.to_owned(),
        }
    }

    pub async fn ensure_exists(&self) -> Result<(), ReplayError> {
        crate::aws::ensure_table(&self.client, &self.table, &self.at).await
    }

    fn malformed(what: String) -> impl Fn(serde_dynamo::Error) -> ReplayError {
        move |e| ReplayError::MalformedState {
            sk: what.clone(),
            detail: e.to_string(),
        }
    }

    /// The room's counter (`None` if it has none) and its shard count.
    async fn counter(&self) -> Result<(Option<u64>, u32, bool), ReplayError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.events_table)
            .key(keys::PK, s(keys::room_pk(&self.room)))
            .key(keys::SEQ, n(keys::COUNTER_SEQ))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify(e, "GetItem counter", &self.events_table, &self.at))?;
        match out.item {
            None => Ok((None, 1, false)),
            Some(item) => {
                let counter: CounterItem = serde_dynamo::from_item(item)
                    .map_err(Self::malformed(keys::room_pk(&self.room)))?;
                Ok((Some(counter.last), counter.shards(), counter.large()))
            }
        }
    }

    /// Every live member item of the room, shard by shard. Items past their `liveUntil` (the
    /// connection's expiry) are left out: every read of the chat treats them as absent, and
    /// DynamoDB's TTL removes them a grace later.
    async fn member_items(
        &self,
        shards: u32,
        now_s: i64,
    ) -> Result<BTreeMap<String, Membership>, ReplayError> {
        let mut members = BTreeMap::new();
        for shard in 0..shards {
            let pk = keys::members_pk(&self.room, shard);
            let mut start = None;
            loop {
                let out = self
                    .client
                    .query()
                    .table_name(&self.table)
                    .key_condition_expression("#pk = :pk")
                    .expression_attribute_names("#pk", keys::PK)
                    .expression_attribute_values(":pk", s(&pk))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.take())
                    .send()
                    .await
                    .map_err(|e| classify(e, "Query members", &self.table, &self.at))?;
                for item in out.items.unwrap_or_default() {
                    let item: MemberItem =
                        serde_dynamo::from_item(item).map_err(Self::malformed(pk.clone()))?;
                    if item.is_live(now_s) {
                        members.insert(item.connection_id.clone(), Membership { shard, item });
                    }
                }
                match out.last_evaluated_key {
                    Some(key) => start = Some(key),
                    None => break,
                }
            }
        }
        Ok(members)
    }

    /// The items of `keys` that exist, read strongly consistent, 100 keys per request.
    async fn batch_get(&self, all: Vec<Key>) -> Result<Vec<Key>, ReplayError> {
        let mut found = Vec::new();
        for chunk in all.chunks(BATCH_GET_MAX_KEYS) {
            let mut pending = Some(
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk.to_vec()))
                    .consistent_read(true)
                    .build()
                    .map_err(|e| ReplayError::Usage(e.to_string()))?,
            );
            while let Some(request) = pending.take() {
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.table, request)
                    .send()
                    .await
                    .map_err(|e| classify(e, "BatchGetItem", &self.table, &self.at))?;
                if let Some(mut items) = out.responses {
                    found.extend(items.remove(&self.table).unwrap_or_default());
                }
                // Keys DynamoDB did not get to (throttling, 16 MB): ask again.
                pending = out
                    .unprocessed_keys
                    .and_then(|mut u| u.remove(&self.table))
                    .filter(|k| !k.keys.is_empty());
            }
        }
        Ok(found)
    }

    async fn connections(
        &self,
        ids: &BTreeSet<&str>,
        now_s: i64,
    ) -> Result<BTreeMap<String, ConnItem>, ReplayError> {
        let items = self
            .batch_get(ids.iter().map(|id| conn_key(id)).collect())
            .await?;
        let mut conns = BTreeMap::new();
        for item in items {
            let conn: ConnItem =
                serde_dynamo::from_item(item).map_err(Self::malformed("CONN#".into()))?;
            if conn.expires_at > now_s {
                conns.insert(conn.connection_id.clone(), conn);
            }
        }
        Ok(conns)
    }

    async fn claims(
        &self,
        name_keys: &BTreeSet<String>,
        now_s: i64,
    ) -> Result<BTreeMap<String, ClaimItem>, ReplayError> {
        let mut claims = BTreeMap::new();
        for item in self
            .batch_get(name_keys.iter().map(|k| claim_key(k)).collect())
            .await?
        {
            let Some(AttributeValue::S(pk)) = item.get(keys::PK).cloned() else {
                continue;
            };
            let name_key = pk
                .strip_prefix(&keys::name_pk(""))
                .unwrap_or(&pk)
                .to_owned();
            let claim: ClaimItem =
                serde_dynamo::from_item(item).map_err(Self::malformed(pk.clone()))?;
            if claim.expires_at > now_s {
                claims.insert(name_key, claim);
            }
        }
        Ok(claims)
    }

    /// Writes the fix for one drift, conditional on the items still being as they were read.
    async fn fix(&self, drift: &Drift, now_ms: i64) -> Result<Outcome, ReplayError> {
        let applied = match drift {
            Drift::CounterBehind { expected, .. } => {
                let r = self
                    .client
                    .update_item()
                    .table_name(&self.events_table)
                    .key(keys::PK, s(keys::room_pk(&self.room)))
                    .key(keys::SEQ, n(keys::COUNTER_SEQ))
                    .update_expression("SET #last = :max, #type = :type")
                    // Never move the counter back: a writer may have moved it past meanwhile.
                    .condition_expression("attribute_not_exists(#last) OR #last < :max")
                    .expression_attribute_names("#last", keys::COUNTER_LAST)
                    .expression_attribute_names("#type", keys::TYPE)
                    .expression_attribute_values(":max", n(expected))
                    .expression_attribute_values(":type", s(keys::COUNTER_TYPE))
                    .send()
                    .await;
                self.conditional(r, "UpdateItem counter")?
            }
            Drift::MemberMissing {
                connection_id,
                name,
                shard,
                expires_at,
                batch,
                ..
            } => {
                // The connection first, on the condition that it is still there: a member item
                // is never written for a connection that has gone.
                let r = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(conn_key(connection_id)))
                    .update_expression("SET #rooms.#room = :shard")
                    .condition_expression("attribute_exists(#pk) AND attribute_exists(#rooms)")
                    .expression_attribute_names("#pk", keys::PK)
                    .expression_attribute_names("#rooms", keys::ROOMS)
                    .expression_attribute_names("#room", &self.room)
                    .expression_attribute_values(":shard", n(shard))
                    .send()
                    .await;
                let entry = match self.conditional(r, "UpdateItem connection rooms")? {
                    true => true,
                    // No `rooms` map at all yet: create it, still only if the connection exists.
                    false => {
                        let r = self
                            .client
                            .update_item()
                            .table_name(&self.table)
                            .set_key(Some(conn_key(connection_id)))
                            .update_expression("SET #rooms = :rooms")
                            .condition_expression(
                                "attribute_exists(#pk) AND attribute_not_exists(#rooms)",
                            )
                            .expression_attribute_names("#pk", keys::PK)
                            .expression_attribute_names("#rooms", keys::ROOMS)
                            .expression_attribute_values(
                                ":rooms",
                                AttributeValue::M(HashMap::from([(self.room.clone(), n(shard))])),
                            )
                            .send()
                            .await;
                        self.conditional(r, "UpdateItem connection rooms")?
                    }
                };
                if entry {
                    let item = MemberItem {
                        // The fan-out reads the opt-in from the member item only: without it
                        // a batched client would get unbatched frames until it rejoins.
                        batch: batch.then_some(true),
                        ..MemberItem::new(connection_id.clone(), name.clone(), *expires_at)
                    };
                    let mut item: Key = serde_dynamo::to_item(item)
                        .map_err(Self::malformed(connection_id.clone()))?;
                    item.extend(member_key(&self.room, *shard, connection_id));
                    let r = self
                        .client
                        .put_item()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .condition_expression("attribute_not_exists(#pk) OR #name = :name")
                        .expression_attribute_names("#pk", keys::PK)
                        .expression_attribute_names("#name", keys::NAME)
                        .expression_attribute_values(":name", s(name))
                        .send()
                        .await;
                    self.conditional(r, "PutItem member")?
                } else {
                    false
                }
            }
            Drift::MemberNameDiffers {
                connection_id,
                shard,
                found,
                expected,
            } => {
                let r = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(member_key(&self.room, *shard, connection_id)))
                    .update_expression("SET #name = :name")
                    .condition_expression("#name = :found")
                    .expression_attribute_names("#name", keys::NAME)
                    .expression_attribute_values(":name", s(expected))
                    .expression_attribute_values(":found", s(found))
                    .send()
                    .await;
                self.conditional(r, "UpdateItem member")?
            }
            Drift::LeftButPresent {
                connection_id,
                shard,
                name,
            }
            | Drift::OrphanMember {
                connection_id,
                shard,
                name,
            } => {
                let r = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(member_key(&self.room, *shard, connection_id)))
                    .condition_expression("#name = :name")
                    .expression_attribute_names("#name", keys::NAME)
                    .expression_attribute_values(":name", s(name))
                    .send()
                    .await;
                let deleted = self.conditional(r, "DeleteItem member")?;
                if deleted && matches!(drift, Drift::LeftButPresent { .. }) {
                    // Its connection, if still there, must not list the room any more.
                    let r = self
                        .client
                        .update_item()
                        .table_name(&self.table)
                        .set_key(Some(conn_key(connection_id)))
                        .update_expression("REMOVE #rooms.#room")
                        .condition_expression("attribute_exists(#pk)")
                        .expression_attribute_names("#pk", keys::PK)
                        .expression_attribute_names("#rooms", keys::ROOMS)
                        .expression_attribute_names("#room", &self.room)
                        .send()
                        .await;
                    self.conditional(r, "UpdateItem connection rooms")?;
                }
                deleted
            }
            Drift::NameDiffers {
                connection_id,
                found,
                expected,
                ..
            } => {
                let (unchanged, found_value) = match found {
                    Some(found) => ("attribute_exists(#pk) AND #name = :found", Some(s(found))),
                    None => (
                        "attribute_exists(#pk) AND attribute_not_exists(#name)",
                        None,
                    ),
                };
                let mut req = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(conn_key(connection_id)))
                    .condition_expression(unchanged)
                    .update_expression("SET #name = :name, #nkey = :nkey")
                    .expression_attribute_names("#pk", keys::PK)
                    .expression_attribute_names("#name", keys::NAME)
                    .expression_attribute_names("#nkey", keys::NAME_KEY)
                    .expression_attribute_values(":name", s(expected))
                    .expression_attribute_values(":nkey", s(name_key(expected)));
                if let Some(v) = found_value {
                    req = req.expression_attribute_values(":found", v);
                }
                self.conditional(req.send().await, "UpdateItem connection")?
            }
            Drift::ClaimMissing {
                connection_id,
                name,
                name_key,
                expires_at,
                found_owner,
                found_reservation,
                identity,
            } => {
                let mut item = claim_key(name_key);
                item.insert(keys::CONNECTION_ID.into(), s(connection_id));
                item.insert(keys::NAME.into(), s(name));
                item.insert(keys::EXPIRES_AT.into(), n(expires_at));
                // Bound to the member's identity, as the chat writes it: without it the member
                // could not take its own name back from a stale connection.
                if let Some(identity) = identity {
                    item.insert(keys::IDENTITY.into(), s(identity));
                }
                let mut req = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(item));
                req = match found_owner {
                    // Still only a reservation (nobody took the name meanwhile).
                    None if *found_reservation => req
                        .condition_expression(
                            "attribute_exists(#pk) AND attribute_not_exists(#conn)",
                        )
                        .expression_attribute_names("#pk", keys::PK)
                        .expression_attribute_names("#conn", keys::CONNECTION_ID),
                    None => req
                        .condition_expression("attribute_not_exists(#pk) OR #exp <= :now")
                        .expression_attribute_names("#pk", keys::PK)
                        .expression_attribute_names("#exp", keys::EXPIRES_AT)
                        .expression_attribute_values(":now", n(epoch_secs(now_ms))),
                    Some(owner) => req
                        .condition_expression("#conn = :owner")
                        .expression_attribute_names("#conn", keys::CONNECTION_ID)
                        .expression_attribute_values(":owner", s(owner)),
                };
                self.conditional(req.send().await, "PutItem name claim")?
            }
        };
        Ok(if applied {
            Outcome::Fixed
        } else {
            Outcome::Skipped
        })
    }

    /// `Ok(true)` when written, `Ok(false)` when the condition failed.
    fn conditional<T, E, R>(
        &self,
        r: Result<T, SdkError<E, R>>,
        op: &'static str,
    ) -> Result<bool, ReplayError>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(classify(e, op, &self.table, &self.at)),
        }
    }
}

/// What the log says, folded in id order.
struct Derived {
    room: String,
    events_read: u64,
    max_id: u64,
    seen: HashMap<String, Seen>,
}

async fn derive(
    log: &EventLog,
    keep_departures_of: &BTreeSet<&str>,
    now_ms: i64,
    progress: &ProgressBar,
) -> Result<Derived, ReplayError> {
    let mut derived = Derived {
        room: log.room().to_owned(),
        events_read: 0,
        max_id: 0,
        seen: HashMap::new(),
    };
    // Expired events still hold their ids (a new event cannot be put over them) and are still
    // facts about who joined and left.
    let mut pages = log.pages(&EventFilter::all(), Expired::Include, now_ms);
    while let Some(page) = pages.next().await {
        for entry in page? {
            let event = match entry {
                Entry::Event(event) => event,
                // Skipping it could turn a leave into a drift "fix" that resurrects a member.
                Entry::Malformed { seq, detail } => {
                    return Err(ReplayError::MalformedEvent { seq, detail })
                }
            };
            derived.events_read += 1;
            derived.max_id = derived.max_id.max(event.seq);
            match event.event {
                ChatEvent::MemberJoined {
                    connection_id,
                    name,
                }
                | ChatEvent::MemberRenamed {
                    connection_id,
                    name,
                    ..
                } => {
                    derived.seen.insert(connection_id, Seen::Member(name));
                }
                ChatEvent::MemberLeft { connection_id, .. } => {
                    // A departure only matters if the table still has something of it; forgetting
                    // the others keeps memory at the members of now, not everyone ever.
                    if keep_departures_of.contains(connection_id.as_str()) {
                        derived.seen.insert(connection_id, Seen::Left);
                    } else {
                        derived.seen.remove(&connection_id);
                    }
                }
                ChatEvent::MessagePosted { .. } | ChatEvent::PrivateMessageSent { .. } => {}
            }
            progress.inc(1);
        }
    }
    Ok(derived)
}

/// Whether the member item `m` (of a connection the log does not list as a member) is an
/// unsequenced member: its connection's `rooms` names the room with the item's shard.
fn is_unsequenced_member(conn: &ConnItem, derived: &Derived, m: &Membership) -> bool {
    conn.shard_in(&derived.room) == Some(m.shard)
}

/// (unsequenced members, unsequenced leaves) of a snapshot, as [`compare`] leaves them out.
fn unsequenced(snapshot: &Snapshot, derived: &Derived) -> (usize, usize) {
    let members = snapshot
        .members
        .iter()
        .filter(|(id, m)| {
            !matches!(derived.seen.get(*id), Some(Seen::Member(_)))
                && snapshot
                    .conns
                    .get(*id)
                    .is_some_and(|c| is_unsequenced_member(c, derived, m))
        })
        .count();
    let leaves = if snapshot.large {
        derived
            .seen
            .iter()
            .filter(|(id, seen)| {
                matches!(seen, Seen::Member(_))
                    && !snapshot.members.contains_key(*id)
                    && snapshot
                        .conns
                        .get(*id)
                        .is_some_and(|c| c.shard_in(&derived.room).is_none())
            })
            .count()
    } else {
        0
    };
    (members, leaves)
}

/// The drift between a snapshot and what the log says, in a stable order, the members without
/// a connection, and the members with a rename in progress (left to the chat).
fn compare(snapshot: &Snapshot, derived: &Derived) -> (Vec<Drift>, Vec<MemberRef>, Vec<String>) {
    let mut drift = Vec::new();
    if snapshot.counter.unwrap_or(0) < derived.max_id {
        drift.push(Drift::CounterBehind {
            found: snapshot.counter,
            expected: derived.max_id,
        });
    }
    // Member items the log does not back, and ghosts.
    for (id, m) in &snapshot.members {
        let conn = snapshot.conns.get(id);
        match (derived.seen.get(id), conn) {
            (Some(Seen::Member(name)), Some(conn)) => {
                if m.item.name != *name && conn.renaming.is_none() {
                    drift.push(Drift::MemberNameDiffers {
                        connection_id: id.clone(),
                        shard: m.shard,
                        found: m.item.name.clone(),
                        expected: name.clone(),
                    });
                }
            }
            (Some(Seen::Member(_)), None) => drift.push(Drift::OrphanMember {
                connection_id: id.clone(),
                shard: m.shard,
                name: m.item.name.clone(),
            }),
            // Joined unsequenced: the item and the connection's entry agree.
            (Some(Seen::Left) | None, Some(conn)) if is_unsequenced_member(conn, derived, m) => {}
            (Some(Seen::Left) | None, _) => drift.push(Drift::LeftButPresent {
                connection_id: id.clone(),
                shard: m.shard,
                name: m.item.name.clone(),
            }),
        }
    }
    // The log's members: their item, their connection's name and their claim.
    let mut members: Vec<(&String, &String)> = derived
        .seen
        .iter()
        .filter_map(|(id, seen)| match seen {
            Seen::Member(name) => Some((id, name)),
            Seen::Left => None,
        })
        .collect();
    members.sort();
    let mut without = Vec::new();
    let mut pending = Vec::new();
    let mut claim_drift = Vec::new();
    for (id, name) in members {
        let Some(conn) = snapshot.conns.get(id) else {
            without.push(MemberRef {
                connection_id: id.clone(),
                name: name.clone(),
            });
            continue;
        };
        let item = snapshot.members.get(id);
        let entry = conn.shard_in(&derived.room);
        if item.is_none() && entry.is_none() && snapshot.large {
            // Left a large room unsequenced (no MemberLeft): not a member any more.
            continue;
        }
        if item.is_none() || entry.is_none() {
            drift.push(Drift::MemberMissing {
                connection_id: id.clone(),
                name: name.clone(),
                shard: item
                    .map(|m| m.shard)
                    .or(entry)
                    .unwrap_or_else(|| keys::member_shard(id, snapshot.shards)),
                expires_at: conn.expires_at,
                item_missing: item.is_none(),
                entry_missing: entry.is_none(),
                batch: conn.batch.unwrap_or(false),
            });
        }
        if conn.renaming.is_some() {
            // A rename in progress: rooms it has not reached yet still know the old name (and
            // the claim has moved to the new one). The chat completes it at the connection's
            // next setName; "fixing" the name or the claim from this room's log would undo it.
            pending.push(id.clone());
            continue;
        }
        let key = name_key(name);
        if conn.name.as_deref() != Some(name.as_str())
            || conn.name_key.as_deref() != Some(key.as_str())
        {
            drift.push(Drift::NameDiffers {
                connection_id: id.clone(),
                found: conn.name.clone(),
                found_key: conn.name_key.clone(),
                expected: name.clone(),
            });
        }
        let found = snapshot.claims.get(&key);
        let owner = found.and_then(|c| c.connection_id.clone());
        if owner.as_deref() != Some(id.as_str()) {
            claim_drift.push(Drift::ClaimMissing {
                connection_id: id.clone(),
                name: name.clone(),
                name_key: key,
                expires_at: conn.expires_at,
                found_owner: owner,
                found_reservation: found.is_some_and(ClaimItem::is_reservation),
                identity: conn.identity.clone(),
            });
        }
    }
    drift.extend(claim_drift);
    (drift, without, pending)
}

/// Compares the room's state with its log and, with `apply`, fixes each drift.
pub async fn rebuild(
    log: &EventLog,
    tables: &ConnectionsTable,
    apply: bool,
    now_ms: i64,
    progress: &ProgressBar,
) -> Result<RebuildReport, ReplayError> {
    let now_s = epoch_secs(now_ms);
    let (counter, shards, large) = tables.counter().await?;
    let members = tables.member_items(shards, now_s).await?;
    let keep: BTreeSet<&str> = members.keys().map(String::as_str).collect();
    let derived = derive(log, &keep, now_ms, progress).await?;
    let ids: BTreeSet<&str> = keep
        .iter()
        .copied()
        .chain(derived.seen.iter().filter_map(|(id, seen)| match seen {
            Seen::Member(_) => Some(id.as_str()),
            Seen::Left => None,
        }))
        .collect();
    let conns = tables.connections(&ids, now_s).await?;
    let name_keys: BTreeSet<String> = derived
        .seen
        .values()
        .filter_map(|seen| match seen {
            Seen::Member(name) => Some(name_key(name)),
            Seen::Left => None,
        })
        .collect();
    let claims = tables.claims(&name_keys, now_s).await?;
    let snapshot = Snapshot {
        counter,
        shards,
        large,
        members,
        conns,
        claims,
    };
    let (drift, members_without_connection, renames_pending) = compare(&snapshot, &derived);
    let (unsequenced_members, unsequenced_leaves) = unsequenced(&snapshot, &derived);
    let mut report = RebuildReport {
        room: log.room().to_owned(),
        events_read: derived.events_read,
        max_event_id: derived.max_id,
        drift: drift
            .into_iter()
            .map(|drift| DriftEntry {
                drift,
                outcome: None,
            })
            .collect(),
        members_without_connection,
        renames_pending,
        unsequenced_members,
        unsequenced_leaves,
        applied: apply,
        fixed: 0,
        skipped: 0,
    };
    if apply {
        for entry in &mut report.drift {
            let outcome = tables.fix(&entry.drift, now_ms).await?;
            info!(drift = %entry.drift, ?outcome, "applied");
            match outcome {
                Outcome::Fixed => report.fixed += 1,
                Outcome::Skipped => report.skipped += 1,
            }
            entry.outcome = Some(outcome);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(name: Option<&str>, rooms: &[(&str, u32)]) -> ConnItem {
        ConnItem {
            connection_id: "?".into(),
            connected_at: 0,
            expires_at: 100,
            name: name.map(str::to_owned),
            name_key: name.map(name_key),
            rl_tokens: None,
            rl_at: None,
            identity: None,
            principal: None,
            rooms: Some(rooms.iter().map(|(r, s)| ((*r).to_owned(), *s)).collect()),
            renaming: None,
            batch: None,
        }
    }

    fn member(id: &str, name: &str, shard: u32) -> (String, Membership) {
        (
            id.to_owned(),
            Membership {
                shard,
                item: MemberItem::new(id.to_owned(), name.to_owned(), 100),
            },
        )
    }

    fn claim(owner: &str) -> ClaimItem {
        ClaimItem {
            connection_id: Some(owner.to_owned()),
            identity: None,
            name: None,
            expires_at: 100,
        }
    }

    fn derived(seen: &[(&str, Seen)], max_id: u64) -> Derived {
        Derived {
            room: "r".into(),
            events_read: max_id,
            max_id,
            seen: seen
                .iter()
                .map(|(id, s)| ((*id).to_owned(), s.clone()))
                .collect(),
        }
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            counter: Some(3),
            shards: 1,
            ..Snapshot::default()
        }
    }

    #[test]
    fn a_claim_held_by_another_connection_is_retaken() {
        // GIVEN bob (B) is a member of r per the log and the tables, but NAME#bob points to X
        let snapshot = Snapshot {
            members: BTreeMap::from([member("B", "bob", 0)]),
            conns: BTreeMap::from([("B".to_owned(), conn(Some("bob"), &[("r", 0)]))]),
            claims: BTreeMap::from([("bob".to_owned(), claim("X"))]),
            ..snapshot()
        };
        let log = derived(&[("B", Seen::Member("bob".into()))], 3);

        // WHEN compared  THEN the one drift is B's claim pointing elsewhere
        let (drift, without, _) = compare(&snapshot, &log);
        assert_eq!(
            drift,
            vec![Drift::ClaimMissing {
                connection_id: "B".into(),
                name: "bob".into(),
                name_key: "bob".into(),
                expires_at: 100,
                found_owner: Some("X".into()),
                found_reservation: false,
                identity: None,
            }]
        );
        assert!(without.is_empty());
    }

    #[test]
    fn a_member_item_of_a_departed_connection_goes_and_a_ghost_goes() {
        // GIVEN C left r per the log but its member item is there (its connection's `rooms`
        // does not name r: with the entry, it would be an unsequenced re-join); G's item has
        // no connection
        let snapshot = Snapshot {
            members: BTreeMap::from([member("C", "carol", 0), member("G", "gus", 0)]),
            conns: BTreeMap::from([("C".to_owned(), conn(Some("carol"), &[]))]),
            ..snapshot()
        };
        let log = derived(&[("C", Seen::Left), ("G", Seen::Member("gus".into()))], 3);

        // WHEN compared  THEN C's item is left-but-present, G's an orphan; G is also a member
        // without a connection (reported)
        let (drift, without, _) = compare(&snapshot, &log);
        assert_eq!(
            drift,
            vec![
                Drift::LeftButPresent {
                    connection_id: "C".into(),
                    shard: 0,
                    name: "carol".into(),
                },
                Drift::OrphanMember {
                    connection_id: "G".into(),
                    shard: 0,
                    name: "gus".into(),
                },
            ]
        );
        assert_eq!(
            without,
            vec![MemberRef {
                connection_id: "G".into(),
                name: "gus".into()
            }]
        );
    }

    #[test]
    fn a_missing_member_item_is_put_back_in_the_shard_its_connection_names() {
        // GIVEN M is a member per the log, its connection lists r in shard 3, but no item;
        // the counter is missing
        let snapshot = Snapshot {
            counter: None,
            shards: 4,
            conns: BTreeMap::from([("M".to_owned(), conn(Some("meg"), &[("r", 3)]))]),
            claims: BTreeMap::from([("meg".to_owned(), claim("M"))]),
            ..Snapshot::default()
        };
        let log = derived(&[("M", Seen::Member("meg".into()))], 4);

        // WHEN compared  THEN the counter and the item drift
        let (drift, _, _) = compare(&snapshot, &log);
        assert_eq!(
            drift,
            vec![
                Drift::CounterBehind {
                    found: None,
                    expected: 4
                },
                Drift::MemberMissing {
                    connection_id: "M".into(),
                    name: "meg".into(),
                    shard: 3,
                    expires_at: 100,
                    item_missing: true,
                    entry_missing: false,
                    batch: false,
                },
            ]
        );
    }

    #[test]
    fn a_rename_in_progress_is_left_to_the_chat() {
        // GIVEN alice's connection is now "alicia" with a rename in progress, which has not
        // reached this room: its log, its member item and the old claim's absence say "alice"
        let mut renaming = conn(Some("alicia"), &[("r", 0)]);
        renaming.renaming = Some("alice".into());
        let snapshot = Snapshot {
            members: BTreeMap::from([member("A", "alice", 0)]),
            conns: BTreeMap::from([("A".to_owned(), renaming)]),
            claims: BTreeMap::from([("alicia".to_owned(), claim("A"))]),
            ..snapshot()
        };
        let log = derived(&[("A", Seen::Member("alice".into()))], 3);

        // WHEN compared  THEN nothing would move her name or claim back: she is reported as a
        // rename in progress instead
        let (drift, without, pending) = compare(&snapshot, &log);
        assert_eq!(drift, Vec::<Drift>::new());
        assert!(without.is_empty());
        assert_eq!(pending, ["A"]);
    }

    #[test]
    fn an_empty_room_has_no_drift() {
        let (drift, without, pending) = compare(&Snapshot::default(), &derived(&[], 0));
        assert!(drift.is_empty() && without.is_empty() && pending.is_empty());
    }
}
