//! The tool's one error type. Every message is a single line that names what is wrong and,
//! where there is one, what to change: the binary prints it as is and exits non-zero.

use chat_shared::fanout::FanoutError;
use chat_shared::store::StoreError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ReplayError {
    /// DynamoDB answered ResourceNotFoundException: a wrong table name, region or endpoint.
    #[error("table {table} not found at {at}: check the table name, --region and --endpoint")]
    TableNotFound { table: String, at: String },
    /// Nothing answered at the endpoint (refused, timed out, DNS).
    #[error("cannot reach DynamoDB at {at} ({detail}): check --endpoint and that the service is running")]
    Unreachable { at: String, detail: String },
    /// Any other DynamoDB failure, with the service's own words.
    #[error("{op} on table {table} failed: {detail}")]
    Dynamo {
        op: &'static str,
        table: String,
        detail: String,
    },
    /// An id or time range that selects nothing by construction, or cannot be read.
    #[error("bad range: {0}")]
    BadRange(String),
    /// Options that do not fit together or are missing.
    #[error("{0}")]
    Usage(String),
    /// An item of the connections table that the chat could not have written.
    #[error("connections table item {sk} is malformed: {detail}")]
    MalformedState { sk: String, detail: String },
    /// An event the rebuild cannot derive state from.
    #[error(
        "event item {seq} cannot be decoded ({detail}); the log cannot be trusted to rebuild from"
    )]
    MalformedEvent { seq: String, detail: String },
    /// The fan-out of one event failed for a reason worth retrying; the events before it were
    /// redelivered, the ones after it were not.
    #[error("redelivery stopped at event {id}; events before it were redelivered, rerun with --from-id {id}")]
    Redeliver {
        id: u64,
        #[source]
        source: FanoutError,
    },
    /// The chat's store failed (reading members for a dry run, for example).
    #[error("store operation failed")]
    Store(#[from] StoreError),
    /// Writing the export or the report failed.
    #[error("writing output failed")]
    Io(#[from] std::io::Error),
}
