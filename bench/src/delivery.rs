//! E1–E6: the delivery engine, from commit to receipt at the in-process
//! receiver, with the release `thorn` binary run as a separate process.
//!
//! Every run gets a fresh database (created, migrated by `thorn migrate`,
//! dropped), a table `article` annotated with `reference => '{id}'` (so the
//! receiver can tell which row a delivery carries), and subscribers whose
//! URLs point at the receiver. Every wait is bounded.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use tokio_postgres::Client;

use crate::daemon::{self, Daemon};
use crate::db::{self, Scratch, BODY, TABLE_SHAPE};
use crate::receiver::{self, Recorder, Seen};
use crate::stats::{percentiles, Percentiles, Runs};

/// How big each scenario is.
#[derive(Debug, Clone)]
pub struct Scale {
    pub runs: usize,
    pub e1_events: i64,
    pub e2_rate: u32,
    pub e2_seconds: f64,
    pub e3_events: i64,
    pub e3_subscribers: i64,
    pub e4_events: i64,
    pub e4_idle_wait: Duration,
    pub e5_events: i64,
    /// Due deliveries the hanging subscriber has before E5's third pass.
    pub e5_backlog: i64,
    pub e6_events: i64,
    pub e6_daemons: Vec<usize>,
}

/// Where the runs happen.
pub struct Env {
    pub admin_url: String,
    pub thorn: PathBuf,
    pub work: PathBuf,
    pub addr: SocketAddr,
    pub recorder: Arc<Recorder>,
}

#[derive(Debug, Default)]
pub struct Results {
    pub e1_rate: Runs,
    pub e1_raw: Runs,
    pub e1_ratio: Runs,
    pub e1_idle_rss: Runs,
    pub e2: Vec<Percentiles>,
    pub e2_p50: Runs,
    pub e2_p90: Runs,
    pub e2_p99: Runs,
    pub e2_max: Runs,
    pub e2_achieved: Runs,
    /// Every latency of every E2 run, for the chart.
    pub e2_latencies: Vec<Duration>,
    pub e3_rate: Runs,
    pub e4_rate: Runs,
    pub e4_peak: Runs,
    pub e4_idle: Runs,
    pub e4_first_ms: Runs,
    pub e5_without: Runs,
    pub e5_with: Runs,
    pub e5_ratio: Runs,
    pub e5_backlog_with: Runs,
    pub e5_backlog_ratio: Runs,
    pub e5_hung: u64,
    pub e6: Vec<(usize, Runs)>,
    pub e6_duplicates: u64,
    pub e6_duplicate_events: u64,
    pub verified: u64,
    pub bad_signatures: u64,
    pub incomplete: Vec<String>,
}

/// A database with thorn migrated, `article` annotated and subscribers.
struct Setup {
    scratch: Scratch,
    config: PathBuf,
    client: Client,
}

impl Env {
    async fn setup(&self, name: &str, subscribers: i64, hang: bool) -> anyhow::Result<Setup> {
        let scratch = Scratch::create(&self.admin_url, name).await?;
        let config = daemon::write_config(&self.work, name, &scratch.url)?;
        db::migrate(&self.thorn, &config).await?;
        let client = scratch.client().await?;
        client
            .batch_execute(&format!(
                "CREATE TABLE public.article ({TABLE_SHAPE});
                 SELECT thorn.webhook_model('public.article', reference => '{{id}}');"
            ))
            .await
            .context("annotating article")?;
        client
            .execute(
                "INSERT INTO thorn.subscriber (event, url, hmac_secret)
                 SELECT 'article.*', format('http://%s/s/%s', $1::text, g), $2
                 FROM generate_series(0, $3::int8 - 1) g",
                &[&self.addr.to_string(), &receiver::SECRET, &subscribers],
            )
            .await
            .context("adding subscribers")?;
        if hang {
            client
                .execute(
                    "INSERT INTO thorn.subscriber (event, url, hmac_secret)
                     VALUES ('article.*', format('http://%s/hang', $1::text), $2)",
                    &[&self.addr.to_string(), &receiver::SECRET],
                )
                .await?;
        }
        Ok(Setup {
            scratch,
            config,
            client,
        })
    }

    fn spawn(&self, setup: &Setup, tag: &str) -> anyhow::Result<Daemon> {
        Daemon::spawn(
            &self.thorn,
            &setup.config,
            &self.work.join(format!("{tag}.log")),
        )
    }

    /// Waits until `expected` deliveries have arrived (bounded: at least
    /// 500/s plus 30 s), checking that the daemons stay up.
    async fn wait_all(
        &self,
        daemons: &mut [Daemon],
        expected: u64,
        label: &str,
        results: &mut Results,
    ) -> anyhow::Result<()> {
        let limit = Duration::from_secs(30 + expected / 500);
        let deadline = Instant::now() + limit;
        loop {
            if self
                .recorder
                .wait_for(expected, Duration::from_millis(500))
                .await
            {
                return Ok(());
            }
            for d in daemons.iter_mut() {
                d.check_alive()?;
            }
            if Instant::now() >= deadline {
                let got = self.recorder.count();
                eprintln!("  {label}: only {got} of {expected} deliveries within {limit:?}");
                results
                    .incomplete
                    .push(format!("{label}: {got} of {expected} within {limit:?}"));
                return Ok(());
            }
        }
    }
}

/// Inserts `n` rows in statements of `chunk` rows, each its own transaction.
async fn insert_rows(client: &Client, n: i64, chunk: i64) -> anyhow::Result<()> {
    let statement = client
        .prepare(&format!(
            "INSERT INTO article (title, state, author, body)
             SELECT 'title ' || g, 'draft', 'alice', '{BODY}' FROM generate_series(1, $1::int8) g"
        ))
        .await?;
    let mut left = n;
    while left > 0 {
        let k = left.min(chunk);
        client.execute(&statement, &[&k]).await?;
        left -= k;
    }
    Ok(())
}

/// Deliveries per second from `start` to the last arrival (of `keep`ers).
fn rate(seen: &Seen, start: Instant, keep: impl Fn(&receiver::Arrival) -> bool) -> f64 {
    let kept: Vec<_> = seen.arrivals.iter().filter(|a| keep(a)).collect();
    let Some(last) = kept.iter().map(|a| a.at).max() else {
        return 0.0;
    };
    kept.len() as f64 / last.saturating_duration_since(start).as_secs_f64()
}

fn account(results: &mut Results, seen: &Seen) {
    results.verified += seen.verified;
    results.bad_signatures += seen.bad;
}

pub async fn run_all(
    env: &Env,
    scale: &Scale,
    only: &dyn Fn(&str) -> bool,
) -> anyhow::Result<Results> {
    let mut r = Results::default();
    for run in 0..scale.runs {
        eprintln!("delivery runs: {} of {}", run + 1, scale.runs);
        if only("E1") {
            e1(env, scale, &mut r).await.context("E1")?;
        }
        if only("E2") {
            e2(env, scale, &mut r).await.context("E2")?;
        }
        if only("E3") {
            e3(env, scale, &mut r).await.context("E3")?;
        }
        if only("E4") {
            e4(env, scale, &mut r).await.context("E4")?;
        }
        if only("E5") {
            e5(env, scale, &mut r).await.context("E5")?;
        }
        if only("E6") {
            e6(env, scale, &mut r).await.context("E6")?;
        }
    }
    if r.bad_signatures > 0 {
        bail!(
            "{} of {} sampled deliveries had a wrong signature",
            r.bad_signatures,
            r.bad_signatures + r.verified
        );
    }
    Ok(r)
}

/// E1: 100,000 events, one subscriber, written while the daemon runs; and
/// the same client kind posting to the same receiver without a database.
async fn e1(env: &Env, scale: &Scale, r: &mut Results) -> anyhow::Result<()> {
    let setup = env.setup("e1", 1, false).await?;
    let mut d = [env.spawn(&setup, "e1")?];
    daemon::wait_idle(&setup.client, Duration::from_secs(20)).await?;
    r.e1_idle_rss.push(d[0].memory()?.rss);
    env.recorder.take();
    let start = Instant::now();
    insert_rows(&setup.client, scale.e1_events, 100).await?;
    let written = start.elapsed();
    env.wait_all(&mut d, scale.e1_events as u64, "E1", r)
        .await?;
    let seen = env.recorder.take();
    account(r, &seen);
    let thorn = rate(&seen, start, |_| true);
    let [d] = d;
    d.stop().await?;
    setup.scratch.drop_now().await?;

    let raw = raw_client_rate(env, scale.e1_events as u64).await?;
    eprintln!(
        "  E1: {thorn:.0}/s (rows written in {:.1}s), raw reqwest {raw:.0}/s",
        written.as_secs_f64()
    );
    r.e1_rate.push(thorn);
    r.e1_raw.push(raw);
    r.e1_ratio.push(thorn / raw);
    Ok(())
}

/// The limit of E1: reqwest POSTing signed thorn-shaped requests to the same
/// receiver, as many in flight as the daemon allows one subscriber.
async fn raw_client_rate(env: &Env, n: u64) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(3))
        .build()?;
    let url = format!("http://{}/s/0", env.addr);
    let in_flight = daemon::SETTINGS
        .concurrency
        .min(daemon::SETTINGS.per_subscriber_concurrency);
    let next = Arc::new(AtomicU64::new(0));
    env.recorder.take();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<(), anyhow::Error>(());
                }
                let body = format!(
                    r#"{{"event": "article.created", "ref": "{i}", "sender": null, "data": {{"id": {i}, "body": "{BODY}", "state": "draft", "title": "title {i}", "author": "alice", "updated_at": "2025-01-01T00:00:00.000000+00:00"}}}}"#
                );
                let id = format!("00000000-0000-7000-8000-{i:012x}");
                let ts = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |t| t.as_secs())
                    .to_string();
                let b64 = base64::engine::general_purpose::STANDARD;
                let hook = b64.encode(receiver::hmac_sha256(&[body.as_bytes()]));
                let sig = format!(
                    "v1,{}",
                    b64.encode(receiver::hmac_sha256(&[
                        id.as_bytes(),
                        b".",
                        ts.as_bytes(),
                        b".",
                        body.as_bytes()
                    ]))
                );
                let response = client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .header("Hook-Event", "article.created")
                    .header("Hook-Delivery", &id)
                    .header("Hook-Subscription", "00000000-0000-4000-8000-000000000000")
                    .header("Hook-HMAC", hook)
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", ts)
                    .header("webhook-signature", sig)
                    .body(body)
                    .send()
                    .await?;
                response.bytes().await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = start.elapsed();
    let seen = env.recorder.take();
    if seen.bad > 0 || seen.arrivals.len() as u64 != n {
        bail!(
            "raw client: {} arrivals of {n}, {} bad signatures",
            seen.arrivals.len(),
            seen.bad
        );
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// E2: a steady stream, each event its own transaction; latency from the
/// acknowledged COMMIT to the receiver.
async fn e2(env: &Env, scale: &Scale, r: &mut Results) -> anyhow::Result<()> {
    let setup = env.setup("e2", 1, false).await?;
    let mut d = [env.spawn(&setup, "e2")?];
    daemon::wait_idle(&setup.client, Duration::from_secs(20)).await?;
    env.recorder.take();

    let total = (f64::from(scale.e2_rate) * scale.e2_seconds).round() as usize;
    let period = Duration::from_secs_f64(1.0 / f64::from(scale.e2_rate));
    // Several connections, so one slow commit does not hold up the schedule.
    const WRITERS: usize = 4;
    let start = Instant::now() + Duration::from_millis(50);
    let mut writers = tokio::task::JoinSet::new();
    for k in 0..WRITERS {
        let client = setup.scratch.client().await?;
        writers.spawn(async move {
            let insert = client
                .prepare(&format!(
                    "INSERT INTO article (title, state, author, body)
                     VALUES ('hello', 'draft', 'alice', '{BODY}') RETURNING id"
                ))
                .await?;
            let mut acks = Vec::new();
            for i in (k..total).step_by(WRITERS) {
                tokio::time::sleep_until((start + period * i as u32).into()).await;
                let id: i64 = client.query_one(&insert, &[]).await?.try_get(0)?;
                acks.push((id, Instant::now()));
            }
            Ok::<_, anyhow::Error>(acks)
        });
    }
    let mut committed: HashMap<i64, Instant> = HashMap::new();
    while let Some(acks) = writers.join_next().await {
        committed.extend(acks??);
    }
    let achieved = total as f64
        / committed.values().max().map_or(f64::NAN, |last| {
            last.saturating_duration_since(start).as_secs_f64()
        });
    env.wait_all(&mut d, total as u64, "E2", r).await?;
    let seen = env.recorder.take();
    account(r, &seen);
    let latencies: Vec<Duration> = seen
        .arrivals
        .iter()
        .filter_map(|a| {
            committed
                .get(&a.event)
                .map(|c| a.at.saturating_duration_since(*c))
        })
        .collect();
    let p = percentiles(&latencies);
    eprintln!(
        "  E2: {achieved:.0} events/s, p50 {:.1} ms, p90 {:.1}, p99 {:.1}, max {:.1} ({} samples)",
        p.p50, p.p90, p.p99, p.max, p.count
    );
    r.e2.push(p);
    r.e2_p50.push(p.p50);
    r.e2_p90.push(p.p90);
    r.e2_p99.push(p.p99);
    r.e2_max.push(p.max);
    r.e2_achieved.push(achieved);
    r.e2_latencies.extend(latencies);
    let [d] = d;
    d.stop().await?;
    setup.scratch.drop_now().await
}

/// E3: every event matches all of many subscribers.
async fn e3(env: &Env, scale: &Scale, r: &mut Results) -> anyhow::Result<()> {
    let setup = env.setup("e3", scale.e3_subscribers, false).await?;
    let mut d = [env.spawn(&setup, "e3")?];
    daemon::wait_idle(&setup.client, Duration::from_secs(20)).await?;
    env.recorder.take();
    let start = Instant::now();
    insert_rows(&setup.client, scale.e3_events, 10).await?;
    let expected = (scale.e3_events * scale.e3_subscribers) as u64;
    env.wait_all(&mut d, expected, "E3", r).await?;
    let seen = env.recorder.take();
    account(r, &seen);
    let v = rate(&seen, start, |_| true);
    eprintln!("  E3: {v:.0} deliveries/s");
    r.e3_rate.push(v);
    let [d] = d;
    d.stop().await?;
    setup.scratch.drop_now().await
}

/// E4: a backlog committed while no daemon runs; drain rate and memory.
async fn e4(env: &Env, scale: &Scale, r: &mut Results) -> anyhow::Result<()> {
    let setup = env.setup("e4", 1, false).await?;
    insert_rows(&setup.client, scale.e4_events, 10_000).await?;
    setup
        .client
        .batch_execute("VACUUM ANALYZE thorn.event")
        .await?;
    env.recorder.take();
    let mut d = [env.spawn(&setup, "e4")?];
    let start = d[0].started;
    env.wait_all(&mut d, scale.e4_events as u64, "E4", r)
        .await?;
    let peak = d[0].memory()?.peak;
    let seen = env.recorder.take();
    account(r, &seen);
    let v = rate(&seen, start, |_| true);
    let first = seen
        .arrivals
        .iter()
        .map(|a| a.at)
        .min()
        .map_or(f64::NAN, |f| {
            f.saturating_duration_since(start).as_secs_f64() * 1e3
        });
    tokio::time::sleep(scale.e4_idle_wait).await;
    let idle = d[0].memory()?.rss;
    eprintln!(
        "  E4: {v:.0}/s, first after {first:.0} ms, peak RSS {peak:.1} MiB, idle RSS {idle:.1} MiB"
    );
    r.e4_rate.push(v);
    r.e4_peak.push(peak);
    r.e4_idle.push(idle);
    r.e4_first_ms.push(first);
    let [d] = d;
    d.stop().await?;
    setup.scratch.drop_now().await
}

/// E5: 99 healthy subscribers, alone, beside a 100th that hangs until the
/// daemon's timeout, and beside the same one holding a backlog of due
/// deliveries from before the daemon started (which claims must pass over).
/// Throughput counts the 99 only.
async fn e5(env: &Env, scale: &Scale, r: &mut Results) -> anyhow::Result<()> {
    let mut rates = [0.0; 3];
    let passes = [
        ("e5_base", false, 0),
        ("e5_hang", true, 0),
        ("e5_backlog", true, scale.e5_backlog),
    ];
    for (i, (name, hang, backlog)) in passes.into_iter().enumerate() {
        let setup = env.setup(name, 99, hang).await?;
        if backlog > 0 {
            // Already dispatched: only the hanging subscriber has them.
            setup
                .client
                .execute(
                    "WITH e AS (
                         INSERT INTO thorn.event (name, data, dispatched_at)
                         SELECT 'article.created', '{}', now() FROM generate_series(1, $1::int8)
                         RETURNING id)
                     INSERT INTO thorn.delivery (id, event_id, subscriber_id)
                     SELECT gen_random_uuid(), e.id, s.id
                     FROM e, thorn.subscriber s WHERE s.url LIKE '%/hang'",
                    &[&backlog],
                )
                .await
                .context("the hanging subscriber's backlog")?;
        }
        let mut d = [env.spawn(&setup, name)?];
        daemon::wait_idle(&setup.client, Duration::from_secs(20)).await?;
        env.recorder.take();
        let start = Instant::now();
        insert_rows(&setup.client, scale.e5_events, 10).await?;
        env.wait_all(&mut d, (scale.e5_events * 99) as u64, name, r)
            .await?;
        let seen = env.recorder.take();
        account(r, &seen);
        rates[i] = rate(&seen, start, |a| a.subscriber < 99);
        r.e5_hung += seen.hung;
        let [d] = d;
        d.stop().await?;
        setup.scratch.drop_now().await?;
    }
    eprintln!(
        "  E5: without the hanging one {:.0}/s, with it {:.0}/s, with it and its backlog {:.0}/s",
        rates[0], rates[1], rates[2]
    );
    r.e5_without.push(rates[0]);
    r.e5_with.push(rates[1]);
    r.e5_ratio.push(rates[1] / rates[0]);
    r.e5_backlog_with.push(rates[2]);
    r.e5_backlog_ratio.push(rates[2] / rates[0]);
    Ok(())
}

/// E6: 1, 2 and 4 daemons draining one backlog; every delivery must arrive
/// exactly once.
async fn e6(env: &Env, scale: &Scale, r: &mut Results) -> anyhow::Result<()> {
    for &k in &scale.e6_daemons {
        let setup = env.setup(&format!("e6_{k}"), 1, false).await?;
        insert_rows(&setup.client, scale.e6_events, 10_000).await?;
        setup
            .client
            .batch_execute("VACUUM ANALYZE thorn.event")
            .await?;
        env.recorder.take();
        let start = Instant::now();
        let mut daemons = (0..k)
            .map(|i| env.spawn(&setup, &format!("e6_{k}_{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        env.wait_all(&mut daemons, scale.e6_events as u64, &format!("E6x{k}"), r)
            .await?;
        // Late duplicates (a lease running out) would come after the last
        // first copy; give them a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let seen = env.recorder.take();
        account(r, &seen);
        let v = rate(&seen, start, |_| true);
        let unique: HashSet<u128> = seen.arrivals.iter().map(|a| a.delivery).collect();
        let unique_events: HashSet<(i64, u32)> = seen
            .arrivals
            .iter()
            .map(|a| (a.event, a.subscriber))
            .collect();
        let dups = seen.arrivals.len() as u64 - unique.len() as u64;
        let dup_events = seen.arrivals.len() as u64 - unique_events.len() as u64;
        let delivered: i64 = setup
            .client
            .query_one(
                "SELECT count(*) FROM thorn.delivery WHERE state = 'delivered'",
                &[],
            )
            .await?
            .try_get(0)?;
        eprintln!(
            "  E6 x{k}: {v:.0}/s, {dups} duplicate ids, {dup_events} duplicate events, {delivered} delivered rows"
        );
        r.e6_duplicates += dups;
        r.e6_duplicate_events += dup_events;
        match r.e6.iter_mut().find(|(n, _)| *n == k) {
            Some((_, runs)) => runs.push(v),
            None => {
                let mut runs = Runs::default();
                runs.push(v);
                r.e6.push((k, runs));
            }
        }
        for d in daemons {
            d.stop().await?;
        }
        setup.scratch.drop_now().await?;
    }
    Ok(())
}
