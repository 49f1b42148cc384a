//! The read path's resilience, measured as read-your-writes of healthy streams:
//!
//! * with one stream parked (a poison record it holds back, and commands to it still
//!   arriving) against without: the other streams must not notice;
//! * through a query API on a PostgreSQL hot standby against one on the primary.

use std::time::{Duration, Instant};

use keel_bench::report::{Report, Row};
use keel_kafka::{LogProducer, partition_for};
use keel_tests::{Broker, CommandApiConfig, PrivatePostgres, Service, Stack, eur, unique_prefix};
use serde_json::json;

use crate::ryw::CLIENTS;
use crate::{Options, ms, step};

/// Runs the scenarios and adds their rows.
pub(crate) async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    parked(options, report).await?;
    replica(options, report).await
}

/// Adds p50 and p99 rows of `samples` beside `baseline`'s, which is called `name`.
pub(crate) fn rows(
    report: &mut Report,
    scenario: &str,
    samples: &[Duration],
    name: &str,
    baseline: &[Duration],
) {
    let p = |v: &[Duration], q: f64| ms(keel_bench::percentile(v, q));
    for (measure, q) in [("p50 ms", 0.5), ("p99 ms", 0.99)] {
        report.rows.push(Row::beside(
            scenario,
            measure,
            p(samples, q),
            &format!("{name} {measure}"),
            p(baseline, q),
        ));
    }
}

/// Healthy streams' read-your-writes with one parked stream against without.
async fn parked(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    step("parked stream: starting the whole stack");
    let stack = Stack::start("bench-parked", 8).await;
    let (command, query) = (stack.command.url(""), stack.query.url(""));
    step(&format!(
        "parked stream: read-your-writes of healthy streams, {CLIENTS} clients for {} s, nothing parked",
        options.seconds
    ));
    let without =
        crate::ryw::samples(&stack.client, &command, &query, "h1", options.seconds).await?;

    // A poison record parks order `parked`; commands to it keep arriving and are held back.
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let place = json!({"customer_id": "c-p", "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": eur(500)}]});
    let (status, _, _) = stack.post("/v1/orders/parked/place", place).await;
    anyhow::ensure!(status.is_success(), "placing the order to park: {status}");
    LogProducer::new(&settings)?
        .append(
            &settings.topic("order"),
            partition_for(b"parked", stack.config.partitions),
            "parked",
            b"{not json",
            &[],
        )
        .await?;
    let poking = {
        let (client, command) = (stack.client.clone(), command.clone());
        let until = Instant::now() + Duration::from_secs(options.seconds + 5);
        tokio::spawn(async move {
            let mut n = 0;
            while Instant::now() < until {
                n += 1;
                let _ = client
                    .post(format!("{command}/v1/orders/parked/pay"))
                    .json(&json!({"amount": eur(1), "payment_ref": format!("p-{n}")}))
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let pool = stack.pool().await;
    let started = Instant::now();
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM keel_parked_streams")
        .fetch_one(&pool)
        .await?
        == 0
    {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(30),
            "the poison record parked no stream in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    step(&format!(
        "parked stream: read-your-writes of healthy streams for {} s, one stream parked",
        options.seconds
    ));
    let with = crate::ryw::samples(&stack.client, &command, &query, "h2", options.seconds).await?;
    poking.abort();
    let held: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(records), 0)::bigint FROM keel_parked_streams WHERE projection = 'orders'",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    rows(
        report,
        &format!(
            "Read-your-writes of healthy streams, one stream parked ({held} records held back; {} samples)",
            with.len()
        ),
        &with,
        "none parked",
        &without,
    );
    Ok(())
}

/// Read-your-writes through a query API on a hot standby against one on the primary.
async fn replica(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    step("replica: a private primary, a hot standby of it, and the stack on the primary");
    let primary = PrivatePostgres::start("bench-primary").await?;
    let standby = primary.standby("bench-standby").await?;
    let broker = Broker::start().await?;
    let config = CommandApiConfig::new(&broker, &unique_prefix("bench-replica"), 8, "cmd-r");
    let command = Service::command_api_ready(&config).await?;
    let _projector = Service::projector(&config, &primary.url("keel"), &[]).await?;
    let started = Instant::now();
    loop {
        let prepared = match sqlx::PgPool::connect(&standby.url("keel")).await {
            Ok(pool) => {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_projections")
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(0);
                pool.close().await;
                n
            }
            Err(_) => 0,
        };
        if prepared as usize >= keel_views::PROJECTIONS.len() {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the standby did not replay the views within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_primary = Service::query_api(&config, &primary.url("keel")).await?;
    let on_standby = Service::query_api(&config, &standby.url("keel")).await?;
    on_primary.wait_ready().await?;
    on_standby.wait_ready().await?;
    let client = config.auth.full_client();
    step(&format!(
        "replica: read-your-writes through the primary's query API for {} s",
        options.seconds
    ));
    let primary_samples = crate::ryw::samples(
        &client,
        &command.url(""),
        &on_primary.url(""),
        "rp",
        options.seconds,
    )
    .await?;
    step(&format!(
        "replica: read-your-writes through the standby's query API for {} s",
        options.seconds
    ));
    let standby_samples = crate::ryw::samples(
        &client,
        &command.url(""),
        &on_standby.url(""),
        "rs",
        options.seconds,
    )
    .await?;
    rows(
        report,
        &format!(
            "Read-your-writes through a query API on a hot standby ({} samples)",
            standby_samples.len()
        ),
        &standby_samples,
        "on the primary",
        &primary_samples,
    );
    Ok(())
}
