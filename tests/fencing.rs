//! Ownership fencing: a worker takes its pipeline by raising the epoch in the buffer and claiming it
//! in the sink; from then on nothing an earlier owner still holds (a paused process, a partitioned
//! replica) can write: not the buffer, not a processed mark, not a dead letter, not the sink.

mod support;

use std::sync::Arc;
use std::time::Duration;

use philotes::engine::PipelineHandle;
use philotes::engine::buffer::{Buffer, CopyRows};
use philotes::engine::config::{ConnString, PipelineConfig, SinkConfig};
use philotes::engine::error::EngineError;
use philotes::engine::event::{Event, Op, Position};
use philotes::engine::metrics::Metrics;
use philotes::engine::sink::postgres::PostgresSink;
use philotes::engine::sink::{Part, Sink};
use philotes::engine::state::Phase;
use support::pipeline::{FAST, WAIT, config, setup, wait_phase};
use support::{Pg, count, wait_same};

/// The PostgreSQL sink of `cfg`.
fn pg_sink(cfg: &PipelineConfig) -> (ConnString, String) {
    match &cfg.sink {
        SinkConfig::Postgres { conn, schema } => (conn.clone(), schema.clone()),
        other => panic!("not a PostgreSQL sink: {other:?}"),
    }
}

fn superseded(r: Result<(), EngineError>) -> bool {
    matches!(r, Err(EngineError::Superseded { .. }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_owner_can_never_write_again() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let mut a = config("fence", &pg.uri("shop"), &pg.uri("warehouse"), &["t"], FAST);
    a.owner = "replica-a".into();
    let mut b = a.clone();
    b.owner = "replica-b".into();

    let h1 = PipelineHandle::start(a.clone(), Arc::new(Metrics::new()));
    wait_phase(&h1, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'a' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    let old = h1.current().epoch;
    assert!(old > 0);
    // What replica-a still holds when it is paused or cut off: a sink and a buffer connection.
    let mut stale_sink = PostgresSink::new(pg_sink(&a).0, pg_sink(&a).1, a.response_timeout)
        .fenced(&a.id, &a.owner, old);
    stale_sink.prepare(&[]).await.unwrap();
    let mut stale_buffer = Buffer::connect(&a.buffer, &a.id, "stale")
        .await
        .unwrap()
        .with_epoch(old);

    // replica-b takes over: replica-a's replication session is ended, and its worker stops.
    let h2 = PipelineHandle::start(b.clone(), Arc::new(Metrics::new()));
    wait_phase(&h2, Phase::Running).await;
    assert_eq!(h2.current().epoch, old + 1);
    let p = wait_phase(&h1, Phase::Failed).await;
    println!("the old owner: {:?}; fix: {:?}", p.last_error, p.fix);
    assert_eq!(p.reason.as_deref(), Some("Superseded"), "{p:?}");
    assert!(!p.retrying);

    // Every write of the old epoch fails.
    let (durable, processed): (i64, i64) = src
        .query_one(
            "SELECT durable_lsn, processed_lsn FROM philotes.pipelines",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert!(superseded(
        stale_buffer
            .write(&[], CopyRows::default(), Some(u64::MAX >> 2))
            .await
    ));
    assert!(superseded(
        stale_buffer
            .mark_processed(Position {
                lsn: u64::MAX >> 2,
                ord: 0
            })
            .await
    ));
    assert!(superseded(
        stale_buffer.discard_incomplete(0).await.map(|_| ())
    ));
    let rels = stale_buffer.relations().await.unwrap();
    let (rel_ver, rel) = rels
        .iter()
        .find(|(_, r)| r.name == "t")
        .map(|(v, r)| (*v, r.clone()))
        .unwrap();
    let old_change = Event {
        pos: Position { lsn: 1, ord: 0 },
        commit_time: 0,
        rel_ver,
        op: Op::Update,
        old_key: None,
        vals: Some(vec![Some("1".into()), Some("stale".into())]),
        unchanged: None,
    };
    let written = philotes::engine::dlq::write(
        stale_buffer.client(),
        &a.id,
        Some(old),
        &[(&old_change, &rel, "refused".into())],
        1,
    )
    .await
    .unwrap();
    assert!(
        !written,
        "a dead letter was written under a superseded epoch"
    );
    let planner = stale_sink.planner();
    let batch = [old_change.clone()];
    let prepared = planner.prepare(&batch, &rels).unwrap();
    assert!(superseded(
        stale_sink
            .apply_prepared(&batch, &prepared, &rels, Part::WHOLE)
            .await
    ));
    assert!(superseded(
        stale_sink
            .apply_isolated(&batch, &rels, Part::WHOLE, false)
            .await
            .map(|_| ())
    ));
    let mut late = PostgresSink::new(pg_sink(&a).0, pg_sink(&a).1, a.response_timeout)
        .fenced(&a.id, &a.owner, old);
    assert!(superseded(late.prepare(&[]).await));
    let after: (i64, i64) = src
        .query_one(
            "SELECT durable_lsn, processed_lsn FROM philotes.pipelines",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(after, (durable, processed));
    assert_eq!(count(&src, "philotes.dead_letters").await, 0);
    let v: String = dst
        .query_one("SELECT v FROM replica.t WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, "a", "a superseded owner changed the sink");

    // The new owner goes on.
    src.batch_execute(
        "UPDATE t SET v = 'b' WHERE id <= 10; INSERT INTO t VALUES (101, 'b'); DELETE FROM t WHERE id = 50",
    )
    .await
    .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    h2.stop().await;
    h1.stop().await;
}

/// A sink transaction of the old owner in flight when the new one claims: the claim waits for it to
/// end, and every later transaction of the old owner is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_the_old_owners_transaction_then_refuses_the_next() {
    let pg = Pg::start();
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let cfg = config("claim", &pg.uri("shop"), &pg.uri("warehouse"), &["t"], FAST);
    let h = PipelineHandle::start(cfg.clone(), Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    h.stop().await;
    let buffer = Buffer::connect(&cfg.buffer, &cfg.id, "test").await.unwrap();
    let rels = buffer.relations().await.unwrap();
    let rel_ver = *rels.keys().next().unwrap();
    let change = |id: &str, v: &str, ord| Event {
        pos: Position { lsn: 10, ord },
        commit_time: 0,
        rel_ver,
        op: Op::Insert,
        old_key: None,
        vals: Some(vec![Some(id.into()), Some(v.into())]),
        unchanged: None,
    };
    let (uri, schema) = pg_sink(&cfg);
    let timeout = cfg.response_timeout;
    let sink = move |epoch, owner: &str| {
        PostgresSink::new(uri.clone(), schema.clone(), timeout).fenced("claim-test", owner, epoch)
    };
    let mut old = sink(7, "old");
    old.prepare(&[]).await.unwrap();
    let planner = old.planner();
    let first = [change("1", "old", 0)];
    let p = planner.prepare(&first, &rels).unwrap();
    old.apply_prepared(
        &first,
        &p,
        &rels,
        Part {
            begin: true,
            commit: false,
        },
    )
    .await
    .unwrap();

    let claim = tokio::spawn(async move {
        let mut new = sink(8, "new");
        new.prepare(&[]).await.map(|_| new)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !claim.is_finished(),
        "the claim did not wait for the transaction in flight"
    );
    let second = [change("2", "old", 1)];
    let p = planner.prepare(&second, &rels).unwrap();
    old.apply_prepared(
        &second,
        &p,
        &rels,
        Part {
            begin: false,
            commit: true,
        },
    )
    .await
    .unwrap();
    let _new = tokio::time::timeout(Duration::from_secs(10), claim)
        .await
        .expect("the claim did not go on after the old transaction ended")
        .unwrap()
        .unwrap();
    assert_eq!(count(&dst, "replica.t").await, 2);
    let third = [change("3", "old", 2)];
    let p = planner.prepare(&third, &rels).unwrap();
    assert!(superseded(
        old.apply_prepared(&third, &p, &rels, Part::WHOLE).await
    ));
    assert_eq!(count(&dst, "replica.t").await, 2);
    let owner: String = dst
        .query_one(
            "SELECT owner FROM replica.philotes_progress WHERE pipeline_id = 'claim-test'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "new");
}

/// The Iceberg sink is fenced in its SQL catalog: once a new owner has claimed the pipeline, files
/// an old owner staged before the takeover can never be committed, and it cannot claim again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_owner_can_never_commit_an_iceberg_snapshot() {
    use philotes::engine::sink::iceberg::{IcebergSink, catalog};

    let pg = Pg::start();
    pg.create_db("shop").await;
    let src = pg.client("shop").await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let warehouse = pg.dir().join("warehouse");
    std::fs::create_dir_all(&warehouse).unwrap();
    let manifest = format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: db}}
stringData: {{source: "{source}"}}
---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: lake, uid: 5f3c6a1e-0000-4000-8000-0000000fence}}
spec:
  source: {{connectionSecretRef: {{name: db, key: source}}, tables: [t]}}
  sink: {{iceberg: {{warehouse: "file://{warehouse}", namespace: cdc, commitInterval: 500ms}}}}
  retry: {{maxAttempts: 2, initialInterval: 100ms, maxInterval: 1s}}
  buffer: {{batchSize: 500, flushInterval: 200ms}}
"#,
        source = pg.uri("shop"),
        warehouse = warehouse.display()
    );
    let m = philotes::standalone::parse(&manifest).unwrap();
    let mut a = philotes::standalone::configs(&m).unwrap().remove(0).0;
    a.owner = "replica-a".into();
    let mut b = a.clone();
    b.owner = "replica-b".into();
    let SinkConfig::Iceberg(ib) = a.sink.clone() else {
        panic!("not an Iceberg sink")
    };
    let reader = catalog::connect(&ib, None).await.unwrap();
    let ident = iceberg::TableIdent::from_strs(["cdc", "t"]).unwrap();
    // (snapshots, epoch of the current one) of cdc.t.
    let snapshots = || {
        let (reader, ident) = (reader.clone(), ident.clone());
        async move {
            use iceberg::Catalog;
            let Ok(t) = reader.load_table(&ident).await else {
                return (0, String::new());
            };
            let m = t.metadata();
            let epoch = m
                .current_snapshot()
                .and_then(|s| {
                    s.summary()
                        .additional_properties
                        .get("philotes.epoch")
                        .cloned()
                })
                .unwrap_or_default();
            (m.snapshots().count(), epoch)
        }
    };

    let h1 = PipelineHandle::start(a.clone(), Arc::new(Metrics::new()));
    wait_phase(&h1, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'a' FROM generate_series(1, 100) i")
        .await
        .unwrap();
    let old = h1.current().epoch;
    support::eventually("the first snapshot", WAIT, || async {
        snapshots().await.1 == old.to_string()
    })
    .await;

    // What replica-a still holds when it is paused: a sink with a staged, uncommitted change.
    let mut stale = IcebergSink::connect(&ib, &a.id, &a.name, &a.owner, old, a.response_timeout)
        .await
        .unwrap();
    let stale_buffer = Buffer::connect(&a.buffer, &a.id, "stale").await.unwrap();
    let rels = stale_buffer.relations().await.unwrap();
    let rel_ver = *rels.keys().next().unwrap();
    let late_change = Event {
        pos: Position {
            lsn: u64::MAX >> 2,
            ord: 0,
        },
        commit_time: 0,
        rel_ver,
        op: Op::Update,
        old_key: None,
        vals: Some(vec![Some("1".into()), Some("stale".into())]),
        unchanged: None,
    };
    let batch = [late_change];
    let prepared = <IcebergSink as Sink>::prepare(&(), &batch, &rels).unwrap();
    stale
        .apply_prepared(&batch, &prepared, &rels, Part::WHOLE)
        .await
        .unwrap();
    assert!(stale.pending(), "the stale change is staged");

    // replica-b takes over and commits under its epoch.
    let h2 = PipelineHandle::start(b.clone(), Arc::new(Metrics::new()));
    wait_phase(&h2, Phase::Running).await;
    let new = h2.current().epoch;
    assert_eq!(new, old + 1);
    assert_eq!(
        wait_phase(&h1, Phase::Failed).await.reason.as_deref(),
        Some("Superseded")
    );
    src.batch_execute("INSERT INTO t VALUES (101, 'b')")
        .await
        .unwrap();
    support::eventually("a snapshot of the new owner", WAIT, || async {
        snapshots().await.1 == new.to_string()
    })
    .await;
    let before = snapshots().await;

    // The stale owner's staged files are refused at commit, and it cannot claim again.
    let flushed = stale.flush().await;
    assert!(
        superseded(flushed.map(|_| ())),
        "a superseded owner committed"
    );
    assert_eq!(snapshots().await, before, "the table changed");
    let again = IcebergSink::connect(&ib, &a.id, &a.name, &a.owner, old, a.response_timeout).await;
    assert!(matches!(again, Err(EngineError::Superseded { .. })));
    h2.stop().await;
    h1.stop().await;
}
