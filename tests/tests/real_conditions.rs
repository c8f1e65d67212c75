//! The chat under AWS's real conditions (issue: "Correct under AWS's real conditions"): each
//! test forces one condition the ideal stand-ins never showed — an invocation deadline passing
//! mid-batch, a history full of other people's private messages, input that would break
//! DynamoDB's key limits — and checks what must hold, through the Lambdas' own code on moto
//! (and the embedded store where the count of store reads is the point).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chat_shared::config::{FanoutConfig, HandlerConfig, Retention};
use chat_shared::events::{LeaveReason, StoredEvent};
use chat_shared::fanout::handle_stream_event;
use chat_shared::history::history_response;
use chat_shared::pacing::Pacer;
use chat_shared::protocol::{HistoryDirection, HistoryRequest};
use chat_shared::ratelimit::{RateLimit, RequestLimits, Verdict};
use chat_shared::redelivery::{self, Redelivery};
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::requests::{Once, RequestKey};
use chat_shared::store::{
    Admission, ChatStore, Connection, EventRange, EventsPage, Joined, MembersPage, StoreError,
};
use chat_shared::validation::{validate_name, ValidName};
use chat_tests::world::code;
use chat_tests::{World, WorldConfig};
use serde_json::{json, Value};

async fn world() -> World {
    World::new(WorldConfig {
        handler: HandlerConfig {
            rate_limit: RateLimit {
                per_second: 0,
                burst: 0,
            },
            ..HandlerConfig::default()
        },
        fanout: FanoutConfig {
            base_backoff: Duration::from_millis(2),
            ..FanoutConfig::default()
        },
    })
    .await
    .expect("moto must start (run scripts/test)")
}

/// alice (A), bob (B) and carol (C) join, their joins are fanned out, and the endpoint forgets
/// what it recorded.
async fn three_members(w: &mut World) {
    for (id, name) in [("A", "alice"), ("B", "bob"), ("C", "carol")] {
        w.join(id, name).await;
    }
    w.fan_out().await;
    w.endpoint.clear();
}

#[tokio::test]
async fn a_private_message_after_a_deadline_passed_mid_broadcast_is_retried_not_dropped() {
    // GIVEN alice, bob and carol are members of lobby, alice and bob of `r`, and a batch
    // [broadcast to r, private message, public message to lobby]: two groups, as a room's
    // units of one batch go out together (crate::batching) and a private message with lobby
    let mut w = world().await;
    w.fanout.time_margin = Duration::ZERO;
    three_members(&mut w).await;
    for id in ["A", "B"] {
        let joined = w.send(id, json!({"action":"join","room":"r"})).await;
        assert!(joined.is_some_and(|a| a.get("joined").is_some()));
    }
    w.fan_out().await;
    w.endpoint.clear();
    let said = w
        .send(
            "B",
            json!({"action":"sendPublic","room":"r","message":"slow"}),
        )
        .await;
    assert_eq!(said, None);
    let said = w
        .send(
            "A",
            json!({"action":"sendPrivate","to":"bob","message":"psst"}),
        )
        .await;
    assert_eq!(said, None);
    let said = w
        .send("A", json!({"action":"sendPublic","message":"after"}))
        .await;
    assert_eq!(said, None);
    // As the mapping delivers it: template.yaml's filter drops the rooms' counter records.
    let event = w.stream.next_lambda_event().await.expect("stream");
    assert_eq!(event.records.len(), 3);

    // WHEN the invocation's deadline passes between the broadcast and the private message:
    // the fan-out reads the clock as each group starts, and that read of the private message's
    // group holds the thread past the deadline (as a long broadcast's CPU would). Nothing
    // yields between the hog and the unit's sends, so no timer can fire in between.
    // The deadline leaves the broadcast plenty of time; the hog outlasts it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let units_started = AtomicUsize::new(0);
    let clock = || {
        if units_started.fetch_add(1, Ordering::SeqCst) == 1 {
            let hog = deadline.saturating_duration_since(tokio::time::Instant::now());
            std::thread::sleep(hog + Duration::from_millis(50));
        }
        chat_shared::now_ms()
    };
    let response = handle_stream_event(
        &w.store,
        &w.api,
        &w.fanout,
        event.clone(),
        clock,
        Some(deadline),
    )
    .await;

    // THEN the broadcast went out, and the private message is where Lambda resumes
    assert!(
        tokio::time::Instant::now() > deadline,
        "the deadline passed during the batch"
    );
    let private_seq = event.records[1].change.sequence_number.clone();
    assert_eq!(
        response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect::<Vec<_>>(),
        vec![private_seq],
        "the private message must be retried, not checkpointed past unsent"
    );
    assert!(w
        .room_frames("B")
        .iter()
        .all(|(_, f)| f.get("privateMessage").is_none()));

    // WHEN Lambda retries from the reported record (with time to spare)
    let mut retry = event.clone();
    retry.records.remove(0);
    let response = w.fan_out_event(retry).await;

    // THEN bob gets the private message and every lobby member the last public one
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    let frames = |id: &str| -> Vec<(Option<String>, Value)> {
        w.room_frames(id)
            .into_iter()
            .map(|(room, mut f)| {
                if let Some(o) = f.as_object_mut() {
                    o.remove("id");
                }
                (room, f)
            })
            .collect()
    };
    let r = Some("r".to_owned());
    let lobby = Some("lobby".to_owned());
    assert_eq!(
        frames("B"),
        vec![
            (r.clone(), json!({"publicMessage":"bob: slow"})),
            (None, json!({"privateMessage":"alice: psst"})),
            (lobby.clone(), json!({"publicMessage":"alice: after"})),
        ]
    );
    assert_eq!(
        frames("A"),
        vec![
            (r, json!({"publicMessage":"bob: slow"})),
            (lobby.clone(), json!({"publicMessage":"alice: after"})),
        ]
    );
    assert_eq!(
        frames("C"),
        vec![(lobby, json!({"publicMessage":"alice: after"}))]
    );
}

/// A store that counts the events its reads return (what a `history` request examined), and
/// whose rate limiter can be made to fail.
struct CountingReads<S> {
    inner: S,
    examined: AtomicUsize,
    reads: AtomicUsize,
    limiter_fails: std::sync::atomic::AtomicBool,
}

impl<S> CountingReads<S> {
    fn new(inner: S) -> Self {
        CountingReads {
            inner,
            examined: AtomicUsize::new(0),
            reads: AtomicUsize::new(0),
            limiter_fails: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl<S: ChatStore> ChatStore for CountingReads<S> {
    async fn open_connection(
        &self,
        connection_id: &str,
        identity: Option<&str>,
        admission: Option<Admission<'_>>,
        batch: bool,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.inner
            .open_connection(connection_id, identity, admission, batch, now_ms)
            .await
    }
    async fn release_connection_slot(
        &self,
        principal: &str,
        connection_id: &str,
    ) -> Result<(), StoreError> {
        self.inner
            .release_connection_slot(principal, connection_id)
            .await
    }
    async fn take_presence_budget(
        &self,
        room: &str,
        budget: chat_shared::presence::PresenceBudget,
        now_ms: i64,
    ) -> Result<chat_shared::presence::BudgetVerdict, StoreError> {
        self.inner.take_presence_budget(room, budget, now_ms).await
    }
    async fn connection(
        &self,
        connection_id: &str,
        now_ms: i64,
    ) -> Result<Option<Connection>, StoreError> {
        self.inner.connection(connection_id, now_ms).await
    }
    async fn set_name(
        &self,
        connection_id: &str,
        name: &ValidName,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.set_name(connection_id, name, now_ms).await
    }
    async fn join_room(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        now_ms: i64,
    ) -> Result<Joined, StoreError> {
        self.inner
            .join_room(connection_id, room, max_rooms, now_ms)
            .await
    }
    async fn leave_room(
        &self,
        connection_id: &str,
        room: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.inner
            .leave_room(connection_id, room, reason, now_ms)
            .await
    }
    async fn post_to_room(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.inner
            .post_to_room(connection_id, room, message, now_ms)
            .await
    }
    async fn post_private(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<StoredEvent, StoreError> {
        self.inner
            .post_private(connection_id, to, message, now_ms)
            .await
    }
    async fn set_name_once(
        &self,
        connection_id: &str,
        name: &ValidName,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Vec<StoredEvent>>, StoreError> {
        self.inner
            .set_name_once(connection_id, name, request, now_ms)
            .await
    }
    async fn join_room_once(
        &self,
        connection_id: &str,
        room: &str,
        max_rooms: usize,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<Joined>, StoreError> {
        self.inner
            .join_room_once(connection_id, room, max_rooms, request, now_ms)
            .await
    }
    async fn leave_room_once(
        &self,
        connection_id: &str,
        room: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.inner
            .leave_room_once(connection_id, room, request, now_ms)
            .await
    }
    async fn post_to_room_once(
        &self,
        connection_id: &str,
        room: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.inner
            .post_to_room_once(connection_id, room, message, request, now_ms)
            .await
    }
    async fn post_private_once(
        &self,
        connection_id: &str,
        to: &str,
        message: &str,
        request: &RequestKey,
        now_ms: i64,
    ) -> Result<Once<StoredEvent>, StoreError> {
        self.inner
            .post_private_once(connection_id, to, message, request, now_ms)
            .await
    }
    async fn remove_connection(
        &self,
        connection_id: &str,
        reason: LeaveReason,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner
            .remove_connection(connection_id, reason, now_ms)
            .await
    }
    async fn remove_expired(
        &self,
        gone: &chat_shared::store::items::ConnItem,
        now_ms: i64,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        self.inner.remove_expired(gone, now_ms).await
    }
    async fn take_request_token(
        &self,
        connection_id: &str,
        limits: &RequestLimits<'_>,
        now_ms: i64,
    ) -> Result<Verdict, StoreError> {
        if self.limiter_fails.load(Ordering::SeqCst) {
            return Err(StoreError::backend(
                "UpdateItem rate limit",
                "injected: the limiter's store is failing",
            ));
        }
        self.inner
            .take_request_token(connection_id, limits, now_ms)
            .await
    }
    async fn schedule_redelivery(
        &self,
        redelivery: &Redelivery,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.inner.schedule_redelivery(redelivery, now_ms).await
    }
    async fn member_shards(&self, room: &str, now_ms: i64) -> Result<u32, StoreError> {
        self.inner.member_shards(room, now_ms).await
    }
    async fn members_page(
        &self,
        room: &str,
        shard: u32,
        after: Option<&str>,
        now_ms: i64,
    ) -> Result<MembersPage, StoreError> {
        self.inner.members_page(room, shard, after, now_ms).await
    }
    async fn read_events(
        &self,
        room: &str,
        range: EventRange,
        limit: usize,
        now_ms: i64,
    ) -> Result<EventsPage, StoreError> {
        let page = self.inner.read_events(room, range, limit, now_ms).await?;
        self.examined.fetch_add(page.events.len(), Ordering::SeqCst);
        self.reads.fetch_add(1, Ordering::SeqCst);
        Ok(page)
    }
}

#[tokio::test]
async fn history_behind_a_long_private_run_examines_a_bounded_number_of_items() {
    // GIVEN a public message, then 2,000 private messages between alice and bob, then another
    let store = CountingReads::new(EmbeddedStore::new(Retention::default()));
    let now = chat_shared::now_ms();
    for (id, name) in [("A", "alice"), ("B", "bob"), ("C", "carol")] {
        store.add_connection(id, now).await.expect("connect");
        let name = validate_name(name).expect("name");
        store.set_name(id, &name, now).await.expect("join");
    }
    store.post_public("A", "before", now).await.expect("post");
    for n in 0..2_000 {
        store
            .post_private("A", "bob", &format!("p{n}"), now)
            .await
            .expect("private");
    }
    let last = store.post_public("A", "after", now).await.expect("post");

    // WHEN carol (who may read none of them) asks for one frame after the first public message
    let request = HistoryRequest {
        room: "lobby".into(),
        direction: HistoryDirection::After(4),
        limit: 1,
    };
    let page: Value = serde_json::from_str(
        &history_response(&store, &request, Some("carol"), None, now)
            .await
            .expect("history"),
    )
    .expect("json");

    // THEN it examined at most 100 events, in few reads, and answers with no frames and a
    // `next` that resumes after the last event examined
    let examined = store.examined.load(Ordering::SeqCst);
    assert!(examined <= 100, "examined {examined}");
    assert!(store.reads.load(Ordering::SeqCst) <= 10);
    assert_eq!(page["history"]["frames"], json!([]));
    assert_eq!(
        page["history"]["next"],
        json!({"action":"history","room":"lobby","after":4 + examined as u64,"limit":1})
    );

    // AND following `next` gets to the public message after the run, nothing skipped
    let mut after = 4 + examined as u64;
    let mut requests = 1;
    let frames = loop {
        let request = HistoryRequest {
            room: "lobby".into(),
            direction: HistoryDirection::After(after),
            limit: 1,
        };
        let page: Value = serde_json::from_str(
            &history_response(&store, &request, Some("carol"), None, now)
                .await
                .expect("history"),
        )
        .expect("json");
        requests += 1;
        let frames = page["history"]["frames"].clone();
        if frames != json!([]) {
            break frames;
        }
        after = page["history"]["next"]["after"]
            .as_u64()
            .expect("a next while nothing was found");
    };
    assert_eq!(frames[0]["publicMessage"], "alice: after");
    assert_eq!(frames[0]["id"], last.seq);
    assert!(requests <= 2_000 / 100 + 2, "{requests} requests");
}

#[tokio::test]
async fn keys_built_from_client_input_stay_within_dynamodbs_limits() {
    // GIVEN alice and bob are members
    let w = world().await;
    w.join("A", "alice").await;
    w.join("B", "bob").await;
    let ligatures = "\u{FDFA}".repeat(32);

    // WHEN alice tries a name whose normalised key is over 1,024 bytes
    let reply = w
        .send("A", json!({"action":"setName","name":ligatures}))
        .await;
    // THEN it is refused as a name, not as a store failure
    assert_eq!(code(&reply), "invalid_name", "{reply:?}");

    // WHEN she writes to such a name, or to a name far over 32 characters
    for to in [ligatures.clone(), "b".repeat(2_000)] {
        let reply = w
            .send("A", json!({"action":"sendPrivate","to":to,"message":"hi"}))
            .await;
        // THEN nobody has that name: unknown_recipient, not internal_error
        assert_eq!(code(&reply), "unknown_recipient", "{reply:?}");
    }

    // WHEN a name contains a line separator THEN it is refused
    let reply = w
        .send("B", json!({"action":"setName","name":"bo\u{2028}b"}))
        .await;
    assert_eq!(code(&reply), "invalid_name", "{reply:?}");
}

#[tokio::test]
async fn an_account_throttled_for_a_while_slows_the_broadcast_without_failing_it() {
    // GIVEN alice, bob and carol are members, and a fan-out paced at 1,000 calls/s
    let mut w = world().await;
    w.fanout.throttle_backoff = Duration::from_millis(5);
    w.fanout.pacer = Pacer::per_second(1_000);
    three_members(&mut w).await;
    let said = w
        .send("A", json!({"action":"sendPublic","message":"hello"}))
        .await;
    assert_eq!(said, None);

    // WHEN the account is throttled: each recipient's next 6 calls answer 429 — more than the
    // 4 attempts a 5xx gets
    for id in ["A", "B", "C"] {
        w.endpoint.fail_next(id, 429, 6);
    }
    let response = w.fan_out().await;

    // THEN the record succeeds: every member got the message exactly once
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    for id in ["A", "B", "C"] {
        assert_eq!(
            w.frames(id),
            vec![json!({"publicMessage":"alice: hello"})],
            "{id}"
        );
    }
    assert_eq!(w.endpoint.faults_served(), 18);
    // AND the pacer slowed down for the rest of the account's traffic
    let rate = w.fanout.pacer.current_rate().expect("paced");
    assert!(rate < 1_000.0, "rate after a 429 storm: {rate}");
}

#[tokio::test]
async fn a_recipient_failing_forever_costs_a_bounded_number_of_posts_and_nobody_else_pays() {
    // GIVEN alice, bob and carol are members, and carol's endpoint answers 500 forever
    let mut w = world().await;
    three_members(&mut w).await;
    w.endpoint.fail_next("C", 500, usize::MAX);
    let said = w
        .send("A", json!({"action":"sendPublic","message":"hello"}))
        .await;
    assert_eq!(said, None);

    // WHEN the fan-out handles the message, then every redelivery round the stream brings back
    let mut rounds = 0;
    loop {
        let event = w.stream.next_lambda_event().await.expect("stream");
        if event.records.is_empty() {
            break;
        }
        let response = w.fan_out_event(event).await;
        // THEN no record ever fails: the room is never held, nor re-sent to
        assert!(response.batch_item_failures.is_empty(), "{response:?}");
        rounds += 1;
        assert!(rounds <= 10, "redelivery does not end");
    }

    // THEN alice and bob got it once; carol was tried max_attempts (4) + 5 rounds times, and
    // then given up
    for id in ["A", "B"] {
        assert_eq!(
            w.frames(id),
            vec![json!({"publicMessage":"alice: hello"})],
            "{id}"
        );
    }
    assert_eq!(rounds, 1 + redelivery::MAX_ROUNDS as usize);
    assert_eq!(
        w.endpoint.faults_served(),
        4 + redelivery::MAX_ROUNDS as usize
    );
    assert_eq!(w.endpoint.post_count(), 2);
}

#[tokio::test]
async fn writes_fail_closed_when_the_rate_limiter_cannot_be_read() {
    // GIVEN alice and bob are members, and a rate limit on
    let store = CountingReads::new(EmbeddedStore::new(Retention::default()));
    let now = chat_shared::now_ms();
    for (id, name) in [("A", "alice"), ("B", "bob")] {
        store.add_connection(id, now).await.expect("connect");
        let name = validate_name(name).expect("name");
        store.set_name(id, &name, now).await.expect("join");
    }
    let before = store.inner.events().len();
    let config = HandlerConfig::default();
    assert!(!config.rate_limit.is_off());

    // WHEN the limiter's store fails
    store.limiter_fails.store(true, Ordering::SeqCst);
    let send = |body: Value| {
        let mut v = chat_tests::fixture_json("apigw-websocket-sendpublic.json");
        v["requestContext"]["connectionId"] = json!("A");
        v["body"] = json!(body.to_string());
        serde_json::from_value::<aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest>(v)
            .expect("event")
    };
    let reply = |r: aws_lambda_events::apigw::ApiGatewayProxyResponse| -> Value {
        match r.body {
            Some(aws_lambda_events::encodings::Body::Text(t)) => {
                serde_json::from_str(&t).expect("json")
            }
            other => panic!("expected a body, got {other:?}"),
        }
    };

    // THEN every write is refused with internal_error and nothing is written
    for (body, action) in [
        (json!({"action":"sendPublic","message":"hi"}), "sendPublic"),
        (json!({"action":"setName","name":"al"}), "setName"),
        (
            json!({"action":"sendPrivate","to":"bob","message":"psst"}),
            "sendPrivate",
        ),
    ] {
        let r = chat_shared::handler::handle_request(&store, &config, send(body), now)
            .await
            .expect("handler");
        let frame = reply(r);
        assert_eq!(frame["error"]["code"], "internal_error", "{frame}");
        assert_eq!(frame["error"]["action"], action, "{frame}");
    }
    assert_eq!(store.inner.events().len(), before, "nothing was written");
    // AND reading history still works
    let r = chat_shared::handler::handle_request(
        &store,
        &config,
        send(json!({"action":"history","after":0})),
        now,
    )
    .await
    .expect("handler");
    let frame = reply(r);
    assert!(frame["history"]["frames"].is_array(), "{frame}");
    // AND once the limiter answers again, writes go through
    store.limiter_fails.store(false, Ordering::SeqCst);
    let r = chat_shared::handler::handle_request(
        &store,
        &config,
        send(json!({"action":"sendPublic","message":"back"})),
        now,
    )
    .await
    .expect("handler");
    assert_eq!(r.body, None);
    assert_eq!(store.inner.events().len(), before + 1);
}
