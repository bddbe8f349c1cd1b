//! Serving a router on a listener, bounded so that clients cannot hold the
//! daemon's resources: the REST API faces whoever can reach it, and it
//! runs in the process that delivers, so connections that run it out of
//! file descriptors would stop deliveries and database reconnects too.
//! (`axum::serve` sets no timer, so it closes no idle or slow connection.)
//!
//! - A connection must send a request's headers within
//!   [`HEADER_TIMEOUT`], also between requests on a kept-alive one.
//! - A request must be answered within [`REQUEST_TIMEOUT`] (a slow body
//!   included), else it gets a 408 and the connection is closed.
//! - A client must take what is written to it: a write that cannot go on
//!   for [`WRITE_TIMEOUT`] (requests sent, answers never read) closes it.
//! - At most [`MAX_CONNECTIONS`] at a time: more wait in the listen
//!   backlog until one ends.
//!
//! At shutdown, requests in flight are finished for up to
//! [`SHUTDOWN_GRACE`]; connections still open then are closed.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longer than the API's own waits (DNS, a pool connection, a statement).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Well below the 1024 descriptors a process gets by default.
pub const MAX_CONNECTIONS: usize = 256;
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let app = app.layer(axum::middleware::from_fn(deadline));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of descriptors, or the peer left: neither ends
                    // the server, and retrying at once would spin.
                    tracing::warn!(%error, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(WRITE_TIMEOUT));
        let io = TokioIo::new(Box::pin(stream));
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(io, service));
        connections.spawn(async move {
            // A client that left or timed out is its own business.
            let _ = connection.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still running at shutdown were cut off");
    }
    connections.abort_all();
}

/// Answers 408 to a request that is not answered in time (a body sent
/// slowly, most likely) and closes its connection.
async fn deadline(request: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_TIMEOUT, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let mut response = (
                StatusCode::REQUEST_TIMEOUT,
                axum::Json(serde_json::json!({
                    "error": "timeout",
                    "message": "the request was not complete in time",
                    "fields": {},
                })),
            )
                .into_response();
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
    }
}
