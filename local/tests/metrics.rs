//! `GET /metrics` after a scripted chat: the handler's requests by route and outcome and the
//! fan-out's deliveries, in Prometheus text, counted exactly. One test in its own binary: the
//! `metrics` facade has one recorder per process, which a second stack would share.

use std::collections::BTreeMap;
use std::time::Duration;

use chat_local::stack::{self, LocalOptions, RunningStack};
use chat_shared::metrics::{
    BATCH_SIZE, BROADCAST_DURATION, DELIVERIES, HANDLER_LATENCY, HANDLER_REQUESTS,
    RECIPIENTS_PER_EVENT, STREAM_LAG,
};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// `GET /metrics` over a plain HTTP/1.1 connection: the samples, `name{labels}` → value.
async fn scrape(stack: &RunningStack) -> BTreeMap<String, f64> {
    let mut tcp = tokio::net::TcpStream::connect(stack.addr)
        .await
        .expect("connect");
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    // Prometheus text format: `# HELP`/`# TYPE` lines, then `name{labels} value` samples.
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            let value = value.parse().unwrap_or_else(|_| panic!("a number: {l}"));
            (series.to_owned(), value)
        })
        .collect()
}

fn sample(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
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

/// Reads frames until one has `key` (fan-out frames of earlier events may come first).
async fn until_frame(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    key: &str,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    for _ in 0..50 {
        let frame = next_json(ws).await;
        if frame.get(key).is_some() && wanted(&frame) {
            return frame;
        }
    }
    panic!("no {key} frame in 50");
}

#[tokio::test]
async fn metrics_after_a_scripted_chat_count_its_requests_and_deliveries() {
    // GIVEN the local stack, with alice and bob named (so both are in lobby)
    let stack = stack::start(LocalOptions {
        port: 0,
        ..LocalOptions::default()
    })
    .await
    .expect("local stack starts");
    let (mut alice, _) = tokio_tungstenite::connect_async(&stack.websocket_url)
        .await
        .expect("alice connects");
    let (mut bob, _) = tokio_tungstenite::connect_async(&stack.websocket_url)
        .await
        .expect("bob connects");
    for (ws, name) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        ws.send(Message::text(
            json!({"action":"setName","name":name}).to_string(),
        ))
        .await
        .expect("send");
    }
    // Both see the room with both of them: the presence broadcasts are done. Each `members`
    // frame a client got is one delivery (a join's two frames count as one recipient).
    let mut presence_deliveries = 0.0;
    for ws in [&mut alice, &mut bob] {
        loop {
            let frame = next_json(ws).await;
            if let Some(members) = frame["members"].as_array() {
                presence_deliveries += 1.0;
                if members.len() == 2 {
                    break;
                }
            }
        }
    }
    // A broadcast is counted once it has finished (after its last frame went out): wait,
    // boundedly, until the presence broadcasts are.
    let mut before = scrape(&stack).await;
    for _ in 0..100 {
        if sample(&before, DELIVERIES) >= presence_deliveries {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        before = scrape(&stack).await;
    }
    assert_eq!(
        sample(&before, DELIVERIES),
        presence_deliveries,
        "{before:#?}"
    );

    // WHEN alice says three things, sends an empty message and an unknown action
    // (one at a time, each seen by both before the next: a room's events that share a stream
    // batch go out together and count as one broadcast, crate::batching)
    for text in ["one", "two", "three"] {
        alice
            .send(Message::text(
                json!({"action":"sendPublic","message":text}).to_string(),
            ))
            .await
            .expect("send");
        let said = format!("alice: {text}");
        for ws in [&mut alice, &mut bob] {
            until_frame(ws, "publicMessage", |f| f["publicMessage"] == said.as_str()).await;
        }
    }
    alice
        .send(Message::text(
            json!({"action":"sendPublic","message":""}).to_string(),
        ))
        .await
        .expect("send");
    alice
        .send(Message::text(json!({"action":"dance"}).to_string()))
        .await
        .expect("send");
    // (both answered before the scrape: the empty message's error, then the dance's)
    until_frame(&mut alice, "error", |f| {
        f["error"]["code"] == "invalid_message"
    })
    .await;
    until_frame(&mut alice, "error", |f| {
        f["error"]["code"] == "unknown_action"
    })
    .await;
    // Wait, boundedly, for the three broadcasts to be counted.
    let deliveries =
        |s: &BTreeMap<String, f64>| sample(s, DELIVERIES) - sample(&before, DELIVERIES);
    let mut after = scrape(&stack).await;
    for _ in 0..100 {
        if deliveries(&after) >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = scrape(&stack).await;
    }

    // THEN /metrics counts six deliveries: three broadcasts of two recipients each
    assert_eq!(deliveries(&after), 6.0, "{after:#?}");
    let delta = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(
        delta(&format!("{RECIPIENTS_PER_EVENT}_count")),
        3.0,
        "{after:#?}"
    );
    assert_eq!(
        delta(&format!("{RECIPIENTS_PER_EVENT}_sum")),
        6.0,
        "{after:#?}"
    );
    assert_eq!(
        delta(&format!("{BROADCAST_DURATION}_count")),
        3.0,
        "{after:#?}"
    );
    // AND the handler's requests by route and outcome: three stored, one refused by its code,
    // the unknown action on $default
    let requests = |route: &str, outcome: &str| {
        delta(&format!(
            "{HANDLER_REQUESTS}{{Route=\"{route}\",Outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(requests("sendPublic", "ok"), 3.0, "{after:#?}");
    assert_eq!(requests("sendPublic", "invalid_message"), 1.0, "{after:#?}");
    assert_eq!(requests("$default", "unknown_action"), 1.0, "{after:#?}");
    assert_eq!(
        requests("$connect", "ok"),
        0.0,
        "connected before the first scrape"
    );
    assert!(
        sample(
            &after,
            &format!("{HANDLER_REQUESTS}{{Route=\"$connect\",Outcome=\"ok\"}}")
        ) >= 2.0,
        "{after:#?}"
    );
    assert_eq!(
        delta(&format!("{HANDLER_LATENCY}_count{{Route=\"sendPublic\"}}")),
        4.0,
        "{after:#?}"
    );
    // AND the stream side: every batch counted, each record's lag observed
    assert!(delta(&format!("{BATCH_SIZE}_count")) >= 1.0, "{after:#?}");
    assert!(delta(&format!("{STREAM_LAG}_count")) >= 3.0, "{after:#?}");
    stack.shutdown().await.expect("shutdown");
}
