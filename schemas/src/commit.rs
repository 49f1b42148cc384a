//! The records of the log: commits and fences.

use std::fmt;

use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::{EventEnvelope, SchemaError, Signature, SigningKey, canonical_json};

/// Names of the Kafka headers Keel writes, so tools can route records without parsing them.
pub mod headers {
    /// Always `application/json`.
    pub const CONTENT_TYPE: &str = "content-type";
    /// `commit` or `fence`.
    pub const KIND: &str = "keel-kind";
    /// The stream type of a commit (`order`).
    pub const STREAM_TYPE: &str = "keel-stream-type";
    /// The event types of a commit, comma-separated in order.
    pub const EVENT_TYPES: &str = "keel-event-types";
    /// The W3C trace context of the request that wrote the record.
    pub const TRACEPARENT: &str = "traceparent";
}

/// A point in time with millisecond precision, written as `2026-11-21T12:00:00.123Z`.
///
/// Keel truncates to milliseconds when it records a time, so the text form round-trips
/// exactly and commit hashes recompute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// The current time, truncated to milliseconds.
    pub fn now() -> Self {
        Self::from(Utc::now())
    }

    /// The time as a `chrono` value.
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }
}

impl From<DateTime<Utc>> for Timestamp {
    fn from(t: DateTime<Utc>) -> Self {
        Self(t.trunc_subsecs(3))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Timestamp {
    type Err = chrono::ParseError;

    /// An RFC 3339 time, such as `2026-11-21T12:00:00Z`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DateTime::parse_from_rfc3339(s).map(|t| Self(t.with_timezone(&Utc)))
    }
}

/// A stream: its type (the aggregate) and id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamRef {
    /// The aggregate type, e.g. `order`.
    #[serde(rename = "type")]
    pub stream_type: String,
    /// The aggregate id, also the record key.
    pub id: String,
}

impl fmt::Display for StreamRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.stream_type, self.id)
    }
}

/// A writer: a command-api instance and the epoch of its ownership of a partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Writer {
    /// The instance's name, unique per process start.
    pub instance: String,
    /// The epoch of the fence that made it the partition's owner.
    pub epoch: u64,
}

/// The command that produced a commit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandMeta {
    /// The command's id.
    pub id: Uuid,
    /// The command's type, e.g. `ShipOrder`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// The client's idempotency key, if it sent one.
    pub idempotency_key: Option<String>,
    /// Who sent it.
    pub actor: String,
    /// Ties together everything one request caused.
    pub correlation_id: String,
    /// The id of the message that caused this command, if any.
    pub causation_id: Option<String>,
    /// SHA-256 (hex) of the request (command and body) that carried the idempotency key,
    /// so a retry with the same key and another body is told apart, also after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_digest: Option<String>,
    /// The W3C trace context the command ran in (the caller's, or the one the command API
    /// started), so the work the commit causes later, such as applying it to the views,
    /// joins the command's trace. Covered by the hash: a reader of older code, which does
    /// not know the field, cannot recompute the hash of a record that has it, so readers
    /// are upgraded before writers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// One accepted command: every event it produced, atomically, in one record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommitRecord {
    /// UUID v7 of the commit.
    pub commit_id: Uuid,
    /// The stream the events belong to.
    pub stream: StreamRef,
    /// The stream's version before this commit (0 for a new stream).
    pub expected_version: u64,
    /// The events, versions `expected_version + 1` onwards.
    pub events: Vec<EventEnvelope>,
    /// The command that produced them.
    pub command: CommandMeta,
    /// Who wrote the commit.
    pub writer: Writer,
    /// When the writer decided the command.
    pub recorded_at: Timestamp,
    /// The hash of the stream's previous commit, `None` for its first.
    pub prev_hash: Option<String>,
    /// SHA-256 (hex) of the canonical record without this field; see [`commit_hash_of_value`].
    pub hash: String,
    /// The writer's Ed25519 signature over `hash`; not part of the hashed form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// The rules a fence's writer follows, written in every fence the command API appends:
/// the fence names the partition it claims ([`FencedPartition`]) and is signed by a
/// trusted key, and each commit under it chains onto its stream's last commit, carries a
/// hash that recomputes, and is signed with the fence's key. A fence without `rules` is a
/// legacy fence, from a log written before the gate checked signatures (see
/// [`crate::TrustedKeys`] for when one still counts).
pub const FENCE_RULES: u32 = 3;

/// The rules of signed fences that named no partition ([`FENCE_RULES`] before fences
/// named theirs): such a fence, signed for one partition, would verify on any other. They
/// count only until a fence of today's rules has counted on the partition, as legacy
/// fences do once a signed one has.
pub const UNBOUND_FENCE_RULES: u32 = 2;

/// The partition a fence claims, covered by its signature, so that a signed fence copied
/// onto another partition or another topic claims nothing there: the stream type of its
/// topic (`<prefix>.<type>.events`, so a mirror that renames the prefix keeps its fences)
/// and the partition's number.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FencedPartition {
    /// The stream type of the fence's topic.
    pub stream_type: String,
    /// The partition.
    pub partition: i32,
}

impl FencedPartition {
    /// The partition `at` as a fence names it: its topic's stream type (the whole topic
    /// name for a topic not named `<prefix>.<type>.events`) and its number.
    pub fn of(at: &crate::TopicPartition) -> Self {
        Self {
            stream_type: crate::stream_type_of(&at.topic)
                .unwrap_or(&at.topic)
                .to_owned(),
            partition: at.partition,
        }
    }
}

impl fmt::Display for FencedPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} partition {}", self.stream_type, self.partition)
    }
}

/// A writer's claim on a partition, valid when its epoch is higher than any before it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// The new owner and its epoch.
    pub writer: Writer,
    /// When it was written.
    pub recorded_at: Timestamp,
    /// The rules the writer follows under this fence ([`FENCE_RULES`]); absent in legacy
    /// fences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<u32>,
    /// The partition it claims (fences of [`FENCE_RULES`]; absent before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<FencedPartition>,
    /// Set on the mark a writer leaves in the log when it hands the partition over
    /// (a planned handoff): it has stopped writing there. It takes nothing (readers never
    /// count it as a fence); the next owner fences as always.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
    /// The writer's Ed25519 signature over [`FenceRecord::digest`], so a fence cannot be
    /// forged by someone who can only write to the broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

impl FenceRecord {
    /// What a fence's signature signs: the hex SHA-256 of the canonical fence record
    /// (with `kind`) without its signature.
    pub fn digest(&self) -> String {
        let value = serde_json::to_value(LogRecord::Fence(self.clone())).unwrap_or(Value::Null);
        commit_hash_of_value(&value)
    }

    /// A fence of `writer` on the partition `at` under today's rules ([`FENCE_RULES`]),
    /// recorded now, not yet signed (see [`FenceRecord::signed`]).
    pub fn ruled(writer: Writer, at: &crate::TopicPartition) -> Self {
        Self {
            writer,
            recorded_at: Timestamp::now(),
            rules: Some(FENCE_RULES),
            claims: Some(FencedPartition::of(at)),
            handoff: false,
            signature: None,
        }
    }

    /// The mark `writer` leaves on the partition `at` when it hands it over, recorded now,
    /// not yet signed.
    pub fn handoff(writer: Writer, at: &crate::TopicPartition) -> Self {
        Self {
            handoff: true,
            ..Self::ruled(writer, at)
        }
    }

    /// Signs the fence with `key`.
    #[must_use]
    pub fn signed(mut self, key: &SigningKey) -> Self {
        self.signature = None;
        self.signature = Some(key.sign(&self.digest()));
        self
    }
}

/// The answer the owner gave a keyed command that appended no commit (it changed nothing,
/// or was refused), recorded so that a retry with the same `Idempotency-Key` gets the same
/// answer, also from another owner after a restart. The gate admits it from the
/// partition's owner only (signed with the owner's key, its hash recomputing, under fences
/// with rules), at the stream's version and chained onto the stream's last link: it moves
/// the stream's chain (the next commit links to it) but not its version, and views skip
/// it. So a receipt that lands late (its append timed out, the stream moved on) counts for
/// no reader, and a commit decided without it does not count once it landed first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    /// UUID v7 of the receipt.
    pub receipt_id: Uuid,
    /// The stream the command was for.
    pub stream: StreamRef,
    /// The stream's version the answer was decided on.
    pub version: u64,
    /// The hash of the stream's last link (commit or receipt) when it was decided.
    pub prev_hash: Option<String>,
    /// The command, with its idempotency key and request digest.
    pub command: CommandMeta,
    /// The answer, in the command API's own terms: opaque to every other reader.
    pub answer: Value,
    /// Who wrote it.
    pub writer: Writer,
    /// When the writer decided the command.
    pub recorded_at: Timestamp,
    /// SHA-256 (hex) of the canonical record without this field and the signature, as for
    /// a commit ([`commit_hash_of_value`]).
    pub hash: String,
    /// The writer's Ed25519 signature over `hash`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

impl ReceiptRecord {
    /// A receipt of `answer` to `command` on `stream` at `version`, chained onto
    /// `prev_hash`, decided by `writer` now, with a fresh id; not yet sealed (see
    /// [`ReceiptRecord::sealed_and_signed`]).
    pub fn new(
        stream: StreamRef,
        (version, prev_hash): (u64, Option<String>),
        command: CommandMeta,
        answer: Value,
        writer: Writer,
    ) -> Self {
        Self {
            receipt_id: Uuid::now_v7(),
            stream,
            version,
            prev_hash,
            command,
            answer,
            writer,
            recorded_at: Timestamp::now(),
            hash: String::new(),
            signature: None,
        }
    }

    /// Sets `hash` from the rest of the record and signs it with `key`.
    #[must_use]
    pub fn sealed_and_signed(mut self, key: &SigningKey) -> Self {
        self.signature = None;
        self.hash = self.compute_hash();
        self.signature = Some(key.sign(&self.hash));
        self
    }

    /// Recomputes the hash of this record from its content.
    pub fn compute_hash(&self) -> String {
        let value = serde_json::to_value(LogRecord::Receipt(self.clone())).unwrap_or(Value::Null);
        commit_hash_of_value(&value)
    }

    /// True when `hash` matches the content.
    pub fn hash_is_valid(&self) -> bool {
        self.hash == self.compute_hash()
    }
}

/// A record of a Keel topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "nearly every record is a commit: boxing would cost an allocation each"
)]
pub enum LogRecord {
    /// An accepted command's events.
    Commit(CommitRecord),
    /// A partition owner's fence.
    Fence(FenceRecord),
    /// The answer to a keyed command that appended no commit.
    Receipt(ReceiptRecord),
}

impl LogRecord {
    /// Decodes a record from its bytes.
    ///
    /// Reads `kind` first, then the record as its own type: the same result as the tagged
    /// enum, without buffering every value of the record on the way (twice as fast).
    pub fn decode(bytes: &[u8]) -> Result<Self, SchemaError> {
        #[derive(Deserialize)]
        struct Kind<'a> {
            #[serde(borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        let decoded = match serde_json::from_slice::<Kind<'_>>(bytes) {
            Ok(k) if k.kind == "commit" => serde_json::from_slice(bytes).map(LogRecord::Commit),
            Ok(k) if k.kind == "fence" => serde_json::from_slice(bytes).map(LogRecord::Fence),
            Ok(k) if k.kind == "receipt" => serde_json::from_slice(bytes).map(LogRecord::Receipt),
            // Anything else: the tagged form says what is wrong.
            _ => serde_json::from_slice(bytes),
        };
        decoded.map_err(SchemaError::Record)
    }

    /// The record's bytes as written to the log.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising these plain data types cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// `commit`, `fence` or `receipt`, the value of the `keel-kind` header.
    pub fn kind(&self) -> &'static str {
        match self {
            LogRecord::Commit(_) => "commit",
            LogRecord::Fence(_) => "fence",
            LogRecord::Receipt(_) => "receipt",
        }
    }

    /// The writer of the record.
    pub fn writer(&self) -> &Writer {
        match self {
            LogRecord::Commit(c) => &c.writer,
            LogRecord::Fence(f) => &f.writer,
            LogRecord::Receipt(r) => &r.writer,
        }
    }
}

/// Fields left out of the hashed form: the hash itself, and the signature made over it.
const UNHASHED: [&str; 2] = ["hash", "signature"];

/// The hash of a commit given as the JSON object read from the log (including `kind`):
/// hex SHA-256 of [`canonical_json`] of the object without `hash` and `signature`.
///
/// The hashed form includes `prev_hash`, so each hash covers the stream's whole chain.
/// Verifiers call this on the raw JSON, so fields added by newer writers stay covered.
pub fn commit_hash_of_value(record: &Value) -> String {
    let mut record = record.clone();
    if let Value::Object(map) = &mut record {
        for field in UNHASHED {
            map.remove(field);
        }
    }
    hex::encode(Sha256::digest(canonical_json(&record)))
}

impl CommitRecord {
    /// A commit of `events` to `stream` after `expected_version`, decided by `writer` now
    /// for `command`, chained to `prev_hash`; with a fresh id, not yet sealed (see
    /// [`CommitRecord::sealed`] and [`CommitRecord::sealed_and_signed`]).
    pub fn new(
        stream: StreamRef,
        expected_version: u64,
        events: Vec<EventEnvelope>,
        command: CommandMeta,
        writer: Writer,
        prev_hash: Option<String>,
    ) -> Self {
        Self {
            commit_id: Uuid::now_v7(),
            stream,
            expected_version,
            events,
            command,
            writer,
            recorded_at: Timestamp::now(),
            prev_hash,
            hash: String::new(),
            signature: None,
        }
    }

    /// Sets `hash` to the hash of the rest of the record, and returns the sealed record.
    #[must_use]
    pub fn sealed(mut self) -> Self {
        self.hash = self.compute_hash();
        self
    }

    /// Seals the record and signs its hash with `key`.
    #[must_use]
    pub fn sealed_and_signed(self, key: &SigningKey) -> Self {
        let mut sealed = self.sealed();
        sealed.signature = Some(key.sign(&sealed.hash));
        sealed
    }

    /// Recomputes the hash of this record from its content.
    pub fn compute_hash(&self) -> String {
        let value = serde_json::to_value(LogRecord::Commit(self.clone())).unwrap_or(Value::Null);
        commit_hash_of_value(&value)
    }

    /// True when `hash` matches the content.
    pub fn hash_is_valid(&self) -> bool {
        self.hash == self.compute_hash()
    }

    /// The stream's version after this commit.
    pub fn next_version(&self) -> u64 {
        self.expected_version + self.events.len() as u64
    }

    /// The event types, comma-separated: the value of the `keel-event-types` header.
    pub fn event_types_header(&self) -> String {
        self.events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn commit(prev_hash: Option<String>, expected_version: u64) -> CommitRecord {
        let writer = Writer {
            instance: "cmd-7f3a".into(),
            epoch: 12,
        };
        crate::testing::commit(
            &writer,
            crate::testing::stream("order", "o-42"),
            expected_version,
        )
        .event(
            "OrderShipped",
            1,
            json!({"carrier": "DHL", "tracking": "JD01"}),
        )
        .command("ShipOrder", "alice")
        .idempotency_key("k-1")
        .prev_hash(prev_hash)
        .build()
    }

    #[test]
    fn records_round_trip_and_hashes_recompute() {
        let first = commit(None, 0);
        let record = LogRecord::Commit(first.clone());
        let bytes = record.encode();
        let back = LogRecord::decode(&bytes).unwrap();
        assert_eq!(back, record);
        let LogRecord::Commit(back) = back else {
            panic!("not a commit")
        };
        assert!(back.hash_is_valid());
        let raw: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(raw["kind"], "commit");
        assert_eq!(commit_hash_of_value(&raw), first.hash);
    }

    #[test]
    fn the_hash_chain_links_and_detects_tampering() {
        let first = commit(None, 0);
        let second = commit(Some(first.hash.clone()), 1);
        assert_eq!(second.prev_hash.as_deref(), Some(first.hash.as_str()));
        let mut tampered = second.clone();
        tampered.events[0].payload = json!({"carrier": "UPS", "tracking": "JD01"});
        assert!(!tampered.hash_is_valid());
        let mut relinked = second.clone();
        relinked.prev_hash = Some("0".repeat(64));
        assert!(
            !relinked.hash_is_valid(),
            "prev_hash is covered by the hash"
        );
    }

    /// A commit's trace context is covered by its hash, and a commit without one is
    /// written as before the field existed (so its hash is the same).
    #[test]
    fn the_trace_context_is_covered_by_the_hash_and_absent_when_there_is_none() {
        let plain = commit(None, 0);
        let raw: Value =
            serde_json::from_slice(&LogRecord::Commit(plain.clone()).encode()).unwrap();
        assert!(raw["command"].get("traceparent").is_none(), "{raw}");
        let mut traced = plain.clone();
        traced.command.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        assert!(!traced.hash_is_valid(), "the trace context is hashed");
        traced.hash = traced.compute_hash();
        let back = LogRecord::decode(&LogRecord::Commit(traced.clone()).encode()).unwrap();
        let LogRecord::Commit(back) = back else {
            panic!("not a commit")
        };
        assert!(back.hash_is_valid());
        assert_eq!(back.command.traceparent, traced.command.traceparent);
        let mut moved = back.clone();
        moved.command.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01".into());
        assert!(!moved.hash_is_valid());
    }

    /// What a fence's signature signs, pinned: a fence of the rules before claims (as
    /// logs already hold them) digests as it did, so the signatures in those logs still
    /// verify; a fence of today's rules covers its claim.
    #[test]
    fn fence_digests_are_pinned() {
        let fence = |raw: &str| -> FenceRecord {
            match LogRecord::decode(raw.as_bytes()).unwrap() {
                LogRecord::Fence(fence) => fence,
                other => panic!("not a fence: {other:?}"),
            }
        };
        let unbound = fence(
            r#"{"kind":"fence","writer":{"instance":"cmd-1","epoch":3},"recorded_at":"2026-11-21T12:00:00.123Z","rules":2}"#,
        );
        assert_eq!(
            unbound.digest(),
            "8e61905f3ca3a90b755b98481d35035a33858f4377ae04b977329b89997a38af"
        );
        let claiming = fence(
            r#"{"kind":"fence","writer":{"instance":"cmd-1","epoch":3},"recorded_at":"2026-11-21T12:00:00.123Z","rules":3,"claims":{"stream_type":"order","partition":5}}"#,
        );
        assert_eq!(
            claiming.digest(),
            "718a384dfec2f01c3c2ab5b81a9ada4fa80279a85cf771a7a248415b795bdc21"
        );
        assert!(!claiming.handoff, "a fence without the field is no handoff");
        let handoff = FenceRecord {
            handoff: true,
            ..claiming.clone()
        };
        assert_ne!(
            handoff.digest(),
            claiming.digest(),
            "the handoff mark is covered by the signature"
        );
        assert_eq!(
            serde_json::to_value(LogRecord::Fence(handoff)).unwrap()["handoff"],
            true
        );
    }

    #[test]
    fn fences_round_trip() {
        let fence = LogRecord::Fence(FenceRecord {
            writer: Writer {
                instance: "cmd-1".into(),
                epoch: 3,
            },
            recorded_at: Timestamp::now(),
            rules: Some(FENCE_RULES),
            claims: Some(FencedPartition {
                stream_type: "order".into(),
                partition: 2,
            }),
            handoff: false,
            signature: None,
        });
        let raw: Value = serde_json::from_slice(&fence.encode()).unwrap();
        assert_eq!(raw["kind"], "fence");
        assert_eq!(raw["writer"]["epoch"], 3);
        assert_eq!(LogRecord::decode(&fence.encode()).unwrap(), fence);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"kind":"party"}"#,
            br#"{"kind":"fence"}"#,
        ] {
            assert!(matches!(
                LogRecord::decode(bad),
                Err(SchemaError::Record(_))
            ));
        }
    }

    #[test]
    fn timestamps_are_written_with_milliseconds() {
        let t: Timestamp = serde_json::from_str(r#""2026-11-21T12:00:00.123Z""#).unwrap();
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#""2026-11-21T12:00:00.123Z""#
        );
        assert_eq!(Timestamp::now().to_string().len(), 24);
    }
}
