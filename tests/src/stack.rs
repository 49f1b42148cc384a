use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::Broker;

/// Path of a binary of this workspace, built beside the test binaries.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a binary of this crate
    // (a benchmark) is in target/<profile> itself.
    let parent = exe
        .parent()
        .context("the test binary has no parent directory")?;
    let dir = if parent.ends_with("deps") {
        parent.parent().context("deps has no parent directory")?
    } else {
        parent
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is not built: run `cargo build --workspace --bins` (make test does)",
            path.display()
        );
    }
    Ok(path)
}

/// A running Keel binary. Killed when dropped.
pub struct Service {
    child: Child,
    /// Where it listens, for the HTTP services.
    pub addr: Option<SocketAddr>,
    /// A client for it: for the APIs, one whose token holds every role (subject `test`).
    pub client: reqwest::Client,
    /// Its standard error so far (the first [`LOG_CAP`] bytes).
    log: LogSource,
}

/// A service's standard error as read so far; outlives the service.
#[derive(Clone, Debug, Default)]
pub struct LogSource(Arc<Mutex<String>>);

impl LogSource {
    /// The text so far.
    pub fn text(&self) -> String {
        self.0.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// How much of a service's log is kept for [`Service::log`].
const LOG_CAP: usize = 64 << 20;

impl Service {
    /// Starts `binary` with `args` and `env`; when `listening` is given, waits for the log
    /// line with that message and reads the address from its `addr` field.
    pub async fn start(
        binary: &str,
        args: &[&str],
        env: &[(&str, String)],
        listening: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(workspace_binary(binary)?);
        command
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = oneshot::channel();
        let echo = std::env::var_os("TEST_LOG").is_some();
        let (name, wanted) = (binary.to_owned(), listening.map(str::to_owned));
        let log = LogSource::default();
        let kept = Arc::clone(&log.0);
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if echo {
                    eprintln!("[{name}] {line}");
                }
                if let Ok(mut kept) = kept.lock()
                    && kept.len() + line.len() < LOG_CAP
                {
                    kept.push_str(&line);
                    kept.push('\n');
                }
                if let Some(wanted) = &wanted
                    && line.contains(wanted.as_str())
                {
                    let addr = serde_json::from_str::<serde_json::Value>(&line)
                        .ok()
                        .and_then(|v| {
                            v["addr"]
                                .as_str()
                                .and_then(|a| a.parse::<SocketAddr>().ok())
                        });
                    if let (Some(tx), Some(addr)) = (tx.take(), addr) {
                        let _ = tx.send(addr);
                    }
                }
            }
        });
        let addr = match listening {
            None => None,
            Some(_) => match tokio::time::timeout(Duration::from_secs(60), rx).await {
                Ok(Ok(addr)) => Some(addr),
                _ => bail!(
                    "{binary} did not start listening within 60 s (set TEST_LOG=info to see its log)"
                ),
            },
        };
        Ok(Self {
            child,
            addr,
            client: reqwest::Client::new(),
            log,
        })
    }

    /// What it has written to standard error so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// Its log, readable after it stops.
    pub fn log_source(&self) -> LogSource {
        self.log.clone()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().is_ok_and(|s| s.is_some())
    }

    /// `http://addr<path>`.
    pub fn url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.addr.map(|a| a.to_string()).unwrap_or_default()
        )
    }

    /// Waits until `GET /readyz` answers 200.
    pub async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(self.url("/readyz")).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} was not ready within 60 s", self.url(""));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the process with SIGTERM (a graceful shutdown) and waits for it to exit.
    pub async fn stop(mut self) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        Ok(tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await??)
    }

    /// Pauses the process with SIGSTOP for `pause`, then continues it with SIGCONT: a
    /// process that stalls (a long GC pause, a VM frozen) and wakes up as if nothing
    /// happened.
    pub async fn pause(&self, pause: Duration) -> anyhow::Result<()> {
        let pid = self
            .child
            .id()
            .context("the process has exited")?
            .to_string();
        let signal = |signal: &str| -> anyhow::Result<()> {
            let status = std::process::Command::new("kill")
                .args([signal, &pid])
                .status()?;
            anyhow::ensure!(status.success(), "kill {signal} {pid}: {status}");
            Ok(())
        };
        signal("-STOP")?;
        tokio::time::sleep(pause).await;
        signal("-CONT")
    }

    /// Kills the process with SIGKILL: no shutdown at all.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Waits for the process to exit by itself.
    pub async fn wait(mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        Ok(tokio::time::timeout(timeout, self.child.wait()).await??)
    }
}

/// The command API is a [`Service`].
pub type CommandApi = Service;

/// How a command-api process is configured.
#[derive(Clone, Debug)]
pub struct CommandApiConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Topic prefix.
    pub prefix: String,
    /// Partitions per topic.
    pub partitions: i32,
    /// Instance name.
    pub instance: String,
    /// More environment variables for the process.
    pub extra_env: Vec<(&'static str, String)>,
    /// Where the signing key and the trusted keys are kept (the test's own).
    pub keys_dir: std::path::PathBuf,
    /// The token secret the APIs are given (the test's own).
    pub auth: crate::TestAuth,
}

impl CommandApiConfig {
    /// A configuration for `broker` with this test's own prefix.
    pub fn new(broker: &Broker, prefix: &str, partitions: i32, instance: &str) -> Self {
        Self {
            brokers: broker.bootstrap(),
            prefix: prefix.to_owned(),
            partitions,
            instance: instance.to_owned(),
            extra_env: Vec::new(),
            keys_dir: std::env::temp_dir().join(format!("keel-keys-{prefix}")),
            auth: crate::TestAuth::new(),
        }
    }

    /// The deployment's signing key, as the command API reads it: made (with its line in
    /// the trusted keys file) if it does not exist yet, so records written straight to the
    /// log can be signed and a projector started first finds the trusted keys.
    pub fn signing_key(&self) -> keel_schemas::SigningKey {
        keel_schemas::SigningKey::read_or_generate(
            &self.keys_dir.join("signing.key"),
            &self.keys_dir.join("trusted.keys"),
        )
        .map(|(key, _)| key)
        .expect("the test's signing key")
    }

    /// The key policy every process of this configuration reads: its trusted keys file,
    /// which the command API writes when it first starts.
    pub fn policy(&self) -> std::sync::Arc<keel_schemas::TrustedKeys> {
        std::sync::Arc::new(
            keel_schemas::TrustedKeys::read(&self.keys_dir.join("trusted.keys"))
                .expect("the trusted keys file the command API wrote"),
        )
    }

    /// The environment a Keel process of this configuration gets.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("KEEL_KAFKA_BROKERS", self.brokers.clone()),
            ("KEEL_TOPIC_PREFIX", self.prefix.clone()),
            ("KEEL_PARTITIONS", self.partitions.to_string()),
            (
                "KEEL_SIGNING_KEY_FILE",
                self.keys_dir.join("signing.key").display().to_string(),
            ),
            (
                "KEEL_TRUSTED_KEYS_FILE",
                self.keys_dir.join("trusted.keys").display().to_string(),
            ),
            ("KEEL_AUTH_HS256_SECRET", self.auth.secret.clone()),
            // Load tests send thousands of requests a second as one subject: no rate limit
            // unless a test sets one in `extra_env`.
            ("KEEL_RATE_LIMIT_RPS", "0".into()),
            // `projector run`'s listener on a free port: several run side by side.
            ("KEEL_PROJECTOR_ADDR", "127.0.0.1:0".into()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }
}

impl Service {
    /// Starts command-api on a free port (unless `config`'s extra environment names one)
    /// and waits until it listens.
    pub async fn command_api(config: &CommandApiConfig) -> anyhow::Result<Self> {
        // A free port unless the test's extra environment names one (it comes later, and
        // the last value of a variable wins).
        let mut env = vec![("KEEL_COMMAND_ADDR", "127.0.0.1:0".into())];
        env.extend(config.env());
        env.push(("KEEL_INSTANCE", config.instance.clone()));
        let mut api = Self::start("command-api", &[], &env, Some("command API listening")).await?;
        api.client = config.auth.full_client();
        Ok(api)
    }

    /// Starts command-api and waits until `/readyz` says it owns every partition.
    pub async fn command_api_ready(config: &CommandApiConfig) -> anyhow::Result<Self> {
        let api = Self::command_api(config).await?;
        api.wait_ready().await?;
        Ok(api)
    }

    /// Starts `projector run` with `args` against `database_url`.
    pub async fn projector(
        config: &CommandApiConfig,
        database_url: &str,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        config.signing_key();
        let mut env = config.env();
        env.push(("KEEL_DATABASE_URL", database_url.to_owned()));
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        Self::start("projector", &all, &env, Some("projector listening")).await
    }

    /// Starts query-api on a free port (unless `config`'s extra environment names one)
    /// against `database_url`, with `config`'s token secret and extra environment.
    pub async fn query_api(config: &CommandApiConfig, database_url: &str) -> anyhow::Result<Self> {
        let mut env = vec![("KEEL_QUERY_ADDR", "127.0.0.1:0".to_owned())];
        env.extend(config.env());
        env.push(("KEEL_DATABASE_URL", database_url.to_owned()));
        let mut api = Self::start("query-api", &[], &env, Some("query API listening")).await?;
        api.client = config.auth.full_client();
        Ok(api)
    }
}

/// A PostgreSQL database of the test's own, dropped when the test ends.
pub struct TestDatabase {
    /// Its name.
    pub name: String,
}

impl TestDatabase {
    /// A fresh name; the projector creates the database on first use.
    pub fn new(test: &str) -> Self {
        Self {
            name: format!(
                "keel_t_{test}_{}",
                &uuid::Uuid::new_v4().simple().to_string()[..12]
            ),
        }
    }

    /// A fresh database, created now (for what does not create its own, such as a
    /// broker keeping its log in PostgreSQL).
    pub async fn created(test: &str) -> anyhow::Result<Self> {
        let db = Self::new(test);
        let admin = sqlx::PgPool::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
        sqlx::query(&format!("CREATE DATABASE \"{}\"", db.name))
            .execute(&admin)
            .await?;
        Ok(db)
    }

    /// Its URL on the local server (loopback: no TLS).
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:5432/{}?sslmode=disable",
            self.name
        )
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-qc"])
            .arg(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.name
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A whole Keel: broker, command API, projector, query API and a database of the test's own.
pub struct Stack {
    /// The broker.
    pub broker: Broker,
    /// The command API's configuration (topics, keys).
    pub config: CommandApiConfig,
    /// The views' database.
    pub db: TestDatabase,
    /// The command API.
    pub command: Service,
    /// `projector run`, when running.
    pub projector: Option<Service>,
    /// The query API.
    pub query: Service,
    /// A client whose token holds every role (subject `test`).
    pub client: reqwest::Client,
}

impl Stack {
    /// Starts every part, each ready.
    pub async fn start(name: &str, partitions: i32) -> Self {
        Self::try_start(name, partitions)
            .await
            .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
    }

    /// Starts every part, each ready, every process with `env` added to its environment.
    pub async fn start_with_env(
        name: &str,
        partitions: i32,
        env: Vec<(&'static str, String)>,
    ) -> Self {
        Self::try_start_with(name, partitions, env)
            .await
            .unwrap_or_else(|e| panic!("starting the stack: {e:#}"))
    }

    async fn try_start(name: &str, partitions: i32) -> anyhow::Result<Self> {
        Self::try_start_with(name, partitions, Vec::new()).await
    }

    async fn try_start_with(
        name: &str,
        partitions: i32,
        env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let broker = Broker::start().await?;
        let mut config =
            CommandApiConfig::new(&broker, &crate::unique_prefix(name), partitions, "cmd-a");
        config.extra_env = env;
        let db = TestDatabase::new(name);
        let command = Service::command_api_ready(&config).await?;
        let projector = Some(Service::projector(&config, &db.url(), &[]).await?);
        let query = Service::query_api(&config, &db.url()).await?;
        query.wait_ready().await?;
        // Readiness says a projection has run; the tests read every view.
        let pool = sqlx::PgPool::connect(&db.url()).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let prepared: i64 = sqlx::query_scalar("SELECT count(*) FROM keel_projections")
                .fetch_one(&pool)
                .await?;
            if prepared as usize >= keel_views::PROJECTIONS.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("the projector prepared {prepared} views in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.close().await;
        let client = config.auth.full_client();
        Ok(Self {
            broker,
            config,
            db,
            command,
            projector,
            query,
            client,
        })
    }

    /// Commits the gate accepted, over every topic: what the commands appended.
    pub async fn accepted_commits(&self) -> anyhow::Result<usize> {
        let settings = self
            .broker
            .settings(&self.config.prefix, self.config.partitions);
        let mut n = 0;
        for stream_type in keel_domain::STREAM_TYPES {
            n += crate::read_accepted(
                &settings,
                &self.config.policy(),
                &settings.topic(stream_type),
            )
            .await?
            .0
            .len();
        }
        Ok(n)
    }

    /// A pool on the views' database.
    pub async fn pool(&self) -> sqlx::PgPool {
        sqlx::PgPool::connect(&self.db.url())
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", self.db.name))
    }

    /// POSTs a command: its status, body and consistency token.
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (
        reqwest::StatusCode,
        serde_json::Value,
        Option<keel_schemas::ConsistencyToken>,
    ) {
        let r = self
            .client
            .post(self.command.url(path))
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        let token = body["consistency_token"]
            .as_str()
            .and_then(|t| t.parse().ok());
        (status, body, token)
    }

    /// POSTs every `(path, body)` with `in_flight` requests at a time; each must answer
    /// `expected`. Returns the merge of their consistency tokens.
    pub async fn post_many(
        &self,
        requests: impl IntoIterator<Item = (String, serde_json::Value)>,
        in_flight: usize,
        expected: reqwest::StatusCode,
    ) -> keel_schemas::ConsistencyToken {
        let client = self.client.clone();
        let mut tasks = tokio::task::JoinSet::new();
        let mut token = keel_schemas::ConsistencyToken::default();
        let token_of = |done: Result<keel_schemas::ConsistencyToken, tokio::task::JoinError>| {
            done.unwrap_or_else(|e| panic!("a request task failed: {e}"))
        };
        for (path, body) in requests {
            let (client, url) = (client.clone(), self.command.url(&path));
            tasks.spawn(async move {
                let r = client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("POST {path}: {e}"));
                assert_eq!(r.status(), expected, "POST {path}");
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                body["consistency_token"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or_else(|| panic!("POST {path}: no consistency token in {body}"))
            });
            while tasks.len() >= in_flight {
                if let Some(done) = tasks.join_next().await {
                    token = token.merge(&token_of(done));
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            token = token.merge(&token_of(done));
        }
        token
    }

    /// GETs a query, waiting up to 30 s for `token` when given.
    pub async fn get(
        &self,
        path: &str,
        token: Option<&keel_schemas::ConsistencyToken>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut request = self.client.get(self.query.url(path));
        if let Some(token) = token {
            request = request
                .header("keel-consistency-token", token.encode())
                .header("keel-consistency-timeout", "30000");
        }
        let r = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        (r.status(), r.json().await.unwrap_or_default())
    }

    /// The status of projection `name` as `GET /v1/projections` reports it (generation,
    /// state, error, dead letters, partitions with their checkpoints and skipped records,
    /// the rebuild in progress).
    pub async fn projection(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.get("/v1/projections", None).await;
        assert_eq!(
            status,
            reqwest::StatusCode::OK,
            "GET /v1/projections: {body}"
        );
        body["projections"]
            .as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("no projection {name} in {body}"))
    }

    /// Starts a projector command (`rebuild orders`, …) as a process of its own, with
    /// `extra` environment variables.
    pub async fn projector_process(
        &self,
        args: &[&str],
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<Service> {
        let mut env = self.projector_env();
        env.extend_from_slice(extra);
        // `run` serves /metrics, /healthz and /readyz: its address is known once it listens.
        let listening = (args.first() == Some(&"run")).then_some("projector listening");
        Service::start("projector", args, &env, listening).await
    }

    /// Runs a projector command to its end: exit status, standard output, standard error.
    pub async fn projector_command(
        &self,
        args: &[&str],
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<(std::process::ExitStatus, String, String)> {
        let output = Command::new(workspace_binary("projector")?)
            .args(args)
            .envs(self.projector_env())
            .envs(extra.iter().cloned())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .await?;
        Ok((
            output.status,
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ))
    }

    /// Starts the order fulfilment process (`projector run --process fulfilment`) with its
    /// own token (subject `svc-fulfilment`, role `commands:write`, in a file beside the
    /// stack's keys), `payment_deadline` and `extra` environment, and waits until it has
    /// recorded where it starts on every partition.
    pub async fn fulfilment_process(
        &self,
        payment_deadline: &str,
        extra: &[(&'static str, String)],
    ) -> anyhow::Result<Service> {
        let token_file = self.config.keys_dir.join("fulfilment.token");
        std::fs::write(
            &token_file,
            self.config
                .auth
                .token("svc-fulfilment", &[keel_http::Role::CommandsWrite]),
        )?;
        let mut env = vec![
            ("KEEL_FULFILMENT_COMMAND_API", self.command.url("")),
            (
                "KEEL_FULFILMENT_TOKEN_FILE",
                token_file.display().to_string(),
            ),
            ("KEEL_PAYMENT_DEADLINE", payment_deadline.to_owned()),
        ];
        env.extend_from_slice(extra);
        let process = self
            .projector_process(
                &["run", "--process", "fulfilment", "--addr", "127.0.0.1:0"],
                &env,
            )
            .await?;
        let pool = self.pool().await;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let starts: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM keel_process_starts WHERE process = 'fulfilment'",
            )
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
            if starts == i64::from(self.config.partitions) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the fulfilment process recorded {starts} start positions in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.close().await;
        Ok(process)
    }

    fn projector_env(&self) -> Vec<(&'static str, String)> {
        let mut env = self.config.env();
        env.push(("KEEL_DATABASE_URL", self.db.url()));
        env
    }
}

/// Euros, as the API writes money.
pub fn eur(minor: i64) -> serde_json::Value {
    serde_json::json!({"amount_minor": minor, "currency": "EUR"})
}
