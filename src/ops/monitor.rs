//! The monitor: every few seconds it asks the database for the backlog
//! (which also proves the database answers), judges the tasks' health,
//! feeds the systemd watchdog only when healthy, and keeps STATUS= current.
//!
//! It has its own connection, so a busy queue connection never makes the
//! daemon look dead, and every query is bounded by a timeout so a hung
//! database shows as "down" instead of hanging the monitor.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::metrics::Backlog;
use super::{Notifier, State};
use crate::db;

/// Longest a monitor query (or connect) may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

// One round trip. Every count uses an index (the outbox's primary key above
// its horizon, `delivery_due`) except the subscriber one, a small table.
const BACKLOG: &str = "
    SELECT
      coalesce(pg_sequence_last_value(pg_get_serial_sequence('thorn.event', 'id')::regclass), 0)::int8,
      (SELECT count(*) FROM thorn.event
       WHERE id > coalesce((SELECT low FROM thorn.outbox_horizon), 0) AND dispatched_at IS NULL),
      coalesce((SELECT CASE WHEN isfinite(created_at) THEN extract(epoch FROM now() - created_at) END FROM thorn.event
                WHERE id > coalesce((SELECT low FROM thorn.outbox_horizon), 0) AND dispatched_at IS NULL
                ORDER BY id LIMIT 1), 0)::float8,
      (SELECT count(*) FROM thorn.delivery WHERE state = 'pending' AND next_attempt_at <= now()),
      (SELECT count(*) FROM thorn.delivery WHERE state = 'pending'),
      coalesce(extract(epoch FROM now() - (SELECT min(next_attempt_at) FROM thorn.delivery
                WHERE state = 'pending' AND next_attempt_at <= now())), 0)::float8,
      (SELECT count(*) FILTER (WHERE active) FROM thorn.subscriber),
      (SELECT count(*) FILTER (WHERE NOT active) FROM thorn.subscriber),
      coalesce((SELECT low FROM thorn.outbox_horizon), 0)::int8";

/// Half the watchdog interval (systemd's advice), at most 5 s, at least
/// 100 ms; 5 s without a watchdog.
pub fn interval(watchdog: Option<Duration>) -> Duration {
    watchdog.map_or(Duration::from_secs(5), |w| {
        (w / 2).clamp(Duration::from_millis(100), Duration::from_secs(5))
    })
}

pub struct Monitor {
    pub url: String,
    pub state: Arc<State>,
    pub notifier: Notifier,
    pub interval: Duration,
}

impl Monitor {
    pub async fn run(self, finished: CancellationToken) {
        let mut client: Option<Client> = None;
        let mut last_problems: Vec<String> = Vec::new();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = finished.cancelled() => return,
            }
            let backlog = self.backlog(&mut client).await;
            self.state.set_database_up(backlog.is_some());
            if let Some(b) = &backlog {
                self.state.metrics.set_backlog(b);
            }
            let health = self.state.health();
            self.state.metrics.set_state(
                self.state.database_up(),
                self.state.listening(),
                health.healthy,
            );
            // systemd arms the watchdog at READY=1; before that the start
            // timeout rules.
            let started = self.state.ready.load(Ordering::SeqCst);
            if health.healthy && started {
                self.notifier.watchdog_ping();
            } else if !health.healthy && !same_problems(&health.problems, &last_problems) {
                tracing::error!(problems = ?health.problems, "unhealthy: not feeding the watchdog");
            }
            last_problems = health.problems;
            if started && !self.state.stopping.load(Ordering::SeqCst) {
                let line = match health.refused.first() {
                    Some(refused) if last_problems.is_empty() => format!("not ready: {refused}"),
                    _ => status_line(&self.state, backlog.as_ref(), &last_problems),
                };
                self.notifier.status(&line);
            }
        }
    }

    async fn backlog(&self, client: &mut Option<Client>) -> Option<Backlog> {
        if !matches!(client, Some(c) if !c.is_closed()) {
            // Its statements end on the server too when they take longer
            // than the monitor waits.
            let timeout = format!("SET statement_timeout = {}", QUERY_TIMEOUT.as_millis());
            let session = db::connect_with(&self.url, &timeout);
            *client = match tokio::time::timeout(QUERY_TIMEOUT, session).await {
                Ok(Ok(c)) => Some(c),
                Ok(Err(error)) => {
                    tracing::debug!(error = %crate::db::Why(&error), "monitor cannot reach the database");
                    None
                }
                Err(_) => None,
            };
        }
        let c = client.as_ref()?;
        let result = tokio::time::timeout(QUERY_TIMEOUT, c.query_one(BACKLOG, &[])).await;
        let row = match result {
            Ok(Ok(row)) => row,
            Ok(Err(error)) => {
                // Before start-up has migrated a new database, its tables
                // (or a newer schema's columns) are not there yet: nothing
                // to warn about.
                let missing = [
                    SqlState::UNDEFINED_TABLE,
                    SqlState::UNDEFINED_COLUMN,
                    SqlState::UNDEFINED_FUNCTION,
                ];
                let unmigrated = error.code().is_some_and(|c| missing.contains(c))
                    && !self.state.ready.load(Ordering::SeqCst);
                if unmigrated {
                    tracing::debug!(error = %crate::db::Why(&error), "the monitor waits for the migrations");
                } else {
                    tracing::warn!(error = %crate::db::Why(&error), "the monitor's backlog query failed");
                }
                *client = None;
                return None;
            }
            Err(_) => {
                // Blocked (a lock on thorn's tables) or overloaded. The
                // server ends the query itself (statement_timeout); the
                // cancel makes sure, so that no backend is left behind
                // when the next round connects anew.
                tracing::warn!(
                    timeout = ?QUERY_TIMEOUT,
                    "the database did not answer the monitor in time: locked or overloaded"
                );
                let tls = db::parse_url(&self.url).map(|target| target.tls);
                if let (Some(c), Ok(tls)) = (client.take(), tls) {
                    let cancel = c.cancel_token();
                    tokio::spawn(async move {
                        let _ = cancel.cancel_query(tls).await;
                    });
                }
                return None;
            }
        };
        let secs = |i: usize| -> Duration {
            let s: f64 = row.try_get(i).unwrap_or(0.0);
            Duration::try_from_secs_f64(s.max(0.0)).unwrap_or_default()
        };
        let count = |i: usize| -> i64 { row.try_get(i).unwrap_or(0) };
        Some(Backlog {
            events_captured: count(0),
            events_pending: count(1),
            oldest_pending_event: secs(2),
            deliveries_due: count(3),
            deliveries_pending: count(4),
            oldest_due_delivery: secs(5),
            subscribers_active: count(6),
            subscribers_deactivated: count(7),
            events_above_horizon: (count(0) - count(8)).max(0),
        })
    }
}

/// Whether two lists of problems name the same ones: "no progress for 63s"
/// is the same problem as "for 58s" five seconds earlier, not news to log.
fn same_problems(now: &[String], before: &[String]) -> bool {
    let kinds = |problems: &[String]| -> Vec<String> {
        let kind = |p: &String| p.chars().filter(|c| !c.is_ascii_digit()).collect();
        problems.iter().map(kind).collect()
    };
    kinds(now) == kinds(before)
}

fn status_line(state: &State, backlog: Option<&Backlog>, problems: &[String]) -> String {
    if let Some(first) = problems.first() {
        return format!("unhealthy: {first}");
    }
    let Some(b) = backlog else {
        return "database unreachable; tasks are reconnecting".into();
    };
    let listen = if state.listening() {
        "listening"
    } else {
        "LISTEN lost, reconnecting"
    };
    format!(
        "running, {listen}: {} events pending, {} deliveries due, {} waiting to retry",
        b.events_pending,
        b.deliveries_due,
        b.deliveries_pending - b.deliveries_due
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_that_only_grows_older_is_not_news() {
        let at = |s: u32| vec![format!("the sender task has made no progress for {s}s")];
        assert!(same_problems(&at(63), &at(58)));
        assert!(!same_problems(&at(63), &[]));
        assert!(!same_problems(
            &at(63),
            &["the sender task has ended".to_owned()]
        ));
    }

    #[test]
    fn interval_follows_the_watchdog() {
        assert_eq!(interval(None), Duration::from_secs(5));
        assert_eq!(
            interval(Some(Duration::from_secs(30))),
            Duration::from_secs(5)
        );
        assert_eq!(
            interval(Some(Duration::from_secs(2))),
            Duration::from_secs(1)
        );
        assert_eq!(
            interval(Some(Duration::from_millis(10))),
            Duration::from_millis(100)
        );
    }
}
