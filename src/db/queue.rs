//! The queue queries: claiming events and fanning them out, claiming due
//! deliveries under a lease, and recording outcomes in batches.
//!
//! Statements are prepared once per connection ([`Statements`]); every hot
//! query works on a batch of rows through arrays (`unnest`, `ANY`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio_postgres::{Client, GenericClient, Statement};
use uuid::Uuid;

use crate::db::subscribers::Subscription;
use crate::matcher::{Pattern, Subscriber};
use crate::sign::Secret;

/// An outbox row waiting to be matched.
#[derive(Debug)]
pub struct PendingEvent {
    pub id: i64,
    /// `created_at` in microseconds since 1970 (`None` for ±infinity,
    /// which only a hand-written row can hold): with the id, it names the
    /// event even if the id sequence is ever set back (ids then repeat).
    pub created_us: Option<i64>,
    pub name: String,
    pub sender: Option<String>,
}

/// A delivery this daemon now holds a lease on, with what sending it needs.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    /// Attempts already made before this one.
    pub attempts: i32,
    pub event_id: i64,
    pub event: String,
    pub reference: Option<String>,
    pub sender: Option<String>,
    /// The event's payload, shared by the claim's deliveries of the event:
    /// an event fanned out to many subscribers is held once.
    pub data: Arc<str>,
    pub subscriber_id: Uuid,
    pub url: String,
    pub secret: Secret,
    pub digest: String,
    pub content_type: String,
    pub active: bool,
    /// One at a time, in event order: a line must not hold its deliveries.
    pub ordered: bool,
    /// `sign` or `compat`: the Hook-HMAC scheme.
    pub signer: String,
    /// Age of the event (since its transaction's `now()`) at the claim.
    pub event_age: Duration,
    /// Taken before the claim was sent, so never later than the start of
    /// its lease.
    pub claimed_at: Instant,
    /// The lease the claim holds: the `next_attempt_at` it wrote. Only the
    /// holder of that lease writes the delivery's outcome or releases it
    /// (COMPLETE, [`release`]): a claim whose lease ran out, and perhaps
    /// went to another claim, changes nothing.
    pub lease: SystemTime,
}

impl Claimed {
    /// Whether this delivery, claimed a while ago, would still go out as it
    /// was claimed to the subscriber `now` (its row as it is now).
    pub fn sends_as(&self, now: &Subscription) -> bool {
        self.active == now.active
            && self.ordered == now.ordered
            && self.url == now.url
            && self.secret.0 == now.hmac_secret.0
            && self.digest == now.hmac_digest
            && self.content_type == now.content_type
            && self.signer == now.hmac_signer
    }
}

/// What a claim may take per subscriber: `limit` for a subscriber this
/// sender holds nothing of, and for the ones it holds, their own room.
#[derive(Debug, Default)]
pub struct Room {
    pub limit: usize,
    /// Subscribers with deliveries held, and how many more each may take.
    pub subscribers: Vec<Uuid>,
    pub rooms: Vec<i32>,
}

impl Room {
    /// The deliveries the held subscribers have room for, in all.
    pub fn held_room(&self) -> usize {
        self.rooms
            .iter()
            .map(|&n| usize::try_from(n).unwrap_or(0))
            .sum()
    }
}

/// How an attempt ended, as stored on the delivery row.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: Uuid,
    /// The lease the attempt was made under (see [`Claimed::lease`]).
    pub lease: SystemTime,
    /// `delivered`, `pending` (retry after `retry_in`) or `dead`.
    pub state: &'static str,
    pub retry_in: Duration,
    pub status_code: Option<i32>,
    pub error_class: Option<&'static str>,
    pub error: Option<String>,
    pub duration_ms: i32,
    pub response: Option<String>,
}

// Pending events lie above the outbox horizon (sql/0007_horizon.sql), found
// on the primary key: writers maintain no index for them.
const CLAIM_EVENTS: &str = "
    SELECT id, name, sender,
           CASE WHEN isfinite(created_at) THEN (extract(epoch FROM created_at) * 1000000)::int8 END
    FROM thorn.event
    WHERE id > coalesce((SELECT low FROM thorn.outbox_horizon), 0) AND dispatched_at IS NULL
    ORDER BY id
    LIMIT $1
    FOR UPDATE SKIP LOCKED";

const INSERT_DELIVERIES: &str = "
    INSERT INTO thorn.delivery (id, event_id, subscriber_id)
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[])";

const MARK_DISPATCHED: &str = "UPDATE thorn.event SET dispatched_at = now() WHERE id = ANY($1)";

const ADVANCE_HORIZON: &str = "SELECT thorn.advance_outbox_horizon()";

/// SQL: whether the oldest pending delivery `$d` of an ordered subscriber
/// (a row with `subscriber_id` and `event_id`) may go now. Every earlier
/// event must be dispatched: dispatchers skip each other's locked events,
/// so with several daemons a later event's deliveries can be written
/// first. And nothing else of the subscriber may be out or waiting for a
/// retry (a replayed or retried older delivery is written behind one that
/// is). The horizon's `low` bounds the first scan to the events not known
/// to be dispatched.
macro_rules! ordered_turn {
    ($d:literal) => {
        concat!(
            "NOT EXISTS (SELECT 1 FROM thorn.event e
                         WHERE e.id > coalesce((SELECT low FROM thorn.outbox_horizon), 0)
                           AND e.id < ",
            $d,
            ".event_id AND e.dispatched_at IS NULL)
             AND NOT EXISTS (SELECT 1 FROM thorn.delivery f
                             WHERE f.state = 'pending'
                               AND f.subscriber_id >= ",
            $d,
            ".subscriber_id
                               AND f.subscriber_id <= ",
            $d,
            ".subscriber_id
                               AND f.next_attempt_at > now())"
        )
    };
}

// A claim pushes next_attempt_at one lease ahead: that is the lease.
//
// What a claim may take: per subscriber, its room ($3 for the subscribers
// $2 this sender holds deliveries of, $4 for any other); of an ordered
// subscriber only its oldest pending delivery, and only if that one is due
// (so one at a time, in event order).
//
// Two ways to find it, each cheap where the other is not:
//
// - `head`: the first $1 due rows in due order (`delivery_due`). When they
//   are every due row, or give a full batch, that is the answer. This is
//   the usual case, and its cost does not depend on how many subscribers
//   have deliveries waiting for a later retry.
// - Otherwise the head is full of rows no one can take now (a subscriber at
//   its limit, an ordered one behind its oldest), and walking further in due
//   order would read all of them: 42 ms per claim behind 100,000 rows of one
//   subscriber at its limit, 700 ms behind an ordered one's. So the claim
//   goes round the subscribers that have pending rows instead (`ring`), one
//   descent of `delivery_subscriber_due` each, from the one after $5 (where
//   the last claim ended), taking from each what it has room for, until the
//   batch is full. That costs a few µs per subscriber passed over, whatever
//   their backlogs (sql/0011_subscriber_due.sql).
//
// `ring` yields, per subscriber with pending rows, its id and earliest
// next_attempt_at (the first entry of its index range): first those after
// the cursor (lap 0), then from the start up to the cursor (lap 1). The seed
// row is the cursor itself and is never taken (its first_due is NULL). The
// step's UNION ALL … LIMIT 1 runs its branches in order (a statement that
// writes is never run in parallel).
//
// One subscriber's rows are read with a range on subscriber_id, not `=`:
// with `=` the subscriber is fixed, so another index yields the same order
// (`delivery_due` for due order, `delivery_event` for event order), and
// the planner may walk it and filter: every due row, or every delivery.
//
// Rows are locked by id (FOR UPDATE OF d SKIP LOCKED); the recheck that
// they are still due is a CASE, so no plan can turn it into an index walk.
// Only delivery rows are locked, so daemons never queue on a subscriber.
pub const CLAIM_DELIVERIES: &str = concat!(
    "
    WITH RECURSIVE held (subscriber_id, room) AS (
        SELECT * FROM unnest($2::uuid[], $3::int4[])
    ), head AS (
        SELECT d.id, d.subscriber_id, d.event_id, d.next_attempt_at FROM thorn.delivery d
        WHERE d.state = 'pending' AND d.next_attempt_at <= now()
        ORDER BY d.next_attempt_at
        LIMIT $1
    ), head_pick AS (
        SELECT c.id FROM (
            SELECT h.id,
                   row_number() OVER (PARTITION BY h.subscriber_id ORDER BY h.next_attempt_at) AS nth,
                   coalesce((SELECT b.room FROM held b
                             WHERE b.subscriber_id = h.subscriber_id), $4::int4) AS room
            FROM head h
            WHERE (SELECT NOT s.ordered OR h.id = (
                          SELECT o.id FROM thorn.delivery o
                          WHERE o.state = 'pending'
                            AND o.subscriber_id >= h.subscriber_id
                            AND o.subscriber_id <= h.subscriber_id
                          ORDER BY o.subscriber_id, o.event_id, o.created_at, o.id
                          LIMIT 1) AND ",
    ordered_turn!("h"),
    "
                   FROM thorn.subscriber s WHERE s.id = h.subscriber_id)
        ) c
        WHERE c.nth <= c.room
    ), ring (subscriber_id, first_due, lap) AS (
        SELECT $5::uuid, NULL::timestamptz, 0
        UNION ALL
        SELECT n.subscriber_id, n.next_attempt_at, n.lap
        FROM ring r CROSS JOIN LATERAL (
            (SELECT d.subscriber_id, d.next_attempt_at, r.lap FROM thorn.delivery d
             WHERE d.state = 'pending' AND d.subscriber_id > r.subscriber_id
             ORDER BY d.subscriber_id, d.next_attempt_at LIMIT 1)
            UNION ALL
            (SELECT d.subscriber_id, d.next_attempt_at, 1 FROM thorn.delivery d
             WHERE r.lap = 0 AND d.state = 'pending'
             ORDER BY d.subscriber_id, d.next_attempt_at LIMIT 1)
            LIMIT 1
        ) n
        WHERE n.lap = 0 OR n.subscriber_id <= $5
    ), turn AS (
        SELECT r.subscriber_id,
               (SELECT s.ordered FROM thorn.subscriber s WHERE s.id = r.subscriber_id) AS ordered,
               coalesce((SELECT b.room FROM held b
                         WHERE b.subscriber_id = r.subscriber_id), $4::int4) AS room
        FROM ring r
        WHERE r.first_due <= now()
    ), ring_pick AS (
        SELECT x.id FROM turn t CROSS JOIN LATERAL (
            (SELECT d.id FROM thorn.delivery d
             WHERE NOT t.ordered AND d.state = 'pending' AND d.next_attempt_at <= now()
               AND d.subscriber_id >= t.subscriber_id AND d.subscriber_id <= t.subscriber_id
             ORDER BY d.subscriber_id, d.next_attempt_at
             LIMIT t.room)
            UNION ALL
            SELECT oldest.id FROM (
                SELECT d.id, d.subscriber_id, d.event_id, d.next_attempt_at FROM thorn.delivery d
                WHERE t.ordered AND d.state = 'pending'
                  AND d.subscriber_id >= t.subscriber_id AND d.subscriber_id <= t.subscriber_id
                ORDER BY d.subscriber_id, d.event_id, d.created_at, d.id
                LIMIT 1
            ) oldest
            WHERE oldest.next_attempt_at <= now() AND ",
    ordered_turn!("oldest"),
    "
        ) x
        WHERE t.room > 0
        LIMIT $1
    ), way AS (
        -- Round only when the head was full and gave less than a batch.
        SELECT (SELECT count(*) FROM head) >= $1
               AND (SELECT count(*) FROM head_pick) < $1 AS round
    ), pick AS (
        SELECT id FROM head_pick WHERE NOT (SELECT round FROM way)
        UNION ALL
        SELECT id FROM ring_pick WHERE (SELECT round FROM way)
    ), due AS (
        SELECT d.id, p.ord
        FROM unnest(ARRAY(SELECT id FROM pick)) WITH ORDINALITY AS p (id, ord)
        JOIN thorn.delivery d ON d.id = p.id
        WHERE CASE WHEN d.state = 'pending' THEN d.next_attempt_at <= now() END
        FOR UPDATE OF d SKIP LOCKED
    ), claimed AS (
        UPDATE thorn.delivery d SET next_attempt_at = now() + $6::float8 * interval '1 second'
        FROM due WHERE d.id = due.id
        RETURNING d.id, d.attempts, d.event_id, d.subscriber_id, d.next_attempt_at, due.ord
    )
    SELECT c.id, c.attempts, c.event_id, e.name, e.ref, e.sender, e.data::text,
           s.id, s.url, s.hmac_secret, s.hmac_digest, s.content_type, s.active,
           s.hmac_signer, CASE WHEN isfinite(e.created_at) THEN extract(epoch FROM now() - e.created_at) ELSE 0 END::float8, c.next_attempt_at,
           s.ordered
    FROM claimed c
    JOIN thorn.event e ON e.id = c.event_id
    JOIN thorn.subscriber s ON s.id = c.subscriber_id
    ORDER BY c.ord
"
);

/// Records the outcomes of attempts, each only if its delivery still holds
/// the lease the attempt was made under ($9): an outcome that comes after
/// the lease ran out and another claim took the delivery over must not
/// overwrite that claim's lease (it sends the delivery again). That also
/// makes writing a batch again harmless: rows already written hold no
/// lease any more.
///
/// Rows are fetched by id (`id = ANY`, a primary-key lookup per id), and the
/// pending and lease tests are a CASE, so that no cached plan can reach them
/// by walking a queue index instead: one built while the table held a few
/// rows chose to hash-join every pending delivery (the whole backlog) at
/// each call, 29 ms per completion at 100,000 pending.
pub const COMPLETE: &str = "
    UPDATE thorn.delivery d SET
        state = u.state,
        attempts = d.attempts + 1,
        last_attempt_at = now(),
        next_attempt_at = CASE WHEN u.state = 'pending'
                               THEN now() + u.delay_ms * interval '1 millisecond'
                               ELSE d.next_attempt_at END,
        status_code = u.status_code,
        error_class = u.error_class,
        error = u.error,
        duration_ms = u.duration_ms,
        response = u.response,
        delivered_at = CASE WHEN u.state = 'delivered' THEN now() END
    FROM unnest($1::uuid[], $2::text[], $3::int8[], $4::int4[], $5::text[], $6::text[],
                $7::int4[], $8::text[], $9::timestamptz[])
         AS u(id, state, delay_ms, status_code, error_class, error, duration_ms, response, lease)
    WHERE d.id = ANY ($1::uuid[]) AND d.id = u.id
      AND CASE WHEN d.state = 'pending' THEN d.next_attempt_at = u.lease END";

// Subscriber health: a success clears failing_since, a failure sets it if
// unset, and a subscriber failing longer than disable_after is switched off.
const CLEAR_FAILING: &str = "
    UPDATE thorn.subscriber SET failing_since = NULL
    WHERE id = ANY($1) AND failing_since IS NOT NULL";

const MARK_FAILING: &str = "
    UPDATE thorn.subscriber SET failing_since = now()
    WHERE id = ANY($1) AND NOT id = ANY($2) AND failing_since IS NULL";

const DISABLE_FAILING: &str = "
    UPDATE thorn.subscriber
    SET active = false,
        deactivated_reason = 'no successful delivery since ' || failing_since
    WHERE id = ANY($1) AND active
      AND failing_since < now() - $2::float8 * interval '1 second'
    RETURNING id";

/// The hot statements, prepared on one connection.
pub struct Statements {
    advance_horizon: Statement,
    claim_events: Statement,
    insert_deliveries: Statement,
    mark_dispatched: Statement,
    claim_deliveries: Statement,
    complete: Statement,
    clear_failing: Statement,
    mark_failing: Statement,
    disable_failing: Statement,
}

impl Statements {
    pub async fn prepare(client: &Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            advance_horizon: client.prepare(ADVANCE_HORIZON).await?,
            claim_events: client.prepare(CLAIM_EVENTS).await?,
            insert_deliveries: client.prepare(INSERT_DELIVERIES).await?,
            mark_dispatched: client.prepare(MARK_DISPATCHED).await?,
            claim_deliveries: client.prepare(CLAIM_DELIVERIES).await?,
            complete: client.prepare(COMPLETE).await?,
            clear_failing: client.prepare(CLEAR_FAILING).await?,
            mark_failing: client.prepare(MARK_FAILING).await?,
            disable_failing: client.prepare(DISABLE_FAILING).await?,
        })
    }

    /// One step of moving the outbox horizon up; must be the first
    /// statement of its transaction. True once it has caught up with every
    /// event id handed out.
    pub async fn advance_horizon(
        &self,
        db: &impl GenericClient,
    ) -> Result<bool, tokio_postgres::Error> {
        db.query_one(&self.advance_horizon, &[]).await?.try_get(0)
    }

    pub async fn claim_events(
        &self,
        db: &impl GenericClient,
        limit: i64,
    ) -> Result<Vec<PendingEvent>, tokio_postgres::Error> {
        let rows = db.query(&self.claim_events, &[&limit]).await?;
        rows.iter()
            .map(|r| {
                Ok(PendingEvent {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    sender: r.try_get(2)?,
                    created_us: r.try_get(3)?,
                })
            })
            .collect()
    }

    pub async fn insert_deliveries(
        &self,
        db: &impl GenericClient,
        ids: &[Uuid],
        events: &[i64],
        subscribers: &[Uuid],
    ) -> Result<u64, tokio_postgres::Error> {
        db.execute(&self.insert_deliveries, &[&ids, &events, &subscribers])
            .await
    }

    pub async fn mark_dispatched(
        &self,
        db: &impl GenericClient,
        events: &[i64],
    ) -> Result<u64, tokio_postgres::Error> {
        db.execute(&self.mark_dispatched, &[&events]).await
    }

    /// Claims up to `limit` due deliveries, within each subscriber's room
    /// (see CLAIM_DELIVERIES). When it goes round the subscribers, it starts
    /// after `after`, and the last delivery's subscriber is where the next
    /// claim should start after.
    pub async fn claim_deliveries(
        &self,
        db: &impl GenericClient,
        limit: i64,
        lease: Duration,
        room: &Room,
        after: Uuid,
    ) -> Result<Vec<Claimed>, tokio_postgres::Error> {
        let per_subscriber = i32::try_from(room.limit).unwrap_or(i32::MAX);
        // The lease starts at the statement's now(), some time after this
        // and before the rows come back; a delivery's age counted from here
        // is never less than its lease's.
        let claimed_at = Instant::now();
        let rows = db
            .query(
                &self.claim_deliveries,
                &[
                    &limit,
                    &room.subscribers,
                    &room.rooms,
                    &per_subscriber,
                    &after,
                    &lease.as_secs_f64(),
                ],
            )
            .await?;
        let mut payloads: HashMap<i64, Arc<str>> = HashMap::new();
        rows.iter()
            .map(|r| {
                let event_id = r.try_get(2)?;
                let data = match payloads.get(&event_id) {
                    Some(data) => data.clone(),
                    None => {
                        let data: Arc<str> = Arc::from(r.try_get::<_, &str>(6)?);
                        payloads.insert(event_id, data.clone());
                        data
                    }
                };
                Ok(Claimed {
                    id: r.try_get(0)?,
                    attempts: r.try_get(1)?,
                    event_id,
                    event: r.try_get(3)?,
                    reference: r.try_get(4)?,
                    sender: r.try_get(5)?,
                    data,
                    subscriber_id: r.try_get(7)?,
                    url: r.try_get(8)?,
                    secret: Secret(r.try_get(9)?),
                    digest: r.try_get(10)?,
                    content_type: r.try_get(11)?,
                    active: r.try_get(12)?,
                    signer: r.try_get(13)?,
                    event_age: Duration::try_from_secs_f64(r.try_get::<_, f64>(14)?.max(0.0))
                        .unwrap_or_default(),
                    claimed_at,
                    lease: r.try_get(15)?,
                    ordered: r.try_get(16)?,
                })
            })
            .collect()
    }

    pub async fn complete(
        &self,
        db: &impl GenericClient,
        done: &[Completion],
    ) -> Result<u64, tokio_postgres::Error> {
        let ids: Vec<Uuid> = done.iter().map(|c| c.id).collect();
        let states: Vec<&str> = done.iter().map(|c| c.state).collect();
        let delays: Vec<i64> = done
            .iter()
            .map(|c| i64::try_from(c.retry_in.as_millis()).unwrap_or(i64::MAX))
            .collect();
        let codes: Vec<Option<i32>> = done.iter().map(|c| c.status_code).collect();
        let classes: Vec<Option<&str>> = done.iter().map(|c| c.error_class).collect();
        let errors: Vec<Option<&str>> = done.iter().map(|c| c.error.as_deref()).collect();
        let durations: Vec<i32> = done.iter().map(|c| c.duration_ms).collect();
        let responses: Vec<Option<&str>> = done.iter().map(|c| c.response.as_deref()).collect();
        let leases: Vec<SystemTime> = done.iter().map(|c| c.lease).collect();
        db.execute(
            &self.complete,
            &[
                &ids, &states, &delays, &codes, &classes, &errors, &durations, &responses, &leases,
            ],
        )
        .await
    }

    /// Tracks how long subscribers have been failing (see CLEAR_FAILING);
    /// returns the subscribers it switched off.
    pub async fn record_health(
        &self,
        db: &impl GenericClient,
        succeeded: &[Uuid],
        failed: &[Uuid],
        disable_after: Duration,
    ) -> Result<Vec<Uuid>, tokio_postgres::Error> {
        if !succeeded.is_empty() {
            db.execute(&self.clear_failing, &[&succeeded]).await?;
        }
        if failed.is_empty() {
            return Ok(Vec::new());
        }
        db.execute(&self.mark_failing, &[&failed, &succeeded])
            .await?;
        let rows = db
            .query(
                &self.disable_failing,
                &[&failed, &disable_after.as_secs_f64()],
            )
            .await?;
        rows.iter().map(|r| r.try_get(0)).collect()
    }
}

/// The subscriber version, read before the subscribers it guards.
pub async fn subscriber_version(db: &impl GenericClient) -> Result<i64, tokio_postgres::Error> {
    db.query_one("SELECT version FROM thorn.subscriber_version", &[])
        .await?
        .try_get(0)
}

pub async fn active_subscribers(
    db: &impl GenericClient,
) -> Result<Vec<Subscriber>, tokio_postgres::Error> {
    let rows = db
        .query(
            "SELECT id, event, owner FROM thorn.subscriber WHERE active ORDER BY created_at, id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Subscriber {
                id: r.try_get(0)?,
                pattern: Pattern::parse(r.try_get(1)?),
                owner: r.try_get(2)?,
            })
        })
        .collect()
}

/// Gives claimed deliveries back at once (the lease is dropped), those
/// whose leases are still the given ones: a lease that ran out may be
/// another claim's now.
pub async fn release(
    db: &impl GenericClient,
    leases: &[(Uuid, SystemTime)],
) -> Result<u64, tokio_postgres::Error> {
    let now: Vec<(Uuid, SystemTime, Duration)> = leases
        .iter()
        .map(|&(id, lease)| (id, lease, Duration::ZERO))
        .collect();
    release_after(db, &now).await
}

/// Gives claimed deliveries back (id, lease, wait), each due again after
/// its wait, counted on the database's clock; as [`release`], only where
/// the lease is still the given one.
pub async fn release_after(
    db: &impl GenericClient,
    given: &[(Uuid, SystemTime, Duration)],
) -> Result<u64, tokio_postgres::Error> {
    let (mut ids, mut leases, mut waits) = (Vec::new(), Vec::new(), Vec::new());
    for &(id, lease, wait) in given {
        ids.push(id);
        leases.push(lease);
        waits.push(wait.as_secs_f64());
    }
    db.execute(
        "UPDATE thorn.delivery d SET next_attempt_at = now() + make_interval(secs => u.wait)
         FROM unnest($1::uuid[], $2::timestamptz[], $3::float8[]) AS u(id, lease, wait)
         WHERE d.id = ANY($1) AND d.id = u.id
           AND CASE WHEN d.state = 'pending' THEN d.next_attempt_at = u.lease END",
        &[&ids, &leases, &waits],
    )
    .await
}

/// Time until the earliest pending delivery is due (zero if one is due now).
pub async fn next_due(db: &impl GenericClient) -> Result<Option<Duration>, tokio_postgres::Error> {
    let secs: Option<f64> = db
        .query_one(
            "SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
             FROM thorn.delivery WHERE state = 'pending'",
            &[],
        )
        .await?
        .try_get(0)?;
    Ok(secs.map(|s| Duration::from_secs_f64(s.max(0.0))))
}

/// Deactivates subscribers, keeping the reason for operators.
pub async fn deactivate(
    db: &impl GenericClient,
    ids: &[Uuid],
    reason: &str,
) -> Result<u64, tokio_postgres::Error> {
    db.execute(
        "UPDATE thorn.subscriber SET active = false, deactivated_reason = $2
         WHERE id = ANY($1) AND active",
        &[&ids, &reason],
    )
    .await
}

/// The advisory lock a sleeping daemon holds (exclusive) and capture
/// triggers try (shared): see sql/0006_wakeup.sql.
pub const WAKEUP_LOCK: (i32, i32) = (1_953_001_330, 1);

/// What came of asking for wake-ups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arming {
    /// The lock is this session's: capture triggers NOTIFY.
    Armed,
    /// Another daemon sleeps holding it; its wake-up NOTIFY reaches every
    /// listener, this one too.
    OtherDaemon,
    /// Writers whose transactions have not ended hold it: nobody NOTIFYs,
    /// and the caller's sweep may miss their events until they commit.
    Writers,
}

/// Asks capture triggers to NOTIFY: this session is about to sleep.
pub async fn arm_wakeup(db: &impl GenericClient) -> Result<Arming, tokio_postgres::Error> {
    let row = db
        .query_one(
            "SELECT pg_try_advisory_lock($1, $2),
                    EXISTS (SELECT 1 FROM pg_locks
                            WHERE locktype = 'advisory'
                              AND database = (SELECT oid FROM pg_database
                                              WHERE datname = current_database())
                              AND classid = $1::oid
                              AND objid = $2::oid AND objsubid = 2
                              AND mode = 'ExclusiveLock' AND granted
                              AND pid <> pg_backend_pid())",
            &[&WAKEUP_LOCK.0, &WAKEUP_LOCK.1],
        )
        .await?;
    Ok(if row.try_get(0)? {
        Arming::Armed
    } else if row.try_get(1)? {
        Arming::OtherDaemon
    } else {
        Arming::Writers
    })
}

/// Stops the NOTIFYs this session asked for.
pub async fn disarm_wakeup(db: &impl GenericClient) -> Result<(), tokio_postgres::Error> {
    db.execute(
        "SELECT pg_advisory_unlock($1, $2)",
        &[&WAKEUP_LOCK.0, &WAKEUP_LOCK.1],
    )
    .await
    .map(drop)
}
