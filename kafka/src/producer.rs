use keel_schemas::{LogRecord, headers};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::{KafkaError, KafkaSettings};

/// An idempotent, `acks=all` producer that appends a record to a partition chosen by the
/// caller and returns the record's offset.
///
/// Idempotence keeps retries from duplicating or reordering records within a partition;
/// duplicates that still reach the log (a retry after a timeout) are skipped by the gate.
#[derive(Clone)]
pub struct LogProducer {
    inner: FutureProducer,
    timeout: std::time::Duration,
}

impl LogProducer {
    /// Connects a producer with Keel's settings.
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let mut config = settings.client_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "none")
            .set(
                "message.timeout.ms",
                settings.timeout.as_millis().to_string(),
            );
        // A flush's records are enqueued together; the linger lets flushes of other
        // partitions that come within it share the request. `KEEL_KAFKA_LINGER_MS` sets another.
        if !settings.client.contains_key("linger.ms") {
            config.set("linger.ms", "2");
        }
        let inner = config
            .create()
            .map_err(KafkaError::client("creating the producer"))?;
        Ok(Self {
            inner,
            timeout: settings.timeout,
        })
    }

    /// Appends one record to `topic`/`partition` and returns its offset once the broker
    /// has acknowledged it.
    pub async fn append(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<i64, KafkaError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (key, value) in headers {
            owned = owned.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let record = FutureRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload)
            .headers(owned);
        let delivery = self
            .inner
            .send(record, Timeout::After(self.timeout))
            .await
            .map_err(|(source, _)| KafkaError::Client {
                context: format!("appending to {topic}/{partition}"),
                source,
            })?;
        Ok(delivery.offset)
    }

    /// Appends a Keel record with its standard headers.
    pub async fn append_record(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        record: &LogRecord,
        traceparent: Option<&str>,
    ) -> Result<i64, KafkaError> {
        let headers = record_headers(record, traceparent);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        self.append(topic, partition, key, &record.encode(), &headers)
            .await
    }

    /// Appends several Keel records to one partition, in order: enqueued now (before the
    /// returned future is first polled) and together, so they travel in as few requests as
    /// the client can make (a group commit). The future gives each one's offset or error
    /// and borrows nothing: a caller can enqueue the next records before these are
    /// acknowledged, and the idempotent producer keeps them in that order. After the first
    /// record that cannot be enqueued, the rest are not sent and fail too.
    pub fn enqueue_records(
        &self,
        topic: &str,
        partition: i32,
        records: &[(&str, &LogRecord, Option<&str>)],
    ) -> impl std::future::Future<Output = Vec<Result<i64, KafkaError>>> + Send + 'static {
        let mut deliveries = Vec::with_capacity(records.len());
        let mut failed: Option<String> = None;
        for (key, record, traceparent) in records {
            if let Some(reason) = &failed {
                deliveries.push(Err(KafkaError::NotSent(reason.clone())));
                continue;
            }
            let headers = record_headers(record, *traceparent);
            let mut owned = OwnedHeaders::new_with_capacity(headers.len());
            for (name, value) in &headers {
                owned = owned.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            let payload = record.encode();
            let future_record = FutureRecord::to(topic)
                .partition(partition)
                .key(*key)
                .payload(&payload)
                .headers(owned);
            match self.inner.send_result(future_record) {
                Ok(delivery) => deliveries.push(Ok(delivery)),
                Err((source, _)) => {
                    failed = Some(format!("an earlier record of the batch failed: {source}"));
                    deliveries.push(Err(KafkaError::Client {
                        context: format!("enqueuing for {topic}/{partition}"),
                        source,
                    }));
                }
            }
        }
        let at = format!("{topic}/{partition}");
        async move {
            let mut offsets = Vec::with_capacity(deliveries.len());
            for delivery in deliveries {
                offsets.push(match delivery {
                    Err(e) => Err(e),
                    Ok(future) => match future.await {
                        Ok(Ok(delivered)) => Ok(delivered.offset),
                        Ok(Err((source, _))) => Err(KafkaError::Client {
                            context: format!("appending to {at}"),
                            source,
                        }),
                        Err(_) => Err(KafkaError::NotSent("the producer was dropped".into())),
                    },
                });
            }
            offsets
        }
    }

    /// Waits until every record sent so far is acknowledged or failed.
    pub fn flush(&self) -> Result<(), KafkaError> {
        self.inner
            .flush(Timeout::After(self.timeout))
            .map_err(KafkaError::client("flushing the producer"))
    }
}

/// The headers Keel writes with a record, so tools can route it without parsing it.
pub fn record_headers(
    record: &LogRecord,
    traceparent: Option<&str>,
) -> Vec<(&'static str, String)> {
    let mut list = vec![
        (headers::CONTENT_TYPE, "application/json".to_owned()),
        (headers::KIND, record.kind().to_owned()),
    ];
    match record {
        LogRecord::Commit(commit) => {
            list.push((headers::STREAM_TYPE, commit.stream.stream_type.clone()));
            list.push((headers::EVENT_TYPES, commit.event_types_header()));
        }
        LogRecord::Receipt(receipt) => {
            list.push((headers::STREAM_TYPE, receipt.stream.stream_type.clone()));
        }
        LogRecord::Fence(_) => {}
    }
    if let Some(tp) = traceparent {
        list.push((headers::TRACEPARENT, tp.to_owned()));
    }
    list
}
