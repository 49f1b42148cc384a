//! The order fulfilment process against the real stack: `projector run --process
//! fulfilment` as a process of its own, sending its commands to the command API with its
//! own token. Every outcome is checked in the views and against the log's audit trail.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::time::{Duration, Instant};

use keel_tests::{Stack, eur};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// The payment deadline the tests run the process with: long enough that, on a loaded
/// machine, the orders the test pays or cancels itself are dealt with before it.
const DEADLINE_SECS: u64 = 20;

/// The subject of the process's token (`Stack::fulfilment_process`).
const PROCESS: &str = "svc-fulfilment";

/// Polls `probe` every 100 ms until it gives a value, for at most `secs` seconds.
async fn wait_until<T, F, Fut>(what: &str, secs: u64, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post_ok(stack: &Stack, path: &str, body: Value) -> Value {
    let (status, body, _) = stack.post(path, body).await;
    assert!(status.is_success(), "POST {path}: {status} {body}");
    body
}

async fn product(stack: &Stack, sku: &str, stock: u64) {
    post_ok(
        stack,
        &format!("/v1/products/{sku}/register"),
        json!({"name": format!("Product {sku}"), "price": eur(1000)}),
    )
    .await;
    post_ok(
        stack,
        &format!("/v1/products/{sku}/restock"),
        json!({"quantity": stock}),
    )
    .await;
}

async fn place(stack: &Stack, id: &str, lines: &[(&str, u64)]) -> Value {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(sku, q)| json!({"sku": sku, "quantity": q, "unit_price": eur(1000)}))
        .collect();
    post_ok(
        stack,
        &format!("/v1/orders/{id}/place"),
        json!({"customer_id": "c-1", "lines": lines}),
    )
    .await
}

/// The order as `GET /v1/orders/{id}` shows it, once it satisfies `until`.
async fn order_when(stack: &Stack, id: &str, what: &str, until: impl Fn(&Value) -> bool) -> Value {
    wait_until(&format!("order {id} {what}"), 60, || async {
        let (status, order) = stack.get(&format!("/v1/orders/{id}"), None).await;
        (status == StatusCode::OK && until(&order)).then_some(order)
    })
    .await
}

fn step(order: &Value) -> &str {
    order["fulfilment_process"]["step"].as_str().unwrap_or("")
}

/// (on hand, reserved) of `sku` in the products view, once it is `expected`.
async fn stock_is(stack: &Stack, sku: &str, expected: (i64, i64)) {
    wait_until(&format!("{sku}'s stock is {expected:?}"), 60, || async {
        let (status, p) = stack.get(&format!("/v1/products/{sku}"), None).await;
        let seen = (p["on_hand"].as_i64()?, p["reserved"].as_i64()?);
        (status == StatusCode::OK && seen == expected).then_some(())
    })
    .await;
}

/// The commits of `stream_id` by the process, as the audit log holds them: (command type,
/// causation id).
async fn process_commands(pool: &sqlx::PgPool, stream_id: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as(
        "SELECT DISTINCT ON (commit_id) command_type, causation_id FROM audit_log
         WHERE stream_id = $1 AND actor = $2 ORDER BY commit_id",
    )
    .bind(stream_id)
    .bind(PROCESS)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The id of `stream_id`'s event of `event_type`, once the audit log holds it.
async fn event_id(pool: &sqlx::PgPool, stream_id: &str, event_type: &str) -> String {
    wait_until(
        &format!("{stream_id}'s {event_type} in the audit log"),
        60,
        || async {
            let id: Option<uuid::Uuid> = sqlx::query_scalar(
                "SELECT event_id FROM audit_log WHERE stream_id = $1 AND event_type = $2",
            )
            .bind(stream_id)
            .bind(event_type)
            .fetch_optional(pool)
            .await
            .unwrap();
            id.map(|id| id.to_string())
        },
    )
    .await
}

/// The reason of order `id`'s cancellation, from its event.
async fn cancel_reason(pool: &sqlx::PgPool, id: &str) -> String {
    event_id(pool, id, "OrderCancelled").await;
    sqlx::query_scalar(
        "SELECT payload->>'reason' FROM audit_log
         WHERE stream_type = 'order' AND stream_id = $1 AND event_type = 'OrderCancelled'",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every case of the issue on one stack: the happy path to shipping, a line out of stock
/// (the others released, the order cancelled with the reason), an unknown product, the
/// customer cancelling after the reservation, the payment deadline (and a payment just
/// after it, refused), orders competing for the last units, and an order placed before the
/// process first ran, which it leaves alone.
#[tokio::test]
async fn orders_are_reserved_paid_taken_shipped_or_cancelled_and_released() {
    let stack = Stack::start("fulfilment", 2).await;
    for (sku, stock) in [("MUG", 10), ("TEE", 5), ("CAP", 1), ("LAST", 3)] {
        product(&stack, sku, stock).await;
    }
    // Placed before the process first ran: never reserved after the fact.
    place(&stack, "BEFORE-1", &[("MUG", 1)]).await;
    let _process = stack
        .fulfilment_process(&format!("{DEADLINE_SECS}s"), &[])
        .await
        .unwrap();
    let pool = stack.pool().await;

    // The happy path: reserved, awaiting payment, paid, stock taken, ready, shipped.
    place(&stack, "H-1", &[("MUG", 2), ("TEE", 1)]).await;
    // The process's step and the orders view (which follows the order's events on its
    // own) both say so.
    let order = order_when(&stack, "H-1", "awaits payment", |o| {
        step(o) == "awaiting_payment" && o["fulfilment"] == "reserved"
    })
    .await;
    assert_eq!(order["status"], "placed");
    stock_is(&stack, "MUG", (10, 2)).await;
    stock_is(&stack, "TEE", (5, 1)).await;
    // Not yet paid: shipping is refused.
    let (status, body, _) = stack
        .post(
            "/v1/orders/H-1/ship",
            json!({"carrier": "DHL", "tracking": "JD01"}),
        )
        .await;
    assert_eq!(
        (status, body["rule"].as_str()),
        (StatusCode::CONFLICT, Some("order_not_paid"))
    );
    post_ok(
        &stack,
        "/v1/orders/H-1/pay",
        json!({"amount": eur(3000), "payment_ref": "p-h1"}),
    )
    .await;
    order_when(&stack, "H-1", "is ready to ship", |o| {
        o["fulfilment"] == "ready_to_ship" && step(o) == "ready_to_ship"
    })
    .await;
    stock_is(&stack, "MUG", (8, 0)).await;
    stock_is(&stack, "TEE", (4, 0)).await;
    post_ok(
        &stack,
        "/v1/orders/H-1/ship",
        json!({"carrier": "DHL", "tracking": "JD01"}),
    )
    .await;
    order_when(&stack, "H-1", "is shipped", |o| o["status"] == "shipped").await;
    // The audit trail names the process as the actor of its commands, and the event that
    // caused each as its causation.
    let placed = event_id(&pool, "H-1", "OrderPlaced").await;
    let paid = event_id(&pool, "H-1", "OrderPaid").await;
    for (stream, command, cause) in [
        ("MUG", "ReserveStock", &placed),
        ("TEE", "ReserveStock", &placed),
        ("H-1", "ConfirmReservation", &placed),
        ("MUG", "TakeReservedStock", &paid),
        ("H-1", "MarkReadyToShip", &paid),
    ] {
        wait_until(
            &format!("{command} on {stream} by the process"),
            60,
            || async {
                process_commands(&pool, stream)
                    .await
                    .contains(&(command.to_owned(), Some(cause.clone())))
                    .then_some(())
            },
        )
        .await;
    }

    // One line of three out of stock: the order is cancelled with the line named, and the
    // other two lines' reservations released.
    place(&stack, "X-1", &[("MUG", 1), ("CAP", 2), ("TEE", 1)]).await;
    order_when(&stack, "X-1", "is cancelled", |o| {
        o["status"] == "cancelled"
    })
    .await;
    let reason = cancel_reason(&pool, "X-1").await;
    assert!(
        reason.starts_with("line 2 (CAP) could not be reserved: insufficient stock"),
        "{reason}"
    );
    // Released, by the process, because of the cancellation.
    let cancelled = event_id(&pool, "X-1", "OrderCancelled").await;
    for sku in ["MUG", "TEE"] {
        wait_until(&format!("X-1's {sku} released"), 60, || async {
            process_commands(&pool, sku)
                .await
                .contains(&("ReleaseStock".into(), Some(cancelled.clone())))
                .then_some(())
        })
        .await;
    }
    stock_is(&stack, "MUG", (8, 0)).await;
    stock_is(&stack, "TEE", (4, 0)).await;
    stock_is(&stack, "CAP", (1, 0)).await;
    order_when(&stack, "X-1", "is cancelled in the process", |o| {
        step(o) == "cancelled"
    })
    .await;

    // A product that does not exist.
    place(&stack, "U-1", &[("NO-SUCH", 1)]).await;
    order_when(&stack, "U-1", "is cancelled", |o| {
        o["status"] == "cancelled"
    })
    .await;
    let reason = cancel_reason(&pool, "U-1").await;
    assert!(
        reason.starts_with("line 1 (NO-SUCH) could not be reserved"),
        "{reason}"
    );

    // The customer cancels after the reservation: released.
    place(&stack, "C-1", &[("MUG", 3)]).await;
    order_when(&stack, "C-1", "awaits payment", |o| {
        step(o) == "awaiting_payment"
    })
    .await;
    stock_is(&stack, "MUG", (8, 3)).await;
    post_ok(
        &stack,
        "/v1/orders/C-1/cancel",
        json!({"reason": "changed my mind"}),
    )
    .await;
    stock_is(&stack, "MUG", (8, 0)).await;

    // Six orders for the last three units, at once: exactly three reserved.
    let racers: Vec<String> = (0..6).map(|i| format!("R-{i}")).collect();
    futures::future::join_all(racers.iter().map(|id| place(&stack, id, &[("LAST", 1)]))).await;
    let mut steps = Vec::new();
    for id in &racers {
        let order = order_when(&stack, id, "is settled", |o| {
            matches!(step(o), "awaiting_payment" | "cancelled")
                && (step(o) != "cancelled" || o["status"] == "cancelled")
        })
        .await;
        steps.push(step(&order).to_owned());
    }
    assert_eq!(
        steps.iter().filter(|s| *s == "awaiting_payment").count(),
        3,
        "{steps:?}"
    );
    stock_is(&stack, "LAST", (3, 3)).await;

    // The payment deadline: an order left unpaid is cancelled and released; a payment
    // after that is refused (the log holds the cancellation first).
    place(&stack, "D-1", &[("TEE", 2)]).await;
    // Reserved first (read from the log: on a loaded machine the deadline may have passed
    // before a look at the order would find it awaiting payment).
    let placed = event_id(&pool, "D-1", "OrderPlaced").await;
    wait_until("D-1's TEE reserved", 60, || async {
        process_commands(&pool, "TEE")
            .await
            .contains(&("ReserveStock".into(), Some(placed.clone())))
            .then_some(())
    })
    .await;
    order_when(&stack, "D-1", "is cancelled by the deadline", |o| {
        o["status"] == "cancelled" && step(o) == "cancelled"
    })
    .await;
    assert_eq!(
        cancel_reason(&pool, "D-1").await,
        "not paid by the payment deadline"
    );
    stock_is(&stack, "TEE", (4, 0)).await;
    let (status, body, _) = stack
        .post(
            "/v1/orders/D-1/pay",
            json!({"amount": eur(2000), "payment_ref": "late"}),
        )
        .await;
    assert_eq!(
        (status, body["rule"].as_str()),
        (StatusCode::CONFLICT, Some("order_cancelled"))
    );
    let on_order = process_commands(&pool, "D-1").await;
    assert!(
        on_order.contains(&("CancelUnpaidOrder".into(), Some(placed))),
        "{on_order:?}"
    );

    // The order placed before the process ran is not followed, and stays unreserved.
    let (_, before) = stack.get("/v1/orders/BEFORE-1", None).await;
    assert_eq!(
        before.get("fulfilment_process"),
        Some(&Value::Null),
        "{before}"
    );
    assert_eq!(before["status"], "placed");
    assert!(process_commands(&pool, "BEFORE-1").await.is_empty());

    // Every reservation of the process was made once per order and line.
    let reservations: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT stream_id, payload->>'order_id', count(*) FROM audit_log
         WHERE event_type = 'StockReserved' GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(reservations.is_empty(), "{reservations:?}");
    pool.close().await;
}

/// A small deterministic generator: the test prints its seed, so a failure can be re-run.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// The fulfilment units the projector process `pid` holds: (partition, claim).
async fn units_of(pool: &sqlx::PgPool, pid: u32) -> Vec<(i32, i64)> {
    sqlx::query_as(
        "SELECT u.partition, u.claims FROM keel_units u
         JOIN keel_projector_processes p ON p.id = u.holder
         WHERE u.projection = 'fulfilment' AND p.name LIKE '%:' || $1",
    )
    .bind(pid.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Whether any of the fulfilment units `held` (partition, claim) was claimed again since.
async fn claimed_since(pool: &sqlx::PgPool, held: &[(i32, i64)]) -> bool {
    let now: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, claims FROM keel_units
         WHERE projection = 'fulfilment' AND partition = ANY($1)",
    )
    .bind(held.iter().map(|(p, _)| *p).collect::<Vec<_>>())
    .fetch_all(pool)
    .await
    .unwrap();
    held.iter()
        .any(|(p, claim)| now.iter().any(|(q, c)| q == p && c > claim))
}

/// One order of the load: its lines (product index, quantity), whether it is paid and
/// whether its customer cancels it.
struct Planned {
    id: String,
    lines: Vec<(usize, u64)>,
    pay: bool,
    cancel: bool,
}

/// 1,000 orders over 20 products with random stock, paid or cancelled by their customers
/// in random order, while two fulfilment processes are, one after the other at random
/// moments, SIGKILLed (and started again) or paused with SIGSTOP past their claims (the
/// other takes their partitions; woken, they must act on none), until every payment
/// deadline (15 s) has passed. Afterwards, checked against the log: every order's step
/// agrees with its events; every order neither paid in time nor cancelled by its customer
/// was cancelled by its deadline, once, after the deadline, and never after a payment;
/// every product's reserved stock is the sum over the orders still holding a reservation
/// and its stock on hand went down by exactly what the ready orders took, never below what
/// is reserved; each order line was reserved, taken, released and returned at most once;
/// each of the process's idempotency keys was decided once; and `projector verify` finds
/// the log clean.
#[tokio::test]
async fn a_thousand_orders_come_out_exactly_once_while_the_process_is_killed_or_paused() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("fulfilment chaos seed: {seed}");
    let mut rng = Lcg(seed);
    let stack = Stack::start("fulfil-chaos", 3).await;
    let stock: Vec<u64> = (0..20).map(|_| rng.below(80)).collect();
    let sku = |i: usize| format!("P-{i:02}");
    for (i, units) in stock.iter().enumerate() {
        post_ok(
            &stack,
            &format!("/v1/products/{}/register", sku(i)),
            json!({"name": format!("Product {i}"), "price": eur(1000)}),
        )
        .await;
        if *units > 0 {
            post_ok(
                &stack,
                &format!("/v1/products/{}/restock", sku(i)),
                json!({"quantity": units}),
            )
            .await;
        }
    }
    let plans: Vec<Planned> = (0..1000)
        .map(|n| {
            let mut lines: Vec<(usize, u64)> = Vec::new();
            for _ in 0..=rng.below(3) {
                let p = rng.below(20) as usize;
                if !lines.iter().any(|(q, _)| *q == p) {
                    lines.push((p, 1 + rng.below(3)));
                }
            }
            Planned {
                id: format!("K-{n:04}"),
                lines,
                pay: rng.below(10) < 6,
                cancel: rng.below(10) == 0,
            }
        })
        .collect();
    // Claims expire fast, so a killed or paused process's partitions move to the other soon.
    let extra = [("KEEL_PROJECTOR_CLAIM_TIMEOUT_MS", "1500".to_owned())];
    const DEADLINE: Duration = Duration::from_secs(15);
    let deadline = format!("{}s", DEADLINE.as_secs());
    let mut processes = [
        Some(stack.fulfilment_process(&deadline, &extra).await.unwrap()),
        Some(stack.fulfilment_process(&deadline, &extra).await.unwrap()),
    ];
    // When the last order was placed: faults go on until its deadline has passed.
    let placed = std::sync::OnceLock::<std::time::Instant>::new();
    let loaded = std::sync::atomic::AtomicBool::new(false);
    let shared = &stack;
    let load = async {
        let posts = |phase: Vec<(String, Value)>| async move {
            let mut pending = futures::stream::iter(phase.into_iter().map(|(path, body)| {
                let stack = shared;
                async move {
                    let (status, reply, _) = stack.post(&path, body).await;
                    // Refused (an order already cancelled by the process) is an answer;
                    // nothing may fail.
                    assert!(
                        status.is_success() || status == StatusCode::CONFLICT,
                        "POST {path}: {status} {reply}"
                    );
                }
            }))
            .buffer_unordered(16);
            while futures::StreamExt::next(&mut pending).await.is_some() {}
        };
        use futures::StreamExt as _;
        posts(
            plans
                .iter()
                .map(|o| {
                    let lines: Vec<Value> = o
                        .lines
                        .iter()
                        .map(|(p, q)| json!({"sku": sku(*p), "quantity": q, "unit_price": eur(1000)}))
                        .collect();
                    (
                        format!("/v1/orders/{}/place", o.id),
                        json!({"customer_id": "c-1", "lines": lines}),
                    )
                })
                .collect(),
        )
        .await;
        placed.set(std::time::Instant::now()).unwrap();
        let mut after: Vec<(String, Value)> = Vec::new();
        for o in &plans {
            let total: u64 = o.lines.iter().map(|(_, q)| q * 1000).sum();
            if o.pay {
                after.push((
                    format!("/v1/orders/{}/pay", o.id),
                    json!({"amount": eur(total as i64), "payment_ref": format!("pay-{}", o.id)}),
                ));
            }
            if o.cancel {
                after.push((
                    format!("/v1/orders/{}/cancel", o.id),
                    json!({"reason": "changed my mind"}),
                ));
            }
        }
        posts(after).await;
        loaded.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let mut faults_rng = Lcg(seed ^ 0x9e37_79b9_7f4a_7c15);
    let units = stack.pool().await;
    let faults = async {
        let (mut kills, mut pauses, mut moved, mut after_load) = (0, 0, 0, 0);
        while (after_load < 3
            || kills < 4
            || pauses < 2
            || moved == 0
            || placed
                .get()
                .is_none_or(|at| at.elapsed() < DEADLINE + Duration::from_secs(2)))
            && kills + pauses < 60
        {
            tokio::time::sleep(Duration::from_millis(300 + faults_rng.below(2200))).await;
            let i = (kills + pauses) % 2;
            if (kills + pauses) % 3 == 2 {
                // Asleep past its claims (1.5 s): the other process takes its partitions,
                // and the batches, answers and deadlines it had in hand go nowhere.
                let paused = processes[i].as_ref().unwrap();
                let before = units_of(&units, paused.pid().unwrap()).await;
                paused
                    .pause(Duration::from_millis(3000 + faults_rng.below(1000)))
                    .await
                    .unwrap();
                pauses += 1;
                // Counted when a unit it held was claimed by another meanwhile.
                if !before.is_empty() && claimed_since(&units, &before).await {
                    moved += 1;
                }
            } else {
                processes[i].take().unwrap().kill().await.unwrap();
                kills += 1;
                processes[i] = Some(stack.fulfilment_process(&deadline, &extra).await.unwrap());
            }
            if loaded.load(std::sync::atomic::Ordering::Relaxed) {
                after_load += 1;
            }
        }
        (kills, pauses, moved)
    };
    let ((), (kills, pauses, moved)) = tokio::join!(load, faults);
    eprintln!("{kills} SIGKILLs, {pauses} SIGSTOPs ({moved} of which lost units to the other)");
    units.close().await;
    assert!(
        kills >= 4 && pauses >= 2 && moved >= 1,
        "{kills} kills, {pauses} pauses, {moved} of which moved a unit"
    );

    // Settled: every order followed, none left in a step the process moves on by itself,
    // nothing left to send.
    let pool = stack.pool().await;
    wait_until("every order settles", 300, || async {
        let (followed, moving, outbox): (i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM fulfilment),
                    (SELECT count(*) FROM fulfilment
                     WHERE step IN ('reserving', 'confirming', 'awaiting_payment', 'taking_stock',
                                    'marking_ready')),
                    (SELECT count(*) FROM fulfilment_outbox)",
        )
        .fetch_one(&pool)
        .await
        .ok()?;
        (followed == 1000 && moving == 0 && outbox == 0).then_some(())
    })
    .await;

    // The log, as any reader sees it through the gate.
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let policy = stack.config.policy();
    let (orders_log, _) = keel_tests::read_accepted(&settings, &policy, &settings.topic("order"))
        .await
        .unwrap();
    let (products_log, _) =
        keel_tests::read_accepted(&settings, &policy, &settings.topic("product"))
            .await
            .unwrap();
    let mut order_events: std::collections::HashMap<String, Vec<String>> = Default::default();
    // Each order's placing and cancellation: when, and the cancellation's key.
    let mut placed_at: std::collections::HashMap<String, chrono::DateTime<chrono::Utc>> =
        Default::default();
    let mut cancelled: std::collections::HashMap<
        String,
        (chrono::DateTime<chrono::Utc>, Option<String>),
    > = Default::default();
    for c in &orders_log {
        let id = &c.commit.stream.id;
        for e in &c.commit.events {
            order_events
                .entry(id.clone())
                .or_default()
                .push(e.event_type.clone());
            let at = c.commit.recorded_at.as_datetime();
            match e.event_type.as_str() {
                "OrderPlaced" => {
                    placed_at.insert(id.clone(), at);
                }
                "OrderCancelled" => {
                    cancelled.insert(id.clone(), (at, c.commit.command.idempotency_key.clone()));
                }
                _ => {}
            }
        }
    }
    // Each product folded from its events: on hand never below zero, and each order's
    // units reserved, taken, released and returned at most once.
    let mut products: std::collections::BTreeMap<String, keel_domain::product::Product> =
        Default::default();
    let mut once: std::collections::HashMap<(String, String, String), u32> = Default::default();
    for c in &products_log {
        for e in &c.commit.events {
            let event: keel_domain::product::ProductEvent =
                serde_json::from_value(json!({"type": e.event_type, "payload": e.payload}))
                    .unwrap();
            if let Some(order) = e.payload["order_id"].as_str() {
                *once
                    .entry((
                        c.commit.stream.id.clone(),
                        order.to_owned(),
                        e.event_type.clone(),
                    ))
                    .or_default() += 1;
            }
            let product = products.remove(&c.commit.stream.id).unwrap_or_default();
            let product = keel_domain::Aggregate::evolve(product, &event);
            if let keel_domain::product::Product::Registered(p) = &product {
                assert!(
                    p.reserved() <= p.on_hand,
                    "{}: reserved over on hand",
                    c.commit.stream.id
                );
            }
            products.insert(c.commit.stream.id.clone(), product);
        }
    }
    let twice: Vec<_> = once.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "applied more than once: {twice:?}");
    // Every command the process sent again was replayed, never decided again: one commit
    // per idempotency key at most, and each of the process's commits has one.
    let mut keys: std::collections::HashMap<String, u32> = Default::default();
    for c in orders_log.iter().chain(&products_log) {
        if c.commit.command.actor == "svc-fulfilment" {
            let key = c.commit.command.idempotency_key.clone();
            let key = key.unwrap_or_else(|| {
                panic!("a process commit without a key: {:?}", c.commit.command)
            });
            *keys.entry(key).or_default() += 1;
        }
    }
    let decided_twice: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        decided_twice.is_empty(),
        "keys committed twice: {decided_twice:?}"
    );
    assert!(
        keys.len() > 1000,
        "the process committed {} commands",
        keys.len()
    );

    // Every order: its step agrees with its events, and with what the customer did.
    let rows: Vec<(String, String, Value)> =
        sqlx::query_as("SELECT order_id, step, state FROM fulfilment")
            .fetch_all(&pool)
            .await
            .unwrap();
    let mut taken = [0u64; 20];
    let mut deadlines = 0;
    for (id, step, state) in &rows {
        let plan = plans.iter().find(|p| &p.id == id).unwrap();
        let events = &order_events[id];
        let has = |t: &str| events.iter().any(|e| e == t);
        match step.as_str() {
            "ready_to_ship" => {
                assert!(
                    has("OrderPaid") && has("OrderReadyToShip") && !has("OrderCancelled"),
                    "{id}: {events:?}"
                );
                assert!(plan.pay && !plan.cancel, "{id}");
            }
            "cancelled" => {
                assert!(has("OrderCancelled"), "{id}: {events:?}");
                let refused = state["lines"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|l| l["state"]["state"] == "refused");
                let (at, key) = &cancelled[id];
                let by_deadline = key.as_deref().is_some_and(|k| k.ends_with(":deadline"));
                assert!(
                    plan.cancel || refused || by_deadline,
                    "{id} cancelled with every line reserved, before its deadline: {state}"
                );
                if by_deadline {
                    deadlines += 1;
                    let late = *at - placed_at[id];
                    assert!(
                        late >= chrono::Duration::from_std(DEADLINE).unwrap(),
                        "{id} cancelled {late} after it was placed"
                    );
                    let paid = events.iter().position(|e| e == "OrderPaid");
                    let cancel = events.iter().position(|e| e == "OrderCancelled");
                    assert!(
                        paid.is_none_or(|p| Some(p) > cancel),
                        "{id}: cancelled by its deadline after it was paid: {events:?}"
                    );
                }
            }
            other => panic!("{id} left in {other}"),
        }
        for line in state["lines"].as_array().unwrap() {
            let p: usize = line["sku"].as_str().unwrap()[2..].parse().unwrap();
            let q = line["quantity"].as_u64().unwrap();
            match (step.as_str(), line["state"]["state"].as_str().unwrap()) {
                ("ready_to_ship", "taken") => taken[p] += q,
                ("ready_to_ship", s) => panic!("{id}: a line {s}"),
                _ => {}
            }
            // One reservation per line that was reserved.
            if matches!(line["state"]["state"].as_str(), Some("reserved" | "taken")) {
                assert_eq!(
                    once.get(&(sku(p), id.clone(), "StockReserved".into())),
                    Some(&1),
                    "{id} {p}"
                );
            }
        }
    }
    eprintln!("{deadlines} orders cancelled by their deadline");
    assert!(deadlines > 0, "no deadline fired");
    // Every order is ready or cancelled: nothing is reserved any more, and on hand went
    // down by what the ready orders took.
    for (i, units) in stock.iter().enumerate() {
        let Some(keel_domain::product::Product::Registered(p)) = products.get(&sku(i)) else {
            panic!("{} not in the log", sku(i));
        };
        assert_eq!(p.reserved(), 0, "{}: still reserved", sku(i));
        assert_eq!(p.on_hand, units - taken[i], "{}: on hand", sku(i));
    }
    let (status, out, err) = stack.projector_command(&["verify"], &[]).await.unwrap();
    assert!(status.success(), "verify: {out}\n{err}");
    pool.close().await;
}
