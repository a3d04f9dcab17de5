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
        Self::start_for(name, logical, keep, 50)
    }

    /// Starts a cluster with room for `pipelines` idle pipelines (7 connections and a slot each).
    pub fn start_for(
        name: &str,
        logical: bool,
        keep: bool,
        pipelines: usize,
    ) -> anyhow::Result<Cluster> {
        let connections = (pipelines * 8).max(500);
        let slots = (pipelines + 20).max(100);
        // Room for an apply worker per native subscription of the scaling phase (16 at once), and in
        // the sink a replication origin for each (max_replication_slots bounds those too).
        let mut conf = format!(
            "max_connections = {connections}\nmax_worker_processes = 40\nmax_logical_replication_workers = 32\nmax_replication_slots = {slots}\n"
        );
        if logical {
            conf.push_str(&format!("max_wal_senders = {slots}\n"));
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
