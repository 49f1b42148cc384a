//! Snapshots of a partition owner's state, so that an owner taking a partition over reads
//! only what follows the latest snapshot instead of the whole partition.
//!
//! A snapshot is a signed manifest and a body. The body holds everything the owner builds
//! from the log: each stream's state, version, last hash and offset, the gate's stream
//! heads, the idempotency keys within their retention. The manifest says which partition
//! and which records it covers (those before `next_offset`), the gate's fence state, the
//! SHA-256 of the body, and the digest of the last record covered (the anchor); it is
//! signed with the writing owner's key.
//!
//! Nothing in a snapshot is trusted before it is checked: its signature against the key
//! policy every reader applies, the body against the manifest's digest, its partition, its
//! format and build, and its anchor against the record the log holds at that offset. A
//! snapshot that fails any check is ignored with a warning, and the owner reads the
//! partition from its first record, as it would without one.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use keel_domain::Aggregate;
use keel_kafka::{PartitionGate, StreamHead, hash_bytes};
use keel_schemas::{
    Signature, SignatureCheck, SigningKey, StreamRef, Timestamp, TopicPartition, TrustedKeys,
    Writer,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::idempotency::HeldKey;
use super::outcome::{Outcome, OwnerError};
use super::receipt::Recorded;
use super::task::Stream;

/// The snapshot format this build writes and reads. Bump it whenever what a snapshot
/// holds, or how an aggregate folds its events into its state, changes: snapshots of
/// another format are ignored.
pub const SNAPSHOT_FORMAT: u32 = 1;

/// A snapshot as stored: the signed manifest and the body, each as bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The manifest (JSON).
    pub manifest: Vec<u8>,
    /// The body (JSON).
    pub body: Vec<u8>,
}

/// What a snapshot says about itself; signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`SNAPSHOT_FORMAT`] when written.
    pub format: u32,
    /// The build that wrote it: its version and the aggregate's event schemas.
    pub build: String,
    /// The partition.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The records covered are those before this offset.
    pub next_offset: i64,
    /// Counts the partition's snapshots, one up from the one its writer started from.
    pub generation: u64,
    /// The last record covered (at `next_offset - 1`): the hex SHA-256 of its bytes.
    pub anchor: String,
    /// The gate's fence state.
    pub gate: GateMeta,
    /// How long the idempotency keys in it were kept, in seconds: an owner that keeps
    /// them longer would miss some, and does not use it.
    pub key_retention_secs: u64,
    /// Hex SHA-256 of the body.
    pub body_sha256: String,
    /// Streams in the body.
    pub streams: u64,
    /// Who wrote it.
    pub written_by: Writer,
    /// When.
    pub recorded_at: Timestamp,
    /// The writer's signature over [`Manifest::digest`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<Signature>,
}

/// The gate's state besides its stream heads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GateMeta {
    /// The partition's owner.
    pub owner: Option<Writer>,
    /// The key that signed the owner's fence.
    pub owner_key: Option<String>,
    /// The highest rules of a fence that counted.
    pub rules: u32,
    /// The highest epoch.
    pub highest_epoch: u64,
    /// Records that counted.
    pub accepted: u64,
    /// Records skipped.
    pub rejected: u64,
}

impl Manifest {
    /// What the signature signs: the hex SHA-256 of the manifest without its signature.
    pub fn digest(&self) -> String {
        let unsigned = Self {
            signature: None,
            ..self.clone()
        };
        hex::encode(Sha256::digest(
            serde_json::to_vec(&unsigned).unwrap_or_default(),
        ))
    }
}

/// One stream in the body.
#[derive(Serialize, Deserialize)]
struct StreamEntry<A> {
    id: String,
    state: A,
    version: u64,
    last_hash: Option<String>,
    last_offset: Option<i64>,
    unreadable: Option<String>,
}

/// A remembered answer.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum SavedAnswer {
    Outcome { outcome: Outcome },
    Recorded { recorded: Recorded },
    Unavailable { reason: String },
}

/// One idempotency key in the body.
#[derive(Serialize, Deserialize)]
struct KeyEntry {
    stream: String,
    key: String,
    digest: Option<String>,
    answer: SavedAnswer,
    at: DateTime<Utc>,
}

/// The body.
#[derive(Serialize, Deserialize)]
struct Body<A> {
    streams: Vec<StreamEntry<A>>,
    /// Every stream head of the gate (streams of other types in the topic included).
    heads: Vec<(StreamRef, u64, Option<String>)>,
    keys: Vec<KeyEntry>,
    log_time: Option<DateTime<Utc>>,
    undecodable: u64,
}

/// What an owner knows, taken out of a checked snapshot.
pub(super) struct Restored<A> {
    pub(super) manifest: Manifest,
    pub(super) gate: PartitionGate,
    pub(super) streams: HashMap<String, Stream<A>>,
    pub(super) keys: Vec<HeldKey>,
    pub(super) log_time: Option<DateTime<Utc>>,
    pub(super) undecodable: u64,
}

/// The build a snapshot of `A` must come from.
pub(super) fn build_of<A: Aggregate>() -> String {
    let schemas: Vec<String> = A::EVENT_TYPES
        .iter()
        .map(|(t, v)| format!("{t}@{v}"))
        .collect();
    format!(
        "command-api {} format {SNAPSHOT_FORMAT} gate rules {} fence rules {} {} [{}]",
        env!("CARGO_PKG_VERSION"),
        keel_kafka::GATE_RULES,
        keel_schemas::FENCE_RULES,
        A::TYPE,
        schemas.join(",")
    )
}

/// The hex SHA-256 of a record's bytes: a snapshot's anchor.
pub(super) fn anchor_of(payload: &[u8]) -> String {
    hex::encode(Sha256::digest(payload))
}

/// What an owner holds, as [`write`] takes it.
pub(super) struct Holding<'a, A> {
    pub(super) at: &'a TopicPartition,
    pub(super) next_offset: i64,
    pub(super) anchor: String,
    pub(super) gate: &'a PartitionGate,
    pub(super) streams: &'a HashMap<String, Stream<A>>,
    pub(super) keys: (Vec<HeldKey>, Option<DateTime<Utc>>),
    pub(super) undecodable: u64,
    pub(super) writer: &'a Writer,
    pub(super) generation: u64,
    pub(super) key_retention: std::time::Duration,
}

/// A snapshot of what `holding` says, signed with `key`.
pub(super) fn write<A: Aggregate + Serialize>(
    holding: Holding<'_, A>,
    key: &SigningKey,
) -> Result<StoredSnapshot, String> {
    let streams: Vec<StreamEntry<&A>> = holding
        .streams
        .iter()
        .map(|(id, s)| StreamEntry {
            id: id.clone(),
            state: &s.state,
            version: s.version,
            last_hash: s.last_hash.clone(),
            last_offset: s.last_offset,
            unreadable: s.unreadable.clone(),
        })
        .collect();
    let (held, log_time) = holding.keys;
    let keys = held
        .into_iter()
        .map(|((stream, key), digest, answer, at)| KeyEntry {
            stream,
            key,
            digest,
            answer: match &answer {
                Ok(outcome) => SavedAnswer::Outcome {
                    outcome: outcome.clone(),
                },
                Err(OwnerError::Unavailable(reason)) => SavedAnswer::Unavailable {
                    reason: reason.clone(),
                },
                Err(_) => match Recorded::of(&answer) {
                    Some(recorded) => SavedAnswer::Recorded { recorded },
                    None => SavedAnswer::Unavailable {
                        reason: "this key's answer cannot be replayed; retry".into(),
                    },
                },
            },
            at,
        })
        .collect();
    let heads = holding
        .gate
        .stream_heads()
        .map(|(stream, head)| (stream.clone(), head.version, head.hash.map(hex::encode)))
        .collect();
    let body = Body {
        streams,
        heads,
        keys,
        log_time,
        undecodable: holding.undecodable,
    };
    let body = serde_json::to_vec(&body).map_err(|e| format!("encoding the snapshot: {e}"))?;
    let gate = holding.gate;
    let manifest = Manifest {
        format: SNAPSHOT_FORMAT,
        build: build_of::<A>(),
        topic: holding.at.topic.clone(),
        partition: holding.at.partition,
        next_offset: holding.next_offset,
        generation: holding.generation,
        anchor: holding.anchor,
        gate: GateMeta {
            owner: gate.owner().cloned(),
            owner_key: gate.owner_key().map(str::to_owned),
            rules: gate.fence_rules(),
            highest_epoch: gate.highest_epoch(),
            accepted: gate.accepted(),
            rejected: gate.rejected(),
        },
        key_retention_secs: holding.key_retention.as_secs(),
        body_sha256: hex::encode(Sha256::digest(&body)),
        streams: holding.streams.len() as u64,
        written_by: holding.writer.clone(),
        recorded_at: Timestamp::now(),
        signature: None,
    };
    let signature = key.sign(&manifest.digest());
    let manifest = Manifest {
        signature: Some(signature),
        ..manifest
    };
    Ok(StoredSnapshot {
        manifest: serde_json::to_vec(&manifest).map_err(|e| format!("encoding: {e}"))?,
        body,
    })
}

/// The manifest of `stored`, checked: a manifest of this format and build, for the
/// partition `at`, signed by the key of the partition's owner as the snapshot has it (a
/// key `policy` trusts and has not retired), whose body is the one it names, holding the
/// idempotency keys of at least `key_retention`.
pub(super) fn check<A: Aggregate>(
    stored: &StoredSnapshot,
    policy: &TrustedKeys,
    at: &TopicPartition,
    key_retention: std::time::Duration,
) -> Result<Manifest, String> {
    let manifest: Manifest = serde_json::from_slice(&stored.manifest)
        .map_err(|e| format!("the manifest does not read: {e}"))?;
    if manifest.format != SNAPSHOT_FORMAT || manifest.build != build_of::<A>() {
        return Err(format!(
            "written by another build ({}, format {}); this one is {}",
            manifest.build,
            manifest.format,
            build_of::<A>()
        ));
    }
    if manifest.topic != at.topic || manifest.partition != at.partition {
        return Err(format!(
            "it is a snapshot of {}/{}, not {at}",
            manifest.topic, manifest.partition
        ));
    }
    match policy.check(&manifest.digest(), manifest.signature.as_ref()) {
        SignatureCheck::Valid => {}
        other => return Err(format!("its signature does not hold: {other:?}")),
    }
    let signer = manifest
        .signature
        .as_ref()
        .map(|s| s.key_id.clone())
        .unwrap_or_default();
    if policy.is_retired(&signer) {
        return Err(format!("it is signed with the retired key {signer}"));
    }
    if manifest.gate.owner_key.as_deref() != Some(signer.as_str()) {
        return Err(format!(
            "it is signed with key {signer}, not the key of the owner it names ({:?})",
            manifest.gate.owner_key
        ));
    }
    if manifest.key_retention_secs < key_retention.as_secs() {
        return Err(format!(
            "it kept idempotency keys for {} s, less than this owner's {} s",
            manifest.key_retention_secs,
            key_retention.as_secs()
        ));
    }
    if manifest.next_offset < 1 {
        return Err("it covers no record".into());
    }
    let body_sha256 = hex::encode(Sha256::digest(&stored.body));
    if body_sha256 != manifest.body_sha256 {
        return Err(format!(
            "its body ({} bytes) is not the one the manifest names",
            stored.body.len()
        ));
    }
    Ok(manifest)
}

/// The state a checked snapshot holds, with a gate of `policy` over `at`.
pub(super) fn restore<A: Aggregate + DeserializeOwned>(
    manifest: Manifest,
    body: &[u8],
    policy: std::sync::Arc<TrustedKeys>,
    at: &TopicPartition,
) -> Result<Restored<A>, String> {
    let body: Body<A> =
        serde_json::from_slice(body).map_err(|e| format!("the body does not read: {e}"))?;
    let heads = body
        .heads
        .into_iter()
        .map(|(stream, version, hash)| {
            let hash = match hash {
                Some(hex) => Some(hash_bytes(&hex).ok_or("a stream head that is not a hash")?),
                None => None,
            };
            Ok((stream, StreamHead { version, hash }))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let meta = &manifest.gate;
    let gate = PartitionGate::restore(
        policy,
        at,
        meta.owner.clone(),
        meta.highest_epoch,
        heads,
        meta.accepted,
        meta.rejected,
    )
    .with_fences(meta.owner_key.clone(), meta.rules);
    let streams = body
        .streams
        .into_iter()
        .map(|s| {
            (
                s.id,
                Stream {
                    state: s.state,
                    version: s.version,
                    last_hash: s.last_hash,
                    last_offset: s.last_offset,
                    unreadable: s.unreadable,
                },
            )
        })
        .collect();
    let keys = body
        .keys
        .into_iter()
        .map(|k| {
            let answer = match k.answer {
                SavedAnswer::Outcome { outcome } => Ok(outcome),
                SavedAnswer::Recorded { recorded } => Err(recorded.into_error()),
                SavedAnswer::Unavailable { reason } => Err(OwnerError::Unavailable(reason)),
            };
            ((k.stream, k.key), k.digest, answer, k.at)
        })
        .collect();
    Ok(Restored {
        manifest,
        gate,
        streams,
        keys,
        log_time: body.log_time,
        undecodable: body.undecodable,
    })
}
