use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use philotes::engine::config::PipelineConfig;
use philotes::{crd, dead_letters, standalone};

/// Philotes: PostgreSQL change-data-capture pipelines on Kubernetes.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipelines of a manifest file (CdcPipeline + Secret documents) without Kubernetes.
    Run {
        #[arg(short = 'f', long = "file")]
        file: String,
        #[arg(long, default_value = "0.0.0.0:8081", env = "PHILOTES_HEALTH_ADDR")]
        health_addr: SocketAddr,
    },
    /// Print the CdcPipeline CustomResourceDefinition as YAML.
    Crd,
    /// Dead letters of a pipeline in a manifest file.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print dead letters as JSON lines.
    List {
        #[arg(short = 'f', long = "file")]
        file: String,
        /// namespace/name (or name) of the pipeline; default: the only one in the file
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Apply dead letters to the sink again; those that succeed are removed.
    Replay {
        #[arg(short = 'f', long = "file")]
        file: String,
        #[arg(long)]
        pipeline: Option<String>,
    },
    /// Delete dead letters.
    Purge {
        #[arg(short = 'f', long = "file")]
        file: String,
        #[arg(long)]
        pipeline: Option<String>,
    },
}

fn pick(file: &str, pipeline: Option<&str>) -> anyhow::Result<PipelineConfig> {
    let all = standalone::load(file)?;
    let found: Vec<PipelineConfig> = all
        .into_iter()
        .map(|(c, _)| c)
        .filter(|c| pipeline.is_none_or(|p| c.name == p || c.name.rsplit('/').next() == Some(p)))
        .collect();
    match found.len() {
        1 => Ok(found.into_iter().next().context("one pipeline")?),
        0 => bail!("no pipeline {} in {file}", pipeline.unwrap_or_default()),
        _ => bail!("{file} holds several pipelines: name one with --pipeline namespace/name"),
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Crd => {
            print!("{}", crd::crd_yaml()?);
        }
        Command::Run { file, health_addr } => {
            let code = standalone::run(&file, health_addr, shutdown_on_signal()).await?;
            return Ok(ExitCode::from(code as u8));
        }
        Command::Dlq { action } => match action {
            DlqAction::List {
                file,
                pipeline,
                limit,
            } => {
                for v in dead_letters::list(&pick(&file, pipeline.as_deref())?, limit).await? {
                    println!("{v}");
                }
            }
            DlqAction::Replay { file, pipeline } => {
                let out = dead_letters::replay(&pick(&file, pipeline.as_deref())?).await?;
                println!(
                    "replayed {}, still failing {}",
                    out.replayed, out.still_failing
                );
            }
            DlqAction::Purge { file, pipeline } => {
                let n = dead_letters::purge(&pick(&file, pipeline.as_deref())?).await?;
                println!("purged {n}");
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,philotes=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
