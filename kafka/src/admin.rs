use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::info;

use crate::{KafkaError, KafkaSettings};

/// Creates the topics of `stream_types` when missing (`KEEL_PARTITIONS` partitions,
/// infinite retention, `cleanup.policy=delete`) and checks that existing ones have the
/// configured partition count. Safe to call when the topics exist, and from several
/// processes at once.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    stream_types: &[&str],
) -> Result<Vec<String>, KafkaError> {
    let topics: Vec<String> = stream_types.iter().map(|t| settings.topic(t)).collect();
    create(
        settings,
        topics,
        &[("retention.ms", "-1"), ("cleanup.policy", "delete")],
    )
    .await
}

/// Creates the topics of `stream_types`' partition snapshots when missing
/// (`<prefix>.<aggregate>.snapshots`, as many partitions as the events' topics,
/// `cleanup.policy=compact`: the newest snapshot of each partition is kept, the ones before
/// it go), and checks existing ones as [`ensure_topics`] does.
pub async fn ensure_snapshot_topics(
    settings: &KafkaSettings,
    stream_types: &[&str],
) -> Result<Vec<String>, KafkaError> {
    let topics: Vec<String> = stream_types
        .iter()
        .map(|t| settings.snapshot_topic(t))
        .collect();
    create(settings, topics, &[("cleanup.policy", "compact")]).await
}

async fn create(
    settings: &KafkaSettings,
    topics: Vec<String>,
    config: &[(&str, &str)],
) -> Result<Vec<String>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings
        .client_config()
        .create()
        .map_err(KafkaError::client("creating the admin client"))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            config.iter().fold(
                NewTopic::new(
                    name,
                    settings.partitions,
                    TopicReplication::Fixed(settings.replication_factor),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(settings.timeout));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(KafkaError::client("creating topics"))?;
    for result in results {
        match result {
            Ok(topic) => info!(%topic, partitions = settings.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::Client {
                    context: format!("creating topic {topic}"),
                    source: rdkafka::error::KafkaError::AdminOp(code),
                });
            }
        }
    }
    let settings = settings.clone();
    let check = topics.clone();
    tokio::task::spawn_blocking(move || wait_for_partitions(&settings, &check))
        .await
        .map_err(|e| KafkaError::Timeout(format!("checking topics: {e}")))??;
    Ok(topics)
}

/// Waits until the metadata shows every topic, then checks its partition count.
fn wait_for_partitions(settings: &KafkaSettings, topics: &[String]) -> Result<(), KafkaError> {
    let consumer: BaseConsumer = settings
        .client_config()
        .create()
        .map_err(KafkaError::client("creating a metadata client"))?;
    let deadline = Instant::now() + settings.timeout;
    for topic in topics {
        loop {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(5))
                .map_err(KafkaError::client(format!(
                    "reading the metadata of {topic}"
                )))?;
            let found = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic && t.error().is_none())
                .map(|t| t.partitions().len() as i32)
                .filter(|&n| n > 0);
            match found {
                Some(actual) if actual == settings.partitions => break,
                Some(actual) => {
                    return Err(KafkaError::PartitionCountMismatch {
                        topic: topic.clone(),
                        expected: settings.partitions,
                        actual,
                    });
                }
                None if Instant::now() > deadline => {
                    return Err(KafkaError::Timeout(format!(
                        "topic {topic} did not appear in the metadata"
                    )));
                }
                None => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
    Ok(())
}
