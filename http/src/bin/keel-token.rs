//! `keel-token`: prints a development bearer token signed with the HS256 secret that
//! `make up` keeps in `.keel/auth.secret`. `make token ROLE=... SUB=...` runs it.
//!
//! Production tokens come from your identity provider; this tool is for local use.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use keel_http::auth::{Claims, Role, now_secs, sign_hs256};
use keel_http::settings::read_secret_file;

/// Prints a signed development token.
#[derive(Parser)]
#[command(name = "keel-token", version)]
struct Args {
    /// The subject: recorded as the actor of every command sent with the token.
    #[arg(long, default_value = "dev")]
    sub: String,
    /// Roles, comma-separated: commands:write, queries:read, audit:read, admin, or all.
    #[arg(long, default_value = "all")]
    roles: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
    /// The HS256 secret file.
    #[arg(
        long,
        env = "KEEL_AUTH_HS256_SECRET_FILE",
        default_value = ".keel/auth.secret"
    )]
    secret_file: PathBuf,
    /// The issuer.
    #[arg(long, env = "KEEL_AUTH_ISSUER", default_value = "keel")]
    issuer: String,
    /// The audience.
    #[arg(long, env = "KEEL_AUTH_AUDIENCE", default_value = "keel")]
    audience: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let secret = read_secret_file(&args.secret_file).with_context(|| {
        format!(
            "reading {}: run `make up` once to make the development secret",
            args.secret_file.display()
        )
    })?;
    let mut roles = Vec::new();
    for name in args
        .roles
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
    {
        if name == "all" {
            roles.extend(Role::ALL.iter().map(|r| r.as_str().to_owned()));
        } else if Role::parse(name).is_some() {
            roles.push(name.to_owned());
        } else {
            bail!(
                "unknown role {name:?}: use commands:write, queries:read, audit:read, admin or all"
            );
        }
    }
    let now = now_secs();
    let claims = Claims {
        sub: args.sub,
        iss: args.issuer,
        aud: args.audience,
        exp: now + args.ttl,
        iat: now,
        roles,
    };
    println!("{}", sign_hs256(&secret, &claims)?);
    Ok(())
}
