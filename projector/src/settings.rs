use std::time::Duration;

use anyhow::Context;
use keel_kafka::KafkaSettings;

/// The projector's settings, from `KEEL_*` environment variables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `KEEL_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/keel?sslmode=disable`); the
    /// database is created when missing.
    pub database_url: String,
    /// `KEEL_BATCH_SIZE`: most records applied in one transaction (default 1000).
    pub batch_size: usize,
    /// `KEEL_BATCH_LINGER_MS`: how long a batch waits for more records after its first (default 20).
    pub linger: Duration,
    /// `KEEL_GATE_SNAPSHOT_EVERY`: the fewest rows of a partition's gate state (one per
    /// batch that moved its streams, holding those) before one is a snapshot of the
    /// whole state (default 256); a snapshot also waits until the rows since the last
    /// one hold as many stream versions as the state.
    pub snapshot_every: u32,
    /// `KEEL_TRUSTED_KEYS_FILE`: the public keys `verify` accepts commit signatures from
    /// (default `.keel/trusted.keys`, where the embedded default's command API puts its key).
    pub trusted_keys_file: std::path::PathBuf,
    /// Kafka settings.
    pub kafka: KafkaSettings,
}

impl Settings {
    /// Reads the settings from the environment.
    pub fn load() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            var(name).map_or(Ok(default), |v| {
                v.parse()
                    .with_context(|| format!("{name} {v:?} is not a number"))
            })
        };
        let batch_size = number("KEEL_BATCH_SIZE", 1000)?;
        anyhow::ensure!(batch_size >= 1, "KEEL_BATCH_SIZE must be at least 1");
        let snapshot_every = number("KEEL_GATE_SNAPSHOT_EVERY", 256)?;
        anyhow::ensure!(
            (1..=u64::from(u32::MAX)).contains(&snapshot_every),
            "KEEL_GATE_SNAPSHOT_EVERY must be at least 1"
        );
        Ok(Self {
            database_url: var("KEEL_DATABASE_URL")
                .unwrap_or_else(|| keel_views::DEFAULT_DATABASE_URL.into()),
            batch_size: batch_size as usize,
            linger: Duration::from_millis(number("KEEL_BATCH_LINGER_MS", 20)?),
            snapshot_every: snapshot_every as u32,
            trusted_keys_file: var("KEEL_TRUSTED_KEYS_FILE")
                .unwrap_or_else(|| ".keel/trusted.keys".into())
                .into(),
            kafka: KafkaSettings::from_env().context("reading the Kafka settings")?,
        })
    }
}

impl Settings {
    /// How `run` and `rebuild` apply batches, from these settings.
    pub fn run_options(&self, on_error: crate::job::OnError) -> crate::job::RunOptions {
        crate::job::RunOptions {
            on_error,
            batch_size: self.batch_size,
            linger: self.linger,
            snapshot_every: self.snapshot_every,
        }
    }
}
