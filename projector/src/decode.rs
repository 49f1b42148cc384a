//! Records as a projection reads them: decoded, with their events upcast, as far as that
//! can be done without the partition's gate state (that part runs beside the previous
//! batch's statements), then put through the gate.

use std::sync::Arc;

use keel_domain::{AggregateFn, ShopAggregate, with_aggregate};
use keel_kafka::{LogEntry, check_records};
use keel_schemas::{
    CommitCheck, CommitRecord, FenceRecord, LogRecord, ReceiptRecord, StreamRef, TrustedKeys,
    decode_event, stream_type_of,
};

use crate::checkpoint::PartitionState;
use crate::projection::{AnyEvent, ProjectedEvent};

/// A record read from the log, decoded as far as it can be without its partition's gate
/// state.
pub(crate) struct Decoded {
    pub(crate) entry: LogEntry,
    parsed: Result<Parsed, String>,
}

enum Parsed {
    Fence(FenceRecord),
    /// The answer to a keyed command that appended nothing: counted by the gate, no
    /// events. Boxed: receipts are rare.
    Receipt(Box<ReceiptRecord>),
    /// A commit with its hash and signature checked, and its events decoded and upcast
    /// (or why they cannot be).
    Commit(
        Arc<CommitRecord>,
        CommitCheck,
        Result<Vec<AnyEvent>, String>,
    ),
}

impl Decoded {
    /// Decodes the records and, for commits, their events, and checks the commits' hashes
    /// and signatures against `policy` (see [`check_records`]): the gate's costly work,
    /// done here, off the apply path.
    pub(crate) fn all(entries: Vec<LogEntry>, policy: &TrustedKeys) -> Vec<Self> {
        check_records(entries, policy)
            .into_iter()
            .map(|(entry, record, check)| {
                let parsed = record
                    .map_err(|e| e.to_string())
                    .map(|record| match record {
                        LogRecord::Fence(fence) => Parsed::Fence(fence),
                        LogRecord::Receipt(receipt) => Parsed::Receipt(Box::new(receipt)),
                        LogRecord::Commit(commit) => {
                            let events = decode_events(&commit);
                            let check = check.unwrap_or_else(|| policy.check_commit(&commit));
                            Parsed::Commit(Arc::new(commit), check, events)
                        }
                    });
                Self { entry, parsed }
            })
            .collect()
    }

    /// Puts the record through its partition's gate: the events it contributes, or why it
    /// cannot be read. A record the gate skips contributes nothing and is no error.
    pub(crate) fn admit(&self, state: &mut PartitionState) -> Result<Vec<ProjectedEvent>, String> {
        let (commit, check, events) = match &self.parsed {
            Err(e) => return Err(e.clone()),
            Ok(Parsed::Fence(fence)) => {
                let _ = state.gate.admit_fence(fence);
                return Ok(Vec::new());
            }
            Ok(Parsed::Receipt(receipt)) => {
                // An accepted receipt moves its stream's chain: the head is saved.
                if state.gate.admit_receipt(receipt).is_ok() {
                    state.touched_streams.insert(receipt.stream.clone());
                }
                return Ok(Vec::new());
            }
            Ok(Parsed::Commit(commit, check, events)) => (commit, Some(check), events),
        };
        if state.gate.commit_verdict_checked(commit, check).is_err() {
            let _ = state.gate.admit_commit_checked(commit, check);
            return Ok(Vec::new());
        }
        let events = events.as_ref().map_err(Clone::clone)?;
        let _ = state.gate.admit_commit_checked(commit, check);
        state.touched_streams.insert(commit.stream.clone());
        Ok(self.projected(commit, events))
    }

    /// The stream the record belongs to: its commit's or receipt's, or, for a record that
    /// cannot be read as one, the stream its key names on its topic. A fence has none.
    pub(crate) fn stream(&self) -> Option<StreamRef> {
        match &self.parsed {
            Ok(Parsed::Commit(commit, _, _)) => Some(commit.stream.clone()),
            Ok(Parsed::Receipt(receipt)) => Some(receipt.stream.clone()),
            Ok(Parsed::Fence(_)) => None,
            Err(_) => {
                let stream_type = stream_type_of(&self.entry.topic)?;
                let id = std::str::from_utf8(self.entry.key.as_deref()?).ok()?;
                (!id.is_empty()).then(|| StreamRef {
                    stream_type: stream_type.to_owned(),
                    id: id.to_owned(),
                })
            }
        }
    }

    /// Whether the record could be read as a record (the gate takes only those).
    pub(crate) fn is_record(&self) -> bool {
        self.parsed.is_ok()
    }

    /// The events of a record the gate took when it was read, for a retry of its parked
    /// stream: the gate has moved on and is not asked again.
    pub(crate) fn events_taken(&self) -> Result<Vec<ProjectedEvent>, String> {
        match &self.parsed {
            Err(e) => Err(e.clone()),
            Ok(Parsed::Fence(_) | Parsed::Receipt(_)) => Ok(Vec::new()),
            Ok(Parsed::Commit(commit, _, events)) => {
                let events = events.as_ref().map_err(Clone::clone)?;
                Ok(self.projected(commit, events))
            }
        }
    }

    fn projected(&self, commit: &Arc<CommitRecord>, events: &[AnyEvent]) -> Vec<ProjectedEvent> {
        let entry = &self.entry;
        events
            .iter()
            .enumerate()
            .map(|(index, event)| ProjectedEvent {
                topic: entry.topic.clone(),
                partition: entry.partition,
                offset: entry.offset,
                index,
                commit: Arc::clone(commit),
                event: event.clone(),
            })
            .collect()
    }

    /// Moves past a dead-lettered record: the gate takes it as every other reader does.
    pub(crate) fn pass_over(&self, state: &mut PartitionState) {
        match &self.parsed {
            Ok(Parsed::Fence(fence)) => {
                let _ = state.gate.admit_fence(fence);
            }
            Ok(Parsed::Receipt(receipt)) => {
                if state.gate.admit_receipt(receipt).is_ok() {
                    state.touched_streams.insert(receipt.stream.clone());
                }
            }
            Ok(Parsed::Commit(commit, check, _)) => {
                if state.gate.admit_commit_checked(commit, Some(check)).is_ok() {
                    state.touched_streams.insert(commit.stream.clone());
                }
            }
            Err(_) => {}
        }
        state.next_offset = self.entry.offset + 1;
    }
}

fn decode_events(commit: &CommitRecord) -> Result<Vec<AnyEvent>, String> {
    struct Decode<'a>(&'a CommitRecord);
    impl AggregateFn for Decode<'_> {
        type Output = Result<Vec<AnyEvent>, String>;
        fn call<A: ShopAggregate>(self) -> Self::Output {
            let commit = self.0;
            commit
                .events
                .iter()
                .enumerate()
                .map(|(index, envelope)| {
                    decode_event::<A>(envelope).map(Into::into).map_err(|e| {
                        format!(
                            "event {} of {} (version {}): {e}",
                            index, commit.stream, envelope.version
                        )
                    })
                })
                .collect()
        }
    }
    let stream_type = commit.stream.stream_type.as_str();
    match with_aggregate(stream_type, Decode(commit)) {
        Some(decoded) => decoded,
        None if commit.events.is_empty() => Ok(Vec::new()),
        None => Err(format!("unknown stream type {stream_type:?}")),
    }
}
