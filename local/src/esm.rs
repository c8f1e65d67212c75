//! Lambda's event source mapping for a DynamoDB stream, in-process: it polls a
//! [`RecordSource`] in batches, invokes the fan-out with the same `Event` type Lambda sends,
//! and moves the checkpoint the way Lambda does with `ReportBatchItemFailures`:
//!
//! - no failures reported → the whole batch is done;
//! - failures reported → everything before the *lowest* reported sequence number is done, and
//!   the next batch starts at that record (so records after it are delivered again: at least
//!   once);
//! - the function itself failed, or reported an identifier not in the batch → nothing is
//!   done and the whole batch is retried;
//! - after `max_retry_attempts` retries of the same record the batch's head is given up on —
//!   logged as sent to the on-failure destination, as Lambda would — so one poison record
//!   cannot stop the stream (template.yaml: `MaximumRetryAttempts`, `DestinationConfig`);
//! - with a `batching_window` (`MaximumBatchingWindowInSeconds`), a batch smaller than
//!   `batch_size` waits up to the window from its first record for more, as Lambda gathers
//!   records before invoking (checked every [`WINDOW_RECHECK`], invoked at once when full);
//! - records the template's `FilterCriteria` would drop (the rooms' counter records, see
//!   [`chat_shared::stream::passes_template_filter`]) are dropped before the invocation and checkpointed past, as
//!   Lambda discards filtered records; a batch of nothing else invokes nothing. The mapping of
//!   the connections table's stream has its own filter (TTL deletions of connection items
//!   only, [`chat_shared::stream::passes_expiry_filter`]): [`Mapping::spawn_filtered`].

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use chat_shared::stream::{passes_template_filter, RecordSource, SourceError};

/// A mapping's `FilterCriteria`: whether a record reaches the function.
pub type RecordFilter = fn(&EventRecord) -> bool;
use tokio::sync::watch;
use tracing::{debug, error, warn};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The function the mapping invokes (the fan-out, in-process).
#[async_trait]
pub trait StreamTarget: Send + Sync + 'static {
    async fn invoke(&self, event: Event) -> Result<DynamoDbEventResponse, BoxError>;
}

#[derive(Debug, Clone)]
pub struct EsmConfig {
    /// `BatchSize` (template.yaml: 100).
    pub batch_size: usize,
    /// How long one poll waits for records; Lambda polls a shard about four times a second.
    pub poll_wait: Duration,
    /// AWS-like mode: the pause after a poll that found nothing, as Lambda's poller takes
    /// between `GetRecords` calls on an idle shard (about 250 ms: four polls a second), so a
    /// record waits for the next poll instead of waking the mapping at once. Zero (ideal): a
    /// poll waits up to `poll_wait` and returns the moment a record arrives.
    pub poll_interval: Duration,
    /// `MaximumRetryAttempts` (template.yaml: 5).
    pub max_retry_attempts: u32,
    /// Pause before retrying a failed batch (doubles per attempt, capped at 5 s).
    pub retry_backoff: Duration,
    /// Apply template.yaml's `FilterCriteria` (default on, as deployed). Off, every record
    /// reaches the fan-out, which skips counter records itself.
    pub filter: bool,
    /// `MaximumBatchingWindowInSeconds` (template.yaml's `EventsBatchingWindowSeconds`): how
    /// long a batch that is not full waits for more records. Zero: invoke at once.
    pub batching_window: Duration,
}

/// How often a batch waiting out its window looks for more records (to invoke as soon as it
/// is full).
pub const WINDOW_RECHECK: Duration = Duration::from_millis(100);

impl Default for EsmConfig {
    fn default() -> Self {
        EsmConfig {
            batch_size: 100,
            poll_wait: Duration::from_millis(250),
            poll_interval: Duration::ZERO,
            max_retry_attempts: 5,
            retry_backoff: Duration::from_millis(200),
            filter: true,
            batching_window: Duration::ZERO,
        }
    }
}

/// What to do after one invocation.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Checkpoint after this sequence number (`None`: nothing is done) and whether to retry.
    Checkpoint { after: Option<String>, failed: bool },
}

/// Lambda's reading of a partial batch response.
fn interpret(batch: &[EventRecord], outcome: &Result<DynamoDbEventResponse, BoxError>) -> Next {
    let seq = |r: &EventRecord| r.change.sequence_number.clone();
    let last = batch.last().and_then(seq);
    let response = match outcome {
        Err(_) => {
            return Next::Checkpoint {
                after: None,
                failed: true,
            }
        }
        Ok(response) => response,
    };
    if response.batch_item_failures.is_empty() {
        return Next::Checkpoint {
            after: last,
            failed: false,
        };
    }
    // The earliest failing record in stream order; an identifier that is missing or not in
    // the batch makes Lambda treat the whole batch as failed.
    let mut lowest: Option<usize> = None;
    for failure in &response.batch_item_failures {
        let position = failure.item_identifier.as_deref().and_then(|id| {
            batch
                .iter()
                .position(|r| r.change.sequence_number.as_deref() == Some(id))
        });
        match position {
            None => {
                return Next::Checkpoint {
                    after: None,
                    failed: true,
                }
            }
            Some(p) => lowest = Some(lowest.map_or(p, |l| l.min(p))),
        }
    }
    let lowest = lowest.unwrap_or(0);
    let after = if lowest == 0 {
        None
    } else {
        seq(&batch[lowest - 1])
    };
    Next::Checkpoint {
        after,
        failed: true,
    }
}

/// What a mapping went through, over its whole run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MappingStats {
    /// Invocations that failed or reported a failed record (each is retried).
    pub failed_invocations: u64,
    /// Records given up on after the maximum retry attempts (on AWS: dead-lettered).
    pub given_up: u64,
    /// Records dropped by the template's filter (never sent to the fan-out).
    pub filtered: u64,
    /// Times the function was invoked (retries included).
    pub invocations: u64,
}

/// Runs the mapping until `stop` turns true and the source is drained (a poll returns no
/// records), so the events written while shutting down (the `$disconnect`s) are delivered.
pub async fn run(
    source: Box<dyn RecordSource>,
    target: Arc<dyn StreamTarget>,
    config: EsmConfig,
    stop: watch::Receiver<bool>,
) -> MappingStats {
    run_filtered(source, target, config, passes_template_filter, stop).await
}

/// [`run`] with another mapping's filter (applied when `config.filter` is on).
pub async fn run_filtered(
    mut source: Box<dyn RecordSource>,
    target: Arc<dyn StreamTarget>,
    config: EsmConfig,
    passes: RecordFilter,
    mut stop: watch::Receiver<bool>,
) -> MappingStats {
    let mut stats = MappingStats::default();
    let mut attempts: u32 = 0;
    loop {
        let stopping = *stop.borrow();
        let wait = if config.poll_interval.is_zero() {
            config.poll_wait
        } else {
            Duration::ZERO
        };
        let batch = match source.poll(config.batch_size, wait).await {
            Ok(batch) => batch,
            Err(SourceError::Gone(stream)) => {
                // Its table was deleted (on AWS the mapping is disabled): nothing will ever
                // come from it, so there is nothing to drain either.
                error!(stream, "the stream is gone; the mapping stops");
                return stats;
            }
            Err(e) => {
                warn!(error = %e, cause = ?std::error::Error::source(&e), "polling the stream failed; retrying");
                if wait_or_stop(&mut stop, config.retry_backoff).await && stopping {
                    return stats;
                }
                continue;
            }
        };
        if batch.is_empty() {
            if stopping {
                return stats;
            }
            if !config.poll_interval.is_zero() {
                wait_or_stop(&mut stop, config.poll_interval).await;
            }
            continue;
        }
        let batch = if config.batching_window.is_zero() || batch.len() >= config.batch_size {
            batch
        } else {
            // The poll does not move the checkpoint: polling again returns these records and
            // any that came since, up to `batch_size`.
            match fill_window(source.as_mut(), &config, batch, &mut stop).await {
                Ok(batch) => batch,
                Err(e) => {
                    warn!(error = %e, "polling the stream failed; retrying");
                    continue;
                }
            }
        };
        let polled_last = batch.last().and_then(|r| r.change.sequence_number.clone());
        let polled = batch.len();
        let batch: Vec<EventRecord> = if config.filter {
            batch.into_iter().filter(&passes).collect()
        } else {
            batch
        };
        stats.filtered += (polled - batch.len()) as u64;
        if batch.is_empty() {
            // Nothing passed the filter: Lambda discards the records and moves on.
            if let Some(seq) = &polled_last {
                source.checkpoint(seq);
            }
            continue;
        }
        let size = batch.len();
        let mut event = Event::default();
        event.records = batch;
        stats.invocations += 1;
        let outcome = target.invoke(event.clone()).await;
        let Next::Checkpoint { after, failed } = interpret(&event.records, &outcome);
        // A batch done is done past the filtered records at its tail too.
        let after = if failed { after } else { polled_last.or(after) };
        if let Some(seq) = &after {
            source.checkpoint(seq);
        }
        if !failed {
            debug!(records = size, "batch done");
            attempts = 0;
            continue;
        }
        attempts += 1;
        stats.failed_invocations += 1;
        let head = event
            .records
            .iter()
            .position(|r| r.change.sequence_number == after)
            .map_or(0, |p| p + 1);
        let head_seq = event
            .records
            .get(head)
            .and_then(|r| r.change.sequence_number.clone());
        if let Err(e) = &outcome {
            warn!(error = %e, attempt = attempts, "fan-out invocation failed; retrying the batch");
        }
        if attempts > config.max_retry_attempts {
            // Lambda would send the batch's metadata to the on-failure destination and move on.
            error!(sequence_number = ?head_seq, attempts, "giving up on a stream record after the maximum retry attempts (on AWS: sent to the on-failure destination)");
            if let Some(seq) = &head_seq {
                source.checkpoint(seq);
            }
            stats.given_up += 1;
            attempts = 0;
            continue;
        }
        let backoff = config
            .retry_backoff
            .saturating_mul(1 << (attempts - 1).min(5))
            .min(Duration::from_secs(5));
        debug!(sequence_number = ?head_seq, attempt = attempts, ?backoff, "retrying from the reported record");
        wait_or_stop(&mut stop, backoff).await;
    }
}

/// Waits out the batching window from the first poll that found records, polling again every
/// [`WINDOW_RECHECK`]; returns the last poll's records (at least `first`) once the batch is
/// full, the window has passed, or the mapping is stopping.
async fn fill_window(
    source: &mut dyn RecordSource,
    config: &EsmConfig,
    first: Vec<EventRecord>,
    stop: &mut watch::Receiver<bool>,
) -> Result<Vec<EventRecord>, chat_shared::stream::SourceError> {
    let until = tokio::time::Instant::now() + config.batching_window;
    let mut batch = first;
    while batch.len() < config.batch_size && !*stop.borrow() {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            break;
        }
        if wait_or_stop(stop, left.min(WINDOW_RECHECK)).await {
            break;
        }
        let again = source.poll(config.batch_size, Duration::ZERO).await?;
        if again.len() >= batch.len() {
            batch = again;
        }
    }
    Ok(batch)
}

/// Sleeps for `d`, returning early (true) if the stop signal changes meanwhile.
async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

/// Spawns [`run`] and returns a handle that stops it (after draining) when asked.
pub struct Mapping {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<MappingStats>,
}

impl Mapping {
    pub fn spawn(
        source: Box<dyn RecordSource>,
        target: Arc<dyn StreamTarget>,
        config: EsmConfig,
    ) -> Self {
        Self::spawn_filtered(source, target, config, passes_template_filter)
    }

    /// [`Mapping::spawn`] with another mapping's filter (the connections table's).
    pub fn spawn_filtered(
        source: Box<dyn RecordSource>,
        target: Arc<dyn StreamTarget>,
        config: EsmConfig,
        passes: RecordFilter,
    ) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(run_filtered(source, target, config, passes, rx));
        Mapping { stop, task }
    }

    /// Asks the mapping to finish the records already in the stream, then waits for it (at
    /// most `limit`: a fan-out that keeps failing must not hold the shutdown forever).
    /// Returns what the mapping went through, or `None` if it did not finish in time.
    pub async fn drain(self, limit: Duration) -> Option<MappingStats> {
        let _ = self.stop.send(true);
        let mut task = self.task;
        match tokio::time::timeout(limit, &mut task).await {
            Ok(Ok(stats)) => Some(stats),
            Ok(Err(e)) => {
                warn!(error = %e, "the event source mapping task failed");
                None
            }
            Err(_) => {
                warn!(
                    ?limit,
                    "the stream was not drained in time; stopping anyway"
                );
                task.abort();
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lambda_events::event::streams::DynamoDbBatchItemFailure;

    fn batch(seqs: &[&str]) -> Vec<EventRecord> {
        seqs.iter()
            .map(|s| {
                let mut r = EventRecord::default();
                r.change.sequence_number = Some((*s).to_owned());
                r
            })
            .collect()
    }

    fn failures(ids: &[Option<&str>]) -> Result<DynamoDbEventResponse, BoxError> {
        let mut response = DynamoDbEventResponse::default();
        for id in ids {
            let mut f = DynamoDbBatchItemFailure::default();
            f.item_identifier = id.map(str::to_owned);
            response.batch_item_failures.push(f);
        }
        Ok(response)
    }

    #[test]
    fn the_template_filter_drops_counter_records_only() {
        use serde_dynamo::AttributeValue::{N, S};
        let record = |name: &str, seq: &str, kind: Option<&str>| {
            let mut r = EventRecord::default();
            r.event_name = name.to_owned();
            r.change.keys.insert("pk".into(), S("ROOM#ops".into()));
            r.change.keys.insert("seq".into(), N(seq.into()));
            if let Some(kind) = kind {
                r.change.new_image.insert("type".into(), S(kind.into()));
            }
            r
        };
        // GIVEN a counter's INSERT and MODIFY THEN dropped
        assert!(!passes_template_filter(&record(
            "INSERT",
            "0",
            Some("Counter")
        )));
        assert!(!passes_template_filter(&record(
            "MODIFY",
            "0",
            Some("Counter")
        )));
        // AND an event, a redelivery item and a TTL REMOVE (keys only) pass
        assert!(passes_template_filter(&record(
            "INSERT",
            "7",
            Some("MessagePosted")
        )));
        assert!(passes_template_filter(&record(
            "INSERT",
            "1796000000000123",
            Some("Redelivery")
        )));
        assert!(passes_template_filter(&record("REMOVE", "7", None)));
        // AND these are the template's patterns, word for word
        let template = include_str!("../../template.yaml");
        for pattern in [
            r#"- Pattern: '{"dynamodb":{"NewImage":{"type":{"S":[{"anything-but":["Counter"]}]}}}}'"#,
            r#"- Pattern: '{"dynamodb":{"Keys":{"seq":{"N":[{"anything-but":["0"]}]}}}}'"#,
        ] {
            assert!(template.contains(pattern), "template.yaml lacks {pattern}");
        }
    }

    /// The fan-out's place: counts its invocations and keeps the records it got.
    #[derive(Default)]
    struct Recording {
        invocations: std::sync::Mutex<Vec<Vec<EventRecord>>>,
    }

    #[async_trait]
    impl StreamTarget for Recording {
        async fn invoke(&self, event: Event) -> Result<DynamoDbEventResponse, BoxError> {
            self.invocations.lock().expect("lock").push(event.records);
            Ok(DynamoDbEventResponse::default())
        }
    }

    #[tokio::test]
    async fn counter_records_never_reach_the_fan_out_and_are_checkpointed_past() {
        use chat_shared::store::ChatStore;
        // GIVEN an embedded store whose feed holds events and, for each, its room's counter
        // record (as DynamoDB Streams would): alice sets her name, joins ops and posts there
        let store = chat_shared::store::embedded::EmbeddedStore::new(Default::default());
        let now = 1_800_000_000_000;
        store.add_connection("A", now).await.expect("connect");
        let name = chat_shared::validation::validate_name("alice").expect("name");
        store.set_name("A", &name, now).await.expect("name");
        store.join_room("A", "ops", 50, now).await.expect("join");
        store
            .post_to_room("A", "ops", "hi", now)
            .await
            .expect("post");
        // WHEN the mapping drains it one record a batch
        let target = Arc::new(Recording::default());
        let (_stop_tx, stop) = watch::channel(true);
        let config = EsmConfig {
            batch_size: 1,
            poll_wait: Duration::from_millis(10),
            ..EsmConfig::default()
        };
        let stats = run(Box::new(store.feed()), target.clone(), config, stop).await;
        // THEN the fan-out was invoked once per event, never for a counter record
        let invocations = target.invocations.lock().expect("lock").clone();
        let kinds: Vec<String> = invocations
            .iter()
            .flatten()
            .map(|r| match r.change.new_image.get("type") {
                Some(serde_dynamo::AttributeValue::S(t)) => t.clone(),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(kinds, ["MemberJoined", "MemberJoined", "MessagePosted"]);
        assert!(invocations.iter().all(|batch| batch.len() == 1));
        // AND the counters were dropped (lobby's INSERT, ops's INSERT and MODIFY) and passed:
        // the drain ended, so nothing was left behind the checkpoint
        assert_eq!(stats.filtered, 3);
        assert_eq!(stats.failed_invocations, 0);
    }

    #[test]
    fn partial_batch_responses_move_the_checkpoint_like_lambda() {
        let b = batch(&["10", "20", "30", "40"]);
        // GIVEN no failures THEN the whole batch is done
        assert_eq!(
            interpret(&b, &failures(&[])),
            Next::Checkpoint {
                after: Some("40".into()),
                failed: false
            }
        );
        // GIVEN failures at 40 and 20 THEN done up to 10, retry from 20 (the lowest)
        assert_eq!(
            interpret(&b, &failures(&[Some("40"), Some("20")])),
            Next::Checkpoint {
                after: Some("10".into()),
                failed: true
            }
        );
        // GIVEN a failure at the first record THEN nothing is done
        assert_eq!(
            interpret(&b, &failures(&[Some("10")])),
            Next::Checkpoint {
                after: None,
                failed: true
            }
        );
        // GIVEN an identifier that is not in the batch, or none THEN the whole batch failed
        assert_eq!(
            interpret(&b, &failures(&[Some("99")])),
            Next::Checkpoint {
                after: None,
                failed: true
            }
        );
        assert_eq!(
            interpret(&b, &failures(&[None])),
            Next::Checkpoint {
                after: None,
                failed: true
            }
        );
        // GIVEN the function failed THEN the whole batch failed
        assert_eq!(
            interpret(&b, &Err("boom".into())),
            Next::Checkpoint {
                after: None,
                failed: true
            }
        );
    }
}
