use async_trait::async_trait;
use keel_domain::order::OrderEvent;
use keel_views::ProjectionSpec;
use sqlx::PgConnection;

use crate::projection::{AnyEvent, ProjectedEvent, Projection, execute_script, table};

/// Payments of this many minor units (10,000.00) or more are flagged for review.
pub const FLAG_THRESHOLD_MINOR: i64 = 1_000_000;

/// Payments at or above the threshold, for review.
pub struct FlaggedPayments;

#[async_trait]
impl Projection for FlaggedPayments {
    fn spec(&self) -> &'static ProjectionSpec {
        &keel_views::FLAGGED_PAYMENTS
    }

    async fn create(&self, db: &mut PgConnection, generation: i32) -> Result<(), sqlx::Error> {
        let t = table("flagged_payments", generation);
        execute_script(db, &format!(
            "CREATE TABLE IF NOT EXISTS {t} (order_id text NOT NULL, payment_ref text NOT NULL,
                amount_minor bigint NOT NULL, currency text NOT NULL, recorded_at timestamptz NOT NULL,
                event_id uuid NOT NULL, PRIMARY KEY (order_id, payment_ref))"
        ))
        .await
    }

    fn indexes(&self, generation: i32) -> Vec<String> {
        let t = table("flagged_payments", generation);
        vec![format!(
            "CREATE INDEX IF NOT EXISTS {t}_recorded ON {t} (recorded_at, order_id, payment_ref)"
        )]
    }

    async fn apply(
        &self,
        db: &mut PgConnection,
        generation: i32,
        events: &[ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let flagged: Vec<(&ProjectedEvent, i64, String, String)> = events
            .iter()
            .filter_map(|e| match &e.event {
                AnyEvent::Order(OrderEvent::PaymentRecorded {
                    amount,
                    payment_ref,
                }) if amount.amount_minor() >= FLAG_THRESHOLD_MINOR => Some((
                    e,
                    amount.amount_minor(),
                    amount.currency().to_string(),
                    payment_ref.to_string(),
                )),
                _ => None,
            })
            .collect();
        if flagged.is_empty() {
            return Ok(());
        }
        let t = table("flagged_payments", generation);
        sqlx::query(&format!(
            "INSERT INTO {t} SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[],
                $5::timestamptz[], $6::uuid[])"
        ))
        .bind(
            flagged
                .iter()
                .map(|f| f.0.stream_id().to_owned())
                .collect::<Vec<_>>(),
        )
        .bind(flagged.iter().map(|f| f.3.clone()).collect::<Vec<_>>())
        .bind(flagged.iter().map(|f| f.1).collect::<Vec<_>>())
        .bind(flagged.iter().map(|f| f.2.clone()).collect::<Vec<_>>())
        .bind(
            flagged
                .iter()
                .map(|f| f.0.recorded_at())
                .collect::<Vec<_>>(),
        )
        .bind(
            flagged
                .iter()
                .map(|f| f.0.envelope().event_id)
                .collect::<Vec<_>>(),
        )
        .execute(db)
        .await?;
        Ok(())
    }
}
