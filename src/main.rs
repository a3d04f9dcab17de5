use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use philotes::engine::config::PipelineConfig;
use philotes::{crd, dead_letters, operator, standalone};

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
        /// Rebuild each pipeline of the file once, in place (as a new `spec.resync` token would):
        /// a new slot, the tables copied again, the sink tables' rows replaced in one transaction.
        #[arg(long)]
        resync: bool,
    },
    /// Run the Kubernetes operator: reconcile CdcPipeline resources into pipeline workers.
    Operator {
        /// Watch only this namespace (default: all namespaces).
        #[arg(long, env = "PHILOTES_NAMESPACE")]
        namespace: Option<String>,
        #[arg(long, default_value = "0.0.0.0:8081", env = "PHILOTES_HEALTH_ADDR")]
        health_addr: SocketAddr,
        /// Secret (in each pipeline's namespace) holding the buffer database URI for pipelines that name none.
        #[arg(long, env = "PHILOTES_DEFAULT_BUFFER_SECRET")]
        default_buffer_secret: Option<String>,
        #[arg(
            long,
            default_value = "uri",
            env = "PHILOTES_DEFAULT_BUFFER_SECRET_KEY"
        )]
        default_buffer_secret_key: String,
        /// This replica's identity among the operator's replicas (default: the pod name, from the
        /// downward API's POD_NAME, else the host name).
        #[arg(long, env = "PHILOTES_IDENTITY")]
        identity: Option<String>,
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
        Command::Operator {
            namespace,
            health_addr,
            default_buffer_secret,
            default_buffer_secret_key,
            identity,
        } => {
            let identity = identity
                .filter(|i| !i.is_empty())
                .or_else(|| std::env::var("POD_NAME").ok().filter(|i| !i.is_empty()))
                .or_else(|| {
                    std::fs::read_to_string("/proc/sys/kernel/hostname")
                        .ok()
                        .map(|h| h.trim().to_string())
                })
                .unwrap_or_else(|| "philotes".into());
            // The operator's own namespace (downward API), else the one it watches.
            let lease_namespace = std::env::var("POD_NAMESPACE")
                .ok()
                .filter(|n| !n.is_empty())
                .or_else(|| namespace.clone().filter(|n| !n.is_empty()))
                .unwrap_or_else(|| "default".into());
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes configuration (in-cluster or KUBECONFIG)")?;
            let cfg = operator::OperatorConfig {
                namespace: namespace.filter(|n| !n.is_empty()),
                default_buffer: default_buffer_secret.filter(|n| !n.is_empty()).map(|name| {
                    crd::SecretKeyRef {
                        name,
                        key: default_buffer_secret_key,
                    }
                }),
                health_addr: Some(health_addr),
                instance: std::env::var("POD_NAME").ok(),
                identity,
                lease_namespace,
            };
            operator::run(client, cfg, shutdown_on_signal()).await?;
        }
        Command::Crd => {
            print!("{}", crd::crd_yaml()?);
        }
        Command::Run {
            file,
            health_addr,
            resync,
        } => {
            let resync = resync.then(|| format!("run-{}", k8s_openapi::jiff::Timestamp::now()));
            let code = standalone::run(&file, health_addr, resync, shutdown_on_signal()).await?;
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
    // Fail points (tests only: none is set unless the FAILPOINTS variable names it).
    let _failpoints = fail::FailScenario::setup();
    philotes::install_crypto_provider();
    philotes::map_large_allocations();
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
