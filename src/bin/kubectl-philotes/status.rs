//! `status`: one table row per pipeline, from the status the operator writes.

use kube::ResourceExt;
use philotes::crd::{CdcPipeline, Phase};

const HEADER: [&str; 9] = [
    "NAMESPACE",
    "NAME",
    "PHASE",
    "LAG",
    "WAL",
    "BUFFERED",
    "DEAD-LETTERED",
    "OWNER",
    "LAST ERROR",
];

/// Bytes for people: `512 B`, `4.0 KiB`, `1.5 GiB`.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n.abs() < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v.abs() < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// The error to show, with its fix: a Failed pipeline's message carries both ("...; fix: ...");
/// otherwise the last error (retried by the worker), else a WAL-at-risk warning.
fn last_error(p: &CdcPipeline) -> String {
    let Some(s) = &p.status else {
        return "-".into();
    };
    if s.phase == Some(Phase::Failed)
        && let Some(m) = &s.message
    {
        return m.clone();
    }
    if let Some(e) = &s.last_error {
        return e.clone();
    }
    s.conditions
        .iter()
        .find(|c| c.type_ == "WalAtRisk" && c.status == "True")
        .map_or_else(|| "-".into(), |c| c.message.clone())
}

fn row(p: &CdcPipeline) -> [String; 9] {
    let s = p.status.clone().unwrap_or_default();
    [
        p.namespace().unwrap_or_default(),
        p.name_any(),
        or_dash(s.phase),
        s.lag_bytes.map_or_else(|| "-".into(), bytes),
        or_dash(s.wal_status),
        or_dash(s.buffer_depth),
        or_dash(s.events_dead_lettered),
        or_dash(s.owner),
        last_error(p),
    ]
}

/// The table, columns padded as kubectl pads them; NAMESPACE only with `namespaces`.
pub fn table(pipelines: &[CdcPipeline], namespaces: bool) -> String {
    let skip = usize::from(!namespaces);
    let mut rows: Vec<Vec<String>> =
        vec![HEADER.iter().skip(skip).map(|h| h.to_string()).collect()];
    rows.extend(
        pipelines
            .iter()
            .map(|p| row(p).into_iter().skip(skip).collect()),
    );
    let columns = rows[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out.push_str(&backfills(pipelines));
    out
}

/// A line per table still being backfilled (added to a running pipeline).
fn backfills(pipelines: &[CdcPipeline]) -> String {
    let mut out = String::new();
    for p in pipelines {
        for b in p
            .status
            .iter()
            .flat_map(|s| &s.backfills)
            .filter(|b| !b.done)
        {
            out.push_str(&format!(
                "backfill {}/{} {}: {} of about {} rows copied\n",
                p.namespace().unwrap_or_default(),
                p.name_any(),
                b.table,
                b.rows_copied,
                b.rows_estimated
            ));
        }
    }
    out
}

pub fn any_failed(pipelines: &[CdcPipeline]) -> bool {
    pipelines
        .iter()
        .any(|p| p.status.as_ref().and_then(|s| s.phase) == Some(Phase::Failed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use philotes::crd::CdcPipelineStatus;

    fn pipeline(name: &str, status: CdcPipelineStatus) -> CdcPipeline {
        let mut p: CdcPipeline = serde_json::from_value(serde_json::json!({
            "apiVersion": "philotes.io/v1alpha1", "kind": "CdcPipeline",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {
                "source": {"connectionSecretRef": {"name": "db", "key": "uri"}, "tables": ["t"]},
                "sink": {"postgres": {"connectionSecretRef": {"name": "db", "key": "uri"}}}
            }
        }))
        .unwrap();
        p.status = Some(status);
        p
    }

    #[test]
    fn bytes_read_as_people_read_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
    }

    #[test]
    fn a_failed_pipeline_shows_its_error_with_the_fix_and_counts_as_failed() {
        let ok = pipeline(
            "orders",
            CdcPipelineStatus {
                phase: Some(Phase::Running),
                lag_bytes: Some(2048),
                wal_status: Some("reserved".into()),
                buffer_depth: Some(7),
                events_dead_lettered: Some(1),
                owner: Some("philotes-0".into()),
                ..Default::default()
            },
        );
        let failed = pipeline(
            "broken",
            CdcPipelineStatus {
                phase: Some(Phase::Failed),
                last_error: Some("password authentication failed".into()),
                message: Some("password authentication failed; fix: correct the Secret".into()),
                ..Default::default()
            },
        );
        assert!(!any_failed(std::slice::from_ref(&ok)));
        assert!(any_failed(&[ok.clone(), failed.clone()]));
        let t = table(&[ok, failed], false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(
            lines[0].starts_with("NAME ") && lines[0].ends_with("LAST ERROR"),
            "{t}"
        );
        assert!(!lines[0].contains("NAMESPACE"), "{t}");
        for cell in [
            "orders",
            "Running",
            "2.0 KiB",
            "reserved",
            "7",
            "1",
            "philotes-0",
        ] {
            assert!(lines[1].contains(cell), "{cell} missing: {t}");
        }
        assert!(
            lines[2].contains("Failed") && lines[2].ends_with("fix: correct the Secret"),
            "{t}"
        );
        // Columns line up: PHASE starts at the same offset in every line.
        let at: Vec<usize> = lines
            .iter()
            .map(|l| l.find(['R', 'F', 'P']).unwrap_or(0))
            .collect();
        assert!(at.iter().all(|&a| a == at[0]), "{t}");
        assert!(table(&[pipeline("x", Default::default())], true).starts_with("NAMESPACE"));
    }

    #[test]
    fn a_table_being_backfilled_shows_its_progress_under_the_table() {
        let b = |table: &str, done| philotes::crd::BackfillStatus {
            table: table.into(),
            rows_copied: 12000,
            rows_estimated: 30000,
            done,
        };
        let p = pipeline(
            "orders",
            CdcPipelineStatus {
                phase: Some(Phase::Running),
                backfills: vec![b("public.invoices", false), b("public.done", true)],
                ..Default::default()
            },
        );
        let t = table(&[p], false);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(
            lines[2],
            "backfill shop/orders public.invoices: 12000 of about 30000 rows copied"
        );
    }
}
