//! The functions' metrics as CloudWatch Embedded Metric Format documents: the recorder
//! [`chat_shared::metrics::install_emf`] installs (the one main.rs installs), fed by the
//! handler's and the fan-out's own code, flushed as main.rs flushes after an invocation, and
//! each document parsed and checked: namespace, dimensions, units, values, the request id.
//! One test in its own binary: a process has one global recorder.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use aws_lambda_events::event::dynamodb::Event;
use chat_shared::config::{FanoutConfig, HandlerConfig, Retention};
use chat_shared::delivery::{Deliver, DeliveryError};
use chat_shared::fanout::handle_stream_event;
use chat_shared::handler::handle_request;
use chat_shared::metrics::{self as m, flush_emf, install_emf};
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::stream::RecordSource;
use serde_json::{json, Value};

fn request(
    route: &str,
    connection_id: &str,
    body: Option<Value>,
) -> ApiGatewayWebsocketProxyRequest {
    serde_json::from_value(json!({
        "requestContext": {"routeKey": route, "connectionId": connection_id, "stage": "prod",
            "connectedAt": 1, "requestTimeEpoch": 1, "apiId": "api", "identity": {}},
        "body": body.map(|b| b.to_string()),
        "isBase64Encoded": false,
    }))
    .expect("a WebSocket event")
}

/// One EMF document, checked for the format's required shape.
struct Doc(Value);

impl Doc {
    fn parse(line: &str) -> Doc {
        let doc: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let aws = &doc["_aws"];
        assert!(
            aws["Timestamp"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000),
            "{line}"
        );
        let directives = aws["CloudWatchMetrics"]
            .as_array()
            .expect("CloudWatchMetrics");
        assert_eq!(directives.len(), 1, "{line}");
        let namespace = std::env::var("METRICS_NAMESPACE").unwrap_or(m::DEFAULT_NAMESPACE.into());
        assert_eq!(directives[0]["Namespace"], namespace.as_str(), "{line}");
        // Every dimension a directive names is a top-level member of the document, and every
        // metric it names has a value there (what CloudWatch requires to extract it).
        for set in directives[0]["Dimensions"].as_array().expect("Dimensions") {
            for name in set.as_array().expect("a dimension set") {
                assert!(doc[name.as_str().expect("a name")].is_string(), "{line}");
            }
        }
        for metric in directives[0]["Metrics"].as_array().expect("Metrics") {
            let name = metric["Name"].as_str().expect("Name");
            assert!(doc[name].is_number() || doc[name].is_array(), "{line}");
        }
        Doc(doc)
    }

    fn metrics(&self) -> Vec<(&str, Option<&str>)> {
        self.0["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .expect("Metrics")
            .iter()
            .map(|m| (m["Name"].as_str().expect("Name"), m["Unit"].as_str()))
            .collect()
    }

    fn dimensions(&self) -> Vec<&str> {
        self.0["_aws"]["CloudWatchMetrics"][0]["Dimensions"][0]
            .as_array()
            .expect("one dimension set")
            .iter()
            .map(|d| d.as_str().expect("a name"))
            .collect()
    }
}

fn flush(collector: &'static metrics_cloudwatch_embedded::Collector, request_id: &str) -> Vec<Doc> {
    let mut out = Vec::new();
    flush_emf(collector, request_id, &mut out).expect("flushed");
    let docs: Vec<Doc> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(Doc::parse)
        .collect();
    for doc in &docs {
        assert_eq!(doc.0["requestId"], request_id);
    }
    docs
}

/// The one document holding `metric` with these dimension values.
fn find<'a>(docs: &'a [Doc], metric: &str, dims: &[(&str, &str)]) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.metrics().iter().any(|(n, _)| *n == metric))
        .filter(|d| dims.iter().all(|(k, v)| d.0[*k] == *v))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{metric} {dims:?}: {:?}",
        docs.iter().map(|d| &d.0).collect::<Vec<_>>()
    );
    found[0]
}

fn unit<'a>(doc: &'a Doc, metric: &str) -> Option<&'a str> {
    doc.metrics()
        .into_iter()
        .find(|(n, _)| *n == metric)
        .and_then(|(_, u)| u)
}

/// `@connections`: 410 for `gone`; `bob`'s first call is throttled; everything else accepted.
#[derive(Default)]
struct Endpoint {
    throttled: Mutex<HashSet<String>>,
}

#[async_trait]
impl Deliver for Endpoint {
    async fn post(&self, connection_id: &str, _data: &[u8]) -> Result<(), DeliveryError> {
        match connection_id {
            "gone" => Err(DeliveryError::Gone),
            "bob"
                if self
                    .throttled
                    .lock()
                    .expect("lock")
                    .insert(connection_id.into()) =>
            {
                Err(DeliveryError::Throttled("slow down".into()))
            }
            _ => Ok(()),
        }
    }
}

#[tokio::test]
async fn handler_and_fan_out_metrics_are_emf_documents_with_their_dimensions_and_units() {
    // GIVEN the EMF recorder main.rs installs
    let collector = install_emf().expect("the only recorder of this process");
    let store = EmbeddedStore::new(Retention::default());
    let config = HandlerConfig::default();

    // WHEN a cold start is recorded and the handler serves three connections, a message and
    // a refused (empty) message, inside the request wrapper main.rs uses
    m::cold_start("chat-fanout", Duration::from_millis(42));
    let requests = [
        request("$connect", "alice", None),
        request("$connect", "bob", None),
        request("$connect", "gone", None),
        request(
            "setName",
            "alice",
            Some(json!({"action":"setName","name":"alice"})),
        ),
        request(
            "setName",
            "bob",
            Some(json!({"action":"setName","name":"bob"})),
        ),
        request(
            "setName",
            "gone",
            Some(json!({"action":"setName","name":"ghost"})),
        ),
        request(
            "sendPublic",
            "alice",
            Some(json!({"action":"sendPublic","message":"hi"})),
        ),
        request(
            "sendPublic",
            "alice",
            Some(json!({"action":"sendPublic","message":""})),
        ),
    ];
    for r in requests {
        let route = r.request_context.route_key.clone();
        m::handler_request(
            route.as_deref(),
            handle_request(&store, &config, r, chat_shared::now_ms()),
        )
        .await
        .expect("handled");
    }
    let handler_docs = flush(collector, "req-1");

    // THEN one document per label set: requests by route and outcome, Count
    let ok = find(
        &handler_docs,
        m::HANDLER_REQUESTS,
        &[("Route", "sendPublic"), ("Outcome", "ok")],
    );
    assert_eq!(ok.dimensions(), ["Route", "Outcome"]);
    assert_eq!(ok.0[m::HANDLER_REQUESTS], 1);
    assert_eq!(unit(ok, m::HANDLER_REQUESTS), Some("Count"));
    let refused = find(
        &handler_docs,
        m::HANDLER_REQUESTS,
        &[("Route", "sendPublic"), ("Outcome", "invalid_message")],
    );
    assert_eq!(refused.0[m::HANDLER_REQUESTS], 1);
    let connects = find(
        &handler_docs,
        m::HANDLER_REQUESTS,
        &[("Route", "$connect"), ("Outcome", "ok")],
    );
    assert_eq!(connects.0[m::HANDLER_REQUESTS], 3);
    // AND latency by route, one value per request, in milliseconds
    let latency = find(
        &handler_docs,
        m::HANDLER_LATENCY,
        &[("Route", "sendPublic")],
    );
    assert_eq!(latency.dimensions(), ["Route"]);
    assert_eq!(unit(latency, m::HANDLER_LATENCY), Some("Milliseconds"));
    assert_eq!(
        latency.0[m::HANDLER_LATENCY].as_array().map(Vec::len),
        Some(2)
    );
    // AND the cold start, by function
    let cold = find(
        &handler_docs,
        m::COLD_STARTS,
        &[("Function", "chat-fanout")],
    );
    assert_eq!(cold.0[m::COLD_STARTS], 1);
    assert_eq!(unit(cold, m::INIT_DURATION), Some("Milliseconds"));
    assert_eq!(cold.0[m::INIT_DURATION], json!([42.0]));

    // WHEN the fan-out gets the stream's records: three joins (one presence run) and the message
    let mut feed = store.feed();
    let records = feed.poll(100, Duration::ZERO).await.expect("records");
    let batch = records.len();
    let mut event = Event::default();
    event.records = records;
    let fanout = FanoutConfig {
        base_backoff: Duration::ZERO,
        throttle_backoff: Duration::ZERO,
        ..FanoutConfig::default()
    };
    let response = handle_stream_event(
        &store,
        &Endpoint::default(),
        &fanout,
        event,
        chat_shared::now_ms,
        None,
    )
    .await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let fanout_docs = flush(collector, "req-2");

    // THEN the fan-out's metrics are one document without dimensions: the presence run and
    // the message, both of lobby, went out as one broadcast (crate::batching) that reached
    // alice and bob (bob after one 429 and a retry) and pruned gone
    let doc = find(&fanout_docs, m::DELIVERIES, &[]);
    assert!(doc.dimensions().is_empty());
    assert_eq!(doc.0[m::DELIVERIES], 2);
    assert_eq!(doc.0[m::PRUNED], 1);
    assert_eq!(doc.0[m::THROTTLED], 1);
    assert_eq!(doc.0[m::DELIVERY_RETRIES], 1);
    assert_eq!(doc.0[m::RECIPIENTS_PER_EVENT], json!([3.0]));
    assert_eq!(
        doc.0[m::BROADCAST_DURATION].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(doc.0[m::BATCH_SIZE], json!([batch as f64]));
    let lags = doc.0[m::STREAM_LAG].as_array().expect("lags");
    assert_eq!(lags.len(), batch, "one lag per record");
    assert!(lags.iter().all(|l| l.as_f64().is_some_and(|l| l >= 0.0)));
    for (name, want) in [
        (m::DELIVERIES, "Count"),
        (m::PRUNED, "Count"),
        (m::THROTTLED, "Count"),
        (m::STREAM_LAG, "Milliseconds"),
        (m::BROADCAST_DURATION, "Milliseconds"),
    ] {
        assert_eq!(unit(doc, name), Some(want), "{name}");
    }
    // AND nothing else was refused, redelivered or handed back (zero counts are left out)
    for absent in [
        m::REJECTED_FRAMES,
        m::REDELIVERIES,
        m::GIVEN_UP,
        m::PARTIAL_BATCH_FAILURES,
    ] {
        assert!(doc.0.get(absent).is_none(), "{absent}: {}", doc.0);
    }
    // AND a flush starts afresh: the handler's counts and the cold start are not repeated
    assert!(fanout_docs
        .iter()
        .all(|d| d.0.get(m::HANDLER_REQUESTS).is_none() && d.0.get(m::COLD_STARTS).is_none()));
}
