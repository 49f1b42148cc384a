//! What the projector's tests against a real PostgreSQL set up alike.

#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::sync::Arc;
use std::time::Duration;

use keel_kafka::KafkaSettings;
use keel_schemas::TrustedKeys;
use keel_tests::TestDatabase;
use sqlx::PgPool;

use crate::job::{Job, OnError, RunOptions};
use crate::projection::Projection;

/// A database of the test's own (dropped with the first value) and a pool on it, with the
/// projector's migrations run.
pub(crate) async fn database(test: &str) -> (TestDatabase, PgPool) {
    let db = TestDatabase::new(test);
    let pool = crate::db::connect(&db.url())
        .await
        .expect("PostgreSQL at 127.0.0.1:5432 (make test starts it)");
    (db, pool)
}

/// The `orders` projection.
pub(crate) fn orders() -> Arc<dyn Projection> {
    crate::views::all()
        .into_iter()
        .find(|p| p.name() == "orders")
        .unwrap()
}

/// A job of `projection` on `pool` over `kafka`, stopping on a dead letter, under `policy`.
pub(crate) fn job(
    projection: Arc<dyn Projection>,
    pool: &PgPool,
    kafka: KafkaSettings,
    policy: Arc<TrustedKeys>,
) -> Job {
    Job::new(
        projection,
        pool.clone(),
        kafka,
        RunOptions {
            on_error: OnError::Stop,
            batch_size: 100,
            linger: Duration::ZERO,
            snapshot_every: 100,
            rebuild_pace: crate::pace::Pace::Off,
            claim_timeout: std::time::Duration::from_secs(10),
            policy,
            metrics: Default::default(),
        },
    )
}

/// A job of `projection` on `pool` for tests that stop before reading the log: its broker
/// settings are the defaults, never reached, and it trusts no key.
pub(crate) fn offline_job(projection: Arc<dyn Projection>, pool: &PgPool) -> Job {
    job(
        projection,
        pool,
        KafkaSettings::default(),
        Arc::new(TrustedKeys::default()),
    )
}

/// Prepares `projection`'s live generation and makes it look built by newer code than
/// this build's: what an older projector meets after a newer one rebuilt it. Returns the
/// live generation as prepared.
pub(crate) async fn live_by_newer_code(
    pool: &PgPool,
    projection: &dyn Projection,
) -> crate::generation::Live {
    let live = crate::generation::prepare(pool, projection).await.unwrap();
    sqlx::query("UPDATE keel_projections SET code_version = code_version + 1 WHERE name = $1")
        .bind(projection.name())
        .execute(pool)
        .await
        .unwrap();
    live
}

/// A signing key and a key policy that trusts it.
pub(crate) fn trusted_key() -> (keel_schemas::SigningKey, Arc<TrustedKeys>) {
    let key = keel_schemas::SigningKey::generate();
    let mut policy = TrustedKeys::default();
    policy.add(&key);
    (key, Arc::new(policy))
}

/// An `OrderPlaced` commit of order `id` (its first), written by `writer`, signed by `key`.
pub(crate) fn placed(
    writer: &keel_schemas::Writer,
    key: &keel_schemas::SigningKey,
    id: &str,
) -> keel_schemas::LogRecord {
    keel_schemas::LogRecord::Commit(placed_commit(writer, key, id))
}

/// The commit of [`placed`], to chain later commits of the order onto.
pub(crate) fn placed_commit(
    writer: &keel_schemas::Writer,
    key: &keel_schemas::SigningKey,
    id: &str,
) -> keel_schemas::CommitRecord {
    use keel_schemas::testing;
    testing::commit(writer, testing::stream("order", id), 0)
        .event(
            "OrderPlaced",
            2,
            serde_json::json!({"customer_id": "c-1",
                "lines": [{"sku": "S-1", "quantity": 1, "unit_price": {"amount_minor": 100, "currency": "EUR"}}],
                "total": {"amount_minor": 100, "currency": "EUR"}}),
        )
        .signed(key)
}

/// `records` as read from partition 0 of the order topic of `kafka`, from offset `first`,
/// decoded under `policy`.
pub(crate) fn read_orders(
    kafka: &KafkaSettings,
    policy: &TrustedKeys,
    first: i64,
    records: &[keel_schemas::LogRecord],
) -> Vec<crate::decode::Decoded> {
    let entries = records
        .iter()
        .enumerate()
        .map(|(n, record)| keel_kafka::LogEntry {
            topic: kafka.topic("order"),
            partition: 0,
            offset: first + n as i64,
            key: None,
            payload: record.encode(),
            headers: Vec::new(),
            timestamp_ms: None,
        })
        .collect();
    crate::decode::Decoded::all(entries, policy)
}

/// The `orders` projection prepared on `pool`, and a job of it over one partition of the
/// order topic, trusting a key of its own: what the tests of a batch against a real
/// PostgreSQL start from.
pub(crate) struct OneOrderPartition {
    /// The live generation.
    pub(crate) live: i32,
    /// The job.
    pub(crate) job: Job,
    /// Its Kafka settings (one partition).
    pub(crate) kafka: KafkaSettings,
    /// The key it trusts.
    pub(crate) key: keel_schemas::SigningKey,
    /// Its key policy.
    pub(crate) policy: Arc<TrustedKeys>,
}

impl OneOrderPartition {
    pub(crate) async fn prepare(pool: &PgPool) -> Self {
        let orders = orders();
        let live = crate::generation::prepare(pool, orders.as_ref())
            .await
            .unwrap()
            .generation;
        let (key, policy) = trusted_key();
        let kafka = KafkaSettings {
            partitions: 1,
            ..Default::default()
        };
        let job = job(orders, pool, kafka.clone(), Arc::clone(&policy));
        Self {
            live,
            job,
            kafka,
            key,
            policy,
        }
    }

    /// `records` as read from the partition from offset `first`, decoded.
    pub(crate) fn read(
        &self,
        first: i64,
        records: &[keel_schemas::LogRecord],
    ) -> Vec<crate::decode::Decoded> {
        read_orders(&self.kafka, &self.policy, first, records)
    }

    /// A fence of `writer` for the partition, signed with the trusted key.
    pub(crate) fn fence(&self, writer: &keel_schemas::Writer) -> keel_schemas::LogRecord {
        keel_schemas::testing::signed_fence(
            writer,
            &self.key,
            &keel_schemas::TopicPartition::new(self.kafka.topic("order"), 0),
        )
    }
}

/// The `orders` projection as several code versions: before the fix, a batch holding an
/// event of stream `poison` fails with a real data error (division by zero, SQLSTATE
/// 22012); after [`Fixable::fix`], it applies like `orders`; after [`Fixable::break_badly`],
/// it fails on an error no record causes (a missing table, SQLSTATE 42P01).
pub(crate) struct Fixable {
    inner: Arc<dyn Projection>,
    poison: String,
    /// 0: a data error; 1: fixed; 2: a missing table.
    code: std::sync::atomic::AtomicU8,
}

impl Fixable {
    /// `orders`, failing on the events of order `poison` until fixed.
    pub(crate) fn orders(poison: &str) -> Arc<Self> {
        Arc::new(Self {
            inner: orders(),
            poison: poison.to_owned(),
            code: std::sync::atomic::AtomicU8::new(0),
        })
    }

    /// Deploys the fixed code.
    pub(crate) fn fix(&self) {
        self.code.store(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Deploys code that fails on the poison stream with an error no record causes.
    pub(crate) fn break_badly(&self) {
        self.code.store(2, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Projection for Fixable {
    fn spec(&self) -> &'static keel_views::ProjectionSpec {
        self.inner.spec()
    }

    async fn create(
        &self,
        db: &mut sqlx::PgConnection,
        generation: i32,
    ) -> Result<(), sqlx::Error> {
        self.inner.create(db, generation).await
    }

    fn indexes(&self, generation: i32) -> Vec<String> {
        self.inner.indexes(generation)
    }

    async fn apply(
        &self,
        db: &mut sqlx::PgConnection,
        generation: i32,
        events: &[crate::projection::ProjectedEvent],
    ) -> Result<(), sqlx::Error> {
        let code = self.code.load(std::sync::atomic::Ordering::SeqCst);
        if code != 1 && events.iter().any(|e| e.stream_id() == self.poison) {
            let failing = if code == 0 {
                "SELECT 1 / 0"
            } else {
                "SELECT * FROM no_such_table"
            };
            sqlx::query(failing).execute(&mut *db).await?;
        }
        self.inner.apply(db, generation, events).await
    }
}

/// A commit of order `id` after `version` (chained to `prev`, the stream's previous
/// commit), holding one event, signed by `key`.
pub(crate) fn order_commit(
    writer: &keel_schemas::Writer,
    key: &keel_schemas::SigningKey,
    id: &str,
    prev: &keel_schemas::CommitRecord,
    event: (&str, serde_json::Value),
) -> keel_schemas::CommitRecord {
    use keel_schemas::testing;
    let version = prev.expected_version + prev.events.len() as u64;
    testing::commit(writer, testing::stream("order", id), version)
        .prev_hash(Some(prev.hash.clone()))
        .event(event.0, 1, event.1)
        .signed(key)
}

/// A log of the order topic of a test's broker, built partition by partition: a fence
/// signed with the test's key first on each, then records on their streams' partitions.
pub(crate) struct OrderTopicLog {
    topic: String,
    partitions: i32,
    by_partition: std::collections::HashMap<i32, Vec<(String, keel_schemas::LogRecord)>>,
}

impl OrderTopicLog {
    /// A fence by `writer`, signed with `key`, on every partition of the order topic.
    pub(crate) fn fenced(
        kafka: &KafkaSettings,
        writer: &keel_schemas::Writer,
        key: &keel_schemas::SigningKey,
    ) -> Self {
        let topic = kafka.topic("order");
        let by_partition = (0..kafka.partitions)
            .map(|p| {
                let at = keel_schemas::TopicPartition::new(topic.clone(), p);
                let fence = keel_schemas::testing::signed_fence(writer, key, &at);
                (p, vec![(String::new(), fence)])
            })
            .collect();
        Self {
            topic,
            partitions: kafka.partitions,
            by_partition,
        }
    }

    /// Adds a commit of the order `id` on its partition.
    pub(crate) fn push(&mut self, id: &str, record: keel_schemas::CommitRecord) {
        let partition = keel_kafka::partition_for(id.as_bytes(), self.partitions);
        self.by_partition
            .entry(partition)
            .or_default()
            .push((id.to_owned(), keel_schemas::LogRecord::Commit(record)));
    }

    /// Writes the log to the broker of `kafka`; the records written, fences included.
    pub(crate) async fn write(&self, kafka: &KafkaSettings) -> i64 {
        let producer = keel_kafka::LogProducer::new(kafka).unwrap();
        let mut records = 0;
        for (partition, entries) in &self.by_partition {
            for chunk in entries.chunks(5_000) {
                let refs: Vec<(&str, &keel_schemas::LogRecord, Option<&str>)> =
                    chunk.iter().map(|(k, r)| (k.as_str(), r, None)).collect();
                for offset in producer
                    .enqueue_records(&self.topic, *partition, &refs)
                    .await
                {
                    offset.unwrap();
                }
            }
            records += entries.len() as i64;
        }
        records
    }
}

/// The options of a rebuild started by hand, its progress logged.
pub(crate) fn rebuild_options() -> crate::rebuild::RebuildOptions {
    crate::rebuild::RebuildOptions {
        keep_old: false,
        wait_for_lock: false,
        only_if_older: false,
        replacing: None,
        progress: crate::rebuild::Progress::Log,
        allow_parked: false,
    }
}
