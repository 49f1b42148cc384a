//! Rebuilds requested through PostgreSQL (`keel_rebuild_requests`): each `projector run`
//! process looks for a waiting request on the projections it runs, takes the oldest (or
//! one whose taker's heartbeat expired), rebuilds the projection blue/green with the same
//! code as `projector rebuild`, and records the outcome. A rebuild taken again after its
//! taker died resumes from the new generation's checkpoints; the rebuild's own lock and
//! claim keep two from building one projection.
//!
//! Verifications of one stream (`keel_verify_requests`) are carried out the same way, by
//! any running process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use keel_kafka::KafkaSettings;
use keel_schemas::{StreamRef, TrustedKeys};
use sqlx::PgPool;
use tracing::{info, warn};
use uuid::Uuid;

use crate::job::Job;
use crate::progress::Progress;
use crate::rebuild::{RebuildOptions, Replaced, rebuild};

/// How often a process looks for a rebuild request.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// Records a request to rebuild `projection` by `actor` (or finds the one already waiting
/// to replace the same generation); its id. Refused when the waiting one was asked with
/// the other `keep_old`: joining it would keep or drop the old generation against this
/// caller's word.
pub async fn request(
    pool: &PgPool,
    projection: &str,
    keep_old: bool,
    actor: &str,
) -> anyhow::Result<i64> {
    let asked = keel_views::requests::rebuild(pool, projection, keep_old, actor)
        .await
        .context("recording the rebuild request")?;
    let waiting = asked.request;
    if !asked.created {
        anyhow::ensure!(
            waiting.keep_old == keep_old,
            "request {} by {} already waits to rebuild {projection} with keep_old {}: wait for              it to finish, then ask again",
            waiting.id,
            waiting.actor,
            waiting.keep_old
        );
        info!(request = waiting.id, actor = %waiting.actor, "the same rebuild already waits: following it");
    }
    Ok(waiting.id)
}

/// A request's outcome, once it has one: whether it succeeded and what it says.
pub async fn outcome(pool: &PgPool, id: i64) -> anyhow::Result<Option<(bool, String)>> {
    let request = keel_views::requests::request::<keel_views::requests::RebuildRequest>(pool, id)
        .await
        .context("reading the rebuild request")?;
    Ok(request
        .filter(|r| r.done_at.is_some())
        .map(|r| (r.ok.unwrap_or(false), r.outcome.unwrap_or_default())))
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
        // A request whose generation another rebuild already replaced is done: that was
        // the rebuild asked for. Seen here before waiting for the rebuild's lock; the
        // rebuild checks again under it.
        let (ok, outcome) = match superseded(&pool, &name, asked_of).await {
            Ok(Some(done)) => (true, done),
            Ok(None) => {
                info!(request = id, projection = %name, %actor, "rebuilding on request");
                rebuild_on_request(job, keep_old, asked_of).await
            }
            Err(e) => (false, format!("{e:#}")),
        };
        if !ok {
            warn!(request = id, projection = %name, %outcome, "the requested rebuild failed");
        }
        record(&pool, "keel_rebuild_requests", id, ok, &outcome, None).await;
    }
}

/// Rebuilds `job`'s projection as a request asks, replacing generation `asked_of`: whether
/// it succeeded, and what came of it.
async fn rebuild_on_request(job: &Job, keep_old: bool, asked_of: Option<i32>) -> (bool, String) {
    let options = RebuildOptions {
        keep_old,
        wait_for_lock: true,
        only_if_older: false,
        // Another rebuild may replace the generation it was asked of (this request taken
        // again after its first taker died, say, or two requests): that was the rebuild
        // asked for. Checked under the rebuild's lock.
        replacing: asked_of,
        progress: Progress::Log,
        allow_parked: false,
    };
    match rebuild(job, &options).await {
        Ok(report) => (true, report.to_string()),
        Err(e) if e.downcast_ref::<Replaced>().is_some() => (true, e.to_string()),
        Err(e) => (false, format!("{e:#}")),
    }
}

/// What became of a request to replace generation `asked_of` of `projection` when a later
/// generation is live already; `None` while `asked_of` is live (or nothing is).
async fn superseded(
    pool: &PgPool,
    projection: &str,
    asked_of: Option<i32>,
) -> anyhow::Result<Option<String>> {
    let Some(asked_of) = asked_of else {
        return Ok(None);
    };
    let live: Option<i32> =
        sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = $1")
            .bind(projection)
            .fetch_optional(pool)
            .await
            .context("reading the live generation")?;
    Ok(live.filter(|live| *live > asked_of).map(|live| {
        format!(
            "generation {asked_of} was already replaced by generation {live}: that was the rebuild asked for"
        )
    }))
}

/// Records request `id`'s outcome in `table`, retrying a few times. Recorded even when
/// another process took the request meanwhile (this one's heartbeat expired while it
/// worked): the work it did is the outcome.
async fn record(
    pool: &PgPool,
    table: &str,
    id: i64,
    ok: bool,
    outcome: &str,
    report: Option<&serde_json::Value>,
) {
    let sql = match report {
        Some(_) => format!(
            "UPDATE {table} SET done_at = now(), ok = $2, outcome = $3, report = $4
             WHERE id = $1 AND done_at IS NULL"
        ),
        None => format!(
            "UPDATE {table} SET done_at = now(), ok = $2, outcome = $3 WHERE id = $1 AND done_at IS NULL"
        ),
    };
    for attempt in 1..=5 {
        let mut query = sqlx::query(&sql).bind(id).bind(ok).bind(outcome);
        if let Some(report) = report {
            query = query.bind(sqlx::types::Json(report));
        }
        match query.execute(pool).await {
            Ok(_) => return,
            Err(e) => {
                warn!(table, request = id, attempt, error = %e, "recording a request's outcome failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Carries out the requests to verify one stream against the log (`keel_verify_requests`),
/// as process `process`, reading `kafka` through the gate with the key policy `trusted`,
/// until dropped. Any running process takes them, whatever projections it runs.
pub async fn serve_verifications(
    pool: PgPool,
    process: Uuid,
    kafka: KafkaSettings,
    trusted: Arc<TrustedKeys>,
) {
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let taken = match take_verification(&pool, process).await {
            Ok(taken) => taken,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "looking for verify requests failed");
                continue;
            }
        };
        let Some((id, stream_type, stream_id, actor)) = taken else {
            continue;
        };
        let stream = StreamRef {
            stream_type,
            id: stream_id,
        };
        info!(request = id, %stream, %actor, "verifying on request");
        // In a task of its own: a verification that panics fails its request, and this
        // loop goes on serving the others.
        let run = {
            let (kafka, trusted, pool, stream) = (
                kafka.clone(),
                Arc::clone(&trusted),
                pool.clone(),
                stream.clone(),
            );
            tokio::spawn(async move {
                crate::verify::verify(&kafka, &trusted, Some(&stream), Some(&pool)).await
            })
        };
        let (ok, outcome, report) = match run.await {
            Ok(Ok(report)) => {
                let (ok, outcome) = verified(&stream, &report);
                (ok, outcome, serde_json::to_value(&report).ok())
            }
            Ok(Err(e)) => (false, format!("{e:#}"), None),
            Err(e) => (false, format!("the verification stopped: {e}"), None),
        };
        record(
            &pool,
            "keel_verify_requests",
            id,
            ok,
            &outcome,
            report.as_ref(),
        )
        .await;
    }
}

/// Whether `report` of `stream` found no violation, and a line that says what it found.
fn verified(stream: &StreamRef, report: &crate::verify::VerifyReport) -> (bool, String) {
    let violations = report.violations();
    let compared = if report.audit_log_compared {
        ", and the topic holds every commit the audit log has seen"
    } else {
        ""
    };
    if report.commits == 0 && violations == 0 {
        // Nothing was verified: a mistyped id must not read as a clean stream.
        return (
            false,
            format!("{stream}: no commit of this stream in the log, so nothing was verified"),
        );
    }
    if violations == 0 {
        return (
            true,
            format!(
                "{stream}: {} commits verified: versions, chain, hashes and signatures hold{compared}",
                report.commits
            ),
        );
    }
    let first = report
        .findings
        .iter()
        .find(|f| f.kind == crate::verify::FindingKind::Violation)
        .map(|f| f.detail.as_str())
        .unwrap_or_default();
    (
        false,
        format!(
            "{stream}: {violations} violation(s) in {} commits; the first: {first}",
            report.commits
        ),
    )
}

/// Takes the oldest waiting verify request (one taken by a process whose heartbeat expired
/// counts as waiting), while this process's heartbeat is alive.
async fn take_verification(
    pool: &PgPool,
    process: Uuid,
) -> anyhow::Result<Option<(i64, String, String, String)>> {
    Ok(sqlx::query_as(
        "UPDATE keel_verify_requests r SET taken_by = $1, taken_at = now()
         WHERE r.id = (
             SELECT q.id FROM keel_verify_requests q
             WHERE q.done_at IS NULL
               AND EXISTS (SELECT 1 FROM keel_projector_processes m
                           WHERE m.id = $1 AND m.expires_at > now())
               AND (q.taken_by IS NULL OR NOT EXISTS (
                        SELECT 1 FROM keel_projector_processes p
                        WHERE p.id = q.taken_by AND p.expires_at > now()))
             ORDER BY q.id LIMIT 1 FOR UPDATE SKIP LOCKED)
         RETURNING r.id, r.stream_type, r.stream_id, r.actor",
    )
    .bind(process)
    .fetch_optional(pool)
    .await?)
}

/// Takes the oldest waiting request on `projections` that this process's live heartbeat
/// names (one taken by a process whose heartbeat expired counts as waiting). A process
/// paused past its heartbeat takes nothing: another may already have taken its requests.
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
                                      WHERE m.id = $1 AND m.expires_at > now())
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

    use keel_views::requests::Request;

    use super::*;

    /// Heartbeats of processes running `projections` (a PostgreSQL array literal): alive
    /// for another minute, or expired a second ago.
    async fn heartbeats(pool: &PgPool, projections: &str, processes: &[(Uuid, bool)]) {
        for &(id, alive) in processes {
            let expires = if alive {
                "now() + interval '1 minute'"
            } else {
                "now() - interval '1 second'"
            };
            sqlx::query(&format!(
                "INSERT INTO keel_projector_processes (id, name, projections, expires_at)
                 VALUES ($1, 'p', '{projections}', {expires})"
            ))
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        }
    }

    /// The oldest waiting request is taken once; one whose taker is alive is not taken
    /// again, and one whose taker's heartbeat expired is.
    #[tokio::test]
    async fn a_request_is_taken_once_and_again_only_after_its_taker_died() {
        let (_db, pool) = crate::testing::database("rebuild-requests").await;
        let (alive, dead, me) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        heartbeats(
            &pool,
            "{orders,customers}",
            &[(alive, true), (me, true), (dead, false)],
        )
        .await;
        let first = request(&pool, "orders", false, "ops").await.unwrap();
        // A second waiting request for the same projection can only be for another
        // generation (asking twice for one generation records one request).
        let second: i64 = sqlx::query_scalar(
            "INSERT INTO keel_rebuild_requests (projection, keep_old, actor, generation)
             VALUES ('orders', true, 'ops', 2) RETURNING id",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        let other = request(&pool, "customers", false, "ops").await.unwrap();
        assert!(
            take(&pool, dead, &["orders"]).await.unwrap().is_none(),
            "a process paused past its heartbeat takes nothing"
        );
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

    /// Asking again while the same rebuild waits records nothing new, however many ask at
    /// once; once it is done, a new request is recorded. A request whose generation was
    /// replaced meanwhile is closed without rebuilding.
    #[tokio::test]
    async fn asking_twice_for_the_same_rebuild_records_one_request() {
        let (_db, pool) = crate::testing::database("rebuild-once").await;
        let mut asks = tokio::task::JoinSet::new();
        for i in 0..8 {
            let pool = pool.clone();
            asks.spawn(async move {
                keel_views::requests::rebuild(&pool, "orders", i % 2 == 0, &format!("ops-{i}"))
                    .await
                    .unwrap()
            });
        }
        let asked = asks.join_all().await;
        assert_eq!(asked.iter().filter(|a| a.created).count(), 1, "{asked:?}");
        let first = asked.iter().find(|a| a.created).unwrap().request.clone();
        assert!(asked.iter().all(|a| a.request.id == first.id));
        assert_eq!(
            (first.generation, first.state()),
            (Some(1), "waiting"),
            "a projection never run is asked of generation 1"
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_rebuild_requests")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(rows, 1);

        // Another generation is live now: the waiting request was for generation 1, which
        // is gone, so it is closed at once.
        sqlx::query(
            "INSERT INTO keel_projections (name, generation, code_version) VALUES ('orders', 2, 1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        let done = superseded(&pool, "orders", first.generation).await.unwrap();
        assert!(
            done.as_deref()
                .is_some_and(|d| d.contains("already replaced by generation 2")),
            "{done:?}"
        );
        assert_eq!(superseded(&pool, "orders", Some(2)).await.unwrap(), None);
        assert_eq!(superseded(&pool, "customers", Some(1)).await.unwrap(), None);
        // A request for the live generation is a new one.
        let second = keel_views::requests::rebuild(&pool, "orders", false, "ops")
            .await
            .unwrap();
        assert!(second.created && second.request.generation == Some(2));
        record(
            &pool,
            "keel_rebuild_requests",
            second.request.id,
            true,
            "swapped",
            None,
        )
        .await;
        let third = keel_views::requests::rebuild(&pool, "orders", false, "ops")
            .await
            .unwrap();
        assert!(third.created, "once done, asking again rebuilds again");
        // The command line joins a waiting request only when it asks the same.
        assert_eq!(
            request(&pool, "orders", false, "bo").await.unwrap(),
            third.request.id
        );
        let refused = request(&pool, "orders", true, "bo").await.unwrap_err();
        assert!(format!("{refused}").contains("keep_old false"), "{refused}");
        assert_eq!(
            outcome(&pool, second.request.id).await.unwrap(),
            Some((true, "swapped".to_owned()))
        );
        pool.close().await;
    }

    /// A verify request is taken by one live process at a time, again once its taker's
    /// heartbeat expired, and never by a process whose own heartbeat expired.
    #[tokio::test]
    async fn a_verify_request_is_taken_by_one_live_process() {
        let (_db, pool) = crate::testing::database("verify-requests").await;
        let (alive, dead) = (Uuid::new_v4(), Uuid::new_v4());
        heartbeats(&pool, "{}", &[(alive, true), (dead, false)]).await;
        let asked = keel_views::requests::verify(&pool, ("order", "o-1"), "ada")
            .await
            .unwrap();
        assert!(take_verification(&pool, dead).await.unwrap().is_none());
        let taken = take_verification(&pool, alive).await.unwrap().unwrap();
        assert_eq!(
            taken,
            (asked.id, "order".into(), "o-1".into(), "ada".into())
        );
        assert!(take_verification(&pool, alive).await.unwrap().is_none());
        let report = serde_json::json!({"commits": 3});
        record(
            &pool,
            "keel_verify_requests",
            asked.id,
            true,
            "3 commits verified",
            Some(&report),
        )
        .await;
        let done =
            keel_views::requests::request::<keel_views::requests::VerifyRequest>(&pool, asked.id)
                .await
                .unwrap()
                .unwrap();
        assert_eq!(done.state(), "done");
        assert_eq!(done.report.unwrap().0, report);
        pool.close().await;
    }

    /// A database an older build recorded the same rebuild twice in: the migration keeps
    /// the request a process has taken, closes the other pointing at it, and from then on
    /// a second waiting request cannot be recorded.
    #[tokio::test]
    async fn the_migration_keeps_one_waiting_rebuild_request() {
        let db = keel_tests::TestDatabase::created("rebuild-dedupe-migration")
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect(&db.url()).await.unwrap();
        let mut older = sqlx::migrate!("./migrations");
        older.migrations = older
            .migrations
            .iter()
            .filter(|m| m.version < 15)
            .cloned()
            .collect::<Vec<_>>()
            .into();
        older.run(&pool).await.unwrap();
        let taker = Uuid::new_v4();
        let ids: Vec<i64> = sqlx::query_scalar(
            "INSERT INTO keel_rebuild_requests (projection, keep_old, actor, generation, taken_by)
             VALUES ('orders', false, 'a', 1, NULL), ('orders', false, 'b', 1, $1),
                    ('orders', false, 'c', 1, NULL), ('customers', false, 'd', 1, NULL)
             RETURNING id",
        )
        .bind(taker)
        .fetch_all(&pool)
        .await
        .unwrap();
        sqlx::migrate!("./migrations").run(&pool).await.unwrap();
        let waiting: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM keel_rebuild_requests WHERE done_at IS NULL ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        assert_eq!(waiting, vec![ids[1], ids[3]], "the taken one is kept");
        let closed: String =
            sqlx::query_scalar("SELECT outcome FROM keel_rebuild_requests WHERE id = $1")
                .bind(ids[0])
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(closed.contains(&format!("request {}", ids[1])), "{closed}");
        let again = keel_views::requests::rebuild(&pool, "orders", false, "e")
            .await
            .unwrap();
        assert!(!again.created && again.request.id == ids[1]);
        pool.close().await;
    }

    /// A stream the log holds no commit of is not reported verified.
    #[test]
    fn verifying_a_stream_with_no_commits_fails() {
        let stream = StreamRef {
            stream_type: "order".into(),
            id: "typo".into(),
        };
        let empty = crate::verify::VerifyReport::default();
        let (ok, outcome) = verified(&stream, &empty);
        assert!(!ok && outcome.contains("no commit"), "{outcome}");
        let clean = crate::verify::VerifyReport {
            commits: 2,
            ..Default::default()
        };
        assert!(verified(&stream, &clean).0);
    }
}
