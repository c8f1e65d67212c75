//! chat-api-handler: every route of the WebSocket API. Validates the request and writes the
//! state change with its event to DynamoDB; never broadcasts (the fan-out does).

use aws_lambda_events::apigw::ApiGatewayWebsocketProxyRequest;
use chat_shared::config::{HandlerConfig, Retention, Tables};
use chat_shared::handler::handle_request;
use chat_shared::store::dynamodb::DynamoStore;
use lambda_runtime::{service_fn, Error, LambdaEvent};

// jemalloc, as in the fan-out, where glibc's malloc cost about a quarter more CPU per delivery
// and fragmented as broadcasts went on (README, Benchmarks). The handler's own gain was not
// measured apart; one allocator for both functions keeps their behaviour alike.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> Result<(), Error> {
    let started = std::time::Instant::now();
    chat_shared::telemetry::init();
    let emf = chat_shared::metrics::install_emf()?;
    let config = HandlerConfig::from_env()?;
    // Built once per execution environment and reused by every invocation.
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let store = DynamoStore::new(
        aws_sdk_dynamodb::Client::new(&aws),
        Tables::from_env()?,
        Retention::from_env()?,
    )
    .with_large_room_limit(config.presence_limit);
    let (store, config) = (&store, &config);
    let cold = &std::sync::Once::new();
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<ApiGatewayWebsocketProxyRequest>| async move {
            cold.call_once(|| chat_shared::metrics::cold_start(FUNCTION, started.elapsed()));
            let route = event.payload.request_context.route_key.clone();
            let span = chat_shared::telemetry::request_span(&event.payload);
            let handled = handle_request(store, config, event.payload, chat_shared::now_ms());
            let response = chat_shared::metrics::handler_request(
                route.as_deref(),
                tracing::Instrument::instrument(handled, span),
            )
            .await;
            // Before answering: the invocation's metrics are part of its output.
            if let Err(e) =
                chat_shared::metrics::flush_emf(emf, &event.context.request_id, std::io::stdout())
            {
                tracing::warn!(error = %e, "could not write the invocation's metrics");
            }
            response
        },
    ))
    .await
}

/// The `Function` dimension of the cold-start metrics.
const FUNCTION: &str = "chat-api-handler";
