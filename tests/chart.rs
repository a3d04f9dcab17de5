//! The Helm chart: `helm lint` passes, and `helm template` output (with and without a watch namespace)
//! is accepted by a real kube-apiserver's `kubectl apply --dry-run=server`; `helm upgrade` updates the
//! CRD; the monitoring templates render and apply; every metric their PromQL names is served.

mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::Pg;
use support::k8s::ApiServer;

fn helm(args: &[&str]) -> String {
    helm_on(None, args)
}

/// helm against the API server of `kubeconfig` (install, upgrade), or none (lint, template).
fn helm_on(kubeconfig: Option<&Path>, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/helm.sh");
    let mut cmd = Command::new("bash");
    if let Some(k) = kubeconfig {
        cmd.env("KUBECONFIG", k);
    }
    let out = cmd
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
    dry_run(api, "server", manifests)
}

/// `kubectl apply --dry-run=<mode> -f -` of `manifests`; fails the test when refused.
fn dry_run(api: &ApiServer, mode: &str, manifests: &str) -> String {
    let mut child = Command::new(api.kubectl_path())
        .env("KUBECONFIG", api.kubeconfig())
        .args(["apply", &format!("--dry-run={mode}"), "-f", "-"])
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
        "kubectl apply --dry-run={mode} refused the chart:\n{text}"
    );
    text
}

#[test]
fn chart_lints_and_the_api_server_accepts_it() {
    let lint = helm(&["lint", "charts/philotes"]);
    assert!(lint.contains("0 chart(s) failed"), "{lint}");

    let api = ApiServer::start();
    // The CRD first, for real (the dry run of the example below needs it).
    api.kubectl(&["apply", "-f", "charts/philotes/files/cdcpipeline.yaml"]);
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
        "kind: CustomResourceDefinition",
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
    // The CRD is a template kept on uninstall; the monitoring objects are off by default.
    assert!(all.contains("helm.sh/resource-policy: keep"), "{all}");
    for kind in [
        "kind: ServiceMonitor",
        "kind: PrometheusRule",
        "grafana_dashboard",
    ] {
        assert!(!all.contains(kind), "{kind} is on by default");
    }
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

/// Copies directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// kubectl's output and whether it succeeded (for what may be refused).
fn kubectl_try(api: &ApiServer, args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new(api.kubectl_path())
        .env("KUBECONFIG", api.kubeconfig())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

const FUTURE_PIPELINE: &str = r#"apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {name: future, namespace: default}
spec:
  futureField: from-the-next-version
  source: {connectionSecretRef: {name: db, key: uri}, tables: [t]}
  sink: {postgres: {connectionSecretRef: {name: db, key: uri}}}
"#;

#[test]
fn helm_upgrade_updates_the_crd_and_uninstall_keeps_it() {
    let api = ApiServer::start();
    let kc = api.kubeconfig();
    let install = helm_on(
        Some(&kc),
        &[
            "install",
            "philotes",
            "charts/philotes",
            "--namespace",
            "default",
        ],
    );
    assert!(install.contains("STATUS: deployed"), "{install}");
    api.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/cdcpipelines.philotes.io",
        "--timeout=60s",
    ]);
    let read_back = |api: &ApiServer| {
        api.kubectl(&[
            "get",
            "cdcp",
            "future",
            "-n",
            "default",
            "-o",
            "jsonpath={.spec.futureField}",
        ])
    };
    // This CRD does not know the field: the API server prunes it.
    let (ok, out) = kubectl_try(
        &api,
        &["apply", "--validate=false", "-f", "-"],
        FUTURE_PIPELINE,
    );
    assert!(ok, "{out}");
    assert_eq!(
        read_back(&api),
        "",
        "the installed CRD kept an unknown field"
    );

    // The next version of the chart: its CRD has the field.
    let next = tempfile::tempdir().unwrap();
    let chart = next.path().join("philotes");
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/philotes"),
        &chart,
    );
    let crd_path = chart.join("files/cdcpipeline.yaml");
    let mut crd: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&crd_path).unwrap()).unwrap();
    let spec_props = &mut crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    assert!(spec_props.is_mapping(), "no spec properties in the CRD");
    spec_props["futureField"] =
        serde_yaml::from_str("{type: string, description: added by the next version}").unwrap();
    std::fs::write(&crd_path, serde_yaml::to_string(&crd).unwrap()).unwrap();
    let chart_yaml = chart.join("Chart.yaml");
    let meta = std::fs::read_to_string(&chart_yaml)
        .unwrap()
        .replace("version: 0.1.0", "version: 0.1.1");
    std::fs::write(&chart_yaml, meta).unwrap();

    let chart_arg = chart.to_string_lossy().into_owned();
    let upgrade = helm_on(
        Some(&kc),
        &["upgrade", "philotes", &chart_arg, "--namespace", "default"],
    );
    assert!(upgrade.contains("STATUS: deployed"), "{upgrade}");
    let schema = api.kubectl(&[
        "get",
        "crd",
        "cdcpipelines.philotes.io",
        "-o",
        "jsonpath={.spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.futureField.type}",
    ]);
    assert_eq!(schema, "string", "helm upgrade did not update the CRD");
    // The API server now accepts and keeps the new field (kubectl validates it too).
    // The API server publishes the new schema to kubectl's validation (OpenAPI) a little later.
    let start = std::time::Instant::now();
    loop {
        let (ok, out) = kubectl_try(&api, &["apply", "-f", "-"], FUTURE_PIPELINE);
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the upgraded CRD's field is still refused: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(read_back(&api), "from-the-next-version");

    // helm uninstall leaves the CRD, and with it every pipeline.
    helm_on(
        Some(&kc),
        &["uninstall", "philotes", "--namespace", "default"],
    );
    assert_eq!(read_back(&api), "from-the-next-version");
    let annotations = api.kubectl(&[
        "get",
        "crd",
        "cdcpipelines.philotes.io",
        "-o",
        "jsonpath={.metadata.annotations}",
    ]);
    assert!(
        annotations.contains("helm.sh/resource-policy"),
        "{annotations}"
    );
}

/// Stand-ins for prometheus-operator's CRDs (not on the test server): the kinds, with the fields the
/// chart uses typed, so that kubectl can map and validate the chart's objects.
const MONITORING_CRDS: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: servicemonitors.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: ServiceMonitor, plural: servicemonitors, singular: servicemonitor}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [endpoints, selector]
            properties:
              selector: {type: object, x-kubernetes-preserve-unknown-fields: true}
              namespaceSelector:
                type: object
                properties:
                  matchNames: {type: array, items: {type: string}}
              endpoints:
                type: array
                items:
                  type: object
                  properties:
                    port: {type: string}
                    path: {type: string}
                    interval: {type: string}
                    scrapeTimeout: {type: string}
---
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: prometheusrules.monitoring.coreos.com}
spec:
  group: monitoring.coreos.com
  names: {kind: PrometheusRule, plural: prometheusrules, singular: prometheusrule}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              groups:
                type: array
                items:
                  type: object
                  required: [name, rules]
                  properties:
                    name: {type: string}
                    rules:
                      type: array
                      items:
                        type: object
                        required: [expr]
                        properties:
                          alert: {type: string}
                          expr: {type: string}
                          for: {type: string}
                          labels: {type: object, additionalProperties: {type: string}}
                          annotations: {type: object, additionalProperties: {type: string}}
"#;

const MONITORING_ON: [&str; 6] = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.dashboard.configMap.enabled=true",
];

fn template_with_monitoring() -> String {
    let mut args = vec![
        "template",
        "philotes",
        "charts/philotes",
        "--namespace",
        "default",
        "--kube-version",
        "1.20.2",
    ];
    args.extend(MONITORING_ON);
    helm(&args)
}

fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| serde_yaml::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [serde_yaml::Value], kind: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/philotes/dashboards/philotes.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn monitoring_templates_render_and_the_api_server_accepts_them() {
    let mut lint = vec!["lint", "charts/philotes"];
    lint.extend(MONITORING_ON);
    assert!(helm(&lint).contains("0 chart(s) failed"));
    let all = template_with_monitoring();
    let docs = documents(&all);

    let sm = of_kind(&docs, "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"].as_str(), Some("http"));
    assert_eq!(
        sm["spec"]["endpoints"][0]["path"].as_str(),
        Some("/metrics")
    );
    let service = of_kind(&docs, "Service");
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_mapping().unwrap() {
        assert_eq!(
            &service["metadata"]["labels"][k], v,
            "the ServiceMonitor does not select the Service"
        );
    }

    let rule = of_kind(&docs, "PrometheusRule");
    let rules = rule["spec"]["groups"][0]["rules"].as_sequence().unwrap();
    let alert = |name: &str| {
        rules
            .iter()
            .find(|r| r["alert"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no alert {name}"))
    };
    assert_eq!(alert("PhilotesLagHigh")["for"].as_str(), Some("10m"));
    assert_eq!(alert("PhilotesBackpressured")["for"].as_str(), Some("10m"));
    for name in [
        "PhilotesPipelineFailed",
        "PhilotesWalAtRisk",
        "PhilotesDeadLettersGrowing",
    ] {
        assert!(alert(name)["annotations"]["summary"].is_string());
    }
    assert!(
        alert("PhilotesLagHigh")["expr"]
            .as_str()
            .unwrap()
            .ends_with("> 1073741824")
    );

    let cm = docs
        .iter()
        .find(|d| d["kind"].as_str() == Some("ConfigMap"))
        .expect("no dashboard ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"].as_str(),
        Some("1")
    );
    let shipped: serde_json::Value =
        serde_json::from_str(cm["data"]["philotes.json"].as_str().unwrap()).unwrap();
    assert_eq!(
        shipped,
        dashboard(),
        "the ConfigMap's dashboard differs from the file"
    );

    let api = ApiServer::start();
    api.kubectl(&["apply", "-f", "charts/philotes/files/cdcpipeline.yaml"]);
    let (ok, out) = kubectl_try(&api, &["apply", "-f", "-"], MONITORING_CRDS);
    assert!(ok, "{out}");
    for crd in [
        "crd/servicemonitors.monitoring.coreos.com",
        "crd/prometheusrules.monitoring.coreos.com",
    ] {
        api.kubectl(&["wait", "--for=condition=Established", crd, "--timeout=60s"]);
    }
    let client = dry_run(&api, "client", &all);
    assert!(
        client.contains("servicemonitor.monitoring.coreos.com/philotes created (dry run)")
            && client.contains("prometheusrule.monitoring.coreos.com/philotes created (dry run)"),
        "{client}"
    );
    let server = server_dry_run(&api, &all);
    assert!(
        server.contains("prometheusrule.monitoring.coreos.com/philotes created (server dry run)")
            && server.contains("configmap/philotes-dashboard created (server dry run)"),
        "{server}"
    );
}

/// Every metric name a selector of `expr` names, with the label names its matchers use.
fn selectors(expr: &promql_parser::parser::Expr, out: &mut Vec<(String, Vec<String>)>) {
    use promql_parser::parser::Expr;
    let mut vector = |vs: &promql_parser::parser::VectorSelector| {
        let mut name = vs.name.clone();
        let mut labels = Vec::new();
        for m in &vs.matchers.matchers {
            if m.name == "__name__" {
                name = Some(m.value.clone());
            } else {
                labels.push(m.name.clone());
            }
        }
        out.push((name.unwrap_or_default(), labels));
    };
    match expr {
        Expr::VectorSelector(vs) => vector(vs),
        Expr::MatrixSelector(ms) => vector(&ms.vs),
        Expr::Aggregate(a) => {
            selectors(&a.expr, out);
            if let Some(p) = &a.param {
                selectors(p, out);
            }
        }
        Expr::Unary(u) => selectors(&u.expr, out),
        Expr::Binary(b) => {
            selectors(&b.lhs, out);
            selectors(&b.rhs, out);
        }
        Expr::Paren(p) => selectors(&p.expr, out),
        Expr::Subquery(s) => selectors(&s.expr, out),
        Expr::Call(c) => {
            for a in &c.args.args {
                selectors(a, out);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

/// The PromQL of the dashboard: every target's `expr` and the variables' `label_values` queries,
/// with Grafana's `$__rate_interval` as the 5m it stands for.
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    ("definition", serde_json::Value::String(q)) => {
                        let inner = q
                            .strip_prefix("label_values(")
                            .and_then(|q| q.rsplit_once(','))
                            .map(|(sel, _)| sel.to_string())
                            .unwrap_or_else(|| panic!("unexpected variable query {q}"));
                        out.push(inner);
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_the_dashboard_and_alerts_is_served() {
    use support::k8s::{
        create_namespace, create_pipeline, install_crd, phase_of, start_operator, uri_secret,
        wait_pipeline,
    };
    // The queries: the alert rules as the chart renders them, and the dashboard.
    let docs = documents(&template_with_monitoring());
    let mut queries: Vec<(String, String)> = Vec::new();
    for r in of_kind(&docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
        .as_sequence()
        .unwrap()
    {
        let name = r["alert"].as_str().unwrap_or("rule").to_string();
        queries.push((name, r["expr"].as_str().unwrap().to_string()));
    }
    let mut dash = Vec::new();
    dashboard_queries(&dashboard(), &mut dash);
    assert!(dash.len() >= 10, "{dash:?}");
    queries.extend(
        dash.into_iter()
            .map(|q| ("dashboard".to_string(), q.replace("$__rate_interval", "5m"))),
    );
    let mut wanted: Vec<(String, String, Vec<String>)> = Vec::new();
    for (from, q) in &queries {
        let expr = promql_parser::parser::parse(q)
            .unwrap_or_else(|e| panic!("{from}: {q:?} is not PromQL: {e}"));
        let mut found = Vec::new();
        selectors(&expr, &mut found);
        assert!(!found.is_empty(), "{from}: {q} names no metric");
        for (name, labels) in found {
            assert!(
                !name.is_empty(),
                "{from}: {q} has a selector without a name"
            );
            wanted.push((from.clone(), name, labels));
        }
    }

    // An operator with a running pipeline, and its /metrics.
    let pg = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let k8s = ApiServer::start();
    let client = k8s.client().await;
    install_crd(&client).await;
    create_namespace(&client, "metrics").await;
    uri_secret(&client, "metrics", "source-db", &pg.uri("shop")).await;
    uri_secret(&client, "metrics", "sink-db", &pg.uri("warehouse")).await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let op = start_operator(&client, "metrics", Some(addr));
    let api = create_pipeline(
        &client,
        "metrics",
        "p",
        serde_json::json!({
            "source": {"connectionSecretRef": {"name": "source-db", "key": "uri"}, "tables": ["t"]},
            "sink": {"postgres": {"connectionSecretRef": {"name": "sink-db", "key": "uri"}, "schema": "replica"}},
        }),
    )
    .await;
    wait_pipeline(&api, "p", "Running", |p| {
        phase_of(p) == Some(philotes::crd::Phase::Running)
    })
    .await;
    src.batch_execute("INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    let dst = pg.client("warehouse").await;
    support::eventually("rows in the sink", Duration::from_secs(60), || async {
        support::count(&dst, "replica.t").await == 100
    })
    .await;
    let (code, body) = support::http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    op.shutdown().await;

    // Served series: name → the label names they carry.
    let mut served: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for l in body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name_end = l.find(['{', ' ']).unwrap_or(l.len());
        let labels = served.entry(l[..name_end].to_string()).or_default();
        if let Some(set) = l[name_end..]
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
        {
            for pair in set.0.split(',') {
                if let Some((k, _)) = pair.split_once('=') {
                    labels.insert(k.to_string());
                }
            }
        }
    }
    for (from, name, labels) in &wanted {
        let have = served.get(name).unwrap_or_else(|| {
            panic!("{from} uses {name}, which /metrics does not serve:\n{body}")
        });
        for l in labels {
            assert!(
                have.contains(l),
                "{from}: {name} has no label {l}: {have:?}"
            );
        }
    }
    let names: std::collections::BTreeSet<&str> =
        wanted.iter().map(|(_, n, _)| n.as_str()).collect();
    for n in [
        "philotes_events_read_total",
        "philotes_events_delivered_total",
        "philotes_lag_bytes",
        "philotes_buffer_depth",
        "philotes_events_dead_lettered_total",
        "philotes_batch_seconds_bucket",
        "philotes_sink_retries_total",
        "philotes_pipeline_phase",
        "philotes_wal_at_risk",
        "philotes_backpressured",
    ] {
        assert!(names.contains(n), "the dashboard and alerts do not use {n}");
    }
}
