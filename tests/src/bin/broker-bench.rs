//! Measures a broker's raw produce and consume rates with Keel's client settings
//! (idempotent, `acks=all` producer; consumer on assigned partitions from offset 0).
//!
//! ```sh
//! cargo run --release -p keel-tests --bin broker-bench -- 127.0.0.1:9092 1000000 200
//! ```
//! Arguments: brokers, records (default 1,000,000), record size in bytes (default 200),
//! and `produce` to skip the consume phase.
//! Prints one line per phase with records/s.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_kafka::{KafkaSettings, ensure_topics};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

const PARTITIONS: i32 = 8;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let records: usize = args
        .get(2)
        .map_or(Ok(1_000_000), |s| s.parse())
        .context("records")?;
    let size: usize = args.get(3).map_or(Ok(200), |s| s.parse()).context("size")?;
    let settings = KafkaSettings {
        brokers,
        topic_prefix: format!("bench-{}", uuid::Uuid::new_v4().simple()),
        partitions: PARTITIONS,
        ..KafkaSettings::default()
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let topic = runtime
        .block_on(ensure_topics(&settings, &["bench"]))?
        .remove(0);

    let producer: BaseProducer = settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    let payload = vec![b'x'; size];
    let started = Instant::now();
    for i in 0..records {
        let partition = (i % PARTITIONS as usize) as i32;
        let key = i.to_string();
        loop {
            let record = BaseRecord::to(&topic)
                .partition(partition)
                .key(&key)
                .payload(&payload);
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("producing"),
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(600))?;
    let produce = started.elapsed();
    println!(
        "produce: {records} records of {size} B in {:.2} s = {:.0} records/s",
        produce.as_secs_f64(),
        records as f64 / produce.as_secs_f64()
    );

    if args.get(4).is_some_and(|a| a == "produce") {
        return Ok(());
    }
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "broker-bench")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment.add_partition_offset(&topic, p, Offset::Beginning)?;
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
    let consume = started.elapsed();
    println!(
        "consume: {records} records in {:.2} s = {:.0} records/s",
        consume.as_secs_f64(),
        records as f64 / consume.as_secs_f64()
    );
    Ok(())
}
