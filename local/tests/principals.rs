//! Limits across a principal's connections (one source IP here: every client is 127.0.0.1),
//! end to end over real WebSockets, in the ideal, AWS-like and moto modes: a reconnect gets no
//! fresh budget, a third connection is refused at the handshake, a closed one frees its slot.

use std::time::Duration;

use chat_local::aws_like::AwsLike;
use chat_local::stack::{self, LocalOptions, RunningStack, StoreChoice};
use chat_shared::config::{Retention, Tables};
use chat_shared::ratelimit::{PrincipalLimit, RateLimit, PRINCIPAL_WINDOW_SECS};
use chat_shared::store::embedded::EmbeddedStore;
use chat_tests::{unique_name, Moto};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

enum Mode {
    Embedded,
    AwsLike,
    Moto,
}

async fn start(mode: Mode) -> (RunningStack, Option<Moto>) {
    let mut options = LocalOptions {
        port: 0,
        ..LocalOptions::default()
    };
    // GIVEN at most 2 connections and 1 request/s (10 a window) per principal, and no limit
    // per connection, so every refusal below is the principal's
    options.handler.principal_limit = PrincipalLimit {
        max_connections: 2,
        per_second: 1,
    };
    options.handler.rate_limit = RateLimit {
        per_second: 0,
        burst: 0,
    };
    let mut moto = None;
    match mode {
        Mode::Embedded => {
            options.store = StoreChoice::Embedded(EmbeddedStore::new(Retention::default()));
        }
        Mode::AwsLike => {
            options.store = StoreChoice::Embedded(EmbeddedStore::new(Retention::default()));
            AwsLike::default().apply(&mut options);
        }
        Mode::Moto => {
            let server = Moto::start()
                .await
                .expect("moto must start (run scripts/test)");
            options.store = StoreChoice::DynamoDb {
                endpoint: Some(server.endpoint()),
                region: "us-east-1".into(),
                tables: Tables {
                    events: unique_name("events"),
                    connections: unique_name("connections"),
                },
            };
            moto = Some(server);
        }
    }
    let stack = stack::start(options).await.expect("local stack starts");
    (stack, moto)
}

/// The handshake's HTTP status: 101 and the socket, or the refusal's status.
async fn connect(url: &str) -> Result<Ws, u16> {
    match tokio_tungstenite::connect_async(url).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("handshake failed without an HTTP status: {e}"),
    }
}

/// Sends a `history` request and returns its answer (the route response).
async fn ask(ws: &mut Ws) -> Value {
    ws.send(Message::text(
        json!({"action":"history","after":0}).to_string(),
    ))
    .await
    .expect("send");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("an answer in time")
            .expect("open")
            .expect("a frame");
        if let Message::Text(t) = msg {
            return serde_json::from_str(t.as_str()).expect("JSON");
        }
    }
}

fn refused_as_principal(answer: &Value) -> bool {
    answer["error"]["code"] == json!("rate_limited")
        && answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("connections together"))
}

async fn scenario(mode: Mode) {
    let (stack, _moto) = start(mode).await;
    let url = stack.websocket_url.clone();
    // AND a window just begun (the chat's clock is this machine's), so the requests below
    // all fall in one window
    let window_ms = PRINCIPAL_WINDOW_SECS * 1000;
    let into = chat_shared::now_ms().rem_euclid(window_ms);
    tokio::time::sleep(Duration::from_millis((window_ms - into) as u64 + 50)).await;
    let started = chat_shared::now_ms();
    let mut a = connect(&url).await.expect("first connection");
    let mut b = connect(&url).await.expect("second connection");

    // WHEN its two connections make 16 requests between them
    let mut answers = Vec::new();
    for i in 0..16 {
        let ws = if i % 2 == 0 { &mut a } else { &mut b };
        answers.push(ask(ws).await);
    }
    // THEN the first 10 are answered and the other 6 refused, from either connection, with a
    // rate_limited frame that says the limit is across connections
    for (i, answer) in answers.iter().enumerate() {
        if i < 10 {
            assert!(answer.get("history").is_some(), "request {i}: {answer}");
        } else {
            assert!(refused_as_principal(answer), "request {i}: {answer}");
            assert_eq!(answer["error"]["action"], json!("history"));
        }
    }

    // WHEN a third connection is opened THEN the handshake is refused with 429
    assert_eq!(connect(&url).await.err(), Some(429));

    // WHEN one connection closes THEN its slot frees ($disconnect gives it back) and a new
    // connection is let in
    a.close(None).await.expect("close");
    let mut c = None;
    for _ in 0..100 {
        match connect(&url).await {
            Ok(ws) => {
                c = Some(ws);
                break;
            }
            Err(429) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(other) => panic!("unexpected refusal {other}"),
        }
    }
    let mut c = c.expect("a slot freed by the close");
    // AND the new connection gets no fresh budget: the window is still spent
    let answer = ask(&mut c).await;
    assert_eq!(
        chat_shared::now_ms().div_euclid(window_ms),
        started.div_euclid(window_ms),
        "the scenario outlasted its {PRINCIPAL_WINDOW_SECS} s window; nothing is proven"
    );
    assert!(refused_as_principal(&answer), "{answer}");
    stack.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn embedded_one_address_is_bounded_across_its_connections() {
    scenario(Mode::Embedded).await;
}

#[tokio::test]
async fn aws_like_one_address_is_bounded_across_its_connections() {
    scenario(Mode::AwsLike).await;
}

#[tokio::test]
async fn moto_one_address_is_bounded_across_its_connections() {
    scenario(Mode::Moto).await;
}
