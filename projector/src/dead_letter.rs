//! Dead letters: a record that cannot be decoded or applied is never dropped silently. It
//! is kept with the error and its raw bytes, in the transaction that moves past it (or in
//! the one that stops the projection on it).

use keel_kafka::LogEntry;
use sqlx::PgConnection;

/// A record that could not be decoded or applied, and why.
pub(crate) struct DeadLetter {
    /// The record as read.
    pub(crate) entry: LogEntry,
    /// Why it failed.
    pub(crate) error: String,
}

impl DeadLetter {
    /// What a projection stopped on reports as its error.
    pub(crate) fn stop_reason(&self) -> String {
        format!(
            "dead letter at {}/{} offset {}: {}",
            self.entry.topic, self.entry.partition, self.entry.offset, self.error
        )
    }
}

/// Records `dead` for `generation` of `projection` in `tx`; `skipped` when the projection
/// goes on past them.
pub(crate) async fn record(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
    dead: &[DeadLetter],
    skipped: bool,
) -> Result<(), sqlx::Error> {
    for d in dead {
        sqlx::query(
            r#"INSERT INTO keel_dead_letters (projection, generation, topic, partition, "offset", error, key, payload, skipped)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
               ON CONFLICT (projection, generation, topic, partition, "offset")
               DO UPDATE SET error = EXCLUDED.error, skipped = EXCLUDED.skipped"#,
        )
        .bind(projection)
        .bind(generation)
        .bind(&d.entry.topic)
        .bind(d.entry.partition)
        .bind(d.entry.offset)
        .bind(&d.error)
        .bind(&d.entry.key)
        .bind(&d.entry.payload)
        .bind(skipped)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Forgets `generation`'s dead letters, in `tx`.
pub(crate) async fn discard(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM keel_dead_letters WHERE projection = $1 AND generation = $2")
        .bind(projection)
        .bind(generation)
        .execute(&mut *tx)
        .await?;
    Ok(())
}
