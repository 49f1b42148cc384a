use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_domain::order::{OrderEvent, OrderStatus};
use keel_views::ProjectionSpec;
use serde_json::Value;
use sqlx::PgConnection;

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

/// Orders: summary, status, totals, amount paid, lines, timestamps, version, and where the
/// fulfilment process brought them.
pub struct Orders;

/// `fulfilment` once the order's stock is reserved.
const FULFILMENT_RESERVED: &str = "reserved";
/// `fulfilment` once its stock is taken out and it may ship.
const FULFILMENT_READY: &str = "ready_to_ship";

#[derive(Clone, Debug, sqlx::FromRow)]
struct Row {
    order_id: String,
    customer_id: String,
    status: String,
    currency: String,
    total_minor: i64,
    paid_minor: i64,
    refunded_minor: i64,
    item_count: i64,
    lines: Value,
    carrier: Option<String>,
    tracking: Option<String>,
    placed_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    version: i64,
    fulfilment: Option<String>,
}

#[async_trait]
impl Projection for Orders {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::ORDERS
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let t = table("orders", generation);
        execute_script(db, &format!(
            r#"CREATE TABLE IF NOT EXISTS {t} (
                order_id text PRIMARY KEY, customer_id text NOT NULL, status text NOT NULL,
                currency text NOT NULL, total_minor bigint NOT NULL, paid_minor bigint NOT NULL,
                refunded_minor bigint NOT NULL, item_count bigint NOT NULL, lines jsonb NOT NULL,
                carrier text, tracking text, placed_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
                version bigint NOT NULL, fulfilment text);"#
        ))
        .await
    }

    fn indexes(&self, generation: i32) -> Vec<String> {
        let t = table("orders", generation);
        vec![
            format!("CREATE INDEX IF NOT EXISTS {t}_customer ON {t} (customer_id, order_id)"),
            format!("CREATE INDEX IF NOT EXISTS {t}_status ON {t} (status, order_id)"),
        ]
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let t = table("orders", generation);
        // Only orders placed before this batch need their rows read: an order placed in it
        // starts from its OrderPlaced event (which is every order during a catch-up).
        let mut placed_here = std::collections::HashSet::new();
        let mut ids: Vec<String> = Vec::new();
        for e in events {
            let id = e.stream_id();
            if let AnyEvent::Order(OrderEvent::OrderPlaced { .. }) = &e.event {
                placed_here.insert(id);
            } else if !placed_here.contains(id) {
                ids.push(id.to_owned());
            }
        }
        ids.sort();
        ids.dedup();
        let mut rows: HashMap<String, Row> = if ids.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as::<_, Row>(&format!("SELECT * FROM {t} WHERE order_id = ANY($1)"))
                .bind(&ids)
                .fetch_all(&mut *db)
                .await?
                .into_iter()
                .map(|r| (r.order_id.clone(), r))
                .collect()
        };
        let mut touched = Vec::new();
        for e in events {
            let AnyEvent::Order(event) = &e.event else {
                continue;
            };
            let id = e.stream_id();
            let at = e.recorded_at();
            if let OrderEvent::OrderPlaced {
                customer_id,
                lines,
                total,
            } = event
            {
                rows.insert(
                    id.to_owned(),
                    Row {
                        order_id: id.to_owned(),
                        customer_id: customer_id.to_string(),
                        status: OrderStatus::Placed.as_str().to_owned(),
                        currency: total.currency().to_string(),
                        total_minor: total.amount_minor(),
                        paid_minor: 0,
                        refunded_minor: 0,
                        item_count: lines.iter().map(|l| l.quantity.get() as i64).sum(),
                        lines: serde_json::to_value(lines).unwrap_or(Value::Null),
                        carrier: None,
                        tracking: None,
                        placed_at: at,
                        updated_at: at,
                        version: e.version(),
                        fulfilment: None,
                    },
                );
            } else if let Some(row) = rows.get_mut(id) {
                match event {
                    OrderEvent::OrderPlaced { .. } => {}
                    OrderEvent::PaymentRecorded { amount, .. } => {
                        row.paid_minor += amount.amount_minor()
                    }
                    OrderEvent::OrderPaid { .. } => {
                        row.status = OrderStatus::Paid.as_str().to_owned()
                    }
                    OrderEvent::OrderShipped { carrier, tracking } => {
                        row.status = OrderStatus::Shipped.as_str().to_owned();
                        row.carrier = Some(carrier.to_string());
                        row.tracking = Some(tracking.to_string());
                    }
                    OrderEvent::OrderCancelled { .. } => {
                        row.status = OrderStatus::Cancelled.as_str().to_owned()
                    }
                    OrderEvent::RefundIssued { amount } => {
                        row.refunded_minor += amount.amount_minor()
                    }
                    // Where the fulfilment process has brought the order (none for an
                    // order it never reserved: placed before it ran, or cancelled first).
                    OrderEvent::OrderStockReserved {} => {
                        row.fulfilment = Some(FULFILMENT_RESERVED.to_owned())
                    }
                    OrderEvent::OrderReadyToShip {} => {
                        row.fulfilment = Some(FULFILMENT_READY.to_owned())
                    }
                }
                row.updated_at = at;
                row.version = e.version();
            } else {
                continue;
            }
            touched.push(id.to_owned());
        }
        touched.sort();
        touched.dedup();
        if touched.is_empty() {
            return Ok(());
        }
        let rows: Vec<&Row> = touched.iter().filter_map(|id| rows.get(id)).collect();
        sqlx::query(&format!(
            r#"INSERT INTO {t} SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[],
                $6::bigint[], $7::bigint[], $8::bigint[], $9::jsonb[], $10::text[], $11::text[], $12::timestamptz[],
                $13::timestamptz[], $14::bigint[], $15::text[])
            ON CONFLICT (order_id) DO UPDATE SET customer_id = EXCLUDED.customer_id, status = EXCLUDED.status,
                currency = EXCLUDED.currency, total_minor = EXCLUDED.total_minor, paid_minor = EXCLUDED.paid_minor,
                refunded_minor = EXCLUDED.refunded_minor, item_count = EXCLUDED.item_count, lines = EXCLUDED.lines,
                carrier = EXCLUDED.carrier, tracking = EXCLUDED.tracking, placed_at = EXCLUDED.placed_at,
                updated_at = EXCLUDED.updated_at, version = EXCLUDED.version,
                fulfilment = EXCLUDED.fulfilment"#
        ))
        .bind(rows.iter().map(|r| r.order_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.customer_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.currency.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.total_minor).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.paid_minor).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.refunded_minor).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.item_count).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.lines.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.carrier.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.tracking.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.placed_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.fulfilment.clone()).collect::<Vec<_>>())
        .execute(db)
        .await?;
        Ok(())
    }
}
