//! Bulk-loads N `MessagePosted` events (ids 1..=N) into an events table on a local DynamoDB API,
//! for measuring `chat-replay export` on large logs. Creates the tables if needed and writes
//! with BatchWriteItem, 25 items per request (the API's maximum), a few requests in flight.
//!
//! ```sh
//! cargo run --release -p chat-replay --example seed -- \
//!     --endpoint http://127.0.0.1:PORT --events-table bench-events --count 100000
//! ```
//!
//! Never point it at AWS: it refuses to run without `--endpoint`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_dynamodb::types::{AttributeValue, PutRequest, WriteRequest};
use aws_sdk_dynamodb::Client;
use chat_shared::config::Tables;
use chat_shared::events::{ChatEvent, EventItem, StoredEvent};
use chat_shared::keys;
use chat_shared::store::dynamodb::create_tables;
use clap::Parser;
use futures::stream::{self, StreamExt, TryStreamExt};

#[derive(Parser)]
struct Args {
    /// A local DynamoDB API (moto, DynamoDB Local).
    #[arg(long)]
    endpoint: String,
    #[arg(long)]
    events_table: String,
    /// Defaults to the events table's name with `-connections`.
    #[arg(long)]
    connections_table: Option<String>,
    #[arg(long)]
    count: u64,
    /// Bytes of message text per event.
    #[arg(long, default_value_t = 100)]
    message_bytes: usize,
    /// BatchWriteItem requests in flight.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
}

const BATCH: u64 = 25;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.endpoint.starts_with("http://127.") && !args.endpoint.starts_with("http://localhost") {
        bail!("--endpoint must be a loopback URL; this tool only seeds local test servers");
    }
    let config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(&args.endpoint)
        .region(Region::new("us-east-1"))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "seed", "seed", None, None, "seed",
        )))
        .build();
    let client = Client::new(&config);
    let tables = Tables {
        events: args.events_table.clone(),
        connections: args
            .connections_table
            .clone()
            .unwrap_or_else(|| format!("{}-connections", args.events_table)),
    };
    create_tables(&client, &tables)
        .await
        .context("creating the tables")?;

    let began = Instant::now();
    let now_ms = chat_shared::now_ms();
    let expires_at = now_ms / 1000 + 30 * 86_400;
    let message = "x".repeat(args.message_bytes);
    let batches = (0..args.count.div_ceil(BATCH)).map(|b| {
        let first = b * BATCH + 1;
        let last = (first + BATCH - 1).min(args.count);
        (first..=last)
            .map(|seq| {
                let stored = StoredEvent {
                    room: keys::DEFAULT_ROOM.to_owned(),
                    seq,
                    // One event per ms, ending now, so time ranges select predictable ids.
                    ts: now_ms - (args.count - seq) as i64,
                    event: ChatEvent::MessagePosted {
                        connection_id: format!("conn-{}", seq % 50),
                        name: format!("user{}", seq % 50),
                        message: message.clone(),
                    },
                };
                serde_dynamo::to_item(EventItem::new(&stored, expires_at)).context("event item")
            })
            .collect::<anyhow::Result<Vec<HashMap<String, AttributeValue>>>>()
    });
    let written = stream::iter(batches)
        .map(|batch| {
            let client = client.clone();
            let table = tables.events.clone();
            async move { write_batch(&client, &table, batch?).await }
        })
        .buffer_unordered(args.in_flight)
        .try_fold(0u64, |total, n| async move {
            let total = total + n;
            if total % 10_000 < BATCH {
                eprintln!("{total} events written");
            }
            Ok(total)
        })
        .await?;
    // The room's counter at the highest id, as the chat would have left it (keys.rs: the
    // events table's item at seq 0).
    client
        .put_item()
        .table_name(&tables.events)
        .item(
            keys::PK,
            AttributeValue::S(keys::room_pk(keys::DEFAULT_ROOM)),
        )
        .item(keys::SEQ, AttributeValue::N(keys::COUNTER_SEQ.to_string()))
        .item(keys::TYPE, AttributeValue::S(keys::COUNTER_TYPE.to_owned()))
        .item(
            keys::COUNTER_LAST,
            AttributeValue::N(args.count.to_string()),
        )
        .send()
        .await
        .context("PutItem counter")?;
    let secs = began.elapsed().as_secs_f64();
    eprintln!(
        "seeded {written} events into {} in {secs:.1} s ({:.0} events/s)",
        tables.events,
        written as f64 / secs
    );
    Ok(())
}

/// Writes one batch, re-sending unprocessed items (throttling) until all are in.
async fn write_batch(
    client: &Client,
    table: &str,
    items: Vec<HashMap<String, AttributeValue>>,
) -> anyhow::Result<u64> {
    let n = items.len() as u64;
    let mut requests = items
        .into_iter()
        .map(|item| {
            Ok(WriteRequest::builder()
                .put_request(PutRequest::builder().set_item(Some(item)).build()?)
                .build())
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for attempt in 0..10u32 {
        let out = client
            .batch_write_item()
            .request_items(table, requests)
            .send()
            .await
            .context("BatchWriteItem")?;
        match out.unprocessed_items.and_then(|mut u| u.remove(table)) {
            Some(rest) if !rest.is_empty() => {
                requests = rest;
                tokio::time::sleep(Duration::from_millis(10 << attempt.min(6))).await;
            }
            _ => return Ok(n),
        }
    }
    bail!("items still unprocessed after 10 attempts")
}
