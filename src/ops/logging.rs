//! Logging: `tracing` to standard error, plain (journald adds the time and
//! the unit) or JSON, filtered by `RUST_LOG` when set, else by `log.level`.
//! The filter can be swapped at run time (SIGHUP); the format cannot.
//! Colours only on a terminal. Under journald, plain lines start with their
//! syslog priority (`<4>` for a warning), which journald takes as the
//! entry's priority, so `journalctl -p warning` finds them; so do the
//! command line's own lines ([`complain`]).

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal());
        let fmt = match log.format {
            LogFormat::Json => fmt.json().boxed(),
            // journald stamps every line; the time would be said twice.
            LogFormat::Plain if under_journald() => fmt
                .event_format(Priority(tracing_subscriber::fmt::format().without_time()))
                .boxed(),
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

/// Puts the event's syslog priority before the line (sd-daemon(3)).
struct Priority<F>(F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The syslog priority of a level.
fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// Writes one of the command line's own lines (a bad config, why a command
/// failed) to standard error as `thorn: <text>`; these come before logging
/// is set up or after it is done. Under journald the line starts with its
/// priority, as logged lines do, so `journalctl -p err` says why a start
/// failed.
pub fn complain(level: Level, text: impl std::fmt::Display) {
    if under_journald() {
        eprintln!("<{}>thorn: {text}", priority(level));
    } else {
        eprintln!("thorn: {text}");
    }
}

/// systemd sets `JOURNAL_STREAM` to the device and inode of the journal
/// stream it gives the service; it is inherited by whatever the service
/// starts, so it counts only while standard error is still that stream
/// (sd-daemon(3)).
fn under_journald() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    stream.to_str() == Some(format!("{}:{}", stderr.dev(), stderr.ino()).as_str())
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    #[test]
    fn journald_lines_start_with_their_priority() {
        use std::sync::{Arc, Mutex};
        use tracing_subscriber::layer::SubscriberExt;
        let lines = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = lines.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .event_format(super::Priority(
                tracing_subscriber::fmt::format().without_time(),
            ));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!("broken");
            tracing::warn!("odd");
            tracing::info!("fine");
        });
        let text = String::from_utf8(lines.lock().expect("lock").clone()).expect("UTF-8");
        let starts: Vec<&str> = text.lines().map(|l| &l[..3]).collect();
        assert_eq!(starts, ["<3>", "<4>", "<6>"], "{text}");
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_database_driver_never_logs_below_info() {
        let cap = super::driver_cap();
        assert!(!cap.would_enable("tokio_postgres::query", &Level::DEBUG));
        assert!(cap.would_enable("tokio_postgres::connection", &Level::INFO));
        assert!(cap.would_enable("thorn::deliver", &Level::TRACE));
    }
}
