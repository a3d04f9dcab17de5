//! Silent network loss: a TCP proxy (written here, on 127.0.0.1) between Philotes and each of the
//! source, the buffer and the sink stops forwarding without closing either side, a black hole that
//! TCP keepalives do not notice (the proxy's kernel answers them). With the default timeouts the
//! pipeline must notice within 30 s, say so, reconnect when the path returns, and end with sink ==
//! source.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use philotes::engine::PipelineHandle;
use philotes::engine::metrics::Metrics;
use philotes::engine::state::Phase;
use philotes::standalone;
use support::pipeline::wait_phase;
use support::{Pg, eventually, wait_same};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Forwards 127.0.0.1:port to `upstream`; while `blackhole` is set it neither reads nor writes.
struct Proxy {
    port: u16,
    blackhole: Arc<AtomicBool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let blackhole = Arc::new(AtomicBool::new(false));
        let bh = blackhole.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let bh = bh.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    tokio::spawn(pipe(ri, wo, bh.clone()));
                    tokio::spawn(pipe(ro, wi, bh));
                });
            }
        });
        Proxy { port, blackhole }
    }

    fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while blackhole.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Bytes read just as the hole opened wait for it to close.
        while blackhole.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_hole_to_source_buffer_or_sink_is_noticed_and_healed() {
    let pg = Pg::start();
    pg.create_db("shop").await;
    pg.create_db("warehouse").await;
    let src = pg.client("shop").await;
    let dst = pg.client("warehouse").await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let (source, buffer, sink) = (
        Proxy::start(pg.port).await,
        Proxy::start(pg.port).await,
        Proxy::start(pg.port).await,
    );
    let uri = |p: &Proxy, db: &str| {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{db}",
            support::USER,
            support::PASSWORD,
            p.port
        )
    };
    // Default timeouts (connect 10s, response 20s): what is checked is that they notice within 30 s.
    let yaml = support::pipeline::db_manifest(
        "net",
        &[
            ("source", &uri(&source, "shop")),
            ("buffer", &uri(&buffer, "warehouse")),
            ("sink", &uri(&sink, "warehouse")),
        ],
        "t",
        "  buffer: {connectionSecretRef: {name: db, key: buffer}, batchSize: 500, flushInterval: 200ms}\n  retry: {maxAttempts: 2, initialInterval: 100ms, maxInterval: 1s}\n  backpressure: {checkInterval: 1s}",
    );
    let m = standalone::parse(&yaml).unwrap();
    let cfg = standalone::configs(&m).unwrap().remove(0).0;
    let h = PipelineHandle::start(cfg, Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    let mut next = 0;
    let mut insert = async |n: i32| {
        src.batch_execute(&format!(
            "INSERT INTO t SELECT i, 'v' FROM generate_series({}, {}) i",
            next + 1,
            next + n
        ))
        .await
        .unwrap();
        next += n;
    };
    insert(100).await;
    wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(60)).await;

    let mut noticed = Vec::new();
    for (what, proxy) in [("sink", &sink), ("source", &source), ("buffer", &buffer)] {
        proxy.set_blackhole(true);
        let cut = Instant::now();
        insert(100).await;
        // The fault shows with its reason.
        let shows = |p: &philotes::engine::Progress| {
            p.last_error.is_some()
                && match what {
                    "sink" => !p.sink_healthy,
                    "source" => !p.source_connected,
                    _ => p.last_error.as_deref().unwrap_or("").contains("buffer"),
                }
        };
        eventually(
            &format!("the {what} black hole to show"),
            Duration::from_secs(60),
            || async { shows(&h.current()) },
        )
        .await;
        let took = cut.elapsed();
        let p = h.current();
        println!("{what}: noticed after {took:?}: {:?}", p.last_error);
        assert!(
            took < Duration::from_secs(30),
            "the {what} black hole took {took:?} to notice"
        );
        assert!(
            p.last_error
                .as_deref()
                .unwrap_or("")
                .contains("no answer within")
                || p.last_error
                    .as_deref()
                    .unwrap_or("")
                    .contains("no message from the server")
                || p.last_error.as_deref().unwrap_or("").contains("timed out"),
            "{p:?}"
        );
        noticed.push((what, took));
        proxy.set_blackhole(false);
        insert(50).await;
        wait_same(&src, "t", &dst, "replica.t", "id", Duration::from_secs(90)).await;
        eventually(
            "Running and healthy again",
            Duration::from_secs(60),
            || async {
                let p = h.current();
                p.phase == Phase::Running && p.sink_healthy && p.source_connected
            },
        )
        .await;
    }
    println!("noticed: {noticed:?}");
    h.stop().await;
}
