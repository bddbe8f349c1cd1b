//! Talking to systemd (`sd_notify(3)`): READY, STATUS, WATCHDOG, RELOADING,
//! STOPPING. Every call is a no-op when the process was not started with a
//! `NOTIFY_SOCKET`, so the daemon runs the same outside systemd.
//!
//! The environment is read once, in [`Notifier::from_env`], by `thorn run`;
//! the library itself never looks at it, so in-process tests stay silent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;

#[derive(Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    watchdog: Option<Duration>,
    /// The last STATUS sent, so an unchanged one is not repeated.
    status: Mutex<String>,
}

impl Notifier {
    /// Silent: for tests and for commands that systemd does not supervise.
    pub fn disabled() -> Notifier {
        Notifier { inner: None }
    }

    /// Uses `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` when set.
    pub fn from_env() -> Notifier {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Notifier::disabled();
        }
        let mut usec = 0;
        let watchdog = sd_notify::watchdog_enabled(false, &mut usec)
            .then(|| Duration::from_micros(usec))
            .filter(|d| !d.is_zero());
        Notifier {
            inner: Some(Arc::new(Inner {
                watchdog,
                status: Mutex::new(String::new()),
            })),
        }
    }

    /// The watchdog interval systemd asked for, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.inner.as_ref().and_then(|i| i.watchdog)
    }

    fn send(&self, states: &[NotifyState]) {
        if self.inner.is_none() {
            return;
        }
        if let Err(error) = sd_notify::notify(false, states) {
            tracing::debug!(%error, "cannot notify systemd");
        }
    }

    /// Sends STATUS= when it differs from the last one.
    pub fn status(&self, text: &str) {
        let Some(inner) = &self.inner else { return };
        {
            let mut last = inner
                .status
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if *last == text {
                return;
            }
            text.clone_into(&mut last);
        }
        self.send(&[NotifyState::Status(text)]);
    }

    pub fn ready(&self, status: &str) {
        self.remember(status);
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn watchdog_ping(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    pub fn stopping(&self, status: &str) {
        self.remember(status);
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    fn remember(&self, status: &str) {
        if let Some(inner) = &self.inner {
            let mut last = inner
                .status
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            status.clone_into(&mut last);
        }
    }
}
