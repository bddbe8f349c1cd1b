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
    refused_for_a_moment("lock_timeout", "100ms").await;
}

/// The same with `statement_timeout` (57014, query canceled): the statement
/// waited too long for the row lock, and may succeed once it is released.
#[tokio::test]
async fn outcomes_cut_off_by_statement_timeout_are_written_again() {
    refused_for_a_moment("statement_timeout", "500ms").await;
}

/// The delivery's outcome comes while a row lock outlasts `setting` (set
/// for the daemon's sessions): refused, then written once the lock goes.
async fn refused_for_a_moment(setting: &str, value: &str) {
    let t = TestDb::new().await;
    let (mut db, mut rx) = slow_subscriber_with_items(&t, Duration::from_millis(300), 1).await;
    db.batch_execute(&format!(
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET {setting} = %L', current_database(), '{value}');
         END $$"
    ))
    .await
    .expect("a timeout for new sessions");
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
    daemon.stop_cleanly(WAIT).await;
}

/// A statement cut off with its session (57P01, terminated by an
/// administrator) means a lost connection, however the error reads: the
/// outcomes are written again on a new one, not given up as refused.
#[tokio::test]
async fn outcomes_cut_off_with_their_session_are_written_after_reconnecting() {
    let t = TestDb::new().await;
    let (mut db, mut rx) = slow_subscriber_with_items(&t, Duration::from_millis(300), 1).await;
    let watcher = t.client().await;
    let mut daemon = Process::run(&config(&t, r#"lease = "60s""#));
    rx.next(WAIT).await.expect("the request");
    let lock = db.transaction().await.expect("begin");
    lock.execute("SELECT 1 FROM thorn.delivery FOR UPDATE", &[])
        .await
        .expect("row lock");
    // The completer's write, waiting for the lock.
    let waiting = "FROM pg_stat_activity
                   WHERE datname = current_database() AND wait_event_type = 'Lock'
                     AND query LIKE '%UPDATE thorn.delivery d SET%state = u.state%'";
    eventually(&watcher, &format!("SELECT EXISTS (SELECT 1 {waiting})")).await;
    watcher
        .execute(&format!("SELECT pg_terminate_backend(pid) {waiting}"), &[])
        .await
        .expect("terminate the completer's session");
    lock.commit().await.expect("commit");
    eventually(&db, "SELECT state = 'delivered' FROM thorn.delivery").await;
    assert!(rx.next(QUIET).await.is_none(), "sent again");
    daemon.stop_cleanly(WAIT).await;
}

/// One outcome the database refuses for good (here a trigger refuses the
/// delivery of item 4) costs only its own row: the others written in the
/// same statement are written on their own.
#[tokio::test]
async fn an_outcome_refused_for_good_costs_only_its_own_row() {
    let t = TestDb::new().await;
    let (mut db, mut rx) = slow_subscriber_with_items(&t, Duration::ZERO, 1).await;
    db.batch_execute(
        "CREATE FUNCTION public.refuse_item_4() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF (SELECT e.data->>'n' FROM thorn.event e WHERE e.id = NEW.event_id) = '4' THEN
                 RAISE EXCEPTION 'item 4 refused' USING ERRCODE = 'check_violation';
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER refuse_item_4 BEFORE UPDATE ON thorn.delivery
         FOR EACH ROW WHEN (NEW.attempts > OLD.attempts) EXECUTE FUNCTION public.refuse_item_4();",
    )
    .await
    .expect("a trigger");
    let watcher = t.client().await;
    let lock = stall_completer(&mut db).await;
    let mut daemon = Process::run(&config(&t, r#"lease = "60s""#));
    rx.next(WAIT).await.expect("item 1");
    // Item 1 written, the completer waits for the lock: the outcomes of
    // items 2 to 6 gather meanwhile, and are written in one statement.
    eventually(&watcher, COMPLETER_STALLED).await;
    insert_items(&watcher, 2, 6).await;
    rx.expect(5, WAIT, Duration::from_secs(1)).await;
    lock.commit().await.expect("commit");
    eventually(
        &watcher,
        "SELECT count(*) = 5 FROM thorn.delivery WHERE state = 'delivered'",
    )
    .await;
    daemon
        .wait_for_log("the database refused delivery outcomes", WAIT)
        .await;
    let refused: (String, i32) = watcher
        .query_one(
            "SELECT d.state, d.attempts FROM thorn.delivery d JOIN thorn.event e ON e.id = d.event_id
             WHERE e.data->>'n' = '4'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("item 4");
    assert_eq!(refused, ("pending".to_owned(), 0), "left to its lease");
    daemon.stop_cleanly(WAIT).await;
}

/// Only the claim holding a delivery's lease writes its outcome. Here the
/// test takes the delivery over while its request runs (as another daemon's
/// claim would once the lease ran out): the late outcome must not mark it
/// delivered, nor undo that claim's lease.
#[tokio::test]
async fn an_outcome_whose_lease_was_taken_over_is_not_written() {
    let t = TestDb::new().await;
    let (db, mut rx) = slow_subscriber_with_items(&t, Duration::from_secs(2), 1).await;
    let mut daemon = Process::run(&config(
        &t,
        r#"timeout = "5s"
        lease = "20s""#,
    ));
    rx.next(WAIT).await.expect("the request");
    db.execute(
        "UPDATE thorn.delivery SET next_attempt_at = now() + interval '1 hour'",
        &[],
    )
    .await
    .expect("taken over");
    daemon
        .wait_for_log("another claim took their leases over", WAIT)
        .await;
    let (state, attempts, leased): (String, i32, bool) = db
        .query_one(
            "SELECT state, attempts, next_attempt_at > now() + interval '50 minutes'
             FROM thorn.delivery",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .expect("delivery");
    assert_eq!((state.as_str(), attempts, leased), ("pending", 0, true));
    daemon.stop_cleanly(WAIT).await;
}

/// Stalls the completer of a daemon started next, after its first write:
/// with the subscribers marked failing, a success makes it clear their
/// `failing_since`, and the transaction returned holds those rows. (NO KEY
/// UPDATE leaves new deliveries' foreign-key checks free to go on.)
async fn stall_completer(db: &mut Client) -> tokio_postgres::Transaction<'_> {
    db.batch_execute("UPDATE thorn.subscriber SET failing_since = now()")
        .await
        .expect("failing");
    let lock = db.transaction().await.expect("begin");
    lock.execute("SELECT 1 FROM thorn.subscriber FOR NO KEY UPDATE", &[])
        .await
        .expect("row lock");
    lock
}

/// The completer waits for the lock of [`stall_completer`].
const COMPLETER_STALLED: &str = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock'
      AND query LIKE '%UPDATE thorn.subscriber SET failing_since = NULL%')";

/// No pending delivery is leased any more: every claim's lease ran out.
const LEASES_RAN_OUT: &str = "SELECT NOT EXISTS (SELECT 1 FROM thorn.delivery
    WHERE state = 'pending' AND next_attempt_at > now())";

/// The delivery settings of [`stuck_behind_a_stalled_completer`]: one
/// request at a time to the subscriber, 4 slots, a 1 s timeout and a 4 s
/// lease, so that the subscriber has a line.
const LINE_OF_ONE: &str = r#"timeout = "1s"
    lease = "4s"
    concurrency = 4
    per_subscriber_concurrency = 1"#;

/// Waits until the daemon's sender is stuck behind a completer that
/// [`stall_completer`] stalled: its outcome channel (4 slots' worth, 16)
/// is full, and the request that found it full waits there, with its
/// subscriber's next deliveries claimed and waiting in line behind it.
/// Returns once every lease has run out (so no claim came for a lease).
async fn stuck_behind_a_stalled_completer(watcher: &Client, rx: &mut Receiver, daemon: &Process) {
    // The first write, the channel, and the request that waits.
    for _ in 0..18 {
        rx.next(WAIT)
            .await
            .unwrap_or_else(|| panic!("too few requests:\n{}", daemon.log()));
    }
    eventually(watcher, LEASES_RAN_OUT).await;
}

/// A delivery waiting in line is judged fresh right before it is sent, not
/// before the outcome of the request ahead of it is handed over: with the
/// completer stalled past the lease, the deliveries waiting behind it were
/// taken over (here by the test, as another daemon's claim would), and the
/// sender must not send them on their old claim.
#[tokio::test]
async fn deliveries_waiting_behind_a_stalled_completer_are_not_sent_on_an_old_lease() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let watcher = t.client().await;
    insert_items(&watcher, 1, 60).await;
    let lock = stall_completer(&mut db).await;
    let mut daemon = Process::run(&config(&t, LINE_OF_ONE));
    stuck_behind_a_stalled_completer(&watcher, &mut rx, &daemon).await;
    watcher
        .execute(
            "UPDATE thorn.delivery SET next_attempt_at = now() + interval '1 hour'
             WHERE state = 'pending'",
            &[],
        )
        .await
        .expect("taken over");
    while rx.next(Duration::from_millis(100)).await.is_some() {}
    lock.commit().await.expect("commit");
    if let Some(late) = rx.next(Duration::from_secs(2)).await {
        panic!(
            "sent after its lease was taken over: {}\n{}",
            late.header("hook-delivery"),
            daemon.log()
        );
    }
    daemon
        .wait_for_log("deliveries waited too long", WAIT)
        .await;
    daemon.stop_cleanly(WAIT).await;
}

/// SIGTERM while the completer cannot write: the request waiting to hand
/// its outcome over gives up at the end of the grace (the lease brings the
/// delivery back), and shutdown goes on to release the deliveries waiting
/// in line, rather than waiting for the completer for ever.
#[tokio::test]
async fn sigterm_does_not_wait_for_ever_on_a_stalled_completer() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let watcher = t.client().await;
    insert_items(&watcher, 1, 60).await;
    let lock = stall_completer(&mut db).await;
    let mut daemon = Process::run(&config(
        &t,
        &format!("{LINE_OF_ONE}\nshutdown_grace = \"1s\""),
    ));
    stuck_behind_a_stalled_completer(&watcher, &mut rx, &daemon).await;
    daemon.signal("TERM");
    daemon
        .wait_for_log("deliveries unfinished at shutdown were released", WAIT)
        .await;
    lock.commit().await.expect("commit");
    let status = daemon.wait(WAIT).await;
    assert!(status.success(), "exit {status:?}:\n{}", daemon.log());
}

#[tokio::test]
async fn sigterm_lets_requests_finish_then_exits_zero() {
    let t = TestDb::new().await;
    let (db, mut rx) = slow_subscriber_with_items(&t, Duration::from_millis(700), 3).await;
    let mut daemon = Process::run(&config(&t, r#"timeout = "3s""#));
    rx.next(WAIT).await.expect("a request in flight");
    daemon.stop_cleanly(WAIT).await;
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
    daemon.stop_cleanly(WAIT).await;
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
/// two: a 40 s lease less a 10 s timeout and a 4 s margin leaves 26 s);
/// stopping does not start them,
/// and hands their leases back so that the next daemon need not wait a
/// lease for them.
#[tokio::test]
async fn deliveries_waiting_for_a_busy_subscriber_are_released_at_shutdown() {
    let t = TestDb::new().await;
    let (db, rx) = slow_subscriber_with_items(&t, Duration::from_secs(3), 10).await;
    let mut daemon = Process::run(&config(
        &t,
        r#"timeout = "10s"
        lease = "40s"
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
    daemon.stop_cleanly(WAIT).await;
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

/// A client that never finishes its request to the API must not keep the
/// daemon from stopping: the API's open connections get a bounded wait.
#[tokio::test]
async fn sigterm_does_not_wait_for_ever_on_a_half_sent_api_request() {
    use tokio::io::AsyncWriteExt;
    let t = TestDb::new().await;
    let port = crate::support::free_port();
    let mut daemon = Process::run(&config(
        &t,
        &format!(
            "[api]\nlisten = \"127.0.0.1:{port}\"\njwt_secret = \"0123456789abcdef0123456789abcdef\""
        ),
    ));
    crate::support::wait_for_port(port).await;
    let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    socket
        .write_all(b"POST /hooks/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        .await
        .expect("half a request");
    daemon.stop_cleanly(WAIT).await;
    drop(socket);
}

/// SIGTERM while a lock on thorn's tables blocks the daemon's statements:
/// it stops within its grace and a few seconds, not when the lock goes.
#[tokio::test]
async fn sigterm_while_the_database_blocks_the_tasks_still_stops() {
    let t = TestDb::new().await;
    let mut locker = t.client().await;
    let db = t.client().await;
    let mut daemon = Process::run(&config(&t, "shutdown_grace = \"2s\""));
    daemon
        .wait_for_log("thorn is running", Duration::from_secs(20))
        .await;
    // Not before the sender has prepared its statements and looked for
    // work: a lock taken during its start blocks a prepare, not a look (the
    // TLS handshakes make the start long enough for that to happen).
    let sender_looked = "SELECT count(*) > 0 FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND query LIKE '%min(next_attempt_at) - now()%'";
    eventually(&db, sender_looked).await;
    let lock = locker.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE thorn.delivery IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    // The sender looks at thorn.delivery at least every few seconds: wait
    // until its claim (or its look for the next due delivery) is blocked.
    eventually(
        &db,
        "SELECT count(*) > 0 FROM pg_stat_activity
         WHERE datname = current_database() AND wait_event_type = 'Lock'
           AND (query LIKE '%held (subscriber_id, room)%'
                OR query LIKE '%min(next_attempt_at) - now()%')",
    )
    .await;
    let started = Instant::now();
    // Well under the lock's 90 s, well over 2 s of grace and 5 of cut-off.
    daemon.stop_cleanly(Duration::from_secs(45)).await;
    assert!(started.elapsed() < Duration::from_secs(45));
    assert!(daemon
        .log()
        .contains("still waiting on the database at shutdown"));
    lock.rollback().await.expect("release");
}
