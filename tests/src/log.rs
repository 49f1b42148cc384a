use keel_kafka::{KafkaSettings, PartitionGate, PartitionReader};
use keel_schemas::{CommitRecord, LogRecord};

/// A commit the gate accepted, with where it is.
#[derive(Clone, Debug)]
pub struct AcceptedCommit {
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// The commit.
    pub commit: CommitRecord,
}

/// Reads every partition of `topic` to its end through the gate, as any reader would,
/// and returns the accepted commits and the number of records skipped.
pub async fn read_accepted(
    settings: &KafkaSettings,
    topic: &str,
) -> anyhow::Result<(Vec<AcceptedCommit>, u64)> {
    let mut accepted = Vec::new();
    let mut skipped = 0;
    for partition in 0..settings.partitions {
        let mut reader = PartitionReader::open(settings, topic, partition, 0)?;
        let mut gate = PartitionGate::new();
        for entry in reader.read_to_end().await? {
            let record = LogRecord::decode(&entry.payload)?;
            if gate.admit(&record).is_err() {
                skipped += 1;
                continue;
            }
            if let LogRecord::Commit(commit) = record {
                accepted.push(AcceptedCommit {
                    partition,
                    offset: entry.offset,
                    commit,
                });
            }
        }
    }
    Ok((accepted, skipped))
}
