//! Baselines shared by the benchmark binaries: a bare producer and a bare consumer with
//! Keel's client settings.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_kafka::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::{Offset, TopicPartitionList};

/// An idempotent, `acks=all` producer that batches as a bulk writer would.
pub fn bare_producer(settings: &KafkaSettings) -> anyhow::Result<BaseProducer> {
    Ok(settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?)
}

/// Enqueues one record, waiting while the producer's queue is full.
pub fn send(
    producer: &BaseProducer,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    loop {
        let record = BaseRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload);
        match producer.send(record) {
            Ok(()) => {
                producer.poll(Duration::ZERO);
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e).context("producing"),
        }
    }
}

/// Reads `records` records from the start of `partitions` partitions of `topic` with a
/// bare consumer; returns the seconds it took.
pub fn drain(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    records: i64,
) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "keel-bench")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut seen = 0;
    while seen < records {
        match consumer.poll(Duration::from_secs(30)) {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => return Err(e).context("consuming"),
            None => anyhow::bail!("no record for 30 s after {seen} of {records}"),
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The `p` quantile (0 to 1) of latencies sorted in ascending order; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}
