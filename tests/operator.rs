//! The operator end to end: a real kube-apiserver (scripts/envtest.sh), a real PostgreSQL, the
//! operator's controller running in the test process. Each test has its own namespace and servers.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use philotes::crd::{CdcPipeline, Phase};
use serde_json::json;
use support::k8s::{
    ApiServer, create_namespace as namespace, create_pipeline as pipeline, install_crd,
    phase_of as phase, start_operator, wait_pipeline as wait_status,
};
use support::lake::{file_lake, wait_equal};
use support::{Pg, count, dump, eventually, http_get, wait_same};

const WAIT: Duration = Duration::from_secs(90);

async fn secret(client: &Client, ns: &str, name: &str, uri: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"uri": uri}}))
            .unwrap();
    api.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&s))
        .await
        .unwrap();
}

fn spec(tables: &[&str], extra: serde_json::Value) -> serde_json::Value {
    let mut s = json!({
        "source": {"connectionSecretRef": {"name": "source-db", "key": "uri"}, "tables": tables},
        "sink": {"postgres": {"connectionSecretRef": {"name": "sink-db", "key": "uri"}, "schema": "replica"}},
        "buffer": {"batchSize": 500, "flushInterval": "200ms"},
        "retry": {"maxAttempts": 2, "initialInterval": "100ms", "maxInterval": "1s"},
    });
    if let (Some(o), Some(e)) = (s.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    s
}

fn condition<'a>(p: &'a CdcPipeline, t: &str) -> Option<&'a philotes::crd::Condition> {
    p.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)
}

async fn set_state(api: &Api<CdcPipeline>, name: &str, state: &str) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"state": state}})),
    )
    .await
    .unwrap();
}

async fn slot_exists(src: &tokio_postgres::Client, slot: &str) -> bool {
    src.query_one(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

async fn publication_exists(src: &tokio_postgres::Client, name: &str) -> bool {
    src.query_one(
        "SELECT count(*) FROM pg_publication WHERE pubname = $1",
        &[&name],
    )
    .await
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

/// What each test starts from: PostgreSQL with databases shop (where `ddl` runs) and warehouse, a
/// kube-apiserver with the CRD, namespace `ns`, and Secret source-db (and sink-db when `sink`).
struct World {
    pg: Pg,
    /// Stops the API server when dropped: keep it bound.
    k8s: ApiServer,
    client: Client,
    src: tokio_postgres::Client,
}

async fn world(ns: &str, ddl: &str, sink: bool) -> World {
    let pg = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    src.batch_execute(ddl).await.unwrap();
    let k8s = ApiServer::start();
    let client = k8s.client().await;
    install_crd(&client).await;
    namespace(&client, ns).await;
    secret(&client, ns, "source-db", &pg.uri("shop")).await;
    if sink {
        secret(&client, ns, "sink-db", &pg.uri("warehouse")).await;
    }
    World {
        pg,
        k8s,
        client,
        src,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_pause_resume_secret_change_and_retain() {
    let ns = "lifecycle";
    let World {
        pg,
        k8s,
        client,
        src,
    } = world(
        ns,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric(10,2))",
        true,
    )
    .await;
    pg.create_db("warehouse2").await;
    let dst = pg.client("warehouse").await;
    let op = start_operator(&client, ns, None);
    let api = pipeline(&client, ns, "orders", spec(&["public.orders"], json!({}))).await;

    let p = wait_status(&api, "orders", "phase Running", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    let status = p.status.clone().unwrap();
    let uid = p.metadata.uid.clone().unwrap();
    let slot = format!("philotes_{}", uid.replace('-', ""));
    assert_eq!(
        status.slot_name.as_deref(),
        Some(slot.as_str()),
        "slot name derived from the uid"
    );
    assert_eq!(status.publication_name.as_deref(), Some(slot.as_str()));
    assert_eq!(status.observed_generation, p.metadata.generation);
    assert!(
        p.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"philotes.io/cleanup".to_string())
    );
    assert!(slot_exists(&src, &slot).await);

    src.batch_execute(
        "INSERT INTO orders SELECT i, 'new', i * 1.5 FROM generate_series(1, 200) i;
         UPDATE orders SET status = 'paid' WHERE id % 3 = 0; DELETE FROM orders WHERE id % 10 = 0;",
    )
    .await
    .unwrap();
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;
    let p = wait_status(&api, "orders", "delivered count in status", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.events_delivered)
            .unwrap_or(0)
            >= 200
            && condition(p, "Ready").is_some_and(|c| c.status == "True")
    })
    .await;
    let ready_since = condition(&p, "Ready").unwrap().last_transition_time.clone();

    // kubectl get shows the printer columns.
    let table = k8s.kubectl(&["get", "cdcpipelines", "-n", ns]);
    let header = table.lines().next().unwrap_or_default().to_string();
    for col in ["NAME", "PHASE", "LAG", "DELIVERED", "AGE"] {
        assert!(header.contains(col), "{table}");
    }
    assert!(table.contains("Running"), "{table}");

    // Pause: phase Paused within 2 seconds, and the sink stops changing.
    let asked = Instant::now();
    set_state(&api, "orders", "Paused").await;
    wait_status(&api, "orders", "phase Paused", |p| {
        phase(p) == Some(Phase::Paused)
    })
    .await;
    let took = asked.elapsed();
    assert!(
        took <= Duration::from_secs(2),
        "Paused showed after {took:?}"
    );
    let frozen = dump(&dst, "replica.orders", "id").await;
    src.batch_execute("INSERT INTO orders SELECT i, 'late', 1 FROM generate_series(201, 300) i; UPDATE orders SET amount = 0 WHERE id = 1")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        dump(&dst, "replica.orders", "id").await,
        frozen,
        "the sink changed while paused"
    );
    let p = api.get("orders").await.unwrap();
    assert_eq!(condition(&p, "Ready").unwrap().reason, "Paused");

    // Resume: catches up.
    set_state(&api, "orders", "Running").await;
    wait_status(&api, "orders", "phase Running again", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;

    // Resync in place: a new token rebuilds the pipeline once; the sink's drift is repaired.
    dst.batch_execute(
        "INSERT INTO replica.orders VALUES (99999, 'stray', 0); DELETE FROM replica.orders WHERE id = 1",
    )
    .await
    .unwrap();
    k8s.kubectl(&[
        "patch",
        "cdcp",
        "orders",
        "-n",
        ns,
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"resync":"r1"}}"#,
    ]);
    wait_status(&api, "orders", "status.lastResync r1", |p| {
        p.status.as_ref().and_then(|s| s.last_resync.as_deref()) == Some("r1")
            && phase(p) == Some(Phase::Running)
    })
    .await;
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;

    // A Secret change restarts the pipeline with the new value: new changes go to the new sink.
    secret(&client, ns, "sink-db", &pg.uri("warehouse2")).await;
    let dst2 = pg.client("warehouse2").await;
    eventually(
        "the restarted pipeline to create tables in the new sink",
        WAIT,
        || async { count(&dst2, "replica.orders").await >= 0 },
    )
    .await;
    src.batch_execute("INSERT INTO orders VALUES (1000, 'after secret change', 9)")
        .await
        .unwrap();
    eventually("the new row in the new sink", WAIT, || async {
        count(&dst2, "replica.orders").await == 1
    })
    .await;
    assert_eq!(
        count(&dst, "replica.orders").await,
        count(&src, "orders").await - 1,
        "the old sink got no more rows"
    );
    let p = wait_status(&api, "orders", "Running after restart", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    // The condition keeps its transition time when it did not change in between... or moved forward on the restart.
    assert!(condition(&p, "Ready").unwrap().last_transition_time >= ready_since);

    // Stopped: the worker ends, the slot is kept, and a condition warns about WAL.
    set_state(&api, "orders", "Stopped").await;
    let p = wait_status(&api, "orders", "phase Stopped", |p| {
        phase(p) == Some(Phase::Stopped)
    })
    .await;
    assert_eq!(condition(&p, "WalRetained").unwrap().status, "True");
    assert!(slot_exists(&src, &slot).await);

    // Events tell the story: phase changes and what the operator did.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    let reasons: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|e| e.reason.clone())
        .collect();
    for r in [
        "Started",
        "Running",
        "Pausing",
        "Paused",
        "Resuming",
        "Restarted",
        "Resynced",
        "Stopped",
    ] {
        assert!(
            reasons.iter().any(|x| x == r),
            "no {r} event in {reasons:?}"
        );
    }

    // Delete with Retain: the slot and publication stay.
    api.delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the resource to be gone", WAIT, || async {
        api.get_opt("orders").await.unwrap().is_none()
    })
    .await;
    assert!(slot_exists(&src, &slot).await, "Retain keeps the slot");
    assert!(
        publication_exists(&src, &slot).await,
        "Retain keeps the publication"
    );
    // Its rows in the buffer (here the source database) are gone: of no use without the resource.
    for table in [
        "philotes.pipelines",
        "philotes.events",
        "philotes.relations",
    ] {
        eventually(&format!("{table} to forget the pipeline"), WAIT, || async {
            count(&src, table).await == 0
        })
        .await;
    }
    op.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_fail_with_a_clear_condition_and_delete_reclaims() {
    let ns = "invalid";
    let World {
        pg,
        k8s: _k8s,
        client,
        src,
    } = world(ns, "CREATE TABLE t (id int PRIMARY KEY, v text)", false).await;
    let op = start_operator(&client, ns, None);

    // The sink Secret does not exist yet, and the flush interval is not a duration.
    let api = pipeline(
        &client,
        ns,
        "bad",
        spec(
            &["public.t"],
            json!({"buffer": {"flushInterval": "soon"}, "reclaimPolicy": "Delete"}),
        ),
    )
    .await;
    let p = wait_status(&api, "bad", "phase Failed", |p| {
        phase(p) == Some(Phase::Failed)
    })
    .await;
    let ready = condition(&p, "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(
        ready.message.contains("spec.buffer.flushInterval"),
        "{ready:?}"
    );
    assert!(
        ready
            .message
            .contains("spec.sink.postgres.connectionSecretRef.name"),
        "{ready:?}"
    );
    assert!(ready.message.contains("fix:"), "{ready:?}");

    // Fixing both makes it run.
    secret(&client, ns, "sink-db", &pg.uri("warehouse")).await;
    api.patch(
        "bad",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"buffer": {"flushInterval": "200ms"}}})),
    )
    .await
    .unwrap();
    let p = wait_status(&api, "bad", "phase Running after the fix", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    let slot = p.status.unwrap().slot_name.unwrap();
    assert!(slot_exists(&src, &slot).await && publication_exists(&src, &slot).await);

    // A table that does not exist: Failed at start, naming the table.
    let api2 = pipeline(&client, ns, "missing", spec(&["public.nope"], json!({}))).await;
    let p = wait_status(&api2, "missing", "phase Failed", |p| {
        phase(p) == Some(Phase::Failed)
    })
    .await;
    let msg = p.status.unwrap().message.unwrap_or_default();
    assert!(
        msg.contains("spec.source.tables[0]") && msg.contains("public.nope does not exist"),
        "{msg}"
    );

    // Delete with Delete, as `kubectl delete -f` of the file would: the Secrets first, then the
    // pipeline. The Secrets wait (a finalizer) until reclaim has used them; then they go too.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in ["source-db", "sink-db"] {
        let s = secrets.get(name).await.unwrap();
        assert!(
            s.finalizers().iter().any(|f| f == "philotes.io/reclaim"),
            "{name} is not held: {:?}",
            s.finalizers()
        );
        secrets
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    api.delete("bad", &DeleteParams::default()).await.unwrap();
    eventually("the resource to be gone", WAIT, || async {
        api.get_opt("bad").await.unwrap().is_none()
    })
    .await;
    eventually("the held Secrets to go", WAIT, || async {
        secrets.get_opt("source-db").await.unwrap().is_none()
            && secrets.get_opt("sink-db").await.unwrap().is_none()
    })
    .await;
    assert!(!slot_exists(&src, &slot).await, "slot dropped");
    assert!(
        !publication_exists(&src, &slot).await,
        "publication dropped"
    );

    // Deleting when the source is gone does not hang.
    api2.patch(
        "missing",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"reclaimPolicy": "Delete"}})),
    )
    .await
    .unwrap();
    drop(src);
    pg.stop_server();
    api2.delete("missing", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the resource to be gone although its source is down",
        WAIT,
        || async { api2.get_opt("missing").await.unwrap().is_none() },
    )
    .await;
    op.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_restart_resumes_with_nothing_lost() {
    let ns = "restart";
    let World {
        pg,
        k8s: _k8s,
        client,
        src,
    } = world(ns, "CREATE TABLE t (id int PRIMARY KEY, v text)", true).await;
    let dst = pg.client("warehouse").await;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let op = start_operator(&client, ns, Some(addr));
    let api = pipeline(&client, ns, "p", spec(&["t"], json!({}))).await;
    wait_status(&api, "p", "phase Running", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    // The health server reports the controller and the pipeline.
    eventually("/health/ready to answer 200", WAIT, || async {
        http_get(addr, "/health/ready").await.0 == 200
    })
    .await;
    let (_, body) = http_get(addr, "/health/ready").await;
    assert!(
        body.contains("\"controllerSynced\":true")
            && body.contains("\"member\":true")
            && body.contains("restart/p"),
        "{body}"
    );
    assert_eq!(http_get(addr, "/health/live").await.0, 200);

    let load_client = pg.client("shop").await;
    let load = tokio::spawn(async move {
        for k in 0..60 {
            load_client
                .batch_execute(&format!(
                    "INSERT INTO t SELECT i, 'x' FROM generate_series({}, {}) i",
                    k * 500 + 1,
                    k * 500 + 500
                ))
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eventually("some rows in the sink", WAIT, || async {
        count(&dst, "replica.t").await >= 2000
    })
    .await;
    let (code, metrics) = http_get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for series in [
        "philotes_events_delivered_total{pipeline=\"restart/p\"}",
        "philotes_lag_bytes{pipeline=\"restart/p\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing from {metrics}");
    }
    // The operator's own counter writes into status do not make it reconcile.
    let reconciles = |m: &str| {
        m.lines()
            .find(|l| l.starts_with("philotes_reconciles_total "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    let before = reconciles(&metrics);
    let mut versions = std::collections::BTreeSet::new();
    let start = Instant::now();
    while versions.len() < 3 {
        assert!(start.elapsed() < WAIT, "status was not written again");
        let p = api.get("p").await.unwrap();
        versions.insert(p.metadata.resource_version.clone());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = reconciles(&http_get(addr, "/metrics").await.1);
    assert!(before >= 1.0, "{metrics}");
    assert_eq!(before, after, "status writes made the controller reconcile");
    op.shutdown().await;
    let p = api.get("p").await.unwrap();
    assert_eq!(
        phase(&p),
        Some(Phase::Stopped),
        "the last status says the worker stopped"
    );
    load.await.unwrap();

    let op = start_operator(&client, ns, None);
    wait_status(&api, "p", "phase Running after the restart", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    assert_eq!(count(&dst, "replica.t").await, 30_000);
    op.shutdown().await;
}

/// The command a user types: `kubectl delete -f examples/demo-pipeline.yaml` deletes the Secrets in
/// the same request batch as the pipeline. With `reclaimPolicy: Delete` the slot and publication are
/// still dropped (the operator holds the Secrets with a finalizer until it has reclaimed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_of_the_example_file_still_reclaims_the_slot() {
    let ns = "default";
    let pg = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    src.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, v text); CREATE TABLE customers (id int PRIMARY KEY, v text);
         INSERT INTO orders VALUES (1, 'a'); INSERT INTO customers VALUES (1, 'b');",
    )
    .await
    .unwrap();
    let k8s = ApiServer::start();
    let client = k8s.client().await;
    install_crd(&client).await;
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo-pipeline.yaml"),
    )
    .unwrap();
    assert!(example.contains("reclaimPolicy: Retain"), "{example}");
    let file = pg.dir().join("demo-pipeline.yaml");
    std::fs::write(
        &file,
        example
            .replace(
                "postgres://philotes:philotes@127.0.0.1:55432/shop",
                &pg.uri("shop"),
            )
            .replace(
                "postgres://philotes:philotes@127.0.0.1:55432/warehouse",
                &pg.uri("warehouse"),
            )
            .replace("reclaimPolicy: Retain", "reclaimPolicy: Delete"),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let op = start_operator(&client, ns, None);
    k8s.kubectl(&["apply", "-f", file]);
    let api: Api<CdcPipeline> = Api::namespaced(client.clone(), ns);
    let p = wait_status(&api, "shop-orders", "phase Running", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    let slot = p.status.and_then(|s| s.slot_name).unwrap();
    let dst = pg.client("warehouse").await;
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;
    assert!(slot_exists(&src, &slot).await);

    let out = k8s.kubectl(&["delete", "-f", file, "--wait=false"]);
    println!("{out}");
    eventually("the pipeline to be gone", WAIT, || async {
        api.get_opt("shop-orders").await.unwrap().is_none()
    })
    .await;
    assert!(!slot_exists(&src, &slot).await, "the slot was not dropped");
    assert!(
        !publication_exists(&src, &slot).await,
        "the publication was not dropped"
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in ["source-db", "warehouse-db"] {
        eventually(&format!("Secret {name} to be gone"), WAIT, || async {
            secrets.get_opt(name).await.unwrap().is_none()
        })
        .await;
    }
    op.shutdown().await;
}

/// `total-records` of the current snapshot of `ns.table`, from the SQL catalog (`iceberg_tables` in
/// `db`) and the table's metadata file (`file://` warehouses).
async fn iceberg_records(db: &tokio_postgres::Client, ns: &str, table: &str) -> Option<u64> {
    let row = db
        .query_opt(
            "SELECT metadata_location FROM iceberg_tables WHERE table_namespace = $1 AND table_name = $2",
            &[&ns, &table],
        )
        .await
        .ok()??;
    let location: String = row.get(0);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(location.strip_prefix("file://")?).ok()?).ok()?;
    let current = meta["current-snapshot-id"].as_i64()?;
    let snap = meta["snapshots"]
        .as_array()?
        .iter()
        .find(|s| s["snapshot-id"].as_i64() == Some(current))?;
    snap["summary"]["total-records"].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iceberg_pipeline_runs_and_a_spec_naming_both_sinks_is_refused() {
    let ns = "lake";
    let World {
        pg,
        k8s: _k8s,
        client,
        src,
    } = world(
        ns,
        "CREATE TABLE orders (id int PRIMARY KEY, status text, amount numeric(10,2))",
        true,
    )
    .await;
    let op = start_operator(&client, ns, None);
    let lake = file_lake(pg.dir());
    let mut s = spec(&["public.orders"], json!({}));
    s["sink"] = json!({"iceberg": {"warehouse": lake.warehouse, "commitInterval": "500ms"}});
    let api = pipeline(&client, ns, "lake", s.clone()).await;
    wait_status(&api, "lake", "phase Running", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    src.batch_execute(
        "INSERT INTO orders SELECT i, 'new', i * 1.5 FROM generate_series(1, 200) i;
         UPDATE orders SET status = 'paid' WHERE id % 3 = 0; DELETE FROM orders WHERE id % 10 = 0;",
    )
    .await
    .unwrap();
    // 200 inserts, 66 updates, 20 deletes: one changelog row each; delivered counts them once
    // they are in an Iceberg snapshot.
    let p = wait_status(&api, "lake", "every change delivered", |p| {
        p.status.as_ref().and_then(|s| s.events_delivered) == Some(286)
            && condition(p, "SinkHealthy").is_some_and(|c| c.status == "True")
    })
    .await;
    assert!(condition(&p, "Ready").is_some_and(|c| c.status == "True"));
    assert_eq!(iceberg_records(&src, "cdc", "orders").await, Some(286));
    // Read back, as in the standalone tests: the current state pyiceberg and DuckDB compute from
    // the changelog (catalog in the buffer database, here the source's) equals the source table.
    let r = wait_equal(
        &pg,
        &lake,
        "cdc.orders",
        "SELECT id, status, amount FROM orders",
        true,
        WAIT,
    )
    .await;
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["changelog_rows"], 286, "{r}");
    assert_eq!(r["source_rows"], 180, "{r}");

    // Both sinks: refused, naming the field.
    s["sink"]["postgres"] = json!({"connectionSecretRef": {"name": "sink-db", "key": "uri"}});
    let bad = pipeline(&client, ns, "both", s).await;
    let p = wait_status(&bad, "both", "phase Failed", |p| {
        phase(p) == Some(Phase::Failed)
    })
    .await;
    let ready = condition(&p, "Ready").unwrap();
    assert_eq!(ready.reason, "InvalidSpec", "{ready:?}");
    assert!(ready.message.contains("spec.sink.iceberg"), "{ready:?}");
    op.shutdown().await;
}

/// `spec.source.tables` gains a table while the pipeline runs: its rows are backfilled (status and
/// Events show it) while they change; removing it says so in an Event and keeps its sink table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_spec_is_backfilled_and_one_removed_is_noticed() {
    let ns = "grow";
    let World {
        pg,
        k8s: _k8s,
        client,
        src,
    } = world(
        ns,
        "CREATE TABLE orders (id int PRIMARY KEY, v text);
         CREATE TABLE invoices (id int PRIMARY KEY, v text);
         INSERT INTO invoices SELECT i, md5(i::text) FROM generate_series(1, 20000) i;
         ANALYZE invoices;",
        true,
    )
    .await;
    let dst = pg.client("warehouse").await;
    let op = start_operator(&client, ns, None);
    let api = pipeline(&client, ns, "grow", spec(&["public.orders"], json!({}))).await;
    wait_status(&api, "grow", "phase Running", |p| {
        phase(p) == Some(Phase::Running)
    })
    .await;
    let set_tables = |tables: Vec<&'static str>| {
        let api = api.clone();
        async move {
            api.patch(
                "grow",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"source": {"tables": tables}}})),
            )
            .await
            .unwrap();
        }
    };
    set_tables(vec!["public.orders", "public.invoices"]).await;
    // Changes while the copy runs.
    for i in 0..20 {
        src.batch_execute(&format!(
            "UPDATE invoices SET v = 'changed {i}' WHERE id % 97 = {i};
             DELETE FROM invoices WHERE id = {};
             INSERT INTO orders VALUES ({i}, 'o')",
            1000 * i + 7
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = wait_status(&api, "grow", "the backfill done in status", |p| {
        p.status.as_ref().is_some_and(|s| {
            s.backfills
                .iter()
                .any(|b| b.table == "public.invoices" && b.done && b.rows_copied >= 19_000)
        })
    })
    .await;
    let b = &p.status.unwrap().backfills[0];
    assert!(b.rows_estimated >= 19_000, "{b:?}");
    wait_same(&src, "invoices", &dst, "replica.invoices", "id", WAIT).await;
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;

    set_tables(vec!["public.invoices"]).await;
    wait_status(&api, "grow", "orders removed in status", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.tables_removed == vec!["public.orders".to_string()])
    })
    .await;
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    // BackfillStarted only when a status write saw the copy under way; these two always.
    let start = Instant::now();
    loop {
        let reasons: Vec<String> = events
            .list(&Default::default())
            .await
            .map(|l| l.items.iter().filter_map(|e| e.reason.clone()).collect())
            .unwrap_or_default();
        if ["BackfillDone", "TablesRemoved"]
            .iter()
            .all(|r| reasons.iter().any(|x| x == r))
        {
            break;
        }
        assert!(start.elapsed() < WAIT, "events: {reasons:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(count(&dst, "replica.orders").await, 20);
    op.shutdown().await;
}
