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
    /// Makes the I/O-free part of applying a batch, without the sink itself, so that the next batch
    /// is prepared while the sink applies the current one.
    type Planner: Send + Sync;
    /// A batch ready to be sent.
    type Prepared: Send + Sync;

    fn planner(&self) -> Self::Planner;

    fn prepare(
        planner: &Self::Planner,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Self::Prepared, EngineError>;

    /// Applies a prepared batch in one transaction, or nothing.
    fn apply_prepared(
        &mut self,
        prepared: &Self::Prepared,
        rels: &HashMap<i64, RelationInfo>,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Applies the whole batch in one transaction, or nothing.
    fn apply(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> impl Future<Output = Result<(), EngineError>> + Send {
        let prepared = Self::prepare(&self.planner(), batch, rels);
        async move { self.apply_prepared(&prepared?, rels).await }
    }

    /// Applies what it can of the batch in one transaction, each change on its own, and returns the
    /// changes refused for their data. Errors of other kinds end the attempt.
    fn apply_isolated(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> impl Future<Output = Result<Vec<Rejected>, EngineError>> + Send;
}
