//! Retention: prunes delivered and dead deliveries, and events nothing
//! refers to any more, so the outbox stays small.
//!
//! Deletes go in batches of [`BATCH`] rows picked with SKIP LOCKED, each its
//! own short statement, so pruning never holds long locks or blocks a
//! dispatcher, and several daemons can prune at once.

use std::time::{Duration, SystemTime};

use tokio_postgres::{Client, GenericClient};
use tokio_util::sync::CancellationToken;

use crate::config::Retention;
use crate::db;

const BATCH: i64 = 1000;

/// Rows removed by one pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub delivered: u64,
    pub dead: u64,
    pub events: u64,
}

/// Prunes every `settings.interval` until `shutdown`.
pub async fn run(url: String, settings: Retention, shutdown: CancellationToken) {
    let mut client = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(settings.interval) => {}
            _ = shutdown.cancelled() => return,
        }
        if client.is_none() {
            client = db::connect(&url).await.ok();
        }
        let Some(c) = &mut client else { continue };
        match prune(c, &settings, &shutdown).await {
            Ok(p) if p != Pruned::default() => tracing::info!(?p, "pruned old rows"),
            Ok(_) => {}
            Err(error) => {
                tracing::warn!(error = %crate::db::Why(&error), "pruning failed; retrying next interval");
                client = None;
            }
        }
    }
}

/// One full pass: repeats each batch delete until it comes up short, or
/// `stop` (a pass over a large backlog of old rows takes a while, and
/// shutdown must not wait for it; the next pass goes on from there).
pub async fn prune(
    db: &mut Client,
    settings: &Retention,
    stop: &CancellationToken,
) -> Result<Pruned, tokio_postgres::Error> {
    let delivered = repeat(
        db,
        "DELETE FROM thorn.delivery WHERE id IN (
             SELECT id FROM thorn.delivery
             WHERE state = 'delivered' AND last_attempt_at < now() - $1::float8 * interval '1 second'
               AND last_attempt_at >= $3
             ORDER BY last_attempt_at
             LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING last_attempt_at",
        settings.delivered,
        stop,
    )
    .await?;
    let dead = repeat(
        db,
        "DELETE FROM thorn.delivery WHERE id IN (
             SELECT id FROM thorn.delivery
             WHERE state = 'dead' AND last_attempt_at < now() - $1::float8 * interval '1 second'
               AND last_attempt_at >= $3
             ORDER BY last_attempt_at
             LIMIT $2 FOR UPDATE SKIP LOCKED)
         RETURNING last_attempt_at",
        settings.dead,
        stop,
    )
    .await?;
    let events = prune_events(db, settings.delivered, stop).await?;
    Ok(Pruned {
        delivered,
        dead,
        events,
    })
}

/// Runs a batch delete until it comes up short. Each batch starts where
/// the one before ended (`$3`, the latest time it deleted, returned by the
/// statement): rows passed over, kept or locked elsewhere, are read once
/// per pass, not once per batch. Rows of the same time are read again, so
/// none is skipped.
async fn repeat(
    db: &impl GenericClient,
    sql: &str,
    age: Duration,
    stop: &CancellationToken,
) -> Result<u64, tokio_postgres::Error> {
    let statement = db.prepare(sql).await?;
    let mut total = 0;
    let mut from = SystemTime::UNIX_EPOCH;
    while !stop.is_cancelled() {
        let rows = db
            .query(&statement, &[&age.as_secs_f64(), &BATCH, &from])
            .await?;
        total += rows.len() as u64;
        for row in &rows {
            from = from.max(row.try_get(0)?);
        }
        if rows.len() < BATCH as usize {
            break;
        }
    }
    Ok(total)
}

/// Deletes events dispatched before `age` that no delivery refers to any
/// more; a dead delivery keeps its event (for `thorn retry`) until the
/// dead one is pruned. Those kept are the oldest, so batches go on from a
/// cursor as in [`repeat`].
///
/// Each batch locks its events first and deletes them in a second
/// statement that looks for deliveries again, under a newer snapshot. In
/// one statement, a delivery that `thorn replay` committed after the
/// statement's snapshot was not seen, and the cascade deleted it with its
/// event. Now a delivery committed before the lock is seen by the second
/// look, and one inserted after it waits on the lock (its foreign key
/// check) and then fails, so `replay` reports it instead of losing it.
async fn prune_events(
    db: &mut Client,
    age: Duration,
    stop: &CancellationToken,
) -> Result<u64, tokio_postgres::Error> {
    let lock = db
        .prepare(
            "SELECT e.id, e.dispatched_at FROM thorn.event e
             WHERE e.dispatched_at < now() - $1::float8 * interval '1 second'
               AND e.dispatched_at >= $3
               AND NOT EXISTS (SELECT 1 FROM thorn.delivery d WHERE d.event_id = e.id)
             ORDER BY e.dispatched_at
             LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .await?;
    let delete = db
        .prepare(
            "DELETE FROM thorn.event e WHERE e.id = ANY($1)
               AND NOT EXISTS (SELECT 1 FROM thorn.delivery d WHERE d.event_id = e.id)",
        )
        .await?;
    let mut total = 0;
    let mut from = SystemTime::UNIX_EPOCH;
    while !stop.is_cancelled() {
        // READ COMMITTED whatever the role's default: the second statement
        // must see deliveries committed after the first one's snapshot.
        let tx = db
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
            .start()
            .await?;
        let rows = tx
            .query(&lock, &[&age.as_secs_f64(), &BATCH, &from])
            .await?;
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<_, i64>(0)?);
            from = from.max(row.try_get(1)?);
        }
        total += tx.execute(&delete, &[&ids]).await?;
        tx.commit().await?;
        if rows.len() < BATCH as usize {
            break;
        }
    }
    Ok(total)
}
