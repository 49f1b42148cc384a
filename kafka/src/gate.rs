//! The partition gate: the one rule, applied identically by every reader, that decides
//! which records of a partition count.
//!
//! * A **fence** is valid only if its epoch is higher than every epoch before it on the
//!   partition; it makes its writer the partition's owner.
//! * A **commit** is valid only if its writer is the owner at that point of the log, its
//!   `expected_version` equals the stream's version there, and its events carry the
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
    /// A commit whose events do not number on from `expected_version`, or hold no event.
    #[error("{stream}: the commit's event versions do not follow {expected}")]
    BadEventVersions {
        /// The stream.
        stream: StreamRef,
        /// The commit's expected version.
        expected: u64,
    },
}

/// The gate's state for one partition: its owner and each stream's version, built only
/// from the records read so far, in log order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionGate {
    owner: Option<Writer>,
    highest_epoch: u64,
    versions: HashMap<StreamRef, u64>,
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
            self.versions
                .insert(commit.stream.clone(), commit.next_version());
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
        let actual = self.stream_version(&commit.stream);
        if commit.expected_version != actual {
            return Err(Rejection::VersionConflict {
                stream: commit.stream.clone(),
                expected: commit.expected_version,
                actual,
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
        versions: impl IntoIterator<Item = (StreamRef, u64)>,
        accepted: u64,
        rejected: u64,
    ) -> Self {
        Self {
            owner,
            highest_epoch,
            versions: versions.into_iter().collect(),
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
        self.versions.get(stream).copied().unwrap_or(0)
    }

    /// How many streams have an accepted commit.
    pub fn stream_count(&self) -> usize {
        self.versions.len()
    }

    /// Every stream's version at this point of the log (streams with an accepted commit).
    pub fn stream_versions(&self) -> impl Iterator<Item = (&StreamRef, u64)> {
        self.versions.iter().map(|(s, v)| (s, *v))
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
