//! `spec.buffer.bypass`: changes go from the replication stream straight to the PostgreSQL sink,
//! which records its position in the same transaction; the source is acknowledged from it.

mod support;

use std::sync::Arc;
use std::time::Duration;

use philotes::dead_letters;
use philotes::engine::PipelineHandle;
use philotes::engine::config::Delivery;
use philotes::engine::metrics::Metrics;
use philotes::engine::state::Phase;
use support::pipeline::{WAIT, config, setup, wait_phase};
use support::{Pg, count, dump, eventually, wait_same};

const BYPASS: &str = "  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 500ms}\n  buffer: {batchSize: 500, flushInterval: 200ms, bypass: true}\n  backpressure: {highWatermark: 100000, lowWatermark: 50000, checkInterval: 200ms}";

/// Rows of the pipeline in the buffer (the buffer is the source database by default).
async fn buffered_rows(src: &tokio_postgres::Client) -> i64 {
    src.query_one("SELECT count(*) FROM philotes.events", &[])
        .await
        .unwrap()
        .get(0)
}

async fn confirmed_flush(src: &tokio_postgres::Client) -> u64 {
    let lsn: String = src
        .query_one(
            "SELECT coalesce(max(confirmed_flush_lsn), '0/0')::text FROM pg_replication_slots",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    parse_lsn(&lsn)
}

fn parse_lsn(s: &str) -> u64 {
    let (hi, lo) = s.split_once('/').unwrap();
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// The position the sink recorded in its progress table.
async fn sink_position(dst: &tokio_postgres::Client) -> Option<i64> {
    dst.query_one("SELECT max(lsn) FROM replica.philotes_progress", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypassing_the_buffer_delivers_every_change_and_stores_none() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text, n int)")
        .await
        .unwrap();
    let h = PipelineHandle::start(
        config(
            "bypass",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["t"],
            BYPASS,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    // Small transactions, then one of 60,000 changes: more than the processor's queue holds (16,384
    // events), so it is delivered before its commit arrives, in one sink transaction.
    for k in 0..20 {
        src.batch_execute(&format!(
            "INSERT INTO t SELECT i, 'a', 0 FROM generate_series({}, {}) i",
            k * 100 + 1,
            k * 100 + 100
        ))
        .await
        .unwrap();
    }
    src.batch_execute(
        "BEGIN; INSERT INTO t SELECT i, md5(i::text), 0 FROM generate_series(10001, 70000) i;
         UPDATE t SET n = n + 1 WHERE id % 3 = 0; DELETE FROM t WHERE id % 10 = 7; COMMIT;
         UPDATE t SET v = 'b' WHERE id <= 50; DELETE FROM t WHERE id BETWEEN 60 AND 70;",
    )
    .await
    .unwrap();
    let end: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    assert_eq!(
        buffered_rows(&src).await,
        0,
        "no change may be stored in the buffer"
    );
    assert!(
        sink_position(&dst).await.is_some(),
        "the sink records its position"
    );
    // Once the sink has everything, the slot is acknowledged past the last commit.
    eventually(
        "the slot to be acknowledged up to the end",
        WAIT,
        || async { confirmed_flush(&src).await >= parse_lsn(&end) },
    )
    .await;
    let p = h.current();
    assert_eq!(p.phase, Phase::Running);
    assert_eq!(p.buffer_depth, 0, "{p:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_paused_a_bypassing_pipeline_stops_reading_and_acknowledges_nothing_more() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    // Keepalives every second: each is a chance to acknowledge the WAL the reader has seen.
    let spec = format!("{BYPASS}\n  timeouts: {{response: 4s}}");
    let mut h = PipelineHandle::start(
        config(
            "bypass-pause",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["t"],
            &spec,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'a' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    h.set_delivery(Delivery::Paused);
    let p = wait_phase(&h, Phase::Paused).await;
    assert!(p.message.contains("spec.buffer.bypass"), "{p:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let acked = confirmed_flush(&src).await;
    let before = dump(&dst, "replica.t", "id").await;
    src.batch_execute("INSERT INTO t SELECT i, 'b' FROM generate_series(101, 300) i; UPDATE t SET v = 'c' WHERE id <= 10")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        dump(&dst, "replica.t", "id").await,
        before,
        "sink changed while paused"
    );
    assert_eq!(
        confirmed_flush(&src).await,
        acked,
        "the slot was acknowledged past what the sink holds"
    );
    assert_eq!(buffered_rows(&src).await, 0);

    // Stopped while paused: nothing was acknowledged, so a new worker gets every change again.
    h.stop().await;
    let h = PipelineHandle::start(
        config(
            "bypass-pause",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["t"],
            BYPASS,
        ),
        Arc::new(Metrics::new()),
    );
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    assert_eq!(buffered_rows(&src).await, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_change_of_a_large_transaction_goes_through_the_buffer_then_bypass_resumes() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE orders (id int PRIMARY KEY, amount numeric)")
        .await
        .unwrap();
    // The sink's table refuses amounts of 1000 or more.
    dst.batch_execute("CREATE SCHEMA replica; CREATE TABLE replica.orders (id int PRIMARY KEY, amount numeric CHECK (amount < 1000))")
        .await
        .unwrap();
    let cfg = config(
        "bypass-poison",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["orders"],
        BYPASS,
    );
    let h = PipelineHandle::start(cfg.clone(), Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    // 3,000 rows in one transaction (six batches of 500, one sink transaction), one of them refused.
    src.batch_execute(
        "INSERT INTO orders SELECT i, CASE WHEN i = 2500 THEN 5000 ELSE i % 1000 END FROM generate_series(1, 3000) i",
    )
    .await
    .unwrap();
    eventually("the dead letter to be counted", WAIT, || async {
        h.current().events_dead_lettered == 1
    })
    .await;
    eventually("the other rows to arrive", WAIT, || async {
        count(&dst, "replica.orders").await == 2999
    })
    .await;
    let buffered = buffered_rows(&src).await;
    assert!(
        buffered >= 3000,
        "the refused transaction went through the buffer ({buffered} rows there)"
    );
    // Later changes skip the buffer again.
    src.batch_execute("INSERT INTO orders SELECT i, 1 FROM generate_series(3001, 3500) i")
        .await
        .unwrap();
    eventually("later rows to arrive", WAIT, || async {
        count(&dst, "replica.orders").await == 3499
    })
    .await;
    assert_eq!(
        buffered_rows(&src).await,
        buffered,
        "changes after the refused transaction were stored in the buffer"
    );
    assert_eq!(h.current().phase, Phase::Running);
    h.stop().await;
    let letters = dead_letters::list(&cfg, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["values"]["id"], "2500");
}

/// A source cluster with table `t` (database shop) and a sink cluster of its own (database
/// warehouse), and a Running pipeline `name` between them that bypasses the buffer.
async fn source_and_sink_clusters(name: &str) -> (Pg, Pg, tokio_postgres::Client, PipelineHandle) {
    let pg = Pg::start();
    let sink = Pg::start();
    pg.create_db("shop").await;
    sink.create_db("warehouse").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let h = PipelineHandle::start(
        config(
            name,
            &pg.uri("shop"),
            &sink.uri("warehouse"),
            &["t"],
            BYPASS,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    (pg, sink, src, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_inside_a_large_transaction_loses_nothing_when_bypassing_the_buffer() {
    let (pg, sink, src, h) = source_and_sink_clusters("bypass-outage").await;
    src.batch_execute("INSERT INTO t SELECT i, 'before' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let dst = sink.client("warehouse").await;
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;

    // A transaction of 20,000 rows (40 batches in one sink transaction) while the sink goes away:
    // the open sink transaction is lost with the connection, and only the source has its rows.
    let load = {
        let c = pg.client("shop").await;
        tokio::spawn(async move {
            c.batch_execute("INSERT INTO t SELECT i, 'large' FROM generate_series(101, 20100) i")
                .await
                .unwrap();
            for k in 0..20 {
                c.batch_execute(&format!(
                    "INSERT INTO t SELECT i, 'during' FROM generate_series({}, {}) i; UPDATE t SET v = 'u' WHERE id = {}",
                    20101 + k * 100,
                    20200 + k * 100,
                    k + 1
                ))
                .await
                .unwrap();
            }
        })
    };
    eventually(
        "part of the large transaction to be applied",
        WAIT,
        || async { h.current().events_read > 2_000 },
    )
    .await;
    sink.stop_server();
    load.await.unwrap();
    eventually("the sink to be reported unhealthy", WAIT, || async {
        h.current().last_error.is_some() || !h.current().sink_healthy
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    sink.start_server();
    let dst = sink.client("warehouse").await;
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(120)).await;
    assert_eq!(buffered_rows(&src).await, 0);
    h.stop().await;
}

/// The sink commits without waiting for its disk; a crash of the sink server (immediate stop: what
/// its WAL writer had not flushed is gone) must not lose a change the source was acknowledged for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_crash_loses_no_acknowledged_change_when_bypassing_the_buffer() {
    let (pg, sink, src, h) = source_and_sink_clusters("bypass-crash").await;
    let load = {
        let c = pg.client("shop").await;
        tokio::spawn(async move {
            for k in 0..300 {
                c.batch_execute(&format!(
                    "INSERT INTO t SELECT i, 'x' FROM generate_series({}, {}) i",
                    k * 50 + 1,
                    k * 50 + 50
                ))
                .await
                .unwrap();
            }
        })
    };
    eventually("part of the stream to reach the sink", WAIT, || async {
        h.current().events_read > 3_000
    })
    .await;
    sink.stop_server_immediate();
    tokio::time::sleep(Duration::from_millis(500)).await;
    sink.start_server();
    load.await.unwrap();
    let dst = sink.client("warehouse").await;
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(120)).await;
    h.stop().await;
}
