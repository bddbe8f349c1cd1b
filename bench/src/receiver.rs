//! The receiver: an HTTP server on 127.0.0.1 that answers 200 at once,
//! records when each delivery arrived, and verifies the signatures of a
//! sample of them with its own HMAC code (not thorn's), so a fast but wrong
//! sender cannot pass.
//!
//! Paths: `/s/<n>` is subscriber n; `/hang` never answers within any sane
//! timeout (the sender's timeout ends it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, Uri};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The hmac_secret of every benchmark subscriber.
pub const SECRET: &str = "bench-secret-3f9c2a7e1b";
/// One request in this many has both signatures checked.
const VERIFY_EVERY: u64 = 16;
/// A hanging request gives up after this (the daemon's timeout is shorter).
const HANG: Duration = Duration::from_secs(120);

/// One delivery as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Instant,
    /// `webhook-id` as a number.
    pub delivery: u128,
    /// The `n` of `/s/<n>`.
    pub subscriber: u32,
    /// The row id, from the payload's `ref`.
    pub event: i64,
}

#[derive(Default)]
pub struct Recorder {
    arrivals: Mutex<Vec<Arrival>>,
    seen: AtomicU64,
    hung: AtomicU64,
    verified: AtomicU64,
    bad: AtomicU64,
}

/// What the receiver saw since the last [`Recorder::take`].
#[derive(Debug, Default)]
pub struct Seen {
    pub arrivals: Vec<Arrival>,
    pub hung: u64,
    pub verified: u64,
    pub bad: u64,
}

impl Recorder {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arrival>> {
        self.arrivals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Requests answered 200 since the last take.
    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    /// Everything recorded so far; starts a fresh record.
    pub fn take(&self) -> Seen {
        let arrivals = std::mem::take(&mut *self.lock());
        self.seen.store(0, Ordering::Relaxed);
        Seen {
            arrivals,
            hung: self.hung.swap(0, Ordering::Relaxed),
            verified: self.verified.swap(0, Ordering::Relaxed),
            bad: self.bad.swap(0, Ordering::Relaxed),
        }
    }

    /// Waits until `count() >= n` or `limit` passes; true when reached.
    pub async fn wait_for(&self, n: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.count() < n {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    fn record(&self, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> StatusCode {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
        };
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(VERIFY_EVERY) {
            if verify(headers, body) {
                self.verified.fetch_add(1, Ordering::Relaxed);
            } else {
                self.bad.fetch_add(1, Ordering::Relaxed);
            }
        }
        let arrival = Arrival {
            at: Instant::now(),
            delivery: parse_uuid(header("webhook-id")).unwrap_or(0),
            subscriber: uri
                .path()
                .strip_prefix("/s/")
                .and_then(|s| s.parse().ok())
                .unwrap_or(u32::MAX),
            event: payload_ref(body).unwrap_or(-1),
        };
        self.lock().push(arrival);
        StatusCode::OK
    }
}

/// Checks Hook-HMAC and webhook-signature against [`SECRET`] (sha256).
pub fn verify(headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let hook = b64.encode(hmac_sha256(&[body]));
    let id = header("webhook-id");
    let ts = header("webhook-timestamp");
    let standard = format!(
        "v1,{}",
        b64.encode(hmac_sha256(&[
            id.as_bytes(),
            b".",
            ts.as_bytes(),
            b".",
            body
        ]))
    );
    header("Hook-HMAC") == hook
        && header("webhook-signature")
            .split(' ')
            .any(|s| s == standard)
        && header("Hook-Delivery") == id
}

pub fn hmac_sha256(parts: &[&[u8]]) -> Vec<u8> {
    // new_from_slice accepts keys of any length for HMAC.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()) else {
        return Vec::new();
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().to_vec()
}

fn parse_uuid(s: &str) -> Option<u128> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32).then(|| u128::from_str_radix(&hex, 16).ok())?
}

/// The row id of the payload: the bench annotates with `reference => '{id}'`,
/// so the envelope starts `{"event": "…", "ref": "123", …`.
fn payload_ref(body: &[u8]) -> Option<i64> {
    let key = b"\"ref\":";
    let at = body.windows(key.len()).position(|w| w == key)? + key.len();
    let rest = &body[at..];
    let digits: Vec<u8> = rest
        .iter()
        .skip_while(|b| **b == b' ' || **b == b'"')
        .take_while(|b| b.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Starts the receiver on 127.0.0.1 (a free port) in the background.
pub async fn start() -> anyhow::Result<(SocketAddr, Arc<Recorder>)> {
    let recorder = Arc::new(Recorder::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the receiver")?;
    let addr = listener.local_addr()?;
    let state = recorder.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap, body: Bytes| {
        let state = state.clone();
        async move {
            if uri.path() == "/hang" {
                state.hung.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(HANG).await;
                return StatusCode::OK;
            }
            state.record(&uri, &headers, &body)
        }
    });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            eprintln!("receiver stopped: {error}");
        }
    });
    Ok((addr, recorder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ref_and_uuid() {
        assert_eq!(
            payload_ref(br#"{"event": "article.created", "ref": "42", "sender": null}"#),
            Some(42)
        );
        assert_eq!(payload_ref(br#"{"event": "x", "ref": null}"#), None);
        assert_eq!(
            parse_uuid("01a21e54-0000-7000-8000-000000000001"),
            Some(0x01a21e54_0000_7000_8000_000000000001)
        );
    }
}
