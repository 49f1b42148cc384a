//! Keel's projector. This build manages the topics; `run`, `rebuild`, `status` and
//! `verify` build on it.

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_kafka::{KafkaSettings, PartitionReader, ensure_topics};

/// Runs Keel's projections into PostgreSQL and inspects the log.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Creates the topics that are missing (KEEL_PARTITIONS partitions, infinite retention),
    /// checks the existing ones, and prints each topic's partitions and record counts.
    Topics,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keel_kafka::telemetry::init("projector=info,keel_kafka=info");
    let cli = Cli::parse();
    let kafka = KafkaSettings::from_env().context("reading the Kafka settings")?;
    match cli.command {
        Command::Topics => topics(&kafka).await,
    }
}

async fn topics(kafka: &KafkaSettings) -> anyhow::Result<()> {
    let topics = ensure_topics(kafka, &keel_domain::STREAM_TYPES)
        .await
        .context("ensuring the topics")?;
    let mut out = String::new();
    for topic in topics {
        let mut ends = Vec::new();
        for partition in 0..kafka.partitions {
            let reader = PartitionReader::open(kafka, &topic, partition, 0)?;
            ends.push(reader.high_watermark().await?);
        }
        let total: i64 = ends.iter().sum();
        out.push_str(&format!(
            "{topic}: {} partitions, {total} records {ends:?}\n",
            kafka.partitions
        ));
    }
    use std::io::Write;
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
}
