//! Generations: each projection's tables exist once per generation (`<table>_g<N>`), one
//! generation is live and seen through views under the plain table names, and a rebuild
//! fills the next one beside it. This file prepares the live generation, points the views,
//! records each batch's progress against its generation, and drops generations no longer
//! wanted.

use anyhow::Context;
use keel_kafka::GATE_RULES;
use keel_views::NOTIFY_CHANNEL;
use sqlx::{PgConnection, PgPool};

use crate::hold::Hold;
use crate::projection::{Projection, create_indexes, execute_script, table};
use crate::{BoxFuture, checkpoint, dead_letter};

/// Which generation a batch applies to, and so what it reports to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The live generation: reports to `keel_projections`, notifies waiting queries, and
    /// fails with [`GenerationChanged`] once a rebuild has swapped another generation in.
    Live,
    /// A generation being rebuilt: reports to `keel_rebuilds`; nobody reads it yet.
    Rebuild,
}

/// The projection stopped on a dead letter (in `stop` mode), on this process or another:
/// no live batch applies until the runner holding that record's partition starts again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the {0} projection stopped on a dead letter (see `projector status`); it goes on once the process holding that partition starts again"
)]
pub(crate) struct ProjectionStopped(pub(crate) String);

/// The live generation is no longer the one this runner applies: a rebuild swapped in.
#[derive(Debug, thiserror::Error)]
#[error("generation {0} is no longer live: a rebuild swapped another generation in")]
pub(crate) struct GenerationChanged(pub(crate) i32);

/// The live generation of a projection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// Its number.
    pub generation: i32,
    /// The code version its tables were built with.
    pub code_version: i32,
    /// The version of the gate's rules its state was built under ([`GATE_RULES`]).
    pub gate_rules: i32,
}

/// How the code that built a generation compares with this projector's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Built {
    /// By this projector's code: it runs the generation.
    Same,
    /// By older code (the projection's or the gate's rules): the generation is rebuilt.
    Older,
    /// By newer code: this projector must not touch it.
    Newer,
}

impl Live {
    /// How the code that built the generation compares with this projector's code of
    /// `projection`: newer when either its projection code or its gate rules are newer.
    pub fn built(&self, projection: &dyn Projection) -> Built {
        let (code, rules) = (projection.version(), GATE_RULES);
        if self.code_version > code || self.gate_rules > rules {
            Built::Newer
        } else if self.code_version < code || self.gate_rules < rules {
            Built::Older
        } else {
            Built::Same
        }
    }
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
    lock(&mut tx, projection.name()).await?;
    let row: Option<(i32, i32, i32)> = sqlx::query_as(
        "SELECT generation, code_version, gate_rules FROM keel_projections WHERE name = $1",
    )
    .bind(projection.name())
    .fetch_optional(&mut *tx)
    .await?;
    let live = match row {
        Some((generation, code_version, gate_rules)) => Live {
            generation,
            code_version,
            gate_rules,
        },
        None => {
            sqlx::query(
                "INSERT INTO keel_projections (name, generation, code_version, gate_rules)
                 VALUES ($1, 1, $2, $3)",
            )
            .bind(projection.name())
            .bind(projection.version())
            .bind(GATE_RULES)
            .execute(&mut *tx)
            .await?;
            Live {
                generation: 1,
                code_version: projection.version(),
                gate_rules: GATE_RULES,
            }
        }
    };
    let generation = live.generation;
    create_tables(&mut tx, projection, generation).await?;
    create_indexes(&mut tx, projection, generation)
        .await
        .with_context(|| format!("indexing {} generation {generation}", projection.name()))?;
    point_views(&mut tx, projection, generation).await?;
    tx.commit().await?;
    Ok(live)
}

/// Takes the projection's transaction lock: preparing the live generation and a swap hold
/// it, so neither sees the other half done.
pub(crate) async fn lock(tx: &mut PgConnection, projection: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(projection)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The live generation as recorded, if the projection has one, read without its lock:
/// enough to tell whether newer code built it.
pub(crate) async fn peek(pool: &PgPool, projection: &str) -> Result<Option<Live>, sqlx::Error> {
    let row: Option<(i32, i32, i32)> = sqlx::query_as(
        "SELECT generation, code_version, gate_rules FROM keel_projections WHERE name = $1",
    )
    .bind(projection)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(generation, code_version, gate_rules)| Live {
        generation,
        code_version,
        gate_rules,
    }))
}

/// The live generation's number, if the projection has one.
pub(crate) async fn live(pool: &PgPool, projection: &str) -> Result<Option<i32>, sqlx::Error> {
    sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = $1")
        .bind(projection)
        .fetch_optional(pool)
        .await
}

/// Creates the tables of `generation` (primary keys only).
pub(crate) fn create_tables<'a>(
    tx: &'a mut PgConnection,
    projection: &'a dyn Projection,
    generation: i32,
) -> BoxFuture<'a, anyhow::Result<()>> {
    Box::pin(async move {
        projection
            .create(tx, generation)
            .await
            .with_context(|| format!("creating generation {generation} of {}", projection.name()))
    })
}

/// Points the projection's views at the tables of `generation`.
pub(crate) async fn point_views(
    tx: &mut PgConnection,
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

/// What one batch did, as its generation's row records it.
pub(crate) struct BatchReport<'a> {
    /// Why the projection stopped, when a dead letter stopped it.
    pub(crate) stopped: Option<String>,
    /// Where the batch applied.
    pub(crate) mode: Mode,
    /// The projection.
    pub(crate) projection: &'a str,
    /// Its generation.
    pub(crate) generation: i32,
}

/// Starts a live batch in its transaction `tx`, before it writes anything: takes the
/// projection's transaction lock shared, then checks that `generation` is still live.
/// Batches of several units (and processes) go on side by side; a swap or a prepare
/// (which take the lock exclusive) waits for those in flight, and those that come after it
/// find their generation gone. Taken first, before any of the view's tables, as the swap
/// and the prepare take it: a batch holding a table while it waits for the lock would
/// deadlock with a prepare that holds the lock while it waits for the table.
pub(crate) async fn enter_live(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
) -> anyhow::Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext($1))")
        .bind(projection)
        .execute(&mut *tx)
        .await?;
    let live: Option<(i32, String)> =
        sqlx::query_as("SELECT generation, state FROM keel_projections WHERE name = $1")
            .bind(projection)
            .fetch_optional(&mut *tx)
            .await?;
    match live {
        Some((live, _)) if live != generation => Err(GenerationChanged(generation).into()),
        None => Err(GenerationChanged(generation).into()),
        Some((_, state)) if state == "stopped" => {
            Err(ProjectionStopped(projection.to_owned()).into())
        }
        Some(_) => Ok(()),
    }
}

/// Records a batch against its generation in the batch's transaction `tx` (for the live
/// generation, one [`enter_live`] began): a live one notifies waiting queries on commit,
/// and records a stop. The events are counted on the checkpoints, where each unit writes
/// anyway.
pub(crate) async fn record_batch(
    tx: &mut PgConnection,
    report: BatchReport<'_>,
) -> anyhow::Result<()> {
    let BatchReport {
        stopped,
        mode,
        projection,
        generation,
    } = report;
    let state_word = stopped.as_ref().map_or("running", |_| "stopped");
    match mode {
        Mode::Live => {
            if stopped.is_some() {
                sqlx::query(
                    "UPDATE keel_projections SET state = $2, error = $3, updated_at = now() WHERE name = $1",
                )
                .bind(projection)
                .bind(state_word)
                .bind(&stopped)
                .execute(&mut *tx)
                .await?;
            }
            notify(tx, projection).await?;
        }
        // Several processes fill a rebuild's units at once: its progress is read off the
        // checkpoints by its coordinator, and a batch only checks the rebuild is still on
        // (without writing its row, which every batch would wait on), or records a stop.
        Mode::Rebuild => {
            let on: bool = match &stopped {
                None => sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM keel_rebuilds WHERE projection = $1 AND generation = $2)",
                )
                .bind(projection)
                .bind(generation)
                .fetch_one(&mut *tx)
                .await?,
                Some(error) => {
                    sqlx::query(
                        "UPDATE keel_rebuilds SET state = 'stopped', error = $3, updated_at = now()
                         WHERE projection = $1 AND generation = $2",
                    )
                    .bind(projection)
                    .bind(generation)
                    .bind(error)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                        == 1
                }
            };
            anyhow::ensure!(
                on,
                "the rebuild of generation {generation} is no longer recorded; it was cancelled or finished elsewhere"
            );
        }
    }
    Ok(())
}

/// Tells waiting queries, when `tx` commits, that `projection` moved.
pub(crate) async fn notify(tx: &mut PgConnection, projection: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(NOTIFY_CHANNEL)
        .bind(projection)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Makes `generation` live in the swap's transaction `tx`: the projection's row names it,
/// the rebuild's row goes, waiting queries are told, and, unless `keep_previous`, the
/// replaced generation is recorded as to be dropped, so that a crash before
/// [`discard`] runs leaves work that [`finish_discards`] completes on the next start.
pub(crate) async fn make_live(
    tx: &mut PgConnection,
    projection: &dyn Projection,
    generation: i32,
    previous: i32,
    keep_previous: bool,
) -> Result<(), sqlx::Error> {
    let name = projection.name();
    // The new generation's events are counted on its checkpoints.
    sqlx::query(
        "UPDATE keel_projections SET generation = $2, code_version = $3, gate_rules = $4, events = 0,
            state = 'running', error = NULL, updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(generation)
    .bind(projection.version())
    .bind(GATE_RULES)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM keel_rebuilds WHERE projection = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    if !keep_previous {
        sqlx::query(
            "INSERT INTO keel_discards (projection, generation) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(previous)
        .execute(&mut *tx)
        .await?;
    }
    notify(tx, name).await
}

/// Drops the generations of `projection` that a swap replaced but whose drop did not
/// happen (the rebuild crashed or was stopped between the two); returns them.
pub(crate) async fn finish_discards(
    pool: &PgPool,
    projection: &dyn Projection,
) -> anyhow::Result<Vec<i32>> {
    let pending: Vec<i32> = sqlx::query_scalar(
        "SELECT d.generation FROM keel_discards d JOIN keel_projections p ON p.name = d.projection
         WHERE d.projection = $1 AND d.generation <> p.generation ORDER BY d.generation",
    )
    .bind(projection.name())
    .fetch_all(pool)
    .await?;
    for &generation in &pending {
        discard(pool, projection, generation, None)
            .await
            .with_context(|| format!("dropping generation {generation} a swap replaced"))?;
    }
    Ok(pending)
}

/// Bounds how long the transaction `tx` may stay idle: if its process stalls (paused,
/// cut off) with the transaction open, PostgreSQL ends the session after `idle` and its
/// locks go with it, instead of holding up the live runner and every reader until the
/// process wakes.
pub(crate) async fn bound_idle(
    tx: &mut PgConnection,
    idle: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SET LOCAL idle_in_transaction_session_timeout = {}",
        idle.as_millis().max(1)
    ))
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Drops a generation that is not live: its tables and its bookkeeping.
///
/// A rebuild calls this holding the projection's rebuild lock, for the generation it
/// builds or one it replaced; [`finish_discards`] calls it without that lock, for a
/// generation a swap replaced. Either way no swap can make `generation` live meanwhile: a
/// swap only ever makes a generation above the live one live. The check that it is not live is
/// therefore a plain read, in the same transaction as the drop (which it rolls back if the
/// generation is live), and takes no row lock: a lock on the projection's row would wait
/// for the live runner's batch, which updates that row, while this transaction holds the
/// dropped tables exclusively (stalling every query still planned against them), or, taken
/// before the drop, deadlock with a dying batch of the old generation that the drop waits
/// for.
pub(crate) async fn discard(
    pool: &PgPool,
    projection: &dyn Projection,
    generation: i32,
    hold: Option<&Hold>,
) -> anyhow::Result<()> {
    // A batch of the old generation may still hold one of several tables while the drop
    // holds another (their orders differ): PostgreSQL then aborts one of the two. That
    // batch is on its way out, so the drop tries again.
    let mut attempt = 1;
    loop {
        match discard_once(pool, projection, generation, hold).await {
            Err(e) if attempt < DISCARD_ATTEMPTS && is_deadlock(&e) => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            done => return done,
        }
    }
}

/// How often [`discard`] tries when PostgreSQL aborts it to break a deadlock.
const DISCARD_ATTEMPTS: u32 = 5;

fn is_deadlock(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.code())
        .is_some_and(|code| code == "40P01")
}

async fn discard_once(
    pool: &PgPool,
    projection: &dyn Projection,
    generation: i32,
    hold: Option<&Hold>,
) -> anyhow::Result<()> {
    let name = projection.name();
    let mut tx = pool.begin().await?;
    // A rebuild drops what it builds over only while it still holds the rebuild: one that
    // stalled after it looked must not drop the generation its successor builds.
    if let Some(hold) = hold {
        hold.prove(&mut tx).await?;
    }
    for t in projection.tables() {
        sqlx::query(&format!("DROP TABLE IF EXISTS {}", table(t, generation)))
            .execute(&mut *tx)
            .await?;
    }
    let live: Option<i32> =
        sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = $1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    anyhow::ensure!(
        live != Some(generation),
        "refusing to drop generation {generation} of {name}: it is live"
    );
    checkpoint::discard(&mut tx, name, generation).await?;
    dead_letter::discard(&mut tx, name, generation).await?;
    sqlx::query("DELETE FROM keel_rebuilds WHERE projection = $1 AND generation = $2")
        .bind(name)
        .bind(generation)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM keel_discards WHERE projection = $1 AND generation = $2")
        .bind(name)
        .bind(generation)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A generation built before the gate's rules of today (a row written before the
    /// column existed has the oldest rules) is rebuilt, never resumed: its saved gate state
    /// came from rules that read the log differently. One built under newer rules is left
    /// to the newer projector.
    #[tokio::test]
    async fn a_generation_built_under_other_gate_rules_is_not_resumed() {
        let (_db, pool) = crate::testing::database("gate-rules").await;
        let orders = crate::testing::orders();
        sqlx::query(
            "INSERT INTO keel_projections (name, generation, code_version) VALUES ('orders', 1, $1)",
        )
        .bind(orders.version())
        .execute(&pool)
        .await
        .unwrap();
        let built = || async {
            prepare(&pool, orders.as_ref())
                .await
                .unwrap()
                .built(orders.as_ref())
        };
        assert_eq!(built().await, Built::Older);
        for (rules, expected) in [(GATE_RULES + 1, Built::Newer), (GATE_RULES, Built::Same)] {
            sqlx::query("UPDATE keel_projections SET gate_rules = $1")
                .bind(rules)
                .execute(&pool)
                .await
                .unwrap();
            assert_eq!(built().await, expected, "gate rules {rules}");
        }
        pool.close().await;
    }

    async fn tables_of(pool: &PgPool, generation: i32) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE tablename LIKE $1")
            .bind(format!("%\\_g{generation}"))
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// A swap whose process died before it dropped the generation it replaced leaves the
    /// drop recorded; the next start finishes it, once, and never drops a generation kept
    /// with `--keep-old`.
    #[tokio::test]
    async fn a_drop_a_crash_interrupted_after_the_swap_is_finished_on_the_next_start() {
        let (_db, pool) = crate::testing::database("discards").await;
        let orders = crate::testing::orders();
        let first = prepare(&pool, orders.as_ref()).await.unwrap().generation;
        // Two swaps, as a rebuild makes them, each followed by a crash before the drop:
        // the first replaces its generation, the second keeps it (`--keep-old`).
        for (generation, keep_previous) in [(first + 1, false), (first + 2, true)] {
            let mut tx = pool.begin().await.unwrap();
            create_tables(&mut tx, orders.as_ref(), generation)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO keel_rebuilds (projection, generation, code_version, owner)
                 VALUES ('orders', $1, $2, 'test')",
            )
            .bind(generation)
            .bind(orders.version())
            .execute(&mut *tx)
            .await
            .unwrap();
            lock(&mut tx, "orders").await.unwrap();
            point_views(&mut tx, orders.as_ref(), generation)
                .await
                .unwrap();
            make_live(
                &mut tx,
                orders.as_ref(),
                generation,
                generation - 1,
                keep_previous,
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        assert!(
            tables_of(&pool, first).await > 0,
            "left behind by the crash"
        );
        assert_eq!(
            finish_discards(&pool, orders.as_ref()).await.unwrap(),
            [first]
        );
        assert_eq!(
            tables_of(&pool, first).await,
            0,
            "dropped on the next start"
        );
        assert!(tables_of(&pool, first + 1).await > 0, "kept on purpose");
        assert!(tables_of(&pool, first + 2).await > 0, "live");
        assert!(
            finish_discards(&pool, orders.as_ref())
                .await
                .unwrap()
                .is_empty(),
            "done once"
        );
        pool.close().await;
    }

    /// A swap transaction whose process stalls lets go of its locks once it has been idle
    /// for its bound: the live runner's batch, waiting on the projection's row, goes on.
    #[tokio::test]
    async fn a_stalled_swap_transaction_loses_its_locks() {
        let (_db, pool) = crate::testing::database("stalled-swap").await;
        let orders = crate::testing::orders();
        prepare(&pool, orders.as_ref()).await.unwrap();
        let mut swap = pool.begin().await.unwrap();
        bound_idle(&mut swap, Duration::from_millis(300))
            .await
            .unwrap();
        sqlx::query("SELECT generation FROM keel_projections WHERE name = 'orders' FOR UPDATE")
            .execute(&mut *swap)
            .await
            .unwrap();
        // The swap's process stalls here; a live batch needs the row.
        let batch =
            sqlx::query("UPDATE keel_projections SET updated_at = now() WHERE name = 'orders'")
                .execute(&pool);
        tokio::time::timeout(Duration::from_secs(20), batch)
            .await
            .expect("the batch still waits for the stalled swap's lock")
            .unwrap();
        assert!(
            sqlx::query("SELECT 1").execute(&mut *swap).await.is_err(),
            "the stalled swap's session was ended"
        );
        drop(swap);
        pool.close().await;
    }

    /// Dropping an old generation never waits for the live runner's batch (here, a
    /// transaction holding the projection's row, as a batch's update does), so it never
    /// holds the old tables exclusively while it waits; and it still refuses the live one.
    #[tokio::test]
    async fn discarding_an_old_generation_does_not_wait_for_a_live_batch() {
        let (_db, pool) = crate::testing::database("discard").await;
        let orders = crate::testing::orders();
        let live = prepare(&pool, orders.as_ref()).await.unwrap();
        let old = live.generation + 1;
        let mut tx = pool.begin().await.unwrap();
        create_tables(&mut tx, orders.as_ref(), old).await.unwrap();
        tx.commit().await.unwrap();
        assert!(tables_of(&pool, old).await > 0);

        // A live batch in flight: the projection's row locked until it commits.
        let mut batch = pool.begin().await.unwrap();
        sqlx::query("UPDATE keel_projections SET updated_at = now() WHERE name = 'orders'")
            .execute(&mut *batch)
            .await
            .unwrap();
        let dropped = tokio::time::timeout(
            Duration::from_secs(5),
            discard(&pool, orders.as_ref(), old, None),
        )
        .await;
        batch.rollback().await.unwrap();
        dropped.expect("discard waited for the live batch").unwrap();
        assert_eq!(tables_of(&pool, old).await, 0);

        // The live generation is refused (its views hold its tables, so the drop itself
        // fails first) and rolled back.
        let refused = discard(&pool, orders.as_ref(), live.generation, None).await;
        assert!(refused.is_err(), "the live generation is refused");
        assert!(
            tables_of(&pool, live.generation).await > 0,
            "and its tables stay"
        );
        pool.close().await;
    }
}
