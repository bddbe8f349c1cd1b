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
        let db = TestDb::empty().await;
        let mut client = connect(&db.url).await;
        thorn::db::migrate::migrate(&mut client)
            .await
            .expect("migrate");
        db
    }

    pub async fn client(&self) -> Client {
        connect(&self.url).await
    }

    /// A config for this database that may deliver to loopback, with fast
    /// retries and polls.
    pub fn config(&self) -> Config {
        Config::load(Some(&self.config_text()), &HashMap::new()).expect("test config")
    }

    /// The TOML of [`TestDb::config`], for a daemon run as a process.
    pub fn config_text(&self) -> String {
        format!(
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
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        clean_up(
            base_url(),
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs `sql` on `url` from a `Drop`, which runs outside async: on a
/// private runtime on its own thread. Failures are ignored.
fn clean_up(url: String, sql: String) {
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let db = thorn::db::connect(&url).await.ok()?;
            db.batch_execute(&sql).await.ok()
        })
    })
    .join();
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

/// How the receiver answers one request.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub status: u16,
    /// Wait this long before answering (a slow or hanging endpoint).
    pub delay: Duration,
    pub retry_after: Option<&'static str>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            ..Reply::default()
        }
    }
}

#[derive(Default)]
struct Script {
    queue: VecDeque<Reply>,
    /// The answer once the queue is empty.
    otherwise: Option<Reply>,
    in_flight: usize,
    max_in_flight: usize,
}

struct Leaving(Arc<Mutex<Script>>);

impl Drop for Leaving {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0.lock() {
            s.in_flight -= 1;
        }
    }
}

/// An HTTP server on 127.0.0.1:0 that records every request and answers
/// with the scripted replies, then 200 (or the scripted default).
pub struct Receiver {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    script: Arc<Mutex<Script>>,
    shutdown: CancellationToken,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let script: Arc<Mutex<Script>> = Arc::default();
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
                    let reply = {
                        let mut s = answers.lock().expect("script");
                        s.in_flight += 1;
                        s.max_in_flight = s.max_in_flight.max(s.in_flight);
                        let fallback = s.otherwise.clone().unwrap_or(Reply::status(200));
                        s.queue.pop_front().unwrap_or(fallback)
                    };
                    // Counts down even when the client hangs up mid-delay.
                    let _leaving = Leaving(answers.clone());
                    tokio::time::sleep(reply.delay).await;
                    let mut response = axum::response::Response::new(axum::body::Body::empty());
                    *response.status_mut() = StatusCode::from_u16(reply.status).expect("status");
                    if let Some(after) = reply.retry_after {
                        response
                            .headers_mut()
                            .insert("retry-after", after.parse().expect("header value"));
                    }
                    response
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
        let mut s = self.script.lock().expect("script");
        s.queue.extend(statuses.iter().map(|&c| Reply::status(c)));
    }

    /// Answer the next request like this.
    pub fn reply(&self, reply: Reply) {
        self.script.lock().expect("script").queue.push_back(reply);
    }

    /// Answer like this once the scripted replies are used up.
    pub fn otherwise(&self, reply: Reply) {
        self.script.lock().expect("script").otherwise = Some(reply);
    }

    /// The most requests that were ever being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.script.lock().expect("script").max_in_flight
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

/// Checks both signatures of a delivery signed with sha256 and `secret`:
/// Hook-HMAC against the independent Python signer, and Standard Webhooks.
pub fn assert_signed(secret: &str, r: &Received) {
    assert_eq!(
        r.header("hook-hmac"),
        python_sign(&[("sha256", secret, &r.body)])[0]
    );
    standard_verify(secret, r);
}

/// Verifies a delivery the Standard Webhooks way, with their own library.
pub fn standard_verify(secret: &str, r: &Received) {
    use base64::Engine;
    // A whsec_ secret whose rest is base64 is its key; any other secret, an
    // old whsec_ one without base64 included, is used as its bytes.
    let b64 = base64::engine::general_purpose::STANDARD;
    let verifier = match secret.strip_prefix("whsec_").map(|rest| b64.decode(rest)) {
        Some(Ok(_)) => standardwebhooks::Webhook::new(secret),
        _ => standardwebhooks::Webhook::from_bytes(secret.as_bytes().to_vec()),
    };
    let verified = verifier.expect("verifier").verify(&r.body, &r.headers);
    verified.unwrap_or_else(|e| panic!("webhook-signature to {} does not verify: {e}", r.path));
}

pub const WAIT: Duration = Duration::from_secs(15);

/// Polls `sql` (one boolean) until it is true; panics after WAIT.
pub async fn eventually(db: &Client, sql: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let done: bool = db.query_one(sql, &[]).await.expect(sql).get(0);
        if done {
            return;
        }
        assert!(Instant::now() < deadline, "never true: {sql}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
pub const QUIET: Duration = Duration::from_millis(300);

/// Waits until a daemon sleeps on the outbox: it holds the wake-up lock.
pub async fn wait_asleep(db: &Client) {
    let (class, object) = thorn::db::queue::WAKEUP_LOCK;
    let deadline = Instant::now() + WAIT;
    loop {
        let asleep: bool = db
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_locks
                                WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'
                                  AND classid = $1::int8::oid AND objid = $2::int8::oid
                                  AND objsubid = 2 AND database = (SELECT oid FROM pg_database
                                                                   WHERE datname = current_database()))",
                &[&i64::from(class), &i64::from(object)],
            )
            .await
            .expect("pg_locks")
            .get(0);
        if asleep {
            return;
        }
        assert!(Instant::now() < deadline, "the daemon never went to sleep");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `n` deliveries have ended (delivered or dead) and returns
/// (url, state, error_class, status_code, attempts, error, response,
/// duration_ms) for each, ordered by url.
pub async fn wait_ended(db: &Client, n: usize, within: Duration) -> Vec<Ended> {
    let deadline = Instant::now() + within;
    loop {
        let rows: Vec<Ended> = db
            .query(
                "SELECT s.url, d.state, d.error_class, d.status_code, d.attempts, d.error,
                        d.response, d.duration_ms
                 FROM thorn.delivery d JOIN thorn.subscriber s ON s.id = d.subscriber_id
                 ORDER BY s.url",
                &[],
            )
            .await
            .expect("deliveries")
            .iter()
            .map(|r| Ended {
                url: r.get(0),
                state: r.get(1),
                class: r.get(2),
                status: r.get(3),
                attempts: r.get(4),
                error: r.get(5),
                response: r.get(6),
                duration_ms: r.get(7),
            })
            .collect();
        if rows.len() >= n && rows.iter().all(|r| r.state != "pending") {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "deliveries did not end within {within:?}: {rows:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A delivery row that has ended.
#[derive(Debug, Clone)]
pub struct Ended {
    pub url: String,
    pub state: String,
    pub class: Option<String>,
    pub status: Option<i32>,
    pub attempts: i32,
    pub error: Option<String>,
    pub response: Option<String>,
    pub duration_ms: Option<i32>,
}

/// Reads one HTTP/1.1 request (head and a Content-Length body) from a
/// stream; returns the head and body (None on EOF or a head over 1 MiB).
pub async fn read_request<S>(stream: &mut S) -> Option<(String, Vec<u8>)>
where
    S: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 1 << 20 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, body))
}

/// A TCP server on 127.0.0.1:0 whose every connection is handed to a
/// script: for answers no well-behaved HTTP server gives (slow drips, huge
/// heads, redirects). Each request it reads is reported on `requests`.
pub struct RawServer {
    pub addr: SocketAddr,
    pub requests: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    shutdown: CancellationToken,
}

type Script2 = Arc<
    dyn Fn(tokio::net::TcpStream) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync,
>;

impl RawServer {
    /// `answer` writes the response after the request was read.
    pub async fn start<F, Fut>(answer: F) -> RawServer
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, requests) = mpsc::unbounded_channel();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let answer: Script2 = Arc::new(move |s| Box::pin(answer(s)));
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => return,
                    },
                    _ = stop.cancelled() => return,
                };
                let tx = tx.clone();
                let answer = answer.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut stream).await else {
                        return;
                    };
                    let _ = tx.send(request);
                    tokio::select! {
                        _ = answer(stream) => {}
                        _ = stop.cancelled() => {}
                    }
                });
            }
        });
        RawServer {
            addr,
            requests,
            shutdown,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestDb {
    /// A database created for one test but not migrated (dropped afterwards).
    pub async fn empty() -> TestDb {
        TestDb::empty_with("").await
    }

    /// An empty database made with CREATE DATABASE's `options`.
    pub async fn empty_with(options: &str) -> TestDb {
        let name = format!("thorn_test_{}", uuid::Uuid::new_v4().simple());
        let admin = connect(&base_url()).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .expect("create the test database");
        TestDb {
            url: with_database(&base_url(), &name),
            name,
        }
    }
}

impl Daemon {
    /// The daemon with operations (endpoint, notifications, reloads).
    pub fn start_with(config: Config, ops: thorn::ops::Ops) -> Daemon {
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(thorn::daemon::run_with(config, shutdown.clone(), ops));
        Daemon {
            shutdown,
            handle: Some(handle),
        }
    }
}

/// A port that was free a moment ago (for configs that must name one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// GETs `http://addr/path`; returns the status and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// The value of one sample (`name` or `name{labels}`) in Prometheus or
/// OpenMetrics text; 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| {
            v.split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a number")
        })
}

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
/// The subscriptions API on a port of its own, and a client for it.
pub struct Call {
    pub http: reqwest::Client,
    pub server: ApiServer,
}

/// Who [`Call::send`] sends as to act as an admin.
pub const ADMIN: &str = "admin";

impl Call {
    pub async fn new(config: &thorn::config::Config) -> Call {
        Call {
            http: reqwest::Client::new(),
            server: ApiServer::start(config).await,
        }
    }

    /// Sends a request as `who` (None: no token; [`ADMIN`]: an admin);
    /// returns status and JSON.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        who: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let mut request = self.http.request(method, self.server.url(path));
        if let Some(who) = who {
            request = request.bearer_auth(match who {
                ADMIN => token_with("root", serde_json::json!({"admin": true})),
                owner => token(owner),
            });
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        let value = if text.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
        };
        (status, value)
    }
}

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

/// `public.article (id, title, author)`, annotated with author as the
/// sender and `/article/{id}/` as the reference.
pub async fn article_table(db: &Client) {
    db.batch_execute(
        "CREATE TABLE public.article (id serial PRIMARY KEY, title text, author text);
         SELECT thorn.webhook_model('public.article', sender_field => 'author',
             reference => '/article/{id}/');",
    )
    .await
    .expect("annotated table");
}

/// One row in the table of `article_table`.
pub async fn write_article(db: &Client) {
    db.batch_execute("INSERT INTO article (title) VALUES ('x')")
        .await
        .expect("insert");
}

/// A tracing writer that keeps everything in memory.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Installs (once for the test binary) a global subscriber that keeps every
/// log line of every test at trace level for the HTTP stack and thorn.
/// Global rather than per-thread: a thread-local default misses events
/// whose callsites other test threads cached first.
pub fn captured_logs() -> &'static Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_env_filter(
                "info,thorn=trace,reqwest=trace,hyper=trace,hyper_util=trace,rustls=debug",
            )
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("only this test sets one");
        logs
    })
}

/// A login role for one test, dropped with its privileges afterwards (even
/// when the test fails: roles belong to the whole cluster).
pub struct Role {
    pub name: String,
    db_url: String,
}

impl Role {
    pub async fn create(t: &TestDb) -> Role {
        let name = format!(
            "thorn_role_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        t.client()
            .await
            .batch_execute(&format!("CREATE ROLE {name} LOGIN"))
            .await
            .expect("create role");
        Role {
            name,
            db_url: t.url.clone(),
        }
    }

    /// The test database's URL, logging in as this role (trust auth).
    pub fn url(&self) -> String {
        let mut u = url::Url::parse(&self.db_url).expect("url");
        let _ = u.set_username(&self.name);
        u.to_string()
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = &self.name;
        clean_up(
            self.db_url.clone(),
            format!("DROP OWNED BY {name} CASCADE; DROP ROLE {name}"),
        );
    }
}

/// The config's sync writes its subscriber `c`, and outside the sync the
/// row stays the config's (sql/0015).
pub async fn config_sync_writes_and_guards(db: &Client) {
    db.batch_execute(
        r#"SELECT count(*) FROM thorn.sync_config_subscribers(
               '{"c": {"event": "article.*", "url": "https://example.com/"}}')"#,
    )
    .await
    .expect("the config's sync");
    db.batch_execute("UPDATE thorn.subscriber SET event = 'b.*' WHERE config_name = 'c'")
        .await
        .expect_err("only the config changes its rows");
}

/// A `[subscribers.<name>]` entry of `event` and `url`, every other field
/// left to its default.
pub fn config_subscriber(event: &str, url: String) -> thorn::config::ConfigSubscriber {
    thorn::config::ConfigSubscriber {
        event: event.into(),
        url,
        owner: None,
        hmac_secret: None,
        hmac_digest: None,
        content_type: None,
        hmac_signer: None,
        ordered: None,
    }
}

/// A certificate authority and a leaf certificate for `names`, signed by it.
pub struct Pki {
    pub ca_pem: String,
    pub leaf_der: Vec<u8>,
    pub leaf_key_der: Vec<u8>,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

pub fn pki(names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "thorn test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let mut pki = Pki {
        ca_pem: ca.pem(),
        leaf_der: Vec::new(),
        leaf_key_der: Vec::new(),
        ca,
        ca_key,
    };
    let (leaf, leaf_key) = pki.issue(names);
    pki.leaf_der = leaf.der().to_vec();
    pki.leaf_key_der = leaf_key.serialize_der();
    pki
}

impl Pki {
    /// Another certificate signed by this authority: for `names` (host
    /// names or IP addresses), with its key.
    pub fn issue(&self, names: &[&str]) -> (rcgen::Certificate, rcgen::KeyPair) {
        self.issue_with(names, |_| {})
    }

    /// [`Pki::issue`], with its parameters changed by `edit` first.
    pub fn issue_with(
        &self,
        names: &[&str],
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (rcgen::Certificate, rcgen::KeyPair) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        edit(&mut params);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &self.ca, &self.ca_key)
            .expect("certificate");
        (cert, key)
    }
}
