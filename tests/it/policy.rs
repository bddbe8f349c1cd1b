//! The delivery policy: Retry-After, timeouts, 410 Gone, auto-disable,
//! isolation between subscribers, ordered delivery, retention, and the
//! operator commands that act on it.

use std::time::{Duration, Instant};

use thorn::config::Config;
use tokio_postgres::Client;

use crate::resilience::config as process_config;
use crate::support::{
    eventually, subscribe, Daemon, Received, Receiver, Reply, TestDb, QUIET, WAIT,
};

async fn item_table(db: &Client) {
    db.batch_execute(
        "CREATE TABLE item (id serial PRIMARY KEY, n int NOT NULL);
         SELECT thorn.webhook_model('public.item', on_change => NULL, on_delete => NULL);",
    )
    .await
    .expect("annotated table");
}

fn item(r: &Received) -> i64 {
    r.json()["data"]["n"].as_i64().expect("n")
}

/// An item table, subscribed by a receiver whose first answer is a 429
/// asking to wait `retry_after`, and a config sending one request at a
/// time, so that the 429 comes before any other request.
async fn after_a_429(retry_after: &'static str) -> (TestDb, Client, Receiver, Config) {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let rx = Receiver::start().await;
    rx.reply(Reply {
        status: 429,
        retry_after: Some(retry_after),
        ..Reply::default()
    });
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let mut config = t.config();
    config.delivery.per_subscriber_concurrency = 1;
    (t, db, rx, config)
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (_t, db, mut rx, config) = after_a_429("2").await;
    let daemon = Daemon::start(config); // schedule: 100ms, 200ms
    db.batch_execute("INSERT INTO item (n) VALUES (1)")
        .await
        .expect("insert");
    let got = rx.expect(2, WAIT, QUIET).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "retried after {gap:?}, asked for 2s"
    );
    daemon.stop().await;
}

/// A 429 with Retry-After pauses the whole subscriber, not only the one
/// delivery: its other deliveries wait too (each would otherwise use up an
/// attempt on the same answer), and all arrive once the pause is over.
#[tokio::test]
async fn retry_after_pauses_the_whole_subscriber() {
    let (_t, db, mut rx, config) = after_a_429("2").await;
    let daemon = Daemon::start(config);
    db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 6)")
        .await
        .expect("insert");
    let got = rx.expect(7, WAIT, QUIET).await;
    let gap = got[1].at - got[0].at;
    assert!(
        gap >= Duration::from_millis(1900),
        "the next request came {gap:?} after a 429 asking for 2 s"
    );
    let delivered: i64 = db
        .query_one(
            "SELECT count(*) FROM thorn.delivery WHERE state = 'delivered' AND attempts <= 2",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(delivered, 6, "no attempt spent on the pause but the 429's");
    daemon.stop().await;
}

/// A Retry-After longer than any clock (u64::MAX seconds) is capped by
/// `delivery.max_retry_after` like any other: it once panicked the send,
/// whose slot then stayed taken, and the subscriber got nothing more.
#[tokio::test]
async fn a_retry_after_beyond_any_clock_is_capped() {
    let (_t, db, mut rx, mut config) = after_a_429("18446744073709551615").await;
    config.delivery.max_retry_after = Duration::from_secs(1);
    let daemon = Daemon::start(config);
    db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 5)")
        .await
        .expect("insert");
    rx.expect(6, WAIT, QUIET).await;
    eventually(
        &db,
        "SELECT count(*) = 5 FROM thorn.delivery WHERE state = 'delivered'",
    )
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_and_is_retried() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.reply(Reply {
        status: 200,
        delay: Duration::from_secs(10),
        ..Reply::default()
    });
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let mut config = t.config();
    config.delivery.timeout = Duration::from_millis(500);
    let daemon = Daemon::start(config);
    db.batch_execute("INSERT INTO item (n) VALUES (1)")
        .await
        .expect("insert");
    let got = rx.expect(2, WAIT, QUIET).await;
    assert_eq!(
        got[0].header("hook-delivery"),
        got[1].header("hook-delivery")
    );
    eventually(
        &db,
        "SELECT state = 'delivered' AND attempts = 2 FROM thorn.delivery",
    )
    .await;
    daemon.stop().await;
}

#[tokio::test]
async fn gone_deactivates_the_subscriber() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.respond_with(&[410]);
    let sub = subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO item (n) VALUES (1)")
        .await
        .expect("insert");
    rx.expect(1, WAIT, QUIET).await;
    eventually(&db, "SELECT NOT active FROM thorn.subscriber").await;
    let (state, reason): (String, Option<String>) = db
        .query_one(
            "SELECT d.state, s.deactivated_reason FROM thorn.delivery d JOIN thorn.subscriber s ON s.id = $1",
            &[&sub],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("rows");
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        ("dead", Some("410 Gone"))
    );
    // No more deliveries for it.
    db.batch_execute("INSERT INTO item (n) VALUES (2)")
        .await
        .expect("insert");
    assert!(rx.next(Duration::from_millis(800)).await.is_none());
    daemon.stop().await;
}

/// Requests to `rx` until none comes for 3 s (at most 1,000).
async fn count_until_quiet(rx: &mut Receiver) -> usize {
    let mut n = 0;
    while n < 1000 && rx.next(Duration::from_secs(3)).await.is_some() {
        n += 1;
    }
    n
}

/// A sender holds up to four lines of 32 claimed deliveries per busy
/// subscriber in memory. Those must not go out once the subscriber is
/// switched off or deleted: only the requests already on their way (32;
/// 31 here, as the first was counted before) may arrive; all those held
/// at the time once did. The sender looks at the lines every 250 ms, also
/// while a slower subscriber and this one hold every slot (64 here), which
/// once kept it from looking until a slot came free.
#[tokio::test]
async fn a_switched_off_or_deleted_subscriber_gets_nothing_more_of_what_was_held() {
    for off in [
        "UPDATE thorn.subscriber SET active = false WHERE url LIKE '%/fast'",
        "DELETE FROM thorn.subscriber WHERE url LIKE '%/fast'",
    ] {
        let t = TestDb::new().await;
        let db = t.client().await;
        item_table(&db).await;
        let mut fast = Receiver::start().await;
        fast.otherwise(Reply {
            status: 200,
            delay: Duration::from_secs(2),
            ..Reply::default()
        });
        let mut slow = Receiver::start().await;
        slow.otherwise(Reply {
            status: 200,
            delay: Duration::from_secs(8),
            ..Reply::default()
        });
        subscribe(&db, "item.*", &fast.url("/fast"), None, "secret").await;
        // Lines two limits deep (a 10 s timeout, a 40 s lease), and slots
        // for the two subscribers' limits only.
        let mut config = t.config();
        config.delivery.timeout = Duration::from_secs(10);
        config.delivery.lease_setting = Some(Duration::from_secs(40));
        config.delivery.concurrency = 64;
        let daemon = Daemon::start(config);
        db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 400)")
            .await
            .expect("insert");
        fast.next(WAIT).await.expect("a first request");
        // The slow subscriber takes the other 32 slots, for 8 s at a time.
        subscribe(&db, "item.*", &slow.url("/slow"), None, "secret").await;
        db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 400)")
            .await
            .expect("insert");
        slow.next(WAIT).await.expect("a slow request");
        // Right after the fast subscriber's next 32 requests began (they
        // end 2 s later, together), with its lines full behind them.
        while fast.next(Duration::from_millis(200)).await.is_some() {}
        fast.next(WAIT).await.expect("the next round");
        tokio::time::sleep(Duration::from_millis(300)).await;
        db.batch_execute(off).await.expect(off);
        let after = count_until_quiet(&mut fast).await;
        assert!(after <= 40, "{off}: {after} requests arrived afterwards");
        daemon.stop().await;
    }
}

/// After a 410 Gone, the requests already sent end, and what waits in the
/// sender's memory for that subscriber is not sent.
#[tokio::test]
async fn after_a_410_the_deliveries_held_for_the_subscriber_are_not_sent() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.otherwise(Reply {
        status: 410,
        delay: Duration::from_millis(300),
        ..Reply::default()
    });
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 300)")
        .await
        .expect("insert");
    let sent = count_until_quiet(&mut rx).await;
    assert!(sent <= 48, "{sent} requests to a subscriber that said 410");
    eventually(&db, "SELECT NOT active FROM thorn.subscriber").await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_subscriber_failing_for_too_long_is_deactivated() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let rx = Receiver::start().await;
    rx.otherwise(Reply::status(500));
    let healthy = Receiver::start().await;
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let ok = subscribe(&db, "item.*", &healthy.url("/"), None, "secret").await;
    let mut config = t.config();
    config.delivery.disable_after = Duration::from_millis(500);
    config.delivery.retry_schedule = vec![Duration::from_millis(100); 20];
    let daemon = Daemon::start(config);
    db.batch_execute("INSERT INTO item (n) VALUES (1)")
        .await
        .expect("insert");
    eventually(
        &db,
        "SELECT count(*) = 1 FROM thorn.subscriber
         WHERE NOT active AND deactivated_reason LIKE 'no successful delivery since%'",
    )
    .await;
    let healthy_active: bool = db
        .query_one("SELECT active FROM thorn.subscriber WHERE id = $1", &[&ok])
        .await
        .expect("row")
        .get(0);
    assert!(healthy_active);
    daemon.stop().await;
    // What is left for the disabled one is marked dead, not dropped.
    let daemon = Daemon::start(t.config());
    eventually(
        &db,
        "SELECT bool_and(state <> 'pending') FROM thorn.delivery",
    )
    .await;
    daemon.stop().await;
    drop(rx);
}

/// What [`hanging_and_fast`] saw.
struct Hanging {
    /// How long the fast subscribers took to get all 40 items.
    fast_done: Duration,
    /// Requests the hanging subscribers got by then.
    stuck_requests: usize,
    /// The most requests the hanging endpoint held at once.
    stuck_max_in_flight: usize,
}

/// 40 items for `stuck` subscribers at an endpoint that never answers and
/// `fast` ones at a quick receiver, 16 slots, `per_subscriber` each, the
/// given timeout and a 10 s lease.
async fn hanging_and_fast(
    stuck: usize,
    fast: usize,
    per_subscriber: usize,
    timeout: Duration,
) -> Hanging {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut stuck_rx = Receiver::start().await;
    stuck_rx.otherwise(Reply {
        status: 200,
        delay: Duration::from_secs(30),
        ..Reply::default()
    });
    let mut fast_rx = Receiver::start().await;
    for (rx, count) in [(&stuck_rx, stuck), (&fast_rx, fast)] {
        for i in 0..count {
            subscribe(&db, "item.*", &rx.url(&format!("/{i}")), None, "secret").await;
        }
    }
    let mut config = t.config();
    config.delivery.timeout = timeout;
    config.delivery.lease_setting = Some(Duration::from_secs(10));
    config.delivery.concurrency = 16;
    config.delivery.per_subscriber_concurrency = per_subscriber;
    let daemon = Daemon::start(config);
    db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 40)")
        .await
        .expect("insert");
    let started = Instant::now();
    fast_rx.expect(40 * fast, WAIT, QUIET).await;
    let fast_done = started.elapsed();
    let mut stuck_requests = 0;
    while stuck_rx.next(Duration::ZERO).await.is_some() {
        stuck_requests += 1;
    }
    daemon.stop().await;
    Hanging {
        fast_done,
        stuck_requests,
        stuck_max_in_flight: stuck_rx.max_in_flight(),
    }
}

#[tokio::test]
async fn a_hanging_subscriber_does_not_hold_up_the_others() {
    // The stuck subscriber needs 40 × 2 s / 4 = 20 s at least; the other
    // 360 deliveries must not wait for it.
    let seen = hanging_and_fast(1, 9, 4, Duration::from_secs(2)).await;
    assert!(
        seen.stuck_requests <= 4 * (1 + seen.fast_done.as_secs() as usize),
        "{} requests to the stuck subscriber in {:?}",
        seen.stuck_requests,
        seen.fast_done
    );
    assert!(
        seen.stuck_max_in_flight <= 4,
        "per-subscriber limit exceeded"
    );
}

/// Hanging endpoints whose shares add up to more than every slot: after
/// their first timeouts each is on probation (two requests at a time, no
/// waiting line), so the healthy subscriber still gets slots instead of
/// waiting for their backlog to time out request by request.
#[tokio::test]
async fn hanging_subscribers_never_hold_every_slot() {
    let seen = hanging_and_fast(4, 1, 8, Duration::from_secs(1)).await;
    // All 16 slots at first, then 2 per hanging subscriber per timeout;
    // without probation their lines kept all 16 busy, one timeout after
    // another, until their 160 deliveries had been tried.
    assert!(
        seen.stuck_requests <= 16 + 8 * (1 + seen.fast_done.as_secs() as usize),
        "{} requests to the hanging subscribers in {:?}",
        seen.stuck_requests,
        seen.fast_done
    );
}

#[tokio::test]
async fn ordered_subscribers_get_one_at_a_time_in_event_order() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    // Item 1 dies after its three tries (the test schedule has two
    // retries); item 3 needs one retry; everything is a little slow.
    let slow = |status| Reply {
        status,
        delay: Duration::from_millis(20),
        ..Reply::default()
    };
    for status in [500, 500, 500, 200, 500] {
        rx.reply(slow(status));
    }
    rx.otherwise(slow(200));
    db.execute(
        "INSERT INTO thorn.subscriber (event, url, hmac_secret, ordered) VALUES ('item.*', $1, 'secret', true)",
        &[&rx.url("/")],
    )
    .await
    .expect("subscriber");
    db.batch_execute("INSERT INTO item (n) SELECT generate_series(1, 8)")
        .await
        .expect("insert");
    let mut config = t.config();
    config.delivery.concurrency = 16;
    let daemon = Daemon::start(config);
    let got = rx.expect(11, WAIT, QUIET).await;
    let order: Vec<i64> = got.iter().map(item).collect();
    // The dead first delivery stops blocking the queue once it is dead.
    assert_eq!(order, [1, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8]);
    assert_eq!(rx.max_in_flight(), 1);
    daemon.stop().await;
}

/// Dispatchers claim events with SKIP LOCKED, so with several daemons a
/// later event's deliveries may be written before an earlier one's. An
/// ordered subscriber's delivery waits until every earlier event is
/// dispatched. Here a transaction holds the first event as another
/// daemon's dispatcher would, while the daemon dispatches the second.
#[tokio::test]
async fn an_ordered_subscriber_waits_for_earlier_events_still_being_dispatched() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    db.execute(
        "INSERT INTO thorn.subscriber (event, url, hmac_secret, ordered) VALUES ('item.*', $1, 'secret', true)",
        &[&rx.url("/")],
    )
    .await
    .expect("subscriber");
    db.batch_execute("INSERT INTO item (n) VALUES (1); INSERT INTO item (n) VALUES (2);")
        .await
        .expect("two events");
    let other = db.transaction().await.expect("transaction");
    other
        .batch_execute("SELECT 1 FROM thorn.event WHERE data->>'n' = '1' FOR UPDATE")
        .await
        .expect("the first event, held");
    let daemon = Daemon::start(t.config());
    eventually(
        &t.client().await,
        "SELECT dispatched_at IS NOT NULL FROM thorn.event WHERE data->>'n' = '2'",
    )
    .await;
    assert!(
        rx.next(Duration::from_secs(1)).await.is_none(),
        "sent ahead of item 1"
    );
    other.rollback().await.expect("let go");
    let got = rx.expect(2, WAIT, QUIET).await;
    assert_eq!(got.iter().map(item).collect::<Vec<_>>(), [1, 2]);
    daemon.stop().await;
}

#[tokio::test]
async fn retention_prunes_old_rows_and_keeps_pending_ones() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    item_table(&db).await;
    let rx = Receiver::start().await;
    rx.respond_with(&[500, 500, 500]);
    subscribe(&db, "item.*", &rx.url("/"), None, "secret").await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO item (n) VALUES (1)")
        .await
        .expect("insert");
    eventually(
        &db,
        "SELECT count(*) = 1 FROM thorn.delivery WHERE state = 'dead'",
    )
    .await;
    db.batch_execute("INSERT INTO item (n) VALUES (2), (3)")
        .await
        .expect("insert");
    eventually(
        &db,
        "SELECT count(*) FILTER (WHERE state = 'delivered') = 2
            AND count(*) FILTER (WHERE state = 'dead') = 1 FROM thorn.delivery",
    )
    .await;
    daemon.stop().await;
    // One more event, dispatched but not yet sent: it must survive.
    db.batch_execute(
        "INSERT INTO item (n) VALUES (4);
         INSERT INTO thorn.delivery (id, event_id, subscriber_id, next_attempt_at)
         SELECT gen_random_uuid(), max(e.id), (SELECT id FROM thorn.subscriber), now() + interval '1 hour'
         FROM thorn.event e;
         UPDATE thorn.event SET dispatched_at = now() WHERE dispatched_at IS NULL;",
    )
    .await
    .expect("pending delivery");
    tokio::time::sleep(Duration::from_millis(50)).await;

    let mut settings = t.config().retention;
    settings.delivered = Duration::from_millis(10);
    settings.dead = Duration::from_secs(3600);
    // Shutdown cuts a pass short: stopped before its first batch, it
    // deletes nothing.
    let stopped = tokio_util::sync::CancellationToken::new();
    stopped.cancel();
    let pruned = thorn::retention::prune(&mut db, &settings, &stopped)
        .await
        .expect("prune");
    assert_eq!((pruned.delivered, pruned.dead, pruned.events), (0, 0, 0));
    let go_on = tokio_util::sync::CancellationToken::new();
    let pruned = thorn::retention::prune(&mut db, &settings, &go_on)
        .await
        .expect("prune");
    assert_eq!((pruned.delivered, pruned.dead, pruned.events), (2, 0, 2));
    settings.dead = Duration::from_millis(10);
    let pruned = thorn::retention::prune(&mut db, &settings, &go_on)
        .await
        .expect("prune");
    assert_eq!((pruned.delivered, pruned.dead, pruned.events), (0, 1, 1));
    let left: (i64, i64) = db
        .query_one(
            "SELECT (SELECT count(*) FROM thorn.event), (SELECT count(*) FROM thorn.delivery WHERE state = 'pending')",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("counts");
    assert_eq!(left, (1, 1), "the pending delivery and its event stay");
}

/// Retention locks an event batch before it deletes it. A replay of one
/// of those events meanwhile waits on the lock, then fails as a whole,
/// saying why, instead of leaving a delivery for the cascade to delete
/// unseen: by id, it finds the event gone; by time, its insert's foreign
/// key check fails.
#[tokio::test]
async fn a_replay_of_an_event_being_pruned_fails_and_says_so() {
    let t = TestDb::new().await;
    let mut pruner = t.client().await;
    let db = t.client().await;
    item_table(&db).await;
    let sub = subscribe(&db, "item.*", "http://127.0.0.1:9/", None, "secret").await;
    db.batch_execute(
        "INSERT INTO item (n) VALUES (1);
         UPDATE thorn.event SET dispatched_at = now() - interval '1 day'",
    )
    .await
    .expect("an old dispatched event");
    let id: i64 = db
        .query_one("SELECT id FROM thorn.event", &[])
        .await
        .expect("event")
        .get(0);

    // What a retention batch does: lock, then delete what nothing refers to.
    let tx = pruner.transaction().await.expect("begin");
    tx.execute("SELECT 1 FROM thorn.event WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .expect("lock");
    let by_id = thorn::cli::replay::Events {
        ids: vec![id],
        ..Default::default()
    };
    let by_time = thorn::cli::replay::Events {
        from: Some(std::time::SystemTime::UNIX_EPOCH),
        ..Default::default()
    };
    let mut replays = Vec::new();
    for events in [by_id, by_time] {
        let mut db = t.client().await;
        replays.push(tokio::spawn(async move {
            thorn::cli::replay::replay(&mut db, sub, &events)
                .await
                .map_err(|e| e.to_string())
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        replays.iter().all(|r| !r.is_finished()),
        "the replays wait for the lock"
    );
    let deleted = tx
        .execute(
            "DELETE FROM thorn.event e WHERE e.id = $1
               AND NOT EXISTS (SELECT 1 FROM thorn.delivery d WHERE d.event_id = e.id)",
            &[&id],
        )
        .await
        .expect("delete");
    assert_eq!(deleted, 1);
    tx.commit().await.expect("commit");
    let mut errors = Vec::new();
    for replay in replays {
        errors.push(replay.await.expect("task").expect_err("the event is gone"));
    }
    assert!(
        errors[0].contains(&format!("no dispatched event {id}")),
        "{errors:?}"
    );
    assert!(errors[1].contains("pruned by retention"), "{errors:?}");
    let deliveries: i64 = db
        .query_one("SELECT count(*) FROM thorn.delivery", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(deliveries, 0);
}

/// A replay hands a subscriber only events it would receive now, by its
/// pattern and the sender rule: by time, the others are left out; by id,
/// one of them fails the whole replay, naming it.
#[tokio::test]
async fn a_replay_sends_only_what_the_subscriber_would_receive() {
    let t = TestDb::new().await;
    let mut db = t.client().await;
    let bob = subscribe(&db, "item.*", "http://127.0.0.1:9/", Some("bob"), "secret").await;
    let ids: Vec<i64> = db
        .query(
            "INSERT INTO thorn.event (name, sender, data, dispatched_at)
             VALUES ('item.created', 'bob', '{}', now()),
                    ('item.created', NULL, '{}', now()),
                    ('item.created', 'alice', '{}', now()),
                    ('payroll.created', NULL, '{}', now())
             RETURNING id",
            &[],
        )
        .await
        .expect("events")
        .iter()
        .map(|r| r.get(0))
        .collect();
    use thorn::cli::replay::{replay, Events};
    let by_time = Events {
        from: Some(std::time::SystemTime::UNIX_EPOCH),
        ..Default::default()
    };
    let sent = replay(&mut db, bob, &by_time).await.expect("by time");
    assert_eq!(sent.len(), 2);
    let by_id = Events {
        ids: ids.clone(),
        ..Default::default()
    };
    let error = replay(&mut db, bob, &by_id)
        .await
        .expect_err("alice's and the payroll event are not bob's")
        .to_string();
    assert!(
        error.starts_with(&format!("event {}, {} is not for", ids[2], ids[3])),
        "{error}"
    );
    let sent: Vec<i64> = db
        .query("SELECT event_id FROM thorn.delivery ORDER BY event_id", &[])
        .await
        .expect("deliveries")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(sent, ids[..2]);
    // A range longer than a page of events is matched page by page.
    db.batch_execute(
        "INSERT INTO thorn.event (name, sender, data, dispatched_at)
         SELECT 'item.created', NULL, '{}', now() FROM generate_series(1, 10001)",
    )
    .await
    .expect("many events");
    let again = replay(&mut db, bob, &by_time).await.expect("by time");
    assert_eq!(again.len(), 2 + 10_001);
}

/// Runs a one-shot `thorn` command against `t`; returns its stdout.
async fn thorn(t: &TestDb, args: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("thorn-cmd-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("thorn.toml");
    std::fs::write(&file, process_config(t, "")).expect("config");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_thorn"))
        .arg("--config")
        .arg(&file)
        .args(args)
        .env_remove("THORN_DATABASE_URL")
        .output()
        .await
        .expect("run thorn");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "thorn {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test]
async fn status_retry_and_replay_commands() {
    let t = TestDb::new().await;
    let db = t.client().await;
    item_table(&db).await;
    let mut rx = Receiver::start().await;
    rx.respond_with(&[500, 500, 500]);
    let sub = subscribe(
        &db,
        "item.*",
        &rx.url("/hook?token=hunter2"),
        None,
        "s3cret-value",
    )
    .await;
    let daemon = Daemon::start(t.config());
    db.batch_execute("INSERT INTO item (n) VALUES (1)")
        .await
        .expect("insert");
    rx.expect(3, WAIT, QUIET).await; // one try, two retries: dead
    eventually(
        &db,
        "SELECT count(*) = 1 FROM thorn.delivery WHERE state = 'dead'",
    )
    .await;

    let status: serde_json::Value =
        serde_json::from_str(&thorn(&t, &["status", "--json"]).await).expect("status JSON");
    assert_eq!(status["deliveries"]["dead"], 1);
    assert_eq!(status["deliveries"]["delivered"], 0);
    assert_eq!(status["pending_events"], 0);
    assert_eq!(status["failing_subscribers"][0]["id"], sub.to_string());
    let text = thorn(&t, &["status"]).await;
    assert!(text.contains("1 dead"), "{text}");
    for shown in [status.to_string(), text] {
        assert!(
            !shown.contains("hunter2") && !shown.contains("s3cret"),
            "{shown}"
        );
    }
    // A success ends the failing streak.
    db.batch_execute("INSERT INTO item (n) VALUES (2)")
        .await
        .expect("insert");
    rx.expect(1, WAIT, QUIET).await;
    eventually(&db, "SELECT failing_since IS NULL FROM thorn.subscriber").await;

    let retried = thorn(&t, &["retry", "--subscriber", &sub.to_string()]).await;
    assert!(retried.contains("re-queued 1"), "{retried}");
    let again = rx.expect(1, WAIT, QUIET).await.remove(0);
    assert_eq!(item(&again), 1);
    eventually(
        &db,
        "SELECT bool_and(state = 'delivered') FROM thorn.delivery",
    )
    .await;

    let first_event: i64 = db
        .query_one("SELECT min(id) FROM thorn.event", &[])
        .await
        .expect("event")
        .get(0);
    let replayed: serde_json::Value = serde_json::from_str(
        &thorn(
            &t,
            &[
                "replay",
                "--subscriber",
                &sub.to_string(),
                "--event",
                &first_event.to_string(),
                "--json",
            ],
        )
        .await,
    )
    .expect("replay JSON");
    assert_eq!(replayed["deliveries"].as_array().map(Vec::len), Some(1));
    let replay = rx.expect(1, WAIT, QUIET).await.remove(0);
    assert_eq!(item(&replay), 1);
    assert_eq!(replay.header("hook-delivery"), replayed["deliveries"][0]);
    // An id that is not there fails, naming it, and replays nothing else.
    let missing = (first_event + 1000).to_string();
    let (code, _, err) = crate::support::thorn_cli(
        &t.url,
        &[
            "replay",
            "--subscriber",
            &sub.to_string(),
            "--event",
            &first_event.to_string(),
            "--event",
            &missing,
        ],
    )
    .await;
    assert!(code != 0 && err.contains(&missing), "{code}: {err}");
    assert!(rx.next(QUIET).await.is_none(), "replayed anyway");
    daemon.stop().await;
}
