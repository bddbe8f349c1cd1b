//! W1–W3: what capturing costs the application's writes, measured with
//! pgbench on tables of one shape that differ only in their triggers.
//!
//! Variants, all in one database and measured in the same rounds (the order
//! rotates every round, and each result is divided by the plain table's
//! result of the same round, so drift of a noisy machine cancels out):
//! - plain: no trigger;
//! - notify: the naive per-row `pg_notify(row_to_json(NEW))`;
//! - eventlog: a per-row INSERT into an event-log table (Hasura's way);
//! - thorn: `thorn.webhook_model(...)`, no daemon waiting (the normal case
//!   while a daemon is busy or lingering: no NOTIFY);
//! - floor, bare row: a per-row INSERT of an id-only row, the least any
//!   outbox written in the same transaction can cost;
//! - floor, JSON rows: a statement-level INSERT … SELECT of `to_jsonb(row)`
//!   into a table without any index, the least an outbox that keeps the
//!   payload can cost;
//! - thorn+waiter: the same table while the consumer connection holds the
//!   wake-up lock (as a sleeping daemon does), so every
//!   writing statement also NOTIFYs (the moment a daemon sleeps).
//!
//! A LISTEN connection on both channels is open throughout, as a consumer
//! would be.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio_postgres::AsyncMessage;

use crate::daemon::WAKEUP_LOCK;
use crate::db::{self, Scratch, BODY, TABLE_SHAPE};
use crate::stats::Runs;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Plain,
    Notify,
    EventLog,
    FloorRow,
    FloorJson,
    Thorn,
    ThornWaiter,
}

pub const VARIANTS: [Variant; 7] = [
    Variant::Plain,
    Variant::Notify,
    Variant::EventLog,
    Variant::FloorRow,
    Variant::FloorJson,
    Variant::Thorn,
    Variant::ThornWaiter,
];

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::Plain => "no trigger",
            Variant::Notify => "naive per-row pg_notify(row_to_json(NEW))",
            Variant::EventLog => "per-row event-log INSERT (Hasura style)",
            Variant::FloorRow => "floor: per-row INSERT of an id-only row",
            Variant::FloorJson => "floor: per-statement INSERT of to_jsonb(row), no index",
            Variant::Thorn => "thorn, no daemon waiting (no NOTIFY)",
            Variant::ThornWaiter => "thorn, a daemon asleep (wake-up lock held: NOTIFY)",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Notify => "naive NOTIFY",
            Variant::EventLog => "event log",
            Variant::FloorRow => "floor row",
            Variant::FloorJson => "floor JSON",
            Variant::Thorn => "thorn",
            Variant::ThornWaiter => "thorn+waiter",
        }
    }

    /// For chart labels.
    pub fn tiny(self) -> &'static str {
        match self {
            Variant::Plain => "plain",
            Variant::Notify => "NOTIFY",
            Variant::EventLog => "log",
            Variant::FloorRow => "fl.row",
            Variant::FloorJson => "fl.json",
            Variant::Thorn => "thorn",
            Variant::ThornWaiter => "th+wait",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Variant::Plain => "w_plain",
            Variant::Notify => "w_notify",
            Variant::EventLog => "w_eventlog",
            Variant::FloorRow => "w_floor_row",
            Variant::FloorJson => "w_floor_json",
            Variant::Thorn | Variant::ThornWaiter => "w_thorn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Single-row INSERT, 1 client.
    W1,
    /// Single-row INSERT and UPDATE (half each), 16 clients.
    W2,
    /// One 10,000-row INSERT statement.
    W3,
}

/// Per variant: the ratio to plain of each round, and the raw numbers.
#[derive(Debug, Clone, Default)]
pub struct VariantResult {
    pub ratio: Runs,
    /// tps (W1, W2) or ms per statement (W3).
    pub raw: Runs,
}

pub struct Scale {
    pub seconds: u32,
    pub rounds: usize,
    pub bulk_statements: u32,
    pub preload: i64,
}

const SETUP: &str = "
    CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('bench', row_to_json(NEW)::text);
        RETURN NULL;
    END $$;

    CREATE TABLE event_log (
        id         bigserial PRIMARY KEY,
        table_name text NOT NULL,
        op         text NOT NULL,
        payload    jsonb NOT NULL,
        delivered  boolean NOT NULL DEFAULT false,
        tries      integer NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX event_log_fetch ON event_log (created_at) WHERE NOT delivered;
    CREATE FUNCTION bench_event_log() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO event_log (table_name, op, payload)
        VALUES (TG_TABLE_NAME, TG_OP, jsonb_build_object(
            'old', CASE WHEN TG_OP = 'UPDATE' THEN to_jsonb(OLD) END,
            'new', to_jsonb(NEW)));
        RETURN NULL;
    END $$;

    CREATE TABLE floor_ids (id bigserial PRIMARY KEY);
    CREATE FUNCTION bench_floor_row() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO floor_ids DEFAULT VALUES;
        RETURN NULL;
    END $$;

    CREATE TABLE floor_json (data jsonb NOT NULL);
    CREATE FUNCTION bench_floor_json() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO floor_json SELECT to_jsonb(t) FROM floor_new t;
        RETURN NULL;
    END $$;
";

pub async fn run(
    admin_url: &str,
    thorn: &Path,
    work: &Path,
    scale: &Scale,
    scenarios: &[Scenario],
) -> anyhow::Result<Vec<(Scenario, Vec<(Variant, VariantResult)>)>> {
    let scratch = Scratch::create(admin_url, "w").await?;
    let result = run_in(&scratch, thorn, work, scale, scenarios).await;
    scratch.drop_now().await?;
    result
}

async fn run_in(
    scratch: &Scratch,
    thorn: &Path,
    work: &Path,
    scale: &Scale,
    scenarios: &[Scenario],
) -> anyhow::Result<Vec<(Scenario, Vec<(Variant, VariantResult)>)>> {
    let config = crate::daemon::write_config(work, "w", &scratch.url)?;
    db::migrate(thorn, &config).await?;
    let client = scratch.client().await?;
    client
        .batch_execute(SETUP)
        .await
        .context("control triggers")?;
    for v in VARIANTS.into_iter().filter(|v| *v != Variant::ThornWaiter) {
        client
            .batch_execute(&format!("CREATE TABLE {} ({TABLE_SHAPE})", v.table()))
            .await?;
    }
    client
        .batch_execute(
            "CREATE TRIGGER bench_notify AFTER INSERT OR UPDATE ON w_notify
                 FOR EACH ROW EXECUTE FUNCTION bench_notify();
             CREATE TRIGGER bench_event_log AFTER INSERT OR UPDATE ON w_eventlog
                 FOR EACH ROW EXECUTE FUNCTION bench_event_log();
             CREATE TRIGGER bench_floor_row AFTER INSERT OR UPDATE ON w_floor_row
                 FOR EACH ROW EXECUTE FUNCTION bench_floor_row();
             CREATE TRIGGER bench_floor_json_insert AFTER INSERT ON w_floor_json
                 REFERENCING NEW TABLE AS floor_new
                 FOR EACH STATEMENT EXECUTE FUNCTION bench_floor_json();
             CREATE TRIGGER bench_floor_json_update AFTER UPDATE ON w_floor_json
                 REFERENCING NEW TABLE AS floor_new
                 FOR EACH STATEMENT EXECUTE FUNCTION bench_floor_json();
             SELECT thorn.webhook_model('public.w_thorn', model => 'article',
                 sender_field => 'author', reference => '/article/{id}/');",
        )
        .await
        .context("annotating w_thorn")?;

    // The consumer's connection: LISTENs on both channels and drains them.
    let (listener, mut connection) = tokio_postgres::connect(&scratch.url, tokio_postgres::NoTls)
        .await
        .context("listener connection")?;
    let drain = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(m) = futures_poll(|cx| connection.poll_message(cx)).await {
            match m {
                Ok(AsyncMessage::Notification(_)) => n += 1,
                Ok(_) => {}
                Err(_) => break,
            }
        }
        n
    });
    listener.batch_execute("LISTEN bench; LISTEN thorn").await?;

    let mut out = Vec::new();
    for &scenario in scenarios {
        let mut results: Vec<(Variant, VariantResult)> = VARIANTS
            .iter()
            .map(|v| (*v, VariantResult::default()))
            .collect();
        for round in 0..scale.rounds {
            let mut this_round = Vec::new();
            for k in 0..VARIANTS.len() {
                let variant = VARIANTS[(k + round) % VARIANTS.len()];
                prepare(&client, &listener, variant, scale.preload).await?;
                let value = pgbench(&scratch.url, work, scenario, variant, scale).await?;
                this_round.push((variant, value));
            }
            let plain = this_round
                .iter()
                .find(|(v, _)| *v == Variant::Plain)
                .map(|(_, x)| *x)
                .unwrap_or(f64::NAN);
            for (variant, value) in this_round {
                // W1, W2: tps ratio (higher is better); W3: time ratio.
                let ratio = value / plain;
                if let Some((_, r)) = results.iter_mut().find(|(v, _)| *v == variant) {
                    r.ratio.push(ratio);
                    r.raw.push(value);
                }
            }
            eprintln!(
                "  {scenario:?} round {}: {}",
                round + 1,
                results
                    .iter()
                    .map(|(v, r)| format!(
                        "{} {:.2}",
                        v.short(),
                        r.ratio.values.last().copied().unwrap_or(f64::NAN)
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out.push((scenario, results));
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    Ok(out)
}

/// Polls a connection for its next message (a tiny `poll_fn`).
async fn futures_poll<T>(
    mut f: impl FnMut(&mut std::task::Context<'_>) -> std::task::Poll<Option<T>>,
) -> Option<T> {
    std::future::poll_fn(move |cx| f(cx)).await
}

/// Empties the variant's tables, preloads `preload` rows without firing
/// triggers (the UPDATEs of W2 need them), takes or drops the wake-up lock
/// on the consumer's connection, and checkpoints so every run starts from
/// the same state.
async fn prepare(
    client: &tokio_postgres::Client,
    listener: &tokio_postgres::Client,
    variant: Variant,
    preload: i64,
) -> anyhow::Result<()> {
    let table = variant.table();
    client
        .batch_execute(&format!(
            "TRUNCATE {table} RESTART IDENTITY;
             TRUNCATE event_log, floor_ids, floor_json;
             TRUNCATE thorn.event, thorn.delivery;
             SET session_replication_role = replica;
             INSERT INTO {table} (title, state, author, body)
                 SELECT 'title ' || g, 'draft', 'alice', '{BODY}' FROM generate_series(1, {preload}) g;
             SET session_replication_role = origin;"
        ))
        .await
        .with_context(|| format!("preparing {table}"))?;
    // Each its own statement: VACUUM may not run in a multi-statement batch.
    for statement in [
        format!("VACUUM ANALYZE {table}"),
        "VACUUM ANALYZE event_log".into(),
        "VACUUM ANALYZE thorn.event".into(),
        "CHECKPOINT".into(),
    ] {
        client.batch_execute(&statement).await?;
    }
    listener
        .batch_execute("SELECT pg_advisory_unlock_all()")
        .await?;
    if variant == Variant::ThornWaiter {
        listener
            .execute(
                "SELECT pg_advisory_lock($1, $2)",
                &[&WAKEUP_LOCK.0, &WAKEUP_LOCK.1],
            )
            .await?;
    }
    Ok(())
}

/// Runs pgbench once; returns tps (W1, W2) or mean ms per statement (W3).
async fn pgbench(
    url: &str,
    work: &Path,
    scenario: Scenario,
    variant: Variant,
    scale: &Scale,
) -> anyhow::Result<f64> {
    let table = variant.table();
    let insert = format!(
        "INSERT INTO {table} (title, state, author, body) VALUES ('hello', 'draft', 'alice', '{BODY}');\n"
    );
    let update = format!(
        "\\set id random(1, {})\nUPDATE {table} SET state = 'published', title = 'title ' || :id, updated_at = now() WHERE id = :id;\n",
        scale.preload
    );
    let bulk = format!(
        "INSERT INTO {table} (title, state, author, body) SELECT 'title ' || g, 'draft', 'alice', '{BODY}' FROM generate_series(1, 10000) g;\n"
    );
    let write = |name: &str, text: &str| -> anyhow::Result<String> {
        let path = work.join(format!("{name}.sql"));
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        Ok(path.display().to_string())
    };
    let mut args: Vec<String> = vec!["-n".into(), "-M".into(), "prepared".into()];
    match scenario {
        Scenario::W1 => {
            args.extend(["-c", "1", "-j", "1", "-T"].map(String::from));
            args.push(scale.seconds.to_string());
            args.extend(["-f".into(), write("insert", &insert)?]);
        }
        Scenario::W2 => {
            args.extend(["-c", "16", "-j", "2", "-T"].map(String::from));
            args.push(scale.seconds.to_string());
            args.extend(["-f".into(), format!("{}@1", write("insert", &insert)?)]);
            args.extend(["-f".into(), format!("{}@1", write("update", &update)?)]);
        }
        Scenario::W3 => {
            args.extend(["-c", "1", "-j", "1", "-t"].map(String::from));
            args.push(scale.bulk_statements.to_string());
            args.extend(["-f".into(), write("bulk", &bulk)?]);
        }
    }
    args.push(url.to_owned());
    let out = tokio::process::Command::new("pgbench")
        .args(&args)
        .output()
        .await
        .context("running pgbench (install postgresql-client or postgresql-contrib)")?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "pgbench {scenario:?} {variant:?} failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let number_after = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    let value = match scenario {
        Scenario::W3 => number_after("latency average = "),
        _ => number_after("tps = "),
    };
    value.with_context(|| format!("no result in pgbench's output:\n{text}"))
}
