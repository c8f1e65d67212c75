//! `chat-bench fanout-only` at CI size: the sink in its own process counts one POST per member.

use std::path::Path;

use chat_bench::fanout_only::{self, FanoutOnlyOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_gets_exactly_one_post_at_the_sink() {
    // GIVEN 2,000 named connections in the store and a sink process
    let opts = FanoutOnlyOptions {
        clients: 2000,
        // One warm-up round is enough for counting; the default is for memory figures.
        warmup_rounds: 1,
        ..FanoutOnlyOptions::default()
    };

    // WHEN the fan-out delivers one public message
    let report = fanout_only::run(&opts, Path::new(env!("CARGO_BIN_EXE_chat-bench")))
        .await
        .expect("the benchmark runs");

    // THEN the sink counted exactly one POST for each of them
    assert_eq!(report.sink.posts, 2000);
    assert_eq!(report.sink.distinct, 2000);
    assert_eq!(report.sink.max_per_id, 1);
    assert_eq!(report.delivered, 2000);
    assert_eq!((report.pruned, report.rejected), (0, 0));
    assert!(report.deliveries_per_s > 0.0);
    assert!(report.memory.peak_kib > 0 && report.memory.rss_before_kib > 0);
    assert!(report.ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_members_are_all_delivered() {
    // GIVEN members read in pages, as DynamoDB hands them out
    let opts = FanoutOnlyOptions {
        clients: 500,
        page_limit: Some(64),
        warmup_rounds: 1,
        ..FanoutOnlyOptions::default()
    };
    let report = fanout_only::run(&opts, Path::new(env!("CARGO_BIN_EXE_chat-bench")))
        .await
        .expect("the benchmark runs");
    // THEN every member still gets exactly one POST
    assert_eq!(
        (
            report.sink.posts,
            report.sink.distinct,
            report.sink.max_per_id
        ),
        (500, 500, 1)
    );
    assert!(report.ok);
}
