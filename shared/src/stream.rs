//! Where stream records come from, seen the way Lambda's event source mapping sees a
//! DynamoDB stream: an ordered log read in batches from a checkpoint that only moves forward
//! once a batch (or the part of it before a reported failure) is done.
//!
//! Two sources implement it: the embedded store's change feed and a poller of the DynamoDB
//! Streams API. The local stack's event source mapping drives the fan-out from either, after
//! the filter the template puts on the real mapping ([`passes_template_filter`]).

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

/// Whether a record passes template.yaml's `FilterCriteria` on the fan-out's mapping (the
/// filters are ORed): `{"dynamodb":{"NewImage":{"type":{"S":[{"anything-but":["Counter"]}]}}}}`
/// or `{"dynamodb":{"Keys":{"seq":{"N":[{"anything-but":["0"]}]}}}}`. So a room's counter item
/// (seq 0, `type` `Counter`) never invokes the fan-out; events, redelivery items and TTL
/// REMOVEs (keys only) do. `anything-but` matches only a value that is present.
pub fn passes_template_filter(record: &EventRecord) -> bool {
    let type_not_counter = matches!(
        record.change.new_image.get("type"),
        Some(serde_dynamo::AttributeValue::S(t)) if t != "Counter"
    );
    // Stream records carry numbers as strings, so this is a string comparison, as Lambda's.
    let seq_not_zero = match record.change.keys.get("seq") {
        Some(serde_dynamo::AttributeValue::N(n)) => n != "0",
        _ => false,
    };
    type_not_counter || seq_not_zero
}

/// The pattern of template.yaml's `FilterCriteria` on the connections table's mapping, word
/// for word: DynamoDB's TTL deletions (`REMOVE` by the service `dynamodb.amazonaws.com`) of
/// connection items (`pk` `CONN#…`, `sk` `CONN`). Every other write to that table — `$connect`'s
/// put, each request's rate-limit update, joins, `$disconnect`'s delete, the member items and
/// claims — never invokes Lambda.
pub const EXPIRY_FILTER_PATTERN: &str = r#"{"eventName":["REMOVE"],"userIdentity":{"type":["Service"],"principalId":["dynamodb.amazonaws.com"]},"dynamodb":{"Keys":{"pk":{"S":[{"prefix":"CONN#"}]},"sk":{"S":["CONN"]}}}}"#;

/// Whether a record passes [`EXPIRY_FILTER_PATTERN`] (the local event source mapping of the
/// connections table's stream applies it as Lambda does).
pub fn passes_expiry_filter(record: &EventRecord) -> bool {
    use serde_dynamo::AttributeValue::S;
    let by_ttl = record.user_identity.as_ref().is_some_and(|identity| {
        identity.type_ == "Service" && identity.principal_id == "dynamodb.amazonaws.com"
    });
    let pk_is_conn = matches!(
        record.change.keys.get(crate::keys::PK),
        Some(S(pk)) if pk.starts_with("CONN#")
    );
    let sk_is_conn = matches!(
        record.change.keys.get(crate::keys::SK),
        Some(S(sk)) if sk == crate::keys::CONN_SK
    );
    record.event_name == "REMOVE" && by_ttl && pk_is_conn && sk_is_conn
}
