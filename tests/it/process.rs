//! The daemon as a real process: the built `thorn` binary with a config
//! file, its log kept for failure messages, killable with any signal.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

pub struct Process {
    child: Child,
    dir: PathBuf,
}

impl Process {
    /// Starts `thorn --config <file> run` with `config` as the file.
    pub fn run(config: &str) -> Process {
        Process::spawn(config, &["run"])
    }

    pub fn spawn(config: &str, args: &[&str]) -> Process {
        let dir =
            std::env::temp_dir().join(format!("thorn-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("thorn.toml");
        std::fs::write(&file, config).expect("config file");
        let log = std::fs::File::create(dir.join("log")).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_thorn"))
            .arg("--config")
            .arg(&file)
            .args(args)
            .env_remove("THORN_DATABASE_URL")
            .env("RUST_LOG", "thorn=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start thorn");
        Process { child, dir }
    }

    /// Replaces the config file (for a SIGHUP to read).
    pub fn rewrite_config(&self, config: &str) {
        std::fs::write(self.dir.join("thorn.toml"), config).expect("config file");
    }

    pub fn pid(&self) -> i32 {
        self.child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .expect("running")
    }

    pub fn child_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the exit; panics after `within`.
    pub async fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => panic!("thorn did not exit within {within:?}; log:\n{}", self.log()),
        }
    }

    /// SIGTERM, then a clean exit (status 0) within `within`.
    pub async fn stop_cleanly(&mut self, within: Duration) {
        self.signal("TERM");
        let status = self.wait(within).await;
        assert!(status.success(), "exit {status:?}:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    /// Waits until the log contains `text`; panics after `within`.
    pub async fn wait_for_log(&self, text: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the log within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
