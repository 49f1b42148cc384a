//! The partition owner: the one task that decides and appends the commands of one
//! partition, as DESIGN.md's "Writing" describes.
//!
//! * It takes the partition by reading it to the end through the gate, appending a fence
//!   with the next epoch, and reading up to its own fence.
//! * Its state (stream states, versions, last hashes, idempotency keys) is built only from
//!   what it reads from the log, never from what it meant to write.
//! * It decides waiting commands in arrival order, each against the state as read plus
//!   the commits of the same flush ahead of it, appends them together (a group commit),
//!   reads them back, and acknowledges each one only if the gate accepted it.
//! * A produce or read error never leaves a half-state: the partition answers 503 until
//!   it has re-read the log to its end.
//! * A valid fence by another writer means it lost the partition: it answers 503 from then
//!   on and never appends again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use keel_domain::Aggregate;
use keel_kafka::{KafkaError, LogEntry, LogProducer, PartitionGate, PartitionReader};
use keel_schemas::{
    CommandMeta, CommitRecord, FenceRecord, LogRecord, Position, SigningKey, StreamRef, Timestamp,
    Writer, decode_event, encode_event,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, instrument, warn};
use uuid::Uuid;

use crate::commands;
use crate::error::ApiError;

/// Commands decided and appended together at most.
const MAX_FLUSH: usize = 512;

/// Where a partition owner is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Reading the partition and fencing it.
    Starting = 0,
    /// Owns the partition and serves commands.
    Serving = 1,
    /// Re-reading the log after a broker error.
    Recovering = 2,
    /// Another writer fenced the partition: this instance no longer serves it.
    Lost = 3,
}

impl Status {
    fn from_u8(n: u8) -> Self {
        match n {
            1 => Status::Serving,
            2 => Status::Recovering,
            3 => Status::Lost,
            _ => Status::Starting,
        }
    }

    /// The status as a word.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Serving => "serving",
            Status::Recovering => "recovering",
            Status::Lost => "lost",
        }
    }
}

/// A partition owner's status, shared with the readiness route.
#[derive(Clone, Debug)]
pub struct StatusCell {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    cell: Arc<AtomicU8>,
}

impl StatusCell {
    fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            cell: Arc::new(AtomicU8::new(Status::Starting as u8)),
        }
    }

    /// The current status.
    pub fn get(&self) -> Status {
        Status::from_u8(self.cell.load(Ordering::Acquire))
    }

    fn set(&self, status: Status) {
        self.cell.store(status as u8, Ordering::Release);
    }
}

/// What the HTTP layer knows of a command besides the command itself.
#[derive(Clone, Debug)]
pub struct RequestMeta {
    /// `RegisterProduct`…
    pub command_type: &'static str,
    /// The client's `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// Digest of the request, recorded with the key.
    pub request_digest: Option<String>,
    /// The version of `If-Match`.
    pub if_match: Option<u64>,
    /// Who sent it.
    pub actor: String,
    /// The request's correlation id.
    pub correlation_id: String,
    /// What caused it, if the client said.
    pub causation_id: Option<String>,
    /// The W3C trace context to put on the record.
    pub traceparent: Option<String>,
}

/// A command for the owner of its stream's partition.
#[derive(Debug)]
pub struct CommandRequest<A: Aggregate> {
    /// The stream id.
    pub stream_id: String,
    /// The command.
    pub command: A::Command,
    /// The rest of the request.
    pub meta: RequestMeta,
    /// Where the answer goes.
    pub reply: oneshot::Sender<Result<Outcome, ApiError>>,
}

/// One event of an accepted command, as the response lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EventSummary {
    /// The event's id.
    pub event_id: Uuid,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// The stream version it brings the stream to.
    pub version: u64,
}

/// The result of an accepted command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// The stream.
    pub stream: StreamRef,
    /// The stream's version after the command.
    pub version: u64,
    /// The events the command produced (none when it changed nothing).
    pub events: Vec<EventSummary>,
    /// Where the commit (or the stream's latest commit) is in the log.
    pub position: Option<Position>,
    /// True for a command that created its stream.
    pub created: bool,
    /// True when this answers a retry with the original result.
    pub replayed: bool,
}

struct Stream<A> {
    state: A,
    version: u64,
    last_hash: Option<String>,
    last_offset: Option<i64>,
    unreadable: Option<String>,
}

impl<A: Default> Default for Stream<A> {
    fn default() -> Self {
        Self {
            state: A::default(),
            version: 0,
            last_hash: None,
            last_offset: None,
            unreadable: None,
        }
    }
}

struct Remembered {
    digest: Option<String>,
    outcome: Outcome,
}

/// A commit of the current flush, waiting for its read-back.
struct Pending {
    record: CommitRecord,
    key: Option<(String, String)>,
    traceparent: Option<String>,
    replies: Vec<oneshot::Sender<Result<Outcome, ApiError>>>,
}

/// The owner of one partition of an aggregate's topic.
pub struct PartitionOwner<A: Aggregate> {
    topic: String,
    partition: i32,
    instance: String,
    writer: Option<Writer>,
    gate: PartitionGate,
    streams: HashMap<String, Stream<A>>,
    keys: HashMap<(String, String), Remembered>,
    reader: PartitionReader,
    producer: LogProducer,
    status: StatusCell,
    timeout: Duration,
    undecodable: u64,
    signing_key: Arc<SigningKey>,
}

impl<A: Aggregate> PartitionOwner<A>
where
    A::Command: Send,
{
    /// An owner of the partition `reader` reads (from offset 0) that will fence it as
    /// `instance`.
    pub fn new(
        kafka: &keel_kafka::KafkaSettings,
        producer: LogProducer,
        reader: PartitionReader,
        instance: &str,
        signing_key: Arc<SigningKey>,
    ) -> (Self, StatusCell) {
        let (topic, partition) = (reader.topic().to_owned(), reader.partition());
        let status = StatusCell::new(&topic, partition);
        let owner = Self {
            topic,
            partition,
            instance: instance.to_owned(),
            writer: None,
            gate: PartitionGate::new(),
            streams: HashMap::new(),
            keys: HashMap::new(),
            reader,
            producer,
            status: status.clone(),
            timeout: kafka.timeout,
            undecodable: 0,
            signing_key,
        };
        (owner, status)
    }

    /// Takes the partition, then serves commands from `requests` until the channel closes.
    #[instrument(name = "partition_owner", skip_all, fields(topic = %self.topic, partition = self.partition))]
    pub async fn run(mut self, mut requests: mpsc::Receiver<CommandRequest<A>>) {
        loop {
            match self.take_ownership().await {
                Ok(()) => break,
                Err(e) => {
                    error!(error = %e, "could not take the partition; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        loop {
            tokio::select! {
                biased;
                request = requests.recv() => {
                    let Some(first) = request else { return };
                    let mut batch = vec![first];
                    while batch.len() < MAX_FLUSH {
                        match requests.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    self.flush(batch).await;
                }
                entry = self.reader.next(), if self.status.get() != Status::Lost => match entry {
                    Ok(entry) => {
                        self.apply(&entry);
                    }
                    Err(e) => {
                        warn!(error = %e, "reading the partition failed");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
            }
        }
    }

    async fn take_ownership(&mut self) -> Result<(), KafkaError> {
        self.status.set(Status::Starting);
        self.catch_up().await?;
        let writer = Writer {
            instance: self.instance.clone(),
            epoch: self.gate.highest_epoch() + 1,
        };
        let fence = LogRecord::Fence(
            FenceRecord {
                writer: writer.clone(),
                recorded_at: Timestamp::now(),
                signature: None,
            }
            .signed(&self.signing_key),
        );
        let offset = self
            .producer
            .append_record(&self.topic, self.partition, "", &fence, None)
            .await?;
        self.writer = Some(writer.clone());
        self.read_through(offset).await?;
        if self.gate.owner() == Some(&writer) {
            info!(
                epoch = writer.epoch,
                streams = self.streams.len(),
                "owning the partition"
            );
            self.status.set(Status::Serving);
        } else {
            warn!(owner = ?self.gate.owner(), "another writer fenced the partition first");
            self.status.set(Status::Lost);
        }
        Ok(())
    }

    /// Reads to the current end of the partition; returns the verdicts of the commits read.
    async fn catch_up(&mut self) -> Result<HashMap<Uuid, (bool, i64)>, KafkaError> {
        let entries = self.reader.read_to_end().await?;
        Ok(entries.iter().filter_map(|e| self.apply(e)).collect())
    }

    /// Reads until the record at `offset` has been applied.
    async fn read_through(
        &mut self,
        offset: i64,
    ) -> Result<HashMap<Uuid, (bool, i64)>, KafkaError> {
        let mut verdicts = HashMap::new();
        while self.reader.next_offset() <= offset {
            let entry = tokio::time::timeout(self.timeout, self.reader.next())
                .await
                .map_err(|_| KafkaError::Timeout(format!("reading back offset {offset}")))??;
            verdicts.extend(self.apply(&entry));
        }
        Ok(verdicts)
    }

    /// Applies one record read from the log. The only place the owner's state changes.
    fn apply(&mut self, entry: &LogEntry) -> Option<(Uuid, (bool, i64))> {
        let record = match LogRecord::decode(&entry.payload) {
            Ok(record) => record,
            Err(e) => {
                self.undecodable += 1;
                warn!(offset = entry.offset, error = %e, "skipping a record that is not a Keel record");
                return None;
            }
        };
        let verdict = self.gate.admit(&record);
        match (record, verdict) {
            (LogRecord::Fence(fence), Ok(())) => {
                if Some(&fence.writer) != self.writer.as_ref() && self.writer.is_some() {
                    warn!(new_owner = ?fence.writer, "another writer fenced the partition: no longer serving it");
                    self.status.set(Status::Lost);
                }
                None
            }
            (LogRecord::Fence(fence), Err(rejection)) => {
                debug!(offset = entry.offset, writer = ?fence.writer, %rejection, "gate skipped a fence");
                None
            }
            (LogRecord::Commit(commit), Ok(())) => {
                let id = commit.commit_id;
                self.apply_commit(&commit, entry.offset);
                Some((id, (true, entry.offset)))
            }
            (LogRecord::Commit(commit), Err(rejection)) => {
                info!(offset = entry.offset, stream = %commit.stream, %rejection, "gate skipped a commit");
                Some((commit.commit_id, (false, entry.offset)))
            }
        }
    }

    fn apply_commit(&mut self, commit: &CommitRecord, offset: i64) {
        let outcome = self.outcome_of(commit, offset);
        let stream = self.streams.entry(commit.stream.id.clone()).or_default();
        if commit.stream.stream_type != A::TYPE {
            stream.unreadable = Some(format!(
                "a commit of stream type {} is in this topic",
                commit.stream.stream_type
            ));
        }
        for envelope in &commit.events {
            match decode_event::<A>(envelope) {
                Ok(event) if stream.unreadable.is_none() => {
                    stream.state = std::mem::take(&mut stream.state).evolve(&event);
                }
                Ok(_) => {}
                Err(e) => {
                    error!(stream = %commit.stream, version = envelope.version, error = %e, "event cannot be read by this build");
                    stream.unreadable = Some(e.to_string());
                }
            }
        }
        stream.version = commit.next_version();
        stream.last_hash = Some(commit.hash.clone());
        stream.last_offset = Some(offset);
        if let Some(key) = &commit.command.idempotency_key {
            self.keys.insert(
                (commit.stream.id.clone(), key.clone()),
                Remembered {
                    digest: commit.command.request_digest.clone(),
                    outcome,
                },
            );
        }
    }

    fn position(&self, offset: i64) -> Position {
        Position {
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
        }
    }

    fn outcome_of(&self, commit: &CommitRecord, offset: i64) -> Outcome {
        Outcome {
            stream: commit.stream.clone(),
            version: commit.next_version(),
            events: commit
                .events
                .iter()
                .map(|e| EventSummary {
                    event_id: e.event_id,
                    event_type: e.event_type.clone(),
                    version: e.version,
                })
                .collect(),
            position: Some(self.position(offset)),
            created: commands::creates(&commit.command.command_type),
            replayed: false,
        }
    }

    fn unavailable(&self) -> ApiError {
        ApiError::Unavailable(match self.status.get() {
            Status::Lost => format!(
                "this instance no longer owns {}/{}: another instance serves it",
                self.topic, self.partition
            ),
            Status::Recovering => format!(
                "{}/{} is recovering from a broker error",
                self.topic, self.partition
            ),
            _ => format!("{}/{} is starting", self.topic, self.partition),
        })
    }

    /// Re-reads the log to its end after an error, then serves again if still the owner.
    async fn recover(&mut self) -> Result<HashMap<Uuid, (bool, i64)>, KafkaError> {
        let verdicts = self.catch_up().await?;
        if self.status.get() == Status::Recovering {
            if self.gate.owner() == self.writer.as_ref() {
                info!("recovered: serving again");
                self.status.set(Status::Serving);
            } else {
                self.status.set(Status::Lost);
            }
        }
        Ok(verdicts)
    }

    /// Decides a batch of commands, appends the commits together, reads them back, and
    /// answers each one.
    #[instrument(skip_all, fields(commands = batch.len()))]
    async fn flush(&mut self, batch: Vec<CommandRequest<A>>) {
        if self.status.get() == Status::Recovering
            && let Err(e) = self.recover().await
        {
            warn!(error = %e, "still recovering");
        }
        if self.status.get() != Status::Serving {
            for request in batch {
                let _ = request.reply.send(Err(self.unavailable()));
            }
            return;
        }
        let Some(writer) = self.writer.clone() else {
            return;
        };

        // Decide each command against the state read plus the commits ahead of it.
        let mut overlay: HashMap<String, (A, u64, Option<String>)> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut unchanged: Vec<CommandRequest<A>> = Vec::new();
        for request in batch {
            let key = request
                .meta
                .idempotency_key
                .clone()
                .map(|k| (request.stream_id.clone(), k));
            if let Some(key) = &key {
                if let Some(remembered) = self.keys.get(key) {
                    let answer = if remembered.digest == request.meta.request_digest {
                        Ok(Outcome {
                            replayed: true,
                            ..remembered.outcome.clone()
                        })
                    } else {
                        Err(ApiError::IdempotencyKeyReused)
                    };
                    let _ = request.reply.send(answer);
                    continue;
                }
                if let Some(p) = pending.iter_mut().find(|p| p.key.as_ref() == Some(key)) {
                    if p.record.command.request_digest == request.meta.request_digest {
                        p.replies.push(request.reply);
                    } else {
                        let _ = request.reply.send(Err(ApiError::IdempotencyKeyReused));
                    }
                    continue;
                }
            }
            let committed = self.streams.get(&request.stream_id);
            if let Some(reason) = committed.and_then(|s| s.unreadable.as_ref()) {
                let _ = request.reply.send(Err(ApiError::Unavailable(format!(
                    "stream {} cannot be read by this build: {reason}",
                    request.stream_id
                ))));
                continue;
            }
            let (state, version, last_hash) = match overlay.get(&request.stream_id) {
                Some(ahead) => ahead.clone(),
                None => committed
                    .map(|s| (s.state.clone(), s.version, s.last_hash.clone()))
                    .unwrap_or_default(),
            };
            if let Some(expected) = request.meta.if_match
                && expected != version
            {
                let _ = request.reply.send(Err(ApiError::VersionMismatch {
                    expected,
                    actual: version,
                }));
                continue;
            }
            let events = match state.decide(&request.command) {
                Ok(events) => events,
                Err(e) => {
                    let _ = request.reply.send(Err(e.into()));
                    continue;
                }
            };
            if events.is_empty() {
                unchanged.push(request);
                continue;
            }
            let record = CommitRecord {
                commit_id: Uuid::now_v7(),
                stream: StreamRef {
                    stream_type: A::TYPE.to_owned(),
                    id: request.stream_id.clone(),
                },
                expected_version: version,
                events: events
                    .iter()
                    .zip(version + 1..)
                    .map(|(event, v)| encode_event(event, Uuid::now_v7(), v))
                    .collect(),
                command: CommandMeta {
                    id: Uuid::now_v7(),
                    command_type: request.meta.command_type.to_owned(),
                    idempotency_key: request.meta.idempotency_key.clone(),
                    actor: request.meta.actor.clone(),
                    correlation_id: request.meta.correlation_id.clone(),
                    causation_id: request.meta.causation_id.clone(),
                    request_digest: request.meta.request_digest.clone(),
                },
                writer: writer.clone(),
                recorded_at: Timestamp::now(),
                prev_hash: last_hash,
                hash: String::new(),
                signature: None,
            }
            .sealed_and_signed(&self.signing_key);
            let next = events.iter().fold(state, |s, e| s.evolve(e));
            overlay.insert(
                request.stream_id.clone(),
                (next, record.next_version(), Some(record.hash.clone())),
            );
            pending.push(Pending {
                record,
                key,
                traceparent: request.meta.traceparent.clone(),
                replies: vec![request.reply],
            });
        }

        if !pending.is_empty() {
            let verdicts = self.append_and_read_back(&pending).await;
            for p in pending {
                let answer = match verdicts.get(&p.record.commit_id) {
                    Some(&(true, offset)) => Ok(self.outcome_of(&p.record, offset)),
                    Some(&(false, _)) => Err(ApiError::Unavailable(
                        "the log did not accept the commit (the partition changed hands or the stream moved on); retry".into(),
                    )),
                    None => Err(ApiError::Unavailable(
                        "the commit could not be confirmed; retry with the same Idempotency-Key".into(),
                    )),
                };
                for (i, reply) in p.replies.into_iter().enumerate() {
                    let answer = match &answer {
                        Ok(outcome) => Ok(Outcome {
                            replayed: i > 0,
                            ..outcome.clone()
                        }),
                        Err(e) => Err(ApiError::Unavailable(e.to_string())),
                    };
                    let _ = reply.send(answer);
                }
            }
        }

        // Commands that changed nothing are answered with the stream as now read.
        for request in unchanged {
            let answer = match self.streams.get(&request.stream_id) {
                Some(s) => Ok(Outcome {
                    stream: StreamRef {
                        stream_type: A::TYPE.to_owned(),
                        id: request.stream_id.clone(),
                    },
                    version: s.version,
                    events: Vec::new(),
                    position: s.last_offset.map(|o| self.position(o)),
                    created: false,
                    replayed: false,
                }),
                None => Err(self.unavailable()),
            };
            let _ = request.reply.send(answer);
        }
    }

    /// Appends the flush's commits and reads the partition until all of them are read
    /// back; returns the gate's verdict and offset per commit id.
    async fn append_and_read_back(&mut self, pending: &[Pending]) -> HashMap<Uuid, (bool, i64)> {
        let records: Vec<LogRecord> = pending
            .iter()
            .map(|p| LogRecord::Commit(p.record.clone()))
            .collect();
        let inputs: Vec<(&str, &LogRecord, Option<&str>)> = pending
            .iter()
            .zip(&records)
            .map(|(p, r)| (p.record.stream.id.as_str(), r, p.traceparent.as_deref()))
            .collect();
        let results = self
            .producer
            .append_records(&self.topic, self.partition, &inputs)
            .await;
        let last = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max()
            .copied();
        let failed = results.iter().find_map(|r| r.as_ref().err());
        let read = match (failed, last) {
            (None, Some(last)) => self.read_through(last).await,
            (Some(e), _) => {
                error!(error = %e, "appending failed: re-reading the log before serving again");
                self.status.set(Status::Recovering);
                self.recover().await
            }
            (None, None) => Ok(HashMap::new()),
        };
        match read {
            Ok(verdicts) => verdicts,
            Err(e) => {
                error!(error = %e, "reading back failed: re-reading the log before serving again");
                self.status.set(Status::Recovering);
                HashMap::new()
            }
        }
    }
}
