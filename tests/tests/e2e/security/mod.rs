//! Security through HTTP against running services: the role table, token failures and
//! rate limits, hostile input, TLS, rotating public keys, and logs free of secrets. (Each
//! role against each route runs in process: the APIs' own router tests.)

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::path::Path;

use keel_tests::{send_raw, unique_prefix};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::Value;

mod edge;
mod hostile;
mod keys;
mod logs;
mod roles;
mod tls;

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
    text: String,
}

/// Sends a request with exactly the headers given (no default token).
async fn send(method: &str, url: &str, headers: &[(&str, String)], body: Option<String>) -> Answer {
    let mut all = headers.to_vec();
    if body.is_some() {
        all.push(("content-type", "application/json".to_owned()));
    }
    let reply = send_raw(method, url, &all, body.map(String::into_bytes))
        .await
        .unwrap();
    Answer {
        status: reply.status,
        body: reply.json(),
        text: reply.text(),
        headers: reply.headers,
    }
}

/// Request headers, as sent.
type Headers = Vec<(&'static str, String)>;

fn bearer(token: &str) -> Headers {
    vec![("authorization", format!("Bearer {token}"))]
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("running openssl (Debian package openssl)");
    assert!(status.success(), "openssl {args:?}");
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(unique_prefix(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
