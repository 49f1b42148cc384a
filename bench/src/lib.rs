//! The benchmark harness's parts: the baselines (a bare producer, consumer, upsert and
//! produce-to-consume round trip with Keel's client settings), the log the projection
//! benchmarks read, the HTTP load, the report and its plots.

pub mod load;
pub mod plot;
pub mod report;
pub mod system;

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_kafka::KafkaSettings;
use keel_kafka::partition_for;
use keel_schemas::testing::{commit, signed_fence, stream};
use keel_schemas::{CommitRecord, LogRecord, SigningKey, TopicPartition, Writer};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::producer::{BaseProducer, BaseRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::json;

/// An idempotent, `acks=all` producer that batches as a bulk writer would.
pub fn bare_producer(settings: &KafkaSettings) -> anyhow::Result<BaseProducer> {
    Ok(settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "500000")
        .create()?)
}

/// A producer that writes a log in bulk: idempotent, `acks=all`, batches of up to 1 MB
/// filled for up to 200 ms. A log written in large batches is what a compacting or bulk
/// import leaves; it also spares the memory broker, which lists every stored batch of a
/// partition on each fetch (a fetch deep into a log of small batches costs it time in
/// proportion to the log, where Kafka looks the offset up in its index).
fn bulk_producer(settings: &KafkaSettings) -> anyhow::Result<BaseProducer> {
    Ok(settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "200")
        .set("batch.size", "1000000")
        .set("batch.num.messages", "100000")
        .set("queue.buffering.max.messages", "500000")
        .create()?)
}

/// Enqueues one record, waiting while the producer's queue is full.
pub fn send(
    producer: &BaseProducer,
    topic: &str,
    partition: i32,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<()> {
    loop {
        let record = BaseRecord::to(topic)
            .partition(partition)
            .key(key)
            .payload(payload);
        match producer.send(record) {
            Ok(()) => {
                producer.poll(Duration::ZERO);
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e).context("producing"),
        }
    }
}

/// Reads `records` records from the start of `partitions` partitions of `topic` with a
/// bare consumer; returns the seconds it took.
pub fn drain(
    settings: &KafkaSettings,
    topic: &str,
    partitions: i32,
    records: i64,
) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "keel-bench")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let started = Instant::now();
    let mut seen = 0;
    while seen < records {
        match consumer.poll(Duration::from_secs(30)) {
            Some(Ok(_)) => seen += 1,
            Some(Err(e)) => return Err(e).context("consuming"),
            None => anyhow::bail!("no record for 30 s after {seen} of {records}"),
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// The `p` quantile (0 to 1) of latencies sorted in ascending order; zero when empty.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// A sample `OrderPlaced` commit for order `i`, valid under the gate when written after a
/// fence of `writer`: what the projection benchmarks read, and the size of record the
/// bare producer writes.
pub fn order_placed(i: usize, writer: &Writer) -> CommitRecord {
    let quantity = (i % 7 + 1) as u64;
    let price = (i % 13 + 1) as i64 * 100;
    commit(writer, stream("order", format!("bo-{i}")), 0)
        .event(
            "OrderPlaced",
            2,
            json!({"customer_id": format!("c-{}", i % 1000),
                "lines": [{"sku": "SKU-1", "quantity": quantity, "unit_price": {"amount_minor": price, "currency": "EUR"}}],
                "total": {"amount_minor": price * quantity as i64, "currency": "EUR"}}),
        )
        .command("PlaceOrder", "bench")
        .build()
}

/// A bare producer to `topic`, after it has written a fence of the writer `bench` (epoch
/// 1, signed with `key`) to each partition: what the logs the benchmarks write start with.
fn fenced_producer(
    producer: BaseProducer,
    settings: &KafkaSettings,
    topic: &str,
    key: &SigningKey,
) -> anyhow::Result<(BaseProducer, Writer)> {
    let writer = Writer {
        instance: "bench".into(),
        epoch: 1,
    };
    for p in 0..settings.partitions {
        send(
            &producer,
            topic,
            p,
            "",
            &signed_fence(&writer, key, &TopicPartition::new(topic, p)).encode(),
        )?;
    }
    Ok((producer, writer))
}

/// Writes a fence per partition, then `events` `OrderPlaced` commits (one per order,
/// keyed and partitioned as the command API would) to `topic`, all signed with `key`, in
/// bulk (see [`bulk_producer`]: the memory broker would otherwise bound a catch-up at
/// a million records, not the projector). Returns the records written in all.
pub fn write_order_log(
    settings: &KafkaSettings,
    topic: &str,
    events: usize,
    key: &SigningKey,
) -> anyhow::Result<i64> {
    let (producer, writer) = fenced_producer(bulk_producer(settings)?, settings, topic, key)?;
    for i in 0..events {
        let commit = order_placed(i, &writer);
        let commit = CommitRecord {
            signature: Some(key.sign(&commit.hash)),
            ..commit
        };
        let partition = partition_for(commit.stream.id.as_bytes(), settings.partitions);
        let key = commit.stream.id.clone();
        send(
            &producer,
            topic,
            partition,
            &key,
            &LogRecord::Commit(commit).encode(),
        )?;
    }
    producer.flush(Duration::from_secs(600))?;
    Ok(events as i64 + i64::from(settings.partitions))
}

/// Writes a fence per partition, then `streams` products of `commits` commits each (a
/// registration, then restocks, each chained onto the one before), keyed and partitioned
/// as the command API would, round by round over the streams so every partition grows
/// evenly; all signed with `key`. Returns the records written in all.
pub fn write_product_log(
    settings: &KafkaSettings,
    topic: &str,
    streams: usize,
    commits: usize,
    key: &SigningKey,
) -> anyhow::Result<i64> {
    let (producer, writer) = fenced_producer(bulk_producer(settings)?, settings, topic, key)?;
    let mut heads: Vec<Option<String>> = vec![None; streams];
    for version in 0..commits {
        for (i, head) in heads.iter_mut().enumerate() {
            let id = format!("bp-{i}");
            let fixture = commit(&writer, stream("product", id.clone()), version as u64);
            let fixture = if version == 0 {
                fixture.event(
                    "ProductRegistered",
                    1,
                    json!({"name": format!("Product {i}"), "price": {"amount_minor": 500, "currency": "EUR"}}),
                )
            } else {
                fixture.event("ProductRestocked", 1, json!({"quantity": 1}))
            };
            let record = fixture
                .command(
                    if version == 0 {
                        "RegisterProduct"
                    } else {
                        "Restock"
                    },
                    "bench",
                )
                .prev_hash(head.take())
                .signed(key);
            *head = Some(record.hash.clone());
            let partition = partition_for(id.as_bytes(), settings.partitions);
            send(
                &producer,
                topic,
                partition,
                &id,
                &LogRecord::Commit(record).encode(),
            )?;
        }
    }
    producer.flush(Duration::from_secs(600))?;
    Ok((streams * commits) as i64 + i64::from(settings.partitions))
}

/// **B_produce**: `records` records the size of `order_placed`'s over the partitions of
/// `topic` with the bare producer; returns records/s.
pub fn bare_produce(settings: &KafkaSettings, topic: &str, records: usize) -> anyhow::Result<f64> {
    let writer = Writer {
        instance: "bench".into(),
        epoch: 1,
    };
    let payload = LogRecord::Commit(order_placed(0, &writer)).encode();
    let producer = bare_producer(settings)?;
    let started = Instant::now();
    for i in 0..records {
        let partition = (i % settings.partitions.max(1) as usize) as i32;
        send(&producer, topic, partition, &i.to_string(), &payload)?;
    }
    producer.flush(Duration::from_secs(600))?;
    Ok(records as f64 / started.elapsed().as_secs_f64())
}

/// **B_e2e**: `samples` records produced one at a time (idempotent, `acks=all`, no
/// linger) to partition 0 of `topic`, each timed from `send` until a consumer reading the
/// partition with Keel's read-back fetch wait (5 ms) has it. Latencies sorted.
pub fn bare_round_trips(
    settings: &KafkaSettings,
    topic: &str,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let producer: BaseProducer = settings
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .create()?;
    let consumer: BaseConsumer = settings
        .client_config()
        .set("group.id", "keel-bench-e2e")
        .set("enable.auto.commit", "false")
        .set(
            "fetch.wait.max.ms",
            keel_kafka::READ_BACK_FETCH_WAIT_MS.to_string(),
        )
        .create()?;
    // An explicit starting offset: with `Offset::End` the consumer may resolve the end
    // after the first record is written, and never see it.
    let (_, end) = consumer.fetch_watermarks(topic, 0, Duration::from_secs(10))?;
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, 0, Offset::Offset(end))?;
    consumer.assign(&assignment)?;
    let _ = consumer.poll(Duration::from_millis(200));
    let payload = vec![b'x'; 700];
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let key = i.to_string();
        let sent = Instant::now();
        send(&producer, topic, 0, &key, &payload)?;
        loop {
            producer.poll(Duration::ZERO);
            match consumer.poll(Duration::from_millis(1)) {
                Some(Ok(m)) if m.key() == Some(key.as_bytes()) => break,
                Some(Err(e)) => return Err(e).context("consuming"),
                _ => anyhow::ensure!(
                    sent.elapsed() < Duration::from_secs(30),
                    "record {i} did not arrive in 30 s"
                ),
            }
        }
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}

/// **B_upsert**: upserts `rows` rows shaped like the orders view into a fresh table of
/// `pool`'s database, 1,000 per statement and transaction; returns rows/s. With
/// `indexed`, the table also has the view's two secondary indexes.
pub async fn bare_upsert(pool: &sqlx::PgPool, rows: usize, indexed: bool) -> anyhow::Result<f64> {
    sqlx::query("DROP TABLE IF EXISTS bench_orders")
        .execute(pool)
        .await?;
    sqlx::query(
        "CREATE TABLE bench_orders (order_id text PRIMARY KEY, customer_id text NOT NULL, status text NOT NULL,
            currency text NOT NULL, total_minor bigint NOT NULL, paid_minor bigint NOT NULL,
            refunded_minor bigint NOT NULL, item_count bigint NOT NULL, lines jsonb NOT NULL,
            carrier text, tracking text, placed_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
            version bigint NOT NULL)",
    )
    .execute(pool)
    .await?;
    if indexed {
        for index in [
            "CREATE INDEX ON bench_orders (customer_id, order_id)",
            "CREATE INDEX ON bench_orders (status, order_id)",
        ] {
            sqlx::query(index).execute(pool).await?;
        }
    }
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
            "INSERT INTO bench_orders SELECT id, c, 'placed', 'EUR', t, 0, 0, n, l, NULL, NULL, $6, $6, 1
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
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

/// **B_select**: `samples` primary-key reads of the orders view as JSON, one at a time,
/// over `orders` ids `bo-0…`; latencies sorted.
pub async fn bare_selects(
    pool: &sqlx::PgPool,
    orders: usize,
    samples: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut latencies = Vec::with_capacity(samples);
    for i in 0..samples {
        let id = format!("bo-{}", (i * 7919) % orders.max(1));
        let sent = Instant::now();
        let _: Option<serde_json::Value> =
            sqlx::query_scalar("SELECT to_jsonb(o) FROM orders o WHERE order_id = $1")
                .bind(&id)
                .fetch_optional(pool)
                .await?;
        latencies.push(sent.elapsed());
    }
    latencies.sort();
    Ok(latencies)
}
