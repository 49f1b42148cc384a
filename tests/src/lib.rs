//! Helpers for Keel's end-to-end tests: a real Kafka-compatible broker started per test
//! on a free port, random topic prefixes so tests never share names, and a signing secret
//! of each test's own for the tokens it sends.

mod auth;
mod broker;
pub mod contract;
mod http;
mod log;
mod postgres;
mod stack;

pub use auth::TestAuth;
pub use broker::{Broker, broker_binary, free_port};
pub use contract::Contract;
pub use http::{Reply, send_raw};
pub use log::{AcceptedCommit, read_accepted, read_receipts};
pub use postgres::PrivatePostgres;
pub use stack::{
    CommandApi, CommandApiConfig, LogSource, Service, Stack, TestDatabase, eur, workspace_binary,
};

/// A topic prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!("t-{test}-{}", uuid::Uuid::new_v4().simple())
}
