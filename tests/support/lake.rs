//! Iceberg tables read back: the venv's Python, and `tests/iceberg/check.py` (pyiceberg and,
//! optionally, DuckDB) comparing a table's current state, computed from its changelog, with the
//! source. Shared by the standalone (`tests/iceberg.rs`) and operator (`tests/operator.rs`) tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use super::Pg;

/// The venv's Python: `PHILOTES_PYTHON`, or the venv `scripts/test.sh` makes for the current
/// requirements file.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("PHILOTES_PYTHON") {
        return PathBuf::from(p);
    }
    let req = std::fs::read("scripts/iceberg-requirements.txt").unwrap();
    let hash = format!("{:x}", Sha256::digest(&req));
    let home = std::env::var("HOME").unwrap_or_default();
    let cache = std::env::var("PHILOTES_CACHE").unwrap_or(format!("{home}/.cache/philotes"));
    let p = PathBuf::from(format!("{cache}/venv-{}/bin/python", &hash[..12]));
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh (it provisions the venv) or set PHILOTES_PYTHON",
        p.display()
    );
    p
}

/// A `postgresql+psycopg2://` URI (what pyiceberg's SQL catalog takes) from a `postgres://` one.
pub fn sqlalchemy(uri: &str) -> String {
    uri.replacen("postgres://", "postgresql+psycopg2://", 1)
}

/// Where a pipeline's Iceberg tables are. The SQL catalog is in database `shop`, the source's (the
/// buffer database, which holds the catalog, defaults to the source database).
pub struct Lake {
    pub warehouse: String,
    /// endpoint, access key id, secret access key
    pub s3: Option<(String, String, String)>,
}

/// A `file://` warehouse in `dir/warehouse` (created).
pub fn file_lake(dir: &Path) -> Lake {
    let wh = dir.join("warehouse");
    std::fs::create_dir_all(&wh).unwrap();
    Lake {
        warehouse: format!("file://{}", wh.display()),
        s3: None,
    }
}

/// Runs `check.py` for `table` (`cdc.<name>`) against `query` on the source.
pub fn check(pg: &Pg, lake: &Lake, table: &str, query: &str, duckdb: bool) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg("tests/iceberg/check.py")
        .args(["--catalog-uri", &sqlalchemy(&pg.uri("shop"))])
        .args(["--warehouse", &lake.warehouse])
        .args(["--table", table])
        .args(["--source-dsn", &pg.uri("shop")])
        .args(["--source-query", query]);
    if let Some((e, k, s)) = &lake.s3 {
        cmd.args(["--s3", &format!("{e},{k},{s}")]);
    }
    if duckdb {
        cmd.arg("--duckdb");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        serde_json::json!({"error": format!("{stdout}{}", String::from_utf8_lossy(&out.stderr))})
    })
}

/// Polls [`check`] until the table's current state equals the source, then returns the report.
pub async fn wait_equal(
    pg: &Pg,
    lake: &Lake,
    table: &str,
    query: &str,
    duckdb: bool,
    timeout: Duration,
) -> Value {
    let start = Instant::now();
    loop {
        let r = check(pg, lake, table, query, duckdb);
        if r["equal"] == true && (!duckdb || r["duckdb_equal"] == true) {
            return r;
        }
        assert!(
            start.elapsed() < timeout,
            "{table} did not reach the source's state within {timeout:?}: {r}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
