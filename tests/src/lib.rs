//! Helpers for Keel's end-to-end tests: a real Kafka-compatible broker started per test
//! on a free port, and random topic prefixes so tests never share names.

pub mod bench;
mod broker;
mod log;
mod stack;

pub use broker::{Broker, broker_binary};
pub use log::{AcceptedCommit, read_accepted};
pub use stack::{
    CommandApi, CommandApiConfig, Service, Stack, TestDatabase, eur, workspace_binary,
};

/// A topic prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!("t-{test}-{}", uuid::Uuid::new_v4().simple())
}
