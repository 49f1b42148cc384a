//! The role table against both OpenAPI documents, and real answers for each role's holder.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use keel_http::Role;
use keel_tests::{Contract, Stack, eur};
use reqwest::StatusCode;
use serde_json::json;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Command,
    Query,
}

/// Every route of both APIs and the role it needs (`None`: open). The test checks that this
/// table and the OpenAPI documents list the same operations with the same roles.
const ROUTES: &[(Api, &str, &str, Option<Role>)] = &[
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/register",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/change-price",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/restock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/reserve-stock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/release-stock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/take-reserved-stock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/return-taken-stock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/discontinue",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/customers/{id}/register",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/customers/{id}/change-email",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/place",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/pay",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/ship",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/cancel",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/confirm-reservation",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/mark-ready-to-ship",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/cancel-unpaid",
        Some(Role::CommandsWrite),
    ),
    (Api::Command, "GET", "/healthz", None),
    (Api::Command, "GET", "/readyz", None),
    (Api::Command, "GET", "/owned", None),
    (Api::Command, "GET", "/v1/partitions", Some(Role::Admin)),
    (Api::Command, "GET", "/openapi.json", None),
    // Open unless KEEL_METRICS_ROLE names a role (the stack names none).
    (Api::Command, "GET", "/metrics", None),
    (Api::Query, "GET", "/v1/orders", Some(Role::QueriesRead)),
    (
        Api::Query,
        "GET",
        "/v1/orders/{id}",
        Some(Role::QueriesRead),
    ),
    (Api::Query, "GET", "/v1/products", Some(Role::QueriesRead)),
    (
        Api::Query,
        "GET",
        "/v1/products/{sku}",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/customers/{id}",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/reports/daily-sales",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/reports/flagged-payments",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/audit/streams/{type}/{id}",
        Some(Role::AuditRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/audit/streams/{type}/{id}/state",
        Some(Role::AuditRead),
    ),
    (Api::Query, "GET", "/v1/audit/events", Some(Role::AuditRead)),
    (Api::Query, "GET", "/v1/projections", Some(Role::Admin)),
    (
        Api::Query,
        "POST",
        "/v1/projections/{name}/rebuild",
        Some(Role::Admin),
    ),
    (
        Api::Query,
        "GET",
        "/v1/projections/rebuild-requests/{request}",
        Some(Role::Admin),
    ),
    (
        Api::Query,
        "POST",
        "/v1/projections/{name}/parked/{type}/{id}/retry",
        Some(Role::Admin),
    ),
    (
        Api::Query,
        "POST",
        "/v1/projections/{name}/parked/{type}/{id}/discard",
        Some(Role::Admin),
    ),
    (
        Api::Query,
        "GET",
        "/v1/projections/stream-requests/{request}",
        Some(Role::Admin),
    ),
    (
        Api::Query,
        "POST",
        "/v1/audit/streams/{type}/{id}/verify",
        Some(Role::Admin),
    ),
    (
        Api::Query,
        "GET",
        "/v1/audit/verify-requests/{request}",
        Some(Role::Admin),
    ),
    (Api::Query, "GET", "/healthz", None),
    (Api::Query, "GET", "/readyz", None),
    (Api::Query, "GET", "/openapi.json", None),
    (Api::Query, "GET", "/metrics", None),
];

#[tokio::test]
async fn the_role_table_matches_the_documents_and_holders_get_answers() {
    let stack = Stack::start("sec-roles", 2).await;
    let auth = &stack.config.auth;

    // The table and the documents agree, operation for operation.
    let mut documented = Vec::new();
    for (api, service) in [(Api::Command, &stack.command), (Api::Query, &stack.query)] {
        let contract = Contract::fetch(service).await.unwrap();
        for (method, path, role) in keel_http::testing::operations(contract.doc()) {
            documented.push((api, method, path, role));
        }
    }
    let mut table: Vec<_> = ROUTES
        .iter()
        .map(|(api, m, p, r)| (*api, m.to_string(), p.to_string(), *r))
        .collect();
    documented.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    table.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(
        documented, table,
        "the OpenAPI documents and the role table differ"
    );

    // Each route with no token, no role and each role is checked in process against the
    // routers (command-api routes::tests and query-api routes::openapi::tests).

    // The holder of the role gets real answers, not just "not refused".
    let writer = auth.token("writer", &[Role::CommandsWrite]);
    let created = send(
        "POST",
        &stack.command.url("/v1/products/SEC-OK/register"),
        &bearer(&writer),
        Some(json!({"name": "Mug", "price": eur(100)}).to_string()),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let reader = auth.token("reader", &[Role::QueriesRead]);
    let token = created.body["consistency_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut headers = bearer(&reader);
    headers.push(("keel-consistency-token", token));
    let product = send(
        "GET",
        &stack.query.url("/v1/products/SEC-OK"),
        &headers,
        None,
    )
    .await;
    assert_eq!(product.status, StatusCode::OK, "{}", product.text);
    assert_eq!(product.body["name"], "Mug");
}
