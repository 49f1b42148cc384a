//! Property tests of the partition gate: random interleavings of several writers with
//! stale views and epochs, duplicate deliveries and retries.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{BTreeMap, HashSet};

use keel_kafka::gate::{PartitionGate, Rejection};
use std::sync::{Arc, OnceLock};

use keel_schemas::testing;
use keel_schemas::{
    FenceRecord, LogRecord, SigningKey, StreamRef, Timestamp, TopicPartition, TrustedKeys,
    UNBOUND_FENCE_RULES, Writer,
};
use proptest::prelude::*;
use serde_json::json;

const WRITERS: usize = 3;

/// The partition the tests' gates read.
fn here() -> TopicPartition {
    TopicPartition::new("t.order.events", 0)
}
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
    /// The writer records the answer to a keyed command that appended nothing.
    Receipt { writer: usize, stream: usize },
    /// The broker or a producer retry delivers an earlier record again.
    Duplicate(usize),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        2 => (0..WRITERS).prop_map(Action::Refresh),
        1 => (0..WRITERS).prop_map(Action::Fence),
        6 => (0..WRITERS, 0..STREAMS, 1..3u64)
            .prop_map(|(writer, stream, events)| Action::Commit { writer, stream, events }),
        1 => (0..WRITERS, 0..STREAMS)
            .prop_map(|(writer, stream)| Action::Receipt { writer, stream }),
        1 => any::<usize>().prop_map(Action::Duplicate),
    ]
}

/// The deployment's key: every writer of these tests signs with it.
fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(SigningKey::generate)
}

/// The key policy: the deployment's key is trusted.
fn policy() -> Arc<TrustedKeys> {
    let mut trusted = TrustedKeys::default();
    trusted.add(key());
    Arc::new(trusted)
}

fn fence(writer: &Writer) -> LogRecord {
    testing::signed_fence(writer, key(), &here())
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
    LogRecord::Commit(commit.signed(key()))
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
            view: PartitionGate::new(policy(), &here()),
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
                log.push(fence(&testing::writer(&writer.name, epoch)));
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
            Action::Receipt {
                writer: w,
                stream: s,
            } => {
                let writer = &writers[w];
                if let Some(epoch) = writer.epoch {
                    let me = testing::writer(&writer.name, epoch);
                    let head = writer.view.stream_head(&stream(s));
                    let version = head.map_or(0, |h| h.version);
                    let prev_hash = head.and_then(|h| h.hash).map(hex::encode);
                    let command = testing::commit(&me, stream(s), version).build().command;
                    log.push(LogRecord::Receipt(
                        keel_schemas::ReceiptRecord::new(
                            stream(s),
                            (version, prev_hash),
                            command,
                            json!({"answer": "unchanged"}),
                            me,
                        )
                        .sealed_and_signed(key()),
                    ));
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
    let mut gate = PartitionGate::new(policy(), &here());
    (0..log.len())
        .filter(|&i| gate.admit(&log[i]).is_ok())
        .collect()
}

/// A reader that stops at `cut`, keeps its state, and resumes later.
fn accepted_by_resuming_reader(log: &[LogRecord], cut: usize) -> Vec<usize> {
    let cut = cut % (log.len() + 1);
    let mut gate = PartitionGate::new(policy(), &here());
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
                LogRecord::Receipt(r) => {
                    // Only the owner's receipts count; they move no stream (below).
                    prop_assert_eq!(Some(&r.writer), owner.as_ref());
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
    let mut gate = PartitionGate::new(policy(), &here());
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
        LogRecord::Fence(_) | LogRecord::Receipt(_) => panic!("not a commit"),
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
    let mut gate = PartitionGate::new(policy(), &here());
    assert!(gate.admit(&fence(&w)).is_ok());
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

/// Fences count only when a trusted key signed them; commits only when the key of their
/// writer's fence signed them and their hash recomputes; a legacy fence only under the
/// policy's cut-off and never after a fence with rules; a retired key signs no fence that
/// follows a later one.
#[test]
fn only_records_signed_by_trusted_keys_count() {
    let w = testing::writer("w", 1);
    let stranger = SigningKey::generate();
    let mut gate = PartitionGate::new(policy(), &here());
    assert!(matches!(
        gate.admit(&testing::signed_fence(&w, &stranger, &here())),
        Err(Rejection::UntrustedFence { .. })
    ));
    assert!(
        matches!(
            gate.admit(&testing::fence(&w)),
            Err(Rejection::UntrustedFence { .. })
        ),
        "no legacy cut-off: an unsigned legacy fence does not count"
    );
    assert!(gate.admit(&fence(&w)).is_ok());
    // A commit with a wrong hash, one unsigned, one signed by another key.
    let good = testing::commit(&w, stream(0), 0)
        .event("OrderShipped", 1, json!({}))
        .command("ShipOrder", "test");
    let mut tampered = good.clone().signed(key());
    tampered.events[0].payload = json!({"carrier": "forged"});
    assert!(matches!(
        gate.admit(&LogRecord::Commit(tampered)),
        Err(Rejection::BadHash { .. })
    ));
    assert!(matches!(
        gate.admit(&LogRecord::Commit(good.clone().build())),
        Err(Rejection::BadSignature { .. })
    ));
    assert!(matches!(
        gate.admit(&LogRecord::Commit(good.clone().signed(&stranger))),
        Err(Rejection::BadSignature { .. })
    ));
    assert!(gate.admit(&LogRecord::Commit(good.signed(key()))).is_ok());
    // An epoch at the top of the range does not wrap: nothing fences above it.
    let top = testing::writer("w", u64::MAX);
    assert!(gate.admit(&fence(&top)).is_ok());
    assert!(matches!(
        gate.admit(&fence(&testing::writer("x", 0))),
        Err(Rejection::StaleFence { .. })
    ));
}

#[test]
fn a_legacy_log_counts_up_to_its_cut_off_and_not_after_a_fence_with_rules() {
    // The fences' times are set, not read from the clock, so the test decides alike on
    // a fast machine and a loaded one.
    let cut_off = Timestamp::now();
    let legacy_fence_at = |writer: &Writer, at: Timestamp| {
        let LogRecord::Fence(mut fence) = testing::fence(writer) else {
            unreachable!()
        };
        fence.recorded_at = at;
        LogRecord::Fence(fence)
    };
    let mut trusted = TrustedKeys::default();
    trusted.add(key());
    trusted.allow_legacy_until(cut_off);
    let policy = Arc::new(trusted);
    let old = testing::writer("old", 1);
    let mut gate = PartitionGate::new(Arc::clone(&policy), &here());
    assert!(
        gate.admit(&legacy_fence_at(&old, cut_off)).is_ok(),
        "a legacy fence at the cut-off counts"
    );
    // Under it, commits are read by the rules of their time: unsigned, unchained.
    let legacy = testing::commit(&old, stream(0), 0)
        .event("OrderShipped", 1, json!({}))
        .command("ShipOrder", "test")
        .build();
    assert!(gate.admit(&LogRecord::Commit(legacy)).is_ok());
    assert_eq!(gate.owner_key(), None);
    let new = testing::writer("new", 2);
    assert!(gate.admit(&fence(&new)).is_ok());
    assert!(matches!(
        gate.admit(&legacy_fence_at(&testing::writer("old", 3), cut_off)),
        Err(Rejection::UntrustedFence { .. })
    ));
    // A legacy fence recorded after the cut-off never counts.
    let after = Timestamp::from(cut_off.as_datetime() + std::time::Duration::from_millis(1));
    let mut fresh = PartitionGate::new(policy, &here());
    assert!(matches!(
        fresh.admit(&legacy_fence_at(&old, after)),
        Err(Rejection::UntrustedFence { .. })
    ));
}

#[test]
fn a_retired_key_takes_no_partition_back_from_a_key_in_service() {
    let successor = SigningKey::generate();
    let mut trusted = TrustedKeys::default();
    trusted.add(key());
    trusted.add(&successor);
    let first = fence(&testing::writer("a", 1));
    let second = testing::signed_fence(&testing::writer("b", 2), &successor, &here());
    trusted.retire(key().key_id());
    let policy = Arc::new(trusted);
    // The history the retired key signed still counts for a reader that starts over...
    let mut replay = PartitionGate::new(Arc::clone(&policy), &here());
    assert!(replay.admit(&first).is_ok());
    assert!(replay.admit(&second).is_ok());
    // ...but once a key in service owns the partition, a fence the retired key signs does
    // not, whatever time it claims and however high its epoch.
    let LogRecord::Fence(mut backdated) = fence(&testing::writer("a", u64::MAX)) else {
        unreachable!()
    };
    backdated.recorded_at = Timestamp::now();
    let backdated = LogRecord::Fence(backdated.signed(key()));
    assert!(matches!(
        replay.admit(&backdated),
        Err(Rejection::UntrustedFence { .. })
    ));
    assert_eq!(replay.owner_key(), Some(successor.key_id()));
}

/// A receipt counts from the partition's owner only, intact and signed with the owner's
/// key, at the stream's version and chained onto its last link; it moves the stream's
/// chain but not its version, so a receipt that lands after the stream moved on counts for
/// no reader, and a commit chained past a receipt does not count either.
#[test]
fn a_receipt_counts_from_the_owner_at_the_streams_head_and_moves_its_chain() {
    let owner = testing::writer("a", 1);
    let mut gate = PartitionGate::new(policy(), &here());
    assert!(gate.admit(&fence(&owner)).is_ok());
    let first = testing::commit(&owner, stream(0), 0)
        .event("OrderShipped", 1, json!({}))
        .signed(key());
    assert!(gate.admit(&LogRecord::Commit(first.clone())).is_ok());
    let command = first.command.clone();
    let receipt = |writer: &Writer, signer: &SigningKey, version: u64, prev: &str| {
        keel_schemas::ReceiptRecord::new(
            stream(0),
            (version, Some(prev.to_owned())),
            command.clone(),
            json!({"answer": "unchanged"}),
            writer.clone(),
        )
        .sealed_and_signed(signer)
    };
    let mut tampered = receipt(&owner, key(), 1, &first.hash);
    tampered.answer = json!({"answer": "refused"});
    let stranger = SigningKey::generate();
    for (bad, why) in [
        (tampered, "tampered"),
        (
            receipt(&owner, &stranger, 1, &first.hash),
            "a stranger's key",
        ),
        (
            receipt(&testing::writer("z", 0), key(), 1, &first.hash),
            "not the owner",
        ),
        (receipt(&owner, key(), 0, &first.hash), "another version"),
        (receipt(&owner, key(), 1, &"0".repeat(64)), "another chain"),
    ] {
        assert!(gate.admit(&LogRecord::Receipt(bad)).is_err(), "{why}");
    }
    let good = receipt(&owner, key(), 1, &first.hash);
    assert!(gate.admit(&LogRecord::Receipt(good.clone())).is_ok());
    assert_eq!(gate.stream_version(&stream(0)), 1, "no version");
    // A commit decided without the receipt (chained onto the first commit) does not count;
    // one chained onto the receipt does.
    let next = |prev: &str| {
        testing::commit(&owner, stream(0), 1)
            .event("OrderShipped", 1, json!({}))
            .prev_hash(Some(prev.to_owned()))
            .signed(key())
    };
    assert!(matches!(
        gate.admit(&LogRecord::Commit(next(&first.hash))),
        Err(Rejection::BrokenChain { .. })
    ));
    assert!(gate.admit(&LogRecord::Commit(next(&good.hash))).is_ok());
    // A receipt that lands after the stream moved on counts for no reader.
    assert!(matches!(
        gate.admit(&LogRecord::Receipt(receipt(&owner, key(), 1, &good.hash))),
        Err(Rejection::VersionConflict { .. })
    ));
    assert_eq!((gate.accepted(), gate.rejected()), (4, 7));
}

/// A fence claims the partition it was signed for: copied by someone with produce rights
/// onto another partition or another stream type's topic, with a higher epoch, it takes
/// nothing there, and the commits of its writer that follow count for no reader. A signed
/// fence of the rules before claims (none claimed) counts only until a fence that claims
/// the partition has.
#[test]
fn a_signed_fence_claims_only_the_partition_it_names() {
    let owner = testing::writer("q-owner", 3);
    let mut gate = PartitionGate::new(policy(), &here());
    assert!(gate.admit(&fence(&owner)).is_ok());
    let elsewhere = testing::writer("p-owner", 5);
    for copied_from in [
        TopicPartition::new("t.order.events", 1),
        TopicPartition::new("t.product.events", 0),
    ] {
        let copied = testing::signed_fence(&elsewhere, key(), &copied_from);
        assert!(
            matches!(gate.admit(&copied), Err(Rejection::UntrustedFence { .. })),
            "a fence signed for {copied_from} claims nothing here"
        );
    }
    let replayed = testing::commit(&elsewhere, stream(0), 0)
        .event("OrderShipped", 1, json!({}))
        .signed(key());
    assert!(matches!(
        gate.admit(&LogRecord::Commit(replayed)),
        Err(Rejection::NotOwner { .. })
    ));
    assert_eq!(gate.owner(), Some(&owner));
    // A fence of the earlier rules, signed but claiming no partition.
    let unbound = |writer: &Writer| {
        let mut fence = FenceRecord::ruled(writer.clone(), &here());
        fence.rules = Some(UNBOUND_FENCE_RULES);
        fence.claims = None;
        LogRecord::Fence(fence.signed(key()))
    };
    let mut upgraded = PartitionGate::new(policy(), &here());
    assert!(
        upgraded.admit(&unbound(&testing::writer("old", 1))).is_ok(),
        "a log written before fences claimed partitions still reads"
    );
    assert!(upgraded.admit(&fence(&owner)).is_ok());
    assert!(matches!(
        upgraded.admit(&unbound(&testing::writer("old", 9))),
        Err(Rejection::UntrustedFence { .. })
    ));
    assert_eq!(upgraded.owner(), Some(&owner));
}

#[test]
fn a_handoff_mark_takes_nothing_whatever_its_epoch() {
    let old = Writer {
        instance: "old".into(),
        epoch: 1,
    };
    let mut gate = PartitionGate::new(policy(), &here());
    assert!(gate.admit(&fence(&old)).is_ok());
    let first = commit(&old, stream(0), 0, None, 1);
    assert!(gate.admit(&first).is_ok());
    let mark = |writer: &Writer| {
        LogRecord::Fence(FenceRecord::handoff(writer.clone(), &here()).signed(key()))
    };
    // The owner's own mark, and one signed with a higher epoch: neither is a fence.
    let higher = Writer {
        instance: "old".into(),
        epoch: 7,
    };
    for record in [mark(&old), mark(&higher)] {
        assert!(
            matches!(gate.admit(&record), Err(Rejection::Handoff { .. })),
            "a handoff mark is never counted as a fence"
        );
    }
    assert_eq!(gate.owner(), Some(&old));
    assert_eq!(gate.highest_epoch(), 1);
    // The next owner fences above the highest epoch, as after any owner.
    let new = Writer {
        instance: "new".into(),
        epoch: 2,
    };
    assert!(gate.admit(&fence(&new)).is_ok());
    assert!(
        gate.admit(&commit(&new, stream(0), 1, Some(hash_of(&first)), 1))
            .is_ok()
    );
}
