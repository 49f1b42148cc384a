//! Commit signatures: Ed25519 over a commit's hash, with key ids so keys can rotate.
//!
//! Files, one key per line, `#` starts a comment:
//! - a **signing key** file holds `<key id> <base64 32-byte secret seed>` (kept by the
//!   command API, never shared);
//! - a **trusted keys** file holds `<key id> <base64 32-byte public key>` lines: every key
//!   whose signatures verifiers accept. Rotating a key adds a line; old commits keep
//!   verifying with the old key's line.
//!
//! A key id is the first 16 hex digits of the SHA-256 of the public key, so an id cannot
//! be claimed for another key.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A commit's signature: who signed (`key_id`) and the Ed25519 signature of its `hash`
/// (the hex string's bytes), base64.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The id of the signing key.
    pub key_id: String,
    /// The base64 Ed25519 signature over the commit's hash.
    pub value: String,
}

/// Why a key file or a signature is not usable.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A line of a key file is malformed.
    #[error("{path} line {line}: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// The 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
}

/// The id of a public key: the first 16 hex digits of its SHA-256.
pub fn key_id_of(public: &ed25519_dalek::VerifyingKey) -> String {
    hex::encode(Sha256::digest(public.as_bytes()))[..16].to_owned()
}

/// The command API's signing key.
#[derive(Clone)]
pub struct SigningKey {
    key_id: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("SigningKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut seed);
        Self::from_bytes(seed)
    }

    /// A key from its 32-byte secret seed.
    pub fn from_bytes(seed: [u8; 32]) -> Self {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        Self {
            key_id: key_id_of(&key.verifying_key()),
            key,
        }
    }

    /// The key's id.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// Signs a commit hash.
    pub fn sign(&self, hash: &str) -> Signature {
        Signature {
            key_id: self.key_id.clone(),
            value: STANDARD.encode(self.key.sign(hash.as_bytes()).to_bytes()),
        }
    }

    /// The public half, as a trusted-keys file line.
    pub fn trusted_line(&self) -> String {
        format!(
            "{} {}",
            self.key_id,
            STANDARD.encode(self.key.verifying_key().as_bytes())
        )
    }

    /// Reads a signing key file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let lines = read_lines(path)?;
        let [(line, id, secret)] = lines.as_slice() else {
            return Err(malformed(path, 1, "must hold exactly one key line"));
        };
        let seed: [u8; 32] = STANDARD
            .decode(secret)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| malformed(path, *line, "the secret is not 32 base64 bytes"))?;
        let key = Self::from_bytes(seed);
        if &key.key_id != id {
            return Err(malformed(
                path,
                *line,
                &format!("the key id is {}, not {id}", key.key_id),
            ));
        }
        Ok(key)
    }

    /// Reads the signing key at `path`; when the file does not exist, generates one,
    /// writes it (mode 0600) and appends its public key to `trusted`. Returns the key and
    /// whether it was generated.
    pub fn read_or_generate(path: &Path, trusted: &Path) -> Result<(Self, bool), KeyError> {
        if path.exists() {
            return Self::read(path).map(|k| (k, false));
        }
        let key = Self::generate();
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| KeyError::Io { path, source }
        };
        for p in [path, trusted] {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
        }
        let secret = format!(
            "# Keel commit signing key: keep secret. Its public key is in the trusted keys file.\n{} {}\n",
            key.key_id,
            STANDARD.encode(key.key.to_bytes())
        );
        write_private(path, &secret).map_err(io(path))?;
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(trusted)
            .map_err(io(trusted))?;
        writeln!(file, "{}", key.trusted_line()).map_err(io(trusted))?;
        Ok((key, true))
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

/// What checking a commit's signature found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Signed by a trusted key, and the signature holds.
    Valid,
    /// The commit carries no signature.
    Missing,
    /// Signed with a key id nobody trusts.
    UnknownKey(String),
    /// The signature does not verify with the trusted key of that id.
    Invalid(String),
}

/// The public keys whose signatures verifiers accept, by key id.
#[derive(Clone, Debug, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, ed25519_dalek::VerifyingKey>,
}

impl TrustedKeys {
    /// Reads a trusted keys file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let mut keys = BTreeMap::new();
        for (line, id, public) in read_lines(path)? {
            let bytes: [u8; 32] = STANDARD
                .decode(&public)
                .ok()
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| malformed(path, line, "the public key is not 32 base64 bytes"))?;
            let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|e| malformed(path, line, &e.to_string()))?;
            if key_id_of(&key) != id {
                return Err(malformed(
                    path,
                    line,
                    &format!("the key id is {}, not {id}", key_id_of(&key)),
                ));
            }
            keys.insert(id, key);
        }
        Ok(Self { keys })
    }

    /// Trusts `key`'s public half.
    pub fn add(&mut self, key: &SigningKey) {
        self.keys
            .insert(key.key_id.clone(), key.key.verifying_key());
    }

    /// The trusted key ids.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    /// Checks `signature` over `hash`.
    pub fn check(&self, hash: &str, signature: Option<&Signature>) -> SignatureCheck {
        let Some(signature) = signature else {
            return SignatureCheck::Missing;
        };
        let Some(key) = self.keys.get(&signature.key_id) else {
            return SignatureCheck::UnknownKey(signature.key_id.clone());
        };
        let parsed = STANDARD
            .decode(&signature.value)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| ed25519_dalek::Signature::from_bytes(&b));
        match parsed {
            Some(sig) if key.verify(hash.as_bytes(), &sig).is_ok() => SignatureCheck::Valid,
            Some(_) => SignatureCheck::Invalid(format!(
                "the signature does not verify with key {}",
                signature.key_id
            )),
            None => SignatureCheck::Invalid("the signature is not 64 base64 bytes".into()),
        }
    }
}

fn malformed(path: &Path, line: usize, reason: &str) -> KeyError {
    KeyError::Malformed {
        path: path.display().to_string(),
        line,
        reason: reason.to_owned(),
    }
}

/// The `(line number, first word, second word)` of each non-comment line.
fn read_lines(path: &Path) -> Result<Vec<(usize, String, String)>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(id), Some(key), None) => out.push((i + 1, id.to_owned(), key.to_owned())),
            _ => return Err(malformed(path, i + 1, "expected `<key id> <base64 key>`")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_key_only() {
        let key = SigningKey::generate();
        let other = SigningKey::generate();
        let mut trusted = TrustedKeys::default();
        trusted.add(&key);
        let sig = key.sign("abc");
        assert_eq!(trusted.check("abc", Some(&sig)), SignatureCheck::Valid);
        assert!(matches!(
            trusted.check("abd", Some(&sig)),
            SignatureCheck::Invalid(_)
        ));
        assert_eq!(
            trusted.check("abc", Some(&other.sign("abc"))),
            SignatureCheck::UnknownKey(other.key_id().to_owned())
        );
        assert_eq!(trusted.check("abc", None), SignatureCheck::Missing);
        // A signature claiming a trusted key id but made with another key.
        let forged = Signature {
            key_id: key.key_id().to_owned(),
            value: other.sign("abc").value,
        };
        assert!(matches!(
            trusted.check("abc", Some(&forged)),
            SignatureCheck::Invalid(_)
        ));
    }

    #[test]
    fn key_files_round_trip_and_rotate() {
        let dir = std::env::temp_dir().join(format!("keel-keys-{}", uuid::Uuid::new_v4()));
        let (secret, trusted) = (dir.join("signing.key"), dir.join("trusted.keys"));
        let (first, generated) = SigningKey::read_or_generate(&secret, &trusted).unwrap();
        assert!(generated);
        let (again, generated) = SigningKey::read_or_generate(&secret, &trusted).unwrap();
        assert!(!generated);
        assert_eq!(again.key_id(), first.key_id());
        // Rotation: a new key appends its line; both keys stay trusted.
        std::fs::remove_file(&secret).unwrap();
        let (second, _) = SigningKey::read_or_generate(&secret, &trusted).unwrap();
        let keys = TrustedKeys::read(&trusted).unwrap();
        assert_eq!(keys.ids().count(), 2);
        assert_eq!(
            keys.check("h", Some(&first.sign("h"))),
            SignatureCheck::Valid
        );
        assert_eq!(
            keys.check("h", Some(&second.sign("h"))),
            SignatureCheck::Valid
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&secret).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_key_file_with_a_wrong_id_is_refused() {
        let dir = std::env::temp_dir().join(format!("keel-keys-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trusted.keys");
        let key = SigningKey::generate();
        let line = key.trusted_line();
        let (_, public) = line.split_once(' ').unwrap();
        std::fs::write(&path, format!("0000000000000000 {public}\n")).unwrap();
        let err = TrustedKeys::read(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
