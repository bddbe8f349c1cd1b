//! The Prometheus metrics: counters and histograms that the tasks bump in
//! their hot paths, and gauges read from the database by the monitor.
//!
//! Labels are bounded by construction: the only labelled family is keyed by
//! the delivery outcome (3 values) and the stored error class (about ten).
//! No per-URL or per-subscriber label exists, so the series count does not
//! grow with the number of subscribers.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which
/// Prometheus scrapes natively).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `delivered`, `retry` or `dead`.
    pub outcome: &'static str,
    /// `ok`, or the error class stored in `thorn.delivery.error_class`.
    pub class: &'static str,
}

/// Values read from the database (all daemons' view), refreshed by the
/// monitor.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Backlog {
    pub events_captured: i64,
    pub events_pending: i64,
    /// Event ids above the outbox horizon (sql/0007_horizon.sql).
    pub events_above_horizon: i64,
    pub oldest_pending_event: Duration,
    pub deliveries_due: i64,
    pub deliveries_pending: i64,
    pub oldest_due_delivery: Duration,
    pub subscribers_active: i64,
    pub subscribers_deactivated: i64,
}

type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    events_dispatched: Counter,
    deliveries_created: Counter,
    attempts: Family<AttemptLabels, Counter>,
    outcomes_dropped: Counter,
    request_duration: Histogram,
    commit_to_delivery: Histogram,
    events_captured: Gauge,
    events_pending: Gauge,
    events_above_horizon: Gauge,
    oldest_pending_event: FloatGauge,
    deliveries_due: Gauge,
    deliveries_pending: Gauge,
    oldest_due_delivery: FloatGauge,
    subscribers_active: Gauge,
    subscribers_deactivated: Gauge,
    database_up: Gauge,
    listening: Gauge,
    healthy: Gauge,
    reloads: Family<ReloadLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// `ok` or `failed`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("thorn");
        let m = Metrics {
            events_dispatched: Counter::default(),
            deliveries_created: Counter::default(),
            attempts: Family::default(),
            outcomes_dropped: Counter::default(),
            // 5 ms … ~41 s: request times up to well past any sane timeout.
            request_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14),
            ),
            // 10 ms … 24 h: first tries land in the low buckets, retries in
            // the hours.
            commit_to_delivery: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                3600.0, 7200.0, 21600.0, 86400.0,
            ]),
            events_captured: Gauge::default(),
            events_pending: Gauge::default(),
            events_above_horizon: Gauge::default(),
            oldest_pending_event: FloatGauge::default(),
            deliveries_due: Gauge::default(),
            deliveries_pending: Gauge::default(),
            oldest_due_delivery: FloatGauge::default(),
            subscribers_active: Gauge::default(),
            subscribers_deactivated: Gauge::default(),
            database_up: Gauge::default(),
            listening: Gauge::default(),
            healthy: Gauge::default(),
            reloads: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "build",
            "The running version",
            Info::new(VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            }),
        );
        r.register(
            "events_dispatched",
            "Outbox events this daemon matched to subscribers",
            m.events_dispatched.clone(),
        );
        r.register(
            "deliveries_created",
            "Delivery rows this daemon created from events",
            m.deliveries_created.clone(),
        );
        r.register(
            "delivery_attempts",
            "Delivery attempts by this daemon, by outcome (delivered, retry, dead) and error class (ok for a 2xx)",
            m.attempts.clone(),
        );
        r.register(
            "delivery_outcomes_dropped",
            "Attempt outcomes this daemon did not write: another claim had taken the delivery's lease over, or the database refused the row; the delivery is sent again",
            m.outcomes_dropped.clone(),
        );
        r.register_with_unit(
            "delivery_request_duration",
            "Duration of one delivery attempt (request and capped response read)",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        r.register_with_unit(
            "commit_to_delivery",
            "From the capturing transaction's now() to a 2xx answer, retries included",
            Unit::Seconds,
            m.commit_to_delivery.clone(),
        );
        r.register(
            "events_captured",
            "Outbox rows written by capture triggers since the schema was installed (the outbox id sequence; all daemons; a rolled-back write may use an id)",
            m.events_captured.clone(),
        );
        r.register(
            "events_pending",
            "Outbox events not yet dispatched",
            m.events_pending.clone(),
        );
        r.register(
            "events_above_horizon",
            "Event ids above the outbox horizon, which claims walk; grows while a transaction with an id stays open anywhere in the cluster",
            m.events_above_horizon.clone(),
        );
        r.register_with_unit(
            "oldest_pending_event_age",
            "Age of the oldest undispatched outbox event (0 when none)",
            Unit::Seconds,
            m.oldest_pending_event.clone(),
        );
        r.register(
            "deliveries_due",
            "Pending deliveries whose next attempt is due now",
            m.deliveries_due.clone(),
        );
        r.register(
            "deliveries_pending",
            "Pending deliveries, due or waiting for a retry",
            m.deliveries_pending.clone(),
        );
        r.register_with_unit(
            "oldest_due_delivery_age",
            "How long the most overdue pending delivery has been due (0 when none)",
            Unit::Seconds,
            m.oldest_due_delivery.clone(),
        );
        r.register(
            "subscribers_active",
            "Active subscribers",
            m.subscribers_active.clone(),
        );
        r.register(
            "subscribers_deactivated",
            "Deactivated subscribers (410 Gone, failing too long, or by hand)",
            m.subscribers_deactivated.clone(),
        );
        r.register(
            "database_up",
            "1 when the monitor's last database query succeeded",
            m.database_up.clone(),
        );
        r.register(
            "listening",
            "1 while the wake-up LISTEN is active",
            m.listening.clone(),
        );
        r.register(
            "healthy",
            "1 while every task is alive and making progress",
            m.healthy.clone(),
        );
        r.register(
            "config_reloads",
            "SIGHUP reloads, by result",
            m.reloads.clone(),
        );
        Metrics { registry, ..m }
    }

    /// A dispatch transaction committed.
    pub fn dispatched(&self, events: usize, deliveries: usize) {
        self.events_dispatched.inc_by(events as u64);
        self.deliveries_created.inc_by(deliveries as u64);
    }

    /// An attempt finished. `state` is the delivery's new state; `class` is
    /// `None` for a 2xx; `event_age` is the event's age at the answer.
    pub fn attempt(
        &self,
        state: &str,
        class: Option<&'static str>,
        duration: Duration,
        event_age: Option<Duration>,
    ) {
        let outcome = match state {
            "delivered" => "delivered",
            "dead" => "dead",
            _ => "retry",
        };
        self.attempts
            .get_or_create(&AttemptLabels {
                outcome,
                class: class.unwrap_or("ok"),
            })
            .inc();
        self.request_duration.observe(duration.as_secs_f64());
        if let (Some(age), "delivered") = (event_age, outcome) {
            self.commit_to_delivery.observe(age.as_secs_f64());
        }
    }

    /// Outcomes the completer did not write.
    pub fn outcomes_dropped(&self, count: usize) {
        self.outcomes_dropped.inc_by(count as u64);
    }

    pub fn set_backlog(&self, b: &Backlog) {
        self.events_captured.set(b.events_captured);
        self.events_pending.set(b.events_pending);
        self.events_above_horizon.set(b.events_above_horizon);
        self.oldest_pending_event
            .set(b.oldest_pending_event.as_secs_f64());
        self.deliveries_due.set(b.deliveries_due);
        self.deliveries_pending.set(b.deliveries_pending);
        self.oldest_due_delivery
            .set(b.oldest_due_delivery.as_secs_f64());
        self.subscribers_active.set(b.subscribers_active);
        self.subscribers_deactivated.set(b.subscribers_deactivated);
    }

    pub fn set_state(&self, database_up: bool, listening: bool, healthy: bool) {
        self.database_up.set(i64::from(database_up));
        self.listening.set(i64::from(listening));
        self.healthy.set(i64::from(healthy));
    }

    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .get_or_create(&ReloadLabels {
                result: if ok { "ok" } else { "failed" },
            })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_appear_in_the_text() {
        let m = Metrics::new();
        m.dispatched(3, 5);
        m.attempt(
            "delivered",
            None,
            Duration::from_millis(20),
            Some(Duration::from_millis(40)),
        );
        m.attempt("pending", Some("timeout"), Duration::from_secs(3), None);
        m.attempt("dead", Some("http_status"), Duration::from_millis(5), None);
        let text = m.encode().expect("encode");
        assert!(text.contains("thorn_events_dispatched_total 3"), "{text}");
        assert!(text.contains("thorn_deliveries_created_total 5"), "{text}");
        assert!(text.contains(r#"thorn_delivery_attempts_total{outcome="delivered",class="ok"} 1"#));
        assert!(
            text.contains(r#"thorn_delivery_attempts_total{outcome="retry",class="timeout"} 1"#)
        );
        assert!(
            text.contains(r#"thorn_delivery_attempts_total{outcome="dead",class="http_status"} 1"#)
        );
        assert!(
            text.contains("thorn_commit_to_delivery_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("thorn_delivery_request_duration_seconds_count 3"));
        assert!(text.ends_with("# EOF\n"));
    }
}
