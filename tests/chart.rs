//! The Helm chart: `helm lint` passes, and `helm template` output (with and without a watch namespace)
//! is accepted by a real kube-apiserver's `kubectl apply --dry-run=server`.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use support::k8s::ApiServer;

fn helm(args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/helm.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn server_dry_run(api: &ApiServer, manifests: &str) -> String {
    let mut child = Command::new(api.kubectl_path())
        .env("KUBECONFIG", api.kubeconfig())
        .args(["apply", "--dry-run=server", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifests.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "kubectl apply --dry-run=server refused the chart:\n{text}"
    );
    text
}

#[test]
fn chart_lints_and_the_api_server_accepts_it() {
    let lint = helm(&["lint", "charts/philotes"]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let api = ApiServer::start();
    // The CRD first (as Helm installs crds/ before templates), for real.
    api.kubectl(&["apply", "-f", "charts/philotes/crds/cdcpipeline.yaml"]);
    api.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/cdcpipelines.philotes.io",
        "--timeout=60s",
    ]);

    let all = helm(&[
        "template",
        "philotes",
        "charts/philotes",
        "--namespace",
        "default",
        "--kube-version",
        "1.20.2",
    ]);
    for kind in [
        "kind: Deployment",
        "kind: ServiceAccount",
        "kind: ClusterRole",
        "kind: ClusterRoleBinding",
        "kind: Service",
        "kind: PodDisruptionBudget",
    ] {
        assert!(all.contains(kind), "chart lacks {kind}");
    }
    assert!(
        all.contains("/health/ready") && all.contains("/health/live"),
        "probes missing"
    );
    assert!(!all.contains("\"*\""), "RBAC must not use wildcards");
    // Two replicas share the pipelines; each names itself after its pod.
    assert!(
        all.contains("replicas: 2") && all.contains("- --identity") && all.contains("$(POD_NAME)"),
        "{all}"
    );
    assert!(all.contains("resources: [\"leases\"]"), "{all}");
    let out = server_dry_run(&api, &all);
    assert!(
        out.contains("deployment.apps/philotes created (server dry run)")
            && out.contains("poddisruptionbudget.policy/philotes created (server dry run)"),
        "{out}"
    );
    let current = helm(&[
        "template",
        "philotes",
        "charts/philotes",
        "--kube-version",
        "1.30.0",
    ]);
    assert!(current.contains("apiVersion: policy/v1\n"), "{current}");

    api.kubectl(&["create", "namespace", "shop"]);
    let scoped = helm(&[
        "template",
        "philotes",
        "charts/philotes",
        "--namespace",
        "default",
        "--kube-version",
        "1.20.2",
        "--set",
        "watchNamespace=shop",
        "--set",
        "defaultBufferSecret.name=philotes-db",
    ]);
    assert!(
        scoped.contains("kind: Role\n") && !scoped.contains("kind: ClusterRole"),
        "{scoped}"
    );
    assert!(
        scoped.contains("--namespace") && scoped.contains("--default-buffer-secret"),
        "{scoped}"
    );
    server_dry_run(&api, &scoped);
    // The example pipeline is valid against the CRD.
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo-pipeline.yaml"),
    )
    .unwrap();
    let out = server_dry_run(&api, &example);
    assert!(
        out.contains("cdcpipeline.philotes.io/shop-orders created (server dry run)"),
        "{out}"
    );
}
