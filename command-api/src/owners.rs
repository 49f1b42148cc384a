//! The partition owners of this instance: at most one per partition of each aggregate's
//! topic, started when the instance is given a partition and stopped when it gives it up,
//! over any [`PartitionLog`] (Kafka in production, memory in tests), and the channels the
//! routes send commands through.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use keel_domain::{AggregateFn, ShopAggregate, with_aggregate};
use keel_schemas::{SigningKey, TrustedKeys};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::owner::{
    AskPredecessor, CommandRequest, PartitionLog, PartitionOwner, Status, StatusCell, Stop,
};

/// Commands that may wait for one partition's owner before new ones get a 503.
const QUEUE_PER_PARTITION: usize = 4096;

/// What an owner of this instance is started with, besides its log.
#[derive(Clone, Debug)]
pub struct OwnerSettings {
    /// This instance's name in its fences and commits.
    pub instance: String,
    /// The key its commits and fences are signed with.
    pub signing_key: Arc<SigningKey>,
    /// The key policy its gate applies, the same as every reader's.
    pub policy: Arc<TrustedKeys>,
    /// How long each read it waits for may take.
    pub timeout: Duration,
    /// Partitions of each topic.
    pub partitions: i32,
    /// How long an idempotency key is kept from its commit's time.
    pub key_retention: Duration,
    /// When the owner is one of several instances' (assigned its partition by the group),
    /// how long after losing the partition to another writer it fences again.
    pub retake_after: Option<Duration>,
    /// Records an owner applies between two snapshots of its state; `None`: no snapshots.
    pub snapshot_every: Option<u64>,
    /// The turns the owners take to write their periodic snapshots (one at a time).
    pub snapshot_turns: Arc<tokio::sync::Semaphore>,
    /// Flushes an owner decides in a row while the one ahead is read back.
    pub flush_pipeline: usize,
    /// Where the owners record their commands' phases.
    pub metrics: crate::metrics::CommandMetrics,
}

/// A running owner.
struct Slot {
    /// Its `mpsc::Sender<CommandRequest<A>>`.
    sender: Arc<dyn Any + Send + Sync>,
    status: StatusCell,
    stop: oneshot::Sender<Stop>,
    task: JoinHandle<()>,
    /// The group took the partition from this instance (by this release's number): the
    /// owner serves on until its successor asks for it ([`Owners::hand_over_released`])
    /// or a deadline passes.
    released: Option<u64>,
}

/// A handoff under way, counted while it lasts.
struct Handing<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Handing<'a> {
    fn start(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Handing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The owners of this instance, by stream type and partition.
#[derive(Default)]
pub struct Owners {
    slots: HashMap<&'static str, Vec<RwLock<Option<Slot>>>>,
    /// The number of the next release.
    releases: std::sync::atomic::AtomicU64,
    /// Released owners handing over now.
    handing_over: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owners")
            .field("aggregates", &self.slots.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Owners {
    /// No owner yet, with room for `partitions` of each aggregate's topic.
    pub fn new(partitions: i32) -> Self {
        let slots = keel_domain::STREAM_TYPES
            .iter()
            .map(|t| (*t, (0..partitions).map(|_| RwLock::new(None)).collect()))
            .collect();
        Self {
            slots,
            ..Self::default()
        }
    }

    /// Starts an owner of every partition of every aggregate's topic, over the log `log`
    /// gives for (stream type, partition): the instance that owns everything.
    pub fn start_all<L: PartitionLog>(
        settings: &OwnerSettings,
        mut log: impl FnMut(&'static str, i32) -> anyhow::Result<L>,
    ) -> anyhow::Result<Self> {
        let owners = Self::new(settings.partitions);
        for stream_type in keel_domain::STREAM_TYPES {
            for partition in 0..settings.partitions {
                owners.start(
                    stream_type,
                    partition,
                    log(stream_type, partition)?,
                    settings,
                    None,
                )?;
            }
        }
        Ok(owners)
    }

    /// The channel to the owner of `A`'s `partition`, if this instance runs one.
    pub fn of<A: ShopAggregate>(&self, partition: i32) -> Option<mpsc::Sender<CommandRequest<A>>> {
        let slot = self.slot(A::TYPE, partition)?.read().ok()?;
        slot.as_ref()?
            .sender
            .downcast_ref::<mpsc::Sender<CommandRequest<A>>>()
            .cloned()
    }

    /// The statuses of the owners running now.
    pub fn statuses(&self) -> Vec<StatusCell> {
        let mut statuses: Vec<StatusCell> = self
            .slots
            .values()
            .flatten()
            .filter_map(|slot| slot.read().ok()?.as_ref().map(|s| s.status.clone()))
            .collect();
        statuses.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        statuses
    }

    /// The status of this instance's owner of `stream_type`'s `partition`, if one runs.
    pub fn status_of(&self, stream_type: &str, partition: i32) -> Option<Status> {
        let slot = self.slot(stream_type, partition)?.read().ok()?;
        slot.as_ref().map(|s| s.status.get())
    }

    /// True when this instance runs an owner of `stream_type`'s `partition`.
    pub fn runs(&self, stream_type: &str, partition: i32) -> bool {
        self.slot(stream_type, partition)
            .and_then(|slot| slot.read().ok().map(|s| s.is_some()))
            .unwrap_or(false)
    }

    fn slot(&self, stream_type: &str, partition: i32) -> Option<&RwLock<Option<Slot>>> {
        self.slots
            .get(stream_type)?
            .get(usize::try_from(partition).ok()?)
    }

    /// Starts the owner of `stream_type`'s `partition` over `log` (asking its
    /// `predecessor`, if given, to hand the partition over before it fences); does nothing
    /// when one runs already.
    pub fn start<L: PartitionLog>(
        &self,
        stream_type: &str,
        partition: i32,
        log: L,
        settings: &OwnerSettings,
        predecessor: Option<AskPredecessor>,
    ) -> anyhow::Result<()> {
        let slot = self
            .slot(stream_type, partition)
            .ok_or_else(|| anyhow::anyhow!("no partition {partition} of {stream_type}"))?;
        let mut slot = slot
            .write()
            .map_err(|_| anyhow::anyhow!("the owners' table is poisoned"))?;
        if slot.is_some() {
            return Ok(());
        }
        struct Start<'a, L> {
            log: L,
            settings: &'a OwnerSettings,
            predecessor: Option<AskPredecessor>,
        }
        impl<L: PartitionLog> AggregateFn for Start<'_, L> {
            type Output = Slot;
            fn call<A: ShopAggregate>(self) -> Slot {
                let settings = self.settings;
                let (owner, status) = PartitionOwner::<A, L>::new(
                    self.log,
                    &settings.instance,
                    Arc::clone(&settings.signing_key),
                    Arc::clone(&settings.policy),
                    settings.timeout,
                );
                let mut owner = owner
                    .with_key_retention(settings.key_retention)
                    .pipelining(settings.flush_pipeline)
                    .with_metrics(settings.metrics.clone());
                if let Some(after) = settings.retake_after {
                    owner = owner.retaking_after(after);
                }
                if let Some(every) = settings.snapshot_every {
                    owner = owner
                        .with_snapshots(every)
                        .taking_snapshot_turns(Arc::clone(&settings.snapshot_turns));
                }
                if let Some(ask) = self.predecessor {
                    owner = owner.after_predecessor_hands_over(ask);
                }
                let (tx, rx) = mpsc::channel(QUEUE_PER_PARTITION);
                let (stop, stop_rx) = oneshot::channel();
                let task = tokio::spawn(owner.run_until(rx, Some(stop_rx)));
                Slot {
                    sender: Arc::new(tx),
                    status,
                    stop,
                    task,
                    released: None,
                }
            }
        }
        *slot = Some(
            with_aggregate(
                stream_type,
                Start {
                    log,
                    settings,
                    predecessor,
                },
            )
            .ok_or_else(|| anyhow::anyhow!("no aggregate of stream type {stream_type}"))?,
        );
        Ok(())
    }

    /// Stops the owner of `stream_type`'s `partition`, if one runs: new commands for it
    /// find no owner here at once; it answers those it has taken, then (for a
    /// [`Stop::Handoff`]) leaves the handoff mark in the log. Returns when it has stopped,
    /// or after `within`, when it is stopped where it is.
    pub async fn stop(&self, stream_type: &str, partition: i32, how: Stop, within: Duration) {
        if let Some(slot) = self.take(stream_type, partition, |_| true) {
            Self::stop_slot(slot, partition, how, within).await;
        }
    }

    /// Takes the owner's slot out of the table if `which` says so of it, under one lock.
    fn take(
        &self,
        stream_type: &str,
        partition: i32,
        which: impl FnOnce(&Slot) -> bool,
    ) -> Option<Slot> {
        let mut slot = self.slot(stream_type, partition)?.write().ok()?;
        if slot.as_ref().is_some_and(which) {
            slot.take()
        } else {
            None
        }
    }

    async fn stop_slot(slot: Slot, partition: i32, how: Stop, within: Duration) {
        let Slot {
            status,
            stop,
            mut task,
            ..
        } = slot;
        let _ = stop.send(how);
        if tokio::time::timeout(within, &mut task).await.is_err() {
            warn!(
                topic = status.topic,
                partition, "the owner did not stop in time: stopped where it was"
            );
            task.abort();
            // Its log (and the partition's reader) is gone once the task is.
            let _ = task.await;
        }
        info!(topic = status.topic, partition, ?how, "owner stopped");
    }

    /// Marks the owner of `stream_type`'s `partition` released: the group gave the
    /// partition to another instance, and this one serves on (never taking it back once
    /// fenced out) until that instance's owner asks for it
    /// ([`Owners::hand_over_released`]), or until [`Owners::stop_released`] with the
    /// returned release number after a deadline. `None` when no owner runs.
    pub fn release(&self, stream_type: &str, partition: i32) -> Option<u64> {
        let number = self
            .releases
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.set_released(stream_type, partition, Some(number))
            .then_some(number)
    }

    /// Keeps the owner of `stream_type`'s `partition` if it runs (the group gave the
    /// partition back before it was handed over): true when one runs.
    pub fn keep(&self, stream_type: &str, partition: i32) -> bool {
        self.set_released(stream_type, partition, None)
    }

    fn set_released(&self, stream_type: &str, partition: i32, released: Option<u64>) -> bool {
        let Some(slot) = self.slot(stream_type, partition) else {
            return false;
        };
        match slot.write() {
            Ok(mut slot) => slot
                .as_mut()
                .map(|s| {
                    s.released = released;
                    s.status.set_released(released.is_some());
                })
                .is_some(),
            Err(_) => false,
        }
    }

    /// Hands the partition over now, if its owner was released (a planned handoff whose
    /// successor is ready): it answers what it took and leaves the handoff mark. Returns
    /// false, doing nothing, when it was not released: the group did not give the
    /// partition away, so nobody may take it from here by asking.
    pub async fn hand_over_released(
        &self,
        stream_type: &str,
        partition: i32,
        within: Duration,
    ) -> bool {
        let handing = Handing::start(&self.handing_over);
        let Some(slot) = self.take(stream_type, partition, |s| s.released.is_some()) else {
            return false;
        };
        Self::stop_slot(slot, partition, Stop::HandoffNow, within).await;
        drop(handing);
        true
    }

    /// Stops the owner of `stream_type`'s `partition` with a handoff if it is still
    /// released by release `number` (its successor never asked).
    pub async fn stop_released(
        &self,
        stream_type: &str,
        partition: i32,
        number: u64,
        within: Duration,
    ) {
        let handing = Handing::start(&self.handing_over);
        let taken = self.take(stream_type, partition, |s| s.released == Some(number));
        if let Some(slot) = taken {
            info!(
                stream_type,
                partition, "the successor did not ask for the partition in time: handing it over"
            );
            Self::stop_slot(slot, partition, Stop::Handoff, within).await;
        }
        drop(handing);
    }

    /// How many owners run released and still serve, waiting for their successors, or
    /// are handing over (one fenced out by its successor has nothing left to hand over).
    pub fn released(&self) -> usize {
        let waiting = self
            .slots
            .values()
            .flatten()
            .filter(|slot| {
                slot.read().ok().is_some_and(|s| {
                    s.as_ref()
                        .is_some_and(|s| s.released.is_some() && s.status.get() == Status::Serving)
                })
            })
            .count();
        waiting + self.handing_over.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops every owner (see [`Owners::stop`]), together.
    pub async fn stop_all(&self, how: Stop, within: Duration) {
        let running: Vec<(&'static str, i32)> = self
            .slots
            .iter()
            .flat_map(|(t, slots)| {
                slots.iter().enumerate().filter_map(move |(p, slot)| {
                    let runs = slot.read().ok().is_some_and(|s| s.is_some());
                    runs.then(|| (*t, i32::try_from(p).unwrap_or(i32::MAX)))
                })
            })
            .collect();
        let stops = running.iter().map(|(t, p)| self.stop(t, *p, how, within));
        futures::future::join_all(stops).await;
    }

    /// True when every owner running serves.
    pub fn all_serving(&self) -> bool {
        self.statuses().iter().all(|s| s.get() == Status::Serving)
    }
}
