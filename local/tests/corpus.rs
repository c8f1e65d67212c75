//! The bad-input corpus, through the real local stack (embedded store, gateway emulator, the
//! handler's and the fan-out's own code) with real WebSocket clients on loopback.
//!
//! GIVEN alice, bob and José are members and carol is connected without a name, each case is
//! one bad frame from one client. For every case:
//! - the sender gets exactly the README's error frame (`{"error":{"code","message","action"?}}`),
//!   or, for the cases the gateway ends, exactly the documented close;
//! - nobody else receives anything, and nothing changed: after the case alice posts a checkpoint
//!   message, and every member's very next frame must be that checkpoint with the id right
//!   after the previous checkpoint's (ids are dense, so no event was written in between), and
//!   carol's `history` after the previous checkpoint must be exactly the new checkpoint.
//!
//! At the end the full public history is the one from before plus the checkpoints, the names
//! are unchanged, and alice and bob still chat.

use std::net::SocketAddr;
use std::time::Duration;

use chat_local::esm::EsmConfig;
use chat_local::stack::{self, LocalOptions, RunningStack, StoreChoice};
use chat_shared::config::{HandlerConfig, Retention};
use chat_shared::ratelimit::RateLimit;
use chat_shared::store::embedded::EmbeddedStore;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a frame that should come.
const EXPECT: Duration = Duration::from_secs(10);
/// How long a test listens to be sure a frame does not come.
const QUIET: Duration = Duration::from_millis(700);

struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    async fn connect(url: &str) -> Client {
        let (ws, response) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket handshake");
        assert_eq!(response.status(), 101);
        Client { ws }
    }

    async fn send(&mut self, frame: Value) {
        self.send_message(Message::text(frame.to_string())).await;
    }

    async fn send_message(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// The next JSON text frame (pings and pongs are skipped); `context` names the case.
    async fn next(&mut self, context: &str) -> Value {
        loop {
            let msg = tokio::time::timeout(EXPECT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{context}: no frame within {EXPECT:?}"))
                .unwrap_or_else(|| panic!("{context}: the connection closed"))
                .unwrap_or_else(|e| panic!("{context}: invalid frame: {e}"));
            match msg {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .unwrap_or_else(|e| panic!("{context}: frame {t:?} is not JSON: {e}"))
                }
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("{context}: unexpected frame {other:?}"),
            }
        }
    }

    /// Skips frames until one matches.
    async fn until(&mut self, context: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let f = self.next(context).await;
            if pred(&f) {
                return f;
            }
        }
    }

    async fn expect_silence(&mut self, context: &str) {
        if let Ok(other) = tokio::time::timeout(QUIET, self.ws.next()).await {
            panic!("{context}: expected no frame, got {other:?}");
        }
    }

    /// Waits for the server to close the connection; returns the close code.
    async fn closed(&mut self, context: &str) -> Option<CloseCode> {
        loop {
            match tokio::time::timeout(EXPECT, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("{context}: not closed within {EXPECT:?}"))
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(Message::Text(t))) => panic!("{context}: got {t} instead of a close"),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }
}

/// A WebSocket client written by hand over TCP, for what a well-behaved library refuses to
/// send: frames after its own close frame, text frames that are not UTF-8.
struct RawClient {
    tcp: TcpStream,
}

impl RawClient {
    async fn connect(addr: SocketAddr, stage: &str) -> RawClient {
        let mut tcp = TcpStream::connect(addr).await.expect("TCP connect");
        let request = format!(
            "GET /{stage} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        tcp.write_all(request.as_bytes()).await.expect("handshake");
        let mut head = Vec::new();
        let mut byte = [0_u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut byte).await.expect("handshake answer");
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        RawClient { tcp }
    }

    /// A masked client frame (RFC 6455 section 5.2).
    fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n < 65_536 => {
                f.push(0x80 | 126);
                f.extend((n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend((n as u64).to_be_bytes());
            }
        }
        let mask = [0x5a, 0x17, 0xc3, 0x09];
        f.extend(mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn close_frame() -> Vec<u8> {
        Self::frame(0x8, &1000_u16.to_be_bytes())
    }

    fn text_frame(text: &[u8]) -> Vec<u8> {
        Self::frame(0x1, text)
    }

    async fn write(&mut self, bytes: &[u8]) {
        // The server may already have closed: a failed write is part of what is tested.
        let _ = self.tcp.write_all(bytes).await;
    }

    /// Reads until the server closes the TCP connection; returns the server frames as
    /// (opcode, payload).
    async fn frames_until_eof(&mut self, context: &str) -> Vec<(u8, Vec<u8>)> {
        let mut bytes = Vec::new();
        let _ = tokio::time::timeout(EXPECT, async {
            let mut buf = [0_u8; 4096];
            while let Ok(n @ 1..) = self.tcp.read(&mut buf).await {
                bytes.extend_from_slice(&buf[..n]);
            }
        })
        .await;
        let mut frames = Vec::new();
        let mut at = 0;
        while at + 2 <= bytes.len() {
            let opcode = bytes[at] & 0x0f;
            let (len, header) = match bytes[at + 1] & 0x7f {
                126 if at + 4 <= bytes.len() => (
                    usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]])),
                    4,
                ),
                127 => panic!("{context}: unexpectedly large server frame"),
                n => (usize::from(n), 2),
            };
            let end = (at + header + len).min(bytes.len());
            frames.push((opcode, bytes[at + header..end].to_vec()));
            at = end;
        }
        frames
    }
}

/// Who sends a case's frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Who {
    /// A member.
    Alice,
    /// Connected, no name.
    Carol,
    /// A new connection without a name, used for this case only.
    Fresh,
}

/// What the sender puts on the wire.
enum Out {
    Text(String),
    Binary(Vec<u8>),
    /// Raw bytes after the handshake (frames written by hand).
    Raw(Vec<Vec<u8>>),
}

/// What the sender must get.
enum Expect {
    /// This error frame and nothing else.
    Error(&'static str, Option<&'static str>),
    /// Exactly this frame (message included) and nothing else.
    Frame(Value),
    /// The gateway closes the connection with this code.
    Closed(CloseCode),
    /// Nothing at all: the connection was closed by the client and its later frames go nowhere.
    Nothing,
}

struct Case {
    label: String,
    who: Who,
    out: Out,
    expect: Expect,
}

fn text(label: &str, who: Who, frame: impl Into<String>, expect: Expect) -> Case {
    Case {
        label: label.to_owned(),
        who,
        out: Out::Text(frame.into()),
        expect,
    }
}

fn err(code: &'static str, action: Option<&'static str>) -> Expect {
    Expect::Error(code, action)
}

/// The corpus. Frames are written as text, exactly as they go on the wire.
fn corpus() -> Vec<Case> {
    use Who::{Alice, Carol, Fresh};
    let invalid_json = || err("invalid_json", None);
    let set_name = |name_json: &str| format!(r#"{{"action":"setName","name":{name_json}}}"#);
    let public =
        |message_json: &str| format!(r#"{{"action":"sendPublic","message":{message_json}}}"#);
    let private = |to_json: &str, message_json: &str| {
        format!(r#"{{"action":"sendPrivate","to":{to_json},"message":{message_json}}}"#)
    };
    let history = |rest: &str| format!(r#"{{"action":"history",{rest}}}"#);
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    let digits400 = "7".repeat(400);
    let x4097 = format!("\"{}\"", "x".repeat(4097));
    let e2049 = format!("\"{}\"", "é".repeat(2049));
    let invalid_name = || err("invalid_name", Some("setName"));
    let name_taken = || err("name_taken", Some("setName"));
    let bad_history = || err("invalid_field", Some("history"));

    let cases = vec![
        // --- not JSON
        text("empty frame", Carol, "", invalid_json()),
        text("whitespace-only frame", Alice, " \n\t ", invalid_json()),
        text("plain words", Carol, "hello there", invalid_json()),
        text("lone brace", Alice, "{", invalid_json()),
        text("closing brace", Carol, "}", invalid_json()),
        text(
            "truncated object",
            Alice,
            r#"{"action":"sendPublic","message":"hi""#,
            invalid_json(),
        ),
        text(
            "single quotes",
            Alice,
            "{'action':'sendPublic','message':'hi'}",
            invalid_json(),
        ),
        text(
            "trailing comma",
            Alice,
            r#"{"action":"sendPublic","message":"hi",}"#,
            invalid_json(),
        ),
        text(
            "trailing garbage",
            Alice,
            r#"{"action":"sendPublic","message":"hi"} and more"#,
            invalid_json(),
        ),
        text(
            "two objects in one frame",
            Alice,
            r#"{"action":"sendPublic","message":"a"}{"action":"sendPublic","message":"b"}"#,
            invalid_json(),
        ),
        text(
            "byte order mark before the object",
            Alice,
            "\u{FEFF}{\"action\":\"sendPublic\",\"message\":\"hi\"}",
            invalid_json(),
        ),
        text("NaN", Carol, "NaN", invalid_json()),
        text(
            "HTML",
            Carol,
            "<html><body>hi</body></html>",
            invalid_json(),
        ),
        // --- JSON, but not an object
        text("array", Alice, "[1,2]", err("invalid_request", None)),
        text("empty array", Carol, "[]", err("invalid_request", None)),
        text(
            "string",
            Alice,
            r#""setName""#,
            err("invalid_request", None),
        ),
        text("number", Carol, "42", err("invalid_request", None)),
        text(
            "negative fraction",
            Alice,
            "-0.5",
            err("invalid_request", None),
        ),
        text("null", Carol, "null", err("invalid_request", None)),
        text("true", Alice, "true", err("invalid_request", None)),
        // --- action missing, not a string, unknown, wrong case
        text("empty object", Alice, "{}", err("unknown_action", None)),
        text(
            "missing action",
            Carol,
            r#"{"name":"mallory"}"#,
            err("unknown_action", None),
        ),
        text(
            "numeric action",
            Alice,
            r#"{"action":7}"#,
            err("unknown_action", None),
        ),
        text(
            "null action",
            Alice,
            r#"{"action":null,"message":"hi"}"#,
            err("unknown_action", None),
        ),
        text(
            "array action",
            Carol,
            r#"{"action":["setName"],"name":"mallory"}"#,
            err("unknown_action", None),
        ),
        text(
            "object action",
            Alice,
            r#"{"action":{"name":"sendPublic"},"message":"hi"}"#,
            err("unknown_action", None),
        ),
        text(
            "boolean action",
            Alice,
            r#"{"action":true}"#,
            err("unknown_action", None),
        ),
        text(
            "unknown action",
            Alice,
            r#"{"action":"dance"}"#,
            err("unknown_action", Some("dance")),
        ),
        text(
            "wrong case SetName",
            Carol,
            r#"{"action":"SetName","name":"mallory"}"#,
            err("unknown_action", Some("SetName")),
        ),
        text(
            "wrong case SENDPUBLIC",
            Alice,
            r#"{"action":"SENDPUBLIC","message":"hi"}"#,
            err("unknown_action", Some("SENDPUBLIC")),
        ),
        text(
            "lower case sendprivate",
            Alice,
            r#"{"action":"sendprivate","to":"bob","message":"hi"}"#,
            err("unknown_action", Some("sendprivate")),
        ),
        text(
            "empty action",
            Alice,
            r#"{"action":"","message":"hi"}"#,
            err("unknown_action", Some("")),
        ),
        text(
            "padded action",
            Alice,
            r#"{"action":" sendPublic","message":"hi"}"#,
            err("unknown_action", Some(" sendPublic")),
        ),
        text(
            "a route key as action",
            Alice,
            r#"{"action":"$disconnect"}"#,
            err("unknown_action", Some("$disconnect")),
        ),
        // --- missing fields and wrong types
        text(
            "setName without name",
            Carol,
            r#"{"action":"setName"}"#,
            err("missing_field", Some("setName")),
        ),
        text(
            "null name",
            Carol,
            set_name("null"),
            err("missing_field", Some("setName")),
        ),
        text(
            "numeric name",
            Carol,
            set_name("42"),
            err("invalid_field", Some("setName")),
        ),
        text(
            "array name",
            Carol,
            set_name(r#"["mallory"]"#),
            err("invalid_field", Some("setName")),
        ),
        text(
            "object name",
            Alice,
            set_name(r#"{"first":"mallory"}"#),
            err("invalid_field", Some("setName")),
        ),
        text(
            "boolean name",
            Carol,
            set_name("false"),
            err("invalid_field", Some("setName")),
        ),
        text(
            "duplicate key, the last one a number",
            Carol,
            r#"{"action":"setName","name":"mallory","name":5}"#,
            err("invalid_field", Some("setName")),
        ),
        text(
            "sendPublic without message",
            Alice,
            r#"{"action":"sendPublic"}"#,
            err("missing_field", Some("sendPublic")),
        ),
        text(
            "null message",
            Alice,
            public("null"),
            err("missing_field", Some("sendPublic")),
        ),
        text(
            "numeric message",
            Alice,
            public("7"),
            err("invalid_field", Some("sendPublic")),
        ),
        text(
            "object message",
            Alice,
            public(r#"{"text":"hi"}"#),
            err("invalid_field", Some("sendPublic")),
        ),
        text(
            "array message",
            Alice,
            public(r#"["hi"]"#),
            err("invalid_field", Some("sendPublic")),
        ),
        text(
            "boolean message",
            Alice,
            public("true"),
            err("invalid_field", Some("sendPublic")),
        ),
        text(
            "sendPrivate without to",
            Alice,
            r#"{"action":"sendPrivate","message":"hi"}"#,
            err("missing_field", Some("sendPrivate")),
        ),
        text(
            "sendPrivate without message",
            Alice,
            r#"{"action":"sendPrivate","to":"bob"}"#,
            err("missing_field", Some("sendPrivate")),
        ),
        text(
            "null to",
            Alice,
            private("null", r#""hi""#),
            err("missing_field", Some("sendPrivate")),
        ),
        text(
            "numeric to",
            Alice,
            private("5", r#""hi""#),
            err("invalid_field", Some("sendPrivate")),
        ),
        text(
            "array to",
            Alice,
            private(r#"["bob"]"#, r#""hi""#),
            err("invalid_field", Some("sendPrivate")),
        ),
        text(
            "object to",
            Alice,
            private(r#"{"name":"bob"}"#, r#""hi""#),
            err("invalid_field", Some("sendPrivate")),
        ),
        text(
            "boolean to",
            Alice,
            private("false", r#""hi""#),
            err("invalid_field", Some("sendPrivate")),
        ),
        text(
            "numeric private message",
            Alice,
            private(r#""bob""#, "12"),
            err("invalid_field", Some("sendPrivate")),
        ),
        // --- names that break the rules
        text("empty name", Carol, set_name(r#""""#), invalid_name()),
        text(
            "whitespace-only name",
            Carol,
            set_name(r#""   ""#),
            invalid_name(),
        ),
        text(
            "tabs and newlines only",
            Alice,
            set_name(r#""\t\n ""#),
            invalid_name(),
        ),
        text(
            "ideographic space only",
            Carol,
            set_name("\"\u{3000}\u{3000}\""),
            invalid_name(),
        ),
        text(
            "33 characters",
            Carol,
            set_name(&format!("\"{}\"", "n".repeat(33))),
            invalid_name(),
        ),
        text(
            "33 two-byte characters",
            Alice,
            set_name(&format!("\"{}\"", "é".repeat(33))),
            invalid_name(),
        ),
        text(
            "NUL in name",
            Carol,
            set_name(r#""a\u0000b""#),
            invalid_name(),
        ),
        text(
            "BEL in name",
            Carol,
            set_name(r#""bell\u0007""#),
            invalid_name(),
        ),
        text(
            "newline in name",
            Alice,
            set_name(r#""two\nlines""#),
            invalid_name(),
        ),
        text(
            "DEL in name",
            Carol,
            set_name(r#""del\u007f""#),
            invalid_name(),
        ),
        text(
            "C1 control in name",
            Carol,
            set_name(r#""c1\u0085x""#),
            invalid_name(),
        ),
        text(
            "right-to-left override",
            Carol,
            set_name(r#""\u202eecilA""#),
            invalid_name(),
        ),
        text(
            "left-to-right isolate",
            Alice,
            set_name(r#""iso\u2066late""#),
            invalid_name(),
        ),
        text(
            "pop directional isolate",
            Carol,
            set_name(r#""bob\u2069""#),
            invalid_name(),
        ),
        // --- names that are taken, however they are written
        text(
            "taken, upper case",
            Carol,
            set_name(r#""BOB""#),
            name_taken(),
        ),
        text(
            "taken, mixed case",
            Carol,
            set_name(r#""Alice""#),
            name_taken(),
        ),
        text(
            "taken, full width",
            Carol,
            set_name("\"ＢＯＢ\""),
            name_taken(),
        ),
        text(
            "taken, decomposed accent",
            Carol,
            set_name("\"Jose\u{301}\""),
            name_taken(),
        ),
        text(
            "taken, decomposed accent as escapes",
            Carol,
            set_name(r#""jose\u0301""#),
            name_taken(),
        ),
        text(
            "taken, upper-case accent",
            Carol,
            set_name("\"JOSÉ\""),
            name_taken(),
        ),
        text(
            "taken, padded",
            Carol,
            set_name(r#""  bob  ""#),
            name_taken(),
        ),
        text(
            "taken, padded with tabs and newlines",
            Carol,
            set_name(r#""\tAlice\n""#),
            name_taken(),
        ),
        text(
            "a member renaming onto a taken name",
            Alice,
            set_name(r#""Bob""#),
            name_taken(),
        ),
        // --- messages that break the rules
        text(
            "empty message",
            Alice,
            public(r#""""#),
            err("invalid_message", Some("sendPublic")),
        ),
        text(
            "whitespace-only message",
            Alice,
            public(r#"" \n\t ""#),
            err("invalid_message", Some("sendPublic")),
        ),
        text(
            "ideographic-space message",
            Alice,
            public("\"\u{3000}\""),
            err("invalid_message", Some("sendPublic")),
        ),
        text(
            "empty private message",
            Alice,
            private(r#""bob""#, r#""""#),
            err("invalid_message", Some("sendPrivate")),
        ),
        text(
            "4097-byte message",
            Alice,
            public(&x4097),
            err("message_too_large", Some("sendPublic")),
        ),
        text(
            "2049 two-byte characters",
            Alice,
            public(&e2049),
            err("message_too_large", Some("sendPublic")),
        ),
        text(
            "4097-byte private message",
            Alice,
            private(r#""bob""#, &x4097),
            err("message_too_large", Some("sendPrivate")),
        ),
        // --- binary frames
        Case {
            label: "binary frame holding a valid request".into(),
            who: Alice,
            out: Out::Binary(br#"{"action":"sendPublic","message":"hi"}"#.to_vec()),
            expect: invalid_json(),
        },
        Case {
            label: "binary frame of random bytes".into(),
            who: Carol,
            out: Out::Binary(vec![0xff, 0x00, 0xfe, 0x7b, 0x80]),
            expect: invalid_json(),
        },
        Case {
            label: "empty binary frame".into(),
            who: Alice,
            out: Out::Binary(Vec::new()),
            expect: invalid_json(),
        },
        // --- deep nesting, huge numbers, lone surrogates
        text("10,000 nested arrays", Alice, deep(10_000), invalid_json()),
        text(
            "10,000 nested arrays as the message",
            Alice,
            public(&deep(10_000)),
            invalid_json(),
        ),
        text(
            "5,000 nested objects",
            Carol,
            format!("{}1{}", r#"{"a":"#.repeat(5_000), "}".repeat(5_000)),
            invalid_json(),
        ),
        text(
            "129 nested arrays (just past the limit)",
            Alice,
            deep(129),
            invalid_json(),
        ),
        text(
            "1e999 as limit",
            Carol,
            history(r#""limit":1e999"#),
            invalid_json(),
        ),
        text(
            "400-digit integer as limit",
            Carol,
            history(&format!(r#""limit":{digits400}"#)),
            invalid_json(),
        ),
        text(
            "400-digit integer as after",
            Carol,
            history(&format!(r#""after":-{digits400}"#)),
            invalid_json(),
        ),
        text(
            "huge number in an extra key",
            Alice,
            r#"{"action":"sendPublic","message":"hi","n":1e999}"#,
            invalid_json(),
        ),
        text(
            "lone leading surrogate",
            Alice,
            public(r#""\ud800""#),
            invalid_json(),
        ),
        text(
            "lone trailing surrogate in a name",
            Carol,
            set_name(r#""\udc00x""#),
            invalid_json(),
        ),
        text(
            "reversed surrogate pair",
            Alice,
            public(r#""\udc00\ud800""#),
            invalid_json(),
        ),
        // --- recipients
        text(
            "private to self",
            Alice,
            private(r#""alice""#, r#""hi""#),
            err("invalid_recipient", Some("sendPrivate")),
        ),
        text(
            "private to self, other case",
            Alice,
            private(r#""ALICE""#, r#""hi""#),
            err("invalid_recipient", Some("sendPrivate")),
        ),
        text(
            "private to an unknown name",
            Alice,
            private(r#""zed""#, r#""hi""#),
            err("unknown_recipient", Some("sendPrivate")),
        ),
        text(
            "private to a connection without a name",
            Alice,
            private(r#""carol""#, r#""hi""#),
            err("unknown_recipient", Some("sendPrivate")),
        ),
        text(
            "private to an empty name",
            Alice,
            private(r#""""#, r#""hi""#),
            err("unknown_recipient", Some("sendPrivate")),
        ),
        // --- sending before setName
        text(
            "sendPublic before setName",
            Carol,
            public(r#""hi""#),
            err("name_required", Some("sendPublic")),
        ),
        text(
            "sendPrivate before setName",
            Carol,
            private(r#""alice""#, r#""hi""#),
            err("name_required", Some("sendPrivate")),
        ),
        // --- rooms (the world allows one room a connection, so alice, in lobby, is full)
        text(
            "join without a room",
            Alice,
            r#"{"action":"join"}"#,
            err("missing_field", Some("join")),
        ),
        text(
            "leave with a null room",
            Alice,
            r#"{"action":"leave","room":null}"#,
            err("missing_field", Some("leave")),
        ),
        text(
            "join with a numeric room",
            Alice,
            r#"{"action":"join","room":7}"#,
            err("invalid_field", Some("join")),
        ),
        text(
            "sendPublic with an array room",
            Alice,
            r#"{"action":"sendPublic","room":["ops"],"message":"hi"}"#,
            err("invalid_field", Some("sendPublic")),
        ),
        text(
            "join an empty room name",
            Alice,
            r#"{"action":"join","room":""}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a room name with a space",
            Alice,
            r#"{"action":"join","room":"the ops"}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a padded room name",
            Alice,
            r#"{"action":"join","room":"ops "}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a room name of 65 characters",
            Alice,
            format!(r#"{{"action":"join","room":"{}"}}"#, "r".repeat(65)),
            err("invalid_room", Some("join")),
        ),
        text(
            "join a room name with the key separator",
            Alice,
            r#"{"action":"join","room":"lobby#0"}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a room name with a slash",
            Carol,
            r#"{"action":"join","room":"../lobby"}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a non-ASCII room name",
            Alice,
            r#"{"action":"join","room":"café"}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a full-width room name",
            Alice,
            r#"{"action":"join","room":"ｌｏｂｂｙ"}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "join a room name with a zero-width space",
            Alice,
            r#"{"action":"join","room":"lob\u200bby"}"#,
            err("invalid_room", Some("join")),
        ),
        text(
            "leave a room name with a newline",
            Alice,
            r#"{"action":"leave","room":"lobby\n"}"#,
            err("invalid_room", Some("leave")),
        ),
        text(
            "sendPublic to an invalid room",
            Alice,
            r#"{"action":"sendPublic","room":"a b","message":"hi"}"#,
            err("invalid_room", Some("sendPublic")),
        ),
        text(
            "history of an invalid room",
            Carol,
            r#"{"action":"history","room":"*"}"#,
            err("invalid_room", Some("history")),
        ),
        text(
            "sendPublic to a room not joined",
            Alice,
            r#"{"action":"sendPublic","room":"ops","message":"hi"}"#,
            err("not_a_member", Some("sendPublic")),
        ),
        text(
            "sendPublic to lobby in another case",
            Alice,
            r#"{"action":"sendPublic","room":"Lobby","message":"hi"}"#,
            err("not_a_member", Some("sendPublic")),
        ),
        text(
            "leave a room not joined",
            Alice,
            r#"{"action":"leave","room":"ops"}"#,
            err("not_a_member", Some("leave")),
        ),
        text(
            "leave before setName",
            Carol,
            r#"{"action":"leave","room":"lobby"}"#,
            err("not_a_member", Some("leave")),
        ),
        text(
            "join before setName",
            Carol,
            r#"{"action":"join","room":"ops"}"#,
            err("name_required", Some("join")),
        ),
        text(
            "join one room too many",
            Alice,
            r#"{"action":"join","room":"ops"}"#,
            err("too_many_rooms", Some("join")),
        ),
        // --- history with bad bounds
        text("limit 0", Carol, history(r#""limit":0"#), bad_history()),
        text("limit 101", Carol, history(r#""limit":101"#), bad_history()),
        text("limit -1", Carol, history(r#""limit":-1"#), bad_history()),
        text("limit 2.5", Carol, history(r#""limit":2.5"#), bad_history()),
        text(
            "limit as a string",
            Carol,
            history(r#""limit":"7""#),
            bad_history(),
        ),
        text(
            "limit true",
            Alice,
            history(r#""limit":true"#),
            bad_history(),
        ),
        text(
            "limit of 30 digits",
            Carol,
            history(r#""limit":100000000000000000000000000000"#),
            bad_history(),
        ),
        text("after -1", Carol, history(r#""after":-1"#), bad_history()),
        text(
            "after as a string",
            Alice,
            history(r#""after":"7""#),
            bad_history(),
        ),
        text(
            "before 2^53",
            Carol,
            history(r#""before":9007199254740992"#),
            bad_history(),
        ),
        text(
            "both before and after",
            Carol,
            history(r#""before":9,"after":1"#),
            bad_history(),
        ),
        // --- what the gateway itself ends
        Case {
            label: "frame over 32 KB".into(),
            who: Fresh,
            out: Out::Text(public(&format!("\"{}\"", "x".repeat(40 * 1024)))),
            expect: Expect::Closed(CloseCode::Size),
        },
        Case {
            label: "binary frame over 32 KB".into(),
            who: Fresh,
            out: Out::Binary(vec![0x42; 33 * 1024]),
            expect: Expect::Closed(CloseCode::Size),
        },
        Case {
            label: "text frame that is not UTF-8".into(),
            who: Fresh,
            out: Out::Raw(vec![RawClient::text_frame(b"{\"action\":\"\xff\xfe\"}")]),
            expect: Expect::Closed(CloseCode::Invalid),
        },
        Case {
            label: "frames after the client's close, in the same packet".into(),
            who: Fresh,
            out: Out::Raw(vec![[
                RawClient::close_frame(),
                RawClient::text_frame(br#"{"action":"setName","name":"ghost"}"#),
                RawClient::text_frame(br#"{"action":"history","after":0}"#),
            ]
            .concat()]),
            expect: Expect::Nothing,
        },
        Case {
            label: "frames after the client's close, sent later".into(),
            who: Fresh,
            out: Out::Raw(vec![
                RawClient::close_frame(),
                RawClient::text_frame(br#"{"action":"setName","name":"ghost"}"#),
                RawClient::text_frame(b"not json"),
            ]),
            expect: Expect::Nothing,
        },
    ];
    let mut cases = cases;
    cases.extend(request_id_cases());
    // The 10,000-array case must stay under the 32 KB frame limit to reach the handler.
    for case in &cases {
        if let (Out::Text(t), Expect::Error(..)) = (&case.out, &case.expect) {
            assert!(t.len() <= 32 * 1024, "{}: frame too big", case.label);
        }
    }
    cases
}

/// `requestId` cases, with the exact frame each gets: an invalid one is refused on every
/// action (without echoing it); a valid one is echoed in the refusal of the rest of the frame;
/// `null` is no requestId.
fn request_id_cases() -> Vec<Case> {
    use Who::{Alice, Carol};
    let bad_id = |why: &str, action: Option<&str>| {
        let message = format!(
            "\"requestId\" must be 1–64 characters of ASCII letters, digits, '-', '_', '.' or ':' ({why})."
        );
        let mut error = json!({"code":"invalid_field","message":message});
        if let Some(action) = action {
            error["action"] = json!(action);
        }
        Expect::Frame(json!({ "error": error }))
    };
    let refused = |code: &str, message: &str, action: Option<&str>, id: &str| {
        let mut error = json!({"code":code,"message":message});
        if let Some(action) = action {
            error["action"] = json!(action);
        }
        error["requestId"] = json!(id);
        Expect::Frame(json!({ "error": error }))
    };
    let id65 = "r".repeat(65);
    let id64 = "r".repeat(64);
    let uuid = "0f8fad5b-d9cb-469f-a165-70867728950e";
    let not_string = "it is not a string";
    let other = "it has other characters";
    vec![
        // --- an invalid requestId, on each action
        text(
            "requestId a number, on setName",
            Alice,
            r#"{"action":"setName","name":"alice2","requestId":7}"#,
            bad_id(not_string, Some("setName")),
        ),
        text(
            "requestId empty, on sendPublic",
            Alice,
            r#"{"action":"sendPublic","message":"hi","requestId":""}"#,
            bad_id("it is empty", Some("sendPublic")),
        ),
        text(
            "requestId of 65 characters, on sendPrivate",
            Alice,
            format!(
                r#"{{"action":"sendPrivate","to":"bob","message":"psst","requestId":"{id65}"}}"#
            ),
            bad_id("it is longer", Some("sendPrivate")),
        ),
        text(
            "requestId with a space, on history",
            Carol,
            r#"{"action":"history","requestId":"r 1"}"#,
            bad_id(other, Some("history")),
        ),
        text(
            "requestId with a non-ASCII letter, on join",
            Alice,
            r#"{"action":"join","room":"ops","requestId":"é"}"#,
            bad_id(other, Some("join")),
        ),
        text(
            "requestId an array, on leave",
            Alice,
            r#"{"action":"leave","room":"lobby","requestId":["r1"]}"#,
            bad_id(not_string, Some("leave")),
        ),
        text(
            "requestId with a slash",
            Alice,
            r#"{"action":"sendPublic","message":"hi","requestId":"r/1"}"#,
            bad_id(other, Some("sendPublic")),
        ),
        text(
            "requestId with a hash",
            Alice,
            r##"{"action":"sendPublic","message":"hi","requestId":"r#1"}"##,
            bad_id(other, Some("sendPublic")),
        ),
        text(
            "requestId an object, on an unknown action",
            Alice,
            r#"{"action":"dance","requestId":{"id":"r1"}}"#,
            bad_id(not_string, Some("dance")),
        ),
        text(
            "requestId true, without an action",
            Carol,
            r#"{"requestId":true}"#,
            bad_id(not_string, None),
        ),
        text(
            "requestId a number, from a connection without a name",
            Carol,
            r#"{"action":"sendPublic","message":"hi","requestId":1.5}"#,
            bad_id(not_string, Some("sendPublic")),
        ),
        // --- a valid requestId is echoed in the refusal of the rest of the frame
        text(
            "valid requestId, empty message",
            Alice,
            r#"{"action":"sendPublic","message":" ","requestId":"c-1"}"#,
            refused(
                "invalid_message",
                "A message cannot be empty.",
                Some("sendPublic"),
                "c-1",
            ),
        ),
        text(
            "valid requestId, a taken name",
            Alice,
            r#"{"action":"setName","name":"BOB","requestId":"c.2"}"#,
            refused(
                "name_taken",
                "The name \"BOB\" is taken; choose another.",
                Some("setName"),
                "c.2",
            ),
        ),
        text(
            "valid requestId, sending without a name",
            Carol,
            r#"{"action":"sendPublic","message":"hi","requestId":"carol:1"}"#,
            refused(
                "name_required",
                "Set a name with setName before sending messages.",
                Some("sendPublic"),
                "carol:1",
            ),
        ),
        text(
            "valid requestId, no action",
            Alice,
            r#"{"requestId":"r_x"}"#,
            refused(
                "unknown_action",
                "The frame has no \"action\" key.",
                None,
                "r_x",
            ),
        ),
        text(
            "requestId of 64 characters, a bad history limit",
            Carol,
            format!(r#"{{"action":"history","limit":0,"requestId":"{id64}"}}"#),
            refused(
                "invalid_field",
                "\"limit\" must be from 1 to 100.",
                Some("history"),
                &id64,
            ),
        ),
        text(
            "a UUID requestId, a bad room",
            Alice,
            format!(r#"{{"action":"join","room":"a b","requestId":"{uuid}"}}"#),
            refused(
                "invalid_room",
                "A room name can only use ASCII letters, digits, '-', '_' and '.'; it has ' '.",
                Some("join"),
                uuid,
            ),
        ),
        text(
            "valid requestId, a private message to oneself",
            Alice,
            r#"{"action":"sendPrivate","to":"Alice","message":"me","requestId":"c-3"}"#,
            refused(
                "invalid_recipient",
                "You cannot send a private message to yourself.",
                Some("sendPrivate"),
                "c-3",
            ),
        ),
        text(
            "valid requestId, leaving a room one is not in",
            Alice,
            r#"{"action":"leave","room":"ops","requestId":"c-4"}"#,
            refused(
                "not_a_member",
                "You are not a member of room \"ops\"; join it first.",
                Some("leave"),
                "c-4",
            ),
        ),
        text(
            "valid requestId, one room too many",
            Alice,
            r#"{"action":"join","room":"ops","requestId":"c-5"}"#,
            refused(
                "too_many_rooms",
                "You are already in 1 rooms, the most allowed; leave one first.",
                Some("join"),
                "c-5",
            ),
        ),
        text(
            "requestId null is none, empty message",
            Alice,
            r#"{"action":"sendPublic","message":"","requestId":null}"#,
            Expect::Frame(
                json!({"error":{"code":"invalid_message","message":"A message cannot be empty.","action":"sendPublic"}}),
            ),
        ),
    ]
}

/// The stack and its clients.
struct World {
    stack: Option<RunningStack>,
    alice: Client,
    bob: Client,
    jose: Client,
    carol: Client,
    /// The id of the last checkpoint every member received.
    last_id: u64,
    /// The public history expected: what it was before the cases, plus each checkpoint.
    history: Vec<Value>,
}

impl World {
    async fn start() -> World {
        // The rate limit is off: the corpus sends far more than a person would, fast. One
        // room a connection: the members are in lobby, so any join is one too many.
        let options = LocalOptions {
            port: 0,
            store: StoreChoice::Embedded(EmbeddedStore::new(Retention::default())),
            handler: HandlerConfig {
                rate_limit: RateLimit {
                    per_second: 0,
                    burst: 0,
                },
                max_rooms: 1,
                ..HandlerConfig::default()
            },
            esm: EsmConfig {
                poll_wait: Duration::from_millis(20),
                retry_backoff: Duration::from_millis(20),
                ..EsmConfig::default()
            },
            ..LocalOptions::default()
        };
        let stack = stack::start(options).await.expect("local stack starts");
        let url = stack.websocket_url.clone();
        let mut alice = Self::member(&url, "alice").await;
        let mut bob = Self::member(&url, "bob").await;
        let mut jose = Self::member(&url, "José").await;
        for name in ["bob", "José"] {
            let joined = json!(format!("{name} has joined the chat"));
            alice.until("setup", |f| f["systemMessage"] == joined).await;
        }
        bob.until("setup", |f| {
            f["systemMessage"] == json!("José has joined the chat")
        })
        .await;
        let carol = Client::connect(&url).await;
        // Some public history before the cases.
        bob.send(json!({"action":"sendPublic","message":"hello before"}))
            .await;
        for c in [&mut alice, &mut bob, &mut jose] {
            c.until("setup", |f| {
                f["publicMessage"] == json!("bob: hello before")
            })
            .await;
        }
        let mut world = World {
            stack: Some(stack),
            alice,
            bob,
            jose,
            carol,
            last_id: 0,
            history: Vec::new(),
        };
        world.history = world.full_history("setup").await;
        world.last_id = world
            .history
            .last()
            .and_then(|f| f["id"].as_u64())
            .expect("history has ids");
        world
    }

    async fn member(url: &str, name: &str) -> Client {
        let mut c = Client::connect(url).await;
        c.send(json!({"action":"setName","name":name})).await;
        let joined = json!(format!("{name} has joined the chat"));
        c.until("setup", |f| f["systemMessage"] == joined).await;
        c
    }

    fn addr(&self) -> SocketAddr {
        self.stack.as_ref().expect("running").addr
    }

    fn url(&self) -> String {
        self.stack.as_ref().expect("running").websocket_url.clone()
    }

    /// Carol's view of the whole public history, following `next`.
    async fn full_history(&mut self, context: &str) -> Vec<Value> {
        let mut frames = Vec::new();
        let mut request = json!({"action":"history","after":0,"limit":100});
        loop {
            self.carol.send(request.clone()).await;
            let page = self.carol.next(context).await;
            let got = page["history"]["frames"]
                .as_array()
                .unwrap_or_else(|| panic!("{context}: not a history page: {page}"));
            frames.extend(got.iter().cloned());
            match page["history"].get("next") {
                Some(next) => request = next.clone(),
                None => return frames,
            }
        }
    }

    /// Runs one case and checks what its sender got.
    async fn run(&mut self, case: &Case) {
        let label = case.label.as_str();
        match case.who {
            Who::Alice | Who::Carol => {
                let sender = if case.who == Who::Alice {
                    &mut self.alice
                } else {
                    &mut self.carol
                };
                match &case.out {
                    Out::Text(t) => sender.send_message(Message::text(t.clone())).await,
                    Out::Binary(b) => sender.send_message(Message::binary(b.clone())).await,
                    Out::Raw(_) => panic!("{label}: raw frames need a fresh connection"),
                }
                let reply = sender.next(label).await;
                match &case.expect {
                    Expect::Error(code, action) => assert_error_frame(label, &reply, code, *action),
                    Expect::Frame(frame) => assert_eq!(&reply, frame, "{label}"),
                    _ => panic!("{label}: an existing client must get an error frame"),
                }
            }
            Who::Fresh => self.run_fresh(case).await,
        }
    }

    async fn run_fresh(&mut self, case: &Case) {
        let label = case.label.as_str();
        match (&case.out, &case.expect) {
            (Out::Text(_) | Out::Binary(_), Expect::Closed(code)) => {
                let mut c = Client::connect(&self.url()).await;
                match &case.out {
                    Out::Text(t) => c.send_message(Message::text(t.clone())).await,
                    Out::Binary(b) => c.send_message(Message::binary(b.clone())).await,
                    Out::Raw(_) => unreachable!("matched above"),
                }
                assert_eq!(c.closed(label).await, Some(*code), "{label}");
            }
            (Out::Raw(writes), expect) => {
                let mut raw = RawClient::connect(self.addr(), "prod").await;
                for (i, bytes) in writes.iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    raw.write(bytes).await;
                }
                let frames = raw.frames_until_eof(label).await;
                let texts: Vec<String> = frames
                    .iter()
                    .filter(|(op, _)| *op == 0x1)
                    .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
                    .collect();
                assert!(texts.is_empty(), "{label}: got frames {texts:?}");
                let close_code = frames
                    .iter()
                    .find(|(op, _)| *op == 0x8)
                    .and_then(|(_, p)| p.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])));
                match expect {
                    Expect::Closed(code) => {
                        assert_eq!(close_code, Some(u16::from(*code)), "{label}: {frames:?}")
                    }
                    // The server answers the client's close and hears nothing after it.
                    Expect::Nothing => assert_eq!(close_code, Some(1000), "{label}: {frames:?}"),
                    Expect::Error(..) | Expect::Frame(_) => {
                        panic!("{label}: raw cases never get an error frame")
                    }
                }
            }
            _ => panic!("{label}: not a case for a fresh connection"),
        }
    }

    /// Proves nothing happened since the last checkpoint: alice posts the next one; it must be
    /// every member's very next frame, with the very next id; carol's history after the last
    /// one must be exactly it.
    async fn checkpoint(&mut self, label: &str) {
        let context = format!("after case {label:?}");
        let text = format!("checkpoint after {label}");
        self.alice
            .send(json!({"action":"sendPublic","message":text}))
            .await;
        let expected_text = json!(format!("alice: {text}"));
        let mut frame = Value::Null;
        for (who, c) in [
            ("alice", &mut self.alice),
            ("bob", &mut self.bob),
            ("José", &mut self.jose),
        ] {
            let got = c.next(&format!("{context}, {who}")).await;
            assert_eq!(
                got["publicMessage"], expected_text,
                "{context}: {who} received something else first: {got}"
            );
            assert_eq!(
                got["id"].as_u64(),
                Some(self.last_id + 1),
                "{context}: an event was written between two checkpoints: {got}"
            );
            frame = got;
        }
        self.carol
            .send(json!({"action":"history","after":self.last_id}))
            .await;
        let page = self.carol.next(&context).await;
        assert_eq!(
            page,
            json!({"history":{"frames":[frame.clone()]}}),
            "{context}: carol's next frame must be the history holding only the checkpoint"
        );
        self.last_id += 1;
        self.history.push(frame);
    }

    async fn stop(mut self) {
        if let Some(stack) = self.stack.take() {
            stack.shutdown().await.expect("clean shutdown");
        }
    }
}

/// The README's error frame: only `error`, with `code`, a `message` for a person, and `action`
/// exactly when it could be read.
fn assert_error_frame(label: &str, frame: &Value, code: &str, action: Option<&str>) {
    let keys: Vec<&String> = frame
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(keys, ["error"], "{label}: not an error frame: {frame}");
    let error = &frame["error"];
    assert_eq!(error["code"], json!(code), "{label}: {frame}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| !m.trim().is_empty()),
        "{label}: no message for a person: {frame}"
    );
    assert_eq!(error["action"].as_str(), action, "{label}: {frame}");
    let allowed = ["code", "message", "action"];
    assert!(
        error
            .as_object()
            .is_some_and(|o| o.keys().all(|k| allowed.contains(&k.as_str()))),
        "{label}: unexpected keys: {frame}"
    );
}

/// The size of the corpus as the README's *Tests* section states it ("a corpus of N bad
/// inputs").
fn readme_corpus_size() -> usize {
    const README: &str = include_str!("../../README.md");
    let (_, rest) = README
        .split_once("a corpus of ")
        .expect("the README states the corpus size");
    rest.split_whitespace()
        .next()
        .and_then(|n| n.replace(',', "").parse().ok())
        .expect("a number after \"a corpus of\"")
}

#[tokio::test]
async fn every_bad_input_gets_its_error_and_changes_nothing() {
    // GIVEN alice, bob and José are members, carol is connected without a name
    let mut world = World::start().await;
    let before = world.history.clone();
    let cases = corpus();
    assert_eq!(
        cases.len(),
        readme_corpus_size(),
        "the README (Tests) says how many bad inputs the corpus has"
    );
    let mut labels = std::collections::HashSet::new();
    for case in &cases {
        assert!(
            labels.insert(case.label.as_str()),
            "duplicate {}",
            case.label
        );
    }
    for case in &cases {
        // WHEN one client sends the bad input
        world.run(case).await;
        // THEN (run) it got exactly its error, AND nobody got anything, nothing was written
        world.checkpoint(&case.label).await;
    }

    // AND the public history is what it was, plus the checkpoints
    let after = world.full_history("final history").await;
    assert_eq!(
        after[..before.len()],
        before[..],
        "history before the cases"
    );
    assert_eq!(
        after, world.history,
        "history is the old one plus the checkpoints"
    );

    // AND the names are unchanged: carol joins and sees exactly the three members and herself
    world
        .carol
        .send(json!({"action":"setName","name":"carol"}))
        .await;
    let list = json!(["alice", "bob", "carol", "José"]);
    for (who, c) in [
        ("carol", &mut world.carol),
        ("alice", &mut world.alice),
        ("bob", &mut world.bob),
        ("José", &mut world.jose),
    ] {
        let f = c.next(&format!("final join, {who}")).await;
        assert_eq!(f["members"], list, "{who}: {f}");
        let f = c.next(&format!("final join, {who}")).await;
        assert_eq!(
            f["systemMessage"],
            json!("carol has joined the chat"),
            "{who}"
        );
    }
    // AND nobody got the name "ghost" from the frames sent after a close
    let mut ghost = Client::connect(&world.url()).await;
    ghost.send(json!({"action":"setName","name":"ghost"})).await;
    let f = ghost.next("ghost joins").await;
    assert!(f["members"].as_array().is_some_and(|m| m.len() == 5), "{f}");
    for c in [
        &mut world.alice,
        &mut world.bob,
        &mut world.jose,
        &mut world.carol,
    ] {
        c.until("ghost joined", |f| {
            f["systemMessage"] == json!("ghost has joined the chat")
        })
        .await;
    }
    ghost
        .until("ghost joined", |f| {
            f["systemMessage"] == json!("ghost has joined the chat")
        })
        .await;

    // AND alice and bob still chat, privately too
    world
        .bob
        .send(json!({"action":"sendPrivate","to":"alice","message":"still here"}))
        .await;
    assert_eq!(
        world.alice.next("private after the corpus").await["privateMessage"],
        json!("bob: still here")
    );
    for (who, c) in [
        ("alice", &mut world.alice),
        ("bob", &mut world.bob),
        ("José", &mut world.jose),
        ("carol", &mut world.carol),
        ("ghost", &mut ghost),
    ] {
        c.expect_silence(&format!("the end, {who}")).await;
    }
    world.stop().await;
}
