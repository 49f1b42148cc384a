//! Several command-api instances sharing the partitions through a consumer group: every
//! partition owned by exactly one of them once settled, any command sent to any instance
//! (forwarded to the owner and answered), planned handoffs that leave their mark, and
//! failover after a kill or a pause, with nothing acknowledged by an instance fenced out.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use keel_http::Role;
use keel_kafka::{Rejection, partition_for, read_through_gate};
use keel_schemas::LogRecord;
use keel_tests::{Broker, CommandApi, CommandApiConfig, read_accepted, unique_prefix};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Partitions per topic in these tests: twelve partitions over three topics.
const PARTITIONS: i32 = 4;

fn eur(n: i64) -> Value {
    json!({"amount_minor": n, "currency": "EUR"})
}

/// Starts one instance per name, each on the same topics and keys.
async fn start(config: &CommandApiConfig, names: &[&str]) -> Vec<CommandApi> {
    let mut apis = Vec::new();
    for name in names {
        let api = CommandApi::command_api(&CommandApiConfig {
            instance: (*name).into(),
            ..config.clone()
        })
        .await
        .unwrap();
        apis.push(api);
    }
    apis
}

/// `GET /v1/partitions` of `api`.
async fn partitions(api: &CommandApi) -> Value {
    api.client
        .get(api.url("/v1/partitions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The partitions `api` serves: (topic, partition).
async fn served(api: &CommandApi) -> BTreeSet<(String, i64)> {
    partitions(api).await["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["status"] == "serving")
        .map(|p| {
            (
                p["topic"].as_str().unwrap().to_owned(),
                p["partition"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// Waits until `apis` serve every partition exactly once between them, evenly (the most
/// and the fewest differ by one at most: the group has rebalanced), and each is ready;
/// returns which serves what.
async fn settled(apis: &[&CommandApi]) -> Vec<BTreeSet<(String, i64)>> {
    let total = 3 * PARTITIONS as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut each = Vec::new();
        for api in apis {
            each.push(served(api).await);
        }
        let sum: usize = each.iter().map(BTreeSet::len).sum();
        let union: BTreeSet<_> = each.iter().flatten().cloned().collect();
        let mut ready = true;
        for api in apis {
            let status = reqwest::get(api.url("/readyz")).await.unwrap().status();
            ready &= status == StatusCode::OK;
        }
        let sizes: Vec<usize> = each.iter().map(BTreeSet::len).collect();
        let even = sizes.iter().max().unwrap_or(&0) - sizes.iter().min().unwrap_or(&0) <= 1;
        if sum == total && union.len() == total && even && ready {
            return each;
        }
        assert!(
            Instant::now() < deadline,
            "the instances did not settle: {:?}",
            each.iter().map(BTreeSet::len).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn post(
    client: &reqwest::Client,
    api: &CommandApi,
    path: &str,
    body: Value,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let mut request = client.post(api.url(path)).json(&body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    (
        status,
        headers,
        response.json().await.unwrap_or(Value::Null),
    )
}

/// The handoff marks in `topic`, by writer.
async fn handoff_marks(config: &CommandApiConfig, broker: &Broker, topic: &str) -> Vec<String> {
    let settings = broker.settings(&config.prefix, config.partitions);
    let partitions: Vec<i32> = (0..config.partitions).collect();
    let mut marks = Vec::new();
    read_through_gate(&settings, &config.policy(), topic, &partitions, |read| {
        if let Ok((LogRecord::Fence(fence), Err(Rejection::Handoff { .. }))) = read.record {
            marks.push(fence.writer.instance);
        }
    })
    .await
    .unwrap();
    marks
}

#[tokio::test]
async fn three_instances_share_the_partitions_forward_commands_and_hand_over_on_shutdown() {
    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("three"), PARTITIONS, "cmd");
    // Long enough that a handoff nobody asked for would stand out (it also leaves a
    // snapshot): each successor asks once it has read the partition.
    config
        .extra_env
        .push(("KEEL_HANDOFF_TIMEOUT_MS", "30000".into()));
    let mut apis = start(&config, &["cmd-a", "cmd-b", "cmd-c"]).await;
    let shares = settled(&apis.iter().collect::<Vec<_>>()).await;
    assert!(
        shares.iter().all(|s| !s.is_empty()),
        "every instance owns some partitions: {shares:?}"
    );

    // Commands round-robin over the three: most land on an instance that does not own
    // their stream's partition, and are forwarded.
    let alice = config.auth.client("alice", &[Role::CommandsWrite]);
    let topic = broker.settings(&config.prefix, PARTITIONS).topic("product");
    let owner_of = |id: &str| {
        let at = (
            topic.clone(),
            i64::from(partition_for(id.as_bytes(), PARTITIONS)),
        );
        shares.iter().position(|s| s.contains(&at)).unwrap()
    };
    let mut forwarded = 0;
    for i in 0..24 {
        let id = format!("P-{i}");
        let (status, _, body) = post(
            &alice,
            &apis[i % 3],
            &format!("/v1/products/{id}/register"),
            json!({"name": "Lamp", "price": eur(100)}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["version"], 1);
        forwarded += usize::from(owner_of(&id) != i % 3);
    }
    for round in 0..3u64 {
        for i in 0..24 {
            let (status, headers, body) = post(
                &alice,
                &apis[(i + round as usize + 1) % 3],
                &format!("/v1/products/P-{i}/restock"),
                json!({"quantity": 1}),
                &[("if-match", &format!("\"{}\"", round + 1))],
            )
            .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["version"], round + 2);
            assert_eq!(headers["etag"], format!("\"{}\"", round + 2));
            assert!(headers.contains_key("keel-consistency-token"));
        }
    }
    assert!(forwarded >= 8, "only {forwarded} of 24 were forwarded");

    // A keyed command retried through another instance gets the first answer.
    let id = "P-0";
    let key = [("idempotency-key", "restock-p0-once")];
    let path = format!("/v1/products/{id}/restock");
    let mut answers = Vec::new();
    for api in &apis {
        answers.push(post(&alice, api, &path, json!({"quantity": 2}), &key).await);
    }
    assert!(answers.iter().all(|(s, _, _)| *s == StatusCode::OK));
    assert!(answers.iter().all(|(_, _, b)| b == &answers[0].2));
    assert_eq!(
        answers
            .iter()
            .filter(|(_, h, _)| h.contains_key("idempotent-replayed"))
            .count(),
        2,
        "the two retries are replays"
    );

    // What the log holds: every stream at version 5, every commit by alice.
    let settings = broker.settings(&config.prefix, PARTITIONS);
    let (commits, _) = read_accepted(&settings, &config.policy(), &topic)
        .await
        .unwrap();
    let mut versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for c in &commits {
        assert_eq!(c.commit.command.actor, "alice", "the caller's subject");
        versions
            .entry(c.commit.stream.id.clone())
            .or_default()
            .push(c.commit.next_version());
    }
    assert_eq!(versions.len(), 24);
    for (id, v) in &versions {
        let expected: Vec<u64> = if id == "P-0" {
            (1..=5).collect()
        } else {
            (1..=4).collect()
        };
        assert_eq!(v, &expected, "{id}");
    }

    // POST /handoff hands nothing over to a stranger: not a replayed /owned answer (signed,
    // but for another purpose), not an ask signed by an untrusted key, not one that is
    // unsigned; and none of them is a 2xx.
    let anyone = reqwest::Client::new();
    let owned_by = |api: &CommandApi| {
        let request = anyone.get(api.url("/owned")).send();
        async move { request.await.unwrap().json::<Value>().await.unwrap() }
    };
    let owned = owned_by(&apis[0]).await;
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let stranger = keel_schemas::SigningKey::generate();
    let mut forged = json!({
        "purpose": "keel-handoff-v1",
        "from": apis[1].url(""),
        "to": apis[0].url(""),
        "partitions": owned["serving"],
        "at_ms": now_ms,
    });
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(serde_json::to_vec(&forged).unwrap()))
    };
    let unsigned = forged.clone();
    forged["signature"] = serde_json::to_value(stranger.sign(&digest)).unwrap();
    for body in [owned.clone(), forged, unsigned] {
        let answer = anyone
            .post(apis[0].url("/handoff"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            answer.status().is_client_error(),
            "a handoff request from a stranger: {}",
            answer.status()
        );
    }
    let still = owned_by(&apis[0]).await;
    assert_eq!(
        still["serving"], owned["serving"],
        "nothing was handed over"
    );

    // A planned handoff: the third instance stops; its partitions go to the other two,
    // each with the handoff mark of the writer that held it.
    let third = apis.pop().unwrap();
    let third_share = shares[2].clone();
    assert!(third.stop().await.unwrap().success());
    settled(&apis.iter().collect::<Vec<_>>()).await;
    let marks = handoff_marks(&config, &broker, &topic).await;
    let product_partitions_of_third = third_share.iter().filter(|(t, _)| *t == topic).count();
    assert_eq!(
        marks.iter().filter(|w| w.starts_with("cmd-c/")).count(),
        product_partitions_of_third,
        "one handoff mark per partition the stopped instance held: {marks:?}"
    );
    // Make-before-break: each successor read its partition while the third instance
    // still served it, then asked for it; a handoff nobody asks for (after the timeout)
    // writes a snapshot after its mark, and none was written.
    let settings = broker.settings(&config.prefix, PARTITIONS);
    let snapshots: Vec<keel_schemas::TopicPartition> = third_share
        .iter()
        .filter(|(t, _)| *t == topic)
        .map(|(_, p)| {
            keel_schemas::TopicPartition::new(
                settings.snapshot_topic("product"),
                i32::try_from(*p).unwrap(),
            )
        })
        .collect();
    let written: Vec<i64> = keel_kafka::end_offsets(&settings, &snapshots)
        .await
        .unwrap()
        .into_iter()
        .map(|(_, end)| end)
        .collect();
    assert!(
        written.iter().all(|end| *end == 0),
        "no handoff waited for its timeout: {written:?}"
    );
    for i in 0..24 {
        let (status, _, body) = post(
            &alice,
            &apis[i % 2],
            &format!("/v1/products/P-{i}/restock"),
            json!({"quantity": 1}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

#[tokio::test]
async fn a_killed_instance_s_partitions_are_taken_over_and_a_paused_one_acknowledges_nothing() {
    let broker = Broker::start().await.unwrap();
    let config = CommandApiConfig::new(&broker, &unique_prefix("failover"), PARTITIONS, "cmd");
    let alice = config.auth.client("alice", &[Role::CommandsWrite]);
    let mut apis = start(&config, &["cmd-a", "cmd-b"]).await;
    settled(&apis.iter().collect::<Vec<_>>()).await;
    for i in 0..12 {
        let (status, _, body) = post(
            &alice,
            &apis[i % 2],
            &format!("/v1/products/P-{i}/register"),
            json!({"name": "Lamp", "price": eur(100)}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }

    // Unplanned: b is killed; a takes everything once the group notices.
    let b = apis.pop().unwrap();
    b.kill().await.unwrap();
    let started = Instant::now();
    settled(&[&apis[0]]).await;
    eprintln!("failover after a kill took {:?}", started.elapsed());

    // A third instance joins; then it is paused past its session.
    let c = start(&config, &["cmd-c"]).await.pop().unwrap();
    settled(&[&apis[0], &c]).await;
    let pid = c.pid().unwrap().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
    };
    signal("-STOP");
    settled(&[&apis[0]]).await;
    // Meanwhile a serves every stream.
    for i in 0..12 {
        let (status, _, body) = post(
            &alice,
            &apis[0],
            &format!("/v1/products/P-{i}/restock"),
            json!({"quantity": 1}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], 2);
    }
    // c wakes up fenced out: it may rejoin and take partitions again (by fencing anew),
    // but every command it answers is right, and the log shows no version twice.
    signal("-CONT");
    settled(&[&apis[0], &c]).await;
    for i in 0..12 {
        let (status, _, body) = post(
            &alice,
            &c,
            &format!("/v1/products/P-{i}/restock"),
            json!({"quantity": 1}),
            &[],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], 3);
    }
    let settings = broker.settings(&config.prefix, PARTITIONS);
    let topic = settings.topic("product");
    let (commits, _) = read_accepted(&settings, &config.policy(), &topic)
        .await
        .unwrap();
    let mut seen = BTreeSet::new();
    for c in &commits {
        assert!(
            seen.insert((c.commit.stream.id.clone(), c.commit.next_version())),
            "a stream version accepted twice"
        );
    }
    assert_eq!(seen.len(), 36);
}

/// The `started_from_snapshot_at` of each of this instance's partitions of `topic`.
async fn started_from(api: &CommandApi, topic: &str) -> Vec<Option<i64>> {
    partitions(api).await["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == topic)
        .map(|p| p["started_from_snapshot_at"].as_i64())
        .collect()
}

#[tokio::test]
async fn a_new_owner_starts_from_its_predecessor_s_snapshot_and_ignores_a_broken_one() {
    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("snapshots"), PARTITIONS, "cmd");
    config.extra_env.push(("KEEL_SNAPSHOT_EVERY", "10".into()));
    let alice = config.auth.client("alice", &[Role::CommandsWrite]);
    let settings = broker.settings(&config.prefix, PARTITIONS);
    let topic = settings.topic("product");
    let first = start(&config, &["cmd-a"]).await.pop().unwrap();
    settled(&[&first]).await;
    for i in 0..40 {
        let (status, _, body) = post(
            &alice,
            &first,
            &format!("/v1/products/P-{i}/register"),
            json!({"name": "Lamp", "price": eur(100)}),
            &[("idempotency-key", &format!("register-{i}"))],
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    // A planned handoff leaves a snapshot of everything before its mark.
    assert!(first.stop().await.unwrap().success());
    let second = start(&config, &["cmd-b"]).await.pop().unwrap();
    settled(&[&second]).await;
    let from = started_from(&second, &topic).await;
    assert!(
        from.iter().all(|f| f.is_some_and(|at| at > 0)),
        "every product partition started from a snapshot: {from:?}"
    );
    // It serves on from there: versions, keys and all.
    for i in 0..40 {
        let (status, headers, body) = post(
            &alice,
            &second,
            &format!("/v1/products/P-{i}/register"),
            json!({"name": "Lamp", "price": eur(100)}),
            &[("idempotency-key", &format!("register-{i}"))],
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(headers["idempotent-replayed"], "true");
        let (status, _, body) = post(
            &alice,
            &second,
            &format!("/v1/products/P-{i}/restock"),
            json!({"quantity": 1}),
            &[("if-match", "\"1\"")],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], 2);
    }
    assert!(second.stop().await.unwrap().success());

    // A manifest that is not one, last in partition 0's snapshots: ignored, and that
    // partition is read from its first record; the others start from their snapshots.
    let producer = keel_kafka::LogProducer::new(&settings).unwrap();
    producer
        .append(
            &settings.snapshot_topic("product"),
            0,
            "manifest",
            b"{\"format\": 1, \"not\": \"a manifest\"}",
            &[("keel-kind", "snapshot-manifest"), ("keel-chunks", "")],
        )
        .await
        .unwrap();
    let third = start(&config, &["cmd-c"]).await.pop().unwrap();
    settled(&[&third]).await;
    let from = started_from(&third, &topic).await;
    assert_eq!(from[0], None, "the broken snapshot was ignored: {from:?}");
    assert!(from[1..].iter().all(Option::is_some), "{from:?}");
    for i in 0..40 {
        let (status, _, body) = post(
            &alice,
            &third,
            &format!("/v1/products/P-{i}/restock"),
            json!({"quantity": 1}),
            &[("if-match", "\"2\"")],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["version"], 3);
    }
}
