//! `thorn subscriber add|list|show|remove|enable|disable`: the subscriber
//! table from the command line, with the same validation as the API.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use uuid::Uuid;

use crate::config::Config;
use crate::db::subscribers::{self, Changes, StoreError, Subscription};
use crate::sign::Secret;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: SubscriberCommand,
}

#[derive(Debug, Subcommand)]
pub enum SubscriberCommand {
    /// Subscribe a URL to an event pattern; prints the new row with its secret
    Add {
        /// Event pattern: dot-separated segments, * for one, a trailing * for one or more (article.*)
        #[arg(long)]
        event: String,
        #[arg(long)]
        url: String,
        /// Receives only events whose sender is this owner (none: only
        /// events without a sender)
        #[arg(long)]
        owner: Option<String>,
        /// HMAC secret (default: 64 random characters)
        #[arg(long, env = "THORN_SUBSCRIBER_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// sha1, sha224, sha256, sha384 or sha512
        #[arg(long)]
        digest: Option<String>,
        /// application/json or application/x-www-form-urlencoded
        #[arg(long)]
        content_type: Option<String>,
        /// Hook-HMAC scheme: sign, or compat for Thorn's old default
        #[arg(long)]
        signer: Option<String>,
        /// Deliver one at a time, in event order
        #[arg(long)]
        ordered: bool,
    },
    /// List subscribers (secrets are not shown)
    List {
        /// Only this owner's subscribers
        #[arg(long)]
        owner: Option<String>,
    },
    /// Show one subscriber, with its secret
    Show { id: String },
    /// Delete a subscriber and its pending deliveries
    Remove { id: String },
    /// Resume deliveries to a subscriber (lifting an operator's switch-off)
    Enable { id: String },
    /// Stop deliveries to a subscriber; its owner cannot resume them
    /// through the API, only an operator can
    Disable {
        id: String,
        #[arg(long, default_value = "disabled by an operator")]
        reason: String,
    },
}

fn parse_id(raw: &str) -> anyhow::Result<Uuid> {
    Uuid::try_parse(raw.trim()).with_context(|| format!("{raw:?} is not a subscriber id (a uuid)"))
}

fn missing(id: Uuid) -> anyhow::Error {
    anyhow::anyhow!("no subscriber {id}")
}

/// Runs `thorn subscriber …`, writing to `out`.
pub async fn run(config: &Config, args: Args, out: &mut impl Write) -> anyhow::Result<()> {
    let db = crate::db::connect(&config.database_url.0)
        .await
        .context("connecting to the database")?;
    let json = args.json;
    match args.command {
        SubscriberCommand::Add {
            event,
            url,
            owner,
            secret,
            digest,
            content_type,
            signer,
            ordered,
        } => {
            let changes = Changes {
                event: Some(event),
                url: Some(url),
                owner: Some(owner),
                hmac_secret: secret.map(Secret),
                hmac_digest: digest,
                content_type,
                hmac_signer: signer,
                ordered: Some(ordered),
                ..Changes::default()
            };
            // Every bad field at once, from the database's own rules, and
            // a URL the delivery client could not even parse (the API
            // refuses it too).
            let mut problems = subscribers::problems(&db, None, &changes).await?;
            if let Some(url) = changes
                .url
                .as_deref()
                .filter(|_| !problems.contains_key("url"))
            {
                if let Err(error) = url::Url::parse(url) {
                    problems.insert("url".into(), vec![format!("not a URL: {error}")]);
                } else if let Err(why) = crate::deliver::client::Client::new(config)
                    .map_or(Ok(()), |client| client.check_url(url).map(drop))
                {
                    // This config's rules; the daemon's may allow it.
                    tracing::warn!(
                        "url: {why}: deliveries there are refused unless the daemon's [security] allows them"
                    );
                }
            }
            if !problems.is_empty() {
                return Err(StoreError::Invalid(problems).into());
            }
            let row = subscribers::insert(&db, &changes).await?;
            print_one(out, &row, json)
        }
        SubscriberCommand::List { owner } => {
            let mut rows = subscribers::list(&db, None).await?;
            if let Some(owner) = owner {
                rows.retain(|r| r.owner.as_deref() == Some(owner.as_str()));
            }
            print_list(out, &rows, json)
        }
        SubscriberCommand::Show { id } => {
            let id = parse_id(&id)?;
            let row = subscribers::get(&db, id, None)
                .await?
                .ok_or_else(|| missing(id))?;
            print_one(out, &row, json)
        }
        SubscriberCommand::Remove { id } => {
            let id = parse_id(&id)?;
            if !subscribers::delete(&db, id, None).await? {
                return Err(missing(id));
            }
            if json {
                writeln!(out, "{}", serde_json::json!({ "id": id, "removed": true }))?;
            } else {
                writeln!(out, "removed {id}")?;
            }
            Ok(())
        }
        SubscriberCommand::Enable { id } => {
            let id = parse_id(&id)?;
            let row = subscribers::set_active(&db, id, true, None)
                .await?
                .ok_or_else(|| missing(id))?;
            print_one(out, &row, json)
        }
        SubscriberCommand::Disable { id, reason } => {
            let id = parse_id(&id)?;
            let row = subscribers::set_active(&db, id, false, Some(&reason))
                .await?
                .ok_or_else(|| missing(id))?;
            print_one(out, &row, json)
        }
    }
}

fn print_one(out: &mut impl Write, row: &Subscription, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(row)?)?;
        return Ok(());
    }
    let owner = row
        .owner
        .as_deref()
        .unwrap_or("(none: only events without a sender)");
    let state = match (&row.active, &row.deactivated_reason) {
        (true, _) => "active".to_owned(),
        (false, Some(reason)) => format!("inactive ({reason})"),
        (false, None) => "inactive".to_owned(),
    };
    writeln!(out, "id:           {}", row.id)?;
    writeln!(out, "event:        {}", row.event)?;
    writeln!(out, "url:          {}", row.url)?;
    writeln!(out, "owner:        {owner}")?;
    writeln!(out, "state:        {state}")?;
    writeln!(out, "content_type: {}", row.content_type)?;
    writeln!(out, "hmac_digest:  {}", row.hmac_digest)?;
    writeln!(out, "hmac_signer:  {}", row.hmac_signer)?;
    writeln!(out, "hmac_secret:  {}", row.hmac_secret.0)?;
    writeln!(out, "ordered:      {}", row.ordered)?;
    writeln!(out, "created_at:   {}", row.created_at)?;
    writeln!(out, "updated_at:   {}", row.updated_at)?;
    if let Some(name) = &row.config_name {
        writeln!(
            out,
            "from config:  [subscribers.{name}] (change or remove it there)"
        )?;
    }
    Ok(())
}

fn print_list(out: &mut impl Write, rows: &[Subscription], json: bool) -> anyhow::Result<()> {
    if json {
        let mut values = Vec::with_capacity(rows.len());
        for row in rows {
            let mut value = serde_json::to_value(row)?;
            if let Some(object) = value.as_object_mut() {
                object.remove("hmac_secret");
                object.insert("url".into(), super::redact_url(&row.url).into());
            }
            values.push(value);
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&values)?)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<36}  {:<8}  {:<16}  {:<24}  URL",
        "ID", "STATE", "OWNER", "EVENT"
    )?;
    for row in rows {
        writeln!(
            out,
            "{:<36}  {:<8}  {:<16}  {:<24}  {}",
            row.id,
            if row.active { "active" } else { "inactive" },
            row.owner.as_deref().unwrap_or("-"),
            row.event,
            super::redact_url(&row.url)
        )?;
    }
    Ok(())
}
