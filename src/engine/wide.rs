//! One wide row in memory at a time. The reader enters the gate before it encodes a change larger
//! than [`WIDE_BYTES`] and holds the pass until the buffer has its batch; the processor enters it
//! before it reads such a row back from the buffer and holds the pass until the row is delivered.
//! Without it the two sides each work on a wide row of their own at once, and the peak is the sum
//! of both sides' copies (received message, encoded rows, read-back row, decoded values, sink data).
//! The processor also charges its wide row to the replication stream's byte budget, so that the
//! replication worker does not read the next wide message off the socket meanwhile.

use std::sync::Arc;

use pgwire_replication::{BudgetCharge, ByteBudget};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Changes (replication message bytes) and buffer rows (their `size`) above this are wide.
pub const WIDE_BYTES: usize = 2 << 20;

/// One per session, shared by its reader and its processor.
#[derive(Clone)]
pub struct WideGate {
    sem: Arc<Semaphore>,
    budget: Arc<ByteBudget>,
}

/// Held while a wide row is in memory; dropping it lets the other side in.
#[derive(Debug)]
pub struct WidePass {
    _permit: OwnedSemaphorePermit,
    _charge: Option<BudgetCharge>,
}

impl WideGate {
    /// With the replication stream's byte budget of `budget_bytes`.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            sem: Arc::new(Semaphore::new(1)),
            budget: Arc::new(ByteBudget::new(budget_bytes)),
        }
    }

    /// The replication stream's byte budget.
    pub fn budget(&self) -> Arc<ByteBudget> {
        self.budget.clone()
    }

    /// Waits until no other wide row is in memory.
    pub async fn enter(&self) -> WidePass {
        // The semaphore is never closed.
        match self.sem.clone().acquire_owned().await {
            Ok(p) => WidePass {
                _permit: p,
                _charge: None,
            },
            Err(_) => unreachable!("the wide-row gate is never closed"),
        }
    }

    /// [`enter`](Self::enter), and `bytes` charged to the byte budget while the pass is held.
    pub async fn enter_charged(&self, bytes: usize) -> WidePass {
        let mut pass = self.enter().await;
        pass._charge = Some(self.budget.charge(bytes));
        pass
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_wide_row_waits_until_the_first_pass_is_dropped() {
        let gate = WideGate::new(1 << 20);
        let first = gate.enter().await;
        let second = gate.enter();
        tokio::pin!(second);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), &mut second)
                .await
                .is_err()
        );
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second)
            .await
            .expect("entered once the first pass is gone");
    }
}
