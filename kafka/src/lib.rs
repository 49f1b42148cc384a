//! Everything of Keel that touches Kafka: settings, topic admin, the Java-compatible
//! partitioner, the producer, partition readers, the partition gate, and reading a
//! partition through it.
//!
//! Nothing here depends on a particular broker: the same code runs against Apache Kafka,
//! Redpanda or the embedded broker by changing `KEEL_KAFKA_BROKERS`. Kafka transactions
//! and consumer-group offsets are not used for correctness.

mod admin;
mod error;
pub mod gate;
mod gated;
mod group;
mod partitioner;
mod producer;
mod reader;
mod settings;

pub use admin::{ensure_snapshot_topics, ensure_topics};
pub use error::KafkaError;
pub use gate::{GATE_RULES, PartitionGate, Rejection, StreamHead, hash_bytes};
pub use gated::{Checked, Gated, Verdict, check_records, in_two_halves, read_through_gate};
pub use group::{
    GroupEvent, GroupMember, GroupMembership, GroupSettings, GroupView, HandedOver,
    parse_assignment,
};
pub use partitioner::{murmur2, partition_for};
pub use producer::{LogProducer, record_headers};
pub use reader::{
    AbortOnDrop, LogEntry, LogReader, PartitionReader, READ_BACK_FETCH_WAIT_MS, ReaderPool,
    end_offsets,
};
pub use settings::{KafkaArgs, KafkaSettings};
