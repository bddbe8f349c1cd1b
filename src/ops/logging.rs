//! Logging: `tracing` to standard error, plain (journald adds the time and
//! the unit) or JSON, filtered by `RUST_LOG` when set, else by `log.level`.
//! The filter can be swapped at run time (SIGHUP); the format cannot.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::{Log, LogFormat};

/// Changes the active filter.
pub struct Logging {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start: it wins over `log.level`, on reload too.
    from_env: bool,
}

impl Logging {
    /// Installs the global subscriber. `rust_log` is the value of
    /// `RUST_LOG`, passed in so the caller decides where it comes from.
    pub fn init(log: &Log, rust_log: Option<&str>) -> Logging {
        let from_env = rust_log.is_some_and(|s| EnvFilter::try_new(s).is_ok());
        let filter = match rust_log.filter(|_| from_env) {
            Some(s) => EnvFilter::new(s),
            None => EnvFilter::new(&log.level),
        };
        let (filter, handle) = reload::Layer::new(filter);
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        let fmt = match log.format {
            LogFormat::Json => fmt.json().boxed(),
            // journald stamps every line; the time would be said twice.
            LogFormat::Plain if under_journald() => fmt.without_time().boxed(),
            LogFormat::Plain => fmt.boxed(),
        };
        // `try_init` so a second call (tests) leaves the first subscriber.
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(driver_cap())
            .with(fmt)
            .try_init();
        Logging { handle, from_env }
    }

    /// Applies a new `log.level`. Returns false when `RUST_LOG` overrides it.
    pub fn set_level(&self, level: &str) -> anyhow::Result<bool> {
        if self.from_env {
            return Ok(false);
        }
        self.handle.reload(EnvFilter::try_new(level)?)?;
        Ok(true)
    }
}

/// A second filter, under whatever `log.level` or `RUST_LOG` allow: the
/// database driver never logs below `info`, because at `debug` it logs
/// every statement's parameters, subscribers' secrets among them.
fn driver_cap() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("tokio_postgres", LevelFilter::INFO)
}

/// systemd sets `JOURNAL_STREAM` when standard error goes to the journal.
fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    #[test]
    fn the_database_driver_never_logs_below_info() {
        let cap = super::driver_cap();
        assert!(!cap.would_enable("tokio_postgres::query", &Level::DEBUG));
        assert!(cap.would_enable("tokio_postgres::connection", &Level::INFO));
        assert!(cap.would_enable("thorn::deliver", &Level::TRACE));
    }
}
