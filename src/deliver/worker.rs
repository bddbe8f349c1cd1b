//! The sender: claims due deliveries and sends each in its own task.
//!
//! Concurrency is bounded twice: a semaphore over all requests, and a count
//! per subscriber that the claim query itself respects (a subscriber with n
//! requests in flight gets at most limit − n more), so one slow endpoint
//! holds at most its own share of the slots.
//!
//! A subscriber at its limit may have more deliveries claimed and waiting
//! in memory (a line, up to [`MAX_LINES`] times its limit): a finishing
//! request starts the next one at once, instead of freeing its slot and
//! waiting for a claim round trip. Claims refill the line in the
//! background, so a single busy endpoint is kept at its limit without its
//! requests ever waiting on the database. The line is never deeper than
//! the lease allows: its last delivery starts while still fresh (see
//! [`Share`]) even if every request before it takes the whole
//! `delivery.timeout`; one that is not fresh any more when its turn comes
//! is not sent.
//!
//! A subscriber whose last request timed out or could not connect is on
//! probation: [`PROBATION_LIMIT`] requests at a time and no waiting line,
//! until a request to it is answered. A hanging endpoint otherwise holds
//! its whole share for a timeout after timeout, and eight of them (256 /
//! 32) would hold every slot. One that answered 429 or 503 with
//! `Retry-After` is paused: nothing more is sent to it until then (capped
//! by `delivery.max_retry_after`), instead of its other deliveries going
//! on at full rate and each using up an attempt on the same answer; one
//! that answered 410 Gone, for a few seconds, until it is switched off.
//!
//! While deliveries wait in lines, their subscribers' rows are looked at
//! every [`RECHECK`]: those of a subscriber switched off, deleted or
//! changed since their claim are given back, not sent as they were.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::client::{self, Attempt, Failure};
use super::complete::Done;
use super::retry;
use crate::config::Delivery as Settings;
use crate::db::{self, queue};
use crate::ops::Probe;

/// Longest wait for more free slots before a claim under load.
const GATHER: Duration = Duration::from_millis(2);

/// A waiting line holds at most this many times a subscriber's limit. One
/// line (the limit) let a single fast subscriber's requests wait on claims:
/// its 32 requests emptied a line of 32 in under a millisecond, less than a
/// claim takes. Four lines, and the next claim as soon as they have room
/// for half a line: about 17,000 deliveries/s against 10,000 (E1,
/// BENCHMARKS.md, Profiling item 16).
const MAX_LINES: usize = 4;

/// Requests at a time to a subscriber on probation (see the module's doc).
const PROBATION_LIMIT: usize = 2;

/// Probation ends this long after the last timeout if no request tells
/// otherwise (the subscriber had nothing to send meanwhile).
const PROBATION: Duration = Duration::from_secs(60);

/// What an attempt says about its subscriber's endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// An HTTP answer: ends probation.
    Answered,
    /// Timed out, or could not connect: probation.
    Hung,
    /// Asked to wait this long (429 or 503 with `Retry-After`): paused.
    Busy(Duration),
    /// No request reached it (refused before sending, DNS, TLS): says
    /// nothing about how it answers.
    Unheard,
}

impl Endpoint {
    fn of(attempt: &Attempt, settings: &Settings) -> Endpoint {
        match (attempt.result, attempt.retry_after) {
            (Err(Failure::Timeout | Failure::Connect), _) => Endpoint::Hung,
            (Err(Failure::Status(429 | 503)), Some(wait)) => {
                Endpoint::Busy(wait.min(settings.max_retry_after))
            }
            (Err(Failure::Status(410)), _) => Endpoint::Busy(GONE_HOLD),
            (Ok(_) | Err(Failure::Status(_) | Failure::Request), _) => Endpoint::Answered,
            _ => Endpoint::Unheard,
        }
    }
}

/// A subscriber's share of this sender: requests in flight at once, and
/// deliveries claimed and waiting in its line at most.
#[derive(Debug, Clone, Copy)]
struct Share {
    limit: usize,
    depth: usize,
    /// How long after its claim a waiting delivery may still be sent.
    fresh_for: Duration,
}

impl Share {
    /// A delivery sent while younger than `fresh_for` ends (after at most
    /// `timeout`) a margin before its lease does: time for its outcome to
    /// be written while the lease is still its claim's, whatever the
    /// completer's batching and the scheduler add. The margin is a tenth of
    /// the lease, at least 1 s.
    ///
    /// A delivery waits for the requests before it, `limit` at a time, each
    /// taking at most `timeout`: with `k` times the limit in line, the last
    /// starts within `k` timeouts, so `k` is the number of whole timeouts in
    /// `fresh_for`, at most [`MAX_LINES`]. None when the lease leaves less
    /// than one (the shortest leases): a subscriber at its limit then gets
    /// nothing more claimed until a request ends.
    fn new(settings: &Settings) -> Share {
        let limit = settings.per_subscriber_concurrency;
        let lease = settings.lease();
        let margin = (lease / 10).max(Duration::from_secs(1));
        let fresh_for = lease
            .saturating_sub(settings.timeout)
            .saturating_sub(margin);
        let lines = (fresh_for.as_secs_f64() / settings.timeout.as_secs_f64()).floor();
        // Float to integer casts saturate; the bound keeps it small anyway.
        let lines = (lines as usize).min(MAX_LINES);
        Share {
            limit,
            depth: limit * lines,
            fresh_for,
        }
    }

    /// The share of a paused subscriber: nothing.
    fn paused(self) -> Share {
        Share {
            limit: 0,
            depth: 0,
            ..self
        }
    }

    /// The share of a subscriber on probation.
    fn on_probation(self) -> Share {
        Share {
            limit: self.limit.min(PROBATION_LIMIT),
            depth: 0,
            ..self
        }
    }
}

/// Adds free slots to `permits`, up to `max`.
fn take_free(slots: &Arc<Semaphore>, permits: &mut Vec<OwnedSemaphorePermit>, max: usize) {
    while permits.len() < max {
        match slots.clone().try_acquire_owned() {
            Ok(p) => permits.push(p),
            Err(_) => break,
        }
    }
}

/// Naps while due rows cannot be claimed for a reason other than our own
/// limits, doubling from the first to the last while it lasts.
const BUSY_RETRY: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Longest sleep between claims when nothing is due.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// How often waiting lines are checked against their subscribers' rows
/// (see [`InFlight::recheck_lines`]).
const RECHECK: Duration = Duration::from_millis(250);

/// A subscriber that answered 410 Gone is paused this long here: its
/// waiting line is given back, and by the time it is claimed again the
/// completer has switched the subscriber off, so it ends `inactive`
/// without another request.
const GONE_HOLD: Duration = Duration::from_secs(10);

/// The deliveries this sender holds: their ids, and per subscriber the
/// requests in flight and the deliveries waiting for one of them to finish.
#[derive(Default)]
pub struct InFlight(Mutex<Tracked>);

#[derive(Default)]
struct Tracked {
    per_subscriber: HashMap<Uuid, Line>,
    /// The deliveries held, with their leases.
    deliveries: HashMap<Uuid, SystemTime>,
    /// Subscribers on probation, with the time their last request timed
    /// out or could not connect.
    probation: HashMap<Uuid, Instant>,
    /// Paused subscribers, with the end of their pause.
    paused: HashMap<Uuid, Instant>,
    /// Deliveries taken out of a restricted subscriber's line, for the
    /// sender to release (id, lease, when due again). Until then they count
    /// as held, so that shutdown releases them if the sender could not.
    given_back: Vec<(Uuid, SystemTime, Instant)>,
}

impl Tracked {
    fn share_of(&self, subscriber: Uuid, share: Share) -> Share {
        if self
            .paused
            .get(&subscriber)
            .is_some_and(|until| *until > Instant::now())
        {
            return share.paused();
        }
        match self.probation.get(&subscriber) {
            Some(since) if since.elapsed() < PROBATION => share.on_probation(),
            _ => share,
        }
    }

    /// Notes what an attempt said about its subscriber's endpoint.
    fn heard(&mut self, subscriber: Uuid, endpoint: Endpoint) {
        match endpoint {
            Endpoint::Hung => {
                self.probation.insert(subscriber, Instant::now());
            }
            Endpoint::Answered => {
                self.probation.remove(&subscriber);
            }
            Endpoint::Busy(wait) => {
                self.probation.remove(&subscriber);
                self.paused.insert(subscriber, Instant::now() + wait);
            }
            Endpoint::Unheard => {}
        }
    }

    /// Subscribers on probation or paused that hold nothing here, for
    /// claims to give their own room; forgets those whose time is over.
    fn restricted(&mut self) -> Vec<Uuid> {
        let now = Instant::now();
        self.probation
            .retain(|_, since| since.elapsed() < PROBATION);
        self.paused.retain(|_, until| *until > now);
        let mut ids: Vec<Uuid> = (self.probation.keys().chain(self.paused.keys()))
            .filter(|id| !self.per_subscriber.contains_key(id))
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[derive(Default)]
struct Line {
    sending: usize,
    waiting: VecDeque<queue::Claimed>,
}

impl Line {
    fn at_limit(&self, share: Share) -> bool {
        self.sending >= share.limit
    }

    /// What a claim may add: below the limit, the slots left; at it, the
    /// room left in the waiting line.
    fn room(&self, share: Share) -> usize {
        if self.at_limit(share) {
            share.depth.saturating_sub(self.waiting.len())
        } else {
            share.limit - self.sending
        }
    }
}

impl InFlight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Tracked> {
        // A panic while holding this lock cannot leave the maps inconsistent.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes a claimed delivery in. Below its subscriber's limit it takes
    /// one of `permits` and comes back to be sent now; at the limit it waits
    /// in line: `None`. Past both, `Err` with its id and lease, for release
    /// (the claim should have prevented it).
    fn admit(
        &self,
        delivery: queue::Claimed,
        share: Share,
        permits: &mut Vec<OwnedSemaphorePermit>,
    ) -> Result<Option<(queue::Claimed, OwnedSemaphorePermit)>, (Uuid, SystemTime)> {
        let mut t = self.lock();
        let (id, subscriber, lease) = (delivery.id, delivery.subscriber_id, delivery.lease);
        let share = t.share_of(subscriber, share);
        let line = t.per_subscriber.entry(subscriber).or_default();
        let admitted = if !line.at_limit(share) {
            let Some(permit) = permits.pop() else {
                if line.sending == 0 && line.waiting.is_empty() {
                    t.per_subscriber.remove(&subscriber);
                }
                return Err((id, lease));
            };
            line.sending += 1;
            Some((delivery, permit))
        } else if line.waiting.len() < share.depth {
            line.waiting.push_back(delivery);
            None
        } else {
            if line.sending == 0 && line.waiting.is_empty() {
                t.per_subscriber.remove(&subscriber);
            }
            return Err((id, lease));
        };
        t.deliveries.insert(id, lease);
        Ok(admitted)
    }

    /// Ends a request, noting what it said of the endpoint (probation,
    /// pause); returns the subscriber's next waiting delivery to send in
    /// the same slot, if `go_on`, the subscriber's share still has this
    /// slot, and one is still fresh (younger than `fresh_for`, see
    /// [`Share`]). Called right before that attempt, so nothing waits
    /// between the judgement and the request; older ones are left to their
    /// leases.
    fn finish(
        &self,
        delivery: Uuid,
        subscriber: Uuid,
        endpoint: Endpoint,
        go_on: bool,
        share: Share,
    ) -> Option<queue::Claimed> {
        let mut t = self.lock();
        t.deliveries.remove(&delivery);
        t.heard(subscriber, endpoint);
        let share = t.share_of(subscriber, share);
        let fresh_for = share.fresh_for;
        let line = t.per_subscriber.get_mut(&subscriber)?;
        let go_on = go_on && line.sending <= share.limit;
        let mut next = None;
        let mut stale = Vec::new();
        while go_on && next.is_none() {
            match line.waiting.pop_front() {
                Some(d) if d.claimed_at.elapsed() < fresh_for => next = Some(d),
                Some(d) => stale.push(d.id),
                None => break,
            }
        }
        // Paused or on probation, the share has no line: what waits is
        // given back, to be claimed again as the share allows (and not
        // only a lease later): when a pause ends, or now. Other daemons
        // know nothing of either, and may take them at once.
        let due = match endpoint {
            Endpoint::Busy(wait) => Instant::now() + wait,
            _ => Instant::now(),
        };
        let keep = line.waiting.len().min(share.depth);
        let given_back: Vec<(Uuid, SystemTime, Instant)> = line
            .waiting
            .drain(keep..)
            .map(|d| (d.id, d.lease, due))
            .collect();
        let mut orphans = Vec::new();
        if next.is_none() {
            line.sending -= 1;
            if line.sending == 0 {
                // Nobody is left to send what still waits (a send that
                // ended without going on): given back, due now.
                let now = Instant::now();
                orphans.extend(line.waiting.drain(..).map(|d| (d.id, d.lease, now)));
                t.per_subscriber.remove(&subscriber);
            }
        }
        for id in &stale {
            t.deliveries.remove(id);
        }
        t.given_back.extend(given_back);
        t.given_back.extend(orphans);
        drop(t);
        if !stale.is_empty() {
            tracing::warn!(
                count = stale.len(),
                "deliveries waited too long for their subscriber's requests; left to their leases"
            );
        }
        next
    }

    /// What the next claim may take per subscriber held (see
    /// [`Line::room`]), and per subscriber on probation.
    fn room(&self, share: Share) -> queue::Room {
        let mut room = queue::Room {
            limit: share.limit,
            ..queue::Room::default()
        };
        let mut t = self.lock();
        let restricted = t.restricted();
        let idle = Line::default();
        for (&id, line) in t
            .per_subscriber
            .iter()
            .chain(restricted.iter().map(|id| (id, &idle)))
        {
            room.subscribers.push(id);
            let left = line.room(t.share_of(id, share));
            room.rooms.push(i32::try_from(left).unwrap_or(i32::MAX));
        }
        room
    }

    /// The room left in the waiting lines of the subscribers at their limit.
    fn line_room(&self, share: Share) -> usize {
        let t = self.lock();
        (t.per_subscriber.iter())
            .map(|(&id, line)| (line, t.share_of(id, share)))
            .filter(|(line, share)| line.at_limit(*share))
            .map(|(line, share)| line.room(share))
            .sum()
    }

    /// Time until the first pause ends, if one is on.
    fn pause_left(&self) -> Option<Duration> {
        let now = Instant::now();
        self.lock()
            .paused
            .values()
            .map(|until| until.saturating_duration_since(now))
            .min()
    }

    /// Whether any delivery waits in a line (see [`Self::recheck_lines`]).
    fn lines_wait(&self) -> bool {
        (self.lock().per_subscriber.values()).any(|line| !line.waiting.is_empty())
    }

    /// Gives back the waiting deliveries whose subscriber's row changed
    /// since they were claimed: switched off, deleted, made ordered (one
    /// at a time), sent elsewhere or signed otherwise. A line holds claims
    /// made up to a few seconds before, which must not go out as they were
    /// (an operator's switch-off stops deliveries); claimed again, they
    /// take the row as it is now. Requests already on their way are not
    /// recalled.
    async fn recheck_lines(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let held: Vec<Uuid> = (self.lock().per_subscriber.iter())
            .filter(|(_, line)| !line.waiting.is_empty())
            .map(|(&id, _)| id)
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let rows = db::subscribers::by_ids(client, &held).await?;
        let now = Instant::now();
        let mut t = self.lock();
        let mut given_back = Vec::new();
        for id in held {
            let Some(line) = t.per_subscriber.get_mut(&id) else {
                continue;
            };
            let row = rows.get(&id);
            let (stale, kept) = std::mem::take(&mut line.waiting)
                .into_iter()
                .partition(|d| !row.is_some_and(|r| d.sends_as(r)));
            line.waiting = kept;
            if line.sending == 0 && line.waiting.is_empty() {
                t.per_subscriber.remove(&id);
            }
            given_back.extend(stale.iter().map(|d: &queue::Claimed| (d.id, d.lease, now)));
        }
        if !given_back.is_empty() {
            tracing::info!(
                count = given_back.len(),
                "waiting deliveries given back: their subscriber changed since they were claimed"
            );
        }
        t.given_back.extend(given_back);
        Ok(())
    }

    /// Releases the deliveries given back by restricted subscribers, each
    /// due when its subscriber's pause ends; kept for the next try (and
    /// for shutdown) if that fails.
    async fn release_given_back(&self, client: &Client) -> Result<(), tokio_postgres::Error> {
        let given = std::mem::take(&mut self.lock().given_back);
        if given.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let waits: Vec<(Uuid, SystemTime, Duration)> = (given.iter())
            .map(|&(id, lease, due)| (id, lease, due.saturating_duration_since(now)))
            .collect();
        if let Err(error) = queue::release_after(client, &waits).await {
            self.lock().given_back.extend(given);
            return Err(error);
        }
        let mut t = self.lock();
        for (id, _, _) in &given {
            t.deliveries.remove(id);
        }
        Ok(())
    }

    /// The deliveries claimed and not finished (in flight, waiting, or
    /// given back and not released yet), with their leases and how long
    /// each must still wait (a pause).
    pub fn deliveries(&self) -> Vec<(Uuid, SystemTime, Duration)> {
        let t = self.lock();
        let now = Instant::now();
        let waits: HashMap<Uuid, Duration> = (t.given_back.iter())
            .map(|&(id, _, due)| (id, due.saturating_duration_since(now)))
            .collect();
        (t.deliveries.iter())
            .map(|(&id, &lease)| (id, lease, waits.get(&id).copied().unwrap_or_default()))
            .collect()
    }
}

pub struct Worker {
    pub url: String,
    pub settings: Settings,
    pub client: client::Client,
    /// Woken by the dispatcher (new deliveries) and the completer (retries).
    pub ready: Arc<Notify>,
    pub done: mpsc::Sender<Done>,
    pub tracker: TaskTracker,
    pub in_flight: Arc<InFlight>,
    /// Cuts off requests still running when the shutdown grace ends.
    pub abort: CancellationToken,
    /// Heartbeat and counters for operations.
    pub probe: Probe,
}

impl Worker {
    /// Claims and sends until `shutdown`; then stops claiming. In-flight
    /// requests are tracked by `tracker` for the caller to await.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        let in_flight = self.in_flight.clone();
        let mut backoff = db::Backoff::new();
        while let Some(client) = db::connect_retrying(&self.url, "sender", &shutdown).await {
            match self
                .serve(&client, &slots, &in_flight, &mut backoff, &shutdown)
                .await
            {
                Ok(()) => return,
                Err(error) => {
                    db::warn_restart("sender", &error);
                    self.probe.failed(&error);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    async fn serve(
        &self,
        client: &Client,
        slots: &Arc<Semaphore>,
        in_flight: &Arc<InFlight>,
        backoff: &mut db::Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), tokio_postgres::Error> {
        let statements = queue::Statements::prepare(client).await?;
        let batch = usize::try_from(self.settings.batch_size).unwrap_or(usize::MAX);
        let share = Share::new(&self.settings);
        let gather = batch.min(self.settings.concurrency) / 4;
        let mut busy_retry = BUSY_RETRY.0;
        // Where in the round of subscribers the next claim starts; a random
        // start spreads several daemons over it.
        let mut after = Uuid::new_v4();
        let mut rechecked = Instant::now();
        loop {
            self.probe.beat();
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
                // Every slot taken (their senders go through their lines):
                // the lines are still looked at.
                _ = tokio::time::sleep(RECHECK), if in_flight.lines_wait() => {
                    in_flight.recheck_lines(client).await?;
                    in_flight.release_given_back(client).await?;
                    rechecked = Instant::now();
                    continue;
                }
                _ = shutdown.cancelled() => return Ok(()),
            };
            let mut permits = vec![first];
            take_free(slots, &mut permits, batch);
            // Under load, slots free up one request at a time: gather a few
            // (briefly) before claiming, so claims stay batches and not
            // single rows. An idle daemon has every slot free and claims at
            // once.
            let busy = permits.len() < self.settings.concurrency;
            if busy && permits.len() < gather {
                let deadline = tokio::time::Instant::now() + GATHER;
                while permits.len() < gather {
                    tokio::select! {
                        permit = slots.clone().acquire_owned() => match permit {
                            Ok(p) => permits.push(p),
                            Err(_) => break,
                        },
                        _ = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            if rechecked.elapsed() >= RECHECK {
                in_flight.recheck_lines(client).await?;
                rechecked = Instant::now();
            }
            in_flight.release_given_back(client).await?;
            let room = in_flight.room(share);
            // Ask for no more than the subscribers held have room for, plus
            // one subscriber's limit for others: a claim reads as many rows
            // as it asks for at the head of the queue, and with one busy
            // subscriber those would be its rows, mostly past its room.
            let wanted = permits.len().min(room.held_room() + share.limit);
            let claimed = statements
                .claim_deliveries(client, wanted as i64, self.settings.lease(), &room, after)
                .await?;
            // The connection works again: a later loss starts from the
            // shortest wait.
            backoff.reset();
            self.probe.served();
            if let Some(last) = claimed.last() {
                after = last.subscriber_id;
            }
            let got = claimed.len();
            // The claim kept to the room, so nothing should be over: a
            // miscount costs a release here, not a lease's wait.
            let mut over_limit = Vec::new();
            for delivery in claimed {
                match in_flight.admit(delivery, share, &mut permits) {
                    Ok(Some((delivery, permit))) => {
                        self.spawn_send(delivery, permit, in_flight.clone(), share, shutdown)
                    }
                    Ok(None) => {}
                    Err(lease) => over_limit.push(lease),
                }
            }
            drop(permits);
            if !over_limit.is_empty() {
                tracing::warn!(count = over_limit.len(), "claimed past a limit; released");
                queue::release(client, &over_limit).await?;
            }
            if got == wanted {
                continue;
            }
            if got > 0 {
                busy_retry = BUSY_RETRY.0;
            }
            // Requests were in flight: per-subscriber limits may be what
            // stopped the claim, and finishing requests will wake us.
            let held_back = !room.subscribers.is_empty();
            // Caught up, or held back by per-subscriber limits (then, having
            // got something, there is no need to ask what is due): sleep
            // until new work, a finished request, the next due retry or the
            // safety poll, whichever is first.
            let due = if held_back && got > 0 {
                Duration::ZERO
            } else {
                queue::next_due(client).await?.unwrap_or(Duration::MAX)
            };
            let sleep = if !due.is_zero() {
                due.min(IDLE_POLL)
            } else if !held_back {
                // Due rows we could not get: locked by another daemon's
                // claim for a moment, or an ordered subscriber's next
                // delivery, claimable once the one before is written (the
                // completer wakes us then) or retried (hours, perhaps):
                // back off while that lasts.
                let nap = busy_retry;
                busy_retry = (busy_retry * 2).min(BUSY_RETRY.1);
                nap
            } else {
                // A finishing request wakes us.
                IDLE_POLL
            };
            // Nothing wakes us when a pause ends, nor when a subscriber
            // whose deliveries wait in a line changes.
            let sleep = in_flight.pause_left().map_or(sleep, |left| sleep.min(left));
            let sleep = if in_flight.lines_wait() {
                sleep.min(RECHECK)
            } else {
                sleep
            };
            tokio::select! {
                _ = self.ready.notified() => {}
                _ = tokio::time::sleep(sleep) => continue,
                _ = shutdown.cancelled() => return Ok(()),
            }
            if held_back {
                // Let a few more requests finish, so the next claim is a
                // batch rather than one row per finished request. With a
                // backlog (this claim got rows), only until the lines have
                // room for half a line: they must not run dry while the next
                // claim runs.
                let deadline = tokio::time::Instant::now() + GATHER;
                while got == 0 || in_flight.line_room(share) < share.depth / 2 {
                    tokio::select! {
                        _ = self.ready.notified() => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                }
            }
        }
    }

    /// Sends `delivery` in its own task, then the subscriber's waiting
    /// deliveries one after another in the same slot, until none is left
    /// or the daemon stops (the ones still waiting are released then).
    fn spawn_send(
        &self,
        delivery: queue::Claimed,
        permit: OwnedSemaphorePermit,
        in_flight: Arc<InFlight>,
        share: Share,
        shutdown: &CancellationToken,
    ) {
        let client = self.client.clone();
        let done = self.done.clone();
        let ready = self.ready.clone();
        let settings = self.settings.clone();
        let abort = self.abort.clone();
        let probe = self.probe.clone();
        let stopping = shutdown.clone();
        self.tracker.spawn(async move {
            let mut delivery = delivery;
            let mut permit = Some(permit);
            let mut unwinding = FinishOnPanic {
                in_flight: in_flight.clone(),
                ready: ready.clone(),
                delivery: Some(delivery.id),
                subscriber: delivery.subscriber_id,
                share,
            };
            loop {
                unwinding.delivery = Some(delivery.id);
                let attempt = tokio::select! {
                    attempt = client.attempt(&delivery) => attempt,
                    // Past the shutdown grace: the caller releases the lease.
                    _ = abort.cancelled() => return,
                };
                let record = outcome(&delivery, &attempt, &settings);
                let c = &record.completion;
                let age = delivery.event_age + delivery.claimed_at.elapsed();
                probe
                    .metrics()
                    .attempt(c.state, c.error_class, attempt.duration, Some(age));
                let (id, subscriber) = (delivery.id, delivery.subscriber_id);
                // The completer outlives every sender, so this fails only if
                // it crashed. It may be stalled (the database is slow or
                // gone): past the shutdown grace, stop waiting. Either way
                // the outcome is lost and the lease brings the delivery back.
                let handed_over = tokio::select! {
                    biased;
                    sent = done.send(record) => sent.is_ok(),
                    _ = abort.cancelled() => false,
                };
                // Only now, right before its attempt, is the next one judged
                // fresh: handing over may have waited a while. (Finished
                // here, it is not the guard's to finish again.)
                unwinding.delivery = None;
                let next = in_flight.finish(
                    id,
                    subscriber,
                    Endpoint::of(&attempt, &settings),
                    handed_over && !stopping.is_cancelled(),
                    share,
                );
                if next.is_none() {
                    permit.take();
                }
                // A freed slot or room in the waiting line may be what the
                // claimer waits for.
                ready.notify_one();
                match next {
                    Some(next) => delivery = next,
                    None => return,
                }
            }
        });
    }
}

/// Turns an attempt into the row update, deciding retry or death.
fn outcome(d: &queue::Claimed, attempt: &Attempt, settings: &Settings) -> Done {
    let attempts = u32::try_from(d.attempts).unwrap_or(0) + 1;
    let duration_ms = i32::try_from(attempt.duration.as_millis()).unwrap_or(i32::MAX);
    let (state, retry_in, status_code, class) = match attempt.result {
        Ok(code) => ("delivered", Duration::ZERO, Some(i32::from(code)), None),
        Err(failure) => {
            let code = match failure {
                Failure::Status(code) => Some(i32::from(code)),
                _ => None,
            };
            let next = if failure.is_final() {
                None
            } else {
                retry::next_delay(
                    attempts,
                    &settings.retry_schedule,
                    attempt.retry_after,
                    settings.max_retry_after,
                )
            };
            let state = if next.is_some() { "pending" } else { "dead" };
            if next.is_none() {
                // Needs a person (`thorn retry`): seen under log.level = warn.
                tracing::warn!(
                    delivery_id = %d.id,
                    subscriber = %d.subscriber_id,
                    attempts,
                    error_class = failure.class(),
                    "delivery dead: no tries left"
                );
            }
            tracing::info!(
                delivery_id = %d.id,
                subscriber = %d.subscriber_id,
                attempt = attempts,
                error_class = failure.class(),
                status = code,
                error = attempt.error.as_deref().unwrap_or(""),
                // Absent when the delivery is now dead.
                retry_in = next.map(tracing::field::debug),
                "delivery failed"
            );
            (state, next.unwrap_or_default(), code, Some(failure.class()))
        }
    };
    Done {
        completion: queue::Completion {
            id: d.id,
            lease: d.lease,
            state,
            retry_in,
            status_code,
            error_class: class,
            error: attempt.error.clone(),
            duration_ms,
            response: attempt.response.clone(),
        },
        subscriber_id: d.subscriber_id,
        gone: attempt.result == Err(Failure::Status(410)),
        counts_for_health: !matches!(attempt.result, Err(Failure::Inactive | Failure::Invalid)),
    }
}

/// Gives a send task's slot back if the task panics, so that a bug in one
/// attempt cannot hold its subscriber's slot, and the line behind it, for
/// as long as the daemon runs (the delivery's lease brings it back). Does
/// nothing otherwise: a send that ends normally has finished already, and
/// one cut off at shutdown leaves its delivery for the caller to release.
struct FinishOnPanic {
    in_flight: Arc<InFlight>,
    ready: Arc<Notify>,
    /// The delivery being sent; `None` while [`InFlight::finish`] runs.
    delivery: Option<Uuid>,
    subscriber: Uuid,
    share: Share,
}

impl Drop for FinishOnPanic {
    fn drop(&mut self) {
        if let (true, Some(id)) = (std::thread::panicking(), self.delivery) {
            self.in_flight
                .finish(id, self.subscriber, Endpoint::Unheard, false, self.share);
            self.ready.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(timeout: u64, lease: Option<u64>) -> Share {
        Share::new(&Settings {
            timeout: Duration::from_secs(timeout),
            lease_setting: lease.map(Duration::from_secs),
            ..Settings::default()
        })
    }

    fn claimed(subscriber: Uuid) -> queue::Claimed {
        queue::Claimed {
            id: Uuid::new_v4(),
            attempts: 0,
            event_id: 1,
            event: "a.b".into(),
            reference: None,
            sender: None,
            data: Arc::from("{}"),
            subscriber_id: subscriber,
            url: "https://example.com/".into(),
            secret: crate::sign::Secret("secret".into()),
            digest: "sha256".into(),
            content_type: "application/json".into(),
            active: true,
            ordered: false,
            signer: "sign".into(),
            event_age: Duration::ZERO,
            claimed_at: Instant::now(),
            lease: SystemTime::now() + Duration::from_secs(30),
        }
    }

    #[test]
    fn a_paused_subscribers_line_is_given_back_due_when_the_pause_ends() {
        let share = share(3, None);
        let in_flight = InFlight::default();
        let slots = Arc::new(Semaphore::new(64));
        let mut permits: Vec<_> = (0..64)
            .map(|_| slots.clone().try_acquire_owned().expect("permit"))
            .collect();
        let (busy, other) = (Uuid::new_v4(), Uuid::new_v4());
        let mut sending = Vec::new();
        for _ in 0..40 {
            match in_flight.admit(claimed(busy), share, &mut permits) {
                Ok(Some((delivery, _permit))) => sending.push(delivery),
                Ok(None) => {}
                Err(_) => panic!("within the limit and the line"),
            }
        }
        assert_eq!(sending.len(), 32, "the limit; 8 wait in line");
        let pause = Duration::from_secs(30);
        let next = in_flight.finish(sending[0].id, busy, Endpoint::Busy(pause), true, share);
        assert!(next.is_none(), "no slot goes on while paused");
        // The 8 waiting are given back, each due when the pause ends; the
        // 31 still in flight are due at once if shutdown releases them.
        let held = in_flight.deliveries();
        assert_eq!(held.len(), 39);
        let waits: Vec<Duration> = held.iter().map(|h| h.2).filter(|w| !w.is_zero()).collect();
        assert_eq!(waits.len(), 8);
        assert!(waits
            .iter()
            .all(|w| *w > pause - Duration::from_secs(5) && *w <= pause));
        // Claims give it no room while paused; others keep theirs.
        let room = in_flight.room(share);
        let at = room
            .subscribers
            .iter()
            .position(|s| *s == busy)
            .expect("listed");
        assert_eq!(room.rooms[at], 0);
        assert!(!room.subscribers.contains(&other));
        assert_eq!(room.limit, 32);
    }

    #[test]
    fn waiting_lines_are_as_deep_as_the_lease_leaves_timeouts_for() {
        // Defaults: a 3 s timeout, a 30 s lease less it and a 3 s margin:
        // eight timeouts, four lines.
        assert_eq!(share(3, None).depth, 4 * 32);
        assert_eq!(share(3, None).fresh_for, Duration::from_secs(24));
        // A 40 s lease (the default for a 10 s timeout) less the timeout
        // and a 4 s margin: two.
        assert_eq!(share(10, None).depth, 2 * 32);
        // Three timeouts in the lease: two used to fit, ending right at the
        // lease's end; one does now.
        assert_eq!(share(10, Some(30)).depth, 32);
        // The shortest lease allowed (twice the timeout): no line.
        assert_eq!(share(10, Some(20)).depth, 0);
        assert_eq!(share(10, Some(20)).limit, 32);
    }

    #[test]
    fn the_last_in_line_ends_a_margin_before_its_lease() {
        for timeout in 1..=20 {
            for lease in 2 * timeout..=12 * timeout {
                let s = share(timeout, Some(lease));
                let lines = u32::try_from(s.depth / s.limit).expect("small");
                let waited = Duration::from_secs(timeout) * lines;
                assert!(waited <= s.fresh_for, "{timeout} s, {lease} s");
                let ends = s.fresh_for + Duration::from_secs(timeout) + Duration::from_secs(1);
                assert!(ends <= Duration::from_secs(lease), "{timeout} s, {lease} s");
            }
        }
    }
}
