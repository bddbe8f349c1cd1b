//! PostgreSQL: connecting (with backoff), migrations, the wake-up listener
//! and the queue queries. Every task owns its own connection, so one slow
//! query never blocks another task, and a lost connection is re-made by the
//! task that noticed it.

pub mod listen;
pub mod migrate;
pub mod queue;
pub mod subscribers;
pub mod tls;

use std::time::Duration;

use rand::Rng;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};
use tokio_util::sync::CancellationToken;

pub type RawConnection = Connection<Socket, <tls::Tls as MakeTlsConnect<Socket>>::Stream>;

/// Where and how to connect: a parsed connection string.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: tls::Tls,
}

/// Parses a connection string (URL or key=value), with libpq's TLS options
/// ([`tls::parse`]), and fills what it left unset: application_name
/// `thorn`, a connect timeout, and keepalives.
pub fn parse_url(url: &str) -> Result<Target, tokio_postgres::Error> {
    let (mut config, tls) = tls::parse(url)?;
    if config.get_application_name().is_none() {
        config.application_name("thorn");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    // A connection that dies without a reset (a vanished host, a dropped
    // NAT entry) must fail within a minute, not hang a task for the kernel's
    // two-hour keepalive or fifteen-minute retransmission defaults.
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(60));
    }
    Ok(Target { config, tls })
}

/// Opens a connection whose messages the caller drives (the listener needs
/// its notifications).
pub async fn connect_raw(url: &str) -> Result<(Client, RawConnection), tokio_postgres::Error> {
    let target = parse_url(url)?;
    target.config.connect(target.tls).await
}

/// Opens a connection driven by a background task.
pub async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = connect_raw(url).await?;
    drive(connection, None);
    Ok(client)
}

/// Drives a connection in a task of its own until its client is dropped,
/// it fails, or `notifications` (LISTEN's, one `()` each) is closed;
/// logs what the server says on it ([`log_notice`]).
pub fn drive(
    mut connection: RawConnection,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<()>>,
) -> tokio::task::JoinHandle<()> {
    use futures_util::StreamExt;
    use tokio_postgres::AsyncMessage;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(_)) => {
                    if notifications
                        .as_ref()
                        .is_some_and(|tx| tx.send(()).is_err())
                    {
                        break;
                    }
                }
                Ok(AsyncMessage::Notice(notice)) => log_notice(&notice),
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(error = %crate::db::Why(&error), "database connection ended");
                    break;
                }
            }
        }
    })
}

/// Logs a message the server sent (a migration's or an annotation
/// function's RAISE WARNING, say) at its own level. The driver, left to
/// itself, logs them all at info, so `log.level = "warn"` hid the warnings
/// an operator needs, such as a table a migration could not upgrade.
pub fn log_notice(notice: &tokio_postgres::error::DbError) {
    use tokio_postgres::error::Severity;
    let (message, hint) = (notice.message(), notice.hint().unwrap_or(""));
    match notice.parsed_severity() {
        Some(Severity::Warning) => tracing::warn!(hint, "database: {message}"),
        Some(Severity::Notice | Severity::Info) => tracing::info!(hint, "database: {message}"),
        _ => tracing::debug!(hint, "database: {message}"),
    }
}

/// Settings of the daemon's own sessions.
///
/// - `synchronous_commit = off`: no step of the delivery path waits for a
///   disk flush; a server crash can undo the last few of these commits,
///   which only sends rows back a step (docs/delivery.md).
/// - `jit = off`: every daemon query touches a handful of rows, but the
///   generic plans of prepared statements can be costed past
///   `jit_above_cost`, and compiling then takes a few hundred milliseconds
///   per execution (measured on the delivery claim: 250 ms against 2.4 ms).
/// - `enable_bitmapscan = off`, `enable_seqscan = off`: every daemon query
///   is a walk down an index (the queue's order, or ids). But queue
///   statistics are always stale (a backlog appears between two
///   auto-analyzes), and plans made while the queue looked empty stay
///   cached: they read the whole queue index into a bitmap and sort it, or
///   scan the table to join on ids, at every claim (measured: 130 ms and
///   35 ms per claim at 180,000 due rows, against about 2 ms). With both
///   off, the same estimates lead to the index walks, whose cost does not
///   grow with the queue.
/// - `default_transaction_isolation = 'read committed'`: claims with
///   `SKIP LOCKED` and the outbox horizon's steps rely on each statement
///   seeing what committed before it; under a database default of
///   repeatable read they would fail with serialisation errors instead.
const DAEMON_SESSION: &str = "SET synchronous_commit = off; SET jit = off; \
     SET enable_bitmapscan = off; SET enable_seqscan = off; \
     SET default_transaction_isolation = 'read committed'";

async fn daemon_session(url: &str) -> Result<Client, tokio_postgres::Error> {
    connect_with(url, DAEMON_SESSION).await
}

/// [`connect`], then `settings` (SET statements) for the session: sent as
/// statements, which a connection pooler passes on.
pub async fn connect_with(url: &str, settings: &str) -> Result<Client, tokio_postgres::Error> {
    let client = connect(url).await?;
    client.batch_execute(settings).await?;
    Ok(client)
}

/// Jittered exponential backoff for reconnecting: 100 ms doubling to 10 s,
/// each delay drawn from its upper half so daemons do not reconnect in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// A database error for the log, with its cause: tokio-postgres shows
/// only its kind ("db error", "error connecting to server"), and the
/// server's reason, with its SQLSTATE, or the I/O error is its source.
pub struct Why<'a>(pub &'a tokio_postgres::Error);

impl std::fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = std::error::Error::source(self.0);
        while let Some(cause) = source {
            // The server's DETAIL and HINT come on lines of their own.
            write!(f, ": {}", cause.to_string().replace('\n', "; "))?;
            source = cause.source();
        }
        if let Some(code) = self.0.code() {
            write!(f, " (SQLSTATE {})", code.code())?;
        }
        Ok(())
    }
}

/// Says why a task's session ended on `error` before the task starts over
/// on a new connection: the connection was lost, or the server refused a
/// statement (a deadlock with another session, say).
pub fn warn_restart(task: &str, error: &tokio_postgres::Error) {
    if error.code().is_some() {
        tracing::warn!(error = %crate::db::Why(error), task, "the database refused a statement; starting over on a new connection");
    } else {
        tracing::warn!(error = %crate::db::Why(error), task, "lost the database connection; reconnecting");
    }
}

/// Connects, retrying with backoff until it works or `shutdown` fires
/// (then `None`). `task` names the caller in the log line.
pub async fn connect_retrying(
    url: &str,
    task: &str,
    shutdown: &CancellationToken,
) -> Option<Client> {
    let mut backoff = Backoff::new();
    loop {
        match daemon_session(url).await {
            Ok(client) => return Some(client),
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::warn!(task, error = %crate::db::Why(&error), retry_in = ?delay, "cannot reach the database; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_asked_for_only_where_libpq_asks_for_it() {
        use tokio_postgres::config::{Host, SslMode};
        let mode = |url: &str| parse_url(url).expect("parses").config.get_ssl_mode();
        // A socket path as host, but TCP to hostaddr: TLS as asked.
        assert_eq!(
            mode("host=/run/postgresql hostaddr=10.0.0.5 sslmode=require"),
            SslMode::Require
        );
        assert_eq!(mode("postgres://h/db"), SslMode::Prefer);
        assert_eq!(
            mode("postgres://h/db?sslmode=verify-ca&sslrootcert=/ca"),
            SslMode::Require
        );
        assert_eq!(
            mode("host=/run/postgresql sslmode=require"),
            SslMode::Disable
        );
        assert_eq!(
            mode("postgresql://%2Frun%2Fpostgresql/db"),
            SslMode::Disable
        );
        assert_eq!(
            mode("host=/run/postgresql,db.example sslmode=require"),
            SslMode::Require
        );
        let target = parse_url("hostaddr=10.0.0.5 sslmode=require").expect("parses");
        assert_eq!(target.config.get_hosts(), [Host::Tcp("10.0.0.5".into())]);
        assert_eq!(target.config.get_ssl_mode(), SslMode::Require);
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Backoff::MAX));
        assert!(delays[11] >= Backoff::MAX / 2);
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
