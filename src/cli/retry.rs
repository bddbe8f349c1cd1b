//! `thorn retry`: sends dead deliveries again, with a fresh retry schedule.

use std::io::Write;
use std::time::SystemTime;

use tokio_postgres::Client;
use uuid::Uuid;

use crate::config::Config;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Only this subscriber's
    #[arg(long)]
    pub subscriber: Option<Uuid>,
    /// Only those that died since this time (RFC 3339) or age (2h)
    #[arg(long, value_parser = super::parse_time)]
    pub since: Option<SystemTime>,
    /// Only these deliveries
    #[arg(long = "delivery")]
    pub deliveries: Vec<Uuid>,
    /// Required when no other filter is given
    #[arg(long)]
    pub all: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(config: &Config, args: Args, out: &mut impl Write) -> anyhow::Result<()> {
    if !args.all && args.subscriber.is_none() && args.since.is_none() && args.deliveries.is_empty()
    {
        anyhow::bail!(
            "say which dead deliveries to retry: --all, --subscriber, --since or --delivery"
        );
    }
    let db = super::connect(config).await?;
    // An id that names nothing is a typo, not "nothing to retry".
    if let Some(id) = args.subscriber {
        let found = db
            .query_opt("SELECT 1 FROM thorn.subscriber WHERE id = $1", &[&id])
            .await?;
        anyhow::ensure!(found.is_some(), "no subscriber {id}");
    }
    // So is a delivery that is not dead: it is on its way or arrived.
    let wrong: Vec<String> = db
        .query(
            "SELECT coalesce(i || ' is ' || d.state || ', not dead', 'no delivery ' || i)
             FROM unnest($1::uuid[]) AS i LEFT JOIN thorn.delivery d ON d.id = i
             WHERE d.state IS DISTINCT FROM 'dead'",
            &[&args.deliveries],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    if !wrong.is_empty() {
        anyhow::bail!("{}; nothing was re-queued", wrong.join(", "));
    }
    let selection = Selection {
        subscriber: args.subscriber,
        since: args.since,
        deliveries: args.deliveries,
    };
    let (requeued, skipped) = requeue(&db, &selection).await?;
    if args.json {
        let report = serde_json::json!({"requeued": requeued, "skipped_inactive": skipped});
        writeln!(out, "{report}")?;
    } else {
        writeln!(out, "re-queued {} dead deliveries", requeued.len())?;
        if skipped > 0 {
            writeln!(
                out,
                "skipped {skipped} of inactive subscribers (enable them first)"
            )?;
        }
    }
    Ok(())
}

/// Which dead deliveries to re-queue; every field narrows the selection.
#[derive(Debug, Default, Clone)]
pub struct Selection {
    pub subscriber: Option<Uuid>,
    pub since: Option<SystemTime>,
    pub deliveries: Vec<Uuid>,
}

/// Re-queues the selected dead deliveries of active subscribers; returns
/// their ids and how many dead ones were skipped because their subscriber
/// is inactive.
pub async fn requeue(
    db: &Client,
    selection: &Selection,
) -> Result<(Vec<Uuid>, i64), tokio_postgres::Error> {
    let ids: Option<&[Uuid]> =
        (!selection.deliveries.is_empty()).then_some(&selection.deliveries[..]);
    let filter = "d.state = 'dead'
          AND ($1::uuid IS NULL OR d.subscriber_id = $1)
          AND ($2::timestamptz IS NULL OR d.last_attempt_at >= $2)
          AND ($3::uuid[] IS NULL OR d.id = ANY ($3))";
    let requeued = db
        .query(
            &format!(
                "UPDATE thorn.delivery d
                 SET state = 'pending', attempts = 0, next_attempt_at = now()
                 FROM thorn.subscriber s
                 WHERE s.id = d.subscriber_id AND s.active AND {filter}
                 RETURNING d.id"
            ),
            &[&selection.subscriber, &selection.since, &ids],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<Uuid>, _>>()?;
    let skipped: i64 = db
        .query_one(
            &format!("SELECT count(*) FROM thorn.delivery d WHERE {filter}"),
            &[&selection.subscriber, &selection.since, &ids],
        )
        .await?
        .try_get(0)?;
    if !requeued.is_empty() {
        super::wake_daemons(db).await?;
    }
    Ok((requeued, skipped))
}
