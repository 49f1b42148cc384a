//! A partition log in memory, for tests that run the owner without a broker. Every handle
//! of one log sees the same records; each reads from its own position, so several owners
//! (a zombie and its successor, say) can share one partition.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use keel_kafka::{KafkaError, LogEntry, record_headers};
use keel_schemas::LogRecord;
use tokio::sync::watch;

use super::log::{Append, PartitionLog};
use super::snapshot::StoredSnapshot;

struct Shared {
    topic: String,
    partition: i32,
    records: Mutex<Vec<LogEntry>>,
    /// Each append call, in order.
    appends: Mutex<Vec<Appended>>,
    /// The number of records, so readers can wait for more.
    len: watch::Sender<usize>,
    /// Offsets whose next read fails, and how many times.
    failing_reads: Mutex<Vec<(i64, usize)>>,
    /// The snapshots written, in order.
    snapshots: Mutex<Vec<StoredSnapshot>>,
    /// The first commit of the next flush reaches the log with a broken hash.
    garble_next: std::sync::atomic::AtomicBool,
    /// How many times a handle was asked where the log ends.
    ends_read: std::sync::atomic::AtomicUsize,
}

/// One partition's records in memory, and a reader's position in them.
pub struct MemoryLog {
    shared: Arc<Shared>,
    next_offset: i64,
}

impl MemoryLog {
    /// An empty partition `topic`/`partition`.
    pub fn new(topic: &str, partition: i32) -> Self {
        Self {
            shared: Arc::new(Shared {
                topic: topic.to_owned(),
                partition,
                records: Mutex::new(Vec::new()),
                appends: Mutex::new(Vec::new()),
                len: watch::Sender::new(0),
                failing_reads: Mutex::new(Vec::new()),
                snapshots: Mutex::new(Vec::new()),
                garble_next: std::sync::atomic::AtomicBool::new(false),
                ends_read: std::sync::atomic::AtomicUsize::new(0),
            }),
            next_offset: 0,
        }
    }

    /// Another handle of the same partition, reading from offset 0.
    pub fn handle(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            next_offset: 0,
        }
    }

    /// Makes the next `times` reads of `offset`, by any handle, fail as a broken fetch.
    pub fn fail_reads_at(&self, offset: i64, times: usize) {
        lock(&self.shared.failing_reads).push((offset, times));
    }

    /// Makes the first commit of the next flush appended, by any handle, reach the log
    /// with a broken hash (a record damaged on its way): the gate refuses it.
    pub fn garble_next_flush(&self) {
        self.shared
            .garble_next
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many times any handle was asked where the log ends.
    pub fn ends_read(&self) -> usize {
        self.shared
            .ends_read
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every record appended so far, in order.
    pub fn entries(&self) -> Vec<LogEntry> {
        self.records().clone()
    }

    /// The snapshots written so far, in order.
    pub fn snapshots(&self) -> Vec<StoredSnapshot> {
        lock(&self.shared.snapshots).clone()
    }

    /// Changes the latest snapshot with `change` (to tamper with it, or cut it short).
    pub fn change_latest_snapshot(&self, change: impl FnOnce(&mut StoredSnapshot)) {
        if let Some(latest) = lock(&self.shared.snapshots).last_mut() {
            change(latest);
        }
    }

    /// Each append so far, in order.
    pub fn appends(&self) -> Vec<Appended> {
        lock(&self.shared.appends).clone()
    }

    fn records(&self) -> MutexGuard<'_, Vec<LogEntry>> {
        lock(&self.shared.records)
    }

    /// Appends `records` at the end, waking the readers.
    pub(super) fn push(&self, records: &[Append<'_>]) -> Vec<Result<i64, KafkaError>> {
        let mut log = self.records();
        let offsets = records
            .iter()
            .map(|(key, record, traceparent)| {
                let offset = log.len() as i64;
                log.push(LogEntry {
                    topic: self.shared.topic.clone(),
                    partition: self.shared.partition,
                    offset,
                    key: Some(key.as_bytes().to_vec()),
                    payload: record.encode(),
                    headers: record_headers(record, *traceparent)
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v.into_bytes()))
                        .collect(),
                    timestamp_ms: None,
                });
                Ok(offset)
            })
            .collect();
        self.shared.len.send_replace(log.len());
        offsets
    }
}

/// One append to a [`MemoryLog`], as the owner made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// One record on its own ([`PartitionLog::append_one`]: a fence).
    One,
    /// Records appended together ([`PartitionLog::append`]: a flush), and how many.
    Together(usize),
}

/// A test that panicked while holding a lock has failed already: its data is still good.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PartitionLog for MemoryLog {
    fn topic(&self) -> &str {
        &self.shared.topic
    }

    fn partition(&self) -> i32 {
        self.shared.partition
    }

    fn next_offset(&self) -> i64 {
        self.next_offset
    }

    async fn end(&self) -> Result<i64, KafkaError> {
        self.shared
            .ends_read
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self.records().len() as i64)
    }

    async fn next(&mut self) -> Result<LogEntry, KafkaError> {
        let mut len = self.shared.len.subscribe();
        let wanted = self.next_offset as usize;
        len.wait_for(|len| *len > wanted)
            .await
            .map_err(|_| KafkaError::Reader("the log is gone".into()))?;
        if let Some((_, times)) = lock(&self.shared.failing_reads)
            .iter_mut()
            .find(|(offset, times)| *offset == self.next_offset && *times > 0)
        {
            *times -= 1;
            return Err(KafkaError::Reader("the fetch failed (injected)".into()));
        }
        let entry = self.records()[wanted].clone();
        self.next_offset += 1;
        Ok(entry)
    }

    fn append(
        &self,
        records: &[Append<'_>],
    ) -> impl std::future::Future<Output = Vec<Result<i64, KafkaError>>> + Send + 'static {
        lock(&self.shared.appends).push(Appended::Together(records.len()));
        let garble = self
            .shared
            .garble_next
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let garbled = match records.first() {
            Some((key, LogRecord::Commit(commit), traceparent)) if garble => {
                let mut commit = commit.clone();
                commit.hash = "0".repeat(64);
                Some((*key, LogRecord::Commit(commit), *traceparent))
            }
            _ => None,
        };
        let Some((key, first, traceparent)) = &garbled else {
            return std::future::ready(self.push(records));
        };
        let mut records = records.to_vec();
        records[0] = (key, first, *traceparent);
        std::future::ready(self.push(&records))
    }

    async fn append_one(&self, record: Append<'_>) -> Result<i64, KafkaError> {
        lock(&self.shared.appends).push(Appended::One);
        self.push(&[record])
            .pop()
            .unwrap_or_else(|| Err(KafkaError::NotSent("nothing was appended".into())))
    }

    async fn latest_snapshot(&self) -> Result<Option<StoredSnapshot>, KafkaError> {
        Ok(lock(&self.shared.snapshots).last().cloned())
    }

    fn write_snapshot(
        &self,
        snapshot: StoredSnapshot,
        _key_set: u64,
    ) -> impl std::future::Future<Output = Result<(), KafkaError>> + Send + 'static {
        lock(&self.shared.snapshots).push(snapshot);
        std::future::ready(Ok(()))
    }

    fn seek(&mut self, offset: i64) {
        self.next_offset = offset;
    }
}
