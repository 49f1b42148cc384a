//! The chaos suite: the real processes (a durable broker keeping its log in a SQLite
//! file, two command-api instances sharing the partitions, projector, query-api, and a
//! PostgreSQL server of the suite's own for the views) while clients restock products and
//! place orders with `Idempotency-Key`s, each sending each attempt to the next command-api
//! instance and retrying until it is acknowledged. Meanwhile, one fault at a time: a
//! process killed with SIGKILL (and started again), a process paused with SIGSTOP for
//! longer than its timeouts (a command-api instance past its group session, so its
//! partitions move and it wakes fenced out), a command-api instance stopped gracefully and
//! started again (planned handoffs away and back), PostgreSQL stopped at once
//! (`-m immediate`, a crash to it) and started again, and the database sessions of the
//! projector terminated. At the end, against the views and the log:
//! every acknowledged restock counted exactly once in `products`, every acknowledged
//! order exactly once in `orders`, `daily_sales` equal to the orders, and
//! `projector verify` clean.
//!
//! `make test` runs a few faults of each kind; `make chaos` runs `KEEL_CHAOS_FAULTS` (50
//! by default) of each and prints the figures.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use keel_schemas::ConsistencyToken;
use keel_tests::{
    Broker, CommandApiConfig, PrivatePostgres, Service, TestDatabase, eur, unique_prefix,
    workspace_binary,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

const PARTITIONS: i32 = 4;
const PRODUCTS: usize = 8;
const CLIENTS: u64 = 4;
/// How long a paused process stays paused: longer than the command API's request
/// timeout and the clients' own.
const PAUSE: Duration = Duration::from_secs(4);
/// How long a paused command-api instance stays paused: longer than its group session
/// (6 s), so the other instance takes its partitions.
const COMMAND_PAUSE: Duration = Duration::from_secs(8);
/// Command-api instances sharing the partitions.
const COMMAND_INSTANCES: usize = 2;
/// How long clients work between two faults.
const BETWEEN: Duration = Duration::from_millis(1500);
/// Faults of each kind in `make test`.
const SHORT_RUN: usize = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// A process killed with SIGKILL, then started again.
    Kill,
    /// A process paused with SIGSTOP for [`PAUSE`], then continued.
    Pause,
    /// PostgreSQL stopped at once and started again.
    DatabaseCrash,
    /// Every session of the views' database terminated (`pg_terminate_backend`).
    SessionsTerminated,
    /// A command-api instance stopped with SIGTERM (a planned handoff of its partitions),
    /// then started again (they come back).
    Handoff,
}

const FAULTS: [Fault; 5] = [
    Fault::Kill,
    Fault::Pause,
    Fault::DatabaseCrash,
    Fault::SessionsTerminated,
    Fault::Handoff,
];

/// Where the clients send their requests: the APIs' addresses change when they restart.
#[derive(Default)]
struct Addresses {
    /// Each command-api instance's.
    command: Vec<String>,
    query: String,
}

/// What the clients got acknowledged.
#[derive(Default)]
struct Acknowledged {
    /// Units restocked per SKU.
    restocked: BTreeMap<String, u64>,
    restocks: u64,
    /// Order id → (items, total in minor units).
    orders: BTreeMap<String, (u64, i64)>,
    token: ConsistencyToken,
}

/// The processes under test.
struct Processes {
    config: CommandApiConfig,
    views_url: String,
    command: Vec<Option<Service>>,
    projector: Option<Service>,
    query: Option<Service>,
    addresses: Arc<RwLock<Addresses>>,
}

impl Processes {
    async fn start_command(&mut self, i: usize) {
        let config = CommandApiConfig {
            instance: format!("chaos-{i}"),
            ..self.config.clone()
        };
        let api = Service::command_api(&config).await.unwrap();
        // Taking the partitions back reads the whole log, which grows through the run.
        let mut ready = api.wait_ready().await;
        for _ in 0..2 {
            if ready.is_ok() {
                break;
            }
            ready = api.wait_ready().await;
        }
        if let Err(e) = ready {
            let log = api.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            panic!(
                "{e}; the command API's last log lines:\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        {
            let mut addresses = self.addresses.write().unwrap();
            if addresses.command.len() <= i {
                addresses.command.resize(i + 1, String::new());
            }
            addresses.command[i] = api.url("");
        }
        if self.command.len() <= i {
            self.command.resize_with(i + 1, || None);
        }
        self.command[i] = Some(api);
    }

    /// Stops command-api instance `i` with SIGTERM (it hands its partitions over) and
    /// starts it again.
    async fn hand_over(&mut self, i: usize) -> String {
        let started = Instant::now();
        let status = self.command[i].take().unwrap().stop().await.unwrap();
        assert!(
            status.success(),
            "command-api {i} stopped gracefully: {status}"
        );
        self.start_command(i).await;
        format!(
            "command-api {i} stopped and back in {:.1} s",
            started.elapsed().as_secs_f64()
        )
    }

    async fn start_projector(&mut self) {
        self.projector = Some(
            Service::projector(&self.config, &self.views_url, &[])
                .await
                .unwrap(),
        );
    }

    async fn start_query(&mut self) {
        let api = Service::query_api(&self.config, &self.views_url)
            .await
            .unwrap();
        self.addresses.write().unwrap().query = api.url("");
        self.query = Some(api);
    }

    /// Kills one process (chosen by `n`) with SIGKILL and starts it again.
    async fn kill(&mut self, n: usize) -> String {
        let started = Instant::now();
        let name = match n % 3 {
            0 => {
                let i = (n / 3) % COMMAND_INSTANCES;
                self.command[i].take().unwrap().kill().await.unwrap();
                self.start_command(i).await;
                "command-api"
            }
            1 => {
                self.projector.take().unwrap().kill().await.unwrap();
                self.start_projector().await;
                "projector"
            }
            _ => {
                self.query.take().unwrap().kill().await.unwrap();
                self.start_query().await;
                "query-api"
            }
        };
        format!("{name}, back in {:.1} s", started.elapsed().as_secs_f64())
    }

    /// Pauses one process (chosen by `n`) for [`PAUSE`].
    async fn pause(&self, n: usize) -> &'static str {
        let (name, service, pause) = match n % 3 {
            0 => (
                "command-api",
                &self.command[(n / 3) % COMMAND_INSTANCES],
                COMMAND_PAUSE,
            ),
            1 => ("projector", &self.projector, PAUSE),
            _ => ("query-api", &self.query, PAUSE),
        };
        service.as_ref().unwrap().pause(pause).await.unwrap();
        name
    }
}

/// Files removed when dropped.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A small deterministic random source per client (no dependency for so little).
struct Dice(u64);

impl Dice {
    fn roll(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// POSTs a command with `key` until it is acknowledged (2xx), following the command
/// API's address; `503`, a timeout or a refused connection is retried with the same key.
/// Any other answer is a wrong answer, and fails the run.
async fn until_acknowledged(
    client: &reqwest::Client,
    addresses: &RwLock<Addresses>,
    path: &str,
    body: &Value,
    key: &str,
) -> ConsistencyToken {
    let give_up = Instant::now() + Duration::from_secs(180);
    for attempt in 0usize.. {
        assert!(
            Instant::now() < give_up,
            "{path} ({key}) was not acknowledged within 180 s"
        );
        // Each attempt to the next instance: any of them takes any command.
        let url = {
            let addresses = addresses.read().unwrap();
            format!(
                "{}{path}",
                addresses.command[(attempt + key.len()) % addresses.command.len()]
            )
        };
        let sent = client
            .post(url)
            .header("idempotency-key", key)
            .timeout(Duration::from_secs(3))
            .json(body)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                let body: Value = r.json().await.unwrap();
                return body["consistency_token"].as_str().unwrap().parse().unwrap();
            }
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {}
            Ok(r) => {
                let status = r.status();
                panic!(
                    "{path} ({key}): {status} {}",
                    r.text().await.unwrap_or_default()
                );
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unreachable!("the attempts never end")
}

/// A client: restocks and orders until told to stop; the command in hand is always
/// finished (acknowledged) first.
async fn client(
    id: u64,
    client: reqwest::Client,
    addresses: Arc<RwLock<Addresses>>,
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Acknowledged>>,
) {
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15 ^ (id + 1));
    for n in 0.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let sku = format!("P-{}", dice.roll(PRODUCTS as u64));
        if n % 3 == 2 {
            let order = format!("o-{id}-{n}");
            let (quantity, price) = (1 + dice.roll(3), 100 + 50 * dice.roll(10) as i64);
            let body = json!({"customer_id": format!("c-{id}"),
                              "lines": [{"sku": sku, "quantity": quantity, "unit_price": eur(price)}]});
            let token = until_acknowledged(
                &client,
                &addresses,
                &format!("/v1/orders/{order}/place"),
                &body,
                &order,
            )
            .await;
            let mut acked = acknowledged.lock().unwrap();
            acked
                .orders
                .insert(order, (quantity, quantity as i64 * price));
            acked.token = std::mem::take(&mut acked.token).merge(&token);
        } else {
            let quantity = 1 + dice.roll(5);
            let token = until_acknowledged(
                &client,
                &addresses,
                &format!("/v1/products/{sku}/restock"),
                &json!({"quantity": quantity}),
                &format!("r-{id}-{n}"),
            )
            .await;
            let mut acked = acknowledged.lock().unwrap();
            *acked.restocked.entry(sku).or_default() += quantity;
            acked.restocks += 1;
            acked.token = std::mem::take(&mut acked.token).merge(&token);
        }
    }
}

/// GETs `path` from the query API with `token` until it answers 200 (a view that has
/// not caught up answers 503 after its wait; a restarting API refuses connections).
async fn read_through(
    client: &reqwest::Client,
    addresses: &RwLock<Addresses>,
    path: &str,
    token: &ConsistencyToken,
) -> Value {
    let give_up = Instant::now() + Duration::from_secs(180);
    loop {
        let url = format!("{}{path}", addresses.read().unwrap().query);
        if let Ok(r) = client
            .get(url)
            .header("keel-consistency-token", token.encode())
            .header("keel-consistency-timeout", "10000")
            .send()
            .await
            && r.status() == StatusCode::OK
        {
            return r.json().await.unwrap();
        }
        assert!(
            Instant::now() < give_up,
            "{path} did not reach the clients' writes within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn acknowledged_work_survives_kills_pauses_handoffs_and_database_crashes_exactly_once() {
    let per_kind: usize = std::env::var("KEEL_CHAOS_FAULTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(SHORT_RUN);
    let started = Instant::now();
    // The broker keeps its log in the shared server, which no fault touches; the views
    // live in the suite's own server, which the faults crash.
    // The broker's log: a SQLite file (the default), or with KEEL_CHAOS_BROKER_STORAGE=
    // postgres a database of the shared server (several times slower to read back, so a
    // restarted command API takes longer to catch up).
    let log_file = format!(
        "keel-chaos-{}.db",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let _remove = RemoveOnDrop(
        ["", "-wal", "-shm"]
            .iter()
            .map(|suffix| std::env::temp_dir().join(format!("{log_file}{suffix}")))
            .collect(),
    );
    let (storage, _log_db) = match std::env::var("KEEL_CHAOS_BROKER_STORAGE").as_deref() {
        Ok("postgres") => {
            let db = TestDatabase::created("chaos-log").await.unwrap();
            (db.url(), Some(db))
        }
        _ => (format!("sqlite://{log_file}"), None),
    };
    let broker = Broker::start_durable(&storage).await.unwrap();
    let views = PrivatePostgres::start("chaos").await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("chaos"), PARTITIONS, "chaos");
    config.extra_env.extend([
        ("KEEL_REQUEST_TIMEOUT_MS", "2000".to_owned()),
        ("KEEL_KAFKA_TIMEOUT_MS", "3000".to_owned()),
    ]);
    let addresses = Arc::new(RwLock::new(Addresses::default()));
    let mut processes = Processes {
        config: config.clone(),
        views_url: views.url("keel_chaos"),
        command: Vec::new(),
        projector: None,
        query: None,
        addresses: Arc::clone(&addresses),
    };
    for i in 0..COMMAND_INSTANCES {
        processes.start_command(i).await;
    }
    processes.start_projector().await;
    processes.start_query().await;
    let http = config.auth.full_client();
    for p in 0..PRODUCTS {
        until_acknowledged(
            &http,
            &addresses,
            &format!("/v1/products/P-{p}/register"),
            &json!({"name": "chaos", "price": eur(100)}),
            &format!("register-{p}"),
        )
        .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            tokio::spawn(client(
                id,
                http.clone(),
                Arc::clone(&addresses),
                Arc::clone(&stop),
                Arc::clone(&acknowledged),
            ))
        })
        .collect();

    let injected: BTreeMap<Fault, AtomicU64> =
        FAULTS.iter().map(|f| (*f, AtomicU64::new(0))).collect();
    let admin = views.url("keel_chaos");
    for round in 0..per_kind {
        for fault in FAULTS {
            let what = match fault {
                Fault::Kill => processes.kill(round).await,
                Fault::Pause => processes.pause(round).await.to_owned(),
                Fault::DatabaseCrash => {
                    views.crash_and_restart().await.unwrap();
                    "PostgreSQL".to_owned()
                }
                Fault::Handoff => processes.hand_over(round % COMMAND_INSTANCES).await,
                Fault::SessionsTerminated => {
                    let pool = sqlx::PgPool::connect(&admin).await.unwrap();
                    let ended: Vec<bool> = sqlx::query_scalar(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    )
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    pool.close().await;
                    format!("{} sessions", ended.len())
                }
            };
            injected[&fault].fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "chaos: round {round}, {fault:?} ({what}), {} commands acknowledged so far",
                {
                    let acked = acknowledged.lock().unwrap();
                    acked.restocks + acked.orders.len() as u64
                }
            );
            tokio::time::sleep(BETWEEN).await;
        }
    }

    // Calm: every client finishes the command in hand.
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let acked = std::mem::take(&mut *acknowledged.lock().unwrap());
    assert!(
        acked.restocks > 0 && !acked.orders.is_empty(),
        "the clients got work through"
    );
    for path in [
        "/v1/products/P-0",
        "/v1/reports/daily-sales",
        "/v1/orders?limit=1",
    ] {
        read_through(&http, &addresses, path, &acked.token).await;
    }

    let pool = sqlx::PgPool::connect(&views.url("keel_chaos"))
        .await
        .unwrap();
    // Every acknowledged restock exactly once.
    let on_hand: BTreeMap<String, i64> =
        sqlx::query_as::<_, (String, i64)>("SELECT sku, on_hand FROM products")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for p in 0..PRODUCTS {
        let sku = format!("P-{p}");
        assert_eq!(
            on_hand.get(&sku).copied().unwrap_or(-1),
            acked.restocked.get(&sku).copied().unwrap_or(0) as i64,
            "{sku}: units on hand against units acknowledged"
        );
    }
    // Every acknowledged order exactly once, and nothing else.
    let orders: BTreeSet<String> = sqlx::query_scalar("SELECT order_id FROM orders")
        .fetch_all(&pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = acked.orders.keys().cloned().collect();
    assert_eq!(orders, expected, "orders against orders acknowledged");
    // daily_sales equals the orders: each counted once.
    let (placed, items, revenue): (i64, String, String) = sqlx::query_as(
        "SELECT sum(orders_placed)::bigint, sum(items)::text, sum(revenue_minor)::text FROM daily_sales",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let (want_items, want_revenue) = acked
        .orders
        .values()
        .fold((0u64, 0i64), |(i, r), (qi, qr)| (i + qi, r + qr));
    assert_eq!(
        (placed, items, revenue),
        (
            acked.orders.len() as i64,
            want_items.to_string(),
            want_revenue.to_string()
        ),
        "daily_sales against the orders"
    );
    pool.close().await;

    // The log itself: verify finds no violation.
    let output = tokio::process::Command::new(workspace_binary("projector").unwrap())
        .arg("verify")
        .envs(config.env())
        .env("KEEL_DATABASE_URL", views.url("keel_chaos"))
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "verify: {report}");
    assert!(report.contains("0 violations"), "{report}");

    let faults: Vec<String> = injected
        .iter()
        .map(|(f, n)| format!("{f:?} {}", n.load(Ordering::Relaxed)))
        .collect();
    println!(
        "chaos: faults injected: {}; acknowledged: {} restocks, {} orders; lost: 0; applied twice: 0; \
         verify: clean; {:.0} s",
        faults.join(", "),
        acked.restocks,
        acked.orders.len(),
        started.elapsed().as_secs_f64()
    );
}
