//! The simulated world around the owners: one partition in memory whose producer and
//! reader fail as a seed decides, and the other writers on the partition (a rival
//! instance that fences and commits properly, a forger with produce rights and no key).
//!
//! Every decision draws from the one seeded random source, on a single-threaded runtime
//! whose clock only moves when every task waits: the same seed makes the same run.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use keel_domain::Aggregate;
use keel_domain::ids::Quantity;
use keel_domain::product::{Product, ProductCommand};
use keel_kafka::{KafkaError, LogEntry};
use keel_schemas::{
    CommandMeta, CommitRecord, FenceRecord, LogRecord, SigningKey, StreamRef, TopicPartition,
    TrustedKeys, Writer, encode_event,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;
use uuid::Uuid;

use super::check::Fold;
use crate::owner::log::{Append, PartitionLog};
use crate::owner::memory::MemoryLog;
use crate::owner::snapshot::StoredSnapshot;

/// The topic of the simulated partition.
pub(crate) const SIM_TOPIC: &str = "sim.product.events";

/// The simulated partition: partition 0 of [`SIM_TOPIC`].
pub(crate) fn sim_partition() -> TopicPartition {
    TopicPartition::new(SIM_TOPIC, 0)
}

/// The kinds of fault a run may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Fault {
    /// A produce fails and nothing is persisted.
    AppendFails,
    /// A produce's acknowledgement times out although the broker persisted it.
    TimedOutButPersisted,
    /// A produce times out and the broker persists it later, visible only then.
    PersistedLater,
    /// A produce persists its first records and fails the rest.
    PartlyPersisted,
    /// A produce's acknowledgement is slow (up to past the owner's timeout).
    SlowAcknowledgement,
    /// A fetch fails, at any point of a catch-up or a read-back.
    FetchFails,
    /// A fetch stalls longer than the owner's timeout.
    FetchStalls,
    /// Asking where the partition ends fails or stalls.
    EndFails,
    /// Another instance fences the partition and commits as its owner.
    RivalFences,
    /// Someone with produce rights and no key appends an unsigned fence in the owner's
    /// name and a commit with a wrong hash.
    Forgery,
    /// The owner's process dies and a new one starts.
    Crash,
    /// A second process starts with the same configured instance name while the first
    /// still runs.
    Twin,
    /// Clients give up waiting and retry.
    ClientGivesUp,
    /// The owner's process hands the partition over (a planned handoff: it answers what
    /// it has taken, writes a snapshot and the handoff mark) and a new one starts.
    Handoff,
    /// The owner's process is told its partition was lost (the group dropped it): it
    /// answers what it has taken and stops; a new one starts.
    Lost,
    /// The latest snapshot is tampered with or cut short.
    TamperSnapshot,
    /// A client (or a proxy in front) sends a keyed command again shortly after the first
    /// time, while the first is still being answered.
    Hedge,
}

impl Fault {
    /// Every kind.
    pub(crate) const ALL: [Fault; 17] = [
        Fault::AppendFails,
        Fault::TimedOutButPersisted,
        Fault::PersistedLater,
        Fault::PartlyPersisted,
        Fault::SlowAcknowledgement,
        Fault::FetchFails,
        Fault::FetchStalls,
        Fault::EndFails,
        Fault::RivalFences,
        Fault::Forgery,
        Fault::Crash,
        Fault::Twin,
        Fault::ClientGivesUp,
        Fault::Handoff,
        Fault::Lost,
        Fault::TamperSnapshot,
        Fault::Hedge,
    ];
}

/// How likely each fault is in one run (per operation, or per second for the
/// process-level ones); drawn from the seed, so runs range from calm to stormy.
#[derive(Clone, Debug)]
pub(crate) struct Faults {
    rates: Vec<(Fault, f64)>,
}

impl Faults {
    /// Rates for `enabled` drawn from `rng`: each kind is off in a third of the runs.
    pub(crate) fn draw(rng: &mut ChaCha8Rng, enabled: &[Fault]) -> Self {
        let rates = enabled
            .iter()
            .map(|&fault| {
                let rate = if rng.gen_bool(1.0 / 3.0) {
                    0.0
                } else {
                    rng.gen_range(0.0..Self::max(fault))
                };
                (fault, rate)
            })
            .collect();
        Self { rates }
    }

    fn max(fault: Fault) -> f64 {
        match fault {
            Fault::AppendFails | Fault::SlowAcknowledgement => 0.15,
            Fault::TimedOutButPersisted | Fault::PersistedLater | Fault::PartlyPersisted => 0.1,
            Fault::FetchFails | Fault::FetchStalls => 0.03,
            Fault::EndFails => 0.1,
            // Per second of simulated time.
            Fault::RivalFences
            | Fault::Forgery
            | Fault::Crash
            | Fault::Twin
            | Fault::Handoff
            | Fault::Lost
            | Fault::TamperSnapshot => 0.05,
            Fault::Hedge => 0.2,
            Fault::ClientGivesUp => 0.5,
        }
    }

    /// The rate of `fault` (0 when it is not enabled).
    pub(crate) fn rate(&self, fault: Fault) -> f64 {
        self.rates
            .iter()
            .find(|(f, _)| *f == fault)
            .map_or(0.0, |(_, r)| *r)
    }
}

/// A produce whose acknowledgement timed out, persisted later.
struct Late {
    ticket: u64,
    producer: usize,
    records: Vec<(String, LogRecord, Option<String>)>,
}

/// Everything the simulated processes share: the log, the random source, the faults, the
/// trace.
pub(crate) struct World {
    pub(crate) rng: ChaCha8Rng,
    pub(crate) faults: Faults,
    /// Set for the run's last phase: no more faults.
    pub(crate) calm: bool,
    pub(crate) trace: Vec<String>,
    pub(crate) log: MemoryLog,
    /// The key policy every reader applies.
    pub(crate) policy: Arc<TrustedKeys>,
    pub(crate) timeout: Duration,
    started: Instant,
    late: Vec<Late>,
    tickets: u64,
    /// Faults injected, by kind.
    pub(crate) injected: Vec<(Fault, u64)>,
}

/// The world, shared.
pub(crate) type Shared = Arc<Mutex<World>>;

/// A run that panicked while holding the lock has failed already.
pub(crate) fn lock(world: &Shared) -> MutexGuard<'_, World> {
    world.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How one produce goes.
#[derive(Clone, Copy, Debug)]
enum Produce {
    Ok,
    Fails,
    TimedOutButPersisted,
    PersistedLater(Duration),
    Partly(usize),
}

impl World {
    pub(crate) fn new(seed: u64, enabled: &[Fault], timeout: Duration) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let faults = Faults::draw(&mut rng, enabled);
        Self {
            rng,
            faults,
            calm: false,
            trace: Vec::new(),
            log: MemoryLog::new(SIM_TOPIC, 0),
            policy: Arc::default(),
            timeout,
            started: Instant::now(),
            late: Vec::new(),
            tickets: 0,
            injected: Vec::new(),
        }
    }

    /// Milliseconds of simulated time since the run started.
    pub(crate) fn now_ms(&self) -> u128 {
        self.started.elapsed().as_millis()
    }

    /// Adds a line to the trace, stamped with the simulated time.
    pub(crate) fn note(&mut self, line: impl AsRef<str>) {
        let line = format!("{:>8} {}", self.now_ms(), line.as_ref());
        self.trace.push(line);
    }

    /// True, with the rate of `fault`, unless the run is calm; counts the fault.
    pub(crate) fn chance(&mut self, fault: Fault) -> bool {
        let rate = self.faults.rate(fault);
        if self.calm || rate == 0.0 || !self.rng.gen_bool(rate.min(1.0)) {
            return false;
        }
        match self.injected.iter_mut().find(|(f, _)| *f == fault) {
            Some((_, n)) => *n += 1,
            None => self.injected.push((fault, 1)),
        }
        true
    }

    /// A duration between `low` and `high`.
    pub(crate) fn between(&mut self, low: Duration, high: Duration) -> Duration {
        Duration::from_millis(
            self.rng
                .gen_range(low.as_millis() as u64..=high.as_millis() as u64),
        )
    }

    /// A fresh id from the seed.
    pub(crate) fn id(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.r#gen()).into_uuid()
    }

    /// The number of records in the log.
    pub(crate) fn len(&self) -> usize {
        self.log.entries().len()
    }

    fn persist(&mut self, records: &[Append<'_>]) -> Vec<Result<i64, KafkaError>> {
        let offsets = self.log.push(records);
        for (offset, (_, record, _)) in offsets.iter().zip(records) {
            let line = describe(record);
            self.note(format!(
                "log {:>4} {line}",
                offset.as_ref().copied().unwrap_or(-1)
            ));
        }
        offsets
    }

    /// Persists what `producer` sent earlier and was persisted late, before anything it
    /// sends next: a producer's records keep their order.
    fn persist_late_of(&mut self, producer: usize) {
        let (due, rest): (Vec<Late>, Vec<Late>) = std::mem::take(&mut self.late)
            .into_iter()
            .partition(|l| l.producer == producer);
        self.late = rest;
        for late in due {
            self.persist_owned(&late);
        }
    }

    fn persist_owned(&mut self, late: &Late) {
        self.note(format!("late produce #{} lands", late.ticket));
        let records: Vec<Append<'_>> = late
            .records
            .iter()
            .map(|(k, r, t)| (k.as_str(), r, t.as_deref()))
            .collect();
        self.persist(&records);
    }

    fn draw_produce(&mut self, count: usize) -> (Produce, Duration) {
        let quick = self.between(Duration::ZERO, Duration::from_millis(20));
        let past_timeout = self.timeout + self.between(Duration::ZERO, self.timeout);
        if self.chance(Fault::AppendFails) {
            return (Produce::Fails, quick);
        }
        if self.chance(Fault::TimedOutButPersisted) {
            return (Produce::TimedOutButPersisted, past_timeout);
        }
        if self.chance(Fault::PersistedLater) {
            let later = self.between(Duration::ZERO, self.timeout * 4);
            return (Produce::PersistedLater(later), past_timeout);
        }
        if count > 1 && self.chance(Fault::PartlyPersisted) {
            let k = self.rng.gen_range(1..count);
            return (Produce::Partly(k), quick);
        }
        if self.chance(Fault::SlowAcknowledgement) {
            return (Produce::Ok, past_timeout);
        }
        (Produce::Ok, quick)
    }
}

/// One line of the trace for a record.
pub(crate) fn describe(record: &LogRecord) -> String {
    match record {
        LogRecord::Fence(f) => format!(
            "fence {}#{}{}",
            f.writer.instance,
            f.writer.epoch,
            if f.signature.is_some() {
                ""
            } else {
                " unsigned"
            }
        ),
        LogRecord::Commit(c) => format!(
            "commit {} {}->{} by {}#{} [{}] {}",
            c.stream.id,
            c.expected_version,
            c.next_version(),
            c.writer.instance,
            c.writer.epoch,
            c.command.correlation_id,
            c.commit_id
        ),
        LogRecord::Receipt(r) => format!(
            "receipt {} at {} by {}#{} [{}] {}",
            r.stream.id,
            r.version,
            r.writer.instance,
            r.writer.epoch,
            r.command.correlation_id,
            r.receipt_id
        ),
    }
}

/// Appends `records` for `producer` as the world decides: persisted or not, acknowledged
/// or not, now or later. What reaches the log is decided (and written) when this is
/// called, like records handed to a producer; the answer comes after the world's delay.
fn produce(
    world: &Shared,
    producer: usize,
    records: &[Append<'_>],
) -> impl std::future::Future<Output = Vec<Result<i64, KafkaError>>> + Send + 'static {
    let (how, delay) = {
        let mut w = lock(world);
        w.persist_late_of(producer);
        let (how, delay) = w.draw_produce(records.len());
        w.note(format!(
            "producer {producer}: {} record(s): {how:?} after {}ms",
            records.len(),
            delay.as_millis()
        ));
        (how, delay)
    };
    let failed = |why: &str| Err(KafkaError::NotSent(format!("simulated: {why}")));
    let timed_out = || Err(KafkaError::Timeout("simulated: no acknowledgement".into()));
    let answer = match how {
        Produce::Ok => lock(world).persist(records),
        Produce::Fails => records.iter().map(|_| failed("produce failed")).collect(),
        Produce::TimedOutButPersisted => {
            lock(world).persist(records);
            records.iter().map(|_| timed_out()).collect()
        }
        Produce::PersistedLater(after) => {
            let ticket = {
                let mut w = lock(world);
                w.tickets += 1;
                let ticket = w.tickets;
                w.late.push(Late {
                    ticket,
                    producer,
                    records: records
                        .iter()
                        .map(|(k, r, t)| ((*k).to_owned(), (*r).clone(), t.map(str::to_owned)))
                        .collect(),
                });
                ticket
            };
            let world = Arc::clone(world);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let mut w = lock(&world);
                if let Some(i) = w.late.iter().position(|l| l.ticket == ticket) {
                    let late = w.late.remove(i);
                    w.persist_owned(&late);
                }
            });
            records.iter().map(|_| timed_out()).collect()
        }
        Produce::Partly(k) => {
            let mut answer = lock(world).persist(&records[..k]);
            answer.extend(
                records[k..]
                    .iter()
                    .map(|_| failed("the rest of the batch failed")),
            );
            answer
        }
    };
    async move {
        tokio::time::sleep(delay).await;
        answer
    }
}

/// A partition log that fails as the world decides; one per simulated process, each with
/// its own producer and read position.
pub(crate) struct SimLog {
    world: Shared,
    inner: MemoryLog,
    producer: usize,
}

impl SimLog {
    /// A new process's view of the log, reading from offset 0, producing as `producer`.
    pub(crate) fn new(world: &Shared, producer: usize) -> Self {
        let inner = lock(world).log.handle();
        Self {
            world: Arc::clone(world),
            inner,
            producer,
        }
    }
}

impl PartitionLog for SimLog {
    fn topic(&self) -> &str {
        self.inner.topic()
    }

    fn partition(&self) -> i32 {
        self.inner.partition()
    }

    fn next_offset(&self) -> i64 {
        self.inner.next_offset()
    }

    async fn end(&self) -> Result<i64, KafkaError> {
        // Every call to the broker lets the other processes run.
        tokio::task::yield_now().await;
        let stall = {
            let mut w = lock(&self.world);
            if w.chance(Fault::EndFails) {
                let t = w.timeout;
                Some(w.between(Duration::ZERO, t * 2))
            } else {
                None
            }
        };
        if let Some(stall) = stall {
            tokio::time::sleep(stall).await;
            return Err(KafkaError::Timeout(
                "simulated: the high watermark could not be fetched".into(),
            ));
        }
        self.inner.end().await
    }

    async fn next(&mut self) -> Result<LogEntry, KafkaError> {
        tokio::task::yield_now().await;
        let (fails, stall) = {
            let mut w = lock(&self.world);
            let fails = w.chance(Fault::FetchFails);
            let stall = if w.chance(Fault::FetchStalls) {
                let t = w.timeout;
                Some(w.between(t, t * 3))
            } else {
                None
            };
            (fails, stall)
        };
        if fails {
            tokio::time::sleep(Duration::from_millis(10)).await;
            return Err(KafkaError::Reader("simulated: the fetch failed".into()));
        }
        if let Some(stall) = stall {
            tokio::time::sleep(stall).await;
        }
        self.inner.next().await
    }

    fn append(
        &self,
        records: &[Append<'_>],
    ) -> impl std::future::Future<Output = Vec<Result<i64, KafkaError>>> + Send + 'static {
        produce(&self.world, self.producer, records)
    }

    async fn append_one(&self, record: Append<'_>) -> Result<i64, KafkaError> {
        produce(&self.world, self.producer, &[record])
            .await
            .pop()
            .unwrap_or_else(|| Err(KafkaError::NotSent("nothing was appended".into())))
    }

    async fn latest_snapshot(&self) -> Result<Option<StoredSnapshot>, KafkaError> {
        tokio::task::yield_now().await;
        self.inner.latest_snapshot().await
    }

    fn write_snapshot(
        &self,
        snapshot: StoredSnapshot,
        key_set: u64,
    ) -> impl std::future::Future<Output = Result<(), KafkaError>> + Send + 'static {
        self.inner.write_snapshot(snapshot, key_set)
    }

    fn seek(&mut self, offset: i64) {
        self.inner.seek(offset);
    }
}

/// Another command-api instance that, now and then, fences the partition with the next
/// epoch and commits a restock or two as its owner; and, when forgery is on, someone who
/// appends an unsigned fence in the current owner's name and a commit with a wrong hash.
pub(crate) async fn other_writers(world: Shared, rival_key: SigningKey) {
    let tick = Duration::from_secs(1);
    loop {
        tokio::time::sleep(tick).await;
        let mut w = lock(&world);
        if w.calm {
            return;
        }
        let forge = w.chance(Fault::Forgery);
        let rival = w.chance(Fault::RivalFences);
        if !forge && !rival {
            continue;
        }
        let fold = Fold::of(&w.log.entries(), &w.policy, false);
        let epoch = fold.gate.highest_epoch() + 1;
        let owner = fold.gate.owner().cloned();
        let streams = registered(&fold);
        if forge {
            let writer = Writer {
                instance: owner.map_or_else(|| "cmd-sim".into(), |o| o.instance),
                epoch,
            };
            let fence = LogRecord::Fence(FenceRecord::ruled(writer.clone(), &sim_partition()));
            w.persist(&[("", &fence, None)]);
            if let Some((id, version, last_hash, state)) = pick(&mut w.rng, &streams) {
                let restock = restock_commit(&mut w, &id, version, last_hash, &state, writer);
                if let Some(mut commit) = restock {
                    commit.hash = "0".repeat(64);
                    let record = LogRecord::Commit(commit);
                    w.persist(&[(id.as_str(), &record, None)]);
                }
            }
        } else {
            let writer = Writer {
                instance: "rival".into(),
                epoch,
            };
            let fence = LogRecord::Fence(
                FenceRecord::ruled(writer.clone(), &sim_partition()).signed(&rival_key),
            );
            w.persist(&[("", &fence, None)]);
            let commits = w.rng.gen_range(0..=2);
            for _ in 0..commits {
                // Each commit is decided on the log as it is now, so it chains properly.
                let streams = registered(&Fold::of(&w.log.entries(), &w.policy, false));
                let Some((id, version, last_hash, state)) = pick(&mut w.rng, &streams) else {
                    break;
                };
                let Some(commit) =
                    restock_commit(&mut w, &id, version, last_hash, &state, writer.clone())
                else {
                    continue;
                };
                let record = LogRecord::Commit(commit.sealed_and_signed(&rival_key));
                w.persist(&[(id.as_str(), &record, None)]);
            }
        }
    }
}

/// A stream with commits, as the other writers decide on it: id, version, last hash, state.
type Head = (String, u64, Option<String>, Product);

/// The streams of `fold` that have commits.
fn registered(fold: &Fold) -> Vec<Head> {
    fold.streams
        .iter()
        .filter(|(_, s)| s.version > 0)
        .map(|(id, s)| (id.clone(), s.version, s.last_hash.clone(), s.state.clone()))
        .collect()
}

fn pick<T: Clone>(rng: &mut ChaCha8Rng, items: &[T]) -> Option<T> {
    (!items.is_empty()).then(|| items[rng.gen_range(0..items.len())].clone())
}

/// A restock of one unit on `id`, decided on `state`, not yet sealed.
fn restock_commit(
    w: &mut World,
    id: &str,
    version: u64,
    last_hash: Option<String>,
    state: &Product,
    writer: Writer,
) -> Option<CommitRecord> {
    let command = ProductCommand::Restock {
        quantity: Quantity::parse("quantity", 1).ok()?,
    };
    let events = state.decide(&command).ok()?;
    if events.is_empty() {
        return None;
    }
    let envelopes = events
        .iter()
        .zip(version + 1..)
        .map(|(e, v)| encode_event(e, w.id(), v))
        .collect();
    let command_id = w.id();
    let mut commit = CommitRecord::new(
        StreamRef {
            stream_type: Product::TYPE.to_owned(),
            id: id.to_owned(),
        },
        version,
        envelopes,
        CommandMeta {
            id: command_id,
            command_type: "Restock".into(),
            idempotency_key: None,
            actor: "rival".into(),
            correlation_id: format!("rival-{}", w.now_ms()),
            causation_id: None,
            request_digest: None,
            traceparent: None,
        },
        writer,
        last_hash,
    );
    commit.commit_id = w.id();
    Some(commit.sealed())
}
