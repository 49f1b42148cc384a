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
use keel_kafka::{AbortOnDrop, KafkaSettings, LogEntry, LogReader, PartitionGate};
use keel_schemas::{CommitRecord, FenceRecord, LogRecord, StreamRef, Writer, decode_event};
use sqlx::PgPool;
use tracing::{error, info, instrument, warn};

use crate::projection::{
    AnyEvent, ProjectedEvent, Projection, create_indexes, execute_script, table,
};

pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

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
    /// Batch rows of a partition's gate state between two snapshots of it.
    pub snapshot_every: u32,
}

/// The channel the projector notifies after each batch; the payload is the projection's name.
pub const NOTIFY_CHANNEL: &str = "keel_projections";

struct PartitionState {
    next_offset: i64,
    gate: PartitionGate,
    touched_streams: HashSet<StreamRef>,
    touched: bool,
    /// Rows of `keel_gate_versions` since the partition's last snapshot.
    deltas: u32,
    /// Stream versions those rows hold.
    delta_entries: u64,
}

impl PartitionState {
    /// Whether this batch's save of the partition's stream versions is a snapshot: the
    /// whole state as one row, replacing the rows before it. It is once this would be at
    /// least the `every`-th row since the last snapshot, and the rows since then, this
    /// batch's included, hold at least as many versions as the whole state: a snapshot
    /// never writes more than the rows it replaces, and a restore reads at most about
    /// twice the state.
    fn snapshot_due(&self, every: u32) -> bool {
        self.deltas + 1 >= every
            && self.delta_entries + self.touched_streams.len() as u64
                >= self.gate.stream_count() as u64
    }
}

/// Stream versions as a `keel_gate_versions` row holds them.
fn encode_versions<'a>(
    versions: impl Iterator<Item = (&'a StreamRef, u64)>,
) -> anyhow::Result<Vec<u8>> {
    let rows: Vec<(&str, &str, u64)> = versions
        .map(|(s, v)| (s.stream_type.as_str(), s.id.as_str(), v))
        .collect();
    serde_json::to_vec(&rows).context("encoding the gate's stream versions")
}

struct DeadLetter {
    entry: LogEntry,
    error: String,
}

/// What a batch left the projection doing.
pub(crate) enum Flow {
    /// Go on.
    Continue,
    /// A dead letter stopped it.
    Stopped,
}

/// Where an [`Applier`] writes, and what it reports to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The live generation: reports to `keel_projections`, notifies waiting queries, and
    /// fails with [`GenerationChanged`] once a rebuild has swapped another generation in.
    Live,
    /// A generation being rebuilt: reports to `keel_rebuilds`; nobody reads it yet.
    Rebuild,
}

/// The live generation is no longer the one this runner applies: a rebuild swapped in.
#[derive(Debug, thiserror::Error)]
#[error("generation {0} is no longer live: a rebuild swapped another generation in")]
pub(crate) struct GenerationChanged(pub(crate) i32);

/// Runs one projection until it stops on a dead letter (in `stop` mode) or the process ends.
pub struct Runner {
    pub(crate) projection: Arc<dyn Projection>,
    pub(crate) pool: PgPool,
    pub(crate) kafka: KafkaSettings,
    pub(crate) options: RunOptions,
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
    /// When the projection's code version differs from the live generation's, first
    /// rebuilds it blue/green (the old generation keeps serving, frozen, until the swap).
    /// Follows a generation swapped in by `projector rebuild`. Transient errors (broker or
    /// database down) are retried from the last checkpoint.
    #[instrument(name = "projection", skip_all, fields(projection = self.projection.name()))]
    pub async fn run(&self) -> anyhow::Result<()> {
        // One runner per projection: a second projector process stands by until the first ends.
        let mut lock = loop {
            match self.pool.acquire().await {
                Ok(c) => break c.detach(),
                Err(e) => {
                    error!(error = %e, "connecting to the database failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
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
        loop {
            let live = match prepare(&self.pool, self.projection.as_ref()).await {
                Ok(live) => live,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "preparing the projection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if live.code_version > self.projection.version() {
                // A newer build rebuilt this projection: this older one must not undo it.
                error!(
                    live = live.code_version,
                    code = self.projection.version(),
                    "the live generation was built by newer code than this projector's; standing by"
                );
                tokio::time::sleep(Duration::from_secs(10)).await;
                continue;
            }
            if live.code_version < self.projection.version() {
                info!(
                    generation = live.generation,
                    stored = live.code_version,
                    code = self.projection.version(),
                    "the projection's code version changed: rebuilding it blue/green"
                );
                let options = crate::rebuild::RebuildOptions {
                    keep_old: false,
                    wait_for_lock: true,
                    progress: crate::rebuild::Progress::Log,
                };
                if let Err(e) = crate::rebuild::rebuild(self, &options).await {
                    error!(error = %format!("{e:#}"), "the automatic rebuild failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                continue;
            }
            info!(generation = live.generation, "running");
            match self.run_live(live.generation).await {
                Ok(()) => return Ok(()),
                Err(e) if e.downcast_ref::<GenerationChanged>().is_some() => {
                    info!("{e}; following the new generation");
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "restarting from the last checkpoint");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run_live(&self, generation: i32) -> anyhow::Result<()> {
        let mut applier = Applier::load(self, generation, Mode::Live).await?;
        let reader = Arc::new(LogReader::open(&self.kafka, &applier.assignment())?);
        let mut batches = Prefetch::start(
            reader,
            self.options.batch_size,
            Duration::from_millis(500),
            self.options.linger,
        );
        loop {
            if let Flow::Stopped = applier.apply(&batches.next().await?).await? {
                return Ok(());
            }
        }
    }
}

/// The next batches, read and decoded by a task of their own while the current one is
/// applied: the broker, the decoding and PostgreSQL work at the same time instead of in
/// turn.
pub(crate) struct Prefetch {
    batches: tokio::sync::mpsc::Receiver<anyhow::Result<Vec<Decoded>>>,
    _task: AbortOnDrop<()>,
}

impl Prefetch {
    /// Starts reading batches of up to `size` records (see [`LogReader::next_batch`]).
    pub(crate) fn start(
        reader: Arc<LogReader>,
        size: usize,
        wait: Duration,
        linger: Duration,
    ) -> Self {
        let (tx, batches) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            loop {
                let batch = match reader.next_batch(size, wait, linger).await {
                    Ok(entries) => tokio::task::spawn_blocking(move || {
                        entries.into_iter().map(Decoded::new).collect::<Vec<_>>()
                    })
                    .await
                    .map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                let failed = batch.is_err();
                if tx.send(batch).await.is_err() || failed {
                    return;
                }
            }
        });
        Self {
            batches,
            _task: AbortOnDrop(task),
        }
    }

    /// The next batch; empty when nothing arrived within the wait.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Vec<Decoded>> {
        match self.batches.recv().await {
            Some(batch) => batch,
            None => anyhow::bail!("the log reader stopped"),
        }
    }
}

/// Applies batches of records to one generation of a projection, through the gate, each
/// in a transaction that also advances the generation's checkpoints.
pub(crate) struct Applier<'r> {
    runner: &'r Runner,
    generation: i32,
    mode: Mode,
    states: HashMap<(String, i32), PartitionState>,
    events: u64,
}

impl<'r> Applier<'r> {
    /// Loads the checkpoints and the gate state of every partition the projection reads.
    pub(crate) async fn load(
        runner: &'r Runner,
        generation: i32,
        mode: Mode,
    ) -> anyhow::Result<Self> {
        let mut applier = Self {
            runner,
            generation,
            mode,
            states: HashMap::new(),
            events: 0,
        };
        applier.states = applier.load_states().await?;
        Ok(applier)
    }

    /// Where to start reading each partition.
    pub(crate) fn assignment(&self) -> Vec<(String, i32, i64)> {
        let mut assignment: Vec<(String, i32, i64)> = self
            .states
            .iter()
            .map(|((topic, partition), s)| (topic.clone(), *partition, s.next_offset))
            .collect();
        assignment.sort();
        assignment
    }

    /// The next offset of a partition.
    pub(crate) fn next_offset(&self, topic: &str, partition: i32) -> i64 {
        self.states
            .get(&(topic.to_owned(), partition))
            .map_or(0, |s| s.next_offset)
    }

    /// Events applied by this applier.
    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    /// Records read so far over every partition.
    pub(crate) fn records_done(&self) -> i64 {
        self.states.values().map(|s| s.next_offset).sum()
    }

    /// Applies a batch. A batch that fails to apply is retried record by record, and the
    /// record that cannot be applied becomes a dead letter.
    pub(crate) async fn apply(&mut self, batch: &[Decoded]) -> anyhow::Result<Flow> {
        if batch.is_empty() {
            return Ok(Flow::Continue);
        }
        match self.apply_batch(batch).await {
            Err(e) if is_apply_error(&e) => {
                // A generation dropped by a swap fails to apply too: that is no dead letter.
                self.ensure_live().await?;
                warn!(error = %format!("{e:#}"), "a batch failed to apply; retrying record by record");
                self.states = self.load_states().await?;
                for decoded in batch {
                    match self.apply_batch(std::slice::from_ref(decoded)).await {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stopped) => return Ok(Flow::Stopped),
                        Err(e) if is_apply_error(&e) => {
                            self.ensure_live().await?;
                            self.states = self.load_states().await?;
                            if let Flow::Stopped =
                                self.dead_letter_alone(decoded, format!("{e:#}")).await?
                            {
                                return Ok(Flow::Stopped);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                }
                Ok(Flow::Continue)
            }
            other => other,
        }
    }

    /// In live mode, fails with [`GenerationChanged`] when the generation is no longer live.
    async fn ensure_live(&self) -> anyhow::Result<()> {
        if self.mode == Mode::Rebuild {
            return Ok(());
        }
        let live: Option<i32> =
            sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = $1")
                .bind(self.runner.projection.name())
                .fetch_optional(&self.runner.pool)
                .await?;
        if live == Some(self.generation) {
            Ok(())
        } else {
            Err(GenerationChanged(self.generation).into())
        }
    }

    async fn load_states(&self) -> anyhow::Result<HashMap<(String, i32), PartitionState>> {
        let (generation, runner) = (self.generation, self.runner);
        let name = runner.projection.name();
        let mut states = HashMap::new();
        for stream_type in runner.projection.stream_types() {
            for partition in 0..runner.kafka.partitions {
                states.insert(
                    (runner.kafka.topic(stream_type), partition),
                    PartitionState {
                        next_offset: 0,
                        gate: PartitionGate::new(),
                        touched_streams: HashSet::new(),
                        touched: false,
                        deltas: 0,
                        delta_entries: 0,
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
        .fetch_all(&runner.pool)
        .await?;
        let streams: Vec<(String, i32, String, String, i64)> = sqlx::query_as(
            "SELECT topic, partition, stream_type, stream_id, version FROM keel_gate_streams
             WHERE projection = $1 AND generation = $2",
        )
        .bind(name)
        .bind(generation)
        .fetch_all(&runner.pool)
        .await?;
        let mut versions: HashMap<(String, i32), HashMap<StreamRef, u64>> = HashMap::new();
        for (topic, partition, stream_type, id, version) in streams {
            versions
                .entry((topic, partition))
                .or_default()
                .insert(StreamRef { stream_type, id }, version as u64);
        }
        // Then the batch and snapshot rows, in log order per partition.
        let rows: Vec<(String, i32, bool, Vec<u8>)> = sqlx::query_as(
            "SELECT topic, partition, snapshot, versions FROM keel_gate_versions
             WHERE projection = $1 AND generation = $2 ORDER BY topic, partition, next_offset",
        )
        .bind(name)
        .bind(generation)
        .fetch_all(&runner.pool)
        .await?;
        let mut deltas: HashMap<(String, i32), (u32, u64)> = HashMap::new();
        for (topic, partition, snapshot, bytes) in rows {
            let decoded: Vec<(String, String, u64)> =
                serde_json::from_slice(&bytes).with_context(|| {
                    format!("reading the gate's stream versions of {topic}/{partition}")
                })?;
            let key = (topic, partition);
            let map = versions.entry(key.clone()).or_default();
            let count = deltas.entry(key).or_default();
            if snapshot {
                map.clear();
                *count = (0, 0);
            } else {
                *count = (count.0 + 1, count.1 + decoded.len() as u64);
            }
            map.extend(
                decoded
                    .into_iter()
                    .map(|(stream_type, id, v)| (StreamRef { stream_type, id }, v)),
            );
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
            (state.deltas, state.delta_entries) = deltas.get(&key).copied().unwrap_or_default();
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
    async fn apply_batch(&mut self, batch: &[Decoded]) -> anyhow::Result<Flow> {
        let on_error = self.runner.options.on_error;
        let mut events = Vec::new();
        let mut dead = Vec::new();
        let mut stopped = false;
        for decoded in batch {
            let entry = &decoded.entry;
            let Some(state) = self.states.get_mut(&(entry.topic.clone(), entry.partition)) else {
                continue;
            };
            if entry.offset < state.next_offset {
                continue;
            }
            match admit(decoded, state) {
                Ok(admitted) => {
                    events.extend(admitted);
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
                    if on_error == OnError::Stop {
                        stopped = true;
                        break;
                    }
                    pass_over(decoded, state);
                }
            }
        }
        let mut tx = self.runner.pool.begin().await?;
        self.runner
            .projection
            .apply(&mut tx, self.generation, &events)
            .await
            .map_err(ApplyError)?;
        self.save(&mut tx, &dead, events.len(), stopped).await?;
        tx.commit().await?;
        self.events += events.len() as u64;
        self.clear_touched();
        Ok(if stopped {
            Flow::Stopped
        } else {
            Flow::Continue
        })
    }

    fn clear_touched(&mut self) {
        let every = self.runner.options.snapshot_every;
        for state in self.states.values_mut() {
            if !state.touched_streams.is_empty() {
                (state.deltas, state.delta_entries) = if state.snapshot_due(every) {
                    (0, 0)
                } else {
                    (
                        state.deltas + 1,
                        state.delta_entries + state.touched_streams.len() as u64,
                    )
                };
            }
            state.touched = false;
            state.touched_streams.clear();
        }
    }

    /// Records a record that failed to apply on its own, in a transaction of its own.
    async fn dead_letter_alone(
        &mut self,
        decoded: &Decoded,
        error: String,
    ) -> anyhow::Result<Flow> {
        let dead = DeadLetter {
            entry: decoded.entry.clone(),
            error,
        };
        warn!(topic = %dead.entry.topic, partition = dead.entry.partition, offset = dead.entry.offset,
              error = %dead.error, "dead letter");
        let stopped = self.runner.options.on_error == OnError::Stop;
        if let Some(state) = self
            .states
            .get_mut(&(dead.entry.topic.clone(), dead.entry.partition))
        {
            state.touched = true;
            if !stopped {
                pass_over(decoded, state);
            }
        }
        let mut tx = self.runner.pool.begin().await?;
        self.save(&mut tx, std::slice::from_ref(&dead), 0, stopped)
            .await?;
        tx.commit().await?;
        self.clear_touched();
        Ok(if stopped {
            Flow::Stopped
        } else {
            Flow::Continue
        })
    }

    /// Writes checkpoints, gate state, dead letters and the progress row; in live mode
    /// also notifies on commit.
    ///
    /// Boxed: a `Send` future over `&mut PgConnection` has to be checked where its lifetimes
    /// are concrete (rust-lang/rust#102211).
    fn save<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        dead: &'a [DeadLetter],
        events: usize,
        stopped: bool,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.save_inner(tx, dead, events, stopped))
    }

    async fn save_inner(
        &self,
        tx: &mut sqlx::PgConnection,
        dead: &[DeadLetter],
        events: usize,
        stopped: bool,
    ) -> anyhow::Result<()> {
        let name = self.runner.projection.name();
        let generation = self.generation;
        let touched: Vec<(&(String, i32), &PartitionState)> =
            self.states.iter().filter(|(_, s)| s.touched).collect();
        // The streams each partition's batch moved, as one row per partition; or, when due,
        // the partition's whole state as a snapshot that replaces the rows before it.
        let mut rows = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for ((topic, partition), state) in &touched {
            if state.touched_streams.is_empty() {
                continue;
            }
            let snapshot = state.snapshot_due(self.runner.options.snapshot_every);
            let versions = if snapshot {
                for table in ["keel_gate_versions", "keel_gate_streams"] {
                    sqlx::query(&format!(
                        "DELETE FROM {table} WHERE projection = $1 AND generation = $2 AND topic = $3 AND partition = $4"
                    ))
                    .bind(name)
                    .bind(generation)
                    .bind(topic)
                    .bind(partition)
                    .execute(&mut *tx)
                    .await?;
                }
                encode_versions(state.gate.stream_versions())?
            } else {
                encode_versions(
                    state
                        .touched_streams
                        .iter()
                        .map(|s| (s, state.gate.stream_version(s))),
                )?
            };
            rows.0.push(topic.clone());
            rows.1.push(*partition);
            rows.2.push(state.next_offset);
            rows.3.push(snapshot);
            rows.4.push(versions);
        }
        if !rows.0.is_empty() {
            sqlx::query(
                "INSERT INTO keel_gate_versions (projection, generation, topic, partition, next_offset, snapshot, versions)
                 SELECT $1, $2, * FROM UNNEST($3::text[], $4::int[], $5::bigint[], $6::bool[], $7::bytea[])",
            )
            .bind(name)
            .bind(generation)
            .bind(rows.0)
            .bind(rows.1)
            .bind(rows.2)
            .bind(rows.3)
            .bind(rows.4)
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
        match self.mode {
            Mode::Live => {
                // Also the check that this generation is still live: a swap that committed
                // first makes this match nothing (and one that waits sees this batch first).
                let updated = sqlx::query(
                    "UPDATE keel_projections SET events = events + $2, state = $3, error = $4, updated_at = now()
                     WHERE name = $1 AND generation = $5",
                )
                .bind(name)
                .bind(events as i64)
                .bind(state)
                .bind(error)
                .bind(generation)
                .execute(&mut *tx)
                .await?;
                if updated.rows_affected() == 0 {
                    return Err(GenerationChanged(generation).into());
                }
                sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(NOTIFY_CHANNEL)
                    .bind(name)
                    .execute(&mut *tx)
                    .await?;
            }
            Mode::Rebuild => {
                let updated = sqlx::query(
                    "UPDATE keel_rebuilds SET events = events + $2, state = $3, error = $4, records_done = $5,
                        updated_at = now()
                     WHERE projection = $1 AND generation = $6",
                )
                .bind(name)
                .bind(events as i64)
                .bind(if stopped { "stopped" } else { "building" })
                .bind(error)
                .bind(self.records_done())
                .bind(generation)
                .execute(&mut *tx)
                .await?;
                anyhow::ensure!(
                    updated.rows_affected() == 1,
                    "the rebuild of generation {generation} is no longer recorded; it was cancelled or finished elsewhere"
                );
            }
        }
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
fn pass_over(decoded: &Decoded, state: &mut PartitionState) {
    match &decoded.parsed {
        Ok(Parsed::Fence(fence)) => {
            let _ = state.gate.admit_fence(fence);
        }
        Ok(Parsed::Commit(commit, _)) => {
            if state.gate.admit_commit(commit).is_ok() {
                state.touched_streams.insert(commit.stream.clone());
            }
        }
        Err(_) => {}
    }
    state.next_offset = decoded.entry.offset + 1;
}

/// A record read from the log, decoded as far as it can be without its partition's gate
/// state: that part runs beside the previous batch's statements.
pub(crate) struct Decoded {
    entry: LogEntry,
    parsed: Result<Parsed, String>,
}

enum Parsed {
    Fence(FenceRecord),
    /// A commit with its events decoded and upcast, or why they cannot be.
    Commit(Arc<CommitRecord>, Result<Vec<AnyEvent>, String>),
}

impl Decoded {
    /// Decodes the record and, for a commit, its events.
    pub(crate) fn new(entry: LogEntry) -> Self {
        let parsed = LogRecord::decode(&entry.payload)
            .map_err(|e| e.to_string())
            .map(|record| match record {
                LogRecord::Fence(fence) => Parsed::Fence(fence),
                LogRecord::Commit(commit) => {
                    let events = decode_events(&commit);
                    Parsed::Commit(Arc::new(commit), events)
                }
            });
        Self { entry, parsed }
    }
}

fn decode_events(commit: &CommitRecord) -> Result<Vec<AnyEvent>, String> {
    commit
        .events
        .iter()
        .enumerate()
        .map(|(index, envelope)| {
            match commit.stream.stream_type.as_str() {
                t if t == Product::TYPE => decode_event::<Product>(envelope).map(AnyEvent::Product),
                t if t == Customer::TYPE => {
                    decode_event::<Customer>(envelope).map(AnyEvent::Customer)
                }
                t if t == Order::TYPE => decode_event::<Order>(envelope).map(AnyEvent::Order),
                other => return Err(format!("unknown stream type {other:?}")),
            }
            .map_err(|e| {
                format!(
                    "event {} of {} (version {}): {e}",
                    index, commit.stream, envelope.version
                )
            })
        })
        .collect()
}

/// Puts one decoded record through the gate: the events it contributes, or why it cannot
/// be read. A record the gate skips contributes nothing and is no error.
fn admit(decoded: &Decoded, state: &mut PartitionState) -> Result<Vec<ProjectedEvent>, String> {
    let (commit, events) = match &decoded.parsed {
        Err(e) => return Err(e.clone()),
        Ok(Parsed::Fence(fence)) => {
            let _ = state.gate.admit_fence(fence);
            return Ok(Vec::new());
        }
        Ok(Parsed::Commit(commit, events)) => (commit, events),
    };
    if state.gate.commit_verdict(commit).is_err() {
        let _ = state.gate.admit_commit(commit);
        return Ok(Vec::new());
    }
    let events = events.as_ref().map_err(Clone::clone)?;
    let _ = state.gate.admit_commit(commit);
    state.touched_streams.insert(commit.stream.clone());
    let entry = &decoded.entry;
    Ok(events
        .iter()
        .enumerate()
        .map(|(index, event)| ProjectedEvent {
            topic: entry.topic.clone(),
            partition: entry.partition,
            offset: entry.offset,
            index,
            commit: Arc::clone(commit),
            event: event.clone(),
        })
        .collect())
}

/// The live generation of a projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// Its number.
    pub generation: i32,
    /// The code version its tables were built with.
    pub code_version: i32,
}

/// Makes sure the projection has a live generation with its tables and views; returns it.
pub fn prepare<'a>(
    pool: &'a PgPool,
    projection: &'a dyn Projection,
) -> BoxFuture<'a, anyhow::Result<Live>> {
    Box::pin(prepare_inner(pool, projection))
}

async fn prepare_inner(pool: &PgPool, projection: &dyn Projection) -> anyhow::Result<Live> {
    let mut tx = pool.begin().await?;
    // Serialises with a rebuild's swap, which takes the same lock.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(projection.name())
        .execute(&mut *tx)
        .await?;
    let row: Option<(i32, i32)> =
        sqlx::query_as("SELECT generation, code_version FROM keel_projections WHERE name = $1")
            .bind(projection.name())
            .fetch_optional(&mut *tx)
            .await?;
    let live = match row {
        Some((generation, code_version)) => Live {
            generation,
            code_version,
        },
        None => {
            sqlx::query(
                "INSERT INTO keel_projections (name, generation, code_version) VALUES ($1, 1, $2)",
            )
            .bind(projection.name())
            .bind(projection.version())
            .execute(&mut *tx)
            .await?;
            Live {
                generation: 1,
                code_version: projection.version(),
            }
        }
    };
    let generation = live.generation;
    projection
        .create(&mut tx, generation)
        .await
        .with_context(|| {
            format!(
                "creating the tables of {} generation {generation}",
                projection.name()
            )
        })?;
    create_indexes(&mut tx, projection, generation)
        .await
        .with_context(|| format!("indexing {} generation {generation}", projection.name()))?;
    point_views(&mut tx, projection, generation).await?;
    tx.commit().await?;
    Ok(live)
}

/// Points the projection's views at the tables of `generation`.
pub(crate) async fn point_views(
    tx: &mut sqlx::PgConnection,
    projection: &dyn Projection,
    generation: i32,
) -> anyhow::Result<()> {
    for t in projection.tables() {
        execute_script(
            tx,
            &format!(
                "DROP VIEW IF EXISTS {t}; CREATE VIEW {t} AS SELECT * FROM {}",
                table(t, generation)
            ),
        )
        .await?;
    }
    Ok(())
}
