//! `thorn run`: wires the tasks of the flow together and drains them on
//! shutdown.
//!
//! listener ──wake──▶ dispatcher ──ready──▶ sender ──done──▶ completer
//!
//! Each task owns a database connection and reconnects on its own. On
//! shutdown the dispatcher and sender stop taking work, requests in flight
//! get `delivery.shutdown_grace` to finish, and the completer writes every
//! outcome before `run` returns.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::{self, listen, migrate, subscribers};
use crate::deliver::worker::{InFlight, Worker};
use crate::deliver::{client, complete};
use crate::dispatch::Dispatcher;
use crate::ops::Ops;
use crate::retention;

/// How long shutdown waits for request tasks once they are cut off, for
/// the release of unfinished deliveries' leases, and for the API's open
/// connections. Each cut-off task ends
/// at once (its request, or its wait to hand an outcome to a completer
/// that cannot write, is dropped); the bound is there so that nothing they
/// might still wait on can hold the exit.
const CUT_OFF_WAIT: Duration = Duration::from_secs(5);

/// Connects (waiting for the database if needed), applies migrations and
/// writes the config's `[subscribers]`.
pub async fn prepare_database(
    config: &Config,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    let url = &config.database_url.0;
    db::parse_url(url).context("database_url is not a valid connection string")?;
    let Some(mut client) = db::connect_retrying(url, "startup", shutdown).await else {
        return Ok(false);
    };
    let applied = migrate::migrate(&mut client)
        .await
        .context("migrating the database")?;
    if !applied.is_empty() {
        tracing::info!(?applied, "database schema migrated");
    }
    // Said once at start: a role without SELECT on thorn.model skips it.
    match migrate::uncaptured_partitions(&client).await {
        Ok(tables) if !tables.is_empty() => tracing::warn!(
            tables = tables.join(", "),
            "partitions of annotated tables are not annotated: statements that name them \
             are not captured; annotate their parent again (thorn.webhook_model) so its tree follows"
        ),
        Ok(_) => {}
        Err(error) => tracing::debug!(error = %crate::db::Why(&error), "cannot check partition trees"),
    }
    subscribers::sync_from_config(&mut client, config)
        .await
        .map_err(ConfigRefused::from_store)?;
    Ok(true)
}

/// The start failed on the config: its `[subscribers]` entries were
/// refused by the database (`thorn run` exits 64 then, as for any bad
/// config, which systemd does not restart).
#[derive(Debug, thiserror::Error)]
#[error("the config's [subscribers]: {0}")]
pub struct ConfigRefused(subscribers::StoreError);

impl ConfigRefused {
    fn from_store(error: subscribers::StoreError) -> anyhow::Error {
        match error {
            subscribers::StoreError::Invalid(_) => ConfigRefused(error).into(),
            other => anyhow::Error::new(other)
                .context("writing the config's [subscribers] to the database"),
        }
    }
}

/// Runs the daemon until `shutdown` fires, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, shutdown, Ops::default()).await
}

/// [`run`], with systemd notifications, the health and metrics endpoint and
/// reloads as `ops` asks.
pub async fn run_with(config: Config, shutdown: CancellationToken, ops: Ops) -> anyhow::Result<()> {
    let listening = Arc::new(AtomicBool::new(false));
    let ops = ops.start(&config, listening.clone()).await?;
    ops.status("connecting to the database and applying migrations");
    if !prepare_database(&config, &shutdown).await? {
        ops.stopping("stopped before the database was reached");
        ops.finish().await;
        return Ok(());
    }
    ops.state.prepared.cancel();
    ops.status("starting the tasks");
    let url = config.database_url.0.clone();
    let http = client::Client::new(&config).context("building the HTTP client")?;

    let wake = Arc::new(Notify::new());
    let ready = Arc::new(Notify::new());
    let (done_tx, done_rx) = mpsc::channel(4 * config.delivery.concurrency);
    let requests = TaskTracker::new();
    let in_flight = Arc::new(InFlight::default());
    let abort = CancellationToken::new();
    // Stops claiming; separate from `shutdown` so tests and signals share it.
    let stop = shutdown.child_token();
    // Bound before any task starts, so a taken port fails the start cleanly.
    let api = match config.api.listen {
        Some(addr) => {
            let state = crate::api::Api::from_config(&config).context("starting the API")?;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("api.listen: binding {addr}"))?;
            tracing::info!(%addr, "subscriptions API listening");
            Some(tokio::spawn(crate::api::serve(
                listener,
                state,
                stop.clone(),
            )))
        }
        None => None,
    };

    let pruner = tokio::spawn(ops.watch(
        "pruner",
        retention::run(url.clone(), config.retention.clone(), stop.clone()),
    ));
    let listener = tokio::spawn(ops.watch(
        "listener",
        listen::run(
            url.clone(),
            vec![wake.clone(), ready.clone()],
            listening.clone(),
            stop.clone(),
        ),
    ));
    let dispatcher = tokio::spawn(
        ops.watch(
            "dispatcher",
            Dispatcher {
                url: url.clone(),
                settings: config.dispatch.clone(),
                wake,
                deliveries_ready: ready.clone(),
                probe: ops.probe("dispatcher"),
            }
            .run(stop.clone()),
        ),
    );
    let completer = tokio::spawn(ops.watch(
        "completer",
        complete::run(
            url.clone(),
            done_rx,
            ready.clone(),
            config.delivery.disable_after,
            ops.counters(),
        ),
    ));
    let sender = tokio::spawn(
        ops.watch(
            "sender",
            Worker {
                url,
                settings: config.delivery.clone(),
                client: http,
                ready,
                done: done_tx,
                tracker: requests.clone(),
                in_flight: in_flight.clone(),
                abort: abort.clone(),
                probe: ops.probe("sender"),
            }
            .run(stop.clone()),
        ),
    );
    tracing::info!("thorn is running");
    ops.ready_when_listening(&stop).await;

    stop.cancelled().await;
    ops.stopping("stopping: draining requests in flight");
    tracing::info!("shutting down: no new claims; waiting for requests in flight");
    // A task waits for its statement to end before it sees the stop: one
    // blocked on a lock (a migration elsewhere, a forgotten transaction)
    // would hold the shutdown up for as long. Bounded; what it was doing is
    // rolled back or left to its lease.
    // One grace for it all, from the stop: the tasks and the requests in
    // flight end within it (or are cut off), so that the whole shutdown
    // stays within systemd's TimeoutStopSec.
    let grace_end = tokio::time::Instant::now() + config.delivery.shutdown_grace;
    for (name, mut task) in [
        ("listener", listener),
        ("dispatcher", dispatcher),
        ("sender", sender),
        ("pruner", pruner),
    ] {
        if tokio::time::timeout_at(grace_end, &mut task).await.is_err() {
            tracing::warn!(
                task = name,
                "still waiting on the database at shutdown; stopping without it"
            );
            task.abort();
        }
    }
    // The API stops accepting at once but waits for its open connections,
    // and a client may keep one open (a request never finished): bounded.
    if let Some(mut api) = api {
        match tokio::time::timeout(CUT_OFF_WAIT, &mut api).await {
            Ok(Ok(Err(error))) => {
                tracing::error!(error = format!("{error:#}"), "the API server failed")
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("API connections still open at shutdown; closing them");
                api.abort();
            }
        }
    }
    requests.close();
    if tokio::time::timeout_at(grace_end, requests.wait())
        .await
        .is_err()
    {
        abort.cancel();
        if tokio::time::timeout(CUT_OFF_WAIT, requests.wait())
            .await
            .is_err()
        {
            tracing::warn!("requests cut off by shutdown did not end; not waiting for them");
        }
    }
    // Requests cut off by the grace's end, and deliveries that were still
    // waiting for their subscriber's requests.
    let unfinished = in_flight.deliveries();
    let releasing = release_unfinished(&config.database_url.0, &unfinished);
    if tokio::time::timeout(CUT_OFF_WAIT, releasing).await.is_err() {
        tracing::warn!(
            unfinished = unfinished.len(),
            "could not release unfinished deliveries in time; they are sent again when their leases expire"
        );
    }
    // The sender's channel end went with its task and the requests' with
    // theirs: the completer writes what is left and returns.
    let _ = tokio::time::timeout(Duration::from_secs(10), completer).await;
    tracing::info!("stopped");
    ops.finish().await;
    Ok(())
}

/// Hands the leases of deliveries left unsent by shutdown (cut off, or
/// still waiting) back at once, so another daemon sends them now instead of
/// after the lease.
async fn release_unfinished(
    url: &str,
    unfinished: &[(uuid::Uuid, std::time::SystemTime, Duration)],
) {
    if unfinished.is_empty() {
        return;
    }
    let released = match db::connect(url).await {
        Ok(client) => db::queue::release_after(&client, unfinished).await,
        Err(error) => Err(error),
    };
    match released {
        Ok(n) => tracing::warn!(
            released = n,
            "deliveries unfinished at shutdown were released"
        ),
        Err(error) => tracing::warn!(
            error = %crate::db::Why(&error),
            unfinished = unfinished.len(),
            "could not release unfinished deliveries; they are sent again when their leases expire"
        ),
    }
}
