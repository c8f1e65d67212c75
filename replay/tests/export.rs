//! `chat-replay export` against a real DynamoDB API (moto): the built binary end to end for
//! the command line, the library for what only it can observe.

mod common;

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use chat_replay::export::export;
use chat_replay::range::EventFilter;
use chat_shared::events::LeaveReason;
use chat_shared::store::ChatStore;
use chrono::{DateTime, SecondsFormat, Utc};
use common::{run_bin, stderr, stdout, valid, World};
use indicatif::ProgressBar;
use serde_json::{json, Value};

/// Nine events, event `i` committed at `base + i * 1000` ms; returns `base`.
///
/// 1 A joins as alice, 2 B joins as bob, 3 alice posts, 4 bob whispers to alice, 5 alice is
/// renamed al, 6 bob posts, 7 C joins as carol, 8 carol leaves, 9 al posts.
async fn seed(w: &World) -> i64 {
    // Recent enough that nothing is past its retention, in whole seconds for RFC 3339.
    let base = chat_shared::now_ms() / 1000 * 1000 - 600_000;
    let at = |i: i64| base + i * 1000;
    w.join("A", "alice", at(1)).await;
    w.join("B", "bob", at(2)).await;
    w.store
        .post_public("A", "hello", at(3))
        .await
        .expect("post");
    w.store
        .post_private("B", "alice", "psst", at(4))
        .await
        .expect("whisper");
    w.store
        .set_name("A", &valid("al"), at(5))
        .await
        .expect("rename")
        .into_iter()
        .next()
        .expect("a new name records MemberRenamed");
    w.store
        .post_public("B", "hi all", at(6))
        .await
        .expect("post");
    w.join("C", "carol", at(7)).await;
    w.store
        .remove_connection("C", LeaveReason::Disconnected, at(8))
        .await
        .expect("leave")
        .into_iter()
        .next()
        .expect("a member's leave records MemberLeft");
    w.store.post_public("A", "bye", at(9)).await.expect("post");
    base
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).expect("every line is one JSON object"))
        .collect()
}

fn ids(lines: &[Value]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| l["id"].as_u64().expect("id"))
        .collect()
}

#[tokio::test]
async fn the_binary_exports_an_id_range_as_json_lines_with_every_field() {
    // GIVEN nine events: joins, a rename, public and private messages, a leave
    let w = World::new().await;
    let base = seed(&w).await;

    // WHEN ids 3 to 7 are exported to stdout
    let out = w
        .run(&[
            "export",
            "--from-id",
            "3",
            "--to-id",
            "7",
            "--page-size",
            "2",
        ])
        .await;

    // THEN exactly those five events come out, in order, each with its own fields (the private
    // message included: this is the operator's export)
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(
        lines(&stdout(&out)),
        vec![
            json!({"id":3,"ts":base + 3000,"type":"MessagePosted","room":"lobby","connectionId":"A","name":"alice","message":"hello"}),
            json!({"id":4,"ts":base + 4000,"type":"PrivateMessageSent","room":"lobby","connectionId":"B","name":"bob",
                   "toConnectionId":"A","toName":"alice","message":"psst"}),
            json!({"id":5,"ts":base + 5000,"type":"MemberRenamed","room":"lobby","connectionId":"A","name":"al","oldName":"alice"}),
            json!({"id":6,"ts":base + 6000,"type":"MessagePosted","room":"lobby","connectionId":"B","name":"bob","message":"hi all"}),
            json!({"id":7,"ts":base + 7000,"type":"MemberJoined","room":"lobby","connectionId":"C","name":"carol"}),
        ]
    );
    // AND the summary goes to stderr, leaving stdout pure JSON Lines
    assert!(
        stderr(&out).contains("exported 5 events"),
        "{}",
        stderr(&out)
    );

    // AND a leave carries its reason
    let out = w.run(&["export", "--from-id", "8", "--to-id", "8"]).await;
    assert_eq!(
        lines(&stdout(&out)),
        vec![
            json!({"id":8,"ts":base + 8000,"type":"MemberLeft","room":"lobby","connectionId":"C","name":"carol","reason":"disconnected"})
        ]
    );
}

#[tokio::test]
async fn one_room_or_every_room_is_exported_each_in_its_own_id_order() {
    // GIVEN alice and bob in the lobby; alice also in `ops` and `dev.team`, where she posts
    let w = World::new().await;
    let now = chat_shared::now_ms();
    w.join("A", "alice", now).await;
    w.join("B", "bob", now).await;
    for room in ["ops", "dev.team"] {
        w.store
            .join_room("A", room, 50, now)
            .await
            .expect("join a room");
        w.store
            .post_to_room("A", room, &format!("hello {room}"), now)
            .await
            .expect("post in the room");
    }
    w.store
        .post_public("B", "lobby talk", now)
        .await
        .expect("post");

    // WHEN one room is exported
    let out = w.run(&["export", "--room", "ops"]).await;

    // THEN only its events come out, with its own ids from 1
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let ops = lines(&stdout(&out));
    assert_eq!(ids(&ops), vec![1, 2]);
    assert!(ops.iter().all(|l| l["room"] == "ops"), "{ops:?}");
    assert_eq!(ops[1]["message"], "hello ops");

    // WHEN every room is exported
    let out = w.run(&["export", "--all-rooms"]).await;

    // THEN the rooms come in name order, each in id order, and nothing else
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let all = lines(&stdout(&out));
    let rooms_and_ids: Vec<(&str, u64)> = all
        .iter()
        .map(|l| {
            (
                l["room"].as_str().unwrap_or("?"),
                l["id"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        rooms_and_ids,
        vec![
            ("dev.team", 1),
            ("dev.team", 2),
            ("lobby", 1),
            ("lobby", 2),
            ("lobby", 3),
            ("ops", 1),
            ("ops", 2),
        ]
    );
    assert!(
        stderr(&out).contains("exported 7 events from 3 rooms"),
        "{}",
        stderr(&out)
    );

    // AND a room name the chat would refuse is refused before anything is read
    let out = w.run(&["export", "--room", "no#such"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("'#'"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_time_range_selects_by_commit_time_in_either_spelling() {
    // GIVEN nine events one second apart
    let w = World::new().await;
    let base = seed(&w).await;
    let since = DateTime::<Utc>::from_timestamp_millis(base + 2000)
        .expect("a valid instant")
        .to_rfc3339_opts(SecondsFormat::Secs, true);
    let until = (base + 4000).to_string();
    let file = std::env::temp_dir().join(format!("{}.jsonl", chat_tests::unique_name("export")));
    let file_arg = file.to_string_lossy().into_owned();

    // WHEN exported from an RFC 3339 time to an epoch-ms time, into a file
    let out = w
        .run(&[
            "export", "--since", &since, "--until", &until, "--output", &file_arg,
        ])
        .await;

    // THEN the file holds the events committed in that window, both ends included
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "", "nothing on stdout with --output");
    let text = std::fs::read_to_string(&file).expect("the output file");
    let _ = std::fs::remove_file(&file);
    assert_eq!(ids(&lines(&text)), vec![2, 3, 4]);

    // AND a time range combines with an id range
    let out = w
        .run(&[
            "export",
            "--since",
            &since,
            "--from-id",
            "4",
            "--to-id",
            "6",
        ])
        .await;
    assert_eq!(ids(&lines(&stdout(&out))), vec![4, 5, 6]);
}

#[tokio::test]
async fn an_empty_range_exports_nothing_and_succeeds() {
    // GIVEN nine events
    let w = World::new().await;
    let base = seed(&w).await;

    // WHEN a range past the end, and a time window before the first event, are exported
    let past_the_end = w
        .run(&["export", "--from-id", "100", "--to-id", "200"])
        .await;
    let before = (base - 10_000).to_string();
    let too_early = w.run(&["export", "--until", &before]).await;

    // THEN both succeed with no lines
    for out in [past_the_end, too_early] {
        assert!(out.status.success(), "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), "");
        assert!(
            stderr(&out).contains("exported 0 events"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn a_missing_table_is_one_clear_line_and_a_failure() {
    // GIVEN moto with the chat's tables, but a misspelt events table name
    let w = World::new().await;
    let mut tables = w.tables.clone();
    tables.events = "no-such-events".into();

    // WHEN exporting from it
    let out = run_bin(&["export"], &w.moto.endpoint(), &tables).await;

    // THEN the tool fails with one line naming the table and where it looked
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "table no-such-events not found at {}",
            w.moto.endpoint()
        )),
        "{err}"
    );
}

#[tokio::test]
async fn bad_ranges_and_unreachable_endpoints_are_refused_clearly() {
    // GIVEN no DynamoDB at all on a free port
    let port = chat_tests::moto::free_port().expect("a free port");
    let nowhere = format!("http://127.0.0.1:{port}");
    let tables = chat_shared::config::Tables {
        events: "events".into(),
        connections: "connections".into(),
    };

    // WHEN the range is reversed  THEN it is refused before anything is read
    let out = run_bin(
        &["export", "--from-id", "9", "--to-id", "3"],
        &nowhere,
        &tables,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--from-id 9 is after --to-id 3"),
        "{}",
        stderr(&out)
    );

    // WHEN a time does not parse  THEN clap refuses it, saying what is expected
    let out = run_bin(&["export", "--since", "yesterday"], &nowhere, &tables).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("RFC 3339"), "{}", stderr(&out));

    // WHEN nothing listens at the endpoint  THEN the error says so, in one line
    let out = run_bin(&["export"], &nowhere, &tables).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach DynamoDB at {nowhere}")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[tokio::test]
async fn the_library_streams_page_by_page_and_skips_undecodable_items() {
    // GIVEN nine events and, as id 10, an item no chat version wrote
    let w = World::new().await;
    seed(&w).await;
    let item: HashMap<String, AttributeValue> = [
        ("pk", AttributeValue::S("ROOM#lobby".into())),
        ("seq", AttributeValue::N("10".into())),
        ("type", AttributeValue::S("Exploded".into())),
        ("v", AttributeValue::N("1".into())),
        ("ts", AttributeValue::N(chat_shared::now_ms().to_string())),
        ("expiresAt", AttributeValue::N("99999999999".into())),
        ("connectionId", AttributeValue::S("X".into())),
        ("name", AttributeValue::S("x".into())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    w.client
        .put_item()
        .table_name(&w.tables.events)
        .set_item(Some(item))
        .send()
        .await
        .expect("put a foreign item");

    // WHEN everything is exported in pages of two
    let mut out = Vec::new();
    let summary = export(
        &w.log(),
        &EventFilter::all(),
        chat_shared::now_ms(),
        &mut out,
        &ProgressBar::hidden(),
    )
    .await
    .expect("export");

    // THEN every event came out once, in order, and the foreign item was counted, not written
    let text = String::from_utf8(out).expect("UTF-8");
    assert_eq!(ids(&lines(&text)), (1..=9).collect::<Vec<_>>());
    assert_eq!((summary.exported, summary.malformed), (9, 1));
}
