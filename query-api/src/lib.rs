//! Keel's query API: reads the PostgreSQL views the projector keeps.
//!
//! Reads are eventually consistent and say how far the view has read
//! (`Keel-Projection-Position`); a request with a `Keel-Consistency-Token` from a command
//! response waits until the view has passed it, so a client reads its own writes.

pub mod consistency;
pub mod error;
pub mod latency;
pub mod metrics;
pub mod routes;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use keel_http::{Edge, EdgeArgs, EdgeSettings};
use keel_views::DatabaseArgs;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tracing::info;

/// Keel's query API: the views the projector keeps in PostgreSQL, the audit trail, time
/// travel and projection status; reads wait for a consistency token when given one.
///
/// Every option can also be given by the environment variable named beside it.
#[derive(Debug, clap::Parser)]
#[command(name = "query-api", version, about, long_about)]
pub struct Cli {
    /// Where to listen (port 0 picks a free one).
    #[arg(long, env = "KEEL_QUERY_ADDR", default_value = "127.0.0.1:8081")]
    pub addr: SocketAddr,
    /// The views' database.
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Authentication, limits and TLS.
    #[command(flatten)]
    pub edge: EdgeArgs,
    /// The command API's origin as a browser reaches it (`http://127.0.0.1:8080`), for the
    /// console's write path panel; that API must name this one's origin in its
    /// `KEEL_CORS_ORIGINS`.
    #[arg(long, env = "KEEL_CONSOLE_COMMAND_API", value_name = "ORIGIN")]
    pub console_command_api: Option<String>,
}

/// The query API's settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The projector's database.
    pub database: DatabaseArgs,
    /// Authentication, limits and TLS.
    pub edge: EdgeSettings,
    /// The console's settings.
    pub console: routes::console::ConsoleSettings,
}

impl Settings {
    /// Reads the settings from the command line and the environment.
    pub fn load() -> anyhow::Result<Self> {
        Self::from_cli(keel_telemetry::parse_args())
    }

    /// The settings of a parsed command line.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Self> {
        Ok(Self {
            addr: cli.addr,
            database: cli.database,
            edge: cli.edge.settings().context("reading the HTTP settings")?,
            console: routes::console::ConsoleSettings::new(cli.console_command_api.as_deref())?,
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
            .database
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
            state: routes::AppState {
                console: settings.console,
                ..routes::AppState::new(pool).exporting(&edge)
            },
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
