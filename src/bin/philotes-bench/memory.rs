//! Memory phases, each on a slot and pipeline of its own, end to end into the sink with the default
//! spec, after the data is in the WAL (as the end-to-end phase):
//! - big-txn: ONE source transaction of many benchmark rows (2,000,000 by default, ~500 MiB of WAL),
//!   which the sink must receive in one transaction although it is many batches long;
//! - wide-rows: rows each carrying one 20 MiB value, a `bytea` (its text form, hex, is 40 MiB) or a
//!   `text`, in transactions of 1–8 of them.
//!
//! What they measure is the Philotes process's peak RSS (VmHWM), besides time and rate; the sink must
//! equal the source at the end. VmRSS is sampled every 100 ms too (`rss_timeline` in the JSON), to see
//! when the peak comes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use philotes::engine::pg::lsn_text;
use serde::Serialize;
use tokio_postgres::Client;

use crate::child::{Pipelines, Spec};
use crate::{Ctx, LONG, MB, checkpoint, procstat, sessions_cpu, wait_for, workload};

#[derive(Debug, Clone, Serialize)]
pub struct MemoryPhase {
    /// "big-txn" or "wide-rows".
    pub phase: String,
    pub name: String,
    /// Row changes (inserts) streamed.
    pub rows: u64,
    pub transactions: u64,
    /// Rows of the largest transaction.
    pub largest_transaction_rows: u64,
    /// WAL written by the phase's transactions.
    pub wal_bytes: u64,
    /// Bytes of the wide values (octet_length), wide-rows only.
    pub value_bytes: Option<u64>,
    /// Seconds the source took to write the data (not measured against Philotes).
    pub generate_seconds: f64,
    /// From the start of the Philotes process until the sink committed the last change.
    pub seconds: f64,
    /// From the start of the Philotes process until the buffer held the last transaction.
    pub read_seconds: f64,
    pub changes_per_s: f64,
    pub wal_mb_per_s: f64,
    /// MiB of wide values per second, wide-rows only.
    pub value_mb_per_s: Option<f64>,
    pub philotes_cpu_s: f64,
    pub philotes_peak_rss_mb: f64,
    /// When the highest VmRSS sample was taken, seconds after the process started.
    pub peak_sample_at_s: f64,
    /// CPU seconds of both PostgreSQL clusters meanwhile.
    pub postgres_cpu_s: f64,
    /// CPU seconds other processes used meanwhile (see `Throughput::other_cpu_s`).
    pub other_cpu_s: f64,
    pub postgres_cpu_by_session: Vec<(String, f64)>,
    /// (seconds since the process started, VmRSS MiB), every 100 ms.
    pub rss_timeline: Vec<(f64, f64)>,
    pub note: String,
}

/// Samples VmRSS of a process every 100 ms until stopped.
struct RssSampler {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<(f64, f64)>>,
}

impl RssSampler {
    fn start(pid: u32, since: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                if let Some(rss) = procstat::vm_bytes(pid, "VmRSS") {
                    let t = since.elapsed().as_secs_f64();
                    out.push((
                        (t * 10.0).round() / 10.0,
                        (rss as f64 / MB * 10.0).round() / 10.0,
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            out
        });
        Self { stop, task }
    }

    async fn finish(self) -> Vec<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or_default()
    }
}

/// Rows of the big-txn phase for a run of `rows` rows: twice the workload, at most 2,000,000; small
/// under --quick.
pub fn big_txn_rows(rows: u64, quick: bool) -> u64 {
    (2 * rows).clamp(1, if quick { 20_000 } else { 2_000_000 })
}

/// Transaction sizes of the wide-rows phase: 1, 2, 1, 4, 1, 8, 1, 3, 1, 6, … rows, `count` in all.
pub fn wide_transactions(count: u64) -> Vec<u64> {
    const PATTERN: [u64; 10] = [1, 2, 1, 4, 1, 8, 1, 3, 1, 6];
    let mut out = Vec::new();
    let mut left = count;
    for n in PATTERN.iter().cycle() {
        if left == 0 {
            break;
        }
        let n = (*n).min(left);
        out.push(n);
        left -= n;
    }
    out
}

async fn insert_lsn(c: &Client) -> anyhow::Result<u64> {
    let s: String = c
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0);
    Ok(philotes::engine::pg::parse_lsn(&s).unwrap_or(0))
}

/// (durable_lsn, processed_lsn, processed_ord) of a pipeline; None before the buffer exists.
async fn checkpoint_of(src: &Client, id: &str) -> Option<(u64, u64, i32)> {
    let row = src
        .query_opt(
            "SELECT durable_lsn, processed_lsn, processed_ord FROM philotes.pipelines WHERE pipeline_id = $1",
            &[&id],
        )
        .await
        .ok()??;
    Some((
        row.get::<_, i64>(0) as u64,
        row.get::<_, i64>(1) as u64,
        row.get(2),
    ))
}

/// Where the source data ends: `end_lsn` was read inside the last transaction after its last change
/// (so its commit record starts there or beyond, and every earlier commit ends before), which has
/// `last_rows` changes.
struct End {
    end_lsn: u64,
    last_rows: u64,
}

/// What a measurement of Philotes took, from its start until the sink committed the last change.
struct Measured {
    seconds: f64,
    read_seconds: f64,
    cpu: f64,
    rss: u64,
    pg: f64,
    other: f64,
    sessions: Vec<(String, f64)>,
    timeline: Vec<(f64, f64)>,
}

/// Runs one pipeline until the sink has the source's last transaction, sampling its RSS.
async fn stream(
    ctx: &Ctx,
    src: &Client,
    sink: &Client,
    spec: Spec<'_>,
    end: &End,
) -> anyhow::Result<Measured> {
    let id = spec.uid.to_string();
    let (pg0, busy0) = (ctx.pg_cpu(), procstat::machine_busy());
    let mut p: Pipelines = ctx.spawn(spec.name, &[spec])?;
    let sampler = RssSampler::start(p.pid, p.started);
    wait_for("durable_lsn past the source data", &mut p, LONG, || async {
        checkpoint_of(src, &id)
            .await
            .is_some_and(|(d, _, _)| d > end.end_lsn)
    })
    .await?;
    let read_seconds = p.started.elapsed().as_secs_f64();
    // The last transaction's events carry its commit LSN, which is end_lsn or beyond (the commit
    // record is the next record written), and ords 0..last_rows; every earlier commit is before.
    let last_ord = end.last_rows as i32 - 1;
    wait_for(
        "the sink to commit the last change",
        &mut p,
        LONG,
        || async {
            checkpoint_of(src, &id)
                .await
                .is_some_and(|(_, lsn, ord)| lsn >= end.end_lsn && ord >= last_ord)
        },
    )
    .await?;
    let seconds = p.started.elapsed().as_secs_f64();
    let (cpu, rss) = (p.cpu(), p.peak_rss());
    let pg = ctx.pg_cpu() - pg0;
    let other = (procstat::machine_busy() - busy0 - pg - cpu).max(0.0);
    let mut sessions = sessions_cpu(src, "philotes-").await;
    if ctx.sink_cl.is_some() {
        sessions.extend(sessions_cpu(sink, "philotes-").await);
        sessions.sort_by(|a, b| b.1.total_cmp(&a.1));
    }
    let timeline = sampler.finish().await;
    p.stop().await?;
    Ok(Measured {
        seconds,
        read_seconds,
        cpu,
        rss,
        pg,
        other,
        sessions,
        timeline,
    })
}

fn peak_at(timeline: &[(f64, f64)]) -> f64 {
    timeline
        .iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|x| x.0)
        .unwrap_or(0.0)
}

/// ONE source transaction of `rows` benchmark rows, end to end.
pub async fn big_txn(ctx: &Ctx, rows: u64) -> anyhow::Result<MemoryPhase> {
    let src = ctx.cl.client("source").await?;
    let sink = ctx.sink_cluster().client("sink").await?;
    src.batch_execute(&format!(
        "{}; ALTER TABLE public.big SET (autovacuum_enabled = off); CREATE PUBLICATION bench_big_pub FOR TABLE public.big",
        workload::create_table("public.big")
    ))
    .await?;
    src.execute(
        "SELECT pg_create_logical_replication_slot('bench_big', 'pgoutput')",
        &[],
    )
    .await?;
    eprintln!("big-txn: one transaction of {rows} rows ...");
    let started = Instant::now();
    let start_lsn = insert_lsn(&src).await?;
    src.batch_execute("BEGIN").await?;
    src.batch_execute(&format!(
        "INSERT INTO public.big SELECT {} FROM generate_series(1::bigint, {rows}) g",
        workload::ROW
    ))
    .await?;
    let end_lsn = insert_lsn(&src).await?;
    src.batch_execute("COMMIT").await?;
    let wal_bytes = insert_lsn(&src).await? - start_lsn;
    let generate_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "  {:.0} MiB of WAL, {generate_seconds:.1}s; end {}",
        wal_bytes as f64 / MB,
        lsn_text(end_lsn)
    );
    checkpoint(&src).await?;
    let m = stream(
        ctx,
        &src,
        &sink,
        Spec {
            name: "big-txn",
            uid: "bench-big-txn",
            paused: false,
            table: "public.big",
            publication: "bench_big_pub",
            slot: "bench_big",
            sink_schema: "replica_big",
            iceberg: None,
            extra: "",
        },
        &End {
            end_lsn,
            last_rows: rows,
        },
    )
    .await?;
    let want = workload::checksum(&src, "public.big").await?;
    let have = workload::checksum(&sink, "replica_big.big").await?;
    anyhow::ensure!(
        want == have,
        "big-txn: the sink does not match the source: source {want:?}, sink {have:?}"
    );
    anyhow::ensure!(
        want.0 as u64 == rows,
        "big-txn: the source has {} rows",
        want.0
    );
    crate::drop_slot(&src, "bench_big").await?;
    let r = MemoryPhase {
        phase: "big-txn".into(),
        name: format!("one transaction of {rows} rows"),
        rows,
        transactions: 1,
        largest_transaction_rows: rows,
        wal_bytes,
        value_bytes: None,
        generate_seconds,
        seconds: m.seconds,
        read_seconds: m.read_seconds,
        changes_per_s: rows as f64 / m.seconds,
        wal_mb_per_s: wal_bytes as f64 / MB / m.seconds,
        value_mb_per_s: None,
        philotes_cpu_s: m.cpu,
        philotes_peak_rss_mb: m.rss as f64 / MB,
        peak_sample_at_s: peak_at(&m.timeline),
        postgres_cpu_s: m.pg,
        other_cpu_s: m.other,
        postgres_cpu_by_session: m.sessions,
        rss_timeline: m.timeline,
        note: format!(
            "default spec; all in the buffer after {:.2}s; sink = source: {} rows, checksum {}",
            m.read_seconds, have.0, have.1
        ),
    };
    eprintln!(
        "  {:.2}s, {:.0} changes/s, peak RSS {:.0} MiB (buffer complete after {:.2}s)",
        r.seconds, r.changes_per_s, r.philotes_peak_rss_mb, r.read_seconds
    );
    Ok(r)
}

/// count(*) and an md5 over every row's key and the md5 of its wide values.
async fn wide_checksum(c: &Client, table: &str) -> anyhow::Result<(i64, String)> {
    let row = c
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg(id || ':' || coalesce(md5(b), '-') || ':' || coalesce(md5(t), '-'), ',' ORDER BY id)), '') FROM {table}"
            ),
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// `count` rows of one `mib` MiB value each (odd keys a bytea, even keys a text), end to end.
pub async fn wide_rows(ctx: &Ctx, count: u64, mib: u64) -> anyhow::Result<MemoryPhase> {
    let src = ctx.cl.client("source").await?;
    let sink = ctx.sink_cluster().client("sink").await?;
    src.batch_execute(
        "CREATE TABLE public.wide (id bigint PRIMARY KEY, kind text NOT NULL, b bytea, t text);
         ALTER TABLE public.wide SET (autovacuum_enabled = off);
         CREATE PUBLICATION bench_wide_pub FOR TABLE public.wide",
    )
    .await?;
    src.execute(
        "SELECT pg_create_logical_replication_slot('bench_wide', 'pgoutput')",
        &[],
    )
    .await?;
    let txns = wide_transactions(count);
    eprintln!(
        "wide-rows: {count} rows of a {mib} MiB value (bytea and text) in {} transactions of 1–{} rows ...",
        txns.len(),
        txns.iter().max().unwrap_or(&0)
    );
    // 16 random bytes per md5: random-ish, incompressible values (pglz leaves them as they are).
    let insert = src
        .prepare(
            "INSERT INTO public.wide SELECT $1::int8, CASE WHEN $1::int8 % 2 = 1 THEN 'bytea' ELSE 'text' END,
               CASE WHEN $1::int8 % 2 = 1 THEN (SELECT decode(string_agg(md5(random()::text), ''), 'hex') FROM generate_series(1, $2::int * 65536)) END,
               CASE WHEN $1::int8 % 2 = 0 THEN (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, $2::int * 32768)) END",
        )
        .await?;
    let started = Instant::now();
    let start_lsn = insert_lsn(&src).await?;
    let mut id = 0i64;
    let mut end_lsn = 0;
    for (k, n) in txns.iter().enumerate() {
        src.batch_execute("BEGIN").await?;
        for _ in 0..*n {
            id += 1;
            src.execute(&insert, &[&id, &(mib as i32)]).await?;
        }
        if k + 1 == txns.len() {
            end_lsn = insert_lsn(&src).await?;
        }
        src.batch_execute("COMMIT").await?;
    }
    let wal_bytes = insert_lsn(&src).await? - start_lsn;
    let generate_seconds = started.elapsed().as_secs_f64();
    let value_bytes: i64 = src
        .query_one(
            "SELECT coalesce(sum(coalesce(octet_length(b), 0) + coalesce(octet_length(t), 0)), 0)::int8 FROM public.wide",
            &[],
        )
        .await?
        .get(0);
    let value_bytes = value_bytes as u64;
    eprintln!(
        "  {:.0} MiB of values, {:.0} MiB of WAL, {generate_seconds:.1}s; end {}",
        value_bytes as f64 / MB,
        wal_bytes as f64 / MB,
        lsn_text(end_lsn)
    );
    checkpoint(&src).await?;
    let m = stream(
        ctx,
        &src,
        &sink,
        Spec {
            name: "wide-rows",
            uid: "bench-wide-rows",
            paused: false,
            table: "public.wide",
            publication: "bench_wide_pub",
            slot: "bench_wide",
            sink_schema: "replica_wide",
            iceberg: None,
            extra: "",
        },
        &End {
            end_lsn,
            last_rows: *txns.last().unwrap_or(&1),
        },
    )
    .await?;
    let want = wide_checksum(&src, "public.wide").await?;
    let have = wide_checksum(&sink, "replica_wide.wide").await?;
    anyhow::ensure!(
        want == have,
        "wide-rows: the sink does not match the source: source {want:?}, sink {have:?}"
    );
    anyhow::ensure!(
        want.0 as u64 == count,
        "wide-rows: the source has {} rows",
        want.0
    );
    crate::drop_slot(&src, "bench_wide").await?;
    let r = MemoryPhase {
        phase: "wide-rows".into(),
        name: format!(
            "{count} rows of a {mib} MiB value (bytea / text) in {} transactions",
            txns.len()
        ),
        rows: count,
        transactions: txns.len() as u64,
        largest_transaction_rows: *txns.iter().max().unwrap_or(&0),
        wal_bytes,
        value_bytes: Some(value_bytes),
        generate_seconds,
        seconds: m.seconds,
        read_seconds: m.read_seconds,
        changes_per_s: count as f64 / m.seconds,
        wal_mb_per_s: wal_bytes as f64 / MB / m.seconds,
        value_mb_per_s: Some(value_bytes as f64 / MB / m.seconds),
        philotes_cpu_s: m.cpu,
        philotes_peak_rss_mb: m.rss as f64 / MB,
        peak_sample_at_s: peak_at(&m.timeline),
        postgres_cpu_s: m.pg,
        other_cpu_s: m.other,
        postgres_cpu_by_session: m.sessions,
        rss_timeline: m.timeline,
        note: format!(
            "default spec; all in the buffer after {:.2}s; sink = source: {} rows, md5 {}",
            m.read_seconds, have.0, have.1
        ),
    };
    eprintln!(
        "  {:.2}s, {:.1} MiB/s of values, peak RSS {:.0} MiB (buffer complete after {:.2}s)",
        r.seconds,
        r.value_mb_per_s.unwrap_or(0.0),
        r.philotes_peak_rss_mb,
        r.read_seconds
    );
    Ok(r)
}
