//! The command API against a real broker, through HTTP.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::{BTreeMap, BTreeSet, HashSet};

use keel_domain::Aggregate;
use keel_domain::product::{Product, ProductEvent};
use keel_schemas::decode_event;
use keel_tests::{
    AcceptedCommit, Broker, CommandApi, CommandApiConfig, read_accepted, unique_prefix,
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

fn problem_type(reply: &Reply) -> &str {
    assert_eq!(
        reply.headers["content-type"], "application/problem+json",
        "{:?}",
        reply.body
    );
    reply.body["type"].as_str().unwrap()
}

async fn stack(name: &str, partitions: i32) -> (Broker, CommandApiConfig, CommandApi) {
    let broker = Broker::start().await.unwrap();
    let config = CommandApiConfig::new(&broker, &unique_prefix(name), partitions, "cmd-a");
    let api = CommandApi::command_api_ready(&config).await.unwrap();
    (broker, config, api)
}

#[tokio::test]
async fn every_command_and_error_case() {
    let (_broker, _config, api) = stack("contract", 2).await;

    // Products.
    let r = post(
        &api,
        "/v1/products/MUG-1/register",
        json!({"name": "Mug", "price": eur(1299)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    assert_eq!(r.body["stream"], json!({"type": "product", "id": "MUG-1"}));
    assert_eq!(r.body["version"], 1);
    assert_eq!(r.body["events"][0]["type"], "ProductRegistered");
    assert_eq!(r.headers["etag"], "\"1\"");
    let token = r.headers["keel-consistency-token"].to_str().unwrap();
    assert_eq!(r.body["consistency_token"], token);
    assert!(token.parse::<keel_schemas::ConsistencyToken>().is_ok());

    let r = post(
        &api,
        "/v1/products/MUG-1/register",
        json!({"name": "Mug", "price": eur(1299)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(problem_type(&r), "/problems/domain-rule-broken");
    assert_eq!(r.body["rule"], "product_already_registered");

    for (command, body, version) in [
        ("restock", json!({"quantity": 10}), 2),
        ("change-price", json!({"price": eur(1499)}), 3),
        (
            "reserve-stock",
            json!({"order_id": "o-1", "quantity": 4}),
            4,
        ),
        ("release-stock", json!({"order_id": "o-1"}), 5),
    ] {
        let r = post(&api, &format!("/v1/products/MUG-1/{command}"), body).await;
        assert_eq!(r.status, StatusCode::OK, "{command}: {:?}", r.body);
        assert_eq!(r.body["version"], version, "{command}");
    }
    // Releasing what is not reserved changes nothing: 200, same version, no events.
    let r = post(
        &api,
        "/v1/products/MUG-1/release-stock",
        json!({"order_id": "o-1"}),
    )
    .await;
    assert_eq!(
        (
            r.status,
            r.body["version"].clone(),
            r.body["events"].clone()
        ),
        (StatusCode::OK, json!(5), json!([]))
    );
    let r = post(
        &api,
        "/v1/products/MUG-1/reserve-stock",
        json!({"order_id": "o-2", "quantity": 11}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["rule"], "insufficient_stock");
    // A command without a body needs no content type.
    let r = api
        .client
        .post(api.url("/v1/products/MUG-1/discontinue"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = post(&api, "/v1/products/MUG-1/restock", json!({"quantity": 1})).await;
    assert_eq!(r.body["rule"], "product_discontinued");

    // Customers.
    let r = post(
        &api,
        "/v1/customers/c-1/register",
        json!({"email": "ada@example.com", "name": "Ada"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = post(
        &api,
        "/v1/customers/c-1/change-email",
        json!({"email": "ada@lovelace.org"}),
    )
    .await;
    assert_eq!(
        (r.status, r.body["version"].clone()),
        (StatusCode::OK, json!(2))
    );
    let r = post(
        &api,
        "/v1/customers/c-2/change-email",
        json!({"email": "x@example.com"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["rule"], "customer_not_registered");

    // Orders: place, pay in two parts (the second also pays the order), ship, cannot cancel.
    let lines = json!([{"sku": "MUG-1", "quantity": 2, "unit_price": eur(1299)}]);
    let r = post(
        &api,
        "/v1/orders/o-1/place",
        json!({"customer_id": "c-1", "lines": lines}),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let r = post(
        &api,
        "/v1/orders/o-1/ship",
        json!({"carrier": "DHL", "tracking": "JD01"}),
    )
    .await;
    assert_eq!(r.body["rule"], "order_not_paid");
    let r = post(
        &api,
        "/v1/orders/o-1/pay",
        json!({"amount": eur(2598 + 1), "payment_ref": "p-0"}),
    )
    .await;
    assert_eq!(r.body["rule"], "overpayment");
    let r = post(
        &api,
        "/v1/orders/o-1/pay",
        json!({"amount": eur(1000), "payment_ref": "p-1"}),
    )
    .await;
    assert_eq!(r.body["version"], 2);
    let r = post(
        &api,
        "/v1/orders/o-1/pay",
        json!({"amount": eur(1598), "payment_ref": "p-2"}),
    )
    .await;
    assert_eq!(
        r.body["version"], 4,
        "a payment that reaches the total also pays the order"
    );
    let types: Vec<&str> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["PaymentRecorded", "OrderPaid"]);
    let r = post(
        &api,
        "/v1/orders/o-1/ship",
        json!({"carrier": "DHL", "tracking": "JD01"}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = post(&api, "/v1/orders/o-1/cancel", json!({"reason": "too late"})).await;
    assert_eq!(r.body["rule"], "order_already_shipped");
    // Cancelling a paid order refunds it.
    post(
        &api,
        "/v1/orders/o-2/place",
        json!({"customer_id": "c-1", "lines": lines}),
    )
    .await;
    post(
        &api,
        "/v1/orders/o-2/pay",
        json!({"amount": eur(500), "payment_ref": "p-1"}),
    )
    .await;
    let r = post(
        &api,
        "/v1/orders/o-2/cancel",
        json!({"reason": "changed my mind"}),
    )
    .await;
    let types: Vec<&str> = r.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["OrderCancelled", "RefundIssued"]);

    // 404: unknown collection, command, stream.
    assert_eq!(
        post(&api, "/v1/widgets/w-1/register", json!({}))
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let r = post(&api, "/v1/orders/o-1/teleport", json!({})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (StatusCode::NOT_FOUND, "/problems/not-found")
    );
    let r = post(
        &api,
        "/v1/orders/nope/pay",
        json!({"amount": eur(1), "payment_ref": "p"}),
    )
    .await;
    assert_eq!(
        (r.status, r.body["rule"].clone()),
        (StatusCode::NOT_FOUND, json!("order_not_placed"))
    );

    // 400: malformed JSON and headers.
    let raw = |body: &'static str, content_type: &'static str| {
        api.client
            .post(api.url("/v1/products/TEE-1/register"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let r = raw("{\"name\": ", "application/json").await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    // 415: not JSON.
    assert_eq!(
        raw("name=Tee", "text/plain").await.unwrap().status(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    // 413: over 64 KiB.
    let big = json!({"name": "x".repeat(70 * 1024), "price": eur(1)});
    let r = post(&api, "/v1/products/TEE-1/register", big).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (StatusCode::PAYLOAD_TOO_LARGE, "/problems/body-too-large")
    );
    let r = post_with(
        &api,
        "/v1/products/MUG-1/restock",
        json!({"quantity": 1}),
        &[("if-match", "three")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // 422: every invalid field named.
    let r = post(&api, "/v1/orders/o-9/place", json!({"customer_id": "c 1",
        "lines": [{"sku": "", "quantity": 0, "unit_price": {"amount_minor": 5, "currency": "eur"}}]})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (StatusCode::UNPROCESSABLE_ENTITY, "/problems/invalid-fields")
    );
    let fields: Vec<&str> = r.body["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(
        fields,
        [
            "customer_id",
            "lines[0].sku",
            "lines[0].quantity",
            "lines[0].unit_price.currency"
        ]
    );
    let r = post(
        &api,
        "/v1/products/MUG%201/register",
        json!({"name": "Mug", "price": eur(1)}),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["errors"][0]["field"], "id");

    // 412 / If-Match.
    post(
        &api,
        "/v1/products/CUP-1/register",
        json!({"name": "Cup", "price": eur(500)}),
    )
    .await;
    let r = post_with(
        &api,
        "/v1/products/CUP-1/restock",
        json!({"quantity": 1}),
        &[("if-match", "\"7\"")],
    )
    .await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (
            StatusCode::PRECONDITION_FAILED,
            "/problems/version-mismatch"
        )
    );
    assert_eq!(r.body["current_version"], 1);
    let r = post_with(
        &api,
        "/v1/products/CUP-1/restock",
        json!({"quantity": 1}),
        &[("if-match", "\"1\"")],
    )
    .await;
    assert_eq!(
        (r.status, r.body["version"].clone()),
        (StatusCode::OK, json!(2))
    );

    // Idempotency: same key and body -> the original response; another body -> 422.
    let key = [("idempotency-key", "restock-cup-1")];
    let first = post_with(
        &api,
        "/v1/products/CUP-1/restock",
        json!({"quantity": 5}),
        &key,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let again = post_with(
        &api,
        "/v1/products/CUP-1/restock",
        json!({"quantity": 5}),
        &key,
    )
    .await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &first.body));
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let other = post_with(
        &api,
        "/v1/products/CUP-1/restock",
        json!({"quantity": 6}),
        &key,
    )
    .await;
    assert_eq!(
        (other.status, problem_type(&other)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "/problems/idempotency-key-reused"
        )
    );

    // Health, readiness, the OpenAPI document.
    let client = api.client.clone();
    assert_eq!(
        client
            .get(api.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        client
            .get(api.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let doc: Value = client
        .get(api.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(doc["paths"]["/v1/orders/{id}/place"]["post"].is_object());
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
    let (commits, skipped) = read_accepted(&settings, &settings.topic("product"))
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
    let mut last: BTreeMap<String, (u64, String)> = BTreeMap::new();
    for c in commits {
        let c = &c.commit;
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

    let settings = broker.settings(&config.prefix, config.partitions);
    let (commits, _) = read_accepted(&settings, &settings.topic("customer"))
        .await
        .unwrap();
    assert_eq!(commits.len(), 3);
    assert_chains(&commits);
}

#[tokio::test]
async fn a_newer_instance_fences_the_old_one_and_no_command_is_acknowledged_twice() {
    let (broker, config, old) = stack("zombie", 2).await;
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
    let (commits, _) = read_accepted(&settings, &settings.topic("product"))
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
    let (commits, _) = read_accepted(&settings, &settings.topic("product"))
        .await
        .unwrap();
    assert_eq!(commits.last().unwrap().commit.next_version(), version);
    assert_chains(&commits);
}
