//! The benchmark's WebSocket clients, as the measuring process sees them: blocks of up to
//! [`CLIENTS_PER_AGENT`] clients, each block held by an agent process ([`crate::agent`]),
//! each agent on its own source address (127.0.0.2, 127.0.0.3, …, so no address runs short of
//! ephemeral ports). Every frame a client receives is reported here with its receipt time.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::agent::client_name;
use crate::sys::mono_ns;

/// Clients per agent process (and per source address): a few thousand descriptors each,
/// well under any `RLIMIT_NOFILE` and any ephemeral port range.
pub const CLIENTS_PER_AGENT: usize = 5000;

/// How often waits look at the counters. Only waits poll: every figure reported comes from
/// the receipt times the clients recorded, never from when a poll noticed.
const POLL: Duration = Duration::from_millis(5);

/// How long an agent may take to acknowledge a command (connecting thousands included).
const ACK_TIMEOUT: Duration = Duration::from_secs(300);

/// One received `publicMessage` frame.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The frame's `publicMessage` text (`"name: message"`).
    pub text: Arc<str>,
    /// The frame's event id (`None` for the frames the benchmark posts itself, id 0).
    pub id: Option<u64>,
    /// The frame's room (`None` if it had none).
    pub room: Option<Arc<str>>,
    /// `CLOCK_MONOTONIC` ns ([`mono_ns`]).
    pub at_ns: u64,
}

/// What one client received.
#[derive(Debug, Default)]
pub struct ClientLog {
    pub receipts: Vec<Receipt>,
    /// `error` frames (refused requests), as received.
    pub errors: Vec<String>,
}

/// One client.
#[derive(Debug, Clone)]
pub struct Client {
    pub name: String,
    /// Its connection id, once it has joined (read from the store).
    pub connection_id: Option<String>,
    pub live: bool,
}

/// What the agents' readers update.
#[derive(Debug, Default)]
struct State {
    logs: Vec<ClientLog>,
    /// Receipts per `publicMessage` text.
    tally: HashMap<Arc<str>, u32>,
    /// The last frame any client received (mono ns).
    last_frame_ns: u64,
    error_frames: u64,
}

enum Ack {
    Ready,
    Sent(u64),
    Done,
}

struct Agent {
    first: usize,
    child: Child,
    stdin: ChildStdin,
    acks: mpsc::UnboundedReceiver<Result<Ack, String>>,
    reader: JoinHandle<()>,
}

impl Agent {
    async fn command(&mut self, command: &Value) -> anyhow::Result<Ack> {
        let mut line = command.to_string();
        line.push('\n');
        self.stdin
            .write_all(line.as_bytes())
            .await
            .context("writing to a client agent")?;
        self.stdin
            .flush()
            .await
            .context("writing to a client agent")?;
        self.ack().await
    }

    async fn ack(&mut self) -> anyhow::Result<Ack> {
        match tokio::time::timeout(ACK_TIMEOUT, self.acks.recv()).await {
            Err(_) => bail!("a client agent did not answer in {ACK_TIMEOUT:?}"),
            Ok(None) => bail!("a client agent exited"),
            Ok(Some(Err(why))) => bail!("a client agent failed: {why}"),
            Ok(Some(Ok(ack))) => Ok(ack),
        }
    }
}

/// `count` clients of one server.
pub struct Swarm {
    pub clients: Vec<Client>,
    agents: Vec<Agent>,
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Readers only append and count under the lock; a panic cannot leave it half-done.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The source address of agent `k`: 127.0.0.2, 127.0.0.3, … (127.0.0.1 is left to the
/// `@connections` clients).
pub fn source_addr(agent: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 0, 0, 2)) + agent as u32)
}

impl Swarm {
    /// Starts agents (`exe clients …`) holding `count` clients of `websocket_url`, served at
    /// `server`, and waits until every client is connected.
    pub async fn connect(
        exe: &Path,
        websocket_url: &str,
        server: SocketAddr,
        count: usize,
    ) -> anyhow::Result<Swarm> {
        let state = Arc::new(Mutex::new(State {
            logs: (0..count).map(|_| ClientLog::default()).collect(),
            ..State::default()
        }));
        let mut agents = Vec::new();
        for (k, first) in (0..count).step_by(CLIENTS_PER_AGENT).enumerate() {
            let block = CLIENTS_PER_AGENT.min(count - first);
            let mut child = Command::new(exe)
                .arg("clients")
                .args(["--url", websocket_url])
                .args(["--server", &server.to_string()])
                .args(["--source", &source_addr(k).to_string()])
                .args(["--first", &first.to_string()])
                .args(["--count", &block.to_string()])
                .args(["--total", &count.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting a client agent {}", exe.display()))?;
            let stdin = child
                .stdin
                .take()
                .ok_or_else(|| anyhow!("an agent's stdin is not piped"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("an agent's stdout is not piped"))?;
            let (ack_tx, acks) = mpsc::unbounded_channel();
            let reader = tokio::spawn(read_events(stdout, Arc::clone(&state), ack_tx));
            agents.push(Agent {
                first,
                child,
                stdin,
                acks,
                reader,
            });
        }
        let mut swarm = Swarm {
            clients: (0..count)
                .map(|i| Client {
                    name: client_name(i, count),
                    connection_id: None,
                    live: true,
                })
                .collect(),
            agents,
            state,
        };
        for agent in &mut swarm.agents {
            match agent.ack().await? {
                Ack::Ready => {}
                _ => bail!("a client agent answered out of turn"),
            }
        }
        Ok(swarm)
    }

    fn agent(&mut self, client: usize) -> anyhow::Result<&mut Agent> {
        let k = client / CLIENTS_PER_AGENT;
        self.agents
            .get_mut(k)
            .filter(|a| a.first <= client)
            .ok_or_else(|| anyhow!("no agent holds client {client}"))
    }

    /// Every client sends `setName` with its own name.
    pub async fn send_joins(&mut self) -> anyhow::Result<()> {
        for agent in &mut self.agents {
            agent.command(&json!(["join"])).await?;
        }
        Ok(())
    }

    /// Client `client` sends `frame`; returns when it did ([`mono_ns`]).
    pub async fn send(&mut self, client: usize, frame: &Value) -> anyhow::Result<u64> {
        let agent = self.agent(client)?;
        match agent
            .command(&json!(["send", client, frame.to_string()]))
            .await?
        {
            Ack::Sent(at) => Ok(at),
            _ => bail!("a client agent answered out of turn"),
        }
    }

    /// Makes clients vanish as a phone losing its network would: each socket is dropped
    /// without a close frame, so the server only sees the TCP connection end.
    pub async fn vanish(&mut self, clients: &[usize]) -> anyhow::Result<()> {
        let mut by_agent: HashMap<usize, Vec<usize>> = HashMap::new();
        for &c in clients {
            by_agent.entry(c / CLIENTS_PER_AGENT).or_default().push(c);
        }
        for (k, list) in by_agent {
            let agent = self
                .agents
                .get_mut(k)
                .ok_or_else(|| anyhow!("no agent {k}"))?;
            agent.command(&json!(["vanish", list])).await?;
            for c in list {
                if let Some(client) = self.clients.get_mut(c) {
                    client.live = false;
                }
            }
        }
        Ok(())
    }

    pub fn live(&self) -> impl Iterator<Item = (usize, &Client)> {
        self.clients.iter().enumerate().filter(|(_, c)| c.live)
    }

    pub fn live_count(&self) -> usize {
        self.live().count()
    }

    /// How many receipts of a `publicMessage` frame with this text there have been.
    pub fn tally(&self, text: &str) -> u32 {
        lock(&self.state).tally.get(text).copied().unwrap_or(0)
    }

    pub fn error_frames(&self) -> u64 {
        lock(&self.state).error_frames
    }

    /// Runs `f` over every client's log (indexed like `clients`).
    pub fn with_logs<R>(&self, f: impl FnOnce(&[ClientLog]) -> R) -> R {
        f(&lock(&self.state).logs)
    }

    /// Waits until `expected` receipts of `text` have been counted; false on timeout.
    pub async fn wait_for(&self, text: &str, expected: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.tally(text) as usize >= expected {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until no client has received a frame for `quiet`; false on timeout.
    pub async fn wait_quiet(&self, quiet: Duration, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let last = lock(&self.state).last_frame_ns;
            let since = Duration::from_nanos(mono_ns().saturating_sub(last));
            if since >= quiet {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL.max(quiet - since)).await;
        }
    }

    /// Closes every live client properly (close frame) and ends the agents.
    pub async fn close(mut self) {
        for agent in &mut self.agents {
            // An agent that cannot be told is killed below.
            let _ = agent.command(&json!(["close"])).await;
        }
        for agent in &mut self.agents {
            if tokio::time::timeout(Duration::from_secs(10), agent.child.wait())
                .await
                .is_err()
            {
                let _ = agent.child.kill().await;
            }
            agent.reader.abort();
        }
    }
}

/// Reads an agent's events into the shared state, and its acknowledgements into `acks`.
async fn read_events(
    stdout: tokio::process::ChildStdout,
    state: Arc<Mutex<State>>,
    acks: mpsc::UnboundedSender<Result<Ack, String>>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(event) = serde_json::from_str::<Vec<Value>>(&line) else {
            let _ = acks.send(Err(format!("unreadable event {line:?}")));
            return;
        };
        let client = event.get(1).and_then(Value::as_u64).map(|c| c as usize);
        let at = event.get(2).and_then(Value::as_u64).unwrap_or(0);
        match (event.first().and_then(Value::as_str), client) {
            (Some("r"), Some(client)) => {
                let id = event.get(3).and_then(Value::as_u64).filter(|id| *id > 0);
                let text: Arc<str> = event
                    .get(4)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into();
                let room: Option<Arc<str>> = event
                    .get(5)
                    .and_then(Value::as_str)
                    .filter(|r| !r.is_empty())
                    .map(Into::into);
                let mut s = lock(&state);
                s.last_frame_ns = s.last_frame_ns.max(at);
                *s.tally.entry(Arc::clone(&text)).or_insert(0) += 1;
                if let Some(log) = s.logs.get_mut(client) {
                    log.receipts.push(Receipt {
                        text,
                        id,
                        room,
                        at_ns: at,
                    });
                }
            }
            (Some("o"), Some(_)) => {
                let mut s = lock(&state);
                s.last_frame_ns = s.last_frame_ns.max(at);
            }
            (Some("e"), Some(client)) => {
                let error = event
                    .get(3)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let mut s = lock(&state);
                s.last_frame_ns = s.last_frame_ns.max(at);
                s.error_frames += 1;
                if let Some(log) = s.logs.get_mut(client) {
                    log.errors.push(error);
                }
            }
            (Some("ready"), _) => {
                let _ = acks.send(Ok(Ack::Ready));
            }
            (Some("sent"), Some(_)) => {
                let _ = acks.send(Ok(Ack::Sent(at)));
            }
            (Some("done"), _) => {
                let _ = acks.send(Ok(Ack::Done));
            }
            (Some("fail"), _) => {
                let why = event.get(1).and_then(Value::as_str).unwrap_or_default();
                let _ = acks.send(Err(why.to_owned()));
                return;
            }
            _ => {
                let _ = acks.send(Err(format!("unexpected event {line:?}")));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_agent_has_its_own_source_address() {
        assert_eq!(source_addr(0), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_addr(1), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(source_addr(300), Ipv4Addr::new(127, 0, 1, 46));
    }
}
