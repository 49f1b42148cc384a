//! Keel's projector: projections of the log into PostgreSQL, applied exactly once.
//!
//! Each projection reads its topics from its own checkpoints, through the partition gate,
//! and applies batches in a transaction that also advances the checkpoints and the gate's
//! state, then notifies [`runner::NOTIFY_CHANNEL`]. Kafka consumer-group offsets are never
//! used.

/// The database: connection, creation, migrations.
pub mod db;
pub mod projection;
pub mod rebuild;
pub mod runner;
mod settings;
pub mod status;
pub mod verify;
pub mod views;

pub use settings::{DEFAULT_DATABASE_URL, Settings};
