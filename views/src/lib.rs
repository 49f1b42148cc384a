//! The read contract between Keel's projector, which writes the views, and the query API,
//! which reads them: what each projection is called and reads (as data), where its
//! checkpoints stand, its status, and the channel the projector notifies after each batch.
//!
//! It reads PostgreSQL only; nothing here touches Kafka.

mod catalogue;
pub mod positions;
pub mod requests;
pub mod status;

pub use catalogue::{
    AUDIT_LOG, CUSTOMERS, DAILY_SALES, FLAGGED_PAYMENTS, FULFILMENT, ORDERS, PROCESSES, PRODUCTS,
    PROJECTIONS, ProjectionSpec, find,
};

/// A product's status in the `products` view while it can be sold.
pub const PRODUCT_ACTIVE: &str = "active";
/// A product's status in the `products` view once discontinued.
pub const PRODUCT_DISCONTINUED: &str = "discontinued";
/// Every status of the `products` view.
pub const PRODUCT_STATUSES: [&str; 2] = [PRODUCT_ACTIVE, PRODUCT_DISCONTINUED];

/// The channel the projector notifies after each batch it commits (and after a swap); the
/// payload is the projection's name.
pub const NOTIFY_CHANNEL: &str = "keel_projections";

/// The database of the views when `KEEL_DATABASE_URL` is not set: the embedded default's.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/keel?sslmode=disable";

/// The database option of the binaries that use the views' database.
#[derive(Clone, clap::Args)]
pub struct DatabaseArgs {
    /// The PostgreSQL database of the views and checkpoints (created when missing).
    #[arg(
        long,
        env = "KEEL_DATABASE_URL",
        default_value = DEFAULT_DATABASE_URL,
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: String,
}

impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A URL can hold a password, before its host or in its query: print the host and
        // the database only.
        let url = self.database_url.as_str();
        let at = url.rsplit_once('@').map_or(url, |(_, at)| at);
        let at = at.split_once('?').map_or(at, |(at, _)| at);
        f.debug_struct("DatabaseArgs")
            .field("database_url", &format_args!("..@{at}"))
            .finish()
    }
}
