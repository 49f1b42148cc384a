//! The OpenAPI document, generated from the command catalogue so it cannot drift from the
//! routes; `command-api/openapi.json` is the checked-in copy, compared by a test.

use axum::Json;
use serde_json::{Map, Value, json};

use keel_http::Role;

use crate::commands::CATALOGUE;

fn problem(description: &str) -> Value {
    json!({"description": description,
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// A header recorded in the commit: 1 to 255 visible ASCII characters, the first and last
/// not a space (HTTP drops spaces at either end).
fn recorded_header() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[!-~]([ -~]*[!-~])?$"})
}

/// The OpenAPI 3.1 document of the command API.
pub fn document() -> Value {
    let mut paths = Map::new();
    for spec in CATALOGUE {
        let path = format!("/v1/{}/{{id}}/{}", spec.collection, spec.name);
        let success = if spec.creates { "201" } else { "200" };
        let mut responses = Map::new();
        responses.insert(
            success.into(),
            json!({"description": "accepted: the commit is in the log and every reader applies it",
                   "headers": {"ETag": {"schema": {"type": "string"}, "description": "the stream version, quoted"},
                               "Keel-Consistency-Token": {"schema": {"type": "string"}},
                               "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]},
                                                       "description": "present when answering a retry"}},
                   "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CommandResult"}}}}),
        );
        if spec.creates {
            // What a client can do next with the stream it made: each other command of the
            // collection, on the same id.
            let links: Map<String, Value> = CATALOGUE
                .iter()
                .filter(|other| other.collection == spec.collection && !other.creates)
                .map(|other| {
                    let id = format!("{}-{}", other.collection, other.name);
                    (
                        id.clone(),
                        json!({"operationId": id, "parameters": {"id": "$request.path.id"}}),
                    )
                })
                .collect();
            responses[success]["links"] = Value::Object(links);
            responses.insert("200".into(), json!({"description": "the command changed nothing",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CommandResult"}}}}));
        }
        for (code, description) in [
            ("400", "malformed JSON or header"),
            (
                "404",
                "unknown collection or command, or the stream does not exist",
            ),
            ("409", "a domain rule was broken; `rule` names it"),
            ("412", "If-Match names another version"),
            ("413", "body over 64 KiB"),
            ("415", "body is not JSON"),
            (
                "422",
                "invalid fields, each named in `errors`; or an Idempotency-Key reused with another body",
            ),
            (
                "503",
                "not ready, or this instance does not own the partition; retry after Retry-After",
            ),
        ] {
            responses.insert(code.into(), problem(description));
        }
        let schema = (spec.schema)();
        // An empty body reads as `{}`: needed only when the command has required fields.
        let requires_body = schema["required"].as_array().is_some_and(|r| !r.is_empty());
        let mut item = json!({"post": {
                "operationId": format!("{}-{}", spec.collection, spec.name),
                "summary": spec.command_type,
                "parameters": [
                    {"name": "id", "in": "path", "required": true, "schema": crate::commands::id_schema(),
                     "description": "the stream id: 1 to 128 of A-Z a-z 0-9 . _ ~ -, not starting with a dot"},
                    {"name": "X-Correlation-Id", "in": "header", "schema": recorded_header(),
                     "description": "recorded in the commit; a new one when absent"},
                    {"name": "X-Causation-Id", "in": "header", "schema": recorded_header(),
                     "description": "recorded in the commit"},
                    {"name": "If-Match", "in": "header",
                     "schema": {"type": "string", "pattern": "^(\"[0-9]{1,18}\"|[0-9]{1,18})$"},
                     "description": "\"<version>\": apply only if the stream is at this version (else 412)"},
                    {"name": "Idempotency-Key", "in": "header", "schema": recorded_header(),
                     "description": "a retry with the same key and body returns the original response"}
                ],
                "requestBody": {"required": requires_body, "content": {"application/json": {"schema": schema}}},
                "responses": responses
        }});
        keel_http::openapi::secure(&mut item["post"], Role::CommandsWrite);
        paths.insert(path, item);
    }
    for (path, description) in [
        ("/healthz", "the process is alive"),
        (
            "/readyz",
            "200 when this instance takes commands for every partition (it serves each one it owns and knows the owner of each other one), else 503 naming those it cannot",
        ),
        (
            "/owned",
            "the partitions this instance serves: `{url, serving: [[topic, partition]…]}`, for the other instances of its group to forward commands by",
        ),
        ("/openapi.json", "this document"),
    ] {
        let mut item = json!({"get": {"responses": {"200": {"description": description}}}});
        keel_http::openapi::open(&mut item["get"]);
        paths.insert(path.into(), item);
    }
    paths.insert("/metrics".into(), keel_http::openapi::metrics_path());
    let mut partitions = json!({"get": {
        "summary": "Every partition's owner as this instance sees it, and the group",
        "description": "Each partition with the URL of the instance that owns it; for this instance's own, the writer, epoch and state (starting, serving, recovering, lost). The group: its state, members and their partition counts.",
        "responses": {"200": {"description": "the partitions", "content": {"application/json": {"schema": {"type": "object"}}}}}
    }});
    keel_http::openapi::secure(&mut partitions["get"], Role::Admin);
    paths.insert("/v1/partitions".into(), partitions);
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Keel command API", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {"securitySchemes": keel_http::openapi::security_schemes(), "schemas": {
            "CommandResult": {"type": "object", "required": ["stream", "version", "events"], "properties": {
                "stream": {"type": "object", "properties": {"type": {"type": "string"}, "id": {"type": "string"}}},
                "version": {"type": "integer"},
                "events": {"type": "array", "items": {"type": "object", "properties": {
                    "event_id": {"type": "string", "format": "uuid"}, "type": {"type": "string"}, "version": {"type": "integer"}}}},
                "consistency_token": {"type": ["string", "null"]}}},
            "Problem": {"type": "object", "properties": {
                "type": {"type": "string"}, "title": {"type": "string"}, "status": {"type": "integer"},
                "detail": {"type": "string"}, "rule": {"type": "string"},
                "errors": {"type": "array", "items": {"type": "object", "properties": {
                    "field": {"type": "string"}, "reason": {"type": "string"}}}},
                "request_id": {"type": "string"}}}
        }}
    })
}

/// `GET /openapi.json`.
pub(super) async fn serve() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    use super::*;
    use crate::routes::{AppState, Owners, app};

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
            "command-api/openapi.json is out of date: run KEEL_UPDATE_OPENAPI=1 cargo test -p command-api"
        );
    }

    /// Every operation of the document is routed, and reaches its body parser.
    #[tokio::test]
    async fn every_documented_operation_is_routed() {
        let state = AppState {
            owners: Arc::new(Owners::default()),
            cluster: None,
            instance: "test".into(),
            topics: super::super::topics("t"),
            partitions: 1,
            request_timeout: Duration::from_secs(1),
            telemetry: Default::default(),
        };
        let open = keel_http::EdgeSettings::from_vars(|n| (n == "KEEL_AUTH").then(|| "off".into()));
        let edge = keel_http::Edge::new(&open.unwrap(), "test").unwrap();
        let state = state.exporting(&edge);
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        assert_eq!(paths.len(), CATALOGUE.len() + 6);
        for (path, item) in paths {
            let (method, uri, body) = if item.get("post").is_some() {
                ("POST", path.replace("{id}", "x-1"), r#"{"not_a_field": 1}"#)
            } else {
                ("GET", path.clone(), "")
            };
            let request = Request::builder()
                .method(method)
                .uri(&uri)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap();
            let response = app(state.clone(), &edge).oneshot(request).await.unwrap();
            let expected = match (method, uri.as_str()) {
                ("POST", _) => StatusCode::UNPROCESSABLE_ENTITY,
                // No owner runs here, and there is no group to forward to.
                (_, "/readyz") => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::OK,
            };
            assert_eq!(response.status(), expected, "{method} {uri}");
        }
    }
}
