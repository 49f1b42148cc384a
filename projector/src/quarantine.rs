//! The operator's side of parked streams (`projector dead-letters`): list them, and ask
//! for a retry or a discard through a request row, which the process holding the stream's
//! unit carries out in a batch transaction (see `applier`), so it is done exactly once.

use std::time::{Duration, Instant};

use anyhow::Context;
use keel_schemas::StreamRef;
use keel_views::status::ParkedStream;
use sqlx::PgPool;

pub use crate::dead_letter::Action;

/// The streams the live generations hold back (of `projection` only, when given), oldest
/// first per partition.
pub async fn list(pool: &PgPool, projection: Option<&str>) -> anyhow::Result<Vec<ParkedStream>> {
    keel_views::status::parked(pool, projection, i64::MAX)
        .await
        .context("reading the parked streams")
}

/// A request recorded for the process holding a parked stream's unit.
#[derive(Clone, Debug)]
pub struct Requested {
    /// The request's id.
    pub id: i64,
    /// The stream.
    pub stream: StreamRef,
    /// Where it is: `topic/partition`.
    pub unit: String,
}

/// Asks for `action` on `stream` of `projection`'s live generation, by `actor` (a discard
/// needs a `reason`). Fails when the stream is not parked there.
pub async fn request(
    pool: &PgPool,
    projection: &str,
    stream: &StreamRef,
    action: Action,
    reason: Option<&str>,
    actor: &str,
) -> anyhow::Result<Requested> {
    if action == Action::Discard {
        anyhow::ensure!(
            reason.is_some_and(|r| !r.trim().is_empty()),
            "a discard needs a reason (--reason), which is recorded with the discarded records"
        );
    }
    let row = keel_views::requests::stream(
        pool,
        projection,
        (&stream.stream_type, &stream.id),
        action.as_str(),
        reason,
        actor,
    )
    .await
    .context("recording the request")?
    .map(|r| (r.id, r.topic, r.partition));
    let (id, topic, partition) = row.with_context(|| {
        format!("the {projection} projection does not hold back {stream}: it is not parked")
    })?;
    Ok(Requested {
        id,
        stream: stream.clone(),
        unit: format!("{topic}/{partition}"),
    })
}

/// What came of a request.
#[derive(Clone, Debug)]
pub struct Done {
    /// Whether it did all it asked.
    pub ok: bool,
    /// What it did, or why not.
    pub outcome: String,
}

/// Waits up to `wait` for the request to be carried out, calling `waiting` every few
/// seconds while it is not; `None` when it is still queued at the end.
pub async fn wait(
    pool: &PgPool,
    requested: &Requested,
    wait: Duration,
    mut waiting: impl FnMut(Duration),
) -> anyhow::Result<Option<Done>> {
    let started = Instant::now();
    let mut told = Instant::now();
    loop {
        let request = keel_views::requests::request::<keel_views::requests::StreamRequest>(
            pool,
            requested.id,
        )
        .await
        .context("reading the request")?;
        if let Some(request) = request.filter(|r| r.done_at.is_some()) {
            return Ok(Some(Done {
                ok: request.ok.unwrap_or(false),
                outcome: request.outcome.unwrap_or_default(),
            }));
        }
        if started.elapsed() >= wait {
            return Ok(None);
        }
        if told.elapsed() >= Duration::from_secs(3) {
            waiting(started.elapsed());
            told = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use std::sync::Arc;

    use keel_kafka::{AbortOnDrop, LogProducer};
    use keel_schemas::testing::{commit, stream, writer};
    use keel_schemas::{CommitRecord, LogRecord, TopicPartition};
    use serde_json::json;

    use super::*;
    use crate::job::{Job, OnError, RunOptions};
    use crate::rebuild::RebuildOptions;
    use crate::runner::Runner;
    use crate::units::Membership;

    const ORDERS: usize = 100_000;

    /// One stream among 100,000 events fails in PostgreSQL (a data error) and another cannot
    /// be decoded: each is parked with its later record, every other stream's view is
    /// complete, and after a retry with the fixed code the view equals a fresh rebuild
    /// (which parks the undecodable stream just the same).
    #[tokio::test]
    async fn two_poison_streams_among_100k_events_park_alone_and_a_retry_with_the_fix_equals_a_rebuild()
     {
        let broker = keel_tests::Broker::start().await.unwrap();
        let kafka = broker.settings(&keel_tests::unique_prefix("park-100k"), 4);
        keel_kafka::ensure_topics(&kafka, &["order"]).await.unwrap();
        let (_db, pool) = crate::testing::database("park-100k").await;
        let (key, policy) = crate::testing::trusted_key();
        let writer = writer("w", 1);
        let eur = json!({"amount_minor": 100, "currency": "EUR"});
        let placed = |id: &str| crate::testing::placed_commit(&writer, &key, id);
        let mut log = crate::testing::OrderTopicLog::fenced(&kafka, &writer, &key);
        let mut push = |id: &str, record: CommitRecord| log.push(id, record);
        let bad = placed("o-bad");
        let unreadable = commit(&writer, stream("order", "o-unreadable"), 0)
            .event("OrderPlaced", 2, json!({"nonsense": true}))
            .signed(&key);
        for i in 0..ORDERS - 2 {
            let id = format!("o-{i}");
            push(&id, placed(&id));
            if i == ORDERS / 3 {
                push("o-bad", bad.clone());
                push("o-unreadable", unreadable.clone());
            }
            if i == 2 * ORDERS / 3 {
                let paid = crate::testing::order_commit(
                    &writer,
                    &key,
                    "o-bad",
                    &bad,
                    (
                        "PaymentRecorded",
                        json!({"amount": eur, "payment_ref": "p-1"}),
                    ),
                );
                push("o-bad", paid);
                let cancelled = crate::testing::order_commit(
                    &writer,
                    &key,
                    "o-unreadable",
                    &unreadable,
                    ("OrderCancelled", json!({"reason": "changed my mind"})),
                );
                push("o-unreadable", cancelled);
            }
        }
        let records = log.write(&kafka).await;

        let fixable = crate::testing::Fixable::orders("o-bad");
        let job = Job::new(
            fixable.clone(),
            pool.clone(),
            kafka.clone(),
            RunOptions {
                on_error: OnError::Park,
                batch_size: 2_000,
                linger: std::time::Duration::from_millis(5),
                snapshot_every: 100,
                rebuild_pace: crate::pace::Pace::Adaptive,
                claim_timeout: std::time::Duration::from_secs(10),
                policy,
                metrics: Default::default(),
            },
        );
        let (membership, mut assignments) = Membership::new(
            pool.clone(),
            std::time::Duration::from_secs(2),
            [(job.name(), job.partitions())],
        );
        let _membership = AbortOnDrop(tokio::spawn(membership.run()));
        let runner = Runner::new(job.clone(), assignments.remove("orders").unwrap());
        let runner = AbortOnDrop(tokio::spawn(runner.run()));
        let read = || async {
            sqlx::query_scalar::<_, Option<i64>>(
                "SELECT sum(c.next_offset)::bigint FROM keel_checkpoints c
                 JOIN keel_projections p ON p.name = c.projection AND p.generation = c.generation",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
            .unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        while read().await < records {
            assert!(
                std::time::Instant::now() < deadline,
                "read {} of {records} records in 300 s",
                read().await
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let healthy: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(
            healthy,
            (ORDERS - 2) as i64,
            "every other stream is applied"
        );
        let parked = list(&pool, Some("orders")).await.unwrap();
        assert_eq!(
            parked
                .iter()
                .map(|p| (p.stream_id.as_str(), p.records))
                .collect::<std::collections::BTreeSet<_>>(),
            [("o-bad", 2), ("o-unreadable", 2)].into_iter().collect(),
            "each poison parks its stream with its later record"
        );

        // The fix deployed, a retry applies o-bad's records; o-unreadable stays parked.
        fixable.fix();
        let retry = |id: &'static str| {
            let pool = pool.clone();
            async move {
                let requested = request(
                    &pool,
                    "orders",
                    &stream("order", id),
                    Action::Retry,
                    None,
                    "test",
                )
                .await
                .unwrap();
                wait(
                    &pool,
                    &requested,
                    std::time::Duration::from_secs(60),
                    |_| {},
                )
                .await
                .unwrap()
                .expect("carried out")
            }
        };
        let done = retry("o-bad").await;
        assert!(
            done.ok && done.outcome.contains("applied 2 records"),
            "{done:?}"
        );
        assert!(!retry("o-unreadable").await.ok);
        drop(runner);

        // A fresh rebuild with the fixed code, beside the live generation: row for row.
        let live: i32 =
            sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = 'orders'")
                .fetch_one(&pool)
                .await
                .unwrap();
        let options = RebuildOptions {
            keep_old: true,
            ..crate::testing::rebuild_options()
        };
        crate::rebuild::rebuild(&job, &options).await.unwrap();
        let fresh: i32 =
            sqlx::query_scalar("SELECT generation FROM keel_projections WHERE name = 'orders'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_ne!(fresh, live);
        let differ: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM ((TABLE orders_g{live} EXCEPT TABLE orders_g{fresh})
                                   UNION ALL (TABLE orders_g{fresh} EXCEPT TABLE orders_g{live})) d"
        ))
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(differ, 0, "the retried view equals a fresh rebuild");
        let paid: i64 =
            sqlx::query_scalar("SELECT paid_minor FROM orders WHERE order_id = 'o-bad'")
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(paid, 100);
        pool.close().await;
    }

    /// A rebuild whose new code parks a stream the live generation does not is not swapped
    /// in: the live view keeps serving. With `allow_parked` it resumes and swaps.
    #[tokio::test]
    async fn a_rebuild_that_parks_more_streams_than_the_live_generation_is_not_swapped_in() {
        let broker = keel_tests::Broker::start().await.unwrap();
        let kafka = broker.settings(&keel_tests::unique_prefix("park-swap"), 1);
        keel_kafka::ensure_topics(&kafka, &["order"]).await.unwrap();
        let (_db, pool) = crate::testing::database("park-swap").await;
        let (key, policy) = crate::testing::trusted_key();
        let topic = kafka.topic("order");
        let writer = writer("w", 1);
        let mut records = vec![(
            String::new(),
            keel_schemas::testing::signed_fence(
                &writer,
                &key,
                &TopicPartition::new(topic.clone(), 0),
            ),
        )];
        for id in ["o-1", "o-bad", "o-2"] {
            let record = crate::testing::placed(&writer, &key, id);
            records.push((id.to_owned(), record));
        }
        let refs: Vec<(&str, &LogRecord, Option<&str>)> =
            records.iter().map(|(k, r)| (k.as_str(), r, None)).collect();
        for offset in LogProducer::new(&kafka)
            .unwrap()
            .enqueue_records(&topic, 0, &refs)
            .await
        {
            offset.unwrap();
        }
        let job = |projection: Arc<crate::testing::Fixable>| {
            Job::new(
                projection,
                pool.clone(),
                kafka.clone(),
                RunOptions {
                    on_error: OnError::Park,
                    batch_size: 100,
                    linger: std::time::Duration::ZERO,
                    snapshot_every: 100,
                    rebuild_pace: crate::pace::Pace::Off,
                    claim_timeout: std::time::Duration::from_secs(10),
                    policy: Arc::clone(&policy),
                    metrics: Default::default(),
                },
            )
        };
        let fixed = crate::testing::Fixable::orders("o-bad");
        fixed.fix();
        let broken = crate::testing::Fixable::orders("o-bad");
        let mut options = crate::testing::rebuild_options();
        crate::rebuild::rebuild(&job(fixed), &options)
            .await
            .unwrap();
        let live = || async {
            sqlx::query_scalar::<_, i32>(
                "SELECT generation FROM keel_projections WHERE name = 'orders'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
        };
        let served = live().await;
        let refused = crate::rebuild::rebuild(&job(Arc::clone(&broken)), &options)
            .await
            .expect_err("not swapped in");
        assert!(
            refused
                .downcast_ref::<crate::rebuild::ParkedInRebuild>()
                .is_some(),
            "{refused:#}"
        );
        assert_eq!(live().await, served, "the live view keeps serving");
        let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(orders, 3);
        options.allow_parked = true;
        crate::rebuild::rebuild(&job(broken), &options)
            .await
            .unwrap();
        assert_eq!(live().await, served + 1);
        assert_eq!(list(&pool, Some("orders")).await.unwrap().len(), 1);
        pool.close().await;
    }
}
