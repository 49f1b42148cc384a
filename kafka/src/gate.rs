//! The partition gate: the one rule, applied identically by every reader, that decides
//! which records of a partition count.
//!
//! * A **fence** is valid only if its epoch is higher than every epoch before it on the
//!   partition, it claims this partition (the stream type of its topic and its number,
//!   under its signature, so a fence copied from another partition claims nothing here),
//!   and it is signed by a key the [`TrustedKeys`] policy trusts (a retired key only until
//!   a fence of a key in service has counted); it makes its writer the partition's owner,
//!   with that key. A legacy fence (no `rules`, from a log written before the gate checked
//!   signatures) counts only under the policy's explicit cut-off, and never after a fence
//!   with rules; a signed fence of [`UNBOUND_FENCE_RULES`] (which claimed no partition)
//!   never after a fence of today's rules.
//! * A **commit** is valid only if its writer is the owner at that point of the log, its
//!   `expected_version` equals the stream's version there, its `prev_hash` is the hash of
//!   the stream's last accepted commit (so a commit chained onto one the gate skipped is
//!   skipped too, even when the versions happen to line up), its hash recomputes, it is
//!   signed with the key of the fence that made its writer the owner, and its events carry
//!   the versions that follow, one by one. Under a legacy fence a commit is read by the
//!   rules of its time: owner, version and numbering.
//!
//! * A **receipt** (the answer to a keyed command that appended nothing) is valid only if
//!   its writer is the owner under a fence with rules, it is at the stream's version and
//!   chains onto the stream's last link, its hash recomputes and the fence's key signed
//!   it. It becomes the stream's last link (the next commit chains onto it) without
//!   changing its version.
//!
//! Invalid records are skipped by everyone and counted. Since the gate only looks at the
//! log, a zombie writer (an old owner that has not noticed a newer fence) may append, but
//! no reader ever applies its records, and it never reads its own commit back as accepted,
//! so it never acknowledges one.

use std::collections::HashMap;

use std::sync::Arc;

use keel_schemas::{
    CommitCheck, CommitRecord, FENCE_RULES, FenceRecord, FencedPartition, LogRecord, ReceiptRecord,
    SignatureCheck, StreamRef, TopicPartition, TrustedKeys, UNBOUND_FENCE_RULES, Writer,
};
use thiserror::Error;

/// Why the gate skipped a record.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum Rejection {
    /// A fence whose epoch is not above the highest one before it.
    #[error("stale fence: epoch {epoch} is not above {highest}")]
    StaleFence {
        /// The fence's epoch.
        epoch: u64,
        /// The highest epoch before it.
        highest: u64,
    },
    /// A commit by a writer that does not own the partition at that point.
    #[error("commit by {writer:?}, but the owner is {owner:?}")]
    NotOwner {
        /// The commit's writer.
        writer: Writer,
        /// The owner at that point, if any.
        owner: Option<Writer>,
    },
    /// A commit that expected another stream version.
    #[error("{stream} is at version {actual}, the commit expected {expected}")]
    VersionConflict {
        /// The stream.
        stream: StreamRef,
        /// The version the commit expected.
        expected: u64,
        /// The stream's version at that point.
        actual: u64,
    },
    /// A commit whose `prev_hash` is not the hash of the stream's last accepted commit
    /// (or whose own hash is not a SHA-256 in hex).
    #[error("{stream}: the commit does not chain onto the stream's last accepted commit")]
    BrokenChain {
        /// The stream.
        stream: StreamRef,
    },
    /// A fence no trusted key signed (or one the policy does not let count).
    #[error("fence of {writer:?}: {reason}")]
    UntrustedFence {
        /// The fence's writer.
        writer: Writer,
        /// Why it does not count.
        reason: String,
    },
    /// A fence of rules this build does not know: a newer writer's, most likely, which
    /// readers of this build cannot judge.
    #[error("fence of {writer:?}: it follows rules {rules}, which this build does not know")]
    UnknownRules {
        /// The fence's writer.
        writer: Writer,
        /// Its rules.
        rules: u32,
    },
    /// The mark a writer leaves when it hands the partition over: it takes nothing.
    #[error("handoff by {writer:?}: the writer stopped writing; the mark takes nothing")]
    Handoff {
        /// The writer that handed the partition over.
        writer: Writer,
    },
    /// A commit whose hash does not recompute from its content.
    #[error("{stream}: the commit's hash does not recompute")]
    BadHash {
        /// The stream.
        stream: StreamRef,
    },
    /// A commit not signed with the key of the fence that made its writer the owner.
    #[error("{stream}: {reason}")]
    BadSignature {
        /// The stream.
        stream: StreamRef,
        /// What is wrong with the signature.
        reason: String,
    },
    /// A commit whose events do not number on from `expected_version`, or hold no event.
    #[error("{stream}: the commit's event versions do not follow {expected}")]
    BadEventVersions {
        /// The stream.
        stream: StreamRef,
        /// The commit's expected version.
        expected: u64,
    },
}

/// What the gate keeps of a stream: its version, and the hash of its last accepted
/// commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHead {
    /// The stream's version.
    pub version: u64,
    /// The SHA-256 of its last accepted commit; `None` for a stream restored from a state
    /// saved before the gate kept hashes (its next commit's `prev_hash` is taken on trust).
    pub hash: Option<[u8; 32]>,
}

/// A commit hash, hex as in the record, as bytes; `None` if it is not one.
pub fn hash_bytes(hex_hash: &str) -> Option<[u8; 32]> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut bytes).ok()?;
    Some(bytes)
}

/// True when a record whose `prev_hash` is `prev` links onto the stream whose head is
/// `head`.
fn chains(head: Option<&StreamHead>, prev: Option<&str>) -> bool {
    match (head.map(|h| h.hash), prev) {
        // The stream's first link links to nothing.
        (None, prev) => prev.is_none(),
        // Restored from a state saved without hashes: taken on trust once.
        (Some(None), _) => true,
        (Some(Some(last)), Some(prev)) => hash_bytes(prev) == Some(last),
        (Some(Some(_)), None) => false,
    }
}

/// The version of the gate's rules. A projection's state saved under older rules (a
/// projector generation built before the gate checked what it checks today) is not
/// resumed: the generation is rebuilt from the log.
pub const GATE_RULES: i32 = 3;

/// The gate's state for one partition: its owner and each stream's head, built only from
/// the records read so far, in log order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionGate {
    policy: Arc<TrustedKeys>,
    /// The partition the gate reads, as fences claim it.
    place: FencedPartition,
    owner: Option<Writer>,
    /// The key that signed the owner's fence; `None` under a legacy fence.
    owner_key: Option<String>,
    /// The highest rules of a fence that counted on this partition (0: none, or legacy
    /// fences only): fences of lower rules no longer count.
    rules: u32,
    highest_epoch: u64,
    versions: HashMap<StreamRef, StreamHead>,
    accepted: u64,
    rejected: u64,
}

impl PartitionGate {
    /// A gate of the partition `at` that has read nothing, applying the key policy
    /// `policy`.
    pub fn new(policy: Arc<TrustedKeys>, at: &TopicPartition) -> Self {
        Self {
            policy,
            place: FencedPartition::of(at),
            ..Self::default()
        }
    }

    /// The key policy the gate applies.
    pub fn policy(&self) -> &Arc<TrustedKeys> {
        &self.policy
    }

    /// Applies the gate to the next record of the partition: `Ok` if it counts (and the
    /// state moves on), the reason if it is skipped (and the state stays as it was).
    pub fn admit(&mut self, record: &LogRecord) -> Result<(), Rejection> {
        match record {
            LogRecord::Fence(fence) => self.admit_fence(fence),
            LogRecord::Commit(commit) => self.admit_commit(commit),
            LogRecord::Receipt(receipt) => self.admit_receipt(receipt),
        }
    }

    /// [`PartitionGate::admit`] for a receipt: it counts (or not), and changes nothing else.
    pub fn admit_receipt(&mut self, receipt: &ReceiptRecord) -> Result<(), Rejection> {
        let verdict = self.receipt_verdict(receipt);
        self.count(&verdict);
        if verdict.is_ok() {
            self.versions.insert(
                receipt.stream.clone(),
                StreamHead {
                    version: receipt.version,
                    hash: hash_bytes(&receipt.hash),
                },
            );
        }
        verdict
    }

    /// A receipt counts when the partition's owner wrote it under a fence with rules, at
    /// the stream's version, chained onto the stream's last link, its hash recomputing and
    /// the owner's key having signed it.
    fn receipt_verdict(&self, receipt: &ReceiptRecord) -> Result<(), Rejection> {
        if self.owner.as_ref() != Some(&receipt.writer) {
            return Err(Rejection::NotOwner {
                writer: receipt.writer.clone(),
                owner: self.owner.clone(),
            });
        }
        // No writer of the legacy era wrote receipts: one under a legacy fence is forged.
        let Some(key) = &self.owner_key else {
            return Err(Rejection::BadSignature {
                stream: receipt.stream.clone(),
                reason: "a receipt under a legacy fence, which no writer of that time wrote".into(),
            });
        };
        let head = self.versions.get(&receipt.stream);
        let actual = head.map_or(0, |h| h.version);
        if receipt.version != actual {
            return Err(Rejection::VersionConflict {
                stream: receipt.stream.clone(),
                expected: receipt.version,
                actual,
            });
        }
        if !chains(head, receipt.prev_hash.as_deref()) || hash_bytes(&receipt.hash).is_none() {
            return Err(Rejection::BrokenChain {
                stream: receipt.stream.clone(),
            });
        }
        if !receipt.hash_is_valid() {
            return Err(Rejection::BadHash {
                stream: receipt.stream.clone(),
            });
        }
        let bad = |reason: String| Rejection::BadSignature {
            stream: receipt.stream.clone(),
            reason,
        };
        match self.policy.check(&receipt.hash, receipt.signature.as_ref()) {
            SignatureCheck::Valid
                if receipt.signature.as_ref().is_some_and(|s| &s.key_id == key) =>
            {
                Ok(())
            }
            SignatureCheck::Valid => Err(bad(format!(
                "the receipt is not signed with the owner's key {key}"
            ))),
            other => Err(bad(format!("the receipt's signature: {other:?}"))),
        }
    }

    /// [`PartitionGate::admit`] for a fence.
    pub fn admit_fence(&mut self, fence: &FenceRecord) -> Result<(), Rejection> {
        let verdict = self.fence_verdict(fence);
        self.count(&verdict.as_ref().map(|_| ()).map_err(Clone::clone));
        match verdict {
            Ok(key) => {
                self.highest_epoch = fence.writer.epoch;
                self.owner = Some(fence.writer.clone());
                self.rules = self.rules.max(fence.rules.unwrap_or(0));
                self.owner_key = key;
                Ok(())
            }
            Err(rejection) => Err(rejection),
        }
    }

    /// [`PartitionGate::admit`] for a commit.
    pub fn admit_commit(&mut self, commit: &CommitRecord) -> Result<(), Rejection> {
        self.admit_commit_checked(commit, None)
    }

    /// [`PartitionGate::admit_commit`] with the commit's hash and signature already
    /// checked by [`TrustedKeys::check_commit`] (ahead of the gate, in parallel); `None`
    /// checks them here when the rules ask for it.
    pub fn admit_commit_checked(
        &mut self,
        commit: &CommitRecord,
        check: Option<&CommitCheck>,
    ) -> Result<(), Rejection> {
        let verdict = self.commit_verdict_checked(commit, check);
        self.count(&verdict);
        if verdict.is_ok() {
            self.versions.insert(
                commit.stream.clone(),
                StreamHead {
                    version: commit.next_version(),
                    hash: hash_bytes(&commit.hash),
                },
            );
        }
        verdict
    }

    fn count(&mut self, verdict: &Result<(), Rejection>) {
        match verdict {
            Ok(()) => self.accepted += 1,
            Err(_) => self.rejected += 1,
        }
    }

    /// What [`PartitionGate::admit`] would decide for `record`, without moving on.
    pub fn verdict(&self, record: &LogRecord) -> Result<(), Rejection> {
        match record {
            LogRecord::Fence(fence) => self.fence_verdict(fence).map(|_| ()),
            LogRecord::Commit(commit) => self.commit_verdict(commit),
            LogRecord::Receipt(receipt) => self.receipt_verdict(receipt),
        }
    }

    /// The fence's verdict: the key it makes the owner's (`None` for a legacy fence that
    /// counts), or why it is skipped.
    fn fence_verdict(&self, fence: &FenceRecord) -> Result<Option<String>, Rejection> {
        let writer = &fence.writer;
        if fence.handoff {
            return Err(Rejection::Handoff {
                writer: writer.clone(),
            });
        }
        if self.owner.is_some() && writer.epoch <= self.highest_epoch {
            return Err(Rejection::StaleFence {
                epoch: writer.epoch,
                highest: self.highest_epoch,
            });
        }
        let untrusted = |reason: String| Rejection::UntrustedFence {
            writer: writer.clone(),
            reason,
        };
        match fence.rules {
            Some(FENCE_RULES) if fence.claims.as_ref() != Some(&self.place) => {
                Err(untrusted(match &fence.claims {
                    Some(claims) => format!("it claims {claims}, not {}", self.place),
                    None => "it claims no partition".into(),
                }))
            }
            Some(UNBOUND_FENCE_RULES) if self.rules > UNBOUND_FENCE_RULES => Err(untrusted(
                "a fence that claims no partition, after one that claimed this one".into(),
            )),
            Some(FENCE_RULES | UNBOUND_FENCE_RULES) => {
                let key = self.policy.fence_signer(fence).map_err(untrusted)?;
                // Log order, not a time the signer chose: once a key in service owns the
                // partition, a retired key never takes it again.
                let in_service = |k: &str| !self.policy.is_retired(k);
                if !in_service(&key) && self.owner_key.as_deref().is_some_and(in_service) {
                    return Err(untrusted(format!(
                        "it is signed with key {key}, retired, after a fence of a key in service"
                    )));
                }
                Ok(Some(key))
            }
            Some(rules) => Err(Rejection::UnknownRules {
                writer: writer.clone(),
                rules,
            }),
            None if self.rules > 0 => Err(untrusted(
                "a legacy fence (no rules) after a fence with rules".into(),
            )),
            None => match self.policy.legacy_until() {
                Some(until) if fence.recorded_at <= until => Ok(None),
                _ => Err(untrusted(
                    "a legacy fence (no rules), and no legacy cut-off lets it count".into(),
                )),
            },
        }
    }

    /// What [`PartitionGate::admit_commit`] would decide, without moving on.
    pub fn commit_verdict(&self, commit: &CommitRecord) -> Result<(), Rejection> {
        self.commit_verdict_checked(commit, None)
    }

    /// [`PartitionGate::commit_verdict`] with the commit's hash and signature already
    /// checked (see [`PartitionGate::admit_commit_checked`]).
    pub fn commit_verdict_checked(
        &self,
        commit: &CommitRecord,
        check: Option<&CommitCheck>,
    ) -> Result<(), Rejection> {
        if self.owner.as_ref() != Some(&commit.writer) {
            return Err(Rejection::NotOwner {
                writer: commit.writer.clone(),
                owner: self.owner.clone(),
            });
        }
        let head = self.versions.get(&commit.stream);
        let actual = head.map_or(0, |h| h.version);
        if commit.expected_version != actual {
            return Err(Rejection::VersionConflict {
                stream: commit.stream.clone(),
                expected: commit.expected_version,
                actual,
            });
        }
        if let Some(key) = &self.owner_key {
            self.ruled_commit_verdict(commit, head, key, check)?;
        }
        let numbered = !commit.events.is_empty()
            && commit
                .events
                .iter()
                .zip(commit.expected_version + 1..)
                .all(|(event, version)| event.version == version);
        if !numbered {
            return Err(Rejection::BadEventVersions {
                stream: commit.stream.clone(),
                expected: commit.expected_version,
            });
        }
        Ok(())
    }

    /// The checks of a commit under a fence with rules: it chains, its hash recomputes,
    /// and the fence's key signed it.
    fn ruled_commit_verdict(
        &self,
        commit: &CommitRecord,
        head: Option<&StreamHead>,
        key: &str,
        check: Option<&CommitCheck>,
    ) -> Result<(), Rejection> {
        if !chains(head, commit.prev_hash.as_deref()) || hash_bytes(&commit.hash).is_none() {
            return Err(Rejection::BrokenChain {
                stream: commit.stream.clone(),
            });
        }
        let computed;
        let check = match check {
            Some(check) => check,
            None => {
                computed = self.policy.check_commit(commit);
                &computed
            }
        };
        if !check.hash_ok {
            return Err(Rejection::BadHash {
                stream: commit.stream.clone(),
            });
        }
        match &check.signer {
            Ok(signer) if signer == key => Ok(()),
            Ok(signer) => Err(Rejection::BadSignature {
                stream: commit.stream.clone(),
                reason: format!(
                    "signed with key {signer}, but its writer's fence was signed with key {key}"
                ),
            }),
            Err(reason) => Err(Rejection::BadSignature {
                stream: commit.stream.clone(),
                reason: reason.clone(),
            }),
        }
    }

    /// A gate resumed from a saved state: the owner and highest epoch, every stream's
    /// version, and the counts, as [`PartitionGate::owner`] and the others reported them.
    pub fn restore(
        policy: Arc<TrustedKeys>,
        at: &TopicPartition,
        owner: Option<Writer>,
        highest_epoch: u64,
        heads: impl IntoIterator<Item = (StreamRef, StreamHead)>,
        accepted: u64,
        rejected: u64,
    ) -> Self {
        Self {
            policy,
            place: FencedPartition::of(at),
            owner_key: None,
            rules: 0,
            owner,
            highest_epoch,
            versions: heads.into_iter().collect(),
            accepted,
            rejected,
        }
    }

    /// The same gate with what it knows of the fences restored: the owner's key and the
    /// highest rules of a fence that counted, as [`PartitionGate::owner_key`] and
    /// [`PartitionGate::fence_rules`] reported them.
    #[must_use]
    pub fn with_fences(mut self, owner_key: Option<String>, rules: u32) -> Self {
        self.owner_key = owner_key;
        self.rules = rules;
        self
    }

    /// The partition's owner at this point of the log.
    pub fn owner(&self) -> Option<&Writer> {
        self.owner.as_ref()
    }

    /// The key that signed the owner's fence (`None` under a legacy fence, or no owner).
    pub fn owner_key(&self) -> Option<&str> {
        self.owner_key.as_deref()
    }

    /// The highest rules of a fence that counted on the partition (0 before any fence with
    /// rules counted).
    pub fn fence_rules(&self) -> u32 {
        self.rules
    }

    /// The highest valid fence epoch so far (0 before the first fence).
    pub fn highest_epoch(&self) -> u64 {
        self.highest_epoch
    }

    /// The stream's version at this point of the log (0 if it has no accepted commit).
    pub fn stream_version(&self, stream: &StreamRef) -> u64 {
        self.versions.get(stream).map_or(0, |h| h.version)
    }

    /// The stream's head at this point of the log (`None` if it has no accepted commit).
    pub fn stream_head(&self, stream: &StreamRef) -> Option<StreamHead> {
        self.versions.get(stream).copied()
    }

    /// How many streams have an accepted commit.
    pub fn stream_count(&self) -> usize {
        self.versions.len()
    }

    /// Every stream's version at this point of the log (streams with an accepted commit).
    pub fn stream_versions(&self) -> impl Iterator<Item = (&StreamRef, u64)> {
        self.versions.iter().map(|(s, h)| (s, h.version))
    }

    /// Every stream's head at this point of the log (streams with an accepted commit).
    pub fn stream_heads(&self) -> impl Iterator<Item = (&StreamRef, StreamHead)> {
        self.versions.iter().map(|(s, h)| (s, *h))
    }

    /// Records that counted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted
    }

    /// Records skipped so far.
    pub fn rejected(&self) -> u64 {
        self.rejected
    }
}
