//! The engine against a real PostgreSQL with logical replication (a throwaway cluster per test).

mod support;

use std::sync::Arc;
use std::time::Duration;

use philotes::engine::PipelineHandle;
use philotes::engine::config::Delivery;
use philotes::engine::metrics::Metrics;
use philotes::engine::state::Phase;
use philotes::{dead_letters, standalone};
use support::pipeline::{FAST, WAIT, config, manifest, setup, wait_phase};
use support::{Pg, count, dump, eventually, wait_same};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_change_kinds_and_types_arrive_exactly() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        r#"CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int, amount numeric(12,2), note text, tags text[],
             payload jsonb, doc json, created timestamptz, day date, at timestamp, flag boolean, raw bytea,
             ratio double precision, big numeric, uid uuid, span interval, ch "char", matrix int[][]);
           CREATE TABLE customers (id int, region text, name text, PRIMARY KEY (id, region));
           CREATE TABLE docs (id int PRIMARY KEY, rev int, body text);"#,
    )
    .await
    .unwrap();
    let h = PipelineHandle::start(
        config(
            "types",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["public.orders", "public.customers", "docs"],
            FAST,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;

    src.batch_execute(
        r#"INSERT INTO orders VALUES
             (1, 10, 12.50, 'plain', '{a,b}', '{"k": [1, 2.5, null, "é✓"]}', '{"b":1,  "a":2}', '2024-02-29 23:59:59.123456+05:30',
              '2024-01-01', '2024-01-01 00:00:00.000001', true, '\x00ff10', 3.141592653589793, 123456789012345678901234567890.123456789,
              'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '1 year 2 mons 3 days 04:05:06.7', 'x', '{{1,2},{3,4}}'),
             (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
             (3, 30, -0.01, E'tab\there\nnewline \\ backslash ''quote'' "dq" 🎉', '{"a b",NULL,"c\"d",""}', '[]', 'null', 'infinity',
              '-infinity', '1999-12-31 23:59:59', false, '\x', 'NaN', 'NaN', '00000000-0000-0000-0000-000000000000', '-1 day', ' ', '{}'),
             (4, 40, 99999999.99, '', '{}', '{"nested": {"deep": {"x": "\u00e9"}}}', '{}', '2000-01-01 00:00:00+00', '0001-01-01',
              '294276-12-31 23:59:59', true, '\xdeadbeef', '-Infinity', '-0.0000000001', NULL, '0', NULL, NULL);
           INSERT INTO customers VALUES (1, 'eu', 'Ada'), (1, 'us', 'Bob'), (2, 'eu', 'Cy');
           INSERT INTO docs SELECT 1, 1, string_agg(md5(i::text), '') FROM generate_series(1, 5000) i;
           INSERT INTO docs VALUES (2, 1, 'small');"#,
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
           UPDATE docs SET rev = 2 WHERE id = 1;
           UPDATE docs SET rev = 3 WHERE id = 1;
           UPDATE docs SET id = 10 WHERE id = 1;
           UPDATE orders SET note = 'again' WHERE id = 20;
           DELETE FROM orders WHERE id = 5;
           INSERT INTO orders (id, note) VALUES (5, 're-inserted');
           TRUNCATE customers;
           INSERT INTO customers VALUES (7, 'eu', 'after truncate');"#,
    )
    .await
    .unwrap();
    for (s, d, order) in [
        ("orders", "replica.orders", "id"),
        ("customers", "replica.customers", "id, region"),
        ("docs", "replica.docs", "id"),
    ] {
        wait_same(&src, s, &dst, d, order, WAIT).await;
    }
    let p = h.current();
    assert_eq!(p.events_dead_lettered, 0);
    assert!(p.events_delivered >= 20, "{p:?}");
    // Column types in the sink are the source's.
    let types = dst
        .query_one(
            "SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attnum) FROM pg_attribute WHERE attrelid = 'replica.orders'::regclass AND attnum > 0",
            &[],
        )
        .await
        .unwrap()
        .get::<_, String>(0);
    assert!(
        types.starts_with(
            "bigint,integer,numeric(12,2),text,text[],jsonb,json,timestamp with time zone"
        ),
        "{types}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_keeps_the_sink_unchanged_and_resume_catches_up() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut h = PipelineHandle::start(
        config("pause", &pg.uri("shop"), &pg.uri("warehouse"), &["t"], FAST),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'a' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;

    h.set_delivery(Delivery::Paused);
    wait_phase(&h, Phase::Paused).await;
    let before = dump(&dst, "replica.t", "id").await;
    let read_before = h.current().events_read;
    src.batch_execute("INSERT INTO t SELECT i, 'b' FROM generate_series(101, 300) i; UPDATE t SET v = 'c' WHERE id <= 10; DELETE FROM t WHERE id = 50")
        .await
        .unwrap();
    // The slot keeps draining into the buffer while delivery is paused.
    eventually("paused pipeline to keep reading", WAIT, || async {
        h.current().events_read >= read_before + 211
    })
    .await;
    eventually("buffer depth to show the held changes", WAIT, || async {
        h.current().buffer_depth >= 211
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        dump(&dst, "replica.t", "id").await,
        before,
        "sink changed while paused"
    );
    assert_eq!(h.current().phase, Phase::Paused);

    h.set_delivery(Delivery::Running);
    wait_phase(&h, Phase::Running).await;
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    eventually("buffer depth back to zero", WAIT, || async {
        h.current().buffer_depth == 0
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_row_goes_to_the_dlq_and_later_rows_arrive() {
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
        "poison",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &["orders"],
        FAST,
    );
    let h = PipelineHandle::start(cfg.clone(), Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO orders VALUES (1, 10), (2, 20), (3, 5000), (4, 40)")
        .await
        .unwrap();
    src.batch_execute(
        "INSERT INTO orders VALUES (5, 50); UPDATE orders SET amount = 11 WHERE id = 1",
    )
    .await
    .unwrap();
    eventually("later rows to arrive", WAIT, || async {
        count(&dst, "replica.orders").await == 4
    })
    .await;
    assert_eq!(
        dump(&dst, "replica.orders", "id").await,
        "(1,11)\n(2,20)\n(4,40)\n(5,50)"
    );
    eventually("the dead letter to be counted", WAIT, || async {
        h.current().events_dead_lettered == 1
    })
    .await;
    assert_eq!(h.current().phase, Phase::Running);
    h.stop().await;

    let letters = dead_letters::list(&cfg, 10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let d = &letters[0];
    assert_eq!(d["table"], "public.orders");
    assert_eq!(d["op"], "insert");
    assert_eq!(d["values"]["id"], "3");
    assert_eq!(d["values"]["amount"], "5000");
    assert!(
        d["error"].as_str().unwrap().contains("check constraint"),
        "{d}"
    );
    assert!(d["attempts"].as_i64().unwrap() >= 2);

    // Once the sink accepts it, replay delivers it and empties the queue.
    dst.batch_execute("ALTER TABLE replica.orders DROP CONSTRAINT orders_amount_check")
        .await
        .unwrap();
    let out = dead_letters::replay(&cfg).await.unwrap();
    assert_eq!((out.replayed, out.still_failing), (1, 0));
    assert!(dead_letters::list(&cfg, 10).await.unwrap().is_empty());
    wait_same(&src, "orders", &dst, "replica.orders", "id", WAIT).await;
    assert_eq!(dead_letters::purge(&cfg).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_outage_retries_backpressures_then_catches_up() {
    let pg = Pg::start();
    let sink = Pg::start();
    pg.create_db("shop").await;
    sink.create_db("warehouse").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let extra = "  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 400ms}\n  buffer: {batchSize: 100, flushInterval: 100ms}\n  backpressure: {highWatermark: 500, lowWatermark: 200, checkInterval: 100ms}";
    let h = PipelineHandle::start(
        config(
            "outage",
            &pg.uri("shop"),
            &sink.uri("warehouse"),
            &["t"],
            extra,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'before' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let dst = sink.client("warehouse").await;
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;

    sink.stop_server();
    for k in 0..40 {
        src.batch_execute(&format!(
            "INSERT INTO t SELECT i, 'during' FROM generate_series({}, {}) i",
            101 + k * 100,
            200 + k * 100
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
    // Held back: while the source goes on writing, the reader reads nothing and the slot keeps the WAL.
    let held = h.current();
    let held_from: String = src
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    for k in 40..60 {
        src.batch_execute(&format!(
            "INSERT INTO t SELECT i, 'held' FROM generate_series({}, {}) i",
            101 + k * 100,
            200 + k * 100
        ))
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let p = h.current();
    assert_eq!(
        p.events_read, held.events_read,
        "the reader read while backpressured: {p:?}"
    );
    assert!(p.backpressured);
    // The slot's confirmed position stays before the WAL written while held, and the reported lag
    // (refreshed every few seconds) covers that WAL. (Comparing with the lag reported when
    // backpressure engaged failed once: that figure can predate acknowledgements of earlier WAL.)
    let kept: bool = src
        .query_one(
            "SELECT confirmed_flush_lsn <= $1::text::pg_lsn FROM pg_replication_slots",
            &[&held_from],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        kept,
        "the slot confirmed WAL written while the reader was held"
    );
    let held_bytes: i64 = src
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::int8",
            &[&held_from],
        )
        .await
        .unwrap()
        .get(0);
    eventually("the slot's lag to show the held WAL", WAIT, || async {
        h.current().lag_bytes >= held_bytes
    })
    .await;
    assert!(p.last_error.is_some() && p.retrying, "{p:?}");
    assert_eq!(
        p.phase,
        Phase::Running,
        "an outage of the sink does not fail the pipeline"
    );

    sink.start_server();
    let dst = sink.client("warehouse").await;
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(120)).await;
    eventually("backpressure to release", WAIT, || async {
        !h.current().backpressured
    })
    .await;
    let p = h.current();
    assert!(p.sink_healthy && p.last_error.is_none(), "{p:?}");
    assert_eq!(p.events_delivered, 6100);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_give_clear_errors() {
    let pg = Pg::start();
    let (src, _dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY); CREATE TABLE nokey (v int)")
        .await
        .unwrap();

    // Missing table list: refused before anything starts, naming the field.
    let m = standalone::parse(&manifest(
        "x",
        &pg.uri("shop"),
        &pg.uri("warehouse"),
        &[],
        "",
    ))
    .unwrap();
    let e = standalone::configs(&m).unwrap_err().to_string();
    assert!(e.contains("spec.source.tables: no tables listed"), "{e}");

    let metrics = Arc::new(Metrics::new());
    let failed = |name: &str, source: String, tables: &[&str]| {
        PipelineHandle::start(
            config(name, &source, &pg.uri("warehouse"), tables, FAST),
            metrics.clone(),
        )
    };

    let h = failed("unknown", pg.uri("shop"), &["public.t", "public.nope"]);
    let p = wait_phase(&h, Phase::Failed).await;
    let err = p.last_error.clone().unwrap();
    assert!(
        err.contains("spec.source.tables[1]") && err.contains("public.nope does not exist"),
        "{err}"
    );
    assert!(!p.retrying, "a missing table needs a person");
    h.stop().await;

    let h = failed("nokey", pg.uri("shop"), &["nokey"]);
    let p = wait_phase(&h, Phase::Failed).await;
    assert!(
        p.last_error.clone().unwrap().contains("has no primary key"),
        "{p:?}"
    );
    h.stop().await;

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = failed(
        "unreachable",
        format!("postgres://philotes:x@127.0.0.1:{closed}/shop"),
        &["t"],
    );
    let p = wait_phase(&h, Phase::Failed).await;
    let err = p.last_error.clone().unwrap();
    assert!(
        err.contains("connecting to source database postgres://127.0.0.1"),
        "{err}"
    );
    assert!(p.retrying, "an unreachable source is retried");
    assert!(p.message.contains("retrying in"), "{p:?}");
    h.stop().await;

    let h = failed(
        "password",
        pg.uri_with_password("shop", "wrong-secret-pw"),
        &["t"],
    );
    let p = wait_phase(&h, Phase::Failed).await;
    let err = p.last_error.clone().unwrap();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(!p.retrying);
    assert!(p.fix.clone().unwrap().contains("password"), "{p:?}");
    assert!(
        !format!("{p:?}").contains("wrong-secret-pw"),
        "the password leaked: {p:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_rows_are_copied_first_then_changes_stream() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text, n numeric, doc jsonb);
         INSERT INTO t SELECT i, md5(i::text), i / 7.0, jsonb_build_object('i', i) FROM generate_series(1, 20000) i;
         CREATE TABLE empty (id int PRIMARY KEY);",
    )
    .await
    .unwrap();
    let h = PipelineHandle::start(
        config(
            "snap",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["t", "empty"],
            FAST,
        ),
        Arc::new(Metrics::new()),
    );
    // Changes made while the pipeline starts (before, during or after the copy) all arrive.
    for k in 0..20 {
        src.batch_execute(&format!(
            "UPDATE t SET v = 'changed' WHERE id = {}; DELETE FROM t WHERE id = {}; INSERT INTO t VALUES ({}, 'new', 0, '{{}}')",
            k * 100 + 1,
            k * 100 + 2,
            100_000 + k
        ))
        .await
        .unwrap();
    }
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("UPDATE t SET n = -1 WHERE id % 1000 = 0")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    assert_eq!(count(&dst, "replica.empty").await, 0);
    assert!(h.current().events_read >= 20_000);
    h.stop().await;

    // A restart does not copy again.
    let h = PipelineHandle::start(
        config(
            "snap",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["t", "empty"],
            FAST,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t VALUES (999999, 'after restart', 1, '{}')")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    assert!(h.current().events_read < 100, "{:?}", h.current());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_events_are_cleaned_up_after_retention() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    let extra = "  buffer: {batchSize: 100, flushInterval: 100ms, retention: 2s}";
    let h = PipelineHandle::start(
        config(
            "cleanup",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &["t"],
            extra,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT generate_series(1, 500)")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    // The buffer lives in the source database here.
    assert!(
        count(&src, "philotes.events").await > 0,
        "events are kept until their retention passes"
    );
    eventually("delivered events to be removed", WAIT, || async {
        count(&src, "philotes.events").await == 0
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_use_tls_when_the_uri_asks_for_it() {
    let pg = Pg::start_tls();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let uri = |db: &str| format!("{}?sslmode=require", pg.uri(db));
    let h = PipelineHandle::start(
        config("tls", &uri("shop"), &uri("warehouse"), &["t"], FAST),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'secret' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    support::assert_pipeline_connections_use_tls(&src).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_of_keys_the_sink_has_already_are_upserts() {
    // Inserted rows go in with COPY while the sink lacks their keys; a sink table holding some of
    // them already (rows of its own, or a batch applied again) gets upserts instead, in a batch that
    // opens its sink transaction and in one that continues a source transaction larger than a batch.
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    dst.batch_execute(
        "CREATE SCHEMA replica; CREATE TABLE replica.t (id int PRIMARY KEY, v text);
         INSERT INTO replica.t SELECT i, 'stale' FROM generate_series(1, 10) i;",
    )
    .await
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let h = PipelineHandle::start(
        config("copy", &pg.uri("shop"), &pg.uri("warehouse"), &["t"], FAST),
        metrics.clone(),
    );
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'a' || i FROM generate_series(1, 20) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    // Applied again at once with upserts: no retry, nothing refused.
    assert_eq!(metrics.pipeline("copy").retries.get(), 0);
    dst.batch_execute("INSERT INTO replica.t SELECT i, 'stale' FROM generate_series(1800, 1810) i")
        .await
        .unwrap();
    src.batch_execute(
        "INSERT INTO t SELECT i, 'b' || i || E'\\t\\\\N\\n' FROM generate_series(1000, 3000) i",
    )
    .await
    .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    assert_eq!(h.current().events_dead_lettered, 0);
    // Later inserts (COPY again once the pause is over, or upserts meanwhile) arrive too.
    for k in 0..40 {
        src.batch_execute(&format!(
            "INSERT INTO t SELECT i, 'c' FROM generate_series({0}, {0} + 99) i",
            10_000 + k * 100
        ))
        .await
        .unwrap();
    }
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoted_table_names_are_read_as_postgres_writes_them() {
    // Quoted parts keep case, spaces, dots and quotes; an unquoted part folds to lower case.
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute(
        r#"CREATE SCHEMA "Sales Data";
           CREATE TABLE "Sales Data"."Orders.2024" ("Id" int PRIMARY KEY, "Note" text);
           INSERT INTO "Sales Data"."Orders.2024" SELECT i, 'copied ' || i FROM generate_series(1, 200) i;
           CREATE TABLE "Say ""hi""" (id int PRIMARY KEY, v text);
           INSERT INTO "Say ""hi""" VALUES (1, 'copied');
           CREATE TABLE mixed (id int PRIMARY KEY);
           INSERT INTO mixed VALUES (1);"#,
    )
    .await
    .unwrap();
    let h = PipelineHandle::start(
        config(
            "quoted",
            &pg.uri("shop"),
            &pg.uri("warehouse"),
            &[
                r#"'"Sales Data"."Orders.2024"'"#,
                r#"'"Say ""hi"""'"#,
                "Mixed",
            ],
            FAST,
        ),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    let orders = r#""Sales Data"."Orders.2024""#;
    let sink_orders = r#"replica."Orders.2024""#;
    wait_same(&src, orders, &dst, sink_orders, r#""Id""#, WAIT).await;
    wait_same(
        &src,
        r#""Say ""hi""""#,
        &dst,
        r#"replica."Say ""hi""""#,
        "id",
        WAIT,
    )
    .await;
    src.batch_execute(
        r#"INSERT INTO "Sales Data"."Orders.2024" SELECT i, 'streamed ' || i FROM generate_series(201, 300) i;
           UPDATE "Sales Data"."Orders.2024" SET "Note" = 'updated' WHERE "Id" % 7 = 0;
           DELETE FROM "Sales Data"."Orders.2024" WHERE "Id" BETWEEN 50 AND 60;
           INSERT INTO "Say ""hi""" VALUES (2, 'streamed');
           INSERT INTO mixed VALUES (2);"#,
    )
    .await
    .unwrap();
    wait_same(&src, orders, &dst, sink_orders, r#""Id""#, WAIT).await;
    wait_same(
        &src,
        r#""Say ""hi""""#,
        &dst,
        r#"replica."Say ""hi""""#,
        "id",
        WAIT,
    )
    .await;
    wait_same(&src, "mixed", &dst, "replica.mixed", "id", WAIT).await;
    assert_eq!(count(&dst, sink_orders).await, 289);
    h.stop().await;
}

/// Rows whose values are larger than a write batch are stored, read back and applied one at a
/// time (the reader waits for the writer to store each): they all arrive, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_values_wider_than_a_batch_arrive_whole() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE w (id int PRIMARY KEY, b bytea, t text)")
        .await
        .unwrap();
    let h = PipelineHandle::start(
        config("wide", &pg.uri("shop"), &pg.uri("warehouse"), &["w"], FAST),
        Arc::new(Metrics::new()),
    );
    wait_phase(&h, Phase::Running).await;
    // 6 MiB values (a bytea is 12 MiB as text): each row is past twice a write batch (2 MiB). The
    // text values hold what COPY escapes, across the slices a wide value is escaped in.
    for (first, last) in [(1, 1), (2, 4), (5, 6)] {
        src.batch_execute(&format!(
            "INSERT INTO w SELECT i, CASE WHEN i % 2 = 1 THEN convert_to(repeat(md5(i::text), 6 * 1024 * 1024 / 32), 'UTF8') END,
                                   CASE WHEN i % 2 = 0 THEN repeat(md5(i::text) || E'\\t\\\\\\n\\r', 6 * 1024 * 1024 / 36) END
             FROM generate_series({first}, {last}) i"
        ))
        .await
        .unwrap();
    }
    let sums = "SELECT string_agg(id || ':' || coalesce(md5(b), '') || coalesce(md5(t), ''), ',' ORDER BY id) FROM ";
    let want: String = src
        .query_one(&format!("{sums} w"), &[])
        .await
        .unwrap()
        .get(0);
    eventually("the wide rows to arrive", WAIT, || async {
        dst.query_one(&format!("{sums} replica.w"), &[])
            .await
            .ok()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .is_some_and(|have| have == want)
    })
    .await;
    h.stop().await;
}
