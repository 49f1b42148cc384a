//! The read contract between Keel's projector, which writes the views, and the query API,
//! which reads them: what each projection is called and reads (as data), where its
//! checkpoints stand, its status, and the channel the projector notifies after each batch.
//!
//! It reads PostgreSQL only; nothing here touches Kafka.

mod catalogue;
pub mod positions;
pub mod status;

pub use catalogue::{
    AUDIT_LOG, CUSTOMERS, DAILY_SALES, FLAGGED_PAYMENTS, ORDERS, PRODUCTS, PROJECTIONS,
    ProjectionSpec, find,
};

/// The channel the projector notifies after each batch it commits (and after a swap); the
/// payload is the projection's name.
pub const NOTIFY_CHANNEL: &str = "keel_projections";

/// The database of the views when `KEEL_DATABASE_URL` is not set: the embedded default's.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/keel?sslmode=disable";
