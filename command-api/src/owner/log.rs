//! The partition owner's view of its log: append records, read them back in order, ask
//! where the partition ends. Nothing else of the broker reaches the owner.

use std::future::Future;

use keel_kafka::{KafkaError, LogEntry, LogProducer, PartitionReader};
use keel_schemas::LogRecord;

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
pub struct KafkaPartition {
    producer: LogProducer,
    reader: PartitionReader,
}

impl KafkaPartition {
    /// The partition `reader` reads, appended to through `producer`.
    pub fn new(producer: LogProducer, reader: PartitionReader) -> Self {
        Self { producer, reader }
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
        self.reader.next_offset()
    }

    async fn end(&self) -> Result<i64, KafkaError> {
        self.reader.high_watermark().await
    }

    async fn next(&mut self) -> Result<LogEntry, KafkaError> {
        self.reader.next().await
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
