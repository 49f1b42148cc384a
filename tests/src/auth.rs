//! Tokens for the tests: each test's services get an HS256 secret of their own, and the
//! test signs whatever tokens it needs with it.

use keel_http::auth::{Claims, Role, sign_hs256};
use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};

/// A test's own signing secret.
#[derive(Clone, Debug)]
pub struct TestAuth {
    /// The HS256 secret the services are given.
    pub secret: String,
}

impl Default for TestAuth {
    fn default() -> Self {
        Self::new()
    }
}

impl TestAuth {
    /// A fresh random secret.
    pub fn new() -> Self {
        Self {
            secret: format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
        }
    }

    /// Claims for `sub` with `roles`, valid for an hour.
    pub fn claims(sub: &str, roles: &[Role]) -> Claims {
        keel_http::testing::claims(sub, roles)
    }

    /// `claims` signed with the secret.
    pub fn sign(&self, claims: &Claims) -> String {
        sign_hs256(self.secret.as_bytes(), claims)
            .unwrap_or_else(|e| panic!("signing a test token: {e}"))
    }

    /// A token for `sub` with `roles`.
    pub fn token(&self, sub: &str, roles: &[Role]) -> String {
        self.sign(&Self::claims(sub, roles))
    }

    /// A client that sends a token for `sub` with `roles` on every request.
    pub fn client_builder(&self, sub: &str, roles: &[Role]) -> reqwest::ClientBuilder {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {}", self.token(sub, roles)))
            .unwrap_or_else(|e| panic!("a token is not a header value: {e}"));
        headers.insert(AUTHORIZATION, value);
        reqwest::Client::builder().default_headers(headers)
    }

    /// A client for `sub` with `roles`.
    pub fn client(&self, sub: &str, roles: &[Role]) -> reqwest::Client {
        self.client_builder(sub, roles)
            .build()
            .unwrap_or_else(|e| panic!("building a client: {e}"))
    }

    /// A client holding every role, as subject `test`.
    pub fn full_client(&self) -> reqwest::Client {
        self.client("test", &Role::ALL)
    }
}
