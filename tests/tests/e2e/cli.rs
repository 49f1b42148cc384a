//! Every binary explains its options and the environment variable behind each, and never
//! shows a secret's value in its help.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::process::Command;

use keel_tests::workspace_binary;

fn help(binary: &str) -> String {
    let out = Command::new(workspace_binary(binary).unwrap())
        .arg("--help")
        .env(
            "KEEL_AUTH_HS256_SECRET",
            "a-secret-value-nobody-may-see-in-help",
        )
        .env("KEEL_DATABASE_URL", "postgres://keel:a-password@db/keel")
        .output()
        .unwrap();
    assert!(out.status.success(), "{binary} --help");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_binary_lists_its_options_with_their_environment_variables() {
    let kafka = [
        "KEEL_KAFKA_BROKERS",
        "KEEL_TOPIC_PREFIX",
        "KEEL_PARTITIONS",
        "KEEL_REPLICATION_FACTOR",
        "KEEL_KAFKA_TIMEOUT_MS",
    ];
    let edge = [
        "KEEL_AUTH",
        "KEEL_AUTH_HS256_SECRET",
        "KEEL_AUTH_HS256_SECRET_FILE",
        "KEEL_AUTH_JWKS_FILE",
        "KEEL_AUTH_ISSUER",
        "KEEL_AUTH_AUDIENCE",
        "KEEL_AUTH_LEEWAY_SECS",
        "KEEL_RATE_LIMIT_RPS",
        "KEEL_RATE_LIMIT_BURST",
        "KEEL_HTTP_MAX_IN_FLIGHT",
        "KEEL_HTTP_TIMEOUT_MS",
        "KEEL_HTTP_HEADER_TIMEOUT_MS",
        "KEEL_TLS_CERT",
        "KEEL_TLS_KEY",
    ];
    let expected: [(&str, Vec<&str>); 3] = [
        (
            "command-api",
            [
                &kafka[..],
                &edge[..],
                &[
                    "KEEL_COMMAND_ADDR",
                    "KEEL_INSTANCE",
                    "KEEL_REQUEST_TIMEOUT_MS",
                    "KEEL_SIGNING_KEY_FILE",
                    "KEEL_TRUSTED_KEYS_FILE",
                ],
            ]
            .concat(),
        ),
        (
            "query-api",
            [&edge[..], &["KEEL_QUERY_ADDR", "KEEL_DATABASE_URL"]].concat(),
        ),
        (
            "projector",
            [
                &kafka[..],
                &[
                    "KEEL_DATABASE_URL",
                    "KEEL_BATCH_SIZE",
                    "KEEL_BATCH_LINGER_MS",
                    "KEEL_GATE_SNAPSHOT_EVERY",
                    "KEEL_TRUSTED_KEYS_FILE",
                ],
            ]
            .concat(),
        ),
    ];
    for (binary, variables) in expected {
        let text = help(binary);
        for variable in variables {
            assert!(
                text.contains(&format!("[env: {variable}")),
                "{binary} --help names {variable}:\n{text}"
            );
        }
        assert!(
            !text.contains("a-secret-value"),
            "{binary} shows the secret"
        );
        assert!(!text.contains("a-password"), "{binary} shows the password");
    }
}
