//! `philotes run -f FILE`: runs the pipelines of a manifest file (CdcPipeline and Secret documents,
//! as a user would `kubectl apply` them) without Kubernetes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::crd::{CdcPipeline, DesiredState};
use crate::engine::config::PipelineConfig;
use crate::engine::metrics::Metrics;
use crate::engine::state::Phase;
use crate::health::{self, Health};
use crate::supervisor::{Action, Supervisor};
use crate::validate::{Identity, Secrets, validate};

#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Manifest(String),
    #[error("invalid pipeline {pipeline}:\n{errors}")]
    Invalid { pipeline: String, errors: String },
    #[error("health server: {0}")]
    Health(#[source] std::io::Error),
    #[error("listening for SIGHUP: {0}")]
    Signal(#[source] std::io::Error),
}

/// The documents of a manifest file.
#[derive(Debug, Default)]
pub struct Manifests {
    pub pipelines: Vec<CdcPipeline>,
    /// namespace → Secrets
    pub secrets: BTreeMap<String, Secrets>,
}

fn namespace_of(ns: &Option<String>) -> String {
    ns.clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into())
}

/// Parses a multi-document YAML file of CdcPipeline and Secret manifests.
pub fn parse(text: &str) -> Result<Manifests, StandaloneError> {
    let mut m = Manifests::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|e| StandaloneError::Manifest(format!("document {n}: not YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        match kind.as_str() {
            "CdcPipeline" => {
                // The path names the field, e.g. `spec.source: missing field `connectionSecretRef``. Unknown
                // fields (typos such as `retyr:`) are refused rather than silently ignored.
                let mut unknown = Vec::new();
                let mut track = serde_path_to_error::Track::new();
                let de = serde_path_to_error::Deserializer::new(value, &mut track);
                let parsed: Result<CdcPipeline, _> =
                    serde_ignored::deserialize(de, |path| unknown.push(path.to_string()));
                let p = parsed.map_err(|e| {
                    StandaloneError::Manifest(format!(
                        "document {n} (CdcPipeline): {}: {e}",
                        track.path()
                    ))
                })?;
                // apiVersion and kind are checked by kind above, not by the type.
                if let Some(field) = unknown.iter().find(|f| *f != "apiVersion" && *f != "kind") {
                    return Err(StandaloneError::Manifest(format!(
                        "document {n} (CdcPipeline): {field}: unknown field; fix: check its spelling against crds/cdcpipeline.yaml"
                    )));
                }
                if p.metadata.name.as_deref().unwrap_or_default().is_empty() {
                    return Err(StandaloneError::Manifest(format!(
                        "document {n} (CdcPipeline): metadata.name is required"
                    )));
                }
                m.pipelines.push(p);
            }
            "Secret" => {
                let s: Secret = serde_yaml::from_value(value).map_err(|e| {
                    StandaloneError::Manifest(format!("document {n} (Secret): {e}"))
                })?;
                let name = s.metadata.name.clone().unwrap_or_default();
                let mut data: BTreeMap<String, String> = BTreeMap::new();
                for (k, v) in s.data.unwrap_or_default() {
                    let text = String::from_utf8(v.0).map_err(|_| {
                        StandaloneError::Manifest(format!(
                            "document {n} (Secret {name}): data.{k} is not UTF-8 text"
                        ))
                    })?;
                    data.insert(k, text);
                }
                data.extend(s.string_data.unwrap_or_default());
                m.secrets
                    .entry(namespace_of(&s.metadata.namespace))
                    .or_default()
                    .insert(name, data);
            }
            "" => {
                return Err(StandaloneError::Manifest(format!(
                    "document {n}: has no kind"
                )));
            }
            other => {
                return Err(StandaloneError::Manifest(format!(
                    "document {n}: kind {other} is not supported here (only CdcPipeline and Secret)"
                )));
            }
        }
    }
    if m.pipelines.is_empty() {
        return Err(StandaloneError::Manifest(
            "the file holds no CdcPipeline".into(),
        ));
    }
    Ok(m)
}

/// The identity of a manifest pipeline: its uid if the file has one, else one derived from its name.
pub fn identity(p: &CdcPipeline) -> Identity {
    let namespace = namespace_of(&p.metadata.namespace);
    let name = p.metadata.name.clone().unwrap_or_default();
    let uid = p.metadata.uid.clone().unwrap_or_else(|| {
        let d = Sha256::digest(format!("philotes-standalone/{namespace}/{name}").as_bytes());
        d.iter().take(16).map(|b| format!("{b:02x}")).collect()
    });
    Identity {
        uid,
        namespace,
        name,
    }
}

/// Validated configurations of every pipeline in the file, or every problem.
pub fn configs(m: &Manifests) -> Result<Vec<(PipelineConfig, DesiredState)>, StandaloneError> {
    let empty = Secrets::new();
    let mut out = Vec::new();
    for p in &m.pipelines {
        let id = identity(p);
        let secrets = m.secrets.get(&id.namespace).unwrap_or(&empty);
        match validate(&id, &p.spec, secrets, None) {
            Ok(c) => out.push(c),
            Err(errors) => {
                return Err(StandaloneError::Invalid {
                    pipeline: format!("{}/{}", id.namespace, id.name),
                    errors: errors
                        .iter()
                        .map(|e| format!("  - {e}"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                });
            }
        }
    }
    Ok(out)
}

pub fn load(path: &str) -> Result<Vec<(PipelineConfig, DesiredState)>, StandaloneError> {
    let text = std::fs::read_to_string(path).map_err(|source| StandaloneError::Read {
        path: path.to_string(),
        source,
    })?;
    configs(&parse(&text)?)
}

/// Runs until SIGINT/SIGTERM (exit 0), or until every pipeline has failed for good (exit 1).
/// Who `philotes run` is, as the owner of its pipelines: `philotes-run@<host>/<pid>`.
fn process_owner() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("philotes-run@{host}/{}", std::process::id())
}

/// Runs the pipelines of the manifest file at `path` until `shutdown`. `resync`, when given, is a
/// resync token for every pipeline of the file (`philotes run --resync`).
pub async fn run(
    path: &str,
    health_addr: SocketAddr,
    resync: Option<String>,
    shutdown: CancellationToken,
) -> Result<i32, StandaloneError> {
    let mut pipelines = load(path)?;
    if let Some(token) = &resync {
        for (config, _) in &mut pipelines {
            config.resync = Some(token.clone());
        }
    }
    let supervisor = Supervisor::new(Arc::new(Metrics::new()), &process_owner());
    let health = Health {
        supervisor: supervisor.clone(),
        controller_ready: Arc::new(AtomicBool::new(true)),
        member: None,
    };
    let listener_stop = shutdown.child_token();
    let server = tokio::net::TcpListener::bind(health_addr)
        .await
        .map_err(StandaloneError::Health)?;
    drop(server);
    let health_task = tokio::spawn(health::serve(health_addr, health, listener_stop.clone()));

    let mut running = std::collections::BTreeSet::new();
    for (config, state) in pipelines {
        let id = config.id.clone();
        if start(&supervisor, config, state).await {
            running.insert(id);
        }
    }
    let started = running.len();
    // SIGHUP: the file is read again and each pipeline brought in line with it (a changed
    // spec.source.tables adds or removes tables while the others run on).
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(StandaloneError::Signal)?;

    let code = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break 0,
            _ = hangup.recv() => {
                reload(path, &supervisor, &mut running, resync.as_deref()).await;
                continue;
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        let snap = supervisor.snapshot().await;
        if started > 0
            && !snap.is_empty()
            && snap
                .values()
                .all(|(_, p)| p.phase == Phase::Failed && !p.retrying)
        {
            eprintln!("every pipeline failed and needs a fix; exiting");
            break 1;
        }
    };
    supervisor.shutdown().await;
    listener_stop.cancel();
    let _ = health_task.await;
    println!("stopped");
    Ok(code)
}

/// Starts (or restarts, or pauses) a pipeline as the supervisor plans, and prints its phases.
/// Returns whether it runs.
async fn start(supervisor: &Supervisor, config: PipelineConfig, state: DesiredState) -> bool {
    let name = config.name.clone();
    let id = config.id.clone();
    if state == DesiredState::Stopped {
        supervisor.apply(&id, None).await;
        println!("[{name}] Stopped (spec.state: Stopped)");
        return false;
    }
    println!(
        "[{name}] slot {} publication {} → sink {}",
        config.slot,
        config.publication,
        config.sink.describe()
    );
    let action = supervisor.apply(&id, Some((config, state))).await;
    let Some(rx) = supervisor.progress(&id).await else {
        return false;
    };
    if matches!(action, Action::Start | Action::Restart) {
        tokio::spawn(print_phases(name, rx));
    }
    true
}

/// Reads the file again and applies it: changed pipelines restart with their new spec, removed
/// ones stop (their slot, publication and buffer rows stay, as with `kubectl delete` under
/// `reclaimPolicy: Retain`). A file that no longer parses changes nothing.
async fn reload(
    path: &str,
    supervisor: &Supervisor,
    running: &mut std::collections::BTreeSet<String>,
    resync: Option<&str>,
) {
    let pipelines = match load(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("SIGHUP: {path} not applied, the pipelines run as before: {e}");
            return;
        }
    };
    println!("SIGHUP: applying {path} again");
    let mut now = std::collections::BTreeSet::new();
    for (mut config, state) in pipelines {
        if let Some(token) = resync {
            config.resync = Some(token.to_string());
        }
        let id = config.id.clone();
        if start(supervisor, config, state).await {
            now.insert(id);
        }
    }
    for id in running.difference(&now) {
        supervisor.apply(id, None).await;
        println!("[{id}] stopped: no longer in {path}");
    }
    *running = now;
}

/// Prints a pipeline's phase, message and error as they change.
async fn print_phases(name: String, mut rx: tokio::sync::watch::Receiver<crate::engine::Progress>) {
    let mut last = (None, String::new(), None);
    loop {
        let p = rx.borrow_and_update().clone();
        let now = (Some(p.phase), p.message.clone(), p.last_error.clone());
        if now != last {
            match &p.last_error {
                Some(e) if p.phase == Phase::Failed => println!(
                    "[{name}] {}: {e}\n[{name}]   fix: {}{}",
                    p.phase,
                    p.fix.clone().unwrap_or_default(),
                    if p.retrying { " (retrying)" } else { "" }
                ),
                _ => println!("[{name}] {}: {}", p.phase, p.message),
            }
            last = now;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::SinkConfig;

    const FILE: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: src, namespace: shop}
stringData: {uri: "postgres://u:p@db:5432/shop"}
---
apiVersion: v1
kind: Secret
metadata: {name: dst, namespace: shop}
data: {uri: cG9zdGdyZXM6Ly91OnBAd2g6NTQzMi93aA==}
---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {name: orders, namespace: shop}
spec:
  state: Paused
  source: {connectionSecretRef: {name: src, key: uri}, tables: [public.orders]}
  sink: {postgres: {connectionSecretRef: {name: dst, key: uri}, schema: replica}}
"#;

    #[test]
    fn parses_secrets_both_ways_and_pipelines() {
        let m = parse(FILE).unwrap();
        assert_eq!(m.pipelines.len(), 1);
        assert_eq!(m.secrets["shop"]["dst"]["uri"], "postgres://u:p@wh:5432/wh");
        let c = configs(&m).unwrap();
        assert_eq!(c[0].1, DesiredState::Paused);
        assert_eq!(c[0].0.name, "shop/orders");
        assert!(
            matches!(&c[0].0.sink, SinkConfig::Postgres { conn, .. } if conn.dbname() == "wh"),
            "{:?}",
            c[0].0.sink
        );
        assert_eq!(identity(&m.pipelines[0]).uid, identity(&m.pipelines[0]).uid);
    }

    #[test]
    fn bad_files_say_where() {
        let e = parse("kind: Deployment\n").unwrap_err().to_string();
        assert!(e.contains("document 1") && e.contains("Deployment"), "{e}");
        let e = parse("apiVersion: philotes.io/v1alpha1\nkind: CdcPipeline\nmetadata: {name: x}\nspec: {source: {tables: [t]}}\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(
                "document 1 (CdcPipeline): spec.source: missing field `connectionSecretRef`"
            ),
            "{e}"
        );
        let typo = FILE.replace(
            "  state: Paused",
            "  state: Paused\n  retry: {maxAtempts: 5}",
        );
        let e = parse(&typo).unwrap_err().to_string();
        assert!(
            e.contains("document 3 (CdcPipeline): spec.retry.maxAtempts: unknown field"),
            "{e}"
        );
        let wrong_ns = FILE.replace("namespace: shop}\nspec", "namespace: other}\nspec");
        let e = configs(&parse(&wrong_ns).unwrap()).unwrap_err().to_string();
        assert!(
            e.contains("spec.source.connectionSecretRef.name") && e.contains("other"),
            "{e}"
        );
    }
}
