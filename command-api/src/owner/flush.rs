//! The group commit: commands waiting for the partition are decided in arrival order, each
//! against the state as read plus the commits of the same flush ahead of it, appended
//! together, read back, and each acknowledged only if the gate accepted its commit.
//!
//! Two rules keep every answer true of the log:
//! * **A rejected commit fails the rest of its flush.** Every commit after it was decided
//!   on a state that included it: each is answered `503`, and the partition is read again
//!   before anything else is decided.
//! * **An answer that appends nothing is confirmed.** A no-op, a `409` or a `412` is given
//!   only once the owner has read the log past the moment the command arrived (the
//!   read-back of its flush, or a fresh read to the partition's end when the flush appended
//!   nothing) and the stream still was at the version the answer was decided on. Otherwise
//!   the command is decided again, on the state read since. When the command carries an
//!   `Idempotency-Key`, the confirmed answer is then recorded in a receipt, and given once
//!   the receipt is read back: a retry gets the same answer, from this owner or another.

use std::collections::HashMap;

use keel_domain::Aggregate;
use keel_schemas::{CommandMeta, CommitRecord, LogRecord, ReceiptRecord, StreamRef, encode_event};
use tracing::{error, instrument, warn};
use uuid::Uuid;

use super::log::PartitionLog;
use super::outcome::{Answered, CommandRequest, Outcome, OwnerError, Reply, RequestMeta};
use super::receipt::{self, Recorded};
use super::task::{PartitionOwner, ReadBack, Status, Verdicts};

/// How many times a command whose answer could not be confirmed is decided again before it
/// gets a `503`.
const MAX_ROUNDS: usize = 3;

/// A commit of the current flush, waiting for its read-back.
struct Pending {
    record: CommitRecord,
    key: Option<(String, String)>,
    traceparent: Option<String>,
    replies: Vec<Reply>,
    /// Commands of the flush that reuse its key with another request: refused once the
    /// commit that holds the key is confirmed.
    reused: Vec<Reply>,
}

/// An answer that appends nothing, waiting to be confirmed against the log.
struct Provisional<A: Aggregate> {
    request: CommandRequest<A>,
    /// Its stream and idempotency key, if it carries one: its answer is then recorded in
    /// a receipt before it is given.
    key: Option<(String, String)>,
    /// The answer, if it is confirmed; a no-op's outcome is filled in then.
    answer: Result<(), OwnerError>,
    /// The stream version it was decided on.
    decided_on: u64,
    /// Commits of the flush decided before it.
    ahead: usize,
    /// Where the stream got to that version: the commit of this flush that brought it
    /// there, or the offset read.
    at: At,
}

/// Where a stream reached the version an answer was decided on.
#[derive(Clone, Copy)]
enum At {
    /// At the offset read (or nowhere, for a stream with no commit).
    Read(Option<i64>),
    /// At the commit of this flush with this id.
    Commit(Uuid),
}

/// A stream's state for deciding: the state, its version, its last hash, and where it
/// got there.
type Head<A> = (A, u64, Option<String>, At);

impl<A: Aggregate + serde::Serialize + serde::de::DeserializeOwned, L: PartitionLog>
    PartitionOwner<A, L>
where
    A::Command: Send,
{
    /// Decides a batch of commands, appends the commits together, reads them back, and
    /// answers each one.
    #[instrument(skip_all, fields(commands = batch.len()))]
    pub(super) async fn flush(&mut self, batch: Vec<CommandRequest<A>>) {
        let mut batch = batch;
        for round in 1..=MAX_ROUNDS {
            if batch.is_empty() {
                return;
            }
            batch = self.flush_round(batch, round == MAX_ROUNDS).await;
        }
    }

    /// One round of a flush; returns the commands whose answers could not be confirmed,
    /// to be decided again (none in the `last` round: they get a `503`).
    async fn flush_round(
        &mut self,
        batch: Vec<CommandRequest<A>>,
        last: bool,
    ) -> Vec<CommandRequest<A>> {
        if self.status.get() == Status::Recovering
            && let Err(e) = self.recover().await
        {
            warn!(error = %e, "still recovering");
        }
        if self.status.get() != Status::Serving {
            for request in batch {
                let _ = request.reply.send(Err(self.unavailable()));
            }
            return Vec::new();
        }
        let Some(writer) = self.writer.clone() else {
            return Vec::new();
        };

        // Decide each command against the state read plus the commits ahead of it.
        let mut overlay: HashMap<String, Head<A>> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut provisional: Vec<Provisional<A>> = Vec::new();
        // Commands whose key an answer of this flush still has to record: decided again
        // once it is, on the receipt.
        let mut deferred: Vec<CommandRequest<A>> = Vec::new();
        for request in batch {
            // A caller that gave up before this point never sees its command appended.
            if !request.reply.take_on() {
                continue;
            }
            let key = request
                .meta
                .idempotency_key
                .clone()
                .map(|k| (request.stream_id.clone(), k));
            if let Some(key) = &key {
                // A key read from the log is a fact of the log: its answer stands.
                if let Some(answer) = self.keys.answer(key, request.meta.request_digest.as_ref()) {
                    let _ = request.reply.send(answer);
                    continue;
                }
                if let Some(p) = pending.iter_mut().find(|p| p.key.as_ref() == Some(key)) {
                    if p.record.command.request_digest == request.meta.request_digest {
                        p.replies.push(request.reply);
                    } else {
                        p.reused.push(request.reply);
                    }
                    continue;
                }
                if provisional.iter().any(|p| p.key.as_ref() == Some(key)) {
                    deferred.push(request);
                    continue;
                }
            }
            let committed = self.streams.get(&request.stream_id);
            if let Some(reason) = committed.and_then(|s| s.unreadable.as_ref()) {
                let _ = request.reply.send(Err(OwnerError::Unavailable(format!(
                    "stream {} cannot be read by this build: {reason}",
                    request.stream_id
                ))));
                continue;
            }
            let (state, version, last_hash, at) = match overlay.get(&request.stream_id) {
                Some(ahead) => ahead.clone(),
                None => committed.map_or_else(
                    || (A::default(), 0, None, At::Read(None)),
                    |s| {
                        (
                            s.state.clone(),
                            s.version,
                            s.last_hash.clone(),
                            At::Read(s.last_offset),
                        )
                    },
                ),
            };
            let refusal = match request.meta.if_match {
                Some(expected) if expected != version => Some(OwnerError::VersionMismatch {
                    expected,
                    actual: version,
                }),
                _ => None,
            };
            let decided = match refusal {
                Some(refusal) => Err(refusal),
                None => state.decide(&request.command).map_err(OwnerError::from),
            };
            let events = match decided {
                Ok(events) if !events.is_empty() => events,
                other => {
                    provisional.push(Provisional {
                        request,
                        key,
                        answer: other.map(|_| ()),
                        decided_on: version,
                        ahead: pending.len(),
                        at,
                    });
                    continue;
                }
            };
            let meta = &request.meta;
            let ids = &mut self.ids;
            let mut record = CommitRecord::new(
                StreamRef {
                    stream_type: A::TYPE.to_owned(),
                    id: request.stream_id.clone(),
                },
                version,
                events
                    .iter()
                    .zip(version + 1..)
                    .map(|(event, v)| encode_event(event, ids(), v))
                    .collect(),
                command_meta(meta, ids()),
                writer.clone(),
                last_hash,
            );
            record.commit_id = ids();
            let record = record.sealed_and_signed(&self.signing_key);
            let next = events.iter().fold(state, |s, e| s.evolve(e));
            overlay.insert(
                request.stream_id.clone(),
                (
                    next,
                    record.next_version(),
                    Some(record.hash.clone()),
                    At::Commit(record.commit_id),
                ),
            );
            pending.push(Pending {
                record,
                key,
                traceparent: request.meta.traceparent.clone(),
                replies: vec![request.reply],
                reused: Vec::new(),
            });
        }

        // Append, read back, answer the commits; then confirm what appended nothing.
        let appended: Vec<(String, Uuid)> = pending
            .iter()
            .map(|p| (p.record.stream.id.clone(), p.record.commit_id))
            .collect();
        let (current, verdicts) = if pending.is_empty() {
            (self.confirm_current().await, Verdicts::new())
        } else {
            let verdicts = self.append_and_read_back(&pending).await;
            (self.answer_commits(pending, &verdicts), verdicts)
        };
        let mut again = Vec::new();
        let mut to_record = Vec::new();
        for p in provisional {
            let stream = &p.request.stream_id;
            let unmoved = self.streams.get(stream).map_or(0, |s| s.version) == p.decided_on;
            // A keyed answer is recorded at the version it was decided on, so it is
            // confirmed only while the stream is still there; one that a later commit of
            // the flush moved past is decided again.
            let confirmed = current
                && (unmoved
                    || (p.key.is_none() && appended[p.ahead..].iter().any(|(s, _)| s == stream)));
            if confirmed {
                let answer = self.provisional_answer(&p, &verdicts);
                match Recorded::of(&answer) {
                    Some(recorded) if p.key.is_some() => to_record.push((p, recorded)),
                    _ => {
                        let _ = p.request.reply.send(answer);
                    }
                }
            } else if last {
                let _ = p.request.reply.send(Err(OwnerError::Unavailable(
                    "the partition kept changing while the command was decided; retry".into(),
                )));
            } else {
                again.push(p.request);
            }
        }
        if !to_record.is_empty() {
            self.record_receipts(to_record).await;
        }
        for request in deferred {
            if last {
                let _ = request.reply.send(Err(OwnerError::Unavailable(
                    "another request with this Idempotency-Key was being answered; retry".into(),
                )));
            } else {
                again.push(request);
            }
        }
        again
    }

    /// Records the confirmed answers of keyed commands that appended nothing in receipts,
    /// and gives each answer once its receipt is read back as accepted (`503` otherwise:
    /// an answer the log does not hold would not be given again to a retry).
    async fn record_receipts(&mut self, answers: Vec<(Provisional<A>, Recorded)>) {
        let Some(writer) = self.writer.clone() else {
            for (p, _) in answers {
                let _ = p.request.reply.send(Err(self.unavailable()));
            }
            return;
        };
        // Each receipt links onto its stream's last link, and onto the receipt before it
        // of the same stream in this batch.
        let mut links: HashMap<String, Option<String>> = HashMap::new();
        let records: Vec<LogRecord> = answers
            .iter()
            .map(|(p, recorded)| {
                let ids = &mut self.ids;
                let streams = &self.streams;
                let link = links.entry(p.request.stream_id.clone()).or_insert_with(|| {
                    streams
                        .get(&p.request.stream_id)
                        .and_then(|s| s.last_hash.clone())
                });
                let mut receipt = ReceiptRecord::new(
                    StreamRef {
                        stream_type: A::TYPE.to_owned(),
                        id: p.request.stream_id.clone(),
                    },
                    (p.decided_on, link.clone()),
                    command_meta(&p.request.meta, ids()),
                    serde_json::to_value(recorded).unwrap_or_default(),
                    writer.clone(),
                );
                receipt.receipt_id = ids();
                let receipt = receipt.sealed_and_signed(&self.signing_key);
                *link = Some(receipt.hash.clone());
                LogRecord::Receipt(receipt)
            })
            .collect();
        let inputs: Vec<(&str, &LogRecord, Option<&str>)> = answers
            .iter()
            .zip(&records)
            .map(|((p, _), r)| {
                (
                    p.request.stream_id.as_str(),
                    r,
                    p.request.meta.traceparent.as_deref(),
                )
            })
            .collect();
        let verdicts = self.append_records(&inputs).await;
        let lost = self.status.get() == Status::Lost;
        let mut failed = false;
        for ((p, _), record) in answers.into_iter().zip(&records) {
            let LogRecord::Receipt(receipt) = record else {
                continue;
            };
            // What the log now says of the key (its first record holds it), not what this
            // receipt says: a commit of the key read back before it wins.
            let answer = match verdicts.get(&receipt.receipt_id) {
                Some(&ReadBack {
                    accepted: true,
                    offset,
                }) if !lost => p
                    .key
                    .as_ref()
                    .and_then(|key| {
                        self.keys
                            .answer(key, p.request.meta.request_digest.as_ref())
                            .map(|answer| {
                                answer.map(|outcome| Outcome {
                                    replayed: false,
                                    ..outcome
                                })
                            })
                    })
                    // A retention so short the key is gone already: the receipt's own.
                    .or_else(|| receipt::answer_of(receipt, self.position(offset))),
                _ => None,
            };
            let answer = answer.unwrap_or_else(|| {
                failed = true;
                Err(OwnerError::Unavailable(
                    "the answer could not be recorded in the log; retry with the same Idempotency-Key"
                        .into(),
                ))
            });
            let _ = p.request.reply.send(answer);
        }
        if failed && self.status.get() == Status::Serving {
            // Re-read the partition before deciding anything else.
            self.status.set(Status::Recovering);
        }
    }

    /// The answer of a confirmed command that appends nothing.
    fn provisional_answer(&self, p: &Provisional<A>, verdicts: &Verdicts) -> Answered {
        p.answer.clone()?;
        let offset = match p.at {
            At::Read(offset) => offset,
            At::Commit(id) => verdicts.get(&id).map(|v| v.offset),
        };
        Ok(Outcome {
            stream: StreamRef {
                stream_type: A::TYPE.to_owned(),
                id: p.request.stream_id.clone(),
            },
            version: p.decided_on,
            events: Vec::new(),
            position: offset.map(|o| self.position(o)),
            created: false,
            replayed: false,
        })
    }

    /// Answers each commit of the flush from its read-back: acknowledged if the gate
    /// accepted it and every commit ahead of it; `503` from the first one that was not.
    /// True when every commit was accepted, so the state read covers the whole flush.
    fn answer_commits(&mut self, pending: Vec<Pending>, verdicts: &Verdicts) -> bool {
        // An owner that stopped serving while it read back (a fence of rules it cannot
        // judge) acknowledges nothing more.
        let mut failed = self.status.get() == Status::Lost;
        for p in pending {
            let answer = match verdicts.get(&p.record.commit_id) {
                Some(&ReadBack {
                    accepted: true,
                    offset,
                }) if !failed => Ok(self.outcome_of(&p.record, offset)),
                _ if failed && self.status.get() == Status::Lost => Err(OwnerError::Unavailable(
                    "this instance no longer serves the partition; retry with the same Idempotency-Key".into(),
                )),
                _ if failed => Err(OwnerError::Unavailable(
                    "a commit ahead of this one in its flush was not accepted, so it was decided on a state the log does not hold; retry with the same Idempotency-Key".into(),
                )),
                Some(_) => Err(OwnerError::Unavailable(
                    "the log did not accept the commit (the partition changed hands or the stream moved on); retry".into(),
                )),
                None => Err(OwnerError::Unavailable(
                    "the commit could not be confirmed; retry with the same Idempotency-Key".into(),
                )),
            };
            if answer.is_err() && !failed {
                failed = true;
                if self.status.get() == Status::Serving {
                    // Re-read the partition before deciding anything else.
                    self.status.set(Status::Recovering);
                }
            }
            for reply in p.reused {
                let _ = reply.send(match &answer {
                    Ok(_) => Err(OwnerError::IdempotencyKeyReused),
                    Err(e) => Err(e.clone()),
                });
            }
            for (i, reply) in p.replies.into_iter().enumerate() {
                let answer = match &answer {
                    Ok(outcome) => Ok(Outcome {
                        replayed: i > 0,
                        ..outcome.clone()
                    }),
                    Err(e) => Err(e.clone()),
                };
                let _ = reply.send(answer);
            }
        }
        !failed
    }

    /// Reads the partition to its end now: true when that worked and the owner still
    /// serves it, so its state is current as of a moment after every waiting command
    /// arrived.
    async fn confirm_current(&mut self) -> bool {
        match self.catch_up().await {
            Ok(_) => self.status.get() == Status::Serving,
            Err(e) => {
                warn!(error = %e, "reading the partition to its end failed: re-reading before serving again");
                self.status.set(Status::Recovering);
                false
            }
        }
    }

    /// Appends the flush's commits and reads the partition until all of them are read
    /// back; returns the gate's verdict and offset per commit id.
    async fn append_and_read_back(&mut self, pending: &[Pending]) -> Verdicts {
        let records: Vec<LogRecord> = pending
            .iter()
            .map(|p| LogRecord::Commit(p.record.clone()))
            .collect();
        let inputs: Vec<(&str, &LogRecord, Option<&str>)> = pending
            .iter()
            .zip(&records)
            .map(|(p, r)| (p.record.stream.id.as_str(), r, p.traceparent.as_deref()))
            .collect();
        self.append_records(&inputs).await
    }

    /// Appends `inputs` (key, record, traceparent) together and reads the partition until
    /// all of them are read back; returns the gate's verdict and offset per record id.
    async fn append_records(&mut self, inputs: &[(&str, &LogRecord, Option<&str>)]) -> Verdicts {
        let results = self.log.append(inputs).await;
        let last = results
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .max()
            .copied();
        let failed = results.iter().find_map(|r| r.as_ref().err());
        let read = match (failed, last) {
            (None, Some(last)) => self.read_through(last).await,
            (Some(e), _) => {
                error!(error = %e, "appending failed: re-reading the log before serving again");
                self.status.set(Status::Recovering);
                self.recover().await
            }
            (None, None) => Ok(HashMap::new()),
        };
        match read {
            Ok(verdicts) => verdicts,
            Err(e) => {
                error!(error = %e, "reading back failed: re-reading the log before serving again");
                self.status.set(Status::Recovering);
                HashMap::new()
            }
        }
    }
}

/// The command's part of a commit or receipt, with the id `id`.
fn command_meta(meta: &RequestMeta, id: Uuid) -> CommandMeta {
    CommandMeta {
        id,
        command_type: meta.command_type.to_owned(),
        idempotency_key: meta.idempotency_key.clone(),
        actor: meta.actor.clone(),
        correlation_id: meta.correlation_id.clone(),
        causation_id: meta.causation_id.clone(),
        request_digest: meta.request_digest.clone(),
    }
}
