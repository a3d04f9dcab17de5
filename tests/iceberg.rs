//! The Iceberg sink against real parts: PostgreSQL (source, buffer and SQL catalog), a `file://` or
//! `s3://` (moto) warehouse, and pyiceberg and DuckDB reading the tables back
//! (`tests/iceberg/check.py`, in the venv `scripts/test.sh` provisions).

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use philotes::engine::PipelineHandle;
use philotes::engine::metrics::Metrics;
use philotes::engine::state::Phase;
use philotes::standalone;
use support::lake::{Lake, check, file_lake, python, wait_equal};
use support::pipeline::{WAIT, wait_phase};
use support::{Pg, eventually};

fn manifest(pg: &Pg, lake: &Lake, tables: &str, extra: &str) -> String {
    let s3 = match &lake.s3 {
        Some((endpoint, _, _)) => format!(
            "\n      s3: {{endpoint: \"{endpoint}\", region: us-east-1, pathStyle: true, credentialsSecretRef: {{name: lake-s3}}}}"
        ),
        None => String::new(),
    };
    let s3_secret = match &lake.s3 {
        Some((_, k, s)) => format!(
            "---\napiVersion: v1\nkind: Secret\nmetadata: {{name: lake-s3}}\nstringData: {{accessKeyId: \"{k}\", secretAccessKey: \"{s}\"}}\n"
        ),
        None => String::new(),
    };
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: db}}
stringData: {{source: "{source}"}}
{s3_secret}---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: lake, uid: 5f3c6a1e-0000-4000-8000-00000000ice1}}
spec:
  source: {{connectionSecretRef: {{name: db, key: source}}, tables: [{tables}]}}
  sink:
    iceberg:
      warehouse: "{warehouse}"{s3}
      namespace: cdc
      commitInterval: 1s
      targetFileSize: 64Mi
{extra}
"#,
        source = pg.uri("shop"),
        warehouse = lake.warehouse,
    )
}

const FAST: &str = "  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 1s}\n  buffer: {batchSize: 500, flushInterval: 200ms}\n  backpressure: {highWatermark: 100000, lowWatermark: 50000, checkInterval: 200ms}";

fn start(manifest: &str) -> PipelineHandle {
    let m = standalone::parse(manifest).unwrap();
    let (c, _) = standalone::configs(&m).unwrap().remove(0);
    PipelineHandle::start(c, Arc::new(Metrics::new()))
}

const ORDERS_DDL: &str = r#"CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, small smallint, amount numeric(12,2),
    note text, code varchar(8), tags text[], nums int[], payload jsonb, doc json, created timestamptz, day date,
    at timestamp, flag boolean, raw bytea, ratio double precision, f4 real, big numeric, uid uuid, span interval);
  CREATE TABLE customers (id int, region text, name text, PRIMARY KEY (id, region));"#;

const ORDERS_QUERY: &str = "SELECT id, customer_id, small, amount, note, code, tags, nums, payload::text AS payload, doc::text AS doc, created, day, at, flag, raw, ratio, f4, big::text AS big, uid, span::text AS span FROM orders";
const CUSTOMERS_QUERY: &str = "SELECT id, region, name FROM customers";

/// Inserts, updates (one changing the key), deletes and a truncate, in two tables, with the types
/// the engine's type test uses (those Iceberg can hold).
async fn change_everything(src: &tokio_postgres::Client) {
    src.batch_execute(
        r#"INSERT INTO orders VALUES
             (1, 10, 7, 12.50, 'plain', 'abc', '{a,b}', '{1,2,3}', '{"k": [1, 2.5, null, "é✓"]}', '{"b":1,  "a":2}',
              '2024-02-29 23:59:59.123456+05:30', '2024-01-01', '2024-01-01 00:00:00.000001', true, '\x00ff10',
              3.141592653589793, 1.5, 123456789012345678901234567890.123456789,
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 year 2 mons 3 days 04:05:06.7'),
             (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (3, 30, -1, -0.01, E'tab\there\nnewline \\ backslash ''quote'' "dq" 🎉', '', '{"a b",NULL,"c\"d",""}', '{}',
              '[]', 'null', '1999-12-31 23:59:59+00', '0001-01-01', '1999-12-31 23:59:59', false, '\x', 'NaN', -0.25, 'NaN',
              '00000000-0000-0000-0000-000000000000', '-1 day'),
             (4, 40, 32767, 99999999.99, '', 'x', '{}', '{NULL,5}', '{"nested": {"deep": {"x": "\u00e9"}}}', '{}',
              '2000-01-01 00:00:00+00', '2262-04-11', '2262-04-11 23:47:16', true, '\xdeadbeef', '-Infinity', 0, '-0.0000000001',
              NULL, '0');
           INSERT INTO customers VALUES (1, 'eu', 'Ada'), (1, 'us', 'Bob'), (2, 'eu', 'Cy');"#,
    )
    .await
    .unwrap();
    src.batch_execute(
        r#"BEGIN;
           UPDATE orders SET amount = amount + 1, note = 'updated' WHERE id = 1;
           UPDATE orders SET id = 20 WHERE id = 2;
           DELETE FROM orders WHERE id = 4;
           UPDATE customers SET region = 'apac' WHERE id = 1 AND region = 'us';
           INSERT INTO orders (id, note) VALUES (5, 'in a transaction with others');
           COMMIT;
           UPDATE orders SET note = 'again' WHERE id = 20;
           DELETE FROM orders WHERE id = 5;
           INSERT INTO orders (id, note) VALUES (5, 're-inserted');
           TRUNCATE customers;
           INSERT INTO customers VALUES (7, 'eu', 'after truncate'), (8, 'us', 'and another');
           DELETE FROM customers WHERE id = 8;"#,
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_lands_once_and_the_state_read_back_equals_the_source() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute(ORDERS_DDL).await.unwrap();
    let lake = file_lake(pg.dir());
    let h = start(&manifest(&pg, &lake, "orders, customers", FAST));
    wait_phase(&h, Phase::Running).await;
    change_everything(&src).await;

    let orders = wait_equal(&pg, &lake, "cdc.orders", ORDERS_QUERY, true, WAIT).await;
    let customers = wait_equal(&pg, &lake, "cdc.customers", CUSTOMERS_QUERY, true, WAIT).await;
    for r in [&orders, &customers] {
        assert_eq!(r["duplicates"], 0, "{r}");
        assert_eq!(
            r["snapshot_summary"]["philotes.epoch"],
            h.current().epoch.to_string(),
            "{r}"
        );
        assert!(
            r["snapshot_summary"]["philotes.position"].is_string(),
            "{r}"
        );
    }
    assert_eq!(orders["identifier"], serde_json::json!(["id"]), "{orders}");
    assert_eq!(
        customers["identifier"],
        serde_json::json!(["id", "region"]),
        "{customers}"
    );
    assert_eq!(
        customers["ops"],
        serde_json::json!(["delete", "insert", "truncate", "update"]),
        "{customers}"
    );
    // 4 inserts; then 3 updates (the key change writes a delete of the old key too), 2 deletes and
    // 2 inserts: 12 rows.
    assert_eq!(orders["changelog_rows"], 12, "{orders}");
    let columns = orders["columns"].as_array().unwrap();
    for c in [
        "id",
        "amount",
        "tags",
        "_op",
        "_lsn",
        "_seq",
        "_commit_time",
    ] {
        assert!(columns.iter().any(|x| x == c), "{c} missing: {orders}");
    }
    // Snapshots come per commit interval, not per source transaction (there were 10).
    let snapshots = orders["snapshots"].as_u64().unwrap();
    assert!(snapshots <= 4, "{snapshots} snapshots: {orders}");

    // A column added at the source appears in the Iceberg schema, and its values in the rows.
    src.batch_execute(
        "ALTER TABLE orders ADD COLUMN extra text; INSERT INTO orders (id, note, extra) VALUES (6, 'new', 'added'); UPDATE orders SET extra = 'set later' WHERE id = 1;",
    )
    .await
    .unwrap();
    let q = ORDERS_QUERY.replace(" FROM orders", ", extra FROM orders");
    let evolved = wait_equal(&pg, &lake, "cdc.orders", &q, true, WAIT).await;
    assert!(
        evolved["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "extra"),
        "{evolved}"
    );
    assert_eq!(evolved["duplicates"], 0, "{evolved}");
    let p = h.current();
    assert_eq!(p.events_dead_lettered, 0, "{p:?}");
    h.stop().await;
}

fn run(file: &Path, log: &Path, env: &[(&str, &str)]) -> Child {
    support::run_philotes(file, log, env)
}

/// Waits until `philotes run` has created the table (its first snapshot may come later).
async fn wait_table(lake: &Lake, name: &str) {
    let Some(dir) = lake.warehouse.strip_prefix("file://") else {
        return;
    };
    let path = PathBuf::from(dir).join("cdc").join(name).join("metadata");
    eventually("the Iceberg table to be created", WAIT, || async {
        path.exists()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_iceberg_commit_and_the_processed_mark_adds_nothing_twice() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text, n int)")
        .await
        .unwrap();
    let lake = file_lake(pg.dir());
    let (file, log) = support::pipeline::write_manifest(pg.dir(), &manifest(&pg, &lake, "t", FAST));
    // The third Iceberg commit aborts the process right after the catalog took it.
    let mut child = run(
        &file,
        &log,
        &[("FAILPOINTS", "iceberg-after-commit=2*off->return")],
    );
    wait_table(&lake, "t").await;
    for k in 0..30i64 {
        src.batch_execute(&format!(
            "BEGIN; INSERT INTO t SELECT i, md5(i::text), 0 FROM generate_series({}, {}) i; UPDATE t SET n = n + 1 WHERE id % 5 = 0; COMMIT;",
            k * 100 + 1,
            k * 100 + 100
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(6),
        "the fail point should have aborted the process: {status:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let mut child = run(&file, &log, &[]);
    let q = "SELECT id, v, n FROM t";
    let r = wait_equal(&pg, &lake, "cdc.t", q, false, Duration::from_secs(120)).await;
    assert_eq!(r["duplicates"], 0, "{r}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_adds_nothing_twice() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text, n int)")
        .await
        .unwrap();
    let lake = file_lake(pg.dir());
    let extra = "  buffer: {batchSize: 1000, flushInterval: 200ms}\n  backpressure: {highWatermark: 40000, lowWatermark: 20000, checkInterval: 100ms}";
    let (file, log) =
        support::pipeline::write_manifest(pg.dir(), &manifest(&pg, &lake, "t", extra));
    let mut child = run(&file, &log, &[]);
    wait_table(&lake, "t").await;
    // 200k rows in 100 transactions, with updates and deletes mixed in.
    let load_client = pg.client("shop").await;
    let load = tokio::spawn(async move {
        for k in 0..100i64 {
            load_client
                .batch_execute(&format!(
                    "BEGIN; INSERT INTO t SELECT i, md5(i::text), 0 FROM generate_series({}, {}) i;
                     UPDATE t SET n = n + 1 WHERE id % 7 = 0 AND id > {}; DELETE FROM t WHERE id % 100 = 99 AND id > {}; COMMIT;",
                    k * 2000 + 1,
                    k * 2000 + 2000,
                    k * 2000 - 4000,
                    k * 2000 - 2000
                ))
                .await
                .unwrap();
        }
    });
    // Killed once the first snapshot is in.
    let snap_dir =
        PathBuf::from(lake.warehouse.trim_start_matches("file://")).join("cdc/t/metadata");
    eventually("a few snapshots", Duration::from_secs(120), || async {
        std::fs::read_dir(&snap_dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("snap-"))
                    .count()
            })
            .unwrap_or(0)
            >= 1
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_while_loading = !load.is_finished();
    load.await.unwrap();
    // The kill landed mid-stream: the table then held part of the changelog only.
    let at_kill = check(&pg, &lake, "cdc.t", "SELECT id, v, n FROM t", false);
    let full = 286_293;
    assert!(
        at_kill["changelog_rows"].as_u64().is_some_and(|n| n < full),
        "the kill should land mid-stream: {at_kill}"
    );
    let mut child = run(&file, &log, &[]);
    let r = wait_equal(
        &pg,
        &lake,
        "cdc.t",
        "SELECT id, v, n FROM t",
        false,
        Duration::from_secs(300),
    )
    .await;
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["source_rows"], 198_000, "{r}");
    assert_eq!(r["changelog_rows"], full, "{r}");
    println!(
        "killed while loading: {killed_while_loading}, with {} of {full} changelog rows in; {r}",
        at_kill["changelog_rows"]
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(!output.contains(support::PASSWORD), "the password leaked");
}

/// A moto S3 server on a free port, with bucket `lake`.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start(port: u16) -> Moto {
        let py = python();
        let bin = py.with_file_name("moto_server");
        let child = Command::new(bin)
            .args(["-p", &port.to_string(), "-H", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let m = Moto { child, port };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        m
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn create_bucket(&self) {
        let st = Command::new(python())
            .args([
                "-c",
                &format!(
                    "import boto3; boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='lake')",
                    self.endpoint()
                ),
            ])
            .status()
            .unwrap();
        assert!(st.success());
    }

    /// Sends `kill <signal>` to the server.
    fn signal(&self, signal: &str) {
        let st = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_warehouse_gets_the_same_changelog_and_an_outage_backpressures_then_catches_up() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute(ORDERS_DDL).await.unwrap();
    let port = free_port();
    let moto = Moto::start(port);
    moto.create_bucket();
    let lake = Lake {
        warehouse: "s3://lake/cdc-test".into(),
        s3: Some((moto.endpoint(), "test".into(), "test".into())),
    };
    let extra = "  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 1s}\n  buffer: {batchSize: 100, flushInterval: 100ms}\n  backpressure: {highWatermark: 500, lowWatermark: 200, checkInterval: 100ms}\n  timeouts: {response: 5s}";
    let h = start(&manifest(&pg, &lake, "orders, customers", extra));
    wait_phase(&h, Phase::Running).await;
    change_everything(&src).await;
    // pyiceberg and DuckDB (httpfs, through an S3 secret for moto) both compute the source's state.
    let r = wait_equal(&pg, &lake, "cdc.orders", ORDERS_QUERY, true, WAIT).await;
    assert_eq!(r["duplicates"], 0, "{r}");
    wait_equal(&pg, &lake, "cdc.customers", CUSTOMERS_QUERY, true, WAIT).await;

    // moto stopped (SIGSTOP: it keeps its in-memory buckets): requests go unanswered, the sink is
    // unhealthy, backpressure holds the reader, and nothing fails.
    moto.signal("-STOP");
    for k in 0..20i64 {
        src.batch_execute(&format!(
            "INSERT INTO orders (id, note) SELECT i, 'during' FROM generate_series({}, {}) i",
            1000 + k * 100,
            1099 + k * 100
        ))
        .await
        .unwrap();
    }
    eventually("the sink to be reported unhealthy", WAIT, || async {
        !h.current().sink_healthy
    })
    .await;
    eventually("backpressure to engage", WAIT, || async {
        h.current().backpressured
    })
    .await;
    let p = h.current();
    assert_eq!(p.phase, Phase::Running, "{p:?}");
    assert!(p.last_error.is_some(), "{p:?}");
    // moto back: everything arrives, once.
    moto.signal("-CONT");
    let r = wait_equal(
        &pg,
        &lake,
        "cdc.orders",
        ORDERS_QUERY,
        true,
        Duration::from_secs(180),
    )
    .await;
    assert_eq!(r["duplicates"], 0, "{r}");
    eventually("the sink to be healthy again", WAIT, || async {
        h.current().sink_healthy
    })
    .await;
    eventually("backpressure to release", WAIT, || async {
        !h.current().backpressured
    })
    .await;
    h.stop().await;
}

/// Changes the sink has staged but not committed still count in the buffer's depth, so past
/// `highWatermark` the reader holds until the sink commits. The sink then commits at once instead of
/// waiting for `commitInterval` (an hour here): the reader resumes and reads everything. (This test
/// once asserted that all 2000 changes were committed; when the last sink commit held a single
/// transaction after the reader was released, that one waited for the hour, as it should.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_makes_the_sink_commit_before_the_commit_interval() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id bigint PRIMARY KEY, v text, n int)")
        .await
        .unwrap();
    let lake = file_lake(pg.dir());
    let extra = "  buffer: {batchSize: 100, flushInterval: 100ms}\n  backpressure: {highWatermark: 300, lowWatermark: 100, checkInterval: 100ms}";
    let m = manifest(&pg, &lake, "t", extra).replace("commitInterval: 1s", "commitInterval: 1h");
    let h = start(&m);
    wait_phase(&h, Phase::Running).await;
    // 2000 changes in 20 transactions: more than six times the high watermark.
    for k in 0..20i64 {
        src.batch_execute(&format!(
            "INSERT INTO t SELECT i, md5(i::text), 0 FROM generate_series({}, {}) i",
            k * 100 + 1,
            k * 100 + 100
        ))
        .await
        .unwrap();
    }
    // The reader is never held for good, and every commit but the last came long before the
    // hour: only the last transaction (100 changes, under the 150 staged changes at which the sink
    // commits while busy, and no longer holding the reader) may still wait for commitInterval.
    // Which transactions end up last in a sink commit depends on timing, so that one is not
    // asserted.
    eventually(
        "every change read and all but the last transaction committed to Iceberg (commitInterval is 1h)",
        WAIT,
        || async {
            let p = h.current();
            p.events_read == 2000 && p.events_delivered >= 1900 && !p.backpressured
        },
    )
    .await;
    // Stopping commits what is staged.
    h.stop().await;
    let r = check(&pg, &lake, "cdc.t", "SELECT id, v, n FROM t", false);
    assert_eq!(r["equal"], true, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    assert_eq!(r["changelog_rows"], 2000, "{r}");
}

#[test]
fn the_example_pipeline_is_valid() {
    let text = std::fs::read_to_string("examples/iceberg-pipeline.yaml").unwrap();
    let m = standalone::parse(&text).unwrap();
    let (c, _) = standalone::configs(&m).unwrap().remove(0);
    let philotes::engine::config::SinkConfig::Iceberg(ib) = &c.sink else {
        panic!("not an Iceberg sink: {:?}", c.sink);
    };
    assert_eq!(ib.warehouse, "s3://lake/cdc");
    assert_eq!(ib.commit_interval, Duration::from_secs(10));
    assert_eq!(ib.target_file_size, 128 << 20);
    assert!(ib.catalog.same_database(&c.buffer));
}

/// What the TOAST test does to each of its tables: inserts of values too large and random to stay
/// inline (`SET STORAGE EXTERNAL`: out of line, uncompressed), then updates of other columns, which
/// pgoutput sends without those values unless the old row carries them (REPLICA IDENTITY FULL).
async fn toast_changes(src: &tokio_postgres::Client, t: &str) {
    src.batch_execute(&format!(
        r#"INSERT INTO {t} VALUES (1, 0, big('a1'), big('x1')), (2, 0, big('a2'), NULL), (3, 0, big('a3'), 'small'),
                                  (4, 0, big('a4'), big('x4')), (5, 0, 'inline', big('x5'));
           UPDATE {t} SET n = 1;
           BEGIN;
           UPDATE {t} SET n = 2 WHERE id = 1;
           UPDATE {t} SET body = big('b2') WHERE id = 2;
           UPDATE {t} SET n = 3 WHERE id = 2;
           COMMIT;
           UPDATE {t} SET extra = NULL WHERE id = 1;
           UPDATE {t} SET n = 4 WHERE id = 1;
           DELETE FROM {t} WHERE id = 4;
           INSERT INTO {t} VALUES (4, 0, big('c4'), NULL);
           UPDATE {t} SET n = 5 WHERE id = 4;
           UPDATE {t} SET id = 30 WHERE id = 3;
           UPDATE {t} SET n = 6 WHERE id = 30;
           BEGIN;
           UPDATE {t} SET id = 31 WHERE id = 30;
           UPDATE {t} SET id = 32, n = 7 WHERE id = 31;
           COMMIT;
           UPDATE {t} SET n = 8 WHERE id = 32;"#
    ))
    .await
    .unwrap();
}

/// An update that leaves a TOASTed value unchanged: pgoutput does not send the value. The
/// changelog row then names the column in `_unchanged` (REPLICA IDENTITY DEFAULT) or carries the
/// value from the old row (FULL), and the current state read back, by pyiceberg and by DuckDB,
/// equals the source, key changes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_that_leaves_a_toasted_value_unchanged_keeps_it_in_the_state() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute(
        "CREATE FUNCTION big(seed text) RETURNS text LANGUAGE sql AS
           $$ SELECT string_agg(md5(seed || i), '') FROM generate_series(1, 320) i $$;
         CREATE TABLE docs (id int PRIMARY KEY, n int, body text, extra text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL, ALTER COLUMN extra SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (LIKE docs INCLUDING ALL);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let lake = file_lake(pg.dir());
    let h = start(&manifest(&pg, &lake, "docs, docs_full", FAST));
    wait_phase(&h, Phase::Running).await;
    for t in ["docs", "docs_full"] {
        toast_changes(&src, t).await;
    }
    // The values are out of line: more than 8 kB each, stored as they are.
    let stored: i32 = src
        .query_one(
            "SELECT min(pg_column_size(body)) FROM docs WHERE id <> 5",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored > 8000, "{stored}");

    let q = "SELECT id, n, body, extra FROM docs";
    let default = wait_equal(&pg, &lake, "cdc.docs", q, true, WAIT).await;
    // pgoutput left the values out: the changelog names them.
    assert!(
        default["unchanged_rows"].as_u64().is_some_and(|n| n > 0),
        "{default}"
    );
    let q = "SELECT id, n, body, extra FROM docs_full";
    let full = wait_equal(&pg, &lake, "cdc.docs_full", q, true, WAIT).await;
    // The old row carried them: every changelog row holds its values.
    assert_eq!(full["unchanged_rows"], 0, "{full}");
    for r in [&default, &full] {
        assert_eq!(r["duplicates"], 0, "{r}");
        assert_eq!(r["source_rows"], 5, "{r}");
    }
    let p = h.current();
    assert_eq!(p.events_dead_lettered, 0, "{p:?}");
    h.stop().await;
}

/// A table added to a running Iceberg pipeline: its rows are backfilled (as `U` rows of the
/// changelog) while they change, and the state read back equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_a_running_pipeline_is_backfilled_into_its_changelog() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute(
        "CREATE TABLE t1 (id bigint PRIMARY KEY, v text);
         CREATE TABLE t2 (id bigint PRIMARY KEY, v text, n int);
         INSERT INTO t1 VALUES (1, 'a');
         INSERT INTO t2 SELECT i, md5(i::text), 0 FROM generate_series(1, 5000) i;",
    )
    .await
    .unwrap();
    let lake = file_lake(pg.dir());
    let h = start(&manifest(&pg, &lake, "t1", FAST));
    wait_phase(&h, Phase::Running).await;
    wait_equal(&pg, &lake, "cdc.t1", "SELECT id, v FROM t1", false, WAIT).await;
    h.stop().await;
    // The spec now names t2 too: a new worker, the same pipeline.
    let h = start(&manifest(&pg, &lake, "t1, t2", FAST));
    for i in 0..30 {
        src.batch_execute(&format!(
            "UPDATE t2 SET n = n + 1, v = 'changed {i}' WHERE id % 173 = {i};
             DELETE FROM t2 WHERE id = {};
             INSERT INTO t2 VALUES ({}, 'new', 0);
             INSERT INTO t1 VALUES ({}, 'b');",
            150 * i + 5,
            10_000 + i,
            10 + i
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually("the backfill of t2 done", WAIT, || async {
        h.current()
            .backfills
            .iter()
            .any(|b| b.table == "public.t2" && b.done)
    })
    .await;
    let r = wait_equal(&pg, &lake, "cdc.t2", "SELECT id, v, n FROM t2", true, WAIT).await;
    assert_eq!(r["duplicates"], 0, "{r}");
    wait_equal(&pg, &lake, "cdc.t1", "SELECT id, v FROM t1", false, WAIT).await;
    h.stop().await;
}
