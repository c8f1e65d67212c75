//! The fan-out with rooms, on the embedded store and its change feed (the records DynamoDB
//! Streams would carry, counter records included), delivering to an in-process `@connections`
//! that records what each connection got:
//! - an event of a room reaches that room's members only, and reads only that room;
//! - presence changes of different rooms in one batch stay apart: each room sees its own;
//! - the rooms' counter records are skipped silently, without a store read;
//! - a large room's member shards are read in parallel, at most
//!   [`chat_shared::fanout::SHARDS_AT_ONCE`] at a time, and delivered page by page.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use chat_shared::config::{FanoutConfig, Retention};
use chat_shared::delivery::{Deliver, DeliveryError};
use chat_shared::events::{LeaveReason, StoredEvent};
use chat_shared::fanout::{handle_stream_event, SHARDS_AT_ONCE};
use chat_shared::ratelimit::{RequestLimits, Verdict};
use chat_shared::redelivery::Redelivery;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::requests::{Once, RequestKey};
use chat_shared::store::{
    Admission, ChatStore, Connection, EventRange, EventsPage, Joined, MembersPage, StoreError,
};
use chat_shared::stream::RecordSource;
use chat_shared::validation::{validate_name, ValidName};
use chat_tests::logs::Logs;
use serde_json::{json, Value};
use tracing::Level;

/// `@connections`, in process: every frame each connection got, in order.
#[derive(Default)]
struct Recorder {
    frames: Mutex<BTreeMap<String, Vec<Value>>>,
    /// Set at the first post: how many member pages had been read by then.
    pages_at_first_post: Mutex<Option<usize>>,
    pages: Arc<AtomicUsize>,
}

impl Recorder {
    fn watching(pages: Arc<AtomicUsize>) -> Self {
        Recorder {
            pages,
            ..Recorder::default()
        }
    }

    /// What `id` got, each frame without `ts`.
    fn got(&self, id: &str) -> Vec<Value> {
        self.frames
            .lock()
            .expect("frames lock")
            .get(id)
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .map(|mut f| {
                f.as_object_mut().expect("object").remove("ts");
                f
            })
            .collect()
    }

    fn recipients(&self) -> BTreeSet<String> {
        self.frames
            .lock()
            .expect("frames lock")
            .keys()
            .cloned()
            .collect()
    }
}

#[async_trait]
impl Deliver for Recorder {
    async fn post(&self, connection_id: &str, data: &[u8]) -> Result<(), DeliveryError> {
        self.pages_at_first_post
            .lock()
            .expect("first post lock")
            .get_or_insert_with(|| self.pages.load(Ordering::SeqCst));
        let frame: Value = serde_json::from_slice(data).expect("frames are JSON");
        self.frames
            .lock()
            .expect("frames lock")
            .entry(connection_id.to_owned())
            .or_default()
            .push(frame);
        Ok(())
    }
}

/// The embedded store, watched: which rooms' members it was asked for, how many member pages
/// it served, and how many member reads were in flight at once. With `barrier` set, the first
/// member reads wait (up to 1 s) until that many are in flight before any answers: reads that
/// are parallel pile up there, as many as the reader lets run at once; reads one after the
/// other never do (the first waits the second out alone), so the most ever in flight is the
/// reader's real parallelism, whether it is 1, its bound, or every shard. `shards` makes the room report more shards
/// than its members need, as a room that once grew large does (shards never shrink).
struct Watched {
    inner: EmbeddedStore,
    member_rooms: Mutex<BTreeSet<String>>,
    pages: Arc<AtomicUsize>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    barrier: Option<usize>,
    shards: Option<u32>,
    other_reads: AtomicUsize,
    reads_on: AtomicBool,
}

impl Watched {
    fn new(inner: EmbeddedStore) -> Self {
        Watched {
            inner,
            member_rooms: Mutex::default(),
            pages: Arc::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            barrier: None,
            shards: None,
            other_reads: AtomicUsize::new(0),
            reads_on: AtomicBool::new(false),
        }
    }

    /// Counts the reads from now on (the setup's own reads are not the fan-out's).
    fn watch(&self) {
        self.reads_on.store(true, Ordering::SeqCst);
    }

    fn read(&self) {
        if self.reads_on.load(Ordering::SeqCst) {
            self.other_reads.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[async_trait]
impl ChatStore for Watched {
    async fn open_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        admission: Option<Admission<'_>>,
        batch: bool,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.inner
            .open_connection(connection_id, identity, admission, batch, now_ms)
            .await
    }
    async fn release_connection_slot(
        &self,
        principal: &str,
        connection_id: &str,
    ) -> Result<(), StoreError> {
        self.inner
            .release_connection_slot(principal, connection_id)
            .await
    }
    async fn take_presence_budget(
        &self,
        room: &str,
        budget: chat_shared::presence::PresenceBudget,
        now_ms: i64,
    ) -> Result<chat_shared::presence::BudgetVerdict, StoreError> {
        self.inner.take_presence_budget(room, budget, now_ms).await
    }
    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.read();
        self.inner.connection(connection_id, now_ms).await
    }
    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.set_name(connection_id, name, now_ms).await
    }
    async fn join_room(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        now_ms: i64,
    ) -> Result<Joined, StoreError> {
        self.inner
            .join_room(connection_id, room, max_rooms, now_ms)
            .await
    }
    async fn leave_room(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.inner
            .leave_room(connection_id, room, reason, now_ms)
            .await
    }
    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.inner
            .post_to_room(connection_id, room, message, now_ms)
            .await
    }
    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.inner
            .post_private(connection_id, to, message, now_ms)
            .await
    }
    async fn set_name_once(
        &self,
        connection_id: &str,
        name: &ValidName,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Vec<StoredEvent>>, StoreError> {
        self.inner
            .set_name_once(connection_id, name, request, now_ms)
            .await
    }
    async fn join_room_once(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Joined>, StoreError> {
        self.inner
            .join_room_once(connection_id, room, max_rooms, request, now_ms)
            .await
    }
    async fn leave_room_once(
        &self,
        connection_id: &str,
        room: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.inner
            .leave_room_once(connection_id, room, request, now_ms)
            .await
    }
    async fn post_to_room_once(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.inner
            .post_to_room_once(connection_id, room, message, request, now_ms)
            .await
    }
    async fn post_private_once(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.inner
            .post_private_once(connection_id, to, message, request, now_ms)
            .await
    }
    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner
            .remove_connection(connection_id, reason, now_ms)
            .await
    }
    async fn remove_expired(
        &self,
        gone: &chat_shared::store::items::ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.remove_expired(gone, now_ms).await
    }
    async fn take_request_token(
        &self,
        connection_id: &str,
        limits: &RequestLimits<'_>,
        now_ms: i64,
    ) -> Result<Verdict, StoreError> {
        self.inner
            .take_request_token(connection_id, limits, now_ms)
            .await
    }
    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner.schedule_redelivery(redelivery, now_ms).await
    }
    async fn member_shards(&self, room: &str, now_ms: i64) -> Result<u32, StoreError> {
        self.member_rooms
            .lock()
            .expect("rooms lock")
            .insert(room.to_owned());
        let real = self.inner.member_shards(room, now_ms).await?;
        Ok(self.shards.map_or(real, |s| s.max(real)))
    }
    async fn members_page(
        &self,
        room: &str,
        shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        self.member_rooms
            .lock()
            .expect("rooms lock")
            .insert(room.to_owned());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        if let Some(n) = self.barrier {
            // Only the first wave waits: once a page has been served, reads answer at once.
            let until = tokio::time::Instant::now() + Duration::from_secs(1);
            while self.in_flight.load(Ordering::SeqCst) < n
                && self.pages.load(Ordering::SeqCst) == 0
                && tokio::time::Instant::now() < until
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        let page = self.inner.members_page(room, shard, after, now_ms).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.pages.fetch_add(1, Ordering::SeqCst);
        page
    }
    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        self.read();
        self.inner.read_events(room, range, limit, now_ms).await
    }
}

const NOW: i64 = 1_800_000_000_000;

/// Connects `id`, names it `name` (so it is in lobby) and joins it to `rooms`.
async fn member(store: &dyn ChatStore, id: &str, name: &str, rooms: &[&str]) {
    store.add_connection(id, NOW).await.expect("connect");
    store
        .set_name(id, &validate_name(name).expect("name"), NOW)
        .await
        .expect("name");
    for room in rooms {
        assert!(matches!(
            store.join_room(id, room, 50, NOW).await.expect("join"),
            Joined::Now(_)
        ));
    }
}

/// Every record on the feed after `skip` records (the setup's), as one batch.
async fn batch(store: &EmbeddedStore, skip: usize) -> Vec<EventRecord> {
    let mut feed = store.feed();
    let records = feed
        .poll(100_000, Duration::from_millis(100))
        .await
        .expect("feed");
    records.into_iter().skip(skip).collect()
}

async fn feed_len(store: &EmbeddedStore) -> usize {
    batch(store, 0).await.len()
}

fn event(records: Vec<EventRecord>) -> Event {
    let mut event = Event::default();
    event.records = records;
    event
}

fn counter_records(records: &[EventRecord]) -> usize {
    records
        .iter()
        .filter(|r| {
            matches!(
                r.change.new_image.get("type"),
                Some(serde_dynamo::AttributeValue::S(t)) if t == "Counter"
            )
        })
        .count()
}

#[tokio::test]
async fn an_event_of_a_room_reaches_its_members_only_and_reads_that_room_only() {
    // GIVEN alice and bob in lobby; alice and carol in ops; dave in dev
    let embedded = EmbeddedStore::new(Retention::default());
    let store = Watched::new(embedded.clone());
    member(&store, "A", "alice", &["ops"]).await;
    member(&store, "B", "bob", &[]).await;
    member(&store, "C", "carol", &["ops"]).await;
    member(&store, "D", "dave", &["dev"]).await;
    let setup = feed_len(&embedded).await;
    // WHEN alice posts in ops and the fan-out handles the batch
    let posted = store
        .post_to_room("A", "ops", "deploy at 5", NOW)
        .await
        .expect("post");
    let records = batch(&embedded, setup).await;
    assert_eq!(
        counter_records(&records),
        1,
        "the post's counter record is on the feed, as DynamoDB Streams would carry it"
    );
    let recorder = Recorder::default();
    let response = handle_stream_event(
        &store,
        &recorder,
        &FanoutConfig::default(),
        event(records),
        || NOW,
        None,
    )
    .await;
    // THEN ops's members, and only they, got the frame, tagged with ops and ops's id
    assert!(response.batch_item_failures.is_empty());
    let frame = json!({"publicMessage":"alice: deploy at 5","room":"ops","id":posted.seq});
    assert_eq!(posted.seq, 3, "ops's third event: two joins, then the post");
    assert_eq!(recorder.got("A"), vec![frame.clone()]);
    assert_eq!(recorder.got("C"), vec![frame]);
    assert_eq!(
        recorder.recipients(),
        BTreeSet::from(["A".to_owned(), "C".to_owned()])
    );
    // AND the only member list read was ops's
    assert_eq!(
        *store.member_rooms.lock().expect("rooms"),
        BTreeSet::from(["ops".to_owned()])
    );
}

#[tokio::test]
async fn a_disconnect_in_two_rooms_is_one_batch_and_each_room_sees_its_own_leave() {
    // GIVEN alice in lobby and ops, bob in lobby, carol in lobby and ops, dave in ops
    let embedded = EmbeddedStore::new(Retention::default());
    let store = Watched::new(embedded.clone());
    member(&store, "A", "alice", &["ops"]).await;
    member(&store, "B", "bob", &[]).await;
    member(&store, "C", "carol", &["ops"]).await;
    member(&store, "D", "dave", &["ops"]).await;
    store
        .leave_room("D", "lobby", LeaveReason::Left, NOW)
        .await
        .expect("dave leaves lobby");
    let setup = feed_len(&embedded).await;
    // WHEN alice disconnects and her two leaves reach the fan-out in one batch, as
    // consecutive presence changes (which a single room would coalesce into one unit)
    let left = store
        .remove_connection("A", LeaveReason::Disconnected, NOW)
        .await
        .expect("disconnect");
    assert_eq!(
        left.iter().map(|e| e.room.as_str()).collect::<Vec<_>>(),
        vec!["lobby", "ops"]
    );
    let records = batch(&embedded, setup).await;
    let recorder = Recorder::default();
    let response = handle_stream_event(
        &store,
        &recorder,
        &FanoutConfig::default(),
        event(records),
        || NOW,
        None,
    )
    .await;
    assert!(response.batch_item_failures.is_empty());
    // THEN each room's members got that room's leave: its own message and member list
    let leave = |room: &str, id: u64, list: &[&str]| {
        vec![
            json!({"systemMessage":"alice has left the chat","room":room,"id":id}),
            json!({"members":list,"room":room,"id":id}),
        ]
    };
    let lobby = leave("lobby", left[0].seq, &["bob", "carol"]);
    let ops = leave("ops", left[1].seq, &["carol", "dave"]);
    assert_eq!(recorder.got("B"), lobby);
    assert_eq!(recorder.got("D"), ops);
    let carol = recorder.got("C");
    assert_eq!(carol, [lobby, ops].concat());
}

#[tokio::test]
async fn counter_records_are_skipped_without_a_store_read() {
    // GIVEN a batch of nothing but rooms' counter records (INSERT, then MODIFYs)
    let embedded = EmbeddedStore::new(Retention::default());
    let store = Watched::new(embedded.clone());
    member(&store, "A", "alice", &["ops", "dev"]).await;
    store
        .post_to_room("A", "ops", "x", NOW)
        .await
        .expect("post");
    let counters: Vec<EventRecord> = batch(&embedded, 0)
        .await
        .into_iter()
        .filter(|r| counter_records(std::slice::from_ref(r)) == 1)
        .collect();
    assert!(
        counters.iter().any(|r| r.event_name == "INSERT")
            && counters.iter().any(|r| r.event_name == "MODIFY"),
        "the feed carries the counters' INSERT and MODIFY records"
    );
    assert_eq!(
        counters.len(),
        4,
        "one per append: lobby, ops, dev joins, the post"
    );
    // WHEN the fan-out handles it
    store.watch();
    let recorder = Recorder::default();
    let logs = Logs::new();
    let response = logs
        .capture(handle_stream_event(
            &store,
            &recorder,
            &FanoutConfig::default(),
            event(counters),
            || NOW,
            None,
        ))
        .await;
    // THEN nothing failed, nothing was delivered, and the store was not read at all
    assert!(response.batch_item_failures.is_empty());
    // AND silently: they are expected records, not undecodable ones worth a warning
    assert_eq!(logs.at_least(Level::WARN), vec![]);
    assert!(recorder.recipients().is_empty());
    assert!(store.member_rooms.lock().expect("rooms").is_empty());
    assert_eq!(store.other_reads.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_large_rooms_shards_are_read_in_parallel_at_most_eight_at_a_time_page_by_page() {
    // GIVEN a room that reports 12 member shards (it once grew large; shards never shrink) with
    // 1,000 members now, in pages of 50, beside 50 other rooms of 3 members each
    const MEMBERS: usize = 1_000;
    const SHARDS: u32 = 12;
    let embedded = EmbeddedStore::new(Retention::default()).with_page_limit(50);
    let mut store = Watched::new(embedded.clone());
    // Room for every shard at the barrier: only the fan-out's own bound keeps it lower.
    store.barrier = Some(SHARDS as usize);
    store.shards = Some(SHARDS);
    for i in 0..MEMBERS {
        member(&store, &format!("m{i}"), &format!("m{i}"), &["big"]).await;
    }
    for r in 0..50 {
        for j in 0..3 {
            let id = format!("r{r}-{j}");
            member(&store, &id, &id, &[&format!("room-{r}")]).await;
        }
    }
    let setup = feed_len(&embedded).await;
    store
        .post_to_room("m0", "big", "to everyone in big", NOW)
        .await
        .expect("post");
    let records = batch(&embedded, setup).await;
    // WHEN the fan-out delivers it, 4 recipients at a time
    let recorder = Recorder::watching(Arc::clone(&store.pages));
    let config = FanoutConfig {
        concurrency: 4,
        ..FanoutConfig::default()
    };
    let response =
        handle_stream_event(&store, &recorder, &config, event(records), || NOW, None).await;
    assert!(response.batch_item_failures.is_empty());
    // THEN every member of big got it once, and nobody else
    let expected: BTreeSet<String> = (0..MEMBERS).map(|i| format!("m{i}")).collect();
    assert_eq!(recorder.recipients(), expected);
    assert!(expected.iter().all(|id| recorder.got(id).len() == 1));
    assert_eq!(
        *store.member_rooms.lock().expect("rooms"),
        BTreeSet::from(["big".to_owned()])
    );
    // AND the shards were read in parallel, never more than eight at once
    assert_eq!(store.max_in_flight.load(Ordering::SeqCst), SHARDS_AT_ONCE);
    // AND delivery started long before the member list was read to its end: page by page,
    // never the whole room in memory
    let pages = store.pages.load(Ordering::SeqCst);
    let empty_shards = SHARDS as usize - 1;
    assert!(pages >= MEMBERS / 50 + empty_shards, "{pages} pages read");
    let first = recorder
        .pages_at_first_post
        .lock()
        .expect("first")
        .expect("a post");
    assert!(
        first <= empty_shards + 1 && first < pages / 2,
        "{first} of {pages} pages were read before the first delivery"
    );
}
