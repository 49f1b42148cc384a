//! Who holds a unit of projection work, proved inside every batch transaction.
//!
//! A runner (or a rebuild) takes its session advisory lock, then claims its unit of work in
//! `keel_holders` under an id of its own. Every batch transaction first reads the unit's
//! row `FOR SHARE` and goes on only if this process still holds it. A runner whose lock
//! session died (a PostgreSQL restart, `pg_terminate_backend`, an idle-session timeout)
//! while a standby took the lock and claimed the unit finds the standby's id there, and
//! applies nothing more. The share lock makes a claim wait until the batch that read the
//! row commits, so two holders never apply at once.

use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// This process's claim on a unit of work.
#[derive(Debug)]
pub(crate) struct Hold {
    work: String,
    holder: Uuid,
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
        Ok(Self { work, holder })
    }

    /// Proves, inside the transaction `tx`, that this process still holds the work; the
    /// share lock it takes keeps a new claim waiting until `tx` ends.
    pub(crate) async fn prove(&self, tx: &mut PgConnection) -> anyhow::Result<()> {
        let holder: Option<Uuid> =
            sqlx::query_scalar("SELECT holder FROM keel_holders WHERE work = $1 FOR SHARE")
                .bind(&self.work)
                .fetch_optional(&mut *tx)
                .await?;
        if holder != Some(self.holder) {
            return Err(LostHold {
                work: self.work.clone(),
            }
            .into());
        }
        Ok(())
    }
}
