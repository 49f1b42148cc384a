//! The OpenAPI parts of the edge, shared by both APIs' documents: the bearer scheme, each
//! operation's role, and the answers the edge itself gives (401, 403, 429, 503).

use serde_json::{Value, json};

use crate::auth::Role;

fn problem(description: &str, headers: Value) -> Value {
    json!({"description": description, "headers": headers,
           "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}})
}

/// `components.securitySchemes` of both documents.
pub fn security_schemes() -> Value {
    json!({"bearer": {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "A JWT signed with the configured HS256 secret or an RS256/ES256 key of \
                        KEEL_AUTH_JWKS_FILE, with exp, sub, iss and aud; its `roles` claim lists \
                        the roles it grants (commands:write, queries:read, audit:read, admin). \
                        The sub is recorded as the actor of every command."
    }})
}

/// Marks `operation` (an OpenAPI operation object) as needing a bearer token with `role`,
/// and documents the edge's own answers.
pub fn secure(operation: &mut Value, role: Role) {
    operation["security"] = json!([{ "bearer": [role.as_str()] }]);
    let www = json!({"WWW-Authenticate": {"schema": {"type": "string"},
                     "description": "the Bearer challenge (RFC 6750)"}});
    let retry = json!({"Retry-After": {"schema": {"type": "integer"},
                       "description": "seconds to wait before retrying"}});
    let responses = &mut operation["responses"];
    responses["401"] = problem(
        "no bearer token, or one that is malformed, expired, for another audience or issuer, \
         or not signed by a trusted key",
        www.clone(),
    );
    responses["403"] = problem(&format!("the token does not hold the role {role}"), www);
    responses["429"] = problem(
        "the token's subject sent more requests than its rate allows",
        retry.clone(),
    );
    let unavailable = responses
        .get("503")
        .and_then(|r| r["description"].as_str())
        .map(str::to_owned);
    responses["503"] = problem(
        &match unavailable {
            Some(d) => format!("{d}; or too many requests in flight, or the request timed out"),
            None => {
                "too many requests in flight, or the request timed out; retry after Retry-After"
                    .into()
            }
        },
        retry,
    );
}

/// Marks `operation` as open: no token needed.
pub fn open(operation: &mut Value) {
    operation["security"] = json!([]);
}

/// The `/metrics` path item of both documents: open by default, like `/healthz`.
pub fn metrics_path() -> Value {
    let mut item = json!({"get": {
        "summary": "The process's metrics, in the Prometheus text format",
        "description": "Every `keel_` metric of the process and the standard `process_` ones \
                        (CPU, memory, open descriptors), for Prometheus to scrape. Open unless \
                        KEEL_METRICS_ROLE names the role a token needs to read it.",
        "responses": {"200": {"description": "the metrics", "content": {
            "text/plain": {"schema": {"type": "string"}}
        }}}
    }});
    open(&mut item["get"]);
    item
}
