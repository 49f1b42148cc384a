use std::collections::BTreeMap;

use async_trait::async_trait;
use chrono::NaiveDate;
use keel_domain::order::OrderEvent;
use keel_views::ProjectionSpec;
use sqlx::PgConnection;

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

/// Sales per day (UTC, by the order's recorded time) and currency: orders placed, items,
/// revenue. Built by increments, so a batch applied twice would show: the proof of
/// exactly-once.
///
/// Items and revenue are `numeric`, exact and without a ceiling: a day of ten orders of
/// the largest amount an order may carry is already more than a `bigint` holds. A batch is
/// summed in `i128` with checked arithmetic.
pub struct DailySales;

/// One day's and currency's increments within a batch.
#[derive(Default)]
struct Sums {
    orders: i64,
    items: i128,
    revenue: i128,
}

impl Sums {
    fn add(&mut self, items: i128, revenue: i128) -> Option<()> {
        self.orders = self.orders.checked_add(1)?;
        self.items = self.items.checked_add(items)?;
        self.revenue = self.revenue.checked_add(revenue)?;
        Some(())
    }
}

#[async_trait]
impl Projection for DailySales {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::DAILY_SALES
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let t = table("daily_sales", generation);
        execute_script(
            db,
            &format!(
                "CREATE TABLE IF NOT EXISTS {t} (day date NOT NULL, currency text NOT NULL,
                orders_placed bigint NOT NULL, items numeric NOT NULL, revenue_minor numeric NOT NULL,
                PRIMARY KEY (day, currency))"
            ),
        )
        .await
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let mut sums: BTreeMap<(NaiveDate, String), Sums> = BTreeMap::new();
        for e in events {
            if let AnyEvent::Order(OrderEvent::OrderPlaced { lines, total, .. }) = &e.event {
                let items: i128 = lines.iter().map(|l| i128::from(l.quantity.get())).sum();
                sums.entry((e.recorded_at().date_naive(), total.currency().to_string()))
                    .or_default()
                    .add(items, i128::from(total.amount_minor()))
                    .ok_or_else(|| overflow(e))?;
            }
        }
        if sums.is_empty() {
            return Ok(());
        }
        let t = table("daily_sales", generation);
        sqlx::query(&format!(
            "INSERT INTO {t} SELECT * FROM UNNEST($1::date[], $2::text[], $3::bigint[], $4::text[]::numeric[],
                $5::text[]::numeric[])
             ON CONFLICT (day, currency) DO UPDATE SET orders_placed = {t}.orders_placed + EXCLUDED.orders_placed,
                items = {t}.items + EXCLUDED.items, revenue_minor = {t}.revenue_minor + EXCLUDED.revenue_minor"
        ))
        .bind(sums.keys().map(|k| k.0).collect::<Vec<_>>())
        .bind(sums.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(sums.values().map(|v| v.orders).collect::<Vec<_>>())
        .bind(sums.values().map(|v| v.items.to_string()).collect::<Vec<_>>())
        .bind(sums.values().map(|v| v.revenue.to_string()).collect::<Vec<_>>())
        .execute(db)
        .await?;
        Ok(())
    }
}

/// A batch's sum past `i128`: the projection stops (an encode error halts it) rather than
/// store a wrong sum.
fn overflow(e: &ProjectedEvent) -> sqlx::Error {
    sqlx::Error::Encode(
        format!(
            "daily_sales: a batch's sum overflows at {}/{} offset {}",
            e.topic, e.partition, e.offset
        )
        .into(),
    )
}
