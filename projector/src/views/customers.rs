use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keel_domain::customer::CustomerEvent;
use keel_domain::order::OrderEvent;
use keel_views::ProjectionSpec;
use sqlx::PgConnection;

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

/// Customers: profile, number of orders, and lifetime value (payments minus refunds, per
/// currency). Reads the customer and the order topics; orders may arrive before the
/// customer's registration, so a row can exist with no profile yet.
pub struct Customers;

#[derive(Clone, Debug, sqlx::FromRow)]
struct Row {
    customer_id: String,
    email: Option<String>,
    name: Option<String>,
    order_count: i64,
    /// The lifetime value per currency as JSON text, read and written as text so that
    /// amounts past `i64` stay exact (PostgreSQL keeps JSON numbers as `numeric`).
    lifetime_value: String,
    updated_at: DateTime<Utc>,
    version: i64,
}

impl Row {
    fn new(customer_id: &str, at: DateTime<Utc>) -> Self {
        Self {
            customer_id: customer_id.to_owned(),
            email: None,
            name: None,
            order_count: 0,
            lifetime_value: "{}".to_owned(),
            updated_at: at,
            version: 0,
        }
    }

    /// Adds `minor` to the value in `currency`, exactly: a sum past `i128` or a value
    /// that does not read back is an error that stops the projection, never a wrong sum.
    fn add_value(&mut self, currency: &str, minor: i64) -> Result<(), sqlx::Error> {
        let broken = |what: String| {
            sqlx::Error::Encode(format!("customers: {}: {what}", self.customer_id).into())
        };
        let mut values: BTreeMap<String, i128> = serde_json::from_str(&self.lifetime_value)
            .map_err(|e| broken(format!("lifetime value unreadable: {e}")))?;
        let value = values.entry(currency.to_owned()).or_default();
        *value = value
            .checked_add(i128::from(minor))
            .ok_or_else(|| broken(format!("lifetime value in {currency} overflows")))?;
        self.lifetime_value = serde_json::to_string(&values)
            .map_err(|e| broken(format!("lifetime value unwritable: {e}")))?;
        Ok(())
    }
}

#[async_trait]
impl Projection for Customers {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::CUSTOMERS
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let (t, o) = (
            table("customers", generation),
            table("customer_orders", generation),
        );
        execute_script(db, &format!(
            "CREATE TABLE IF NOT EXISTS {t} (customer_id text PRIMARY KEY, email text, name text,
                order_count bigint NOT NULL, lifetime_value jsonb NOT NULL, updated_at timestamptz NOT NULL,
                version bigint NOT NULL);
             CREATE TABLE IF NOT EXISTS {o} (order_id text PRIMARY KEY, customer_id text NOT NULL);"
        ))
        .await
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let (t, o) = (
            table("customers", generation),
            table("customer_orders", generation),
        );
        // Which customer each order belongs to: placed in this batch, or known already.
        let mut owner_of: HashMap<String, String> = HashMap::new();
        let mut new_links: Vec<(String, String)> = Vec::new();
        let mut lookup: Vec<String> = Vec::new();
        for e in events {
            match &e.event {
                AnyEvent::Order(OrderEvent::OrderPlaced { customer_id, .. }) => {
                    owner_of.insert(e.stream_id().to_owned(), customer_id.to_string());
                    new_links.push((e.stream_id().to_owned(), customer_id.to_string()));
                }
                AnyEvent::Order(_) if !owner_of.contains_key(e.stream_id()) => {
                    lookup.push(e.stream_id().to_owned())
                }
                _ => {}
            }
        }
        if !lookup.is_empty() {
            let known: Vec<(String, String)> = sqlx::query_as(&format!(
                "SELECT order_id, customer_id FROM {o} WHERE order_id = ANY($1)"
            ))
            .bind(&lookup)
            .fetch_all(&mut *db)
            .await?;
            owner_of.extend(known);
        }
        let customer_of = |e: &ProjectedEvent| -> Option<String> {
            match &e.event {
                AnyEvent::Customer(_) => Some(e.stream_id().to_owned()),
                AnyEvent::Order(_) => owner_of.get(e.stream_id()).cloned(),
                AnyEvent::Product(_) => None,
            }
        };
        let ids: Vec<String> = events.iter().filter_map(&customer_of).collect();
        lock_customers(db, generation, &ids).await?;
        let mut rows: HashMap<String, Row> = sqlx::query_as::<_, Row>(&format!(
            "SELECT customer_id, email, name, order_count, lifetime_value::text AS lifetime_value,
                    updated_at, version FROM {t} WHERE customer_id = ANY($1)"
        ))
        .bind(&ids)
        .fetch_all(&mut *db)
        .await?
        .into_iter()
        .map(|r| (r.customer_id.clone(), r))
        .collect();
        let mut touched = Vec::new();
        for e in events {
            let Some(id) = customer_of(e) else { continue };
            let at = e.recorded_at();
            let row = rows.entry(id.clone()).or_insert_with(|| Row::new(&id, at));
            match &e.event {
                AnyEvent::Customer(CustomerEvent::CustomerRegistered { email, name }) => {
                    row.email = Some(email.to_string());
                    row.name = Some(name.to_string());
                    row.version = e.version();
                }
                AnyEvent::Customer(CustomerEvent::CustomerEmailChanged { email }) => {
                    row.email = Some(email.to_string());
                    row.version = e.version();
                }
                AnyEvent::Order(OrderEvent::OrderPlaced { .. }) => row.order_count += 1,
                AnyEvent::Order(OrderEvent::PaymentRecorded { amount, .. }) => {
                    row.add_value(amount.currency().as_str(), amount.amount_minor())?;
                }
                AnyEvent::Order(OrderEvent::RefundIssued { amount }) => {
                    row.add_value(amount.currency().as_str(), -amount.amount_minor())?;
                }
                _ => continue,
            }
            // The latest event's time whatever the order: units of the customer and order
            // topics apply concurrently.
            row.updated_at = row.updated_at.max(at);
            touched.push(id);
        }
        if !new_links.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO {o} SELECT * FROM UNNEST($1::text[], $2::text[])"
            ))
            .bind(new_links.iter().map(|l| l.0.clone()).collect::<Vec<_>>())
            .bind(new_links.iter().map(|l| l.1.clone()).collect::<Vec<_>>())
            .execute(&mut *db)
            .await?;
        }
        touched.sort();
        touched.dedup();
        if touched.is_empty() {
            return Ok(());
        }
        let rows: Vec<&Row> = touched.iter().filter_map(|id| rows.get(id)).collect();
        sqlx::query(&format!(
            "INSERT INTO {t} SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[]::jsonb[],
                $6::timestamptz[], $7::bigint[])
             ON CONFLICT (customer_id) DO UPDATE SET email = EXCLUDED.email, name = EXCLUDED.name,
                order_count = EXCLUDED.order_count, lifetime_value = EXCLUDED.lifetime_value,
                updated_at = EXCLUDED.updated_at, version = EXCLUDED.version"
        ))
        .bind(rows.iter().map(|r| r.customer_id.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.email.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.name.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.order_count).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.lifetime_value.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.updated_at).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.version).collect::<Vec<_>>())
        .execute(db)
        .await?;
        Ok(())
    }
}

/// Locks `ids` against the batches of other units (a customer's row is fed by the customer
/// topic and every partition of the order topic, applied concurrently by several
/// processes): one transaction lock per customer, taken in the order of their keys, so
/// that two batches never wait for each other in a circle. The rows are read, changed and
/// written whole, so without it two batches would each add to what they read and one
/// addition would be lost. A row that does not exist yet is covered too, which a row lock
/// would not do.
async fn lock_customers(
    db: &mut PgConnection,
    generation: i32,
    ids: &[String],
) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<i32> = ids.iter().map(|id| lock_key(id.as_bytes())).collect();
    keys.sort_unstable();
    keys.dedup();
    // The two-key form: its locks never meet the one-key locks of the projection itself.
    sqlx::query("SELECT pg_advisory_xact_lock($1, k) FROM UNNEST($2::int[]) AS k")
        .bind(lock_key(table("customers", generation).as_bytes()))
        .bind(&keys)
        .execute(db)
        .await?;
    Ok(())
}

/// A 32-bit FNV-1a hash: the same in every process and build. Two customers that share a
/// key only wait for each other.
fn lock_key(bytes: &[u8]) -> i32 {
    let hash = bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    });
    i32::from_ne_bytes(hash.to_ne_bytes())
}
