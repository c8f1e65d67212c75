//! chat-fanout's real bootstrap (this crate's `main.rs`, built for this machine) behind a
//! Lambda Runtime API: a stream event read from moto in, POSTs to a local `@connections`
//! endpoint out, a partial batch response back — empty when all went out, naming the first
//! record when the invocation's deadline leaves no time — and its stdout (JSON log lines and
//! EMF documents) parsed and checked.

use std::path::Path;
use std::time::Duration;

use chat_tests::runtime_api::{Bootstrap, Outcome};
use chat_tests::{World, WorldConfig};
use serde_json::{json, Value};

#[tokio::test]
async fn the_bootstrap_delivers_a_stream_event_and_answers_with_a_partial_batch_response() {
    // GIVEN alice and bob in lobby and a message from alice, committed to moto
    let mut world = World::new(WorldConfig {
        handler: Default::default(),
        fanout: Default::default(),
    })
    .await
    .expect("moto, tables, stream, @connections");
    world.join("alice", "alice").await;
    world.join("bob", "bob").await;
    world
        .send("alice", json!({"action":"sendPublic","message":"hi"}))
        .await;
    // AND the stream event the mapping would deliver (counter records filtered out)
    let event = world.stream.next_lambda_event().await.expect("stream");
    assert_eq!(event.records.len(), 3, "two joins and the message");
    let first_sequence = event.records[0].change.sequence_number.clone();
    let event = serde_json::to_value(&event).expect("the event as JSON");
    // AND the fan-out's bootstrap behind a Runtime API, pointed at the local @connections
    let mut function = Bootstrap::start(
        Path::new(env!("CARGO_BIN_EXE_chat-fanout")),
        "chat-fanout",
        &[
            ("EVENTS_TABLE", world.tables.events.clone()),
            ("CONNECTIONS_TABLE", world.tables.connections.clone()),
            ("AWS_ENDPOINT_URL_DYNAMODB", world.moto.endpoint()),
            ("CONNECTIONS_ENDPOINT", world.endpoint.url()),
            ("RUST_LOG", "info".into()),
            ("METRICS_NAMESPACE", "ChatBootstrapTest".into()),
        ],
    )
    .await
    .expect("bootstrap starts");
    let init = function
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("init");
    eprintln!("chat-fanout init (start to first poll): {init:?}");

    // WHEN it is invoked with the event and a minute to run
    let (delivered_id, outcome) = function
        .invoke(event.clone(), Duration::from_secs(60))
        .await
        .expect("answered");
    // THEN it answers an empty partial batch response
    match outcome {
        Outcome::Response(r) => assert_eq!(r, json!({"batchItemFailures": []})),
        Outcome::Error(e) => panic!("{e}"),
    }
    // AND both members got the presence list and the message through @connections
    for id in ["alice", "bob"] {
        let frames = world.endpoint.frames_for(id);
        assert!(
            frames.iter().any(|f| f["publicMessage"] == "alice: hi"),
            "{id}: {frames:?}"
        );
        assert!(
            frames
                .iter()
                .any(|f| f["members"] == json!(["alice", "bob"])),
            "{id}: {frames:?}"
        );
    }

    // WHEN the same event comes with a deadline inside the fan-out's safety margin (1.5 s)
    let (late_id, outcome) = function
        .invoke(event, Duration::from_secs(1))
        .await
        .expect("answered");
    // THEN nothing is sent and the first record is handed back for Lambda to retry
    match outcome {
        Outcome::Response(r) => assert_eq!(
            r,
            json!({"batchItemFailures": [{"itemIdentifier": first_sequence}]})
        ),
        Outcome::Error(e) => panic!("{e}"),
    }

    // AND every stdout line is JSON: log lines and EMF documents
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = function.stdout_json().expect("JSON lines");
    let logs: Vec<&Value> = lines.iter().filter(|l| l.get("level").is_some()).collect();
    let docs: Vec<&Value> = lines.iter().filter(|l| l.get("_aws").is_some()).collect();
    assert_eq!(logs.len() + docs.len(), lines.len(), "{lines:#?}");
    // AND the outcome lines name the invocation, the room and the events
    let fanned: Vec<&&Value> = logs
        .iter()
        .filter(|l| l["message"] == "fanned out")
        .collect();
    assert_eq!(fanned.len(), 2, "the joins' run and the message: {logs:#?}");
    for line in &fanned {
        assert_eq!(line["requestId"], delivered_id.as_str());
        assert_eq!(line["room"], "lobby");
    }
    assert_eq!(fanned[1]["event_id"], 3);
    assert_eq!(fanned[1]["delivered"], 2);
    let failed: Vec<&&Value> = logs
        .iter()
        .filter(|l| l["level"] == "WARN" && l["requestId"] == late_id.as_str())
        .collect();
    assert_eq!(failed.len(), 1, "{logs:#?}");
    assert_eq!(failed[0]["event_id"], 1);
    // AND the EMF documents: the room's joins and message, in one batch, go out together
    // (crate::batching): one broadcast of two recipients in the first invocation, one record
    // handed back in the second, one cold start
    let doc = |request_id: &str, metric: &str| -> Vec<Value> {
        docs.iter()
            .filter(|d| d["requestId"] == request_id && d.get(metric).is_some())
            .map(|d| d[metric].clone())
            .collect()
    };
    assert_eq!(doc(&delivered_id, "Deliveries"), [json!(2)], "{docs:#?}");
    assert_eq!(
        doc(&delivered_id, "RecipientsPerEvent"),
        [json!([2.0])],
        "{docs:#?}"
    );
    assert_eq!(doc(&delivered_id, "BatchSize"), [json!([3.0])], "{docs:#?}");
    assert_eq!(
        doc(&late_id, "PartialBatchFailures"),
        [json!(1)],
        "{docs:#?}"
    );
    assert!(doc(&late_id, "Deliveries").is_empty(), "{docs:#?}");
    assert_eq!(doc(&delivered_id, "ColdStarts"), [json!(1)], "{docs:#?}");
}
