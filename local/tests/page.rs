//! The chat's web page as a browser fetches it from `chat-local`: `GET /` is the page (pointed
//! at the stack's stage), `/app.js` and `/client.js` its scripts, all embedded in the binary.
//! (The page itself is driven in Chromium by `client/test/browser.test.js`.)

use chat_local::gateway::GatewayConfig;
use chat_local::stack::{self, LocalOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP/1.1 GET over a plain TCP connection: (status line, headers, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("a head");
    let (status, headers) = head.split_once("\r\n").expect("a status line");
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        body.to_owned(),
    )
}

#[tokio::test]
async fn get_slash_is_the_chat_page_pointed_at_this_stage_with_its_scripts() {
    // GIVEN chat-local on a free port, stage "dev"
    let stack = stack::start(LocalOptions {
        port: 0,
        gateway: GatewayConfig {
            stage: "dev".to_owned(),
            ..GatewayConfig::default()
        },
        ..LocalOptions::default()
    })
    .await
    .expect("local stack starts");

    // WHEN a browser asks for /
    let (status, headers, body) = get(stack.addr, "/").await;
    // THEN it gets the page, which connects to this stage's WebSocket path
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("content-type: text/html"), "{headers}");
    assert!(body.contains("<title>Chat</title>"), "{body}");
    assert!(
        body.contains(r#"<meta name="chat-websocket-path" content="/dev">"#),
        "{body}"
    );
    assert!(body.contains(r#"<script type="module" src="app.js">"#));

    // AND its scripts: the page's, which imports the client library, and the library
    let (status, headers, app) = get(stack.addr, "/app.js").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/javascript"),
        "{headers}"
    );
    assert!(app.contains("from './client.js'"));
    let (status, headers, client) = get(stack.addr, "/client.js").await;
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("content-type: text/javascript"),
        "{headers}"
    );
    assert!(client.contains("export class ChatClient"));

    // AND any other path is still API Gateway's 403
    let (status, _, _) = get(stack.addr, "/nothing-here").await;
    assert_eq!(status, "HTTP/1.1 403 Forbidden");

    stack.shutdown().await.expect("clean shutdown");
}
