//! `bench`: every benchmark scenario of Keel beside its baselines, measured in one run on
//! this machine, with the real broker and the real PostgreSQL.
//!
//! ```sh
//! make bench                     # builds in release mode and runs this
//! target/release/bench [--events N] [--seconds S] [--streams N] [--takeover-streams N] [--out DIR] [--markdown FILE] [--quick] [--only GROUPS]
//! ```
//! * `--events`: events in the log the projections and the start-up read (1,000,000);
//! * `--seconds`: length of each timed load (10);
//! * `--streams`: streams of the command workload (10,000);
//! * `--takeover-streams`: streams of the take-over logs, of 10 and of 100 commits each
//!   (100,000);
//! * `--out`: where `report.json` and the plots go (`docs/bench`);
//! * `--markdown`: the file whose `<!-- bench:begin -->`…`<!-- bench:end -->` block gets
//!   the results (`BENCHMARKS.md`); the file is created when missing;
//! * `--quick`: a small run (20,000 events, 2 s loads, 1,000 streams, 1,000 take-over
//!   streams) to check the harness;
//! * `--only commands,ryw,observability,projections,sharing,readpath,startup,scale,fulfilment`: some of the scenarios,
//!   printed only (for profiling).
//!
//! Scenarios, in order: commands (64 and 256 clients, and on durable storage),
//! read-your-writes, catch-up, queries, rebuilds (paced and unpaced), queries during a
//! rebuild (paced and unpaced), catch-up with 1 to 3 projector processes and a killed
//! one's partitions moving, healthy streams beside a parked one, read-your-writes on a hot
//! standby, the command API's memory per stream, and the write path on several instances
//! (commands/s with 1 to 3, handoffs, a failover, take-over with and without a snapshot),
//! and order fulfilment (from an order placed to awaiting payment, and orders/s).

mod commands;
mod fulfilment;
mod observability;
mod order_log;
mod projections;
mod readpath;
mod ryw;
mod scale;
mod sharing;
mod startup;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::Context;
use keel_bench::plot::Chart;
use keel_bench::report::{Plot, Report};
use keel_bench::system;
use keel_tests::broker_binary;

const USAGE: &str =
    "bench [--events N] [--seconds S] [--streams N] [--takeover-streams N] [--out DIR] [--markdown FILE] [--quick] [--only GROUPS]

  --events N       events in the log the projections and the start-up read (1000000)
  --seconds S      length of each timed load (10)
  --streams N      streams of the command workload (10000)
  --takeover-streams N
                   streams of the take-over logs, of 10 and of 100 commits each (100000)
  --out DIR        where report.json and the plots go (docs/bench)
  --markdown FILE  the file whose bench:begin/bench:end block gets the results (BENCHMARKS.md)
  --quick          a small run to check the harness (20000 events, 2 s loads, 1000 streams,
                   1000 take-over streams)
  --only GROUPS    some of commands,ryw,observability,projections,sharing,readpath,startup,scale,fulfilment (all by default); for profiling: the
                   report and the Markdown are written only by a run of them all";

/// The scenario groups, in the order they run.
const GROUPS: [&str; 9] = [
    "commands",
    "ryw",
    "observability",
    "projections",
    "sharing",
    "readpath",
    "startup",
    "scale",
    "fulfilment",
];

/// What a run measures, from the command line.
#[derive(Clone, Debug)]
pub(crate) struct Options {
    events: usize,
    seconds: u64,
    streams: usize,
    takeover_streams: usize,
    out: PathBuf,
    markdown: PathBuf,
    only: Option<Vec<String>>,
    /// A small run to check the harness.
    quick: bool,
}

impl Options {
    fn parse(args: impl Iterator<Item = String>) -> anyhow::Result<Self> {
        let mut options = Self {
            events: 1_000_000,
            seconds: 10,
            streams: 10_000,
            takeover_streams: 100_000,
            out: PathBuf::from("docs/bench"),
            markdown: PathBuf::from("BENCHMARKS.md"),
            only: None,
            quick: false,
        };
        let mut args = args.peekable();
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--events" => options.events = value()?.parse().context("--events")?,
                "--seconds" => options.seconds = value()?.parse().context("--seconds")?,
                "--streams" => options.streams = value()?.parse().context("--streams")?,
                "--takeover-streams" => {
                    options.takeover_streams = value()?.parse().context("--takeover-streams")?
                }
                "--out" => options.out = PathBuf::from(value()?),
                "--markdown" => options.markdown = PathBuf::from(value()?),
                "--only" => {
                    let groups: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                    if let Some(bad) = groups.iter().find(|g| !GROUPS.contains(&g.as_str())) {
                        anyhow::bail!("--only {bad:?}: the groups are {}", GROUPS.join(", "));
                    }
                    options.only = Some(groups);
                }
                "--help" | "-h" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                "--quick" => {
                    options.quick = true;
                    options.events = 20_000;
                    options.seconds = 2;
                    options.streams = 1_000;
                    options.takeover_streams = 1_000;
                }
                other => anyhow::bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        anyhow::ensure!(options.events >= 1000, "--events must be at least 1000");
        anyhow::ensure!(options.seconds >= 1, "--seconds must be at least 1");
        anyhow::ensure!(options.streams >= 100, "--streams must be at least 100");
        anyhow::ensure!(
            options.takeover_streams >= 100,
            "--takeover-streams must be at least 100"
        );
        Ok(options)
    }
}

fn started() -> Instant {
    static STARTED: OnceLock<Instant> = OnceLock::new();
    *STARTED.get_or_init(Instant::now)
}

/// Prints a progress line with the time since the run started.
pub(crate) fn step(what: &str) {
    let s = started().elapsed().as_secs();
    eprintln!("==> [{:02}:{:02}] {what}", s / 60, s % 60);
}

/// Milliseconds of a duration.
pub(crate) fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The plots of a run, written beside the report.
#[derive(Default)]
pub(crate) struct Plots(Vec<(String, String, Chart)>);

impl Plots {
    /// Adds a chart as `file` with `caption`.
    pub(crate) fn add(&mut self, file: &str, caption: &str, chart: Chart) {
        self.0.push((file.to_owned(), caption.to_owned(), chart));
    }
}

fn main() -> anyhow::Result<()> {
    let _ = started();
    let options = Options::parse(std::env::args().skip(1))?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(options))
}

async fn run(options: Options) -> anyhow::Result<()> {
    let postgres = {
        let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres")
            .await
            .context("connecting to PostgreSQL at 127.0.0.1:5432")?;
        let version: String = sqlx::query_scalar("SELECT version()")
            .fetch_one(&pool)
            .await?;
        version.split(" on ").next().unwrap_or(&version).to_owned()
    };
    let mut report = Report {
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        command: std::iter::once("bench".to_owned())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" "),
        machine: system::machine(&broker_binary()?, &postgres),
        ..Report::default()
    };
    let mut plots = Plots::default();

    let wanted = |group: &str| {
        options
            .only
            .as_ref()
            .is_none_or(|o| o.iter().any(|g| g == group))
    };
    // A group that fails keeps the figures it measured before, and the later groups run.
    if wanted("commands")
        && let Err(e) = commands::run(&options, &mut report, &mut plots).await
    {
        failed(&mut report, "commands", &e);
    }
    if wanted("ryw")
        && let Err(e) = ryw::run(&options, &mut report, &mut plots).await
    {
        failed(&mut report, "read-your-writes", &e);
    }
    if wanted("observability")
        && let Err(e) = observability::run(&options, &mut report).await
    {
        failed(&mut report, "observability", &e);
    }
    if wanted("projections")
        && let Err(e) = projections::run(&options, &mut report, &mut plots).await
    {
        failed(&mut report, "projections", &e);
    }
    if wanted("sharing")
        && let Err(e) = sharing::run(&options, &mut report).await
    {
        failed(&mut report, "sharing", &e);
    }
    if wanted("readpath")
        && let Err(e) = readpath::run(&options, &mut report).await
    {
        failed(&mut report, "read path", &e);
    }
    if wanted("startup")
        && let Err(e) = startup::run(&options, &mut report).await
    {
        failed(&mut report, "start-up", &e);
    }
    if wanted("scale")
        && let Err(e) = scale::run(&options, &mut report).await
    {
        failed(&mut report, "scale-out", &e);
    }
    if wanted("fulfilment")
        && let Err(e) = fulfilment::run(&options, &mut report).await
    {
        failed(&mut report, "fulfilment", &e);
    }
    if options.only.is_some() {
        println!("{}", report.markdown(&options.out.display().to_string()));
        return outcome(&report);
    }

    report.seconds = started().elapsed().as_secs_f64();
    step("writing the report");
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    for (file, caption, chart) in &plots.0 {
        std::fs::write(options.out.join(file), chart.to_svg())?;
        report.plots.push(Plot {
            file: file.clone(),
            caption: caption.clone(),
        });
    }
    std::fs::write(
        options.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    write_markdown(&options, &report)?;
    println!("{}", report.markdown(&options.out.display().to_string()));
    step(&format!(
        "done: {} and {}",
        options.out.join("report.json").display(),
        options.markdown.display()
    ));
    outcome(&report)
}

/// Records that a group of scenarios failed.
fn failed(report: &mut Report, group: &str, error: &anyhow::Error) {
    let line = format!("the {group} scenarios stopped: {error:#}");
    step(&line);
    report.failed.push(line);
}

/// The run's exit: an error when a group failed, once the report is written.
fn outcome(report: &Report) -> anyhow::Result<()> {
    match report.failed.as_slice() {
        [] => Ok(()),
        failures => anyhow::bail!("{}", failures.join("; ")),
    }
}

const BEGIN: &str = "<!-- bench:begin -->";
const END: &str = "<!-- bench:end -->";

/// Replaces the results block of the Markdown file (or writes one).
fn write_markdown(options: &Options, report: &Report) -> anyhow::Result<()> {
    let plot_dir = match (options.markdown.parent(), options.out.canonicalize()) {
        (Some(dir), Ok(out)) => {
            let dir = if dir.as_os_str().is_empty() {
                std::env::current_dir()?
            } else {
                dir.canonicalize()?
            };
            match out.strip_prefix(&dir).map(|p| p.display().to_string()) {
                Ok(relative) if relative.is_empty() => ".".to_owned(),
                Ok(relative) => relative,
                Err(_) => out.display().to_string(),
            }
        }
        _ => options.out.display().to_string(),
    };
    let mut block = format!(
        "{BEGIN}\n_Run of {} (`{}`, {:.0} s in all):_\n\n| Machine | |\n|---|---|\n",
        report.started_at, report.command, report.seconds
    );
    for (what, value) in &report.machine {
        block.push_str(&format!("| {what} | {value} |\n"));
    }
    block.push('\n');
    block.push_str(&report.markdown(&plot_dir));
    block.push_str(END);
    let current = std::fs::read_to_string(&options.markdown).unwrap_or_default();
    let updated = match (current.find(BEGIN), current.find(END)) {
        (Some(begin), Some(end)) if begin < end => {
            format!(
                "{}{block}{}",
                &current[..begin],
                &current[end + END.len()..]
            )
        }
        _ if current.is_empty() => format!("{block}\n"),
        _ => format!("{current}\n{block}\n"),
    };
    std::fs::write(&options.markdown, updated)
        .with_context(|| format!("writing {}", options.markdown.display()))
}
