//! The edge's settings, from `KEEL_*` environment variables, shared by both APIs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::auth::{AuthSettings, KeySource};

/// How each API guards its `/v1` routes.
#[derive(Clone, Debug)]
pub struct EdgeSettings {
    /// `None` only with an explicit `KEEL_AUTH=off`.
    pub auth: Option<AuthSettings>,
    /// `KEEL_RATE_LIMIT_RPS`: requests per second allowed to each token subject (default
    /// 1000; 0 turns the limit off).
    pub rate_per_sec: f64,
    /// `KEEL_RATE_LIMIT_BURST`: requests a subject may send at once, the size of its
    /// bucket (default twice the rate).
    pub burst: f64,
    /// `KEEL_HTTP_MAX_IN_FLIGHT`: requests served at once; more are answered 503 at once
    /// (default 1024).
    pub max_in_flight: usize,
    /// `KEEL_HTTP_TIMEOUT_MS`: the longest a request may take, end to end (default 40 s,
    /// above the query API's longest consistency wait of 30 s).
    pub timeout: Duration,
    /// `KEEL_HTTP_HEADER_TIMEOUT_MS`: the longest a client may take to send its request
    /// headers (default 10 s).
    pub header_timeout: Duration,
    /// `KEEL_TLS_CERT` and `KEEL_TLS_KEY`: serve HTTPS with this PEM certificate chain and key.
    pub tls: Option<TlsFiles>,
    /// `KEEL_METRICS_ROLE`: the role a token needs to read `/metrics`; `None` (the
    /// default): open, like `/healthz`.
    pub metrics_role: Option<crate::Role>,
    /// The origins whose pages may read the routes the API opens to other origins.
    pub cors_origins: Vec<String>,
}

/// A PEM certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The certificate chain.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}

/// A secret given as an option or an environment variable: it never prints, in `Debug`
/// output or in `--help`.
#[derive(Clone)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// The HTTP edge's options of an API binary, each also read from its environment variable.
#[derive(Clone, Debug, clap::Args)]
pub struct EdgeArgs {
    /// Bearer-token authentication on every /v1 route: on, or off for local experiments.
    #[arg(long, env = "KEEL_AUTH", default_value = "on", value_name = "on|off")]
    pub auth: String,
    /// The HS256 secret tokens are signed with, at least 32 bytes (prefer the file).
    #[arg(
        long,
        env = "KEEL_AUTH_HS256_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    pub auth_hs256_secret: Option<Secret>,
    /// A file holding the HS256 secret.
    #[arg(long, env = "KEEL_AUTH_HS256_SECRET_FILE", value_name = "PATH")]
    pub auth_hs256_secret_file: Option<String>,
    /// RS256/ES256 public keys (a JWKS document or PEM blocks), read again when it changes.
    #[arg(long, env = "KEEL_AUTH_JWKS_FILE", value_name = "PATH")]
    pub auth_jwks_file: Option<String>,
    /// The issuer (`iss`) tokens must name.
    #[arg(long, env = "KEEL_AUTH_ISSUER", default_value = "keel")]
    pub auth_issuer: String,
    /// The audience (`aud`) tokens must name.
    #[arg(long, env = "KEEL_AUTH_AUDIENCE", default_value = "keel")]
    pub auth_audience: String,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    #[arg(
        long,
        env = "KEEL_AUTH_LEEWAY_SECS",
        default_value = "30",
        value_name = "S"
    )]
    pub auth_leeway_secs: String,
    /// Requests per second allowed to each token subject (0: no limit).
    #[arg(
        long,
        env = "KEEL_RATE_LIMIT_RPS",
        default_value = "1000",
        value_name = "N"
    )]
    pub rate_limit_rps: String,
    /// Requests a subject may send at once (default: twice the rate).
    #[arg(long, env = "KEEL_RATE_LIMIT_BURST", value_name = "N")]
    pub rate_limit_burst: Option<String>,
    /// Requests served at once; more are answered 503 at once.
    #[arg(
        long,
        env = "KEEL_HTTP_MAX_IN_FLIGHT",
        default_value = "1024",
        value_name = "N"
    )]
    pub http_max_in_flight: String,
    /// The longest a request may take, end to end, in milliseconds.
    #[arg(
        long,
        env = "KEEL_HTTP_TIMEOUT_MS",
        default_value = "40000",
        value_name = "MS"
    )]
    pub http_timeout_ms: String,
    /// The longest a client may take to send its request headers, in milliseconds.
    #[arg(
        long,
        env = "KEEL_HTTP_HEADER_TIMEOUT_MS",
        default_value = "10000",
        value_name = "MS"
    )]
    pub http_header_timeout_ms: String,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, env = "KEEL_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<String>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "KEEL_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<String>,
    /// The role a token needs to read /metrics (default: open, like /healthz).
    #[arg(long, env = "KEEL_METRICS_ROLE", value_name = "ROLE")]
    pub metrics_role: Option<String>,
    /// Origins (comma-separated `scheme://host[:port]`) whose pages may read the routes this
    /// API opens to other origins (the command API: `/v1/partitions` and `/metrics`, for the
    /// console). Default: none.
    #[arg(long, env = "KEEL_CORS_ORIGINS", value_name = "ORIGINS")]
    pub cors_origins: Option<String>,
}

impl EdgeArgs {
    /// The settings these options give, validated.
    pub fn settings(&self) -> anyhow::Result<EdgeSettings> {
        EdgeSettings::from_vars(|name| match name {
            "KEEL_AUTH" => Some(self.auth.clone()),
            "KEEL_AUTH_HS256_SECRET" => self.auth_hs256_secret.as_ref().map(|s| s.0.clone()),
            "KEEL_AUTH_HS256_SECRET_FILE" => self.auth_hs256_secret_file.clone(),
            "KEEL_AUTH_JWKS_FILE" => self.auth_jwks_file.clone(),
            "KEEL_AUTH_ISSUER" => Some(self.auth_issuer.clone()),
            "KEEL_AUTH_AUDIENCE" => Some(self.auth_audience.clone()),
            "KEEL_AUTH_LEEWAY_SECS" => Some(self.auth_leeway_secs.clone()),
            "KEEL_RATE_LIMIT_RPS" => Some(self.rate_limit_rps.clone()),
            "KEEL_RATE_LIMIT_BURST" => self.rate_limit_burst.clone(),
            "KEEL_HTTP_MAX_IN_FLIGHT" => Some(self.http_max_in_flight.clone()),
            "KEEL_HTTP_TIMEOUT_MS" => Some(self.http_timeout_ms.clone()),
            "KEEL_HTTP_HEADER_TIMEOUT_MS" => Some(self.http_header_timeout_ms.clone()),
            "KEEL_TLS_CERT" => self.tls_cert.clone(),
            "KEEL_TLS_KEY" => self.tls_key.clone(),
            "KEEL_METRICS_ROLE" => self.metrics_role.clone(),
            "KEEL_CORS_ORIGINS" => self.cors_origins.clone(),
            _ => None,
        })
    }
}

impl EdgeSettings {
    /// Reads the settings through `var`, as from the environment.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let number = |name: &str, default: u64| -> anyhow::Result<u64> {
            match var(name) {
                None => Ok(default),
                Some(v) => v
                    .trim()
                    .parse()
                    .with_context(|| format!("{name} {v:?} is not a whole number")),
            }
        };
        let auth = match var("KEEL_AUTH").as_deref().map(str::trim) {
            Some("off") => None,
            None | Some("on") => Some(auth_settings(&var, &number)?),
            Some(other) => bail!("KEEL_AUTH {other:?} must be on or off"),
        };
        let rate_per_sec = number("KEEL_RATE_LIMIT_RPS", 1000)? as f64;
        let burst = number("KEEL_RATE_LIMIT_BURST", (rate_per_sec * 2.0) as u64)? as f64;
        if rate_per_sec > 0.0 && burst < 1.0 {
            bail!("KEEL_RATE_LIMIT_BURST must be at least 1");
        }
        let max_in_flight = number("KEEL_HTTP_MAX_IN_FLIGHT", 1024)? as usize;
        if max_in_flight == 0 {
            bail!("KEEL_HTTP_MAX_IN_FLIGHT must be at least 1");
        }
        let tls = match (var("KEEL_TLS_CERT"), var("KEEL_TLS_KEY")) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.into(),
                key: key.into(),
            }),
            _ => bail!("KEEL_TLS_CERT and KEEL_TLS_KEY go together: set both or neither"),
        };
        let metrics_role = match var("KEEL_METRICS_ROLE") {
            None => None,
            Some(name) => match crate::Role::parse(name.trim()) {
                Some(role) if auth.is_some() => Some(role),
                Some(_) => bail!("KEEL_METRICS_ROLE needs authentication on (KEEL_AUTH=on)"),
                None => bail!(
                    "KEEL_METRICS_ROLE {name:?} is not a role: use one of {}",
                    crate::Role::ALL.map(crate::Role::as_str).join(", ")
                ),
            },
        };
        let cors_origins = match var("KEEL_CORS_ORIGINS") {
            Some(text) => crate::cors::parse_origins(&text)?,
            None => Vec::new(),
        };
        Ok(Self {
            auth,
            metrics_role,
            cors_origins,
            rate_per_sec,
            burst,
            max_in_flight,
            timeout: Duration::from_millis(number("KEEL_HTTP_TIMEOUT_MS", 40_000)?.max(1)),
            header_timeout: Duration::from_millis(
                number("KEEL_HTTP_HEADER_TIMEOUT_MS", 10_000)?.max(1),
            ),
            tls,
        })
    }
}

/// An HS256 secret kept in a file: its contents without surrounding whitespace (a final
/// newline is not part of the secret). The services and `keel-token` read it alike.
pub fn read_secret_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    Ok(std::fs::read_to_string(path)?.trim().as_bytes().to_vec())
}

fn auth_settings(
    var: &impl Fn(&str) -> Option<String>,
    number: &impl Fn(&str, u64) -> anyhow::Result<u64>,
) -> anyhow::Result<AuthSettings> {
    let secret = match (
        var("KEEL_AUTH_HS256_SECRET"),
        var("KEEL_AUTH_HS256_SECRET_FILE"),
    ) {
        (Some(_), Some(_)) => {
            bail!("set KEEL_AUTH_HS256_SECRET or KEEL_AUTH_HS256_SECRET_FILE, not both")
        }
        (Some(secret), None) => Some(secret.into_bytes()),
        (None, Some(path)) => Some(
            read_secret_file(path.as_ref())
                .with_context(|| format!("reading KEEL_AUTH_HS256_SECRET_FILE {path:?}"))?,
        ),
        (None, None) => None,
    };
    let keys = match (secret, var("KEEL_AUTH_JWKS_FILE")) {
        (Some(_), Some(_)) => bail!(
            "set an HS256 secret or KEEL_AUTH_JWKS_FILE, not both: each API pins one kind of key"
        ),
        (Some(secret), None) => KeySource::Hs256(secret),
        (None, Some(path)) => KeySource::PublicKeyFile(path.into()),
        (None, None) => bail!(
            "authentication is on and has no keys: set KEEL_AUTH_JWKS_FILE (RS256/ES256 public \
             keys) or KEEL_AUTH_HS256_SECRET[_FILE]; `make up` makes a development secret. \
             KEEL_AUTH=off turns authentication off, for local experiments only"
        ),
    };
    Ok(AuthSettings {
        keys,
        issuer: var("KEEL_AUTH_ISSUER").unwrap_or_else(|| "keel".into()),
        audience: var("KEEL_AUTH_AUDIENCE").unwrap_or_else(|| "keel".into()),
        leeway: Duration::from_secs(number("KEEL_AUTH_LEEWAY_SECS", 30)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> anyhow::Result<EdgeSettings> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EdgeSettings::from_vars(|name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn auth_is_on_by_default_and_needs_keys() {
        let e = from(&[]).unwrap_err().to_string();
        assert!(e.contains("has no keys"), "{e}");
        assert!(from(&[("KEEL_AUTH", "off")]).unwrap().auth.is_none());
        assert!(from(&[("KEEL_AUTH", "maybe")]).is_err());
        let s = from(&[("KEEL_AUTH_HS256_SECRET", "x".repeat(32).as_str())]).unwrap();
        assert!(matches!(s.auth.unwrap().keys, KeySource::Hs256(_)));
    }

    #[test]
    fn one_kind_of_key_and_both_tls_files() {
        assert!(
            from(&[
                ("KEEL_AUTH_HS256_SECRET", "s"),
                ("KEEL_AUTH_JWKS_FILE", "/k")
            ])
            .is_err()
        );
        assert!(from(&[("KEEL_AUTH", "off"), ("KEEL_TLS_CERT", "/c")]).is_err());
        assert!(from(&[("KEEL_AUTH", "off"), ("KEEL_RATE_LIMIT_RPS", "ten")]).is_err());
    }

    #[test]
    fn options_give_the_settings_and_hide_the_secret() {
        use clap::{CommandFactory, Parser};
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            edge: EdgeArgs,
        }
        let secret = "an-options-secret-of-32-bytes-or-more";
        let cli = Cli::parse_from(["x", "--auth-hs256-secret", secret, "--rate-limit-rps", "5"]);
        assert!(!format!("{:?}", cli.edge).contains(secret));
        let settings = cli.edge.settings().unwrap();
        assert_eq!((settings.rate_per_sec, settings.burst), (5.0, 10.0));
        assert!(matches!(settings.auth.unwrap().keys, KeySource::Hs256(_)));
        let help = Cli::command().render_long_help().to_string();
        for name in [
            "KEEL_AUTH_HS256_SECRET",
            "KEEL_RATE_LIMIT_RPS",
            "KEEL_TLS_KEY",
        ] {
            assert!(help.contains(name), "{name} in --help");
        }
        let off = Cli::parse_from(["x", "--auth", "off"])
            .edge
            .settings()
            .unwrap();
        assert!(off.auth.is_none());
    }

    #[test]
    fn metrics_are_open_unless_a_role_is_named() {
        let secret = "x".repeat(32);
        let open = from(&[("KEEL_AUTH_HS256_SECRET", &secret)]).unwrap();
        assert_eq!(open.metrics_role, None);
        let guarded = from(&[
            ("KEEL_AUTH_HS256_SECRET", &secret),
            ("KEEL_METRICS_ROLE", "admin"),
        ])
        .unwrap();
        assert_eq!(guarded.metrics_role, Some(crate::Role::Admin));
        let e = from(&[
            ("KEEL_AUTH_HS256_SECRET", &secret),
            ("KEEL_METRICS_ROLE", "root"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("not a role") && e.contains("admin"), "{e}");
        assert!(from(&[("KEEL_AUTH", "off"), ("KEEL_METRICS_ROLE", "admin")]).is_err());
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let secret = "a-secret-that-must-not-be-printed";
        let s = from(&[("KEEL_AUTH_HS256_SECRET", secret)]).unwrap();
        assert!(!format!("{s:?}").contains(secret));
    }
}
