//! `thorn status`: what is waiting, what failed, who is switched off.

use std::io::Write;

use serde::Serialize;
use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::Config;
use crate::db::migrate;

use super::{age, redact_url};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pending_events: i64,
    pub oldest_pending_event_age_seconds: Option<f64>,
    pub deliveries: Deliveries,
    pub active_subscribers: i64,
    pub failing_subscribers: Vec<Subscriber>,
    pub deactivated_subscribers: Vec<Subscriber>,
    /// Partitions of annotated trees that are not annotated themselves.
    pub uncaptured_partitions: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Deliveries {
    pub pending: i64,
    pub due: i64,
    pub delivered: i64,
    pub dead: i64,
}

#[derive(Debug, Serialize)]
pub struct Subscriber {
    pub id: Uuid,
    pub event: String,
    pub url: String,
    pub failing_since: Option<String>,
    pub deactivated_reason: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: Args, out: &mut impl Write) -> anyhow::Result<()> {
    let status = collect(&super::connect(config).await?).await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&status)?)?;
    } else {
        write!(out, "{status}")?;
    }
    Ok(())
}

pub async fn collect(db: &Client) -> Result<Status, tokio_postgres::Error> {
    let events = db
        .query_one(
            "SELECT count(*),
                    extract(epoch FROM now() - min(created_at) FILTER (WHERE isfinite(created_at)))::float8
             FROM thorn.event
             WHERE id > coalesce((SELECT low FROM thorn.outbox_horizon), 0)
               AND dispatched_at IS NULL",
            &[],
        )
        .await?;
    let d = db
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'pending'),
                    count(*) FILTER (WHERE state = 'pending' AND next_attempt_at <= now()),
                    count(*) FILTER (WHERE state = 'delivered'),
                    count(*) FILTER (WHERE state = 'dead')
             FROM thorn.delivery",
            &[],
        )
        .await?;
    let active: i64 = db
        .query_one("SELECT count(*) FROM thorn.subscriber WHERE active", &[])
        .await?
        .try_get(0)?;
    let subscribers = |filter: &'static str| async move {
        let sql = format!(
            "SELECT id, event, url, failing_since::text, deactivated_reason
             FROM thorn.subscriber WHERE {filter} ORDER BY updated_at DESC LIMIT 100"
        );
        let rows = db.query(&sql, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(Subscriber {
                    id: r.try_get(0)?,
                    event: r.try_get(1)?,
                    url: redact_url(r.try_get(2)?),
                    failing_since: r.try_get(3)?,
                    deactivated_reason: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()
    };
    Ok(Status {
        pending_events: events.try_get(0)?,
        oldest_pending_event_age_seconds: events.try_get(1)?,
        deliveries: Deliveries {
            pending: d.try_get(0)?,
            due: d.try_get(1)?,
            delivered: d.try_get(2)?,
            dead: d.try_get(3)?,
        },
        active_subscribers: active,
        failing_subscribers: subscribers("active AND failing_since IS NOT NULL").await?,
        deactivated_subscribers: subscribers("NOT active").await?,
        uncaptured_partitions: migrate::uncaptured_partitions(db).await?,
    })
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "events waiting for dispatch: {}", self.pending_events)?;
        if let Some(a) = self.oldest_pending_event_age_seconds {
            write!(f, " (oldest {})", age(a))?;
        }
        writeln!(f)?;
        let d = &self.deliveries;
        writeln!(
            f,
            "deliveries: {} pending ({} due now), {} delivered, {} dead",
            d.pending, d.due, d.delivered, d.dead
        )?;
        writeln!(f, "active subscribers: {}", self.active_subscribers)?;
        if !self.failing_subscribers.is_empty() {
            writeln!(f, "failing subscribers:")?;
            for s in &self.failing_subscribers {
                let since = s.failing_since.as_deref().unwrap_or("?");
                writeln!(
                    f,
                    "  {} {} {} (failing since {since})",
                    s.id, s.event, s.url
                )?;
            }
        }
        if !self.deactivated_subscribers.is_empty() {
            writeln!(f, "deactivated subscribers:")?;
            for s in &self.deactivated_subscribers {
                let reason = s
                    .deactivated_reason
                    .as_deref()
                    .unwrap_or("switched off, no reason given");
                writeln!(f, "  {} {} {} ({reason})", s.id, s.event, s.url)?;
            }
        }
        if !self.uncaptured_partitions.is_empty() {
            writeln!(
                f,
                "partitions not captured (annotate their parent again): {}",
                self.uncaptured_partitions.join(", ")
            )?;
        }
        Ok(())
    }
}
