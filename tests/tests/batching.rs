//! Batched delivery (`?batch=1`, `chat_shared::batching`) against a real DynamoDB API (moto)
//! and a real HTTP `@connections` endpoint, with the Lambdas' own code: a connection that
//! opted in gets a room's frames of one stream batch packed into `{"batch":[…]}` POSTs of at
//! most 32 KB, each inner frame byte for byte what an unbatched member gets; an unbatched
//! member gets one POST per frame as before; a batched recipient that keeps failing is owed
//! every frame and gets each once through redelivery.

use std::time::Duration;

use chat_shared::batching::MAX_POST_BYTES;
use chat_shared::config::{FanoutConfig, HandlerConfig};
use chat_shared::handler::handle_request;
use chat_shared::ratelimit::RateLimit;
use chat_shared::store::ChatStore;
use chat_tests::{World, WorldConfig};
use serde_json::{json, Value};

async fn world() -> World {
    let config = WorldConfig {
        handler: HandlerConfig {
            rate_limit: RateLimit {
                per_second: 0,
                burst: 0,
            },
            principal_limit: chat_shared::ratelimit::PrincipalLimit::OFF,
            ..HandlerConfig::default()
        },
        fanout: FanoutConfig {
            base_backoff: Duration::from_millis(2),
            max_attempts: 3,
            ..FanoutConfig::default()
        },
    };
    World::new(config)
        .await
        .expect("moto must start (run scripts/test)")
}

/// Connects `id` with `?batch=1` (the fixture `$connect` event with that query string, as
/// API Gateway passes it) and takes `name`.
async fn join_batched(w: &World, id: &str, name: &str) {
    let mut event = World::event("$connect", id, None);
    event.query_string_parameters = "batch=1".parse().expect("query");
    let r = handle_request(&w.store, &w.handler, event, chat_shared::now_ms())
        .await
        .expect("handler");
    assert_eq!(r.status_code, 200);
    let err = w.send(id, json!({"action":"setName","name":name})).await;
    assert_eq!(err, None, "{name} joins");
}

/// The raw POST bodies `id` got, in order.
fn posts_to(w: &World, id: &str) -> Vec<Vec<u8>> {
    w.endpoint
        .raw_posts()
        .into_iter()
        .filter(|p| p.connection_id == id)
        .map(|p| p.body)
        .collect()
}

/// The frames inside a POST body, as raw bytes: the body itself, or each element of its
/// `batch` array cut out of the body exactly as sent (found by re-serialising nothing: the
/// elements are located with a streaming parse of the array).
fn inner_frames(body: &[u8]) -> Vec<Vec<u8>> {
    const OPEN: &[u8] = br#"{"batch":["#;
    if !body.starts_with(OPEN) {
        return vec![body.to_vec()];
    }
    assert!(
        body.ends_with(b"]}"),
        "a batch frame ends the array and the object"
    );
    let list = &body[OPEN.len() - 1..body.len() - 1];
    let raw: Vec<&serde_json::value::RawValue> =
        serde_json::from_slice(list).expect("the batch is an array of frames");
    raw.iter().map(|r| r.get().as_bytes().to_vec()).collect()
}

fn text(frame: &[u8]) -> Value {
    serde_json::from_slice(frame).expect("a JSON frame")
}

fn is_batch(body: &[u8]) -> bool {
    text(body).get("batch").is_some()
}

#[tokio::test]
async fn packed_frames_are_the_unbatched_frames_byte_for_byte_and_unbatched_members_see_no_change()
{
    // GIVEN alice opted in with ?batch=1, bob and carol did not; all in lobby
    let mut w = world().await;
    join_batched(&w, "A", "alice").await;
    w.join("B", "bob").await;
    w.join("C", "carol").await;
    w.fan_out().await;
    assert!(
        w.store
            .connection("A", chat_shared::now_ms())
            .await
            .expect("read")
            .expect("alice")
            .batch,
        "the opt-in is recorded on alice's connection"
    );
    assert!(
        !w.store
            .connection("B", chat_shared::now_ms())
            .await
            .expect("read")
            .expect("bob")
            .batch
    );
    w.endpoint.clear();
    // AND one stream batch: four messages, a private message to alice, a join, a message
    for n in 1..=4 {
        w.send(
            "C",
            json!({"action":"sendPublic","message":format!("m{n}")}),
        )
        .await;
    }
    w.send(
        "B",
        json!({"action":"sendPrivate","to":"alice","message":"psst"}),
    )
    .await;
    w.join("E", "erin").await;
    w.send("C", json!({"action":"sendPublic","message":"m5"}))
        .await;

    // WHEN the fan-out handles the batch
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");

    // THEN bob got one POST per frame, none of them a batch: four messages, the join's two
    // frames, the last message
    let bob = posts_to(&w, "B");
    assert!(bob.iter().all(|p| !is_batch(p)), "bob sees no batch frame");
    let bob_texts: Vec<Value> = bob.iter().map(|p| text(p)).collect();
    assert_eq!(bob.len(), 7, "{bob_texts:?}");
    assert_eq!(bob_texts[0]["publicMessage"], "carol: m1");
    assert_eq!(bob_texts[6]["publicMessage"], "carol: m5");
    // AND alice got them all in one POST, {"batch":[…]}, whose inner frames are bob's frames
    // byte for byte, with her private message in its id order
    let alice = posts_to(&w, "A");
    assert_eq!(alice.len(), 1, "one POST for the whole batch");
    assert!(is_batch(&alice[0]));
    let inner = inner_frames(&alice[0]);
    let private: Vec<&Vec<u8>> = inner
        .iter()
        .filter(|f| text(f).get("privateMessage").is_some())
        .collect();
    assert_eq!(private.len(), 1);
    assert_eq!(text(private[0])["privateMessage"], "bob: psst");
    let room_inner: Vec<Vec<u8>> = inner
        .iter()
        .filter(|f| text(f).get("privateMessage").is_none())
        .cloned()
        .collect();
    assert_eq!(
        room_inner, bob,
        "inner frames are bob's POSTs, byte for byte"
    );
    let ids: Vec<u64> = inner
        .iter()
        .map(|f| text(f)["id"].as_u64().expect("id"))
        .collect();
    assert!(ids.windows(2).all(|p| p[0] <= p[1]), "in id order: {ids:?}");
    // AND carol, unbatched too, got exactly bob's POSTs
    assert_eq!(posts_to(&w, "C"), bob);
}

#[tokio::test]
async fn a_batch_over_32_kb_is_split_into_posts_of_at_most_32_kb() {
    // GIVEN alice batched and bob not, and one stream batch of 20 messages of 4,000 bytes
    let mut w = world().await;
    join_batched(&w, "A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();
    for n in 0..20 {
        let message = format!("{n:02}{}", "x".repeat(3_998));
        w.send("B", json!({"action":"sendPublic","message":message}))
            .await;
    }

    // WHEN fanned out
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");

    // THEN alice's POSTs each hold at most 32 KB, at least three of them (80 KB in all), and
    // their inner frames are bob's 20 POSTs byte for byte, in order
    let alice = posts_to(&w, "A");
    assert!(alice.len() >= 3, "{} POSTs", alice.len());
    assert!(alice.len() < 20);
    for post in &alice {
        assert!(post.len() <= MAX_POST_BYTES, "{} bytes", post.len());
    }
    let inner: Vec<Vec<u8>> = alice.iter().flat_map(|p| inner_frames(p)).collect();
    let bob = posts_to(&w, "B");
    assert_eq!(bob.len(), 20);
    assert_eq!(inner, bob);
}

#[tokio::test]
async fn a_failing_batched_recipient_is_redelivered_every_frame_once() {
    // GIVEN alice batched, bob not, and one stream batch of five messages
    let mut w = world().await;
    join_batched(&w, "A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();
    for n in 1..=5 {
        w.send(
            "B",
            json!({"action":"sendPublic","message":format!("m{n}")}),
        )
        .await;
    }
    // AND alice's endpoint answers 500 more often than the fan-out retries
    w.endpoint.fail_next("A", 500, 1_000);

    // WHEN the fan-out handles the batch
    let response = w.fan_out().await;

    // THEN the record does not fail, bob has his five frames, alice nothing yet
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(posts_to(&w, "B").len(), 5);
    assert!(posts_to(&w, "A").is_empty());
    assert_eq!(
        w.endpoint.faults_served(),
        3,
        "max_attempts tries of her one POST"
    );

    // WHEN the fault clears and the stream brings back her redelivery item
    w.endpoint.fail_next("A", 500, 0);
    let posts_before = w.endpoint.post_count();
    let response = w.fan_out().await;

    // THEN alice gets the one packed POST she was owed, every frame once, in order, and
    // nobody else gets anything
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(w.endpoint.post_count() - posts_before, 1);
    let alice = posts_to(&w, "A");
    assert_eq!(alice.len(), 1);
    let texts: Vec<Value> = inner_frames(&alice[0])
        .iter()
        .map(|f| text(f)["publicMessage"].clone())
        .collect();
    assert_eq!(
        texts,
        ["bob: m1", "bob: m2", "bob: m3", "bob: m4", "bob: m5"].map(|t| json!(t))
    );
    assert_eq!(inner_frames(&alice[0]), posts_to(&w, "B"));
}
