//! `chat-bench soak` at CI size: no loss, no disorder, every duplicate removable by id.

use std::path::Path;

use chat_bench::soak::{self, SoakOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_gets_every_message_once_in_id_order() {
    // GIVEN 50 members, random senders posting 10 messages a second for 5 s
    let opts = SoakOptions {
        clients: 50,
        rate: 10.0,
        duration: 5,
        drain_secs: 30,
        timeout_secs: 120,
        ..SoakOptions::default()
    };

    // WHEN the soak runs
    let report = soak::run(&opts, Path::new(env!("CARGO_BIN_EXE_chat-bench")))
        .await
        .expect("the soak runs");

    // THEN nothing was lost or reordered, and nothing was refused
    let c = &report.check;
    assert_eq!(c.sent, 50);
    assert_eq!(c.expected, 50 * 50);
    assert_eq!(c.loss, 0, "{report:?}");
    assert_eq!(c.out_of_order, 0, "{report:?}");
    assert_eq!(c.id_mismatch, 0, "{report:?}");
    assert_eq!(report.refused, 0);
    // AND after dedupe by id each member holds each message exactly once
    assert_eq!(c.received - c.duplicates, c.expected);
    assert!(report.ok);
}
