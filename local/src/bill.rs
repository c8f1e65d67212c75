//! What AWS would charge for a local run: the stack meters the billed quantities as they
//! happen and prices them with one table (us-east-1, on-demand, arm64), shown at `GET /bill`
//! (JSON) and printed by `chat-local` on shutdown.
//!
//! Metered: API Gateway messages, inbound and `@connections` POSTs alike, in 32 KB units;
//! connection minutes; Lambda requests and GB-seconds (each invocation's measured time,
//! rounded up to the millisecond, × the function's memory in template.yaml); DynamoDB request
//! units of the embedded store (see `EmbeddedStore::consumed`). Against a DynamoDB API the
//! store's units are not metered (AWS itself bills those).
//!
//! Prices (aws.amazon.com pricing pages for API Gateway, Lambda and DynamoDB, us-east-1;
//! re-checked 2026-11-30 against AWS's price list for us-east-1 and the pages' worked examples,
//! sources in docs/benchmarks.md):
//!
//! | item | price |
//! |---|---|
//! | API Gateway WebSocket messages | $1.00 per million for the first billion a month, $0.80 per million after (32 KB units) |
//! | API Gateway connection minutes | $0.25 per million |
//! | Lambda requests | $0.20 per million |
//! | Lambda duration, arm64 | $0.0000133334 per GB-second |
//! | DynamoDB on-demand write request units | $0.625 per million |
//! | DynamoDB on-demand read request units | $0.125 per million |
//!
//! The message tier is per account and month: a bill is priced as if it were the account's
//! whole month (a local run's is far below the billion; the cost model's monthly scenarios are
//! not). Not included: free tiers (Lambda's always-free million requests and 400,000 GB-s; new
//! accounts get credits rather than API Gateway's old free tier), DynamoDB storage and data
//! transfer out — small beside the messages for a chat, and the point is the marginal cost.
//! Lambda's duration tiers start at 7.5 billion GB-s a month, far above any scenario here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use chat_shared::store::embedded::EmbeddedStore;
use serde::Serialize;

/// Prices in dollars per unit (see the module's table).
pub const PRICE_PER_MESSAGE: f64 = 1.00 / 1e6;
/// Messages past [`MESSAGE_TIER_1`] in a month.
pub const PRICE_PER_MESSAGE_OVER_TIER_1: f64 = 0.80 / 1e6;
/// The first billion messages a month are priced at [`PRICE_PER_MESSAGE`].
pub const MESSAGE_TIER_1: u64 = 1_000_000_000;
pub const PRICE_PER_CONNECTION_MINUTE: f64 = 0.25 / 1e6;
pub const PRICE_PER_LAMBDA_REQUEST: f64 = 0.20 / 1e6;
pub const PRICE_PER_GB_SECOND: f64 = 0.000_013_333_4;
pub const PRICE_PER_WRITE_UNIT: f64 = 0.625 / 1e6;
pub const PRICE_PER_READ_UNIT: f64 = 0.125 / 1e6;

/// API Gateway meters messages in 32 KB units.
pub const MESSAGE_UNIT_BYTES: usize = 32 * 1024;
/// template.yaml's `MemorySize` of each function, in MB.
pub const API_HANDLER_MEMORY_MB: u64 = 256;
pub const FANOUT_MEMORY_MB: u64 = 512;

/// Which function ran.
#[derive(Debug, Clone, Copy)]
pub enum Function {
    ApiHandler,
    Fanout,
}

/// The running totals, shared by the gateway, the two functions and the bill's readers.
#[derive(Debug, Default)]
pub struct Meter {
    messages: AtomicU64,
    /// Closed connections' lifetimes.
    connection_ms: AtomicU64,
    lambda_requests: AtomicU64,
    /// Billed duration × memory, in MB-milliseconds.
    mb_ms: AtomicU64,
    store: OnceLock<EmbeddedStore>,
}

/// What a run would cost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bill {
    pub api_gateway_messages: u64,
    pub connection_minutes: f64,
    pub lambda_requests: u64,
    pub lambda_gb_seconds: f64,
    /// `None` when the store is a DynamoDB API (not metered here).
    pub dynamodb_read_units: Option<f64>,
    pub dynamodb_write_units: Option<u64>,
    pub dollars: Dollars,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Dollars {
    pub api_gateway: f64,
    pub lambda: f64,
    pub dynamodb: f64,
    pub total: f64,
}

impl Meter {
    /// Meters the DynamoDB request units of this store too.
    pub fn meter_store(&self, store: EmbeddedStore) {
        let _ = self.store.set(store);
    }

    /// A message of `bytes` through API Gateway (received from a client, or posted to one).
    pub fn message(&self, bytes: usize) {
        let units = bytes.div_ceil(MESSAGE_UNIT_BYTES).max(1) as u64;
        self.messages.fetch_add(units, Ordering::Relaxed);
    }

    /// A connection that lasted `lived`.
    pub fn connection_closed(&self, lived: Duration) {
        self.connection_ms
            .fetch_add(lived.as_millis() as u64, Ordering::Relaxed);
    }

    /// One invocation of `function` that ran for `took`.
    pub fn invocation(&self, function: Function, took: Duration) {
        let memory = match function {
            Function::ApiHandler => API_HANDLER_MEMORY_MB,
            Function::Fanout => FANOUT_MEMORY_MB,
        };
        // Lambda bills duration rounded up to the millisecond.
        let ms = took.as_micros().div_ceil(1000) as u64;
        self.lambda_requests.fetch_add(1, Ordering::Relaxed);
        self.mb_ms.fetch_add(ms.max(1) * memory, Ordering::Relaxed);
    }

    /// The bill so far; `open_ms` is the time the still-open connections have lived.
    pub fn bill(&self, open_ms: u64) -> Bill {
        let messages = self.messages.load(Ordering::Relaxed);
        let connection_minutes =
            (self.connection_ms.load(Ordering::Relaxed) + open_ms) as f64 / 60_000.0;
        let lambda_requests = self.lambda_requests.load(Ordering::Relaxed);
        let lambda_gb_seconds = self.mb_ms.load(Ordering::Relaxed) as f64 / 1024.0 / 1000.0;
        let consumed = self.store.get().map(EmbeddedStore::consumed);
        let read_units = consumed.map(|c| c.read_units());
        let write_units = consumed.map(|c| c.write_units);
        Bill::priced(
            messages,
            connection_minutes,
            lambda_requests,
            lambda_gb_seconds,
            read_units,
            write_units,
        )
    }
}

/// What `messages` API Gateway messages cost in one month: the first billion at $1.00 per
/// million, the rest at $0.80.
pub fn message_dollars(messages: u64) -> f64 {
    let first = messages.min(MESSAGE_TIER_1);
    first as f64 * PRICE_PER_MESSAGE + (messages - first) as f64 * PRICE_PER_MESSAGE_OVER_TIER_1
}

impl Bill {
    /// The bill for these quantities, priced with the module's table.
    pub fn priced(
        api_gateway_messages: u64,
        connection_minutes: f64,
        lambda_requests: u64,
        lambda_gb_seconds: f64,
        dynamodb_read_units: Option<f64>,
        dynamodb_write_units: Option<u64>,
    ) -> Bill {
        let api_gateway = message_dollars(api_gateway_messages)
            + connection_minutes * PRICE_PER_CONNECTION_MINUTE;
        let lambda = lambda_requests as f64 * PRICE_PER_LAMBDA_REQUEST
            + lambda_gb_seconds * PRICE_PER_GB_SECOND;
        let dynamodb = dynamodb_read_units.unwrap_or(0.0) * PRICE_PER_READ_UNIT
            + dynamodb_write_units.unwrap_or(0) as f64 * PRICE_PER_WRITE_UNIT;
        Bill {
            api_gateway_messages,
            connection_minutes,
            lambda_requests,
            lambda_gb_seconds,
            dynamodb_read_units,
            dynamodb_write_units,
            dollars: Dollars {
                api_gateway,
                lambda,
                dynamodb,
                total: api_gateway + lambda + dynamodb,
            },
        }
    }

    /// Prices this bill's quantities again (after scaling them).
    pub fn repriced(&self) -> Bill {
        Bill::priced(
            self.api_gateway_messages,
            self.connection_minutes,
            self.lambda_requests,
            self.lambda_gb_seconds,
            self.dynamodb_read_units,
            self.dynamodb_write_units,
        )
    }
}

impl std::fmt::Display for Bill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let store = match (self.dynamodb_read_units, self.dynamodb_write_units) {
            (Some(r), Some(w)) => format!("{r} read units, {w} write units"),
            _ => "not metered (a DynamoDB API)".to_owned(),
        };
        write!(
            f,
            "AWS bill estimate (us-east-1): API Gateway {} messages, {:.2} connection minutes = ${:.6}; \
             Lambda {} requests, {:.3} GB-s = ${:.6}; DynamoDB {} = ${:.6}; total ${:.6}",
            self.api_gateway_messages,
            self.connection_minutes,
            self.dollars.api_gateway,
            self.lambda_requests,
            self.lambda_gb_seconds,
            self.dollars.lambda,
            store,
            self.dollars.dynamodb,
            self.dollars.total
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_past_the_first_billion_cost_less() {
        // GIVEN the tier boundary WHEN priced THEN $1.00 per million up to a billion, $0.80
        // per million after it
        let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
        assert!(close(message_dollars(1_000_000), 1.00));
        assert!(close(message_dollars(MESSAGE_TIER_1), 1_000.00));
        assert!(close(message_dollars(2 * MESSAGE_TIER_1), 1_800.00));
        // AND a bill's API Gateway line uses the tiered price
        let bill = Bill::priced(3 * MESSAGE_TIER_1, 0.0, 0, 0.0, None, None);
        assert!(close(bill.dollars.api_gateway, 2_600.00));
        assert!(close(bill.repriced().dollars.total, bill.dollars.total));
    }
}
