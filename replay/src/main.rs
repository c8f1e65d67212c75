//! `chat-replay`: the operator tool's entry point. Parses the command line, runs the command
//! (all logic is in the library), and turns an error into one line on stderr and exit code 1.

use std::process::ExitCode;

use clap::Parser;

// `redeliver` runs the fan-out's code at the fan-out's rates: the same allocator as the fan-out
// (README, Benchmarks: glibc's malloc cost about a quarter more CPU per delivery).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    chat_replay::cli::init_logging();
    let cli = chat_replay::cli::Cli::parse();
    match chat_replay::cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` puts the whole cause chain on the one line.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
