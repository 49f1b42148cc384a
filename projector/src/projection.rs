//! The projection trait: what a view declares and how it applies a batch of events.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_schemas::{CommitRecord, EventEnvelope};
use keel_views::ProjectionSpec;
use sqlx::PgConnection;

pub use keel_domain::AnyEvent;

/// One event as a projection receives it: decoded and upcast, with its commit and position.
#[derive(Clone, Debug)]
pub struct ProjectedEvent {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The commit record's offset.
    pub offset: i64,
    /// The event's index within its commit.
    pub index: usize,
    /// The commit the event belongs to.
    pub commit: Arc<CommitRecord>,
    /// The decoded event.
    pub event: AnyEvent,
}

impl ProjectedEvent {
    /// The event's envelope as stored.
    pub fn envelope(&self) -> &EventEnvelope {
        &self.commit.events[self.index]
    }

    /// The id of the event's stream.
    pub fn stream_id(&self) -> &str {
        &self.commit.stream.id
    }

    /// The stream version this event brought the stream to.
    pub fn version(&self) -> i64 {
        self.envelope().version as i64
    }

    /// When the command was decided.
    pub fn recorded_at(&self) -> DateTime<Utc> {
        self.commit.recorded_at.as_datetime()
    }
}

/// A read model kept in PostgreSQL.
///
/// A projection owns its tables, one set per generation (`<table>_g<N>`), and the
/// projector exposes the live generation under the plain table name as a view.
/// `apply` runs inside the transaction that also advances the projection's checkpoint,
/// so each batch is applied exactly once.
#[async_trait]
pub trait Projection: Send + Sync {
    /// What the projection is: name, code version, stream types, tables (the read contract).
    fn spec(&self) -> &'static ProjectionSpec;
    /// The projection's name, also its main view's name.
    fn name(&self) -> &'static str {
        self.spec().name
    }
    /// The version of the projection's code. Changing it means the tables must be rebuilt.
    fn version(&self) -> i32 {
        self.spec().version
    }
    /// The stream types whose topics it reads.
    fn stream_types(&self) -> &'static [&'static str] {
        self.spec().stream_types
    }
    /// Its tables, without the generation suffix.
    fn tables(&self) -> &'static [&'static str] {
        self.spec().tables
    }
    /// Creates the tables of `generation` (`<table>_g<generation>`) with their primary
    /// keys only.
    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error>;
    /// The secondary indexes of `generation`'s tables, each a `CREATE INDEX IF NOT EXISTS`.
    /// A live generation gets them with its tables; a rebuild builds them once, when its
    /// new generation has caught up, which is cheaper than keeping them up to date row by
    /// row while it fills.
    fn indexes(&self, _generation: i32) -> Vec<String> {
        Vec::new()
    }
    /// Applies a batch of events, in log order per partition, to the tables of `generation`.
    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error>;
}

/// The name of `table` in `generation`.
pub fn table(table: &str, generation: i32) -> String {
    format!("{table}_g{generation}")
}

/// Builds the secondary indexes of `projection`'s `generation`.
pub async fn create_indexes(
    db: &mut PgConnection,
    projection: &dyn Projection,
    generation: i32,
) -> Result<(), sqlx::Error> {
    for statement in projection.indexes(generation) {
        sqlx::query(&statement).execute(&mut *db).await?;
    }
    Ok(())
}

/// Runs a script of statements separated by `;` (no `;` inside them), one by one.
pub async fn execute_script(db: &mut PgConnection, script: &str) -> Result<(), sqlx::Error> {
    for statement in script.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sqlx::query(statement).execute(&mut *db).await?;
    }
    Ok(())
}
