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
use keel_http::{Edge, EdgeSettings};
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
    /// Authentication, limits and TLS (`KEEL_AUTH*`, `KEEL_RATE_LIMIT_*`, `KEEL_HTTP_*`,
    /// `KEEL_TLS_*`).
    pub edge: EdgeSettings,
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
                .unwrap_or_else(|| keel_views::DEFAULT_DATABASE_URL.into()),
            edge: EdgeSettings::from_env().context("reading the HTTP settings")?,
        })
    }
}

/// A built query API: database pool and listener.
pub struct Application {
    listener: TcpListener,
    state: routes::AppState,
    edge: Edge,
    edge_settings: EdgeSettings,
}

impl Application {
    /// Prepares the pool (connected lazily, so the API starts before the database is
    /// ready; `/readyz` says when it is) and binds the listener.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let edge = Edge::new(&settings.edge, "query-api").context("setting up authentication")?;
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
            edge,
            edge_settings: settings.edge,
        })
    }

    /// Serves until Ctrl-C or SIGTERM, then finishes in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        info!(
            addr = %self.listener.local_addr()?,
            tls = self.edge_settings.tls.is_some(),
            auth = self.edge_settings.auth.is_some(),
            "query API listening"
        );
        keel_http::serve(
            self.listener,
            routes::app(self.state, &self.edge),
            &self.edge_settings,
            keel_telemetry::shutdown_signal(),
        )
        .await
        .context("serving HTTP")
    }
}
