//! Operators' requests on parked streams, carried out by the applier that holds their
//! partition: a retry applies the held-back records in order, exactly once; a discard
//! drops them from the view with its reason.

use keel_schemas::TopicPartition;

use super::{Applier, ApplyError, Failure, failure, record_error};
use crate::dead_letter::{self, Action, Request};
use crate::decode::Decoded;
use crate::generation::{self, Mode};
use crate::projection::ProjectedEvent;

impl Applier<'_> {
    /// Carries out the operators' requests waiting on parked streams of the partitions this
    /// applier applies, oldest first. Live, it first closes the requests that named a
    /// generation a rebuild has since replaced: their streams are no longer read.
    pub(crate) async fn settle_requests(&mut self) -> anyhow::Result<()> {
        let (name, generation) = (self.job.name(), self.generation);
        if self.mode == Mode::Live {
            sqlx::query(
                "UPDATE keel_stream_requests SET done_at = now(), ok = false,
                     outcome = 'the generation it named was replaced by a rebuild; ask again'
                 WHERE projection = $1 AND generation < $2 AND done_at IS NULL",
            )
            .bind(name)
            .bind(generation)
            .execute(&self.job.pool)
            .await?;
        }
        let partitions: Vec<TopicPartition> =
            self.assignment().into_iter().map(|(at, _)| at).collect();
        let pending = dead_letter::pending(&self.job.pool, name, generation, &partitions).await?;
        for request in pending {
            while !self.settle(&request).await? {}
        }
        Ok(())
    }

    /// Carries out (up to [`RETRY_CHUNK`] records of) one request on a parked stream, in
    /// one transaction that proves the hold (and, live, the generation), so that it is
    /// done once whichever process holds the unit: a retry applies the held-back records
    /// in order, up to the first that still fails (which stays parked with the records
    /// after it); a discard drops them from the view, recording the reason and the actor.
    /// Returns whether the request is done.
    async fn settle(&mut self, request: &Request) -> anyhow::Result<bool> {
        let (name, generation) = (self.job.name(), self.generation);
        let at = &request.at;
        let stream = &request.stream;
        let mut tx = self.begin().await?;
        let open: Option<bool> = sqlx::query_scalar(
            "SELECT done_at IS NULL FROM keel_stream_requests WHERE id = $1 FOR UPDATE",
        )
        .bind(request.id)
        .fetch_optional(&mut *tx)
        .await?;
        if open != Some(true) {
            return Ok(true);
        }
        let (records, more) =
            dead_letter::held_back(&mut tx, name, generation, at, stream, RETRY_CHUNK).await?;
        let step = match request.action {
            _ if records.is_empty() => Step::default(),
            Action::Discard => Step {
                settled: records.iter().map(|(e, _)| e.offset).collect(),
                more,
                ..Step::default()
            },
            Action::Retry => self.retry(&mut tx, records, more).await?,
        };
        let status = match request.action {
            Action::Retry => "retried",
            Action::Discard => "discarded",
        };
        sqlx::query(
            r#"UPDATE keel_dead_letters SET status = $7, resolved_at = now(), resolved_by = $8, resolution = $9
               WHERE projection = $1 AND generation = $2 AND topic = $3 AND partition = $4
                 AND stream_type = $5 AND stream_id = $6 AND status = 'parked' AND "offset" = ANY($10)"#,
        )
        .bind(name)
        .bind(generation)
        .bind(&at.topic)
        .bind(at.partition)
        .bind(&stream.stream_type)
        .bind(&stream.id)
        .bind(status)
        .bind(&request.actor)
        .bind(&request.reason)
        .bind(&step.settled)
        .execute(&mut *tx)
        .await?;
        if step.events > 0 {
            sqlx::query(
                "UPDATE keel_checkpoints SET events = events + $5
                 WHERE projection = $1 AND generation = $2 AND topic = $3 AND partition = $4",
            )
            .bind(name)
            .bind(generation)
            .bind(&at.topic)
            .bind(at.partition)
            .bind(step.events as i64)
            .execute(&mut *tx)
            .await?;
        }
        // What the stream still holds back, from the records themselves.
        let parked_now = dead_letter::reckon_parked(
            &mut tx,
            name,
            generation,
            at,
            stream,
            step.error.as_deref(),
        )
        .await?;
        let settled: i32 = sqlx::query_scalar(
            "UPDATE keel_stream_requests SET settled = settled + $2 WHERE id = $1 RETURNING settled",
        )
        .bind(request.id)
        .bind(i32::try_from(step.settled.len()).unwrap_or(i32::MAX))
        .fetch_one(&mut *tx)
        .await?;
        let done = !step.more || step.error.is_some();
        if done {
            let (ok, outcome) = match (request.action, &step.error) {
                _ if settled == 0 && step.error.is_none() => {
                    (false, format!("{stream} is not parked"))
                }
                (Action::Discard, _) => (true, format!("discarded {settled} records")),
                (Action::Retry, None) => (true, format!("applied {settled} records")),
                (Action::Retry, Some(error)) => (
                    false,
                    format!(
                        "applied {settled} records; still parked at offset {}: {error}",
                        parked_now.as_ref().map_or(-1, |p| p.first_offset)
                    ),
                ),
            };
            sqlx::query(
                "UPDATE keel_stream_requests SET done_at = now(), ok = $2, outcome = $3 WHERE id = $1",
            )
            .bind(request.id)
            .bind(ok)
            .bind(&outcome)
            .execute(&mut *tx)
            .await?;
            tracing::info!(%stream, action = request.action.as_str(), actor = %request.actor, %outcome,
                           "a parked stream's request was carried out");
        }
        if self.mode == Mode::Live {
            generation::notify(&mut tx, name).await?;
        }
        tx.commit().await?;
        if let Some(state) = self.checkpoints.partition_mut(&at.topic, at.partition) {
            match parked_now {
                Some(parked) => {
                    state.parked.insert(stream.clone(), parked);
                }
                None => {
                    state.parked.remove(stream);
                }
            }
        }
        self.events += step.events as u64;
        Ok(done)
    }

    /// Applies the held-back `records` of a stream in `tx`, in order, up to the first that
    /// still cannot be decoded or applied: all of them behind one savepoint, and record by
    /// record (a savepoint each) only when that fails. Fails only on an error a later
    /// attempt may not meet (a transient one, a lost connection): any other keeps the
    /// record parked and ends the request.
    async fn retry(
        &self,
        tx: &mut sqlx::PgConnection,
        records: Vec<(keel_kafka::LogEntry, bool)>,
        more: bool,
    ) -> anyhow::Result<Step> {
        let (entries, admitted): (Vec<_>, Vec<bool>) = records.into_iter().unzip();
        let policy = std::sync::Arc::clone(&self.job.options.policy);
        // The costly part (hashes and signatures) off the async workers.
        let decoded = tokio::task::spawn_blocking(move || Decoded::all(entries, &policy)).await?;
        let mut readable = Vec::new();
        let mut error = None;
        for (record, admitted) in decoded.iter().zip(admitted) {
            let events = if admitted {
                record.events_taken()
            } else {
                Err(
                    "the record was not one the partition gate could take when it was read; \
                     only a rebuild with code that reads it can apply it"
                        .to_owned(),
                )
            };
            match events {
                Ok(events) => readable.push((record.entry.offset, events)),
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        let all: Vec<ProjectedEvent> = readable
            .iter()
            .flat_map(|(_, events)| events.iter().cloned())
            .collect();
        let mut step = Step {
            more,
            ..Step::default()
        };
        if self.apply_saved(tx, &all).await?.is_none() {
            step.settled = readable.iter().map(|(offset, _)| *offset).collect();
            step.events = all.len();
        } else {
            // One record at a time, each keeping the locks it took until the transaction
            // ends: in record order, not the fixed order a batch takes them in. That cannot
            // deadlock with the live batches only because one stream feeds at most one
            // shared row of each view (an order's customer and its day in `daily_sales`);
            // a view that maps a stream to several shared rows must lock them all first.
            for (offset, events) in &readable {
                if let Some(failed) = self.apply_saved(tx, events).await? {
                    error = Some(failed);
                    break;
                }
                step.settled.push(*offset);
                step.events += events.len();
            }
        }
        step.error = error;
        Ok(step)
    }

    /// Applies `events` in `tx` behind a savepoint: `None` once applied, or why they
    /// cannot be (rolled back to the savepoint). Fails on a transient error, or when the
    /// statements did not fail on their own (the connection went).
    async fn apply_saved(
        &self,
        tx: &mut sqlx::PgConnection,
        events: &[ProjectedEvent],
    ) -> anyhow::Result<Option<String>> {
        if events.is_empty() {
            return Ok(None);
        }
        sqlx::query("SAVEPOINT keel_retry")
            .execute(&mut *tx)
            .await?;
        match self.job.projection.apply(tx, self.generation, events).await {
            Ok(()) => {
                sqlx::query("RELEASE SAVEPOINT keel_retry")
                    .execute(&mut *tx)
                    .await?;
                Ok(None)
            }
            Err(e) => {
                let e = anyhow::Error::new(ApplyError(e));
                match failure(&e) {
                    Some((Failure::Record | Failure::Halt, _)) => {
                        sqlx::query("ROLLBACK TO SAVEPOINT keel_retry")
                            .execute(&mut *tx)
                            .await?;
                        Ok(Some(record_error(&e)))
                    }
                    _ => Err(e),
                }
            }
        }
    }
}

/// Most held-back records one transaction of a request settles.
const RETRY_CHUNK: i64 = 2_000;

/// What one transaction of a request on a parked stream did.
#[derive(Default)]
struct Step {
    /// The offsets of the records it applied or discarded.
    settled: Vec<i64>,
    /// Events it applied.
    events: usize,
    /// Why the record it stopped at still fails, when one does.
    error: Option<String>,
    /// Whether more records are held back than it looked at.
    more: bool,
}
