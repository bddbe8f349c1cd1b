//! The dispatcher: turns outbox events into delivery rows.
//!
//! In one transaction it claims a batch of pending events (SKIP LOCKED, so
//! several daemons share the outbox), matches them against the active
//! subscribers, inserts the deliveries and marks the events dispatched. A
//! daemon dying mid-batch rolls the transaction back: nothing is lost.
//! Pending events are found above the outbox horizon, which batches move
//! up a step at a time while it lags (sql/0007_horizon.sql).
//!
//! It also owns the wake-up protocol of DESIGN.md §4: while work keeps
//! coming it polls; once the outbox has been dry for `linger` it takes the
//! wake-up lock (so writers start to NOTIFY), sweeps once more, and sleeps
//! until a NOTIFY or the safety poll. When the lock is taken, it naps and
//! tries again: briefly while writers hold it ([`WRITERS_NAP_MAX`]), longer
//! while another daemon sleeps holding it ([`ARM_RETRY`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::Dispatch as Settings;
use crate::db;
use crate::db::queue::{self, Arming, PendingEvent};
use crate::matcher::Matcher;
use crate::ops::Probe;

/// Deliveries written by one dispatch transaction, at most (about: one
/// event's fan-out is never split).
const MAX_DELIVERIES_PER_BATCH: usize = 10_000;

/// How often the outbox is polled while lingering.
const LINGER_POLL: Duration = Duration::from_millis(2);

/// Naps between tries at the wake-up lock, doubling from the first to the
/// last, while another daemon sleeps holding it: its wake-up NOTIFY reaches
/// this daemon too, so a long nap costs nothing.
const ARM_RETRY: (Duration, Duration) = (Duration::from_millis(5), Duration::from_millis(500));

/// The longest nap while writers hold the lock (they are still in their
/// transactions: usually a moment, longer while the server's disk stalls
/// their commits). Nobody NOTIFYs then, so an event committed during the
/// nap waits for its end: it stays short.
const WRITERS_NAP_MAX: Duration = Duration::from_millis(20);

pub struct Dispatcher {
    pub url: String,
    pub settings: Settings,
    /// Woken by the listener (NOTIFY, reconnects).
    pub wake: Arc<Notify>,
    /// Woken here when new deliveries exist.
    pub deliveries_ready: Arc<Notify>,
    /// Heartbeat and counters for operations.
    pub probe: Probe,
}

impl Dispatcher {
    /// Runs until `shutdown`; a lost connection is re-made.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = db::Backoff::new();
        while let Some(client) = db::connect_retrying(&self.url, "dispatcher", &shutdown).await {
            match self.serve(client, &mut backoff, &shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    db::warn_restart("dispatcher", &error);
                    self.probe.failed(&error);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn serve(
        &self,
        mut client: Client,
        backoff: &mut db::Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), tokio_postgres::Error> {
        let statements = queue::Statements::prepare(&client).await?;
        let mut matcher = Matcher::default();
        // Whether the outbox horizon may have room to move up.
        let mut behind = true;
        let mut last_work = Instant::now();
        let mut arm_retry = ARM_RETRY.0;
        loop {
            self.probe.beat();
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let dispatched = self
                .dispatch_batch(&mut client, &statements, &mut matcher, &mut behind)
                .await?;
            // The connection works again: a later loss starts from the
            // shortest wait.
            backoff.reset();
            self.probe.served();
            if dispatched > 0 {
                last_work = Instant::now();
                continue;
            }
            if last_work.elapsed() < self.settings.linger {
                tokio::select! {
                    _ = tokio::time::sleep(LINGER_POLL) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
            // Dry for a while: ask writers to notify, then sweep once more
            // for anything committed before they could see the request. The
            // sweep also steps the horizon, which notices a sequence that
            // went back.
            behind = true;
            let arming = queue::arm_wakeup(&client).await?;
            let armed = arming == Arming::Armed;
            let mut woken = true;
            if self
                .dispatch_batch(&mut client, &statements, &mut matcher, &mut behind)
                .await?
                == 0
            {
                let nap = if armed {
                    self.settings.poll_interval
                } else {
                    let longest = match arming {
                        Arming::Writers => WRITERS_NAP_MAX,
                        _ => self.settings.poll_interval,
                    };
                    let nap = arm_retry.min(longest);
                    arm_retry = (arm_retry * 2).min(ARM_RETRY.1);
                    nap
                };
                woken = tokio::select! {
                    _ = self.wake.notified() => true,
                    _ = tokio::time::sleep(nap) => armed,
                    _ = shutdown.cancelled() => true,
                };
            }
            if armed {
                queue::disarm_wakeup(&client).await?;
            }
            // Woken (or swept something): linger again. A nap without the
            // lock that ran out goes straight back to trying it.
            if woken {
                arm_retry = ARM_RETRY.0;
                last_work = Instant::now();
            }
        }
    }

    /// Dispatches one batch; returns how many events it took. While the
    /// outbox horizon is `behind`, the batch first moves it a step.
    async fn dispatch_batch(
        &self,
        client: &mut Client,
        statements: &queue::Statements,
        matcher: &mut Matcher,
        behind: &mut bool,
    ) -> Result<usize, tokio_postgres::Error> {
        let tx = client.transaction().await?;
        let stepped = *behind;
        if stepped {
            *behind = !statements.advance_horizon(&tx).await?;
        }
        let events = statements
            .claim_events(&tx, i64::from(self.settings.batch_size))
            .await?;
        if events.is_empty() {
            if stepped {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            return Ok(0);
        }
        *behind = true;
        // Read the version first: a change committed in between makes the
        // cache older than its tag, and the next batch reloads it.
        let version = queue::subscriber_version(&tx).await?;
        if version != matcher.version {
            *matcher = Matcher::new(version, queue::active_subscribers(&tx).await?);
        }

        let mut ids = Vec::new();
        let mut event_ids = Vec::new();
        let mut subscribers = Vec::new();
        let mut dispatched = Vec::with_capacity(events.len());
        for event in &events {
            // Wide fan-out: stop at a bounded transaction; the remaining
            // claimed events stay pending and go in the next batch.
            if ids.len() >= MAX_DELIVERIES_PER_BATCH {
                break;
            }
            for subscriber in matcher.recipients(&event.name, event.sender.as_deref()) {
                ids.push(delivery_id(event, subscriber));
                event_ids.push(event.id);
                subscribers.push(subscriber);
            }
            dispatched.push(event.id);
        }
        if !ids.is_empty() {
            statements
                .insert_deliveries(&tx, &ids, &event_ids, &subscribers)
                .await?;
        }
        statements.mark_dispatched(&tx, &dispatched).await?;
        tx.commit().await?;
        self.probe.metrics().dispatched(dispatched.len(), ids.len());
        tracing::debug!(
            events = dispatched.len(),
            deliveries = ids.len(),
            "dispatched"
        );
        if !ids.is_empty() {
            self.deliveries_ready.notify_one();
        }
        Ok(dispatched.len())
    }
}

/// The id of the delivery of `event` to `subscriber`: a hash of the pair,
/// as a version 8 UUID. The same pair always gets the same id, so even a
/// dispatch redone after a server crash sends the same `webhook-id` and
/// receivers can de-duplicate it. The event is its id and its capture
/// time: an id sequence set back (a copy that did not carry it over) hands
/// out ids again, and a new event must not look like a duplicate of an
/// old one. (Version and variant bits overwrite hash bits only.)
pub fn delivery_id(event: &PendingEvent, subscriber: Uuid) -> Uuid {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    hasher.update(event.id.to_be_bytes());
    hasher.update(event.created_us.unwrap_or(i64::MIN).to_be_bytes());
    hasher.update(subscriber.as_bytes());
    let hash = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hash[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_stable_and_distinct() {
        let event = |id: i64, created_us: i64| PendingEvent {
            id,
            created_us: Some(created_us),
            name: "a.b".into(),
            sender: None,
        };
        let id = |e: i64, s: Uuid| delivery_id(&event(e, 1_700_000_000_000_000), s);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(id(7, a), id(7, a));
        assert_ne!(id(7, a), id(7, b));
        assert_ne!(id(7, a), id(8, a));
        // The same id captured again later (a sequence set back).
        assert_ne!(delivery_id(&event(7, 1), a), delivery_id(&event(7, 2), a));
        // Events whose ids differ only where the version bits sit.
        let ids: std::collections::HashSet<Uuid> = (0..20_000).map(|e| id(e, a)).collect();
        assert_eq!(ids.len(), 20_000);
        assert_eq!(id(1, a).get_version_num(), 8);
    }
}
