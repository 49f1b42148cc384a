//! Dead letters: a record that cannot be decoded or applied is never dropped silently. It
//! is kept with the error and its raw bytes, in the transaction that moves past it (or in
//! the one that stops the projection on it).
//!
//! By default ([`OnError::Park`](crate::OnError::Park)) such a record parks its stream:
//! the stream's later records are kept here too, in order and unapplied, while the
//! partition's other streams flow on ([`Parked`]). An operator retries the stream once the
//! code is fixed, or discards its records with a reason ([`Request`]).

use keel_kafka::LogEntry;
use keel_schemas::{StreamRef, TopicPartition};
use sqlx::{PgConnection, PgPool};

/// What became of a dead letter when it was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    /// The projection stopped on it.
    Stopped,
    /// The projection went on past it without it.
    Skipped,
    /// Held back with its stream.
    Parked,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Stopped => "stopped",
            Status::Skipped => "skipped",
            Status::Parked => "parked",
        }
    }
}

/// A record that could not be decoded or applied (or that its parked stream holds back),
/// and why.
pub(crate) struct DeadLetter {
    /// The record as read.
    pub(crate) entry: LogEntry,
    /// Why it failed.
    pub(crate) error: String,
    /// Its stream, when it names one.
    pub(crate) stream: Option<StreamRef>,
    /// What became of it.
    pub(crate) status: Status,
    /// Whether the partition gate took it (a record that cannot be read as one is not).
    pub(crate) gate_admitted: bool,
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

/// A stream a generation holds back, as its partition's applier keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Parked {
    /// The oldest record still held back.
    pub(crate) first_offset: i64,
    /// The newest.
    pub(crate) last_offset: i64,
    /// Records held back.
    pub(crate) records: i32,
    /// Why the stream is parked: the first record's error.
    pub(crate) error: String,
    /// Moved by the batch being applied (saved with it).
    pub(crate) dirty: bool,
}

impl Parked {
    /// A stream parked on the record at `offset`, which failed with `error`.
    pub(crate) fn new(offset: i64, error: String) -> Self {
        Self {
            first_offset: offset,
            last_offset: offset,
            records: 1,
            error,
            dirty: true,
        }
    }

    /// Holds back one more record, at `offset`.
    pub(crate) fn hold(&mut self, offset: i64) {
        self.last_offset = offset;
        self.records += 1;
        self.dirty = true;
    }
}

/// Records `dead` for `generation` of `projection` in `tx`.
pub(crate) async fn record(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
    dead: &[DeadLetter],
) -> Result<(), sqlx::Error> {
    for d in dead {
        sqlx::query(
            r#"INSERT INTO keel_dead_letters (projection, generation, topic, partition, "offset", error, key, payload,
                   skipped, status, stream_type, stream_id, gate_admitted)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
               ON CONFLICT (projection, generation, topic, partition, "offset")
               DO UPDATE SET error = EXCLUDED.error, skipped = EXCLUDED.skipped, status = EXCLUDED.status,
                   stream_type = EXCLUDED.stream_type, stream_id = EXCLUDED.stream_id"#,
        )
        .bind(projection)
        .bind(generation)
        .bind(&d.entry.topic)
        .bind(d.entry.partition)
        .bind(d.entry.offset)
        .bind(&d.error)
        .bind(&d.entry.key)
        .bind(&d.entry.payload)
        .bind(d.status != Status::Stopped)
        .bind(d.status.as_str())
        .bind(d.stream.as_ref().map(|s| s.stream_type.as_str()))
        .bind(d.stream.as_ref().map(|s| s.id.as_str()))
        .bind(d.gate_admitted)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Saves the parked streams of partition `at` that the batch moved, in its transaction.
pub(crate) async fn save_parked<'a>(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
    at: &TopicPartition,
    parked: impl Iterator<Item = (&'a StreamRef, &'a Parked)>,
) -> Result<(), sqlx::Error> {
    for (stream, p) in parked.filter(|(_, p)| p.dirty) {
        sqlx::query(
            "INSERT INTO keel_parked_streams (projection, generation, topic, partition, stream_type, stream_id,
                 first_offset, last_offset, records, error)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (projection, generation, stream_type, stream_id) DO UPDATE SET
                 first_offset = EXCLUDED.first_offset, last_offset = EXCLUDED.last_offset,
                 records = EXCLUDED.records, error = EXCLUDED.error, updated_at = now()",
        )
        .bind(projection)
        .bind(generation)
        .bind(&at.topic)
        .bind(at.partition)
        .bind(&stream.stream_type)
        .bind(&stream.id)
        .bind(p.first_offset)
        .bind(p.last_offset)
        .bind(p.records)
        .bind(&p.error)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// The streams `generation` of `projection` holds back in partition `at`.
pub(crate) async fn load_parked(
    pool: &PgPool,
    projection: &str,
    generation: i32,
) -> Result<Vec<(TopicPartition, StreamRef, Parked)>, sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        topic: String,
        partition: i32,
        stream_type: String,
        stream_id: String,
        first_offset: i64,
        last_offset: i64,
        records: i32,
        error: String,
    }
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT topic, partition, stream_type, stream_id, first_offset, last_offset, records, error
         FROM keel_parked_streams WHERE projection = $1 AND generation = $2",
    )
    .bind(projection)
    .bind(generation)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                TopicPartition::new(r.topic, r.partition),
                StreamRef {
                    stream_type: r.stream_type,
                    id: r.stream_id,
                },
                Parked {
                    first_offset: r.first_offset,
                    last_offset: r.last_offset,
                    records: r.records,
                    error: r.error,
                    dirty: false,
                },
            )
        })
        .collect())
}

/// Forgets `generation`'s dead letters, parked streams and requests, in `tx`.
pub(crate) async fn discard(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
) -> Result<(), sqlx::Error> {
    for table in [
        "keel_dead_letters",
        "keel_parked_streams",
        "keel_stream_requests",
    ] {
        sqlx::query(&format!(
            "DELETE FROM {table} WHERE projection = $1 AND generation = $2"
        ))
        .bind(projection)
        .bind(generation)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// What an operator asks of a parked stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply its held-back records again, in order, with the code running now.
    Retry,
    /// Drop its held-back records from the view, with a reason.
    Discard,
}

impl Action {
    /// As `keel_stream_requests.action` holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Discard => "discard",
        }
    }
}

/// A request on a parked stream, waiting for the process that holds its unit.
#[derive(Clone, Debug)]
pub(crate) struct Request {
    pub(crate) id: i64,
    pub(crate) at: TopicPartition,
    pub(crate) stream: StreamRef,
    pub(crate) action: Action,
    pub(crate) reason: Option<String>,
    pub(crate) actor: String,
}

/// The requests waiting on the parked streams of `partitions` of `generation`, oldest
/// first.
pub(crate) async fn pending(
    pool: &PgPool,
    projection: &str,
    generation: i32,
    partitions: &[TopicPartition],
) -> Result<Vec<Request>, sqlx::Error> {
    type Row = (
        i64,
        String,
        i32,
        String,
        String,
        String,
        Option<String>,
        String,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, topic, partition, stream_type, stream_id, action, reason, actor
         FROM keel_stream_requests
         WHERE projection = $1 AND generation = $2 AND done_at IS NULL
           AND (topic, partition) IN (SELECT * FROM UNNEST($3::text[], $4::int[]))
         ORDER BY id",
    )
    .bind(projection)
    .bind(generation)
    .bind(
        partitions
            .iter()
            .map(|p| p.topic.clone())
            .collect::<Vec<_>>(),
    )
    .bind(partitions.iter().map(|p| p.partition).collect::<Vec<_>>())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, topic, partition, stream_type, stream_id, action, reason, actor)| Request {
                id,
                at: TopicPartition::new(topic, partition),
                stream: StreamRef {
                    stream_type,
                    id: stream_id,
                },
                action: if action == "discard" {
                    Action::Discard
                } else {
                    Action::Retry
                },
                reason,
                actor,
            },
        )
        .collect())
}

/// The records `stream` holds back in `generation`, in log order, as they were read, with
/// whether the gate took each: the first `limit`, and whether it holds back more.
pub(crate) async fn held_back(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
    at: &TopicPartition,
    stream: &StreamRef,
    limit: i64,
) -> Result<(Vec<(LogEntry, bool)>, bool), sqlx::Error> {
    #[derive(sqlx::FromRow)]
    struct Row {
        offset: i64,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        gate_admitted: bool,
    }
    let mut rows: Vec<Row> = sqlx::query_as(
        r#"SELECT "offset", key, payload, gate_admitted FROM keel_dead_letters
           WHERE projection = $1 AND generation = $2 AND topic = $3 AND partition = $4
             AND stream_type = $5 AND stream_id = $6 AND status = 'parked'
           ORDER BY "offset" LIMIT $7"#,
    )
    .bind(projection)
    .bind(generation)
    .bind(&at.topic)
    .bind(at.partition)
    .bind(&stream.stream_type)
    .bind(&stream.id)
    .bind(limit + 1)
    .fetch_all(&mut *tx)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let records = rows
        .into_iter()
        .map(|r| {
            (
                LogEntry {
                    topic: at.topic.clone(),
                    partition: at.partition,
                    offset: r.offset,
                    key: r.key,
                    payload: r.payload,
                    headers: Vec::new(),
                    timestamp_ms: None,
                },
                r.gate_admitted,
            )
        })
        .collect();
    Ok((records, more))
}

/// Sets `stream`'s row in `keel_parked_streams` from the records it still holds back (its
/// error replaced by `error` when given), or deletes it when none are left; what it holds
/// back now.
pub(crate) async fn reckon_parked(
    tx: &mut PgConnection,
    projection: &str,
    generation: i32,
    at: &TopicPartition,
    stream: &StreamRef,
    error: Option<&str>,
) -> Result<Option<Parked>, sqlx::Error> {
    let (first, last, records): (Option<i64>, Option<i64>, i64) = sqlx::query_as(
        r#"SELECT min("offset"), max("offset"), count(*) FROM keel_dead_letters
           WHERE projection = $1 AND generation = $2 AND topic = $3 AND partition = $4
             AND stream_type = $5 AND stream_id = $6 AND status = 'parked'"#,
    )
    .bind(projection)
    .bind(generation)
    .bind(&at.topic)
    .bind(at.partition)
    .bind(&stream.stream_type)
    .bind(&stream.id)
    .fetch_one(&mut *tx)
    .await?;
    let (Some(first_offset), Some(last_offset)) = (first, last) else {
        sqlx::query(
            "DELETE FROM keel_parked_streams WHERE projection = $1 AND generation = $2
             AND stream_type = $3 AND stream_id = $4",
        )
        .bind(projection)
        .bind(generation)
        .bind(&stream.stream_type)
        .bind(&stream.id)
        .execute(&mut *tx)
        .await?;
        return Ok(None);
    };
    let records = i32::try_from(records).unwrap_or(i32::MAX);
    let error: Option<String> = sqlx::query_scalar(
        "UPDATE keel_parked_streams SET first_offset = $5, last_offset = $6, records = $7,
             error = COALESCE($8, error), updated_at = now()
         WHERE projection = $1 AND generation = $2 AND stream_type = $3 AND stream_id = $4
         RETURNING error",
    )
    .bind(projection)
    .bind(generation)
    .bind(&stream.stream_type)
    .bind(&stream.id)
    .bind(first_offset)
    .bind(last_offset)
    .bind(records)
    .bind(error)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(Some(Parked {
        first_offset,
        last_offset,
        records,
        error: error.unwrap_or_default(),
        dirty: false,
    }))
}
