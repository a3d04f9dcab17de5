//! `philotes-bench replicas`: operator replicas sharing idle pipelines. For each pipeline count, a
//! source cluster, a local kube-apiserver (`scripts/envtest.sh`) and `--replicas` `philotes operator`
//! processes; once every pipeline is Running, the API server's request count
//! (`apiserver_request_total`, all clients) and each operator's CPU are measured over `--secs`. The
//! requests per minute should not grow with the pipeline count: membership is per replica, and idle
//! pipelines have no reconcile timer and write status only on change.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::{Cluster, free_port};
use crate::procstat;

fn cache() -> PathBuf {
    std::env::var("PHILOTES_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/philotes")
        })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct ApiServer {
    dir: PathBuf,
}

impl ApiServer {
    fn start() -> anyhow::Result<ApiServer> {
        let dir = std::env::temp_dir().join(format!("philotes-bench-k8s-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new("bash")
            .arg(repo().join("scripts/envtest.sh"))
            .arg("start")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "scripts/envtest.sh start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(ApiServer { dir })
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(cache().join("k8s-1.20.2/bin/kubectl"))
            .env("KUBECONFIG", self.kubeconfig())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Requests the API server has answered so far (every client, every verb).
    fn requests(&self) -> anyhow::Result<f64> {
        let metrics = self.kubectl(&["get", "--raw", "/metrics"])?;
        Ok(metrics
            .lines()
            .filter(|l| l.starts_with("apiserver_request_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/envtest.sh"))
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn philotes_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("the benchmark's folder")?
        .join("philotes");
    if !bin.exists() {
        bail!(
            "{} is missing: build it (cargo build --release --bins)",
            bin.display()
        );
    }
    Ok(bin)
}

fn operator(api: &ApiServer, identity: &str, log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    Ok(Command::new(philotes_bin()?)
        .args(["operator", "--namespace", "bench", "--identity", identity])
        .args(["--health-addr", &format!("127.0.0.1:{}", free_port()?)])
        .env("KUBECONFIG", api.kubeconfig())
        .env("POD_NAMESPACE", "bench")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out))
        .spawn()?)
}

/// One pipeline count: what the replicas cost while every pipeline is Running and idle.
async fn measure(pipelines: usize, replicas: usize, secs: u64) -> anyhow::Result<()> {
    let source = Cluster::start_for("replicas", true, false, pipelines)?;
    let src = source.client("postgres").await?;
    src.batch_execute("CREATE DATABASE shop").await?;
    src.batch_execute("CREATE DATABASE warehouse").await?;
    let shop = source.client("shop").await?;
    for i in 0..pipelines {
        shop.batch_execute(&format!("CREATE TABLE t{i} (id int PRIMARY KEY, v text)"))
            .await?;
    }
    let api = ApiServer::start()?;
    let crd = api.dir.join("crd.yaml");
    let out = Command::new(philotes_bin()?).arg("crd").output()?;
    std::fs::write(&crd, out.stdout)?;
    api.kubectl(&["apply", "-f", crd.to_str().unwrap_or_default()])?;
    api.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/cdcpipelines.philotes.io",
        "--timeout=60s",
    ])?;
    api.kubectl(&["create", "namespace", "bench"])?;
    let mut manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: db, namespace: bench}}\nstringData: {{source: \"{}\", sink: \"{}\"}}\n",
        source.uri("shop"),
        source.uri("warehouse")
    );
    for i in 0..pipelines {
        manifest.push_str(&format!(
            "---\napiVersion: philotes.io/v1alpha1\nkind: CdcPipeline\nmetadata: {{name: p{i}, namespace: bench}}\nspec:\n  source: {{connectionSecretRef: {{name: db, key: source}}, tables: [public.t{i}]}}\n  sink: {{postgres: {{connectionSecretRef: {{name: db, key: sink}}, schema: replica}}}}\n"
        ));
    }
    let file = api.dir.join("pipelines.yaml");
    std::fs::write(&file, manifest)?;
    let mut children = Vec::new();
    for r in 0..replicas {
        children.push(operator(
            &api,
            &format!("replica-{r}"),
            &api.dir.join(format!("replica-{r}.log")),
        )?);
    }
    api.kubectl(&["apply", "-f", file.to_str().unwrap_or_default()])?;
    let started = Instant::now();
    loop {
        let phases = api.kubectl(&[
            "get",
            "cdcp",
            "-n",
            "bench",
            "-o",
            "jsonpath={.items[*].status.phase}",
        ])?;
        let running = phases
            .split_whitespace()
            .filter(|p| *p == "Running")
            .count();
        if running == pipelines {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {running} of {pipelines} pipelines Running after 10 minutes");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let up = started.elapsed();
    // Let the start-up status writes settle.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let r0 = api.requests()?;
    let c0: Vec<f64> = children
        .iter()
        .map(|c| procstat::stat(c.id()).map_or(0.0, |s| s.cpu))
        .collect();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let r1 = api.requests()?;
    let elapsed = t0.elapsed().as_secs_f64();
    let c1: Vec<f64> = children
        .iter()
        .map(|c| procstat::stat(c.id()).map_or(0.0, |s| s.cpu))
        .collect();
    let rss: Vec<f64> = children
        .iter()
        .map(|c| procstat::vm_bytes(c.id(), "VmRSS").unwrap_or(0) as f64 / (1 << 20) as f64)
        .collect();
    let cpu: Vec<String> = c0
        .iter()
        .zip(&c1)
        .map(|(a, b)| format!("{:.1}%", (b - a) / elapsed * 100.0))
        .collect();
    let rss: Vec<String> = rss.iter().map(|m| format!("{m:.0} MiB")).collect();
    println!(
        "replicas: {pipelines} idle pipelines on {replicas} replicas (all Running after {:.1}s): {:.0} API requests/min (two of them this benchmark's); per replica CPU {} RSS {}",
        up.as_secs_f64(),
        (r1 - r0) / elapsed * 60.0,
        cpu.join(" "),
        rss.join(" ")
    );
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    Ok(())
}

pub async fn run(counts: &[usize], replicas: usize, secs: u64) -> anyhow::Result<()> {
    for n in counts {
        measure(*n, replicas, secs).await?;
    }
    Ok(())
}
