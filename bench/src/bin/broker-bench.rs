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
use keel_bench as bench;
use keel_kafka::{KafkaSettings, ensure_topics};
use rdkafka::producer::Producer;

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

    let producer = bench::bare_producer(&settings)?;
    let payload = vec![b'x'; size];
    let started = Instant::now();
    for i in 0..records {
        let partition = (i % PARTITIONS as usize) as i32;
        bench::send(&producer, &topic, partition, &i.to_string(), &payload)?;
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
    let consume =
        Duration::from_secs_f64(bench::drain(&settings, &topic, PARTITIONS, records as i64)?);
    println!(
        "consume: {records} records in {:.2} s = {:.0} records/s",
        consume.as_secs_f64(),
        records as f64 / consume.as_secs_f64()
    );
    Ok(())
}
