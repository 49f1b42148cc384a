//! Keel's projector binary: `run`, `rebuild`, `verify`, `export`, `status`, `dead-letters`,
//! `topics`.

/// mimalloc: the services allocate and free many small objects per record and request,
/// which glibc's allocator serves several times slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keel_kafka::{KafkaSettings, end_offsets, ensure_topics};
use keel_schemas::{StreamRef, TopicPartition, TrustedKeys};
use projector::rebuild::{Progress, RebuildOptions};
use projector::runner::Runner;
use projector::units::Membership;
use projector::{
    Job, OnError, Settings, SettingsArgs, db, fulfilment, quarantine, report, status, verify, views,
};
use sqlx::PgPool;
use tokio::task::JoinSet;

/// Runs Keel's projections into PostgreSQL and inspects the log.
///
/// The options go before the command; each can also be given by the environment variable
/// named beside it.
#[derive(Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(flatten)]
    settings: SettingsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs projections until stopped (Ctrl-C or SIGTERM): each reads its topics from its
    /// checkpoints and applies batches exactly once.
    Run {
        /// Run only these projections (repeatable); all of them by default.
        #[arg(long = "projection", value_name = "NAME")]
        projections: Vec<String>,
        /// Run this process manager too (repeatable): `fulfilment`, the order fulfilment
        /// process. Given without `--projection`, only the process managers run.
        #[arg(long = "process", value_name = "NAME", value_parser = ["fulfilment"])]
        processes: Vec<String>,
        #[command(flatten)]
        fulfilment: fulfilment::FulfilmentArgs,
        /// What to do with a record that cannot be decoded or applied: park its stream
        /// (hold the stream back, in order, while the others flow on, until `dead-letters
        /// retry` or `discard`), stop the projection, or record it, count it and go on.
        #[arg(long, value_enum, default_value = "park")]
        on_error: OnError,
        /// Where to serve `/metrics`, `/healthz` and `/readyz` (port 0: any free port, as
        /// logged). `/metrics` is open unless KEEL_METRICS_ROLE names a role, read with
        /// the APIs' KEEL_AUTH_* settings.
        #[arg(long, env = "KEEL_PROJECTOR_ADDR", default_value = projector::http::DEFAULT_ADDR)]
        addr: std::net::SocketAddr,
    },
    /// Rebuilds projections blue/green: builds the next generation beside the live one from
    /// offset 0, with progress, then swaps it in atomically while queries keep being served.
    /// Interrupted (Ctrl-C, crash), it leaves the live view untouched; run it again to
    /// resume from the new generation's checkpoints.
    Rebuild {
        /// The projections to rebuild, one after the other.
        #[arg(value_name = "PROJECTION", required_unless_present = "all")]
        projections: Vec<String>,
        /// Rebuild every projection.
        #[arg(long, conflicts_with = "projections")]
        all: bool,
        /// Keep the old generation's tables after the swap.
        #[arg(long)]
        keep_old: bool,
        /// What to do with a record that cannot be decoded or applied.
        #[arg(long, value_enum, default_value = "park")]
        on_error: OnError,
        /// Print each finished rebuild's report as a JSON line on standard output.
        #[arg(long)]
        json: bool,
        /// Swap the new generation in even when it holds back more parked streams than the
        /// live one (by default the rebuild stops before the swap, keeping the live view).
        #[arg(long)]
        allow_parked: bool,
        /// Ask the running `projector run` processes to rebuild (a row in
        /// `keel_rebuild_requests`, which one of them takes) and follow it, instead of
        /// rebuilding in this process.
        #[arg(long, conflicts_with = "json")]
        request: bool,
    },
    /// Re-reads the topics through the partition gate and checks every stream: versions
    /// contiguous from 1, hashes, the prev_hash chain, signatures (KEEL_TRUSTED_KEYS_FILE),
    /// and that the topics hold every commit the audit log has seen. Exits 1 on a violation.
    Verify {
        /// Check one stream only, as <type>/<id> (e.g. order/o-42).
        #[arg(long, value_name = "TYPE/ID")]
        stream: Option<String>,
        /// Print JSON instead of a report.
        #[arg(long)]
        json: bool,
    },
    /// Writes a stream's commit records as JSON Lines, exactly as they are in the log, with
    /// their positions and the gate's verdicts: for auditors.
    Export {
        /// The stream, as <type>/<id> (e.g. order/o-42).
        #[arg(long, value_name = "TYPE/ID")]
        stream: String,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Prints each projection's generation, state, checkpoints, lag per partition, dead
    /// letters and events/s (sampled over one second).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Lists the streams the projections hold back (parked on a record they could not
    /// decode or apply), and retries or discards them: the process holding a stream's
    /// partition carries the request out, once.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetters,
    },
    /// Creates the topics that are missing (KEEL_PARTITIONS partitions, infinite retention),
    /// checks the existing ones, and prints each topic's partitions and record counts.
    Topics,
}

#[derive(Subcommand)]
enum DeadLetters {
    /// Lists the parked streams with their error and the records they hold back.
    List {
        /// Only this projection's.
        #[arg(long, value_name = "NAME")]
        projection: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Applies a parked stream's records again, in order, with the code running now (after
    /// a fix); a record that still fails stays parked with the records after it. Exits 1
    /// unless every record applied.
    Retry {
        /// The projection.
        projection: String,
        /// The stream, as <type>/<id> (e.g. order/o-42).
        #[arg(value_name = "TYPE/ID", required_unless_present = "all")]
        stream: Option<String>,
        /// Retry every stream the projection holds back.
        #[arg(long, conflicts_with = "stream")]
        all: bool,
        #[command(flatten)]
        request: RequestArgs,
    },
    /// Drops a parked stream's held-back records from the view for good, recording the
    /// reason; the stream's later records are applied again.
    Discard {
        /// The projection.
        projection: String,
        /// The stream, as <type>/<id>.
        #[arg(value_name = "TYPE/ID")]
        stream: String,
        /// Why (recorded with each discarded record).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        request: RequestArgs,
    },
}

#[derive(clap::Args)]
struct RequestArgs {
    /// Who asks (recorded); `$USER` by default.
    #[arg(long)]
    actor: Option<String>,
    /// How long to wait for a projector process to carry the request out, in seconds (it
    /// stays queued after that).
    #[arg(long, default_value_t = 60)]
    wait: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli: Cli = keel_telemetry::parse_args();
    // `run` is a service and logs its work; the other commands are tools that print theirs.
    let filter = match cli.command {
        Command::Run { .. } => "projector=info,keel_kafka=info",
        _ => "projector=warn,keel_kafka=warn",
    };
    keel_telemetry::running(filter, "keel-projector", execute(cli)).await
}

/// Carries out the command line.
async fn execute(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::from_args(cli.settings)?;
    match cli.command {
        Command::Run {
            projections,
            processes,
            fulfilment,
            on_error,
            addr,
        } => {
            let fulfilment = processes
                .iter()
                .any(|p| p == "fulfilment")
                .then_some(fulfilment);
            run(&settings, &projections, fulfilment, on_error, addr).await
        }
        Command::Rebuild {
            projections,
            all,
            keep_old,
            on_error,
            json,
            request,
            allow_parked,
        } => {
            if request {
                request_rebuilds(&settings, &projections, all, keep_old).await
            } else {
                let options = RebuildOptions {
                    keep_old,
                    wait_for_lock: false,
                    only_if_older: false,
                    replacing: None,
                    progress: Progress::Terminal,
                    allow_parked,
                };
                rebuild(&settings, &projections, all, &options, on_error, json).await
            }
        }
        Command::Verify { stream, json } => verify(&settings, stream.as_deref(), json).await,
        Command::Export { stream, output } => export(&settings, &stream, output.as_deref()).await,
        Command::Status { json } => print_status(&settings, json).await,
        Command::DeadLetters { command } => dead_letters(&settings, command).await,
        Command::Topics => topics(&settings.kafka).await,
    }
}

/// Fails on a name that is not a projection's.
fn check_names(names: &[String]) -> anyhow::Result<()> {
    let all = views::all();
    for name in names {
        anyhow::ensure!(
            all.iter().any(|p| p.name() == name),
            "no projection named {name:?}; the projections are: {}",
            all.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

async fn run(
    settings: &Settings,
    only: &[String],
    fulfilment: Option<fulfilment::FulfilmentArgs>,
    on_error: OnError,
    addr: std::net::SocketAddr,
) -> anyhow::Result<()> {
    check_names(only)?;
    // `/metrics` behind a role: the APIs' authentication settings, read from the
    // environment like theirs.
    let edge = match std::env::var_os("KEEL_METRICS_ROLE") {
        Some(_) => {
            let settings = keel_http::EdgeSettings::from_vars(|n| std::env::var(n).ok())?;
            let edge = keel_http::Edge::new(&settings, "projector")?;
            Some((edge, settings))
        }
        None => None,
    };
    // Serving from the start: probes see the process alive while it connects.
    let applied = projector::metrics::ProjectorMetrics::default();
    let observed = projector::http::Observed::new(&applied, edge.as_ref().map(|(e, _)| e));
    let listener = projector::http::bind(addr).await?;
    let router = projector::http::router(observed.clone(), edge.as_ref().map(|(e, _)| e));
    tracing::info!(addr = %listener.local_addr()?, "projector listening");
    let _listening = keel_kafka::AbortOnDrop(tokio::spawn(async move {
        let settings = edge.as_ref().map(|(_, s)| s);
        if let Err(e) =
            projector::http::serve(listener, router, settings, std::future::pending()).await
        {
            tracing::error!(error = %format!("{e:#}"), "the projector's HTTP listener stopped");
        }
    }));
    let all = views::all();
    let topics = ensure_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
        .await
        .context("ensuring the topics")?;
    let pool = db::connect_sharing(&settings.database.database_url, settings.claim_timeout).await?;
    record_topics(&pool, &topics, settings.kafka.partitions).await?;
    let mut options = settings.run_options(on_error)?;
    options.metrics = applied;
    // The process managers asked for, alone unless projections were named too.
    let projections_too = fulfilment.is_none() || !only.is_empty();
    let mut chosen: Vec<std::sync::Arc<dyn projector::projection::Projection>> = all
        .into_iter()
        .filter(|p| projections_too && (only.is_empty() || only.iter().any(|n| n == p.name())))
        .collect();
    if let Some(args) = &fulfilment {
        // Where it starts acting, before it reads anything: the log's end on first run.
        fulfilment::record_starts(&pool, &settings.kafka)
            .await
            .context("recording where the fulfilment process starts")?;
        chosen.push(std::sync::Arc::new(args.projection()));
    }
    let jobs: Vec<Job> = chosen
        .into_iter()
        .map(|projection| {
            Job::new(
                projection,
                pool.clone(),
                settings.kafka.clone(),
                options.clone(),
            )
        })
        .collect();
    // The projections' partitions are shared with the other projector processes.
    let (mut membership, mut assignments) = Membership::new(
        pool.clone(),
        settings.claim_timeout,
        jobs.iter().map(|job| (job.name(), job.partitions())),
    );
    // And the rebuilds of those projections, when they are of this process's code.
    membership.help_rebuilds(
        jobs.iter()
            .map(|job| (job.name(), job.projection.version())),
    );
    let leaving = membership.leaving();
    let membership_id = membership.id();
    // Rebuilds asked for through PostgreSQL, carried out by this process.
    let requests = keel_kafka::AbortOnDrop(tokio::spawn(projector::requests::serve(
        pool.clone(),
        membership_id,
        jobs.clone(),
    )));
    // Verifications of one stream asked for through PostgreSQL, carried out by any process.
    let verifications =
        keel_kafka::AbortOnDrop(tokio::spawn(projector::requests::serve_verifications(
            pool.clone(),
            membership_id,
            settings.kafka.clone(),
            std::sync::Arc::clone(&options.policy),
        )));
    let mut tasks = JoinSet::new();
    let mut senders = Vec::new();
    for job in jobs {
        let assignment = assignments
            .remove(job.name())
            .context("every projection has its assignment")?;
        if let (fulfilment::NAME, Some(args)) = (job.name(), &fulfilment) {
            // The commands it decides, sent on the partitions it holds.
            senders.push(args.spawn_sender(pool.clone(), membership_id, assignment.held()));
        }
        let runner = Runner::new(job, assignment);
        tasks.spawn(async move { runner.run().await });
    }
    let membership = keel_kafka::AbortOnDrop(tokio::spawn(membership.run()));
    // Scrapes and probes read through a pool of their own, never holding up a batch.
    let observing = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(3))
        .connect_lazy(&settings.database.database_url)
        .context("KEEL_DATABASE_URL is not a PostgreSQL URL")?;
    observed.started(observing, membership_id);
    let shutdown = keel_telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    let ended = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            done = tasks.join_next() => match done {
                // No projection to run.
                None => break Ok(()),
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => break Err(e),
                Some(Err(e)) => break Err(e).context("a projection task failed"),
            },
        }
    };
    // The runners stop (a batch in flight rolls back), then the others take the units at
    // once instead of after the claim timeout.
    tasks.shutdown().await;
    drop(senders);
    drop(requests);
    drop(verifications);
    drop(membership);
    pool.close().await;
    if let Err(e) = leaving.leave().await {
        tracing::warn!(error = %format!("{e:#}"), "could not let go of the units: the others take them after the claim timeout");
    }
    ended
}

/// Tells the query API which topics and partitions there are, so it refuses a consistency
/// token for any other at once.
async fn record_topics(pool: &PgPool, topics: &[String], partitions: i32) -> anyhow::Result<()> {
    keel_views::positions::record_topics(pool, topics, partitions)
        .await
        .context("recording the topics read")
}

async fn rebuild(
    settings: &Settings,
    only: &[String],
    all: bool,
    rebuild_options: &RebuildOptions,
    on_error: OnError,
    json: bool,
) -> anyhow::Result<()> {
    check_names(only)?;
    let topics = ensure_topics(&settings.kafka, &keel_domain::STREAM_TYPES)
        .await
        .context("ensuring the topics")?;
    let pool = db::connect(&settings.database.database_url).await?;
    record_topics(&pool, &topics, settings.kafka.partitions).await?;
    let options = settings.run_options(on_error)?;
    let chosen: Vec<_> = views::all()
        .into_iter()
        .filter(|p| all || only.iter().any(|n| n == p.name()))
        .collect();
    let work = async {
        for projection in chosen {
            let job = Job::new(
                projection,
                pool.clone(),
                settings.kafka.clone(),
                options.clone(),
            );
            let report = projector::rebuild::rebuild(&job, rebuild_options).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            }
        }
        anyhow::Ok(())
    };
    tokio::select! {
        done = work => done,
        _ = keel_telemetry::shutdown_signal() => {
            anyhow::bail!(
                "interrupted: the live views are untouched; run the same command again to resume \
                 from the new generation's checkpoints"
            )
        }
    }
}

/// Asks the running processes to rebuild `only` (or every projection), one request each,
/// and follows them to their outcome.
async fn request_rebuilds(
    settings: &Settings,
    only: &[String],
    all: bool,
    keep_old: bool,
) -> anyhow::Result<()> {
    check_names(only)?;
    let pool = db::connect(&settings.database.database_url).await?;
    let actor = std::env::var("USER").unwrap_or_else(|_| "operator".to_owned());
    let chosen: Vec<&'static str> = views::all()
        .into_iter()
        .map(|p| p.name())
        .filter(|name| all || only.iter().any(|n| n == name))
        .collect();
    for name in chosen {
        let id = projector::requests::request(&pool, name, keep_old, &actor).await?;
        eprintln!(
            "{name}: rebuild requested (request {id}); waiting for a `projector run` process to take it"
        );
        let started = std::time::Instant::now();
        let mut told = std::time::Instant::now();
        let (ok, outcome) = loop {
            if let Some(done) = projector::requests::outcome(&pool, id).await? {
                break done;
            }
            if told.elapsed() >= Duration::from_secs(5) {
                told = std::time::Instant::now();
                let progress: Option<(i64, i64, Option<f64>)> = sqlx::query_as(
                    "SELECT records_done, records_total, eta_seconds FROM keel_rebuilds WHERE projection = $1",
                )
                .bind(name)
                .fetch_optional(&pool)
                .await?;
                match progress {
                    Some((done, total, eta)) => eprintln!(
                        "{name}: {done}/{total} records, ETA {}",
                        eta.map_or("?".into(), |e| format!("{e:.0}s"))
                    ),
                    None => eprintln!(
                        "{name}: not started after {}s: is `projector run` running {name}?",
                        started.elapsed().as_secs()
                    ),
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!("{name}: {outcome}");
        anyhow::ensure!(ok, "the rebuild of {name} failed");
    }
    Ok(())
}

async fn verify(settings: &Settings, stream: Option<&str>, json: bool) -> anyhow::Result<()> {
    let stream = stream.map(verify::parse_stream).transpose()?;
    let trusted = if settings.trusted_keys_file.exists() {
        TrustedKeys::read(&settings.trusted_keys_file)?
    } else {
        eprintln!(
            "warning: no trusted keys file at {} (KEEL_TRUSTED_KEYS_FILE): no signature can verify",
            settings.trusted_keys_file.display()
        );
        TrustedKeys::default()
    };
    let pool = match db::connect(&settings.database.database_url).await {
        Ok(pool) => Some(pool),
        Err(e) => {
            eprintln!("warning: the audit log is not compared with the topics: {e:#}");
            None
        }
    };
    let trusted = std::sync::Arc::new(trusted);
    let report = verify::verify(&settings.kafka, &trusted, stream.as_ref(), pool.as_ref()).await?;
    let out = if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        report::verify_text(&report)
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")?;
    if report.violations() > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn export(
    settings: &Settings,
    stream: &str,
    output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let stream = verify::parse_stream(stream)?;
    let mut out: Box<dyn Write> = match output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    let policy = std::sync::Arc::new(settings.trusted_keys()?);
    let count = verify::export(&settings.kafka, &policy, &stream, |line| {
        serde_json::to_writer(&mut out, &line)?;
        out.write_all(b"\n")?;
        Ok(())
    })
    .await?;
    out.flush()?;
    anyhow::ensure!(count > 0, "the log holds no commit of {stream}");
    eprintln!("exported {count} records of {stream}");
    Ok(())
}

async fn print_status(settings: &Settings, json: bool) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database.database_url).await?;
    let before = status::read(&pool, None).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let now = status::read(&pool, Some(&settings.kafka)).await?;
    let out = if json {
        serde_json::to_string_pretty(&now)? + "\n"
    } else {
        report::status_text(&before, &now)
    };
    std::io::stdout()
        .write_all(out.as_bytes())
        .context("writing to stdout")
}

async fn dead_letters(settings: &Settings, command: DeadLetters) -> anyhow::Result<()> {
    let pool = db::connect(&settings.database.database_url).await?;
    let (projection, streams, action, reason, args) = match command {
        DeadLetters::List { projection, json } => {
            if let Some(name) = &projection {
                check_names(std::slice::from_ref(name))?;
            }
            let parked = quarantine::list(&pool, projection.as_deref()).await?;
            let out = if json {
                serde_json::to_string_pretty(&parked)? + "\n"
            } else {
                report::parked_text(&parked)
            };
            return std::io::stdout()
                .write_all(out.as_bytes())
                .context("writing to stdout");
        }
        DeadLetters::Retry {
            projection,
            stream,
            all,
            request,
        } => {
            check_names(std::slice::from_ref(&projection))?;
            let streams = if all {
                quarantine::list(&pool, Some(&projection))
                    .await?
                    .into_iter()
                    .map(|p| StreamRef {
                        stream_type: p.stream_type,
                        id: p.stream_id,
                    })
                    .collect()
            } else {
                vec![verify::parse_stream(stream.as_deref().unwrap_or_default())?]
            };
            (
                projection,
                streams,
                quarantine::Action::Retry,
                None,
                request,
            )
        }
        DeadLetters::Discard {
            projection,
            stream,
            reason,
            request,
        } => {
            check_names(std::slice::from_ref(&projection))?;
            let stream = verify::parse_stream(&stream)?;
            (
                projection,
                vec![stream],
                quarantine::Action::Discard,
                Some(reason),
                request,
            )
        }
    };
    if streams.is_empty() {
        println!("{projection} holds back no stream");
        return Ok(());
    }
    let actor = args
        .actor
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "operator".to_owned());
    let mut failed = 0;
    for stream in streams {
        let requested = quarantine::request(
            &pool,
            &projection,
            &stream,
            action,
            reason.as_deref(),
            &actor,
        )
        .await?;
        let done = quarantine::wait(&pool, &requested, Duration::from_secs(args.wait), |after| {
            eprintln!(
                "waiting {}s for the projector process holding {} to carry out request {}…",
                after.as_secs(),
                requested.unit,
                requested.id
            );
        })
        .await?;
        match done {
            Some(done) => {
                println!("{stream}: {}", done.outcome);
                if !done.ok {
                    failed += 1;
                }
            }
            None => anyhow::bail!(
                "request {} on {stream} is still queued after {}s: is a projector running {projection} \
                 (`projector run`)? It is carried out once one holds {}",
                requested.id,
                args.wait,
                requested.unit
            ),
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn topics(kafka: &KafkaSettings) -> anyhow::Result<()> {
    let topics = ensure_topics(kafka, &keel_domain::STREAM_TYPES)
        .await
        .context("ensuring the topics")?;
    let partitions: Vec<TopicPartition> = topics
        .iter()
        .flat_map(|topic| (0..kafka.partitions).map(|p| TopicPartition::new(topic.clone(), p)))
        .collect();
    let ends = end_offsets(kafka, &partitions).await?;
    std::io::stdout()
        .write_all(report::topics_text(&ends).as_bytes())
        .context("writing to stdout")
}
