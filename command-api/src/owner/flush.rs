//! The group commit: commands waiting for the partition are decided in arrival order, each
//! against the state as read plus the commits decided ahead of it, appended together (a
//! flight), read back, and each acknowledged only if the gate accepted its commit.
//!
//! Flushes are pipelined: while a flight is being acknowledged and read back, the commands
//! queued behind it are decided against the state including it, and appended as the next
//! flight (one flight in the air at a time; the producer keeps their order).
//!
//! Two rules keep every answer true of the log:
//! * **A rejected commit fails everything decided after it.** Every later commit of its
//!   flight, and every commit of the flight behind it, was decided on a state that
//!   included it: each is answered `503` (it may be in the log: a retry with its
//!   `Idempotency-Key` learns its fate), what appended nothing is decided again, and the
//!   partition is read again before anything else is decided.
//! * **An answer that appends nothing is confirmed.** A no-op, a `409` or a `412` is given
//!   only once the owner has read the log past the moment the command arrived (the
//!   read-back of its flight, or a fresh read to the partition's end when the flight
//!   appended nothing) and the stream still was at the version the answer was decided on.
//!   Otherwise the command is decided again, on the state read since. When the command
//!   carries an `Idempotency-Key`, the confirmed answer is then recorded in a receipt, and
//!   given once the receipt is read back: a retry gets the same answer, from this owner or
//!   another. A command whose key the flight ahead holds waits for that flight's answer.

use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use keel_domain::Aggregate;
use keel_kafka::KafkaError;
use keel_schemas::{
    CommandMeta, CommitRecord, LogRecord, ReceiptRecord, StreamRef, Writer, encode_event,
};
use tokio::sync::mpsc;
use tracing::{error, instrument, warn};
use uuid::Uuid;

use super::log::{Append, PartitionLog};
use super::outcome::{Answered, CommandRequest, Outcome, OwnerError, Reply, RequestMeta, Timeline};
use super::receipt::{self, Recorded};
use crate::metrics::{CommandMetrics, Phase};

use super::task::{MAX_FLUSH, PartitionOwner, ReadBack, Status, Verdicts};

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

/// A flush decided and handed to the producer, waiting to be read back and answered.
struct Flight<A: Aggregate> {
    pending: Vec<Pending>,
    provisional: Vec<Provisional<A>>,
    /// Commands whose key an answer still has to record: decided again once it is.
    deferred: Vec<CommandRequest<A>>,
    /// The heads of the streams this flight's commits moved: with the state read once the
    /// flight ahead of it has landed, what the next flight is decided on.
    overlay: HashMap<String, Head<A>>,
    /// The appends' offsets, once acknowledged.
    appended: Option<BoxFuture<'static, Vec<Result<i64, KafkaError>>>>,
    /// Decided on a flight that was not wholly accepted: none of its commits is
    /// acknowledged, and what appended nothing is decided again.
    doomed: bool,
    /// The last round for its commands: what cannot be confirmed gets a `503`.
    last: bool,
    /// When its commits were handed to the producer, if it has any.
    appending: Option<Instant>,
    /// When it ran through each phase, for the traces of its commands.
    timeline: Timeline,
}

impl<A: Aggregate> Flight<A> {
    /// Waits until the flight's commits are acknowledged (or failed): what appending each
    /// told; `None` when it appended nothing.
    async fn acknowledged(
        &mut self,
        metrics: &CommandMetrics,
    ) -> Option<Vec<Result<i64, KafkaError>>> {
        let acks = self.appended.take()?.await;
        if let Some(appending) = self.appending {
            metrics.phase(Phase::Append, appending.elapsed().as_secs_f64());
        }
        if let Some((from, _)) = self.timeline.append {
            self.timeline.append = Some((from, SystemTime::now()));
        }
        Some(acks)
    }

    /// True when a command of this flight holds `key`, whose answer is not known yet.
    fn holds(&self, key: &(String, String)) -> bool {
        self.pending.iter().any(|p| p.key.as_ref() == Some(key))
            || self.provisional.iter().any(|p| p.key.as_ref() == Some(key))
    }

    /// True when this flight may still record a receipt on `stream` (a keyed answer that
    /// appended nothing): the receipt links onto the stream, so nothing else is decided on
    /// it until the flight has landed.
    fn may_record_on(&self, stream: &str) -> bool {
        self.provisional
            .iter()
            .any(|p| p.key.is_some() && p.request.stream_id == stream)
    }
}

impl<A: Aggregate + serde::Serialize + serde::de::DeserializeOwned, L: PartitionLog>
    PartitionOwner<A, L>
where
    A::Command: Send,
{
    /// Decides a batch of commands, appends the commits together, reads them back, and
    /// answers each one; meanwhile, the commands queued behind it in `requests` are
    /// decided (against the state including the flight ahead) and appended as the next
    /// flight, up to the owner's pipeline length in a row (then it looks at its other work: a
    /// stop, the log between commands). A flight whose read-back is not wholly
    /// accepted dooms the one behind it: its commits get `503` and the partition is read
    /// again before anything else is decided.
    #[instrument(skip_all, fields(commands = batch.len()))]
    pub(super) async fn flush(
        &mut self,
        batch: Vec<CommandRequest<A>>,
        requests: &mut mpsc::Receiver<CommandRequest<A>>,
    ) {
        self.reads = Some(Verdicts::new());
        let mut again = Vec::new();
        let mut flight = self.launch(batch, None, MAX_ROUNDS == 1).await;
        let mut flights = 1;
        while let Some(mut ahead) = flight.take() {
            // Once the flight is in the log, the commands queued meanwhile are decided on
            // it and appended while it is read back.
            let acks = ahead.acknowledged(&self.metrics).await;
            // Only on a flight wholly in the log: one that could not be appended dooms
            // whatever would be decided on it.
            let appended = acks
                .as_ref()
                .is_none_or(|acks| acks.iter().all(Result::is_ok));
            let next = if flights < self.flights
                && !ahead.doomed
                && appended
                && self.status.get() == Status::Serving
            {
                let queued = take_queued(requests);
                if queued.is_empty() {
                    None
                } else {
                    flights += 1;
                    let next = self.launch(queued, Some(&mut ahead), MAX_ROUNDS == 1).await;
                    if next.is_some() {
                        self.status.count_pipelined();
                    }
                    next
                }
            } else {
                None
            };
            let accepted = self.land(ahead, acks, &mut again).await;
            flight = next.map(|mut next| {
                if !accepted {
                    next.doomed = true;
                    self.status.count_doomed();
                }
                next
            });
        }
        // What could not be confirmed is decided again, one flight at a time.
        for round in 2..=MAX_ROUNDS {
            if again.is_empty() {
                break;
            }
            let batch = std::mem::take(&mut again);
            if let Some(mut flight) = self.launch(batch, None, round == MAX_ROUNDS).await {
                let acks = flight.acknowledged(&self.metrics).await;
                self.land(flight, acks, &mut again).await;
            }
        }
        self.reads = None;
    }

    /// Decides `batch` against the state read plus the commits of the flight `ahead` (if
    /// one is in the air) and appends its commits; `None` when there was nothing to append
    /// or confirm (every command answered already).
    async fn launch(
        &mut self,
        batch: Vec<CommandRequest<A>>,
        ahead: Option<&mut Flight<A>>,
        last: bool,
    ) -> Option<Flight<A>> {
        if batch.is_empty() {
            return None;
        }
        if self.status.get() == Status::Recovering
            && ahead.is_none()
            && let Err(e) = self.recover().await
        {
            warn!(error = %e, "still recovering");
        }
        let writer = match &self.writer {
            Some(writer) if self.status.get() == Status::Serving => writer.clone(),
            _ => {
                for request in batch {
                    let _ = request.reply.send(Err(self.unavailable()));
                }
                return None;
            }
        };
        let (deciding, decide_from) = (Instant::now(), SystemTime::now());
        let mut flight = self.decide(batch, ahead, writer, last);
        self.metrics
            .phase(Phase::Decide, deciding.elapsed().as_secs_f64());
        flight.timeline.decide = Some((decide_from, SystemTime::now()));
        let records: Vec<LogRecord> = flight
            .pending
            .iter()
            .map(|p| LogRecord::Commit(p.record.clone()))
            .collect();
        if !records.is_empty() {
            let inputs: Vec<Append<'_>> = flight
                .pending
                .iter()
                .zip(&records)
                .map(|(p, r)| (p.record.stream.id.as_str(), r, p.traceparent.as_deref()))
                .collect();
            self.metrics.flight(records.len());
            flight.appended = Some(self.log.append(&inputs).boxed());
            flight.appending = Some(Instant::now());
            let now = SystemTime::now();
            flight.timeline.append = Some((now, now));
        }
        Some(flight)
    }

    /// Decides each command of `batch` in arrival order, against the state read plus the
    /// commits decided ahead of it: those of the flight `ahead` and of this one.
    fn decide(
        &mut self,
        batch: Vec<CommandRequest<A>>,
        mut ahead: Option<&mut Flight<A>>,
        writer: Writer,
        last: bool,
    ) -> Flight<A> {
        // The heads the flight ahead moved (every flight before it has landed, so the
        // state read holds those, with any receipts they recorded), then this flight's.
        let ahead_heads = ahead
            .as_mut()
            .map(|a| std::mem::take(&mut a.overlay))
            .unwrap_or_default();
        let mut overlay: HashMap<String, Head<A>> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut provisional: Vec<Provisional<A>> = Vec::new();
        let mut deferred: Vec<CommandRequest<A>> = Vec::new();
        for request in batch {
            let queued = request.reply.waiting_for();
            // A caller that gave up before this point never sees its command appended.
            if !request.reply.take_on() {
                continue;
            }
            if let Some(queued) = queued {
                self.metrics.phase(Phase::Queue, queued.as_secs_f64());
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
                // A key the flight ahead holds, or an answer of this one still has to
                // record: decided again once the log has its answer.
                if provisional.iter().any(|p| p.key.as_ref() == Some(key))
                    || ahead.as_ref().is_some_and(|a| a.holds(key))
                {
                    deferred.push(request);
                    continue;
                }
            }
            if ahead
                .as_ref()
                .is_some_and(|a| a.may_record_on(&request.stream_id))
            {
                deferred.push(request);
                continue;
            }
            let committed = self.streams.get(&request.stream_id);
            if let Some(reason) = committed.and_then(|s| s.unreadable.as_ref()) {
                let _ = request.reply.send(Err(OwnerError::Unavailable(format!(
                    "stream {} cannot be read by this build: {reason}",
                    request.stream_id
                ))));
                continue;
            }
            let moved = overlay
                .get(&request.stream_id)
                .or_else(|| ahead_heads.get(&request.stream_id));
            let (state, version, last_hash, at) = match moved {
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
        Flight {
            pending,
            provisional,
            deferred,
            overlay,
            appended: None,
            doomed: false,
            last,
            appending: None,
            timeline: Timeline::default(),
        }
    }

    /// Reads a flight back and answers it: its commits from their read-back (`acks`: what
    /// appending them told), then what appended nothing, once confirmed. Pushes onto
    /// `again` the commands to decide again; true when every commit of the flight was
    /// accepted, so the state read holds it.
    async fn land(
        &mut self,
        flight: Flight<A>,
        acks: Option<Vec<Result<i64, KafkaError>>>,
        again: &mut Vec<CommandRequest<A>>,
    ) -> bool {
        let landing = Instant::now();
        let mut flight = flight;
        let now = SystemTime::now();
        flight.timeline.read_back = Some((now, now));
        let accepted = self.land_flight(flight, acks, again).await;
        self.metrics
            .phase(Phase::ReadBack, landing.elapsed().as_secs_f64());
        accepted
    }

    /// [`Self::land`], untimed.
    async fn land_flight(
        &mut self,
        flight: Flight<A>,
        acks: Option<Vec<Result<i64, KafkaError>>>,
        again: &mut Vec<CommandRequest<A>>,
    ) -> bool {
        let appended: Vec<(String, Uuid)> = flight
            .pending
            .iter()
            .map(|p| (p.record.stream.id.clone(), p.record.commit_id))
            .collect();
        let current = match acks {
            Some(_) if flight.doomed => self.answer_commits(flight.pending, true, flight.timeline),
            Some(acks) => {
                self.read_back(&acks).await;
                self.answer_commits(flight.pending, false, flight.timeline)
            }
            None if flight.doomed => false,
            None => self.confirm_current().await,
        };
        let last = flight.last;
        let mut to_record = Vec::new();
        for p in flight.provisional {
            let stream = &p.request.stream_id;
            let unmoved = self.streams.get(stream).map_or(0, |s| s.version) == p.decided_on;
            // A keyed answer is recorded at the version it was decided on, so it is
            // confirmed only while the stream is still there; one that a later commit of
            // the flight moved past is decided again.
            let confirmed = current
                && (unmoved
                    || (p.key.is_none() && appended[p.ahead..].iter().any(|(s, _)| s == stream)));
            if confirmed {
                let answer = self.provisional_answer(&p);
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
        for request in flight.deferred {
            if last {
                let _ = request.reply.send(Err(OwnerError::Unavailable(
                    "another request with this Idempotency-Key was being answered; retry".into(),
                )));
            } else {
                again.push(request);
            }
        }
        current
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
        let inputs: Vec<Append<'_>> = answers
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
    fn provisional_answer(&self, p: &Provisional<A>) -> Answered {
        p.answer.clone()?;
        let offset = match p.at {
            At::Read(offset) => offset,
            At::Commit(id) => self.read_back_of(id).map(|v| v.offset),
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

    /// Answers each commit of a flight from its read-back: acknowledged if the gate
    /// accepted it and every commit ahead of it (in this flight and the one before it,
    /// which was `doomed` if it was not wholly accepted); `503` from the first one that was
    /// not. True when every commit was accepted, so the state read covers the whole flight.
    fn answer_commits(&mut self, pending: Vec<Pending>, doomed: bool, timeline: Timeline) -> bool {
        let timeline = Timeline {
            read_back: timeline
                .read_back
                .map(|(from, _)| (from, SystemTime::now())),
            ..timeline
        };
        // An owner that stopped serving while it read back (a fence of rules it cannot
        // judge) acknowledges nothing more.
        let mut failed = doomed || self.status.get() == Status::Lost;
        for p in pending {
            let answer = match self.read_back_of(p.record.commit_id) {
                Some(ReadBack {
                    accepted: true,
                    offset,
                }) if !failed => Ok(self.outcome_of(&p.record, offset)),
                _ if failed && self.status.get() == Status::Lost => Err(OwnerError::Unavailable(
                    "this instance no longer serves the partition; retry with the same Idempotency-Key".into(),
                )),
                _ if failed => Err(OwnerError::Unavailable(
                    "a commit decided ahead of this one was not accepted, so it was decided on a state the log does not hold; retry with the same Idempotency-Key".into(),
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
                let _ = reply.send_timed(answer, timeline);
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

    /// Appends `inputs` (key, record, traceparent) together and reads the partition until
    /// all of them are read back; returns the gate's verdict and offset per record id.
    async fn append_records(&mut self, inputs: &[Append<'_>]) -> Verdicts {
        let results = self.log.append(inputs).await;
        self.read_back(&results).await
    }

    /// Reads the partition until every record appended with `results` is read back (or,
    /// after an error, to its end); returns the verdicts of what it read.
    async fn read_back(&mut self, results: &[Result<i64, KafkaError>]) -> Verdicts {
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

    /// What reading the record with id `id` told, if it was read during this flush.
    fn read_back_of(&self, id: Uuid) -> Option<ReadBack> {
        self.reads
            .as_ref()
            .and_then(|reads| reads.get(&id))
            .copied()
    }
}

/// The commands queued now, up to a flight's worth.
fn take_queued<A: Aggregate>(
    requests: &mut mpsc::Receiver<CommandRequest<A>>,
) -> Vec<CommandRequest<A>> {
    let mut batch = Vec::new();
    while batch.len() < MAX_FLUSH {
        match requests.try_recv() {
            Ok(request) => batch.push(request),
            Err(_) => break,
        }
    }
    batch
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
        traceparent: meta.recorded_trace.clone(),
    }
}
