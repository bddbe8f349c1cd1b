//! Configuration: defaults, then the TOML file, then `THORN_*` variables,
//! validated into typed values.
//!
//! Loading is a pure function of the file's text and an environment map, so
//! tests never touch the process environment. Every problem names its key.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// The file read when neither `--config` nor `THORN_CONFIG` names one.
pub const DEFAULT_PATH: &str = "/etc/thorn/thorn.toml";

/// Environment variables that are not config keys although they look like
/// them: the file's own and the consumer examples' in docs/examples, which
/// may share the daemon's environment. (The subcommands' own, such as
/// `THORN_SIGN_SECRET`, are left out by the caller, which knows them.) Any
/// other `THORN_*` variable is a key, and an unknown one is an error, so
/// that a misspelt setting is never silently ignored.
const NOT_KEYS: &[&str] = &["THORN_CONFIG", "THORN_SECRET", "THORN_DIGEST"];

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "delivery.retry_schedule",
    "security.allow_networks",
    "security.allowed_ports",
    "security.extra_ca_files",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Parse(#[from] config::ConfigError),
    #[error("{key}: {message}")]
    Invalid { key: &'static str, message: String },
    /// Several problems (`validate` reports all it finds).
    #[error("{}", list(.0))]
    Many(Vec<ConfigError>),
}

fn list(problems: &[ConfigError]) -> String {
    let lines: Vec<String> = problems.iter().map(ToString::to_string).collect();
    lines.join("; ")
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// A `[subscribers.<name>]` name is also a key of `THORN_SUBSCRIBERS__<NAME>__…`
/// variables, which are read in lower case.
fn check_subscriber_name(name: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-';
    if name.is_empty() || name.len() > MAX_SUBSCRIBER_NAME {
        Err(format!(
            "a name must have 1 to {MAX_SUBSCRIBER_NAME} characters"
        ))
    } else if !name.chars().all(allowed) || name.contains("__") {
        Err("a name may hold only a-z, 0-9, _ and -, and no double _".into())
    } else if name.starts_with(['_', '-']) || name.ends_with(['_', '-']) {
        Err("a name must start and end with a letter or a digit".into())
    } else {
        Ok(())
    }
}

/// A connection string whose password never reaches a log.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(pub String);

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                write!(f, "{u}")
            }
            Ok(u) => write!(f, "{u}"),
            Err(_) if self.0.contains("password") => f.write_str("(key=value string, redacted)"),
            Err(_) => f.write_str(&self.0),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub format: LogFormat,
    /// A tracing filter; `RUST_LOG` overrides it.
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Dispatch {
    /// Events claimed per dispatch transaction.
    pub batch_size: u32,
    /// Safety poll while asleep: the longest a missed wake-up can delay work.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// After the outbox runs dry, keep polling this long before sleeping on
    /// NOTIFY, so a steady stream of events does not make writers notify.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Delivery {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Delays before the retries that follow the immediate first attempt.
    #[serde(deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// Requests in flight, over all subscribers.
    pub concurrency: usize,
    /// Requests in flight to one subscriber.
    pub per_subscriber_concurrency: usize,
    /// Deliveries claimed per query.
    pub batch_size: u32,
    /// How long a claimed delivery stays invisible to other daemons; if the
    /// claimer dies, the delivery is sent again after this. Unset: the
    /// larger of 30 s and four times `timeout` (see [`Delivery::lease`]).
    #[serde(with = "humantime_serde::option", rename = "lease")]
    pub lease_setting: Option<Duration>,
    /// Largest `Retry-After` honoured.
    #[serde(with = "humantime_serde")]
    pub max_retry_after: Duration,
    /// Bytes of a response body kept for operators.
    pub max_response_bytes: usize,
    /// Time in-flight requests get to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// A subscriber failing this long without a single success is
    /// deactivated.
    #[serde(with = "humantime_serde")]
    pub disable_after: Duration,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Networks deliveries may reach although they are not global.
    allow_networks: Vec<String>,
    pub https_only: bool,
    /// Ports deliveries may use; empty means any.
    pub allowed_ports: Vec<u16>,
    /// PEM files of certificate authorities trusted in addition to the
    /// built-in (webpki) roots, e.g. a company CA.
    pub extra_ca_files: Vec<std::path::PathBuf>,
    #[serde(skip)]
    pub allowed: Vec<IpNet>,
    /// The certificates of `extra_ca_files`, read and parsed by validation.
    #[serde(skip)]
    pub extra_roots: Vec<reqwest::Certificate>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    #[serde(with = "humantime_serde")]
    pub delivered: Duration,
    #[serde(with = "humantime_serde")]
    pub dead: Duration,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub listen: Option<SocketAddr>,
}

/// A config value that never reaches a log (JWT and HMAC secrets).
#[derive(Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// `[api]`: the subscriptions REST API (off unless `listen` is set).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Api {
    pub listen: Option<SocketAddr>,
    /// HS256 key for bearer tokens.
    pub jwt_secret: Option<Redacted>,
    /// PEM file with an RSA (RS256) or EC P-256 (ES256) public key.
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// When set, tokens must carry this `iss`.
    pub jwt_issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub jwt_audience: Option<String>,
    /// Refuse tokens without `exp` (an `exp` present is always checked).
    pub jwt_require_exp: bool,
    /// A token whose claim of this name is `true` sees every subscription.
    pub admin_claim: String,
    /// Base of the `subscription` links, e.g. "https://hooks.example.com"
    /// behind a proxy; default: http:// and the request's Host.
    pub public_url: Option<String>,
}

impl Default for Api {
    fn default() -> Self {
        Api {
            listen: None,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_require_exp: false,
            admin_claim: "admin".into(),
            public_url: None,
        }
    }
}

/// `[subscribers.<name>]`: a subscriber kept in the config (Thorn's
/// THORN_SUBSCRIBERS). `thorn run` writes these into thorn.subscriber at
/// start and on reload (sql/0015_config_subscribers.sql); the database
/// validates them like any other row. Absent values take the column
/// defaults; an absent secret keeps the row's (a random one at first).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSubscriber {
    pub event: String,
    pub url: String,
    pub owner: Option<String>,
    pub hmac_secret: Option<Redacted>,
    pub hmac_digest: Option<String>,
    pub content_type: Option<String>,
    pub hmac_signer: Option<String>,
    pub ordered: Option<bool>,
}

/// The longest name of a `[subscribers.<name>]` table.
const MAX_SUBSCRIBER_NAME: usize = 63;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub database_url: DatabaseUrl,
    pub log: Log,
    pub dispatch: Dispatch,
    pub delivery: Delivery,
    pub security: Security,
    pub retention: Retention,
    pub metrics: Listen,
    pub api: Api,
    /// `None` (no `[subscribers]` in the config): the daemon leaves
    /// config-made subscribers as they are, so a second daemon started
    /// without them removes nothing. `Some` of an empty map removes them all.
    pub subscribers: Option<BTreeMap<String, ConfigSubscriber>>,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

impl Default for Dispatch {
    fn default() -> Self {
        Dispatch {
            batch_size: 500,
            poll_interval: Duration::from_secs(5),
            linger: Duration::from_millis(200),
        }
    }
}

impl Default for Delivery {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        Delivery {
            timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            retry_schedule: vec![
                Duration::from_secs(5),
                minutes(5),
                minutes(30),
                minutes(2 * 60),
                minutes(5 * 60),
                minutes(10 * 60),
                minutes(14 * 60),
                minutes(20 * 60),
                minutes(24 * 60),
            ],
            concurrency: 256,
            per_subscriber_concurrency: 32,
            batch_size: 128,
            lease_setting: None,
            max_retry_after: Duration::from_secs(3600),
            max_response_bytes: 4096,
            shutdown_grace: Duration::from_secs(10),
            disable_after: Duration::from_secs(5 * 86_400),
        }
    }
}

impl Delivery {
    /// The lease of a claimed delivery: as configured, or the larger of
    /// 30 s and four times the request timeout.
    pub fn lease(&self) -> Duration {
        // Saturating: this also runs on a config not yet validated (whose
        // timeout may be absurd), where `*` would panic on overflow.
        self.lease_setting
            .unwrap_or_else(|| self.timeout.saturating_mul(4).max(Duration::from_secs(30)))
    }
}

impl Default for Retention {
    fn default() -> Self {
        let days = |d: u64| Duration::from_secs(d * 86_400);
        Retention {
            delivered: days(7),
            dead: days(30),
            interval: Duration::from_secs(60),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: DatabaseUrl("postgres://postgres@localhost/postgres".into()),
            log: Log::default(),
            dispatch: Dispatch::default(),
            delivery: Delivery::default(),
            security: Security::default(),
            retention: Retention::default(),
            metrics: Listen::default(),
            api: Api::default(),
            subscribers: None,
        }
    }
}

impl Config {
    /// Layers `file_text` (TOML) and the `THORN_*` entries of `env` over the
    /// defaults, then validates.
    pub fn load(
        file_text: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg: Config = Config::layered(file_text, env)?.try_deserialize()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The file and the `THORN_*` variables merged, not yet deserialized
    /// (`ops::check` walks it to find every problem).
    pub(crate) fn layered(
        file_text: Option<&str>,
        env: &HashMap<String, String>,
    ) -> Result<config::Config, config::ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(text) = file_text {
            builder = builder.add_source(config::File::from_str(text, config::FileFormat::Toml));
        }
        // THORN_A__B=v sets a.b. Values stay strings (serde converts them);
        // list keys split on commas, so "443" is a list of one port and an
        // empty value an empty list.
        let mut vars: Vec<(&String, &String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with("THORN_") && !NOT_KEYS.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (name, value) in vars {
            let key = name["THORN_".len()..].to_lowercase().replace("__", ".");
            builder = if LIST_KEYS.contains(&key.as_str()) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect();
                builder.set_override(key, items)?
            } else {
                builder.set_override(key, value.as_str())?
            };
        }
        builder.build()
    }

    /// Fills the derived values and reports every problem found (one
    /// `Invalid`, or `Many`).
    pub(crate) fn validate(&mut self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(problem) = self.validate_api() {
            problems.push(problem);
        }
        let mut bad = |key: &'static str, message: String| problems.push(invalid(key, message));
        if self.database_url.0.trim().is_empty() {
            bad("database_url", "must not be empty".into());
        } else if let Err(message) = check_database_url(&self.database_url.0) {
            bad("database_url", message);
        }
        let networks: Vec<Result<IpNet, String>> = self
            .security
            .allow_networks
            .iter()
            .map(|s| parse_network(s))
            .collect();
        for message in networks.iter().filter_map(|n| n.as_ref().err()) {
            bad("security.allow_networks", message.clone());
        }
        self.security.allowed = networks.into_iter().filter_map(Result::ok).collect();
        self.security.extra_roots = Vec::new();
        for path in &self.security.extra_ca_files {
            match read_ca_file(path) {
                Ok(roots) => self.security.extra_roots.extend(roots),
                Err(message) => bad("security.extra_ca_files", message),
            }
        }
        let d = &self.delivery;
        if d.timeout.is_zero() {
            bad("delivery.timeout", "must be more than 0s".into());
        }
        if d.connect_timeout.is_zero() {
            bad("delivery.connect_timeout", "must be more than 0s".into());
        }
        if d.lease() < d.timeout.saturating_mul(2) {
            bad(
                "delivery.lease",
                format!(
                    "must be at least twice delivery.timeout ({}), or a slow request could be sent twice",
                    humantime::format_duration(d.timeout)
                ),
            );
        }
        if d.concurrency == 0 {
            bad("delivery.concurrency", "must be at least 1".into());
        }
        if d.per_subscriber_concurrency == 0 {
            bad(
                "delivery.per_subscriber_concurrency",
                "must be at least 1".into(),
            );
        }
        if d.batch_size == 0 {
            bad("delivery.batch_size", "must be at least 1".into());
        }
        if self.dispatch.batch_size == 0 {
            bad("dispatch.batch_size", "must be at least 1".into());
        }
        if self.dispatch.poll_interval.is_zero() {
            bad("dispatch.poll_interval", "must be more than 0s".into());
        }
        if self.retention.interval.is_zero() {
            bad("retention.interval", "must be more than 0s".into());
        }
        for (key, value, cap) in self.duration_caps() {
            if value > cap {
                bad(key, too_long(value, cap));
            }
        }
        for (i, delay) in self.delivery.retry_schedule.iter().enumerate() {
            if *delay > TEN_YEARS {
                bad(
                    "delivery.retry_schedule",
                    format!("entry {}: {}", i + 1, too_long(*delay, TEN_YEARS)),
                );
            }
        }
        for name in self.subscribers.iter().flat_map(BTreeMap::keys) {
            if let Err(message) = check_subscriber_name(name) {
                bad("subscribers", format!("{name:?}: {message}"));
            }
        }

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            bad(
                "log.level",
                format!("{:?} is not a tracing filter", self.log.level),
            );
        }
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Many(problems)),
        }
    }
}

/// The cap of the durations that bound a request or a claim.
const HOUR: Duration = Duration::from_secs(3600);
/// The cap of the daemon's own periods (polls, grace, the lease).
const DAY: Duration = Duration::from_secs(86_400);
/// The cap of delays and ages, which end up in PostgreSQL timestamps
/// (`now() + delay`, `now() - age`). humantime's year is 365.25 days, so
/// this prints as "10years".
const TEN_YEARS: Duration = Duration::from_secs(10 * 31_557_600);

fn too_long(value: Duration, cap: Duration) -> String {
    format!(
        "{} is too long: at most {}",
        humantime::format_duration(value),
        humantime::format_duration(cap)
    )
}

impl Config {
    /// Every duration key (but the list `delivery.retry_schedule`) with its
    /// upper bound. humantime accepts up to ~584 billion years, but
    /// PostgreSQL timestamps end in the year 294276, so a "1000000y" delay
    /// or lease makes every query that adds it fail, and `Duration`
    /// products (the default lease, the stall limit) overflow. The caps are
    /// far beyond any real deployment and keep all of that in range.
    fn duration_caps(&self) -> Vec<(&'static str, Duration, Duration)> {
        let (p, d, r) = (&self.dispatch, &self.delivery, &self.retention);
        let mut caps = vec![
            ("dispatch.poll_interval", p.poll_interval, DAY),
            ("dispatch.linger", p.linger, DAY),
            ("delivery.timeout", d.timeout, HOUR),
            ("delivery.connect_timeout", d.connect_timeout, HOUR),
            ("delivery.max_retry_after", d.max_retry_after, TEN_YEARS),
            ("delivery.shutdown_grace", d.shutdown_grace, DAY),
            ("delivery.disable_after", d.disable_after, TEN_YEARS),
            ("retention.delivered", r.delivered, TEN_YEARS),
            ("retention.dead", r.dead, TEN_YEARS),
            ("retention.interval", r.interval, DAY),
        ];
        // Only a configured lease: the default follows the (capped) timeout.
        if let Some(lease) = d.lease_setting {
            caps.push(("delivery.lease", lease, DAY));
        }
        caps
    }

    fn validate_api(&self) -> Result<(), ConfigError> {
        let api = &self.api;
        if api.jwt_secret.as_ref().is_some_and(|s| s.0.len() < 16) {
            return Err(invalid("api.jwt_secret", "must be at least 16 characters"));
        }
        if let Some(path) = &api.jwt_public_key_file {
            if let Err(error) = crate::api::auth::public_key(path) {
                return Err(invalid("api.jwt_public_key_file", format!("{error:#}")));
            }
        }
        if let Some(base) = &api.public_url {
            match url::Url::parse(base) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => return Err(invalid("api.public_url", "must be an http(s) URL")),
            }
        }
        Ok(())
    }
}

/// Parses the connection string as the daemon will (`db::parse_url`), so
/// that a bad one is a config error (exit 64) and not a failure of every
/// connection attempt; its TLS files must be readable too. The messages
/// never quote the string (it may hold a password): tokio-postgres's parse
/// errors name an option or a byte offset, not a value.
fn check_database_url(url: &str) -> Result<(), String> {
    let target = crate::db::parse_url(url).map_err(|e| match std::error::Error::source(&e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    })?;
    target.tls.check()?;
    // Options that would fail every connection, to be retried for ever:
    // channel_binding=require binds authentication to the TLS session, and
    // direct TLS has no plain session to fall back to.
    use tokio_postgres::config::{ChannelBinding, SslMode, SslNegotiation};
    let config = &target.config;
    match config.get_ssl_mode() {
        SslMode::Disable if config.get_channel_binding() == ChannelBinding::Require => Err(
            "channel_binding=require needs TLS, which is not used with sslmode=disable \
             nor over a unix socket"
                .into(),
        ),
        SslMode::Prefer if config.get_ssl_negotiation() == SslNegotiation::Direct => {
            Err("sslnegotiation=direct needs sslmode=require or stricter".into())
        }
        _ => Ok(()),
    }
}

/// A list of humantime durations ("5s", "2h").
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            humantime::parse_duration(s.trim())
                .map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}")))
        })
        .collect()
}

/// A CIDR, or a single address standing for its own /32 or /128.
fn parse_network(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/8 or ::1/128"))
}

/// The certificates in a PEM file (at least one), for reqwest.
fn read_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = crate::db::tls::read_certificates(path)?;
    (certs.iter())
        .map(|der| {
            reqwest::Certificate::from_der(der).map_err(|e| format!("{}: {e}", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let cfg = Config::load(None, &HashMap::new()).expect("defaults");
        assert_eq!(cfg.delivery.timeout, Duration::from_secs(3));
        assert_eq!(cfg.delivery.retry_schedule.len(), 9);
        assert!(cfg.security.allowed.is_empty());
    }

    #[test]
    fn an_unusable_public_key_file_is_a_bad_config() {
        let not_a_key = std::env::temp_dir().join(format!("thorn-key-{}", uuid::Uuid::new_v4()));
        std::fs::write(&not_a_key, "x").expect("file");
        for path in [std::path::Path::new("/nonexistent/key.pem"), &not_a_key] {
            let file = format!(
                "[api]\njwt_public_key_file = {:?}",
                path.display().to_string()
            );
            let error = Config::load(Some(&file), &HashMap::new())
                .expect_err("unusable")
                .to_string();
            assert!(error.contains("api.jwt_public_key_file"), "{error}");
            assert!(error.contains(&path.display().to_string()), "{error}");
        }
        let _ = std::fs::remove_file(&not_a_key);
    }

    #[test]
    fn file_then_environment() {
        let file = r#"
            database_url = "postgres://a@b/c"
            [delivery]
            timeout = "1s"
            retry_schedule = ["1s", "2s"]
            [security]
            allow_networks = ["127.0.0.0/8", "::1"]
        "#;
        let cfg = Config::load(
            Some(file),
            &env(&[
                ("THORN_DATABASE_URL", "postgres://x@y/z"),
                ("THORN_DELIVERY__TIMEOUT", "250ms"),
                ("THORN_CONFIG", "/ignored"),
                ("OTHER", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.database_url.0, "postgres://x@y/z");
        assert_eq!(cfg.delivery.timeout, Duration::from_millis(250));
        assert_eq!(
            cfg.delivery.retry_schedule,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(cfg.security.allowed.len(), 2);
    }

    #[test]
    fn single_and_empty_lists_from_the_environment() {
        let cfg = Config::load(
            None,
            &env(&[
                ("THORN_SECURITY__ALLOWED_PORTS", "443"),
                ("THORN_DELIVERY__RETRY_SCHEDULE", ""),
                ("THORN_DELIVERY__CONCURRENCY", "8"),
                ("THORN_SECURITY__HTTPS_ONLY", "true"),
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.security.allowed_ports, vec![443]);
        assert!(cfg.delivery.retry_schedule.is_empty());
        assert_eq!(cfg.delivery.concurrency, 8);
        assert!(cfg.security.https_only);
    }

    #[test]
    fn lists_from_the_environment() {
        let cfg = Config::load(
            None,
            &env(&[
                ("THORN_SECURITY__ALLOW_NETWORKS", "10.0.0.0/8,127.0.0.1"),
                ("THORN_DELIVERY__RETRY_SCHEDULE", "1s,1m"),
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.security.allowed.len(), 2);
        assert_eq!(cfg.delivery.retry_schedule[1], Duration::from_secs(60));
    }

    #[test]
    fn problems_name_their_key() {
        let bad = |text: &str| {
            Config::load(Some(text), &HashMap::new())
                .expect_err("invalid")
                .to_string()
        };
        assert!(bad("[security]\nallow_networks = [\"nope\"]").contains("security.allow_networks"));
        assert!(bad("[delivery]\ntimeout = \"soon\"").contains("timeout"));
        assert!(bad("[delivery]\ntimeout = \"20s\"\nlease = \"30s\"").contains("delivery.lease"));
        let slow =
            Config::load(Some("[delivery]\ntimeout = \"20s\""), &HashMap::new()).expect("valid");
        assert_eq!(slow.delivery.lease(), Duration::from_secs(80));
        assert!(bad("unknown_key = 1").contains("unknown_key"));
        assert!(bad("[delivery]\ntimeuot = \"1s\"").contains("timeuot"));
    }

    #[test]
    fn extra_ca_files_must_hold_certificates() {
        let bad = |text: &str| {
            Config::load(Some(text), &HashMap::new())
                .expect_err("invalid")
                .to_string()
        };
        let missing = bad("[security]\nextra_ca_files = [\"/nonexistent/ca.pem\"]");
        assert!(missing.contains("security.extra_ca_files"), "{missing}");
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        let dir = std::env::temp_dir().join(format!("thorn-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        let message = bad(&format!(
            "[security]\nextra_ca_files = [{:?}]",
            empty.display().to_string()
        ));
        assert!(message.contains("security.extra_ca_files"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn api_key_is_optional_and_hidden() {
        // Without a key the API listens and refuses every request
        // (api::auth); the daemon must not stop delivering over it.
        Config::load(Some("[api]\nlisten = \"127.0.0.1:8080\""), &HashMap::new())
            .expect("DESIGN's example config");
        let err = Config::load(Some("[api]\njwt_secret = \"short\""), &HashMap::new())
            .expect_err("a short secret");
        assert!(err.to_string().contains("api.jwt_secret"), "{err}");
        let cfg = Config::load(
            Some("[api]\nlisten = \"127.0.0.1:8080\"\njwt_secret = \"0123456789abcdef-secret\""),
            &HashMap::new(),
        )
        .expect("valid");
        assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
        assert_eq!(cfg.api.admin_claim, "admin");
    }

    fn problem(pairs: &[(&str, &str)]) -> String {
        Config::load(None, &env(pairs))
            .expect_err("invalid")
            .to_string()
    }

    #[test]
    fn absurd_durations_are_refused_not_overflowed() {
        // Each parsed and then refused by PostgreSQL or panicked (exit 101).
        for (var, key) in [
            ("THORN_DELIVERY__LEASE", "delivery.lease"),
            ("THORN_DELIVERY__RETRY_SCHEDULE", "delivery.retry_schedule"),
            ("THORN_DELIVERY__DISABLE_AFTER", "delivery.disable_after"),
            (
                "THORN_DELIVERY__MAX_RETRY_AFTER",
                "delivery.max_retry_after",
            ),
            ("THORN_DELIVERY__SHUTDOWN_GRACE", "delivery.shutdown_grace"),
            (
                "THORN_DELIVERY__CONNECT_TIMEOUT",
                "delivery.connect_timeout",
            ),
            ("THORN_DISPATCH__POLL_INTERVAL", "dispatch.poll_interval"),
            ("THORN_DISPATCH__LINGER", "dispatch.linger"),
            ("THORN_RETENTION__DELIVERED", "retention.delivered"),
            ("THORN_RETENTION__DEAD", "retention.dead"),
            ("THORN_RETENTION__INTERVAL", "retention.interval"),
        ] {
            let message = problem(&[(var, "1000000y")]);
            assert!(message.starts_with(key), "{var}: {message}");
            assert!(message.contains("too long"), "{var}: {message}");
        }
        // Overflowed `timeout * 4` in `lease()` before validation.
        let message = problem(&[("THORN_DELIVERY__TIMEOUT", "200000000000y")]);
        assert!(message.starts_with("delivery.timeout: "), "{message}");
        assert!(message.contains("at most 1h"), "{message}");
        let message = problem(&[("THORN_DELIVERY__RETRY_SCHEDULE", "5s,11years")]);
        assert!(message.contains("entry 2"), "{message}");
    }

    #[test]
    fn durations_at_their_caps_are_valid() {
        let cfg = Config::load(
            None,
            &env(&[
                ("THORN_DELIVERY__TIMEOUT", "1h"),
                ("THORN_DELIVERY__LEASE", "1day"),
                ("THORN_DELIVERY__RETRY_SCHEDULE", "5s,10years"),
                ("THORN_DELIVERY__DISABLE_AFTER", "10years"),
                ("THORN_RETENTION__DEAD", "10years"),
                ("THORN_DISPATCH__POLL_INTERVAL", "1day"),
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.delivery.lease(), DAY);
        // The default lease follows the largest timeout without a cap error.
        let cfg = Config::load(None, &env(&[("THORN_DELIVERY__TIMEOUT", "1h")])).expect("valid");
        assert_eq!(cfg.delivery.lease(), 4 * HOUR);
    }

    #[test]
    fn database_url_must_parse_and_its_tls_options_fit() {
        for (url, says) in [
            ("postgres://u:hunter2@[bad/db", "invalid"),
            ("postgres://u:hunter2@h:99999/db", "port"),
            (
                "postgres://u:hunter2@h/db?sslmode=verify-full",
                "needs sslrootcert",
            ),
            (
                "host=h password=hunter2 sslmode=verify-ca",
                "needs sslrootcert",
            ),
            ("postgres://u:hunter2@h/db?sslmode=strict", "not one of"),
            (
                "postgres://u:hunter2@h/db?sslmode=verify-ca&sslrootcert=/no/such.pem",
                "/no/such.pem",
            ),
            ("postgres://u:hunter2@h/db?sslcert=/c.pem", "needs sslkey"),
            (
                "postgres://u:hunter2@h/db?sslrootcert=system&sslmode=require",
                "verify-full",
            ),
            (
                "postgres://u:hunter2@h/db?channel_binding=require&sslmode=disable",
                "needs TLS",
            ),
            (
                "host=/run/postgresql channel_binding=require",
                "unix socket",
            ),
            (
                "postgres://u:hunter2@h/db?sslnegotiation=direct",
                "sslnegotiation=direct",
            ),
            (
                "postgres://u:hun?ter2@h/db?sslmode=verify-ca",
                "needs sslrootcert",
            ),
            (
                "host=h sslmode=verify-full password=hunter2\\",
                "needs sslrootcert",
            ),
            ("postgres://u:hunter2@h/db?sslmode", "not one of"),
        ] {
            let message = problem(&[("THORN_DATABASE_URL", url)]);
            assert!(message.starts_with("database_url: "), "{url}: {message}");
            assert!(message.contains(says), "{url}: {message}");
            assert!(!message.contains("hunter2"), "{url}: {message}");
        }
        for url in [
            "postgres://u:pw@db.internal:5433/app?sslmode=disable",
            "postgres://u:pw@db.internal/app?sslmode=prefer",
            "postgres://u:pw@db.internal/app?sslmode=require&channel_binding=require",
            "postgres://u:pw@db.internal/app?sslrootcert=system",
            "postgres://u:pw@db.internal/app?sslmode=disable&sslcert=/no/such.pem",
            "postgres://u:pw@db.internal/app?sslrootcert=&sslmode=require",
            "host=/run/postgresql sslmode=verify-full sslrootcert=/no/such.pem",
            "host=db.internal sslmode='verify-full' sslrootcert=system",
            "postgresql://thorn@%2Frun%2Fpostgresql/app",
            "host=/run/postgresql dbname=app",
        ] {
            let cfg = Config::load(None, &env(&[("THORN_DATABASE_URL", url)]));
            assert!(cfg.is_ok(), "{url}: {:?}", cfg.err());
        }
    }

    #[test]
    fn subscribers_from_the_file_and_the_environment() {
        let file = r#"
            [subscribers.audit]
            event = "article.*"
            url = "https://audit.example.com/hook"
            hmac_digest = "sha512"
            [subscribers.crm-sync]
            event = "user.created"
            url = "https://crm.example.com/in"
            owner = "alice"
        "#;
        let cfg = Config::load(
            Some(file),
            &env(&[
                ("THORN_SUBSCRIBERS__AUDIT__HMAC_SECRET", "from-the-env"),
                ("THORN_SUBSCRIBERS__AUDIT__ORDERED", "true"),
            ]),
        )
        .expect("valid");
        let subs = cfg.subscribers.expect("a [subscribers] table");
        assert_eq!(subs.keys().collect::<Vec<_>>(), ["audit", "crm-sync"]);
        let audit = &subs["audit"];
        assert_eq!(audit.hmac_secret, Some(Redacted("from-the-env".into())));
        assert_eq!(audit.ordered, Some(true));
        assert_eq!(audit.hmac_digest.as_deref(), Some("sha512"));
        assert_eq!(subs["crm-sync"].owner.as_deref(), Some("alice"));
        assert!(!format!("{audit:?}").contains("from-the-env"));

        assert!(Config::load(None, &HashMap::new())
            .expect("defaults")
            .subscribers
            .is_none());
        let empty = Config::load(Some("[subscribers]"), &HashMap::new()).expect("empty table");
        assert_eq!(empty.subscribers.map(|s| s.len()), Some(0));
    }

    #[test]
    fn bad_subscriber_tables_are_refused() {
        let load = |text: &str| {
            Config::load(Some(text), &HashMap::new())
                .expect_err("refused")
                .to_string()
        };
        let missing = load("[subscribers.a]\nevent = \"x\"");
        assert!(missing.contains("url"), "{missing}");
        let unknown = load("[subscribers.a]\nevent = \"x\"\nurl = \"http://h/\"\nsecret = \"s\"");
        assert!(unknown.contains("secret"), "{unknown}");
        let name = load("[subscribers.\"a b\"]\nevent = \"x\"\nurl = \"http://h/\"");
        assert!(name.starts_with("subscribers: \"a b\""), "{name}");
        let upper = load("[subscribers.Audit]\nevent = \"x\"\nurl = \"http://h/\"");
        assert!(upper.starts_with("subscribers: \"Audit\""), "{upper}");
        let edge = load("[subscribers.a_]\nevent = \"x\"\nurl = \"http://h/\"");
        assert!(edge.contains("start and end"), "{edge}");
    }

    #[test]
    fn debug_hides_the_password() {
        let url = DatabaseUrl("postgres://u:hunter2@h/db".into());
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
