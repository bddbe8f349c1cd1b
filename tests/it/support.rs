//! Test support: a fresh database per test, a real HTTP receiver on
//! 127.0.0.1 whose answers the test scripts, the daemon run in-process, and
//! an independent signature check (Python's hmac, as Thorn's `sign`).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use thorn::config::Config;

pub fn base_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

fn with_database(url: &str, name: &str) -> String {
    let mut u = url::Url::parse(url).expect("DATABASE_URL must be a postgres:// URL");
    u.set_path(&format!("/{name}"));
    u.to_string()
}

pub async fn connect(url: &str) -> Client {
    thorn::db::connect(url)
        .await
        .expect("connect to the test database")
}

/// A database created for one test, migrated, and dropped afterwards.
pub struct TestDb {
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let name = format!("thorn_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&base_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let url = with_database(&base_url(), &name);
        let mut client = connect(&url).await;
        thorn::db::migrate::migrate(&mut client)
            .await
            .expect("migrate");
        TestDb { url, name }
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A config for this database that may deliver to loopback, with fast
    /// retries and polls.
    pub fn config(&self) -> Config {
        let text = format!(
            r#"
            database_url = "{}"
            [dispatch]
            poll_interval = "1s"
            [delivery]
            timeout = "2s"
            connect_timeout = "1s"
            lease = "5s"
            retry_schedule = ["100ms", "200ms"]
            shutdown_grace = "2s"
            [security]
            allow_networks = ["127.0.0.0/8"]
            "#,
            self.url
        );
        Config::load(Some(&text), &HashMap::new()).expect("test config")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async: use a private runtime on its own thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let admin = thorn::db::connect(&base_url()).await.ok()?;
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("a JSON body")
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).expect("UTF-8 body")
    }
}

type Script = Arc<Mutex<VecDeque<u16>>>;

/// An HTTP server on 127.0.0.1:0 that records every request and answers
/// with the scripted statuses, then 200.
pub struct Receiver {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    script: Script,
    shutdown: CancellationToken,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let script: Script = Arc::default();
        let answers = script.clone();
        let app = Router::new().fallback(
            move |uri: axum::http::Uri, headers: HeaderMap, body: Bytes| {
                let tx = tx.clone();
                let answers = answers.clone();
                async move {
                    let _ = tx.send(Received {
                        path: uri
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default(),
                        headers,
                        body,
                        at: Instant::now(),
                    });
                    let code = answers.lock().expect("script").pop_front().unwrap_or(200);
                    StatusCode::from_u16(code).expect("status")
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Receiver {
            addr,
            rx,
            script,
            shutdown,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Answer the next requests with these statuses.
    pub fn respond_with(&self, statuses: &[u16]) {
        self.script.lock().expect("script").extend(statuses);
    }

    pub async fn next(&mut self, within: Duration) -> Option<Received> {
        tokio::time::timeout(within, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for exactly `n` requests (panics after `within`), then checks
    /// that no extra one arrives during `quiet`.
    pub async fn expect(&mut self, n: usize, within: Duration, quiet: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(r) => got.push(r),
                None => panic!(
                    "expected {n} requests, got {} within {within:?}: {got:#?}",
                    got.len()
                ),
            }
        }
        if let Some(extra) = self.next(quiet).await {
            panic!("expected {n} requests, got one more: {extra:#?}");
        }
        got
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The daemon, running in this process until dropped or stopped.
pub struct Daemon {
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Daemon {
    pub fn start(config: Config) -> Daemon {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(thorn::daemon::run(config, shutdown.clone()));
        Daemon {
            shutdown,
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            handle
                .await
                .expect("daemon task")
                .expect("daemon exits cleanly");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Adds a subscriber row; returns its id.
pub async fn subscribe(
    db: &Client,
    event: &str,
    url: &str,
    owner: Option<&str>,
    secret: &str,
) -> uuid::Uuid {
    db.query_one(
        "INSERT INTO thorn.subscriber (event, url, owner, hmac_secret) VALUES ($1, $2, $3, $4) RETURNING id",
        &[&event, &url, &owner, &secret],
    )
    .await
    .expect("insert subscriber")
    .get(0)
}

/// Thorn's `thorn.utils.hmac.sign`, computed by Python's hmac module: an
/// implementation independent of the one under test. One process for many.
pub fn python_sign(items: &[(&str, &str, &[u8])]) -> Vec<String> {
    use base64::Engine;
    let input: Vec<serde_json::Value> = items
        .iter()
        .map(|(digest, secret, body)| {
            serde_json::json!([
                digest,
                secret,
                base64::engine::general_purpose::STANDARD.encode(body)
            ])
        })
        .collect();
    let script = r#"
import base64, hashlib, hmac, json, sys
def sign(digest, key, msg):
    return base64.b64encode(hmac.new(key.encode(), msg, getattr(hashlib, digest)).digest()).decode()
print(json.dumps([sign(d, k, base64.b64decode(b)) for d, k, b in json.load(sys.stdin)]))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3 is needed for the independent signature check");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(serde_json::to_string(&input).expect("json").as_bytes())
            .expect("write to python");
    }
    let out = child.wait_with_output().expect("python output");
    assert!(out.status.success(), "python failed");
    serde_json::from_slice(&out.stdout).expect("python JSON")
}

pub const WAIT: Duration = Duration::from_secs(15);
pub const QUIET: Duration = Duration::from_millis(300);

/// The HS256 key tests sign API tokens with.
pub const JWT_SECRET: &str = "test-only-api-secret-0123456789";

/// `t.config()` with the API's keys: HS256 and the test RSA public key.
pub fn api_config(t: &TestDb) -> Config {
    let mut config = t.config();
    config.api.jwt_secret = Some(thorn::config::Redacted(JWT_SECRET.into()));
    config.api.jwt_public_key_file =
        Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/keys/rsa_public.pem"));
    config
}

/// An HS256 token for `sub` with extra claims merged in.
pub fn token_with(sub: &str, extra: serde_json::Value) -> String {
    let mut claims = serde_json::json!({ "sub": sub, "exp": unix_now() + 600 });
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token")
}

pub fn token(sub: &str) -> String {
    token_with(sub, serde_json::json!({}))
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// The REST API served on 127.0.0.1:0 until dropped.
pub struct ApiServer {
    pub base: String,
    shutdown: CancellationToken,
}

impl ApiServer {
    pub async fn start(config: &Config) -> ApiServer {
        let api = thorn::api::Api::from_config(config).expect("api state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let shutdown = CancellationToken::new();
        tokio::spawn(thorn::api::serve(listener, api, shutdown.clone()));
        ApiServer { base, shutdown }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A free port on 127.0.0.1 (bound, then released) for servers that take
/// an address rather than a listener.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Waits until something accepts connections on `port` (panics after 20 s).
pub async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the `thorn` binary against `database_url` (no config file); returns
/// (exit code, stdout, stderr).
pub async fn thorn_cli(database_url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_thorn"))
        .args(args)
        .env("THORN_CONFIG", "/dev/null")
        .env("THORN_DATABASE_URL", database_url)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run thorn");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Thorn's `compat_sign`, computed by Python's hashlib/hmac following
/// itsdangerous' key derivation: independent of the implementation under
/// test.
pub fn python_compat_sign(digest: &str, secret: &str, body: &[u8]) -> String {
    use base64::Engine;
    let script = r#"
import base64, hashlib, hmac, sys
digest, key, msg = sys.argv[1], sys.argv[2].encode(), base64.b64decode(sys.argv[3])
h = getattr(hashlib, digest)
derived = h(b"itsdangerous.Signer" + b"signer" + key).digest()
print(base64.urlsafe_b64encode(hmac.new(derived, msg, h).digest()).rstrip(b"=").decode())
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            digest,
            secret,
            &base64::engine::general_purpose::STANDARD.encode(body),
        ])
        .output()
        .expect("python3 is needed for the independent signature check");
    assert!(out.status.success(), "python failed");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}
