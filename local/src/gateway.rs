//! An emulator of an API Gateway WebSocket API with Lambda proxy integrations.
//!
//! This module owns everything a client or a backend sees of API Gateway on a laptop:
//!
//! - the WebSocket endpoint `ws://host:port/{stage}`: the `$connect` handshake, route selection
//!   on `$request.body.action`, `MESSAGE` events, route responses, and `$disconnect`;
//! - the connection limits (32 KB frames, 128 KB messages, 10 min idle, 2 h maximum lifetime);
//! - the Management API on the same listener, `/{stage}/@connections/{connectionId}` (POST, GET,
//!   DELETE), with the error codes the `aws-sdk-apigatewaymanagement` client parses;
//! - graceful shutdown: every client is closed with 1001 and gets its `$disconnect`.
//!
//! The Lambda functions behind the routes are in-process [`Integration`]s. The numbers and the
//! semantics come from the API Gateway developer guide ("Amazon API Gateway quotas for
//! configuring and running a WebSocket API", "Managing connected users and client apps:
//! $connect and $disconnect routes", "Use @connections commands in your backend service").
//!
//! Requests to `@connections` are SigV4-signed by the SDK; this emulator accepts them without
//! verifying the signature (there is no IAM on a laptop).

mod connection;
mod events;
mod management;
mod throttle;
mod upgrade;

use throttle::Bucket;
pub use throttle::ThrottleLimit;

use crate::bill::Meter;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use axum::routing::get;
use axum::Router;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

/// The error type integrations return (what a Lambda handler's `Err` would be).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What API Gateway invokes: the Lambda function behind every route (in-process here).
#[async_trait::async_trait]
pub trait Integration: Send + Sync + 'static {
    /// Handles one `$connect`, `MESSAGE` or `$disconnect` event, like a Lambda proxy integration.
    async fn invoke(
        &self,
        request: ApiGatewayWebsocketProxyRequest,
    ) -> Result<ApiGatewayProxyResponse, BoxError>;
}

/// The settings of the emulated API and stage. [`Default`] gives AWS's numbers.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The stage name: the WebSocket URL is `ws://host:port/{stage}`.
    pub stage: String,
    /// Goes into `requestContext.apiId`.
    pub api_id: String,
    /// The custom route keys matched against `$request.body.action`; anything else is `$default`.
    pub route_keys: Vec<String>,
    /// A connection without a client frame for this long is closed with 1001 (AWS: 10 minutes).
    pub idle_timeout: Duration,
    /// A connection is closed with 1001 once it is this old (AWS: 2 hours).
    pub max_duration: Duration,
    /// Largest frame a client may send; larger closes the connection with 1009 (AWS: 32 KB).
    pub max_frame_bytes: usize,
    /// Largest (fragmented) message a client may send; larger closes with 1009 (AWS: 128 KB).
    pub max_message_bytes: usize,
    /// Frames queued per connection before `@connections` POST answers 429.
    pub send_buffer: usize,
    /// Test knob: never invoke `$disconnect`, as when AWS loses it (it is best-effort).
    pub drop_disconnect: bool,
    /// Benchmark knob: a delay added to every `@connections` call before it is answered, to
    /// model the round trip to AWS from a Lambda (a few to tens of ms).
    pub management_latency: Duration,
    /// AWS-like: the account's request throttle, shared by inbound messages (throttled ones
    /// are answered `Too Many Requests` without invoking the integration) and `@connections`
    /// calls (429 `LimitExceededException`). `None`: unlimited.
    pub account_throttle: Option<ThrottleLimit>,
    /// AWS-like: new connections per second; a handshake over it is refused with 429.
    pub connect_throttle: Option<ThrottleLimit>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            stage: "prod".to_owned(),
            api_id: "local".to_owned(),
            route_keys: [
                "setName",
                "sendPublic",
                "sendPrivate",
                "history",
                "join",
                "leave",
            ]
            .map(str::to_owned)
            .to_vec(),
            idle_timeout: Duration::from_secs(10 * 60),
            max_duration: Duration::from_secs(2 * 60 * 60),
            max_frame_bytes: 32 * 1024,
            max_message_bytes: 128 * 1024,
            send_buffer: 1024,
            drop_disconnect: false,
            management_latency: Duration::ZERO,
            account_throttle: None,
            connect_throttle: None,
        }
    }
}

/// The emulated WebSocket API. Cheap to clone: clones share the connections.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// A gateway that invokes `integration` for every route.
    pub fn new(config: GatewayConfig, integration: Arc<dyn Integration>) -> Self {
        Self::metered(config, integration, Arc::default())
    }

    /// [`Gateway::new`] that meters its messages and connection minutes into `meter`, which
    /// `GET /bill` then prices.
    pub fn metered(
        config: GatewayConfig,
        integration: Arc<dyn Integration>,
        meter: Arc<Meter>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                meter,
                account: config.account_throttle.map(Bucket::new),
                connects: config.connect_throttle.map(Bucket::new),
                config,
                integration,
                registry: Registry::default(),
                shutdown: watch::Sender::new(false),
                tasks: watch::Sender::new(0),
            }),
        }
    }

    /// Serves WebSocket upgrades at `/{stage}` and the Management API at
    /// `/{stage}/@connections/{id}` on the same listener until `shutdown` resolves; then closes
    /// every client with 1001 ("Going away"), invokes `$disconnect` for each (unless
    /// `drop_disconnect`), and returns.
    ///
    /// Any other path answers 403 `ForbiddenException`, which is what API Gateway answers for a
    /// stage or resource that does not exist; another method on these paths answers 405.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_until(listener, shutdown, std::future::ready(()))
            .await
    }

    /// [`Gateway::serve`], except that after every client is closed (and its `$disconnect`
    /// done) the listener keeps answering `@connections` — 410 for every id, as every
    /// connection is gone — until `stop` resolves. On AWS the API outlives its clients, so a
    /// fan-out draining the stream after a shutdown gets its 410s; with the listener closed it
    /// would see refused connections and retry them until its drain limit. New WebSocket
    /// handshakes meanwhile are refused with 503.
    pub async fn serve_until(
        &self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let shared = Arc::clone(&self.shared);
        // A gateway may serve again after a shutdown.
        shared.shutdown.send_replace(false);
        let stage = &shared.config.stage;
        let router = Router::new()
            .route(&format!("/{stage}"), get(upgrade::handle))
            .route(
                &format!("/{stage}/@connections/{{connection_id}}"),
                get(management::get_connection)
                    .post(management::post_to_connection)
                    .delete(management::delete_connection),
            )
            .route("/bill", get(bill))
            .route("/metrics", get(crate::metrics::serve))
            // The chat's web page (crate::page), on the same port as on a laptop there is
            // nothing else to host it.
            .route("/", get(page_index))
            .route("/app.js", get(crate::page::app))
            .route("/client.js", get(crate::page::client))
            .fallback(management::forbidden)
            .with_state(Arc::clone(&shared));
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, stage = %stage, "API Gateway emulator listening");
        }

        let signal = {
            let shared = Arc::clone(&shared);
            async move {
                shutdown.await;
                tracing::info!("API Gateway emulator shutting down");
                shared.shutdown.send_replace(true);
                shared.connections_finished().await;
                stop.await;
            }
        };
        // Graceful: stops accepting, lets in-flight HTTP requests (a `$connect` in progress, an
        // `@connections` call) finish. Upgraded sockets are not HTTP connections any more;
        // they watch `shared.shutdown` themselves, and are awaited below.
        let served = axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(signal)
        .await;
        // The shutdown signal may not have fired if the server failed.
        shared.shutdown.send_replace(true);
        shared.connections_finished().await;
        served
    }

    /// Resolves once a shutdown has begun and every connection has ended: each client closed,
    /// each `$disconnect` invoked.
    pub async fn clients_closed(&self) {
        let mut stopping = self.shared.shutdown.subscribe();
        // The sender lives in `shared`, so this cannot fail; nothing to wait for if it did.
        let _ = stopping.wait_for(|stopping| *stopping).await;
        self.shared.connections_finished().await;
    }

    /// Number of open connections (for tests and logs).
    /// What AWS would charge for the run so far (see [`crate::bill`]).
    pub fn bill(&self) -> crate::bill::Bill {
        self.shared.bill()
    }

    pub fn connection_count(&self) -> usize {
        self.shared.registry.lock().len()
    }
}

/// `GET /bill`: what AWS would charge for the run so far, as JSON.
async fn bill(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
) -> axum::Json<crate::bill::Bill> {
    axum::Json(shared.bill())
}

/// `GET /`: the chat page, pointed at this stage.
async fn page_index(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
) -> axum::response::Response {
    crate::page::index(&shared.config.stage)
}

/// State shared by the HTTP handlers and the connection tasks.
struct Shared {
    config: GatewayConfig,
    integration: Arc<dyn Integration>,
    registry: Registry,
    /// Becomes `true` when `serve`'s shutdown future resolves.
    shutdown: watch::Sender<bool>,
    /// Number of live connection tasks, so `serve` can wait for their `$disconnect`s.
    tasks: watch::Sender<usize>,
    /// What AWS would bill: messages and connection minutes are metered here.
    meter: Arc<Meter>,
    /// The account's request bucket and the new-connection bucket, when throttling.
    account: Option<Bucket>,
    connects: Option<Bucket>,
}

impl Shared {
    /// The bill so far, the open connections' minutes included.
    fn bill(&self) -> crate::bill::Bill {
        let now = events::now_ms();
        let open_ms: i64 = self
            .registry
            .lock()
            .values()
            .map(|entry| (now - entry.connected_at_ms).max(0))
            .sum();
        self.meter.bill(u64::try_from(open_ms).unwrap_or(0))
    }

    /// Takes a token from the account's request bucket: `false` when throttled.
    fn admit_request(&self) -> bool {
        self.account.as_ref().is_none_or(Bucket::take)
    }

    /// Takes a token from the new-connection bucket: `false` when throttled.
    fn admit_connection(&self) -> bool {
        self.connects.as_ref().is_none_or(Bucket::take)
    }

    /// Resolves when no connection task is running.
    async fn connections_finished(&self) {
        let mut tasks = self.tasks.subscribe();
        // The sender lives in `self`, so this cannot fail; nothing to wait for if it did.
        let _ = tasks.wait_for(|running| *running == 0).await;
    }

    /// Invokes the integration; a panicking handler counts as a failed invocation, as a
    /// crashed Lambda would.
    async fn invoke(
        &self,
        request: ApiGatewayWebsocketProxyRequest,
    ) -> Result<ApiGatewayProxyResponse, BoxError> {
        std::panic::AssertUnwindSafe(self.integration.invoke(request))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err("the integration panicked".into()))
    }

    /// Counts a connection task until the guard is dropped.
    fn track_task(self: &Arc<Self>) -> TaskGuard {
        self.tasks.send_modify(|running| *running += 1);
        TaskGuard(Arc::clone(self))
    }
}

struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0
            .tasks
            .send_modify(|running| *running = running.saturating_sub(1));
    }
}

/// The open connections, by connection id: what `@connections` can reach.
#[derive(Default)]
struct Registry(Mutex<HashMap<String, Entry>>);

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts
        // and removes), so a poisoned lock is still usable.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One registered connection.
struct Entry {
    /// Frames to the client (`@connections` POST and route responses), bounded by
    /// `send_buffer`.
    outbound: mpsc::Sender<Message>,
    /// Fired by `@connections` DELETE.
    delete: oneshot::Sender<()>,
    connected_at_ms: i64,
    /// Last client frame (epoch ms), updated by the connection's reader.
    last_active_ms: Arc<AtomicI64>,
    source_ip: String,
    user_agent: Option<String>,
}
