//! The embedded store on layout 2, beyond the shared contract (`tests/tests/store_contract.rs`):
//! what only it can show — failures injected part-way through an operation of several
//! transactions, its DynamoDB Streams records of the rooms' counters, its partitions keyed as
//! layout 2 keys them (throughput and the bill, partition by partition), per-room contention,
//! shard growth and the TTL sweep of member items.

use std::time::Duration;

use aws_lambda_events::event::dynamodb::EventRecord;
use chat_shared::config::Retention;
use chat_shared::events::{ChatEvent, LeaveReason, StoredEvent};
use chat_shared::keys::{self, DEFAULT_ROOM};
use chat_shared::ratelimit::{RateLimit, RequestLimits};
use chat_shared::store::aws_like::{PartitionThroughput, StoreBehaviour};
use chat_shared::store::embedded::{Consumed, EmbeddedFeed, EmbeddedStore, RoomCounter, THROTTLED};
use chat_shared::store::limits::service_error;
use chat_shared::store::{ChatStore, Joined, Member, StoreError, DEFAULT_MAX_ROOMS};
use chat_shared::stream::RecordSource;
use chat_shared::validation::{validate_name, ValidName};
use serde_dynamo::AttributeValue;

fn name(raw: &str) -> ValidName {
    validate_name(raw).expect("valid name")
}

fn store() -> EmbeddedStore {
    EmbeddedStore::new(Retention::default())
}

/// Connects `id` and names it `display` (which makes it a member of lobby).
async fn named(store: &EmbeddedStore, id: &str, display: &str, now: i64) -> StoredEvent {
    store.add_connection(id, now).await.expect("connect");
    store
        .set_name(id, &name(display), now)
        .await
        .expect("set name")
        .into_iter()
        .next()
        .expect("a first name records an event")
}

async fn join(store: &EmbeddedStore, id: &str, room: &str, now: i64) -> StoredEvent {
    match store
        .join_room(id, room, DEFAULT_MAX_ROOMS, now)
        .await
        .expect("join")
    {
        Joined::Now(event) => event,
        Joined::Already { .. } => panic!("{id} was in {room} already"),
        Joined::Unsequenced { .. } => panic!("{id} joined {room} unsequenced"),
    }
}

/// Every member of `room`, shard by shard, page by page.
async fn members(store: &EmbeddedStore, room: &str, now: i64) -> Vec<Member> {
    let shards = store.member_shards(room, now).await.expect("shards");
    let mut all = Vec::new();
    for shard in 0..shards {
        let mut after: Option<String> = None;
        loop {
            let page = store
                .members_page(room, shard, after.as_deref(), now)
                .await
                .expect("page");
            all.extend(page.members);
            match page.next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
    }
    all
}

fn names_in(members: &[Member]) -> Vec<String> {
    let mut names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    names.sort();
    names
}

async fn drain(feed: &mut EmbeddedFeed) -> Vec<EventRecord> {
    let records = feed.poll(10_000, Duration::ZERO).await.expect("poll");
    if let Some(seq) = records
        .last()
        .and_then(|r| r.change.sequence_number.clone())
    {
        feed.checkpoint(&seq);
    }
    records
}

fn attr(record: &EventRecord, attribute: &str) -> Option<String> {
    match record.change.new_image.get(attribute) {
        Some(AttributeValue::S(s)) | Some(AttributeValue::N(s)) => Some(s.clone()),
        _ => None,
    }
}

fn in_room(events: &[StoredEvent], room: &str) -> Vec<(u64, ChatEvent)> {
    events
        .iter()
        .filter(|e| e.room == room)
        .map(|e| (e.seq, e.event.clone()))
        .collect()
}

#[tokio::test]
async fn a_disconnect_that_fails_part_way_leaves_the_rest_for_a_retry() {
    // GIVEN alice in lobby, r1 and r2 (her rooms in name order: lobby, r1, r2), and bob in r2
    let s = store();
    let now = chat_shared::now_ms();
    named(&s, "a", "alice", now).await;
    named(&s, "b", "bob", now).await;
    join(&s, "a", "r1", now).await;
    join(&s, "a", "r2", now).await;
    join(&s, "b", "r2", now).await;

    // WHEN her disconnect's first transaction (the leave of lobby) commits and the second
    // (the leave of r1) fails
    s.fail_writes_after(1, 1);
    let failed = s
        .remove_connection("a", LeaveReason::Disconnected, now)
        .await;

    // THEN the error is retryable, she has left lobby only: her connection remains, its
    // `rooms` says what is left, and her name is still hers
    let err = failed.expect_err("the second transaction fails");
    assert!(err.is_retryable(), "{err:?}");
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.rooms, ["r1", "r2"]);
    assert_eq!(names_in(&members(&s, DEFAULT_ROOM, now).await), ["bob"]);
    assert_eq!(names_in(&members(&s, "r1", now).await), ["alice"]);
    s.add_connection("c", now).await.expect("connect");
    let taken = s.set_name("c", &name("alice"), now).await;
    assert!(matches!(taken, Err(StoreError::NameTaken(_))), "{taken:?}");
    let left_lobby = s.events_in(DEFAULT_ROOM).last().cloned().expect("an event");
    assert!(matches!(left_lobby.event, ChatEvent::MemberLeft { .. }));

    // WHEN the disconnect is retried
    let retried = s
        .remove_connection("a", LeaveReason::Disconnected, now)
        .await
        .expect("retry");

    // THEN it leaves the rooms that were left to leave, once each, then the connection and
    // the claim go
    let rooms: Vec<&str> = retried.iter().map(|e| e.room.as_str()).collect();
    assert_eq!(rooms, ["r1", "r2"]);
    assert!(retried
        .iter()
        .all(|e| matches!(&e.event, ChatEvent::MemberLeft { name, .. } if name == "alice")));
    assert_eq!(s.connection("a", now).await.expect("read"), None);
    assert_eq!(names_in(&members(&s, "r2", now).await), ["bob"]);
    assert!(members(&s, "r1", now).await.is_empty());
    assert_eq!(s.events_in("r1").len(), 2, "joined, left: no second leave");
    named(&s, "c2", "alice", now).await;
}

#[tokio::test]
async fn a_rename_that_fails_part_way_is_announced_in_the_first_room_only_until_retried() {
    // GIVEN alice in lobby, r1 and r2
    let s = store();
    let now = chat_shared::now_ms();
    named(&s, "a", "alice", now).await;
    join(&s, "a", "r1", now).await;
    join(&s, "a", "r2", now).await;

    // WHEN she renames herself, and the second transaction (r1's announcement) fails
    s.fail_writes_after(1, 1);
    let failed = s.set_name("a", &name("alicia"), now).await;

    // THEN as on DynamoDB: the first transaction moved the claim and the name and told lobby;
    // r1 and r2 heard nothing and still list her by the old name
    let err = failed.expect_err("r1's transaction fails");
    assert!(err.is_retryable(), "{err:?}");
    let a = s.connection("a", now).await.expect("read").expect("a");
    assert_eq!(a.name.as_deref(), Some("alicia"));
    assert_eq!(
        in_room(&s.events(), DEFAULT_ROOM)
            .last()
            .map(|(_, e)| e.clone()),
        Some(ChatEvent::MemberRenamed {
            connection_id: "a".into(),
            old_name: "alice".into(),
            name: "alicia".into()
        })
    );
    assert_eq!(s.events_in("r1").len(), 1);
    assert_eq!(s.events_in("r2").len(), 1);
    assert_eq!(names_in(&members(&s, DEFAULT_ROOM, now).await), ["alicia"]);
    assert_eq!(names_in(&members(&s, "r1", now).await), ["alice"]);
    // AND the old name is free, the new one hers
    named(&s, "b", "alice", now).await;
    s.add_connection("c", now).await.expect("connect");
    let taken = s.set_name("c", &name("alicia"), now).await;
    assert!(matches!(taken, Err(StoreError::NameTaken(_))), "{taken:?}");

    // WHEN her client retries the same setName
    let member_reads = |s: &EmbeddedStore| {
        [DEFAULT_ROOM, "r1", "r2"].map(|r| s.consumed_in(&keys::members_pk(r, 0)).read_half_units)
    };
    let reads_before = member_reads(&s);
    let retried = s.set_name("a", &name("alicia"), now).await.expect("retry");
    let reads_after = member_reads(&s);

    // THEN the rooms left behind hear of the rename, once each, from the name they knew,
    // and those are the events returned; lobby hears nothing twice
    let renamed = |room: &str| {
        (
            room.to_owned(),
            ChatEvent::MemberRenamed {
                connection_id: "a".into(),
                old_name: "alice".into(),
                name: "alicia".into(),
            },
        )
    };
    let got: Vec<(String, ChatEvent)> = retried
        .iter()
        .map(|e| (e.room.clone(), e.event.clone()))
        .collect();
    assert_eq!(got, [renamed("r1"), renamed("r2")]);
    assert_eq!(
        in_room(&s.events(), "r1").last().map(|(id, _)| *id),
        Some(2)
    );
    assert_eq!(s.events_in("r2").len(), 2);
    assert_eq!(names_in(&members(&s, "r1", now).await), ["alicia"]);
    assert_eq!(names_in(&members(&s, "r2", now).await), ["alicia"]);
    let lobby_renames = |s: &EmbeddedStore| {
        s.events_in(DEFAULT_ROOM)
            .iter()
            .filter(|e| matches!(e.event, ChatEvent::MemberRenamed { .. }))
            .count()
    };
    assert_eq!(lobby_renames(&s), 1);
    // AND finishing it read her member item in each of her rooms, to compare names
    for (before, after) in reads_before.iter().zip(reads_after) {
        assert!(after > *before, "{reads_before:?} -> {reads_after:?}");
    }

    // WHEN she retries once more
    let events_before = s.events().len();
    let reads_before = member_reads(&s);
    let again = s.set_name("a", &name("alicia"), now).await.expect("again");

    // THEN nothing is left to do: nothing recorded, nothing returned, and no member item
    // read (the connection item alone says no rename is unfinished)
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(s.events().len(), events_before);
    assert_eq!(lobby_renames(&s), 1);
    assert_eq!(member_reads(&s), reads_before);
}

#[tokio::test]
async fn after_a_rename_fails_part_way_a_new_name_is_announced_after_the_old_rename() {
    // GIVEN alice in lobby and r1, renamed to alicia with r1's transaction failing
    let s = store();
    let now = chat_shared::now_ms();
    named(&s, "a", "alice", now).await;
    join(&s, "a", "r1", now).await;
    s.fail_writes_after(1, 1);
    s.set_name("a", &name("alicia"), now)
        .await
        .expect_err("r1's transaction fails");

    // WHEN she renames herself again, to ali
    let events = s.set_name("a", &name("ali"), now).await.expect("rename");

    // THEN r1 first hears of the rename it missed, then of the new one; lobby of the new one
    let got: Vec<(String, String, String)> = events
        .iter()
        .map(|e| match &e.event {
            ChatEvent::MemberRenamed { old_name, name, .. } => {
                (e.room.clone(), old_name.clone(), name.clone())
            }
            other => panic!("{other:?}"),
        })
        .collect();
    let row = |room: &str, old: &str, new: &str| (room.to_owned(), old.to_owned(), new.to_owned());
    assert_eq!(
        got,
        [
            row("r1", "alice", "alicia"),
            row(DEFAULT_ROOM, "alicia", "ali"),
            row("r1", "alicia", "ali"),
        ]
    );
    assert_eq!(names_in(&members(&s, "r1", now).await), ["ali"]);
    // AND a same-name setName then has nothing to finish
    let again = s.set_name("a", &name("ali"), now).await.expect("again");
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test]
async fn a_member_leaves_a_room_an_unfinished_rename_missed_under_the_name_it_knew() {
    // GIVEN alice in lobby, r1 and r2, renamed to alicia with r1's transaction failing
    let s = store();
    let now = chat_shared::now_ms();
    named(&s, "a", "alice", now).await;
    join(&s, "a", "r1", now).await;
    join(&s, "a", "r2", now).await;
    s.fail_writes_after(1, 1);
    s.set_name("a", &name("alicia"), now)
        .await
        .expect_err("r1's transaction fails");

    // WHEN she leaves r1, then disconnects
    let left = s
        .leave_room("a", "r1", LeaveReason::Left, now)
        .await
        .expect("leave");
    let gone = s
        .remove_connection("a", LeaveReason::Disconnected, now)
        .await
        .expect("disconnect");

    // THEN each room hears her leave under the name it knew her by: r1 and r2 never heard of
    // alicia, lobby did
    let left_as = |e: &StoredEvent| match &e.event {
        ChatEvent::MemberLeft { name, .. } => (e.room.clone(), name.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(left_as(&left), ("r1".to_owned(), "alice".to_owned()));
    let gone: Vec<(String, String)> = gone.iter().map(left_as).collect();
    assert_eq!(
        gone,
        [
            (DEFAULT_ROOM.to_owned(), "alicia".to_owned()),
            ("r2".to_owned(), "alice".to_owned()),
        ]
    );
}

#[tokio::test]
async fn every_append_moves_its_rooms_counter_on_the_feed_before_its_event() {
    // GIVEN an empty store and its feed
    let s = store();
    let mut feed = s.feed();
    let now = chat_shared::now_ms();

    // WHEN alice joins (lobby 1), joins dev (dev 1), posts in dev (dev 2) and leaves it (dev 3)
    named(&s, "a", "alice", now).await;
    join(&s, "a", "dev", now).await;
    s.post_to_room("a", "dev", "hi", now).await.expect("post");
    s.leave_room("a", "dev", LeaveReason::Left, now)
        .await
        .expect("leave");
    let records = drain(&mut feed).await;

    // THEN each append is two records: its room's counter item (seq 0, `type` Counter: an
    // INSERT for the room's first, then MODIFYs, the whole item as it is after), then the event
    let shape: Vec<(String, String, String, String)> = records
        .iter()
        .map(|r| {
            (
                r.event_name.clone(),
                attr(r, "pk").unwrap_or_default(),
                attr(r, "seq").unwrap_or_default(),
                attr(r, "type").unwrap_or_default(),
            )
        })
        .collect();
    let row = |e: &str, pk: &str, seq: &str, t: &str| {
        (e.to_owned(), pk.to_owned(), seq.to_owned(), t.to_owned())
    };
    assert_eq!(
        shape,
        [
            row("INSERT", "ROOM#lobby", "0", "Counter"),
            row("INSERT", "ROOM#lobby", "1", "MemberJoined"),
            row("INSERT", "ROOM#dev", "0", "Counter"),
            row("INSERT", "ROOM#dev", "1", "MemberJoined"),
            row("MODIFY", "ROOM#dev", "0", "Counter"),
            row("INSERT", "ROOM#dev", "2", "MessagePosted"),
            row("MODIFY", "ROOM#dev", "0", "Counter"),
            row("INSERT", "ROOM#dev", "3", "MemberLeft"),
        ]
    );
    // AND the counter's image carries the last id given and the members after each change
    let counters: Vec<(String, String, String)> = records
        .iter()
        .filter(|r| attr(r, "type").as_deref() == Some(keys::COUNTER_TYPE))
        .map(|r| {
            (
                attr(r, "last").unwrap_or_default(),
                attr(r, "members").unwrap_or_default(),
                attr(r, "shards").unwrap_or_default(),
            )
        })
        .collect();
    let c = |l: &str, m: &str| (l.to_owned(), m.to_owned(), "1".to_owned());
    assert_eq!(
        counters,
        [c("1", "1"), c("1", "1"), c("2", "1"), c("3", "0")]
    );
    assert_eq!(
        s.counter("dev"),
        Some(RoomCounter {
            last: 3,
            members: 0,
            shards: 1,
            large: false,
        })
    );
    // AND the keys of every record are the item's key, as DynamoDB Streams gives them
    assert!(records.iter().all(|r| r.change.keys.len() == 2));
}

#[tokio::test]
async fn a_room_past_a_thousand_members_doubles_its_shards_and_keeps_everyone() {
    // GIVEN 1,050 named connections (each a member of lobby), under a large-room limit above
    // that, so every join is sequenced and counted
    let s = store().with_large_room_limit(2_000);
    let now = chat_shared::now_ms();
    for i in 0..1_050 {
        named(&s, &format!("c{i:04}="), &format!("m{i}"), now).await;
    }

    // WHEN the members are read shard by shard
    let shards = s.member_shards(DEFAULT_ROOM, now).await.expect("shards");
    let everyone = members(&s, DEFAULT_ROOM, now).await;

    // THEN the join that took lobby past 1,000 doubled its shards, and every member is in
    // exactly one of them; the counter counts them
    assert_eq!(shards, 2);
    assert_eq!(everyone.len(), 1_050);
    let mut ids: Vec<&str> = everyone.iter().map(|m| m.connection_id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1_050);
    assert_eq!(s.counter(DEFAULT_ROOM).map(|c| c.members), Some(1_050));
    let second = s
        .members_page(DEFAULT_ROOM, 1, None, now)
        .await
        .expect("page");
    // (the 1,000 who joined before stay in shard 0; the joins after spread over both)
    assert!(!second.members.is_empty(), "shard 1 is used");
    // AND a member who joined when lobby had one shard leaves from the shard it joined in
    let left = s
        .remove_connection("c0000=", LeaveReason::Disconnected, now)
        .await
        .expect("remove");
    assert_eq!(left.len(), 1);
    assert_eq!(members(&s, DEFAULT_ROOM, now).await.len(), 1_049);
    assert_eq!(s.counter(DEFAULT_ROOM).map(|c| c.shards), Some(2));
}

#[tokio::test]
async fn member_items_read_as_absent_with_their_connection_and_go_a_grace_later() {
    // GIVEN alice in lobby and dev, and the feed read
    let s = store();
    let mut feed = s.feed();
    let now = chat_shared::now_ms();
    named(&s, "a", "alice", now).await;
    join(&s, "a", "dev", now).await;
    drain(&mut feed).await;

    // WHEN the TTL sweeper runs after the connection's TTL
    let ttl = Retention::default().connection_ttl.as_millis() as i64;
    let later = now + ttl + 1_000;
    let removed = s.expire(later);

    // THEN her connection and her claim go (the connection's record goes to the connections
    // feed, not this one), her member items read as absent (their liveUntil has passed) but
    // stay for the expiry path to leave each room by; the counters stay
    assert_eq!(removed, 2);
    assert!(drain(&mut feed).await.is_empty());
    assert!(members(&s, "dev", later).await.is_empty());
    assert_eq!(
        s.members_page("dev", 0, None, now)
            .await
            .expect("page")
            .members
            .len(),
        1,
        "the member item is still stored"
    );
    assert_eq!(s.counter("dev").map(|c| c.last), Some(1));

    // WHEN the sweeper runs again once the member items' own TTL, a grace later, has passed
    let grace_ms = chat_shared::keys::MEMBER_TTL_GRACE_SECS * 1_000;
    let removed = s.expire(later + grace_ms);

    // THEN both member items go
    assert_eq!(removed, 2);
    assert!(s
        .members_page("dev", 0, None, now)
        .await
        .expect("page")
        .members
        .is_empty());
}

#[tokio::test]
async fn each_operation_is_billed_to_the_partitions_it_touches() {
    // GIVEN alice connected
    let s = store();
    let now = chat_shared::now_ms();
    s.add_connection("a", now).await.expect("connect");
    let conn = keys::conn_pk("a");
    let claim = keys::name_pk("alice");
    let lobby = keys::room_pk(DEFAULT_ROOM);
    let lobby_members = keys::members_pk(DEFAULT_ROOM, 0);
    let c = |half: u64, write: u64| Consumed {
        read_half_units: half,
        write_units: write,
    };
    assert_eq!(s.consumed_in(&conn), c(0, 1), "a PutItem of one item");

    // WHEN she names herself
    s.set_name("a", &name("alice"), now).await.expect("name");

    // THEN the DynamoDB adapter's calls are billed where they land: GetItems of the connection,
    // the claim and lobby's counter; one transaction (two units an item) of the claim, the
    // connection, her member item, the counter and the event
    assert_eq!(s.consumed_in(&conn), c(2, 1 + 2));
    assert_eq!(s.consumed_in(&claim), c(2, 2));
    assert_eq!(s.consumed_in(&lobby_members), c(0, 2));
    assert_eq!(s.consumed_in(&lobby), c(2, 4));

    // WHEN she posts in lobby
    s.post_public("a", "hi", now).await.expect("post");

    // THEN the counter and the connection are read, the connection checked, the counter and
    // the event written: nothing touches the claim or the members
    assert_eq!(s.consumed_in(&conn), c(4, 3 + 2));
    assert_eq!(s.consumed_in(&lobby), c(4, 8));
    assert_eq!(s.consumed_in(&claim), c(2, 2));
    assert_eq!(s.consumed_in(&lobby_members), c(0, 2));
    // AND the whole bill is the sum of its partitions
    let total = s.consumed();
    assert_eq!(total.write_units, 5 + 2 + 2 + 8);
    assert_eq!(total.read_half_units, 4 + 2 + 4);

    // WHEN she sets the same name again, in lobby
    s.set_name("a", &name("alice"), now)
        .await
        .expect("same name");

    // THEN that is the connection's read, nothing else
    assert_eq!(s.consumed_in(&conn), c(6, 5));
    assert_eq!(s.consumed().write_units, 17);

    // WHEN an unnamed connection is removed
    s.add_connection("u", now).await.expect("connect");
    s.remove_connection("u", LeaveReason::Disconnected, now)
        .await
        .expect("remove");

    // THEN its item was read once, and deleted in a transaction (two units)
    assert_eq!(s.consumed_in(&keys::conn_pk("u")), c(2, 1 + 2));
}

#[tokio::test]
async fn each_connection_has_a_partition_of_its_own() {
    // GIVEN an AWS-like store whose partitions take 3 write units a second, and 20
    // connections (one unit each, each in its own partition)
    let s = store().with_behaviour(StoreBehaviour {
        read_latency: Duration::ZERO,
        write_latency: Duration::ZERO,
        partition: Some(PartitionThroughput {
            write_units_per_sec: 3.0,
            read_units_per_sec: 3_000.0,
        }),
        ..StoreBehaviour::aws_like()
    });
    let now = chat_shared::now_ms();
    let limit = RateLimit {
        per_second: 1_000,
        burst: 1_000,
    };
    for i in 0..20 {
        s.add_connection(&format!("c{i}"), now)
            .await
            .expect("connect");
    }

    // WHEN each takes two request tokens at once (an UpdateItem of its own item each: 40
    // units in all, far over one partition's 3 a second)
    let mut refused = Vec::new();
    for i in 0..20 {
        for _ in 0..2 {
            if let Err(e) = s
                .take_request_token(
                    &format!("c{i}"),
                    &RequestLimits::connection_only(limit),
                    now,
                )
                .await
            {
                refused.push(e);
            }
        }
    }
    // AND one of them then takes ten more at once
    let mut own = Vec::new();
    for _ in 0..10 {
        own.push(
            s.take_request_token("c0", &RequestLimits::connection_only(limit), now)
                .await,
        );
    }

    // THEN none of the forty is throttled: they are spread over twenty partitions; the one
    // connection over its own partition's throughput is throttled as DynamoDB throttles it
    assert!(refused.is_empty(), "{refused:?}");
    let throttled = own
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|e| service_error(e).map(|(code, _)| code))
        .collect::<Vec<_>>();
    assert!(!throttled.is_empty(), "c0's partition ran out");
    assert!(throttled.iter().all(|c| c.as_deref() == Some(THROTTLED)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_in_different_rooms_do_not_collide() {
    // GIVEN an AWS-like store whose transactions take 300 ms, and alice in lobby and dev
    let s = store().with_behaviour(StoreBehaviour {
        read_latency: Duration::ZERO,
        write_latency: Duration::from_millis(300),
        ..StoreBehaviour::aws_like()
    });
    let now = chat_shared::now_ms();
    named(&s, "a", "alice", now).await;
    join(&s, "a", "dev", now).await;
    assert_eq!(s.counter_collisions(), 0);

    // WHEN she posts in lobby and in dev at once
    let (lobby, dev) = tokio::join!(
        s.post_to_room("a", DEFAULT_ROOM, "one", now),
        s.post_to_room("a", "dev", "two", now)
    );

    // THEN each room's counter moved once, with no collision: the rooms' counters are
    // separate items
    assert_eq!(lobby.expect("lobby").seq, 2);
    assert_eq!(dev.expect("dev").seq, 2);
    assert_eq!(s.counter_collisions(), 0);

    // WHEN she posts twice in dev at once
    let (one, two) = tokio::join!(
        s.post_to_room("a", "dev", "three", now),
        s.post_to_room("a", "dev", "four", now)
    );

    // THEN they collide on dev's counter, and ids stay dense
    let mut ids = [one.expect("one").seq, two.expect("two").seq];
    ids.sort_unstable();
    assert_eq!(ids, [3, 4]);
    assert!(s.counter_collisions() >= 1);
}

#[tokio::test]
async fn pruning_many_connections_is_one_transaction_per_room_and_resumes_after_a_failure() {
    // GIVEN alice, bob and carol in lobby, alice and bob in dev, and dave staying in both
    let s = store();
    let mut feed = s.feed();
    let now = chat_shared::now_ms();
    for (id, display) in [("a", "alice"), ("b", "bob"), ("c", "carol"), ("d", "dave")] {
        named(&s, id, display, now).await;
    }
    for id in ["a", "b", "d"] {
        join(&s, id, "dev", now).await;
    }
    drain(&mut feed).await;
    let gone: Vec<String> = ["c", "a", "b", "a"].map(String::from).to_vec();

    // WHEN the fan-out prunes them (one named twice), and dev's transaction (the first, rooms
    // go in name order) commits but lobby's fails
    s.fail_writes_after(1, 1);
    let failed = s.remove_connections(&gone, LeaveReason::Gone, now).await;

    // THEN dev heard both leaves at once (one counter move, ids 4 and 5), lobby nothing yet
    assert!(failed
        .expect_err("lobby's transaction fails")
        .is_retryable());
    let records = drain(&mut feed).await;
    let kinds: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                attr(r, "pk").unwrap_or_default(),
                attr(r, "type").unwrap_or_default(),
            )
        })
        .collect();
    let k = |pk: &str, t: &str| (pk.to_owned(), t.to_owned());
    assert_eq!(
        kinds,
        [
            k("ROOM#dev", "Counter"),
            k("ROOM#dev", "MemberLeft"),
            k("ROOM#dev", "MemberLeft")
        ]
    );
    assert_eq!(names_in(&members(&s, "dev", now).await), ["dave"]);
    assert_eq!(s.counter("dev").map(|c| (c.last, c.members)), Some((5, 1)));

    // WHEN the pruning is retried
    let retried = s
        .remove_connections(&gone, LeaveReason::Gone, now)
        .await
        .expect("retry");

    // THEN lobby hears the three leaves, in connection id order, at once; the connections
    // and their names are gone; dave stays
    let view: Vec<(String, u64, String)> = retried
        .iter()
        .map(|e| match &e.event {
            ChatEvent::MemberLeft { name, .. } => (e.room.clone(), e.seq, name.clone()),
            other => panic!("not a leave: {other:?}"),
        })
        .collect();
    let l = |seq, n: &str| (DEFAULT_ROOM.to_owned(), seq, n.to_owned());
    assert_eq!(view, [l(5, "alice"), l(6, "bob"), l(7, "carol")]);
    let counters = drain(&mut feed)
        .await
        .iter()
        .filter(|r| attr(r, "type").as_deref() == Some(keys::COUNTER_TYPE))
        .count();
    assert_eq!(counters, 1);
    for id in ["a", "b", "c"] {
        assert_eq!(s.connection(id, now).await.expect("read"), None);
    }
    assert_eq!(names_in(&members(&s, DEFAULT_ROOM, now).await), ["dave"]);
    named(&s, "a2", "alice", now).await;
}
