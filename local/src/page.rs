//! The chat's web page, served by `chat-local` next to the WebSocket API: `GET /` (the page),
//! `/app.js` (its script) and `/client.js` (the client library). The files live under
//! `client/` and are embedded in the binary, so running the chat needs nothing but Rust (no
//! npm step). The same files work from any static host, pointed at a stack with `?ws=wss://…`.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const INDEX: &str = include_str!("../../client/page/index.html");
const APP: &str = include_str!("../../client/page/app.js");
const CLIENT: &str = include_str!("../../client/src/index.js");

/// The `<meta>` the page reads its WebSocket path from (when no `?ws=` is given).
const PATH_META: &str = r#"<meta name="chat-websocket-path" content="/prod">"#;

/// `GET /`: the page, with this stage's WebSocket path in it.
pub fn index(stage: &str) -> Response {
    // The stage is validated by axum's router as a path segment; it is put in an attribute,
    // so escape what could end it anyway.
    let escaped = stage
        .replace('&', "&amp;")
        .replace('"', "&quot;")
        .replace('<', "&lt;");
    let page = INDEX.replacen(
        PATH_META,
        &format!(r#"<meta name="chat-websocket-path" content="/{escaped}">"#),
        1,
    );
    (no_cache(), Html(page)).into_response()
}

/// `GET /app.js`: the page's script.
pub async fn app() -> Response {
    javascript(APP)
}

/// `GET /client.js`: the client library.
pub async fn client() -> Response {
    javascript(CLIENT)
}

fn javascript(body: &'static str) -> Response {
    (
        no_cache(),
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        body,
    )
        .into_response()
}

/// A rebuilt binary serves new files: browsers must not keep old ones.
fn no_cache() -> [(header::HeaderName, &'static str); 1] {
    [(header::CACHE_CONTROL, "no-cache")]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_names_its_stage() {
        // GIVEN the embedded page WHEN the stage is substituted THEN the marker was found
        assert!(INDEX.contains(PATH_META), "index.html lost its path <meta>");
    }
}
