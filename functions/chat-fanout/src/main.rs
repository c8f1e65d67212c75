//! chat-fanout: the event table's DynamoDB stream in, frames out through `@connections`,
//! with a partial batch response so one failing record never fails the batch.

use aws_lambda_events::event::dynamodb::Event;
use chat_shared::config::{connections_endpoint_from_env, FanoutConfig, Retention, Tables};
use chat_shared::delivery::ManagementApi;
use chat_shared::fanout::handle_stream_event;
use chat_shared::store::dynamodb::DynamoStore;
use lambda_runtime::{service_fn, Error, LambdaEvent};

// jemalloc, not glibc's malloc: per delivery the fan-out spent about a quarter more CPU under
// glibc, which also fragmented as broadcasts went on (README, Benchmarks).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let started = std::time::Instant::now();
    chat_shared::telemetry::init();
    let emf = chat_shared::metrics::install_emf()?;
    let config = FanoutConfig::from_env()?;
    // One SDK config, one DynamoDB client and one Management API client (one HTTP pool)
    // for the life of the execution environment.
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let store = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&aws),
        Tables::from_env()?,
        Retention::from_env()?,
    )
    .with_large_room_limit(config.presence_limit);
    let api = ManagementApi::new(&aws, &connections_endpoint_from_env()?);
    let (store, api, config) = (&store, &api, &config);
    let cold = &std::sync::Once::new();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<Event>| async move {
        cold.call_once(|| chat_shared::metrics::cold_start(FUNCTION, started.elapsed()));
        // Lambda's deadline (epoch ms) as an Instant: retries stop in time to answer with a
        // partial batch response rather than being cut off mid-batch.
        let now = chat_shared::now_ms();
        let left = event
            .context
            .deadline
            .saturating_sub(u64::try_from(now).unwrap_or(0));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(left);
        let response = handle_stream_event(
            store,
            api,
            config,
            event.payload,
            chat_shared::now_ms,
            Some(deadline),
        )
        .await;
        // Before answering: the invocation's metrics are part of its output.
        if let Err(e) =
            chat_shared::metrics::flush_emf(emf, &event.context.request_id, std::io::stdout())
        {
            tracing::warn!(error = %e, "could not write the invocation's metrics");
        }
        Ok::<_, Error>(response)
    }))
    .await
}

/// The `Function` dimension of the cold-start metrics.
const FUNCTION: &str = "chat-fanout";
