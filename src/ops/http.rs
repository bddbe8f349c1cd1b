//! The operations endpoint on `metrics.listen`: `/healthz` (the watchdog's
//! verdict), `/readyz` (database answering and LISTEN active) and
//! `/metrics` (OpenMetrics text). Plain HTTP on an address the operator
//! chooses; it exposes counts, never payloads or secrets.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::extract::State as Extract;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::State;

/// The running endpoint; [`Endpoint::rebind`] moves it on reload.
pub struct Endpoint {
    state: Arc<State>,
    addr: Option<SocketAddr>,
    server: Option<CancellationToken>,
    finished: CancellationToken,
}

impl Endpoint {
    /// Serves on `listener`, else binds `configured`, else stays off.
    pub async fn start(
        listener: Option<TcpListener>,
        configured: Option<SocketAddr>,
        state: Arc<State>,
        finished: &CancellationToken,
    ) -> anyhow::Result<Endpoint> {
        let mut endpoint = Endpoint {
            state,
            addr: None,
            server: None,
            finished: finished.clone(),
        };
        let listener = match (listener, configured) {
            (Some(l), _) => Some(l),
            (None, Some(addr)) => Some(bind(addr).await?),
            (None, None) => None,
        };
        if let Some(listener) = listener {
            endpoint.serve(listener)?;
        }
        Ok(endpoint)
    }

    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Moves the endpoint to `addr` (or switches it off). On a bind error
    /// the old endpoint keeps running.
    pub async fn rebind(&mut self, addr: Option<SocketAddr>) -> anyhow::Result<()> {
        let listener = match addr {
            Some(a) => Some(bind(a).await?),
            None => None,
        };
        if let Some(old) = self.server.take() {
            old.cancel();
        }
        self.addr = None;
        if let Some(listener) = listener {
            self.serve(listener)?;
        }
        Ok(())
    }

    fn serve(&mut self, listener: TcpListener) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let stop = self.finished.child_token();
        let app = router(self.state.clone());
        let until = stop.clone();
        tokio::spawn(crate::serve::serve(listener, app, until));
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
        self.addr = Some(addr);
        self.server = Some(stop);
        Ok(())
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics.listen: cannot bind {addr}"))
}

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(Extract(state): Extract<Arc<State>>) -> Response {
    let health = state.health();
    if health.healthy {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let mut text = health.problems.join("\n");
        text.push('\n');
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    }
}

async fn readyz(Extract(state): Extract<Arc<State>>) -> Response {
    let health = state.health();
    if health.ready {
        return (StatusCode::OK, "ready\n").into_response();
    }
    let mut reasons = Vec::new();
    if !state.ready.load(std::sync::atomic::Ordering::SeqCst) {
        reasons.push("starting");
    }
    if state.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        reasons.push("stopping");
    }
    if !state.database_up() {
        reasons.push("database unreachable");
    }
    if !state.listening() {
        reasons.push("not listening for wake-ups");
    }
    reasons.extend(health.refused.iter().map(String::as_str));
    let mut text = reasons.join("\n");
    text.push('\n');
    (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
}

async fn metrics(Extract(state): Extract<Arc<State>>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
