//! The fault-injection matrix: `philotes run` dies (abort, as SIGKILL would) at each step where a
//! crash matters, via fail points (`fail` crate, set through the FAILPOINTS variable), then runs again.
//! Each time the sink must equal the source, dead letters must be there exactly once, and the slot
//! must not have been acknowledged past a change the buffer lacks.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use support::{Pg, count, eventually, run_philotes, wait_same};

const POISON: i64 = 3;

struct Outcome {
    point: &'static str,
    aborted: bool,
    sink_matches: bool,
    dead_letters: i64,
    slot_vs_buffer: String,
}

/// One row of the matrix: a fresh source and sink/buffer cluster, a pipeline that aborts at `point`
/// on its `skip + 1`th pass, the restart, and the checks.
async fn scenario(point: &'static str, skip: u32, snapshot_rows: i64) -> Outcome {
    let pg = Pg::start();
    let sink = Pg::start();
    pg.create_db("shop").await;
    sink.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = sink.client("warehouse").await;
    src.batch_execute(&format!(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, {snapshot_rows}) i;
         CREATE VIEW t_ok AS SELECT * FROM t WHERE v <> 'poison';"
    ))
    .await
    .unwrap();
    // The sink refuses the poison rows: they become dead letters.
    dst.batch_execute(
        "CREATE SCHEMA replica; CREATE TABLE replica.t (id bigint PRIMARY KEY, v text CHECK (v <> 'poison'))",
    )
    .await
    .unwrap();
    let (file, log) = support::pipeline::write_manifest(
        pg.dir(),
        &support::pipeline::db_manifest(
            "faults",
            &[
                ("source", &pg.uri("shop")),
                ("sink", &sink.uri("warehouse")),
            ],
            "t",
            "  buffer: {connectionSecretRef: {name: db, key: sink}, batchSize: 1000, flushInterval: 100ms}\n  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 500ms}",
        ),
    );
    let failpoints = format!("{point}={skip}*off->return");
    let mut child = run_philotes(&file, &log, &[("FAILPOINTS", failpoints.as_str())]);

    if snapshot_rows == 0 {
        let up = tokio::time::timeout(
            Duration::from_secs(60),
            eventually(
                "the pipeline to start",
                Duration::from_secs(3600),
                || async {
                    dst.query_one(
                        "SELECT bool_and(snapshot_done) FROM philotes.pipelines",
                        &[],
                    )
                    .await
                    .map(|r| r.get::<_, Option<bool>>(0) == Some(true))
                    .unwrap_or(false)
                },
            ),
        )
        .await;
        assert!(
            up.is_ok(),
            "{point}: the pipeline did not start; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        // 20 transactions of 1,000 rows with updates and deletes, and the poison rows on their own.
        for k in 0..20i64 {
            src.batch_execute(&format!(
                "BEGIN; INSERT INTO t SELECT i, md5(i::text) FROM generate_series({}, {}) i;
                 UPDATE t SET v = 'u' || v WHERE id % 7 = 0 AND id > {}; DELETE FROM t WHERE id % 50 = 0 AND id > {}; COMMIT;",
                k * 1000 + 1,
                k * 1000 + 1000,
                k * 1000 - 1000,
                k * 1000 - 1000
            ))
            .await
            .unwrap();
            if k % 7 == 3 {
                src.batch_execute(&format!(
                    "INSERT INTO t VALUES ({}, 'poison')",
                    1_000_000 + k
                ))
                .await
                .unwrap();
            }
        }
    }
    let status = support::wait_exit(&mut child, Duration::from_secs(120)).await;
    let aborted = status.is_some_and(|s| s.signal() == Some(6));
    if status.is_none() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // What the slot was told, against what the buffer holds.
    let confirmed: Option<String> = src
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots",
            &[],
        )
        .await
        .ok()
        .and_then(|r| r.get(0));
    let durable: Option<i64> = dst
        .query_one("SELECT durable_lsn FROM philotes.pipelines", &[])
        .await
        .ok()
        .map(|r| r.get(0));
    let slot_vs_buffer = format!(
        "slot {} / buffer {}",
        confirmed.unwrap_or_default(),
        durable.map_or(String::new(), |d| format!(
            "{:X}/{:X}",
            d >> 32,
            d & 0xffff_ffff
        ))
    );

    // Again, without fail points.
    let (mut child, same) =
        rerun_until_same(&file, &log, &src, "t_ok", &dst, Duration::from_secs(180)).await;
    let want_dead = if snapshot_rows == 0 { POISON } else { 0 };
    let dead_letters = if same {
        let mut n = 0;
        for _ in 0..100 {
            n = count(&dst, "philotes.dead_letters").await;
            if n >= want_dead {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    } else {
        count(&dst, "philotes.dead_letters").await
    };
    child.kill().unwrap();
    child.wait().unwrap();
    if !(aborted && same && dead_letters == want_dead) {
        println!(
            "{point}: log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    Outcome {
        point,
        aborted,
        sink_matches: same,
        dead_letters,
        slot_vs_buffer,
    }
}

/// Runs Philotes on `file` again, without fail points, and waits up to `within` for `replica.t`
/// to equal `table` of the source: the process, and whether it did.
async fn rerun_until_same(
    file: &std::path::Path,
    log: &std::path::Path,
    src: &tokio_postgres::Client,
    table: &str,
    dst: &tokio_postgres::Client,
    within: Duration,
) -> (std::process::Child, bool) {
    let child = run_philotes(file, log, &[]);
    let waited = wait_same(
        src,
        table,
        dst,
        "replica.t",
        "id",
        Duration::from_secs(3600),
    );
    let same = tokio::time::timeout(within, waited).await.is_ok();
    (child, same)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_every_step_leaves_sink_equal_to_source() {
    let mut rows = Vec::new();
    for (point, skip, snapshot_rows) in [
        // Passes before the crash: the snapshot's two buffer writes, then the stream's. The sink's
        // first commit: in a backlog, sink transactions grow (up to 8 batches), so there may be few.
        ("buffer-before-commit", 3, 0),
        ("buffer-before-ack", 1, 0),
        ("sink-before-mark", 0, 0),
        ("dlq-before-mark", 0, 0),
        ("snapshot-mid-copy", 2, 30_000),
    ] {
        rows.push(scenario(point, skip, snapshot_rows).await);
    }
    println!("\nfault matrix (step × outcome):");
    println!(
        "{:<22} {:<9} {:<13} {:<13} slot / buffer after the crash",
        "step", "aborted", "sink==source", "dead letters"
    );
    for r in &rows {
        println!(
            "{:<22} {:<9} {:<13} {:<13} {}",
            r.point, r.aborted, r.sink_matches, r.dead_letters, r.slot_vs_buffer
        );
    }
    for r in &rows {
        let want_dead = if r.point == "snapshot-mid-copy" {
            0
        } else {
            POISON
        };
        assert!(
            r.aborted,
            "{}: the process did not die at the fail point",
            r.point
        );
        assert!(
            r.sink_matches,
            "{}: the sink does not match the source",
            r.point
        );
        assert_eq!(r.dead_letters, want_dead, "{}: dead letters", r.point);
    }
}

/// The buffer database restarts mid-stream (fast, then immediate shutdown), then refuses writes for a
/// while (its events table locked past the response timeout): the pipeline retries, the slot keeps
/// what was not buffered, and the sink ends equal to the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_database_restarts_and_stalls_lose_nothing() {
    use philotes::engine::PipelineHandle;
    use philotes::engine::metrics::Metrics;
    use philotes::engine::state::Phase;
    use std::sync::Arc;
    use support::pipeline::wait_phase;

    let pg = Pg::start();
    let buffer = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    buffer.create_db("buf").await;
    let src = pg.client("shop").await;
    let dst = pg.client("warehouse").await;
    src.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await
        .unwrap();
    let yaml = support::pipeline::db_manifest(
        "bufferfaults",
        &[
            ("source", &pg.uri("shop")),
            ("sink", &pg.uri("warehouse")),
            ("buffer", &buffer.uri("buf")),
        ],
        "t",
        "  buffer: {connectionSecretRef: {name: db, key: buffer}, batchSize: 500, flushInterval: 100ms}\n  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 1s}\n  timeouts: {response: 5s}",
    );
    let m = philotes::standalone::parse(&yaml).unwrap();
    let cfg = philotes::standalone::configs(&m).unwrap().remove(0).0;
    let h = PipelineHandle::start(cfg, Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    let load = |from: i64, client: tokio_postgres::Client| {
        tokio::spawn(async move {
            for k in 0..20 {
                let a = from + k * 500;
                client
                    .batch_execute(&format!(
                        "INSERT INTO t SELECT i, md5(i::text) FROM generate_series({a}, {}) i; UPDATE t SET v = 'u' WHERE id = {a}",
                        a + 499
                    ))
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            client
        })
    };

    let mut client = pg.client("shop").await;
    for (round, how) in ["fast", "immediate"].into_iter().enumerate() {
        let running = load(1 + round as i64 * 100_000, client);
        tokio::time::sleep(Duration::from_millis(300)).await;
        match how {
            "fast" => buffer.stop_server(),
            _ => buffer.stop_server_immediate(),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        buffer.start_server();
        client = running.await.unwrap();
        wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(120)).await;
        println!("buffer restarted ({how}): sink == source");
    }

    // The events table locked past the response timeout: buffer writes cannot finish.
    let locker = buffer.client("buf").await;
    locker
        .batch_execute("BEGIN; LOCK TABLE philotes.events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    // Where the source's WAL stood before the load that the buffer cannot take.
    let before: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let running = load(500_000, client);
    eventually(
        "the stalled buffer to show",
        Duration::from_secs(60),
        || async {
            h.current()
                .last_error
                .as_deref()
                .unwrap_or("")
                .contains("buffer")
        },
    )
    .await;
    // Nothing of the load was acknowledged: the buffer holds none of it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let row = src
        .query_one(
            "SELECT confirmed_flush_lsn::text, confirmed_flush_lsn <= $1::text::pg_lsn FROM pg_replication_slots",
            &[&before],
        )
        .await
        .unwrap();
    let (during, held): (String, bool) = (row.get(0), row.get(1));
    println!(
        "stalled: {:?}; slot at {during}, the load began at {before}",
        h.current().last_error
    );
    assert!(held, "the slot was acknowledged past what the buffer holds");
    locker.batch_execute("COMMIT").await.unwrap();
    running.await.unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(120)).await;
    eventually("Running again", Duration::from_secs(60), || async {
        h.current().phase == Phase::Running
    })
    .await;
    h.stop().await;
}

/// WAL at risk, then lost: a small `max_slot_wal_keep_size` puts the slot at risk (WalAtRisk), and
/// writing past it while the pipeline is stopped invalidates the slot for real: the restart fails
/// with SlotLost, saying since when changes cannot be read, and the fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_at_risk_then_lost_says_so_and_a_resync_rebuilds_it() {
    use philotes::engine::PipelineHandle;
    use philotes::engine::metrics::Metrics;
    use philotes::engine::state::Phase;
    use std::sync::Arc;
    use support::pipeline::{FAST, config, setup, wait_phase};

    let pg = Pg::start_conf(
        "max_slot_wal_keep_size = 32MB\nwal_keep_size = 0\nmax_wal_size = 64MB\nmin_wal_size = 32MB",
    );
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE filler (id bigserial PRIMARY KEY, v text)",
    )
    .await
    .unwrap();
    let mut cfg = config("lost", &pg.uri("shop"), &pg.uri("warehouse"), &["t"], FAST);
    // Any safe_wal_size under 100 MB is at risk: with a 32 MB limit, always.
    cfg.wal_at_risk_bytes = 100 << 20;
    let metrics = Arc::new(Metrics::new());
    let h = PipelineHandle::start(cfg.clone(), metrics.clone());
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 20000) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(60)).await;
    eventually("WAL at risk to show", Duration::from_secs(30), || async {
        let s = h.current().slot;
        s.at_risk && s.safe_wal_bytes.is_some_and(|b| b < 100 << 20)
    })
    .await;
    println!("at risk: {:?}", h.current().slot);
    let scrape = metrics.encode();
    assert!(
        scrape.contains("philotes_wal_at_risk{pipeline=\"default/lost\"} 1"),
        "{scrape}"
    );
    h.stop().await;

    // Stopped: changes the sink will miss, then WAL past the limit and checkpoints.
    src.batch_execute(
        "INSERT INTO t VALUES (20001, 'missed'); DELETE FROM t WHERE id <= 100; UPDATE t SET v = 'changed' WHERE id % 1000 = 0",
    )
    .await
    .unwrap();
    eventually("the slot to be lost", Duration::from_secs(120), || async {
        src.batch_execute(
            "INSERT INTO filler (v) SELECT repeat('x', 2000) FROM generate_series(1, 20000); SELECT pg_switch_wal(); CHECKPOINT;",
        )
        .await
        .unwrap();
        src.query_one("SELECT wal_status::text FROM pg_replication_slots", &[])
            .await
            .map(|r| r.get::<_, Option<String>>(0).as_deref() == Some("lost"))
            .unwrap_or(false)
    })
    .await;

    let h = PipelineHandle::start(cfg.clone(), Arc::new(Metrics::new()));
    let p = wait_phase(&h, Phase::Failed).await;
    let err = p.last_error.clone().unwrap_or_default();
    println!("{err}; fix: {:?}", p.fix);
    assert_eq!(p.reason.as_deref(), Some("SlotLost"), "{p:?}");
    assert!(
        err.contains("can no longer be read") && err.contains("since 0/"),
        "{err}"
    );
    assert!(
        p.fix.clone().unwrap_or_default().contains("resync"),
        "{p:?}"
    );
    assert!(!p.retrying);
    h.stop().await;

    // Resync: a new slot, the tables copied again, and the sink's rows replaced in one transaction.
    // A reader of the sink meanwhile sees the old rows or the new ones, never an emptied table.
    let before = count(&dst, "replica.t").await;
    let watcher = pg.client("warehouse").await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = tokio::spawn({
        let done = done.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                seen.insert(count(&watcher, "replica.t").await);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            seen
        }
    });
    cfg.resync = Some("2026-12-02".into());
    let h = PipelineHandle::start(cfg.clone(), Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(60)).await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = seen.await.unwrap();
    let after = count(&src, "t").await;
    println!(
        "sink row counts a reader saw during the resync: {seen:?} (before {before}, after {after})"
    );
    assert!(
        seen.iter().all(|n| *n == before || *n == after),
        "a reader saw a partly replaced table: {seen:?}"
    );
    assert_eq!(h.current().resynced.as_deref(), Some("2026-12-02"));
    let slot = src
        .query_one("SELECT wal_status::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get::<_, Option<String>>(0);
    assert_ne!(slot.as_deref(), Some("lost"));
    src.batch_execute("INSERT INTO t VALUES (20002, 'after resync')")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(60)).await;
    h.stop().await;

    // The same token again resyncs nothing: the pipeline streams on from its slot.
    let h = PipelineHandle::start(cfg, Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("DELETE FROM t WHERE id = 20002")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(60)).await;
    assert_eq!(h.current().events_read, 1, "{:?}", h.current());
    h.stop().await;
}

/// `philotes run --resync` that dies in the middle of its copy: the next run, without the flag,
/// finishes the same resync, and the sink's rows are replaced (rows changed by hand are repaired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_that_dies_mid_copy_is_finished_by_the_next_run() {
    let pg = Pg::start();
    let sink = Pg::start();
    pg.create_db("shop").await;
    sink.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = sink.client("warehouse").await;
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text);
         INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 30000) i;",
    )
    .await
    .unwrap();
    let (file, log) = support::pipeline::write_manifest(
        pg.dir(),
        &support::pipeline::db_manifest(
            "resync",
            &[
                ("source", &pg.uri("shop")),
                ("sink", &sink.uri("warehouse")),
            ],
            "t",
            "  buffer: {connectionSecretRef: {name: db, key: sink}, batchSize: 1000, flushInterval: 100ms}\n  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 500ms}",
        ),
    );
    let mut child = run_philotes(&file, &log, &[]);
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(120)).await;
    child.kill().unwrap();
    child.wait().unwrap();

    // The sink drifts by hand; the source moves on.
    dst.batch_execute(
        "INSERT INTO replica.t VALUES (999999, 'stray'); DELETE FROM replica.t WHERE id = 5",
    )
    .await
    .unwrap();
    src.batch_execute("DELETE FROM t WHERE id <= 10; INSERT INTO t VALUES (40000, 'new')")
        .await
        .unwrap();

    let mut child = support::run_philotes_with(
        &file,
        &log,
        &[("FAILPOINTS", "snapshot-mid-copy=1*off->return")],
        &["--resync"],
    );
    let status = support::wait_exit(&mut child, Duration::from_secs(120))
        .await
        .expect("the resync did not reach its fail point");
    assert_eq!(status.signal(), Some(6), "{status:?}");
    let (token, replaces): (Option<String>, bool) = dst
        .query_one(
            "SELECT resync_token, snapshot_replaces FROM philotes.pipelines",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(
        token.as_deref().is_some_and(|t| t.starts_with("run-")),
        "{token:?}"
    );
    assert!(replaces, "the interrupted resync is not recorded as owed");

    let (mut child, same) =
        rerun_until_same(&file, &log, &src, "t", &dst, Duration::from_secs(120)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    if !same {
        println!(
            "log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
    assert!(same, "the sink does not equal the source after the resync");
    let replaces: bool = dst
        .query_one("SELECT snapshot_replaces FROM philotes.pipelines", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!replaces);
}
