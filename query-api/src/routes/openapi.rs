//! The OpenAPI document of the query API; `query-api/openapi.json` is the checked-in copy,
//! compared by a test, and every path in it is checked to be routed.

use axum::Json;
use keel_domain::order::OrderStatus;
use keel_http::Role;
use serde_json::{Value, json};

fn get(summary: &str, params: Value, cacheable: bool, role: Role) -> Value {
    let mut responses = json!({
        "200": {"description": "the view, as of the position in Keel-Projection-Position",
                "headers": {"ETag": {"schema": {"type": "string"}},
                            "Keel-Projection-Position": {"schema": {"type": "string"},
                                "description": "how far the view has read, as a consistency token"},
                            "Keel-Held-Back": {"schema": {"type": "integer", "minimum": 1},
                                "description": "present when parked streams are held back from the answer: 1 for a read of a parked stream, or the parked streams a list or report leaves out (GET /v1/projections names them)"}},
                "content": {"application/json": {"schema": {"type": "object"}}}},
        "400": {"description": "a malformed parameter, cursor or consistency token",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
        "404": {"description": "no such resource",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}},
        "503": {"description": "the view did not reach the consistency token in time, or is not built yet, or the token covers a record a parked stream holds back (the problem names it); retry after Retry-After",
                "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
    });
    if cacheable {
        responses["304"] = json!({"description": "If-None-Match matched the ETag"});
    }
    let mut parameters = params.as_array().cloned().unwrap_or_default();
    for header in [
        json!({"name": "Keel-Consistency-Token", "in": "header",
               "schema": {"type": "string", "pattern": "^(v1\\.[A-Za-z0-9_-]{1,4093})?(, ?v1\\.[A-Za-z0-9_-]{1,4093})*$"},
               "description": "wait until the view has passed this token (from a command response; opaque, at most 4096 characters; empty: no wait). Several tokens: repeat the header or separate them with commas; the query waits for all. A token naming a topic or partition this deployment does not have is 400"}),
        json!({"name": "Keel-Consistency-Timeout", "in": "header", "schema": {"type": "integer", "minimum": 0},
               "description": "how long to wait for the token, in milliseconds (default 5000; longer than 30000 waits 30000)"}),
        json!({"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}),
    ] {
        parameters.push(header);
    }
    let mut item =
        json!({"get": {"summary": summary, "parameters": parameters, "responses": responses}});
    keel_http::openapi::secure(&mut item["get"], role);
    item
}

fn open(description: &str, not_ready: bool) -> Value {
    let mut item = json!({"get": {"responses": {"200": {"description": description}}}});
    if not_ready {
        item["get"]["responses"]["503"] = json!({"description": "not ready",
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}});
    }
    keel_http::openapi::open(&mut item["get"]);
    item
}

/// Free text in a path or query: any string PostgreSQL can hold, so no NUL (a NUL is
/// refused with 400).
fn text() -> Value {
    json!({"type": "string", "pattern": "^[^\\u0000]*$"})
}

fn path_param(name: &str) -> Value {
    json!({"name": name, "in": "path", "required": true, "schema": text()})
}

fn query_param(name: &str, description: &str) -> Value {
    query(name, text(), description)
}

fn query(name: &str, schema: Value, description: &str) -> Value {
    json!({"name": name, "in": "query", "schema": schema, "description": description})
}

fn enumerated(values: &[&str]) -> Value {
    json!({"type": "string", "enum": values})
}

fn projections() -> Value {
    let mut item = json!({"get": {
        "summary": "each projection's generation, state, events, dead letters, checkpoints and rebuild in progress",
        "responses": {
            "200": {"description": "the projections",
                    "content": {"application/json": {"schema": {"type": "object", "required": ["projections"],
                        "properties": {"projections": {"type": "array"}}}}}},
            "503": {"description": "the database is not reachable",
                    "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}}}});
    keel_http::openapi::secure(&mut item["get"], Role::Admin);
    item
}

fn problem(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// A request id in a path: a whole number from 1.
fn request_param() -> Value {
    json!({"name": "request", "in": "path", "required": true,
           "schema": {"type": "integer", "minimum": 1, "maximum": i64::MAX}})
}

/// The name of a projection in a path.
fn projection_param() -> Value {
    let names: Vec<&str> = keel_views::PROJECTIONS.iter().map(|p| p.name).collect();
    json!({"name": "name", "in": "path", "required": true, "schema": enumerated(&names)})
}

/// An admin route that records a request for a projector process to carry out: 202 with
/// where to follow it.
fn request_work(summary: &str, params: Value, body: Value, not_found: &str) -> Value {
    let mut item = json!({"post": {
    "summary": summary,
    "parameters": params,
    "requestBody": {"required": true, "content": {"application/json": {"schema": body}}},
    "responses": {
        "202": {"description": "recorded, with its actor (the token's subject); a running `projector run` process carries it out. Follow it at Location",
                "headers": {"Location": {"schema": {"type": "string"}, "description": "where the request's state is served"}},
                "content": {"application/json": {"schema": {"type": "object", "required": ["id", "state"]}}}},
        "400": problem("a body that is not the documented object"),
        "404": problem(not_found),
        "409": problem("a rebuild of the same generation is already waiting with another keep_old"),
        "413": problem("a body larger than 16 KiB"),
        "415": problem("a request not declared application/json (send `{}` where nothing needs saying)"),
        "503": problem("the database is not reachable, or the query API's database role may not record requests (no Retry-After: the problem names the grants it needs)")
    }}});
    keel_http::openapi::secure(&mut item["post"], Role::Admin);
    item
}

/// How a request stands: served until it is deleted with its generation.
fn request_state(summary: &str) -> Value {
    let mut item = json!({"get": {
    "summary": summary,
    "parameters": [request_param()],
    "responses": {
        "200": {"description": "the request: state (waiting, running, done or failed), actor, times, and once done whether it succeeded and its outcome",
                "content": {"application/json": {"schema": {"type": "object", "required": ["id", "state"]}}}},
        "404": problem("no such request"),
        "503": problem("the database is not reachable")
    }}});
    keel_http::openapi::secure(&mut item["get"], Role::Admin);
    item
}

/// The OpenAPI 3.1 document of the query API.
pub fn document() -> Value {
    let page = || {
        vec![
            query(
                "limit",
                json!({"type": "integer", "minimum": 1}),
                "page size: default 50; larger than 500 is served as 500",
            ),
            query(
                "cursor",
                json!({"type": "string", "pattern": "^[A-Za-z0-9_-]+$"}),
                "next_cursor of the previous page (opaque)",
            ),
        ]
    };
    let order_statuses = OrderStatus::ALL.map(OrderStatus::as_str);
    let mut orders = vec![
        query_param("customer_id", "only this customer's orders"),
        query(
            "status",
            enumerated(&order_statuses),
            "only orders in this status",
        ),
    ];
    orders.extend(page());
    let mut products = vec![query(
        "status",
        enumerated(&keel_views::PRODUCT_STATUSES),
        "only products in this status",
    )];
    products.extend(page());
    let stream = || {
        vec![
            json!({"name": "type", "in": "path", "required": true, "schema": enumerated(&keel_domain::STREAM_TYPES)}),
            path_param("id"),
        ]
    };
    let time = |name: &str, description: &str| {
        query(
            name,
            json!({"type": "string", "format": "date-time"}),
            description,
        )
    };
    let mut history = stream();
    history.extend(page());
    let mut search = vec![
        query(
            "stream_type",
            enumerated(&keel_domain::STREAM_TYPES),
            "only events of this stream type",
        ),
        query_param("event_type", "e.g. OrderPlaced"),
        query_param("actor", "who sent the command"),
        time("from", "recorded at or after, RFC 3339"),
        time("to", "recorded before, RFC 3339"),
    ];
    search.extend(page());
    let mut as_of = stream();
    as_of.push(query(
        "version",
        json!({"type": "integer", "minimum": 1}),
        "the state after this version (from 1); not with `at`",
    ));
    as_of.push(time(
        "at",
        "the state as it was at this RFC 3339 time; not with `version`; neither: the current state",
    ));
    let day = |name: &str, description: &str| {
        query(
            name,
            json!({"type": "string", "format": "date"}),
            description,
        )
    };
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Keel query API", "version": env!("CARGO_PKG_VERSION")},
        "paths": {
            "/v1/orders": get("orders, by order id", json!(orders), true, Role::QueriesRead),
            "/v1/orders/{id}": get("one order", json!([path_param("id")]), true, Role::QueriesRead),
            "/v1/products": get("the catalogue, by SKU", json!(products), true, Role::QueriesRead),
            "/v1/products/{sku}": get("one product", json!([path_param("sku")]), true, Role::QueriesRead),
            "/v1/customers/{id}": get("one customer", json!([path_param("id")]), true, Role::QueriesRead),
            "/v1/reports/daily-sales": get("sales per day and currency", json!([
                day("from", "first day, YYYY-MM-DD"), day("to", "last day, YYYY-MM-DD"),
                query("currency", json!({"type": "string", "pattern": "^[A-Z]{3}$"}), "only this currency (ISO 4217)")]), true, Role::QueriesRead),
            "/v1/reports/flagged-payments": get("payments of 10,000.00 or more", json!(page()), true, Role::QueriesRead),
            "/v1/audit/streams/{type}/{id}": get(
                "a stream's history in version order: events, actors, command, correlation and causation ids, \
                 times, positions, hashes and signatures", json!(history), true, Role::AuditRead),
            "/v1/audit/streams/{type}/{id}/state": get(
                "a stream's state as of a version or a time, folded with the domain's own evolve", json!(as_of), true, Role::AuditRead),
            "/v1/audit/events": get("search the audit log, in recorded order", json!(search), true, Role::AuditRead),
            "/v1/projections": projections(),
            "/v1/projections/{name}/rebuild": request_work(
                "rebuild a projection blue/green: a projector process running it builds a new generation from the log and swaps it in. Asking again while the same rebuild waits answers with the waiting request",
                json!([projection_param()]),
                json!({"type": "object", "additionalProperties": false, "properties": {
                    "keep_old": {"type": "boolean", "default": false,
                                 "description": "keep the replaced generation's tables after the swap"}}}),
                "no such projection"),
            "/v1/projections/rebuild-requests/{request}": request_state("a rebuild request (the rebuild's progress is in GET /v1/projections)"),
            "/v1/projections/{name}/parked/{type}/{id}/retry": request_work(
                "apply a parked stream's held-back records again, in order, once, with the code running now",
                json!([projection_param(), stream()[0].clone(), path_param("id")]),
                json!({"type": "object", "additionalProperties": false}),
                "no such projection, or it does not hold back the stream"),
            "/v1/projections/{name}/parked/{type}/{id}/discard": request_work(
                "drop a parked stream's held-back records from the view, recording the reason",
                json!([projection_param(), stream()[0].clone(), path_param("id")]),
                json!({"type": "object", "additionalProperties": false, "required": ["reason"], "properties": {
                    "reason": {"type": "string", "minLength": 1, "maxLength": super::admin::MAX_REASON,
                               "pattern": "^[^\\u0000]*[^\\u0000 \\t\\r\\n][^\\u0000]*$",
                               "description": "why, recorded with the discarded records: not only blanks"}}}),
                "no such projection, or it does not hold back the stream"),
            "/v1/projections/stream-requests/{request}": request_state("a retry or discard request and what came of it"),
            "/v1/audit/streams/{type}/{id}/verify": request_work(
                "verify one stream against the log: versions, hash chain, hashes, signatures, and that the topic holds every commit the audit log has seen",
                json!([stream()[0].clone(), {"name": "id", "in": "path", "required": true,
                        "schema": {"type": "string", "minLength": 1, "pattern": "^[^\\u0000]*$"}}]),
                json!({"type": "object", "additionalProperties": false}),
                "no such stream type"),
            "/v1/audit/verify-requests/{request}": request_state("a verify request and, once done, its report (as `projector verify --json` prints it)"),
            "/healthz": open("the process is alive", false),
            "/readyz": open("the database answers and the views exist", true),
            "/openapi.json": open("this document", false),
            "/metrics": keel_http::openapi::metrics_path()
        },
        "components": {"securitySchemes": keel_http::openapi::security_schemes(), "schemas": {"Problem": {"type": "object", "properties": {
            "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
            "detail": {"type": "string"}, "field": {"type": "string"}, "request_id": {"type": "string"}}}}}
    })
}

/// `GET /openapi.json`.
pub(super) async fn serve() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::routes::{concrete, router_without_database};

    /// The checked-in document is the generated one. `KEEL_UPDATE_OPENAPI=1 cargo test`
    /// rewrites it after a deliberate change.
    #[test]
    fn the_checked_in_document_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
        let generated = serde_json::to_string_pretty(&document()).unwrap() + "\n";
        if std::env::var_os("KEEL_UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).unwrap();
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "query-api/openapi.json is out of date: run KEEL_UPDATE_OPENAPI=1 cargo test -p query-api"
        );
    }

    /// Every documented path is routed: with no database behind it, a routed path answers
    /// anything but the fallback's 404.
    #[tokio::test]
    async fn every_documented_path_is_routed() {
        let router = router_without_database(|n| (n == "KEEL_AUTH").then(|| "off".into()));
        let doc = document();
        for path in doc["paths"].as_object().unwrap().keys() {
            let uri = concrete(path);
            let request = Request::builder().uri(&uri).body(Body::empty()).unwrap();
            let response = router.clone().oneshot(request).await.unwrap();
            assert_ne!(
                response.status(),
                StatusCode::NOT_FOUND,
                "GET {uri} is not routed"
            );
        }
        let request = Request::builder()
            .uri("/v1/nothing")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            router.oneshot(request).await.unwrap().status(),
            StatusCode::NOT_FOUND
        );
    }

    /// Every operation of the document, without a token, with a token of no role and with a
    /// token of each role: 401, 403 naming the role, or through the edge, as the document
    /// says (no database behind it: the edge answers before any handler reads one).
    #[tokio::test]
    async fn every_role_against_every_route() {
        const SECRET: &[u8] = b"an-in-process-test-secret-of-32-bytes";
        let router = router_without_database(|n| {
            (n == "KEEL_AUTH_HS256_SECRET").then(|| String::from_utf8_lossy(SECRET).into_owned())
        });
        let doc = document();
        let sent = keel_http::testing::check_role_matrix(&doc, &router, SECRET, concrete).await;
        let operations = doc["paths"].as_object().unwrap().len();
        assert_eq!(sent, operations * (Role::ALL.len() + 2));
    }
}
