//! A deterministic simulation of the write path: the real [`PartitionOwner`] code, in
//! several simulated processes, against one partition in memory whose producer and reader
//! fail as a seed decides, beside a rival writer and a forger, with clients that give up
//! and retry under `Idempotency-Key`.
//!
//! It runs on a single-threaded Tokio runtime with a paused clock (time moves only when
//! every task waits, straight to the next timer), with every random choice and every id
//! drawn from the seed: a seed replays exactly. Each run ends calm (no faults, a fresh
//! process), lets every client finish, and is judged by [`check`] against the gate folded
//! over the whole log: every acknowledged command is there once and accepted, and was
//! decided on the log's state before it; every `409`, `412` and no-op answer was true of
//! the log at some point while its request waited; no key is applied twice; no two
//! processes acknowledged as one writer; nothing is appended for a client that had given
//! up; every record that counts is intact and signed by a trusted key.
//!
//! `KEEL_SIM_SEEDS=N` sets how many seeds the test runs (from a random first seed it
//! prints, or `KEEL_SIM_FIRST_SEED`); `KEEL_SIM_SEED=S` runs one seed and prints its
//! trace. `make sim` runs many more than `make test`.

mod check;
mod world;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_domain::ids::{OrderId, Quantity, Text};
use keel_domain::money::{Currency, Money};
use keel_domain::product::{Product, ProductCommand};
use keel_schemas::{SigningKey, TrustedKeys};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::check::{Attempt, Ending, Fold};
pub(crate) use self::world::Fault;
use self::world::{Shared, SimLog, World, lock};
use super::{
    CommandRequest, NoAnswer, PartitionOwner, RequestMeta, Status, StatusCell, Stop, reply_channel,
};

/// How long an owner waits for each read, in the simulation.
const TIMEOUT: Duration = Duration::from_secs(1);

/// What a run did and what its judge found.
pub(crate) struct Report {
    pub(crate) seed: u64,
    pub(crate) trace: Vec<String>,
    pub(crate) violations: Vec<String>,
    pub(crate) injected: Vec<(Fault, u64)>,
    /// Commands acknowledged with a commit.
    pub(crate) acknowledged: usize,
    /// Flights decided while the one ahead was read back, and those of them failed because
    /// the one ahead was not wholly accepted.
    pub(crate) pipelined: (u64, u64),
    pub(crate) attempts: usize,
}

/// Runs seed `seed` with the faults `enabled`.
pub(crate) fn run(seed: u64, enabled: &[Fault]) -> Report {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a single-threaded runtime");
    runtime.block_on(simulate(seed, enabled))
}

/// One simulated command-api process: its owner's channel and task, and the way to ask
/// it to stop (until it was asked).
struct Process {
    requests: mpsc::Sender<CommandRequest<Product>>,
    task: JoinHandle<()>,
    status: StatusCell,
    stop: Option<tokio::sync::oneshot::Sender<Stop>>,
}

type Processes = Arc<Mutex<Vec<Process>>>;

fn processes(p: &Processes) -> std::sync::MutexGuard<'_, Vec<Process>> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts a process: a partition owner named as every process is configured here (one
/// `KEEL_INSTANCE` for all), over its own view of the log.
fn start_process(world: &Shared, all: &Processes, key: &Arc<SigningKey>) {
    start_process_after(world, all, key, None);
}

/// Starts a process (see [`start_process`]) whose owner, once it has read the log and
/// before it fences, asks the process `predecessor` to hand the partition over, and waits
/// for it to stop (make-before-break: that process serves until then).
fn start_process_after(
    world: &Shared,
    all: &Processes,
    key: &Arc<SigningKey>,
    predecessor: Option<usize>,
) {
    let mut list = processes(all);
    let id = list.len();
    let log = SimLog::new(world, id);
    let mut ids = ChaCha8Rng::seed_from_u64(lock(world).rng.r#gen());
    let policy = Arc::clone(&lock(world).policy);
    let (owner, status) =
        PartitionOwner::<Product, _>::new(log, "cmd-sim", Arc::clone(key), policy, TIMEOUT);
    // Snapshots every few records, so that most starts begin from one.
    let every = lock(world).rng.gen_range(3..=30);
    let mut owner = owner
        .with_ids(move || uuid::Builder::from_random_bytes(ids.r#gen()).into_uuid())
        .checking_on_one_thread()
        .with_snapshots(every);
    if let Some(old) = predecessor {
        let (all, world) = (Arc::clone(all), Arc::clone(world));
        owner = owner.after_predecessor_hands_over(Box::new(move || {
            Box::pin(async move {
                let stop = processes(&all)[old].stop.take();
                if let Some(stop) = stop {
                    let _ = stop.send(Stop::HandoffNow);
                    lock(&world).note(format!("process {old} is asked to hand over: HandoffNow"));
                }
                // Waits (boundedly) for it to stop, as a new owner waits for the answer.
                for _ in 0..500 {
                    if processes(&all)[old].task.is_finished() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        }));
    }
    let (requests, rx) = mpsc::channel(256);
    let (stop, stop_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(owner.run_until(rx, Some(stop_rx)));
    list.push(Process {
        requests,
        task,
        status,
        stop: Some(stop),
    });
    lock(world).note(format!("process {id} starts"));
}

/// Crashes processes and starts twins, as the world decides, once a second.
async fn operate(world: Shared, all: Processes, key: Arc<SigningKey>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (crash, twin, handoff, lost, tamper) = {
            let mut w = lock(&world);
            (
                w.chance(world::Fault::Crash),
                w.chance(world::Fault::Twin),
                w.chance(world::Fault::Handoff),
                w.chance(world::Fault::Lost),
                w.chance(world::Fault::TamperSnapshot),
            )
        };
        if tamper {
            let mut w = lock(&world);
            let cut = w.rng.gen_bool(0.5);
            let at: usize = w.rng.r#gen();
            w.log.change_latest_snapshot(|s| {
                if cut {
                    s.body.truncate(s.body.len() / 2);
                } else if !s.body.is_empty() {
                    let i = at % s.body.len();
                    s.body[i] ^= 0x20;
                }
            });
            w.note("the latest snapshot is tampered with");
        }
        let newest = processes(&all).len() - 1;
        if handoff && lock(&world).rng.gen_bool(0.5) {
            // Make-before-break: the next process reads the log while this one serves,
            // then asks it to hand over.
            start_process_after(&world, &all, &key, Some(newest));
        } else if handoff || lost {
            let how = if handoff { Stop::Handoff } else { Stop::Lost };
            if let Some(stop) = processes(&all)[newest].stop.take() {
                let _ = stop.send(how);
                lock(&world).note(format!("process {newest} is asked to stop: {how:?}"));
            }
            start_process(&world, &all, &key);
        }
        if crash {
            let newest = processes(&all).len() - 1;
            processes(&all)[newest].task.abort();
            lock(&world).note(format!("process {newest} is killed"));
        }
        if crash || twin {
            start_process(&world, &all, &key);
        }
        if twin {
            // Two processes started together with one configured name.
            start_process(&world, &all, &key);
        }
    }
}

/// A command for one of the run's streams, drawn from the seed.
fn draw_command(rng: &mut ChaCha8Rng, client: usize, n: usize) -> ProductCommand {
    let money = |amount| Money::new(amount, Currency::parse("EUR").expect("a currency"));
    let quantity = |q| Quantity::parse("quantity", q).expect("a quantity");
    let order = |o: usize| OrderId::parse(format!("o-{client}-{o}")).expect("an order id");
    match rng.gen_range(0..100) {
        0..12 => ProductCommand::RegisterProduct {
            name: Text::parse("name", "Lamp").expect("a name"),
            price: money(1000).expect("a price"),
        },
        12..45 => ProductCommand::Restock {
            quantity: quantity(rng.gen_range(1..=10)),
        },
        45..75 => ProductCommand::ReserveStock {
            order_id: order(n),
            quantity: quantity(rng.gen_range(1..=15)),
        },
        75..88 => ProductCommand::ReleaseStock {
            order_id: order(rng.gen_range(0..=n)),
        },
        88..98 => ProductCommand::ChangePrice {
            price: money(rng.gen_range(1..=3) * 500).expect("a price"),
        },
        _ => ProductCommand::Discontinue,
    }
}

/// What the clients recorded: every attempt, and how many commands got a final answer.
#[derive(Default)]
struct Record {
    attempts: Vec<Attempt>,
    finished: usize,
}

/// A client sending `count` commands one after another, each retried (with its key)
/// until it gets a final answer.
async fn client(
    world: Shared,
    all: Processes,
    record: Arc<Mutex<Record>>,
    client: usize,
    count: usize,
    streams: usize,
) {
    for n in 0..count {
        let (think, stream, command, key, if_match) = {
            let mut w = lock(&world);
            let think = w.between(Duration::ZERO, Duration::from_secs(2));
            let stream = format!("p-{}", w.rng.gen_range(0..streams));
            let command = draw_command(&mut w.rng, client, n);
            let key = w.rng.gen_bool(0.85).then(|| format!("k-{client}-{n}"));
            let if_match = w.rng.gen_bool(0.15).then(|| w.rng.gen_range(0..6));
            (think, stream, command, key, if_match)
        };
        tokio::time::sleep(think).await;
        for attempt in 1.. {
            let id = format!("c{client}.{n}.{attempt}");
            let (owner, requests, patience, sent, hedge) = {
                let mut w = lock(&world);
                let list = processes(&all);
                let newest = list.len() - 1;
                // Once calm, clients find the process that serves (as a load balancer
                // routes by readiness); before, mostly the newest, sometimes any.
                let serving = list
                    .iter()
                    .rposition(|p| !p.task.is_finished() && p.status.get() == Status::Serving);
                let owner = match serving {
                    Some(serving) if w.calm => serving,
                    _ if w.rng.gen_bool(0.8) => newest,
                    _ => w.rng.gen_range(0..list.len()),
                };
                let patience = if w.chance(Fault::ClientGivesUp) {
                    w.between(Duration::from_millis(1), TIMEOUT * 3)
                } else {
                    Duration::from_secs(3600)
                };
                let hedge = (key.is_some() && w.chance(Fault::Hedge))
                    .then(|| w.between(Duration::ZERO, Duration::from_millis(300)));
                (
                    owner,
                    list[owner].requests.clone(),
                    patience,
                    w.len(),
                    hedge,
                )
            };
            let meta = RequestMeta {
                command_type: "Sim",
                idempotency_key: key.clone(),
                request_digest: key.as_ref().map(|_| format!("digest-{client}-{n}")),
                if_match,
                actor: "sim".into(),
                correlation_id: id.clone(),
                causation_id: None,
                traceparent: None,
                // Some commits carry a trace context, under their hash and signature.
                recorded_trace: (n % 3 == 0)
                    .then(|| format!("00-{:032x}-{:016x}-01", n + 1, client + 1)),
            };
            let send = |meta: RequestMeta| {
                let (reply, answer) = reply_channel();
                let request = CommandRequest {
                    stream_id: stream.clone(),
                    command: command.clone(),
                    meta,
                    reply,
                };
                let sent = requests.try_send(request);
                let world = Arc::clone(&world);
                async move {
                    match sent {
                        Err(_) => Ending::Dropped,
                        Ok(()) => match answer.wait(patience).await {
                            Ok(answer) => Ending::Answered(answer),
                            Err(NoAnswer::OwnerGone) => Ending::Dropped,
                            Err(NoAnswer::GaveUp) => Ending::GaveUp(lock(&world).len()),
                        },
                    }
                }
            };
            // The same request again, a moment later, as a hedging client would send it:
            // judged as an attempt of its own.
            let hedged = async {
                let after = hedge?;
                tokio::time::sleep(after).await;
                let mut meta = meta.clone();
                meta.correlation_id = format!("{id}h");
                let sent = lock(&world).len();
                let ending = send(meta).await;
                Some((sent, ending))
            };
            let (ending, hedged) = tokio::join!(send(meta.clone()), hedged);
            let retry = matches!(
                ending,
                Ending::GaveUp(_)
                    | Ending::Dropped
                    | Ending::Answered(Err(super::OwnerError::Unavailable(_)))
            );
            // Each attempt noted in the trace as it ends, and judged with where the log was.
            let judged = |id: String, sent: usize, ending: Ending| {
                let ended = {
                    let mut w = lock(&world);
                    w.note(format!("{id} {stream} via {owner}: {}", summary(&ending)));
                    w.len()
                };
                Attempt {
                    id,
                    stream: stream.clone(),
                    command: command.clone(),
                    key: key.clone(),
                    if_match,
                    owner,
                    sent,
                    ended,
                    ending,
                }
            };
            let attempt = judged(id.clone(), sent, ending);
            let hedged = hedged.map(|(sent, ending)| judged(format!("{id}h"), sent, ending));
            {
                let mut record = record
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                record.attempts.extend(hedged);
                record.attempts.push(attempt);
            }
            if !retry || key.is_none() {
                break;
            }
            let backoff = lock(&world).between(Duration::from_millis(50), Duration::from_secs(1));
            tokio::time::sleep(backoff).await;
        }
        record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .finished += 1;
    }
}

fn summary(ending: &Ending) -> String {
    match ending {
        Ending::Answered(Ok(o)) => format!(
            "ok v{} events {}{}",
            o.version,
            o.events.len(),
            if o.replayed { " replayed" } else { "" }
        ),
        Ending::Answered(Err(e)) => format!("refused: {e}"),
        Ending::GaveUp(at) => format!("gave up at {at}"),
        Ending::Dropped => "dropped".into(),
    }
}

async fn simulate(seed: u64, enabled: &[Fault]) -> Report {
    let world: Shared = Arc::new(Mutex::new(World::new(seed, enabled, TIMEOUT)));
    let (key, rival_key, clients, streams, commands, storm) = {
        let mut w = lock(&world);
        let key = SigningKey::from_bytes(w.rng.r#gen());
        let rival = SigningKey::from_bytes(w.rng.r#gen());
        let clients = w.rng.gen_range(2..=5);
        let streams = w.rng.gen_range(1..=4);
        let commands = w.rng.gen_range(5..=25);
        let storm = w.between(Duration::from_secs(10), Duration::from_secs(60));
        let line = format!(
            "seed {seed}: {clients} clients x {commands} commands on {streams} streams, {}s of faults {:?}",
            storm.as_secs(),
            w.faults
        );
        w.note(line);
        (Arc::new(key), rival, clients, streams, commands, storm)
    };
    let mut trusted = TrustedKeys::default();
    trusted.add(&key);
    trusted.add(&rival_key);
    let policy = Arc::new(trusted);
    lock(&world).policy = Arc::clone(&policy);

    let all: Processes = Arc::default();
    start_process(&world, &all, &key);
    let others = tokio::spawn(world::other_writers(Arc::clone(&world), rival_key));
    let operator = tokio::spawn(operate(
        Arc::clone(&world),
        Arc::clone(&all),
        Arc::clone(&key),
    ));
    let record = Arc::new(Mutex::new(Record::default()));
    let tasks: Vec<JoinHandle<()>> = (0..clients)
        .map(|c| {
            tokio::spawn(client(
                Arc::clone(&world),
                Arc::clone(&all),
                Arc::clone(&record),
                c,
                commands,
                streams,
            ))
        })
        .collect();

    tokio::time::sleep(storm).await;
    operator.abort();
    {
        let mut w = lock(&world);
        w.calm = true;
        w.note("calm: no more faults");
    }
    let _ = others.await;
    start_process(&world, &all, &key);
    let done = tokio::time::timeout(Duration::from_secs(600), async {
        for task in tasks {
            let _ = task.await;
        }
    })
    .await;
    if done.is_err() {
        lock(&world).note("clients still waiting after 600s of calm");
    }
    // Let late produces land before judging.
    tokio::time::sleep(TIMEOUT * 10).await;
    let mut pipelined = (0, 0);
    for p in processes(&all).iter() {
        p.task.abort();
        pipelined.0 += p.status.pipelined();
        pipelined.1 += p.status.doomed();
    }

    let record = std::mem::take(
        &mut *record
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut w = lock(&world);
    let fold = Fold::of(&w.log.entries(), &policy, true);
    let violations = check::check(
        &fold,
        &record.attempts,
        clients * commands - record.finished,
    );
    let acknowledged = record
        .attempts
        .iter()
        .filter(
            |a| matches!(&a.ending, Ending::Answered(Ok(o)) if !o.events.is_empty() && !o.replayed),
        )
        .count();
    Report {
        seed,
        trace: std::mem::take(&mut w.trace),
        violations,
        injected: w.injected.clone(),
        acknowledged,
        pipelined,
        attempts: record.attempts.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<u64> {
        std::env::var(name).ok().and_then(|v| v.parse().ok())
    }

    /// Every fault kind, or those `KEEL_SIM_FAULTS` names (comma-separated, as in
    /// [`Fault`]).
    fn faults() -> Vec<Fault> {
        match std::env::var("KEEL_SIM_FAULTS") {
            Ok(names) if !names.trim().is_empty() => Fault::ALL
                .into_iter()
                .filter(|f| names.split(',').any(|n| n.trim() == format!("{f:?}")))
                .collect(),
            _ => Fault::ALL.to_vec(),
        }
    }

    #[test]
    fn a_seed_replays_exactly() {
        let first = run(7, &Fault::ALL);
        let second = run(7, &Fault::ALL);
        assert!(first.trace.len() > 50, "the run did something");
        assert_eq!(first.trace, second.trace);
    }

    #[test]
    fn without_faults_every_command_is_answered_and_the_log_agrees() {
        for seed in 0..20 {
            let report = run(seed, &[]);
            assert!(report.violations.is_empty(), "{:#?}", report.violations);
            assert!(report.acknowledged > 0);
        }
    }

    #[test]
    fn every_seed_holds_the_invariants() {
        if let Some(seed) = env("KEEL_SIM_SEED") {
            let report = run(seed, &faults());
            for line in &report.trace {
                println!("{line}");
            }
            assert!(
                report.violations.is_empty(),
                "seed {seed}: {:#?}",
                report.violations
            );
            return;
        }
        let seeds = env("KEEL_SIM_SEEDS").unwrap_or(1000);
        let first = env("KEEL_SIM_FIRST_SEED").unwrap_or_else(|| rand::random::<u32>().into());
        println!(
            "simulating seeds {first}..{} with {:?}",
            first + seeds,
            faults()
        );
        let mut injected: Vec<(Fault, u64)> = Vec::new();
        let (mut acknowledged, mut attempts, mut pipelined) = (0, 0, (0, 0));
        let mut failed = Vec::new();
        let faults = faults();
        for seed in first..first + seeds {
            let report = run(seed, &faults);
            for (fault, n) in report.injected {
                match injected.iter_mut().find(|(f, _)| *f == fault) {
                    Some((_, total)) => *total += n,
                    None => injected.push((fault, n)),
                }
            }
            acknowledged += report.acknowledged;
            attempts += report.attempts;
            pipelined.0 += report.pipelined.0;
            pipelined.1 += report.pipelined.1;
            if !report.violations.is_empty() {
                println!("seed {}: {:#?}", report.seed, report.violations);
                failed.push(report.seed);
            }
        }
        injected.sort();
        println!(
            "{seeds} seeds, {attempts} attempts, {acknowledged} commands acknowledged; {} flights pipelined, {} of them failed by the flight ahead; faults injected: {injected:?}",
            pipelined.0, pipelined.1
        );
        assert!(
            failed.is_empty(),
            "{} seed(s) broke an invariant: {failed:?}; replay one with KEEL_SIM_SEED=<seed>",
            failed.len()
        );
        // The runs reach the pipeline, and its failure path, often enough to judge them.
        if seeds >= 200 && faults.len() == Fault::ALL.len() {
            assert!(
                pipelined.0 >= seeds / 4 && pipelined.1 > 0,
                "flights pipelined, and failed by the one ahead: {pipelined:?}"
            );
        }
    }
}
