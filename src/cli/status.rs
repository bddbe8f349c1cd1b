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
    /// All of them: the lists below show the 100 changed last.
    pub failing_count: i64,
    pub failing_subscribers: Vec<Subscriber>,
    pub deactivated_count: i64,
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

/// Subscribers listed per kind; the counts cover them all.
const LISTED: usize = 100;

/// " (100 of 122, changed last)" when a list is cut short.
fn shown(listed: usize, all: i64) -> String {
    if i64::try_from(listed).is_ok_and(|n| n < all) {
        format!(" ({listed} of {all}, changed last)")
    } else {
        String::new()
    }
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
    // The 100 changed last, and how many there are.
    let subscribers = |filter: &'static str| async move {
        let sql = format!(
            "SELECT id, event, url, failing_since::text, deactivated_reason, count(*) OVER ()
             FROM thorn.subscriber WHERE {filter} ORDER BY updated_at DESC LIMIT {LISTED}"
        );
        let rows = db.query(&sql, &[]).await?;
        let all = match rows.first() {
            Some(r) => r.try_get(5)?,
            None => 0,
        };
        let listed = rows
            .iter()
            .map(|r| {
                Ok(Subscriber {
                    id: r.try_get(0)?,
                    event: r.try_get(1)?,
                    url: redact_url(r.try_get(2)?),
                    failing_since: r.try_get(3)?,
                    deactivated_reason: r.try_get(4)?,
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        Ok::<_, tokio_postgres::Error>((all, listed))
    };
    let (failing_count, failing_subscribers) =
        subscribers("active AND failing_since IS NOT NULL").await?;
    let (deactivated_count, deactivated_subscribers) = subscribers("NOT active").await?;
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
        failing_count,
        failing_subscribers,
        deactivated_count,
        deactivated_subscribers,
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
            writeln!(
                f,
                "failing subscribers{}:",
                shown(self.failing_subscribers.len(), self.failing_count)
            )?;
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
            writeln!(
                f,
                "deactivated subscribers{}:",
                shown(self.deactivated_subscribers.len(), self.deactivated_count)
            )?;
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
