//! The command API against a real broker, through HTTP: concurrency, restarts, a broker
//! outage, a zombie instance. Every command's statuses are tested in process, against
//! the router with owners over logs in memory (`command-api/src/routes/tests.rs`).

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{BTreeMap, BTreeSet, HashSet};

use keel_domain::Aggregate;
use keel_domain::product::{Product, ProductEvent};
use keel_schemas::{ReceiptRecord, decode_event};
use keel_tests::{
    AcceptedCommit, Broker, CommandApi, CommandApiConfig, read_accepted, read_receipts,
    unique_prefix,
};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

async fn post_with(api: &CommandApi, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    let mut request = api.client.post(api.url(path)).json(&body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.json().await.unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
    }
}

async fn post(api: &CommandApi, path: &str, body: Value) -> Reply {
    post_with(api, path, body, &[]).await
}

fn eur(n: i64) -> Value {
    json!({"amount_minor": n, "currency": "EUR"})
}

async fn stack(name: &str, partitions: i32) -> (Broker, CommandApiConfig, CommandApi) {
    let broker = Broker::start().await.unwrap();
    let config = CommandApiConfig::new(&broker, &unique_prefix(name), partitions, "cmd-a");
    let api = CommandApi::command_api_ready(&config).await.unwrap();
    (broker, config, api)
}

#[tokio::test]
async fn two_hundred_concurrent_restocks_get_every_version_once() {
    let (broker, config, api) = stack("restock", 4).await;
    post(
        &api,
        "/v1/products/BOLT-1/register",
        json!({"name": "Bolt", "price": eur(10)}),
    )
    .await;
    let api = std::sync::Arc::new(api);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let api = api.clone();
        tasks.spawn(async move {
            post(&api, "/v1/products/BOLT-1/restock", json!({"quantity": 1})).await
        });
    }
    let mut versions = BTreeSet::new();
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert!(
            versions.insert(reply.body["version"].as_u64().unwrap()),
            "a version answered twice"
        );
    }
    assert_eq!(versions, (2..=201).collect::<BTreeSet<u64>>());

    // The log, read through the gate and folded with the domain: stock is exactly 200.
    let settings = broker.settings(&config.prefix, config.partitions);
    let (commits, skipped) = read_accepted(&settings, &config.policy(), &settings.topic("product"))
        .await
        .unwrap();
    assert_eq!(skipped, 0);
    let events: Vec<ProductEvent> = commits
        .iter()
        .flat_map(|c| {
            c.commit
                .events
                .iter()
                .map(|e| decode_event::<Product>(e).unwrap())
        })
        .collect();
    let Product::Registered(state) = Product::fold(&events) else {
        panic!("not registered")
    };
    assert_eq!(state.on_hand, 200);
    assert_chains(&commits);
}

/// Every stream's accepted commits number on from 1 and each links to the one before.
fn assert_chains(commits: &[AcceptedCommit]) {
    assert_chains_with(commits, &[]);
}

/// [`assert_chains`] for streams with receipts too: a commit links to the stream's last
/// link, a commit or a receipt.
fn assert_chains_with(commits: &[AcceptedCommit], receipts: &[(i32, i64, ReceiptRecord)]) {
    let mut last: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut receipts = receipts.iter().peekable();
    for accepted in commits {
        while let Some((_, _, r)) =
            receipts.next_if(|(p, o, _)| (*p, *o) < (accepted.partition, accepted.offset))
        {
            let (version, hash) = last.get(&r.stream.to_string()).cloned().unwrap_or_default();
            assert_eq!(
                (r.version, r.prev_hash.clone().unwrap_or_default()),
                (version, hash)
            );
            last.insert(r.stream.to_string(), (version, r.hash.clone()));
        }
        let c = &accepted.commit;
        assert!(
            c.hash_is_valid(),
            "hash of {} v{}",
            c.stream,
            c.next_version()
        );
        let (version, hash) = last
            .get(&c.stream.to_string())
            .cloned()
            .unwrap_or((0, String::new()));
        assert_eq!(c.expected_version, version, "{}", c.stream);
        assert_eq!(
            c.prev_hash.clone().unwrap_or_default(),
            hash,
            "{} prev_hash",
            c.stream
        );
        last.insert(c.stream.to_string(), (c.next_version(), c.hash.clone()));
    }
}

#[tokio::test]
async fn restart_continues_streams_and_replays_idempotent_retries() {
    let (broker, config, api) = stack("restart", 2).await;
    post(
        &api,
        "/v1/customers/c-7/register",
        json!({"email": "g@example.com", "name": "Grace"}),
    )
    .await;
    let key = [("idempotency-key", "email-1")];
    let first = post_with(
        &api,
        "/v1/customers/c-7/change-email",
        json!({"email": "grace@example.com"}),
        &key,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    // A keyed command refused without a commit: its answer is recorded (a receipt).
    let conditional = [("idempotency-key", "email-2"), ("if-match", "\"5\"")];
    let refused = post_with(
        &api,
        "/v1/customers/c-7/change-email",
        json!({"email": "x@example.com"}),
        &conditional,
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        refused.body
    );
    assert!(
        api.stop().await.unwrap().success(),
        "graceful shutdown exits 0"
    );

    let api = CommandApi::command_api_ready(&CommandApiConfig {
        instance: "cmd-b".into(),
        ..config.clone()
    })
    .await
    .unwrap();
    let again = post_with(
        &api,
        "/v1/customers/c-7/change-email",
        json!({"email": "grace@example.com"}),
        &key,
    )
    .await;
    assert_eq!(
        (again.status, &again.body),
        (StatusCode::OK, &first.body),
        "identical body after a restart"
    );
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let r = post(
        &api,
        "/v1/customers/c-7/change-email",
        json!({"email": "hopper@example.com"}),
    )
    .await;
    assert_eq!(r.body["version"], 3, "versions continue after the restart");
    // The refused command's retry, after the restart and after the stream moved on, gets
    // the answer of its first attempt (the stream was at 2 then), not a fresh decision.
    let retried = post_with(
        &api,
        "/v1/customers/c-7/change-email",
        json!({"email": "x@example.com"}),
        &conditional,
    )
    .await;
    assert_eq!(
        (retried.status, &retried.body),
        (refused.status, &refused.body),
        "the same refusal after a restart"
    );
    assert!(
        retried.body.to_string().contains("version 2"),
        "{}",
        retried.body
    );

    let settings = broker.settings(&config.prefix, config.partitions);
    let topic = settings.topic("customer");
    let (commits, _) = read_accepted(&settings, &config.policy(), &topic)
        .await
        .unwrap();
    assert_eq!(commits.len(), 3, "receipts are no commits");
    let receipts = read_receipts(&settings, &config.policy(), &topic)
        .await
        .unwrap();
    assert_eq!(receipts.len(), 1, "one receipt: the refusal's");
    assert_chains_with(&commits, &receipts);
}

#[tokio::test]
async fn a_newer_instance_fences_the_old_one_and_no_command_is_acknowledged_twice() {
    // Both instances take every partition (no group shares them out): the second fences
    // the first, which is not told and keeps running, a zombie.
    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("zombie"), 2, "cmd-a");
    config.extra_env.push(("KEEL_ASSIGNMENT", "all".into()));
    let old = CommandApi::command_api_ready(&config).await.unwrap();
    for i in 0..4 {
        post(
            &old,
            &format!("/v1/products/P-{i}/register"),
            json!({"name": "P", "price": eur(100)}),
        )
        .await;
    }
    // A second process on the same topics takes every partition with a newer epoch; the
    // first one is not told and keeps running: a zombie.
    let new = CommandApi::command_api_ready(&CommandApiConfig {
        instance: "cmd-new".into(),
        ..config.clone()
    })
    .await
    .unwrap();
    let (old, new) = (std::sync::Arc::new(old), std::sync::Arc::new(new));
    let mut tasks = tokio::task::JoinSet::new();
    for round in 0..30 {
        for (name, api) in [("old", old.clone()), ("new", new.clone())] {
            tasks.spawn(async move {
                let path = format!("/v1/products/P-{}/restock", round % 4);
                (name, post(&api, &path, json!({"quantity": 1})).await)
            });
        }
    }
    let mut acknowledged: HashSet<(String, u64)> = HashSet::new();
    let mut acked_events = HashSet::new();
    let mut old_acks_after_fence = 0;
    while let Some(result) = tasks.join_next().await {
        let (name, reply) = result.unwrap();
        if reply.status.is_success() {
            let id = reply.body["stream"]["id"].as_str().unwrap().to_owned();
            let version = reply.body["version"].as_u64().unwrap();
            assert!(
                acknowledged.insert((id, version)),
                "a stream version acknowledged twice"
            );
            acked_events.insert(
                reply.body["events"][0]["event_id"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
            if name == "old" {
                old_acks_after_fence += 1;
            }
        } else {
            assert_eq!(
                reply.status,
                StatusCode::SERVICE_UNAVAILABLE,
                "{:?}",
                reply.body
            );
            assert!(reply.headers.contains_key("retry-after"));
        }
    }
    assert_eq!(
        old_acks_after_fence, 0,
        "the fenced instance acknowledged nothing"
    );
    assert!(
        acknowledged.len() >= 30,
        "the new owner acknowledged its commands"
    );

    let settings = broker.settings(&config.prefix, config.partitions);
    let (commits, _) = read_accepted(&settings, &config.policy(), &settings.topic("product"))
        .await
        .unwrap();
    assert_chains(&commits);
    let in_log: HashSet<String> = commits
        .iter()
        .flat_map(|c| c.commit.events.iter().map(|e| e.event_id.to_string()))
        .collect();
    assert!(
        acked_events.is_subset(&in_log),
        "every acknowledged command is in the accepted log"
    );
    let old = std::sync::Arc::into_inner(old).unwrap();
    let status = reqwest::get(old.url("/readyz")).await.unwrap().status();
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the fenced instance is not ready"
    );
}

#[tokio::test]
async fn a_broker_outage_is_answered_503_and_the_partition_resumes_from_the_log() {
    // A broker that keeps its log in PostgreSQL, so it can be killed and started again.
    let db = keel_tests::TestDatabase::created("outage").await.unwrap();
    let mut broker = Broker::start_durable(&db.url()).await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("outage"), 1, "cmd-a");
    config.extra_env = vec![
        ("KEEL_REQUEST_TIMEOUT_MS", "4000".into()),
        ("KEEL_KAFKA_TIMEOUT_MS", "2000".into()),
    ];
    let api = CommandApi::command_api_ready(&config).await.unwrap();
    let r = post(
        &api,
        "/v1/products/OUT-1/register",
        json!({"name": "Out", "price": eur(100)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);

    broker.kill().await.unwrap();
    let r = post(&api, "/v1/products/OUT-1/restock", json!({"quantity": 1})).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert!(r.headers.contains_key("retry-after"));

    broker.start_again().await.unwrap();
    let started = std::time::Instant::now();
    let version = loop {
        let r = post(&api, "/v1/products/OUT-1/restock", json!({"quantity": 1})).await;
        if r.status == StatusCode::OK {
            break r.body["version"].as_u64().unwrap();
        }
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(60),
            "the partition did not resume: {:?}",
            r.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };

    // Whatever the outage left in the log, the state was rebuilt from it: the versions
    // run on without a gap and the chain holds.
    let settings = broker.settings(&config.prefix, config.partitions);
    let (commits, _) = read_accepted(&settings, &config.policy(), &settings.topic("product"))
        .await
        .unwrap();
    assert_eq!(commits.last().unwrap().commit.next_version(), version);
    assert_chains(&commits);
}
