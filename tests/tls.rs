//! `sslmode=verify-ca` and `verify-full` against a real PostgreSQL whose certificate is signed by a
//! CA made here (rcgen): every kind of connection (SQL, replication, buffer migrations over sqlx, the
//! Iceberg SQL catalog over sqlx 0.8), and a whole pipeline with the CA from Secret keys.

mod support;

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::ReplicationClient;
use philotes::engine::PipelineHandle;
use philotes::engine::buffer;
use philotes::engine::config::{ConnString, IcebergConfig};
use philotes::engine::metrics::Metrics;
use philotes::engine::pg;
use philotes::engine::sink::iceberg::catalog;
use philotes::engine::state::Phase;
use philotes::standalone;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use support::pipeline::{FAST, WAIT, setup, wait_phase};
use support::{PASSWORD, Pg, wait_same};

/// A CA: its certificate (PEM), and what signs with it.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses) and its key, PEM.
    fn server(&self, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "philotes test server");
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A cluster with a certificate for `localhost` only (not for 127.0.0.1), and the CA's PEM in a file.
fn server(ca: &Ca) -> (Pg, std::path::PathBuf) {
    let (crt, key) = ca.server(&["localhost"]);
    let pg = Pg::start_tls_pem(&crt, &key);
    let file = pg.dir().join("ca.crt");
    std::fs::write(&file, ca.pem()).unwrap();
    (pg, file)
}

fn uri(pg: &Pg, host: &str, db: &str, query: &str) -> ConnString {
    ConnString::parse(&format!(
        "postgres://philotes:{PASSWORD}@{host}:{}/{db}?{query}",
        pg.port
    ))
    .unwrap()
}

fn rootcert(mode: &str, file: &std::path::Path) -> String {
    format!("sslmode={mode}&sslrootcert={}", file.display())
}

fn iceberg(catalog: ConnString, dir: &std::path::Path) -> IcebergConfig {
    IcebergConfig {
        catalog,
        warehouse: format!("file://{}", dir.join("lake").display()),
        s3: None,
        namespace: "cdc".into(),
        commit_interval: Duration::from_secs(1),
        target_file_size: 1 << 20,
    }
}

/// Each kind of connection with `conn`: Ok, or the error's text.
async fn every_connection(
    conn: &ConnString,
    dir: &std::path::Path,
) -> Vec<(&'static str, Result<(), String>)> {
    let sql = pg::connect(conn, "source")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let replication = async {
        let config = conn
            .replication("none", "none", "philotes-test")
            .map_err(|e| e.to_string())?;
        let mut client = ReplicationClient::connect_gated(config)
            .await
            .map_err(|e| e.to_string())?;
        client
            .identify_system()
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
    .await;
    let migrations = buffer::migrate(conn).await.map_err(|e| e.to_string());
    let catalog = catalog::connect(&iceberg(conn.clone(), dir), None)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    vec![
        ("sql", sql),
        ("replication", replication),
        ("migrations", migrations),
        ("iceberg catalog", catalog),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_chain_and_the_host_name_on_every_connection() {
    let ca = Ca::new("philotes test CA");
    let (pg, ca_file) = server(&ca);
    pg.create_db("shop").await;

    // The right name: every kind of connection verifies and connects.
    let good = uri(&pg, "localhost", "shop", &rootcert("verify-full", &ca_file));
    for (what, r) in every_connection(&good, pg.dir()).await {
        assert!(r.is_ok(), "{what} with verify-full to localhost: {r:?}");
    }

    // 127.0.0.1 is not a name the certificate holds: refused, naming the mode and the reason.
    let wrong_name = uri(&pg, "127.0.0.1", "shop", &rootcert("verify-full", &ca_file));
    for (what, r) in every_connection(&wrong_name, pg.dir()).await {
        let e = r.expect_err(what);
        assert!(e.contains("sslmode=verify-full"), "{what}: {e}");
        assert!(
            e.contains("not valid for host name")
                || e.contains("not valid for name")
                || e.contains("NotValidForName"),
            "{what}: {e}"
        );
        assert!(
            !e.contains(PASSWORD),
            "{what} error shows the password: {e}"
        );
    }
    // Ours (SQL and replication) say it in words.
    let e = pg::connect(&wrong_name, "source")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(
            "sslmode=verify-full: the server certificate is not valid for host name 127.0.0.1"
        ),
        "{e}"
    );

    // verify-ca checks the chain only: the wrong name passes. Except in the Iceberg catalog: sqlx
    // 0.8.6 does not know rustls's NotValidForNameContext, so it checks the name as verify-full does
    // (README, TLS verification).
    let ca_only = uri(&pg, "127.0.0.1", "shop", &rootcert("verify-ca", &ca_file));
    for (what, r) in every_connection(&ca_only, pg.dir()).await {
        match what {
            "iceberg catalog" => {
                let e = r.expect_err(what);
                assert!(e.contains("not valid for name"), "{what}: {e}");
            }
            _ => assert!(r.is_ok(), "{what} with verify-ca to 127.0.0.1: {r:?}"),
        }
    }
    // require with a root certificate checks as verify-ca, as libpq does.
    let require = uri(&pg, "127.0.0.1", "shop", &rootcert("require", &ca_file));
    assert!(pg::connect(&require, "source").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_ca_is_refused_in_both_verify_modes() {
    let ca = Ca::new("philotes test CA");
    let (pg, _) = server(&ca);
    pg.create_db("shop").await;
    let other = pg.dir().join("other-ca.crt");
    std::fs::write(&other, Ca::new("another CA").pem()).unwrap();
    for mode in ["verify-full", "verify-ca"] {
        let conn = uri(&pg, "localhost", "shop", &rootcert(mode, &other));
        for (what, r) in every_connection(&conn, pg.dir()).await {
            let e = r.expect_err(what);
            assert!(e.contains(&format!("sslmode={mode}")), "{what}: {e}");
            assert!(
                e.contains("not signed by the CA") || e.contains("UnknownIssuer"),
                "{what}: {e}"
            );
            assert!(
                !e.contains(PASSWORD),
                "{what} error shows the password: {e}"
            );
        }
        let e = pg::connect(&conn, "source")
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&format!(
                "sslmode={mode}: the server certificate is not signed by the CA of sslrootcert {}",
                other.display()
            )),
            "{e}"
        );
    }
    // Without verification (require, no root certificate) the same server is accepted, as before.
    let require = uri(&pg, "127.0.0.1", "shop", "sslmode=require");
    assert!(pg::connect(&require, "source").await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_accepts_an_ip_address_the_certificate_names() {
    let ca = Ca::new("philotes test CA");
    let (crt, key) = ca.server(&["127.0.0.1"]);
    let pg = Pg::start_tls_pem(&crt, &key);
    pg.create_db("shop").await;
    let ca_file = pg.dir().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let by_ip = uri(&pg, "127.0.0.1", "shop", &rootcert("verify-full", &ca_file));
    for (what, r) in every_connection(&by_ip, pg.dir()).await {
        assert!(r.is_ok(), "{what} with verify-full to 127.0.0.1: {r:?}");
    }
    // The certificate names the address, not localhost.
    let by_name = uri(&pg, "localhost", "shop", &rootcert("verify-full", &ca_file));
    let e = pg::connect(&by_name, "source")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(
            "sslmode=verify-full: the server certificate is not valid for host name localhost"
        ),
        "{e}"
    );
}

/// Indents `text` by `n` spaces, for a YAML block scalar.
fn indent(text: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_verifies_source_buffer_and_sink_with_the_ca_from_a_secret() {
    let ca = Ca::new("philotes test CA");
    let (pg, _) = server(&ca);
    let (src, dst) = setup(&pg).await;
    src.batch_execute("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT i, 'before' FROM generate_series(1, 50) i")
        .await
        .unwrap();
    let at = |db: &str| {
        format!(
            "postgres://philotes:{PASSWORD}@localhost:{}/{db}?sslmode=verify-full",
            pg.port
        )
    };
    let tls = "tls: {caSecretRef: {name: db-ca, key: ca.crt}}";
    let manifest = format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: db-ca}}
stringData:
  ca.crt: |
{ca}---
apiVersion: v1
kind: Secret
metadata: {{name: dbs}}
stringData: {{source: "{source}", sink: "{sink}"}}
---
apiVersion: philotes.io/v1alpha1
kind: CdcPipeline
metadata: {{name: verified}}
spec:
  source:
    connectionSecretRef: {{name: dbs, key: source}}
    {tls}
    tables: [t]
  sink:
    postgres: {{connectionSecretRef: {{name: dbs, key: sink}}, schema: replica, {tls}}}
{fast}
"#,
        fast = FAST.replace(
            "buffer: {batchSize",
            &format!("buffer: {{connectionSecretRef: {{name: dbs, key: sink}}, {tls}, batchSize")
        ),
        ca = indent(&ca.pem(), 4),
        source = at("shop"),
        sink = at("warehouse"),
    );
    let m = standalone::parse(&manifest).unwrap();
    let (config, _) = standalone::configs(&m).unwrap().remove(0);
    assert!(config.buffer.tls().ca.is_some(), "the buffer has the CA");
    assert_eq!(
        config.source.to_string(),
        format!("postgres://localhost:{}/shop?sslmode=verify-full", pg.port)
    );
    let h = PipelineHandle::start(config, Arc::new(Metrics::new()));
    wait_phase(&h, Phase::Running).await;
    src.batch_execute("INSERT INTO t SELECT i, 'after' FROM generate_series(51, 100) i; UPDATE t SET v = 'changed' WHERE id <= 10; DELETE FROM t WHERE id > 90")
        .await
        .unwrap();
    wait_same(&src, "t", &dst, "replica.t", "id", WAIT).await;
    // Every connection of the pipeline is encrypted: source (SQL, reader), buffer and sink.
    support::assert_pipeline_connections_use_tls(&src).await;
    h.stop().await;

    // The same manifest with a CA that did not sign the server: the pipeline does not stream, and
    // says why.
    let wrong = manifest.replace(
        &indent(&ca.pem(), 4),
        &indent(&Ca::new("another CA").pem(), 4),
    );
    let m = standalone::parse(&wrong).unwrap();
    let (config, _) = standalone::configs(&m).unwrap().remove(0);
    let h = PipelineHandle::start(config, Arc::new(Metrics::new()));
    let mut rx = h.progress();
    let refused = |p: &philotes::engine::Progress| {
        p.last_error
            .as_deref()
            .is_some_and(|e| e.contains("not signed by the CA") || e.contains("UnknownIssuer"))
    };
    let seen = tokio::time::timeout(WAIT, rx.wait_for(refused))
        .await
        .is_ok();
    let p = h.current();
    assert!(seen, "no TLS refusal reported: {p:?}");
    let e = p.last_error.clone().unwrap_or_default();
    assert!(e.contains("sslmode=verify-full"), "{e}");
    assert!(!e.contains(PASSWORD), "{e}");
    assert_ne!(p.phase, Phase::Running);
    h.stop().await;
}
