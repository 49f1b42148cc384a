//! The shop's read models.

mod audit_log;
mod customers;
mod daily_sales;
mod flagged_payments;
mod orders;
mod products;

use std::sync::Arc;

pub use audit_log::AuditLog;
pub use customers::Customers;
pub use daily_sales::DailySales;
pub use flagged_payments::{FLAG_THRESHOLD_MINOR, FlaggedPayments};
pub use orders::Orders;
pub use products::Products;

use crate::projection::Projection;

/// Every projection of the shop.
pub fn all() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(Orders),
        Arc::new(Products),
        Arc::new(Customers),
        Arc::new(DailySales),
        Arc::new(FlaggedPayments),
        Arc::new(AuditLog),
    ]
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use std::sync::Arc;

    use keel_domain::money::MAX_AMOUNT_MINOR;
    use keel_domain::order::OrderEvent;
    use keel_schemas::testing;
    use serde_json::json;

    use crate::projection::{AnyEvent, ProjectedEvent, table};

    /// `event` as the one event of a commit on `stream`, at `offset`.
    fn event(stream: (&str, &str), offset: i64, event: OrderEvent) -> ProjectedEvent {
        let payload = serde_json::to_value(&event).unwrap()["payload"].clone();
        let commit = testing::commit(
            &testing::writer("w", 1),
            testing::stream(stream.0, stream.1),
            0,
        )
        .event("Test", 1, payload)
        .build();
        ProjectedEvent {
            topic: "order".into(),
            partition: 0,
            offset,
            index: 0,
            commit: Arc::new(commit),
            event: AnyEvent::Order(event),
        }
    }

    fn order_event(value: serde_json::Value) -> OrderEvent {
        serde_json::from_value(value).unwrap()
    }

    /// Sums over many events of the largest amounts stay exact where `bigint` and `i64`
    /// would overflow (about 9,224 of them do): ten thousand orders of the largest total
    /// on one day, and a customer paid that much ten thousand times.
    #[tokio::test]
    async fn sums_at_the_largest_amounts_do_not_overflow() {
        let (_db, pool) = crate::testing::database("sums").await;
        let money = json!({"amount_minor": MAX_AMOUNT_MINOR, "currency": "EUR"});
        let orders = 10_000;
        let placed: Vec<ProjectedEvent> = (0..orders)
            .map(|i| {
                let placed = order_event(json!({"type": "OrderPlaced", "payload": {
                    "customer_id": "c-1",
                    "lines": [{"sku": "GOLD", "quantity": 1000, "unit_price": money}],
                    "total": money,
                }}));
                event(("order", &format!("o-{i}")), i, placed)
            })
            .collect();
        let paid: Vec<ProjectedEvent> = (0..orders)
            .map(|i| {
                let payment = order_event(json!({"type": "PaymentRecorded", "payload": {
                    "amount": money, "payment_ref": format!("p-{i}"),
                }}));
                event(("order", &format!("o-{i}")), orders + i, payment)
            })
            .collect();
        let mut tx = pool.begin().await.unwrap();
        for projection in [
            &super::DailySales as &dyn crate::projection::Projection,
            &super::Customers,
        ] {
            projection.create(&mut tx, 1).await.unwrap();
            // Two batches, so the database's sum is exercised as well as the batch's.
            for half in placed.chunks(orders as usize / 2) {
                projection.apply(&mut tx, 1, half).await.unwrap();
            }
            for half in paid.chunks(orders as usize / 2) {
                projection.apply(&mut tx, 1, half).await.unwrap();
            }
        }
        let expected = i128::from(MAX_AMOUNT_MINOR) * i128::from(orders);
        assert!(expected > i128::from(i64::MAX), "the test goes past bigint");
        let (count, items, revenue): (i64, String, String) = sqlx::query_as(&format!(
            "SELECT orders_placed, items::text, revenue_minor::text FROM {}",
            table("daily_sales", 1)
        ))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(
            (count, items, revenue),
            (orders, (1000 * orders).to_string(), expected.to_string())
        );
        let value: String = sqlx::query_scalar(&format!(
            "SELECT (lifetime_value->'EUR')::text FROM {} WHERE customer_id = 'c-1'",
            table("customers", 1)
        ))
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(value, expected.to_string());
        tx.rollback().await.unwrap();
        pool.close().await;
    }

    /// `event` of product `sku` at `offset`.
    fn product_event(sku: &str, offset: i64, value: serde_json::Value) -> ProjectedEvent {
        let event: keel_domain::product::ProductEvent = serde_json::from_value(value).unwrap();
        let payload = serde_json::to_value(&event).unwrap()["payload"].clone();
        let commit = testing::commit(&testing::writer("w", 1), testing::stream("product", sku), 0)
            .event("Test", 1, payload)
            .build();
        ProjectedEvent {
            topic: "product".into(),
            partition: 0,
            offset,
            index: 0,
            commit: Arc::new(commit),
            event: AnyEvent::Product(event),
        }
    }

    /// Stock reserved, taken out for a paid order, and returned after it was cancelled:
    /// the view's stock on hand and reserved follow.
    #[tokio::test]
    async fn the_products_view_follows_stock_taken_out_and_returned() {
        let (_db, pool) = crate::testing::database("products-stock").await;
        let order = |kind: &str, quantity: u64| json!({"type": kind, "payload": {"order_id": "o-1", "quantity": quantity}});
        let events = [
            json!({"type": "ProductRegistered", "payload": {"name": "Mug",
                   "price": {"amount_minor": 1299, "currency": "EUR"}}}),
            json!({"type": "ProductRestocked", "payload": {"quantity": 5}}),
            order("StockReserved", 3),
            order("ReservedStockTaken", 3),
            order("TakenStockReturned", 3),
        ];
        let mut tx = pool.begin().await.unwrap();
        let products = super::Products;
        crate::projection::Projection::create(&products, &mut tx, 1)
            .await
            .unwrap();
        let mut seen = Vec::new();
        for (offset, e) in events.into_iter().enumerate() {
            let batch = [product_event("MUG-1", offset as i64, e)];
            crate::projection::Projection::apply(&products, &mut tx, 1, &batch)
                .await
                .unwrap();
            let row: (i64, i64) = sqlx::query_as(&format!(
                "SELECT on_hand, reserved FROM {} WHERE sku = 'MUG-1'",
                table("products", 1)
            ))
            .fetch_one(&mut *tx)
            .await
            .unwrap();
            seen.push(row);
        }
        assert_eq!(seen, [(0, 0), (5, 0), (5, 3), (2, 0), (5, 0)]);
        tx.rollback().await.unwrap();
        pool.close().await;
    }

    #[test]
    fn every_projection_of_the_read_contract_is_implemented_once() {
        let names: Vec<&str> = super::all().iter().map(|p| p.name()).collect();
        let contract: Vec<&str> = keel_views::PROJECTIONS.iter().map(|p| p.name).collect();
        assert_eq!(names, contract);
    }
}
