//! Batched delivery through the local stack, with real WebSocket clients: a client that
//! connects with `?batch=1` (the gateway passes the query string to `$connect` as API Gateway
//! does) gets a busy room's frames packed in `{"batch":[…]}` frames; a tutorial-style client
//! in the same room gets one frame per message as before. Both get every message once, in
//! order, in the ideal and the AWS-like mode, with the event source mapping's batching window
//! (`--batching-window`) gathering the messages.

use std::time::Duration;

use chat_local::aws_like::AwsLike;
use chat_local::esm::EsmConfig;
use chat_local::stack::{self, LocalOptions, RunningStack, StoreChoice};
use chat_shared::config::Retention;
use chat_shared::ratelimit::{PrincipalLimit, RateLimit};
use chat_shared::store::embedded::EmbeddedStore;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const EXPECT: Duration = Duration::from_secs(15);
const MESSAGES: usize = 30;

async fn start(aws_like: bool) -> RunningStack {
    let mut options = LocalOptions {
        port: 0,
        store: StoreChoice::Embedded(EmbeddedStore::new(Retention::default())),
        esm: EsmConfig {
            poll_wait: Duration::from_millis(50),
            retry_backoff: Duration::from_millis(20),
            // Long enough that the messages sent in one go are gathered into few batches.
            batching_window: Duration::from_millis(800),
            ..EsmConfig::default()
        },
        ..LocalOptions::default()
    };
    // One sender writes fast; the limits are not what this tests.
    options.handler.rate_limit = RateLimit {
        per_second: 0,
        burst: 0,
    };
    options.handler.principal_limit = PrincipalLimit::OFF;
    if aws_like {
        AwsLike::default().apply(&mut options);
        options.esm.batching_window = Duration::from_millis(800);
    }
    stack::start(options).await.expect("local stack starts")
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> Ws {
    let (ws, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    ws
}

/// The next text frame, as sent.
async fn next_text(ws: &mut Ws) -> String {
    loop {
        let msg = tokio::time::timeout(EXPECT, ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("valid");
        match msg {
            Message::Text(t) => return t.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// A frame and the frames inside it (a batch unpacked, anything else as itself).
fn unpack(text: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(text).expect("JSON frame");
    match v.get("batch") {
        Some(Value::Array(frames)) => frames.clone(),
        _ => vec![v],
    }
}

async fn join(ws: &mut Ws, name: &str) {
    ws.send(Message::text(
        json!({"action":"setName","name":name}).to_string(),
    ))
    .await
    .expect("send");
    let joined = format!("{name} has joined the chat");
    loop {
        let frames = unpack(&next_text(ws).await);
        if frames.iter().any(|f| f["systemMessage"] == json!(joined)) {
            return;
        }
    }
}

/// Reads until `n` public messages have come; returns them and how many WebSocket frames
/// carried them, and how many of those were batches.
async fn read_messages(ws: &mut Ws, n: usize) -> (Vec<Value>, usize, usize) {
    let (mut got, mut frames, mut batches) = (Vec::new(), 0, 0);
    while got.len() < n {
        let text = next_text(ws).await;
        let inner = unpack(&text);
        let messages: Vec<Value> = inner
            .into_iter()
            .filter(|f| f.get("publicMessage").is_some())
            .collect();
        if !messages.is_empty() {
            frames += 1;
            batches += usize::from(text.starts_with(r#"{"batch":["#));
        }
        got.extend(messages);
    }
    (got, frames, batches)
}

async fn scenario(aws_like: bool) {
    // GIVEN a stack whose mapping gathers records for 800 ms; alice connects with ?batch=1,
    // bob as the tutorial client does, carol sends
    let stack = start(aws_like).await;
    let url = stack.websocket_url.clone();
    let mut alice = connect(&format!("{url}?batch=1")).await;
    join(&mut alice, "alice").await;
    let mut bob = connect(&url).await;
    join(&mut bob, "bob").await;
    let mut carol = connect(&url).await;
    join(&mut carol, "carol").await;

    // WHEN carol sends 30 messages in one go
    for n in 0..MESSAGES {
        carol
            .send(Message::text(
                json!({"action":"sendPublic","message":format!("m{n:02}")}).to_string(),
            ))
            .await
            .expect("send");
    }

    // THEN each of alice and bob gets every message once, in order
    let (a, a_frames, a_batches) = read_messages(&mut alice, MESSAGES).await;
    let (b, b_frames, b_batches) = read_messages(&mut bob, MESSAGES).await;
    let expected: Vec<Value> = (0..MESSAGES)
        .map(|n| json!(format!("carol: m{n:02}")))
        .collect();
    let texts = |v: &[Value]| {
        v.iter()
            .map(|f| f["publicMessage"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(texts(&a), expected, "alice");
    assert_eq!(texts(&b), expected, "bob");
    // AND alice's are the same frames as bob's (ids included)
    assert_eq!(a, b);
    // AND bob's came one frame per message, never a batch; alice's in batches, far fewer
    assert_eq!((b_frames, b_batches), (MESSAGES, 0));
    assert!(a_batches >= 1, "alice got batches");
    assert!(
        a_frames * 3 <= MESSAGES,
        "alice: {a_frames} frames for {MESSAGES} messages"
    );
    stack.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn a_batched_and_a_tutorial_client_in_one_room_each_get_every_message_once_in_order() {
    scenario(false).await;
}

#[tokio::test]
async fn a_batched_and_a_tutorial_client_get_every_message_once_in_order_in_aws_like_mode() {
    scenario(true).await;
}
