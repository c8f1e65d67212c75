//! A private moto server per test: the real DynamoDB and DynamoDB Streams wire protocol on a
//! free loopback port, started from the project's `.venv` and killed when the handle drops.
//!
//! One server per test (not one per binary) because every `#[tokio::test]` has its own runtime
//! and a shared server would need to outlive them all with nobody left to kill it; moto starts
//! in about a second, and tests use [`unique_name`] for tables anyway.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_dynamodb::config::{Credentials, SharedCredentialsProvider};

/// What to do when moto cannot be used; every error of this module ends with it.
const HOW_TO_FIX: &str = "run the README's test command, which installs moto into .venv \
     (or point MOTO_SERVER at a moto_server executable)";

/// How long a fresh moto may take to answer; it is about 1 s on the 2-core CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A free port can be taken by someone else between our probe and moto's bind; a few tries
/// make that race harmless.
const START_ATTEMPTS: usize = 3;

/// A running moto server, killed (and reaped) on drop.
#[derive(Debug)]
pub struct Moto {
    child: Child,
    port: u16,
    log: PathBuf,
    startup: Duration,
}

impl Moto {
    /// Starts moto from [`Moto::executable`] and waits until it answers DynamoDB calls.
    ///
    /// Never skips: if moto is missing or does not come up, the error says what to do.
    pub async fn start() -> anyhow::Result<Moto> {
        Self::start_with(&Self::executable()).await
    }

    /// Starts moto from an explicit executable (the self-test uses it to check the error for a
    /// missing moto without changing the process environment other tests read).
    pub async fn start_with(executable: &Path) -> anyhow::Result<Moto> {
        if !executable.is_file() {
            bail!(
                "moto server executable not found at {}: {HOW_TO_FIX}",
                executable.display()
            );
        }
        let mut last_error = anyhow!("moto was never started");
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(executable).await {
                Ok(moto) => return Ok(moto),
                Err(error) => last_error = error,
            }
        }
        Err(last_error)
    }

    /// Where moto is looked for: `$MOTO_SERVER` if set, else `tests/moto-server` (the virtualenv's moto, serialised).
    pub fn executable() -> PathBuf {
        Self::executable_from(std::env::var_os("MOTO_SERVER"))
    }

    /// [`Moto::executable`] for a given value of `MOTO_SERVER` (pure, for tests).
    pub fn executable_from(moto_server_env: Option<std::ffi::OsString>) -> PathBuf {
        match moto_server_env {
            Some(path) if !path.is_empty() => PathBuf::from(path),
            _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("moto-server"),
        }
    }

    async fn start_once(executable: &Path) -> anyhow::Result<Moto> {
        let began = Instant::now();
        let port = free_port()?;
        let log = std::env::temp_dir().join(format!("chat-tests-moto-{port}.log"));
        let log_file =
            File::create(&log).with_context(|| format!("creating moto log {}", log.display()))?;
        let log_err = log_file.try_clone().context("cloning moto log handle")?;
        // std::process, not tokio::process: the child must be killable from a synchronous Drop
        // and must not depend on the runtime of whichever test started it.
        let child = Command::new(executable)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawning {}: {HOW_TO_FIX}", executable.display()))?;
        let mut moto = Moto {
            child,
            port,
            log,
            startup: Duration::ZERO,
        };
        moto.wait_until_ready(began).await?;
        moto.startup = began.elapsed();
        Ok(moto)
    }

    /// Polls until moto answers a real ListTables call; fails early if the process died.
    async fn wait_until_ready(&mut self, began: Instant) -> anyhow::Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let client = self.dynamodb();
        loop {
            if let Some(status) = self.child.try_wait().context("polling moto process")? {
                bail!(
                    "moto exited with {status} before answering on port {}; log {}:\n{}\n{HOW_TO_FIX}",
                    self.port,
                    self.log.display(),
                    self.log_tail()
                );
            }
            // The TCP probe keeps the SDK (and its retries) out of the loop until moto listens.
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && client.list_tables().send().await.is_ok()
            {
                return Ok(());
            }
            if began.elapsed() > START_TIMEOUT {
                bail!(
                    "moto did not answer on {} within {START_TIMEOUT:?}; log {}:\n{}\n{HOW_TO_FIX}",
                    self.endpoint(),
                    self.log.display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The port moto listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// How long [`Moto::start`] took from spawn to the first answered ListTables.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// Where moto's stdout/stderr go (useful when a test fails).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SDK configuration for moto: its endpoint, `us-east-1`, static test credentials.
    pub fn sdk_config(&self) -> SdkConfig {
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(self.endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(test_credentials()))
            .build()
    }

    /// A DynamoDB client talking to this moto.
    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk_config())
    }

    /// A DynamoDB Streams client talking to this moto.
    pub fn streams(&self) -> aws_sdk_dynamodbstreams::Client {
        aws_sdk_dynamodbstreams::Client::new(&self.sdk_config())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        // Errors here mean the process is already gone, which is what we want.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Static credentials for local servers (moto and the `@connections` endpoint ignore them, but
/// the SDK must have some to sign with).
pub fn test_credentials() -> Credentials {
    Credentials::new("test", "test", None, None, "chat-tests")
}

/// Asks the OS for a free loopback port and releases it for the server to bind.
pub fn free_port() -> anyhow::Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0 for a port")?;
    Ok(listener.local_addr().context("reading probe port")?.port())
}

/// A name no other test (in this or a concurrent test process) uses: `prefix-<pid>-<n>-<nanos>`.
/// DynamoDB table names allow `[a-zA-Z0-9_.-]`, 3..=255 characters.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}
