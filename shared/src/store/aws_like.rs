//! How the stores read and how long they take: the consistency each read asks DynamoDB for (the
//! one table both adapters follow), and the embedded store's AWS-like behaviour — per-call
//! latency, eventual consistency, and DynamoDB's per-partition throughput.
//!
//! Sources (DynamoDB developer guide): "Read consistency" (a read without `ConsistentRead` may
//! not reflect a write that completed moments before; GetItem, Query and Scan are eventually
//! consistent by default), "DynamoDB throughput capacity" and "Best practices for designing and
//! using partition keys effectively" (one partition serves at most 3,000 read units and 1,000
//! write units per second), and the service's published single-digit-millisecond latency.

use std::time::Duration;

/// A read one of the adapters makes. [`ReadOp::consistent_read`] is the `ConsistentRead` flag
/// the DynamoDB adapter sends with it, and the embedded store in AWS-like mode serves each read
/// with the same consistency, so a wrong choice here shows up locally as it would on AWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReadOp {
    /// `GetItem` of a connection item.
    GetConnection,
    /// `GetItem` of a name claim.
    GetNameClaim,
    /// `GetItem` of a room's counter (`ROOM#<room>`, seq 0): its last id, its member shards.
    GetSequence,
    /// `Query` of one shard of a room's member items (`MEMBERS#<room>#<shard>`): the fan-out's
    /// member list.
    QueryMembers,
    /// `Query` of the event log (history and catch-up).
    QueryEvents,
    /// `Query` of the newest event (healing a counter behind its log).
    QueryNewestEvent,
    /// `GetItem` of one member item (`MEMBERS#<room>#<shard>` / `<connId>`): the name a room
    /// knows a connection by, read only while a rename of it is unfinished (`renaming`).
    GetMember,
    /// `Query` of one member shard with `Select: COUNT`: an unsequenced join sizing its room
    /// (see [`crate::keys`]).
    CountMembers,
    /// `GetItem` of a request item (`REQUEST#<scope>` / `<requestId>`): read only after a
    /// request with a `requestId` was cancelled or refused, to tell a resend of a done request.
    GetRequest,
}

impl ReadOp {
    pub const ALL: [ReadOp; 9] = [
        ReadOp::GetConnection,
        ReadOp::GetNameClaim,
        ReadOp::GetSequence,
        ReadOp::QueryMembers,
        ReadOp::QueryEvents,
        ReadOp::QueryNewestEvent,
        ReadOp::GetMember,
        ReadOp::CountMembers,
        ReadOp::GetRequest,
    ];

    /// Whether the read is strongly consistent (`ConsistentRead: true`).
    pub const fn consistent_read(self) -> bool {
        match self {
            // Strongly consistent: eventually consistent, a member whose join committed a
            // moment before the query could be missing from it (the fan-out would miss the
            // joiner, breaking the catch-up recipe). It costs twice the read units of an
            // eventually consistent query (a page of 1 MB: 256 units instead of 128).
            ReadOp::QueryMembers
            | ReadOp::GetConnection
            | ReadOp::GetNameClaim
            | ReadOp::GetSequence
            | ReadOp::QueryEvents
            | ReadOp::QueryNewestEvent
            // Strongly consistent: an unfinished rename is finished by comparing names, and a
            // stale name would announce a rename twice (the write's condition would refuse it,
            // at the cost of a cancelled transaction).
            | ReadOp::GetMember
            // Strongly consistent: a count that misses the joins of the last moment would
            // size the room behind them.
            | ReadOp::CountMembers
            // Strongly consistent: a resend read eventually could miss the item its first
            // send committed a moment ago, and be stored twice.
            | ReadOp::GetRequest => true,
        }
    }
}

/// How many reads of each kind a store served, and with which consistency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadTally {
    pub strongly_consistent: u64,
    pub eventually_consistent: u64,
}

/// DynamoDB's per-partition-key throughput (on-demand and provisioned tables alike). The
/// embedded store gives each of layout 2's partition keys its own (`CONN#<id>`, `NAME#<key>`,
/// `MEMBERS#<room>#<shard>`, `ROOM#<room>`, `REDELIVERY#<room>`; see [`crate::keys`]), and a
/// transaction is throttled when any one of the partitions it writes is short.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartitionThroughput {
    /// Write request units per second (one per KB written; transactions count double).
    pub write_units_per_sec: f64,
    /// Read request units per second (one per 4 KB strongly consistent, half for eventual).
    pub read_units_per_sec: f64,
}

impl Default for PartitionThroughput {
    fn default() -> Self {
        PartitionThroughput {
            write_units_per_sec: 1_000.0,
            read_units_per_sec: 3_000.0,
        }
    }
}

/// How the embedded store behaves: ideal (instant, every read strongly consistent, no
/// throttle), or like DynamoDB. Limits ([`super::limits`]) apply in both.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StoreBehaviour {
    /// Time of one read call (GetItem, one Query page).
    pub read_latency: Duration,
    /// Time of one write call (PutItem, UpdateItem, TransactWriteItems).
    pub write_latency: Duration,
    /// An eventually consistent read misses the writes younger than a window drawn at random
    /// from `eventual_min..=eventual_max` for each read. Zero: every read sees everything.
    pub eventual_min: Duration,
    pub eventual_max: Duration,
    /// Optimistic writers collide on their room's counter as they do on DynamoDB (read the
    /// counter, commit on the condition it has not moved, else back off and retry); writers
    /// in different rooms do not.
    pub contention: bool,
    /// Per-partition-key throughput; `None`: unlimited.
    pub partition: Option<PartitionThroughput>,
}

impl StoreBehaviour {
    /// The default: instant and strongly consistent.
    pub const IDEAL: StoreBehaviour = StoreBehaviour {
        read_latency: Duration::ZERO,
        write_latency: Duration::ZERO,
        eventual_min: Duration::ZERO,
        eventual_max: Duration::ZERO,
        contention: false,
        partition: None,
    };

    /// DynamoDB's typical figures: 5 ms a read and 10 ms a write or transaction (single-digit
    /// milliseconds within a Region, transactions slower), reads without `ConsistentRead` up
    /// to 300 ms behind, and a partition's 1,000 WCU / 3,000 RCU per second.
    pub fn aws_like() -> StoreBehaviour {
        StoreBehaviour {
            read_latency: Duration::from_millis(5),
            write_latency: Duration::from_millis(10),
            eventual_min: Duration::ZERO,
            eventual_max: Duration::from_millis(300),
            contention: true,
            partition: Some(PartitionThroughput::default()),
        }
    }

    pub fn is_ideal(&self) -> bool {
        *self == StoreBehaviour::IDEAL
    }

    /// Whether reads that are not strongly consistent can lag.
    pub fn lags(&self) -> bool {
        !self.eventual_max.is_zero()
    }

    /// A window for one eventually consistent read.
    pub fn draw_window(&self) -> Duration {
        use rand::Rng;
        if self.eventual_max <= self.eventual_min {
            return self.eventual_max;
        }
        let (lo, hi) = (
            self.eventual_min.as_micros() as u64,
            self.eventual_max.as_micros() as u64,
        );
        Duration::from_micros(rand::rng().random_range(lo..=hi))
    }
}

impl Default for StoreBehaviour {
    fn default() -> Self {
        StoreBehaviour::IDEAL
    }
}
