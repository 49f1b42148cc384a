//! HTTPS on both APIs, and PostgreSQL over TLS.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::time::{Duration, Instant};

use keel_http::Role;
use keel_tests::{Broker, CommandApiConfig, Service, TestDatabase, eur, unique_prefix};
use reqwest::StatusCode;
use serde_json::json;

use super::*;

#[tokio::test]
async fn both_apis_serve_https_with_the_given_certificate() {
    // A test CA, and a server certificate it signed for localhost and 127.0.0.1.
    let dir = temp_dir("sec-tls");
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca = [
        &["req", "-x509"][..],
        &p256,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=keel-test-ca",
        ],
    ]
    .concat();
    openssl(&dir, &ca);
    let csr = [
        &["req"][..],
        &p256,
        &[
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat();
    openssl(&dir, &csr);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "cert.pem",
            "-days",
            "1",
            "-extfile",
            "leaf.ext",
        ],
    );
    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("sec-tls"), 1, "cmd-a");
    config
        .extra_env
        .push(("KEEL_TLS_CERT", dir.join("cert.pem").display().to_string()));
    config
        .extra_env
        .push(("KEEL_TLS_KEY", dir.join("key.pem").display().to_string()));
    let command = Service::command_api(&config).await.unwrap();
    let db = TestDatabase::new("sec_tls");
    let query = Service::query_api(&config, &db.url()).await.unwrap();

    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let client = config
        .auth
        .client_builder("alice", &Role::ALL)
        .add_root_certificate(ca)
        .build()
        .unwrap();
    for service in [&command, &query] {
        let https = service.url("/healthz").replace("http://", "https://");
        let answer = client.get(&https).send().await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK, "{https}");
        // Plain HTTP to the TLS port gets no HTTP answer at all.
        let plain = reqwest::Client::new()
            .get(service.url("/healthz"))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(plain.is_err(), "plain HTTP was answered: {plain:?}");
    }
    // A command over HTTPS.
    let base = command.url("").replace("http://", "https://");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = client
            .post(format!("{base}/v1/products/TLS-1/register"))
            .json(&json!({"name": "Mug", "price": eur(100)}))
            .send()
            .await
            .unwrap();
        if r.status() == StatusCode::CREATED {
            break;
        }
        assert!(
            r.status() == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline,
            "{}",
            r.status()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn postgres_tls_is_the_url_s_to_ask_for() {
    let broker = Broker::start().await.unwrap();
    let config = CommandApiConfig::new(&broker, &unique_prefix("sec-pgtls"), 1, "cmd-a");
    let db = TestDatabase::new("sec_pgtls");
    let admin =
        sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable")
            .await
            .unwrap();
    let ssl_on: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(
        ssl_on, "on",
        "this test needs the local PostgreSQL to offer TLS (Debian's default)"
    );
    let url = db.url().replace("sslmode=disable", "sslmode=require");
    let _projector = Service::projector(&config, &url, &[]).await.unwrap();
    let query = Service::query_api(&config, &url).await.unwrap();
    query.wait_ready().await.unwrap();
    let (tls, plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.datname = $1",
    )
    .bind(&db.name)
    .fetch_one(&admin)
    .await
    .unwrap();
    assert!(
        tls > 0 && plain == 0,
        "{tls} TLS and {plain} plain connections"
    );
}
