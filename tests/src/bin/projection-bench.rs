//! Projection catch-up measured beside its baselines, in one run:
//!
//! * **B_consume**: a bare consumer draining the same topic;
//! * **B_upsert**: a bare batched PostgreSQL upsert of rows shaped like the `orders` view
//!   (1,000 rows per statement, one transaction per statement);
//! * **Keel**: `projector run --projection orders` catching up from offset 0, then
//!   `projector rebuild orders daily_sales` rebuilding both from the same log.
//!
//! ```sh
//! cargo build --release -p projector -p keel-tests --bins
//! target/release/projection-bench 127.0.0.1:9092 1000000
//! ```
//! Arguments: brokers (a broker of your own: it writes a topic of its own), events
//! (default 1,000,000). It writes that many `OrderPlaced` commits (one event each, valid
//! under the gate) over 8 partitions, then runs the three readers one after the other.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_kafka::{KafkaSettings, ensure_topics, partition_for};
use keel_schemas::{
    CommandMeta, CommitRecord, EventEnvelope, FenceRecord, LogRecord, StreamRef, Timestamp, Writer,
};
use keel_tests::bench;
use rdkafka::producer::Producer;
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

const PARTITIONS: i32 = 8;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let brokers = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:9092".into());
    let events: usize = args
        .get(2)
        .map_or(Ok(1_000_000), |s| s.parse())
        .context("events")?;
    let run = Uuid::new_v4().simple().to_string()[..10].to_owned();
    let settings = KafkaSettings {
        brokers,
        topic_prefix: format!("pbench-{run}"),
        partitions: PARTITIONS,
        ..KafkaSettings::default()
    };
    let runtime = tokio::runtime::Runtime::new()?;
    let topic = runtime
        .block_on(ensure_topics(&settings, &["order"]))?
        .remove(0);

    // The log: a fence per partition, then one OrderPlaced commit per order.
    let producer = bench::bare_producer(&settings)?;
    let send = |partition: i32, key: &str, payload: &[u8]| {
        bench::send(&producer, &topic, partition, key, payload)
    };
    let writer = Writer {
        instance: "bench".into(),
        epoch: 1,
    };
    for p in 0..PARTITIONS {
        let fence = LogRecord::Fence(FenceRecord {
            writer: writer.clone(),
            recorded_at: Timestamp::now(),
            signature: None,
        });
        send(p, "", &fence.encode())?;
    }
    let started = Instant::now();
    for i in 0..events {
        let id = format!("bo-{i}");
        let quantity = (i % 7 + 1) as u64;
        let price = (i % 13 + 1) as i64 * 100;
        let commit = CommitRecord {
            commit_id: Uuid::now_v7(),
            stream: StreamRef { stream_type: "order".into(), id: id.clone() },
            expected_version: 0,
            events: vec![EventEnvelope {
                event_id: Uuid::now_v7(),
                version: 1,
                event_type: "OrderPlaced".into(),
                schema_version: 2,
                payload: json!({"customer_id": format!("c-{}", i % 1000),
                    "lines": [{"sku": "SKU-1", "quantity": quantity, "unit_price": {"amount_minor": price, "currency": "EUR"}}],
                    "total": {"amount_minor": price * quantity as i64, "currency": "EUR"}}),
            }],
            command: CommandMeta {
                id: Uuid::now_v7(),
                command_type: "PlaceOrder".into(),
                idempotency_key: None,
                actor: "bench".into(),
                correlation_id: "bench".into(),
                causation_id: None,
                request_digest: None,
            },
            writer: writer.clone(),
            recorded_at: Timestamp::now(),
            prev_hash: None,
            hash: String::new(),
            signature: None,
        }
        .sealed();
        send(
            partition_for(id.as_bytes(), PARTITIONS),
            &id,
            &LogRecord::Commit(commit).encode(),
        )?;
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(600))?;
    println!(
        "log: {events} commits written in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let total = events as i64 + i64::from(PARTITIONS);

    // B_consume.
    let consume = bench::drain(&settings, &topic, PARTITIONS, total)?;

    // B_upsert and Keel, each in a database of its own.
    let base = std::env::var("KEEL_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let (upsert_db, keel_db) = (format!("pbench_upsert_{run}"), format!("pbench_keel_{run}"));
    let upsert = runtime.block_on(bare_upsert(&base, &upsert_db, events))?;

    let projector = std::env::current_exe()?.with_file_name("projector");
    let started = Instant::now();
    let mut child = std::process::Command::new(&projector)
        .args(["run", "--projection", "orders"])
        .env("KEEL_KAFKA_BROKERS", &settings.brokers)
        .env("KEEL_TOPIC_PREFIX", &settings.topic_prefix)
        .env("KEEL_PARTITIONS", PARTITIONS.to_string())
        .env("KEEL_DATABASE_URL", format!("{base}/{keel_db}"))
        .env("RUST_LOG", "warn")
        .spawn()
        .with_context(|| format!("starting {}", projector.display()))?;
    let keel = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(1800);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Ok(pool) = PgPool::connect(&format!("{base}/{keel_db}")).await {
                let read: Option<i64> = sqlx::query_scalar(
                    "SELECT sum(next_offset)::bigint FROM keel_checkpoints WHERE projection = 'orders'",
                )
                .fetch_one(&pool)
                .await
                .unwrap_or(None);
                if read == Some(total) {
                    return Ok(started.elapsed().as_secs_f64());
                }
            }
            anyhow::ensure!(Instant::now() < deadline, "the projector did not catch up in 30 minutes");
        }
    })?;
    let _ = child.kill();
    let _ = child.wait();

    // Rebuilds of both views of the order topic from the same log, one after the other.
    let output = std::process::Command::new(&projector)
        .args(["rebuild", "orders", "daily_sales", "--json"])
        .env("KEEL_KAFKA_BROKERS", &settings.brokers)
        .env("KEEL_TOPIC_PREFIX", &settings.topic_prefix)
        .env("KEEL_PARTITIONS", PARTITIONS.to_string())
        .env("KEEL_DATABASE_URL", format!("{base}/{keel_db}"))
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::null())
        .output()
        .with_context(|| format!("starting {}", projector.display()))?;
    anyhow::ensure!(output.status.success(), "the rebuild failed");
    let rebuilds: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;

    let rate = |s: f64| events as f64 / s;
    println!("B_consume: {:.0} records/s", rate(consume));
    println!("B_upsert:  {:.0} rows/s", rate(upsert));
    println!(
        "Keel orders catch-up: {:.0} events/s ({:.1}% of B_consume, {:.1}% of B_upsert; includes process start)",
        rate(keel),
        100.0 * consume / keel,
        100.0 * upsert / keel
    );
    for r in &rebuilds {
        let per_second = r["events_per_second"].as_f64().unwrap_or_default();
        println!(
            "Keel {} rebuild: {per_second:.0} events/s ({:.1}% of B_consume, {:.1}% of B_upsert); the swap held its lock {:.1} ms",
            r["projection"].as_str().unwrap_or_default(),
            100.0 * per_second / rate(consume),
            100.0 * per_second / rate(upsert),
            r["swap_lock_ms"].as_f64().unwrap_or_default()
        );
    }
    runtime.block_on(async {
        if let Ok(pool) = PgPool::connect(&format!("{base}/postgres")).await {
            for db in [&upsert_db, &keel_db] {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
                    .execute(&pool)
                    .await;
            }
        }
    });
    Ok(())
}

/// Upserts `rows` rows shaped like the orders view, 1,000 per statement and transaction.
async fn bare_upsert(base: &str, db: &str, rows: usize) -> anyhow::Result<f64> {
    let admin = PgPool::connect(&format!("{base}/postgres")).await?;
    sqlx::query(&format!("CREATE DATABASE \"{db}\""))
        .execute(&admin)
        .await?;
    let pool = PgPool::connect(&format!("{base}/{db}")).await?;
    sqlx::query(
        "CREATE TABLE orders (order_id text PRIMARY KEY, customer_id text NOT NULL, status text NOT NULL,
            currency text NOT NULL, total_minor bigint NOT NULL, paid_minor bigint NOT NULL,
            refunded_minor bigint NOT NULL, item_count bigint NOT NULL, lines jsonb NOT NULL,
            carrier text, tracking text, placed_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            version bigint NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let started = Instant::now();
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1000) {
        let ids: Vec<String> = chunk.iter().map(|i| format!("bo-{i}")).collect();
        let customers: Vec<String> = chunk.iter().map(|i| format!("c-{}", i % 1000)).collect();
        let lines: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| json!([{"sku": "SKU-1", "quantity": i % 7 + 1, "unit_price": {"amount_minor": (i % 13 + 1) * 100, "currency": "EUR"}}]))
            .collect();
        let totals: Vec<i64> = chunk
            .iter()
            .map(|i| ((i % 13 + 1) * 100 * (i % 7 + 1)) as i64)
            .collect();
        let items: Vec<i64> = chunk.iter().map(|i| (i % 7 + 1) as i64).collect();
        let now = chrono::Utc::now();
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO orders SELECT id, c, 'placed', 'EUR', t, 0, 0, n, l, NULL, NULL, $6, $6, 1
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::jsonb[]) AS u(id, c, t, n, l)
             ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, total_minor = EXCLUDED.total_minor,
                item_count = EXCLUDED.item_count, lines = EXCLUDED.lines, updated_at = EXCLUDED.updated_at,
                version = EXCLUDED.version",
        )
        .bind(&ids)
        .bind(&customers)
        .bind(&totals)
        .bind(&items)
        .bind(&lines)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
    }
    Ok(started.elapsed().as_secs_f64())
}
