//! The consumer snippets of docs/consumers.md (docs/examples/*), run as the
//! tiny servers they are against real deliveries from the daemon, then fed
//! tampered, re-signed and stale copies of a real delivery. A language whose
//! interpreter (or framework) is not installed is skipped with the reason
//! printed; nothing is faked.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::process::{Child, Command};

use crate::support::{
    article_table, free_port, unix_now, Daemon, Received, Receiver, TestDb, WAIT,
};

struct Snippet {
    name: &'static str,
    /// A command that succeeds when the snippet can run here.
    probe: &'static [&'static str],
    install: &'static str,
    /// The command, with `{port}` and `{dir}` replaced.
    run: &'static [&'static str],
    digest: &'static str,
    /// Time to start (a first `go run` compiles the standard library).
    startup: Duration,
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples")
}

async fn available(probe: &[&str]) -> bool {
    Command::new(probe[0])
        .args(&probe[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn spawn(s: &Snippet, port: u16, secret: &str) -> Child {
    let dir = examples().join(s.name);
    let args: Vec<String> = s
        .run
        .iter()
        .map(|a| {
            a.replace("{port}", &port.to_string())
                .replace("{dir}", &dir.to_string_lossy())
        })
        .collect();
    Command::new(&args[0])
        .args(&args[1..])
        .current_dir(&dir)
        .env("PORT", port.to_string())
        .env("THORN_SECRET", secret)
        .env("THORN_DIGEST", s.digest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("starting the {} snippet: {e}", s.name))
}

/// Waits for the snippet to listen, failing early if it exits.
async fn wait_listening(child: &mut Child, port: u16, within: Duration, name: &str) {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the {name} snippet exited before listening: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "the {name} snippet did not listen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Re-sends a captured delivery to the snippet with some headers replaced.
async fn replay(
    http: &reqwest::Client,
    url: &str,
    original: &Received,
    body: &[u8],
    changes: &[(&str, String)],
) -> StatusCode {
    let mut request = http.post(url).body(body.to_vec());
    for name in [
        "content-type",
        "hook-event",
        "hook-delivery",
        "hook-subscription",
        "hook-hmac",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
    ] {
        let value = changes
            .iter()
            .find(|(n, _)| *n == name)
            .map_or_else(|| original.header(name).to_owned(), |(_, v)| v.clone());
        request = request.header(name, value);
    }
    request.send().await.expect("replay").status()
}

/// What is sent, which headers change, and the answer expected.
type Case<'a> = (&'a str, Vec<u8>, Vec<(&'a str, String)>, StatusCode);

async fn check(s: Snippet) {
    if !available(s.probe).await {
        eprintln!(
            "SKIPPED: the {} consumer snippet: `{}` failed here; install with: {}",
            s.name,
            s.probe.join(" "),
            s.install
        );
        return;
    }
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    // A secret as the database makes them: Thorn's alphabet, punctuation too.
    let secret: String = db
        .query_one("SELECT thorn.random_secret()", &[])
        .await
        .expect("secret")
        .get(0);

    let port = free_port();
    let mut child = spawn(&s, port, &secret);
    wait_listening(&mut child, port, s.startup, s.name).await;
    let snippet_url = format!("http://127.0.0.1:{port}/hooks/thorn");

    let mut rx = Receiver::start().await;
    for (url, content_type) in [
        (snippet_url.as_str(), "application/json"),
        (snippet_url.as_str(), "application/x-www-form-urlencoded"),
        (rx.url("/copy").as_str(), "application/json"),
    ] {
        db.execute(
            "INSERT INTO thorn.subscriber (event, url, owner, hmac_secret, hmac_digest, content_type)
             VALUES ('article.*', $1, 'alice', $2, $3, $4)",
            &[&url, &secret, &s.digest, &content_type],
        )
        .await
        .expect("subscribe");
    }
    let daemon = Daemon::start(t.config());
    db.batch_execute(
        "INSERT INTO article (title, author) VALUES ('Grüße, \"quotes\" & a+b=c ✓', 'alice')",
    )
    .await
    .expect("insert");

    // The daemon's own deliveries to the snippet are answered 2xx.
    let deadline = Instant::now() + WAIT;
    let outcomes = loop {
        let rows = db
            .query(
                "SELECT d.state, d.status_code FROM thorn.delivery d
                 JOIN thorn.subscriber s ON s.id = d.subscriber_id WHERE s.url = $1",
                &[&snippet_url],
            )
            .await
            .expect("deliveries");
        let outcomes: Vec<(String, Option<i32>)> =
            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if outcomes.len() == 2 && outcomes.iter().all(|(_, code)| code.is_some()) {
            break outcomes;
        }
        assert!(
            Instant::now() < deadline,
            "{}: no answers yet: {outcomes:?}",
            s.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (state, code) in &outcomes {
        assert_eq!(
            (state.as_str(), *code),
            ("delivered", Some(204)),
            "{}: a real delivery was not accepted: {outcomes:?}",
            s.name
        );
    }

    // The same request, changed, must be refused.
    let got = rx.next(WAIT).await.expect("the copy of the delivery");
    let http = reqwest::Client::new();
    let body = got.body.to_vec();
    let id = got.header("webhook-id").to_owned();
    let resign = |ts: i64, body: &[u8]| {
        vec![
            ("webhook-timestamp", ts.to_string()),
            (
                "webhook-signature",
                thorn::sign::webhook_signature(&secret, &id, ts, body),
            ),
        ]
    };
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let digest: thorn::sign::Digest = s.digest.parse().expect("digest");
    let cases: Vec<Case> = vec![
        ("as delivered", body.clone(), vec![], StatusCode::NO_CONTENT),
        (
            "re-signed now",
            body.clone(),
            resign(unix_now(), &body),
            StatusCode::NO_CONTENT,
        ),
        (
            "body changed",
            tampered.clone(),
            vec![],
            StatusCode::UNAUTHORIZED,
        ),
        (
            "Hook-HMAC of another secret",
            body.clone(),
            vec![(
                "hook-hmac",
                thorn::sign::hook_hmac(digest, "not the secret", &body),
            )],
            StatusCode::UNAUTHORIZED,
        ),
        (
            "webhook-signature of another id",
            body.clone(),
            vec![(
                "webhook-signature",
                thorn::sign::webhook_signature(&secret, "other", unix_now(), &body),
            )],
            StatusCode::UNAUTHORIZED,
        ),
        (
            "correctly signed an hour ago",
            body.clone(),
            resign(unix_now() - 3600, &body),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "correctly signed an hour ahead",
            body.clone(),
            resign(unix_now() + 3600, &body),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no signatures",
            body.clone(),
            vec![
                ("hook-hmac", String::new()),
                ("webhook-signature", String::new()),
            ],
            StatusCode::UNAUTHORIZED,
        ),
    ];
    for (what, body, changes, expected) in cases {
        let status = replay(&http, &snippet_url, &got, &body, &changes).await;
        assert_eq!(status, expected, "{}: {what}", s.name);
    }
    daemon.stop().await;
    let _ = child.kill().await;
}

#[tokio::test]
async fn python_django_view_verifies_deliveries() {
    check(Snippet {
        name: "python",
        probe: &["python3", "-c", "import django"],
        install: "pip install -r docs/examples/python/requirements.txt",
        run: &["python3", "django_view.py"],
        digest: "sha256",
        startup: Duration::from_secs(30),
    })
    .await;
}

#[tokio::test]
async fn node_http_server_verifies_deliveries() {
    check(Snippet {
        name: "node",
        probe: &["node", "--version"],
        install: "apt-get install nodejs",
        run: &["node", "verify.js"],
        digest: "sha512",
        startup: Duration::from_secs(30),
    })
    .await;
}

#[tokio::test]
async fn ruby_sinatra_app_verifies_deliveries() {
    check(Snippet {
        name: "ruby",
        probe: &["ruby", "-e", "require 'sinatra/base'; require 'webrick'"],
        install: "apt-get install ruby ruby-sinatra ruby-webrick",
        run: &["ruby", "sinatra_app.rb"],
        digest: "sha1",
        startup: Duration::from_secs(30),
    })
    .await;
}

#[tokio::test]
async fn php_script_verifies_deliveries() {
    check(Snippet {
        name: "php",
        probe: &["php", "--version"],
        install: "apt-get install php-cli",
        run: &["php", "-S", "127.0.0.1:{port}", "verify.php"],
        digest: "sha384",
        startup: Duration::from_secs(30),
    })
    .await;
}

#[tokio::test]
async fn go_server_verifies_deliveries() {
    check(Snippet {
        name: "go",
        probe: &["go", "version"],
        install: "apt-get install golang-go",
        run: &["go", "run", "main.go"],
        digest: "sha224",
        startup: Duration::from_secs(240),
    })
    .await;
}

/// `thorn receive` (the demo's receiver) accepts real deliveries, with either
/// signer, and refuses a tampered one.
#[tokio::test]
async fn thorn_receive_verifies_real_deliveries() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE public.article (id serial PRIMARY KEY, title text);
         SELECT thorn.webhook_model('public.article');",
    )
    .await
    .expect("annotated table");
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_thorn"))
        .args(["--config", "/dev/null", "receive", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "--secret",
            "receive-secret",
            "--digest",
            "sha384",
            "--signer",
            "compat",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("thorn receive");
    wait_listening(&mut child, port, Duration::from_secs(20), "thorn receive").await;
    let url = format!("http://127.0.0.1:{port}/");
    db.execute(
        "INSERT INTO thorn.subscriber (event, url, hmac_secret, hmac_digest, hmac_signer)
         VALUES ('article.*', $1, 'receive-secret', 'sha384', 'compat')",
        &[&url],
    )
    .await
    .expect("subscribe");
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) VALUES ('hi')")
        .await
        .expect("insert");
    let deadline = Instant::now() + WAIT;
    loop {
        let code: Option<i32> = db
            .query_opt("SELECT status_code FROM thorn.delivery", &[])
            .await
            .expect("delivery")
            .and_then(|r| r.get(0));
        if let Some(code) = code {
            assert_eq!(code, 200);
            break;
        }
        assert!(Instant::now() < deadline, "no answer from thorn receive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let forged = reqwest::Client::new()
        .post(&url)
        .header("hook-hmac", "forged")
        .body("{}")
        .send()
        .await
        .expect("forged");
    assert_eq!(forged.status(), StatusCode::UNAUTHORIZED);
    daemon.stop().await;
    let _ = child.kill().await;
    let mut printed = String::new();
    if let Some(mut out) = child.stdout.take() {
        use tokio::io::AsyncReadExt;
        let _ =
            tokio::time::timeout(Duration::from_secs(5), out.read_to_string(&mut printed)).await;
    }
    assert!(printed.contains("✔ article.created"), "{printed}");
    assert!(printed.contains("✘"), "{printed}");
}
