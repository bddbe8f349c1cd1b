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
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// The newest schema version this binary carries.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Applies what is missing; returns the versions applied now.
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
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

async fn apply_missing(client: &mut Client) -> Result<Vec<i32>, MigrateError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS thorn;
             CREATE TABLE IF NOT EXISTS thorn.migration (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );",
        )
        .await?;
    let current = current_version(client).await?;
    if current > latest() {
        return Err(MigrateError::TooNew {
            found: current,
            known: latest(),
        });
    }
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > current) {
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
    let exists: bool = client
        .query_one("SELECT to_regclass('thorn.migration') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(0);
    }
    client
        .query_one("SELECT coalesce(max(version), 0) FROM thorn.migration", &[])
        .await?
        .try_get(0)
}
