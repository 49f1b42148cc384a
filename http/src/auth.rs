//! Bearer-token authentication: JWTs checked against a pinned algorithm, `exp`, `iss` and
//! `aud`, and the roles they carry.
//!
//! Keys come from one of two places, never both:
//! - an HS256 secret (`KEEL_AUTH_HS256_SECRET`, or `KEEL_AUTH_HS256_SECRET_FILE`), for
//!   development and single-tenant set-ups;
//! - a file of RS256/ES256 public keys (`KEEL_AUTH_JWKS_FILE`), as a JWKS document or as
//!   PEM public keys, for production. The file is re-read when it changes, so keys rotate
//!   without a restart; a file that no longer parses leaves the last good keys in place.
//!
//! Each key verifies one algorithm only: a secret verifies HS256, an RSA key RS256, a P-256
//! key ES256. A token whose header names another algorithm is refused before any signature
//! check, which closes the algorithm-confusion attacks (`none`, an RSA public key used as an
//! HMAC secret).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::keys::{self, Key};

/// Largest key file read.
const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    let len = std::fs::metadata(path)
        .map_err(|e| anyhow::anyhow!("reading the token key file {}: {e}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= MAX_KEY_FILE_BYTES,
        "the token key file {} is larger than {MAX_KEY_FILE_BYTES} bytes",
        path.display()
    );
    std::fs::read(path)
        .map_err(|e| anyhow::anyhow!("reading the token key file {}: {e}", path.display()))
}

/// What a token may allow. Each route needs one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `commands:write`: send commands.
    CommandsWrite,
    /// `queries:read`: read the views.
    QueriesRead,
    /// `audit:read`: read the audit trail.
    AuditRead,
    /// `admin`: projection status, the partitions' owners, and the requests for rebuilds,
    /// retries, discards and verifications.
    Admin,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 4] = [
        Role::CommandsWrite,
        Role::QueriesRead,
        Role::AuditRead,
        Role::Admin,
    ];

    /// The role's name in the `roles` claim.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::CommandsWrite => "commands:write",
            Role::QueriesRead => "queries:read",
            Role::AuditRead => "audit:read",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who sent a request, as its token says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`: recorded as the actor of every commit.
    pub subject: String,
    /// The roles of the token's `roles` claim (names this API does not know are dropped).
    pub roles: Vec<Role>,
}

impl Principal {
    /// Whoever calls when authentication is off: every role, subject `anonymous`.
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
            roles: Role::ALL.to_vec(),
        }
    }

    /// True when the principal holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

/// The claims Keel reads and writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Subject: who the token speaks for.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// Expiry, in seconds since the epoch.
    pub exp: u64,
    /// Issued at, in seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// Role names.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// Longest subject accepted: it is recorded in every commit.
pub const MAX_SUBJECT_CHARS: usize = 255;

/// Why a token was refused: safe to show the client (no key material, no internals).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("this route needs a bearer token (Authorization: Bearer <JWT>)")]
    Missing,
    /// The token is unusable.
    #[error("{0}")]
    Invalid(String),
}

/// What [`AuthError::Invalid`] says of a token past its `exp`.
const EXPIRED: &str = "the token has expired";

impl AuthError {
    /// The failure as the `reason` label of `keel_auth_failures_total`: `missing`,
    /// `expired` or `invalid` (a bounded set, never the token's text).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(text) if text == EXPIRED => "expired",
            AuthError::Invalid(_) => "invalid",
        }
    }
}

/// Where the verification keys come from.
#[derive(Clone)]
pub enum KeySource {
    /// An HS256 secret.
    Hs256(Vec<u8>),
    /// A JWKS or PEM file of RS256/ES256 public keys, re-read when it changes.
    PublicKeyFile(PathBuf),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Never print the secret, not even its length.
            KeySource::Hs256(_) => f.write_str("Hs256(<secret>)"),
            KeySource::PublicKeyFile(path) => f.debug_tuple("PublicKeyFile").field(path).finish(),
        }
    }
}

/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash's size).
pub const MIN_SECRET_BYTES: usize = 32;

/// How tokens are checked.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    /// The keys.
    pub keys: KeySource,
    /// `KEEL_AUTH_ISSUER`: the `iss` tokens must carry (default `keel`).
    pub issuer: String,
    /// `KEEL_AUTH_AUDIENCE`: the `aud` tokens must carry (default `keel`).
    pub audience: String,
    /// `KEEL_AUTH_LEEWAY_SECS`: clock skew allowed on `exp` and `nbf` (default 30 s).
    pub leeway: Duration,
}

/// The keys as last read from the file, and the file's contents then.
struct Loaded {
    contents: Vec<u8>,
    keys: Arc<Vec<Key>>,
}

/// Checks bearer tokens.
pub struct Verifier {
    settings: AuthSettings,
    loaded: RwLock<Loaded>,
    /// The claim checks, one per algorithm a key may have, made once.
    validations: Vec<Validation>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier over `settings`; reads the key file now and fails when it holds no usable key.
    pub fn new(settings: AuthSettings) -> anyhow::Result<Self> {
        let (contents, keys) = match &settings.keys {
            KeySource::Hs256(secret) => {
                anyhow::ensure!(
                    secret.len() >= MIN_SECRET_BYTES,
                    "the HS256 secret must have at least {MIN_SECRET_BYTES} bytes"
                );
                let key = Key {
                    kid: None,
                    algorithm: Algorithm::HS256,
                    key: DecodingKey::from_secret(secret),
                };
                (Vec::new(), vec![key])
            }
            KeySource::PublicKeyFile(path) => {
                let contents = read(path)?;
                let keys = keys::parse(&String::from_utf8_lossy(&contents))
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                (contents, keys)
            }
        };
        let validations = [Algorithm::HS256, Algorithm::RS256, Algorithm::ES256]
            .into_iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm);
                validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
                validation.set_issuer(&[&settings.issuer]);
                validation.set_audience(&[&settings.audience]);
                validation.leeway = settings.leeway.as_secs();
                validation.validate_nbf = true;
                validation
            })
            .collect();
        Ok(Self {
            settings,
            validations,
            loaded: RwLock::new(Loaded {
                contents,
                keys: Arc::new(keys),
            }),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// Re-reads the key file when its contents changed. A file that does not parse is
    /// logged and the keys in use stay. Reads a file: call off the async runtime.
    pub fn reload_if_changed(&self) {
        let KeySource::PublicKeyFile(path) = &self.settings.keys else {
            return;
        };
        let contents = match read(path) {
            Ok(contents) => contents,
            Err(e) => {
                error!(error = %e, "the token key file cannot be read; keeping the keys in use");
                return;
            }
        };
        let loaded = self.loaded.read().unwrap_or_else(PoisonError::into_inner);
        if loaded.contents == contents {
            return;
        }
        drop(loaded);
        let parsed = keys::parse(&String::from_utf8_lossy(&contents));
        let mut loaded = self.loaded.write().unwrap_or_else(PoisonError::into_inner);
        loaded.contents = contents;
        match parsed {
            Ok(keys) => {
                info!(path = %path.display(), keys = keys.len(), "token keys re-read");
                loaded.keys = Arc::new(keys);
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "the token key file no longer reads; keeping the keys in use");
            }
        }
    }

    /// Re-reads the key file every `every` while the returned task runs.
    pub fn spawn_reloader(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let verifier = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let verifier = Arc::clone(&verifier);
                let _ = tokio::task::spawn_blocking(move || verifier.reload_if_changed()).await;
            }
        })
    }

    /// Checks `token`: algorithm, signature, `exp`, `nbf`, `iss`, `aud`, and a usable `sub`.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("the token is not a well-formed JWT".into()))?;
        let keys = Arc::clone(
            &self
                .loaded
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .keys,
        );
        let mut candidates = keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(wanted), Some(kid)) => wanted == kid,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            let accepted: Vec<String> = {
                let mut a: Vec<String> =
                    keys.iter().map(|k| format!("{:?}", k.algorithm)).collect();
                a.dedup();
                a
            };
            return Err(AuthError::Invalid(match header.kid {
                Some(kid) if keys.iter().any(|k| k.algorithm == header.alg) => {
                    format!("no key with id {kid:?} is trusted")
                }
                _ => format!(
                    "the token is signed with {:?}; this API accepts {}",
                    header.alg,
                    accepted.join(", ")
                ),
            }));
        }
        // Every key's algorithm has its checks: a candidate key means they are there.
        let Some(validation) = self
            .validations
            .iter()
            .find(|v| v.algorithms == [header.alg])
        else {
            return Err(AuthError::Invalid(
                "the token's algorithm is not accepted".into(),
            ));
        };
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Presented>(token, &key.key, validation) {
                Ok(data) => return principal(data.claims),
                Err(e) => {
                    let bad_signature =
                        matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature);
                    last = Some(e);
                    if !bad_signature {
                        break;
                    }
                }
            }
        }
        Err(AuthError::Invalid(last.map(describe).unwrap_or_else(
            || "the token's signature does not verify".into(),
        )))
    }
}

/// The claims read from a presented token. `exp`, `iss`, `aud` (a string or a list) and
/// the presence of `sub` are checked by the validation, not by this type.
#[derive(Deserialize)]
struct Presented {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    roles: Vec<String>,
}

/// Characters that change how text is shown without being seen (bidirectional overrides,
/// zero-width characters…): an actor holding them could pass for another in the audit trail.
fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

fn principal(claims: Presented) -> Result<Principal, AuthError> {
    let sub = claims.sub.unwrap_or_default();
    if sub.trim().is_empty()
        || sub.chars().count() > MAX_SUBJECT_CHARS
        || sub.chars().any(is_invisible)
    {
        return Err(AuthError::Invalid(format!(
            "the token's sub must have 1 to {MAX_SUBJECT_CHARS} characters, none of them control or invisible"
        )));
    }
    Ok(Principal {
        subject: sub,
        roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
    })
}

/// A client-safe account of a verification failure.
fn describe(e: jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => EXPIRED.into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidAudience => "the token is not meant for this API (aud)".into(),
        K::InvalidIssuer => "the token's issuer is not trusted (iss)".into(),
        K::MissingRequiredClaim(claim) => format!("the token has no {claim} claim"),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::InvalidAlgorithm => "the token's algorithm is not accepted".into(),
        K::Json(_) | K::Utf8(_) | K::Base64(_) | K::InvalidToken => {
            "the token's claims are not well-formed".into()
        }
        _ => "the token is not valid".into(),
    }
}

/// Signs `claims` with an HS256 secret: for development tokens and tests.
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> anyhow::Result<String> {
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )?)
}

/// Seconds since the epoch.
pub fn now_secs() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn verifier() -> Verifier {
        Verifier::new(AuthSettings {
            keys: KeySource::Hs256(SECRET.to_vec()),
            issuer: "keel".into(),
            audience: "keel".into(),
            leeway: Duration::from_secs(0),
        })
        .unwrap()
    }

    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            iss: "keel".into(),
            aud: "keel".into(),
            exp: now_secs() + 60,
            iat: now_secs(),
            roles: vec!["queries:read".into(), "unknown".into()],
        }
    }

    fn error(token: &str) -> String {
        match verifier().verify(token) {
            Err(AuthError::Invalid(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_good_token_gives_its_subject_and_known_roles() {
        let token = sign_hs256(SECRET, &claims()).unwrap();
        let p = verifier().verify(&token).unwrap();
        assert_eq!(p.subject, "alice");
        assert_eq!(p.roles, [Role::QueriesRead]);
    }

    #[test]
    fn an_audience_list_holding_ours_is_accepted() {
        let claims = serde_json::json!({"sub": "alice", "iss": "keel", "aud": ["other", "keel"],
                                        "exp": now_secs() + 60, "roles": ["admin"]});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(verifier().verify(&token).unwrap().roles, [Role::Admin]);
    }

    #[test]
    fn expiry_audience_issuer_and_signature_are_checked() {
        let expired = Claims {
            exp: now_secs() - 10,
            ..claims()
        };
        assert!(error(&sign_hs256(SECRET, &expired).unwrap()).contains("expired"));
        let elsewhere = Claims {
            aud: "other".into(),
            ..claims()
        };
        assert!(error(&sign_hs256(SECRET, &elsewhere).unwrap()).contains("aud"));
        let stranger = Claims {
            iss: "other".into(),
            ..claims()
        };
        assert!(error(&sign_hs256(SECRET, &stranger).unwrap()).contains("iss"));
        let forged = sign_hs256(b"another secret of thirty-two bytes!!", &claims()).unwrap();
        assert!(error(&forged).contains("signature"));
        assert!(error("not.a.jwt").contains("well-formed"));
    }

    #[test]
    fn other_algorithms_are_refused_before_the_signature() {
        // alg "none": header {"alg":"none","typ":"JWT"} with the same claims and no signature.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(serde_json::to_vec(&claims()).unwrap());
        // `none` is not an algorithm a key can have: the header itself is refused.
        assert!(error(&format!("{header}.{body}.")).contains("well-formed"));
        let header = b64.encode(br#"{"alg":"HS512","typ":"JWT"}"#);
        assert!(error(&format!("{header}.{body}.c2ln")).contains("accepts HS256"));
    }

    #[test]
    fn short_secrets_and_bad_subjects_are_refused() {
        assert!(
            Verifier::new(AuthSettings {
                keys: KeySource::Hs256(b"short".to_vec()),
                ..verifier().settings.clone()
            })
            .is_err()
        );
        let blank = Claims {
            sub: String::new(),
            ..claims()
        };
        assert!(error(&sign_hs256(SECRET, &blank).unwrap()).contains("sub"));
        for sub in ["a\nb", "admin\u{202E}nimda", "a\u{200B}b", "   "] {
            let odd = Claims {
                sub: sub.into(),
                ..claims()
            };
            assert!(
                error(&sign_hs256(SECRET, &odd).unwrap()).contains("sub"),
                "{sub:?}"
            );
        }
        // A token with no sub at all.
        let none = serde_json::json!({"iss": "keel", "aud": "keel", "exp": now_secs() + 60});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(Algorithm::HS256),
            &none,
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert!(error(&token).contains("no sub"));
    }
}
