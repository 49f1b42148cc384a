use std::net::SocketAddr;

use anyhow::Context;
use keel_kafka::KafkaSettings;

/// The command API's settings, from `KEEL_*` environment variables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `KEEL_COMMAND_ADDR`: where to listen (default `127.0.0.1:8080`).
    pub addr: SocketAddr,
    /// Kafka settings (`KEEL_KAFKA_BROKERS`, `KEEL_TOPIC_PREFIX`, `KEEL_PARTITIONS`…).
    pub kafka: KafkaSettings,
}

impl Settings {
    /// Reads the settings from the environment.
    pub fn load() -> anyhow::Result<Self> {
        let addr = std::env::var("KEEL_COMMAND_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
        Ok(Self {
            addr: addr
                .parse()
                .with_context(|| format!("KEEL_COMMAND_ADDR {addr:?} is not a socket address"))?,
            kafka: KafkaSettings::from_env().context("reading the Kafka settings")?,
        })
    }
}
