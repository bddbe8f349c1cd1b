//! Subscriber rows for the people who manage them: the REST API and
//! `thorn subscriber`. The daemon's hot path reads subscribers in `queue.rs`.
//!
//! Validity has one source of truth, the database: `thorn.subscriber_problems`
//! lists every bad column of a candidate row (the validating trigger raises
//! the first of the same list). Every query takes an optional owner `scope`:
//! `Some(owner)` sees only that owner's rows, `None` (an admin) sees all.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::config::{Config, ConfigSubscriber};
use crate::sign::Secret;

/// A subscriber as people see it.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    pub id: Uuid,
    pub event: String,
    pub url: String,
    pub content_type: String,
    pub owner: Option<String>,
    #[serde(serialize_with = "reveal")]
    pub hmac_secret: Secret,
    pub hmac_digest: String,
    pub hmac_signer: String,
    pub ordered: bool,
    pub active: bool,
    pub deactivated_reason: Option<String>,
    /// Switched off by an operator: it stays off until an operator (not
    /// its owner) switches it on (sql/0019_operator_off.sql).
    pub operator_off: bool,
    /// The `[subscribers.<name>]` table it comes from, if any.
    pub config_name: Option<String>,
    /// RFC 3339 in UTC, microseconds, `Z` (as Thorn's API rendered them).
    pub created_at: String,
    pub updated_at: String,
}

fn reveal<S: serde::Serializer>(secret: &Secret, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&secret.0)
}

/// Values to write. `None` leaves a column as it is (on insert: its default).
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub event: Option<String>,
    pub url: Option<String>,
    /// `Some(None)` clears the owner.
    pub owner: Option<Option<String>>,
    pub hmac_secret: Option<Secret>,
    pub hmac_digest: Option<String>,
    pub content_type: Option<String>,
    pub hmac_signer: Option<String>,
    pub ordered: Option<bool>,
    pub active: Option<bool>,
    /// Set with `active` by operators: their switch-off holds, their
    /// switch-on lifts it; ignored when `active` does not change.
    pub operator_off: Option<bool>,
}

/// Problems by field name, each field with its messages.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid subscriber: {}", describe(.0))]
    Invalid(FieldErrors),
    /// The row comes from the daemon's config (sql/0015), which is the one
    /// place to change it; the database's message says so.
    #[error("{0}")]
    FromConfig(String),
    /// An operator switched the row off, and only an operator switches it
    /// on (sql/0019); the database's message says so.
    #[error("{0}")]
    OperatorOff(String),
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
}

fn describe(fields: &FieldErrors) -> String {
    fields
        .iter()
        .map(|(f, m)| format!("{f}: {}", m.join("; ")))
        .collect::<Vec<_>>()
        .join(", ")
}

const COLUMNS: &str = "id, event, url, content_type, owner, hmac_secret, hmac_digest, hmac_signer,
    ordered, active, deactivated_reason, config_name, operator_off,
    to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
    to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')";

fn from_row(r: &Row) -> Result<Subscription, tokio_postgres::Error> {
    Ok(Subscription {
        id: r.try_get(0)?,
        event: r.try_get(1)?,
        url: r.try_get(2)?,
        content_type: r.try_get(3)?,
        owner: r.try_get(4)?,
        hmac_secret: Secret(r.try_get(5)?),
        hmac_digest: r.try_get(6)?,
        hmac_signer: r.try_get(7)?,
        ordered: r.try_get(8)?,
        active: r.try_get(9)?,
        deactivated_reason: r.try_get(10)?,
        config_name: r.try_get(11)?,
        operator_off: r.try_get(12)?,
        created_at: r.try_get(13)?,
        updated_at: r.try_get(14)?,
    })
}

/// Every problem of the row `base` would become with `changes` applied
/// (`base` = None: a new row with the defaults). A secret left out is not
/// a problem: a new row gets a random one, and a row's own is kept.
pub async fn problems(
    db: &impl GenericClient,
    base: Option<&Subscription>,
    changes: &Changes,
) -> Result<FieldErrors, tokio_postgres::Error> {
    let pick = |new: &Option<String>, old: Option<&String>, default: &str| -> String {
        new.clone()
            .or_else(|| old.cloned())
            .unwrap_or_else(|| default.to_owned())
    };
    let event = pick(&changes.event, base.map(|b| &b.event), "");
    let url = pick(&changes.url, base.map(|b| &b.url), "");
    let digest = pick(&changes.hmac_digest, base.map(|b| &b.hmac_digest), "sha256");
    let content_type = pick(
        &changes.content_type,
        base.map(|b| &b.content_type),
        "application/json",
    );
    let signer = pick(&changes.hmac_signer, base.map(|b| &b.hmac_signer), "sign");
    // Only a secret being set is judged: one kept as it is was accepted
    // when it was set (rules may have grown since: schema 17).
    let secret: Option<String> = changes.hmac_secret.as_ref().map(|s| s.0.clone());
    let rows = db
        .query(
            "SELECT column_name, problem
             FROM thorn.subscriber_problems($1, $2, $3, $4, $5, $6)
             WHERE NOT ($5::text IS NULL AND column_name = 'hmac_secret')",
            &[&event, &url, &digest, &content_type, &secret, &signer],
        )
        .await?;
    let mut errors = FieldErrors::new();
    for r in rows {
        errors.entry(r.try_get(0)?).or_default().push(r.try_get(1)?);
    }
    // Only an owner being set is judged (sql/0026), as the trigger does.
    let owner = changes.owner.as_ref().and_then(Option::as_deref);
    if owner.is_some() && owner != base.and_then(|b| b.owner.as_deref()) {
        let row = db
            .query_one("SELECT thorn.owner_problem($1)", &[&owner])
            .await?;
        if let Some(problem) = row.try_get::<_, Option<String>>(0)? {
            errors.insert("owner".into(), vec![problem]);
        }
    }
    Ok(errors)
}

/// The field a rejected write names: the trigger's COLUMN, or the column
/// of a `subscriber_<column>_check` constraint.
fn rejected(error: tokio_postgres::Error) -> StoreError {
    let Some(db) = error.as_db_error() else {
        return StoreError::Db(error);
    };
    // "thorn.subscriber.url: must be …" → "must be …"
    let message = db
        .message()
        .split_once(": ")
        .map_or(db.message(), |(_, m)| m);
    if *db.code() == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE {
        let said = match db.hint() {
            Some(hint) => format!("{message}. {hint}"),
            None => message.to_owned(),
        };
        match db.column() {
            Some("config_name") => return StoreError::FromConfig(said),
            Some("operator_off") => return StoreError::OperatorOff(said),
            _ => {}
        }
    }
    if *db.code() != SqlState::CHECK_VIOLATION {
        return StoreError::Db(error);
    }
    let field = db.column().map(str::to_owned).or_else(|| {
        db.constraint()
            .and_then(|c| c.strip_prefix("subscriber_"))
            .and_then(|c| c.strip_suffix("_check"))
            .map(str::to_owned)
    });
    match field {
        Some(field) => StoreError::Invalid(FieldErrors::from([(field, vec![message.to_owned()])])),
        None => StoreError::Db(error),
    }
}

pub async fn insert(db: &impl GenericClient, new: &Changes) -> Result<Subscription, StoreError> {
    let owner: Option<&str> = new.owner.as_ref().and_then(|o| o.as_deref());
    let secret: Option<&str> = new.hmac_secret.as_ref().map(|s| s.0.as_str());
    let sql = format!(
        "INSERT INTO thorn.subscriber
             (event, url, owner, hmac_secret, hmac_digest, content_type, hmac_signer, ordered, active,
              operator_off)
         VALUES ($1, $2, $3, coalesce($4, thorn.random_secret()), coalesce($5, 'sha256'),
                 coalesce($6, 'application/json'), coalesce($7, 'sign'),
                 coalesce($8, false), coalesce($9, true), coalesce($10, false))
         RETURNING {COLUMNS}"
    );
    let row = db
        .query_one(
            &sql,
            &[
                &new.event,
                &new.url,
                &owner,
                &secret,
                &new.hmac_digest,
                &new.content_type,
                &new.hmac_signer,
                &new.ordered,
                &new.active,
                &new.operator_off,
            ],
        )
        .await
        .map_err(rejected)?;
    Ok(from_row(&row)?)
}

pub async fn get(
    db: &impl GenericClient,
    id: Uuid,
    scope: Option<&str>,
) -> Result<Option<Subscription>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM thorn.subscriber
         WHERE id = $1 AND ($2::text IS NULL OR owner = $2)"
    );
    db.query_opt(&sql, &[&id, &scope])
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
}

/// These subscribers' rows, by id; a deleted one is missing.
pub async fn by_ids(
    db: &impl GenericClient,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, Subscription>, tokio_postgres::Error> {
    let sql = format!("SELECT {COLUMNS} FROM thorn.subscriber WHERE id = ANY($1)");
    let rows = db.query(&sql, &[&ids]).await?;
    rows.iter()
        .map(|r| from_row(r).map(|s| (s.id, s)))
        .collect()
}

pub async fn list(
    db: &impl GenericClient,
    scope: Option<&str>,
) -> Result<Vec<Subscription>, tokio_postgres::Error> {
    let sql = format!(
        "SELECT {COLUMNS} FROM thorn.subscriber
         WHERE $1::text IS NULL OR owner = $1
         ORDER BY created_at, id"
    );
    db.query(&sql, &[&scope])
        .await?
        .iter()
        .map(from_row)
        .collect()
}

/// Applies `changes` to the row if `scope` may see it, and, if
/// `url_must_stay`, the row's URL is already the one `changes` writes;
/// `None` if not.
pub async fn update(
    db: &impl GenericClient,
    id: Uuid,
    scope: Option<&str>,
    changes: &Changes,
    url_must_stay: bool,
) -> Result<Option<Subscription>, StoreError> {
    let set_owner = changes.owner.is_some();
    let owner: Option<&str> = changes.owner.as_ref().and_then(|o| o.as_deref());
    let secret: Option<&str> = changes.hmac_secret.as_ref().map(|s| s.0.as_str());
    let sql = format!(
        "UPDATE thorn.subscriber SET
             event = coalesce($3, event),
             url = coalesce($4, url),
             owner = CASE WHEN $5 THEN $6 ELSE owner END,
             hmac_secret = coalesce($7, hmac_secret),
             hmac_digest = coalesce($8, hmac_digest),
             content_type = coalesce($9, content_type),
             hmac_signer = coalesce($10, hmac_signer),
             ordered = coalesce($11, ordered),
             active = coalesce($12, active),
             -- Only a switch is an operator's: a row written back as it is
             -- (GET, edit, PUT) keeps who switched it off. Decided against
             -- the row as it is now, not as it was read.
             operator_off = CASE WHEN $12 IS DISTINCT FROM active
                                 THEN coalesce($13, operator_off) ELSE operator_off END
         WHERE id = $1 AND ($2::text IS NULL OR owner = $2) AND (NOT $14 OR url = $4)
         RETURNING {COLUMNS}"
    );
    let row = db
        .query_opt(
            &sql,
            &[
                &id,
                &scope,
                &changes.event,
                &changes.url,
                &set_owner,
                &owner,
                &secret,
                &changes.hmac_digest,
                &changes.content_type,
                &changes.hmac_signer,
                &changes.ordered,
                &changes.active,
                &changes.operator_off,
                &url_must_stay,
            ],
        )
        .await
        .map_err(rejected)?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// Deletes the row if `scope` may see it; false if not.
pub async fn delete(
    db: &impl GenericClient,
    id: Uuid,
    scope: Option<&str>,
) -> Result<bool, StoreError> {
    let n = db
        .execute(
            "DELETE FROM thorn.subscriber WHERE id = $1 AND ($2::text IS NULL OR owner = $2)",
            &[&id, &scope],
        )
        .await
        .map_err(rejected)?;
    Ok(n > 0)
}

/// Enables or disables a subscriber for an operator, keeping a reason.
pub async fn set_active(
    db: &impl GenericClient,
    id: Uuid,
    active: bool,
    reason: Option<&str>,
) -> Result<Option<Subscription>, StoreError> {
    let sql = format!(
        "UPDATE thorn.subscriber SET active = $2, operator_off = NOT $2,
             deactivated_reason = CASE WHEN $2 THEN NULL ELSE $3 END
         WHERE id = $1
         RETURNING {COLUMNS}"
    );
    let row = db
        .query_opt(&sql, &[&id, &active, &reason])
        .await
        .map_err(rejected)?;
    Ok(row.as_ref().map(from_row).transpose()?)
}

/// What a sync of the config's subscribers did to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Synced {
    pub name: String,
    pub id: Uuid,
    pub change: Change,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Changed,
    /// Back in the config: switched on again.
    Restored,
    /// Back in the config, but kept off: an operator switched it off
    /// (sql/0019_operator_off.sql).
    KeptOff,
    /// Gone from the config: switched off and kept
    /// (sql/0015_config_subscribers.sql).
    Removed,
}

impl Change {
    fn from_sql(change: &str) -> Change {
        match change {
            "created" => Change::Created,
            "restored" => Change::Restored,
            "removed" => Change::Removed,
            _ => Change::Changed,
        }
    }
}

/// Makes the subscribers of the config's `[subscribers]` table (if it has
/// one) those in the database, and logs each one created, changed,
/// restored or switched off. Called at start and on reload.
pub async fn sync_from_config(
    client: &mut tokio_postgres::Client,
    config: &Config,
) -> Result<(), StoreError> {
    let Some(entries) = &config.subscribers else {
        return Ok(());
    };
    let synced = sync_config(client, config, entries).await?;
    for s in &synced {
        if s.change == Change::Removed {
            tracing::warn!(
                name = %s.name, id = %s.id,
                "subscriber removed from the config: switched off, kept with its deliveries; \
                 delete it (thorn subscriber remove) once it is not coming back"
            );
        } else if s.change == Change::KeptOff {
            tracing::warn!(
                name = %s.name, id = %s.id,
                "subscriber back in the config stays off: an operator switched it off; \
                 thorn subscriber enable switches it on"
            );
        } else {
            tracing::info!(name = %s.name, id = %s.id, change = ?s.change, "subscriber from the config");
        }
    }
    tracing::info!(
        configured = entries.len(),
        changed = synced.len(),
        "subscribers from the config are in place"
    );
    Ok(())
}

/// Makes the config-made rows what `entries` says (sql/0015): creates,
/// changes, restores and switches off rows in one transaction. Every bad
/// field of every entry is reported at once, as
/// `subscribers.<name>.<field>`, and then nothing is written.
pub async fn sync_config(
    db: &mut tokio_postgres::Client,
    config: &Config,
    entries: &BTreeMap<String, ConfigSubscriber>,
) -> Result<Vec<Synced>, StoreError> {
    let bad = config_problems(&*db, config, entries).await?;
    if !bad.is_empty() {
        return Err(StoreError::Invalid(bad));
    }
    let entries = serde_json::to_value(entries).expect("config subscribers serialize");
    // READ COMMITTED whatever the role's default: a sync that waited for
    // another's lock must see what that one committed. Bounded, so that a
    // row locked elsewhere fails a start or a reload instead of hanging it.
    let tx = db
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?;
    tx.batch_execute("SET LOCAL lock_timeout = '5s'; SET LOCAL statement_timeout = '30s'")
        .await?;
    let rows = tx
        .query(
            "SELECT entry, subscriber_id, change FROM thorn.sync_config_subscribers($1)",
            &[&entries],
        )
        .await
        .map_err(rejected)?;
    let mut synced = rows
        .iter()
        .map(|r| {
            Ok(Synced {
                name: r.try_get(0)?,
                id: r.try_get(1)?,
                change: Change::from_sql(r.try_get(2)?),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    // The sync calls a row back in the config "restored" even when the
    // operator's switch-off kept it off; say what happened instead.
    let restored: Vec<Uuid> = synced
        .iter()
        .filter(|s| s.change == Change::Restored)
        .map(|s| s.id)
        .collect();
    if !restored.is_empty() {
        let kept_off: Vec<Uuid> = tx
            .query(
                "SELECT id FROM thorn.subscriber WHERE id = ANY($1) AND NOT active",
                &[&restored],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for s in &mut synced {
            if kept_off.contains(&s.id) {
                s.change = Change::KeptOff;
            }
        }
    }
    tx.commit().await?;
    Ok(synced)
}

/// Every problem of the config's subscribers, by `subscribers.<name>.<field>`:
/// the database's, then [`config_url_problems`] for URLs it accepts.
pub async fn config_problems(
    db: &impl GenericClient,
    config: &Config,
    entries: &BTreeMap<String, ConfigSubscriber>,
) -> Result<FieldErrors, tokio_postgres::Error> {
    let mut bad = FieldErrors::new();
    for (name, entry) in entries {
        let wanted = Changes {
            event: Some(entry.event.clone()),
            url: Some(entry.url.clone()),
            hmac_secret: entry.hmac_secret.as_ref().map(|s| Secret(s.0.clone())),
            hmac_digest: entry.hmac_digest.clone(),
            content_type: entry.content_type.clone(),
            hmac_signer: entry.hmac_signer.clone(),
            ..Changes::default()
        };
        for (field, messages) in problems(db, None, &wanted).await? {
            bad.insert(format!("subscribers.{name}.{field}"), messages);
        }
    }
    for (key, messages) in config_url_problems(config) {
        bad.entry(key).or_insert(messages);
    }
    Ok(bad)
}

/// What the delivery client's rules that need no DNS (scheme, port, a
/// literal address the guard refuses) say of the config subscribers' URLs,
/// as the API applies them: deliveries there would all be refused. Needs
/// no database, so plain `thorn check-config` asks it too.
pub fn config_url_problems(config: &Config) -> FieldErrors {
    // Fails only on an unusable TLS setting, which the daemon refuses anyway.
    let (Some(entries), Ok(rules)) = (
        &config.subscribers,
        crate::deliver::client::Client::new(config),
    ) else {
        return FieldErrors::new();
    };
    entries
        .iter()
        .filter_map(|(name, entry)| {
            let message = rules.check_url(&entry.url).err()?;
            Some((format!("subscribers.{name}.url"), vec![message]))
        })
        .collect()
}
