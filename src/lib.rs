//! Philotes: PostgreSQL change-data-capture pipelines, run by a Kubernetes operator or on their own.

pub mod crd;
pub mod dead_letters;
pub mod engine;
pub mod health;
pub mod operator;
pub mod standalone;
pub mod supervisor;
pub mod validate;
