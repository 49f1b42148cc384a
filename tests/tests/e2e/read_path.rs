//! The read path end to end: command API, broker, projector, PostgreSQL, query API.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_kafka::{LogProducer, partition_for};
use keel_schemas::{ConsistencyToken, Position};
use keel_tests::{Service, Stack, eur};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test]
async fn a_query_with_the_commands_token_reads_its_write_every_time() {
    let stack = Stack::start("ryw", 4).await;
    let (status, _, _) = stack
        .post(
            "/v1/products/RYW-1/register",
            json!({"name": "R", "price": eur(100)}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    for i in 1..=200u64 {
        let (status, body, token) = stack
            .post("/v1/products/RYW-1/restock", json!({"quantity": 1}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, product) = stack.get("/v1/products/RYW-1", token.as_ref()).await;
        assert_eq!(status, StatusCode::OK, "{product}");
        assert_eq!(
            product["on_hand"], i,
            "restock {i} is visible on the first read"
        );
        assert_eq!(product["version"], i + 1);
    }
}

/// A token no view could ever pass (another deployment's topic prefix, a partition the
/// topics do not have) is refused at once rather than waited for until the timeout; a
/// query carrying several commands' tokens (the header repeated, or comma-separated)
/// waits for every one of them.
#[tokio::test]
async fn tokens_no_view_can_pass_are_refused_and_several_tokens_are_all_waited_for() {
    let stack = Stack::start("tokens", 2).await;
    let mut tokens = Vec::new();
    for sku in ["TOK-A", "TOK-B"] {
        let (status, body, token) = stack
            .post(
                &format!("/v1/products/{sku}/register"),
                json!({"name": sku, "price": eur(100)}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        tokens.push(token.unwrap().encode());
    }
    let topic = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions)
        .topic("product");
    let token_at = |topic: &str, partition: i32, offset: i64| {
        ConsistencyToken::at(Position {
            topic: topic.into(),
            partition,
            offset,
        })
        .encode()
    };
    let query = |values: Vec<String>, timeout_ms: u64| {
        let mut request = stack
            .client
            .get(stack.query.url("/v1/products?limit=10"))
            .header("keel-consistency-timeout", timeout_ms.to_string());
        for value in values {
            request = request.header("keel-consistency-token", value);
        }
        async move {
            let r = request.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap_or_default())
        }
    };
    // Refused: no wait (the timeout asked for is the longest), a 400 naming the header.
    let elsewhere = format!("elsewhere.{topic}");
    for (token, says) in [
        (token_at(&elsewhere, 0, 0), "does not have"),
        (token_at(&topic, 2, 0), "partitions 0 to 1"),
    ] {
        let (status, body) = query(vec![tokens[0].clone(), token], 30_000).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["field"], "Keel-Consistency-Token", "{body}");
        assert!(body["detail"].as_str().unwrap().contains(says), "{body}");
    }
    // Several tokens: both products are visible on the first read.
    for values in [
        tokens.clone(),
        vec![tokens.join(", ")],
        vec![tokens[1].clone(), tokens[0].clone()],
    ] {
        let (status, body) = query(values.clone(), 30_000).await;
        assert_eq!(status, StatusCode::OK, "{values:?}: {body}");
        let skus: BTreeSet<&str> = body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["sku"].as_str().unwrap())
            .collect();
        assert_eq!(skus, BTreeSet::from(["TOK-A", "TOK-B"]), "{values:?}");
    }
    // Every token counts, not only the first: one no view has reached yet makes the query
    // wait, here until its short timeout.
    let ahead = token_at(&topic, 0, 1_000_000);
    for values in [
        vec![tokens[0].clone(), ahead.clone()],
        vec![format!("{}, {ahead}", tokens[0])],
    ] {
        let (status, body) = query(values.clone(), 300).await;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{values:?}: {body}"
        );
    }
}

/// What a load of orders placed: orders, items and revenue in all, and the merged
/// consistency token of every command.
pub(crate) type Placed = (i64, i64, i64, ConsistencyToken);

/// Places `count` orders (`{prefix}-<i>`), 32 at a time.
pub(crate) async fn place_orders(stack: &Stack, prefix: &str, count: usize) -> Placed {
    let client = stack.client.clone();
    let mut tasks = tokio::task::JoinSet::new();
    let (mut orders, mut items, mut revenue) = (0i64, 0i64, 0i64);
    let mut token = ConsistencyToken::default();
    for i in 0..count {
        let quantity = (i % 7 + 1) as i64;
        let price = (i % 13 + 1) as i64 * 100;
        orders += 1;
        items += quantity;
        revenue += quantity * price;
        let body = json!({"customer_id": format!("c-{}", i % 50),
                          "lines": [{"sku": "SKU-1", "quantity": quantity, "unit_price": eur(price)}]});
        let (client, url) = (
            client.clone(),
            stack.command.url(&format!("/v1/orders/{prefix}-{i}/place")),
        );
        tasks.spawn(async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        });
        while tasks.len() >= 32 {
            let body = tasks.join_next().await.unwrap().unwrap();
            token = token.merge(&body["consistency_token"].as_str().unwrap().parse().unwrap());
        }
    }
    while let Some(body) = tasks.join_next().await {
        token = token.merge(
            &body.unwrap()["consistency_token"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap(),
        );
    }
    (orders, items, revenue, token)
}

/// Every placed order is in `orders`, `daily_sales` and `audit_log` exactly once.
pub(crate) async fn assert_applied_exactly_once(stack: &Stack, placed: Placed, count: usize) {
    let (orders, items, revenue, token) = placed;
    let (status, sales) = stack.get("/v1/reports/daily-sales", Some(&token)).await;
    assert_eq!(status, StatusCode::OK, "{sales}");
    let sum = |field: &str| -> i64 {
        sales["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d[field].as_i64().unwrap())
            .sum()
    };
    assert_eq!(
        (sum("orders_placed"), sum("items"), sum("revenue_minor")),
        (orders, items, revenue)
    );

    let pool = stack.pool().await;
    // Every projection has caught up with the token before the counts are taken.
    let (status, _) = stack.get("/v1/orders/eo-0", Some(&token)).await;
    assert!(status == StatusCode::OK || status == StatusCode::NOT_FOUND);
    let waited = Instant::now();
    let (rows, audit, distinct) = loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&pool)
            .await
            .unwrap();
        let audit: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
            .fetch_one(&pool)
            .await
            .unwrap();
        let distinct: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM audit_log")
            .fetch_one(&pool)
            .await
            .unwrap();
        if audit >= count as i64 || waited.elapsed() > Duration::from_secs(60) {
            break (rows, audit, distinct);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows, count as i64, "orders has exactly one row per order");
    assert_eq!(
        (audit, distinct),
        (count as i64, count as i64),
        "audit_log has exactly one row per event"
    );
}

#[tokio::test]
async fn orders_survive_projector_kills_exactly_once() {
    let mut stack = Stack::start("exactly-once", 4).await;
    let first = stack.projector.take().unwrap();
    let stack_ref = &stack;
    const ORDERS: usize = 5000;
    let placing = place_orders(stack_ref, "eo", ORDERS);
    let killing = async {
        // Five SIGKILLs at moments spread over the load, each followed by a restart.
        let mut seed = u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos(),
        ) | 1;
        let mut running = first;
        for _ in 0..5 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            tokio::time::sleep(Duration::from_millis(300 + seed % 900)).await;
            running.kill().await.unwrap();
            running = Service::projector(&stack_ref.config, &stack_ref.db.url(), &[])
                .await
                .unwrap();
        }
        running
    };
    let (placed, last) = tokio::join!(placing, killing);
    stack.projector = Some(last);
    assert_applied_exactly_once(&stack, placed, ORDERS).await;
}

#[tokio::test]
async fn batches_whose_sessions_die_are_applied_once_by_the_projectors_sharing_the_work() {
    let stack = Stack::start("sessions", 2).await;
    // A second projector shares the projections' partitions with the stack's.
    let _second = Service::projector(&stack.config, &stack.db.url(), &[])
        .await
        .unwrap();
    let pool = stack.pool().await;
    const ORDERS: usize = 4000;
    let placing = place_orders(&stack, "eo", ORDERS);
    let cutting = async {
        // Five times during the load, every session of the projectors dies (as in a
        // PostgreSQL restart or an idle-session timeout): batches in flight fail and are
        // applied again from the checkpoints, once.
        let mut cuts = 0;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let cut: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'keel-projector'",
            )
            .fetch_all(&pool)
            .await
            .unwrap();
            if cut.iter().any(|c| *c) {
                cuts += 1;
            }
        }
        assert_eq!(cuts, 5, "the projectors had sessions each time");
    };
    let (placed, ()) = tokio::join!(placing, cutting);
    assert_applied_exactly_once(&stack, placed, ORDERS).await;
    // Sessions cut mid-heartbeat can let one process's claims lapse and the other take
    // them; once the shares settle again, both hold some of the partitions.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let holders: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT holder) FROM keel_units WHERE holder IS NOT NULL",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if holders == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "both projectors hold some of the partitions within a minute: {holders} holder(s)"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// GETs `path` from the query API with `token` (waiting up to 30 s): status, the
/// `Keel-Held-Back` header, body.
async fn get_held(
    stack: &Stack,
    path: &str,
    token: Option<&ConsistencyToken>,
) -> (StatusCode, Option<String>, Value) {
    let mut request = stack.client.get(stack.query.url(path));
    if let Some(token) = token {
        request = request
            .header("keel-consistency-token", token.encode())
            .header("keel-consistency-timeout", "30000");
    }
    let r = request.send().await.unwrap();
    let held = r
        .headers()
        .get("keel-held-back")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.status(), held, r.json().await.unwrap_or_default())
}

/// The default: a poison record parks its stream only. The stream's later records are held
/// back, the partition's other streams flow; reads of the stream say it is held back, and a
/// token covering a held-back record answers 503 rather than the stale view; `dead-letters`
/// lists it, a retry with code that still cannot read it leaves it parked, and a discard
/// with a reason lets the stream flow again.
#[tokio::test]
async fn a_poison_record_parks_only_its_stream_until_an_operator_discards_it() {
    let stack = Stack::start("park", 2).await;
    let body = json!({"customer_id": "c-1", "lines": [{"sku": "S", "quantity": 1, "unit_price": eur(100)}]});
    let (_, _, first) = stack.post("/v1/orders/p-1/place", body.clone()).await;
    stack.get("/v1/orders/p-1", first.as_ref()).await;
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let topic = settings.topic("order");
    let partition = partition_for(b"p-1", stack.config.partitions);
    let poison = LogProducer::new(&settings)
        .unwrap()
        .append(&topic, partition, "p-1", b"{not json", &[])
        .await
        .unwrap();
    let (status, _, paid) = stack
        .post(
            "/v1/orders/p-1/pay",
            json!({"amount": eur(100), "payment_ref": "pay-1"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let second = (2..)
        .map(|i| format!("p-{i}"))
        .find(|id| partition_for(id.as_bytes(), stack.config.partitions) == partition)
        .unwrap();
    let (_, _, after) = stack
        .post(&format!("/v1/orders/{second}/place"), body.clone())
        .await;

    // The partition's other stream flows, and is not held back.
    let (status, held, order) =
        get_held(&stack, &format!("/v1/orders/{second}"), after.as_ref()).await;
    assert_eq!((status, held), (StatusCode::OK, None), "{order}");
    // The parked stream: held back, and never served as current for a token covering it.
    let (status, held, problem) = get_held(&stack, "/v1/orders/p-1", paid.as_ref()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{problem}");
    assert_eq!(held, None);
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains("order/p-1") && detail.contains(&format!("offset {poison}")),
        "{detail}"
    );
    assert!(
        problem["type"].as_str().unwrap().ends_with("held-back"),
        "{problem}"
    );
    let r = stack
        .client
        .get(stack.query.url("/v1/orders/p-1"))
        .send()
        .await
        .unwrap();
    let position: ConsistencyToken = r.headers()["keel-projection-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let (status, held, order) = (
        r.status(),
        r.headers()
            .get("keel-held-back")
            .map(|v| v.to_str().unwrap().to_owned()),
        r.json::<Value>().await.unwrap(),
    );
    assert_eq!(
        (status, held.as_deref(), order["status"].as_str()),
        (StatusCode::OK, Some("1"), Some("placed")),
        "served without a token, it says it is held back"
    );
    assert!(
        position
            .positions()
            .all(|p| p.topic != topic || p.partition != partition || p.offset < poison),
        "the view's position stops before the record it holds back (offset {poison} of {topic}/{partition}): {position:?}"
    );
    let (status, _, _) = get_held(&stack, "/v1/orders?limit=10", Some(&position)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the view's own position sent back is served"
    );
    let (status, _, _) = get_held(&stack, "/v1/orders?limit=10", paid.as_ref()).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a list covering it"
    );
    let (status, _, _) = get_held(&stack, "/v1/orders?limit=10", after.as_ref()).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a list whose token covers a later record of the partition covers the parked one too"
    );
    let (status, held, page) = get_held(&stack, "/v1/orders?limit=10", first.as_ref()).await;
    assert_eq!(
        (status, held.as_deref()),
        (StatusCode::OK, Some("1")),
        "a list whose token comes before the parked record says one is held back: {page}"
    );
    let orders = stack.projection("orders").await;
    assert_eq!(
        (orders["state"].as_str(), orders["parked_streams"].as_i64()),
        (Some("running"), Some(1))
    );
    let unit = orders["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["topic"] == topic.as_str() && p["partition"] == partition)
        .unwrap();
    let parked = &unit["parked"][0];
    assert_eq!(
        (
            parked["stream_id"].as_str(),
            parked["first_offset"].as_i64(),
            parked["records"].as_i64()
        ),
        (Some("p-1"), Some(poison), Some(2)),
        "{unit}"
    );

    // The command line lists it; a retry cannot read it either; a discard needs a reason.
    let (code, out, err) = stack
        .projector_command(&["dead-letters", "list"], &[])
        .await
        .unwrap();
    assert!(code.success(), "{err}");
    assert!(
        out.contains("orders order/p-1") && out.contains(&format!("from offset {poison}")),
        "{out}"
    );
    let (code, out, err) = stack
        .projector_command(&["dead-letters", "retry", "orders", "order/p-1"], &[])
        .await
        .unwrap();
    assert_eq!(code.code(), Some(1), "{out}{err}");
    assert!(
        out.contains(&format!("still parked at offset {poison}")),
        "{out}"
    );
    let (code, _, err) = stack
        .projector_command(&["dead-letters", "discard", "orders", "order/p-1"], &[])
        .await
        .unwrap();
    assert!(!code.success() && err.contains("--reason"), "{err}");
    let (code, out, err) = stack
        .projector_command(
            &[
                "dead-letters",
                "discard",
                "orders",
                "order/p-1",
                "--reason",
                "corrupt record written by hand",
                "--actor",
                "ops-ada",
            ],
            &[],
        )
        .await
        .unwrap();
    assert!(code.success(), "{out}{err}");
    assert!(out.contains("discarded 2 records"), "{out}");
    let pool = stack.pool().await;
    let discarded: Vec<(i64, String, Option<String>, Option<String>)> = sqlx::query_as(
        r#"SELECT "offset", status, resolved_by, resolution FROM keel_dead_letters
           WHERE projection = 'orders' ORDER BY "offset""#,
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(discarded.len(), 2);
    assert!(
        discarded
            .iter()
            .all(|(_, status, by, why)| status == "discarded"
                && by.as_deref() == Some("ops-ada")
                && why.as_deref() == Some("corrupt record written by hand")),
        "{discarded:?}"
    );
    assert_eq!(discarded[0].0, poison);
    // It flows again: nothing is held back, and the token is served.
    let (status, held, _) = get_held(&stack, "/v1/orders/p-1", paid.as_ref()).await;
    assert_eq!((status, held), (StatusCode::OK, None));
    assert_eq!(stack.projection("orders").await["parked_streams"], 0);

    // The query API published the latency of the reads it served, for rebuild pacing.
    let deadline = Instant::now() + Duration::from_secs(10);
    let published = loop {
        let windows: Option<(i64, f32)> =
            sqlx::query_as("SELECT sum(requests)::bigint, max(p99_ms) FROM keel_query_windows")
                .fetch_one(&pool)
                .await
                .ok()
                .and_then(|(n, p99): (Option<i64>, Option<f32>)| n.zip(p99));
        if windows.is_some_and(|(n, _)| n >= 5) || Instant::now() > deadline {
            break windows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (reads, p99) = published.expect("the query API publishes its latencies");
    // The five reads served (not the 503s, which end before the read).
    assert!(reads >= 5 && p99 > 0.0, "{reads} reads, p99 {p99} ms");
}

#[tokio::test]
async fn a_poison_record_stops_the_projection_or_is_skipped_and_counted() {
    let mut stack = Stack::start("poison", 2).await;
    stack.projector.take().unwrap().stop().await.unwrap();
    stack.projector = Some(
        Service::projector(&stack.config, &stack.db.url(), &["--on-error", "stop"])
            .await
            .unwrap(),
    );
    let body = json!({"customer_id": "c-1", "lines": [{"sku": "S", "quantity": 1, "unit_price": eur(100)}]});
    let (_, _, first) = stack.post("/v1/orders/p-1/place", body.clone()).await;
    stack.get("/v1/orders/p-1", first.as_ref()).await;

    // A valid Kafka record that is not JSON, in the partition of p-1 and p-2.
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let topic = settings.topic("order");
    let partition = partition_for(b"p-1", stack.config.partitions);
    let producer = LogProducer::new(&settings).unwrap();
    let poison = producer
        .append(&topic, partition, "p-1", b"{not json", &[])
        .await
        .unwrap();
    let second = (2..)
        .map(|i| format!("p-{i}"))
        .find(|id| partition_for(id.as_bytes(), stack.config.partitions) == partition)
        .unwrap();
    let (_, _, after) = stack
        .post(&format!("/v1/orders/{second}/place"), body.clone())
        .await;

    // Stop: the dead letter names the offset; nothing after it is applied.
    let pool = stack.pool().await;
    let waited = Instant::now();
    let state = loop {
        let orders = stack.projection("orders").await;
        let state = (
            orders["state"].as_str().unwrap_or_default().to_owned(),
            orders["error"].as_str().map(str::to_owned),
        );
        if state.0 == "stopped" || waited.elapsed() > Duration::from_secs(30) {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state.0, "stopped");
    assert!(
        state
            .1
            .as_deref()
            .unwrap()
            .contains(&format!("offset {poison}")),
        "{state:?}"
    );
    let dead: (i64, String, Vec<u8>, bool) = sqlx::query_as(
        r#"SELECT "offset", error, payload, skipped FROM keel_dead_letters WHERE projection = 'orders'"#,
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (dead.0, dead.2.as_slice(), dead.3),
        (poison, &b"{not json"[..], false)
    );
    let (status, _) = stack.get(&format!("/v1/orders/{second}"), None).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing after the poison record is applied"
    );
    let (_, projections) = stack.get("/v1/projections", None).await;
    let orders = projections["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "orders")
        .unwrap()
        .clone();
    assert_eq!(
        (orders["state"].as_str(), orders["dead_letters"].as_i64()),
        (Some("stopped"), Some(1))
    );

    // Skip: it goes on, and counts the dead letter as skipped.
    stack.projector.take().unwrap().kill().await.unwrap();
    stack.projector = Some(
        Service::projector(&stack.config, &stack.db.url(), &["--on-error", "skip"])
            .await
            .unwrap(),
    );
    let (status, order) = stack
        .get(&format!("/v1/orders/{second}"), after.as_ref())
        .await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let skipped: bool =
        sqlx::query_scalar("SELECT skipped FROM keel_dead_letters WHERE projection = 'orders'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(skipped);
    assert_eq!(stack.projection("orders").await["state"], "running");
}

#[tokio::test]
async fn the_whole_stack_through_http_with_pagination_over_a_thousand_orders() {
    let stack = Stack::start("e2e", 4).await;
    let (s, _, _) = stack
        .post(
            "/v1/products/MUG-1/register",
            json!({"name": "Mug", "price": eur(1299)}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    stack
        .post(
            "/v1/customers/c-1/register",
            json!({"email": "ada@example.com", "name": "Ada"}),
        )
        .await;
    let stack = Arc::new(stack);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let stack = stack.clone();
        tasks.spawn(async move {
            let body = json!({"customer_id": "c-1", "lines": [{"sku": "MUG-1", "quantity": 1, "unit_price": eur(1299)}]});
            stack.post(&format!("/v1/orders/o-{i:04}/place"), body).await.2.unwrap()
        });
        while tasks.len() >= 32 {
            tasks.join_next().await;
        }
    }
    let mut token = ConsistencyToken::default();
    while let Some(t) = tasks.join_next().await {
        token = token.merge(&t.unwrap());
    }
    // A big payment is flagged; the order is paid and shipped.
    let (_, _, t) = stack
        .post(
            "/v1/orders/big-1/place",
            json!({"customer_id": "c-1",
        "lines": [{"sku": "MUG-1", "quantity": 1000, "unit_price": eur(1299)}]}),
        )
        .await;
    token = token.merge(&t.unwrap());
    let (s, paid, t) = stack
        .post(
            "/v1/orders/big-1/pay",
            json!({"amount": eur(1_299_000), "payment_ref": "wire-1"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{paid}");
    token = token.merge(&t.unwrap());
    // What the fulfilment process would send once the stock is taken out.
    for step in ["confirm-reservation", "mark-ready-to-ship"] {
        let (s, body, _) = stack
            .post(&format!("/v1/orders/big-1/{step}"), json!({}))
            .await;
        assert_eq!(s, StatusCode::OK, "{step}: {body}");
    }
    let (_, _, t) = stack
        .post(
            "/v1/orders/big-1/ship",
            json!({"carrier": "DHL", "tracking": "JD01"}),
        )
        .await;
    token = token.merge(&t.unwrap());

    let (s, order) = stack.get("/v1/orders/big-1", Some(&token)).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (
            order["status"].as_str(),
            order["paid_minor"].as_i64(),
            order["tracking"].as_str()
        ),
        (Some("shipped"), Some(1_299_000), Some("JD01"))
    );
    let (_, customer) = stack.get("/v1/customers/c-1", Some(&token)).await;
    assert_eq!(
        (customer["order_count"].as_i64(), customer["email"].as_str()),
        (Some(1001), Some("ada@example.com"))
    );
    assert_eq!(customer["lifetime_value"]["EUR"], 1_299_000);
    let (_, flagged) = stack
        .get("/v1/reports/flagged-payments", Some(&token))
        .await;
    assert_eq!(flagged["items"][0]["payment_ref"], "wire-1");
    let (_, product) = stack.get("/v1/products/MUG-1", Some(&token)).await;
    assert_eq!(product["price_minor"], 1299);

    // Walk the 1,000 placed orders, 37 at a time: no gaps, no repeats.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            None => "/v1/orders?status=placed&limit=37".to_owned(),
            Some(c) => format!("/v1/orders?status=placed&limit=37&cursor={c}"),
        };
        let (s, page) = stack.get(&path, Some(&token)).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["order_id"].as_str().unwrap().to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let expected: Vec<String> = (0..1000).map(|i| format!("o-{i:04}")).collect();
    assert_eq!(seen, expected);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 1000);

    // Limits are capped, bad parameters are 400, ETags give 304.
    let (_, page) = stack.get("/v1/orders?limit=100000", None).await;
    assert_eq!(page["limit"], 500);
    let (s, problem) = stack.get("/v1/orders?cursor=nonsense", None).await;
    assert_eq!(
        (s, problem["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("cursor"))
    );
    let (s, _) = stack.get("/v1/orders?colour=red", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let r = stack
        .client
        .get(stack.query.url("/v1/orders/big-1"))
        .send()
        .await
        .unwrap();
    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
    assert!(r.headers().contains_key("keel-projection-position"));
    let r = stack
        .client
        .get(stack.query.url("/v1/orders/big-1"))
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    // Every projection runs, with no dead letter.
    let (_, projections) = stack.get("/v1/projections", None).await;
    let all = projections["projections"].as_array().unwrap();
    assert_eq!(all.len(), 6);
    assert!(
        all.iter()
            .all(|p| p["state"] == "running" && p["dead_letters"] == 0),
        "{projections}"
    );
}

#[tokio::test]
async fn the_gates_stream_versions_survive_restarts_through_snapshots() {
    // Small batches and a snapshot every second batch row: restarts restore the gate from
    // snapshots and the batch rows after them, many times over.
    let mut stack = Stack::start("gate-snapshots", 2).await;
    stack.projector.take().unwrap().kill().await.unwrap();
    let mut config = stack.config.clone();
    config.extra_env.extend([
        ("KEEL_GATE_SNAPSHOT_EVERY", "2".to_owned()),
        ("KEEL_BATCH_SIZE", "5".to_owned()),
    ]);
    let url = stack.db.url();
    let start = || Service::projector(&config, &url, &[]);
    const ORDERS: usize = 30;
    let mut projector = start().await.unwrap();
    let token = stack
        .post_many(
            (0..ORDERS).map(|i| {
                (
                    format!("/v1/orders/gs-{i}/place"),
                    json!({"customer_id": "c-1", "lines": [{"sku": "S", "quantity": 1, "unit_price": eur(1000)}]}),
                )
            }),
            8,
            StatusCode::CREATED,
        )
        .await;
    stack.get("/v1/orders/gs-0", Some(&token)).await;
    // Three rounds of a payment per order, the projector killed and restarted after each:
    // a gate restored without a stream's version would skip its next payment.
    for round in 0..3 {
        projector.kill().await.unwrap();
        projector = start().await.unwrap();
        let token = stack
            .post_many(
                (0..ORDERS).map(|i| {
                    (
                        format!("/v1/orders/gs-{i}/pay"),
                        json!({"amount": eur(100), "payment_ref": format!("r{round}")}),
                    )
                }),
                8,
                StatusCode::OK,
            )
            .await;
        let (status, _) = stack.get("/v1/orders/gs-0", Some(&token)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let pool = stack.pool().await;
    let paid: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT order_id, paid_minor, version FROM orders ORDER BY order_id")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(paid.len(), ORDERS);
    for (id, paid, version) in &paid {
        assert_eq!((*paid, *version), (300, 4), "order {id}");
    }
    let (_, status) = stack.get("/v1/projections", None).await;
    let projections = status["projections"].as_array().unwrap();
    assert!(!projections.is_empty());
    for p in projections {
        for partition in p["partitions"].as_array().unwrap() {
            assert_eq!(
                partition["rejected"], 0,
                "{} skipped a valid commit",
                p["name"]
            );
        }
    }
    // Snapshots were written, and each replaced the rows before it: no partition keeps a
    // row older than its latest snapshot.
    let (snapshots, older): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE snapshot),
                count(*) FILTER (WHERE next_offset < (SELECT max(s.next_offset) FROM keel_gate_versions s
                    WHERE s.snapshot AND s.projection = v.projection AND s.generation = v.generation
                      AND s.topic = v.topic AND s.partition = v.partition))
         FROM keel_gate_versions v",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(snapshots > 0, "snapshots were written");
    assert_eq!(older, 0, "rows before a snapshot are deleted");
    projector.kill().await.unwrap();
}
