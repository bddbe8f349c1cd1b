//! The `thorn` command: parse the command line, load the config (exit 64 when
//! it is bad), start logging, run the subcommand. Everything else lives in
//! the library.

use std::collections::HashMap;
use std::io::stdout;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::Level;

use thorn::cli;
use thorn::config::{self, Config};
use thorn::ops::logging::complain;
use thorn::sign::{Digest, Signer};

/// Signed webhooks from PostgreSQL row changes.
#[derive(Parser)]
#[command(name = "thorn", version)]
struct Cli {
    /// Config file [default: /etc/thorn/thorn.toml, when it exists]
    #[arg(long, global = true, env = "THORN_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the thorn schema (idempotent)
    Migrate,
    /// Run the delivery daemon
    Run,
    /// Check the config file and environment, print every problem
    CheckConfig {
        /// Also connect to the database: `warn` reports an unreachable one,
        /// `require` fails (exit 69) on it
        #[arg(long, value_enum, default_value_t = DatabaseCheck::Skip)]
        database: DatabaseCheck,
    },
    /// Show pending work, failures and deactivated subscribers
    Status(cli::status::Args),
    /// Send dead deliveries again (all, one subscriber's, or since a time)
    Retry(cli::retry::Args),
    /// Deliver stored events to a subscriber again
    Replay(cli::replay::Args),
    /// Run a receiver that verifies and prints deliveries
    Receive {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// The subscriber's hmac_secret
        #[arg(long, env = "THORN_RECEIVE_SECRET", hide_env_values = true)]
        secret: String,
        /// The subscriber's hmac_digest
        #[arg(long, default_value = "sha256")]
        digest: Digest,
        /// The subscriber's hmac_signer: sign, or compat (Thorn's old default)
        #[arg(long, default_value = "sign")]
        signer: Signer,
    },
    /// Manage subscribers in the database
    Subscriber(cli::subscriber::Args),
    /// Import subscribers from Thorn's Django table (webhooks_subscriber)
    ImportThorn(cli::import_thorn::Args),
    /// Print the signature headers a body would carry
    Sign(cli::sign::Args),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DatabaseCheck {
    Skip,
    Warn,
    Require,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::CheckConfig { database } = cli.command {
        return check_config(cli.config.as_deref(), database);
    }
    // `sign` and `receive` do without the daemon's config (its defaults
    // serve their logging): a bad one must not stop a signature check.
    let needs_config = !matches!(cli.command, Command::Sign(_) | Command::Receive { .. });
    let config = match load_config(cli.config.as_deref()) {
        Ok(config) => config,
        Err(problems) if needs_config => return bad_config(&problems),
        Err(_) => Config::load(None, &HashMap::new()).expect("the defaults are valid"),
    };
    let rust_log = std::env::var("RUST_LOG").ok();
    let logging = thorn::ops::logging::Logging::init(&config.log, rust_log.as_deref());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            complain(
                Level::ERROR,
                format_args!("cannot start the runtime: {error}"),
            );
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config, logging, cli.config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            complain(Level::ERROR, format_args!("{error:#}"));
            // A command run before `thorn migrate` meets missing tables (a
            // transparent error hands on the DbError, not its wrapper), but
            // Thorn's own tables are not for `thorn migrate` to make.
            let chain = || error.chain();
            let reading_thorns_tables = chain().any(|cause| {
                matches!(
                    cause.downcast_ref(),
                    Some(thorn::cli::import_thorn::ImportError::Read(_))
                )
            });
            let unmigrated = !reading_thorns_tables
                && chain().any(|cause| {
                    let code = match cause.downcast_ref::<tokio_postgres::Error>() {
                        Some(e) => e.code(),
                        None => cause
                            .downcast_ref::<tokio_postgres::error::DbError>()
                            .map(tokio_postgres::error::DbError::code),
                    };
                    code.is_some_and(|code| {
                        [
                            tokio_postgres::error::SqlState::UNDEFINED_TABLE,
                            tokio_postgres::error::SqlState::INVALID_SCHEMA_NAME,
                        ]
                        .contains(code)
                    })
                });
            if unmigrated {
                complain(
                    Level::INFO,
                    "hint: has this database been migrated? run `thorn migrate`",
                );
            }
            // A `[subscribers]` entry the database refuses is a bad config
            // too: exit 64; a schema newer than this binary, 65. Neither
            // goes away by restarting, and systemd does not restart them.
            if chain().any(|cause| cause.is::<thorn::daemon::ConfigRefused>()) {
                ExitCode::from(64)
            } else if chain().any(|cause| {
                matches!(
                    cause.downcast_ref(),
                    Some(thorn::db::migrate::MigrateError::TooNew { .. })
                )
            }) {
                ExitCode::from(SCHEMA_TOO_NEW)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The exit status when the database's schema is newer than this binary
/// (EX_DATAERR): an older thorn after an upgrade elsewhere.
const SCHEMA_TOO_NEW: u8 = 65;

/// Reads the named file (or the default one if present) and the
/// environment; on failure, every problem found.
fn load_config(path: Option<&std::path::Path>) -> Result<Config, Vec<String>> {
    let text = read_config_text(path).map_err(|e| vec![format!("{e:#}")])?;
    thorn::ops::check::check(text.as_deref(), &config_env())
        .map_err(|problems| problems.iter().map(ToString::to_string).collect())
}

/// Prints every problem; exit 64 (EX_USAGE), which systemd does not restart.
fn bad_config(problems: &[impl std::fmt::Display]) -> ExitCode {
    for problem in problems {
        complain(Level::ERROR, format_args!("bad config: {problem}"));
    }
    complain(
        Level::ERROR,
        format_args!("{} problem(s) in the config", problems.len()),
    );
    ExitCode::from(64)
}

/// The environment the config reads: everything but the variables the
/// command line takes its own arguments from (`THORN_CONFIG`,
/// `THORN_SIGN_SECRET`, …), which are not config keys.
fn config_env() -> HashMap<String, String> {
    fn arg_vars(command: &clap::Command, names: &mut Vec<String>) {
        for arg in command.get_arguments() {
            if let Some(name) = arg.get_env() {
                names.push(name.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            arg_vars(sub, names);
        }
    }
    let mut cli_vars = Vec::new();
    arg_vars(&<Cli as clap::CommandFactory>::command(), &mut cli_vars);
    std::env::vars()
        .filter(|(name, _)| !cli_vars.contains(name))
        .collect()
}

/// The named file's text, or the default file's if it exists, or none.
fn read_config_text(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let default = std::path::Path::new(config::DEFAULT_PATH);
    match path {
        Some(p) => Ok(Some(
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )),
        None if default.exists() => Ok(Some(
            std::fs::read_to_string(default)
                .with_context(|| format!("reading {}", default.display()))?,
        )),
        None => Ok(None),
    }
}

/// `thorn check-config`: every problem on standard error, exit 64 if any.
fn check_config(path: Option<&std::path::Path>, database: DatabaseCheck) -> ExitCode {
    let config = match load_config(path) {
        Ok(config) => config,
        Err(problems) => return bad_config(&problems),
    };
    if database != DatabaseCheck::Skip {
        use thorn::ops::check::Reachable;
        let reached = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map(|rt| {
                rt.block_on(thorn::ops::check::database(
                    &config,
                    std::time::Duration::from_secs(10),
                ))
            });
        match reached {
            Ok(Reachable::Yes { subscribers, .. }) if !subscribers.is_empty() => {
                return bad_config(&subscribers);
            }
            Ok(Reachable::Yes { schema, latest, .. }) if schema > latest => {
                complain(
                    Level::ERROR,
                    format_args!("error: the database is at schema version {schema}, newer than this thorn knows ({latest}); upgrade thorn"),
                );
                return ExitCode::from(SCHEMA_TOO_NEW);
            }
            Ok(Reachable::Yes { schema, latest, .. }) if schema == latest => {
                println!("database reachable; schema current (version {schema})");
            }
            Ok(Reachable::Yes { schema, latest, .. }) => println!(
                "database reachable; schema at version {schema} of {latest}: `thorn migrate` (or `thorn run`) upgrades it"
            ),
            Ok(Reachable::No(error)) => {
                let (level, word) = if database == DatabaseCheck::Require {
                    (Level::ERROR, "error")
                } else {
                    (Level::WARN, "warning")
                };
                complain(
                    level,
                    format_args!("{word}: database_url: cannot reach the database: {error}"),
                );
                if database == DatabaseCheck::Require {
                    return ExitCode::from(69);
                }
            }
            Err(error) => {
                complain(Level::ERROR, format_args!("cannot start the runtime: {error}"));
                return ExitCode::FAILURE;
            }
        }
    }
    if let (Some(entries), DatabaseCheck::Skip) = (&config.subscribers, database) {
        let refused = thorn::db::subscribers::config_url_problems(&config);
        for (key, messages) in &refused {
            for message in messages {
                complain(Level::ERROR, format_args!("bad config: {key}: {message}"));
            }
        }
        if !refused.is_empty() {
            complain(
                Level::ERROR,
                format_args!("{} problem(s) in the config", refused.len()),
            );
            return ExitCode::from(64);
        }
        if !entries.is_empty() {
            println!(
                "[subscribers]: {} entries, whose other fields only the database checks (--database warn)",
                entries.len()
            );
        }
    }
    println!("config ok");
    ExitCode::SUCCESS
}

/// A token cancelled by SIGTERM or SIGINT.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

async fn run(
    command: Command,
    config: Config,
    logging: thorn::ops::logging::Logging,
    path: Option<PathBuf>,
) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let mut client = cli::connect(&config).await?;
            let applied = thorn::db::migrate::migrate(&mut client).await?;
            if applied.is_empty() {
                println!(
                    "schema is current (version {})",
                    thorn::db::migrate::latest()
                );
            } else {
                println!("applied migrations {applied:?}");
            }
            Ok(())
        }
        Command::Run => {
            // Each receiver host keeps idle connections: the soft limit on
            // descriptors (1024 by default) would cap how many hosts can be
            // served at once. The hard limit is ours to take.
            match rlimit::increase_nofile_limit(u64::MAX) {
                Ok(limit) => tracing::debug!(limit, "open files limit"),
                Err(error) => tracing::warn!(%error, "cannot raise the open files limit"),
            }
            let reloads = thorn::ops::reload::on_sighup(move || load_config(path.as_deref()))?;
            let ops = thorn::ops::Ops {
                notifier: thorn::ops::Notifier::from_env(),
                metrics_listener: None,
                reloads: Some(reloads),
                logging: Some(logging),
                monitor_interval: None,
            };
            thorn::daemon::run_with(config, shutdown_on_signals()?, ops).await
        }
        Command::Status(args) => cli::status::run(&config, args, &mut stdout()).await,
        Command::Retry(args) => cli::retry::run(&config, args, &mut stdout()).await,
        Command::Replay(args) => cli::replay::run(&config, args, &mut stdout()).await,
        Command::Subscriber(args) => cli::subscriber::run(&config, args, &mut stdout()).await,
        Command::ImportThorn(args) => cli::import_thorn::run(&config, args, &mut stdout()).await,
        Command::Sign(args) => cli::sign::run(args, &mut stdout()),
        Command::CheckConfig { .. } => Ok(()),
        Command::Receive {
            listen,
            secret,
            digest,
            signer,
        } => {
            let receiver = thorn::receive::Receiver {
                secret,
                digest,
                signer,
            };
            thorn::receive::serve(listen, receiver, shutdown_on_signals()?).await
        }
    }
}
