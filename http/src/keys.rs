//! Reading a file of token verification keys: a JWKS document, or PEM public keys.
//!
//! Only RS256 (RSA of at least 2048 bits) and ES256 (P-256) keys are used. A key of another
//! kind, or one marked for encryption, is skipped with a warning, as identity providers
//! publish such keys beside their signing keys. Private key material, and symmetric (`oct`)
//! keys, make the whole file refused: a public key file that holds them is a mistake that
//! must not go unnoticed.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, DecodingKey};
use pkcs1::RsaPublicKey;
use pkcs1::der::Decode;
use serde_json::Value;
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};
use tracing::warn;

/// Smallest RSA modulus accepted, in bits.
pub(crate) const MIN_RSA_BITS: usize = 2048;

/// rsaEncryption (RFC 8017).
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
/// id-ecPublicKey (RFC 5480).
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// secp256r1, P-256 (RFC 5480).
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// One verification key, pinned to one algorithm.
pub(crate) struct Key {
    /// The JWKS `kid`, when it has one.
    pub(crate) kid: Option<String>,
    /// The one algorithm it verifies.
    pub(crate) algorithm: Algorithm,
    /// The key.
    pub(crate) key: DecodingKey,
}

/// The keys of a key file's contents.
pub(crate) fn parse(text: &str) -> anyhow::Result<Vec<Key>> {
    let keys = if text.trim_start().starts_with('{') {
        jwks(text)?
    } else {
        pem(text)?
    };
    anyhow::ensure!(
        !keys.is_empty(),
        "the token key file holds no usable RS256 or ES256 public key"
    );
    Ok(keys)
}

fn jwks(text: &str) -> anyhow::Result<Vec<Key>> {
    let doc: Value =
        serde_json::from_str(text).map_err(|e| anyhow::anyhow!("not a JWKS document: {e}"))?;
    let entries = doc["keys"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("a JWKS document needs a \"keys\" array"))?;
    let mut keys = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let name = entry["kid"]
            .as_str()
            .map_or_else(|| format!("#{i}"), |k| format!("{k:?}"));
        // Private parts of RSA and EC keys, or a shared secret: refuse the file.
        if ["d", "p", "q", "dp", "dq", "qi", "k"]
            .iter()
            .any(|p| entry.get(*p).is_some())
        {
            anyhow::bail!(
                "key {name} holds private or secret key material: publish public keys only"
            );
        }
        let skip = |why: String| warn!(key = %name, "skipping a token key: {why}");
        if entry.get("use").is_some_and(|u| u != "sig") {
            skip(format!("its use is {}, not sig", entry["use"]));
            continue;
        }
        let algorithm = match (entry["kty"].as_str(), entry["alg"].as_str()) {
            (Some("RSA"), None | Some("RS256")) => Algorithm::RS256,
            (Some("EC"), None | Some("ES256")) if entry["crv"] == "P-256" => Algorithm::ES256,
            (kty, alg) => {
                skip(format!(
                    "{kty:?} {alg:?} is neither RS256 nor ES256 on P-256"
                ));
                continue;
            }
        };
        if algorithm == Algorithm::RS256 {
            let bits = entry["n"]
                .as_str()
                .and_then(|n| URL_SAFE_NO_PAD.decode(n).ok())
                .map_or(0, |n| significant_bits(&n));
            if bits < MIN_RSA_BITS {
                skip(format!(
                    "an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed"
                ));
                continue;
            }
        }
        let jwk: Jwk = serde_json::from_value(entry.clone())
            .map_err(|e| anyhow::anyhow!("key {name}: {e}"))?;
        let key = DecodingKey::from_jwk(&jwk).map_err(|e| anyhow::anyhow!("key {name}: {e}"))?;
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            algorithm,
            key,
        });
    }
    Ok(keys)
}

/// `text` with its lines trimmed and blank ones left out, once every BEGIN line is closed by
/// its END line before the next BEGIN and no END line stands alone: the PEM parser skips
/// what is outside a block, and a broken block must refuse the file instead.
fn framed(text: &str) -> anyhow::Result<String> {
    let mut open: Option<&str> = None;
    let mut kept = String::with_capacity(text.len());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let label = |prefix: &str| line.strip_prefix(prefix)?.strip_suffix("-----");
        if let Some(begun) = label("-----BEGIN ") {
            anyhow::ensure!(open.is_none(), "a PEM block has no END line");
            open = Some(begun);
        } else if let Some(ended) = label("-----END ") {
            anyhow::ensure!(
                open.take() == Some(ended),
                "a PEM END line does not close its block"
            );
        }
        kept.push_str(line);
        kept.push('\n');
    }
    anyhow::ensure!(open.is_none(), "a PEM block has no END line");
    Ok(kept)
}

fn pem(text: &str) -> anyhow::Result<Vec<Key>> {
    let blocks = ::pem::parse_many(framed(text)?)
        .map_err(|e| anyhow::anyhow!("the PEM file does not parse: {e}"))?;
    let mut keys = Vec::new();
    for block in blocks {
        let label = block.tag();
        if label.contains("PRIVATE KEY") {
            anyhow::bail!("the token key file holds a private key: give it public keys only");
        }
        if label != "PUBLIC KEY" {
            warn!(label, "skipping a PEM block that is not a PUBLIC KEY");
            continue;
        }
        let spki = SubjectPublicKeyInfoRef::try_from(block.contents())
            .map_err(|e| anyhow::anyhow!("a PEM public key is not a SubjectPublicKeyInfo: {e}"))?;
        let public = spki.subject_public_key.raw_bytes();
        let algorithm = spki.algorithm.oid;
        let key = if algorithm == RSA_ENCRYPTION {
            let rsa = RsaPublicKey::from_der(public)
                .map_err(|e| anyhow::anyhow!("a PEM RSA public key does not parse: {e}"))?;
            let bits = significant_bits(rsa.modulus.as_bytes());
            if bits < MIN_RSA_BITS {
                warn!(
                    bits,
                    "skipping an RSA key of fewer than {MIN_RSA_BITS} bits"
                );
                continue;
            }
            Key {
                kid: None,
                algorithm: Algorithm::RS256,
                key: DecodingKey::from_rsa_der(public),
            }
        } else if algorithm == EC_PUBLIC_KEY
            && spki.algorithm.parameters_oid().ok() == Some(SECP256R1)
        {
            Key {
                kid: None,
                algorithm: Algorithm::ES256,
                key: DecodingKey::from_ec_der(public),
            }
        } else {
            warn!(%algorithm, "skipping a PEM public key that is neither RSA nor P-256");
            continue;
        };
        keys.push(key);
    }
    Ok(keys)
}

/// The bits of a big-endian unsigned integer, leading zero bytes left out.
fn significant_bits(bytes: &[u8]) -> usize {
    bytes.iter().skip_while(|b| **b == 0).count() * 8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A P-256 public key (SubjectPublicKeyInfo), made with `openssl pkey -pubout`.
    const EC_PUB: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE+j5RiQ+q2FFV+n7zT9NWdP/c89L+
aB4vdMbr7MuFSSv6S4zxlhO/8DahRdfmRkTropAsSTA5Fnbm1jcd5vaTNw==
-----END PUBLIC KEY-----
";

    #[test]
    fn pem_public_keys_are_read_and_private_ones_refused() {
        let keys = parse(EC_PUB).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].algorithm, Algorithm::ES256);
        let two = format!("{EC_PUB}\n{EC_PUB}");
        assert_eq!(parse(&two).unwrap().len(), 2);
        let private = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(
            parse(private)
                .err()
                .unwrap()
                .to_string()
                .contains("private")
        );
        // A block without its END does not swallow the next one.
        let broken = EC_PUB.replace("-----END PUBLIC KEY-----\n", "");
        assert!(parse(&format!("{broken}{EC_PUB}")).is_err());
        assert!(parse("no keys here").is_err());
    }

    /// An RSA public key of 2048 bits, and one of 1024, made with `openssl rsa -pubout`.
    const RSA_2048_PUB: &str = "-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAvbE+mFT0yQ7BiqSVkKbi
K9A3Ag1GG8xV4JAW2FJLOrO0eDkDQNusftnoiDF/qrp3jmAbBRlw/yLI6qqWwKvo
Ks3plJXbMfZxa1yZGtzx6PyNGQlDdHyfZAupyx8K1ihc/GEdESurOemhs3KnaUQg
ASUZXioDYIhFhhkBfVTkaj/fw4JmbciLJhp8R+EnBA1ZV4sc2V8idrnHLwtuU1oC
8jIC+wmzD3UtWAMusbWVIE3j+sr7zgOTUEkZKE8S3yeXNb3Bln+zZCiUlcTJeV+J
XayiIldPTZtCABS93/jkWF/xGI/GE9J5CECJVVeodSokTYLgqvn/bkM8ihEHyT4b
TQIDAQAB
-----END PUBLIC KEY-----
";
    const RSA_1024_PUB: &str = "-----BEGIN PUBLIC KEY-----
MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDmoZjbH98jpAxps55M3ZGGMTA8
5gRxTfaHqfGGwGRkyEe5xDZdno0w8+OHIVq90XfBejQSm9SDCFWNacQThvsmxXIX
FPfCJa7oDq7FtcBjUPxV7wPz9m9+hzvHenSE3CmhUlj3qhihmY65RI2FWHRNVzoo
4PpzRfn/f9O1HiNXmwIDAQAB
-----END PUBLIC KEY-----
";

    #[test]
    fn rsa_keys_need_2048_bits_and_the_framing_must_hold() {
        let keys = parse(RSA_2048_PUB).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].algorithm, Algorithm::RS256);
        // A short key is skipped: alone, the file holds no usable key.
        assert!(parse(RSA_1024_PUB).is_err());
        assert_eq!(parse(&format!("{RSA_1024_PUB}{EC_PUB}")).unwrap().len(), 1);
        // Blank lines and indentation do not matter; an END without its BEGIN does.
        let loose = EC_PUB.replace('\n', "\n\n  ");
        assert_eq!(parse(&loose).unwrap().len(), 1);
        assert!(parse(&format!("-----END PUBLIC KEY-----\n{EC_PUB}")).is_err());
        assert!(parse(&format!("{EC_PUB}-----END PUBLIC KEY-----\n")).is_err());
        let mismatched = EC_PUB.replace("END PUBLIC KEY", "END RSA PUBLIC KEY");
        assert!(parse(&mismatched).is_err());
    }

    #[test]
    fn jwks_skips_other_keys_and_refuses_secrets() {
        let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "a",
            "x": "-j5RiQ-q2FFV-n7zT9NWdP_c89L-aB4vdMbr7MuFSSs", "y": "-kuM8ZYTv_A2oUXX5kZE66KQLEkwORZ25tY3Heb2kzc"});
        let enc = serde_json::json!({"kty": "RSA", "use": "enc", "n": "AQAB", "e": "AQAB"});
        let small = serde_json::json!({"kty": "RSA", "n": "AQAB", "e": "AQAB"});
        let ed = serde_json::json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"});
        let doc = serde_json::json!({"keys": [enc, ec, small, ed]}).to_string();
        let keys = parse(&doc).unwrap();
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].kid.as_deref(), Some("a"));
        let secret = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
        assert!(parse(&secret).err().unwrap().to_string().contains("secret"));
        let private = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "d": "AA", "x": "AA", "y": "AA"}]});
        assert!(parse(&private.to_string()).is_err());
    }
}
