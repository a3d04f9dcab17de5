//! Philotes: PostgreSQL change-data-capture pipelines, run by a Kubernetes operator or on their own.

pub mod crd;
pub mod dead_letters;
pub mod engine;
pub mod health;
pub mod operator;
pub mod standalone;
pub mod supervisor;
pub mod testkit;
pub mod validate;

/// Selects ring as the process's TLS crypto provider. Two providers are compiled in (ring, and
/// aws-lc-rs through pgwire-replication), so rustls cannot pick one by itself; kube's client needs
/// one. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
