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
use ed25519_dalek::Signer;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{CommitRecord, FenceRecord, Timestamp};

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
        let [(line, words)] = lines.as_slice() else {
            return Err(malformed(path, 1, "must hold exactly one key line"));
        };
        let [id, secret] = words.as_slice() else {
            return Err(malformed(
                path,
                *line,
                "expected `<key id> <base64 secret>`",
            ));
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

/// The key policy every reader of the log applies, read from the trusted keys file that
/// is distributed to every process:
///
/// * `<key id> <base64 public key>`: a trusted key. A key becomes trusted by adding its
///   line to the file on every process (the command API appends the line of a key it
///   generates to its own copy).
/// * `<key id> <base64 public key> retired`: a retired key. The fences it signed, and the
///   history under them, still count for every reader replaying the log; but once a fence
///   of a key in service has counted on a partition, no fence it signs counts there again
///   (decided by log order, not by a time the signer could choose). Retire a key after the
///   command API ran with its successor, whose start fences every partition.
/// * `legacy-until <RFC 3339 time>`: the explicit cut-off for a log written before the
///   gate checked signatures: a fence without rules (see
///   [`FENCE_RULES`](crate::FENCE_RULES)) recorded up to then counts, with its commits
///   read by the rules of that time, until the first fence with rules on its partition.
///   Without the line, no legacy fence counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedKeys {
    keys: BTreeMap<String, ed25519_dalek::VerifyingKey>,
    retired: std::collections::BTreeSet<String>,
    legacy_until: Option<Timestamp>,
}

/// What a commit's content and signature show, checked without the partition's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitCheck {
    /// The commit's hash recomputes from its content.
    pub hash_ok: bool,
    /// The trusted key whose signature over the hash verifies, or why none does.
    pub signer: Result<String, String>,
}

impl TrustedKeys {
    /// Reads a trusted keys file.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let mut policy = Self::default();
        for (line, words) in read_lines(path)? {
            if words[0] == "legacy-until" {
                let at = words
                    .get(1)
                    .filter(|_| words.len() == 2)
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .ok_or_else(|| {
                        malformed(path, line, "expected `legacy-until <RFC 3339 time>`")
                    })?;
                policy.legacy_until = Some(at);
                continue;
            }
            let (id, public, retired) = match words.as_slice() {
                [id, public] => (id.clone(), public.clone(), false),
                [id, public, word] if word == "retired" => (id.clone(), public.clone(), true),
                _ => {
                    return Err(malformed(
                        path,
                        line,
                        "expected `<key id> <base64 key> [retired]` or `legacy-until <time>`",
                    ));
                }
            };
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
            if retired {
                policy.retired.insert(id.clone());
            }
            policy.keys.insert(id, key);
        }
        Ok(policy)
    }

    /// Retires the key `key_id` (see the type's documentation).
    pub fn retire(&mut self, key_id: &str) {
        self.retired.insert(key_id.to_owned());
    }

    /// Lets legacy fences recorded up to `at` count (see the type's documentation).
    pub fn allow_legacy_until(&mut self, at: Timestamp) {
        self.legacy_until = Some(at);
    }

    /// The time up to which legacy fences count, if any do.
    pub fn legacy_until(&self) -> Option<Timestamp> {
        self.legacy_until
    }

    /// True when `key_id` is retired.
    pub fn is_retired(&self, key_id: &str) -> bool {
        self.retired.contains(key_id)
    }

    /// True when `key_id` is a trusted key.
    pub fn trusts(&self, key_id: &str) -> bool {
        self.keys.contains_key(key_id)
    }

    /// The trusted key whose signature over the fence verifies, or why none does.
    pub fn fence_signer(&self, fence: &FenceRecord) -> Result<String, String> {
        signer(
            self.check(&fence.digest(), fence.signature.as_ref()),
            fence.signature.as_ref(),
        )
    }

    /// Checks a commit's hash and signature: work that needs no partition state, so a
    /// reader can do it ahead of the gate, in parallel.
    pub fn check_commit(&self, commit: &CommitRecord) -> CommitCheck {
        CommitCheck {
            hash_ok: commit.hash_is_valid(),
            signer: signer(
                self.check(&commit.hash, commit.signature.as_ref()),
                commit.signature.as_ref(),
            ),
        }
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
    ///
    /// Verified as [`TrustedKeys::check_commits`] verifies a batch (a batch of one), so
    /// every reader, checking one record or many, decides every signature alike.
    pub fn check(&self, hash: &str, signature: Option<&Signature>) -> SignatureCheck {
        match self.parse(signature) {
            Ok((key, sig)) if verifies(&[hash.as_bytes()], &[sig], &[*key]) => {
                SignatureCheck::Valid
            }
            Ok(_) => SignatureCheck::Invalid(format!(
                "the signature does not verify with key {}",
                signature.map_or("", |s| s.key_id.as_str())
            )),
            Err(check) => check,
        }
    }

    /// The trusted key a signature names and the signature itself, or what is wrong.
    fn parse(
        &self,
        signature: Option<&Signature>,
    ) -> Result<(&ed25519_dalek::VerifyingKey, ed25519_dalek::Signature), SignatureCheck> {
        let Some(signature) = signature else {
            return Err(SignatureCheck::Missing);
        };
        let Some(key) = self.keys.get(&signature.key_id) else {
            return Err(SignatureCheck::UnknownKey(signature.key_id.clone()));
        };
        STANDARD
            .decode(&signature.value)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .map(|b| (key, ed25519_dalek::Signature::from_bytes(&b)))
            .ok_or_else(|| SignatureCheck::Invalid("the signature is not 64 base64 bytes".into()))
    }

    /// [`TrustedKeys::check_commit`] for many commits at once: their signatures are
    /// verified together (Ed25519 batch verification, about twice as fast as one by one),
    /// and one by one only when the batch does not verify, to tell which fail.
    pub fn check_commits(&self, commits: &[&CommitRecord]) -> Vec<CommitCheck> {
        let parsed: Vec<_> = commits
            .iter()
            .map(|c| self.parse(c.signature.as_ref()))
            .collect();
        let batch: Vec<(
            usize,
            &ed25519_dalek::VerifyingKey,
            ed25519_dalek::Signature,
        )> = parsed
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().ok().map(|(key, sig)| (i, *key, *sig)))
            .collect();
        let messages: Vec<&[u8]> = batch
            .iter()
            .map(|(i, _, _)| commits[*i].hash.as_bytes())
            .collect();
        let signatures: Vec<ed25519_dalek::Signature> = batch.iter().map(|b| b.2).collect();
        let keys: Vec<ed25519_dalek::VerifyingKey> = batch.iter().map(|b| *b.1).collect();
        let all_valid =
            !batch.is_empty() && ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok();
        commits
            .iter()
            .zip(parsed)
            .map(|(commit, parsed)| {
                let check = match parsed {
                    Ok(_) if all_valid => SignatureCheck::Valid,
                    Ok(_) => self.check(&commit.hash, commit.signature.as_ref()),
                    Err(check) => check,
                };
                CommitCheck {
                    hash_ok: commit.hash_is_valid(),
                    signer: signer(check, commit.signature.as_ref()),
                }
            })
            .collect()
    }
}

/// Ed25519 batch verification: the one way Keel verifies a signature, alone or with others.
fn verifies(
    messages: &[&[u8]],
    signatures: &[ed25519_dalek::Signature],
    keys: &[ed25519_dalek::VerifyingKey],
) -> bool {
    ed25519_dalek::verify_batch(messages, signatures, keys).is_ok()
}

fn signer(check: SignatureCheck, signature: Option<&Signature>) -> Result<String, String> {
    match (check, signature) {
        (SignatureCheck::Valid, Some(s)) => Ok(s.key_id.clone()),
        (SignatureCheck::Valid, None) | (SignatureCheck::Missing, _) => {
            Err("it is not signed".into())
        }
        (SignatureCheck::UnknownKey(id), _) => {
            Err(format!("it is signed with key {id}, which is not trusted"))
        }
        (SignatureCheck::Invalid(why), _) => Err(why),
    }
}

fn malformed(path: &Path, line: usize, reason: &str) -> KeyError {
    KeyError::Malformed {
        path: path.display().to_string(),
        line,
        reason: reason.to_owned(),
    }
}

/// The line number and the words of each non-comment line.
fn read_lines(path: &Path) -> Result<Vec<(usize, Vec<String>)>, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(text
        .lines()
        .enumerate()
        .filter_map(|(i, line)| {
            let line = line.split('#').next().unwrap_or_default().trim();
            (!line.is_empty())
                .then(|| (i + 1, line.split_whitespace().map(str::to_owned).collect()))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_commits_is_checked_as_one_by_one() {
        let key = SigningKey::generate();
        let stranger = SigningKey::generate();
        let mut trusted = TrustedKeys::default();
        trusted.add(&key);
        let writer = crate::testing::writer("w", 1);
        let commit = |i: usize, by: &SigningKey| {
            crate::testing::commit(
                &writer,
                crate::testing::stream("order", format!("o-{i}")),
                0,
            )
            .event("OrderShipped", 1, serde_json::json!({}))
            .command("ShipOrder", "test")
            .signed(by)
        };
        let mut commits: Vec<CommitRecord> = (0..8).map(|i| commit(i, &key)).collect();
        let all: Vec<&CommitRecord> = commits.iter().collect();
        assert!(
            trusted
                .check_commits(&all)
                .iter()
                .all(|c| c.hash_ok && c.signer.as_deref() == Ok(key.key_id()))
        );
        // One signature forged for a trusted key, one by a stranger, one hash tampered.
        commits[2].signature = Some(Signature {
            key_id: key.key_id().to_owned(),
            value: stranger.sign(&commits[2].hash).value,
        });
        commits[5] = commit(5, &stranger);
        commits[6].hash = "0".repeat(64);
        let all: Vec<&CommitRecord> = commits.iter().collect();
        let batch = trusted.check_commits(&all);
        let one_by_one: Vec<CommitCheck> = all.iter().map(|c| trusted.check_commit(c)).collect();
        assert_eq!(batch, one_by_one);
        let failed: Vec<usize> = (0..8).filter(|i| batch[*i].signer.is_err()).collect();
        assert_eq!(failed, [2, 5, 6]);
        assert!(!batch[6].hash_ok);
    }

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
