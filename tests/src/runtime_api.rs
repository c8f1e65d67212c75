//! A Lambda Runtime API on a loopback port, and a function's real bootstrap running behind it:
//! what runs `provided.al2023` functions on AWS, small enough to drive from a test.
//!
//! The bootstrap is the function's own binary (the `main.rs` that `sam build` packages, built
//! for this machine), started with the environment Lambda gives it (`AWS_LAMBDA_RUNTIME_API`,
//! `AWS_LAMBDA_FUNCTION_NAME`, `AWS_LAMBDA_LOG_FORMAT`, …). It long-polls
//! `GET /2018-06-01/runtime/invocation/next`; [`Bootstrap::invoke`] hands it an event with the
//! headers Lambda sends (`Lambda-Runtime-Aws-Request-Id`, `-Deadline-Ms`,
//! `-Invoked-Function-Arn`, `-Trace-Id`) and waits for its `…/response` or `…/error`. Every
//! line the process prints on stdout (its logs and EMF documents, as CloudWatch would get
//! them) is kept. The time from starting the process to its first `next` is its init time.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, Notify};

/// What the function answered.
#[derive(Debug)]
pub enum Outcome {
    /// `POST …/response`: the function's result.
    Response(Value),
    /// `POST …/error`: the error the runtime reported (`errorType`, `errorMessage`).
    Error(Value),
}

struct Pending {
    request_id: String,
    event: Value,
    deadline_ms: u64,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Pending>,
    waiting: HashMap<String, oneshot::Sender<Outcome>>,
    first_poll: Option<Instant>,
    init_error: Option<String>,
    next_id: u64,
}

#[derive(Clone, Default)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    queued: Arc<Notify>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A function's bootstrap process behind its own Runtime API.
pub struct Bootstrap {
    shared: Shared,
    child: Child,
    started: Instant,
    stdout: Arc<Mutex<Vec<String>>>,
    function_name: String,
    server: tokio::task::JoinHandle<()>,
}

impl Bootstrap {
    /// Starts the Runtime API on a free loopback port and `binary` behind it, with Lambda's
    /// environment plus `env` (the function's own variables, as template.yaml sets them).
    pub async fn start(
        binary: &std::path::Path,
        function_name: &str,
        env: &[(&str, String)],
    ) -> anyhow::Result<Bootstrap> {
        let shared = Shared::default();
        let router = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the Runtime API")?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .env("AWS_LAMBDA_FUNCTION_NAME", function_name)
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{function_name}"),
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "2026/11/30/[$LATEST]test")
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_SESSION_TOKEN", "test")
            // No instance metadata service here, and none is needed: credentials are above.
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let lines = child.stdout.take().context("the bootstrap's stdout")?;
        let kept = Arc::clone(&stdout);
        tokio::spawn(async move {
            let mut lines = BufReader::new(lines).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                kept.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(line);
            }
        });
        Ok(Bootstrap {
            shared,
            child,
            started,
            stdout,
            function_name: function_name.to_owned(),
            server,
        })
    }

    /// Invokes the function with `event` and a deadline `timeout` from now; waits (up to the
    /// deadline plus 10 s) for its answer. Returns the request id with the outcome.
    pub async fn invoke(
        &mut self,
        event: Value,
        timeout: Duration,
    ) -> anyhow::Result<(String, Outcome)> {
        let deadline_ms = epoch_ms() + timeout.as_millis() as u64;
        let (tx, rx) = oneshot::channel();
        let request_id = {
            let mut inner = self.shared.lock();
            inner.next_id += 1;
            let request_id = format!("req-{}-{}", self.function_name, inner.next_id);
            inner.waiting.insert(request_id.clone(), tx);
            inner.queue.push_back(Pending {
                request_id: request_id.clone(),
                event,
                deadline_ms,
            });
            request_id
        };
        self.shared.queued.notify_one();
        tokio::select! {
            outcome = rx => Ok((request_id, outcome.context("the Runtime API stopped")?)),
            status = self.child.wait() => {
                let init = self.shared.lock().init_error.clone();
                bail!("the bootstrap exited ({status:?}) before answering; init error: {init:?}")
            }
            _ = tokio::time::sleep(timeout + Duration::from_secs(10)) => {
                bail!("no answer to {request_id} within its deadline and 10 s")
            }
        }
    }

    /// From starting the process to its first `GET …/next`: what Lambda reports as the init
    /// duration (`None` until it has polled).
    pub fn init_time(&self) -> Option<Duration> {
        self.shared
            .lock()
            .first_poll
            .map(|t| t.duration_since(self.started))
    }

    /// Waits (up to `limit`) until the bootstrap has polled for its first event.
    pub async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<Duration> {
        let until = Instant::now() + limit;
        loop {
            if let Some(init) = self.init_time() {
                return Ok(init);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let init = self.shared.lock().init_error.clone();
                bail!("the bootstrap exited ({status}) during init; init error: {init:?}");
            }
            if Instant::now() > until {
                bail!("the bootstrap did not poll for an event within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Every stdout line so far (logs and EMF documents).
    pub fn stdout(&self) -> Vec<String> {
        self.stdout
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The stdout lines printed so far, each parsed as JSON (a line that is not JSON fails).
    pub fn stdout_json(&self) -> anyhow::Result<Vec<Value>> {
        self.stdout()
            .iter()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
            .collect()
    }
}

impl Drop for Bootstrap {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        self.server.abort();
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `GET /2018-06-01/runtime/invocation/next`: the next event, when there is one.
async fn next(State(shared): State<Shared>) -> Response {
    shared.lock().first_poll.get_or_insert_with(Instant::now);
    let pending = loop {
        let notified = shared.queued.notified();
        if let Some(p) = shared.lock().queue.pop_front() {
            break p;
        }
        notified.await;
    };
    let mut headers = HeaderMap::new();
    let header = |v: &str| HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("invalid"));
    headers.insert("lambda-runtime-aws-request-id", header(&pending.request_id));
    headers.insert(
        "lambda-runtime-deadline-ms",
        header(&pending.deadline_ms.to_string()),
    );
    headers.insert(
        "lambda-runtime-invoked-function-arn",
        HeaderValue::from_static("arn:aws:lambda:us-east-1:123456789012:function:test"),
    );
    headers.insert(
        "lambda-runtime-trace-id",
        HeaderValue::from_static("Root=1-00000000-000000000000000000000000;Sampled=0"),
    );
    (StatusCode::OK, headers, pending.event.to_string()).into_response()
}

fn answer(shared: &Shared, id: &str, outcome: Outcome) -> StatusCode {
    match shared.lock().waiting.remove(id) {
        Some(tx) => {
            let _ = tx.send(outcome);
            StatusCode::ACCEPTED
        }
        None => StatusCode::BAD_REQUEST,
    }
}

async fn response(State(shared): State<Shared>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    answer(&shared, &id, Outcome::Response(value))
}

async fn error(State(shared): State<Shared>, Path(id): Path<String>, body: Bytes) -> StatusCode {
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    answer(&shared, &id, Outcome::Error(value))
}

async fn init_error(State(shared): State<Shared>, body: Bytes) -> StatusCode {
    shared.lock().init_error = Some(String::from_utf8_lossy(&body).into_owned());
    StatusCode::ACCEPTED
}
