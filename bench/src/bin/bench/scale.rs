//! Scenario 7: the write path on several command-api instances sharing the partitions:
//! commands/s with 1, 2 and 3 instances (clients spread over all of them, each command
//! forwarded to its partition's owner when it lands elsewhere), resident memory per
//! instance, the unavailability of each partition that moves in a planned handoff (an
//! instance joining, one stopped gracefully) and in a failover (one killed), and the
//! take-over time of a partition with and without a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use keel_bench::load::{Rng, Workload};
use keel_bench::report::{Report, Row};
use keel_bench::system;
use keel_kafka::partition_for;
use keel_tests::{Broker, CommandApiConfig, Service, unique_prefix};
use serde_json::Value;

use crate::{Options, step};

/// Partitions of each topic.
const PARTITIONS: i32 = 8;
/// Clients of the timed loads.
const CLIENTS: usize = 64;
/// Commands a second of the open-loop load under which partitions are handed over: under
/// half of what the instances take on this machine, so that what is measured is the
/// handoff, not a queue.
const OPEN_RATE: f64 = 1000.0;

/// One command's completion: when, for which partition, with which status (0: no answer),
/// and the offset of its commit in the partition (from its consistency token).
struct Done {
    at: Duration,
    partition: (String, i32),
    status: u16,
    offset: Option<i64>,
}

/// The partition of a command path `/v1/{collection}/{id}/{command}`.
fn partition_of(path: &str) -> (String, i32) {
    let mut parts = path.split('/').skip(2);
    let collection = parts.next().unwrap_or_default().to_owned();
    let id = parts.next().unwrap_or_default();
    let partition = partition_for(id.as_bytes(), PARTITIONS);
    (collection, partition)
}

/// The collection of a topic `<prefix>.<type>.events`.
fn collection_of(topic: &str) -> String {
    match keel_schemas::stream_type_of(topic).unwrap_or_default() {
        "product" => "products".into(),
        "customer" => "customers".into(),
        _ => "orders".into(),
    }
}

/// Sends one command to `base`: its completion (status 0 when there was no answer).
async fn send_one(
    client: &reqwest::Client,
    base: &str,
    (path, body): (String, Value),
    started: Instant,
) -> Done {
    let (status, offset) = match client
        .post(format!("{base}{path}"))
        .timeout(Duration::from_secs(15))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => {
            let status = r.status().as_u16();
            let token = r
                .headers()
                .get(keel_schemas::CONSISTENCY_TOKEN_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|t| t.parse::<keel_schemas::ConsistencyToken>().ok());
            let replayed = r.headers().contains_key("idempotent-replayed");
            let body: Value = r.json().await.unwrap_or_default();
            // Only a commit appended for this answer tells which owner gave it (a no-op's
            // or a replay's token names an earlier commit).
            let committed = !replayed && body["events"].as_array().is_some_and(|e| !e.is_empty());
            let offset = token
                .filter(|_| committed)
                .and_then(|t| t.positions().next().map(|p| p.offset));
            (status, offset)
        }
        Err(_) => (0, None),
    };
    Done {
        at: started.elapsed(),
        partition: partition_of(&path),
        status,
        offset,
    }
}

/// The instance the `turn`th command goes to.
fn base_for(bases: &std::sync::RwLock<Vec<String>>, turn: usize) -> String {
    let bases = bases.read().map(|b| b.clone()).unwrap_or_default();
    bases[turn % bases.len().max(1)].clone()
}

/// A closed loop of [`CLIENTS`] clients over `bases` (each client sends each command to
/// the next instance in turn) until `stop`; every completion.
fn drive(
    client: &reqwest::Client,
    bases: Arc<std::sync::RwLock<Vec<String>>>,
    workload: Arc<Workload>,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> tokio::task::JoinSet<Vec<Done>> {
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        let (client, bases, workload, stop) = (
            client.clone(),
            bases.clone(),
            workload.clone(),
            stop.clone(),
        );
        workers.spawn(async move {
            let mut rng = Rng::new(c as u64 + 101);
            let mut done = Vec::new();
            let mut turn = c;
            while !stop.load(Ordering::Relaxed) {
                turn += 1;
                let base = base_for(&bases, turn);
                done.push(send_one(&client, &base, workload.next(&mut rng), started).await);
            }
            done
        });
    }
    workers
}

/// Commands sent at [`OPEN_RATE`] a second over `bases` (each to the next instance in
/// turn), each at its time whatever the others wait for, until `stop`; every completion.
/// An open loop: a partition that stalls holds up its own commands only. (Closed-loop
/// clients pile up on a partition that moves, and every other partition then sees fewer
/// commands: its longest gap would include the other partitions' handoffs.)
fn drive_open(
    client: &reqwest::Client,
    bases: Arc<std::sync::RwLock<Vec<String>>>,
    workload: Arc<Workload>,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> tokio::task::JoinSet<Vec<Done>> {
    let client = client.clone();
    let mut workers = tokio::task::JoinSet::new();
    workers.spawn(async move {
        let mut rng = Rng::new(101);
        let mut sent = tokio::task::JoinSet::new();
        let mut done = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / OPEN_RATE));
        let mut turn = 0usize;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            while let Some(finished) = sent.try_join_next() {
                done.extend(finished.ok());
            }
            turn += 1;
            let (client, base, command) = (
                client.clone(),
                base_for(&bases, turn),
                workload.next(&mut rng),
            );
            sent.spawn(async move { send_one(&client, &base, command, started).await });
        }
        while let Some(finished) = sent.join_next().await {
            done.extend(finished.ok());
        }
        done
    });
    workers
}

async fn collect(mut workers: tokio::task::JoinSet<Vec<Done>>) -> Vec<Done> {
    let mut all = Vec::new();
    while let Some(done) = workers.join_next().await {
        all.extend(done.unwrap_or_default());
    }
    all.sort_by_key(|d| d.at);
    all
}

/// Which instance (by index in `apis`) serves each partition, once every partition is
/// served by exactly one of them, evenly.
async fn settled(apis: &[&Service]) -> anyhow::Result<BTreeMap<(String, i32), usize>> {
    settled_within(apis, Duration::from_secs(90)).await
}

/// [`settled`], waiting up to `within`.
async fn settled_within(
    apis: &[&Service],
    within: Duration,
) -> anyhow::Result<BTreeMap<(String, i32), usize>> {
    let deadline = Instant::now() + within;
    loop {
        let mut owners: BTreeMap<(String, i32), Vec<usize>> = BTreeMap::new();
        for (i, api) in apis.iter().enumerate() {
            let body: Value = match api.client.get(api.url("/v1/partitions")).send().await {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => Value::Null,
            };
            for p in body["partitions"].as_array().into_iter().flatten() {
                if p["status"] == "serving" {
                    let topic = p["topic"].as_str().unwrap_or_default();
                    let partition = p["partition"].as_i64().unwrap_or_default() as i32;
                    owners
                        .entry((collection_of(topic), partition))
                        .or_default()
                        .push(i);
                }
            }
        }
        let mut shares = vec![0usize; apis.len()];
        for o in owners.values().filter(|o| o.len() == 1) {
            shares[o[0]] += 1;
        }
        let even = shares.iter().max().unwrap_or(&0) - shares.iter().min().unwrap_or(&0) <= 1;
        if owners.len() == 3 * PARTITIONS as usize && owners.values().all(|o| o.len() == 1) && even
        {
            return Ok(owners.into_iter().map(|(k, v)| (k, v[0])).collect());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the instances did not settle in {} s",
            within.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates the workload's streams through `api`, 64 at a time, each command retried
/// while it is answered `503` (a partition moving between instances) or not at all; a
/// retried registration answered `409` was applied by an attempt before.
async fn set_up(api: &Service, workload: &Workload) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut failed = 0usize;
    let mut commands = workload.setup().into_iter();
    loop {
        while tasks.len() < 64 {
            let Some((path, body)) = commands.next() else {
                break;
            };
            let (client, url) = (api.client.clone(), api.url(&path));
            tasks.spawn(async move {
                for attempt in 0..20u32 {
                    let status = match client
                        .post(&url)
                        .timeout(Duration::from_secs(15))
                        .json(&body)
                        .send()
                        .await
                    {
                        Ok(r) => r.status().as_u16(),
                        Err(_) => 0,
                    };
                    match status {
                        200..=299 => return true,
                        409 if attempt > 0 => return true,
                        503 | 0 => tokio::time::sleep(Duration::from_millis(250)).await,
                        _ => return false,
                    }
                }
                false
            });
        }
        match tasks.join_next().await {
            Some(Ok(true)) => {}
            Some(_) => failed += 1,
            None => break,
        }
    }
    anyhow::ensure!(failed == 0, "{failed} set-up commands failed");
    Ok(())
}

async fn start(config: &CommandApiConfig, name: &str) -> anyhow::Result<Service> {
    Service::command_api(&CommandApiConfig {
        instance: name.into(),
        ..config.clone()
    })
    .await
}

/// How long a partition went without an acknowledged command across a change of owner:
/// from when.
struct Gap {
    partition: (String, i32),
    from: Duration,
    length: Duration,
}

/// The offsets of the fences that took each partition (handoff marks aside), read from the
/// log after the run.
async fn fences_of(
    settings: &keel_kafka::KafkaSettings,
) -> anyhow::Result<BTreeMap<(String, i32), Vec<i64>>> {
    let mut fences = BTreeMap::new();
    for stream_type in keel_domain::STREAM_TYPES {
        let topic = keel_schemas::topic_name(&settings.topic_prefix, stream_type);
        for partition in 0..PARTITIONS {
            let mut reader = keel_kafka::PartitionReader::open(settings, &topic, partition, 0)?;
            let mut offsets = Vec::new();
            let mut highest = 0;
            reader
                .read_to_end(|entry| {
                    // A fence above every epoch before it: one that took the partition
                    // (a loser's, at an epoch already taken, did not).
                    if let Ok(keel_schemas::LogRecord::Fence(fence)) =
                        keel_schemas::LogRecord::decode(&entry.payload)
                        && !fence.handoff
                        && fence.writer.epoch > highest
                    {
                        highest = fence.writer.epoch;
                        offsets.push(entry.offset);
                    }
                })
                .await?;
            fences.insert((collection_of(&topic), partition), offsets);
        }
    }
    Ok(fences)
}

/// For each partition in `moved`, the time from the old owner's last acknowledgement to the
/// new owner's first, for the fence that moved it within `window`: the last acknowledged
/// command whose commit lies before the fence, and the first after it (acknowledgements
/// told apart by the offsets their consistency tokens name). A partition whose move is not
/// seen (no fence with acknowledgements on both sides within the window) counts the whole
/// window.
fn gaps(
    done: &[Done],
    fences: &BTreeMap<(String, i32), Vec<i64>>,
    moved: &BTreeSet<(String, i32)>,
    window: (Duration, Duration),
) -> Vec<Gap> {
    let mut gaps: Vec<Gap> = moved
        .iter()
        .map(|p| {
            let acked: Vec<(i64, Duration)> = done
                .iter()
                .filter(|d| &d.partition == p && (200..300).contains(&d.status))
                .filter_map(|d| Some((d.offset?, d.at)))
                .collect();
            let changes = fences.get(p).into_iter().flatten().filter_map(|fence| {
                let old = acked
                    .iter()
                    .filter(|(o, _)| o < fence)
                    .map(|(_, at)| *at)
                    .max()?;
                let new = acked
                    .iter()
                    .filter(|(o, _)| o > fence)
                    .map(|(_, at)| *at)
                    .min()?;
                (new >= window.0 && new <= window.1).then(|| (old, new.saturating_sub(old)))
            });
            let (from, length) = changes
                .max_by_key(|(_, length)| *length)
                .unwrap_or((window.0, window.1.saturating_sub(window.0)));
            Gap {
                partition: p.clone(),
                from,
                length,
            }
        })
        .collect();
    gaps.sort_by_key(|g| g.length);
    gaps
}

/// The longest of `gaps`, for the log: which partition, from when (since the load
/// started), how long.
fn longest(gaps: &[Gap]) -> String {
    gaps.iter()
        .rev()
        .take(3)
        .map(|g| {
            format!(
                "{}/{} {} ms from {:.3} s",
                g.partition.0,
                g.partition.1,
                g.length.as_millis(),
                g.from.as_secs_f64()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    keel_bench::percentile(sorted, p).as_secs_f64() * 1000.0
}

/// The share of commands within `window` answered 503 (or not at all).
fn unavailable_share(done: &[Done], window: (Duration, Duration)) -> f64 {
    let within: Vec<&Done> = done
        .iter()
        .filter(|d| d.at >= window.0 && d.at <= window.1)
        .collect();
    let failed = within
        .iter()
        .filter(|d| d.status == 503 || d.status == 0)
        .count();
    failed as f64 / within.len().max(1) as f64 * 100.0
}

/// Runs the scenarios and adds their rows.
pub(crate) async fn run(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    throughput_and_memory(options, report).await?;
    handoffs(options, report).await?;
    takeover(options, report).await?;
    Ok(())
}

/// Seconds from an instance's start until it serves every partition of a log of
/// `streams` products of `commits` commits each: reading the whole log, then from the
/// snapshot its predecessor left at its planned handoff.
async fn takeover(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let streams = options.takeover_streams;
    for commits in [10, 100] {
        step(&format!(
            "scale: take-over over {streams} products of {commits} commits, without and with a snapshot"
        ));
        let broker = Broker::start().await?;
        let config = CommandApiConfig::new(
            &broker,
            &unique_prefix("bench-takeover"),
            PARTITIONS,
            "bench",
        );
        let settings = broker.settings(&config.prefix, PARTITIONS);
        let topic = keel_kafka::ensure_topics(&settings, &["product"])
            .await?
            .remove(0);
        {
            let (settings, topic, key) = (settings.clone(), topic.clone(), config.signing_key());
            tokio::task::spawn_blocking(move || {
                keel_bench::write_product_log(&settings, &topic, streams, commits, &key)
            })
            .await??;
        }
        let with_snapshots = |every: &str| {
            let mut config = config.clone();
            config
                .extra_env
                .push(("KEEL_SNAPSHOT_EVERY", every.to_owned()));
            config
        };
        let timed = |config: CommandApiConfig, name: &'static str| async move {
            let started = Instant::now();
            let api = start(&config, name).await?;
            // Reading a log of millions of records takes minutes on the memory broker.
            settled_within(&[&api], Duration::from_secs(1800)).await?;
            anyhow::Ok((started.elapsed().as_secs_f64(), api))
        };
        let (without, api) = timed(with_snapshots("0"), "bench-full").await?;
        api.stop().await?;
        // This one reads the log too, and leaves a snapshot of it at its handoff.
        let (_, api) = timed(with_snapshots("10000"), "bench-writer").await?;
        api.stop().await?;
        let (with, api) = timed(with_snapshots("10000"), "bench-from-snapshot").await?;
        api.stop().await?;
        report.rows.push(Row::beside(
            &format!("Take-over over {streams} streams of {commits} commits"),
            "seconds to ready, from the snapshot",
            with,
            "reading the whole log",
            without,
        ));
        drop(broker);
    }
    Ok(())
}

/// Commands/s and memory with 1, 2 and 3 instances.
async fn throughput_and_memory(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    let mut per_one = None;
    for n in 1..=3usize {
        step(&format!(
            "scale: {n} instance(s), {CLIENTS} clients for {} s",
            options.seconds
        ));
        let broker = Broker::start().await?;
        let config =
            CommandApiConfig::new(&broker, &unique_prefix("bench-scale"), PARTITIONS, "bench");
        let mut apis = Vec::new();
        for i in 0..n {
            apis.push(start(&config, &format!("bench-{i}")).await?);
        }
        settled(&apis.iter().collect::<Vec<_>>()).await?;
        let workload = Arc::new(Workload::new(options.streams));
        set_up(&apis[0], &workload).await?;
        let bases = Arc::new(std::sync::RwLock::new(
            apis.iter().map(|a| a.url("")).collect::<Vec<_>>(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let workers = drive(&apis[0].client, bases, workload, stop.clone(), started);
        tokio::time::sleep(Duration::from_secs(options.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let elapsed = started.elapsed().as_secs_f64();
        let done = collect(workers).await;
        let ok = done
            .iter()
            .filter(|d| (200..300).contains(&d.status))
            .count();
        let rate = ok as f64 / elapsed;
        let rss: Vec<u64> = apis
            .iter()
            .filter_map(|a| a.pid().and_then(system::rss_bytes))
            .collect();
        let mean_rss = rss.iter().sum::<u64>() as f64 / rss.len().max(1) as f64 / 1e6;
        match per_one {
            None => {
                per_one = Some((rate, mean_rss));
                report.rows.push(Row::plain(
                    "Commands on 1 instance",
                    &format!("commands/s, {CLIENTS} clients"),
                    rate,
                ));
                report.rows.push(Row::plain(
                    "Memory of 1 instance",
                    &format!("resident MB over {} streams", options.streams),
                    mean_rss,
                ));
            }
            Some((one_rate, one_rss)) => {
                report.rows.push(Row::beside(
                    &format!("Commands on {n} instances"),
                    &format!("commands/s, {CLIENTS} clients over all"),
                    rate,
                    "1 instance",
                    one_rate,
                ));
                report.rows.push(Row::beside(
                    &format!("Memory per instance of {n}"),
                    &format!("resident MB over {} streams", options.streams),
                    mean_rss,
                    "1 instance",
                    one_rss,
                ));
            }
        }
        for api in apis {
            api.stop().await?;
        }
        drop(broker);
    }
    Ok(())
}

/// Planned handoffs (an instance joins, one stops) and a failover (one is killed) under
/// load: each moved partition's longest time without an acknowledged command.
async fn handoffs(options: &Options, report: &mut Report) -> anyhow::Result<()> {
    step(
        "scale: handoffs and a failover under load (two instances, a third joins, one stops, one is killed)",
    );
    let broker = Broker::start().await?;
    let config = CommandApiConfig::new(
        &broker,
        &unique_prefix("bench-handoff"),
        PARTITIONS,
        "bench",
    );
    let a = start(&config, "bench-a").await?;
    let b = start(&config, "bench-b").await?;
    let before = settled(&[&a, &b]).await?;
    let workload = Arc::new(Workload::new(options.streams));
    set_up(&a, &workload).await?;
    let bases = Arc::new(std::sync::RwLock::new(vec![a.url(""), b.url("")]));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers = drive_open(&a.client, bases.clone(), workload, stop.clone(), started);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A third instance joins: partitions move to it.
    let join_at = started.elapsed();
    let c = start(&config, "bench-c").await?;
    let joined = settled(&[&a, &b, &c]).await?;
    bases
        .write()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .push(c.url(""));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let join_window = (join_at, started.elapsed());
    let moved_join: BTreeSet<_> = joined
        .iter()
        .filter(|(p, owner)| before.get(*p).is_some_and(|o| *o != **owner))
        .map(|(p, _)| p.clone())
        .collect();

    // b stops gracefully: its partitions go to a and c.
    bases
        .write()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .retain(|u| *u != b.url(""));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stop_at = started.elapsed();
    let b_held: BTreeSet<_> = joined
        .iter()
        .filter(|(_, o)| **o == 1)
        .map(|(p, _)| p.clone())
        .collect();
    b.stop().await?;
    let after_stop = settled(&[&a, &c]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stop_window = (stop_at, started.elapsed());

    // c is killed: its partitions go to a once the group notices.
    bases
        .write()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .retain(|u| *u != c.url(""));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kill_at = started.elapsed();
    let c_held: BTreeSet<_> = after_stop
        .iter()
        .filter(|(_, o)| **o == 1)
        .map(|(p, _)| p.clone())
        .collect();
    c.kill().await?;
    settled(&[&a]).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let kill_window = (kill_at, started.elapsed());
    stop.store(true, Ordering::Relaxed);
    let done = collect(workers).await;

    let fences = fences_of(&broker.settings(&config.prefix, PARTITIONS)).await?;
    let mut planned = gaps(&done, &fences, &moved_join, join_window);
    planned.extend(gaps(&done, &fences, &b_held, stop_window));
    planned.sort_by_key(|g| g.length);
    let failover = gaps(&done, &fences, &c_held, kill_window);
    step(&format!(
        "scale: {} partitions moved in planned handoffs (longest: {}), {} in the failover",
        planned.len(),
        longest(&planned),
        failover.len()
    ));
    let planned: Vec<Duration> = planned.iter().map(|g| g.length).collect();
    let failover: Vec<Duration> = failover.iter().map(|g| g.length).collect();
    report.rows.push(Row::plain(
        "Planned handoff, per moved partition",
        "p50 ms, old owner's last acknowledgement to new owner's first",
        percentile(&planned, 0.5),
    ));
    report.rows.push(
        Row::plain(
            "Planned handoff, per moved partition",
            "p99 ms, old owner's last acknowledgement to new owner's first",
            percentile(&planned, 0.99),
        )
        .at_most("≤ 250 ms", 250.0),
    );
    let mut handoff_done: Vec<&Done> = Vec::new();
    for window in [join_window, stop_window] {
        handoff_done.extend(done.iter().filter(|d| d.at >= window.0 && d.at <= window.1));
    }
    let share = handoff_done
        .iter()
        .filter(|d| d.status == 503 || d.status == 0)
        .count() as f64
        / handoff_done.len().max(1) as f64
        * 100.0;
    report.rows.push(Row::plain(
        "Planned handoffs",
        "% of commands answered 503 meanwhile",
        share,
    ));
    report.rows.push(Row::plain(
        "Failover after a kill, per moved partition",
        "p50 ms, old owner's last acknowledgement to new owner's first",
        percentile(&failover, 0.5),
    ));
    report.rows.push(Row::plain(
        "Failover after a kill, per moved partition",
        "p99 ms, old owner's last acknowledgement to new owner's first",
        percentile(&failover, 0.99),
    ));
    report.rows.push(Row::plain(
        "Failover after a kill",
        "% of commands answered 503 meanwhile",
        unavailable_share(&done, kill_window),
    ));
    a.stop().await.context("stopping the last instance")?;
    drop(broker);
    Ok(())
}
