//! Order fulfilment, run: the pure process of [`keel_domain::fulfilment`] kept in
//! PostgreSQL and driven by the log and by the answers to the commands it sends.
//!
//! It reads the `order` topic through the gate as a projection does (the same runner,
//! checkpoints, shared partitions and proof of the units held in every batch transaction),
//! and in each batch's transaction it updates one row per order it follows
//! (`fulfilment`) and records the commands to send (`fulfilment_outbox`, keyed by their
//! idempotency keys). [`sender`] sends them to the command API as the process's own
//! identity, feeds the products' answers back in under the same proof, and fires the
//! payment deadlines. A record before the partition's start (its end when the process
//! first ran there, `keel_process_starts`) is read, for the gate, but not acted on: orders
//! placed before the process existed are never reserved after the fact.
//!
//! The order's own events drive its steps: `OrderPlaced` (reserve every line),
//! `OrderStockReserved` (confirmed), `OrderPaid` (take the stock once reserved),
//! `OrderReadyToShip`, `OrderCancelled` (release or return). The products' answers come
//! from the command API: a reservation accepted or refused, stock taken.

pub mod sender;
mod settings;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_domain::fulfilment::{Dispatch, Process, Step};
use keel_domain::ids::{OrderId, Sku};
use keel_domain::order::{OrderCommand, OrderEvent};
use keel_domain::product::ProductCommand;
use keel_kafka::KafkaSettings;
use keel_schemas::TopicPartition;
use keel_views::ProjectionSpec;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgPool};

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

pub use settings::{FulfilmentArgs, parse_duration};

/// The process's name: its units, checkpoints and start positions are recorded under it.
pub const NAME: &str = "fulfilment";

/// The default payment deadline: an order not fully paid this long after it was placed is
/// cancelled.
pub const DEFAULT_PAYMENT_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// The steps an order leaves by itself (an answer or an event moves it on); the others
/// (ready to ship, cancelled) are where the process is done with it.
pub const OPEN_STEPS: [Step; 5] = [
    Step::Reserving,
    Step::Confirming,
    Step::AwaitingPayment,
    Step::TakingStock,
    Step::MarkingReady,
];

/// The fulfilment process, as the projector runs it.
pub struct Fulfilment {
    /// How long after it was placed an order must be paid.
    pub payment_deadline: Duration,
}

#[async_trait]
impl Projection for Fulfilment {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::FULFILMENT
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let (f, o) = (
            table("fulfilment", generation),
            table("fulfilment_outbox", generation),
        );
        execute_script(
            db,
            &format!(
                r#"CREATE TABLE IF NOT EXISTS {f} (
                order_id text PRIMARY KEY, topic text NOT NULL, partition int NOT NULL,
                step text NOT NULL, state jsonb NOT NULL, correlation_id text,
                placed_at timestamptz NOT NULL, payment_due timestamptz NOT NULL,
                deadline_fired boolean NOT NULL DEFAULT false,
                step_since timestamptz NOT NULL, updated_at timestamptz NOT NULL);
            CREATE TABLE IF NOT EXISTS {o} (
                key text PRIMARY KEY, seq bigserial NOT NULL, order_id text NOT NULL,
                topic text NOT NULL, partition int NOT NULL, path text NOT NULL,
                body jsonb NOT NULL, causation_id text NOT NULL, correlation_id text,
                product_answer text, sku text, created_at timestamptz NOT NULL DEFAULT now(),
                attempts int NOT NULL DEFAULT 0, next_at timestamptz NOT NULL DEFAULT now(),
                last_error text)"#
            ),
        )
        .await
    }

    fn indexes(&self, generation: i32) -> Vec<String> {
        let (f, o) = (
            table("fulfilment", generation),
            table("fulfilment_outbox", generation),
        );
        vec![
            format!(
                "CREATE INDEX IF NOT EXISTS {f}_due ON {f} (partition, payment_due)
                 WHERE NOT deadline_fired AND step IN ('reserving', 'confirming', 'awaiting_payment')"
            ),
            format!("CREATE INDEX IF NOT EXISTS {f}_step ON {f} (step, step_since)"),
            format!("CREATE INDEX IF NOT EXISTS {o}_next ON {o} (partition, next_at, seq)"),
        ]
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let starts = starts(db, events).await?;
        let acted: Vec<&ProjectedEvent> = events
            .iter()
            .filter(|e| matches!(e.event, AnyEvent::Order(_)))
            .filter(|e| {
                starts
                    .get(&(e.topic.clone(), e.partition))
                    .is_some_and(|s| e.offset >= *s)
            })
            .collect();
        if acted.is_empty() {
            return Ok(());
        }
        let mut ids: Vec<String> = acted.iter().map(|e| e.stream_id().to_owned()).collect();
        ids.sort();
        ids.dedup();
        let mut store = Store::load(db, generation, &ids).await?;
        for e in acted {
            let AnyEvent::Order(event) = &e.event else {
                continue;
            };
            let id = e.stream_id();
            let event_id = e.envelope().event_id.to_string();
            if let OrderEvent::OrderPlaced { lines, .. } = event {
                if store.rows.contains_key(id) {
                    continue;
                }
                let Ok(order_id) = OrderId::parse(id) else {
                    continue;
                };
                let due = chrono::Duration::from_std(self.payment_deadline)
                    .ok()
                    .and_then(|d| e.recorded_at().checked_add_signed(d))
                    .unwrap_or(DateTime::<Utc>::MAX_UTC);
                let (process, sends) =
                    Process::placed(order_id, &event_id, lines, due.timestamp_millis());
                store.placed(
                    e,
                    process,
                    Some(e.commit.command.correlation_id.clone()),
                    due,
                );
                store.send(id, sends);
                continue;
            }
            let Some(row) = store.rows.get_mut(id) else {
                // An order the process does not follow: placed before it started.
                continue;
            };
            let sends = match event {
                OrderEvent::OrderStockReserved {} => row.process.confirmed(),
                OrderEvent::OrderPaid { .. } => row.process.paid(&event_id),
                OrderEvent::OrderReadyToShip {} => {
                    row.process.ready();
                    vec![]
                }
                OrderEvent::OrderCancelled { .. } => row.process.cancelled(&event_id),
                _ => vec![],
            };
            row.touched = true;
            store.send(id, sends);
        }
        store.save(db, Utc::now()).await
    }
}

/// The start offsets of the partitions `events` come from. A partition without one was
/// never started on: an error, since the process records them before it reads.
async fn starts(
    db: &mut PgConnection,
    events: &[ProjectedEvent],
) -> Result<HashMap<(String, i32), i64>, sqlx::Error> {
    let mut at: Vec<(String, i32)> = events
        .iter()
        .map(|e| (e.topic.clone(), e.partition))
        .collect();
    at.sort();
    at.dedup();
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT topic, partition, start_offset FROM keel_process_starts
         WHERE process = $1 AND (topic, partition) IN (SELECT * FROM UNNEST($2::text[], $3::int[]))",
    )
    .bind(NAME)
    .bind(at.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>())
    .bind(at.iter().map(|(_, p)| *p).collect::<Vec<_>>())
    .fetch_all(&mut *db)
    .await?;
    let starts: HashMap<(String, i32), i64> =
        rows.into_iter().map(|(t, p, s)| ((t, p), s)).collect();
    if let Some((topic, partition)) = at.iter().find(|k| !starts.contains_key(k)) {
        return Err(sqlx::Error::Protocol(format!(
            "no start position recorded for the fulfilment process on {topic}/{partition}"
        )));
    }
    Ok(starts)
}

/// Records where the process starts on each partition of `kafka`'s `order` topic that has
/// none yet: the partition's end now. Call it before the process reads; the first process
/// to record a partition's start decides it.
pub async fn record_starts(pool: &PgPool, kafka: &KafkaSettings) -> anyhow::Result<()> {
    let topic = kafka.topic("order");
    let recorded: Vec<i32> = sqlx::query_scalar(
        "SELECT partition FROM keel_process_starts WHERE process = $1 AND topic = $2",
    )
    .bind(NAME)
    .bind(&topic)
    .fetch_all(pool)
    .await?;
    let missing: Vec<TopicPartition> = (0..kafka.partitions)
        .filter(|p| !recorded.contains(p))
        .map(|p| TopicPartition::new(topic.clone(), p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let ends = keel_kafka::end_offsets(kafka, &missing).await?;
    // In one statement: a first run that stops halfway records none.
    sqlx::query(
        "INSERT INTO keel_process_starts (process, topic, partition, start_offset)
         SELECT $1, $2, p, s FROM UNNEST($3::int[], $4::bigint[]) AS u(p, s)
         ON CONFLICT DO NOTHING",
    )
    .bind(NAME)
    .bind(&topic)
    .bind(ends.iter().map(|(at, _)| at.partition).collect::<Vec<_>>())
    .bind(ends.iter().map(|(_, end)| *end).collect::<Vec<_>>())
    .execute(pool)
    .await?;
    Ok(())
}

/// One order the process follows, as loaded for a transaction.
pub(crate) struct Row {
    pub(crate) process: Process,
    topic: String,
    partition: i32,
    correlation_id: Option<String>,
    placed_at: DateTime<Utc>,
    payment_due: DateTime<Utc>,
    deadline_fired: bool,
    step_was: Option<Step>,
    touched: bool,
}

/// A command to send, as the outbox holds it: written by a batch or a settlement, read
/// by the [`sender`].
#[derive(Debug, sqlx::FromRow)]
struct Outgoing {
    /// Its idempotency key, derived from the event that caused it.
    key: String,
    order_id: String,
    /// The order's partition: the unit whose holder sends it.
    topic: String,
    partition: i32,
    path: String,
    body: Value,
    causation_id: String,
    correlation_id: Option<String>,
    /// For a product's reservation or take: which answer the process waits for
    /// ([`RESERVE`], [`TAKE`]).
    product_answer: Option<String>,
    sku: Option<String>,
    /// Times sent without an answer that settles it (0 when written).
    attempts: i32,
}

impl Outgoing {
    /// The partition of the order it is for.
    fn at(&self) -> TopicPartition {
        TopicPartition::new(self.topic.clone(), self.partition)
    }
}

/// The rows of the orders a transaction touches, locked, and the commands it adds.
pub(crate) struct Store {
    generation: i32,
    pub(crate) rows: HashMap<String, Row>,
    outgoing: Vec<Outgoing>,
}

impl Store {
    /// Loads (and locks) the rows of `ids` in `generation`.
    pub(crate) async fn load(
        db: &mut PgConnection,
        generation: i32,
        ids: &[String],
    ) -> Result<Self, sqlx::Error> {
        type Loaded = (
            String,
            Value,
            String,
            i32,
            Option<String>,
            DateTime<Utc>,
            DateTime<Utc>,
            bool,
        );
        let loaded: Vec<Loaded> = sqlx::query_as(&format!(
            "SELECT order_id, state, topic, partition, correlation_id, placed_at, payment_due,
                    deadline_fired
             FROM {} WHERE order_id = ANY($1) ORDER BY order_id COLLATE \"C\" FOR UPDATE",
            table("fulfilment", generation)
        ))
        .bind(ids)
        .fetch_all(&mut *db)
        .await?;
        let mut rows = HashMap::new();
        for (id, state, topic, partition, correlation_id, placed_at, payment_due, fired) in loaded {
            let process: Process = serde_json::from_value(state)
                .map_err(|e| sqlx::Error::Decode(format!("order {id}'s process: {e}").into()))?;
            rows.insert(
                id,
                Row {
                    step_was: Some(process.step),
                    process,
                    topic,
                    partition,
                    correlation_id,
                    placed_at,
                    payment_due,
                    deadline_fired: fired,
                    touched: false,
                },
            );
        }
        Ok(Self {
            generation,
            rows,
            outgoing: Vec::new(),
        })
    }

    fn placed(
        &mut self,
        e: &ProjectedEvent,
        process: Process,
        correlation_id: Option<String>,
        payment_due: DateTime<Utc>,
    ) {
        self.rows.insert(
            e.stream_id().to_owned(),
            Row {
                process,
                topic: e.topic.clone(),
                partition: e.partition,
                correlation_id,
                placed_at: e.recorded_at(),
                payment_due,
                deadline_fired: false,
                step_was: None,
                touched: true,
            },
        );
    }

    /// Marks the deadline of `id` fired.
    pub(crate) fn fired(&mut self, id: &str) {
        if let Some(row) = self.rows.get_mut(id) {
            row.deadline_fired = true;
            row.touched = true;
        }
    }

    /// Records `sends` of order `id` for the outbox, and the order's row as changed.
    pub(crate) fn send(&mut self, id: &str, sends: Vec<Dispatch>) {
        let Some(row) = self.rows.get_mut(id) else {
            return;
        };
        row.touched = true;
        for dispatch in sends {
            let (path, body, product_answer, sku) = route(&dispatch);
            self.outgoing.push(Outgoing {
                key: dispatch.key().to_owned(),
                order_id: id.to_owned(),
                topic: row.topic.clone(),
                partition: row.partition,
                path,
                body,
                causation_id: cause(dispatch.key()).to_owned(),
                correlation_id: row.correlation_id.clone(),
                product_answer: product_answer.map(str::to_owned),
                sku,
                attempts: 0,
            });
        }
    }

    /// Writes the changed rows and the commands to send.
    pub(crate) async fn save(
        self,
        db: &mut PgConnection,
        now: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let (f, o) = (
            table("fulfilment", self.generation),
            table("fulfilment_outbox", self.generation),
        );
        for (id, row) in self.rows.iter().filter(|(_, r)| r.touched) {
            let state =
                serde_json::to_value(&row.process).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            let moved = row.step_was != Some(row.process.step);
            sqlx::query(&format!(
                "INSERT INTO {f} (order_id, topic, partition, step, state, correlation_id,
                    placed_at, payment_due, deadline_fired, step_since, updated_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10)
                 ON CONFLICT (order_id) DO UPDATE SET step = EXCLUDED.step, state = EXCLUDED.state,
                    deadline_fired = EXCLUDED.deadline_fired, updated_at = EXCLUDED.updated_at,
                    step_since = CASE WHEN $11 THEN EXCLUDED.step_since ELSE {f}.step_since END"
            ))
            .bind(id)
            .bind(&row.topic)
            .bind(row.partition)
            .bind(row.process.step.as_str())
            .bind(state)
            .bind(&row.correlation_id)
            .bind(row.placed_at)
            .bind(row.payment_due)
            .bind(row.deadline_fired)
            .bind(now)
            .bind(moved)
            .execute(&mut *db)
            .await?;
        }
        for out in &self.outgoing {
            // A key already there (or sent before and deleted) is the same command: the
            // insert keeps the first.
            sqlx::query(&format!(
                "INSERT INTO {o} (key, order_id, topic, partition, path, body, causation_id,
                    correlation_id, product_answer, sku)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (key) DO NOTHING"
            ))
            .bind(&out.key)
            .bind(&out.order_id)
            .bind(&out.topic)
            .bind(out.partition)
            .bind(&out.path)
            .bind(&out.body)
            .bind(&out.causation_id)
            .bind(&out.correlation_id)
            .bind(&out.product_answer)
            .bind(&out.sku)
            .execute(&mut *db)
            .await?;
        }
        Ok(())
    }
}

/// The id of the event that caused the command keyed `key` (`fulfil:<event id>:…`).
fn cause(key: &str) -> &str {
    key.split(':').nth(1).unwrap_or(key)
}

/// Product answers the process waits for.
pub(crate) const RESERVE: &str = "reserve";
/// The product took the stock out.
pub(crate) const TAKE: &str = "take";

/// The command API path and body of `dispatch`, and which product answer it waits for.
fn route(dispatch: &Dispatch) -> (String, Value, Option<&'static str>, Option<String>) {
    match dispatch {
        Dispatch::Product { sku, command, .. } => {
            let (name, body, answer) = match command {
                ProductCommand::ReserveStock { order_id, quantity } => (
                    "reserve-stock",
                    json!({"order_id": order_id, "quantity": quantity}),
                    Some(RESERVE),
                ),
                ProductCommand::ReleaseStock { order_id } => {
                    ("release-stock", json!({"order_id": order_id}), None)
                }
                ProductCommand::TakeReservedStock { order_id } => (
                    "take-reserved-stock",
                    json!({"order_id": order_id}),
                    Some(TAKE),
                ),
                ProductCommand::ReturnTakenStock { order_id } => {
                    ("return-taken-stock", json!({"order_id": order_id}), None)
                }
                other => unreachable_command(other),
            };
            (
                format!("/v1/products/{}/{name}", encode(sku.as_str())),
                body,
                answer,
                Some(sku.to_string()),
            )
        }
        Dispatch::Order {
            order_id, command, ..
        } => {
            let (name, body) = match command {
                OrderCommand::ConfirmReservation => ("confirm-reservation", json!({})),
                OrderCommand::MarkReadyToShip => ("mark-ready-to-ship", json!({})),
                OrderCommand::CancelOrder { reason } => ("cancel", json!({"reason": reason})),
                OrderCommand::CancelUnpaidOrder { reason } => {
                    ("cancel-unpaid", json!({"reason": reason}))
                }
                other => {
                    let (name, body, _) = unreachable_command(other);
                    (name, body)
                }
            };
            (
                format!("/v1/orders/{}/{name}", encode(order_id.as_str())),
                body,
                None,
                None,
            )
        }
    }
}

/// The process sends no other command; one it did would be a bug, sent as is and refused.
fn unreachable_command<C: std::fmt::Debug>(
    command: &C,
) -> (&'static str, Value, Option<&'static str>) {
    tracing::error!(
        ?command,
        "the fulfilment process made a command it has no route for"
    );
    ("unknown", json!({}), None)
}

/// `id` as one path segment.
fn encode(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Where the fulfilment process's orders are, for `/metrics`: read from PostgreSQL, so
/// every projector process shows the same.
#[derive(Clone, Debug, Default)]
pub struct Gauges {
    /// Per open step: orders in it, and how long the oldest has been (seconds).
    steps: Vec<(String, i64, f64)>,
    /// Orders past their payment deadline by more than a minute, still not cancelled.
    overdue: i64,
    /// Commands waiting to be sent, and the age of the oldest (seconds).
    outbox: (i64, f64),
}

/// How late past its deadline an unpaid order counts as overdue (the deadline's
/// cancellation not carried out).
const OVERDUE_AFTER_SECS: f64 = 60.0;

/// The process's gauges, when it has run on this database.
pub async fn gauges(pool: &PgPool) -> Result<Option<Gauges>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar(
        "SELECT to_regclass('fulfilment') IS NOT NULL AND to_regclass('fulfilment_outbox') IS NOT NULL",
    )
    .fetch_one(pool)
    .await?;
    if !exists {
        return Ok(None);
    }
    let open: Vec<&str> = OPEN_STEPS.iter().map(|s| s.as_str()).collect();
    let mut steps: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT step, count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(step_since))::float8, 0)
         FROM fulfilment WHERE step = ANY($1) GROUP BY step",
    )
    .bind(&open)
    .fetch_all(pool)
    .await?;
    // Every open step, at zero when no order is in it.
    for step in &open {
        if !steps.iter().any(|(s, _, _)| s == step) {
            steps.push(((*step).to_owned(), 0, 0.0));
        }
    }
    steps.sort_by(|a, b| a.0.cmp(&b.0));
    let overdue: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM fulfilment
         WHERE step IN ('reserving', 'confirming', 'awaiting_payment')
           AND payment_due < now() - make_interval(secs => $1)
           AND state->>'paid_event' IS NULL",
    )
    .bind(OVERDUE_AFTER_SECS)
    .fetch_one(pool)
    .await?;
    let outbox: (i64, f64) = sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM fulfilment_outbox",
    )
    .fetch_one(pool)
    .await?;
    Ok(Some(Gauges {
        steps,
        overdue,
        outbox,
    }))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct StepLabels {
    step: String,
}

impl Gauges {
    /// Writes the gauges (`keel_fulfilment_…`).
    pub(crate) fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::gauge::ConstGauge;
        let mut orders = encoder.encode_descriptor(
            "fulfilment_orders",
            "Orders the fulfilment process has in each step it is still working on",
            None,
            MetricType::Gauge,
        )?;
        for (step, count, _) in &self.steps {
            ConstGauge::new(*count)
                .encode(orders.encode_family(&StepLabels { step: step.clone() })?)?;
        }
        let mut oldest = encoder.encode_descriptor(
            "fulfilment_step_oldest_seconds",
            "How long the order longest in each step has been there (0 when none is)",
            None,
            MetricType::Gauge,
        )?;
        for (step, _, age) in &self.steps {
            ConstGauge::new(*age)
                .encode(oldest.encode_family(&StepLabels { step: step.clone() })?)?;
        }
        ConstGauge::new(self.overdue).encode(encoder.encode_descriptor(
            "fulfilment_overdue_orders",
            "Unpaid orders more than a minute past their payment deadline and not cancelled",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.outbox.0).encode(encoder.encode_descriptor(
            "fulfilment_outbox_commands",
            "Commands the fulfilment process has decided and not yet had answered",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(self.outbox.1).encode(encoder.encode_descriptor(
            "fulfilment_outbox_oldest_seconds",
            "The age of the oldest command waiting to be sent or answered (0 when none)",
            None,
            MetricType::Gauge,
        )?)?;
        Ok(())
    }
}

/// `sku` parsed, for an answer.
pub(crate) fn sku(sku: &str) -> Option<Sku> {
    Sku::parse(sku).ok()
}
