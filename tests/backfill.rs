//! Tables added to and removed from a running pipeline (real PostgreSQL): the added ones are
//! backfilled on the same slot while their rows change and the other tables stream on.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use philotes::crd::DesiredState;
use philotes::engine::Progress;
use philotes::engine::metrics::Metrics;
use philotes::engine::state::Phase;
use philotes::supervisor::Supervisor;
use support::pipeline::{FAST, WAIT, config, db_manifest, setup, write_manifest};
use support::{Pg, count, eventually, init_logs, run_philotes, wait_same};

/// Changes to every table while a backfill runs: inserts, updates, deletes and key changes of the
/// tables being copied, inserts into the streamed one. Returns how many rounds it made.
async fn churn(client: tokio_postgres::Client, stop: Arc<AtomicBool>) -> u64 {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let (r1, r2, r3, r4, r5) = (
            next() % 30_000 + 1,
            next() % 30_000 + 1,
            next() % 30_000 + 1,
            next() % 500,
            next() % 500,
        );
        client
            .batch_execute(&format!(
                "INSERT INTO b VALUES ({new}, 'new {round}', 0);
                 UPDATE b SET n = n + 1, v = 'updated {round}' WHERE id = {r1};
                 DELETE FROM b WHERE id = {r2};
                 UPDATE b SET id = id + 1000000 WHERE id = {r3};
                 BEGIN;
                 UPDATE c SET v = v + 1 WHERE k1 = {r4};
                 DELETE FROM c WHERE k1 = {r5} AND k2 = 'x';
                 INSERT INTO c VALUES ({r5}, 'x', {round}) ON CONFLICT DO NOTHING;
                 COMMIT;
                 INSERT INTO a VALUES ({new}, 'streamed');",
                new = 100_000 + round
            ))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    round
}

async fn wait_progress(
    sup: &Supervisor,
    id: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&Progress) -> bool,
) -> Progress {
    let start = std::time::Instant::now();
    loop {
        if let Some(rx) = sup.progress(id).await {
            let p = rx.borrow().clone();
            if f(&p) {
                return p;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; progress: {p:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_added_to_a_running_pipeline_are_backfilled_while_their_rows_change() {
    add_backfill_remove(FAST).await;
}

/// The same with `spec.buffer.bypass`: the chunks go straight to the sink, and a chunk counts as
/// copied once the sink holds it durably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_added_to_a_pipeline_bypassing_the_buffer_are_backfilled_too() {
    let extra = FAST.replace(
        "flushInterval: 200ms}",
        "flushInterval: 200ms, bypass: true}",
    );
    assert!(extra.contains("bypass: true"));
    add_backfill_remove(&extra).await;
}

/// A pipeline on table `a`; `b` (30,000 rows) and `c` (composite key) added while a writer changes
/// all three; then `a` removed and added back.
async fn add_backfill_remove(extra: &str) {
    init_logs();
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id bigint PRIMARY KEY, v text);
         CREATE TABLE b (id bigint PRIMARY KEY, v text, n int);
         CREATE TABLE c (k1 int, k2 text, v int, PRIMARY KEY (k1, k2));
         INSERT INTO a SELECT i, 'before' FROM generate_series(1, 100) i;
         INSERT INTO b SELECT i, md5(i::text), 0 FROM generate_series(1, 30000) i;
         INSERT INTO c SELECT i % 500, 'k' || (i / 500), i FROM generate_series(1, 5000) i;
         ANALYZE b, c;",
    )
    .await
    .unwrap();
    let sup = Supervisor::new(Arc::new(Metrics::new()), "test");
    let (src_uri, dst_uri) = (pg.uri("shop"), pg.uri("warehouse"));
    let cfg = |tables: &[&str]| config("grow", &src_uri, &dst_uri, tables, extra);
    let id = cfg(&["a"]).id.clone();
    sup.apply(&id, Some((cfg(&["a"]), DesiredState::Running)))
        .await;
    wait_progress(&sup, &id, "Running", WAIT, |p| p.phase == Phase::Running).await;
    wait_same(&src, "a", &dst, "replica.a", "id", WAIT).await;
    let slot: String = src
        .query_one("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);

    // Writers run through the backfill; then b and c are added.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(churn(pg.client("shop").await, stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    sup.apply(&id, Some((cfg(&["a", "b", "c"]), DesiredState::Running)))
        .await;
    let started = wait_progress(&sup, &id, "backfills to start", WAIT, |p| {
        p.backfills.len() == 2
    })
    .await;
    let b = started
        .backfills
        .iter()
        .find(|x| x.table == "public.b")
        .unwrap();
    assert!(b.rows_estimated >= 29_000, "estimate from reltuples: {b:?}");
    let done = wait_progress(
        &sup,
        &id,
        "both backfills done",
        Duration::from_secs(180),
        |p| p.backfills.len() == 2 && p.backfills.iter().all(|b| b.done),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.await.unwrap();
    println!(
        "backfills: {:?}; {rounds} rounds of changes during them; {} events read",
        done.backfills, done.events_read
    );
    assert!(rounds > 20, "the writer made only {rounds} rounds");
    for (t, order) in [("a", "id"), ("b", "id"), ("c", "k1, k2")] {
        wait_same(&src, t, &dst, &format!("replica.{t}"), order, WAIT).await;
    }
    // The same slot all along: no new slot, no snapshot of every table.
    let slots: Vec<String> = src
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(slots, vec![slot.clone()]);

    // Removing a table: no longer captured, its sink table stays; the others go on.
    sup.apply(&id, Some((cfg(&["b", "c"]), DesiredState::Running)))
        .await;
    let p = wait_progress(&sup, &id, "a removed", WAIT, |p| {
        p.phase == Phase::Running && !p.tables_removed.is_empty()
    })
    .await;
    assert_eq!(p.tables_removed, vec!["public.a".to_string()]);
    assert!(p.backfills.is_empty(), "{:?}", p.backfills);
    let kept = count(&dst, "replica.a").await;
    src.batch_execute(
        "INSERT INTO a VALUES (-1, 'after removal'); INSERT INTO b VALUES (-1, 'after removal', 0)",
    )
    .await
    .unwrap();
    wait_same(&src, "b", &dst, "replica.b", "id", WAIT).await;
    assert_eq!(count(&dst, "replica.a").await, kept);
    let published: i64 = src
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'a'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 0);
    // Added back: backfilled again (the row added while it was not captured arrives).
    sup.apply(&id, Some((cfg(&["a", "b", "c"]), DesiredState::Running)))
        .await;
    wait_progress(&sup, &id, "a backfilled again", WAIT, |p| {
        p.backfills.iter().any(|b| b.table == "public.a" && b.done)
    })
    .await;
    wait_same(&src, "a", &dst, "replica.a", "id", WAIT).await;
    sup.shutdown().await;
}

/// `philotes run` of pipeline `name` on table `a`; once `a` is in the sink, the file names `a, b`
/// and the process gets SIGHUP. Returns the file's folder, the log and the process.
async fn run_on_a_then_add_b(
    pg: &Pg,
    src: &tokio_postgres::Client,
    dst: &tokio_postgres::Client,
    name: &str,
) -> (tempfile::TempDir, std::path::PathBuf, std::process::Child) {
    let dir = tempfile::tempdir().unwrap();
    let keys = [("source", pg.uri("shop")), ("sink", pg.uri("warehouse"))];
    let keys: Vec<(&str, &str)> = keys.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (file, log) = write_manifest(dir.path(), &db_manifest(name, &keys, "a", ""));
    let child = run_philotes(&file, &log, &[]);
    wait_same(src, "a", dst, "replica.a", "id", WAIT).await;
    write_manifest(dir.path(), &db_manifest(name, &keys, "a, b", ""));
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    (dir, log, child)
}

/// `philotes run` reads its file again on SIGHUP: a table added there is backfilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn philotes_run_applies_an_added_table_on_sighup() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT i, 'a' FROM generate_series(1, 10) i;
         INSERT INTO b SELECT i, 'b' FROM generate_series(1, 2500) i;",
    )
    .await
    .unwrap();
    let (_dir, log, mut child) = run_on_a_then_add_b(&pg, &src, &dst, "hup").await;
    src.batch_execute("UPDATE b SET v = 'changed' WHERE id <= 10; INSERT INTO a VALUES (11, 'a')")
        .await
        .unwrap();
    wait_same(&src, "b", &dst, "replica.b", "id", WAIT).await;
    wait_same(&src, "a", &dst, "replica.a", "id", WAIT).await;
    eventually("the log to name the reload", WAIT, || async {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("SIGHUP"))
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
}

/// `kill -9` in the middle of a backfill: the next process goes on from the last chunk recorded
/// (not from the start), and the sink ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_cut_by_sigkill_resumes_from_its_last_chunk() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a VALUES (1, 'a');
         INSERT INTO b SELECT i, md5(i::text) FROM generate_series(1, 200000) i;",
    )
    .await
    .unwrap();
    let (dir, log, mut child) = run_on_a_then_add_b(&pg, &src, &dst, "cut").await;
    let file = dir.path().join("pipeline.yaml");
    // The buffer (in the source database) records each chunk once it is acknowledged.
    let copied = || async {
        src.query_opt(
            "SELECT rows_copied, done FROM philotes.backfills WHERE table_name = 'b'",
            &[],
        )
        .await
        .ok()
        .flatten()
        .map(|r| (r.get::<_, i64>(0), r.get::<_, bool>(1)))
    };
    eventually("part of b copied", WAIT, || async {
        copied().await.is_some_and(|(n, done)| n > 0 && !done)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let (at_kill, _) = copied().await.unwrap();
    src.batch_execute("DELETE FROM b WHERE id % 1000 = 0; UPDATE b SET v = 'x' WHERE id % 777 = 0")
        .await
        .unwrap();
    let mut child = run_philotes(&file, &log, &[]);
    eventually(
        "the backfill of b done",
        Duration::from_secs(120),
        || async { copied().await.is_some_and(|(_, done)| done) },
    )
    .await;
    wait_same(&src, "b", &dst, "replica.b", "id", WAIT).await;
    let (total, _) = copied().await.unwrap();
    println!("rows copied when killed: {at_kill}; in all: {total}");
    // Resumed: the rows before the last recorded chunk were not selected again.
    assert!(total < 200_000 + 2_000, "copied {total}: started over?");
    assert!(at_kill < 200_000, "{at_kill}");
    let _ = child.kill();
    let _ = child.wait();
}

/// A partitioned table added while the pipeline runs: one sink table named after its root, rows
/// moving between partitions during the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_added_is_backfilled_into_one_table_named_after_its_root() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');
         INSERT INTO a VALUES (1, 'a');
         INSERT INTO m SELECT i, CASE WHEN i % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' FROM generate_series(1, 8000) i;",
    )
    .await
    .unwrap();
    let sup = Supervisor::new(Arc::new(Metrics::new()), "test");
    let (src_uri, dst_uri) = (pg.uri("shop"), pg.uri("warehouse"));
    let cfg = |tables: &[&str]| config("parts", &src_uri, &dst_uri, tables, FAST);
    let id = cfg(&["a"]).id.clone();
    sup.apply(&id, Some((cfg(&["a"]), DesiredState::Running)))
        .await;
    wait_same(&src, "a", &dst, "replica.a", "id", WAIT).await;
    sup.apply(&id, Some((cfg(&["a", "m"]), DesiredState::Running)))
        .await;
    // Rows move between partitions (a delete and an insert under the root) while m is copied.
    for i in 0..40 {
        src.batch_execute(&format!(
            "UPDATE m SET region = CASE region WHEN 'eu' THEN 'us' ELSE 'eu' END, v = 'moved {i}' WHERE id % 200 = {i};
             DELETE FROM m WHERE id = {};",
            200 * i + 3
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_progress(&sup, &id, "the backfill of m done", WAIT, |p| {
        p.backfills.iter().any(|b| b.table == "public.m" && b.done)
    })
    .await;
    wait_same(&src, "m", &dst, "replica.m", "id, region", WAIT).await;
    let partitions: i64 = dst
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'replica' AND tablename LIKE 'm\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(partitions, 0, "sink tables named after partitions");
    sup.shutdown().await;
}
