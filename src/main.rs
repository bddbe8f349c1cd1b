//! The `thorn` command: parse the command line, load the config (exit 64 when
//! it is bad), start logging, run the subcommand. Everything else lives in
//! the library.

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use thorn::config::{self, Config, LogFormat};
use thorn::sign::{self, Digest, Signer};

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
    CheckConfig,
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
    Subscriber(thorn::cli::SubscriberArgs),
    /// Import subscribers from Thorn's Django table (webhooks_subscriber)
    ImportThorn(thorn::cli::ImportThornArgs),
    /// Print the signature headers a body would carry
    Sign {
        #[arg(long, env = "THORN_SIGN_SECRET", hide_env_values = true)]
        secret: String,
        #[arg(long, default_value = "sha256")]
        digest: Digest,
        /// Hook-HMAC scheme: sign, or compat (Thorn's old default)
        #[arg(long, default_value = "sign")]
        signer: Signer,
        /// The delivery id (webhook-id)
        #[arg(long, default_value = "00000000-0000-0000-0000-000000000000")]
        id: String,
        /// Unix seconds (default: now)
        #[arg(long)]
        timestamp: Option<i64>,
        /// File with the body, or - for standard input
        #[arg(default_value = "-")]
        body: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config(cli.config.as_deref()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("thorn: bad config: {error:#}");
            return ExitCode::from(64);
        }
    };
    if let Command::CheckConfig = cli.command {
        println!("config ok");
        return ExitCode::SUCCESS;
    }
    init_tracing(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("thorn: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("thorn: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the named file (or the default one if present) and the environment.
fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let default = std::path::Path::new(config::DEFAULT_PATH);
    let text = match path {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None if default.exists() => Some(
            std::fs::read_to_string(default)
                .with_context(|| format!("reading {}", default.display()))?,
        ),
        None => None,
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    Ok(Config::load(text.as_deref(), &env)?)
}

fn init_tracing(log: &config::Log) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
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

async fn run(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Migrate => {
            let mut client = thorn::db::connect(&config.database_url.0)
                .await
                .context("connecting to the database")?;
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
        Command::Run => thorn::daemon::run(config, shutdown_on_signals()?).await,
        Command::CheckConfig => Ok(()),
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
        Command::Subscriber(args) => {
            thorn::cli::subscriber(&config, args, &mut std::io::stdout().lock()).await
        }
        Command::ImportThorn(args) => {
            thorn::cli::import_thorn(&config, args, &mut std::io::stdout().lock()).await
        }
        Command::Sign {
            secret,
            digest,
            signer,
            id,
            timestamp,
            body,
        } => {
            let mut bytes = Vec::new();
            if body.as_os_str() == "-" {
                std::io::stdin().read_to_end(&mut bytes)?;
            } else {
                bytes =
                    std::fs::read(&body).with_context(|| format!("reading {}", body.display()))?;
            }
            let timestamp = timestamp.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0))
            });
            println!("Hook-HMAC: {}", signer.hook_hmac(digest, &secret, &bytes));
            println!("webhook-id: {id}");
            println!("webhook-timestamp: {timestamp}");
            println!(
                "webhook-signature: {}",
                sign::webhook_signature(&secret, &id, timestamp, &bytes)
            );
            Ok(())
        }
    }
}
