//! Hostile input, refused by field with nothing appended.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use keel_http::Role;
use keel_tests::{Stack, eur};
use reqwest::StatusCode;
use serde_json::json;

use super::*;

#[tokio::test]
async fn hostile_input_is_refused_by_field_and_appends_nothing() {
    let stack = Stack::start("sec-input", 2).await;
    let token = bearer(&stack.config.auth.token("mallory", &Role::ALL));
    let post = |path: &'static str, body: String| {
        let (url, token) = (stack.command.url(path), token.clone());
        async move { send("POST", &url, &token, Some(body)).await }
    };
    let long = "x".repeat(201);
    let cases: Vec<(&str, String, StatusCode, Option<&str>)> = vec![
        ("/v1/products/P-1/register", format!("{{\"name\": \"{}\"}}", "a".repeat(64 * 1024)), StatusCode::PAYLOAD_TOO_LARGE, None),
        ("/v1/products/P-1/register", "{\"name\": ".into(), StatusCode::BAD_REQUEST, None),
        ("/v1/products/P-1/register", format!("{}{}", "[".repeat(500), "]".repeat(500)), StatusCode::BAD_REQUEST, None),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": eur(1), "admin": true}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("admin")),
        ("/v1/products/P-1/register", json!({"name": long, "price": eur(1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("name")),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": eur(-1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("price.amount_minor")),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": {"amount_minor": 1u64 << 62, "currency": "EUR"}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("price.amount_minor")),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": {"amount_minor": 1, "currency": "euro"}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("price.currency")),
        ("/v1/products/P-1/restock", json!({"quantity": 0}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("quantity")),
        ("/v1/products/P-1/restock", json!({"quantity": 1u64 << 40}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("quantity")),
        ("/v1/products/P-1/restock", json!({"quantity": "1"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("quantity")),
        ("/v1/products/P%20X/register", json!({"name": "Mug", "price": eur(1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
        ("/v1/products/..%2Fetc/register", json!({"name": "Mug", "price": eur(1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
        ("/v1/customers/c-1/register", json!({"name": "Eve", "email": format!("{}@x.io", "e".repeat(260))}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("email")),
        ("/v1/orders/o-1/place", json!({"customer_id": "c-1", "lines": []}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("lines")),
        ("/v1/orders/o-1/place", json!({"customer_id": "c-1", "lines": (0..101).map(|i| json!({"sku": format!("S-{i}"), "quantity": 1, "unit_price": eur(1)})).collect::<Vec<_>>()}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("lines")),
    ];
    for (path, body, status, field) in cases {
        let answer = post(path, body).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text);
        assert_eq!(
            answer.headers["content-type"], "application/problem+json",
            "{path}"
        );
        if let Some(field) = field {
            let fields: Vec<&str> = answer.body["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            assert!(
                fields.contains(&field),
                "{path}: {fields:?} should name {field}"
            );
        }
    }
    // Headers that go into the commit are bounded.
    let mut headers = token.clone();
    headers.push(("x-correlation-id", "c".repeat(256)));
    let answer = send(
        "POST",
        &stack.command.url("/v1/products/P-1/register"),
        &headers,
        Some(json!({"name": "Mug", "price": eur(1)}).to_string()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);

    // Query parameters.
    for (path, field) in [
        ("/v1/orders?limit=0", "limit"),
        ("/v1/orders?limit=ten", "limit"),
        ("/v1/orders?cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("/v1/audit/events?from=yesterday", "from"),
    ] {
        let answer = send("GET", &stack.query.url(path), &token, None).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.text
        );
        assert_eq!(answer.body["field"], field, "{path}: {}", answer.text);
    }
    let mut headers = token.clone();
    headers.push(("keel-consistency-token", "v1.garbage".into()));
    let answer = send("GET", &stack.query.url("/v1/orders"), &headers, None).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    // A huge limit is served as the cap.
    let answer = send(
        "GET",
        &stack.query.url("/v1/orders?limit=100000"),
        &token,
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["limit"], 500);

    // Nothing of it reached the log.
    assert_eq!(stack.accepted_commits().await.unwrap(), 0);
}
