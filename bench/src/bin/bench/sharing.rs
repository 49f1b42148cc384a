//! Several projector processes sharing one projection by partition, over the log of the
//! projection scenarios:
//!
//! * catch-up of `orders` from offset 0 with 1, 2 and 3 `projector run` processes;
//! * a rebuild of `orders` filled by those 1, 2 and 3 running processes;
//! * how long a killed process's partitions take to move to the others (SIGKILL: after
//!   the claim timeout; SIGTERM: at once).

use std::time::{Duration, Instant};

use keel_bench::report::{Report, Row};
use keel_tests::{Service, TestDatabase};
use sqlx::PgPool;

use crate::order_log::{OrderLog, PARTITIONS};
use crate::{Options, step};

/// The claim timeout of these runs (`KEEL_PROJECTOR_CLAIM_TIMEOUT_MS`, the default).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// Kills measured, each way.
const MOVES: usize = 3;

/// Runs the scenarios and adds their rows.
pub(crate) async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let events = options.events;
    let log = OrderLog::write("sharing", "bench-share", events).await?;
    let (mut one, mut one_rebuild) = (None, None);
    for processes in 1..=3usize {
        step(&format!(
            "sharing: catch-up of {events} events with {processes} projector processes"
        ));
        // Created before the processes start, so they do not race to create it.
        let db = TestDatabase::created(&format!("bench_share_{processes}")).await?;
        let mut running = Vec::new();
        for _ in 0..processes {
            running.push(
                Service::projector(&log.config, &db.url(), &["--projection", "orders"]).await?,
            );
        }
        let seconds = caught_up(&db, log.total).await?;
        let rate = events as f64 / seconds;
        let scenario = format!("Catch-up of orders, {events} events, {processes} processes");
        beside_one(report, &mut one, &scenario, rate);
        // The running processes fill a rebuild together (unpaced: nothing else runs).
        step(&format!(
            "sharing: a rebuild of orders filled by {processes} running projector processes"
        ));
        let mut env = log.config.env();
        env.push(("KEEL_DATABASE_URL", db.url()));
        let rebuilt =
            crate::projections::rebuild_json(&env, &["rebuild", "orders", "--json"], "off").await?;
        if let Some(rebuilt) = rebuilt.first() {
            let rate = rebuilt["events_per_second"].as_f64().unwrap_or_default();
            let helped = rebuilt["helped_by"].as_u64().unwrap_or_default();
            let scenario = format!(
                "Rebuild of orders, {events} events, filled by {processes} running processes ({helped} helped)"
            );
            beside_one(report, &mut one_rebuild, &scenario, rate);
        }
        if processes == 2 {
            let kills = if options.quick { 1 } else { MOVES };
            moves(&log, &db, &mut running, kills, report).await?;
        }
        for p in running {
            p.stop().await?;
        }
        drop(db);
    }
    report.notes.push(format!(
        "Catch-up with several projector processes shares the {PARTITIONS} partitions of one projection; on this \
         machine's 2 cores the processes, PostgreSQL and the broker share the same CPU, so more processes add \
         coordination but no CPU: the total is bound by the cores (with more machines, by PostgreSQL's write rate)."
    ));
    Ok(())
}

/// Adds the events/s of `scenario`: the first, with 1 process, plainly (and kept in
/// `one`); the others beside it.
fn beside_one(report: &mut Report, one: &mut Option<f64>, scenario: &str, rate: f64) {
    match one {
        None => {
            *one = Some(rate);
            report.rows.push(Row::plain(scenario, "events/s", rate));
        }
        Some(one) => report
            .rows
            .push(Row::beside(scenario, "events/s", rate, "1 process", *one)),
    }
}

/// Seconds until the live checkpoints of `orders` reach `total` records.
async fn caught_up(db: &TestDatabase, total: i64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let mut pool: Option<PgPool> = None;
    let mut told = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if pool.is_none() {
            pool = PgPool::connect(&db.url()).await.ok();
        }
        let done = match &pool {
            Some(pool) => sqlx::query_scalar::<_, Option<i64>>(
                "SELECT sum(c.next_offset)::bigint FROM keel_checkpoints c
                 JOIN keel_projections p ON p.name = c.projection AND p.generation = c.generation
                 WHERE c.projection = 'orders'",
            )
            .fetch_one(pool)
            .await
            .ok()
            .flatten()
            .unwrap_or_default(),
            None => 0,
        };
        if done >= total {
            let seconds = started.elapsed().as_secs_f64();
            if let Some(pool) = pool {
                pool.close().await;
            }
            return Ok(seconds);
        }
        if told.elapsed() >= Duration::from_secs(10) {
            told = Instant::now();
            step(&format!("sharing: {done} of {total} records"));
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the projectors did not catch up in 30 minutes"
        );
    }
}

/// With two processes sharing `orders`: stops one (SIGKILL, then SIGTERM, `kills` times
/// each) and times until the other holds every partition; starts it again in between.
async fn moves(
    log: &OrderLog,
    db: &TestDatabase,
    running: &mut Vec<Service>,
    kills: usize,
    report: &mut Report,
) -> anyhow::Result<()> {
    let pool = PgPool::connect(&db.url()).await?;
    for (how, kill) in [("SIGKILL", true), ("SIGTERM", false)] {
        let mut samples = Vec::new();
        for n in 0..kills {
            step(&format!(
                "sharing: a unit moving after a {how} ({} of {kills})",
                n + 1
            ));
            settled(&pool, running).await?;
            let gone = running.pop().expect("two processes");
            let survivor = running[0].pid().unwrap_or_default();
            let stopped = Instant::now();
            if kill {
                gone.kill().await?;
            } else {
                gone.stop().await?;
            }
            loop {
                let held: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM keel_units u JOIN keel_projector_processes p ON p.id = u.holder
                     WHERE u.kind = 'run' AND u.projection = 'orders' AND p.name LIKE '%:' || $1",
                )
                .bind(survivor.to_string())
                .fetch_one(&pool)
                .await?;
                if held == i64::from(PARTITIONS) {
                    break;
                }
                anyhow::ensure!(
                    stopped.elapsed() < 3 * CLAIM_TIMEOUT,
                    "the partitions did not move within three claim timeouts"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples.push(stopped.elapsed());
            running.push(
                Service::projector(&log.config, &db.url(), &["--projection", "orders"]).await?,
            );
        }
        samples.sort();
        let median = samples[samples.len() / 2].as_secs_f64();
        report.rows.push(Row::beside(
            &format!(
                "A killed projector's partitions move (2 processes, {how}, median of {kills})"
            ),
            "seconds",
            median,
            "claim timeout",
            CLAIM_TIMEOUT.as_secs_f64(),
        ));
    }
    pool.close().await;
    Ok(())
}

/// Waits until both processes hold four partitions each.
async fn settled(pool: &PgPool, running: &mut [Service]) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        for p in running.iter_mut() {
            if p.exited() {
                anyhow::bail!("a projector process exited: {}", p.log());
            }
        }
        let shares: Vec<i64> = sqlx::query_scalar(
            "SELECT count(*) FROM keel_units u JOIN keel_projector_processes p ON p.id = u.holder
             WHERE u.kind = 'run' AND u.projection = 'orders' AND p.expires_at > now()
             GROUP BY u.holder",
        )
        .fetch_all(pool)
        .await?;
        if shares.len() == 2 && shares.iter().all(|n| *n == i64::from(PARTITIONS) / 2) {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "two processes did not settle on half the partitions each in 60 s: {shares:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
