//! Reading a partition through the gate: the one way the partition owner, `verify`,
//! `export` and the tests see the log. Each record comes with what its bytes decode to
//! and the gate's verdict; the gate moves on here.
//!
//! The projector decodes records (and their events) ahead of the gate, off its apply
//! path, and puts the decoded records through the same [`PartitionGate`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_schemas::{
    CommitCheck, CommitRecord, LogRecord, SchemaError, TopicPartition, TrustedKeys, Writer,
};

use crate::gate::{PartitionGate, Rejection};
use crate::reader::{LogEntry, LogReader};
use crate::{KafkaError, KafkaSettings};

/// The gate's verdict on a record: it counts, or why it was skipped.
pub type Verdict = Result<(), Rejection>;

/// One record of a partition as every reader sees it.
#[derive(Debug)]
pub struct Gated {
    /// The record as read.
    pub entry: LogEntry,
    /// What it decodes to, with the gate's verdict; or why it is not a Keel record (the
    /// gate leaves such a record out, and its state as it was).
    pub record: Result<(LogRecord, Verdict), SchemaError>,
    /// For a record the gate skipped, the partition's owner there (a skipped record leaves
    /// it as it was); `None` for a record that counted or did not decode. Cloned only for
    /// skipped records, which are rare: reading is a hot path.
    pub owner_if_skipped: Option<Writer>,
    /// The record counted under a legacy fence (a log written before the gate checked
    /// signatures, let count by the key policy's cut-off).
    pub legacy: bool,
}

impl Gated {
    /// The record, when the gate accepted it.
    pub fn accepted(&self) -> Option<&LogRecord> {
        match &self.record {
            Ok((record, Ok(()))) => Some(record),
            _ => None,
        }
    }
}

impl PartitionGate {
    /// Decodes the next record of the partition and puts it through the gate.
    pub fn read(&mut self, entry: LogEntry) -> Gated {
        let record = LogRecord::decode(&entry.payload);
        self.read_decoded(entry, record, None)
    }

    /// [`PartitionGate::read`] for a record decoded already, with its commit's hash and
    /// signature checked already when `check` is given (see
    /// [`PartitionGate::admit_commit_checked`]).
    pub fn read_decoded(
        &mut self,
        entry: LogEntry,
        record: Result<LogRecord, SchemaError>,
        check: Option<&CommitCheck>,
    ) -> Gated {
        let record = record.map(|record| {
            let verdict = match &record {
                LogRecord::Fence(fence) => self.admit_fence(fence),
                LogRecord::Commit(commit) => self.admit_commit_checked(commit, check),
                LogRecord::Receipt(receipt) => self.admit_receipt(receipt),
            };
            (record, verdict)
        });
        let owner_if_skipped = match &record {
            Ok((_, Err(_))) => self.owner().cloned(),
            _ => None,
        };
        let legacy = matches!(&record, Ok((_, Ok(())))) && self.owner_key().is_none();
        Gated {
            entry,
            record,
            owner_if_skipped,
            legacy,
        }
    }
}

/// A record read and decoded, with its commit's hash and signature checked ahead of the
/// gate (`None` for anything but a commit).
pub type Checked = (
    LogEntry,
    Result<LogRecord, SchemaError>,
    Option<CommitCheck>,
);

/// Decodes `entries` and checks their commits' hashes and signatures together (see
/// [`TrustedKeys::check_commits`]): the gate's costly work, which needs no gate state, so
/// a reader does it ahead of the gate and hands each check to
/// [`PartitionGate::read_decoded`] or [`PartitionGate::admit_commit_checked`].
pub fn check_records(entries: Vec<LogEntry>, policy: &TrustedKeys) -> Vec<Checked> {
    let records: Vec<Result<LogRecord, SchemaError>> = entries
        .iter()
        .map(|e| LogRecord::decode(&e.payload))
        .collect();
    let commits: Vec<&CommitRecord> = records
        .iter()
        .filter_map(|r| match r {
            Ok(LogRecord::Commit(c)) => Some(c),
            _ => None,
        })
        .collect();
    let mut checks = policy.check_commits(&commits).into_iter();
    entries
        .into_iter()
        .zip(records)
        .map(|(entry, record)| {
            let check = match &record {
                Ok(LogRecord::Commit(_)) => checks.next(),
                _ => None,
            };
            (entry, record, check)
        })
        .collect()
}

/// Runs `work` on the two halves of `items` on two blocking threads at once, and returns
/// its results in the order of `items`: how readers spread decoding and checking over the
/// machine's cores.
pub async fn in_two_halves<T, R>(
    mut items: Vec<T>,
    work: impl Fn(Vec<T>) -> Vec<R> + Clone + Send + 'static,
) -> Result<Vec<R>, tokio::task::JoinError>
where
    T: Send + 'static,
    R: Send + 'static,
{
    let second = items.split_off(items.len() / 2);
    let halves = [items, second].map(|half| {
        let work = work.clone();
        tokio::task::spawn_blocking(move || work(half))
    });
    let mut done = Vec::new();
    for half in halves {
        done.extend(half.await?);
    }
    Ok(done)
}

/// Reads `partitions` of `topic` from offset 0 to where each ends now, each through a gate
/// of its own applying `policy`, and calls `each` with every record in log order per partition (partitions
/// interleave).
pub async fn read_through_gate(
    settings: &KafkaSettings,
    policy: &Arc<TrustedKeys>,
    topic: &str,
    partitions: &[i32],
    mut each: impl FnMut(Gated),
) -> Result<(), KafkaError> {
    let assignment: Vec<(TopicPartition, i64)> = partitions
        .iter()
        .map(|p| (TopicPartition::new(topic, *p), 0))
        .collect();
    let reader = LogReader::open(settings, &assignment)?;
    let ends: HashMap<TopicPartition, i64> = reader.high_watermarks().await?.into_iter().collect();
    let mut next: HashMap<TopicPartition, i64> = HashMap::new();
    let mut gates: HashMap<i32, PartitionGate> = HashMap::new();
    let unfinished = |next: &HashMap<TopicPartition, i64>| {
        ends.iter()
            .any(|(at, end)| next.get(at).copied().unwrap_or(0) < *end)
    };
    let wait = Duration::from_millis(500);
    let mut idle = Duration::ZERO;
    while unfinished(&next) {
        let batch = reader
            .next_batch(10_000, wait, Duration::from_millis(10))
            .await?;
        if batch.is_empty() {
            idle += wait;
            if idle >= settings.timeout {
                return Err(KafkaError::Timeout(format!(
                    "reading {topic}: no record arrived for {}s before the partitions' ends",
                    idle.as_secs()
                )));
            }
            continue;
        }
        idle = Duration::ZERO;
        for entry in batch {
            let at = TopicPartition::new(entry.topic.clone(), entry.partition);
            if entry.offset >= ends.get(&at).copied().unwrap_or(0) {
                continue;
            }
            next.insert(at.clone(), entry.offset + 1);
            let gate = gates
                .entry(entry.partition)
                .or_insert_with(|| PartitionGate::new(Arc::clone(policy), &at));
            each(gate.read(entry));
        }
    }
    Ok(())
}
