//! `chat-replay redeliver` against moto and a real HTTP `@connections` endpoint: the frames each
//! current member receives, their ids, the dry run, and pruning on 410.

mod common;

use chat_replay::range::EventFilter;
use chat_replay::redeliver::{redeliver, RedeliverOptions};
use chat_shared::config::FanoutConfig;
use chat_shared::delivery::ManagementApi;
use chat_shared::events::StoredEvent;
use chat_shared::store::{ChatStore, EventRange};
use chat_tests::ConnectionsEndpoint;
use common::{stderr, stdout, World};
use indicatif::ProgressBar;
use serde_json::{json, Value};

/// 1 alice joins, 2 bob joins, 3 alice posts, 4 bob whispers to alice, 5 alice posts.
async fn seed(w: &World) -> Vec<StoredEvent> {
    let now = chat_shared::now_ms();
    let mut events = vec![
        w.join("A", "alice", now).await,
        w.join("B", "bob", now).await,
    ];
    events.push(w.store.post_public("A", "hello", now).await.expect("post"));
    events.push(
        w.store
            .post_private("B", "alice", "psst", now)
            .await
            .expect("whisper"),
    );
    events.push(w.store.post_public("A", "again", now).await.expect("post"));
    events
}

/// A frame as `{body, id, ts}` split: the body without `id`/`ts`, and those two.
fn split(mut frame: Value) -> (Value, Option<u64>, Option<i64>) {
    let id = frame["id"].as_u64();
    let ts = frame["ts"].as_i64();
    if let Some(o) = frame.as_object_mut() {
        o.remove("id");
        o.remove("ts");
    }
    (frame, id, ts)
}

async fn last_id(w: &World) -> u64 {
    w.store
        .read_events(
            chat_shared::keys::DEFAULT_ROOM,
            EventRange::Before(None),
            1,
            chat_shared::now_ms(),
        )
        .await
        .expect("read")
        .events
        .first()
        .map_or(0, |e| e.seq)
}

#[tokio::test]
async fn redelivery_sends_each_event_once_to_each_current_member_with_its_original_id() {
    // GIVEN members alice (A) and bob (B) and five events
    let w = World::new().await;
    let events = seed(&w).await;
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let api = ManagementApi::new(&w.moto.sdk_config(), &endpoint.url());
    let options = RedeliverOptions {
        filter: EventFilter::ids(2, 4).expect("range"),
        dry_run: false,
        json: true,
        fanout: FanoutConfig::default(),
    };

    // WHEN ids 2 to 4 are redelivered
    let mut out = Vec::new();
    let summary = redeliver(
        &w.log(),
        &w.store,
        &api,
        &options,
        chat_shared::now_ms,
        &mut out,
        &ProgressBar::hidden(),
    )
    .await
    .expect("redeliver");

    // THEN each member got each event's frames once, in id order, carrying the original id and
    // commit time (so a client that has them already drops the copies)
    let ts = |id: u64| Some(events[id as usize - 1].ts);
    let joined = [
        (
            json!({"members": ["alice", "bob"], "room": "lobby"}),
            Some(2),
            ts(2),
        ),
        (
            json!({"systemMessage": "bob has joined the chat", "room": "lobby"}),
            Some(2),
            ts(2),
        ),
    ];
    let public = (
        json!({"publicMessage": "alice: hello", "room": "lobby"}),
        Some(3),
        ts(3),
    );
    let private = (json!({"privateMessage": "bob: psst"}), Some(4), ts(4));
    let frames = |id: &str| -> Vec<_> { endpoint.frames_for(id).into_iter().map(split).collect() };
    assert_eq!(
        frames("A"),
        vec![
            joined[0].clone(),
            joined[1].clone(),
            public.clone(),
            private
        ]
    );
    // AND the private message went to its recipient only
    assert_eq!(
        frames("B"),
        vec![joined[0].clone(), joined[1].clone(), public]
    );
    assert!(endpoint.unrouted().is_empty());
    // AND the output has one line per event
    let lines: Vec<Value> = String::from_utf8(out)
        .expect("UTF-8")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"id":2,"type":"MemberJoined","delivered":2,"pruned":[],"rejected":0}),
            json!({"id":3,"type":"MessagePosted","delivered":2,"pruned":[],"rejected":0}),
            json!({"id":4,"type":"PrivateMessageSent","delivered":1,"pruned":[],"rejected":0}),
        ]
    );
    assert_eq!((summary.events, summary.delivered), (3, 5));
    // AND nothing was written
    assert_eq!(last_id(&w).await, 5);
}

#[tokio::test]
async fn a_dry_run_lists_events_and_recipients_and_posts_nothing() {
    // GIVEN members alice and bob, five events, and an @connections endpoint
    let w = World::new().await;
    seed(&w).await;
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");

    // WHEN the binary redelivers ids 2 to 4 with --dry-run
    let out = w
        .run(&[
            "redeliver",
            "--from-id",
            "2",
            "--to-id",
            "4",
            "--dry-run",
            "--json",
            "--connections-endpoint",
            &endpoint.url(),
        ])
        .await;

    // THEN it lists each event with the connections it would reach
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(
        lines,
        vec![
            json!({"id":2,"type":"MemberJoined","recipients":2}),
            json!({"id":3,"type":"MessagePosted","recipients":2}),
            json!({"id":4,"type":"PrivateMessageSent","recipients":1}),
        ]
    );
    assert!(
        stderr(&out).contains("nothing was sent"),
        "{}",
        stderr(&out)
    );
    // AND not one request reached @connections, and nothing was written
    assert_eq!(endpoint.request_count(), 0);
    assert_eq!(last_id(&w).await, 5);
}

#[tokio::test]
async fn the_binary_redelivers_and_prunes_a_gone_member_like_the_fan_out() {
    // GIVEN members alice and bob, where bob's connection is gone (410)
    let w = World::new().await;
    seed(&w).await;
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    endpoint.mark_gone("B");

    // WHEN the binary redelivers alice's "hello" (id 3)
    let out = w
        .run(&[
            "redeliver",
            "--from-id",
            "3",
            "--to-id",
            "3",
            "--concurrency",
            "4",
            "--connections-endpoint",
            &endpoint.url(),
        ])
        .await;

    // THEN alice got it, bob was pruned, and his leave was recorded as the next event
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(
        stdout(&out),
        "event 3 MessagePosted: delivered to 1, pruned 1, rejected 0\n"
    );
    let a: Vec<_> = endpoint.frames_for("A").into_iter().map(split).collect();
    assert_eq!(a.len(), 1);
    assert_eq!(
        a[0].0,
        json!({"publicMessage": "alice: hello", "room": "lobby"})
    );
    assert_eq!(a[0].1, Some(3));
    assert_eq!(
        w.store
            .connection("B", chat_shared::now_ms())
            .await
            .expect("read"),
        None
    );
    assert_eq!(last_id(&w).await, 6);
}

#[tokio::test]
async fn a_room_is_redelivered_to_its_own_members_only() {
    // GIVEN alice and bob in the lobby, and only alice in `ops`, where she posted (ops id 2)
    let w = World::new().await;
    seed(&w).await;
    let now = chat_shared::now_ms();
    w.store.join_room("A", "ops", 50, now).await.expect("join");
    let posted = w
        .store
        .post_to_room("A", "ops", "ops only", now)
        .await
        .expect("post");
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let api = ManagementApi::new(&w.moto.sdk_config(), &endpoint.url());
    let options = RedeliverOptions {
        filter: EventFilter::ids(2, 2).expect("range"),
        dry_run: false,
        json: true,
        fanout: FanoutConfig::default(),
    };

    // WHEN ops's id 2 is redelivered
    let mut out = Vec::new();
    redeliver(
        &w.log().in_room("ops"),
        &w.store,
        &api,
        &options,
        chat_shared::now_ms,
        &mut out,
        &ProgressBar::hidden(),
    )
    .await
    .expect("redeliver");

    // THEN alice got ops's frame with ops's id; bob, who is not in ops, got nothing
    let frames: Vec<_> = endpoint.frames_for("A").into_iter().map(split).collect();
    assert_eq!(
        frames,
        vec![(
            json!({"publicMessage": "alice: ops only", "room": "ops"}),
            Some(2),
            Some(posted.ts)
        )]
    );
    assert!(endpoint.frames_for("B").is_empty());
}
