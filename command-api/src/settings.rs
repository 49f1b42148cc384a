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
    /// How this instance gets its partitions: `group` (the instances started against the
    /// same topics divide them through a Kafka consumer group, and rebalance as instances
    /// come and go) or `all` (this instance takes every partition, fencing any other out).
    #[arg(long, env = "KEEL_ASSIGNMENT", default_value = "group", value_parser = ["group", "all"])]
    pub assignment: String,
    /// The URL other instances forward commands for this instance's partitions to
    /// (default: http://<the listener's address>). Set it when the listener's address is
    /// not the one others reach, such as 0.0.0.0 or behind NAT.
    #[arg(long, env = "KEEL_ADVERTISED_URL", value_name = "URL")]
    pub advertised_url: Option<String>,
    /// PEM certificates trusted when forwarding to another instance over https (default:
    /// this instance's own KEEL_TLS_CERT, right when the instances share a certificate or
    /// it is their CA's).
    #[arg(long, env = "KEEL_FORWARD_CA_FILE", value_name = "PATH")]
    pub forward_ca_file: Option<PathBuf>,
    /// The consumer group the instances share (default: <topic prefix>.command-api).
    #[arg(long, env = "KEEL_GROUP", value_name = "ID")]
    pub group: Option<String>,
    /// How long the group waits for a silent instance (killed, cut off, paused) before
    /// its partitions go to the others, in milliseconds. Every instance must use the same.
    #[arg(
        long,
        env = "KEEL_GROUP_SESSION_TIMEOUT_MS",
        default_value_t = 6_000,
        value_name = "MS"
    )]
    pub group_session_timeout_ms: u64,
    /// How long a partition's owner may take to hand it over (finish its flush, leave the
    /// handoff mark) before the group moves it anyway, in milliseconds.
    #[arg(
        long,
        env = "KEEL_HANDOFF_TIMEOUT_MS",
        default_value_t = 5_000,
        value_name = "MS"
    )]
    pub handoff_timeout_ms: u64,
    /// Records a partition's owner applies between two snapshots of its state (written to
    /// `<prefix>.<aggregate>.snapshots`, and when it hands the partition over), so the next
    /// owner reads only what follows the latest one; 0 writes none.
    #[arg(
        long,
        env = "KEEL_SNAPSHOT_EVERY",
        default_value_t = 10_000,
        value_name = "RECORDS"
    )]
    pub snapshot_every: u64,
    /// Flushes an owner decides and appends in a row while the one ahead of each is read
    /// back (pipelined flushes); 1 decides each flush only once the one before it is
    /// answered.
    #[arg(
        long,
        env = "KEEL_FLUSH_PIPELINE",
        default_value_t = 16,
        value_name = "FLUSHES",
        value_parser = clap::value_parser!(u32).range(1..=1024)
    )]
    pub flush_pipeline: u32,
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Authentication, limits and TLS.
    #[command(flatten)]
    pub edge: EdgeArgs,
}

/// How an instance gets its partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assignment {
    /// It takes every partition.
    All,
    /// The instances of a consumer group divide them.
    Group {
        /// The group's id.
        group: String,
        /// The URL others forward to; `None` for the listener's own.
        advertised_url: Option<String>,
        /// How long the group waits for a silent member.
        session_timeout: Duration,
        /// How long a handoff may take.
        handoff_timeout: Duration,
        /// Certificates trusted when forwarding over https.
        forward_ca_file: Option<PathBuf>,
    },
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
    /// How this instance gets its partitions.
    pub assignment: Assignment,
    /// Records between two snapshots; `None`: none are written.
    pub snapshot_every: Option<u64>,
    /// Flushes decided in a row while the one ahead is read back.
    pub flush_pipeline: usize,
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
        let kafka = cli.kafka.settings().context("reading the Kafka settings")?;
        anyhow::ensure!(
            (1_000..=3_600_000).contains(&cli.group_session_timeout_ms),
            "KEEL_GROUP_SESSION_TIMEOUT_MS must be between 1000 and 3600000"
        );
        Ok(Self {
            addr: cli.addr,
            instance,
            request_timeout: Duration::from_millis(cli.request_timeout_ms),
            idempotency_retention: Duration::from_secs(cli.idempotency_retention_secs),
            signing_key_file: cli.signing_key_file,
            trusted_keys_file: cli.trusted_keys_file,
            snapshot_every: (cli.snapshot_every > 0).then_some(cli.snapshot_every),
            flush_pipeline: cli.flush_pipeline as usize,
            assignment: match cli.assignment.as_str() {
                "all" => Assignment::All,
                _ => Assignment::Group {
                    group: cli
                        .group
                        .unwrap_or_else(|| format!("{}.command-api", kafka.topic_prefix)),
                    advertised_url: match cli.advertised_url {
                        Some(url) => Some(advertised(&url)?),
                        None => None,
                    },
                    session_timeout: Duration::from_millis(cli.group_session_timeout_ms),
                    handoff_timeout: Duration::from_millis(cli.handoff_timeout_ms),
                    forward_ca_file: cli.forward_ca_file,
                },
            },
            kafka,
            edge: cli.edge.settings().context("reading the HTTP settings")?,
        })
    }
}

/// An advertised URL, checked: http or https, a host, no path beyond `/`.
fn advertised(url: &str) -> anyhow::Result<String> {
    let trimmed = url.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or_else(|| {
            anyhow::anyhow!("KEEL_ADVERTISED_URL must start with http:// or https://: {url:?}")
        })?;
    anyhow::ensure!(
        !rest.is_empty() && !rest.contains('/') && !rest.contains(char::is_whitespace),
        "KEEL_ADVERTISED_URL must be a scheme and host[:port] only, like http://10.0.0.5:8080: {url:?}"
    );
    Ok(trimmed.to_owned())
}
