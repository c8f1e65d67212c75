//! `rebuild`: derives what the connections table should hold from the event log, reports where
//! it differs (drift), and with `apply` fixes it.
//!
//! The log is the source of truth. From it: the room's sequence counter must be at least the
//! highest event id (or the next write would collide with an existing event and fail forever),
//! and each connection's current name is its last `MemberJoined`/`MemberRenamed` unless a
//! `MemberLeft` follows. Against that, the live (unexpired) items of the room's partition drift
//! in five ways, each with its fix (see [`Drift`]).
//!
//! Connections the log says are members but that have no live `CONN#` item (expired by TTL, or
//! deleted without an event) are reported as "members without a connection" and left alone:
//! recording their `MemberLeft` needs the store's append (counter and event in one transaction),
//! and `ChatStore::remove_connection` only does that for a connection it can still read.
//!
//! The connections table is read *before* the log. A change committed between the two reads is
//! then in the log but maybe not in the snapshot, so the fix moves the table towards the newer
//! truth; and every fix is a conditional write on the item as it was read, so a change the
//! snapshot missed makes the fix fail its condition (reported as skipped) instead of undoing it.
//! Memory: the snapshot of one room's connections, and one entry per connection the log says is
//! a member (plus the departures of connections in the snapshot), never the events.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use chat_shared::events::ChatEvent;
use chat_shared::keys::{self, CONN_PREFIX, NAME_PREFIX, SEQ_SK};
use chat_shared::store::epoch_secs;
use chat_shared::store::items::{ClaimItem, ConnItem, SeqItem};
use chat_shared::validation::name_key;
use indicatif::ProgressBar;
use serde::Serialize;
use tracing::{info, warn};

use crate::aws::classify;
use crate::error::ReplayError;
use crate::log::{Entry, EventLog, Expired};
use crate::range::EventFilter;

/// One way the connections table differs from the log, and what `--apply` does about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(
    tag = "kind",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum Drift {
    /// (1) The `SEQ` counter is missing or below the highest event id.
    /// Fix: set it to that id (only if it is still below).
    SeqBehind { found: Option<u64>, expected: u64 },
    /// (2) A live `CONN#` item's `name`/`nameKey` differ from the log (`expected: None`: the
    /// log says it never joined). Fix: set them from the log (or remove them).
    NameDiffers {
        connection_id: String,
        found: Option<String>,
        found_key: Option<String>,
        expected: Option<String>,
    },
    /// (3) A live `CONN#` item for a connection the log says has left.
    /// Fix: delete it, and its name claim if it still owns one (`owned_claim`, a name key).
    LeftButPresent {
        connection_id: String,
        name: Option<String>,
        owned_claim: Option<String>,
    },
    /// (4) A live member's `NAME#` claim is missing (`found_owner: None`), held by another
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
    /// (5) A live `NAME#` claim whose connection is not a live member with that name.
    /// Fix: delete it.
    OrphanClaim {
        name_key: String,
        connection_id: String,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: &Option<String>| {
            v.as_deref()
                .map_or("no name".to_owned(), |n| format!("{n:?}"))
        };
        match self {
            Drift::SeqBehind { found, expected } => match found {
                Some(found) => write!(f, "SEQ counter is {found}, below the highest event id {expected}"),
                None => write!(f, "SEQ counter is missing; the highest event id is {expected}"),
            },
            Drift::NameDiffers {
                connection_id,
                found,
                expected,
                ..
            } => write!(
                f,
                "CONN#{connection_id} has {}, the log says {}",
                or_none(found),
                or_none(expected)
            ),
            Drift::LeftButPresent {
                connection_id,
                name,
                owned_claim,
            } => {
                write!(f, "CONN#{connection_id} ({}) is present but the log says it left", or_none(name))?;
                if let Some(claim) = owned_claim {
                    write!(f, "; it still holds NAME#{claim}")?;
                }
                Ok(())
            }
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
            Drift::OrphanClaim {
                name_key,
                connection_id,
            } => write!(
                f,
                "NAME#{name_key} is held by {connection_id}, which is not a live member with that name"
            ),
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

/// One room's partition of the connections table.
#[derive(Debug, Clone)]
pub struct ConnectionsTable {
    client: Client,
    table: String,
    room_pk: String,
    at: String,
}

/// The live items of one room's partition, keyed by connection id and by name key.
#[derive(Debug, Default)]
struct Snapshot {
    seq: Option<u64>,
    conns: BTreeMap<String, ConnItem>,
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

impl ConnectionsTable {
    pub fn new(client: Client, table: &str, room: &str, at: &str) -> Self {
        ConnectionsTable {
            client,
            table: table.to_owned(),
            room_pk: keys::room_pk(room),
            at: at.to_owned(),
        }
    }

    pub async fn ensure_exists(&self) -> Result<(), ReplayError> {
        crate::aws::ensure_table(&self.client, &self.table, &self.at).await
    }

    fn key(&self, sk: String) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (keys::PK.to_owned(), s(&self.room_pk)),
            (keys::SK.to_owned(), s(sk)),
        ])
    }

    /// Every live item of the room's partition. Expired items are left out: every read of the
    /// chat treats them as absent, and DynamoDB's TTL removes them.
    async fn snapshot(&self, now_ms: i64) -> Result<Snapshot, ReplayError> {
        let now_s = epoch_secs(now_ms);
        let mut snapshot = Snapshot::default();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", keys::PK)
                .expression_attribute_values(":pk", s(&self.room_pk))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| classify(e, "Query", &self.table, &self.at))?;
            for item in out.items.unwrap_or_default() {
                let sk = match item.get(keys::SK) {
                    Some(AttributeValue::S(sk)) => sk.clone(),
                    _ => {
                        return Err(ReplayError::MalformedState {
                            sk: "?".into(),
                            detail: "no string sort key".into(),
                        })
                    }
                };
                let malformed = |e: serde_dynamo::Error| ReplayError::MalformedState {
                    sk: sk.clone(),
                    detail: e.to_string(),
                };
                if sk == SEQ_SK {
                    let seq: SeqItem = serde_dynamo::from_item(item).map_err(malformed)?;
                    snapshot.seq = Some(seq.seq);
                } else if let Some(id) = sk.strip_prefix(CONN_PREFIX) {
                    let conn: ConnItem = serde_dynamo::from_item(item).map_err(malformed)?;
                    if conn.expires_at > now_s {
                        snapshot.conns.insert(id.to_owned(), conn);
                    }
                } else if let Some(key) = sk.strip_prefix(NAME_PREFIX) {
                    let claim: ClaimItem = serde_dynamo::from_item(item).map_err(malformed)?;
                    if claim.expires_at > now_s {
                        snapshot.claims.insert(key.to_owned(), claim);
                    }
                } else {
                    warn!(sk, "ignoring an item the chat does not write");
                }
            }
            match out.last_evaluated_key {
                Some(key) => start = Some(key),
                None => return Ok(snapshot),
            }
        }
    }

    /// Writes the fix for one drift, conditional on the item still being as it was read.
    async fn fix(&self, drift: &Drift, now_ms: i64) -> Result<Outcome, ReplayError> {
        let applied = match drift {
            Drift::SeqBehind { expected, .. } => {
                let r = self
                    .client
                    .update_item()
                    .table_name(&self.table)
                    .set_key(Some(self.key(SEQ_SK.to_owned())))
                    .update_expression("SET #seq = :max")
                    // Never move the counter back: a writer may have moved it past meanwhile.
                    .condition_expression("attribute_not_exists(#seq) OR #seq < :max")
                    .expression_attribute_names("#seq", keys::SEQ)
                    .expression_attribute_values(":max", n(expected))
                    .send()
                    .await;
                self.conditional(r, "UpdateItem SEQ")?
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
                    .set_key(Some(self.key(keys::conn_sk(connection_id))))
                    .condition_expression(unchanged)
                    .expression_attribute_names("#pk", keys::PK)
                    .expression_attribute_names("#name", keys::NAME)
                    .expression_attribute_names("#nkey", keys::NAME_KEY);
                if let Some(v) = found_value {
                    req = req.expression_attribute_values(":found", v);
                }
                req = match expected {
                    Some(name) => req
                        .update_expression("SET #name = :name, #nkey = :nkey")
                        .expression_attribute_values(":name", s(name))
                        .expression_attribute_values(":nkey", s(name_key(name))),
                    None => req.update_expression("REMOVE #name, #nkey"),
                };
                self.conditional(req.send().await, "UpdateItem connection")?
            }
            Drift::LeftButPresent {
                connection_id,
                owned_claim,
                ..
            } => {
                let r = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(self.key(keys::conn_sk(connection_id))))
                    .condition_expression("attribute_exists(#pk)")
                    .expression_attribute_names("#pk", keys::PK)
                    .send()
                    .await;
                let deleted = self.conditional(r, "DeleteItem connection")?;
                if let Some(claim) = owned_claim {
                    self.delete_claim(claim, connection_id).await?;
                }
                deleted
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
                let mut item = self.key(keys::name_sk(name_key));
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
            Drift::OrphanClaim {
                name_key,
                connection_id,
            } => self.delete_claim(name_key, connection_id).await?,
        };
        Ok(if applied {
            Outcome::Fixed
        } else {
            Outcome::Skipped
        })
    }

    /// Deletes a claim if `owner` still holds it.
    async fn delete_claim(&self, key: &str, owner: &str) -> Result<bool, ReplayError> {
        let r = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(self.key(keys::name_sk(key))))
            .condition_expression("#conn = :owner")
            .expression_attribute_names("#conn", keys::CONNECTION_ID)
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        self.conditional(r, "DeleteItem name claim")
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

/// The drift between a snapshot and what the log says, in a stable order, and the members
/// without a connection.
fn compare(snapshot: &Snapshot, derived: &Derived) -> (Vec<Drift>, Vec<MemberRef>) {
    let mut drift = Vec::new();
    if snapshot.seq.unwrap_or(0) < derived.max_id {
        drift.push(Drift::SeqBehind {
            found: snapshot.seq,
            expected: derived.max_id,
        });
    }
    // Claims whose fate another drift's fix decides already.
    let mut settled: BTreeSet<String> = BTreeSet::new();
    // Live members: connection id -> the name key they should hold.
    let mut members: BTreeMap<&str, String> = BTreeMap::new();
    let mut claim_drift = Vec::new();
    for (id, conn) in &snapshot.conns {
        match derived.seen.get(id) {
            Some(Seen::Left) => {
                let owned_claim = conn
                    .name_key
                    .as_deref()
                    .filter(|k| {
                        snapshot
                            .claims
                            .get(*k)
                            .is_some_and(|c| c.connection_id.as_deref() == Some(id.as_str()))
                    })
                    .map(str::to_owned);
                settled.extend(owned_claim.clone());
                drift.push(Drift::LeftButPresent {
                    connection_id: id.clone(),
                    name: conn.name.clone(),
                    owned_claim,
                });
            }
            Some(Seen::Member(name)) => {
                let key = name_key(name);
                if conn.name.as_deref() != Some(name.as_str())
                    || conn.name_key.as_deref() != Some(key.as_str())
                {
                    drift.push(Drift::NameDiffers {
                        connection_id: id.clone(),
                        found: conn.name.clone(),
                        found_key: conn.name_key.clone(),
                        expected: Some(name.clone()),
                    });
                }
                let found = snapshot.claims.get(&key);
                let owner = found.and_then(|c| c.connection_id.clone());
                if owner.as_deref() != Some(id.as_str()) {
                    claim_drift.push(Drift::ClaimMissing {
                        connection_id: id.clone(),
                        name: name.clone(),
                        name_key: key.clone(),
                        expires_at: conn.expires_at,
                        found_owner: owner,
                        found_reservation: found.is_some_and(ClaimItem::is_reservation),
                        identity: conn.identity.clone(),
                    });
                }
                members.insert(id.as_str(), key);
            }
            None => {
                if conn.name.is_some() || conn.name_key.is_some() {
                    drift.push(Drift::NameDiffers {
                        connection_id: id.clone(),
                        found: conn.name.clone(),
                        found_key: conn.name_key.clone(),
                        expected: None,
                    });
                }
            }
        }
    }
    // A claim held by the wrong connection is overwritten by its ClaimMissing fix, not deleted.
    settled.extend(claim_drift.iter().filter_map(|d| match d {
        Drift::ClaimMissing { name_key, .. } => Some(name_key.clone()),
        _ => None,
    }));
    drift.extend(claim_drift);
    for (key, claim) in &snapshot.claims {
        if settled.contains(key) {
            continue;
        }
        // An identity's reservation has no connection by design: it is no orphan, and it
        // expires by itself (keys.rs).
        let Some(holder) = claim.connection_id.as_deref() else {
            continue;
        };
        if members.get(holder) != Some(key) {
            drift.push(Drift::OrphanClaim {
                name_key: key.clone(),
                connection_id: holder.to_owned(),
            });
        }
    }
    let mut without: Vec<MemberRef> = derived
        .seen
        .iter()
        .filter_map(|(id, seen)| match seen {
            Seen::Member(name) if !snapshot.conns.contains_key(id) => Some(MemberRef {
                connection_id: id.clone(),
                name: name.clone(),
            }),
            _ => None,
        })
        .collect();
    without.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
    (drift, without)
}

/// Compares the room's connections with its log and, with `apply`, fixes each drift.
pub async fn rebuild(
    log: &EventLog,
    connections: &ConnectionsTable,
    apply: bool,
    now_ms: i64,
    progress: &ProgressBar,
) -> Result<RebuildReport, ReplayError> {
    let snapshot = connections.snapshot(now_ms).await?;
    let keep: BTreeSet<&str> = snapshot
        .conns
        .keys()
        .map(String::as_str)
        .chain(
            snapshot
                .claims
                .values()
                .filter_map(|c| c.connection_id.as_deref()),
        )
        .collect();
    let derived = derive(log, &keep, now_ms, progress).await?;
    let (drift, members_without_connection) = compare(&snapshot, &derived);
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
        applied: apply,
        fixed: 0,
        skipped: 0,
    };
    if apply {
        for entry in &mut report.drift {
            let outcome = connections.fix(&entry.drift, now_ms).await?;
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

    fn conn(name: Option<&str>) -> ConnItem {
        ConnItem {
            connection_id: "?".into(),
            connected_at: 0,
            expires_at: 100,
            name: name.map(str::to_owned),
            name_key: name.map(name_key),
            rl_tokens: None,
            rl_at: None,
            identity: None,
            rooms: None,
        }
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
            events_read: max_id,
            max_id,
            seen: seen
                .iter()
                .map(|(id, s)| ((*id).to_owned(), s.clone()))
                .collect(),
        }
    }

    #[test]
    fn a_claim_held_by_another_connection_is_retaken_not_deleted() {
        // GIVEN bob (B) is a member per the log, but NAME#bob points to X
        let snapshot = Snapshot {
            seq: Some(3),
            conns: BTreeMap::from([("B".to_owned(), conn(Some("bob")))]),
            claims: BTreeMap::from([("bob".to_owned(), claim("X"))]),
        };
        let log = derived(&[("B", Seen::Member("bob".into()))], 3);

        // WHEN compared  THEN the one drift is B's claim pointing elsewhere, and the claim is not
        // also reported as an orphan (its fix overwrites it)
        let (drift, without) = compare(&snapshot, &log);
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
    fn a_departed_connection_takes_its_claim_with_it() {
        // GIVEN C left per the log, but its item and its claim are still there
        let snapshot = Snapshot {
            seq: Some(2),
            conns: BTreeMap::from([("C".to_owned(), conn(Some("Carol")))]),
            claims: BTreeMap::from([("carol".to_owned(), claim("C"))]),
        };
        let log = derived(&[("C", Seen::Left)], 2);

        // WHEN compared  THEN one drift deletes both; the claim is no separate orphan
        let (drift, _) = compare(&snapshot, &log);
        assert_eq!(
            drift,
            vec![Drift::LeftButPresent {
                connection_id: "C".into(),
                name: Some("Carol".into()),
                owned_claim: Some("carol".into()),
            }]
        );
    }

    #[test]
    fn a_name_the_log_never_gave_is_removed_and_its_claim_is_an_orphan() {
        // GIVEN N never joined per the log, yet has a name and a claim; the counter is missing
        let snapshot = Snapshot {
            seq: None,
            conns: BTreeMap::from([("N".to_owned(), conn(Some("ned")))]),
            claims: BTreeMap::from([("ned".to_owned(), claim("N"))]),
        };
        let log = derived(&[("M", Seen::Member("meg".into()))], 4);

        // WHEN compared
        let (drift, without) = compare(&snapshot, &log);

        // THEN the counter, the name and the claim drift; meg is a member without a connection
        assert_eq!(
            drift,
            vec![
                Drift::SeqBehind {
                    found: None,
                    expected: 4
                },
                Drift::NameDiffers {
                    connection_id: "N".into(),
                    found: Some("ned".into()),
                    found_key: Some("ned".into()),
                    expected: None,
                },
                Drift::OrphanClaim {
                    name_key: "ned".into(),
                    connection_id: "N".into(),
                },
            ]
        );
        assert_eq!(
            without,
            vec![MemberRef {
                connection_id: "M".into(),
                name: "meg".into()
            }]
        );
    }

    #[test]
    fn an_empty_room_has_no_drift() {
        let (drift, without) = compare(&Snapshot::default(), &derived(&[], 0));
        assert!(drift.is_empty() && without.is_empty());
    }
}
