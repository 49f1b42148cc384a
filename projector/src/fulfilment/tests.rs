#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use keel_domain::order::OrderEvent;
use keel_schemas::{TopicPartition, testing};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::sender::{Sender, SenderSettings};
use super::{Fulfilment, NAME};
use crate::projection::{AnyEvent, ProjectedEvent, Projection};
use crate::units::Unit;

const TOPIC: &str = "t.order";

/// `OrderPlaced` of `id` with `lines` (sku, quantity), at `offset` of partition 0.
fn placed(id: &str, offset: i64, lines: &[(&str, u64)]) -> ProjectedEvent {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(sku, q)| json!({"sku": sku, "quantity": q, "unit_price": {"amount_minor": 100, "currency": "EUR"}}))
        .collect();
    let payload = json!({"customer_id": "c-1", "lines": lines,
        "total": {"amount_minor": 100, "currency": "EUR"}});
    let event: OrderEvent =
        serde_json::from_value(json!({"type": "OrderPlaced", "payload": payload})).unwrap();
    let commit = testing::commit(&testing::writer("w", 1), testing::stream("order", id), 0)
        .event("OrderPlaced", 2, payload)
        .build();
    ProjectedEvent {
        topic: TOPIC.into(),
        partition: 0,
        offset,
        index: 0,
        commit: Arc::new(commit),
        event: AnyEvent::Order(event),
    }
}

/// A database with the process's tables (generation 1), its start on partition 0 at
/// offset 5 and on partition 1 at 0, and both partitions held by `process` under claim 1.
async fn prepared(test: &str, process: Uuid) -> (keel_tests::TestDatabase, PgPool) {
    let (db, pool) = crate::testing::database(test).await;
    let mut conn = pool.acquire().await.unwrap();
    let fulfilment = Fulfilment {
        payment_deadline: Duration::from_secs(3600),
    };
    fulfilment.create(&mut conn, 1).await.unwrap();
    sqlx::query(
        "INSERT INTO keel_projections (name, generation, code_version, gate_rules)
         VALUES ($1, 1, $2, $3)",
    )
    .bind(NAME)
    .bind(keel_views::FULFILMENT.version)
    .bind(keel_kafka::GATE_RULES)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO keel_process_starts (process, topic, partition, start_offset)
         VALUES ($1, $2, 0, 5), ($1, $2, 1, 0)",
    )
    .bind(NAME)
    .bind(TOPIC)
    .execute(&mut *conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO keel_units (kind, projection, topic, partition, holder, claims)
         VALUES ('run', $1, $2, 0, $3, 1), ('run', $1, $2, 1, $3, 1)",
    )
    .bind(NAME)
    .bind(TOPIC)
    .bind(process)
    .execute(&mut *conn)
    .await
    .unwrap();
    drop(conn);
    (db, pool)
}

fn held() -> Vec<Unit> {
    (0..2)
        .map(|p| Unit {
            at: TopicPartition::new(TOPIC.to_owned(), p),
            claim: 1,
        })
        .collect()
}

/// Another process takes partition `partition`'s unit (this one stalled past its claim).
async fn taken(pool: &PgPool, partition: i32) {
    sqlx::query("UPDATE keel_units SET holder = $1, claims = claims + 1 WHERE partition = $2")
        .bind(Uuid::new_v4())
        .bind(partition)
        .execute(pool)
        .await
        .unwrap();
}

async fn apply(pool: &PgPool, events: &[ProjectedEvent]) {
    let fulfilment = Fulfilment {
        payment_deadline: Duration::from_secs(3600),
    };
    let mut tx = pool.begin().await.unwrap();
    fulfilment.apply(&mut tx, 1, events).await.unwrap();
    tx.commit().await.unwrap();
}

async fn outbox(pool: &PgPool) -> Vec<(String, String)> {
    sqlx::query_as("SELECT key, path FROM fulfilment_outbox_g1 ORDER BY seq")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn step(pool: &PgPool, id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT step FROM fulfilment_g1 WHERE order_id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// What the fake command API was sent: path, idempotency key, causation, authorization.
type Seen = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A command API that accepts everything but product `B`'s reservations, which it refuses
/// as out of stock.
async fn command_api() -> (String, Seen) {
    command_api_moving(None).await
}

/// [`command_api`], which also, given the database, lets another process take partition
/// 0's unit while it answers a reservation of product `MOVE`: the unit moves between the
/// sending and the settling.
async fn command_api_moving(db: Option<PgPool>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    async fn handle(
        State((seen, db)): State<(Seen, Option<PgPool>)>,
        uri: Uri,
        headers: HeaderMap,
    ) -> (StatusCode, axum::Json<Value>) {
        if uri.path() == "/v1/products/MOVE/reserve-stock"
            && let Some(db) = &db
        {
            taken(db, 0).await;
        }
        let header = |n: &str| {
            headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        seen.lock().unwrap().push((
            uri.path().to_owned(),
            header("idempotency-key"),
            header("x-causation-id"),
            header("authorization"),
        ));
        if uri.path().starts_with("/v1/products/NOWHERE") {
            // No such route (a proxy's prefix missing, say): no rule named.
            return (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"detail": "no such route", "type": "/problems/not-found"})),
            );
        }
        if uri.path() == "/v1/products/REUSED/reserve-stock" {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                axum::Json(json!({"detail": "the key was used for another request",
                    "type": "/problems/idempotency-key-reused"})),
            );
        }
        if uri.path() == "/v1/products/B/reserve-stock" {
            return (
                StatusCode::CONFLICT,
                axum::Json(
                    json!({"detail": "insufficient stock: requested 1, available 0",
                    "rule": "insufficient_stock"}),
                ),
            );
        }
        (StatusCode::OK, axum::Json(json!({"version": 2})))
    }
    let app = Router::new()
        .route("/{*path}", post(handle))
        .with_state((Arc::clone(&seen), db));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn sender(pool: &PgPool, process: Uuid, api: &str, token: Option<std::path::PathBuf>) -> Sender {
    Sender::new(
        pool.clone(),
        SenderSettings {
            command_api: api.to_owned(),
            token_file: token,
            concurrency: 16,
            timeout: Duration::from_secs(5),
        },
        process,
    )
    .unwrap()
}

/// A record before the partition's start is not acted on; one after is, once, whatever
/// the batches look like.
#[tokio::test]
async fn orders_before_the_start_are_left_alone_and_each_placed_order_is_reserved_once() {
    let process = Uuid::new_v4();
    let (_db, pool) = prepared("fulfil-start", process).await;
    apply(
        &pool,
        &[
            placed("o-early", 4, &[("A", 1)]),
            placed("o-1", 5, &[("A", 2), ("B", 1)]),
        ],
    )
    .await;
    // The same record again (a batch applied again after a crash is rolled back, but the
    // process must not depend on it): nothing new.
    apply(&pool, &[placed("o-1", 5, &[("A", 2), ("B", 1)])]).await;
    assert_eq!(step(&pool, "o-early").await, None);
    assert_eq!(step(&pool, "o-1").await.as_deref(), Some("reserving"));
    let sent = outbox(&pool).await;
    let paths: Vec<&str> = sent.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/products/A/reserve-stock",
            "/v1/products/B/reserve-stock"
        ]
    );
    assert!(
        sent.iter().all(|(k, _)| k.starts_with("fulfil:")
            && (k.ends_with(":reserve:A") || k.ends_with(":reserve:B"))),
        "{sent:?}"
    );
    pool.close().await;
}

/// The sender posts with the keys, causation and token; a refusal settles the line, and
/// the order is cancelled with the line named. After the unit moved to another process,
/// it settles nothing: the answer is left for the holder, whose resend is a replay.
#[tokio::test]
async fn answers_are_settled_only_while_the_unit_is_held() {
    let process = Uuid::new_v4();
    let (db, pool) = prepared("fulfil-settle", process).await;
    let (api, seen) = command_api().await;
    let token = std::env::temp_dir().join(format!("{}.token", db.name));
    std::fs::write(&token, "service-token\n").unwrap();
    apply(&pool, &[placed("o-1", 7, &[("A", 2), ("B", 1)])]).await;
    let sender = sender(&pool, process, &api, Some(token.clone()));
    assert_eq!(sender.send_some(&held()).await.unwrap(), 2);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for (path, key, causation, auth) in seen.iter() {
            assert!(
                key.starts_with("fulfil:") && key.contains(":reserve:"),
                "{path} {key}"
            );
            assert!(
                key.starts_with(&format!("fulfil:{causation}:")),
                "{key} {causation}"
            );
            assert_eq!(auth, "Bearer service-token");
        }
    }
    // B refused: the order is cancelled, naming line 2.
    let sent = outbox(&pool).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].0.ends_with(":cancel-unreservable") && sent[0].1 == "/v1/orders/o-1/cancel");
    let reason: String = sqlx::query_scalar("SELECT body->>'reason' FROM fulfilment_outbox_g1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        reason,
        "line 2 (B) could not be reserved: insufficient stock: requested 1, available 0"
    );

    // Another process takes the unit (this one stalled past its claim): this one reads
    // nothing more to send, and settles nothing.
    taken(&pool, 0).await;
    assert_eq!(sender.send_some(&held()).await.unwrap(), 0);
    assert_eq!(seen.lock().unwrap().len(), 2, "sent without the unit");
    assert_eq!(outbox(&pool).await, sent, "settled without the unit");
    let state: Value = sqlx::query_scalar("SELECT state FROM fulfilment_g1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(state["lines"][0]["state"]["state"], "reserved");
    let _ = std::fs::remove_file(token);
    pool.close().await;
}

/// The deadline fires once, under the unit's proof, and never for an order paid before it.
#[tokio::test]
async fn the_deadline_fires_once_while_held() {
    let process = Uuid::new_v4();
    let (_db, pool) = prepared("fulfil-deadline", process).await;
    apply(
        &pool,
        &[placed("o-1", 8, &[("A", 1)]), placed("o-2", 9, &[("A", 1)])],
    )
    .await;
    sqlx::query("DELETE FROM fulfilment_outbox_g1")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "UPDATE fulfilment_g1 SET payment_due = now() - interval '1 second',
            state = jsonb_set(state, '{deadline_ms}',
                to_jsonb((EXTRACT(EPOCH FROM now()) * 1000)::bigint - 1000))",
    )
    .execute(&pool)
    .await
    .unwrap();
    // o-2 was paid: its state says so.
    sqlx::query("UPDATE fulfilment_g1 SET state = jsonb_set(state, '{paid_event}', '\"e-paid\"') WHERE order_id = 'o-2'")
        .execute(&pool)
        .await
        .unwrap();
    let (api, _) = command_api().await;
    let sender = sender(&pool, process, &api, None);
    // Not held: nothing fires.
    sqlx::query("UPDATE keel_units SET holder = $1")
        .bind(Uuid::new_v4())
        .execute(&pool)
        .await
        .unwrap();
    sender.fire_deadlines(&held()).await.unwrap();
    assert!(outbox(&pool).await.is_empty());
    sqlx::query("UPDATE keel_units SET holder = $1")
        .bind(process)
        .execute(&pool)
        .await
        .unwrap();
    sender.fire_deadlines(&held()).await.unwrap();
    let sent = outbox(&pool).await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].0.ends_with(":deadline") && sent[0].1 == "/v1/orders/o-1/cancel-unpaid");
    // Both done with: o-1's fired, o-2 paid first.
    let fired: Vec<(String, bool)> =
        sqlx::query_as("SELECT order_id, deadline_fired FROM fulfilment_g1 ORDER BY 1")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(fired, [("o-1".into(), true), ("o-2".into(), true)]);
    // The cancellation sent and settled (its row gone): the next scans add nothing.
    sqlx::query("DELETE FROM fulfilment_outbox_g1")
        .execute(&pool)
        .await
        .unwrap();
    sender.fire_deadlines(&held()).await.unwrap();
    sender.fire_deadlines(&held()).await.unwrap();
    assert!(outbox(&pool).await.is_empty(), "the deadline fired twice");
    pool.close().await;
}

/// A 404 that names no domain rule (an unknown route) and a 422 for a key reused under
/// another subject are not answers about the order: the commands stay in the outbox, to be
/// sent again later, and the order is not cancelled.
#[tokio::test]
async fn answers_that_are_not_the_domains_are_tried_again() {
    let process = Uuid::new_v4();
    let (_db, pool) = prepared("fulfil-retry", process).await;
    let (api, _) = command_api().await;
    apply(&pool, &[placed("o-1", 7, &[("NOWHERE", 1), ("REUSED", 1)])]).await;
    let sender = sender(&pool, process, &api, None);
    assert_eq!(sender.send_some(&held()).await.unwrap(), 2);
    let kept: Vec<(String, i32, Option<String>)> =
        sqlx::query_as("SELECT path, attempts, last_error FROM fulfilment_outbox_g1 ORDER BY path")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept.iter()
            .all(|(_, attempts, error)| *attempts == 1 && error.is_some()),
        "{kept:?}"
    );
    assert_eq!(step(&pool, "o-1").await.as_deref(), Some("reserving"));
    // Not due again before its backoff.
    assert_eq!(sender.send_some(&held()).await.unwrap(), 0);
    pool.close().await;
}

/// A unit that moves while a round's answers are on their way: the round's one proof
/// fails, and each answer is settled on its own, those of the units still held and no
/// other.
#[tokio::test]
async fn a_round_whose_unit_moved_settles_the_answers_of_the_units_still_held() {
    let process = Uuid::new_v4();
    let (_db, pool) = prepared("fulfil-moved", process).await;
    let (api, seen) = command_api_moving(Some(pool.clone())).await;
    let mut on_one = placed("o-2", 3, &[("A", 1)]);
    on_one.partition = 1;
    apply(&pool, &[placed("o-1", 7, &[("MOVE", 1)]), on_one]).await;
    let sender = sender(&pool, process, &api, None);
    assert_eq!(sender.send_some(&held()).await.unwrap(), 2);
    assert_eq!(seen.lock().unwrap().len(), 2);
    // o-2 (partition 1, still held): its reservation settled, the order confirmed next.
    assert_eq!(step(&pool, "o-2").await.as_deref(), Some("confirming"));
    // o-1 (partition 0, taken meanwhile): left for the new holder, as it was.
    assert_eq!(step(&pool, "o-1").await.as_deref(), Some("reserving"));
    let left: Vec<String> = outbox(&pool)
        .await
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    assert_eq!(
        left,
        [
            "/v1/products/MOVE/reserve-stock",
            "/v1/orders/o-2/confirm-reservation"
        ]
    );
    pool.close().await;
}
