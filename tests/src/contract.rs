//! An API's OpenAPI document as a contract to check answers against: the status must be one
//! the operation documents, and a body must match the schema documented for its media type.
//!
//! The schema check covers the JSON Schema keywords Keel's documents use: `type` (one or a
//! list), `properties`, `required`, `additionalProperties: false`, `items`, `minItems`,
//! `maxItems`, `enum`, `minimum`, `maximum`, `minLength`, `maxLength` and `$ref` into
//! `#/components/schemas`. A keyword it does not know fails the check, so a document cannot
//! outgrow it unnoticed.

use reqwest::header::HeaderMap;
use serde_json::Value;

/// Keywords that describe a value without constraining it, or that this check leaves to
/// the server's own tests (`pattern`, `format`).
const ANNOTATIONS: &[&str] = &["description", "format", "pattern", "title", "example"];

/// An OpenAPI document.
#[derive(Clone, Debug)]
pub struct Contract {
    doc: Value,
}

impl Contract {
    /// The contract of `doc`.
    pub fn new(doc: Value) -> Self {
        Self { doc }
    }

    /// The document `service` serves at `/openapi.json` (an open route: no token).
    pub async fn fetch(service: &crate::Service) -> anyhow::Result<Self> {
        let reply = crate::send_raw("GET", &service.url("/openapi.json"), &[], None).await?;
        anyhow::ensure!(
            reply.status.is_success(),
            "GET /openapi.json answered {}",
            reply.status
        );
        Ok(Self::new(serde_json::from_slice(&reply.bytes)?))
    }

    /// The document.
    pub fn doc(&self) -> &Value {
        &self.doc
    }

    /// Every `(method, path template)` the document lists, method in upper case.
    pub fn operations(&self) -> Vec<(String, String)> {
        keel_http::testing::operations(&self.doc)
            .into_iter()
            .map(|(method, path, _)| (method, path))
            .collect()
    }

    /// The operation answering `method` on the concrete `path` (no query string).
    pub fn operation(&self, method: &str, path: &str) -> Option<(&str, &Value)> {
        let segments: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()?
            .iter()
            .find(|(template, _)| {
                let parts: Vec<&str> = template.split('/').collect();
                parts.len() == segments.len()
                    && parts
                        .iter()
                        .zip(&segments)
                        .all(|(t, s)| (t.starts_with('{') && t.ends_with('}')) || t == s)
            })
            .and_then(|(template, item)| {
                item.get(method.to_lowercase())
                    .map(|op| (template.as_str(), op))
            })
    }

    /// Checks an answer to `method path`: a documented status, and a body that matches its
    /// documented schema. An undocumented route may only be refused: 404 or 405, or, when
    /// a path pattern serves it (the command API's `/v1/{collection}/{id}/{command}`), the
    /// edge's 401, 403 and 429 or a 400 for an undecodable path; each as a problem document.
    /// The headers a documented response lists must be there.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let content_type = headers.get("content-type").and_then(|v| v.to_str().ok());
        let Some((template, operation)) = self.operation(method, path) else {
            if ![400, 401, 403, 404, 405, 429].contains(&status) {
                return Err(format!(
                    "{method} {path} is not documented, yet answered {status}"
                ));
            }
            if content_type != Some("application/problem+json") {
                return Err(format!(
                    "{method} {path} answered {status} as {content_type:?}, not a problem"
                ));
            }
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| format!("{method} {path}: the problem is not JSON: {e}"))?;
            let problem = serde_json::json!({"$ref": "#/components/schemas/Problem"});
            return self.validate(&problem, &value, "$");
        };
        let response = &operation["responses"][status.to_string()];
        if response.is_null() {
            return Err(format!(
                "{method} {template} answered {status}, which it does not document"
            ));
        }
        for name in response["headers"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(n, _)| n)
        {
            // Cache validators and tokens are documented where they may appear.
            let always = ["WWW-Authenticate", "Retry-After"];
            if always.contains(&name.as_str()) && !headers.contains_key(name.as_str()) {
                return Err(format!(
                    "{method} {template} answered {status} without its documented {name}"
                ));
            }
        }
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            return Ok(());
        };
        let media = content_type
            .and_then(|c| c.split(';').next())
            .map(str::trim)
            .unwrap_or("");
        let Some(documented) = content.get(media) else {
            return Err(format!(
                "{method} {template} answered {status} as {media:?}; documented: {:?}",
                content.keys().collect::<Vec<_>>()
            ));
        };
        // A text format (the metrics): text, and nothing more to check here.
        if !media.ends_with("json") {
            return std::str::from_utf8(body).map(|_| ()).map_err(|e| {
                format!("{method} {template} answered {status} as {media:?}, not text: {e}")
            });
        }
        let value: Value = serde_json::from_slice(body).map_err(|e| {
            format!("{method} {template} answered {status} with a body that is not JSON: {e}")
        })?;
        self.validate(&documented["schema"], &value, "$")
            .map_err(|e| format!("{method} {template} answered {status}: {e}"))
    }

    /// Checks `value` against `schema`.
    pub fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let Some(schema) = schema.as_object() else {
            return if schema.is_null() || schema == &Value::Bool(true) {
                Ok(())
            } else {
                Err(format!("{at}: unusable schema {schema}"))
            };
        };
        for (keyword, rule) in schema {
            match keyword.as_str() {
                "$ref" => {
                    let name = rule
                        .as_str()
                        .and_then(|r| r.strip_prefix("#/components/schemas/"))
                        .ok_or_else(|| format!("{at}: unsupported $ref {rule}"))?;
                    let target = &self.doc["components"]["schemas"][name];
                    if target.is_null() {
                        return Err(format!("{at}: $ref to a missing schema {name}"));
                    }
                    self.validate(target, value, at)?;
                }
                "type" => {
                    let types: Vec<&str> = match rule {
                        Value::String(t) => vec![t.as_str()],
                        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                        _ => return Err(format!("{at}: unusable type {rule}")),
                    };
                    if !types.iter().any(|t| is_type(value, t)) {
                        return Err(format!("{at}: {value} is not of type {rule}"));
                    }
                }
                "properties" => {
                    if let (Some(object), Some(properties)) = (value.as_object(), rule.as_object())
                    {
                        for (name, property) in properties {
                            if let Some(v) = object.get(name) {
                                self.validate(property, v, &format!("{at}.{name}"))?;
                            }
                        }
                    }
                }
                "required" => {
                    if let Some(object) = value.as_object() {
                        for name in rule
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                        {
                            if !object.contains_key(name) {
                                return Err(format!("{at}: the required {name} is missing"));
                            }
                        }
                    }
                }
                "additionalProperties" => {
                    if rule == &Value::Bool(false)
                        && let Some(object) = value.as_object()
                    {
                        let known = schema.get("properties").and_then(Value::as_object);
                        if let Some(extra) = object
                            .keys()
                            .find(|k| !known.is_some_and(|p| p.contains_key(*k)))
                        {
                            return Err(format!("{at}: {extra} is not allowed"));
                        }
                    }
                }
                "items" => {
                    for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                        self.validate(rule, item, &format!("{at}[{i}]"))?;
                    }
                }
                "enum" => {
                    if !rule
                        .as_array()
                        .is_some_and(|options| options.contains(value))
                    {
                        return Err(format!("{at}: {value} is not one of {rule}"));
                    }
                }
                "minItems" | "maxItems" | "minLength" | "maxLength" | "minimum" | "maximum" => {
                    let bound = rule
                        .as_f64()
                        .ok_or_else(|| format!("{at}: unusable {keyword}"))?;
                    let measured = match keyword.as_str() {
                        "minItems" | "maxItems" => value.as_array().map(|a| a.len() as f64),
                        "minLength" | "maxLength" => {
                            value.as_str().map(|s| s.chars().count() as f64)
                        }
                        _ => value.as_f64(),
                    };
                    if let Some(m) = measured {
                        let ok = if keyword.starts_with("min") {
                            m >= bound
                        } else {
                            m <= bound
                        };
                        if !ok {
                            return Err(format!("{at}: {value} breaks {keyword} {bound}"));
                        }
                    }
                }
                other if ANNOTATIONS.contains(&other) => {}
                other => return Err(format!("{at}: the contract check does not know {other}")),
            }
        }
        Ok(())
    }
}

fn is_type(value: &Value, t: &str) -> bool {
    match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn contract() -> Contract {
        Contract::new(json!({
            "paths": {"/v1/things/{id}": {"get": {"responses": {
                "200": {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Thing"}}}},
                "404": {"description": "none"},
                "429": {"headers": {"Retry-After": {"schema": {"type": "integer"}}}}}}}},
            "components": {"schemas": {"Problem": {"type": "object"}, "Thing": {"type": "object", "additionalProperties": false,
                "required": ["id"], "properties": {"id": {"type": "string", "maxLength": 3},
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                "n": {"type": ["integer", "null"], "minimum": 0}}}}}
        }))
    }

    fn headers(content_type: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", content_type.parse().unwrap());
        headers
    }

    fn check(status: u16, body: Value) -> Result<(), String> {
        contract().check(
            "GET",
            "/v1/things/a",
            status,
            &headers("application/json"),
            body.to_string().as_bytes(),
        )
    }

    #[test]
    fn conforming_answers_pass() {
        assert_eq!(
            check(200, json!({"id": "a", "tags": ["x"], "n": null})),
            Ok(())
        );
        assert_eq!(check(404, json!({})), Ok(()));
        let mut limited = headers("application/json");
        limited.insert("retry-after", "1".parse().unwrap());
        assert_eq!(
            contract().check("GET", "/v1/things/a", 429, &limited, b"{}"),
            Ok(())
        );
        let problem = br#"{"status": 404, "title": "Not Found"}"#;
        assert_eq!(
            contract().check(
                "GET",
                "/v1/nothing",
                404,
                &headers("application/problem+json"),
                problem
            ),
            Ok(())
        );
    }

    #[test]
    fn every_breach_is_caught() {
        for (status, body) in [
            (500, json!({})),
            (200, json!({})),
            (200, json!({"id": 1})),
            (200, json!({"id": "long"})),
            (200, json!({"id": "a", "extra": 1})),
            (200, json!({"id": "a", "tags": [1]})),
            (200, json!({"id": "a", "tags": ["a", "b", "c"]})),
            (200, json!({"id": "a", "n": -1})),
            (429, json!({})),
        ] {
            assert!(check(status, body.clone()).is_err(), "{status} {body}");
        }
        assert!(
            contract()
                .check("GET", "/v1/nothing", 200, &HeaderMap::new(), b"")
                .is_err()
        );
        assert!(
            contract()
                .check("GET", "/v1/nothing", 404, &headers("text/plain"), b"no")
                .is_err()
        );
        assert!(
            contract()
                .check("GET", "/v1/things/a", 200, &headers("text/plain"), b"x")
                .is_err()
        );
    }
}
