//! One WebSocket connection after its `$connect`: reading client frames into `MESSAGE`
//! invocations (in order, one at a time), writing outbound frames, enforcing the size limits,
//! the idle timeout and the maximum duration, closing, and its single `$disconnect`.
//!
//! Three tasks per connection: this reader (which decides when and how the connection ends),
//! a writer draining the outbound queue into the socket (so `@connections` frames keep flowing
//! while an invocation runs), and a dispatcher invoking the integration for each frame.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aws_lambda_events::apigw::ApiGatewayProxyResponse;
use aws_lambda_events::encodings::Body;
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, timeout_at, Instant};
use tokio_tungstenite::tungstenite::error::{Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::events::{self, ConnectionInfo, Inbound};
use super::{Shared, TaskGuard};

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// How long closing may take: flushing queued frames and the close frame, waiting for the
/// client's close frame and for it to drop the TCP connection. A client that does not
/// cooperate is cut off after this.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Client frames read but not yet invoked. When full, reading pauses (TCP backpressure).
const INBOUND_QUEUE: usize = 64;

/// Everything the handshake hands over to the connection task.
pub(super) struct Parts {
    pub shared: Arc<Shared>,
    pub connection: Arc<ConnectionInfo>,
    pub on_upgrade: OnUpgrade,
    pub outbound_tx: mpsc::Sender<Message>,
    pub outbound_rx: mpsc::Receiver<Message>,
    pub delete_rx: oneshot::Receiver<()>,
    pub last_active_ms: Arc<AtomicI64>,
    pub guard: TaskGuard,
}

/// Why a connection ended: its `$disconnect` status code and reason, and the close frame the
/// gateway sends, if any.
#[derive(Debug)]
struct Ending {
    status_code: u16,
    reason: String,
    /// Sent by the gateway; `None` when the client closed or vanished.
    close_frame: Option<CloseFrame>,
    /// The read side failed mid-stream (e.g. the rest of an oversized frame is still unread),
    /// so the closing handshake cannot be read and the socket must linger instead.
    read_failed: bool,
}

impl Ending {
    fn by_gateway(code: CloseCode, reason: &'static str) -> Self {
        Self {
            status_code: code.into(),
            reason: reason.to_owned(),
            close_frame: Some(CloseFrame {
                code,
                reason: reason.into(),
            }),
            read_failed: false,
        }
    }

    fn going_away() -> Self {
        Self::by_gateway(CloseCode::Away, "Going away")
    }

    fn by_client(frame: Option<CloseFrame>) -> Self {
        match frame {
            Some(frame) => Self {
                status_code: frame.code.into(),
                reason: frame.reason.to_string(),
                close_frame: None,
                read_failed: false,
            },
            // 1005: the close frame carried no status code (RFC 6455 section 7.1.5).
            None => Self {
                status_code: CloseCode::Status.into(),
                reason: String::new(),
                close_frame: None,
                read_failed: false,
            },
        }
    }

    /// 1006: the TCP connection ended without a close frame (RFC 6455 section 7.1.5).
    fn dropped() -> Self {
        Self {
            status_code: CloseCode::Abnormal.into(),
            reason: "Connection closed abnormally".to_owned(),
            close_frame: None,
            read_failed: false,
        }
    }

    /// What a read error means for the connection.
    fn from_error(error: &WsError) -> Self {
        let by_gateway = |code, reason| Self {
            read_failed: true,
            ..Self::by_gateway(code, reason)
        };
        match error {
            // Frame over max_frame_size or message over max_message_size: AWS closes with 1009.
            WsError::Capacity(_) => by_gateway(CloseCode::Size, "Message too big"),
            WsError::Utf8(_) => by_gateway(CloseCode::Invalid, "Invalid UTF-8 in text frame"),
            WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Self::dropped(),
            WsError::Protocol(_) => by_gateway(CloseCode::Protocol, "Protocol error"),
            _ => Self::dropped(),
        }
    }
}

/// Bytes each connection reads from its socket at a time (see `run`).
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// Runs the connection until it ends, then unregisters it and invokes `$disconnect`.
pub(super) async fn run(parts: Parts) {
    let Parts {
        shared,
        connection,
        on_upgrade,
        outbound_tx,
        outbound_rx,
        delete_rx,
        last_active_ms,
        // Held until $disconnect has run, so `serve` waits for it.
        guard: _guard,
    } = parts;

    let ending = match on_upgrade.await {
        Ok(upgraded) => {
            // tungstenite zero-fills its read buffer up to `read_buffer_size` on every read,
            // so the default 128 KiB made each connection hold 128 KiB resident (1.3 GB at
            // 10k clients) and memset 128 KiB per frame read. Chat frames are small; a larger
            // frame (up to `max_frame_bytes`) gets its room reserved when its header is read.
            let config = WebSocketConfig::default()
                .read_buffer_size(READ_BUFFER_BYTES)
                .max_frame_size(Some(shared.config.max_frame_bytes))
                .max_message_size(Some(shared.config.max_message_bytes));
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            let io = Io {
                shared: &shared,
                connection: &connection,
                last_active_ms: &last_active_ms,
            };
            io.run(socket, outbound_tx, outbound_rx, delete_rx).await
        }
        Err(error) => {
            tracing::debug!(connection_id = %connection.id, %error, "upgrade failed");
            shared.registry.lock().remove(&connection.id);
            Ending::dropped()
        }
    };

    tracing::info!(
        connection_id = %connection.id,
        status_code = ending.status_code,
        reason = %ending.reason,
        "disconnected"
    );
    let lived = events::now_ms() - connection.connected_at_ms;
    shared
        .meter
        .connection_closed(std::time::Duration::from_millis(
            u64::try_from(lived).unwrap_or(0),
        ));
    if shared.config.drop_disconnect {
        return;
    }
    let event = events::disconnect(
        &shared.config,
        &connection,
        ending.status_code,
        &ending.reason,
    );
    if let Err(error) = shared.invoke(event).await {
        tracing::warn!(connection_id = %connection.id, %error, "$disconnect integration failed");
    }
}

struct Io<'a> {
    shared: &'a Arc<Shared>,
    connection: &'a Arc<ConnectionInfo>,
    last_active_ms: &'a AtomicI64,
}

impl Io<'_> {
    /// Serves the open socket; returns once it is closed, unregistered, and every frame read
    /// before the close has been invoked.
    async fn run(
        &self,
        socket: Socket,
        outbound_tx: mpsc::Sender<Message>,
        outbound_rx: mpsc::Receiver<Message>,
        delete_rx: oneshot::Receiver<()>,
    ) -> Ending {
        let (sink, mut stream) = socket.split();
        let (stop_tx, stop_rx) = oneshot::channel();
        let writer = tokio::spawn(write_loop(sink, outbound_rx, stop_rx));
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let dispatcher = tokio::spawn(dispatch_loop(
            Arc::clone(self.shared),
            Arc::clone(self.connection),
            inbound_rx,
            outbound_tx,
        ));

        let ending = self.read_loop(&mut stream, inbound_tx, delete_rx).await;

        // Unregistered before the close completes: from here on @connections answers 410.
        self.shared.registry.lock().remove(&self.connection.id);
        let deadline = Instant::now() + CLOSE_TIMEOUT;
        let client_vanished =
            ending.close_frame.is_none() && ending.status_code == u16::from(CloseCode::Abnormal);
        // The writer sends our close frame (if any) after the frames already queued.
        let _ = stop_tx.send(ending.close_frame.clone());
        if !client_vanished && !ending.read_failed {
            // Reading on completes the closing handshake: it flushes tungstenite's reply to a
            // client close, or receives the client's reply to ours. Frames arriving now are
            // dropped, as AWS drops them.
            let _ = timeout_at(deadline, async {
                while let Some(Ok(_)) = stream.next().await {}
            })
            .await;
        }
        match writer.await {
            Ok(sink) if ending.read_failed => {
                if let Ok(mut socket) = stream.reunite(sink) {
                    linger(&mut socket, deadline).await;
                }
            }
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(connection_id = %self.connection.id, %error, "writer task failed");
            }
        }
        // Frames read before the close are still invoked (they reached API Gateway); then the
        // dispatcher ends and $disconnect may run.
        if let Err(error) = dispatcher.await {
            tracing::warn!(connection_id = %self.connection.id, %error, "dispatcher task failed");
        }
        ending
    }

    /// Reads client frames until the connection must end, and says why.
    async fn read_loop(
        &self,
        stream: &mut SplitStream<Socket>,
        inbound_tx: mpsc::Sender<Inbound>,
        mut delete_rx: oneshot::Receiver<()>,
    ) -> Ending {
        let config = &self.shared.config;
        let mut shutdown = self.shared.shutdown.subscribe();
        let max_deadline = Instant::now() + config.max_duration;
        let mut idle_deadline = Instant::now() + config.idle_timeout;
        let id = &self.connection.id;
        loop {
            let frame = tokio::select! {
                biased;
                _ = shutdown.wait_for(|stopping| *stopping) => return Ending::going_away(),
                // DELETE @connections: AWS closes with 1000 and reports "Connection Closed
                // Normally" to $disconnect (seen in API Gateway logs quoted in
                // https://github.com/aws/chalice/issues/2060).
                _ = &mut delete_rx => {
                    return Ending::by_gateway(CloseCode::Normal, "Connection Closed Normally");
                }
                () = sleep_until(max_deadline) => return Ending::going_away(),
                () = sleep_until(idle_deadline) => return Ending::going_away(),
                frame = stream.next() => frame,
            };
            let inbound = match frame {
                Some(Ok(Message::Text(text))) => {
                    tracing::debug!(connection_id = %id, body = %text, "text frame");
                    Inbound::text(config, text.to_string())
                }
                Some(Ok(Message::Binary(data))) => {
                    tracing::debug!(connection_id = %id, bytes = data.len(), "binary frame");
                    Inbound::binary(&data)
                }
                // tungstenite answers pings itself. Control frames are not activity: AWS's
                // idle timeout counts messages from the client only.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(frame))) => return Ending::by_client(frame),
                Some(Err(error)) => {
                    tracing::debug!(connection_id = %id, %error, "read failed");
                    return Ending::from_error(&error);
                }
                None => return Ending::dropped(),
            };
            idle_deadline = Instant::now() + config.idle_timeout;
            self.last_active_ms
                .store(events::now_ms(), Ordering::Relaxed);
            if inbound_tx.send(inbound).await.is_err() {
                // The dispatcher died (it only ends when this sender is dropped): nothing can
                // handle the frames any more.
                return Ending::by_gateway(CloseCode::Error, "Internal server error");
            }
        }
    }
}

/// Writes outbound frames until told to stop; then writes the frames already queued and the
/// close frame, if any, and hands the sink back.
async fn write_loop(
    mut sink: SplitSink<Socket, Message>,
    mut outbound: mpsc::Receiver<Message>,
    mut stop: oneshot::Receiver<Option<CloseFrame>>,
) -> SplitSink<Socket, Message> {
    let mut open = true;
    let close_frame = loop {
        tokio::select! {
            biased;
            stop = &mut stop => break stop.ok().flatten(),
            frame = outbound.recv(), if open => match frame {
                Some(frame) => {
                    if let Err(error) = sink.send(frame).await {
                        tracing::debug!(%error, "write failed");
                        open = false;
                    }
                }
                None => open = false,
            },
        }
    };
    if let Some(close_frame) = close_frame {
        let _ = timeout_at(Instant::now() + CLOSE_TIMEOUT, async {
            while let Ok(frame) = outbound.try_recv() {
                if sink.feed(frame).await.is_err() {
                    return;
                }
            }
            if let Err(error) = sink.send(Message::Close(Some(close_frame))).await {
                tracing::debug!(%error, "close frame not sent");
            }
        })
        .await;
    }
    sink
}

/// Closes our side of the TCP connection and reads until the client closes its side, so the
/// close frame is not lost to a reset (which unread input would cause, e.g. the rest of an
/// oversized frame).
async fn linger(socket: &mut Socket, deadline: Instant) {
    let io = socket.get_mut();
    let _ = timeout_at(deadline, async {
        let _ = io.shutdown().await;
        let mut discard = [0_u8; 8192];
        while let Ok(1..) = io.read(&mut discard).await {}
    })
    .await;
}

/// Invokes the integration for each frame, in order, one at a time, and sends route responses
/// back to the caller.
async fn dispatch_loop(
    shared: Arc<Shared>,
    connection: Arc<ConnectionInfo>,
    mut inbound: mpsc::Receiver<Inbound>,
    outbound: mpsc::Sender<Message>,
) {
    while let Some(frame) = inbound.recv().await {
        let event = events::message(&shared.config, &connection, &frame);
        let request_id = event.request_context.request_id.clone().unwrap_or_default();
        if !shared.admit_request() {
            // Over the account's request rate: API Gateway answers 429 Too Many Requests and
            // the integration never runs.
            let body = serde_json::json!({
                "message": "Too Many Requests",
                "connectionId": connection.id,
                "requestId": request_id,
            });
            let _ = outbound.send(Message::text(body.to_string())).await;
            continue;
        }
        shared.meter.message(frame.body.len());
        let reply = match shared.invoke(event).await {
            Ok(response) => route_response(response),
            Err(error) => {
                tracing::warn!(
                    connection_id = %connection.id,
                    route_key = %frame.route_key,
                    %error,
                    "integration failed"
                );
                // What API Gateway sends the caller when the integration fails.
                let body = serde_json::json!({
                    "message": "Internal server error",
                    "connectionId": connection.id,
                    "requestId": request_id,
                });
                Some(Message::text(body.to_string()))
            }
        };
        if let Some(reply) = reply {
            // Fails only once the connection is closing; the caller is gone then.
            let _ = outbound.send(reply).await;
        }
    }
}

/// The route response: the integration's non-empty body, to the caller only.
fn route_response(response: ApiGatewayProxyResponse) -> Option<Message> {
    match response.body? {
        Body::Text(text) if !text.is_empty() => Some(Message::text(text)),
        Body::Binary(data) if !data.is_empty() => Some(Message::binary(data)),
        _ => None,
    }
}
