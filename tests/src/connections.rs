//! A real HTTP `@connections` endpoint (the API Gateway Management API) on a loopback port.
//!
//! It owns the recording of what the chat sends to its clients and the faults a test wants the
//! chat to meet. Answers use the statuses, `x-amzn-ErrorType` headers and JSON bodies of the
//! real service, so `aws-sdk-apigatewaymanagement` parses them into the same typed errors
//! (`GoneException`, `LimitExceededException`, ...) it would in production. SigV4 signatures
//! are accepted without being checked.
//!
//! Wire shapes follow the Smithy model compiled into `aws-sdk-apigatewaymanagement` 1.x:
//! `POST|GET|DELETE /{stage}/@connections/{connectionId}`, GetConnection answers
//! `{"connectedAt", "identity": {"sourceIp", "userAgent"}, "lastActiveAt"}` (jsonName
//! lower camel case, ISO-8601 date-times), errors are read from the `x-amzn-ErrorType` header.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use aws_sdk_apigatewaymanagement::primitives::{DateTime, DateTimeFormat};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// One delivered `PostToConnection`, in global arrival order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Post {
    /// The connection id from the path (percent-decoded).
    pub connection_id: String,
    /// The request body exactly as received.
    pub body: Vec<u8>,
}

#[derive(Debug)]
struct Fault {
    status: u16,
    remaining: usize,
}

#[derive(Debug, Default)]
struct Recorded {
    posts: Vec<Post>,
    /// When each of `posts` arrived (same index).
    posted_at: Vec<std::time::Instant>,
    gone: HashSet<String>,
    faults: HashMap<String, Fault>,
    any_fault: Option<Fault>,
    /// Requests per id still to be left unanswered.
    stalls: HashMap<String, usize>,
    stalls_served: usize,
    delay: Duration,
    gone_hits: usize,
    faults_served: usize,
    requests: usize,
    deleted: Vec<String>,
    unrouted: Vec<String>,
    first_seen: HashMap<String, SystemTime>,
}

#[derive(Debug, Default)]
struct Shared {
    recorded: Mutex<Recorded>,
    /// Woken on every request, so waiters need not poll.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A test that panicked while holding the lock must not hide the real failure behind a
        // poison error in every later assertion.
        self.recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A running `@connections` endpoint; the server task stops when this is dropped.
#[derive(Debug)]
pub struct ConnectionsEndpoint {
    addr: SocketAddr,
    stage: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl ConnectionsEndpoint {
    /// Serves `/{stage}/@connections/{id}` on `127.0.0.1:0` in a task of the current runtime.
    pub async fn start(stage: &str) -> anyhow::Result<ConnectionsEndpoint> {
        if stage.is_empty() || stage.contains('/') {
            bail!("stage must be one non-empty path segment, got {stage:?}");
        }
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route(
                &format!("/{stage}/@connections/{{id}}"),
                post(post_connection)
                    .get(get_connection)
                    .delete(delete_connection),
            )
            .fallback(unrouted)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("binding the @connections endpoint on 127.0.0.1:0")?;
        let addr = listener.local_addr().context("reading endpoint address")?;
        let server = tokio::spawn(async move {
            // The server only ends when the task is aborted, so an error here is a broken socket
            // that the waiting test will report as missing posts.
            let _ = axum::serve(listener, app).await;
        });
        Ok(ConnectionsEndpoint {
            addr,
            stage: stage.to_owned(),
            shared,
            server,
        })
    }

    /// `http://127.0.0.1:PORT/{stage}`: the SDK's `endpoint_url` (it appends
    /// `/@connections/{id}`), like `https://{domain}/{stage}` in production.
    pub fn url(&self) -> String {
        format!("http://{}/{}", self.addr, self.stage)
    }

    /// The socket address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Delivered posts in arrival order, bodies parsed as JSON (a body that is not JSON is
    /// kept as a JSON string of its lossy UTF-8 text).
    pub fn posts(&self) -> Vec<(String, serde_json::Value)> {
        self.shared
            .lock()
            .posts
            .iter()
            .map(|post| (post.connection_id.clone(), body_json(&post.body)))
            .collect()
    }

    /// When each delivered post arrived, in arrival order (the same order as [`Self::posts`]):
    /// for counting posts per second at the endpoint.
    pub fn post_times(&self) -> Vec<std::time::Instant> {
        self.shared.lock().posted_at.clone()
    }

    /// Delivered posts with their exact bytes, in arrival order.
    pub fn raw_posts(&self) -> Vec<Post> {
        self.shared.lock().posts.clone()
    }

    /// The frames delivered to one connection, in arrival order.
    pub fn frames_for(&self, id: &str) -> Vec<serde_json::Value> {
        self.shared
            .lock()
            .posts
            .iter()
            .filter(|post| post.connection_id == id)
            .map(|post| body_json(&post.body))
            .collect()
    }

    /// How many posts were delivered (answered 200).
    pub fn post_count(&self) -> usize {
        self.shared.lock().posts.len()
    }

    /// How many 410 Gone answers were served (any method).
    pub fn gone_hits(&self) -> usize {
        self.shared.lock().gone_hits
    }

    /// How many injected faults ([`Self::fail_next`], [`Self::fail_any_next`]) were served.
    pub fn faults_served(&self) -> usize {
        self.shared.lock().faults_served
    }

    /// Every request that reached the endpoint, whatever its answer.
    pub fn request_count(&self) -> usize {
        self.shared.lock().requests
    }

    /// Connection ids that were deleted (`DeleteConnection` answered 204), in order.
    pub fn deleted(&self) -> Vec<String> {
        self.shared.lock().deleted.clone()
    }

    /// `METHOD path` of requests that matched no route (wrong stage or path; answered 403
    /// like API Gateway does); a non-empty list usually means a wrong `endpoint_url`.
    pub fn unrouted(&self) -> Vec<String> {
        self.shared.lock().unrouted.clone()
    }

    /// From now on `id` answers 410 GoneException, as a closed connection does.
    pub fn mark_gone(&self, id: &str) {
        self.shared.lock().gone.insert(id.to_owned());
    }

    /// The next `times` requests (any method) for `id` answer `status` with the matching AWS
    /// error (429 LimitExceededException, 413 PayloadTooLargeException, 403
    /// ForbiddenException, 410 GoneException, 5xx InternalServerErrorException). Injected
    /// faults are served before the connection's own state is looked at.
    pub fn fail_next(&self, id: &str, status: u16, times: usize) {
        self.shared.lock().faults.insert(
            id.to_owned(),
            Fault {
                status,
                remaining: times,
            },
        );
    }

    /// Like [`Self::fail_next`] for whatever connection the next `times` requests are for
    /// (an account-wide throttle, for example); per-id faults are served first.
    pub fn fail_any_next(&self, status: u16, times: usize) {
        self.shared.lock().any_fault = Some(Fault {
            status,
            remaining: times,
        });
    }

    /// The next `times` requests for `id` are read and never answered (a service that hangs):
    /// the connection stays open until the client gives up on it. Served before faults.
    pub fn stall_next(&self, id: &str, times: usize) {
        self.shared.lock().stalls.insert(id.to_owned(), times);
    }

    /// How many requests were left unanswered by [`Self::stall_next`].
    pub fn stalls_served(&self) -> usize {
        self.shared.lock().stalls_served
    }

    /// Every request waits this long before it is answered (a slow network or service).
    pub fn set_delay(&self, delay: Duration) {
        self.shared.lock().delay = delay;
    }

    /// Forgets recorded traffic and counters; gone ids, pending faults and delay stay.
    pub fn clear(&self) {
        let mut recorded = self.shared.lock();
        recorded.posts.clear();
        recorded.posted_at.clear();
        recorded.gone_hits = 0;
        recorded.faults_served = 0;
        recorded.stalls_served = 0;
        recorded.requests = 0;
        recorded.deleted.clear();
        recorded.unrouted.clear();
    }

    /// Waits until at least `n` posts were delivered, or fails after `timeout` listing what
    /// did arrive.
    pub async fn wait_for_posts(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Register interest before checking, so a post between check and wait still wakes us.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.post_count() >= n {
                return Ok(());
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() || tokio::time::timeout(remaining, notified).await.is_err() {
                bail!(
                    "expected at least {n} posts within {timeout:?}, got {}: {:?} (unrouted: {:?})",
                    self.post_count(),
                    self.posts(),
                    self.unrouted()
                );
            }
        }
    }
}

impl Drop for ConnectionsEndpoint {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn body_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// What a request for one connection id gets, decided under the lock at arrival.
enum Decision {
    Stall,
    Fault(u16),
    Gone,
    Proceed,
}

/// Counts the request, consumes an injected fault if any, and reports the delay to apply.
fn arrive(shared: &Shared, id: &str) -> (Decision, Duration) {
    let mut recorded = shared.lock();
    recorded.requests += 1;
    recorded
        .first_seen
        .entry(id.to_owned())
        .or_insert_with(SystemTime::now);
    let delay = recorded.delay;
    if let Some(left) = recorded.stalls.get_mut(id).filter(|left| **left > 0) {
        *left -= 1;
        recorded.stalls_served += 1;
        return (Decision::Stall, delay);
    }
    let fault = match recorded.faults.get_mut(id) {
        Some(fault) if fault.remaining > 0 => {
            fault.remaining -= 1;
            Some(fault.status)
        }
        _ => match recorded.any_fault.as_mut() {
            Some(fault) if fault.remaining > 0 => {
                fault.remaining -= 1;
                Some(fault.status)
            }
            _ => None,
        },
    };
    let decision = match fault {
        Some(status) => {
            recorded.faults_served += 1;
            if status == StatusCode::GONE.as_u16() {
                recorded.gone_hits += 1;
            }
            Decision::Fault(status)
        }
        None if recorded.gone.contains(id) => {
            recorded.gone_hits += 1;
            Decision::Gone
        }
        None => Decision::Proceed,
    };
    (decision, delay)
}

async fn answer_common(shared: &Shared, id: &str) -> Result<(), Response> {
    let (decision, delay) = arrive(shared, id);
    shared.changed.notify_waiters();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match decision {
        Decision::Stall => std::future::pending().await,
        Decision::Fault(status) => Err(aws_error(status)),
        Decision::Gone => Err(aws_error(StatusCode::GONE.as_u16())),
        Decision::Proceed => Ok(()),
    }
}

async fn post_connection(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Err(response) = answer_common(&shared, &id).await {
        return response;
    }
    {
        let mut recorded = shared.lock();
        recorded.posts.push(Post {
            connection_id: id,
            body: body.to_vec(),
        });
        recorded.posted_at.push(std::time::Instant::now());
    }
    shared.changed.notify_waiters();
    // PostToConnection's output has no members: API Gateway answers 200 with an empty body.
    with_request_id(StatusCode::OK.into_response())
}

async fn get_connection(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if let Err(response) = answer_common(&shared, &id).await {
        return response;
    }
    let connected_at = shared
        .lock()
        .first_seen
        .get(&id)
        .copied()
        .unwrap_or_else(SystemTime::now);
    let body = serde_json::json!({
        "connectedAt": iso8601(connected_at),
        "identity": {"sourceIp": "127.0.0.1", "userAgent": "test"},
        "lastActiveAt": iso8601(SystemTime::now()),
    });
    with_request_id(json_response(StatusCode::OK, &body))
}

async fn delete_connection(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    if let Err(response) = answer_common(&shared, &id).await {
        return response;
    }
    {
        // A deleted connection is closed: later calls for it get 410 like on AWS.
        let mut recorded = shared.lock();
        recorded.deleted.push(id.clone());
        recorded.gone.insert(id);
    }
    shared.changed.notify_waiters();
    with_request_id(StatusCode::NO_CONTENT.into_response())
}

async fn unrouted(State(shared): State<Arc<Shared>>, method: Method, uri: Uri) -> Response {
    {
        let mut recorded = shared.lock();
        recorded.requests += 1;
        recorded.unrouted.push(format!("{method} {uri}"));
    }
    shared.changed.notify_waiters();
    aws_error(StatusCode::FORBIDDEN.as_u16())
}

/// The error response API Gateway sends for `status`: the SDK takes the error code from the
/// `x-amzn-ErrorType` header and the message from the JSON body.
fn aws_error(status: u16) -> Response {
    let (error_type, message) = match status {
        // A GoneException from API Gateway carries no message.
        410 => (Some("GoneException"), serde_json::Value::Null),
        429 => (Some("LimitExceededException"), "Rate exceeded".into()),
        413 => (Some("PayloadTooLargeException"), "Message too long".into()),
        403 => (Some("ForbiddenException"), "Forbidden".into()),
        500..=599 => (
            Some("InternalServerErrorException"),
            "Internal server error".into(),
        ),
        _ => (None, "injected fault".into()),
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &serde_json::json!({ "message": message }));
    if let Some(error_type) = error_type {
        response
            .headers_mut()
            .insert("x-amzn-ErrorType", HeaderValue::from_static(error_type));
    }
    with_request_id(response)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn with_request_id(mut response: Response) -> Response {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let id = format!("chat-tests-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-amzn-RequestId", value);
    }
    response
}

fn iso8601(time: SystemTime) -> String {
    DateTime::from(time)
        .fmt(DateTimeFormat::DateTime)
        .unwrap_or_default()
}
