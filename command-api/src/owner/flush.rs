//! The group commit: commands waiting for the partition are decided in arrival order, each
//! against the state as read plus the commits of the same flush ahead of it, appended
//! together, read back, and each acknowledged only if the gate accepted its commit.

use std::collections::HashMap;

use keel_domain::Aggregate;
use keel_schemas::{CommandMeta, CommitRecord, LogRecord, StreamRef, encode_event};
use tracing::{error, instrument, warn};

use super::log::PartitionLog;
use super::outcome::{CommandRequest, Outcome, OwnerError, Reply};
use super::task::{PartitionOwner, ReadBack, Status, Verdicts};

/// A commit of the current flush, waiting for its read-back.
struct Pending {
    record: CommitRecord,
    key: Option<(String, String)>,
    traceparent: Option<String>,
    replies: Vec<Reply>,
}

impl<A: Aggregate, L: PartitionLog> PartitionOwner<A, L>
where
    A::Command: Send,
{
    /// Decides a batch of commands, appends the commits together, reads them back, and
    /// answers each one.
    #[instrument(skip_all, fields(commands = batch.len()))]
    pub(super) async fn flush(&mut self, batch: Vec<CommandRequest<A>>) {
        if self.status.get() == Status::Recovering
            && let Err(e) = self.recover().await
        {
            warn!(error = %e, "still recovering");
        }
        if self.status.get() != Status::Serving {
            for request in batch {
                let _ = request.reply.send(Err(self.unavailable()));
            }
            return;
        }
        let Some(writer) = self.writer.clone() else {
            return;
        };

        // Decide each command against the state read plus the commits ahead of it.
        let mut overlay: HashMap<String, (A, u64, Option<String>)> = HashMap::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut unchanged: Vec<CommandRequest<A>> = Vec::new();
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
                if let Some(answer) = self.keys.answer(key, request.meta.request_digest.as_ref()) {
                    let _ = request.reply.send(answer);
                    continue;
                }
                if let Some(p) = pending.iter_mut().find(|p| p.key.as_ref() == Some(key)) {
                    if p.record.command.request_digest == request.meta.request_digest {
                        p.replies.push(request.reply);
                    } else {
                        let _ = request.reply.send(Err(OwnerError::IdempotencyKeyReused));
                    }
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
            let (state, version, last_hash) = match overlay.get(&request.stream_id) {
                Some(ahead) => ahead.clone(),
                None => committed
                    .map(|s| (s.state.clone(), s.version, s.last_hash.clone()))
                    .unwrap_or_default(),
            };
            if let Some(expected) = request.meta.if_match
                && expected != version
            {
                let _ = request.reply.send(Err(OwnerError::VersionMismatch {
                    expected,
                    actual: version,
                }));
                continue;
            }
            let events = match state.decide(&request.command) {
                Ok(events) => events,
                Err(e) => {
                    let _ = request.reply.send(Err(e.into()));
                    continue;
                }
            };
            if events.is_empty() {
                unchanged.push(request);
                continue;
            }
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
                CommandMeta {
                    id: ids(),
                    command_type: meta.command_type.to_owned(),
                    idempotency_key: meta.idempotency_key.clone(),
                    actor: meta.actor.clone(),
                    correlation_id: meta.correlation_id.clone(),
                    causation_id: meta.causation_id.clone(),
                    request_digest: meta.request_digest.clone(),
                },
                writer.clone(),
                last_hash,
            );
            record.commit_id = ids();
            let record = record.sealed_and_signed(&self.signing_key);
            let next = events.iter().fold(state, |s, e| s.evolve(e));
            overlay.insert(
                request.stream_id.clone(),
                (next, record.next_version(), Some(record.hash.clone())),
            );
            pending.push(Pending {
                record,
                key,
                traceparent: request.meta.traceparent.clone(),
                replies: vec![request.reply],
            });
        }

        if !pending.is_empty() {
            let verdicts = self.append_and_read_back(&pending).await;
            for p in pending {
                let answer = match verdicts.get(&p.record.commit_id) {
                    Some(&ReadBack {
                        accepted: true,
                        offset,
                    }) => Ok(self.outcome_of(&p.record, offset)),
                    Some(_) => Err(OwnerError::Unavailable(
                        "the log did not accept the commit (the partition changed hands or the stream moved on); retry".into(),
                    )),
                    None => Err(OwnerError::Unavailable(
                        "the commit could not be confirmed; retry with the same Idempotency-Key".into(),
                    )),
                };
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
        }

        // Commands that changed nothing are answered with the stream as now read.
        for request in unchanged {
            let answer = match self.streams.get(&request.stream_id) {
                Some(s) => Ok(Outcome {
                    stream: StreamRef {
                        stream_type: A::TYPE.to_owned(),
                        id: request.stream_id.clone(),
                    },
                    version: s.version,
                    events: Vec::new(),
                    position: s.last_offset.map(|o| self.position(o)),
                    created: false,
                    replayed: false,
                }),
                None => Err(self.unavailable()),
            };
            let _ = request.reply.send(answer);
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
        let results = self.log.append(&inputs).await;
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
