//! Runs one projection: reads its topics from its checkpoints through the partition gate,
//! and applies batches in transactions that also advance the checkpoints.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_domain::Aggregate;
use keel_domain::customer::Customer;
use keel_domain::order::Order;
use keel_domain::product::Product;
use keel_kafka::{KafkaSettings, LogEntry, LogReader, PartitionGate};
use keel_schemas::{LogRecord, StreamRef, Writer, decode_event};
use sqlx::PgPool;
use tracing::{error, info, instrument, warn};

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// What a projection does with a record it cannot decode or apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Record it as a dead letter and stop the projection (the default).
    Stop,
    /// Record it as a dead letter, count it, and go on.
    Skip,
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
}

/// The channel the projector notifies after each batch; the payload is the projection's name.
pub const NOTIFY_CHANNEL: &str = "keel_projections";

struct PartitionState {
    next_offset: i64,
    gate: PartitionGate,
    touched_streams: HashSet<StreamRef>,
    touched: bool,
}

struct DeadLetter {
    entry: LogEntry,
    error: String,
}

enum Flow {
    Continue,
    Stopped,
}

/// Runs one projection until it stops on a dead letter (in `stop` mode) or the process ends.
pub struct Runner {
    projection: Arc<dyn Projection>,
    pool: PgPool,
    kafka: KafkaSettings,
    options: RunOptions,
}

impl Runner {
    /// A runner of `projection`.
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

    /// Prepares the live generation (tables and views), then applies the log as it comes.
    /// Transient errors (broker or database down) are retried from the last checkpoint.
    #[instrument(name = "projection", skip_all, fields(projection = self.projection.name()))]
    pub async fn run(&self) -> anyhow::Result<()> {
        let generation = loop {
            match prepare(&self.pool, self.projection.as_ref()).await {
                Ok(generation) => break generation,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "preparing the projection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        // One runner per projection: a second projector process stands by until the first ends.
        let mut lock = self.pool.acquire().await?.detach();
        loop {
            let locked: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('keel-run:' || $1))")
                    .bind(self.projection.name())
                    .fetch_one(&mut lock)
                    .await?;
            if locked {
                break;
            }
            info!("another projector runs this projection; standing by");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        info!(generation, "running");
        loop {
            match self.run_generation(generation).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "restarting from the last checkpoint");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run_generation(&self, generation: i32) -> anyhow::Result<()> {
        let mut states = self.load(generation).await?;
        let assignment: Vec<(String, i32, i64)> = states
            .iter()
            .map(|((topic, partition), s)| (topic.clone(), *partition, s.next_offset))
            .collect();
        let reader = LogReader::open(&self.kafka, &assignment)?;
        loop {
            let batch = reader
                .next_batch(
                    self.options.batch_size,
                    Duration::from_millis(500),
                    self.options.linger,
                )
                .await?;
            if batch.is_empty() {
                continue;
            }
            match self.apply_batch(&mut states, &batch, generation).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stopped) => return Ok(()),
                Err(e) if is_apply_error(&e) => {
                    // Find the record that cannot be applied: one record per transaction.
                    // (A batch of one is tried once more alone, then dead-lettered.)
                    warn!(error = %format!("{e:#}"), "a batch failed to apply; retrying record by record");
                    states = self.load(generation).await?;
                    for entry in &batch {
                        match self
                            .apply_batch(&mut states, std::slice::from_ref(entry), generation)
                            .await
                        {
                            Ok(Flow::Continue) => {}
                            Ok(Flow::Stopped) => return Ok(()),
                            Err(e) if is_apply_error(&e) => {
                                states = self.load(generation).await?;
                                let dead = DeadLetter {
                                    entry: entry.clone(),
                                    error: format!("{e:#}"),
                                };
                                if let Flow::Stopped = self
                                    .dead_letter_alone(&mut states, dead, generation)
                                    .await?
                                {
                                    return Ok(());
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Loads the checkpoints and the gate state of every partition the projection reads.
    async fn load(
        &self,
        generation: i32,
    ) -> anyhow::Result<HashMap<(String, i32), PartitionState>> {
        let name = self.projection.name();
        let mut states = HashMap::new();
        for stream_type in self.projection.stream_types() {
            for partition in 0..self.kafka.partitions {
                states.insert(
                    (self.kafka.topic(stream_type), partition),
                    PartitionState {
                        next_offset: 0,
                        gate: PartitionGate::new(),
                        touched_streams: HashSet::new(),
                        touched: false,
                    },
                );
            }
        }
        type Checkpoint = (String, i32, i64, Option<String>, Option<i64>, i64, i64, i64);
        let checkpoints: Vec<Checkpoint> = sqlx::query_as(
            "SELECT topic, partition, next_offset, owner_instance, owner_epoch, highest_epoch, accepted, rejected
             FROM keel_checkpoints WHERE projection = $1 AND generation = $2",
        )
        .bind(name)
        .bind(generation)
        .fetch_all(&self.pool)
        .await?;
        let streams: Vec<(String, i32, String, String, i64)> = sqlx::query_as(
            "SELECT topic, partition, stream_type, stream_id, version FROM keel_gate_streams
             WHERE projection = $1 AND generation = $2",
        )
        .bind(name)
        .bind(generation)
        .fetch_all(&self.pool)
        .await?;
        let mut versions: HashMap<(String, i32), Vec<(StreamRef, u64)>> = HashMap::new();
        for (topic, partition, stream_type, id, version) in streams {
            versions
                .entry((topic, partition))
                .or_default()
                .push((StreamRef { stream_type, id }, version as u64));
        }
        for (topic, partition, next_offset, instance, epoch, highest, accepted, rejected) in
            checkpoints
        {
            let key = (topic, partition);
            let Some(state) = states.get_mut(&key) else {
                continue;
            };
            let owner = instance.zip(epoch).map(|(instance, epoch)| Writer {
                instance,
                epoch: epoch as u64,
            });
            state.next_offset = next_offset;
            state.gate = PartitionGate::restore(
                owner,
                highest as u64,
                versions.remove(&key).unwrap_or_default(),
                accepted as u64,
                rejected as u64,
            );
        }
        Ok(states)
    }

    /// Decodes the entries through the gate and applies them in one transaction that also
    /// advances the checkpoints.
    async fn apply_batch(
        &self,
        states: &mut HashMap<(String, i32), PartitionState>,
        entries: &[LogEntry],
        generation: i32,
    ) -> anyhow::Result<Flow> {
        let mut events = Vec::new();
        let mut dead = Vec::new();
        let mut stopped = false;
        for entry in entries {
            let Some(state) = states.get_mut(&(entry.topic.clone(), entry.partition)) else {
                continue;
            };
            if entry.offset < state.next_offset {
                continue;
            }
            match decode(entry, state) {
                Ok(decoded) => {
                    events.extend(decoded);
                    state.next_offset = entry.offset + 1;
                    state.touched = true;
                }
                Err(error) => {
                    warn!(topic = %entry.topic, partition = entry.partition, offset = entry.offset, %error, "dead letter");
                    state.touched = true;
                    dead.push(DeadLetter {
                        entry: entry.clone(),
                        error,
                    });
                    if self.options.on_error == OnError::Stop {
                        stopped = true;
                        break;
                    }
                    pass_over(entry, state);
                }
            }
        }
        let mut tx = self.pool.begin().await?;
        self.projection
            .apply(&mut tx, generation, &events)
            .await
            .map_err(ApplyError)?;
        self.save(&mut tx, states, &dead, events.len(), stopped, generation)
            .await?;
        tx.commit().await?;
        for state in states.values_mut() {
            state.touched = false;
            state.touched_streams.clear();
        }
        Ok(if stopped {
            Flow::Stopped
        } else {
            Flow::Continue
        })
    }

    /// Records a record that failed to apply on its own, in a transaction of its own.
    async fn dead_letter_alone(
        &self,
        states: &mut HashMap<(String, i32), PartitionState>,
        dead: DeadLetter,
        generation: i32,
    ) -> anyhow::Result<Flow> {
        warn!(topic = %dead.entry.topic, partition = dead.entry.partition, offset = dead.entry.offset,
              error = %dead.error, "dead letter");
        let stopped = self.options.on_error == OnError::Stop;
        if let Some(state) = states.get_mut(&(dead.entry.topic.clone(), dead.entry.partition)) {
            state.touched = true;
            if !stopped {
                pass_over(&dead.entry, state);
            }
        }
        let mut tx = self.pool.begin().await?;
        self.save(
            &mut tx,
            states,
            std::slice::from_ref(&dead),
            0,
            stopped,
            generation,
        )
        .await?;
        tx.commit().await?;
        for state in states.values_mut() {
            state.touched = false;
            state.touched_streams.clear();
        }
        Ok(if stopped {
            Flow::Stopped
        } else {
            Flow::Continue
        })
    }

    /// Writes checkpoints, gate state, dead letters and the projection's row; notifies on commit.
    ///
    /// Boxed: a `Send` future over `&mut PgConnection` has to be checked where its lifetimes
    /// are concrete (rust-lang/rust#102211).
    fn save<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        states: &'a HashMap<(String, i32), PartitionState>,
        dead: &'a [DeadLetter],
        events: usize,
        stopped: bool,
        generation: i32,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.save_inner(tx, states, dead, events, stopped, generation))
    }

    async fn save_inner(
        &self,
        tx: &mut sqlx::PgConnection,
        states: &HashMap<(String, i32), PartitionState>,
        dead: &[DeadLetter],
        events: usize,
        stopped: bool,
        generation: i32,
    ) -> anyhow::Result<()> {
        let name = self.projection.name();
        let touched: Vec<(&(String, i32), &PartitionState)> =
            states.iter().filter(|(_, s)| s.touched).collect();
        let mut g = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((topic, partition), state) in &touched {
            for stream in &state.touched_streams {
                g.0.push(topic.clone());
                g.1.push(*partition);
                g.2.push(stream.stream_type.clone());
                g.3.push(stream.id.clone());
                g.4.push(state.gate.stream_version(stream) as i64);
            }
        }
        if !g.0.is_empty() {
            sqlx::query(
                "INSERT INTO keel_gate_streams (projection, generation, topic, partition, stream_type, stream_id, version)
                 SELECT $1, $2, * FROM UNNEST($3::text[], $4::int[], $5::text[], $6::text[], $7::bigint[])
                 ON CONFLICT (projection, generation, topic, partition, stream_type, stream_id)
                 DO UPDATE SET version = EXCLUDED.version",
            )
            .bind(name)
            .bind(generation)
            .bind(g.0)
            .bind(g.1)
            .bind(g.2)
            .bind(g.3)
            .bind(g.4)
            .execute(&mut *tx)
            .await?;
        }
        if !touched.is_empty() {
            sqlx::query(
                "INSERT INTO keel_checkpoints (projection, generation, topic, partition, next_offset, owner_instance,
                    owner_epoch, highest_epoch, accepted, rejected, updated_at)
                 SELECT $1, $2, t, p, o, oi, oe, he, a, r, now() FROM UNNEST($3::text[], $4::int[], $5::bigint[],
                    $6::text[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[]) AS u(t, p, o, oi, oe, he, a, r)
                 ON CONFLICT (projection, generation, topic, partition) DO UPDATE SET
                    next_offset = EXCLUDED.next_offset, owner_instance = EXCLUDED.owner_instance,
                    owner_epoch = EXCLUDED.owner_epoch, highest_epoch = EXCLUDED.highest_epoch,
                    accepted = EXCLUDED.accepted, rejected = EXCLUDED.rejected, updated_at = now()",
            )
            .bind(name)
            .bind(generation)
            .bind(touched.iter().map(|(k, _)| k.0.clone()).collect::<Vec<_>>())
            .bind(touched.iter().map(|(k, _)| k.1).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.next_offset).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.owner().map(|w| w.instance.clone())).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.owner().map(|w| w.epoch as i64)).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.highest_epoch() as i64).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.accepted() as i64).collect::<Vec<_>>())
            .bind(touched.iter().map(|(_, s)| s.gate.rejected() as i64).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        for d in dead {
            sqlx::query(
                r#"INSERT INTO keel_dead_letters (projection, generation, topic, partition, "offset", error, key, payload, skipped)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                   ON CONFLICT (projection, generation, topic, partition, "offset")
                   DO UPDATE SET error = EXCLUDED.error, skipped = EXCLUDED.skipped"#,
            )
            .bind(name)
            .bind(generation)
            .bind(&d.entry.topic)
            .bind(d.entry.partition)
            .bind(d.entry.offset)
            .bind(&d.error)
            .bind(&d.entry.key)
            .bind(&d.entry.payload)
            .bind(!stopped)
            .execute(&mut *tx)
            .await?;
        }
        let (state, error) = match dead.last() {
            Some(d) if stopped => (
                "stopped",
                Some(format!(
                    "dead letter at {}/{} offset {}: {}",
                    d.entry.topic, d.entry.partition, d.entry.offset, d.error
                )),
            ),
            _ => ("running", None),
        };
        sqlx::query(
            "UPDATE keel_projections SET events = events + $2, state = $3, error = $4, updated_at = now()
             WHERE name = $1",
        )
        .bind(name)
        .bind(events as i64)
        .bind(state)
        .bind(error)
        .execute(&mut *tx)
        .await?;
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(NOTIFY_CHANNEL)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// An error the projection's own statements raised: the batch holds a record it cannot apply.
#[derive(Debug, thiserror::Error)]
#[error("applying the batch: {0}")]
struct ApplyError(sqlx::Error);

fn is_apply_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ApplyError>()
        .is_some_and(|ApplyError(inner)| matches!(inner, sqlx::Error::Database(_)))
}

/// Moves past a dead-lettered record: the gate takes it as every other reader does.
fn pass_over(entry: &LogEntry, state: &mut PartitionState) {
    if let Ok(record) = LogRecord::decode(&entry.payload)
        && state.gate.admit(&record).is_ok()
        && let LogRecord::Commit(c) = record
    {
        state.touched_streams.insert(c.stream);
    }
    state.next_offset = entry.offset + 1;
}

/// Decodes one record through the gate: the events it contributes, or why it cannot be
/// read. A record the gate skips contributes nothing and is no error.
fn decode(entry: &LogEntry, state: &mut PartitionState) -> Result<Vec<ProjectedEvent>, String> {
    let record = LogRecord::decode(&entry.payload).map_err(|e| e.to_string())?;
    if state.gate.verdict(&record).is_err() {
        let _ = state.gate.admit(&record);
        return Ok(Vec::new());
    }
    let LogRecord::Commit(commit) = &record else {
        let _ = state.gate.admit(&record);
        return Ok(Vec::new());
    };
    let commit = Arc::new(commit.clone());
    let mut events = Vec::with_capacity(commit.events.len());
    for (index, envelope) in commit.events.iter().enumerate() {
        let event = match commit.stream.stream_type.as_str() {
            t if t == Product::TYPE => decode_event::<Product>(envelope).map(AnyEvent::Product),
            t if t == Customer::TYPE => decode_event::<Customer>(envelope).map(AnyEvent::Customer),
            t if t == Order::TYPE => decode_event::<Order>(envelope).map(AnyEvent::Order),
            other => return Err(format!("unknown stream type {other:?}")),
        }
        .map_err(|e| {
            format!(
                "event {} of {} (version {}): {e}",
                index, commit.stream, envelope.version
            )
        })?;
        events.push(ProjectedEvent {
            topic: entry.topic.clone(),
            partition: entry.partition,
            offset: entry.offset,
            index,
            commit: Arc::clone(&commit),
            event,
        });
    }
    let _ = state.gate.admit(&record);
    state.touched_streams.insert(commit.stream.clone());
    Ok(events)
}

/// Makes sure the projection has a live generation with its tables and views; returns it.
pub fn prepare<'a>(
    pool: &'a PgPool,
    projection: &'a dyn Projection,
) -> BoxFuture<'a, anyhow::Result<i32>> {
    Box::pin(prepare_inner(pool, projection))
}

async fn prepare_inner(pool: &PgPool, projection: &dyn Projection) -> anyhow::Result<i32> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    let row: Option<(i32, i32)> =
        sqlx::query_as("SELECT generation, code_version FROM keel_projections WHERE name = $1")
            .bind(projection.name())
            .fetch_optional(&mut *tx)
            .await?;
    let generation = match row {
        Some((generation, code_version)) => {
            if code_version != projection.version() {
                warn!(
                    stored = code_version,
                    code = projection.version(),
                    "the projection's code version changed; its tables keep the old version until rebuilt"
                );
            }
            generation
        }
        None => {
            sqlx::query(
                "INSERT INTO keel_projections (name, generation, code_version) VALUES ($1, 1, $2)",
            )
            .bind(projection.name())
            .bind(projection.version())
            .execute(&mut *tx)
            .await?;
            1
        }
    };
    projection
        .create(&mut tx, generation)
        .await
        .with_context(|| {
            format!(
                "creating the tables of {} generation {generation}",
                projection.name()
            )
        })?;
    for t in projection.tables() {
        execute_script(
            &mut tx,
            &format!(
                "DROP VIEW IF EXISTS {t}; CREATE VIEW {t} AS SELECT * FROM {}",
                table(t, generation)
            ),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(generation)
}
