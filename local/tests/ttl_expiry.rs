//! TTL expiry leaves every room, end to end on the local stack with real WebSocket clients, in
//! the ideal and the AWS-like mode: a client vanishes without a `$disconnect` (the gateway
//! emulator loses it, as AWS may) and nothing ever broadcasts to it, so only its TTL can end
//! it. Its connection is made to expire at once ([`EmbeddedStore::set_connection_expiry`]: the
//! same item a short `--connection-ttl-seconds` would write, for one connection, without
//! waiting), the stack's TTL sweeper deletes it, the connections feed's `REMOVE` passes the
//! expiry mapping's filter, and the other members of each of its rooms see it leave. An
//! ordinary `$disconnect` never invokes that path (the mapping's filter drops its delete).
//!
//! (moto runs no TTL deletions; `tests/tests/ttl_expiry.rs` drives the same path there by
//! feeding the record.)

use std::collections::BTreeMap;
use std::time::Duration;

use chat_local::aws_like::AwsLike;
use chat_local::esm::EsmConfig;
use chat_local::gateway::GatewayConfig;
use chat_local::stack::{self, LocalOptions, RunningStack, Shutdown, StoreChoice};
use chat_shared::config::Retention;
use chat_shared::events::{ChatEvent, LeaveReason};
use chat_shared::store::embedded::EmbeddedStore;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const EXPECT: Duration = Duration::from_secs(10);

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake");
        Client { ws }
    }

    async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::text(frame.to_string()))
            .await
            .expect("send");
    }

    async fn next(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(EXPECT, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("the connection is open")
                .expect("a valid frame");
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).expect("JSON frame");
            }
        }
    }

    /// Skips frames until one matches; returns it.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let f = self.next().await;
            if pred(&f) {
                return f;
            }
        }
    }

    /// A frame of `room` with `key` set.
    async fn next_in(&mut self, room: &str, key: &str) -> Value {
        self.until(|f| f["room"] == json!(room) && f.get(key).is_some())
            .await
    }
}

async fn start(aws_like: bool, drop_disconnect: bool) -> (RunningStack, EmbeddedStore) {
    // Warnings (a failed delivery, a store error) show with a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let store = EmbeddedStore::new(Retention::default());
    let mut options = LocalOptions {
        port: 0,
        store: StoreChoice::Embedded(store.clone()),
        gateway: GatewayConfig {
            drop_disconnect,
            ..GatewayConfig::default()
        },
        esm: EsmConfig {
            poll_wait: Duration::from_millis(50),
            retry_backoff: Duration::from_millis(20),
            ..EsmConfig::default()
        },
        // A prompt sweeper (the knob docs/local-stack.md describes).
        ttl_sweep: Duration::from_millis(100),
        ..LocalOptions::default()
    };
    options.handler.rate_limit.per_second = 0;
    if aws_like {
        AwsLike::default().apply(&mut options);
    }
    let stack = stack::start(options).await.expect("local stack starts");
    (stack, store)
}

/// A client named `name` (its own join frames consumed), and its connection id (from its
/// `MemberJoined`, the one place the chat records it).
async fn member(url: &str, store: &EmbeddedStore, name: &str) -> (Client, String) {
    let mut c = Client::connect(url).await;
    c.send(json!({"action":"setName","name":name})).await;
    c.until(|f| f["systemMessage"] == json!(format!("{name} has joined the chat")))
        .await;
    let id = store
        .events_in("lobby")
        .into_iter()
        .find_map(|e| match e.event {
            ChatEvent::MemberJoined {
                connection_id,
                name: n,
            } if n == name => Some(connection_id),
            _ => None,
        })
        .expect("its MemberJoined");
    (c, id)
}

/// `c` (named `name`) joins `room`; its own join frames there are consumed.
async fn join(c: &mut Client, name: &str, room: &str) {
    c.send(json!({"action":"join","room":room})).await;
    c.until(|f| {
        f["room"] == json!(room)
            && f["systemMessage"] == json!(format!("{name} has joined the chat"))
    })
    .await;
}

/// Reads `c`'s frames until each of `rooms` has told it `name` left, then sent its member
/// list; returns each room's list. Rooms are independent streams: their frames may interleave
/// in any order.
async fn leaves<'r>(c: &mut Client, name: &str, rooms: &[&'r str]) -> BTreeMap<&'r str, Value> {
    let left = json!(format!("{name} has left the chat"));
    let mut heard: BTreeMap<&'r str, Option<Value>> = BTreeMap::new();
    while heard.len() < rooms.len() || heard.values().any(Option::is_none) {
        let f = c.next().await;
        let Some(room) = rooms.iter().copied().find(|r| f["room"] == json!(r)) else {
            continue;
        };
        if f["systemMessage"] == left {
            heard.insert(room, None);
        } else if let (Some(list), Some(slot)) = (f.get("members"), heard.get_mut(room)) {
            *slot = Some(list.clone());
        }
    }
    heard
        .into_iter()
        .map(|(r, l)| (r, l.unwrap_or_default()))
        .collect()
}

async fn stop(stack: RunningStack) -> Shutdown {
    let stopped = stack.shutdown().await.expect("clean shutdown");
    assert!(stopped.drained, "both streams drained");
    assert_eq!(stopped.mapping.failed_invocations, 0);
    assert_eq!(stopped.expiry_mapping.failed_invocations, 0);
    stopped
}

async fn expiry_scenario(aws_like: bool) {
    // GIVEN a gateway that loses every $disconnect; alice, bob and carol in lobby, alice and
    // bob in ops, bob and carol in dev
    let (stack, store) = start(aws_like, true).await;
    let url = stack.websocket_url.clone();
    let (mut alice, _) = member(&url, &store, "alice").await;
    let (mut bob, bob_id) = member(&url, &store, "bob").await;
    let (mut carol, _) = member(&url, &store, "carol").await;
    join(&mut alice, "alice", "ops").await;
    join(&mut bob, "bob", "ops").await;
    join(&mut bob, "bob", "dev").await;
    join(&mut carol, "carol", "dev").await;
    // WHEN bob's socket drops with no $disconnect, and his connection's TTL runs out
    drop(bob);
    assert!(store.set_connection_expiry(&bob_id, chat_shared::now_ms() / 1000 - 1));

    // THEN the other members of each of his rooms see him leave, with the room's new list
    assert_eq!(
        leaves(&mut alice, "bob", &["lobby", "ops"]).await,
        BTreeMap::from([
            ("lobby", json!(["alice", "carol"])),
            ("ops", json!(["alice"]))
        ])
    );
    assert_eq!(
        leaves(&mut carol, "bob", &["lobby", "dev"]).await,
        BTreeMap::from([
            ("lobby", json!(["alice", "carol"])),
            ("dev", json!(["carol"]))
        ])
    );
    // AND it was his expiry that did it, once per room (not a prune on 410)
    for room in ["lobby", "ops", "dev"] {
        let leaves: Vec<LeaveReason> = store
            .events_in(room)
            .into_iter()
            .filter_map(|e| match e.event {
                ChatEvent::MemberLeft {
                    connection_id,
                    reason,
                    ..
                } if connection_id == bob_id => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(leaves, vec![LeaveReason::Expired], "{room}");
    }
    // AND his name is free again
    let (_new_bob, _) = member(&url, &store, "bob").await;
    let stopped = stop(stack).await;
    // AND the expiry mapping invoked the fan-out for his TTL deletion only
    assert_eq!(stopped.expiry_mapping.invocations, 1);
}

async fn ordinary_disconnect_scenario(aws_like: bool) {
    // GIVEN alice and bob, with $disconnect delivered as usual
    let (stack, store) = start(aws_like, false).await;
    let url = stack.websocket_url.clone();
    let (mut alice, _) = member(&url, &store, "alice").await;
    let (bob, _) = member(&url, &store, "bob").await;
    alice
        .until(|f| f["systemMessage"] == json!("bob has joined the chat"))
        .await;
    // WHEN bob closes: his $disconnect deletes his connection item (an ordinary delete)
    drop(bob);
    assert_eq!(
        alice.next_in("lobby", "systemMessage").await["systemMessage"],
        json!("bob has left the chat")
    );
    // THEN (and after the shutdown's own $disconnects) the expiry mapping never invoked the
    // fan-out: its filter dropped every one of those deletes
    let stopped = stop(stack).await;
    assert_eq!(stopped.expiry_mapping.invocations, 0);
    assert!(
        stopped.expiry_mapping.filtered >= 2,
        "{:?}",
        stopped.expiry_mapping
    );
    // AND bob left by his $disconnect, once
    let reasons: Vec<LeaveReason> = store
        .events_in("lobby")
        .into_iter()
        .filter_map(|e| match e.event {
            ChatEvent::MemberLeft { name, reason, .. } if name == "bob" => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(reasons, vec![LeaveReason::Disconnected]);
}

#[tokio::test]
async fn an_expired_connection_is_seen_leaving_each_of_its_rooms() {
    expiry_scenario(false).await;
}

#[tokio::test]
async fn an_expired_connection_is_seen_leaving_each_of_its_rooms_aws_like() {
    expiry_scenario(true).await;
}

#[tokio::test]
async fn an_ordinary_disconnect_never_invokes_the_expiry_path() {
    ordinary_disconnect_scenario(false).await;
}

#[tokio::test]
async fn an_ordinary_disconnect_never_invokes_the_expiry_path_aws_like() {
    ordinary_disconnect_scenario(true).await;
}
