//! Projector processes share each projection by partition: the unit of work is
//! (projection, topic, partition), claimed in `keel_units`.
//!
//! Every process runs a [`Membership`]: each tick it moves its heartbeat forward in
//! `keel_projector_processes`, and for each projection counts the live processes running
//! it and claims or releases units until it holds its share: the projection's units over
//! those processes, the ones left over going one each to the processes in turn, carrying
//! on from one projection to the next. When every process runs the same projections, the
//! most and the fewest units per process differ by at most one once settled, and so do
//! each projection's. A unit is free when it has no holder, or its holder's heartbeat
//! expired (the claim timeout): a process that dies or stalls loses its units to the
//! others after that long.
//!
//! Who makes progress is decided here; who may commit is proved in each batch transaction
//! ([`crate::hold::Hold::Units`]): the batch reads its units' rows `FOR SHARE` and applies
//! nothing unless each still names this process and the claim its state was loaded under
//! (`claims`, counted up by every claim: a fencing token). A claim updates the row, and
//! skips a row a batch holds (trying again at the next tick) rather than wait for it; the
//! batch after the claim sees it. A process paused past the claim timeout finds its units
//! held by another when it wakes, and its batch rolls back; one that got a unit back
//! meanwhile holds it under a later claim, and reloads its state before it applies. Its
//! connections end a transaction left idle for longer than the claim timeout
//! ([`idle_bound`]), so a process stopped inside a batch keeps nobody out past it.

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

mod plan;
use plan::Plan;

/// The kind of a live run's units in `keel_units`.
pub(crate) const RUN: &str = "run";
/// The kind of a rebuild's units in `keel_units`: the partitions of the generation it fills.
pub(crate) const REBUILD: &str = "rebuild";

/// How long after its heartbeat expired a process's row is forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// The `idle_in_transaction_session_timeout` (milliseconds) every connection of a process
/// sharing units runs with: a transaction left idle longer than the claim timeout is
/// ended by PostgreSQL, so that a process stopped inside a batch does not keep a claim
/// waiting on the row it read.
pub fn idle_bound(claim_timeout: Duration) -> String {
    claim_timeout.as_millis().max(1).to_string()
}

/// How a process says it helps fill the rebuilds of `projection` by `code_version` (and
/// this build's gate rules) in its heartbeat's `helps`.
pub(crate) fn help_tag(projection: &str, code_version: i32) -> String {
    format!("{projection}@{code_version}.{}", keel_kafka::GATE_RULES)
}

/// A partition of a projection this process holds, with the claim it holds it under.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Unit {
    /// The partition.
    pub(crate) at: TopicPartition,
    /// The unit's claim count when this process claimed it: a batch proves the row still
    /// has it, so state loaded under an earlier claim is never applied under a later one.
    pub(crate) claim: i64,
}

/// The units of a rebuild's generation this process holds, helping fill it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RebuildShare {
    /// The generation the rebuild fills.
    pub(crate) generation: i32,
    /// Its partitions this process holds, sorted.
    pub(crate) units: Vec<Unit>,
}

/// What a projection's runner applies: the units this process holds of it, as they change.
pub struct Assignment {
    /// This process's id, which its claims name.
    pub(crate) process: Uuid,
    /// The units of the projection this process holds, sorted.
    pub(crate) units: watch::Receiver<Vec<Unit>>,
    /// The units of the projection's rebuild this process holds, when it helps one.
    pub(crate) rebuild: watch::Receiver<Option<RebuildShare>>,
    /// Wakes the membership for a tick now: a batch found a unit held by another.
    pub(crate) nudge: Arc<Notify>,
    /// Set while the runner stands by (newer code built the live generation): the
    /// membership then lets go of the projection's units and claims none, so that
    /// processes of the newer code take them.
    pub(crate) standing_by: Arc<AtomicBool>,
}

impl Assignment {
    /// A watch of the units this process holds, for a task beside the runner that acts on
    /// them (and proves each in its own transactions).
    pub fn held(&self) -> watch::Receiver<Vec<Unit>> {
        self.units.clone()
    }
}

/// This process among the projector processes sharing the projections.
pub struct Membership {
    id: Uuid,
    name: String,
    pool: PgPool,
    timeout: Duration,
    /// Each projection this process runs, with the partitions it reads.
    units: BTreeMap<&'static str, Vec<TopicPartition>>,
    assigned: HashMap<&'static str, watch::Sender<Vec<Unit>>>,
    rebuilding: HashMap<&'static str, watch::Sender<Option<RebuildShare>>>,
    standing_by: HashMap<&'static str, Arc<AtomicBool>>,
    nudge: Arc<Notify>,
    /// The code version of each projection whose rebuilds this process helps fill: only a
    /// rebuild of the same code (and gate rules) is its to help.
    helps: HashMap<&'static str, i32>,
}

/// A unit as `keel_units` holds it: (projection, topic, partition, holder, holder alive,
/// claims).
type UnitRow = (String, String, i32, Option<Uuid>, bool, i64);

/// The generation each rebuild unit names, as a tick read them.
type Generations = HashMap<(&'static str, TopicPartition), Option<i32>>;

/// A live process and the projections it runs, as its heartbeat says.
type Member = (Uuid, Vec<String>);

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
        let mut rebuilding = HashMap::new();
        let mut standing_by = HashMap::new();
        let mut assignments = HashMap::new();
        for (name, mut partitions) in projections {
            partitions.sort();
            units.insert(name, partitions);
            let (tx, rx) = watch::channel(Vec::new());
            assigned.insert(name, tx);
            let (rebuild_tx, rebuild) = watch::channel(None);
            rebuilding.insert(name, rebuild_tx);
            let flag = Arc::new(AtomicBool::new(false));
            standing_by.insert(name, Arc::clone(&flag));
            assignments.insert(
                name,
                Assignment {
                    process: id,
                    units: rx,
                    rebuild,
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
                rebuilding,
                standing_by,
                nudge,
                helps: HashMap::new(),
            },
            assignments,
        )
    }

    /// Helps fill the rebuilds of `projections` (each with the code version this process
    /// runs): claims a share of a rebuild's units when the rebuild is of the same code.
    pub fn help_rebuilds(&mut self, projections: impl IntoIterator<Item = (&'static str, i32)>) {
        self.helps.extend(projections);
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
    pub(crate) async fn tick(&mut self) -> anyhow::Result<()> {
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
        let helps: Vec<String> = names
            .iter()
            .filter_map(|name| Some(help_tag(name, *self.helps.get(name)?)))
            .collect();
        sqlx::query(
            "INSERT INTO keel_projector_processes (id, name, projections, expires_at, helps)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond', $5)
             ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), expires_at = EXCLUDED.expires_at,
                projections = EXCLUDED.projections, helps = EXCLUDED.helps",
        )
        .bind(self.id)
        .bind(&self.name)
        .bind(&names)
        .bind(self.timeout.as_millis() as f64)
        .bind(&helps)
        .execute(&self.pool)
        .await?;
        let members: Vec<Member> = sqlx::query_as(
            "SELECT id, projections FROM keel_projector_processes WHERE expires_at > now() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let rows: Vec<UnitRow> = sqlx::query_as(
            "SELECT u.projection, u.topic, u.partition, u.holder,
                EXISTS (SELECT 1 FROM keel_projector_processes p WHERE p.id = u.holder AND p.expires_at > now()),
                u.claims
             FROM keel_units u WHERE u.kind = $1
             ORDER BY u.projection, u.topic, u.partition",
        )
        .bind(RUN)
        .fetch_all(&self.pool)
        .await?;
        // Whatever it holds of a projection it stands by for goes.
        let standing_by: Vec<(&'static str, TopicPartition)> = rows
            .iter()
            .filter(|row| row.3 == Some(self.id))
            .filter_map(|(projection, topic, partition, ..)| {
                let name = all.iter().copied().find(|n| *n == projection.as_str())?;
                (!running.contains_key(name))
                    .then(|| (name, TopicPartition::new(topic.clone(), *partition)))
            })
            .collect();
        let held = self
            .rebalance(
                RUN,
                &members,
                &running,
                &rows,
                standing_by,
                &Generations::new(),
            )
            .await;
        for (projection, units) in held {
            let units: Vec<Unit> = units.into_iter().map(|(unit, _)| unit).collect();
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
        if !self.helps.is_empty() {
            self.help(&running).await?;
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

    /// Claims and releases units of `kind` towards this process's share of `projections`
    /// (the ones it runs, or helps rebuild) over `rows`, releasing `also` besides; the
    /// units of each projection it holds after, each with the generation it names (as
    /// `generations` has the ones it keeps, and its claims return).
    async fn rebalance(
        &self,
        kind: &'static str,
        members: &[Member],
        projections: &BTreeMap<&'static str, Vec<TopicPartition>>,
        rows: &[UnitRow],
        also: Vec<(&'static str, TopicPartition)>,
        generations: &Generations,
    ) -> BTreeMap<&'static str, BTreeSet<(Unit, Option<i32>)>> {
        let mut plan = Plan::of(self.id, members, projections, rows);
        plan.release.extend(also);
        for (projection, at) in &plan.release {
            // The runner lets go first. A batch of it that still holds the row keeps the
            // unit this process's until a later tick, which releases it again; the runner
            // applies it no more meanwhile.
            self.publish_without(kind, projection, at);
            if let Err(e) = self.release(kind, projection, at).await {
                warn!(kind, projection, topic = %at.topic, partition = at.partition, error = %e,
                      "releasing a unit failed; the next tick tries again");
            }
        }
        let mut claimed = Vec::new();
        for (projection, at) in &plan.claim {
            match self.claim(kind, projection, at).await {
                Ok(Some((claim, generation))) => claimed.push((
                    *projection,
                    Unit {
                        at: at.clone(),
                        claim,
                    },
                    generation,
                )),
                Ok(None) => {}
                Err(e) => {
                    warn!(kind, projection, topic = %at.topic, partition = at.partition, error = %e,
                          "claiming a unit failed; the next tick tries again")
                }
            }
        }
        if !claimed.is_empty() || !plan.release.is_empty() {
            info!(
                kind,
                members = members.len(),
                share = plan.share,
                claimed = claimed.len(),
                released = plan.release.len(),
                "rebalanced the units of work"
            );
        }
        let mut held: BTreeMap<&'static str, BTreeSet<(Unit, Option<i32>)>> =
            self.units.keys().map(|n| (*n, BTreeSet::new())).collect();
        for (projection, unit) in plan.kept {
            let generation = generations
                .get(&(projection, unit.at.clone()))
                .copied()
                .flatten();
            held.entry(projection)
                .or_default()
                .insert((unit, generation));
        }
        for (projection, unit, generation) in claimed {
            held.entry(projection)
                .or_default()
                .insert((unit, generation));
        }
        held
    }

    /// Helps fill the rebuilds of the projections this process runs with the same code:
    /// claims its share of their units, lets go of those of a rebuild no longer its to help
    /// (its coordinator died, or it is of other code), and tells each runner's helper.
    async fn help(
        &self,
        running: &BTreeMap<&'static str, Vec<TopicPartition>>,
    ) -> anyhow::Result<()> {
        type RebuildRow = (
            String,
            String,
            i32,
            Option<Uuid>,
            bool,
            i64,
            Option<i32>,
            Option<i32>,
            Option<i32>,
            bool,
        );
        let rows: Vec<RebuildRow> = sqlx::query_as(
            "SELECT u.projection, u.topic, u.partition, u.holder,
                EXISTS (SELECT 1 FROM keel_projector_processes p WHERE p.id = u.holder AND p.expires_at > now()),
                u.claims, u.generation, r.code_version, r.gate_rules,
                EXISTS (SELECT 1 FROM keel_projector_processes p WHERE p.id = r.coordinator AND p.expires_at > now())
             FROM keel_units u
             LEFT JOIN keel_rebuilds r ON r.projection = u.projection AND r.generation = u.generation
             WHERE u.kind = $1
             ORDER BY u.projection, u.topic, u.partition",
        )
        .bind(REBUILD)
        .fetch_all(&self.pool)
        .await?;
        let helping: BTreeMap<&'static str, Vec<TopicPartition>> = running
            .iter()
            .filter(|(name, _)| self.helps.contains_key(*name))
            .map(|(name, units)| (*name, units.clone()))
            .collect();
        // The members a rebuild is shared by: the live processes that help with its code.
        let helpers: Vec<(Uuid, Vec<String>)> = sqlx::query_as(
            "SELECT id, helps FROM keel_projector_processes WHERE expires_at > now() ORDER BY id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut tags: BTreeMap<String, String> = BTreeMap::new();
        let mut open = Vec::new();
        let mut leave = Vec::new();
        let mut generations = Generations::new();
        for (projection, topic, partition, holder, alive, claims, generation, code, rules, led) in
            rows
        {
            let name = helping.keys().copied().find(|n| *n == projection.as_str());
            let ours = name.is_some_and(|name| {
                led && code == self.helps.get(name).copied()
                    && rules == Some(keel_kafka::GATE_RULES)
            });
            let at = TopicPartition::new(topic.clone(), partition);
            if let Some(name) = name {
                generations.insert((name, at.clone()), generation);
            }
            if ours {
                if let Some(code) = code {
                    tags.insert(help_tag(&projection, code), projection.clone());
                }
                open.push((projection, topic, partition, holder, alive, claims));
            } else if holder == Some(self.id) {
                let name = self
                    .units
                    .keys()
                    .copied()
                    .find(|n| *n == projection.as_str());
                if let Some(name) = name {
                    leave.push((name, at));
                }
            }
        }
        let members: Vec<Member> = helpers
            .into_iter()
            .map(|(id, helps)| {
                let runs = helps
                    .iter()
                    .filter_map(|tag| tags.get(tag).cloned())
                    .collect();
                (id, runs)
            })
            .collect();
        let held = self
            .rebalance(REBUILD, &members, &helping, &open, leave, &generations)
            .await;
        for (projection, units) in held {
            // One generation at a time: a rebuild started again names a later one, and
            // units still naming an earlier are proved under an earlier claim anyway.
            let share = units
                .iter()
                .filter_map(|(_, generation)| *generation)
                .max()
                .map(|generation| RebuildShare {
                    generation,
                    units: units
                        .iter()
                        .filter(|(_, g)| *g == Some(generation))
                        .map(|(unit, _)| unit.clone())
                        .collect(),
                });
            if let Some(tx) = self.rebuilding.get(projection) {
                tx.send_if_modified(|now| {
                    let changed = *now != share;
                    if changed {
                        now.clone_from(&share);
                    }
                    changed
                });
            }
        }
        Ok(())
    }

    fn publish_without(&self, kind: &str, projection: &str, at: &TopicPartition) {
        if kind == REBUILD {
            if let Some(tx) = self.rebuilding.get(projection) {
                tx.send_if_modified(|now| {
                    let Some(share) = now else { return false };
                    let before = share.units.len();
                    share.units.retain(|u| u.at != *at);
                    share.units.len() != before
                });
            }
        } else if let Some(tx) = self.assigned.get(projection) {
            tx.send_if_modified(|now| {
                let before = now.len();
                now.retain(|u| u.at != *at);
                now.len() != before
            });
        }
    }

    /// Claims a free unit: the claim it holds it under and the generation it names;
    /// `None` when another process holds it (or claimed it first), or a batch still holds
    /// its row (the next tick tries again).
    async fn claim(
        &self,
        kind: &str,
        projection: &str,
        at: &TopicPartition,
    ) -> anyhow::Result<Option<(i64, Option<i32>)>> {
        Ok(sqlx::query_as(
            "UPDATE keel_units u SET holder = $5, claims = u.claims + 1, claimed_at = now()
             FROM (SELECT kind, projection, topic, partition FROM keel_units v
                   WHERE v.kind = $1 AND v.projection = $2 AND v.topic = $3 AND v.partition = $4
                     AND (v.holder IS NULL OR NOT EXISTS (
                         SELECT 1 FROM keel_projector_processes p WHERE p.id = v.holder AND p.expires_at > now()))
                     -- A rebuild's unit, only while the rebuild is of this code and its
                     -- coordinator lives (read again here: it may have changed since the tick
                     -- looked).
                     AND (v.kind <> 'rebuild' OR EXISTS (
                         SELECT 1 FROM keel_rebuilds r
                         JOIN keel_projector_processes c ON c.id = r.coordinator AND c.expires_at > now()
                         WHERE r.projection = v.projection AND r.generation = v.generation
                           AND r.code_version = $6 AND r.gate_rules = $7))
                   FOR UPDATE OF v SKIP LOCKED) free
             WHERE (u.kind, u.projection, u.topic, u.partition) = (free.kind, free.projection, free.topic, free.partition)
             RETURNING u.claims, u.generation",
        )
        .bind(kind)
        .bind(projection)
        .bind(&at.topic)
        .bind(at.partition)
        .bind(self.id)
        .bind(self.helps.get(projection).copied().unwrap_or(0))
        .bind(keel_kafka::GATE_RULES)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Lets go of a unit this process holds, unless a batch still holds its row.
    async fn release(
        &self,
        kind: &str,
        projection: &str,
        at: &TopicPartition,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE keel_units u SET holder = NULL
             FROM (SELECT kind, projection, topic, partition FROM keel_units v
                   WHERE v.kind = $1 AND v.projection = $2 AND v.topic = $3 AND v.partition = $4
                     AND v.holder = $5
                   FOR UPDATE SKIP LOCKED) mine
             WHERE (u.kind, u.projection, u.topic, u.partition) = (mine.kind, mine.projection, mine.topic, mine.partition)",
        )
        .bind(kind)
        .bind(projection)
        .bind(&at.topic)
        .bind(at.partition)
        .bind(self.id)
        .execute(&self.pool)
        .await?;
        Ok(())
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
        // In key order, as every batch, claim and rebuild takes the rows.
        sqlx::query(
            "UPDATE keel_units u SET holder = NULL
             FROM (SELECT kind, projection, topic, partition FROM keel_units WHERE holder = $1
                   ORDER BY kind, projection, topic, partition FOR UPDATE) l
             WHERE (u.kind, u.projection, u.topic, u.partition) = (l.kind, l.projection, l.topic, l.partition)",
        )
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    /// The holder of the only unit of the test's database.
    async fn holder(pool: &PgPool) -> Option<Uuid> {
        sqlx::query_scalar("SELECT holder FROM keel_units")
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// A process stalled past the claim timeout loses its unit to another, and its next
    /// batch applies nothing: the proof in its transaction finds the other holder.
    #[tokio::test]
    async fn a_batch_of_a_process_whose_unit_was_taken_applies_nothing() {
        use crate::applier::Applier;
        use crate::generation::Mode;
        use crate::hold::{Hold, LostHold};

        let (_db, pool) = crate::testing::database("lost-unit").await;
        let one = crate::testing::OneOrderPartition::prepare(&pool).await;
        let (job, live) = (&one.job, one.live);
        let timeout = Duration::from_millis(300);
        let (mut a, a_units) =
            Membership::new(pool.clone(), timeout, [("orders", job.partitions())]);
        a.create_units().await.unwrap();
        a.tick().await.unwrap();
        let hold = Hold::units("orders", a.id(), a_units["orders"].units.borrow().clone());
        let mut applier = Applier::load(job, live, Mode::Live, &hold).await.unwrap();
        let writer = keel_schemas::testing::writer("w", 1);
        let first = [
            one.fence(&writer),
            crate::testing::placed(&writer, &one.key, "o-1"),
        ];
        applier.apply(&one.read(0, &first)).await.unwrap();

        // A stalls past its claim timeout; B starts and takes the unit.
        tokio::time::sleep(timeout * 2).await;
        let (mut b, b_units) =
            Membership::new(pool.clone(), timeout, [("orders", job.partitions())]);
        b.tick().await.unwrap();
        assert_eq!(holder(&pool).await, Some(b.id()), "B took the unit");

        // A wakes with a batch in hand.
        let second = [crate::testing::placed(&writer, &one.key, "o-2")];
        let Err(refused) = applier.apply(&one.read(2, &second)).await else {
            panic!("A applies nothing more");
        };
        assert!(refused.downcast_ref::<LostHold>().is_some(), "{refused:#}");
        // The refused batch let go of the unit's row before it answered: a claim, which
        // skips a locked row, finds it free at once.
        let free: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT 1 FROM keel_units FOR UPDATE SKIP LOCKED) r",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(free, 1, "the refused batch still locks the unit's row");
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

        // B applies o-2 and stalls in turn; A gets the unit back. A's state was loaded
        // under its first claim, before B's batch: it must not apply o-2 again.
        let b_hold = Hold::units("orders", b.id(), b_units["orders"].units.borrow().clone());
        let mut b_applier = Applier::load(job, live, Mode::Live, &b_hold).await.unwrap();
        b_applier.apply(&one.read(2, &second)).await.unwrap();
        sqlx::query("UPDATE keel_projector_processes SET expires_at = now() - interval '1 second' WHERE id = $1")
            .bind(b.id())
            .execute(&pool)
            .await
            .unwrap();
        a.tick().await.unwrap();
        assert_eq!(holder(&pool).await, Some(a.id()), "A holds the unit again");
        let Err(refused) = applier.apply(&one.read(2, &second)).await else {
            panic!("A's state from before its new claim applies nothing");
        };
        assert!(refused.downcast_ref::<LostHold>().is_some(), "{refused:#}");
        let placed: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(placed, 2, "o-1 and o-2, each once");
        // Loaded again under the new claim, A goes on from B's checkpoint.
        let hold = Hold::units("orders", a.id(), a_units["orders"].units.borrow().clone());
        let mut applier = Applier::load(job, live, Mode::Live, &hold).await.unwrap();
        let third = [crate::testing::placed(&writer, &one.key, "o-3")];
        applier.apply(&one.read(3, &third)).await.unwrap();
        let next: i64 = sqlx::query_scalar("SELECT next_offset FROM keel_checkpoints")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(next, 4);
        pool.close().await;
    }

    /// A claim never overlaps a batch that proved the unit: it skips a row a batch holds
    /// (without waiting, so a stalled batch holds no tick up) and takes the unit at a
    /// tick after the batch ended.
    #[tokio::test]
    async fn a_claim_skips_a_unit_a_batch_holds_and_takes_it_after() {
        use crate::hold::Hold;

        let (_db, pool) = crate::testing::database("claim-skips").await;
        let partitions = vec![TopicPartition::new("t.order.events", 0)];
        let timeout = Duration::from_millis(300);
        let (mut a, a_units) =
            Membership::new(pool.clone(), timeout, [("orders", partitions.clone())]);
        a.create_units().await.unwrap();
        a.tick().await.unwrap();
        let hold = Hold::units("orders", a.id(), a_units["orders"].units.borrow().clone());
        let mut batch = pool.begin().await.unwrap();
        hold.prove(&mut batch).await.unwrap();
        // A's heartbeat expires while its batch is open; B tries to take the unit.
        tokio::time::sleep(timeout * 2).await;
        let (mut b, _) = Membership::new(pool.clone(), timeout, [("orders", partitions)]);
        b.tick().await.unwrap();
        assert_eq!(
            holder(&pool).await,
            Some(a.id()),
            "not while the batch holds it"
        );
        batch.commit().await.unwrap();
        b.tick().await.unwrap();
        assert_eq!(
            holder(&pool).await,
            Some(b.id()),
            "B holds the unit once the batch ended"
        );
        pool.close().await;
    }
}
