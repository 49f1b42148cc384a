//! Who holds a unit of projection work, proved inside every batch transaction.
//!
//! A live run holds partitions of its projection, claimed in `keel_units` by this
//! process's membership ([`crate::units`]); so does a rebuild, whose partitions are units
//! of kind `rebuild` that helpers claim the same way and its coordinator takes at the end.
//! A rebuild's coordinator takes its session advisory lock, then claims the rebuild's
//! bookkeeping (start, discards) in `keel_holders` under an id of its own. Either way every batch
//! transaction first reads the rows of what it holds `FOR SHARE` and goes on only if this
//! process still holds all of it. A process that lost a unit (paused past the claim
//! timeout, or its lock session died while a standby took over) finds another's id there,
//! and applies nothing more. The share lock makes a claim wait until the batch that read
//! the row commits, so two holders never apply at once.

use keel_schemas::TopicPartition;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::units::Unit;

/// This process's claim on a unit of work.
#[derive(Debug)]
pub(crate) enum Hold {
    /// Work claimed whole in `keel_holders` (`rebuild:<projection>`).
    Work { work: String, holder: Uuid },
    /// Partitions of a live projection or of a rebuild (`kind`), claimed in `keel_units`
    /// by this process, each under the claim its state was loaded under.
    Units {
        kind: &'static str,
        projection: &'static str,
        process: Uuid,
        units: Vec<Unit>,
        /// For a rebuild's units: the generation they fill and the code filling it. The
        /// proof also checks that the units still name that generation and that the
        /// rebuild recorded is of that code, so a generation started over (by other code,
        /// or from scratch) is never written to under an earlier claim.
        rebuild: Option<(i32, i32)>,
    },
}

/// The unit of work is held by another process now: stop applying, and stand by.
#[derive(Debug, thiserror::Error)]
#[error("{work} is held by another process now (this one lost its lock): standing by")]
pub(crate) struct LostHold {
    work: String,
}

impl Hold {
    /// Claims `work` (`run:<projection>`, `rebuild:<projection>`): call it holding the
    /// work's advisory lock. Takes the unit from whoever held it before.
    pub(crate) async fn claim(pool: &PgPool, work: String) -> anyhow::Result<Self> {
        let holder = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO keel_holders (work, holder, claims, claimed_at) VALUES ($1, $2, 1, now())
             ON CONFLICT (work) DO UPDATE SET holder = EXCLUDED.holder,
                 claims = keel_holders.claims + 1, claimed_at = now()",
        )
        .bind(&work)
        .bind(holder)
        .execute(pool)
        .await?;
        Ok(Self::Work { work, holder })
    }

    /// The partitions `units` of `projection`, as this process's membership claimed them.
    pub(crate) fn units(projection: &'static str, process: Uuid, mut units: Vec<Unit>) -> Self {
        units.sort();
        Self::Units {
            kind: crate::units::RUN,
            projection,
            process,
            units,
            rebuild: None,
        }
    }

    /// The partitions `units` of the rebuild of `projection` into `generation` by code
    /// `code_version`, as `process` claimed them (a helper's membership, or the rebuild's
    /// coordinator taking them all).
    pub(crate) fn rebuild_units(
        projection: &'static str,
        process: Uuid,
        mut units: Vec<Unit>,
        generation: i32,
        code_version: i32,
    ) -> Self {
        units.sort();
        Self::Units {
            kind: crate::units::REBUILD,
            projection,
            process,
            units,
            rebuild: Some((generation, code_version)),
        }
    }

    /// The partitions held, for a live run's units; `None` for work held whole.
    pub(crate) fn partitions(&self) -> Option<Vec<TopicPartition>> {
        match self {
            Self::Work { .. } => None,
            Self::Units { units, .. } => Some(units.iter().map(|u| u.at.clone()).collect()),
        }
    }

    /// Proves, inside the transaction `tx`, that this process still holds the work; the
    /// share lock it takes keeps a new claim waiting until `tx` ends.
    pub(crate) async fn prove(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        match self {
            Self::Work { work, holder } => {
                let now: Option<Uuid> =
                    sqlx::query_scalar("SELECT holder FROM keel_holders WHERE work = $1 FOR SHARE")
                        .bind(work)
                        .fetch_optional(&mut *tx)
                        .await?;
                if now != Some(*holder) {
                    return Err(LostHold { work: work.clone() }.into());
                }
            }
            Self::Units {
                kind,
                projection,
                process,
                units,
                rebuild,
            } => {
                // Rows locked in one order (the key's), as every batch of every process
                // locks them.
                // A rebuild's unit counts only while it names the generation, and the
                // rebuild recorded is of this code.
                let held: Vec<(String, i32, Option<Uuid>, i64)> = sqlx::query_as(
                    "SELECT u.topic, u.partition, u.holder, u.claims FROM keel_units u
                     WHERE u.kind = $1 AND u.projection = $2
                       AND (u.topic, u.partition) IN (SELECT * FROM UNNEST($3::text[], $4::int[]))
                       AND ($5::int IS NULL OR (u.generation = $5 AND EXISTS (
                           SELECT 1 FROM keel_rebuilds r WHERE r.projection = u.projection
                             AND r.generation = $5 AND r.code_version = $6 AND r.gate_rules = $7)))
                     ORDER BY u.topic, u.partition FOR SHARE OF u",
                )
                .bind(kind)
                .bind(projection)
                .bind(units.iter().map(|u| u.at.topic.clone()).collect::<Vec<_>>())
                .bind(units.iter().map(|u| u.at.partition).collect::<Vec<_>>())
                .bind(rebuild.map(|(generation, _)| generation))
                .bind(rebuild.map_or(0, |(_, code)| code))
                .bind(keel_kafka::GATE_RULES)
                .fetch_all(&mut *tx)
                .await?;
                // Held by this process, and under the claim the state was loaded under: a
                // process that lost a unit and claimed it back holds it under a later claim,
                // and state loaded before would apply again what another applied meanwhile.
                let lost: Vec<String> = units
                    .iter()
                    .filter(|unit| {
                        !held.iter().any(|(topic, partition, holder, claims)| {
                            *topic == unit.at.topic
                                && *partition == unit.at.partition
                                && *holder == Some(*process)
                                && *claims == unit.claim
                        })
                    })
                    .map(|unit| format!("{projection} {}", unit.at))
                    .collect();
                if !lost.is_empty() {
                    return Err(LostHold {
                        work: lost.join(", "),
                    }
                    .into());
                }
            }
        }
        Ok(())
    }
}
