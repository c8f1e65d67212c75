//! `chat-bench fanout` at CI size: correctness of what it measures, never its speed.

use std::path::Path;

use chat_bench::fanout::{self, FanoutOptions, Kind};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_live_client_gets_each_frame_once_and_vanished_ones_are_pruned() {
    // GIVEN 200 clients in the room, 10 % of which vanish without a close frame
    let opts = FanoutOptions {
        clients: 200,
        latency_ms: 0,
        gone_pct: 10.0,
        rounds: 1,
        timeout_secs: 120,
        ..FanoutOptions::default()
    };

    // WHEN the three measurements run
    let report = fanout::run(&opts, Path::new(env!("CARGO_BIN_EXE_chat-bench")))
        .await
        .expect("the benchmark runs");

    // THEN every live client received each measured frame exactly once
    assert_eq!(report.vanished, 20);
    assert_eq!(report.live, 180);
    assert_eq!(report.measurements.len(), 3);
    for d in &report.measurements {
        assert_eq!(d.recipients, 180, "{d:?}");
        assert_eq!(d.received, 180, "{d:?}");
        assert_eq!((d.missing, d.duplicates), (0, 0), "{d:?}");
        if let Some(post) = d.post {
            assert_eq!(post.errors(), 0, "{d:?}");
        }
        // AND each produced figures (their size is not a test's business)
        assert!(d.deliveries_per_s > 0.0, "{d:?}");
        assert!(d.time_to_last_ms > 0.0, "{d:?}");
        assert!(d.latency.p99_ms > 0.0, "{d:?}");
    }
    let kinds: Vec<Kind> = report.measurements.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, [Kind::Raw, Kind::Fanout, Kind::Naive]);
    assert!(report.fanout_over_raw > 0.0 && report.fanout_over_naive > 0.0);

    // AND the fan-out pruned every vanished client, and no live one
    let prune = report
        .prune
        .as_ref()
        .expect("a prune check with vanished clients");
    assert_eq!(prune.vanished, 20);
    assert_eq!(prune.still_members, 0);
    assert_eq!(prune.live_missing, 0);
    assert_eq!(report.error_frames, 0);
    assert!(report.peak_memory_kib > 0);
    assert!(report.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_like_mode_measures_the_same_deliveries_with_aws_latencies() {
    // GIVEN 60 clients in an AWS-like stack (store latency, eventual consistency, 20 ms
    // @connections round trips, the stream's polling delay), 10 % of which vanish
    let opts = FanoutOptions {
        clients: 60,
        gone_pct: 10.0,
        timeout_secs: 120,
        aws_like: true,
        ..FanoutOptions::default()
    };

    // WHEN the three measurements run
    let report = fanout::run(&opts, Path::new(env!("CARGO_BIN_EXE_chat-bench")))
        .await
        .expect("the benchmark runs");

    // THEN the report says which mode it measured, and every live client still received each
    // frame exactly once, the vanished ones pruned
    assert_eq!(report.mode, "aws-like");
    assert_eq!(report.latency_ms, 20);
    assert_eq!((report.live, report.vanished), (54, 6));
    for d in &report.measurements {
        assert_eq!((d.received, d.missing, d.duplicates), (54, 0, 0), "{d:?}");
    }
    let prune = report.prune.as_ref().expect("a prune check");
    assert_eq!((prune.still_members, prune.live_missing), (0, 0));
    assert!(report.ok);
}
