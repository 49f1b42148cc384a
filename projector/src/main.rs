//! Keel's projector binary: `run`, `status`, `topics`.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_kafka::{KafkaSettings, PartitionReader, ensure_topics};
use projector::runner::{OnError, RunOptions, Runner};
use projector::{Settings, db, status, views};
use tokio::task::JoinSet;

/// Runs Keel's projections into PostgreSQL and inspects the log.
///
/// Settings come from the environment: KEEL_DATABASE_URL, KEEL_KAFKA_BROKERS,
/// KEEL_TOPIC_PREFIX, KEEL_PARTITIONS, KEEL_BATCH_SIZE, KEEL_BATCH_LINGER_MS.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs projections until stopped (Ctrl-C or SIGTERM): each reads its topics from its
    /// checkpoints and applies batches exactly once.
    Run {
        /// Run only these projections (repeatable); all of them by default.
        #[arg(long = "projection", value_name = "NAME")]
        projections: Vec<String>,
        /// What to do with a record that cannot be decoded or applied: record it as a dead
        /// letter and stop the projection, or record it, count it and go on.
        #[arg(long, value_enum, default_value = "stop")]
        on_error: OnError,
    },
    /// Prints each projection's generation, state, checkpoints, lag per partition, dead
    /// letters and events/s (sampled over one second).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Creates the topics that are missing (KEEL_PARTITIONS partitions, infinite retention),
    /// checks the existing ones, and prints each topic's partitions and record counts.
    Topics,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keel_kafka::telemetry::init("projector=info,keel_kafka=info");
    let cli = Cli::parse();
    let settings = Settings::load()?;
    match cli.command {
        Command::Run {
            projections,
            on_error,
        } => run(&settings, &projections, on_error).await,
        Command::Status { json } => print_status(&settings, json).await,
        Command::Topics => topics(&settings.kafka).await,
    }
}

async fn run(settings: &Settings, only: &[String], on_error: OnError) -> anyhow::Result<()> {
    let all = views::all();
    for name in only {
        anyhow::ensure!(
            all.iter().any(|p| p.name() == name),
            "no projection named {name:?}; the projections are: {}",
            all.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        );
    }
    ensure_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
        .await
        .context("ensuring the topics")?;
    let pool = db::connect(&settings.database_url).await?;
    let options = RunOptions {
        on_error,
        batch_size: settings.batch_size,
        linger: settings.linger,
    };
    let mut tasks = JoinSet::new();
    for projection in all
        .into_iter()
        .filter(|p| only.is_empty() || only.iter().any(|n| n == p.name()))
    {
        let runner = Runner::new(
            projection,
            pool.clone(),
            settings.kafka.clone(),
            options.clone(),
        );
        tasks.spawn(async move { runner.run().await });
    }
    let shutdown = keel_kafka::telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            done = tasks.join_next() => match done {
                // Every projection stopped on a dead letter: nothing is left to run.
                None => return Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => return Err(e),
                Some(Err(e)) => return Err(e).context("a projection task failed"),
            },
        }
    }
}

async fn print_status(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database_url).await?;
    let before = status::read(&pool, None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = status::read(&pool, Some(&settings.kafka)).await?;
    let mut out = String::new();
    if json {
        out = serde_json::to_string_pretty(&now)? + "\n";
    } else {
        for p in &now {
            let rate = before
                .iter()
                .find(|b| b.name == p.name)
                .map_or(0, |b| p.events - b.events);
            out.push_str(&format!(
                "{} (generation {}, code v{}): {}, {} events, {rate} events/s, lag {}, {} dead letters\n",
                p.name,
                p.generation,
                p.code_version,
                p.state,
                p.events,
                p.lag.map_or("?".into(), |l| l.to_string()),
                p.dead_letters
            ));
            if let Some(error) = &p.error {
                out.push_str(&format!("  stopped: {error}\n"));
            }
            for part in &p.partitions {
                out.push_str(&format!(
                    "  {}/{}: next offset {}, end {}, lag {}, gate skipped {}\n",
                    part.topic,
                    part.partition,
                    part.next_offset,
                    part.end_offset.map_or("?".into(), |e| e.to_string()),
                    part.lag.map_or("?".into(), |l| l.to_string()),
                    part.rejected
                ));
            }
        }
    }
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
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
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
}
