//! Every partition owner of this instance: one per partition of each aggregate's topic,
//! started over any [`PartitionLog`] (Kafka in production, memory in tests), and the
//! channels the routes send commands through.

use std::sync::Arc;
use std::time::Duration;

use keel_domain::Aggregate;
use keel_domain::customer::Customer;
use keel_domain::order::Order;
use keel_domain::product::Product;
use keel_schemas::SigningKey;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::owner::{CommandRequest, PartitionLog, PartitionOwner, StatusCell};

/// Commands that may wait for one partition's owner before new ones get a 503.
const QUEUE_PER_PARTITION: usize = 4096;

/// The channels to every partition owner, indexed by partition.
#[derive(Clone, Debug, Default)]
pub struct Owners {
    /// Owners of the product topic's partitions.
    pub products: Vec<mpsc::Sender<CommandRequest<Product>>>,
    /// Owners of the customer topic's partitions.
    pub customers: Vec<mpsc::Sender<CommandRequest<Customer>>>,
    /// Owners of the order topic's partitions.
    pub orders: Vec<mpsc::Sender<CommandRequest<Order>>>,
}

/// What an owner of this instance is started with, besides its log.
#[derive(Clone, Debug)]
pub struct OwnerSettings {
    /// This instance's name in its fences and commits.
    pub instance: String,
    /// The key its commits and fences are signed with.
    pub signing_key: Arc<SigningKey>,
    /// How long each read it waits for may take.
    pub timeout: Duration,
    /// Partitions of each topic.
    pub partitions: i32,
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
    /// Starts one owner per partition of each aggregate's topic over the log `log` gives
    /// for (stream type, partition), in the order products, customers, orders.
    pub fn start<L: PartitionLog>(
        settings: &OwnerSettings,
        mut log: impl FnMut(&'static str, i32) -> anyhow::Result<L>,
    ) -> anyhow::Result<Started> {
        let mut started = Started {
            owners: Owners::default(),
            statuses: Vec::new(),
            tasks: JoinSet::new(),
        };
        started.owners.products = start::<Product, L>(settings, &mut log, &mut started)?;
        started.owners.customers = start::<Customer, L>(settings, &mut log, &mut started)?;
        started.owners.orders = start::<Order, L>(settings, &mut log, &mut started)?;
        Ok(started)
    }
}

fn start<A, L>(
    settings: &OwnerSettings,
    log: &mut impl FnMut(&'static str, i32) -> anyhow::Result<L>,
    started: &mut Started,
) -> anyhow::Result<Vec<mpsc::Sender<CommandRequest<A>>>>
where
    A: Aggregate + Send + Sync + 'static,
    A::Command: Send,
    A::Event: Send,
    L: PartitionLog,
{
    (0..settings.partitions)
        .map(|partition| {
            let (owner, status) = PartitionOwner::<A, L>::new(
                log(A::TYPE, partition)?,
                &settings.instance,
                Arc::clone(&settings.signing_key),
                settings.timeout,
            );
            let (tx, rx) = mpsc::channel(QUEUE_PER_PARTITION);
            started.tasks.spawn(owner.run(rx));
            started.statuses.push(status);
            Ok(tx)
        })
        .collect()
}
