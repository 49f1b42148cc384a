//! What observability costs. Metrics are always on, so every other figure includes their
//! recording; what an operator adds is scraping, so commands/s while `/metrics` is scraped
//! ten times a second are set beside the same load not scraped. Traces are off by
//! default: commands/s, read-your-writes (a command, then its read with the consistency
//! token, every process tracing) and reads with traces exported, every request sampled,
//! to an OTLP/HTTP sink in the harness, beside the same with traces off.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use keel_bench::load::{self, LoadResult};
use keel_bench::report::{Report, Row};
use keel_tests::{Broker, Stack};

use crate::ryw::CLIENTS;
use crate::{Options, step};

/// An OTLP/HTTP sink on a free port that takes every export and counts its bytes: its
/// base URL and the count.
async fn sink() -> anyhow::Result<(String, Arc<AtomicU64>)> {
    let bytes = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&bytes);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counted = Arc::clone(&counted);
            async move {
                counted.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((format!("http://{addr}"), bytes))
}

/// The environment of a process exporting its traces to `sink`.
fn traced(sink: &str) -> Vec<(&'static str, String)> {
    vec![("KEEL_OTLP_ENDPOINT", sink.to_owned())]
}

/// Runs the scenarios and adds their rows.
pub(crate) async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let (sink, exported) = sink().await?;
    commands(options, report, &sink, &exported).await?;
    reads(options, report, &sink).await
}

/// Commands/s and latency of one command API with traces off, then scraped, then of one
/// exporting its traces, each on a fresh broker.
async fn commands(
    options: &Options,
    report: &mut Report,
    sink: &str,
    exported: &AtomicU64,
) -> anyhow::Result<()> {
    const CLIENTS: usize = 64;
    async fn load(
        api: &keel_tests::Service,
        workload: Arc<load::Workload>,
        seconds: u64,
    ) -> LoadResult {
        load::closed_loop(&api.client, &api.url(""), workload, CLIENTS, seconds).await
    }

    step("observability: a command API with traces off");
    let broker = Broker::start().await?;
    let (api, _config, workload) =
        crate::commands::ready_api(&broker, "bench-obs-off", options.streams, &[]).await?;
    step(&format!(
        "observability: {CLIENTS} clients for {} s, traces off",
        options.seconds
    ));
    let off = load(&api, workload.clone(), options.seconds).await;
    step(&format!(
        "observability: {CLIENTS} clients for {} s, /metrics scraped every 100 ms",
        options.seconds
    ));
    let scrapes = {
        let (client, url) = (api.client.clone(), api.url("/metrics"));
        let until = Instant::now() + Duration::from_secs(options.seconds);
        tokio::spawn(async move {
            let (mut n, mut bytes) = (0u64, 0usize);
            while Instant::now() < until {
                if let Ok(r) = client.get(&url).send().await
                    && let Ok(body) = r.bytes().await
                {
                    n += 1;
                    bytes = body.len();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (n, bytes)
        })
    };
    let scraped = load(&api, workload.clone(), options.seconds).await;
    let (n, size) = scrapes.await?;
    // The same instance not scraped again, after: the load it has taken grows its state, so
    // the scraped run is set beside the runs before and after it together.
    step(&format!(
        "observability: {CLIENTS} clients for {} s, not scraped again",
        options.seconds
    ));
    let after = load(&api, workload, options.seconds).await;
    let not_scraped = merged(&off, &after);
    api.stop().await?;
    drop(broker);

    step("observability: a command API exporting its traces");
    let broker = Broker::start().await?;
    let env = traced(sink);
    let env: Vec<(&'static str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (api, _config, workload) =
        crate::commands::ready_api(&broker, "bench-obs-traced", options.streams, &env).await?;
    step(&format!(
        "observability: {CLIENTS} clients for {} s, traces exported",
        options.seconds
    ));
    let before = exported.load(Ordering::Relaxed);
    let on = load(&api, workload, options.seconds).await;
    api.stop().await?;
    let sent = exported.load(Ordering::Relaxed) - before;
    drop(broker);

    let scenario = format!("Commands, {CLIENTS} clients, traces exported");
    rows(report, &scenario, &on, "traces off", &off);
    let scenario = format!("Commands, {CLIENTS} clients, /metrics scraped 10×/s");
    rows(
        report,
        &scenario,
        &scraped,
        "not scraped (before and after)",
        &not_scraped,
    );
    report.notes.push(format!(
        "Observability: {n} scrapes of the command API's /metrics ({size} bytes each) during its \
         load; {:.1} MB of spans exported by the traced command API ({:.0} bytes per command).",
        sent as f64 / 1e6,
        sent as f64 / (on.rate() * options.seconds as f64).max(1.0)
    ));
    Ok(())
}

/// Two runs as one: every latency, over both runs' time.
fn merged(first: &LoadResult, second: &LoadResult) -> LoadResult {
    let mut latencies: Vec<Duration> = first
        .latencies
        .iter()
        .chain(&second.latencies)
        .copied()
        .collect();
    latencies.sort();
    LoadResult {
        latencies,
        per_second: first
            .per_second
            .iter()
            .chain(&second.per_second)
            .copied()
            .collect(),
        errors: first.errors + second.errors,
        elapsed: first.elapsed + second.elapsed,
    }
}

/// Commands/s and the two latencies of `keel` beside `baseline`.
fn rows(report: &mut Report, scenario: &str, keel: &LoadResult, name: &str, baseline: &LoadResult) {
    report.rows.push(Row::beside(
        scenario,
        "commands/s",
        keel.rate(),
        &format!("{name} commands/s"),
        baseline.rate(),
    ));
    crate::commands::latency_rows(report, scenario, keel, name, baseline);
}

/// Read-your-writes and reads by id on a whole stack with traces off, then on one with
/// every process exporting its traces.
async fn reads(options: &Options, report: &mut Report, sink: &str) -> anyhow::Result<()> {
    let mut measured = Vec::new();
    for (name, env) in [
        ("traces off", Vec::new()),
        ("traces exported", traced(sink)),
    ] {
        step(&format!("observability: the whole stack, {name}"));
        let stack = Stack::start_with_env("bench-obs", 8, env).await;
        let (command, query) = (stack.command.url(""), stack.query.url(""));
        step(&format!(
            "observability: read-your-writes, {CLIENTS} clients for {} s, {name}",
            options.seconds
        ));
        let ryw =
            crate::ryw::samples(&stack.client, &command, &query, "obs", options.seconds).await?;
        step(&format!(
            "observability: reads by id, {CLIENTS} clients for {} s, {name}",
            options.seconds
        ));
        let reads = read_by_id(&stack.client, &query, options.seconds).await?;
        measured.push((ryw, reads));
    }
    let [(ryw_off, reads_off), (ryw_on, reads_on)] =
        <[_; 2]>::try_from(measured).map_err(|_| anyhow::anyhow!("two stacks were measured"))?;
    for (scenario, on, off) in [
        ("Read-your-writes, traces exported", &ryw_on, &ryw_off),
        ("Reads by id, traces exported", &reads_on, &reads_off),
    ] {
        crate::readpath::rows(report, scenario, on, "traces off", off);
    }
    report.rows.push(Row::beside(
        "Reads by id, traces exported",
        "reads/s",
        reads_on.len() as f64 / options.seconds as f64,
        "traces off reads/s",
        reads_off.len() as f64 / options.seconds as f64,
    ));
    Ok(())
}

/// `GET /v1/orders/{id}` of the orders read-your-writes placed (each client's first five),
/// `CLIENTS` clients for `seconds`: each read's latency, sorted.
async fn read_by_id(
    client: &reqwest::Client,
    query: &str,
    seconds: u64,
) -> anyhow::Result<Vec<Duration>> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (client, query) = (client.clone(), query.to_owned());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut n = 0;
            while Instant::now() < deadline {
                let id = format!("obs-{}-{}", (c + n) % CLIENTS, n % 5 + 1);
                n += 1;
                let started = Instant::now();
                let read = client.get(format!("{query}/v1/orders/{id}")).send().await?;
                anyhow::ensure!(
                    read.status().is_success(),
                    "reading {id}: {}",
                    read.status()
                );
                read.bytes().await?;
                samples.push(started.elapsed());
            }
            anyhow::Ok(samples)
        });
    }
    let mut samples = Vec::new();
    while let Some(done) = tasks.join_next().await {
        samples.extend(done??);
    }
    samples.sort();
    anyhow::ensure!(!samples.is_empty(), "no read");
    Ok(samples)
}
