//! RFC 9457 problem documents, shared by the HTTP APIs.

use serde_json::{Value, json};

/// A problem document: `type` is `/problems/<slug>`, `title` the status's reason phrase.
pub fn problem(status: u16, title: &str, slug: &str, detail: &str) -> Value {
    json!({
        "type": format!("/problems/{slug}"),
        "title": title,
        "status": status,
        "detail": detail,
    })
}

/// The media type of problem documents.
pub const PROBLEM_JSON: &str = "application/problem+json";
