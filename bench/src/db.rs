//! The benchmark's own databases: created fresh for each scenario on the
//! server the caller names, migrated by the `thorn` binary itself, and
//! dropped afterwards.

use std::path::Path;

use anyhow::{bail, Context};
use tokio_postgres::{Client, NoTls};

/// The annotated table of every scenario (the W scenarios make copies of it).
pub const TABLE_SHAPE: &str = "
    id         bigserial PRIMARY KEY,
    title      text NOT NULL,
    state      text NOT NULL,
    author     text NOT NULL,
    body       text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()";

/// A 64-character body, so a row is ~150 bytes of JSON.
pub const BODY: &str = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do.";

pub async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {}", redact(url)))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// A URL with any password hidden, for messages.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A database created for one scenario and dropped by [`Scratch::drop_now`].
pub struct Scratch {
    pub url: String,
    name: String,
    admin_url: String,
}

impl Scratch {
    pub async fn create(admin_url: &str, scenario: &str) -> anyhow::Result<Scratch> {
        let name = format!(
            "thorn_bench_{}_{}",
            scenario.to_ascii_lowercase(),
            std::process::id()
        );
        let admin = connect(admin_url).await?;
        // Two statements: DROP DATABASE refuses to run in a multi-statement batch.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping a leftover database {name}"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating database {name}"))?;
        let mut url =
            url::Url::parse(admin_url).context("the database URL must be a postgres:// URL")?;
        url.set_path(&format!("/{name}"));
        Ok(Scratch {
            url: url.to_string(),
            name,
            admin_url: admin_url.to_owned(),
        })
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let admin = connect(&self.admin_url).await?;
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .with_context(|| format!("dropping database {}", self.name))
    }
}

/// Drops every database this process created (after a failed run).
pub async fn drop_leftovers(admin_url: &str) -> anyhow::Result<()> {
    let admin = connect(admin_url).await?;
    let pattern = format!("thorn\\_bench\\_%\\_{}", std::process::id());
    let rows = admin
        .query(
            "SELECT datname::text FROM pg_database WHERE datname LIKE $1",
            &[&pattern],
        )
        .await?;
    for row in rows {
        let name: String = row.try_get(0)?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await?;
    }
    Ok(())
}

/// Installs thorn's schema with `thorn migrate`, as an operator would.
pub async fn migrate(thorn: &Path, config: &Path) -> anyhow::Result<()> {
    let out = tokio::process::Command::new(thorn)
        .arg("--config")
        .arg(config)
        .arg("migrate")
        .env("RUST_LOG", "warn")
        .output()
        .await
        .with_context(|| format!("running {} migrate", thorn.display()))?;
    if !out.status.success() {
        bail!(
            "thorn migrate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Server facts for the report: version and the settings that shape write
/// and commit speed.
pub async fn server_facts(admin_url: &str) -> anyhow::Result<Vec<(String, String)>> {
    let client = connect(admin_url).await?;
    let mut facts = vec![(
        "version".to_owned(),
        client
            .query_one("SHOW server_version", &[])
            .await?
            .try_get::<_, String>(0)?,
    )];
    for name in [
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "wal_level",
        "max_wal_size",
        "checkpoint_timeout",
        "work_mem",
        "max_connections",
    ] {
        let row = client.query_one(&format!("SHOW {name}"), &[]).await?;
        facts.push((name.to_owned(), row.try_get(0)?));
    }
    Ok(facts)
}
