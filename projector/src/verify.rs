//! `projector verify` and `projector export`: the log checked, and handed to auditors.
//!
//! Verification re-reads the topics from offset 0 through the partition gate, as every
//! reader does, and checks per stream: versions contiguous from 1, every hash recomputes
//! from the record as written, every `prev_hash` links to the stream's previous commit,
//! every signature verifies with a trusted key, and the topic still holds every commit the
//! audit log in PostgreSQL has seen. Records the gate rejects because their writer did not
//! own the partition (zombie writes) are reported as such: no reader ever applied them.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use keel_kafka::{Gated, KafkaSettings, Rejection, partition_for, read_through_gate};
use keel_schemas::{CommitRecord, LogRecord, SignatureCheck, StreamRef, TrustedKeys};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;

/// What kind of finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// The log does not hold: the chain, a version, a hash or a signature is wrong.
    Violation,
    /// A record the gate skipped because its writer did not own the partition: a zombie
    /// writer's append, never applied by any reader. Not corruption.
    Zombie,
    /// A record of a log written before the gate checked signatures, counted under the key
    /// policy's legacy cut-off: unsigned, and not a violation.
    Legacy,
}

/// One thing verification found.
#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    /// Violation or zombie write.
    pub kind: FindingKind,
    /// The stream, when the record names one.
    pub stream: Option<String>,
    /// The stream version concerned, when known.
    pub version: Option<u64>,
    /// Where the record is.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset (`None` for a commit the log has lost).
    pub offset: Option<i64>,
    /// What is wrong.
    pub detail: String,
}

/// What `verify` found over the topics it read.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Records read.
    pub records: u64,
    /// Commits the gate accepted (and that were checked).
    pub commits: u64,
    /// Streams checked.
    pub streams: u64,
    /// Whether the audit log in PostgreSQL was compared with the topics.
    pub audit_log_compared: bool,
    /// Commits counted under a legacy fence (see [`FindingKind::Legacy`]).
    pub legacy: u64,
    /// Violations and zombie writes, in log order per partition.
    pub findings: Vec<Finding>,
}

impl VerifyReport {
    /// The violations found.
    pub fn violations(&self) -> usize {
        self.findings
            .iter()
            .filter(|f| f.kind == FindingKind::Violation)
            .count()
    }
}

/// What verification remembers of a stream: its last accepted commit.
struct Tip {
    version: u64,
    hash: String,
    topic: String,
    partition: i32,
    offset: i64,
}

/// Parses `type/id`.
pub fn parse_stream(text: &str) -> anyhow::Result<StreamRef> {
    let (stream_type, id) = text
        .split_once('/')
        .filter(|(t, id)| !t.is_empty() && !id.is_empty())
        .with_context(|| {
            format!("{text:?} is not a stream: expected <type>/<id>, e.g. order/o-42")
        })?;
    anyhow::ensure!(
        keel_domain::STREAM_TYPES.contains(&stream_type),
        "no stream type {stream_type:?}; the types are: {}",
        keel_domain::STREAM_TYPES.join(", ")
    );
    Ok(StreamRef {
        stream_type: stream_type.to_owned(),
        id: id.to_owned(),
    })
}

/// Verifies the topics (or one stream); compares with the audit log when `pool` is given.
pub async fn verify(
    kafka: &KafkaSettings,
    trusted: &Arc<TrustedKeys>,
    only: Option<&StreamRef>,
    pool: Option<&PgPool>,
) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport::default();
    let mut tips: HashMap<StreamRef, Tip> = HashMap::new();
    // Each stream's last link (commit or receipt), which its next record chains onto.
    let mut heads: HashMap<StreamRef, String> = HashMap::new();
    // What the audit log has seen, taken before the topics are read: everything in it is
    // then below the ends the reading goes to, so commits written meanwhile are no finding.
    let seen = match pool {
        Some(pool) => audit_log_tips(pool, only).await?,
        None => None,
    };
    let stream_types: Vec<&str> = match only {
        Some(s) => vec![s.stream_type.as_str()],
        None => keel_domain::STREAM_TYPES.to_vec(),
    };
    for stream_type in &stream_types {
        let topic = kafka.topic(stream_type);
        let partitions: Vec<i32> = match only {
            Some(s) => vec![partition_for(s.id.as_bytes(), kafka.partitions)],
            None => (0..kafka.partitions).collect(),
        };
        read_through_gate(kafka, trusted, &topic, &partitions, |read| {
            report.records += 1;
            check_record(read, trusted, only, (&mut tips, &mut heads), &mut report);
        })
        .await?;
    }
    report.streams = tips.len() as u64;
    if let Some(seen) = seen {
        compare_with_audit_log(seen, &tips, &mut report);
        report.audit_log_compared = true;
    }
    Ok(report)
}

fn check_record(
    read: Gated,
    trusted: &TrustedKeys,
    only: Option<&StreamRef>,
    (tips, heads): (
        &mut HashMap<StreamRef, Tip>,
        &mut HashMap<StreamRef, String>,
    ),
    report: &mut VerifyReport,
) {
    let Gated {
        entry,
        record,
        owner_if_skipped: owner,
        ..
    } = &read;
    let finding = |kind, stream: Option<&StreamRef>, version, detail: String| Finding {
        kind,
        stream: stream.map(ToString::to_string),
        version,
        topic: entry.topic.clone(),
        partition: entry.partition,
        offset: Some(entry.offset),
        detail,
    };
    // Hashes are recomputed from the decoded record, as every reader's gate recomputes
    // them, so that verify's verdicts are the gate's.
    let (record, verdict) = match record {
        Ok((record, verdict)) => (record, verdict.clone()),
        Err(e) => {
            if only.is_none() {
                report.findings.push(finding(
                    FindingKind::Violation,
                    None,
                    None,
                    format!("the record is not a Keel record: {e}"),
                ));
            }
            return;
        }
    };
    let commit = match record {
        LogRecord::Commit(commit) => commit,
        // A receipt changes no view: only one the gate skipped is worth a word.
        LogRecord::Receipt(receipt) => {
            if verdict.is_ok() {
                heads.insert(receipt.stream.clone(), receipt.hash.clone());
            }
            if only.is_none_or(|s| *s == receipt.stream)
                && let Err(rejection) = verdict
            {
                // Intact and signed, it is a writer's receipt that came too late (the
                // stream moved on, or its writer lost the partition): skipped, as
                // designed. Anything else was forged or broken.
                let intact = receipt.hash_is_valid()
                    && signature_problem(trusted, &receipt.hash, receipt.signature.as_ref())
                        .is_none();
                let kind = match rejection {
                    Rejection::NotOwner { .. }
                    | Rejection::VersionConflict { .. }
                    | Rejection::BrokenChain { .. }
                        if intact =>
                    {
                        FindingKind::Zombie
                    }
                    _ => FindingKind::Violation,
                };
                report.findings.push(finding(
                    kind,
                    Some(&receipt.stream),
                    None,
                    format!("a receipt skipped by the gate: {rejection}"),
                ));
            }
            return;
        }
        LogRecord::Fence(fence) => {
            match verdict {
                // Someone appended a fence no trusted key signed: a takeover attempt,
                // which the gate turned away.
                Err(rejection @ Rejection::UntrustedFence { .. }) if only.is_none() => {
                    report.findings.push(finding(
                        FindingKind::Violation,
                        None,
                        None,
                        format!("a fence the gate skipped, so it took nothing: {rejection}"),
                    ));
                }
                // A planned handoff's mark takes nothing; one no trusted key signed is
                // someone writing in a writer's name.
                Err(Rejection::Handoff { .. }) => {
                    if only.is_none()
                        && trusted.check(&fence.digest(), fence.signature.as_ref())
                            != SignatureCheck::Valid
                    {
                        report.findings.push(finding(
                            FindingKind::Violation,
                            None,
                            None,
                            format!(
                                "a handoff mark in the name of {} (epoch {}) that no trusted key signed",
                                fence.writer.instance, fence.writer.epoch
                            ),
                        ));
                    }
                }
                Err(rejection) if only.is_none() => report.findings.push(finding(
                    FindingKind::Zombie,
                    None,
                    None,
                    format!("fence skipped by the gate: {rejection}"),
                )),
                Err(_) => {}
                Ok(()) if read.legacy => {
                    if only.is_none() {
                        report.findings.push(finding(
                            FindingKind::Legacy,
                            None,
                            None,
                            format!(
                                "a legacy fence of {} (epoch {}), counted under the key policy's cut-off",
                                fence.writer.instance, fence.writer.epoch
                            ),
                        ));
                    }
                }
                // A fence decides who may write: one nobody trusted signed is a takeover.
                Ok(()) => {
                    let problem = match trusted.check(&fence.digest(), fence.signature.as_ref()) {
                        SignatureCheck::Valid => None,
                        SignatureCheck::Missing => Some("is not signed".to_owned()),
                        SignatureCheck::UnknownKey(id) => Some(format!(
                            "is signed with key {id}, which is not a trusted key"
                        )),
                        SignatureCheck::Invalid(why) => Some(format!("does not verify: {why}")),
                    };
                    if let Some(problem) = problem {
                        report.findings.push(finding(
                            FindingKind::Violation,
                            None,
                            None,
                            format!(
                                "the fence that made {} (epoch {}) the partition's owner {problem}",
                                fence.writer.instance, fence.writer.epoch
                            ),
                        ));
                    }
                }
            }
            return;
        }
    };
    if only.is_some_and(|s| *s != commit.stream) {
        return;
    }
    let stream = Some(&commit.stream);
    let first = commit.expected_version + 1;
    if let Err(rejection) = verdict {
        let by_owner = owner.as_ref() == Some(&commit.writer);
        // A skipped record is still a record someone wrote: whether it is intact and
        // signed decides what it was.
        let hash_ok = commit.hash_is_valid();
        let signature = signature_problem(trusted, &commit.hash, commit.signature.as_ref());
        // The owner's own record, intact and signed, decided on a state the log had moved
        // past: its append landed late, or a receipt of the stream landed before it. The
        // gate skipped it, as designed; a version ahead of the stream is no such thing.
        let stale = by_owner
            && hash_ok
            && signature.is_none()
            && match &rejection {
                Rejection::BrokenChain { .. } => true,
                Rejection::VersionConflict {
                    expected, actual, ..
                } => expected < actual,
                _ => false,
            };
        let (kind, detail) = match (&rejection, by_owner) {
            _ if stale => (
                FindingKind::Zombie,
                format!(
                    "a stale write of the owner (decided before what the log holds ahead of it), skipped by the gate and applied by no reader: {rejection}"
                ),
            ),
            (
                Rejection::BadHash { .. }
                | Rejection::BadSignature { .. }
                | Rejection::BrokenChain { .. },
                true,
            ) => (
                FindingKind::Violation,
                format!(
                    "a forged or broken commit in the owner's name, skipped by the gate and applied by no reader: {rejection}"
                ),
            ),
            (Rejection::NotOwner { .. } | Rejection::StaleFence { .. }, _) | (_, false) => (
                FindingKind::Zombie,
                format!("zombie write, skipped by the gate and applied by no reader: {rejection}"),
            ),
            _ => (
                FindingKind::Violation,
                format!("version out of sequence (a skipped or repeated version): {rejection}"),
            ),
        };
        report
            .findings
            .push(finding(kind, stream, Some(first), detail));
        // A zombie's record is still a record someone wrote: it must be intact and signed.
        if kind == FindingKind::Zombie {
            if !hash_ok {
                report.findings.push(finding(
                    FindingKind::Violation,
                    stream,
                    Some(first),
                    "a zombie write whose hash does not recompute".into(),
                ));
            }
            if let Some(problem) = signature {
                report.findings.push(finding(
                    FindingKind::Violation,
                    stream,
                    Some(first),
                    format!("a zombie write that {problem}"),
                ));
            }
        }
        return;
    }
    report.commits += 1;
    let last_version = commit.next_version();
    let mut problems = Vec::new();
    let recomputed = commit.compute_hash();
    if recomputed != commit.hash {
        problems.push(format!(
            "the hash does not recompute: the record says {}, its content hashes to {recomputed}",
            short(&commit.hash)
        ));
    }
    let previous = heads.get(&commit.stream).cloned();
    if commit.prev_hash != previous {
        problems.push(format!(
            "prev_hash {} does not link to the stream's previous link's hash {}",
            commit.prev_hash.as_deref().map_or("null".into(), short),
            previous
                .as_deref()
                .map_or("null (first commit)".into(), short)
        ));
    }
    if read.legacy {
        // Written before the gate checked signatures: counted under the cut-off.
        report.legacy += 1;
    } else if let Some(problem) =
        signature_problem(trusted, &commit.hash, commit.signature.as_ref())
    {
        problems.push(format!("the commit {problem}"));
    }
    for detail in problems {
        report
            .findings
            .push(finding(FindingKind::Violation, stream, Some(first), detail));
    }
    heads.insert(commit.stream.clone(), commit.hash.clone());
    tips.insert(
        commit.stream.clone(),
        Tip {
            version: last_version,
            hash: commit.hash.clone(),
            topic: entry.topic.clone(),
            partition: entry.partition,
            offset: entry.offset,
        },
    );
}

/// What is wrong with a signature over `hash`, if anything.
fn signature_problem(
    trusted: &TrustedKeys,
    hash: &str,
    signature: Option<&keel_schemas::Signature>,
) -> Option<String> {
    match trusted.check(hash, signature) {
        SignatureCheck::Valid => None,
        SignatureCheck::Missing => Some("is not signed".into()),
        SignatureCheck::UnknownKey(id) => Some(format!(
            "is signed with key {id}, which is not a trusted key"
        )),
        SignatureCheck::Invalid(why) => {
            Some(format!("has a signature that does not verify: {why}"))
        }
    }
}

fn short(hash: &str) -> String {
    hash.chars().take(12).collect()
}

type AuditTip = (String, String, String, i32, i64, i64, String);

/// Each stream's last commit as the audit log holds it; `None` when there is no audit log.
async fn audit_log_tips(
    pool: &PgPool,
    only: Option<&StreamRef>,
) -> anyhow::Result<Option<Vec<AuditTip>>> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('audit_log') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(None);
    }
    let rows = sqlx::query_as(
        r#"SELECT DISTINCT ON (stream_type, stream_id) stream_type, stream_id, topic, partition, "offset",
                version, hash
           FROM audit_log
           WHERE ($1::text IS NULL OR (stream_type = $1 AND stream_id = $2))
           ORDER BY stream_type, stream_id, version DESC"#,
    )
    .bind(only.map(|s| s.stream_type.clone()))
    .bind(only.map(|s| s.id.clone()))
    .fetch_all(pool)
    .await?;
    Ok(Some(rows))
}

/// Reports every stream whose topic ends before what the audit log has seen, or whose
/// last commit the audit log holds with another hash.
fn compare_with_audit_log(
    seen: Vec<AuditTip>,
    tips: &HashMap<StreamRef, Tip>,
    report: &mut VerifyReport,
) {
    for (stream_type, id, topic, partition, offset, version, hash) in seen {
        let stream = StreamRef { stream_type, id };
        let version = version as u64;
        let tip = tips.get(&stream);
        let lost = match tip {
            None => Some(format!(
                "the topic has lost this stream: the audit log holds it up to version {version} \
                 (offset {offset}), the topic holds no commit of it"
            )),
            Some(t) if t.version < version => Some(format!(
                "the topic has lost commits the audit log holds: the audit log has version {version} \
                 (offset {offset}), the topic ends at version {} (offset {})",
                t.version, t.offset
            )),
            Some(t) if t.version == version && t.hash != hash => Some(format!(
                "the audit log holds version {version} with hash {}, the topic with {}",
                short(&hash),
                short(&t.hash)
            )),
            _ => None,
        };
        if let Some(detail) = lost {
            report.findings.push(Finding {
                kind: FindingKind::Violation,
                stream: Some(stream.to_string()),
                version: Some(version),
                topic: tip.map_or(topic, |t| t.topic.clone()),
                partition: tip.map_or(partition, |t| t.partition),
                offset: None,
                detail,
            });
        }
    }
}

/// One line of `projector export`: a record of the stream as it is in the log, with its
/// position and the gate's verdict.
#[derive(Debug, Serialize)]
pub struct ExportLine {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
    /// Whether the partition gate accepted it (readers apply only accepted commits).
    pub accepted: bool,
    /// Why the gate skipped it, if it did.
    pub rejection: Option<String>,
    /// The record exactly as written. Its hash recomputes from the fields Keel defines
    /// (what every reader's gate hashes); a field no Keel writer wrote is not covered.
    pub record: Value,
}

/// Every commit and receipt of `stream`, in log order, with the gate's verdicts: the links
/// of its chain.
pub async fn export(
    kafka: &KafkaSettings,
    policy: &Arc<TrustedKeys>,
    stream: &StreamRef,
    mut each: impl FnMut(ExportLine) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let topic = kafka.topic(&stream.stream_type);
    let partition = partition_for(stream.id.as_bytes(), kafka.partitions);
    let mut lines = Vec::new();
    read_through_gate(kafka, policy, &topic, &[partition], |read| {
        let Gated { entry, record, .. } = read;
        let Ok((record, verdict)) = record else {
            return;
        };
        // The record as written, not as re-encoded: its hash recomputes from exactly this.
        let of_stream = match &record {
            LogRecord::Commit(CommitRecord { stream: s, .. }) => s == stream,
            // A receipt is a link of the stream's chain: the commit after it links to it.
            LogRecord::Receipt(receipt) => receipt.stream == *stream,
            LogRecord::Fence(_) => false,
        };
        if of_stream && let Ok(raw) = serde_json::from_slice::<Value>(&entry.payload) {
            lines.push(ExportLine {
                topic: entry.topic.clone(),
                partition: entry.partition,
                offset: entry.offset,
                accepted: verdict.is_ok(),
                rejection: verdict.err().map(|r| r.to_string()),
                record: raw,
            });
        }
    })
    .await?;
    let count = lines.len() as u64;
    for line in lines {
        each(line)?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use keel_kafka::{LogEntry, PartitionGate};
    use keel_schemas::{SigningKey, TopicPartition, testing};

    use super::*;

    /// verify reaches the gate's verdict on every record: a genuine commit that arrives
    /// with a field no reader knows counts for the gate (which hashes what it decodes), so
    /// verify finds nothing wrong with it either.
    #[test]
    fn verify_judges_a_record_as_the_gate_does() {
        let key = SigningKey::generate();
        let mut trusted = TrustedKeys::default();
        trusted.add(&key);
        let trusted = Arc::new(trusted);
        let at = TopicPartition::new("t.order.events", 0);
        let writer = testing::writer("cmd-a", 1);
        let commit = testing::commit(&writer, testing::stream("order", "o-1"), 0)
            .event("OrderCancelled", 1, serde_json::json!({"reason": "test"}))
            .signed(&key);
        let mut padded: Value =
            serde_json::from_slice(&LogRecord::Commit(commit).encode()).unwrap();
        padded["added_by_a_newer_writer"] = Value::from(1);
        let payloads = [
            testing::signed_fence(&writer, &key, &at).encode(),
            serde_json::to_vec(&padded).unwrap(),
        ];
        let mut gate = PartitionGate::new(Arc::clone(&trusted), &at);
        let (mut tips, mut heads) = (HashMap::new(), HashMap::new());
        let mut report = VerifyReport::default();
        for (offset, payload) in payloads.into_iter().enumerate() {
            let read = gate.read(LogEntry {
                topic: at.topic.clone(),
                partition: 0,
                offset: offset as i64,
                key: None,
                payload,
                headers: Vec::new(),
                timestamp_ms: None,
            });
            assert!(read.accepted().is_some(), "the gate counts record {offset}");
            check_record(read, &trusted, None, (&mut tips, &mut heads), &mut report);
        }
        assert_eq!(report.commits, 1);
        assert!(report.findings.is_empty(), "{:?}", report.findings);
    }
}
