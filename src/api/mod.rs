//! The subscriptions REST API (Thorn's `/hooks/` views), served on
//! `api.listen` inside `thorn run`, or by [`serve`] on any listener (tests
//! bind 127.0.0.1:0).
//!
//! It owns HTTP concerns only: tokens ([`auth`]), routes ([`hooks`]) and the
//! error shape ([`errors`]). Rows are read and written by
//! `db::subscribers`, which `thorn subscriber` shares. It never signs or
//! delivers anything.

pub mod auth;
pub mod errors;
pub mod hooks;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::client::Client as HttpClient;
use crate::deliver::guard::Guard;
use auth::Auth;
use errors::ApiError;

/// How long a subscribe waits for DNS before accepting the URL unchecked
/// (the guard checks it again on every delivery).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The API session's `lock_timeout` and `statement_timeout`: its requests
/// share one connection, so none may hold it for long.
const LOCK_TIMEOUT: &str = "2s";
const STATEMENT_TIMEOUT: &str = "10s";

/// What the handlers share.
pub struct Api {
    auth: Auth,
    url: String,
    /// One connection, shared: tokio-postgres pipelines concurrent queries,
    /// and every API operation is a single statement. Replaced when closed.
    /// A statement waits at most [`LOCK_TIMEOUT`] for a row lock (a 503
    /// then), so a row locked elsewhere holds the others up that long at
    /// most.
    client: Mutex<Option<Arc<Client>>>,
    http: HttpClient,
    guard: Guard,
    public_url: Option<String>,
}

impl Api {
    pub fn from_config(config: &Config) -> anyhow::Result<Api> {
        Ok(Api {
            auth: Auth::from_config(&config.api)?,
            url: config.database_url.0.clone(),
            client: Mutex::new(None),
            http: HttpClient::new(config)?,
            guard: Guard::new(config.security.allowed.clone()),
            public_url: config.api.public_url.clone(),
        })
    }

    /// The shared connection, (re)connected when needed.
    async fn db(&self) -> Result<Arc<Client>, ApiError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(client.clone());
        }
        let client = crate::db::connect(&self.url).await?;
        client
            .batch_execute(&format!(
                "SET lock_timeout = '{LOCK_TIMEOUT}'; SET statement_timeout = '{STATEMENT_TIMEOUT}'"
            ))
            .await?;
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// The delivery client's URL rules (scheme, port, literal addresses),
    /// then every address the host resolves to must pass the guard. A name
    /// that does not resolve now is accepted: DNS may change, and every
    /// delivery checks the addresses again.
    async fn check_url(&self, raw: &str) -> Result<(), String> {
        let url = self.http.check_url(raw)?;
        let Some(url::Host::Domain(host)) = url.host() else {
            return Ok(()); // literal addresses were checked above
        };
        let port = url.port_or_known_default().unwrap_or(443);
        let lookup = tokio::net::lookup_host((host, port));
        let Ok(Ok(addrs)) = tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await else {
            return Ok(());
        };
        let refused: Vec<IpAddr> = addrs
            .map(|a| a.ip())
            .filter(|ip| !self.guard.permits(*ip))
            .collect();
        match refused.first() {
            None => Ok(()),
            Some(ip) => Err(format!(
                "{host} resolves to {ip}, which is not a global address: deliveries may not go there (security.allow_networks)"
            )),
        }
    }
}

/// The routes, with and without Thorn's trailing slash.
pub fn router(api: Arc<Api>) -> Router {
    let collection = get(hooks::list).post(hooks::create);
    let item = get(hooks::show)
        .put(hooks::replace)
        .patch(hooks::patch)
        .delete(hooks::remove);
    Router::new()
        .route("/hooks/", collection.clone())
        .route("/hooks", collection)
        .route("/hooks/{id}/", item.clone())
        .route("/hooks/{id}", item)
        .fallback(|| async { ApiError::no_route() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .with_state(api)
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    api: Api,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let app = router(Arc::new(api));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}
