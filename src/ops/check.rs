//! `thorn check-config`: every problem in the file and the environment,
//! each with its key, instead of only the first.
//!
//! Deserializing stops at the first bad value, so the merged tree is
//! deserialized repeatedly: each failure is recorded and its key removed
//! (falling back to the default) until the rest deserializes; then
//! `Config::validate` reports every semantic problem at once. The loop ends
//! because each round removes a key, and is capped besides.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use config::{Value, ValueKind};

use crate::config::{Config, ConfigError};

/// One problem: the key (`delivery.timeout`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Most rounds of remove-and-retry (more keys than the config has).
const MAX_ROUNDS: usize = 100;

/// Checks `file_text` and the `THORN_*` entries of `env` like
/// [`Config::load`], but returns every problem.
pub fn check(
    file_text: Option<&str>,
    env: &HashMap<String, String>,
) -> Result<Config, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut tree = match Config::layered(file_text, env) {
        Ok(merged) => merged.cache,
        Err(error) => {
            return Err(vec![Problem {
                key: "(file)".into(),
                message: error.to_string(),
            }])
        }
    };
    let mut config = None;
    for _ in 0..MAX_ROUNDS {
        match tree.clone().try_deserialize::<Config>() {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(error) => {
                let problem = describe(&error);
                let removed = remove(&mut tree, &problem.key);
                problems.push(problem);
                if !removed {
                    break;
                }
            }
        }
    }
    if let Some(c) = config.as_mut() {
        match c.validate() {
            Ok(()) => {}
            Err(ConfigError::Many(all)) => problems.extend(all.iter().map(from_error)),
            Err(one) => problems.push(from_error(&one)),
        }
    }
    for p in &mut problems {
        if let Some(var) = env_var(&p.key).filter(|v| env.contains_key(v)) {
            p.message.push_str(&format!(" (set by {var})"));
            if let Some(here) = django_thorn_setting(&var) {
                p.message.push_str(&format!(
                    "; that is Django Thorn's setting, here {here} (docs/migrating-from-thorn.md)"
                ));
            }
        }
    }
    match config {
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(problems),
    }
}

/// What stands here for a setting of Django Thorn, which a deployment
/// being moved over may still have in its environment.
fn django_thorn_setting(var: &str) -> Option<&'static str> {
    Some(match var {
        "THORN_EVENT_TIMEOUT" => "delivery.timeout (THORN_DELIVERY__TIMEOUT, e.g. \"3s\")",
        "THORN_RETRY" | "THORN_RETRY_MAX" | "THORN_RETRY_DELAY" => {
            "delivery.retry_schedule, a list of delays"
        }
        "THORN_RECIPIENT_VALIDATORS" => {
            "security.allow_networks, security.https_only and security.allowed_ports"
        }
        "THORN_ALLOW_REDIRECTS" => "nothing: redirects are never followed",
        "THORN_HMAC_SIGNER" => "each subscriber's hmac_signer",
        "THORN_CHUNKSIZE" => "dispatch.batch_size and delivery.batch_size",
        "THORN_DRF_PERMISSION_CLASSES" => "the [api] section's bearer tokens",
        "THORN_SIGNAL_HONORS_TRANSACTION" => "nothing: events always follow the commit",
        "THORN_DISPATCHER" => "the daemon itself (thorn run; stop it to stop dispatching)",
        _ => return None,
    })
}

fn from_error(error: &ConfigError) -> Problem {
    match error {
        ConfigError::Invalid { key, message } => Problem {
            key: (*key).to_string(),
            message: message.clone(),
        },
        ConfigError::Parse(e) => describe(e),
        other => Problem {
            key: "(config)".into(),
            message: other.to_string(),
        },
    }
}

/// The key and a message without the crate's "for key …" suffix.
fn describe(error: &config::ConfigError) -> Problem {
    use config::ConfigError as E;
    let (key, inner) = match error {
        E::At {
            key, error: inner, ..
        } => (key.clone().unwrap_or_default(), inner.to_string()),
        E::Type { key, .. } => (key.clone().unwrap_or_default(), error.to_string()),
        E::NotFound(key) => (key.clone(), "missing".to_string()),
        other => (String::new(), other.to_string()),
    };
    let message = match inner.find(" for key `") {
        Some(at) => inner[..at].to_string(),
        None => inner,
    };
    // serde: "unknown field `x`, expected one of …" names the key one level
    // below the one the error is attached to.
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((field, _)) = rest.split_once('`') {
            let key = if key.is_empty() {
                field.to_string()
            } else {
                format!("{key}.{field}")
            };
            return Problem {
                key,
                message: "unknown key".into(),
            };
        }
    }
    Problem {
        key: if key.is_empty() {
            "(config)".into()
        } else {
            key
        },
        message,
    }
}

/// Removes `key` (`a.b`, `a.b[2]` → `a.b`) from the tree; false if absent.
fn remove(tree: &mut Value, key: &str) -> bool {
    let key = key.split('[').next().unwrap_or(key);
    let mut parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut node = tree;
    for part in parts {
        match &mut node.kind {
            ValueKind::Table(table) => match table.get_mut(part) {
                Some(next) => node = next,
                None => return false,
            },
            _ => return false,
        }
    }
    match &mut node.kind {
        ValueKind::Table(table) => table.remove(last).is_some(),
        _ => false,
    }
}

/// The variable that sets `key`: `delivery.timeout` → `THORN_DELIVERY__TIMEOUT`.
fn env_var(key: &str) -> Option<String> {
    if key.starts_with('(') {
        return None;
    }
    let key = key.split('[').next().unwrap_or(key);
    Some(format!("THORN_{}", key.to_uppercase().replace('.', "__")))
}

/// How a database check went.
#[derive(Debug)]
pub enum Reachable {
    /// Connected; the schema is at migration `schema` (0: not installed;
    /// `thorn migrate` or `thorn run` installs or upgrades it).
    Yes {
        schema: i32,
        latest: i32,
        /// What the database finds wrong with the config's `[subscribers]`
        /// (it is the one judge of a valid subscriber).
        subscribers: Vec<Problem>,
    },
    No(String),
}

/// Connects once (bounded by `within`), reads the schema version and, once
/// the schema can judge them (version 3), checks the config's subscribers.
pub async fn database(config: &Config, within: Duration) -> Reachable {
    let attempt = async {
        let client = crate::db::connect(&config.database_url.0)
            .await
            .map_err(|e| chain(&e))?;
        let schema = crate::db::migrate::current_version(&client)
            .await
            .map_err(|e| chain(&e))?;
        let mut subscribers = Vec::new();
        if let (Some(entries), true) = (&config.subscribers, schema >= 3) {
            let found = crate::db::subscribers::config_problems(&client, config, entries)
                .await
                .map_err(|e| chain(&e))?;
            for (key, messages) in found {
                subscribers.extend(messages.into_iter().map(|message| Problem {
                    key: key.clone(),
                    message,
                }));
            }
        }
        Ok::<_, String>((schema, subscribers))
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(Ok((schema, subscribers))) => Reachable::Yes {
            schema,
            latest: crate::db::migrate::latest(),
            subscribers,
        },
        Ok(Err(e)) => Reachable::No(e),
        Err(_) => Reachable::No(format!(
            "no answer within {}",
            humantime::format_duration(within)
        )),
    }
}

/// An error and its causes, "a: b: c".
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str, env: &[(&str, &str)]) -> Vec<String> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        match check(Some(text), &env) {
            Ok(_) => Vec::new(),
            Err(p) => p.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let got = problems(
            r#"
            surprise = 1
            [delivery]
            timeout = "soon"
            timeuot = "1s"
            retry_schedule = ["5s", "later"]
            concurrency = 0
            [security]
            allow_networks = ["10.0.0.0/8", "nope", "300.1.1.1/8"]
            [metrics]
            listen = "localhost"
            [log]
            level = "info,=[["
            "#,
            &[("THORN_DISPATCH__POLL_INTERVAL", "often")],
        );
        let keys: Vec<&str> = got
            .iter()
            .map(|p| p.split(':').next().unwrap_or(""))
            .collect();
        for key in [
            "surprise",
            "delivery.timeout",
            "delivery.timeuot",
            "delivery.retry_schedule",
            "delivery.concurrency",
            "security.allow_networks",
            "metrics.listen",
            "log.level",
            "dispatch.poll_interval",
        ] {
            assert!(keys.contains(&key), "{key} missing from {got:#?}");
        }
        assert_eq!(
            keys.iter()
                .filter(|k| **k == "security.allow_networks")
                .count(),
            2,
            "{got:#?}"
        );
        assert!(
            got.iter()
                .any(|p| p.contains("(set by THORN_DISPATCH__POLL_INTERVAL)")),
            "{got:#?}"
        );
        assert!(got.iter().any(|p| p == "surprise: unknown key"), "{got:#?}");
    }

    #[test]
    fn a_good_file_passes_and_matches_load() {
        let text = "[delivery]\ntimeout = \"1s\"\n[metrics]\nlisten = \"127.0.0.1:9187\"";
        let env = HashMap::new();
        let checked = check(Some(text), &env).expect("valid");
        let loaded = Config::load(Some(text), &env).expect("valid");
        assert_eq!(format!("{checked:?}"), format!("{loaded:?}"));
    }

    #[test]
    fn a_syntax_error_is_one_problem() {
        let got = problems("[delivery\ntimeout = 1", &[]);
        assert_eq!(got.len(), 1, "{got:?}");
    }

    #[test]
    fn django_thorns_settings_are_named_with_what_stands_for_them() {
        let got = problems("", &[("THORN_EVENT_TIMEOUT", "3.0")]);
        assert_eq!(
            got,
            vec![
                "event_timeout: unknown key (set by THORN_EVENT_TIMEOUT); that is Django Thorn's \
                 setting, here delivery.timeout (THORN_DELIVERY__TIMEOUT, e.g. \"3s\") \
                 (docs/migrating-from-thorn.md)"
            ]
        );
    }

    #[test]
    fn unknown_environment_keys_are_named() {
        let got = problems("", &[("THORN_DELIVERY__TIMEOTU", "1s")]);
        assert_eq!(
            got,
            vec!["delivery.timeotu: unknown key (set by THORN_DELIVERY__TIMEOTU)"]
        );
    }
}
