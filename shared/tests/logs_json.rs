//! The Lambda functions' JSON log lines ([`chat_shared::telemetry::json_subscriber`], what
//! `LogFormat: JSON` gets): captured from a handler's requests and the fan-out of their event,
//! each line is one flat JSON object; one message can be followed by `room` and `event_id`
//! from its commit to its delivery outcome; and at `info` no line holds a token, the JWT
//! secret or a message body.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::event::dynamodb::Event;
use chat_shared::auth::Authenticator;
use chat_shared::config::{FanoutConfig, HandlerConfig, Retention};
use chat_shared::delivery::{Deliver, DeliveryError};
use chat_shared::fanout::handle_stream_event;
use chat_shared::handler::handle_request;
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::stream::RecordSource;
use chat_shared::telemetry::{json_subscriber, request_span};
use serde_json::{json, Map, Value};
use tracing::instrument::WithSubscriber;
use tracing::Instrument;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

const SECRET: &str = "jwt-secret-NEVER-LOGGED";
const BODY: &str = "message-body-NEVER-LOGGED";
const BAD_TOKEN: &str = "bad-token-NEVER-LOGGED";

/// What the subscriber wrote, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'w> MakeWriter<'w> for Captured {
    type Writer = Captured;
    fn make_writer(&'w self) -> Self::Writer {
        self.clone()
    }
}

/// A WebSocket event as API Gateway sends it (the fields the handler reads).
fn request(
    route: &str,
    connection_id: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> ApiGatewayWebsocketProxyRequest {
    serde_json::from_value(json!({
        "requestContext": {"routeKey": route, "connectionId": connection_id, "stage": "prod", "connectedAt": 1, "requestTimeEpoch": 1, "apiId": "api", "identity": {}},
        "queryStringParameters": token.map(|t| json!({"token": t})),
        "body": body.map(|b| b.to_string()),
        "isBase64Encoded": false,
    }))
    .expect("a WebSocket event")
}

fn token(sub: &str) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: i64,
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub,
            exp: chat_shared::now_ms() / 1000 + 3600,
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

/// chat-api-handler's main.rs around one request: its span, its metrics.
async fn invoke(
    store: &EmbeddedStore,
    config: &HandlerConfig,
    request: ApiGatewayWebsocketProxyRequest,
) -> ApiGatewayProxyResponse {
    // lambda_runtime's own span, with the request id, around the function (whose spans are
    // made inside it, as main.rs's are).
    let invocation = tracing::info_span!("Lambda runtime invoke", requestId = "req-1");
    async {
        let route = request.request_context.route_key.clone();
        let span = request_span(&request);
        chat_shared::metrics::handler_request(
            route.as_deref(),
            handle_request(store, config, request, chat_shared::now_ms()).instrument(span),
        )
        .await
        .expect("handled")
    }
    .instrument(invocation)
    .await
}

/// `@connections`: accepts every frame except to `gone`.
struct Endpoint;

#[async_trait]
impl Deliver for Endpoint {
    async fn post(&self, connection_id: &str, _data: &[u8]) -> Result<(), DeliveryError> {
        if connection_id == "gone" {
            Err(DeliveryError::Gone)
        } else {
            Ok(())
        }
    }
}

#[tokio::test]
async fn json_lines_follow_a_message_from_commit_to_delivery_and_hold_no_secret() {
    // GIVEN the JSON subscriber at info, capturing, and a chat that requires tokens
    let captured = Captured::default();
    let subscriber = json_subscriber(EnvFilter::new("info"), captured.clone());
    let store = EmbeddedStore::new(Retention::default());
    let config = HandlerConfig {
        auth: Some(Authenticator::hs256(SECRET.as_bytes())),
        ..HandlerConfig::default()
    };
    let good_token = token("alice-sub");
    let event_id = async {
        // WHEN one connection is refused for a bad token, alice connects with a good one,
        // names herself, a member who has gone joins, and alice posts a message
        let refused = invoke(
            &store,
            &config,
            request("$connect", "mallory", None, Some(BAD_TOKEN)),
        )
        .await;
        assert_eq!(refused.status_code, 401);
        let ghost_token = token("ghost-sub");
        for (id, name, token) in [
            ("alice", "alice", &good_token),
            ("gone", "ghost", &ghost_token),
        ] {
            let connected =
                invoke(&store, &config, request("$connect", id, None, Some(token))).await;
            assert_eq!(connected.status_code, 200);
            invoke(
                &store,
                &config,
                request(
                    "setName",
                    id,
                    Some(json!({"action":"setName","name":name})),
                    None,
                ),
            )
            .await;
        }
        invoke(
            &store,
            &config,
            request(
                "sendPublic",
                "alice",
                Some(json!({"action":"sendPublic","message":BODY})),
                None,
            ),
        )
        .await;
        // AND the fan-out delivers what the stream holds
        let mut feed = store.feed();
        let records = feed.poll(100, Duration::ZERO).await.expect("records");
        let mut event = Event::default();
        event.records = records;
        let response = handle_stream_event(
            &store,
            &Endpoint,
            &FanoutConfig::default(),
            event,
            chat_shared::now_ms,
            None,
        )
        .instrument(tracing::info_span!(
            "Lambda runtime invoke",
            requestId = "req-2"
        ))
        .await;
        assert!(response.batch_item_failures.is_empty(), "{response:?}");
        store
            .events_in("lobby")
            .iter()
            .find(|e| {
                matches!(
                    e.event,
                    chat_shared::events::ChatEvent::MessagePosted { .. }
                )
            })
            .map(|e| e.seq)
            .expect("the message is stored")
    }
    .with_subscriber(subscriber)
    .await;

    let text = String::from_utf8(captured.0.lock().expect("capture lock").clone()).expect("utf-8");
    // THEN every line is one flat JSON object with a level and a message
    let lines: Vec<Map<String, Value>> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 6, "{text}");
    for line in &lines {
        assert!(
            ["INFO", "WARN", "ERROR"].contains(&line["level"].as_str().unwrap_or("")),
            "{line:?}"
        );
        assert!(line["message"].is_string(), "{line:?}");
    }
    let find = |message: &str| -> Vec<&Map<String, Value>> {
        lines.iter().filter(|l| l["message"] == message).collect()
    };
    // AND the commit line carries the request id, the route, the connection, the room and the id
    let stored = find("public message stored");
    assert_eq!(stored.len(), 1, "{text}");
    assert_eq!(stored[0]["requestId"], "req-1");
    assert_eq!(stored[0]["route"], "sendPublic");
    assert_eq!(stored[0]["connection_id"], "alice");
    assert_eq!(stored[0]["room"], "lobby");
    assert_eq!(stored[0]["event_id"], event_id);
    // AND the same room and id lead to the fan-out's outcome for that message, in its invocation
    let outcome: Vec<_> = find("fanned out")
        .into_iter()
        .filter(|l| l["room"] == "lobby" && l["event_id"] == event_id)
        .collect();
    assert_eq!(outcome.len(), 1, "{text}");
    assert_eq!(outcome[0]["requestId"], "req-2");
    assert_eq!(
        outcome[0]["delivered"], 1,
        "alice; the gone member was pruned by the join's fan-out"
    );
    // AND the refused connection is logged, with its reason but not its token
    let refused = find("connection refused: not authenticated");
    assert_eq!(refused.len(), 1, "{text}");
    assert_eq!(refused[0]["connection_id"], "mallory");
    // AND no line holds a token, the secret or the message body
    for secret in [SECRET, BODY, BAD_TOKEN, good_token.as_str()] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }
}
