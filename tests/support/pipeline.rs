//! Pipelines in tests: manifests, validated configs, waiting for a phase.

use std::time::Duration;

use philotes::crd::DesiredState;
use philotes::engine::PipelineHandle;
use philotes::engine::Progress;
use philotes::engine::config::PipelineConfig;
use philotes::engine::state::Phase;
use philotes::standalone;

use super::Pg;

pub const WAIT: Duration = Duration::from_secs(60);

pub fn manifest(name: &str, source: &str, sink: &str, tables: &[&str], extra: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: source-db}}
stringData: {{uri: "{source}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: sink-db}}
stringData: {{uri: "{sink}"}}
---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: {name}}}
spec:
  source:
    connectionSecretRef: {{name: source-db, key: uri}}
    tables: [{tables}]
  sink:
    postgres: {{connectionSecretRef: {{name: sink-db, key: uri}}, schema: replica}}
{extra}
"#,
        tables = tables.join(", ")
    )
}

pub fn config(
    name: &str,
    source: &str,
    sink: &str,
    tables: &[&str],
    extra: &str,
) -> PipelineConfig {
    let m = standalone::parse(&manifest(name, source, sink, tables, extra)).unwrap();
    let mut all = standalone::configs(&m).unwrap();
    let (c, state) = all.remove(0);
    assert_ne!(state, DesiredState::Stopped);
    c
}

pub const FAST: &str = "  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 500ms}\n  buffer: {batchSize: 500, flushInterval: 200ms}\n  backpressure: {highWatermark: 100000, lowWatermark: 50000, checkInterval: 200ms}";

pub async fn wait_phase(h: &PipelineHandle, phase: Phase) -> Progress {
    let mut rx = h.progress();
    let r = tokio::time::timeout(WAIT, rx.wait_for(|p| p.phase == phase)).await;
    match r {
        Ok(Ok(p)) => p.clone(),
        _ => panic!("phase {phase} not reached; progress: {:?}", h.current()),
    }
}

pub async fn setup(pg: &Pg) -> (tokio_postgres::Client, tokio_postgres::Client) {
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    (pg.client("shop").await, pg.client("warehouse").await)
}

/// A manifest for `philotes run -f`: Secret `db` with `keys` (key, URI), and pipeline `name` capturing
/// `tables` from key `source` into schema `replica` of key `sink`, with `extra` spec lines (each
/// indented two spaces).
pub fn db_manifest(name: &str, keys: &[(&str, &str)], tables: &str, extra: &str) -> String {
    let data: Vec<String> = keys.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: db}}
stringData: {{{}}}
---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: {name}}}
spec:
  source: {{connectionSecretRef: {{name: db, key: source}}, tables: [{tables}]}}
  sink: {{postgres: {{connectionSecretRef: {{name: db, key: sink}}, schema: replica}}}}
{extra}
"#,
        data.join(", ")
    )
}

/// Writes `manifest` to `pipeline.yaml` in `dir`; returns it and the path for the process's log.
pub fn write_manifest(
    dir: &std::path::Path,
    manifest: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, manifest).unwrap();
    (file, dir.join("philotes.log"))
}
