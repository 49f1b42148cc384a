//! No secret, password or token in any log.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::time::Duration;

use keel_http::Role;
use keel_http::auth::{Claims, now_secs};
use keel_tests::{Broker, CommandApiConfig, Service, TestAuth, TestDatabase, eur, unique_prefix};
use serde_json::json;

use super::*;

#[tokio::test]
async fn secrets_and_tokens_never_reach_the_logs() {
    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("sec-logs"), 2, "cmd-a");
    // Every service at debug, so that whatever is logged at all is seen.
    config.extra_env.push(("RUST_LOG", "debug".into()));
    let db = TestDatabase::new("sec_logs");
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    // Trust authentication ignores the password; the services must not print it.
    let url = db
        .url()
        .replace("postgres@", &format!("postgres:{password}@"));
    let command = Service::command_api_ready(&config).await.unwrap();
    let projector = Service::projector(&config, &url, &[]).await.unwrap();
    let query = Service::query_api(&config, &url).await.unwrap();
    query.wait_ready().await.unwrap();

    let good = config.auth.token("dana", &Role::ALL);
    let expired = config.auth.sign(&Claims {
        exp: now_secs() - 600,
        ..TestAuth::claims("dana", &Role::ALL)
    });
    let forged = TestAuth::new().token("dana", &Role::ALL);
    let mut sent = vec![good.clone(), expired.clone(), forged.clone()];
    for token in [&good, &expired, &forged] {
        let created = send(
            "POST",
            &command.url("/v1/products/LOG-1/register"),
            &bearer(token),
            Some(json!({"name": "Mug", "price": eur(100)}).to_string()),
        )
        .await;
        if let Some(t) = created.body["consistency_token"].as_str() {
            let mut headers = bearer(token);
            headers.push(("keel-consistency-token", t.to_owned()));
            send("GET", &query.url("/v1/products/LOG-1"), &headers, None).await;
        }
        send("GET", &query.url("/v1/audit/events"), &bearer(token), None).await;
        send("GET", &query.url("/v1/projections"), &bearer(token), None).await;
    }
    sent.push(config.auth.secret.clone());
    // Stopped gracefully, so the shutdown's lines are in too.
    let logs = [
        command.log_source(),
        projector.log_source(),
        query.log_source(),
    ];
    for service in [command, projector, query] {
        service.stop().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all: Vec<String> = logs.iter().map(|l| l.text()).collect();
    let all = all.join("\n");
    assert!(all.len() > 1000, "the services logged almost nothing");
    assert!(all.contains("DEBUG"), "the services did not log at debug");
    for secret in sent.iter().chain([&password]) {
        // Any token part long enough to identify it: the signature, the whole token.
        let signature = secret.rsplit('.').next().unwrap();
        assert!(
            !all.contains(secret.as_str()),
            "a secret or token is in the logs"
        );
        assert!(
            signature.len() < 16 || !all.contains(signature),
            "a token's signature is in the logs"
        );
    }
}
