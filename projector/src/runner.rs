//! Runs one projection on the partitions this process holds of it: prepares its live
//! generation (rebuilding it blue/green first when the projection's code version changed),
//! and applies the log of those partitions as it comes, batch after batch, through
//! prefetched reads. When the process's share of the partitions changes (another process
//! joined, left or died), it starts again from the checkpoints of the new share.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use keel_kafka::{AbortOnDrop, GATE_RULES, LogReader};
use tracing::{error, info, instrument, warn};

use crate::applier::Halted;
use crate::applier::{Applier, Flow};
use crate::generation::{Built, GenerationChanged, Live, Mode, ProjectionStopped, peek, prepare};
use crate::hold::{Hold, LostHold};
use crate::job::Job;
use crate::prefetch::{BatchSize, Prefetch};
use crate::projection::Projection;
use crate::rebuild::{AlreadyRebuilt, ParkedInRebuild, Progress, RebuildOptions, rebuild};
use crate::units::{Assignment, Unit};

/// How long a runner of older code waits before it looks at the projection again.
const NEWER_CODE_PAUSE: Duration = Duration::from_secs(10);

/// How often a runner looks again at a projection that stopped on a dead letter elsewhere.
const STOPPED_PAUSE: Duration = Duration::from_secs(5);

/// How often a runner records where its partitions end.
const ENDS_INTERVAL: Duration = Duration::from_secs(1);
/// How long an automatic rebuild that parked more streams than the live generation waits
/// before it tries again.
const PARKED_REBUILD_PAUSE: Duration = Duration::from_secs(60);
/// How often a live runner looks for operators' requests on its parked streams.
const REQUESTS_INTERVAL: Duration = Duration::from_secs(1);

/// How long a runner that found a unit held by another waits for its share to be told again.
const LOST_UNIT_WAIT: Duration = Duration::from_secs(2);

/// This projector's code may not run the live generation: built by newer code, or (a
/// process manager's, never rebuilt from the log) by older code. The runner stands by.
#[derive(Debug, thiserror::Error)]
#[error(
    "{why}: the live generation was built by code version {}, gate rules {}; this projector's are {}, {}",
    live.0, live.1, code.0, code.1
)]
struct CannotRun {
    why: &'static str,
    /// (projection code version, gate rules) of the live generation, and of this code.
    live: (i32, i32),
    code: (i32, i32),
}

impl CannotRun {
    fn new(why: &'static str, live: &Live, projection: &dyn Projection) -> Self {
        Self {
            why,
            live: (live.code_version, live.gate_rules),
            code: (projection.version(), GATE_RULES),
        }
    }
}

/// Why a projector stands by a live generation of newer code.
const NEWER_CODE: &str = "built by newer code than this projector's";
/// Why a projector stands by a process manager's state built by older code.
const NOT_REBUILT: &str = "a process manager's state is never rebuilt from the log, and older code built it: \
     migrate its state, or run the code that built it";

/// Whether `name` is a process manager's: its tables hold what its commands were
/// answered, which the log does not, so it is never rebuilt from the log.
fn is_process_manager(name: &str) -> bool {
    keel_views::PROCESSES.iter().any(|p| p.name == name)
}

/// Why [`Runner::run_live`] returned.
enum Exit {
    /// A dead letter stopped the projection (in `stop` mode) on this process.
    Stopped,
    /// The process's share of the partitions changed.
    Reassigned,
}

/// Runs one projection, on the partitions its process holds, until the process ends.
pub struct Runner {
    job: Job,
    assignment: Assignment,
}

impl Runner {
    /// A runner of `job` on the partitions `assignment` gives it.
    ///
    /// The runner stands by until it has prepared its generation: its process claims none
    /// of the projection's partitions before it knows its code may run them (a process of
    /// older code would otherwise take them at its first heartbeat and hold them from the
    /// processes of the newer code until its runner found out).
    pub fn new(job: Job, assignment: Assignment) -> Self {
        assignment.standing_by.store(true, Ordering::Relaxed);
        Self { job, assignment }
    }

    /// Prepares the live generation (tables and views), then applies the log of the
    /// partitions this process holds as it comes. When the projection's code version
    /// differs from the live generation's, first rebuilds it blue/green (the old
    /// generation keeps serving, frozen, until the swap). Follows a generation swapped in
    /// by `projector rebuild`, and the process's share as it changes. Transient errors
    /// (broker or database down) are retried from the last checkpoint.
    #[instrument(name = "projection", skip_all, fields(projection = self.job.name()))]
    pub async fn run(mut self) -> anyhow::Result<()> {
        // What a swap left to drop when its process died goes now, beside the live work
        // (a drop waits for the readers of the old tables, which the live view must not).
        {
            let (pool, projection) = (self.job.pool.clone(), Arc::clone(&self.job.projection));
            tokio::spawn(async move {
                crate::rebuild::finish_discards(&pool, projection.as_ref()).await;
            });
        }
        // This process helps fill the projection's rebuilds, beside its live work.
        let _helper = AbortOnDrop(tokio::spawn(crate::helper::help(
            self.job.clone(),
            self.assignment.process,
            self.assignment.rebuild.clone(),
            Arc::clone(&self.assignment.nudge),
        )));
        let mut live: Option<Live> = None;
        loop {
            let generation = match live {
                Some(live) => live.generation,
                None => match self.prepared().await {
                    Ok(Some(prepared)) => {
                        self.stand_by(false);
                        live = Some(prepared);
                        prepared.generation
                    }
                    // Rebuilt first: prepared again.
                    Ok(None) => continue,
                    // Its partitions are left to processes of the newer code meanwhile.
                    Err(e) if e.downcast_ref::<CannotRun>().is_some() => {
                        error!(error = %e, "standing by");
                        self.stand_by(true);
                        tokio::time::sleep(NEWER_CODE_PAUSE).await;
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            let units = self.units().await?;
            info!(generation, partitions = units.len(), "running");
            match self.run_live(generation, units).await {
                // This process does not read that record again by itself: it waits, as the
                // others do, until the process holding the partition starts again (or a
                // rebuild swaps a new generation in), and then goes on with what it holds.
                Ok(Exit::Stopped) => {
                    error!(
                        "the projection stopped on a dead letter (see `projector status`): \
                         waiting until the process holding its partition starts again"
                    );
                    self.wait_while_stopped().await;
                    live = None;
                }
                Ok(Exit::Reassigned) => {}
                Err(e) if e.downcast_ref::<LostHold>().is_some() => {
                    warn!(error = %e, "a partition is held by another process now");
                    // The membership reads what this process still holds, and says.
                    self.assignment.nudge.notify_one();
                    let _ =
                        tokio::time::timeout(LOST_UNIT_WAIT, self.assignment.units.changed()).await;
                }
                Err(e) if e.downcast_ref::<Halted>().is_some() => {
                    error!(error = %format!("{e:#}"), "the projection stopped");
                    return Err(e);
                }
                // Stopped on a dead letter elsewhere: nothing applies until it goes on.
                Err(e) if e.downcast_ref::<ProjectionStopped>().is_some() => {
                    warn!(error = %e, "waiting");
                    tokio::time::sleep(STOPPED_PAUSE).await;
                }
                Err(e) if e.downcast_ref::<GenerationChanged>().is_some() => {
                    info!("{e}; following the new generation");
                    live = None;
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "restarting from the last checkpoint");
                    live = None;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Waits until the projection is no longer stopped.
    async fn wait_while_stopped(&self) {
        loop {
            tokio::time::sleep(STOPPED_PAUSE).await;
            let state: Result<Option<String>, _> =
                sqlx::query_scalar("SELECT state FROM keel_projections WHERE name = $1")
                    .bind(self.job.name())
                    .fetch_optional(&self.job.pool)
                    .await;
            match state {
                Ok(Some(state)) if state == "stopped" => {}
                Ok(_) => return,
                Err(e) => warn!(error = %e, "reading whether the projection still stops failed"),
            }
        }
    }

    /// Tells the membership whether this runner stands by (it then lets go of the
    /// projection's partitions and claims none), and wakes it to act on it now.
    fn stand_by(&self, standing_by: bool) {
        if self
            .assignment
            .standing_by
            .swap(standing_by, Ordering::Relaxed)
            != standing_by
        {
            self.assignment.nudge.notify_one();
        }
    }

    /// The units this process holds of the projection, once it holds any.
    async fn units(&mut self) -> anyhow::Result<Vec<Unit>> {
        loop {
            let units = self.assignment.units.borrow_and_update().clone();
            if !units.is_empty() {
                return Ok(units);
            }
            self.assignment
                .units
                .changed()
                .await
                .map_err(|_| anyhow::anyhow!("the membership of this process ended"))?;
        }
    }

    /// The live generation, prepared; `None` once it was rebuilt because it was built by
    /// older code (prepare it again). Fails with [`CannotRun`] when this code may not run it.
    async fn prepared(&self) -> anyhow::Result<Option<Live>> {
        let job = &self.job;
        // Looked at first: preparing takes the projection's lock exclusive (holding every
        // live batch back) and points its views, which code older than the live
        // generation's must not do.
        // (A failed look is left to the prepare below, which retries.)
        // A process manager's tables built by older code are not this code's to prepare
        // either.
        if let Ok(Some(live)) = peek(&job.pool, job.name()).await {
            match live.built(job.projection.as_ref()) {
                Built::Newer => {
                    return Err(CannotRun::new(NEWER_CODE, &live, job.projection.as_ref()).into());
                }
                Built::Older if is_process_manager(job.name()) => {
                    return Err(CannotRun::new(NOT_REBUILT, &live, job.projection.as_ref()).into());
                }
                _ => {}
            }
        }
        let live = loop {
            match prepare(&job.pool, job.projection.as_ref()).await {
                Ok(live) => break live,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "preparing the projection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        match live.built(job.projection.as_ref()) {
            // A newer build rebuilt this projection: this older one must not undo it,
            // nor keep the projection from the newer one.
            Built::Newer => Err(CannotRun::new(NEWER_CODE, &live, job.projection.as_ref()).into()),
            Built::Same => Ok(Some(live)),
            // A process manager's tables hold what its commands were answered, which the
            // log does not: it is never rebuilt from the log. Its partitions are left to
            // processes of the code that built it until its state is migrated.
            Built::Older if is_process_manager(job.name()) => {
                Err(CannotRun::new(NOT_REBUILT, &live, job.projection.as_ref()).into())
            }
            Built::Older => {
                // Its code may run the projection: it takes part again, claiming units and
                // helping fill the rebuild (its own, or the one it waits for) meanwhile.
                self.stand_by(false);
                info!(
                    generation = live.generation,
                    stored = live.code_version,
                    code = job.projection.version(),
                    stored_gate_rules = live.gate_rules,
                    gate_rules = GATE_RULES,
                    "the projection's code or the gate's rules changed: rebuilding it blue/green"
                );
                // One process rebuilds; the others wait for its lock, and then find the
                // generation rebuilt.
                let options = RebuildOptions {
                    keep_old: false,
                    wait_for_lock: true,
                    only_if_older: true,
                    replacing: None,
                    progress: Progress::Log,
                    allow_parked: false,
                };
                match rebuild(job, &options).await {
                    Ok(_) => {}
                    Err(e) if e.downcast_ref::<AlreadyRebuilt>().is_some() => {}
                    Err(e)
                        if e.downcast_ref::<Halted>().is_some()
                            || e.downcast_ref::<LostHold>().is_some() =>
                    {
                        error!(error = %format!("{e:#}"), "the automatic rebuild stopped");
                        return Err(e);
                    }
                    // The new code parks streams the old did not: the old generation keeps
                    // serving (frozen) until the code is fixed; tried again now and then.
                    Err(e) if e.downcast_ref::<ParkedInRebuild>().is_some() => {
                        error!(error = %format!("{e:#}"), "the automatic rebuild was not swapped in");
                        tokio::time::sleep(PARKED_REBUILD_PAUSE).await;
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "the automatic rebuild failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
                Ok(None)
            }
        }
    }

    /// Applies the log of `units` to `generation` until the process's share changes, a
    /// dead letter stops the projection, or an error.
    async fn run_live(&mut self, generation: i32, units: Vec<Unit>) -> anyhow::Result<Exit> {
        let Self { job, assignment } = self;
        let hold = Hold::units(job.name(), assignment.process, units);
        let mut applier = Applier::load(job, generation, Mode::Live, &hold).await?;
        applier.resume().await?;
        let reader = Arc::new(LogReader::open(&job.kafka, &applier.assignment())?);
        let _ends = record_ends(job, Arc::clone(&reader));
        applier.settle_requests().await?;
        let mut requests = tokio::time::interval(REQUESTS_INTERVAL);
        requests.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batches = Prefetch::start(
            reader,
            Arc::clone(&job.options.policy),
            BatchSize::fixed(job.options.batch_size),
            Duration::from_millis(500),
            job.options.linger,
        );
        loop {
            let batch = tokio::select! {
                batch = batches.next() => batch?,
                changed = assignment.units.changed() => {
                    changed.map_err(|_| anyhow::anyhow!("the membership of this process ended"))?;
                    return Ok(Exit::Reassigned);
                }
                _ = requests.tick() => {
                    applier.settle_requests().await?;
                    continue;
                }
            };
            if let Flow::Stopped = applier.apply(&batch).await? {
                return Ok(Exit::Stopped);
            }
        }
    }
}

/// Records where each partition `reader` reads ends, every [`ENDS_INTERVAL`]: the lag
/// `GET /v1/projections` shows without asking the broker.
fn record_ends(job: &Job, reader: Arc<LogReader>) -> AbortOnDrop<()> {
    let pool = job.pool.clone();
    AbortOnDrop(tokio::spawn(async move {
        loop {
            match reader.high_watermarks().await {
                Ok(mut ends) => {
                    // Rows in one order, as every process writes them.
                    ends.sort();
                    let recorded = sqlx::query(
                        "INSERT INTO keel_partition_ends (topic, partition, end_offset, measured_at)
                         SELECT t, p, e, now() FROM UNNEST($1::text[], $2::int[], $3::bigint[]) AS u(t, p, e)
                         ON CONFLICT (topic, partition) DO UPDATE SET
                            end_offset = GREATEST(keel_partition_ends.end_offset, EXCLUDED.end_offset),
                            measured_at = now()",
                    )
                    .bind(ends.iter().map(|(at, _)| at.topic.clone()).collect::<Vec<_>>())
                    .bind(ends.iter().map(|(at, _)| at.partition).collect::<Vec<_>>())
                    .bind(ends.iter().map(|(_, end)| *end).collect::<Vec<_>>())
                    .execute(&pool)
                    .await;
                    if let Err(e) = recorded {
                        warn!(error = %e, "recording where the partitions end failed");
                    }
                }
                Err(e) => warn!(error = %e, "measuring where the partitions end failed"),
            }
            tokio::time::sleep(ENDS_INTERVAL).await;
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;
    use crate::units::Membership;

    /// Runs `job` alone beside its membership and checks, tick after tick, that its
    /// process holds none of the projection's partitions while the membership runs.
    async fn holds_none_of_its_partitions(pool: &sqlx::PgPool, job: Job) {
        let name = job.name();
        let (membership, mut assignments) = Membership::new(
            pool.clone(),
            Duration::from_millis(400),
            [(name, job.partitions())],
        );
        let process = membership.id();
        let _membership = AbortOnDrop(tokio::spawn(membership.run()));
        let runner = Runner::new(job, assignments.remove(name).unwrap());
        let _runner = AbortOnDrop(tokio::spawn(runner.run()));
        // The only process, it would hold every partition; standing by, it holds none,
        // tick after tick.
        let mut ticks = 0;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (units, held): (i64, Option<i64>) = sqlx::query_as(
                "SELECT count(*), sum((holder IS NOT DISTINCT FROM $1)::int)::bigint FROM keel_units
                 WHERE projection = $2",
            )
            .bind(process)
            .bind(name)
            .fetch_one(pool)
            .await
            .unwrap();
            let alive: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM keel_projector_processes WHERE id = $1 AND expires_at > now()",
            )
            .bind(process)
            .fetch_one(pool)
            .await
            .unwrap();
            assert_eq!(
                held.unwrap_or(0),
                0,
                "the process standing by holds none of {name}'s partitions"
            );
            if units > 0 && alive == 1 {
                ticks += 1;
                if ticks == 10 {
                    break;
                }
            }
        }
        assert_eq!(ticks, 10, "the membership ran");
    }

    /// A runner whose code is older than the live generation's stands by, and its process
    /// holds none of the projection's partitions, so processes of the newer code take them.
    #[tokio::test]
    async fn a_runner_of_older_code_stands_by_and_holds_none_of_its_partitions() {
        let (_db, pool) = crate::testing::database("older-code").await;
        let orders = crate::testing::orders();
        crate::testing::live_by_newer_code(&pool, orders.as_ref()).await;
        let job = crate::testing::offline_job(orders, &pool);
        holds_none_of_its_partitions(&pool, job).await;
        pool.close().await;
    }

    /// A process manager's state built under older gate rules (or older code) is never
    /// rebuilt from the log, which does not hold the answers to its commands: the runner
    /// stands by, holds none of its partitions, and leaves the live generation alone.
    #[tokio::test]
    async fn a_process_manager_built_by_older_code_stands_by_and_is_never_rebuilt() {
        let (_db, pool) = crate::testing::database("older-process").await;
        let fulfilment: Arc<dyn Projection> = Arc::new(crate::fulfilment::Fulfilment {
            payment_deadline: Duration::from_secs(60),
        });
        let live = prepare(&pool, fulfilment.as_ref()).await.unwrap();
        sqlx::query("UPDATE keel_projections SET gate_rules = gate_rules - 1 WHERE name = $1")
            .bind(fulfilment.name())
            .execute(&pool)
            .await
            .unwrap();
        let job = crate::testing::offline_job(Arc::clone(&fulfilment), &pool);
        holds_none_of_its_partitions(&pool, job).await;
        let (generation, rules): (i32, i32) =
            sqlx::query_as("SELECT generation, gate_rules FROM keel_projections WHERE name = $1")
                .bind(fulfilment.name())
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            (generation, rules),
            (live.generation, live.gate_rules - 1),
            "the live generation is the one older code built"
        );
        let next = crate::projection::table("fulfilment", live.generation + 1);
        let rebuilding: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(&next)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert!(!rebuilding, "no rebuild began: {next} exists");
        pool.close().await;
    }
}
