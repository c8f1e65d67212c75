//! The `chat-local` binary as a person runs it: it prints the two URLs, serves chat on them,
//! refuses a taken port with a clear message, and shuts down cleanly on Ctrl-C.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn chat_local(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_chat-local"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat-local starts")
}

/// Reads the first two stdout lines: the WebSocket URL and the Connection URL.
fn urls(child: &mut Child) -> (String, String) {
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut next = || lines.next().expect("a line").expect("utf-8");
    let ws = next();
    let conn = next();
    let ws = ws
        .strip_prefix("WebSocket URL: ")
        .unwrap_or_else(|| panic!("first line: {ws}"))
        .to_owned();
    let conn = conn
        .strip_prefix("Connection URL: ")
        .unwrap_or_else(|| panic!("second line: {conn}"))
        .to_owned();
    (ws, conn)
}

fn interrupt(child: &Child) {
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

async fn next_json(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("frame in time")
        {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(t.as_str()).expect("json"),
            Some(Ok(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn prints_its_urls_serves_chat_and_stops_on_ctrl_c() {
    // GIVEN chat-local started on a free port
    let mut child = chat_local(&["--port", "0"]);
    let (ws_url, conn_url) = urls(&mut child);

    // THEN the URLs have the shapes of the stack's Outputs, stage in the path
    assert!(
        ws_url.starts_with("ws://127.0.0.1:") && ws_url.ends_with("/prod"),
        "{ws_url}"
    );
    assert_eq!(
        conn_url,
        format!("{}/@connections", ws_url.replacen("ws://", "http://", 1))
    );

    // WHEN a client joins THEN it is told so (the whole loop: gateway, handler, store, feed, fan-out)
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"action":"setName","name":"alice"}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws).await["members"], json!(["alice"]));
    assert_eq!(
        next_json(&mut ws).await["systemMessage"],
        json!("alice has joined the chat")
    );

    // WHEN Ctrl-C THEN the client is closed with 1001 and the process exits cleanly
    interrupt(&child);
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(frame))) => break frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Away));
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}

#[tokio::test]
async fn logs_go_to_stderr_and_stdout_carries_only_the_urls() {
    // GIVEN chat-local logging at info, so that a join is logged
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-local"))
        .args(["--port", "0"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat-local starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ws_url = lines
        .next()
        .expect("a line")
        .expect("utf-8")
        .strip_prefix("WebSocket URL: ")
        .expect("the WebSocket URL first")
        .to_owned();

    // WHEN a client joins and the stack is stopped
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"action":"setName","name":"alice"}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws).await["members"], json!(["alice"]));
    interrupt(&child);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");

    // THEN stdout held the two URLs and nothing else; the log lines went to stderr
    assert!(out.status.success(), "exit status {}", out.status);
    assert_eq!(rest.len(), 1, "stdout after the WebSocket URL: {rest:?}");
    assert!(rest[0].starts_with("Connection URL: "), "{rest:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("connected"), "{stderr}");
    assert!(stderr.contains("name set"), "{stderr}");
}

#[test]
fn a_taken_port_is_a_clear_error_and_a_non_zero_exit() {
    // GIVEN something already listens on a port
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    // WHEN chat-local is asked to use it
    let out = Command::new(env!("CARGO_BIN_EXE_chat-local"))
        .args(["--port", &port])
        .output()
        .expect("run");
    // THEN it says so and exits non-zero
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("already in use") && stderr.contains(&port),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_local_dynamodb_endpoint_needs_no_aws_credentials_and_probes_for_none() {
    // GIVEN moto on loopback, and an environment as a new user has it: no AWS keys, no
    // profile, no ~/.aws (HOME is an empty directory), default logging
    let moto = chat_tests::Moto::start()
        .await
        .expect("moto must start (run scripts/test)");
    let home = std::env::temp_dir().join(chat_tests::unique_name("home"));
    std::fs::create_dir_all(&home).expect("empty home");
    let mut command = Command::new(env!("CARGO_BIN_EXE_chat-local"));
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_EC2_METADATA_DISABLED",
        "RUST_LOG",
    ] {
        command.env_remove(var);
    }
    let mut child = command
        .env("HOME", &home)
        .args([
            "--port",
            "0",
            "--dynamodb-endpoint",
            &moto.endpoint(),
            "--events-table",
            &chat_tests::unique_name("events"),
            "--connections-table",
            &chat_tests::unique_name("connections"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chat-local starts");

    // WHEN it starts, a client joins through it, and it is stopped
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut printed = Vec::new();
    let ws_url = loop {
        let line = lines
            .next()
            .expect("the WebSocket URL is printed")
            .expect("utf-8");
        if let Some(url) = line.strip_prefix("WebSocket URL: ") {
            break url.to_owned();
        }
        printed.push(line);
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url)
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"action":"setName","name":"alice"}).to_string(),
    ))
    .await
    .expect("send");
    assert_eq!(next_json(&mut ws).await["members"], json!(["alice"]));
    interrupt(&child);
    printed.extend(lines.map_while(Result::ok));
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("wait");

    // THEN it worked against moto without asking anyone for credentials: neither stdout nor
    // its log (stderr) says anything of the instance metadata service or of credentials
    assert!(out.status.success(), "exit status {}", out.status);
    let said = format!(
        "{}\n{}",
        printed.join("\n"),
        String::from_utf8_lossy(&out.stderr)
    )
    .to_lowercase();
    for word in ["imds", "metadata", "credential"] {
        assert!(!said.contains(word), "chat-local mentions {word}: {said}");
    }
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn aws_like_knobs_need_the_aws_like_flag() {
    // GIVEN an AWS-like knob without --aws-like
    // WHEN chat-local is started with it
    let out = Command::new(env!("CARGO_BIN_EXE_chat-local"))
        .args(["--port", "0", "--store-read-latency-ms", "3"])
        .output()
        .expect("run");
    // THEN it refuses, naming the flag the knob needs
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--aws-like"), "{stderr}");
}
