//! Scenario: order fulfilment. Clients place orders of two lines as fast as they are
//! answered while the fulfilment process reserves their stock; measured per order, from
//! `OrderPlaced` (its commit's time) to "awaiting payment" (every line reserved and the
//! order's confirmation read back from the log), beside B_cmd, the clients' own
//! `place` round trip; and the orders per second the process brings to "awaiting payment",
//! beside the orders per second the clients placed.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_bench::report::{Report, Row};
use keel_tests::{Stack, eur};
use serde_json::json;

use crate::{Options, ms, step};

/// Clients placing orders at once.
const CLIENTS: usize = 16;
/// Products the orders draw from (stock enough for every order).
const PRODUCTS: usize = 20;

/// Runs the scenario and adds its rows.
pub(crate) async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    step("fulfilment: starting the whole stack and the fulfilment process");
    let stack = Stack::start("bench-fulfil", 8).await;
    let _process = stack.fulfilment_process("30m", &[]).await?;
    for p in 0..PRODUCTS {
        for (command, body) in [
            ("register", json!({"name": "P", "price": eur(500)})),
            ("restock", json!({"quantity": 1_000_000})),
        ] {
            let (status, body, _) = stack
                .post(&format!("/v1/products/F-{p}/{command}"), body)
                .await;
            anyhow::ensure!(status.is_success(), "{command} F-{p}: {status} {body}");
        }
    }
    step(&format!(
        "fulfilment: {CLIENTS} clients placing orders for {} s",
        options.seconds
    ));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (client, url) = (stack.client.clone(), stack.command.url(""));
        tasks.spawn(async move {
            let mut round_trips = Vec::new();
            let mut n = 0usize;
            while Instant::now() < deadline {
                n += 1;
                let lines = json!([
                    {"sku": format!("F-{}", (c + n) % PRODUCTS), "quantity": 1, "unit_price": eur(500)},
                    {"sku": format!("F-{}", (c + n + 7) % PRODUCTS), "quantity": 2, "unit_price": eur(500)},
                ]);
                let sent = Instant::now();
                let answer = client
                    .post(format!("{url}/v1/orders/F-{c}-{n}/place"))
                    .json(&json!({"customer_id": format!("c-{c}"), "lines": lines}))
                    .send()
                    .await?;
                anyhow::ensure!(answer.status().is_success(), "placing: {}", answer.status());
                answer.bytes().await?;
                round_trips.push(sent.elapsed());
            }
            anyhow::Ok(round_trips)
        });
    }
    let mut round_trips = Vec::new();
    while let Some(done) = tasks.join_next().await {
        round_trips.extend(done??);
    }
    let placing = started.elapsed();
    round_trips.sort();
    let placed = round_trips.len();
    anyhow::ensure!(placed > 0, "no order placed");

    step(&format!(
        "fulfilment: waiting for {placed} orders to await payment"
    ));
    let pool = stack.pool().await;
    let wait_until = Instant::now() + Duration::from_secs(120 + options.seconds * 4);
    loop {
        let waiting: i64 =
            sqlx::query_scalar("SELECT count(*) FROM fulfilment WHERE step = 'awaiting_payment'")
                .fetch_one(&pool)
                .await?;
        if waiting as usize >= placed {
            break;
        }
        anyhow::ensure!(
            Instant::now() < wait_until,
            "only {waiting} of {placed} orders await payment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each order's time from its OrderPlaced commit to awaiting payment, and the span from
    // the first order placed to the last one brought there.
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM step_since - placed_at)::float8 FROM fulfilment
         WHERE step = 'awaiting_payment' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(step_since) - min(placed_at))::float8 FROM fulfilment",
    )
    .fetch_one(&pool)
    .await
    .context("the span of the orders")?;
    pool.close().await;
    let latencies: Vec<Duration> = latencies
        .into_iter()
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
        .collect();
    let p = |v: &[Duration], q: f64| ms(keel_bench::percentile(v, q));
    let scenario = format!("Fulfilment, {CLIENTS} clients ({placed} orders of 2 lines)");
    report.rows.push(Row::beside(
        &scenario,
        "OrderPlaced → awaiting payment p50 ms",
        p(&latencies, 0.5),
        "B_cmd place p50",
        p(&round_trips, 0.5),
    ));
    report.rows.push(Row::beside(
        &scenario,
        "OrderPlaced → awaiting payment p99 ms",
        p(&latencies, 0.99),
        "B_cmd place p99",
        p(&round_trips, 0.99),
    ));
    report.rows.push(Row::beside(
        &scenario,
        "orders/s brought to awaiting payment",
        placed as f64 / span.max(0.001),
        "orders/s placed",
        placed as f64 / placing.as_secs_f64(),
    ));
    Ok(())
}
