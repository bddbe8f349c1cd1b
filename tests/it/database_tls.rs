//! TLS between thorn and PostgreSQL, with libpq's options (src/db/tls.rs).
//!
//! The database is the real one, reached through a TLS-terminating front
//! started by the test, as a pooler or a cloud proxy would be: it answers
//! PostgreSQL's SSLRequest, completes the handshake with a certificate of a
//! test authority (asking for a client certificate when told to), and
//! passes the decrypted session on. That gives the tests certificates they
//! control; the server's own TLS is checked too, where it offers it.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;

use crate::support::{
    article_table, assert_signed, base_url, pki, subscribe, thorn_cli, write_article, Daemon, Pki,
    Receiver, TestDb, WAIT,
};

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// One session as the front saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Plain,
    Tls { client_certificate: bool },
}

struct Front {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl Front {
    /// A front that speaks TLS with `pki`'s leaf certificate, and demands a
    /// client certificate signed by `clients` when given.
    async fn tls(pki: &Pki, clients: Option<&Pki>) -> Front {
        Front::tls_with(&pki.leaf_der, &pki.leaf_key_der, clients).await
    }

    /// A front that speaks TLS with the given certificate and key (DER).
    async fn tls_with(leaf: &[u8], key: &[u8], clients: Option<&Pki>) -> Front {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(clients) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from(clients.ca_der()))
                    .expect("client CA");
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(
                vec![CertificateDer::from(leaf.to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec())),
            )
            .expect("server config");
        Front::start(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    /// A front that refuses TLS ('N'), as a server without it does.
    async fn plain() -> Front {
        Front::start(None).await
    }

    async fn start(acceptor: Option<tokio_rustls::TlsAcceptor>) -> Front {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let upstream = url::Url::parse(&base_url()).expect("DATABASE_URL is a URL");
        let upstream = format!(
            "{}:{}",
            upstream.host_str().unwrap_or("127.0.0.1"),
            upstream.port().unwrap_or(5432)
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (recorded, stopped) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
                    _ = stopped.cancelled() => return,
                };
                let (acceptor, upstream, recorded) =
                    (acceptor.clone(), upstream.clone(), recorded.clone());
                tokio::spawn(async move {
                    let mut first = [0u8; 8];
                    client.read_exact(&mut first).await.ok()?;
                    let mut server = tokio::net::TcpStream::connect(&upstream).await.ok()?;
                    if first != SSL_REQUEST {
                        recorded.lock().expect("seen").push(Seen::Plain);
                        server.write_all(&first).await.ok()?;
                        tokio::io::copy_bidirectional(&mut client, &mut server)
                            .await
                            .ok()?;
                        return Some(());
                    }
                    let Some(acceptor) = acceptor else {
                        client.write_all(b"N").await.ok()?;
                        recorded.lock().expect("seen").push(Seen::Plain);
                        tokio::io::copy_bidirectional(&mut client, &mut server)
                            .await
                            .ok()?;
                        return Some(());
                    };
                    client.write_all(b"S").await.ok()?;
                    let mut tls = acceptor.accept(client).await.ok()?;
                    let client_certificate = tls.get_ref().1.peer_certificates().is_some();
                    recorded
                        .lock()
                        .expect("seen")
                        .push(Seen::Tls { client_certificate });
                    tokio::io::copy_bidirectional(&mut tls, &mut server)
                        .await
                        .ok()
                        .map(|_| ())
                });
            }
        });
        Front { port, seen, stop }
    }

    /// A URL of `db` through this front: `host` is the name the client
    /// checks, and always reaches 127.0.0.1 (`hostaddr`).
    fn url(&self, db: &TestDb, host: &str, options: &str) -> String {
        let name = url::Url::parse(&db.url).expect("url").path().to_string();
        let user = match url::Url::parse(&base_url()).expect("url").username() {
            "" => String::new(),
            user => format!("{user}@"),
        };
        format!(
            "postgres://{user}{host}:{}{name}?hostaddr=127.0.0.1&{options}",
            self.port
        )
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Pki {
    fn ca_der(&self) -> Vec<u8> {
        rustls::pki_types::CertificateDer::from_pem_slice(self.ca_pem.as_bytes())
            .expect("CA PEM")
            .to_vec()
    }
}

/// Files that live as long as the test.
struct Files(std::path::PathBuf);

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!("thorn-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Files(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

use rustls::pki_types::pem::PemObject;

/// Runs `thorn status` on `url`; asserts that it connected.
async fn connects(url: &str) {
    let (code, out, err) = thorn_cli(url, &["status"]).await;
    assert_eq!(code, 0, "{url}: {out}{err}");
}

/// Runs `thorn status` on `url`; asserts that it could not connect, and
/// returns what it said.
async fn refused(url: &str) -> String {
    let (code, _, err) = thorn_cli(url, &["status"]).await;
    assert_eq!(code, 1, "{url}: {err}");
    err
}

#[tokio::test]
async fn the_daemon_reaches_its_database_over_verified_tls() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut receiver = Receiver::start().await;
    subscribe(&db, "article.*", &receiver.url("/hook"), None, "s3cret").await;

    let authority = pki(&["db.thorn.test"]);
    let files = Files::new();
    let ca = files.write("ca.pem", &authority.ca_pem);
    let front = Front::tls(&authority, None).await;
    let verified = front.url(
        &t,
        "db.thorn.test",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let config = t.config_text().replace(&t.url, &verified);
    let config = thorn::config::Config::load(Some(&config), &Default::default()).expect("config");
    let daemon = Daemon::start(config);
    write_article(&db).await;
    let got = receiver.next(WAIT).await.expect("a delivery");
    assert_signed("s3cret", &got);
    assert_eq!(got.json()["event"], "article.created");
    connects(&verified).await;
    daemon.stop().await;
    let seen = front.seen();
    // The listener, dispatcher, sender, completer, monitor, the command.
    assert!(seen.len() >= 4, "{seen:?}");
    assert!(
        seen.iter().all(|s| *s
            == Seen::Tls {
                client_certificate: false
            }),
        "{seen:?}"
    );

    // Another name than the certificate's: verify-full refuses it,
    // verify-ca (the chain only) takes it.
    let elsewhere = |options: &str| front.url(&t, "elsewhere.thorn.test", options);
    let err = refused(&elsewhere(&format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    assert!(err.contains("not valid for name"), "{err}");
    connects(&elsewhere(&format!("sslmode=verify-ca&sslrootcert={ca}"))).await;

    // Another authority of the same name: neither takes its signature,
    // nor require given that root; require without a root does.
    let stranger = files.write("stranger.pem", &pki(&["db.thorn.test"]).ca_pem);
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = front.url(
            &t,
            "db.thorn.test",
            &format!("sslmode={mode}&sslrootcert={stranger}"),
        );
        let err = refused(&url).await;
        assert!(err.contains("invalid peer certificate"), "{mode}: {err}");
    }
    connects(&front.url(&t, "db.thorn.test", "sslmode=require")).await;

    // verify-ca lets only the name go: an expired certificate of the right
    // authority is refused, by it as by verify-full.
    let (expired, key) = authority.issue_with(&["db.thorn.test"], |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let stale = Front::tls_with(expired.der(), &key.serialize_der(), None).await;
    for mode in ["verify-ca", "verify-full"] {
        let url = stale.url(
            &t,
            "db.thorn.test",
            &format!("sslmode={mode}&sslrootcert={ca}"),
        );
        let err = refused(&url).await;
        assert!(err.contains("certificate expired"), "{mode}: {err}");
    }
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_configured() {
    let t = TestDb::new().await;
    let authority = pki(&["db.thorn.test"]);
    let files = Files::new();
    let ca = files.write("ca.pem", &authority.ca_pem);
    let (cert, key) = authority.issue(&["thorn-daemon"]);
    let cert = files.write("client.pem", &cert.pem());
    let key = files.write("client.key", &key.serialize_pem());
    let front = Front::tls(&authority, Some(&authority)).await;
    let verified = format!("sslmode=verify-full&sslrootcert={ca}");

    let without = front.url(&t, "db.thorn.test", &verified);
    refused(&without).await;
    let with = front.url(
        &t,
        "db.thorn.test",
        &format!("{verified}&sslcert={cert}&sslkey={key}"),
    );
    connects(&with).await;
    assert!(
        front.seen().contains(&Seen::Tls {
            client_certificate: true
        }),
        "{:?}",
        front.seen()
    );

    // A key that is not the certificate's is a config error, found before
    // any connection.
    let (_, other_key) = authority.issue(&["someone-else"]);
    let other_key = files.write("other.key", &other_key.serialize_pem());
    let mismatched = front.url(
        &t,
        "db.thorn.test",
        &format!("{verified}&sslcert={cert}&sslkey={other_key}"),
    );
    let (code, _, err) = thorn_cli(&mismatched, &["check-config"]).await;
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("do not fit together"), "{err}");
}

#[tokio::test]
async fn require_needs_a_server_that_speaks_tls_and_prefer_goes_on_without() {
    let t = TestDb::new().await;
    let front = Front::plain().await;
    let err = refused(&front.url(&t, "db.thorn.test", "sslmode=require")).await;
    assert!(err.contains("server does not support TLS"), "{err}");
    for options in ["sslmode=prefer", "application_name=thorn-test"] {
        connects(&front.url(&t, "db.thorn.test", options)).await;
    }
    // disable never asks, even a front that would say yes.
    let authority = pki(&["db.thorn.test"]);
    let tls_front = Front::tls(&authority, None).await;
    let url = tls_front.url(&t, "db.thorn.test", "sslmode=disable");
    connects(&url).await;
    assert_eq!(tls_front.seen(), vec![Seen::Plain]);
}

/// The server's own TLS (OpenSSL on its side): used when it offers it, as
/// libpq's default `prefer` does, and never with `disable`.
#[tokio::test]
async fn the_servers_own_tls_is_used_when_offered() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let offered: String = db
        .query_one("SHOW ssl", &[])
        .await
        .expect("show ssl")
        .get(0);
    let over_tls = |url: String| async move {
        let c = thorn::db::connect(&url).await?;
        let row = c
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await?;
        Ok::<bool, tokio_postgres::Error>(row.get(0))
    };
    let joint = if t.url.contains('?') { '&' } else { '?' };
    let with = |options: &str| format!("{}{joint}{options}", t.url);
    let disabled = over_tls(with("sslmode=disable")).await.expect("disable");
    assert!(!disabled);
    let preferred = over_tls(t.url.clone()).await.expect("prefer");
    let required = over_tls(with("sslmode=require")).await;
    // Over the server's unix socket, when it is on this machine: no TLS is
    // asked for there, so even require connects (as libpq).
    let sockets: String = db
        .query_one("SHOW unix_socket_directories", &[])
        .await
        .expect("socket directories")
        .get(0);
    let socket = sockets.split(',').map(str::trim).find(|d| {
        let port = url::Url::parse(&t.url)
            .ok()
            .and_then(|u| u.port())
            .unwrap_or(5432);
        std::path::Path::new(d)
            .join(format!(".s.PGSQL.{port}"))
            .exists()
    });
    if let Some(dir) = socket {
        let url = t.url.replacen("127.0.0.1", &dir.replace('/', "%2F"), 1);
        let tls = over_tls(format!("{url}{joint}sslmode=require")).await;
        assert!(!tls.expect("require over the unix socket"));
    }
    if offered == "on" {
        assert!(preferred, "prefer did not use the server's TLS");
        assert!(required.expect("require"), "require without TLS");
    } else {
        assert!(!preferred);
        let error = required.expect_err("require without a server's TLS");
        assert!(
            thorn::db::Why(&error)
                .to_string()
                .contains("does not support TLS"),
            "{error}"
        );
    }
}
