//! Logging for the binaries, and the spans that give every line its context.
//!
//! - **On Lambda** ([`init`]): one JSON object per line on stdout when the function's
//!   `LoggingConfig` says `LogFormat: JSON` (Lambda then sets `AWS_LAMBDA_LOG_FORMAT=JSON`),
//!   plain text otherwise. A JSON line is flat: `level`, `message`, then the fields of every
//!   span it is in (lambda_runtime's `requestId`; [`request_span`]'s `route` and
//!   `connection_id`; [`unit_span`]'s `room`, `event_id`, `last_event_id`) and the event's own
//!   fields, so CloudWatch Logs Insights can filter on any of them by name. The filter is
//!   `RUST_LOG` (template.yaml's `LogLevel`) when set, else `AWS_LAMBDA_LOG_LEVEL` (the
//!   `ApplicationLogLevel` of `LoggingConfig`), else `info`. Lambda itself then drops JSON
//!   lines below `ApplicationLogLevel` (the template sets `DEBUG`, so `LogLevel` decides down
//!   to `debug`, and `trace` lines never reach CloudWatch).
//! - **Locally** ([`init_local`]): plain text on stderr with timestamps, because `chat-local`'s
//!   stdout carries the URLs that scripts read.
//!
//! What never reaches `info` or above: tokens (only whether a connection is authenticated)
//! and message bodies. At `trace`, lambda_runtime logs each raw invocation event, which holds
//! both (the `$connect` query string, the frame's body): on AWS, Lambda drops those lines
//! (`ApplicationLogLevel: DEBUG`).

use std::fmt;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Span, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;

use crate::events::StoredEvent;

/// Logging for a Lambda function: JSON lines if Lambda asks for them, text otherwise.
pub fn init() {
    let json = std::env::var("AWS_LAMBDA_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let filter = lambda_filter();
    if json {
        let _already_set = json_subscriber(filter, std::io::stdout).try_init();
    } else {
        // CloudWatch stamps each line itself and shows no colours.
        let _already_set = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .without_time()
            .with_target(false)
            .try_init();
    }
}

/// `RUST_LOG` first: the template's `LogLevel`, which can name targets. Then
/// `AWS_LAMBDA_LOG_LEVEL`, which Lambda sets from `ApplicationLogLevel` (its `FATAL` is
/// tracing's `error`), then `info`.
fn lambda_filter() -> EnvFilter {
    if let Ok(filter) = EnvFilter::try_from_default_env() {
        return filter;
    }
    match std::env::var("AWS_LAMBDA_LOG_LEVEL") {
        Ok(level) if !level.is_empty() => {
            let level = level.to_ascii_lowercase();
            EnvFilter::try_new(if level == "fatal" { "error" } else { &level })
                .unwrap_or_else(|_| EnvFilter::new("info"))
        }
        _ => EnvFilter::new("info"),
    }
}

/// The JSON subscriber the Lambda functions use, writing to `writer` (tests capture with it).
pub fn json_subscriber<W>(filter: EnvFilter, writer: W) -> impl Subscriber + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::registry().with(filter).with(
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .with_writer(writer),
    )
}

/// Logging for `chat-local`: the same filter, on stderr, with timestamps (nothing adds them
/// locally, as CloudWatch does on AWS).
pub fn init_local() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// The span of one handler request: its route and connection (the request id comes from
/// lambda_runtime's own span around it). Never the query string or the body.
pub fn request_span(request: &ApiGatewayWebsocketProxyRequest) -> Span {
    let ctx = &request.request_context;
    tracing::info_span!(
        "request",
        route = ctx.route_key.as_deref().unwrap_or(""),
        connection_id = ctx.connection_id.as_deref().unwrap_or(""),
    )
}

/// The span of one fan-out unit: one event, or a run of presence changes of one room
/// (`event_id` the first, `last_event_id` the last). With the handler's `room` and `event_id`
/// on its commit line, one message can be followed from the commit to every delivery outcome.
pub fn unit_span(events: &[StoredEvent]) -> Span {
    let (room, first, last) = match (events.first(), events.last()) {
        (Some(first), Some(last)) => (first.room.as_str(), first.seq, last.seq),
        _ => ("", 0, 0),
    };
    tracing::info_span!("unit", room, event_id = first, last_event_id = last)
}

/// One flat JSON object per event: `level`, `message`, the fields of its spans from the
/// outermost in, then its own fields (an inner name wins over an outer one).
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = Map::new();
        line.insert(
            "level".into(),
            Value::String(event.metadata().level().to_string()),
        );
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                // The span's fields as JsonFields stored them: a JSON object (or nothing).
                let Some(fields) = extensions.get::<FormattedFields<N>>() else {
                    continue;
                };
                if let Ok(fields) = serde_json::from_str::<Map<String, Value>>(fields) {
                    line.extend(fields);
                }
            }
        }
        event.record(&mut FieldsInto(&mut line));
        if !line.contains_key("message") {
            line.insert("message".into(), Value::String(String::new()));
        }
        let text = serde_json::to_string(&line).map_err(|_| fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields as JSON values: numbers and booleans stay themselves, the rest
/// (`%display`, `?debug`, errors) become strings.
struct FieldsInto<'a>(&'a mut Map<String, Value>);

impl Visit for FieldsInto<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }
}
