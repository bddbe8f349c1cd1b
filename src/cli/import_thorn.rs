//! Importing subscribers from Thorn's Django table (`webhooks_subscriber`:
//! id, uuid, event, url, user_id → auth_user, hmac_secret, hmac_digest,
//! content_type, created_at, updated_at) into `thorn.subscriber`.
//!
//! Thorn's `uuid` becomes thorn's `id`, so `Hook-Subscription` stays the
//! same for consumers and a second run imports nothing twice. The owner is
//! the user's username (Thorn's `sender`). Rows the database refuses are
//! reported and skipped; the others are imported. `thorn import-thorn`.

use std::io::Write;

use anyhow::Context;
use serde::Serialize;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::config::Config;
use crate::db::subscribers::{self, Changes, FieldErrors};
use crate::sign::{Secret, Signer};

/// Where Thorn's rows are and how to read them.
#[derive(Debug, Clone)]
pub struct Source {
    /// Thorn's subscriber table, `[schema.]name`.
    pub table: String,
    /// The users table `user_id` points to; `None`: the owner is the
    /// `user_id` value itself, as text.
    pub users: Option<String>,
    /// The users table's column that holds the name events carry as sender.
    pub username_column: String,
    /// Hook-HMAC scheme for the imported subscribers. Thorn's default signer
    /// was `compat_sign`; choose `sign` if THORN_HMAC_SIGNER was `sign`.
    pub signer: Signer,
}

impl Default for Source {
    fn default() -> Self {
        Source {
            table: "webhooks_subscriber".into(),
            users: Some("auth_user".into()),
            username_column: "username".into(),
            signer: Signer::Compat,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub imported: Vec<Uuid>,
    /// Already in thorn.subscriber (an earlier import).
    pub present: Vec<Uuid>,
    pub skipped: Vec<Skipped>,
    /// Rows without a `uuid` (no id to import them under), skipped.
    pub without_uuid: i64,
}

#[derive(Debug, Serialize)]
pub struct Skipped {
    pub id: Uuid,
    pub problems: FieldErrors,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("{0:?} is not a table name ([schema.]name, letters, digits and _)")]
    BadName(String),
    /// Its own hint: Thorn's tables are Django's, which `thorn migrate`
    /// does not make.
    #[error(
        "reading Thorn's tables (is this Django's database? --source-url names \
         another, --table and --users-table other tables)"
    )]
    Read(#[source] tokio_postgres::Error),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

/// `"a"."b"` from `a.b`, refusing anything but plain identifiers.
fn quoted(name: &str) -> Result<String, ImportError> {
    let plain = |p: &str| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    };
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 2 || !parts.iter().all(|p| plain(p)) {
        return Err(ImportError::BadName(name.to_owned()));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

struct Row {
    id: Uuid,
    changes: Changes,
    created_at: String,
    /// Its `user_id` names no user: imported, it would be an anonymous
    /// subscriber, which receives every event without a sender.
    orphan: bool,
}

/// The rows with a `uuid`, and how many have none.
async fn read(
    source_db: &impl GenericClient,
    source: &Source,
) -> Result<(Vec<Row>, i64), ImportError> {
    let table = quoted(&source.table)?;
    let (owner, orphan, join) = match &source.users {
        Some(users) => (
            format!("u.{}::text", quoted(&source.username_column)?),
            "s.user_id IS NOT NULL AND u.id IS NULL",
            format!("LEFT JOIN {} u ON u.id = s.user_id", quoted(users)?),
        ),
        None => ("s.user_id::text".to_owned(), "false", String::new()),
    };
    let without_uuid: i64 = source_db
        .query_one(
            &format!("SELECT count(*) FROM {table} WHERE uuid IS NULL"),
            &[],
        )
        .await
        .map_err(ImportError::Read)?
        .try_get(0)
        .map_err(ImportError::Read)?;
    let sql = format!(
        "SELECT s.uuid, s.event::text, s.url::text, {owner}, s.hmac_secret::text,
                s.hmac_digest::text, s.content_type::text, s.created_at::timestamptz::text,
                {orphan}
         FROM {table} s {join}
         WHERE s.uuid IS NOT NULL
         ORDER BY s.created_at, s.uuid"
    );
    let rows = source_db
        .query(&sql, &[])
        .await
        .map_err(ImportError::Read)?;
    rows.iter()
        .map(|r| {
            Ok(Row {
                id: r.try_get(0)?,
                changes: Changes {
                    event: r.try_get(1)?,
                    url: r.try_get(2)?,
                    owner: Some(r.try_get(3)?),
                    hmac_secret: r.try_get::<_, Option<String>>(4)?.map(Secret),
                    hmac_digest: r.try_get(5)?,
                    content_type: r.try_get(6)?,
                    hmac_signer: Some(source.signer.as_str().to_owned()),
                    ..Changes::default()
                },
                created_at: r.try_get(7)?,
                orphan: r.try_get(8)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map(|rows| (rows, without_uuid))
        .map_err(ImportError::Read)
}

/// Copies Thorn's subscribers from `source_db` into `target`'s
/// `thorn.subscriber` (they may be the same database). With `dry_run`,
/// only reports what would happen.
pub async fn import(
    source_db: &impl GenericClient,
    target: &impl GenericClient,
    source: &Source,
    dry_run: bool,
) -> Result<Report, ImportError> {
    let (rows, without_uuid) = read(source_db, source).await?;
    let mut report = Report {
        without_uuid,
        ..Report::default()
    };
    for row in rows {
        let exists = target
            .query_opt("SELECT 1 FROM thorn.subscriber WHERE id = $1", &[&row.id])
            .await?
            .is_some();
        if exists {
            report.present.push(row.id);
            continue;
        }
        // Thorn's secrets were never empty; a NULL one is a broken row.
        let mut problems = subscribers::problems(target, None, &row.changes).await?;
        if row.changes.hmac_secret.is_none() {
            problems.insert("hmac_secret".into(), vec!["is missing".into()]);
        }
        if row.orphan {
            problems.insert(
                "owner".into(),
                vec!["its user_id has no row in the users table (as an anonymous subscriber it would receive every event without a sender)".into()],
            );
        }
        if !problems.is_empty() {
            report.skipped.push(Skipped {
                id: row.id,
                problems,
            });
            continue;
        }
        if dry_run {
            report.imported.push(row.id);
            continue;
        }
        let c = &row.changes;
        let owner: Option<&str> = c.owner.as_ref().and_then(|o| o.as_deref());
        let secret: Option<&str> = c.hmac_secret.as_ref().map(|s| s.0.as_str());
        let inserted = target
            .execute(
                "INSERT INTO thorn.subscriber
                     (id, event, url, owner, hmac_secret, hmac_digest, content_type, hmac_signer, created_at)
                 VALUES ($1, $2, $3, $4, $5, coalesce($6, 'sha256'), coalesce($7, 'application/json'),
                         $8, coalesce($9::text::timestamptz, now()))
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &row.id,
                    &c.event,
                    &c.url,
                    &owner,
                    &secret,
                    &c.hmac_digest,
                    &c.content_type,
                    &c.hmac_signer,
                    &row.created_at,
                ],
            )
            .await?;
        if inserted == 1 {
            report.imported.push(row.id);
        } else {
            report.present.push(row.id);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_or_refused() {
        assert_eq!(
            quoted("webhooks_subscriber").ok().as_deref(),
            Some("\"webhooks_subscriber\"")
        );
        assert_eq!(
            quoted("app.hooks").ok().as_deref(),
            Some("\"app\".\"hooks\"")
        );
        for bad in ["", "a.b.c", "x; DROP TABLE y", "\"q\"", "1abc"] {
            assert!(quoted(bad).is_err(), "{bad}");
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Thorn's subscriber table ([schema.]name)
    #[arg(long, default_value = "webhooks_subscriber")]
    pub table: String,
    /// The users table that user_id points to
    #[arg(long, default_value = "auth_user")]
    pub users_table: String,
    /// The users column events carry as sender
    #[arg(long, default_value = "username")]
    pub username_column: String,
    /// Use user_id itself (as text) as the owner, without a users table
    #[arg(long, conflicts_with_all = ["users_table", "username_column"])]
    pub owner_is_user_id: bool,
    /// Hook-HMAC scheme for the imported subscribers: compat (Thorn's
    /// default signer) or sign (if THORN_HMAC_SIGNER was sign)
    #[arg(long, default_value = "compat")]
    pub signer: Signer,
    /// The database holding Thorn's table (default: database_url)
    #[arg(long, env = "THORN_IMPORT_SOURCE_URL", hide_env_values = true)]
    pub source_url: Option<String>,
    /// Report what would be imported, change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON
    #[arg(long)]
    pub json: bool,
}

/// Runs `thorn import-thorn`, writing the report to `out`.
pub async fn run(config: &Config, args: Args, out: &mut impl Write) -> anyhow::Result<()> {
    let target = crate::db::connect(&config.database_url.0)
        .await
        .context("connecting to the database")?;
    let source_db = match &args.source_url {
        Some(url) => Some(
            crate::db::connect(url)
                .await
                .context("connecting to the source database")?,
        ),
        None => None,
    };
    let source = Source {
        table: args.table,
        users: (!args.owner_is_user_id).then_some(args.users_table),
        username_column: args.username_column,
        signer: args.signer,
    };
    let report = import(
        source_db.as_ref().unwrap_or(&target),
        &target,
        &source,
        args.dry_run,
    )
    .await?;
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        let verb = if args.dry_run {
            "would import"
        } else {
            "imported"
        };
        writeln!(
            out,
            "{verb} {}, already present {}, skipped {} (hmac_signer = {})",
            report.imported.len(),
            report.present.len(),
            report.skipped.len(),
            source.signer.as_str()
        )?;
        for skipped in &report.skipped {
            let reasons: Vec<String> = skipped
                .problems
                .iter()
                .map(|(f, m)| format!("{f}: {}", m.join("; ")))
                .collect();
            writeln!(out, "  skipped {}: {}", skipped.id, reasons.join(", "))?;
        }
        if report.without_uuid > 0 {
            writeln!(
                out,
                "  skipped {} rows without a uuid (no id to import them under)",
                report.without_uuid
            )?;
        }
    }
    Ok(())
}
