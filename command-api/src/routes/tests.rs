//! The command API's HTTP contract in process: the real router and edge, with partition
//! owners over logs in memory (no broker), driven with `tower::ServiceExt::oneshot`.
//! Every command and its statuses: 200/201 with their headers, 404, 400, 413, 415, 412,
//! 422 with every invalid field named, idempotent replays and reused keys.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use keel_http::{Edge, EdgeSettings, Role};
use keel_schemas::SigningKey;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::{AppState, app};
use crate::owner::MemoryLog;
use crate::owners::{OwnerSettings, Owners};

const SECRET: &str = "an-in-process-test-secret-of-32-bytes";

struct Api {
    router: Router,
    token: String,
    /// Every partition's log.
    logs: Arc<std::sync::Mutex<Vec<MemoryLog>>>,
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

fn eur(n: i64) -> Value {
    json!({"amount_minor": n, "currency": "EUR"})
}

/// The command API over two partitions per topic in memory, every owner serving, and a
/// token of subject `alice` that may write commands.
async fn api() -> Api {
    let signing_key = SigningKey::generate();
    let mut policy = keel_schemas::TrustedKeys::default();
    policy.add(&signing_key);
    let settings = OwnerSettings {
        instance: "cmd-test".into(),
        signing_key: Arc::new(signing_key),
        policy: Arc::new(policy),
        timeout: Duration::from_secs(5),
        partitions: 2,
        key_retention: crate::owner::DEFAULT_KEY_RETENTION,
        retake_after: None,
        snapshot_every: None,
        snapshot_turns: Arc::new(tokio::sync::Semaphore::new(1)),
        flush_pipeline: crate::owner::DEFAULT_FLIGHTS,
        metrics: crate::metrics::CommandMetrics::default(),
    };
    let logs: Arc<std::sync::Mutex<Vec<MemoryLog>>> = Arc::default();
    let owners = Owners::start_all(&settings, |stream_type, partition| {
        let log = MemoryLog::new(&format!("t.{stream_type}.events"), partition);
        logs.lock().unwrap().push(log.handle());
        Ok(log)
    })
    .unwrap();
    tokio::time::timeout(Duration::from_secs(5), async {
        while !owners.all_serving() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("every owner serves");
    let state = AppState {
        owners: Arc::new(owners),
        cluster: None,
        instance: "cmd-test".into(),
        topics: super::topics("t"),
        partitions: settings.partitions,
        request_timeout: Duration::from_secs(5),
        telemetry: super::Telemetry {
            commands: settings.metrics.clone(),
            ..Default::default()
        },
    };
    let edge_settings =
        EdgeSettings::from_vars(|name| (name == "KEEL_AUTH_HS256_SECRET").then(|| SECRET.into()))
            .unwrap();
    let edge = Edge::new(&edge_settings, "command-api").unwrap();
    let state = state.exporting(&edge);
    Api {
        router: app(state, &edge),
        token: keel_http::testing::token(SECRET.as_bytes(), "alice", &[Role::CommandsWrite]),
        logs,
    }
}

impl Api {
    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        Reply {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// POSTs raw bytes with a content type and further headers.
    async fn raw(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<Body>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request =
            Request::post(path).header("authorization", format!("Bearer {}", self.token));
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request.body(body.into()).unwrap()).await
    }

    async fn post_with(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
        self.raw(path, Some("application/json"), body.to_string(), headers)
            .await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        self.post_with(path, body, &[]).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(path).body(Body::empty()).unwrap())
            .await
    }
}

fn problem_type(reply: &Reply) -> &str {
    assert_eq!(
        reply.headers["content-type"], "application/problem+json",
        "{:?}",
        reply.body
    );
    reply.body["type"].as_str().unwrap()
}

fn event_types(reply: &Reply) -> Vec<&str> {
    reply.body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn product_commands_answer_with_their_versions_and_rules() {
    let api = api().await;
    let r = api
        .post(
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

    let r = api
        .post(
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
        let r = api
            .post(&format!("/v1/products/MUG-1/{command}"), body)
            .await;
        assert_eq!(r.status, StatusCode::OK, "{command}: {:?}", r.body);
        assert_eq!(r.body["version"], version, "{command}");
    }
    // Releasing what is not reserved changes nothing: 200, same version, no events.
    let r = api
        .post(
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
    let r = api
        .post(
            "/v1/products/MUG-1/reserve-stock",
            json!({"order_id": "o-2", "quantity": 11}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["rule"], "insufficient_stock");
    // Reserved units taken out of stock once, then returned once.
    let r = api
        .post(
            "/v1/products/MUG-1/reserve-stock",
            json!({"order_id": "o-3", "quantity": 2}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for (command, events) in [
        ("take-reserved-stock", json!(["ReservedStockTaken"])),
        ("take-reserved-stock", json!([])),
        ("return-taken-stock", json!(["TakenStockReturned"])),
        ("return-taken-stock", json!([])),
    ] {
        let r = api
            .post(
                &format!("/v1/products/MUG-1/{command}"),
                json!({"order_id": "o-3"}),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{command}: {:?}", r.body);
        assert_eq!(json!(event_types(&r)), events, "{command}");
    }
    let r = api
        .post(
            "/v1/products/MUG-1/take-reserved-stock",
            json!({"order_id": "o-9"}),
        )
        .await;
    assert_eq!(r.body["rule"], "nothing_reserved");
    // A command without a body needs no content type.
    let r = api
        .raw("/v1/products/MUG-1/discontinue", None, "", &[])
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api
        .post("/v1/products/MUG-1/restock", json!({"quantity": 1}))
        .await;
    assert_eq!(r.body["rule"], "product_discontinued");
}

#[tokio::test]
async fn customer_commands_answer_with_their_versions_and_rules() {
    let api = api().await;
    let r = api
        .post(
            "/v1/customers/c-1/register",
            json!({"email": "ada@example.com", "name": "Ada"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = api
        .post(
            "/v1/customers/c-1/change-email",
            json!({"email": "ada@lovelace.org"}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["version"].clone()),
        (StatusCode::OK, json!(2))
    );
    let r = api
        .post(
            "/v1/customers/c-2/change-email",
            json!({"email": "x@example.com"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["rule"], "customer_not_registered");
}

#[tokio::test]
async fn an_order_is_placed_paid_in_parts_shipped_and_a_paid_one_cancelled_with_a_refund() {
    let api = api().await;
    let lines = json!([{"sku": "MUG-1", "quantity": 2, "unit_price": eur(1299)}]);
    let r = api
        .post(
            "/v1/orders/o-1/place",
            json!({"customer_id": "c-1", "lines": lines}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.body);
    let ship = json!({"carrier": "DHL", "tracking": "JD01"});
    let r = api.post("/v1/orders/o-1/ship", ship.clone()).await;
    assert_eq!(r.body["rule"], "order_not_paid");
    let r = api
        .post(
            "/v1/orders/o-1/pay",
            json!({"amount": eur(2598 + 1), "payment_ref": "p-0"}),
        )
        .await;
    assert_eq!(r.body["rule"], "overpayment");
    let r = api
        .post(
            "/v1/orders/o-1/pay",
            json!({"amount": eur(1000), "payment_ref": "p-1"}),
        )
        .await;
    assert_eq!(r.body["version"], 2);
    let r = api
        .post(
            "/v1/orders/o-1/pay",
            json!({"amount": eur(1598), "payment_ref": "p-2"}),
        )
        .await;
    assert_eq!(
        r.body["version"], 4,
        "a payment that reaches the total also pays the order"
    );
    assert_eq!(event_types(&r), ["PaymentRecorded", "OrderPaid"]);
    // Paid is not enough: the fulfilment process marks it ready once its stock is taken.
    let r = api.post("/v1/orders/o-1/ship", ship.clone()).await;
    assert_eq!(r.body["rule"], "order_not_ready_to_ship");
    for step in ["confirm-reservation", "mark-ready-to-ship"] {
        let r = api.post(&format!("/v1/orders/o-1/{step}"), json!({})).await;
        assert_eq!(r.status, StatusCode::OK, "{step}: {:?}", r.body);
    }
    let r = api.post("/v1/orders/o-1/ship", ship).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = api
        .post("/v1/orders/o-1/cancel", json!({"reason": "too late"}))
        .await;
    assert_eq!(r.body["rule"], "order_already_shipped");
    // Cancelling a paid order refunds it.
    api.post(
        "/v1/orders/o-2/place",
        json!({"customer_id": "c-1", "lines": lines}),
    )
    .await;
    api.post(
        "/v1/orders/o-2/pay",
        json!({"amount": eur(500), "payment_ref": "p-1"}),
    )
    .await;
    let r = api
        .post(
            "/v1/orders/o-2/cancel",
            json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(event_types(&r), ["OrderCancelled", "RefundIssued"]);
}

/// With traces off, the caller's `traceparent` goes on the record's header as sent, and
/// the commit itself records none: its hashed form is the one builds before the field
/// wrote, so they still read it.
#[tokio::test]
async fn with_traces_off_the_callers_traceparent_is_a_header_and_not_in_the_commit() {
    let api = api().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = api
        .post_with(
            "/v1/products/MUG-1/register",
            json!({"name": "Mug", "price": eur(1299)}),
            &[("traceparent", traceparent)],
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.body);
    let commits: Vec<_> = api
        .logs
        .lock()
        .unwrap()
        .iter()
        .flat_map(|log| log.entries())
        .filter_map(
            |entry| match keel_schemas::LogRecord::decode(&entry.payload) {
                Ok(keel_schemas::LogRecord::Commit(commit)) => Some((entry, commit)),
                _ => None,
            },
        )
        .collect();
    assert_eq!(commits.len(), 1);
    let (entry, commit) = &commits[0];
    assert_eq!(entry.header("traceparent"), Some(traceparent));
    assert_eq!(commit.command.traceparent, None);
    let raw: Value = serde_json::from_slice(&entry.payload).unwrap();
    assert!(raw["command"].get("traceparent").is_none(), "{raw}");
}

#[tokio::test]
async fn unknown_collections_commands_and_streams_are_404() {
    let api = api().await;
    assert_eq!(
        api.post("/v1/widgets/w-1/register", json!({})).await.status,
        StatusCode::NOT_FOUND
    );
    let r = api.post("/v1/orders/o-1/teleport", json!({})).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (StatusCode::NOT_FOUND, "/problems/not-found")
    );
    let r = api
        .post(
            "/v1/orders/nope/pay",
            json!({"amount": eur(1), "payment_ref": "p"}),
        )
        .await;
    assert_eq!(
        (r.status, r.body["rule"].clone()),
        (StatusCode::NOT_FOUND, json!("order_not_placed"))
    );
}

#[tokio::test]
async fn malformed_bodies_and_headers_are_400_413_and_415() {
    let api = api().await;
    let path = "/v1/products/TEE-1/register";
    let r = api
        .raw(path, Some("application/json"), "{\"name\": ", &[])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(
        api.raw(path, Some("text/plain"), "name=Tee", &[])
            .await
            .status,
        StatusCode::UNSUPPORTED_MEDIA_TYPE
    );
    let big = json!({"name": "x".repeat(70 * 1024), "price": eur(1)});
    let r = api.post(path, big).await;
    assert_eq!(
        (r.status, problem_type(&r)),
        (StatusCode::PAYLOAD_TOO_LARGE, "/problems/body-too-large")
    );
    let r = api
        .post_with(
            "/v1/products/MUG-1/restock",
            json!({"quantity": 1}),
            &[("if-match", "three")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // A recorded header is 1 to 255 characters: an empty one is refused, not recorded.
    for header in ["x-correlation-id", "x-causation-id", "idempotency-key"] {
        let r = api
            .post_with(
                "/v1/products/MUG-1/restock",
                json!({"quantity": 1}),
                &[(header, "")],
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{header}");
    }
}

#[tokio::test]
async fn a_number_without_a_fraction_is_the_integer_it_equals() {
    let api = api().await;
    let r = api
        .post(
            "/v1/products/INT-1/register",
            json!({"name": "Mug", "price": {"amount_minor": 1299.0, "currency": "EUR"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    let r = api
        .post("/v1/products/INT-1/restock", json!({"quantity": 2.0e1}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["version"], 2);
    let r = api
        .post("/v1/products/INT-1/restock", json!({"quantity": 2.5}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
}

#[tokio::test]
async fn every_invalid_field_is_named_in_a_422() {
    let api = api().await;
    let r = api.post("/v1/orders/o-9/place", json!({"customer_id": "c 1",
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
    let r = api
        .post(
            "/v1/products/MUG%201/register",
            json!({"name": "Mug", "price": eur(1)}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(r.body["errors"][0]["field"], "id");
}

#[tokio::test]
async fn if_match_on_another_version_is_412() {
    let api = api().await;
    api.post(
        "/v1/products/CUP-1/register",
        json!({"name": "Cup", "price": eur(500)}),
    )
    .await;
    let r = api
        .post_with(
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
    let r = api
        .post_with(
            "/v1/products/CUP-1/restock",
            json!({"quantity": 1}),
            &[("if-match", "\"1\"")],
        )
        .await;
    assert_eq!(
        (r.status, r.body["version"].clone()),
        (StatusCode::OK, json!(2))
    );
}

#[tokio::test]
async fn a_retry_with_the_same_key_replays_and_another_body_is_422() {
    let api = api().await;
    api.post(
        "/v1/products/CUP-1/register",
        json!({"name": "Cup", "price": eur(500)}),
    )
    .await;
    let key = [("idempotency-key", "restock-cup-1")];
    let path = "/v1/products/CUP-1/restock";
    let first = api.post_with(path, json!({"quantity": 5}), &key).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    let again = api.post_with(path, json!({"quantity": 5}), &key).await;
    assert_eq!((again.status, &again.body), (StatusCode::OK, &first.body));
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let other = api.post_with(path, json!({"quantity": 6}), &key).await;
    assert_eq!(
        (other.status, problem_type(&other)),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "/problems/idempotency-key-reused"
        )
    );
}

#[tokio::test]
async fn health_readiness_and_the_openapi_document_are_open() {
    let api = api().await;
    assert_eq!(api.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(api.get("/readyz").await.status, StatusCode::OK);
    let doc = api.get("/openapi.json").await;
    assert!(doc.body["paths"]["/v1/orders/{id}/place"]["post"].is_object());
    // The commands are not open.
    let r = api
        .send(
            Request::post("/v1/products/X-1/discontinue")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

/// Every route of the document, without a token, with a token of no role and with a token
/// of each role: 401, 403 naming the role, or through the edge, as the document says.
#[tokio::test]
async fn every_role_against_every_route() {
    let api = api().await;
    let doc = super::openapi::document();
    let sent = keel_http::testing::check_role_matrix(&doc, &api.router, SECRET.as_bytes(), |p| {
        p.replace("{id}", "role-1")
    })
    .await;
    let operations = crate::commands::CATALOGUE.len() + 6;
    assert_eq!(sent, operations * (Role::ALL.len() + 2));
}

/// `/v1/partitions` lists every partition with this instance's owner of it (writer,
/// epoch, state), and needs `admin`.
#[tokio::test]
async fn the_partitions_route_shows_every_partition_and_its_owner() {
    let api = api().await;
    let admin = keel_http::testing::token(SECRET.as_bytes(), "ops", &[Role::Admin]);
    let r = api
        .send(
            Request::get("/v1/partitions")
                .header("authorization", format!("Bearer {admin}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["assignment"], "all");
    let partitions = r.body["partitions"].as_array().unwrap();
    assert_eq!(
        partitions.len(),
        3 * 2,
        "two partitions of each of three topics"
    );
    for p in partitions {
        assert_eq!(p["status"], "serving", "{p}");
        assert_eq!(p["epoch"], 1, "{p}");
        assert!(
            p["writer"].as_str().unwrap().starts_with("cmd-test/"),
            "{p}"
        );
    }
    // A command writer's token is refused.
    let r = api
        .send(
            Request::get("/v1/partitions")
                .header("authorization", format!("Bearer {}", api.token))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

/// The value of `series` (its name and labels as exposed) in a scrape, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

impl Api {
    /// `GET /metrics` without a token: the scrape's text.
    async fn scrape(&self) -> String {
        let response = self
            .router
            .clone()
            .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            keel_telemetry::metrics::CONTENT_TYPE
        );
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }
}

/// Each command is counted once by its type and outcome; the phases and flights it went
/// through are timed; each partition shows its owner's state, epoch, last offset and keys;
/// refused tokens are counted by reason; and `/metrics` needs no token.
#[tokio::test]
async fn metrics_count_commands_by_outcome_and_show_every_partition() {
    let api = api().await;
    let register = json!({"name": "Mug", "price": eur(1299)});
    let keyed = [("idempotency-key", "k-1")];
    let r = api
        .post_with("/v1/products/MUG-1/register", register.clone(), &keyed)
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = api
        .post_with("/v1/products/MUG-1/register", register.clone(), &keyed)
        .await;
    assert_eq!(r.headers["idempotent-replayed"], "true");
    let r = api.post("/v1/products/MUG-1/register", register).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    let r = api
        .post_with(
            "/v1/products/MUG-1/restock",
            json!({"quantity": 1}),
            &[("if-match", "\"9\"")],
        )
        .await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    let r = api
        .post("/v1/products/MUG-1/restock", json!({"quantity": -1}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = api
        .post("/v1/products/NONE/restock", json!({"quantity": 1}))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let anonymous = api
        .send(
            Request::post("/v1/products/MUG-1/restock")
                .header("content-type", "application/json")
                .body(Body::from(r#"{"quantity": 1}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    let text = api.scrape().await;
    let commands = |command: &str, outcome: &str| {
        sample(
            &text,
            &format!(r#"keel_commands_total{{command="{command}",outcome="{outcome}"}}"#),
        )
    };
    assert_eq!(commands("RegisterProduct", "accepted"), 1.0, "{text}");
    assert_eq!(commands("RegisterProduct", "replayed"), 1.0);
    assert_eq!(commands("RegisterProduct", "conflict"), 1.0);
    assert_eq!(commands("Restock", "precondition_failed"), 1.0, "{text}");
    assert_eq!(commands("Restock", "invalid"), 1.0);
    assert_eq!(commands("Restock", "not_found"), 1.0);
    // Refused at the edge: no command was decided.
    assert_eq!(
        sample(&text, r#"keel_auth_failures_total{reason="missing"}"#),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"keel_http_requests_total{route="/v1/{collection}/{id}/{command}",method="POST",status="401"}"#
        ),
        1.0
    );
    // Queued once per command the owner took on; one flight appended the registration.
    assert!(
        sample(
            &text,
            r#"keel_command_phase_duration_seconds_count{phase="queue"}"#
        ) >= 4.0
    );
    for phase in ["decide", "append", "read_back"] {
        let series = format!(r#"keel_command_phase_duration_seconds_count{{phase="{phase}"}}"#);
        assert!(sample(&text, &series) >= 1.0, "{series} in {text}");
    }
    assert_eq!(sample(&text, "keel_command_flush_commits_count"), 1.0);
    // Two partitions of each of three topics, every one served here.
    assert_eq!(sample(&text, "keel_partitions"), 6.0);
    assert_eq!(sample(&text, "keel_partitions_unserved"), 0.0);
    let states = text
        .lines()
        .filter(|l| l.starts_with("keel_partition_owner_state{") && l.ends_with(" 1"))
        .count();
    assert_eq!(states, 6, "{text}");
    let at = keel_kafka::partition_for(b"MUG-1", 2);
    let partition = format!(r#"{{topic="t.product.events",partition="{at}"}}"#);
    assert!(sample(&text, &format!("keel_partition_owner_epoch{partition}")) >= 1.0);
    // The fence, the registration and its receipt-free replay: at least two records.
    assert!(sample(&text, &format!("keel_partition_last_offset{partition}")) >= 1.0);
    assert_eq!(
        sample(&text, &format!("keel_idempotency_keys{partition}")),
        1.0
    );
    assert!(sample(&text, "process_resident_memory_bytes") > 0.0);
}
