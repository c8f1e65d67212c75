//! Reads a table's real DynamoDB stream (from moto) and turns it into the event a Lambda event
//! source mapping delivers, so fan-out tests are driven by records the database produced.
//!
//! The JSON shape is the one Lambda sends (see the DynamoDB Streams and Lambda chapter of the
//! DynamoDB developer guide, and `example-dynamodb-event.json` in aws-lambda-rust-runtime):
//! `{"Records": [{"eventID", "eventName", "eventVersion", "eventSource": "aws:dynamodb",
//! "awsRegion", "dynamodb": {"ApproximateCreationDateTime": <epoch seconds>, "Keys",
//! "NewImage", "OldImage", "SequenceNumber", "SizeBytes", "StreamViewType"}, "eventSourceARN",
//! "userIdentity"?}]}`. It is built as JSON and then deserialised into
//! [`aws_lambda_events::event::dynamodb::Event`], exactly as the Lambda runtime would.

use std::time::{Duration, Instant};

use std::collections::HashMap;

use anyhow::{bail, Context};
use aws_lambda_events::event::dynamodb::Event;
use aws_sdk_dynamodbstreams::types::{AttributeValue, Record, ShardIteratorType};
use serde_json::{json, Map, Value};

/// DynamoDB Streams (and so Lambda) report event version 1.1; moto says "1.0", which we do not
/// pass on so that tests see what production sees.
const EVENT_VERSION: &str = "1.1";

/// How often [`StreamReader::wait_for_records`] polls; Lambda itself polls about 4 times a
/// second, so tests are not slower than production here.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug)]
struct ShardCursor {
    shard_id: String,
    /// The last sequence number returned; reading resumes after it.
    last_sequence: Option<String>,
    /// Set once the shard is closed and fully read.
    closed: bool,
}

/// Reads every record of one table's latest stream exactly once, across all its shards.
#[derive(Debug)]
pub struct StreamReader {
    streams: aws_sdk_dynamodbstreams::Client,
    stream_arn: String,
    stream_view_type: Option<String>,
    region: String,
    shards: Vec<ShardCursor>,
}

impl StreamReader {
    /// Finds the table's latest stream and positions a reader at the start (TRIM_HORIZON) of
    /// each of its shards.
    pub async fn new(
        dynamodb: &aws_sdk_dynamodb::Client,
        streams: aws_sdk_dynamodbstreams::Client,
        table: &str,
    ) -> anyhow::Result<Self> {
        let described = dynamodb
            .describe_table()
            .table_name(table)
            .send()
            .await
            .with_context(|| format!("DescribeTable {table}"))?;
        let stream_arn = described
            .table()
            .and_then(|t| t.latest_stream_arn())
            .with_context(|| format!("table {table} has no stream (StreamSpecification)"))?
            .to_owned();
        let region = streams
            .config()
            .region()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "us-east-1".to_owned());
        let mut reader = StreamReader {
            streams,
            stream_arn,
            stream_view_type: None,
            region,
            shards: Vec::new(),
        };
        reader.discover_shards().await?;
        Ok(reader)
    }

    /// The stream's ARN (the `eventSourceARN` of every record).
    pub fn stream_arn(&self) -> &str {
        &self.stream_arn
    }

    /// Adds a TRIM_HORIZON cursor for every shard not seen before (parents come first in
    /// DescribeStream, so per-key order is kept).
    async fn discover_shards(&mut self) -> anyhow::Result<()> {
        let mut start_after: Option<String> = None;
        loop {
            let page = self
                .streams
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start_after.clone())
                .send()
                .await
                .with_context(|| format!("DescribeStream {}", self.stream_arn))?;
            let Some(description) = page.stream_description() else {
                bail!("DescribeStream {} returned no description", self.stream_arn);
            };
            if self.stream_view_type.is_none() {
                self.stream_view_type = description
                    .stream_view_type()
                    .map(|v| v.as_str().to_owned());
            }
            for shard in description.shards() {
                let Some(shard_id) = shard.shard_id() else {
                    continue;
                };
                if self.shards.iter().any(|c| c.shard_id == shard_id) {
                    continue;
                }
                self.shards.push(ShardCursor {
                    shard_id: shard_id.to_owned(),
                    last_sequence: None,
                    closed: false,
                });
            }
            match description.last_evaluated_shard_id() {
                Some(last) => start_after = Some(last.to_owned()),
                None => return Ok(()),
            }
        }
    }

    /// Every record not returned before, as the Lambda record JSON, shard by shard in order.
    pub async fn next_records_json(&mut self) -> anyhow::Result<Vec<Value>> {
        self.discover_shards().await?;
        let mut records = Vec::new();
        for cursor in self.shards.iter_mut().filter(|c| !c.closed) {
            // A fresh iterator on every call, positioned after the last record returned, rather
            // than the previous NextShardIterator: moto swaps in a copy of the table (and its
            // stream shard) when it cancels a transaction, and an old iterator keeps reading the
            // discarded shard. Fresh iterators always read the table's current shard.
            let request = self
                .streams
                .get_shard_iterator()
                .stream_arn(&self.stream_arn)
                .shard_id(&cursor.shard_id);
            let request = match &cursor.last_sequence {
                Some(seq) => request
                    .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                    .sequence_number(seq),
                None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            };
            let mut iterator = request
                .send()
                .await
                .with_context(|| format!("GetShardIterator {}", cursor.shard_id))?
                .shard_iterator()
                .map(str::to_owned);
            // A GetRecords page may stop early; read until a page comes back empty.
            while let Some(current) = iterator.take() {
                let page = self
                    .streams
                    .get_records()
                    .shard_iterator(current)
                    .send()
                    .await
                    .with_context(|| format!("GetRecords on shard {}", cursor.shard_id))?;
                iterator = page.next_shard_iterator().map(str::to_owned);
                if iterator.is_none() {
                    cursor.closed = true;
                }
                if page.records().is_empty() {
                    break;
                }
                for record in page.records() {
                    if let Some(seq) = record.dynamodb().and_then(|d| d.sequence_number()) {
                        cursor.last_sequence = Some(seq.to_owned());
                    }
                    records.push(record_json(
                        record,
                        &self.stream_arn,
                        &self.region,
                        self.stream_view_type.as_deref(),
                    )?);
                }
            }
        }
        Ok(records)
    }

    /// Every record not returned before, as the Lambda event (possibly with no records).
    pub async fn next_event(&mut self) -> anyhow::Result<Event> {
        let records = self.next_records_json().await?;
        to_event(&records)
    }

    /// [`StreamReader::next_event`] as the fan-out's event source mapping delivers it: without
    /// the records template.yaml's `FilterCriteria` drops (the rooms' counter records).
    pub async fn next_lambda_event(&mut self) -> anyhow::Result<Event> {
        let mut event = self.next_event().await?;
        event
            .records
            .retain(chat_shared::stream::passes_template_filter);
        Ok(event)
    }

    /// Polls until at least `min` new records arrived (all of them are returned in one event),
    /// or fails after `timeout`.
    pub async fn wait_for_records(
        &mut self,
        min: usize,
        timeout: Duration,
    ) -> anyhow::Result<Event> {
        let deadline = Instant::now() + timeout;
        let mut records = Vec::new();
        loop {
            records.extend(self.next_records_json().await?);
            if records.len() >= min {
                return to_event(&records);
            }
            if Instant::now() >= deadline {
                bail!(
                    "expected at least {min} stream records within {timeout:?}, got {}: {}",
                    records.len(),
                    Value::Array(records)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Moto never expires items by TTL, so a test that needs a TTL deletion deletes the item
/// itself and marks the resulting REMOVE record the way AWS marks TTL deletions: as done by
/// the DynamoDB service (see "DynamoDB Streams and Time to Live" in the developer guide).
pub fn as_ttl_removal(mut record: Value) -> Value {
    if let Some(fields) = record.as_object_mut() {
        fields.insert(
            "userIdentity".into(),
            json!({"type": "Service", "principalId": "dynamodb.amazonaws.com"}),
        );
    }
    record
}

/// `{"Records": records}`: the Lambda event around already converted records.
pub fn lambda_event_json(records: &[Value]) -> Value {
    json!({ "Records": records })
}

fn to_event(records: &[Value]) -> anyhow::Result<Event> {
    let event = lambda_event_json(records);
    serde_json::from_value(event.clone())
        .with_context(|| format!("the Lambda DynamoDB event does not parse: {event}"))
}

/// One stream record in Lambda's JSON form, converted by the harness itself — deliberately not
/// by `chat_local::streams_api::to_lambda_record`, which is code under test: a bug there must
/// not be able to hide in the records every fan-out test is driven by. `tests/harness_selftest.rs`
/// checks this conversion against a recorded Lambda event (`tests/fixtures/`), and
/// `local/tests/streams_api.rs` checks chat-local's against this one.
pub fn record_json(
    record: &Record,
    stream_arn: &str,
    default_region: &str,
    default_view_type: Option<&str>,
) -> anyhow::Result<Value> {
    let change = record
        .dynamodb()
        .context("stream record without a `dynamodb` member")?;
    let mut dynamodb = Map::new();
    if let Some(created) = change.approximate_creation_date_time() {
        // Lambda sends whole epoch seconds here.
        dynamodb.insert("ApproximateCreationDateTime".into(), json!(created.secs()));
    }
    for (name, image) in [
        ("Keys", change.keys()),
        ("NewImage", change.new_image()),
        ("OldImage", change.old_image()),
    ] {
        if let Some(image) = image {
            dynamodb.insert(name.into(), item_json(image)?);
        }
    }
    if let Some(sequence) = change.sequence_number() {
        dynamodb.insert("SequenceNumber".into(), json!(sequence));
    }
    dynamodb.insert("SizeBytes".into(), json!(change.size_bytes().unwrap_or(0)));
    let view_type = change
        .stream_view_type()
        .map(|v| v.as_str().to_owned())
        .or_else(|| default_view_type.map(str::to_owned));
    if let Some(view_type) = view_type {
        dynamodb.insert("StreamViewType".into(), json!(view_type));
    }

    let mut out = Map::new();
    out.insert(
        "eventID".into(),
        json!(record.event_id().unwrap_or_default()),
    );
    out.insert(
        "eventName".into(),
        json!(record.event_name().map(|n| n.as_str()).unwrap_or_default()),
    );
    out.insert("eventVersion".into(), json!(EVENT_VERSION));
    out.insert(
        "eventSource".into(),
        json!(record.event_source().unwrap_or("aws:dynamodb")),
    );
    out.insert(
        "awsRegion".into(),
        json!(record.aws_region().unwrap_or(default_region)),
    );
    out.insert("dynamodb".into(), Value::Object(dynamodb));
    out.insert("eventSourceARN".into(), json!(stream_arn));
    if let Some(identity) = record.user_identity() {
        out.insert(
            "userIdentity".into(),
            json!({
                "type": identity.r#type().unwrap_or_default(),
                "principalId": identity.principal_id().unwrap_or_default(),
            }),
        );
    }
    Ok(Value::Object(out))
}

/// A streams-SDK item as DynamoDB JSON (`{"name": {"S": "..."}}`), via serde_dynamo.
pub fn item_json(item: &HashMap<String, AttributeValue>) -> anyhow::Result<Value> {
    let item = serde_dynamo::Item::from(item.clone());
    serde_json::to_value(&item).context("serialising a stream image")
}
