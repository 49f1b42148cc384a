//! `projector status`: the read contract's status of every projection, with each
//! partition's end and lag asked of the broker.

use std::collections::HashMap;

use keel_kafka::{KafkaSettings, end_offsets};
use keel_schemas::TopicPartition;
use keel_views::status::ProjectionStatus;
use sqlx::PgPool;

/// Every projection's status; with `kafka`, also each partition's end and lag.
pub async fn read(
    pool: &PgPool,
    kafka: Option<&KafkaSettings>,
) -> anyhow::Result<Vec<ProjectionStatus>> {
    let mut statuses = keel_views::status::read(pool).await?;
    if let Some(kafka) = kafka {
        let mut wanted: Vec<TopicPartition> = statuses
            .iter()
            .flat_map(ProjectionStatus::topic_partitions)
            .collect();
        wanted.sort();
        wanted.dedup();
        let ends: HashMap<TopicPartition, i64> =
            end_offsets(kafka, &wanted).await?.into_iter().collect();
        for status in &mut statuses {
            status.measure_lag(&ends);
        }
    }
    Ok(statuses)
}
