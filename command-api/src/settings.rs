use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use keel_http::{EdgeArgs, EdgeSettings};
use keel_kafka::{KafkaArgs, KafkaSettings};

/// Where the signing key is kept when `KEEL_SIGNING_KEY_FILE` is not set.
pub(crate) const DEFAULT_SIGNING_KEY_FILE: &str = ".keel/signing.key";
/// The shortest idempotency key retention accepted, in seconds.
const MIN_KEY_RETENTION_SECS: u64 = 60;
/// Where the trusted public keys are kept when `KEEL_TRUSTED_KEYS_FILE` is not set.
pub(crate) const DEFAULT_TRUSTED_KEYS_FILE: &str = ".keel/trusted.keys";

/// Keel's command API: commands in, one signed commit record per command out, each
/// acknowledged only once read back through the partition gate.
///
/// Every option can also be given by the environment variable named beside it.
#[derive(Debug, clap::Parser)]
#[command(name = "command-api", version, about, long_about)]
pub struct Cli {
    /// Where to listen (port 0 picks a free one).
    #[arg(long, env = "KEEL_COMMAND_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// This instance's name in fences and commits (default cmd-<random>); each process
    /// start is a writer of its own.
    #[arg(long, env = "KEEL_INSTANCE", value_name = "NAME")]
    pub instance: Option<String>,
    /// How long a command may wait to be read back, in milliseconds.
    #[arg(
        long,
        env = "KEEL_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000,
        value_name = "MS"
    )]
    pub request_timeout_ms: u64,
    /// How long an `Idempotency-Key` is kept, in seconds from its commit's time: a retry
    /// within it gets the first answer, one after it is a fresh command. Memory grows with
    /// the keys used within it. At least 60.
    #[arg(
        long,
        env = "KEEL_IDEMPOTENCY_RETENTION_SECS",
        default_value_t = crate::owner::DEFAULT_KEY_RETENTION.as_secs(),
        value_name = "SECONDS"
    )]
    pub idempotency_retention_secs: u64,
    /// The Ed25519 key commits and fences are signed with. When the file does not exist,
    /// a key is generated into it and its public key added to the trusted keys: right for
    /// the embedded default; in production, provision the file.
    #[arg(long, env = "KEEL_SIGNING_KEY_FILE", default_value = DEFAULT_SIGNING_KEY_FILE, value_name = "PATH")]
    pub signing_key_file: PathBuf,
    /// The public keys verifiers accept.
    #[arg(long, env = "KEEL_TRUSTED_KEYS_FILE", default_value = DEFAULT_TRUSTED_KEYS_FILE, value_name = "PATH")]
    pub trusted_keys_file: PathBuf,
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Authentication, limits and TLS.
    #[command(flatten)]
    pub edge: EdgeArgs,
}

/// The command API's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where to listen.
    pub addr: SocketAddr,
    /// This instance's name in fences and commits.
    pub instance: String,
    /// How long a command may wait to be read back.
    pub request_timeout: Duration,
    /// How long an idempotency key is kept.
    pub idempotency_retention: Duration,
    /// The key commits are signed with.
    pub signing_key_file: PathBuf,
    /// The public keys verifiers accept.
    pub trusted_keys_file: PathBuf,
    /// Kafka settings.
    pub kafka: KafkaSettings,
    /// Authentication, limits and TLS.
    pub edge: EdgeSettings,
}

impl Settings {
    /// Reads the settings from the command line and the environment.
    pub fn load() -> anyhow::Result<Self> {
        Self::from_cli(keel_telemetry::parse_args())
    }

    /// The settings of a parsed command line.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Self> {
        let instance = cli
            .instance
            .unwrap_or_else(|| format!("cmd-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        anyhow::ensure!(
            cli.idempotency_retention_secs >= MIN_KEY_RETENTION_SECS,
            "KEEL_IDEMPOTENCY_RETENTION_SECS must be at least {MIN_KEY_RETENTION_SECS}: a shorter \
             retention forgets the keys of retries still under way"
        );
        Ok(Self {
            addr: cli.addr,
            instance,
            request_timeout: Duration::from_millis(cli.request_timeout_ms),
            idempotency_retention: Duration::from_secs(cli.idempotency_retention_secs),
            signing_key_file: cli.signing_key_file,
            trusted_keys_file: cli.trusted_keys_file,
            kafka: cli.kafka.settings().context("reading the Kafka settings")?,
            edge: cli.edge.settings().context("reading the HTTP settings")?,
        })
    }
}
