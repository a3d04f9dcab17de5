//! Sinks receive ordered batches and must be idempotent: a batch may be applied again after a crash.
//! A sink transaction holds whole source transactions: batches end at source commits, and a source
//! transaction larger than a batch spans several batches of one sink transaction ([`Part`]).

pub mod fence;
pub mod iceberg;
pub mod plan;
pub mod postgres;
pub mod rekey;
pub mod sql;

use std::collections::HashMap;
use std::future::Future;

use super::error::EngineError;
use super::event::{Event, Position, RelationInfo};

/// Events of a batch that the sink refused, with the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub events: Vec<usize>,
    pub error: String,
}

/// Where a batch stands in its sink transaction: `begin` opens it, `commit` ends it; a batch with
/// neither continues the transaction an earlier batch opened. After an error no transaction is open:
/// the sink has rolled back everything since the `begin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub begin: bool,
    pub commit: bool,
}

impl Part {
    /// A batch that is a sink transaction of its own.
    pub const WHOLE: Part = Part {
        begin: true,
        commit: true,
    };

    pub fn is_whole(self) -> bool {
        self == Part::WHOLE
    }
}

/// Batches of at least this many changes trip the circuit breaker when more than half are refused.
pub const BREAKER_MIN_CHANGES: usize = 100;

/// The circuit breaker: when most of a batch is refused, the sink (or the data) is wrong as a whole;
/// delivery stops and says why instead of dead-lettering the stream change by change.
pub fn breaker_trips(refused: usize, total: usize) -> bool {
    total >= BREAKER_MIN_CHANGES && refused * 2 > total
}

/// The error that stops delivery when [`breaker_trips`]; `first` is the first refusal's reason.
pub fn breaker_error(refused: usize, total: usize, first: &str) -> EngineError {
    EngineError::invalid(
        format!(
            "the sink refused {refused} of {total} changes of one batch (first: {first}); delivery stopped instead of dead-lettering most of the stream"
        ),
        "fix what the error names (the sink table's definition, constraints or types); the pipeline resumes where it stopped, and nothing was dead-lettered",
    )
}

pub trait Sink: Send {
    /// Makes the I/O-free part of applying a batch, without the sink itself, so that the next batch
    /// is prepared while the sink applies the current one.
    type Planner: Send + Sync;
    /// A batch ready to be sent.
    type Prepared: Send + Sync;

    fn planner(&self) -> Self::Planner;

    /// The position of the last change the sink holds, recorded in the sink's own transactions
    /// (read when it was prepared); None when it records none. Everything up to it is in the sink.
    fn recorded(&self) -> Option<Position> {
        None
    }

    fn prepare(
        planner: &Self::Planner,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Self::Prepared, EngineError>;

    /// Applies a prepared batch (`batch`, as [`Sink::prepare`] made it) as `part` of a sink
    /// transaction; on error nothing of that transaction is applied.
    fn apply_prepared(
        &mut self,
        batch: &[Event],
        prepared: &Self::Prepared,
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Applies what it can of the batch as `part` of a sink transaction, each change on its own, and
    /// returns the changes refused for their data. Errors of other kinds end the attempt (and roll
    /// the transaction back). With `breaker`, a batch that [`breaker_trips`] rolls the transaction
    /// back and returns [`breaker_error`].
    fn apply_isolated(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
        breaker: bool,
    ) -> impl Future<Output = Result<Vec<Rejected>, EngineError>> + Send;

    // A sink may stage committed sink transactions and make them durable later, in one go (the
    // Iceberg sink commits a snapshot every `commitInterval`). The processor then marks the buffer
    // processed only up to what is durable, and staged changes count in the buffer's depth: between
    // sink transactions it flushes when `flush_at` is due or the staged changes reach half of the
    // high watermark, and at once when they hold the reader (backpressure) with nothing else left
    // to deliver. The defaults are those of a sink whose commits are durable at once (PostgreSQL
    // without `spec.buffer.bypass`).

    /// Whether committed sink transactions are staged, not yet durable.
    fn pending(&self) -> bool {
        false
    }

    /// When the staged transactions should be made durable even if no batch comes.
    fn flush_at(&self) -> Option<std::time::Instant> {
        None
    }

    /// Makes every staged transaction durable. Called only between sink transactions. On error
    /// nothing staged is durable, and [`take_lost`](Self::take_lost) says so.
    fn flush(&mut self) -> impl Future<Output = Result<(), EngineError>> + Send {
        std::future::ready(Ok(()))
    }

    /// After an error: whether the sink dropped staged transactions, so that delivery must start
    /// again after the last durable position. Reading it clears it.
    fn take_lost(&mut self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_trips_when_most_of_a_large_batch_is_refused() {
        assert!(
            !breaker_trips(99, 99),
            "small batches are dead-lettered as usual"
        );
        assert!(!breaker_trips(50, 100));
        assert!(breaker_trips(51, 100));
        assert!(breaker_trips(1000, 1000));
        assert_eq!(
            breaker_error(3, 4, "x").class(),
            crate::engine::error::ErrorClass::Config
        );
    }
}
