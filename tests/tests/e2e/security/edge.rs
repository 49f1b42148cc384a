//! The edge: refused tokens, the per-subject rate limit, and starting without keys.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::time::Duration;

use keel_http::Role;
use keel_http::auth::{Claims, now_secs};
use keel_tests::{
    Broker, CommandApiConfig, Service, Stack, TestAuth, eur, read_accepted, unique_prefix,
};
use reqwest::StatusCode;
use serde_json::json;

use super::*;

#[tokio::test]
async fn bad_tokens_are_401_with_a_bearer_challenge() {
    let stack = Stack::start("sec-tokens", 1).await;
    let auth = &stack.config.auth;
    let claims = || TestAuth::claims("alice", &Role::ALL);
    let other = TestAuth::new();
    let b64 = |bytes: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    };
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(&serde_json::to_vec(&claims()).unwrap())
    );
    let cases: Vec<(&str, Headers, &str)> = vec![
        (
            "expired",
            bearer(&auth.sign(&Claims {
                exp: now_secs() - 120,
                ..claims()
            })),
            "expired",
        ),
        (
            "another audience",
            bearer(&auth.sign(&Claims {
                aud: "billing".into(),
                ..claims()
            })),
            "aud",
        ),
        (
            "another issuer",
            bearer(&auth.sign(&Claims {
                iss: "elsewhere".into(),
                ..claims()
            })),
            "iss",
        ),
        ("another key", bearer(&other.sign(&claims())), "signature"),
        ("alg none", bearer(&unsigned), "well-formed"),
        ("garbage", bearer("not-a-token"), "well-formed"),
        (
            "basic scheme",
            vec![("authorization", "Basic YWxpY2U6cGFzcw==".into())],
            "Bearer scheme",
        ),
    ];
    for (label, headers, reason) in cases {
        for service in [&stack.command, &stack.query] {
            let path = if service.url("") == stack.command.url("") {
                "/v1/products/SEC-T/restock"
            } else {
                "/v1/orders"
            };
            let method = if path.ends_with("restock") {
                "POST"
            } else {
                "GET"
            };
            let body = (method == "POST").then(|| json!({"quantity": 1}).to_string());
            let answer = send(method, &service.url(path), &headers, body).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{label}: {}",
                answer.text
            );
            let challenge = answer.headers["www-authenticate"].to_str().unwrap();
            assert!(
                challenge.starts_with("Bearer realm=\"keel\", error=\"invalid_token\""),
                "{label}: {challenge}"
            );
            assert!(
                answer.body["detail"].as_str().unwrap().contains(reason),
                "{label}: {}",
                answer.text
            );
            // The answer never echoes the token.
            let token = headers[0].1.split(' ').next_back().unwrap();
            assert!(
                !answer.text.contains(token),
                "{label}: the token was echoed"
            );
        }
    }

    // Two Authorization headers are refused, not guessed between.
    let good = auth.token("alice", &Role::ALL);
    let answer = send(
        "GET",
        &stack.query.url("/v1/orders"),
        &[
            ("authorization", format!("Bearer {good}")),
            ("authorization", format!("Bearer {good}")),
        ],
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_rate_limit_triggers_per_subject_and_recovers() {
    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("sec-rate"), 1, "cmd-a");
    config.extra_env.push(("KEEL_RATE_LIMIT_RPS", "1".into()));
    config.extra_env.push(("KEEL_RATE_LIMIT_BURST", "3".into()));
    let api = Service::command_api_ready(&config).await.unwrap();
    let url = api.url("/v1/products/NOPE/restock");
    let body = || Some(json!({"quantity": 1}).to_string());
    let alice = bearer(&config.auth.token("alice", &[Role::CommandsWrite]));
    // A burst of 3 at 1 per second: within a few quick requests, one is refused. (A slow
    // machine may earn a token back between them, hence "within", not "the fourth".)
    let mut limited = None;
    for sent in 1..=8 {
        let answer = send("POST", &url, &alice, body()).await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert!(sent > 3, "refused within the burst, at request {sent}");
            limited = Some(answer);
            break;
        }
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text);
    }
    let limited = limited.expect("8 quick requests, none refused");
    assert_eq!(limited.headers["content-type"], "application/problem+json");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Another subject has its own allowance.
    let bob = bearer(&config.auth.token("bob", &[Role::CommandsWrite]));
    assert_eq!(
        send("POST", &url, &bob, body()).await.status,
        StatusCode::NOT_FOUND
    );
    // After Retry-After, alice is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        send("POST", &url, &alice, body()).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn auth_is_refused_without_keys_and_off_only_when_said() {
    let broker = Broker::start().await.unwrap();
    let config = CommandApiConfig::new(&broker, &unique_prefix("sec-off"), 1, "cmd-a");
    let without_keys: Vec<(&str, String)> = config
        .env()
        .into_iter()
        .filter(|(k, _)| *k != "KEEL_AUTH_HS256_SECRET")
        .chain([("KEEL_COMMAND_ADDR", "127.0.0.1:0".to_owned())])
        .collect();
    let refused = Service::start("command-api", &[], &without_keys, None)
        .await
        .unwrap();
    let log = refused.log_source();
    let status = refused.wait(Duration::from_secs(30)).await.unwrap();
    assert!(
        !status.success(),
        "command-api started with authentication on and no keys"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(log.text().contains("has no keys"), "{}", log.text());

    let mut off = without_keys.clone();
    off.push(("KEEL_AUTH", "off".into()));
    let api = Service::start("command-api", &[], &off, Some("command API listening"))
        .await
        .unwrap();
    assert!(api.log().contains("AUTHENTICATION IS OFF"), "{}", api.log());
    api.wait_ready().await.unwrap();
    // No token needed; a header cannot name the actor: it is "anonymous".
    let mut headers = vec![("keel-actor", "mallory".to_owned())];
    headers.push(("x-correlation-id", "off-1".to_owned()));
    let answer = send(
        "POST",
        &api.url("/v1/products/OFF-1/register"),
        &headers,
        Some(json!({"name": "Mug", "price": eur(100)}).to_string()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text);
    let settings = broker.settings(&config.prefix, config.partitions);
    let (accepted, _) = read_accepted(&settings, &config.policy(), &settings.topic("product"))
        .await
        .unwrap();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].commit.command.actor, "anonymous");
}
