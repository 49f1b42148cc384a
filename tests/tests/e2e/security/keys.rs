//! Public keys in PEM and JWKS files, rotated without a restart.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::path::Path;
use std::time::{Duration, Instant};

use keel_http::Role;
use keel_http::auth::Claims;
use keel_tests::{Broker, CommandApiConfig, Service, TestAuth, unique_prefix};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::*;

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
