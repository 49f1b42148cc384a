//! Scenario 1: commands/s one command-api instance accepts under the mixed shop workload,
//! beside B_http (same client, same concurrency, a handler that only parses) and
//! B_produce (a bare producer into the same broker); then on durable storage.

use std::sync::Arc;

use anyhow::Context;
use keel_bench::load::{self, LoadResult, Workload};
use keel_bench::plot::{Chart, Series, cdf};
use keel_bench::report::{Report, Row};
use keel_bench::{bare_produce, system};
use keel_kafka::ensure_topics;
use keel_tests::{Broker, CommandApiConfig, Service, TestDatabase, unique_prefix};

use crate::{Options, Plots, ms, step};

const PARTITIONS: i32 = 8;

/// Starts a command API on `broker` and creates the workload's streams through it.
pub(crate) async fn ready_api(
    broker: &Broker,
    name: &str,
    streams: usize,
    env: &[(&'static str, &str)],
) -> anyhow::Result<(Service, CommandApiConfig, Arc<Workload>)> {
    let mut config = CommandApiConfig::new(broker, &unique_prefix(name), PARTITIONS, "bench");
    for (name, value) in env {
        config.extra_env.push((name, (*value).to_owned()));
    }
    let api = Service::command_api_ready(&config).await?;
    let workload = Arc::new(Workload::new(streams));
    let setup = workload.setup();
    let commands = setup.len();
    let failed = load::post_all(&api.client, &api.url(""), setup, 64).await;
    anyhow::ensure!(failed == 0, "{failed} of {commands} set-up commands failed");
    Ok((api, config, workload))
}

/// p50 and p99 rows of `keel` beside `baseline`'s, which is called `name`.
pub(crate) fn latency_rows(
    report: &mut Report,
    scenario: &str,
    keel: &LoadResult,
    name: &str,
    baseline: &LoadResult,
) {
    for (label, p) in [("p50 ms", 0.5), ("p99 ms", 0.99)] {
        report.rows.push(Row::beside(
            scenario,
            label,
            ms(keel.percentile(p)),
            &format!("{name} {label}"),
            ms(baseline.percentile(p)),
        ));
    }
}

/// Runs the scenario and adds its rows and plots.
pub(crate) async fn run(
    options: &Options,
    report: &mut Report,
    plots: &mut Plots,
) -> anyhow::Result<()> {
    step("commands: starting a broker (memory storage) and the command API");
    let broker = Broker::start().await?;
    let (api, config, workload) =
        ready_api(&broker, "bench-commands", options.streams, &[]).await?;
    let pid = api.pid().context("the command API exited")?;
    let idle_rss = system::rss_bytes(pid).unwrap_or_default();
    let http = load::baseline_http().await?;

    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    let mut first = None;
    let mut pipelined = Vec::new();
    for clients in [64, 256] {
        step(&format!(
            "commands: {clients} clients for {} s over {} streams",
            options.seconds,
            workload.streams()
        ));
        let keel = load::closed_loop(
            &api.client,
            &api.url(""),
            workload.clone(),
            clients,
            options.seconds,
        )
        .await;
        step(&format!(
            "B_http: {clients} clients for {} s",
            options.seconds
        ));
        let bare = Arc::new(Workload::new(options.streams));
        let baseline = load::closed_loop(&api.client, &http, bare, clients, options.seconds).await;
        let scenario = format!("Commands, {clients} clients");
        report.rows.push(
            Row::beside(
                &scenario,
                "commands/s",
                keel.rate(),
                "B_http req/s",
                baseline.rate(),
            )
            .at_least(0.3),
        );
        latency_rows(report, &scenario, &keel, "B_http", &baseline);
        if keel.errors > 0 {
            report.notes.push(format!(
                "{scenario}: {} commands were not accepted (non-2xx or transport error).",
                keel.errors
            ));
        }
        for (name, r) in [
            (format!("Keel, {clients} clients"), &keel),
            (format!("B_http, {clients} clients"), &baseline),
        ] {
            throughput.push(Series::new(
                name.clone(),
                r.per_second
                    .iter()
                    .enumerate()
                    .map(|(s, n)| (s as f64 + 1.0, *n as f64))
                    .collect(),
            ));
            latency.push(Series::new(name, cdf(&r.latencies)));
        }
        first.get_or_insert(keel.rate());
        pipelined.push((clients, keel.rate(), keel.percentile(0.99)));
    }
    let loaded_rss = system::rss_bytes(pid).unwrap_or_default();
    api.stop().await?;

    // The same load on an instance that decides each flush only once the one before it
    // is answered: what pipelining the flushes gives, in this run.
    step("commands: the same loads, one flush at a time (KEEL_FLUSH_PIPELINE=1)");
    // On a broker of its own, as fresh as the first one was.
    let serial_broker = Broker::start().await?;
    let (api, _, workload) = ready_api(
        &serial_broker,
        "bench-commands-serial",
        options.streams,
        &[("KEEL_FLUSH_PIPELINE", "1")],
    )
    .await?;
    for (clients, rate, p99) in pipelined {
        let serial = load::closed_loop(
            &api.client,
            &api.url(""),
            workload.clone(),
            clients,
            options.seconds,
        )
        .await;
        let scenario = format!("Commands, {clients} clients, pipelined flushes");
        report.rows.push(Row::beside(
            &scenario,
            "commands/s",
            rate,
            "one flush at a time",
            serial.rate(),
        ));
        report.rows.push(Row::beside(
            &scenario,
            "p99 ms",
            ms(p99),
            "one flush at a time",
            ms(serial.percentile(0.99)),
        ));
    }
    api.stop().await?;
    drop(serial_broker);

    step("B_produce: bare producer, memory storage");
    let settings = broker.settings(&unique_prefix("bench-produce"), PARTITIONS);
    let topic = ensure_topics(&settings, &["produce"]).await?.remove(0);
    let records = (options.events / 5).max(10_000);
    let produce = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || bare_produce(&settings, &topic, records)).await??
    };
    report.rows.push(Row::beside(
        "Commands, 64 clients",
        "commands/s",
        first.unwrap_or_default(),
        "B_produce records/s",
        produce,
    ));
    report.rows.push(Row::plain(
        "Command API memory",
        "resident MB, ready, no streams",
        idle_rss as f64 / 1e6,
    ));
    report.rows.push(Row::plain(
        "Command API memory",
        &format!(
            "resident MB after the loads ({} streams)",
            workload.streams()
        ),
        loaded_rss as f64 / 1e6,
    ));
    drop(config);
    drop(broker);

    step("commands on durable storage: a broker keeping its log in PostgreSQL");
    let db = TestDatabase::created("bench_log").await?;
    let durable = Broker::start_durable(&db.url()).await?;
    let (api, _config, workload) =
        ready_api(&durable, "bench-durable", options.streams, &[]).await?;
    step(&format!(
        "commands (durable): 64 clients for {} s",
        options.seconds
    ));
    let keel = load::closed_loop(&api.client, &api.url(""), workload, 64, options.seconds).await;
    api.stop().await?;
    step("B_produce: bare producer, durable storage");
    let settings = durable.settings(&unique_prefix("bench-produce"), PARTITIONS);
    let topic = ensure_topics(&settings, &["produce"]).await?.remove(0);
    let records = (options.events / 20).max(5_000);
    let produce =
        tokio::task::spawn_blocking(move || bare_produce(&settings, &topic, records)).await??;
    report.rows.push(Row::beside(
        "Commands, 64 clients, durable storage",
        "commands/s",
        keel.rate(),
        "B_produce records/s (durable)",
        produce,
    ));
    report.rows.push(Row::plain(
        "Commands, 64 clients, durable storage",
        "p99 ms",
        ms(keel.percentile(0.99)),
    ));
    drop(durable);

    plots.add(
        "commands-throughput.svg",
        "Commands accepted per second, beside B_http",
        Chart {
            title: "Commands accepted per second (memory storage)".into(),
            x_label: "second of the run".into(),
            y_label: "requests/s".into(),
            log_x: false,
            series: throughput,
        },
    );
    plots.add(
        "commands-latency.svg",
        "Command latency distribution, beside B_http",
        Chart {
            title: "Command latency (cumulative)".into(),
            x_label: "latency, ms (log scale)".into(),
            y_label: "% of requests at or below".into(),
            log_x: true,
            series: latency,
        },
    );
    Ok(())
}
