//! The bill a local run would cost on AWS: a known script of requests through the whole stack,
//! its metered units at `GET /bill` checked against figures computed by hand from AWS's
//! billing rules and the calls the DynamoDB adapter makes.

use std::time::Duration;

use chat_local::stack::{self, LocalOptions, RunningStack};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// `GET /bill` over a plain HTTP/1.1 connection.
async fn bill(stack: &RunningStack) -> Value {
    let mut tcp = tokio::net::TcpStream::connect(stack.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /bill HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("a JSON bill")
}

async fn next_json(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
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

#[tokio::test]
async fn a_known_script_is_billed_the_units_computed_by_hand() {
    // GIVEN the stack with the embedded store (ideal mode; the rate limits on, per connection
    // and across connections, as by default)
    let stack = stack::start(LocalOptions {
        port: 0,
        ..LocalOptions::default()
    })
    .await
    .expect("local stack starts");

    // WHEN alice connects, joins and says "hi", and each fan-out has delivered
    let (mut ws, _) = tokio_tungstenite::connect_async(&stack.websocket_url)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"action":"setName","name":"alice"}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws).await["members"], json!(["alice"]));
    assert_eq!(
        next_json(&mut ws).await["systemMessage"],
        json!("alice has joined the chat")
    );
    ws.send(Message::text(
        json!({"action":"sendPublic","message":"hi"}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(
        next_json(&mut ws).await["publicMessage"],
        json!("alice: hi")
    );
    // The fan-out's invocation is metered when it returns, just after its last delivery.
    let mut bill_now = bill(&stack).await;
    for _ in 0..100 {
        if bill_now["lambda_requests"] == json!(5) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        bill_now = bill(&stack).await;
    }

    // THEN the units are the hand-computed ones:
    // - API Gateway messages (32 KB units): 2 received (setName, sendPublic) + 3 posted
    //   (members and "has joined" to alice, then her message) = 5
    // - Lambda requests: chat-api-handler for $connect, setName, sendPublic + 2 fan-outs = 5
    // - DynamoDB writes (1 KB units, transactions ×2): $connect takes a slot of 127.0.0.1's
    //   (the limits across connections are on by default): transaction of slots and
    //   connection 2 × 2 = 4; setName: the address's request counter UpdateItem 1 + rate limit
    //   UpdateItem 1 + lobby's presence budget UpdateItem 1 + transaction of claim,
    //   connection, lobby member item, counter, event 5 × 2 = 10; sendPublic: 1 + 1 +
    //   transaction of membership check, counter, event 3 × 2 = 6; total 25
    // - DynamoDB reads (4 KB units, strongly consistent 1, eventual ½): $connect: the slots
    //   GetItem 1; setName: the connection's GetItem for the limits 1 + the connection (which
    //   rooms its presence changes) and lobby's counter for the presence budget 2 +
    //   connection, claim, counter 3; its fan-out: lobby's shard count (GetItem of the counter) 1 + the one
    //   shard's member Query 1 (both strongly consistent); sendPublic: GetItem 1 + connection,
    //   counter 2; its fan-out: shard count 1 + member Query 1; total 14
    // - the counter records on the stream invoke nothing: the mapping filters them out, as
    //   the template's FilterCriteria does
    assert_eq!(bill_now["api_gateway_messages"], json!(5), "{bill_now}");
    assert_eq!(bill_now["lambda_requests"], json!(5), "{bill_now}");
    assert_eq!(bill_now["dynamodb_write_units"], json!(25), "{bill_now}");
    assert_eq!(bill_now["dynamodb_read_units"], json!(14.0), "{bill_now}");
    // AND time-based quantities are there, and the dollars are the price table's
    let gb_s = bill_now["lambda_gb_seconds"].as_f64().expect("GB-s");
    let minutes = bill_now["connection_minutes"].as_f64().expect("minutes");
    assert!(gb_s > 0.0 && minutes > 0.0, "{bill_now}");
    let dollars = &bill_now["dollars"];
    let expect = |got: &Value, want: f64| {
        let got = got.as_f64().expect("a number");
        assert!((got - want).abs() < 1e-12, "{got} != {want}");
    };
    expect(&dollars["api_gateway"], 5.0 * 1e-6 + minutes * 0.25e-6);
    expect(&dollars["lambda"], 5.0 * 0.2e-6 + gb_s * 0.000_013_333_4);
    expect(&dollars["dynamodb"], 14.0 * 0.125e-6 + 25.0 * 0.625e-6);
    stack.shutdown().await.expect("clean shutdown");
}
