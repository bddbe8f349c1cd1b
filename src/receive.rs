//! `thorn receive`: a webhook receiver for consumers and demos. It verifies
//! `Hook-HMAC` and `webhook-signature` (with a timestamp tolerance) and
//! prints each delivery; a bad signature is answered 401 and printed too.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::sign::{self, Digest, Signer};

/// Deliveries older or newer than this are refused (replay protection).
pub const TOLERANCE: Duration = Duration::from_secs(5 * 60);

#[derive(Clone)]
pub struct Receiver {
    pub secret: String,
    pub digest: Digest,
    /// The subscriber's `hmac_signer` (Hook-HMAC scheme).
    pub signer: Signer,
}

/// What a receiver concluded about one request.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub hook_hmac: bool,
    pub webhook_signature: bool,
    pub fresh: bool,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.hook_hmac && self.webhook_signature && self.fresh
    }
}

impl Receiver {
    pub fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Verdict {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let timestamp: i64 = header("webhook-timestamp").parse().unwrap_or(0);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let tolerance = i64::try_from(TOLERANCE.as_secs()).unwrap_or(300);
        Verdict {
            hook_hmac: self
                .signer
                .verify(self.digest, &self.secret, body, header("hook-hmac")),
            webhook_signature: sign::verify_webhook_signature(
                &self.secret,
                header("webhook-id"),
                timestamp,
                body,
                header("webhook-signature"),
            ),
            fresh: (now - timestamp).abs() <= tolerance,
        }
    }

    async fn handle(self, headers: HeaderMap, body: Bytes) -> StatusCode {
        let verdict = self.verify(&headers, &body);
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
        };
        let mark = |ok: bool| if ok { "ok" } else { "BAD" };
        println!(
            "{} {} delivery={} Hook-HMAC={} webhook-signature={} timestamp={}",
            if verdict.ok() { "✔" } else { "✘" },
            header("hook-event"),
            header("hook-delivery"),
            mark(verdict.hook_hmac),
            mark(verdict.webhook_signature),
            mark(verdict.fresh),
        );
        println!("  {}", String::from_utf8_lossy(&body));
        if verdict.ok() {
            StatusCode::OK
        } else {
            StatusCode::UNAUTHORIZED
        }
    }
}

/// Serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    receiver: Receiver,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = Router::new().fallback(post(move |headers: HeaderMap, body: Bytes| {
        receiver.clone().handle(headers, body)
    }));
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!(
        "thorn receive: listening on http://{}",
        listener.local_addr()?
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
