//! The harness checked against the real things it stands for: moto's DynamoDB and Streams APIs,
//! and `aws-sdk-apigatewaymanagement` talking to our `@connections` endpoint. If these fail,
//! every integration test built on the harness is suspect.

use std::path::Path;
use std::time::{Duration, Instant};

use aws_lambda_events::event::dynamodb::Event;
use aws_sdk_apigatewaymanagement::config::retry::RetryConfig;
use aws_sdk_apigatewaymanagement::operation::delete_connection::DeleteConnectionError;
use aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, KeySchemaElement, KeyType, Put, ScalarAttributeType,
    StreamSpecification, StreamViewType, TransactWriteItem,
};
use chat_tests::{
    as_ttl_removal, fixture_json, lambda_event_json, unique_name, ConnectionsEndpoint, Moto,
    StreamReader,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// A table shaped like the chat's event log: `pk` S / `seq` N, stream of new images.
async fn create_stream_table(dynamodb: &aws_sdk_dynamodb::Client, name: &str) {
    dynamodb
        .create_table()
        .table_name(name)
        .attribute_definitions(attr("pk", ScalarAttributeType::S))
        .attribute_definitions(attr("seq", ScalarAttributeType::N))
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("seq", KeyType::Range))
        .billing_mode(aws_sdk_dynamodb::types::BillingMode::PayPerRequest)
        .stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewImage)
                .build()
                .expect("stream specification"),
        )
        .send()
        .await
        .expect("CreateTable");
}

fn attr(name: &str, kind: ScalarAttributeType) -> AttributeDefinition {
    AttributeDefinition::builder()
        .attribute_name(name)
        .attribute_type(kind)
        .build()
        .expect("attribute definition")
}

fn key(name: &str, kind: KeyType) -> KeySchemaElement {
    KeySchemaElement::builder()
        .attribute_name(name)
        .key_type(kind)
        .build()
        .expect("key schema element")
}

async fn put_message(dynamodb: &aws_sdk_dynamodb::Client, table: &str, seq: u32, text: &str) {
    dynamodb
        .put_item()
        .table_name(table)
        .item("pk", AttributeValue::S("ROOM#lobby".into()))
        .item("seq", AttributeValue::N(seq.to_string()))
        .item("type", AttributeValue::S("MessagePosted".into()))
        .item("message", AttributeValue::S(text.into()))
        .send()
        .await
        .expect("PutItem");
}

/// The shape of a Lambda stream record: each key with the JSON type of its value, `dynamodb`
/// and `userIdentity` spelled out, images (`Keys`, `NewImage`, `OldImage`) as `"image"` since
/// their attributes are the table's, not the format's. `skip` leaves keys out.
fn shape(record: &Value, skip: &[&str]) -> Value {
    fn kind(key: &str, value: &Value, skip: &[&str]) -> Value {
        match (key, value) {
            ("Keys" | "NewImage" | "OldImage", Value::Object(_)) => json!("image"),
            (_, Value::Object(fields)) => Value::Object(
                fields
                    .iter()
                    .filter(|(k, _)| !skip.contains(&k.as_str()))
                    .map(|(k, v)| (k.clone(), kind(k, v, skip)))
                    .collect(),
            ),
            (_, Value::String(_)) => json!("string"),
            (_, Value::Number(_)) => json!("number"),
            (_, Value::Bool(_)) => json!("bool"),
            (_, Value::Array(_)) => json!("array"),
            (_, Value::Null) => json!("null"),
        }
    }
    kind("", record, skip)
}

fn apigw_client(
    endpoint: &ConnectionsEndpoint,
    retries: RetryConfig,
) -> aws_sdk_apigatewaymanagement::Client {
    let config = aws_sdk_apigatewaymanagement::Config::builder()
        .behavior_version(aws_sdk_apigatewaymanagement::config::BehaviorVersion::latest())
        .endpoint_url(endpoint.url())
        .region(aws_sdk_apigatewaymanagement::config::Region::new(
            "us-east-1",
        ))
        .credentials_provider(chat_tests::moto::test_credentials())
        .retry_config(retries)
        .build();
    aws_sdk_apigatewaymanagement::Client::from_conf(config)
}

#[tokio::test]
async fn moto_starts_and_answers_dynamodb() {
    // GIVEN / WHEN
    let began = Instant::now();
    let moto = Moto::start().await.expect("moto starts");

    // THEN
    eprintln!(
        "moto started in {:?} (wall {:?}) at {}",
        moto.startup_time(),
        began.elapsed(),
        moto.endpoint()
    );
    let tables = moto
        .dynamodb()
        .list_tables()
        .send()
        .await
        .expect("ListTables");
    assert!(tables.table_names().is_empty());
}

#[tokio::test]
async fn stream_reader_returns_moto_records_as_a_lambda_event() {
    // GIVEN a table with a NEW_IMAGE stream and two messages in it
    let moto = Moto::start().await.expect("moto starts");
    let dynamodb = moto.dynamodb();
    let table = unique_name("events");
    create_stream_table(&dynamodb, &table).await;
    put_message(&dynamodb, &table, 1, "hello").await;
    put_message(&dynamodb, &table, 2, "world").await;
    let mut reader = StreamReader::new(&dynamodb, moto.streams(), &table)
        .await
        .expect("stream reader");

    // WHEN
    let began = Instant::now();
    let mut converted = Vec::new();
    while converted.len() < 2 && began.elapsed() < WAIT {
        converted.extend(reader.next_records_json().await.expect("records"));
    }
    let event: Event =
        serde_json::from_value(lambda_event_json(&converted)).expect("a Lambda event");

    // THEN both are INSERTs with keys, new images and increasing sequence numbers
    eprintln!("{}", serde_json::to_string_pretty(&event).expect("json"));
    assert_eq!(event.records.len(), 2);
    // AND each record has exactly the shape of a recorded Lambda event's INSERT, with the same
    // version and source (the harness's converter against AWS's output, not against itself)
    let recorded = fixture_json("dynamodb-stream-insert.json")["Records"][0].clone();
    for record in &converted {
        assert_eq!(shape(record, &[]), shape(&recorded, &[]), "{record}");
        for key in ["eventVersion", "eventSource"] {
            assert_eq!(record[key], recorded[key], "{key}");
        }
        assert_eq!(
            record["dynamodb"]["StreamViewType"],
            recorded["dynamodb"]["StreamViewType"]
        );
    }
    let mut last_sequence = None;
    for (record, (seq, text)) in event.records.iter().zip([("1", "hello"), ("2", "world")]) {
        assert_eq!(record.event_name, "INSERT");
        assert_eq!(record.aws_region, "us-east-1");
        // The stream's ARN as moto's DescribeTable gave it, in AWS's format.
        let arn = record.event_source_arn.as_deref().expect("eventSourceARN");
        assert!(
            arn.starts_with("arn:aws:dynamodb:us-east-1:")
                && arn.contains(&format!(":table/{table}/stream/")),
            "{arn}"
        );
        let keys = serde_json::to_value(&record.change.keys).expect("keys json");
        assert_eq!(
            keys,
            serde_json::json!({"pk": {"S": "ROOM#lobby"}, "seq": {"N": seq}})
        );
        let image = serde_json::to_value(&record.change.new_image).expect("image json");
        assert_eq!(image["message"], serde_json::json!({"S": text}));
        assert_eq!(image["type"], serde_json::json!({"S": "MessagePosted"}));
        assert!(record.change.old_image.is_empty());
        let sequence = record
            .change
            .sequence_number
            .clone()
            .expect("SequenceNumber");
        let sequence: u128 = sequence.parse().expect("numeric SequenceNumber");
        assert!(last_sequence < Some(sequence), "sequence numbers increase");
        last_sequence = Some(sequence);
        assert!(record.change.size_bytes > 0);
        assert!(record.change.approximate_creation_date_time.timestamp() > 1_600_000_000);
    }

    // WHEN read again THEN nothing is returned twice
    let again = reader.next_event().await.expect("second read");
    assert!(
        again.records.is_empty(),
        "no new records: {:?}",
        again.records
    );

    // WHEN an item is deleted THEN a REMOVE record follows
    dynamodb
        .delete_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("ROOM#lobby".into()))
        .key("seq", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("DeleteItem");
    let removed = reader
        .wait_for_records(1, WAIT)
        .await
        .expect("remove record");
    eprintln!("{}", serde_json::to_string_pretty(&removed).expect("json"));
    assert_eq!(removed.records.len(), 1);
    assert_eq!(removed.records[0].event_name, "REMOVE");
    let keys = serde_json::to_value(&removed.records[0].change.keys).expect("keys json");
    assert_eq!(
        keys,
        serde_json::json!({"pk": {"S": "ROOM#lobby"}, "seq": {"N": "1"}})
    );
}

#[tokio::test]
async fn a_real_remove_record_can_be_marked_as_a_ttl_deletion() {
    // GIVEN a message that is put and deleted (moto itself never expires items by TTL)
    let moto = Moto::start().await.expect("moto starts");
    let dynamodb = moto.dynamodb();
    let table = unique_name("ttl");
    create_stream_table(&dynamodb, &table).await;
    put_message(&dynamodb, &table, 7, "old news").await;
    dynamodb
        .delete_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("ROOM#lobby".into()))
        .key("seq", AttributeValue::N("7".into()))
        .send()
        .await
        .expect("DeleteItem");
    let mut reader = StreamReader::new(&dynamodb, moto.streams(), &table)
        .await
        .expect("stream reader");
    let records = reader.next_records_json().await.expect("records");
    assert_eq!(records.len(), 2, "{records:?}");

    // WHEN the REMOVE record is marked as the service's
    let removal = as_ttl_removal(records[1].clone());

    // THEN it is shaped exactly like a recorded TTL deletion delivered by Lambda (leaving out
    // the old image, which the chat's NEW_IMAGE stream does not carry), with the same identity
    let recorded = fixture_json("dynamodb-stream-ttl-remove.json")["Records"][0].clone();
    let without_images = ["OldImage", "NewImage", "StreamViewType"];
    assert_eq!(
        shape(&removal, &without_images),
        shape(&recorded, &without_images),
        "{removal}"
    );
    assert_eq!(removal["eventName"], recorded["eventName"]);
    assert_eq!(removal["userIdentity"], recorded["userIdentity"]);
    assert_eq!(records[1]["dynamodb"]["Keys"]["seq"], json!({"N": "7"}));
    // AND Lambda's event type reads it
    let event: Event = serde_json::from_value(lambda_event_json(&[removal])).expect("event");
    assert_eq!(event.records.len(), 1);
}

#[tokio::test]
async fn moto_transact_write_reports_cancellation_reasons() {
    // GIVEN item seq=2 exists, so a conditional put of it fails
    let moto = Moto::start().await.expect("moto starts");
    let dynamodb = moto.dynamodb();
    let table = unique_name("tx");
    create_stream_table(&dynamodb, &table).await;
    put_message(&dynamodb, &table, 2, "taken").await;
    let conditional_put = |seq: u32| {
        TransactWriteItem::builder()
            .put(
                Put::builder()
                    .table_name(&table)
                    .item("pk", AttributeValue::S("ROOM#lobby".into()))
                    .item("seq", AttributeValue::N(seq.to_string()))
                    .condition_expression("attribute_not_exists(pk)")
                    .build()
                    .expect("put"),
            )
            .build()
    };

    // WHEN a transaction's second action fails its condition
    let err = dynamodb
        .transact_write_items()
        .transact_items(conditional_put(1))
        .transact_items(conditional_put(2))
        .send()
        .await
        .expect_err("transaction is cancelled");

    // THEN the SDK gives TransactionCanceledException with one reason per action
    let err = err.into_service_error();
    eprintln!("{err:?}");
    let aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(cancelled) = err else {
        panic!("expected TransactionCanceledException, got {err:?}");
    };
    let codes: Vec<Option<&str>> = cancelled
        .cancellation_reasons()
        .iter()
        .map(|reason| reason.code())
        .collect();
    assert_eq!(codes, [Some("None"), Some("ConditionalCheckFailed")]);
    // And all or nothing: item 1 was not written.
    let item = dynamodb
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S("ROOM#lobby".into()))
        .key("seq", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("GetItem");
    assert!(item.item().is_none());
}

#[tokio::test]
async fn moto_missing_is_an_instructive_error_not_a_skip() {
    // GIVEN an executable path that does not exist
    let missing = Path::new("/nonexistent/chat-tests/moto_server");

    // WHEN
    let err = Moto::start_with(missing).await.expect_err("no moto there");

    // THEN the message names the path and says what to do
    let message = format!("{err:#}");
    assert!(
        message.contains("/nonexistent/chat-tests/moto_server"),
        "{message}"
    );
    assert!(
        message.contains("run the README's test command, which installs moto into .venv"),
        "{message}"
    );
}

#[test]
fn moto_executable_honours_moto_server_env() {
    // GIVEN / WHEN / THEN: MOTO_SERVER wins, else the workspace .venv
    assert_eq!(
        Moto::executable_from(Some("/opt/moto/bin/moto_server".into())),
        Path::new("/opt/moto/bin/moto_server")
    );
    let default = Moto::executable_from(None);
    assert!(
        default.ends_with("tests/moto-server"),
        "{}",
        default.display()
    );
    assert_eq!(Moto::executable_from(Some("".into())), default);
}

#[tokio::test]
async fn connections_endpoint_records_exact_bytes_from_the_sdk() {
    // GIVEN
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let client = apigw_client(&endpoint, RetryConfig::disabled());
    let frame = br#"{"publicMessage":"alice: hello"}"#;
    // A real-looking id: `=` must survive the SDK's percent-encoding of the path.
    let id = "TWegAcC4EowCHnA=";

    // WHEN
    client
        .post_to_connection()
        .connection_id(id)
        .data(Blob::new(frame.to_vec()))
        .send()
        .await
        .expect("PostToConnection");
    client
        .post_to_connection()
        .connection_id("other")
        .data(Blob::new(b"not json".to_vec()))
        .send()
        .await
        .expect("PostToConnection");

    // THEN
    endpoint.wait_for_posts(2, WAIT).await.expect("two posts");
    assert!(endpoint.unrouted().is_empty(), "{:?}", endpoint.unrouted());
    let raw = endpoint.raw_posts();
    assert_eq!(raw[0].connection_id, id);
    assert_eq!(raw[0].body, frame);
    assert_eq!(
        endpoint.posts(),
        vec![
            (
                id.to_owned(),
                serde_json::json!({"publicMessage": "alice: hello"})
            ),
            ("other".to_owned(), serde_json::json!("not json")),
        ]
    );
    assert_eq!(
        endpoint.frames_for(id),
        [serde_json::json!({"publicMessage": "alice: hello"})]
    );
    assert_eq!(endpoint.post_count(), 2);
    endpoint.clear();
    assert_eq!(endpoint.post_count(), 0);
}

#[tokio::test]
async fn connections_endpoint_gone_is_the_sdks_gone_exception() {
    // GIVEN
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let client = apigw_client(&endpoint, RetryConfig::standard());
    endpoint.mark_gone("closed");

    // WHEN
    let err = client
        .post_to_connection()
        .connection_id("closed")
        .data(Blob::new(b"{}".to_vec()))
        .send()
        .await
        .expect_err("410");

    // THEN not retried, typed, and nothing recorded as delivered
    let err = err.into_service_error();
    assert!(
        matches!(err, PostToConnectionError::GoneException(_)),
        "expected GoneException, got {err:?}"
    );
    assert_eq!(endpoint.gone_hits(), 1);
    assert_eq!(endpoint.post_count(), 0);
}

#[tokio::test]
async fn connections_endpoint_throttles_then_succeeds() {
    // GIVEN one injected 429 and a client that does not retry by itself
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let client = apigw_client(&endpoint, RetryConfig::disabled());
    endpoint.fail_next("busy", 429, 1);
    let post = || {
        client
            .post_to_connection()
            .connection_id("busy")
            .data(Blob::new(b"{\"n\":1}".to_vec()))
            .send()
    };

    // WHEN / THEN first LimitExceededException, then success
    let err = post().await.expect_err("429").into_service_error();
    assert!(
        matches!(err, PostToConnectionError::LimitExceededException(_)),
        "expected LimitExceededException, got {err:?}"
    );
    post().await.expect("second attempt succeeds");
    assert_eq!(endpoint.faults_served(), 1);
    assert_eq!(endpoint.frames_for("busy"), [serde_json::json!({"n": 1})]);
}

#[tokio::test]
async fn sdk_default_retries_absorb_one_throttle() {
    // GIVEN the SDK's standard retry policy and one injected 429
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let client = apigw_client(&endpoint, RetryConfig::standard());
    endpoint.fail_next("busy", 429, 1);

    // WHEN
    client
        .post_to_connection()
        .connection_id("busy")
        .data(Blob::new(b"{}".to_vec()))
        .send()
        .await
        .expect("retried transparently");

    // THEN LimitExceededException is a throttling error the SDK retries by itself
    assert_eq!(endpoint.faults_served(), 1);
    assert_eq!(endpoint.request_count(), 2);
    assert_eq!(endpoint.post_count(), 1);
}

#[tokio::test]
async fn connections_endpoint_get_and_delete() {
    // GIVEN
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    let client = apigw_client(&endpoint, RetryConfig::disabled());

    // WHEN
    let info = client
        .get_connection()
        .connection_id("abc")
        .send()
        .await
        .expect("GetConnection");
    client
        .delete_connection()
        .connection_id("abc")
        .send()
        .await
        .expect("DeleteConnection");

    // THEN the SDK parsed the info, and the deleted connection is gone afterwards
    assert!(info.connected_at().is_some());
    assert!(info.last_active_at().is_some());
    let identity = info.identity().expect("identity");
    assert_eq!(identity.source_ip(), Some("127.0.0.1"));
    assert_eq!(identity.user_agent(), Some("test"));
    assert_eq!(endpoint.deleted(), ["abc"]);
    let err = client
        .delete_connection()
        .connection_id("abc")
        .send()
        .await
        .expect_err("already gone")
        .into_service_error();
    assert!(
        matches!(err, DeleteConnectionError::GoneException(_)),
        "{err:?}"
    );
}

#[tokio::test]
async fn connections_endpoint_delay_and_wrong_stage() {
    // GIVEN a slow endpoint, and a client pointed at the wrong stage
    let endpoint = ConnectionsEndpoint::start("prod").await.expect("endpoint");
    endpoint.set_delay(Duration::from_millis(200));
    let config = aws_sdk_apigatewaymanagement::Config::builder()
        .behavior_version(aws_sdk_apigatewaymanagement::config::BehaviorVersion::latest())
        .endpoint_url(format!("http://{}/dev", endpoint.addr()))
        .region(aws_sdk_apigatewaymanagement::config::Region::new(
            "us-east-1",
        ))
        .credentials_provider(chat_tests::moto::test_credentials())
        .retry_config(RetryConfig::disabled())
        .build();
    let wrong_stage = aws_sdk_apigatewaymanagement::Client::from_conf(config);

    // WHEN
    let began = Instant::now();
    apigw_client(&endpoint, RetryConfig::disabled())
        .post_to_connection()
        .connection_id("slow")
        .data(Blob::new(b"{}".to_vec()))
        .send()
        .await
        .expect("slow post");
    let elapsed = began.elapsed();
    let err = wrong_stage
        .post_to_connection()
        .connection_id("slow")
        .data(Blob::new(b"{}".to_vec()))
        .send()
        .await
        .expect_err("wrong stage")
        .into_service_error();

    // THEN
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(
        matches!(err, PostToConnectionError::ForbiddenException(_)),
        "{err:?}"
    );
    assert_eq!(endpoint.unrouted(), ["POST /dev/@connections/slow"]);
    assert!(endpoint
        .wait_for_posts(2, Duration::from_millis(50))
        .await
        .is_err());
}
