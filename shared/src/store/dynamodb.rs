//! The DynamoDB adapter of [`ChatStore`], and the table definitions it relies on.
//!
//! Every state change is one `TransactWriteItems`: the state items, the room's sequence
//! counter and the event item commit together or not at all. Event ids come from the
//! counter: a writer reads the counter `n` (strongly consistent), then commits
//! `seq = n + 1` on the condition that the counter is still `n`. Two writers that read the same
//! `n` cannot both commit, so ids are dense and committed in id order: a reader that has seen
//! id `k` can never later find a new event with an id below `k`. The loser re-reads and tries
//! again with jittered backoff, which is what caps one room near DynamoDB's per-partition write
//! rate (documented in the README).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, ConditionCheck, Delete, DeleteRequest,
    KeySchemaElement, KeyType, Put, ScalarAttributeType, StreamSpecification, StreamViewType,
    TableStatus, TimeToLiveSpecification, TransactWriteItem, Update, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use rand::Rng;

use super::aws_like::ReadOp;
use super::items::{ClaimItem, ConnItem, MemberItem, SeqItem};
use super::limits::{BATCH_WRITE_MAX_REQUESTS, TRANSACT_MAX_ACTIONS};
use super::{
    epoch_secs, ChatStore, Connection, EventRange, EventsPage, Joined, Member, MembersPage,
    StoreError, NAME_RESERVATION_SECS,
};
use crate::config::{Retention, Tables};
use crate::events::{ChatEvent, EventItem, LeaveReason, StoredEvent};
use crate::keys::{self, CONN_PREFIX};
use crate::ratelimit::{self, Bucket, RateLimit};
use crate::redelivery::{Redelivery, RedeliveryItem};
use crate::validation::{recipient_key, ValidName};

/// Leaves per pruning transaction: three items each (connection, claim, event) plus the
/// counter stays within TransactWriteItems' 100 actions.
const LEAVES_PER_TRANSACTION: usize = 30;
// Three items per leave, plus the counter, must fit one transaction.
const _: () = assert!(LEAVES_PER_TRANSACTION * 3 < TRANSACT_MAX_ACTIONS);

/// How many times a change is re-read and re-tried when a concurrent writer took the
/// sequence number (or changed the state it depended on) first.
const MAX_ATTEMPTS: u32 = 40;

/// Expression attribute names used by this adapter. `name` is a DynamoDB reserved word,
/// so every attribute goes through a placeholder.
const NAMES: [(&str, &str); 8] = [
    ("#pk", keys::PK),
    ("#sk", keys::SK),
    ("#seq", keys::SEQ),
    ("#name", keys::NAME),
    ("#conn", keys::CONNECTION_ID),
    ("#exp", keys::EXPIRES_AT),
    ("#nkey", keys::NAME_KEY),
    ("#ident", keys::IDENTITY),
];

pub struct DynamoStore {
    client: Client,
    tables: Tables,
    retention: Retention,
    room: String,
    room_pk: String,
    /// `Limit` for member queries; `None` lets DynamoDB fill 1 MB pages. Tests set it low to
    /// exercise pagination.
    page_limit: Option<i32>,
}

fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Whether `token` (`#name`, `:me`) occurs in `expr` as a whole placeholder, not as the
/// prefix of a longer one. DynamoDB rejects placeholders a request does not use.
fn uses(expr: &str, token: &str) -> bool {
    expr.match_indices(token).any(|(i, _)| {
        expr[i + token.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'))
    })
}

/// A condition or update expression with the placeholders it uses, and only those.
struct Expr {
    text: String,
    values: Vec<(&'static str, AttributeValue)>,
}

impl Expr {
    fn new(text: impl Into<String>) -> Self {
        Expr {
            text: text.into(),
            values: Vec::new(),
        }
    }

    fn value(mut self, placeholder: &'static str, v: AttributeValue) -> Self {
        self.values.push((placeholder, v));
        self
    }
}

type Names = Option<HashMap<String, String>>;
type Values = Option<HashMap<String, AttributeValue>>;

/// The placeholders of one or two expressions (a condition and an update share them).
fn placeholders(exprs: &[&Expr]) -> (Names, Values) {
    let names: HashMap<String, String> = NAMES
        .iter()
        .filter(|(p, _)| exprs.iter().any(|e| uses(&e.text, p)))
        .map(|(p, a)| ((*p).to_owned(), (*a).to_owned()))
        .collect();
    let values: HashMap<String, AttributeValue> = exprs
        .iter()
        .flat_map(|e| e.values.iter())
        .filter(|(p, _)| exprs.iter().any(|e| uses(&e.text, p)))
        .map(|(p, v)| ((*p).to_owned(), v.clone()))
        .collect();
    (
        (!names.is_empty()).then_some(names),
        (!values.is_empty()).then_some(values),
    )
}

fn build_err(e: aws_sdk_dynamodb::error::BuildError) -> StoreError {
    StoreError::backend("build request", e)
}

impl DynamoStore {
    pub fn new(client: Client, tables: Tables, retention: Retention) -> Self {
        let room = keys::DEFAULT_ROOM.to_owned();
        DynamoStore {
            client,
            tables,
            retention,
            room_pk: keys::room_pk(&room),
            room,
            page_limit: None,
        }
    }

    /// Caps each member query page at `limit` items (for tests of pagination).
    pub fn with_page_limit(mut self, limit: i32) -> Self {
        self.page_limit = Some(limit);
        self
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    fn key(&self, sk: String) -> HashMap<String, AttributeValue> {
        HashMap::from([
            (keys::PK.to_owned(), s(&self.room_pk)),
            (keys::SK.to_owned(), s(sk)),
        ])
    }

    async fn get(
        &self,
        sk: String,
        read: ReadOp,
        op: &'static str,
    ) -> Result<Option<HashMap<String, AttributeValue>>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(self.key(sk)))
            .consistent_read(read.consistent_read())
            .send()
            .await
            .map_err(|e| StoreError::backend(op, e))?;
        Ok(out.item)
    }

    async fn get_conn(&self, connection_id: &str) -> Result<Option<ConnItem>, StoreError> {
        match self
            .get(
                keys::conn_sk(connection_id),
                ReadOp::GetConnection,
                "GetItem connection",
            )
            .await?
        {
            None => Ok(None),
            Some(item) => serde_dynamo::from_item(item)
                .map(Some)
                .map_err(|e| StoreError::Malformed(format!("connection {connection_id}: {e}"))),
        }
    }

    async fn get_claim(&self, key: &str) -> Result<Option<ClaimItem>, StoreError> {
        match self
            .get(
                keys::name_sk(key),
                ReadOp::GetNameClaim,
                "GetItem name claim",
            )
            .await?
        {
            None => Ok(None),
            Some(item) => serde_dynamo::from_item(item)
                .map(Some)
                .map_err(|e| StoreError::Malformed(format!("name claim {key}: {e}"))),
        }
    }

    async fn current_seq(&self) -> Result<u64, StoreError> {
        match self
            .get(
                keys::SEQ_SK.to_owned(),
                ReadOp::GetSequence,
                "GetItem sequence",
            )
            .await?
        {
            None => Ok(0),
            Some(item) => serde_dynamo::from_item::<_, SeqItem>(item)
                .map(|i| i.seq)
                .map_err(|e| StoreError::Malformed(format!("sequence counter: {e}"))),
        }
    }

    fn put(
        &self,
        table: &str,
        item: HashMap<String, AttributeValue>,
        cond: Option<Expr>,
    ) -> Result<TransactWriteItem, StoreError> {
        let mut b = Put::builder().table_name(table).set_item(Some(item));
        if let Some(cond) = cond {
            let (names, values) = placeholders(&[&cond]);
            b = b
                .condition_expression(cond.text)
                .set_expression_attribute_names(names)
                .set_expression_attribute_values(values);
        }
        Ok(TransactWriteItem::builder()
            .put(b.build().map_err(build_err)?)
            .build())
    }

    fn update(
        &self,
        sk: String,
        update: Expr,
        cond: Expr,
    ) -> Result<TransactWriteItem, StoreError> {
        let (names, values) = placeholders(&[&update, &cond]);
        let u = Update::builder()
            .table_name(&self.tables.connections)
            .set_key(Some(self.key(sk)))
            .update_expression(update.text)
            .condition_expression(cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .build()
            .map_err(build_err)?;
        Ok(TransactWriteItem::builder().update(u).build())
    }

    fn delete(&self, sk: String, cond: Expr) -> Result<TransactWriteItem, StoreError> {
        let (names, values) = placeholders(&[&cond]);
        let d = Delete::builder()
            .table_name(&self.tables.connections)
            .set_key(Some(self.key(sk)))
            .condition_expression(cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .build()
            .map_err(build_err)?;
        Ok(TransactWriteItem::builder().delete(d).build())
    }

    fn check(&self, sk: String, cond: Expr) -> Result<TransactWriteItem, StoreError> {
        let (names, values) = placeholders(&[&cond]);
        let c = ConditionCheck::builder()
            .table_name(&self.tables.connections)
            .set_key(Some(self.key(sk)))
            .condition_expression(cond.text)
            .set_expression_attribute_names(names)
            .set_expression_attribute_values(values)
            .build()
            .map_err(build_err)?;
        Ok(TransactWriteItem::builder().condition_check(c).build())
    }

    /// The two items that give an event its id: the counter moves from `current` to
    /// `current + 1` only if nobody moved it first, and the event is put under that id.
    fn append(
        &self,
        current: u64,
        event: ChatEvent,
        now_ms: i64,
    ) -> Result<(StoredEvent, Vec<TransactWriteItem>), StoreError> {
        let (mut stored, items) = self.append_all(current, vec![event], now_ms)?;
        let stored = stored
            .pop()
            .ok_or_else(|| StoreError::Malformed("no event appended".into()))?;
        Ok((stored, items))
    }

    /// [`Self::append`] for several events at once: ids `current + 1 ..= current + k`, one
    /// counter update. No events, no items.
    fn append_all(
        &self,
        current: u64,
        events: Vec<ChatEvent>,
        now_ms: i64,
    ) -> Result<(Vec<StoredEvent>, Vec<TransactWriteItem>), StoreError> {
        if events.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let last = current + events.len() as u64;
        // A missing counter reads as 0.
        let cond = Expr::new("attribute_not_exists(#seq) OR #seq = :cur").value(":cur", n(current));
        let mut items = vec![self.update(
            keys::SEQ_SK.to_owned(),
            Expr::new("SET #seq = :next").value(":next", n(last)),
            cond,
        )?];
        let expires = epoch_secs(now_ms) + self.retention.event_retention.as_secs() as i64;
        let mut stored_events = Vec::with_capacity(events.len());
        for (seq, event) in (current + 1..).zip(events) {
            let stored = StoredEvent {
                room: self.room.clone(),
                seq,
                ts: now_ms,
                event,
            };
            let item = serde_dynamo::to_item(EventItem::new(&stored, expires))
                .map_err(|e| StoreError::Malformed(format!("event item: {e}")))?;
            items.push(self.put(
                &self.tables.events,
                item,
                Some(Expr::new("attribute_not_exists(#seq)")),
            )?);
            stored_events.push(stored);
        }
        Ok((stored_events, items))
    }

    /// Deletes connections that have no name (so no event to record) with BatchWriteItem,
    /// [`BATCH_WRITE_MAX_REQUESTS`] per request, retrying what DynamoDB leaves unprocessed.
    async fn batch_delete_connections(&self, ids: &[&str]) -> Result<(), StoreError> {
        for chunk in ids.chunks(BATCH_WRITE_MAX_REQUESTS) {
            let mut requests: Vec<WriteRequest> = chunk
                .iter()
                .map(|id| {
                    DeleteRequest::builder()
                        .set_key(Some(self.key(keys::conn_sk(id))))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                        .map_err(build_err)
                })
                .collect::<Result<_, _>>()?;
            for attempt in 1..=MAX_ATTEMPTS {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.tables.connections, requests)
                    .send()
                    .await
                    .map_err(|e| StoreError::backend("BatchWriteItem prune", e))?;
                requests = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(&self.tables.connections))
                    .unwrap_or_default();
                if requests.is_empty() {
                    break;
                }
                if attempt == MAX_ATTEMPTS {
                    return Err(StoreError::Contention(MAX_ATTEMPTS));
                }
                backoff(attempt).await;
            }
        }
        Ok(())
    }

    /// Gives up a name claim the connection holds: deleted, or — for an authenticated
    /// connection — kept as its identity's reservation for [`NAME_RESERVATION_SECS`].
    fn release(
        &self,
        key: &str,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<TransactWriteItem, StoreError> {
        let ours = Expr::new("#conn = :me").value(":me", s(connection_id));
        match identity {
            None => self.delete(keys::name_sk(key), ours),
            Some(_) => self.update(
                keys::name_sk(key),
                Expr::new("REMOVE #conn SET #exp = :until")
                    .value(":until", n(epoch_secs(now_ms) + NAME_RESERVATION_SECS)),
                ours,
            ),
        }
    }

    /// Removes up to [`LEAVES_PER_TRANSACTION`] named connections in one transaction: each
    /// connection, its name claim and its `MemberLeft` event, with one counter update.
    async fn remove_named(
        &self,
        ids: &[&str],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let conns =
                futures::future::try_join_all(ids.iter().map(|id| self.get_conn(id))).await?;
            let mut items = Vec::new();
            let mut events = Vec::new();
            for (id, conn) in ids.iter().zip(conns) {
                let Some(ConnItem {
                    name: Some(name),
                    name_key: Some(key),
                    identity,
                    ..
                }) = conn
                else {
                    // Gone already, or never named: nothing to announce.
                    continue;
                };
                items.push(self.delete(
                    keys::conn_sk(id),
                    Expr::new("#name = :name").value(":name", s(&name)),
                )?);
                if let Some(claim) = self.get_claim(&key).await? {
                    if claim.connection_id.as_deref() == Some(*id) {
                        items.push(self.release(&key, id, identity.as_deref(), now_ms)?);
                    }
                }
                events.push(ChatEvent::MemberLeft {
                    connection_id: (*id).to_owned(),
                    name,
                    reason,
                });
            }
            if events.is_empty() {
                return Ok(Vec::new());
            }
            let (stored, append) = self.append_all(self.current_seq().await?, events, now_ms)?;
            items.extend(append);
            if self.transact("TransactWriteItems prune", items).await? {
                return Ok(stored);
            }
            self.after_cancel(attempt).await?;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    /// What a writer does after its transaction was cancelled: back off, and on the third try
    /// check that the room's counter is not behind its newest event. A counter behind the log
    /// (restored from an old backup, edited by hand) would make every append collide with an
    /// existing event forever; this moves it forward instead.
    async fn after_cancel(&self, attempt: u32) -> Result<(), StoreError> {
        backoff(attempt).await;
        if attempt == 3 {
            self.heal_counter().await?;
        }
        Ok(())
    }

    async fn heal_counter(&self) -> Result<(), StoreError> {
        let counter = self.current_seq().await?;
        let newest = self
            .client
            .query()
            .table_name(&self.tables.events)
            .key_condition_expression("#pk = :pk")
            .expression_attribute_names("#pk", keys::PK)
            .expression_attribute_values(":pk", s(&self.room_pk))
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
        if newest <= counter {
            return Ok(());
        }
        tracing::warn!(
            counter,
            newest,
            "the room's sequence counter was behind its log; moving it forward"
        );
        let cond = Expr::new("attribute_not_exists(#seq) OR #seq = :cur").value(":cur", n(counter));
        let item = self.update(
            keys::SEQ_SK.to_owned(),
            Expr::new("SET #seq = :next").value(":next", n(newest)),
            cond,
        )?;
        // A concurrent writer may have moved it first; either way the next read is right.
        self.transact("TransactWriteItems heal counter", vec![item])
            .await?;
        Ok(())
    }

    /// Commits the items; `Ok(false)` when DynamoDB cancelled the transaction (a condition
    /// failed or a concurrent transaction touched the same items), so the caller re-reads.
    async fn transact(
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
            Err(e) => Err(StoreError::backend(op, e)),
        }
    }
}

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

/// Jittered exponential backoff between attempts, so colliding writers spread out.
async fn backoff(attempt: u32) {
    let cap_ms = 2u64.saturating_pow(attempt.min(7)).max(2);
    let ms = rand::rng().random_range(1..=cap_ms);
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

fn live_conn(conn: Option<ConnItem>, now_ms: i64) -> Option<ConnItem> {
    conn.filter(|c| c.expires_at > epoch_secs(now_ms))
}

/// Layout 1 operations, behind the layout 2 port below until this adapter moves to it.
impl DynamoStore {
    async fn v1_add_identified_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        let expires_at = epoch_secs(now_ms) + self.retention.connection_ttl.as_secs() as i64;
        let mut item = self.key(keys::conn_sk(connection_id));
        item.insert(keys::CONNECTION_ID.into(), s(connection_id));
        item.insert(keys::CONNECTED_AT.into(), n(now_ms));
        item.insert(keys::EXPIRES_AT.into(), n(expires_at));
        if let Some(identity) = identity {
            item.insert(keys::IDENTITY.into(), s(identity));
        }
        self.client
            .put_item()
            .table_name(&self.tables.connections)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| StoreError::backend("PutItem connection", e))?;
        Ok(Connection {
            connection_id: connection_id.to_owned(),
            connected_at: now_ms,
            expires_at,
            name: None,
            identity: identity.map(str::to_owned),
            rooms: Vec::new(),
        })
    }

    async fn v1_connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        Ok(
            live_conn(self.get_conn(connection_id).await?, now_ms).map(|c| Connection {
                connection_id: c.connection_id,
                connected_at: c.connected_at,
                expires_at: c.expires_at,
                rooms: c
                    .name
                    .iter()
                    .map(|_| keys::DEFAULT_ROOM.to_owned())
                    .collect(),
                name: c.name,
                identity: c.identity,
            }),
        )
    }

    async fn v1_set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        let now_s = epoch_secs(now_ms);
        for attempt in 1..=MAX_ATTEMPTS {
            let conn = live_conn(self.get_conn(connection_id).await?, now_ms)
                .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
            if conn.name.as_deref() == Some(name.display.as_str()) {
                return Ok(None);
            }
            // Read the claim first: a name that is plainly taken costs one read instead of a
            // cancelled transaction. The transaction's condition still settles races.
            let mut evict: Option<(String, String)> = None;
            if let Some(holder) = self.get_claim(&name.key).await? {
                match claim_standing(&holder, connection_id, conn.identity.as_deref(), now_s) {
                    Standing::Taken => return Err(StoreError::NameTaken(name.display.clone())),
                    Standing::Free => {}
                    Standing::OwnOtherConnection(old_id) => {
                        // The same identity takes its name back: its older connection (a
                        // stale one, typically) leaves in the same transaction.
                        if let Some(old) = self.get_conn(&old_id).await? {
                            if old.name_key.as_deref() == Some(name.key.as_str()) {
                                evict = Some((old_id, old.name.unwrap_or_default()));
                            }
                        }
                    }
                }
            }
            // The claim lives as long as the connection, so an abandoned name frees itself.
            let mut claim = self.key(keys::name_sk(&name.key));
            claim.insert(keys::CONNECTION_ID.into(), s(connection_id));
            claim.insert(keys::NAME.into(), s(&name.display));
            claim.insert(keys::EXPIRES_AT.into(), n(conn.expires_at));
            let mut condition =
                Expr::new("attribute_not_exists(#pk) OR #conn = :me OR #exp <= :now")
                    .value(":me", s(connection_id))
                    .value(":now", n(now_s));
            if let Some(identity) = &conn.identity {
                claim.insert(keys::IDENTITY.into(), s(identity));
                condition = Expr::new(format!("{} OR #ident = :ident", condition.text))
                    .value(":me", s(connection_id))
                    .value(":now", n(now_s))
                    .value(":ident", s(identity));
            }
            let mut items = vec![self.put(&self.tables.connections, claim, Some(condition))?];
            let mut events = Vec::new();
            if let Some((old_id, old_name)) = evict {
                items.push(self.delete(
                    keys::conn_sk(&old_id),
                    Expr::new("#name = :name").value(":name", s(&old_name)),
                )?);
                events.push(ChatEvent::MemberLeft {
                    connection_id: old_id,
                    name: old_name,
                    reason: LeaveReason::Replaced,
                });
            }
            let set = Expr::new("SET #name = :name, #nkey = :nkey")
                .value(":name", s(&name.display))
                .value(":nkey", s(&name.key));
            let unchanged = match &conn.name {
                Some(old) => Expr::new("#name = :old").value(":old", s(old)),
                None => Expr::new("attribute_exists(#pk) AND attribute_not_exists(#name)"),
            };
            items.push(self.update(keys::conn_sk(connection_id), set, unchanged)?);
            if let Some(old_key) = conn.name_key.as_deref().filter(|k| *k != name.key) {
                // Release the old name only if it is still ours: an expired claim may already
                // belong to someone else, and deleting theirs would be wrong.
                if let Some(old_claim) = self.get_claim(old_key).await? {
                    if old_claim.connection_id.as_deref() == Some(connection_id) {
                        items.push(self.release(
                            old_key,
                            connection_id,
                            conn.identity.as_deref(),
                            now_ms,
                        )?);
                    }
                }
            }
            events.push(match conn.name.clone() {
                None => ChatEvent::MemberJoined {
                    connection_id: connection_id.to_owned(),
                    name: name.display.clone(),
                },
                Some(old_name) => ChatEvent::MemberRenamed {
                    connection_id: connection_id.to_owned(),
                    old_name,
                    name: name.display.clone(),
                },
            });
            let (mut stored, append) =
                self.append_all(self.current_seq().await?, events, now_ms)?;
            items.extend(append);
            if self.transact("TransactWriteItems setName", items).await? {
                return Ok(stored.pop());
            }
            // Cancelled: either the name is held by someone else (final), or a concurrent
            // writer moved the counter or this connection (try again).
            if let Some(holder) = self.get_claim(&name.key).await? {
                if claim_standing(&holder, connection_id, conn.identity.as_deref(), now_s)
                    == Standing::Taken
                {
                    return Err(StoreError::NameTaken(name.display.clone()));
                }
            }
            self.after_cancel(attempt).await?;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    async fn v1_post_public(
        &self,
        connection_id: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let conn = live_conn(self.get_conn(connection_id).await?, now_ms)
                .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
            let name = conn.name.ok_or(StoreError::NameRequired)?;
            let mut items = vec![self.check(
                keys::conn_sk(connection_id),
                Expr::new("#name = :name").value(":name", s(&name)),
            )?];
            let event = ChatEvent::MessagePosted {
                connection_id: connection_id.to_owned(),
                name,
                message: message.to_owned(),
            };
            let (stored, append) = self.append(self.current_seq().await?, event, now_ms)?;
            items.extend(append);
            if self
                .transact("TransactWriteItems sendPublic", items)
                .await?
            {
                return Ok(stored);
            }
            self.after_cancel(attempt).await?;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    async fn v1_post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        let now_s = epoch_secs(now_ms);
        // `None`: no valid name has this key, and it may be too long to be a DynamoDB key.
        let to_key = recipient_key(to);
        for attempt in 1..=MAX_ATTEMPTS {
            let conn = live_conn(self.get_conn(connection_id).await?, now_ms)
                .ok_or_else(|| StoreError::NotConnected(connection_id.to_owned()))?;
            let name = conn.name.ok_or(StoreError::NameRequired)?;
            let Some(to_key) = to_key.as_deref() else {
                return Err(StoreError::UnknownRecipient(to.to_owned()));
            };
            if conn.name_key.as_deref() == Some(to_key) {
                return Err(StoreError::SelfRecipient);
            }
            let recipient = self
                .get_claim(to_key)
                .await?
                .filter(|c| c.expires_at > now_s)
                .ok_or_else(|| StoreError::UnknownRecipient(to.to_owned()))?;
            let recipient_id = recipient
                .connection_id
                .ok_or_else(|| StoreError::UnknownRecipient(to.to_owned()))?;
            let to_conn = live_conn(self.get_conn(&recipient_id).await?, now_ms)
                .filter(|c| c.name_key.as_deref() == Some(to_key))
                .ok_or_else(|| StoreError::UnknownRecipient(to.to_owned()))?;
            let to_name = to_conn.name.clone().unwrap_or_default();
            let mut items = vec![
                self.check(
                    keys::conn_sk(connection_id),
                    Expr::new("#name = :name").value(":name", s(&name)),
                )?,
                self.check(
                    keys::name_sk(to_key),
                    Expr::new("#conn = :to").value(":to", s(&to_conn.connection_id)),
                )?,
            ];
            let event = ChatEvent::PrivateMessageSent {
                connection_id: connection_id.to_owned(),
                name,
                to_connection_id: to_conn.connection_id,
                to_name,
                message: message.to_owned(),
                identity: conn.identity,
                to_identity: to_conn.identity,
            };
            let (stored, append) = self.append(self.current_seq().await?, event, now_ms)?;
            items.extend(append);
            if self
                .transact("TransactWriteItems sendPrivate", items)
                .await?
            {
                return Ok(stored);
            }
            self.after_cancel(attempt).await?;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    async fn v1_remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Option<StoredEvent>, StoreError> {
        for attempt in 1..=MAX_ATTEMPTS {
            // Expired connections are removed too: `$disconnect` for them is still real.
            let Some(conn) = self.get_conn(connection_id).await? else {
                return Ok(None);
            };
            let identity = conn.identity;
            let (Some(name), Some(key)) = (conn.name, conn.name_key) else {
                let cond = Expr::new("attribute_exists(#pk) AND attribute_not_exists(#name)");
                let item = self.delete(keys::conn_sk(connection_id), cond)?;
                if self
                    .transact("TransactWriteItems $disconnect", vec![item])
                    .await?
                {
                    return Ok(None);
                }
                backoff(attempt).await;
                continue;
            };
            let mut items = vec![self.delete(
                keys::conn_sk(connection_id),
                Expr::new("#name = :name").value(":name", s(&name)),
            )?];
            if let Some(claim) = self.get_claim(&key).await? {
                if claim.connection_id.as_deref() == Some(connection_id) {
                    items.push(self.release(&key, connection_id, identity.as_deref(), now_ms)?);
                }
            }
            let event = ChatEvent::MemberLeft {
                connection_id: connection_id.to_owned(),
                name,
                reason,
            };
            let (stored, append) = self.append(self.current_seq().await?, event, now_ms)?;
            items.extend(append);
            if self
                .transact("TransactWriteItems $disconnect", items)
                .await?
            {
                return Ok(Some(stored));
            }
            self.after_cancel(attempt).await?;
        }
        Err(StoreError::Contention(MAX_ATTEMPTS))
    }

    async fn v1_remove_connections(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let conns =
            futures::future::try_join_all(connection_ids.iter().map(|id| self.get_conn(id)))
                .await?;
        let (mut named, mut unnamed) = (Vec::new(), Vec::new());
        for (id, conn) in connection_ids.iter().zip(conns) {
            match conn {
                None => {}
                Some(c) if c.name.is_some() => named.push(id.as_str()),
                Some(_) => unnamed.push(id.as_str()),
            }
        }
        self.batch_delete_connections(&unnamed).await?;
        let mut left = Vec::new();
        for chunk in named.chunks(LEAVES_PER_TRANSACTION) {
            left.extend(self.remove_named(chunk, reason, now_ms).await?);
        }
        Ok(left)
    }

    async fn v1_schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // A fresh random key each attempt: the condition makes a collision a retry, never an
        // overwrite of another fan-out's item.
        for _ in 0..3 {
            let seq = crate::redelivery::unique_seq(now_ms);
            let item = serde_dynamo::to_item(RedeliveryItem::new(redelivery, seq, now_ms))
                .map_err(|e| StoreError::Malformed(format!("redelivery item: {e}")))?;
            let put = self
                .client
                .put_item()
                .table_name(&self.tables.events)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(#pk)")
                .expression_attribute_names("#pk", keys::PK)
                .send()
                .await;
            match put {
                Ok(_) => return Ok(()),
                Err(SdkError::ServiceError(e))
                    if e.err().is_conditional_check_failed_exception() =>
                {
                    continue
                }
                Err(e) => return Err(StoreError::backend("PutItem redelivery", e)),
            }
        }
        Err(StoreError::Contention(3))
    }

    async fn v1_take_request_token(
        &self,
        connection_id: &str,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        if limit.is_off() {
            return Ok(true);
        }
        for attempt in 1..=5 {
            let Some(conn) = self.get_conn(connection_id).await? else {
                return Ok(true);
            };
            let bucket = conn.rl_at.map(|at_ms| Bucket {
                milli_tokens: conn.rl_tokens.unwrap_or(0),
                at_ms,
            });
            let Some(next) = ratelimit::take(limit, bucket, now_ms) else {
                return Ok(false);
            };
            // Optimistic: the write only lands if nobody took a token since the read.
            let mut values = HashMap::from([
                (":tokens".to_owned(), n(next.milli_tokens)),
                (":now".to_owned(), n(next.at_ms)),
            ]);
            let condition = match bucket {
                Some(b) => {
                    values.insert(":old".to_owned(), n(b.at_ms));
                    "attribute_exists(#pk) AND #at = :old"
                }
                None => "attribute_exists(#pk) AND attribute_not_exists(#at)",
            };
            let result = self
                .client
                .update_item()
                .table_name(&self.tables.connections)
                .set_key(Some(self.key(keys::conn_sk(connection_id))))
                .update_expression("SET #tokens = :tokens, #at = :now")
                .condition_expression(condition)
                .expression_attribute_names("#pk", keys::PK)
                .expression_attribute_names("#tokens", keys::RATE_TOKENS)
                .expression_attribute_names("#at", keys::RATE_AT)
                .set_expression_attribute_values(Some(values))
                .send()
                .await;
            match result {
                Ok(_) => return Ok(true),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|se| se.is_conditional_check_failed_exception()) =>
                {
                    backoff(attempt).await;
                }
                Err(e) => return Err(StoreError::backend("UpdateItem rate limit", e)),
            }
        }
        // Requests from this one connection keep colliding: it is sending too fast.
        Ok(false)
    }

    async fn v1_members_page(
        &self,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        let start = after.map(|sk| self.key(sk.to_owned()));
        let out = self
            .client
            .query()
            .table_name(&self.tables.connections)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .filter_expression("attribute_exists(#name) AND #exp > :now")
            .expression_attribute_names("#pk", keys::PK)
            .expression_attribute_names("#sk", keys::SK)
            .expression_attribute_names("#name", keys::NAME)
            .expression_attribute_names("#exp", keys::EXPIRES_AT)
            .expression_attribute_values(":pk", s(&self.room_pk))
            .expression_attribute_values(":prefix", s(CONN_PREFIX))
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
            });
        }
        let next = out
            .last_evaluated_key
            .and_then(|k| k.get(keys::SK).and_then(|v| v.as_s().ok()).cloned());
        Ok(MembersPage { members, next })
    }

    async fn v1_read_events(
        &self,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        let limit = limit.max(1);
        let (condition, bound, forward) = match range {
            EventRange::After(after) => ("#pk = :pk AND #seq > :bound", Some(after), true),
            EventRange::Before(Some(before)) => {
                ("#pk = :pk AND #seq < :bound", Some(before), false)
            }
            EventRange::Before(None) => ("#pk = :pk", None, false),
        };
        let mut names = HashMap::from([
            ("#pk".to_owned(), keys::PK.to_owned()),
            ("#exp".to_owned(), keys::EXPIRES_AT.to_owned()),
        ]);
        let mut values = HashMap::from([
            (":pk".to_owned(), s(&self.room_pk)),
            (":now".to_owned(), n(epoch_secs(now_ms))),
        ]);
        if let Some(bound) = bound {
            // Only with a bound: DynamoDB rejects placeholders a request does not use.
            names.insert("#seq".to_owned(), keys::SEQ.to_owned());
            values.insert(":bound".to_owned(), n(bound));
        }
        let mut events = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        // Expired items are filtered out, so one Query page can come back short: keep reading
        // until the page is full or the range is exhausted.
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.tables.events)
                .key_condition_expression(condition)
                .filter_expression("#exp > :now")
                .set_expression_attribute_names(Some(names.clone()))
                .set_expression_attribute_values(Some(values.clone()))
                .scan_index_forward(forward)
                .consistent_read(ReadOp::QueryEvents.consistent_read())
                .limit(i32::try_from(limit - events.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| StoreError::backend("Query events", e))?;
            for item in out.items.unwrap_or_default() {
                // An item that is not an event (written by hand, or by a newer version) is
                // skipped, as the fan-out skips it: one bad item must not make the history
                // unreadable for its whole retention.
                let seq = item.get(keys::SEQ).and_then(|v| v.as_n().ok()).cloned();
                match serde_dynamo::from_item::<_, EventItem>(item)
                    .map_err(|e| e.to_string())
                    .and_then(|i| StoredEvent::try_from(i).map_err(|e| e.to_string()))
                {
                    Ok(event) => events.push(event),
                    Err(e) => {
                        tracing::warn!(?seq, error = %e, "skipping an events-table item that is not a chat event")
                    }
                }
            }
            match out.last_evaluated_key {
                Some(key) if events.len() < limit => start = Some(key),
                Some(_) => break,
                None => return Ok(EventsPage { events, next: None }),
            }
        }
        let next = events.last().map(|e| e.seq);
        Ok(EventsPage { events, next })
    }
}

#[async_trait]
impl ChatStore for DynamoStore {
    async fn add_identified_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        now_ms: i64,
    ) -> Result<Connection, StoreError> {
        self.v1_add_identified_connection(connection_id, identity, now_ms)
            .await
    }

    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.v1_connection(connection_id, now_ms).await
    }

    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .v1_set_name(connection_id, name, now_ms)
            .await?
            .into_iter()
            .collect())
    }

    async fn join_room(
        &self,
        _connection_id: &str,
        _room: &str,
        _max_rooms: usize,
        _now_ms: i64,
    ) -> Result<Joined, StoreError> {
        Err(StoreError::Malformed("layout 1 has no rooms".into()))
    }

    async fn leave_room(
        &self,
        _connection_id: &str,
        room: &str,
        _reason: LeaveReason,
        _now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        Err(StoreError::NotAMember(room.to_owned()))
    }

    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        if room != keys::DEFAULT_ROOM {
            return Err(StoreError::NotAMember(room.to_owned()));
        }
        self.v1_post_public(connection_id, message, now_ms).await
    }

    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.v1_post_private(connection_id, to, message, now_ms)
            .await
    }

    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        Ok(self
            .v1_remove_connection(connection_id, reason, now_ms)
            .await?
            .into_iter()
            .collect())
    }

    async fn remove_connections(
        &self,
        connection_ids: &[String],
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.v1_remove_connections(connection_ids, reason, now_ms)
            .await
    }

    async fn take_request_token(
        &self,
        connection_id: &str,
        limit: RateLimit,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        self.v1_take_request_token(connection_id, limit, now_ms)
            .await
    }

    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.v1_schedule_redelivery(redelivery, now_ms).await
    }

    async fn member_shards(&self, _room: &str, _now_ms: i64) -> Result<u32, StoreError> {
        Ok(1)
    }

    async fn members_page(
        &self,
        room: &str,
        _shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        if room != keys::DEFAULT_ROOM {
            return Ok(MembersPage::default());
        }
        self.v1_members_page(after, now_ms).await
    }

    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        if room != keys::DEFAULT_ROOM {
            return Ok(EventsPage::default());
        }
        self.v1_read_events(range, limit, now_ms).await
    }
}

/// Creates the two tables with exactly the keys, stream and TTL of template.yaml, unless they
/// exist already, and waits until they are active. Used by tests and by local runs against
/// moto or DynamoDB Local; on AWS, CloudFormation creates them.
pub async fn create_tables(client: &Client, tables: &Tables) -> Result<(), StoreError> {
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .map_err(build_err)
    };
    let attr = |name: &str, t: ScalarAttributeType| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(t)
            .build()
            .map_err(build_err)
    };
    let specs = [
        (
            &tables.events,
            [
                key(keys::PK, KeyType::Hash)?,
                key(keys::SEQ, KeyType::Range)?,
            ],
            [
                attr(keys::PK, ScalarAttributeType::S)?,
                attr(keys::SEQ, ScalarAttributeType::N)?,
            ],
            true,
        ),
        (
            &tables.connections,
            [
                key(keys::PK, KeyType::Hash)?,
                key(keys::SK, KeyType::Range)?,
            ],
            [
                attr(keys::PK, ScalarAttributeType::S)?,
                attr(keys::SK, ScalarAttributeType::S)?,
            ],
            false,
        ),
    ];
    for (name, key_schema, attrs, stream) in specs {
        let mut req = client
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest)
            .set_key_schema(Some(key_schema.to_vec()))
            .set_attribute_definitions(Some(attrs.to_vec()));
        if stream {
            req = req.stream_specification(
                StreamSpecification::builder()
                    .stream_enabled(true)
                    .stream_view_type(StreamViewType::NewImage)
                    .build()
                    .map_err(build_err)?,
            );
        }
        match req.send().await {
            Ok(_) => {}
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_in_use_exception()) =>
            {
                continue
            }
            Err(e) => return Err(StoreError::backend("CreateTable", e)),
        }
        wait_active(client, name).await?;
        client
            .update_time_to_live()
            .table_name(name)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .attribute_name(keys::EXPIRES_AT)
                    .enabled(true)
                    .build()
                    .map_err(build_err)?,
            )
            .send()
            .await
            .map_err(|e| StoreError::backend("UpdateTimeToLive", e))?;
    }
    Ok(())
}

async fn wait_active(client: &Client, table: &str) -> Result<(), StoreError> {
    for _ in 0..120 {
        let out = client
            .describe_table()
            .table_name(table)
            .send()
            .await
            .map_err(|e| StoreError::backend("DescribeTable", e))?;
        if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(StoreError::backend(
        "DescribeTable",
        format!("table {table} did not become ACTIVE within 60 s"),
    ))
}
