//! `chat-bench`: see the library for what each mode measures.

use std::process::ExitCode;

use anyhow::Context;
use chat_bench::agent::{self, AgentOptions};
use chat_bench::busy_room::{self, BusyRoomOptions};
use chat_bench::cost::{self, CostOptions};
use chat_bench::fanout::{self, FanoutOptions};
use chat_bench::fanout_only::{self, FanoutOnlyOptions};
use chat_bench::joinstorm::{self, JoinstormOptions};
use chat_bench::sink::{self, SinkOptions};
use chat_bench::soak::{self, SoakOptions};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tracing_subscriber::EnvFilter;

/// Benchmark and soak tool of the chat, over loopback. Without a subcommand it runs `fanout`.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    fanout: FanoutOptions,
}

#[derive(Subcommand)]
enum Command {
    /// One public message to N WebSocket clients through the local stack, against raw
    /// @connections capacity and a naive fan-out (the default).
    Fanout(FanoutOptions),
    /// The fan-out alone, to a sink process: time and memory.
    FanoutOnly(FanoutOnlyOptions),
    /// Steady public traffic to N members: loss, order, duplicates, latency.
    Soak(SoakOptions),
    /// New connections joining one room at a steady rate against the AWS-like store: the
    /// room's join ceiling, errors, latency, ids.
    Joinstorm(JoinstormOptions),
    /// One busy room, some members batched (`?batch=1`) and some not, E events/s through the
    /// mapping's batching window, against a stand-in @connections counting POSTs.
    BusyRoom(BusyRoomOptions),
    /// Scripted scenarios priced by the local stack's bill meter, batched and unbatched.
    Cost(CostOptions),
    /// The stand-in @connections endpoint fanout-only runs (prints its URL on stdout).
    Sink(SinkOptions),
    /// A block of WebSocket clients, driven by fanout and soak over stdin/stdout.
    #[command(hide = true)]
    Clients(AgentOptions),
}

#[tokio::main]
async fn main() -> ExitCode {
    // Warnings only by default: the stack logs every connection and request at info.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    match run(cli.command.unwrap_or(Command::Fanout(cli.fanout))).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("chat-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs one mode; `Ok(false)` when its checks failed.
async fn run(command: Command) -> anyhow::Result<bool> {
    let exe = || std::env::current_exe().context("finding this program to start its helpers");
    match command {
        Command::Fanout(opts) => {
            let report = fanout::run(&opts, &exe()?).await?;
            emit(opts.json, &report, fanout::print)?;
            Ok(report.ok)
        }
        Command::FanoutOnly(opts) => {
            let report = fanout_only::run(&opts, &exe()?).await?;
            emit(opts.json, &report, fanout_only::print)?;
            Ok(report.ok)
        }
        Command::Joinstorm(opts) => {
            let report = joinstorm::run(&opts).await?;
            emit(opts.json, &report, joinstorm::print)?;
            Ok(report.ok)
        }
        Command::Soak(opts) => {
            let report = soak::run(&opts, &exe()?).await?;
            emit(opts.json, &report, soak::print)?;
            Ok(report.ok)
        }
        Command::BusyRoom(opts) => {
            let report = busy_room::run(&opts, &exe()?).await?;
            emit(opts.json, &report, busy_room::print)?;
            Ok(report.ok)
        }
        Command::Cost(opts) => {
            let report = cost::run(&opts).await?;
            emit(opts.json, &report, cost::print)?;
            Ok(report.ok)
        }
        Command::Sink(opts) => {
            sink::serve(&opts).await?;
            Ok(true)
        }
        Command::Clients(opts) => {
            agent::run(&opts).await?;
            Ok(true)
        }
    }
}

fn emit<T: Serialize>(json: bool, report: &T, print: fn(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print(report);
    }
    Ok(())
}
