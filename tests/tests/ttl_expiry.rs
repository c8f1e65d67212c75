//! TTL expiry leaves every room (#12): a connection whose `$disconnect` was lost and that never
//! met a 410 is deleted by DynamoDB's TTL; the `REMOVE` record of its item (connections table
//! stream, `OLD_IMAGE`) reaches the fan-out, which leaves each of its rooms.
//!
//! Driven against moto with a recorded AWS TTL `REMOVE` record of a connection item
//! (`tests/fixtures/dynamodb-stream-ttl-remove-connection.json`) whose keys and old image are
//! replaced by the item as the chat stored it (read back from moto): moto runs no TTL
//! deletions, so the test deletes the item itself, as the TTL process would, and hands the
//! fan-out the record Lambda would. The `MemberLeft`s then go through the events table's real
//! stream and the real `@connections` endpoint.

use std::collections::HashMap;
use std::time::Duration;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_sdk_dynamodb::types::AttributeValue;
use chat_shared::config::{FanoutConfig, HandlerConfig};
use chat_shared::events::{ChatEvent, LeaveReason};
use chat_shared::expiry::decode_expired;
use chat_shared::store::items::ConnItem;
use chat_shared::store::{ChatStore, EventRange};
use chat_shared::stream::{passes_expiry_filter, EXPIRY_FILTER_PATTERN};
use chat_shared::validation::validate_name;
use chat_tests::{
    as_ttl_removal, fixture, fixture_as, lambda_event_json, StreamReader, World, WorldConfig,
};
use serde_json::{json, Value};

const FIXTURE: &str = "dynamodb-stream-ttl-remove-connection.json";

fn config() -> WorldConfig {
    WorldConfig {
        handler: HandlerConfig::default(),
        fanout: FanoutConfig {
            base_backoff: Duration::from_millis(5),
            ..FanoutConfig::default()
        },
    }
}

async fn world() -> World {
    World::new(config())
        .await
        .expect("world (moto must start: run scripts/test)")
}

fn conn_key(id: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(format!("CONN#{id}"))),
        ("sk".to_owned(), AttributeValue::S("CONN".to_owned())),
    ])
}

/// The connection item of `id` as stored (strongly consistent), in its one shape.
async fn stored_conn(w: &World, id: &str) -> ConnItem {
    let item = w
        .moto
        .dynamodb()
        .get_item()
        .table_name(&w.tables.connections)
        .set_key(Some(conn_key(id)))
        .consistent_read(true)
        .send()
        .await
        .expect("GetItem")
        .item
        .expect("the connection item");
    serde_dynamo::from_item(item).expect("a connection item")
}

/// What DynamoDB's TTL does to `id`'s item: deletes it. Returns the item as it was.
async fn ttl_delete(w: &World, id: &str) -> ConnItem {
    let conn = stored_conn(w, id).await;
    w.moto
        .dynamodb()
        .delete_item()
        .table_name(&w.tables.connections)
        .set_key(Some(conn_key(id)))
        .send()
        .await
        .expect("DeleteItem");
    conn
}

/// The Lambda event of that deletion: the recorded AWS record with this item's keys and old
/// image (`seq` its sequence number).
fn expiry_event(conn: &ConnItem, seq: u64) -> Event {
    let mut event: Event = fixture_as(FIXTURE);
    let record = &mut event.records[0];
    let key: serde_dynamo::Item = serde_dynamo::to_item(json!({
        "pk": format!("CONN#{}", conn.connection_id),
        "sk": "CONN",
    }))
    .expect("keys");
    let mut image: serde_dynamo::Item = serde_dynamo::to_item(conn).expect("image");
    for (k, v) in key.iter() {
        image.insert(k.clone(), v.clone());
    }
    record.change.keys = key;
    record.change.old_image = image;
    record.change.sequence_number = Some(format!("44216001000000000{seq:011}"));
    assert!(
        passes_expiry_filter(record),
        "the record passes the mapping's filter"
    );
    event
}

async fn events_in(w: &World, room: &str) -> Vec<ChatEvent> {
    w.store
        .read_events(room, EventRange::After(0), 1_000, chat_shared::now_ms())
        .await
        .expect("read events")
        .events
        .into_iter()
        .map(|e| e.event)
        .collect()
}

fn expired_leaves(events: &[ChatEvent], id: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(e, ChatEvent::MemberLeft { connection_id, reason: LeaveReason::Expired, .. } if connection_id == id)
        })
        .count()
}

async fn member_ids(w: &World, room: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let mut ids: Vec<String> = chat_shared::fanout::members(&w.store, room, chat_shared::now_ms())
        .map_ok(|m| m.connection_id)
        .try_collect()
        .await
        .expect("members");
    ids.sort();
    ids
}

/// The systemMessages `id` got in `room`.
fn system_messages(w: &World, id: &str, room: &str) -> Vec<String> {
    w.room_frames(id)
        .into_iter()
        .filter(|(r, _)| r.as_deref() == Some(room))
        .filter_map(|(_, f)| f["systemMessage"].as_str().map(str::to_owned))
        .collect()
}

fn members_frames(w: &World, id: &str, room: &str) -> Vec<Value> {
    w.room_frames(id)
        .into_iter()
        .filter(|(r, _)| r.as_deref() == Some(room))
        .filter_map(|(_, f)| f.get("members").cloned())
        .collect()
}

#[test]
fn the_connection_ttl_removal_fixture_roundtrips_and_decodes_to_the_connection_item() {
    // GIVEN the recorded record WHEN parsed, written and parsed again THEN nothing is lost
    let parsed: Event = serde_json::from_str(&fixture(FIXTURE)).expect("fixture parses");
    let written = serde_json::to_string(&parsed).expect("serialises");
    let reparsed: Event = serde_json::from_str(&written).expect("reparses");
    assert_eq!(parsed, reparsed);
    // AND it is a TTL deletion of a connection item, which the mapping's filter passes
    let record: &EventRecord = &parsed.records[0];
    assert_eq!(record.event_name, "REMOVE");
    assert!(passes_expiry_filter(record));
    assert!(chat_shared::expiry::is_connections_record(record));
    // AND its old image decodes to the connection item's one shape
    let conn = decode_expired(record).expect("a connection item");
    assert_eq!(conn.connection_id, "CfGLwe_CtjMCIdA=");
    assert_eq!(conn.name.as_deref(), Some("alice"));
    assert_eq!(
        conn.room_names(),
        vec!["lobby".to_owned(), "ops".to_owned()]
    );
    assert_eq!(conn.principal.as_deref(), Some("ip:198.51.100.7"));
    // AND the template's filter is the one chat-local applies, word for word
    let template = include_str!("../../template.yaml");
    assert!(
        template.contains(&format!("- Pattern: '{EXPIRY_FILTER_PATTERN}'")),
        "template.yaml lacks the expiry filter"
    );
}

#[tokio::test]
async fn an_expired_connection_leaves_each_of_its_rooms_once_and_a_redelivery_writes_nothing() {
    // GIVEN alice in lobby and ops, bob in lobby and ops, carol in lobby only
    let mut w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.join("C", "carol").await;
    for id in ["A", "B"] {
        assert_eq!(
            w.send(id, json!({"action":"join","room":"ops"}))
                .await
                .map(|f| f.get("error").cloned()),
            Some(None)
        );
    }
    assert!(w.fan_out().await.batch_item_failures.is_empty());
    w.endpoint.clear();

    // WHEN alice's item is deleted by TTL (no $disconnect) and its record reaches the fan-out
    let gone = ttl_delete(&w, "A").await;
    let event = expiry_event(&gone, 1);
    let response = w.fan_out_event(event.clone()).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert!(w.fan_out().await.batch_item_failures.is_empty());

    // THEN each of her rooms has one MemberLeft (reason expired) and no longer has her
    for room in ["lobby", "ops"] {
        assert_eq!(expired_leaves(&events_in(&w, room).await, "A"), 1, "{room}");
        assert!(
            !member_ids(&w, room).await.contains(&"A".to_owned()),
            "{room}"
        );
    }
    // AND every other member of each room hears it: the leave systemMessage and the list
    assert_eq!(
        system_messages(&w, "B", "lobby"),
        vec!["alice has left the chat"]
    );
    assert_eq!(
        system_messages(&w, "B", "ops"),
        vec!["alice has left the chat"]
    );
    assert_eq!(
        system_messages(&w, "C", "lobby"),
        vec!["alice has left the chat"]
    );
    assert!(system_messages(&w, "C", "ops").is_empty());
    assert_eq!(
        members_frames(&w, "C", "lobby"),
        vec![json!(["bob", "carol"])]
    );
    assert_eq!(members_frames(&w, "B", "ops"), vec![json!(["bob"])]);
    // AND the room counter counts her out, and her name is free again
    let counter = |room: &str| {
        let w = &w;
        let room = room.to_owned();
        async move {
            w.moto
                .dynamodb()
                .get_item()
                .table_name(&w.tables.events)
                .key("pk", AttributeValue::S(format!("ROOM#{room}")))
                .key("seq", AttributeValue::N("0".into()))
                .consistent_read(true)
                .send()
                .await
                .expect("counter")
                .item
                .and_then(|i| i.get("members").and_then(|m| m.as_n().ok()).cloned())
        }
    };
    assert_eq!(counter("lobby").await.as_deref(), Some("2"));
    assert_eq!(counter("ops").await.as_deref(), Some("1"));
    w.connect("D").await;
    assert_eq!(
        w.send("D", json!({"action":"setName","name":"alice"}))
            .await,
        None,
        "the name is free"
    );

    // WHEN the same record is delivered again (Lambda's at-least-once)
    assert!(w.fan_out().await.batch_item_failures.is_empty());
    w.endpoint.clear();
    let before: Vec<usize> =
        futures::future::join_all(["lobby", "ops"].map(|r| async { events_in(&w, r).await.len() }))
            .await;
    let response = w.fan_out_event(event).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(w.fan_out().await.batch_item_failures.is_empty());

    // THEN it writes nothing and nobody hears anything more
    let after: Vec<usize> =
        futures::future::join_all(["lobby", "ops"].map(|r| async { events_in(&w, r).await.len() }))
            .await;
    assert_eq!(before, after);
    assert_eq!(w.endpoint.post_count(), 0);
    // AND the name stays with its new holder
    let claim = w
        .moto
        .dynamodb()
        .get_item()
        .table_name(&w.tables.connections)
        .key("pk", AttributeValue::S("NAME#alice".into()))
        .key("sk", AttributeValue::S("NAME".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("claim")
        .item
        .expect("claimed");
    assert_eq!(
        claim
            .get("connectionId")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("D")
    );
}

#[tokio::test]
async fn a_record_for_a_connection_that_already_disconnected_writes_nothing() {
    // GIVEN alice and bob in lobby and ops; alice's item as it was while she was in both
    let mut w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    for id in ["A", "B"] {
        w.send(id, json!({"action":"join","room":"ops"})).await;
    }
    let before_disconnect = stored_conn(&w, "A").await;
    // AND then her $disconnect came after all, and was fanned out
    w.disconnect("A").await;
    assert!(w.fan_out().await.batch_item_failures.is_empty());
    w.endpoint.clear();
    let lobby = events_in(&w, "lobby").await.len();
    let ops = events_in(&w, "ops").await.len();

    // WHEN a TTL removal of her item (as it was) arrives late
    let response = w.fan_out_event(expiry_event(&before_disconnect, 2)).await;
    assert!(response.batch_item_failures.is_empty());
    assert!(w.fan_out().await.batch_item_failures.is_empty());

    // THEN nothing is written and nobody hears of her leaving twice
    assert_eq!(events_in(&w, "lobby").await.len(), lobby);
    assert_eq!(events_in(&w, "ops").await.len(), ops);
    assert_eq!(w.endpoint.post_count(), 0);
}

#[tokio::test]
async fn a_newer_holder_of_the_name_keeps_it() {
    // GIVEN alice (A) in lobby, whose item and name claim both expired and were deleted by
    // TTL, and a newer connection (D) that has taken the name since
    let mut w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    let gone = ttl_delete(&w, "A").await;
    w.moto
        .dynamodb()
        .delete_item()
        .table_name(&w.tables.connections)
        .key("pk", AttributeValue::S("NAME#alice".into()))
        .key("sk", AttributeValue::S("NAME".into()))
        .send()
        .await
        .expect("the claim's TTL deletion");
    w.join("D", "alice").await;
    assert!(w.fan_out().await.batch_item_failures.is_empty());

    // WHEN A's TTL removal reaches the fan-out
    let response = w.fan_out_event(expiry_event(&gone, 3)).await;
    assert!(response.batch_item_failures.is_empty());

    // THEN A left lobby, and D keeps the name and its membership
    assert_eq!(expired_leaves(&events_in(&w, "lobby").await, "A"), 1);
    assert_eq!(
        member_ids(&w, "lobby").await,
        vec!["B".to_owned(), "D".to_owned()]
    );
    let claim = w
        .moto
        .dynamodb()
        .get_item()
        .table_name(&w.tables.connections)
        .key("pk", AttributeValue::S("NAME#alice".into()))
        .key("sk", AttributeValue::S("NAME".into()))
        .consistent_read(true)
        .send()
        .await
        .expect("claim")
        .item
        .expect("D's claim is still there");
    assert_eq!(
        claim
            .get("connectionId")
            .and_then(|v| v.as_s().ok())
            .map(String::as_str),
        Some("D")
    );
    assert_eq!(
        w.send(
            "B",
            json!({"action":"sendPrivate","to":"alice","message":"hi"})
        )
        .await,
        None,
        "a private message to alice still reaches D"
    );
}

#[tokio::test]
async fn a_connection_in_60_rooms_leaves_all_60() {
    // GIVEN alice in lobby and 60 more rooms (more than one TransactWriteItems can hold), bob
    // in lobby and three of them
    let w = world().await;
    let now = chat_shared::now_ms();
    let rooms: Vec<String> = (0..60).map(|i| format!("r{i:02}")).collect();
    let bobs = ["r00", "r30", "r59"];
    for (id, name) in [("A", "alice"), ("B", "bob")] {
        w.store.add_connection(id, now).await.expect("connect");
        w.store
            .set_name(id, &validate_name(name).expect("name"), now)
            .await
            .expect("name");
        for room in rooms
            .iter()
            .filter(|r| id == "A" || bobs.contains(&r.as_str()))
        {
            w.store.join_room(id, room, 100, now).await.expect("join");
        }
    }

    // WHEN her item expires and its record reaches the fan-out
    let gone = ttl_delete(&w, "A").await;
    assert_eq!(gone.room_names().len(), 61);
    let response = w.fan_out_event(expiry_event(&gone, 4)).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");

    // THEN every one of the 61 rooms has her MemberLeft and no longer has her
    for room in rooms.iter().map(String::as_str).chain(["lobby"]) {
        assert_eq!(expired_leaves(&events_in(&w, room).await, "A"), 1, "{room}");
        let expected: Vec<String> = if room == "lobby" || bobs.contains(&room) {
            vec!["B".to_owned()]
        } else {
            Vec::new()
        };
        assert_eq!(member_ids(&w, room).await, expected, "{room}");
    }
}

#[tokio::test]
async fn only_ttl_removals_of_connection_items_pass_the_expiry_filter() {
    // GIVEN the connections table's real stream (moto), and alice who connected, named
    // herself, joined ops and disconnected (an ordinary delete of her item)
    let w = world().await;
    let mut stream = StreamReader::new(&w.moto.dynamodb(), w.moto.streams(), &w.tables.connections)
        .await
        .expect("the connections table has a stream");
    w.join("A", "alice").await;
    w.send("A", json!({"action":"join","room":"ops"})).await;
    w.disconnect("A").await;

    // WHEN its records are read as Lambda gets them
    // moto writes a table's stream records as it commits: they are all there already.
    let records = stream.next_records_json().await.expect("records");
    let event: Event = serde_json::from_value(lambda_event_json(&records)).expect("an event");

    // THEN there are puts, updates and deletes of every kind of item, and none passes
    assert!(event.records.len() >= 6, "{}", event.records.len());
    assert!(event.records.iter().all(|r| !passes_expiry_filter(r)));
    // AND the delete of her connection item carries its old image (OLD_IMAGE), so were it a
    // TTL deletion it would pass, and decode to her item; a member item's TTL deletion would not
    let position = event
        .records
        .iter()
        .position(|r| {
            r.event_name == "REMOVE"
                && r.change.keys.get("sk") == Some(&serde_dynamo::AttributeValue::S("CONN".into()))
        })
        .expect("the REMOVE of her connection item");
    let as_ttl: EventRecord =
        serde_json::from_value(as_ttl_removal(records[position].clone())).expect("record");
    assert!(passes_expiry_filter(&as_ttl));
    assert_eq!(
        decode_expired(&as_ttl).expect("decodes").name.as_deref(),
        Some("alice")
    );
    let member_removal = records
        .iter()
        .find(|r| {
            r["eventName"] == "REMOVE"
                && r["dynamodb"]["Keys"]["pk"]["S"]
                    .as_str()
                    .is_some_and(|pk| pk.starts_with("MEMBERS#"))
        })
        .expect("the REMOVE of a member item");
    let member_ttl: EventRecord =
        serde_json::from_value(as_ttl_removal(member_removal.clone())).expect("record");
    assert!(!passes_expiry_filter(&member_ttl));
    // AND the ordinary delete, handed to the fan-out anyway, writes nothing
    let lobby = events_in(&w, "lobby").await.len();
    let mut ordinary = Event::default();
    ordinary.records = vec![event.records[position].clone()];
    assert!(w
        .fan_out_event(ordinary)
        .await
        .batch_item_failures
        .is_empty());
    assert_eq!(events_in(&w, "lobby").await.len(), lobby);
}

/// What DynamoDB's TTL does, all at once: deletes every item of the connections table whose
/// TTL attribute (`expiresAt`) has passed at `now_s`. Returns the keys (`pk`) it deleted.
async fn ttl_sweep(w: &World, now_s: i64) -> Vec<String> {
    let mut deleted = Vec::new();
    let mut start = None;
    loop {
        let out = w
            .moto
            .dynamodb()
            .scan()
            .table_name(&w.tables.connections)
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .send()
            .await
            .expect("Scan");
        for item in out.items.unwrap_or_default() {
            let expired = item
                .get("expiresAt")
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<i64>().ok())
                .is_some_and(|at| at <= now_s);
            if !expired {
                continue;
            }
            let key = HashMap::from([
                ("pk".to_owned(), item["pk"].clone()),
                ("sk".to_owned(), item["sk"].clone()),
            ]);
            w.moto
                .dynamodb()
                .delete_item()
                .table_name(&w.tables.connections)
                .set_key(Some(key))
                .send()
                .await
                .expect("DeleteItem");
            deleted.push(item["pk"].as_s().expect("pk").clone());
        }
        match out.last_evaluated_key {
            Some(key) => start = Some(key),
            None => break,
        }
    }
    deleted
}

#[tokio::test]
async fn member_items_outlive_their_connection_so_ttl_in_any_order_still_leaves_every_room() {
    // GIVEN alice (A) in lobby and ops, connected so long ago that her connection has expired
    // (her $disconnect was lost), and bob (B) in both rooms, live
    let mut w = world().await;
    let now = chat_shared::now_ms();
    let ttl_ms = chat_shared::config::Retention::default()
        .connection_ttl
        .as_millis() as i64;
    let then = now - ttl_ms - 60_000;
    w.store.add_connection("A", then).await.expect("connect");
    w.store
        .set_name("A", &validate_name("alice").expect("name"), then)
        .await
        .expect("name");
    w.store
        .join_room("A", "ops", 50, then)
        .await
        .expect("join ops");
    w.join("B", "bob").await;
    w.send("B", json!({"action":"join","room":"ops"})).await;
    assert!(w.fan_out().await.batch_item_failures.is_empty());
    w.endpoint.clear();
    let gone = stored_conn(&w, "A").await;
    assert!(gone.expires_at <= chat_shared::store::epoch_secs(now));
    // AND the member reads already leave her out (her member items' liveUntil has passed)
    for room in ["lobby", "ops"] {
        assert_eq!(member_ids(&w, room).await, vec!["B".to_owned()], "{room}");
    }

    // WHEN DynamoDB's TTL has deleted every item whose expiresAt has passed — her connection
    // and her name claim, in whatever order — before her connection's record is handled
    let deleted = ttl_sweep(&w, chat_shared::store::epoch_secs(now)).await;
    assert!(deleted.contains(&"CONN#A".to_owned()), "{deleted:?}");
    assert!(deleted.contains(&"NAME#alice".to_owned()), "{deleted:?}");
    // (her member items are not among them: their TTL is a grace after the connection's)
    assert!(
        !deleted.iter().any(|pk| pk.starts_with("MEMBERS#")),
        "{deleted:?}"
    );
    // AND then the connection item's TTL record reaches the fan-out
    let response = w.fan_out_event(expiry_event(&gone, 5)).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert!(w.fan_out().await.batch_item_failures.is_empty());

    // THEN both of her rooms get her MemberLeft (reason expired), and bob hears it in each
    for room in ["lobby", "ops"] {
        assert_eq!(expired_leaves(&events_in(&w, room).await, "A"), 1, "{room}");
        assert_eq!(
            system_messages(&w, "B", room),
            vec!["alice has left the chat"],
            "{room}"
        );
        assert_eq!(
            members_frames(&w, "B", room),
            vec![json!(["bob"])],
            "{room}"
        );
    }
    // AND her member items are gone with the leaves
    let member_items = w
        .moto
        .dynamodb()
        .scan()
        .table_name(&w.tables.connections)
        .consistent_read(true)
        .send()
        .await
        .expect("Scan")
        .items
        .unwrap_or_default()
        .into_iter()
        .filter(|i| {
            i["pk"].as_s().is_ok_and(|pk| pk.starts_with("MEMBERS#"))
                && i.get("connectionId")
                    .and_then(|v| v.as_s().ok())
                    .map(String::as_str)
                    == Some("A")
        })
        .count();
    assert_eq!(member_items, 0);
}
