//! `thorn replay`: delivers stored events to a subscriber again, as new
//! deliveries (new ids), whether or not they matched it the first time.

use std::io::Write;
use std::time::SystemTime;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub subscriber: Uuid,
    /// Event ids
    #[arg(long = "event")]
    pub events: Vec<i64>,
    /// Events captured at or after this time (RFC 3339) or age (2h)
    #[arg(long, value_parser = super::parse_time)]
    pub from: Option<SystemTime>,
    /// Events captured before this time
    #[arg(long, value_parser = super::parse_time)]
    pub to: Option<SystemTime>,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: Args, out: &mut impl Write) -> anyhow::Result<()> {
    if args.events.is_empty() && args.from.is_none() && args.to.is_none() {
        anyhow::bail!("say which events to replay: --event ID, --from or --to");
    }
    let selection = Events {
        ids: args.events,
        from: args.from,
        to: args.to,
    };
    let created = replay(&super::connect(config).await?, args.subscriber, &selection).await?;
    if args.json {
        writeln!(out, "{}", serde_json::json!({"deliveries": created}))?;
    } else {
        writeln!(
            out,
            "queued {} deliveries to {}",
            created.len(),
            args.subscriber
        )?;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no subscriber {0}")]
    UnknownSubscriber(Uuid),
    #[error("subscriber {0} is not active; enable it first")]
    Inactive(Uuid),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// Events to replay: by id, or by the time they were captured.
#[derive(Debug, Default, Clone)]
pub struct Events {
    pub ids: Vec<i64>,
    pub from: Option<SystemTime>,
    pub to: Option<SystemTime>,
}

/// Queues one new delivery per selected event; returns their ids.
pub async fn replay(
    db: &Client,
    subscriber: Uuid,
    events: &Events,
) -> Result<Vec<Uuid>, ReplayError> {
    let active: Option<bool> = db
        .query_opt(
            "SELECT active FROM thorn.subscriber WHERE id = $1",
            &[&subscriber],
        )
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
    match active {
        None => return Err(ReplayError::UnknownSubscriber(subscriber)),
        Some(false) => return Err(ReplayError::Inactive(subscriber)),
        Some(true) => {}
    }
    let ids: Option<&[i64]> = (!events.ids.is_empty()).then_some(&events.ids[..]);
    let created = db
        .query(
            "INSERT INTO thorn.delivery (id, event_id, subscriber_id)
             SELECT gen_random_uuid(), e.id, $1 FROM thorn.event e
             WHERE ($2::int8[] IS NULL OR e.id = ANY ($2))
               AND ($3::timestamptz IS NULL OR e.created_at >= $3)
               AND ($4::timestamptz IS NULL OR e.created_at < $4)
             ORDER BY e.id
             RETURNING id",
            &[&subscriber, &ids, &events.from, &events.to],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<Uuid>, _>>()?;
    if !created.is_empty() {
        super::wake_daemons(db).await?;
    }
    Ok(created)
}
