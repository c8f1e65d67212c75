//! The message history: the `history` route's pages (through chat-api-handler's code, on both
//! stores, and on the embedded one with store latency as well) and the id guarantee under
//! concurrent writers.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use aws_lambda_events::encodings::Body;
use chat_shared::config::{HandlerConfig, Retention, Tables};
use chat_shared::handler::handle_request;
use chat_shared::store::aws_like::StoreBehaviour;
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::{ChatStore, EventRange};
use chat_shared::validation::validate_name;
use chat_tests::{fixture_json, unique_name, Moto};
use serde_json::{json, Value};

/// A store to test, and what keeps it alive.
struct Subject {
    store: Arc<dyn ChatStore>,
    _moto: Option<Moto>,
}

async fn embedded() -> Subject {
    Subject {
        store: Arc::new(EmbeddedStore::new(Retention::default()).with_page_limit(3)),
        _moto: None,
    }
}

/// The embedded store in AWS-like mode (`chat-local --aws-like`): 5 ms reads, 10 ms writes,
/// writers colliding on the room's counter, eventually consistent reads lagging. Without the
/// per-partition throughput limit: these cases write faster than one partition's 1,000 write
/// units a second on purpose, and a throttled write is not what they are about.
async fn embedded_aws_like() -> Subject {
    let behaviour = StoreBehaviour {
        partition: None,
        ..StoreBehaviour::aws_like()
    };
    Subject {
        store: Arc::new(
            EmbeddedStore::new(Retention::default())
                .with_page_limit(3)
                .with_behaviour(behaviour),
        ),
        _moto: None,
    }
}

async fn dynamodb() -> Subject {
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
    let store = DynamoStore::new(moto.dynamodb(), tables, Retention::default()).with_page_limit(3);
    Subject {
        store: Arc::new(store),
        _moto: Some(moto),
    }
}

fn request(connection_id: &str, body: &Value) -> ApiGatewayWebsocketProxyRequest {
    let mut v = fixture_json("apigw-websocket-sendpublic.json");
    v["requestContext"]["connectionId"] = json!(connection_id);
    v["requestContext"]["routeKey"] = json!("history");
    v["body"] = json!(body.to_string());
    serde_json::from_value(v).expect("event")
}

/// The bound on one `history` response, envelope included (README, *Message history*: "a
/// response stops early to stay under 120 KB"; `history::HISTORY_MAX_BYTES`), well inside API
/// Gateway's 128 KB message limit.
const HISTORY_MAX_BYTES: usize = 120 * 1024;

/// Sends a `history` request through the handler; returns the response frame. Every response
/// is checked as the bytes that would be sent: the whole message under 120 KB.
async fn history(store: &dyn ChatStore, connection_id: &str, body: Value) -> Value {
    let r = handle_request(
        store,
        &HandlerConfig::default(),
        request(connection_id, &body),
        chat_shared::now_ms(),
    )
    .await
    .expect("handler");
    let text = match r.body {
        Some(Body::Text(t)) => t,
        other => panic!("expected a body, got {other:?}"),
    };
    let response: Value = serde_json::from_str(&text).expect("JSON");
    assert!(
        text.len() <= HISTORY_MAX_BYTES,
        "a history response of {} bytes, over 120 KB",
        text.len()
    );
    response
}

/// Follows `next` from a first request until the end; returns every frame, page by page.
async fn all_pages(store: &dyn ChatStore, connection_id: &str, first: Value) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut req = Some(first);
    while let Some(body) = req.take() {
        let response = history(store, connection_id, body).await;
        let page = &response["history"];
        assert!(page.is_object(), "not a history frame: {response}");
        pages.push(page["frames"].as_array().expect("frames").clone());
        if let Some(next) = page.get("next") {
            req = Some(next.clone());
        }
        assert!(pages.len() < 1000, "pagination does not end");
    }
    pages
}

fn ids(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .map(|f| f["id"].as_u64().expect("id"))
        .collect()
}

/// alice joins, posts 12 public messages with a private one to bob in the middle; bob joins
/// after the third message. Returns the ids of all public history events in order.
async fn populate(store: &dyn ChatStore) -> Vec<u64> {
    let now = chat_shared::now_ms();
    store.add_connection("A", now).await.expect("A");
    store.add_connection("B", now).await.expect("B");
    let mut public = vec![];
    public.push(
        store
            .set_name("A", &validate_name("alice").expect("name"), now)
            .await
            .expect("join")
            .into_iter()
            .next()
            .expect("event")
            .seq,
    );
    for i in 0..12 {
        if i == 3 {
            public.push(
                store
                    .set_name("B", &validate_name("bob").expect("name"), now)
                    .await
                    .expect("join")
                    .into_iter()
                    .next()
                    .expect("event")
                    .seq,
            );
        }
        if i == 6 {
            store
                .post_private("A", "bob", "secret", now)
                .await
                .expect("private");
        }
        public.push(
            store
                .post_public("A", &format!("m{i}"), now)
                .await
                .expect("post")
                .seq,
        );
    }
    public
}

async fn forward_and_backward_pages_cover_public_history_exactly_once(s: Subject) {
    // GIVEN 14 public history events and one private message among them
    let store = s.store.as_ref();
    let public = populate(store).await;

    // WHEN a client reads forwards from 0, 5 at a time
    let pages = all_pages(store, "B", json!({"action":"history","after":0,"limit":5})).await;
    // THEN it gets every public event once, in order, never the private one, 5 per full page
    let forward: Vec<Value> = pages.concat();
    assert_eq!(ids(&forward), public);
    assert!(pages.iter().all(|p| p.len() <= 5));
    assert!(forward.iter().all(|f| f.get("privateMessage").is_none()));
    assert_eq!(
        forward[0],
        json!({"systemMessage":"alice has joined the chat","room":"lobby","id":public[0],"ts":forward[0]["ts"]})
    );
    assert!(forward
        .iter()
        .any(|f| f["publicMessage"] == json!("alice: m11")));

    // WHEN it pages backwards from the newest, 4 at a time
    let pages = all_pages(store, "B", json!({"action":"history","limit":4})).await;
    // THEN each page is in id order, pages go back in time, and together they are the history
    assert_eq!(ids(&pages[0]), public[public.len() - 4..].to_vec());
    let mut backward: Vec<u64> = pages.iter().rev().flat_map(|p| ids(p)).collect();
    backward.dedup();
    assert_eq!(backward, public);

    // AND the boundaries: nothing after the last id, nothing before the first
    let last = *public.last().expect("last");
    let after_last = history(store, "B", json!({"action":"history","after":last})).await;
    assert_eq!(after_last, json!({"history":{"frames":[]}}));
    let before_first = history(store, "B", json!({"action":"history","before":public[0]})).await;
    assert_eq!(before_first, json!({"history":{"frames":[]}}));
    // AND a cursor on the private message's id continues with the next public one
    let private_id = (1..last)
        .find(|id| !public.contains(id))
        .expect("the private message's id");
    let after_private = history(
        store,
        "B",
        json!({"action":"history","after":private_id,"limit":1}),
    )
    .await;
    assert_eq!(
        ids(after_private["history"]["frames"]
            .as_array()
            .expect("frames")),
        vec![private_id + 1]
    );
    // AND an unknown connection is refused
    let refused = history(store, "nobody", json!({"action":"history"})).await;
    assert_eq!(refused["error"]["code"], json!("not_connected"));
}

async fn large_pages_stay_under_the_message_limit(s: Subject) {
    // GIVEN 60 messages of 3.5 to 4 KB (sizes vary, so pages end at different fill levels):
    // 100 of them would not fit in one 128 KB WebSocket message
    let store = s.store.as_ref();
    let now = chat_shared::now_ms();
    store.add_connection("A", now).await.expect("A");
    store
        .set_name("A", &validate_name("alice").expect("name"), now)
        .await
        .expect("join")
        .into_iter()
        .next();
    for i in 0..60 {
        let pad = 3_500 + (i * 97) % 592;
        store
            .post_public("A", &format!("{i:04}{}", "x".repeat(pad)), now)
            .await
            .expect("post");
    }
    // WHEN a client asks for 100 at once, forwards and backwards, and follows `next`
    let first = history(
        store,
        "A",
        json!({"action":"history","after":0,"limit":100}),
    )
    .await;
    assert!(
        first["history"]["next"].is_object(),
        "a continuation marker"
    );
    let forward = all_pages(
        store,
        "A",
        json!({"action":"history","after":0,"limit":100}),
    )
    .await;
    let backward = all_pages(store, "A", json!({"action":"history","limit":100})).await;
    // THEN every response's frames were under 120 KB (checked in `history`), it took several
    // pages, and the pages still add up to everything
    assert!(forward.len() >= 2 && backward.len() >= 2);
    assert_eq!(ids(&forward.concat()), (1..=61).collect::<Vec<_>>());
    let mut back: Vec<u64> = backward.iter().rev().flat_map(|p| ids(p)).collect();
    back.dedup();
    assert_eq!(back, (1..=61).collect::<Vec<_>>());
}

/// How far the reader of [`concurrent_writers_never_let_a_cursor_skip_an_event`] has got: the
/// writers are paced by it.
#[derive(Debug, Default, Clone, Copy)]
struct ReaderProgress {
    /// Reads done.
    reads: usize,
    /// Reads that returned at least one posted message (not only the joins).
    pages_with_posts: usize,
}

async fn concurrent_writers_never_let_a_cursor_skip_an_event(s: Subject) {
    concurrent_writers_in(s, chat_shared::keys::DEFAULT_ROOM).await;
}

/// The catch-up promise per room: the same, in a room other than lobby, while every writer
/// also posts in lobby between its posts (so lobby's sequence moves concurrently).
async fn concurrent_writers_in_a_room_never_let_its_cursor_skip_an_event(s: Subject) {
    concurrent_writers_in(s, "ops").await;
}

async fn concurrent_writers_in(s: Subject, room: &'static str) {
    const WRITERS: usize = 4;
    const POSTS: usize = 8;
    let lobby = room == chat_shared::keys::DEFAULT_ROOM;
    // GIVEN four members of the room (ids 1-4 are their joins; the posts will be 5-36)
    let store = Arc::clone(&s.store);
    let now = chat_shared::now_ms();
    for w in 0..WRITERS {
        let id = format!("W{w}");
        store.add_connection(&id, now).await.expect("connect");
        store
            .set_name(&id, &validate_name(&format!("w{w}")).expect("name"), now)
            .await
            .expect("join");
        if !lobby {
            store
                .join_room(&id, room, 50, now)
                .await
                .expect("join the room");
        }
    }
    let first_post = WRITERS as u64 + 1;
    let last_post = (WRITERS * (POSTS + 1)) as u64;
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(ReaderProgress::default());
    let writes_done = Arc::new(AtomicUsize::new(0));

    // WHEN they post concurrently while a reader keeps reading forwards from its cursor — the
    // overlap forced: no writer starts before the reader's first read, and a writer's i-th post
    // waits until the reader has read i pages with posts in them, so the reads are spread over
    // the whole time the writes are in flight, however fast either side is
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            let mut progress = progress_rx.clone();
            let writes_done = Arc::clone(&writes_done);
            tokio::spawn(async move {
                let mut mine = vec![];
                for i in 0..POSTS {
                    tokio::time::timeout(
                        Duration::from_secs(30),
                        progress.wait_for(|p| p.reads >= 1 && p.pages_with_posts >= i),
                    )
                    .await
                    .expect("the reader keeps reading")
                    .expect("the reader is alive");
                    let e = store
                        .post_to_room(
                            &format!("W{w}"),
                            room,
                            &format!("w{w}-{i}"),
                            chat_shared::now_ms(),
                        )
                        .await
                        .expect("post");
                    writes_done.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(e.room, room);
                    mine.push(e.seq);
                    if !lobby {
                        // Another room's writes in between: they must not touch this room's ids.
                        store
                            .post_public(&format!("W{w}"), "noise", chat_shared::now_ms())
                            .await
                            .expect("post in lobby");
                    }
                }
                mine
            })
        })
        .collect();
    let reader = {
        let store = Arc::clone(&store);
        let writes_done = Arc::clone(&writes_done);
        tokio::spawn(async move {
            let mut cursor = 0;
            let mut seen = vec![];
            // Pages with posts whose read ended while some write had not finished yet.
            let mut during_writes = 0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                let page = store
                    .read_events(room, EventRange::After(cursor), 5, chat_shared::now_ms())
                    .await
                    .expect("read");
                let unfinished = writes_done.load(Ordering::SeqCst) < WRITERS * POSTS;
                let has_posts = page.events.iter().any(|e| e.seq >= first_post);
                if has_posts && unfinished {
                    during_writes += 1;
                }
                for e in page.events {
                    assert_eq!(e.room, room, "an event of another room: {e:?}");
                    seen.push(e.seq);
                    cursor = e.seq;
                }
                progress_tx.send_modify(|p| {
                    p.reads += 1;
                    p.pages_with_posts += usize::from(has_posts);
                });
                if cursor >= last_post {
                    break;
                }
                tokio::task::yield_now().await;
            }
            (seen, during_writes)
        })
    };
    let mut written = BTreeSet::new();
    for w in writers {
        written.extend(w.await.expect("writer"));
    }
    let (seen, during_writes) = reader.await.expect("reader");
    // THEN the reads really overlapped the writes: several pages with posts in them were read
    // before the last write had finished
    assert!(
        during_writes >= POSTS - 1,
        "only {during_writes} pages with posts were read while writes were in flight"
    );
    // AND the ids are dense, and the reader — whose cursor only ever moved to ids it had
    // seen — saw every event exactly once, in order: none committed later with a smaller id
    assert_eq!(written, (first_post..=last_post).collect::<BTreeSet<_>>());
    assert_eq!(seen, (1..=last_post).collect::<Vec<_>>());
}

async fn a_rooms_history_is_its_own_and_open_to_non_members(s: Subject) {
    // GIVEN alice in lobby and ops, bob in lobby only; messages in both rooms, interleaved,
    // and a private message from alice to bob
    let store = s.store.as_ref();
    let now = chat_shared::now_ms();
    for (id, name) in [("A", "alice"), ("B", "bob")] {
        store.add_connection(id, now).await.expect("connect");
        store
            .set_name(id, &validate_name(name).expect("name"), now)
            .await
            .expect("name");
    }
    store
        .add_connection("C", now)
        .await
        .expect("carol, no name");
    let joined = store.join_room("A", "ops", 50, now).await.expect("join");
    assert!(
        matches!(joined, chat_shared::store::Joined::Now(ref e) if e.seq == 1 && e.room == "ops")
    );
    for i in 0..4 {
        store
            .post_to_room("A", "ops", &format!("ops-{i}"), now)
            .await
            .expect("post in ops");
        store
            .post_public("B", &format!("lobby-{i}"), now)
            .await
            .expect("post in lobby");
    }
    store
        .post_private("A", "bob", "psst", now)
        .await
        .expect("private");

    // WHEN carol, in no room at all, reads ops's history forwards, 2 at a time
    let pages = all_pages(
        store,
        "C",
        json!({"action":"history","room":"ops","after":0,"limit":2}),
    )
    .await;
    // THEN she gets ops's events only, with ops's own ids 1-5, each frame tagged ops
    let frames = pages.concat();
    assert_eq!(ids(&frames), vec![1, 2, 3, 4, 5]);
    assert!(
        frames.iter().all(|f| f["room"] == json!("ops")),
        "{frames:?}"
    );
    assert_eq!(
        frames
            .iter()
            .map(|f| f["publicMessage"].as_str().unwrap_or("-"))
            .collect::<Vec<_>>(),
        vec![
            "-",
            "alice: ops-0",
            "alice: ops-1",
            "alice: ops-2",
            "alice: ops-3"
        ]
    );
    // AND `next` continues in the same room
    let first = history(
        store,
        "C",
        json!({"action":"history","room":"ops","after":0,"limit":2}),
    )
    .await;
    assert_eq!(
        first["history"]["next"],
        json!({"action":"history","room":"ops","after":2,"limit":2})
    );
    // AND lobby's history (no room named) is lobby's: the joins and bob's messages, never
    // ops's; the private message, numbered 7 in lobby's log, is not carol's to read
    let lobby = whole_history(store, "C").await;
    assert!(
        lobby.iter().all(|f| f["room"] == json!("lobby")),
        "{lobby:?}"
    );
    assert!(!lobby.iter().any(|f| f["publicMessage"]
        .as_str()
        .is_some_and(|m| m.contains("ops-"))));
    assert_eq!(ids(&lobby), vec![1, 2, 3, 4, 5, 6]);
    // AND a room nobody ever used has an empty history
    let empty = history(store, "C", json!({"action":"history","room":"nobody-here"})).await;
    assert_eq!(empty, json!({"history":{"frames":[]}}));
}

/// Every frame of the whole history as `connection_id` reads it, forwards from the start.
async fn whole_history(store: &dyn ChatStore, connection_id: &str) -> Vec<Value> {
    all_pages(
        store,
        connection_id,
        json!({"action": "history", "after": 0, "limit": 2}),
    )
    .await
    .concat()
}

async fn private_messages_are_history_for_their_two_authenticated_parties(s: Subject) {
    // GIVEN alice (u1) and bob (u2) authenticated, mallory (u3) authenticated, and an
    // anonymous connection that later takes the name "bob" once bob has gone
    let store = &*s.store;
    let now = chat_shared::now_ms();
    for (id, identity, display) in [
        ("A", Some("u1"), Some("alice")),
        ("B", Some("u2"), Some("bob")),
        ("M", Some("u3"), Some("mallory")),
        ("X", None, None),
    ] {
        store
            .add_identified_connection(id, identity, now)
            .await
            .expect("connect");
        if let Some(display) = display {
            store
                .set_name(id, &validate_name(display).expect("name"), now)
                .await
                .expect("join")
                .into_iter()
                .next();
        }
    }
    store
        .post_public("A", "hello all", now)
        .await
        .expect("post");
    let whisper = store
        .post_private("A", "bob", "psst bob", now)
        .await
        .expect("private")
        .seq;
    let reply = store
        .post_private("B", "Alice", "hi alice", now)
        .await
        .expect("private")
        .seq;
    let aside = store
        .post_private("M", "alice", "from mallory", now)
        .await
        .expect("private")
        .seq;
    store.post_public("B", "bye", now).await.expect("post");

    // WHEN each reads the whole history
    let private_of = |frames: &[Value]| -> Vec<(u64, String, String)> {
        frames
            .iter()
            .filter_map(|f| {
                Some((
                    f["id"].as_u64()?,
                    f["privateMessage"].as_str()?.to_owned(),
                    f["to"].as_str()?.to_owned(),
                ))
            })
            .collect()
    };
    let alice = whole_history(store, "A").await;
    let bob = whole_history(store, "B").await;
    let mallory = whole_history(store, "M").await;
    let anonymous = whole_history(store, "X").await;

    // THEN alice sees all three she sent or received, bob the two between them, mallory
    // only her own, and an anonymous reader none — with `to` naming the recipient
    assert_eq!(
        private_of(&alice),
        vec![
            (whisper, "alice: psst bob".into(), "bob".into()),
            (reply, "bob: hi alice".into(), "alice".into()),
            (aside, "mallory: from mallory".into(), "alice".into()),
        ]
    );
    assert_eq!(
        private_of(&bob),
        vec![
            (whisper, "alice: psst bob".into(), "bob".into()),
            (reply, "bob: hi alice".into(), "alice".into()),
        ]
    );
    assert_eq!(
        private_of(&mallory),
        vec![(aside, "mallory: from mallory".into(), "alice".into())]
    );
    assert_eq!(private_of(&anonymous), vec![]);
    // AND everyone sees the same public history, exactly once and in order
    let public = |frames: &[Value]| -> Vec<u64> {
        ids(frames)
            .into_iter()
            .filter(|id| ![whisper, reply, aside].contains(id))
            .collect()
    };
    assert_eq!(ids(&anonymous), public(&alice));
    assert_eq!(public(&bob), public(&alice));
    assert_eq!(public(&mallory), public(&alice));
    let mut sorted = ids(&alice);
    sorted.dedup();
    assert_eq!(sorted, ids(&alice), "no repeats");
    assert!(ids(&alice).windows(2).all(|w| w[0] < w[1]), "in id order");

    // WHEN bob leaves and, once his name's reservation has passed, another identity takes it
    store
        .remove_connection("B", chat_shared::events::LeaveReason::Disconnected, now)
        .await
        .expect("leave")
        .into_iter()
        .next();
    let later = now + (chat_shared::store::NAME_RESERVATION_SECS + 60) * 1000;
    store
        .add_identified_connection("Y", Some("u4"), later)
        .await
        .expect("connect");
    store
        .set_name("Y", &validate_name("bob").expect("name"), later)
        .await
        .expect("the reservation has passed")
        .into_iter()
        .next();
    // THEN the new "bob" reads none of the old bob's private messages
    let r = handle_request(
        store,
        &HandlerConfig::default(),
        request("Y", &json!({"action": "history", "after": 0, "limit": 100})),
        later,
    )
    .await
    .expect("handler");
    let Some(Body::Text(text)) = r.body else {
        panic!("expected a body")
    };
    let page: Value = serde_json::from_str(&text).expect("JSON");
    let frames = page["history"]["frames"].as_array().expect("frames");
    assert!(!frames.is_empty());
    assert_eq!(private_of(frames), vec![]);
}

macro_rules! on_every_store {
    ($($case:ident),* $(,)?) => {
        mod embedded_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(embedded().await).await;
                }
            )*
        }
        mod embedded_store_aws_like {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(embedded_aws_like().await).await;
                }
            )*
        }
        mod dynamodb_store {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(dynamodb().await).await;
                }
            )*
        }
    };
}

on_every_store!(
    forward_and_backward_pages_cover_public_history_exactly_once,
    large_pages_stay_under_the_message_limit,
    concurrent_writers_never_let_a_cursor_skip_an_event,
    concurrent_writers_in_a_room_never_let_its_cursor_skip_an_event,
    a_rooms_history_is_its_own_and_open_to_non_members,
    private_messages_are_history_for_their_two_authenticated_parties,
);
