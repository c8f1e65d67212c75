//! A [`RecordSource`] over the DynamoDB Streams API (`aws-sdk-dynamodbstreams`), for runs
//! against a real DynamoDB API (moto, DynamoDB Local or AWS): it reads the event table's
//! stream shard by shard, parents before children, the way the event source mapping does.
//!
//! Every poll asks for a fresh `AFTER_SEQUENCE_NUMBER` iterator instead of chaining
//! `NextShardIterator`s: the checkpoint is then the only state, a failed batch is re-read by
//! asking again, and it also survives moto replacing a table's stream shard when it cancels a
//! transaction (an old iterator would keep reading the discarded shard).

use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::EventRecord;
use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use aws_sdk_dynamodbstreams::Client;
use chat_shared::stream::{RecordSource, SourceError};
use serde_json::{json, Map, Value};

/// How often an idle stream is polled: Lambda polls each shard about four times a second.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Debug)]
struct Shard {
    id: String,
    /// Records up to and including this sequence number are done.
    checkpoint: Option<String>,
    /// The shard is closed and every record in it is done.
    finished: bool,
}

pub struct StreamsApiSource {
    client: Client,
    stream_arn: String,
    region: String,
    shards: Vec<Shard>,
}

fn read_err(e: impl std::error::Error + Send + Sync + 'static) -> SourceError {
    SourceError::Read(Box::new(e))
}

impl StreamsApiSource {
    /// Positions the source at the end of the stream (`StartingPosition: LATEST`, as in
    /// template.yaml): events written before the local stack started are history, not news.
    pub async fn at_latest(
        client: Client,
        stream_arn: String,
        region: String,
    ) -> Result<Self, SourceError> {
        let mut source = StreamsApiSource {
            client,
            stream_arn,
            region,
            shards: Vec::new(),
        };
        source.discover().await?;
        // Walk to the end once, so the first poll starts after the newest record.
        for i in 0..source.shards.len() {
            loop {
                let records = source.read_shard(i, 1000).await?;
                match records.last() {
                    Some(last) => source.shards[i].checkpoint = last.change.sequence_number.clone(),
                    None => break,
                }
            }
        }
        Ok(source)
    }

    /// Adds shards not seen before, in DescribeStream order (parents first).
    async fn discover(&mut self) -> Result<(), SourceError> {
        let mut start_after: Option<String> = None;
        loop {
            let out = self
                .client
                .describe_stream()
                .stream_arn(&self.stream_arn)
                .set_exclusive_start_shard_id(start_after.take())
                .send()
                .await
                .map_err(|e| match e.as_service_error() {
                    Some(se) if se.is_resource_not_found_exception() => {
                        SourceError::Gone(self.stream_arn.clone())
                    }
                    _ => read_err(e),
                })?;
            let Some(description) = out.stream_description else {
                return Err(SourceError::Gone(self.stream_arn.clone()));
            };
            for shard in description.shards() {
                let Some(id) = shard.shard_id() else { continue };
                if !self.shards.iter().any(|s| s.id == id) {
                    self.shards.push(Shard {
                        id: id.to_owned(),
                        checkpoint: None,
                        finished: false,
                    });
                }
            }
            match description.last_evaluated_shard_id {
                Some(last) => start_after = Some(last),
                None => return Ok(()),
            }
        }
    }

    /// Up to `max` records of shard `i` after its checkpoint; marks the shard finished when it
    /// is closed and nothing is left.
    async fn read_shard(&mut self, i: usize, max: usize) -> Result<Vec<EventRecord>, SourceError> {
        let shard = &self.shards[i];
        let request = self
            .client
            .get_shard_iterator()
            .stream_arn(&self.stream_arn)
            .shard_id(&shard.id);
        let request = match &shard.checkpoint {
            Some(seq) => request
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .sequence_number(seq),
            None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
        };
        let mut iterator = request.send().await.map_err(read_err)?.shard_iterator;
        let mut out = Vec::new();
        while let Some(current) = iterator.take() {
            let limit = i32::try_from(max - out.len())
                .unwrap_or(i32::MAX)
                .clamp(1, 1000);
            let page = self
                .client
                .get_records()
                .shard_iterator(current)
                .limit(limit)
                .send()
                .await
                .map_err(read_err)?;
            let closed = page.next_shard_iterator.is_none();
            for record in page.records() {
                out.push(to_lambda_record(record, &self.stream_arn, &self.region)?);
            }
            if closed && out.is_empty() {
                self.shards[i].finished = true;
            }
            if page.records().is_empty() || out.len() >= max {
                break;
            }
            iterator = page.next_shard_iterator;
        }
        Ok(out)
    }
}

#[async_trait]
impl RecordSource for StreamsApiSource {
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<EventRecord>, SourceError> {
        let deadline = Instant::now() + wait;
        loop {
            self.discover().await?;
            // Per-key order: a child shard is read only once its parent is finished, which
            // DescribeStream's order (parents first) and this first-unfinished rule give.
            if let Some(i) = self.shards.iter().position(|s| !s.finished) {
                let records = self.read_shard(i, max).await?;
                if !records.is_empty() {
                    return Ok(records);
                }
                if self.shards[i].finished {
                    continue;
                }
            }
            if Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(
                POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now())),
            )
            .await;
        }
    }

    fn checkpoint(&mut self, sequence_number: &str) {
        if let Some(shard) = self.shards.iter_mut().find(|s| !s.finished) {
            shard.checkpoint = Some(sequence_number.to_owned());
        }
    }
}

/// A streams-API record in the JSON form Lambda delivers, parsed into the Lambda type.
pub fn to_lambda_record(
    record: &Record,
    stream_arn: &str,
    region: &str,
) -> Result<EventRecord, SourceError> {
    let malformed = |why: String| SourceError::Read(why.into());
    let change = record
        .dynamodb()
        .ok_or_else(|| malformed("stream record without a dynamodb member".into()))?;
    let mut dynamodb = Map::new();
    if let Some(created) = change.approximate_creation_date_time() {
        dynamodb.insert("ApproximateCreationDateTime".into(), json!(created.secs()));
    }
    for (name, image) in [
        ("Keys", change.keys()),
        ("NewImage", change.new_image()),
        ("OldImage", change.old_image()),
    ] {
        if let Some(image) = image {
            let item = serde_dynamo::Item::from(image.clone());
            let value =
                serde_json::to_value(&item).map_err(|e| malformed(format!("{name}: {e}")))?;
            dynamodb.insert(name.into(), value);
        }
    }
    if let Some(seq) = change.sequence_number() {
        dynamodb.insert("SequenceNumber".into(), json!(seq));
    }
    dynamodb.insert("SizeBytes".into(), json!(change.size_bytes().unwrap_or(0)));
    if let Some(view) = change.stream_view_type() {
        dynamodb.insert("StreamViewType".into(), json!(view.as_str()));
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
    out.insert("eventVersion".into(), json!("1.1"));
    out.insert(
        "eventSource".into(),
        json!(record.event_source().unwrap_or("aws:dynamodb")),
    );
    out.insert(
        "awsRegion".into(),
        json!(record.aws_region().unwrap_or(region)),
    );
    out.insert("dynamodb".into(), Value::Object(dynamodb));
    out.insert("eventSourceARN".into(), json!(stream_arn));
    if let Some(identity) = record.user_identity() {
        out.insert(
            "userIdentity".into(),
            json!({"type": identity.r#type().unwrap_or_default(), "principalId": identity.principal_id().unwrap_or_default()}),
        );
    }
    serde_json::from_value(Value::Object(out))
        .map_err(|e| malformed(format!("not a Lambda DynamoDB record: {e}")))
}
