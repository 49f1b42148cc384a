//! Sends what the fulfilment process decided, fires its deadlines, and feeds the products'
//! answers back in: for the partitions of `order` this process holds, and only while it
//! holds them.
//!
//! Each command goes to the command API as the process's own identity (a bearer token read
//! from a file, so it can be rotated), with its idempotency key and the causing event's id
//! as causation. Its answer is settled in a transaction that first proves the unit is
//! still held ([`Hold`]), then deletes the outbox row and, for a product's answer, moves
//! the order's process on (adding what that sends). The outbox is read under the same
//! proof, so a process that stalls and loses its share sends at most the round it had
//! already read, again: the same keys, which the command API replays (for 24 h), and the
//! products' and orders' commands change nothing when repeated in the state they leave
//! (a reservation held, an order cancelled). It settles nothing after losing its share.
//!
//! Answers: 2xx accepted (or replayed); 404 and 409 naming a domain rule, and 422 invalid
//! fields, are the domain's refusals (the product unknown, out of stock, the order already
//! paid), settled as such; anything else (the API down, 429, 5xx, a token refused, an
//! unknown route, an idempotency key reused under another subject) is tried again later,
//! backing off to 30 s, and logged.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use keel_schemas::TopicPartition;
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::{NAME, Outgoing, RESERVE, Store, TAKE, sku};
use crate::hold::{Hold, LostHold};
use crate::projection::table;
use crate::units::Unit;

/// How the process reaches the command API.
#[derive(Clone, Debug)]
pub struct SenderSettings {
    /// The command API's base URL (`http://127.0.0.1:8080`).
    pub command_api: String,
    /// A file holding the process's bearer token; none when the API runs without auth.
    pub token_file: Option<PathBuf>,
    /// Most commands in flight at once.
    pub concurrency: usize,
    /// How long a command may take before it is tried again.
    pub timeout: Duration,
}

/// How long the sender rests when it has nothing to send.
const IDLE: Duration = Duration::from_millis(25);
/// How often it looks for orders past their payment deadline.
const DEADLINE_SCAN: Duration = Duration::from_millis(500);
/// The longest pause before a command is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What the command API said.
#[derive(Debug)]
enum Answer {
    /// Accepted (or replayed).
    Accepted,
    /// Refused by the domain: the rule's detail.
    Refused(String),
    /// Not answered, or not in a way that settles it: try again later.
    Retry(String),
}

/// Sends the process's commands on the units `units` holds until the task is dropped.
pub async fn run(
    pool: PgPool,
    settings: SenderSettings,
    process: Uuid,
    units: watch::Receiver<Vec<Unit>>,
) {
    let sender = match Sender::new(pool, settings, process) {
        Ok(sender) => sender,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "the fulfilment process cannot send commands");
            return;
        }
    };
    let mut last_scan = tokio::time::Instant::now() - DEADLINE_SCAN;
    loop {
        let held = units.borrow().clone();
        if held.is_empty() {
            tokio::time::sleep(IDLE * 4).await;
            continue;
        }
        if last_scan.elapsed() >= DEADLINE_SCAN {
            last_scan = tokio::time::Instant::now();
            if let Err(e) = sender.fire_deadlines(&held).await {
                warn!(error = %format!("{e:#}"), "firing the payment deadlines failed");
            }
        }
        match sender.send_some(&held).await {
            Ok(0) => tokio::time::sleep(IDLE).await,
            Ok(_) => {}
            Err(e) => {
                warn!(error = %format!("{e:#}"), "sending the fulfilment commands failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What sends the commands of one process.
pub(crate) struct Sender {
    pool: PgPool,
    settings: SenderSettings,
    process: Uuid,
    client: reqwest::Client,
}

impl Sender {
    /// A sender for `process`, the holder its transactions prove.
    pub(crate) fn new(
        pool: PgPool,
        settings: SenderSettings,
        process: Uuid,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(settings.timeout)
            .build()
            .context("making the HTTP client")?;
        Ok(Self {
            pool,
            settings,
            process,
            client,
        })
    }

    /// One proof of the units of `held` on the partitions `on`: none when it holds none
    /// of them.
    fn hold(&self, held: &[Unit], on: &[TopicPartition]) -> Option<Hold> {
        let mut units: Vec<Unit> = held
            .iter()
            .filter(|u| on.contains(&u.at))
            .cloned()
            .collect();
        units.sort();
        units.dedup();
        (!units.is_empty()).then(|| Hold::units(NAME, self.process, units))
    }

    /// The live generation of the process's tables, when this code built it: a process of
    /// other code sends nothing (its runner stands by).
    async fn generation(&self) -> anyhow::Result<Option<i32>> {
        Ok(sqlx::query_scalar(
            "SELECT generation FROM keel_projections
             WHERE name = $1 AND code_version = $2 AND gate_rules = $3",
        )
        .bind(NAME)
        .bind(keel_views::FULFILMENT.version)
        .bind(keel_kafka::GATE_RULES)
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Sends the commands due on the units held, and settles their answers: how many.
    pub(crate) async fn send_some(&self, held: &[Unit]) -> anyhow::Result<usize> {
        let Some(generation) = self.generation().await? else {
            return Ok(0);
        };
        let partitions: Vec<TopicPartition> = held.iter().map(|u| u.at.clone()).collect();
        let Some(holding) = self.hold(held, &partitions) else {
            return Ok(0);
        };
        // Looked at without a lock first: an idle poll holds no unit row up.
        if self.due(None, generation, &partitions).await?.is_empty() {
            return Ok(0);
        }
        // Read under the proof that the units are still held: a process that lost them
        // (paused past its claims) sends nothing their new holder decided.
        let mut tx = self.pool.begin().await?;
        if let Err(e) = holding.prove(&mut tx).await {
            let _ = tx.rollback().await;
            if e.downcast_ref::<LostHold>().is_some() {
                debug!(error = %e, "not sending: a unit moved");
                return Ok(0);
            }
            return Err(e);
        }
        let outgoing = self.due(Some(&mut tx), generation, &partitions).await;
        let _ = tx.rollback().await;
        let outgoing = outgoing?;
        if outgoing.is_empty() {
            return Ok(0);
        }
        let token = self.token().await?;
        let answers =
            futures::future::join_all(outgoing.iter().map(|o| self.post(o, token.as_deref())))
                .await;
        let count = outgoing.len();
        let mut answered: Vec<(Outgoing, Answer)> = outgoing.into_iter().zip(answers).collect();
        // Orders' rows locked in one order (their ids' bytes, as `Store::load` locks them).
        answered.sort_by(|a, b| a.0.order_id.cmp(&b.0.order_id));
        // All in one transaction under one proof of the units they are on.
        let on: Vec<TopicPartition> = answered.iter().map(|(o, _)| o.at()).collect();
        let Some(all) = self.hold(held, &on) else {
            return Ok(0);
        };
        let mut tx = self.pool.begin().await?;
        match self
            .settle_round(&mut tx, &all, generation, &answered)
            .await
        {
            Ok(()) => {
                tx.commit().await?;
                return Ok(count);
            }
            Err(e) => {
                let _ = tx.rollback().await;
                debug!(error = %format!("{e:#}"), "settling the round at once failed: each answer on its own");
            }
        }
        // When a unit moved meanwhile (or one answer could not be settled), each on its
        // own, so the others still are. One that cannot be settled is sent again later,
        // backing off like an unanswered one.
        for (out, answer) in &answered {
            let Some(hold) = self.hold(held, &[out.at()]) else {
                continue;
            };
            if let Err(e) = self.settle(generation, &hold, out, answer).await {
                let error = format!("settling its answer failed: {e:#}");
                warn!(key = out.key, %error, "a fulfilment command's answer was not settled: it is sent again");
                if let Err(e) = self
                    .settle(generation, &hold, out, &Answer::Retry(error))
                    .await
                {
                    warn!(key = out.key, error = %format!("{e:#}"), "putting a fulfilment command off failed");
                }
            }
        }
        Ok(count)
    }

    /// The outbox's commands due on `partitions`, oldest first, at most a round's: read in
    /// `tx` (which proved the units) or, without one, unlocked.
    async fn due(
        &self,
        tx: Option<&mut sqlx::PgConnection>,
        generation: i32,
        partitions: &[TopicPartition],
    ) -> anyhow::Result<Vec<Outgoing>> {
        let sql = format!(
            "SELECT key, order_id, topic, partition, path, body, causation_id, correlation_id,
                    product_answer, sku, attempts
             FROM {} WHERE (topic, partition) IN (SELECT * FROM UNNEST($1::text[], $2::int[]))
               AND next_at <= now() ORDER BY seq LIMIT $3",
            table("fulfilment_outbox", generation)
        );
        let query = sqlx::query_as(&sql)
            .bind(
                partitions
                    .iter()
                    .map(|at| at.topic.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(partitions.iter().map(|at| at.partition).collect::<Vec<_>>())
            .bind(self.settings.concurrency as i64);
        let due = match tx {
            Some(tx) => query.fetch_all(tx).await,
            None => query.fetch_all(&self.pool).await,
        };
        due.context("reading the outbox")
    }

    /// Settles every answer of a round in `tx`, under one proof of `all`.
    async fn settle_round(
        &self,
        tx: &mut sqlx::PgConnection,
        all: &Hold,
        generation: i32,
        answered: &[(Outgoing, Answer)],
    ) -> anyhow::Result<()> {
        all.prove(&mut *tx).await?;
        crate::generation::enter_live(&mut *tx, NAME, generation).await?;
        for (out, answer) in answered {
            self.settle_in(&mut *tx, generation, out, answer).await?;
        }
        Ok(())
    }

    /// The process's token, read again each time (it may be rotated).
    async fn token(&self) -> anyhow::Result<Option<String>> {
        let Some(file) = &self.settings.token_file else {
            return Ok(None);
        };
        let token = tokio::fs::read_to_string(file)
            .await
            .with_context(|| format!("reading the fulfilment token file {}", file.display()))?;
        Ok(Some(token.trim().to_owned()))
    }

    async fn post(&self, out: &Outgoing, token: Option<&str>) -> Answer {
        let url = format!(
            "{}{}",
            self.settings.command_api.trim_end_matches('/'),
            out.path
        );
        let mut request = self
            .client
            .post(&url)
            .header("idempotency-key", &out.key)
            .header("x-causation-id", &out.causation_id)
            .json(&out.body);
        if let Some(correlation) = &out.correlation_id {
            request = request.header("x-correlation-id", correlation);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Retry(format!("{url}: {e}")),
        };
        let status = response.status();
        if status.is_success() {
            return Answer::Accepted;
        }
        let problem: Value = response.json().await.unwrap_or(Value::Null);
        let detail = problem["detail"]
            .as_str()
            .or(problem["title"].as_str())
            .unwrap_or("refused")
            .to_owned();
        let kind = problem["type"].as_str().unwrap_or_default();
        let rule = problem["rule"].as_str();
        match status.as_u16() {
            // The domain's refusals: a rule broken, a stream that does not exist (both
            // name the rule), fields the domain finds invalid.
            404 | 409 if rule.is_some() => Answer::Refused(detail),
            422 if kind.ends_with("/invalid-fields") => Answer::Refused(detail),
            // Anything else is not an answer about the order: a route that does not exist
            // (a wrong KEEL_FULFILMENT_COMMAND_API), an idempotency key reused under
            // another subject (the token changed identity), a malformed command. Kept in
            // the outbox and tried again, loudly, rather than cancelling orders over it.
            404 | 400 | 413 | 415 | 422 => {
                tracing::error!(%url, %status, problem = kind, %detail, "the command API did not take a fulfilment command: it stays in the outbox");
                Answer::Retry(format!("{status} {kind}: {detail}"))
            }
            401 | 403 => {
                tracing::error!(%status, %detail, "the command API refused the fulfilment process's token (KEEL_FULFILMENT_TOKEN_FILE)");
                Answer::Retry(format!("{status}: {detail}"))
            }
            _ => Answer::Retry(format!("{status}: {detail}")),
        }
    }

    /// Settles one command's answer under the proof that its unit is still held.
    async fn settle(
        &self,
        generation: i32,
        hold: &Hold,
        out: &Outgoing,
        answer: &Answer,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        if let Err(e) = hold.prove(&mut tx).await {
            debug!(error = %e, key = out.key, "not settling: the unit moved");
            tx.rollback().await?;
            return Ok(());
        }
        crate::generation::enter_live(&mut tx, NAME, generation).await?;
        self.settle_in(&mut tx, generation, out, answer).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Settles one command's answer in `tx`, which has proved its unit is held.
    async fn settle_in(
        &self,
        tx: &mut sqlx::PgConnection,
        generation: i32,
        out: &Outgoing,
        answer: &Answer,
    ) -> anyhow::Result<()> {
        let outbox = table("fulfilment_outbox", generation);
        if let Answer::Retry(error) = answer {
            let backoff = Duration::from_millis(200)
                .saturating_mul(2u32.saturating_pow(out.attempts.clamp(0, 16) as u32))
                .min(MAX_BACKOFF);
            warn!(key = out.key, attempts = out.attempts + 1, %error, "a fulfilment command will be sent again");
            sqlx::query(&format!(
                "UPDATE {outbox} SET attempts = attempts + 1, last_error = $2,
                    next_at = now() + make_interval(secs => $3) WHERE key = $1"
            ))
            .bind(&out.key)
            .bind(error)
            .bind(backoff.as_secs_f64())
            .execute(&mut *tx)
            .await?;
            return Ok(());
        }
        // For a product's answer, the order's row before its outbox row, as a batch locks
        // the orders' rows before it adds commands. (A retry, and an answer that moves no
        // order on, lock only their outbox rows, which no batch ever locks: a batch only
        // inserts keys derived from new events.)
        let answered = match (
            out.product_answer.as_deref(),
            out.sku.as_deref().and_then(sku),
        ) {
            (Some(kind), Some(sku)) => Some((
                kind,
                sku,
                Store::load(&mut *tx, generation, std::slice::from_ref(&out.order_id)).await?,
            )),
            _ => None,
        };
        let deleted = sqlx::query(&format!("DELETE FROM {outbox} WHERE key = $1"))
            .bind(&out.key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            // Settled already (by this process before it lost the unit and got it back).
            return Ok(());
        }
        let result = match answer {
            Answer::Accepted => Ok(()),
            Answer::Refused(detail) => {
                info!(key = out.key, %detail, "a fulfilment command was refused");
                Err(detail.clone())
            }
            Answer::Retry(_) => unreachable!("handled above"),
        };
        if let Some((kind, sku, mut store)) = answered
            && let Some(row) = store.rows.get_mut(&out.order_id)
        {
            let sends = match (kind, result) {
                (RESERVE, answer) => row.process.reserve_answered(&sku, answer),
                (TAKE, Ok(())) => row.process.taken(&sku),
                (TAKE, Err(detail)) => {
                    warn!(order = out.order_id, %sku, %detail, "taking reserved stock was refused");
                    vec![]
                }
                _ => vec![],
            };
            store.send(&out.order_id, sends);
            store.save(&mut *tx, Utc::now()).await?;
        }
        Ok(())
    }

    /// Cancels the orders of the units held whose payment deadline passed.
    pub(crate) async fn fire_deadlines(&self, held: &[Unit]) -> anyhow::Result<()> {
        let Some(generation) = self.generation().await? else {
            return Ok(());
        };
        let now = Utc::now();
        let due: Vec<(String, String, i32)> = sqlx::query_as(&format!(
            "SELECT order_id, topic, partition FROM {}
             WHERE (topic, partition) IN (SELECT * FROM UNNEST($1::text[], $2::int[]))
               AND NOT deadline_fired AND step IN ('reserving', 'confirming', 'awaiting_payment')
               AND payment_due <= $3 ORDER BY payment_due LIMIT 500",
            table("fulfilment", generation)
        ))
        .bind(held.iter().map(|u| u.at.topic.clone()).collect::<Vec<_>>())
        .bind(held.iter().map(|u| u.at.partition).collect::<Vec<_>>())
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for (order_id, topic, partition) in due {
            let Some(hold) = self.hold(held, &[TopicPartition::new(topic, partition)]) else {
                continue;
            };
            let mut tx = self.pool.begin().await?;
            if hold.prove(&mut tx).await.is_err() {
                tx.rollback().await?;
                continue;
            }
            crate::generation::enter_live(&mut tx, NAME, generation).await?;
            let mut store =
                Store::load(&mut tx, generation, std::slice::from_ref(&order_id)).await?;
            let Some(row) = store.rows.get(&order_id) else {
                tx.rollback().await?;
                continue;
            };
            let sends = row.process.due(now.timestamp_millis());
            if !sends.is_empty() {
                info!(
                    order = order_id,
                    "the payment deadline passed: cancelling the order"
                );
            }
            // Done with the deadline once it sent the cancellation, or the order was paid
            // or cancelled first; not when the state's deadline is still ahead.
            if !sends.is_empty()
                || row.process.paid_event.is_some()
                || row.process.cancelled_event.is_some()
            {
                store.fired(&order_id);
            }
            store.send(&order_id, sends);
            store.save(&mut tx, now).await?;
            tx.commit().await?;
        }
        Ok(())
    }
}
