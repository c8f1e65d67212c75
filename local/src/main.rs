//! `chat-local`: the whole chat on this machine. An API Gateway WebSocket emulator with a
//! real `@connections` endpoint, chat-api-handler and the fan-out in-process, and an embedded
//! store with a stream — or, with `--dynamodb-endpoint`, a real DynamoDB API.

use std::time::Duration;

use chat_local::aws_like::AwsLike;
use chat_local::esm::EsmConfig;
use chat_local::gateway::{GatewayConfig, ThrottleLimit};
use chat_local::stack::{self, LocalOptions, StoreChoice};
use chat_shared::auth::Authenticator;
use chat_shared::config::{
    FanoutConfig, HandlerConfig, Retention, Tables, DEFAULT_FANOUT_CONCURRENCY,
};
use chat_shared::pacing::{Pacer, DEFAULT_MAX_RPS};
use chat_shared::ratelimit::{RateLimit, DEFAULT_RATE_BURST, DEFAULT_RATE_PER_SECOND};
use chat_shared::store::aws_like::{PartitionThroughput, StoreBehaviour};
use chat_shared::validation::DEFAULT_MAX_MESSAGE_BYTES;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "chat-local",
    version,
    about = "Run the whole chat locally: WebSocket gateway, both functions, and a store with a stream"
)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1", env = "CHAT_LOCAL_HOST")]
    host: String,
    /// Port for both the WebSocket API and the @connections API.
    #[arg(long, default_value_t = 8080, env = "CHAT_LOCAL_PORT")]
    port: u16,
    /// Stage name: the first path segment, as on AWS.
    #[arg(long, default_value = "prod")]
    stage: String,
    /// Use this DynamoDB API (moto, DynamoDB Local, AWS) instead of the embedded store.
    #[arg(long, env = "DYNAMODB_ENDPOINT", value_name = "URL")]
    dynamodb_endpoint: Option<String>,
    /// Use real AWS DynamoDB (default credential chain) instead of the embedded store.
    #[arg(long, conflicts_with = "dynamodb_endpoint")]
    aws: bool,
    /// Region for the DynamoDB API.
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    region: String,
    /// Event table (created if missing).
    #[arg(long, env = "EVENTS_TABLE", default_value = "chat-local-events")]
    events_table: String,
    /// Connections table (created if missing).
    #[arg(
        long,
        env = "CONNECTIONS_TABLE",
        default_value = "chat-local-connections"
    )]
    connections_table: String,
    /// The most rooms one connection may be a member of at once (`lobby` included).
    #[arg(long, env = "MAX_ROOMS", default_value_t = chat_shared::store::DEFAULT_MAX_ROOMS)]
    max_rooms: usize,
    /// Largest accepted chat message, in bytes.
    #[arg(long, env = "MAX_MESSAGE_BYTES", default_value_t = DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Requests per second each connection may make (0: no limit).
    #[arg(long, env = "RATE_LIMIT_PER_SECOND", default_value_t = DEFAULT_RATE_PER_SECOND)]
    rate_limit_per_second: u32,
    /// Requests a connection may make in a burst.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = DEFAULT_RATE_BURST)]
    rate_limit_burst: u32,
    /// Connections one identity (or, without authentication, one source IP) may have open at
    /// once (0: no limit). Every local client is 127.0.0.1 unless it comes from elsewhere.
    #[arg(
        long,
        env = "PRINCIPAL_MAX_CONNECTIONS",
        default_value_t = chat_shared::ratelimit::DEFAULT_PRINCIPAL_MAX_CONNECTIONS
    )]
    principal_max_connections: u32,
    /// Requests per second one identity (or source IP) may make across all its connections
    /// (0: no limit).
    #[arg(
        long,
        env = "PRINCIPAL_RATE_PER_SECOND",
        default_value_t = chat_shared::ratelimit::DEFAULT_PRINCIPAL_RATE_PER_SECOND
    )]
    principal_rate_per_second: u32,
    /// @connections calls per second one room's joins, leaves and renames may cost (their
    /// `members` and `systemMessage` frames to each member); over it they are refused with
    /// `presence_rate_limited`. 0 turns the budget off.
    #[arg(
        long,
        env = "ROOM_PRESENCE_POSTS_PER_SECOND",
        default_value_t = chat_shared::presence::DEFAULT_ROOM_PRESENCE_POSTS_PER_SECOND
    )]
    room_presence_posts_per_second: u32,
    /// Require a JWT signed with this HMAC-SHA256 key at $connect (`?token=…`); its subject
    /// becomes the connection's identity. Unset: anyone may connect.
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    auth_jwt_secret: Option<String>,
    /// @connections calls in flight at once per fan-out.
    #[arg(long, env = "FANOUT_CONCURRENCY", default_value_t = DEFAULT_FANOUT_CONCURRENCY)]
    fanout_concurrency: usize,
    /// @connections calls per second per fan-out, under the account's 10,000/s quota; halved
    /// on each wave of 429s and restored as calls succeed. 0: unpaced.
    #[arg(long, env = "FANOUT_MAX_RPS", default_value_t = DEFAULT_MAX_RPS)]
    fanout_max_rps: u32,
    /// Close connections idle this long (AWS: 600).
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    idle_timeout: u64,
    /// Close connections this old (AWS: 7200).
    #[arg(long, default_value_t = 7200, value_name = "SECONDS")]
    max_duration: u64,
    /// Stream records per fan-out invocation (template.yaml BatchSize).
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// How long a fan-out batch waits for more records (template.yaml's
    /// `EventsBatchingWindowSeconds`, Lambda's `MaximumBatchingWindowInSeconds`): the latency
    /// a busy room pays so that connections opted in with `?batch=1` get several events per
    /// POST. Fractions allowed here; AWS takes whole seconds.
    #[arg(
        long,
        env = "BATCHING_WINDOW_SECONDS",
        default_value_t = 0.0,
        value_name = "SECONDS"
    )]
    batching_window: f64,
    /// Never run $disconnect (models AWS losing it; stale connections are then pruned on 410).
    #[arg(long, hide = true)]
    drop_disconnect: bool,
    /// Embedded store: how often the TTL sweeper deletes expired items (DynamoDB takes up to a
    /// few days; this one is prompt). An expired connection's TTL deletion leaves its rooms.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    ttl_sweep_seconds: u64,
    /// Embedded store: connections expire this long after `$connect`. Local only: the Lambdas'
    /// CONNECTION_TTL_SECONDS has a minimum of 7,200 (API Gateway keeps a connection up to 2 h,
    /// so a shorter TTL would expire live connections); here a short one lets you watch TTL
    /// expiry leave a connection's rooms (with --drop-disconnect) without waiting hours.
    #[arg(long, value_name = "SECONDS")]
    connection_ttl_seconds: Option<u64>,
    /// Behave like AWS where it hurts: store latency, eventually consistent reads, counter
    /// contention, `@connections` round trips and the stream's polling delay (README, "AWS-like
    /// mode"). The knobs below tune it. Without it everything is instant and consistent.
    #[arg(long)]
    aws_like: bool,
    /// AWS-like: time of one store read (GetItem, one Query page).
    #[arg(long, default_value_t = 5, value_name = "MS", requires = "aws_like")]
    store_read_latency_ms: u64,
    /// AWS-like: time of one store write or transaction.
    #[arg(long, default_value_t = 10, value_name = "MS", requires = "aws_like")]
    store_write_latency_ms: u64,
    /// AWS-like: an eventually consistent read misses writes younger than a window drawn
    /// from 0 to this, per read (0: reads are all consistent).
    #[arg(long, default_value_t = 300, value_name = "MS", requires = "aws_like")]
    eventual_consistency_max_ms: u64,
    /// AWS-like: round trip of one `@connections` call.
    #[arg(long, default_value_t = 20, value_name = "MS", requires = "aws_like")]
    connections_latency_ms: u64,
    /// AWS-like: the stream poller's pause between polls of an idle shard.
    #[arg(long, default_value_t = 250, value_name = "MS", requires = "aws_like")]
    stream_poll_interval_ms: u64,
    /// AWS-like: the account's requests per second, shared by inbound messages and
    /// `@connections` calls (0: unlimited).
    #[arg(long, default_value_t = 10_000, requires = "aws_like")]
    account_requests_per_second: u32,
    /// AWS-like: the account's request burst.
    #[arg(long, default_value_t = 5_000, requires = "aws_like")]
    account_request_burst: u32,
    /// AWS-like: new connections per second (0: unlimited).
    #[arg(long, default_value_t = 500, requires = "aws_like")]
    new_connections_per_second: u32,
    /// AWS-like: write units per second one partition key takes (0: unlimited).
    #[arg(long, default_value_t = 1_000, requires = "aws_like")]
    partition_write_units: u32,
    /// AWS-like: read units per second one partition key takes.
    #[arg(long, default_value_t = 3_000, requires = "aws_like")]
    partition_read_units: u32,
}

impl Args {
    /// The AWS-like figures, if `--aws-like` is on.
    fn aws_like(&self) -> Option<AwsLike> {
        let ms = Duration::from_millis;
        self.aws_like.then(|| AwsLike {
            store: StoreBehaviour {
                read_latency: ms(self.store_read_latency_ms),
                write_latency: ms(self.store_write_latency_ms),
                eventual_max: ms(self.eventual_consistency_max_ms),
                partition: (self.partition_write_units > 0).then(|| PartitionThroughput {
                    write_units_per_sec: f64::from(self.partition_write_units),
                    read_units_per_sec: f64::from(self.partition_read_units.max(1)),
                }),
                ..StoreBehaviour::aws_like()
            },
            management_latency: ms(self.connections_latency_ms),
            stream_poll_interval: ms(self.stream_poll_interval_ms),
            account_throttle: (self.account_requests_per_second > 0).then(|| ThrottleLimit {
                per_second: f64::from(self.account_requests_per_second),
                burst: f64::from(self.account_request_burst.max(1)),
            }),
            connect_throttle: (self.new_connections_per_second > 0).then(|| ThrottleLimit {
                per_second: f64::from(self.new_connections_per_second),
                burst: f64::from(self.new_connections_per_second),
            }),
        })
    }
}

/// One line saying what AWS-like mode emulates, with the figures in force.
fn describe(a: &AwsLike) -> String {
    let ms = |d: Duration| d.as_millis();
    let rate = |t: Option<ThrottleLimit>| {
        t.map_or("unlimited".to_owned(), |t| {
            format!("{}/s (burst {})", t.per_second, t.burst)
        })
    };
    let partition = a.store.partition.map_or("unlimited".to_owned(), |p| {
        format!(
            "{} WCU/s, {} RCU/s",
            p.write_units_per_sec, p.read_units_per_sec
        )
    });
    format!(
        "AWS-like mode: store reads {} ms, writes {} ms, eventually consistent reads up to {} ms \
         behind; @connections {} ms; stream polled every {} ms; requests {}; new connections {}; \
         per partition key {}",
        ms(a.store.read_latency),
        ms(a.store.write_latency),
        ms(a.store.eventual_max),
        ms(a.management_latency),
        ms(a.stream_poll_interval),
        rate(a.account_throttle),
        rate(a.connect_throttle),
        partition
    )
}

// jemalloc, not glibc's malloc: per delivery the fan-out spent about a quarter more CPU under
// glibc, which also fragmented as broadcasts went on (README, Benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    chat_shared::telemetry::init_local();
    let args = Args::parse();
    let store = if args.dynamodb_endpoint.is_some() || args.aws {
        StoreChoice::DynamoDb {
            endpoint: args.dynamodb_endpoint.clone(),
            region: args.region.clone(),
            tables: Tables {
                events: args.events_table.clone(),
                connections: args.connections_table.clone(),
            },
        }
    } else {
        let mut retention = Retention::default();
        if let Some(ttl) = args.connection_ttl_seconds {
            anyhow::ensure!(ttl > 0, "--connection-ttl-seconds must be at least 1");
            retention.connection_ttl = Duration::from_secs(ttl);
        }
        StoreChoice::Embedded(chat_shared::store::embedded::EmbeddedStore::new(retention))
    };
    anyhow::ensure!(
        args.max_message_bytes > 0,
        "--max-message-bytes must be at least 1"
    );
    anyhow::ensure!(
        args.fanout_concurrency > 0,
        "--fanout-concurrency must be at least 1"
    );
    anyhow::ensure!(args.batch_size > 0, "--batch-size must be at least 1");
    anyhow::ensure!(
        (0.0..=300.0).contains(&args.batching_window),
        "--batching-window must be 0 to 300 seconds"
    );
    anyhow::ensure!(args.max_rooms > 0, "--max-rooms must be at least 1");
    anyhow::ensure!(
        args.rate_limit_per_second == 0 || args.rate_limit_burst > 0,
        "--rate-limit-burst must be at least 1 when the rate limit is on"
    );
    let aws_like = args.aws_like();
    let mut options = LocalOptions {
        host: args.host,
        port: args.port,
        store,
        gateway: GatewayConfig {
            stage: args.stage,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            max_duration: Duration::from_secs(args.max_duration),
            drop_disconnect: args.drop_disconnect,
            ..GatewayConfig::default()
        },
        handler: HandlerConfig {
            max_message_bytes: args.max_message_bytes,
            rate_limit: RateLimit {
                per_second: args.rate_limit_per_second,
                burst: args.rate_limit_burst,
            },
            auth: args
                .auth_jwt_secret
                .as_deref()
                .filter(|s| !s.is_empty())
                .map(|s| Authenticator::hs256(s.as_bytes())),
            max_rooms: args.max_rooms,
            principal_limit: chat_shared::ratelimit::PrincipalLimit {
                max_connections: args.principal_max_connections,
                per_second: args.principal_rate_per_second,
            },
            presence_budget: chat_shared::presence::PresenceBudget {
                posts_per_second: args.room_presence_posts_per_second,
            },
            ..HandlerConfig::default()
        },
        fanout: FanoutConfig {
            concurrency: args.fanout_concurrency,
            pacer: Pacer::per_second(args.fanout_max_rps),
            ..FanoutConfig::default()
        },
        retention: Retention::default(),
        esm: EsmConfig {
            batch_size: args.batch_size,
            batching_window: Duration::from_secs_f64(args.batching_window),
            ..EsmConfig::default()
        },
        ttl_sweep: Duration::from_secs(args.ttl_sweep_seconds.max(1)),
    };
    if let Some(aws_like) = &aws_like {
        aws_like.apply(&mut options);
        eprintln!("{}", describe(aws_like));
    }
    let running = stack::start(options).await?;
    // The same shapes as the stack's Outputs on AWS; scripts and tests read these two lines.
    println!("WebSocket URL: {}", running.websocket_url);
    println!("Connection URL: {}", running.connection_url);
    // The page is served at the root of the same host and port (not under the stage).
    let page = running.websocket_url.replacen("ws://", "http://", 1);
    let page = page
        .rsplit_once('/')
        .map_or(page.as_str(), |(host, _stage)| host);
    eprintln!("Chat page: {page}/");
    // Ctrl-C, or SIGTERM from a process manager: both mean a clean stop.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = terminate.recv() => {}
    }
    eprintln!("shutting down: closing connections and draining the stream…");
    let meter = running.meter();
    let stopped = running.shutdown().await?;
    // Every connection is closed by now: the bill is complete.
    eprintln!("{}", meter.bill(0));
    if !stopped.drained {
        eprintln!("the stream was not drained in time: some frames were not delivered");
    }
    Ok(())
}
