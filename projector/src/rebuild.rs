//! Blue/green rebuilds: the next generation of a projection is built beside the live one,
//! from offset 0 of its topics with its own checkpoints, then swapped in atomically.
//!
//! The swap takes the projection's row in `keel_projections` `FOR UPDATE`, which makes
//! the live runner's next batch wait. Under that lock, the new generation is caught up at
//! least to the live generation's checkpoints (so no reader sees older data after the swap
//! than before it), the views are pointed at the new tables, and the row names the new
//! generation; all in one transaction. The live runner's waiting batch then finds its
//! generation gone, rolls back, and follows the new one from its checkpoints.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use keel_kafka::{AbortOnDrop, GATE_RULES, LogReader};
use serde::Serialize;
use tracing::{info, warn};

use crate::applier::{Applier, Flow};
use crate::checkpoint;
use crate::generation::{self, Built, Mode, create_tables, discard, point_views, prepare};
use crate::hold::Hold;
use crate::job::Job;
use crate::pace::Pacer;
use crate::prefetch::Prefetch;
pub use crate::progress::Progress;
use crate::progress::ProgressView;
use crate::projection::create_indexes;
use crate::rebuild_units::{self, Coordinator};

/// How long the swap may keep catching up under its lock before it lets go and retries.
const SWAP_CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

/// How long the swap's transaction may sit idle (while one batch is read and applied on
/// other connections) before PostgreSQL ends it and its locks.
const SWAP_IDLE: Duration = Duration::from_secs(15);
/// How long it may sit idle once it has re-pointed the views (reads of them wait).
const SWAP_IDLE_AFTER_VIEWS: Duration = Duration::from_secs(5);

/// How many records the new generation may still be behind the head when the swap
/// starts: the swap catches up the rest while it holds the lock.
const SWAP_DISTANCE: i64 = 100;

/// How often progress is measured, recorded in `keel_rebuilds` and shown.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// How often the distance to the head is measured.
const NEAR_HEAD_INTERVAL: Duration = Duration::from_millis(100);
/// How often a coordinator reads how far its helpers got.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(250);

/// How a rebuild runs.
#[derive(Clone, Debug)]
pub struct RebuildOptions {
    /// Keep the old generation's tables after the swap.
    pub keep_old: bool,
    /// Wait for another rebuild of the projection to finish instead of refusing.
    pub wait_for_lock: bool,
    /// Rebuild only while the live generation was built by older code: the automatic
    /// rebuild of a runner, which another process may have done while this one waited
    /// ([`AlreadyRebuilt`]).
    pub only_if_older: bool,
    /// Rebuild only while this generation is live: a request asked of it, which another
    /// rebuild may have answered while this one waited for the lock ([`Replaced`]).
    pub replacing: Option<i32>,
    /// How progress is shown.
    pub progress: Progress,
    /// Swap in a new generation that holds back more streams than the live one.
    pub allow_parked: bool,
}

/// The new generation parks streams the live one does not: it is not swapped in.
#[derive(Debug, thiserror::Error)]
#[error(
    "the new generation {generation} of {projection} holds back {new} parked streams where the live one holds back \
     {live} (see `projector dead-letters list`): it is not swapped in, and the live view keeps serving. Fix the \
     code and run the rebuild again (it resumes), or rebuild with --allow-parked to swap it in anyway"
)]
pub struct ParkedInRebuild {
    projection: String,
    generation: i32,
    new: i64,
    live: i64,
}

/// What a finished rebuild did.
#[derive(Clone, Debug, Serialize)]
pub struct RebuildReport {
    /// The projection.
    pub projection: String,
    /// The generation swapped in.
    pub generation: i32,
    /// The generation it replaced.
    pub previous: i32,
    /// Whether it resumed an interrupted rebuild.
    pub resumed: bool,
    /// Events applied by this run.
    pub events: u64,
    /// Records read by this run.
    pub records: i64,
    /// How long this run took.
    pub seconds: f64,
    /// Events per second over this run.
    pub events_per_second: f64,
    /// How long the swap held the projection's lock, in milliseconds.
    pub swap_lock_ms: f64,
    /// Whether the old generation's tables were kept.
    pub kept_old: bool,
    /// How it paced itself.
    pub pace: String,
    /// How long it paused for its pace, in seconds.
    pub paused_seconds: f64,
    /// How many running projector processes helped fill the new generation.
    pub helped_by: usize,
}

impl std::fmt::Display for RebuildReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "swapped in: {} events from {} records in {:.1}s ({} events/s); the swap held the lock for {:.1} ms; \
             generation {} {}",
            self.events,
            self.records,
            self.seconds,
            self.events_per_second.round() as u64,
            self.swap_lock_ms,
            self.previous,
            if self.kept_old { "kept" } else { "dropped" }
        )?;
        if self.helped_by > 0 {
            write!(f, "; filled with {} projector processes", self.helped_by)?;
        }
        if self.paused_seconds > 0.0 {
            write!(
                f,
                "; paced ({}), it paused {:.1}s",
                self.pace, self.paused_seconds
            )?;
        }
        Ok(())
    }
}

/// The live generation was already rebuilt by this code (by another process, while this
/// one waited for the rebuild's lock): nothing to do.
#[derive(Debug, thiserror::Error)]
#[error("the live generation of {0} is already built by this code")]
pub struct AlreadyRebuilt(String);

/// The generation a rebuild was asked to replace is no longer live: another rebuild
/// replaced it while this one waited for the rebuild's lock, and was the rebuild asked for.
#[derive(Debug, thiserror::Error)]
#[error("already rebuilt since the request: generation {live} is live")]
pub struct Replaced {
    /// The live generation.
    pub live: i32,
}

/// Rebuilds `job`'s projection into its next generation and swaps it in.
pub async fn rebuild(job: &Job, options: &RebuildOptions) -> anyhow::Result<RebuildReport> {
    let projection = job.projection.as_ref();
    let name = projection.name();

    // One rebuild per projection: a session lock held for the whole rebuild, released when
    // this connection closes (also on a crash).
    let mut lock = job.pool.acquire().await?.detach();
    loop {
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('keel-rebuild:' || $1))")
                .bind(name)
                .fetch_one(&mut lock)
                .await?;
        if locked {
            break;
        }
        if !options.wait_for_lock {
            let row: Option<(i32, i64, i64, String, DateTime<Utc>)> = sqlx::query_as(
                "SELECT generation, records_done, records_total, owner, started_at FROM keel_rebuilds
                 WHERE projection = $1",
            )
            .bind(name)
            .fetch_optional(&job.pool)
            .await?;
            match row {
                Some((generation, done, total, owner, started)) => bail!(
                    "a rebuild of {name} is already running (generation {generation}, {done} of {total} records, \
                     started {} by {owner}); wait for it to finish",
                    started.format("%Y-%m-%d %H:%M:%S UTC")
                ),
                None => bail!("a rebuild of {name} is already running; wait for it to finish"),
            }
        }
        info!(
            projection = name,
            "another rebuild of this projection runs; waiting"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Claimed under the lock, and proved in each batch transaction: a rebuild whose lock
    // session died applies nothing once another rebuild took over.
    let hold = Hold::claim(&job.pool, format!("rebuild:{name}")).await?;
    // Read under the lock: a rebuild that finished while this one waited moved it on.
    let live = prepare(&job.pool, projection).await?;
    if options.only_if_older && live.built(projection) != Built::Older {
        return Err(AlreadyRebuilt(name.to_owned()).into());
    }
    if let Some(asked) = options.replacing
        && live.generation != asked
    {
        return Err(Replaced {
            live: live.generation,
        }
        .into());
    }
    if live.built(projection) == Built::Newer {
        bail!(
            "the live generation of {name} was built by newer code than this projector's (code version {}, \
             gate rules {}; this projector's: {} and {GATE_RULES}): a rebuild by this projector would undo it; \
             run the rebuild with the newer projector",
            live.code_version,
            live.gate_rules,
            projection.version()
        );
    }
    finish_discards(&job.pool, projection).await;
    let (generation, resumed) = start_or_resume(job, live.generation, &hold).await?;
    // The running projector processes help fill the new generation, unit by unit; this
    // one follows them, then takes every unit to catch up the rest and swap.
    let coordinator = Coordinator::start(&job.pool, job.options.claim_timeout, name).await?;
    let partitions = job.partitions();
    rebuild_units::open(
        &job.pool,
        name,
        generation,
        &partitions,
        coordinator.id(),
        job.options.on_error,
        &hold,
    )
    .await?;
    let ends_reader = Arc::new(LogReader::ends_of(&job.kafka, partitions.clone())?);
    // Where the log ends, measured beside the work: asking the broker takes a round trip
    // per partition, which the apply loop must not wait for.
    let (ends_tx, mut ends_rx) = tokio::sync::watch::channel(None);
    let watcher = {
        let reader = Arc::clone(&ends_reader);
        AbortOnDrop(tokio::spawn(async move {
            loop {
                let ends = reader.high_watermarks().await;
                let failed = ends.is_err();
                if ends_tx.send(Some(ends.map_err(|e| e.to_string()))).is_err() {
                    return;
                }
                let pause = if failed {
                    Duration::from_secs(1)
                } else {
                    NEAR_HEAD_INTERVAL
                };
                tokio::time::sleep(pause).await;
            }
        }))
    };
    let first = rebuild_units::filled(&job.pool, name, generation).await?;
    let mut view = ProgressView::new(options.progress, name, generation, resumed, first.records);
    let mut tracker = Tracker::new(&first);
    let stopped = || {
        anyhow::anyhow!(
            "the rebuild of {name} generation {generation} stopped on a dead letter (see `projector status`); \
             the live view is untouched. Fix the cause, or rerun with --on-error park (the default) or skip"
        )
    };
    let mut helped_by = BTreeSet::new();
    if rebuild_units::helpers(&job.pool, name, projection.version()).await? > 0 {
        view.note("shared with the projector processes that run it");
        if let Some(reason) = follow_helpers(
            job,
            generation,
            &mut ends_rx,
            &mut view,
            &mut tracker,
            &mut helped_by,
        )
        .await?
        {
            view.abandon();
            anyhow::bail!(
                "the rebuild of {name} generation {generation} stopped in a process helping fill it: {reason}; \
                 the live view is untouched (see `projector status`). Fix the cause; a dead letter under \
                 --on-error stop is parked or skipped instead with --on-error park (the default) or skip"
            );
        }
    }
    // Every unit is this process's now: the helpers' batches in flight ended first, and
    // their processes apply nothing more to this generation.
    let units = rebuild_units::take_all(
        &job.pool,
        name,
        generation,
        projection.version(),
        &partitions,
        coordinator.id(),
        &hold,
    )
    .await?;
    let taken = rebuild_units::filled(&job.pool, name, generation).await?;
    let mut applier = Applier::load(job, generation, Mode::Rebuild, &units).await?;
    let mut pacer = Pacer::start(
        job.options.rebuild_pace,
        &job.pool,
        name,
        job.options.batch_size,
    )
    .await;
    let reader = Arc::new(pacer.open_reader(&job.kafka, &applier.assignment())?);
    let mut indexed = false;
    let mut batches = Prefetch::start(
        Arc::clone(&reader),
        Arc::clone(&job.options.policy),
        pacer.batch_size(),
        Duration::from_millis(200),
        job.options.linger,
    );
    let swapped = loop {
        let batch = batches.next().await?;
        if let Flow::Stopped = pacer.apply(&mut applier, &batch).await? {
            view.abandon();
            return Err(stopped());
        }
        // A fresh measure of the head, when there is one; an empty batch waits for it.
        if batch.is_empty() {
            ends_rx.changed().await?;
        } else if !ends_rx.has_changed()? {
            continue;
        }
        let ends = match ends_rx.borrow_and_update().clone() {
            Some(Ok(ends)) => ends,
            Some(Err(e)) => anyhow::bail!("reading where the log ends: {e}"),
            None => continue,
        };
        let records_rate = tracker
            .show(
                job,
                generation,
                &mut view,
                &ends,
                applier.records_done(),
                taken.events + applier.events() as i64,
            )
            .await?;
        // Close enough to the head under load: the swap catches up the rest under its lock.
        let behind: i64 = ends
            .iter()
            .map(|(at, end)| (end - applier.next_offset(at)).max(0))
            .sum();
        if behind <= swap_distance(records_rate, job) && !indexed {
            // The secondary indexes are built once, now that the rows are in, instead of
            // kept up to date row by row; then the rebuild catches up again and swaps.
            view.note("caught up with the head; building the indexes");
            // Only while this process still holds the rebuild and its units.
            let mut tx = job.pool.begin().await?;
            applier.prove_hold(&mut tx).await?;
            hold.prove(&mut tx).await?;
            create_indexes(&mut tx, job.projection.as_ref(), generation)
                .await
                .with_context(|| format!("indexing generation {generation} of {name}"))?;
            tx.commit().await?;
            indexed = true;
            continue;
        }
        if behind <= swap_distance(records_rate, job) {
            view.note("caught up with the head; swapping");
            // The swap catches up under its lock as fast as it can, not in paced slices.
            pacer.read_whole();
            match swap(
                job,
                &mut applier,
                &mut batches,
                generation,
                &hold,
                options.keep_old,
                options.allow_parked,
            )
            .await?
            {
                Swap::Done { previous, held } => break (previous, held),
                Swap::Stopped => {
                    view.abandon();
                    return Err(stopped());
                }
                Swap::Retry => view.note("the log moved on during the swap; catching up again"),
            }
        }
    };
    let (previous, held) = swapped;
    drop(watcher);
    if !options.keep_old
        && let Err(e) = discard(&job.pool, projection, previous, Some(&hold)).await
    {
        // The swap stands; the old generation is no longer read, and its drop stays
        // recorded: the next start of the projector or of a rebuild finishes it.
        warn!(error = %format!("{e:#}"), previous,
              "dropping the old generation failed: the next start of the projector drops it");
    }
    drop(lock);
    coordinator.end().await;
    let seconds = tracker.started.elapsed().as_secs_f64();
    let events = taken.events + applier.events() as i64 - first.events;
    let report = RebuildReport {
        projection: name.to_owned(),
        generation,
        previous,
        resumed,
        events: events as u64,
        records: applier.records_done() - first.records,
        seconds,
        events_per_second: events as f64 / seconds.max(0.001),
        swap_lock_ms: held.as_secs_f64() * 1000.0,
        kept_old: options.keep_old,
        pace: job.options.rebuild_pace.to_string(),
        paused_seconds: pacer.paused().as_secs_f64(),
        helped_by: helped_by.len(),
    };
    view.finish(&report.to_string());
    Ok(report)
}

/// How many records the new generation may still be behind the head to start the swap
/// (or the indexes before it): close enough, the swap catches up the rest under its lock.
/// Under heavy writes the distance never gets that small: then a quarter of a second of
/// this rebuild's own pace.
fn swap_distance(records_rate: f64, job: &Job) -> i64 {
    SWAP_DISTANCE
        .max((records_rate / 4.0) as i64)
        .min(job.options.batch_size as i64)
}

/// Where each partition ends, as last measured (or why that failed); `None` before the
/// first measure.
type Ends = Option<Result<Vec<(keel_schemas::TopicPartition, i64)>, String>>;

/// Measures a rebuild's progress, and records it in `keel_rebuilds` and its view.
struct Tracker {
    started: Instant,
    first_records: i64,
    first_events: i64,
    last: Option<Instant>,
}

impl Tracker {
    fn new(first: &rebuild_units::Filled) -> Self {
        Self {
            started: Instant::now(),
            first_records: first.records,
            first_events: first.events,
            last: None,
        }
    }

    /// Shows `done` records (over every partition, which end at `ends`) and `events` of
    /// the generation, at most every [`PROGRESS_INTERVAL`]; the rate of records.
    async fn show(
        &mut self,
        job: &Job,
        generation: i32,
        view: &mut ProgressView,
        ends: &[(keel_schemas::TopicPartition, i64)],
        done: i64,
        events: i64,
    ) -> anyhow::Result<f64> {
        let elapsed = self.started.elapsed().as_secs_f64().max(0.001);
        let records_rate = (done - self.first_records) as f64 / elapsed;
        if self.last.is_some_and(|t| t.elapsed() < PROGRESS_INTERVAL) {
            return Ok(records_rate);
        }
        self.last = Some(Instant::now());
        let rate = (events - self.first_events) as f64 / elapsed;
        let total: i64 = ends.iter().map(|(_, end)| end).sum();
        let eta = (records_rate > 0.0).then(|| (total - done).max(0) as f64 / records_rate);
        sqlx::query(
            "UPDATE keel_rebuilds SET records_total = $3, records_done = $4, events = $5,
                events_per_second = $6, eta_seconds = $7, updated_at = now()
             WHERE projection = $1 AND generation = $2",
        )
        .bind(job.name())
        .bind(generation)
        .bind(total)
        .bind(done)
        .bind(events)
        .bind(rate)
        .bind(eta)
        .execute(&job.pool)
        .await?;
        view.show(done, total, events as u64, rate, eta);
        Ok(records_rate)
    }
}

/// Follows the processes filling `generation` until it is near the head; why, when a
/// helper's batch stopped the rebuild (a dead letter under `--on-error stop`, or an error
/// no record causes). Gives up on them (to finish alone)
/// when some of the units stay without a live holder for twice the claim timeout: no
/// running process helps with them (none runs this code, or they all died).
async fn follow_helpers(
    job: &Job,
    generation: i32,
    ends_rx: &mut tokio::sync::watch::Receiver<Ends>,
    view: &mut ProgressView,
    tracker: &mut Tracker,
    helped_by: &mut BTreeSet<uuid::Uuid>,
) -> anyhow::Result<Option<String>> {
    let name = job.name();
    let grace = job.options.claim_timeout * 2 + Duration::from_secs(1);
    let mut unheld_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(FOLLOW_INTERVAL);
    loop {
        tick.tick().await;
        let filled = rebuild_units::filled(&job.pool, name, generation).await?;
        helped_by.extend(filled.holders.iter().copied());
        if let Some(reason) = filled.stopped {
            return Ok(Some(reason));
        }
        let ends = match ends_rx.borrow_and_update().clone() {
            Some(Ok(ends)) => ends,
            Some(Err(e)) => anyhow::bail!("reading where the log ends: {e}"),
            None => continue,
        };
        let records_rate = tracker
            .show(job, generation, view, &ends, filled.records, filled.events)
            .await?;
        let behind: i64 = ends
            .iter()
            .map(|(at, end)| {
                let next = filled
                    .next
                    .iter()
                    .find(|(p, _)| p == at)
                    .map_or(0, |(_, next)| *next);
                (end - next).max(0)
            })
            .sum();
        if behind <= swap_distance(records_rate, job) {
            return Ok(None);
        }
        if filled.unheld == 0 {
            unheld_since = None;
        } else if unheld_since.get_or_insert_with(Instant::now).elapsed() > grace {
            view.note(&format!(
                "no running process helps with {} of the partitions; finishing alone",
                filled.unheld
            ));
            return Ok(None);
        }
    }
}

/// Drops what an earlier swap left to drop (a crash between the swap and the drop); a
/// failure is logged and retried on the next start, never in the way of the work.
pub(crate) async fn finish_discards(
    pool: &sqlx::PgPool,
    projection: &dyn crate::projection::Projection,
) {
    match generation::finish_discards(pool, projection).await {
        Ok(dropped) if !dropped.is_empty() => info!(
            projection = projection.name(),
            ?dropped,
            "dropped the generations an interrupted swap had left"
        ),
        Ok(_) => {}
        Err(e) => warn!(projection = projection.name(), error = %format!("{e:#}"),
                        "dropping the generations an interrupted swap had left failed; the next start tries again"),
    }
}

/// The generation to build: the one an interrupted rebuild of today's code left, resumed
/// from its checkpoints, or a fresh one after the live generation.
pub(crate) async fn start_or_resume(
    job: &Job,
    live: i32,
    hold: &Hold,
) -> anyhow::Result<(i32, bool)> {
    let projection = job.projection.as_ref();
    let name = projection.name();
    let owner = format!(
        "{}:{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
        std::process::id()
    );
    // Whoever helped an earlier coordinator applies nothing more from here on, whatever
    // this one does with the generation (resume it, or drop it and start again).
    crate::rebuild_units::fence(&job.pool, name, hold).await?;
    let existing: Option<(i32, i32, i32)> = sqlx::query_as(
        "SELECT generation, code_version, gate_rules FROM keel_rebuilds WHERE projection = $1",
    )
    .bind(name)
    .fetch_optional(&job.pool)
    .await?;
    if let Some((generation, code_version, gate_rules)) = existing {
        if code_version == projection.version() && gate_rules == GATE_RULES && generation > live {
            let mut tx = job.pool.begin().await?;
            hold.prove(&mut tx).await?;
            sqlx::query(
                "UPDATE keel_rebuilds SET owner = $2, state = 'building', error = NULL, updated_at = now()
                 WHERE projection = $1",
            )
            .bind(name)
            .bind(&owner)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            info!(
                projection = name,
                generation, "resuming the rebuild from its checkpoints"
            );
            return Ok((generation, true));
        }
        if generation != live {
            discard(&job.pool, projection, generation, Some(hold)).await?;
        }
    }
    let generation = live + 1;
    // Whatever an earlier attempt left of this generation goes first, and so do the
    // generations an interrupted clean-up left behind (never kept ones: those are older
    // than the live generation and were kept on purpose with --keep-old).
    discard(&job.pool, projection, generation, Some(hold)).await?;
    for old in checkpoint::generations_above(&job.pool, name, generation).await? {
        discard(&job.pool, projection, old, Some(hold)).await?;
    }
    let mut tx = job.pool.begin().await?;
    hold.prove(&mut tx).await?;
    create_tables(&mut tx, projection, generation).await?;
    sqlx::query(
        "INSERT INTO keel_rebuilds (projection, generation, code_version, owner, gate_rules) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (projection) DO UPDATE SET generation = EXCLUDED.generation,
            code_version = EXCLUDED.code_version, gate_rules = EXCLUDED.gate_rules, owner = EXCLUDED.owner,
            state = 'building', error = NULL,
            events = 0, records_done = 0, records_total = 0, events_per_second = NULL, eta_seconds = NULL,
            started_at = now(), updated_at = now()",
    )
    .bind(name)
    .bind(generation)
    .bind(projection.version())
    .bind(&owner)
    .bind(GATE_RULES)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    info!(projection = name, generation, "rebuilding from offset 0");
    Ok((generation, false))
}

enum Swap {
    Done { previous: i32, held: Duration },
    Stopped,
    Retry,
}

/// Swaps `generation` in; see the module's documentation.
async fn swap(
    job: &Job,
    applier: &mut Applier<'_>,
    batches: &mut Prefetch,
    generation: i32,
    work: &Hold,
    keep_old: bool,
    allow_parked: bool,
) -> anyhow::Result<Swap> {
    let projection = job.projection.as_ref();
    let name = projection.name();
    let mut tx = job.pool.begin().await?;
    // Idle between statements while it catches up on other connections, a batch at a
    // time; a process stalled longer than SWAP_IDLE loses the session and its locks.
    generation::bound_idle(&mut tx, SWAP_IDLE).await?;
    // Every unit, and the rebuild itself: a coordinator that lost its lock session while
    // another took the rebuild over swaps nothing in.
    applier.prove_hold(&mut tx).await?;
    work.prove(&mut tx).await?;
    generation::lock(&mut tx, name).await?;
    let previous: i32 =
        sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_one(&mut *tx)
            .await?;
    let locked_at = Instant::now();
    let live_checkpoints = checkpoint::next_offsets(&mut tx, name, previous).await?;
    // The live runner is held at its next batch: catch up with where it stopped.
    while live_checkpoints
        .iter()
        .any(|(at, next)| applier.next_offset(at) < *next)
    {
        if locked_at.elapsed() > SWAP_CATCH_UP_LIMIT {
            let _ = tx.rollback().await;
            return Ok(Swap::Retry);
        }
        let batch = batches.next().await?;
        if let Flow::Stopped = applier.apply(&batch).await? {
            let _ = tx.rollback().await;
            return Ok(Swap::Stopped);
        }
        // Each batch resets the idle clock, so the bound is one batch, not the whole
        // catch-up; a session PostgreSQL ended meanwhile (a batch slower than the bound)
        // only means trying again.
        if sqlx::query("SELECT 1").execute(&mut *tx).await.is_err() {
            return Ok(Swap::Retry);
        }
    }
    // A new generation that holds back more streams than the live one does (new code that
    // fails where the old did not) is not swapped in unless the operator said so: the
    // live view keeps serving, and the rebuild can be resumed after a fix.
    if !allow_parked {
        let (new, live): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE generation = $2), count(*) FILTER (WHERE generation = $3)
             FROM keel_parked_streams WHERE projection = $1",
        )
        .bind(name)
        .bind(generation)
        .bind(previous)
        .fetch_one(&mut *tx)
        .await?;
        if new > live {
            let _ = tx.rollback().await;
            return Err(ParkedInRebuild {
                projection: name.to_owned(),
                generation,
                new,
                live,
            }
            .into());
        }
    }
    // The helpers' units go with the swap: one still holding a unit finds it gone.
    rebuild_units::close(&mut tx, name).await?;
    // Re-pointing the views waits for reads in flight; bounded, so a long read delays the
    // swap instead of queueing every new read behind it.
    let repointed = async {
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        point_views(&mut tx, projection, generation).await?;
        // The rest are short statements: a process that stalls now holds the views'
        // locks (every read of them waits) only until PostgreSQL ends its session.
        generation::bound_idle(&mut tx, SWAP_IDLE_AFTER_VIEWS).await?;
        generation::make_live(&mut tx, projection, generation, previous, keep_old).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = repointed {
        let _ = tx.rollback().await;
        if lock_timed_out_or_session_lost(&e) {
            return Ok(Swap::Retry);
        }
        return Err(e);
    }
    if let Err(e) = tx.commit().await {
        // The commit's answer was lost (its session ended while the process stalled, say):
        // whether it happened is read back, and the rebuild tries again if it did not.
        let live = generation::live(&job.pool, name).await?;
        if live != Some(generation) {
            warn!(error = %e, "the swap did not commit; catching up again");
            return Ok(Swap::Retry);
        }
    }
    let held = locked_at.elapsed();
    info!(
        projection = name,
        generation,
        previous,
        lock_ms = held.as_secs_f64() * 1000.0,
        "swapped in"
    );
    Ok(Swap::Done { previous, held })
}

/// A swap that could not take the views' locks in time, or whose session PostgreSQL ended
/// (idle too long while its process stalled): nothing of it was committed, so it is tried
/// again.
fn lock_timed_out_or_session_lost(e: &anyhow::Error) -> bool {
    match e.downcast_ref::<sqlx::Error>() {
        Some(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("55P03" | "25P03" | "57P01"))
        }
        Some(sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::PoolClosed) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    /// A rebuild that lost its claim (it stalled, another rebuild took over) neither resumes
    /// nor drops the generation its successor builds: each of its changes proves the claim
    /// in its own transaction.
    #[tokio::test]
    async fn a_rebuild_that_lost_its_claim_leaves_its_successors_generation_alone() {
        let (_db, pool) = crate::testing::database("stale-rebuild").await;
        let orders = crate::testing::orders();
        let live = prepare(&pool, orders.as_ref()).await.unwrap();
        let job = crate::testing::offline_job(orders, &pool);
        let stale = Hold::claim(&pool, "rebuild:orders".into()).await.unwrap();
        let successor = Hold::claim(&pool, "rebuild:orders".into()).await.unwrap();
        let (building, resumed) = start_or_resume(&job, live.generation, &successor)
            .await
            .unwrap();
        assert_eq!((building, resumed), (live.generation + 1, false));
        let resumed = start_or_resume(&job, live.generation, &stale).await;
        assert!(
            resumed
                .as_ref()
                .is_err_and(|e| e.downcast_ref::<crate::hold::LostHold>().is_some()),
            "the stale rebuild must not take the generation over: {resumed:?}"
        );
        let dropped = discard(&pool, job.projection.as_ref(), building, Some(&stale)).await;
        assert!(
            dropped.is_err_and(|e| e.downcast_ref::<crate::hold::LostHold>().is_some()),
            "the stale rebuild must not drop its successor's generation"
        );
        let table = crate::projection::table("orders", building);
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&table)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(exists.as_deref(), Some(table.as_str()), "the table stays");
        let owner_of_row: i64 =
            sqlx::query_scalar("SELECT count(*) FROM keel_rebuilds WHERE generation = $1")
                .bind(building)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(owner_of_row, 1, "the successor's rebuild row stays");
        pool.close().await;
    }

    /// A projector older than the code that built the live generation refuses to rebuild
    /// it: it would swap in a downgrade, which the newer runners would then rebuild again.
    #[tokio::test]
    async fn a_projector_of_older_code_refuses_to_rebuild_a_newer_generation() {
        let (_db, pool) = crate::testing::database("older-rebuild").await;
        let orders = crate::testing::orders();
        let live = crate::testing::live_by_newer_code(&pool, orders.as_ref()).await;
        let job = crate::testing::offline_job(orders, &pool);
        let refused = refused_at_once(&job, &crate::testing::rebuild_options()).await;
        assert!(
            refused
                .to_string()
                .contains("newer code than this projector"),
            "{refused:#}"
        );
        let after = prepare(&pool, job.projection.as_ref()).await.unwrap();
        assert_eq!(after.generation, live.generation, "nothing was swapped");
        pool.close().await;
    }

    /// Why `job`'s rebuild refused at once, without starting a generation.
    async fn refused_at_once(job: &Job, options: &RebuildOptions) -> anyhow::Error {
        let refused = tokio::time::timeout(Duration::from_secs(30), rebuild(job, options))
            .await
            .expect("the rebuild decides at once")
            .expect_err("the rebuild must refuse");
        let rebuilds: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_rebuilds")
            .fetch_one(&job.pool)
            .await
            .unwrap();
        assert_eq!(rebuilds, 0, "no generation was started");
        refused
    }

    /// A rebuild asked to replace a generation that another rebuild replaced while it
    /// waited for the lock (a request taken again, two requests, a request beside the
    /// automatic rebuild) does nothing: checked under the lock, not before it.
    #[tokio::test]
    async fn a_rebuild_asked_of_a_replaced_generation_does_nothing() {
        let (_db, pool) = crate::testing::database("replaced-rebuild").await;
        let orders = crate::testing::orders();
        let asked = prepare(&pool, orders.as_ref()).await.unwrap().generation;
        // Another rebuild runs: it holds the rebuild's lock while this one starts, and
        // swaps before letting go.
        let mut other = pool.acquire().await.unwrap().detach();
        sqlx::query("SELECT pg_advisory_lock(hashtext('keel-rebuild:orders'))")
            .execute(&mut other)
            .await
            .unwrap();
        let job = crate::testing::offline_job(orders, &pool);
        let options = RebuildOptions {
            replacing: Some(asked),
            wait_for_lock: true,
            ..crate::testing::rebuild_options()
        };
        let waiting = {
            let (job, options) = (job.clone(), options.clone());
            tokio::spawn(async move { refused_at_once(&job, &options).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        sqlx::query(
            "UPDATE keel_projections SET generation = generation + 1 WHERE name = 'orders'",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("SELECT pg_advisory_unlock(hashtext('keel-rebuild:orders'))")
            .execute(&mut other)
            .await
            .unwrap();
        let refused = waiting.await.unwrap();
        let replaced = refused.downcast_ref::<Replaced>().expect("Replaced");
        assert_eq!(
            replaced.live,
            asked + 1,
            "a replaced generation is not rebuilt again"
        );
        pool.close().await;
    }
}
