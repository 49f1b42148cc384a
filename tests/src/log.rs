use std::sync::Arc;

use keel_kafka::{KafkaSettings, read_through_gate};
use keel_schemas::{CommitRecord, LogRecord, ReceiptRecord, TrustedKeys};

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

/// Reads every partition of `topic` to its end through the gate with the key policy
/// `policy`, as any reader would,
/// and returns the accepted commits and the number of records skipped.
pub async fn read_accepted(
    settings: &KafkaSettings,
    policy: &Arc<TrustedKeys>,
    topic: &str,
) -> anyhow::Result<(Vec<AcceptedCommit>, u64)> {
    let mut accepted = Vec::new();
    let mut skipped = 0;
    let mut unreadable = None;
    let partitions: Vec<i32> = (0..settings.partitions).collect();
    read_through_gate(settings, policy, topic, &partitions, |read| {
        match read.record {
            Err(e) => unreadable = Some(format!("offset {}: {e}", read.entry.offset)),
            Ok((_, Err(_))) => skipped += 1,
            Ok((LogRecord::Commit(commit), Ok(()))) => accepted.push(AcceptedCommit {
                partition: read.entry.partition,
                offset: read.entry.offset,
                commit,
            }),
            Ok((LogRecord::Fence(_) | LogRecord::Receipt(_), Ok(()))) => {}
        }
    })
    .await?;
    if let Some(e) = unreadable {
        anyhow::bail!("{topic} holds a record that is not a Keel record at {e}");
    }
    // In log order per partition, partitions one after the other, as callers expect.
    accepted.sort_by_key(|c| (c.partition, c.offset));
    Ok((accepted, skipped))
}

/// Reads every partition of `topic` to its end through the gate with the key policy
/// `policy`, and returns the receipts it accepted, each with its partition and offset.
pub async fn read_receipts(
    settings: &KafkaSettings,
    policy: &Arc<TrustedKeys>,
    topic: &str,
) -> anyhow::Result<Vec<(i32, i64, ReceiptRecord)>> {
    let mut receipts = Vec::new();
    let partitions: Vec<i32> = (0..settings.partitions).collect();
    read_through_gate(settings, policy, topic, &partitions, |read| {
        if let Ok((LogRecord::Receipt(receipt), Ok(()))) = read.record {
            receipts.push((read.entry.partition, read.entry.offset, receipt));
        }
    })
    .await?;
    receipts.sort_by_key(|(partition, offset, _)| (*partition, *offset));
    Ok(receipts)
}
