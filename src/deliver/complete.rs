//! Records attempt outcomes in batches: one UPDATE for everything that
//! finished since the last write, so the database sees a few statements per
//! second instead of one per request.
//!
//! If the connection fails, the batch is kept and written after reconnecting;
//! if the database refuses it for a moment (a deadlock with a concurrent
//! DELETE, a lock timeout), it is written again a few times; if the process
//! dies first, the leases run out and the deliveries are sent again
//! (at-least-once).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, queue};

/// Largest batch written at once.
const MAX_BATCH: usize = 1000;

/// Tries at a batch the database refuses for a moment, before it is given
/// up to the leases (at most 1.5 s of backoff in all).
const TRIES: u32 = 5;

/// How long outcomes gather after the first before they are written. At
/// thousands of requests per second this turns a few rows per statement
/// into dozens; nothing waits on it but the next ordered delivery.
const GATHER: Duration = Duration::from_millis(2);

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
/// written. `written` wakes the claimer after every write: it may have a
/// retry to plan, or an ordered subscriber's next delivery to claim.
pub async fn run(
    url: String,
    mut rx: mpsc::Receiver<Done>,
    written: Arc<Notify>,
    disable_after: Duration,
) {
    // Outlives shutdown on purpose: it stops when the senders are gone.
    let never = CancellationToken::new();
    let mut batch: Vec<Done> = Vec::new();
    let mut backoff = db::Backoff::new();
    let mut tries = 0;
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
                let deadline = tokio::time::Instant::now() + GATHER;
                while batch.len() < MAX_BATCH {
                    tokio::select! {
                        done = rx.recv() => match done {
                            Some(done) => batch.push(done),
                            None => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
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
                tries += 1;
                if transient(&error) && tries < TRIES {
                    tracing::warn!(%error, pending = batch.len(), "outcomes refused for now; writing them again");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                // Refused for good: retrying the same rows would block every
                // later outcome. The leases bring these deliveries back.
                tracing::error!(%error, dropped = batch.len(), "the database refused delivery outcomes");
            } else if let Err(error) =
                update_subscribers(&client, &statements, &batch, disable_after).await
            {
                // The outcomes are written; only the bookkeeping is missing.
                tracing::warn!(%error, "cannot update subscriber health");
                if lost(&client, &error) {
                    batch.clear();
                    continue 'connect;
                }
            }
            backoff.reset();
            tries = 0;
            // A retry to plan, or the next delivery of an ordered subscriber
            // now claimable.
            written.notify_one();
            batch.clear();
        }
    }
}

/// Whether the connection is gone (retry elsewhere) rather than the
/// statement refused (retrying cannot help).
fn lost(client: &tokio_postgres::Client, error: &tokio_postgres::Error) -> bool {
    client.is_closed() || error.code().is_none()
}

/// Whether the statement may succeed if simply run again: it lost a
/// deadlock or a serialization check, or waited too long for a row lock.
fn transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    [
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::LOCK_NOT_AVAILABLE,
    ]
    .iter()
    .any(|code| error.code() == Some(code))
}

/// Deactivates subscribers that answered 410 Gone or kept failing, and
/// tracks how long each has been failing.
async fn update_subscribers(
    client: &tokio_postgres::Client,
    statements: &queue::Statements,
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
    let disabled = statements
        .record_health(client, &succeeded, &failed, disable_after)
        .await?;
    if !disabled.is_empty() {
        tracing::warn!(
            subscribers = ?disabled,
            disable_after = %humantime::format_duration(disable_after),
            "deactivated subscribers that kept failing without a success"
        );
    }
    Ok(())
}
