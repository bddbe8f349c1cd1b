//! `thorn replay`: delivers stored events to a subscriber again, as new
//! deliveries (new ids), also those it did not get the first time (it was
//! switched off, or created later). Only events it would receive now, by
//! its pattern and the sender rule (DESIGN.md §3): a replay must not hand
//! an owner another's events. Only dispatched events: one still waiting
//! for the dispatcher gets its deliveries from it, and a replay then would
//! send it twice.

use std::io::Write;
use std::time::SystemTime;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::Config;
use crate::matcher::{self, Matcher, Pattern};

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
    if let (Some(from), Some(to)) = (args.from, args.to) {
        // `--from 2h --to 3h`: ages count back, so this range is empty.
        anyhow::ensure!(
            from < to,
            "--from must be before --to (as ages, the larger one is --from: --from 3h --to 2h)"
        );
    }
    let selection = Events {
        ids: args.events,
        from: args.from,
        to: args.to,
    };
    let mut db = super::connect(config).await?;
    let created = replay(&mut db, args.subscriber, &selection).await?;
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
    #[error(
        "no dispatched event {}: unknown, pruned, or not dispatched yet (its deliveries are \
         created then); nothing was replayed",
        .0.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
    )]
    UnknownEvents(Vec<i64>),
    #[error(
        "event {} is not for subscriber {subscriber}: its name does not match the pattern \
         {pattern:?}, or its sender is not the subscriber's owner; nothing was replayed",
        .events.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
    )]
    NotForSubscriber {
        events: Vec<i64>,
        subscriber: Uuid,
        pattern: String,
    },
    /// An event of a time range was deleted by retention while its
    /// delivery was being written (the insert's foreign key check waited
    /// for the deletion). Events asked for by id are locked first instead.
    #[error("an event was pruned by retention while being replayed; nothing was replayed")]
    PrunedMeanwhile,
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

/// Events read and matched at a time.
const PAGE: i64 = 10_000;

/// Queues one new delivery per selected event; returns their ids. All or
/// nothing: in one transaction, with the events asked for by id locked
/// against retention before they are counted, and the subscriber against
/// deletion (which then waits, and takes the new deliveries with it).
pub async fn replay(
    db: &mut Client,
    subscriber: Uuid,
    events: &Events,
) -> Result<Vec<Uuid>, ReplayError> {
    // READ COMMITTED whatever the role's default: the lock query must find
    // an event deleted while it waited for retention's lock as gone.
    let tx = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?;
    let Some(row) = tx
        .query_opt(
            "SELECT active, event, owner FROM thorn.subscriber WHERE id = $1 FOR KEY SHARE",
            &[&subscriber],
        )
        .await?
    else {
        return Err(ReplayError::UnknownSubscriber(subscriber));
    };
    if !row.try_get::<_, bool>(0)? {
        return Err(ReplayError::Inactive(subscriber));
    }
    let pattern: String = row.try_get(1)?;
    let mut matcher = Matcher::new(
        0,
        vec![matcher::Subscriber {
            id: subscriber,
            pattern: Pattern::parse(&pattern),
            owner: row.try_get(2)?,
        }],
    );
    let ids: Option<&[i64]> = (!events.ids.is_empty()).then_some(&events.ids[..]);
    // Every id asked for must be there, or nothing is replayed: a typo
    // must not look like a success. The lock keeps them there until the
    // insert (retention skips locked events).
    if let Some(ids) = ids {
        let missing: Vec<i64> = tx
            .query(
                "WITH present AS (
                     SELECT e.id FROM thorn.event e
                     WHERE e.id = ANY($1) AND e.dispatched_at IS NOT NULL
                     FOR KEY SHARE)
                 SELECT i FROM unnest($1::int8[]) AS i
                 WHERE i NOT IN (SELECT id FROM present)
                 ORDER BY i",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()?;
        if !missing.is_empty() {
            return Err(ReplayError::UnknownEvents(missing));
        }
    }
    // Matched as the dispatcher matches: one rule, in one place. A page at
    // a time, so that a long range is never held in memory at once.
    let mut created = Vec::new();
    let mut refused = Vec::new();
    let mut after = i64::MIN;
    loop {
        let page = tx
            .query(
                "SELECT e.id, e.name, e.sender FROM thorn.event e
                 WHERE e.dispatched_at IS NOT NULL AND e.id > $4
                   AND ($1::int8[] IS NULL OR e.id = ANY ($1))
                   AND ($2::timestamptz IS NULL OR e.created_at >= $2)
                   AND ($3::timestamptz IS NULL OR e.created_at < $3)
                 ORDER BY e.id
                 LIMIT $5",
                &[&ids, &events.from, &events.to, &after, &PAGE],
            )
            .await?;
        let mut chosen = Vec::with_capacity(page.len());
        for r in &page {
            let (id, name, sender): (i64, &str, Option<&str>) =
                (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            if !matcher.recipients(name, sender).is_empty() {
                chosen.push(id);
            } else if ids.is_some() {
                refused.push(id);
            }
            after = id;
        }
        let inserted = tx
            .query(
                "INSERT INTO thorn.delivery (id, event_id, subscriber_id)
                 SELECT gen_random_uuid(), e, $1 FROM unnest($2::int8[]) AS e
                 ORDER BY e
                 RETURNING id",
                &[&subscriber, &chosen],
            )
            .await
            .map_err(
                |error| match error.as_db_error().and_then(|e| e.constraint()) {
                    Some("delivery_event_id_fkey") => ReplayError::PrunedMeanwhile,
                    _ => ReplayError::Db(error),
                },
            )?;
        for r in &inserted {
            created.push(r.try_get::<_, Uuid>(0)?);
        }
        if page.len() < PAGE as usize {
            break;
        }
    }
    // Asked for by id, an event not for this subscriber is a mistake to
    // report (and the transaction, dropped, writes nothing); in a time
    // range, it is simply not among its events.
    if ids.is_some() && !refused.is_empty() {
        return Err(ReplayError::NotForSubscriber {
            events: refused,
            subscriber,
            pattern,
        });
    }
    tx.commit().await?;
    if !created.is_empty() {
        super::wake_daemons(db).await?;
    }
    Ok(created)
}
