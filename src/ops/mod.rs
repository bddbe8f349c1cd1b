//! Operations: what makes `thorn run` a good systemd citizen, kept apart from
//! the delivery flow. It owns the systemd notifications ([`notify`]), the
//! health and metrics endpoint ([`http`], [`metrics`]), the monitor that
//! decides health, feeds the watchdog and refreshes the backlog gauges
//! ([`monitor`]), config reloads on SIGHUP ([`reload`], [`logging`]) and
//! `thorn check-config` ([`check`]).
//!
//! The flow's tasks see only a [`Probe`]: a heartbeat and the counters. They
//! never wait on anything here, so operations cannot slow deliveries down.

pub mod check;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod monitor;
pub mod notify;
pub mod reload;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
pub use metrics::Metrics;
pub use notify::Notifier;

/// What `thorn run` wraps around the daemon. The default is silent: no
/// systemd, no reloads, and the endpoint only if `metrics.listen` is set.
#[derive(Default)]
pub struct Ops {
    pub notifier: Notifier,
    /// Serves /healthz, /readyz and /metrics. When `None`, `metrics.listen`
    /// is bound if it is set (tests pass a listener on 127.0.0.1:0).
    pub metrics_listener: Option<tokio::net::TcpListener>,
    /// Configs to switch to (`thorn run` feeds it from SIGHUP).
    pub reloads: Option<mpsc::Receiver<reload::Reload>>,
    /// Changes the log filter at run time.
    pub logging: Option<logging::Logging>,
    /// How often the monitor runs; default: half the watchdog interval,
    /// at most 5 s.
    pub monitor_interval: Option<Duration>,
}

/// One task's liveness, as the monitor sees it.
struct Slot {
    name: &'static str,
    /// Milliseconds since [`State::epoch`] of the last beat; `None` for a
    /// task that is only watched for ending.
    beat: Option<AtomicU64>,
    ended: AtomicBool,
    /// The server's refusals of the task's statements since its last
    /// success, and the last one's message.
    refusals: AtomicU64,
    refused: Mutex<String>,
}

/// Refusals in a row after which a task counts as refused (one deadlock
/// or serialization failure now and then is not that).
const REFUSED_AFTER: u64 = 3;

/// Shared by the tasks, the monitor and the endpoint.
pub struct State {
    epoch: Instant,
    pub metrics: Metrics,
    listening: Arc<AtomicBool>,
    database_up: AtomicBool,
    ready: AtomicBool,
    stopping: AtomicBool,
    /// Cancelled once start-up has migrated the database and written the
    /// config's `[subscribers]`: a reload writes its own only after that,
    /// so that start-up's write of the config it began with cannot undo a
    /// newer one.
    pub prepared: tokio_util::sync::CancellationToken,
    /// Longest a heartbeat may be silent while the database answers.
    stall: Duration,
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// The verdict of [`State::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// Every task alive and making progress: the watchdog is fed.
    pub healthy: bool,
    /// Started, database answering and LISTEN active, and no task's
    /// statements refused again and again: /readyz is 200.
    pub ready: bool,
    pub problems: Vec<String>,
    /// Tasks whose statements the server keeps refusing (a read-only
    /// database, missing privileges): not ready, but alive and retrying,
    /// which a restart would not change.
    pub refused: Vec<String>,
}

impl State {
    pub fn new(listening: Arc<AtomicBool>, stall: Duration) -> State {
        State {
            epoch: Instant::now(),
            metrics: Metrics::new(),
            listening,
            database_up: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            prepared: tokio_util::sync::CancellationToken::new(),
            stopping: AtomicBool::new(false),
            stall,
            slots: Mutex::new(Vec::new()),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        // Slots are only pushed; a panic elsewhere cannot corrupt the list.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn add_slot(&self, name: &'static str, beats: bool) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            name,
            beat: beats.then(|| AtomicU64::new(self.now_ms())),
            ended: AtomicBool::new(false),
            refusals: AtomicU64::new(0),
            refused: Mutex::new(String::new()),
        });
        self.slots().push(slot.clone());
        slot
    }

    pub fn set_database_up(&self, up: bool) {
        self.database_up.store(up, Ordering::SeqCst);
    }

    pub fn database_up(&self) -> bool {
        self.database_up.load(Ordering::SeqCst)
    }

    pub fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Healthy unless a task ended before shutdown, or a task's heartbeat
    /// is older than `stall` while the database answers (a task waiting
    /// for an unreachable database is not stuck: restarting would not help).
    pub fn health(&self) -> Health {
        let stopping = self.stopping.load(Ordering::SeqCst);
        let database_up = self.database_up();
        let now = self.now_ms();
        let stall = u64::try_from(self.stall.as_millis()).unwrap_or(u64::MAX);
        let mut problems = Vec::new();
        let mut refused = Vec::new();
        for slot in self.slots().iter() {
            if slot.refusals.load(Ordering::Relaxed) >= REFUSED_AFTER {
                let message = slot.refused.lock().map(|m| m.clone()).unwrap_or_default();
                refused.push(format!(
                    "the database refuses the {} task's statements: {message}",
                    slot.name
                ));
            }
            if slot.ended.load(Ordering::SeqCst) {
                if !stopping {
                    problems.push(format!("the {} task has ended", slot.name));
                }
                continue;
            }
            if let Some(beat) = &slot.beat {
                let silent = now.saturating_sub(beat.load(Ordering::Relaxed));
                if database_up && silent > stall {
                    problems.push(format!(
                        "the {} task has made no progress for {}s",
                        slot.name,
                        silent / 1000
                    ));
                }
            }
        }
        let ready = self.ready.load(Ordering::SeqCst)
            && !stopping
            && database_up
            && self.listening()
            && refused.is_empty();
        Health {
            healthy: problems.is_empty(),
            ready,
            problems,
            refused,
        }
    }
}

/// A task's handle on operations: its heartbeat and the counters.
#[derive(Clone)]
pub struct Probe {
    state: Arc<State>,
    slot: Option<Arc<Slot>>,
}

impl Probe {
    /// A probe that reports to nobody (for code run outside the daemon).
    pub fn detached() -> Probe {
        Probe {
            state: Arc::new(State::new(Arc::default(), Duration::MAX)),
            slot: None,
        }
    }

    /// Says the task is making progress. One relaxed atomic store.
    pub fn beat(&self) {
        if let Some(beat) = self.slot.as_ref().and_then(|s| s.beat.as_ref()) {
            beat.store(self.state.now_ms(), Ordering::Relaxed);
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Notes a failed round of the task: the server's refusals (errors
    /// with a SQLSTATE) count towards "refused"; a lost connection does
    /// not (the database is then down, which the monitor says).
    pub fn failed(&self, error: &tokio_postgres::Error) {
        let (Some(slot), Some(db)) = (&self.slot, error.as_db_error()) else {
            return;
        };
        if let Ok(mut message) = slot.refused.lock() {
            *message = db.message().to_owned();
        }
        slot.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes a round that worked. One relaxed atomic store.
    pub fn served(&self) {
        if let Some(slot) = &self.slot {
            slot.refusals.store(0, Ordering::Relaxed);
        }
    }
}

impl Default for Probe {
    fn default() -> Self {
        Probe::detached()
    }
}

/// Marks its slot ended when dropped: when the watched future returns,
/// panics or is aborted.
struct EndGuard(Arc<Slot>);

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.0.ended.store(true, Ordering::SeqCst);
    }
}

/// Operations while the daemon runs (see [`Ops::start`]).
pub struct Running {
    pub state: Arc<State>,
    notifier: Notifier,
    /// Ends the monitor and the endpoint after the daemon has drained.
    finished: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
}

impl Ops {
    /// Starts the endpoint (if configured), the monitor and the reload
    /// handler. Fails only if the endpoint cannot be bound.
    pub async fn start(
        self,
        config: &Config,
        listening: Arc<AtomicBool>,
    ) -> anyhow::Result<Running> {
        let stall = stall_limit(config);
        let state = Arc::new(State::new(listening, stall));
        let finished = CancellationToken::new();
        let tasks = tokio_util::task::TaskTracker::new();
        let endpoint = http::Endpoint::start(
            self.metrics_listener,
            config.metrics.listen,
            state.clone(),
            &finished,
        )
        .await?;
        tasks.spawn(
            monitor::Monitor {
                url: config.database_url.0.clone(),
                state: state.clone(),
                notifier: self.notifier.clone(),
                interval: self
                    .monitor_interval
                    .unwrap_or_else(|| monitor::interval(self.notifier.watchdog())),
            }
            .run(finished.clone()),
        );
        if let Some(reloads) = self.reloads {
            tasks.spawn(
                reload::Reloader {
                    current: config.clone(),
                    state: state.clone(),
                    notifier: self.notifier.clone(),
                    logging: self.logging,
                    endpoint,
                    deferred: None,
                }
                .run(reloads, finished.clone()),
            );
        }
        tasks.close();
        Ok(Running {
            state,
            notifier: self.notifier,
            finished,
            tasks,
        })
    }
}

/// How long a task's heartbeat may be silent before the daemon calls itself
/// unhealthy: the longest legitimate wait, plus slack for a slow query.
///
/// That wait is the longer of a safety poll or a request timing out, twice
/// over, and the sender waiting for a slot: a slot may work through a
/// subscriber's waiting line, up to (lines + 1) timeouts, which the line's
/// sizing keeps within the lease (`deliver::worker::Share`), so lease +
/// timeout bounds it. Without that term a timeout of 60 s (a 240 s lease,
/// 180 s of line) outlasted the old 160 s limit, and systemd killed a
/// daemon that was only busy with slow endpoints.
///
/// Saturating, although validation caps every term, so that no config can
/// make this panic.
pub fn stall_limit(config: &Config) -> Duration {
    let delivery = &config.delivery;
    let waits = config
        .dispatch
        .poll_interval
        .max(Duration::from_secs(5))
        .saturating_add(delivery.timeout)
        .saturating_mul(2);
    let line = delivery.lease().saturating_add(delivery.timeout);
    waits.max(line).saturating_add(Duration::from_secs(30))
}

impl Running {
    pub fn status(&self, text: &str) {
        tracing::debug!(status = text, "status");
        self.notifier.status(text);
    }

    /// A heartbeat for a task that loops (its `beat` must be called at least
    /// once per [`stall_limit`]).
    pub fn probe(&self, name: &'static str) -> Probe {
        Probe {
            state: self.state.clone(),
            slot: Some(self.state.add_slot(name, true)),
        }
    }

    /// The counters alone, for a task without a heartbeat (one that may
    /// wait for work for ever, as the completer does).
    pub fn counters(&self) -> Probe {
        Probe {
            state: self.state.clone(),
            slot: None,
        }
    }

    /// Wraps a long-lived task so that its end is noticed.
    pub fn watch<F: Future>(&self, name: &'static str, task: F) -> impl Future<Output = F::Output> {
        let guard = EndGuard(self.state.add_slot(name, false));
        async move {
            let _guard = guard;
            task.await
        }
    }

    /// Waits for LISTEN to be active, then tells systemd the daemon is
    /// ready. Returns false if `shutdown` came first.
    pub async fn ready_when_listening(&self, shutdown: &CancellationToken) -> bool {
        self.status("waiting for LISTEN");
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while !self.state.listening() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.cancelled() => return false,
            }
        }
        self.state.ready.store(true, Ordering::SeqCst);
        // The monitor may not have probed yet; LISTEN working proves the
        // database answers.
        self.state.set_database_up(true);
        self.notifier
            .ready("running: connected, migrated, listening");
        tracing::info!("ready: connected, migrated, listening");
        true
    }

    pub fn stopping(&self, status: &str) {
        self.state.stopping.store(true, Ordering::SeqCst);
        self.notifier.stopping(status);
    }

    /// Stops the monitor, the reload handler and the endpoint.
    pub async fn finish(self) {
        self.finished.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
    }
}

impl Drop for Running {
    /// Also on an early error return from the daemon: nothing outlives it.
    fn drop(&mut self) {
        self.finished.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Arc<State> {
        Arc::new(State::new(
            Arc::new(AtomicBool::new(true)),
            Duration::from_millis(50),
        ))
    }

    #[test]
    fn an_ended_task_is_unhealthy_until_shutdown() {
        let s = state();
        let slot = s.add_slot("sender", false);
        assert!(s.health().healthy);
        drop(EndGuard(slot));
        let h = s.health();
        assert!(!h.healthy);
        assert_eq!(h.problems, vec!["the sender task has ended".to_string()]);
        s.stopping.store(true, Ordering::SeqCst);
        assert!(s.health().healthy);
    }

    #[test]
    fn a_silent_heartbeat_is_unhealthy_only_while_the_database_answers() {
        let s = state();
        let probe = Probe {
            state: s.clone(),
            slot: Some(s.add_slot("dispatcher", true)),
        };
        std::thread::sleep(Duration::from_millis(80));
        assert!(s.health().healthy, "database down: waiting is not stuck");
        s.set_database_up(true);
        let h = s.health();
        assert!(!h.healthy);
        assert!(h.problems[0].contains("dispatcher"), "{h:?}");
        probe.beat();
        assert!(s.health().healthy);
    }

    fn config(timeout: u64, lease: Option<u64>) -> Config {
        let mut c = Config::default();
        c.delivery.timeout = Duration::from_secs(timeout);
        c.delivery.lease_setting = lease.map(Duration::from_secs);
        c
    }

    #[test]
    fn the_stall_limit_outlasts_a_senders_waiting_line() {
        // Defaults: 2 × (5 s + 3 s) = 16 s < 30 s lease + 3 s timeout.
        assert_eq!(stall_limit(&Config::default()), Duration::from_secs(63));
        // The reported case: a 60 s timeout (240 s lease) lets one slot
        // work through 180 s of line; the limit was 160 s.
        let slow = config(60, None);
        assert!(stall_limit(&slow) >= slow.delivery.lease() + slow.delivery.timeout);
        assert_eq!(stall_limit(&slow), Duration::from_secs(330));
        // A configured lease counts, not only the default one.
        let long = config(3, Some(3600));
        assert_eq!(stall_limit(&long), Duration::from_secs(3633));
        // A long safety poll still dominates when it is the longer wait.
        let mut polling = config(3, None);
        polling.dispatch.poll_interval = Duration::from_secs(300);
        assert_eq!(stall_limit(&polling), Duration::from_secs(636));
        // Never a panic, whatever the (unvalidated) values.
        let absurd = config(u64::MAX, None);
        assert_eq!(stall_limit(&absurd), Duration::MAX);
    }

    #[test]
    fn ready_needs_start_database_and_listen() {
        let s = state();
        s.set_database_up(true);
        assert!(!s.health().ready);
        s.ready.store(true, Ordering::SeqCst);
        assert!(s.health().ready);
        s.listening.store(false, Ordering::SeqCst);
        assert!(!s.health().ready);
    }
}
