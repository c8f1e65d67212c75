//! Logging for the binaries: `tracing` filtered by `RUST_LOG` (default `info`). The Lambda
//! functions log to stdout (CloudWatch on AWS); `chat-local` logs to stderr, because its stdout
//! carries the URLs that scripts read. Message bodies are only ever logged at `debug` or below.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // CloudWatch stamps each line itself and shows no colours.
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}

/// Logging for `chat-local`: the same filter, on stderr, with timestamps (nothing adds them
/// locally, as CloudWatch does on AWS).
pub fn init_local() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
