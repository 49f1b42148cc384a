//! The partition owner: the one task that decides and appends the commands of one
//! partition, as DESIGN.md's "Writing" describes. It knows nothing of HTTP: it answers
//! with an [`Outcome`] or an [`OwnerError`], and talks to the log through
//! [`PartitionLog`], which Kafka implements in production and [`MemoryLog`] in tests.
//!
//! * [`task`]: taking the partition (catch up, fence, read up to the fence), following the
//!   log, and applying each record through the gate: the only place its state changes.
//! * [`flush`]: the group commit: deciding waiting commands in order against the state
//!   read plus the commits ahead of them, appending them together, reading them back, and
//!   answering each one only if the gate accepted it.
//! * [`idempotency`]: the `Idempotency-Key` of every commit in the partition within the
//!   keys' retention, rebuilt from the log, so a retry gets the original answer.
//! * [`receipt`]: the answers to keyed commands that appended nothing, recorded in the
//!   log so a retry gets them too.
//! * [`log`]: the narrow interface to the partition's log.

mod flush;
mod idempotency;
mod log;
#[cfg(any(test, feature = "testing"))]
mod memory;
mod outcome;
mod receipt;
#[cfg(test)]
mod sim;
mod snapshot;
mod task;
#[cfg(test)]
mod tests;

pub use idempotency::DEFAULT_KEY_RETENTION;
pub use log::{Append, KafkaPartition, PartitionLog};
#[cfg(any(test, feature = "testing"))]
pub use memory::{Appended, MemoryLog};
pub use outcome::{
    Answer, Answered, CommandRequest, EventSummary, NoAnswer, Outcome, OwnerError, Reply,
    RequestMeta, Timeline, reply_channel,
};
pub use snapshot::{Manifest, SNAPSHOT_FORMAT, StoredSnapshot};
pub use task::{AskPredecessor, DEFAULT_FLIGHTS, PartitionOwner, Status, StatusCell, Stop};
