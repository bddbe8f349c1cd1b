//! Records attempt outcomes in batches: one UPDATE for everything that
//! finished since the last write, so the database sees a few statements per
//! second instead of one per request.
//!
//! If the connection fails (or the server says the session is ending), the
//! batch is kept and written after reconnecting; if the database refuses it
//! for a moment (a deadlock with a concurrent DELETE, a lock or statement
//! timeout), it is written again a few times; if it refuses it for good (a
//! row a trigger or constraint will not take), it is written in halves, so
//! that only the rows refused are given up. An outcome is written only
//! under the lease its attempt was made under (see `queue::COMPLETE`).
//! Whatever is not written, the leases bring back: the deliveries are sent
//! again (at-least-once).

use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::db::{self, queue};
use crate::ops::Probe;

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
    probe: Probe,
) {
    // Outlives shutdown on purpose: it stops when the senders are gone.
    let never = CancellationToken::new();
    let mut batch: Vec<Done> = Vec::new();
    // The parts of `batch` left to write, the next one last.
    let mut parts: Vec<Range<usize>> = Vec::new();
    let mut unwritten = Unwritten::default();
    let mut backoff = db::Backoff::new();
    'connect: while let Some(client) = db::connect_retrying(&url, "completer", &never).await {
        let statements = match queue::Statements::prepare(&client).await {
            Ok(s) => s,
            Err(error) => {
                tracing::warn!(error = %crate::db::Why(&error), "completer cannot prepare its statements");
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
                parts.push(0..batch.len());
            }
            let writing = write(&client, &statements, &batch, &mut parts, &mut unwritten);
            if let Err(error) = writing.await {
                let pending: usize = parts.iter().map(|p| p.len()).sum();
                tracing::warn!(error = %crate::db::Why(&error), pending, "cannot record outcomes; reconnecting");
                tokio::time::sleep(backoff.next_delay()).await;
                continue 'connect;
            }
            std::mem::take(&mut unwritten).report(&probe);
            if let Err(error) =
                update_subscribers(&client, &statements, &batch, disable_after).await
            {
                // The outcomes are written; only the bookkeeping is missing.
                tracing::warn!(error = %crate::db::Why(&error), "cannot update subscriber health");
                if lost(&client, &error) {
                    batch.clear();
                    continue 'connect;
                }
            }
            backoff.reset();
            // A retry to plan, or the next delivery of an ordered subscriber
            // now claimable.
            written.notify_one();
            batch.clear();
        }
    }
}

/// Writes the parts of `batch` left in `parts`, noting in `unwritten` what
/// is given up. A part the database refuses for a moment is written again
/// (up to [`TRIES`] times, then given up: retrying the same rows for longer
/// would hold up every later outcome). One it refuses for good is written
/// in halves: a single row a trigger or a constraint refuses fails the
/// whole statement, and only that row is given up. `Err` when the
/// connection is lost; `parts` then holds what is left.
async fn write(
    client: &tokio_postgres::Client,
    statements: &queue::Statements,
    batch: &[Done],
    parts: &mut Vec<Range<usize>>,
    unwritten: &mut Unwritten,
) -> Result<(), tokio_postgres::Error> {
    let mut backoff = db::Backoff::new();
    let mut tries = 0;
    while let Some(part) = parts.pop() {
        let completions: Vec<queue::Completion> = batch[part.clone()]
            .iter()
            .map(|d| d.completion.clone())
            .collect();
        let error = match statements.complete(client, &completions).await {
            Ok(n) => {
                // The others no longer hold the leases they were sent
                // under: other claims took them over.
                unwritten.superseded += part.len().saturating_sub(n as usize);
                tries = 0;
                backoff.reset();
                continue;
            }
            Err(error) => error,
        };
        if lost(client, &error) {
            parts.push(part);
            return Err(error);
        }
        tries += 1;
        let for_good = !transient(&error);
        if !for_good && tries < TRIES {
            tracing::warn!(error = %crate::db::Why(&error), pending = part.len(), "outcomes refused for now; writing them again");
            parts.push(part);
            tokio::time::sleep(backoff.next_delay()).await;
            continue;
        }
        tries = 0;
        if for_good && part.len() > 1 {
            let middle = part.start + part.len() / 2;
            parts.push(middle..part.end);
            parts.push(part.start..middle);
            continue;
        }
        unwritten
            .refused
            .extend(batch[part].iter().map(|d| d.completion.id));
        unwritten.error = Some(error);
    }
    Ok(())
}

/// The outcomes of a batch that were not written; their leases bring the
/// deliveries back.
#[derive(Default)]
struct Unwritten {
    /// Their leases had gone to other claims, which send them again.
    superseded: usize,
    /// Refused by the database, and its last refusal.
    refused: Vec<Uuid>,
    error: Option<tokio_postgres::Error>,
}

impl Unwritten {
    fn report(self, probe: &Probe) {
        if self.superseded > 0 {
            tracing::debug!(
                count = self.superseded,
                "outcomes not written: another claim took their leases over, or the deliveries were deleted"
            );
        }
        if let Some(error) = self.error {
            let some: Vec<&Uuid> = self.refused.iter().take(10).collect();
            tracing::error!(
                error = %crate::db::Why(&error),
                dropped = self.refused.len(),
                deliveries = ?some,
                "the database refused delivery outcomes; their leases bring the deliveries back"
            );
        }
        probe
            .metrics()
            .outcomes_dropped(self.superseded + self.refused.len());
    }
}

/// Whether the connection is gone (write again on a new one) rather than
/// the statement refused. The server's word that the session is ending
/// (class 08, a connection exception; 57P, an administrator's terminate or
/// shutdown) can arrive before the client notices its connection closed.
fn lost(client: &tokio_postgres::Client, error: &tokio_postgres::Error) -> bool {
    client.is_closed()
        || error.code().map_or(true, |state| {
            let code = state.code();
            code.starts_with("08") || code.starts_with("57P")
        })
}

/// Whether the statement may succeed if simply run again: it lost a
/// deadlock or a serialization check, or waited too long for a row lock
/// (`lock_timeout`, or `statement_timeout` cancelling it).
fn transient(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    [
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::QUERY_CANCELED,
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
