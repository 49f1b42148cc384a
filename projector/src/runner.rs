//! Runs one projection: takes its run lock, prepares its live generation (rebuilding it
//! blue/green first when the projection's code version changed), and applies the log as
//! it comes, batch after batch, through prefetched reads.

use std::sync::Arc;
use std::time::Duration;

use keel_kafka::{GATE_RULES, LogReader};
use tracing::{error, info, instrument, warn};

use crate::applier::Halted;
use crate::applier::{Applier, Flow};
use crate::generation::{Built, GenerationChanged, Mode, prepare};
use crate::hold::{Hold, LostHold};
use crate::job::Job;
use crate::prefetch::Prefetch;
use crate::rebuild::{Progress, RebuildOptions, rebuild};

/// How long a runner of older code waits before it looks at the projection again.
const NEWER_CODE_PAUSE: Duration = Duration::from_secs(10);

/// The live generation was built by newer code than this projector's: (projection code
/// version, gate rules) of each.
#[derive(Debug, thiserror::Error)]
#[error(
    "the live generation was built by newer code (code version {}, gate rules {}) than this projector's ({}, {})",
    live.0, live.1, code.0, code.1
)]
struct NewerCode {
    live: (i32, i32),
    code: (i32, i32),
}

/// Runs one projection until it stops on a dead letter (in `stop` mode) or the process ends.
pub struct Runner {
    job: Job,
}

impl Runner {
    /// A runner of `job`.
    pub fn new(job: Job) -> Self {
        Self { job }
    }

    /// Prepares the live generation (tables and views), then applies the log as it comes.
    /// When the projection's code version differs from the live generation's, first
    /// rebuilds it blue/green (the old generation keeps serving, frozen, until the swap).
    /// Follows a generation swapped in by `projector rebuild`. Transient errors (broker or
    /// database down) are retried from the last checkpoint.
    #[instrument(name = "projection", skip_all, fields(projection = self.job.name()))]
    pub async fn run(&self) -> anyhow::Result<()> {
        loop {
            match self.run_holding().await {
                Err(e) if e.downcast_ref::<LostHold>().is_some() => {
                    warn!(error = %e, "lost the projection to another runner");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                // Its run lock is released meanwhile, so a projector of the newer code
                // can take the projection.
                Err(e) if e.downcast_ref::<NewerCode>().is_some() => {
                    error!(error = %e, "standing by");
                    tokio::time::sleep(NEWER_CODE_PAUSE).await;
                }
                other => return other,
            }
        }
    }

    /// Takes the run lock, claims the projection, and runs it until it ends, or until
    /// another runner holds it ([`LostHold`]).
    async fn run_holding(&self) -> anyhow::Result<()> {
        let job = &self.job;
        // One runner per projection: a second projector process stands by until the first ends.
        let mut lock = loop {
            match job.pool.acquire().await {
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
                    .bind(job.name())
                    .fetch_one(&mut lock)
                    .await?;
            if locked {
                break;
            }
            info!("another projector runs this projection; standing by");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // The lock says who should run; the claim, proved in each batch transaction, makes
        // sure a runner whose lock session died applies nothing once another took over.
        let hold = Hold::claim(&job.pool, format!("run:{}", job.name())).await?;
        // The lock's session lives as long as this runner holds the projection.
        let _lock = lock;
        // What a swap left to drop when its process died goes now, beside the live work
        // (a drop waits for the readers of the old tables, which the live view must not).
        {
            let (pool, projection) = (job.pool.clone(), Arc::clone(&job.projection));
            tokio::spawn(async move {
                crate::rebuild::finish_discards(&pool, projection.as_ref()).await;
            });
        }
        loop {
            let live = match prepare(&job.pool, job.projection.as_ref()).await {
                Ok(live) => live,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "preparing the projection failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match live.built(job.projection.as_ref()) {
                // A newer build rebuilt this projection: this older one must not undo it,
                // nor keep the projection from the newer one.
                Built::Newer => {
                    return Err(NewerCode {
                        live: (live.code_version, live.gate_rules),
                        code: (job.projection.version(), GATE_RULES),
                    }
                    .into());
                }
                Built::Same => {}
                Built::Older => {
                    info!(
                        generation = live.generation,
                        stored = live.code_version,
                        code = job.projection.version(),
                        stored_gate_rules = live.gate_rules,
                        gate_rules = GATE_RULES,
                        "the projection's code or the gate's rules changed: rebuilding it blue/green"
                    );
                    let options = RebuildOptions {
                        keep_old: false,
                        wait_for_lock: true,
                        progress: Progress::Log,
                    };
                    if let Err(e) = rebuild(job, &options).await {
                        if e.downcast_ref::<Halted>().is_some()
                            || e.downcast_ref::<LostHold>().is_some()
                        {
                            error!(error = %format!("{e:#}"), "the automatic rebuild stopped");
                            return Err(e);
                        }
                        error!(error = %format!("{e:#}"), "the automatic rebuild failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                    continue;
                }
            }
            info!(generation = live.generation, "running");
            match self.run_live(live.generation, &hold).await {
                Ok(()) => return Ok(()),
                Err(e) if e.downcast_ref::<LostHold>().is_some() => return Err(e),
                Err(e) if e.downcast_ref::<Halted>().is_some() => {
                    error!(error = %format!("{e:#}"), "the projection stopped");
                    return Err(e);
                }
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

    async fn run_live(&self, generation: i32, hold: &Hold) -> anyhow::Result<()> {
        let mut applier = Applier::load(&self.job, generation, Mode::Live, hold).await?;
        let reader = Arc::new(LogReader::open(&self.job.kafka, &applier.assignment())?);
        let mut batches = Prefetch::start(
            reader,
            Arc::clone(&self.job.options.policy),
            self.job.options.batch_size,
            Duration::from_millis(500),
            self.job.options.linger,
        );
        loop {
            if let Flow::Stopped = applier.apply(&batches.next().await?).await? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    /// A runner whose code is older than the live generation's stands by without its run
    /// lock, so a projector of the newer code can take the projection.
    #[tokio::test]
    async fn a_runner_of_older_code_stands_by_without_its_run_lock() {
        let (_db, pool) = crate::testing::database("older-code").await;
        let orders = crate::testing::orders();
        crate::testing::live_by_newer_code(&pool, orders.as_ref()).await;
        let job = crate::testing::offline_job(orders, &pool);
        let runner = tokio::spawn(async move { Runner::new(job).run().await });
        // Once the runner has looked (it claims the projection first), the lock is free.
        let mut free = false;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let claimed: i64 =
                sqlx::query_scalar("SELECT claims FROM keel_holders WHERE work = 'run:orders'")
                    .fetch_optional(&pool)
                    .await
                    .unwrap()
                    .unwrap_or(0);
            if claimed == 0 {
                continue;
            }
            let mut conn = pool.acquire().await.unwrap();
            free = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext('keel-run:orders'))")
                .fetch_one(&mut *conn)
                .await
                .unwrap();
            if free {
                break;
            }
        }
        runner.abort();
        assert!(free, "the run lock of a runner standing by is free");
        pool.close().await;
    }
}
