//! Logging for the binaries: `tracing` to stdout (CloudWatch on AWS), filtered by `RUST_LOG`
//! (default `info`). Message bodies are only ever logged at `debug` or below.

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
