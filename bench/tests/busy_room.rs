//! `chat-bench busy-room` at CI size, in both modes: batched members get every event once, in
//! order, in fewer POSTs than events; unbatched members one POST per event.

use std::path::Path;

use chat_bench::busy_room::{self, BusyRoomOptions, BusyRoomReport};

async fn busy_room(aws_like: bool) -> BusyRoomReport {
    // GIVEN a room of 60 members, half batched, 20 events/s for 2 s, a window of half a
    // second (about 10 events a batch) and, for contrast, no window
    let opts = BusyRoomOptions {
        members: 60,
        batched_pct: vec![50],
        rate: 20.0,
        duration: 2,
        window: vec![0.5, 0.0],
        drain_secs: 60,
        aws_like,
        ..BusyRoomOptions::default()
    };
    // WHEN the bench runs (the stand-in @connections in its own process)
    busy_room::run(&opts, Path::new(env!("CARGO_BIN_EXE_chat-bench")))
        .await
        .expect("the benchmark runs")
}

fn assert_delivered(report: &BusyRoomReport) {
    assert_eq!(report.runs.len(), 2, "one run per window");
    for run in &report.runs {
        let b = run.batched.as_ref().expect("a batched group");
        let u = run.unbatched.as_ref().expect("an unbatched group");
        // THEN every member of both groups got all 40 events, none out of order
        for g in [b, u] {
            assert_eq!(g.members, 30);
            assert_eq!(g.expected, 40 * 30);
            assert_eq!(g.loss, 0, "window {}", run.window_secs);
            assert_eq!(g.received.distinct, g.expected);
            assert_eq!(g.received.min_per_member, 40);
            assert_eq!(g.received.out_of_order, 0);
        }
        // AND an unbatched member got one frame per POST
        assert_eq!(u.received.frames, u.received.posts);
        assert!(run.ok);
    }
    // AND with a window, batched members got several events per POST
    let windowed = &report.runs[0];
    assert_eq!(windowed.window_secs, 0.5);
    let b = windowed.batched.as_ref().expect("a batched group");
    assert!(
        b.posts_per_delivered_event <= 0.5,
        "batched: {} POSTs per delivered event",
        b.posts_per_delivered_event
    );
    assert!(report.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ideal_mode_batched_members_get_every_event_in_fewer_posts() {
    let report = busy_room(false).await;
    assert_eq!(report.mode, "ideal");
    assert_delivered(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_like_mode_batched_members_get_every_event_in_fewer_posts() {
    let report = busy_room(true).await;
    // The run had DynamoDB's latencies and API Gateway's round trip and quota.
    assert_eq!(report.mode, "aws-like");
    let run = &report.runs[0];
    assert_eq!((run.latency_ms, run.limit_posts_per_second), (20, 10_000));
    assert_delivered(&report);
}
