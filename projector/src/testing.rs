//! What the projector's tests against a real PostgreSQL set up alike.

#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::sync::Arc;
use std::time::Duration;

use keel_kafka::KafkaSettings;
use keel_schemas::TrustedKeys;
use keel_tests::TestDatabase;
use sqlx::PgPool;

use crate::job::{Job, OnError, RunOptions};
use crate::projection::Projection;

/// A database of the test's own (dropped with the first value) and a pool on it, with the
/// projector's migrations run.
pub(crate) async fn database(test: &str) -> (TestDatabase, PgPool) {
    let db = TestDatabase::new(test);
    let pool = crate::db::connect(&db.url())
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (make test starts it)");
    (db, pool)
}

/// The `orders` projection.
pub(crate) fn orders() -> Arc<dyn Projection> {
    crate::views::all()
        .into_iter()
        .find(|p| p.name() == "orders")
        .unwrap()
}

/// A job of `projection` on `pool` over `kafka`, stopping on a dead letter, under `policy`.
pub(crate) fn job(
    projection: Arc<dyn Projection>,
    pool: &PgPool,
    kafka: KafkaSettings,
    policy: Arc<TrustedKeys>,
) -> Job {
    Job::new(
        projection,
        pool.clone(),
        kafka,
        RunOptions {
            on_error: OnError::Stop,
            batch_size: 100,
            linger: Duration::ZERO,
            snapshot_every: 100,
            policy,
        },
    )
}

/// A job of `projection` on `pool` for tests that stop before reading the log: its broker
/// settings are the defaults, never reached, and it trusts no key.
pub(crate) fn offline_job(projection: Arc<dyn Projection>, pool: &PgPool) -> Job {
    job(
        projection,
        pool,
        KafkaSettings::default(),
        Arc::new(TrustedKeys::default()),
    )
}

/// Prepares `projection`'s live generation and makes it look built by newer code than
/// this build's: what an older projector meets after a newer one rebuilt it. Returns the
/// live generation as prepared.
pub(crate) async fn live_by_newer_code(
    pool: &PgPool,
    projection: &dyn Projection,
) -> crate::generation::Live {
    let live = crate::generation::prepare(pool, projection).await.unwrap();
    sqlx::query("UPDATE keel_projections SET code_version = code_version + 1 WHERE name = $1")
        .bind(projection.name())
        .execute(pool)
        .await
        .unwrap();
    live
}
