//! The source workload: a realistic table (bigint key, ints, numeric, text, timestamptz, jsonb), filled
//! as large transactions and as many small ones (1–10 rows), then an update and a delete mix.

use std::time::Instant;

use anyhow::Context;
use tokio_postgres::Client;

/// Columns of the benchmark tables.
pub const COLUMNS: &str = "id, account_id, qty, price, name, note, created_at, attrs";

pub fn create_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, account_id int NOT NULL, qty int NOT NULL, price numeric(12,2) NOT NULL,
           name text NOT NULL, note text, created_at timestamptz NOT NULL, attrs jsonb)"
    )
}

/// The row for key `g` (about 240 bytes of text output, a third of it jsonb).
pub const ROW: &str = "g, (g * 7919 % 100000)::int, (g % 100)::int, round((g % 100000) / 100.0 + 0.99, 2), 'item-' || g,
    md5(g::text) || ' ' || md5((g * 31)::text), timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
    jsonb_build_object('color', (ARRAY['red', 'green', 'blue'])[g % 3 + 1], 'size', g % 50,
      'tags', jsonb_build_array('a' || g % 10, 'b' || g % 7), 'active', g % 2 = 0, 'score', (g % 997) / 7.0)";

const UPDATE_SET: &str =
    "qty = qty + 1, price = price + 1.25, attrs = attrs || '{\"updated\": true}'::jsonb";

/// Procedures that commit every 1–10 rows of `table` (PL/pgSQL transaction control), named after it.
fn procedures(table: &str) -> String {
    format!(
        r#"
-- `commits` returns how many transactions it committed.
CREATE PROCEDURE bench_small_inserts_{table}(lo bigint, hi bigint, INOUT commits bigint) LANGUAGE plpgsql AS $$
DECLARE i bigint := lo; n int;
BEGIN
  commits := 0;
  WHILE i <= hi LOOP
    n := least(1 + floor(random() * 10)::int, hi - i + 1);
    INSERT INTO {table} SELECT {ROW} FROM generate_series(i, i + n - 1) g;
    COMMIT;
    commits := commits + 1;
    i := i + n;
  END LOOP;
END $$;
-- Updates (or deletes) of the keys in [lo, hi] with key % step = rem, 1–10 keys per transaction.
CREATE PROCEDURE bench_small_changes_{table}(lo bigint, hi bigint, step int, rem int, del boolean, INOUT commits bigint) LANGUAGE plpgsql AS $$
DECLARE c bigint := lo + ((rem - lo % step) + step) % step; n int;
BEGIN
  commits := 0;
  WHILE c <= hi LOOP
    n := 1 + floor(random() * 10)::int;
    IF del THEN
      DELETE FROM {table} WHERE id BETWEEN c AND least(hi, c + (n - 1) * step) AND id % step = rem;
    ELSE
      UPDATE {table} SET {UPDATE_SET} WHERE id BETWEEN c AND least(hi, c + (n - 1) * step) AND id % step = rem;
    END IF;
    COMMIT;
    commits := commits + 1;
    c := c + n * step;
  END LOOP;
END $$;
"#
    )
}

/// What the workload wrote.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Workload {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    /// Row changes a consumer sees: inserts + updates + deletes.
    pub changes: u64,
    pub transactions: u64,
    /// `pg_current_wal_insert_lsn()` read inside the last workload transaction, after its last change.
    /// Every earlier transaction ends before it and the last one ends after it, so a consumer has
    /// everything exactly when it has a commit ending beyond this position.
    pub end_lsn: u64,
    /// `pg_current_wal_insert_lsn()` right after the last workload transaction committed: at or after
    /// the end of its commit record (a consumer that has decoded up to here has seen that commit).
    pub commit_end_lsn: u64,
    pub wal_bytes: u64,
    pub seconds: f64,
}

/// Keys in 1..=n with key % m == r (0 < r < m).
fn count_mod(n: u64, m: u64, r: u64) -> u64 {
    if n < r { 0 } else { (n - r) / m + 1 }
}

/// Table `public.{table}` (a plain name) and its workload procedures.
pub async fn prepare(src: &Client, table: &str) -> anyhow::Result<()> {
    src.batch_execute(&create_table(&format!("public.{table}")))
        .await?;
    // Autovacuum would race the workload for the same CPU and write WAL of its own; the consumers read
    // the same WAL either way, so turning it off for this table keeps runs comparable.
    src.batch_execute(&format!(
        "ALTER TABLE public.{table} SET (autovacuum_enabled = off)"
    ))
    .await?;
    src.batch_execute(&procedures(table)).await?;
    Ok(())
}

fn lsn(s: &str) -> u64 {
    philotes::engine::pg::parse_lsn(s).unwrap_or(0)
}

/// Generates, in table `public.{table}` made by [`prepare`], `rows` inserts, then updates of a tenth and deletes of a twentieth of them; half of each in
/// large transactions, half in transactions of 1–10 rows. The generator's own session commits
/// asynchronously (only its speed changes; the server's durability settings do not) and the WAL is
/// flushed before this returns.
pub async fn generate(
    src: &Client,
    table: &str,
    rows: u64,
    quiet: bool,
) -> anyhow::Result<Workload> {
    let started = Instant::now();
    let start_lsn: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    src.batch_execute("SET synchronous_commit = off; SELECT setseed(0.42)")
        .await?;
    let half = rows / 2;
    let big = 10_000u64;
    let mut txns = 0u64;
    let step = |what: &str| {
        if !quiet {
            eprintln!(
                "  workload: {what} ({:.1}s)",
                started.elapsed().as_secs_f64()
            )
        }
    };

    // 1. Large insert transactions: keys 1..=half, 10,000 rows each.
    let mut lo = 1;
    while lo <= half {
        let hi = (lo + big - 1).min(half);
        src.batch_execute(&format!(
            "INSERT INTO {table} SELECT {ROW} FROM generate_series({lo}::bigint, {hi}) g"
        ))
        .await?;
        txns += 1;
        lo = hi + 1;
    }
    step("large inserts");
    // 2. Small insert transactions: keys half+1..=rows, 1–10 rows each.
    if rows > half {
        txns += small(
            src,
            &format!("bench_small_inserts_{table}($1, $2, 0)"),
            half + 1,
            rows,
        )
        .await?;
    }
    step("small inserts");
    // 3. Updates of keys ≡ 3 (mod 10): large transactions over the first half, small over the second.
    let mut lo = 1;
    while lo <= half {
        let hi = (lo + big - 1).min(half);
        src.batch_execute(&format!(
            "UPDATE {table} SET {UPDATE_SET} WHERE id BETWEEN {lo} AND {hi} AND id % 10 = 3"
        ))
        .await?;
        txns += 1;
        lo = hi + 1;
    }
    if rows > half {
        txns += small(
            src,
            &format!("bench_small_changes_{table}($1, $2, 10, 3, false, 0)"),
            half + 1,
            rows,
        )
        .await?;
    }
    step("updates");
    // 4. Deletes of keys ≡ 7 (mod 20), the same way.
    let mut lo = 1;
    while lo <= half {
        let hi = (lo + 2 * big - 1).min(half);
        src.batch_execute(&format!(
            "DELETE FROM {table} WHERE id BETWEEN {lo} AND {hi} AND id % 20 = 7"
        ))
        .await?;
        txns += 1;
        lo = hi + 1;
    }
    if rows > half {
        txns += small(
            src,
            &format!("bench_small_changes_{table}($1, $2, 20, 7, true, 0)"),
            half + 1,
            rows,
        )
        .await?;
    }
    step("deletes");

    // 5. The last transaction: one more update, and the WAL position after it, before its commit.
    src.batch_execute("SET synchronous_commit = on").await?;
    let tx_client = src;
    tx_client.batch_execute("BEGIN").await?;
    tx_client
        .batch_execute(&format!("UPDATE {table} SET {UPDATE_SET} WHERE id = 2"))
        .await?;
    let end: String = tx_client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    tx_client.batch_execute("COMMIT").await?;
    txns += 1;
    let commit_end: String = src
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    // Everything committed asynchronously before is flushed once the synchronous commit returns.
    let flushed: String = src
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0);
    let end_lsn = lsn(&end);
    anyhow::ensure!(lsn(&flushed) > end_lsn, "WAL not flushed past the workload");

    let (inserts, updates, deletes) = (rows, count_mod(rows, 10, 3) + 1, count_mod(rows, 20, 7));
    let have: i64 = src
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await?
        .get(0);
    anyhow::ensure!(
        have as u64 == inserts - deletes,
        "workload left {have} rows, expected {}",
        inserts - deletes
    );
    Ok(Workload {
        inserts,
        updates,
        deletes,
        changes: inserts + updates + deletes,
        transactions: txns,
        end_lsn,
        commit_end_lsn: lsn(&commit_end),
        wal_bytes: end_lsn - lsn(&start_lsn),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// `CALL {call}` of a small-transaction procedure over keys lo..=hi: the transactions it committed.
async fn small(src: &Client, call: &str, lo: u64, hi: u64) -> anyhow::Result<u64> {
    let row = src
        .query_one(&format!("CALL {call}"), &[&(lo as i64), &(hi as i64)])
        .await
        .with_context(|| format!("CALL {call}"))?;
    Ok(row.get::<_, i64>(0) as u64)
}

/// count(*) and a checksum of every row's text form, for comparing source and sink.
pub async fn checksum(client: &Client, table: &str) -> anyhow::Result<(i64, String)> {
    checksum_of(client, table, COLUMNS).await
}

/// count(*) and a checksum of the text form of `columns` of every row.
pub async fn checksum_of(
    client: &Client,
    table: &str,
    columns: &str,
) -> anyhow::Result<(i64, String)> {
    let row = client
        .query_one(
            &format!(
                "SELECT count(*), coalesce(sum(hashtextextended(ROW({columns})::text, 7)), 0)::text FROM {table}"
            ),
            &[],
        )
        .await
        .with_context(|| format!("checksum of {table}"))?;
    Ok((row.get(0), row.get(1)))
}

/// Columns of the tables of the row-width workload ([`generate_wide`]).
pub const WIDE_COLUMNS: &str = "id, v";

pub fn create_wide_table(name: &str) -> String {
    format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, v text NOT NULL);
         ALTER TABLE {name} SET (autovacuum_enabled = off)"
    )
}

/// Inserts `rows` rows of about `width` bytes each (the key and a text of `width` − 8 bytes of md5
/// hex of the key, which pglz does not shrink) into `public.{table}` made by [`create_wide_table`], in
/// transactions of about 2 MiB (1–10,000 rows), committed as [`generate`] commits.
pub async fn generate_wide(
    src: &Client,
    table: &str,
    rows: u64,
    width: u64,
) -> anyhow::Result<Workload> {
    let started = Instant::now();
    let start_lsn = insert_lsn(src).await?;
    let text = width.saturating_sub(8).max(1);
    let per_txn = (2 * 1024 * 1024 / width.max(1)).clamp(1, 10_000);
    src.batch_execute("SET synchronous_commit = off").await?;
    let (mut lo, mut txns, mut end_lsn) = (1u64, 0u64, 0u64);
    while lo <= rows {
        let hi = (lo + per_txn - 1).min(rows);
        let last = hi == rows;
        if last {
            src.batch_execute("SET synchronous_commit = on").await?;
        }
        src.batch_execute("BEGIN").await?;
        src.batch_execute(&format!(
            "INSERT INTO {table} SELECT g, (SELECT left(string_agg(md5(g || ':' || k), ''), {text})
               FROM generate_series(1, {}) k) FROM generate_series({lo}::bigint, {hi}) g",
            text.div_ceil(32)
        ))
        .await?;
        if last {
            end_lsn = insert_lsn(src).await?;
        }
        src.batch_execute("COMMIT").await?;
        txns += 1;
        lo = hi + 1;
    }
    let commit_end_lsn = insert_lsn(src).await?;
    let flushed: String = src
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await?
        .get(0);
    anyhow::ensure!(lsn(&flushed) > end_lsn, "WAL not flushed past the workload");
    Ok(Workload {
        inserts: rows,
        updates: 0,
        deletes: 0,
        changes: rows,
        transactions: txns,
        end_lsn,
        commit_end_lsn,
        wal_bytes: end_lsn - start_lsn,
        seconds: started.elapsed().as_secs_f64(),
    })
}

async fn insert_lsn(c: &Client) -> anyhow::Result<u64> {
    let s: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(lsn(&s))
}

/// Octets of the values of a row-width table (`sum(octet_length(v))`).
pub async fn wide_value_bytes(c: &Client, table: &str) -> anyhow::Result<u64> {
    let n: i64 = c
        .query_one(
            &format!("SELECT coalesce(sum(octet_length(v)), 0)::int8 FROM {table}"),
            &[],
        )
        .await?
        .get(0);
    Ok(n as u64)
}
