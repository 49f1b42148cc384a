//! Every partition owner of this instance: one per partition of each aggregate's topic
//! (the aggregates as `keel_domain::visit_aggregates` lists them),
//! started over any [`PartitionLog`] (Kafka in production, memory in tests), and the
//! channels the routes send commands through.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use keel_domain::{AggregateVisitor, ShopAggregate, visit_aggregates};
use keel_schemas::{SigningKey, TrustedKeys};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::owner::{CommandRequest, PartitionLog, PartitionOwner, StatusCell};

/// Commands that may wait for one partition's owner before new ones get a 503.
const QUEUE_PER_PARTITION: usize = 4096;

/// The channels to every partition owner: for each aggregate, its owners' senders,
/// indexed by partition.
#[derive(Clone, Default)]
pub struct Owners {
    /// `Vec<mpsc::Sender<CommandRequest<A>>>` by `A::TYPE`.
    senders: HashMap<&'static str, Arc<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owners")
            .field("aggregates", &self.senders.keys().collect::<Vec<_>>())
            .finish()
    }
}

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
}

/// Started owners: their channels, their statuses (for readiness), and their tasks.
pub struct Started {
    /// The channels to them.
    pub owners: Owners,
    /// Their statuses.
    pub statuses: Vec<StatusCell>,
    /// Their tasks; each ends when its channel closes.
    pub tasks: JoinSet<()>,
}

impl Owners {
    /// The senders to the owners of `A`'s partitions, indexed by partition.
    pub fn of<A: ShopAggregate>(&self) -> &[mpsc::Sender<CommandRequest<A>>] {
        self.senders
            .get(A::TYPE)
            .and_then(|s| s.downcast_ref::<Vec<mpsc::Sender<CommandRequest<A>>>>())
            .map_or(&[], Vec::as_slice)
    }

    /// Starts one owner per partition of each aggregate's topic over the log `log` gives
    /// for (stream type, partition), aggregate after aggregate.
    pub fn start<L: PartitionLog>(
        settings: &OwnerSettings,
        mut log: impl FnMut(&'static str, i32) -> anyhow::Result<L>,
    ) -> anyhow::Result<Started> {
        struct StartAll<'a, L, F> {
            settings: &'a OwnerSettings,
            log: &'a mut F,
            started: Started,
            failed: Option<anyhow::Error>,
            _log: std::marker::PhantomData<L>,
        }
        impl<L, F> AggregateVisitor for StartAll<'_, L, F>
        where
            L: PartitionLog,
            F: FnMut(&'static str, i32) -> anyhow::Result<L>,
        {
            fn visit<A: ShopAggregate>(&mut self) {
                if self.failed.is_some() {
                    return;
                }
                match start::<A, L>(self.settings, self.log, &mut self.started) {
                    Ok(senders) => {
                        self.started
                            .owners
                            .senders
                            .insert(A::TYPE, Arc::new(senders));
                    }
                    Err(e) => self.failed = Some(e),
                }
            }
        }
        let mut all = StartAll {
            settings,
            log: &mut log,
            started: Started {
                owners: Owners::default(),
                statuses: Vec::new(),
                tasks: JoinSet::new(),
            },
            failed: None,
            _log: std::marker::PhantomData,
        };
        visit_aggregates(&mut all);
        match all.failed {
            Some(e) => Err(e),
            None => Ok(all.started),
        }
    }
}

fn start<A: ShopAggregate, L: PartitionLog>(
    settings: &OwnerSettings,
    log: &mut impl FnMut(&'static str, i32) -> anyhow::Result<L>,
    started: &mut Started,
) -> anyhow::Result<Vec<mpsc::Sender<CommandRequest<A>>>> {
    (0..settings.partitions)
        .map(|partition| {
            let (owner, status) = PartitionOwner::<A, L>::new(
                log(A::TYPE, partition)?,
                &settings.instance,
                Arc::clone(&settings.signing_key),
                Arc::clone(&settings.policy),
                settings.timeout,
            );
            let owner = owner.with_key_retention(settings.key_retention);
            let (tx, rx) = mpsc::channel(QUEUE_PER_PARTITION);
            started.tasks.spawn(owner.run(rx));
            started.statuses.push(status);
            Ok(tx)
        })
        .collect()
}
