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

use anyhow::Context;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::db::{self, listen, migrate};
use crate::deliver::{client, complete, worker::Worker};
use crate::dispatch::Dispatcher;

/// Connects (waiting for the database if needed) and applies migrations.
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
    Ok(true)
}

/// Runs the daemon until `shutdown` fires, then drains.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    if !prepare_database(&config, &shutdown).await? {
        return Ok(());
    }
    let url = config.database_url.0.clone();
    let http = client::Client::new(&config).context("building the HTTP client")?;

    let wake = Arc::new(Notify::new());
    let ready = Arc::new(Notify::new());
    let listening = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel(4 * config.delivery.concurrency);
    let requests = TaskTracker::new();
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

    let listener = tokio::spawn(listen::run(
        url.clone(),
        wake.clone(),
        listening.clone(),
        stop.clone(),
    ));
    let dispatcher = tokio::spawn(
        Dispatcher {
            url: url.clone(),
            settings: config.dispatch.clone(),
            wake,
            deliveries_ready: ready.clone(),
        }
        .run(stop.clone()),
    );
    let completer = tokio::spawn(complete::run(url.clone(), done_rx, ready.clone()));
    let sender = tokio::spawn(
        Worker {
            url,
            settings: config.delivery.clone(),
            client: http,
            ready,
            done: done_tx,
            tracker: requests.clone(),
        }
        .run(stop.clone()),
    );
    tracing::info!("thorn is running");

    stop.cancelled().await;
    tracing::info!("shutting down: no new claims; waiting for requests in flight");
    let _ = tokio::join!(listener, dispatcher, sender);
    if let Some(api) = api {
        if let Ok(Err(error)) = api.await {
            tracing::error!(error = format!("{error:#}"), "the API server failed");
        }
    }
    requests.close();
    if tokio::time::timeout(config.delivery.shutdown_grace, requests.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "requests still in flight after the shutdown grace period; their leases will expire and they will be sent again"
        );
    }
    // The sender's channel end is gone with its task; once the in-flight
    // tasks are done too, the completer drains and returns.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), completer).await;
    tracing::info!("stopped");
    Ok(())
}
