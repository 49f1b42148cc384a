//! A PostgreSQL server of a test's own, which the test may restart with an immediate stop
//! (a crash, to PostgreSQL): the shared server on 5432 serves every other test and is
//! never touched. Debian's server binaries, run as the `postgres` user when the test runs
//! as root (PostgreSQL refuses to run as root).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A private PostgreSQL server: trust authentication on 127.0.0.1, a free port, its data
/// in a directory of its own. Stopped and removed when dropped.
pub struct PrivatePostgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// Creates a cluster and starts it.
    pub async fn start(name: &str) -> anyhow::Result<Self> {
        let server = Self::place(name)?;
        let data = server.data();
        server.as_owner("initdb", |c| {
            c.args([
                "-D",
                &data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
        })?;
        server.start_server().await?;
        Ok(server)
    }

    /// A free port and a directory of its own, owned by the server's user.
    fn place(name: &str) -> anyhow::Result<Self> {
        let bin = server_binaries()?;
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir().join(format!(
            "keel-pg-{name}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        ));
        std::fs::create_dir_all(&dir)?;
        let server = Self { bin, dir, port };
        if is_root() {
            run(Command::new("chown")
                .arg("postgres:postgres")
                .arg(&server.dir))?;
        }
        Ok(server)
    }

    /// A hot standby of this server: a base backup taken with `pg_basebackup -R` (which
    /// tells the copy to stream this server's log), started on a free port of its own.
    /// Read-only; it replays what this server commits, a little later. Stopped and
    /// removed when dropped.
    pub async fn standby(&self, name: &str) -> anyhow::Result<Self> {
        let standby = Self::place(name)?;
        let (data, port) = (standby.data(), self.port.to_string());
        standby.as_owner("pg_basebackup", |c| {
            c.args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-D",
                &data,
                "-R",
                "-X",
                "stream",
                "--no-sync",
            ])
        })?;
        standby.start_server().await?;
        Ok(standby)
    }

    /// Its URL for database `database` (which the projector creates on first use).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`: no
    /// checkpoint, every session cut), and starts it again; recovery replays the WAL.
    pub async fn crash_and_restart(&self) -> anyhow::Result<()> {
        self.stop_now()?;
        self.start_server().await
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    async fn start_server(&self) -> anyhow::Result<()> {
        let (data, log) = (self.data(), self.dir.join("server.log"));
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        self.as_owner("pg_ctl", |c| {
            c.args(["-D", &data, "-l"])
                .arg(&log)
                .args(["-o", &options, "-w", "-t", "60", "start"])
        })?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while sqlx::PgPool::connect(&self.url("postgres")).await.is_err() {
            if Instant::now() > deadline {
                bail!("the private PostgreSQL did not accept connections within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    fn stop_now(&self) -> anyhow::Result<()> {
        let data = self.data();
        self.as_owner("pg_ctl", |c| {
            c.args(["-D", &data, "-m", "immediate", "-w", "stop"])
        })
    }

    /// Runs server binary `program` as the cluster's owner.
    fn as_owner(
        &self,
        program: &str,
        args: impl FnOnce(&mut Command) -> &mut Command,
    ) -> anyhow::Result<()> {
        let path = self.bin.join(program);
        let mut command = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        args(&mut command);
        run(command.current_dir(&self.dir))
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop_now();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory of Debian's PostgreSQL server binaries (the newest installed).
fn server_binaries() -> anyhow::Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no PostgreSQL server installed under /usr/lib/postgresql")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("pg_ctl").is_file())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    found
        .pop()
        .context("no pg_ctl under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
