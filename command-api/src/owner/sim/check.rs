//! The judge of a run: the whole simulated log folded through the gate, as every reader
//! folds it, and every answer the clients got checked against it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use keel_domain::Aggregate;
use keel_domain::product::{Product, ProductCommand};
use keel_kafka::{LogEntry, PartitionGate};
use keel_schemas::{
    CommitRecord, LogRecord, SignatureCheck, TrustedKeys, Writer, decode_event, encode_event,
};
use uuid::Uuid;

use crate::owner::receipt::Recorded;
use crate::owner::{Outcome, OwnerError};

/// One stream as the log holds it.
#[derive(Default)]
pub(crate) struct StreamFold {
    pub(crate) state: Product,
    pub(crate) version: u64,
    pub(crate) last_hash: Option<String>,
    /// The stream's state after each accepted commit: (log length then, state, version).
    history: Vec<(usize, Product, u64)>,
}

impl StreamFold {
    /// The states the stream was in while the log grew from `from` to `to` records.
    fn states_between(&self, from: usize, to: usize) -> Vec<(Product, u64)> {
        let before = self
            .history
            .iter()
            .rev()
            .find(|(len, _, _)| *len <= from)
            .map_or_else(|| (Product::default(), 0), |(_, s, v)| (s.clone(), *v));
        std::iter::once(before)
            .chain(
                self.history
                    .iter()
                    .filter(|(len, _, _)| *len > from && *len <= to)
                    .map(|(_, s, v)| (s.clone(), *v)),
            )
            .collect()
    }
}

/// A commit the gate accepted, where, and the state of its stream before it.
pub(crate) struct Accepted {
    pub(crate) offset: i64,
    pub(crate) commit: CommitRecord,
    pub(crate) before: Product,
}

/// The first accepted record of a key: where, and for a receipt, the attempt it was
/// written for (its correlation id), the version and the answer it recorded.
#[derive(Clone, Debug)]
pub(crate) struct FirstOfKey {
    pub(crate) offset: i64,
    pub(crate) receipt: Option<(String, u64, serde_json::Value)>,
}

/// The log folded through the gate.
#[derive(Default)]
pub(crate) struct Fold {
    pub(crate) gate: PartitionGate,
    pub(crate) streams: BTreeMap<String, StreamFold>,
    /// Accepted commits, in log order.
    pub(crate) accepted: Vec<Accepted>,
    /// Every commit (accepted or not) by correlation id: its offsets.
    pub(crate) appended: BTreeMap<String, Vec<i64>>,
    /// What the fold found wrong with the log itself.
    pub(crate) violations: Vec<String>,
    /// The first accepted record of each key (by stream and key), which holds it.
    pub(crate) first_of_key: BTreeMap<(String, String), FirstOfKey>,
    /// Keys held by an accepted receipt (those of accepted commits are in `accepted`).
    pub(crate) receipt_keys: BTreeSet<(String, String)>,
}

impl Fold {
    /// Folds `entries` through a gate applying `policy`; when `judge`, also checks, on its
    /// own, that every record that counts is intact and signed by a trusted key.
    pub(crate) fn of(entries: &[LogEntry], policy: &Arc<TrustedKeys>, judge: bool) -> Self {
        let trusted = judge.then_some(policy.as_ref());
        let mut fold = Fold {
            gate: PartitionGate::new(Arc::clone(policy), &super::world::sim_partition()),
            ..Fold::default()
        };
        for entry in entries {
            let offset = entry.offset;
            let read = fold.gate.read(entry.clone());
            let Ok((record, verdict)) = read.record else {
                fold.violations
                    .push(format!("offset {offset}: not a Keel record"));
                continue;
            };
            if let LogRecord::Commit(c) = &record {
                fold.appended
                    .entry(c.command.correlation_id.clone())
                    .or_default()
                    .push(offset);
            }
            if verdict.is_err() {
                continue;
            }
            match record {
                LogRecord::Fence(fence) => {
                    if let Some(trusted) = trusted
                        && trusted.check(&fence.digest(), fence.signature.as_ref())
                            != SignatureCheck::Valid
                    {
                        fold.violations.push(format!(
                            "offset {offset}: the gate made {:?} the owner with a fence no trusted key signed",
                            fence.writer
                        ));
                    }
                }
                LogRecord::Commit(commit) => {
                    if let Some(key) = &commit.command.idempotency_key {
                        let key = (commit.stream.id.clone(), key.clone());
                        fold.first_of_key.entry(key).or_insert(FirstOfKey {
                            offset,
                            receipt: None,
                        });
                    }
                    fold.accept(offset, commit, trusted);
                }
                LogRecord::Receipt(receipt) => {
                    if let Some(trusted) = trusted
                        && (!receipt.hash_is_valid()
                            || trusted.check(&receipt.hash, receipt.signature.as_ref())
                                != SignatureCheck::Valid)
                    {
                        fold.violations.push(format!(
                            "offset {offset}: an accepted receipt is not intact and signed by a trusted key"
                        ));
                    }
                    let stream = fold.streams.entry(receipt.stream.id.clone()).or_default();
                    if trusted.is_some()
                        && (receipt.prev_hash != stream.last_hash
                            || receipt.version != stream.version)
                    {
                        fold.violations.push(format!(
                            "offset {offset}: an accepted receipt of {} is not at the stream's version and last link",
                            receipt.stream.id
                        ));
                    }
                    stream.last_hash = Some(receipt.hash.clone());
                    if let Some(key) = receipt.command.idempotency_key {
                        let key = (receipt.stream.id, key);
                        fold.receipt_keys.insert(key.clone());
                        fold.first_of_key.entry(key).or_insert(FirstOfKey {
                            offset,
                            receipt: Some((
                                receipt.command.correlation_id,
                                receipt.version,
                                receipt.answer,
                            )),
                        });
                    }
                }
            }
        }
        fold
    }

    fn accept(&mut self, offset: i64, commit: CommitRecord, trusted: Option<&TrustedKeys>) {
        let stream = self.streams.entry(commit.stream.id.clone()).or_default();
        if let Some(trusted) = trusted {
            if commit.prev_hash != stream.last_hash {
                self.violations.push(format!(
                    "offset {offset}: an accepted commit of {} does not chain onto the stream's last link",
                    commit.stream.id
                ));
            }
            if !commit.hash_is_valid() {
                self.violations.push(format!(
                    "offset {offset}: an accepted commit's hash does not recompute"
                ));
            }
            if trusted.check(&commit.hash, commit.signature.as_ref()) != SignatureCheck::Valid {
                self.violations.push(format!(
                    "offset {offset}: an accepted commit is not signed by a trusted key"
                ));
            }
        }
        let before = stream.state.clone();
        for envelope in &commit.events {
            match decode_event::<Product>(envelope) {
                Ok(event) => stream.state = std::mem::take(&mut stream.state).evolve(&event),
                Err(e) => self
                    .violations
                    .push(format!("offset {offset}: an event does not decode: {e}")),
            }
        }
        stream.version = commit.next_version();
        stream.last_hash = Some(commit.hash.clone());
        stream
            .history
            .push((offset as usize + 1, stream.state.clone(), stream.version));
        self.accepted.push(Accepted {
            offset,
            commit,
            before,
        });
    }

    fn accepted_with_event(&self, event_id: Uuid) -> Option<&Accepted> {
        self.accepted
            .iter()
            .find(|a| a.commit.events.iter().any(|e| e.event_id == event_id))
    }
}

/// How one attempt of a command ended.
#[derive(Clone, Debug)]
pub(crate) enum Ending {
    /// The owner answered.
    Answered(Result<Outcome, OwnerError>),
    /// The client stopped waiting when the log held this many records.
    GaveUp(usize),
    /// The owner went away without answering.
    Dropped,
}

/// One attempt of a client's command.
#[derive(Clone, Debug)]
pub(crate) struct Attempt {
    /// Client, command, attempt: also the command's correlation id.
    pub(crate) id: String,
    pub(crate) stream: String,
    pub(crate) command: ProductCommand,
    pub(crate) key: Option<String>,
    pub(crate) if_match: Option<u64>,
    /// The simulated process it was sent to.
    pub(crate) owner: usize,
    /// Records in the log when it was sent, and when it ended.
    pub(crate) sent: usize,
    pub(crate) ended: usize,
    pub(crate) ending: Ending,
}

/// Checks every attempt against the log; the violations found.
pub(crate) fn check(fold: &Fold, attempts: &[Attempt], unfinished: usize) -> Vec<String> {
    let mut violations = fold.violations.clone();
    // Exactly once: no key is applied twice.
    let mut by_key: BTreeMap<(&str, &str), Vec<i64>> = BTreeMap::new();
    for a in &fold.accepted {
        if let Some(key) = &a.commit.command.idempotency_key {
            by_key
                .entry((a.commit.stream.id.as_str(), key.as_str()))
                .or_default()
                .push(a.offset);
        }
    }
    for ((stream, key), offsets) in &by_key {
        if offsets.len() > 1 {
            violations.push(format!(
                "{stream} key {key}: applied {} times, at offsets {offsets:?}",
                offsets.len()
            ));
        }
    }
    // No key is held by a commit and a receipt both: its command was applied and
    // answered as not applied.
    for key in &fold.receipt_keys {
        if by_key.contains_key(&(key.0.as_str(), key.1.as_str())) {
            violations.push(format!(
                "{} key {}: held by an accepted commit and an accepted receipt",
                key.0, key.1
            ));
        }
    }
    // No two processes acknowledged as one writer.
    let mut served: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let windows: BTreeMap<&str, (usize, usize)> = attempts
        .iter()
        .map(|a| (a.id.as_str(), (a.sent, a.ended)))
        .collect();
    for attempt in attempts {
        if let Err(v) = check_attempt(fold, &windows, attempt, &mut served) {
            violations.push(format!("attempt {} on {}: {v}", attempt.id, attempt.stream));
        }
    }
    for (writer, owners) in served {
        if owners.len() > 1 {
            violations.push(format!(
                "processes {owners:?} both acknowledged commits as the one writer {writer}"
            ));
        }
    }
    if unfinished > 0 {
        violations.push(format!(
            "{unfinished} command(s) never got an answer once the faults stopped"
        ));
    }
    violations
}

fn writer_name(w: &Writer) -> String {
    format!("{}#{}", w.instance, w.epoch)
}

fn check_attempt(
    fold: &Fold,
    windows: &BTreeMap<&str, (usize, usize)>,
    a: &Attempt,
    served: &mut BTreeMap<String, Vec<usize>>,
) -> Result<(), String> {
    let stream = fold.streams.get(&a.stream);
    let at = |from: usize, to: usize| {
        stream.map_or_else(
            || vec![(Product::default(), 0)],
            |s| s.states_between(from, to),
        )
    };
    // An answer that appended nothing must be true of the states the stream went through
    // while the request waited; or, when its key was already held by a record in the log
    // when it was answered, be that record's: a commit's answer is its outcome (not
    // this), a receipt's is the answer it recorded, true while the attempt it was written
    // for waited.
    let first = a
        .key
        .as_ref()
        .and_then(|k| fold.first_of_key.get(&(a.stream.clone(), k.clone())))
        .filter(|first| (first.offset as usize) < a.ended);
    let states = || -> Result<Vec<(Product, u64)>, String> {
        let Some(first) = first else {
            return Ok(at(a.sent, a.ended));
        };
        let Some((attempt, version, recorded)) = &first.receipt else {
            return Err(format!(
                "its key was held by the commit at {}, but it was answered {:?}",
                first.offset, a.ending
            ));
        };
        let given = match &a.ending {
            Ending::Answered(answer) => Recorded::of(answer)
                .and_then(|r| serde_json::to_value(r).ok())
                .filter(|_| match answer {
                    Ok(outcome) => outcome.version == *version,
                    Err(_) => true,
                }),
            _ => None,
        };
        if given.as_ref() != Some(recorded) {
            return Err(format!(
                "its key was held by the receipt at {}, which recorded {recorded} at version {version}, but it was answered {:?}",
                first.offset, a.ending
            ));
        }
        let (sent, ended) = windows
            .get(attempt.as_str())
            .copied()
            .ok_or_else(|| format!("the receipt at {} names no attempt", first.offset))?;
        Ok(at(sent, ended))
    };
    match &a.ending {
        Ending::GaveUp(at) => {
            if let Some(offsets) = fold.appended.get(&a.id)
                && let Some(late) = offsets.iter().find(|o| **o as usize >= *at)
            {
                return Err(format!(
                    "the client gave up with {at} records in the log, and its commit was appended after, at {late}"
                ));
            }
            Ok(())
        }
        Ending::Dropped | Ending::Answered(Err(OwnerError::Unavailable(_))) => Ok(()),
        Ending::Answered(Ok(outcome)) if !outcome.events.is_empty() => {
            let accepted = fold
                .accepted_with_event(outcome.events[0].event_id)
                .ok_or("acknowledged, but no accepted commit holds its events")?;
            let commit = &accepted.commit;
            if commit.command.idempotency_key != a.key {
                return Err(format!(
                    "acknowledged with the commit at {} of another command",
                    accepted.offset
                ));
            }
            if commit.next_version() != outcome.version
                || commit.events.len() != outcome.events.len()
            {
                return Err("the answer does not match the accepted commit".into());
            }
            if let Some(v) = a.if_match
                && commit.expected_version != v
            {
                return Err(format!(
                    "If-Match {v}, but the commit followed version {}",
                    commit.expected_version
                ));
            }
            let decided = accepted.before.decide(&a.command);
            let same = decided.as_ref().is_ok_and(|events| {
                events.len() == commit.events.len()
                    && events.iter().zip(&commit.events).all(|(e, c)| {
                        let e = encode_event(e, c.event_id, c.version);
                        e.event_type == c.event_type && e.payload == c.payload
                    })
            });
            if !same {
                return Err(format!(
                    "acknowledged the commit at {}, but on the log's state before it the command decides {decided:?}",
                    accepted.offset
                ));
            }
            if !outcome.replayed {
                let owners = served.entry(writer_name(&commit.writer)).or_default();
                if !owners.contains(&a.owner) {
                    owners.push(a.owner);
                }
            }
            Ok(())
        }
        Ending::Answered(Ok(outcome)) => {
            let true_somewhere = states()?.into_iter().any(|(state, version)| {
                version == outcome.version
                    && a.if_match.is_none_or(|v| v == version)
                    && state.decide(&a.command).is_ok_and(|e| e.is_empty())
            });
            if true_somewhere {
                Ok(())
            } else {
                Err(format!(
                    "answered 'no change at version {}', which the log never showed while the request waited",
                    outcome.version
                ))
            }
        }
        Ending::Answered(Err(OwnerError::VersionMismatch { expected, actual })) => {
            let true_somewhere = states()?
                .into_iter()
                .any(|(_, version)| version == *actual && version != *expected);
            if true_somewhere {
                Ok(())
            } else {
                Err(format!(
                    "answered 412 (at {actual}, not {expected}), which the log never showed while the request waited"
                ))
            }
        }
        Ending::Answered(Err(OwnerError::Domain(e))) => {
            let true_somewhere = states()?.into_iter().any(|(state, version)| {
                a.if_match.is_none_or(|v| v == version)
                    && state.decide(&a.command).as_ref().err() == Some(e)
            });
            if true_somewhere {
                Ok(())
            } else {
                Err(format!(
                    "answered 409 ({e}), which the log never showed while the request waited"
                ))
            }
        }
        Ending::Answered(Err(e)) => Err(format!("unexpected answer {e:?}")),
    }
}
