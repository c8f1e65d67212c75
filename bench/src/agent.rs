//! `chat-bench clients` (hidden): a process holding a block of the benchmark's WebSocket
//! clients, driven by the measuring process over its stdin and stdout.
//!
//! Why a separate process: each client is a socket at both ends, and a process may hold only
//! `RLIMIT_NOFILE` descriptors, whose hard limit an unprivileged process (or a sandbox) cannot
//! raise. Keeping the client ends out of the measuring process leaves it the gateway's ends and
//! its own `@connections` connections, as a deployed stack would have.
//!
//! Receipt times are `CLOCK_MONOTONIC`, which every process on the machine shares, so the
//! measuring process can subtract its own send times from them.
//!
//! The line protocol, one JSON array per line:
//! - commands (stdin): `["join"]`, `["send", client, "frame"]`, `["vanish", [clients]]`,
//!   `["close"]`;
//! - events (stdout): `["ready", count]`, `["r", client, at_ns, id, "publicMessage text",
//!   "room"]`,
//!   `["o", client, at_ns]` (any other frame), `["e", client, at_ns, "error"]`,
//!   `["sent", client, at_ns]`, `["done", "command"]`, `["fail", "why"]`.
//!
//! Clients are numbered globally (the measuring process's index); the agent holds
//! `first..first + count`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::sys::mono_ns;

/// WebSocket handshakes in flight at once while connecting: enough to connect thousands of
/// clients in seconds, few enough not to overflow the listener's accept backlog.
const CONNECT_PARALLELISM: usize = 64;

type Ws = WebSocketStream<TcpStream>;

#[derive(Debug, Clone, clap::Args)]
pub struct AgentOptions {
    /// `ws://host:port/{stage}`.
    #[arg(long)]
    pub url: String,
    /// The gateway's socket address.
    #[arg(long)]
    pub server: SocketAddr,
    /// Source address of every client of this agent.
    #[arg(long)]
    pub source: Ipv4Addr,
    /// Global index of the first client.
    #[arg(long)]
    pub first: usize,
    /// Clients held by this agent.
    #[arg(long)]
    pub count: usize,
    /// Clients in the whole run (names are as wide as its largest index).
    #[arg(long)]
    pub total: usize,
    /// Exits by itself after this long, whatever happens to its parent.
    #[arg(long, default_value_t = 3600)]
    pub max_secs: u64,
}

/// `u00001`, `u00002`, …: unique, valid chat names, wide enough for `count`.
pub fn client_name(index: usize, count: usize) -> String {
    let width = count.to_string().len().max(5);
    format!("u{:0width$}", index + 1)
}

struct Held {
    sink: Option<SplitSink<Ws, Message>>,
    reader: JoinHandle<()>,
}

/// Runs the agent until `["close"]`, stdin's end, or `max_secs`.
pub async fn run(opts: &AgentOptions) -> anyhow::Result<()> {
    let (events, outgoing) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(write_events(outgoing));
    let limit = Duration::from_secs(opts.max_secs);
    let result = match tokio::time::timeout(limit, serve(opts, events.clone())).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("stopped after --max-secs {}", opts.max_secs)),
    };
    if let Err(e) = &result {
        let _ = events.send(json!(["fail", format!("{e:#}")]).to_string());
    }
    drop(events);
    // The writer ends once every sender (the readers') is gone; bounded all the same.
    let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    result
}

async fn serve(opts: &AgentOptions, events: mpsc::UnboundedSender<String>) -> anyhow::Result<()> {
    let mut held = connect_all(opts, &events).await?;
    let _ = events.send(json!(["ready", held.len()]).to_string());
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await.context("reading a command")? {
        let command: Vec<Value> =
            serde_json::from_str(&line).with_context(|| format!("command {line:?}"))?;
        match command.first().and_then(Value::as_str) {
            Some("join") => {
                for (i, h) in held.iter_mut().enumerate() {
                    let name = client_name(opts.first + i, opts.total);
                    let frame = json!({"action": "setName", "name": name}).to_string();
                    send(h, &frame).await?;
                }
                let _ = events.send(json!(["done", "join"]).to_string());
            }
            Some("send") => {
                let (index, frame) = match (
                    command.get(1).and_then(Value::as_u64),
                    command.get(2).and_then(Value::as_str),
                ) {
                    (Some(i), Some(f)) => (i as usize, f),
                    _ => bail!("malformed send {line:?}"),
                };
                let h = local(&mut held, opts.first, index)?;
                let at = mono_ns();
                send(h, frame).await?;
                let _ = events.send(json!(["sent", index, at]).to_string());
            }
            Some("vanish") => {
                let indices: Vec<usize> = command
                    .get(1)
                    .and_then(|v| serde_json::from_value(v.clone()).ok())
                    .ok_or_else(|| anyhow!("malformed vanish {line:?}"))?;
                for index in indices {
                    let h = local(&mut held, opts.first, index)?;
                    // Gone as a phone losing its network: no close frame, the socket just ends.
                    h.reader.abort();
                    h.sink = None;
                }
                let _ = events.send(json!(["done", "vanish"]).to_string());
            }
            Some("close") => break,
            _ => bail!("unknown command {line:?}"),
        }
    }
    for h in &mut held {
        if let Some(mut sink) = h.sink.take() {
            let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
        }
        h.reader.abort();
    }
    let _ = events.send(json!(["done", "close"]).to_string());
    Ok(())
}

fn local(held: &mut [Held], first: usize, index: usize) -> anyhow::Result<&mut Held> {
    index
        .checked_sub(first)
        .and_then(|i| held.get_mut(i))
        .ok_or_else(|| anyhow!("client {index} is not held by this agent"))
}

async fn send(h: &mut Held, frame: &str) -> anyhow::Result<()> {
    let sink = h
        .sink
        .as_mut()
        .ok_or_else(|| anyhow!("the client has vanished"))?;
    sink.send(Message::text(frame)).await.context("sending")
}

async fn connect_all(
    opts: &AgentOptions,
    events: &mpsc::UnboundedSender<String>,
) -> anyhow::Result<Vec<Held>> {
    let connected: Vec<anyhow::Result<Held>> =
        futures::stream::iter(opts.first..opts.first + opts.count)
            .map(|index| connect_one(opts, index, events.clone()))
            .buffered(CONNECT_PARALLELISM)
            .collect()
            .await;
    connected.into_iter().collect()
}

async fn connect_one(
    opts: &AgentOptions,
    index: usize,
    events: mpsc::UnboundedSender<String>,
) -> anyhow::Result<Held> {
    let socket = TcpSocket::new_v4().context("creating a socket")?;
    socket
        .bind(SocketAddr::V4(SocketAddrV4::new(opts.source, 0)))
        .with_context(|| format!("binding a client socket to {}", opts.source))?;
    let stream = socket
        .connect(opts.server)
        .await
        .with_context(|| format!("client {index} connecting to {}", opts.server))?;
    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
    // Small buffers: the frames are small, and thousands of clients with the default 128 KiB
    // each would cost more memory than everything they measure.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0);
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(opts.url.as_str(), stream, Some(config))
            .await
            .with_context(|| format!("client {index}'s WebSocket handshake"))?;
    if response.status().as_u16() != 101 {
        bail!("client {index}'s handshake answered {}", response.status());
    }
    let (sink, stream) = ws.split();
    let reader = tokio::spawn(read_loop(index, stream, events));
    Ok(Held {
        sink: Some(sink),
        reader,
    })
}

/// The keys of a server frame the benchmark looks at; the rest are ignored.
#[derive(Deserialize)]
struct Frame {
    #[serde(rename = "publicMessage")]
    public_message: Option<String>,
    id: Option<u64>,
    room: Option<String>,
    error: Option<Value>,
}

async fn read_loop(
    index: usize,
    mut stream: SplitStream<Ws>,
    events: mpsc::UnboundedSender<String>,
) {
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let at = mono_ns();
        // A `members` frame lists every name and nothing here needs it: not even parsed.
        let frame = if text.as_str().starts_with("{\"members\"") {
            None
        } else {
            serde_json::from_str::<Frame>(text.as_str()).ok()
        };
        let event = match frame {
            Some(Frame {
                error: Some(error), ..
            }) => json!(["e", index, at, error.to_string()]),
            Some(Frame {
                public_message: Some(public),
                id,
                room,
                ..
            }) => json!([
                "r",
                index,
                at,
                id.unwrap_or(0),
                public,
                room.unwrap_or_default()
            ]),
            _ => json!(["o", index, at]),
        };
        if events.send(event.to_string()).is_err() {
            return;
        }
    }
}

/// Writes events to stdout, flushing whenever no more are waiting.
async fn write_events(mut outgoing: mpsc::UnboundedReceiver<String>) {
    let mut out = BufWriter::new(tokio::io::stdout());
    while let Some(line) = outgoing.recv().await {
        let mut batch = Some(line);
        while let Some(line) = batch {
            if out.write_all(line.as_bytes()).await.is_err() || out.write_all(b"\n").await.is_err()
            {
                return;
            }
            batch = outgoing.try_recv().ok();
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_sort_in_order() {
        assert_eq!(client_name(0, 1000), "u00001");
        assert_eq!(client_name(9999, 10_000), "u10000");
        assert_eq!(client_name(0, 100_000), "u000001");
    }
}
