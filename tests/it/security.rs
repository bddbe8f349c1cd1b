//! The address guard, URL rules, TLS, response bounds, secrets and least
//! privilege, end to end against real servers on loopback.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_postgres::Client;

use crate::support::{
    captured_logs, eventually, read_request, subscribe, wait_ended, Daemon, RawServer, Receiver,
    TestDb, QUIET, WAIT,
};

async fn article_table(db: &Client) {
    db.batch_execute(
        "CREATE TABLE public.article (
             id serial PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'draft',
             author text);
         SELECT thorn.webhook_model('public.article');",
    )
    .await
    .expect("annotated table");
}

async fn write_article(db: &Client) {
    db.batch_execute("INSERT INTO article (title) VALUES ('x')")
        .await
        .expect("insert");
}

/// Names from /etc/hosts (never edited here) that resolve to loopback.
async fn loopback_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned()];
    for name in ["runsc", "vm", "localhost.localdomain", "ip6-localhost"] {
        if let Ok(Ok(addrs)) =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host((name, 80))).await
        {
            let addrs: Vec<_> = addrs.collect();
            if !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()) {
                names.push(name.to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn hostile_urls_never_reach_a_loopback_receiver() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let p = rx.addr.port();
    let mut urls: Vec<String> = [
        "http://127.0.0.1:{p}/",
        "http://127.0.0.1.:{p}/",
        "http://2130706433:{p}/",
        "http://0x7f000001:{p}/",
        "http://0x7F.0x0.0x0.0x1:{p}/",
        "http://0177.0.0.1:{p}/",
        "http://017700000001:{p}/",
        "http://127.1:{p}/",
        "http://127.0.1:{p}/",
        "http://0x7f.1:{p}/",
        "http://%31%32%37.0.0.1:{p}/",
        "http://\u{ff11}\u{ff12}\u{ff17}.\u{ff10}.\u{ff10}.\u{ff11}:{p}/",
        "http://0.0.0.0:{p}/",
        "http://0:{p}/",
        "http://[::1]:{p}/",
        "http://[::]:{p}/",
        "http://[0:0:0:0:0:0:0:1]:{p}/",
        "http://[::ffff:127.0.0.1]:{p}/",
        "http://[::ffff:7f00:1]:{p}/",
        "http://[::127.0.0.1]:{p}/",
        "http://[64:ff9b::127.0.0.1]:{p}/",
        "http://[2002:7f00:1::1]:{p}/",
        "http://user:pw@127.0.0.1:{p}/",
        "https://127.0.0.1:{p}/",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://10.0.0.1:{p}/",
        "http://192.168.0.1/",
        "http://100.64.0.1/",
        "http://[fd00::1]/",
        "http://[fe80::1]/",
        "http://\u{24db}ocalhost:{p}/",
        "http://LOCALHOST:{p}/",
        "http://localhost.:{p}/",
        "http://hooks.localhost:{p}/",
    ]
    .iter()
    .map(|u| u.replace("{p}", &p.to_string()))
    .collect();
    for name in loopback_names().await {
        urls.push(format!("http://{name}:{p}/"));
        urls.push(format!("http://{name}:{p}/?via=name"));
    }
    for url in &urls {
        subscribe(&db, "article.*", url, None, "secret").await;
    }
    let mut config = t.config();
    config.security = Default::default();
    let daemon = Daemon::start(config);
    write_article(&db).await;

    let ended = wait_ended(&db, urls.len(), WAIT).await;
    assert_eq!(ended.len(), urls.len());
    for e in &ended {
        assert_eq!(
            (e.state.as_str(), e.class.as_deref(), e.attempts),
            ("dead", Some("blocked"), 1),
            "{e:#?}"
        );
        let error = e.error.as_deref().unwrap_or("");
        assert!(!error.contains("pw"), "{error}");
    }
    assert!(
        rx.next(QUIET).await.is_none(),
        "nothing may reach the receiver"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn https_only_and_allowed_ports_refuse_before_connecting() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let mut other = Receiver::start().await;
    subscribe(&db, "article.*", &rx.url("/a"), None, "secret").await;
    subscribe(&db, "article.*", &other.url("/b"), None, "secret").await;

    // Only the first receiver's port is allowed.
    let mut config = t.config();
    config.security.allowed_ports = vec![rx.addr.port()];
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 2, WAIT).await;
    daemon.stop().await;
    let by_path = |path: &str| {
        ended
            .iter()
            .find(|e| e.url.ends_with(path))
            .cloned()
            .expect("row")
    };
    assert_eq!(by_path("/a").state, "delivered");
    let b = by_path("/b");
    assert_eq!(
        (b.state.as_str(), b.class.as_deref(), b.attempts),
        ("dead", Some("blocked"), 1)
    );
    assert!(b
        .error
        .as_deref()
        .unwrap_or("")
        .contains("security.allowed_ports"));
    rx.expect(1, WAIT, QUIET).await;
    assert!(other.next(QUIET).await.is_none());

    // https_only: plain http is refused even to an allowed network.
    db.batch_execute("DELETE FROM thorn.delivery; DELETE FROM thorn.event")
        .await
        .expect("clean");
    let mut config = t.config();
    config.security.https_only = true;
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 2, WAIT).await;
    daemon.stop().await;
    for e in &ended {
        assert_eq!(
            (e.state.as_str(), e.class.as_deref(), e.attempts),
            ("dead", Some("blocked"), 1),
            "{e:#?}"
        );
        assert!(e.error.as_deref().unwrap_or("").contains("https_only"));
    }
    assert!(rx.next(QUIET).await.is_none());
    assert!(other.next(QUIET).await.is_none());
}

#[tokio::test]
async fn redirects_are_never_followed() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut target = Receiver::start().await;
    let location = target.url("/stolen");
    let redirector = RawServer::start(move |mut s| {
        let location = location.clone();
        async move {
            let answer = format!(
                "HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = s.write_all(answer.as_bytes()).await;
        }
    })
    .await;
    subscribe(&db, "article.*", &redirector.url("/"), None, "secret").await;
    let mut config = t.config();
    config.delivery.retry_schedule = vec![];
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 1, WAIT).await;
    daemon.stop().await;
    assert_eq!(
        (
            ended[0].state.as_str(),
            ended[0].status,
            ended[0].class.as_deref()
        ),
        ("dead", Some(302), Some("http_status"))
    );
    assert!(
        target.next(QUIET).await.is_none(),
        "the redirect was followed"
    );
}

/// A certificate authority and a leaf certificate for `names`, signed by it.
struct Pki {
    ca_pem: String,
    leaf_der: Vec<u8>,
    leaf_key_der: Vec<u8>,
}

fn pki(names: &[&str]) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "thorn test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().expect("key");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let leaf_params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    let leaf_key = KeyPair::generate().expect("key");
    let leaf = leaf_params
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf");
    Pki {
        ca_pem: ca.pem(),
        leaf_der: leaf.der().to_vec(),
        leaf_key_der: leaf_key.serialize_der(),
    }
}

/// An HTTPS server on 127.0.0.1:0 with the given leaf certificate; answers
/// 200 to every request and reports each on the channel.
async fn tls_receiver(
    pki: &Pki,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    tokio_util::sync::CancellationToken,
) {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(pki.leaf_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key_der.clone())),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                _ = stopped.cancelled() => return,
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let Ok(Ok(mut tls)) =
                    tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                else {
                    return;
                };
                if let Some((_, body)) = read_request(&mut tls).await {
                    let _ = tx.send(body);
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, rx, stop)
}

#[tokio::test]
async fn tls_is_verified_and_extra_cas_are_trusted_only_when_configured() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let good = pki(&["localhost"]);
    let wrong_name = pki(&["elsewhere.example"]);
    let (addr, mut got, stop) = tls_receiver(&good).await;
    let (bad_addr, mut bad_got, bad_stop) = tls_receiver(&wrong_name).await;
    subscribe(
        &db,
        "article.*",
        &format!("https://localhost:{}/good", addr.port()),
        None,
        "secret",
    )
    .await;
    subscribe(
        &db,
        "article.*",
        &format!("https://localhost:{}/wrong-name", bad_addr.port()),
        None,
        "secret",
    )
    .await;

    // By default the self-made CA is unknown: class tls, nothing received.
    let mut config = t.config();
    config.delivery.retry_schedule = vec![];
    let daemon = Daemon::start(config.clone());
    write_article(&db).await;
    let ended = wait_ended(&db, 2, WAIT).await;
    daemon.stop().await;
    for e in &ended {
        assert_eq!(
            (e.state.as_str(), e.class.as_deref()),
            ("dead", Some("tls")),
            "{e:#?}"
        );
        assert!(
            e.error.as_deref().unwrap_or("").contains("certificate"),
            "{e:#?}"
        );
    }
    assert!(got.try_recv().is_err());

    // With both CAs configured through security.extra_ca_files, the right
    // certificate is accepted; the one for another name still is not.
    let dir = std::env::temp_dir().join(format!("thorn-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = dir.join("ca.pem");
    let other_ca = dir.join("other.pem");
    std::fs::write(&ca, &good.ca_pem).expect("write");
    std::fs::write(&other_ca, &wrong_name.ca_pem).expect("write");
    let text = format!(
        "database_url = {:?}\n[delivery]\ntimeout = \"2s\"\nlease = \"5s\"\nretry_schedule = []\n\
         [security]\nallow_networks = [\"127.0.0.0/8\"]\nextra_ca_files = [{:?}, {:?}]\n",
        t.url,
        ca.display().to_string(),
        other_ca.display().to_string()
    );
    let config = thorn::config::Config::load(Some(&text), &Default::default()).expect("config");
    assert_eq!(config.security.extra_roots.len(), 2);
    let _ = std::fs::remove_dir_all(&dir);
    db.batch_execute("DELETE FROM thorn.delivery; DELETE FROM thorn.event")
        .await
        .expect("clean");
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 2, WAIT).await;
    daemon.stop().await;
    let find = |path: &str| ended.iter().find(|e| e.url.ends_with(path)).expect("row");
    assert_eq!(find("/good").state, "delivered", "{ended:#?}");
    assert_eq!(
        (
            find("/wrong-name").state.as_str(),
            find("/wrong-name").class.as_deref()
        ),
        ("dead", Some("tls"))
    );
    let body = tokio::time::timeout(WAIT, got.recv())
        .await
        .expect("delivered")
        .expect("body");
    assert!(String::from_utf8_lossy(&body).contains("article.created"));
    assert!(bad_got.try_recv().is_err());
    stop.cancel();
    bad_stop.cancel();
}

/// Runs one delivery against a scripted server and returns its row.
async fn one_delivery<F, Fut>(
    answer: F,
    tweak: impl FnOnce(&mut thorn::config::Config),
) -> crate::support::Ended
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut server = RawServer::start(answer).await;
    subscribe(&db, "article.*", &server.url("/"), None, "secret").await;
    let mut config = t.config();
    config.delivery.retry_schedule = vec![];
    tweak(&mut config);
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 1, WAIT).await;
    daemon.stop().await;
    assert!(
        server.requests.try_recv().is_ok(),
        "the server saw the request"
    );
    ended.into_iter().next().expect("one row")
}

#[tokio::test]
async fn response_bodies_are_read_up_to_the_cap_and_stored_truncated() {
    let e = one_delivery(
        |mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 500 Oops\r\nContent-Length: 8000000\r\n\r\n")
                .await;
            let chunk = vec![b'x'; 65536];
            // Far more than the cap; the client stops reading long before.
            for _ in 0..122 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        },
        |c| c.delivery.max_response_bytes = 1000,
    )
    .await;
    assert_eq!(
        (e.status, e.class.as_deref()),
        (Some(500), Some("http_status"))
    );
    let response = e.response.expect("stored");
    assert_eq!(response.len(), 1000);
    assert!(response.bytes().all(|b| b == b'x'));
}

#[tokio::test]
async fn a_slowly_dripped_head_is_cut_off_by_the_total_timeout() {
    let started = Instant::now();
    let e = one_delivery(
        |mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            for i in 0..600 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(format!("X-{i}: y\r\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        },
        |c| c.delivery.timeout = Duration::from_secs(1),
    )
    .await;
    assert_eq!(
        (e.state.as_str(), e.class.as_deref()),
        ("dead", Some("timeout")),
        "{e:#?}"
    );
    assert!(e.duration_ms.unwrap_or(0) < 2500, "{e:#?}");
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_slowly_dripped_body_is_cut_off_by_the_total_timeout() {
    let e = one_delivery(
        |mut s| async move {
            let _ = s
                .write_all(b"HTTP/1.1 503 Busy\r\nContent-Length: 100000\r\n\r\n")
                .await;
            for _ in 0..600 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if s.write_all(b"z").await.is_err() {
                    return;
                }
            }
        },
        |c| c.delivery.timeout = Duration::from_secs(1),
    )
    .await;
    // The status arrived, so it is what is recorded; the body is what came
    // before the timeout.
    assert_eq!(
        (e.status, e.class.as_deref()),
        (Some(503), Some("http_status")),
        "{e:#?}"
    );
    assert!(e.duration_ms.unwrap_or(0) < 2500, "{e:#?}");
    assert!(
        e.response.clone().unwrap_or_default().starts_with('z'),
        "{e:#?}"
    );
    let error = e.error.clone().unwrap_or_default().to_lowercase();
    assert!(
        error.contains("timed out") || error.contains("timeout"),
        "{e:#?}"
    );
}

#[tokio::test]
async fn oversized_response_heads_are_refused() {
    // More headers than the client accepts…
    let many = one_delivery(
        |mut s| async move {
            let mut head = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..500 {
                head.push_str(&format!("X-{i}: y\r\n"));
            }
            head.push_str("Content-Length: 0\r\n\r\n");
            let _ = s.write_all(head.as_bytes()).await;
        },
        |_| {},
    )
    .await;
    assert_eq!(
        (many.state.as_str(), many.class.as_deref()),
        ("dead", Some("request")),
        "{many:#?}"
    );
    // …and a single header far larger than its buffer.
    let huge = one_delivery(
        |mut s| async move {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Big: ").await;
            let chunk = vec![b'a'; 65536];
            for _ in 0..64 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = s.write_all(b"\r\nContent-Length: 0\r\n\r\n").await;
        },
        |_| {},
    )
    .await;
    assert_eq!(
        (huge.state.as_str(), huge.class.as_deref()),
        ("dead", Some("request")),
        "{huge:#?}"
    );
}

#[tokio::test]
async fn secrets_stay_out_of_logs_errors_and_debug_output() {
    const SECRET: &str = "hmac-canary-7d1c9e";
    const URL_PASSWORD: &str = "url-canary-51ab";
    const URL_TOKEN: &str = "query-canary-93fe";
    const DB_PASSWORD: &str = "db-canary-44c0";
    let logs = captured_logs();

    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let rx = Receiver::start().await;
    rx.respond_with(&[500, 500, 500]);
    // Failing in every way a delivery can: an HTTP error, a blocked address,
    // a refused connection, a failed lookup.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    for url in [
        format!("http://u:{URL_PASSWORD}@{}/h?token={URL_TOKEN}", rx.addr),
        format!("http://u:{URL_PASSWORD}@10.1.2.3/h?token={URL_TOKEN}"),
        format!("http://u:{URL_PASSWORD}@127.0.0.1:{closed}/h?token={URL_TOKEN}"),
        format!("http://u:{URL_PASSWORD}@no-such-host.invalid/h?token={URL_TOKEN}"),
    ] {
        subscribe(&db, "article.*", &url, None, SECRET).await;
    }
    let mut config = t.config();
    config.database_url.0 = config
        .database_url
        .0
        .replace("postgres@", &format!("postgres:{DB_PASSWORD}@"));
    let debug = format!("{config:?}");
    assert!(!debug.contains(DB_PASSWORD), "{debug}");
    let kv = thorn::config::DatabaseUrl(format!("host=h user=u password={DB_PASSWORD}"));
    assert!(!format!("{kv:?}").contains(DB_PASSWORD));

    let daemon = Daemon::start(config);
    write_article(&db).await;
    let ended = wait_ended(&db, 4, WAIT).await;
    daemon.stop().await;
    let classes: Vec<_> = ended
        .iter()
        .map(|e| e.class.clone().unwrap_or_default())
        .collect();
    for class in ["http_status", "blocked", "connect", "dns"] {
        assert!(classes.iter().any(|c| c == class), "{classes:?}");
    }
    let stored: String = ended
        .iter()
        .map(|e| format!("{:?}{:?}", e.error, e.response))
        .collect();
    let logged = logs.text();
    assert!(logged.contains("delivery failed"), "the capture works");
    for canary in [SECRET, URL_PASSWORD, URL_TOKEN] {
        assert!(!stored.contains(canary), "{canary} in {stored}");
        assert!(!logged.contains(canary), "{canary} in the logs");
    }
    assert!(!logged.contains(DB_PASSWORD));

    // A claimed delivery's Debug output hides its secret.
    let claimed = thorn::db::queue::Claimed {
        id: uuid::Uuid::new_v4(),
        attempts: 0,
        event_id: 1,
        event: "a.b".into(),
        reference: None,
        sender: None,
        data: "{}".into(),
        subscriber_id: uuid::Uuid::new_v4(),
        url: "https://e.com/".into(),
        secret: thorn::sign::Secret(SECRET.into()),
        digest: "sha256".into(),
        content_type: "application/json".into(),
        active: true,
        signer: "sign".into(),
        event_age: std::time::Duration::ZERO,
        claimed_at: std::time::Instant::now(),
        lease: std::time::SystemTime::now(),
    };
    assert!(!format!("{claimed:?}").contains(SECRET));
}

/// A role name of its own for one test: roles belong to the whole server,
/// and tests run in parallel.
fn role_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The test database's URL, logging in as `role` (trust auth: no password).
fn url_as(url: &str, role: &str) -> String {
    let mut u = url::Url::parse(url).expect("url");
    let _ = u.set_username(role);
    let _ = u.set_password(None);
    u.to_string()
}

#[tokio::test]
async fn least_privilege_daemon_and_application_roles() {
    let t = TestDb::new().await;
    let admin = t.client().await;
    let daemon_role = role_name("thorn_daemon");
    let app_role = role_name("thorn_app");
    let grants = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/sql/roles.sql"))
        .expect("sql/roles.sql")
        .replace(":'daemon'", &format!("'{daemon_role}'"));
    admin
        .batch_execute(&format!(
            "CREATE ROLE {daemon_role} LOGIN; CREATE ROLE {app_role} LOGIN;
             CREATE TABLE public.article (id serial PRIMARY KEY, title text NOT NULL);
             SELECT thorn.webhook_model('public.article');
             GRANT USAGE ON SCHEMA public TO {app_role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.article TO {app_role};
             GRANT USAGE ON SEQUENCE public.article_id_seq TO {app_role};"
        ))
        .await
        .expect("roles");
    let result = async {
        admin
            .batch_execute(&grants)
            .await
            .expect("sql/roles.sql applies");
        let mut rx = Receiver::start().await;
        subscribe(&admin, "article.*", &rx.url("/"), None, "secret").await;
        let app = crate::support::connect(&url_as(&t.url, &app_role)).await;
        let no_rights: bool = app
            .query_one(
                "SELECT NOT has_schema_privilege(current_user, 'thorn', 'USAGE')
                        AND NOT has_schema_privilege(current_user, 'thorn', 'CREATE')",
                &[],
            )
            .await
            .expect("privileges")
            .get(0);
        assert!(
            no_rights,
            "the application role has no rights on schema thorn"
        );
        assert!(app
            .batch_execute("SELECT * FROM thorn.event")
            .await
            .is_err());

        let mut config = t.config();
        config.database_url.0 = url_as(&t.url, &daemon_role);
        // It may write its config's subscribers (and, below, no others).
        config.subscribers = Some(std::collections::BTreeMap::from([(
            "ops".to_owned(),
            crate::support::config_subscriber("nothing.matches", rx.url("/ops")),
        )]));
        let daemon = Daemon::start(config);
        eventually(
            &admin,
            "SELECT count(*) = 1 FROM thorn.subscriber WHERE config_name = 'ops'",
        )
        .await;
        app.batch_execute(
            "INSERT INTO article (title) VALUES ('a');
             UPDATE article SET title = 'b';
             DELETE FROM article;",
        )
        .await
        .expect("the application writes the annotated table");
        let got = rx.expect(3, WAIT, QUIET).await;
        let events: Vec<String> = got
            .iter()
            .map(|r| r.header("hook-event").to_owned())
            .collect();
        assert_eq!(events.len(), 3);
        for e in ["article.created", "article.changed", "article.removed"] {
            assert!(events.iter().any(|x| x == e), "{events:?}");
        }
        let ended = wait_ended(&admin, 3, WAIT).await;
        assert!(ended.iter().all(|e| e.state == "delivered"), "{ended:#?}");
        // The daemon's role cannot change the schema or read application data.
        let daemon_db = crate::support::connect(&url_as(&t.url, &daemon_role)).await;
        assert!(daemon_db
            .batch_execute("CREATE TABLE thorn.x (a int)")
            .await
            .is_err());
        assert!(daemon_db
            .batch_execute("SELECT * FROM public.article")
            .await
            .is_err());
        assert!(daemon_db
            .batch_execute(
                "INSERT INTO thorn.subscriber (event, url) VALUES ('a', 'https://e.com/')"
            )
            .await
            .is_err());
        drop(daemon_db);
        drop(app);
        daemon.stop().await;
    };
    result.await;
    for role in [&daemon_role, &app_role] {
        let _ = admin
            .batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}"))
            .await;
    }
}

// Capture functions run as the schema owner; a writer must not be able to
// make them call its own code by putting look-alike functions, operators or
// types first on its search_path.
#[tokio::test]
async fn a_writer_search_path_cannot_hijack_the_capture_triggers() {
    let t = TestDb::new().await;
    let admin = t.client().await;
    let app_role = role_name("thorn_hijack");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app_role} LOGIN;
             DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {app_role}', current_database()); END $$;
             CREATE TABLE public.article (id serial PRIMARY KEY, title text NOT NULL,
                                          author text, secret text);
             SELECT thorn.webhook_model('public.article', sender_field => 'author',
                                        reference => '/article/{{id}}/', exclude => ARRAY['secret']);
             GRANT USAGE ON SCHEMA public TO {app_role};
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.article TO {app_role};
             GRANT USAGE ON SEQUENCE public.article_id_seq TO {app_role};"
        ))
        .await
        .expect("set-up");
    let result = async {
        let app = crate::support::connect(&url_as(&t.url, &app_role)).await;
        // Exact-type matches beat pg_catalog's polymorphic and variadic
        // originals, and the writer puts its schema first.
        app.batch_execute(
            r#"CREATE SCHEMA evil;
               CREATE FUNCTION evil.concat(text, text, text) RETURNS text
                   LANGUAGE sql AS $$ SELECT 'hijacked' $$;
               CREATE FUNCTION evil.to_jsonb(public.article) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '{"hijacked": true}'::jsonb $$;
               CREATE FUNCTION evil.field(jsonb, text) RETURNS text
                   LANGUAGE sql AS $$ SELECT 'hijacked' $$;
               CREATE OPERATOR evil.->> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.field);
               CREATE FUNCTION evil.minus(jsonb, text[]) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '{"hijacked": true}'::jsonb $$;
               CREATE OPERATOR evil.- (LEFTARG = jsonb, RIGHTARG = text[], FUNCTION = evil.minus);
               CREATE FUNCTION evil.jsonb_eq(jsonb, jsonb) RETURNS boolean
                   LANGUAGE sql AS $$ SELECT false $$;
               CREATE FUNCTION evil.get(jsonb, text) RETURNS jsonb
                   LANGUAGE sql AS $$ SELECT '"hijacked"'::jsonb $$;
               CREATE OPERATOR evil.-> (LEFTARG = jsonb, RIGHTARG = text, FUNCTION = evil.get);
               CREATE FUNCTION evil.never(jsonb, jsonb) RETURNS boolean
                   LANGUAGE sql AS $$ SELECT false $$;
               CREATE OPERATOR evil.= (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = evil.never);
               CREATE FUNCTION evil.pg_try_advisory_xact_lock_shared(integer, integer) RETURNS boolean
                   LANGUAGE sql AS $$ SELECT true $$;
               SET search_path = evil, pg_catalog, public;
               INSERT INTO article (title, author, secret) VALUES ('a', 'alice', 's3cret');
               UPDATE article SET title = 'b';
               UPDATE article SET title = 'b';
               DELETE FROM article;"#,
        )
        .await
        .expect("the writer's statements");
        let rows = admin
            .query(
                "SELECT name, ref, sender, data::text FROM thorn.event ORDER BY id",
                &[],
            )
            .await
            .expect("events");
        let events: Vec<(String, Option<String>, Option<String>, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        // The second UPDATE changed nothing: no event. A hijacked jsonb_eq,
        // or a hijacked -> or = in the pairing of old and new rows on the
        // key (unpaired rows count as changed), would have made one.
        let names: Vec<&str> = events.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            ["article.created", "article.changed", "article.removed"],
            "{events:#?}"
        );
        for (_, reference, sender, data) in &events {
            assert_eq!(reference.as_deref(), Some("/article/1/"), "{events:#?}");
            assert_eq!(sender.as_deref(), Some("alice"), "{events:#?}");
            assert!(
                !data.contains("hijacked") && !data.contains("s3cret"),
                "{data}"
            );
            assert!(data.contains(r#""author": "alice""#), "{data}");
        }
    };
    result.await;
    let _ = admin
        .batch_execute(&format!("DROP OWNED BY {app_role}; DROP ROLE {app_role}"))
        .await;
}

// to_jsonb renders a user-defined type through its cast to json, and the
// capture runs as the schema owner: the owner of an annotated table, with
// no right on schema thorn, must not get its own cast function run there.
#[tokio::test]
async fn a_table_owner_cannot_run_a_cast_to_json_as_the_schema_owner() {
    let t = TestDb::new().await;
    let admin = t.client().await;
    let app_role = role_name("thorn_cast");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {app_role} LOGIN;
             GRANT CREATE, USAGE ON SCHEMA public TO {app_role};
             CREATE TABLE public.note (id int PRIMARY KEY, body text);
             ALTER TABLE public.note OWNER TO {app_role};
             SELECT thorn.webhook_model('public.note');"
        ))
        .await
        .expect("set-up");
    let result = async {
        let app = crate::support::connect(&url_as(&t.url, &app_role)).await;
        // Were the cast ever called by a capture, it would run as the owner
        // of schema thorn (here a superuser) and make the role one.
        app.batch_execute(&format!(
            "CREATE TYPE mood AS ENUM ('ok');
             CREATE TYPE tone AS ENUM ('ok');
             CREATE FUNCTION escalate(anyenum) RETURNS json LANGUAGE plpgsql AS $$
             BEGIN EXECUTE 'ALTER ROLE {app_role} SUPERUSER'; RETURN '1'; END $$;
             CREATE FUNCTION mood_json(mood) RETURNS json LANGUAGE sql AS $$ SELECT escalate($1) $$;
             CREATE FUNCTION tone_json(tone) RETURNS json LANGUAGE sql AS $$ SELECT escalate($1) $$;
             ALTER TABLE note ADD COLUMN m mood[];
             CREATE CAST (tone AS json) WITH FUNCTION tone_json(tone);"
        ))
        .await
        .expect("types, functions, a column and a cast nothing captured uses");
        for ddl in [
            // the column first, then its type's cast
            "CREATE CAST (mood AS json) WITH FUNCTION mood_json(mood)",
            // the cast first, then a column of its type, here in a domain
            "CREATE DOMAIN t AS tone; ALTER TABLE note ADD COLUMN t t",
        ] {
            let error = app.batch_execute(ddl).await.expect_err(ddl);
            let message = error.as_db_error().expect("refused").message().to_owned();
            assert!(message.contains("cast to json"), "{ddl}: {message}");
        }
        app.batch_execute("INSERT INTO note (id, body, m) VALUES (1, 'hi', '{ok}')")
            .await
            .expect("a write");
        let superuser: bool = admin
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = $1",
                &[&app_role],
            )
            .await
            .expect("role")
            .get(0);
        assert!(!superuser, "the cast ran as the schema owner");
        // A table that already reaches such a cast is refused at annotation.
        admin
            .batch_execute("CREATE TABLE public.other (id int PRIMARY KEY, t tone)")
            .await
            .expect("table");
        let error = admin
            .batch_execute("SELECT thorn.webhook_model('public.other')")
            .await
            .expect_err("annotating a table that reaches a cast to json");
        let message = error.as_db_error().expect("refused").message().to_owned();
        assert!(message.contains("cast to json (public.tone)"), "{message}");
    };
    result.await;
    admin
        .batch_execute(&format!(
            "DROP TABLE public.other; DROP CAST (public.tone AS json);
             DROP OWNED BY {app_role}; DROP ROLE {app_role}"
        ))
        .await
        .expect("cleanup");
}

/// A schema owner that is not a superuser (a managed database's
/// administrator role, say) migrates a new database: on PostgreSQL 15 that
/// failed at schema 15, whose function stored a custom parameter in a SET
/// clause, which only a superuser may do. Without a superuser there is no
/// DDL guard (event triggers need one); the config's sync works and guards
/// its rows all the same.
#[tokio::test]
async fn a_schema_owner_that_is_not_a_superuser_can_migrate() {
    let t = TestDb::empty().await;
    let admin = t.client().await;
    let owner = crate::support::Role::create(&t).await;
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %I TO {0}', current_database()); END $$;
             GRANT CREATE ON SCHEMA public TO {0}",
            owner.name
        ))
        .await
        .expect("the owner's rights");

    let (code, out, err) = crate::support::thorn_cli(&owner.url(), &["migrate"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("applied migrations"), "{out}");
    let guard: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'thorn\\_%'",
            &[],
        )
        .await
        .expect("pg_event_trigger")
        .get(0);
    assert_eq!(guard, 0);

    let app = crate::support::connect(&owner.url()).await;
    app.batch_execute(
        "CREATE TABLE public.article (id serial PRIMARY KEY, title text, secret text);
         SELECT thorn.webhook_model('public.article', exclude => ARRAY['secret']);
         INSERT INTO public.article (title, secret) VALUES ('a', 's');",
    )
    .await
    .expect("annotated and written by its owner");
    let events: i64 = app
        .query_one("SELECT count(*) FROM thorn.event", &[])
        .await
        .expect("events")
        .get(0);
    assert_eq!(events, 1);
    // Schema 15's sync, made by this role, works and guards its rows.
    crate::support::config_sync_writes_and_guards(&app).await;
}
