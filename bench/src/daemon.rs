//! Runs the release `thorn` binary as a user would (`thorn --config FILE
//! run`) and reads its memory from /proc.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::process::{Child, Command};

/// The daemon settings every delivery scenario uses (recorded in the report).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub concurrency: usize,
    pub per_subscriber_concurrency: usize,
    pub delivery_batch: u32,
    pub dispatch_batch: u32,
    pub timeout_ms: u64,
}

/// thorn's defaults, written out so the report can show them.
pub const SETTINGS: Settings = Settings {
    concurrency: 256,
    per_subscriber_concurrency: 32,
    delivery_batch: 128,
    dispatch_batch: 500,
    timeout_ms: 3000,
};

impl Settings {
    pub fn toml(&self, database_url: &str) -> String {
        format!(
            r#"database_url = "{database_url}"
[log]
level = "warn"
[dispatch]
batch_size = {}
[delivery]
concurrency = {}
per_subscriber_concurrency = {}
batch_size = {}
timeout = "{}ms"
[security]
allow_networks = ["127.0.0.0/8"]
"#,
            self.dispatch_batch,
            self.concurrency,
            self.per_subscriber_concurrency,
            self.delivery_batch,
            self.timeout_ms,
        )
    }
}

/// Writes the config file for `database_url` under `dir`.
pub fn write_config(dir: &Path, name: &str, database_url: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, SETTINGS.toml(database_url))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub struct Daemon {
    child: Child,
    pub pid: u32,
    pub started: Instant,
}

/// Memory of a process, in MiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    pub rss: f64,
    pub peak: f64,
}

impl Daemon {
    /// Starts `thorn --config CONFIG run`, its log going to `log`.
    pub fn spawn(thorn: &Path, config: &Path, log: &Path) -> anyhow::Result<Daemon> {
        let log_file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let child = Command::new(thorn)
            .arg("--config")
            .arg(config)
            .arg("run")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", thorn.display()))?;
        let pid = child.id().context("the daemon exited at once")?;
        Ok(Daemon {
            child,
            pid,
            started,
        })
    }

    /// VmRSS and VmHWM from /proc/<pid>/status.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .context("reading the daemon's /proc status")?;
        let field = |name: &str| -> f64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
                .map_or(f64::NAN, |kb| kb / 1024.0)
        };
        Ok(Memory {
            rss: field("VmRSS:"),
            peak: field("VmHWM:"),
        })
    }

    /// Fails when the daemon has exited (so a scenario does not wait in vain).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("the daemon exited early with {status}; see its log");
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 15 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(status) => {
                status?;
            }
            Err(_) => {
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

/// The advisory lock a sleeping daemon holds (thorn's sql/0006_wakeup.sql).
pub const WAKEUP_LOCK: (i32, i32) = (1_953_001_330, 1);

/// Waits until a daemon is asleep on the outbox (holding the wake-up lock
/// after its start-up sweep), or fails after `limit`.
pub async fn wait_idle(client: &tokio_postgres::Client, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let asleep: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks
                                WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'
                                  AND classid = $1::int8::oid AND objid = $2::int8::oid
                                  AND objsubid = 2 AND database = (SELECT oid FROM pg_database
                                                                   WHERE datname = current_database()))",
                &[&i64::from(WAKEUP_LOCK.0), &i64::from(WAKEUP_LOCK.1)],
            )
            .await?
            .try_get(0)?;
        if asleep {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no daemon idle after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
