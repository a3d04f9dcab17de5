//! A throwaway PostgreSQL cluster: initdb into a fresh temp dir (as `postgres` via runuser when running
//! as root, since PostgreSQL refuses to run as root), a free port on 127.0.0.1, SCRAM passwords over
//! TCP, trust over the cluster's own Unix socket directory.

use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, bail};

/// The superuser of every cluster.
pub const USER: &str = "philotes";

/// How to set a cluster up.
#[derive(Debug, Clone)]
pub struct Options {
    /// Part of the directory name: `philotes-<name>-...` in the temp dir.
    pub name: String,
    /// The password of [`USER`].
    pub password: String,
    /// `wal_level = logical` (a source); otherwise the WAL level keeps its default.
    pub logical: bool,
    /// `ssl = on`, with a self-signed certificate made by `openssl` (which must be installed).
    pub tls: bool,
    /// `ssl = on` with this certificate chain and key (PEM) instead of openssl's self-signed one.
    pub tls_pem: Option<(String, String)>,
    /// `fsync = off` and `full_page_writes = off`: fast, and unsafe if the machine crashes. For tests,
    /// never for measurements.
    pub unsafe_durability: bool,
    /// Lines appended to postgresql.conf after the launcher's own, so they win.
    pub conf: String,
    /// Keep the directory when the cluster is dropped (the server is stopped either way).
    pub keep: bool,
}

/// A logical-replication cluster with default durability, no TLS, nothing extra, removed when dropped.
impl Default for Options {
    fn default() -> Self {
        Self {
            name: "pg".into(),
            password: "philotes-pw".into(),
            logical: true,
            tls: false,
            tls_pem: None,
            unsafe_durability: false,
            conf: String::new(),
            keep: false,
        }
    }
}

/// A running cluster; dropping it stops the server (immediate shutdown) and removes its directory.
pub struct Cluster {
    port: u16,
    password: String,
    dir: PathBuf,
    bindir: PathBuf,
    as_postgres: bool,
    keep: bool,
}

/// The directory of the PostgreSQL server binaries: `pg_config --bindir`, else the newest under
/// /usr/lib/postgresql.
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

/// A TCP port on 127.0.0.1 that was free a moment ago.
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

/// Creates a new, empty directory `philotes-<name>-<pid>-<n>` in the temp dir, private to its owner.
fn fresh_dir(name: &str) -> anyhow::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("philotes-{name}-{}-{n}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            // Left behind by an earlier process with the same pid.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
        }
    }
}

impl Cluster {
    /// Creates the cluster and starts its server.
    pub fn start(opts: &Options) -> anyhow::Result<Cluster> {
        let bindir = bindir()?;
        let as_postgres = is_root();
        let dir = fresh_dir(&opts.name)?;
        let c = Cluster {
            port: free_port()?,
            password: opts.password.clone(),
            dir,
            bindir,
            as_postgres,
            keep: opts.keep,
        };
        // From here on, dropping `c` cleans up.
        std::fs::create_dir(c.data())?;
        std::fs::write(c.dir.join("pw"), &opts.password)?;
        if as_postgres {
            c.chown(&["-R"], &[&c.dir])?;
        }
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
        let mut conf = format!(
            "\n# philotes testkit\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
            c.port,
            c.dir.display()
        );
        if opts.logical {
            conf.push_str("wal_level = logical\n");
        }
        if opts.unsafe_durability {
            conf.push_str("fsync = off\nfull_page_writes = off\n");
        }
        if let Some((crt, key)) = &opts.tls_pem {
            c.write_certificate(crt, key)?;
            conf.push_str("ssl = on\n");
        } else if opts.tls {
            c.make_certificate()?;
            conf.push_str("ssl = on\n");
        }
        conf.push_str(&opts.conf);
        if !conf.ends_with('\n') {
            conf.push('\n');
        }
        let path = c.data().join("postgresql.conf");
        let mut all = std::fs::read_to_string(&path)?;
        all.push_str(&conf);
        std::fs::write(&path, all)?;
        c.start_server()?;
        Ok(c)
    }

    /// A self-signed certificate for localhost, as server.crt and server.key in the data directory.
    fn make_certificate(&self) -> anyhow::Result<()> {
        let data = self.data();
        let (key, crt) = (data.join("server.key"), data.join("server.crt"));
        let out = Command::new("openssl")
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
            .arg(&key)
            .arg("-out")
            .arg(&crt)
            .output()
            .context("running openssl")?;
        if !out.status.success() {
            bail!("openssl: {}", String::from_utf8_lossy(&out.stderr));
        }
        self.protect_key(&key, &crt)
    }

    /// Writes `crt` and `key` (PEM) as server.crt and server.key in the data directory.
    fn write_certificate(&self, crt: &str, key: &str) -> anyhow::Result<()> {
        let data = self.data();
        let (key_path, crt_path) = (data.join("server.key"), data.join("server.crt"));
        std::fs::write(&crt_path, crt)?;
        std::fs::write(&key_path, key)?;
        self.protect_key(&key_path, &crt_path)
    }

    /// The server's key readable by the server's user only, as PostgreSQL demands.
    fn protect_key(&self, key: &Path, crt: &Path) -> anyhow::Result<()> {
        if self.as_postgres {
            self.chown(&[], &[key, crt])?;
        }
        let ok = Command::new("chmod").arg("600").arg(key).status()?;
        if !ok.success() {
            bail!("chmod 600 {} failed", key.display());
        }
        Ok(())
    }

    fn chown(&self, flags: &[&str], paths: &[&Path]) -> anyhow::Result<()> {
        let ok = Command::new("chown")
            .args(flags)
            .arg("postgres:postgres")
            .args(paths)
            .status()
            .context("running chown")?;
        if !ok.success() {
            bail!("chown of {paths:?} to postgres failed");
        }
        Ok(())
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory: the data directory, the server log and the socket live in it.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A PostgreSQL program of the same installation (`pg_recvlogical`, `psql`, ...).
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

    /// Starts the server again after [`stop_server`](Self::stop_server).
    pub fn start_server(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["start"])
    }

    /// Stops the server (fast shutdown: sessions are cut, committed data stays).
    pub fn stop_server(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-m", "fast", "stop"])
    }

    /// Stops the server as a crash would (immediate shutdown: no checkpoint, recovery on start).
    pub fn stop_server_immediate(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-m", "immediate", "stop"])
    }

    /// Restarts the server (fast shutdown), e.g. after ALTER SYSTEM of a restart-only setting.
    pub fn restart(&self) -> anyhow::Result<()> {
        self.pg_ctl(&["-m", "fast", "restart"])
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// A URI as [`USER`].
    pub fn uri(&self, db: &str) -> String {
        self.uri_as(USER, &self.password, db)
    }

    pub fn uri_as(&self, user: &str, password: &str, db: &str) -> String {
        format!("postgres://{user}:{password}@127.0.0.1:{}/{db}", self.port)
    }

    /// A libpq connection string as [`USER`], without the password (for PostgreSQL's own programs;
    /// pass it in PGPASSWORD).
    pub fn conninfo(&self, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={USER} dbname={db}", self.port)
    }

    /// A plain (no TLS) connection as [`USER`]; its connection task is spawned on the runtime.
    pub async fn client(&self, db: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.uri(db), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to {db}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The postmaster's pid (first line of postmaster.pid), while the server runs.
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
