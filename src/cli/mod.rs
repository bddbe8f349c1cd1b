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
    let age = humantime::parse_duration(s.trim())
        .map_err(|_| format!("{s:?} is neither a time (2026-11-27T10:00:00Z) nor an age (2h)"))?;
    // Nothing thorn keeps is older than 1970.
    SystemTime::now()
        .checked_sub(age)
        .filter(|t| *t >= SystemTime::UNIX_EPOCH)
        .ok_or_else(|| format!("{s:?} reaches back before 1970"))
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
        // Not a URL to the parser: still nothing after `?` or `#`, and
        // nothing before an `@` (a password may sit there).
        Err(_) => {
            let kept = url.split(['?', '#']).next().unwrap_or("");
            let Some((scheme, rest)) = kept.split_once("://") else {
                return kept.to_owned();
            };
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority
                .rsplit_once('@')
                .map_or(authority, |(_, host)| host);
            format!("{scheme}://{host}{path}")
        }
    }
}

/// Seconds as a short human duration ("3m 20s").
pub fn age(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0) as u64)).to_string()
}

/// A connection for a one-shot command.
pub async fn connect(config: &crate::config::Config) -> anyhow::Result<tokio_postgres::Client> {
    use anyhow::Context;
    // An operator's command during an incident (a table locked by a
    // migration, say) says so instead of waiting for ever.
    crate::db::connect_with(&config.database_url.0, "SET lock_timeout = '10s'")
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
        for huge in ["100000y", "1000000y", "100000000000y"] {
            assert!(parse_time(huge).is_err(), "{huge}");
        }
    }

    #[test]
    fn urls_lose_their_secrets() {
        assert_eq!(
            redact_url("https://u:pw@e.com/h?token=abc#x"),
            "https://u@e.com/h"
        );
        // Not URLs to the parser: the part before an `@` goes too.
        assert_eq!(
            redact_url("http://user:hunter2@ex<ample.com/p@q?t=1"),
            "http://ex<ample.com/p@q"
        );
        assert_eq!(redact_url("not a url?x"), "not a url");
    }
}
