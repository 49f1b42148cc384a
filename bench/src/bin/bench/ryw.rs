//! Scenario 5: read-your-writes. A client places an order, then asks the query API for it
//! with the command's consistency token; the time from the command's answer to the
//! query's successful answer is set beside B_e2e, a bare produce-to-consume round trip.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_bench::bare_round_trips;
use keel_bench::plot::{Chart, Series, cdf};
use keel_bench::report::{Report, Row};
use keel_kafka::ensure_topics;
use keel_tests::{Stack, eur, unique_prefix};
use serde_json::json;

use crate::{Options, Plots, ms, step};

/// Clients placing orders and reading them back at once.
pub(crate) const CLIENTS: usize = 8;
/// The projector's batch linger (`KEEL_BATCH_LINGER_MS`): how long a batch waits for
/// more records before it is applied.
const FLUSH_INTERVAL_MS: f64 = 20.0;

/// Read-your-writes samples of `CLIENTS` clients placing orders `<prefix>-…` through
/// `command` and reading each back through `query` with its token, for `seconds`.
pub(crate) async fn samples(
    client: &reqwest::Client,
    command: &str,
    query: &str,
    prefix: &str,
    seconds: u64,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (client, command, query) = (client.clone(), command.to_owned(), query.to_owned());
        let prefix = prefix.to_owned();
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                n += 1;
                let id = format!("{prefix}-{c}-{n}");
                let answer = client
                    .post(format!("{command}/v1/orders/{id}/place"))
                    .json(&json!({"customer_id": format!("c-{c}"),
                                  "lines": [{"sku": "SKU-1", "quantity": 1, "unit_price": eur(500)}]}))
                    .send()
                    .await?;
                anyhow::ensure!(answer.status().is_success(), "placing {id}: {}", answer.status());
                let body: serde_json::Value = answer.json().await?;
                let answered = Instant::now();
                let token = body["consistency_token"]
                    .as_str()
                    .context("no consistency token")?
                    .to_owned();
                let read = client
                    .get(format!("{query}/v1/orders/{id}"))
                    .header("keel-consistency-token", token)
                    .header("keel-consistency-timeout", "10000")
                    .send()
                    .await?;
                anyhow::ensure!(read.status().is_success(), "reading {id}: {}", read.status());
                read.bytes().await?;
                samples.push(answered.elapsed());
            }
            anyhow::Ok(samples)
        });
    }
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        samples.extend(done??);
    }
    samples.sort();
    anyhow::ensure!(!samples.is_empty(), "no read-your-writes sample");
    Ok(samples)
}

/// Runs the scenario and adds its rows and plots.
pub(crate) async fn run(
    options: &Options,
    report: &mut Report,
    plots: &mut Plots,
) -> anyhow::Result<()> {
    step("read-your-writes: starting the whole stack");
    let stack = Stack::start("bench-ryw", 8).await;
    step(&format!(
        "read-your-writes: {CLIENTS} clients for {} s",
        options.seconds
    ));
    let samples = samples(
        &stack.client,
        &stack.command.url(""),
        &stack.query.url(""),
        "ryw",
        options.seconds,
    )
    .await?;

    step("B_e2e: bare produce-to-consume round trips");
    let settings = stack.broker.settings(&unique_prefix("bench-e2e"), 1);
    let topic = ensure_topics(&settings, &["e2e"]).await?.remove(0);
    let rounds = (samples.len()).clamp(200, 2000);
    let bare =
        tokio::task::spawn_blocking(move || bare_round_trips(&settings, &topic, rounds)).await??;

    let p = |v: &[Duration], q: f64| ms(keel_bench::percentile(v, q));
    let bound = p(&bare, 0.99) + FLUSH_INTERVAL_MS + 20.0;
    let scenario = format!("Read-your-writes ({} samples)", samples.len());
    report.rows.push(Row::beside(
        &scenario,
        "p50 ms",
        p(&samples, 0.5),
        "B_e2e p50",
        p(&bare, 0.5),
    ));
    report.rows.push(
        Row::beside(
            &scenario,
            "p99 ms",
            p(&samples, 0.99),
            "B_e2e p99",
            p(&bare, 0.99),
        )
        .at_most("≤ B_e2e p99 + flush interval 20 ms + 20 ms", bound),
    );
    plots.add(
        "read-your-writes.svg",
        "From a command's answer to its successful query, beside B_e2e",
        Chart {
            title: "Read-your-writes latency (cumulative)".into(),
            x_label: "latency, ms (log scale)".into(),
            y_label: "% at or below".into(),
            log_x: true,
            series: vec![
                Series::new("command answer → query", cdf(&samples)),
                Series::new("B_e2e produce → consume", cdf(&bare)),
            ],
        },
    );
    Ok(())
}
