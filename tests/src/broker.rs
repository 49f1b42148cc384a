use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keel_kafka::KafkaSettings;
use tokio::process::{Child, Command};

/// The broker binary: `KEEL_BROKER_BIN`, else `nisshi` from `~/.cargo/bin` or the `PATH`.
pub fn broker_binary() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("KEEL_BROKER_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let candidates = std::iter::once(home.join(".cargo/bin/nisshi")).chain(
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("nisshi"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    for candidate in candidates {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("no broker binary: run `make test` (it installs nisshi) or set KEEL_BROKER_BIN")
}

/// A Kafka-compatible broker of this test's own, with memory storage, on a free port.
/// Stopped when dropped.
pub struct Broker {
    child: Child,
    port: u16,
    storage: String,
}

impl Broker {
    /// Starts a broker with memory storage and waits until it listens.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with("memory://nisshi/").await
    }

    /// Starts a broker whose log is kept in the PostgreSQL database at `database_url`
    /// (`postgres://…?sslmode=disable`), so it survives a restart.
    pub async fn start_durable(database_url: &str) -> anyhow::Result<Self> {
        Self::start_with(database_url).await
    }

    async fn start_with(storage: &str) -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut broker = Self {
            child: Self::spawn(port, storage)?,
            port,
            storage: storage.to_owned(),
        };
        broker.wait_ready().await?;
        Ok(broker)
    }

    /// Kills the broker with SIGKILL and starts it again on the same port and storage.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        self.child = Self::spawn(self.port, &self.storage)?;
        self.wait_ready().await
    }

    /// Kills the broker with SIGKILL.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        Ok(self.child.kill().await?)
    }

    /// Starts the broker again after [`Broker::kill`].
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = Self::spawn(self.port, &self.storage)?;
        self.wait_ready().await
    }

    fn spawn(port: u16, storage: &str) -> anyhow::Result<Child> {
        let url = format!("tcp://127.0.0.1:{port}");
        // Its own variable, not TEST_LOG: at `info` the broker logs every request, and
        // a benchmark's worth of them fills the disk within minutes.
        let log = std::env::var("TEST_BROKER_LOG").ok();
        Command::new(broker_binary()?)
            // A file storage (`sqlite://<file>`) lives in the temporary directory, never
            // in the clone.
            .current_dir(std::env::temp_dir())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", storage])
            .args(["--cluster-id", &format!("keel-test-{port}")])
            // A group's first member gets its partitions at once, not after 3 s of
            // waiting for others (tests start their instances one by one).
            .args(["--group-initial-rebalance-delay", "0s"])
            .env_remove("STORAGE_ENGINE")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env("RUST_LOG", log.as_deref().unwrap_or("error"))
            .stdin(Stdio::null())
            .stdout(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(if log.is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .kill_on_drop(true)
            .spawn()
            .context("starting the broker")
    }

    /// `host:port` for `KEEL_KAFKA_BROKERS`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Settings for this broker with a topic prefix of the test's own.
    pub fn settings(&self, prefix: &str, partitions: i32) -> KafkaSettings {
        KafkaSettings {
            brokers: self.bootstrap(),
            topic_prefix: prefix.to_owned(),
            partitions,
            timeout: Duration::from_secs(20),
            ..KafkaSettings::default()
        }
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the broker exited during start-up: {status}");
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the broker did not listen on port {} within 30 s",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A port nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}
