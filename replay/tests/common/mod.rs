//! What every chat-replay test needs: a private moto with the two tables, the chat's own store
//! to build state through, the tool's readers on the same tables, and a way to run the built
//! binary against them.

#![allow(dead_code)] // each test binary uses its own part of this module

use std::process::Output;

use aws_sdk_dynamodb::Client;
use chat_replay::log::EventLog;
use chat_replay::rebuild::ConnectionsTable;
use chat_shared::config::{Retention, Tables};
use chat_shared::events::StoredEvent;
use chat_shared::store::dynamodb::{create_tables, DynamoStore};
use chat_shared::store::ChatStore;
use chat_shared::validation::{validate_name, ValidName};
use chat_tests::{unique_name, Moto};

pub struct World {
    pub moto: Moto,
    pub tables: Tables,
    pub store: DynamoStore,
    pub client: Client,
}

impl World {
    /// A fresh moto (the test fails, never skips, if it cannot start) with both tables.
    pub async fn new() -> World {
        let moto = Moto::start()
            .await
            .expect("moto must start for these tests");
        let tables = Tables {
            events: unique_name("events"),
            connections: unique_name("connections"),
        };
        let client = moto.dynamodb();
        create_tables(&client, &tables)
            .await
            .expect("create tables");
        // Small member pages so the fan-out walks several of them.
        let store = DynamoStore::new(client.clone(), tables.clone(), Retention::default())
            .with_page_limit(2);
        World {
            moto,
            tables,
            store,
            client,
        }
    }

    /// The tool's reader of this world's log, with tiny pages so every read spans several.
    pub fn log(&self) -> EventLog {
        EventLog::new(
            self.client.clone(),
            &self.tables.events,
            "lobby",
            &self.moto.endpoint(),
        )
        .with_page_size(2)
    }

    pub fn connections(&self) -> ConnectionsTable {
        ConnectionsTable::new(
            self.client.clone(),
            &self.tables.connections,
            &self.tables.events,
            "lobby",
            &self.moto.endpoint(),
        )
    }

    /// Connects `id` and joins it as `name`; returns the MemberJoined.
    pub async fn join(&self, id: &str, name: &str, now_ms: i64) -> StoredEvent {
        self.store
            .add_connection(id, now_ms)
            .await
            .expect("add connection");
        self.store
            .set_name(id, &valid(name), now_ms)
            .await
            .expect("set name")
            .pop()
            .expect("a first name records MemberJoined")
    }

    /// Runs the built `chat-replay` with `args`, the table names and moto's endpoint added
    /// through the environment and `--endpoint`.
    pub async fn run(&self, args: &[&str]) -> Output {
        run_bin(args, &self.moto.endpoint(), &self.tables).await
    }
}

pub async fn run_bin(args: &[&str], endpoint: &str, tables: &Tables) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--endpoint", endpoint]);
    tokio::process::Command::new(env!("CARGO_BIN_EXE_chat-replay"))
        .args(&all)
        .env("EVENTS_TABLE", &tables.events)
        .env("CONNECTIONS_TABLE", &tables.connections)
        .env_remove("RUST_LOG")
        .env_remove("AWS_REGION")
        .output()
        .await
        .expect("run chat-replay")
}

pub fn valid(name: &str) -> ValidName {
    validate_name(name).expect("a valid name")
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
