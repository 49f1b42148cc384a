use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{Consumer, DefaultConsumerContext, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tracing::{error, warn};

use keel_schemas::TopicPartition;

use crate::{KafkaError, KafkaSettings};

/// One record as read from a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// The record key (the aggregate id for commits).
    pub key: Option<Vec<u8>>,
    /// The record's bytes; empty for a record without a value.
    pub payload: Vec<u8>,
    /// The headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The broker's timestamp, in milliseconds since the epoch, if any.
    pub timestamp_ms: Option<i64>,
}

impl LogEntry {
    /// The first header named `name`, as UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

fn entry_of<M: Message>(message: &M) -> LogEntry {
    LogEntry {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        headers: message
            .headers()
            .map(|h| {
                h.iter()
                    .map(|header| {
                        (
                            header.key.to_owned(),
                            header.value.map(<[u8]>::to_vec).unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// Bounds what a reader's client buffers ahead to [`HISTORY_READ_AHEAD`] records a
/// partition and 16 MB in all, unless the client settings say otherwise.
fn bound_read_ahead(config: &mut rdkafka::ClientConfig, settings: &KafkaSettings) {
    config.set("queued.min.messages", HISTORY_READ_AHEAD.to_string());
    if !settings.client.contains_key("queued.max.messages.kbytes") {
        config.set("queued.max.messages.kbytes", "16384");
    }
}

/// Creates a consumer for readers: no group membership, no committed offsets.
/// `fetch_wait_ms` is the default fetch wait, unless `KEEL_KAFKA_FETCH_WAIT_MAX_MS` sets one.
fn reader_consumer(
    settings: &KafkaSettings,
    fetch_wait_ms: u32,
) -> Result<StreamConsumer, KafkaError> {
    reader_config(settings, fetch_wait_ms)
        .create()
        .map_err(KafkaError::client("creating a log reader"))
}

/// The configuration of [`reader_consumer`].
fn reader_config(settings: &KafkaSettings, fetch_wait_ms: u32) -> rdkafka::ClientConfig {
    let mut config = settings.client_config();
    config
        .set("group.id", "keel-partition-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_uncommitted")
        .set("enable.partition.eof", "false");
    if !settings.client.contains_key("fetch.wait.max.ms") {
        config.set("fetch.wait.max.ms", fetch_wait_ms.to_string());
    }
    config
}

/// Where each of `partitions` ends now: the offset its next record will get.
pub async fn end_offsets(
    settings: &KafkaSettings,
    partitions: &[TopicPartition],
) -> Result<Vec<(TopicPartition, i64)>, KafkaError> {
    // A client is made and destroyed for it: both wait on librdkafka's threads, so both
    // happen on the blocking pool, with the query.
    let (settings, partitions) = (settings.clone(), partitions.to_vec());
    on_blocking_pool(move || {
        let consumer = reader_consumer(&settings, 25)?;
        watermarks_of(&consumer, partitions, settings.timeout)
    })
    .await
}

async fn high_watermarks(
    consumer: Arc<StreamConsumer>,
    partitions: Vec<TopicPartition>,
    timeout: Duration,
) -> Result<Vec<(TopicPartition, i64)>, KafkaError> {
    on_blocking_pool(move || watermarks_of(&consumer, partitions, timeout)).await
}

/// Each of `partitions` with its high watermark, asked of the broker through `consumer`
/// (a blocking call: run it on the blocking pool).
fn watermarks_of(
    consumer: &StreamConsumer,
    partitions: Vec<TopicPartition>,
    timeout: Duration,
) -> Result<Vec<(TopicPartition, i64)>, KafkaError> {
    partitions
        .into_iter()
        .map(|at| {
            consumer
                .fetch_watermarks(&at.topic, at.partition, timeout)
                .map_err(KafkaError::client(format!(
                    "reading the watermarks of {at}"
                )))
                .map(|(_, high)| (at, high))
        })
        .collect()
}

/// Runs a watermark query on the blocking pool.
async fn on_blocking_pool<T: Send + 'static>(
    query: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, KafkaError> {
    tokio::task::spawn_blocking(query)
        .await
        .map_err(|e| KafkaError::Timeout(format!("reading watermarks: {e}")))?
}

/// The fetch wait of the readers a command API reads its partitions back through. A
/// command is acknowledged only once its commit is read back, so on brokers that answer a
/// waiting fetch only at the wait's end (nisshi) it is a floor under command latency; on
/// Apache Kafka a fetch returns as soon as data arrives. Shorter waits mean more fetch
/// requests from every idle partition: at 5 ms, a local broker holding a million records
/// spent all its time answering them, and a command API starting over them never became
/// ready.
pub const READ_BACK_FETCH_WAIT_MS: u32 = 25;

/// How many records a history reader ([`PartitionReader::open_history`]) buffers ahead.
const HISTORY_READ_AHEAD: usize = 10_000;

/// A pause between records this long ends a batch before its linger.
const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// Reads several partitions, each from its own offset, in one consumer: what a projection
/// uses. Records of one partition arrive in order; partitions interleave.
pub struct LogReader {
    consumer: Arc<StreamConsumer>,
    partitions: Vec<TopicPartition>,
    timeout: Duration,
}

impl LogReader {
    /// Opens a reader of every partition given, each from its next offset.
    ///
    /// A fetch waits up to 25 ms for data: Apache Kafka answers as soon as data arrives,
    /// but some compatible brokers only at the wait's end, and a projection's latency
    /// (read-your-writes) includes it. Long enough that idle partitions cost the broker
    /// little.
    pub fn open(
        settings: &KafkaSettings,
        assignment: &[(TopicPartition, i64)],
    ) -> Result<Self, KafkaError> {
        Self::open_with(reader_consumer(settings, 25)?, settings, assignment)
    }

    /// [`Self::open`] with a bounded read-ahead, as a history reader has
    /// ([`PartitionReader::open_history`]): what a rebuild that starts among live reads
    /// uses. The client's default read-ahead (100,000 records a partition, up to 64 MB)
    /// is fetched at once when a reader opens on a long log, a burst of the broker's and
    /// the client's CPU that live reads queue behind and that no pacing of the applied
    /// batches can spread out. The bound costs throughput, so a reader that runs
    /// unpaced keeps the default.
    pub fn open_gently(
        settings: &KafkaSettings,
        assignment: &[(TopicPartition, i64)],
    ) -> Result<Self, KafkaError> {
        let mut config = reader_config(settings, 25);
        bound_read_ahead(&mut config, settings);
        let consumer = config
            .create()
            .map_err(KafkaError::client("creating a log reader"))?;
        Self::open_with(consumer, settings, assignment)
    }

    fn open_with(
        consumer: StreamConsumer,
        settings: &KafkaSettings,
        assignment: &[(TopicPartition, i64)],
    ) -> Result<Self, KafkaError> {
        let mut list = TopicPartitionList::new();
        for (at, offset) in assignment {
            list.add_partition_offset(&at.topic, at.partition, Offset::Offset(*offset))
                .map_err(KafkaError::client(format!("assigning {at}")))?;
        }
        consumer
            .assign(&list)
            .map_err(KafkaError::client("assigning partitions"))?;
        Ok(Self {
            consumer: Arc::new(consumer),
            partitions: assignment.iter().map(|(at, _)| at.clone()).collect(),
            timeout: settings.timeout,
        })
    }

    /// A reader of nothing that measures where `partitions` end ([`Self::high_watermarks`]):
    /// for a process following work other processes read.
    pub fn ends_of(
        settings: &KafkaSettings,
        partitions: Vec<TopicPartition>,
    ) -> Result<Self, KafkaError> {
        Ok(Self {
            consumer: Arc::new(reader_consumer(settings, 25)?),
            partitions,
            timeout: settings.timeout,
        })
    }

    /// The high watermark of every partition read: where the log ends now.
    pub async fn high_watermarks(&self) -> Result<Vec<(TopicPartition, i64)>, KafkaError> {
        high_watermarks(
            Arc::clone(&self.consumer),
            self.partitions.clone(),
            self.timeout,
        )
        .await
    }

    /// Waits up to `wait` for a first record, then takes what else arrives, up to `max`
    /// records, `linger` after the first, or the first pause of a millisecond between
    /// records: a lone write is not held for the whole linger, while a stream of them
    /// (a catch-up, a busy log) fills the batch. Empty when nothing arrived in `wait`.
    pub async fn next_batch(
        &self,
        max: usize,
        wait: Duration,
        linger: Duration,
    ) -> Result<Vec<LogEntry>, KafkaError> {
        let mut batch = Vec::new();
        let first = match tokio::time::timeout(wait, self.consumer.recv()).await {
            Err(_) => return Ok(batch),
            Ok(message) => message.map_err(KafkaError::client("reading"))?,
        };
        batch.push(entry_of(&first));
        drop(first);
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < max {
            let until = deadline.min(tokio::time::Instant::now() + BATCH_PAUSE);
            match tokio::time::timeout_at(until, self.consumer.recv()).await {
                Err(_) => break,
                Ok(message) => {
                    batch.push(entry_of(&message.map_err(KafkaError::client("reading"))?))
                }
            }
        }
        Ok(batch)
    }
}

/// Reads one partition from a given offset: to the high watermark, then follows it.
///
/// The partition is assigned directly, with an explicit offset: no consumer group, no
/// committed offsets. The reader's caller owns its position ([`PartitionReader::next_offset`]).
/// Readers opened together ([`PartitionReader::open_many`]) share one consumer: one
/// connection and one fetch request serve all their partitions, each of which still
/// gets its records in its own queue.
pub struct PartitionReader {
    consumer: Arc<StreamConsumer>,
    queue: StreamPartitionQueue<DefaultConsumerContext>,
    _driver: Arc<AbortOnDrop<()>>,
    topic: String,
    partition: i32,
    next_offset: i64,
    timeout: Duration,
    /// Opened from a [`ReaderPool`] (whose open partitions these are): its partition
    /// leaves the shared consumer's assignment when it is dropped.
    pooled: Option<Arc<std::sync::Mutex<std::collections::HashSet<TopicPartition>>>>,
    /// The only reader of its consumer ([`PartitionReader::open_history`]).
    own_consumer: bool,
}

impl Drop for PartitionReader {
    fn drop(&mut self) {
        let Some(open) = self.pooled.take() else {
            // A consumer of its own (a history reader's): destroying it waits for
            // librdkafka's threads to end, so the last reference goes on the blocking pool.
            // (Readers opened together share theirs: the last of them destroys it.)
            if self.own_consumer
                && let Ok(runtime) = tokio::runtime::Handle::try_current()
            {
                let consumer = Arc::clone(&self.consumer);
                drop(runtime.spawn_blocking(move || destroy_when_last(consumer)));
            }
            return;
        };
        let (consumer, at) = (
            Arc::clone(&self.consumer),
            TopicPartition::new(self.topic.clone(), self.partition),
        );
        // Changing a consumer's assignment waits for librdkafka's own thread: never on a
        // runtime thread, where it would hold up every task behind it. The partition
        // counts as open until it has left the assignment, so a reader opened again
        // cannot have its assignment taken by this one's leaving.
        let close = move || {
            let mut list = TopicPartitionList::new();
            list.add_partition(&at.topic, at.partition);
            if let Err(e) = consumer.incremental_unassign(&list) {
                warn!(%at, error = %e, "closing a pooled reader");
            }
            if let Ok(mut open) = open.lock() {
                open.remove(&at);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(close)),
            Err(_) => close(),
        }
    }
}

/// How long [`ReaderPool::open`] waits for a reader of the same partition, closed moments
/// ago, to leave the consumer's assignment.
const CLOSING_WAIT: Duration = Duration::from_secs(2);

/// A partition marked open in a [`ReaderPool`] while its reader is being opened: unmarked
/// when dropped, unless kept (the reader opened, and unmarks it when it goes).
struct OpenMark {
    open: Arc<std::sync::Mutex<std::collections::HashSet<TopicPartition>>>,
    at: Option<TopicPartition>,
}

impl OpenMark {
    fn keep(mut self) {
        self.at = None;
    }
}

impl Drop for OpenMark {
    fn drop(&mut self) {
        if let Some(at) = self.at.take()
            && let Ok(mut open) = self.open.lock()
        {
            open.remove(&at);
        }
    }
}

/// Drops `consumer` once it is the last reference to it (the reader's queue and the task
/// serving the consumer's own queue let theirs go moments after the reader), so that its
/// destruction, which waits for librdkafka's threads, happens here: on the blocking pool.
fn destroy_when_last(mut consumer: Arc<StreamConsumer>) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        match Arc::try_unwrap(consumer) {
            Ok(last) => {
                drop(last);
                return;
            }
            Err(shared) => consumer = shared,
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One consumer that readers of single partitions are opened on and closed from one at a
/// time, as an instance gains and loses partitions: one connection and one fetch request
/// serve all of them, whichever are open.
#[derive(Clone)]
pub struct ReaderPool {
    consumer: Arc<StreamConsumer>,
    driver: Arc<AbortOnDrop<()>>,
    timeout: Duration,
    /// The partitions with a reader open.
    open: Arc<std::sync::Mutex<std::collections::HashSet<TopicPartition>>>,
}

impl std::fmt::Debug for ReaderPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReaderPool").finish_non_exhaustive()
    }
}

impl ReaderPool {
    /// A pool with no partition open. Must be called within a Tokio runtime.
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaError> {
        let consumer = Arc::new(reader_consumer(settings, READ_BACK_FETCH_WAIT_MS)?);
        consumer
            .assign(&TopicPartitionList::new())
            .map_err(KafkaError::client("starting a reader pool"))?;
        let driver = Arc::new(drive(Arc::clone(&consumer)));
        Ok(Self {
            consumer,
            driver,
            timeout: settings.timeout,
            open: Arc::default(),
        })
    }

    /// Where each of `partitions` ends now: the offset its next record will get.
    pub async fn end_offsets(
        &self,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, i64)>, KafkaError> {
        high_watermarks(
            Arc::clone(&self.consumer),
            partitions.to_vec(),
            self.timeout,
        )
        .await
    }

    /// Opens a reader of `at` whose first record will be at `from_offset`. A partition has
    /// at most one reader open in a pool at a time. The consumer's assignment changes on
    /// the blocking pool: librdkafka's own thread answers it, after up to a tick of its
    /// loop, and an instance taking several partitions at once must not stall its
    /// runtime meanwhile (commands, handoffs and fences all wait behind it).
    pub async fn open(
        &self,
        at: &TopicPartition,
        from_offset: i64,
    ) -> Result<PartitionReader, KafkaError> {
        // A second reader of the partition would take the first one's queue and, dropped,
        // its assignment. One closed moments ago leaves the assignment on the blocking
        // pool: it is waited for, briefly.
        let until = tokio::time::Instant::now() + CLOSING_WAIT;
        loop {
            let inserted = self
                .open
                .lock()
                .map_err(|_| KafkaError::Reader("the reader pool is poisoned".into()))?
                .insert(at.clone());
            if inserted {
                break;
            }
            if tokio::time::Instant::now() >= until {
                return Err(KafkaError::Reader(format!(
                    "{at} already has a reader open in this pool"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Until the reader is open, the partition is marked open by `marked`, which unmarks
        // it if opening fails or the caller stops waiting (the partition was revoked).
        let marked = OpenMark {
            open: Arc::clone(&self.open),
            at: Some(at.clone()),
        };
        let (pool, opening) = (self.clone(), at.clone());
        tokio::task::spawn_blocking(move || {
            let opened = pool.open_queue(&opening, from_offset);
            if opened.is_ok() {
                marked.keep();
            }
            opened
        })
        .await
        .unwrap_or_else(|e| Err(KafkaError::Reader(format!("opening a reader of {at}: {e}"))))
    }

    fn open_queue(
        &self,
        at: &TopicPartition,
        from_offset: i64,
    ) -> Result<PartitionReader, KafkaError> {
        let queue = self
            .consumer
            .split_partition_queue(&at.topic, at.partition)
            .ok_or_else(|| KafkaError::Reader(format!("{at} has no queue")))?;
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(&at.topic, at.partition, Offset::Offset(from_offset))
            .map_err(KafkaError::client(format!("assigning {at}")))?;
        self.consumer
            .incremental_assign(&list)
            .map_err(KafkaError::client(format!("assigning {at}")))?;
        Ok(PartitionReader {
            consumer: Arc::clone(&self.consumer),
            queue,
            _driver: Arc::clone(&self.driver),
            topic: at.topic.clone(),
            partition: at.partition,
            next_offset: from_offset,
            timeout: self.timeout,
            pooled: Some(Arc::clone(&self.open)),
            own_consumer: false,
        })
    }
}

/// Serves a consumer's own queue, which carries errors and client events only (each
/// partition's records go to the queue split off for it), until dropped.
fn drive(consumer: Arc<StreamConsumer>) -> AbortOnDrop<()> {
    AbortOnDrop(tokio::spawn(async move {
        loop {
            match consumer.recv().await {
                Ok(message) => error!(
                    topic = message.topic(),
                    partition = message.partition(),
                    offset = message.offset(),
                    "a record arrived in the consumer's own queue, not its partition's"
                ),
                Err(e) => {
                    warn!(error = %e, "log reader");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

/// Aborts a task when dropped: for tasks that serve a value's owner and must not outlive
/// it (here, the task serving a shared consumer's own queue, until its last reader is gone).
pub struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PartitionReader {
    /// Opens a reader of `topic`/`partition` whose first record will be at `from_offset`
    /// (or the first one after it, if that offset is gone).
    pub fn open(
        settings: &KafkaSettings,
        topic: &str,
        partition: i32,
        from_offset: i64,
    ) -> Result<Self, KafkaError> {
        let mut readers = Self::open_many(
            settings,
            &[(TopicPartition::new(topic, partition), from_offset)],
        )?;
        readers
            .pop()
            .ok_or_else(|| KafkaError::Reader("no reader was opened".into()))
    }

    /// Opens one reader per partition given, each from its first offset, all sharing one
    /// consumer, in the order given. Must be called within a Tokio runtime.
    ///
    /// Its fetch wait is [`READ_BACK_FETCH_WAIT_MS`]. To read a long stretch of history,
    /// open a [`PartitionReader::open_history`] instead.
    pub fn open_many(
        settings: &KafkaSettings,
        partitions: &[(TopicPartition, i64)],
    ) -> Result<Vec<Self>, KafkaError> {
        Self::open_many_with(
            reader_consumer(settings, READ_BACK_FETCH_WAIT_MS)?,
            settings,
            partitions,
        )
    }

    /// A reader of a partition's history from `from_offset`, tuned for reading much at
    /// once rather than for latency: a longer fetch wait (fewer requests for the broker to
    /// answer while the reader catches up) and a bounded read-ahead (at most
    /// [`HISTORY_READ_AHEAD`] records are buffered, not the client's default of 100,000 per
    /// partition), with a consumer of its own that goes when the reader does.
    ///
    /// The client is made and assigned on the blocking pool (both wait on librdkafka's
    /// threads), and destroyed there when the reader goes: an instance taking several
    /// partitions at once never stalls its runtime, where its commands and handoffs run.
    pub async fn open_history(
        settings: &KafkaSettings,
        at: &TopicPartition,
        from_offset: i64,
    ) -> Result<Self, KafkaError> {
        let (settings, at) = (settings.clone(), at.clone());
        tokio::task::spawn_blocking(move || {
            let mut config = reader_config(&settings, 100);
            bound_read_ahead(&mut config, &settings);
            let consumer: StreamConsumer = config
                .create()
                .map_err(KafkaError::client("creating a history reader"))?;
            let mut readers = Self::open_many_with(consumer, &settings, &[(at, from_offset)])?;
            let mut reader = readers
                .pop()
                .ok_or_else(|| KafkaError::Reader("no reader was opened".into()))?;
            reader.own_consumer = true;
            Ok(reader)
        })
        .await
        .map_err(|e| KafkaError::Reader(format!("opening a history reader: {e}")))?
    }

    fn open_many_with(
        consumer: StreamConsumer,
        settings: &KafkaSettings,
        partitions: &[(TopicPartition, i64)],
    ) -> Result<Vec<Self>, KafkaError> {
        let consumer = Arc::new(consumer);
        // Each partition's records go to its own queue, split off before the assignment so
        // none lands in the consumer's own queue.
        // Two readers of one partition would share its queue and take each other's records.
        let mut seen = std::collections::HashSet::new();
        if let Some((at, _)) = partitions.iter().find(|(at, _)| !seen.insert(at)) {
            return Err(KafkaError::Reader(format!(
                "{at} is asked for twice; open a reader of its own for a second position"
            )));
        }
        let mut queues = Vec::with_capacity(partitions.len());
        let mut assignment = TopicPartitionList::new();
        for (at, from_offset) in partitions {
            let queue = consumer
                .split_partition_queue(&at.topic, at.partition)
                .ok_or_else(|| KafkaError::Reader(format!("{at} has no queue")))?;
            queues.push(queue);
            assignment
                .add_partition_offset(&at.topic, at.partition, Offset::Offset(*from_offset))
                .map_err(KafkaError::client(format!("assigning {at}")))?;
        }
        consumer
            .assign(&assignment)
            .map_err(KafkaError::client("assigning partitions"))?;
        // The consumer's own queue carries errors and client events only; it must still
        // be served.
        let driver = Arc::new(drive(Arc::clone(&consumer)));
        Ok(partitions
            .iter()
            .zip(queues)
            .map(|((at, from_offset), queue)| Self {
                consumer: Arc::clone(&consumer),
                queue,
                _driver: Arc::clone(&driver),
                topic: at.topic.clone(),
                partition: at.partition,
                next_offset: *from_offset,
                timeout: settings.timeout,
                pooled: None,
                own_consumer: false,
            })
            .collect())
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partition read.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The offset of the next record this reader will return.
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The partition's high watermark: the offset the next appended record will get.
    pub async fn high_watermark(&self) -> Result<i64, KafkaError> {
        let at = TopicPartition::new(self.topic.clone(), self.partition);
        let ends = high_watermarks(Arc::clone(&self.consumer), vec![at], self.timeout).await?;
        ends.first()
            .map(|(_, high)| *high)
            .ok_or_else(|| KafkaError::Reader("the broker named no watermark".into()))
    }

    /// Reads every record from the current position up to the high watermark as it is now,
    /// handing each to `each` as it is read: after an error, the reader is where `each`
    /// stopped, so calling it again resumes without skipping a record.
    pub async fn read_to_end(&mut self, mut each: impl FnMut(LogEntry)) -> Result<(), KafkaError> {
        let end = self.high_watermark().await?;
        while self.next_offset < end {
            let entry = tokio::time::timeout(self.timeout, self.next())
                .await
                .map_err(|_| {
                    KafkaError::Timeout(format!(
                        "reading {}/{} at offset {} towards {end}",
                        self.topic, self.partition, self.next_offset
                    ))
                })??;
            each(entry);
        }
        Ok(())
    }

    /// Waits for the next record of the partition.
    pub async fn next(&mut self) -> Result<LogEntry, KafkaError> {
        loop {
            let message = self.queue.recv().await.map_err(KafkaError::client(format!(
                "reading {}/{}",
                self.topic, self.partition
            )))?;
            if message.offset() < self.next_offset {
                continue;
            }
            let entry = entry_of(&message);
            self.next_offset = entry.offset + 1;
            return Ok(entry);
        }
    }
}
