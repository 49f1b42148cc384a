//! Every operation of both OpenAPI documents, called as documented against the running
//! stack: each answers a status it documents, with a body of the documented schema. (The
//! fuzz run holds its random requests to the same contract.)

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use keel_http::Role;
use keel_tests::{Contract, Stack, eur, send_raw};
use serde_json::{Value, json};

/// A valid body for each command.
fn body(command: &str) -> Value {
    match command {
        "/v1/products/{id}/register" => json!({"name": "Mug", "price": eur(1299)}),
        "/v1/products/{id}/change-price" => json!({"price": eur(1499)}),
        "/v1/products/{id}/restock" => json!({"quantity": 10}),
        "/v1/products/{id}/reserve-stock" => json!({"order_id": "C-1", "quantity": 2}),
        "/v1/products/{id}/release-stock" => json!({"order_id": "C-1"}),
        "/v1/products/{id}/take-reserved-stock" => json!({"order_id": "C-1"}),
        "/v1/products/{id}/return-taken-stock" => json!({"order_id": "C-1"}),
        "/v1/products/{id}/discontinue" => json!({}),
        "/v1/customers/{id}/register" => json!({"email": "c@example.com", "name": "Cleo"}),
        "/v1/customers/{id}/change-email" => json!({"email": "cleo@example.com"}),
        "/v1/orders/{id}/place" => json!({"customer_id": "C-1", "lines": [
            {"sku": "C-1", "quantity": 2, "unit_price": eur(1299)}]}),
        "/v1/orders/{id}/pay" => json!({"amount": eur(2598), "payment_ref": "pay-1"}),
        "/v1/orders/{id}/ship" => json!({"carrier": "DHL", "tracking": "JD01"}),
        "/v1/orders/{id}/cancel" => json!({"reason": "changed my mind"}),
        "/v1/orders/{id}/cancel-unpaid" => json!({"reason": "not paid in time"}),
        "/v1/orders/{id}/confirm-reservation" | "/v1/orders/{id}/mark-ready-to-ship" => json!({}),
        other => panic!("no body for {other}: add one"),
    }
}

/// Calls `method base+path` with `headers` and a token holding every role; checks the
/// answer against `contract`.
async fn call(
    stack: &Stack,
    contract: &Contract,
    base: &str,
    (method, path): (&str, &str),
    headers: &[(&str, String)],
    body: Option<Value>,
) -> (u16, Value) {
    let mut all = vec![(
        "authorization",
        format!("Bearer {}", stack.config.auth.token("contract", &Role::ALL)),
    )];
    all.extend(headers.iter().cloned());
    if body.is_some() {
        all.push(("content-type", "application/json".to_owned()));
    }
    let reply = send_raw(
        method,
        &format!("{base}{path}"),
        &all,
        body.map(|b| b.to_string().into_bytes()),
    )
    .await
    .unwrap();
    let status = reply.status.as_u16();
    let bare = path.split('?').next().unwrap();
    contract
        .check(method, bare, status, &reply.headers, &reply.bytes)
        .unwrap_or_else(|e| panic!("{e}"));
    (status, reply.json())
}

#[tokio::test]
async fn every_operation_answers_as_documented() {
    let stack = Stack::start("contract", 2).await;
    let command_base = stack.command.url("");
    let query_base = stack.query.url("");
    let commands = Contract::fetch(&stack.command).await.unwrap();
    let queries = Contract::fetch(&stack.query).await.unwrap();

    // Every command, in an order that lets each succeed: register, change, reserve, take
    // and return stock, then the order's life; the product is discontinued and the order
    // cancelled last.
    let mut operations = commands.operations();
    let rank = |path: &str| {
        [
            "register",
            "change",
            "restock",
            "reserve",
            "take",
            "return",
            "release",
            "place",
            "confirm",
            "pay",
            "mark",
            "ship",
            "discontinue",
            "cancel",
        ]
        .iter()
        .position(|w| path.rsplit('/').next().unwrap().starts_with(w))
        .unwrap_or(0)
    };
    operations.sort_by_key(|(_, path)| (rank(path), path.clone()));
    let mut token = keel_schemas::ConsistencyToken::default();
    for (method, path) in &operations {
        if method != "POST" {
            let (status, _) =
                call(&stack, &commands, &command_base, (method, path), &[], None).await;
            assert_eq!(status, 200, "{method} {path}");
            continue;
        }
        let cancels = path.rsplit('/').next().unwrap().starts_with("cancel");
        let (concrete, id) = if path.contains("/orders/") && cancels {
            // Cancelling the shipped order would break a rule: cancel a second order.
            (path.replace("{id}", "C-2"), "C-2")
        } else {
            (path.replace("{id}", "C-1"), "C-1")
        };
        if id == "C-2" {
            let place = body("/v1/orders/{id}/place");
            call(
                &stack,
                &commands,
                &command_base,
                ("POST", "/v1/orders/C-2/place"),
                &[],
                Some(place),
            )
            .await;
        }
        let (status, answer) = call(
            &stack,
            &commands,
            &command_base,
            (method, &concrete),
            &[],
            Some(body(path)),
        )
        .await;
        assert!(
            status == 200 || status == 201,
            "{method} {concrete}: {status} {answer}"
        );
        if let Some(t) = answer["consistency_token"].as_str() {
            token = token.merge(&t.parse().unwrap());
        }
    }

    // Every query, once the views have read every command.
    let wait: [(&str, String); 2] = [
        ("keel-consistency-token", token.encode()),
        ("keel-consistency-timeout", "30000".to_owned()),
    ];
    // The admin routes that record requests first, so the reads of those requests find
    // them: a rebuild and a verification are recorded (202); the stream they would retry or
    // discard is not parked (404), so no stream request exists either.
    let mut operations = queries.operations();
    operations.sort_by_key(|(method, path)| (method != "POST", path.clone()));
    let mut recorded: std::collections::HashMap<&str, String> = Default::default();
    for (method, path) in operations {
        let kind = ["rebuild-requests", "stream-requests", "verify-requests"]
            .into_iter()
            .find(|k| path.contains(k));
        let concrete = path
            .replace("{type}", "order")
            .replace("{id}", "C-1")
            .replace("{sku}", "C-1")
            .replace("{name}", "orders")
            .replace(
                "{request}",
                kind.and_then(|k| recorded.get(k))
                    .map_or("1", String::as_str),
            );
        let concrete = if concrete.ends_with("/state") {
            format!("{concrete}?version=1")
        } else {
            concrete
        };
        let body = (method == "POST").then(|| {
            if path.ends_with("/discard") {
                json!({"reason": "the contract test"})
            } else {
                json!({})
            }
        });
        let (status, answer) = call(
            &stack,
            &queries,
            &query_base,
            (&method, &concrete),
            &wait,
            body,
        )
        .await;
        let expected = if path.ends_with("/retry")
            || path.ends_with("/discard")
            || kind == Some("stream-requests")
        {
            404
        } else if method == "POST" {
            202
        } else {
            200
        };
        assert_eq!(status, expected, "{method} {concrete}: {answer}");
        if status == 202 {
            let kind = if path.ends_with("/verify") {
                "verify-requests"
            } else {
                "rebuild-requests"
            };
            recorded.insert(kind, answer["id"].to_string());
        }
    }
}
