//! Where stream records come from, seen the way Lambda's event source mapping sees a
//! DynamoDB stream: an ordered log read in batches from a checkpoint that only moves forward
//! once a batch (or the part of it before a reported failure) is done.
//!
//! Two sources implement it: the embedded store's change feed and a poller of the DynamoDB
//! Streams API. The local stack's event source mapping drives the fan-out from either.

use async_trait::async_trait;
use aws_lambda_events::event::dynamodb::EventRecord;
use std::time::Duration;
use thiserror::Error;

use crate::store::BoxError;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error("reading the stream failed")]
    Read(#[source] BoxError),
    #[error("the stream is gone: {0}")]
    Gone(String),
}

#[async_trait]
pub trait RecordSource: Send {
    /// Up to `max` records after the checkpoint, in stream order, as Lambda would deliver them
    /// (`eventName`, `dynamodb.SequenceNumber`, `NewImage`, …). Waits up to `wait` for at least
    /// one; returns an empty batch if none came. Does not move the checkpoint: asking again
    /// returns the same records (that is how a failed batch is retried).
    async fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<EventRecord>, SourceError>;

    /// Marks every record up to and including `sequence_number` as done.
    fn checkpoint(&mut self, sequence_number: &str);
}
