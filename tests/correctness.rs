//! Correctness at the edges the source can produce: atomic sink transactions, replica identity,
//! partitioned tables, dropped tables, server settings, least-privilege users, and errors that must
//! not feed the dead-letter queue. Real PostgreSQL clusters, the engine in-process.

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use philotes::engine::PipelineHandle;
use philotes::engine::config::PipelineConfig;
use philotes::engine::metrics::Metrics;
use philotes::engine::state::Phase;
use philotes::{dead_letters, standalone};
use support::pipeline::{FAST, WAIT, config, setup, wait_phase};
use support::{Pg, count, dump, eventually, wait_same};

fn start(cfg: &PipelineConfig) -> PipelineHandle {
    PipelineHandle::start(cfg.clone(), Arc::new(Metrics::new()))
}

/// The one pipeline of a manifest.
fn config_of(yaml: &str) -> PipelineConfig {
    let m = standalone::parse(yaml).unwrap();
    standalone::configs(&m).unwrap().remove(0).0
}

/// Sets the session to the settings Philotes pins, so that dumps of two clusters with different
/// defaults compare values, not their spelling.
async fn pinned(c: &tokio_postgres::Client) {
    c.batch_execute("SET DateStyle = 'ISO, MDY'; SET IntervalStyle = postgres; SET extra_float_digits = 3; SET TimeZone = 'UTC'; SET bytea_output = hex")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_of_the_sink_sees_a_large_transaction_whole_or_not_at_all() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, v text); INSERT INTO t VALUES (0, 'first')",
    )
    .await
    .unwrap();
    let cfg = config(
        "atomic",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["t"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;

    // A reader of the sink counts the rows as fast as it can while the transaction is delivered in
    // 800 batches of 500.
    let reader = pg.client("warehouse").await;
    let done = Arc::new(AtomicBool::new(false));
    let seen = tokio::spawn({
        let done = done.clone();
        async move {
            let mut seen = BTreeSet::new();
            while !done.load(Ordering::Relaxed) {
                seen.insert(count(&reader, "replica.t").await);
            }
            seen
        }
    });
    src.batch_execute(
        "BEGIN; INSERT INTO t SELECT i, md5(i::text) FROM generate_series(1, 400000) i;
         DELETE FROM t WHERE id = 0; UPDATE t SET v = 'last' WHERE id = 400000; COMMIT",
    )
    .await
    .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(300)).await;
    done.store(true, Ordering::Relaxed);
    let seen = seen.await.unwrap();
    println!("row counts a reader of the sink saw: {seen:?}");
    assert_eq!(
        seen,
        BTreeSet::from([1, 400_000]),
        "a reader saw part of the transaction"
    );
    assert_eq!(h.current().events_delivered, 400_003);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_using_index_delivers_deletes_and_key_changes() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE ri (id int PRIMARY KEY, code text NOT NULL, v text);
         CREATE UNIQUE INDEX ri_code ON ri (code);
         ALTER TABLE ri REPLICA IDENTITY USING INDEX ri_code;
         INSERT INTO ri VALUES (1, 'a', 'x'), (2, 'b', 'y'), (3, 'c', 'z');
         CREATE TABLE full_pk (id int PRIMARY KEY, v text);
         ALTER TABLE full_pk REPLICA IDENTITY FULL;
         INSERT INTO full_pk VALUES (1, 'x'), (2, 'y'), (3, 'z');",
    )
    .await
    .unwrap();
    let cfg = config(
        "identity",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["ri", "full_pk"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute(
        "INSERT INTO ri VALUES (4, 'd', 'w');
         UPDATE ri SET v = 'changed' WHERE id = 1;
         UPDATE ri SET code = 'bb' WHERE id = 2;
         DELETE FROM ri WHERE id = 3;
         INSERT INTO ri VALUES (5, 'e', 'v');
         DELETE FROM ri WHERE id = 4;
         UPDATE full_pk SET v = 'changed' WHERE id = 1;
         UPDATE full_pk SET id = 20 WHERE id = 2;
         DELETE FROM full_pk WHERE id = 3;",
    )
    .await
    .unwrap();
    wait_same(&src, "ri", &dst, "replica.ri", "id", WAIT).await;
    wait_same(&src, "full_pk", &dst, "replica.full_pk", "id", WAIT).await;
    // The sink table's key is the replica identity.
    let key: String = dst
        .query_one(
            "SELECT string_agg(a.attname::text, ',') FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
             WHERE i.indrelid = 'replica.ri'::regclass AND i.indisprimary",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(key, "code");
    h.stop().await;

    // No key to apply updates and deletes with: refused, naming the table and the fix.
    // (Schema-qualified: the buffer's schema `philotes` is first on this user's search_path now.)
    src.batch_execute(
        "CREATE TABLE public.full_nokey (a int, b text); ALTER TABLE public.full_nokey REPLICA IDENTITY FULL;
         CREATE TABLE public.nothing (id int PRIMARY KEY); ALTER TABLE public.nothing REPLICA IDENTITY NOTHING;",
    )
    .await
    .unwrap();
    for (table, says, fix) in [
        (
            "full_nokey",
            "REPLICA IDENTITY FULL but no primary key",
            "add a primary key",
        ),
        (
            "nothing",
            "REPLICA IDENTITY NOTHING",
            "REPLICA IDENTITY DEFAULT",
        ),
    ] {
        let cfg = config(table, &pg.uri("shop"), &pg.uri("warehouse"), &[table], FAST);
        let h = start(&cfg);
        let p = wait_phase(&h, Phase::Failed).await;
        let err = p.last_error.clone().unwrap_or_default();
        assert!(
            err.contains(says) && err.contains(&format!("public.{table}")),
            "{p:?}"
        );
        assert!(p.fix.clone().unwrap_or_default().contains(fix), "{p:?}");
        assert!(!p.retrying);
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_lands_in_one_sink_table_named_after_its_root() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE m (id int, region text, v text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE m_eu PARTITION OF m FOR VALUES IN ('eu');
         CREATE TABLE m_us PARTITION OF m FOR VALUES IN ('us');
         INSERT INTO m VALUES (1, 'eu', 'a'), (2, 'us', 'b'), (3, 'eu', 'c');",
    )
    .await
    .unwrap();
    let cfg = config("parts", &pg.uri("shop"), &pg.uri("warehouse"), &["m"], FAST);
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "m", &dst, "replica.m", "id, region", WAIT).await;
    src.batch_execute(
        "INSERT INTO m VALUES (4, 'us', 'd'), (5, 'eu', 'e');
         UPDATE m SET region = 'us' WHERE id = 1;
         UPDATE m SET v = 'z' WHERE id = 2;
         DELETE FROM m WHERE id = 3;",
    )
    .await
    .unwrap();
    wait_same(&src, "m", &dst, "replica.m", "id, region", WAIT).await;
    let partitions: i64 = dst
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'replica' AND tablename LIKE 'm\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        partitions, 0,
        "changes went to sink tables named after partitions"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_while_its_changes_wait_does_not_wedge_the_pipeline() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text)",
    )
    .await
    .unwrap();
    let both = config(
        "dropped",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["a", "b"],
        FAST,
    );
    let h = start(&both);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO a VALUES (1, 'x'); INSERT INTO b VALUES (1, 'x')")
        .await
        .unwrap();
    wait_same(&src, "b", &dst, "replica.b", "id", WAIT).await;
    h.stop().await;

    // While the pipeline is stopped, b changes and is dropped; then b leaves the spec.
    src.batch_execute(
        "INSERT INTO b VALUES (2, 'y'), (3, 'z'); INSERT INTO a VALUES (2, 'y'); DROP TABLE b",
    )
    .await
    .unwrap();
    let only_a = config(
        "dropped",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["a"],
        FAST,
    );
    let h = start(&only_a);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO a VALUES (3, 'z')")
        .await
        .unwrap();
    wait_same(&src, "a", &dst, "replica.a", "id", WAIT).await;
    // b's changes made before the drop were read from the slot and delivered.
    eventually("b's last changes", WAIT, || async {
        count(&dst, "replica.b").await == 3
    })
    .await;
    assert_eq!(h.current().phase, Phase::Running, "{:?}", h.current());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_identity_table_dropped_while_its_changes_wait_keeps_its_key_across_a_restart() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE f (id int PRIMARY KEY, v text); ALTER TABLE f REPLICA IDENTITY FULL",
    )
    .await
    .unwrap();
    let both = config(
        "full",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["a", "f"],
        FAST,
    );
    let h = start(&both);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO f VALUES (1, 'x'), (2, 'y')")
        .await
        .unwrap();
    wait_same(&src, "f", &dst, "replica.f", "id", WAIT).await;
    h.stop().await;

    // Stopped: f changes (an update and a delete, which need its key) and is dropped; the next
    // session reads f's Relation message when its catalog entry, and primary key, are gone.
    src.batch_execute(
        "UPDATE f SET v = 'x2' WHERE id = 1; DELETE FROM f WHERE id = 2; INSERT INTO f VALUES (3, 'z');
         DROP TABLE f; INSERT INTO a VALUES (1, 'a')",
    )
    .await
    .unwrap();
    let only_a = config("full", &pg.uri("shop"), &pg.uri("warehouse"), &["a"], FAST);
    let h = start(&only_a);
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "a", &dst, "replica.a", "id", WAIT).await;
    eventually("f's last changes", WAIT, || async {
        dump(&dst, "replica.f", "id").await == "(1,x2)\n(3,z)"
    })
    .await;
    assert_eq!(h.current().phase, Phase::Running, "{:?}", h.current());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_column_renamed_while_its_changes_wait_is_renamed_in_the_sink() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE k (id int PRIMARY KEY, v text); INSERT INTO k VALUES (1, 'a'), (2, 'b')",
    )
    .await
    .unwrap();
    let cfg = config(
        "renamed",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["k"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "k", &dst, "replica.k", "id", WAIT).await;
    h.stop().await;

    // Stopped: changes under the old name, the rename, changes under the new one.
    src.batch_execute(
        "INSERT INTO k VALUES (3, 'c'); UPDATE k SET v = 'a2' WHERE id = 1;
         ALTER TABLE k RENAME COLUMN id TO kid;
         INSERT INTO k VALUES (4, 'd'); UPDATE k SET kid = 20 WHERE kid = 2; DELETE FROM k WHERE kid = 1",
    )
    .await
    .unwrap();
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "k", &dst, "replica.k", "kid", WAIT).await;

    // Running: renamed again mid-stream, with changes on both sides of it in one transaction.
    src.batch_execute(
        "BEGIN; INSERT INTO k VALUES (5, 'e'); ALTER TABLE k RENAME COLUMN kid TO key_id;
         INSERT INTO k VALUES (6, 'f'); DELETE FROM k WHERE key_id = 3; COMMIT",
    )
    .await
    .unwrap();
    wait_same(&src, "k", &dst, "replica.k", "key_id", WAIT).await;
    let cols: Vec<String> = dst
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = 'replica.k'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cols, ["key_id", "v"], "the sink table's columns");
    assert_eq!(h.current().phase, Phase::Running, "{:?}", h.current());
    assert_eq!(h.current().events_dead_lettered, 0, "{:?}", h.current());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_round_trip_whatever_the_source_settings() {
    let pg = Pg::start_conf(
        "DateStyle = 'SQL, DMY'\nIntervalStyle = sql_standard\nTimeZone = 'Asia/Kolkata'\nextra_float_digits = 0\nbytea_output = escape",
    );
    let sink = Pg::start();
    pg.create_db("shop").await;
    sink.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = sink.client("warehouse").await;
    let row = |id: i32| {
        format!(
            "({id}, DATE '2024-01-13' + {id}, TIMESTAMP '2024-01-13 10:11:12.5' + {id} * interval '1 day',
              TIMESTAMPTZ '2024-01-13 10:11:12.5+00' + {id} * interval '1 hour', interval '1 year 2 mons -3 days 04:05:06.7' * {id},
              0.1::float8 + 0.2::float8 * {id}, 1e-300 * {id}, '\\x00ff27'::bytea || ({id})::text::bytea)"
        )
    };
    src.batch_execute(&format!(
        "CREATE TABLE vals (id int PRIMARY KEY, d date, ts timestamp, tz timestamptz, iv interval, f float8, tiny float8, b bytea);
         INSERT INTO vals VALUES {}, {};",
        row(1),
        row(2)
    ))
    .await
    .unwrap();
    let cfg = config(
        "settings",
        &pg.uri("shop"),
        &sink.uri("warehouse"),
        &["vals"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute(&format!(
        "INSERT INTO vals VALUES {}, {}; UPDATE vals SET iv = -iv, f = -f WHERE id = 1",
        row(3),
        row(-4)
    ))
    .await
    .unwrap();
    pinned(&src).await;
    pinned(&dst).await;
    wait_same(&src, "vals", &dst, "replica.vals", "id", WAIT).await;
    assert_eq!(h.current().events_dead_lettered, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_users_are_enough() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    // Source: REPLICATION and SELECT, with a publication an administrator made. Sink and buffer: a
    // user that owns its schemas and has no CREATE on the database.
    src.batch_execute(
        "CREATE ROLE cdc_src LOGIN REPLICATION PASSWORD 'src-pw';
         CREATE ROLE cdc_sink LOGIN PASSWORD 'sink-pw';
         CREATE TABLE orders (id int PRIMARY KEY, amount numeric);
         INSERT INTO orders VALUES (1, 10), (2, 20);
         GRANT SELECT ON orders TO cdc_src;
         CREATE PUBLICATION cdc_pub FOR TABLE orders;",
    )
    .await
    .unwrap();
    dst.batch_execute(
        "REVOKE CREATE ON DATABASE warehouse FROM PUBLIC;
         CREATE SCHEMA replica AUTHORIZATION cdc_sink; CREATE SCHEMA philotes AUTHORIZATION cdc_sink;",
    )
    .await
    .unwrap();
    let cfg = config_of(&format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: db}}
stringData: {{source: "{}", sink: "{}"}}
---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: least}}
spec:
  source: {{connectionSecretRef: {{name: db, key: source}}, tables: [orders], publication: cdc_pub}}
  sink: {{postgres: {{connectionSecretRef: {{name: db, key: sink}}, schema: replica}}}}
  buffer: {{connectionSecretRef: {{name: db, key: sink}}, batchSize: 500, flushInterval: 200ms}}
"#,
        pg.uri_as("cdc_src", "src-pw", "shop"),
        pg.uri_as("cdc_sink", "sink-pw", "warehouse")
    ));
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute(
        "INSERT INTO orders VALUES (3, 30); UPDATE orders SET amount = 11 WHERE id = 1; DELETE FROM orders WHERE id = 2",
    )
    .await
    .unwrap();
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privilege_and_missing_table_faults_are_retried_never_dead_lettered() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    dst.batch_execute(
        "CREATE ROLE sinker LOGIN PASSWORD 'sinker-pw'; CREATE SCHEMA replica AUTHORIZATION sinker",
    )
    .await
    .unwrap();
    let cfg = config(
        "faults",
        &pg.uri("shop"),
        &pg.uri_as("sinker", "sinker-pw", "warehouse"),
        &["t"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'a' FROM generate_series(1, 10) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;

    for (break_it, says, mend) in [
        (
            "REVOKE INSERT ON replica.t FROM sinker",
            "permission denied",
            "GRANT INSERT ON replica.t TO sinker",
        ),
        (
            "ALTER TABLE replica.t RENAME TO t_away",
            "does not exist",
            "ALTER TABLE replica.t_away RENAME TO t",
        ),
    ] {
        dst.batch_execute(break_it).await.unwrap();
        src.batch_execute("INSERT INTO t SELECT max(id) + 1, 'b' FROM t")
            .await
            .unwrap();
        eventually(
            &format!("the sink fault ({says}) to show"),
            WAIT,
            || async {
                let p = h.current();
                !p.sink_healthy && p.last_error.as_deref().unwrap_or("").contains(says)
            },
        )
        .await;
        let p = h.current();
        assert_eq!(p.phase, Phase::Running, "{p:?}");
        assert!(p.retrying, "{p:?}");
        assert!(
            !p.fix
                .clone()
                .unwrap_or_default()
                .contains("dead-letter queue (`"),
            "{p:?}"
        );
        // Several retries later, nothing went to the DLQ.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(h.current().events_dead_lettered, 0);
        dst.batch_execute(mend).await.unwrap();
        wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
        eventually("the sink to be healthy again", WAIT, || async {
            h.current().sink_healthy
        })
        .await;
    }
    h.stop().await;
    assert!(dead_letters::list(&cfg, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_circuit_breaker_stops_delivery_when_most_of_a_batch_is_refused() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, n int)")
        .await
        .unwrap();
    dst.batch_execute(
        "CREATE SCHEMA replica; CREATE TABLE replica.t (id int PRIMARY KEY, n int CHECK (n < 50))",
    )
    .await
    .unwrap();
    let cfg = config(
        "breaker",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["t"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    // 200 changes in one transaction, 150 of which the sink refuses.
    src.batch_execute("INSERT INTO t SELECT i, i FROM generate_series(0, 199) i")
        .await
        .unwrap();
    let p = wait_phase(&h, Phase::Failed).await;
    let err = p.last_error.clone().unwrap_or_default();
    assert!(err.contains("refused 150 of 200 changes"), "{p:?}");
    assert!(err.contains("check constraint"), "{p:?}");
    assert!(!p.retrying, "{p:?}");
    assert_eq!(p.events_dead_lettered, 0);
    // Nothing of the transaction was applied.
    assert_eq!(count(&dst, "replica.t").await, 0);
    h.stop().await;
    assert!(dead_letters::list(&cfg, 10).await.unwrap().is_empty());
    assert_eq!(dump(&dst, "replica.t", "id").await, "");
}

/// Also: a write batch that fills its bytes before `batchSize` rows, inside a transaction, is sent
/// (it used to stop the reader for good: full, so not reading, and not ready, so not sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_values_are_read_back_in_batches_capped_by_bytes() {
    use philotes::engine::config::Delivery;
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE big (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config(
        "bytes",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["big"],
        FAST,
    );
    let mut h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    // Paused: the rows wait in the buffer, and delivery reads them back (8 MiB per read, so 1 MiB
    // values take several reads where 500 rows would be asked for).
    h.set_delivery(Delivery::Paused);
    wait_phase(&h, Phase::Paused).await;
    src.batch_execute(
        "INSERT INTO big SELECT i, repeat(md5(i::text), 32768) FROM generate_series(1, 40) i;
         INSERT INTO big SELECT i, 'small' FROM generate_series(41, 1040) i;
         BEGIN; UPDATE big SET v = repeat('u', 1 << 20) WHERE id <= 20; DELETE FROM big WHERE id > 1000; COMMIT;",
    )
    .await
    .unwrap();
    eventually("the changes to be buffered", WAIT, || async {
        h.current().buffer_depth >= 1100
    })
    .await;
    h.set_delivery(Delivery::Running);
    wait_same(&src, "big", &dst, "replica.big", "id", WAIT).await;
    assert_eq!(h.current().events_dead_lettered, 0);
    h.stop().await;
}

/// Updates that leave out-of-line (TOASTed) values unchanged, which pgoutput does not send (under
/// FULL identity the old row carries them): the sink keeps the values, key changes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toasted_values_stay_in_the_sink_under_default_and_full_identity() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, n int, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE TABLE docs_full (LIKE docs INCLUDING ALL);
         ALTER TABLE docs_full REPLICA IDENTITY FULL;",
    )
    .await
    .unwrap();
    let cfg = config(
        "toast",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["docs", "docs_full"],
        FAST,
    );
    let h = start(&cfg);
    wait_phase(&h, Phase::Running).await;
    for t in ["docs", "docs_full"] {
        src.batch_execute(&format!(
            "INSERT INTO {t} SELECT i, 0, (SELECT string_agg(md5(i || '-' || j), '') FROM generate_series(1, 320) j)
               FROM generate_series(1, 3) i;
             UPDATE {t} SET n = 1;
             UPDATE {t} SET id = 30 WHERE id = 3;
             BEGIN; UPDATE {t} SET n = 2 WHERE id = 1; UPDATE {t} SET id = 31, n = 3 WHERE id = 30; COMMIT;"
        ))
        .await
        .unwrap();
    }
    wait_same(&src, "docs", &dst, "replica.docs", "id", WAIT).await;
    wait_same(&src, "docs_full", &dst, "replica.docs_full", "id", WAIT).await;
    assert_eq!(h.current().events_dead_lettered, 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_publication_with_a_row_filter_or_column_list_is_refused() {
    let pg = Pg::start();
    let (src, _dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE a (id int PRIMARY KEY, v text, secret text);
         CREATE PUBLICATION filtered FOR TABLE a WHERE (id > 10);
         CREATE PUBLICATION narrow FOR TABLE a (id, v);
         CREATE PUBLICATION whole FOR TABLE a;",
    )
    .await
    .unwrap();
    for (publication, refused) in [("filtered", true), ("narrow", true), ("whole", false)] {
        let cfg = config(
            publication,
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["a"],
            &format!("{FAST}\n"),
        );
        let cfg = PipelineConfig {
            publication: publication.into(),
            ..cfg
        };
        let h = start(&cfg);
        if refused {
            let p = wait_phase(&h, Phase::Failed).await;
            let err = p.last_error.clone().unwrap_or_default();
            assert!(
                err.contains("spec.source.publication")
                    && err.contains("row filter or column list")
                    && err.contains("public.a"),
                "{p:?}"
            );
            assert!(!p.retrying);
        } else {
            wait_phase(&h, Phase::Running).await;
        }
        h.stop().await;
    }
}
