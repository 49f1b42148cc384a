//! The partition gate: the one rule, applied identically by every reader, that decides
//! which records of a partition count.
//!
//! * A **fence** is valid only if its epoch is higher than every epoch before it on the
//!   partition; it makes its writer the partition's owner.
//! * A **commit** is valid only if its writer is the owner at that point of the log, its
//!   `expected_version` equals the stream's version there, its `prev_hash` is the hash of
//!   the stream's last accepted commit (so a commit chained onto one the gate skipped is
//!   skipped too, even when the versions happen to line up), and its events carry the
//!   versions that follow, one by one.
//!
//! Invalid records are skipped by everyone and counted. Since the gate only looks at the
//! log, a zombie writer (an old owner that has not noticed a newer fence) may append, but
//! no reader ever applies its records, and it never reads its own commit back as accepted,
//! so it never acknowledges one.

use std::collections::HashMap;

use keel_schemas::{CommitRecord, FenceRecord, LogRecord, StreamRef, Writer};
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

/// The gate's state for one partition: its owner and each stream's head, built only from
/// the records read so far, in log order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionGate {
    owner: Option<Writer>,
    highest_epoch: u64,
    versions: HashMap<StreamRef, StreamHead>,
    accepted: u64,
    rejected: u64,
}

impl PartitionGate {
    /// A gate that has read nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies the gate to the next record of the partition: `Ok` if it counts (and the
    /// state moves on), the reason if it is skipped (and the state stays as it was).
    pub fn admit(&mut self, record: &LogRecord) -> Result<(), Rejection> {
        match record {
            LogRecord::Fence(fence) => self.admit_fence(fence),
            LogRecord::Commit(commit) => self.admit_commit(commit),
        }
    }

    /// [`PartitionGate::admit`] for a fence.
    pub fn admit_fence(&mut self, fence: &FenceRecord) -> Result<(), Rejection> {
        let verdict = self.fence_verdict(&fence.writer);
        self.count(&verdict);
        if verdict.is_ok() {
            self.highest_epoch = fence.writer.epoch;
            self.owner = Some(fence.writer.clone());
        }
        verdict
    }

    /// [`PartitionGate::admit`] for a commit.
    pub fn admit_commit(&mut self, commit: &CommitRecord) -> Result<(), Rejection> {
        let verdict = self.commit_verdict(commit);
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
            LogRecord::Fence(fence) => self.fence_verdict(&fence.writer),
            LogRecord::Commit(commit) => self.commit_verdict(commit),
        }
    }

    fn fence_verdict(&self, writer: &Writer) -> Result<(), Rejection> {
        if self.owner.is_some() && writer.epoch <= self.highest_epoch {
            return Err(Rejection::StaleFence {
                epoch: writer.epoch,
                highest: self.highest_epoch,
            });
        }
        Ok(())
    }

    /// What [`PartitionGate::admit_commit`] would decide, without moving on.
    pub fn commit_verdict(&self, commit: &CommitRecord) -> Result<(), Rejection> {
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
        let chained = match (head.map(|h| h.hash), commit.prev_hash.as_deref()) {
            // The stream's first commit links to nothing.
            (None, prev) => prev.is_none(),
            // Restored without its hash: taken on trust once.
            (Some(None), _) => true,
            (Some(Some(last)), Some(prev)) => hash_bytes(prev) == Some(last),
            (Some(Some(_)), None) => false,
        };
        if !chained || hash_bytes(&commit.hash).is_none() {
            return Err(Rejection::BrokenChain {
                stream: commit.stream.clone(),
            });
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

    /// A gate resumed from a saved state: the owner and highest epoch, every stream's
    /// version, and the counts, as [`PartitionGate::owner`] and the others reported them.
    pub fn restore(
        owner: Option<Writer>,
        highest_epoch: u64,
        heads: impl IntoIterator<Item = (StreamRef, StreamHead)>,
        accepted: u64,
        rejected: u64,
    ) -> Self {
        Self {
            owner,
            highest_epoch,
            versions: heads.into_iter().collect(),
            accepted,
            rejected,
        }
    }

    /// The partition's owner at this point of the log.
    pub fn owner(&self) -> Option<&Writer> {
        self.owner.as_ref()
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
