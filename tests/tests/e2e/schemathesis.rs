//! schemathesis (from PyPI; the version is pinned in `scripts/common.sh`, which installs it
//! into a virtual environment beside the build cache) with all of its checks, against both
//! APIs' OpenAPI documents on the running stack: requests a document allows are accepted,
//! requests it forbids are refused, and every answer is one the document describes. The
//! few places where a document cannot say what the handler rightly does are in
//! `tests/schemathesis.toml`, each with its reason.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_http::Role;
use keel_tests::{Service, Stack, eur};
use serde_json::json;

/// Test cases per operation, in each phase that generates them.
const EXAMPLES_PER_OPERATION: &str = "60";
/// The whole run against one API is stopped after this long.
const BOUND: Duration = Duration::from_secs(600);

/// The `st` executable: `KEEL_SCHEMATHESIS`, else where `make test` installs it.
fn schemathesis() -> PathBuf {
    let path = std::env::var_os("KEEL_SCHEMATHESIS")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home).join(".cargo/keel-schemathesis/bin/st")
        });
    assert!(
        path.is_file(),
        "schemathesis is not at {}: `make test` installs it (scripts/common.sh, ensure_schemathesis)",
        path.display()
    );
    path
}

/// Runs schemathesis against `service`'s document; panics with its report on any finding.
async fn run(st: &Path, service: &Service, api: &str, token: &str, consistency: &str) {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    let report =
        std::env::temp_dir().join(format!("keel-schemathesis-{api}-{}", std::process::id()));
    // schemathesis keeps a cache in its working directory: the report's, not the clone.
    std::fs::create_dir_all(&report).expect("a report directory");
    let mut command = tokio::process::Command::new(st);
    command.current_dir(&report);
    command
        .args(["--config-file", config, "--no-color", "run"])
        .arg(service.url("/openapi.json"))
        .args(["--checks", "all", "--workers", "1"])
        .args(["--max-examples", EXAMPLES_PER_OPERATION])
        .args(["--request-timeout", "40"])
        .arg("--report-dir")
        .arg(&report)
        .env("NO_COLOR", "1")
        .env("KEEL_TEST_TOKEN", token)
        .env("KEEL_TEST_CONSISTENCY_TOKEN", consistency)
        .env("PYTHONPATH", env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Ok(seed) = std::env::var("KEEL_SCHEMATHESIS_SEED") {
        command.args(["--seed", &seed]);
    }
    let output = tokio::time::timeout(BOUND, command.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis against the {api} API ran over {BOUND:?}"))
        .expect("schemathesis starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "schemathesis found problems in the {api} API ({}):\n{stdout}\n{stderr}",
        output.status
    );
    // A run that tested nothing would also succeed.
    assert!(
        stdout.contains("passed") && !stdout.contains("No operations"),
        "schemathesis tested nothing in the {api} API:\n{stdout}\n{stderr}"
    );
    // The summary, for the test's log: what was generated, and any warning.
    let summary = stdout
        .lines()
        .skip_while(|l| !l.contains("WARNINGS") && !l.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("schemathesis, {api} API:\n{summary}");
    let _ = std::fs::remove_dir_all(&report);
}

#[tokio::test]
async fn schemathesis_finds_nothing_in_either_api() {
    let st = schemathesis();
    let stack = Stack::start("schemathesis", 2).await;
    let token = stack.config.auth.token("schemathesis", &Role::ALL);
    // A consistency token of a real command, for the hooks to send where the document's
    // opaque token goes.
    let (status, body, consistency) = stack
        .post(
            "/v1/products/st-1/register",
            json!({"name": "Mug", "price": eur(1299)}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let consistency = consistency.expect("a consistency token").encode();
    run(&st, &stack.command, "command", &token, &consistency).await;
    run(&st, &stack.query, "query", &token, &consistency).await;
}
