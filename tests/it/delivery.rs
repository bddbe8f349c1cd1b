//! End to end: a row change in an annotated table arrives, signed, at a real
//! receiver.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::support::{
    assert_signed, python_sign, standard_verify, subscribe, wait_asleep, Daemon, Receiver, TestDb,
    QUIET, WAIT,
};

async fn article_table(db: &Client) {
    db.batch_execute(
        "CREATE TABLE public.article (
             id serial PRIMARY KEY, title text NOT NULL, state text NOT NULL DEFAULT 'draft',
             author text, password_hash text);
         SELECT thorn.webhook_model('public.article', sender_field => 'author',
             reference => '/article/{id}/', exclude => ARRAY['password_hash']);",
    )
    .await
    .expect("annotated table");
}

#[tokio::test]
async fn a_committed_change_arrives_signed_with_thorns_envelope() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let sub = subscribe(
        &db,
        "article.*",
        &rx.url("/hook?u=1"),
        Some("alice"),
        "secret",
    )
    .await;
    let daemon = Daemon::start(t.config());

    db.batch_execute(
        "INSERT INTO article (title, author, password_hash) VALUES ('Hello', 'alice', 'pw')",
    )
    .await
    .expect("insert");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0);

    assert_eq!(got.path, "/hook?u=1");
    assert_eq!(
        got.text(),
        r#"{"event": "article.created", "ref": "/article/1/", "sender": "alice", "data": {"id": 1, "state": "draft", "title": "Hello", "author": "alice"}}"#
    );
    assert_eq!(got.header("content-type"), "application/json");
    assert!(got.header("user-agent").starts_with("thorn/"));
    assert_eq!(got.header("hook-event"), "article.created");
    assert_eq!(got.header("hook-subscription"), sub.to_string());
    assert_eq!(got.header("hook-delivery"), got.header("webhook-id"));
    uuid::Uuid::parse_str(got.header("hook-delivery")).expect("delivery id is a uuid");
    assert_signed("secret", &got);

    let (state, status, attempts): (String, Option<i32>, i32) = db
        .query_one(
            "SELECT state, status_code, attempts FROM thorn.delivery",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .expect("delivery row");
    assert_eq!(
        (state.as_str(), status, attempts),
        ("delivered", Some(200), 1)
    );
    daemon.stop().await;
}

#[tokio::test]
async fn every_digest_signs_like_thorn_and_standard_webhooks_verify() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let digests = ["sha1", "sha224", "SHA256", "sha384", "Sha512"];
    let whsec = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let mut secrets = HashMap::new();
    for (i, digest) in digests.iter().enumerate() {
        let secret = if i == 2 {
            whsec.to_owned()
        } else {
            format!("secret-{i}")
        };
        let id: uuid::Uuid = db
            .query_one(
                "INSERT INTO thorn.subscriber (event, url, hmac_secret, hmac_digest)
                 VALUES ('article.created', $1, $2, $3) RETURNING id",
                &[&rx.url(&format!("/{i}")), &secret, digest],
            )
            .await
            .expect("subscriber")
            .get(0);
        secrets.insert(id.to_string(), (digest.to_lowercase(), secret));
    }
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) VALUES ('x')")
        .await
        .expect("insert");
    let got = rx.expect(digests.len(), WAIT, QUIET).await;

    let items: Vec<(&str, &str, &[u8])> = got
        .iter()
        .map(|r| {
            let (digest, secret) = &secrets[r.header("hook-subscription")];
            (digest.as_str(), secret.as_str(), &r.body[..])
        })
        .collect();
    let expected = python_sign(&items);
    for (r, want) in got.iter().zip(&expected) {
        assert_eq!(
            r.header("hook-hmac"),
            want,
            "subscription {}",
            r.header("hook-subscription")
        );
        standard_verify(&secrets[r.header("hook-subscription")].1, r);
    }
    daemon.stop().await;
}

#[tokio::test]
async fn form_encoded_subscribers_get_a_form_body() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    db.execute(
        "INSERT INTO thorn.subscriber (event, url, hmac_secret, content_type)
         VALUES ('article.*', $1, 'secret', 'application/x-www-form-urlencoded')",
        &[&rx.url("/form")],
    )
    .await
    .expect("subscriber");
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) VALUES ('a&b=c')")
        .await
        .expect("insert");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0);
    assert_eq!(
        got.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let fields: Vec<(String, String)> = url::form_urlencoded::parse(&got.body)
        .into_owned()
        .collect();
    let keys: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["event", "ref", "sender", "data"]);
    assert_eq!(fields[0].1, "article.created");
    assert_eq!(fields[1].1, "/article/1/");
    assert_eq!(fields[2].1, "", "a null sender is an empty value");
    let data: serde_json::Value = serde_json::from_str(&fields[3].1).expect("data is JSON text");
    assert_eq!(data["title"], "a&b=c");
    assert_signed("secret", &got);
    daemon.stop().await;
}

#[tokio::test]
async fn matching_follows_patterns_sender_rule_and_active_flag() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "CREATE TABLE thing (id serial PRIMARY KEY, kind text NOT NULL, owner text);
         SELECT thorn.webhook_model('public.thing', model => 'foo', on_change => NULL, on_delete => NULL);
         SELECT thorn.webhook_event('public.thing', 'foo.updated', 'create', $$new.kind = 'u'$$);
         SELECT thorn.webhook_event('public.thing', 'baz.created', 'create', $$new.kind = 'b'$$);
         SELECT thorn.webhook_event('public.thing', 'bar.deleted', 'create', $$new.kind = 'd'$$);
         SELECT thorn.webhook_event('public.thing', 'foo.tag.added', 'create', $$new.kind = 't'$$);
         SELECT thorn.webhook_model('public.thing', model => 'foo', on_create => NULL, on_change => NULL,
                                    on_delete => NULL, sender_field => 'owner');",
    )
    .await
    .expect("model");
    let mut rx = Receiver::start().await;
    // Thorn's table: A foo.*, C foo.created, E *.created, G baz.*, H *; plus
    // multi-segment cases and the sender rule.
    for (name, pattern, owner) in [
        ("A", "foo.*", None),
        ("C", "foo.created", None),
        ("E", "*.created", None),
        ("G", "baz.*", None),
        ("H", "*", None),
        ("M", "foo.*.added", None),
        ("P", "foo.tag.*", None),
        ("alice", "*", Some("alice")),
        ("off", "*", None),
    ] {
        subscribe(&db, pattern, &rx.url(&format!("/{name}")), owner, "secret").await;
    }
    db.batch_execute("UPDATE thorn.subscriber SET active = false WHERE url LIKE '%/off'")
        .await
        .expect("deactivate");
    db.batch_execute(
        "SELECT thorn.webhook_event('public.thing', 'foo.created', 'create', $$new.kind = 'c'$$);",
    )
    .await
    .expect("event");
    let daemon = Daemon::start(t.config());

    let cases: [(&str, Option<&str>, &[&str]); 6] = [
        // No sender: every matching subscriber, owned or not.
        ("c", None, &["A", "C", "E", "H", "alice"]),
        ("u", None, &["A", "H", "alice"]),
        ("b", None, &["E", "G", "H", "alice"]),
        ("d", None, &["H", "alice"]),
        ("t", None, &["A", "H", "M", "P", "alice"]),
        ("c", Some("alice"), &["alice"]),
    ];
    for (kind, owner, expected) in cases {
        db.execute(
            "INSERT INTO thing (kind, owner) VALUES ($1, $2)",
            &[&kind, &owner],
        )
        .await
        .expect("insert");
        let got = rx.expect(expected.len(), WAIT, QUIET).await;
        let mut paths: Vec<String> = got
            .iter()
            .map(|r| r.path.trim_start_matches('/').to_owned())
            .collect();
        paths.sort();
        assert_eq!(paths, expected, "kind {kind} owner {owner:?}");
    }
    daemon.stop().await;
}

#[tokio::test]
async fn delete_events_carry_the_old_row() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    db.batch_execute("INSERT INTO article (title, author) VALUES ('Bye', 'bob')")
        .await
        .expect("insert");
    let mut rx = Receiver::start().await;
    subscribe(&db, "article.removed", &rx.url("/"), Some("bob"), "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("DELETE FROM article")
        .await
        .expect("delete");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0).json();
    assert_eq!(got["ref"], "/article/1/");
    assert_eq!(got["sender"], "bob");
    assert_eq!(got["data"]["title"], "Bye");
    assert!(got["data"].get("password_hash").is_none());
    daemon.stop().await;
}

#[tokio::test]
async fn a_failed_attempt_is_retried_with_the_same_delivery_id() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.respond_with(&[500, 302]);
    subscribe(&db, "article.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) VALUES ('x')")
        .await
        .expect("insert");
    let got = rx.expect(3, WAIT, QUIET).await;
    let ids: Vec<&str> = got.iter().map(|r| r.header("hook-delivery")).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    let stamps: Vec<&str> = got.iter().map(|r| r.header("webhook-timestamp")).collect();
    assert!(!stamps.contains(&""));
    for r in &got {
        standard_verify("secret", r);
    }
    // The outcome is recorded once the completer has written it.
    let deadline = Instant::now() + WAIT;
    loop {
        let (state, attempts): (String, i32) = db
            .query_one("SELECT state, attempts FROM thorn.delivery", &[])
            .await
            .map(|r| (r.get(0), r.get(1)))
            .expect("delivery");
        if state == "delivered" {
            assert_eq!(attempts, 3);
            break;
        }
        assert!(Instant::now() < deadline, "delivery stuck in {state}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.stop().await;
}

#[tokio::test]
async fn the_last_failure_makes_a_delivery_dead() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.respond_with(&[500, 500, 503]);
    subscribe(&db, "article.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) VALUES ('x')")
        .await
        .expect("insert");
    // One try plus the two retries of the test schedule, then nothing.
    rx.expect(3, WAIT, Duration::from_millis(800)).await;
    let (state, status, class): (String, Option<i32>, Option<String>) = db
        .query_one(
            "SELECT state, status_code, error_class FROM thorn.delivery",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .expect("delivery");
    assert_eq!(
        (state.as_str(), status, class.as_deref()),
        ("dead", Some(503), Some("http_status"))
    );
    daemon.stop().await;
}

/// An event name is any text, and custom events are written straight into
/// thorn.event. One with a control character cannot be sent in the
/// Hook-Event header on any attempt: the delivery is dead at once, as
/// `invalid`, not retried through the schedule as a failed request.
#[tokio::test]
async fn an_event_name_that_cannot_be_a_header_is_dead_at_once() {
    let t = TestDb::new().await;
    let db = t.client().await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "custom.*", &rx.url("/"), None, "secret").await;
    db.batch_execute("INSERT INTO thorn.event (name, data) VALUES (E'custom.line\\nbreak', '{}')")
        .await
        .expect("a custom event");
    let daemon = Daemon::start(t.config());
    let ended = crate::support::wait_ended(&db, 1, WAIT).await;
    let e = &ended[0];
    assert_eq!(
        (e.state.as_str(), e.class.as_deref(), e.attempts),
        ("dead", Some("invalid"), 1),
        "{e:?}"
    );
    assert!(
        e.error.as_deref().unwrap_or("").contains("Hook-Event"),
        "{e:?}"
    );
    assert!(rx.next(QUIET).await.is_none(), "nothing can be sent");
    daemon.stop().await;
}

#[tokio::test]
async fn loopback_is_refused_unless_allowed() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "article.*", &rx.url("/"), None, "secret").await;
    subscribe(
        &db,
        "article.*",
        &format!("http://localhost:{}/", rx.addr.port()),
        None,
        "secret",
    )
    .await;
    let mut config = t.config();
    config.security = Default::default();
    let daemon = Daemon::start(config);
    db.batch_execute("INSERT INTO article (title) VALUES ('x')")
        .await
        .expect("insert");
    let deadline = Instant::now() + WAIT;
    loop {
        let classes: Vec<(String, Option<String>)> = db
            .query("SELECT state, error_class FROM thorn.delivery", &[])
            .await
            .expect("deliveries")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if classes.len() == 2 && classes.iter().all(|c| c.0 == "dead") {
            assert!(
                classes.iter().all(|c| c.1.as_deref() == Some("blocked")),
                "{classes:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "not blocked: {classes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rx.next(QUIET).await.is_none(),
        "nothing may reach the receiver"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn subscription_changes_apply_without_a_restart() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    let daemon = Daemon::start(t.config());
    // Dispatched before any subscriber exists: nobody receives it.
    db.batch_execute("INSERT INTO article (title) VALUES ('early')")
        .await
        .expect("insert");
    wait_dispatched(&db).await;
    let sub = subscribe(&db, "article.*", &rx.url("/"), None, "secret").await;
    db.batch_execute("INSERT INTO article (title) VALUES ('late')")
        .await
        .expect("insert");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0).json();
    assert_eq!(got["data"]["title"], "late");

    db.execute(
        "UPDATE thorn.subscriber SET event = 'article.removed' WHERE id = $1",
        &[&sub],
    )
    .await
    .expect("update");
    db.batch_execute(
        "INSERT INTO article (title) VALUES ('ignored'); DELETE FROM article WHERE title = 'late';",
    )
    .await
    .expect("writes");
    let got = rx.expect(1, WAIT, QUIET).await.remove(0).json();
    assert_eq!(got["event"], "article.removed");
    daemon.stop().await;
}

async fn wait_dispatched(db: &Client) {
    let deadline = Instant::now() + WAIT;
    loop {
        let pending: i64 = db
            .query_one(
                "SELECT count(*) FROM thorn.event WHERE dispatched_at IS NULL",
                &[],
            )
            .await
            .expect("count")
            .get(0);
        if pending == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "events not dispatched");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An `article` table with one subscriber (article.*) at a fresh receiver,
/// and a config whose safety poll is far longer than the latency the
/// wake-up tests accept: only a wake-up explains a prompt delivery.
async fn slow_poll_setup() -> (TestDb, Client, Receiver, thorn::config::Config) {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let rx = Receiver::start().await;
    subscribe(&db, "article.*", &rx.url("/"), None, "secret").await;
    let mut config = t.config();
    config.dispatch.poll_interval = Duration::from_secs(30);
    (t, db, rx, config)
}

/// Inserts an article titled `title`; returns how long after the insert
/// began its delivery arrived.
async fn write_and_time(db: &Client, rx: &mut Receiver, title: &str) -> Duration {
    let started = Instant::now();
    db.execute("INSERT INTO article (title) VALUES ($1)", &[&title])
        .await
        .expect("insert");
    rx.next(WAIT).await.expect("a delivery").at - started
}

#[tokio::test]
async fn an_idle_daemon_wakes_promptly_on_notify() {
    let (_t, db, mut rx, config) = slow_poll_setup().await;
    let daemon = Daemon::start(config);
    let mut latencies = Vec::new();
    for i in 0..3 {
        // Dry, past the linger, asleep on the wake-up lock.
        wait_asleep(&db).await;
        latencies.push(write_and_time(&db, &mut rx, &format!("t{i}")).await);
    }
    assert!(
        latencies.iter().all(|l| *l < Duration::from_secs(5)),
        "wake-ups took {latencies:?}; the safety poll is 30s"
    );
    daemon.stop().await;
}

// The race a wake-up protocol must close: a writer captured its event but
// has not committed when the daemon goes to sleep. The daemon's last sweep
// cannot see the event, and the writer's trigger ran before the daemon asked
// for NOTIFYs. The wake-up lock makes the daemon wait for such writers.
#[tokio::test]
async fn a_write_committed_while_the_daemon_falls_asleep_is_not_left_to_the_safety_poll() {
    let (_t, mut db, mut rx, config) = slow_poll_setup().await;
    let daemon = Daemon::start(config);
    wait_asleep(&db).await;
    // Wake it once, so it falls asleep again while our transaction is open.
    db.execute("INSERT INTO article (title) VALUES ('first')", &[])
        .await
        .expect("insert");
    rx.next(WAIT).await.expect("the first delivery");
    let tx = db.transaction().await.expect("begin");
    tx.execute("INSERT INTO article (title) VALUES ('open')", &[])
        .await
        .expect("insert");
    // Longer than the linger: the daemon has swept and tried to sleep.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let committed = Instant::now();
    tx.commit().await.expect("commit");
    let got = rx.next(WAIT).await.expect("the open transaction's event");
    assert_eq!(got.json()["data"]["title"], "open");
    assert!(
        got.at - committed < Duration::from_secs(5),
        "delivered {:?} after commit; the safety poll is 30s",
        got.at - committed
    );
    daemon.stop().await;
}

// Only one daemon can hold the wake-up lock. Whichever of two idle daemons
// wakes first (the holder on its NOTIFY, the other at the end of a nap),
// each event is delivered promptly and once.
#[tokio::test]
async fn two_idle_daemons_wake_promptly_and_deliver_once() {
    let (_t, db, mut rx, config) = slow_poll_setup().await;
    let daemons = [Daemon::start(config.clone()), Daemon::start(config)];
    for i in 0..3 {
        wait_asleep(&db).await;
        // Long enough for the daemon without the lock to back off to its
        // longest nap.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let took = write_and_time(&db, &mut rx, &format!("t{i}")).await;
        assert!(
            took < Duration::from_secs(5),
            "took {took:?}; the safety poll is 30s"
        );
    }
    assert!(rx.next(QUIET).await.is_none(), "a delivery arrived twice");
    for daemon in daemons {
        daemon.stop().await;
    }
}

// Delivery ids are derived from (event, subscriber); a derivation that
// lost event-id bits once made ids collide past 4096 events and stalled
// dispatch. A backlog well past that must arrive whole, each id once.
#[tokio::test]
async fn a_backlog_past_4096_events_arrives_whole_with_distinct_ids() {
    const EVENTS: usize = 5000;
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "article.created", &rx.url("/"), None, "secret").await;
    db.execute(
        "INSERT INTO article (title) SELECT 't' || i FROM generate_series(1, $1::int) i",
        &[&(EVENTS as i32)],
    )
    .await
    .expect("insert");
    let daemon = Daemon::start(t.config());
    let got = rx.expect(EVENTS, WAIT * 4, QUIET).await;
    let ids: HashSet<&str> = got.iter().map(|r| r.header("hook-delivery")).collect();
    let titles: HashSet<String> = got
        .iter()
        .map(|r| r.json()["data"]["title"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(ids.len(), EVENTS, "delivery ids repeat");
    assert_eq!(titles.len(), EVENTS, "some events were sent twice or lost");
    daemon.stop().await;
}

#[tokio::test]
async fn events_committed_while_no_daemon_runs_are_delivered_on_start() {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let mut rx = Receiver::start().await;
    subscribe(&db, "article.created", &rx.url("/"), None, "secret").await;
    db.batch_execute("INSERT INTO article (title) SELECT 't' || i FROM generate_series(1, 500) i")
        .await
        .expect("insert");
    let daemon = Daemon::start(t.config());
    let got = rx.expect(500, WAIT * 2, QUIET).await;
    let mut titles: Vec<String> = got
        .iter()
        .map(|r| {
            r.json()["data"]["title"]
                .as_str()
                .expect("title")
                .to_owned()
        })
        .collect();
    titles.sort();
    titles.dedup();
    assert_eq!(titles.len(), 500);
    daemon.stop().await;
}
