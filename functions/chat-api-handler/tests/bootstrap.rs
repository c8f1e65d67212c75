//! chat-api-handler's real bootstrap (this crate's `main.rs`, the binary `sam build`
//! packages, built for this machine) behind a Lambda Runtime API, against moto: fixture events
//! in, a `sendPublic` committed to DynamoDB, and its stdout — JSON log lines and EMF documents,
//! what CloudWatch would get — parsed and checked.

use std::path::Path;
use std::time::Duration;

use chat_shared::events::ChatEvent;
use chat_shared::fanout::decode_record;
use chat_tests::runtime_api::{Bootstrap, Outcome};
use chat_tests::{fixture_json, World, WorldConfig};
use serde_json::{json, Value};

const BODY: &str = "hello from the real bootstrap";

/// A fixture event as API Gateway sends it, for `connection_id`.
fn event(fixture: &str, connection_id: &str, body: Option<Value>) -> Value {
    let mut v = fixture_json(fixture);
    v["requestContext"]["connectionId"] = json!(connection_id);
    if let Some(body) = body {
        v["body"] = json!(body.to_string());
    }
    v
}

#[tokio::test]
async fn the_bootstrap_commits_a_message_to_dynamodb_and_prints_json_logs_and_emf() {
    // GIVEN moto with fresh tables, and the handler's bootstrap behind a Runtime API with the
    // environment template.yaml gives it (LogFormat JSON sets AWS_LAMBDA_LOG_FORMAT)
    let mut world = World::new(WorldConfig {
        handler: Default::default(),
        fanout: Default::default(),
    })
    .await
    .expect("moto, tables, stream");
    let mut function = Bootstrap::start(
        Path::new(env!("CARGO_BIN_EXE_chat-api-handler")),
        "chat-api-handler",
        &[
            ("EVENTS_TABLE", world.tables.events.clone()),
            ("CONNECTIONS_TABLE", world.tables.connections.clone()),
            ("AWS_ENDPOINT_URL_DYNAMODB", world.moto.endpoint()),
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
    eprintln!("chat-api-handler init (start to first poll): {init:?}");

    // WHEN the fixture events $connect, setName and sendPublic are invoked
    let mut ids = Vec::new();
    for e in [
        event("apigw-websocket-connect.json", "conn-a", None),
        event(
            "apigw-websocket-setname.json",
            "conn-a",
            Some(json!({"action":"setName","name":"alice"})),
        ),
        event(
            "apigw-websocket-sendpublic.json",
            "conn-a",
            Some(json!({"action":"sendPublic","message":BODY})),
        ),
    ] {
        let (id, outcome) = function
            .invoke(e, Duration::from_secs(10))
            .await
            .expect("answered");
        // THEN each is answered 200, with no error frame
        match outcome {
            Outcome::Response(r) => {
                assert_eq!(r["statusCode"], 200, "{r}");
                assert!(r["body"].is_null(), "{r}");
            }
            Outcome::Error(e) => panic!("{e}"),
        }
        ids.push(id);
    }
    let send_id = &ids[2];

    // AND the message is committed: its event is on the table's stream in moto
    let stream = world.stream.next_event().await.expect("stream");
    let posted: Vec<u64> = stream
        .records
        .iter()
        .filter_map(|r| decode_record(r).ok())
        .filter(|e| matches!(&e.event, ChatEvent::MessagePosted { message, .. } if message == BODY))
        .map(|e| e.seq)
        .collect();
    assert_eq!(posted.len(), 1, "{:?}", stream.records);
    let event_id = posted[0];

    // AND every stdout line is JSON: log lines and EMF documents
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = function.stdout_json().expect("JSON lines");
    let logs: Vec<&Value> = lines.iter().filter(|l| l.get("level").is_some()).collect();
    let docs: Vec<&Value> = lines.iter().filter(|l| l.get("_aws").is_some()).collect();
    assert_eq!(logs.len() + docs.len(), lines.len(), "{lines:#?}");
    // AND the commit line names the invocation, the route, the connection, the room and the id
    let stored: Vec<&&Value> = logs
        .iter()
        .filter(|l| l["message"] == "public message stored")
        .collect();
    assert_eq!(stored.len(), 1, "{logs:#?}");
    assert_eq!(stored[0]["requestId"], send_id.as_str());
    assert_eq!(stored[0]["route"], "sendPublic");
    assert_eq!(stored[0]["connection_id"], "conn-a");
    assert_eq!(stored[0]["room"], "lobby");
    assert_eq!(stored[0]["event_id"], event_id);
    // AND the EMF documents count the request by route and outcome, for that invocation
    let namespace = |d: &Value| d["_aws"]["CloudWatchMetrics"][0]["Namespace"].clone();
    assert!(
        docs.iter().all(|d| namespace(d) == "ChatBootstrapTest"),
        "{docs:#?}"
    );
    let sent: Vec<&&Value> = docs
        .iter()
        .filter(|d| d["Route"] == "sendPublic" && d["Outcome"] == "ok")
        .collect();
    assert_eq!(sent.len(), 1, "{docs:#?}");
    assert_eq!(sent[0]["HandlerRequests"], 1);
    assert_eq!(sent[0]["requestId"], send_id.as_str());
    // AND one cold start, in the first invocation's documents
    let cold: Vec<&&Value> = docs
        .iter()
        .filter(|d| d.get("ColdStarts").is_some())
        .collect();
    assert_eq!(cold.len(), 1, "{docs:#?}");
    assert_eq!(cold[0]["Function"], "chat-api-handler");
    assert_eq!(cold[0]["requestId"], ids[0].as_str());
    // AND the message body is nowhere in the output (info level)
    assert!(
        function.stdout().iter().all(|l| !l.contains(BODY)),
        "{lines:#?}"
    );
}
