//! Versioned migrations from `sql/`, embedded in the binary.
//!
//! Each file runs once, in its own transaction, recorded in
//! `thorn.migration`. A session advisory lock makes concurrent `migrate`s
//! (several daemons starting at once) take turns, so running it on every
//! start is safe.

use tokio_postgres::Client;

const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "schema", include_str!("../../sql/0001_schema.sql")),
    (2, "annotate", include_str!("../../sql/0002_annotate.sql")),
    (3, "signer", include_str!("../../sql/0003_signer.sql")),
    (4, "security", include_str!("../../sql/0004_security.sql")),
    (
        5,
        "resilience",
        include_str!("../../sql/0005_resilience.sql"),
    ),
    (6, "wakeup", include_str!("../../sql/0006_wakeup.sql")),
    (7, "horizon", include_str!("../../sql/0007_horizon.sql")),
    (
        8,
        "horizon_writers",
        include_str!("../../sql/0008_horizon_writers.sql"),
    ),
    (
        9,
        "partitions",
        include_str!("../../sql/0009_partitions.sql"),
    ),
    (
        10,
        "partition_trees",
        include_str!("../../sql/0010_partition_trees.sql"),
    ),
    (
        11,
        "subscriber_due",
        include_str!("../../sql/0011_subscriber_due.sql"),
    ),
    (
        12,
        "subscriber_deliveries",
        include_str!("../../sql/0012_subscriber_deliveries.sql"),
    ),
    (
        13,
        "guard_holes",
        include_str!("../../sql/0013_guard_holes.sql"),
    ),
    (14, "reenable", include_str!("../../sql/0014_reenable.sql")),
    (
        15,
        "config_subscribers",
        include_str!("../../sql/0015_config_subscribers.sql"),
    ),
    (
        16,
        "pair_by_position",
        include_str!("../../sql/0016_pair_by_position.sql"),
    ),
    (
        17,
        "whsec_secrets",
        include_str!("../../sql/0017_whsec_secrets.sql"),
    ),
    (
        18,
        "config_removed",
        include_str!("../../sql/0018_config_removed.sql"),
    ),
    (
        19,
        "operator_off",
        include_str!("../../sql/0019_operator_off.sql"),
    ),
    (
        20,
        "daemon_grants",
        include_str!("../../sql/0020_daemon_grants.sql"),
    ),
    (
        21,
        "notify_off",
        include_str!("../../sql/0021_notify_off.sql"),
    ),
    (
        22,
        "any_secret",
        include_str!("../../sql/0022_any_secret.sql"),
    ),
    (
        23,
        "sync_flag_in_body",
        include_str!("../../sql/0023_sync_flag_in_body.sql"),
    ),
    (
        24,
        "condition_hint",
        include_str!("../../sql/0024_condition_hint.sql"),
    ),
    (25, "json_nul", include_str!("../../sql/0025_json_nul.sql")),
    (
        26,
        "owner_rules",
        include_str!("../../sql/0026_owner_rules.sql"),
    ),
];

/// Arbitrary, fixed: the advisory lock key of migrations.
const LOCK_KEY: i64 = 0x7468_6f72_6e00;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration {version} ({name}) failed: {source}")]
    Apply {
        version: i32,
        name: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("the database is at schema version {found}, newer than this thorn knows ({known}); upgrade thorn")]
    TooNew { found: i32, known: i32 },
    #[error("{0}")]
    Unsupported(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// What the migrations need of the server: PostgreSQL 13 (`xid8`,
/// `pg_current_xact_id`, `gen_random_uuid`) and a UTF8 database (thorn's
/// SQL and every payload are UTF-8). Said plainly here, where it would
/// otherwise be a migration's raw SQL error.
async fn check_server(client: &Client) -> Result<(), MigrateError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int,
                    current_setting('server_version'),
                    pg_encoding_to_char(encoding)
             FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .await?;
    let (number, version, encoding): (i32, String, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if number < 130000 {
        return Err(MigrateError::Unsupported(format!(
            "thorn needs PostgreSQL 13 or later; this server is {version}"
        )));
    }
    if encoding != "UTF8" {
        return Err(MigrateError::Unsupported(format!(
            "thorn needs a database in UTF8; this one is in {encoding} (CREATE DATABASE … ENCODING 'UTF8' TEMPLATE template0)"
        )));
    }
    Ok(())
}

/// The newest schema version this binary carries.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies what is missing; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    // Up to date: nothing to lock or create, so a daemon role without DDL
    // rights (docs/security.md) can start.
    if missing(&applied_versions(client).await?)?.is_empty() {
        return Ok(Vec::new());
    }
    check_server(client).await?;
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await?;
    let result = apply_missing(client).await;
    // Unlock even after a failure; the session may be reused.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await;
    let applied = result?;
    unlocked?;
    Ok(applied)
}

/// The schema and the table that record the migrations applied, made
/// before the first one runs.
pub const MIGRATION_TABLE: &str = "SET client_min_messages = warning;
     CREATE SCHEMA IF NOT EXISTS thorn;
     CREATE TABLE IF NOT EXISTS thorn.migration (
         version    integer PRIMARY KEY,
         name       text NOT NULL,
         applied_at timestamptz NOT NULL DEFAULT now()
     );";

async fn apply_missing(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    client.batch_execute(MIGRATION_TABLE).await?;
    let missing = missing(&applied_versions(client).await?)?;
    let mut applied = Vec::new();
    for &(version, name, sql) in missing {
        let fail = |source| MigrateError::Apply {
            version,
            name,
            source,
        };
        let tx = client.transaction().await?;
        tx.batch_execute(sql).await.map_err(fail)?;
        tx.execute(
            "INSERT INTO thorn.migration (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await?;
        tx.commit().await.map_err(fail)?;
        tracing::info!(version, name, "applied migration");
        applied.push(version);
    }
    Ok(applied)
}

/// The schema version of the database (0 when thorn was never migrated).
pub async fn current_version(client: &Client) -> Result<i32, tokio_postgres::Error> {
    Ok(applied_versions(client)
        .await?
        .into_iter()
        .max()
        .unwrap_or(0))
}

/// The versions recorded in `thorn.migration` (none before the first run).
async fn applied_versions(client: &Client) -> Result<Vec<i32>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('thorn.migration') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(Vec::new());
    }
    client
        .query("SELECT version FROM thorn.migration", &[])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}

/// The known migrations not yet applied, in order. Every missing version
/// runs, not just those above the highest applied one, so version numbers
/// may have gaps that later releases fill.
fn missing(
    applied: &[i32],
) -> Result<Vec<&'static (i32, &'static str, &'static str)>, MigrateError> {
    if let Some(&found) = applied.iter().max().filter(|&&v| v > latest()) {
        return Err(MigrateError::TooNew {
            found,
            known: latest(),
        });
    }
    Ok(MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.0))
        .collect())
}

/// The tables of annotated partition trees that are not annotated
/// themselves: statements that name them are not captured. Schema 10 makes
/// trees follow their parents, but a partition created later is annotated
/// at once only where thorn has its event trigger (migrations run as a
/// superuser).
pub async fn uncaptured_partitions(client: &Client) -> Result<Vec<String>, tokio_postgres::Error> {
    client
        .query(
            "SELECT DISTINCT u.name
             FROM (SELECT DISTINCT coalesce(pg_partition_root(table_name), table_name) AS root
                   FROM thorn.model) AS r
             CROSS JOIN LATERAL thorn.uncaptured_partitions(r.root) AS u(name)
             ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect()
}
