//! A real kube-apiserver + etcd per test, started by `scripts/envtest.sh` (built once by the test
//! command into the cache), and the generated CRD applied to it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, CustomResourceExt};
use philotes::crd::CdcPipeline;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/envtest.sh")
}

pub struct ApiServer {
    pub dir: PathBuf,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let dir = tempfile::Builder::new()
            .prefix("philotes-k8s-")
            .tempdir()
            .unwrap()
            .keep();
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/envtest.sh start failed (run scripts/envtest.sh build first): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ApiServer { dir }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub async fn client(&self) -> Client {
        philotes::install_crypto_provider();
        let kc = Kubeconfig::read_from(self.kubeconfig()).unwrap();
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        Client::try_from(config).unwrap()
    }

    /// The `kubectl` built with the server.
    pub fn kubectl_path(&self) -> PathBuf {
        let cache = std::env::var("PHILOTES_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/philotes")
            });
        cache.join("k8s-1.20.2/bin/kubectl")
    }

    /// Runs `kubectl` against this server, in the repository's folder.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(self.kubectl_path())
            .env("KUBECONFIG", self.kubeconfig())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Applies the generated CRD and waits until it is Established.
pub async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &CdcPipeline::crd())
        .await
        .unwrap();
    for _ in 0..100 {
        let crd = crds.get("cdcpipelines.philotes.io").await.unwrap();
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("CRD not established");
}

/// The operator's controller, run in the test process against one namespace.
pub struct Operator {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Result<(), philotes::operator::Error>>,
}

/// Starts the operator for namespace `ns` (its Leases there too), serving /health and /metrics on
/// `health_addr` when given.
pub fn start_operator(
    client: &Client,
    ns: &str,
    health_addr: Option<std::net::SocketAddr>,
) -> Operator {
    super::init_logs();
    let stop = tokio_util::sync::CancellationToken::new();
    let cfg = philotes::operator::OperatorConfig {
        namespace: Some(ns.to_string()),
        default_buffer: None,
        health_addr,
        instance: Some("test".into()),
        identity: "test".into(),
        lease_namespace: ns.to_string(),
    };
    let task = tokio::spawn(philotes::operator::run(client.clone(), cfg, stop.clone()));
    Operator { stop, task }
}

impl Operator {
    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("operator did not stop")
            .unwrap()
            .unwrap();
    }
}

pub async fn create_namespace(client: &Client, ns: &str) {
    let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap(),
    )
    .await
    .unwrap();
}

/// Secret `name` with key `uri`.
pub async fn uri_secret(client: &Client, ns: &str, name: &str, uri: &str) {
    let api: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), ns);
    let s = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name}, "stringData": {"uri": uri}
    }))
    .unwrap();
    api.create(&PostParams::default(), &s).await.unwrap();
}

/// Creates CdcPipeline `name` with `spec`.
pub async fn create_pipeline(
    client: &Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> Api<CdcPipeline> {
    let api: Api<CdcPipeline> = Api::namespaced(client.clone(), ns);
    let p: CdcPipeline = serde_json::from_value(serde_json::json!({
        "apiVersion": "philotes.io/v1alpha1", "kind": "CdcPipeline",
        "metadata": {"name": name}, "spec": spec
    }))
    .unwrap();
    api.create(&PostParams::default(), &p).await.unwrap();
    api
}

/// Waits until `f` holds for pipeline `name`; returns it.
pub async fn wait_pipeline(
    api: &Api<CdcPipeline>,
    name: &str,
    what: &str,
    f: impl Fn(&CdcPipeline) -> bool,
) -> CdcPipeline {
    let start = std::time::Instant::now();
    loop {
        let p = api.get(name).await.unwrap();
        if f(&p) {
            return p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}; status: {:#?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn phase_of(p: &CdcPipeline) -> Option<philotes::crd::Phase> {
    p.status.as_ref().and_then(|s| s.phase)
}
