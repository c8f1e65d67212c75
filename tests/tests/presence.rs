//! Presence against moto and a real `@connections` endpoint over HTTP (issue #10, items 5 and
//! 12): presence frames keep the dedupe contract whatever the batch boundaries, and a room's
//! presence budget bounds the `@connections` POSTs a storm of renames can cause.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::event::dynamodb::Event;
use aws_sdk_dynamodb::types::AttributeValue;
use chat_shared::config::{FanoutConfig, HandlerConfig};
use chat_shared::events::ChatEvent;
use chat_shared::history::history_response;
use chat_shared::presence::PresenceBudget;
use chat_shared::protocol::{HistoryDirection, HistoryRequest};
use chat_shared::ratelimit::{PrincipalLimit, RateLimit};
use chat_shared::store::{ChatStore, EventRange};
use chat_tests::{StreamReader, World, WorldConfig};
use serde_json::{json, Value};

fn config() -> WorldConfig {
    WorldConfig {
        handler: HandlerConfig::default(),
        fanout: FanoutConfig {
            base_backoff: Duration::from_millis(5),
            ..FanoutConfig::default()
        },
    }
}

/// The frame's key: the one of the tutorial's keys it carries.
fn frame_key(frame: &Value) -> &'static str {
    [
        "members",
        "systemMessage",
        "publicMessage",
        "privateMessage",
    ]
    .into_iter()
    .find(|k| frame.get(*k).is_some())
    .expect("a chat frame")
}

/// A client that applies the README's rules to what it receives: it drops a frame whose
/// (`room`, `id`, frame key) it has seen, and applies a `members` frame only if its id is
/// higher than the last one it applied (a snapshot, not an event).
#[derive(Default)]
struct RecordingClient {
    seen: HashSet<(String, u64, &'static str)>,
    /// Every frame it kept, in arrival order.
    kept: Vec<Value>,
    /// The members list it shows, and the id it came with.
    members: Option<(u64, Value)>,
}

impl RecordingClient {
    fn receive(&mut self, frame: Value) {
        let room = frame["room"].as_str().expect("room").to_owned();
        let id = frame["id"].as_u64().expect("id");
        let key = frame_key(&frame);
        if !self.seen.insert((room, id, key)) {
            return;
        }
        if key == "members" {
            if self.members.as_ref().is_some_and(|(last, _)| id <= *last) {
                return;
            }
            self.members = Some((id, frame["members"].clone()));
        }
        self.kept.push(frame);
    }

    fn announcements(&self) -> Vec<Value> {
        let mut a: Vec<Value> = self
            .kept
            .iter()
            .filter(|f| f.get("systemMessage").is_some())
            .cloned()
            .collect();
        a.sort_by_key(|f| f["id"].as_u64());
        a
    }
}

/// The frames `history` serves for lobby after `after`, as a reader without identity.
async fn history_after(w: &World, after: u64) -> Vec<Value> {
    let request = HistoryRequest {
        room: "lobby".into(),
        limit: 100,
        direction: HistoryDirection::After(after),
    };
    let page = history_response(&w.store, &request, None, None, chat_shared::now_ms())
        .await
        .expect("history");
    let page: Value = serde_json::from_str(&page).expect("json");
    assert!(page["history"]["next"].is_null(), "one page: {page}");
    page["history"]["frames"]
        .as_array()
        .expect("frames")
        .clone()
}

/// `event` with only `records[range]`, as Lambda would send a smaller (or retried) batch.
fn slice(event: &Event, range: std::ops::Range<usize>) -> Event {
    let mut e = event.clone();
    e.records = event.records[range].to_vec();
    e
}

#[tokio::test]
async fn a_run_of_presence_redelivered_at_other_boundaries_is_announced_once_as_history_has_it() {
    // GIVEN alice in lobby, her join fanned out
    let mut w = World::new(config()).await.expect("world");
    w.join("A", "alice").await;
    w.fan_out().await;
    w.endpoint.clear();
    // AND a run of presence changes read off the stream as one batch: four joins, a rename
    // and a leave
    for (id, name) in [("B", "bob"), ("C", "carol"), ("D", "dave"), ("E", "erin")] {
        w.join(id, name).await;
    }
    assert_eq!(
        w.send("C", json!({"action":"setName","name":"caz"})).await,
        None
    );
    w.disconnect("D").await;
    let batch = w.stream.next_lambda_event().await.expect("stream");
    let n = batch.records.len();
    assert_eq!(n, 6, "six presence events");

    let history = history_after(&w, 1).await;
    assert_eq!(history.len(), 6, "{history:?}");
    let texts: Vec<&str> = history
        .iter()
        .map(|f| f["systemMessage"].as_str().expect("system"))
        .collect();
    assert_eq!(
        texts,
        [
            "bob has joined the chat",
            "carol has joined the chat",
            "dave has joined the chat",
            "erin has joined the chat",
            "carol is now known as caz",
            "dave has left the chat"
        ]
    );

    // WHEN the batch is delivered whole, then again as Lambda's retries would cut it: from a
    // checkpoint part-way, bisected, one record at a time, and in uneven pieces
    let cuts: [&[usize]; 5] = [&[], &[2], &[n / 2], &[1, 2, 3, 4, 5], &[1, 4]];
    for cut in cuts {
        let mut start = 0;
        for end in cut.iter().copied().chain([n]) {
            let response = w.fan_out_event(slice(&batch, start..end)).await;
            assert!(response.batch_item_failures.is_empty(), "{response:?}");
            start = end;
        }

        // THEN after each delivery, every member still present, applying the dedupe rule,
        // has seen each change announced exactly once, exactly as history serves it (same
        // id, key, text and ts), and nothing else
        for id in ["A", "B", "C", "E"] {
            let mut client = RecordingClient::default();
            for frame in w.endpoint.frames_for(id) {
                client.receive(frame);
            }
            assert_eq!(client.announcements(), history, "{id} after cuts {cut:?}");
            // AND the list it shows is the room's, from the newest change
            assert_eq!(
                client.members,
                Some((7, json!(["alice", "bob", "caz", "erin"]))),
                "{id} after cuts {cut:?}"
            );
        }
    }
    // AND the redeliveries brought older lists (a cut gives its piece's own last id) that the
    // snapshot rule set aside: the whole run's list has the last id, a piece's an earlier one
    let member_ids: HashSet<u64> = w
        .endpoint
        .frames_for("A")
        .iter()
        .filter(|f| f.get("members").is_some())
        .map(|f| f["id"].as_u64().expect("id"))
        .collect();
    assert!(
        member_ids.contains(&7) && member_ids.len() > 1,
        "{member_ids:?}"
    );
}

/// Names of the storm: connection `i`'s `k`-th rename.
fn storm_name(i: usize, k: usize) -> String {
    format!("u{i:02}r{k}")
}

#[tokio::test]
async fn a_rename_storm_from_20_connections_stays_within_the_rooms_presence_budget() {
    // GIVEN 20 members of lobby, and a budget of 200 @connections POSTs a second for the
    // room's presence: a rename there costs 2 × 21 = 42, so four fit in a second, not five.
    // No other limit applies (per-connection and per-principal limits off), so only the
    // budget stands between the storm and the endpoint.
    const BUDGET: u32 = 200;
    const CONNS: usize = 20;
    let base = config();
    let mut w = World::new(WorldConfig {
        handler: HandlerConfig {
            rate_limit: RateLimit {
                per_second: 0,
                burst: 0,
            },
            principal_limit: PrincipalLimit::OFF,
            presence_budget: PresenceBudget::OFF,
            ..base.handler
        },
        ..base
    })
    .await
    .expect("world");
    let ids: Vec<String> = (0..CONNS).map(|i| format!("c{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        w.join(id, &storm_name(i, 0)).await;
    }
    w.fan_out().await;
    w.endpoint.clear();
    w.handler.presence_budget = PresenceBudget {
        posts_per_second: BUDGET,
    };
    let mut reader = StreamReader::new(&w.moto.dynamodb(), w.moto.streams(), &w.tables.events)
        .await
        .expect("reader");
    while !reader
        .next_lambda_event()
        .await
        .expect("drain")
        .records
        .is_empty()
    {}

    // WHEN all 20 rename as fast as they can for 3 seconds, released together by a barrier,
    // while the fan-out keeps up with the stream as Lambda would
    let barrier = Arc::new(tokio::sync::Barrier::new(CONNS));
    let storm_ends = tokio::time::Instant::now() + Duration::from_secs(3);
    let done = std::sync::atomic::AtomicBool::new(false);
    let w = &w;
    let renames = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            // (name, accepted) per attempt, in order
            let mut tried = Vec::new();
            let mut k = 1;
            while tokio::time::Instant::now() < storm_ends {
                let name = storm_name(i, k);
                k += 1;
                let answer = w.send(id, json!({"action":"setName","name":name})).await;
                match answer {
                    None => tried.push((name, true)),
                    Some(e) => {
                        assert_eq!(e["error"]["code"], json!("presence_rate_limited"), "{e}");
                        let wait = e["error"]["retryAfterMs"].as_u64().expect("retryAfterMs");
                        assert!((1..=1000).contains(&wait), "{e}");
                        tried.push((name, false));
                    }
                }
            }
            tried
        }
    }));
    let fan_out = async {
        loop {
            let finished = done.load(std::sync::atomic::Ordering::SeqCst);
            let event = reader.next_lambda_event().await.expect("stream");
            if !event.records.is_empty() {
                let r = w.fan_out_event(event).await;
                assert!(r.batch_item_failures.is_empty(), "{r:?}");
            } else if finished {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let storm = async {
        let tried = renames.await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        tried
    };
    let (tried, ()) = tokio::join!(storm, fan_out);

    // THEN in no second did the room's presence cost more POSTs than the budget: every POST
    // counted at the endpoint, by the second its event committed (the frame's `ts`)
    let posts = w.endpoint.posts();
    let mut by_second: BTreeMap<i64, u32> = BTreeMap::new();
    for (_, frame) in &posts {
        let ts = frame["ts"].as_i64().expect("ts");
        *by_second.entry(ts.div_euclid(1000)).or_default() += 1;
    }
    eprintln!("POSTs by commit second: {:?}", by_second.values());
    assert!(
        by_second.values().all(|&n| n <= BUDGET),
        "over the budget of {BUDGET}: {by_second:?}"
    );
    // AND the storm was refused in part (it asked for more than the budget)
    let accepted: usize = tried.iter().flatten().filter(|(_, ok)| *ok).count();
    let refused: usize = tried.iter().flatten().filter(|(_, ok)| !*ok).count();
    eprintln!("renames accepted {accepted}, refused {refused}");
    assert!(refused > 0 && accepted > 0, "{accepted} / {refused}");

    // AND as they arrived at the endpoint, per wall-clock second (for the record: these mix
    // events of neighbouring seconds, as the fan-out's batches do)
    let times = w.endpoint.post_times();
    if let Some(first) = times.first() {
        let mut arrival: BTreeMap<u64, u32> = BTreeMap::new();
        for t in &times {
            *arrival
                .entry(t.duration_since(*first).as_secs())
                .or_default() += 1;
        }
        eprintln!("POSTs by arrival second: {:?}", arrival.values());
    }
    // AND every accepted rename is one MemberRenamed, broadcast to the 20; no refused one is
    let page = w
        .store
        .read_events(
            "lobby",
            EventRange::After(CONNS as u64),
            10_000,
            chat_shared::now_ms(),
        )
        .await
        .expect("log");
    let renamed: Vec<String> = page
        .events
        .iter()
        .filter_map(|e| match &e.event {
            ChatEvent::MemberRenamed { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(renamed.len(), accepted, "{renamed:?}");
    let refused_names: HashSet<&str> = tried
        .iter()
        .flatten()
        .filter(|(_, ok)| !*ok)
        .map(|(n, _)| n.as_str())
        .collect();
    assert!(renamed.iter().all(|n| !refused_names.contains(n.as_str())));
    let announced = posts
        .iter()
        .filter(|(_, f)| f.get("systemMessage").is_some())
        .count();
    assert_eq!(
        announced,
        accepted * CONNS,
        "each accepted rename told to each member once"
    );

    // AND refused renames left nothing half-written: each connection has its last accepted
    // name, and the claims held are exactly the 20 current names (no refused name claimed, no
    // old name still held)
    let now = chat_shared::now_ms();
    let mut current: HashMap<String, String> = HashMap::new();
    for (i, (id, tried)) in ids.iter().zip(&tried).enumerate() {
        let expected = tried
            .iter()
            .rev()
            .find(|(_, ok)| *ok)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| storm_name(i, 0));
        let conn = w
            .store
            .connection(id, now)
            .await
            .expect("read")
            .expect("conn");
        assert_eq!(conn.name.as_deref(), Some(expected.as_str()), "{id}");
        current.insert(expected.to_lowercase(), id.clone());
    }
    let claims = w
        .moto
        .dynamodb()
        .scan()
        .table_name(&w.tables.connections)
        .send()
        .await
        .expect("scan");
    let held: HashMap<String, String> = claims
        .items()
        .iter()
        .filter_map(|item| {
            let pk = match item.get("pk") {
                Some(AttributeValue::S(pk)) => pk.strip_prefix("NAME#")?.to_owned(),
                _ => return None,
            };
            match item.get("connectionId") {
                Some(AttributeValue::S(c)) => Some((pk, c.clone())),
                _ => None,
            }
        })
        .collect();
    assert_eq!(held, current);
}

#[tokio::test]
async fn a_join_storm_over_the_budget_is_unannounced_never_refused() {
    // GIVEN a room `r` of 20 members, 10 more named connections in lobby, and a budget of 100
    // @connections POSTs a second for a room's presence: a join of `r` costs 2 × 21 = 42, so
    // a second pays for two of them (an empty second admits any one), not ten
    const BUDGET: u32 = 100;
    const MEMBERS: usize = 20;
    const JOINERS: usize = 10;
    let base = config();
    let mut w = World::new(WorldConfig {
        handler: HandlerConfig {
            rate_limit: RateLimit {
                per_second: 0,
                burst: 0,
            },
            principal_limit: PrincipalLimit::OFF,
            presence_budget: PresenceBudget::OFF,
            ..base.handler
        },
        ..base
    })
    .await
    .expect("world");
    let ids: Vec<String> = (0..MEMBERS + JOINERS).map(|i| format!("j{i:02}")).collect();
    for (i, id) in ids.iter().enumerate() {
        w.join(id, &storm_name(i, 0)).await;
        if i < MEMBERS {
            let joined = w.send(id, json!({"action":"join","room":"r"})).await;
            assert!(joined.is_some_and(|a| a.get("joined").is_some()));
        }
    }
    w.fan_out().await;
    w.handler.presence_budget = PresenceBudget {
        posts_per_second: BUDGET,
    };
    let joiners = &ids[MEMBERS..];

    // WHEN the 10 join `r` at once, released together by a barrier
    let barrier = Arc::new(tokio::sync::Barrier::new(JOINERS));
    let storm = &w;
    let answers = futures::future::join_all(joiners.iter().map(|id| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            storm.send(id, json!({"action":"join","room":"r"})).await
        }
    }))
    .await;

    // THEN every join is answered `joined` — none refused, whatever the budget
    for (id, answer) in joiners.iter().zip(&answers) {
        let answer = answer.as_ref().expect("an answer");
        assert_eq!(answer["joined"]["room"], json!("r"), "{id}: {answer}");
    }
    // AND every one of them is a member of `r`
    let now = chat_shared::now_ms();
    for id in joiners {
        let conn = w
            .store
            .connection(id, now)
            .await
            .expect("read")
            .expect("conn");
        assert!(
            conn.rooms.iter().any(|r| r == "r"),
            "{id}: {:?}",
            conn.rooms
        );
    }
    // AND only the joins the budget paid for were announced (sequenced `MemberJoined`s); the
    // rest were unannounced (no event, so no broadcast)
    let page = w
        .store
        .read_events("r", EventRange::After(MEMBERS as u64), 1_000, now)
        .await
        .expect("log");
    let announced = page
        .events
        .iter()
        .filter(|e| matches!(e.event, ChatEvent::MemberJoined { .. }))
        .count();
    eprintln!("joins announced {announced} of {JOINERS}");
    assert!(
        announced < JOINERS,
        "the budget pays for a few joins a second, not {announced}"
    );

    // AND the next change of `r` tells its members the whole list, unannounced joiners
    // included: j00 leaves (budget off again, so it is surely announced)
    w.fan_out().await;
    w.endpoint.clear();
    w.handler.presence_budget = PresenceBudget::OFF;
    let left = w.send(&ids[0], json!({"action":"leave","room":"r"})).await;
    assert!(
        left.as_ref().is_some_and(|a| a.get("left").is_some()),
        "{left:?}"
    );
    w.fan_out().await;
    let remaining = MEMBERS + JOINERS - 1;
    let lists: Vec<Value> = w
        .endpoint
        .posts()
        .into_iter()
        .filter(|(_, f)| f["room"] == json!("r") && f.get("members").is_some())
        .map(|(_, f)| f["members"].clone())
        .collect();
    assert_eq!(lists.len(), remaining, "one list to each remaining member");
    for list in &lists {
        assert_eq!(
            list.as_array().map(Vec::len),
            Some(remaining),
            "every remaining member listed: {list}"
        );
    }
}
