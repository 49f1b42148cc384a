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
