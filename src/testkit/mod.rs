//! Throwaway PostgreSQL clusters for tests and the benchmark. Not used by the operator itself.

mod cluster;

pub use self::cluster::{Cluster, Options, USER, bindir, free_port};
