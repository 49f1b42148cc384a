//! Keel's query API: reads the PostgreSQL views the projector keeps.
//!
//! Reads are eventually consistent and say how far the view has read
//! (`Keel-Projection-Position`); a request with a `Keel-Consistency-Token` from a command
//! response waits until the view has passed it, so a client reads its own writes.

pub mod consistency;
pub mod error;
pub mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tracing::info;

/// The query API's settings, from `KEEL_*` environment variables.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `KEEL_QUERY_ADDR`: where to listen (default `127.0.0.1:8081`; port 0 picks one).
    pub addr: SocketAddr,
    /// `KEEL_DATABASE_URL`: the projector's database.
    pub database_url: String,
}

impl Settings {
    /// Reads the settings from the environment.
    pub fn load() -> anyhow::Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let addr = var("KEEL_QUERY_ADDR").unwrap_or_else(|| "127.0.0.1:8081".into());
        Ok(Self {
            addr: addr
                .parse()
                .with_context(|| format!("KEEL_QUERY_ADDR {addr:?} is not a socket address"))?,
            database_url: var("KEEL_DATABASE_URL")
                .unwrap_or_else(|| projector::DEFAULT_DATABASE_URL.into()),
        })
    }
}

/// A built query API: database pool and listener.
pub struct Application {
    listener: TcpListener,
    state: routes::AppState,
}

impl Application {
    /// Prepares the pool (connected lazily, so the API starts before the database is
    /// ready; `/readyz` says when it is) and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let options: PgConnectOptions = settings
            .database_url
            .parse()
            .context("KEEL_DATABASE_URL is not a PostgreSQL URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        let listener = TcpListener::bind(settings.addr)
            .await
            .with_context(|| format!("binding {}", settings.addr))?;
        Ok(Self {
            listener,
            state: routes::AppState::new(pool),
        })
    }

    /// Serves until Ctrl-C or SIGTERM, then finishes in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        info!(addr = %self.listener.local_addr()?, "query API listening");
        axum::serve(self.listener, routes::app(self.state))
            .with_graceful_shutdown(keel_kafka::telemetry::shutdown_signal())
            .await
            .context("serving HTTP")
    }
}
