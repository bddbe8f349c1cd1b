//! thorn-bench: measures what thorn costs the application's writes (W1–W3,
//! with pgbench, beside two common alternatives) and how fast its daemon
//! delivers (E1–E6, the release binary against an in-process receiver),
//! then writes markdown tables and an SVG chart.
//!
//! Run it through `scripts/bench`, which makes sure PostgreSQL answers and
//! builds everything in release mode first.

mod daemon;
mod db;
mod delivery;
mod receiver;
mod report;
mod stats;
mod write_path;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;

#[derive(Parser)]
#[command(name = "thorn-bench")]
struct Cli {
    /// An administrative connection; the benchmark creates and drops its
    /// own databases (thorn_bench_*) on this server.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The thorn binary to run (build it with --release).
    #[arg(long, default_value = "target/release/thorn")]
    thorn: PathBuf,
    /// Where the tables and the chart go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Scratch space: configs, pgbench scripts, daemon logs.
    #[arg(long, default_value = "target/thorn-bench")]
    work: PathBuf,
    /// Every scenario at a tiny scale (a smoke run; timings mean little).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios, e.g. W1,E2 (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Repetitions of each delivery scenario (default 3, quick 1).
    #[arg(long)]
    runs: Option<usize>,
    /// Rounds of the write-path comparison (default 7 of 4 s per variant, quick 1 of 1 s).
    #[arg(long)]
    rounds: Option<usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("thorn-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    // On Ctrl-C or SIGTERM the scenario future is dropped, which kills the
    // daemons it started (kill_on_drop); then the databases go too.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let result = tokio::select! {
        result = run_scenarios(&cli) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated")),
    };
    // Whatever happened, leave none of this run's databases behind.
    if let Err(error) = db::drop_leftovers(&cli.database_url).await {
        eprintln!("thorn-bench: could not drop this run's databases: {error:#}");
    }
    result
}

async fn run_scenarios(cli: &Cli) -> anyhow::Result<()> {
    let began = Instant::now();
    let only =
        |name: &str| cli.only.is_empty() || cli.only.iter().any(|o| o.eq_ignore_ascii_case(name));
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    std::fs::create_dir_all(&cli.work)
        .with_context(|| format!("creating {}", cli.work.display()))?;
    let thorn = std::fs::canonicalize(&cli.thorn)
        .with_context(|| format!("the thorn binary {} (build it first)", cli.thorn.display()))?;
    let work = std::fs::canonicalize(&cli.work)?;

    let mut meta = report::Meta::collect(&cli.database_url, cli.quick).await?;
    meta.command = std::env::args().collect::<Vec<_>>().join(" ");

    let w_scale = if cli.quick {
        write_path::Scale {
            seconds: 1,
            rounds: 1,
            bulk_statements: 2,
            preload: 1000,
        }
    } else {
        // Short slices, many rounds: the variants of one round see the same
        // machine, which matters more than long runs on a noisy one.
        write_path::Scale {
            seconds: 4,
            rounds: 7,
            bulk_statements: 5,
            preload: 10_000,
        }
    };
    let w_scale = write_path::Scale {
        rounds: cli.rounds.unwrap_or(w_scale.rounds),
        ..w_scale
    };
    let scenarios: Vec<write_path::Scenario> = [
        ("W1", write_path::Scenario::W1),
        ("W2", write_path::Scenario::W2),
        ("W3", write_path::Scenario::W3),
    ]
    .into_iter()
    .filter(|(name, _)| only(name))
    .map(|(_, s)| s)
    .collect();
    let write = if scenarios.is_empty() {
        Vec::new()
    } else {
        eprintln!(
            "write path: {} rounds of {} s per variant",
            w_scale.rounds, w_scale.seconds
        );
        write_path::run(&cli.database_url, &thorn, &work, &w_scale, &scenarios).await?
    };

    let e_scale = if cli.quick {
        delivery::Scale {
            runs: 1,
            e1_events: 2_000,
            e2_rate: 500,
            e2_seconds: 1.0,
            e3_events: 3,
            e3_subscribers: 1_000,
            e4_events: 5_000,
            e4_idle_wait: Duration::from_secs(1),
            e5_events: 20,
            e5_backlog: 2_000,
            e6_events: 2_000,
            e6_daemons: vec![1, 2, 4],
        }
    } else {
        delivery::Scale {
            runs: 3,
            e1_events: 100_000,
            e2_rate: 500,
            e2_seconds: 20.0,
            e3_events: 100,
            e3_subscribers: 1_000,
            e4_events: 200_000,
            e4_idle_wait: Duration::from_secs(5),
            e5_events: 1_000,
            e5_backlog: 100_000,
            e6_events: 50_000,
            e6_daemons: vec![1, 2, 4],
        }
    };
    let e_scale = delivery::Scale {
        runs: cli.runs.unwrap_or(e_scale.runs),
        ..e_scale
    };
    let any_e = ["E1", "E2", "E3", "E4", "E5", "E6"].iter().any(|s| only(s));
    let engine = if any_e {
        let (addr, recorder) = receiver::start().await?;
        let env = delivery::Env {
            admin_url: cli.database_url.clone(),
            thorn: thorn.clone(),
            work: work.clone(),
            addr,
            recorder,
        };
        Some(delivery::run_all(&env, &e_scale, &only).await?)
    } else {
        None
    };

    meta.finish(began.elapsed());
    let tables = report::markdown(&meta, &w_scale, &write, &e_scale, engine.as_ref());
    let md = cli.out.join("results.md");
    std::fs::write(&md, &tables).with_context(|| format!("writing {}", md.display()))?;
    let svg = cli.out.join("chart.svg");
    report::chart(&svg, &write, engine.as_ref())?;
    println!("{tables}");
    eprintln!("wrote {} and {}", md.display(), svg.display());
    Ok(())
}
