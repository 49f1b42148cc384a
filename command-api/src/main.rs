//! The command API binary: `Settings::load()`, then serve until stopped.

/// mimalloc: the services allocate and free many small objects per record and request,
/// which glibc's allocator serves several times slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use command_api::{Application, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    keel_telemetry::running(
        "command_api=info,keel_kafka=info",
        "keel-command-api",
        async {
            let settings = Settings::load()?;
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await
        },
    )
    .await
}
