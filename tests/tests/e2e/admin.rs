//! The query API's admin routes that ask the projector processes for work: a rebuild, a
//! retry and a discard of a parked stream, a verification of one stream. Each is recorded
//! with the token's subject, carried out by the running `projector run`, and followed to
//! its outcome through the route its `Location` names.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::time::{Duration, Instant};

use keel_http::Role;
use keel_kafka::{LogProducer, partition_for};
use keel_tests::{Stack, eur, send_raw};
use serde_json::{Value, json};

/// POSTs `path` on the query API as `subject` with `roles`, with `body` as JSON (`{}` when
/// `None`): status, `Location` and body.
async fn post(
    stack: &Stack,
    (subject, roles): (&str, &[Role]),
    path: &str,
    body: Option<Value>,
) -> (u16, Option<String>, Value) {
    let headers = [
        (
            "authorization",
            format!("Bearer {}", stack.config.auth.token(subject, roles)),
        ),
        ("content-type", "application/json".to_owned()),
    ];
    let reply = send_raw(
        "POST",
        &stack.query.url(path),
        &headers,
        Some(body.unwrap_or_else(|| json!({})).to_string().into_bytes()),
    )
    .await
    .unwrap();
    let location = reply
        .headers
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    (reply.status.as_u16(), location, reply.json())
}

/// Follows a request at `location` until it is done or failed (60 s at most).
async fn follow(stack: &Stack, location: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, request) = stack.get(location, None).await;
        assert_eq!(status, 200, "GET {location}: {request}");
        if matches!(request["state"].as_str(), Some("done" | "failed")) {
            return request;
        }
        assert!(
            Instant::now() < deadline,
            "{location} not carried out in 60 s: {request}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

const ADMIN: &[Role] = &[Role::Admin];

#[tokio::test]
async fn rebuilds_verifications_retries_and_discards_asked_through_the_query_api() {
    let stack = Stack::start("admin-routes", 2).await;
    let line = json!({"customer_id": "c-1", "lines": [{"sku": "S", "quantity": 1, "unit_price": eur(100)}]});
    let mut token = None;
    for i in 0..10 {
        let (status, _, t) = stack
            .post(&format!("/v1/orders/a-{i}/place"), line.clone())
            .await;
        assert_eq!(status, 201);
        token = t;
    }
    let (status, _) = stack.get("/v1/orders?limit=1", token.as_ref()).await;
    assert_eq!(status, 200);
    let generation = stack.projection("orders").await["generation"]
        .as_i64()
        .unwrap();

    // Refused before anything is recorded: no admin role, an unknown projection, a body
    // that is not JSON, unknown fields, a body over 16 KiB.
    let ada = ("ops-ada", ADMIN);
    let (status, _, _) = post(
        &stack,
        ("reader", &[Role::QueriesRead]),
        "/v1/projections/orders/rebuild",
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, problem) = post(&stack, ada, "/v1/projections/nothing/rebuild", None).await;
    assert_eq!(status, 404, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("orders"));
    let reply = send_raw(
        "POST",
        &stack.query.url("/v1/projections/orders/rebuild"),
        &[
            (
                "authorization",
                format!("Bearer {}", stack.config.auth.token("ops-ada", ADMIN)),
            ),
            ("content-type", "text/plain".to_owned()),
        ],
        Some(b"keep_old".to_vec()),
    )
    .await
    .unwrap();
    assert_eq!(reply.status.as_u16(), 415, "{}", reply.text());
    // Not even empty and undeclared: another web page could send that from a browser
    // without asking first (and, with authentication off, without a token).
    let reply = send_raw(
        "POST",
        &stack.query.url("/v1/projections/orders/rebuild"),
        &[(
            "authorization",
            format!("Bearer {}", stack.config.auth.token("ops-ada", ADMIN)),
        )],
        None,
    )
    .await
    .unwrap();
    assert_eq!(reply.status.as_u16(), 415, "{}", reply.text());
    let (status, _, problem) = post(
        &stack,
        ada,
        "/v1/projections/orders/rebuild",
        Some(json!({"keep": true})),
    )
    .await;
    assert_eq!((status, problem["field"].as_str()), (400, Some("body")));
    let (status, _, problem) = post(
        &stack,
        ada,
        "/v1/projections/orders/rebuild",
        Some(json!({"keep_old": "x".repeat(20_000)})),
    )
    .await;
    assert_eq!(status, 413, "{problem}");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_rebuild_requests")
        .fetch_one(&stack.pool().await)
        .await
        .unwrap();
    assert_eq!(recorded, 0, "nothing refused was recorded");

    // A rebuild, with its actor, followed to the swap.
    let (status, location, request) = post(
        &stack,
        ada,
        "/v1/projections/orders/rebuild",
        Some(json!({"keep_old": false})),
    )
    .await;
    assert_eq!(status, 202, "{request}");
    let location = location.unwrap();
    assert_eq!(
        location,
        format!("/v1/projections/rebuild-requests/{}", request["id"])
    );
    assert_eq!(
        (request["actor"].as_str(), request["generation"].as_i64()),
        (Some("ops-ada"), Some(generation))
    );
    let done = follow(&stack, &location).await;
    assert_eq!(done["state"], "done", "{done}");
    assert!(
        done["outcome"].as_str().unwrap().contains("swapped in"),
        "{done}"
    );
    assert_eq!(
        stack.projection("orders").await["generation"].as_i64(),
        Some(generation + 1)
    );
    let (status, page) = stack.get("/v1/orders?limit=100", None).await;
    assert_eq!(status, 200);
    assert_eq!(page["items"].as_array().unwrap().len(), 10, "{page}");

    // A verification of one stream, with its report.
    let (status, location, request) = post(
        &stack,
        ("auditor-bo", ADMIN),
        "/v1/audit/streams/order/a-3/verify",
        None,
    )
    .await;
    assert_eq!(status, 202, "{request}");
    let verified = follow(&stack, &location.unwrap()).await;
    assert_eq!(
        (verified["state"].as_str(), verified["actor"].as_str()),
        (Some("done"), Some("auditor-bo")),
        "{verified}"
    );
    assert_eq!(verified["report"]["commits"], 1, "{verified}");
    assert_eq!(verified["report"]["audit_log_compared"], true);
    let (status, _, _) = post(&stack, ada, "/v1/audit/streams/parcel/a-3/verify", None).await;
    assert_eq!(status, 404, "an unknown stream type");

    // A parked stream: not parked yet (404), then a poison record parks it.
    let retry = "/v1/projections/orders/parked/order/a-1/retry";
    let (status, _, _) = post(&stack, ada, retry, None).await;
    assert_eq!(status, 404);
    let settings = stack
        .broker
        .settings(&stack.config.prefix, stack.config.partitions);
    let partition = partition_for(b"a-1", stack.config.partitions);
    LogProducer::new(&settings)
        .unwrap()
        .append(
            &settings.topic("order"),
            partition,
            "a-1",
            b"{not json",
            &[],
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stack.projection("orders").await["parked_streams"] != 1 {
        assert!(Instant::now() < deadline, "the poison record parks a-1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A retry cannot read the record either: failed, and still parked.
    let (status, location, request) = post(&stack, ada, retry, Some(json!({}))).await;
    assert_eq!(status, 202, "{request}");
    let retried = follow(&stack, &location.unwrap()).await;
    assert_eq!(retried["state"], "failed", "{retried}");
    assert!(
        retried["outcome"]
            .as_str()
            .unwrap()
            .contains("still parked"),
        "{retried}"
    );
    // A discard needs a reason.
    let discard = "/v1/projections/orders/parked/order/a-1/discard";
    for body in [None, Some(json!({"reason": " \t\n"}))] {
        let (status, _, problem) = post(&stack, ada, discard, body).await;
        assert_eq!(
            (status, problem["field"].as_str()),
            (400, Some("reason")),
            "{problem}"
        );
    }
    let (status, location, request) = post(
        &stack,
        ("ops-cy", ADMIN),
        discard,
        Some(json!({"reason": "a record written by hand"})),
    )
    .await;
    assert_eq!(status, 202, "{request}");
    let discarded = follow(&stack, &location.unwrap()).await;
    assert_eq!(discarded["state"], "done", "{discarded}");
    let (by, why): (String, String) = sqlx::query_as(
        "SELECT resolved_by, resolution FROM keel_dead_letters WHERE projection = 'orders' AND status = 'discarded'",
    )
    .fetch_one(&stack.pool().await)
    .await
    .unwrap();
    assert_eq!(
        (by.as_str(), why.as_str()),
        ("ops-cy", "a record written by hand")
    );
    assert_eq!(stack.projection("orders").await["parked_streams"], 0);
    let (status, _) = stack
        .get("/v1/projections/stream-requests/999999", None)
        .await;
    assert_eq!(status, 404);
}
