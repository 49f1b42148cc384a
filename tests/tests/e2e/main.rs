//! Keel's end-to-end tests, one binary of modules: each starts a real Kafka-compatible
//! broker of its own, a PostgreSQL database of its own and the real service binaries, with
//! random topic prefixes, so they run side by side.

mod admin;
mod audit;
mod cli;
mod command_api;
mod console;
mod contract;
mod fulfilment;
mod fuzz;
mod kafka_log;
mod make_up;
mod observability;
mod prometheus;
mod read_path;
mod read_scale;
mod rebuild;
mod schemathesis;
mod security;
mod traces;
mod write_path;
