//! Scenario: order fulfilment, in two phases on one stack.
//!
//! * **Capacity.** Clients place orders of two lines as fast as they are answered while
//!   the fulfilment process reserves their stock: the orders per second it brings to
//!   "awaiting payment" (every line reserved and the order's confirmation read back from
//!   the log), beside the orders per second the clients placed. Placing outruns the
//!   process, so its times are mostly queueing.
//! * **Latency.** The clients place orders at a fixed pace, half the capacity measured:
//!   each order's time from `OrderPlaced` (its commit's time) to "awaiting payment",
//!   beside B_cmd, the clients' own `place` round trip.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_bench::report::{Report, Row};
use keel_tests::{Stack, eur};
use serde_json::json;
use sqlx::PgPool;

use crate::{Options, ms, step};

/// Clients placing orders at once.
const CLIENTS: usize = 16;
/// Products the orders draw from (stock enough for every order).
const PRODUCTS: usize = 20;
/// The paced phase's load, as a share of the capacity measured.
const PACED_SHARE: f64 = 0.5;

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
    let pool = stack.pool().await;
    let seconds = Duration::from_secs(options.seconds);

    step(&format!(
        "fulfilment: {CLIENTS} clients placing orders as fast as answered for {} s",
        options.seconds
    ));
    let (round_trips, placing) = place(&stack, "C", seconds, None).await?;
    let placed = round_trips.len();
    wait_awaiting_payment(&pool, "C", placed, options).await?;
    let span: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM max(step_since) - min(placed_at))::float8 FROM fulfilment
         WHERE order_id LIKE 'C-%'",
    )
    .fetch_one(&pool)
    .await
    .context("the span of the orders")?;
    let sustained = placed as f64 / span.max(0.001);
    report.rows.push(Row::beside(
        &format!("Fulfilment, {CLIENTS} clients unpaced ({placed} orders of 2 lines)"),
        "orders/s brought to awaiting payment",
        sustained,
        "orders/s placed",
        placed as f64 / placing.as_secs_f64(),
    ));

    let rate = (sustained * PACED_SHARE).max(1.0);
    step(&format!(
        "fulfilment: placing {rate:.0} orders/s (half of that) for {} s",
        options.seconds
    ));
    let (mut round_trips, paced) = place(&stack, "P", seconds, Some(rate)).await?;
    round_trips.sort();
    // The pace reached (a client whose answers come slower than its pace falls behind).
    let reached = round_trips.len() as f64 / paced.as_secs_f64();
    if reached < rate * 0.95 {
        step(&format!(
            "fulfilment: the clients placed only {reached:.0} of {rate:.0} orders/s"
        ));
    }
    wait_awaiting_payment(&pool, "P", round_trips.len(), options).await?;
    let latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM step_since - placed_at)::float8 FROM fulfilment
         WHERE order_id LIKE 'P-%' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await?;
    pool.close().await;
    let latencies: Vec<Duration> = latencies
        .into_iter()
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
        .collect();
    let p = |v: &[Duration], q: f64| ms(keel_bench::percentile(v, q));
    let scenario = format!(
        "Fulfilment, {reached:.0} orders/s paced ({} orders of 2 lines)",
        latencies.len()
    );
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
    Ok(())
}

/// Places orders `<prefix>-<client>-<n>` from [`CLIENTS`] clients for `seconds`: as fast
/// as answered, or `rate` orders/s in all. Returns each `place` round trip and how long
/// the placing took.
async fn place(
    stack: &Stack,
    prefix: &'static str,
    seconds: Duration,
    rate: Option<f64>,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let started = Instant::now();
    let deadline = started + seconds;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (client, url) = (stack.client.clone(), stack.command.url(""));
        // Each client's share of the pace, its first order offset so the clients interleave.
        let mut pace = rate.map(|r| {
            let every = Duration::from_secs_f64(CLIENTS as f64 / r);
            let mut ticks = tokio::time::interval_at(
                tokio::time::Instant::now() + every.mul_f64(c as f64 / CLIENTS as f64),
                every,
            );
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        tasks.spawn(async move {
            let mut round_trips = Vec::new();
            let mut n = 0usize;
            loop {
                if let Some(pace) = &mut pace {
                    pace.tick().await;
                }
                if Instant::now() >= deadline {
                    break;
                }
                n += 1;
                let lines = json!([
                    {"sku": format!("F-{}", (c + n) % PRODUCTS), "quantity": 1, "unit_price": eur(500)},
                    {"sku": format!("F-{}", (c + n + 7) % PRODUCTS), "quantity": 2, "unit_price": eur(500)},
                ]);
                let sent = Instant::now();
                let answer = client
                    .post(format!("{url}/v1/orders/{prefix}-{c}-{n}/place"))
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
    anyhow::ensure!(!round_trips.is_empty(), "no order placed");
    Ok((round_trips, placing))
}

/// Waits until the `placed` orders `<prefix>-…` await payment.
async fn wait_awaiting_payment(
    pool: &PgPool,
    prefix: &str,
    placed: usize,
    options: &Options,
) -> anyhow::Result<()> {
    step(&format!(
        "fulfilment: waiting for {placed} orders to await payment"
    ));
    let wait_until = Instant::now() + Duration::from_secs(120 + options.seconds * 4);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM fulfilment WHERE step = 'awaiting_payment' AND order_id LIKE $1",
        )
        .bind(format!("{prefix}-%"))
        .fetch_one(pool)
        .await?;
        if waiting as usize >= placed {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < wait_until,
            "only {waiting} of {placed} orders await payment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
