//! The read path on several processes: projector processes share each projection by
//! partition (killed, paused past the claim timeout, joined, and the views still hold
//! every event exactly once, equal to a fresh single-process rebuild row for row), and a
//! query API reads a hot standby.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use keel_tests::{Broker, CommandApiConfig, PrivatePostgres, Service, Stack, eur, unique_prefix};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;

use crate::read_path::{assert_applied_exactly_once, place_orders};

/// The claim timeout the test's projectors run with.
const CLAIM_TIMEOUT_MS: u64 = 2000;

async fn projector(stack: &Stack) -> Service {
    stack
        .projector_process(
            &["run"],
            &[(
                "KEEL_PROJECTOR_CLAIM_TIMEOUT_MS",
                CLAIM_TIMEOUT_MS.to_string(),
            )],
        )
        .await
        .unwrap()
}

fn signal(process: &Service, signal: &str) {
    let pid = process.pid().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success(), "kill {signal} {pid}");
}

/// How many units each live process holds, by pid, once every unit is held by one of
/// `pids` and the shares differ by at most one; fails after 60 s.
async fn settled(pool: &PgPool, pids: &[u32]) -> BTreeMap<u32, i64> {
    let started = Instant::now();
    loop {
        let rows: Vec<(Option<String>, i64)> = sqlx::query_as(
            "SELECT p.name, count(*) FROM keel_units u
             LEFT JOIN keel_projector_processes p ON p.id = u.holder AND p.expires_at > now()
             WHERE u.kind = 'run' GROUP BY p.name",
        )
        .fetch_all(pool)
        .await
        .unwrap();
        let mut shares: BTreeMap<u32, i64> = pids.iter().map(|p| (*p, 0)).collect();
        let mut elsewhere = 0;
        for (name, count) in &rows {
            let pid = name
                .as_deref()
                .and_then(|n| n.rsplit(':').next())
                .and_then(|p| p.parse::<u32>().ok());
            match pid.and_then(|p| shares.get_mut(&p)) {
                Some(share) => *share += count,
                None => elsewhere += count,
            }
        }
        let (most, fewest) = (
            shares.values().max().copied().unwrap_or(0),
            shares.values().min().copied().unwrap_or(0),
        );
        if elsewhere == 0 && most - fewest <= 1 && fewest > 0 {
            return shares;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the units did not settle over {pids:?}: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The units the process of `pid` holds, with their claim counts.
async fn held_by(pool: &PgPool, pid: u32) -> Vec<((String, String, i32), i64)> {
    sqlx::query_as::<_, (String, String, i32, i64)>(
        "SELECT u.projection, u.topic, u.partition, u.claims FROM keel_units u
         JOIN keel_projector_processes p ON p.id = u.holder WHERE p.name LIKE '%:' || $1",
    )
    .bind(pid.to_string())
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(projection, topic, partition, claims)| ((projection, topic, partition), claims))
    .collect()
}

async fn deadlocks(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn three_projectors_share_the_work_through_a_kill_a_pause_and_a_join() {
    let mut stack = Stack::start("share", 4).await;
    stack.projector.take().unwrap().stop().await.unwrap();
    let pool = stack.pool().await;
    let (a, b, c) = (
        projector(&stack).await,
        projector(&stack).await,
        projector(&stack).await,
    );
    let pids = [a.pid().unwrap(), b.pid().unwrap(), c.pid().unwrap()];
    let shares = settled(&pool, &pids).await;
    println!("settled over three processes: {shares:?}");
    let deadlocks_before = deadlocks(&pool).await;
    let claims_before: i64 = sqlx::query_scalar("SELECT sum(claims)::bigint FROM keel_units")
        .fetch_one(&pool)
        .await
        .unwrap();

    const ORDERS: usize = 4000;
    let placing = place_orders(&stack, "sh", ORDERS);
    let faults = async {
        tokio::time::sleep(Duration::from_millis(800)).await;
        // A process dies.
        a.kill().await.unwrap();
        tokio::time::sleep(Duration::from_millis(800)).await;
        // One stalls well past the claim timeout: the others take its units, and when it
        // wakes it must apply nothing more of them.
        let before = held_by(&pool, b.pid().unwrap()).await;
        signal(&b, "-STOP");
        tokio::time::sleep(Duration::from_millis(CLAIM_TIMEOUT_MS * 5 / 2)).await;
        let mut moved = Vec::new();
        for (unit, claims) in &before {
            let now: i64 = sqlx::query_scalar(
                "SELECT claims FROM keel_units WHERE kind = 'run' AND projection = $1 AND topic = $2
                 AND partition = $3",
            )
            .bind(&unit.0)
            .bind(&unit.1)
            .bind(unit.2)
            .fetch_one(&pool)
            .await
            .unwrap();
            moved.push((unit.clone(), *claims, now));
        }
        signal(&b, "-CONT");
        // And one joins.
        let d = projector(&stack).await;
        (b, d, moved)
    };
    let (placed, (b, d, paused_held)) = tokio::join!(placing, faults);
    assert_applied_exactly_once(&stack, placed, ORDERS).await;

    let shares = settled(
        &pool,
        &[b.pid().unwrap(), c.pid().unwrap(), d.pid().unwrap()],
    )
    .await;
    println!("settled after the faults: {shares:?}");
    let claims_after: i64 = sqlx::query_scalar("SELECT sum(claims)::bigint FROM keel_units")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        claims_after > claims_before,
        "units moved during the faults ({claims_before} claims before, {claims_after} after)"
    );
    // Every unit the paused process held was claimed by another while it was paused.
    assert!(!paused_held.is_empty(), "the paused process held units");
    for (unit, before, during) in &paused_held {
        assert!(
            during > before,
            "{unit:?} moved while its process was paused"
        );
    }
    assert_eq!(
        deadlocks(&pool).await,
        deadlocks_before,
        "batches of several processes on the same customers and days never deadlock"
    );

    // Stopped gracefully, each lets go of its units at once.
    for process in [b, c, d] {
        assert!(process.stop().await.unwrap().success());
    }
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_units WHERE holder IS NOT NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(held, 0, "the stopped processes let go of every unit");

    // The views equal a fresh single-process rebuild of every projection (nobody runs to
    // help fill it), row for row.
    let live: BTreeMap<String, i32> =
        sqlx::query_as::<_, (String, i32)>("SELECT name, generation FROM keel_projections")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let (status, _, stderr) = stack
        .projector_command(&["rebuild", "--all", "--keep-old"], &[])
        .await
        .unwrap();
    assert!(status.success(), "{stderr}");
    for spec in keel_views::PROJECTIONS {
        let old = live[spec.name];
        let new: i32 =
            sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = $1")
                .bind(spec.name)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert!(new > old, "{} was rebuilt", spec.name);
        for table in spec.tables {
            let (rows, differ) = rows_differ(&pool, table, old, new).await;
            assert_eq!(
                differ, 0,
                "{table}: the shared run and the fresh rebuild differ in {differ} of {rows} rows"
            );
        }
    }
    pool.close().await;
}

/// The rows of `table` in generation `a` that are not in `b`, and the other way round.
async fn rows_differ(pool: &PgPool, table: &str, a: i32, b: i32) -> (i64, i64) {
    sqlx::query_as(&format!(
        "SELECT (SELECT count(*) FROM {table}_g{a}),
                (SELECT count(*) FROM ((SELECT * FROM {table}_g{a} EXCEPT ALL SELECT * FROM {table}_g{b})
                  UNION ALL (SELECT * FROM {table}_g{b} EXCEPT ALL SELECT * FROM {table}_g{a})) d)"
    ))
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Two running projectors fill a rebuild together; one is killed while it holds some of
/// the rebuild's partitions. The other (or the coordinator) finishes them, the rebuild
/// swaps once, and the new generation equals the live one row for row.
#[tokio::test]
async fn a_rebuild_filled_by_two_projectors_survives_one_of_them_dying() {
    let mut stack = Stack::start("shared-rebuild", 4).await;
    stack.projector.take().unwrap().stop().await.unwrap();
    let pool = stack.pool().await;
    // Paced, so that the rebuild lasts long enough to kill a helper in the middle of it.
    let paced = |pace: &str| {
        vec![
            (
                "KEEL_PROJECTOR_CLAIM_TIMEOUT_MS",
                CLAIM_TIMEOUT_MS.to_string(),
            ),
            ("KEEL_REBUILD_PACE", pace.to_owned()),
        ]
    };
    let a = stack
        .projector_process(&["run"], &paced("400"))
        .await
        .unwrap();
    let b = stack
        .projector_process(&["run"], &paced("400"))
        .await
        .unwrap();
    const ORDERS: usize = 3000;
    let placed = place_orders(&stack, "sr", ORDERS).await;
    assert_applied_exactly_once(&stack, placed, ORDERS).await;
    let live: i32 =
        sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = 'orders'")
            .fetch_one(&pool)
            .await
            .unwrap();

    let unpaced = paced("off");
    let rebuilding =
        stack.projector_command(&["rebuild", "orders", "--keep-old", "--json"], &unpaced);
    let killing = async {
        // Once the first process holds some of the rebuild's partitions, it dies.
        let started = Instant::now();
        loop {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM keel_units u JOIN keel_projector_processes p ON p.id = u.holder
                 WHERE u.kind = 'rebuild' AND p.name LIKE '%:' || $1",
            )
            .bind(a.pid().unwrap().to_string())
            .fetch_one(&pool)
            .await
            .unwrap();
            if held > 0 {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the first process never helped"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // GET /v1/projections says who fills it.
        loop {
            let rebuild = stack.projection("orders").await["rebuild"].clone();
            if rebuild["helpers"].as_i64().is_some_and(|n| n >= 1) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the status never showed the helpers: {rebuild}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.kill().await.unwrap();
    };
    let (rebuilt, ()) = tokio::join!(rebuilding, killing);
    let (status, stdout, stderr) = rebuilt.unwrap();
    assert!(status.success(), "{stderr}");
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(report["generation"], live + 1, "{report}");
    assert!(
        report["helped_by"].as_u64().unwrap() >= 1,
        "the running processes helped: {report}"
    );
    let now: i32 =
        sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = 'orders'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(now, live + 1, "swapped in once");
    for table in keel_views::PROJECTIONS
        .iter()
        .find(|spec| spec.name == "orders")
        .unwrap()
        .tables
    {
        let (rows, differ) = rows_differ(&pool, table, live, live + 1).await;
        assert!(rows > 0, "{table} has rows");
        assert_eq!(
            differ, 0,
            "{table}: the shared rebuild differs in {differ} of {rows} rows"
        );
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_units WHERE kind = 'rebuild'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, 0, "the swap deleted the rebuild's units");
    // The surviving process follows the new generation.
    let (status, _, token) = stack
        .post(
            "/v1/orders/sr-after/place",
            json!({"customer_id": "c-1", "lines": [{"sku": "S", "quantity": 1, "unit_price": eur(100)}]}),
        )
        .await;
    assert!(status.is_success(), "{status}");
    let (status, order) = stack.get("/v1/orders/sr-after", token.as_ref()).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert!(b.stop().await.unwrap().success());
    pool.close().await;
}

/// A query API reading a hot standby (a base backup of the projector's private primary,
/// streaming its log): every command's token is honoured there too, although the standby
/// cannot `LISTEN` for the projector's notifications.
#[tokio::test]
async fn a_query_api_on_a_hot_standby_reads_its_writes_every_time() {
    let primary = PrivatePostgres::start("primary").await.unwrap();
    let standby = primary.standby("standby").await.unwrap();
    let broker = Broker::start().await.unwrap();
    let config = CommandApiConfig::new(&broker, &unique_prefix("replica"), 2, "cmd-r");
    let command = Service::command_api_ready(&config).await.unwrap();
    let _projector = Service::projector(&config, &primary.url("keel"), &[])
        .await
        .unwrap();
    // The projector creates the database and the views on the primary; the standby
    // replays them.
    let started = Instant::now();
    loop {
        let prepared = match PgPool::connect(&standby.url("keel")).await {
            Ok(pool) => {
                let n: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM keel_projections")
                    .fetch_one(&pool)
                    .await;
                pool.close().await;
                n.unwrap_or(0)
            }
            Err(_) => 0,
        };
        if prepared as usize >= keel_views::PROJECTIONS.len() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the standby did not replay the views within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let query = Service::query_api(&config, &standby.url("keel"))
        .await
        .unwrap();
    query.wait_ready().await.unwrap();
    let client = config.auth.full_client();
    let post = |path: &str, body: Value| {
        let request = client.post(command.url(path)).json(&body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let body: Value = response.json().await.unwrap();
            assert!(status.is_success(), "{status}: {body}");
            body["consistency_token"].as_str().unwrap().to_owned()
        }
    };
    post(
        "/v1/products/REP-1/register",
        json!({"name": "R", "price": eur(100)}),
    )
    .await;
    for i in 1..=200u64 {
        let token = post("/v1/products/REP-1/restock", json!({"quantity": 1})).await;
        let response = client
            .get(query.url("/v1/products/REP-1"))
            .header("keel-consistency-token", token)
            .header("keel-consistency-timeout", "10000")
            .send()
            .await
            .unwrap();
        let status = response.status();
        let product: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::OK, "read {i}: {product}");
        assert_eq!(
            product["on_hand"], i,
            "restock {i} is visible on the standby on the first read"
        );
    }
}
