//! Records attempt outcomes in batches: one UPDATE for everything that
//! finished since the last write, so the database sees a few statements per
//! second instead of one per request.
//!
//! If the connection fails, the batch is kept and written after reconnecting;
//! if the process dies first, the leases run out and the deliveries are sent
//! again (at-least-once).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, queue};

/// Largest batch written at once.
const MAX_BATCH: usize = 1000;

pub struct Done {
    pub completion: queue::Completion,
    pub subscriber_id: Uuid,
    /// Set when the answer was 410 Gone.
    pub gone: bool,
    /// Whether the attempt says something about the endpoint's health (an
    /// inactive subscriber's skipped delivery does not).
    pub counts_for_health: bool,
}

/// Runs until every sender has dropped its channel end and the queue is
/// written. `retry_scheduled` wakes the claimer so it can plan its next poll.
pub async fn run(
    url: String,
    mut rx: mpsc::Receiver<Done>,
    retry_scheduled: Arc<Notify>,
    disable_after: Duration,
) {
    // Outlives shutdown on purpose: it stops when the senders are gone.
    let never = CancellationToken::new();
    let mut batch: Vec<Done> = Vec::new();
    let mut backoff = db::Backoff::new();
    'connect: while let Some(client) = db::connect_retrying(&url, "completer", &never).await {
        let statements = match queue::Statements::prepare(&client).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(%error, "completer cannot prepare its statements");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        loop {
            if batch.is_empty() {
                match rx.recv().await {
                    Some(done) => batch.push(done),
                    None => return,
                }
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(done) => batch.push(done),
                        Err(_) => break,
                    }
                }
            }
            let completions: Vec<queue::Completion> =
                batch.iter().map(|d| d.completion.clone()).collect();
            if let Err(error) = statements.complete(&client, &completions).await {
                if lost(&client, &error) {
                    tracing::warn!(%error, pending = batch.len(), "cannot record outcomes; reconnecting");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue 'connect;
                }
                // Refused, not lost: retrying the same rows would block every
                // later outcome. The leases bring these deliveries back.
                tracing::error!(%error, dropped = batch.len(), "the database refused delivery outcomes");
            } else if let Err(error) = update_subscribers(&client, &batch, disable_after).await {
                // The outcomes are written; only the bookkeeping is missing.
                tracing::warn!(%error, "cannot update subscriber health");
                if lost(&client, &error) {
                    batch.clear();
                    continue 'connect;
                }
            }
            backoff.reset();
            if batch.iter().any(|d| d.completion.state == "pending") {
                retry_scheduled.notify_one();
            }
            batch.clear();
        }
    }
}

/// Whether the connection is gone (retry elsewhere) rather than the
/// statement refused (retrying cannot help).
fn lost(client: &tokio_postgres::Client, error: &tokio_postgres::Error) -> bool {
    client.is_closed() || error.code().is_none()
}

/// Deactivates subscribers that answered 410 Gone or kept failing, and
/// tracks how long each has been failing.
async fn update_subscribers(
    client: &tokio_postgres::Client,
    batch: &[Done],
    disable_after: Duration,
) -> Result<(), tokio_postgres::Error> {
    let subscribers = |keep: &dyn Fn(&Done) -> bool| -> Vec<Uuid> {
        let set: BTreeSet<Uuid> = batch
            .iter()
            .filter(|d| keep(d))
            .map(|d| d.subscriber_id)
            .collect();
        set.into_iter().collect()
    };
    let gone = subscribers(&|d| d.gone);
    if !gone.is_empty() && queue::deactivate(client, &gone, "410 Gone").await? > 0 {
        tracing::warn!(subscribers = ?gone, "deactivated subscribers that answered 410 Gone");
    }
    let succeeded = subscribers(&|d| d.completion.state == "delivered");
    let failed = subscribers(&|d| d.counts_for_health && d.completion.state != "delivered");
    let disabled = queue::record_health(client, &succeeded, &failed, disable_after).await?;
    if !disabled.is_empty() {
        tracing::warn!(
            subscribers = ?disabled,
            disable_after = %humantime::format_duration(disable_after),
            "deactivated subscribers that kept failing without a success"
        );
    }
    Ok(())
}
