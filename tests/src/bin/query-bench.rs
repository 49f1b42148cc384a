//! Query latency measured beside a bare primary-key SELECT, in one run:
//!
//! * **B_select**: `SELECT … FROM orders WHERE order_id = $1` with sqlx, one at a time;
//! * **Keel**: `GET /v1/orders/{id}` and `GET /v1/orders?limit=50` through the query API,
//!   first closed-loop with 16 clients to find its maximum rate, then open-loop at half
//!   that rate, where latency is read.
//!
//! ```sh
//! cargo build --release -p command-api -p projector -p query-api -p keel-tests --bins
//! target/release/query-bench 10000
//! ```
//! It starts a broker (memory storage), the three services and a database of its own,
//! places the orders through the command API, and waits until the view holds them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_tests::bench::percentile;
use keel_tests::{Stack, eur};
use serde_json::{Value, json};

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let orders: usize = std::env::args()
        .nth(1)
        .map_or(Ok(10_000), |s| s.parse())
        .context("orders")?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(orders))
}

async fn run(orders: usize) -> anyhow::Result<()> {
    let stack = Stack::start("query-bench", 8).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let requests = (0..orders).map(|i| {
        (
            format!("/v1/orders/q-{i}/place"),
            json!({"customer_id": format!("c-{}", i % 100),
                   "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": eur(500)}]}),
        )
    });
    let token = stack
        .post_many(requests, 64, reqwest::StatusCode::CREATED)
        .await;
    let (status, _) = stack.get("/v1/orders/q-0", Some(&token)).await;
    anyhow::ensure!(status.is_success(), "the view did not catch up");
    println!(
        "setup: {orders} orders placed and projected in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // B_select.
    let pool = stack.pool().await;
    let mut bare = Vec::with_capacity(5000);
    for i in 0..5000 {
        let id = format!("q-{}", (i * 7919) % orders);
        let sent = Instant::now();
        let _: Option<Value> =
            sqlx::query_scalar("SELECT to_jsonb(o) FROM orders o WHERE order_id = $1")
                .bind(&id)
                .fetch_optional(&pool)
                .await?;
        bare.push(sent.elapsed());
    }
    bare.sort();
    let (b50, b99) = (percentile(&bare, 0.5), percentile(&bare, 0.99));
    println!("B_select: p50 {:.2} ms, p99 {:.2} ms", ms(b50), ms(b99));

    for (name, path) in [
        (
            "by id",
            Arc::new(|i: usize| format!("/v1/orders/q-{i}"))
                as Arc<dyn Fn(usize) -> String + Send + Sync>,
        ),
        (
            "list",
            Arc::new(|i: usize| format!("/v1/orders?customer_id=c-{}&limit=50", i % 100)),
        ),
    ] {
        // Closed loop: the most it serves.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut workers = tokio::task::JoinSet::new();
        for c in 0..16 {
            let (client, base, path) = (client.clone(), stack.query.url(""), Arc::clone(&path));
            workers.spawn(async move {
                let (mut n, mut i) = (0u64, c * 131);
                while Instant::now() < deadline {
                    i = (i * 31 + 7) % orders;
                    if client
                        .get(format!("{base}{}", path(i)))
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                    {
                        n += 1;
                    }
                }
                n
            });
        }
        let mut served = 0;
        while let Some(n) = workers.join_next().await {
            served += n?;
        }
        let max = served as f64 / 5.0;
        // Open loop at half of it: requests are sent on schedule, whatever the answers do.
        let rate = (max / 2.0).max(1.0);
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let until = Instant::now() + Duration::from_secs(10);
        let mut requests = tokio::task::JoinSet::new();
        let mut i = 0usize;
        while Instant::now() < until {
            ticker.tick().await;
            i = (i * 31 + 7) % orders;
            let (client, url) = (client.clone(), stack.query.url(&path(i)));
            requests.spawn(async move {
                let sent = Instant::now();
                let ok = client
                    .get(url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                (ok, sent.elapsed())
            });
        }
        let (mut latencies, mut failed) = (Vec::new(), 0);
        while let Some(r) = requests.join_next().await {
            let (ok, latency) = r?;
            if ok {
                latencies.push(latency);
            } else {
                failed += 1;
            }
        }
        latencies.sort();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        let target = 3.0 * ms(b99) + 2.0;
        println!(
            "Keel {name}: max {max:.0} requests/s; at {rate:.0}/s p50 {:.2} ms, p99 {:.2} ms ({failed} failed); \
             target p99 <= 3 x B_select p99 + 2 ms = {target:.2} ms: {}",
            ms(p50),
            ms(p99),
            if ms(p99) <= target { "met" } else { "missed" }
        );
    }
    Ok(())
}
