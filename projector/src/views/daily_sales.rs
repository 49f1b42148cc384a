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
pub struct DailySales;

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
                orders_placed bigint NOT NULL, items bigint NOT NULL, revenue_minor bigint NOT NULL,
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
        let mut sums: BTreeMap<(NaiveDate, String), (i64, i64, i64)> = BTreeMap::new();
        for e in events {
            if let AnyEvent::Order(OrderEvent::OrderPlaced { lines, total, .. }) = &e.event {
                let entry = sums
                    .entry((e.recorded_at().date_naive(), total.currency().to_string()))
                    .or_default();
                entry.0 += 1;
                entry.1 += lines.iter().map(|l| l.quantity.get() as i64).sum::<i64>();
                entry.2 += total.amount_minor();
            }
        }
        if sums.is_empty() {
            return Ok(());
        }
        let t = table("daily_sales", generation);
        sqlx::query(&format!(
            "INSERT INTO {t} SELECT * FROM UNNEST($1::date[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[])
             ON CONFLICT (day, currency) DO UPDATE SET orders_placed = {t}.orders_placed + EXCLUDED.orders_placed,
                items = {t}.items + EXCLUDED.items, revenue_minor = {t}.revenue_minor + EXCLUDED.revenue_minor"
        ))
        .bind(sums.keys().map(|k| k.0).collect::<Vec<_>>())
        .bind(sums.keys().map(|k| k.1.clone()).collect::<Vec<_>>())
        .bind(sums.values().map(|v| v.0).collect::<Vec<_>>())
        .bind(sums.values().map(|v| v.1).collect::<Vec<_>>())
        .bind(sums.values().map(|v| v.2).collect::<Vec<_>>())
        .execute(db)
        .await?;
        Ok(())
    }
}
