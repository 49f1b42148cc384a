//! The log the projection and start-up scenarios read: a broker of its own (memory
//! storage) holding `OrderPlaced` commits, one stream each, over [`PARTITIONS`] partitions.

use keel_bench::write_order_log;
use keel_kafka::{KafkaSettings, ensure_topics};
use keel_tests::{Broker, CommandApiConfig, unique_prefix};

use crate::step;

/// Partitions of the order topic.
pub(crate) const PARTITIONS: i32 = 8;

/// A broker holding the log, with the command API configuration (topic prefix, keys) that
/// wrote it.
pub(crate) struct OrderLog {
    pub(crate) broker: Broker,
    pub(crate) config: CommandApiConfig,
    pub(crate) settings: KafkaSettings,
    pub(crate) topic: String,
    /// Records written, fences included.
    pub(crate) total: i64,
}

impl OrderLog {
    /// Starts a broker and writes `events` commits under a topic prefix starting with
    /// `prefix`; `group` names the scenarios in the progress line.
    pub(crate) async fn write(group: &str, prefix: &str, events: usize) -> anyhow::Result<Self> {
        step(&format!(
            "{group}: starting a broker (memory storage), writing {events} OrderPlaced commits"
        ));
        let broker = Broker::start().await?;
        let config = CommandApiConfig::new(&broker, &unique_prefix(prefix), PARTITIONS, "bench");
        let settings = broker.settings(&config.prefix, PARTITIONS);
        let topic = ensure_topics(&settings, &["order"]).await?.remove(0);
        let total = {
            let (settings, topic, key) = (settings.clone(), topic.clone(), config.signing_key());
            tokio::task::spawn_blocking(move || write_order_log(&settings, &topic, events, &key))
                .await??
        };
        Ok(Self {
            broker,
            config,
            settings,
            topic,
            total,
        })
    }
}
