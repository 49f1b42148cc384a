//! Keel's wire format.
//!
//! Every record on a Keel topic is one JSON object, either a **commit** (every event one
//! accepted command produced, hash-chained to the stream's previous commit) or a
//! **fence** (a writer taking ownership of a partition). Storage types live here, apart
//! from the domain's types, with explicit conversions: [`encode_event`] and
//! [`decode_event`], which applies the [`Upcasters`] on read.

mod canonical;
mod commit;
mod envelope;
mod error;
mod problem;
mod signing;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod token;
mod topic;
mod upcast;

pub use canonical::canonical_json;
pub use commit::{
    CommandMeta, CommitRecord, FENCE_RULES, FenceRecord, FencedPartition, LogRecord, ReceiptRecord,
    StreamRef, Timestamp, UNBOUND_FENCE_RULES, Writer, commit_hash_of_value, headers,
};
pub use envelope::{EventEnvelope, decode_event, decode_event_with, encode_event};
pub use error::SchemaError;
pub use problem::{PROBLEM_JSON, problem};
pub use signing::{
    CommitCheck, KeyError, Signature, SignatureCheck, SigningKey, TrustedKeys, key_id_of,
};
pub use token::{CONSISTENCY_TOKEN_HEADER, ConsistencyToken, MAX_TOKEN_LEN, Position, TokenError};
pub use topic::{TopicPartition, stream_type_of, topic_name};
pub use upcast::{Upcaster, Upcasters};
