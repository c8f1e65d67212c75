//! `streams_api::to_lambda_record`, which turns what the DynamoDB Streams API returns into the
//! record Lambda would deliver, checked against the test harness's own, independent conversion
//! (`chat_tests::streams::record_json`, itself checked against a recorded Lambda event) on the
//! records a real DynamoDB API (moto) produces for the chat's own writes and a deletion.

use aws_lambda_events::event::dynamodb::EventRecord;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use chat_local::streams_api::to_lambda_record;
use chat_shared::config::{Retention, Tables};
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::ChatStore;
use chat_shared::validation::validate_name;
use chat_tests::streams::record_json;
use chat_tests::{unique_name, Moto};

/// Every record of the table's stream so far, as the Streams API returns them.
async fn raw_records(moto: &Moto, table: &str) -> (String, Vec<Record>) {
    let arn = moto
        .dynamodb()
        .describe_table()
        .table_name(table)
        .send()
        .await
        .expect("DescribeTable")
        .table()
        .and_then(|t| t.latest_stream_arn())
        .expect("a stream")
        .to_owned();
    let streams = moto.streams();
    let description = streams
        .describe_stream()
        .stream_arn(&arn)
        .send()
        .await
        .expect("DescribeStream")
        .stream_description
        .expect("description");
    let mut records = Vec::new();
    for shard in description.shards() {
        let mut iterator = streams
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(shard.shard_id().expect("shard id"))
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .expect("GetShardIterator")
            .shard_iterator;
        while let Some(current) = iterator.take() {
            let page = streams
                .get_records()
                .shard_iterator(current)
                .send()
                .await
                .expect("GetRecords");
            if page.records().is_empty() {
                break;
            }
            records.extend(page.records().iter().cloned());
            iterator = page.next_shard_iterator;
        }
    }
    (arn, records)
}

#[tokio::test]
async fn stream_records_convert_exactly_as_the_independent_harness_converts_them() {
    // GIVEN the chat's tables on moto, with a join, a rename, a public and a private message, a
    // leave, and an event item deleted (a REMOVE record)
    let moto = Moto::start()
        .await
        .expect("moto must start (run scripts/test)");
    let tables = Tables {
        events: unique_name("events"),
        connections: unique_name("connections"),
    };
    create_tables(&moto.dynamodb(), &tables)
        .await
        .expect("tables");
    let store = DynamoStore::new(moto.dynamodb(), tables.clone(), Retention::default());
    let now = chat_shared::now_ms();
    for (id, name) in [("A", "alice"), ("B", "bob")] {
        store.add_connection(id, now).await.expect("connect");
        store
            .set_name(id, &validate_name(name).expect("name"), now)
            .await
            .expect("join");
    }
    store
        .set_name("A", &validate_name("al").expect("name"), now)
        .await
        .expect("rename");
    store.post_public("A", "hello", now).await.expect("post");
    store
        .post_private("B", "al", "psst", now)
        .await
        .expect("private");
    store
        .remove_connection("B", chat_shared::events::LeaveReason::Disconnected, now)
        .await
        .expect("leave");
    moto.dynamodb()
        .delete_item()
        .table_name(&tables.events)
        .key("pk", AttributeValue::S("ROOM#lobby".into()))
        .key("seq", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("DeleteItem");

    // WHEN each record the Streams API returns is converted by chat-local and by the harness
    let (arn, records) = raw_records(&moto, &tables.events).await;

    // THEN all seven are there, each append after lobby's counter record (INSERT for the
    // first, MODIFY after: layout 2 keeps the counter in the events table), and both
    // conversions give the same Lambda record, counters included
    let names: Vec<&str> = records
        .iter()
        .filter_map(|r| r.event_name().map(|n| n.as_str()))
        .collect();
    let counter = |r: &&aws_sdk_dynamodbstreams::types::Record| {
        r.dynamodb()
            .and_then(|d| d.keys())
            .and_then(|k| k.get("seq"))
            .is_some_and(|seq| seq.as_n().is_ok_and(|n| n == "0"))
    };
    assert_eq!(
        names,
        [
            "INSERT", "INSERT", "MODIFY", "INSERT", "MODIFY", "INSERT", "MODIFY", "INSERT",
            "MODIFY", "INSERT", "MODIFY", "INSERT", "REMOVE"
        ]
    );
    assert_eq!(records.iter().filter(counter).count(), 6);
    assert!(records
        .iter()
        .enumerate()
        .all(|(i, r)| counter(&r) == (i % 2 == 0 && i < 12)));
    for record in &records {
        let ours = to_lambda_record(record, &arn, "us-east-1").expect("chat-local converts");
        let harness: EventRecord = serde_json::from_value(
            record_json(record, &arn, "us-east-1", None).expect("the harness converts"),
        )
        .expect("a Lambda record");
        assert_eq!(ours, harness, "{record:?}");
    }
}
