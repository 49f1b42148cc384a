//! Keel's projector: projections of the log into PostgreSQL, applied exactly once.
//!
//! Each projection reads its topics from its own checkpoints, through the partition gate,
//! and applies batches in a transaction that also advances the checkpoints and the gate's
//! state, then notifies [`keel_views::NOTIFY_CHANNEL`]. Kafka consumer-group offsets are
//! never used.
//!
//! | file | what it holds |
//! |---|---|
//! | [`projection`] | the trait a view implements, and the events it receives |
//! | [`views`] | the shop's projections |
//! | [`fulfilment`] | the order fulfilment process: its state beside a projection's, the commands it sends |
//! | [`units`] | partitions shared among projector processes: heartbeats, claims, shares |
//! | [`runner`] | one projection's loop on this process's share: the live generation, prefetched batches |
//! | `applier` | the batch transaction: proof of the units held, gate, apply, checkpoint, dead letters, report |
//! | `hold` | what a batch proves it holds: a live run's units, a rebuild's claim |
//! | `checkpoint` | checkpoints and the gate's state: loading, saving, snapshots |
//! | `decode` | records decoded and put through the gate |
//! | `dead_letter` | records that cannot be decoded or applied; parked streams and requests on them |
//! | [`quarantine`] | `dead-letters`: parked streams listed, retried, discarded |
//! | `generation` | generations: the live one, views, batch reports, dropping old ones |
//! | `prefetch` | the next batches read and decoded while one is applied |
//! | [`rebuild`] | blue/green rebuilds and the swap |
//! | [`requests`] | rebuilds requested through PostgreSQL, carried out by running processes |
//! | [`pace`] | how fast a rebuild goes: adaptive (backing off for live reads), a set rate, or unpaced |
//! | [`verify`] | `verify` and `export`: the log checked and handed to auditors |
//! | [`status`] | `status`: the read contract's status plus the log's ends |
//! | [`report`] | how the commands print what they found |

mod applier;
mod checkpoint;
/// The database: connection, creation, migrations.
pub mod db;
mod dead_letter;
mod decode;
pub mod fulfilment;
mod generation;
mod helper;
mod hold;
pub mod http;
pub mod job;
pub mod metrics;
pub mod pace;
mod prefetch;
mod progress;
pub mod projection;
pub mod quarantine;
pub mod rebuild;
mod rebuild_units;
pub mod report;
pub mod requests;
pub mod runner;
mod settings;
pub mod status;
#[cfg(test)]
mod testing;
pub mod units;
pub mod verify;
pub mod views;

pub use generation::{Live, prepare};
pub use job::{Job, OnError, RunOptions};
pub use settings::{Settings, SettingsArgs};

/// A boxed `Send` future: what a function over `&mut PgConnection` returns where the
/// compiler must see its lifetimes concretely (rust-lang/rust#102211).
pub(crate) type BoxFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
