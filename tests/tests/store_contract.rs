//! The store contract: one suite of cases, each run against both adapters of [`ChatStore`] —
//! the embedded store (ideal, and AWS-like: latency, eventually consistent reads, contention)
//! and the DynamoDB store on a real DynamoDB API (moto) — so the embedded one cannot drift from
//! what DynamoDB does (a conditional write it forgets to reject, an expiry it forgets to apply,
//! a limit it forgets to enforce, ...).
//!
//! Each case is a plain async function over a [`Fixture`]: the store (used only through
//! `&dyn ChatStore`) and its change feed, read the way Lambda reads it. For DynamoDB that is
//! the event table's stream read back from moto; for the embedded store its [`EmbeddedFeed`].
//! Both are decoded the same way (`NewImage` → `EventItem` → `StoredEvent`, the fan-out's own
//! decoder), which also proves both feeds carry the same item shape.
//!
//! The rooms' counter items are on both feeds too (`type` `Counter`, seq 0); [`Fixture::committed`]
//! leaves them out, and `the_room_counters_are_on_the_feed_with_the_last_id_given` checks them.
//!
//! What only the DynamoDB store can show (items written, and tables replaced, by hand with the
//! SDK: member shards beyond what moto can join, a counter missing under a layout-1 log, a
//! replaced connections table) and what only the embedded store can show (moto has no TTL
//! sweeper, and failures cannot be injected into it) are tested after the shared cases.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::event::dynamodb::{EventRecord, StreamViewType};
use aws_sdk_dynamodb::types::AttributeValue as Av;
use chat_shared::config::{Retention, Tables};
use chat_shared::events::{ChatEvent, LeaveReason, StoredEvent};
use chat_shared::fanout::{decode_record, is_removal};
use chat_shared::keys;
use chat_shared::store::aws_like::{PartitionThroughput, ReadOp, StoreBehaviour};
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::embedded::THROTTLED;
use chat_shared::store::embedded::{EmbeddedFeed, EmbeddedStore};
use chat_shared::store::limits::{self, service_error};
use chat_shared::store::{
    epoch_secs, Admission, ChatStore, EventRange, Joined, Member, StoreError, DEFAULT_MAX_ROOMS,
    NAME_RESERVATION_SECS,
};
use chat_shared::stream::RecordSource;
use chat_shared::validation::{name_key, validate_name, ValidName};
use chat_tests::{unique_name, Moto, StreamReader};
use futures::StreamExt;

/// Members per page in every store under test, so a handful of members spans several pages.
const PAGE_LIMIT: usize = 2;

/// Where a fixture's committed events are read from.
enum Feed {
    /// The events table's stream, read back from moto.
    Dynamo(StreamReader),
    /// The embedded store's change feed.
    Embedded(EmbeddedFeed),
}

/// One store under test and its change feed.
struct Fixture {
    store: Arc<dyn ChatStore>,
    feed: Feed,
    /// Kept for the test's lifetime: dropping it kills moto.
    _moto: Option<Moto>,
    /// The longest an eventually consistent read can lag behind the writes.
    lag: Duration,
    /// The DynamoDB client and tables behind the store, for cases that look at or write items
    /// by hand (DynamoDB only).
    dynamo: Option<(aws_sdk_dynamodb::Client, Tables)>,
}

impl Fixture {
    fn embedded() -> Fixture {
        Self::embedded_with(StoreBehaviour::IDEAL)
    }

    /// The embedded store behaving as DynamoDB does, with its default figures.
    fn aws_like() -> Fixture {
        Self::embedded_with(StoreBehaviour::aws_like())
    }

    fn embedded_with(behaviour: StoreBehaviour) -> Fixture {
        Self::embedded_limited(
            behaviour,
            chat_shared::config::DEFAULT_PRESENCE_BROADCAST_LIMIT,
        )
    }

    /// An embedded store whose rooms turn large past `large_limit` members.
    fn embedded_limited(behaviour: StoreBehaviour, large_limit: usize) -> Fixture {
        let store = EmbeddedStore::new(Retention::default())
            .with_page_limit(PAGE_LIMIT)
            .with_behaviour(behaviour)
            .with_large_room_limit(large_limit);
        Fixture {
            feed: Feed::Embedded(store.feed()),
            store: Arc::new(store),
            _moto: None,
            lag: behaviour.eventual_max,
            dynamo: None,
        }
    }

    async fn dynamodb() -> Fixture {
        Self::dynamodb_limited(chat_shared::config::DEFAULT_PRESENCE_BROADCAST_LIMIT).await
    }

    /// The DynamoDB store whose rooms turn large past `large_limit` members.
    async fn dynamodb_limited(large_limit: usize) -> Fixture {
        let moto = Moto::start().await.expect("moto starts");
        let tables = Tables {
            events: unique_name("events"),
            connections: unique_name("connections"),
        };
        create_tables(&moto.dynamodb(), &tables)
            .await
            .expect("tables created");
        let store = DynamoStore::new(moto.dynamodb(), tables.clone(), Retention::default())
            .with_page_limit(PAGE_LIMIT as i32)
            .with_large_room_limit(large_limit);
        let reader = StreamReader::new(&moto.dynamodb(), moto.streams(), &tables.events)
            .await
            .expect("stream reader");
        Fixture {
            store: Arc::new(store),
            feed: Feed::Dynamo(reader),
            dynamo: Some((moto.dynamodb(), tables)),
            _moto: Some(moto),
            // moto serves every read strongly consistent.
            lag: Duration::ZERO,
        }
    }

    /// Waits until an eventually consistent read sees every write made so far. The member
    /// query is one (see `ReadOp::QueryMembers`), as on DynamoDB.
    async fn settle(&self) {
        if !self.lag.is_zero() {
            tokio::time::sleep(self.lag + Duration::from_millis(20)).await;
        }
    }

    fn store(&self) -> &dyn ChatStore {
        self.store.as_ref()
    }

    /// Every feed record not read before, as Lambda would be handed them.
    async fn records(&mut self) -> Vec<EventRecord> {
        match &mut self.feed {
            Feed::Dynamo(reader) => reader.next_event().await.expect("read stream").records,
            Feed::Embedded(feed) => {
                let mut records = Vec::new();
                loop {
                    let batch = feed.poll(100, Duration::ZERO).await.expect("poll feed");
                    let Some(last) = batch.last() else {
                        return records;
                    };
                    let seq = last
                        .change
                        .sequence_number
                        .clone()
                        .expect("records have sequence numbers");
                    feed.checkpoint(&seq);
                    records.extend(batch);
                }
            }
        }
    }

    /// The events committed since the last call, decoded from the feed's INSERT records (the
    /// rooms' counter records, which the fan-out skips, left out).
    async fn committed(&mut self) -> Vec<StoredEvent> {
        self.records()
            .await
            .iter()
            .filter(|r| !is_counter(r))
            .map(|r| {
                assert_eq!(r.event_name, "INSERT", "only inserts without a TTL sweep");
                decode_record(r)
                    .unwrap_or_else(|e| panic!("record decodes to an event: {e}: {r:?}"))
            })
            .collect()
    }
}

/// Whether a feed record is of a room's counter item (`type` `Counter`), not of an event.
fn is_counter(record: &EventRecord) -> bool {
    matches!(
        record.change.new_image.get(keys::TYPE),
        Some(serde_dynamo::AttributeValue::S(t)) if t == keys::COUNTER_TYPE
    )
}

fn name(raw: &str) -> ValidName {
    validate_name(raw).expect("valid name")
}

fn ttl_secs() -> i64 {
    Retention::default().connection_ttl.as_secs() as i64
}

/// A time at which everything connected at `now_ms` has expired.
fn past_connection_ttl(now_ms: i64) -> i64 {
    now_ms + (ttl_secs() + 1) * 1000
}

async fn join(store: &dyn ChatStore, id: &str, display: &str, now_ms: i64) -> StoredEvent {
    store.add_connection(id, now_ms).await.expect("connect");
    store
        .set_name(id, &name(display), now_ms)
        .await
        .expect("set name")
        .into_iter()
        .next()
        .expect("a first name records an event")
}

/// Every member, following `next` until it is `None`, checking each page's size.
async fn all_members(store: &dyn ChatStore, now_ms: i64) -> Vec<Member> {
    let mut members = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let page = store
            .members_page(keys::DEFAULT_ROOM, 0, after.as_deref(), now_ms)
            .await
            .expect("members page");
        assert!(page.members.len() <= PAGE_LIMIT, "page too big: {page:?}");
        members.extend(page.members);
        match page.next {
            Some(next) => after = Some(next),
            None => return members,
        }
    }
    panic!("members pagination did not end after 100 pages");
}

/// Every member of `room`, over all its shards (each followed to its last page), by
/// connection id.
async fn room_members(store: &dyn ChatStore, room: &str, now_ms: i64) -> Vec<Member> {
    let shards = store.member_shards(room, now_ms).await.expect("shards");
    let mut members = Vec::new();
    for shard in 0..shards {
        let mut after: Option<String> = None;
        loop {
            let page = store
                .members_page(room, shard, after.as_deref(), now_ms)
                .await
                .expect("members page");
            assert!(page.members.len() <= PAGE_LIMIT, "page too big: {page:?}");
            members.extend(page.members);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    members.sort_by(|a, b| a.connection_id.cmp(&b.connection_id));
    members
}

/// The connection ids of members.
fn ids(members: &[Member]) -> Vec<&str> {
    members.iter().map(|m| m.connection_id.as_str()).collect()
}

/// `join_room` that must make the connection a member now.
async fn join_room(store: &dyn ChatStore, id: &str, room: &str, now_ms: i64) -> StoredEvent {
    match store
        .join_room(id, room, DEFAULT_MAX_ROOMS, now_ms)
        .await
        .expect("join room")
    {
        Joined::Now(event) => event,
        Joined::Already { .. } => panic!("{id} was a member of {room} already"),
        Joined::Unsequenced { .. } => panic!("{id} joined {room} unsequenced"),
    }
}

/// Every event of `room`'s log, oldest first.
async fn room_log(store: &dyn ChatStore, room: &str, now_ms: i64) -> Vec<StoredEvent> {
    let page = store
        .read_events(room, EventRange::After(0), 1_000, now_ms)
        .await
        .expect("read events");
    assert_eq!(page.next, None);
    page.events
}

/// Events ordered by room, then id: the order within a room is the only order the feed (a
/// stream, ordered per item) and a per-room transaction sequence promise.
fn by_room(mut events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    events.sort_by(|a, b| (&a.room, a.seq).cmp(&(&b.room, b.seq)));
    events
}

// ---------------------------------------------------------------------------------------------
// The contract
// ---------------------------------------------------------------------------------------------

async fn a_connection_is_recorded_until_it_expires(f: &mut Fixture) {
    // GIVEN a connection made now
    let now = chat_shared::now_ms();
    let made = f.store().add_connection("c1", now).await.expect("connect");

    // WHEN it is read back, now and after its TTL, and an unknown one is read
    let read = f.store().connection("c1", now).await.expect("read");
    let unknown = f.store().connection("nobody", now).await.expect("read");
    let later = f
        .store()
        .connection("c1", past_connection_ttl(now))
        .await
        .expect("read");

    // THEN it lives at least as long as API Gateway keeps a connection, then is gone
    let read = read.expect("connection recorded");
    assert_eq!(read, made);
    assert_eq!(read.connected_at, now);
    assert_eq!(read.name, None);
    assert!(read.expires_at >= epoch_secs(now) + 7_200, "{read:?}");
    assert_eq!(unknown, None);
    assert_eq!(later, None);
    assert!(
        f.committed().await.is_empty(),
        "connecting records no event"
    );
}

async fn names_join_rename_and_free_the_old_name(f: &mut Fixture) {
    // GIVEN two connections
    let now = chat_shared::now_ms();
    let s = f.store();
    s.add_connection("a", now).await.expect("connect");
    s.add_connection("b", now).await.expect("connect");

    // WHEN a names itself, renames, repeats the name, changes only its case; b takes the old name
    let joined = s
        .set_name("a", &name("alice"), now)
        .await
        .expect("join")
        .into_iter()
        .next();
    let renamed = s
        .set_name("a", &name("al"), now)
        .await
        .expect("rename")
        .into_iter()
        .next();
    let same = s
        .set_name("a", &name("al"), now)
        .await
        .expect("same name")
        .into_iter()
        .next();
    let recased = s
        .set_name("a", &name("AL"), now)
        .await
        .expect("recase")
        .into_iter()
        .next();
    let taken_old = s
        .set_name("b", &name("alice"), now)
        .await
        .expect("old name")
        .into_iter()
        .next();

    // THEN join (id 1), rename (id 2), nothing, rename (id 3); the old name was free
    let joined = joined.expect("join recorded");
    assert_eq!(joined.seq, 1);
    assert_eq!(
        joined.event,
        ChatEvent::MemberJoined {
            connection_id: "a".into(),
            name: "alice".into()
        }
    );
    let renamed = renamed.expect("rename recorded");
    assert_eq!(renamed.seq, 2);
    assert_eq!(
        renamed.event,
        ChatEvent::MemberRenamed {
            connection_id: "a".into(),
            old_name: "alice".into(),
            name: "al".into()
        }
    );
    assert_eq!(same, None);
    let recased = recased.expect("a case change is a rename");
    assert_eq!(recased.seq, 3);
    assert_eq!(
        recased.event,
        ChatEvent::MemberRenamed {
            connection_id: "a".into(),
            old_name: "al".into(),
            name: "AL".into()
        }
    );
    let taken_old = taken_old.expect("b joins as alice");
    assert_eq!(taken_old.seq, 4);
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.name.as_deref(), Some("AL"));
    // The case change kept the claim: the name is still a's, whatever the case.
    s.add_connection("c", now).await.expect("connect");
    let err = s.set_name("c", &name("al"), now).await.expect_err("taken");
    assert!(
        matches!(err, StoreError::NameTaken(ref n) if n == "al"),
        "{err:?}"
    );
    assert_eq!(
        f.committed().await,
        vec![joined, renamed, recased, taken_old],
        "the feed has every event, once, in order"
    );
}

async fn a_name_taken_ignoring_case_is_refused_without_change(f: &mut Fixture) {
    // GIVEN alice has joined and bob is connected without a name
    let now = chat_shared::now_ms();
    let s = f.store();
    let joined = join(s, "a", "alice", now).await;
    s.add_connection("b", now).await.expect("connect");

    // WHEN bob asks for the same name in another case
    let err = s
        .set_name("b", &name("ALICE"), now)
        .await
        .expect_err("taken");

    // THEN NameTaken, and nothing changed: no name for bob, alice still alice, no event
    assert!(
        matches!(err, StoreError::NameTaken(ref n) if n == "ALICE"),
        "{err:?}"
    );
    let b = s.connection("b", now).await.expect("read").expect("b");
    assert_eq!(b.name, None);
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.name.as_deref(), Some("alice"));
    assert_eq!(f.committed().await, vec![joined]);
}

async fn racing_claims_for_one_name_have_exactly_one_winner(f: &mut Fixture) {
    let now = chat_shared::now_ms();
    let mut winners = Vec::new();
    for round in 0..10 {
        // GIVEN two connections
        let (x, y) = (format!("x{round}"), format!("y{round}"));
        f.store().add_connection(&x, now).await.expect("connect");
        f.store().add_connection(&y, now).await.expect("connect");

        // WHEN both claim the same name at once (separate tasks, so they really overlap)
        let wanted = name(&format!("racer{round}"));
        let claim = |id: String| {
            let store = Arc::clone(&f.store);
            let wanted = wanted.clone();
            tokio::spawn(async move { store.set_name(&id, &wanted, now).await })
        };
        let (rx, ry) = tokio::join!(claim(x.clone()), claim(y.clone()));
        let (rx, ry) = (rx.expect("task"), ry.expect("task"));

        // THEN exactly one wins; the other is told the name is taken and stays unnamed
        let (winner, won, lost, loser) = match (rx, ry) {
            (Ok(mut e), Err(l)) if e.len() == 1 => (x, e.remove(0), l, y),
            (Err(l), Ok(mut e)) if e.len() == 1 => (y, e.remove(0), l, x),
            other => panic!("round {round}: expected one winner, got {other:?}"),
        };
        assert!(matches!(lost, StoreError::NameTaken(_)), "{lost:?}");
        assert_eq!(
            won.event,
            ChatEvent::MemberJoined {
                connection_id: winner.clone(),
                name: wanted.display.clone()
            }
        );
        let loser_conn = f.store().connection(&loser, now).await.expect("read");
        assert_eq!(loser_conn.expect("loser still connected").name, None);
        winners.push(won);
    }
    assert_eq!(f.committed().await, winners, "one join per round, no more");
}

async fn an_expired_claim_can_be_taken_by_a_new_connection(f: &mut Fixture) {
    // GIVEN alice joined, and her connection has since expired (no $disconnect came)
    let now = chat_shared::now_ms();
    let later = past_connection_ttl(now);
    let s = f.store();
    let alice = join(s, "a", "alice", now).await;

    // WHEN a new connection asks for the name after the expiry
    let taken = join(s, "b", "ALICE", later).await;

    // THEN it gets it; the expired connection is gone for every operation
    assert_eq!(
        taken.event,
        ChatEvent::MemberJoined {
            connection_id: "b".into(),
            name: "ALICE".into()
        }
    );
    assert_eq!(s.connection("a", later).await.expect("read"), None);
    let err = s.post_public("a", "hi", later).await.expect_err("expired");
    assert!(
        matches!(err, StoreError::NotConnected(ref id) if id == "a"),
        "{err:?}"
    );
    let err = s
        .set_name("a", &name("alicia"), later)
        .await
        .expect_err("expired");
    assert!(matches!(err, StoreError::NotConnected(_)), "{err:?}");
    // Private messages to the name reach the new holder.
    let carol = join(s, "c", "carol", later).await;
    let private = s
        .post_private("c", "alice", "hello", later)
        .await
        .expect("private");
    assert_eq!(
        private.event,
        ChatEvent::PrivateMessageSent {
            connection_id: "c".into(),
            name: "carol".into(),
            to_connection_id: "b".into(),
            to_name: "ALICE".into(),
            message: "hello".into(),
            identity: None,
            to_identity: None,
        }
    );
    // A late $disconnect of the expired connection still removes it, and leaves b's claim alone.
    let left = s
        .remove_connection("a", LeaveReason::Disconnected, later)
        .await
        .expect("remove")
        .into_iter()
        .next()
        .expect("a had joined");
    assert_eq!(
        left.event,
        ChatEvent::MemberLeft {
            connection_id: "a".into(),
            name: "alice".into(),
            reason: LeaveReason::Disconnected
        }
    );
    s.add_connection("d", later).await.expect("connect");
    let err = s
        .set_name("d", &name("alice"), later)
        .await
        .expect_err("b still holds it");
    assert!(matches!(err, StoreError::NameTaken(_)), "{err:?}");
    assert_eq!(
        f.committed().await,
        vec![alice, taken, carol, private, left]
    );
}

async fn public_messages_need_a_named_connection(f: &mut Fixture) {
    // GIVEN alice has joined and u is connected without a name
    let now = chat_shared::now_ms();
    let s = f.store();
    let joined = join(s, "a", "alice", now).await;
    s.add_connection("u", now).await.expect("connect");

    // WHEN each posts, and so does a connection that never connected
    let unnamed = s.post_public("u", "hi", now).await.expect_err("no name");
    let unknown = s
        .post_public("ghost", "hi", now)
        .await
        .expect_err("unknown");
    let posted = s.post_public("a", "hello all", now).await.expect("post");

    // THEN only the member's message is recorded, with her name
    assert!(matches!(unnamed, StoreError::NameRequired), "{unnamed:?}");
    assert!(
        matches!(unknown, StoreError::NotConnected(ref id) if id == "ghost"),
        "{unknown:?}"
    );
    assert_eq!(posted.seq, 2);
    assert_eq!(posted.ts, now);
    assert_eq!(
        posted.event,
        ChatEvent::MessagePosted {
            connection_id: "a".into(),
            name: "alice".into(),
            message: "hello all".into()
        }
    );
    assert_eq!(f.committed().await, vec![joined, posted]);
}

async fn private_messages_reach_members_by_name(f: &mut Fixture) {
    // GIVEN alice and Bob have joined, u is connected without a name
    let now = chat_shared::now_ms();
    let s = f.store();
    let alice = join(s, "a", "alice", now).await;
    let bob = join(s, "b", "Bob", now).await;
    s.add_connection("u", now).await.expect("connect");

    // WHEN alice writes to " BOB " and to names nobody (or only an unnamed connection) has
    let sent = s
        .post_private("a", " BOB ", "psst", now)
        .await
        .expect("private");
    let unknown = s
        .post_private("a", "carol", "psst", now)
        .await
        .expect_err("unknown");
    let unnamed = s.post_private("a", "u", "psst", now).await.expect_err("u");
    let to_self = s
        .post_private("a", "ALICE", "psst", now)
        .await
        .expect_err("self");
    let from_unnamed = s
        .post_private("u", "alice", "psst", now)
        .await
        .expect_err("no name");
    let from_unknown = s
        .post_private("ghost", "alice", "psst", now)
        .await
        .expect_err("unknown sender");

    // THEN the message names the recipient as they call themselves; the rest are refused
    assert_eq!(
        sent.event,
        ChatEvent::PrivateMessageSent {
            connection_id: "a".into(),
            name: "alice".into(),
            to_connection_id: "b".into(),
            to_name: "Bob".into(),
            message: "psst".into(),
            identity: None,
            to_identity: None,
        }
    );
    assert!(
        matches!(unknown, StoreError::UnknownRecipient(ref n) if n == "carol"),
        "{unknown:?}"
    );
    assert!(
        matches!(unnamed, StoreError::UnknownRecipient(_)),
        "{unnamed:?}"
    );
    assert!(matches!(to_self, StoreError::SelfRecipient), "{to_self:?}");
    assert!(
        matches!(from_unnamed, StoreError::NameRequired),
        "{from_unnamed:?}"
    );
    assert!(
        matches!(from_unknown, StoreError::NotConnected(_)),
        "{from_unknown:?}"
    );
    assert_eq!(f.committed().await, vec![alice, bob, sent]);
}

async fn removing_a_connection_releases_its_name_once(f: &mut Fixture) {
    // GIVEN alice has joined and u is connected without a name
    let now = chat_shared::now_ms();
    let s = f.store();
    let joined = join(s, "a", "alice", now).await;
    s.add_connection("u", now).await.expect("connect");

    // WHEN alice is removed (twice), u is removed, and a never-connected id is removed
    let left = s
        .remove_connection("a", LeaveReason::Gone, now)
        .await
        .expect("remove")
        .into_iter()
        .next();
    let again = s
        .remove_connection("a", LeaveReason::Gone, now)
        .await
        .expect("remove again")
        .into_iter()
        .next();
    let unnamed = s
        .remove_connection("u", LeaveReason::Disconnected, now)
        .await
        .expect("remove unnamed")
        .into_iter()
        .next();
    let never = s
        .remove_connection("ghost", LeaveReason::Disconnected, now)
        .await
        .expect("remove unknown")
        .into_iter()
        .next();

    // THEN one MemberLeft with the reason; the others are no-ops; both connections are gone
    let left = left.expect("a member leaving is recorded");
    assert_eq!(
        left.event,
        ChatEvent::MemberLeft {
            connection_id: "a".into(),
            name: "alice".into(),
            reason: LeaveReason::Gone
        }
    );
    assert_eq!(again, None);
    assert_eq!(unnamed, None);
    assert_eq!(never, None);
    assert_eq!(s.connection("a", now).await.expect("read"), None);
    assert_eq!(s.connection("u", now).await.expect("read"), None);
    // AND the name is free again
    let rejoined = join(s, "b", "Alice", now).await;
    assert_eq!(f.committed().await, vec![joined, left, rejoined]);
}

async fn member_pages_list_every_live_member_once(f: &mut Fixture) {
    // GIVEN five members, one unnamed connection, and a member whose connection expires soon
    let now = chat_shared::now_ms();
    let s = f.store();
    let ids = ["m3", "M1", "m10", "zed", "m2"];
    for (i, id) in ids.iter().enumerate() {
        join(s, id, &format!("member{i}"), now).await;
    }
    s.add_connection("unnamed", now).await.expect("connect");
    // Connected long enough ago that it expires 100 s from now.
    let early = now - (ttl_secs() - 100) * 1000;
    join(s, "old", "old-timer", early).await;

    // WHEN every page is read now (past the member query's consistency lag), and again once
    // the old connection has expired
    f.settle().await;
    let current = all_members(s, now).await;
    let after_expiry = all_members(s, now + 200_000).await;

    // THEN each named, live member appears exactly once, in connection-id byte order (the
    // order of the connection items' sort keys); the unnamed and the expired ones never do
    let mut expected: Vec<&str> = ids.iter().copied().chain(["old"]).collect();
    expected.sort_unstable();
    let got: Vec<&str> = current.iter().map(|m| m.connection_id.as_str()).collect();
    assert_eq!(got, expected);
    let old = current
        .iter()
        .find(|m| m.connection_id == "old")
        .expect("old listed");
    assert_eq!(old.name, "old-timer");
    expected.retain(|id| *id != "old");
    let got: Vec<&str> = after_expiry
        .iter()
        .map(|m| m.connection_id.as_str())
        .collect();
    assert_eq!(got, expected);
}

async fn concurrent_posts_get_dense_ids_in_commit_order(f: &mut Fixture) {
    // GIVEN four members (events 1..=4)
    let now = chat_shared::now_ms();
    let mut returned = Vec::new();
    for i in 0..4 {
        returned.push(join(f.store(), &format!("p{i}"), &format!("poster{i}"), now).await);
    }

    // WHEN they post 20 messages at once, from separate tasks
    let posts: Vec<_> = (0..20)
        .map(|n| {
            let store = Arc::clone(&f.store);
            tokio::spawn(async move {
                store
                    .post_public(&format!("p{}", n % 4), &format!("message {n}"), now)
                    .await
            })
        })
        .collect();
    for post in posts {
        returned.push(post.await.expect("task").expect("every post succeeds"));
    }

    // THEN the ids are exactly 1..=24, each once
    let ids: BTreeSet<u64> = returned.iter().map(|e| e.seq).collect();
    assert_eq!(ids.len(), returned.len(), "no id given twice");
    assert_eq!(ids, (1..=24).collect::<BTreeSet<u64>>(), "ids are dense");
    // AND the feed delivers every committed event once, in id order, as it was returned
    let committed = f.committed().await;
    let seqs: Vec<u64> = committed.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=24).collect::<Vec<u64>>());
    let by_id: HashMap<u64, &StoredEvent> = returned.iter().map(|e| (e.seq, e)).collect();
    for event in &committed {
        assert_eq!(Some(&event), by_id.get(&event.seq), "event {}", event.seq);
    }
}

async fn feed_records_look_like_lambdas_and_decode_to_the_returned_events(f: &mut Fixture) {
    // GIVEN every kind of event, committed in turn
    let now = chat_shared::now_ms();
    let s = f.store();
    let mut returned = vec![
        join(s, "a", "alice", now).await,
        join(s, "b", "bob", now).await,
    ];
    returned.extend(
        s.set_name("a", &name("Alicia"), now)
            .await
            .expect("rename")
            .into_iter()
            .next(),
    );
    returned.push(s.post_public("a", "hello", now).await.expect("public"));
    returned.push(
        s.post_private("a", "bob", "psst", now)
            .await
            .expect("private"),
    );
    returned.extend(
        s.remove_connection("b", LeaveReason::Disconnected, now)
            .await
            .expect("leave")
            .into_iter()
            .next(),
    );

    // WHEN the feed is read (the rooms' counter records aside: see
    // `the_room_counters_are_on_the_feed_with_the_last_id_given`)
    let records: Vec<EventRecord> = f
        .records()
        .await
        .into_iter()
        .filter(|r| !is_counter(r))
        .collect();

    // THEN each record is an INSERT as Lambda presents it, keyed by the event's pk and seq,
    // in sequence-number order, and the new images decode to exactly the returned events
    assert_eq!(records.len(), returned.len());
    let mut last_sequence = 0u128;
    for (record, event) in records.iter().zip(&returned) {
        assert_eq!(record.event_name, "INSERT");
        assert_eq!(record.event_source.as_deref(), Some("aws:dynamodb"));
        assert_eq!(record.event_version.as_deref(), Some("1.1"));
        assert!(!record.event_id.is_empty());
        assert!(record
            .event_source_arn
            .as_deref()
            .is_some_and(|arn| arn.starts_with("arn:aws:dynamodb:")));
        assert_eq!(
            record.change.stream_view_type,
            Some(StreamViewType::NewImage)
        );
        assert_eq!(record.user_identity, None);
        let key_json: serde_json::Value =
            serde_json::to_value(&record.change.keys).expect("keys as JSON");
        assert_eq!(
            key_json,
            serde_json::json!({
                "pk": {"S": keys::room_pk(keys::DEFAULT_ROOM)},
                "seq": {"N": event.seq.to_string()}
            })
        );
        let sequence: u128 = record
            .change
            .sequence_number
            .as_deref()
            .expect("sequence number")
            .parse()
            .expect("sequence numbers are decimal");
        assert!(sequence > last_sequence, "sequence numbers increase");
        last_sequence = sequence;
        assert_eq!(&decode_record(record).expect("decodes"), event);
        // Lambda's JSON round-trips without loss.
        let json = serde_json::to_value(record).expect("record as JSON");
        let back: EventRecord = serde_json::from_value(json).expect("record from JSON");
        assert_eq!(&back, record);
    }
    assert_eq!(
        returned
            .iter()
            .map(|e| e.event.type_name())
            .collect::<Vec<_>>(),
        [
            "MemberJoined",
            "MemberJoined",
            "MemberRenamed",
            "MessagePosted",
            "PrivateMessageSent",
            "MemberLeft"
        ]
    );
}

/// Generates one test per case and store: `embedded::<case>` and `dynamodb::<case>`.
/// Multi-threaded runtimes, so cases that spawn concurrent writers really run them in parallel.
async fn each_connection_has_its_own_rate_limit_bucket(f: &mut Fixture) {
    use chat_shared::ratelimit::{RateLimit, RequestLimits, Verdict};
    // GIVEN two connections and a limit of 2/s with bursts of 3
    let limit = RateLimit {
        per_second: 2,
        burst: 3,
    };
    let now = chat_shared::now_ms();
    f.store().add_connection("c1", now).await.expect("connect");
    f.store().add_connection("c2", now).await.expect("connect");
    let take = |id: &'static str, at: i64| {
        let store = f.store();
        async move {
            store
                .take_request_token(id, &RequestLimits::connection_only(limit), at)
                .await
                .expect("take")
                == Verdict::Allowed
        }
    };

    // WHEN c1 makes four requests at once THEN the burst passes and the fourth is refused
    for _ in 0..3 {
        assert!(take("c1", now).await);
    }
    assert!(!take("c1", now).await);
    // AND c2 is unaffected
    assert!(take("c2", now).await);
    // AND half a second later c1 has one more token (2/s), not two
    assert!(take("c1", now + 500).await);
    assert!(!take("c1", now + 500).await);
    // AND an unknown connection is let through (its request fails as not_connected instead)
    assert!(take("nobody", now).await);
    // AND with the limit off everything passes
    let off = RateLimit {
        per_second: 0,
        burst: 0,
    };
    for _ in 0..10 {
        assert_eq!(
            f.store()
                .take_request_token("c1", &RequestLimits::connection_only(off), now)
                .await
                .expect("take"),
            Verdict::Allowed
        );
    }
    assert!(
        f.committed().await.is_empty(),
        "rate limiting records no event"
    );
}

async fn names_are_bound_to_authenticated_identities(f: &mut Fixture) {
    // GIVEN u1 joined as alice on connection a1
    let now = chat_shared::now_ms();
    let store = f.store();
    store
        .add_identified_connection("a1", Some("u1"), now)
        .await
        .expect("connect");
    assert_eq!(
        store
            .connection("a1", now)
            .await
            .expect("read")
            .and_then(|c| c.identity),
        Some("u1".to_owned())
    );
    store
        .set_name("a1", &name("alice"), now)
        .await
        .expect("join")
        .into_iter()
        .next()
        .expect("event");

    // WHEN u1 reconnects (a1 went stale, its $disconnect lost) and claims alice again
    store
        .add_identified_connection("a2", Some("u1"), now)
        .await
        .expect("connect");
    let joined = store
        .set_name("a2", &name("Alice"), now)
        .await
        .expect("reclaim")
        .into_iter()
        .next()
        .expect("event");

    // THEN it gets the name back, and the stale connection leaves (it is no member any more)
    assert!(matches!(joined.event, ChatEvent::MemberJoined { .. }));
    assert_eq!(store.connection("a1", now).await.expect("read"), None);
    f.settle().await;
    let names: Vec<String> = all_members(store, now)
        .await
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, vec!["Alice".to_owned()]);
    let committed = f.committed().await;
    let store = f.store();
    assert!(committed.iter().any(|e| matches!(
        &e.event,
        ChatEvent::MemberLeft { connection_id, reason: LeaveReason::Replaced, .. } if connection_id == "a1"
    )));

    // AND another identity, or an anonymous connection, cannot take it
    store
        .add_identified_connection("b1", Some("u2"), now)
        .await
        .expect("connect");
    store.add_connection("anon", now).await.expect("connect");
    for id in ["b1", "anon"] {
        assert!(matches!(
            store.set_name(id, &name("alice"), now).await,
            Err(StoreError::NameTaken(_))
        ));
    }

    // WHEN u1 disconnects cleanly THEN the name stays reserved for u1, not for others
    store
        .remove_connection("a2", LeaveReason::Disconnected, now)
        .await
        .expect("leave")
        .into_iter()
        .next();
    assert!(matches!(
        store.set_name("b1", &name("alice"), now).await,
        Err(StoreError::NameTaken(_))
    ));
    // AND nobody can whisper to a reserved name
    store
        .set_name("b1", &name("bob"), now)
        .await
        .expect("join")
        .into_iter()
        .next()
        .expect("event");
    assert!(matches!(
        store.post_private("b1", "alice", "psst", now).await,
        Err(StoreError::UnknownRecipient(_))
    ));
    store
        .add_identified_connection("a3", Some("u1"), now)
        .await
        .expect("connect");
    assert!(store
        .set_name("a3", &name("alice"), now)
        .await
        .expect("u1 takes its name back")
        .into_iter()
        .next()
        .is_some());
    // AND once the reservation has passed, anyone may have it
    let much_later = now + (NAME_RESERVATION_SECS + 4 * 3600) * 1000;
    store
        .remove_connection("a3", LeaveReason::Disconnected, now)
        .await
        .expect("leave")
        .into_iter()
        .next();
    store
        .add_connection("c1", much_later)
        .await
        .expect("connect");
    assert!(store
        .set_name("c1", &name("alice"), much_later)
        .await
        .expect("free again")
        .into_iter()
        .next()
        .is_some());
}

async fn private_messages_record_both_parties_identities(f: &mut Fixture) {
    // GIVEN alice (identity u1), bob (identity u2) and carol (anonymous)
    let now = chat_shared::now_ms();
    let store = f.store();
    for (id, identity, display) in [("a", Some("u1"), "alice"), ("b", Some("u2"), "bob")] {
        store
            .add_identified_connection(id, identity, now)
            .await
            .expect("connect");
        store
            .set_name(id, &name(display), now)
            .await
            .expect("join")
            .into_iter()
            .next()
            .expect("event");
    }
    join(store, "c", "carol", now).await;

    // WHEN alice whispers to bob, and carol to alice
    let to_bob = store
        .post_private("a", "bob", "psst", now)
        .await
        .expect("private");
    let to_alice = store
        .post_private("c", "alice", "hey", now)
        .await
        .expect("private");

    // THEN each event names the identities of the parties that had one
    let parties = |e: &StoredEvent| match &e.event {
        ChatEvent::PrivateMessageSent {
            identity,
            to_identity,
            ..
        } => (identity.clone(), to_identity.clone()),
        other => panic!("not a private message: {other:?}"),
    };
    assert_eq!(parties(&to_bob), (Some("u1".into()), Some("u2".into())));
    assert_eq!(parties(&to_alice), (None, Some("u1".into())));
    // AND the stream carries them: what the store returned is what was committed
    let committed = f.committed().await;
    assert!(committed.contains(&to_bob), "{committed:?}");
    assert!(committed.contains(&to_alice), "{committed:?}");
}

/// The error code and message of a store error as DynamoDB named it.
fn aws_error(e: &StoreError) -> (String, String) {
    service_error(e).unwrap_or_else(|| panic!("not an AWS service error: {e:?}"))
}

fn validation(message: &str) -> (String, String) {
    (limits::VALIDATION_EXCEPTION.to_owned(), message.to_owned())
}

async fn a_name_claim_key_over_2048_bytes_is_refused_as_dynamodb_refuses_it(f: &mut Fixture) {
    // GIVEN a connection, and a name of 64 U+FDFA: NFKC expands each to 18 characters (33
    // bytes), so its claim's partition key (`NAME#<nameKey>`) is over DynamoDB's 2,048 bytes.
    // Built by hand, as name validation refuses it before it reaches a store.
    let now = chat_shared::now_ms();
    let display = "\u{FDFA}".repeat(64);
    let long = ValidName {
        key: name_key(&display),
        display,
    };
    assert!(keys::name_pk(&long.key).len() > limits::PARTITION_KEY_MAX_BYTES);
    let s = f.store();
    s.add_connection("a", now).await.expect("connect");

    // WHEN the connection claims it
    let refused = s.set_name("a", &long, now).await;

    // THEN the store refuses it with DynamoDB's own ValidationException, and nothing changed
    let e = refused.expect_err("a partition key over 2,048 bytes is refused");
    assert_eq!(aws_error(&e), validation(limits::HASH_KEY_TOO_LONG));
    let conn = s
        .connection("a", now)
        .await
        .expect("read")
        .expect("still connected");
    assert_eq!(conn.name, None);
    assert!(f.committed().await.is_empty());
}

async fn a_connection_key_over_2048_bytes_is_refused_as_dynamodb_refuses_it(f: &mut Fixture) {
    // GIVEN a connection id whose item's partition key (`CONN#<id>`) is 2,049 bytes
    let now = chat_shared::now_ms();
    let prefix = keys::conn_pk("").len();
    let id = "c".repeat(limits::PARTITION_KEY_MAX_BYTES + 1 - prefix);
    let fits = "c".repeat(limits::PARTITION_KEY_MAX_BYTES - prefix);

    // WHEN it is recorded, and one a byte shorter
    let refused = f.store().add_connection(&id, now).await;
    let accepted = f.store().add_connection(&fits, now).await;

    // THEN the long one is refused as DynamoDB refuses it; 2,048 bytes is still fine
    let e = refused.expect_err("refused");
    assert_eq!(aws_error(&e), validation(limits::HASH_KEY_TOO_LONG));
    accepted.expect("a key of exactly 2,048 bytes is accepted");
}

async fn an_event_item_over_400_kb_is_refused_as_dynamodb_refuses_it(f: &mut Fixture) {
    // GIVEN a member
    let now = chat_shared::now_ms();
    let joined = join(f.store(), "a", "alice", now).await;

    // WHEN it posts a message that makes the event item over 400 KB, then one of 300 KB
    let refused = f
        .store()
        .post_public("a", &"x".repeat(420 * 1024), now)
        .await;
    let accepted = f
        .store()
        .post_public("a", &"y".repeat(300 * 1024), now)
        .await;

    // THEN the first transaction is refused whole, with DynamoDB's error; the second commits
    let e = refused.expect_err("an item over 400 KB is refused");
    assert_eq!(aws_error(&e), validation(limits::ITEM_TOO_LARGE));
    let accepted = accepted.expect("300 KB fits");
    assert_eq!(accepted.seq, joined.seq + 1, "the refused one took no id");
    assert_eq!(f.committed().await, vec![joined, accepted]);
}

// ---------------------------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------------------------

async fn each_room_numbers_its_own_events_densely_from_1(f: &mut Fixture) {
    // GIVEN alice and bob in lobby (lobby's events 1 and 2)
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    let alice = join(s, "a", "alice", now).await;
    let bob = join(s, "b", "bob", now).await;

    // WHEN both join dev, alice posts in dev and in lobby, and bob joins dev again
    let a_dev = join_room(s, "a", "dev", now).await;
    let b_dev = join_room(s, "b", "dev", now).await;
    let post_dev = s
        .post_to_room("a", "dev", "hi dev", now)
        .await
        .expect("post");
    let post_lobby = s.post_public("a", "hi lobby", now).await.expect("post");
    let again = s
        .join_room("b", "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join again");

    // THEN dev's ids are 1, 2, 3 and lobby's go on at 3; each event names its room
    assert_eq!(
        [&a_dev, &b_dev, &post_dev, &post_lobby].map(|e| (e.room.as_str(), e.seq)),
        [("dev", 1), ("dev", 2), ("dev", 3), ("lobby", 3)]
    );
    assert_eq!(
        a_dev.event,
        ChatEvent::MemberJoined {
            connection_id: "a".into(),
            name: "alice".into()
        }
    );
    assert_eq!(
        post_dev.event,
        ChatEvent::MessagePosted {
            connection_id: "a".into(),
            name: "alice".into(),
            message: "hi dev".into()
        }
    );
    // AND joining a room one is in changes nothing and tells where its log is
    assert_eq!(again, Joined::Already { last: 3 });
    // AND each room's log reads back its own events only, never its counter (seq 0)
    let dev = vec![a_dev.clone(), b_dev.clone(), post_dev.clone()];
    assert_eq!(room_log(s, "dev", now).await, dev);
    let newest_first = s
        .read_events("dev", EventRange::Before(None), 10, now)
        .await
        .expect("read");
    assert_eq!(
        newest_first.events,
        dev.iter().rev().cloned().collect::<Vec<_>>()
    );
    assert_eq!(newest_first.next, None);
    let before_2 = s
        .read_events("dev", EventRange::Before(Some(2)), 10, now)
        .await
        .expect("read");
    assert_eq!(before_2.events, vec![a_dev.clone()]);
    assert_eq!(before_2.next, None);
    assert_eq!(
        room_log(s, "lobby", now).await,
        vec![alice.clone(), bob.clone(), post_lobby.clone()]
    );
    assert!(room_log(s, "nowhere", now).await.is_empty());
    // AND the connections know their rooms, in name order
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.rooms, ["dev", "lobby"]);
    // AND the feed carries every event once, each room's in id order
    assert_eq!(
        by_room(f.committed().await),
        by_room(vec![alice, bob, a_dev, b_dev, post_dev, post_lobby])
    );
}

async fn rooms_need_a_named_member(f: &mut Fixture) {
    // GIVEN alice in lobby, and u connected without a name
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    let alice = join(s, "a", "alice", now).await;
    s.add_connection("u", now).await.expect("connect");

    // WHEN u and an unknown connection try to join dev, alice posts in and leaves dev (she is
    // not in it), u posts in lobby and the unknown connection posts in dev
    let unnamed_join = s.join_room("u", "dev", DEFAULT_MAX_ROOMS, now).await;
    let unknown_join = s.join_room("ghost", "dev", DEFAULT_MAX_ROOMS, now).await;
    let outsider_post = s.post_to_room("a", "dev", "hi", now).await;
    let outsider_leave = s.leave_room("a", "dev", LeaveReason::Left, now).await;
    let unnamed_post = s.post_to_room("u", "lobby", "hi", now).await;
    let unknown_post = s.post_to_room("ghost", "dev", "hi", now).await;

    // THEN each is refused with its reason, and nothing was recorded
    assert!(
        matches!(unnamed_join, Err(StoreError::NameRequired)),
        "{unnamed_join:?}"
    );
    assert!(
        matches!(unknown_join, Err(StoreError::NotConnected(ref id)) if id == "ghost"),
        "{unknown_join:?}"
    );
    assert!(
        matches!(outsider_post, Err(StoreError::NotAMember(ref r)) if r == "dev"),
        "{outsider_post:?}"
    );
    assert!(
        matches!(outsider_leave, Err(StoreError::NotAMember(ref r)) if r == "dev"),
        "{outsider_leave:?}"
    );
    assert!(
        matches!(unnamed_post, Err(StoreError::NameRequired)),
        "{unnamed_post:?}"
    );
    assert!(
        matches!(unknown_post, Err(StoreError::NotConnected(_))),
        "{unknown_post:?}"
    );
    assert!(room_log(s, "dev", now).await.is_empty());
    assert!(room_members(s, "dev", now).await.is_empty());
    assert_eq!(s.member_shards("dev", now).await.expect("shards"), 1);
    let u = s.connection("u", now).await.expect("read").expect("u");
    assert!(u.rooms.is_empty());
    assert_eq!(f.committed().await, vec![alice]);
}

async fn leaving_a_room_ends_the_membership_there_only(f: &mut Fixture) {
    // GIVEN alice and bob in lobby and dev (dev's events 1 and 2)
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join(s, "b", "bob", now).await;
    join_room(s, "a", "dev", now).await;
    join_room(s, "b", "dev", now).await;
    f.committed().await;

    // WHEN alice leaves dev
    let left = s
        .leave_room("a", "dev", LeaveReason::Left, now)
        .await
        .expect("leave");

    // THEN MemberLeft (left) is dev's event 3; she is no member of dev, still of lobby
    assert_eq!((left.room.as_str(), left.seq), ("dev", 3));
    assert_eq!(
        left.event,
        ChatEvent::MemberLeft {
            connection_id: "a".into(),
            name: "alice".into(),
            reason: LeaveReason::Left
        }
    );
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.rooms, ["lobby"]);
    assert_eq!(ids(&room_members(s, "dev", now).await), ["b"]);
    assert_eq!(ids(&room_members(s, "lobby", now).await), ["a", "b"]);
    // AND she can neither post there nor leave again
    let post = s.post_to_room("a", "dev", "hi", now).await;
    assert!(matches!(post, Err(StoreError::NotAMember(_))), "{post:?}");
    let again = s.leave_room("a", "dev", LeaveReason::Left, now).await;
    assert!(matches!(again, Err(StoreError::NotAMember(_))), "{again:?}");
    // AND she can come back: MemberJoined at 4
    let back = join_room(s, "a", "dev", now).await;
    assert_eq!(back.seq, 4);
    assert_eq!(ids(&room_members(s, "dev", now).await), ["a", "b"]);
    assert_eq!(f.committed().await, vec![left, back]);
}

async fn a_connection_in_as_many_rooms_as_allowed_cannot_join_another(f: &mut Fixture) {
    // GIVEN alice in lobby, r1 and r2: three rooms
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join_room(s, "a", "r1", now).await;
    join_room(s, "a", "r2", now).await;

    // WHEN she joins r3 with a limit of three rooms, and r1 again
    let refused = s.join_room("a", "r3", 3, now).await;
    let already = s.join_room("a", "r1", 3, now).await.expect("already");

    // THEN r3 is refused and nothing of it written; r1 is a member already (at the limit)
    assert!(
        matches!(refused, Err(StoreError::TooManyRooms(3))),
        "{refused:?}"
    );
    assert_eq!(already, Joined::Already { last: 1 });
    assert!(room_log(s, "r3", now).await.is_empty());
    assert!(room_members(s, "r3", now).await.is_empty());
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.rooms, ["lobby", "r1", "r2"]);
    // AND once she has left r1 she can join r3 within the same limit
    s.leave_room("a", "r1", LeaveReason::Left, now)
        .await
        .expect("leave");
    let joined = s.join_room("a", "r3", 3, now).await.expect("join");
    assert!(
        matches!(&joined, Joined::Now(e) if e.room == "r3" && e.seq == 1),
        "{joined:?}"
    );
}

async fn a_rename_is_announced_in_every_room(f: &mut Fixture) {
    // GIVEN alice in lobby, r1 and r2; bob in lobby and r1
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join(s, "b", "bob", now).await;
    join_room(s, "a", "r1", now).await;
    join_room(s, "a", "r2", now).await;
    join_room(s, "b", "r1", now).await;
    f.committed().await;

    // WHEN alice renames herself
    let renamed = s.set_name("a", &name("alicia"), now).await.expect("rename");

    // THEN one MemberRenamed in each of her rooms, each at that room's next id, nothing else
    let rename = ChatEvent::MemberRenamed {
        connection_id: "a".into(),
        old_name: "alice".into(),
        name: "alicia".into(),
    };
    let sorted = by_room(renamed.clone());
    assert_eq!(
        sorted
            .iter()
            .map(|e| (e.room.as_str(), e.seq, &e.event))
            .collect::<Vec<_>>(),
        [
            ("lobby", 3, &rename),
            ("r1", 3, &rename),
            ("r2", 2, &rename)
        ],
    );
    // AND every room lists her under the new name; the old name is free, the new one hers
    for room in ["lobby", "r1", "r2"] {
        let members = room_members(s, room, now).await;
        let her = members.iter().find(|m| m.connection_id == "a").expect("a");
        assert_eq!(her.name, "alicia", "in {room}");
    }
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.name.as_deref(), Some("alicia"));
    s.add_connection("c", now).await.expect("connect");
    let taken = s.set_name("c", &name("Alicia"), now).await;
    assert!(matches!(taken, Err(StoreError::NameTaken(_))), "{taken:?}");
    let old = join(s, "c", "alice", now).await;
    assert_eq!(
        by_room(f.committed().await),
        by_room(renamed.into_iter().chain([old]).collect())
    );
}

async fn the_same_name_again_after_a_whole_rename_records_nothing(f: &mut Fixture) {
    // GIVEN alice in lobby, r1 and r2, renamed to alicia (every room heard of it)
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join_room(s, "a", "r1", now).await;
    join_room(s, "a", "r2", now).await;
    let renamed = s.set_name("a", &name("alicia"), now).await.expect("rename");
    assert_eq!(renamed.len(), 3);
    f.committed().await;
    // (on DynamoDB the rename left no `renaming` marker behind: the connection item alone
    // then tells a same-name setName that nothing is unfinished)
    if let Some((client, tables)) = &f.dynamo {
        let item = conn_item(client, tables, "a").await;
        assert!(!item.contains_key(keys::RENAMING), "{item:?}");
    }

    // WHEN her client sends setName alicia once more, twice
    let again = s.set_name("a", &name("alicia"), now).await.expect("again");
    let twice = s.set_name("a", &name("alicia"), now).await.expect("twice");

    // THEN nothing is left to finish: nothing returned, nothing recorded
    assert!(again.is_empty(), "{again:?}");
    assert!(twice.is_empty(), "{twice:?}");
    assert!(f.committed().await.is_empty());
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.name.as_deref(), Some("alicia"));
}

async fn set_name_after_leaving_lobby_joins_it_again(f: &mut Fixture) {
    // GIVEN alice joined (lobby 1), joined dev (dev 1), then left lobby (lobby 2)
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join_room(s, "a", "dev", now).await;
    s.leave_room("a", "lobby", LeaveReason::Left, now)
        .await
        .expect("leave lobby");
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.rooms, ["dev"]);

    // WHEN she sets the same name again
    let same = s.set_name("a", &name("alice"), now).await.expect("same");

    // THEN she joins lobby again (lobby 3), and nothing is said in dev
    let rejoin = |seq, name: &str| {
        (
            keys::DEFAULT_ROOM.to_owned(),
            seq,
            ChatEvent::MemberJoined {
                connection_id: "a".into(),
                name: name.into(),
            },
        )
    };
    let view = |events: &[StoredEvent]| {
        events
            .iter()
            .map(|e| (e.room.clone(), e.seq, e.event.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(view(&same), [rejoin(3, "alice")]);

    // WHEN she leaves lobby again (lobby 4) and renames herself
    s.leave_room("a", "lobby", LeaveReason::Left, now)
        .await
        .expect("leave lobby");
    let renamed = s.set_name("a", &name("alicia"), now).await.expect("rename");

    // THEN the rename is announced in dev, then she joins lobby under the new name
    assert_eq!(
        view(&renamed),
        [
            (
                "dev".to_owned(),
                2,
                ChatEvent::MemberRenamed {
                    connection_id: "a".into(),
                    old_name: "alice".into(),
                    name: "alicia".into()
                }
            ),
            rejoin(5, "alicia")
        ]
    );
    // AND the same name once more, in lobby, changes nothing
    let nothing = s.set_name("a", &name("alicia"), now).await.expect("same");
    assert!(nothing.is_empty(), "{nothing:?}");
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.rooms, ["dev", "lobby"]);
    assert_eq!(ids(&room_members(s, "lobby", now).await), ["a"]);
}

async fn removing_a_connection_in_40_rooms_leaves_each_room(f: &mut Fixture) {
    // GIVEN alice in lobby and 39 more rooms (far more leaves than one transaction of 100
    // actions holds), bob in lobby and room05
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    let rooms: Vec<String> = (1..40).map(|i| format!("room{i:02}")).collect();
    join(s, "a", "alice", now).await;
    join(s, "b", "bob", now).await;
    for room in &rooms {
        join_room(s, "a", room, now).await;
    }
    join_room(s, "b", "room05", now).await;
    f.committed().await;

    // WHEN alice's connection is removed (gone, pruned on a 410)
    let left = s
        .remove_connection("a", LeaveReason::Gone, now)
        .await
        .expect("remove");

    // THEN one MemberLeft in each of her 40 rooms, in room order, each the room's next id
    let mut expected_rooms: Vec<String> = rooms.clone();
    expected_rooms.push(keys::DEFAULT_ROOM.to_owned());
    expected_rooms.sort();
    assert_eq!(
        left.iter().map(|e| e.room.clone()).collect::<Vec<_>>(),
        expected_rooms
    );
    for e in &left {
        let expected_seq = if e.room == "lobby" || e.room == "room05" {
            3
        } else {
            2
        };
        assert_eq!(e.seq, expected_seq, "{e:?}");
        assert_eq!(
            e.event,
            ChatEvent::MemberLeft {
                connection_id: "a".into(),
                name: "alice".into(),
                reason: LeaveReason::Gone
            }
        );
    }
    // AND no member item of hers is left in any room; bob's are untouched
    for room in &expected_rooms {
        let members = ids(&room_members(s, room, now).await)
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let bobs = room == "lobby" || room == "room05";
        assert_eq!(
            members,
            if bobs { vec!["b".to_owned()] } else { vec![] },
            "{room}"
        );
    }
    // AND the connection is gone, its name free, and a second removal does nothing
    assert_eq!(s.connection("a", now).await.expect("read"), None);
    let again = s
        .remove_connection("a", LeaveReason::Gone, now)
        .await
        .expect("again");
    assert!(again.is_empty());
    let taken = join(s, "c", "alice", now).await;
    assert_eq!(
        by_room(f.committed().await),
        by_room(left.into_iter().chain([taken]).collect())
    );
}

async fn removing_many_connections_is_removing_each(f: &mut Fixture) {
    // GIVEN alice in lobby and dev, bob in lobby, u without a name
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join(s, "b", "bob", now).await;
    join_room(s, "a", "dev", now).await;
    s.add_connection("u", now).await.expect("connect");
    f.committed().await;

    // WHEN they and an unknown connection are removed at once
    let ids_: Vec<String> = ["a", "b", "u", "ghost"].map(str::to_owned).to_vec();
    let left = s
        .remove_connections(&ids_, LeaveReason::Gone, now)
        .await
        .expect("remove");

    // THEN each member left each of its rooms, and everyone is gone
    let view: Vec<(&str, u64, &str)> = by_room(left.clone())
        .iter()
        .map(|e| match &e.event {
            ChatEvent::MemberLeft {
                connection_id,
                reason: LeaveReason::Gone,
                ..
            } => (
                if e.room == "dev" { "dev" } else { "lobby" },
                e.seq,
                if connection_id == "a" { "a" } else { "b" },
            ),
            other => panic!("not a leave: {other:?}"),
        })
        .collect();
    let mut lobby_leaves: Vec<(u64, &str)> = view
        .iter()
        .filter(|(r, _, _)| *r == "lobby")
        .map(|(_, q, c)| (*q, *c))
        .collect();
    lobby_leaves.sort_by_key(|(_, c)| *c);
    assert_eq!(view.iter().filter(|(r, _, _)| *r == "dev").count(), 1);
    assert_eq!(
        lobby_leaves.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let mut lobby_ids: Vec<u64> = lobby_leaves.iter().map(|(q, _)| *q).collect();
    lobby_ids.sort_unstable();
    assert_eq!(lobby_ids, [3, 4]);
    for id in ["a", "b", "u"] {
        assert_eq!(s.connection(id, now).await.expect("read"), None, "{id}");
    }
    assert!(room_members(s, "lobby", now).await.is_empty());
    assert!(room_members(s, "dev", now).await.is_empty());
    assert_eq!(by_room(f.committed().await), by_room(left));
}

async fn members_of_a_room_are_its_own_members_only(f: &mut Fixture) {
    // GIVEN rooms whose names prefix one another: alice in r1, carol in r1 and r10, bob only
    // in lobby, and old in r1 whose connection expires in 100 s
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join(s, "b", "bob", now).await;
    join(s, "c", "carol", now).await;
    join_room(s, "a", "r1", now).await;
    join_room(s, "c", "r1", now).await;
    join_room(s, "c", "r10", now).await;
    let early = now - (ttl_secs() - 100) * 1000;
    join(s, "old", "old-timer", early).await;
    join_room(s, "old", "r1", early).await;

    // WHEN each room's members are read (pages of two), now and once old has expired
    f.settle().await;
    let r1 = room_members(s, "r1", now).await;
    let r10 = room_members(s, "r10", now).await;
    let lobby = room_members(s, "lobby", now).await;
    let r = room_members(s, "r", now).await;
    let r1_later = room_members(s, "r1", now + 200_000).await;

    // THEN each lists exactly its own members, with their names; the expired one goes with
    // its connection
    assert_eq!(ids(&r1), ["a", "c", "old"]);
    assert_eq!(
        r1.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        ["alice", "carol", "old-timer"]
    );
    assert_eq!(ids(&r10), ["c"]);
    assert_eq!(ids(&lobby), ["a", "b", "c", "old"]);
    assert!(r.is_empty());
    assert_eq!(ids(&r1_later), ["a", "c"]);
}

async fn the_room_counters_are_on_the_feed_with_the_last_id_given(f: &mut Fixture) {
    // GIVEN alice joins (lobby 1), joins dev (dev 1) and posts there (dev 2)
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    join(s, "a", "alice", now).await;
    join_room(s, "a", "dev", now).await;
    s.post_to_room("a", "dev", "hi", now).await.expect("post");

    // WHEN the feed is read
    let records = f.records().await;

    // THEN besides the three events it carries each write of each room's counter (seq 0,
    // `type` Counter): an INSERT for the first, MODIFYs after, with the id just given and the
    // member count and shards
    let counters: Vec<(String, String, String, String, String)> = records
        .iter()
        .filter(|r| is_counter(r))
        .map(|r| {
            let image = serde_json::to_value(&r.change.new_image).expect("image");
            let keys = serde_json::to_value(&r.change.keys).expect("keys");
            assert_eq!(keys["seq"], serde_json::json!({"N": "0"}), "{keys}");
            assert_eq!(keys["pk"], image["pk"]);
            let n = |a: &str| image[a]["N"].as_str().unwrap_or("absent").to_owned();
            (
                image["pk"]["S"].as_str().expect("pk").to_owned(),
                r.event_name.clone(),
                n(keys::COUNTER_LAST),
                n(keys::COUNTER_MEMBERS),
                n(keys::COUNTER_SHARDS),
            )
        })
        .collect();
    let row = |pk: &str, name: &str, last: &str| {
        (
            pk.to_owned(),
            name.to_owned(),
            last.to_owned(),
            "1".to_owned(),
            "1".to_owned(),
        )
    };
    let of = |pk: &str| {
        counters
            .iter()
            .filter(|c| c.0 == pk)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(of("ROOM#lobby"), [row("ROOM#lobby", "INSERT", "1")]);
    assert_eq!(
        of("ROOM#dev"),
        [
            row("ROOM#dev", "INSERT", "1"),
            row("ROOM#dev", "MODIFY", "2")
        ]
    );
    assert_eq!(counters.len(), 3);
    assert_eq!(records.len(), 6);
}

async fn concurrent_joins_of_one_room_get_dense_ids(f: &mut Fixture) {
    // GIVEN eight named connections
    let now = chat_shared::now_ms();
    let joiners: Vec<String> = (0..8).map(|i| format!("j{i}")).collect();
    for (i, id) in joiners.iter().enumerate() {
        join(f.store(), id, &format!("joiner{i}"), now).await;
    }
    f.committed().await;

    // WHEN all join dev at once, from separate tasks
    let joins: Vec<_> = joiners
        .iter()
        .map(|id| {
            let store = Arc::clone(&f.store);
            let id = id.clone();
            tokio::spawn(async move { store.join_room(&id, "dev", DEFAULT_MAX_ROOMS, now).await })
        })
        .collect();
    let mut joined = Vec::new();
    let mut unsequenced = 0;
    for j in joins {
        match j.await.expect("task").expect("every join succeeds") {
            Joined::Now(event) => joined.push(event),
            // One that lost the counter SEQUENCED_JOIN_ATTEMPTS times joined without an event.
            Joined::Unsequenced { .. } => unsequenced += 1,
            other => panic!("{other:?}"),
        }
    }

    // THEN dev's ids are exactly 1..=k for the k sequenced joins (the first always is), every
    // joiner is listed once, and the feed has each sequenced join
    let mut seqs: Vec<u64> = joined.iter().map(|e| e.seq).collect();
    seqs.sort_unstable();
    assert!(!seqs.is_empty());
    assert_eq!(seqs.len() + unsequenced, 8);
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    f.settle().await;
    assert_eq!(
        ids(&room_members(f.store(), "dev", now).await),
        ids_of(&joiners)
    );
    assert_eq!(by_room(f.committed().await), by_room(joined));
}

fn ids_of(ids: &[String]) -> Vec<&str> {
    ids.iter().map(String::as_str).collect()
}

async fn taking_a_name_back_removes_the_old_connection_from_every_room(f: &mut Fixture) {
    // GIVEN u1's connection a1 named alice, in lobby and dev, with bob in dev too
    let now = chat_shared::now_ms();
    let store = Arc::clone(&f.store);
    let s = store.as_ref();
    s.add_identified_connection("a1", Some("u1"), now)
        .await
        .expect("connect");
    s.set_name("a1", &name("alice"), now).await.expect("name");
    join_room(s, "a1", "dev", now).await;
    join(s, "b", "bob", now).await;
    join_room(s, "b", "dev", now).await;
    f.committed().await;

    // WHEN u1 reconnects as a2 (a1's $disconnect lost) and takes alice back
    s.add_identified_connection("a2", Some("u1"), now)
        .await
        .expect("connect");
    let took = s
        .set_name("a2", &name("alice"), now)
        .await
        .expect("take back");

    // THEN a2 joins lobby (the one event returned); a1 left both its rooms as replaced, and is
    // gone, from the connections and from every room's members
    assert_eq!(took.len(), 1, "{took:?}");
    assert_eq!(
        (took[0].room.as_str(), &took[0].event),
        (
            "lobby",
            &ChatEvent::MemberJoined {
                connection_id: "a2".into(),
                name: "alice".into()
            }
        )
    );
    let committed = f.committed().await;
    let mut replaced: Vec<&str> = committed
        .iter()
        .filter(|e| {
            matches!(&e.event, ChatEvent::MemberLeft { connection_id, reason: LeaveReason::Replaced, .. } if connection_id == "a1")
        })
        .map(|e| e.room.as_str())
        .collect();
    replaced.sort_unstable();
    assert_eq!(replaced, ["dev", "lobby"]);
    assert!(committed.contains(&took[0]));
    assert_eq!(s.connection("a1", now).await.expect("read"), None);
    assert_eq!(ids(&room_members(s, "dev", now).await), ["b"]);
    assert_eq!(ids(&room_members(s, "lobby", now).await), ["a2", "b"]);
}

/// The large-room limit of the `contract_large!` cases.
const SMALL_LIMIT: usize = 3;

/// `setName` of a new connection, with whatever events it recorded (none for an unsequenced
/// join of a large lobby).
async fn named(store: &dyn ChatStore, id: &str, display: &str, now_ms: i64) -> Vec<StoredEvent> {
    store.add_connection(id, now_ms).await.expect("connect");
    store
        .set_name(id, &name(display), now_ms)
        .await
        .expect("set name")
}

async fn joins_past_the_large_room_limit_are_unsequenced_members(f: &mut Fixture) {
    // GIVEN a large-room limit of 3 and six connections setting their names
    let now = chat_shared::now_ms();
    let mut lobby = Vec::new();
    for i in 0..6 {
        lobby.push(named(f.store(), &format!("m{i}"), &format!("member{i}"), now).await);
    }
    // THEN the first four joins of lobby are sequenced (the fourth takes it past the limit and
    // makes it large, with at least LARGE_ROOM_SHARDS shards), the last two record nothing
    let counts: Vec<usize> = lobby.iter().map(Vec::len).collect();
    assert_eq!(counts, [1, 1, 1, 1, 0, 0]);
    assert_eq!(
        f.store()
            .member_shards(keys::DEFAULT_ROOM, now)
            .await
            .expect("shards"),
        keys::LARGE_ROOM_SHARDS
    );

    // WHEN all six join room big
    let mut answers = Vec::new();
    for i in 0..6 {
        answers.push(
            f.store()
                .join_room(&format!("m{i}"), "big", DEFAULT_MAX_ROOMS, now)
                .await
                .expect("join"),
        );
    }
    // THEN the same: four MemberJoined (ids 1..=4), then two unsequenced joins whose catch-up
    // point is the room's last id when they joined
    for (i, answer) in answers.iter().enumerate() {
        match (i, answer) {
            (0..=3, Joined::Now(e)) => assert_eq!(e.seq, i as u64 + 1),
            (4 | 5, Joined::Unsequenced { last }) => assert_eq!(*last, 4),
            other => panic!("join {i}: {other:?}"),
        }
    }
    // AND every one is a member (the fan-out's member walk finds it), big's log has the four
    // joins only, and the feed has nothing but the sequenced events
    f.settle().await;
    let all: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    assert_eq!(
        ids(&room_members(f.store(), "big", now).await),
        ids_of(&all)
    );
    assert_eq!(
        ids(&room_members(f.store(), keys::DEFAULT_ROOM, now).await),
        ids_of(&all)
    );
    let log = room_log(f.store(), "big", now).await;
    assert_eq!(log.len(), 4);
    assert!(log
        .iter()
        .all(|e| matches!(e.event, ChatEvent::MemberJoined { .. })));
    let committed = f.committed().await;
    assert_eq!(committed.len(), 8, "{committed:?}");

    // WHEN an unsequenced member posts THEN it may (it is a member), at the next id
    let posted = f
        .store()
        .post_to_room("m5", "big", "hello", now)
        .await
        .expect("post");
    assert_eq!(posted.seq, 5);
    // WHEN one member disconnects THEN it leaves both large rooms without an event
    let left = f
        .store()
        .remove_connection("m5", LeaveReason::Disconnected, now)
        .await
        .expect("remove");
    assert_eq!(left, vec![]);
    // AND an explicit leave is still a sequenced MemberLeft
    let leave = f
        .store()
        .leave_room("m4", "big", LeaveReason::Left, now)
        .await
        .expect("leave");
    assert_eq!(leave.seq, 6);
    f.settle().await;
    assert_eq!(
        ids(&room_members(f.store(), "big", now).await),
        ["m0", "m1", "m2", "m3"]
    );
    assert_eq!(room_log(f.store(), "big", now).await.len(), 6);
}

async fn requests_into_a_large_room_are_unsequenced_and_recorded_once(f: &mut Fixture) {
    use chat_shared::store::requests::{Once, RequestKey};
    // GIVEN a large-room limit of 3: four named connections make lobby large, and their
    // joins make room big large
    let now = chat_shared::now_ms();
    for i in 0..4 {
        named(f.store(), &format!("m{i}"), &format!("member{i}"), now).await;
        let joined = f
            .store()
            .join_room(&format!("m{i}"), "big", DEFAULT_MAX_ROOMS, now)
            .await
            .expect("join");
        assert!(matches!(joined, Joined::Now(_)), "join {i}: {joined:?}");
    }
    f.store().add_connection("m4", now).await.expect("connect");

    // WHEN a fifth sets its name with a requestId THEN it is in lobby unsequenced: no event
    let set = RequestKey::new("n-1", "setName", r#"["setName",["member4"]]"#);
    let first = f
        .store()
        .set_name_once("m4", &name("member4"), &set, now)
        .await
        .expect("set name");
    assert!(
        matches!(&first, Once::First(events) if events.is_empty()),
        "{first:?}"
    );
    // AND its resend is answered from its record, with no event either
    match f
        .store()
        .set_name_once("m4", &name("member4"), &set, now)
        .await
        .expect("resend set name")
    {
        Once::Again(done) => {
            assert_eq!(done.name.as_deref(), Some("member4"));
            assert!(done.events.is_empty(), "{:?}", done.events);
        }
        other => panic!("resent setName: {other:?}"),
    }

    // WHEN it joins big with a requestId THEN it joins unsequenced, at big's last id (4)
    let join = RequestKey::new("j-1", "join", r#"["join",["big"]]"#);
    let joined = f
        .store()
        .join_room_once("m4", "big", DEFAULT_MAX_ROOMS, &join, now)
        .await
        .expect("join once");
    assert!(
        matches!(joined, Once::First(Joined::Unsequenced { last: 4 })),
        "{joined:?}"
    );
    // AND after big moves on (a post, id 5), its resend gets the same answer, from the record
    let posted = f
        .store()
        .post_to_room("m0", "big", "hello", now)
        .await
        .expect("post");
    assert_eq!(posted.seq, 5);
    match f
        .store()
        .join_room_once("m4", "big", DEFAULT_MAX_ROOMS, &join, now)
        .await
        .expect("resend join")
    {
        Once::Again(done) => {
            let answer: Vec<(&str, u64)> = done
                .events
                .iter()
                .map(|e| (e.room.as_str(), e.id))
                .collect();
            assert_eq!(answer, [("big", 4)]);
        }
        other => panic!("resent join: {other:?}"),
    }
    // AND it is a member once, and nothing but the four joins and the post is in big's log
    f.settle().await;
    assert_eq!(
        ids(&room_members(f.store(), "big", now).await),
        ["m0", "m1", "m2", "m3", "m4"]
    );
    assert_eq!(room_log(f.store(), "big", now).await.len(), 5);

    // WHEN it leaves big with a requestId THEN the leave is sequenced (MemberLeft, id 6), and
    // its resend gets that id without a second event
    let leave = RequestKey::new("l-1", "leave", r#"["leave",["big"]]"#);
    let left = f
        .store()
        .leave_room_once("m4", "big", &leave, now)
        .await
        .expect("leave once");
    assert!(matches!(&left, Once::First(e) if e.seq == 6), "{left:?}");
    match f
        .store()
        .leave_room_once("m4", "big", &leave, now)
        .await
        .expect("resend leave")
    {
        Once::Again(done) => assert_eq!(done.events.first().map(|e| e.id), Some(6)),
        other => panic!("resent leave: {other:?}"),
    }
    f.settle().await;
    assert_eq!(room_log(f.store(), "big", now).await.len(), 6);
}

macro_rules! contract_large {
    ($($case:ident),* $(,)?) => {
        mod large_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&mut super::Fixture::embedded_limited(
                        super::StoreBehaviour::IDEAL,
                        super::SMALL_LIMIT,
                    ))
                    .await;
                }
            )*
        }
        mod large_aws_like {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&mut super::Fixture::embedded_limited(
                        super::StoreBehaviour::aws_like(),
                        super::SMALL_LIMIT,
                    ))
                    .await;
                }
            )*
        }
        mod large_dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&mut super::Fixture::dynamodb_limited(super::SMALL_LIMIT).await)
                        .await;
                }
            )*
        }
    };
}

contract_large!(
    joins_past_the_large_room_limit_are_unsequenced_members,
    requests_into_a_large_room_are_unsequenced_and_recorded_once,
);

/// Opens `id` for `principal` with at most `max` connections at once.
async fn open_for(s: &dyn ChatStore, id: &str, principal: &str, max: u32, now: i64) -> bool {
    s.open_connection(
        id,
        None,
        Some(Admission {
            principal,
            max_connections: max,
        }),
        false,
        now,
    )
    .await
    .expect("open")
    .is_some()
}

async fn a_principal_has_at_most_its_connections_at_once(f: &mut Fixture) {
    let s = f.store();
    let now = chat_shared::now_ms();
    // GIVEN 10.0.0.1 with its 2 connections open, the most it may have
    assert!(open_for(s, "c1", "ip:10.0.0.1", 2, now).await);
    assert!(open_for(s, "c2", "ip:10.0.0.1", 2, now).await);

    // WHEN it opens a third THEN it is refused, and nothing of it is recorded
    assert!(!open_for(s, "c3", "ip:10.0.0.1", 2, now).await);
    assert_eq!(s.connection("c3", now).await.expect("read"), None);
    // AND another address is not affected
    assert!(open_for(s, "d1", "ip:10.0.0.2", 2, now).await);

    // WHEN one of its connections goes THEN its slot is free again, once
    s.remove_connection("c1", LeaveReason::Disconnected, now)
        .await
        .expect("remove");
    assert!(open_for(s, "c3", "ip:10.0.0.1", 2, now).await);
    assert!(!open_for(s, "c4", "ip:10.0.0.1", 2, now).await);
    // AND removing a connection twice gives back nothing more
    s.remove_connection("c1", LeaveReason::Disconnected, now)
        .await
        .expect("remove again");
    assert!(!open_for(s, "c4", "ip:10.0.0.1", 2, now).await);

    // WHEN its connections have expired (their $disconnect never came) THEN their slots no
    // longer count
    let later = now + (Retention::default().connection_ttl.as_millis() as i64) + 1_000;
    assert!(open_for(s, "c5", "ip:10.0.0.1", 2, later).await);
    assert!(open_for(s, "c6", "ip:10.0.0.1", 2, later).await);
    assert!(!open_for(s, "c7", "ip:10.0.0.1", 2, later).await);
}

async fn concurrent_admissions_never_overfill_a_principal(f: &mut Fixture) {
    // GIVEN a principal allowed 3 connections, and 12 $connects held at a barrier
    let now = chat_shared::now_ms();
    let barrier = Arc::new(tokio::sync::Barrier::new(12));
    let store = Arc::clone(&f.store);
    let opens = (0..12).map(|i| {
        let barrier = Arc::clone(&barrier);
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            barrier.wait().await;
            open_for(store.as_ref(), &format!("c{i}"), "id:u1", 3, now).await
        })
    });
    // WHEN they are released at once
    let admitted = futures::future::join_all(opens)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .filter(|&ok| ok)
        .count();
    // THEN exactly 3 are admitted, and exactly 3 are recorded
    assert_eq!(admitted, 3);
    let mut recorded = 0;
    for i in 0..12 {
        if f.store()
            .connection(&format!("c{i}"), now)
            .await
            .expect("read")
            .is_some()
        {
            recorded += 1;
        }
    }
    assert_eq!(recorded, 3);
}

async fn requests_count_against_the_principal_across_its_connections(f: &mut Fixture) {
    use chat_shared::ratelimit::{RateLimit, RequestLimits, Verdict, PRINCIPAL_WINDOW_SECS};
    let s = f.store();
    // GIVEN the start of a window, a budget of 1 request/s (10 a window) per principal, no
    // per-connection limit, and two connections of 10.0.0.1
    let window_ms = PRINCIPAL_WINDOW_SECS * 1000;
    let now = chat_shared::now_ms() / window_ms * window_ms;
    assert!(open_for(s, "c1", "ip:10.0.0.1", 0, now).await);
    assert!(open_for(s, "c2", "ip:10.0.0.1", 0, now).await);
    assert!(open_for(s, "d1", "ip:10.0.0.2", 0, now).await);
    let limits = |fallback: Option<&'static str>| RequestLimits {
        connection: RateLimit {
            per_second: 0,
            burst: 0,
        },
        principal_per_second: 1,
        fallback_principal: fallback,
    };
    let take = |id: &'static str, fallback: Option<&'static str>, at: i64| {
        let store = f.store();
        async move {
            store
                .take_request_token(id, &limits(fallback), at)
                .await
                .expect("take")
        }
    };

    // WHEN its two connections make 10 requests between them THEN all pass
    for i in 0..10 {
        let id = if i % 2 == 0 { "c1" } else { "c2" };
        assert_eq!(
            take(id, None, now + i).await,
            Verdict::Allowed,
            "request {i}"
        );
    }
    // AND the 11th, from either, is refused as the principal's
    assert_eq!(take("c1", None, now + 20).await, Verdict::PrincipalLimited);
    assert_eq!(take("c2", None, now + 20).await, Verdict::PrincipalLimited);
    // AND a fresh connection of the same address gets no fresh budget
    assert!(open_for(s, "c3", "ip:10.0.0.1", 0, now + 30).await);
    assert_eq!(take("c3", None, now + 40).await, Verdict::PrincipalLimited);
    // AND an unknown connection is charged to the address it comes from
    assert_eq!(
        take("nobody", Some("ip:10.0.0.1"), now + 50).await,
        Verdict::PrincipalLimited
    );
    // AND another address is unaffected
    assert_eq!(take("d1", None, now + 60).await, Verdict::Allowed);
    // WHEN the next window starts THEN the address may go on
    assert_eq!(take("c1", None, now + window_ms).await, Verdict::Allowed);
}

async fn a_rooms_presence_budget_admits_what_it_can_pay_for(f: &mut Fixture) {
    use chat_shared::presence::{BudgetVerdict, PresenceBudget};
    let s = f.store();
    // GIVEN lobby with 4 members (a change costs 2 × 5 = 10), a budget of 25 a second, and
    // the start of a second
    let now = chat_shared::now_ms() / 1000 * 1000 + 2000;
    for (id, n) in [("a", "alice"), ("b", "bob"), ("c", "carol"), ("d", "dave")] {
        join(s, id, n, now).await;
    }
    let budget = PresenceBudget {
        posts_per_second: 25,
    };
    let take = |room: &'static str, budget: PresenceBudget, at: i64| async move {
        s.take_presence_budget(room, budget, at)
            .await
            .expect("take")
    };
    // WHEN 20 changes race for it in one second THEN exactly two are paid for (10 + 10; a
    // third would make 30)
    let verdicts = futures::future::join_all((0..20).map(|i| take("lobby", budget, now + i))).await;
    let allowed = verdicts
        .iter()
        .filter(|v| **v == BudgetVerdict::Allowed)
        .count();
    assert_eq!(allowed, 2, "{verdicts:?}");
    // AND a refusal says when the next second opens
    assert_eq!(
        take("lobby", budget, now + 250).await,
        BudgetVerdict::Exceeded {
            retry_after_ms: 750
        }
    );
    // AND the next second pays again
    assert_eq!(
        take("lobby", budget, now + 1000).await,
        BudgetVerdict::Allowed
    );
    // AND a budget smaller than one change still admits one change in an empty second
    let tiny = PresenceBudget {
        posts_per_second: 5,
    };
    assert_eq!(
        take("lobby", tiny, now + 3000).await,
        BudgetVerdict::Allowed
    );
    assert!(matches!(
        take("lobby", tiny, now + 3001).await,
        BudgetVerdict::Exceeded { .. }
    ));
    // AND each room has its own budget: an empty room's change costs 2
    for _ in 0..12 {
        assert_eq!(take("ops", budget, now + 10).await, BudgetVerdict::Allowed);
    }
    assert!(matches!(
        take("ops", budget, now + 10).await,
        BudgetVerdict::Exceeded { .. }
    ));
    // AND off admits everything
    for _ in 0..5 {
        assert_eq!(
            take("lobby", PresenceBudget::OFF, now + 10).await,
            BudgetVerdict::Allowed
        );
    }
}

macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&mut super::Fixture::embedded()).await;
                }
            )*
        }
        mod aws_like {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&mut super::Fixture::aws_like()).await;
                }
            )*
        }
        mod dynamodb {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&mut super::Fixture::dynamodb().await).await;
                }
            )*
        }
    };
}

contract!(
    a_connection_is_recorded_until_it_expires,
    names_join_rename_and_free_the_old_name,
    a_name_taken_ignoring_case_is_refused_without_change,
    racing_claims_for_one_name_have_exactly_one_winner,
    an_expired_claim_can_be_taken_by_a_new_connection,
    public_messages_need_a_named_connection,
    private_messages_reach_members_by_name,
    removing_a_connection_releases_its_name_once,
    member_pages_list_every_live_member_once,
    concurrent_posts_get_dense_ids_in_commit_order,
    feed_records_look_like_lambdas_and_decode_to_the_returned_events,
    each_connection_has_its_own_rate_limit_bucket,
    names_are_bound_to_authenticated_identities,
    private_messages_record_both_parties_identities,
    a_name_claim_key_over_2048_bytes_is_refused_as_dynamodb_refuses_it,
    a_connection_key_over_2048_bytes_is_refused_as_dynamodb_refuses_it,
    an_event_item_over_400_kb_is_refused_as_dynamodb_refuses_it,
    each_room_numbers_its_own_events_densely_from_1,
    rooms_need_a_named_member,
    leaving_a_room_ends_the_membership_there_only,
    a_connection_in_as_many_rooms_as_allowed_cannot_join_another,
    a_rename_is_announced_in_every_room,
    the_same_name_again_after_a_whole_rename_records_nothing,
    set_name_after_leaving_lobby_joins_it_again,
    removing_a_connection_in_40_rooms_leaves_each_room,
    removing_many_connections_is_removing_each,
    members_of_a_room_are_its_own_members_only,
    the_room_counters_are_on_the_feed_with_the_last_id_given,
    concurrent_joins_of_one_room_get_dense_ids,
    taking_a_name_back_removes_the_old_connection_from_every_room,
    a_principal_has_at_most_its_connections_at_once,
    concurrent_admissions_never_overfill_a_principal,
    requests_count_against_the_principal_across_its_connections,
    a_rooms_presence_budget_admits_what_it_can_pay_for,
);

// ---------------------------------------------------------------------------------------------
// Both stores side by side
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn both_feeds_carry_the_same_items_for_the_same_operations() {
    // GIVEN both stores
    let mut stores = [Fixture::embedded(), Fixture::dynamodb().await];
    let now = chat_shared::now_ms();

    // WHEN each is put through the same operations at the same time
    let mut images = Vec::new();
    for f in &mut stores {
        let s = f.store();
        join(s, "a", "alice", now).await;
        join(s, "b", "bob", now).await;
        s.post_public("a", "hi", now).await.expect("public");
        s.post_private("b", "ALICE", "psst", now)
            .await
            .expect("private");
        s.remove_connection("a", LeaveReason::Gone, now)
            .await
            .expect("leave")
            .into_iter()
            .next();
        let records = f.records().await;
        images.push(
            records
                .into_iter()
                .map(|r| (r.change.keys, r.change.new_image))
                .collect::<Vec<_>>(),
        );
    }

    // THEN both feeds carry identical keys and items, attribute for attribute: five events and
    // five writes of lobby's counter (an INSERT, then MODIFYs)
    assert_eq!(images[0].len(), 10);
    assert_eq!(images[0], images[1]);
}

// ---------------------------------------------------------------------------------------------
// The DynamoDB store only: items written, and tables replaced, by hand
// ---------------------------------------------------------------------------------------------

fn av_s(v: &str) -> Av {
    Av::S(v.to_owned())
}

fn av_n(v: impl ToString) -> Av {
    Av::N(v.to_string())
}

/// A room's counter item as the store keeps it, read back with the SDK.
async fn counter_item(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    room: &str,
) -> HashMap<String, Av> {
    client
        .get_item()
        .table_name(&tables.events)
        .key(keys::PK, av_s(&keys::room_pk(room)))
        .key(keys::SEQ, av_n(keys::COUNTER_SEQ))
        .consistent_read(true)
        .send()
        .await
        .expect("get counter")
        .item
        .expect("counter item exists")
}

/// A connection item as the store keeps it, read back with the SDK.
async fn conn_item(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    id: &str,
) -> HashMap<String, Av> {
    client
        .get_item()
        .table_name(&tables.connections)
        .key(keys::PK, av_s(&keys::conn_pk(id)))
        .key(keys::SK, av_s(keys::CONN_SK))
        .consistent_read(true)
        .send()
        .await
        .expect("get connection")
        .item
        .expect("connection item exists")
}

/// Leaves connection `id`, named `old` and a member of lobby and `others` (each room small:
/// its member item in shard 0), as a rename to `new` that failed after its first transaction
/// leaves it, written with the SDK behind the store's back: the claim moved, the connection
/// named `new` with the `renaming` marker, lobby's member item renamed, the other rooms'
/// member items still named `old`.
async fn half_renamed(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    id: &str,
    old: &str,
    new: &str,
) {
    let new = name(new);
    let conn = conn_item(client, tables, id).await;
    let expires_at = conn.get(keys::EXPIRES_AT).cloned().expect("expiresAt");
    client
        .update_item()
        .table_name(&tables.connections)
        .key(keys::PK, av_s(&keys::conn_pk(id)))
        .key(keys::SK, av_s(keys::CONN_SK))
        .update_expression("SET #name = :name, #nkey = :nkey, #renaming = :old")
        .expression_attribute_names("#name", keys::NAME)
        .expression_attribute_names("#nkey", keys::NAME_KEY)
        .expression_attribute_names("#renaming", keys::RENAMING)
        .expression_attribute_values(":name", av_s(&new.display))
        .expression_attribute_values(":nkey", av_s(&new.key))
        .expression_attribute_values(":old", av_s(old))
        .send()
        .await
        .expect("rename the connection");
    client
        .delete_item()
        .table_name(&tables.connections)
        .key(keys::PK, av_s(&keys::name_pk(&name_key(old))))
        .key(keys::SK, av_s(keys::NAME_SK))
        .send()
        .await
        .expect("release the old claim");
    client
        .put_item()
        .table_name(&tables.connections)
        .item(keys::PK, av_s(&keys::name_pk(&new.key)))
        .item(keys::SK, av_s(keys::NAME_SK))
        .item(keys::CONNECTION_ID, av_s(id))
        .item(keys::NAME, av_s(&new.display))
        .item(keys::EXPIRES_AT, expires_at)
        .send()
        .await
        .expect("claim the new name");
    client
        .update_item()
        .table_name(&tables.connections)
        .key(keys::PK, av_s(&keys::members_pk(keys::DEFAULT_ROOM, 0)))
        .key(keys::SK, av_s(id))
        .update_expression("SET #name = :name")
        .expression_attribute_names("#name", keys::NAME)
        .expression_attribute_values(":name", av_s(&new.display))
        .send()
        .await
        .expect("rename the lobby member item");
}

/// The name on `id`'s member item in `room` (shard 0), read with the SDK.
async fn member_name(
    client: &aws_sdk_dynamodb::Client,
    tables: &Tables,
    room: &str,
    id: &str,
) -> Option<String> {
    client
        .get_item()
        .table_name(&tables.connections)
        .key(keys::PK, av_s(&keys::members_pk(room, 0)))
        .key(keys::SK, av_s(id))
        .consistent_read(true)
        .send()
        .await
        .expect("get member")
        .item
        .and_then(|item| item.get(keys::NAME).and_then(|v| v.as_s().ok()).cloned())
}

fn number(item: &HashMap<String, Av>, attribute: &str) -> u64 {
    item.get(attribute)
        .and_then(|v| v.as_n().ok())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{attribute} in {item:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_members_land_in_and_are_read_from_several_shards() {
    // GIVEN room big whose counter says it uses 4 shards, as 2,001 joins would have made it
    // (too many joins for moto: the counter is written by hand)
    let mut f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    client
        .put_item()
        .table_name(&tables.events)
        .item(keys::PK, av_s(&keys::room_pk("big")))
        .item(keys::SEQ, av_n(keys::COUNTER_SEQ))
        .item(keys::TYPE, av_s(keys::COUNTER_TYPE))
        .item(keys::COUNTER_LAST, av_n(0))
        .item(keys::COUNTER_MEMBERS, av_n(0))
        .item(keys::COUNTER_SHARDS, av_n(4))
        .send()
        .await
        .expect("put counter");
    let now = chat_shared::now_ms();
    let s = f.store();

    // WHEN twelve members join it
    let members: Vec<String> = (0..12).map(|i| format!("m{i:02}=")).collect();
    for (i, id) in members.iter().enumerate() {
        join(s, id, &format!("member{i}"), now).await;
        join_room(s, id, "big", now).await;
    }

    // THEN it still uses 4 shards; each member's item is in the shard its id hashes to among 4,
    // which its connection remembers; several shards are used, and shards 0..4 list everyone
    assert_eq!(s.member_shards("big", now).await.expect("shards"), 4);
    let mut used = BTreeSet::new();
    for shard in 0..4 {
        let page = s.members_page("big", shard, None, now).await.expect("page");
        for m in &page.members {
            assert_eq!(keys::member_shard(&m.connection_id, 4), shard, "{m:?}");
            used.insert(shard);
        }
    }
    assert!(used.len() >= 2, "members spread over shards {used:?}");
    for id in &members {
        let conn = client
            .get_item()
            .table_name(&tables.connections)
            .key(keys::PK, av_s(&keys::conn_pk(id)))
            .key(keys::SK, av_s(keys::CONN_SK))
            .consistent_read(true)
            .send()
            .await
            .expect("get connection")
            .item
            .expect("connection item");
        let rooms = conn[keys::ROOMS].as_m().expect("rooms is a map");
        assert_eq!(
            rooms["big"].as_n().expect("shard number"),
            &keys::member_shard(id, 4).to_string()
        );
    }
    let listed = room_members(s, "big", now).await;
    assert_eq!(
        ids(&listed),
        members.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let counter = counter_item(&client, &tables, "big").await;
    assert_eq!(number(&counter, keys::COUNTER_LAST), 12);
    assert_eq!(number(&counter, keys::COUNTER_MEMBERS), 12);
    assert_eq!(number(&counter, keys::COUNTER_SHARDS), 4);

    // WHEN the room has grown to 8 shards since, and a member whose shard among 8 differs from
    // the one it joined (among 4) leaves
    client
        .update_item()
        .table_name(&tables.events)
        .key(keys::PK, av_s(&keys::room_pk("big")))
        .key(keys::SEQ, av_n(keys::COUNTER_SEQ))
        .update_expression("SET #s = :eight")
        .expression_attribute_names("#s", keys::COUNTER_SHARDS)
        .expression_attribute_values(":eight", av_n(8))
        .send()
        .await
        .expect("grow shards");
    let moved = members
        .iter()
        .find(|id| keys::member_shard(id, 8) != keys::member_shard(id, 4))
        .expect("some member hashes elsewhere among 8")
        .clone();
    s.leave_room(&moved, "big", LeaveReason::Left, now)
        .await
        .expect("leave");

    // THEN its item is gone (found through the shard its connection remembered), and shards
    // 0..8 list the others once
    let listed = room_members(s, "big", now).await;
    let expected: Vec<&str> = members
        .iter()
        .map(String::as_str)
        .filter(|id| *id != moved)
        .collect();
    assert_eq!(ids(&listed), expected);
    let counter = counter_item(&client, &tables, "big").await;
    assert_eq!(number(&counter, keys::COUNTER_MEMBERS), 11);
    assert_eq!(number(&counter, keys::COUNTER_SHARDS), 8);
    assert_eq!(f.committed().await.len(), 12 + 12 + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_replacing_the_connections_table_does_not_restart_ids() {
    // GIVEN alice joined lobby and posted (lobby's events 1 and 2)
    let f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    let now = chat_shared::now_ms();
    let alice = join(f.store(), "a", "alice", now).await;
    let hi = f.store().post_public("a", "hi", now).await.expect("post");

    // AND both events' retention has passed: DynamoDB's TTL sweeper deleted them (by hand here)
    for seq in [1, 2] {
        client
            .delete_item()
            .table_name(&tables.events)
            .key(keys::PK, av_s(&keys::room_pk(keys::DEFAULT_ROOM)))
            .key(keys::SEQ, av_n(seq))
            .send()
            .await
            .expect("delete expired event");
    }

    // WHEN the connections table is deleted and created again, as replacing the stack does
    // (the events table is retained)
    client
        .delete_table()
        .table_name(&tables.connections)
        .send()
        .await
        .expect("delete connections table");
    for _ in 0..100 {
        match client
            .describe_table()
            .table_name(&tables.connections)
            .send()
            .await
        {
            Err(e)
                if e.as_service_error()
                    .is_some_and(|se| se.is_resource_not_found_exception()) =>
            {
                break
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    create_tables(&client, &tables).await.expect("recreate");

    // THEN alice is gone with the table, and bob's join is lobby's event 3, not 1: the room's
    // counter lives with the log it numbers, and is no expiring item (a counter in the
    // connections table would restart at 0 here, with no newer event left to heal it from:
    // clients that saw ids 1 and 2 would take the new 1 and 2 for events they have)
    assert_eq!(f.store().connection("a", now).await.expect("read"), None);
    let bob = join(f.store(), "b", "bob", now).await;
    assert_eq!((bob.room.as_str(), bob.seq), ("lobby", 3));
    let posted = f
        .store()
        .post_public("b", "hello", now)
        .await
        .expect("post");
    assert_eq!(posted.seq, 4);
    assert_eq!(room_log(f.store(), "lobby", now).await, vec![bob, posted]);
    assert_eq!((alice.seq, hi.seq), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_room_without_its_counter_continues_after_its_newest_event() {
    // GIVEN lobby's log holds events 1..=5 as layout 1 left it: its counter was in the
    // connections table, so the events table has no counter item
    let f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    let now = chat_shared::now_ms();
    let retention = Retention::default().event_retention.as_secs() as i64;
    for seq in 1..=5 {
        let old = StoredEvent {
            room: keys::DEFAULT_ROOM.to_owned(),
            seq,
            ts: now,
            event: ChatEvent::MessagePosted {
                connection_id: "old".into(),
                name: "oldie".into(),
                message: format!("from layout 1, {seq}"),
            },
        };
        let item = serde_dynamo::to_item(chat_shared::events::EventItem::new(
            &old,
            epoch_secs(now) + retention,
        ))
        .expect("event item");
        client
            .put_item()
            .table_name(&tables.events)
            .set_item(Some(item))
            .send()
            .await
            .expect("put old event");
    }

    // WHEN alice joins and posts
    let joined = join(f.store(), "a", "alice", now).await;
    let posted = f.store().post_public("a", "hi", now).await.expect("post");

    // THEN her join is 6 and her post 7: the store found the log ahead of the missing counter
    // and moved the counter up to its newest event instead of colliding forever
    assert_eq!(joined.seq, 6);
    assert_eq!(posted.seq, 7);
    let counter = counter_item(&client, &tables, keys::DEFAULT_ROOM).await;
    assert_eq!(number(&counter, keys::COUNTER_LAST), 7);
    assert_eq!(room_log(f.store(), "lobby", now).await.len(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_pruning_many_members_moves_the_room_counter_once() {
    // GIVEN five members of lobby, and the feed read so far
    let mut f = Fixture::dynamodb().await;
    let now = chat_shared::now_ms();
    let ids: Vec<String> = (0..5).map(|i| format!("g{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        join(f.store(), id, &format!("gone{i}"), now).await;
    }
    f.records().await;

    // WHEN all five are removed at once (the fan-out's pruning after 410s)
    let left = f
        .store()
        .remove_connections(&ids, LeaveReason::Gone, now)
        .await
        .expect("prune");

    // THEN five MemberLeft (6..=10) committed in one transaction: the feed has one write of
    // lobby's counter for them, not five (the room's partition is the one hot spot)
    assert_eq!(
        left.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (6..=10).collect::<Vec<_>>()
    );
    let records = f.records().await;
    let counters: Vec<&EventRecord> = records.iter().filter(|r| is_counter(r)).collect();
    assert_eq!(counters.len(), 1, "{counters:?}");
    assert_eq!(records.len(), 6);
    assert!(room_members(f.store(), "lobby", now).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_retried_set_name_finishes_a_rename_that_failed_part_way() {
    // GIVEN alice in lobby, r1 and r2, and bob in r1
    let mut f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    let now = chat_shared::now_ms();
    join(f.store(), "a", "alice", now).await;
    join(f.store(), "b", "bob", now).await;
    join_room(f.store(), "a", "r1", now).await;
    join_room(f.store(), "a", "r2", now).await;
    join_room(f.store(), "b", "r1", now).await;
    f.committed().await;
    // AND her rename to alicia stopped after its first transaction (lobby's), as a store
    // error in r1's would have left it: r1 and r2 still list her as alice
    half_renamed(&client, &tables, "a", "alice", "alicia").await;
    assert_eq!(
        member_name(&client, &tables, "r1", "a").await.as_deref(),
        Some("alice")
    );

    // WHEN her client retries setName alicia
    let retried = f
        .store()
        .set_name("a", &name("alicia"), now)
        .await
        .expect("retry");

    // THEN r1 and r2 hear of the rename, from the name they knew, at their next ids, and
    // those are the events returned and committed; lobby (whose member item has the new
    // name) hears nothing
    let rename = ChatEvent::MemberRenamed {
        connection_id: "a".into(),
        old_name: "alice".into(),
        name: "alicia".into(),
    };
    assert_eq!(
        retried
            .iter()
            .map(|e| (e.room.as_str(), e.seq, &e.event))
            .collect::<Vec<_>>(),
        [("r1", 3, &rename), ("r2", 2, &rename)]
    );
    assert_eq!(f.committed().await, retried);
    for room in ["lobby", "r1", "r2"] {
        assert_eq!(
            member_name(&client, &tables, room, "a").await.as_deref(),
            Some("alicia"),
            "in {room}"
        );
    }
    // AND the marker is gone: a second retry records nothing
    assert!(!conn_item(&client, &tables, "a")
        .await
        .contains_key(keys::RENAMING));
    let again = f
        .store()
        .set_name("a", &name("alicia"), now)
        .await
        .expect("again");
    assert!(again.is_empty(), "{again:?}");
    assert!(f.committed().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_new_name_after_a_rename_failed_part_way_comes_after_the_old_rename() {
    // GIVEN alice in lobby and r1, her rename to alicia stopped after lobby's transaction
    let mut f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    let now = chat_shared::now_ms();
    join(f.store(), "a", "alice", now).await;
    join_room(f.store(), "a", "r1", now).await;
    half_renamed(&client, &tables, "a", "alice", "alicia").await;
    f.committed().await;

    // WHEN she renames herself to ali
    let events = f
        .store()
        .set_name("a", &name("ali"), now)
        .await
        .expect("rename");

    // THEN r1 first hears of the rename it missed, then both rooms of the new one
    let renamed = |old: &str, new: &str| ChatEvent::MemberRenamed {
        connection_id: "a".into(),
        old_name: old.into(),
        name: new.into(),
    };
    assert_eq!(
        events
            .iter()
            .map(|e| (e.room.as_str(), e.event.clone()))
            .collect::<Vec<_>>(),
        [
            ("r1", renamed("alice", "alicia")),
            ("lobby", renamed("alicia", "ali")),
            ("r1", renamed("alicia", "ali")),
        ]
    );
    assert_eq!(f.committed().await, events);
    assert!(!conn_item(&client, &tables, "a")
        .await
        .contains_key(keys::RENAMING));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_leaves_during_an_unfinished_rename_carry_the_name_each_room_knew() {
    // GIVEN alice in lobby, r1 and r2, her rename to alicia stopped after lobby's transaction
    let f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    let now = chat_shared::now_ms();
    join(f.store(), "a", "alice", now).await;
    join_room(f.store(), "a", "r1", now).await;
    join_room(f.store(), "a", "r2", now).await;
    half_renamed(&client, &tables, "a", "alice", "alicia").await;

    // WHEN she leaves r1, then disconnects
    let left = f
        .store()
        .leave_room("a", "r1", LeaveReason::Left, now)
        .await
        .expect("leave");
    let gone = f
        .store()
        .remove_connection("a", LeaveReason::Disconnected, now)
        .await
        .expect("disconnect");

    // THEN each MemberLeft carries the name its room knew her by: r1 and r2 never heard of
    // alicia, lobby did
    let left_as = |e: &StoredEvent| match &e.event {
        ChatEvent::MemberLeft { name, .. } => (e.room.clone(), name.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(left_as(&left), ("r1".to_owned(), "alice".to_owned()));
    assert_eq!(
        gone.iter().map(left_as).collect::<Vec<_>>(),
        [
            ("lobby".to_owned(), "alicia".to_owned()),
            ("r2".to_owned(), "alice".to_owned())
        ]
    );
    assert_eq!(f.store().connection("a", now).await.expect("read"), None);
}

// ---------------------------------------------------------------------------------------------
// The embedded store only
// ---------------------------------------------------------------------------------------------

fn embedded() -> EmbeddedStore {
    EmbeddedStore::new(Retention::default()).with_page_limit(PAGE_LIMIT)
}

/// Every record not read before but the rooms' counters' (the fan-out skips those too).
async fn drain(feed: &mut EmbeddedFeed) -> Vec<EventRecord> {
    let records = feed.poll(1_000, Duration::ZERO).await.expect("poll");
    if let Some(seq) = records
        .last()
        .and_then(|r| r.change.sequence_number.clone())
    {
        feed.checkpoint(&seq);
    }
    records.into_iter().filter(|r| !is_counter(r)).collect()
}

#[tokio::test]
async fn embedded_expiry_removes_items_like_dynamodbs_ttl_sweeper() {
    // GIVEN alice joined and posted (events 1 and 2), and the feed has been read
    let store = embedded();
    let mut feed = store.feed();
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    store.post_public("a", "hi", now).await.expect("post");
    let inserts = drain(&mut feed).await;
    assert_eq!(inserts.len(), 2);

    // WHEN the sweeper runs after the connection TTL, then after the history's retention
    let removed_connections = store.expire(past_connection_ttl(now));
    let after_connections = drain(&mut feed).await;
    let retention_ms = Retention::default().event_retention.as_millis() as i64;
    let history_gone_at = now + retention_ms + 1_000;
    let removed_events = store.expire(history_gone_at);
    let removals = drain(&mut feed).await;

    // THEN first the connection and its claim go (the connection's TTL REMOVE goes to the
    // connections table's own feed, not this one) — not its member item, whose TTL is a grace
    // later (the expiry path leaves the room by it) —
    // then both events, each as a REMOVE record by the DynamoDB service with the keys and no
    // image (the room's counter never expires), and the member item, long past its grace
    assert_eq!(removed_connections, 2);
    assert!(after_connections.is_empty());
    assert_eq!(
        store
            .remove_connection("a", LeaveReason::Disconnected, now)
            .await
            .expect("remove")
            .into_iter()
            .next(),
        None,
        "the swept connection is gone even for a $disconnect"
    );
    assert_eq!(removed_events, 2 + 1);
    assert!(store.events().is_empty());
    assert_eq!(removals.len(), 2);
    let last_insert: u128 = inserts[1]
        .change
        .sequence_number
        .as_deref()
        .and_then(|s| s.parse().ok())
        .expect("sequence number");
    for (record, seq) in removals.iter().zip(1u64..) {
        assert!(is_removal(record));
        assert_eq!(record.event_name, "REMOVE");
        let identity = record.user_identity.as_ref().expect("TTL identity");
        assert_eq!(identity.type_, "Service");
        assert_eq!(identity.principal_id, "dynamodb.amazonaws.com");
        assert!(record.change.new_image.is_empty());
        assert!(record.change.old_image.is_empty());
        let keys = serde_json::to_value(&record.change.keys).expect("keys");
        assert_eq!(keys["seq"], serde_json::json!({"N": seq.to_string()}));
        let sequence: u128 = record
            .change
            .sequence_number
            .as_deref()
            .and_then(|s| s.parse().ok())
            .expect("sequence number");
        assert!(sequence > last_insert);
        let json = serde_json::to_value(record).expect("record as JSON");
        assert_eq!(
            json["userIdentity"],
            serde_json::json!({"type": "Service", "principalId": "dynamodb.amazonaws.com"})
        );
    }
    // AND the room's counter is not an expiring item: ids go on from 3
    let rejoined = join(&store, "b", "alice", history_gone_at).await;
    assert_eq!(rejoined.seq, 3);
}

#[tokio::test]
async fn embedded_injected_failures_change_nothing() {
    // GIVEN alice has joined and the feed has been read
    let store = embedded();
    let mut feed = store.feed();
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    drain(&mut feed).await;

    // WHEN the next two writes are made to fail
    store.fail_next_writes(2);
    let post = store.post_public("a", "hi", now).await.expect_err("fails");
    let rename = store
        .set_name("a", &name("al"), now)
        .await
        .expect_err("fails");

    // THEN both are retryable backend errors, and nothing was written
    for err in [&post, &rename] {
        assert!(matches!(err, StoreError::Backend { .. }), "{err:?}");
        assert!(err.is_retryable());
    }
    assert_eq!(store.events().len(), 1);
    assert!(drain(&mut feed).await.is_empty());
    let a = store.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.name.as_deref(), Some("alice"));
    // AND the next write works and takes the next id: none was used up
    let posted = store.post_public("a", "hi", now).await.expect("post");
    assert_eq!(posted.seq, 2);
    assert_eq!(drain(&mut feed).await.len(), 1);
}

#[tokio::test]
async fn embedded_feed_replays_until_checkpointed_and_waits_for_commits() {
    // GIVEN a member and two feeds
    let store = embedded();
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    store.post_public("a", "one", now).await.expect("post");
    let mut first = store.feed();
    let mut second = store.feed();

    // WHEN the first polls twice without a checkpoint, then checkpoints the first record
    let batch = first.poll(10, Duration::ZERO).await.expect("poll");
    let again = first.poll(10, Duration::ZERO).await.expect("poll");
    let one = first.poll(1, Duration::ZERO).await.expect("poll");
    first.checkpoint(
        one[0]
            .change
            .sequence_number
            .as_deref()
            .expect("sequence number"),
    );
    let rest = first.poll(10, Duration::ZERO).await.expect("poll");

    // THEN an uncheckpointed batch comes again, `max` is respected, and the checkpoint moves on;
    // the other feed still starts at the beginning
    // (each append is two records: the room's counter, then the event)
    assert_eq!(batch.len(), 4);
    assert_eq!(again, batch);
    assert_eq!(one.len(), 1);
    assert_eq!(rest, batch[1..].to_vec());
    assert_eq!(second.poll(10, Duration::ZERO).await.expect("poll"), batch);

    // AND an empty poll waits for a commit instead of returning at once
    first.checkpoint(
        rest[rest.len() - 1]
            .change
            .sequence_number
            .as_deref()
            .expect("sequence number"),
    );
    let quiet_started = Instant::now();
    let quiet = first
        .poll(10, Duration::from_millis(100))
        .await
        .expect("poll");
    assert!(quiet.is_empty());
    assert!(quiet_started.elapsed() >= Duration::from_millis(100));
    let writer = store.clone();
    let post = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        writer.post_public("a", "two", now).await
    });
    let woken_started = Instant::now();
    let woken = first.poll(10, Duration::from_secs(10)).await.expect("poll");
    let posted = post.await.expect("task").expect("post");
    assert!(
        woken_started.elapsed() < Duration::from_secs(5),
        "woken by the commit"
    );
    let woken: Vec<EventRecord> = woken.into_iter().filter(|r| !is_counter(r)).collect();
    assert_eq!(woken.len(), 1);
    assert_eq!(decode_record(&woken[0]).expect("decodes"), posted);
    assert_eq!(store.events().last(), Some(&posted));
}

#[tokio::test]
async fn embedded_feed_sequence_numbers_sort_as_strings() {
    // GIVEN more than ten records
    let store = embedded();
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    for n in 0..11 {
        store
            .post_public("a", &format!("m{n}"), now)
            .await
            .expect("post");
    }

    // WHEN the feed is read
    let records = drain(&mut store.feed()).await;

    // THEN the sequence numbers are fixed-width decimals, so string order is numeric order, and
    // each record carries the embedded stream's ARN
    let sequences: Vec<String> = records
        .iter()
        .map(|r| r.change.sequence_number.clone().expect("sequence number"))
        .collect();
    assert_eq!(sequences.len(), 12);
    assert!(sequences.iter().all(|s| s.len() == 21));
    let mut sorted = sequences.clone();
    sorted.sort();
    assert_eq!(sorted, sequences);
    let arn = store.feed().stream_arn().to_owned();
    assert!(records
        .iter()
        .all(|r| r.event_source_arn.as_deref() == Some(arn.as_str())));
    assert_eq!(
        records
            .iter()
            .map(|r| r.event_id.clone())
            .collect::<BTreeSet<_>>()
            .len(),
        12,
        "event ids are unique"
    );
}

#[tokio::test]
async fn embedded_a_recipient_no_valid_name_can_have_is_unknown_without_reading_a_key() {
    for behaviour in [StoreBehaviour::IDEAL, StoreBehaviour::aws_like()] {
        // GIVEN a member
        let store = EmbeddedStore::new(Retention::default()).with_behaviour(behaviour);
        let now = chat_shared::now_ms();
        join(&store, "a", "alice", now).await;
        let claims_read = |s: &EmbeddedStore| {
            s.reads()
                .get(&ReadOp::GetNameClaim)
                .map_or(0, |t| t.strongly_consistent + t.eventually_consistent)
        };
        let before = claims_read(&store);

        // WHEN it whispers to a name whose claim key would be over DynamoDB's 1,024 bytes
        let refused = store
            .post_private("a", &"\u{FDFA}".repeat(32), "hi", now)
            .await;

        // THEN nobody can have that name: unknown_recipient, and no claim was read (the key,
        // which DynamoDB would refuse with a ValidationException, is never built)
        assert!(
            matches!(refused, Err(StoreError::UnknownRecipient(_))),
            "{refused:?}"
        );
        assert_eq!(claims_read(&store), before);
    }
}

/// An AWS-like store whose eventually consistent reads lag by exactly `lag`, so which writes
/// they miss is certain.
fn lagging(lag: Duration) -> EmbeddedStore {
    EmbeddedStore::new(Retention::default()).with_behaviour(StoreBehaviour {
        eventual_min: lag,
        eventual_max: lag,
        ..StoreBehaviour::aws_like()
    })
}

#[tokio::test]
async fn embedded_aws_like_member_query_is_as_consistent_as_the_dynamodb_adapter_asks() {
    // GIVEN an AWS-like store whose eventually consistent reads lag 2 s, and alice who joined
    // longer ago than that
    let lag = Duration::from_secs(2);
    let store = lagging(lag);
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    tokio::time::sleep(lag + Duration::from_millis(50)).await;

    // WHEN bob joins, and the members are read at once (as the fan-out does for bob's join),
    // and bob's connection is read
    join(&store, "b", "bob", now).await;
    let at_once = all_members(&store, now).await;
    let bob = store.connection("b", now).await.expect("read").expect("b");
    tokio::time::sleep(lag + Duration::from_millis(50)).await;
    let later = all_members(&store, now).await;

    // THEN the member query sees bob at once: it is strongly consistent (ReadOp::QueryMembers;
    // eventually consistent, it missed the member who just joined, as DynamoDB can); so does
    // the strongly consistent GetItem, and a read after the lag
    let names = |m: &[Member]| m.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&at_once), ["alice", "bob"]);
    assert_eq!(bob.name.as_deref(), Some("bob"));
    assert_eq!(names(&later), ["alice", "bob"]);
    // AND the store's record shows which reads were strongly consistent
    let reads = store.reads();
    let members = reads[&ReadOp::QueryMembers];
    let expected_pages = 2;
    assert_eq!(members.strongly_consistent, expected_pages);
    assert_eq!(members.eventually_consistent, 0);
    assert_eq!(reads[&ReadOp::GetConnection].strongly_consistent, 1);
    assert_eq!(reads[&ReadOp::GetConnection].eventually_consistent, 0);
}

#[tokio::test]
async fn embedded_aws_like_eventually_consistent_reads_miss_only_writes_younger_than_the_lag() {
    // GIVEN an AWS-like store lagging 2 s: alice joined, then left, more than 2 s ago; carol
    // joined; then, within the lag, bob joins, carol renames herself and dave connects. The
    // adapter reads members strongly consistent, so the store is told to serve that query
    // eventually consistent: this is the emulator's own behaviour under test.
    let lag = Duration::from_secs(2);
    let store = lagging(lag).reading_eventually(ReadOp::QueryMembers);
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    store
        .remove_connection("a", LeaveReason::Disconnected, now)
        .await
        .expect("leave")
        .into_iter()
        .next();
    join(&store, "c", "carol", now).await;
    tokio::time::sleep(lag + Duration::from_millis(50)).await;
    join(&store, "b", "bob", now).await;
    store
        .set_name("c", &name("caroline"), now)
        .await
        .expect("rename")
        .into_iter()
        .next();
    store
        .remove_connection("c", LeaveReason::Disconnected, now)
        .await
        .expect("leave")
        .into_iter()
        .next();
    join(&store, "c", "carol2", now).await;

    // WHEN the member query reads, eventually consistent
    let members = all_members(&store, now).await;

    // THEN it sees the state of 2 s ago exactly: carol by her old name, no bob, no alice
    let names: Vec<String> = members.into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["carol"]);
    assert_eq!(
        store.reads()[&ReadOp::QueryMembers].eventually_consistent,
        1
    );
}

#[tokio::test]
async fn embedded_ideal_reads_are_all_strongly_consistent() {
    // GIVEN an ideal store with a member
    let store = EmbeddedStore::new(Retention::default());
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;

    // WHEN a new member joins and everything is read at once
    join(&store, "b", "bob", now).await;
    let members = all_members(&store, now).await;
    store.connection("b", now).await.expect("read");

    // THEN the member query sees both, and every read was strongly consistent
    assert_eq!(members.len(), 2);
    let reads = store.reads();
    assert!(
        reads.values().all(|t| t.eventually_consistent == 0),
        "{reads:?}"
    );
    assert_eq!(reads[&ReadOp::QueryMembers].strongly_consistent, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_aws_like_concurrent_appends_collide_on_the_room_counter() {
    // GIVEN an AWS-like store whose transactions take 500 ms (reads instant), so two posts
    // started together both read the room's counter before either commits
    let store = EmbeddedStore::new(Retention::default()).with_behaviour(StoreBehaviour {
        read_latency: Duration::ZERO,
        write_latency: Duration::from_millis(500),
        ..StoreBehaviour::aws_like()
    });
    let now = chat_shared::now_ms();
    join(&store, "a", "alice", now).await;
    assert_eq!(store.counter_collisions(), 0);

    // WHEN alice posts twice at once
    let (one, two) = tokio::join!(
        store.post_public("a", "one", now),
        store.post_public("a", "two", now)
    );

    // THEN one commit wins, the other collides on the counter (as its conditional transaction
    // would be cancelled on DynamoDB), backs off and commits next: ids stay dense
    let mut ids = vec![one.expect("one").seq, two.expect("two").seq];
    ids.sort_unstable();
    assert_eq!(ids, [2, 3]);
    assert!(store.counter_collisions() >= 1);
}

#[tokio::test]
async fn embedded_aws_like_a_hot_partition_is_throttled_as_dynamodb_throttles_it() {
    // GIVEN an AWS-like store (no latency) whose partitions take 5 write units a second, and
    // alice's connection (a PutItem in CONN#a: 1 unit) and join (a transaction: 2 units each
    // in CONN#a, NAME#alice, MEMBERS#lobby#0, and 4 in ROOM#lobby for the counter and the
    // event): lobby's partition has 1 unit left
    let store = EmbeddedStore::new(Retention::default()).with_behaviour(StoreBehaviour {
        read_latency: Duration::ZERO,
        write_latency: Duration::ZERO,
        partition: Some(PartitionThroughput {
            write_units_per_sec: 5.0,
            read_units_per_sec: 3_000.0,
        }),
        ..StoreBehaviour::aws_like()
    });
    let now = chat_shared::now_ms();
    let joined = join(&store, "a", "alice", now).await;

    // WHEN she posts at once (4 units in ROOM#lobby: the counter and the event, in a
    // transaction), and again after a second
    let throttled = store.post_public("a", "too soon", now).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let later = store.post_public("a", "later", now).await;

    // THEN the first post is refused as the SDK reports DynamoDB's throttling once its own
    // retries are spent (they wait at most 0.3 s, the 3 missing units take 0.6 s to come back), and
    // nothing of it was written; a second later the partition has the units again
    let e = throttled.expect_err("throttled");
    let (code, message) = aws_error(&e);
    assert_eq!(code, THROTTLED);
    assert!(message.contains("throughput"), "{message}");
    let later = later.expect("the partition refilled");
    assert_eq!(later.seq, joined.seq + 1);
    assert_eq!(store.events().len(), 2);
}

// ---------------------------------------------------------------------------------------------
// Unsequenced joins: forced contention and the sampled sizing of a room
// ---------------------------------------------------------------------------------------------

/// Connection ids with the given prefix that do (or do not) size their room when they join
/// unsequenced (`keys::samples_size`).
fn sampling_ids(prefix: &str, samples: bool, n: usize) -> Vec<String> {
    let found: Vec<String> = (0..10_000)
        .map(|i| format!("{prefix}{i}"))
        .filter(|id| keys::samples_size(id) == samples)
        .take(n)
        .collect();
    assert_eq!(found.len(), n, "ids that sample: {samples}");
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_join_that_loses_the_counter_three_times_joins_unsequenced_and_is_listed() {
    // GIVEN a room dev of one member, and two more named connections
    let s = embedded();
    let now = chat_shared::now_ms();
    for (id, display) in [("a", "alice"), ("b", "bob"), ("c", "carol"), ("d", "dave")] {
        join(&s, id, display, now).await;
    }
    assert_eq!(join_room(&s, "a", "dev", now).await.seq, 1);

    // WHEN bob's join loses dev's counter twice (forced, as if two writers had moved it)
    s.force_collisions("dev", keys::SEQUENCED_JOIN_ATTEMPTS - 1);
    let bob = s
        .join_room("b", "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join");
    // THEN its third attempt still records MemberJoined
    assert!(matches!(bob, Joined::Now(ref e) if e.seq == 2), "{bob:?}");

    // WHEN carol's join loses it three times
    s.force_collisions("dev", keys::SEQUENCED_JOIN_ATTEMPTS);
    let carol = s
        .join_room("c", "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join");
    // THEN she joins unsequenced: no event, her catch-up point the room's last id
    assert_eq!(carol, Joined::Unsequenced { last: 2 });
    assert_eq!(s.events_in("dev").len(), 2);
    assert_eq!(s.counter("dev").map(|c| c.last), Some(2));

    // AND the fan-out's member walk finds her, so she receives the next broadcast
    let walk: Vec<String> = chat_shared::fanout::members(&s, "dev", now)
        .map(|m| m.expect("member").connection_id)
        .collect::<Vec<_>>()
        .await;
    assert_eq!(
        BTreeSet::from_iter(walk),
        BTreeSet::from(["a", "b", "c"].map(String::from))
    );
    // AND the next sequenced presence change of the room (dave's join) carries her in its
    // members frame: the frame is built from that walk
    let dave = join_room(&s, "d", "dev", now).await;
    assert_eq!(dave.seq, 3);
    let names: Vec<String> = chat_shared::fanout::members(&s, "dev", now)
        .map(|m| m.expect("member").name)
        .collect::<Vec<_>>()
        .await;
    let frames = chat_shared::fanout::presence_frames(&[dave], names);
    let members_frame = frames
        .iter()
        .map(|f| f.to_json())
        .find(|f| f.contains("\"members\""))
        .expect("a members frame");
    assert!(members_frame.contains("carol"), "{members_frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_sampled_unsequenced_joins_make_a_room_large_without_the_counter() {
    // GIVEN a large-room limit of 3, a room dev of one member, and dev's counter contended on
    // every append (so each join is unsequenced and `members` stays 1)
    let s = embedded().with_large_room_limit(3);
    let now = chat_shared::now_ms();
    // Four that are no samplers and land in dev's newest shard once it has eight.
    let quiet: Vec<String> = sampling_ids("q", false, 200)
        .into_iter()
        .filter(|id| keys::member_shard(id, keys::LARGE_ROOM_SHARDS) == keys::LARGE_ROOM_SHARDS - 1)
        .take(4)
        .collect();
    assert_eq!(quiet.len(), 4);
    let samplers = sampling_ids("s", true, 2);
    // (lobby turns large too: `named`, whose setName may record nothing)
    for (i, id) in quiet.iter().chain(&samplers).enumerate() {
        named(&s, id, &format!("user{i}"), now).await;
    }
    named(&s, "seed", "seed", now).await;
    join_room(&s, "seed", "dev", now).await;
    s.force_collisions("dev", 1_000);

    // WHEN a sampler joins (2 members in dev's one shard)
    let first = s
        .join_room(&samplers[0], "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join");
    assert!(matches!(first, Joined::Unsequenced { .. }), "{first:?}");
    // THEN the busy room gets LARGE_ROOM_SHARDS shards, but is not past the limit
    let counter = s.counter("dev").expect("counter");
    assert_eq!(counter.shards, keys::LARGE_ROOM_SHARDS);
    assert!(!counter.large);
    // WHEN four non-samplers join dev's newest shard THEN nothing sizes the room
    for id in &quiet {
        let j = s
            .join_room(id, "dev", DEFAULT_MAX_ROOMS, now)
            .await
            .expect("join");
        assert!(matches!(j, Joined::Unsequenced { .. }), "{j:?}");
    }
    assert!(!s.counter("dev").expect("counter").large);
    // WHEN the second sampler joins
    s.join_room(&samplers[1], "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join");
    // THEN its count of the newest shard (4 or more, times 8) makes dev large, though
    // `members` says 1
    let counter = s.counter("dev").expect("counter");
    assert!(counter.large);
    assert_eq!(counter.shards, keys::LARGE_ROOM_SHARDS);
    assert_eq!(counter.members, 1);
    // AND with the contention gone, the next join is unsequenced because dev is large
    s.force_collisions("dev", 0);
    named(&s, "late", "late", now).await;
    let late = s
        .join_room("late", "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join");
    assert_eq!(late, Joined::Unsequenced { last: 1 });
    let walk = chat_shared::fanout::members(&s, "dev", now)
        .collect::<Vec<_>>()
        .await;
    assert_eq!(walk.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_a_sampled_unsequenced_join_sizes_a_large_room() {
    // GIVEN dev's counter marked large by hand (one shard), and named connections
    let f = Fixture::dynamodb().await;
    let (client, tables) = f.dynamo.clone().expect("dynamodb fixture");
    let now = chat_shared::now_ms();
    client
        .put_item()
        .table_name(&tables.events)
        .item(keys::PK, av_s(&keys::room_pk("dev")))
        .item(keys::SEQ, av_n(keys::COUNTER_SEQ))
        .item(keys::TYPE, av_s(keys::COUNTER_TYPE))
        .item(keys::COUNTER_LAST, av_n(0))
        .item(keys::COUNTER_LARGE, Av::Bool(true))
        .send()
        .await
        .expect("put counter");
    let quiet = sampling_ids("q", false, 2);
    let sampler = sampling_ids("s", true, 1).remove(0);
    for (i, id) in quiet.iter().chain([&sampler]).enumerate() {
        join(f.store(), id, &format!("user{i}"), now).await;
    }

    // WHEN two non-samplers join THEN they are unsequenced and the counter is as it was
    for id in &quiet {
        let j = f
            .store()
            .join_room(id, "dev", DEFAULT_MAX_ROOMS, now)
            .await
            .expect("join");
        assert_eq!(j, Joined::Unsequenced { last: 0 });
    }
    assert!(!counter_item(&client, &tables, "dev")
        .await
        .contains_key(keys::COUNTER_SHARDS));
    // WHEN a sampler joins THEN its count (Query, Select COUNT) gives the large room its
    // LARGE_ROOM_SHARDS shards (UpdateItem on the condition shards are as read)
    let j = f
        .store()
        .join_room(&sampler, "dev", DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join");
    assert_eq!(j, Joined::Unsequenced { last: 0 });
    let counter = counter_item(&client, &tables, "dev").await;
    assert_eq!(
        number(&counter, keys::COUNTER_SHARDS),
        u64::from(keys::LARGE_ROOM_SHARDS)
    );
    assert_eq!(number(&counter, keys::COUNTER_LAST), 0);
    // AND every joiner is still found, the earlier ones in shard 0 of the eight
    assert_eq!(room_members(f.store(), "dev", now).await.len(), 3);
    assert!(room_log(f.store(), "dev", now).await.is_empty());
}
