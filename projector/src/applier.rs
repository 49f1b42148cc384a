//! The batch transaction: a batch of records goes through the partition gate, and its
//! events are applied to one generation of a projection in one PostgreSQL transaction
//! that also saves the checkpoints, the gate's state, the dead letters and the batch's
//! report. A crash anywhere replays nothing twice and loses nothing.

use keel_schemas::TopicPartition;
use tracing::warn;

use crate::checkpoint::Checkpoints;
use crate::checkpoint::PartitionState;
use crate::dead_letter::{self, DeadLetter, Parked, Status};
use crate::decode::Decoded;
use crate::generation::{self, BatchReport, GenerationChanged, Mode};
use crate::hold::Hold;
use crate::job::{Job, OnError};
use crate::projection::ProjectedEvent;
use crate::{BoxFuture, generation::live};

mod settle;

/// What a batch left the projection doing.
pub(crate) enum Flow {
    /// Go on.
    Continue,
    /// A dead letter stopped it.
    Stopped,
}

/// Applies batches of records to one generation of a projection, through the gate, each
/// in a transaction that also advances the generation's checkpoints.
pub(crate) struct Applier<'j> {
    job: &'j Job,
    generation: i32,
    mode: Mode,
    checkpoints: Checkpoints,
    events: u64,
    hold: &'j Hold,
}

impl<'j> Applier<'j> {
    /// A batch's transaction: it proves this process still holds its work, and for the live
    /// generation takes the projection's lock shared and checks the generation is still
    /// live ([`generation::enter_live`]), all before it writes a row.
    async fn begin(&self) -> anyhow::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        let mut tx = self.job.pool.begin().await?;
        if let Err(e) = self.hold.prove(&mut tx).await {
            // The proof share-locked the unit rows it read: let go of them now, not when the
            // pool next tests the connection, since a claim skips a unit whose row is locked.
            let _ = tx.rollback().await;
            return Err(e);
        }
        if self.mode == Mode::Live
            && let Err(e) = generation::enter_live(&mut tx, self.job.name(), self.generation).await
        {
            let _ = tx.rollback().await;
            return Err(e);
        }
        Ok(tx)
    }

    /// Proves, inside `tx`, that this process still holds the work it applies.
    pub(crate) async fn prove_hold(&self, tx: &mut sqlx::PgConnection) -> anyhow::Result<()> {
        self.hold.prove(tx).await
    }

    /// Loads the checkpoints and the gate state of every partition the projection reads,
    /// to apply batches under `hold`: each batch transaction proves it still holds the work.
    pub(crate) async fn load(
        job: &'j Job,
        generation: i32,
        mode: Mode,
        hold: &'j Hold,
    ) -> anyhow::Result<Self> {
        let checkpoints = Self::load_checkpoints(job, generation, hold).await?;
        Ok(Self {
            job,
            generation,
            mode,
            checkpoints,
            events: 0,
            hold,
        })
    }

    /// The checkpoints of the partitions `hold` covers: the units a live run holds, or
    /// every partition the projection reads.
    async fn load_checkpoints(
        job: &Job,
        generation: i32,
        hold: &Hold,
    ) -> anyhow::Result<Checkpoints> {
        let partitions = hold.partitions().unwrap_or_else(|| job.partitions());
        Checkpoints::load(
            &job.pool,
            job.name(),
            generation,
            partitions,
            job.options.snapshot_every,
            &job.options.policy,
        )
        .await
    }

    async fn reload(&mut self) -> anyhow::Result<()> {
        self.checkpoints = Self::load_checkpoints(self.job, self.generation, self.hold).await?;
        Ok(())
    }

    /// Marks the live projection running again when it stopped on a dead letter that still
    /// holds back a partition this applier applies (the partition's checkpoint is at it):
    /// that record is read again now. Fails with
    /// [`generation::ProjectionStopped`] when it stays stopped (on another partition).
    pub(crate) async fn resume(&self) -> anyhow::Result<()> {
        if self.mode != Mode::Live {
            return Ok(());
        }
        let partitions: Vec<TopicPartition> =
            self.assignment().into_iter().map(|(at, _)| at).collect();
        sqlx::query(
            "UPDATE keel_projections SET state = 'running', error = NULL, updated_at = now()
             WHERE name = $1 AND generation = $2 AND state = 'stopped'
               AND EXISTS (SELECT 1 FROM keel_dead_letters d
                           JOIN keel_checkpoints c ON c.projection = d.projection AND c.generation = d.generation
                                                  AND c.topic = d.topic AND c.partition = d.partition
                           WHERE d.projection = $1 AND d.generation = $2 AND NOT d.skipped
                             AND d.\"offset\" = c.next_offset
                             AND (d.topic, d.partition) IN (SELECT * FROM UNNEST($3::text[], $4::int[])))",
        )
        .bind(self.job.name())
        .bind(self.generation)
        .bind(partitions.iter().map(|p| p.topic.clone()).collect::<Vec<_>>())
        .bind(partitions.iter().map(|p| p.partition).collect::<Vec<_>>())
        .execute(&self.job.pool)
        .await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM keel_projections WHERE name = $1")
                .bind(self.job.name())
                .fetch_optional(&self.job.pool)
                .await?;
        if state.as_deref() == Some("stopped") {
            return Err(generation::ProjectionStopped(self.job.name().to_owned()).into());
        }
        Ok(())
    }

    /// Where to start reading each partition.
    pub(crate) fn assignment(&self) -> Vec<(TopicPartition, i64)> {
        self.checkpoints.assignment()
    }

    /// The next offset of a partition.
    pub(crate) fn next_offset(&self, at: &TopicPartition) -> i64 {
        self.checkpoints.next_offset(at)
    }

    /// Events applied by this applier.
    pub(crate) fn events(&self) -> u64 {
        self.events
    }

    /// Records read so far over every partition.
    pub(crate) fn records_done(&self) -> i64 {
        self.checkpoints.records_done()
    }

    /// Applies a batch. A batch that fails on a data error of a record is retried record
    /// by record, and the record that cannot be applied becomes a dead letter; a transient
    /// error is left to the caller to retry from the checkpoint; any other stops the
    /// projection ([`Halted`]).
    pub(crate) async fn apply(&mut self, batch: &[Decoded]) -> anyhow::Result<Flow> {
        if batch.is_empty() {
            return Ok(Flow::Continue);
        }
        match self.apply_batch(batch).await.map_err(halt_on) {
            // A swap that committed while this batch ran, and the drop of the old
            // generation after it, fail the batch too (its tables are gone: SQLSTATE
            // 42P01): the runner follows the new generation instead of stopping.
            Err(e) if e.downcast_ref::<Halted>().is_some() => match self.ensure_live().await {
                Err(changed) if changed.downcast_ref::<GenerationChanged>().is_some() => {
                    warn!(error = %format!("{e:#}"), "the batch failed with its generation swapped out; following the new one");
                    Err(changed)
                }
                // Still live (or the check itself failed): the halt stands.
                _ => Err(e),
            },
            Err(e) if is_apply_error(&e) => {
                // A generation dropped by a swap fails to apply too: that is no dead letter.
                self.ensure_live().await?;
                warn!(error = %format!("{e:#}"), "a batch failed to apply; retrying record by record");
                self.reload().await?;
                for decoded in batch {
                    match self
                        .apply_batch(std::slice::from_ref(decoded))
                        .await
                        .map_err(halt_on)
                    {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stopped) => return Ok(Flow::Stopped),
                        Err(e) if is_apply_error(&e) => {
                            self.ensure_live().await?;
                            self.reload().await?;
                            if let Flow::Stopped =
                                self.dead_letter_alone(decoded, record_error(&e)).await?
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
        if live(&self.job.pool, self.job.name()).await? == Some(self.generation) {
            Ok(())
        } else {
            Err(GenerationChanged(self.generation).into())
        }
    }

    /// Puts the records through the gate and applies their events in one transaction that
    /// also advances the checkpoints.
    async fn apply_batch(&mut self, batch: &[Decoded]) -> anyhow::Result<Flow> {
        let started = std::time::Instant::now();
        let began = std::time::SystemTime::now();
        let on_error = self.job.options.on_error;
        let mut events = Vec::new();
        let mut dead = Vec::new();
        let mut stopped = false;
        for decoded in batch {
            let entry = &decoded.entry;
            let Some(state) = self
                .checkpoints
                .partition_mut(&entry.topic, entry.partition)
            else {
                continue;
            };
            if entry.offset < state.next_offset {
                continue;
            }
            if entry.timestamp_ms.is_some() {
                state.last_record_ms = entry.timestamp_ms;
            }
            match decoded.admit(state) {
                Ok(admitted) => {
                    state.next_offset = entry.offset + 1;
                    state.touched = true;
                    // A parked stream's later records are held back behind its first, in
                    // order: the gate took them, their events wait.
                    if !state.parked.is_empty()
                        && let Some(stream) = admitted.first().map(|e| &e.commit.stream)
                        && let Some(parked) = state.parked.get_mut(stream)
                    {
                        parked.hold(entry.offset);
                        dead.push(DeadLetter {
                            entry: entry.clone(),
                            error: format!(
                                "held back: its stream is parked since offset {}",
                                parked.first_offset
                            ),
                            stream: Some(stream.clone()),
                            status: Status::Parked,
                            gate_admitted: true,
                        });
                        continue;
                    }
                    state.batch_events += admitted.len() as u64;
                    events.extend(admitted);
                }
                Err(error) => {
                    warn!(topic = %entry.topic, partition = entry.partition, offset = entry.offset, %error, "dead letter");
                    state.touched = true;
                    let letter = dead_letter_of(decoded, error, on_error, state);
                    if letter.status == Status::Stopped {
                        dead.push(letter);
                        stopped = true;
                        break;
                    }
                    dead.push(letter);
                    decoded.pass_over(state);
                }
            }
        }
        let mut tx = self.begin().await?;
        self.job
            .projection
            .apply(&mut tx, self.generation, &events)
            .await
            .map_err(ApplyError)?;
        self.save(&mut tx, &dead, stopped).await?;
        tx.commit().await?;
        self.job.options.metrics.batch(
            self.job.name(),
            self.mode == Mode::Rebuild,
            events.len(),
            started.elapsed(),
        );
        if self.mode == Mode::Live {
            trace_commits(self.job.name(), &events, began);
        }
        self.events += events.len() as u64;
        self.checkpoints.committed();
        Ok(if stopped {
            Flow::Stopped
        } else {
            Flow::Continue
        })
    }

    /// Records a record that failed to apply on its own, in a transaction of its own.
    async fn dead_letter_alone(
        &mut self,
        decoded: &Decoded,
        error: String,
    ) -> anyhow::Result<Flow> {
        let entry = &decoded.entry;
        warn!(topic = %entry.topic, partition = entry.partition, offset = entry.offset,
              %error, "dead letter");
        let on_error = self.job.options.on_error;
        let Some(state) = self
            .checkpoints
            .partition_mut(&entry.topic, entry.partition)
        else {
            anyhow::bail!(
                "{}/{} is not a partition this applier applies",
                entry.topic,
                entry.partition
            );
        };
        state.touched = true;
        let dead = dead_letter_of(decoded, error, on_error, state);
        let stopped = dead.status == Status::Stopped;
        if !stopped {
            decoded.pass_over(state);
        }
        let mut tx = self.begin().await?;
        self.save(&mut tx, std::slice::from_ref(&dead), stopped)
            .await?;
        tx.commit().await?;
        self.checkpoints.committed();
        Ok(if stopped {
            Flow::Stopped
        } else {
            Flow::Continue
        })
    }

    /// Writes checkpoints, gate state, dead letters and the batch's report; in live mode
    /// also notifies on commit.
    ///
    /// Boxed: a `Send` future over `&mut PgConnection` has to be checked where its lifetimes
    /// are concrete (rust-lang/rust#102211).
    fn save<'a>(
        &'a self,
        tx: &'a mut sqlx::PgConnection,
        dead: &'a [DeadLetter],
        stopped: bool,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (name, generation) = (self.job.name(), self.generation);
            self.checkpoints.save(tx).await?;
            dead_letter::record(tx, name, generation, dead).await?;
            let stopped = dead.last().filter(|_| stopped).map(DeadLetter::stop_reason);
            generation::record_batch(
                tx,
                BatchReport {
                    stopped,
                    mode: self.mode,
                    projection: name,
                    generation,
                },
            )
            .await
        })
    }
}

/// Records the application of each commit among `events` that carries a trace context as
/// a span of its command's trace, from `began` (the batch's start) to now (its
/// transaction committed: from then on the view shows it), when traces are exported. One
/// batch holds the commits of many commands: each gets its own span, in its own trace,
/// and the spans of one batch share its `keel.batch.id`.
fn trace_commits(projection: &str, events: &[ProjectedEvent], began: std::time::SystemTime) {
    use keel_telemetry::trace::{KeyValue, SpanKind, enabled, span_under};
    if !enabled() {
        return;
    }
    let (batch, committed) = (
        uuid::Uuid::now_v7().to_string(),
        std::time::SystemTime::now(),
    );
    let mut last = None;
    for event in events {
        let commit = &event.commit;
        if last == Some(commit.commit_id) {
            continue;
        }
        last = Some(commit.commit_id);
        let Some(traceparent) = &commit.command.traceparent else {
            continue;
        };
        span_under(
            "projection.apply",
            SpanKind::Consumer,
            traceparent,
            (began, committed),
            vec![
                KeyValue::new("keel.projection", projection.to_owned()),
                KeyValue::new("keel.batch.id", batch.clone()),
                KeyValue::new("keel.commit.id", commit.commit_id.to_string()),
                KeyValue::new("keel.stream", commit.stream.to_string()),
                KeyValue::new("messaging.destination.name", event.topic.clone()),
                KeyValue::new(
                    "messaging.destination.partition.id",
                    event.partition.to_string(),
                ),
                KeyValue::new("messaging.kafka.offset", event.offset),
            ],
        );
    }
}

/// The dead letter of a record that failed with `error`, as `on_error` handles it: with
/// [`OnError::Park`] its stream is parked on it (or, already parked, holds it back too);
/// a record that names no stream is skipped, since no stream's view waits for it.
fn dead_letter_of(
    decoded: &Decoded,
    error: String,
    on_error: OnError,
    state: &mut PartitionState,
) -> DeadLetter {
    let stream = decoded.stream();
    let parked = stream
        .as_ref()
        .is_some_and(|s| state.parked.contains_key(s));
    let status = match (on_error, &stream) {
        // A stream already parked holds every later record back, whatever the mode: a
        // retry applies them in order.
        (_, Some(stream)) if parked => {
            if let Some(p) = state.parked.get_mut(stream) {
                p.hold(decoded.entry.offset);
            }
            Status::Parked
        }
        (OnError::Stop, _) => Status::Stopped,
        (OnError::Skip, _) | (OnError::Park, None) => Status::Skipped,
        (OnError::Park, Some(stream)) => {
            let offset = decoded.entry.offset;
            match state.parked.get_mut(stream) {
                Some(parked) => parked.hold(offset),
                None => {
                    warn!(%stream, offset, "parking the stream");
                    state
                        .parked
                        .insert(stream.clone(), Parked::new(offset, error.clone()));
                }
            }
            Status::Parked
        }
    };
    DeadLetter {
        entry: decoded.entry.clone(),
        error,
        stream,
        status,
        gate_admitted: decoded.is_record(),
    }
}

/// An error the projection's own statements raised: the batch holds a record it cannot apply.
#[derive(Debug, thiserror::Error)]
#[error("applying the batch: {0}")]
struct ApplyError(sqlx::Error);

/// What a failed batch statement says about what to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// A data error the record itself causes (SQLSTATE class 22, or class 23 other than a
    /// unique violation): the record becomes a dead letter.
    Record,
    /// The database could not do it now (a deadlock, a serialization failure, a lock or
    /// statement timeout, a shutdown, a lost connection, no resources): retried from the
    /// last checkpoint, never dead-lettered.
    Transient,
    /// Anything else, among them a unique violation (which may mean a record applied
    /// twice): the projection stops, loudly, and drops nothing.
    Halt,
}

/// The projection stopped on an error that no retry and no dead letter can settle.
#[derive(Debug, thiserror::Error)]
#[error(
    "the projection stopped on an error that is neither the record's fault nor transient (SQLSTATE {code}); nothing was dropped: fix the cause and start it again"
)]
pub(crate) struct Halted {
    code: String,
}

/// Classifies a SQLSTATE.
pub(crate) fn failure_of(code: &str) -> Failure {
    match code {
        "23505" => Failure::Halt,
        c if c.starts_with("22") || c.starts_with("23") => Failure::Record,
        "40001" | "40P01" | "55P03" | "57014" | "57P01" | "57P02" | "57P03" | "25P03" => {
            Failure::Transient
        }
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            Failure::Transient
        }
        _ => Failure::Halt,
    }
}

/// What to do about a failed batch: `None` when it did not fail in the projection's own
/// statements (a lost connection on the way, say), which is retried from the checkpoint.
fn failure(e: &anyhow::Error) -> Option<(Failure, String)> {
    match e.downcast_ref::<ApplyError>() {
        Some(ApplyError(sqlx::Error::Database(db))) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            Some((failure_of(&code), code))
        }
        // The connection or the pool failed on the way: retried.
        Some(ApplyError(
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed,
        )) => Some((Failure::Transient, String::new())),
        // A value that cannot be encoded or decoded, a missing column or type: the same
        // every time, so no retry settles it.
        Some(ApplyError(other)) => Some((Failure::Halt, format!("none ({other})"))),
        None => None,
    }
}

/// What a dead letter says of the error a record's statements failed with: the message
/// and its SQLSTATE.
fn record_error(e: &anyhow::Error) -> String {
    match failure(e) {
        Some((_, code)) if !code.is_empty() => format!("{e:#} (SQLSTATE {code})"),
        _ => format!("{e:#}"),
    }
}

fn is_apply_error(e: &anyhow::Error) -> bool {
    matches!(failure(e), Some((Failure::Record, _)))
}

/// Turns an error the projection must stop on into [`Halted`].
fn halt_on(e: anyhow::Error) -> anyhow::Error {
    match failure(&e) {
        Some((Failure::Halt, code)) => e.context(Halted { code }),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;
    use crate::dead_letter::Action;

    /// The SQLSTATE a statement fails with, on a real PostgreSQL.
    async fn code_of(pool: &sqlx::PgPool, setup: &str, statement: &str) -> String {
        let mut conn = pool.acquire().await.unwrap();
        sqlx::raw_sql(setup).execute(&mut *conn).await.unwrap();
        match sqlx::raw_sql(statement).execute(&mut *conn).await {
            Err(sqlx::Error::Database(db)) => db.code().unwrap().into_owned(),
            other => panic!("{statement}: {other:?}"),
        }
    }

    /// A live batch whose generation a swap replaced and a drop removed while it ran
    /// fails on the missing tables: that is the generation changing, not a reason to
    /// stop the projection.
    #[tokio::test]
    async fn a_batch_whose_generation_was_swapped_out_and_dropped_follows_the_new_one() {
        let (_db, pool) = crate::testing::database("swapped-out").await;
        let one = crate::testing::OneOrderPartition::prepare(&pool).await;
        let (job, live) = (&one.job, one.live);
        let hold = crate::hold::Hold::claim(&pool, "run:orders".into())
            .await
            .unwrap();
        let mut applier = Applier::load(job, live, Mode::Live, &hold).await.unwrap();
        // A swap to the next generation commits, and the old one is dropped.
        sqlx::query("UPDATE keel_projections SET generation = $1 WHERE name = 'orders'")
            .bind(live + 1)
            .execute(&pool)
            .await
            .unwrap();
        sqlx::raw_sql(&format!("DROP VIEW orders; DROP TABLE orders_g{live}"))
            .execute(&pool)
            .await
            .unwrap();
        let writer = keel_schemas::testing::writer("w", 1);
        let batch = one.read(
            0,
            &[
                one.fence(&writer),
                crate::testing::placed(&writer, &one.key, "o-1"),
            ],
        );
        let failed = applier.apply(&batch).await.err().expect("the batch fails");
        assert!(
            failed.downcast_ref::<GenerationChanged>().is_some(),
            "the runner follows the new generation: {failed:#}"
        );
        pool.close().await;
    }

    /// A projection stopped on a dead letter goes on only once the runner of the partition
    /// that record still holds back starts again: a dead letter dealt with long ago (the
    /// checkpoint moved past it) resumes nothing.
    #[tokio::test]
    async fn only_the_dead_letter_still_holding_its_partition_back_resumes_a_stop() {
        let (_db, pool) = crate::testing::database("resume").await;
        let one = crate::testing::OneOrderPartition::prepare(&pool).await;
        let (job, live) = (&one.job, one.live);
        let topic = one.kafka.topic("order");
        sqlx::query(
            "INSERT INTO keel_checkpoints (projection, generation, topic, partition, next_offset)
             VALUES ('orders', $1, $2, 0, 5)",
        )
        .bind(live)
        .bind(&topic)
        .execute(&pool)
        .await
        .unwrap();
        let dead_letter = |offset: i64| {
            sqlx::query(
                r#"INSERT INTO keel_dead_letters (projection, generation, topic, partition, "offset", error, payload, skipped)
                   VALUES ('orders', $1, $2, 0, $3, 'bad', decode('00', 'hex'), false)"#,
            )
            .bind(live)
            .bind(&topic)
            .bind(offset)
            .execute(&pool)
        };
        dead_letter(2).await.unwrap();
        sqlx::query("UPDATE keel_projections SET state = 'stopped', error = 'elsewhere' WHERE name = 'orders'")
            .execute(&pool)
            .await
            .unwrap();
        let hold = crate::hold::Hold::claim(&pool, "run:orders".into())
            .await
            .unwrap();
        let applier = Applier::load(job, live, Mode::Live, &hold).await.unwrap();
        let waits = applier.resume().await.expect_err("still stopped");
        assert!(
            waits
                .downcast_ref::<generation::ProjectionStopped>()
                .is_some(),
            "{waits:#}"
        );
        dead_letter(5).await.unwrap();
        applier.resume().await.unwrap();
        let state: String =
            sqlx::query_scalar("SELECT state FROM keel_projections WHERE name = 'orders'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(state, "running");
        pool.close().await;
    }

    /// The default: a record that fails in PostgreSQL (a data error) or cannot be decoded
    /// parks its stream; the stream's later records are held back behind it, every other
    /// stream is applied, and the checkpoint moves past them all. A retry with the code
    /// still failing leaves the stream parked; with the fixed code it applies the held-back
    /// records in order, once (a second retry finds nothing parked); a process that lost
    /// the unit carries out nothing; a discard drops the records with its reason.
    #[tokio::test]
    async fn a_failing_record_parks_its_stream_and_a_retry_with_the_fix_applies_it_once() {
        use keel_schemas::testing::{commit, stream, writer};
        use serde_json::json;

        let (_db, pool) = crate::testing::database("park").await;
        let one = crate::testing::OneOrderPartition::prepare(&pool).await;
        let fixable = crate::testing::Fixable::orders("o-2");
        let mut job = one.job.clone();
        job.projection = fixable.clone();
        job.options.on_error = OnError::Park;
        let live = one.live;
        let key = &one.key;
        let writer = writer("w", 1);
        let eur = json!({"amount_minor": 100, "currency": "EUR"});
        let placed = |id: &str| crate::testing::placed_commit(&writer, key, id);
        let (o1, o2, o4) = (placed("o-1"), placed("o-2"), placed("o-4"));
        // Not an OrderPlaced this code can read.
        let o3 = commit(&writer, stream("order", "o-3"), 0)
            .event("OrderPlaced", 2, json!({"nonsense": true}))
            .signed(key);
        let paid2 = crate::testing::order_commit(
            &writer,
            key,
            "o-2",
            &o2,
            (
                "PaymentRecorded",
                json!({"amount": eur, "payment_ref": "p-1"}),
            ),
        );
        let cancelled3 = crate::testing::order_commit(
            &writer,
            key,
            "o-3",
            &o3,
            ("OrderCancelled", json!({"reason": "changed my mind"})),
        );
        use keel_schemas::LogRecord::Commit;
        let records = [
            one.fence(&writer),
            Commit(o1),
            Commit(o2.clone()),
            Commit(o3),
            Commit(paid2.clone()),
            Commit(o4),
            Commit(cancelled3),
        ];
        let hold = crate::hold::Hold::claim(&pool, "run:orders".into())
            .await
            .unwrap();
        let mut applier = Applier::load(&job, live, Mode::Live, &hold).await.unwrap();
        assert!(matches!(
            applier.apply(&one.read(0, &records)).await.unwrap(),
            Flow::Continue
        ));

        let orders = || async {
            sqlx::query_as::<_, (String, i64)>(
                "SELECT order_id, paid_minor FROM orders ORDER BY order_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        };
        let parked = || async {
            sqlx::query_as::<_, (String, i64, i32, String)>(
                "SELECT stream_id, first_offset, records, error FROM keel_parked_streams ORDER BY stream_id",
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        };
        let statuses = || async {
            sqlx::query_as::<_, (i64, String, Option<String>, Option<String>)>(
                r#"SELECT "offset", status, resolved_by, resolution FROM keel_dead_letters ORDER BY "offset""#,
            )
            .fetch_all(&pool)
            .await
            .unwrap()
        };
        assert_eq!(
            orders().await,
            [("o-1".to_owned(), 0), ("o-4".to_owned(), 0)],
            "every other stream is applied"
        );
        let next: i64 = sqlx::query_scalar("SELECT next_offset FROM keel_checkpoints")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(next, 7, "the checkpoint moves past the parked records");
        let held = parked().await;
        assert_eq!(
            held.iter()
                .map(|(id, first, n, _)| (id.as_str(), *first, *n))
                .collect::<Vec<_>>(),
            [("o-2", 2, 2), ("o-3", 3, 2)]
        );
        assert!(held[0].3.contains("22012"), "{}", held[0].3);
        assert_eq!(
            statuses()
                .await
                .iter()
                .map(|(o, s, _, _)| (*o, s.as_str()))
                .collect::<Vec<_>>(),
            [(2, "parked"), (3, "parked"), (4, "parked"), (6, "parked")]
        );

        let request = |id: &str, action| {
            let pool = pool.clone();
            let id = id.to_owned();
            async move {
                crate::quarantine::request(
                    &pool,
                    "orders",
                    &stream("order", &id),
                    action,
                    (action == Action::Discard).then_some("cannot be read; re-placed as o-5"),
                    "ops",
                )
                .await
            }
        };
        // The code still fails: the retry changes nothing but the error.
        request("o-2", Action::Retry).await.unwrap();
        request("o-3", Action::Retry).await.unwrap();
        applier.settle_requests().await.unwrap();
        assert_eq!(orders().await.len(), 2);
        assert_eq!(
            parked()
                .await
                .iter()
                .map(|(id, first, n, _)| (id.as_str(), *first, *n))
                .collect::<Vec<_>>(),
            [("o-2", 2, 2), ("o-3", 3, 2)]
        );

        // Code failing on an error no record causes: the stream stays parked, the request
        // fails, and the runner goes on (it does not halt).
        fixable.break_badly();
        request("o-2", Action::Retry).await.unwrap();
        applier.settle_requests().await.unwrap();
        assert_eq!(orders().await.len(), 2);
        assert!(
            parked().await[0].3.contains("42P01"),
            "{:?}",
            parked().await
        );

        // A process that lost the unit carries out nothing.
        fixable.fix();
        request("o-2", Action::Retry).await.unwrap();
        let thief = crate::hold::Hold::claim(&pool, "run:orders".into())
            .await
            .unwrap();
        let lost = applier
            .settle_requests()
            .await
            .expect_err("the hold is lost");
        assert!(
            lost.downcast_ref::<crate::hold::LostHold>().is_some(),
            "{lost:#}"
        );
        assert_eq!(orders().await.len(), 2);

        // The holder with the fixed code applies o-2's records in order, once.
        let mut applier = Applier::load(&job, live, Mode::Live, &thief).await.unwrap();
        applier.settle_requests().await.unwrap();
        assert_eq!(
            orders().await,
            [
                ("o-1".to_owned(), 0),
                ("o-2".to_owned(), 100),
                ("o-4".to_owned(), 0)
            ]
        );
        applier.settle_requests().await.unwrap();
        let again = request("o-2", Action::Retry).await.expect_err("not parked");
        assert!(format!("{again:#}").contains("not parked"), "{again:#}");
        // It flows again: its next record is applied at once.
        let paid = crate::testing::order_commit(
            &writer,
            key,
            "o-2",
            &paid2,
            ("OrderPaid", json!({"total": eur})),
        );
        applier.apply(&one.read(7, &[Commit(paid)])).await.unwrap();
        let status: String = sqlx::query_scalar("SELECT status FROM orders WHERE order_id = 'o-2'")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(status, "paid");

        // A discard drops o-3's records, with its reason and actor.
        request("o-3", Action::Discard).await.unwrap();
        applier.settle_requests().await.unwrap();
        assert!(parked().await.is_empty());
        assert_eq!(
            statuses()
                .await
                .iter()
                .map(|(o, s, by, why)| (*o, s.as_str(), by.as_deref(), why.is_some()))
                .collect::<Vec<_>>(),
            [
                (2, "retried", Some("ops"), false),
                (3, "discarded", Some("ops"), true),
                (4, "retried", Some("ops"), false),
                (6, "discarded", Some("ops"), true)
            ]
        );
        let outcomes: Vec<(bool, String)> =
            sqlx::query_as("SELECT ok, outcome FROM keel_stream_requests ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            outcomes.iter().map(|(ok, _)| *ok).collect::<Vec<_>>(),
            [false, false, false, true, true]
        );
        assert!(outcomes[3].1.contains("applied 2 records"), "{outcomes:?}");
        pool.close().await;
    }

    /// Errors a record causes become dead letters; a timeout, a lock not granted or a
    /// cancelled statement is retried; a unique violation or any other error stops the
    /// projection.
    #[tokio::test]
    async fn database_errors_are_told_apart_by_their_sqlstate() {
        let (_db, pool) = crate::testing::database("sqlstates").await;
        let table =
            "CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, n int NOT NULL CHECK (n >= 0));
                     INSERT INTO t VALUES (1, 1) ON CONFLICT DO NOTHING";
        let cases = [
            ("", "SELECT 1 / 0", Failure::Record),
            ("", "SELECT 'x'::int", Failure::Record),
            (
                "",
                "SELECT 9223372036854775807::bigint + 1",
                Failure::Record,
            ),
            (table, "INSERT INTO t VALUES (2, NULL)", Failure::Record),
            (table, "INSERT INTO t VALUES (3, -1)", Failure::Record),
            (table, "INSERT INTO t VALUES (1, 1)", Failure::Halt),
            (
                "SET statement_timeout = 20",
                "SELECT pg_sleep(1)",
                Failure::Transient,
            ),
            ("", "SELECT * FROM no_such_table", Failure::Halt),
        ];
        for (setup, statement, expected) in cases {
            let code = code_of(&pool, setup, statement).await;
            assert_eq!(failure_of(&code), expected, "{statement}: SQLSTATE {code}");
        }
        // Those that cannot be provoked alone here.
        for code in ["40001", "40P01", "55P03", "57P01", "08006", "53200"] {
            assert_eq!(failure_of(code), Failure::Transient, "{code}");
        }
    }
}
