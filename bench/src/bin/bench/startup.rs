//! Scenario 6: the command API's start-up and memory over a log of `--events` streams of
//! one `OrderPlaced` commit each: from process start to ready (every partition read to its
//! end and fenced), and resident memory then, less that of an instance over no streams.

use std::time::Instant;

use anyhow::Context;
use keel_bench::report::{Report, Row};
use keel_bench::system;
use keel_tests::{CommandApiConfig, Service, unique_prefix};

use crate::order_log::{OrderLog, PARTITIONS};
use crate::{Options, step};

pub(crate) async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let events = options.events;
    let OrderLog { broker, config, .. } =
        OrderLog::write("start-up", "bench-start", events).await?;

    step("command API memory: ready with no streams, then over the log's streams");
    let empty = CommandApiConfig::new(&broker, &unique_prefix("bench-empty"), PARTITIONS, "bench");
    let api = Service::command_api_ready(&empty).await?;
    let base = system::rss_bytes(api.pid().context("the command API exited")?).unwrap_or_default();
    api.stop().await?;
    let started = Instant::now();
    let api = Service::command_api_ready(&config).await?;
    let startup = started.elapsed().as_secs_f64();
    let loaded =
        system::rss_bytes(api.pid().context("the command API exited")?).unwrap_or_default();
    api.stop().await?;
    report.rows.push(Row::plain(
        "Command API memory",
        "resident MB per 100,000 streams",
        loaded.saturating_sub(base) as f64 / 1e6 / events as f64 * 100_000.0,
    ));
    report.rows.push(Row::plain(
        &format!("Command API start-up over {events} streams"),
        "seconds to ready",
        startup,
    ));
    drop(broker);
    Ok(())
}
