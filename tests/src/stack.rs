use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::Broker;

/// Path of a binary of this workspace, built beside the test binaries.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("the test binary has no parent directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built: run `cargo build -p {name}` (make test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running command-api process. Killed when dropped.
pub struct CommandApi {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// How a command-api process is configured.
#[derive(Clone, Debug)]
pub struct CommandApiConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic prefix.
    pub prefix: String,
    /// Partitions per topic.
    pub partitions: i32,
    /// Instance name.
    pub instance: String,
}

impl CommandApiConfig {
    /// A configuration for `broker` with this test's own prefix.
    pub fn new(broker: &Broker, prefix: &str, partitions: i32, instance: &str) -> Self {
        Self {
            brokers: broker.bootstrap(),
            prefix: prefix.to_owned(),
            partitions,
            instance: instance.to_owned(),
        }
    }
}

impl CommandApi {
    /// Starts command-api on a free port and waits until it has started listening.
    pub async fn start(config: &CommandApiConfig) -> anyhow::Result<Self> {
        let mut child = Command::new(workspace_binary("command-api")?)
            .env("KEEL_COMMAND_ADDR", "127.0.0.1:0")
            .env("KEEL_KAFKA_BROKERS", &config.brokers)
            .env("KEEL_TOPIC_PREFIX", &config.prefix)
            .env("KEEL_PARTITIONS", config.partitions.to_string())
            .env("KEEL_INSTANCE", &config.instance)
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting command-api")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = oneshot::channel();
        let echo = std::env::var_os("TEST_LOG").is_some();
        let instance = config.instance.clone();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("[{instance}] {line}");
                }
                if line.contains("command API listening") {
                    let addr = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| {
                            v["addr"]
                                .as_str()
                                .and_then(|a| a.parse::<SocketAddr>().ok())
                        });
                    if let (Some(tx), Some(addr)) = (tx.take(), addr) {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(addr)) => addr,
            _ => bail!(
                "command-api did not start listening within 60 s (set TEST_LOG=info to see its log)"
            ),
        };
        Ok(Self { child, addr })
    }

    /// Starts command-api and waits until `/readyz` says it owns every partition.
    pub async fn start_ready(config: &CommandApiConfig) -> anyhow::Result<Self> {
        let api = Self::start(config).await?;
        api.wait_ready().await?;
        Ok(api)
    }

    /// `http://addr`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("command-api was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the process with SIGTERM (a graceful shutdown) and waits for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }
}
