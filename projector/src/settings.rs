use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use keel_kafka::{KafkaArgs, KafkaSettings};
use keel_views::DatabaseArgs;

/// The projector's options, before the command; each can also be given by the
/// environment variable named beside it.
#[derive(Clone, Debug, clap::Args)]
pub struct SettingsArgs {
    /// The views' database.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Most records applied in one transaction.
    #[arg(long, env = "KEEL_BATCH_SIZE", default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub batch_size: u64,
    /// How long a batch waits for more records after its first, in milliseconds.
    #[arg(
        long,
        env = "KEEL_BATCH_LINGER_MS",
        default_value_t = 20,
        value_name = "MS"
    )]
    pub batch_linger_ms: u64,
    /// The fewest rows of a partition's gate state (one per batch that moved its streams)
    /// before one is a snapshot of the whole state; a snapshot also waits until the rows
    /// since the last one hold as many stream versions as the state.
    #[arg(long, env = "KEEL_GATE_SNAPSHOT_EVERY", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub gate_snapshot_every: u32,
    /// How long a projector process may go without a heartbeat (stalled, cut off, dead)
    /// before the others take its partitions, in milliseconds. Also how long its
    /// connections may leave a transaction idle.
    #[arg(long, env = "KEEL_PROJECTOR_CLAIM_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(200..), value_name = "MS")]
    pub claim_timeout_ms: u64,
    /// How rebuilds pace themselves: `adaptive` (back off while live reads slow down or
    /// the live projection falls behind), `off`, or at most N events per second.
    #[arg(
        long,
        env = "KEEL_REBUILD_PACE",
        default_value = "adaptive",
        value_name = "PACE"
    )]
    pub rebuild_pace: crate::pace::Pace,
    /// The public keys `verify` accepts commit signatures from (where the embedded
    /// default's command API puts its key).
    #[arg(
        long,
        env = "KEEL_TRUSTED_KEYS_FILE",
        default_value = ".keel/trusted.keys",
        value_name = "PATH"
    )]
    pub trusted_keys_file: PathBuf,
    /// Kafka.
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// The projector's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The views' database (created when missing).
    pub database: DatabaseArgs,
    /// Most records applied in one transaction.
    pub batch_size: usize,
    /// How long a batch waits for more records after its first.
    pub linger: Duration,
    /// Batch rows of a partition's gate state before one is a snapshot.
    pub snapshot_every: u32,
    /// The public keys `verify` accepts commit signatures from.
    pub trusted_keys_file: PathBuf,
    /// How long a process may go without a heartbeat before the others take its partitions.
    pub claim_timeout: Duration,
    /// How rebuilds pace themselves.
    pub rebuild_pace: crate::pace::Pace,
    /// Kafka settings.
    pub kafka: KafkaSettings,
}

impl Settings {
    /// The settings of parsed options.
    pub fn from_args(args: SettingsArgs) -> anyhow::Result<Self> {
        Ok(Self {
            database: args.database,
            batch_size: usize::try_from(args.batch_size).context("KEEL_BATCH_SIZE is too large")?,
            linger: Duration::from_millis(args.batch_linger_ms),
            snapshot_every: args.gate_snapshot_every,
            trusted_keys_file: args.trusted_keys_file,
            claim_timeout: Duration::from_millis(args.claim_timeout_ms),
            rebuild_pace: args.rebuild_pace,
            kafka: args
                .kafka
                .settings()
                .context("reading the Kafka settings")?,
        })
    }

    /// How `run` and `rebuild` apply batches, from these settings: with the key policy
    /// of the trusted keys file, which they cannot do without (no fence counts without a
    /// trusted key).
    pub fn run_options(
        &self,
        on_error: crate::job::OnError,
    ) -> anyhow::Result<crate::job::RunOptions> {
        Ok(crate::job::RunOptions {
            on_error,
            batch_size: self.batch_size,
            linger: self.linger,
            snapshot_every: self.snapshot_every,
            rebuild_pace: self.rebuild_pace,
            claim_timeout: self.claim_timeout,
            policy: std::sync::Arc::new(self.trusted_keys()?),
            metrics: crate::metrics::ProjectorMetrics::default(),
        })
    }

    /// The key policy of the trusted keys file.
    pub fn trusted_keys(&self) -> anyhow::Result<keel_schemas::TrustedKeys> {
        keel_schemas::TrustedKeys::read(&self.trusted_keys_file).context(
            "reading the trusted keys (KEEL_TRUSTED_KEYS_FILE): the command API writes the file when it first starts; give every process the same file",
        )
    }
}
