use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_domain::product::ProductEvent;
use keel_views::ProjectionSpec;
use serde_json::Value;
use sqlx::PgConnection;

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

/// The catalogue: name, price, stock on hand, reserved, status.
pub struct Products;

#[derive(Clone, Debug, sqlx::FromRow)]
struct Row {
    sku: String,
    name: String,
    price_minor: i64,
    currency: String,
    on_hand: i64,
    reserved: i64,
    reservations: Value,
    status: String,
    updated_at: DateTime<Utc>,
    version: i64,
}

#[async_trait]
impl Projection for Products {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::PRODUCTS
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let t = table("products", generation);
        execute_script(db, &format!(
            r#"CREATE TABLE IF NOT EXISTS {t} (
                sku text PRIMARY KEY, name text NOT NULL, price_minor bigint NOT NULL, currency text NOT NULL,
                on_hand bigint NOT NULL, reserved bigint NOT NULL, reservations jsonb NOT NULL,
                status text NOT NULL, updated_at timestamptz NOT NULL, version bigint NOT NULL);"#
        ))
        .await
    }

    fn indexes(&self, generation: i32) -> Vec<String> {
        let t = table("products", generation);
        vec![format!(
            "CREATE INDEX IF NOT EXISTS {t}_status ON {t} (status, sku)"
        )]
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let t = table("products", generation);
        let ids: Vec<String> = events.iter().map(|e| e.stream_id().to_owned()).collect();
        let mut rows: HashMap<String, Row> =
            sqlx::query_as::<_, Row>(&format!("SELECT * FROM {t} WHERE sku = ANY($1)"))
                .bind(&ids)
                .fetch_all(&mut *db)
                .await?
                .into_iter()
                .map(|r| (r.sku.clone(), r))
                .collect();
        let mut touched = Vec::new();
        for e in events {
            let AnyEvent::Product(event) = &e.event else {
                continue;
            };
            let id = e.stream_id();
            if let ProductEvent::ProductRegistered { name, price } = event {
                rows.insert(
                    id.to_owned(),
                    Row {
                        sku: id.to_owned(),
                        name: name.to_string(),
                        price_minor: price.amount_minor(),
                        currency: price.currency().to_string(),
                        on_hand: 0,
                        reserved: 0,
                        reservations: Value::Object(Default::default()),
                        status: keel_views::PRODUCT_ACTIVE.into(),
                        updated_at: e.recorded_at(),
                        version: e.version(),
                    },
                );
            } else if let Some(row) = rows.get_mut(id) {
                let mut reservations: BTreeMap<String, i64> =
                    serde_json::from_value(row.reservations.clone()).unwrap_or_default();
                match event {
                    ProductEvent::ProductRegistered { .. } => {}
                    ProductEvent::ProductPriceChanged { price } => {
                        row.price_minor = price.amount_minor();
                        row.currency = price.currency().to_string();
                    }
                    ProductEvent::ProductRestocked { quantity } => {
                        row.on_hand += quantity.get() as i64
                    }
                    ProductEvent::StockReserved { order_id, quantity } => {
                        reservations.insert(order_id.to_string(), quantity.get() as i64);
                    }
                    ProductEvent::StockReleased { order_id, .. } => {
                        reservations.remove(order_id.as_str());
                    }
                    ProductEvent::ReservedStockTaken { order_id, quantity } => {
                        reservations.remove(order_id.as_str());
                        row.on_hand -= quantity.get() as i64;
                    }
                    ProductEvent::TakenStockReturned { quantity, .. } => {
                        row.on_hand += quantity.get() as i64
                    }
                    ProductEvent::ProductDiscontinued {} => {
                        row.status = keel_views::PRODUCT_DISCONTINUED.into()
                    }
                }
                row.reserved = reservations.values().sum();
                row.reservations = serde_json::to_value(reservations).unwrap_or(Value::Null);
                row.updated_at = e.recorded_at();
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
            r#"INSERT INTO {t} SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[],
                $6::bigint[], $7::jsonb[], $8::text[], $9::timestamptz[], $10::bigint[])
            ON CONFLICT (sku) DO UPDATE SET name = EXCLUDED.name, price_minor = EXCLUDED.price_minor,
                currency = EXCLUDED.currency, on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved,
                reservations = EXCLUDED.reservations, status = EXCLUDED.status, updated_at = EXCLUDED.updated_at,
                version = EXCLUDED.version"#
        ))
        .bind(rows.iter().map(|r| r.sku.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.price_minor).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.currency.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.on_hand).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reserved).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.reservations.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.status.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .execute(db)
        .await?;
        Ok(())
    }
}
