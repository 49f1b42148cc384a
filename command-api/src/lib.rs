//! Keel's command API: commands in, commit records out.
//!
//! Each partition of each topic has one owner task ([`owner`]) that decides commands
//! against state read from the log, appends one commit record per command, and
//! acknowledges only after reading the commit back through the partition gate.

pub mod cluster;
pub mod commands;
pub mod error;
pub mod metrics;
pub mod owner;
pub mod owners;
pub mod routes;
mod settings;
mod startup;

pub use routes::app;
pub use settings::{Assignment, Settings};
pub use startup::Application;
