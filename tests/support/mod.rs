//! Test support: a throwaway PostgreSQL cluster per test (initdb into a temp dir, wal_level=logical, a
//! free port on 127.0.0.1, SCRAM passwords), and helpers to compare tables.
#![allow(dead_code)]

pub mod k8s;
pub mod pipeline;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const USER: &str = "philotes";
pub const PASSWORD: &str = "philotes-test-pw";

pub struct Pg {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    as_postgres: bool,
}

fn bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return p;
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .filter(|p| p.join("initdb").exists())
        .expect("PostgreSQL server binaries (initdb) not found: apt-get install postgresql")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Pg {
    /// Starts a new cluster. PostgreSQL refuses to run as root, so under root it runs as `postgres`.
    pub fn start() -> Pg {
        Self::start_with(false)
    }

    /// A cluster that also accepts TLS (`ssl = on`, a self-signed certificate made with openssl).
    pub fn start_tls() -> Pg {
        Self::start_with(true)
    }

    /// A cluster with `extra` appended to its postgresql.conf.
    pub fn start_conf(extra: &str) -> Pg {
        let pg = Self::start_with(false);
        let path = pg.data().join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(extra);
        all.push('\n');
        std::fs::write(&path, all).unwrap();
        pg.stop_server();
        pg.start_server();
        pg
    }

    fn start_with(tls: bool) -> Pg {
        let bindir = bindir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("philotes-pg-")
            .tempdir()
            .unwrap()
            .keep();
        std::fs::create_dir_all(dir.join("data")).unwrap();
        std::fs::write(dir.join("pw"), PASSWORD).unwrap();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let pg = Pg {
            port: free_port(),
            dir,
            bindir,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                pg.data().to_str().unwrap(),
                "-U",
                USER,
                "--pwfile",
                pg.dir.join("pw").to_str().unwrap(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        );
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nwal_level = logical\nmax_replication_slots = 80\nmax_wal_senders = 80\nmax_connections = 300\nfsync = off\nfull_page_writes = off\nshared_buffers = 128MB\nwal_sender_timeout = 60s\n",
            pg.port,
            pg.dir.display()
        );
        let mut conf = conf;
        if tls {
            let data = pg.data();
            let ok = Command::new("openssl")
                .args([
                    "req",
                    "-new",
                    "-x509",
                    "-days",
                    "2",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                ])
                .arg("-keyout")
                .arg(data.join("server.key"))
                .arg("-out")
                .arg(data.join("server.crt"))
                .output()
                .unwrap();
            assert!(
                ok.status.success(),
                "openssl: {}",
                String::from_utf8_lossy(&ok.stderr)
            );
            if pg.as_postgres {
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(data.join("server.key"))
                    .arg(data.join("server.crt"))
                    .status()
                    .unwrap();
            }
            Command::new("chmod")
                .arg("600")
                .arg(data.join("server.key"))
                .status()
                .unwrap();
            conf.push_str("ssl = on\n");
        }
        let path = pg.data().join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path).unwrap();
        all.push_str(&conf);
        std::fs::write(&path, all).unwrap();
        pg.start_server();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let bin = self.bindir.join(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&bin)
                .args(args)
                .output()
        } else {
            Command::new(&bin).args(args).output()
        }
        .unwrap();
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start_server(&self) {
        let log = self.dir.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops the server (fast shutdown: sessions are cut, committed data stays).
    pub fn stop_server(&self) {
        self.run(
            "pg_ctl",
            &[
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    pub fn uri(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn uri_as(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    pub fn uri_with_password(&self, db: &str, password: &str) -> String {
        format!("postgres://{USER}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.uri(db), tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {db}: {e}"));
        tokio::spawn(conn);
        client
    }

    pub async fn create_db(&self, name: &str) {
        self.client("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let bin = self.bindir.join("pg_ctl");
        let data = self.data();
        let _ = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&bin)
                .args([
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-m",
                    "immediate",
                    "stop",
                ])
                .output()
        } else {
            Command::new(&bin)
                .args([
                    "-D",
                    data.to_str().unwrap_or_default(),
                    "-m",
                    "immediate",
                    "stop",
                ])
                .output()
        };
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
