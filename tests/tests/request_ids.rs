//! `requestId`: a write request sent again with the same `requestId` is stored once and
//! answered as the first was (issue #10 item 4; the contract is `shared/src/store/requests.rs`
//! and the README's *Wire protocol*).
//!
//! The scenario that matters is the ambiguous write: a `TransactWriteItems` that commits while
//! its caller sees an error. [`DropProxy`] makes one for real: it sits between the SDK and
//! moto, forwards a `TransactWriteItems`, lets moto commit it and answer, then closes the
//! connection instead of passing the answer on. The handler must then say "could not confirm"
//! (not "nothing was written"), and the resend must be answered with the first's ids without
//! writing again.
//!
//! The rest of the contract runs through chat-api-handler's own code against every store: the
//! embedded store (ideal and AWS-like) and the DynamoDB store on moto.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use chat_shared::config::{HandlerConfig, Retention, Tables};
use chat_shared::events::{ChatEvent, StoredEvent};
use chat_shared::handler::{handle_request, UNCONFIRMED_MESSAGE, UNCONFIRMED_NO_ID_MESSAGE};
use chat_shared::ratelimit::RateLimit;
use chat_shared::store::aws_like::StoreBehaviour;
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::{ChatStore, EventRange};
use chat_tests::{unique_name, Moto, World};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;

// ---------------------------------------------------------------------------------------------
// A proxy that loses the answers of committed transactions
// ---------------------------------------------------------------------------------------------

/// A loopback TCP proxy in front of moto. Armed, it forwards the next `TransactWriteItems`
/// requests as usual (moto commits them and answers) and then closes the client's connection
/// without passing the answer on: the write happened, its caller cannot know.
struct DropProxy {
    addr: std::net::SocketAddr,
    /// Transactions whose answer is still to be dropped.
    armed: Arc<AtomicUsize>,
    /// Answers dropped so far (each read from moto first: its transaction was processed).
    dropped: Arc<AtomicUsize>,
}

const TRANSACT_TARGET: &[u8] = b"DynamoDB_20120810.TransactWriteItems";

impl DropProxy {
    async fn start(upstream: std::net::SocketAddr) -> DropProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let armed = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (a, d) = (Arc::clone(&armed), Arc::clone(&dropped));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(Self::relay(
                    client,
                    upstream,
                    Arc::clone(&a),
                    Arc::clone(&d),
                ));
            }
        });
        DropProxy {
            addr,
            armed,
            dropped,
        }
    }

    /// Drops the answers of the next `n` transactions.
    fn drop_next_transactions(&self, n: usize) {
        self.armed.store(n, Ordering::SeqCst);
    }

    fn dropped(&self) -> usize {
        self.dropped.load(Ordering::SeqCst)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn relay(
        client: TcpStream,
        upstream: std::net::SocketAddr,
        armed: Arc<AtomicUsize>,
        dropped: Arc<AtomicUsize>,
    ) {
        let Ok(server) = TcpStream::connect(upstream).await else {
            return;
        };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut server_read, mut server_write) = server.into_split();
        let dropping = Arc::new(AtomicBool::new(false));
        let marked = Arc::clone(&dropping);
        // Client → moto: a request is inspected before it is forwarded, so the mark is set
        // before moto can answer it.
        let up = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match client_read.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let chunk = &buf[..n];
                if chunk
                    .windows(TRANSACT_TARGET.len())
                    .any(|w| w == TRANSACT_TARGET)
                    && armed
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| k.checked_sub(1))
                        .is_ok()
                {
                    marked.store(true, Ordering::SeqCst);
                }
                if server_write.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        // Moto → client: the answer of a marked request is read (the transaction is done) and
        // the connection closed instead.
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if dropping.load(Ordering::SeqCst) {
                dropped.fetch_add(1, Ordering::SeqCst);
                break;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        up.abort();
        let _ = client_write.shutdown().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn config() -> HandlerConfig {
    // No rate limit: its bucket is a write of its own, beside the point here.
    HandlerConfig {
        rate_limit: RateLimit {
            per_second: 0,
            burst: 0,
        },
        ..HandlerConfig::default()
    }
}

/// Sends `frame` from connection `id` through chat-api-handler on `store`; the route response.
async fn send(store: &dyn ChatStore, id: &str, frame: Value) -> Option<Value> {
    let action = frame["action"].as_str().unwrap_or("$default").to_owned();
    let body = frame.to_string();
    let r = handle_request(
        store,
        &config(),
        World::event(&action, id, Some(&body)),
        chat_shared::now_ms(),
    )
    .await
    .expect("handler");
    assert_eq!(r.status_code, 200);
    match r.body {
        None | Some(aws_lambda_events::encodings::Body::Empty) => None,
        Some(aws_lambda_events::encodings::Body::Text(t)) => {
            Some(serde_json::from_str(&t).expect("JSON"))
        }
        Some(other) => panic!("unexpected body {other:?}"),
    }
}

/// Connects `id` (authenticated as `identity` when given) and sets `name`.
async fn member(store: &dyn ChatStore, id: &str, identity: Option<&str>, name: &str) {
    store
        .add_identified_connection(id, identity, chat_shared::now_ms())
        .await
        .expect("connect");
    let reply = send(store, id, json!({"action":"setName","name":name})).await;
    assert_eq!(reply, None, "{name} joins");
}

/// Every event of `room`'s log.
async fn log(store: &dyn ChatStore, room: &str) -> Vec<StoredEvent> {
    store
        .read_events(room, EventRange::After(0), 100, chat_shared::now_ms())
        .await
        .expect("read log")
        .events
}

/// How many events of `room` carry `message` (public or private).
async fn stored(store: &dyn ChatStore, room: &str, message: &str) -> Vec<u64> {
    log(store, room)
        .await
        .into_iter()
        .filter(|e| match &e.event {
            ChatEvent::MessagePosted { message: m, .. }
            | ChatEvent::PrivateMessageSent { message: m, .. } => m == message,
            _ => false,
        })
        .map(|e| e.seq)
        .collect()
}

/// How many `kind` events of `connection`'s in `room`.
async fn count(store: &dyn ChatStore, room: &str, kind: &str, connection: &str) -> usize {
    log(store, room)
        .await
        .iter()
        .filter(|e| e.event.type_name() == kind && sender(&e.event) == connection)
        .count()
}

/// The connection that caused the event.
fn sender(event: &ChatEvent) -> &str {
    match event {
        ChatEvent::MemberJoined { connection_id, .. }
        | ChatEvent::MemberRenamed { connection_id, .. }
        | ChatEvent::MemberLeft { connection_id, .. }
        | ChatEvent::MessagePosted { connection_id, .. }
        | ChatEvent::PrivateMessageSent { connection_id, .. } => connection_id,
    }
}

fn newest(events: &[StoredEvent]) -> u64 {
    events.last().map_or(0, |e| e.seq)
}

// ---------------------------------------------------------------------------------------------
// The ambiguous write, for real (DynamoDB on moto, behind DropProxy)
// ---------------------------------------------------------------------------------------------

/// A DynamoDB store talking to moto through `proxy`; without the SDK's retries when `retries`
/// is false (so the handler sees the lost answer).
fn proxied_store(w: &World, proxy: &DropProxy, retries: bool) -> DynamoStore {
    let mut conf =
        aws_sdk_dynamodb::config::Builder::from(&w.moto.sdk_config()).endpoint_url(proxy.url());
    if !retries {
        conf = conf.retry_config(RetryConfig::disabled());
    }
    DynamoStore::new(
        aws_sdk_dynamodb::Client::from_conf(conf.build()),
        w.tables.clone(),
        Retention::default(),
    )
}

async fn moto_world() -> (World, DropProxy) {
    let w = World::new(chat_tests::WorldConfig {
        handler: config(),
        fanout: Default::default(),
    })
    .await
    .expect("moto must start (run scripts/test)");
    let proxy = DropProxy::start(([127, 0, 0, 1], w.moto.port()).into()).await;
    (w, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_committed_but_unanswered_is_reported_honestly_and_its_resend_is_stored_once() {
    // GIVEN alice and bob are members, and alice's store loses the answer of its next
    // transaction (moto commits it), with the SDK's retries off so the handler sees the loss
    let (w, proxy) = moto_world().await;
    member(&w.store, "A", None, "alice").await;
    member(&w.store, "B", None, "bob").await;
    let lossy = proxied_store(&w, &proxy, false);

    let cases = [
        (
            json!({"action":"sendPublic","message":"hello","requestId":"r-1"}),
            "lobby",
        ),
        (
            json!({"action":"sendPrivate","to":"bob","message":"psst","requestId":"r-2"}),
            "lobby",
        ),
        (
            json!({"action":"join","room":"ops","requestId":"r-3"}),
            "ops",
        ),
        (
            json!({"action":"leave","room":"ops","requestId":"r-4"}),
            "ops",
        ),
        (
            json!({"action":"setName","name":"al","requestId":"r-5"}),
            "lobby",
        ),
    ];
    for (frame, room) in cases {
        let action = frame["action"].as_str().expect("action").to_owned();
        let request_id = frame["requestId"].clone();
        let before = log(&w.store, room).await;
        proxy.drop_next_transactions(1);
        let dropped = proxy.dropped();

        // WHEN alice sends it and the answer of its transaction is lost
        let first = send(&lossy, "A", frame.clone()).await.expect("an answer");

        // THEN she is told it may have been stored, with her requestId, not "nothing written"
        assert_eq!(proxy.dropped(), dropped + 1, "{action}: an answer was lost");
        assert_eq!(
            first,
            json!({"error":{"code":"internal_error","message":UNCONFIRMED_MESSAGE,"action":action,"requestId":request_id}}),
            "{action}"
        );
        // AND it was stored: exactly one event more, the one the transaction committed
        let after = log(&w.store, room).await;
        assert_eq!(after.len(), before.len() + 1, "{action}: committed once");
        let id = newest(&after);

        // WHEN she resends it with the same requestId
        let again = send(&lossy, "A", frame.clone()).await.expect("an answer");

        // THEN it is answered with the first's id and nothing more is stored
        let expected = match action.as_str() {
            "sendPublic" => {
                json!({"ok":{"action":"sendPublic","requestId":request_id,"room":"lobby","id":id}})
            }
            "sendPrivate" => json!({"ok":{"action":"sendPrivate","requestId":request_id,"id":id}}),
            "join" => json!({"joined":{"room":"ops","id":id,"requestId":request_id}}),
            "leave" => json!({"left":{"room":"ops","id":id,"requestId":request_id}}),
            _ => {
                json!({"ok":{"action":"setName","requestId":request_id,"name":"al","events":[{"room":"lobby","id":id}]}})
            }
        };
        assert_eq!(again, expected, "{action}");
        assert_eq!(log(&w.store, room).await, after, "{action}: stored once");
    }
    // AND alice's post and whisper are each in the log once
    assert_eq!(stored(&w.store, "lobby", "hello").await.len(), 1);
    assert_eq!(stored(&w.store, "lobby", "psst").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_the_sdk_retries_is_answered_with_the_first_id() {
    // GIVEN alice is a member and her store (the SDK's retries on, as in the Lambda) loses the
    // answer of its next transaction
    let (w, proxy) = moto_world().await;
    member(&w.store, "A", None, "alice").await;
    let store = proxied_store(&w, &proxy, true);
    proxy.drop_next_transactions(1);

    // WHEN she posts with a requestId
    let reply = send(
        &store,
        "A",
        json!({"action":"sendPublic","message":"once","requestId":"r-9"}),
    )
    .await;

    // THEN the SDK's retry of the committed transaction is cancelled (the counter moved), the
    // retry finds the request item, and she gets the first's id: one event, one answer
    assert_eq!(proxy.dropped(), 1, "an answer was lost");
    let ids = stored(&w.store, "lobby", "once").await;
    assert_eq!(ids.len(), 1, "stored once: {ids:?}");
    assert_eq!(
        reply,
        Some(json!({"ok":{"action":"sendPublic","requestId":"r-9","room":"lobby","id":ids[0]}}))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_request_id_a_lost_answer_is_still_not_called_nothing_written() {
    // GIVEN alice's store loses the answer of its next transaction, SDK retries off
    let (w, proxy) = moto_world().await;
    member(&w.store, "A", None, "alice").await;
    let lossy = proxied_store(&w, &proxy, false);
    proxy.drop_next_transactions(1);
    // WHEN she posts without a requestId
    let reply = send(
        &lossy,
        "A",
        json!({"action":"sendPublic","message":"maybe"}),
    )
    .await;
    // THEN she hears it may have been stored, and that a requestId makes a resend safe
    assert_eq!(
        reply,
        Some(
            json!({"error":{"code":"internal_error","message":UNCONFIRMED_NO_ID_MESSAGE,"action":"sendPublic"}})
        )
    );
    assert_eq!(stored(&w.store, "lobby", "maybe").await.len(), 1);
}

// ---------------------------------------------------------------------------------------------
// The contract, on every store
// ---------------------------------------------------------------------------------------------

async fn resends_are_answered_as_the_first_and_stored_once(store: &dyn ChatStore) {
    // GIVEN alice and bob are members
    member(store, "A", None, "alice").await;
    member(store, "B", None, "bob").await;

    // WHEN alice sends each write with a requestId, then each again
    let frames = [
        json!({"action":"join","room":"ops","requestId":"j1"}),
        json!({"action":"sendPublic","room":"ops","message":"hi ops","requestId":"p1"}),
        json!({"action":"sendPrivate","to":"BOB","message":"psst","requestId":"w1"}),
        json!({"action":"setName","name":"alicia","requestId":"n1"}),
        json!({"action":"leave","room":"ops","requestId":"l1"}),
    ];
    let mut firsts = Vec::new();
    for frame in &frames {
        firsts.push(send(store, "A", frame.clone()).await);
    }
    let lobby = log(store, "lobby").await;
    let ops = log(store, "ops").await;
    // THEN each first answer is the documented one, with the ids of what was stored
    let id_of = |events: &[StoredEvent], kind: &str| {
        events
            .iter()
            .find(|e| e.event.type_name() == kind && sender(&e.event) == "A")
            .map(|e| e.seq)
            .expect(kind)
    };
    let joined = id_of(&ops, "MemberJoined");
    let posted = id_of(&ops, "MessagePosted");
    let whispered = id_of(&lobby, "PrivateMessageSent");
    let renamed_lobby = id_of(&lobby, "MemberRenamed");
    let renamed_ops = id_of(&ops, "MemberRenamed");
    let left = id_of(&ops, "MemberLeft");
    let expected = [
        json!({"joined":{"room":"ops","id":joined,"requestId":"j1"}}),
        json!({"ok":{"action":"sendPublic","requestId":"p1","room":"ops","id":posted}}),
        json!({"ok":{"action":"sendPrivate","requestId":"w1","id":whispered}}),
        json!({"ok":{"action":"setName","requestId":"n1","name":"alicia","events":[
            {"room":"lobby","id":renamed_lobby},{"room":"ops","id":renamed_ops}]}}),
        json!({"left":{"room":"ops","id":left,"requestId":"l1"}}),
    ];
    for (first, expected) in firsts.iter().zip(&expected) {
        assert_eq!(first.as_ref(), Some(expected));
    }
    // WHEN each is sent again (alice has left ops and renamed since: a resend is answered from
    // its record, not evaluated afresh)
    for (frame, expected) in frames.iter().zip(&expected) {
        let again = send(store, "A", frame.clone()).await;
        // THEN the same answer, and nothing more stored anywhere
        assert_eq!(again.as_ref(), Some(expected), "resend of {frame}");
    }
    assert_eq!(log(store, "lobby").await, lobby);
    assert_eq!(log(store, "ops").await, ops);
    // AND history echoes the requestId (a read: nothing to remember)
    let page = send(
        store,
        "A",
        json!({"action":"history","room":"ops","after":posted - 1,"limit":1,"requestId":"h1"}),
    )
    .await
    .expect("history");
    assert_eq!(page["history"]["requestId"], json!("h1"));
    assert_eq!(page["history"]["frames"][0]["id"], json!(posted));
}

async fn a_request_id_reused_for_another_request_is_refused(store: &dyn ChatStore) {
    // GIVEN alice posted "one" with requestId r1
    member(store, "A", None, "alice").await;
    let first = send(
        store,
        "A",
        json!({"action":"sendPublic","message":"one","requestId":"r1"}),
    )
    .await;
    assert!(first.is_some_and(|f| f["ok"]["id"].is_u64()));
    let before = log(store, "lobby").await;
    // WHEN she sends another message, and another action, under r1
    for frame in [
        json!({"action":"sendPublic","message":"two","requestId":"r1"}),
        json!({"action":"sendPublic","message":"one","room":"lobby2","requestId":"r1"}),
        json!({"action":"join","room":"ops","requestId":"r1"}),
    ] {
        let action = frame["action"].clone();
        let reply = send(store, "A", frame.clone()).await;
        // THEN each is refused, with r1, and nothing is stored
        assert_eq!(
            reply,
            Some(json!({"error":{"code":"invalid_field",
                "message":"requestId \"r1\" was already used for another request; use a new requestId for each request.",
                "action":action,"requestId":"r1"}})),
            "{frame}"
        );
    }
    assert_eq!(log(store, "lobby").await, before);
    assert!(log(store, "ops").await.is_empty());
}

async fn the_scope_is_the_identity_when_authenticated_else_the_connection(store: &dyn ChatStore) {
    // GIVEN u1 is alice on connection a1 and posted with requestId r1
    member(store, "a1", Some("u1"), "alice").await;
    let frame = json!({"action":"sendPublic","message":"from u1","requestId":"r1"});
    let first = send(store, "a1", frame.clone()).await.expect("ok");
    // WHEN u1 reconnects as a2 (a1's answer was lost), takes its name back and resends r1
    member(store, "a2", Some("u1"), "alice").await;
    let again = send(store, "a2", frame.clone()).await;
    // THEN it is the same request: answered as the first, stored once
    assert_eq!(again, Some(first.clone()));
    assert_eq!(stored(store, "lobby", "from u1").await.len(), 1);

    // GIVEN two connections without identity, c1 and c2
    member(store, "c1", None, "carol").await;
    member(store, "c2", None, "dave").await;
    // WHEN each sends its own message under the same requestId
    let frame = |m: &str| json!({"action":"sendPublic","message":m,"requestId":"same"});
    let c1 = send(store, "c1", frame("x")).await.expect("ok");
    let c2 = send(store, "c2", frame("x")).await.expect("ok");
    // THEN they are two requests (the scope is the connection): both stored, two ids
    assert_ne!(c1["ok"]["id"], c2["ok"]["id"]);
    assert_eq!(stored(store, "lobby", "x").await.len(), 2);
    // AND another identity's same requestId is another request too
    member(store, "b1", Some("u2"), "bob").await;
    let b1 = send(
        store,
        "b1",
        json!({"action":"sendPublic","message":"from u1","requestId":"r1"}),
    )
    .await
    .expect("ok");
    assert_ne!(b1["ok"]["id"], first["ok"]["id"]);
    assert_eq!(stored(store, "lobby", "from u1").await.len(), 2);
}

async fn concurrent_resends_store_once(store: Arc<dyn ChatStore>) {
    // GIVEN alice is a member of lobby
    member(store.as_ref(), "A", None, "alice").await;
    // WHEN eight copies of one request (and eight of one join) are released at once
    const COPIES: usize = 8;
    for frame in [
        json!({"action":"sendPublic","message":"racing","requestId":"race-1"}),
        json!({"action":"join","room":"ops","requestId":"race-2"}),
        json!({"action":"sendPrivate","to":"alice2","message":"x","requestId":"race-3"}),
    ] {
        if frame["action"] == "sendPrivate" {
            member(store.as_ref(), "A2", None, "alice2").await;
        }
        let barrier = Arc::new(Barrier::new(COPIES));
        let tasks: Vec<_> = (0..COPIES)
            .map(|_| {
                let (store, barrier, frame) =
                    (Arc::clone(&store), Arc::clone(&barrier), frame.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    send(store.as_ref(), "A", frame).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.expect("task").expect("an answer"));
        }
        // THEN every copy gets the same answer, with one id, and one event is stored
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{frame}: {answers:#?}"
        );
        assert!(answers[0].get("error").is_none(), "{answers:?}");
        match frame["action"].as_str() {
            Some("join") => assert_eq!(count(store.as_ref(), "ops", "MemberJoined", "A").await, 1),
            Some("sendPublic") => {
                assert_eq!(stored(store.as_ref(), "lobby", "racing").await.len(), 1)
            }
            _ => assert_eq!(
                count(store.as_ref(), "lobby", "PrivateMessageSent", "A").await,
                1
            ),
        }
    }
}

async fn a_refused_request_is_not_remembered_and_no_request_id_is_todays_behaviour(
    store: &dyn ChatStore,
) {
    // GIVEN alice is a member of lobby only
    member(store, "A", None, "alice").await;
    // WHEN she posts to ops with requestId r1 (refused: not a member)
    let frame = json!({"action":"sendPublic","room":"ops","message":"early","requestId":"r1"});
    let refused = send(store, "A", frame.clone()).await;
    assert_eq!(
        refused,
        Some(json!({"error":{"code":"not_a_member",
            "message":"You are not a member of room \"ops\"; join it first.",
            "action":"sendPublic","requestId":"r1"}}))
    );
    // AND then joins ops and resends r1
    send(store, "A", json!({"action":"join","room":"ops"})).await;
    let again = send(store, "A", frame).await.expect("ok");
    // THEN the resend is evaluated afresh and stored (the refusal wrote nothing to remember)
    assert_eq!(
        stored(store, "ops", "early").await,
        [again["ok"]["id"].as_u64().expect("id")]
    );
    // AND without requestIds, nothing changes from today: no answer to sends and setName, and
    // every send is stored
    for frame in [
        json!({"action":"sendPublic","message":"plain"}),
        json!({"action":"sendPublic","message":"plain"}),
        json!({"action":"setName","name":"al"}),
        json!({"action":"sendPublic","message":"plain","requestId":null}),
    ] {
        assert_eq!(send(store, "A", frame.clone()).await, None, "{frame}");
    }
    assert_eq!(stored(store, "lobby", "plain").await.len(), 3);
    assert_eq!(
        send(store, "A", json!({"action":"leave","room":"ops"})).await,
        Some(json!({"left":{"room":"ops","id":newest(&log(store, "ops").await)}}))
    );
}

fn embedded() -> Arc<dyn ChatStore> {
    Arc::new(EmbeddedStore::new(Retention::default()))
}

fn aws_like() -> Arc<dyn ChatStore> {
    Arc::new(EmbeddedStore::new(Retention::default()).with_behaviour(StoreBehaviour::aws_like()))
}

async fn dynamodb() -> (Arc<dyn ChatStore>, Moto) {
    let moto = Moto::start()
        .await
        .expect("moto must start (run scripts/test)");
    let tables = Tables {
        events: unique_name("events"),
        connections: unique_name("connections"),
    };
    create_tables(&moto.dynamodb(), &tables)
        .await
        .expect("tables");
    let store = DynamoStore::new(moto.dynamodb(), tables, Retention::default());
    (Arc::new(store), moto)
}

macro_rules! on_every_store {
    ($($case:ident => $call:expr),* $(,)?) => {
        mod embedded_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = super::embedded();
                    #[allow(clippy::redundant_closure_call)]
                    ($call)(store).await;
                }
            )*
        }
        mod aws_like_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let store = super::aws_like();
                    #[allow(clippy::redundant_closure_call)]
                    ($call)(store).await;
                }
            )*
        }
        mod dynamodb_store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _moto) = super::dynamodb().await;
                    #[allow(clippy::redundant_closure_call)]
                    ($call)(store).await;
                }
            )*
        }
    };
}

on_every_store!(
    resends_are_answered_as_the_first_and_stored_once =>
        |s: std::sync::Arc<dyn chat_shared::store::ChatStore>| async move {
            super::resends_are_answered_as_the_first_and_stored_once(s.as_ref()).await
        },
    a_request_id_reused_for_another_request_is_refused =>
        |s: std::sync::Arc<dyn chat_shared::store::ChatStore>| async move {
            super::a_request_id_reused_for_another_request_is_refused(s.as_ref()).await
        },
    the_scope_is_the_identity_when_authenticated_else_the_connection =>
        |s: std::sync::Arc<dyn chat_shared::store::ChatStore>| async move {
            super::the_scope_is_the_identity_when_authenticated_else_the_connection(s.as_ref()).await
        },
    concurrent_resends_store_once =>
        |s: std::sync::Arc<dyn chat_shared::store::ChatStore>| super::concurrent_resends_store_once(s),
    a_refused_request_is_not_remembered_and_no_request_id_is_todays_behaviour =>
        |s: std::sync::Arc<dyn chat_shared::store::ChatStore>| async move {
            super::a_refused_request_is_not_remembered_and_no_request_id_is_todays_behaviour(s.as_ref()).await
        },
);
