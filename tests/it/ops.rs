//! Operations: the systemd unit, the notify sequence of the real binary,
//! `check-config` on broken files, reloads, and /metrics scraped during a
//! delivery run and compared with the deliveries actually made.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;
use tokio_postgres::Client;

use crate::support::{
    free_port, http_get, sample, subscribe, Daemon, Receiver, TestDb, QUIET, WAIT,
};

const BIN: &str = env!("CARGO_BIN_EXE_thorn");

/// A directory for one test, removed afterwards.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let dir = std::env::temp_dir().join(format!("thorn-ops-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn article_table(db: &Client) {
    db.batch_execute(
        "CREATE TABLE public.article (id serial PRIMARY KEY, title text NOT NULL);
         SELECT thorn.webhook_model('public.article', reference => '/article/{id}/');",
    )
    .await
    .expect("annotated table");
}

fn systemd_analyze() -> Option<PathBuf> {
    ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// The unit with the binary under test in place of /usr/local/bin/thorn
/// (verify checks that the commands exist).
fn unit_for_test(dir: &TempDir) -> PathBuf {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/thorn.service"
    ))
    .expect("systemd/thorn.service");
    let path = dir.path("thorn.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/thorn", BIN)).expect("write unit");
    path
}

#[test]
fn the_unit_has_what_the_issue_asks() {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/thorn.service"
    ))
    .expect("systemd/thorn.service");
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ExecStartPre=/usr/local/bin/thorn check-config",
        "ExecStart=/usr/local/bin/thorn run",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
        "User=thorn",
    ] {
        assert!(unit.contains(line), "thorn.service lacks {line:?}");
    }
    let sysusers = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/thorn.sysusers"
    ))
    .expect("systemd/thorn.sysusers");
    assert!(sysusers.lines().any(|l| l.starts_with("u thorn ")));
}

#[test]
fn systemd_analyze_verifies_the_unit_and_rates_it_at_most_2() {
    let Some(analyze) = systemd_analyze() else {
        println!("skipped: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    let dir = TempDir::new();
    let unit = unit_for_test(&dir);
    let verify = std::process::Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze verify");
    let stderr = String::from_utf8_lossy(&verify.stderr);
    assert!(verify.status.success(), "systemd-analyze verify: {stderr}");
    assert!(
        !stderr.contains("thorn.service:"),
        "warnings about the unit: {stderr}"
    );

    let security = std::process::Command::new(&analyze)
        .args(["security", "--offline=true", "--threshold=20"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let out = String::from_utf8_lossy(&security.stdout);
    if !security.status.success() && out.is_empty() {
        println!(
            "skipped the exposure check: this systemd-analyze cannot rate offline: {}",
            String::from_utf8_lossy(&security.stderr)
        );
        return;
    }
    let score: f64 = out
        .lines()
        .find_map(|l| l.split("exposure level for thorn.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in: {out}"));
    println!("systemd-analyze security: {score}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{out}");
    assert!(security.status.success(), "threshold exceeded: {out}");
}

/// Every datagram the daemon sent, in order.
struct Notifications {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        Notifications {
            socket: UnixDatagram::bind(path).expect("bind the notify socket"),
            seen: Vec::new(),
        }
    }

    /// Reads datagrams until one satisfies `wanted` (panics after `within`).
    async fn until(&mut self, within: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        let mut buf = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.socket.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    self.seen.push(message.clone());
                    if wanted(&message) {
                        return message;
                    }
                }
                Ok(Err(e)) => panic!("notify socket: {e}"),
                Err(_) => panic!(
                    "no matching notification within {within:?}; saw {:#?}",
                    self.seen
                ),
            }
        }
    }

    fn position(&self, wanted: impl Fn(&str) -> bool) -> Option<usize> {
        self.seen.iter().position(|m| wanted(m))
    }
}

fn binary_config(t: &TestDb, extra: &str) -> String {
    format!(
        r#"
        database_url = "{}"
        [log]
        format = "json"
        level = "info"
        [dispatch]
        poll_interval = "1s"
        [delivery]
        timeout = "2s"
        connect_timeout = "1s"
        lease = "5s"
        retry_schedule = ["100ms"]
        shutdown_grace = "2s"
        [security]
        allow_networks = ["127.0.0.0/8"]
        {extra}
        "#,
        t.url
    )
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test]
async fn the_binary_tells_systemd_ready_status_watchdog_reloading_stopping() {
    let t = TestDb::empty().await;
    let dir = TempDir::new();
    let config = dir.path("thorn.toml");
    std::fs::write(&config, binary_config(&t, "")).expect("config");
    let mut notes = Notifications::bind(&dir.path("notify.sock"));
    let log = std::fs::File::create(dir.path("stderr.log")).expect("log file");
    // systemd sets WATCHDOG_PID to the service's pid: exec keeps the shell's.
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", r#"WATCHDOG_PID=$$ exec "$0" --config "$1" run"#, BIN])
        .arg(&config)
        .env("NOTIFY_SOCKET", dir.path("notify.sock"))
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("RUST_LOG")
        .env_remove("THORN_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .expect("start thorn run");
    let pid = child.id().expect("pid");

    // READY=1 comes with the database migrated and LISTEN active.
    let ready = notes.until(WAIT, |m| m.contains("READY=1")).await;
    assert!(ready.contains("STATUS=running"), "{ready}");
    let db = t.client().await;
    let version: i32 = db
        .query_one("SELECT max(version) FROM thorn.migration", &[])
        .await
        .expect("migrated before READY")
        .get(0);
    assert_eq!(version, thorn::db::migrate::latest());
    let listeners: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query = 'LISTEN thorn'",
            &[],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert!(listeners >= 1, "READY before LISTEN");
    assert!(
        notes.position(|m| m.contains("STATUS=connecting to the database"))
            < notes.position(|m| m.contains("READY=1")),
        "{:#?}",
        notes.seen
    );

    // The watchdog is fed (every 0.5 s for WATCHDOG_USEC = 1 s) after READY.
    let started = Instant::now();
    notes
        .until(Duration::from_secs(5), |m| m == "WATCHDOG=1\n")
        .await;
    notes
        .until(Duration::from_secs(5), |m| m == "WATCHDOG=1\n")
        .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let running = |m: &str| m.contains("STATUS=running, listening");
    if notes.position(running).is_none() {
        notes.until(Duration::from_secs(5), running).await;
    }

    // One structured line per failed attempt, without the secret or body.
    let mut rx = Receiver::start().await;
    article_table(&db).await;
    let secret = "sekrit-that-must-not-be-logged";
    let sub = subscribe(&db, "article.*", &rx.url("/hook"), None, secret).await;
    rx.respond_with(&[500]);
    db.batch_execute("INSERT INTO article (title) VALUES ('body-marker-7f3a')")
        .await
        .expect("insert");
    rx.expect(2, WAIT, QUIET).await;

    // SIGHUP: a new log level and a metrics endpoint, applied at run time.
    let port = free_port();
    std::fs::write(
        &config,
        binary_config(&t, &format!("[metrics]\nlisten = \"127.0.0.1:{port}\""))
            .replace("level = \"info\"", "level = \"debug\""),
    )
    .expect("config");
    signal(pid, "HUP");
    notes.until(WAIT, |m| m.contains("RELOADING=1")).await;
    let reloaded = notes.until(WAIT, |m| m.contains("READY=1")).await;
    assert!(
        reloaded.contains("log.level") && reloaded.contains("metrics.listen"),
        "{reloaded}"
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    assert_eq!(http_get(addr, "/readyz").await, (200, "ready\n".into()));
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        sample(&text, r#"thorn_config_reloads_total{result="ok"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"thorn_delivery_attempts_total{outcome="delivered",class="ok"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            r#"thorn_delivery_attempts_total{outcome="retry",class="http_status"}"#
        ),
        1.0
    );

    // A bad config is refused as a whole; the daemon keeps running.
    std::fs::write(
        &config,
        binary_config(&t, "[metrics]\nlisten = \"nowhere\""),
    )
    .expect("config");
    signal(pid, "HUP");
    notes.until(WAIT, |m| m.contains("RELOADING=1")).await;
    let refused = notes.until(WAIT, |m| m.contains("READY=1")).await;
    assert!(refused.contains("reload refused"), "{refused}");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "died on a bad reload"
    );
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(
        sample(&text, r#"thorn_config_reloads_total{result="failed"}"#),
        1.0
    );

    // A good config whose change fails (the port is taken) says so.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a taken port");
    let taken_at = taken.local_addr().expect("addr");
    std::fs::write(
        &config,
        binary_config(&t, &format!("[metrics]\nlisten = \"{taken_at}\""))
            .replace("level = \"info\"", "level = \"debug\""),
    )
    .expect("config");
    signal(pid, "HUP");
    notes.until(WAIT, |m| m.contains("RELOADING=1")).await;
    let failed = notes.until(WAIT, |m| m.contains("READY=1")).await;
    assert!(
        failed.contains("reload failed for metrics.listen"),
        "{failed}"
    );
    assert_eq!(
        http_get(addr, "/readyz").await.0,
        200,
        "the old endpoint stays"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    signal(pid, "TERM");
    notes.until(WAIT, |m| m.contains("STOPPING=1")).await;
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("exits within the grace period")
        .expect("wait");
    assert!(status.success(), "{status}");
    let first_watchdog = notes.position(|m| m == "WATCHDOG=1\n").expect("watchdog");
    let first_ready = notes.position(|m| m.contains("READY=1")).expect("ready");
    assert!(first_ready < first_watchdog, "{:#?}", notes.seen);
    assert!(
        notes.seen.last().is_some_and(|m| m.contains("STOPPING=1")),
        "{:#?}",
        notes.seen
    );

    let stderr = std::fs::read_to_string(dir.path("stderr.log")).expect("log");
    assert!(!stderr.contains(secret), "the secret reached the log");
    assert!(
        !stderr.contains("body-marker-7f3a"),
        "the body reached the log"
    );
    let failure: serde_json::Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "delivery failed")
        .unwrap_or_else(|| panic!("no 'delivery failed' line in:\n{stderr}"));
    let fields = &failure["fields"];
    assert_eq!(fields["subscriber"], sub.to_string());
    assert_eq!(fields["attempt"], 1);
    assert_eq!(fields["error_class"], "http_status");
    uuid::Uuid::parse_str(fields["delivery_id"].as_str().expect("delivery_id")).expect("a uuid");
    assert!(
        stderr.lines().any(|l| l.contains(r#""level":"DEBUG""#)),
        "log.level=debug was not applied on reload"
    );
}

#[tokio::test]
async fn metrics_count_the_deliveries_actually_made() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.respond_with(&[500, 503]);
    subscribe(&db, "article.*", &rx.url("/good"), None, "s1-secret").await;
    // Not in the test allow-list: refused by the guard, dead at once.
    subscribe(
        &db,
        "article.created",
        "http://10.255.255.1/hook",
        None,
        "s2-secret",
    )
    .await;
    let off = subscribe(&db, "other.*", &rx.url("/off"), None, "s3-secret").await;
    db.execute(
        "UPDATE thorn.subscriber SET active = false WHERE id = $1",
        &[&off],
    )
    .await
    .expect("deactivate");

    let (daemon, addr) = daemon_with_endpoint(t.config(), Duration::from_millis(200)).await;
    readyz_until(addr, |status, _| status == 200, "never ready").await;
    assert_eq!(http_get(addr, "/healthz").await, (200, "ok\n".into()));

    for i in 0..5 {
        db.execute(
            "INSERT INTO article (title) VALUES ($1)",
            &[&format!("t{i}")],
        )
        .await
        .expect("insert");
    }
    // During the run: never more successes counted than requests received.
    let (_, during) = http_get(addr, "/metrics").await;
    assert!(
        sample(
            &during,
            r#"thorn_delivery_attempts_total{outcome="delivered",class="ok"}"#
        ) <= 5.0
    );

    let received = rx.expect(7, WAIT, QUIET).await;
    assert_eq!(received.len(), 7, "2 failures and 5 successes");

    // Wait for the outcomes to be written and the gauges refreshed.
    let deadline = Instant::now() + WAIT;
    let (delivered, dead, attempts) = loop {
        let row = db
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'delivered'), count(*) FILTER (WHERE state = 'dead'),
                        coalesce(sum(attempts), 0)::int8, count(*) FILTER (WHERE state = 'pending')
                 FROM thorn.delivery",
                &[],
            )
            .await
            .expect("deliveries");
        let pending: i64 = row.get(3);
        if pending == 0 {
            break (
                row.get::<_, i64>(0) as f64,
                row.get::<_, i64>(1) as f64,
                row.get::<_, i64>(2) as f64,
            );
        }
        assert!(Instant::now() < deadline, "deliveries still pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, text) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let m = |series: &str| sample(&text, series);
    assert_eq!(delivered, 5.0);
    assert_eq!(dead, 5.0);
    assert_eq!(
        m(r#"thorn_delivery_attempts_total{outcome="delivered",class="ok"}"#),
        delivered,
        "{text}"
    );
    assert_eq!(
        m(r#"thorn_delivery_attempts_total{outcome="retry",class="http_status"}"#),
        2.0
    );
    assert_eq!(
        m(r#"thorn_delivery_attempts_total{outcome="dead",class="blocked"}"#),
        dead
    );
    let all_attempts: f64 = text
        .lines()
        .filter(|l| l.starts_with("thorn_delivery_attempts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        all_attempts, attempts,
        "attempts counted vs attempts recorded"
    );
    assert_eq!(m("thorn_delivery_request_duration_seconds_count"), attempts);
    // The guard refuses before any request: only the receiver's requests
    // plus the refusals were attempts.
    assert_eq!(attempts, received.len() as f64 + dead);
    assert_eq!(m("thorn_commit_to_delivery_seconds_count"), delivered);
    assert_eq!(m("thorn_events_dispatched_total"), 5.0);
    assert_eq!(m("thorn_deliveries_created_total"), 10.0);
    assert_eq!(m("thorn_events_captured"), 5.0);
    assert_eq!(m("thorn_events_pending"), 0.0);
    assert_eq!(m("thorn_events_above_horizon"), 0.0, "{text}");
    assert_eq!(m("thorn_deliveries_due"), 0.0);
    assert_eq!(m("thorn_deliveries_pending"), 0.0);
    assert_eq!(m("thorn_oldest_pending_event_age_seconds"), 0.0);
    assert_eq!(m("thorn_subscribers_active"), 2.0);
    assert_eq!(m("thorn_subscribers_deactivated"), 1.0);
    assert_eq!(m("thorn_database_up"), 1.0);
    assert_eq!(m("thorn_listening"), 1.0);
    assert_eq!(m("thorn_healthy"), 1.0);
    // Bounded labels: nothing per URL or subscriber.
    assert!(
        !text.contains("127.0.0.1") && !text.contains("10.255"),
        "{text}"
    );
    assert!(
        text.lines()
            .filter(|l| l.starts_with("thorn_delivery_attempts_total{"))
            .count()
            <= 30
    );
    daemon.stop().await;
}

#[tokio::test]
async fn readyz_says_why_while_the_database_is_unreachable() {
    let config = thorn::config::Config::load(
        Some(&format!(
            "database_url = \"postgres://thorn@127.0.0.1:{}/none\"",
            free_port()
        )),
        &Default::default(),
    )
    .expect("config");
    let (daemon, addr) = daemon_with_endpoint(config, Duration::from_millis(100)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        http_get(addr, "/healthz").await.0,
        200,
        "alive while waiting"
    );
    let (status, body) = http_get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.contains("starting") && body.contains("database unreachable"),
        "{body}"
    );
    let (_, text) = http_get(addr, "/metrics").await;
    assert_eq!(sample(&text, "thorn_database_up"), 0.0);
    daemon.stop().await;
}

fn check_config(file: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    let dir = TempDir::new();
    let path = dir.path("thorn.toml");
    std::fs::write(&path, file).expect("config");
    let mut command = std::process::Command::new(BIN);
    command
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("THORN_")) {
        command.env_remove(k);
    }
    command.envs(env.iter().copied());
    let out = command.output().expect("run check-config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_prints_every_problem_with_its_key_and_exits_64() {
    let (code, _, stderr) = check_config(
        r#"
        unknown_key = 1
        [delivery]
        timeout = "soon"
        retry_schedule = ["5s", "later"]
        lease = "1s"
        [security]
        allow_networks = ["10.0.0.0/8", "10.0.0.0/33", "bogus"]
        [metrics]
        listen = "localhost"
        [retention]
        interval = "0s"
        "#,
        &[("THORN_DISPATCH__BATCH_SIZE", "many"), ("THORN_NOPE", "1")],
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
    for key in [
        "unknown_key: unknown key",
        "delivery.timeout:",
        "delivery.retry_schedule:",
        "delivery.lease:",
        "security.allow_networks: \"10.0.0.0/33\"",
        "security.allow_networks: \"bogus\"",
        "metrics.listen:",
        "retention.interval:",
        "dispatch.batch_size:",
        "(set by THORN_DISPATCH__BATCH_SIZE)",
        "nope: unknown key (set by THORN_NOPE)",
    ] {
        assert!(stderr.contains(key), "{key:?} missing in:\n{stderr}");
    }

    let (code, stdout, stderr) = check_config("[delivery]\ntimeout = \"1s\"\n", &[], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("config ok"));

    // The subcommands' own variables and the consumer examples' are not
    // config keys: they may share the daemon's environment.
    let (code, stdout, stderr) = check_config(
        "",
        &[
            ("THORN_SIGN_SECRET", "s"),
            ("THORN_RECEIVE_SECRET", "s"),
            ("THORN_SUBSCRIBER_SECRET", "s"),
            ("THORN_IMPORT_SOURCE_URL", "postgres://localhost/django"),
            ("THORN_SECRET", "s"),
            ("THORN_DIGEST", "sha256"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("config ok"));

    let (code, _, stderr) = check_config("[delivery\n", &[], &[]);
    assert_eq!(code, 64, "{stderr}");
}

#[test]
fn check_config_database_flag_warns_or_fails() {
    let unreachable = format!(
        "database_url = \"postgres://thorn@127.0.0.1:{}/x\"\n",
        free_port()
    );
    let (code, stdout, stderr) = check_config(&unreachable, &[], &["--database", "warn"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("warning: database_url: cannot reach the database"),
        "{stderr}"
    );
    assert!(stdout.contains("config ok"));
    let (code, _, stderr) = check_config(&unreachable, &[], &["--database", "require"]);
    assert_eq!(code, 69, "{stderr}");
    assert!(stderr.contains("error: database_url"), "{stderr}");
    let reachable = format!("database_url = \"{}\"\n", crate::support::base_url());
    let (code, stdout, stderr) = check_config(&reachable, &[], &["--database", "require"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("database reachable"), "{stdout}");
}

/// A server warning on one of thorn's connections (a migration's RAISE
/// WARNING about a table it could not upgrade, say) is logged as a
/// warning, so `log.level = "warn"` still shows it; a notice stays at info.
#[tokio::test]
async fn server_warnings_are_logged_as_warnings() {
    let t = TestDb::new().await;
    let logs = crate::support::captured_logs();
    let client = thorn::db::connect(&t.url).await.expect("connect");
    client
        .batch_execute(
            "DO $$ BEGIN RAISE WARNING 'warning-canary-5e2'; RAISE NOTICE 'notice-canary-5e2'; END $$",
        )
        .await
        .expect("raise");
    // The notices arrive before the statement's end, on the same stream.
    let text = logs.text();
    let line = |canary: &str| {
        text.lines()
            .find(|l| l.contains(canary))
            .unwrap_or_else(|| panic!("{canary} not logged:\n{text}"))
            .to_owned()
    };
    let level = |canary: &str| line(canary).split_whitespace().nth(1).map(str::to_owned);
    assert_eq!(
        level("warning-canary-5e2").as_deref(),
        Some("WARN"),
        "{text}"
    );
    assert_eq!(
        level("notice-canary-5e2").as_deref(),
        Some("INFO"),
        "{text}"
    );
}

/// A lock on thorn's tables blocks the monitor's backlog query past its
/// timeout. The query must end on the server too: a monitor that only gave
/// up on it and connected anew left one blocked backend behind every round,
/// enough to use up `max_connections` under a long lock.
#[tokio::test]
async fn a_blocked_monitor_query_leaves_no_backend_behind() {
    let t = TestDb::new().await;
    let mut locker = t.client().await;
    let db = t.client().await;
    let daemon = Daemon::start_with(
        t.config(),
        thorn::ops::Ops {
            monitor_interval: Some(Duration::from_millis(200)),
            ..Default::default()
        },
    );
    let monitor_queries = "SELECT count(*) FROM pg_stat_activity
        WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid()
          AND query LIKE '%pg_sequence_last_value(pg_get_serial_sequence(%'";
    crate::support::eventually(
        &db,
        "SELECT count(*) > 0 FROM pg_stat_activity
         WHERE datname = current_database() AND query = 'LISTEN thorn'",
    )
    .await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE thorn.delivery IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    // Three monitor timeouts (5 s each) and more.
    let until = Instant::now() + Duration::from_secs(16);
    let mut most = 0;
    while Instant::now() < until {
        let blocked: i64 = db
            .query_one(monitor_queries, &[])
            .await
            .expect("pg_stat_activity")
            .get(0);
        most = most.max(blocked);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    lock.rollback().await.expect("release");
    assert!(most >= 1, "the monitor's query was never seen blocked");
    // One blocked at a time; two only while a cancel is on its way.
    assert!(most <= 2, "{most} monitor queries blocked at once");
    daemon.stop().await;
}

/// A database that refuses the tasks' statements (here: read-only) is not
/// "ready", and /readyz says why, while the daemon stays alive and
/// retrying; once the database takes writes again it is ready again.
#[tokio::test]
async fn a_database_that_refuses_every_statement_is_not_ready() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let alter = |setting: &str| {
        format!(
            "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I {setting}', current_database()); END $$"
        )
    };
    db.batch_execute(&alter("SET default_transaction_read_only = on"))
        .await
        .expect("read-only");
    let (daemon, addr) = daemon_with_endpoint(t.config(), Duration::from_millis(200)).await;
    readyz_until(
        addr,
        |status, body| status == 503 && body.contains("statements: cannot execute"),
        "never said so",
    )
    .await;
    assert_eq!(http_get(addr, "/healthz").await.0, 200, "alive, retrying");

    db.batch_execute(&alter("RESET default_transaction_read_only"))
        .await
        .expect("writable");
    readyz_until(addr, |status, _| status == 200, "never ready again").await;
    daemon.stop().await;
}

/// The daemon with its health and metrics endpoint on a free port, the
/// monitor looking every `monitor` instead of every 5 s.
async fn daemon_with_endpoint(
    config: thorn::config::Config,
    monitor: Duration,
) -> (Daemon, SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let daemon = Daemon::start_with(
        config,
        thorn::ops::Ops {
            metrics_listener: Some(listener),
            monitor_interval: Some(monitor),
            ..Default::default()
        },
    );
    (daemon, addr)
}

/// Waits until `/readyz` answers as `wanted` says (panics with `why`
/// after the usual wait).
async fn readyz_until(addr: SocketAddr, wanted: impl Fn(u16, &str) -> bool, why: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = http_get(addr, "/readyz").await;
        if wanted(status, &body) {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first start on a new database warns about nothing: the monitor's
/// first look may come before start-up has made thorn's tables.
#[tokio::test]
async fn a_first_start_on_a_new_database_warns_about_nothing() {
    let t = TestDb::empty().await;
    let mut daemon = crate::process::Process::run(&binary_config(&t, ""));
    daemon.wait_for_log("ready", WAIT).await;
    daemon.stop_cleanly(WAIT).await;
    let log = daemon.log();
    assert!(log.contains("applied migration"), "{log}");
    assert!(!log.contains(r#""level":"WARN""#), "{log}");
}
