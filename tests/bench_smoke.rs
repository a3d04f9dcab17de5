//! The benchmark end to end with a tiny workload and short latency and idle phases, so that it keeps
//! working: it starts its own PostgreSQL, runs every phase and prints the table.

use std::process::Command;
use std::time::{Duration, Instant};

/// Runs the benchmark with `args` (and `--json` into a temp dir), which must succeed: its stdout, the
/// JSON it wrote, and how long it took.
fn bench(args: &[&str]) -> (String, serde_json::Value, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_philotes-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    let r = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (stdout, r, took)
}

#[test]
fn bench_runs_every_phase_with_a_tiny_workload() {
    let (stdout, r, took) = bench(&["--rows", "5000", "--quick"]);
    assert!(took < Duration::from_secs(90), "took {took:?}");

    // The table, with a row per measurement.
    for needle in [
        "| measurement | changes/s | × reference | × native |",
        "| reference: pg_recvlogical",
        "| native subscription (CREATE SUBSCRIPTION) |",
        "| Philotes reader + buffer (Paused) |",
        "| Philotes end to end → PostgreSQL sink |",
        "| Philotes end to end, bypassing the buffer → PostgreSQL sink |",
        "| latency at 1000 rows/s",
        "idle pipelines in one process",
        "| target | goal | measured | met |",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }

    let w = &r["workload"];
    assert_eq!(w["inserts"], 5000);
    assert!(w["changes"].as_u64().unwrap() > 5000);
    let phases = r["throughput"].as_array().unwrap();
    assert_eq!(phases.len(), 5, "{phases:?}");
    for t in phases {
        let name = t["name"].as_str().unwrap();
        assert_eq!(t["changes"], w["changes"], "{name}");
        for field in ["seconds", "changes_per_s", "ratio_to_reference"] {
            let v = t[field].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0, "{name}: {field} = {v}");
        }
        // CPU time is counted in 10 ms clock ticks: pg_recvlogical can drain 5000 rows in less.
        let cpu = t["client_cpu_s"].as_f64().unwrap_or(-1.0);
        assert!(cpu >= 0.0, "{name}: client_cpu_s = {cpu}");
        assert!(t["client_peak_rss_mb"].as_f64().unwrap() > 1.0, "{name}");
        if !name.starts_with("reference") {
            let v = t["ratio_to_native"].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0, "{name}: ratio_to_native = {v}");
        }
    }
    let targets = r["targets"].as_array().unwrap();
    assert!(
        targets.iter().any(|t| t["target"]
            .as_str()
            .unwrap()
            .contains("native subscription")),
        "{targets:?}"
    );
    assert!(
        targets
            .iter()
            .any(|t| t["what"].as_str().unwrap().contains("spec.buffer.bypass")),
        "{targets:?}"
    );
    let l = &r["latency"];
    assert!(l["rows"].as_u64().unwrap() > 0, "{l}");
    let (p50, p99) = (l["p50_ms"].as_f64().unwrap(), l["p99_ms"].as_f64().unwrap());
    assert!(p50 > 0.0 && p99 >= p50, "{l}");
    let i = &r["idle"];
    assert!(i["pipelines"].as_u64().unwrap() > 0, "{i}");
    assert!(i["philotes_rss_mb"].as_f64().unwrap() > 1.0, "{i}");
    assert!(i["philotes_cpu_s"].as_f64().unwrap() >= 0.0, "{i}");
    assert!(!r["targets"].as_array().unwrap().is_empty());
}

#[test]
fn bench_runs_end_to_end_into_iceberg() {
    let (stdout, r, _) = bench(&[
        "--rows",
        "5000",
        "--quick",
        "--sink",
        "iceberg",
        "--skip",
        "reader,latency,idle,big-txn,wide-rows",
    ]);
    assert!(
        stdout.contains("| Philotes end to end → Iceberg sink (file://) |"),
        "{stdout}"
    );
    // By name: the rows before it (pg_recvlogical, the native subscription) may change.
    let e2e = r["throughput"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"].as_str().unwrap_or_default().contains("Iceberg"))
        .unwrap_or_else(|| panic!("no Iceberg row in {r}"));
    assert!(
        e2e["note"]
            .as_str()
            .unwrap()
            .contains("Iceberg changelog rows = changes"),
        "{e2e}"
    );
    assert!(e2e["changes_per_s"].as_f64().unwrap() > 0.0, "{e2e}");
}

#[test]
fn bench_runs_the_scaling_phase_at_a_tiny_size() {
    let (stdout, r, took) = bench(&[
        "--quick",
        "--scaling",
        "--scaling-rows",
        "2000",
        "--scaling-pipelines",
        "2",
        "--scaling-pipeline-rows",
        "2000",
        "--scaling-widths",
        "100,20480",
        "--scaling-width-mib",
        "1",
        "--skip",
        "reference,native,e2e,bypass,reader,latency,idle,big-txn,wide-rows",
    ]);
    assert!(took < Duration::from_secs(90), "took {took:?}");
    for needle in [
        "| scaling: rows (end to end, default spec) |",
        "| scaling: pipelines (end to end, default spec) |",
        "| scaling: row width (end to end, default spec) |",
        "| 2 pipelines |",
        "| 20480 B rows |",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    let points = r["scaling"].as_array().unwrap();
    assert_eq!(points.len(), 4, "{points:?}");
    for p in points {
        let name = p["point"].as_str().unwrap();
        for field in [
            "changes_per_s",
            "ratio_to_reference",
            "ratio_to_native",
            "philotes_cpu_s_per_million",
            "wal_mb_per_s",
        ] {
            let v = p[field].as_f64().unwrap_or(-1.0);
            assert!(v > 0.0, "{name}: {field} = {v}");
        }
        let changes = &p["workload"]["changes"];
        for m in ["reference", "native", "philotes"] {
            assert_eq!(&p[m]["changes"], changes, "{name}: {m}");
        }
        assert!(
            p["philotes"]["note"]
                .as_str()
                .unwrap()
                .contains("sink = source"),
            "{name}: {p}"
        );
    }
    let two = points.iter().find(|p| p["pipelines"] == 2).unwrap();
    assert_eq!(two["workload"]["inserts"], 2000, "{two}");
    let wide = points.iter().find(|p| p["width_bytes"] == 20480).unwrap();
    assert!(wide["value_mb_per_s"].as_f64().unwrap() > 0.0, "{wide}");
}
