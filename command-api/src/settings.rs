use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use keel_http::EdgeSettings;
use keel_kafka::KafkaSettings;

/// Where the signing key is kept when `KEEL_SIGNING_KEY_FILE` is not set.
pub(crate) const DEFAULT_SIGNING_KEY_FILE: &str = ".keel/signing.key";
/// Where the trusted public keys are kept when `KEEL_TRUSTED_KEYS_FILE` is not set.
pub(crate) const DEFAULT_TRUSTED_KEYS_FILE: &str = ".keel/trusted.keys";

/// The command API's settings, from `KEEL_*` environment variables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `KEEL_COMMAND_ADDR`: where to listen (default `127.0.0.1:8080`; port 0 picks one).
    pub addr: SocketAddr,
    /// `KEEL_INSTANCE`: this instance's name in fences and commits (default `cmd-<random>`).
    pub instance: String,
    /// `KEEL_REQUEST_TIMEOUT_MS`: how long a command may wait to be read back (default 10 s).
    pub request_timeout: Duration,
    /// `KEEL_SIGNING_KEY_FILE`: the Ed25519 key commits are signed with (default
    /// `.keel/signing.key`). When the file does not exist, a key is generated into it and
    /// its public key appended to the trusted keys file: right for the embedded default;
    /// in production, provision the file.
    pub signing_key_file: PathBuf,
    /// `KEEL_TRUSTED_KEYS_FILE`: the public keys verifiers accept (default `.keel/trusted.keys`).
    pub trusted_keys_file: PathBuf,
    /// Kafka settings (`KEEL_KAFKA_BROKERS`, `KEEL_TOPIC_PREFIX`, `KEEL_PARTITIONS`…).
    pub kafka: KafkaSettings,
    /// Authentication, limits and TLS (`KEEL_AUTH*`, `KEEL_RATE_LIMIT_*`, `KEEL_HTTP_*`,
    /// `KEEL_TLS_*`).
    pub edge: EdgeSettings,
}

impl Settings {
    /// Reads the settings from the environment.
    pub fn load() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let addr = var("KEEL_COMMAND_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into());
        let timeout_ms: u64 = match var("KEEL_REQUEST_TIMEOUT_MS") {
            Some(v) => v.parse().with_context(|| {
                format!("KEEL_REQUEST_TIMEOUT_MS {v:?} is not a number of milliseconds")
            })?,
            None => 10_000,
        };
        let instance = var("KEEL_INSTANCE")
            .unwrap_or_else(|| format!("cmd-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
        Ok(Self {
            addr: addr
                .parse()
                .with_context(|| format!("KEEL_COMMAND_ADDR {addr:?} is not a socket address"))?,
            instance,
            request_timeout: Duration::from_millis(timeout_ms),
            signing_key_file: var("KEEL_SIGNING_KEY_FILE")
                .unwrap_or_else(|| DEFAULT_SIGNING_KEY_FILE.into())
                .into(),
            trusted_keys_file: var("KEEL_TRUSTED_KEYS_FILE")
                .unwrap_or_else(|| DEFAULT_TRUSTED_KEYS_FILE.into())
                .into(),
            kafka: KafkaSettings::from_env().context("reading the Kafka settings")?,
            edge: EdgeSettings::from_env().context("reading the HTTP settings")?,
        })
    }
}
