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

/// Allocations of 16 MiB and more (wide rows: a 20 MiB `bytea` is 40 MiB as text) are mapped on
/// their own and given back to the system when freed. glibc's default threshold rises after the
/// first large free (up to 32 MiB), after which such buffers come from the heap and its
/// fragments stay resident: 40-60 MiB of RSS more in the wide-rows benchmark. Smaller buffers
/// (write batches, queues) still come from the heap.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of glibc's allocator (under its own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
    }
}
