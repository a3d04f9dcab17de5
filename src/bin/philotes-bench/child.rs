//! Philotes under test, as its own process: this binary re-executed as `philotes-bench pipelines -f FILE`,
//! which runs the manifest exactly as `philotes run -f FILE` does (same library call). A separate process
//! keeps its RSS and CPU apart from PostgreSQL and from the benchmark driver.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::procstat;

pub struct Pipelines {
    child: tokio::process::Child,
    /// The process running the pipelines (the wrapper's child when a wrapper such as perf is used).
    pub pid: u32,
    pub log: PathBuf,
    pub health: SocketAddr,
    pub started: Instant,
}

/// One pipeline of a manifest.
pub struct Spec<'a> {
    pub name: &'a str,
    pub uid: &'a str,
    pub paused: bool,
    pub table: &'a str,
    pub publication: &'a str,
    pub slot: &'a str,
    pub sink_schema: &'a str,
    /// An Iceberg warehouse (`file://...`) to deliver to instead of the PostgreSQL sink, namespace
    /// `bench`.
    pub iceberg: Option<&'a str>,
    /// Extra spec lines (YAML, indented by two spaces), e.g. a backpressure section.
    pub extra: &'a str,
}

pub fn manifest(source_uri: &str, sink_uri: &str, specs: &[Spec]) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: bench-db}}\nstringData: {{source: \"{source_uri}\", sink: \"{sink_uri}\"}}\n"
    );
    for s in specs {
        let sink = match s.iceberg {
            Some(warehouse) => format!("iceberg: {{warehouse: \"{warehouse}\", namespace: bench}}"),
            None => format!(
                "postgres: {{connectionSecretRef: {{name: bench-db, key: sink}}, schema: {}}}",
                s.sink_schema
            ),
        };
        out.push_str(&format!(
            "---\napiVersion: philotes.io/v1alpha1\nkind: CdcPipeline\nmetadata: {{name: {}, uid: {}}}\nspec:\n  state: {}\n  source:\n    connectionSecretRef: {{name: bench-db, key: source}}\n    tables: [{}]\n    publication: {}\n    slot: {}\n  sink:\n    {sink}\n{}\n",
            s.name,
            s.uid,
            if s.paused { "Paused" } else { "Running" },
            s.table,
            s.publication,
            s.slot,
            s.extra
        ));
    }
    out
}

impl Pipelines {
    pub fn spawn(
        dir: &Path,
        label: &str,
        manifest: &str,
        wrapper: &[String],
    ) -> anyhow::Result<Self> {
        let file = dir.join(format!("{label}.yaml"));
        std::fs::write(&file, manifest)?;
        let log = dir.join(format!("{label}.log"));
        let out = std::fs::File::create(&log)?;
        let health: SocketAddr = format!("127.0.0.1:{}", crate::cluster::free_port()?).parse()?;
        let exe = std::env::current_exe().context("locating the benchmark binary")?;
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = tokio::process::Command::new(first);
                c.args(rest).arg(&exe);
                c
            }
            None => tokio::process::Command::new(&exe),
        };
        cmd.arg("pipelines")
            .arg("-f")
            .arg(&file)
            .arg("--health-addr")
            .arg(health.to_string())
            .env(
                "RUST_LOG",
                std::env::var("PHILOTES_BENCH_LOG").unwrap_or_else(|_| "warn,philotes=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::from(out.try_clone()?))
            .stderr(Stdio::from(out))
            .kill_on_drop(true);
        let started = Instant::now();
        let child = cmd.spawn().context("starting the pipelines process")?;
        let mut pid = child.id().context("pipelines process pid")?;
        if !wrapper.is_empty() {
            // The process to measure is the wrapper's descendant running this binary (a wrapper such
            // as heaptrack starts helpers besides it); else its first child, else the wrapper itself
            // (valgrind runs the program in its own process).
            let deadline = Instant::now() + Duration::from_secs(10);
            let exe = exe.canonicalize().unwrap_or_else(|_| exe.clone());
            loop {
                if let Some(p) = descendants_of(pid)
                    .into_iter()
                    .find(|p| std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e == exe))
                {
                    pid = p;
                    break;
                }
                if Instant::now() >= deadline {
                    pid = children_of(pid).into_iter().next().unwrap_or(pid);
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(Self {
            child,
            pid,
            log,
            health,
            started,
        })
    }

    /// CPU seconds used so far (every thread).
    pub fn cpu(&self) -> f64 {
        procstat::stat(self.pid).map(|s| s.cpu).unwrap_or(0.0)
    }

    /// Peak resident set size so far (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        procstat::vm_bytes(self.pid, "VmHWM").unwrap_or(0)
    }

    /// Current resident set size (VmRSS), bytes.
    pub fn rss(&self) -> u64 {
        procstat::vm_bytes(self.pid, "VmRSS").unwrap_or(0)
    }

    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 30 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(r) => {
                r?;
            }
            Err(_) => {
                let _ = self.child.kill().await;
            }
        }
        Ok(())
    }

    /// The Prometheus text from the process's `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(self.health).await?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        Ok(body
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or(body))
    }
}

/// Children of `parent`, their children, and so on.
fn descendants_of(parent: u32) -> Vec<u32> {
    let mut out = children_of(parent);
    let mut i = 0;
    while i < out.len() {
        let more = children_of(out[i]);
        out.extend(more);
        i += 1;
    }
    out
}

fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && procstat::stat(pid).is_some_and(|s| s.ppid == parent)
            {
                out.push(pid);
            }
        }
    }
    out
}

/// Cumulative bucket counts of a histogram in Prometheus text: (upper bound, count).
pub fn histogram(text: &str, name: &str) -> Vec<(f64, u64)> {
    let prefix = format!("{name}_bucket{{");
    let mut out: Vec<(f64, u64)> = text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            let count = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((bound, count))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}
