//! Keel's HTTP edge, shared by the command API and the query API: bearer-token
//! authentication and roles, per-subject rate limits, a cap on requests in flight,
//! timeouts, TLS, and the request metrics.

pub mod auth;
pub mod cors;
pub mod edge;
mod keys;
pub mod metrics;
pub mod openapi;
pub mod serve;
pub mod settings;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::{AuthError, AuthSettings, Claims, KeySource, Principal, Role, Verifier};
pub use edge::Edge;
pub use serve::serve;
pub use settings::{EdgeArgs, EdgeSettings, Secret, TlsFiles};
