//! `chat-bench cost`: what scripted scenarios would cost on AWS, from the local stack's bill
//! meter ([`chat_local::bill`]), each with every member batched (`?batch=1`) and with none.
//!
//! Each scenario runs a sample of its traffic through the real code and the meter, then
//! scales the sample to the scenario's length:
//! - the events are written to an embedded store (each an inbound API Gateway message and a
//!   chat-api-handler invocation, metered with the store write's measured time);
//! - they are grouped into fan-out invocations as the event source mapping would with a
//!   batching window W, polling the shard four times a second as Lambda does (half an interval
//!   out of step with the writes): a batch opens at the first poll that finds an event and
//!   takes every event written by then and before W has passed since (strictly), up to
//!   `BatchSize` records — on a simulated clock, so a month's
//!   pace needs no month (so with W = 0 a busy room's events still share a batch when several
//!   are written between two polls);
//! - each batch's stream records (through the template's filter) go to the real fan-out,
//!   whose POSTs go to a stand-in that meters each as API Gateway bills it (32 KB units) and
//!   answers after a 20 ms round trip (so the fan-out's billed duration includes its waits,
//!   its pacing at 5,000 POSTs/s included);
//! - DynamoDB request units are the embedded store's own metering of the sample;
//! - connection minutes are the members' (connected for the whole scenario).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::Event;
use chat_local::bill::{Bill, Function, Meter};
use chat_shared::config::{FanoutConfig, Retention};
use chat_shared::delivery::{Deliver, DeliveryError};
use chat_shared::fanout::handle_stream_event;
use chat_shared::store::aws_like::StoreBehaviour;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::ChatStore;
use chat_shared::stream::{passes_template_filter, RecordSource};
use chat_shared::validation::validate_name;
use serde::Serialize;

use crate::progress;

#[derive(Debug, Clone, clap::Args)]
pub struct CostOptions {
    /// The batching windows (`MaximumBatchingWindowInSeconds`, comma-separated) each
    /// scenario runs with.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub window: Vec<f64>,
    /// Round trip of one `@connections` POST (a Lambda to API Gateway).
    #[arg(long, default_value_t = 20)]
    pub latency_ms: u64,
    /// AWS-like store: after the members are set up, the embedded store takes DynamoDB's
    /// latencies (5 ms reads, 10 ms writes), eventual consistency and contention, so the
    /// functions' billed durations include them.
    #[arg(long)]
    pub aws_like: bool,
    /// Print one JSON object instead of the text report.
    #[arg(long)]
    pub json: bool,
}

/// One scripted scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    pub name: String,
    pub members: usize,
    /// Events per second.
    pub rate: f64,
    /// Events run through the meter.
    pub sample_events: usize,
    /// What the sample is scaled by (the scenario's events ÷ the sample's).
    pub scale: f64,
    /// The scenario's length, seconds (connection minutes).
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Priced {
    pub window_secs: f64,
    pub batched: bool,
    /// Fan-out invocations in the sample.
    pub invocations: usize,
    /// The sample's bill, scaled to the scenario.
    pub bill: Bill,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    #[serde(flatten)]
    pub scenario: Scenario,
    pub runs: Vec<Priced>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostReport {
    /// `ideal` or `aws-like` (the store's behaviour).
    pub mode: &'static str,
    pub window_secs: Vec<f64>,
    pub latency_ms: u64,
    pub scenarios: Vec<ScenarioReport>,
    pub ok: bool,
}

/// The stand-in `@connections`: meters every POST and answers after the round trip.
struct Metered {
    meter: Arc<Meter>,
    latency: Duration,
}

#[async_trait]
impl Deliver for Metered {
    async fn post(&self, _connection_id: &str, data: &[u8]) -> Result<(), DeliveryError> {
        tokio::time::sleep(self.latency).await;
        self.meter.message(data.len());
        Ok(())
    }
}

const MONTH_SECS: f64 = 30.0 * 24.0 * 3600.0;

pub fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "one broadcast to 10,000 members".into(),
            members: 10_000,
            rate: 1.0,
            sample_events: 1,
            scale: 1.0,
            seconds: 0.0,
        },
        Scenario {
            name: "a month of a 1,000-member room at 10 messages/minute".into(),
            members: 1_000,
            rate: 10.0 / 60.0,
            sample_events: 60,
            scale: MONTH_SECS * 10.0 / 60.0 / 60.0,
            seconds: MONTH_SECS,
        },
        Scenario {
            name: "a month of a 10,000-member room at 1 message/s".into(),
            members: 10_000,
            rate: 1.0,
            sample_events: 20,
            scale: MONTH_SECS / 20.0,
            seconds: MONTH_SECS,
        },
        Scenario {
            name: "a month of a 1,000-member room at 10 messages/s (busy)".into(),
            members: 1_000,
            rate: 10.0,
            sample_events: 100,
            scale: MONTH_SECS * 10.0 / 100.0,
            seconds: MONTH_SECS,
        },
    ]
}

/// Runs every scenario, batched and not.
pub async fn run(opts: &CostOptions) -> anyhow::Result<CostReport> {
    let mut reports = Vec::new();
    for scenario in scenarios() {
        let mut runs = Vec::new();
        for &window in &opts.window {
            for batched in [false, true] {
                progress(format_args!(
                    "{}: window {window} s, {}",
                    scenario.name,
                    if batched { "batched" } else { "unbatched" }
                ));
                runs.push(price(&scenario, window, batched, opts).await?);
            }
        }
        reports.push(ScenarioReport { scenario, runs });
    }
    Ok(CostReport {
        mode: if opts.aws_like { "aws-like" } else { "ideal" },
        window_secs: opts.window.clone(),
        latency_ms: opts.latency_ms,
        scenarios: reports,
        ok: true,
    })
}

/// Lambda polls each stream shard about four times a second (Lambda developer guide, "Using
/// AWS Lambda with Amazon DynamoDB"); `chat_local::aws_like` polls as often.
const POLL_INTERVAL_SECS: f64 = 0.25;
/// The polls' phase against the scripted writes: half an interval, the mean wait for a poll
/// (the poller is not in step with the writers). It matters: a window opens at the poll that
/// finds a record, so with W = 1 s events one second apart share a batch (as `chat-bench
/// busy-room --rate 1 --window 1` measures on the local mapping), which a poll falling
/// exactly on each write would hide.
const POLL_PHASE_SECS: f64 = POLL_INTERVAL_SECS / 2.0;

async fn price(
    scenario: &Scenario,
    window: f64,
    batched: bool,
    opts: &CostOptions,
) -> anyhow::Result<Priced> {
    let store = EmbeddedStore::new(Retention::default());
    let now = chat_shared::now_ms();
    for i in 0..scenario.members {
        let id = format!("c{i:06}");
        store
            .open_connection(&id, None, None, batched, now)
            .await
            .context("opening a connection")?;
        let name = validate_name(&format!("member{i}"))
            .map_err(|r| anyhow!("invalid generated name: {}", r.message))?;
        store.set_name(&id, &name, now).await.context("naming")?;
    }
    let mut feed = store.feed();
    while let Some(last) = feed
        .poll(100_000, Duration::ZERO)
        .await?
        .last()
        .and_then(|r| r.change.sequence_number.clone())
    {
        feed.checkpoint(&last);
    }
    let store = if opts.aws_like {
        store.with_behaviour(StoreBehaviour::aws_like())
    } else {
        store
    };
    let meter = Arc::new(Meter::default());
    meter.meter_store(store.clone());
    let before = meter.bill(0);
    let deliver = Metered {
        meter: Arc::clone(&meter),
        latency: Duration::from_millis(opts.latency_ms),
    };
    let config = FanoutConfig::default();
    // The batches on the simulated clock: event k at k / rate, polls at multiples of the
    // poll interval.
    let window = window.max(0.0);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut open_at = f64::NEG_INFINITY;
    for k in 0..scenario.sample_events {
        let t = k as f64 / scenario.rate;
        match batches.last_mut() {
            // BatchSize 100 records: an event is one record after the filter. Written by the
            // poll that opened the batch, or within the window after it.
            Some(batch) if (t <= open_at || t < open_at + window) && batch.len() < 100 => {
                batch.push(k)
            }
            _ => {
                open_at = ((t - POLL_PHASE_SECS) / POLL_INTERVAL_SECS).ceil() * POLL_INTERVAL_SECS
                    + POLL_PHASE_SECS;
                batches.push(vec![k]);
            }
        }
    }
    let message = "x".repeat(100);
    for batch in &batches {
        for k in batch {
            let sender = format!("c{:06}", k % scenario.members.min(3));
            let body = format!(r#"{{"action":"sendPublic","message":"{message}"}}"#);
            meter.message(body.len());
            let started = Instant::now();
            store
                .post_public(&sender, &message, chat_shared::now_ms())
                .await
                .context("posting")?;
            meter.invocation(Function::ApiHandler, started.elapsed());
        }
        let records: Vec<_> = feed
            .poll(10_000, Duration::ZERO)
            .await?
            .into_iter()
            .collect();
        let last = records
            .last()
            .and_then(|r| r.change.sequence_number.clone());
        let mut event = Event::default();
        event.records = records.into_iter().filter(passes_template_filter).collect();
        let started = Instant::now();
        let response =
            handle_stream_event(&store, &deliver, &config, event, chat_shared::now_ms, None).await;
        meter.invocation(Function::Fanout, started.elapsed());
        anyhow::ensure!(
            response.batch_item_failures.is_empty(),
            "the fan-out failed a record"
        );
        if let Some(last) = last {
            feed.checkpoint(&last);
        }
    }
    for _ in 0..scenario.members {
        // Connected through the sample's stretch of the scenario; scaled below.
        meter.connection_closed(Duration::from_secs_f64(
            scenario.sample_events as f64 / scenario.rate,
        ));
    }
    let after = meter.bill(0);
    let mut bill = scaled(&before, &after, scenario.scale);
    if scenario.seconds == 0.0 {
        bill.connection_minutes = 0.0;
    }
    let bill = bill.repriced();
    Ok(Priced {
        window_secs: window,
        batched,
        invocations: batches.len(),
        bill,
    })
}

/// `after − before`, times `scale` (priced again by the caller: the message tier is monthly).
fn scaled(before: &Bill, after: &Bill, scale: f64) -> Bill {
    let reads = after
        .dynamodb_read_units
        .zip(before.dynamodb_read_units)
        .map(|(a, b)| (a - b) * scale);
    let writes = after
        .dynamodb_write_units
        .zip(before.dynamodb_write_units)
        .map(|(a, b)| ((a - b) as f64 * scale).round() as u64);
    Bill {
        api_gateway_messages: ((after.api_gateway_messages - before.api_gateway_messages) as f64
            * scale)
            .round() as u64,
        connection_minutes: (after.connection_minutes - before.connection_minutes) * scale,
        lambda_requests: ((after.lambda_requests - before.lambda_requests) as f64 * scale).round()
            as u64,
        lambda_gb_seconds: (after.lambda_gb_seconds - before.lambda_gb_seconds) * scale,
        dynamodb_read_units: reads,
        dynamodb_write_units: writes,
        dollars: after.dollars.clone(),
    }
}

pub fn print(r: &CostReport) {
    println!(
        "cost model (us-east-1, on-demand, arm64; chat-local's bill meter), {} store, {} ms per POST, shard polled every {POLL_INTERVAL_SECS} s",
        r.mode, r.latency_ms
    );
    println!(
        "| scenario | members | window s | mode | fan-out invocations (sample) | API Gateway messages | connection min | Lambda req | Lambda GB-s | DynamoDB RRU | DynamoDB WRU | API Gateway $ | Lambda $ | DynamoDB $ | total $ |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &r.scenarios {
        for p in &s.runs {
            let b = &p.bill;
            println!(
                "| {} | {} | {} | {} | {} | {} | {:.0} | {} | {:.1} | {:.0} | {} | {:.4} | {:.4} | {:.4} | {:.4} |",
                s.scenario.name,
                s.scenario.members,
                p.window_secs,
                if p.batched { "batched" } else { "unbatched" },
                p.invocations,
                b.api_gateway_messages,
                b.connection_minutes,
                b.lambda_requests,
                b.lambda_gb_seconds,
                b.dynamodb_read_units.unwrap_or(0.0),
                b.dynamodb_write_units.unwrap_or(0),
                b.dollars.api_gateway,
                b.dollars.lambda,
                b.dollars.dynamodb,
                b.dollars.total
            );
        }
    }
}
