//! The benchmark's clusters, made by the shared launcher ([`philotes::testkit`]). Durability settings
//! (fsync, synchronous_commit, full_page_writes, ...) keep their defaults; only capacity settings change.

use std::ops::Deref;

use philotes::testkit;
pub use philotes::testkit::{bindir, free_port};

pub const PASSWORD: &str = "philotes-bench-pw";

/// A benchmark cluster; everything but [`Cluster::start`] is the shared launcher's.
pub struct Cluster(testkit::Cluster);

impl Cluster {
    /// Starts a cluster; `logical` sets wal_level=logical (the source), otherwise the WAL level stays
    /// at its default (a sink). `keep` leaves its directory behind.
    pub fn start(name: &str, logical: bool, keep: bool) -> anyhow::Result<Cluster> {
        // Capacity only: 50 idle pipelines need ~350 connections and 50+ slots. Durability (fsync,
        // synchronous_commit, full_page_writes, wal_sync_method) and memory settings stay default.
        let mut conf = String::from("max_connections = 500\n");
        if logical {
            conf.push_str("max_replication_slots = 100\nmax_wal_senders = 100\n");
        }
        let cluster = testkit::Cluster::start(&testkit::Options {
            name: format!("bench-{name}"),
            password: PASSWORD.into(),
            logical,
            tls: false,
            tls_pem: None,
            unsafe_durability: false,
            conf,
            keep,
        })?;
        Ok(Cluster(cluster))
    }
}

impl Deref for Cluster {
    type Target = testkit::Cluster;

    fn deref(&self) -> &testkit::Cluster {
        &self.0
    }
}
