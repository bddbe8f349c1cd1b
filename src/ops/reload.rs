//! Reloading on SIGHUP (`systemctl reload thorn`): the file and environment
//! are read and checked again; a bad config is refused as a whole (every
//! problem is logged) and the daemon keeps the one it runs with.
//!
//! Applied at run time: `log.level` (unless `RUST_LOG` is set),
//! `metrics.listen` (the endpoint moves; if the new address cannot be bound
//! the old endpoint stays) and `[subscribers]` (written to the database; if
//! that fails, the database keeps the previous ones and the next reload
//! tries again; one read during start-up is written once start-up has
//! written its own, which would otherwise undo it). Any other changed key
//! is named in a warning and takes effect at the next restart: the
//! connection string, the HTTP client and the delivery policy are built
//! once, at start.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::http::Endpoint;
use super::logging::Logging;
use super::{Notifier, State};
use crate::config::Config;

/// A re-read config, or every problem found in it.
pub type Reload = Result<Config, Vec<String>>;

/// The keys applied without a restart.
pub const RELOADABLE: &[&str] = &["log.level", "metrics.listen", "subscribers"];

/// Calls `load` on every SIGHUP and sends its result.
pub fn on_sighup<F>(load: F) -> std::io::Result<mpsc::Receiver<Reload>>
where
    F: Fn() -> Reload + Send + 'static,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            if tx.send(load()).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

pub struct Reloader {
    pub current: Config,
    pub state: Arc<State>,
    pub notifier: Notifier,
    pub logging: Option<Logging>,
    pub endpoint: Endpoint,
    /// `[subscribers]` of a reload read before start-up had written the
    /// config's: written once it has, so that start-up cannot undo it.
    pub deferred: Option<Config>,
}

impl Reloader {
    pub async fn run(mut self, mut reloads: mpsc::Receiver<Reload>, finished: CancellationToken) {
        let prepared = self.state.prepared.clone();
        let mut starting = !prepared.is_cancelled();
        loop {
            tokio::select! {
                got = reloads.recv() => match got {
                    Some(reload) => self.apply(reload).await,
                    None => return,
                },
                _ = prepared.cancelled(), if starting => {
                    starting = false;
                    if let Some(new) = self.deferred.take() {
                        self.apply_subscribers(&new).await;
                    }
                }
                _ = finished.cancelled() => return,
            }
        }
    }

    async fn apply(&mut self, reload: Reload) {
        self.notifier.reloading();
        let status = match reload {
            Err(problems) => {
                for problem in &problems {
                    tracing::error!(%problem, "reload refused: bad config");
                }
                self.state.metrics.reloaded(false);
                format!(
                    "reload refused ({} problems, see the log); running with the previous config",
                    problems.len()
                )
            }
            Ok(new) => {
                let (applied, failed) = self.apply_config(new).await;
                self.state.metrics.reloaded(failed.is_empty());
                match (applied.is_empty(), failed.is_empty()) {
                    (true, true) => "reloaded: nothing to change at run time".to_string(),
                    (false, true) => format!("reloaded: {}", applied.join(", ")),
                    (true, false) => format!(
                        "reload failed for {} (see the log); running with the previous values",
                        failed.join(", ")
                    ),
                    (false, false) => format!(
                        "reload failed for {} (see the log); applied: {}",
                        failed.join(", "),
                        applied.join(", ")
                    ),
                }
            }
        };
        if self.state.ready.load(Ordering::SeqCst) && !self.state.stopping.load(Ordering::SeqCst) {
            self.notifier.ready(&status);
        } else {
            self.notifier.status(&status);
        }
    }

    /// Applies what can change; returns the keys applied and those whose
    /// change failed.
    async fn apply_config(&mut self, new: Config) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut applied = Vec::new();
        let mut failed = Vec::new();
        if new.log.level != self.current.log.level {
            match self.logging.as_ref().map(|l| l.set_level(&new.log.level)) {
                Some(Ok(true)) => {
                    applied.push("log.level");
                    self.current.log.level = new.log.level.clone();
                    // Seen only at a level that shows debug lines: proof in
                    // the log that the new filter is in force.
                    tracing::debug!(level = %new.log.level, "log filter replaced");
                }
                Some(Ok(false)) => {
                    tracing::warn!("log.level changed, but RUST_LOG is set and wins");
                }
                Some(Err(error)) => {
                    failed.push("log.level");
                    tracing::error!(%error, "log.level: cannot apply");
                }
                None => {}
            }
        }
        if new.metrics.listen != self.current.metrics.listen {
            match self.endpoint.rebind(new.metrics.listen).await {
                Ok(()) => {
                    applied.push("metrics.listen");
                    self.current.metrics.listen = new.metrics.listen;
                }
                Err(error) => {
                    failed.push("metrics.listen");
                    tracing::error!(
                        error = format!("{error:#}"),
                        "metrics.listen: keeping the old endpoint"
                    );
                }
            }
        }
        if !self.state.prepared.is_cancelled() {
            // The latest reload's, even if it went back to the start's.
            self.deferred = (new.subscribers != self.current.subscribers).then(|| new.clone());
            if self.deferred.is_some() {
                tracing::info!("[subscribers] changed: written once start-up has written its own");
            }
        } else {
            match self.apply_subscribers(&new).await {
                Some(true) => applied.push("subscribers"),
                Some(false) => failed.push("subscribers"),
                None => {}
            }
        }
        let later = needs_restart(&self.current, &new);
        if !later.is_empty() {
            tracing::warn!(keys = ?later, "changed, but only applied by a restart");
        }
        tracing::info!(applied = ?applied, failed = ?failed, "config reloaded");
        (applied, failed)
    }

    /// Writes `new`'s `[subscribers]` if they differ from the running
    /// ones: `None` if there was nothing to write, else whether it worked.
    async fn apply_subscribers(&mut self, new: &Config) -> Option<bool> {
        if new.subscribers.is_none() && self.current.subscribers.is_some() {
            tracing::warn!(
                "[subscribers] is gone from the config: its subscribers are left as they are; \
                 an empty [subscribers] table switches them off"
            );
            return None;
        }
        if new.subscribers == self.current.subscribers {
            return None;
        }
        match self.sync_subscribers(new).await {
            Ok(()) => {
                self.current.subscribers = new.subscribers.clone();
                Some(true)
            }
            Err(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "subscribers: the database keeps the previous ones"
                );
                Some(false)
            }
        }
    }

    /// Through a connection of its own: reloads are rare, and the daemon's
    /// tasks each own theirs. With the running config but for the
    /// subscribers: its connection string and its `[security]` (which the
    /// running delivery client keeps until a restart) judge them.
    async fn sync_subscribers(&self, new: &Config) -> anyhow::Result<()> {
        let mut running = self.current.clone();
        running.subscribers = new.subscribers.clone();
        let mut client = crate::db::connect(&running.database_url.0).await?;
        crate::db::subscribers::sync_from_config(&mut client, &running).await?;
        Ok(())
    }
}

/// The sections (or keys) that differ and cannot change at run time.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let differs =
        |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
    if old.database_url.0 != new.database_url.0 {
        keys.push("database_url");
    }
    if old.log.format != new.log.format {
        keys.push("log.format");
    }
    if differs(&old.dispatch, &new.dispatch) {
        keys.push("dispatch");
    }
    if differs(&old.delivery, &new.delivery) {
        keys.push("delivery");
    }
    if differs(&old.security, &new.security) {
        keys.push("security");
    }
    if differs(&old.retention, &new.retention) {
        keys.push("retention");
    }
    if differs(&old.api, &new.api) {
        keys.push("api");
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn names_what_needs_a_restart() {
        let load = |t: &str| Config::load(Some(t), &HashMap::new()).expect("valid");
        let old = load("[log]\nlevel = \"info\"");
        let new = load("[log]\nlevel = \"debug\"\n[delivery]\ntimeout = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:1\"");
        assert_eq!(needs_restart(&old, &new), vec!["delivery"]);
        assert!(needs_restart(&old, &old).is_empty());
    }
}
