//! The operator's subcommands, one module each: `thorn subscriber`, `status`,
//! `retry`, `replay`, `import-thorn`, `sign`. Each owns its clap arguments
//! and a `run`; each prints text for people or, with `--json`, JSON for
//! scripts, and none prints a secret or a URL's query string unless asked
//! for that one subscriber.

pub mod import_thorn;
pub mod replay;
pub mod retry;
pub mod sign;
pub mod status;
pub mod subscriber;

use std::time::{Duration, SystemTime};

/// A point in time given as RFC 3339 (`2026-11-27T10:00:00Z`) or as an age
/// (`2h` means two hours ago).
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s.trim()) {
        return Ok(t);
    }
    humantime::parse_duration(s.trim())
        .map(|age| SystemTime::now() - age)
        .map_err(|_| format!("{s:?} is neither a time (2026-11-27T10:00:00Z) nor an age (2h)"))
}

/// A URL without its query and fragment, which may carry tokens.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => url.split(['?', '#']).next().unwrap_or("").to_owned(),
    }
}

/// Seconds as a short human duration ("3m 20s").
pub fn age(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}

/// A connection for a one-shot command.
pub async fn connect(config: &crate::config::Config) -> anyhow::Result<tokio_postgres::Client> {
    use anyhow::Context;
    crate::db::connect(&config.database_url.0)
        .await
        .context("connecting to the database")
}

/// Wakes sleeping daemons after an operator queued work.
pub async fn wake_daemons(db: &tokio_postgres::Client) -> Result<(), tokio_postgres::Error> {
    db.batch_execute(&format!("NOTIFY {}", crate::db::listen::CHANNEL))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_ages() {
        assert!(parse_time("2026-11-27T10:00:00Z").is_ok());
        let two_hours_ago = parse_time("2h").expect("age");
        let elapsed = SystemTime::now()
            .duration_since(two_hours_ago)
            .expect("past");
        assert!(elapsed >= Duration::from_secs(7200) && elapsed < Duration::from_secs(7260));
        assert!(parse_time("yesterday-ish").is_err());
    }

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("https://u:pw@e.com/h?token=abc#x"),
            "https://u@e.com/h"
        );
    }
}
