//! The outbox horizon (sql/0007_horizon.sql, sql/0008_horizon_writers.sql):
//! dispatchers find pending events above a low-water mark, which must never
//! pass an event whose transaction is still open, however the commits
//! interleave, and which only transactions that wrote the outbox hold back.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::support::{
    article_table, base_url, connect, eventually, subscribe, Daemon, Receiver, TestDb, QUIET, WAIT,
};

async fn horizon(db: &Client) -> i64 {
    db.query_one(
        "SELECT coalesce((SELECT low FROM thorn.outbox_horizon), -1)",
        &[],
    )
    .await
    .expect("horizon")
    .get(0)
}

/// Waits until the horizon has reached `at_least`; panics with `why` after
/// the usual wait.
async fn wait_horizon(db: &Client, at_least: i64, why: &str) {
    let deadline = Instant::now() + WAIT;
    while horizon(db).await < at_least {
        assert!(Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An annotated `article` table with one subscriber (article.created) at a
/// fresh receiver; no daemon yet.
async fn setup() -> (TestDb, Client, Receiver) {
    let t = TestDb::new().await;
    let db = t.client().await;
    article_table(&db).await;
    let rx = Receiver::start().await;
    subscribe(&db, "article.created", &rx.url("/"), None, "secret").await;
    (t, db, rx)
}

fn title(r: &crate::support::Received) -> String {
    r.json()["data"]["title"]
        .as_str()
        .expect("title")
        .to_owned()
}

/// Commits one article and waits for its delivery, alone.
async fn insert_and_receive(db: &Client, rx: &mut Receiver, text: &str) {
    db.execute("INSERT INTO article (title) VALUES ($1)", &[&text])
        .await
        .expect("insert");
    let got = rx.expect(1, WAIT, Duration::ZERO).await;
    assert_eq!(title(&got[0]), text);
}

#[tokio::test]
async fn an_event_committed_after_later_ones_is_still_delivered() {
    let (t, db, mut rx) = setup().await;
    let daemon = Daemon::start(t.config());

    // Two transactions take event ids and stay open: one through a capture
    // trigger, one writing the outbox directly as its first statement.
    let captured = t.client().await;
    captured
        .batch_execute("BEGIN; INSERT INTO article (title) VALUES ('held by a trigger')")
        .await
        .expect("held insert");
    let direct = t.client().await;
    direct
        .batch_execute(
            "BEGIN; INSERT INTO thorn.event (name, data)
             VALUES ('article.created', '{\"title\": \"held, written directly\"}')",
        )
        .await
        .expect("held direct insert");
    let held: i64 = direct
        .query_one("SELECT max(id) FROM thorn.event", &[])
        .await
        .expect("held id")
        .get(0);

    // Later events commit and arrive while the first two stay open, and
    // every batch gives the horizon a chance to move.
    for round in 0..5 {
        insert_and_receive(&db, &mut rx, &format!("later {round}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let low = horizon(&db).await;
    assert!(
        low < held - 1,
        "the horizon ({low}) passed events still open (ids up to {held})"
    );

    captured.batch_execute("COMMIT").await.expect("commit");
    direct.batch_execute("COMMIT").await.expect("commit");
    let titles: HashSet<String> = rx.expect(2, WAIT, QUIET).await.iter().map(title).collect();
    assert_eq!(
        titles,
        HashSet::from([
            "held by a trigger".to_owned(),
            "held, written directly".to_owned()
        ])
    );

    // With nothing open any more, the horizon catches up with every event.
    let last: i64 = db
        .query_one("SELECT max(id) FROM thorn.event", &[])
        .await
        .expect("last id")
        .get(0);
    wait_horizon(&db, last, "the horizon does not catch up").await;
    daemon.stop().await;
}

#[tokio::test]
async fn transactions_that_never_wrote_the_outbox_do_not_hold_the_horizon() {
    let (t, db, mut rx) = setup().await;
    db.batch_execute("CREATE TABLE unrelated (x int)")
        .await
        .expect("unrelated table");

    // Two transactions with transaction ids stay open throughout: one in
    // another database of the cluster, one here that writes a table thorn
    // does not watch.
    let elsewhere = connect(&base_url()).await;
    elsewhere
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .expect("open a transaction elsewhere");
    let here = t.client().await;
    here.batch_execute("BEGIN; INSERT INTO unrelated VALUES (1)")
        .await
        .expect("open a transaction here");

    let daemon = Daemon::start(t.config());
    for round in 0..3 {
        insert_and_receive(&db, &mut rx, &format!("while others stay open {round}")).await;
    }
    let last: i64 = db
        .query_one("SELECT max(id) FROM thorn.event", &[])
        .await
        .expect("last id")
        .get(0);
    wait_horizon(
        &db,
        last,
        "transactions that wrote no event hold the horizon back",
    )
    .await;

    here.batch_execute("ROLLBACK").await.expect("rollback");
    elsewhere.batch_execute("ROLLBACK").await.expect("rollback");
    daemon.stop().await;
}

#[tokio::test]
async fn interleaved_writers_lose_nothing_and_send_nothing_twice() {
    const WRITERS: usize = 8;
    const EACH: usize = 60;
    let (t, _db, mut rx) = setup().await;
    // Two daemons, so horizon steps also race each other.
    let daemons = [Daemon::start(t.config()), Daemon::start(t.config())];

    // Each transaction takes its event id, then lingers a varying moment
    // before it commits, so commits overtake one another all the time.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = t.client().await;
        writers.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .batch_execute(&format!(
                        "BEGIN; INSERT INTO article (title) VALUES ('{w}-{i}');
                         SELECT pg_sleep({});
                         COMMIT;",
                        ((w * 7 + i * 3) % 5) as f64 / 1000.0
                    ))
                    .await
                    .expect("write");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    let got = rx.expect(WRITERS * EACH, WAIT * 2, QUIET).await;
    let titles: HashSet<String> = got.iter().map(title).collect();
    assert_eq!(got.len(), WRITERS * EACH, "an event was sent twice");
    assert_eq!(titles.len(), WRITERS * EACH, "an event was lost");
    for daemon in daemons {
        daemon.stop().await;
    }
}

#[tokio::test]
async fn a_sequence_set_back_below_the_horizon_restarts_it() {
    let (t, db, mut rx) = setup().await;
    let daemon = Daemon::start(t.config());
    db.batch_execute(
        "INSERT INTO article (title) SELECT 'first ' || i FROM generate_series(1, 20) i",
    )
    .await
    .expect("insert");
    rx.expect(20, WAIT, Duration::ZERO).await;
    wait_horizon(&db, 20, "the horizon does not catch up").await;
    // Outcomes written, so the reset below does not race the completer for
    // the deliveries it deletes.
    eventually(
        &db,
        "SELECT count(*) = 20 FROM thorn.delivery WHERE state = 'delivered'",
    )
    .await;

    // As after a copy that did not carry the sequence over.
    db.batch_execute(
        "DELETE FROM thorn.event; SELECT setval('thorn.event_id_seq', 1, false);
         INSERT INTO article (title) VALUES ('after the reset');",
    )
    .await
    .expect("reset");
    let got = rx.expect(1, WAIT, QUIET).await;
    assert_eq!(title(&got[0]), "after the reset");
    daemon.stop().await;
}

#[tokio::test]
async fn a_horizon_restored_from_another_cluster_or_lost_still_moves() {
    let (t, db, mut rx) = setup().await;
    // A transaction id this cluster has not reached: as after a restore
    // from a busier cluster.
    db.batch_execute("UPDATE thorn.outbox_horizon SET next_xid = '4000000000000'")
        .await
        .expect("future xid");
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO article (title) SELECT 'a ' || i FROM generate_series(1, 10) i")
        .await
        .expect("insert");
    rx.expect(10, WAIT, Duration::ZERO).await;
    wait_horizon(&db, 10, "a future xid freezes the horizon").await;

    // The row gone altogether (a truncate, a partial restore).
    db.batch_execute(
        "DELETE FROM thorn.outbox_horizon;
         INSERT INTO article (title) SELECT 'b ' || i FROM generate_series(1, 10) i;",
    )
    .await
    .expect("lose the row");
    rx.expect(10, WAIT, QUIET).await;
    wait_horizon(&db, 20, "the horizon is not re-made").await;
    daemon.stop().await;
}

/// A hand-written event dated infinity (any role that may write the outbox
/// can) is dispatched and delivered like any other: reading its age or
/// its capture time failed, and blocked every claim behind it.
#[tokio::test]
async fn an_event_dated_infinity_blocks_nothing() {
    let (t, db, mut rx) = setup().await;
    db.batch_execute(
        "INSERT INTO thorn.event (name, data, created_at)
         VALUES ('article.created', '{\"title\": \"forever\"}', 'infinity')",
    )
    .await
    .expect("a hand-written event");
    let daemon = Daemon::start(t.config());
    let got = rx.expect(1, WAIT, Duration::ZERO).await;
    assert_eq!(title(&got[0]), "forever");
    insert_and_receive(&db, &mut rx, "after it").await;
    daemon.stop().await;
}
