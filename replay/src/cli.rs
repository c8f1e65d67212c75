//! The command line: options (clap derive), their help, and the wiring of each command to the
//! library modules. Printing and exit codes stay in `main.rs`; everything an operator reads in
//! `--help` is here.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use chat_shared::config::{FanoutConfig, Retention, Tables};
use chat_shared::delivery::ManagementApi;
use chat_shared::keys::DEFAULT_ROOM;
use chat_shared::store::dynamodb::DynamoStore;
use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::aws::Target;
use crate::error::ReplayError;
use crate::export::export;
use crate::log::{EventLog, DEFAULT_PAGE_SIZE};
use crate::progress;
use crate::range::{parse_time, EventFilter};
use crate::rebuild::{rebuild, ConnectionsTable};
use crate::redeliver::{redeliver, RedeliverOptions};

#[derive(Debug, Parser)]
#[command(
    name = "chat-replay",
    version,
    about = "Operator tool for the chat's event log: export it, re-drive its fan-out, rebuild the connections table from it",
    long_about = "Operator tool for the chat's event log (the DynamoDB events table is the room's \
        message history): export it as JSON Lines, re-drive its fan-out to the current members, \
        and rebuild the connections table's derived state from it.\n\n\
        Writes happen only in `redeliver` without --dry-run and in `rebuild --apply`; `export` \
        never writes. Logs go to stderr (RUST_LOG, default warn); a progress bar is shown on \
        stderr when it is a terminal."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write the room's events in an id and/or time range to stdout as JSON Lines, in id order.
    #[command(
        long_about = "Write the room's events in an id and/or time range as JSON Lines, \
        one event per line in id order: {\"id\",\"ts\",\"type\",\"room\", then the event's fields: \
        \"connectionId\",\"name\", and as the type has them \"oldName\",\"message\",\
        \"toConnectionId\",\"toName\",\"reason\",\"identity\",\"toIdentity\"}.\n\n\
        This is an operator export: it includes every PRIVATE message (PrivateMessageSent, with \
        both parties, their identities and the text), where the chat's own history serves each \
        only to its two authenticated parties. Handle the output accordingly.\n\n\
        The table is read page by page (--page-size items per Query) and each line is written as \
        it arrives, so memory stays constant however long the range; the read stops at --to-id. \
        Events past their retention (expiresAt) are left out, as the chat's reads leave them out. \
        Never writes to DynamoDB.\n\n\
        --all-rooms exports every room, one after another in name order; finding the rooms \
        scans the whole events table (a Scan pays for every item it reads)."
    )]
    Export(ExportArgs),
    /// Re-drive the fan-out of an id range to the current members (clients dedupe by id).
    #[command(
        long_about = "Re-drive the fan-out of the room's events in a range to the members \
        connected now, exactly as the stream fan-out does (chat_shared::fanout::deliver_event), \
        one event at a time in id order.\n\n\
        Every frame carries its event's id, so a client that already has an event drops the \
        copy: a redelivery fills gaps and duplicates nothing visible. It cannot restore the past: \
        a join's `members` frame lists the members of now, and members who joined later also \
        receive the earlier events. Private messages go to their recipient's connection only.\n\n\
        Like the stream fan-out, a connection that answers 410 Gone is pruned, which records its \
        MemberLeft: the one write a redelivery makes. If an event keeps failing (throttling, \
        5xx), the run stops there and says which --from-id resumes it.\n\n\
        --dry-run lists each event with the number of connections it would be posted to, and \
        posts and writes nothing."
    )]
    Redeliver(RedeliverArgs),
    /// Rebuild a room's derived state (counter, members, names) from its log; report drift, fix with --apply.
    #[command(
        long_about = "Derive from the room's event log what the tables should hold for the \
        room and report where they differ. A dry run is the default: nothing is written without \
        --apply.\n\n\
        From the log: the room's counter (the events table's item at seq 0) must be at least the \
        highest event id, and a connection is a member of the room under its last \
        MemberJoined/MemberRenamed name unless a MemberLeft follows. Drift, and what --apply \
        does about it:\n  \
        counterBehind      counter missing or below the highest id: set it to that id\n  \
        memberMissing      a live member per the log without its MEMBERS# item or rooms entry: put them (with the connection's batch opt-in)\n  \
        memberNameDiffers  a MEMBERS# item's name differs from the log: set it from the log\n  \
        leftButPresent     a MEMBERS# item of a connection that left the room: delete it (and the rooms entry)\n  \
        orphanMember       a MEMBERS# item whose connection is gone: delete it\n  \
        nameDiffers        a member's CONN# name/nameKey differs from the log: set them from the log\n  \
        claimMissing       a member's NAME# claim missing or held by another: put it (with the member's expiresAt)\n\n\
        Members without a connection (joined per the log, but their CONN# item expired by TTL or \
        was deleted without an event) are reported only: no MemberLeft is recorded for them, \
        because the store records one only for a connection it can still read. Name claims are \
        global, not per room: a claim whose holder is gone frees itself when it expires. A member \
        whose connection has a rename in progress (its renaming marker) is reported and not \
        compared: the chat completes the rename at its next setName. Expired items are treated \
        as absent, as every read of the chat treats them.\n\n\
        Each fix is a conditional write on the item as read, so a change made by the chat \
        meanwhile is never undone (the fix is reported as skipped; run again). Best run when the \
        room is quiet."
    )]
    Rebuild(RebuildArgs),
}

/// Where the tables are.
#[derive(Debug, Args)]
pub struct Common {
    /// DynamoDB API endpoint (moto, DynamoDB Local); omit for AWS with the default credential
    /// chain. With an endpoint, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY are used if set, else
    /// placeholder credentials.
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// AWS region (also signs requests to a local endpoint).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    pub region: String,
    /// The events table (the message history).
    #[arg(long, env = "EVENTS_TABLE", value_name = "TABLE")]
    pub events_table: String,
    /// The connections table (needed by redeliver and rebuild).
    #[arg(long, env = "CONNECTIONS_TABLE", value_name = "TABLE")]
    pub connections_table: Option<String>,
    /// The room (its partition key is ROOM#<room>).
    #[arg(long, default_value = DEFAULT_ROOM, value_parser = parse_room)]
    pub room: String,
    /// Items per Query page when reading the log.
    #[arg(long, default_value_t = DEFAULT_PAGE_SIZE, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub page_size: i32,
}

impl Common {
    fn target(&self) -> Target {
        Target {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
        }
    }

    fn connections_table(&self, command: &str) -> Result<&str, ReplayError> {
        self.connections_table.as_deref().ok_or_else(|| {
            ReplayError::Usage(format!(
                "{command} needs the connections table: pass --connections-table or set CONNECTIONS_TABLE"
            ))
        })
    }
}

/// Which events (all bounds inclusive; omit a bound to leave that side open).
#[derive(Debug, Args)]
pub struct RangeArgs {
    /// First event id.
    #[arg(long, value_name = "ID")]
    pub from_id: Option<u64>,
    /// Last event id; reading stops there.
    #[arg(long, value_name = "ID")]
    pub to_id: Option<u64>,
    /// Only events committed at or after this time (RFC 3339 or epoch ms; filters on `ts`).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<i64>,
    /// Only events committed at or before this time (RFC 3339 or epoch ms).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<i64>,
}

impl RangeArgs {
    fn filter(&self) -> Result<EventFilter, ReplayError> {
        EventFilter::new(self.from_id, self.to_id, self.since, self.until)
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Write to this file instead of stdout.
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Every room, one after another in name order (each in id order), instead of --room.
    /// Finding the rooms scans the whole events table.
    #[arg(long, conflicts_with = "room")]
    pub all_rooms: bool,
}

#[derive(Debug, Args)]
pub struct RedeliverArgs {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub range: RangeArgs,
    /// The @connections (Management API) endpoint; on AWS
    /// https://{api-id}.execute-api.{region}.amazonaws.com/{stage}.
    #[arg(long, env = "CONNECTIONS_ENDPOINT", value_name = "URL")]
    pub connections_endpoint: String,
    /// @connections calls in flight at once for one event [default: FANOUT_CONCURRENCY, else 256].
    #[arg(long, value_parser = parse_concurrency)]
    pub concurrency: Option<usize>,
    /// List each event and how many connections it would be posted to; post and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON object per event instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RebuildArgs {
    #[command(flatten)]
    pub common: Common,
    /// Fix the drift found (conditional writes; without it nothing is written).
    #[arg(long, conflicts_with = "dry_run")]
    pub apply: bool,
    /// Report only (the default).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_room(text: &str) -> Result<String, String> {
    chat_shared::validation::validate_room(text, "--room")
        .map(|()| text.to_owned())
        .map_err(|refusal| refusal.message)
}

fn parse_concurrency(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(format!("{text:?} is not a number from 1 to 10000")),
    }
}

/// Logs to stderr (stdout carries the export), filtered by RUST_LOG, default `warn`.
pub fn init_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let _already_set = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Export(args) => run_export(args).await,
        Command::Redeliver(args) => run_redeliver(args).await,
        Command::Rebuild(args) => run_rebuild(args).await,
    }
}

async fn open_log(
    common: &Common,
) -> Result<(Target, aws_config::SdkConfig, EventLog), ReplayError> {
    let target = common.target();
    let sdk_config = target.sdk_config().await;
    let client = aws_sdk_dynamodb::Client::new(&sdk_config);
    let log = EventLog::new(client, &common.events_table, &common.room, &target.label())
        .with_page_size(common.page_size);
    log.ensure_exists().await?;
    Ok((target, sdk_config, log))
}

async fn run_export(args: ExportArgs) -> anyhow::Result<()> {
    let filter = args.range.filter()?;
    let (target, _, log) = open_log(&args.common).await?;
    let rooms = if args.all_rooms {
        crate::log::rooms(log.client(), log.table(), &target.label()).await?
    } else {
        vec![args.common.room.clone()]
    };
    let sink: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(
            File::create(path)
                .with_context(|| format!("cannot create --output {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = BufWriter::with_capacity(64 * 1024, sink);
    let bar = progress::bar("exported", filter.id_span());
    let began = std::time::Instant::now();
    let (mut exported, mut malformed) = (0, 0);
    for room in &rooms {
        let log = log.in_room(room);
        let result = export(&log, &filter, chat_shared::now_ms(), &mut out, &bar).await;
        match result {
            Ok(summary) => {
                exported += summary.exported;
                malformed += summary.malformed;
            }
            // `chat-replay export | head` closing the pipe is the reader being done, not a
            // failure.
            Err(ReplayError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                bar.finish_and_clear();
                return Ok(());
            }
            Err(e) => {
                bar.finish_and_clear();
                return Err(e.into());
            }
        }
    }
    bar.finish_and_clear();
    let malformed = match malformed {
        0 => String::new(),
        n => format!("; {n} undecodable item(s) skipped (see the warnings)"),
    };
    let secs = began.elapsed().as_secs_f64();
    let rate = if secs > 0.0 {
        exported as f64 / secs
    } else {
        0.0
    };
    let rooms = match rooms.len() {
        1 => String::new(),
        n => format!(" from {n} rooms"),
    };
    eprintln!("exported {exported} events{rooms} in {secs:.2} s ({rate:.0} events/s){malformed}");
    Ok(())
}

async fn run_redeliver(args: RedeliverArgs) -> anyhow::Result<()> {
    let filter = args.range.filter()?;
    let connections = args.common.connections_table("redeliver")?.to_owned();
    let (target, sdk_config, log) = open_log(&args.common).await?;
    crate::aws::ensure_table(log.client(), &connections, &target.label()).await?;
    let retention = Retention::from_env()
        .context("reading the retention the pruned leaves are recorded with")?;
    let store = DynamoStore::new(
        log.client().clone(),
        Tables {
            events: args.common.events_table.clone(),
            connections,
        },
        retention,
    );
    let api = ManagementApi::new(&sdk_config, &args.connections_endpoint);
    // The deployed fan-out's settings (FANOUT_CONCURRENCY, PRESENCE_BROADCAST_LIMIT, ...), so a
    // redelivery follows the same rules as the stream did.
    let mut fanout = FanoutConfig::from_env().context("reading the fan-out settings")?;
    if let Some(concurrency) = args.concurrency {
        fanout.concurrency = concurrency;
    }
    let options = RedeliverOptions {
        filter,
        dry_run: args.dry_run,
        json: args.json,
        fanout,
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    let bar = progress::bar(
        if args.dry_run {
            "listed"
        } else {
            "redelivered"
        },
        filter.id_span(),
    );
    let result = redeliver(
        &log,
        &store,
        &api,
        &options,
        chat_shared::now_ms,
        &mut out,
        &bar,
    )
    .await;
    bar.finish_and_clear();
    let summary = result?;
    if args.dry_run {
        eprintln!(
            "dry run: {} events would be posted to {} connection(s) in all; nothing was sent",
            summary.events, summary.recipients
        );
    } else {
        eprintln!(
            "redelivered {} events: {} deliveries, {} connection(s) pruned, {} rejected",
            summary.events, summary.delivered, summary.pruned, summary.rejected
        );
    }
    if summary.malformed > 0 {
        eprintln!(
            "{} undecodable item(s) skipped (see the warnings)",
            summary.malformed
        );
    }
    Ok(())
}

async fn run_rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let connections_table = args.common.connections_table("rebuild")?.to_owned();
    let (target, _, log) = open_log(&args.common).await?;
    let connections = ConnectionsTable::new(
        log.client().clone(),
        &connections_table,
        &args.common.events_table,
        &args.common.room,
        &target.label(),
    );
    connections.ensure_exists().await?;
    let bar = progress::bar("read", None);
    let result = rebuild(&log, &connections, args.apply, chat_shared::now_ms(), &bar).await;
    bar.finish_and_clear();
    let report = result?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write!(out, "{report}")?;
    }
    out.flush()?;
    Ok(())
}
