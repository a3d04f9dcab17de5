//! Three operator replicas (separate `philotes operator` processes, as pods would be) against a real
//! API server share 24 pipelines: each runs on the replica that rendezvous hashing over the live
//! membership Leases names, and status says which. A killed replica's pipelines move within 30 s; a
//! paused one loses its pipelines and its writes are refused when it wakes; a rolling restart leaves
//! no pipeline without a Running owner for more than 30 s; the sink equals the source throughout.

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
const PIPELINES: usize = 24;
const WAIT: Duration = Duration::from_secs(120);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A replica: `philotes operator` as its own process, its health server on `port`.
fn operator(k8s: &ApiServer, identity: &str, port: u16, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_philotes"))
        .args(["operator", "--namespace", NS, "--identity", identity])
        .args(["--health-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", k8s.kubeconfig())
        .env("POD_NAMESPACE", NS)
        .env("RUST_LOG", "warn,philotes=info")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap()
}

/// `philotes_superseded_writes_total` of the replica serving on `port` (None while it does not answer).
async fn superseded_writes(port: u16) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with("philotes_superseded_writes_total "))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
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
    expect: impl Fn(&str, &BTreeSet<String>) -> String,
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
        let uids: BTreeSet<String> = now.iter().map(|(_, uid, _, _)| uid.clone()).collect();
        if now.len() == PIPELINES
            && now.iter().all(|(_, uid, phase, owner)| {
                *phase == Some(Phase::Running)
                    && owner.as_deref() == Some(expect(uid, &uids).as_str())
            })
        {
            return now
                .into_iter()
                .map(|(n, _, _, o)| (n, o.unwrap_or_default()))
                .collect();
        }
        if start.elapsed() > WAIT {
            print_logs(logs);
            panic!("timed out waiting for {what}: {now:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn print_logs(logs: &[PathBuf]) {
    for l in logs {
        println!(
            "{}:\n{}",
            l.display(),
            std::fs::read_to_string(l).unwrap_or_default()
        );
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
async fn three_replicas_share_pipelines_through_kills_pauses_and_a_rolling_restart() {
    let pg =
        Pg::start_conf("max_connections = 500\nmax_replication_slots = 40\nmax_wal_senders = 40");
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

    let names = ["replica-a", "replica-b", "replica-c"];
    let ports: Vec<u16> = names.iter().map(|_| free_port()).collect();
    let logs: Vec<PathBuf> = names
        .iter()
        .map(|n| pg.dir().join(format!("{n}.log")))
        .collect();
    let mut replicas: Vec<Child> = (0..3)
        .map(|i| operator(&k8s, names[i], ports[i], &logs[i]))
        .collect();
    k8s.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    let api: Api<CdcPipeline> = Api::namespaced(client.clone(), NS);
    let members =
        |ids: &[usize]| -> BTreeSet<String> { ids.iter().map(|i| names[*i].to_string()).collect() };
    let by_hash = |members: BTreeSet<String>| {
        move |uid: &str, uids: &BTreeSet<String>| {
            assignment::owner(uid, uids, &members).unwrap_or_default()
        }
    };

    // Every pipeline Running with exactly one owner, the one the hash names; no replica has more
    // than half.
    let owners = wait_owners(
        &api,
        "the owners the hash names",
        &logs,
        by_hash(members(&[0, 1, 2])),
    )
    .await;
    let mut per: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, o) in &owners {
        *per.entry(o.clone()).or_default() += 1;
    }
    println!("pipelines per replica: {per:?}");
    assert!(per.values().all(|n| *n <= PIPELINES / 2), "{per:?}");
    // The buffer agrees: each pipeline's epoch was last taken by its status owner (replicas that
    // started a moment apart may have taken pipelines first and handed them over since).
    let start = Instant::now();
    loop {
        let recorded: Vec<(String, Option<String>)> = src
            .query(
                "SELECT name, owner FROM philotes.pipelines ORDER BY name",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let agree = owners.iter().all(|(name, owner)| {
            let want = format!("{NS}/{name}");
            recorded
                .iter()
                .any(|(n, o)| *n == want && o.as_deref() == Some(owner.as_str()))
        });
        if agree {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "status owners {owners:?}, buffer owners {recorded:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let wide = k8s.kubectl(&["get", "cdcp", "-n", NS, "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap_or_default().contains("OWNER"),
        "{wide}"
    );
    write(&src, 1).await;
    all_same(&src, &dst).await;

    // kill -9 replica-c: its Lease expires, and its pipelines run on the others within 30 s.
    let killed = Instant::now();
    replicas[2].kill().unwrap();
    replicas[2].wait().unwrap();
    write(&src, 2).await;
    wait_owners(
        &api,
        "a and b to own every pipeline",
        &logs,
        by_hash(members(&[0, 1])),
    )
    .await;
    let after_kill = killed.elapsed();
    println!("handover after kill -9: {after_kill:?}");
    assert!(after_kill <= Duration::from_secs(30), "{after_kill:?}");
    all_same(&src, &dst).await;
    replicas[2] = operator(&k8s, names[2], ports[2], &logs[2]);
    wait_owners(
        &api,
        "replica-c to take its share back",
        &logs,
        by_hash(members(&[0, 1, 2])),
    )
    .await;

    // kill -STOP replica-b past its Lease: its pipelines move; when it wakes, its writes are refused
    // (counted), it gives the pipelines up to their new owners and then takes its share back.
    signal(&replicas[1], "-STOP");
    let paused = Instant::now();
    write(&src, 3).await;
    wait_owners(
        &api,
        "a and c to own every pipeline",
        &logs,
        by_hash(members(&[0, 2])),
    )
    .await;
    println!("handover after SIGSTOP: {:?}", paused.elapsed());
    write(&src, 4).await;
    signal(&replicas[1], "-CONT");
    let start = Instant::now();
    let refused = loop {
        let n = superseded_writes(ports[1]).await.unwrap_or(0);
        if n > 0 {
            break n;
        }
        if start.elapsed() > WAIT {
            print_logs(&logs[1..2]);
            panic!("replica-b's refused writes were not counted");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("writes refused to replica-b after it woke: {refused}");
    wait_owners(
        &api,
        "replica-b to take its share back",
        &logs,
        by_hash(members(&[0, 1, 2])),
    )
    .await;
    write(&src, 5).await;
    all_same(&src, &dst).await;

    // Rolling restart, one replica at a time, while the sources write: no pipeline goes without a
    // Running owner for more than 30 s.
    let watch = {
        let api = api.clone();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = done.clone();
        let task = tokio::spawn(async move {
            let mut down_since: std::collections::HashMap<String, Instant> = Default::default();
            let mut worst = Duration::ZERO;
            while !d.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(list) = api.list(&Default::default()).await {
                    for p in list.items {
                        let running =
                            p.status.as_ref().and_then(|s| s.phase) == Some(Phase::Running);
                        let name = p.name_any();
                        if running {
                            if let Some(t) = down_since.remove(&name) {
                                worst = worst.max(t.elapsed());
                            }
                        } else {
                            down_since.entry(name).or_insert_with(Instant::now);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            for t in down_since.values() {
                worst = worst.max(t.elapsed());
            }
            worst
        });
        (done, task)
    };
    let mut graceful = Vec::new();
    for i in 0..3 {
        let term = Instant::now();
        signal(&replicas[i], "-TERM");
        let status = support::wait_exit(&mut replicas[i], Duration::from_secs(60))
            .await
            .expect("a replica did not stop on SIGTERM");
        assert!(status.success(), "{}: {status:?}", names[i]);
        write(&src, 6 + i as i64).await;
        let others: Vec<usize> = (0..3).filter(|j| *j != i).collect();
        wait_owners(
            &api,
            "the others to own every pipeline",
            &logs,
            by_hash(members(&others)),
        )
        .await;
        graceful.push(term.elapsed());
        replicas[i] = operator(&k8s, names[i], ports[i], &logs[i]);
        wait_owners(
            &api,
            "the restarted replica to take its share",
            &logs,
            by_hash(members(&[0, 1, 2])),
        )
        .await;
    }
    watch.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let worst = watch.1.await.unwrap();
    // Graceful handover: from SIGTERM until the others run every pipeline the leaver had.
    println!("graceful handover (SIGTERM until the others own all): {graceful:?}");
    println!("longest a pipeline was not Running during the rolling restart: {worst:?}");
    assert!(worst <= Duration::from_secs(30), "{worst:?}");
    write(&src, 9).await;
    all_same(&src, &dst).await;
    for mut r in replicas {
        let _ = r.kill();
        let _ = r.wait();
    }
}
