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
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

/// What a token may allow. Each route needs one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// `commands:write`: send commands.
    CommandsWrite,
    /// `queries:read`: read the views.
    QueriesRead,
    /// `audit:read`: read the audit trail.
    AuditRead,
    /// `admin`: projection status (rebuilds run from the projector's command line).
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

/// One verification key, pinned to one algorithm.
struct Key {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// The keys as last read from the file, and what the file looked like then.
struct Loaded {
    stamp: Option<(SystemTime, u64)>,
    keys: Arc<Vec<Key>>,
}

/// Checks bearer tokens.
pub struct Verifier {
    settings: AuthSettings,
    loaded: RwLock<Loaded>,
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
        let (stamp, keys) = match &settings.keys {
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
                (None, vec![key])
            }
            KeySource::PublicKeyFile(path) => {
                let keys = read_key_file(path)?;
                (stamp(path), keys)
            }
        };
        Ok(Self {
            settings,
            loaded: RwLock::new(Loaded {
                stamp,
                keys: Arc::new(keys),
            }),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &AuthSettings {
        &self.settings
    }

    /// Re-reads the key file when its modification time or size changed. A file that does
    /// not parse is logged and the keys in use stay.
    pub fn reload_if_changed(&self) {
        let KeySource::PublicKeyFile(path) = &self.settings.keys else {
            return;
        };
        let now = stamp(path);
        let changed = self.loaded.read().map(|l| l.stamp != now).unwrap_or(true);
        if !changed {
            return;
        }
        match read_key_file(path) {
            Ok(keys) => {
                info!(path = %path.display(), keys = keys.len(), "token keys re-read");
                if let Ok(mut loaded) = self.loaded.write() {
                    *loaded = Loaded {
                        stamp: now,
                        keys: Arc::new(keys),
                    };
                }
            }
            Err(e) => {
                error!(path = %path.display(), error = %e, "the token key file no longer reads; keeping the keys in use");
                if let Ok(mut loaded) = self.loaded.write() {
                    loaded.stamp = now;
                }
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
                verifier.reload_if_changed();
            }
        })
    }

    /// Checks `token`: algorithm, signature, `exp`, `nbf`, `iss`, `aud`, and a usable `sub`.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("the token is not a well-formed JWT".into()))?;
        let keys = self
            .loaded
            .read()
            .map(|l| Arc::clone(&l.keys))
            .map_err(|_| AuthError::Invalid("no key to check the token with".into()))?;
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
        let mut validation = Validation::new(header.alg);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        validation.leeway = self.settings.leeway.as_secs();
        validation.validate_nbf = true;
        let mut last = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
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

fn principal(claims: Claims) -> Result<Principal, AuthError> {
    let sub = claims.sub;
    if sub.is_empty()
        || sub.chars().count() > MAX_SUBJECT_CHARS
        || sub.chars().any(char::is_control)
    {
        return Err(AuthError::Invalid(format!(
            "the token's sub must have 1 to {MAX_SUBJECT_CHARS} characters and no control characters"
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
        K::ExpiredSignature => "the token has expired".into(),
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

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Reads RS256/ES256 public keys from a JWKS document or from PEM public keys.
fn read_key_file(path: &Path) -> anyhow::Result<Vec<Key>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading the token key file {}: {e}", path.display()))?;
    let keys = if text.trim_start().starts_with('{') {
        jwks_keys(&text)?
    } else {
        pem_keys(&text)?
    };
    anyhow::ensure!(
        !keys.is_empty(),
        "the token key file {} holds no RS256 or ES256 public key",
        path.display()
    );
    Ok(keys)
}

fn jwks_keys(text: &str) -> anyhow::Result<Vec<Key>> {
    let set: JwkSet =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a JWKS document: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
                if ec.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            (_, alg) => anyhow::bail!(
                "key {:?}: only RSA keys for RS256 and P-256 keys for ES256 are accepted, not {alg:?}",
                jwk.common.key_id.as_deref().unwrap_or("(no kid)")
            ),
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| {
            anyhow::anyhow!(
                "key {:?}: {e}",
                jwk.common.key_id.as_deref().unwrap_or("(no kid)")
            )
        })?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    Ok(keys)
}

fn pem_keys(text: &str) -> anyhow::Result<Vec<Key>> {
    let mut keys = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block_end = rest[start..]
            .find("-----END ")
            .and_then(|end| {
                rest[start + end..]
                    .find("\n")
                    .map(|nl| start + end + nl + 1)
                    .or(Some(rest.len()))
            })
            .ok_or_else(|| anyhow::anyhow!("a PEM block has no END line"))?;
        let block = &rest[start..block_end];
        rest = &rest[block_end..];
        if block.contains("PRIVATE KEY") {
            anyhow::bail!("the token key file holds a private key: give it public keys only");
        }
        let key = if let Ok(key) = DecodingKey::from_rsa_pem(block.as_bytes()) {
            Key {
                kid: None,
                algorithm: Algorithm::RS256,
                key,
            }
        } else if let Ok(key) = DecodingKey::from_ec_pem(block.as_bytes()) {
            Key {
                kid: None,
                algorithm: Algorithm::ES256,
                key,
            }
        } else {
            anyhow::bail!("a PEM block is neither an RSA nor a P-256 public key");
        };
        keys.push(key);
    }
    Ok(keys)
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
        let reason = error(&format!("{header}.{body}."));
        assert!(!reason.is_empty());
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
        let control = Claims {
            sub: "a\nb".into(),
            ..claims()
        };
        assert!(error(&sign_hs256(SECRET, &control).unwrap()).contains("sub"));
    }
}
