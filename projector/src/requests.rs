//! Rebuilds requested through PostgreSQL (`keel_rebuild_requests`): each `projector run`
//! process looks for a waiting request on the projections it runs, takes the oldest (or
//! one whose taker's heartbeat expired), rebuilds the projection blue/green with the same
//! code as `projector rebuild`, and records the outcome. A rebuild taken again after its
//! taker died resumes from the new generation's checkpoints; the rebuild's own lock and
//! claim keep two from building one projection.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tracing::{info, warn};
use uuid::Uuid;

use crate::job::Job;
use crate::progress::Progress;
use crate::rebuild::{RebuildOptions, Replaced, rebuild};

/// How often a process looks for a rebuild request.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Records a request to rebuild `projection` by `actor`; its id.
pub async fn request(
    pool: &PgPool,
    projection: &str,
    keep_old: bool,
    actor: &str,
) -> anyhow::Result<i64> {
    sqlx::query_scalar(
        "INSERT INTO keel_rebuild_requests (projection, keep_old, actor, generation)
         VALUES ($1, $2, $3,
                 -- A projection never run yet gets generation 1 when it first is.
                 coalesce((SELECT generation FROM keel_projections WHERE name = $1), 1))
         RETURNING id",
    )
    .bind(projection)
    .bind(keep_old)
    .bind(actor)
    .fetch_one(pool)
    .await
    .context("recording the rebuild request")
}

/// A request's outcome, once it has one: whether it succeeded and what it says.
pub async fn outcome(pool: &PgPool, id: i64) -> anyhow::Result<Option<(bool, String)>> {
    let row: Option<(Option<bool>, Option<String>)> = sqlx::query_as(
        "SELECT ok, outcome FROM keel_rebuild_requests WHERE id = $1 AND done_at IS NOT NULL",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(ok, outcome)| (ok.unwrap_or(false), outcome.unwrap_or_default())))
}

/// Carries out the rebuild requests on `jobs`' projections, as process `process`, until
/// dropped.
pub async fn serve(pool: PgPool, process: Uuid, jobs: Vec<Job>) {
    let names: Vec<&'static str> = jobs.iter().map(Job::name).collect();
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let taken = match take(&pool, process, &names).await {
            Ok(taken) => taken,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "looking for rebuild requests failed");
                continue;
            }
        };
        let Some((id, name, keep_old, actor, asked_of)) = taken else {
            continue;
        };
        let Some(job) = jobs.iter().find(|j| j.name() == name) else {
            continue;
        };
        info!(request = id, projection = %name, %actor, "rebuilding on request");
        let options = RebuildOptions {
            keep_old,
            wait_for_lock: true,
            only_if_older: false,
            // Another rebuild may replace the generation it was asked of (this request
            // taken again after its first taker died, say, or two requests): that was the
            // rebuild asked for. Checked under the rebuild's lock.
            replacing: asked_of,
            progress: Progress::Log,
            allow_parked: false,
        };
        let (ok, outcome) = match rebuild(job, &options).await {
            Ok(report) => (true, report.to_string()),
            Err(e) if e.downcast_ref::<Replaced>().is_some() => (true, e.to_string()),
            Err(e) => (false, format!("{e:#}")),
        };
        if !ok {
            warn!(request = id, projection = %name, %outcome, "the requested rebuild failed");
        }
        // Recorded even when another process took the request meanwhile (this one's
        // heartbeat expired while it rebuilt): the rebuild it did is the outcome.
        for attempt in 1..=5 {
            let recorded = sqlx::query(
                "UPDATE keel_rebuild_requests SET done_at = now(), ok = $2, outcome = $3
                 WHERE id = $1 AND done_at IS NULL",
            )
            .bind(id)
            .bind(ok)
            .bind(&outcome)
            .execute(&pool)
            .await;
            match recorded {
                Ok(_) => break,
                Err(e) => {
                    warn!(request = id, attempt, error = %e, "recording the rebuild's outcome failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// Takes the oldest waiting request on `projections` that this process's heartbeat names
/// (one taken by a process whose heartbeat expired counts as waiting).
async fn take(
    pool: &PgPool,
    process: Uuid,
    projections: &[&str],
) -> anyhow::Result<Option<(i64, String, bool, String, Option<i32>)>> {
    Ok(sqlx::query_as(
        "UPDATE keel_rebuild_requests r SET taken_by = $1, taken_at = now()
         WHERE r.id = (
             SELECT q.id FROM keel_rebuild_requests q
             WHERE q.done_at IS NULL AND q.projection = ANY($2)
               -- Only projections this process's heartbeat names: not one it stands by
               -- for (newer code built it), which a process of that code rebuilds.
               AND q.projection = ANY(SELECT unnest(m.projections) FROM keel_projector_processes m
                                      WHERE m.id = $1)
               AND (q.taken_by IS NULL OR NOT EXISTS (
                        SELECT 1 FROM keel_projector_processes p
                        WHERE p.id = q.taken_by AND p.expires_at > now()))
             ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING r.id, r.projection, r.keep_old, r.actor, r.generation",
    )
    .bind(process)
    .bind(projections)
    .fetch_optional(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    /// The oldest waiting request is taken once; one whose taker is alive is not taken
    /// again, and one whose taker's heartbeat expired is.
    #[tokio::test]
    async fn a_request_is_taken_once_and_again_only_after_its_taker_died() {
        let (_db, pool) = crate::testing::database("rebuild-requests").await;
        let (alive, dead, me) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for (id, expires) in [
            (alive, "now() + interval '1 minute'"),
            (me, "now() + interval '1 minute'"),
            (dead, "now() - interval '1 second'"),
        ] {
            sqlx::query(&format!(
                "INSERT INTO keel_projector_processes (id, name, projections, expires_at)
                 VALUES ($1, 'p', '{{orders,customers}}', {expires})"
            ))
            .bind(id)
            .execute(&pool)
            .await
            .unwrap();
        }
        let first = request(&pool, "orders", false, "ops").await.unwrap();
        let second = request(&pool, "orders", true, "ops").await.unwrap();
        let other = request(&pool, "customers", false, "ops").await.unwrap();
        let taken = take(&pool, alive, &["orders"]).await.unwrap().unwrap();
        assert_eq!((taken.0, taken.2), (first, false), "the oldest first");
        let taken = take(&pool, alive, &["orders"]).await.unwrap().unwrap();
        assert_eq!((taken.0, taken.2), (second, true));
        assert!(
            take(&pool, me, &["orders"]).await.unwrap().is_none(),
            "a live taker keeps its requests"
        );
        sqlx::query("UPDATE keel_rebuild_requests SET taken_by = $1 WHERE id = $2")
            .bind(dead)
            .bind(first)
            .execute(&pool)
            .await
            .unwrap();
        let again = take(&pool, me, &["orders"]).await.unwrap().unwrap();
        assert_eq!(again.0, first, "a dead taker's request is taken again");
        assert!(take(&pool, me, &["orders"]).await.unwrap().is_none());
        // Not a projection its heartbeat leaves out (it stands by for newer code).
        sqlx::query("UPDATE keel_projector_processes SET projections = '{orders}' WHERE id = $1")
            .bind(me)
            .execute(&pool)
            .await
            .unwrap();
        assert!(
            take(&pool, me, &["customers", "orders"])
                .await
                .unwrap()
                .is_none()
        );
        let taken = take(&pool, alive, &["customers", "orders"])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(taken.0, other);
        assert_eq!(outcome(&pool, first).await.unwrap(), None);
        pool.close().await;
    }
}
