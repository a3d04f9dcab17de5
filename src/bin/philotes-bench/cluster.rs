//! A throwaway PostgreSQL cluster for the benchmark: initdb into a temp dir (as `postgres` via runuser
//! when running as root), wal_level=logical, a free port on 127.0.0.1. Durability settings (fsync,
//! synchronous_commit, full_page_writes, ...) keep their defaults; only capacity settings change.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

pub const USER: &str = "philotes";
pub const PASSWORD: &str = "philotes-bench-pw";

pub struct Cluster {
    pub port: u16,
    dir: PathBuf,
    bindir: PathBuf,
    as_postgres: bool,
    keep: bool,
}

pub fn bindir() -> anyhow::Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if p.join("initdb").exists() {
            return Ok(p);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
        .pop()
        .context("PostgreSQL server binaries (initdb) not found: apt-get install postgresql")
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl Cluster {
    /// Starts a cluster; `logical` sets wal_level=logical (the source), otherwise the WAL level stays
    /// at its default (a sink).
    pub fn start(name: &str, logical: bool, keep: bool) -> anyhow::Result<Cluster> {
        let bindir = bindir()?;
        let as_postgres = is_root();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "philotes-bench-{name}-{}-{}",
            std::process::id(),
            nanos % 1_000_000_000
        ));
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::write(dir.join("pw"), PASSWORD)?;
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()?;
            if !ok.success() {
                bail!("chown of {} to postgres failed", dir.display());
            }
        }
        let c = Cluster {
            port: free_port()?,
            dir,
            bindir,
            as_postgres,
            keep,
        };
        c.run(
            "initdb",
            &[
                "-D",
                c.data().to_str().unwrap_or_default(),
                "-U",
                USER,
                "--pwfile",
                c.dir.join("pw").to_str().unwrap_or_default(),
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        // Capacity only: 50 idle pipelines need ~350 connections and 50+ slots. Durability (fsync,
        // synchronous_commit, full_page_writes, wal_sync_method) and memory settings stay default.
        let conf = format!(
            "\n# philotes-bench\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n{}max_connections = 500\n",
            c.port,
            c.dir.display(),
            if logical {
                "wal_level = logical\nmax_replication_slots = 100\nmax_wal_senders = 100\n"
            } else {
                ""
            }
        );
        let path = c.data().join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path)?;
        all.push_str(&conf);
        std::fs::write(&path, all)?;
        c.pg_ctl(&["start"])?;
        Ok(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn bin(&self, tool: &str) -> PathBuf {
        self.bindir.join(tool)
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let bin = self.bin(tool);
        let out = if self.as_postgres {
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(&bin)
                .args(args)
                .output()
        } else {
            Command::new(&bin).args(args).output()
        }
        .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn pg_ctl(&self, action: &[&str]) -> anyhow::Result<()> {
        let log = self.dir.join("postgresql.log");
        let data = self.data();
        let mut args = vec![
            "-D",
            data.to_str().unwrap_or_default(),
            "-l",
            log.to_str().unwrap_or_default(),
            "-w",
            "-t",
            "120",
        ];
        args.extend_from_slice(action);
        self.run("pg_ctl", &args)
    }

    /// Restarts the server (fast shutdown), e.g. after ALTER SYSTEM of a restart-only setting.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-m", "fast", "restart"])
    }

    pub fn uri(&self, db: &str) -> String {
        format!("postgres://{USER}:{PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// libpq connection string (for pg_recvlogical; the password goes in PGPASSWORD).
    pub fn conninfo(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={USER} dbname={db}", self.port)
    }

    pub async fn client(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.uri(db), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {db}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The postmaster's pid (first line of postmaster.pid).
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.pg_ctl(&["-m", "immediate", "stop"]);
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
