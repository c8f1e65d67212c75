//! `chat-bench sink`: a stand-in `@connections` endpoint that answers 200 to every
//! `POST /{stage}/@connections/{id}` and counts them per id. It runs as its own process so
//! the process measuring the fan-out holds nothing but the fan-out.
//!
//! It prints its endpoint (`http://127.0.0.1:PORT/{stage}`, what `ManagementApi::new` takes)
//! as the first line on stdout, serves `GET /stats` (the counts, as JSON) and `DELETE /stats`
//! (forget them), and exits when its stdin closes (its parent is gone) or after `--max-secs`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

#[derive(Debug, Clone, clap::Args)]
pub struct SinkOptions {
    /// Port on 127.0.0.1; 0 picks a free one.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// The stage in the endpoint's path.
    #[arg(long, default_value = "prod")]
    pub stage: String,
    /// Exits by itself after this long, whatever happens to its parent.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
    /// Delay before each answer, as the round trip to API Gateway from a Lambda.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Answers 429 LimitExceededException, as API Gateway does over the account's quota,
    /// to POSTs beyond this many per second (a token bucket with a burst of half a second's
    /// worth, the shape of the 10,000/s, burst 5,000 quota); 0: never.
    #[arg(long, default_value_t = 0)]
    pub throttle_rps: u64,
    /// These connection ids (comma-separated) answer 500 InternalServerErrorException to
    /// every POST, forever: recipients the fan-out can never reach.
    #[arg(long, value_delimiter = ',')]
    pub fail_ids: Vec<String>,
    /// Parse every accepted POST (a frame, or `{"batch":[…]}` of frames) and keep, per
    /// connection id, the ids of its `publicMessage` frames and their latency (arrival − the
    /// frame's `ts`), for `GET /frames` (`chat-bench busy-room`).
    #[arg(long)]
    pub record_frames: bool,
}

/// What `GET /frames` reports for the connections whose ids start with one letter (the
/// busy-room bench names batched members `b…` and unbatched ones `u…`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FrameGroup {
    /// Connection ids that received at least one POST.
    pub members: u64,
    /// POSTs accepted.
    pub posts: u64,
    /// `publicMessage` frames received, duplicates included.
    pub frames: u64,
    /// Distinct (connection, frame id) pairs: deliveries after dedupe.
    pub distinct: u64,
    /// Frames whose id the connection already had.
    pub duplicates: u64,
    /// After dedupe: frames whose id is lower than one the connection received before.
    pub out_of_order: u64,
    /// The fewest distinct frames any connection of the group received.
    pub min_per_member: u64,
    /// Arrival − `ts` of each frame's first receipt, ms.
    pub latency_p50_ms: i64,
    pub latency_p99_ms: i64,
    pub latency_max_ms: i64,
    /// The last frame's arrival (ms since the epoch).
    pub last_arrival_ms: i64,
}

/// Per connection: the frame ids in arrival order; latencies per group.
#[derive(Default)]
struct Frames {
    per_id: HashMap<String, Vec<u64>>,
    posts: HashMap<char, u64>,
    latencies: HashMap<char, Vec<i64>>,
    last_arrival: HashMap<char, i64>,
}

/// What the sink has received since it started (or since the last `DELETE /stats`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SinkStats {
    pub posts: u64,
    /// Distinct connection ids posted to.
    pub distinct: u64,
    /// Most POSTs any one id received.
    pub max_per_id: u64,
    /// TCP connections accepted: a client whose pool is warm and big enough opens none, so
    /// anything here is a connection the fan-out (re)opened while it ran.
    pub connections: u64,
    /// POSTs answered 429 (`--throttle-rps`); not in `posts`.
    #[serde(default)]
    pub throttled: u64,
    /// POSTs answered 500 (`--fail-ids`); not in `posts`.
    #[serde(default)]
    pub failed: u64,
}

#[derive(Default)]
struct Counts {
    posts: AtomicU64,
    connections: AtomicU64,
    throttled: AtomicU64,
    failed: AtomicU64,
    failing: std::collections::HashSet<String>,
    per_id: Mutex<HashMap<String, u64>>,
    latency: Duration,
    throttle: Option<Mutex<Bucket>>,
    /// With `--record-frames`.
    frames: Option<Mutex<Frames>>,
}

/// The account quota's token bucket: `rate` tokens a second, at most `burst` saved.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Counts {
    fn per_id(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        // Only increments and clears happen under the lock.
        self.per_id.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs the sink until stdin closes or `max_secs` pass.
pub async fn serve(opts: &SinkOptions) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, opts.port)))
        .await
        .context("binding the sink")?;
    let addr = listener
        .local_addr()
        .context("reading the sink's address")?;
    let throttle = (opts.throttle_rps > 0).then(|| {
        let rate = opts.throttle_rps as f64;
        Mutex::new(Bucket {
            rate,
            burst: (rate / 2.0).max(1.0),
            tokens: (rate / 2.0).max(1.0),
            at: std::time::Instant::now(),
        })
    });
    let counts = Arc::new(Counts {
        latency: Duration::from_millis(opts.latency_ms),
        throttle,
        failing: opts.fail_ids.iter().cloned().collect(),
        frames: opts.record_frames.then(Mutex::default),
        ..Counts::default()
    });
    let accepted = Arc::clone(&counts);
    // Each `/stats` request comes over a connection of its own, left out of the tally.
    let listener = listener.tap_io(move |_| {
        accepted.connections.fetch_add(1, Ordering::Relaxed);
    });
    let router = Router::new()
        .route(
            &format!("/{}/@connections/{{id}}", opts.stage),
            post(count_post),
        )
        .route("/stats", get(stats).delete(reset))
        .route("/frames", get(frames))
        .with_state(counts);
    let mut stdout = tokio::io::stdout();
    stdout
        .write_all(format!("http://{addr}/{}\n", opts.stage).as_bytes())
        .await
        .context("printing the sink's endpoint")?;
    stdout
        .flush()
        .await
        .context("printing the sink's endpoint")?;
    let limit = Duration::from_secs(opts.max_secs);
    let stop = async move {
        let stdin_closed = async {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0_u8; 64];
            // Bounded by `limit` below; ends at EOF or on an error alike.
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        };
        tokio::select! {
            _ = stdin_closed => {}
            _ = tokio::time::sleep(limit) => {}
        }
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(stop)
        .await
        .context("serving")
}

/// Reads the body (so the connection stays reusable, as API Gateway's does) and counts.
async fn count_post(
    State(counts): State<Arc<Counts>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if !counts.latency.is_zero() {
        tokio::time::sleep(counts.latency).await;
    }
    if counts.failing.contains(&id) {
        counts.failed.fetch_add(1, Ordering::Relaxed);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("x-amzn-ErrorType", "InternalServerErrorException")],
            r#"{"message":"Internal server error"}"#,
        )
            .into_response();
    }
    let admitted = counts
        .throttle
        .as_ref()
        .is_none_or(|bucket| bucket.lock().unwrap_or_else(PoisonError::into_inner).take());
    if !admitted {
        counts.throttled.fetch_add(1, Ordering::Relaxed);
        // What API Gateway answers over the quota; the SDK reads the error type header.
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("x-amzn-ErrorType", "LimitExceededException")],
            r#"{"message":"Rate exceeded"}"#,
        )
            .into_response();
    }
    counts.posts.fetch_add(1, Ordering::Relaxed);
    if let Some(frames) = &counts.frames {
        record_frames(frames, &id, &body);
    }
    *counts.per_id().entry(id).or_insert(0) += 1;
    StatusCode::OK.into_response()
}

/// Notes the `publicMessage` frames of one POST (a frame, or a batch of them).
fn record_frames(frames: &Mutex<Frames>, id: &str, body: &[u8]) {
    let now = chat_shared::now_ms();
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    let inner = match value.get("batch").and_then(|b| b.as_array()) {
        Some(list) => list.clone(),
        None => vec![value],
    };
    let group = id.chars().next().unwrap_or('?');
    let mut f = frames.lock().unwrap_or_else(PoisonError::into_inner);
    *f.posts.entry(group).or_insert(0) += 1;
    let mut got = Vec::new();
    for frame in &inner {
        if frame.get("publicMessage").is_none() {
            continue;
        }
        if let (Some(seq), Some(ts)) = (frame["id"].as_u64(), frame["ts"].as_i64()) {
            got.push((seq, now - ts));
        }
    }
    let ids = f.per_id.entry(id.to_owned()).or_default();
    let mut first = Vec::new();
    for (seq, latency) in got {
        if !ids.contains(&seq) {
            first.push(latency);
        }
        ids.push(seq);
    }
    if !first.is_empty() {
        f.latencies.entry(group).or_default().extend(first);
        f.last_arrival.insert(group, now);
    }
}

async fn frames(State(counts): State<Arc<Counts>>) -> String {
    let Some(frames) = &counts.frames else {
        return "{}".to_owned();
    };
    let f = frames.lock().unwrap_or_else(PoisonError::into_inner);
    let mut groups: std::collections::BTreeMap<String, FrameGroup> = Default::default();
    for (id, ids) in &f.per_id {
        let key = id.chars().next().unwrap_or('?');
        let g = groups.entry(key.to_string()).or_insert_with(|| FrameGroup {
            min_per_member: u64::MAX,
            ..FrameGroup::default()
        });
        g.members += 1;
        g.frames += ids.len() as u64;
        let mut seen = std::collections::HashSet::new();
        let mut highest = 0;
        for &seq in ids {
            if !seen.insert(seq) {
                g.duplicates += 1;
                continue;
            }
            if seq < highest {
                g.out_of_order += 1;
            }
            highest = highest.max(seq);
        }
        g.distinct += seen.len() as u64;
        g.min_per_member = g.min_per_member.min(seen.len() as u64);
    }
    for (key, g) in &mut groups {
        let c = key.chars().next().unwrap_or('?');
        g.posts = f.posts.get(&c).copied().unwrap_or(0);
        g.last_arrival_ms = f.last_arrival.get(&c).copied().unwrap_or(0);
        let mut l = f.latencies.get(&c).cloned().unwrap_or_default();
        l.sort_unstable();
        let at = |q: f64| {
            l.get(((l.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        g.latency_p50_ms = at(0.5);
        g.latency_p99_ms = at(0.99);
        g.latency_max_ms = l.last().copied().unwrap_or(0);
    }
    serde_json::to_string(&groups).unwrap_or_default()
}

async fn stats(State(counts): State<Arc<Counts>>) -> String {
    let per_id = counts.per_id();
    let stats = SinkStats {
        posts: counts.posts.load(Ordering::Relaxed),
        distinct: per_id.len() as u64,
        max_per_id: per_id.values().copied().max().unwrap_or(0),
        // This request's own connection is not the fan-out's.
        connections: counts.connections.load(Ordering::Relaxed).saturating_sub(1),
        throttled: counts.throttled.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
    };
    serde_json::to_string(&stats).unwrap_or_default()
}

async fn reset(State(counts): State<Arc<Counts>>) -> StatusCode {
    let mut per_id = counts.per_id();
    per_id.clear();
    counts.posts.store(0, Ordering::Relaxed);
    counts.throttled.store(0, Ordering::Relaxed);
    counts.failed.store(0, Ordering::Relaxed);
    // This request's own connection was accepted before: it is forgotten with the rest.
    counts.connections.store(0, Ordering::Relaxed);
    StatusCode::NO_CONTENT
}

/// A sink running as a child process.
pub struct SinkProcess {
    child: Child,
    /// `http://127.0.0.1:PORT/{stage}`.
    pub endpoint: String,
}

impl SinkProcess {
    /// Starts `exe sink --port 0 --latency-ms … --throttle-rps …` and reads its endpoint.
    pub async fn spawn(
        exe: &Path,
        latency_ms: u64,
        throttle_rps: u64,
        fail_ids: &[String],
    ) -> anyhow::Result<SinkProcess> {
        Self::spawn_with(exe, latency_ms, throttle_rps, fail_ids, false).await
    }

    /// [`SinkProcess::spawn`], recording frames (`--record-frames`) when asked.
    pub async fn spawn_with(
        exe: &Path,
        latency_ms: u64,
        throttle_rps: u64,
        fail_ids: &[String],
        record_frames: bool,
    ) -> anyhow::Result<SinkProcess> {
        let mut command = Command::new(exe);
        command
            .args(["sink", "--port", "0"])
            .args(["--latency-ms", &latency_ms.to_string()])
            .args(["--throttle-rps", &throttle_rps.to_string()]);
        if record_frames {
            command.arg("--record-frames");
        }
        if !fail_ids.is_empty() {
            command.args(["--fail-ids", &fail_ids.join(",")]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting the sink {}", exe.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("the sink's stdout is not piped"))?;
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .context("the sink did not print its endpoint in 30 s")?
        .context("reading the sink's endpoint")?;
        let endpoint = line.trim().to_owned();
        if !endpoint.starts_with("http://") {
            bail!("the sink printed {endpoint:?} instead of its endpoint");
        }
        Ok(SinkProcess { child, endpoint })
    }

    /// What `--record-frames` recorded, by the first letter of the connection ids.
    pub async fn frames(&self) -> anyhow::Result<std::collections::BTreeMap<String, FrameGroup>> {
        let body = self.request_path("GET", "/frames").await?;
        serde_json::from_str(&body).with_context(|| format!("the sink's frames {body:?}"))
    }

    pub async fn stats(&self) -> anyhow::Result<SinkStats> {
        let body = self.request("GET").await?;
        serde_json::from_str(&body).with_context(|| format!("the sink's stats {body:?}"))
    }

    pub async fn reset(&self) -> anyhow::Result<()> {
        self.request("DELETE").await.map(drop)
    }

    /// One HTTP/1.0 request to `/stats`, by hand: the bench needs no HTTP client for this.
    async fn request(&self, method: &str) -> anyhow::Result<String> {
        self.request_path(method, "/stats").await
    }

    async fn request_path(&self, method: &str, path: &str) -> anyhow::Result<String> {
        let authority = self
            .endpoint
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let exchange = async {
            let mut stream = TcpStream::connect(&authority).await?;
            stream
                .write_all(
                    format!("{method} {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes(),
                )
                .await?;
            let mut response = String::new();
            stream.read_to_string(&mut response).await?;
            Ok::<_, std::io::Error>(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .context("the sink did not answer in 10 s")?
            .context("asking the sink")?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("the sink's answer is not HTTP: {response:?}"))?;
        if !(head.starts_with("HTTP/1.0 2") || head.starts_with("HTTP/1.1 2")) {
            bail!("the sink answered {head:?}");
        }
        Ok(body.to_owned())
    }

    /// Closes its stdin so it exits; kills it if it has not within a few seconds.
    pub async fn stop(mut self) {
        drop(self.child.stdin.take());
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
