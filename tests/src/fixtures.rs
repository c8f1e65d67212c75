//! Event JSON as AWS sends it, kept in `tests/fixtures/` (see the roundtrip test there).
//!
//! These helpers panic with the file name instead of returning errors: a missing or broken
//! fixture is a bug in the test suite, and the panic message is the clearest report of it.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

/// The path of `tests/fixtures/<name>`.
pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// The text of `tests/fixtures/<name>`.
pub fn fixture(name: &str) -> String {
    let path = fixture_path(name);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()))
}

/// `tests/fixtures/<name>` parsed as JSON.
pub fn fixture_json(name: &str) -> serde_json::Value {
    fixture_as(name)
}

/// `tests/fixtures/<name>` parsed into `T` (e.g. `ApiGatewayWebsocketProxyRequest`).
pub fn fixture_as<T: DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| {
        panic!(
            "parsing fixture {name} as {}: {e}",
            std::any::type_name::<T>()
        )
    })
}
