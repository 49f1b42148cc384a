//! Projector processes share each projection by partition: the unit of work is
//! (projection, topic, partition), claimed in `keel_units`.
//!
//! Every process runs a [`Membership`]: each tick it moves its heartbeat forward in
//! `keel_projector_processes`, counts the live processes, and claims or releases units
//! until it holds its share (the units over the processes, the first processes by id
//! taking one more where they do not divide evenly), so that the most and the fewest units
//! per process differ by at most one once settled. A unit is free when it has no holder,
//! or its holder's heartbeat expired (the claim timeout): a process that dies or stalls
//! loses its units to the others after that long.
//!
//! Who makes progress is decided here; who may commit is proved in each batch transaction
//! ([`crate::hold::Hold::Units`]): the batch reads its units' rows `FOR SHARE` and applies
//! nothing unless this process still holds every one. A claim is an `UPDATE` of the row,
//! so it waits for a batch that holds the row and then sees its new holder; a process
//! paused past the claim timeout finds its units held by another when it wakes, and its
//! batch rolls back. Its connections end a transaction left idle for longer than the claim
//! timeout ([`idle_bound`]), so a process stopped inside a batch keeps nobody waiting past it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_schemas::TopicPartition;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, PgPool};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};
use uuid::Uuid;

/// The kind of a live run's units in `keel_units`.
pub(crate) const RUN: &str = "run";

/// How long a claim or a release may wait for a batch holding the unit's row.
const CLAIM_LOCK_TIMEOUT: &str = "1s";

/// How long after its heartbeat expired a process's row is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The `idle_in_transaction_session_timeout` (milliseconds) every connection of a process
/// sharing units runs with: a transaction left idle longer than the claim timeout is
/// ended by PostgreSQL, so that a process stopped inside a batch does not keep a claim
/// waiting on the row it read.
pub fn idle_bound(claim_timeout: Duration) -> String {
    claim_timeout.as_millis().max(1).to_string()
}

/// What a projection's runner applies: the units this process holds of it, as they change.
pub struct Assignment {
    /// This process's id, which its claims name.
    pub(crate) process: Uuid,
    /// The partitions of the projection this process holds, sorted.
    pub(crate) units: watch::Receiver<Vec<TopicPartition>>,
    /// Wakes the membership for a tick now: a batch found a unit held by another.
    pub(crate) nudge: Arc<Notify>,
    /// Set while the runner stands by (newer code built the live generation): the
    /// membership then lets go of the projection's units and claims none, so that
    /// processes of the newer code take them.
    pub(crate) standing_by: Arc<AtomicBool>,
}

/// This process among the projector processes sharing the projections.
pub struct Membership {
    id: Uuid,
    name: String,
    pool: PgPool,
    timeout: Duration,
    /// Each projection this process runs, with the partitions it reads.
    units: BTreeMap<&'static str, Vec<TopicPartition>>,
    assigned: HashMap<&'static str, watch::Sender<Vec<TopicPartition>>>,
    standing_by: HashMap<&'static str, Arc<AtomicBool>>,
    nudge: Arc<Notify>,
}

/// A unit as `keel_units` holds it: (projection, topic, partition, holder, holder alive).
type UnitRow = (String, String, i32, Option<Uuid>, bool);

impl Membership {
    /// A membership for `projections` (each with the partitions it reads), on `pool`, with
    /// heartbeats that expire after `timeout`; and the assignment of each projection.
    pub fn new(
        pool: PgPool,
        timeout: Duration,
        projections: impl IntoIterator<Item = (&'static str, Vec<TopicPartition>)>,
    ) -> (Self, HashMap<&'static str, Assignment>) {
        let id = Uuid::new_v4();
        let nudge = Arc::new(Notify::new());
        let mut units = BTreeMap::new();
        let mut assigned = HashMap::new();
        let mut standing_by = HashMap::new();
        let mut assignments = HashMap::new();
        for (name, mut partitions) in projections {
            partitions.sort();
            units.insert(name, partitions);
            let (tx, rx) = watch::channel(Vec::new());
            assigned.insert(name, tx);
            let flag = Arc::new(AtomicBool::new(false));
            standing_by.insert(name, Arc::clone(&flag));
            assignments.insert(
                name,
                Assignment {
                    process: id,
                    units: rx,
                    nudge: Arc::clone(&nudge),
                    standing_by: flag,
                },
            );
        }
        let name = format!(
            "{}:{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into()),
            std::process::id()
        );
        (
            Self {
                id,
                name,
                pool,
                timeout,
                units,
                assigned,
                standing_by,
                nudge,
            },
            assignments,
        )
    }

    /// This process's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// How often the membership ticks: four heartbeats per claim timeout.
    fn interval(&self) -> Duration {
        (self.timeout / 4).max(Duration::from_millis(50))
    }

    /// Makes sure every unit has its row, then ticks until dropped. A tick that fails
    /// (the database is down) is retried at the next; the runners' batches fail meanwhile
    /// on their own.
    pub async fn run(mut self) {
        loop {
            match self.create_units().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "recording the units of work failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        info!(process = %self.id, name = %self.name, "sharing the projections' partitions with the other projector processes");
        loop {
            if let Err(e) = self.tick().await {
                warn!(error = %format!("{e:#}"), "sharing the units of work failed; retrying");
            }
            let nudge = Arc::clone(&self.nudge);
            tokio::select! {
                () = tokio::time::sleep(self.interval()) => {}
                () = nudge.notified() => {}
            }
        }
    }

    async fn create_units(&self) -> anyhow::Result<()> {
        let (mut projections, mut topics, mut partitions) = (Vec::new(), Vec::new(), Vec::new());
        for (name, units) in &self.units {
            for at in units {
                projections.push(*name);
                topics.push(at.topic.clone());
                partitions.push(at.partition);
            }
        }
        sqlx::query(
            "INSERT INTO keel_units (kind, projection, topic, partition)
             SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::int[])
             ON CONFLICT DO NOTHING",
        )
        .bind(RUN)
        .bind(&projections)
        .bind(&topics)
        .bind(&partitions)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One round: the heartbeat, then claims or releases towards this process's share,
    /// then each runner told what it holds.
    async fn tick(&mut self) -> anyhow::Result<()> {
        // The projections this process runs now: not those whose runner stands by.
        let running: BTreeMap<&'static str, Vec<TopicPartition>> = self
            .units
            .iter()
            .filter(|(name, _)| {
                !self
                    .standing_by
                    .get(*name)
                    .is_some_and(|f| f.load(Ordering::Relaxed))
            })
            .map(|(name, units)| (*name, units.clone()))
            .collect();
        let names: Vec<&str> = running.keys().copied().collect();
        let all: Vec<&str> = self.units.keys().copied().collect();
        sqlx::query(
            "INSERT INTO keel_projector_processes (id, name, projections, expires_at)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at",
        )
        .bind(self.id)
        .bind(&self.name)
        .bind(&names)
        .bind(self.timeout.as_millis() as f64)
        .execute(&self.pool)
        .await?;
        let members: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM keel_projector_processes WHERE expires_at > now() AND projections && $1::text[]
             ORDER BY id",
        )
        .bind(&names)
        .fetch_all(&self.pool)
        .await?;
        let rows: Vec<UnitRow> = sqlx::query_as(
            "SELECT u.projection, u.topic, u.partition, u.holder,
                EXISTS (SELECT 1 FROM keel_projector_processes p WHERE p.id = u.holder AND p.expires_at > now())
             FROM keel_units u WHERE u.kind = $1 AND u.projection = ANY($2::text[])
             ORDER BY u.projection, u.topic, u.partition",
        )
        .bind(RUN)
        .bind(&all)
        .fetch_all(&self.pool)
        .await?;
        let mut plan = Plan::of(self.id, &members, &running, &rows);
        // Whatever it holds of a projection it stands by for goes.
        for (projection, topic, partition, holder, _) in &rows {
            if *holder == Some(self.id)
                && let Some(name) = all.iter().copied().find(|n| *n == projection.as_str())
                && !running.contains_key(name)
            {
                plan.release
                    .push((name, TopicPartition::new(topic.clone(), *partition)));
            }
        }
        for (projection, at) in &plan.release {
            // The runner lets go first; the row's release then waits for a batch of it.
            self.publish_without(projection, at);
            if let Err(e) = self.release(projection, at).await {
                warn!(projection, topic = %at.topic, partition = at.partition, error = %e,
                      "releasing a unit failed; the next tick tries again");
            }
        }
        let mut claimed = Vec::new();
        for (projection, at) in &plan.claim {
            match self.claim(projection, at).await {
                Ok(true) => claimed.push((*projection, at.clone())),
                Ok(false) => {}
                Err(e) => {
                    warn!(projection, topic = %at.topic, partition = at.partition, error = %e,
                                "claiming a unit failed; the next tick tries again")
                }
            }
        }
        if !plan.claim.is_empty() || !plan.release.is_empty() {
            info!(
                members = members.len(),
                share = plan.share,
                claimed = claimed.len(),
                released = plan.release.len(),
                "rebalanced the units of work"
            );
        }
        let mut held: BTreeMap<&'static str, BTreeSet<TopicPartition>> =
            self.units.keys().map(|n| (*n, BTreeSet::new())).collect();
        for (projection, at) in plan.kept.into_iter().chain(claimed) {
            held.entry(projection).or_default().insert(at);
        }
        for (projection, units) in held {
            let units: Vec<TopicPartition> = units.into_iter().collect();
            if let Some(tx) = self.assigned.get(projection) {
                tx.send_if_modified(|now| {
                    let changed = *now != units;
                    if changed {
                        now.clone_from(&units);
                    }
                    changed
                });
            }
        }
        sqlx::query(
            "DELETE FROM keel_projector_processes WHERE expires_at < now() - $1 * interval '1 second'
             AND NOT EXISTS (SELECT 1 FROM keel_units u WHERE u.holder = keel_projector_processes.id)",
        )
        .bind(FORGET_AFTER.as_secs() as f64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    fn publish_without(&self, projection: &str, at: &TopicPartition) {
        if let Some(tx) = self.assigned.get(projection) {
            tx.send_if_modified(|now| {
                let before = now.len();
                now.retain(|u| u != at);
                now.len() != before
            });
        }
    }

    /// Claims a free unit; false when another process holds it (or claimed it first).
    async fn claim(&self, projection: &str, at: &TopicPartition) -> anyhow::Result<bool> {
        let claimed = self
            .update_unit(
                "UPDATE keel_units u SET holder = $5, claims = claims + 1, claimed_at = now()
                 WHERE kind = $1 AND projection = $2 AND topic = $3 AND partition = $4
                   AND (holder IS NULL OR NOT EXISTS (
                       SELECT 1 FROM keel_projector_processes p WHERE p.id = u.holder AND p.expires_at > now()))",
                projection,
                at,
            )
            .await?;
        Ok(claimed == 1)
    }

    async fn release(&self, projection: &str, at: &TopicPartition) -> anyhow::Result<()> {
        self.update_unit(
            "UPDATE keel_units SET holder = NULL
             WHERE kind = $1 AND projection = $2 AND topic = $3 AND partition = $4 AND holder = $5",
            projection,
            at,
        )
        .await?;
        Ok(())
    }

    /// Runs `update` (`$1` kind, `$2` projection, `$3` topic, `$4` partition, `$5` this
    /// process) on one unit's row, waiting at most [`CLAIM_LOCK_TIMEOUT`] for a batch
    /// holding it; the rows it changed.
    async fn update_unit(
        &self,
        update: &str,
        projection: &str,
        at: &TopicPartition,
    ) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(&format!("SET LOCAL lock_timeout = '{CLAIM_LOCK_TIMEOUT}'"))
            .execute(&mut *tx)
            .await?;
        let changed = sqlx::query(update)
            .bind(RUN)
            .bind(projection)
            .bind(&at.topic)
            .bind(at.partition)
            .bind(self.id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(changed)
    }

    /// What lets go of this process's units when it ends.
    pub fn leaving(&self) -> Leaving {
        Leaving {
            id: self.id,
            options: self.pool.connect_options(),
        }
    }
}

/// Lets go of a process's units when it ends.
pub struct Leaving {
    id: Uuid,
    options: Arc<PgConnectOptions>,
}

impl Leaving {
    /// Leaves: lets go of every unit and of the heartbeat, so the others take the units at
    /// their next tick instead of after the claim timeout. Call it once the runners stopped
    /// and the pool closed (a batch cut short leaves its connection in its transaction
    /// until the pool closes it, holding its units' rows): it connects on its own.
    pub async fn leave(self) -> anyhow::Result<()> {
        let mut db = PgConnection::connect_with(&self.options).await?;
        sqlx::query("UPDATE keel_units SET holder = NULL WHERE holder = $1")
            .bind(self.id)
            .execute(&mut db)
            .await?;
        sqlx::query("DELETE FROM keel_projector_processes WHERE id = $1")
            .bind(self.id)
            .execute(&mut db)
            .await?;
        db.close().await.ok();
        info!(process = %self.id, "left: the other projector processes take this one's units");
        Ok(())
    }
}

/// What one tick does: the units this process keeps, claims and releases.
#[derive(Debug, Default, PartialEq)]
struct Plan {
    /// How many units this process should hold.
    share: usize,
    kept: Vec<(&'static str, TopicPartition)>,
    claim: Vec<(&'static str, TopicPartition)>,
    release: Vec<(&'static str, TopicPartition)>,
}

impl Plan {
    /// The plan of process `me` among `members` (the live processes, sorted by id), over
    /// the units of `projections` as `rows` hold them. The share is the units over the
    /// members, one more for the first `units % members` members. Claims and releases keep
    /// each projection's units spread too: a process claims first for the projection it
    /// holds the fewest of, and releases first from the one it holds the most of.
    fn of(
        me: Uuid,
        members: &[Uuid],
        projections: &BTreeMap<&'static str, Vec<TopicPartition>>,
        rows: &[UnitRow],
    ) -> Self {
        let name_of = |row: &str| projections.keys().copied().find(|n| *n == row);
        let rank = members
            .iter()
            .position(|m| *m == me)
            .unwrap_or(members.len());
        let count = members.len().max(rank + 1);
        let total = rows.iter().filter(|r| name_of(&r.0).is_some()).count();
        let share = total / count + usize::from(rank < total % count);
        let mut mine: BTreeMap<&'static str, Vec<TopicPartition>> = BTreeMap::new();
        let mut free: BTreeMap<&'static str, Vec<TopicPartition>> = BTreeMap::new();
        for (projection, topic, partition, holder, alive) in rows {
            let Some(name) = name_of(projection) else {
                continue;
            };
            let at = TopicPartition::new(topic.clone(), *partition);
            if *holder == Some(me) {
                mine.entry(name).or_default().push(at);
            } else if holder.is_none() || !alive {
                free.entry(name).or_default().push(at);
            }
        }
        let held: usize = mine.values().map(Vec::len).sum();
        let mut plan = Plan {
            share,
            ..Self::default()
        };
        if held > share {
            for _ in share..held {
                // From the projection this process holds the most of; its last unit.
                let Some((name, units)) = mine
                    .iter_mut()
                    .filter(|(_, u)| !u.is_empty())
                    .max_by_key(|(n, u)| (u.len(), std::cmp::Reverse(**n)))
                else {
                    break;
                };
                if let Some(at) = units.pop() {
                    plan.release.push((*name, at));
                }
            }
        } else {
            let mut counts: BTreeMap<&'static str, usize> = projections
                .keys()
                .map(|n| (*n, mine.get(n).map_or(0, Vec::len)))
                .collect();
            for _ in held..share {
                // For the projection this process holds the fewest of that has a free unit.
                let Some(name) = counts
                    .iter()
                    .filter(|(n, _)| free.get(*n).is_some_and(|f| !f.is_empty()))
                    .min_by_key(|(n, c)| (**c, **n))
                    .map(|(n, _)| *n)
                else {
                    break;
                };
                let at = free.get_mut(name).map(|f| f.remove(0));
                if let Some(at) = at {
                    plan.claim.push((name, at));
                    *counts.entry(name).or_default() += 1;
                }
            }
        }
        plan.kept = mine
            .into_iter()
            .flat_map(|(name, units)| units.into_iter().map(move |at| (name, at)))
            .collect();
        plan
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    fn projections(units: &[(&'static str, i32)]) -> BTreeMap<&'static str, Vec<TopicPartition>> {
        units
            .iter()
            .map(|(name, partitions)| {
                (
                    *name,
                    (0..*partitions)
                        .map(|p| TopicPartition::new(format!("{name}.events"), p))
                        .collect(),
                )
            })
            .collect()
    }

    /// Runs the plans of `members` in turn (each sees the others' claims and releases) until
    /// nobody changes anything; returns how many units each holds.
    fn settle(
        members: &[Uuid],
        projections: &BTreeMap<&'static str, Vec<TopicPartition>>,
        rows: &mut [UnitRow],
    ) -> Vec<usize> {
        for _ in 0..20 {
            let mut changed = false;
            for me in members {
                let plan = Plan::of(*me, members, projections, rows);
                for row in rows.iter_mut() {
                    let at = TopicPartition::new(row.1.clone(), row.2);
                    if plan.release.iter().any(|(n, u)| *n == row.0 && *u == at) {
                        row.3 = None;
                        row.4 = false;
                        changed = true;
                    }
                    if plan.claim.iter().any(|(n, u)| *n == row.0 && *u == at) {
                        row.3 = Some(*me);
                        row.4 = true;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        members
            .iter()
            .map(|m| rows.iter().filter(|r| r.3 == Some(*m)).count())
            .collect()
    }

    fn rows_of(projections: &BTreeMap<&'static str, Vec<TopicPartition>>) -> Vec<UnitRow> {
        projections
            .iter()
            .flat_map(|(name, units)| {
                units.iter().map(|at| {
                    (
                        name.to_string(),
                        at.topic.clone(),
                        at.partition,
                        None,
                        false,
                    )
                })
            })
            .collect()
    }

    /// A process stalled past the claim timeout loses its unit to another, and its next
    /// batch applies nothing: the proof in its transaction finds the other holder.
    #[tokio::test]
    async fn a_batch_of_a_process_whose_unit_was_taken_applies_nothing() {
        use crate::applier::Applier;
        use crate::generation::Mode;
        use crate::hold::{Hold, LostHold};

        let (_db, pool) = crate::testing::database("lost-unit").await;
        let orders = crate::testing::orders();
        let live = crate::generation::prepare(&pool, orders.as_ref())
            .await
            .unwrap()
            .generation;
        let (key, policy) = crate::testing::trusted_key();
        let kafka = keel_kafka::KafkaSettings {
            partitions: 1,
            ..Default::default()
        };
        let job = crate::testing::job(orders, &pool, kafka.clone(), Arc::clone(&policy));
        let timeout = Duration::from_millis(300);
        let (mut a, _) = Membership::new(pool.clone(), timeout, [("orders", job.partitions())]);
        a.create_units().await.unwrap();
        a.tick().await.unwrap();
        let hold = Hold::units("orders", a.id(), job.partitions());
        let mut applier = Applier::load(&job, live, Mode::Live, &hold).await.unwrap();
        let writer = keel_schemas::testing::writer("w", 1);
        let at = TopicPartition::new(kafka.topic("order"), 0);
        let first = [
            keel_schemas::testing::signed_fence(&writer, &key, &at),
            crate::testing::placed(&writer, &key, "o-1"),
        ];
        applier
            .apply(&crate::testing::read_orders(&kafka, &policy, 0, &first))
            .await
            .unwrap();

        // A stalls past its claim timeout; B starts and takes the unit.
        tokio::time::sleep(timeout * 2).await;
        let (mut b, _) = Membership::new(pool.clone(), timeout, [("orders", job.partitions())]);
        b.tick().await.unwrap();
        let holder: Option<Uuid> = sqlx::query_scalar("SELECT holder FROM keel_units")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(holder, Some(b.id()), "B took the unit");

        // A wakes with a batch in hand.
        let second = [crate::testing::placed(&writer, &key, "o-2")];
        let Err(refused) = applier
            .apply(&crate::testing::read_orders(&kafka, &policy, 2, &second))
            .await
        else {
            panic!("A applies nothing more");
        };
        assert!(refused.downcast_ref::<LostHold>().is_some(), "{refused:#}");
        let ids: Vec<String> = sqlx::query_scalar("SELECT order_id FROM orders ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, ["o-1"]);
        let next: i64 = sqlx::query_scalar("SELECT next_offset FROM keel_checkpoints")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(next, 2, "the checkpoint stays where A's last batch left it");
        pool.close().await;
    }

    /// A claim waits for a batch that proved the unit to end: the batch's share lock on the
    /// unit's row holds the claim's update back, so the two never overlap.
    #[tokio::test]
    async fn a_claim_waits_for_the_batch_that_proved_the_unit() {
        use crate::hold::Hold;

        let (_db, pool) = crate::testing::database("claim-waits").await;
        let partitions = vec![TopicPartition::new("t.order.events", 0)];
        let timeout = Duration::from_millis(300);
        let (mut a, _) = Membership::new(pool.clone(), timeout, [("orders", partitions.clone())]);
        a.create_units().await.unwrap();
        a.tick().await.unwrap();
        let hold = Hold::units("orders", a.id(), partitions.clone());
        let mut batch = pool.begin().await.unwrap();
        hold.prove(&mut batch).await.unwrap();
        // A's heartbeat expires while its batch is open; B tries to take the unit.
        tokio::time::sleep(timeout * 2).await;
        let (mut b, _) = Membership::new(pool.clone(), timeout, [("orders", partitions)]);
        let b_id = b.id();
        let claiming = tokio::spawn(async move { b.tick().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!claiming.is_finished(), "the claim waits for the batch");
        batch.commit().await.unwrap();
        claiming.await.unwrap().unwrap();
        let holder: Option<Uuid> = sqlx::query_scalar("SELECT holder FROM keel_units")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(holder, Some(b_id), "B holds the unit once the batch ended");
        pool.close().await;
    }

    #[test]
    fn shares_settle_within_one_of_each_other_as_processes_join_and_leave() {
        let projections = projections(&[("orders", 8), ("daily_sales", 8), ("audit_log", 24)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        for n in 1..=4 {
            let counts = settle(&ids[..n], &projections, &mut rows);
            assert_eq!(
                counts.iter().sum::<usize>(),
                40,
                "every unit held: {counts:?}"
            );
            let (most, fewest) = (counts.iter().max().unwrap(), counts.iter().min().unwrap());
            assert!(most - fewest <= 1, "{n} processes: {counts:?}");
        }
        // One dies: its units are free once its heartbeat expired.
        let dead = ids.remove(1);
        for row in rows.iter_mut().filter(|r| r.3 == Some(dead)) {
            row.4 = false;
        }
        let counts = settle(&ids, &projections, &mut rows);
        assert_eq!(counts.iter().sum::<usize>(), 40, "{counts:?}");
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1);
    }

    #[test]
    fn each_projection_is_spread_over_the_processes_too() {
        let projections = projections(&[("orders", 8), ("customers", 8)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        settle(&ids, &projections, &mut rows);
        for name in ["orders", "customers"] {
            for id in &ids {
                let held = rows
                    .iter()
                    .filter(|r| r.0 == name && r.3 == Some(*id))
                    .count();
                assert_eq!(held, 4, "{name} on {id}");
            }
        }
    }

    #[test]
    fn a_process_keeps_what_it_holds_within_its_share() {
        let projections = projections(&[("orders", 4)]);
        let mut rows = rows_of(&projections);
        let mut ids: Vec<Uuid> = (0..2).map(|_| Uuid::new_v4()).collect();
        ids.sort();
        settle(&ids, &projections, &mut rows);
        let before = rows.clone();
        let plan = Plan::of(ids[0], &ids, &projections, &rows);
        assert!(plan.claim.is_empty() && plan.release.is_empty(), "{plan:?}");
        assert_eq!(rows, before);
    }
}
