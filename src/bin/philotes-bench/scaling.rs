//! The scaling phase (issue #11, "Scaling"): how throughput and CPU per change grow with
//! - the rows of the workload (the mixed workload of the main phases, 100k, 1M and 5M rows);
//! - the pipelines on one source (1, 4, 16; each on a table, publication and slot of its own, their
//!   workloads written at once so that their changes interleave in the WAL; 1M rows in all, shared
//!   among them; all pipelines in one Philotes process, one manifest);
//! - the width of the rows (~100 B, ~2 KB, ~100 KB: a key and one text value; inserts only; 200 MiB of
//!   values per point, at most 1,000,000 rows).
//!
//! Each point is measured as the main phases are, with the same functions: pg_recvlogical (one per
//! pipeline, at once), the native subscription (one per pipeline, at once) and Philotes end to end
//! with the default spec (durable buffer), all three on slots made before the workload, so on the
//! same WAL; the sinks (the native subscriptions' and Philotes') must equal the source, by count and
//! checksum, or the run fails. Afterwards the point's slots, tables and sink schemas are dropped.

use serde::Serialize;

use crate::{
    Ctx, EndToEnd, Load, Loaded, MB, Throughput, drop_slot, end_to_end, load_feeds, lsn_text,
    native, native_drop, reference, workload,
};

/// The points to measure.
pub struct Plan {
    /// Rows of each point of the rows dimension.
    pub rows: Vec<u64>,
    /// Pipelines of each point of the pipelines dimension.
    pub pipelines: Vec<usize>,
    /// Rows of each point of the pipelines dimension, shared among its pipelines.
    pub pipeline_rows: u64,
    /// Row widths (bytes) of the points of the width dimension.
    pub widths: Vec<u64>,
    /// Bytes of values of each point of the width dimension (rows = this / width, ≤ `width_rows_max`).
    pub width_bytes: u64,
    pub width_rows_max: u64,
    /// Whether to measure the native subscriptions too (`--skip scaling-native`: not).
    pub native: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// "rows", "pipelines" or "row width".
    pub dimension: String,
    /// e.g. "1000000 rows", "4 pipelines", "2048 B rows".
    pub point: String,
    pub pipelines: usize,
    /// Rows inserted in all.
    pub rows: u64,
    /// Bytes per row (the width dimension).
    pub width_bytes: Option<u64>,
    pub workload: workload::Workload,
    /// Bytes of the text values (the width dimension).
    pub value_bytes: Option<u64>,
    /// Philotes end to end: changes/s (all pipelines together).
    pub changes_per_s: f64,
    /// changes/s over pg_recvlogical's on the same WAL.
    pub ratio_to_reference: f64,
    /// changes/s over the native subscription's on the same WAL.
    pub ratio_to_native: Option<f64>,
    pub philotes_cpu_s_per_million: f64,
    /// CPU seconds of both PostgreSQL clusters during the Philotes run, per million changes.
    pub postgres_cpu_s_per_million: f64,
    pub wal_mb_per_s: f64,
    pub value_mb_per_s: Option<f64>,
    pub reference: Throughput,
    pub native: Option<Throughput>,
    pub philotes: Throughput,
}

/// Every point of the plan, into `out` as each is measured; dimensions named in `skip`
/// ("scaling-rows", "scaling-pipelines", "scaling-widths") are left out. The rows dimension goes last:
/// its largest point takes longest.
pub async fn run(
    ctx: &Ctx,
    plan: &Plan,
    skip: &dyn Fn(&str) -> bool,
    out: &mut Vec<Point>,
) -> anyhow::Result<()> {
    if !skip("scaling-pipelines") {
        for &n in &plan.pipelines {
            let rows = (plan.pipeline_rows / n.max(1) as u64).max(1);
            let p = point(
                ctx,
                plan,
                (
                    "pipelines",
                    format!("{n} pipeline{}", if n == 1 { "" } else { "s" }),
                    format!("_p{n}"),
                ),
                n,
                Load::Mixed(rows),
                None,
            )
            .await?;
            out.push(p);
        }
    }
    if !skip("scaling-widths") {
        for &width in &plan.widths {
            let rows = (plan.width_bytes / width.max(1)).clamp(1, plan.width_rows_max);
            let p = point(
                ctx,
                plan,
                ("row width", format!("{width} B rows"), format!("_w{width}")),
                1,
                Load::Wide { rows, width },
                Some(width),
            )
            .await?;
            out.push(p);
        }
    }
    if !skip("scaling-rows") {
        for &rows in &plan.rows {
            let p = point(
                ctx,
                plan,
                ("rows", format!("{rows} rows"), format!("_r{rows}")),
                1,
                Load::Mixed(rows),
                None,
            )
            .await?;
            out.push(p);
        }
    }
    Ok(())
}

async fn point(
    ctx: &Ctx,
    plan: &Plan,
    (dimension, name, label): (&str, String, String),
    n: usize,
    load: Load,
    width: Option<u64>,
) -> anyhow::Result<Point> {
    let src = ctx.cl.client("source").await?;
    let sink = ctx.sink_cluster().client("sink").await?;
    let tags: Vec<String> = if n == 1 {
        vec![label.clone()]
    } else {
        (1..=n).map(|k| format!("{label}_{k}")).collect()
    };
    eprintln!("scaling, {dimension}: {name} ({load:?} per table) ...");
    let l = load_feeds(
        ctx,
        &src,
        &label,
        &tags,
        &["bench_ref", "bench_e2e"],
        plan.native,
        load,
    )
    .await?;
    let w = l.total;
    eprintln!(
        "  {} changes in ~{} transactions, {:.0} MiB of WAL, {:.1}s; end {}",
        w.changes,
        w.transactions,
        w.wal_bytes as f64 / MB,
        w.seconds,
        lsn_text(w.end_lsn)
    );
    let reference = reference(ctx, &src, &l).await?;
    let native = if plan.native {
        let mut t = native(ctx, &src, &l).await?;
        native_drop(ctx, &l).await?;
        t.ratio_to_reference = Some(t.changes_per_s / reference.changes_per_s);
        t.ratio_to_native = Some(1.0);
        Some(t)
    } else {
        None
    };
    let mut philotes = end_to_end(ctx, &src, &sink, &l, EndToEnd::Postgres).await?;
    philotes.ratio_to_reference = Some(philotes.changes_per_s / reference.changes_per_s);
    philotes.ratio_to_native = native
        .as_ref()
        .map(|t| philotes.changes_per_s / t.changes_per_s);
    let value_bytes = match load {
        Load::Wide { .. } => {
            let mut b = 0;
            for (f, _) in &l.feeds {
                b += workload::wide_value_bytes(&src, &format!("public.{}", f.table)).await?;
            }
            Some(b)
        }
        Load::Mixed(_) => None,
    };
    cleanup(ctx, &src, &sink, &l).await?;
    let s = philotes.seconds;
    let p = Point {
        dimension: dimension.into(),
        point: name,
        pipelines: n,
        rows: w.inserts,
        width_bytes: width,
        workload: w,
        value_bytes,
        changes_per_s: philotes.changes_per_s,
        ratio_to_reference: philotes.ratio_to_reference.unwrap_or(0.0),
        ratio_to_native: philotes.ratio_to_native,
        philotes_cpu_s_per_million: philotes.client_cpu_s_per_million,
        postgres_cpu_s_per_million: philotes.postgres_cpu_s / (w.changes as f64 / 1e6),
        wal_mb_per_s: w.wal_bytes as f64 / MB / s,
        value_mb_per_s: value_bytes.map(|b| b as f64 / MB / s),
        reference,
        native,
        philotes,
    };
    eprintln!(
        "  {}: {:.0} changes/s, {:.2} × pg_recvlogical, {} × native, {:.2} Philotes CPU s per M changes",
        p.point,
        p.changes_per_s,
        p.ratio_to_reference,
        p.ratio_to_native.map_or("–".into(), |r| format!("{r:.2}")),
        p.philotes_cpu_s_per_million
    );
    Ok(p)
}

/// Drops what a point made: its slots, source tables and publications, sink schemas, and the
/// events its pipelines left in the buffer.
async fn cleanup(
    ctx: &Ctx,
    src: &tokio_postgres::Client,
    sink: &tokio_postgres::Client,
    l: &Loaded,
) -> anyhow::Result<()> {
    for (f, _) in &l.feeds {
        drop_slot(src, &f.named("bench_ref")).await?;
        drop_slot(src, &f.named("bench_e2e")).await?;
        src.batch_execute(&format!(
            "DROP PUBLICATION {}; DROP TABLE public.{}",
            f.publication, f.table
        ))
        .await?;
        sink.batch_execute(&format!("DROP SCHEMA {} CASCADE", f.named("replica")))
            .await?;
        src.execute(
            "DELETE FROM philotes.events WHERE pipeline_id = $1",
            &[&f.pipeline("bench-e2e")],
        )
        .await?;
    }
    for c in ctx.clusters() {
        c.client("postgres")
            .await?
            .batch_execute("CHECKPOINT")
            .await?;
    }
    Ok(())
}
