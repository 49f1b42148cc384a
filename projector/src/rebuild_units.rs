//! A rebuild shared by the running projector processes.
//!
//! The process that starts (or resumes) a rebuild coordinates it: it holds the rebuild's
//! advisory lock, beats a heartbeat of its own in `keel_projector_processes`, and opens the
//! new generation's partitions as units of kind `rebuild` in `keel_units` (no holder, and
//! `claims` counted up, so that a helper still holding state of an earlier claim applies
//! nothing). The `projector run` processes that run the projection with the same code claim
//! a share of those units through their membership ([`crate::units`]) and fill them
//! ([`crate::helper`]), each batch proving its unit as a live batch does. The coordinator
//! follows their checkpoints; when the new generation is near the head (or nobody helps),
//! it takes every unit itself (counting `claims` up again, which waits for batches in
//! flight and fences their processes), catches up the rest, and swaps, deleting the units
//! in the swap's transaction. Helpers help only while the coordinator's heartbeat is alive:
//! a rebuild whose coordinator died waits, filled as far as it got, for the next one to
//! resume it.

use std::time::Duration;

use anyhow::Context;
use keel_kafka::AbortOnDrop;
use keel_schemas::TopicPartition;
use sqlx::PgPool;
use tracing::warn;
use uuid::Uuid;

use crate::hold::Hold;
use crate::job::OnError;
use crate::units::{REBUILD, Unit};

/// The coordinator of a rebuild: its heartbeat, which its helpers follow.
pub(crate) struct Coordinator {
    id: Uuid,
    pool: PgPool,
    /// The heartbeat's task; `None` once [`Coordinator::end`] stopped it.
    beat: Option<AbortOnDrop<()>>,
}

impl Coordinator {
    /// Starts beating, every quarter of `timeout`, for the rebuild of `projection`.
    pub(crate) async fn start(
        pool: &PgPool,
        timeout: Duration,
        projection: &str,
    ) -> anyhow::Result<Self> {
        let id = Uuid::new_v4();
        let name = format!(
            "{}:{} rebuild of {projection}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            std::process::id()
        );
        beat(pool, id, &name, timeout)
            .await
            .context("recording the rebuild's coordinator")?;
        let beat = {
            let pool = pool.clone();
            AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep((timeout / 4).max(Duration::from_millis(50))).await;
                    if let Err(e) = beat(&pool, id, &name, timeout).await {
                        warn!(error = %e, "the rebuild's heartbeat failed; retrying");
                    }
                }
            }))
        };
        Ok(Self {
            id,
            pool: pool.clone(),
            beat: Some(beat),
        })
    }

    /// The coordinator's id: its heartbeat's, and the holder its units name once taken.
    pub(crate) fn id(&self) -> Uuid {
        self.id
    }

    /// Ends the heartbeat now, so the helpers let go at their next tick.
    pub(crate) async fn end(mut self) {
        // The beats stop first, so that none writes the row again after it went.
        self.beat.take();
        forget(&self.pool, self.id).await;
    }
}

impl Drop for Coordinator {
    /// Ends the heartbeat at once (unless [`Coordinator::end`] did), so the helpers let go
    /// of the units now rather than after the claim timeout.
    fn drop(&mut self) {
        if self.beat.take().is_none() {
            return;
        }
        let (pool, id) = (self.pool.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { forget(&pool, id).await });
        }
    }
}

/// Deletes the heartbeat of coordinator `id`; a failure leaves it to expire.
async fn forget(pool: &PgPool, id: Uuid) {
    let _ = sqlx::query("DELETE FROM keel_projector_processes WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await;
}

/// One heartbeat: a process that runs no projection, so it is nobody's share.
async fn beat(pool: &PgPool, id: Uuid, name: &str, timeout: Duration) -> anyhow::Result<()> {
    sqlx::query(
        "INSERT INTO keel_projector_processes (id, name, projections, expires_at)
         VALUES ($1, $2, '{}', now() + $3 * interval '1 millisecond')
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
    )
    .bind(id)
    .bind(name)
    .bind(timeout.as_millis() as f64)
    .execute(pool)
    .await?;
    Ok(())
}

/// Fences every helper of `projection`'s rebuild before a coordinator touches a
/// generation: the units lose their holders and name no generation (so nobody claims them
/// until [`open`]), and `claims` counts up (so a batch loaded under an earlier claim applies
/// nothing). Waits for the batches in flight. Proves `hold` (the rebuild's bookkeeping
/// claim) in the same transaction.
pub(crate) async fn fence(pool: &PgPool, projection: &str, hold: &Hold) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    hold.prove(&mut tx).await?;
    sqlx::query(
        "UPDATE keel_units u SET holder = NULL, claims = u.claims + 1, claimed_at = NULL, generation = NULL
         FROM (SELECT kind, projection, topic, partition FROM keel_units
               WHERE kind = $1 AND projection = $2 ORDER BY topic, partition FOR UPDATE) l
         WHERE (u.kind, u.projection, u.topic, u.partition) = (l.kind, l.projection, l.topic, l.partition)",
    )
    .bind(REBUILD)
    .bind(projection)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Opens `generation` of `projection` to helpers: its `partitions` become rebuild units
/// with no holder under a new claim, `coordinator` leads the rebuild, and helpers apply it
/// with `on_error` whatever their own. Proves `hold` (the rebuild's bookkeeping claim) in
/// the same transaction.
pub(crate) async fn open(
    pool: &PgPool,
    projection: &str,
    generation: i32,
    partitions: &[TopicPartition],
    coordinator: Uuid,
    on_error: OnError,
    hold: &Hold,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    hold.prove(&mut tx).await?;
    // Rows in the order every batch locks them: by topic, then partition.
    let mut partitions = partitions.to_vec();
    partitions.sort();
    let topics: Vec<&str> = partitions.iter().map(|p| p.topic.as_str()).collect();
    let numbers: Vec<i32> = partitions.iter().map(|p| p.partition).collect();
    // Units rows first, then the rebuild's row: the order batches take them in.
    sqlx::query(
        "DELETE FROM keel_units WHERE kind = $1 AND projection = $2
           AND (topic, partition) NOT IN (SELECT * FROM UNNEST($3::text[], $4::int[]))",
    )
    .bind(REBUILD)
    .bind(projection)
    .bind(&topics)
    .bind(&numbers)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO keel_units (kind, projection, topic, partition, generation)
         SELECT $1, $2, t, p, $5 FROM UNNEST($3::text[], $4::int[]) WITH ORDINALITY AS x(t, p, n)
         ORDER BY n
         ON CONFLICT (kind, projection, topic, partition) DO UPDATE SET holder = NULL,
             claims = keel_units.claims + 1, claimed_at = NULL, generation = EXCLUDED.generation",
    )
    .bind(REBUILD)
    .bind(projection)
    .bind(&topics)
    .bind(&numbers)
    .bind(generation)
    .execute(&mut *tx)
    .await?;
    let recorded = sqlx::query(
        "UPDATE keel_rebuilds SET coordinator = $3, on_error = $4 WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .bind(coordinator)
    .bind(on_error.name())
    .execute(&mut *tx)
    .await?
    .rows_affected();
    anyhow::ensure!(
        recorded == 1,
        "the rebuild of generation {generation} of {projection} is no longer recorded: another rebuild took it over"
    );
    tx.commit().await?;
    Ok(())
}

/// Takes every unit of `generation` for `coordinator`, under a new claim: waits for the
/// helpers' batches in flight, and fences them from applying any more. Proves `hold` (the
/// rebuild's bookkeeping claim) first, so a coordinator that lost the rebuild takes
/// nothing. The hold to apply the rest with, by code `code_version`.
pub(crate) async fn take_all(
    pool: &PgPool,
    projection: &'static str,
    generation: i32,
    code_version: i32,
    partitions: &[TopicPartition],
    coordinator: Uuid,
    hold: &Hold,
) -> anyhow::Result<Hold> {
    let mut tx = pool.begin().await?;
    hold.prove(&mut tx).await?;
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "UPDATE keel_units u SET holder = $4, claims = u.claims + 1, claimed_at = now()
         FROM (SELECT kind, projection, topic, partition FROM keel_units
               WHERE kind = $1 AND projection = $2 AND generation = $3
               ORDER BY topic, partition FOR UPDATE) l
         WHERE (u.kind, u.projection, u.topic, u.partition) = (l.kind, l.projection, l.topic, l.partition)
         RETURNING u.topic, u.partition, u.claims",
    )
    .bind(REBUILD)
    .bind(projection)
    .bind(generation)
    .bind(coordinator)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let units: Vec<Unit> = rows
        .into_iter()
        .map(|(topic, partition, claim)| Unit {
            at: TopicPartition::new(topic, partition),
            claim,
        })
        .collect();
    anyhow::ensure!(
        partitions
            .iter()
            .all(|at| units.iter().any(|unit| unit.at == *at)),
        "the units of generation {generation} of {projection} are gone: another rebuild took it over"
    );
    Ok(Hold::rebuild_units(
        projection,
        coordinator,
        units,
        generation,
        code_version,
    ))
}

/// Deletes the units of `projection`'s rebuild, in the swap's transaction `tx` (in the
/// order batches lock them): helpers still holding one find it gone at their next batch.
pub(crate) async fn close(tx: &mut sqlx::PgConnection, projection: &str) -> anyhow::Result<()> {
    sqlx::query(
        "DELETE FROM keel_units WHERE (kind, projection, topic, partition) IN (
             SELECT kind, projection, topic, partition FROM keel_units
             WHERE kind = $1 AND projection = $2 ORDER BY topic, partition FOR UPDATE)",
    )
    .bind(REBUILD)
    .bind(projection)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// What a helper applies a rebuild's records with: `on_error` as the rebuild recorded it.
pub(crate) async fn on_error(
    pool: &PgPool,
    projection: &str,
    generation: i32,
) -> anyhow::Result<Option<OnError>> {
    let recorded: Option<Option<String>> = sqlx::query_scalar(
        "SELECT on_error FROM keel_rebuilds WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_optional(pool)
    .await?;
    Ok(recorded
        .flatten()
        .and_then(|mode| <OnError as clap::ValueEnum>::from_str(&mode, true).ok()))
}

/// How far the helpers got: read off the new generation's checkpoints.
#[derive(Debug, Default)]
pub(crate) struct Filled {
    /// The next offset of each partition.
    pub(crate) next: Vec<(TopicPartition, i64)>,
    /// Records read, over every partition.
    pub(crate) records: i64,
    /// Events applied, over every partition.
    pub(crate) events: i64,
    /// The units held by a live process, and by which.
    pub(crate) holders: Vec<Uuid>,
    /// Units nobody alive holds.
    pub(crate) unheld: usize,
    /// Why the rebuild stopped, when a helper's batch stopped it.
    pub(crate) stopped: Option<String>,
}

/// Reads how far the helpers filled `generation`.
pub(crate) async fn filled(
    pool: &PgPool,
    projection: &str,
    generation: i32,
) -> anyhow::Result<Filled> {
    let next: Vec<(String, i32, i64, i64)> = sqlx::query_as(
        "SELECT topic, partition, next_offset, events FROM keel_checkpoints
         WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_all(pool)
    .await?;
    let units: Vec<(Option<Uuid>,)> = sqlx::query_as(
        "SELECT p.id FROM keel_units u
         LEFT JOIN keel_projector_processes p ON p.id = u.holder AND p.expires_at > now()
         WHERE u.kind = $1 AND u.projection = $2 AND u.generation = $3",
    )
    .bind(REBUILD)
    .bind(projection)
    .bind(generation)
    .fetch_all(pool)
    .await?;
    let (state, error): (String, Option<String>) = sqlx::query_as(
        "SELECT state, error FROM keel_rebuilds WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_optional(pool)
    .await?
    .context("the rebuild is no longer recorded: another rebuild took it over")?;
    Ok(Filled {
        records: next.iter().map(|r| r.2).sum(),
        events: next.iter().map(|r| r.3).sum(),
        next: next
            .into_iter()
            .map(|(topic, partition, next, _)| (TopicPartition::new(topic, partition), next))
            .collect(),
        holders: units.iter().filter_map(|(holder,)| *holder).collect(),
        unheld: units.iter().filter(|(holder,)| holder.is_none()).count(),
        stopped: (state == "stopped").then(|| error.unwrap_or_default()),
    })
}

/// How many live processes help fill the rebuilds of `projection` by `code_version`:
/// counted by their heartbeats (processes that stand by leave the projection out).
pub(crate) async fn helpers(
    pool: &PgPool,
    projection: &str,
    code_version: i32,
) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM keel_projector_processes WHERE expires_at > now() AND $1 = ANY(helps)",
    )
    .bind(crate::units::help_tag(projection, code_version))
    .fetch_one(pool)
    .await?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use std::sync::Arc;

    use keel_kafka::AbortOnDrop;
    use keel_schemas::testing::writer;

    use super::*;
    use crate::applier::Applier;
    use crate::generation::Mode;
    use crate::hold::LostHold;
    use crate::job::OnError;
    use crate::units::Membership;

    async fn next_offset(pool: &PgPool, generation: i32) -> i64 {
        sqlx::query_scalar(
            "SELECT coalesce(sum(next_offset), 0)::bigint FROM keel_checkpoints WHERE generation = $1",
        )
        .bind(generation)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// A helper fills its unit of a rebuild until the coordinator takes every unit to
    /// swap: the helper's next batch applies nothing, and the coordinator goes on from the
    /// helper's checkpoint. When the coordinator dies, the helper lets go of the unit.
    #[tokio::test]
    async fn a_helper_applies_nothing_once_the_coordinator_took_its_unit() {
        let (_db, pool) = crate::testing::database("rebuild-helper").await;
        let one = crate::testing::OneOrderPartition::prepare(&pool).await;
        let job = &one.job;
        let bookkeeping = Hold::claim(&pool, "rebuild:orders".into()).await.unwrap();
        let (generation, _) = crate::rebuild::start_or_resume(job, one.live, &bookkeeping)
            .await
            .unwrap();
        let timeout = Duration::from_millis(400);
        let coordinator = Coordinator::start(&pool, timeout, "orders").await.unwrap();
        let partitions = job.partitions();
        open(
            &pool,
            "orders",
            generation,
            &partitions,
            coordinator.id(),
            OnError::Stop,
            &bookkeeping,
        )
        .await
        .unwrap();
        assert_eq!(
            on_error(&pool, "orders", generation).await.unwrap(),
            Some(OnError::Stop),
            "helpers apply the rebuild's mode"
        );
        assert_eq!(
            helpers(&pool, "orders", job.projection.version())
                .await
                .unwrap(),
            0
        );

        let (mut a, assignments) =
            Membership::new(pool.clone(), timeout, [("orders", partitions.clone())]);
        a.help_rebuilds([("orders", job.projection.version())]);
        a.tick().await.unwrap();
        assert_eq!(
            helpers(&pool, "orders", job.projection.version())
                .await
                .unwrap(),
            1
        );
        let share = assignments["orders"].rebuild.borrow().clone().unwrap();
        assert_eq!(
            (share.generation, share.units.len()),
            (generation, 1),
            "{share:?}"
        );
        let version = job.projection.version();
        let hold = Hold::rebuild_units("orders", a.id(), share.units, generation, version);
        let mut helper = Applier::load(job, generation, Mode::Rebuild, &hold)
            .await
            .unwrap();
        let w = writer("w", 1);
        let first = [one.fence(&w), crate::testing::placed(&w, &one.key, "o-1")];
        helper.apply(&one.read(0, &first)).await.unwrap();
        assert_eq!(next_offset(&pool, generation).await, 2);

        let taken = take_all(
            &pool,
            "orders",
            generation,
            version,
            &partitions,
            coordinator.id(),
            &bookkeeping,
        )
        .await
        .unwrap();
        let second = [crate::testing::placed(&w, &one.key, "o-2")];
        let Err(refused) = helper.apply(&one.read(2, &second)).await else {
            panic!("the helper applies nothing once its unit was taken");
        };
        assert!(refused.downcast_ref::<LostHold>().is_some(), "{refused:#}");
        assert_eq!(
            next_offset(&pool, generation).await,
            2,
            "the checkpoint stays"
        );
        let mut applier = Applier::load(job, generation, Mode::Rebuild, &taken)
            .await
            .unwrap();
        assert_eq!(
            applier.next_offset(&partitions[0]),
            2,
            "from the helper's checkpoint"
        );
        applier.apply(&one.read(2, &second)).await.unwrap();
        let table = crate::projection::table("orders", generation);
        let placed = || async {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        };
        assert_eq!(placed().await, 2, "o-1 and o-2, each once");
        a.tick().await.unwrap();
        assert!(
            assignments["orders"].rebuild.borrow().is_none(),
            "the helper's share is gone"
        );

        // A rebuild whose coordinator died is nobody's to help: its units wait for the next.
        drop(applier);
        coordinator.end().await;
        open(
            &pool,
            "orders",
            generation,
            &partitions,
            Uuid::new_v4(),
            OnError::Park,
            &bookkeeping,
        )
        .await
        .unwrap();
        a.tick().await.unwrap();
        assert!(assignments["orders"].rebuild.borrow().is_none());
        let holder = || async {
            sqlx::query_scalar::<_, Option<Uuid>>(
                "SELECT holder FROM keel_units WHERE kind = 'rebuild'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        assert_eq!(
            holder().await,
            None,
            "not claimed without a live coordinator"
        );

        // The next coordinator opens it again and the helper goes on from the checkpoint;
        // then another coordinator takes the rebuild over (the first lost its lock
        // session): from the moment it starts, the helper of the first applies nothing.
        let next = Coordinator::start(&pool, timeout, "orders").await.unwrap();
        open(
            &pool,
            "orders",
            generation,
            &partitions,
            next.id(),
            OnError::Park,
            &bookkeeping,
        )
        .await
        .unwrap();
        a.tick().await.unwrap();
        assert_eq!(holder().await, Some(a.id()));
        let share = assignments["orders"].rebuild.borrow().clone().unwrap();
        let hold = Hold::rebuild_units("orders", a.id(), share.units, generation, version);
        let mut helper = Applier::load(job, generation, Mode::Rebuild, &hold)
            .await
            .unwrap();
        let third = [crate::testing::placed(&w, &one.key, "o-3")];
        helper.apply(&one.read(3, &third)).await.unwrap();
        let successor = Hold::claim(&pool, "rebuild:orders".into()).await.unwrap();
        let (resumed, again) = crate::rebuild::start_or_resume(job, one.live, &successor)
            .await
            .unwrap();
        assert_eq!((resumed, again), (generation, true));
        let fourth = [crate::testing::placed(&w, &one.key, "o-4")];
        let Err(refused) = helper.apply(&one.read(4, &fourth)).await else {
            panic!("the helper of a coordinator that lost the rebuild applies nothing");
        };
        assert!(refused.downcast_ref::<LostHold>().is_some(), "{refused:#}");
        assert_eq!(placed().await, 3);
        // Nor does the coordinator that lost it take the units or swap.
        let stale = take_all(
            &pool,
            "orders",
            generation,
            version,
            &partitions,
            next.id(),
            &bookkeeping,
        )
        .await;
        assert!(
            stale.is_err_and(|e| e.downcast_ref::<LostHold>().is_some()),
            "a coordinator that lost the rebuild takes nothing"
        );
        drop(next);
        pool.close().await;
    }

    /// A broker of its own whose order topic (`partitions`) holds `orders` placed orders
    /// after a fence on each partition, and a database of the test `name`: the broker,
    /// the database, its pool, the Kafka settings, the trusted keys, and the records
    /// written.
    async fn placed_orders(
        name: &str,
        partitions: i32,
        orders: usize,
    ) -> (
        keel_tests::Broker,
        keel_tests::TestDatabase,
        PgPool,
        keel_kafka::KafkaSettings,
        Arc<keel_schemas::TrustedKeys>,
        i64,
    ) {
        let broker = keel_tests::Broker::start().await.unwrap();
        let kafka = broker.settings(&keel_tests::unique_prefix(name), partitions);
        keel_kafka::ensure_topics(&kafka, &["order"]).await.unwrap();
        let (db, pool) = crate::testing::database(name).await;
        let (key, policy) = crate::testing::trusted_key();
        let w = writer("w", 1);
        let mut log = crate::testing::OrderTopicLog::fenced(&kafka, &w, &key);
        for i in 0..orders {
            let id = format!("o-{i}");
            log.push(&id, crate::testing::placed_commit(&w, &key, &id));
        }
        let records = log.write(&kafka).await;
        (broker, db, pool, kafka, policy, records)
    }

    /// A running process of `job`'s projection that helps fill its rebuilds: its
    /// membership's and its helper's tasks, and its assignment.
    fn helping_process(
        job: &crate::job::Job,
    ) -> (AbortOnDrop<()>, AbortOnDrop<()>, crate::units::Assignment) {
        let (mut membership, mut assignments) = Membership::new(
            job.pool.clone(),
            job.options.claim_timeout,
            [(job.name(), job.partitions())],
        );
        membership.help_rebuilds([(job.name(), job.projection.version())]);
        let assignment = assignments.remove(job.name()).unwrap();
        let helper = AbortOnDrop(tokio::spawn(crate::helper::help(
            job.clone(),
            assignment.process,
            assignment.rebuild.clone(),
            Arc::clone(&assignment.nudge),
        )));
        (
            AbortOnDrop(tokio::spawn(membership.run())),
            helper,
            assignment,
        )
    }

    /// Waits until `n` processes beat as helpers of `job`'s rebuilds.
    async fn beating(job: &crate::job::Job, n: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while helpers(&job.pool, job.name(), job.projection.version())
            .await
            .unwrap()
            < n
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{n} helping processes beat"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Two running processes fill a rebuild of 20,000 orders over four partitions together
    /// with their helpers; the coordinator swaps once, and the view holds every order once.
    #[tokio::test]
    async fn two_processes_fill_a_rebuild_together_and_it_swaps_once() {
        const ORDERS: usize = 20_000;
        let (_broker, _db, pool, kafka, policy, records) =
            placed_orders("shared-rebuild", 4, ORDERS).await;
        let mut job = crate::testing::job(crate::testing::orders(), &pool, kafka, policy);
        job.options.claim_timeout = Duration::from_secs(2);
        job.options.batch_size = 500;
        let live = crate::generation::prepare(&pool, job.projection.as_ref())
            .await
            .unwrap()
            .generation;

        let processes = [helping_process(&job), helping_process(&job)];
        beating(&job, 2).await;
        let report = crate::rebuild::rebuild(&job, &crate::testing::rebuild_options())
            .await
            .unwrap();
        assert_eq!(report.generation, live + 1);
        assert_eq!(report.helped_by, 2, "{report}");
        assert_eq!(
            crate::generation::live(&pool, "orders").await.unwrap(),
            Some(live + 1),
            "swapped in once"
        );
        assert!(next_offset(&pool, live + 1).await >= records);
        let (count, distinct): (i64, i64) =
            sqlx::query_as("SELECT count(*), count(DISTINCT order_id) FROM orders")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!((count, distinct), (ORDERS as i64, ORDERS as i64));
        let left: i64 =
            sqlx::query_scalar("SELECT count(*) FROM keel_units WHERE kind = 'rebuild'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(left, 0, "the swap deleted the rebuild's units");
        drop(processes);
        pool.close().await;
    }

    /// A helper whose batch fails on an error no record causes (a missing table) stops
    /// the rebuild where its coordinator sees it: the coordinator gives up with the
    /// helper's error rather than wait for it for ever, and the live view stays.
    #[tokio::test]
    async fn a_helper_that_halts_stops_the_rebuild_and_its_coordinator_says_why() {
        let (_broker, _db, pool, kafka, policy, _) =
            placed_orders("halting-helper", 2, 1_000).await;
        let broken = crate::testing::Fixable::orders("o-0");
        broken.break_badly();
        let mut job = crate::testing::job(broken, &pool, kafka, policy);
        job.options.claim_timeout = Duration::from_secs(2);
        let live = crate::generation::prepare(&pool, job.projection.as_ref())
            .await
            .unwrap()
            .generation;

        let _process = helping_process(&job);
        beating(&job, 1).await;
        let options = crate::testing::rebuild_options();
        let error = tokio::time::timeout(
            Duration::from_secs(60),
            crate::rebuild::rebuild(&job, &options),
        )
        .await
        .expect("the coordinator gives up once the helper stopped the rebuild")
        .expect_err("the rebuild stops");
        let message = format!("{error:#}");
        assert!(
            message.contains("helping fill it") && message.contains("42P01"),
            "{message}"
        );
        let (state, recorded): (String, Option<String>) =
            sqlx::query_as("SELECT state, error FROM keel_rebuilds WHERE projection = 'orders'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(state, "stopped");
        assert!(recorded.is_some_and(|e| e.contains("42P01")));
        assert_eq!(
            crate::generation::live(&pool, "orders").await.unwrap(),
            Some(live),
            "no swap"
        );
        pool.close().await;
    }
}
