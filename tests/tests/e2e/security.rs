//! Security through HTTP against running services: every role against every route, token
//! failures, rate limits, hostile input, TLS, rotating public keys, and logs free of
//! secrets.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::path::Path;
use std::time::{Duration, Instant};

use keel_http::Role;
use keel_http::auth::{Claims, now_secs};
use keel_tests::{
    Broker, CommandApiConfig, Contract, Service, Stack, TestAuth, TestDatabase, eur, read_accepted,
    send_raw, unique_prefix,
};
use reqwest::StatusCode;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Command,
    Query,
}

/// Every route of both APIs and the role it needs (`None`: open). The test checks that this
/// table and the OpenAPI documents list the same operations with the same roles.
const ROUTES: &[(Api, &str, &str, Option<Role>)] = &[
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/register",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/change-price",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/restock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/reserve-stock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/release-stock",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/products/{id}/discontinue",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/customers/{id}/register",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/customers/{id}/change-email",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/place",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/pay",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/ship",
        Some(Role::CommandsWrite),
    ),
    (
        Api::Command,
        "POST",
        "/v1/orders/{id}/cancel",
        Some(Role::CommandsWrite),
    ),
    (Api::Command, "GET", "/healthz", None),
    (Api::Command, "GET", "/readyz", None),
    (Api::Command, "GET", "/openapi.json", None),
    (Api::Query, "GET", "/v1/orders", Some(Role::QueriesRead)),
    (
        Api::Query,
        "GET",
        "/v1/orders/{id}",
        Some(Role::QueriesRead),
    ),
    (Api::Query, "GET", "/v1/products", Some(Role::QueriesRead)),
    (
        Api::Query,
        "GET",
        "/v1/products/{sku}",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/customers/{id}",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/reports/daily-sales",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/reports/flagged-payments",
        Some(Role::QueriesRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/audit/streams/{type}/{id}",
        Some(Role::AuditRead),
    ),
    (
        Api::Query,
        "GET",
        "/v1/audit/streams/{type}/{id}/state",
        Some(Role::AuditRead),
    ),
    (Api::Query, "GET", "/v1/audit/events", Some(Role::AuditRead)),
    (Api::Query, "GET", "/v1/projections", Some(Role::Admin)),
    (Api::Query, "GET", "/healthz", None),
    (Api::Query, "GET", "/readyz", None),
    (Api::Query, "GET", "/openapi.json", None),
];

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

#[tokio::test]
async fn the_role_table_matches_the_documents_and_holders_get_answers() {
    let stack = Stack::start("sec-roles", 2).await;
    let auth = &stack.config.auth;

    // The table and the documents agree, operation for operation.
    let mut documented = Vec::new();
    for (api, service) in [(Api::Command, &stack.command), (Api::Query, &stack.query)] {
        let contract = Contract::fetch(service).await.unwrap();
        for (method, path) in contract.operations() {
            let (_, operation) = contract.operation(&method, &path).unwrap();
            let role = Contract::role(operation).map(|r| Role::parse(r).unwrap());
            documented.push((api, method, path, role));
        }
    }
    let mut table: Vec<_> = ROUTES
        .iter()
        .map(|(api, m, p, r)| (*api, m.to_string(), p.to_string(), *r))
        .collect();
    documented.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    table.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(
        documented, table,
        "the OpenAPI documents and the role table differ"
    );

    // Each route with no token, no role and each role is checked in process against the
    // routers (command-api routes::tests and query-api routes::openapi::tests).

    // The holder of the role gets real answers, not just "not refused".
    let writer = auth.token("writer", &[Role::CommandsWrite]);
    let created = send(
        "POST",
        &stack.command.url("/v1/products/SEC-OK/register"),
        &bearer(&writer),
        Some(json!({"name": "Mug", "price": eur(100)}).to_string()),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text);
    let reader = auth.token("reader", &[Role::QueriesRead]);
    let token = created.body["consistency_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut headers = bearer(&reader);
    headers.push(("keel-consistency-token", token));
    let product = send(
        "GET",
        &stack.query.url("/v1/products/SEC-OK"),
        &headers,
        None,
    )
    .await;
    assert_eq!(product.status, StatusCode::OK, "{}", product.text);
    assert_eq!(product.body["name"], "Mug");
}

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
async fn hostile_input_is_refused_by_field_and_appends_nothing() {
    let stack = Stack::start("sec-input", 2).await;
    let token = bearer(&stack.config.auth.token("mallory", &Role::ALL));
    let post = |path: &'static str, body: String| {
        let (url, token) = (stack.command.url(path), token.clone());
        async move { send("POST", &url, &token, Some(body)).await }
    };
    let long = "x".repeat(201);
    let cases: Vec<(&str, String, StatusCode, Option<&str>)> = vec![
        ("/v1/products/P-1/register", format!("{{\"name\": \"{}\"}}", "a".repeat(64 * 1024)), StatusCode::PAYLOAD_TOO_LARGE, None),
        ("/v1/products/P-1/register", "{\"name\": ".into(), StatusCode::BAD_REQUEST, None),
        ("/v1/products/P-1/register", format!("{}{}", "[".repeat(500), "]".repeat(500)), StatusCode::BAD_REQUEST, None),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": eur(1), "admin": true}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("admin")),
        ("/v1/products/P-1/register", json!({"name": long, "price": eur(1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("name")),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": eur(-1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("price.amount_minor")),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": {"amount_minor": 1u64 << 62, "currency": "EUR"}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("price.amount_minor")),
        ("/v1/products/P-1/register", json!({"name": "Mug", "price": {"amount_minor": 1, "currency": "euro"}}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("price.currency")),
        ("/v1/products/P-1/restock", json!({"quantity": 0}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("quantity")),
        ("/v1/products/P-1/restock", json!({"quantity": 1u64 << 40}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("quantity")),
        ("/v1/products/P-1/restock", json!({"quantity": "1"}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("quantity")),
        ("/v1/products/P%20X/register", json!({"name": "Mug", "price": eur(1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
        ("/v1/products/..%2Fetc/register", json!({"name": "Mug", "price": eur(1)}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("id")),
        ("/v1/customers/c-1/register", json!({"name": "Eve", "email": format!("{}@x.io", "e".repeat(260))}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("email")),
        ("/v1/orders/o-1/place", json!({"customer_id": "c-1", "lines": []}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("lines")),
        ("/v1/orders/o-1/place", json!({"customer_id": "c-1", "lines": (0..101).map(|i| json!({"sku": format!("S-{i}"), "quantity": 1, "unit_price": eur(1)})).collect::<Vec<_>>()}).to_string(), StatusCode::UNPROCESSABLE_ENTITY, Some("lines")),
    ];
    for (path, body, status, field) in cases {
        let answer = post(path, body).await;
        assert_eq!(answer.status, status, "{path}: {}", answer.text);
        assert_eq!(
            answer.headers["content-type"], "application/problem+json",
            "{path}"
        );
        if let Some(field) = field {
            let fields: Vec<&str> = answer.body["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["field"].as_str().unwrap())
                .collect();
            assert!(
                fields.contains(&field),
                "{path}: {fields:?} should name {field}"
            );
        }
    }
    // Headers that go into the commit are bounded.
    let mut headers = token.clone();
    headers.push(("x-correlation-id", "c".repeat(256)));
    let answer = send(
        "POST",
        &stack.command.url("/v1/products/P-1/register"),
        &headers,
        Some(json!({"name": "Mug", "price": eur(1)}).to_string()),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);

    // Query parameters.
    for (path, field) in [
        ("/v1/orders?limit=0", "limit"),
        ("/v1/orders?limit=ten", "limit"),
        ("/v1/orders?cursor=bm90LWEtY3Vyc29y", "cursor"),
        ("/v1/audit/events?from=yesterday", "from"),
    ] {
        let answer = send("GET", &stack.query.url(path), &token, None).await;
        assert_eq!(
            answer.status,
            StatusCode::BAD_REQUEST,
            "{path}: {}",
            answer.text
        );
        assert_eq!(answer.body["field"], field, "{path}: {}", answer.text);
    }
    let mut headers = token.clone();
    headers.push(("keel-consistency-token", "v1.garbage".into()));
    let answer = send("GET", &stack.query.url("/v1/orders"), &headers, None).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    // A huge limit is served as the cap.
    let answer = send(
        "GET",
        &stack.query.url("/v1/orders?limit=100000"),
        &token,
        None,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    assert_eq!(answer.body["limit"], 500);

    // Nothing of it reached the log.
    assert_eq!(stack.accepted_commits().await.unwrap(), 0);
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

/// Signs `claims` as `alg` with the PKCS#8 PEM private key at `key`, naming `kid`.
fn sign_with(
    key: &Path,
    alg: jsonwebtoken::Algorithm,
    kid: Option<&str>,
    claims: &Claims,
) -> String {
    let pem = std::fs::read(key).unwrap();
    let encoding = match alg {
        jsonwebtoken::Algorithm::RS256 => jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
        _ => jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    };
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

/// The JWKS entry of the P-256 public key at `public` (PEM).
fn ec_jwk(dir: &Path, public: &str, kid: &str) -> Value {
    openssl(
        dir,
        &[
            "pkey", "-pubin", "-in", public, "-outform", "DER", "-out", "pub.der",
        ],
    );
    let der = std::fs::read(dir.join("pub.der")).unwrap();
    // An uncompressed P-256 point closes the SubjectPublicKeyInfo: x then y, 32 bytes each.
    let point = &der[der.len() - 64..];
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    json!({"kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
           "x": b64.encode(&point[..32]), "y": b64.encode(&point[32..])})
}

#[tokio::test]
async fn public_keys_rotate_without_a_restart() {
    let dir = temp_dir("sec-jwks");
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.key",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "ec.key", "-pubout", "-out", "ec.pub"],
    );
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"],
    );
    let keys = dir.join("keys");
    std::fs::copy(dir.join("ec.pub"), &keys).unwrap();

    let broker = Broker::start().await.unwrap();
    let mut config = CommandApiConfig::new(&broker, &unique_prefix("sec-jwks"), 1, "cmd-a");
    config
        .extra_env
        .push(("KEEL_AUTH_HS256_SECRET", String::new()));
    config
        .extra_env
        .push(("KEEL_AUTH_JWKS_FILE", keys.display().to_string()));
    let api = Service::command_api_ready(&config).await.unwrap();

    let claims = TestAuth::claims("carol", &[Role::CommandsWrite]);
    let es = sign_with(
        &dir.join("ec.key"),
        jsonwebtoken::Algorithm::ES256,
        None,
        &claims,
    );
    let es_kid = sign_with(
        &dir.join("ec.key"),
        jsonwebtoken::Algorithm::ES256,
        Some("ec-1"),
        &claims,
    );
    let rs = sign_with(
        &dir.join("rsa.key"),
        jsonwebtoken::Algorithm::RS256,
        None,
        &claims,
    );
    // HS256 with the public key as the secret: the algorithm-confusion attack.
    let confused =
        keel_http::auth::sign_hs256(&std::fs::read(dir.join("ec.pub")).unwrap(), &claims).unwrap();
    let url = api.url("/v1/products/NOPE/restock");
    let status = |token: String| {
        let url = url.clone();
        async move {
            send(
                "POST",
                &url,
                &bearer(&token),
                Some(json!({"quantity": 1}).to_string()),
            )
            .await
            .status
        }
    };
    let accepted = |s: StatusCode| s != StatusCode::UNAUTHORIZED && !s.is_server_error();
    assert!(accepted(status(es.clone()).await));
    assert_eq!(status(rs.clone()).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status(confused.clone()).await, StatusCode::UNAUTHORIZED);

    // Rotate to the RSA key: within a few seconds RS256 works and the EC key no longer does.
    let wait_until = |token: String, want: bool| {
        let status = &status;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if accepted(status(token.clone()).await) == want {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the key file change was not picked up"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    std::fs::write(&keys, std::fs::read(dir.join("rsa.pub")).unwrap()).unwrap();
    wait_until(rs.clone(), true).await;
    assert_eq!(status(es.clone()).await, StatusCode::UNAUTHORIZED);

    // A JWKS document naming the EC key: tokens naming its kid work again.
    let jwks = json!({"keys": [ec_jwk(&dir, "ec.pub", "ec-1")]});
    std::fs::write(&keys, jwks.to_string()).unwrap();
    wait_until(es_kid.clone(), true).await;
    assert_eq!(status(rs.clone()).await, StatusCode::UNAUTHORIZED);

    // A broken file keeps the keys in use.
    std::fs::write(&keys, "{ not json").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(accepted(status(es_kid).await));
    assert!(api.log().contains("keeping the keys in use"));
    let _ = std::fs::remove_dir_all(&dir);
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
    let (accepted, _) = read_accepted(&settings, &settings.topic("product"))
        .await
        .unwrap();
    assert_eq!(accepted.len(), 1);
    assert_eq!(accepted[0].commit.command.actor, "anonymous");
}

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
