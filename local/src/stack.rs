//! Wires the local stack together: the gateway emulator in front of chat-api-handler's code,
//! a store (embedded, or a real DynamoDB API), and the event source mapping driving the
//! fan-out's code, which reaches clients through the gateway's own `@connections` endpoint
//! with the same SDK client as on AWS. A second mapping reads the connections table's stream
//! into the same fan-out, with template.yaml's filter of TTL deletions of connections
//! ([`chat_shared::expiry`]); with the embedded store, a sweeper plays DynamoDB's TTL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::event::dynamodb::Event;
use aws_lambda_events::event::streams::DynamoDbEventResponse;
use aws_sdk_apigatewaymanagement::config::Credentials;
use chat_shared::config::{FanoutConfig, HandlerConfig, Retention, Tables};
use chat_shared::delivery::ManagementApi;
use chat_shared::fanout::handle_stream_event;
use chat_shared::handler::handle_request;
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::embedded::EmbeddedStore;
use chat_shared::store::ChatStore;
use chat_shared::stream::{passes_expiry_filter, RecordSource};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::bill::{Bill, Function, Meter};
use crate::esm::{self, EsmConfig, Mapping, MappingStats, StreamTarget};
use crate::gateway::{self, Gateway, GatewayConfig, Integration};
use crate::streams_api::StreamsApiSource;

/// Where the chat's state lives.
#[derive(Clone)]
pub enum StoreChoice {
    /// In-process, with a change feed that behaves like DynamoDB Streams (the default). Passed
    /// in, so a caller (a test) can keep a handle on it.
    Embedded(EmbeddedStore),
    /// A real DynamoDB API: moto, DynamoDB Local or AWS.
    DynamoDb {
        endpoint: Option<String>,
        region: String,
        tables: Tables,
    },
}

#[derive(Clone)]
pub struct LocalOptions {
    pub host: String,
    pub port: u16,
    pub store: StoreChoice,
    pub gateway: GatewayConfig,
    pub handler: HandlerConfig,
    pub fanout: FanoutConfig,
    pub retention: Retention,
    pub esm: EsmConfig,
    /// How often the embedded store's TTL sweeper runs (DynamoDB deletes expired items
    /// "typically within a few days"; the local one is prompt). Each run deletes every item
    /// whose `expiresAt` has passed, as DynamoDB's TTL would; the expired connection items'
    /// `REMOVE`s go on the connections feed. Their member items, which the expiry path leaves
    /// each room by, are not among them: a member item's `expiresAt` is a week after its
    /// connection's (`chat_shared::keys::MEMBER_TTL_GRACE_SECS`).
    pub ttl_sweep: Duration,
}

/// The sweeper's default interval.
pub const DEFAULT_TTL_SWEEP: Duration = Duration::from_secs(60);

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            host: "127.0.0.1".into(),
            port: 8080,
            store: StoreChoice::Embedded(EmbeddedStore::new(Retention::default())),
            gateway: GatewayConfig::default(),
            handler: HandlerConfig::default(),
            fanout: FanoutConfig::default(),
            retention: Retention::default(),
            esm: EsmConfig::default(),
            ttl_sweep: DEFAULT_TTL_SWEEP,
        }
    }
}

/// chat-api-handler's code behind the gateway.
struct HandlerIntegration {
    store: Arc<dyn ChatStore>,
    config: HandlerConfig,
    meter: Arc<Meter>,
}

#[async_trait]
impl Integration for HandlerIntegration {
    async fn invoke(
        &self,
        request: ApiGatewayWebsocketProxyRequest,
    ) -> Result<ApiGatewayProxyResponse, gateway::BoxError> {
        let started = tokio::time::Instant::now();
        // The same span and metrics as chat-api-handler's main.rs around the same call.
        let route = request.request_context.route_key.clone();
        let span = chat_shared::telemetry::request_span(&request);
        let handled = handle_request(
            self.store.as_ref(),
            &self.config,
            request,
            chat_shared::now_ms(),
        );
        let response = chat_shared::metrics::handler_request(
            route.as_deref(),
            tracing::Instrument::instrument(handled, span),
        )
        .await;
        self.meter
            .invocation(Function::ApiHandler, started.elapsed());
        Ok(response?)
    }
}

/// The fan-out function's timeout in template.yaml.
const FANOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// The fan-out's code behind the event source mapping.
struct FanoutTarget {
    store: Arc<dyn ChatStore>,
    api: ManagementApi,
    config: FanoutConfig,
    meter: Arc<Meter>,
}

#[async_trait]
impl StreamTarget for FanoutTarget {
    async fn invoke(&self, event: Event) -> Result<DynamoDbEventResponse, esm::BoxError> {
        let started = tokio::time::Instant::now();
        let response = handle_stream_event(
            self.store.as_ref(),
            &self.api,
            &self.config,
            event,
            chat_shared::now_ms,
            // As on AWS: the function's timeout (template.yaml: 60 s) bounds each invocation.
            Some(tokio::time::Instant::now() + FANOUT_TIMEOUT),
        )
        .await;
        self.meter.invocation(Function::Fanout, started.elapsed());
        Ok(response)
    }
}

/// How long a shutdown lets the fan-out finish what is still in the stream.
pub const SHUTDOWN_DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// What a shutdown managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// The fan-out finished every record in the stream within [`SHUTDOWN_DRAIN_LIMIT`].
    pub drained: bool,
    /// What the event source mapping went through over the stack's life (zeros when it
    /// did not drain in time).
    pub mapping: MappingStats,
    /// The same for the connections table's mapping (TTL expiry; zeros without one).
    pub expiry_mapping: MappingStats,
}

/// A running local stack.
pub struct RunningStack {
    pub addr: SocketAddr,
    /// `ws://host:port/{stage}`: what clients connect to (Outputs.WebSocketURL on AWS).
    pub websocket_url: String,
    /// `http://host:port/{stage}/@connections` (Outputs.ConnectionURL on AWS).
    pub connection_url: String,
    shutdown: oneshot::Sender<()>,
    stop_listening: oneshot::Sender<()>,
    /// The gateway being served, to learn when its clients are closed.
    gateway_handle: Gateway,
    gateway: tokio::task::JoinHandle<std::io::Result<()>>,
    mapping: Mapping,
    /// The connections table's mapping (none on a table without a stream).
    expiry_mapping: Option<Mapping>,
    sweeper: Option<tokio::task::JoinHandle<()>>,
    meter: Arc<Meter>,
}

/// Credentials for the local `@connections` endpoint, which does not verify signatures, and
/// for DynamoDB APIs when no AWS credentials are configured (moto and DynamoDB Local accept any).
fn local_credentials() -> Credentials {
    Credentials::new("local", "local", None, None, "chat-local")
}

/// Whether `endpoint` is on this machine (a loopback address or `localhost`): moto or
/// DynamoDB Local, which accept any credentials.
pub fn is_local_endpoint(endpoint: &str) -> bool {
    let Ok(uri) = endpoint.parse::<hyper::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (DynamoDB Local keeps one
/// database per access key, so a key the user set is kept), else placeholders.
fn local_endpoint_credentials() -> Credentials {
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(id), Ok(secret)) if !id.is_empty() && !secret.is_empty() => Credentials::new(
            id,
            secret,
            std::env::var("AWS_SESSION_TOKEN").ok(),
            None,
            "environment",
        ),
        _ => local_credentials(),
    }
}

async fn dynamodb_sdk_config(endpoint: Option<&str>, region: &str) -> SdkConfig {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).region(Region::new(region.to_owned()));
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
        if is_local_endpoint(endpoint) {
            // A local API needs no real credentials: looking for them would walk the default
            // chain to the EC2 instance metadata service, which is not there and says so at
            // length on stderr.
            return loader
                .credentials_provider(
                    aws_credential_types::provider::SharedCredentialsProvider::new(
                        local_endpoint_credentials(),
                    ),
                )
                .load()
                .await;
        }
    }
    let config = loader.load().await;
    let has_credentials = match config.credentials_provider() {
        Some(provider) => {
            use aws_credential_types::provider::ProvideCredentials;
            tokio::time::timeout(Duration::from_secs(3), provider.provide_credentials())
                .await
                .is_ok_and(|r| r.is_ok())
        }
        None => false,
    };
    if has_credentials || endpoint.is_none() {
        return config;
    }
    info!(
        "no AWS credentials found; using placeholder credentials for {}",
        endpoint.unwrap_or_default()
    );
    config
        .into_builder()
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(local_credentials()),
        )
        .build()
}

pub async fn start(options: LocalOptions) -> anyhow::Result<RunningStack> {
    crate::metrics::install();
    let bind = format!("{}:{}", options.host, options.port);
    let listener = match TcpListener::bind(&bind).await {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            bail!("{bind} is already in use: stop whatever is listening there, or pick another port with --port")
        }
        Err(e) => return Err(e).with_context(|| format!("cannot listen on {bind}")),
    };
    let addr = listener.local_addr().context("reading the bound address")?;
    let stage = options.gateway.stage.clone();
    // Clients of a wildcard bind still reach it on loopback.
    let client_host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        addr.ip().to_string()
    };
    let http_base = format!("http://{client_host}:{}/{stage}", addr.port());

    type Source = Box<dyn RecordSource>;
    let (store, source, conn_source, sweeper): (Arc<dyn ChatStore>, Source, Option<Source>, _) =
        match &options.store {
            StoreChoice::Embedded(store) => {
                let store = store
                    .clone()
                    .with_large_room_limit(options.handler.presence_limit);
                let feed = store.feed();
                let conn_feed = store.connections_feed();
                // DynamoDB's TTL sweeper, in-process: every expired item goes; the expired
                // connections' TTL REMOVEs drive the expiry path, which finds the member items
                // it leaves by, since those expire a grace after their connection.
                let sweeping = store.clone();
                let every = options.ttl_sweep.max(Duration::from_millis(10));
                let sweeper = tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    loop {
                        tick.tick().await;
                        let now = chat_shared::now_ms();
                        let removed = sweeping.expire(now);
                        if removed > 0 {
                            info!(removed, "expired items removed (TTL)");
                        }
                    }
                });
                (
                    Arc::new(store),
                    Box::new(feed),
                    Some(Box::new(conn_feed)),
                    Some(sweeper),
                )
            }
            StoreChoice::DynamoDb {
                endpoint,
                region,
                tables,
            } => {
                let sdk = dynamodb_sdk_config(endpoint.as_deref(), region).await;
                let dynamodb = aws_sdk_dynamodb::Client::new(&sdk);
                create_tables(&dynamodb, tables).await.with_context(|| {
                    format!(
                        "creating or finding the tables {} and {} at {}",
                        tables.events,
                        tables.connections,
                        endpoint.as_deref().unwrap_or("AWS")
                    )
                })?;
                let described = dynamodb
                    .describe_table()
                    .table_name(&tables.events)
                    .send()
                    .await
                    .with_context(|| format!("describing table {}", tables.events))?;
                let Some(stream_arn) = described
                    .table()
                    .and_then(|t| t.latest_stream_arn())
                    .map(str::to_owned)
                else {
                    bail!(
                    "table {} has no stream; enable a NEW_IMAGE stream on it (template.yaml does)",
                    tables.events
                );
                };
                let source = StreamsApiSource::at_latest(
                    aws_sdk_dynamodbstreams::Client::new(&sdk),
                    stream_arn,
                    region.clone(),
                )
                .await
                .context("reading the event table's stream")?;
                // The connections table's stream, for TTL expiry. moto runs no TTL deletions
                // (a test feeds the record); a table created before it had a stream has none.
                let conn_stream = dynamodb
                    .describe_table()
                    .table_name(&tables.connections)
                    .send()
                    .await
                    .with_context(|| format!("describing table {}", tables.connections))?
                    .table()
                    .and_then(|t| t.latest_stream_arn())
                    .map(str::to_owned);
                let conn_source: Option<Source> = match conn_stream {
                    Some(arn) => Some(Box::new(
                        StreamsApiSource::at_latest(
                            aws_sdk_dynamodbstreams::Client::new(&sdk),
                            arn,
                            region.clone(),
                        )
                        .await
                        .context("reading the connections table's stream")?,
                    )),
                    None => {
                        warn!(
                            table = tables.connections.as_str(),
                            "the connections table has no stream: a connection whose TTL expires will not leave its rooms (enable an OLD_IMAGE stream, as template.yaml does)"
                        );
                        None
                    }
                };
                let store = DynamoStore::new(dynamodb, tables.clone(), options.retention)
                    .with_large_room_limit(options.handler.presence_limit);
                (Arc::new(store), Box::new(source), conn_source, None)
            }
        };

    let meter = Arc::new(Meter::default());
    if let StoreChoice::Embedded(embedded) = &options.store {
        meter.meter_store(embedded.clone());
    }
    let integration = Arc::new(HandlerIntegration {
        store: Arc::clone(&store),
        config: options.handler.clone(),
        meter: Arc::clone(&meter),
    });
    let gateway = Gateway::metered(options.gateway.clone(), integration, Arc::clone(&meter));
    let management = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(local_credentials()),
        )
        .build();
    let target = Arc::new(FanoutTarget {
        store,
        api: ManagementApi::new(&management, &http_base),
        config: options.fanout.clone(),
        meter: Arc::clone(&meter),
    });
    let expiry_mapping = conn_source.map(|conn_source| {
        Mapping::spawn_filtered(
            conn_source,
            Arc::clone(&target) as Arc<dyn StreamTarget>,
            options.esm.clone(),
            passes_expiry_filter,
        )
    });
    let mapping = Mapping::spawn(source, target, options.esm.clone());
    let (shutdown, on_shutdown) = oneshot::channel::<()>();
    let (stop_listening, on_stop_listening) = oneshot::channel::<()>();
    let serving = gateway.clone();
    let gateway_task = tokio::spawn(async move {
        serving
            .serve_until(
                listener,
                async move {
                    let _ = on_shutdown.await;
                },
                async move {
                    let _ = on_stop_listening.await;
                },
            )
            .await
    });
    Ok(RunningStack {
        addr,
        websocket_url: format!("ws://{client_host}:{}/{stage}", addr.port()),
        connection_url: format!("{http_base}/@connections"),
        shutdown,
        stop_listening,
        gateway: gateway_task,
        gateway_handle: gateway,
        mapping,
        expiry_mapping,
        sweeper,
        meter,
    })
}

impl RunningStack {
    /// What AWS would charge for the run so far (also at `GET /bill`).
    pub fn bill(&self) -> Bill {
        self.gateway_handle.bill()
    }

    /// The meter, to price the run after [`RunningStack::shutdown`] too.
    pub fn meter(&self) -> Arc<Meter> {
        Arc::clone(&self.meter)
    }

    /// Closes every client (1001), runs their `$disconnect`s, then lets the fan-out deliver
    /// what is still in the stream before stopping.
    pub async fn shutdown(self) -> anyhow::Result<Shutdown> {
        let _ = self.shutdown.send(());
        self.gateway_handle.clients_closed().await;
        // The leaves just recorded are still in the stream: the fan-out drains them while
        // `@connections` still answers (410 for everyone), then the listener closes.
        // The expiry mapping first: the leaves it records go to the events stream.
        let expiry_mapping = match self.expiry_mapping {
            Some(m) => m.drain(SHUTDOWN_DRAIN_LIMIT).await,
            None => Some(MappingStats::default()),
        };
        let mapping = self.mapping.drain(SHUTDOWN_DRAIN_LIMIT).await;
        let _ = self.stop_listening.send(());
        match self.gateway.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "the gateway stopped with an error"),
            Err(e) => warn!(error = %e, "the gateway task failed"),
        }
        if let Some(sweeper) = self.sweeper {
            sweeper.abort();
        }
        info!(drained = mapping.is_some(), ?mapping, "stopped");
        Ok(Shutdown {
            drained: mapping.is_some() && expiry_mapping.is_some(),
            mapping: mapping.unwrap_or_default(),
            expiry_mapping: expiry_mapping.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_local_endpoint;

    #[test]
    fn loopback_and_localhost_endpoints_are_local() {
        // GIVEN endpoints on this machine and elsewhere WHEN classified THEN only loopback
        // addresses and localhost names are local
        for local in [
            "http://127.0.0.1:5000",
            "http://127.10.0.3:8000/",
            "http://localhost:8000",
            "http://LOCALHOST",
            "http://dynamodb.localhost:8000",
            "http://[::1]:8000",
        ] {
            assert!(is_local_endpoint(local), "{local}");
        }
        for remote in [
            "https://dynamodb.us-east-1.amazonaws.com",
            "http://10.0.0.5:8000",
            "http://localhost.example.com",
            "not a url",
        ] {
            assert!(!is_local_endpoint(remote), "{remote}");
        }
    }
}
