use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};
use tracing::info;

/// Connects to the database of `url`, creating it when missing, and runs the projector's
/// migrations.
pub async fn connect(url: &str) -> anyhow::Result<PgPool> {
    connect_with(url, None).await
}

/// [`connect`] for a process that shares units of work with others: each connection ends a
/// transaction left idle longer than `claim_timeout` ([`crate::units::idle_bound`]).
pub async fn connect_sharing(url: &str, claim_timeout: Duration) -> anyhow::Result<PgPool> {
    connect_with(url, Some(claim_timeout)).await
}

async fn connect_with(url: &str, claim_timeout: Option<Duration>) -> anyhow::Result<PgPool> {
    let options =
        PgConnectOptions::from_str(url).context("KEEL_DATABASE_URL is not a PostgreSQL URL")?;
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .with_context(|| {
            format!(
                "connecting to PostgreSQL at {}:{}",
                options.get_host(),
                options.get_port()
            )
        })?;
    let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_optional(&mut admin)
        .await?;
    if exists.is_none() {
        let created = sqlx::raw_sql(&format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        ))
        .execute(&mut admin)
        .await;
        match created {
            Ok(_) => info!(database = %name, "created the database"),
            // Another process created it first (or at the same moment: the catalog's unique
            // index refuses the second row).
            Err(sqlx::Error::Database(e))
                if matches!(e.code().as_deref(), Some("42P04" | "23505")) => {}
            Err(e) => return Err(e).with_context(|| format!("creating database {name}")),
        }
    }
    admin.close().await.ok();
    // Named, so that an operator tells its sessions apart in `pg_stat_activity`.
    let mut options = options.application_name("keel-projector");
    if let Some(timeout) = claim_timeout {
        options = options.options([(
            "idle_in_transaction_session_timeout",
            crate::units::idle_bound(timeout),
        )]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .with_context(|| format!("connecting to database {name}"))?;
    sqlx::migrate!("./migrations")
        .run(&pool)
        .await
        .context("running the projector's migrations")?;
    Ok(pool)
}
