//! Where a projection's live generation has read to: the positions a consistency token is
//! checked against and `Keel-Projection-Position` reports.

use std::collections::HashMap;

use keel_schemas::TopicPartition;
use sqlx::PgPool;

/// The next offset of every partition the live generation of `projection` has read.
pub async fn read(
    pool: &PgPool,
    projection: &str,
) -> Result<HashMap<TopicPartition, i64>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT c.topic, c.partition, c.next_offset FROM keel_checkpoints c
         JOIN keel_projections p ON p.name = c.projection AND p.generation = c.generation
         WHERE c.projection = $1",
    )
    .bind(projection)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, next)| (TopicPartition::new(topic, partition), next))
        .collect())
}

/// Per partition, the streams the live generation of `projection` holds back: how many,
/// and the oldest record any of them holds back. Empty when none are (or when the schema
/// predates parking).
pub async fn held_back(
    pool: &PgPool,
    projection: &str,
) -> Result<HashMap<TopicPartition, HeldBack>, sqlx::Error> {
    let rows: Result<Vec<(String, i32, i64, i64)>, sqlx::Error> = sqlx::query_as(
        "SELECT s.topic, s.partition, count(*), min(s.first_offset) FROM keel_parked_streams s
         JOIN keel_projections p ON p.name = s.projection AND p.generation = s.generation
         WHERE s.projection = $1 GROUP BY 1, 2",
    )
    .bind(projection)
    .fetch_all(pool)
    .await;
    match rows {
        Ok(rows) => Ok(rows
            .into_iter()
            .map(|(topic, partition, streams, first_offset)| {
                (
                    TopicPartition::new(topic, partition),
                    HeldBack {
                        streams,
                        first_offset,
                    },
                )
            })
            .collect()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// What a partition of a view holds back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldBack {
    /// Parked streams.
    pub streams: i64,
    /// The oldest record one of them holds back.
    pub first_offset: i64,
}

/// Where the live generation of `projection` holds back the stream `stream_type`/`id`: its
/// partition and the oldest record it holds back; `None` when it flows.
pub async fn held_back_stream(
    pool: &PgPool,
    projection: &str,
    stream_type: &str,
    id: &str,
) -> Result<Option<(TopicPartition, i64)>, sqlx::Error> {
    let row: Option<(String, i32, i64)> = sqlx::query_as(
        "SELECT s.topic, s.partition, s.first_offset FROM keel_parked_streams s
         JOIN keel_projections p ON p.name = s.projection AND p.generation = s.generation
         WHERE s.projection = $1 AND s.stream_type = $2 AND s.stream_id = $3",
    )
    .bind(projection)
    .bind(stream_type)
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(topic, partition, first)| (TopicPartition::new(topic, partition), first)))
}

/// The topics the projector reads, with their partition counts, as it last recorded them;
/// empty before a projector has started (or when its schema predates the record).
pub async fn topics(pool: &PgPool) -> Result<HashMap<String, i32>, sqlx::Error> {
    let rows: Result<Vec<(String, i32)>, sqlx::Error> =
        sqlx::query_as("SELECT topic, partitions FROM keel_topics")
            .fetch_all(pool)
            .await;
    match rows {
        Ok(rows) => Ok(rows.into_iter().collect()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Ok(HashMap::new()),
        Err(e) => Err(e),
    }
}

/// Records `topics` (each with `partitions` partitions) as the ones the projector reads,
/// forgetting any other.
pub async fn record_topics(
    pool: &PgPool,
    topics: &[String],
    partitions: i32,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM keel_topics WHERE topic <> ALL($1)")
        .bind(topics)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO keel_topics (topic, partitions) SELECT t, $2 FROM UNNEST($1::text[]) AS t
         ON CONFLICT (topic) DO UPDATE SET partitions = EXCLUDED.partitions, updated_at = now()
         WHERE keel_topics.partitions <> EXCLUDED.partitions",
    )
    .bind(topics)
    .bind(partitions)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}
