//! A running projector process helps fill the rebuilds of the projections it runs: its
//! membership claims a share of a rebuild's units ([`crate::units`]), and this applies the
//! log of those partitions to the rebuild's generation, paced like the rebuild, each batch
//! proving its units ([`crate::hold::Hold::Units`]). It stops when its share changes: the
//! coordinator took the units to swap, another process took one, or the rebuild ended.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tracing::{info, warn};
use uuid::Uuid;

use crate::applier::{Applier, Flow, Halted};
use crate::generation::Mode;
use crate::hold::{Hold, LostHold};
use crate::job::Job;
use crate::pace::Pacer;
use crate::prefetch::Prefetch;
use crate::units::RebuildShare;

/// How long a helper that failed waits before it tries its share again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);

/// Helps fill `job`'s rebuilds with the units `share` gives `process`, until the
/// membership ends.
pub(crate) async fn help(
    job: Job,
    process: Uuid,
    mut share: watch::Receiver<Option<RebuildShare>>,
    nudge: Arc<Notify>,
) {
    loop {
        let current = share
            .borrow_and_update()
            .clone()
            .filter(|s| !s.units.is_empty());
        let Some(current) = current else {
            if share.changed().await.is_err() {
                return;
            }
            continue;
        };
        info!(
            projection = job.name(),
            generation = current.generation,
            partitions = current.units.len(),
            "helping fill a rebuild"
        );
        let pause = match fill(&job, process, &current, &mut share).await {
            Ok(()) => continue,
            // The membership reads what this process still holds, and says.
            Err(e) if e.downcast_ref::<LostHold>().is_some() => {
                info!(projection = job.name(), error = %e, "a rebuild unit is held by another process now");
                nudge.notify_one();
                RETRY_PAUSE
            }
            Err(e) => {
                warn!(projection = job.name(), error = %format!("{e:#}"),
                      "helping fill the rebuild failed; trying again");
                RETRY_PAUSE
            }
        };
        // Goes on when its share changes, or after a pause with the same one.
        if let Ok(Err(_)) = tokio::time::timeout(pause, share.changed()).await {
            return;
        }
    }
}

/// Applies the log of `current`'s units to its generation until the share changes.
async fn fill(
    job: &Job,
    process: Uuid,
    current: &RebuildShare,
    share: &mut watch::Receiver<Option<RebuildShare>>,
) -> anyhow::Result<()> {
    let hold = Hold::rebuild_units(
        job.name(),
        process,
        current.units.clone(),
        current.generation,
        job.projection.version(),
    );
    // The rebuild's own way with a record it cannot apply, not this process's.
    let mut job = job.clone();
    if let Some(on_error) =
        crate::rebuild_units::on_error(&job.pool, job.name(), current.generation).await?
    {
        job.options.on_error = on_error;
    }
    let job = &job;
    let mut applier = Applier::load(job, current.generation, Mode::Rebuild, &hold).await?;
    let mut pacer = Pacer::start(
        job.options.rebuild_pace,
        &job.pool,
        job.name(),
        job.options.batch_size,
    )
    .await;
    let reader = Arc::new(pacer.open_reader(&job.kafka, &applier.assignment())?);
    let mut batches = Prefetch::start(
        reader,
        Arc::clone(&job.options.policy),
        pacer.batch_size(),
        Duration::from_millis(200),
        job.options.linger,
    );
    loop {
        let batch = tokio::select! {
            batch = batches.next() => batch?,
            changed = share.changed() => {
                changed?;
                return Ok(());
            }
        };
        let flow = match pacer.apply(&mut applier, &batch).await {
            // An error that is not the record's: the rebuild stops, where its coordinator
            // sees it, rather than this process trying again for ever.
            Err(e) if e.downcast_ref::<Halted>().is_some() => {
                stop_rebuild(job, &hold, current.generation, &format!("{e:#}")).await?;
                Flow::Stopped
            }
            flow => flow?,
        };
        if let Flow::Stopped = flow {
            // The coordinator sees the rebuild stopped and gives up; nothing more applies
            // until the share changes.
            share.changed().await?;
            return Ok(());
        }
    }
}

/// Records the rebuild of `job`'s projection into `generation` as stopped on `error`, in a
/// transaction that proves `hold`.
async fn stop_rebuild(job: &Job, hold: &Hold, generation: i32, error: &str) -> anyhow::Result<()> {
    let mut tx = job.pool.begin().await?;
    hold.prove(&mut tx).await?;
    sqlx::query(
        "UPDATE keel_rebuilds SET state = 'stopped', error = $3, updated_at = now()
         WHERE projection = $1 AND generation = $2",
    )
    .bind(job.name())
    .bind(generation)
    .bind(error)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    warn!(
        projection = job.name(),
        generation, error, "the rebuild stopped"
    );
    Ok(())
}
