//! The command API binary: `Settings::load()`, then serve until stopped.

use command_api::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keel_kafka::telemetry::init("command_api=info,keel_kafka=info");
    let settings = Settings::load()?;
    Application::build(settings)
        .await?
        .run_until_stopped()
        .await
}
