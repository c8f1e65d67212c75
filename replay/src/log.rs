//! Reading one room's event log in id order, in constant memory, and listing the rooms.
//!
//! The log is read with `Query` on `pk = ROOM#<room>` and the id range as the key condition, so
//! DynamoDB itself stops at the range's end; the time range is a filter expression (`ts` is not
//! a key, and commit times from different writers are not strictly ordered, so no id bound can
//! be derived from a time). Pages are fetched by a background task one page ahead of the
//! consumer through a channel of one page: the next page's round trip overlaps the work on the
//! current one, and at most three pages (the one being used, the one in the channel, the one
//! being fetched) exist at any time, whatever the range's size.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;
use chat_shared::events::{EventItem, StoredEvent};
use chat_shared::keys;
use chat_shared::store::epoch_secs;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::aws::classify;
use crate::error::ReplayError;
use crate::range::EventFilter;

/// The commit-time attribute of an event item (`keys` documents it but has no constant for it).
const TS: &str = "ts";

/// Items per `Query` page: large enough that round trips do not dominate, small enough that
/// a page (≤ 1 MB on the wire either way) stays a small, fixed amount of memory.
pub const DEFAULT_PAGE_SIZE: i32 = 1_000;

/// Whether events past their retention (`expiresAt <= now`) are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// Skip them, as every read of the chat does (TTL deletion is only eventual).
    Skip,
    /// Read them too: they still occupy their ids, and they are still facts about who joined
    /// and left (the rebuild needs both).
    Include,
}

/// One item of the log: an event, or an item that does not decode as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Event(StoredEvent),
    Malformed {
        /// The item's `seq`, as far as it could be read.
        seq: String,
        detail: String,
    },
}

/// A room's event log in one table.
#[derive(Debug, Clone)]
pub struct EventLog {
    client: Client,
    table: String,
    room: String,
    /// The endpoint's label, for errors.
    at: String,
    page_size: i32,
}

impl EventLog {
    pub fn new(client: Client, table: &str, room: &str, at: &str) -> Self {
        EventLog {
            client,
            table: table.to_owned(),
            room: room.to_owned(),
            at: at.to_owned(),
            page_size: DEFAULT_PAGE_SIZE,
        }
    }

    /// The same table's log of another room.
    pub fn in_room(&self, room: &str) -> Self {
        EventLog {
            room: room.to_owned(),
            ..self.clone()
        }
    }

    /// Items per `Query` page (at least 1).
    pub fn with_page_size(mut self, page_size: i32) -> Self {
        self.page_size = page_size.max(1);
        self
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    pub fn room(&self) -> &str {
        &self.room
    }

    pub fn at(&self) -> &str {
        &self.at
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Fails with a clear error if the table does not exist or the endpoint does not answer.
    pub async fn ensure_exists(&self) -> Result<(), ReplayError> {
        crate::aws::ensure_table(&self.client, &self.table, &self.at).await
    }

    /// The events selected by `filter`, page by page in id order. Must be called within a
    /// tokio runtime (the pages are fetched by a task); dropping the [`Pages`] stops it.
    pub fn pages(&self, filter: &EventFilter, expired: Expired, now_ms: i64) -> Pages {
        let query = self.query(filter, expired, now_ms);
        let (tx, rx) = mpsc::channel(1);
        let task = tokio::spawn(fetch(query, tx));
        Pages { rx, task }
    }

    fn query(&self, filter: &EventFilter, expired: Expired, now_ms: i64) -> PageQuery {
        let mut names = HashMap::from([("#pk".to_owned(), keys::PK.to_owned())]);
        let mut values = HashMap::from([(
            ":pk".to_owned(),
            AttributeValue::S(keys::room_pk(&self.room)),
        )]);
        // DynamoDB refuses placeholders a request does not use, so each is added with its use.
        // Ids start at 1: the item at `seq = 0` is the room's counter, not an event.
        let from = filter.from_id.unwrap_or(1).max(1);
        values.insert(":from".into(), n(from));
        let key_condition = match filter.to_id {
            None => "#pk = :pk AND #seq >= :from",
            Some(to) => {
                values.insert(":to".into(), n(to));
                "#pk = :pk AND #seq BETWEEN :from AND :to"
            }
        };
        names.insert("#seq".into(), keys::SEQ.to_owned());
        let mut filters = Vec::new();
        if expired == Expired::Skip {
            names.insert("#exp".into(), keys::EXPIRES_AT.to_owned());
            values.insert(":now".into(), n(epoch_secs(now_ms)));
            filters.push("#exp > :now");
        }
        if filter.since_ms.is_some() || filter.until_ms.is_some() {
            names.insert("#ts".into(), TS.to_owned());
        }
        if let Some(since) = filter.since_ms {
            values.insert(":since".into(), n(since));
            filters.push("#ts >= :since");
        }
        if let Some(until) = filter.until_ms {
            values.insert(":until".into(), n(until));
            filters.push("#ts <= :until");
        }
        PageQuery {
            client: self.client.clone(),
            table: self.table.clone(),
            at: self.at.clone(),
            key_condition,
            filter: (!filters.is_empty()).then(|| filters.join(" AND ")),
            names,
            values,
            page_size: self.page_size,
        }
    }
}

/// Every room of the events table, in name order: the partitions that have a counter item
/// (`seq = 0`, see `chat_shared::keys`), and `lobby`, which a table written before rooms
/// may hold without one.
///
/// There is no index of rooms, so this is a `Scan` of the whole table (it pays for every item
/// it reads, events included): an operator's occasional listing, not something the chat does.
pub async fn rooms(client: &Client, table: &str, at: &str) -> Result<Vec<String>, ReplayError> {
    let mut rooms = std::collections::BTreeSet::from([keys::DEFAULT_ROOM.to_owned()]);
    let mut start = None;
    loop {
        let out = client
            .scan()
            .table_name(table)
            .filter_expression("#seq = :counter AND begins_with(#pk, :room)")
            .projection_expression("#pk")
            .expression_attribute_names("#pk", keys::PK)
            .expression_attribute_names("#seq", keys::SEQ)
            .expression_attribute_values(":counter", n(keys::COUNTER_SEQ))
            .expression_attribute_values(":room", AttributeValue::S(keys::room_pk("")))
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .map_err(|e| classify(e, "Scan", table, at))?;
        for item in out.items.unwrap_or_default() {
            if let Some(AttributeValue::S(pk)) = item.get(keys::PK) {
                if let Some(room) = pk.strip_prefix(&keys::room_pk("")) {
                    rooms.insert(room.to_owned());
                }
            }
        }
        match out.last_evaluated_key {
            Some(key) => start = Some(key),
            None => return Ok(rooms.into_iter().collect()),
        }
    }
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// One `Query`, ready to be sent page after page.
struct PageQuery {
    client: Client,
    table: String,
    at: String,
    key_condition: &'static str,
    filter: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
    page_size: i32,
}

/// The pages of one read, in id order.
#[derive(Debug)]
pub struct Pages {
    rx: mpsc::Receiver<Result<Vec<Entry>, ReplayError>>,
    task: JoinHandle<()>,
}

impl Pages {
    /// The next page (possibly empty when a filter removed all of its items); `None` once the
    /// range is exhausted. After an error no more pages follow.
    pub async fn next(&mut self) -> Option<Result<Vec<Entry>, ReplayError>> {
        self.rx.recv().await
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // A consumer that stops early (an error, a closed pipe) must not leave a task paging
        // through the rest of the table.
        self.task.abort();
    }
}

async fn fetch(query: PageQuery, tx: mpsc::Sender<Result<Vec<Entry>, ReplayError>>) {
    let mut start: Option<HashMap<String, AttributeValue>> = None;
    loop {
        let sent = query
            .client
            .query()
            .table_name(&query.table)
            .key_condition_expression(query.key_condition)
            .set_filter_expression(query.filter.clone())
            .set_expression_attribute_names(Some(query.names.clone()))
            .set_expression_attribute_values(Some(query.values.clone()))
            .scan_index_forward(true)
            // An operator reading right after an incident wants every committed event.
            .consistent_read(true)
            .limit(query.page_size)
            .set_exclusive_start_key(start.take())
            .send()
            .await;
        let out = match sent {
            Ok(out) => out,
            Err(e) => {
                // The receiver may be gone already; then nobody needs the error either.
                let _ = tx
                    .send(Err(classify(e, "Query", &query.table, &query.at)))
                    .await;
                return;
            }
        };
        let next = out.last_evaluated_key;
        let entries = out
            .items
            .unwrap_or_default()
            .into_iter()
            .map(decode)
            .collect();
        if tx.send(Ok(entries)).await.is_err() {
            return;
        }
        match next {
            Some(key) => start = Some(key),
            None => return,
        }
    }
}

fn decode(item: HashMap<String, AttributeValue>) -> Entry {
    let seq = match item.get(keys::SEQ) {
        Some(AttributeValue::N(seq)) => seq.clone(),
        _ => "?".to_owned(),
    };
    let item: EventItem = match serde_dynamo::from_item(item) {
        Ok(item) => item,
        Err(e) => {
            return Entry::Malformed {
                seq,
                detail: e.to_string(),
            }
        }
    };
    match StoredEvent::try_from(item) {
        Ok(event) => Entry::Event(event),
        Err(e) => Entry::Malformed {
            seq,
            detail: e.to_string(),
        },
    }
}
