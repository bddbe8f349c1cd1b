//! Delivery guarantees under failure, with real processes where the
//! guarantee is about processes: SIGKILL, lost connections, a database that
//! is not there yet, several daemons, SIGTERM.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::process::Process;
use crate::support::{eventually, subscribe, Received, Receiver, Reply, TestDb, QUIET, WAIT};

/// A TOML config for a daemon process on `t`, with extra lines for the
/// [delivery] section.
pub fn config(t: &TestDb, delivery: &str) -> String {
    config_for(&t.url, delivery)
}

fn config_for(url: &str, delivery: &str) -> String {
    format!(
        r#"
        database_url = "{url}"
        [dispatch]
        poll_interval = "1s"
        [delivery]
        connect_timeout = "1s"
        retry_schedule = ["100ms", "200ms", "400ms"]
        {delivery}
        [security]
        allow_networks = ["127.0.0.0/8"]
        "#
    )
}

async fn item_table(db: &Client) {
    db.batch_execute(
        "CREATE TABLE item (id serial PRIMARY KEY, n int NOT NULL);
         SELECT thorn.webhook_model('public.item');",
    )
    .await
    .expect("annotated table");
}

async fn insert_items(db: &Client, from: i32, to: i32) {
    db.execute(
        "INSERT INTO item (n) SELECT generate_series($1::int, $2::int)",
        &[&from, &to],
    )
    .await
    .expect("insert");
}

fn item(r: &Received) -> i64 {
    r.json()["data"]["n"].as_i64().expect("n")
}

/// Receives until every n in `expected` arrived; returns all requests.
async fn receive_all(
    rx: &mut Receiver,
    mut got: Vec<Received>,
    expected: usize,
    within: Duration,
) -> Vec<Received> {
    let deadline = Instant::now() + within;
    loop {
        let distinct: HashSet<i64> = got.iter().map(item).collect();
        if distinct.len() >= expected {
            return got;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.next(left).await {
            Some(r) => got.push(r),
            None => panic!("only {} of {expected} items arrived", distinct.len()),
        }
    }
}

async fn wait_all_delivered(db: &Client, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let delivered: i64 = db
            .query_one(
                "SELECT count(*) FROM thorn.delivery WHERE state = 'delivered'",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if delivered == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {n} deliveries recorded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the daemon has (re)made at least `n` connections.
async fn wait_for_connections(db: &Client, n: i64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let connected: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if connected >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {connected} connections came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigkill_mid_run_loses_nothing() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.otherwise(Reply {
        status: 200,
        delay: Duration::from_millis(30),
        ..Reply::default()
    });
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    insert_items(&db, 1, 300).await;
    let cfg = config(
        &t,
        r#"timeout = "1s"
        lease = "2s"
        concurrency = 8"#,
    );

    let mut first = Process::run(&cfg);
    let mut got = Vec::new();
    while got.len() < 50 {
        got.push(
            rx.next(WAIT)
                .await
                .unwrap_or_else(|| panic!("no deliveries:\n{}", first.log())),
        );
    }
    first.signal("KILL");
    first.wait(WAIT).await;

    let second = Process::run(&cfg);
    let got = receive_all(&mut rx, got, 300, Duration::from_secs(60)).await;
    wait_all_delivered(&db, 300).await;
    // Duplicates can only be deliveries the first daemon had not recorded
    // at the kill: requests in flight (at most the concurrency limit) and
    // answered ones whose outcomes were still being written, a batch that a
    // finished request leaves to the completer while its slot takes the
    // next. Twice the limit leaves room for one such batch.
    let ids: HashSet<&str> = got.iter().map(|r| r.header("hook-delivery")).collect();
    assert_eq!(ids.len(), 300, "one delivery per event");
    let duplicates = got.len() - ids.len();
    assert!(
        duplicates <= 2 * 8,
        "{duplicates} duplicates:\n{}",
        second.log()
    );
}

#[tokio::test]
async fn lost_connections_are_remade_and_nothing_is_lost() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    // A claim whose answer is lost with its connection waits for the lease.
    let mut daemon = Process::run(&config(
        &t,
        r#"timeout = "1s"
        lease = "3s""#,
    ));
    insert_items(&db, 1, 100).await;
    let mut got = Vec::new();
    while got.len() < 10 {
        got.push(rx.next(WAIT).await.expect("deliveries before the cut"));
    }
    for round in 0..2 {
        wait_for_connections(&db, 3).await;
        let terminated: i64 = db
            .query_one(
                "SELECT count(*) FROM (
                     SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()) AS t",
                &[],
            )
            .await
            .expect("terminate")
            .get(0);
        assert!(
            terminated >= 3,
            "round {round}: only {terminated} daemon connections"
        );
        insert_items(&db, 101 + round * 100, 200 + round * 100).await;
    }
    let got = receive_all(&mut rx, got, 300, Duration::from_secs(60)).await;
    assert!(got.len() >= 300);
    assert!(
        daemon.child_running(),
        "the daemon must survive lost connections:\n{}",
        daemon.log()
    );
    daemon.signal("TERM");
    assert!(daemon.wait(WAIT).await.success());
}

#[tokio::test]
async fn a_daemon_started_before_the_database_waits_for_it() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;

    // A port where nothing listens yet; later a proxy to the real server.
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
        probe.local_addr().expect("addr").port()
    };
    let mut unreachable = url::Url::parse(&t.url).expect("url");
    unreachable.set_host(Some("127.0.0.1")).expect("host");
    unreachable.set_port(Some(port)).expect("port");
    let daemon = Process::run(&config_for(unreachable.as_str(), ""));
    daemon.wait_for_log("cannot reach the database", WAIT).await;
    insert_items(&db, 1, 3).await;

    let real = url::Url::parse(&t.url).expect("url");
    let upstream = format!(
        "{}:{}",
        real.host_str().expect("host"),
        real.port().unwrap_or(5432)
    );
    let proxy = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("bind the proxy");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let got = rx.expect(3, Duration::from_secs(30), QUIET).await;
    let mut items: Vec<i64> = got.iter().map(item).collect();
    items.sort();
    assert_eq!(items, [1, 2, 3], "{}", daemon.log());
}

#[tokio::test]
async fn several_daemons_deliver_each_event_exactly_once() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let cfg = config(&t, "");
    let daemons: Vec<Process> = (0..3).map(|_| Process::run(&cfg)).collect();
    for chunk in 0..6 {
        insert_items(&db, chunk * 100 + 1, chunk * 100 + 100).await;
    }
    let got = rx
        .expect(600, Duration::from_secs(60), Duration::from_millis(500))
        .await;
    let items: HashSet<i64> = got.iter().map(item).collect();
    assert_eq!(items.len(), 600);
    let ids: HashSet<&str> = got.iter().map(|r| r.header("hook-delivery")).collect();
    assert_eq!(ids.len(), 600, "no delivery twice");
    wait_all_delivered(&db, 600).await;
    drop(daemons);
}

/// The items table with `items` rows captured, and one subscriber whose
/// endpoint answers 200 after `delay`: what the shutdown tests start from.
async fn slow_subscriber_with_items(t: &TestDb, delay: Duration, items: i32) -> (Client, Receiver) {
    let db = t.client().await;
    item_table(&db).await;
    let rx = Receiver::start().await;
    rx.otherwise(Reply {
        status: 200,
        delay,
        ..Reply::default()
    });
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    insert_items(&db, 1, items).await;
    (db, rx)
}

/// An outcome the database refuses for a moment is written again, not
/// dropped: dropped, its delivery would wait out its lease and be sent
/// twice. Here a row lock held past the daemon's `lock_timeout` refuses it;
/// a deadlock with a concurrent DELETE of events is the same case.
#[tokio::test]
async fn outcomes_refused_for_a_moment_are_written_again() {
    let t = TestDb::new().await;
    let (mut db, mut rx) = slow_subscriber_with_items(&t, Duration::from_millis(300), 1).await;
    db.batch_execute(
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET lock_timeout = %L', current_database(), '100ms');
         END $$",
    )
    .await
    .expect("lock_timeout for new sessions");
    let mut daemon = Process::run(&config(&t, r#"lease = "60s""#));
    rx.next(WAIT).await.expect("the request");
    // Claimed and committed; its outcome comes 300 ms later and must wait
    // for this lock.
    let lock = db.transaction().await.expect("begin");
    lock.execute("SELECT 1 FROM thorn.delivery FOR UPDATE", &[])
        .await
        .expect("row lock");
    daemon
        .wait_for_log("outcomes refused for now; writing them again", WAIT)
        .await;
    lock.commit().await.expect("commit");
    eventually(&db, "SELECT state = 'delivered' FROM thorn.delivery").await;
    assert!(rx.next(QUIET).await.is_none(), "sent again");
    daemon.signal("TERM");
    let status = daemon.wait(WAIT).await;
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
}

#[tokio::test]
async fn sigterm_lets_requests_finish_then_exits_zero() {
    let t = TestDb::new().await;
    let (db, mut rx) = slow_subscriber_with_items(&t, Duration::from_millis(700), 3).await;
    let mut daemon = Process::run(&config(&t, r#"timeout = "3s""#));
    rx.next(WAIT).await.expect("a request in flight");
    daemon.signal("TERM");
    let status = daemon.wait(WAIT).await;
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    let states: Vec<String> = db
        .query("SELECT state FROM thorn.delivery", &[])
        .await
        .expect("states")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, ["delivered"; 3], "{}", daemon.log());
}

#[tokio::test]
async fn requests_cut_off_by_shutdown_are_released_at_once() {
    let t = TestDb::new().await;
    let (db, mut rx) = slow_subscriber_with_items(&t, Duration::from_secs(20), 1).await;
    let mut daemon = Process::run(&config(
        &t,
        r#"timeout = "10s"
        lease = "60s"
        shutdown_grace = "300ms""#,
    ));
    rx.next(WAIT).await.expect("a request in flight");
    daemon.signal("TERM");
    let status = daemon.wait(WAIT).await;
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    // Not leased for another minute: due now, for the next daemon.
    let due: bool = db
        .query_one(
            "SELECT state = 'pending' AND next_attempt_at <= now() FROM thorn.delivery",
            &[],
        )
        .await
        .expect("delivery")
        .get(0);
    assert!(due, "{}", daemon.log());
}

/// A subscriber at its limit has more deliveries claimed and waiting in the
/// daemon, as many times its limit as the lease leaves timeouts for (here
/// two: a 30 s lease less a 10 s timeout); stopping does not start them,
/// and hands their leases back so that the next daemon need not wait a
/// lease for them.
#[tokio::test]
async fn deliveries_waiting_for_a_busy_subscriber_are_released_at_shutdown() {
    let t = TestDb::new().await;
    let (db, rx) = slow_subscriber_with_items(&t, Duration::from_secs(3), 10).await;
    let mut daemon = Process::run(&config(
        &t,
        r#"timeout = "10s"
        lease = "30s"
        per_subscriber_concurrency = 2
        shutdown_grace = "10s""#,
    ));
    // Two in flight and four waiting hold leases; four stay due.
    let leased = "SELECT count(*) FROM thorn.delivery
                  WHERE state = 'pending' AND next_attempt_at > now()";
    let deadline = Instant::now() + WAIT;
    loop {
        let n: i64 = db.query_one(leased, &[]).await.expect("count").get(0);
        if n == 6 {
            break;
        }
        assert!(n < 6, "{n} leased past the limit and its waiting line");
        assert!(Instant::now() < deadline, "{n} leased:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.signal("TERM");
    let status = daemon.wait(WAIT).await;
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
    assert_eq!(rx.max_in_flight(), 2);
    let rows = db
        .query(
            "SELECT state, next_attempt_at <= now() FROM thorn.delivery ORDER BY state",
            &[],
        )
        .await
        .expect("deliveries");
    let states: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let delivered = states.iter().filter(|(s, _)| s == "delivered").count();
    let due = states
        .iter()
        .filter(|(s, due)| s == "pending" && *due)
        .count();
    assert_eq!((delivered, due), (2, 8), "{states:?}\n{}", daemon.log());
}
