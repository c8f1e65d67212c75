//! Every fixture parses into the `aws_lambda_events` type the Lambdas receive, survives a
//! serialise/parse roundtrip unchanged, and carries the fields the chat relies on; the stream
//! fixtures also go through the fan-out, as Lambda would hand them to chat-fanout.

use aws_lambda_events::event::apigw::ApiGatewayWebsocketProxyRequest;
use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use aws_sdk_dynamodb::config::SharedCredentialsProvider;
use chat_shared::config::{FanoutConfig, Retention};
use chat_shared::delivery::ManagementApi;
use chat_shared::fanout::handle_stream_event;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::ChatStore;
use chat_shared::validation::validate_name;
use chat_tests::fixtures::fixture_path;
use chat_tests::logs::Logs;
use chat_tests::moto::test_credentials;
use chat_tests::{fixture, fixture_as, fixture_json, ConnectionsEndpoint};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tracing::Level;

const WEBSOCKET_FIXTURES: [&str; 6] = [
    "apigw-websocket-connect.json",
    "apigw-websocket-setname.json",
    "apigw-websocket-sendpublic.json",
    "apigw-websocket-sendprivate.json",
    "apigw-websocket-default.json",
    "apigw-websocket-disconnect.json",
];

const DYNAMODB_FIXTURES: [&str; 3] = [
    "dynamodb-stream-insert.json",
    "dynamodb-stream-ttl-remove.json",
    // Roundtripped and driven through the fan-out by `tests/ttl_expiry.rs`.
    "dynamodb-stream-ttl-remove-connection.json",
];

/// Parses a fixture, serialises it, parses that again, and checks nothing was lost.
fn roundtrip<T>(name: &str) -> T
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    let parsed: T = serde_json::from_str(&fixture(name)).expect("fixture parses");
    let written = serde_json::to_string(&parsed).expect("serialises");
    let reparsed: T = serde_json::from_str(&written).expect("serialised form parses");
    assert_eq!(parsed, reparsed, "{name} changed in a roundtrip");
    parsed
}

fn websocket(name: &str) -> ApiGatewayWebsocketProxyRequest {
    roundtrip(name)
}

#[test]
fn every_fixture_file_is_covered() {
    // GIVEN the fixture directory
    let dir = fixture_path("");

    // WHEN listing its JSON files
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("fixtures dir")
        .map(|entry| {
            entry
                .expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".json"))
        .collect();
    names.sort();

    // THEN each one is roundtripped by this file
    let mut covered: Vec<String> = WEBSOCKET_FIXTURES
        .iter()
        .chain(DYNAMODB_FIXTURES.iter())
        .map(|name| name.to_string())
        .collect();
    covered.sort();
    assert_eq!(names, covered);
}

#[test]
fn websocket_fixtures_roundtrip() {
    for name in WEBSOCKET_FIXTURES {
        // GIVEN / WHEN
        let event = websocket(name);

        // THEN every event has the context the handler uses
        let context = &event.request_context;
        assert_eq!(
            context.connection_id.as_deref(),
            Some("CfGLwe_CtjMCIdA="),
            "{name}"
        );
        assert_eq!(
            context.domain_name.as_deref(),
            Some("abc123.execute-api.us-east-1.amazonaws.com"),
            "{name}"
        );
        assert_eq!(context.stage.as_deref(), Some("prod"), "{name}");
        assert_eq!(context.apiid.as_deref(), Some("abc123"), "{name}");
        assert_eq!(context.connected_at, 1_732_636_801_185, "{name}");
        assert!(context.request_time_epoch >= context.connected_at, "{name}");
        assert_eq!(
            context.identity.source_ip.as_deref(),
            Some("203.0.113.25"),
            "{name}"
        );
        assert_eq!(context.message_direction.as_deref(), Some("IN"), "{name}");
    }
}

#[test]
fn connect_fixture_has_handshake_headers_and_query() {
    // GIVEN / WHEN
    let event = websocket("apigw-websocket-connect.json");

    // THEN
    let context = &event.request_context;
    assert_eq!(context.route_key.as_deref(), Some("$connect"));
    assert_eq!(context.event_type.as_deref(), Some("CONNECT"));
    assert_eq!(context.message_id, None);
    assert_eq!(event.body, None);
    assert_eq!(
        event
            .headers
            .get("Sec-WebSocket-Key")
            .and_then(|v| v.to_str().ok()),
        Some("X/MA+DSRXZ8WnITjBpxm3g==")
    );
    assert_eq!(
        event.headers.get("host").and_then(|v| v.to_str().ok()),
        Some("abc123.execute-api.us-east-1.amazonaws.com")
    );
    assert_eq!(event.query_string_parameters.first("room"), Some("lobby"));
}

#[test]
fn message_fixtures_carry_the_client_frames() {
    let cases = [
        (
            "apigw-websocket-setname.json",
            "setName",
            serde_json::json!({"action": "setName", "name": "alice"}),
        ),
        (
            "apigw-websocket-sendpublic.json",
            "sendPublic",
            serde_json::json!({"action": "sendPublic", "message": "hello everyone"}),
        ),
        (
            "apigw-websocket-sendprivate.json",
            "sendPrivate",
            serde_json::json!({"action": "sendPrivate", "to": "bob", "message": "psst"}),
        ),
    ];
    for (name, route, frame) in cases {
        // GIVEN / WHEN
        let event = websocket(name);

        // THEN the route is the action and the body is that frame, as a JSON string
        let context = &event.request_context;
        assert_eq!(context.route_key.as_deref(), Some(route), "{name}");
        assert_eq!(context.event_type.as_deref(), Some("MESSAGE"), "{name}");
        assert!(context.message_id.is_some(), "{name}");
        let body: serde_json::Value =
            serde_json::from_str(event.body.as_deref().expect("body")).expect("JSON body");
        assert_eq!(body, frame, "{name}");
        assert!(!event.is_base64_encoded, "{name}");
    }
}

#[test]
fn default_fixture_has_a_body_that_is_not_json() {
    // GIVEN / WHEN
    let event = websocket("apigw-websocket-default.json");

    // THEN
    assert_eq!(event.request_context.route_key.as_deref(), Some("$default"));
    assert_eq!(event.request_context.event_type.as_deref(), Some("MESSAGE"));
    let body = event.body.expect("body");
    assert_eq!(body, "hello");
    assert!(serde_json::from_str::<serde_json::Value>(&body).is_err());
}

#[test]
fn disconnect_fixture_has_status_and_reason() {
    // GIVEN / WHEN
    let event = websocket("apigw-websocket-disconnect.json");

    // THEN
    let context = &event.request_context;
    assert_eq!(context.route_key.as_deref(), Some("$disconnect"));
    assert_eq!(context.event_type.as_deref(), Some("DISCONNECT"));
    assert_eq!(context.disconnect_status_code, Some(1001));
    assert_eq!(context.disconnect_reason.as_deref(), Some("Going away"));
    assert_eq!(event.body, None);
}

#[test]
fn dynamodb_insert_fixture_roundtrips() {
    // GIVEN / WHEN
    let event: Event = roundtrip("dynamodb-stream-insert.json");

    // THEN two INSERTs of MessagePosted items in this schema, not from TTL
    assert_eq!(event.records.len(), 2);
    let first = &event.records[0];
    assert_eq!(first.event_name, "INSERT");
    assert_eq!(first.event_source.as_deref(), Some("aws:dynamodb"));
    assert_eq!(
        first.change.sequence_number.as_deref(),
        Some("4421584500000000017450439091")
    );
    assert!(first.user_identity.is_none());
    let image = serde_json::to_value(&first.change.new_image).expect("image json");
    assert_eq!(
        image,
        serde_json::json!({
            "pk": {"S": "ROOM#lobby"},
            "seq": {"N": "1"},
            "type": {"S": "MessagePosted"},
            "v": {"N": "1"},
            "ts": {"N": "1732636803250"},
            "expiresAt": {"N": "1732723203"},
            "connectionId": {"S": "CfGLwe_CtjMCIdA="},
            "name": {"S": "alice"},
            "message": {"S": "hello everyone"}
        })
    );
    assert_eq!(
        first.change.approximate_creation_date_time.timestamp(),
        1_732_636_803
    );
    let raw = fixture_json("dynamodb-stream-insert.json");
    assert_eq!(raw["Records"][1]["dynamodb"]["Keys"]["seq"]["N"], "2");
}

#[test]
fn dynamodb_ttl_remove_fixture_roundtrips() {
    // GIVEN / WHEN
    let event: Event = roundtrip("dynamodb-stream-ttl-remove.json");

    // THEN one REMOVE by the DynamoDB service (a TTL expiry), with the expired item
    assert_eq!(event.records.len(), 1);
    let record = &event.records[0];
    assert_eq!(record.event_name, "REMOVE");
    let identity = record.user_identity.as_ref().expect("userIdentity");
    assert_eq!(identity.type_, "Service");
    assert_eq!(identity.principal_id, "dynamodb.amazonaws.com");
    assert_eq!(
        record.change.sequence_number.as_deref(),
        Some("4421599800000000017450512877")
    );
    assert!(record.change.new_image.is_empty());
    let old = serde_json::to_value(&record.change.old_image).expect("old image json");
    assert_eq!(old["type"], serde_json::json!({"S": "MessagePosted"}));
}

// ---------------------------------------------------------------------------------------------
// The stream fixtures through the fan-out: what Lambda would hand chat-fanout, delivered through
// the real `@connections` client to a real HTTP endpoint.

/// Alice (`A`) and bob (`B`) are members, carol (`C`) is connected without a name.
async fn room() -> EmbeddedStore {
    let store = EmbeddedStore::new(Retention::default());
    let now = chat_shared::now_ms();
    for (id, name) in [("A", Some("alice")), ("B", Some("bob")), ("C", None)] {
        store.add_connection(id, now).await.expect("connect");
        if let Some(name) = name {
            store
                .set_name(id, &validate_name(name).expect("name"), now)
                .await
                .expect("join");
        }
    }
    store
}

fn management_api(endpoint: &ConnectionsEndpoint) -> ManagementApi {
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(test_credentials()))
        .build();
    ManagementApi::new(&sdk, &endpoint.url())
}

/// Runs the fan-out on `event` with `store`, capturing what it logs.
async fn fan_out(
    store: &EmbeddedStore,
    endpoint: &ConnectionsEndpoint,
    event: Event,
) -> (DynamoDbEventResponse, Logs) {
    let api = management_api(endpoint);
    let logs = Logs::new();
    let response = logs
        .capture(handle_stream_event(
            store,
            &api,
            &FanoutConfig::default(),
            event,
            chat_shared::now_ms,
            None,
        ))
        .await;
    (response, logs)
}

#[tokio::test]
async fn the_insert_fixture_reaches_every_member_through_the_fanout() {
    // GIVEN alice and bob are members, carol has no name
    let store = room().await;
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");

    // WHEN the fan-out handles the recorded INSERT event (two MessagePosted items)
    let event: Event = fixture_as("dynamodb-stream-insert.json");
    let (response, logs) = fan_out(&store, &endpoint, event).await;

    // THEN every member got both messages, in stream order, framed with the items' ids and
    // commit times; carol got nothing; nothing failed or was worth a warning
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let expected = [
        json!({"publicMessage": "alice: hello everyone", "room": "lobby", "id": 1, "ts": 1_732_636_803_250_i64}),
        json!({"publicMessage": "bob: hi alice", "room": "lobby", "id": 2, "ts": 1_732_636_804_370_i64}),
    ];
    assert_eq!(endpoint.frames_for("A"), expected);
    assert_eq!(endpoint.frames_for("B"), expected);
    assert!(endpoint.frames_for("C").is_empty());
    assert_eq!(endpoint.post_count(), 4);
    assert!(
        logs.at_least(Level::WARN).is_empty(),
        "{:?}",
        logs.at_least(Level::WARN)
    );
}

#[tokio::test]
async fn the_ttl_remove_fixture_is_skipped_without_a_warning() {
    // GIVEN alice and bob are members
    let store = room().await;
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");

    // WHEN the fan-out handles the recorded TTL deletion
    let event: Event = fixture_as("dynamodb-stream-ttl-remove.json");
    let (response, logs) = fan_out(&store, &endpoint, event).await;

    // THEN nothing is sent, nothing is reported failed, and it is an expected skip: no warning
    // or error (a TTL expiry is routine), only the debug line of a skipped removal
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    assert_eq!(endpoint.request_count(), 0);
    assert!(
        logs.at_least(Level::WARN).is_empty(),
        "{:?}",
        logs.at_least(Level::WARN)
    );
    assert_eq!(
        logs.find(Level::DEBUG, "skipping a removal").len(),
        1,
        "{:?}",
        logs.all()
    );
}

#[tokio::test]
async fn a_remove_that_is_not_a_ttl_deletion_is_skipped_with_a_warning() {
    // GIVEN alice and bob are members, and the recorded TTL deletion turned into deletions
    // someone made: without `userIdentity` (DeleteItem by a user or a script), and with a
    // user's principal
    let store = room().await;
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let ttl = fixture_json("dynamodb-stream-ttl-remove.json");
    let mut by_user = ttl["Records"][0].clone();
    by_user
        .as_object_mut()
        .expect("record")
        .remove("userIdentity");
    let mut by_principal = ttl["Records"][0].clone();
    by_principal["userIdentity"] = json!({"type": "", "principalId": "AIDAEXAMPLEUSER"});
    by_principal["dynamodb"]["SequenceNumber"] = json!("4421599800000000017450512878");
    // Between two real INSERTs, so the order of what is delivered can be checked too.
    let inserts = fixture_json("dynamodb-stream-insert.json");
    let records = json!([
        inserts["Records"][0],
        by_user,
        by_principal,
        inserts["Records"][1]
    ]);
    let event: Event = serde_json::from_value(json!({ "Records": records })).expect("event");

    // WHEN the fan-out handles the batch
    let (response, logs) = fan_out(&store, &endpoint, event).await;

    // THEN both deletions are skipped (there is nothing to deliver, and retrying cannot help):
    // nothing is reported failed, the messages around them are delivered in order
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let texts: Vec<Value> = endpoint
        .frames_for("A")
        .iter()
        .map(|f| f["publicMessage"].clone())
        .collect();
    assert_eq!(
        texts,
        [json!("alice: hello everyone"), json!("bob: hi alice")]
    );
    // AND each is logged as a warning (history lost an event), never as a poison record
    let warned = logs.find(
        Level::WARN,
        "an event item was deleted, not by TTL expiry; skipping its REMOVE record",
    );
    let sequence_numbers: Vec<Option<&str>> =
        warned.iter().map(|e| e.field("sequence_number")).collect();
    assert_eq!(
        sequence_numbers,
        [
            Some("Some(\"4421599800000000017450512877\")"),
            Some("Some(\"4421599800000000017450512878\")")
        ],
        "{:?}",
        logs.all()
    );
    assert!(
        logs.at_least(Level::ERROR).is_empty(),
        "{:?}",
        logs.at_least(Level::ERROR)
    );
}
