//! The query API binary: `Settings::load()`, then serve until stopped.

use query_api::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keel_kafka::telemetry::init("query_api=info");
    let settings = Settings::load()?;
    Application::build(settings)
        .await?
        .run_until_stopped()
        .await
}
