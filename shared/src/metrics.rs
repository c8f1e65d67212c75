//! Every metric the chat emits: the names (the one list the functions, `chat-local`, the
//! template's alarms and dashboard and the README use), their units, and the calls the
//! handler and the fan-out make. Recording goes through the `metrics` facade, so the code
//! that counts does not know where the numbers go: on Lambda the binaries install
//! [`install_emf`] (CloudWatch Embedded Metric Format, one JSON document per label set,
//! flushed to stdout after each invocation by [`flush_emf`]); `chat-local` installs a
//! Prometheus recorder and serves `GET /metrics`. With no recorder installed (unit tests,
//! chat-bench) every call is a no-op.
//!
//! Dimensions are few and bounded: the handler's `Route` (the template's route keys) and
//! `Outcome` (`ok`, an error code of the protocol, `unauthenticated`, `too_many_connections`,
//! `http_error`, `failed`),
//! and `Function` on the cold-start metrics. Fan-out metrics have none: one stream, one
//! fan-out, so alarms need no metric math.

use std::future::Future;
use std::io::Write;
use std::time::{Duration, Instant};

use aws_lambda_events::apigw::ApiGatewayProxyResponse;
use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use metrics::{counter, describe_counter, describe_histogram, histogram, Unit};
use thiserror::Error;

use crate::fanout::DeliveryReport;

/// Requests the handler answered, by `Route` and `Outcome`.
pub const HANDLER_REQUESTS: &str = "HandlerRequests";
/// Time the handler spent on one request (ms), by `Route`.
pub const HANDLER_LATENCY: &str = "HandlerLatency";
/// Frames' recipients `@connections` accepted (a recipient of a join's two frames counts once).
pub const DELIVERIES: &str = "Deliveries";
/// Connections that answered 410 Gone and were pruned.
pub const PRUNED: &str = "Pruned";
/// `@connections` calls answered 429 (the account's API Gateway quota), retried or not.
pub const THROTTLED: &str = "Throttled";
/// `@connections` calls retried after a 429 or a 5xx.
pub const DELIVERY_RETRIES: &str = "DeliveryRetries";
/// Recipients whose frame was refused for good (403, 413, another 4xx): not retried.
pub const REJECTED_FRAMES: &str = "RejectedFrames";
/// Recipients still failing after their attempts, handed to a redelivery round.
pub const REDELIVERIES: &str = "Redeliveries";
/// Recipients still failing after the last redelivery round: given up (history keeps the event).
pub const GIVEN_UP: &str = "GivenUp";
/// Recipients of one event (or one run of presence changes): the broadcast's size.
pub const RECIPIENTS_PER_EVENT: &str = "RecipientsPerEvent";
/// Time one event's broadcast took, pruning and scheduling redeliveries included (ms).
pub const BROADCAST_DURATION: &str = "BroadcastDuration";
/// Now minus a stream record's `ApproximateCreationDateTime` when the fan-out receives it
/// (ms; DynamoDB stamps whole seconds, so a second of it is rounding).
pub const STREAM_LAG: &str = "StreamLag";
/// Records in one fan-out invocation.
pub const BATCH_SIZE: &str = "BatchSize";
/// Records the fan-out handed back to Lambda to retry (the partial batch response).
pub const PARTIAL_BATCH_FAILURES: &str = "PartialBatchFailures";
/// Execution environments started, by `Function`.
pub const COLD_STARTS: &str = "ColdStarts";
/// Time from `main` to the first invocation (ms), by `Function`: SDK config and clients.
pub const INIT_DURATION: &str = "InitDuration";

/// Every metric: name, unit, what it means (the units go into the EMF documents).
pub const ALL: &[(&str, Unit, &str)] = &[
    (
        HANDLER_REQUESTS,
        Unit::Count,
        "requests answered, by route and outcome",
    ),
    (
        HANDLER_LATENCY,
        Unit::Milliseconds,
        "time to answer one request",
    ),
    (DELIVERIES, Unit::Count, "recipients reached"),
    (PRUNED, Unit::Count, "connections gone (410) and pruned"),
    (THROTTLED, Unit::Count, "@connections calls answered 429"),
    (DELIVERY_RETRIES, Unit::Count, "@connections calls retried"),
    (
        REJECTED_FRAMES,
        Unit::Count,
        "frames refused for good (403, 413)",
    ),
    (
        REDELIVERIES,
        Unit::Count,
        "recipients handed to a redelivery round",
    ),
    (
        GIVEN_UP,
        Unit::Count,
        "recipients given up after every round",
    ),
    (
        RECIPIENTS_PER_EVENT,
        Unit::Count,
        "recipients of one broadcast",
    ),
    (
        BROADCAST_DURATION,
        Unit::Milliseconds,
        "time of one broadcast",
    ),
    (
        STREAM_LAG,
        Unit::Milliseconds,
        "record age when the fan-out gets it",
    ),
    (BATCH_SIZE, Unit::Count, "records per fan-out invocation"),
    (
        PARTIAL_BATCH_FAILURES,
        Unit::Count,
        "records handed back for retry",
    ),
    (COLD_STARTS, Unit::Count, "execution environments started"),
    (
        INIT_DURATION,
        Unit::Milliseconds,
        "main to first invocation",
    ),
];

/// The CloudWatch namespace when `METRICS_NAMESPACE` is not set.
pub const DEFAULT_NAMESPACE: &str = "ServerlessChat";

/// Tells the installed recorder each metric's unit (EMF carries it; Prometheus ignores it).
pub fn describe() {
    for &(name, unit, help) in ALL {
        if matches!(unit, Unit::Milliseconds) || [RECIPIENTS_PER_EVENT, BATCH_SIZE].contains(&name)
        {
            describe_histogram!(name, unit, help);
        } else {
            describe_counter!(name, unit, help);
        }
    }
}

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("installing the metrics recorder failed: {0}")]
    Install(String),
}

/// Installs the EMF recorder for the process (a Lambda binary's `main`), namespace from
/// `METRICS_NAMESPACE` (template.yaml sets it per stack). Flush with [`flush_emf`].
pub fn install_emf() -> Result<&'static metrics_cloudwatch_embedded::Collector, MetricsError> {
    let namespace =
        std::env::var("METRICS_NAMESPACE").unwrap_or_else(|_| DEFAULT_NAMESPACE.to_owned());
    let collector = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace(namespace)
        .init()
        .map_err(|e| MetricsError::Install(e.to_string()))?;
    describe();
    Ok(collector)
}

/// Writes what was recorded since the last flush as EMF documents (one per label set, each
/// carrying `requestId` as a property, so a document leads to its invocation's log lines),
/// then resets the counters. One write for all of them: log lines from other tasks cannot
/// land inside a document.
pub fn flush_emf(
    collector: &metrics_cloudwatch_embedded::Collector,
    request_id: &str,
    mut out: impl Write,
) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    collector
        .set_property("requestId", request_id)
        .flush(&mut buffer)?;
    out.write_all(&buffer)?;
    out.flush()
}

/// A new execution environment's first invocation: one cold start and how long `main` took
/// to get there.
pub fn cold_start(function: &'static str, init: Duration) {
    counter!(COLD_STARTS, "Function" => function).increment(1);
    histogram!(INIT_DURATION, "Function" => function).record(millis(init));
}

tokio::task_local! {
    /// The error code of the request being handled, set by the handler when it refuses one.
    static REFUSAL: std::cell::Cell<Option<&'static str>>;
}

/// The handler refused the request with `code` (called where the error frame is made).
/// Outside [`handler_request`] (a test calling the handler directly) it records nothing.
pub fn refused(code: &'static str) {
    let _ = REFUSAL.try_with(|cell| cell.set(Some(code)));
}

/// Runs one handler invocation and counts it: `HandlerRequests` by `Route` and `Outcome`
/// (`ok`; the error code of a refusal; `unauthenticated` for a 401 at `$connect`;
/// `too_many_connections` for a 429 there (its principal's limit); `http_error` for another
/// non-2xx status; `failed` when the handler returned an error to Lambda), and
/// `HandlerLatency` by `Route`.
pub async fn handler_request<E>(
    route: Option<&str>,
    invocation: impl Future<Output = Result<ApiGatewayProxyResponse, E>>,
) -> Result<ApiGatewayProxyResponse, E> {
    let started = Instant::now();
    let (code, result) = REFUSAL
        .scope(std::cell::Cell::new(None), async {
            let result = invocation.await;
            (REFUSAL.with(|cell| cell.get()), result)
        })
        .await;
    let outcome = match (&result, code) {
        (Err(_), _) => "failed",
        (Ok(_), Some(code)) => code,
        (Ok(r), None) if (200..300).contains(&r.status_code) => "ok",
        (Ok(r), None) if r.status_code == 401 => "unauthenticated",
        (Ok(r), None) if r.status_code == 429 => "too_many_connections",
        (Ok(_), None) => "http_error",
    };
    let route = route_label(route);
    histogram!(HANDLER_LATENCY, "Route" => route.clone()).record(millis(started.elapsed()));
    counter!(HANDLER_REQUESTS, "Route" => route, "Outcome" => outcome).increment(1);
    result
}

/// API Gateway only ever sends the template's route keys; anything else (a hand-made event)
/// is `other`, so a dimension's values stay few.
fn route_label(route: Option<&str>) -> String {
    match route {
        Some(r)
            if (1..=32).contains(&r.len())
                && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'$') =>
        {
            r.to_owned()
        }
        _ => "other".to_owned(),
    }
}

/// A fan-out invocation's input: `BatchSize`, and `StreamLag` of each record that carries a
/// creation time. EMF keeps at most 100 values of a metric per document (the collector drops
/// the rest): the template's `BatchSize: 100` bounds the records, and so the lags and the
/// broadcasts, of one invocation.
///
/// Lag is against the wall clock (`ApproximateCreationDateTime` is one), not the fan-out's
/// injected clock, which tests move and count.
pub fn stream_batch(event: &Event) {
    let now_ms = crate::now_ms();
    histogram!(BATCH_SIZE).record(event.records.len() as f64);
    let lag = histogram!(STREAM_LAG);
    for record in &event.records {
        let created = record
            .change
            .approximate_creation_date_time
            .timestamp_millis();
        if created > 0 {
            lag.record(now_ms.saturating_sub(created).max(0) as f64);
        }
    }
}

/// A fan-out invocation's answer: the records handed back to Lambda.
pub fn batch_response(response: &DynamoDbEventResponse) {
    counter!(PARTIAL_BATCH_FAILURES).increment(response.batch_item_failures.len() as u64);
}

/// When a broadcast started; [`broadcast_done`] records its duration.
pub fn broadcast_started() -> Instant {
    Instant::now()
}

/// One event's (or presence run's) broadcast finished with `report`.
pub fn broadcast_done(report: &DeliveryReport, started: Instant) {
    delivery_outcomes(report);
    let recipients = report.delivered
        + report.pruned.len()
        + report.rejected
        + report.redelivering
        + report.given_up;
    histogram!(RECIPIENTS_PER_EVENT).record(recipients as f64);
    histogram!(BROADCAST_DURATION).record(millis(started.elapsed()));
}

/// A redelivery round finished with `report` (counted with the broadcasts' outcomes, not as
/// a broadcast of its own).
pub fn redelivery_done(report: &DeliveryReport) {
    delivery_outcomes(report);
}

fn delivery_outcomes(report: &DeliveryReport) {
    counter!(DELIVERIES).increment(report.delivered as u64);
    counter!(PRUNED).increment(report.pruned.len() as u64);
    counter!(REJECTED_FRAMES).increment(report.rejected as u64);
    counter!(REDELIVERIES).increment(report.redelivering as u64);
    counter!(GIVEN_UP).increment(report.given_up as u64);
}

/// An `@connections` call was answered 429.
pub fn throttled() {
    counter!(THROTTLED).increment(1);
}

/// An `@connections` call is about to be retried.
pub fn retried() {
    counter!(DELIVERY_RETRIES).increment(1);
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
