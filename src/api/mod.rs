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
use deadpool_postgres::{
    Connect, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, TimeoutType,
};
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::deliver::client::Client as HttpClient;
use crate::deliver::guard::Guard;
use auth::Auth;
use errors::ApiError;

/// How long a subscribe waits for DNS before accepting the URL unchecked
/// (the guard checks it again on every delivery).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The API sessions' `lock_timeout` and `statement_timeout`: a request
/// holds one of a few connections, so none may hold it for long.
const LOCK_TIMEOUT: &str = "2s";
const STATEMENT_TIMEOUT: &str = "10s";

/// Database connections the API's requests share. A request holds one for
/// its statements, so one kept waiting (a row locked elsewhere, a slow
/// server) holds up only itself; requests beyond this many wait for one.
const POOL_SIZE: usize = 4;

/// How long a request waits for a free connection (503 after that), and
/// for a new one to connect.
const POOL_WAIT: Duration = Duration::from_secs(2);
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Opens the pool's connections: driven as the daemon's are (server
/// warnings logged at their level), with the API's timeouts set by
/// statements, which a connection pooler passes on (startup options it may
/// refuse).
struct Session(crate::db::tls::Tls);

impl Connect for Session {
    fn connect(
        &self,
        config: &tokio_postgres::Config,
    ) -> BoxFuture<
        '_,
        Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error>,
    > {
        let (config, tls) = (config.clone(), self.0.clone());
        Box::pin(async move {
            let (client, connection) = config.connect(tls).await?;
            let driver = crate::db::drive(connection, None);
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '{LOCK_TIMEOUT}'; SET statement_timeout = '{STATEMENT_TIMEOUT}'"
                ))
                .await?;
            Ok((client, driver))
        })
    }
}

/// What the handlers share.
pub struct Api {
    auth: Auth,
    /// Connected on demand; a closed connection is replaced.
    pool: Pool,
    http: HttpClient,
    guard: Guard,
    public_url: Option<String>,
}

impl Api {
    pub fn from_config(config: &Config) -> anyhow::Result<Api> {
        let target = crate::db::parse_url(&config.database_url.0)?;
        let manager = Manager::from_connect(
            target.config,
            Session(target.tls),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_WAIT))
            .runtime(Runtime::Tokio1)
            .build()?;
        Ok(Api {
            auth: Auth::from_config(&config.api)?,
            pool,
            http: HttpClient::new(config)?,
            guard: Guard::new(config.security.allowed.clone()),
            public_url: config.api.public_url.clone(),
        })
    }

    /// A connection of the pool, for one request: `&**db` is the client.
    async fn db(&self) -> Result<Object, ApiError> {
        self.pool.get().await.map_err(|error| match error {
            PoolError::Backend(error) => ApiError::from(error),
            PoolError::Timeout(TimeoutType::Wait) => {
                ApiError::unavailable("every database connection of the API is busy; try again")
            }
            PoolError::Timeout(_) => {
                ApiError::unavailable("the database cannot be reached; try again")
            }
            other => ApiError::internal(&other),
        })
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
    crate::serve::serve(listener, router(Arc::new(api)), shutdown).await;
    Ok(())
}
