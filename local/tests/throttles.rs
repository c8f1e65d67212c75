//! The gateway's AWS-like throttles with real clients over loopback: the account's request
//! bucket that inbound messages and `@connections` calls share, and the new-connection rate.
//! Each bucket is made small and never refilled (rate 0), so which request is throttled is
//! certain.

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_apigatewaymanagement::config::Credentials;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use chat_local::gateway::{GatewayConfig, ThrottleLimit};
use chat_local::stack::{self, LocalOptions, RunningStack};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

async fn start(gateway: GatewayConfig) -> RunningStack {
    stack::start(LocalOptions {
        port: 0,
        gateway,
        ..LocalOptions::default()
    })
    .await
    .expect("local stack starts")
}

/// A bucket of `n` tokens that never refills.
fn only(n: u32) -> Option<ThrottleLimit> {
    Some(ThrottleLimit {
        per_second: 0.0,
        burst: f64::from(n),
    })
}

fn management(stack: &RunningStack) -> aws_sdk_apigatewaymanagement::Client {
    let config = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(Credentials::new(
                "local", "local", None, None, "test",
            )),
        )
        .endpoint_url(stack.connection_url.trim_end_matches("/@connections"))
        .build();
    aws_sdk_apigatewaymanagement::Client::new(&config)
}

async fn next_json(ws: &mut (impl StreamExt<Item = Result<Message, WsError>> + Unpin)) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).expect("json"),
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn status_of(refused: WsError) -> u16 {
    match refused {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn over_the_account_rate_messages_connections_calls_and_handshakes_get_429() {
    // GIVEN a gateway whose account bucket holds 3 requests and never refills
    let stack = start(GatewayConfig {
        account_throttle: only(3),
        ..GatewayConfig::default()
    })
    .await;

    // WHEN a client connects (1 request: $connect) and sends three messages without a name
    let (mut ws, _) = tokio_tungstenite::connect_async(&stack.websocket_url)
        .await
        .expect("the first handshake is admitted");
    for i in 0..3 {
        let frame = json!({"action":"sendPublic","message":format!("m{i}")});
        ws.send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }
    let answers = [
        next_json(&mut ws).await,
        next_json(&mut ws).await,
        next_json(&mut ws).await,
    ];

    // THEN the first two reach the handler (it answers that a name is needed), the third is
    // answered by the gateway itself: 429 Too Many Requests
    assert_eq!(
        answers[0]["error"]["code"],
        json!("name_required"),
        "{answers:?}"
    );
    assert_eq!(
        answers[1]["error"]["code"],
        json!("name_required"),
        "{answers:?}"
    );
    assert_eq!(
        answers[2]["message"],
        json!("Too Many Requests"),
        "{answers:?}"
    );
    assert!(answers[2]["connectionId"].is_string() && answers[2]["requestId"].is_string());

    // AND a @connections call is refused as AWS refuses it: 429 LimitExceededException
    let connection_id = answers[2]["connectionId"].as_str().expect("id").to_owned();
    let refused = management(&stack)
        .post_to_connection()
        .connection_id(&connection_id)
        .data(Blob::new("hello"))
        .send()
        .await
        .expect_err("throttled");
    let service = refused.as_service_error().expect("a service error");
    assert!(service.is_limit_exceeded_exception(), "{service:?}");
    assert_eq!(
        refused.raw_response().map(|r| r.status().as_u16()),
        Some(429)
    );

    // AND so is a new handshake
    let handshake = tokio_tungstenite::connect_async(&stack.websocket_url)
        .await
        .expect_err("throttled");
    assert_eq!(status_of(handshake), 429);
    stack.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn over_the_new_connection_rate_handshakes_are_refused_with_429() {
    // GIVEN a gateway that admits 2 new connections and never refills (the account bucket
    // unlimited)
    let stack = start(GatewayConfig {
        connect_throttle: only(2),
        ..GatewayConfig::default()
    })
    .await;

    // WHEN three clients connect
    let first = tokio_tungstenite::connect_async(&stack.websocket_url).await;
    let second = tokio_tungstenite::connect_async(&stack.websocket_url).await;
    let third = tokio_tungstenite::connect_async(&stack.websocket_url).await;

    // THEN the first two are connected and the third handshake is refused with 429
    let (mut first, _) = first.expect("admitted");
    second.expect("admitted");
    assert_eq!(status_of(third.expect_err("refused")), 429);
    // AND the connected ones still talk: the connection rate is not the request rate
    first
        .send(Message::text(
            json!({"action":"setName","name":"alice"}).to_string(),
        ))
        .await
        .expect("send");
    assert_eq!(next_json(&mut first).await["members"], json!(["alice"]));
    stack.shutdown().await.expect("clean shutdown");
}
