//! The API Gateway WebSocket emulator, driven from outside: real tokio-tungstenite clients and
//! the real `aws-sdk-apigatewaymanagement` client over loopback sockets, against a recording
//! fake integration.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_lambda_events::apigw::{ApiGatewayProxyResponse, ApiGatewayWebsocketProxyRequest};
use aws_lambda_events::encodings::Body;
use aws_sdk_apigatewaymanagement::config::retry::RetryConfig;
use aws_sdk_apigatewaymanagement::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_apigatewaymanagement::operation::delete_connection::DeleteConnectionError;
use aws_sdk_apigatewaymanagement::operation::get_connection::GetConnectionError;
use aws_sdk_apigatewaymanagement::operation::post_to_connection::PostToConnectionError;
use aws_sdk_apigatewaymanagement::primitives::Blob;
use chat_local::gateway::{BoxError, Gateway, GatewayConfig, Integration};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Event = ApiGatewayWebsocketProxyRequest;
type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Reply = Box<dyn Fn(&Event) -> Result<ApiGatewayProxyResponse, BoxError> + Send + Sync>;

const WAIT: Duration = Duration::from_secs(5);
const USER_AGENT: &str = "gateway-test/1.0";

// ---------------------------------------------------------------------------------------------
// The recording fake integration

/// Records every event and answers with a scripted reply; MESSAGE invocations can be slowed
/// down, and their overlap is measured.
struct Recorder {
    events: Mutex<Vec<Event>>,
    reply: Reply,
    message_delay: Duration,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Set after start: lets a DISCONNECT record how many connections were still registered.
    gateway: OnceLock<Gateway>,
    connections_at_disconnect: Mutex<Vec<usize>>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Self::replying(|_| Ok(status(200)))
    }

    fn replying(
        reply: impl Fn(&Event) -> Result<ApiGatewayProxyResponse, BoxError> + Send + Sync + 'static,
    ) -> Arc<Self> {
        Self::build(Box::new(reply), Duration::ZERO)
    }

    fn build(reply: Reply, message_delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(Vec::new()),
            reply,
            message_delay,
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            gateway: OnceLock::new(),
            connections_at_disconnect: Mutex::new(Vec::new()),
        })
    }

    fn of_type(&self, event_type: &str) -> Vec<Event> {
        self.events
            .lock()
            .expect("events lock")
            .iter()
            .filter(|event| event.request_context.event_type.as_deref() == Some(event_type))
            .cloned()
            .collect()
    }

    /// Waits until `count` events of `event_type` were recorded, and returns them.
    async fn wait_for(&self, event_type: &str, count: usize) -> Vec<Event> {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = self.of_type(event_type);
            if events.len() >= count {
                return events;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {count} {event_type} events, got {}",
                events.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn connection_id(&self) -> String {
        let connects = self.wait_for("CONNECT", 1).await;
        connects
            .last()
            .and_then(|event| event.request_context.connection_id.clone())
            .expect("connection id")
    }
}

#[async_trait::async_trait]
impl Integration for Recorder {
    async fn invoke(&self, request: Event) -> Result<ApiGatewayProxyResponse, BoxError> {
        let event_type = request
            .request_context
            .event_type
            .clone()
            .unwrap_or_default();
        if event_type == "DISCONNECT" {
            if let Some(gateway) = self.gateway.get() {
                self.connections_at_disconnect
                    .lock()
                    .expect("lock")
                    .push(gateway.connection_count());
            }
        }
        if event_type == "MESSAGE" {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(self.message_delay).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        let reply = (self.reply)(&request);
        self.events.lock().expect("events lock").push(request);
        reply
    }
}

fn status(code: i64) -> ApiGatewayProxyResponse {
    let mut response = ApiGatewayProxyResponse::default();
    response.status_code = code;
    response
}

fn with_body(body: &str) -> ApiGatewayProxyResponse {
    let mut response = status(200);
    response.body = Some(Body::Text(body.to_owned()));
    response
}

fn event_type(event: &Event) -> &str {
    event
        .request_context
        .event_type
        .as_deref()
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A running gateway, its clients

struct Running {
    gateway: Gateway,
    port: u16,
    stage: String,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<std::io::Result<()>>,
}

async fn bind() -> (tokio::net::TcpListener, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("local addr").port();
    (listener, port)
}

async fn start(config: GatewayConfig, recorder: &Arc<Recorder>) -> Running {
    let (listener, port) = bind().await;
    let running = serve(
        listener,
        port,
        config,
        Arc::clone(recorder) as Arc<dyn Integration>,
    );
    let _ = recorder.gateway.set(running.gateway.clone());
    running
}

fn serve(
    listener: tokio::net::TcpListener,
    port: u16,
    config: GatewayConfig,
    integration: Arc<dyn Integration>,
) -> Running {
    init_tracing();
    let stage = config.stage.clone();
    let gateway = Gateway::new(config, integration);
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn({
        let gateway = gateway.clone();
        async move {
            gateway
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        }
    });
    Running {
        gateway,
        port,
        stage,
        stop: Some(stop),
        served,
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl Running {
    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/{}", self.port, self.stage)
    }

    async fn connect(&self) -> Ws {
        self.connect_to(&self.url()).await.expect("connect")
    }

    async fn connect_to(&self, url: &str) -> Result<Ws, WsError> {
        let mut request = url.into_client_request().expect("client request");
        request
            .headers_mut()
            .insert("user-agent", USER_AGENT.parse().expect("header"));
        let (ws, _) = tokio_tungstenite::connect_async(request).await?;
        Ok(ws)
    }

    fn management(&self) -> aws_sdk_apigatewaymanagement::Client {
        management_client(self.port, &self.stage)
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.served)
            .await
            .expect("serve returned in time")
            .expect("serve task")
            .expect("serve result");
    }
}

/// The real Management API client, pointed at the emulator.
fn management_client(port: u16, stage: &str) -> aws_sdk_apigatewaymanagement::Client {
    let config = aws_sdk_apigatewaymanagement::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(format!("http://127.0.0.1:{port}/{stage}"))
        // 429 is retryable for the SDK; the tests want to see each answer.
        .retry_config(RetryConfig::disabled())
        .build();
    aws_sdk_apigatewaymanagement::Client::from_conf(config)
}

async fn post(
    client: &aws_sdk_apigatewaymanagement::Client,
    connection_id: &str,
    data: impl Into<Vec<u8>>,
) -> Result<(), PostToConnectionError> {
    client
        .post_to_connection()
        .connection_id(connection_id)
        .data(Blob::new(data))
        .send()
        .await
        .map(|_| ())
        .map_err(|error| error.into_service_error())
}

/// The next data or close message, within [`WAIT`].
async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("the stream is open")
            .expect("a valid message");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

/// The gateway's close frame; then completes the closing handshake as a browser would
/// (tungstenite sends its reply on the next read) and reads until the gateway drops the TCP
/// connection.
async fn expect_close(ws: &mut Ws) -> CloseFrame {
    let frame = match next_message(ws).await {
        Message::Close(Some(frame)) => frame,
        other => panic!("expected a close frame, got {other:?}"),
    };
    let rest =
        tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = ws.next().await {} }).await;
    assert!(rest.is_ok(), "the gateway did not end the connection");
    frame
}

async fn expect_text(ws: &mut Ws) -> String {
    match next_message(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// A marker through the `$disconnect` path: a client connects (with `?marker=1`, so a
/// `$connect` that refuses others can let it in) and closes. Returns its connection id once its
/// `$disconnect` has been recorded — by then a `$disconnect` that something earlier set off
/// would have been recorded too, so "none (or one) so far" means none (or one) at all.
async fn disconnect_marker(running: &Running, recorder: &Recorder) -> String {
    let mut ws = running
        .connect_to(&format!("{}?marker=1", running.url()))
        .await
        .expect("the marker connects");
    let deadline = Instant::now() + WAIT;
    let id = loop {
        let marker = recorder.of_type("CONNECT").into_iter().find_map(|e| {
            (e.query_string_parameters.first("marker") == Some("1"))
                .then_some(e.request_context.connection_id)
                .flatten()
        });
        if let Some(id) = marker {
            break id;
        }
        assert!(Instant::now() < deadline, "the marker's $connect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    ws.close(None).await.expect("close the marker");
    loop {
        let disconnected = recorder
            .of_type("DISCONNECT")
            .iter()
            .any(|e| e.request_context.connection_id.as_deref() == Some(id.as_str()));
        if disconnected {
            return id;
        }
        assert!(Instant::now() < deadline, "the marker's $disconnect");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The connection ids of the `$disconnect`s recorded so far.
fn disconnected_ids(recorder: &Recorder) -> Vec<String> {
    recorder
        .of_type("DISCONNECT")
        .into_iter()
        .filter_map(|e| e.request_context.connection_id)
        .collect()
}

fn text(body: &str) -> Message {
    Message::text(body.to_owned())
}

// ---------------------------------------------------------------------------------------------
// $connect

#[tokio::test]
async fn connect_event_describes_the_upgrade_request() {
    // GIVEN a gateway
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let before = now_ms();

    // WHEN a client connects with a query string and a user agent
    let url = format!("{}?token=abc&room=1&room=2", running.url());
    let _ws = running.connect_to(&url).await.expect("connect");

    // THEN $connect got the handshake's headers, query and an AWS-shaped request context
    let connect = recorder.wait_for("CONNECT", 1).await.remove(0);
    let context = &connect.request_context;
    assert_eq!(context.route_key.as_deref(), Some("$connect"));
    assert_eq!(context.event_type.as_deref(), Some("CONNECT"));
    let id = context.connection_id.clone().expect("connection id");
    assert_aws_id(&id);
    assert!(context.connected_at >= before && context.connected_at <= now_ms());
    assert!(context.request_time_epoch >= context.connected_at);
    assert_request_time(context.request_time.as_deref().expect("request time"));
    assert_aws_id(context.request_id.as_deref().expect("request id"));
    assert_eq!(context.extended_request_id, context.request_id);
    assert_eq!(context.message_direction.as_deref(), Some("IN"));
    assert_eq!(context.stage.as_deref(), Some("prod"));
    let host = format!("127.0.0.1:{}", running.port);
    assert_eq!(context.domain_name.as_deref(), Some(host.as_str()));
    assert_eq!(context.apiid.as_deref(), Some("local"));
    assert_eq!(context.identity.source_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(context.identity.user_agent.as_deref(), Some(USER_AGENT));

    for name in [
        "host",
        "sec-websocket-key",
        "sec-websocket-version",
        "user-agent",
    ] {
        assert!(connect.headers.contains_key(name), "header {name}");
        assert!(
            connect.multi_value_headers.contains_key(name),
            "multi {name}"
        );
    }
    assert_eq!(connect.headers["sec-websocket-version"], "13");
    assert_eq!(connect.headers["host"], host.as_str());
    assert_eq!(connect.query_string_parameters.first("token"), Some("abc"));
    assert_eq!(
        connect.multi_value_query_string_parameters.all("room"),
        Some(vec!["1", "2"])
    );
    assert_eq!(running.gateway.connection_count(), 1);
}

#[tokio::test]
async fn non_2xx_connect_rejects_the_handshake_with_that_status() {
    // GIVEN a $connect that answers 401 with a body
    let recorder = Recorder::replying(|event| match event_type(event) {
        "CONNECT" if event.query_string_parameters.first("marker").is_none() => {
            let mut response = status(401);
            response.body = Some(Body::Text("go away".to_owned()));
            Ok(response)
        }
        _ => Ok(status(200)),
    });
    let running = start(GatewayConfig::default(), &recorder).await;

    // WHEN a client connects
    let result = running.connect_to(&running.url()).await;

    // THEN the handshake fails with HTTP 401, and nothing is open
    match result {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("expected an HTTP 401, got {other:?}"),
    }
    assert_eq!(running.gateway.connection_count(), 0);
    // AND no $disconnect ran for it: after a marker's own $disconnect, the marker's is the
    // only one
    let marker = disconnect_marker(&running, &recorder).await;
    assert_eq!(disconnected_ids(&recorder), [marker]);
}

#[tokio::test]
async fn failing_connect_integration_rejects_the_handshake_with_500() {
    // GIVEN a $connect integration that fails
    let recorder = Recorder::replying(|event| match event_type(event) {
        "CONNECT" => Err("boom".into()),
        _ => Ok(status(200)),
    });
    let running = start(GatewayConfig::default(), &recorder).await;

    // WHEN a client connects THEN it sees HTTP 500
    match running.connect_to(&running.url()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 500),
        other => panic!("expected an HTTP 500, got {other:?}"),
    }
    assert_eq!(running.gateway.connection_count(), 0);
}

#[tokio::test]
async fn connect_can_pick_the_subprotocol() {
    // GIVEN a $connect that picks the subprotocol, as AWS requires when a client asks for one
    let recorder = Recorder::replying(|event| {
        let mut response = status(200);
        if let Some(asked) = event.headers.get("sec-websocket-protocol") {
            response
                .headers
                .insert("sec-websocket-protocol", asked.clone());
        }
        Ok(response)
    });
    let running = start(GatewayConfig::default(), &recorder).await;

    // WHEN a client asks for subprotocol "chat"
    let mut request = running.url().into_client_request().expect("client request");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "chat".parse().expect("header"));
    let (_ws, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");

    // THEN the handshake completes with that subprotocol
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");
}

#[tokio::test]
async fn plain_http_get_is_refused_without_invoking_connect() {
    // GIVEN a gateway
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;

    // WHEN a plain HTTP GET (no upgrade) reaches the WebSocket endpoint
    let mut socket = TcpStream::connect(("127.0.0.1", running.port))
        .await
        .expect("connect");
    socket
        .write_all(b"GET /prod HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = String::new();
    tokio::time::timeout(WAIT, socket.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");

    // THEN it is answered 426 Upgrade Required, and $connect never ran
    assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
    assert!(recorder.of_type("CONNECT").is_empty());
}

/// A $connect handler that posts to the connection being opened, as a careless backend would.
struct PostsDuringConnect {
    client: aws_sdk_apigatewaymanagement::Client,
    outcome: Mutex<Option<Result<(), PostToConnectionError>>>,
    connection_id: Mutex<Option<String>>,
}

#[async_trait::async_trait]
impl Integration for PostsDuringConnect {
    async fn invoke(&self, request: Event) -> Result<ApiGatewayProxyResponse, BoxError> {
        if event_type(&request) == "CONNECT" {
            let id = request.request_context.connection_id.unwrap_or_default();
            let outcome = post(&self.client, &id, "too early").await;
            *self.outcome.lock().expect("lock") = Some(outcome);
            *self.connection_id.lock().expect("lock") = Some(id);
        }
        Ok(status(200))
    }
}

#[tokio::test]
async fn posting_to_a_connection_during_its_connect_is_gone() {
    // GIVEN a $connect integration that posts to its own connection
    let (listener, port) = bind().await;
    let integration = Arc::new(PostsDuringConnect {
        client: management_client(port, "prod"),
        outcome: Mutex::new(None),
        connection_id: Mutex::new(None),
    });
    let running = serve(
        listener,
        port,
        GatewayConfig::default(),
        Arc::clone(&integration) as Arc<dyn Integration>,
    );

    // WHEN a client connects
    let mut ws = running.connect().await;

    // THEN that post was answered 410 Gone, and nothing reached the client
    let outcome = integration.outcome.lock().expect("lock").take();
    assert!(
        matches!(outcome, Some(Err(PostToConnectionError::GoneException(_)))),
        "{outcome:?}"
    );
    // AND nothing reached the client: the first frame it gets is a marker posted through the
    // same @connections path now that it is open
    let id = integration
        .connection_id
        .lock()
        .expect("lock")
        .clone()
        .expect("connection id");
    post(&management_client(port, "prod"), &id, "marker")
        .await
        .expect("post the marker");
    assert_eq!(expect_text(&mut ws).await, "marker");
}

// ---------------------------------------------------------------------------------------------
// MESSAGE

#[tokio::test]
async fn frames_are_routed_on_the_action_key_or_default() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;

    // WHEN it sends each kind of frame
    let frames = [
        (r#"{"action":"setName","name":"alice"}"#, "setName"),
        (r#"{"action":"sendPublic","message":"hi"}"#, "sendPublic"),
        (
            r#"{"action":"sendPrivate","to":"bob","message":"psst"}"#,
            "sendPrivate",
        ),
        (r#"{"action":"dance"}"#, "$default"),
        (r#"{"action":5}"#, "$default"),
        (r#"["setName"]"#, "$default"),
        ("setName", "$default"),
        ("", "$default"),
    ];
    for (body, _) in frames {
        ws.send(text(body)).await.expect("send");
    }
    ws.send(Message::binary(vec![1_u8, 2, 3]))
        .await
        .expect("send binary");

    // THEN each went to its route, with its body; the binary one base64-encoded to $default
    let messages = recorder.wait_for("MESSAGE", frames.len() + 1).await;
    for ((body, route), event) in frames.iter().zip(&messages) {
        assert_eq!(
            event.request_context.route_key.as_deref(),
            Some(*route),
            "{body}"
        );
        assert_eq!(event.body.as_deref(), Some(*body));
        assert!(!event.is_base64_encoded);
    }
    let binary = messages.last().expect("binary event");
    assert_eq!(
        binary.request_context.route_key.as_deref(),
        Some("$default")
    );
    assert_eq!(binary.body.as_deref(), Some("AQID"));
    assert!(binary.is_base64_encoded);
}

#[tokio::test]
async fn message_events_carry_the_request_context() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;
    let connect = recorder.wait_for("CONNECT", 1).await.remove(0);

    // WHEN it sends two frames
    ws.send(text(r#"{"action":"setName","name":"alice"}"#))
        .await
        .expect("send");
    ws.send(text("second")).await.expect("send");

    // THEN both MESSAGE events carry the connection's context, each with its own ids
    let messages = recorder.wait_for("MESSAGE", 2).await;
    let (first, second) = (&messages[0].request_context, &messages[1].request_context);
    for context in [first, second] {
        assert_eq!(context.event_type.as_deref(), Some("MESSAGE"));
        assert_eq!(context.connection_id, connect.request_context.connection_id);
        assert_eq!(context.connected_at, connect.request_context.connected_at);
        assert!(context.request_time_epoch >= context.connected_at);
        assert_request_time(context.request_time.as_deref().expect("request time"));
        assert_aws_id(context.message_id.as_deref().expect("message id"));
        assert_aws_id(context.request_id.as_deref().expect("request id"));
        assert_eq!(context.stage.as_deref(), Some("prod"));
        assert_eq!(context.domain_name, connect.request_context.domain_name);
        assert_eq!(context.apiid.as_deref(), Some("local"));
        assert_eq!(context.message_direction.as_deref(), Some("IN"));
        assert_eq!(context.identity.source_ip.as_deref(), Some("127.0.0.1"));
    }
    assert_ne!(first.message_id, second.message_id);
    assert_ne!(first.request_id, second.request_id);
    assert!(!messages[0].is_base64_encoded);
}

#[tokio::test]
async fn frames_of_a_connection_are_invoked_in_order_one_at_a_time() {
    // GIVEN an integration that takes 30 ms per message
    let recorder = Recorder::build(Box::new(|_| Ok(status(200))), Duration::from_millis(30));
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;

    // WHEN a client sends five frames at once
    for n in 0..5 {
        ws.send(text(&n.to_string())).await.expect("send");
    }

    // THEN they are invoked in the order sent, never two at a time
    let messages = recorder.wait_for("MESSAGE", 5).await;
    let bodies: Vec<_> = messages
        .iter()
        .filter_map(|event| event.body.clone())
        .collect();
    assert_eq!(bodies, ["0", "1", "2", "3", "4"]);
    assert_eq!(recorder.max_in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn route_response_body_goes_back_to_the_caller_only() {
    // GIVEN an integration that answers every message with a body, but not $default
    let recorder = Recorder::replying(|event| match event.request_context.route_key.as_deref() {
        Some("sendPublic") => Ok(with_body(&format!(
            r#"{{"echo":{}}}"#,
            event.body.as_deref().unwrap_or_default()
        ))),
        _ => Ok(with_body("")),
    });
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut caller = running.connect().await;
    let mut other = running.connect().await;
    recorder.wait_for("CONNECT", 2).await;

    // WHEN the caller sends a routed frame and a $default one
    caller
        .send(text(r#"{"action":"sendPublic","message":"hi"}"#))
        .await
        .expect("send");
    caller.send(text("not json")).await.expect("send");

    // THEN only the caller gets the first body back, and an empty body sends nothing
    assert_eq!(
        expect_text(&mut caller).await,
        r#"{"echo":{"action":"sendPublic","message":"hi"}}"#
    );
    recorder.wait_for("MESSAGE", 2).await;
    // AND the empty body sent nothing, and nothing reached the other client: each one's next
    // frame is the answer to a marker it sends after that
    for ws in [&mut caller, &mut other] {
        ws.send(text(r#"{"action":"sendPublic","message":"marker"}"#))
            .await
            .expect("send the marker");
        assert_eq!(
            expect_text(ws).await,
            r#"{"echo":{"action":"sendPublic","message":"marker"}}"#
        );
    }
}

#[tokio::test]
async fn failing_integration_sends_the_internal_server_error_frame() {
    // GIVEN an integration that fails every message
    let recorder = Recorder::replying(|event| match event_type(event) {
        "MESSAGE" => Err("boom".into()),
        _ => Ok(status(200)),
    });
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;
    let id = recorder.connection_id().await;

    // WHEN the client sends a frame
    ws.send(text(r#"{"action":"setName","name":"alice"}"#))
        .await
        .expect("send");

    // THEN it gets API Gateway's error frame, naming its connection and the request
    let frame: serde_json::Value =
        serde_json::from_str(&expect_text(&mut ws).await).expect("JSON frame");
    let request_id = recorder.wait_for("MESSAGE", 1).await[0]
        .request_context
        .request_id
        .clone()
        .expect("request id");
    assert_eq!(
        frame,
        serde_json::json!({
            "message": "Internal server error",
            "connectionId": id,
            "requestId": request_id,
        })
    );
}

// ---------------------------------------------------------------------------------------------
// $disconnect

#[tokio::test]
async fn client_close_invokes_disconnect_once_after_unregistering() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;
    let id = recorder.connection_id().await;

    // WHEN it closes with 1000
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .expect("close");

    // THEN $disconnect runs once with the client's code, when the connection is already gone
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    let context = &disconnect.request_context;
    assert_eq!(context.route_key.as_deref(), Some("$disconnect"));
    assert_eq!(context.connection_id.as_deref(), Some(id.as_str()));
    assert_eq!(context.disconnect_status_code, Some(1000));
    assert_eq!(context.disconnect_reason.as_deref(), Some("bye"));
    assert_eq!(context.identity.source_ip.as_deref(), Some("127.0.0.1"));
    assert_request_time(context.request_time.as_deref().expect("request time"));
    assert!(disconnect.headers.contains_key("host"));
    assert_eq!(
        *recorder.connections_at_disconnect.lock().expect("lock"),
        [0]
    );
    let gone = post(&running.management(), &id, "late").await;
    assert!(
        matches!(gone, Err(PostToConnectionError::GoneException(_))),
        "{gone:?}"
    );
    // AND only once: after a marker's own $disconnect, the client's is still the only other one
    let marker = disconnect_marker(&running, &recorder).await;
    assert_eq!(disconnected_ids(&recorder), [id, marker]);
}

#[tokio::test]
async fn tcp_drop_without_close_frame_invokes_disconnect_with_1006() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let ws = running.connect().await;
    recorder.connection_id().await;

    // WHEN its TCP connection goes away without a close frame
    drop(ws);

    // THEN $disconnect runs with 1006
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    assert_eq!(
        disconnect.request_context.disconnect_status_code,
        Some(1006)
    );
    assert_eq!(running.gateway.connection_count(), 0);
}

#[tokio::test]
async fn idle_connection_is_closed_with_1001() {
    // GIVEN a gateway with a 300 ms idle timeout
    let recorder = Recorder::new();
    let config = GatewayConfig {
        idle_timeout: Duration::from_millis(300),
        ..GatewayConfig::default()
    };
    let running = start(config, &recorder).await;
    let mut ws = running.connect().await;
    let started = Instant::now();

    // WHEN the client sends one frame, then nothing
    tokio::time::sleep(Duration::from_millis(150)).await;
    ws.send(text("still here")).await.expect("send");

    // THEN 300 ms after that frame it is closed with 1001 "Going away", then $disconnect
    let close = expect_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Away);
    assert_eq!(close.reason.as_str(), "Going away");
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "{:?}",
        started.elapsed()
    );
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    assert_eq!(
        disconnect.request_context.disconnect_status_code,
        Some(1001)
    );
}

#[tokio::test]
async fn connection_older_than_max_duration_is_closed_even_if_active() {
    // GIVEN a gateway with a 400 ms maximum connection duration
    let recorder = Recorder::new();
    let config = GatewayConfig {
        max_duration: Duration::from_millis(400),
        ..GatewayConfig::default()
    };
    let running = start(config, &recorder).await;
    // Before connecting: the gateway's clock for the connection starts during the handshake,
    // before the client sees it complete.
    let started = Instant::now();
    let ws = running.connect().await;

    // WHEN the client keeps sending a frame every 50 ms
    let (mut tx, mut rx) = ws.split();
    let chatter = tokio::spawn(async move {
        while tx.send(text("ping")).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // THEN it is closed with 1001 after 400 ms anyway
    let close = loop {
        match tokio::time::timeout(WAIT, rx.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(Some(frame)))) => break frame,
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let elapsed = started.elapsed();
    // Reading on sends the client's half of the closing handshake.
    let rest = tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = rx.next().await {} });
    rest.await.expect("the gateway ended the connection");
    assert_eq!(close.code, CloseCode::Away);
    assert!(elapsed >= Duration::from_millis(400), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    assert_eq!(
        disconnect.request_context.disconnect_status_code,
        Some(1001)
    );
    assert!(recorder.of_type("MESSAGE").len() >= 4);
    chatter.abort();
}

// ---------------------------------------------------------------------------------------------
// Size limits

#[tokio::test]
async fn frame_over_32_kb_closes_with_1009() {
    // GIVEN a connected client (AWS limits: 32 KB frames)
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;

    // WHEN it sends a 32 KB frame, then a single 40 KB frame
    ws.send(text(&"a".repeat(32 * 1024))).await.expect("send");
    ws.send(text(&"a".repeat(40 * 1024))).await.expect("send");

    // THEN the first is invoked, and the second closes the connection with 1009
    let close = expect_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size);
    drop(ws);
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    assert_eq!(
        disconnect.request_context.disconnect_status_code,
        Some(1009)
    );
    let messages = recorder.of_type("MESSAGE");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body.as_deref().map(str::len), Some(32 * 1024));
}

/// Sends one text message as `parts` fragments of `part_bytes` each.
async fn send_fragmented(ws: &mut Ws, parts: usize, part_bytes: usize) {
    for n in 0..parts {
        let opcode = if n == 0 { Data::Text } else { Data::Continue };
        let frame = Frame::message("b".repeat(part_bytes), OpCode::Data(opcode), n + 1 == parts);
        ws.send(Message::Frame(frame)).await.expect("send fragment");
    }
}

#[tokio::test]
async fn fragmented_message_over_128_kb_closes_with_1009() {
    // GIVEN a connected client (AWS limits: 32 KB frames, 128 KB messages)
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;

    // WHEN it sends a message of 4 x 30 KB fragments, then one of 5 x 30 KB
    send_fragmented(&mut ws, 4, 30 * 1024).await;
    send_fragmented(&mut ws, 5, 30 * 1024).await;

    // THEN the 120 KB message is invoked whole, and the 150 KB one closes with 1009
    let close = expect_close(&mut ws).await;
    assert_eq!(close.code, CloseCode::Size);
    drop(ws);
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    assert_eq!(
        disconnect.request_context.disconnect_status_code,
        Some(1009)
    );
    let messages = recorder.of_type("MESSAGE");
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].body.as_deref().map(str::len), Some(120 * 1024));
}

// ---------------------------------------------------------------------------------------------
// @connections

#[tokio::test]
async fn post_to_connection_sends_text_and_binary_frames() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;
    let id = recorder.connection_id().await;
    let client = running.management();

    // WHEN the backend posts UTF-8 data, then bytes that are not UTF-8
    post(&client, &id, r#"{"systemMessage":"hi"}"#)
        .await
        .expect("post text");
    post(&client, &id, vec![0xff_u8, 0xfe])
        .await
        .expect("post binary");

    // THEN the client gets a text frame, then a binary frame
    assert_eq!(expect_text(&mut ws).await, r#"{"systemMessage":"hi"}"#);
    match next_message(&mut ws).await {
        Message::Binary(data) => assert_eq!(data.as_ref(), [0xff, 0xfe]),
        other => panic!("expected a binary frame, got {other:?}"),
    }
}

#[tokio::test]
async fn post_over_128_kb_is_payload_too_large() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;
    let id = recorder.connection_id().await;
    let client = running.management();

    // WHEN the backend posts 128 KB + 1 byte, then exactly 128 KB
    let too_large = post(&client, &id, "x".repeat(128 * 1024 + 1)).await;
    let at_limit = post(&client, &id, "y".repeat(128 * 1024)).await;

    // THEN the first is a PayloadTooLargeException, and only the second arrives
    assert!(
        matches!(
            too_large,
            Err(PostToConnectionError::PayloadTooLargeException(_))
        ),
        "{too_large:?}"
    );
    at_limit.expect("128 KB is allowed");
    assert_eq!(expect_text(&mut ws).await, "y".repeat(128 * 1024));
}

#[tokio::test]
async fn unknown_connection_is_gone_for_post_get_and_delete() {
    // GIVEN a gateway without that connection
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let client = running.management();
    let id = "L0SM9cOFvHcCIhw=";

    // WHEN the backend posts, gets and deletes it THEN each is a GoneException
    let posted = post(&client, id, "hi").await;
    assert!(
        matches!(posted, Err(PostToConnectionError::GoneException(_))),
        "{posted:?}"
    );
    let got = client
        .get_connection()
        .connection_id(id)
        .send()
        .await
        .map_err(|error| error.into_service_error());
    assert!(
        matches!(got, Err(GetConnectionError::GoneException(_))),
        "{got:?}"
    );
    let deleted = client
        .delete_connection()
        .connection_id(id)
        .send()
        .await
        .map_err(|error| error.into_service_error());
    assert!(
        matches!(deleted, Err(DeleteConnectionError::GoneException(_))),
        "{deleted:?}"
    );
}

#[tokio::test]
async fn post_to_a_client_that_does_not_read_is_eventually_limit_exceeded() {
    // GIVEN a client that never reads, and a one-frame send buffer
    let recorder = Recorder::new();
    let config = GatewayConfig {
        send_buffer: 1,
        ..GatewayConfig::default()
    };
    let running = start(config, &recorder).await;
    let _ws = running.connect().await;
    let id = recorder.connection_id().await;
    let client = running.management();

    // WHEN the backend posts 128 KB frames until the socket buffers are full
    let chunk = "z".repeat(128 * 1024);
    let mut outcome = Ok(());
    for _ in 0..2000 {
        outcome = post(&client, &id, chunk.as_str()).await;
        if outcome.is_err() {
            break;
        }
    }

    // THEN a post is answered with LimitExceededException (429)
    assert!(
        matches!(
            outcome,
            Err(PostToConnectionError::LimitExceededException(_))
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn get_connection_describes_the_connection() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let before = now_ms();
    let mut ws = running.connect().await;
    let id = recorder.connection_id().await;
    let client = running.management();

    // WHEN the backend gets the connection, before and after the client sends a frame
    let fresh = client
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("get connection");
    tokio::time::sleep(Duration::from_millis(20)).await;
    ws.send(text("hello")).await.expect("send");
    recorder.wait_for("MESSAGE", 1).await;
    let active = client
        .get_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("get connection");

    // THEN the SDK parses when it connected, who it is, and when it was last active
    let connected_at = fresh
        .connected_at()
        .expect("connectedAt")
        .to_millis()
        .expect("ms");
    assert!(
        connected_at >= before && connected_at <= now_ms(),
        "{connected_at}"
    );
    let identity = fresh.identity().expect("identity");
    assert_eq!(identity.source_ip(), Some("127.0.0.1"));
    assert_eq!(identity.user_agent(), Some(USER_AGENT));
    let first_active = fresh
        .last_active_at()
        .expect("lastActiveAt")
        .to_millis()
        .expect("ms");
    let last_active = active
        .last_active_at()
        .expect("lastActiveAt")
        .to_millis()
        .expect("ms");
    assert_eq!(first_active, connected_at);
    assert!(
        last_active >= connected_at + 20,
        "{last_active} vs {connected_at}"
    );
}

#[tokio::test]
async fn delete_connection_closes_with_1000_and_invokes_disconnect() {
    // GIVEN a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut ws = running.connect().await;
    let id = recorder.connection_id().await;
    let client = running.management();

    // WHEN the backend deletes the connection
    client
        .delete_connection()
        .connection_id(&id)
        .send()
        .await
        .expect("delete connection");

    // THEN the client is closed with 1000, $disconnect runs, and the id is gone
    assert_eq!(expect_close(&mut ws).await.code, CloseCode::Normal);
    let disconnect = recorder.wait_for("DISCONNECT", 1).await.remove(0);
    assert_eq!(
        disconnect.request_context.disconnect_status_code,
        Some(1000)
    );
    assert_eq!(
        disconnect.request_context.disconnect_reason.as_deref(),
        Some("Connection Closed Normally")
    );
    let posted = post(&client, &id, "late").await;
    assert!(
        matches!(posted, Err(PostToConnectionError::GoneException(_))),
        "{posted:?}"
    );
}

#[tokio::test]
async fn management_api_on_another_stage_is_forbidden() {
    // GIVEN a gateway on stage "prod" and a connected client
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let _ws = running.connect().await;
    let id = recorder.connection_id().await;

    // WHEN the backend posts through stage "dev"
    let posted = post(&management_client(running.port, "dev"), &id, "hi").await;

    // THEN it is a ForbiddenException
    assert!(
        matches!(posted, Err(PostToConnectionError::ForbiddenException(_))),
        "{posted:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Shutdown and the drop_disconnect knob

#[tokio::test]
async fn shutdown_closes_every_client_with_1001_and_invokes_disconnect() {
    // GIVEN two connected clients
    let recorder = Recorder::new();
    let running = start(GatewayConfig::default(), &recorder).await;
    let mut first = running.connect().await;
    let mut second = running.connect().await;
    recorder.wait_for("CONNECT", 2).await;
    let gateway = running.gateway.clone();

    // WHEN the gateway shuts down
    let shutdown = tokio::spawn(running.shutdown());

    // THEN both get 1001, both get $disconnect, and serve returns
    assert_eq!(expect_close(&mut first).await.code, CloseCode::Away);
    assert_eq!(expect_close(&mut second).await.code, CloseCode::Away);
    shutdown.await.expect("serve returned");
    let disconnects = recorder.of_type("DISCONNECT");
    assert_eq!(disconnects.len(), 2);
    assert!(disconnects
        .iter()
        .all(|event| event.request_context.disconnect_status_code == Some(1001)));
    assert_eq!(gateway.connection_count(), 0);
}

#[tokio::test]
async fn after_shutdown_connections_answers_410_until_told_to_stop_listening() {
    // GIVEN a gateway served with a separate stop for its listener, and one client
    init_tracing();
    let recorder = Recorder::new();
    let (listener, port) = bind().await;
    let gateway = Gateway::new(
        GatewayConfig::default(),
        Arc::clone(&recorder) as Arc<dyn Integration>,
    );
    let _ = recorder.gateway.set(gateway.clone());
    let (shutdown, on_shutdown) = oneshot::channel::<()>();
    let (stop, on_stop) = oneshot::channel::<()>();
    let served = tokio::spawn({
        let gateway = gateway.clone();
        async move {
            gateway
                .serve_until(
                    listener,
                    async {
                        let _ = on_shutdown.await;
                    },
                    async {
                        let _ = on_stop.await;
                    },
                )
                .await
        }
    });
    let mut ws = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/prod"))
        .await
        .expect("connect")
        .0;
    let connected = recorder.wait_for("CONNECT", 1).await;
    let id = connected[0]
        .request_context
        .connection_id
        .clone()
        .expect("connection id");

    // WHEN the gateway shuts down
    let _ = shutdown.send(());
    assert_eq!(expect_close(&mut ws).await.code, CloseCode::Away);
    tokio::time::timeout(WAIT, gateway.clients_closed())
        .await
        .expect("clients closed in time");
    assert_eq!(recorder.of_type("DISCONNECT").len(), 1);

    // THEN a fan-out still draining gets 410 for the closed client (not a refused connection)
    let api = management_client(port, "prod");
    assert!(
        matches!(
            post(&api, &id, "late").await,
            Err(PostToConnectionError::GoneException(_))
        ),
        "410 while draining"
    );
    // AND a new client is turned away with 503
    match tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/prod")).await {
        Err(WsError::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|(_, r)| r.status())),
    }

    // WHEN told to stop listening THEN serve returns and the port is closed
    let _ = stop.send(());
    tokio::time::timeout(WAIT, served)
        .await
        .expect("serve returned in time")
        .expect("serve task")
        .expect("serve result");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err());
}

#[tokio::test]
async fn drop_disconnect_never_invokes_disconnect() {
    // GIVEN a gateway that loses $disconnect, like AWS sometimes does
    let recorder = Recorder::new();
    let config = GatewayConfig {
        drop_disconnect: true,
        ..GatewayConfig::default()
    };
    let running = start(config, &recorder).await;
    let mut ws = running.connect().await;
    recorder.connection_id().await;

    // WHEN the client closes
    ws.close(None).await.expect("close");

    // THEN the connection is gone
    let deadline = Instant::now() + WAIT;
    while running.gateway.connection_count() > 0 {
        assert!(Instant::now() < deadline, "connection still registered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // AND $disconnect never ran: the gateway's shutdown returns only once every connection's
    // task, whose last step is invoking $disconnect, has ended
    running.shutdown().await;
    assert!(recorder.of_type("DISCONNECT").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Helpers for AWS shapes

fn now_ms() -> i64 {
    let elapsed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    i64::try_from(elapsed.as_millis()).expect("ms fit")
}

/// `L0SM9cOFvHcCIhw=`: 11 bytes of padded base64.
fn assert_aws_id(id: &str) {
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.ends_with('='), "{id}");
    assert!(
        id[..15]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/'),
        "{id}"
    );
}

/// `27/Nov/2026:09:13:34 +0000`.
fn assert_request_time(time: &str) {
    let bytes = time.as_bytes();
    assert_eq!(bytes.len(), 26, "{time}");
    assert_eq!(
        (bytes[2], bytes[6], bytes[11]),
        (b'/', b'/', b':'),
        "{time}"
    );
    assert!(time.ends_with(" +0000"), "{time}");
}
