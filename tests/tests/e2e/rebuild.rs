//! Blue/green rebuilds against the real broker and PostgreSQL: under load, killed halfway
//! and resumed, refused when one already runs, and started by a changed code version.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keel_schemas::ConsistencyToken;
use keel_tests::{Service, Stack, eur};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

/// Places orders `ids` with 32 in flight; returns the merged consistency token.
async fn place_orders(stack: &Stack, ids: std::ops::Range<usize>) -> ConsistencyToken {
    let requests = ids.map(|i| {
        (
            format!("/v1/orders/ro-{i}/place"),
            json!({"customer_id": format!("c-{}", i % 40),
                   "lines": [{"sku": "SKU-1", "quantity": i % 5 + 1, "unit_price": eur(100 + (i % 9) as i64)}]}),
        )
    });
    stack.post_many(requests, 32, StatusCode::CREATED).await
}

/// Every row of the views `orders` and `daily_sales`, in key order.
async fn snapshot(pool: &PgPool) -> (Vec<Value>, Vec<Value>) {
    let orders = sqlx::query_scalar("SELECT to_jsonb(o) FROM orders o ORDER BY order_id")
        .fetch_all(pool)
        .await
        .unwrap();
    let sales = sqlx::query_scalar("SELECT to_jsonb(d) FROM daily_sales d ORDER BY day, currency")
        .fetch_all(pool)
        .await
        .unwrap();
    (orders, sales)
}

/// The live generation of `projection` and the code version it was built with, as
/// `GET /v1/projections` reports them.
async fn generation(stack: &Stack, projection: &str) -> (i64, i64) {
    let status = stack.projection(projection).await;
    (
        status["generation"].as_i64().unwrap(),
        status["code_version"].as_i64().unwrap(),
    )
}

fn orders_placed(sales: &Value) -> i64 {
    sales["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["orders_placed"].as_i64().unwrap())
        .sum()
}

/// Waits until both views have passed `token`: a query waits up to the query API's
/// bound and answers 503 past it, which on a loaded machine is asked again (no timing is
/// asserted here, only that the views catch up).
async fn caught_up(stack: &Stack, token: &ConsistencyToken) {
    for path in ["/v1/orders/ro-0", "/v1/reports/daily-sales"] {
        let mut tries = 0;
        loop {
            let (status, body) = stack.get(path, Some(token)).await;
            tries += 1;
            if status == StatusCode::SERVICE_UNAVAILABLE && tries < 5 {
                continue;
            }
            if status != StatusCode::OK {
                // The lines that say what went wrong, not a backtrace's frames.
                let tail = |log: String| {
                    let lines: Vec<&str> = log
                        .lines()
                        .filter(|l| !l.starts_with("  "))
                        .rev()
                        .take(30)
                        .collect();
                    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
                };
                panic!(
                    "{path}: {status} {body}\nthe projector's last log lines:\n{}\nthe checkpoints: {:?}",
                    stack
                        .projector
                        .as_ref()
                        .map(|p| tail(p.log()))
                        .unwrap_or_default(),
                    stack.projection("orders").await["partitions"]
                );
            }
            break;
        }
    }
}

#[tokio::test]
async fn a_rebuild_under_load_swaps_without_a_failed_or_half_built_read() {
    let mut stack = Stack::start("rebuild-load", 4).await;
    // A live runner in small batches: a swap that left the new generation behind the live
    // one would stay visible long enough for the reader below to see it.
    stack.projector.take().unwrap().stop().await.unwrap();
    let mut small_batches = stack.config.clone();
    small_batches
        .extra_env
        .push(("KEEL_BATCH_SIZE", "20".to_owned()));
    stack.projector = Some(
        Service::projector(&small_batches, &stack.db.url(), &[])
            .await
            .unwrap(),
    );
    let stack = stack;
    let before = 1500;
    let token = place_orders(&stack, 0..before).await;
    caught_up(&stack, &token).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writing = {
        let stop = Arc::clone(&stop);
        let stack = &stack;
        async move {
            let mut next = before;
            let mut token = ConsistencyToken::default();
            while !stop.load(Ordering::Relaxed) {
                token = token.merge(&place_orders(stack, next..next + 16).await);
                next += 16;
            }
            (next, token)
        }
    };
    let reading = {
        let stop = Arc::clone(&stop);
        let stack = &stack;
        async move {
            // A half-built view would show fewer orders than a read before it did.
            let (mut reads, mut most_sales, mut most_listed) = (0u64, 0i64, 0usize);
            while !stop.load(Ordering::Relaxed) {
                let (status, sales) = stack.get("/v1/reports/daily-sales", None).await;
                assert_eq!(status, StatusCode::OK, "{sales}");
                let placed = orders_placed(&sales);
                assert!(
                    placed >= most_sales,
                    "daily sales went back from {most_sales} to {placed} orders"
                );
                most_sales = placed;
                // One customer's orders: a list that fits one page and keeps growing.
                let (status, page) = stack
                    .get("/v1/orders?customer_id=c-7&limit=500", None)
                    .await;
                assert_eq!(status, StatusCode::OK, "{page}");
                let listed = page["items"].as_array().unwrap().len();
                assert!(listed < 500, "the page holds the whole list");
                assert!(
                    listed >= most_listed,
                    "c-7's orders went back from {most_listed} to {listed}"
                );
                most_listed = listed;
                reads += 2;
            }
            reads
        }
    };
    let rebuilding = {
        let stop = Arc::clone(&stop);
        let stack = &stack;
        async move {
            let (status, stdout, stderr) = stack
                .projector_command(&["rebuild", "orders", "daily_sales"], &[])
                .await
                .unwrap();
            // Let the load run on against the new generations for a moment.
            tokio::time::sleep(Duration::from_millis(500)).await;
            stop.store(true, Ordering::Relaxed);
            (status, stdout, stderr)
        }
    };
    let ((placed, token), reads, (status, _, stderr)) = tokio::join!(writing, reading, rebuilding);
    assert!(status.success(), "the rebuild failed: {stderr}");
    assert_eq!(
        stderr.matches("swapped in").count(),
        2,
        "both projections were swapped in: {stderr}"
    );
    assert!(reads > 10, "the reader kept reading through the rebuild");

    caught_up(&stack, &token).await;
    let pool = stack.pool().await;
    assert_eq!(generation(&stack, "orders").await.0, 2);
    assert_eq!(generation(&stack, "daily_sales").await.0, 2);
    // The live runner follows the new generation: a write after the swap is read.
    let late = place_orders(&stack, placed..placed + 1).await;
    caught_up(&stack, &late).await;
    let (_, sales) = stack.get("/v1/reports/daily-sales", None).await;
    assert_eq!(orders_placed(&sales), (placed + 1) as i64);
    let live = snapshot(&pool).await;
    assert_eq!(live.0.len(), placed + 1);

    // A fresh rebuild made after the load stopped equals it row for row.
    let (status, _, stderr) = stack
        .projector_command(&["rebuild", "orders", "daily_sales"], &[])
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert_eq!(generation(&stack, "orders").await.0, 3);
    assert_eq!(snapshot(&pool).await, live);
    // The old generations' tables are gone; only the live ones remain.
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE tablename LIKE 'orders_g%' OR tablename LIKE 'daily_sales_g%'
         ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(tables, ["daily_sales_g3", "orders_g3"]);
    // The rebuilt generation got its secondary indexes before the swap.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexname::text FROM pg_indexes WHERE tablename = 'orders_g3' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        indexes,
        ["orders_g3_customer", "orders_g3_pkey", "orders_g3_status"]
    );
}

/// Waits until the rebuild of `projection` has read at least `records` records.
async fn rebuild_progress(stack: &Stack, projection: &str, records: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = stack.projection(projection).await["rebuild"]["records_done"].as_i64();
        if let Some(done) = done
            && done >= records
        {
            return done;
        }
        assert!(Instant::now() < deadline, "the rebuild made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_killed_rebuild_leaves_the_live_view_and_resumes() {
    let mut stack = Stack::start("rebuild-kill", 4).await;
    let orders = 2000;
    let token = place_orders(&stack, 0..orders).await;
    caught_up(&stack, &token).await;
    let pool = stack.pool().await;
    let live = snapshot(&pool).await;
    assert_eq!(live.0.len(), orders);

    // Small batches make the rebuild slow enough to be caught halfway: its own, and those
    // of the running projector, which helps fill it.
    let slow = [("KEEL_BATCH_SIZE", "2".to_owned())];
    stack.projector.take().unwrap().stop().await.unwrap();
    stack.projector = Some(stack.projector_process(&["run"], &slow).await.unwrap());
    let rebuild = stack
        .projector_process(&["rebuild", "orders"], &slow)
        .await
        .unwrap();
    rebuild_progress(&stack, "orders", 100).await;

    // A second rebuild of the same projection is refused while the first runs.
    let (status, _, stderr) = stack
        .projector_command(&["rebuild", "orders"], &[])
        .await
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("a rebuild of orders is already running"),
        "{stderr}"
    );
    // GET /v1/projections shows the rebuild's progress.
    let (status, projections) = stack.get("/v1/projections", None).await;
    assert_eq!(status, StatusCode::OK);
    let progress = projections["projections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "orders")
        .unwrap()["rebuild"]
        .clone();
    assert_eq!(progress["generation"], 2, "{projections}");
    assert!(progress["records_done"].as_i64().unwrap() >= 100);

    rebuild.kill().await.unwrap();
    let done = stack.projection("orders").await["rebuild"]["records_done"]
        .as_i64()
        .unwrap();
    assert!(
        done < orders as i64,
        "killed halfway ({done} of more than {orders} records)"
    );
    // The live view is untouched and keeps serving.
    assert_eq!(generation(&stack, "orders").await.0, 1);
    assert_eq!(snapshot(&pool).await, live);
    let (status, _) = stack.get("/v1/orders?limit=10", None).await;
    assert_eq!(status, StatusCode::OK);

    // Run again: it resumes from the new generation's checkpoints and finishes.
    let (status, _, stderr) = stack
        .projector_command(&["rebuild", "orders"], &[])
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("resuming from its checkpoints"), "{stderr}");
    assert_eq!(generation(&stack, "orders").await.0, 2);
    assert_eq!(snapshot(&pool).await, live);

    // A changed code version is rebuilt by `projector run` on its own, blue/green.
    stack.projector.take().unwrap().stop().await.unwrap();
    sqlx::query("UPDATE keel_projections SET code_version = 0 WHERE name = 'daily_sales'")
        .execute(&pool)
        .await
        .unwrap();
    let before = generation(&stack, "daily_sales").await.0;
    stack.projector = Some(
        Service::projector(&stack.config, &stack.db.url(), &[])
            .await
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (generation, code) = generation(&stack, "daily_sales").await;
        if code != 0 {
            assert_eq!(generation, before + 1);
            break;
        }
        assert!(Instant::now() < deadline, "daily_sales was not rebuilt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(snapshot(&pool).await, live);
}

/// A rebuild asked for through PostgreSQL (`projector rebuild --request`, a row in
/// `keel_rebuild_requests`) is carried out by the running `projector run` process: the
/// next generation is swapped in with the same rows, and the request records its outcome
/// and actor.
#[tokio::test]
async fn a_rebuild_requested_through_postgres_is_carried_out_by_the_running_projector() {
    let stack = Stack::start("rebuild-request", 2).await;
    let token = place_orders(&stack, 0..40).await;
    caught_up(&stack, &token).await;
    let pool = stack.pool().await;
    let before = snapshot(&pool).await;
    let (generation_before, _) = generation(&stack, "orders").await;
    let (code, out, err) = stack
        .projector_command(
            &["rebuild", "orders", "--request"],
            &[("USER", "ops-ada".to_owned())],
        )
        .await
        .unwrap();
    assert!(code.success(), "{out}{err}");
    assert!(out.contains("orders: swapped in"), "{out}");
    assert_eq!(
        generation(&stack, "orders").await.0,
        generation_before + 1,
        "the running projector swapped the next generation in"
    );
    assert_eq!(snapshot(&pool).await, before, "with the same rows");
    let (actor, ok, taken): (String, bool, bool) =
        sqlx::query_as("SELECT actor, ok, taken_by IS NOT NULL FROM keel_rebuild_requests")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((actor.as_str(), ok, taken), ("ops-ada", true, true));
}
