//! The partition owner's view of its log: append records, read them back in order, ask
//! where the partition ends. Nothing else of the broker reaches the owner.

use std::future::Future;

use keel_kafka::{KafkaError, KafkaSettings, LogEntry, LogProducer, PartitionReader};
use keel_schemas::{LogRecord, TopicPartition};

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
    fn append(
        &self,
        records: &[Append<'_>],
    ) -> impl Future<Output = Vec<Result<i64, KafkaError>>> + Send;
    /// Appends one record (a fence): its offset, waiting for room in the producer's queue
    /// within the producer's timeout.
    fn append_one(
        &self,
        record: Append<'_>,
    ) -> impl Future<Output = Result<i64, KafkaError>> + Send;
}

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
        Self {
            producer,
            reader,
            history,
        }
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
            None => history.reader.insert(PartitionReader::open_history(
                &history.settings,
                &TopicPartition::new(self.reader.topic(), self.reader.partition()),
                history.next,
            )?),
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

    async fn append(&self, records: &[Append<'_>]) -> Vec<Result<i64, KafkaError>> {
        let (topic, partition) = (self.reader.topic(), self.reader.partition());
        self.producer
            .append_records(topic, partition, records)
            .await
    }

    async fn append_one(&self, (key, record, traceparent): Append<'_>) -> Result<i64, KafkaError> {
        let (topic, partition) = (self.reader.topic(), self.reader.partition());
        self.producer
            .append_record(topic, partition, key, record, traceparent)
            .await
    }
}
