//! The Kafka layer against a real broker: topics, producer, partition reader, the gate.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::time::Duration;

use keel_kafka::{
    KafkaError, LogProducer, PartitionGate, PartitionReader, ensure_topics, partition_for,
};
use keel_schemas::testing;
use keel_schemas::{LogRecord, StreamRef, TopicPartition, Writer, headers};
use keel_tests::{Broker, unique_prefix};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde_json::json;

fn commit(writer: &Writer, id: &str, expected_version: u64) -> LogRecord {
    chained(writer, id, expected_version, None)
}

/// A commit chained onto the stream's commit `prev`.
fn chained(
    writer: &Writer,
    id: &str,
    expected_version: u64,
    prev: Option<&LogRecord>,
) -> LogRecord {
    let prev_hash = match prev {
        Some(LogRecord::Commit(c)) => Some(c.hash.clone()),
        _ => None,
    };
    LogRecord::Commit(
        testing::commit(writer, testing::stream("order", id), expected_version)
            .event("OrderCancelled", 1, json!({"reason": "test"}))
            .command("CancelOrder", "test")
            .prev_hash(prev_hash)
            .build(),
    )
}

fn fence(instance: &str, epoch: u64) -> LogRecord {
    testing::fence(&testing::writer(instance, epoch))
}

#[tokio::test]
async fn topics_are_created_once_and_checked() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("topics"), 4);
    let created = ensure_topics(&settings, &["order", "product"])
        .await
        .unwrap();
    assert_eq!(
        created,
        vec![settings.topic("order"), settings.topic("product")]
    );
    // Safe to run again.
    ensure_topics(&settings, &["order", "product"])
        .await
        .unwrap();
    // An existing topic with another partition count is an error, not a silent mismatch.
    let mut other = settings.clone();
    other.partitions = 3;
    match ensure_topics(&other, &["order"]).await {
        Err(KafkaError::PartitionCountMismatch {
            expected: 3,
            actual: 4,
            ..
        }) => {}
        other => panic!("expected a partition count mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn appended_records_come_back_in_order_with_their_headers() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("order"), 2);
    let topic = ensure_topics(&settings, &["order"])
        .await
        .unwrap()
        .remove(0);
    let producer = LogProducer::new(&settings).unwrap();
    let writer = Writer {
        instance: "w1".into(),
        epoch: 1,
    };
    let first = fence("w1", 1);
    let mut offsets = vec![
        producer
            .append_record(&topic, 1, "", &first, None)
            .await
            .unwrap(),
    ];
    let mut records = vec![first];
    for v in 0..20 {
        let record = commit(&writer, "o-1", v);
        let tp = format!("00-{:032x}-{:016x}-01", v + 1, v + 1);
        offsets.push(
            producer
                .append_record(&topic, 1, "o-1", &record, Some(&tp))
                .await
                .unwrap(),
        );
        records.push(record);
    }
    assert_eq!(
        offsets,
        (0..21).collect::<Vec<i64>>(),
        "offsets are dense and in order"
    );

    let mut reader = PartitionReader::open(&settings, &topic, 1, 0).unwrap();
    assert_eq!(reader.high_watermark().await.unwrap(), 21);
    let mut entries = Vec::new();
    reader.read_to_end(|e| entries.push(e)).await.unwrap();
    assert_eq!(entries.len(), 21);
    for (i, (entry, record)) in entries.iter().zip(&records).enumerate() {
        assert_eq!(entry.offset, i as i64);
        assert_eq!(&LogRecord::decode(&entry.payload).unwrap(), record);
        assert_eq!(
            entry.header(headers::CONTENT_TYPE),
            Some("application/json")
        );
        assert_eq!(entry.header(headers::KIND), Some(record.kind()));
        if i > 0 {
            assert_eq!(entry.key.as_deref(), Some(&b"o-1"[..]));
            assert_eq!(entry.header(headers::STREAM_TYPE), Some("order"));
            assert_eq!(entry.header(headers::EVENT_TYPES), Some("OrderCancelled"));
            let names: Vec<&str> = entry.headers.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                names,
                [
                    "content-type",
                    "keel-kind",
                    "keel-stream-type",
                    "keel-event-types",
                    "traceparent"
                ]
            );
            assert_eq!(
                entry.header(headers::TRACEPARENT),
                Some(format!("00-{i:032x}-{i:016x}-01").as_str())
            );
        }
    }
    // Nothing was written to the other partition.
    let mut other = PartitionReader::open(&settings, &topic, 0, 0).unwrap();
    let mut read = 0;
    other.read_to_end(|_| read += 1).await.unwrap();
    assert_eq!(read, 0);
}

#[tokio::test]
async fn the_reader_resumes_from_an_offset_and_follows_the_partition() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("resume"), 1);
    let topic = ensure_topics(&settings, &["order"])
        .await
        .unwrap()
        .remove(0);
    let producer = LogProducer::new(&settings).unwrap();
    for i in 0..10 {
        producer
            .append(&topic, 0, "k", format!("r{i}").as_bytes(), &[])
            .await
            .unwrap();
    }
    let mut reader = PartitionReader::open(&settings, &topic, 0, 6).unwrap();
    let mut tail: Vec<(i64, Vec<u8>)> = Vec::new();
    reader
        .read_to_end(|e| tail.push((e.offset, e.payload)))
        .await
        .unwrap();
    assert_eq!(
        tail,
        (6..10)
            .map(|i| (i, format!("r{i}").into_bytes()))
            .collect::<Vec<_>>()
    );
    assert_eq!(reader.next_offset(), 10);

    // Following: a record appended later arrives.
    let follow = tokio::spawn(async move { reader.next().await.map(|e| (e.offset, e.payload)) });
    tokio::time::sleep(Duration::from_millis(200)).await;
    producer
        .append(&topic, 0, "k", b"later", &[])
        .await
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(20), follow)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next, (10, b"later".to_vec()));
}

#[tokio::test]
async fn our_partitioner_agrees_with_librdkafkas_java_compatible_one() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("partitioner"), 8);
    let topic = ensure_topics(&settings, &["order"])
        .await
        .unwrap()
        .remove(0);
    let producer: FutureProducer = settings
        .client_config()
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    for i in 0..40 {
        let key = format!("o-{i}");
        let delivered = producer
            .send(
                FutureRecord::to(&topic).key(&key).payload("x"),
                Timeout::After(Duration::from_secs(20)),
            )
            .await
            .unwrap();
        assert_eq!(
            delivered.partition,
            partition_for(key.as_bytes(), 8),
            "key {key}"
        );
    }
}

#[tokio::test]
async fn the_gate_on_a_real_partition_skips_a_zombie_and_a_stale_fence() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("gate"), 1);
    let topic = ensure_topics(&settings, &["order"])
        .await
        .unwrap()
        .remove(0);
    // Two producers, as two command-api instances would have.
    let first = LogProducer::new(&settings).unwrap();
    let second = LogProducer::new(&settings).unwrap();
    let a = Writer {
        instance: "a".into(),
        epoch: 1,
    };
    let b = Writer {
        instance: "b".into(),
        epoch: 2,
    };

    let append = |p: &LogProducer, r: LogRecord| {
        let (p, topic) = (p.clone(), topic.clone());
        async move { p.append_record(&topic, 0, "o-1", &r, None).await.unwrap() }
    };
    let created = commit(&a, "o-1", 0);
    append(&first, fence("a", 1)).await; // 0: a owns the partition
    append(&first, created.clone()).await; // 1: accepted, o-1 at v1
    append(&second, fence("b", 2)).await; // 2: b takes over
    append(&first, chained(&a, "o-1", 1, Some(&created))).await; // 3: zombie a: skipped
    append(&first, fence("a", 2)).await; // 4: stale fence (epoch not above 2): skipped
    append(&second, chained(&b, "o-1", 1, Some(&created))).await; // 5: accepted, o-1 at v2
    append(&second, chained(&b, "o-1", 1, Some(&created))).await; // 6: duplicate version: skipped

    // Unsigned legacy fences: read under a cut-off that lets them count.
    let mut policy = keel_schemas::TrustedKeys::default();
    policy.allow_legacy_until(keel_schemas::Timestamp::now());
    let mut reader = PartitionReader::open(&settings, &topic, 0, 0).unwrap();
    let at = keel_schemas::TopicPartition::new(topic.clone(), 0);
    let mut gate = PartitionGate::new(std::sync::Arc::new(policy), &at);
    let mut verdicts: Vec<bool> = Vec::new();
    reader
        .read_to_end(|e| verdicts.push(gate.read(e).accepted().is_some()))
        .await
        .unwrap();
    assert_eq!(verdicts, [true, true, true, false, false, true, false]);
    assert_eq!(gate.owner(), Some(&b));
    assert_eq!(
        gate.stream_version(&StreamRef {
            stream_type: "order".into(),
            id: "o-1".into()
        }),
        2
    );
    assert_eq!((gate.accepted(), gate.rejected()), (4, 3));
}

#[tokio::test]
async fn readers_sharing_one_consumer_each_get_only_their_partition_in_order() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("shared"), 3);
    let topics = ensure_topics(&settings, &["order", "product"])
        .await
        .unwrap();
    let producer = LogProducer::new(&settings).unwrap();
    // Interleaved writes over two topics and three partitions.
    for i in 0..30 {
        let (topic, partition) = (&topics[i % 2], (i % 3) as i32);
        producer
            .append(
                topic,
                partition,
                "k",
                format!("{topic}/{partition}/{i}").as_bytes(),
                &[],
            )
            .await
            .unwrap();
    }
    let wanted: Vec<(TopicPartition, i64)> = topics
        .iter()
        .flat_map(|t| (0..3).map(move |p| (TopicPartition::new(t.clone(), p), 1)))
        .collect();
    let readers = PartitionReader::open_many(&settings, &wanted).unwrap();
    assert_eq!(readers.len(), 6);
    for mut reader in readers {
        let (topic, partition) = (reader.topic().to_owned(), reader.partition());
        let mut got: Vec<(i64, String)> = Vec::new();
        reader
            .read_to_end(|e| got.push((e.offset, String::from_utf8(e.payload).unwrap())))
            .await
            .unwrap();
        let expected: Vec<(i64, String)> = (0..30)
            .filter(|i| topics[i % 2] == topic && (i % 3) as i32 == partition)
            .enumerate()
            .skip(1)
            .map(|(offset, i)| (offset as i64, format!("{topic}/{partition}/{i}")))
            .collect();
        assert_eq!(got, expected, "{topic}/{partition} from offset 1");
    }
    // A partition asked for twice is refused: the two readers would share its queue.
    let twice = [
        (TopicPartition::new(topics[0].clone(), 0), 0),
        (TopicPartition::new(topics[0].clone(), 0), 5),
    ];
    assert!(matches!(
        PartitionReader::open_many(&settings, &twice),
        Err(KafkaError::Reader(_))
    ));
}

/// A member of a consumer group as the command API instances would join one: the classic
/// protocol with cooperative-sticky assignment, its rebalances served by polling.
struct Member {
    consumer: std::sync::Arc<rdkafka::consumer::StreamConsumer>,
    _poller: keel_kafka::AbortOnDrop<()>,
}

impl Member {
    fn join(settings: &keel_kafka::KafkaSettings, group: &str, topic: &str) -> Self {
        use rdkafka::consumer::Consumer;
        let consumer: rdkafka::consumer::StreamConsumer = settings
            .client_config()
            .set("group.id", group)
            .set("group.protocol", "classic")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let consumer = std::sync::Arc::new(consumer);
        let polled = std::sync::Arc::clone(&consumer);
        let poller = keel_kafka::AbortOnDrop(tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(Duration::from_millis(100), polled.recv()).await;
            }
        }));
        Self {
            consumer,
            _poller: poller,
        }
    }

    fn partitions(&self) -> Vec<i32> {
        use rdkafka::consumer::Consumer;
        let mut owned: Vec<i32> = self
            .consumer
            .assignment()
            .map(|list| list.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        owned.sort_unstable();
        owned
    }
}

/// Waits until `members` own every one of `partitions` partitions exactly once, spread
/// evenly; returns how long that took.
async fn settled(members: &[&Member], partitions: i32) -> Duration {
    let started = std::time::Instant::now();
    loop {
        let owned: Vec<Vec<i32>> = members.iter().map(|m| m.partitions()).collect();
        let mut all: Vec<i32> = owned.iter().flatten().copied().collect();
        all.sort_unstable();
        let sizes: Vec<usize> = owned.iter().map(Vec::len).collect();
        let even = sizes
            .iter()
            .max()
            .zip(sizes.iter().min())
            .is_some_and(|(max, min)| max - min <= 1);
        if all == (0..partitions).collect::<Vec<_>>() && even {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the group did not settle: {owned:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the write path's assignment can rest on, checked on the broker the tests run: three
/// members of a group (classic protocol, cooperative-sticky) divide a topic's partitions,
/// each once and evenly; when one leaves, the other two take its partitions and keep
/// theirs; when one joins, it gets a share taken from the others and nothing else moves.
/// On nisshi an empty group's first join waits 3 s (its initial rebalance delay).
#[tokio::test]
async fn a_consumer_group_divides_the_partitions_and_rebalances() {
    let broker = Broker::start().await.unwrap();
    let settings = broker.settings(&unique_prefix("group"), 8);
    let topic = ensure_topics(&settings, &["order"])
        .await
        .unwrap()
        .remove(0);
    let group = unique_prefix("group");
    let (a, b, c) = (
        Member::join(&settings, &group, &topic),
        Member::join(&settings, &group, &topic),
        Member::join(&settings, &group, &topic),
    );
    let joined = settled(&[&a, &b, &c], 8).await;
    let before = (a.partitions(), b.partitions());
    drop(c);
    let left = settled(&[&a, &b], 8).await;
    // Sticky: the members that stayed keep what they had and take the leaver's share.
    let kept = |had: &[i32], has: &[i32]| had.iter().all(|p| has.contains(p));
    assert!(kept(&before.0, &a.partitions()) && kept(&before.1, &b.partitions()));
    let before = (a.partitions(), b.partitions());
    let d = Member::join(&settings, &group, &topic);
    let rejoined = settled(&[&a, &b, &d], 8).await;
    // The newcomer's share comes from the others; nothing else moves.
    assert!(kept(&a.partitions(), &before.0) && kept(&b.partitions(), &before.1));
    eprintln!(
        "group of 3 settled in {joined:?}; after a leave in {left:?}; after a join in {rejoined:?}"
    );
}
