//! Keel's command API: commands in, commit records out.
//!
//! This crate holds the service's start-up: settings, topic creation and the HTTP
//! listener with its health route. The command routes and the partition owners build on it.

mod settings;
mod startup;

pub use settings::Settings;
pub use startup::{Application, app};
