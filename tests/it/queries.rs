//! The daemon's queue queries stay index lookups whatever waits in the
//! queue. Checked on a real database by their plans and by the buffers they
//! touch, never by time, so a slow machine cannot fail them.

use tokio_postgres::{Client, SimpleQueryMessage};

use crate::support::TestDb;

/// A session set up as the daemon's are (src/db/mod.rs).
async fn daemon_session(t: &TestDb) -> Client {
    thorn::db::connect_retrying(&t.url, "test", &tokio_util::sync::CancellationToken::new())
        .await
        .expect("a daemon session")
}

/// Column `index` of each row `sql` returns, as text.
async fn column(db: &Client, sql: &str, index: usize) -> Vec<String> {
    db.simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(index).map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// The first column of each row `sql` returns, one per line.
async fn lines(db: &Client, sql: &str) -> String {
    column(db, sql, 0).await.join("\n")
}

/// Shared buffers (hit or read) one execution of `statement` touches, from
/// `EXPLAIN (ANALYZE, BUFFERS)`; its writes are rolled back.
async fn buffers(db: &Client, statement: &str) -> u64 {
    let json = lines(
        db,
        &format!("BEGIN; EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}; ROLLBACK"),
    )
    .await;
    let explain: serde_json::Value = serde_json::from_str(&json).expect("EXPLAIN as JSON");
    let plan = &explain[0]["Plan"];
    ["Shared Hit Blocks", "Shared Read Blocks"]
        .iter()
        .map(|k| plan[k].as_u64().expect("buffer counts"))
        .sum()
}

const FULL: &str = "00000000-0000-0000-0000-0000000000a1";
const ORDERED: &str = "00000000-0000-0000-0000-0000000000a2";
const FREE: &str = "00000000-0000-0000-0000-0000000000a3";

/// Ten wanted, two per subscriber, and FULL has no room left (it holds its
/// two); the round starts from the lowest id.
const CLAIM: &str =
    "EXECUTE claim(10, '{00000000-0000-0000-0000-0000000000a1}', '{0}', 2, '00000000-0000-0000-0000-000000000000', 30)";

/// Three subscribers (at its limit, ordered, free), five deliveries due
/// for the free one, and the claim prepared as the daemon's generic plan.
async fn claim_queue(db: &Client) {
    db.batch_execute(&format!(
        "INSERT INTO thorn.subscriber (id, event, url, ordered) VALUES
             ('{FULL}', '*', 'http://127.0.0.1:1/full', false),
             ('{ORDERED}', '*', 'http://127.0.0.1:1/ordered', true),
             ('{FREE}', '*', 'http://127.0.0.1:1/free', false);
         INSERT INTO thorn.event (name, data) SELECT 'a.created', '{{}}' FROM generate_series(1, 5);
         INSERT INTO thorn.delivery (id, event_id, subscriber_id)
         SELECT gen_random_uuid(), e.id, '{FREE}' FROM thorn.event e;
         SET plan_cache_mode = force_generic_plan;
         PREPARE claim AS {};",
        thorn::db::queue::CLAIM_DELIVERIES
    ))
    .await
    .expect("a queue");
}

/// Claims (rolled back) and checks the free subscriber got its two; then
/// the buffers a claim touches, once warm.
async fn claim_cost(db: &Client) -> u64 {
    // The subscriber is the 8th column.
    let claimed = column(db, &format!("BEGIN; {CLAIM}; ROLLBACK"), 7).await;
    assert_eq!(claimed, [FREE, FREE]);
    buffers(db, CLAIM).await;
    buffers(db, CLAIM).await
}

/// A claim's cost (see `claim_cost`) before and after `grow`: it must not
/// double, whatever `grow` adds.
async fn claim_cost_stays_flat(db: &Client, grow: &str, what: &str) {
    let small = claim_cost(db).await;
    db.batch_execute(grow).await.expect(what);
    let large = claim_cost(db).await;
    assert!(
        large <= small * 2,
        "a claim touched {small} buffers before {what} and {large} after"
    );
}

/// `n` events, each with a delivery due an hour ago for the subscriber at
/// its limit and for the ordered one.
fn blocked_backlog(n: i32) -> String {
    format!(
        "INSERT INTO thorn.event (name, data) SELECT 'a.created', '{{}}' FROM generate_series(1, {n});
         INSERT INTO thorn.delivery (id, event_id, subscriber_id, next_attempt_at)
         SELECT gen_random_uuid(), e.id, s.id, now() - interval '1 hour'
         FROM thorn.event e, thorn.subscriber s
         WHERE s.id IN ('{FULL}', '{ORDERED}')
           AND NOT EXISTS (SELECT 1 FROM thorn.delivery d WHERE d.event_id = e.id);
         ANALYZE thorn.delivery;"
    )
}

/// A backlog a claim cannot take (a subscriber at its limit; an ordered
/// one whose oldest delivery is in flight) must not be read by every claim
/// for the others. It was, row by row: 42 ms per claim behind 100,000 rows
/// of a subscriber at its limit, 700 ms behind 100,000 of an ordered one.
#[tokio::test]
async fn claims_pass_over_backlogs_they_cannot_take_at_a_constant_cost() {
    let t = TestDb::new().await;
    let db = daemon_session(&t).await;
    claim_queue(&db).await;
    db.batch_execute(&format!(
        "{}
         UPDATE thorn.delivery SET next_attempt_at = now() + interval '1 hour'
         WHERE id = (SELECT id FROM thorn.delivery WHERE subscriber_id = '{ORDERED}'
                     ORDER BY event_id LIMIT 1);",
        blocked_backlog(1_000)
    ))
    .await
    .expect("a blocked backlog");
    claim_cost_stays_flat(
        &db,
        &blocked_backlog(30_000),
        "blocked backlogs grew from 1,000 to 31,000 rows",
    )
    .await;
}

/// When the head of the queue is full of rows nobody can take, a claim
/// goes round the subscribers in id order from the one after where the
/// last claim ended, each getting what it has room for, and wraps round to
/// end with that one.
#[tokio::test]
async fn claims_go_round_the_subscribers_from_where_the_last_one_ended() {
    let t = TestDb::new().await;
    let db = daemon_session(&t).await;
    let [x1, x2, x3] = [
        "00000000-0000-0000-0000-0000000000b1",
        "00000000-0000-0000-0000-0000000000b2",
        "00000000-0000-0000-0000-0000000000b3",
    ];
    db.batch_execute(&format!(
        "INSERT INTO thorn.subscriber (id, event, url) VALUES
             ('{FULL}', '*', 'http://127.0.0.1:1/full'), ('{x1}', '*', 'http://127.0.0.1:1/1'),
             ('{x2}', '*', 'http://127.0.0.1:1/2'), ('{x3}', '*', 'http://127.0.0.1:1/3');
         INSERT INTO thorn.event (name, data) SELECT 'a.created', '{{}}' FROM generate_series(1, 20);
         INSERT INTO thorn.delivery (id, event_id, subscriber_id, next_attempt_at)
         SELECT gen_random_uuid(), e.id, '{FULL}', now() - interval '1 hour' FROM thorn.event e;
         INSERT INTO thorn.event (name, data) SELECT 'a.created', '{{}}' FROM generate_series(1, 3);
         INSERT INTO thorn.delivery (id, event_id, subscriber_id)
         SELECT gen_random_uuid(), e.id, s.id FROM thorn.event e, thorn.subscriber s
         WHERE e.id > 20 AND s.id <> '{FULL}';
         PREPARE claim AS {};",
        thorn::db::queue::CLAIM_DELIVERIES
    ))
    .await
    .expect("a queue whose head is FULL's");
    // FULL has no room (it holds its two of two); the subscriber of each
    // claimed row.
    let round = |wanted: i32, after: &str| {
        format!("BEGIN; EXECUTE claim({wanted}, '{{{FULL}}}', '{{0}}', 2, '{after}', 30); ROLLBACK")
    };
    assert_eq!(column(&db, &round(4, x1), 7).await, [x2, x2, x3, x3]);
    assert_eq!(column(&db, &round(4, x3), 7).await, [x1, x1, x2, x2]);
    assert_eq!(
        column(&db, &round(10, x2), 7).await,
        [x3, x3, x1, x1, x2, x2]
    );
}

/// Subscribers whose deliveries wait for a later retry (failing endpoints
/// in back-off) must not cost every claim: going round all subscribers
/// with pending rows did, one index descent each (30 ms per claim with
/// 5,000 of them).
#[tokio::test]
async fn claims_pass_over_subscribers_waiting_for_a_retry_at_a_constant_cost() {
    let t = TestDb::new().await;
    let db = daemon_session(&t).await;
    claim_queue(&db).await;
    let waiting = |n: i32| {
        format!(
            "WITH s AS (
                 INSERT INTO thorn.subscriber (event, url)
                 SELECT '*', 'http://127.0.0.1:1/' || g FROM generate_series(1, {n}) g
                 RETURNING id),
             e AS (INSERT INTO thorn.event (name, data) VALUES ('a.created', '{{}}') RETURNING id)
             INSERT INTO thorn.delivery (id, event_id, subscriber_id, next_attempt_at, attempts)
             SELECT gen_random_uuid(), e.id, s.id, now() + interval '1 hour', 3 FROM s, e;
             ANALYZE thorn.delivery;"
        )
    };
    db.batch_execute(&waiting(50)).await.expect("50 waiting");
    claim_cost_stays_flat(
        &db,
        &waiting(1_950),
        "subscribers waiting for a retry grew from 50 to 2,000",
    )
    .await;
}

/// A plan cached while the queue held a few rows must still reach the rows
/// a completion names by their ids once the backlog is long, not walk the
/// backlog (it did: 29 ms per completion at 100,000 pending). Never
/// analyzed, the short queue looks like one pending row in hundreds.
#[tokio::test]
async fn a_completion_plan_made_on_a_short_queue_fetches_rows_by_id() {
    let t = TestDb::new().await;
    let db = daemon_session(&t).await;
    let backlog = |n: i32| {
        format!(
            "INSERT INTO thorn.event (name, data) SELECT 'a.created', '{{}}' FROM generate_series(1, {n});
             INSERT INTO thorn.delivery (id, event_id, subscriber_id)
             SELECT gen_random_uuid(), e.id, s.id FROM thorn.event e, thorn.subscriber s
             WHERE NOT EXISTS (SELECT 1 FROM thorn.delivery d WHERE d.event_id = e.id);"
        )
    };
    db.batch_execute(&format!(
        "INSERT INTO thorn.subscriber (event, url) VALUES ('*', 'http://127.0.0.1:1/');
         {}
         SET plan_cache_mode = force_generic_plan;
         PREPARE complete AS {};",
        backlog(800),
        thorn::db::queue::COMPLETE
    ))
    .await
    .expect("a short queue");
    let ids: String = db
        .query_one(
            "SELECT string_agg(id::text, ',') FROM (SELECT id FROM thorn.delivery LIMIT 3) d",
            &[],
        )
        .await
        .expect("ids")
        .get(0);
    let explain = &format!(
        "EXPLAIN EXECUTE complete('{{{ids}}}', '{{delivered,delivered,delivered}}',
             '{{0,0,0}}', '{{200,200,200}}', '{{NULL,NULL,NULL}}', '{{NULL,NULL,NULL}}',
             '{{1,1,1}}', '{{NULL,NULL,NULL}}', ARRAY[now(), now(), now()])"
    );
    // Planned now, on the short queue; kept while the backlog grows.
    lines(&db, explain).await;
    db.batch_execute(&backlog(20_000)).await.expect("a backlog");
    let plan = lines(&db, explain).await;
    assert!(plan.contains("delivery_pkey"), "{plan}");
    for queue_index in [
        "delivery_subscriber_due",
        "delivery_subscriber_pending",
        "delivery_event",
    ] {
        assert!(!plan.contains(queue_index), "{plan}");
    }
}

/// Deleting a subscriber deletes its deliveries through an index, not by
/// reading every delivery kept (delivered and dead ones included), which
/// it did at every unsubscribe before schema 12.
#[tokio::test]
async fn deleting_a_subscriber_finds_its_deliveries_by_index() {
    let t = TestDb::new().await;
    let db = t.client().await;
    db.batch_execute(
        "INSERT INTO thorn.subscriber (event, url)
         SELECT '*', 'http://127.0.0.1:1/' || g FROM generate_series(1, 100) g;
         INSERT INTO thorn.event (name, data) SELECT 'a.created', '{}' FROM generate_series(1, 100);
         INSERT INTO thorn.delivery (id, event_id, subscriber_id, state)
         SELECT gen_random_uuid(), e.id, s.id, 'delivered' FROM thorn.event e, thorn.subscriber s;
         ANALYZE thorn.delivery;",
    )
    .await
    .expect("10,000 delivered rows of 100 subscribers");
    // Counted within the transaction, the cascade's scans included.
    let scans = column(
        &db,
        "BEGIN;
         DELETE FROM thorn.subscriber WHERE id = (SELECT id FROM thorn.subscriber ORDER BY id LIMIT 1);
         SELECT seq_scan || ' ' || n_tup_del FROM pg_stat_xact_user_tables
         WHERE relid = 'thorn.delivery'::regclass;
         ROLLBACK",
        0,
    )
    .await;
    assert_eq!(scans, ["0 100"], "sequential scans, rows deleted");
}

/// A claim's deliveries count their age from before the claim was sent:
/// the lease runs from the statement's now(), so a claim that took a while
/// (here it waits for a table lock) must not make them look younger than
/// their leases are. The sender starts a waiting delivery only while it is
/// young enough to end within its lease (src/deliver/worker.rs).
#[tokio::test]
async fn a_claims_age_counts_from_before_it_was_sent() {
    use std::time::{Duration, Instant, SystemTime};
    use thorn::db::queue::{Room, Statements};

    let t = TestDb::new().await;
    let db = daemon_session(&t).await;
    let watcher = t.client().await;
    let mut admin = t.client().await;
    admin
        .batch_execute(&format!(
            "INSERT INTO thorn.subscriber (id, event, url) VALUES ('{FREE}', '*', 'http://127.0.0.1:1/');
             INSERT INTO thorn.event (name, data) VALUES ('a.created', '{{}}');
             INSERT INTO thorn.delivery (id, event_id, subscriber_id)
             SELECT gen_random_uuid(), id, '{FREE}' FROM thorn.event;"
        ))
        .await
        .expect("a due delivery");
    let statements = Statements::prepare(&db).await.expect("prepare");
    let lock = admin.transaction().await.expect("begin");
    lock.batch_execute("LOCK TABLE thorn.delivery IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock");
    let claim = tokio::spawn(async move {
        let room = Room {
            limit: 10,
            ..Room::default()
        };
        statements
            .claim_deliveries(&db, 10, Duration::from_secs(30), &room, uuid::Uuid::nil())
            .await
    });
    let deadline = Instant::now() + crate::support::WAIT;
    loop {
        let waiting: bool = watcher
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity
                                WHERE datname = current_database() AND wait_event_type = 'Lock')",
                &[],
            )
            .await
            .expect("activity")
            .get(0);
        if waiting {
            break;
        }
        assert!(Instant::now() < deadline, "the claim never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = Instant::now();
    lock.commit().await.expect("commit");
    let claimed = claim.await.expect("the claim's task").expect("claim");
    assert_eq!(claimed.len(), 1);
    assert!(
        claimed[0].claimed_at < released,
        "the claim's age starts when its rows come back"
    );
    // The lease the claim holds is the one it wrote.
    let lease: SystemTime = watcher
        .query_one("SELECT next_attempt_at FROM thorn.delivery", &[])
        .await
        .expect("lease")
        .get(0);
    assert_eq!(claimed[0].lease, lease);
}
