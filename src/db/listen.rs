//! The wake-up listener: one connection that LISTENs on channel `thorn` and
//! turns notifications into [`Notify`] wake-ups for the dispatcher (new
//! events) and the sender (deliveries an operator re-queued).
//!
//! NOTIFY is only a hint; the outbox is the truth. So after every
//! (re)connect the listener wakes the dispatcher once, which sweeps the
//! outbox for anything committed while nobody listened.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::Backoff;

pub const CHANNEL: &str = "thorn";

/// Runs until `shutdown`; reconnects with backoff whenever the connection
/// drops. Every notification and every (re)connect wakes all of `wake`;
/// `listening` is set while LISTEN is active (for readiness).
pub async fn run(
    url: String,
    wake: Vec<Arc<Notify>>,
    listening: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) {
    use std::sync::atomic::Ordering;
    let mut backoff = Backoff::new();
    while !shutdown.is_cancelled() {
        match super::connect_raw(&url).await {
            Ok((client, connection)) => {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                // The connection must be polled for LISTEN to complete, so
                // drive it before issuing the command.
                let driver = super::drive(connection, Some(tx));
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        backoff.reset();
                        listening.store(true, Ordering::SeqCst);
                        tracing::debug!("listening for wake-ups");
                        let wake_all = || wake.iter().for_each(|w| w.notify_one());
                        wake_all();
                        loop {
                            tokio::select! {
                                got = rx.recv() => match got {
                                    Some(()) => wake_all(),
                                    None => {
                                        tracing::warn!("listener connection lost; reconnecting");
                                        break;
                                    }
                                },
                                _ = shutdown.cancelled() => break,
                            }
                        }
                        listening.store(false, Ordering::SeqCst);
                    }
                    Err(error) => tracing::warn!(error = %crate::db::Why(&error), "LISTEN failed"),
                }
                driver.abort();
            }
            Err(error) => {
                tracing::warn!(error = %crate::db::Why(&error), "listener cannot reach the database; retrying")
            }
        }
        if shutdown.is_cancelled() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay()) => {}
            _ = shutdown.cancelled() => break,
        }
    }
}
