//! `kubectl philotes` (the kubectl-philotes binary) against a real kube-apiserver and PostgreSQL,
//! with the operator's controller running in the test process.

mod support;

use std::path::Path;
use std::time::Duration;

use philotes::crd::Phase;
use serde_json::json;
use support::k8s::{
    ApiServer, create_namespace, create_pipeline, install_crd, phase_of, start_operator,
    uri_secret, wait_pipeline,
};
use support::{PASSWORD, Pg, count, eventually};

const NS: &str = "plugin";
const WAIT: Duration = Duration::from_secs(90);

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the plugin with `args` against `k8s` (KUBECONFIG), as `kubectl philotes` would. Nothing it
/// prints may hold a password.
async fn plugin(k8s: &ApiServer, args: &[&str]) -> Out {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_kubectl-philotes"))
        .env("KUBECONFIG", k8s.kubeconfig())
        .args(args)
        .output()
        .await
        .unwrap();
    let out = Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(
        !out.stdout.contains(PASSWORD) && !out.stderr.contains(PASSWORD),
        "kubectl philotes {args:?} printed a password"
    );
    out
}

/// The cell of column `col` in the row of `name`, cut at the header's column offsets.
fn cell(table: &str, name: &str, col: &str) -> String {
    let header = table.lines().next().unwrap_or_default();
    let start = header
        .find(col)
        .unwrap_or_else(|| panic!("no column {col} in\n{table}"));
    let end = header[start + col.len()..]
        .find(|c: char| c != ' ')
        .map(|i| start + col.len() + i);
    let row = line(table, name);
    let row: Vec<char> = row.chars().collect();
    let end = end.unwrap_or(row.len()).min(row.len());
    row[start.min(end)..end]
        .iter()
        .collect::<String>()
        .trim()
        .to_string()
}

fn line<'a>(table: &'a str, name: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().any(|c| c == name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_philotes_status_dlq_pause_resume_and_resync() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = pg.client("warehouse").await;
    src.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, amount numeric)")
        .await
        .unwrap();
    // The sink refuses amounts of 1000 or more: those changes become dead letters.
    dst.batch_execute("CREATE SCHEMA replica; CREATE TABLE replica.orders (id int PRIMARY KEY, amount numeric CONSTRAINT small CHECK (amount < 1000))")
        .await
        .unwrap();
    let k8s = ApiServer::start();
    let client = k8s.client().await;
    install_crd(&client).await;
    create_namespace(&client, NS).await;
    uri_secret(&client, NS, "source-db", &pg.uri("shop")).await;
    uri_secret(&client, NS, "sink-db", &pg.uri("warehouse")).await;
    let op = start_operator(&client, NS, None);
    let spec = |source: &str| {
        json!({
            "source": {"connectionSecretRef": {"name": source, "key": "uri"}, "tables": ["orders"]},
            "sink": {"postgres": {"connectionSecretRef": {"name": "sink-db", "key": "uri"}, "schema": "replica"}},
            "buffer": {"batchSize": 500, "flushInterval": "200ms"},
            "retry": {"maxAttempts": 2, "initialInterval": "100ms", "maxInterval": "1s"},
        })
    };
    let api = create_pipeline(&client, NS, "orders", spec("source-db")).await;
    create_pipeline(&client, NS, "broken", spec("missing-db")).await;
    wait_pipeline(&api, "orders", "orders Running", |p| {
        phase_of(p) == Some(Phase::Running)
    })
    .await;
    wait_pipeline(&api, "broken", "broken Failed", |p| {
        phase_of(p) == Some(Phase::Failed)
    })
    .await;

    src.batch_execute("INSERT INTO orders VALUES (1, 10), (2, 20), (3, 5000), (4, 7000), (5, 50)")
        .await
        .unwrap();
    eventually("the good rows in the sink", WAIT, || async {
        count(&dst, "replica.orders").await == 3
    })
    .await;
    wait_pipeline(&api, "orders", "two dead letters in status", |p| {
        p.status.as_ref().and_then(|s| s.events_dead_lettered) == Some(2)
    })
    .await;

    // status: every pipeline of the namespace; a Failed one makes the exit code 1.
    let all = plugin(&k8s, &["status", "-n", NS]).await;
    assert_eq!(all.code, 1, "{}{}", all.stdout, all.stderr);
    let header = all.stdout.lines().next().unwrap_or_default();
    for col in [
        "NAME",
        "PHASE",
        "LAG",
        "WAL",
        "BUFFERED",
        "DEAD-LETTERED",
        "OWNER",
        "LAST ERROR",
    ] {
        assert!(header.contains(col), "{col} missing:\n{}", all.stdout);
    }
    let t = all.stdout.as_str();
    assert_eq!(cell(t, "orders", "PHASE"), "Running", "{t}");
    let lag = cell(t, "orders", "LAG");
    assert!(
        lag.ends_with('B') && lag.starts_with(|c: char| c.is_ascii_digit()),
        "lag in bytes: {t}"
    );
    assert_eq!(
        cell(t, "orders", "WAL"),
        "reserved",
        "slot wal_status:\n{t}"
    );
    assert_eq!(cell(t, "orders", "DEAD-LETTERED"), "2", "{t}");
    assert_eq!(cell(t, "orders", "OWNER"), "test", "{t}");
    assert_eq!(cell(t, "orders", "LAST ERROR"), "-", "{t}");
    assert_eq!(cell(t, "broken", "PHASE"), "Failed", "{t}");
    let broken = line(&all.stdout, "broken");
    assert!(
        broken.contains("Failed")
            && broken.contains("Secret \"missing-db\" not found")
            && broken.contains("fix: create Secret \"missing-db\""),
        "the error and its fix:\n{}",
        all.stdout
    );
    let one = plugin(&k8s, &["status", "orders", "-n", NS]).await;
    assert_eq!(one.code, 0, "{}{}", one.stdout, one.stderr);
    assert_eq!(one.stdout.lines().count(), 2, "{}", one.stdout);
    let every = plugin(&k8s, &["status", "-A"]).await;
    assert_eq!(every.code, 1);
    assert!(
        every.stdout.starts_with("NAMESPACE") && line(&every.stdout, "orders").starts_with(NS),
        "{}",
        every.stdout
    );
    let missing = plugin(&k8s, &["status", "nope", "-n", NS]).await;
    assert_eq!(missing.code, 2);
    assert!(missing.stderr.contains("nope"), "{}", missing.stderr);

    // kubectl itself finds the plugin on the PATH.
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-philotes"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let via_kubectl = tokio::process::Command::new(k8s.kubectl_path())
        .env("KUBECONFIG", k8s.kubeconfig())
        .env("PATH", path)
        .args(["philotes", "status", "-n", NS])
        .output()
        .await
        .unwrap();
    assert_eq!(via_kubectl.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&via_kubectl.stdout).contains("broken"));

    // dlq list: the dead letters, from the buffer database named by the pipeline's Secrets.
    let list = plugin(&k8s, &["dlq", "list", "orders", "-n", NS]).await;
    assert_eq!(list.code, 0, "{}", list.stderr);
    let letters: Vec<serde_json::Value> = list
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 2, "{}", list.stdout);
    assert_eq!(letters[0]["values"]["id"], "3");
    assert_eq!(letters[1]["values"]["amount"], "7000");
    assert_eq!(letters[0]["pipeline"], "plugin/orders");
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("small"),
        "{}",
        list.stdout
    );
    // A buffer the pipeline never ran on is refused, not answered with "no dead letters".
    let wrong = plugin(
        &k8s,
        &[
            "dlq",
            "list",
            "orders",
            "-n",
            NS,
            "--default-buffer-secret",
            "sink-db",
        ],
    )
    .await;
    assert_eq!(wrong.code, 2, "{}", wrong.stdout);
    assert!(
        wrong
            .stderr
            .contains("holds nothing of pipeline plugin/orders"),
        "{}",
        wrong.stderr
    );
    let broken_dlq = plugin(&k8s, &["dlq", "list", "broken", "-n", NS]).await;
    assert_eq!(broken_dlq.code, 2);
    assert!(
        broken_dlq.stderr.contains("missing-db"),
        "{}",
        broken_dlq.stderr
    );

    // replay: still refused; then the sink accepts one of the two.
    let replay = plugin(&k8s, &["dlq", "replay", "orders", "-n", NS]).await;
    assert_eq!(
        replay.stdout.trim(),
        "replayed 0, still failing 2",
        "{}",
        replay.stderr
    );
    dst.batch_execute(
        "ALTER TABLE replica.orders DROP CONSTRAINT small, ADD CONSTRAINT small CHECK (amount < 6000)",
    )
    .await
    .unwrap();
    let replay = plugin(&k8s, &["dlq", "replay", "orders", "-n", NS]).await;
    assert_eq!(
        replay.stdout.trim(),
        "replayed 1, still failing 1",
        "{}",
        replay.stderr
    );
    assert_eq!(count(&dst, "replica.orders").await, 4);
    let purge = plugin(&k8s, &["dlq", "purge", "orders", "-n", NS]).await;
    assert_eq!(purge.stdout.trim(), "purged 1", "{}", purge.stderr);
    let list = plugin(&k8s, &["dlq", "list", "orders", "-n", NS]).await;
    assert_eq!(
        (list.code, list.stdout.as_str()),
        (0, ""),
        "{}",
        list.stderr
    );

    // pause: the phase turns Paused and the sink stops changing; resume: it catches up.
    let pause = plugin(&k8s, &["pause", "orders", "-n", NS]).await;
    assert_eq!(pause.code, 0, "{}", pause.stderr);
    wait_pipeline(&api, "orders", "Paused", |p| {
        phase_of(p) == Some(Phase::Paused)
    })
    .await;
    let paused = plugin(&k8s, &["status", "orders", "-n", NS]).await;
    assert_eq!(cell(&paused.stdout, "orders", "PHASE"), "Paused");
    src.batch_execute("INSERT INTO orders VALUES (6, 60)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count(&dst, "replica.orders").await,
        4,
        "the sink changed while paused"
    );
    let resume = plugin(&k8s, &["resume", "orders", "-n", NS]).await;
    assert_eq!(resume.code, 0, "{}", resume.stderr);
    wait_pipeline(&api, "orders", "Running again", |p| {
        phase_of(p) == Some(Phase::Running)
    })
    .await;
    eventually("row 6 after resume", WAIT, || async {
        count(&dst, "replica.orders").await == 5
    })
    .await;

    // resync: a new token, the pipeline rebuilt once (status.lastResync).
    let resync = plugin(&k8s, &["resync", "orders", "-n", NS, "--token", "t1"]).await;
    assert_eq!(resync.code, 0, "{}", resync.stderr);
    wait_pipeline(&api, "orders", "lastResync t1", |p| {
        p.status.as_ref().and_then(|s| s.last_resync.as_deref()) == Some("t1")
            && phase_of(p) == Some(Phase::Running)
    })
    .await;
    let resync = plugin(&k8s, &["resync", "orders", "-n", NS]).await;
    assert_eq!(resync.code, 0, "{}", resync.stderr);
    let token = api
        .get("orders")
        .await
        .unwrap()
        .spec
        .resync
        .unwrap_or_default();
    assert!(token.starts_with("kubectl-philotes-20"), "{token}");
    op.shutdown().await;
}
