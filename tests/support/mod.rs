//! Test support: a throwaway PostgreSQL cluster per test (the shared launcher, `philotes::testkit`, with
//! wal_level=logical and fsync off), and helpers to compare tables.
#![allow(dead_code)]

pub mod k8s;
pub mod lake;
pub mod pipeline;

use std::path::Path;
use std::time::{Duration, Instant};

use philotes::testkit::{Cluster, Options};

pub use philotes::testkit::USER;
pub const PASSWORD: &str = "philotes-test-pw";

/// Room for many pipelines and connections at once.
const CONF: &str = "max_replication_slots = 80\nmax_wal_senders = 80\nmax_connections = 300\nshared_buffers = 128MB\nwal_sender_timeout = 60s\n";

/// A test's cluster (wal_level=logical); stopped and removed when dropped.
pub struct Pg {
    pub port: u16,
    cluster: Cluster,
}

impl Pg {
    /// Starts a new cluster. PostgreSQL refuses to run as root, so under root it runs as `postgres`.
    pub fn start() -> Pg {
        Self::start_with(false, "")
    }

    /// A cluster that also accepts TLS (`ssl = on`, a self-signed certificate made with openssl).
    pub fn start_tls() -> Pg {
        Self::start_with(true, "")
    }

    /// A cluster with `ssl = on` and this certificate chain and key (PEM).
    pub fn start_tls_pem(crt: &str, key: &str) -> Pg {
        Self::start_opts(false, Some((crt.into(), key.into())), "")
    }

    /// A cluster with `extra` appended to its postgresql.conf.
    pub fn start_conf(extra: &str) -> Pg {
        Self::start_with(false, extra)
    }

    fn start_with(tls: bool, extra: &str) -> Pg {
        Self::start_opts(tls, None, extra)
    }

    fn start_opts(tls: bool, tls_pem: Option<(String, String)>, extra: &str) -> Pg {
        let cluster = Cluster::start(&Options {
            name: "pg".into(),
            password: PASSWORD.into(),
            logical: true,
            tls,
            tls_pem,
            unsafe_durability: true,
            conf: format!("{CONF}{extra}\n"),
            keep: false,
        })
        .unwrap_or_else(|e| panic!("starting a PostgreSQL cluster: {e:#}"));
        Pg {
            port: cluster.port(),
            cluster,
        }
    }

    pub fn start_server(&self) {
        self.cluster
            .start_server()
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Stops the server as a crash would (immediate shutdown).
    pub fn stop_server_immediate(&self) {
        self.cluster
            .stop_server_immediate()
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    /// Stops the server (fast shutdown: sessions are cut, committed data stays).
    pub fn stop_server(&self) {
        self.cluster
            .stop_server()
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub fn uri(&self, db: &str) -> String {
        self.cluster.uri(db)
    }

    pub fn uri_as(&self, user: &str, password: &str, db: &str) -> String {
        self.cluster.uri_as(user, password, db)
    }

    pub fn uri_with_password(&self, db: &str, password: &str) -> String {
        self.cluster.uri_as(USER, password, db)
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        self.cluster
            .client(db)
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e:#}"))
    }

    pub async fn create_db(&self, name: &str) {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }

    pub fn dir(&self) -> &Path {
        self.cluster.dir()
    }
}

/// The engine's log, shown for a test that fails (`RUST_LOG`, default `warn,philotes=info`).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,philotes=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Starts `philotes run -f file` with its output appended to `log` and `env` set.
pub fn run_philotes(file: &Path, log: &Path, env: &[(&str, &str)]) -> std::process::Child {
    run_philotes_with(file, log, env, &[])
}

/// Waits up to `timeout` for `child` to exit; None if it is still running.
pub async fn wait_exit(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let started = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if started.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// [`run_philotes`] with more arguments for `run`.
pub fn run_philotes_with(
    file: &Path,
    log: &Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> std::process::Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_philotes"))
        .args(["run", "-f"])
        .arg(file)
        .args(["--health-addr", "127.0.0.1:0"])
        .args(args)
        .env("RUST_LOG", "warn,philotes=info")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::from(out.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(out))
        .spawn()
        .unwrap()
}

/// Every row of `table` as text, ordered by `order` (what a comparison of full contents needs).
pub async fn dump(client: &tokio_postgres::Client, table: &str, order: &str) -> String {
    client
        .query_one(
            &format!(
                "SELECT coalesce(string_agg(t::text, E'\\n' ORDER BY {order}), '') FROM {table} t"
            ),
            &[],
        )
        .await
        .map(|r| r.get::<_, String>(0))
        .unwrap_or_else(|e| format!("<error: {e}>"))
}

pub async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// Waits until the sink table has the same rows as the source table.
pub async fn wait_same(
    src: &tokio_postgres::Client,
    src_table: &str,
    dst: &tokio_postgres::Client,
    dst_table: &str,
    order: &str,
    timeout: Duration,
) {
    let start = Instant::now();
    let want = dump(src, src_table, order).await;
    loop {
        let have = dump(dst, dst_table, order).await;
        if have == want {
            return;
        }
        if start.elapsed() > timeout {
            let w: Vec<&str> = want.lines().collect();
            let h: Vec<&str> = have.lines().collect();
            let first_diff = w.iter().zip(&h).position(|(a, b)| a != b);
            panic!(
                "{dst_table} did not match {src_table} within {timeout:?}: source {} rows, sink {} rows; first difference at {:?}: source {:?} sink {:?}",
                w.len(),
                h.len(),
                first_diff,
                first_diff.map(|i| w[i]),
                first_diff.map(|i| h[i]),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls `f` until it returns true.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !f().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A plain HTTP GET: status code and body (0 when nothing answers).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return (0, String::new());
    };
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let code = buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Asserts that the pipeline's connections to `src` (reader, source, sink, buffer writer) are all
/// there and all encrypted (`pg_stat_ssl`).
pub async fn assert_pipeline_connections_use_tls(src: &tokio_postgres::Client) {
    let rows = src
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE 'philotes-%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for app in [
        "philotes-reader",
        "philotes-source",
        "philotes-sink",
        "philotes-buffer-writer",
    ] {
        assert!(
            seen.iter().any(|(a, _)| a == app),
            "{app} not connected: {seen:?}"
        );
    }
    assert!(
        seen.iter().all(|(_, ssl)| *ssl),
        "a connection without TLS: {seen:?}"
    );
}
