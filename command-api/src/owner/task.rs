//! The owner's task: it takes the partition by reading it to the end through the gate,
//! appending a fence with the next epoch, and reading up to its own fence; then it serves
//! commands ([`super::flush`]) and follows the log between them.
//!
//! * Its state (stream states, versions, last hashes, idempotency keys) is built only from
//!   what it reads from the log, never from what it meant to write: [`PartitionOwner::apply`]
//!   is the only place it changes.
//! * A produce or read error never leaves a half-state: the partition answers 503 until
//!   it has re-read the log to its end.
//! * A valid fence by another writer means it lost the partition: it answers 503 from then
//!   on and never appends again.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use keel_domain::Aggregate;
use keel_kafka::{
    Checked, Gated, KafkaError, LogEntry, PartitionGate, Rejection, check_records, in_two_halves,
};
use keel_schemas::{
    CommitRecord, FenceRecord, LogRecord, Position, ReceiptRecord, SigningKey, TopicPartition,
    TrustedKeys, Writer, decode_event,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, instrument, warn};
use uuid::Uuid;

use super::idempotency::IdempotencyKeys;
use super::log::PartitionLog;
use super::outcome::{CommandRequest, EventSummary, Outcome, OwnerError};
use super::receipt;
use super::snapshot;

/// Flushes an owner decides in a row while the one ahead is read back, unless told.
pub const DEFAULT_FLIGHTS: usize = 16;

/// Commands decided and appended together at most.
pub(super) const MAX_FLUSH: usize = 512;

/// Records a catch-up reads before it applies them.
const CHECK_CHUNK: usize = 4096;

/// Chunks of fewer records are checked on the owner's own task.
const PARALLEL_FROM: usize = 256;

/// How often an owner whose snapshot is due, and waits for another's, looks again.
const SNAPSHOT_RETRY: Duration = Duration::from_millis(500);

/// How long a handing-over owner may spend on its last snapshot.
const HANDOFF_SNAPSHOT_WITHIN: Duration = Duration::from_secs(3);

/// How long a recovering owner with no command to serve waits before reading the log
/// again.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(1);

/// What reading a commit told: whether the gate accepted it, and where it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ReadBack {
    /// The gate accepted it.
    pub(super) accepted: bool,
    /// Its offset.
    pub(super) offset: i64,
}

/// The commits read, by commit id.
pub(super) type Verdicts = HashMap<Uuid, ReadBack>;

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

/// Why an owner is asked to stop serving its partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A planned handoff: it takes no new command, answers those it has taken, and
    /// leaves the handoff mark in the log, so the next owner fences after it.
    Handoff,
    /// A planned handoff to a successor that has read the partition already and waits to
    /// fence: as [`Stop::Handoff`], without the snapshot (the successor does not need it,
    /// and waits for the mark).
    HandoffNow,
    /// The partition was taken away (the group dropped this instance, perhaps while it
    /// was paused): it answers those it has taken and writes nothing more.
    Lost,
}

/// A partition owner's status, shared with the readiness route.
#[derive(Clone, Debug)]
pub struct StatusCell {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    cell: Arc<AtomicU8>,
    /// The writer this owner fenced as, once it did.
    writer: Arc<std::sync::OnceLock<String>>,
    /// The epoch of its latest fence (0 before one).
    epoch: Arc<AtomicU64>,
    /// The offset the snapshot it started from covers up to; -1 when it read the
    /// partition from its first record.
    snapshot: Arc<std::sync::atomic::AtomicI64>,
    /// Flights decided and appended while the one ahead of them was read back.
    pipelined: Arc<AtomicU64>,
    /// Of those, the flights answered `503` because the one ahead was not wholly accepted.
    doomed: Arc<AtomicU64>,
    /// The group gave the partition to another instance: the owner serves on until asked
    /// to hand over, and never takes the partition back once fenced out.
    released: Arc<std::sync::atomic::AtomicBool>,
    /// The offset of the last record the owner read; -1 before any.
    last_offset: Arc<std::sync::atomic::AtomicI64>,
    /// The idempotency keys it holds.
    keys: Arc<AtomicU64>,
}

impl StatusCell {
    fn new(topic: &str, partition: i32) -> Self {
        Self {
            topic: topic.to_owned(),
            partition,
            cell: Arc::new(AtomicU8::new(Status::Starting as u8)),
            writer: Arc::new(std::sync::OnceLock::new()),
            epoch: Arc::new(AtomicU64::new(0)),
            snapshot: Arc::new(std::sync::atomic::AtomicI64::new(-1)),
            pipelined: Arc::new(AtomicU64::new(0)),
            doomed: Arc::new(AtomicU64::new(0)),
            released: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            last_offset: Arc::new(std::sync::atomic::AtomicI64::new(-1)),
            keys: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The offset of the last record the owner read; -1 before any.
    pub fn last_offset(&self) -> i64 {
        self.last_offset.load(Ordering::Relaxed)
    }

    /// The idempotency keys the owner holds.
    pub fn keys_held(&self) -> u64 {
        self.keys.load(Ordering::Relaxed)
    }

    /// Notes what the owner has read: up to `offset`, holding `keys` idempotency keys.
    fn note_read(&self, offset: i64, keys: usize) {
        self.last_offset.store(offset, Ordering::Relaxed);
        self.keys.store(keys as u64, Ordering::Relaxed);
    }

    /// True when the group gave the partition to another instance and this owner serves on
    /// only until it hands it over.
    pub fn released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Marks the owner released (or kept again): a released owner never takes the
    /// partition back after another writer fenced it.
    pub fn set_released(&self, released: bool) {
        self.released.store(released, Ordering::Release);
    }

    /// How many flights this owner decided and appended while the one ahead of them was
    /// being read back.
    pub fn pipelined(&self) -> u64 {
        self.pipelined.load(Ordering::Relaxed)
    }

    pub(super) fn count_pipelined(&self) {
        self.pipelined.fetch_add(1, Ordering::Relaxed);
    }

    /// How many of the pipelined flights were answered `503` because a commit of the
    /// flight ahead of them was not accepted.
    pub fn doomed(&self) -> u64 {
        self.doomed.load(Ordering::Relaxed)
    }

    pub(super) fn count_doomed(&self) {
        self.doomed.fetch_add(1, Ordering::Relaxed);
    }

    /// Where the snapshot this owner started from ends (the first offset it read after
    /// it); `None` when it read the partition from its first record.
    pub fn started_from(&self) -> Option<i64> {
        let at = self.snapshot.load(Ordering::Acquire);
        (at >= 0).then_some(at)
    }

    /// The writer name this owner fences as, once it has fenced.
    pub fn writer(&self) -> Option<&str> {
        self.writer.get().map(String::as_str)
    }

    /// The epoch of this owner's latest fence; 0 before its first.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    fn fenced(&self, writer: &Writer) {
        let _ = self.writer.set(writer.instance.clone());
        self.epoch.store(writer.epoch, Ordering::Release);
    }

    /// The current status.
    pub fn get(&self) -> Status {
        Status::from_u8(self.cell.load(Ordering::Acquire))
    }

    pub(super) fn set(&self, status: Status) {
        self.cell.store(status as u8, Ordering::Release);
    }
}

/// A stream of the partition as read from the log.
pub(super) struct Stream<A> {
    pub(super) state: A,
    pub(super) version: u64,
    pub(super) last_hash: Option<String>,
    pub(super) last_offset: Option<i64>,
    /// Why this build cannot decide commands of the stream, if it cannot.
    pub(super) unreadable: Option<String>,
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

/// The owner of one partition of an aggregate's topic.
pub struct PartitionOwner<A: Aggregate, L: PartitionLog> {
    pub(super) topic: String,
    pub(super) partition: i32,
    instance: String,
    /// The configured name with this owner's own part, once it fenced: its writer name.
    incarnation: Option<String>,
    pub(super) writer: Option<Writer>,
    pub(super) gate: PartitionGate,
    pub(super) streams: HashMap<String, Stream<A>>,
    pub(super) keys: IdempotencyKeys,
    pub(super) log: L,
    pub(super) status: StatusCell,
    timeout: Duration,
    undecodable: u64,
    pub(super) signing_key: Arc<SigningKey>,
    /// Where the ids of commits, events and commands come from.
    pub(super) ids: Box<dyn FnMut() -> Uuid + Send>,
    /// Large catch-up chunks are checked on two threads.
    parallel_checks: bool,
    /// How long after losing the partition to another writer this owner fences again,
    /// if it does (an owner the assignment still names takes the partition back).
    retake_after: Option<Duration>,
    /// Records applied between two snapshots this owner writes; `None`: it writes none.
    snapshot_every: Option<u64>,
    /// Records applied since the last snapshot (written or loaded).
    since_snapshot: u64,
    /// The generation of the last snapshot written or loaded.
    snapshot_generation: u64,
    /// The snapshot being written, if one is.
    snapshot_write: Option<tokio::task::JoinHandle<Result<(), KafkaError>>>,
    /// The last record applied: its offset and bytes (a snapshot's anchor).
    last_record: Option<(i64, Vec<u8>)>,
    /// The latest snapshot was looked for (once, before the first catch-up).
    snapshot_sought: bool,
    /// A fence of rules this build does not know took the partition: it never takes it
    /// back.
    newer_rules: bool,
    /// The turns the owners of one process take to write their snapshots, if shared.
    snapshot_turns: Option<Arc<tokio::sync::Semaphore>>,
    /// While a flush is answered: what reading each record told, by record id.
    pub(super) reads: Option<Verdicts>,
    /// Asks the writer serving the partition to hand it over (make-before-break): called
    /// once, when this owner has caught up and is about to fence.
    predecessor: Option<AskPredecessor>,
    /// Flushes decided in a row while the one ahead is read back (1: none).
    pub(super) flights: usize,
    /// Where it records the time commands spend in each phase.
    pub(super) metrics: crate::metrics::CommandMetrics,
}

/// Asks the partition's current writer to hand it over, and waits (boundedly) until it has.
pub type AskPredecessor = Box<dyn FnOnce() -> futures::future::BoxFuture<'static, ()> + Send>;

impl<A: Aggregate + serde::Serialize + serde::de::DeserializeOwned, L: PartitionLog>
    PartitionOwner<A, L>
where
    A::Command: Send,
{
    /// An owner of the partition `log` holds (read from offset 0) that will fence it as
    /// `instance`, signing with `signing_key`, its gate applying the key policy `policy`;
    /// `timeout` bounds each read it waits for.
    pub fn new(
        log: L,
        instance: &str,
        signing_key: Arc<SigningKey>,
        policy: Arc<TrustedKeys>,
        timeout: Duration,
    ) -> (Self, StatusCell) {
        let (topic, partition) = (log.topic().to_owned(), log.partition());
        let status = StatusCell::new(&topic, partition);
        let gate = PartitionGate::new(policy, &TopicPartition::new(topic.clone(), partition));
        let owner = Self {
            topic,
            partition,
            instance: instance.to_owned(),
            incarnation: None,
            writer: None,
            gate,
            streams: HashMap::new(),
            keys: IdempotencyKeys::default(),
            log,
            status: status.clone(),
            timeout,
            undecodable: 0,
            signing_key,
            ids: Box::new(Uuid::now_v7),
            parallel_checks: true,
            retake_after: None,
            snapshot_every: None,
            since_snapshot: 0,
            snapshot_generation: 0,
            snapshot_write: None,
            last_record: None,
            snapshot_sought: false,
            newer_rules: false,
            snapshot_turns: None,
            reads: None,
            predecessor: None,
            flights: DEFAULT_FLIGHTS,
            metrics: crate::metrics::CommandMetrics::default(),
        };
        (owner, status)
    }

    /// The same owner, recording the phases of its commands in `metrics`.
    pub fn with_metrics(mut self, metrics: crate::metrics::CommandMetrics) -> Self {
        self.metrics = metrics;
        self
    }

    /// The same owner, taking the ids of what it writes from `ids` instead of UUID v7s
    /// (the simulation's ids come from its seed).
    pub fn with_ids(mut self, ids: impl FnMut() -> Uuid + Send + 'static) -> Self {
        self.ids = Box::new(ids);
        self
    }

    /// The same owner, keeping each idempotency key for `retention` from its commit's
    /// time instead of [`DEFAULT_KEY_RETENTION`](super::DEFAULT_KEY_RETENTION).
    pub fn with_key_retention(mut self, retention: Duration) -> Self {
        self.keys = IdempotencyKeys::with_retention(retention);
        self
    }

    /// The same owner, deciding up to `flights` flushes in a row while the one ahead of
    /// each is read back; 1 decides each flush only once the one before is answered.
    pub fn pipelining(mut self, flights: usize) -> Self {
        self.flights = flights.max(1);
        self
    }

    /// The same owner, checking every record on its own task (the simulation's runs stay
    /// deterministic only on one thread).
    pub fn checking_on_one_thread(mut self) -> Self {
        self.parallel_checks = false;
        self
    }

    /// The same owner, fencing again `after` it lost the partition to another writer:
    /// for an owner the assignment still names (the other writer was one the assignment
    /// had let go, such as a process that was paused past its session). Long enough for
    /// that writer to learn it was let go, so the two do not take turns.
    pub fn retaking_after(mut self, after: Duration) -> Self {
        self.retake_after = Some(after);
        self
    }

    /// The same owner, writing a snapshot of its state every `every` records it applies
    /// (and when it hands the partition over), and starting from the latest snapshot.
    pub fn with_snapshots(mut self, every: u64) -> Self {
        self.snapshot_every = Some(every.max(1));
        self
    }

    /// The same owner, writing its periodic snapshots only when it holds one of `turns`
    /// (shared by the owners of one process, so their snapshots are written one at a time).
    pub fn taking_snapshot_turns(mut self, turns: Arc<tokio::sync::Semaphore>) -> Self {
        self.snapshot_turns = Some(turns);
        self
    }

    /// The same owner, calling `ask` once it has read the partition (from the latest
    /// snapshot) up to its end and before it fences, when another writer holds the
    /// partition: that writer, still serving meanwhile, hands it over (its last flush, its
    /// handoff mark), and this owner fences right after. A planned handoff then costs the
    /// partition only a few round trips without an owner, not the new owner's whole start.
    /// Safety does not depend on it: whatever `ask` does, the fence decides.
    pub fn after_predecessor_hands_over(mut self, ask: AskPredecessor) -> Self {
        self.predecessor = Some(ask);
        self
    }

    /// Takes the partition, then serves commands from `requests` until the channel closes.
    pub async fn run(self, requests: mpsc::Receiver<CommandRequest<A>>) {
        self.run_until(requests, None).await;
    }

    /// Takes the partition, then serves commands from `requests` until the channel closes
    /// or `stop` asks it to stop: then it takes no new command, answers those already
    /// queued, and (for a [`Stop::Handoff`]) leaves the handoff mark in the log. Stopped
    /// before it owns the partition, it returns at once (it has answered nothing).
    #[instrument(name = "partition_owner", skip_all, fields(topic = %self.topic, partition = self.partition))]
    pub async fn run_until(
        mut self,
        mut requests: mpsc::Receiver<CommandRequest<A>>,
        mut stop: Option<oneshot::Receiver<Stop>>,
    ) {
        let taken = async {
            loop {
                match self.take_ownership().await {
                    Ok(()) => break,
                    Err(e) => {
                        error!(error = %e, "could not take the partition; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = taken => {}
            asked = stop_asked(&mut stop) => {
                info!(?asked, "stopped before owning the partition");
                return;
            }
        }
        let mut stopping: Option<Stop> = None;
        let mut retake_at: Option<tokio::time::Instant> = None;
        loop {
            self.snapshot_if_due();
            retake_at = match (self.status.get(), self.retake_after) {
                (Status::Lost, Some(after))
                    if stopping.is_none() && !self.newer_rules && !self.status.released() =>
                {
                    Some(retake_at.unwrap_or_else(|| tokio::time::Instant::now() + after))
                }
                _ => None,
            };
            tokio::select! {
                biased;
                asked = stop_asked(&mut stop), if stopping.is_none() => {
                    info!(?asked, "stopping: taking no new command, answering those queued");
                    stopping = Some(asked);
                    requests.close();
                }
                request = requests.recv() => {
                    let Some(first) = request else {
                        match stopping {
                            Some(Stop::Handoff) => self.hand_over(true).await,
                            Some(Stop::HandoffNow) => self.hand_over(false).await,
                            _ => {}
                        }
                        return;
                    };
                    if stopping == Some(Stop::Lost) {
                        // Another instance may own the partition already: nothing more is
                        // taken on (so nothing more is appended).
                        let _ = first.reply.send(Err(OwnerError::Unavailable(format!(
                            "this instance no longer owns {}/{}; retry",
                            self.topic, self.partition
                        ))));
                        continue;
                    }
                    let mut batch = vec![first];
                    while batch.len() < MAX_FLUSH {
                        match requests.try_recv() {
                            Ok(request) => batch.push(request),
                            Err(_) => break,
                        }
                    }
                    self.flush(batch, &mut requests).await;
                }
                entry = self.log.next(), if self.status.get() != Status::Lost => match entry {
                    Ok(entry) => {
                        self.apply(entry);
                    }
                    Err(e) => {
                        // Until it has read the log again, the owner cannot tell whether
                        // its state is current: it answers nothing from it.
                        warn!(error = %e, "reading the partition failed: re-reading before serving again");
                        if self.status.get() == Status::Serving {
                            self.status.set(Status::Recovering);
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                // A partition that stopped serving after an error recovers on its own, not
                // only when a command arrives: readiness reports it until then.
                () = tokio::time::sleep(RECOVERY_INTERVAL), if self.status.get() == Status::Recovering => {
                    if let Err(e) = self.recover().await {
                        warn!(error = %e, "still recovering");
                    }
                }
                // A snapshot due while another owner's is written: looked at again soon,
                // also when nothing else happens on the partition.
                () = tokio::time::sleep(SNAPSHOT_RETRY), if self.snapshot_due() => {}
                () = sleep_until(retake_at), if retake_at.is_some() && !self.status.released() => {
                    info!("still assigned the partition another writer fenced: taking it back");
                    // The next attempt, if this one fails, waits a whole delay again.
                    retake_at = None;
                    if let Err(e) = self.take_ownership().await {
                        warn!(error = %e, "could not take the partition back; trying again later");
                        self.status.set(Status::Lost);
                    }
                }
            }
        }
    }

    /// Leaves the handoff mark in the log (this writer has stopped writing here), then a
    /// snapshot of everything before it, so the next owner reads only what follows; within
    /// [`HANDOFF_SNAPSHOT_WITHIN`], or the next owner reads more.
    async fn hand_over(&mut self, with_snapshot: bool) {
        if self.status.get() != Status::Serving {
            return;
        }
        let Some(writer) = self.writer.clone() else {
            return;
        };
        let at = TopicPartition::new(self.topic.clone(), self.partition);
        let mark = LogRecord::Fence(FenceRecord::handoff(writer, &at).signed(&self.signing_key));
        match self.log.append_one(("", &mark, None)).await {
            Ok(offset) => info!(offset, "handed the partition over"),
            // The next owner fences all the same: the mark only tells it (and the audit)
            // that this writer stopped.
            Err(e) => warn!(error = %e, "could not leave the handoff mark"),
        }
        if !with_snapshot || self.snapshot_every.is_none() || self.since_snapshot == 0 {
            return;
        }
        let written = async {
            if let Some(earlier) = self.snapshot_write.take() {
                let _ = earlier.await;
            }
            match self.snapshot_now() {
                Some(write) => write.await,
                None => Ok(()),
            }
        };
        match tokio::time::timeout(HANDOFF_SNAPSHOT_WITHIN, written).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not write the handoff snapshot"),
            Err(_) => warn!("the handoff snapshot was not written in time"),
        }
    }

    /// Starts a snapshot's write when enough records were applied since the last one and
    /// no other is being written.
    fn snapshot_if_due(&mut self) {
        if self
            .snapshot_write
            .as_ref()
            .is_some_and(|w| w.is_finished())
            && let Some(Ok(Err(e))) = self.snapshot_write.take().and_then(|w| w.now_or_never())
        {
            warn!(error = %e, "writing a snapshot failed: the next one is written as usual");
        }
        if !self.snapshot_due() {
            return;
        }
        // Owners sharing a turn write one snapshot at a time, so that at most one body (a
        // partition's whole state in JSON) is held in memory at once.
        let turn = match &self.snapshot_turns {
            Some(turns) => match Arc::clone(turns).try_acquire_owned() {
                Ok(turn) => Some(turn),
                Err(_) => return,
            },
            None => None,
        };
        if let Some(write) = self.snapshot_now() {
            self.snapshot_write = Some(tokio::spawn(async move {
                let written = write.await;
                drop(turn);
                written
            }));
        }
    }

    /// True when enough records were applied since the last snapshot, the owner serves,
    /// and none of its snapshots is being written.
    fn snapshot_due(&self) -> bool {
        self.snapshot_every
            .is_some_and(|every| self.since_snapshot >= every)
            && self.status.get() == Status::Serving
            && self.snapshot_write.is_none()
    }

    /// A snapshot of the owner's state now (everything applied so far), to be written.
    fn snapshot_now(
        &mut self,
    ) -> Option<impl std::future::Future<Output = Result<(), KafkaError>> + Send + 'static> {
        let writer = self.writer.clone()?;
        let (offset, payload) = self.last_record.as_ref()?;
        let at = TopicPartition::new(self.topic.clone(), self.partition);
        let started = std::time::Instant::now();
        let holding = snapshot::Holding {
            at: &at,
            next_offset: offset + 1,
            anchor: snapshot::anchor_of(payload),
            gate: &self.gate,
            streams: &self.streams,
            keys: self.keys.export(),
            undecodable: self.undecodable,
            writer: &writer,
            generation: self.snapshot_generation + 1,
            key_retention: self.keys.retention(),
        };
        let next_offset = holding.next_offset;
        match snapshot::write(holding, &self.signing_key) {
            Ok(stored) => {
                self.snapshot_generation += 1;
                self.since_snapshot = 0;
                info!(
                    next_offset,
                    streams = self.streams.len(),
                    bytes = stored.body.len(),
                    took_ms = started.elapsed().as_millis(),
                    "writing a snapshot"
                );
                Some(self.log.write_snapshot(stored, self.snapshot_generation))
            }
            Err(e) => {
                warn!(error = %e, "could not make a snapshot");
                None
            }
        }
    }

    /// Starts from the partition's latest snapshot, once it is checked: its signature,
    /// body, partition and build, and its last record against the log's. Otherwise (no
    /// snapshot, or one that fails a check) reads the partition from its first record.
    async fn load_snapshot(&mut self) {
        let at = TopicPartition::new(self.topic.clone(), self.partition);
        let stored = match self.log.latest_snapshot().await {
            Ok(Some(stored)) => stored,
            Ok(None) => return,
            Err(e) => {
                warn!(error = %e, "the partition's snapshot cannot be read: reading the partition from its first record");
                return;
            }
        };
        let manifest = match snapshot::check::<A>(
            &stored,
            self.gate.policy(),
            &at,
            self.keys.retention(),
        ) {
            Ok(manifest) => manifest,
            Err(reason) => {
                warn!(%reason, "ignoring the partition's snapshot: reading the partition from its first record");
                return;
            }
        };
        let anchor_at = manifest.next_offset - 1;
        let end = match self.log.end().await {
            Ok(end) => end,
            Err(e) => {
                warn!(error = %e, "reading where the partition ends");
                return;
            }
        };
        if manifest.next_offset > end {
            warn!(
                next_offset = manifest.next_offset,
                end, "ignoring a snapshot of more records than the partition holds"
            );
            return;
        }
        self.log.seek(anchor_at);
        let anchored = match tokio::time::timeout(self.timeout, self.log.next()).await {
            Ok(Ok(entry)) => {
                let same = entry.offset == anchor_at
                    && snapshot::anchor_of(&entry.payload) == manifest.anchor;
                if same { Some(entry) } else { None }
            }
            _ => None,
        };
        let Some(anchor) = anchored else {
            warn!(
                offset = anchor_at,
                "ignoring the partition's snapshot: its last record is not the log's; reading the partition from its first record"
            );
            self.log.seek(0);
            return;
        };
        let generation = manifest.generation;
        let next_offset = manifest.next_offset;
        match snapshot::restore::<A>(manifest, &stored.body, Arc::clone(self.gate.policy()), &at) {
            Ok(restored) => {
                self.gate = restored.gate;
                self.streams = restored.streams;
                self.keys = IdempotencyKeys::import(
                    self.keys.retention(),
                    restored.keys,
                    restored.log_time,
                );
                self.undecodable = restored.undecodable;
                self.snapshot_generation = generation;
                self.since_snapshot = 0;
                self.last_record = Some((anchor.offset, anchor.payload));
                self.status.snapshot.store(next_offset, Ordering::Release);
                info!(
                    next_offset,
                    generation,
                    streams = self.streams.len(),
                    written_by = ?restored.manifest.written_by,
                    "starting from the partition's snapshot"
                );
            }
            Err(reason) => {
                warn!(%reason, "ignoring the partition's snapshot: reading the partition from its first record");
                self.log.seek(0);
            }
        }
    }

    async fn take_ownership(&mut self) -> Result<(), KafkaError> {
        self.status.set(Status::Starting);
        if !self.snapshot_sought && self.log.next_offset() == 0 {
            self.snapshot_sought = true;
            self.load_snapshot().await;
        }
        self.catch_up().await?;
        if self.newer_rules {
            // A newer command API fenced the partition under rules this build cannot
            // judge: a fence of its own would rank below that one for the newer readers,
            // which would then skip everything this owner acknowledged.
            self.status.set(Status::Lost);
            return Ok(());
        }
        if self.writer.is_none()
            && self.gate.owner().is_some()
            && let Some(ask) = self.predecessor.take()
        {
            // The predecessor answers once it has answered what it took and left its mark:
            // the fence goes straight after them, and reading it back reads them too.
            // Nothing is decided before that read, and the gate rules on the fence by its
            // place in the log, whatever was appended before it.
            ask().await;
        }
        // The writer's name is the configured one and a part drawn at this owner's start:
        // two processes started with one KEEL_INSTANCE that read the same end of the log
        // both fence with the same epoch, and only the one whose fence the gate accepted
        // may be the owner it names.
        if self.incarnation.is_none() {
            let id = (self.ids)().simple().to_string();
            self.incarnation = Some(format!("{}/{}", self.instance, &id[id.len() - 12..]));
        }
        let epoch = self.gate.highest_epoch().checked_add(1).ok_or_else(|| {
            KafkaError::NotSent("the partition's highest epoch is the largest there is".into())
        })?;
        let writer = Writer {
            instance: self.incarnation.clone().unwrap_or_default(),
            epoch,
        };
        let at = TopicPartition::new(self.topic.clone(), self.partition);
        let fence =
            LogRecord::Fence(FenceRecord::ruled(writer.clone(), &at).signed(&self.signing_key));
        let offset = self.log.append_one(("", &fence, None)).await?;
        self.status.fenced(&writer);
        self.writer = Some(writer.clone());
        self.read_through(offset).await?;
        if self.gate.owner() == Some(&writer) && !self.newer_rules {
            info!(
                epoch = writer.epoch,
                streams = self.streams.len(),
                idempotency_keys = self.keys.len(),
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
    /// Each record is applied as it is read, so a catch-up that fails partway resumes
    /// where it applied, never past a record it did not apply.
    ///
    /// Records are read in chunks of at most [`CHECK_CHUNK`], so a catch-up holds no more
    /// than that in memory however long the partition; each chunk's commits have their
    /// hashes and signatures checked together (on two threads for a large chunk), then
    /// every record read is applied in order, also when the read failed partway.
    pub(super) async fn catch_up(&mut self) -> Result<Verdicts, KafkaError> {
        let end = self.log.end().await?;
        let mut verdicts = HashMap::new();
        while self.log.next_offset() < end {
            let mut chunk = Vec::new();
            let mut failed = None;
            while self.log.next_offset() < end && chunk.len() < CHECK_CHUNK {
                match tokio::time::timeout(self.timeout, self.log.next()).await {
                    Ok(Ok(entry)) => chunk.push(entry),
                    Ok(Err(e)) => {
                        failed = Some(e);
                        break;
                    }
                    Err(_) => {
                        failed = Some(KafkaError::Timeout(format!(
                            "reading {}/{} at offset {} towards {end}",
                            self.topic,
                            self.partition,
                            self.log.next_offset()
                        )));
                        break;
                    }
                }
            }
            let checked = Self::check(Arc::clone(self.gate.policy()), self.parallel_checks, chunk);
            for (entry, record, check) in checked.await {
                let gated = self.gate.read_decoded(entry, record, check.as_ref());
                verdicts.extend(self.apply_gated(gated));
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(verdicts)
    }

    /// Decodes a chunk of records and checks its commits' hashes and signatures: on two
    /// threads when it is large and `parallel`. Holds nothing of the owner across its
    /// awaits.
    async fn check(policy: Arc<TrustedKeys>, parallel: bool, chunk: Vec<LogEntry>) -> Vec<Checked> {
        if !parallel || chunk.len() < PARALLEL_FROM {
            return check_records(chunk, &policy);
        }
        match in_two_halves(chunk, move |half| check_records(half, &policy)).await {
            Ok(checked) => checked,
            // The blocking pool is gone (the runtime is shutting down): nothing is applied,
            // and the caller's next read starts after the lost records, so the owner must
            // not go on. It stops like a task whose runtime ends.
            Err(e) => panic!("checking records on the blocking pool failed: {e}"),
        }
    }

    /// Reads until the record at `offset` has been applied.
    pub(super) async fn read_through(&mut self, offset: i64) -> Result<Verdicts, KafkaError> {
        let mut verdicts = HashMap::new();
        while self.log.next_offset() <= offset {
            let entry = tokio::time::timeout(self.timeout, self.log.next())
                .await
                .map_err(|_| KafkaError::Timeout(format!("reading back offset {offset}")))??;
            verdicts.extend(self.apply(entry));
        }
        Ok(verdicts)
    }

    /// Applies one record read from the log, through the gate. With
    /// [`PartitionOwner::apply_gated`], the only place the owner's state changes.
    fn apply(&mut self, entry: LogEntry) -> Option<(Uuid, ReadBack)> {
        let gated = self.gate.read(entry);
        self.apply_gated(gated)
    }

    /// Applies a record the gate has just read; while a flush is answered, notes what
    /// reading it told.
    fn apply_gated(&mut self, gated: Gated) -> Option<(Uuid, ReadBack)> {
        let offset = gated.entry.offset;
        let read = self.apply_record(gated);
        self.status.note_read(offset, self.keys.len());
        if let (Some(reads), Some((id, verdict))) = (self.reads.as_mut(), read) {
            reads.insert(id, verdict);
        }
        read
    }

    /// Applies a record the gate has just read.
    fn apply_record(&mut self, gated: Gated) -> Option<(Uuid, ReadBack)> {
        let Gated {
            mut entry, record, ..
        } = gated;
        self.since_snapshot += 1;
        self.last_record = Some((entry.offset, std::mem::take(&mut entry.payload)));
        let (record, verdict) = match record {
            Ok(read) => read,
            Err(e) => {
                self.undecodable += 1;
                warn!(offset = entry.offset, error = %e, "skipping a record that is not a Keel record");
                return None;
            }
        };
        match (record, verdict) {
            (LogRecord::Fence(fence), Ok(())) => {
                if Some(&fence.writer) != self.writer.as_ref() && self.writer.is_some() {
                    warn!(new_owner = ?fence.writer, "another writer fenced the partition: no longer serving it");
                    self.status.set(Status::Lost);
                }
                None
            }
            // A newer writer may have taken the partition under rules this build cannot
            // judge: acknowledging on would risk answers its readers do not count.
            (LogRecord::Fence(fence), Err(Rejection::UnknownRules { rules, .. }))
                if fence.writer.epoch > self.gate.highest_epoch() =>
            {
                error!(
                    offset = entry.offset,
                    writer = ?fence.writer,
                    rules,
                    "a fence of rules this build does not know: a newer command API may own the partition; \
                     not serving it (stop this instance and run the newer build)"
                );
                self.newer_rules = true;
                self.status.set(Status::Lost);
                None
            }
            (LogRecord::Fence(fence), Err(Rejection::Handoff { .. })) => {
                info!(offset = entry.offset, writer = ?fence.writer, "the partition was handed over");
                None
            }
            (LogRecord::Fence(fence), Err(rejection)) => {
                debug!(offset = entry.offset, writer = ?fence.writer, %rejection, "gate skipped a fence");
                None
            }
            (LogRecord::Commit(commit), Ok(())) => {
                let id = commit.commit_id;
                self.apply_commit(&commit, entry.offset);
                Some((
                    id,
                    ReadBack {
                        accepted: true,
                        offset: entry.offset,
                    },
                ))
            }
            (LogRecord::Receipt(receipt), Ok(())) => {
                self.apply_receipt(&receipt, entry.offset);
                Some((
                    receipt.receipt_id,
                    ReadBack {
                        accepted: true,
                        offset: entry.offset,
                    },
                ))
            }
            (LogRecord::Receipt(receipt), Err(rejection)) => {
                info!(offset = entry.offset, stream = %receipt.stream, %rejection, "gate skipped a receipt");
                Some((
                    receipt.receipt_id,
                    ReadBack {
                        accepted: false,
                        offset: entry.offset,
                    },
                ))
            }
            (LogRecord::Commit(commit), Err(rejection)) => {
                info!(offset = entry.offset, stream = %commit.stream, %rejection, "gate skipped a commit");
                Some((
                    commit.commit_id,
                    ReadBack {
                        accepted: false,
                        offset: entry.offset,
                    },
                ))
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
            self.keys.remember(
                (commit.stream.id.clone(), key.clone()),
                commit.command.request_digest.clone(),
                Ok(outcome),
                commit.recorded_at.as_datetime(),
                chrono::Utc::now(),
            );
        }
    }

    /// Takes a receipt the gate accepted: the stream's chain moves onto it (its version
    /// does not), and its key holds the answer it recorded.
    fn apply_receipt(&mut self, receipt: &ReceiptRecord, offset: i64) {
        // A receipt of another stream type (in this topic by mistake) links another chain
        // than this aggregate's stream of the same id.
        if receipt.stream.stream_type != A::TYPE {
            return;
        }
        let stream = self.streams.entry(receipt.stream.id.clone()).or_default();
        stream.last_hash = Some(receipt.hash.clone());
        stream.last_offset = Some(offset);
        let Some(key) = &receipt.command.idempotency_key else {
            return;
        };
        // A receipt this build cannot read (a newer build's answer) still holds its key:
        // a retry is told to come back, never decided afresh.
        let answer = receipt::answer_of(receipt, self.position(offset)).unwrap_or_else(|| {
            warn!(offset, stream = %receipt.stream, "a receipt this build cannot read: its key answers 503");
            Err(OwnerError::Unavailable(
                "this key's answer was recorded by a newer build of the command API; retry against it".into(),
            ))
        });
        self.keys.remember(
            (receipt.stream.id.clone(), key.clone()),
            receipt.command.request_digest.clone(),
            answer,
            receipt.recorded_at.as_datetime(),
            chrono::Utc::now(),
        );
    }

    pub(super) fn position(&self, offset: i64) -> Position {
        Position {
            topic: self.topic.clone(),
            partition: self.partition,
            offset,
        }
    }

    /// The answer to the command of `commit`, read at `offset`.
    pub(super) fn outcome_of(&self, commit: &CommitRecord, offset: i64) -> Outcome {
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
            // Only a stream's first commit opens it: every other command of an
            // aggregate refuses a stream that does not exist.
            created: commit.expected_version == 0,
            replayed: false,
        }
    }

    pub(super) fn unavailable(&self) -> OwnerError {
        OwnerError::Unavailable(match self.status.get() {
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
    pub(super) async fn recover(&mut self) -> Result<Verdicts, KafkaError> {
        let verdicts = self.catch_up().await?;
        if self.status.get() == Status::Recovering {
            // A fence of rules this build does not know leaves the gate's owner as it was,
            // and stops this owner for good.
            if self.gate.owner() == self.writer.as_ref() && !self.newer_rules {
                info!("recovered: serving again");
                self.status.set(Status::Serving);
            } else {
                self.status.set(Status::Lost);
            }
        }
        Ok(verdicts)
    }
}

/// Waits until `stop` asks the owner to stop; forever when it never will.
async fn stop_asked(stop: &mut Option<oneshot::Receiver<Stop>>) -> Stop {
    let Some(rx) = stop.as_mut() else {
        return std::future::pending().await;
    };
    let asked = rx.await;
    *stop = None;
    match asked {
        Ok(asked) => asked,
        // Nobody can ask any more.
        Err(_) => std::future::pending().await,
    }
}

/// Sleeps until `at`; forever when there is no `at`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
