//! Philotes: PostgreSQL change-data-capture pipelines, run by a Kubernetes operator or on their own.

pub mod crd;
pub mod engine;
pub mod health;
pub mod supervisor;
pub mod validate;
pub mod standalone;
pub mod dead_letters;
