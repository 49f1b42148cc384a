//! Scenarios 2 to 4 over one log of `OrderPlaced` commits, beside B_consume (a bare
//! consumer draining it), B_upsert (a bare batched upsert of rows shaped like the orders
//! view) and B_select (a bare primary-key SELECT):
//!
//! * catch-up of `orders` from offset 0, with the projector's memory over time;
//! * queries by id and lists through the query API, at half of their maximum rate;
//! * rebuilds of `orders` and `daily_sales`;
//! * the same queries while a rebuild runs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_bench::load::answered;
use keel_bench::plot::{Chart, Series, cdf};
use keel_bench::report::{Report, Row};
use keel_bench::{bare_selects, bare_upsert, drain, percentile, system};
use keel_tests::{Service, TestDatabase, workspace_binary};
use sqlx::PgPool;

use crate::order_log::{OrderLog, PARTITIONS};
use crate::{Options, Plots, ms, step};

/// Clients of the closed loop that finds a query's maximum rate.
const QUERY_CLIENTS: usize = 16;
/// How long live reads run before a rebuild starts among them, as in a running system;
/// the requests sent meanwhile are not counted.
const LEAD: Duration = Duration::from_secs(2);

type PathFn = Arc<dyn Fn(usize) -> String + Send + Sync>;

/// How a rebuild among live reads is started.
#[derive(Clone, Copy)]
enum Started {
    /// `projector rebuild`: a process of its own, started among the reads.
    Command,
    /// A row in `keel_rebuild_requests`, which a running `projector run` process takes.
    Requested,
}

impl Started {
    /// The pacing as the report names it.
    fn label(self, pace: &str) -> String {
        match self {
            Self::Command => pace.to_owned(),
            Self::Requested => format!("{pace}, requested of a running projector"),
        }
    }

    /// The pacing as a plot's file name holds it.
    fn slug(self, pace: &str) -> String {
        match self {
            Self::Command => pace.to_owned(),
            Self::Requested => format!("{pace}-requested"),
        }
    }
}

/// A rebuild started among live reads.
enum Rebuilding {
    Process(Box<Service>),
    /// The request's id.
    Request(i64),
}

/// How long a `projector run` started for a requested rebuild has to claim its units
/// before the reads begin.
const RUNNER_SETTLES: Duration = Duration::from_secs(3);

/// A query measured: its maximum rate, and latencies at a fixed rate.
struct QueryRun {
    max: f64,
    rate: f64,
    latencies: Vec<Duration>,
    failed: u64,
    /// The p99 of each [`SPAN`] of requests counted, by when they were sent (seconds, ms).
    timeline: Vec<(f64, f64)>,
}

/// The spans of a query run's timeline.
const SPAN: Duration = Duration::from_millis(500);

/// Successful answers per second with `QUERY_CLIENTS` clients asking as fast as they can.
async fn closed_max(
    client: &reqwest::Client,
    base: &str,
    path: &PathFn,
    ids: usize,
    seconds: f64,
) -> f64 {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..QUERY_CLIENTS {
        let (client, base, path) = (client.clone(), base.to_owned(), Arc::clone(path));
        workers.spawn(async move {
            let (mut n, mut i) = (0u64, c * 131);
            while Instant::now() < deadline {
                i = (i * 31 + 7) % ids;
                if answered(client.get(format!("{base}{}", path(i))).send().await).await {
                    n += 1;
                }
            }
            n
        });
    }
    let mut served = 0;
    while let Some(n) = workers.join_next().await {
        served += n.unwrap_or_default();
    }
    served as f64 / seconds
}

/// Requests sent on schedule at `rate` for `lead` and then `seconds`, whatever the
/// answers do; the latencies of the successful ones sent after `lead`, sorted, the
/// number of those that failed, and their p99 over time.
async fn open_loop(
    client: &reqwest::Client,
    base: &str,
    path: &PathFn,
    ids: usize,
    rate: f64,
    (lead, seconds): (Duration, u64),
) -> (Vec<Duration>, u64, Vec<(f64, f64)>) {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1.0)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let counted = Instant::now() + lead;
    let until = counted + Duration::from_secs(seconds);
    let mut requests = tokio::task::JoinSet::new();
    let mut i = 0usize;
    while Instant::now() < until {
        ticker.tick().await;
        i = (i * 31 + 7) % ids;
        let (client, url) = (client.clone(), format!("{base}{}", path(i)));
        requests.spawn(async move {
            let sent = Instant::now();
            let ok = answered(client.get(url).send().await).await;
            (ok, sent.checked_duration_since(counted), sent.elapsed())
        });
    }
    let (mut latencies, mut failed) = (Vec::new(), 0);
    let mut spans: BTreeMap<u128, Vec<Duration>> = BTreeMap::new();
    while let Some(r) = requests.join_next().await {
        match r {
            Ok((_, None, _)) => {}
            Ok((true, Some(at), latency)) => {
                latencies.push(latency);
                spans
                    .entry(at.as_millis() / SPAN.as_millis())
                    .or_default()
                    .push(latency);
            }
            _ => failed += 1,
        }
    }
    latencies.sort();
    let timeline = spans
        .into_iter()
        .map(|(span, mut latencies)| {
            latencies.sort();
            (
                span as f64 * SPAN.as_secs_f64(),
                ms(percentile(&latencies, 0.99)),
            )
        })
        .collect();
    (latencies, failed, timeline)
}

fn query_paths() -> [(&'static str, PathFn); 2] {
    [
        ("by id", Arc::new(|i: usize| format!("/v1/orders/bo-{i}"))),
        (
            "list of 50",
            Arc::new(|i: usize| format!("/v1/orders?customer_id=c-{}&limit=50", i % 1000)),
        ),
    ]
}

/// Measures both queries: maximum rates (unless `rates` gives them) and latencies at half,
/// counted after each has run for `lead`.
async fn queries(
    client: &reqwest::Client,
    base: &str,
    ids: usize,
    (lead, seconds): (Duration, u64),
    rates: Option<&[f64]>,
) -> Vec<QueryRun> {
    let mut runs = Vec::new();
    for (i, (name, path)) in query_paths().iter().enumerate() {
        let max = match rates {
            Some(rates) => rates[i] * 2.0,
            None => {
                step(&format!(
                    "queries {name}: the most it serves, {QUERY_CLIENTS} clients"
                ));
                closed_max(client, base, path, ids, (seconds as f64 / 2.0).max(1.0)).await
            }
        };
        let rate = (max / 2.0).max(1.0);
        step(&format!(
            "queries {name}: {rate:.0} requests/s for {seconds} s"
        ));
        let (latencies, failed, timeline) =
            open_loop(client, base, path, ids, rate, (lead, seconds)).await;
        runs.push(QueryRun {
            max,
            rate,
            latencies,
            failed,
            timeline,
        });
    }
    runs
}

/// Runs a projector command that prints JSON lines (a `rebuild --json`) with rebuilds
/// paced `pace`, to its end; the lines.
pub(crate) async fn rebuild_json(
    env: &[(&'static str, String)],
    args: &[&str],
    pace: &str,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let output = tokio::process::Command::new(workspace_binary("projector")?)
        .args(args)
        .envs(env.iter().cloned())
        .env("KEEL_REBUILD_PACE", pace)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("running projector rebuild")?;
    anyhow::ensure!(
        output.status.success(),
        "projector {} failed: {}",
        args.join(" "),
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).context("the rebuild's --json output"))
        .collect()
}

/// Seconds since `start` and the sum of `projection`'s checkpoints, sampled with the
/// projector's resident memory until the checkpoints reach `total`.
async fn follow_catch_up(
    db: &TestDatabase,
    pid: u32,
    total: i64,
) -> anyhow::Result<(f64, Vec<(f64, i64, u64)>)> {
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut pool: Option<PgPool> = None;
    let mut last_step = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if pool.is_none() {
            pool = PgPool::connect(&db.url()).await.ok();
        }
        let done: i64 = match &pool {
            Some(pool) => sqlx::query_scalar::<_, Option<i64>>(
                "SELECT sum(next_offset)::bigint FROM keel_checkpoints WHERE projection = 'orders'",
            )
            .fetch_one(pool)
            .await
            .ok()
            .flatten()
            .unwrap_or_default(),
            None => 0,
        };
        let t = started.elapsed().as_secs_f64();
        samples.push((t, done, system::rss_bytes(pid).unwrap_or_default()));
        if done >= total {
            return Ok((t, samples));
        }
        if last_step.elapsed() >= Duration::from_secs(10) {
            last_step = Instant::now();
            step(&format!("catch-up: {done} of {total} records"));
        }
        anyhow::ensure!(t < 1800.0, "the projector did not catch up in 30 minutes");
    }
}

/// Runs the scenarios and adds their rows and plots.
pub(crate) async fn run(
    options: &Options,
    report: &mut Report,
    plots: &mut Plots,
) -> anyhow::Result<()> {
    let events = options.events;
    let OrderLog {
        broker,
        config,
        settings,
        topic,
        total,
    } = OrderLog::write("projections", "bench-log", events).await?;

    step("B_consume: a bare consumer draining the log");
    let consume = {
        let (settings, topic) = (settings.clone(), topic.clone());
        total as f64
            / tokio::task::spawn_blocking(move || drain(&settings, &topic, PARTITIONS, total))
                .await??
    };
    step(&format!(
        "B_upsert: {events} rows, 1,000 per statement and transaction"
    ));
    let upsert_db = TestDatabase::created("bench_upsert").await?;
    let (upsert, upsert_indexed) = {
        let pool = PgPool::connect(&upsert_db.url()).await?;
        let rate = bare_upsert(&pool, events, false).await?;
        step("B_upsert again, with the view's two secondary indexes (for the analysis)");
        let indexed = bare_upsert(&pool, events, true).await?;
        pool.close().await;
        (rate, indexed)
    };
    drop(upsert_db);
    let (bound_name, bound) = if consume <= upsert {
        ("B_consume", consume)
    } else {
        ("B_upsert", upsert)
    };
    report
        .rows
        .push(Row::plain("Baselines", "B_consume records/s", consume));
    report
        .rows
        .push(Row::plain("Baselines", "B_upsert rows/s", upsert));
    report.rows.push(Row::plain(
        "Baselines",
        "B_upsert rows/s with the view's secondary indexes (not a target's baseline)",
        upsert_indexed,
    ));

    step(&format!(
        "catch-up: projector run --projection orders over {total} records"
    ));
    let db = TestDatabase::new("bench_views");
    let projector = Service::projector(&config, &db.url(), &["--projection", "orders"]).await?;
    let pid = projector.pid().context("the projector exited")?;
    let (seconds, samples) = follow_catch_up(&db, pid, total).await?;
    projector.kill().await?;
    let catch_up = events as f64 / seconds;
    let scenario = format!("Catch-up, orders, {events} events");
    report.rows.push(
        Row::beside(
            &scenario,
            "events/s",
            catch_up,
            &format!("min(B_consume, B_upsert) = {bound_name}"),
            bound,
        )
        .at_least(0.5),
    );
    let rss_at = |share: f64| {
        samples
            .iter()
            .find(|s| s.1 as f64 >= share * total as f64)
            .map_or(0.0, |s| s.2 as f64 / 1e6)
    };
    let (quarter, end) = (rss_at(0.25), rss_at(1.0));
    report.rows.push(
        Row::beside(
            "Projector memory during the catch-up",
            "resident MB at the end",
            end,
            "resident MB at 25%",
            quarter,
        )
        .at_most("flat: ≤ 1.1 × resident at 25%", 1.1 * quarter),
    );
    let mut throughput = vec![Series::new(
        "catch-up (orders)",
        samples
            .windows(2)
            .map(|w| (w[1].0, (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0)))
            .collect(),
    )];
    plots.add(
        "projector-memory.svg",
        "The projector's resident memory during the catch-up",
        Chart {
            title: format!("Projector resident memory, catch-up of {events} events"),
            x_label: "seconds".into(),
            y_label: "MB".into(),
            log_x: false,
            series: vec![Series::new(
                "projector run",
                samples.iter().map(|s| (s.0, s.2 as f64 / 1e6)).collect(),
            )],
        },
    );

    step("queries: starting the query API over the caught-up view");
    let query = Service::query_api(&config, &db.url()).await?;
    query.wait_ready().await?;
    let pool = PgPool::connect(&db.url()).await?;
    let bare = bare_selects(&pool, events, 5000).await?;
    let b99 = ms(percentile(&bare, 0.99));
    report.rows.push(Row::plain(
        "Baselines",
        "B_select p50 ms",
        ms(percentile(&bare, 0.5)),
    ));
    report
        .rows
        .push(Row::plain("Baselines", "B_select p99 ms", b99));
    let idle = queries(
        &query.client,
        &query.url(""),
        events,
        (Duration::ZERO, options.seconds),
        None,
    )
    .await;
    let mut latency = vec![Series::new("B_select", cdf(&bare))];
    let query_rows = |report: &mut Report, runs: &[QueryRun], during: Option<&str>| {
        for ((name, _), run) in query_paths().iter().zip(runs) {
            let scenario = format!(
                "Queries, {name}, at {:.0}/s{}",
                run.rate,
                during.map_or(String::new(), |d| format!(", {d}"))
            );
            if during.is_none() {
                report
                    .rows
                    .push(Row::plain(&scenario, "max requests/s", run.max));
            }
            report.rows.push(Row::beside(
                &scenario,
                "p50 ms",
                ms(percentile(&run.latencies, 0.5)),
                "B_select p50",
                ms(percentile(&bare, 0.5)),
            ));
            let (rule, bound) = if during.is_some() {
                ("≤ 2 × (3 × B_select p99 + 2 ms)", 2.0 * (3.0 * b99 + 2.0))
            } else {
                ("≤ 3 × B_select p99 + 2 ms", 3.0 * b99 + 2.0)
            };
            report.rows.push(
                Row::beside(
                    &scenario,
                    "p99 ms",
                    ms(percentile(&run.latencies, 0.99)),
                    "B_select p99",
                    b99,
                )
                .at_most(rule, bound),
            );
            if run.failed > 0 {
                report
                    .notes
                    .push(format!("{scenario}: {} requests failed.", run.failed));
            }
        }
    };
    query_rows(report, &idle, None);
    for ((name, _), run) in query_paths().iter().zip(&idle) {
        latency.push(Series::new(format!("{name}, idle"), cdf(&run.latencies)));
    }

    // Nothing else running: the reads above are over, and no longer the latest windows
    // of the query API's latency, which a rebuild starting among live reads would heed.
    tokio::time::sleep(Duration::from_secs(1)).await;
    step("rebuild: projector rebuild orders daily_sales");
    let mut env = config.env();
    env.push(("KEEL_DATABASE_URL", db.url()));
    let mut rebuild = tokio::process::Command::new(workspace_binary("projector")?);
    rebuild
        .args(["rebuild", "orders", "daily_sales", "--json"])
        .envs(env.iter().cloned())
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = rebuild.spawn().context("starting projector rebuild")?;
    let output = tokio::spawn(child.wait_with_output());
    let started = Instant::now();
    let mut progress: BTreeMap<String, Vec<(f64, i64)>> = BTreeMap::new();
    while !output.is_finished() {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let t = started.elapsed().as_secs_f64();
        for (projection, done) in
            sqlx::query_as::<_, (String, i64)>("SELECT projection, records_done FROM keel_rebuilds")
                .fetch_all(&pool)
                .await
                .unwrap_or_default()
        {
            progress.entry(projection).or_default().push((t, done));
        }
    }
    let output = output.await??;
    anyhow::ensure!(
        output.status.success(),
        "the rebuild failed: {}",
        output.status
    );
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let r: serde_json::Value =
            serde_json::from_str(line).context("the rebuild's --json output")?;
        let name = r["projection"].as_str().unwrap_or_default().to_owned();
        let scenario = format!("Rebuild, {name}, {events} events");
        report.rows.push(
            Row::beside(
                &scenario,
                "events/s",
                r["events_per_second"].as_f64().unwrap_or_default(),
                &format!("min(B_consume, B_upsert) = {bound_name}"),
                bound,
            )
            .at_least(0.5),
        );
        report.rows.push(Row::plain(
            &scenario,
            "swap lock held, ms",
            r["swap_lock_ms"].as_f64().unwrap_or_default(),
        ));
    }
    for (name, points) in progress {
        let offset = points.first().map_or(0.0, |p| p.0);
        throughput.push(Series::new(
            format!("rebuild ({name})"),
            points
                .windows(2)
                .filter(|w| w[1].1 >= w[0].1)
                .map(|w| {
                    (
                        w[1].0 - offset,
                        (w[1].1 - w[0].1) as f64 / (w[1].0 - w[0].0),
                    )
                })
                .collect(),
        ));
    }
    plots.add(
        "projections-throughput.svg",
        "Records applied per second: catch-up and rebuilds",
        Chart {
            title: format!("Projection throughput over {events} events"),
            x_label: "seconds since start".into(),
            y_label: "records/s".into(),
            log_x: false,
            series: throughput,
        },
    );

    // The same rebuild unpaced, with nothing else running: adaptive pacing must not slow a
    // rebuild that protects nothing (at least 70% of the unpaced rate).
    step("rebuild: projector rebuild orders, unpaced");
    let adaptive = report
        .rows
        .iter()
        .find(|r| {
            r.scenario == format!("Rebuild, orders, {events} events") && r.measure == "events/s"
        })
        .map(|r| r.keel);
    let unpaced = rebuild_json(&env, &["rebuild", "orders", "--json"], "off").await?;
    if let (Some(adaptive), Some(unpaced)) = (adaptive, unpaced.first()) {
        let unpaced = unpaced["events_per_second"].as_f64().unwrap_or_default();
        report.rows.push(
            Row::beside(
                &format!("Rebuild, orders, {events} events"),
                "events/s, adaptive pacing, nothing else running",
                adaptive,
                "unpaced",
                unpaced,
            )
            .at_least(0.7),
        );
    }

    // Queries during a rebuild of orders, with the rebuild paced adaptively (the default)
    // and unpaced; and the rebuild's own pace meanwhile.
    let rates: Vec<f64> = idle.iter().map(|r| r.rate).collect();
    for (pace, how) in [
        ("adaptive", Started::Command),
        ("off", Started::Command),
        // Last: a killed `projector run` leaves its heartbeat behind until it expires, and
        // a rebuild after it would wait that long for it to help.
        ("adaptive", Started::Requested),
    ] {
        let pace_label = how.label(pace);
        step(&format!(
            "queries during a rebuild of orders, pacing {pace_label}"
        ));
        // Each run rebuilds from offset 0: what a killed run before it left is forgotten
        // (the next rebuild drops its tables), and its lock has gone with its session.
        sqlx::query("DELETE FROM keel_rebuilds WHERE projection = 'orders'")
            .execute(&pool)
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut paced_env = env.clone();
        paced_env.push(("KEEL_REBUILD_PACE", pace.to_owned()));
        // A requested rebuild is taken by a `projector run` process that was running (and
        // had caught up) before the reads began, as in a deployment; the other starts a
        // process of its own among the reads.
        let runner = match how {
            Started::Command => None,
            Started::Requested => {
                let runner = Service::start(
                    "projector",
                    &["run", "--projection", "orders"],
                    &paced_env,
                    None,
                )
                .await?;
                tokio::time::sleep(RUNNER_SETTLES).await;
                Some(runner)
            }
        };
        // The rebuild starts among live reads, `LEAD` into the first query's load, which
        // is counted from then on.
        let starting = {
            let pool = pool.clone();
            tokio::spawn(async move {
                tokio::time::sleep(LEAD).await;
                let started = Instant::now();
                let rebuilding = match how {
                    Started::Command => {
                        Service::start("projector", &["rebuild", "orders"], &paced_env, None)
                            .await
                            .map(|process| Rebuilding::Process(Box::new(process)))
                    }
                    Started::Requested => {
                        projector::requests::request(&pool, "orders", false, "bench")
                            .await
                            .map(Rebuilding::Request)
                    }
                };
                (rebuilding, started)
            })
        };
        let during = queries(
            &query.client,
            &query.url(""),
            events,
            (LEAD, options.seconds),
            Some(&rates),
        )
        .await;
        let (rebuilding, from) = starting.await?;
        let mut rebuilding = rebuilding?;
        let last: Option<i64> = sqlx::query_scalar(
            "SELECT records_done FROM keel_rebuilds WHERE projection = 'orders'",
        )
        .fetch_optional(&pool)
        .await?;
        let (ended, seconds) = match &mut rebuilding {
            Rebuilding::Process(process) => (process.exited(), from.elapsed().as_secs_f64()),
            // Counted from when a process took the request (it looks once a second).
            Rebuilding::Request(id) => {
                let (ended, seconds): (bool, Option<f64>) = sqlx::query_as(
                    "SELECT done_at IS NOT NULL,
                            extract(epoch FROM coalesce(done_at, now()) - taken_at)::float8
                       FROM keel_rebuild_requests WHERE id = $1",
                )
                .bind(*id)
                .fetch_one(&pool)
                .await?;
                (ended, seconds.unwrap_or_default())
            }
        };
        // A rebuild that ended swapped and forgot its row: it read the whole log.
        let last = last.or(ended.then_some(total));
        if ended {
            report.notes.push(format!(
                "The rebuild (pacing {pace_label}) ended before the queries measured during it did: their figures are \
                 partly without a rebuild."
            ));
        }
        if let Rebuilding::Process(process) = rebuilding {
            process.kill().await?;
        }
        if let Some(runner) = runner {
            runner.kill().await?;
        }
        let label = format!("during a rebuild, pacing {pace_label}");
        query_rows(report, &during, Some(&label));
        if let Some(last) = last {
            report.rows.push(Row::plain(
                &format!("Rebuild of orders while queries run, pacing {pace_label}"),
                "records/s",
                last as f64 / seconds.max(0.001),
            ));
        }
        for ((name, _), run) in query_paths().iter().zip(&during) {
            latency.push(Series::new(format!("{name}, {label}"), cdf(&run.latencies)));
        }
        step(&format!(
            "queries by id during the rebuild, p99 ms of each half second: {}",
            during[0]
                .timeline
                .iter()
                .map(|(_, p99)| format!("{p99:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        ));
        plots.add(
            &format!("queries-during-rebuild-{}.svg", how.slug(pace)),
            &format!(
                "Queries by id during a rebuild of orders paced {pace_label} (started {} s into their load): p99 of each half second",
                LEAD.as_secs()
            ),
            Chart {
                title: format!("Queries by id during a rebuild paced {pace_label}: p99 over time"),
                x_label: "seconds since the rebuild started".into(),
                y_label: "p99, ms".into(),
                log_x: false,
                series: vec![Series::new("by id", during[0].timeline.clone())],
            },
        );
    }
    plots.add(
        "queries-latency.svg",
        "Query latency at half the maximum rate, idle and during a rebuild, beside B_select",
        Chart {
            title: "Query latency (cumulative)".into(),
            x_label: "latency, ms (log scale)".into(),
            y_label: "% of requests at or below".into(),
            log_x: true,
            series: latency,
        },
    );
    drop(query);
    pool.close().await;

    drop(db);
    drop(broker);
    Ok(())
}
