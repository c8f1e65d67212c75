//! The backend end to end against a real DynamoDB API (moto): chat-api-handler driven with
//! real API Gateway WebSocket event JSON, the fan-out driven with the stream records read back
//! from moto's DynamoDB Streams API, delivering through the real `aws-sdk-apigatewaymanagement`
//! client to a real HTTP `@connections` endpoint.

use std::time::Duration;

use aws_lambda_events::encodings::Body;
use aws_lambda_events::event::dynamodb::Event;
use aws_sdk_dynamodb::types::AttributeValue;
use chat_shared::config::{FanoutConfig, HandlerConfig};
use chat_shared::handler::handle_request;
use chat_shared::store::ChatStore;
use chat_tests::world::code;
use chat_tests::{World, WorldConfig};
use serde_json::{json, Value};

/// The Lambdas' defaults, with a backoff short enough that the retries in these tests (bob's
/// 500s in the mixed batch) stay fast.
fn config() -> WorldConfig {
    WorldConfig {
        handler: HandlerConfig::default(),
        fanout: FanoutConfig {
            base_backoff: Duration::from_millis(5),
            ..FanoutConfig::default()
        },
    }
}

fn members(names: &[&str]) -> Value {
    json!({ "members": names })
}

fn system(text: &str) -> Value {
    json!({ "systemMessage": text })
}

#[tokio::test]
async fn joins_send_members_then_system_message_to_every_member() {
    // GIVEN carol connects without a name
    let mut w = World::new(config()).await.expect("world");
    w.connect("C").await;

    // WHEN alice joins and the fan-out runs, then bob joins and the fan-out runs
    w.join("A", "alice").await;
    // The handler itself never talks to @connections.
    assert_eq!(w.endpoint.post_count(), 0);
    let first = w.fan_out().await;
    w.join("B", "bob").await;
    let second = w.fan_out().await;

    // THEN each member got members then systemMessage, in the tutorial's order
    assert!(first.batch_item_failures.is_empty() && second.batch_item_failures.is_empty());
    assert_eq!(
        w.frames("A"),
        vec![
            members(&["alice"]),
            system("alice has joined the chat"),
            members(&["alice", "bob"]),
            system("bob has joined the chat"),
        ]
    );
    assert_eq!(
        w.frames("B"),
        vec![
            members(&["alice", "bob"]),
            system("bob has joined the chat")
        ]
    );
    // AND a connection without a name receives nothing
    assert!(w.frames("C").is_empty());
    // AND every frame carries its event's id and timestamp
    let ids: Vec<u64> = w
        .endpoint
        .frames_for("A")
        .iter()
        .map(|f| f["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, vec![1, 1, 2, 2]);
    assert!(w
        .endpoint
        .frames_for("A")
        .iter()
        .all(|f| f["ts"].as_i64().is_some()));
}

#[tokio::test]
async fn public_message_reaches_every_member_and_private_only_its_recipient() {
    // GIVEN three members (more than one member page) and a connection without a name
    let mut w = World::new(config()).await.expect("world");
    for (id, name) in [("A", "alice"), ("B", "bob"), ("D", "dave")] {
        w.join(id, name).await;
    }
    w.connect("C").await;
    w.fan_out().await;
    w.endpoint.clear();

    // WHEN alice says hello publicly, then whispers to bob (named in another case)
    assert_eq!(
        w.send("A", json!({"action":"sendPublic","message":"hello"}))
            .await,
        None
    );
    assert_eq!(
        w.send(
            "A",
            json!({"action":"sendPrivate","to":"BOB","message":"psst"})
        )
        .await,
        None
    );
    let response = w.fan_out().await;

    // THEN every member got the public message, only bob the private one
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(w.frames("A"), vec![json!({"publicMessage":"alice: hello"})]);
    assert_eq!(
        w.frames("B"),
        vec![
            json!({"publicMessage":"alice: hello"}),
            json!({"privateMessage":"alice: psst"})
        ]
    );
    assert_eq!(w.frames("D"), vec![json!({"publicMessage":"alice: hello"})]);
    assert!(w.frames("C").is_empty());
    let ids: Vec<u64> = w
        .endpoint
        .frames_for("B")
        .iter()
        .map(|f| f["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(ids, vec![4, 5], "ids follow the room's sequence");
}

#[tokio::test]
async fn rename_tells_everyone_and_releases_the_old_name() {
    // GIVEN alice and bob
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();

    // WHEN alice renames herself to zed, and setting the same name again changes nothing
    assert_eq!(
        w.send("A", json!({"action":"setName","name":"zed"})).await,
        None
    );
    assert_eq!(
        w.send("A", json!({"action":"setName","name":"zed"})).await,
        None
    );
    w.fan_out().await;

    // THEN both see the new member list and one rename message
    let expected = vec![
        members(&["bob", "zed"]),
        system("alice is now known as zed"),
    ];
    assert_eq!(w.frames("A"), expected);
    assert_eq!(w.frames("B"), expected);
    // AND "alice" is free again, while "zed" is not
    w.connect("C").await;
    assert_eq!(
        w.send("C", json!({"action":"setName","name":"ZED"}))
            .await
            .as_ref()
            .map(|f| f["error"]["code"].clone()),
        Some(json!("name_taken"))
    );
    assert_eq!(
        w.send("C", json!({"action":"setName","name":"Alice"}))
            .await,
        None
    );
    w.fan_out().await;
    // AND a change of case only is a rename too (same claim)
    assert_eq!(
        w.send("A", json!({"action":"setName","name":"Zed"})).await,
        None
    );
    w.fan_out().await;
    assert_eq!(
        w.frames("B").last(),
        Some(&system("zed is now known as Zed"))
    );
}

#[tokio::test]
async fn leave_sends_system_message_then_members_and_disconnect_is_idempotent() {
    // GIVEN alice and bob
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();

    // WHEN bob disconnects, twice (a late duplicate), and a never-joined connection disconnects
    w.disconnect("B").await;
    w.disconnect("B").await;
    w.connect("C").await;
    w.disconnect("C").await;
    w.fan_out().await;

    // THEN alice hears it once, system message first
    assert_eq!(
        w.frames("A"),
        vec![system("bob has left the chat"), members(&["alice"])]
    );
    assert!(w.frames("B").is_empty());
    // AND bob's connection and name are gone
    let now = chat_shared::now_ms();
    assert_eq!(w.store.connection("B", now).await.expect("read"), None);
    assert_eq!(w.store.connection("C", now).await.expect("read"), None);
    w.connect("D").await;
    assert_eq!(
        w.send("D", json!({"action":"setName","name":"bob"})).await,
        None
    );
}

#[tokio::test]
async fn connect_records_an_expiry_beyond_the_two_hour_maximum() {
    let w = World::new(config()).await.expect("world");
    let before = chat_shared::now_ms();
    w.connect("A").await;
    let conn = w
        .store
        .connection("A", before)
        .await
        .expect("read")
        .expect("recorded");
    assert_eq!(conn.connection_id, "A");
    assert!(conn.connected_at >= before);
    assert!(
        conn.expires_at - before / 1000 >= 7_200,
        "TTL at least API Gateway's 2 h maximum"
    );
    assert_eq!(conn.name, None);
}

#[tokio::test]
async fn two_connections_racing_for_one_name_exactly_one_wins() {
    let w = World::new(config()).await.expect("world");
    for round in 0..5 {
        // GIVEN two fresh connections
        let (a, b) = (format!("A{round}"), format!("B{round}"));
        w.connect(&a).await;
        w.connect(&b).await;
        // WHEN both claim the same name (differing in case) at the same moment
        let name = format!("Sam{round}");
        let (ra, rb) = tokio::join!(
            w.send(&a, json!({"action":"setName","name": name})),
            w.send(&b, json!({"action":"setName","name": name.to_uppercase()})),
        );
        // THEN exactly one wins and the other is told the name is taken
        let codes = [code(&ra), code(&rb)];
        assert!(
            codes == ["<no error>", "name_taken"] || codes == ["name_taken", "<no error>"],
            "round {round}: {ra:?} / {rb:?}"
        );
        let now = chat_shared::now_ms();
        let named = [
            w.store
                .connection(&a, now)
                .await
                .expect("a")
                .and_then(|c| c.name),
            w.store
                .connection(&b, now)
                .await
                .expect("b")
                .and_then(|c| c.name),
        ];
        assert_eq!(
            named.iter().flatten().count(),
            1,
            "round {round}: {named:?}"
        );
    }
}

#[tokio::test]
async fn a_connection_answering_410_is_pruned_and_others_see_it_leave() {
    // GIVEN alice, bob and carol, and bob's connection has silently died
    let mut w = World::new(config()).await.expect("world");
    for (id, name) in [("A", "alice"), ("B", "bob"), ("C", "carol")] {
        w.join(id, name).await;
    }
    w.fan_out().await;
    w.endpoint.clear();
    w.endpoint.mark_gone("B");

    // WHEN alice broadcasts
    assert_eq!(
        w.send("A", json!({"action":"sendPublic","message":"anyone?"}))
            .await,
        None
    );
    let response = w.fan_out().await;

    // THEN the living got it, bob's 410 pruned his connection and released his name
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(
        w.frames("A"),
        vec![json!({"publicMessage":"alice: anyone?"})]
    );
    assert_eq!(
        w.frames("C"),
        vec![json!({"publicMessage":"alice: anyone?"})]
    );
    assert!(w.endpoint.gone_hits() >= 1);
    assert_eq!(
        w.store
            .connection("B", chat_shared::now_ms())
            .await
            .expect("read"),
        None
    );

    // AND the prune recorded a leave that the next fan-out delivers to the others
    w.endpoint.clear();
    w.fan_out().await;
    let leave = vec![
        system("bob has left the chat"),
        members(&["alice", "carol"]),
    ];
    assert_eq!(w.frames("A"), leave);
    assert_eq!(w.frames("C"), leave);
    w.connect("D").await;
    assert_eq!(
        w.send("D", json!({"action":"setName","name":"bob"})).await,
        None
    );
    // AND a late $disconnect for the pruned connection is harmless: the stream holds the new
    // bob's join and nothing else (no second leave for the pruned connection)
    w.disconnect("B").await;
    let records = w.stream.next_lambda_event().await.expect("stream").records;
    let written: Vec<(
        &str,
        Option<&serde_dynamo::AttributeValue>,
        Option<&serde_dynamo::AttributeValue>,
    )> = records
        .iter()
        .map(|r| {
            (
                r.event_name.as_str(),
                r.change.new_image.get("type"),
                r.change.new_image.get("connectionId"),
            )
        })
        .collect();
    assert_eq!(
        written,
        [(
            "INSERT",
            Some(&serde_dynamo::AttributeValue::S("MemberJoined".into())),
            Some(&serde_dynamo::AttributeValue::S("D".into()))
        )]
    );
}

#[tokio::test]
async fn every_refusal_gets_its_error_frame_and_changes_nothing() {
    // GIVEN alice and bob are members, carol is connected without a name
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.connect("C").await;
    w.fan_out().await;
    w.endpoint.clear();
    let big = "x".repeat(4097);
    let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
        ("A", "not json".into(), "invalid_json", None),
        ("A", "".into(), "invalid_json", None),
        ("A", "[1]".into(), "invalid_request", None),
        ("A", r#"{"message":"hi"}"#.into(), "unknown_action", None),
        (
            "A",
            r#"{"action":"shout","message":"hi"}"#.into(),
            "unknown_action",
            Some("shout"),
        ),
        (
            "A",
            r#"{"action":"setName"}"#.into(),
            "missing_field",
            Some("setName"),
        ),
        (
            "A",
            r#"{"action":"sendPublic","message":42}"#.into(),
            "invalid_field",
            Some("sendPublic"),
        ),
        (
            "A",
            r#"{"action":"setName","name":"   "}"#.into(),
            "invalid_name",
            Some("setName"),
        ),
        (
            "A",
            r#"{"action":"setName","name":"a\u202Eb"}"#.into(),
            "invalid_name",
            Some("setName"),
        ),
        (
            "A",
            format!(r#"{{"action":"setName","name":"{}"}}"#, "n".repeat(33)),
            "invalid_name",
            Some("setName"),
        ),
        (
            "C",
            r#"{"action":"setName","name":" BOB "}"#.into(),
            "name_taken",
            Some("setName"),
        ),
        (
            "C",
            r#"{"action":"sendPublic","message":"hi"}"#.into(),
            "name_required",
            Some("sendPublic"),
        ),
        (
            "C",
            r#"{"action":"sendPrivate","to":"bob","message":"hi"}"#.into(),
            "name_required",
            Some("sendPrivate"),
        ),
        (
            "A",
            r#"{"action":"sendPublic","message":"  "}"#.into(),
            "invalid_message",
            Some("sendPublic"),
        ),
        (
            "A",
            format!(r#"{{"action":"sendPublic","message":"{big}"}}"#),
            "message_too_large",
            Some("sendPublic"),
        ),
        (
            "A",
            format!(r#"{{"action":"sendPrivate","to":"bob","message":"{big}"}}"#),
            "message_too_large",
            Some("sendPrivate"),
        ),
        (
            "A",
            r#"{"action":"sendPrivate","to":"nobody","message":"hi"}"#.into(),
            "unknown_recipient",
            Some("sendPrivate"),
        ),
        (
            "A",
            r#"{"action":"sendPrivate","to":"carol","message":"hi"}"#.into(),
            "unknown_recipient",
            Some("sendPrivate"),
        ),
        (
            "A",
            r#"{"action":"sendPrivate","to":"ALICE","message":"hi"}"#.into(),
            "invalid_recipient",
            Some("sendPrivate"),
        ),
        (
            "Z",
            r#"{"action":"sendPublic","message":"hi"}"#.into(),
            "not_connected",
            Some("sendPublic"),
        ),
        (
            "Z",
            r#"{"action":"setName","name":"zed"}"#.into(),
            "not_connected",
            Some("setName"),
        ),
    ];
    for (sender, body, expected, action) in &cases {
        // WHEN the request is sent
        let frame = w.send_raw(sender, body).await;
        // THEN its sender gets exactly that error, with a message for a person
        let err = frame.unwrap_or_else(|| panic!("{body:?} should be refused"));
        assert_eq!(err["error"]["code"], json!(expected), "{body:?}");
        assert_eq!(err["error"]["action"].as_str(), *action, "{body:?}");
        assert!(err["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // AND nothing was written: no event reached the stream, nobody received anything
    let event = w.stream.next_event().await.expect("stream");
    assert!(
        event.records.is_empty(),
        "refusals wrote events: {:?}",
        event.records
    );
    assert_eq!(w.endpoint.post_count(), 0);
    let now = chat_shared::now_ms();
    assert_eq!(
        w.store
            .connection("C", now)
            .await
            .expect("read")
            .and_then(|c| c.name),
        None
    );
    assert_eq!(
        w.store
            .connection("A", now)
            .await
            .expect("read")
            .and_then(|c| c.name)
            .as_deref(),
        Some("alice")
    );
    // AND binary frames are refused too
    let mut binary = World::event("$default", "A", Some("AAEC"));
    binary.is_base64_encoded = true;
    let r = handle_request(&w.store, &w.handler, binary, now)
        .await
        .expect("handler");
    let Some(Body::Text(t)) = r.body else {
        panic!("binary frame refused with a frame")
    };
    assert!(t.contains("invalid_json"));
}

#[tokio::test]
async fn a_store_failure_is_an_internal_error_and_nothing_is_half_written() {
    // GIVEN alice is connected, but the event table has vanished (the store will fail)
    let w = World::new(config()).await.expect("world");
    w.connect("A").await;
    w.moto
        .dynamodb()
        .delete_table()
        .table_name(&w.tables.events)
        .send()
        .await
        .expect("drop events table");

    // WHEN she tries to join
    let err = w
        .send("A", json!({"action":"setName","name":"alice"}))
        .await;

    // THEN she is told to try again, and the name was not taken half-way
    assert_eq!(code(&err), "internal_error");
    let now = chat_shared::now_ms();
    assert_eq!(
        w.store
            .connection("A", now)
            .await
            .expect("read")
            .and_then(|c| c.name),
        None
    );
    w.connect("B").await;
    let claim = w
        .moto
        .dynamodb()
        .get_item()
        .table_name(&w.tables.connections)
        .key("pk", AttributeValue::S("ROOM#lobby".into()))
        .key("sk", AttributeValue::S("NAME#alice".into()))
        .send()
        .await
        .expect("read claim");
    assert!(claim.item.is_none(), "no name claim without its event");
}

#[tokio::test]
async fn mixed_batch_skips_poison_and_owes_a_failing_recipient_only_its_frames() {
    // GIVEN alice and bob, then in one stream batch: a private message to alice, a poison
    // item nobody can decode, a TTL removal, a public message that bob's endpoint keeps
    // failing with 500, and a later public message
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();
    let db = w.moto.dynamodb();
    assert_eq!(
        w.send(
            "B",
            json!({"action":"sendPrivate","to":"alice","message":"one"})
        )
        .await,
        None
    );
    db.put_item()
        .table_name(&w.tables.events)
        .item("pk", AttributeValue::S("ROOM#lobby".into()))
        .item("seq", AttributeValue::N("1000".into()))
        .item("type", AttributeValue::S("Gibberish".into()))
        .send()
        .await
        .expect("poison");
    db.delete_item()
        .table_name(&w.tables.events)
        .key("pk", AttributeValue::S("ROOM#lobby".into()))
        .key("seq", AttributeValue::N("1000".into()))
        .send()
        .await
        .expect("remove");
    assert_eq!(
        w.send("A", json!({"action":"sendPublic","message":"two"}))
            .await,
        None
    );
    assert_eq!(
        w.send("A", json!({"action":"sendPublic","message":"three"}))
            .await,
        None
    );
    let mut records = w.stream.next_records_json().await.expect("records");
    // The mapping's filter drops the lobby counter's MODIFY records before Lambda.
    records.retain(|r| r["dynamodb"]["NewImage"]["type"]["S"] != "Counter");
    assert_eq!(records.len(), 5);
    records[2] = chat_tests::as_ttl_removal(records[2].clone());
    let event: Event =
        serde_json::from_value(chat_tests::lambda_event_json(&records)).expect("event");
    assert_eq!(event.records[2].event_name, "REMOVE");
    w.endpoint.fail_next("B", 500, 1_000);

    // WHEN the fan-out handles the batch
    let response = w.fan_out_event(event.clone()).await;

    // THEN the whole batch is done (the poison and the removal skipped): alice has every
    // message, and bob's failures did not fail the records nor make alice's frames repeat
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(
        w.frames("A"),
        vec![
            json!({"privateMessage":"bob: one"}),
            json!({"publicMessage":"alice: two"}),
            json!({"publicMessage":"alice: three"})
        ]
    );
    assert!(w.frames("B").is_empty());
    let tried = w.endpoint.faults_served();
    // The room's two messages go out together (crate::batching): bob's first POST is tried
    // max_attempts times, then he is owed it and everything after it, untried.
    assert_eq!(
        tried, 4,
        "bob's first message tried 4 times (max_attempts), the second owed untried"
    );

    // WHEN bob's endpoint recovers and the stream brings back what he is owed
    w.endpoint.fail_next("B", 500, 0);
    w.endpoint.clear();
    let response = w.fan_out().await;

    // THEN bob gets both messages, in order, and alice gets nothing again
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(
        w.frames("B"),
        vec![
            json!({"publicMessage":"alice: two"}),
            json!({"publicMessage":"alice: three"})
        ]
    );
    assert!(w.frames("A").is_empty());
}

#[tokio::test]
async fn presence_changes_in_one_batch_cost_one_members_frame_per_member_and_a_message_each() {
    // GIVEN alice has joined, and her join was fanned out
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    w.fan_out().await;
    w.endpoint.clear();

    // WHEN six more join and one of them leaves before the fan-out runs: one stream batch
    for (id, name) in [
        ("B", "bob"),
        ("C", "carol"),
        ("D", "dave"),
        ("E", "erin"),
        ("F", "frank"),
        ("G", "gina"),
    ] {
        w.join(id, name).await;
    }
    w.disconnect("G").await;
    let response = w.fan_out().await;

    // THEN every current member gets one list (the final one) and one message per change,
    // each the frame history serves for it (crate::presence)
    assert!(response.batch_item_failures.is_empty());
    let expected = vec![
        members(&["alice", "bob", "carol", "dave", "erin", "frank"]),
        system("bob has joined the chat"),
        system("carol has joined the chat"),
        system("dave has joined the chat"),
        system("erin has joined the chat"),
        system("frank has joined the chat"),
        system("gina has joined the chat"),
        system("gina has left the chat"),
    ];
    for id in ["A", "B", "C", "D", "E", "F"] {
        assert_eq!(w.frames(id), expected, "{id}");
    }
    // AND 6 members x (7 changes + 1 list) were posted: one list per run, not one per change
    assert_eq!(w.endpoint.post_count(), 6 * 8);
    let ids: Vec<u64> = w
        .endpoint
        .frames_for("A")
        .iter()
        .map(|f| f["id"].as_u64().expect("id"))
        .collect();
    assert_eq!(
        ids,
        vec![8, 2, 3, 4, 5, 6, 7, 8],
        "the list carries the last change's id, each message its own"
    );
}

#[tokio::test]
async fn many_gone_connections_are_pruned_together() {
    // GIVEN 40 members, 35 of whose connections have died silently
    let mut w = World::new(config()).await.expect("world");
    for i in 0..40 {
        w.join(&format!("c{i:02}"), &format!("n{i:02}")).await;
    }
    w.fan_out().await;
    w.endpoint.clear();
    for i in 5..40 {
        w.endpoint.mark_gone(&format!("c{i:02}"));
    }

    // WHEN one broadcast meets all the 410s
    assert_eq!(
        w.send("c00", json!({"action":"sendPublic","message":"roll call"}))
            .await,
        None
    );
    let response = w.fan_out().await;

    // THEN the five live members got it and all 35 are gone, their names free
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(w.endpoint.post_count(), 5);
    let now = chat_shared::now_ms();
    for i in 5..40 {
        assert_eq!(
            w.store
                .connection(&format!("c{i:02}"), now)
                .await
                .expect("read"),
            None
        );
    }
    // AND the 35 leaves reach the living as one run: each leave's message, then one list
    w.endpoint.clear();
    w.fan_out().await;
    let frames = w.frames("c01");
    assert_eq!(frames.len(), 36, "{frames:?}");
    let mut left: Vec<String> = frames[..35]
        .iter()
        .map(|f| f["systemMessage"].as_str().expect("a leave").to_owned())
        .collect();
    left.sort();
    let expected: Vec<String> = (5..40)
        .map(|i| format!("n{i:02} has left the chat"))
        .collect();
    assert_eq!(left, expected);
    assert_eq!(frames[35], members(&["n00", "n01", "n02", "n03", "n04"]));
    // AND their names are free again
    w.connect("new").await;
    assert_eq!(
        w.send("new", json!({"action":"setName","name":"n39"}))
            .await,
        None
    );
}

#[tokio::test]
async fn a_sequence_counter_behind_the_log_heals_itself() {
    // GIVEN alice has joined and spoken (ids 1 and 2), then the room's counter is set back to 0
    // (say, restored from an old backup)
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    assert_eq!(
        w.send("A", json!({"action":"sendPublic","message":"one"}))
            .await,
        None
    );
    w.fan_out().await;
    w.moto
        .dynamodb()
        .put_item()
        .table_name(&w.tables.connections)
        .item("pk", AttributeValue::S("ROOM#lobby".into()))
        .item("sk", AttributeValue::S("SEQ".into()))
        .item("seq", AttributeValue::N("0".into()))
        .send()
        .await
        .expect("corrupt the counter");
    w.endpoint.clear();

    // WHEN she speaks again
    let err = w
        .send("A", json!({"action":"sendPublic","message":"two"}))
        .await;

    // THEN it is stored under the next free id, not refused
    assert_eq!(err, None);
    w.fan_out().await;
    let frames = w.endpoint.frames_for("A");
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0]["publicMessage"], json!("alice: two"));
    assert_eq!(frames[0]["id"], json!(3));
}

#[tokio::test]
async fn presence_is_not_broadcast_above_the_presence_limit_but_messages_are() {
    // GIVEN a fan-out with PRESENCE_BROADCAST_LIMIT 3, and alice, bob and carol joined: at the
    // limit, their joins are broadcast
    let base = config();
    let mut w = World::new(WorldConfig {
        fanout: FanoutConfig {
            presence_limit: 3,
            ..base.fanout
        },
        ..base
    })
    .await
    .expect("world");
    for (id, name) in [("A", "alice"), ("B", "bob"), ("C", "carol")] {
        w.join(id, name).await;
    }
    assert!(w.fan_out().await.batch_item_failures.is_empty());
    assert_eq!(
        w.frames("A"),
        [
            members(&["alice", "bob", "carol"]),
            system("alice has joined the chat"),
            system("bob has joined the chat"),
            system("carol has joined the chat")
        ]
    );
    w.endpoint.clear();

    // WHEN dave joins (4 members, over the limit) and alice posts
    w.join("D", "dave").await;
    w.send("A", json!({"action":"sendPublic","message":"hi"}))
        .await;
    let response = w.fan_out().await;

    // THEN nobody gets dave's join, and everyone, dave included, gets the message
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    for id in ["A", "B", "C", "D"] {
        assert_eq!(
            w.frames(id),
            [json!({"publicMessage": "alice: hi"})],
            "{id}"
        );
    }
    w.endpoint.clear();

    // WHEN bob leaves (3 members again)
    w.disconnect("B").await;
    assert!(w.fan_out().await.batch_item_failures.is_empty());

    // THEN presence is broadcast again, with the whole list
    for id in ["A", "C", "D"] {
        assert_eq!(
            w.frames(id),
            [
                system("bob has left the chat"),
                members(&["alice", "carol", "dave"])
            ],
            "{id}"
        );
    }
}

#[tokio::test]
async fn rooms_answer_join_and_leave_and_deliver_each_rooms_frames_to_its_members_only() {
    // GIVEN alice, bob and carol in lobby, and a limit of two rooms a connection
    let mut w = World::new(WorldConfig {
        handler: HandlerConfig {
            max_rooms: 2,
            ..HandlerConfig::default()
        },
        ..config()
    })
    .await
    .expect("world");
    for (id, name) in [("A", "alice"), ("B", "bob"), ("C", "carol")] {
        w.join(id, name).await;
    }
    w.fan_out().await;
    w.endpoint.clear();

    // WHEN alice and bob join ops THEN each is answered with the room and its join's id there
    assert_eq!(
        w.send("A", json!({"action":"join","room":"ops"})).await,
        Some(json!({"joined":{"room":"ops","id":1}}))
    );
    assert_eq!(
        w.send("B", json!({"action":"join","room":"ops"})).await,
        Some(json!({"joined":{"room":"ops","id":2}}))
    );
    // AND joining again changes nothing and says so
    assert_eq!(
        w.send("B", json!({"action":"join","room":"ops"})).await,
        Some(json!({"joined":{"room":"ops","id":2,"already":true}}))
    );
    // AND alice speaks in ops, and the fan-out runs on what the stream carried
    assert_eq!(
        w.send(
            "A",
            json!({"action":"sendPublic","room":"ops","message":"ops only"})
        )
        .await,
        None
    );
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty());

    // THEN ops's members got ops's frames, tagged ops, with ops's ids (the two joins in one
    // batch are one presence run: one list, a message each); carol got nothing
    let ops = |frame: Value| (Some("ops".to_owned()), frame);
    let expected = vec![
        ops(json!({"members":["alice","bob"],"id":2})),
        ops(json!({"systemMessage":"alice has joined the chat","id":1})),
        ops(json!({"systemMessage":"bob has joined the chat","id":2})),
        ops(json!({"publicMessage":"alice: ops only","id":3})),
    ];
    assert_eq!(w.room_frames("A"), expected);
    assert_eq!(w.room_frames("B"), expected);
    assert!(w.room_frames("C").is_empty());

    // AND the refusals: carol is not in ops, a bad name, and alice is at her two rooms
    let carol = w
        .send(
            "C",
            json!({"action":"sendPublic","room":"ops","message":"hi"}),
        )
        .await;
    assert_eq!(code(&carol), "not_a_member");
    let bad = w.send("C", json!({"action":"join","room":"o p s"})).await;
    assert_eq!(code(&bad), "invalid_room");
    let full = w.send("A", json!({"action":"join","room":"dev"})).await;
    assert_eq!(code(&full), "too_many_rooms");
    assert_eq!(
        full.as_ref().map(|f| &f["error"]["action"]),
        Some(&json!("join"))
    );

    // WHEN bob leaves ops, then alice disconnects
    w.endpoint.clear();
    assert_eq!(
        w.send("B", json!({"action":"leave","room":"ops"})).await,
        Some(json!({"left":{"room":"ops","id":4}}))
    );
    w.disconnect("A").await;
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty());
    // THEN bob, in lobby only now, sees alice leave lobby, never ops's frames; carol the same
    let lobby_leave = vec![
        (
            Some("lobby".to_owned()),
            json!({"systemMessage":"alice has left the chat","id":4}),
        ),
        (
            Some("lobby".to_owned()),
            json!({"members":["bob","carol"],"id":4}),
        ),
    ];
    assert_eq!(w.room_frames("B"), lobby_leave);
    assert_eq!(w.room_frames("C"), lobby_leave);
    // AND ops recorded both leaves, in its own sequence
    let ops_log = w
        .store
        .read_events(
            "ops",
            chat_shared::store::EventRange::After(3),
            10,
            chat_shared::now_ms(),
        )
        .await
        .expect("read ops");
    assert_eq!(
        ops_log
            .events
            .iter()
            .map(|e| (e.seq, e.event.type_name()))
            .collect::<Vec<_>>(),
        vec![(4, "MemberLeft"), (5, "MemberLeft")]
    );
}
