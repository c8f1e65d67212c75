//! Fault injection against a real DynamoDB API (moto) and a real HTTP `@connections` endpoint:
//! chat-api-handler and the fan-out (the Lambdas' own code) meet throttling, server errors,
//! slow answers, 410s in the middle of a broadcast, a batch that fails half-way, a store that
//! fails its writes, and poison records. What must hold:
//! - retried faults cost nothing: every member gets every frame exactly once;
//! - what cannot be delivered now is reported (partial batch response) and, redelivered the way
//!   Lambda does it, reaches everyone: after dedupe on (id, frame key), exactly once, in id order;
//! - a refused write leaves nothing half-written;
//! - a record that is not a chat event never stops the stream.
//!
//! Timeouts: the SDK's per-attempt timeout is 5 s (delivery.rs, not configurable); one test waits
//! for it once, against an endpoint that never answers, and checks it is the retried
//! `Transient` error. A slow endpoint is tested with short delays, and the invocation's own
//! deadline (which a slow endpoint makes the fan-out run into) with a short deadline.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use aws_sdk_apigatewaymanagement::error::SdkError;
use aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError;
use aws_sdk_dynamodb::types::AttributeValue;
use chat_shared::config::{FanoutConfig, HandlerConfig, Retention, Tables};
use chat_shared::delivery::{Deliver, DeliveryError, ManagementApi};
use chat_shared::events::ChatEvent;
use chat_shared::fanout::decode_record;
use chat_shared::handler::handle_request;
use chat_shared::ratelimit::RateLimit;
use chat_shared::store::dynamodb::DynamoStore;
use chat_shared::store::ChatStore;
use chat_tests::logs::Logs;
use chat_tests::world::code;
use chat_tests::{unique_name, ConnectionsEndpoint, World, WorldConfig};
use serde_json::{json, Value};
use tracing::Level;

/// A world for fault injection; panics if it cannot be set up (moto missing: run scripts/test).
async fn world() -> World {
    let config = WorldConfig {
        // No rate limits: they write on every request (a bucket on the connection item, a
        // counter in the principal's partition), which would blur the "nothing was written"
        // checks.
        handler: HandlerConfig {
            rate_limit: RateLimit {
                per_second: 0,
                burst: 0,
            },
            principal_limit: chat_shared::ratelimit::PrincipalLimit::OFF,
            ..HandlerConfig::default()
        },
        // Short backoffs keep the retries fast; 8 attempts let a delivery absorb 7 faults.
        fanout: FanoutConfig {
            base_backoff: Duration::from_millis(2),
            max_attempts: 8,
            ..FanoutConfig::default()
        },
    };
    World::new(config)
        .await
        .expect("moto must start (run scripts/test)")
}

/// What only the fault tests need from a [`World`], beside the helpers every suite shares.
trait FaultWorld {
    async fn say(&self, id: &str, message: &str);
    async fn redeliver_until_done(
        &self,
        event: &Event,
        response: DynamoDbEventResponse,
        tries: usize,
    );
    fn delivered(&self, id: &str) -> Vec<(u64, String, Value)>;
    async fn connections_items(&self) -> Vec<BTreeMap<String, String>>;
}

impl FaultWorld for World {
    async fn say(&self, id: &str, message: &str) {
        let refused = self
            .send(id, json!({"action":"sendPublic","message":message}))
            .await;
        assert_eq!(refused, None, "{id} says {message:?}");
    }

    /// Redelivers `event` the way Lambda does after a partial batch response: from the reported
    /// record on, until nothing is reported (at most `tries` times).
    async fn redeliver_until_done(
        &self,
        event: &Event,
        mut response: DynamoDbEventResponse,
        tries: usize,
    ) {
        for _ in 0..tries {
            let Some(failed) = response.batch_item_failures.first() else {
                return;
            };
            let from = event
                .records
                .iter()
                .position(|r| r.change.sequence_number == failed.item_identifier)
                .expect("the reported record is in the batch");
            let mut retry = event.clone();
            retry.records.drain(..from);
            response = self.fan_out_event(retry).await;
        }
        assert!(
            response.batch_item_failures.is_empty(),
            "still failing after {tries} redeliveries: {response:?}"
        );
    }

    /// The (id, frame key, frame) of everything delivered to `id`, in arrival order.
    fn delivered(&self, id: &str) -> Vec<(u64, String, Value)> {
        self.endpoint
            .frames_for(id)
            .into_iter()
            .map(|f| {
                let key = frame_key(&f);
                let seq = f["id"].as_u64().unwrap_or_else(|| panic!("no id: {f}"));
                (seq, key, f)
            })
            .collect()
    }

    /// Every item of the connections table, sorted: the chat's whole state.
    async fn connections_items(&self) -> Vec<BTreeMap<String, String>> {
        let out = self
            .moto
            .dynamodb()
            .scan()
            .table_name(&self.tables.connections)
            .consistent_read(true)
            .send()
            .await
            .expect("scan connections");
        assert!(out.last_evaluated_key.is_none(), "one page is enough here");
        let mut items: Vec<BTreeMap<String, String>> = out
            .items
            .unwrap_or_default()
            .into_iter()
            .map(|item| {
                item.into_iter()
                    .map(|(k, v)| (k, format!("{v:?}")))
                    .collect()
            })
            .collect();
        items.sort();
        items
    }
}

/// The frame's kind: its one key other than `room`, `id` and `ts`.
fn frame_key(frame: &Value) -> String {
    frame
        .as_object()
        .and_then(|o| {
            o.keys()
                .find(|k| !["id", "ts", "room"].contains(&k.as_str()))
                .cloned()
        })
        .unwrap_or_else(|| panic!("frame without a kind: {frame}"))
}

/// Drops redeliveries (same id and frame key), keeping first arrivals in order.
fn dedupe(frames: &[(u64, String, Value)]) -> Vec<(u64, String, Value)> {
    let mut seen = HashSet::new();
    frames
        .iter()
        .filter(|(id, key, _)| seen.insert((*id, key.clone())))
        .cloned()
        .collect()
}

/// The (id, frame key) a member must end up with for the events of `event` (members are read
/// when the fan-out runs, so a member who joined in the batch gets the earlier messages too).
fn expected_for(event: &Event, connection_id: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for record in &event.records {
        let Ok(stored) = decode_record(record) else {
            continue;
        };
        let id = stored.seq;
        match &stored.event {
            ChatEvent::MessagePosted { .. } => out.push((id, "publicMessage".to_owned())),
            ChatEvent::PrivateMessageSent {
                to_connection_id, ..
            } if to_connection_id == connection_id => out.push((id, "privateMessage".to_owned())),
            ChatEvent::MemberJoined { .. } | ChatEvent::MemberRenamed { .. } => {
                out.push((id, "members".to_owned()));
                out.push((id, "systemMessage".to_owned()));
            }
            ChatEvent::MemberLeft { .. } => {
                out.push((id, "systemMessage".to_owned()));
                out.push((id, "members".to_owned()));
            }
            _ => {}
        }
    }
    out
}

fn keys_of(frames: &[(u64, String, Value)]) -> Vec<(u64, String)> {
    frames.iter().map(|(id, k, _)| (*id, k.clone())).collect()
}

const MEMBERS: [(&str, &str); 6] = [
    ("A", "alice"),
    ("B", "bob"),
    ("C", "carol"),
    ("D", "dave"),
    ("E", "erin"),
    ("F", "frank"),
];

/// A world where the six MEMBERS have joined and their joins were fanned out.
async fn six_members() -> World {
    let mut w = world().await;
    for (id, name) in MEMBERS {
        w.join(id, name).await;
    }
    let r = w.fan_out().await;
    assert!(r.batch_item_failures.is_empty());
    w.endpoint.clear();
    w
}

#[tokio::test]
async fn throttling_server_errors_and_slowness_are_retried_and_each_member_gets_each_frame_once() {
    // GIVEN six members
    let mut w = six_members().await;
    let rounds: [(&str, u16, Duration); 6] = [
        ("throttled", 429, Duration::ZERO),
        ("internal error", 500, Duration::ZERO),
        ("bad gateway", 502, Duration::ZERO),
        ("unavailable", 503, Duration::ZERO),
        (
            "gateway timeout on a slow endpoint",
            504,
            Duration::from_millis(150),
        ),
        (
            "throttled on a slow endpoint",
            429,
            Duration::from_millis(100),
        ),
    ];
    let mut expected: Vec<String> = Vec::new();
    for (label, status, delay) in rounds {
        // WHEN @connections answers the next 7 calls (of at least 13) with `status`, maybe
        // slowly, while alice posts
        let text = format!("through {label}");
        w.say("A", &text).await;
        expected.push(format!("alice: {text}"));
        w.endpoint.set_delay(delay);
        w.endpoint.fail_any_next(status, 7);
        let served_before = w.endpoint.faults_served();
        let response = w.fan_out().await;
        w.endpoint.set_delay(Duration::ZERO);

        // THEN the faults were met and retried, and nothing is reported failed
        assert!(
            response.batch_item_failures.is_empty(),
            "{label}: {response:?}"
        );
        assert_eq!(w.endpoint.faults_served() - served_before, 7, "{label}");
    }
    // WHEN a member joins while the endpoint throttles (two frames per member, each retried)
    w.join("G", "gina").await;
    w.endpoint.fail_any_next(429, 7);
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");

    // THEN every member got every message exactly once, in order, and the join's two frames
    for (id, name) in MEMBERS {
        let frames: Vec<Value> = w.endpoint.frames_for(id);
        let texts: Vec<&str> = frames
            .iter()
            .filter_map(|f| f["publicMessage"].as_str())
            .collect();
        assert_eq!(texts, expected, "{name}");
        let tail: Vec<String> = frames[expected.len()..].iter().map(frame_key).collect();
        assert_eq!(tail, ["members", "systemMessage"], "{name}: {frames:?}");
        let ids: Vec<u64> = frames.iter().filter_map(|f| f["id"].as_u64()).collect();
        assert!(ids.windows(2).all(|p| p[0] <= p[1]), "{name}: {ids:?}");
    }
    assert_eq!(
        w.endpoint
            .frames_for("G")
            .iter()
            .map(frame_key)
            .collect::<Vec<_>>(),
        ["members", "systemMessage"]
    );
}

#[tokio::test]
async fn gone_members_mid_broadcast_are_pruned_and_the_rest_get_the_message() {
    // GIVEN six members; carol's and erin's connections answer 410 once (they died during the
    // broadcast), frank's always, and the endpoint throttles a few calls too
    let mut w = six_members().await;
    w.endpoint.fail_next("C", 410, 1);
    w.endpoint.fail_next("E", 410, 1);
    w.endpoint.mark_gone("F");
    w.endpoint.fail_any_next(429, 3);

    // WHEN alice broadcasts
    w.say("A", "roll call").await;
    let response = w.fan_out().await;

    // THEN the living got it once, the gone were pruned and their names released
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    for id in ["A", "B", "D"] {
        let frames = w.endpoint.frames_for(id);
        assert_eq!(frames.len(), 1, "{id}: {frames:?}");
        assert_eq!(frames[0]["publicMessage"], json!("alice: roll call"));
    }
    let now = chat_shared::now_ms();
    for id in ["C", "E", "F"] {
        assert!(w.endpoint.frames_for(id).is_empty(), "{id}");
        assert_eq!(
            w.store.connection(id, now).await.expect("read"),
            None,
            "{id}"
        );
    }

    // AND the others see them leave, in one run: each leave's message, then the list
    w.endpoint.clear();
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    for id in ["A", "B", "D"] {
        let frames = w.endpoint.frames_for(id);
        assert_eq!(frames.len(), 4, "{id}: {frames:?}");
        let mut said: Vec<&str> = frames[..3]
            .iter()
            .map(|f| f["systemMessage"].as_str().expect("leave message"))
            .collect();
        said.sort();
        assert_eq!(
            said,
            [
                "carol has left the chat",
                "erin has left the chat",
                "frank has left the chat"
            ],
            "{id}"
        );
        assert_eq!(frames[3]["members"], json!(["alice", "bob", "dave"]));
    }
    // AND their names are free again
    w.connect("N").await;
    assert_eq!(
        w.send("N", json!({"action":"setName","name":"Erin"})).await,
        None
    );
}

/// Forwards to the real `@connections` client, and arms a fault on the endpoint the first time
/// `target` is sent a frame containing `trigger`: from then on the target's endpoint fails.
/// That makes the fan-out fail in the middle of a batch, on a chosen record.
struct FailFromFrame<'a> {
    api: &'a ManagementApi,
    endpoint: &'a ConnectionsEndpoint,
    target: &'a str,
    trigger: &'a str,
    armed: AtomicBool,
}

impl Deliver for FailFromFrame<'_> {
    // What `#[async_trait]` expands to (this crate does not depend on async-trait).
    fn post<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        connection_id: &'life1 str,
        data: &'life2 [u8],
    ) -> Pin<Box<dyn Future<Output = Result<(), DeliveryError>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        Box::pin(async move {
            if connection_id == self.target
                && String::from_utf8_lossy(data).contains(self.trigger)
                && !self.armed.swap(true, Ordering::SeqCst)
            {
                // More failures than the retries allow.
                self.endpoint.fail_next(self.target, 500, 1_000);
            }
            self.api.post(connection_id, data).await
        })
    }
}

#[tokio::test]
async fn a_recipient_failing_half_way_costs_only_that_recipient_and_catches_up_when_it_recovers() {
    // GIVEN four members, then one stream batch: two messages, a join, the message "three"
    // (from which carol's endpoint fails, more often than the retries allow), a message, a
    // private message to carol, a message
    let mut w = world().await;
    for (id, name) in &MEMBERS[..4] {
        w.join(id, name).await;
    }
    w.fan_out().await;
    w.endpoint.clear();
    w.say("A", "one").await;
    w.say("B", "two").await;
    w.join("E", "erin").await;
    w.say("D", "three").await;
    w.say("A", "four").await;
    assert_eq!(
        w.send(
            "A",
            json!({"action":"sendPrivate","to":"carol","message":"five"})
        )
        .await,
        None
    );
    w.say("B", "six").await;
    let event = w.stream.next_lambda_event().await.expect("stream");
    assert_eq!(event.records.len(), 7);

    // WHEN the fan-out handles the batch and carol's endpoint fails from "three" on
    let failing = FailFromFrame {
        api: &w.api,
        endpoint: &w.endpoint,
        target: "C",
        trigger: "dave: three",
        armed: AtomicBool::new(false),
    };
    let response = w.fan_out_via(&w.store, &failing, event.clone(), None).await;

    // THEN no record fails: everyone else has every frame exactly once, in id order (no
    // record was re-sent to the room), and carol has what came before "three"
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let three_id = decode_record(&event.records[3]).expect("event").seq;
    for (id, name) in [MEMBERS[0], MEMBERS[1], MEMBERS[3], MEMBERS[4]] {
        check_exactly_once_after_dedupe(&w, &event, id, name, 0);
    }
    assert!(w.delivered("C").iter().all(|(seq, _, _)| *seq < three_id));
    let owed = expected_for(&event, "C")
        .into_iter()
        .filter(|(seq, _)| *seq >= three_id)
        .count();
    // 8 attempts (max_attempts here) of "three" only: a room's units of one batch go to each
    // member together (crate::batching), so after her first frame fails for good she is
    // owed the rest without trying them ("three" to "six")
    assert_eq!(w.endpoint.faults_served(), 8);

    // WHEN the fault clears and the stream brings back what carol is owed
    w.endpoint.fail_next("C", 500, 0);
    let posts_before = w.endpoint.post_count();
    let response = w.fan_out().await;

    // THEN carol has every frame exactly once, in id order, and nobody else got anything
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(
        w.endpoint.post_count() - posts_before,
        owed,
        "only carol's frames were sent"
    );
    check_exactly_once_after_dedupe(&w, &event, "C", "carol", 0);
    let carol: Vec<Value> = dedupe(&w.delivered("C"))
        .into_iter()
        .filter_map(|(_, _, f)| f["privateMessage"].as_str().map(str::to_owned))
        .map(Value::String)
        .collect();
    assert_eq!(carol, vec![json!("alice: five")]);
}

fn check_exactly_once_after_dedupe(w: &World, event: &Event, id: &str, name: &str, retried: u64) {
    let got = w.delivered(id);
    let unique = dedupe(&got);
    assert_eq!(keys_of(&unique), expected_for(event, id), "{name}: {got:?}");
    let ids: Vec<u64> = unique.iter().map(|(seq, _, _)| *seq).collect();
    assert!(ids.windows(2).all(|p| p[0] <= p[1]), "{name}: {ids:?}");
    for (seq, key, _) in &got {
        let copies = got.iter().filter(|(s, k, _)| (s, k) == (seq, key)).count();
        assert!(
            copies == 1 || *seq == retried,
            "{name}: ({seq}, {key}) delivered {copies} times"
        );
    }
    let texts: Vec<&str> = unique
        .iter()
        .filter_map(|(_, _, f)| f["publicMessage"].as_str())
        .collect();
    assert_eq!(
        texts,
        [
            "alice: one",
            "bob: two",
            "dave: three",
            "alice: four",
            "bob: six"
        ],
        "{name}"
    );
}

#[tokio::test]
async fn a_slow_endpoint_runs_into_the_invocation_deadline_and_nothing_is_lost() {
    // GIVEN six members and a batch of four messages, an endpoint that takes 250 ms a call, and
    // a fan-out that keeps 300 ms in hand to answer Lambda
    let mut w = six_members().await;
    w.fanout.time_margin = Duration::from_millis(300);
    for n in 1..=4 {
        w.say("B", &format!("slow {n}")).await;
    }
    let event = w.stream.next_lambda_event().await.expect("stream");
    w.endpoint.set_delay(Duration::from_millis(250));

    // WHEN the invocation has only 900 ms (four messages one after the other need 1 s)
    let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
    let response = w
        .fan_out_via(&w.store, &w.api, event.clone(), Some(deadline))
        .await;
    let answered = tokio::time::Instant::now();

    // THEN it answered before the invocation's deadline — Lambda would otherwise kill it and
    // retry the whole batch — and reports where Lambda must resume. (Not a performance bound:
    // the deadline is the behaviour under test, and the 300 ms margin is what it is for.)
    assert!(
        answered <= deadline,
        "answered {:?} after the invocation's deadline",
        answered - deadline
    );
    assert_eq!(response.batch_item_failures.len(), 1, "{response:?}");
    w.endpoint.set_delay(Duration::ZERO);

    // WHEN Lambda redelivers from there THEN everyone has every message once after dedupe
    w.redeliver_until_done(&event, response, 3).await;
    for (id, name) in MEMBERS {
        let unique = dedupe(&w.delivered(id));
        assert_eq!(keys_of(&unique), expected_for(&event, id), "{name}");
        let texts: Vec<&str> = unique
            .iter()
            .filter_map(|(_, _, f)| f["publicMessage"].as_str())
            .collect();
        assert_eq!(
            texts,
            ["bob: slow 1", "bob: slow 2", "bob: slow 3", "bob: slow 4"],
            "{name}"
        );
    }
}

#[tokio::test]
async fn a_store_failing_its_writes_is_an_internal_error_and_nothing_is_half_written() {
    // GIVEN alice and bob are members, carol is connected without a name
    let mut w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.connect("C").await;
    w.fan_out().await;
    let state_before = w.connections_items().await;
    // AND a store whose events table does not exist (every state change writes an event)
    let broken = DynamoStore::new(
        w.moto.dynamodb(),
        Tables {
            events: unique_name("missing-events"),
            connections: w.tables.connections.clone(),
        },
        Retention::default(),
    );

    // WHEN every kind of state change is attempted through it
    let attempts = [
        ("C", json!({"action":"setName","name":"carol"}), "setName"),
        ("A", json!({"action":"setName","name":"al"}), "setName"),
        (
            "A",
            json!({"action":"sendPublic","message":"hi"}),
            "sendPublic",
        ),
        (
            "A",
            json!({"action":"sendPrivate","to":"bob","message":"psst"}),
            "sendPrivate",
        ),
        ("A", json!({"action":"history","after":0}), "history"),
    ];
    for (id, frame, action) in &attempts {
        let reply = w.send_with(&broken, id, frame.clone()).await;
        // THEN the sender is told to try again, with the action
        assert_eq!(code(&reply), "internal_error", "{frame}: {reply:?}");
        let reply = reply.expect("an error frame");
        assert_eq!(reply["error"]["action"], json!(action), "{frame}");
        assert!(reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }
    // AND a $disconnect that cannot be recorded is an error for Lambda to retry, not a leave
    let disconnect = handle_request(
        &broken,
        &w.handler,
        World::event("$disconnect", "B", None),
        chat_shared::now_ms(),
    )
    .await;
    assert!(disconnect.is_err(), "{disconnect:?}");

    // THEN nothing was half-written: every item of the connections table (connections, name
    // claims, the room's counter) is as it was, and no event reached the stream
    assert_eq!(w.connections_items().await, state_before);
    let records = w.stream.next_event().await.expect("stream").records;
    assert!(records.is_empty(), "events written: {records:?}");

    // WHEN the connections table is missing instead
    let no_connections = DynamoStore::new(
        w.moto.dynamodb(),
        Tables {
            events: w.tables.events.clone(),
            connections: unique_name("missing-connections"),
        },
        Retention::default(),
    );
    // THEN a new connection is refused (non-2xx), messages are internal errors, nothing is written
    let r = w.call_with(&no_connections, "$connect", "Z", None).await;
    assert_eq!(r.status_code, 500);
    let reply = w
        .send_with(
            &no_connections,
            "A",
            json!({"action":"sendPublic","message":"hi"}),
        )
        .await;
    assert_eq!(code(&reply), "internal_error", "{reply:?}");
    assert_eq!(w.connections_items().await, state_before);
    assert!(w
        .stream
        .next_event()
        .await
        .expect("stream")
        .records
        .is_empty());

    // WHEN the real events table is dropped mid-run
    w.moto
        .dynamodb()
        .delete_table()
        .table_name(&w.tables.events)
        .send()
        .await
        .expect("drop the events table");
    // THEN the next join and message are internal errors and the state is still untouched
    for (id, frame) in [
        ("C", json!({"action":"setName","name":"carol"})),
        ("B", json!({"action":"sendPublic","message":"anyone?"})),
    ] {
        let reply = w.send(id, frame.clone()).await;
        assert_eq!(code(&reply), "internal_error", "{frame}: {reply:?}");
    }
    assert_eq!(w.connections_items().await, state_before);
}

#[tokio::test]
async fn a_fanout_whose_store_fails_reports_the_record_and_delivers_it_later() {
    // GIVEN alice and bob, a message from alice, and a fan-out whose store cannot be read
    let mut w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();
    w.say("A", "hello").await;
    w.say("B", "hi").await;
    let event = w.stream.next_lambda_event().await.expect("stream");
    let broken = DynamoStore::new(
        w.moto.dynamodb(),
        Tables {
            events: w.tables.events.clone(),
            connections: unique_name("missing-connections"),
        },
        Retention::default(),
    );

    // WHEN it runs
    let response = w.fan_out_via(&broken, &w.api, event.clone(), None).await;

    // THEN the first record is reported (Lambda retries from it) and nothing was sent
    let failed: Vec<_> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.clone())
        .collect();
    assert_eq!(
        failed,
        vec![event.records[0].change.sequence_number.clone()]
    );
    assert_eq!(w.endpoint.post_count(), 0);

    // WHEN Lambda retries with the store back THEN both messages reach both members once
    w.redeliver_until_done(&event, response, 2).await;
    for id in ["A", "B"] {
        let texts: Vec<String> = w
            .endpoint
            .frames_for(id)
            .iter()
            .filter_map(|f| f["publicMessage"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(texts, ["alice: hello", "bob: hi"], "{id}");
    }
}

/// Items that are not chat events, as a buggy writer, a manual edit or a future schema might
/// leave in the events table.
fn poison_items() -> Vec<Vec<(&'static str, AttributeValue)>> {
    let s = |v: &str| AttributeValue::S(v.to_owned());
    let n = |v: &str| AttributeValue::N(v.to_owned());
    let far = (chat_shared::now_ms() / 1000 + 86_400).to_string();
    let common = |seq: &str| {
        vec![
            ("pk", s("ROOM#lobby")),
            ("seq", n(seq)),
            ("v", n("1")),
            ("ts", n("1700000000000")),
            ("expiresAt", n(&far)),
            ("connectionId", s("X")),
            ("name", s("mallory")),
        ]
    };
    let with = |seq: &str, extra: Vec<(&'static str, AttributeValue)>| {
        let mut item = common(seq);
        for (k, v) in extra {
            item.retain(|(name, _)| *name != k);
            item.push((k, v));
        }
        item
    };
    vec![
        // Keys only.
        vec![("pk", s("ROOM#lobby")), ("seq", n("100001"))],
        // An unknown type.
        with(
            "100002",
            vec![("type", s("Gibberish")), ("message", s("x"))],
        ),
        // A message without its message.
        with("100003", vec![("type", s("MessagePosted"))]),
        // A version this code does not know.
        with(
            "100004",
            vec![
                ("type", s("MessagePosted")),
                ("v", n("2")),
                ("message", s("from the future")),
            ],
        ),
        // A timestamp of the wrong type.
        with(
            "100005",
            vec![
                ("type", s("MessagePosted")),
                ("ts", s("yesterday")),
                ("message", s("x")),
            ],
        ),
        // A leave with an unknown reason.
        with(
            "100006",
            vec![("type", s("MemberLeft")), ("reason", s("exploded"))],
        ),
        // A private message without its recipient.
        with(
            "100007",
            vec![("type", s("PrivateMessageSent")), ("message", s("x"))],
        ),
        // A name of the wrong type.
        with(
            "100008",
            vec![
                ("type", s("MemberJoined")),
                ("name", AttributeValue::L(vec![s("x")])),
            ],
        ),
    ]
}

async fn put_poison(w: &World) {
    for item in poison_items() {
        let mut put = w.moto.dynamodb().put_item().table_name(&w.tables.events);
        for (k, v) in item {
            put = put.item(k, v);
        }
        put.send().await.expect("put a poison item");
    }
}

#[tokio::test]
async fn poison_records_are_skipped_and_the_stream_keeps_moving() {
    // GIVEN alice and bob, and a batch where eight items that are not chat events sit between
    // real events
    let mut w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    w.fan_out().await;
    w.endpoint.clear();
    w.say("A", "before the poison").await;
    put_poison(&w).await;
    w.say("B", "after the poison").await;
    assert_eq!(
        w.send(
            "A",
            json!({"action":"sendPrivate","to":"bob","message":"still private"})
        )
        .await,
        None
    );
    let event = w.stream.next_lambda_event().await.expect("stream");
    assert_eq!(event.records.len(), 3 + poison_items().len());

    // WHEN the fan-out handles the batch
    let response = w.fan_out_event(event).await;

    // THEN nothing is reported (poison cannot become decodable by retrying) and every real
    // event after the poison was delivered
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(
        w.frames("A"),
        vec![
            json!({"publicMessage":"alice: before the poison"}),
            json!({"publicMessage":"bob: after the poison"}),
        ]
    );
    assert_eq!(
        w.frames("B"),
        vec![
            json!({"publicMessage":"alice: before the poison"}),
            json!({"publicMessage":"bob: after the poison"}),
            json!({"privateMessage":"alice: still private"}),
        ]
    );

    // AND the stream keeps moving: the next batch is delivered as usual
    w.endpoint.clear();
    w.say("B", "later").await;
    let response = w.fan_out().await;
    assert!(response.batch_item_failures.is_empty());
    for id in ["A", "B"] {
        assert_eq!(
            w.frames(id),
            vec![json!({"publicMessage":"bob: later"})],
            "{id}"
        );
    }
}

#[tokio::test]
async fn history_still_answers_with_a_poison_item_in_the_events_table() {
    // GIVEN alice said something, and items that are not chat events sit in the events table
    let w = world().await;
    w.join("A", "alice").await;
    w.say("A", "on the record").await;
    put_poison(&w).await;

    // WHEN anyone asks for the public history
    let reply = w
        .send("A", json!({"action":"history","after":0}))
        .await
        .expect("a history frame");

    // THEN the real events are served and the poison is skipped, as the fan-out skips it
    let frames = reply["history"]["frames"]
        .as_array()
        .unwrap_or_else(|| panic!("history refused: {reply}"));
    let texts: Vec<&str> = frames
        .iter()
        .filter_map(|f| f["publicMessage"].as_str().or(f["systemMessage"].as_str()))
        .collect();
    assert_eq!(texts, ["alice has joined the chat", "alice: on the record"]);
}

#[tokio::test]
async fn forbidden_and_too_large_are_logged_and_counted_not_retried() {
    // GIVEN six members; carol's endpoint answers 403 and dave's 413, for as long as asked
    let mut w = six_members().await;
    w.endpoint.fail_next("C", 403, 5);
    w.endpoint.fail_next("D", 413, 5);

    // WHEN alice posts and the fan-out delivers it
    w.say("A", "hello").await;
    let event = w.stream.next_lambda_event().await.expect("stream");
    let logs = Logs::new();
    let response = logs.capture(w.fan_out_event(event)).await;

    // THEN each of them was tried once and never again, and nothing is reported failed (a
    // retry of the batch could not help)
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(w.endpoint.faults_served(), 2);
    assert!(w.endpoint.frames_for("C").is_empty());
    assert!(w.endpoint.frames_for("D").is_empty());
    for id in ["A", "B", "E", "F"] {
        assert_eq!(
            w.frames(id),
            [json!({"publicMessage": "alice: hello"})],
            "{id}"
        );
    }
    // AND each refusal is logged as a warning naming the connection and the status
    let refused: Vec<(Option<String>, Option<String>)> = logs
        .find(Level::WARN, "frame refused; not retrying")
        .iter()
        .map(|e| {
            (
                e.field("connection_id").map(str::to_owned),
                e.field("error").map(str::to_owned),
            )
        })
        .collect();
    let mut refused = refused;
    refused.sort();
    assert_eq!(
        refused,
        [
            (Some("C".into()), Some("forbidden (403)".into())),
            (Some("D".into()), Some("payload too large (413)".into())),
        ],
        "{:?}",
        logs.all()
    );
    // AND counted in the unit's report: 4 delivered, 2 rejected, nobody pruned
    let fanned: Vec<Vec<Option<String>>> = logs
        .find(Level::INFO, "fanned out")
        .iter()
        .map(|e| {
            ["delivered", "rejected", "pruned"]
                .iter()
                .map(|k| e.field(k).map(str::to_owned))
                .collect()
        })
        .collect();
    assert_eq!(
        fanned,
        [vec![Some("4".into()), Some("2".into()), Some("0".into())]]
    );
    // AND they are still members: a refusal is not a 410
    let now = chat_shared::now_ms();
    for id in ["C", "D"] {
        assert!(
            w.store.connection(id, now).await.expect("read").is_some(),
            "{id}"
        );
    }
}

#[tokio::test]
async fn an_endpoint_that_never_answers_times_out_as_transient_and_is_retried() {
    // GIVEN six members; carol's endpoint will read the next request and never answer it, and
    // so will one for a connection "Z"
    let mut w = six_members().await;
    w.endpoint.stall_next("C", 1);
    w.endpoint.stall_next("Z", 1);
    w.say("A", "anyone there?").await;
    let event = w.stream.next_lambda_event().await.expect("stream");

    // WHEN the fan-out delivers the message, and (at the same time, so the test waits for the
    // SDK's 5 s attempt timeout once) the real `@connections` client posts to "Z"
    let (direct, response) = tokio::join!(
        w.api.post("Z", b"{}"),
        w.fan_out_via(&w.store, &w.api, event, None)
    );

    // THEN the post to "Z" failed with the SDK's attempt timeout, classified as transient
    match &direct {
        Err(DeliveryError::Transient(source)) => {
            let sdk = source
                .downcast_ref::<SdkError<PostToConnectionError>>()
                .unwrap_or_else(|| panic!("not an SDK error: {source:?}"));
            assert!(
                matches!(sdk, SdkError::TimeoutError(_)),
                "not the attempt timeout: {sdk:?}"
            );
        }
        other => panic!("expected a transient timeout, got {other:?}"),
    }
    // AND in the fan-out that timeout was retried: carol got the message, once, and nothing is
    // reported failed
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(w.endpoint.stalls_served(), 2);
    for (id, _) in MEMBERS {
        assert_eq!(
            w.frames(id),
            [json!({"publicMessage": "alice: anyone there?"})],
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_recipient_failing_in_two_rooms_is_owed_each_rooms_frames_and_gets_them_later() {
    // GIVEN alice, bob and carol in lobby, alice and carol also in ops, and carol's endpoint
    // failing every attempt
    let mut w = world().await;
    for (id, name) in &MEMBERS[..3] {
        w.join(id, name).await;
    }
    for id in ["A", "C"] {
        let joined = w.send(id, json!({"action":"join","room":"ops"})).await;
        assert!(joined.is_some_and(|j| j["joined"]["room"] == json!("ops")));
    }
    w.fan_out().await;
    w.endpoint.clear();
    w.endpoint.fail_next("C", 500, 1_000);

    // WHEN alice speaks in ops and bob in lobby, and the fan-out handles the batch
    let said = w
        .send(
            "A",
            json!({"action":"sendPublic","room":"ops","message":"in ops"}),
        )
        .await;
    assert_eq!(said, None);
    w.say("B", "in lobby").await;
    let response = w.fan_out().await;

    // THEN no record fails, carol got nothing yet, the others got their rooms' frames
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert!(w.endpoint.frames_for("C").is_empty());
    let tagged = |f: &Value| (f["room"].clone(), f["publicMessage"].clone());
    let alice: Vec<_> = w.endpoint.frames_for("A").iter().map(tagged).collect();
    assert_eq!(
        alice,
        vec![
            (json!("ops"), json!("alice: in ops")),
            (json!("lobby"), json!("bob: in lobby"))
        ]
    );

    // WHEN her endpoint recovers and the stream brings back what she is owed
    w.endpoint.fail_next("C", 500, 0);
    w.endpoint.clear();
    let response = w.fan_out().await;

    // THEN she gets each room's frame, tagged with its room and that room's id, and nobody
    // else gets anything
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let carol: Vec<_> = w
        .endpoint
        .frames_for("C")
        .iter()
        .map(|f| {
            (
                f["room"].clone(),
                f["id"].clone(),
                f["publicMessage"].clone(),
            )
        })
        .collect();
    let mut carol_sorted = carol.clone();
    carol_sorted.sort_by_key(|(room, _, _)| room.to_string());
    assert_eq!(
        carol_sorted,
        vec![
            (json!("lobby"), json!(4), json!("bob: in lobby")),
            (json!("ops"), json!(3), json!("alice: in ops")),
        ],
        "{carol:?}"
    );
    assert!(w.endpoint.frames_for("A").is_empty());
    assert!(w.endpoint.frames_for("B").is_empty());
}
