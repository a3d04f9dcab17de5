//! `kubectl philotes`: a kubectl plugin for Philotes pipelines, working against the current kube
//! context (KUBECONFIG) with the user's own RBAC.
//!
//! Exit codes: 0; 1 when `status` lists a Failed pipeline; 2 on an error.

mod dlq;
mod spec;
mod status;

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use kube::api::{Api, ListParams};
use philotes::crd::{CdcPipeline, SecretKeyRef};

/// Status, dead letters, pause, resume and resync of Philotes CdcPipelines.
#[derive(Parser)]
#[command(name = "kubectl philotes", version, about)]
struct Cli {
    /// Namespace (default: the current context's).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Phase, lag, slot wal_status, buffer depth, dead letters, owner and last error with its fix.
    /// Exits 1 when a listed pipeline is Failed.
    Status {
        /// One pipeline (default: all in the namespace).
        name: Option<String>,
        /// Every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Dead letters of a pipeline, read from its buffer database (resolved from its Secrets).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        /// The Secret the operator was given with --default-buffer-secret (chart value
        /// defaultBufferSecret.name), for pipelines without spec.buffer.connectionSecretRef.
        #[arg(long, global = true, env = "PHILOTES_DEFAULT_BUFFER_SECRET")]
        default_buffer_secret: Option<String>,
        #[arg(
            long,
            global = true,
            default_value = "uri",
            env = "PHILOTES_DEFAULT_BUFFER_SECRET_KEY"
        )]
        default_buffer_secret_key: String,
    },
    /// Pause delivery (spec.state: Paused).
    Pause { name: String },
    /// Resume delivery (spec.state: Running).
    Resume { name: String },
    /// Rebuild the pipeline once, in place (a new spec.resync token).
    Resync {
        name: String,
        /// The token (default: one made from the current time).
        #[arg(long)]
        token: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print dead letters as JSON lines, oldest first.
    List {
        name: String,
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Apply dead letters to the sink again; those that succeed are removed.
    Replay { name: String },
    /// Delete the pipeline's dead letters.
    Purge { name: String },
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration (KUBECONFIG or ~/.kube/config)")?;
    let ns = cli
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    match cli.command {
        Command::Status {
            name,
            all_namespaces,
        } => {
            let api: Api<CdcPipeline> = if all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, &ns)
            };
            let pipelines = match name {
                Some(n) => vec![
                    api.get(&n)
                        .await
                        .with_context(|| format!("cdcpipeline {n} in namespace {ns}"))?,
                ],
                None => {
                    api.list(&ListParams::default())
                        .await
                        .context("listing cdcpipelines")?
                        .items
                }
            };
            if pipelines.is_empty() {
                eprintln!("no cdcpipelines found");
                return Ok(ExitCode::SUCCESS);
            }
            print!("{}", status::table(&pipelines, all_namespaces));
            if status::any_failed(&pipelines) {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Dlq {
            action,
            default_buffer_secret,
            default_buffer_secret_key,
        } => {
            let default_buffer =
                default_buffer_secret
                    .filter(|n| !n.is_empty())
                    .map(|name| SecretKeyRef {
                        name,
                        key: default_buffer_secret_key,
                    });
            let name = match &action {
                DlqAction::List { name, .. }
                | DlqAction::Replay { name }
                | DlqAction::Purge { name } => name.clone(),
            };
            let cfg = dlq::config(&client, &ns, &name, default_buffer.as_ref()).await?;
            match action {
                DlqAction::List { limit, .. } => {
                    for v in philotes::dead_letters::list(&cfg, limit).await? {
                        println!("{v}");
                    }
                }
                DlqAction::Replay { .. } => {
                    let out = philotes::dead_letters::replay(&cfg).await?;
                    println!(
                        "replayed {}, still failing {}",
                        out.replayed, out.still_failing
                    );
                }
                DlqAction::Purge { .. } => {
                    let n = philotes::dead_letters::purge(&cfg).await?;
                    println!("purged {n}");
                }
            }
        }
        Command::Pause { name } => {
            spec::set_state(&client, &ns, &name, "Paused").await?;
        }
        Command::Resume { name } => {
            spec::set_state(&client, &ns, &name, "Running").await?;
        }
        Command::Resync { name, token } => {
            let token = token.unwrap_or_else(|| {
                format!("kubectl-philotes-{}", k8s_openapi::jiff::Timestamp::now())
            });
            spec::resync(&client, &ns, &name, &token).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    philotes::install_crypto_provider();
    match run(Cli::parse()).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
