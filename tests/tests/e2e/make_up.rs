//! What `make up` runs its services with (`scripts/supervise.sh`, sourced by
//! `scripts/up.sh`): a service that exits is started again, and `make up` says so; each
//! log is capped; the broker logs at its pinned level whatever `RUST_LOG` the environment
//! holds.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_kafka::{KafkaSettings, LogProducer, ensure_topics};
use keel_schemas::testing;
use tokio::process::Command;

/// The clone's root, where the scripts are.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate is in the workspace")
        .to_owned()
}

/// A directory of the test's own under the system's temporary directory.
fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(keel_tests::unique_prefix(test));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// `bash` running `script` after sourcing the scripts as `make up` does, its logs in
/// `<dir>/logs`.
fn bash(dir: &Path, script: &str) -> Command {
    let mut command = Command::new("bash");
    command
        .current_dir(root())
        .env("KEEL_LOG_DIR", dir.join("logs"))
        .arg("-c")
        .arg(format!(
            ". scripts/common.sh; . scripts/supervise.sh; pids=(); {script}"
        ))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn a_service_that_exits_is_started_again_and_make_up_says_so() {
    let dir = scratch("supervise");
    let runs = dir.join("runs");
    let out = bash(
        &dir,
        &format!(
            "supervise flaky sh -c 'echo run >> {runs}; echo output of the run; exit 3'; \
             sleep 4.5; kill \"${{pids[@]}}\"; wait",
            runs = runs.display()
        ),
    )
    .output()
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    // Started at once, then after 1 s and after 2 more: three runs in 4.5 s.
    let started = std::fs::read_to_string(&runs).unwrap().lines().count();
    assert_eq!(started, 3, "{said}");
    for pause in ["1s", "2s"] {
        assert!(
            said.contains(&format!(
                "flaky exited (status 3): restarting it in {pause}"
            )),
            "make up says what it restarts: {said}"
        );
    }
    let log = std::fs::read_to_string(dir.join("logs/flaky.log")).unwrap();
    assert_eq!(log.matches("output of the run").count(), 3, "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn each_log_is_capped() {
    let dir = scratch("cap-log");
    // 3 MB of a chatty service's lines through a log capped at 1 MB.
    let out = bash(
        &dir,
        "{ yes 'a line of a service logging every request at info, as chatty as it gets' || true; } \
         | head -c 3000000 | cap_log \"$KEEL_LOG_DIR/chatty.log\"",
    )
    .env("KEEL_LOG_MAX_MB", "1")
    .output()
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let size = |name: &str| std::fs::metadata(dir.join("logs").join(name)).map(|m| m.len());
    let (current, previous) = (size("chatty.log").unwrap(), size("chatty.log.1").unwrap());
    // Checked every 500 lines: at most 500 lines past the cap.
    let cap = 1024 * 1024 + 500 * 80;
    assert!(
        current <= cap && previous <= cap,
        "{current} and {previous} bytes"
    );
    assert!(size("chatty.log.2").is_err(), "one previous file is kept");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_broker_logs_at_its_pinned_level_whatever_rust_log_says() {
    let dir = scratch("broker-log");
    // Under the pinned level nothing of the traffic is logged; asked for info on purpose
    // (KEEL_BROKER_LOG), the same traffic is: so the first verdict is not a silent broker's.
    for (broker_log, logs_traffic) in [(None, false), (Some("info"), true)] {
        let port = keel_tests::free_port().unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.join(format!("broker-{port}.log"));
        let mut command = bash(
            &dir,
            &format!(
                "broker_pinned --listener-url {url} --advertised-listener-url {url} \
                 --storage-engine memory://nisshi/ --cluster-id keel-test-{port} > {log} 2>&1",
                log = log.display()
            ),
        );
        // As a Rust developer's shell often has it.
        command.env("RUST_LOG", "info");
        match broker_log {
            Some(level) => command.env("KEEL_BROKER_LOG", level),
            None => command.env_remove("KEEL_BROKER_LOG"),
        };
        let mut broker = command.spawn().unwrap();
        let settings = KafkaSettings {
            brokers: format!("127.0.0.1:{port}"),
            topic_prefix: keel_tests::unique_prefix("broker-log"),
            partitions: 1,
            timeout: Duration::from_secs(20),
            ..KafkaSettings::default()
        };
        let mut ready = false;
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "the broker listens on {port}");
        ensure_topics(&settings, &["order"]).await.unwrap();
        let producer = LogProducer::new(&settings).unwrap();
        let at = keel_schemas::TopicPartition::new(settings.topic("order"), 0);
        for epoch in 1..=20 {
            let fence = testing::signed_fence(
                &testing::writer("w", epoch),
                &keel_schemas::SigningKey::generate(),
                &at,
            );
            producer
                .append_record(&at.topic, 0, "", &fence, None)
                .await
                .unwrap();
        }
        broker.kill().await.unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text.contains("INFO"),
            logs_traffic,
            "KEEL_BROKER_LOG {broker_log:?} under RUST_LOG=info: {} bytes of log",
            text.len()
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
