//! A projection with what it runs on: the database, the Kafka settings and how batches
//! are applied. What the runner and a rebuild share.

use std::sync::Arc;
use std::time::Duration;

use keel_kafka::KafkaSettings;
use keel_schemas::{TopicPartition, TrustedKeys};
use sqlx::PgPool;

use crate::projection::Projection;

/// What a projection does with a record it cannot decode or apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Park its stream (the default): record it as a dead letter and hold the stream's
    /// later records back behind it, in order, while every other stream flows on, until an
    /// operator retries or discards the stream (`projector dead-letters`).
    Park,
    /// Record it as a dead letter and stop the projection.
    Stop,
    /// Record it as a dead letter, count it, and go on.
    Skip,
}

impl OnError {
    /// The mode as `--on-error` names it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Park => "park",
            Self::Stop => "stop",
            Self::Skip => "skip",
        }
    }
}

/// How a projection runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// What to do with a record that cannot be decoded or applied.
    pub on_error: OnError,
    /// Most records per transaction.
    pub batch_size: usize,
    /// How long a batch waits for more records after its first.
    pub linger: Duration,
    /// Batch rows of a partition's gate state between two snapshots of it.
    pub snapshot_every: u32,
    /// How a rebuild paces itself.
    pub rebuild_pace: crate::pace::Pace,
    /// How long a process may go without a heartbeat before the others take its units
    /// (a rebuild's coordinator beats too, so that its helpers stop when it dies).
    pub claim_timeout: Duration,
    /// The key policy the gate applies.
    pub policy: Arc<TrustedKeys>,
    /// What the batches applied count into (`/metrics`).
    pub metrics: crate::metrics::ProjectorMetrics,
}

/// One projection, its database, its log and its options.
#[derive(Clone)]
pub struct Job {
    /// The projection.
    pub projection: Arc<dyn Projection>,
    /// The database of its tables and checkpoints.
    pub pool: PgPool,
    /// Where its topics are.
    pub kafka: KafkaSettings,
    /// How it applies batches.
    pub options: RunOptions,
}

impl Job {
    /// A job of `projection`.
    pub fn new(
        projection: Arc<dyn Projection>,
        pool: PgPool,
        kafka: KafkaSettings,
        options: RunOptions,
    ) -> Self {
        Self {
            projection,
            pool,
            kafka,
            options,
        }
    }

    /// The projection's name.
    pub fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Every partition the projection reads, in order.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        self.projection
            .stream_types()
            .iter()
            .flat_map(|t| {
                let topic = self.kafka.topic(t);
                (0..self.kafka.partitions).map(move |p| TopicPartition::new(topic.clone(), p))
            })
            .collect()
    }
}
