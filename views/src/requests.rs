//! What operators ask the projector processes to do, recorded in PostgreSQL: rebuild a
//! projection, retry or discard a parked stream, verify one stream against the log. The
//! projector's command line and the query API's admin routes record requests here with
//! their actor; a running `projector run` process carries each out and records its
//! outcome. The query API never reads Kafka: these rows are how it asks for work that does.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgRow;

/// A kind of request, kept in a table of its own.
pub trait Request: Serialize + for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin {
    /// What it asks for, as a word: `rebuild`, `stream`, `verify`.
    const KIND: &'static str;
    /// Its table.
    const TABLE: &'static str;
    /// The columns it is read from.
    const COLUMNS: &'static str;
    /// `waiting`, `running`, `done` or `failed`.
    fn state(&self) -> &'static str;
}

/// The request `id` of kind `R`, if there is one.
pub async fn request<R: Request>(pool: &PgPool, id: i64) -> Result<Option<R>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {} FROM {} WHERE id = $1",
        R::COLUMNS,
        R::TABLE
    ))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// Where a request stands.
fn state(taken: bool, done: bool, ok: Option<bool>) -> &'static str {
    match (done, ok) {
        (true, Some(true)) => "done",
        (true, _) => "failed",
        (false, _) if taken => "running",
        (false, _) => "waiting",
    }
}

/// A request to rebuild a projection blue/green.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct RebuildRequest {
    /// Its id.
    pub id: i64,
    /// The projection.
    pub projection: String,
    /// Whether the replaced generation's tables are kept after the swap.
    pub keep_old: bool,
    /// The live generation when it was asked for: the one the rebuild replaces.
    pub generation: Option<i32>,
    /// Who asked.
    pub actor: String,
    /// When.
    pub requested_at: DateTime<Utc>,
    /// When a process took it.
    pub taken_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub done_at: Option<DateTime<Utc>>,
    /// Whether it succeeded, once done.
    pub ok: Option<bool>,
    /// What came of it, once done.
    pub outcome: Option<String>,
}

/// A rebuild request as recorded: a new one, or the one already waiting for the same
/// projection and generation (asking twice rebuilds once).
#[derive(Clone, Debug)]
pub struct RebuildAsked {
    /// The request.
    pub request: RebuildRequest,
    /// False when it was already waiting.
    pub created: bool,
}

const REBUILD_COLUMNS: &str =
    "id, projection, keep_old, generation, actor, requested_at, taken_at, done_at, ok, outcome";

/// Records a request by `actor` to rebuild `projection`, replacing its live generation
/// (generation 1 for a projection never run yet); or returns the request already waiting to
/// replace that generation, which a second request would only repeat.
pub async fn rebuild(
    pool: &PgPool,
    projection: &str,
    keep_old: bool,
    actor: &str,
) -> Result<RebuildAsked, sqlx::Error> {
    // A request committed by another caller between the insert's conflict check and the
    // read of the waiting one is seen by the next attempt's snapshot.
    for _ in 0..5 {
        let created: Option<RebuildRequest> = sqlx::query_as(&format!(
            "INSERT INTO keel_rebuild_requests (projection, keep_old, actor, generation)
             VALUES ($1, $2, $3, coalesce((SELECT generation FROM keel_projections WHERE name = $1), 1))
             ON CONFLICT (projection, generation) WHERE done_at IS NULL DO NOTHING
             RETURNING {REBUILD_COLUMNS}"
        ))
        .bind(projection)
        .bind(keep_old)
        .bind(actor)
        .fetch_optional(pool)
        .await?;
        if let Some(request) = created {
            return Ok(RebuildAsked {
                request,
                created: true,
            });
        }
        let waiting: Option<RebuildRequest> = sqlx::query_as(&format!(
            "SELECT {REBUILD_COLUMNS} FROM keel_rebuild_requests
             WHERE projection = $1 AND done_at IS NULL
               AND generation = coalesce((SELECT generation FROM keel_projections WHERE name = $1), 1)"
        ))
        .bind(projection)
        .fetch_optional(pool)
        .await?;
        if let Some(request) = waiting {
            return Ok(RebuildAsked {
                request,
                created: false,
            });
        }
    }
    Err(sqlx::Error::Protocol(format!(
        "a rebuild request for {projection} kept appearing and ending while it was recorded"
    )))
}

impl Request for RebuildRequest {
    const KIND: &'static str = "rebuild";
    const TABLE: &'static str = "keel_rebuild_requests";
    const COLUMNS: &'static str = REBUILD_COLUMNS;
    fn state(&self) -> &'static str {
        state(self.taken_at.is_some(), self.done_at.is_some(), self.ok)
    }
}

/// A request to retry or discard a parked stream.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct StreamRequest {
    /// Its id.
    pub id: i64,
    /// The projection.
    pub projection: String,
    /// The generation whose parked stream it is.
    pub generation: i32,
    /// The stream's topic.
    pub topic: String,
    /// The stream's partition.
    pub partition: i32,
    /// The stream's type.
    pub stream_type: String,
    /// The stream's id.
    pub stream_id: String,
    /// `retry` or `discard`.
    pub action: String,
    /// Why its records are discarded (a discard's).
    pub reason: Option<String>,
    /// Who asked.
    pub actor: String,
    /// When.
    pub requested_at: DateTime<Utc>,
    /// When it ended.
    pub done_at: Option<DateTime<Utc>>,
    /// Records applied or discarded so far.
    pub settled: i32,
    /// Whether it did all it asked, once done.
    pub ok: Option<bool>,
    /// What came of it, once done.
    pub outcome: Option<String>,
}

const STREAM_COLUMNS: &str = "id, projection, generation, topic, partition, stream_type, stream_id, action, reason, actor, requested_at, done_at, settled, ok, outcome";

/// Records a request by `actor` to `action` (`retry` or `discard`, with a `reason`) the
/// stream `stream_type`/`stream_id` that `projection`'s live generation holds back; `None`
/// when it holds back no such stream.
pub async fn stream(
    pool: &PgPool,
    projection: &str,
    (stream_type, stream_id): (&str, &str),
    action: &str,
    reason: Option<&str>,
    actor: &str,
) -> Result<Option<StreamRequest>, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO keel_stream_requests (projection, generation, topic, partition, stream_type, stream_id,
             action, reason, actor)
         SELECT s.projection, s.generation, s.topic, s.partition, s.stream_type, s.stream_id, $4, $5, $6
         FROM keel_parked_streams s JOIN keel_projections p ON p.name = s.projection AND p.generation = s.generation
         WHERE s.projection = $1 AND s.stream_type = $2 AND s.stream_id = $3
         RETURNING {STREAM_COLUMNS}"
    ))
    .bind(projection)
    .bind(stream_type)
    .bind(stream_id)
    .bind(action)
    .bind(reason)
    .bind(actor)
    .fetch_optional(pool)
    .await
}

impl Request for StreamRequest {
    const KIND: &'static str = "stream";
    const TABLE: &'static str = "keel_stream_requests";
    const COLUMNS: &'static str = STREAM_COLUMNS;
    /// `waiting` until the process holding its partition carries it out (`running` once it
    /// has settled some records), then `done` or `failed`.
    fn state(&self) -> &'static str {
        state(self.settled > 0, self.done_at.is_some(), self.ok)
    }
}

/// A request to verify one stream against the log: its chain, versions, hashes and
/// signatures, and that the topic still holds every commit the audit log has seen.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct VerifyRequest {
    /// Its id.
    pub id: i64,
    /// The stream's type.
    pub stream_type: String,
    /// The stream's id.
    pub stream_id: String,
    /// Who asked.
    pub actor: String,
    /// When.
    pub requested_at: DateTime<Utc>,
    /// When a process took it.
    pub taken_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub done_at: Option<DateTime<Utc>>,
    /// Whether the stream verified (no violation), once done.
    pub ok: Option<bool>,
    /// A summary, or why it could not be run.
    pub outcome: Option<String>,
    /// The report, as `projector verify --json` prints it.
    pub report: Option<sqlx::types::Json<serde_json::Value>>,
}

const VERIFY_COLUMNS: &str =
    "id, stream_type, stream_id, actor, requested_at, taken_at, done_at, ok, outcome, report";

/// Records a request by `actor` to verify `stream_type`/`stream_id`.
pub async fn verify(
    pool: &PgPool,
    (stream_type, stream_id): (&str, &str),
    actor: &str,
) -> Result<VerifyRequest, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO keel_verify_requests (stream_type, stream_id, actor) VALUES ($1, $2, $3)
         RETURNING {VERIFY_COLUMNS}"
    ))
    .bind(stream_type)
    .bind(stream_id)
    .bind(actor)
    .fetch_one(pool)
    .await
}

impl Request for VerifyRequest {
    const KIND: &'static str = "verify";
    const TABLE: &'static str = "keel_verify_requests";
    const COLUMNS: &'static str = VERIFY_COLUMNS;
    /// `done` when the stream verified; `failed` for a violation, or when it could not be
    /// run (`outcome` says which).
    fn state(&self) -> &'static str {
        state(self.taken_at.is_some(), self.done_at.is_some(), self.ok)
    }
}
