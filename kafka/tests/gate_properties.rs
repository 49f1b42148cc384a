//! Property tests of the partition gate: random interleavings of several writers with
//! stale views and epochs, duplicate deliveries and retries.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{BTreeMap, HashSet};

use keel_kafka::gate::{PartitionGate, Rejection};
use keel_schemas::testing;
use keel_schemas::{LogRecord, StreamRef, Writer};
use proptest::prelude::*;
use serde_json::json;

const WRITERS: usize = 3;
const STREAMS: usize = 4;

#[derive(Clone, Debug)]
enum Action {
    /// The writer reads the log to its end.
    Refresh(usize),
    /// The writer takes the partition with the next epoch of the log as it last read it.
    Fence(usize),
    /// The writer appends a commit of `events` events for a stream, against its view.
    Commit {
        writer: usize,
        stream: usize,
        events: u64,
    },
    /// The broker or a producer retry delivers an earlier record again.
    Duplicate(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => (0..WRITERS).prop_map(Action::Refresh),
        1 => (0..WRITERS).prop_map(Action::Fence),
        6 => (0..WRITERS, 0..STREAMS, 1..3u64)
            .prop_map(|(writer, stream, events)| Action::Commit { writer, stream, events }),
        1 => any::<usize>().prop_map(Action::Duplicate),
    ]
}

fn stream(n: usize) -> StreamRef {
    StreamRef {
        stream_type: "order".into(),
        id: format!("o-{n}"),
    }
}

fn commit(
    writer: &Writer,
    stream: StreamRef,
    expected_version: u64,
    prev_hash: Option<String>,
    events: u64,
) -> LogRecord {
    let commit = (0..events).fold(
        testing::commit(writer, stream, expected_version)
            .command("ShipOrder", "test")
            .prev_hash(prev_hash),
        |commit, _| commit.event("OrderShipped", 1, json!({})),
    );
    LogRecord::Commit(commit.build())
}

/// A writer as the design has it: its view of the log comes only from reading it.
struct SimWriter {
    name: String,
    view: PartitionGate,
    read: usize,
    epoch: Option<u64>,
}

impl SimWriter {
    fn catch_up(&mut self, log: &[LogRecord]) {
        for record in &log[self.read..] {
            let _ = self.view.admit(record);
        }
        self.read = log.len();
    }
}

/// Runs the actions and returns the log they produced.
fn simulate(actions: &[Action]) -> Vec<LogRecord> {
    let mut log: Vec<LogRecord> = Vec::new();
    let mut writers: Vec<SimWriter> = (0..WRITERS)
        .map(|i| SimWriter {
            name: format!("w{i}"),
            view: PartitionGate::new(),
            read: 0,
            epoch: None,
        })
        .collect();
    for action in actions {
        match *action {
            Action::Refresh(w) => writers[w].catch_up(&log),
            Action::Fence(w) => {
                let writer = &mut writers[w];
                let epoch = writer.view.highest_epoch() + 1;
                writer.epoch = Some(epoch);
                log.push(testing::fence(&testing::writer(&writer.name, epoch)));
            }
            Action::Commit {
                writer: w,
                stream: s,
                events,
            } => {
                let writer = &writers[w];
                if let Some(epoch) = writer.epoch {
                    let me = Writer {
                        instance: writer.name.clone(),
                        epoch,
                    };
                    // Decided on its view: the version and the hash it chains onto.
                    let head = writer.view.stream_head(&stream(s));
                    let expected = head.map_or(0, |h| h.version);
                    let prev_hash = head.and_then(|h| h.hash).map(hex::encode);
                    log.push(commit(&me, stream(s), expected, prev_hash, events));
                }
            }
            Action::Duplicate(i) => {
                if !log.is_empty() {
                    let record = log[i % log.len()].clone();
                    log.push(record);
                }
            }
        }
    }
    log
}

/// What one reader accepts: the indices of the records that count.
fn accepted_by_one_reader(log: &[LogRecord]) -> Vec<usize> {
    let mut gate = PartitionGate::new();
    (0..log.len())
        .filter(|&i| gate.admit(&log[i]).is_ok())
        .collect()
}

/// A reader that stops at `cut`, keeps its state, and resumes later.
fn accepted_by_resuming_reader(log: &[LogRecord], cut: usize) -> Vec<usize> {
    let cut = cut % (log.len() + 1);
    let mut gate = PartitionGate::new();
    let mut accepted: Vec<usize> = (0..cut).filter(|&i| gate.admit(&log[i]).is_ok()).collect();
    let mut resumed = gate.clone();
    accepted.extend((cut..log.len()).filter(|&i| resumed.admit(&log[i]).is_ok()));
    accepted
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn the_gate_keeps_streams_single_writer(
        actions in proptest::collection::vec(action(), 1..120),
        cut in any::<usize>(),
    ) {
        let log = simulate(&actions);
        let accepted = accepted_by_one_reader(&log);

        // Every reader gets the same accepted sequence.
        prop_assert_eq!(&accepted_by_resuming_reader(&log, cut), &accepted);

        // No two accepted commits share a stream version, and versions run 1, 2, 3…
        let mut seen = HashSet::new();
        let mut next: BTreeMap<StreamRef, u64> = BTreeMap::new();
        let mut owner: Option<Writer> = None;
        let mut commit_ids = HashSet::new();
        for &i in &accepted {
            match &log[i] {
                LogRecord::Fence(f) => {
                    if let Some(previous) = &owner {
                        prop_assert!(f.writer.epoch > previous.epoch, "epochs only rise");
                    }
                    owner = Some(f.writer.clone());
                }
                LogRecord::Commit(c) => {
                    // Only the owner of the latest accepted fence has commits accepted.
                    prop_assert_eq!(Some(&c.writer), owner.as_ref());
                    // A duplicate delivery of an accepted commit never counts twice.
                    prop_assert!(commit_ids.insert(c.commit_id), "commit accepted twice");
                    let expected = next.entry(c.stream.clone()).or_insert(1);
                    for e in &c.events {
                        prop_assert!(seen.insert((c.stream.clone(), e.version)), "version accepted twice");
                        prop_assert_eq!(e.version, *expected);
                        *expected += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn a_zombie_writer_after_a_newer_fence_is_skipped() {
    let old = Writer {
        instance: "old".into(),
        epoch: 1,
    };
    let new = Writer {
        instance: "new".into(),
        epoch: 2,
    };
    let fence = testing::fence;
    let mut gate = PartitionGate::new();
    assert!(gate.admit(&fence(&old)).is_ok());
    let first = commit(&old, stream(0), 0, None, 1);
    assert!(gate.admit(&first).is_ok());
    let first_hash = Some(hash_of(&first));
    assert!(gate.admit(&fence(&new)).is_ok());
    assert!(
        gate.admit(&commit(&old, stream(0), 1, first_hash.clone(), 1))
            .is_err(),
        "zombie commit"
    );
    assert!(gate.admit(&fence(&old)).is_err(), "stale fence");
    assert!(
        gate.admit(&commit(&new, stream(0), 0, None, 1)).is_err(),
        "version conflict"
    );
    assert!(
        gate.admit(&commit(&new, stream(0), 1, first_hash, 2))
            .is_ok()
    );
    assert_eq!(gate.stream_version(&stream(0)), 3);
    assert_eq!((gate.accepted(), gate.rejected()), (4, 3));
}

fn hash_of(record: &LogRecord) -> String {
    match record {
        LogRecord::Commit(c) => c.hash.clone(),
        LogRecord::Fence(_) => panic!("a fence has no hash"),
    }
}

/// A writer's commit X is persisted late; meanwhile it decided two more commits of the
/// stream on a state without X, the second chained onto the first. X takes the version
/// the first expected, so the first is skipped; the second expects the version X left,
/// and must be skipped too: it was decided on a state that included the first.
#[test]
fn a_commit_chained_onto_a_skipped_one_is_skipped_even_when_its_version_lines_up() {
    let w = Writer {
        instance: "w".into(),
        epoch: 1,
    };
    let mut gate = PartitionGate::new();
    assert!(gate.admit(&testing::fence(&w)).is_ok());
    let base = commit(&w, stream(0), 0, None, 1);
    assert!(gate.admit(&base).is_ok());
    let late = commit(&w, stream(0), 1, Some(hash_of(&base)), 1);
    let restock = commit(&w, stream(0), 1, Some(hash_of(&base)), 1);
    let reserve = commit(&w, stream(0), 2, Some(hash_of(&restock)), 1);
    assert!(gate.admit(&late).is_ok(), "the late commit lands first");
    assert!(
        matches!(gate.admit(&restock), Err(Rejection::VersionConflict { .. })),
        "the restock lost the version to it"
    );
    assert!(
        matches!(gate.admit(&reserve), Err(Rejection::BrokenChain { .. })),
        "the reservation chained onto the skipped restock"
    );
    assert_eq!(gate.stream_version(&stream(0)), 2);
    // A commit that chains onto the late one counts.
    assert!(
        gate.admit(&commit(&w, stream(0), 2, Some(hash_of(&late)), 1))
            .is_ok()
    );
}
