//! `philotes-bench`: throughput, latency, memory and CPU of Philotes against `pg_recvlogical` on the same
//! WAL, on a throwaway PostgreSQL. See README.md, "Performance".
//!
//! Phases, in order:
//! 1. a source cluster with wal_level=logical (the buffer lives in the source database, the default)
//!    and a sink cluster of its own (`--sink-in-source-cluster` puts the sink database in the source
//!    cluster); slots `bench_ref`, `bench_e2e`, `bench_reader` are created, then the workload is
//!    generated, so all three read exactly the same WAL;
//! 2. reference: `pg_recvlogical` (pgoutput, proto 1) to /dev/null with `--endpos` at the end of the
//!    workload's last commit;
//!    native: a subscription (`CREATE SUBSCRIPTION`) in the sink cluster on its own slot
//!    `bench_native`, created disabled before the workload and enabled after it, until the slot's
//!    `confirmed_flush_lsn` passes the workload end;
//! 3. Philotes end to end into a PostgreSQL sink, until the sink has committed the last change (then
//!    count and checksum are compared with the source);
//!    bypass: the same with `spec.buffer.bypass: true` on slot `bench_bypass`, until the slot's
//!    `confirmed_flush_lsn` passes the workload end (the native subscription's criterion);
//! 4. Philotes reader + buffer only (delivery Paused), until `durable_lsn` is past the workload end;
//! 5. latency at a steady rate in small transactions: source commit → sink commit, from commit
//!    timestamps (the clusters are restarted with track_commit_timestamp=on for this phase only);
//! 6. many idle pipelines in one process: RSS and CPU while idle;
//! 7. big-txn: ONE source transaction of 2,000,000 rows end to end, on a slot of its own: peak RSS;
//! 8. wide-rows: rows of one 20 MiB value each (bytea and text) end to end, on a slot of its own:
//!    peak RSS (see memory.rs).
//!
//! The workload of phases 2–4 is generated only when one of them runs.
//!
//! Philotes runs as a child process (this binary, `pipelines -f FILE`, which is `philotes run -f FILE`),
//! so its RSS and CPU are its own.

mod child;
mod cluster;
mod memory;
mod procstat;
mod replicas;
mod scaling;
mod workload;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use child::{Pipelines, Spec};
use cluster::Cluster;
use philotes::engine::pg::lsn_text;
use workload::Workload;

/// Benchmarks Philotes against pg_recvlogical on a throwaway PostgreSQL (wal_level=logical).
#[derive(Parser)]
#[command(about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// Rows inserted by the workload (plus updates of a tenth and deletes of a twentieth of them).
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    json: PathBuf,
    /// Short latency and idle phases (for CI smoke tests).
    #[arg(long)]
    quick: bool,
    /// Rows per second of the latency phase.
    #[arg(long)]
    latency_rate: Option<u64>,
    /// Seconds of the latency phase.
    #[arg(long)]
    latency_secs: Option<u64>,
    /// Pipelines of the idle phase.
    #[arg(long)]
    idle_pipelines: Option<usize>,
    /// Seconds over which idle CPU is measured.
    #[arg(long)]
    idle_secs: Option<u64>,
    /// Phases to skip: reference, native, e2e, bypass, reader, latency, idle, big-txn, wide-rows, and
    /// the scaling phase's dimensions scaling-rows, scaling-pipelines, scaling-widths and its native
    /// subscriptions, scaling-native (comma-separated).
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
    /// Rows of the one transaction of the big-txn phase (default: 2 × --rows, at most 2,000,000;
    /// at most 20,000 under --quick).
    #[arg(long)]
    big_txn_rows: Option<u64>,
    /// Rows of the wide-rows phase (default 40; 4 under --quick).
    #[arg(long)]
    wide_count: Option<u64>,
    /// MiB of the wide value of each row of the wide-rows phase (default 20; 4 under --quick).
    #[arg(long)]
    wide_mib: Option<u64>,
    /// Run the scaling phase (issue #11): pg_recvlogical, the native subscription and Philotes end to
    /// end at each of --scaling-rows, --scaling-pipelines and --scaling-widths (see scaling.rs). Off by
    /// default: at the default sizes it writes about 8M rows more than the rest and takes 20–30 min on
    /// 2 cores. `--skip scaling-rows,scaling-pipelines,scaling-widths` leaves a dimension out.
    #[arg(long)]
    scaling: bool,
    /// Rows of each point of the scaling phase's rows dimension (the mixed workload of --rows);
    /// default 100000,1000000,5000000 (2000,5000 under --quick).
    #[arg(long, value_delimiter = ',')]
    scaling_rows: Option<Vec<u64>>,
    /// Pipelines (on one source, one process, a table each) of each point of the pipelines dimension;
    /// default 1,4,16 (1,3 under --quick).
    #[arg(long, value_delimiter = ',')]
    scaling_pipelines: Option<Vec<usize>>,
    /// Rows of each point of the pipelines dimension, shared among its pipelines; default 1,000,000
    /// (6,000 under --quick).
    #[arg(long)]
    scaling_pipeline_rows: Option<u64>,
    /// Row widths in bytes of the width dimension; default 100,2048,102400 (100,2048,20480 under
    /// --quick).
    #[arg(long, value_delimiter = ',')]
    scaling_widths: Option<Vec<u64>>,
    /// MiB of values per point of the width dimension (rows = this / width, at most 1,000,000);
    /// default 200 (2 under --quick).
    #[arg(long)]
    scaling_width_mib: Option<u64>,
    /// Keep the clusters' directories (logs, Philotes logs) after the run.
    #[arg(long)]
    keep: bool,
    /// Put the sink database in the source's cluster instead of a cluster of its own (then the sink
    /// shares the source's WAL and its flushes).
    #[arg(long)]
    sink_in_source_cluster: bool,
    /// The sink of the end-to-end phase: `postgres` (default) or `iceberg` (a `file://` warehouse in
    /// the source cluster's directory, the SQL catalog in the buffer database, default settings).
    #[arg(long, default_value = "postgres")]
    sink: String,
    /// Skip writing (and recycling) 1 GiB of WAL in each cluster before the workload, so that the
    /// writers pay for creating every WAL segment as on a freshly initialised server.
    #[arg(long)]
    no_wal_warmup: bool,
    /// Command to run the Philotes process under, e.g. "perf record -g -o /tmp/p.data --" (the
    /// measured pid is then the wrapper's child).
    #[arg(long, allow_hyphen_values = true)]
    wrapper: Option<String>,
}

#[derive(Subcommand)]
enum Sub {
    /// Runs the pipelines of a manifest file, as `philotes run -f FILE` does (used internally).
    #[command(hide = true)]
    Pipelines {
        #[arg(short = 'f', long = "file")]
        file: String,
        #[arg(long, default_value = "127.0.0.1:0")]
        health_addr: SocketAddr,
    },
    /// Operator replicas sharing idle pipelines: API requests per minute and each replica's CPU
    /// and RSS, for each pipeline count (see replicas.rs).
    Replicas {
        /// Pipeline counts to measure, one run each.
        #[arg(long, value_delimiter = ',', default_value = "20,60")]
        pipelines: Vec<usize>,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Seconds over which requests and CPU are measured.
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
}

#[derive(Debug, Clone, Serialize)]
struct Throughput {
    name: String,
    changes: u64,
    seconds: f64,
    changes_per_s: f64,
    ratio_to_reference: Option<f64>,
    /// changes/s over the native subscription's.
    ratio_to_native: Option<f64>,
    /// CPU seconds of the measured client process (Philotes, pg_recvlogical, or the native
    /// subscription's apply worker).
    client_cpu_s: f64,
    client_cpu_s_per_million: f64,
    client_peak_rss_mb: f64,
    /// Context switches of the client process's threads.
    client_context_switches: u64,
    /// CPU seconds of the whole PostgreSQL cluster meanwhile (walsender, COPY/sink backends, ...).
    postgres_cpu_s: f64,
    /// CPU seconds the rest of the machine used meanwhile (busy CPU time of the machine minus the
    /// client's and PostgreSQL's): other processes competing for the same cores, this benchmark's
    /// own polling included.
    other_cpu_s: f64,
    /// CPU seconds of the measured client's PostgreSQL sessions, by application_name (walsender,
    /// buffer writer, buffer reader, sink), sampled at the end of the measurement.
    postgres_cpu_by_session: Vec<(String, f64)>,
    note: String,
}

#[derive(Debug, Clone, Serialize)]
struct Latency {
    target_rows_per_s: u64,
    achieved_rows_per_s: f64,
    seconds: f64,
    rows: u64,
    transactions: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p99 from Philotes' own `philotes_delivery_latency_seconds` histogram (bucket upper bound).
    metric_p99_le_ms: Option<f64>,
    philotes_cpu_s: f64,
    philotes_cpu_percent: f64,
    philotes_peak_rss_mb: f64,
    /// CPU seconds of both PostgreSQL clusters meanwhile (this includes autovacuum of the tables
    /// the earlier phases filled).
    postgres_cpu_s: f64,
    /// CPU seconds other processes used meanwhile (see `Throughput::other_cpu_s`).
    other_cpu_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Idle {
    pipelines: usize,
    seconds: f64,
    philotes_rss_mb: f64,
    philotes_peak_rss_mb: f64,
    philotes_cpu_s: f64,
    postgres_cpu_s: f64,
    postgres_connections: i64,
    /// CPU seconds other processes used meanwhile (see `Throughput::other_cpu_s`).
    other_cpu_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Machine {
    cpus: usize,
    cpu_model: String,
    memory_gb: f64,
    postgres: String,
}

#[derive(Debug, Clone, Serialize)]
struct Target {
    what: String,
    target: String,
    measured: String,
    met: bool,
}

#[derive(Debug, Clone, Serialize)]
struct Setup {
    /// "own cluster" or "source cluster".
    sink: String,
    /// Extra spec lines of the end-to-end pipeline (PHILOTES_BENCH_E2E_SPEC), empty for the defaults.
    e2e_spec: String,
    /// Whether each cluster wrote and recycled 1 GiB of WAL before the workload.
    wal_warmup: bool,
    postgres_settings: String,
}

#[derive(Debug, Clone, Serialize)]
struct Results {
    command: String,
    machine: Machine,
    setup: Setup,
    workload: Option<Workload>,
    throughput: Vec<Throughput>,
    latency: Option<Latency>,
    idle: Option<Idle>,
    /// The big-txn and wide-rows phases.
    memory: Vec<memory::MemoryPhase>,
    /// The scaling phase's points (empty without --scaling).
    scaling: Vec<scaling::Point>,
    targets: Vec<Target>,
}

/// A mebibyte (the `_mb` fields of the results are MiB).
const MB: f64 = 1024.0 * 1024.0;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Sub::Pipelines { file, health_addr }) = &cli.command {
        philotes::map_large_allocations();
        return run_pipelines(file, *health_addr).await;
    }
    if let Some(Sub::Replicas {
        pipelines,
        replicas,
        secs,
    }) = &cli.command
    {
        philotes::install_crypto_provider();
        return match replicas::run(pipelines, *replicas, *secs).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("philotes-bench replicas: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    match bench(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("philotes-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `philotes run -f FILE`, as src/main.rs does it.
async fn run_pipelines(file: &str, health_addr: SocketAddr) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,philotes=info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            return;
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        t.cancel();
    });
    match philotes::standalone::run(file, health_addr, None, token).await {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_default();
    let mem_kb: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0.0);
    let postgres = cluster::bindir()
        .ok()
        .and_then(|b| {
            std::process::Command::new(b.join("postgres"))
                .arg("--version")
                .output()
                .ok()
        })
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Machine {
        cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        memory_gb: (mem_kb / 1024.0 / 1024.0 * 10.0).round() / 10.0,
        postgres,
    }
}

struct Ctx {
    /// The source cluster (wal_level=logical; the buffer lives in the source database).
    cl: Cluster,
    /// The sink's cluster, when it has one of its own.
    sink_cl: Option<Cluster>,
    wrapper: Vec<String>,
}

impl Ctx {
    fn sink_cluster(&self) -> &Cluster {
        self.sink_cl.as_ref().unwrap_or(&self.cl)
    }

    fn clusters(&self) -> Vec<&Cluster> {
        std::iter::once(&self.cl).chain(&self.sink_cl).collect()
    }

    /// CPU seconds of every PostgreSQL process so far (source and sink clusters).
    fn pg_cpu(&self) -> f64 {
        self.clusters()
            .iter()
            .filter_map(|c| c.postmaster_pid())
            .map(procstat::cluster_cpu)
            .sum()
    }

    fn spawn(&self, label: &str, specs: &[Spec]) -> anyhow::Result<Pipelines> {
        let m = child::manifest(
            &self.cl.uri("source"),
            &self.sink_cluster().uri("sink"),
            specs,
        );
        Pipelines::spawn(self.cl.dir(), label, &m, &self.wrapper)
    }
}

/// Every phase, as `--skip` names them.
const PHASES: [&str; 13] = [
    "reference",
    "native",
    "e2e",
    "bypass",
    "reader",
    "latency",
    "idle",
    "big-txn",
    "wide-rows",
    "scaling-rows",
    "scaling-pipelines",
    "scaling-widths",
    "scaling-native",
];

async fn bench(cli: &Cli) -> anyhow::Result<()> {
    if let Some(s) = cli.skip.iter().find(|s| !PHASES.contains(&s.as_str())) {
        bail!("--skip {s}: no such phase (phases: {})", PHASES.join(", "));
    }
    let skip = |p: &str| cli.skip.iter().any(|s| s == p);
    let latency_rate = cli
        .latency_rate
        .unwrap_or(if cli.quick { 1000 } else { 5000 });
    let latency_secs = cli.latency_secs.unwrap_or(if cli.quick { 3 } else { 20 });
    let idle_pipelines = cli.idle_pipelines.unwrap_or(if cli.quick { 3 } else { 50 });
    let idle_secs = cli.idle_secs.unwrap_or(if cli.quick { 3 } else { 30 });
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = machine();
    eprintln!(
        "philotes-bench: {} rows; {} × {}, {}",
        cli.rows, machine.cpus, machine.cpu_model, machine.postgres
    );

    let cl = Cluster::start("source", true, cli.keep)?;
    let sink_cl = if cli.sink_in_source_cluster {
        None
    } else {
        Some(Cluster::start("sink", false, cli.keep)?)
    };
    if cli.keep {
        eprintln!("  source cluster directory: {}", cl.dir().display());
        if let Some(s) = &sink_cl {
            eprintln!("  sink cluster directory: {}", s.dir().display());
        }
    }
    let ctx = Ctx {
        cl,
        sink_cl,
        wrapper: cli
            .wrapper
            .as_deref()
            .map(|w| w.split_whitespace().map(String::from).collect())
            .unwrap_or_default(),
    };
    let admin = ctx.cl.client("postgres").await?;
    admin.batch_execute("CREATE DATABASE source").await?;
    ctx.sink_cluster()
        .client("postgres")
        .await?
        .batch_execute("CREATE DATABASE sink")
        .await?;
    let src = ctx.cl.client("source").await?;
    let sink = ctx.sink_cluster().client("sink").await?;

    if !cli.no_wal_warmup {
        // A running server recycles old WAL segments; a fresh cluster has none and zero-fills every
        // new one (wal_init_zero), which only the writers (Philotes' buffer and sink) would pay for.
        for (c, db) in [(&ctx.cl, "source"), (ctx.sink_cluster(), "sink")] {
            warm_wal(&c.client(db).await?, if cli.quick { 64 } else { 1024 }).await?;
        }
    }

    let mut throughput = Vec::new();
    let mut workload = None;
    if !(skip("reference") && skip("native") && skip("e2e") && skip("bypass") && skip("reader")) {
        let l = main_workload(&ctx, &src, cli.rows, !skip("native")).await?;
        workload = Some(l.total);
        let mut reference_rate = None;
        if !skip("reference") {
            let t = reference(&ctx, &src, &l).await?;
            reference_rate = Some(t.changes_per_s);
            throughput.push(t);
        }
        let mut native_rate = None;
        if !skip("native") {
            let mut t = native(&ctx, &src, &l).await?;
            t.ratio_to_reference = reference_rate.map(|r| t.changes_per_s / r);
            t.ratio_to_native = Some(1.0);
            native_rate = Some(t.changes_per_s);
            throughput.push(t);
            native_drop(&ctx, &l).await?;
        }
        let ratios = |t: &mut Throughput| {
            t.ratio_to_reference = reference_rate.map(|r| t.changes_per_s / r);
            t.ratio_to_native = native_rate.map(|r| t.changes_per_s / r);
        };
        if !skip("e2e") {
            let kind = if cli.sink == "iceberg" {
                EndToEnd::Iceberg
            } else {
                EndToEnd::Postgres
            };
            let mut t = end_to_end(&ctx, &src, &sink, &l, kind).await?;
            ratios(&mut t);
            throughput.push(t);
        }
        drop_slot(&src, "bench_e2e").await?;
        if !skip("bypass") && cli.sink != "iceberg" {
            let mut t = end_to_end(&ctx, &src, &sink, &l, EndToEnd::Bypass).await?;
            ratios(&mut t);
            throughput.push(t);
        }
        drop_slot(&src, "bench_bypass").await?;
        if !skip("reader") {
            let mut t = reader_only(&ctx, &src, &l.total).await?;
            ratios(&mut t);
            throughput.push(t);
        }
        drop_slot(&src, "bench_reader").await?;
        drop_slot(&src, "bench_ref").await?;
    }
    // A failed scaling point ends the run, after the points measured so far are printed and written.
    let mut scaling = Vec::new();
    let mut failed = None;
    if cli.scaling {
        let q = cli.quick;
        let plan = scaling::Plan {
            rows: cli.scaling_rows.clone().unwrap_or_else(|| {
                if q {
                    vec![2000, 5000]
                } else {
                    vec![100_000, 1_000_000, 5_000_000]
                }
            }),
            pipelines: cli
                .scaling_pipelines
                .clone()
                .unwrap_or_else(|| if q { vec![1, 3] } else { vec![1, 4, 16] }),
            pipeline_rows: cli
                .scaling_pipeline_rows
                .unwrap_or(if q { 6000 } else { 1_000_000 }),
            widths: cli.scaling_widths.clone().unwrap_or_else(|| {
                if q {
                    vec![100, 2048, 20480]
                } else {
                    vec![100, 2048, 102_400]
                }
            }),
            width_bytes: cli.scaling_width_mib.unwrap_or(if q { 2 } else { 200 }) * 1024 * 1024,
            width_rows_max: 1_000_000,
            native: !skip("scaling-native"),
        };
        failed = scaling::run(&ctx, &plan, &skip, &mut scaling).await.err();
    }
    let later = |p: &str| failed.is_some() || skip(p);
    drop(src);
    drop(sink);
    drop(admin);

    let latency = if later("latency") {
        None
    } else {
        Some(latency_phase(&ctx, latency_rate, latency_secs).await?)
    };
    let idle = if later("idle") {
        None
    } else {
        Some(idle_phase(&ctx, idle_pipelines, idle_secs).await?)
    };
    let mut memory = Vec::new();
    if !later("big-txn") {
        let rows = cli
            .big_txn_rows
            .unwrap_or_else(|| memory::big_txn_rows(cli.rows, cli.quick));
        memory.push(memory::big_txn(&ctx, rows).await?);
    }
    if !later("wide-rows") {
        let count = cli.wide_count.unwrap_or(if cli.quick { 4 } else { 40 });
        let mib = cli.wide_mib.unwrap_or(if cli.quick { 4 } else { 20 });
        memory.push(memory::wide_rows(&ctx, count, mib).await?);
    }

    let targets = targets(&throughput, latency.as_ref(), &memory);
    let results = Results {
        command,
        machine,
        setup: Setup {
            sink: if cli.sink_in_source_cluster {
                "source cluster".into()
            } else {
                "own cluster".into()
            },
            e2e_spec: std::env::var("PHILOTES_BENCH_E2E_SPEC").unwrap_or_default(),
            wal_warmup: !cli.no_wal_warmup,
            postgres_settings: "defaults, plus listen_addresses, port, max_connections = 500, max_worker_processes = 40, max_logical_replication_workers = 32, max_replication_slots = 100; source: wal_level = logical, max_wal_senders = 100; latency phase: track_commit_timestamp = on".into(),
        },
        workload,
        throughput,
        latency,
        idle,
        memory,
        scaling,
        targets,
    };
    print_table(&results);
    std::fs::write(&cli.json, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", cli.json.display()))?;
    eprintln!("results written to {}", cli.json.display());
    match failed {
        Some(e) => Err(e.context("scaling phase (the points before it are printed and written)")),
        None => Ok(()),
    }
}

/// The shape of a feed's table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
enum Shape {
    /// The benchmark row ([`workload::ROW`]), filled by the mixed workload ([`workload::generate`]).
    Items,
    /// A key and one text value of a given width ([`workload::generate_wide`]).
    Wide,
}

impl Shape {
    fn create(self, name: &str) -> String {
        match self {
            Shape::Items => workload::create_table(name),
            Shape::Wide => workload::create_wide_table(name),
        }
    }

    fn columns(self) -> &'static str {
        match self {
            Shape::Items => workload::COLUMNS,
            Shape::Wide => workload::WIDE_COLUMNS,
        }
    }
}

/// What one consumer of a throughput phase reads: a table in `public`, its publication, and the tag
/// that names what is made for it. The main phases have one feed with the tag "" (table `items`,
/// publication `bench_pub`, slot `bench_e2e`, pipeline `e2e`, sink schema `replica`); a scaling point's
/// feed may be tagged `_p4_2` (`items_p4_2`, `bench_pub_p4_2`, `bench_e2e_p4_2`, `e2e-p4-2`,
/// `replica_p4_2`).
#[derive(Debug, Clone)]
struct Feed {
    table: String,
    publication: String,
    tag: String,
    shape: Shape,
}

impl Feed {
    fn new(tag: &str, shape: Shape) -> Feed {
        let base = match shape {
            Shape::Items => "items",
            Shape::Wide => "wide",
        };
        Feed {
            table: format!("{base}{tag}"),
            publication: format!("bench_pub{tag}"),
            tag: tag.to_string(),
            shape,
        }
    }

    /// A slot, subscription or schema name: `prefix` and the tag.
    fn named(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.tag)
    }

    /// A pipeline name or uid (a DNS label: dashes for underscores).
    fn pipeline(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.tag.replace('_', "-"))
    }
}

/// How the feeds' tables are filled, each by a session of its own, all at once.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// The mixed workload of [`workload::generate`], this many rows per table.
    Mixed(u64),
    /// `rows` inserts of rows of about `width` bytes per table ([`workload::generate_wide`]).
    Wide { rows: u64, width: u64 },
}

impl Load {
    fn shape(self) -> Shape {
        match self {
            Load::Mixed(_) => Shape::Items,
            Load::Wide { .. } => Shape::Wide,
        }
    }
}

/// Feeds whose workload is in the WAL: each with what was written to its table, and all of it.
struct Loaded {
    /// Names the Philotes process's files (`e2e{label}.yaml`, `.log`).
    label: String,
    feeds: Vec<(Feed, Workload)>,
    total: Workload,
}

/// The feeds' tables and publications, the slots `{prefix}{tag}` of each feed (and, with `native`, the
/// native subscriptions on slots `bench_native{tag}`), then the workload of every feed at once, each
/// in a session of its own: every consumer reads the same WAL, and several feeds' changes interleave
/// in it as several applications' would.
async fn load_feeds(
    ctx: &Ctx,
    src: &Client,
    label: &str,
    tags: &[String],
    slots: &[&str],
    native: bool,
    load: Load,
) -> anyhow::Result<Loaded> {
    let feeds: Vec<Feed> = tags.iter().map(|t| Feed::new(t, load.shape())).collect();
    for f in &feeds {
        match load {
            Load::Mixed(_) => workload::prepare(src, &f.table).await?,
            Load::Wide { .. } => {
                src.batch_execute(&workload::create_wide_table(&format!("public.{}", f.table)))
                    .await?
            }
        }
        src.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE public.{}",
            f.publication, f.table
        ))
        .await?;
    }
    if native {
        // After the publications: a subscription learns its tables when it is created.
        native_prepare(ctx, &feeds).await?;
    }
    for f in &feeds {
        for prefix in slots.iter().chain(native.then_some(&NATIVE_SLOT)) {
            src.execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&f.named(prefix)],
            )
            .await?;
        }
    }
    let start: i64 = src
        .query_one(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await?
        .get(0);
    let started = Instant::now();
    let quiet = feeds.len() > 1;
    let ws = futures::future::try_join_all(feeds.iter().map(|f| async move {
        let c = ctx.cl.client("source").await?;
        match load {
            Load::Mixed(rows) => workload::generate(&c, &f.table, rows, quiet).await,
            Load::Wide { rows, width } => workload::generate_wide(&c, &f.table, rows, width).await,
        }
    }))
    .await?;
    let sum = |f: fn(&Workload) -> u64| ws.iter().map(f).sum::<u64>();
    let end_lsn = ws.iter().map(|w| w.end_lsn).max().unwrap_or(0);
    let total = Workload {
        inserts: sum(|w| w.inserts),
        updates: sum(|w| w.updates),
        deletes: sum(|w| w.deletes),
        changes: sum(|w| w.changes),
        transactions: sum(|w| w.transactions),
        end_lsn,
        commit_end_lsn: ws.iter().map(|w| w.commit_end_lsn).max().unwrap_or(0),
        wal_bytes: end_lsn.saturating_sub(start as u64),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok(Loaded {
        label: label.to_string(),
        feeds: feeds.into_iter().zip(ws).collect(),
        total,
    })
}

/// The slots of phases 2–4 (`bench_native` too when `native`), then the workload: every consumer
/// reads the same WAL.
async fn main_workload(ctx: &Ctx, src: &Client, rows: u64, native: bool) -> anyhow::Result<Loaded> {
    eprintln!("generating the workload ...");
    let l = load_feeds(
        ctx,
        src,
        "",
        &[String::new()],
        &["bench_ref", "bench_e2e", "bench_bypass", "bench_reader"],
        native,
        Load::Mixed(rows),
    )
    .await?;
    let w = &l.total;
    eprintln!(
        "  {} changes ({} inserts, {} updates, {} deletes) in ~{} transactions, {:.0} MiB of WAL, {:.1}s; end {}",
        w.changes,
        w.inserts,
        w.updates,
        w.deletes,
        w.transactions,
        w.wal_bytes as f64 / MB,
        w.seconds,
        lsn_text(w.end_lsn)
    );
    Ok(l)
}

/// CPU seconds of the live PostgreSQL sessions whose application_name starts with `prefix`, by name.
async fn sessions_cpu(c: &Client, prefix: &str) -> Vec<(String, f64)> {
    let rows = c
        .query(
            "SELECT pid, application_name || ' (' || backend_type || ')' FROM pg_stat_activity WHERE application_name LIKE $1 || '%'",
            &[&prefix],
        )
        .await
        .unwrap_or_default();
    let mut by: Vec<(String, f64)> = Vec::new();
    for r in rows {
        let pid: i32 = r.get(0);
        let name: String = r.get(1);
        let cpu = procstat::stat(pid as u32).map(|s| s.cpu).unwrap_or(0.0);
        if std::env::var_os("PHILOTES_BENCH_PIDS").is_some() {
            eprintln!("  pid {pid}: {name} {cpu:.2}s");
        }
        match by.iter_mut().find(|(n, _)| *n == name) {
            Some(e) => e.1 += cpu,
            None => by.push((name, cpu)),
        }
    }
    by.sort_by(|a, b| b.1.total_cmp(&a.1));
    by
}

/// Writes `mb` MiB of WAL (logical messages, no table) and checkpoints, so that the cluster has
/// recycled WAL segments ready, as a server that has been running has.
async fn warm_wal(c: &Client, mb: i32) -> anyhow::Result<()> {
    c.execute(
        "SELECT count(pg_logical_emit_message(false, 'philotes-bench', repeat('x', 1048576))) FROM generate_series(1, $1)",
        &[&mb],
    )
    .await?;
    c.batch_execute("CHECKPOINT").await?;
    c.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// Drops `slot`. The walsender of a client that just stopped may still hold it for a moment
/// ("replication slot ... is active"): it is ended, and the drop tried again for up to 10 s.
async fn drop_slot(src: &Client, slot: &str) -> anyhow::Result<()> {
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        src.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await?;
        match src
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(_) if Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn checkpoint(src: &Client) -> anyhow::Result<()> {
    src.batch_execute("CHECKPOINT").await?;
    Ok(())
}

/// A checkpoint in every cluster (the phases before wrote WAL in the sink's too).
async fn checkpoint_all(ctx: &Ctx) -> anyhow::Result<()> {
    for c in ctx.clusters() {
        checkpoint(&c.client("postgres").await?).await?;
    }
    Ok(())
}

/// pg_recvlogical draining the workload to /dev/null: one per feed, all at once, each on the feed's
/// slot `bench_ref{tag}` until the end of its feed's last commit.
async fn reference(ctx: &Ctx, src: &Client, l: &Loaded) -> anyhow::Result<Throughput> {
    checkpoint(src).await?;
    let n = l.feeds.len();
    eprintln!(
        "reference: pg_recvlogical{} ...",
        if n > 1 {
            format!(" × {n}")
        } else {
            String::new()
        }
    );
    let pg0 = ctx.pg_cpu();
    let busy0 = procstat::machine_busy();
    let started = Instant::now();
    let mut children = Vec::new();
    for (f, w) in &l.feeds {
        let child = tokio::process::Command::new(ctx.cl.bin("pg_recvlogical"))
            .args([
                "-d",
                &ctx.cl.conninfo("source"),
                "-S",
                &f.named("bench_ref"),
            ])
            .arg("--start")
            .args(["-o", "proto_version=1", "-o"])
            .arg(format!("publication_names={}", f.publication))
            // The end of the last commit, not a position inside the last transaction: a keepalive
            // carrying a position past --endpos stops pg_recvlogical, and one may come while the
            // walsender still replays the last transaction (when that one is large).
            .args([
                "-E",
                &lsn_text(w.commit_end_lsn),
                "-f",
                "/dev/null",
                "--no-loop",
            ])
            .env("PGPASSWORD", cluster::PASSWORD)
            .kill_on_drop(true)
            .spawn()
            .context("starting pg_recvlogical")?;
        children.push(child);
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id().unwrap_or(0)).collect();
    // Per process: CPU, peak RSS and context switches as last seen, and its exit status.
    let (mut cpu, mut rss, mut switches) = (vec![0.0; n], vec![0; n], vec![0; n]);
    let mut statuses = vec![None; n];
    let mut sessions = Vec::new();
    let mut sampled = Instant::now();
    loop {
        for (i, pid) in pids.iter().enumerate() {
            if statuses[i].is_some() {
                continue;
            }
            if let Some(s) = procstat::stat(*pid) {
                cpu[i] = s.cpu;
            }
            rss[i] = procstat::vm_bytes(*pid, "VmHWM").unwrap_or(rss[i]);
            switches[i] = procstat::context_switches(*pid).max(switches[i]);
        }
        if sampled.elapsed() >= Duration::from_millis(200) {
            sampled = Instant::now();
            let now = sessions_cpu(src, "pg_recvlogical").await;
            if !now.is_empty() {
                sessions = now;
            }
        }
        for (i, c) in children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = c.try_wait()?;
            }
        }
        if statuses.iter().all(Option::is_some) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu: f64 = cpu.iter().sum();
    let pg = ctx.pg_cpu() - pg0;
    let other = procstat::machine_busy() - busy0 - pg - cpu;
    if let Some(s) = statuses.iter().flatten().find(|s| !s.success()) {
        bail!("pg_recvlogical failed: {s}");
    }
    let mut confirmed = Vec::new();
    for (f, w) in &l.feeds {
        let c: Option<String> = src
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&f.named("bench_ref")],
            )
            .await?
            .get(0);
        confirmed.push(format!(
            "--endpos {} (slot confirmed {})",
            lsn_text(w.commit_end_lsn),
            c.unwrap_or_default()
        ));
    }
    let changes = l.total.changes;
    let t = Throughput {
        name: "reference: pg_recvlogical → /dev/null".into(),
        changes,
        seconds,
        changes_per_s: changes as f64 / seconds,
        ratio_to_reference: Some(1.0),
        ratio_to_native: None,
        client_cpu_s: cpu,
        client_cpu_s_per_million: cpu / (changes as f64 / 1e6),
        client_peak_rss_mb: rss.iter().copied().max().unwrap_or(0) as f64 / MB,
        client_context_switches: switches.iter().sum(),
        postgres_cpu_s: pg,
        other_cpu_s: other.max(0.0),
        postgres_cpu_by_session: sessions,
        note: if n > 1 {
            format!(
                "{n} at once (client columns: their sum; peak RSS: the largest); {}",
                confirmed.join(", ")
            )
        } else {
            confirmed.join(", ")
        },
    };
    eprintln!("  {:.2}s, {:.0} changes/s", t.seconds, t.changes_per_s);
    Ok(t)
}

/// The native subscriptions' database (in the sink cluster); each feed's subscription and its slot
/// are `bench_native{tag}`.
const NATIVE_DB: &str = "bench_native";
const NATIVE_SLOT: &str = "bench_native";

/// The native subscriptions, disabled, each on a slot of its own (created with the others, before the
/// workload): a database of its own in the sink cluster with the same tables.
async fn native_prepare(ctx: &Ctx, feeds: &[Feed]) -> anyhow::Result<()> {
    let sink = ctx.sink_cluster();
    sink.client("postgres")
        .await?
        .batch_execute(&format!("CREATE DATABASE {NATIVE_DB}"))
        .await?;
    let c = sink.client(NATIVE_DB).await?;
    for f in feeds {
        c.batch_execute(&f.shape.create(&format!("public.{}", f.table)))
            .await?;
        let name = f.named(NATIVE_SLOT);
        c.batch_execute(&format!(
            "CREATE SUBSCRIPTION {name} CONNECTION '{} password={}' PUBLICATION {}
               WITH (create_slot = false, slot_name = '{name}', copy_data = false, enabled = false)",
            ctx.cl.conninfo("source"),
            cluster::PASSWORD,
            f.publication
        ))
        .await?;
    }
    Ok(())
}

/// Drops the native subscriptions (and with them their slots) and their database.
async fn native_drop(ctx: &Ctx, l: &Loaded) -> anyhow::Result<()> {
    let sink = ctx.sink_cluster();
    let c = sink.client(NATIVE_DB).await?;
    for (f, _) in &l.feeds {
        c.batch_execute(&format!("DROP SUBSCRIPTION {}", f.named(NATIVE_SLOT)))
            .await?;
    }
    drop(c);
    sink.client("postgres")
        .await?
        .batch_execute(&format!("DROP DATABASE {NATIVE_DB}"))
        .await?;
    Ok(())
}

/// Positions by name from SQL returning (text, int8) rows, `$1` being `names` (text[]); NULLs left out.
async fn lsns_of(c: &Client, sql: &str, names: &[String]) -> HashMap<String, u64> {
    c.query(sql, &[&names])
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|r| Some((r.get(0), r.get::<_, Option<i64>>(1)? as u64)))
        .collect()
}

/// Whether every feed's position (by its name `prefix{tag}`) is past the end of its workload.
fn all_past(l: &Loaded, prefix: &str, at: &HashMap<String, u64>) -> bool {
    l.feeds
        .iter()
        .all(|(f, w)| at.get(&f.named(prefix)).is_some_and(|p| *p > w.end_lsn))
}

/// The native subscriptions, all enabled at once after the workload, until every slot's
/// `confirmed_flush_lsn` is past the end of its feed (the apply worker reports a position flushed
/// only once the sink's WAL holds its commit). Every table must then match the source.
async fn native(ctx: &Ctx, src: &Client, l: &Loaded) -> anyhow::Result<Throughput> {
    checkpoint_all(ctx).await?;
    let n = l.feeds.len();
    eprintln!(
        "native subscription{} ...",
        if n > 1 {
            format!("s × {n}")
        } else {
            String::new()
        }
    );
    let names: Vec<String> = l.feeds.iter().map(|(f, _)| f.named(NATIVE_SLOT)).collect();
    let sub = ctx.sink_cluster().client(NATIVE_DB).await?;
    let (pg0, busy0) = (ctx.pg_cpu(), procstat::machine_busy());
    let started = Instant::now();
    for name in &names {
        sub.batch_execute(&format!("ALTER SUBSCRIPTION {name} ENABLE"))
            .await?;
    }
    // Per apply worker (by pid): CPU, peak RSS and context switches as last seen.
    let mut workers: HashMap<u32, (f64, u64, u64)> = HashMap::new();
    let mut committed_at = None;
    let mut sessions = Vec::new();
    let mut sampled = Instant::now();
    loop {
        if workers.len() < n {
            for r in sub
                .query(
                    "SELECT pid FROM pg_stat_subscription WHERE subname = ANY($1) AND relid IS NULL AND pid IS NOT NULL",
                    &[&names],
                )
                .await?
            {
                workers.entry(r.get::<_, i32>(0) as u32).or_default();
            }
        }
        for (pid, (cpu, rss, switches)) in workers.iter_mut() {
            *cpu = procstat::stat(*pid).map_or(*cpu, |s| s.cpu);
            *rss = procstat::vm_bytes(*pid, "VmHWM").unwrap_or(*rss);
            *switches = procstat::context_switches(*pid).max(*switches);
        }
        if sampled.elapsed() >= Duration::from_millis(200) {
            sampled = Instant::now();
            let now = sessions_cpu(src, NATIVE_SLOT).await;
            if !now.is_empty() {
                sessions = now;
            }
        }
        // The last commit applied (asynchronously committed, as subscriptions do by default).
        if committed_at.is_none() {
            let applied = lsns_of(
                &sub,
                "SELECT s.subname::text, (o.remote_lsn - '0/0'::pg_lsn)::int8 FROM pg_subscription s
                   JOIN pg_replication_origin_status o ON o.external_id = 'pg_' || s.oid WHERE s.subname = ANY($1)",
                &names,
            )
            .await;
            if all_past(l, NATIVE_SLOT, &applied) {
                committed_at = Some(started.elapsed().as_secs_f64());
            }
        }
        let confirmed = lsns_of(
            src,
            "SELECT slot_name::text, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = ANY($1)",
            &names,
        )
        .await;
        if all_past(l, NATIVE_SLOT, &confirmed) {
            break;
        }
        if started.elapsed() > LONG {
            bail!("timed out waiting for the native subscription (confirmed {confirmed:?})");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let pg = ctx.pg_cpu() - pg0;
    let other = (procstat::machine_busy() - busy0 - pg).max(0.0);
    let cpu: f64 = workers.values().map(|w| w.0).sum();
    sessions.push(("apply worker".into(), cpu));
    sessions.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut rows = 0;
    for (f, _) in &l.feeds {
        let table = format!("public.{}", f.table);
        let want = workload::checksum_of(src, &table, f.shape.columns()).await?;
        let have = workload::checksum_of(&sub, &table, f.shape.columns()).await?;
        anyhow::ensure!(
            want == have,
            "the native subscription's {table} does not match the source: source {want:?}, sink {have:?}"
        );
        rows += have.0;
    }
    let changes = l.total.changes;
    let t = Throughput {
        name: "native subscription (CREATE SUBSCRIPTION)".into(),
        changes,
        seconds,
        changes_per_s: changes as f64 / seconds,
        ratio_to_reference: None,
        ratio_to_native: None,
        client_cpu_s: cpu,
        client_cpu_s_per_million: cpu / (changes as f64 / 1e6),
        client_peak_rss_mb: workers.values().map(|w| w.1).max().unwrap_or(0) as f64 / MB,
        client_context_switches: workers.values().map(|w| w.2).sum(),
        postgres_cpu_s: pg,
        other_cpu_s: other,
        postgres_cpu_by_session: sessions,
        note: format!(
            "client = the apply worker{} (its CPU is also in PostgreSQL's); subscription defaults (synchronous_commit = off, binary = false, streaming = off); until confirmed_flush_lsn > {}; last commit applied after {}; sink = source: {rows} rows",
            if n > 1 {
                format!("s of {n} subscriptions (CPU: their sum; peak RSS: the largest)")
            } else {
                String::new()
            },
            l.feeds
                .iter()
                .map(|(_, w)| lsn_text(w.end_lsn))
                .collect::<Vec<_>>()
                .join(", "),
            committed_at.map_or("?".into(), |s| format!("{s:.2}s")),
        ),
    };
    eprintln!("  {:.2}s, {:.0} changes/s", t.seconds, t.changes_per_s);
    Ok(t)
}

/// (durable_lsn, processed_lsn) of pipelines by id, from the buffer; a pipeline is missing before
/// the buffer has its row.
async fn positions(src: &Client, ids: &[String]) -> HashMap<String, (u64, u64)> {
    src.query(
        "SELECT pipeline_id, durable_lsn, processed_lsn FROM philotes.pipelines WHERE pipeline_id = ANY($1)",
        &[&ids],
    )
    .await
    .unwrap_or_default()
    .iter()
    .map(|r| (r.get(0), (r.get::<_, i64>(1) as u64, r.get::<_, i64>(2) as u64)))
    .collect()
}

async fn wait_for<F, Fut>(
    what: &str,
    p: &mut Pipelines,
    timeout: Duration,
    mut done: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        if p.exited() {
            bail!(
                "the Philotes process exited while waiting for {what}:\n{}",
                p.log_tail()
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}:\n{}",
                p.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

const LONG: Duration = Duration::from_secs(1800);

/// Reader + buffer only: delivery Paused, a high watermark above the workload, until the buffer holds
/// every change and `durable_lsn` (acknowledged to the source) is past the workload end.
async fn reader_only(ctx: &Ctx, src: &Client, w: &Workload) -> anyhow::Result<Throughput> {
    checkpoint(src).await?;
    eprintln!("Philotes reader + buffer (Paused) ...");
    let id = "bench-reader";
    let (pg0, busy0) = (ctx.pg_cpu(), procstat::machine_busy());
    let mut p = ctx.spawn(
        "reader",
        &[Spec {
            name: "reader",
            uid: id,
            paused: true,
            table: "public.items",
            publication: "bench_pub",
            slot: "bench_reader",
            sink_schema: "replica_reader",
            iceberg: None,
            extra: "  backpressure: {highWatermark: 1000000000, lowWatermark: 900000000}",
        }],
    )?;
    wait_for(
        "durable_lsn past the workload end",
        &mut p,
        LONG,
        || async {
            positions(src, &[id.to_string()])
                .await
                .get(id)
                .is_some_and(|(d, _)| *d > w.end_lsn)
        },
    )
    .await?;
    let seconds = p.started.elapsed().as_secs_f64();
    let (cpu, rss, switches) = (p.cpu(), p.peak_rss(), procstat::context_switches(p.pid));
    let pg = ctx.pg_cpu() - pg0;
    let other = (procstat::machine_busy() - busy0 - pg - cpu).max(0.0);
    let sessions = sessions_cpu(src, "philotes-").await;
    p.stop().await?;
    let n: i64 = src
        .query_one(
            "SELECT count(*) FROM philotes.events WHERE pipeline_id = $1",
            &[&id],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        n as u64 == w.changes,
        "the buffer holds {n} events, the workload made {} changes",
        w.changes
    );
    let confirmed: Option<String> = src
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'bench_reader'",
            &[],
        )
        .await?
        .get(0);
    let t = Throughput {
        name: "Philotes reader + buffer (Paused)".into(),
        changes: w.changes,
        seconds,
        changes_per_s: w.changes as f64 / seconds,
        ratio_to_reference: None,
        ratio_to_native: None,
        client_cpu_s: cpu,
        client_cpu_s_per_million: cpu / (w.changes as f64 / 1e6),
        client_peak_rss_mb: rss as f64 / MB,
        client_context_switches: switches,
        postgres_cpu_s: pg,
        other_cpu_s: other,
        postgres_cpu_by_session: sessions,
        note: format!(
            "until durable_lsn > {}; {n} events in the buffer; slot confirmed {}",
            lsn_text(w.end_lsn),
            confirmed.unwrap_or_default()
        ),
    };
    eprintln!("  {:.2}s, {:.0} changes/s", t.seconds, t.changes_per_s);
    Ok(t)
}

/// Which end-to-end phase: the default spec into PostgreSQL or Iceberg, or PostgreSQL with
/// `spec.buffer.bypass: true`.
#[derive(Clone, Copy, PartialEq)]
enum EndToEnd {
    Postgres,
    Iceberg,
    Bypass,
}

/// End to end, one pipeline per feed in one Philotes process, until every sink committed its feed's
/// last change (bypassing the buffer: until every slot's `confirmed_flush_lsn` passes the end of its
/// feed, since Philotes then acknowledges only what the sink holds); then every sink table must match
/// its source (count and checksum).
async fn end_to_end(
    ctx: &Ctx,
    src: &Client,
    sink: &Client,
    l: &Loaded,
    kind: EndToEnd,
) -> anyhow::Result<Throughput> {
    checkpoint_all(ctx).await?;
    let bypass = kind == EndToEnd::Bypass;
    let iceberg = kind == EndToEnd::Iceberg;
    let n = l.feeds.len();
    eprintln!(
        "Philotes end to end{}{} ...",
        if bypass { ", bypassing the buffer" } else { "" },
        if n > 1 {
            format!(", {n} pipelines")
        } else {
            String::new()
        }
    );
    let warehouse = format!("file://{}/warehouse", ctx.cl.dir().display());
    let (name, slot, schema) = if bypass {
        ("bypass", "bench_bypass", "replica_bypass")
    } else {
        ("e2e", "bench_e2e", "replica")
    };
    // Per feed: pipeline name, uid, slot, sink schema, source table.
    let pipelines: Vec<[String; 5]> = l
        .feeds
        .iter()
        .map(|(f, _)| {
            [
                f.pipeline(name),
                f.pipeline(&format!("bench-{name}")),
                f.named(slot),
                f.named(schema),
                format!("public.{}", f.table),
            ]
        })
        .collect();
    let ids: Vec<String> = pipelines.iter().map(|p| p[1].clone()).collect();
    // Extra spec lines for experiments (e.g. "  buffer: {batchSize: 5000}"); none by default.
    let e2e_extra = if bypass {
        "  buffer: {bypass: true}".to_string()
    } else {
        std::env::var("PHILOTES_BENCH_E2E_SPEC").unwrap_or_default()
    };
    let specs: Vec<Spec> = pipelines
        .iter()
        .zip(&l.feeds)
        .map(|([name, uid, slot, schema, table], (f, _))| Spec {
            name,
            uid,
            paused: false,
            table,
            publication: &f.publication,
            slot,
            sink_schema: schema,
            iceberg: iceberg.then_some(warehouse.as_str()),
            extra: &e2e_extra,
        })
        .collect();
    let (pg0, busy0) = (ctx.pg_cpu(), procstat::machine_busy());
    let mut p = ctx.spawn(&format!("{name}{}", l.label), &specs)?;
    let read_seconds = if bypass {
        let slots: Vec<String> = pipelines.iter().map(|p| p[2].clone()).collect();
        wait_for(
            "confirmed_flush_lsn past the workload end",
            &mut p,
            LONG,
            || async {
                let confirmed = lsns_of(
                    src,
                    "SELECT slot_name::text, (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots WHERE slot_name = ANY($1)",
                    &slots,
                )
                .await;
                all_past(l, slot, &confirmed)
            },
        )
        .await?;
        None
    } else {
        wait_for(
            "durable_lsn past the workload end",
            &mut p,
            LONG,
            || async {
                let durable = positions(src, &ids).await;
                l.feeds
                    .iter()
                    .zip(&ids)
                    .all(|((_, w), id)| durable.get(id).is_some_and(|(d, _)| *d > w.end_lsn))
            },
        )
        .await?;
        let read_seconds = p.started.elapsed().as_secs_f64();
        // The commit LSN of each pipeline's last transaction (events carry their transaction's
        // commit LSN).
        let mut last = HashMap::new();
        for id in &ids {
            let lsn: i64 = src
                .query_one(
                    "SELECT max(lsn) FROM philotes.events WHERE pipeline_id = $1",
                    &[id],
                )
                .await?
                .get(0);
            last.insert(id.clone(), lsn as u64);
        }
        wait_for(
            "the sink to commit the last change",
            &mut p,
            LONG,
            || async {
                let at = positions(src, &ids).await;
                ids.iter()
                    .all(|id| at.get(id).is_some_and(|(_, done)| *done >= last[id]))
            },
        )
        .await?;
        Some(read_seconds)
    };
    let seconds = p.started.elapsed().as_secs_f64();
    let (cpu, rss, switches) = (p.cpu(), p.peak_rss(), procstat::context_switches(p.pid));
    let pg = ctx.pg_cpu() - pg0;
    let other = (procstat::machine_busy() - busy0 - pg - cpu).max(0.0);
    let mut sessions = sessions_cpu(src, "philotes-").await;
    if ctx.sink_cl.is_some() {
        sessions.extend(sessions_cpu(sink, "philotes-").await);
        sessions.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    p.stop().await?;
    let changes = l.total.changes;
    let (name, check) = if iceberg {
        // Every change is one changelog row (the workload changes no key).
        let mut rows = 0;
        for (f, _) in &l.feeds {
            rows += iceberg_records(src, "bench", &f.table).await?;
        }
        anyhow::ensure!(
            rows == changes,
            "the Iceberg changelog holds {rows} rows, the workload made {changes} changes"
        );
        (
            "Philotes end to end → Iceberg sink (file://)",
            format!("Iceberg changelog rows = changes: {rows}"),
        )
    } else {
        let (mut rows, mut sums) = (0, Vec::new());
        for ((f, _), [.., schema, table]) in l.feeds.iter().zip(&pipelines) {
            let want = workload::checksum_of(src, table, f.shape.columns()).await?;
            let have =
                workload::checksum_of(sink, &format!("{schema}.{}", f.table), f.shape.columns())
                    .await?;
            anyhow::ensure!(
                want == have,
                "{name}: {schema}.{} does not match the source: source {want:?}, sink {have:?}",
                f.table
            );
            rows += have.0;
            sums.push(have.1);
        }
        (
            if bypass {
                "Philotes end to end, bypassing the buffer → PostgreSQL sink"
            } else {
                "Philotes end to end → PostgreSQL sink"
            },
            format!(
                "sink = source: {rows} rows{}, checksum {}",
                if n > 1 {
                    format!(" in {n} tables")
                } else {
                    String::new()
                },
                sums.join(", ")
            ),
        )
    };
    let settings = if bypass {
        format!(
            "spec.buffer.bypass: true; until confirmed_flush_lsn > {}",
            lsn_text(l.total.end_lsn)
        )
    } else {
        "default settings".to_string()
    };
    let place = if iceberg {
        "a file:// warehouse"
    } else if ctx.sink_cl.is_some() {
        "a cluster of its own"
    } else {
        "the source's cluster"
    };
    let buffered = read_seconds.map_or(String::new(), |r| {
        format!(" all in the buffer after {r:.2}s;")
    });
    let t = Throughput {
        name: name.into(),
        changes,
        seconds,
        changes_per_s: changes as f64 / seconds,
        ratio_to_reference: None,
        ratio_to_native: None,
        client_cpu_s: cpu,
        client_cpu_s_per_million: cpu / (changes as f64 / 1e6),
        client_peak_rss_mb: rss as f64 / MB,
        client_context_switches: switches,
        postgres_cpu_s: pg,
        other_cpu_s: other,
        postgres_cpu_by_session: sessions,
        note: format!(
            "{settings}, {}sink in {place};{buffered} {check}",
            if n > 1 {
                format!("{n} pipelines in one process, ")
            } else {
                String::new()
            }
        ),
    };
    match read_seconds {
        Some(r) => eprintln!(
            "  {:.2}s, {:.0} changes/s (buffer complete after {r:.2}s)",
            t.seconds, t.changes_per_s
        ),
        None => eprintln!("  {:.2}s, {:.0} changes/s", t.seconds, t.changes_per_s),
    }
    Ok(t)
}

/// `total-records` of the current snapshot of Iceberg table `ns.table`, from the SQL catalog in the
/// buffer database and the table's metadata file (`file://` warehouses only).
async fn iceberg_records(buffer: &Client, ns: &str, table: &str) -> anyhow::Result<u64> {
    let location: String = buffer
        .query_one(
            "SELECT metadata_location FROM iceberg_tables WHERE table_namespace = $1 AND table_name = $2",
            &[&ns, &table],
        )
        .await?
        .get(0);
    let path = location
        .strip_prefix("file://")
        .context("not a file:// metadata location")?;
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(path)?)?;
    let current = meta["current-snapshot-id"]
        .as_i64()
        .context("no snapshot")?;
    let snap = meta["snapshots"]
        .as_array()
        .and_then(|s| {
            s.iter()
                .find(|s| s["snapshot-id"].as_i64() == Some(current))
        })
        .context("the current snapshot is missing")?;
    snap["summary"]["total-records"]
        .as_str()
        .and_then(|n| n.parse().ok())
        .context("no total-records in the summary")
}

/// Steady load in small transactions; latency = sink commit time − source commit time per row.
async fn latency_phase(ctx: &Ctx, rate: u64, secs: u64) -> anyhow::Result<Latency> {
    eprintln!(
        "latency: {rate} rows/s for {secs}s (restarting PostgreSQL with track_commit_timestamp=on) ..."
    );
    for c in ctx.clusters() {
        c.client("postgres")
            .await?
            .batch_execute("ALTER SYSTEM SET track_commit_timestamp = on")
            .await?;
        c.restart()?;
    }
    let src = ctx.cl.client("source").await?;
    let sink = ctx.sink_cluster().client("sink").await?;
    src.batch_execute(&workload::create_table("public.ticks"))
        .await?;
    src.batch_execute("CREATE PUBLICATION bench_lat_pub FOR TABLE public.ticks")
        .await?;
    let id = "bench-latency";
    let mut p = ctx.spawn(
        "latency",
        &[Spec {
            name: "latency",
            uid: id,
            paused: false,
            table: "public.ticks",
            publication: "bench_lat_pub",
            slot: "bench_latency",
            sink_schema: "replica",
            iceberg: None,
            extra: "",
        }],
    )?;
    // Warm-up: one row through the whole path.
    wait_for(
        "the sink table",
        &mut p,
        Duration::from_secs(60),
        || async {
            sink.query_opt("SELECT 1 FROM replica.ticks LIMIT 1", &[])
                .await
                .is_ok()
        },
    )
    .await?;
    src.batch_execute(&format!(
        "INSERT INTO public.ticks SELECT {} FROM generate_series(0::bigint, 0) g",
        workload::ROW
    ))
    .await?;
    wait_for(
        "the warm-up row",
        &mut p,
        Duration::from_secs(60),
        || async {
            sink.query_opt("SELECT 1 FROM replica.ticks WHERE id = 0", &[])
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await?;
    let hist0 = p.metrics().await.unwrap_or_default();
    let (cpu0, pg0, busy0) = (p.cpu(), ctx.pg_cpu(), procstat::machine_busy());

    let conns = 4u64;
    let next_id = Arc::new(AtomicU64::new(1));
    let txns = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for k in 0..conns {
        let c = ctx.cl.client("source").await?;
        let next_id = next_id.clone();
        let txns = txns.clone();
        tasks.push(tokio::spawn(async move {
            let stmt = c
                .prepare(&format!(
                    "INSERT INTO public.ticks SELECT {} FROM generate_series($1::int8, $2::int8) g",
                    workload::ROW
                ))
                .await?;
            let per_conn = rate as f64 / conns as f64;
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (k + 1);
            let mut at = tokio::time::Instant::now();
            while at < end {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let n = 1 + rng % 10;
                let first = next_id.fetch_add(n, Ordering::Relaxed) as i64;
                c.execute(&stmt, &[&first, &(first + n as i64 - 1)]).await?;
                txns.fetch_add(1, Ordering::Relaxed);
                at += Duration::from_secs_f64(n as f64 / per_conn);
                tokio::time::sleep_until(at).await;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let rows = next_id.load(Ordering::Relaxed) - 1;
    wait_for(
        "the sink to catch up",
        &mut p,
        Duration::from_secs(120),
        || async {
            sink.query_one("SELECT count(*) FROM replica.ticks WHERE id > 0", &[])
                .await
                .is_ok_and(|r| r.get::<_, i64>(0) as u64 == rows)
        },
    )
    .await?;
    let cpu = p.cpu() - cpu0;
    let pg = ctx.pg_cpu() - pg0;
    let other = (procstat::machine_busy() - busy0 - pg - cpu).max(0.0);
    let rss = p.peak_rss();
    let hist1 = p.metrics().await.unwrap_or_default();
    p.stop().await?;

    let at_source = commit_times(&src, "public.ticks").await?;
    let at_sink = commit_times(&sink, "replica.ticks").await?;
    let mut lat: Vec<f64> = Vec::with_capacity(at_source.len());
    for (id, s) in &at_source {
        let (Some(s), Some(Some(d))) = (s, at_sink.get(id)) else {
            bail!("row {id} has no commit timestamp in the source or the sink");
        };
        lat.push((d - s) as f64 / 1000.0);
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    anyhow::ensure!(!lat.is_empty(), "no rows in the latency phase");
    let pct = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
    let metric_p99_le_ms = {
        let name = "philotes_delivery_latency_seconds";
        let (b0, b1) = (
            child::histogram(&hist0, name),
            child::histogram(&hist1, name),
        );
        let diff: Vec<(f64, u64)> = b1
            .iter()
            .map(|(le, n)| {
                let before = b0.iter().find(|(l, _)| l == le).map(|x| x.1).unwrap_or(0);
                (*le, n - before)
            })
            .collect();
        let total = diff.last().map(|x| x.1).unwrap_or(0);
        diff.iter()
            .find(|(_, n)| total > 0 && *n as f64 >= total as f64 * 0.99)
            .map(|(le, _)| le * 1000.0)
    };
    let l = Latency {
        target_rows_per_s: rate,
        achieved_rows_per_s: rows as f64 / seconds,
        seconds,
        rows,
        transactions: txns.load(Ordering::Relaxed),
        p50_ms: pct(0.50),
        p90_ms: pct(0.90),
        p99_ms: pct(0.99),
        max_ms: *lat.last().unwrap_or(&0.0),
        metric_p99_le_ms,
        philotes_cpu_s: cpu,
        philotes_cpu_percent: cpu / seconds * 100.0,
        philotes_peak_rss_mb: rss as f64 / MB,
        postgres_cpu_s: pg,
        other_cpu_s: other,
    };
    eprintln!(
        "  {:.0} rows/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        l.achieved_rows_per_s, l.p50_ms, l.p99_ms, l.max_ms
    );
    Ok(l)
}

/// Many idle pipelines (each on its own slot) in one process.
async fn idle_phase(ctx: &Ctx, n: usize, secs: u64) -> anyhow::Result<Idle> {
    eprintln!("idle: {n} pipelines for {secs}s ...");
    let src = ctx.cl.client("source").await?;
    src.batch_execute(&format!(
        "{}; CREATE PUBLICATION bench_idle_pub FOR TABLE public.idle_t",
        workload::create_table("public.idle_t")
    ))
    .await?;
    let names: Vec<(String, String, String)> = (1..=n)
        .map(|i| {
            (
                format!("idle-{i:02}"),
                format!("bench-idle-{i:02}"),
                format!("idle_{i:02}"),
            )
        })
        .collect();
    let specs: Vec<Spec> = names
        .iter()
        .map(|(name, uid, slot)| Spec {
            name,
            uid,
            paused: false,
            table: "public.idle_t",
            publication: "bench_idle_pub",
            slot,
            sink_schema: slot,
            iceberg: None,
            extra: "",
        })
        .collect();
    let mut p = ctx.spawn("idle", &specs)?;
    wait_for(
        "every idle pipeline to stream",
        &mut p,
        Duration::from_secs(300),
        || async {
            src.query_one(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'philotes-reader' AND state = 'streaming'",
                &[],
            )
            .await
            .is_ok_and(|r| r.get::<_, i64>(0) as usize >= n)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(if secs >= 10 { 5 } else { 1 })).await;
    let (cpu0, pg0, busy0) = (p.cpu(), ctx.pg_cpu(), procstat::machine_busy());
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let seconds = t0.elapsed().as_secs_f64();
    let (cpu, pg) = (p.cpu() - cpu0, ctx.pg_cpu() - pg0);
    let other = (procstat::machine_busy() - busy0 - pg - cpu).max(0.0);
    let (rss, hwm) = (p.rss(), p.peak_rss());
    let conns: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'philotes-%'",
            &[],
        )
        .await?
        .get(0);
    p.stop().await?;
    let i = Idle {
        pipelines: n,
        seconds,
        philotes_rss_mb: rss as f64 / MB,
        philotes_peak_rss_mb: hwm as f64 / MB,
        philotes_cpu_s: cpu,
        postgres_cpu_s: pg,
        postgres_connections: conns,
        other_cpu_s: other,
    };
    eprintln!(
        "  RSS {:.1} MiB, CPU {:.2}s over {:.0}s",
        i.philotes_rss_mb, i.philotes_cpu_s, i.seconds
    );
    Ok(i)
}

fn targets(t: &[Throughput], l: Option<&Latency>, memory: &[memory::MemoryPhase]) -> Vec<Target> {
    let mut out = Vec::new();
    let find = |prefix: &str| t.iter().find(|x| x.name.starts_with(prefix));
    if let Some(r) = find("Philotes reader")
        && let Some(ratio) = r.ratio_to_reference
    {
        out.push(Target {
            what: "reader + buffer throughput".into(),
            target: "≥ 0.8 × reference".into(),
            measured: format!("{ratio:.2} ×"),
            met: ratio >= 0.8,
        });
    }
    if let Some(e) = find("Philotes end") {
        if let Some(ratio) = e.ratio_to_native {
            out.push(Target {
                what: "end-to-end throughput".into(),
                target: "≥ 0.8 × native subscription".into(),
                measured: format!("{ratio:.2} ×"),
                met: ratio >= 0.8,
            });
        }
        if let Some(ratio) = e.ratio_to_reference {
            out.push(Target {
                what: "end-to-end throughput".into(),
                target: "≥ 0.5 × reference".into(),
                measured: format!("{ratio:.2} ×"),
                met: ratio >= 0.5,
            });
        }
        out.push(Target {
            what: "peak RSS, one pipeline".into(),
            target: "≤ 150 MB".into(),
            measured: format!("{:.0} MiB", e.client_peak_rss_mb),
            met: e.client_peak_rss_mb * MB <= 150e6,
        });
    }
    if let Some(ratio) = find("Philotes end to end, bypassing").and_then(|b| b.ratio_to_native) {
        out.push(Target {
            what: "end-to-end throughput, spec.buffer.bypass".into(),
            target: "≥ 1.0 × native subscription".into(),
            measured: format!("{ratio:.2} ×"),
            met: ratio >= 1.0,
        });
    }
    if let Some(l) = l {
        out.push(Target {
            what: format!("p99 latency at {} rows/s", l.target_rows_per_s),
            target: "≤ 25 ms".into(),
            measured: format!("{:.1} ms", l.p99_ms),
            met: l.p99_ms <= 25.0,
        });
    }
    for m in memory {
        out.push(Target {
            what: format!("peak RSS, {}: {}", m.phase, m.name),
            target: "≤ 150 MB".into(),
            measured: format!("{:.0} MiB", m.philotes_peak_rss_mb),
            met: m.philotes_peak_rss_mb * MB <= 150e6,
        });
    }
    out
}

fn print_table(r: &Results) {
    let m = &r.machine;
    println!();
    println!(
        "Machine: {} CPUs ({}), {:.0} GB RAM; {} on the same machine (sink: {})",
        m.cpus, m.cpu_model, m.memory_gb, m.postgres, r.setup.sink
    );
    if let Some(w) = &r.workload {
        println!(
            "Workload: {} changes ({} inserts, {} updates, {} deletes), ~{} transactions, {:.0} MiB of WAL",
            w.changes,
            w.inserts,
            w.updates,
            w.deletes,
            w.transactions,
            w.wal_bytes as f64 / MB
        );
    }
    if !r.throughput.is_empty() || r.latency.is_some() || r.idle.is_some() {
        println!();
        println!(
            "| measurement | changes/s | × reference | × native | seconds | client CPU s per M changes | client peak RSS MiB | PostgreSQL CPU s | other processes' CPU s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    }
    let ratio = |x: Option<f64>| x.map(|x| format!("{x:.2}")).unwrap_or_else(|| "–".into());
    for t in &r.throughput {
        println!(
            "| {} | {:.0} | {} | {} | {:.2} | {:.2} | {:.0} | {:.1} | {:.1} |",
            t.name,
            t.changes_per_s,
            ratio(t.ratio_to_reference),
            ratio(t.ratio_to_native),
            t.seconds,
            t.client_cpu_s_per_million,
            t.client_peak_rss_mb,
            t.postgres_cpu_s,
            t.other_cpu_s
        );
    }
    if let Some(l) = &r.latency {
        println!(
            "| latency at {} rows/s ({:.0} achieved, {:.0}s, {} small transactions), source commit → sink commit | p50 {:.1} ms | p99 {:.1} ms | max {:.1} ms | – | {:.2} (CPU {:.0}%) | {:.0} | {:.1} | {:.1} |",
            l.target_rows_per_s,
            l.achieved_rows_per_s,
            l.seconds,
            l.transactions,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            l.philotes_cpu_s / (l.rows as f64 / 1e6),
            l.philotes_cpu_percent,
            l.philotes_peak_rss_mb,
            l.postgres_cpu_s,
            l.other_cpu_s
        );
    }
    if let Some(i) = &r.idle {
        println!(
            "| {} idle pipelines in one process ({} PostgreSQL connections) | CPU {:.2}s over {:.0}s | – | – | – | – | {:.0} (now {:.0}) | {:.1} | {:.1} |",
            i.pipelines,
            i.postgres_connections,
            i.philotes_cpu_s,
            i.seconds,
            i.philotes_peak_rss_mb,
            i.philotes_rss_mb,
            i.postgres_cpu_s,
            i.other_cpu_s
        );
    }
    if !r.memory.is_empty() {
        println!();
        println!(
            "| memory phase (end to end, default spec) | rows | transactions | WAL MiB | seconds | changes/s | WAL MiB/s | value MiB/s | Philotes CPU s | Philotes peak RSS MiB | PostgreSQL CPU s | other processes' CPU s |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for m in &r.memory {
            println!(
                "| {}: {} | {} | {} | {:.0} | {:.2} | {:.0} | {:.1} | {} | {:.2} | {:.0} | {:.1} | {:.1} |",
                m.phase,
                m.name,
                m.rows,
                m.transactions,
                m.wal_bytes as f64 / MB,
                m.seconds,
                m.changes_per_s,
                m.wal_mb_per_s,
                m.value_mb_per_s
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(|| "–".into()),
                m.philotes_cpu_s,
                m.philotes_peak_rss_mb,
                m.postgres_cpu_s,
                m.other_cpu_s
            );
        }
    }
    for dimension in ["rows", "pipelines", "row width"] {
        let points: Vec<&scaling::Point> = r
            .scaling
            .iter()
            .filter(|p| p.dimension == dimension)
            .collect();
        if points.is_empty() {
            continue;
        }
        println!();
        println!(
            "| scaling: {dimension} (end to end, default spec) | changes | Philotes changes/s | × pg_recvlogical | × native | Philotes CPU s per M changes | PostgreSQL CPU s per M changes | WAL MiB/s | value MiB/s | seconds | Philotes peak RSS MiB | pg_recvlogical changes/s | native changes/s | pg_recvlogical CPU s per M | apply worker CPU s per M | other processes' CPU s |"
        );
        println!(
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let opt =
            |x: Option<f64>, d: usize| x.map(|x| format!("{x:.d$}")).unwrap_or_else(|| "–".into());
        for p in points {
            println!(
                "| {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.2} | {:.1} | {} | {:.2} | {:.0} | {:.0} | {} | {:.2} | {} | {:.1} |",
                p.point,
                p.workload.changes,
                p.changes_per_s,
                p.ratio_to_reference,
                opt(p.ratio_to_native, 2),
                p.philotes_cpu_s_per_million,
                p.postgres_cpu_s_per_million,
                p.wal_mb_per_s,
                opt(p.value_mb_per_s, 1),
                p.philotes.seconds,
                p.philotes.client_peak_rss_mb,
                p.reference.changes_per_s,
                opt(p.native.as_ref().map(|n| n.changes_per_s), 0),
                p.reference.client_cpu_s_per_million,
                opt(p.native.as_ref().map(|n| n.client_cpu_s_per_million), 2),
                p.philotes.other_cpu_s
            );
        }
    }
    if !r.targets.is_empty() {
        println!();
        println!("| target | goal | measured | met |");
        println!("|---|---|---|---|");
        for t in &r.targets {
            println!(
                "| {} | {} | {} | {} |",
                t.what,
                t.target,
                t.measured,
                if t.met { "yes" } else { "NO" }
            );
        }
    }
    for t in &r.throughput {
        let by: Vec<String> = t
            .postgres_cpu_by_session
            .iter()
            .filter(|(_, c)| *c >= 0.05)
            .map(|(n, c)| format!("{n} {c:.1}s"))
            .collect();
        println!(
            "  {}: {}; PostgreSQL sessions: {}",
            t.name,
            t.note,
            by.join(", ")
        );
    }
    for m in &r.memory {
        let by: Vec<String> = m
            .postgres_cpu_by_session
            .iter()
            .filter(|(_, c)| *c >= 0.05)
            .map(|(n, c)| format!("{n} {c:.1}s"))
            .collect();
        println!(
            "  {}: {}; highest RSS sample at {:.1}s; source data written in {:.1}s; PostgreSQL sessions: {}",
            m.phase,
            m.note,
            m.peak_sample_at_s,
            m.generate_seconds,
            by.join(", ")
        );
    }
    if let Some(l) = &r.latency
        && let Some(p) = l.metric_p99_le_ms
    {
        println!(
            "  latency: philotes_delivery_latency_seconds p99 ≤ {p:.0} ms (histogram bucket; measured after the buffer is marked processed)"
        );
    }
}

/// Commit time (µs since the Unix epoch) of every row of `table` with id > 0, by id.
async fn commit_times(c: &Client, table: &str) -> anyhow::Result<HashMap<i64, Option<i64>>> {
    let rows = c
        .query(
            &format!("SELECT id, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1e6)::int8 FROM {table} WHERE id > 0"),
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1)))
        .collect())
}
