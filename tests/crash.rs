//! `philotes run` as a process, killed with SIGKILL in the middle of a 100k-row stream.

mod support;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::{Pg, count, eventually, wait_same};

fn start(file: &std::path::Path, log: &std::path::Path) -> Child {
    support::run_philotes(file, log, &[])
}

/// Databases shop and warehouse, the table made by `ddl`, and a manifest file for one pipeline of
/// `table` with `extra` spec lines. Returns (source client, sink client, manifest path, log path).
async fn prepare(
    pg: &Pg,
    ddl: &str,
    table: &str,
    extra: &str,
) -> (
    tokio_postgres::Client,
    tokio_postgres::Client,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = pg.client("warehouse").await;
    src.batch_execute(ddl).await.unwrap();
    let (file, log) = support::pipeline::write_manifest(
        pg.dir(),
        &support::pipeline::db_manifest(
            "crash",
            &[("source", &pg.uri("shop")), ("sink", &pg.uri("warehouse"))],
            table,
            extra,
        ),
    );
    (src, dst, file, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing() {
    sigkill_mid_stream("").await;
}

/// With `spec.buffer.bypass` the source is acknowledged from the sink's own position: what the
/// kill cut off is sent again, and what the sink had is not applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_nothing_when_bypassing_the_buffer() {
    sigkill_mid_stream(", bypass: true").await;
}

/// 100k rows in 100 transactions with `buffer` settings `buffer_extra`; SIGKILL after 10k rows
/// reached the sink; after a restart the sink equals the source.
async fn sigkill_mid_stream(buffer_extra: &str) {
    let pg = Pg::start();
    let (src, dst, file, log) = prepare(
        &pg,
        "CREATE TABLE t (id bigint PRIMARY KEY, v text, n int)",
        "public.t",
        &format!("  buffer: {{batchSize: 1000, flushInterval: 200ms{buffer_extra}}}\n  backpressure: {{highWatermark: 20000, lowWatermark: 10000, checkInterval: 100ms}}"),
    )
    .await;

    let mut child = start(&file, &log);
    eventually(
        "the sink table to be created",
        Duration::from_secs(60),
        || async { count(&dst, "replica.t").await >= 0 },
    )
    .await;

    // 100k rows in 100 transactions, with updates and deletes mixed in.
    let load_client = pg.client("shop").await;
    let load = tokio::spawn(async move {
        for k in 0..100i64 {
            load_client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO t SELECT i, md5(i::text), 0 FROM generate_series({}, {}) i;
                     UPDATE t SET n = n + 1 WHERE id % 7 = 0 AND id > {}; DELETE FROM t WHERE id % 100 = 99 AND id > {}; COMMIT;",
                    k * 1000 + 1,
                    k * 1000 + 1000,
                    k * 1000 - 2000,
                    k * 1000 - 1000
                ))
                .await
                .unwrap();
        }
    });

    let started = Instant::now();
    eventually(
        "part of the stream to reach the sink",
        Duration::from_secs(120),
        || async { count(&dst, "replica.t").await >= 10_000 },
    )
    .await;
    let at_kill = count(&dst, "replica.t").await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    println!(
        "killed after {:?} with {at_kill} rows in the sink",
        started.elapsed()
    );
    load.await.unwrap();
    assert!(
        at_kill < 99_000,
        "the kill should land mid-stream, but the sink already had {at_kill} rows"
    );

    let mut child = start(&file, &log);
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(180)).await;
    assert_eq!(count(&dst, "replica.t").await, 99_000);

    // A graceful stop (SIGTERM) exits 0.
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "exit {status:?}; log:\n{output}");
    assert!(output.contains("stopped"), "{output}");
    assert!(
        !output.contains(support::PASSWORD),
        "the password leaked into the output"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_the_initial_snapshot_starts_it_over() {
    let pg = Pg::start();
    let (src, dst, file, log) = prepare(
        &pg,
        "CREATE TABLE big (id bigint PRIMARY KEY, v text);
         INSERT INTO big SELECT i, repeat(md5(i::text), 4) FROM generate_series(1, 100000) i;",
        "big",
        "  buffer: {batchSize: 2000, flushInterval: 200ms}",
    )
    .await;
    let mut child = start(&file, &log);
    eventually("the snapshot to be under way", Duration::from_secs(120), || async {
        src.query_one(
            "SELECT (SELECT count(*) FROM philotes.events) > 0 AND NOT bool_or(snapshot_done) FROM philotes.pipelines",
            &[],
        )
        .await
        .map(|r| r.get::<_, Option<bool>>(0) == Some(true))
        .unwrap_or(false)
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    src.batch_execute(
        "DELETE FROM big WHERE id <= 10; UPDATE big SET v = 'between runs' WHERE id = 11",
    )
    .await
    .unwrap();

    let mut child = start(&file, &log);
    src.batch_execute("INSERT INTO big VALUES (1000000, 'after restart')")
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(120),
        wait_same(
            &src,
            "big",
            &dst,
            "replica.big",
            "id",
            Duration::from_secs(3600),
        ),
    )
    .await;
    assert!(
        done.is_ok(),
        "the sink did not match the source; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let slots: i64 = src
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        slots, 1,
        "the interrupted attempt's slot was dropped and made again"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A large transaction whose commit record directly follows a one-row transaction's: its rows are
/// keyed by its commit LSN, which equals the durable position the one-row transaction left. SIGKILL
/// while it streams into the buffer; the restart must discard those rows (they are not durable) and
/// read the transaction again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_a_transaction_committed_right_after_another_loses_nothing() {
    let pg = Pg::start();
    // Buffer and sink in a cluster of their own, so that no buffer write lands between the commits.
    let sink = Pg::start();
    pg.create_db("shop").await;
    sink.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = sink.client("warehouse").await;
    src.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text); CREATE EXTENSION dblink")
        .await
        .unwrap();
    let (file, log) = support::pipeline::write_manifest(
        pg.dir(),
        &support::pipeline::db_manifest(
            "boundary",
            &[
                ("source", &pg.uri("shop")),
                ("sink", &sink.uri("warehouse")),
            ],
            "t",
            "  buffer: {connectionSecretRef: {name: db, key: sink}, batchSize: 2000, flushInterval: 200ms}\n  backpressure: {highWatermark: 1000000, lowWatermark: 500000}",
        ),
    );
    let mut child = start(&file, &log);
    eventually(
        "the sink table to be created",
        Duration::from_secs(60),
        || async { count(&dst, "replica.t").await >= 0 },
    )
    .await;

    // Two more sessions (dblink): the large transaction is open in one; the one-row transaction
    // commits in the other, and the large one commits in the same statement right after.
    let conn = format!(
        "host=127.0.0.1 port={} dbname=shop user={} password={}",
        pg.port,
        support::USER,
        support::PASSWORD
    );
    src.batch_execute(&format!(
        "SELECT dblink_connect('big', '{conn}'); SELECT dblink_connect('small', '{conn}');
         SELECT dblink_exec('big', 'BEGIN');
         SELECT dblink_exec('big', 'INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 400000) i');"
    ))
    .await
    .unwrap();
    src.batch_execute(
        "SELECT dblink_exec('small', 'INSERT INTO t VALUES (0, ''one'')'), dblink_exec('big', 'COMMIT')",
    )
    .await
    .unwrap();

    eventually(
        "the large transaction to be under way in the buffer",
        Duration::from_secs(120),
        || async { count(&dst, "philotes.events").await >= 20_000 },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let mid: bool = dst
        .query_one(
            "SELECT (SELECT max(lsn) FROM philotes.events) >= durable_lsn FROM philotes.pipelines",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        mid,
        "the kill should land while the large transaction streams"
    );
    // Nothing of the incomplete transaction reached the sink.
    assert!(count(&dst, "replica.t").await <= 1);

    let mut child = start(&file, &log);
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(240)).await;
    assert_eq!(count(&dst, "replica.t").await, 400_001);
    let gap: i64 = dst
        .query_one(
            "SELECT max(lsn) - min(lsn) FROM (SELECT DISTINCT lsn FROM philotes.events) e",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    println!("the large transaction's commit record starts {gap} bytes after the one-row one's");
    child.kill().unwrap();
    child.wait().unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        !output.contains("duplicate key"),
        "the restart hit rows it had kept:\n{output}"
    );
}
