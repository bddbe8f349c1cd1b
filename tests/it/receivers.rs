//! What a receiver can do to a delivery, against real servers on loopback:
//! redirects, TLS verification, response bodies and heads too large or too
//! slow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::support::{
    article_table, pki, read_request, subscribe, wait_ended, write_article, Daemon, Pki, RawServer,
    Receiver, TestDb, QUIET, WAIT,
};

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
