//! Sinks receive ordered batches and must be idempotent: a batch may be applied again after a crash.

pub mod plan;
pub mod postgres;
pub mod sql;

use std::collections::HashMap;
use std::future::Future;

use super::error::EngineError;
use super::event::{Event, RelationInfo};

/// Events of a batch that the sink refused, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub events: Vec<usize>,
    pub error: String,
}

pub trait Sink: Send {
    /// Applies the whole batch in one transaction, or nothing.
    fn apply(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Applies what it can of the batch in one transaction, each change on its own, and returns the
    /// changes refused for their data. Errors of other kinds end the attempt.
    fn apply_isolated(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> impl Future<Output = Result<Vec<Rejected>, EngineError>> + Send;
}
