//! `chat-replay rebuild` against moto: state built through the chat's store, then corrupted
//! behind its back with the SDK, then reported, fixed, and used again.

mod common;

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use chat_replay::rebuild::{rebuild, Drift, MemberRef, RebuildReport};
use chat_shared::events::{ChatEvent, LeaveReason};
use chat_shared::store::{ChatStore, StoreError};
use chat_tests::WorldConfig;
use common::{stderr, stdout, valid, World};
use indicatif::ProgressBar;
use serde_json::Value;

type Item = HashMap<String, AttributeValue>;

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The key of a connections-table item: (`pk`, `sk`).
fn key((pk, sk): (&str, &str)) -> Item {
    HashMap::from([("pk".to_owned(), s(pk)), ("sk".to_owned(), s(sk))])
}

fn conn(id: &str) -> (String, String) {
    (format!("CONN#{id}"), "CONN".to_owned())
}

fn claim(name_key: &str) -> (String, String) {
    (format!("NAME#{name_key}"), "NAME".to_owned())
}

/// A member item of the lobby, which has one shard here.
fn lobby_member(id: &str) -> (String, String) {
    ("MEMBERS#lobby#0".to_owned(), id.to_owned())
}

fn k(key: &(String, String)) -> (&str, &str) {
    (&key.0, &key.1)
}

impl World {
    async fn rebuild(&self, apply: bool) -> RebuildReport {
        rebuild(
            &self.log(),
            &self.connections(),
            apply,
            chat_shared::now_ms(),
            &ProgressBar::hidden(),
        )
        .await
        .expect("rebuild")
    }

    /// Every item of the connections table, in key order.
    async fn connections_items(&self) -> Vec<Item> {
        let mut items = self
            .client
            .scan()
            .table_name(&self.tables.connections)
            .consistent_read(true)
            .send()
            .await
            .expect("scan")
            .items
            .unwrap_or_default();
        items.sort_by_key(|i| format!("{:?}{:?}", i.get("pk"), i.get("sk")));
        items
    }

    async fn get(&self, at: (&str, &str)) -> Option<Item> {
        self.client
            .get_item()
            .table_name(&self.tables.connections)
            .set_key(Some(key(at)))
            .consistent_read(true)
            .send()
            .await
            .expect("get")
            .item
    }

    async fn put(&self, item: Item) {
        self.client
            .put_item()
            .table_name(&self.tables.connections)
            .set_item(Some(item))
            .send()
            .await
            .expect("put");
    }

    async fn delete(&self, at: (&str, &str)) {
        self.client
            .delete_item()
            .table_name(&self.tables.connections)
            .set_key(Some(key(at)))
            .send()
            .await
            .expect("delete");
    }

    async fn set(&self, at: (&str, &str), attrs: &[(&str, AttributeValue)]) {
        let mut item = self.get(at).await.expect("item to change");
        for (name, value) in attrs {
            item.insert((*name).to_owned(), value.clone());
        }
        self.put(item).await;
    }

    /// Sets the lobby's counter (the events table's item at seq 0) behind the store's back.
    async fn set_counter(&self, last: u64) {
        self.client
            .update_item()
            .table_name(&self.tables.events)
            .key("pk", s("ROOM#lobby"))
            .key("seq", n(0))
            .update_expression("SET #last = :last")
            .expression_attribute_names("#last", "last")
            .expression_attribute_values(":last", n(last))
            .send()
            .await
            .expect("set the counter");
    }
}

/// 1 alice (A) joins, 2 bob (B) joins, 3 carol (C) joins, 4 alice posts, 5 carol leaves,
/// 6 dave (D) joins: a consistent lobby, the way the chat leaves it. Returns C's member item as
/// it was before she left.
async fn seed(w: &World) -> Item {
    let now = chat_shared::now_ms();
    w.join("A", "alice", now).await;
    w.join("B", "bob", now).await;
    w.join("C", "carol", now).await;
    w.store.post_public("A", "hi", now).await.expect("post");
    let carol = w.get(k(&lobby_member("C"))).await.expect("C's member item");
    w.store
        .remove_connection("C", LeaveReason::Disconnected, now)
        .await
        .expect("leave");
    w.join("D", "dave", now).await;
    carol
}

/// The drift the corruption below causes, in report order.
async fn expected_drift(w: &World) -> Vec<Drift> {
    let bob = w
        .store
        .connection("B", chat_shared::now_ms())
        .await
        .expect("read")
        .expect("bob is connected");
    vec![
        Drift::CounterBehind {
            found: Some(2),
            expected: 6,
        },
        Drift::MemberNameDiffers {
            connection_id: "A".into(),
            shard: 0,
            found: "mallory".into(),
            expected: "alice".into(),
        },
        Drift::LeftButPresent {
            connection_id: "C".into(),
            shard: 0,
            name: "carol".into(),
        },
        Drift::OrphanMember {
            connection_id: "D".into(),
            shard: 0,
            name: "dave".into(),
        },
        Drift::NameDiffers {
            connection_id: "A".into(),
            found: Some("mallory".into()),
            found_key: Some("mallory".into()),
            expected: "alice".into(),
        },
        Drift::MemberMissing {
            connection_id: "B".into(),
            name: "bob".into(),
            shard: 0,
            expires_at: bob.expires_at,
            item_missing: true,
            entry_missing: false,
            batch: false,
        },
        Drift::ClaimMissing {
            connection_id: "B".into(),
            name: "bob".into(),
            name_key: "bob".into(),
            expires_at: bob.expires_at,
            found_owner: None,
            found_reservation: false,
            identity: None,
        },
    ]
}

/// Corrupts the lobby's state every way the rebuild knows.
async fn corrupt(w: &World, carol: Item) {
    // bob's claim and his member item are lost
    w.delete(k(&claim("bob"))).await;
    w.delete(k(&lobby_member("B"))).await;
    // alice's connection and her member item show another name
    w.set(
        k(&conn("A")),
        &[("name", s("mallory")), ("nameKey", s("mallory"))],
    )
    .await;
    w.set(k(&lobby_member("A")), &[("name", s("mallory"))])
        .await;
    // the counter is behind the log
    w.set_counter(2).await;
    // carol left, but her member item is back
    w.put(carol).await;
    // dave's connection and claim vanish without a MemberLeft (as if deleted by hand): his
    // member item is left behind, a ghost
    w.delete(k(&conn("D"))).await;
    w.delete(k(&claim("dave"))).await;
}

fn dave() -> Vec<MemberRef> {
    vec![MemberRef {
        connection_id: "D".into(),
        name: "dave".into(),
    }]
}

#[tokio::test]
async fn rebuild_reports_exactly_the_drift_fixes_it_with_apply_and_the_chat_goes_on() {
    // GIVEN a room built through the chat's store
    let w = World::new().await;
    let carol = seed(&w).await;
    // (a room the chat itself left has no drift)
    let clean = w.rebuild(false).await;
    assert_eq!(clean.drifts(), Vec::<&Drift>::new(), "{clean}");
    assert!(clean.members_without_connection.is_empty());
    assert_eq!((clean.events_read, clean.max_event_id), (6, 6));

    // AND its connections table corrupted behind the store's back
    corrupt(&w, carol).await;
    let expected = expected_drift(&w).await;
    let before = w.connections_items().await;

    // WHEN rebuild runs without --apply
    let report = w.rebuild(false).await;

    // THEN it reports exactly those drifts, and dave as a member without a connection
    assert_eq!(
        report.drifts(),
        expected.iter().collect::<Vec<_>>(),
        "{report}"
    );
    assert_eq!(report.members_without_connection, dave());
    assert!(!report.applied);
    assert_eq!(report.fixed, 0);
    // AND it changed nothing
    assert_eq!(w.connections_items().await, before);

    // WHEN the binary runs it with --apply
    let out = w.run(&["rebuild", "--apply", "--json"]).await;

    // THEN it fixed all seven
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let applied: Value = serde_json::from_str(&stdout(&out)).expect("a JSON report");
    assert_eq!(applied["applied"], true);
    assert_eq!(applied["fixed"], 7, "{applied:#}");
    assert_eq!(applied["skipped"], 0);
    let kinds: Vec<(&str, &str)> = applied["drift"]
        .as_array()
        .expect("drift list")
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or_default(),
                d["outcome"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("counterBehind", "fixed"),
            ("memberNameDiffers", "fixed"),
            ("leftButPresent", "fixed"),
            ("orphanMember", "fixed"),
            ("nameDiffers", "fixed"),
            ("memberMissing", "fixed"),
            ("claimMissing", "fixed"),
        ]
    );

    // AND a second run finds no drift (dave is still reported, never fixed)
    let again = w.rebuild(false).await;
    assert_eq!(again.drifts(), Vec::<&Drift>::new(), "{again}");
    assert_eq!(again.members_without_connection, dave());

    // AND bob is a member again, where the fan-out reads members; dave's ghost is gone
    let now = chat_shared::now_ms();
    let members = w
        .store
        .members_page("lobby", 0, None, now)
        .await
        .expect("members");
    let mut names: Vec<&str> = members.members.iter().map(|m| m.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["alice", "bob"]);

    // AND the chat works on it: ids continue after the highest, names are where the log says
    let erin = w.join("E", "erin", now).await;
    assert_eq!(erin.seq, 7);
    let posted = w.store.post_public("A", "back", now).await.expect("post");
    assert_eq!(posted.seq, 8);
    assert!(matches!(posted.event, ChatEvent::MessagePosted { ref name, .. } if name == "alice"));
    assert!(matches!(
        w.store.set_name("E", &valid("bob"), now).await,
        Err(StoreError::NameTaken(_))
    ));
    let renamed = w
        .store
        .set_name("E", &valid("dave"), now)
        .await
        .expect("the vanished name is free again")
        .into_iter()
        .next()
        .expect("a rename");
    assert_eq!(renamed.seq, 9);
    assert_eq!(
        w.store.connection("C", now).await.expect("read"),
        None,
        "carol stays gone"
    );
}

#[tokio::test]
async fn the_default_dry_run_prints_a_readable_report_and_writes_nothing() {
    // GIVEN a corrupted room
    let w = World::new().await;
    let carol = seed(&w).await;
    corrupt(&w, carol).await;
    let before = w.connections_items().await;

    // WHEN the binary runs `rebuild` with no flags
    let out = w.run(&["rebuild"]).await;

    // THEN a person can read what is wrong, and that nothing was done about it
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    for expected in [
        "room lobby: 6 events read, highest id 6",
        "drift (7):",
        "the room's counter is 2, below the highest event id 6",
        "member item of A says \"mallory\", the log says \"alice\"",
        "member item of C (\"carol\") is present but the log says it is not a member",
        "member item of D (\"dave\") has no live connection",
        "CONN#A has \"mallory\", the log says \"alice\"",
        "member B (\"bob\") per the log has no member item",
        "NAME#bob is missing for member B (\"bob\")",
        "members without a connection (1)",
        "D (\"dave\")",
        "dry run: nothing was changed; run with --apply to fix 7 drift(s)",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    assert_eq!(w.connections_items().await, before);
}

#[tokio::test]
async fn with_authentication_reservations_are_kept_and_restored_claims_stay_bound_to_identities() {
    // GIVEN an authenticated room: alice (u-alice) joined and left, so her name is now a
    // reservation for her identity (a claim without a connection); bob (u-bob) is a member
    let w = World::new().await;
    let now = chat_shared::now_ms();
    w.store
        .add_identified_connection("A", Some("u-alice"), now)
        .await
        .expect("connect");
    w.store
        .set_name("A", &valid("alice"), now)
        .await
        .expect("join")
        .into_iter()
        .next();
    w.store
        .remove_connection("A", LeaveReason::Disconnected, now)
        .await
        .expect("leave")
        .into_iter()
        .next();
    w.store
        .add_identified_connection("B", Some("u-bob"), now)
        .await
        .expect("connect");
    w.store
        .set_name("B", &valid("bob"), now)
        .await
        .expect("join")
        .into_iter()
        .next();
    let reservation = w
        .get(k(&claim("alice")))
        .await
        .expect("alice's reservation");
    assert!(!reservation.contains_key("connectionId"));

    // WHEN rebuilt THEN the reservation is neither malformed nor an orphan: no drift
    let clean = w.rebuild(false).await;
    assert_eq!(clean.drifts(), Vec::<&Drift>::new(), "{clean}");

    // WHEN bob's claim is replaced by a bare reservation (his connection lost it) and the
    // rebuild applies its fix
    let mut bare = key(k(&claim("bob")));
    bare.insert("identity".into(), s("u-bob"));
    bare.insert("name".into(), s("bob"));
    bare.insert("expiresAt".into(), n(now / 1000 + 3_600));
    w.put(bare).await;
    let report = w.rebuild(true).await;

    // THEN it was reported as a reservation a member should hold, and fixed
    let bob = w
        .store
        .connection("B", now)
        .await
        .expect("read")
        .expect("bob is connected");
    assert_eq!(
        report.drifts(),
        vec![&Drift::ClaimMissing {
            connection_id: "B".into(),
            name: "bob".into(),
            name_key: "bob".into(),
            expires_at: bob.expires_at,
            found_owner: None,
            found_reservation: true,
            identity: Some("u-bob".into()),
        }],
        "{report}"
    );
    let restored = w.get(k(&claim("bob"))).await.expect("bob's claim");
    assert_eq!(restored.get("connectionId"), Some(&s("B")));
    assert_eq!(
        restored.get("identity"),
        Some(&s("u-bob")),
        "bound to bob's identity"
    );

    // AND the chat's take-back works on the restored claim: bob's identity, on a new
    // connection, takes his name from the old one
    w.store
        .add_identified_connection("B2", Some("u-bob"), now)
        .await
        .expect("connect");
    w.store
        .set_name("B2", &valid("bob"), now)
        .await
        .expect("bob takes his name back")
        .into_iter()
        .next();
    // AND alice's reservation still holds against another identity
    w.store
        .add_identified_connection("M", Some("u-mallory"), now)
        .await
        .expect("connect");
    let taken = w.store.set_name("M", &valid("alice"), now).await;
    assert!(matches!(taken, Err(StoreError::NameTaken(_))), "{taken:?}");
    assert_eq!(w.rebuild(false).await.drifts(), Vec::<&Drift>::new());
}

#[tokio::test]
async fn a_room_other_than_the_lobby_is_rebuilt_on_its_own() {
    // GIVEN alice and bob in the lobby, and alice also in `ops`, where she posted
    let w = World::new().await;
    let now = chat_shared::now_ms();
    w.join("A", "alice", now).await;
    w.join("B", "bob", now).await;
    w.store.join_room("A", "ops", 50, now).await.expect("join");
    w.store
        .post_to_room("A", "ops", "hi ops", now)
        .await
        .expect("post");
    // AND alice's member item of `ops` lost behind the store's back
    let ops_member = ("MEMBERS#ops#0", "A");
    assert!(
        w.get(ops_member).await.is_some(),
        "alice is a member of ops"
    );
    w.delete(ops_member).await;

    // WHEN the binary rebuilds `ops` with --apply
    let out = w
        .run(&["rebuild", "--room", "ops", "--apply", "--json"])
        .await;

    // THEN it read ops's log only (2 events), found the one drift and fixed it
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let report: Value = serde_json::from_str(&stdout(&out)).expect("a JSON report");
    assert_eq!(report["room"], "ops");
    assert_eq!(report["eventsRead"], 2, "{report:#}");
    assert_eq!(report["fixed"], 1, "{report:#}");
    assert_eq!(report["drift"][0]["kind"], "memberMissing");
    // AND alice is a member of ops again where the fan-out reads members, and may post there
    let members = w
        .store
        .members_page("ops", 0, None, now)
        .await
        .expect("members");
    assert_eq!(
        members
            .members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["alice"]
    );
    let posted = w
        .store
        .post_to_room("A", "ops", "back", now)
        .await
        .expect("post");
    assert_eq!(posted.seq, 3);
    // AND the lobby had no drift to begin with, and still has none
    assert_eq!(w.rebuild(false).await.drifts(), Vec::<&Drift>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_a_large_room_joined_or_left_without_events_are_not_drift() {
    // GIVEN a store whose rooms turn large past 2 members: A, B and C join lobby with
    // MemberJoined (C's takes it past the limit), D and E join unsequenced (no event)
    let w = World::new().await;
    let store = chat_shared::store::dynamodb::DynamoStore::new(
        w.client.clone(),
        w.tables.clone(),
        chat_shared::config::Retention::default(),
    )
    .with_large_room_limit(2);
    let now = chat_shared::now_ms();
    let mut events = 0;
    for (id, name) in [
        ("A", "alice"),
        ("B", "bob"),
        ("C", "carol"),
        ("D", "dave"),
        ("E", "erin"),
    ] {
        store.add_connection(id, now).await.expect("connect");
        events += store
            .set_name(id, &valid(name), now)
            .await
            .expect("name")
            .len();
    }
    assert_eq!(events, 3);
    // AND C disconnects, leaving the large lobby without a MemberLeft
    let left = store
        .remove_connection("C", LeaveReason::Disconnected, now)
        .await
        .expect("remove");
    assert!(left.is_empty(), "{left:?}");

    // WHEN the room is rebuilt
    let report = w.rebuild(false).await;

    // THEN there is no drift: D and E are counted as unsequenced members, and C (whom the log
    // still lists, with no connection left) is reported as a member without a connection
    assert_eq!(report.drifts(), Vec::<&Drift>::new(), "{report}");
    assert_eq!(report.unsequenced_members, 2);
    assert_eq!(
        report.members_without_connection,
        vec![MemberRef {
            connection_id: "C".into(),
            name: "carol".into(),
        }]
    );
    assert!(report
        .to_string()
        .contains("unsequenced (no event, not drift): 2 members joined"));
}

/// The member items of `id` in any of lobby's shards, as (pk, sk).
async fn lobby_items_of(backend: &chat_tests::World, id: &str) -> Vec<Item> {
    backend
        .moto
        .dynamodb()
        .scan()
        .table_name(&backend.tables.connections)
        .consistent_read(true)
        .send()
        .await
        .expect("scan")
        .items
        .unwrap_or_default()
        .into_iter()
        .filter(|i| {
            matches!(i.get("pk"), Some(AttributeValue::S(pk)) if pk.starts_with("MEMBERS#lobby#"))
                && i.get("sk") == Some(&s(id))
        })
        .collect()
}

#[tokio::test]
async fn rebuilt_member_items_keep_the_connections_batch_opt_in_and_the_fan_out_still_batches() {
    // GIVEN the whole backend on moto: alice (A) connected with ?batch=1, bob (B) without,
    // both in lobby, their joins fanned out
    let mut backend = chat_tests::World::new(WorldConfig {
        handler: chat_shared::config::HandlerConfig {
            rate_limit: chat_shared::ratelimit::RateLimit {
                per_second: 0,
                burst: 0,
            },
            principal_limit: chat_shared::ratelimit::PrincipalLimit::OFF,
            ..chat_shared::config::HandlerConfig::default()
        },
        fanout: chat_shared::config::FanoutConfig::default(),
    })
    .await
    .expect("moto must start (run scripts/test)");
    let mut connect = chat_tests::World::event("$connect", "A", None);
    connect.query_string_parameters = "batch=1".parse().expect("query");
    let r = chat_shared::handler::handle_request(
        &backend.store,
        &backend.handler,
        connect,
        chat_shared::now_ms(),
    )
    .await
    .expect("handler");
    assert_eq!(r.status_code, 200);
    let err = backend
        .send("A", serde_json::json!({"action":"setName","name":"alice"}))
        .await;
    assert_eq!(err, None);
    backend.join("B", "bob").await;
    backend.fan_out().await;
    // (the chat copied the opt-in onto alice's member item, not onto bob's)
    let alice_before = lobby_items_of(&backend, "A").await;
    assert_eq!(alice_before.len(), 1);
    assert_eq!(
        alice_before[0].get("batch"),
        Some(&AttributeValue::Bool(true))
    );

    // AND both member items are lost behind the chat's back
    for id in ["A", "B"] {
        for item in lobby_items_of(&backend, id).await {
            backend
                .moto
                .dynamodb()
                .delete_item()
                .table_name(&backend.tables.connections)
                .key("pk", item["pk"].clone())
                .key("sk", item["sk"].clone())
                .send()
                .await
                .expect("delete");
        }
    }

    // WHEN rebuild runs with --apply
    let client = backend.moto.dynamodb();
    let at = backend.moto.endpoint();
    let report = rebuild(
        &chat_replay::log::EventLog::new(client.clone(), &backend.tables.events, "lobby", &at),
        &chat_replay::rebuild::ConnectionsTable::new(
            client,
            &backend.tables.connections,
            &backend.tables.events,
            "lobby",
            &at,
        ),
        true,
        chat_shared::now_ms(),
        &ProgressBar::hidden(),
    )
    .await
    .expect("rebuild");

    // THEN it put both back, alice's as batched and bob's not
    let missing: Vec<(&str, bool)> = report
        .drifts()
        .into_iter()
        .filter_map(|d| match d {
            Drift::MemberMissing {
                connection_id,
                batch,
                ..
            } => Some((connection_id.as_str(), *batch)),
            _ => None,
        })
        .collect();
    assert_eq!(missing, [("A", true), ("B", false)], "{report}");
    assert_eq!(report.fixed, 2, "{report}");
    let alice = lobby_items_of(&backend, "A").await;
    assert_eq!(alice.len(), 1);
    assert_eq!(alice[0].get("batch"), Some(&AttributeValue::Bool(true)));
    assert_eq!(
        alice, alice_before,
        "alice's item is back as the chat wrote it"
    );
    let bob = lobby_items_of(&backend, "B").await;
    assert_eq!(bob.len(), 1);
    assert_eq!(bob[0].get("batch"), None);

    // WHEN bob then posts twice and the fan-out handles the stream batch
    backend.endpoint.clear();
    for m in ["one", "two"] {
        backend
            .send("B", serde_json::json!({"action":"sendPublic","message":m}))
            .await;
    }
    let response = backend.fan_out().await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");

    // THEN alice, read from her rebuilt member item, gets both in one {"batch":[…]} POST,
    // and bob one POST per message
    let posts = |id: &str| -> Vec<Value> {
        backend
            .endpoint
            .raw_posts()
            .into_iter()
            .filter(|p| p.connection_id == id)
            .map(|p| serde_json::from_slice(&p.body).expect("a JSON POST"))
            .collect()
    };
    let alice_posts = posts("A");
    assert_eq!(alice_posts.len(), 1, "{alice_posts:?}");
    let inner = alice_posts[0]["batch"].as_array().expect("a batch frame");
    assert_eq!(inner.len(), 2, "{alice_posts:?}");
    assert_eq!(inner[0]["publicMessage"], "bob: one");
    assert_eq!(inner[1]["publicMessage"], "bob: two");
    let bob_posts = posts("B");
    assert_eq!(bob_posts.len(), 2, "{bob_posts:?}");
    assert!(bob_posts.iter().all(|p| p.get("batch").is_none()));
}
