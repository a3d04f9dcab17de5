//! Two operator replicas (separate `philotes operator` processes, as pods would be) against a real
//! API server share the pipelines: each runs on the replica that rendezvous hashing over the live
//! membership Leases names, status says which, a paused replica loses its pipelines and cannot write
//! when it wakes, and a replica that stops hands its pipelines over.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kube::ResourceExt;
use kube::api::Api;
use philotes::crd::{CdcPipeline, Phase};
use philotes::operator::assignment;
use support::k8s::{ApiServer, install_crd};
use support::{Pg, wait_same};

const NS: &str = "scale";
const PIPELINES: usize = 6;
const WAIT: Duration = Duration::from_secs(120);

fn operator(k8s: &ApiServer, identity: &str, log: &Path) -> Child {
    let out = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_philotes"))
        .args(["operator", "--namespace", NS, "--identity", identity])
        .args(["--health-addr", "127.0.0.1:0"])
        .env("KUBECONFIG", k8s.kubeconfig())
        .env("POD_NAMESPACE", NS)
        .env("RUST_LOG", "warn,philotes=info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig}");
}

/// Waits until every pipeline is Running with the owner `expect` gives for its uid.
async fn wait_owners(
    api: &Api<CdcPipeline>,
    what: &str,
    logs: &[PathBuf],
    expect: impl Fn(&str) -> String,
) -> Vec<(String, String)> {
    let start = Instant::now();
    loop {
        let list = api.list(&Default::default()).await.unwrap().items;
        let now: Vec<(String, String, Option<Phase>, Option<String>)> = list
            .iter()
            .map(|p| {
                let s = p.status.clone().unwrap_or_default();
                (p.name_any(), p.uid().unwrap_or_default(), s.phase, s.owner)
            })
            .collect();
        if now.len() == PIPELINES
            && now.iter().all(|(_, uid, phase, owner)| {
                *phase == Some(Phase::Running) && owner.as_deref() == Some(expect(uid).as_str())
            })
        {
            return now
                .into_iter()
                .map(|(n, _, _, o)| (n, o.unwrap_or_default()))
                .collect();
        }
        if start.elapsed() > WAIT {
            for l in logs {
                println!(
                    "{}:\n{}",
                    l.display(),
                    std::fs::read_to_string(l).unwrap_or_default()
                );
            }
            panic!("timed out waiting for {what}: {now:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn all_same(src: &tokio_postgres::Client, dst: &tokio_postgres::Client) {
    for i in 0..PIPELINES {
        wait_same(
            src,
            &format!("t{i}"),
            dst,
            &format!("replica.t{i}"),
            "id",
            WAIT,
        )
        .await;
    }
}

async fn write(src: &tokio_postgres::Client, round: i64) {
    for i in 0..PIPELINES {
        src.batch_execute(&format!(
            "INSERT INTO t{i} SELECT g, 'r{round}' FROM generate_series({a}, {b}) g;
             UPDATE t{i} SET v = v || '+' WHERE id % 5 = 0; DELETE FROM t{i} WHERE id % 17 = {round};",
            a = round * 100 + 1,
            b = round * 100 + 100
        ))
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_pipelines_and_hand_them_over() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = pg.client("warehouse").await;
    for i in 0..PIPELINES {
        src.batch_execute(&format!("CREATE TABLE t{i} (id int PRIMARY KEY, v text)"))
            .await
            .unwrap();
    }
    let k8s = ApiServer::start();
    let client = k8s.client().await;
    install_crd(&client).await;
    k8s.kubectl(&["create", "namespace", NS]);
    let mut manifest = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: db, namespace: {NS}}}\nstringData: {{source: \"{}\", sink: \"{}\"}}\n",
        pg.uri("shop"),
        pg.uri("warehouse")
    );
    for i in 0..PIPELINES {
        manifest.push_str(&format!(
            "---\napiVersion: philotes.io/v1alpha1\nkind: CdcPipeline\nmetadata: {{name: p{i}, namespace: {NS}}}\nspec:\n  source: {{connectionSecretRef: {{name: db, key: source}}, tables: [public.t{i}]}}\n  sink: {{postgres: {{connectionSecretRef: {{name: db, key: sink}}, schema: replica}}}}\n  buffer: {{batchSize: 500, flushInterval: 200ms}}\n  retry: {{maxAttempts: 2, initialInterval: 100ms, maxInterval: 1s}}\n"
        ));
    }
    let file = pg.dir().join("pipelines.yaml");
    std::fs::write(&file, manifest).unwrap();

    let logs = [
        pg.dir().join("replica-a.log"),
        pg.dir().join("replica-b.log"),
    ];
    let mut a = operator(&k8s, "replica-a", &logs[0]);
    let mut b = operator(&k8s, "replica-b", &logs[1]);
    k8s.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let api: Api<CdcPipeline> = Api::namespaced(client.clone(), NS);
    let both: BTreeSet<String> = ["replica-a".into(), "replica-b".into()].into();
    let by_hash = |members: &BTreeSet<String>| {
        let members = members.clone();
        move |uid: &str| {
            assignment::owner(uid, &members)
                .unwrap_or_default()
                .to_string()
        }
    };

    // Each pipeline runs on the replica rendezvous hashing names; status and -o wide say which.
    let owners = wait_owners(&api, "the owners the hash names", &logs, by_hash(&both)).await;
    println!("owners: {owners:?}");
    let wide = k8s.kubectl(&["get", "cdcp", "-n", NS, "-o", "wide"]);
    println!("{wide}");
    assert!(
        wide.lines().next().unwrap_or_default().contains("OWNER"),
        "{wide}"
    );
    write(&src, 1).await;
    all_same(&src, &dst).await;

    // replica-a pauses (SIGSTOP): its Lease expires, replica-b takes its pipelines (a higher epoch,
    // a's replication sessions ended) while changes keep coming.
    signal(&a, "-STOP");
    let only_b: BTreeSet<String> = ["replica-b".into()].into();
    write(&src, 2).await;
    let taken = Instant::now();
    wait_owners(
        &api,
        "replica-b to own every pipeline",
        &logs,
        by_hash(&only_b),
    )
    .await;
    println!(
        "replica-b took every pipeline {:?} after replica-a paused",
        taken.elapsed()
    );
    write(&src, 3).await;
    all_same(&src, &dst).await;
    let epochs: Vec<(String, i64, Option<String>)> = src
        .query(
            "SELECT name, epoch, owner FROM philotes.pipelines ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    println!("epochs while replica-a is paused: {epochs:?}");
    assert!(
        epochs
            .iter()
            .all(|(_, _, o)| o.as_deref() == Some("replica-b")),
        "{epochs:?}"
    );

    // replica-a wakes: whatever it still held is fenced; it rejoins and takes back its share.
    signal(&a, "-CONT");
    write(&src, 4).await;
    wait_owners(
        &api,
        "replica-a to take back its share",
        &logs,
        by_hash(&both),
    )
    .await;
    write(&src, 5).await;
    all_same(&src, &dst).await;

    // replica-b stops gracefully (SIGTERM): it flushes, deletes its Lease, and replica-a takes over.
    signal(&b, "-TERM");
    let left = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(s) = b.try_wait().unwrap() {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("replica-b did not stop on SIGTERM");
    assert!(status.success(), "{status:?}");
    let only_a: BTreeSet<String> = ["replica-a".into()].into();
    write(&src, 6).await;
    wait_owners(
        &api,
        "replica-a to own every pipeline",
        &logs,
        by_hash(&only_a),
    )
    .await;
    let moved = left.elapsed();
    println!("replica-a owned every pipeline {moved:?} after replica-b was told to stop");
    assert!(
        moved < Duration::from_secs(45),
        "a graceful leave took {moved:?} to hand over"
    );
    write(&src, 7).await;
    all_same(&src, &dst).await;
    a.kill().unwrap();
    a.wait().unwrap();
}
