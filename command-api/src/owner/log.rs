//! The partition owner's view of its log: append records, read them back in order, ask
//! where the partition ends. Nothing else of the broker reaches the owner.

use std::future::Future;

use keel_kafka::{KafkaError, KafkaSettings, LogEntry, LogProducer, PartitionReader};
use keel_schemas::{LogRecord, TopicPartition};

use super::snapshot::StoredSnapshot;

/// One record to append: its key, the record, and the trace context for its headers.
pub type Append<'a> = (&'a str, &'a LogRecord, Option<&'a str>);

/// One partition of the log, as its owner uses it.
pub trait PartitionLog: Send + 'static {
    /// The topic.
    fn topic(&self) -> &str;
    /// The partition.
    fn partition(&self) -> i32;
    /// The offset of the record [`PartitionLog::next`] returns next.
    fn next_offset(&self) -> i64;
    /// Where the partition ends now: the offset the next appended record will get.
    fn end(&self) -> impl Future<Output = Result<i64, KafkaError>> + Send;
    /// Waits for the next record.
    fn next(&mut self) -> impl Future<Output = Result<LogEntry, KafkaError>> + Send;
    /// Appends `records` (a flush) in order, together; each one's offset or why it failed.
    /// A full producer queue fails them at once, so the owner recovers instead of waiting.
    ///
    /// The records are handed to the producer when this is called, before the future is
    /// polled, and the future borrows nothing: an owner appends its next flush while this
    /// one is being read back, and records appended later follow these in the log.
    fn append(
        &self,
        records: &[Append<'_>],
    ) -> impl Future<Output = Vec<Result<i64, KafkaError>>> + Send + 'static;
    /// Appends one record (a fence): its offset, waiting for room in the producer's queue
    /// within the producer's timeout.
    fn append_one(
        &self,
        record: Append<'_>,
    ) -> impl Future<Output = Result<i64, KafkaError>> + Send;
    /// The latest snapshot of the partition, if the log keeps snapshots and has one.
    fn latest_snapshot(
        &self,
    ) -> impl Future<Output = Result<Option<StoredSnapshot>, KafkaError>> + Send {
        std::future::ready(Ok(None))
    }
    /// Stores a snapshot of the partition (under key set `key_set`, 0 or 1: a snapshot
    /// written halfway never replaces the chunks of the one before under compaction).
    fn write_snapshot(
        &self,
        _snapshot: StoredSnapshot,
        _key_set: u64,
    ) -> impl Future<Output = Result<(), KafkaError>> + Send + 'static {
        std::future::ready(Ok(()))
    }
    /// Reads from `offset` on: before the first read only.
    fn seek(&mut self, _offset: i64) {}
}

/// Bytes of a snapshot per record of the snapshot topic.
const SNAPSHOT_CHUNK_BYTES: usize = 256 * 1024;
/// The `keel-kind` of a snapshot's records.
const SNAPSHOT_CHUNK: &str = "snapshot-chunk";
const SNAPSHOT_MANIFEST: &str = "snapshot-manifest";
/// The header of a manifest record listing its chunks' offsets.
const SNAPSHOT_CHUNKS_HEADER: &str = "keel-chunks";

/// A partition of a Kafka topic: the shared producer and the partition's reader.
///
/// The records before where the serving reader starts (the partition's history at
/// start-up) are read through a history reader of their own, opened when first needed and
/// dropped once it reaches the serving reader: tuned for reading much (few fetch requests,
/// a bounded read-ahead), so that a start-up over a long partition neither floods the
/// broker with the serving reader's short fetches nor buffers the partition in memory.
pub struct KafkaPartition {
    producer: LogProducer,
    reader: PartitionReader,
    history: Option<History>,
    settings: KafkaSettings,
    /// The topic of the partition's snapshots (the same partition of it).
    snapshots: String,
}

/// The partition's records before the serving reader's first offset.
struct History {
    settings: KafkaSettings,
    /// The next offset to read; the serving reader takes over at its own first offset.
    next: i64,
    reader: Option<PartitionReader>,
}

impl KafkaPartition {
    /// The partition `reader` reads, appended to through `producer`. The records before
    /// `reader`'s first offset are read, from offset 0, through a history reader opened
    /// with `settings`.
    pub fn new(producer: LogProducer, reader: PartitionReader, settings: &KafkaSettings) -> Self {
        let history = (reader.next_offset() > 0).then(|| History {
            settings: settings.clone(),
            next: 0,
            reader: None,
        });
        let snapshots = match keel_schemas::stream_type_of(reader.topic()) {
            Some(stream_type) => settings.snapshot_topic(stream_type),
            None => format!("{}.snapshots", reader.topic()),
        };
        Self {
            producer,
            reader,
            history,
            settings: settings.clone(),
            snapshots,
        }
    }

    async fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, KafkaError> {
        let at = TopicPartition::new(self.snapshots.clone(), self.reader.partition());
        let end = keel_kafka::end_offsets(&self.settings, std::slice::from_ref(&at))
            .await?
            .first()
            .map_or(0, |(_, end)| *end);
        if end == 0 {
            return Ok(None);
        }
        let timeout = self.settings.timeout;
        // The manifest is the last record a snapshot writes.
        let mut reader = PartitionReader::open_history(&self.settings, &at, end - 1).await?;
        let last = read_within(&mut reader, timeout).await?;
        if last.header("keel-kind") != Some(SNAPSHOT_MANIFEST) {
            return Err(KafkaError::Reader(format!(
                "the last record of {at} is not a snapshot manifest (a snapshot written halfway)"
            )));
        }
        let chunks: Vec<i64> = last
            .header(SNAPSHOT_CHUNKS_HEADER)
            .unwrap_or_default()
            .split(',')
            .filter(|c| !c.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| KafkaError::Reader(format!("a manifest's chunk list: {e}")))?;
        let mut body = Vec::new();
        if let Some(first) = chunks.first() {
            let mut reader = PartitionReader::open_history(&self.settings, &at, *first).await?;
            for wanted in &chunks {
                let entry = loop {
                    let entry = read_within(&mut reader, timeout).await?;
                    if entry.offset >= *wanted {
                        break entry;
                    }
                };
                if entry.offset != *wanted {
                    return Err(KafkaError::Reader(format!(
                        "the snapshot's chunk at {wanted} of {at} is gone"
                    )));
                }
                body.extend_from_slice(&entry.payload);
            }
        }
        Ok(Some(StoredSnapshot {
            manifest: last.payload,
            body,
        }))
    }
}

impl PartitionLog for KafkaPartition {
    fn topic(&self) -> &str {
        self.reader.topic()
    }

    fn partition(&self) -> i32 {
        self.reader.partition()
    }

    fn next_offset(&self) -> i64 {
        match &self.history {
            Some(history) => history.next,
            None => self.reader.next_offset(),
        }
    }

    async fn end(&self) -> Result<i64, KafkaError> {
        self.reader.high_watermark().await
    }

    async fn next(&mut self) -> Result<LogEntry, KafkaError> {
        let serving_from = self.reader.next_offset();
        let Some(history) = &mut self.history else {
            return self.reader.next().await;
        };
        let reader = match &mut history.reader {
            Some(reader) => reader,
            None => history.reader.insert(
                PartitionReader::open_history(
                    &history.settings,
                    &TopicPartition::new(self.reader.topic(), self.reader.partition()),
                    history.next,
                )
                .await?,
            ),
        };
        let entry = reader.next().await?;
        if entry.offset >= serving_from {
            // Past the history (offsets the broker skipped, such as control records):
            // the serving reader has this record too, from its first offset on.
            self.history = None;
            return self.reader.next().await;
        }
        history.next = entry.offset + 1;
        if history.next >= serving_from {
            self.history = None;
        }
        Ok(entry)
    }

    fn append(
        &self,
        records: &[Append<'_>],
    ) -> impl Future<Output = Vec<Result<i64, KafkaError>>> + Send + 'static {
        let (topic, partition) = (self.reader.topic(), self.reader.partition());
        self.producer.enqueue_records(topic, partition, records)
    }

    async fn append_one(&self, (key, record, traceparent): Append<'_>) -> Result<i64, KafkaError> {
        let (topic, partition) = (self.reader.topic(), self.reader.partition());
        self.producer
            .append_record(topic, partition, key, record, traceparent)
            .await
    }

    async fn latest_snapshot(&self) -> Result<Option<StoredSnapshot>, KafkaError> {
        self.read_snapshot().await
    }

    fn write_snapshot(
        &self,
        snapshot: StoredSnapshot,
        key_set: u64,
    ) -> impl Future<Output = Result<(), KafkaError>> + Send + 'static {
        let producer = self.producer.clone();
        let (topic, partition) = (self.snapshots.clone(), self.reader.partition());
        async move {
            let mut offsets = Vec::new();
            for (i, chunk) in snapshot.body.chunks(SNAPSHOT_CHUNK_BYTES).enumerate() {
                let key = format!("chunk-{}-{i}", key_set % 2);
                let offset = producer
                    .append(
                        &topic,
                        partition,
                        &key,
                        chunk,
                        &[("keel-kind", SNAPSHOT_CHUNK)],
                    )
                    .await?;
                offsets.push(offset.to_string());
            }
            let chunks = offsets.join(",");
            producer
                .append(
                    &topic,
                    partition,
                    "manifest",
                    &snapshot.manifest,
                    &[
                        ("keel-kind", SNAPSHOT_MANIFEST),
                        (SNAPSHOT_CHUNKS_HEADER, &chunks),
                    ],
                )
                .await?;
            Ok(())
        }
    }

    fn seek(&mut self, offset: i64) {
        if offset < self.reader.next_offset() {
            self.history = Some(History {
                settings: self.settings.clone(),
                next: offset,
                reader: None,
            });
        }
    }
}

/// The next record of `reader`, within `timeout`.
async fn read_within(
    reader: &mut PartitionReader,
    timeout: std::time::Duration,
) -> Result<LogEntry, KafkaError> {
    let offset = reader.next_offset();
    tokio::time::timeout(timeout, reader.next())
        .await
        .map_err(|_| KafkaError::Timeout(format!("reading the snapshot at {offset}")))?
}
