//! One wide row in memory at a time. The reader enters the gate before it encodes a change larger
//! than [`WIDE_BYTES`] and holds the pass until the buffer has its batch; the processor enters it
//! before it reads such a row back from the buffer and holds the pass until the row is delivered.
//! Without it the two sides each work on a wide row of their own at once, and the peak is the sum
//! of both sides' copies (received message, encoded rows, read-back row, decoded values, sink data).
//! The processor also charges its wide row to the replication stream's byte budget, so that the
//! replication worker does not read the next wide message off the socket meanwhile. A batch that
//! ends a transaction hands its pass (charged) straight to the processor when the buffer has it:
//! otherwise the worker would read the next wide message while the processor is about to read this
//! row. (A batch inside a transaction gives its pass back: the processor cannot read the row before
//! the transaction's next rows are in, which take the pass.)

use std::sync::{Arc, Mutex};

use super::event::Position;

use pgwire_replication::{BudgetCharge, ByteBudget};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Changes (replication message bytes) and buffer rows (their `size`) above this are wide.
pub const WIDE_BYTES: usize = 2 << 20;

/// One per session, shared by its reader and its processor.
#[derive(Clone)]
pub struct WideGate {
    sem: Arc<Semaphore>,
    budget: Arc<ByteBudget>,
    /// The processor's pass, and the position of the wide row it is for: given back once the
    /// processor has delivered that row.
    held: Arc<Mutex<Option<(Position, WidePass)>>>,
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
            held: Arc::default(),
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

    /// Gives `pass` to the processor for the wide row at `pos` (`bytes` of it), charged to the
    /// byte budget until [`release`](Self::release) passes `pos`.
    pub fn hold(&self, pos: Position, mut pass: WidePass, bytes: usize) {
        pass._charge = Some(self.budget.charge(bytes));
        if let Ok(mut h) = self.held.lock() {
            *h = Some((pos, pass));
        }
    }

    /// Whether the processor holds a pass.
    pub fn holds(&self) -> bool {
        self.held.lock().is_ok_and(|h| h.is_some())
    }

    /// The processor has delivered everything up to `upto`: a pass for a row among it goes back.
    pub fn release(&self, upto: Position) {
        if let Ok(mut h) = self.held.lock()
            && h.as_ref().is_some_and(|(pos, _)| *pos <= upto)
        {
            *h = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replication worker's reader (vendored pgwire-replication) must not keep a part of a
    /// wide message: its memory would outlive the budget's count of it (it lived on until the
    /// next message, beside the processor's copy of the row and the next message).
    #[tokio::test]
    async fn a_wide_replication_message_shares_its_memory_with_nothing_the_reader_keeps() {
        use pgwire_replication::protocol::framing::MessageReader;
        let body = vec![7u8; WIDE_BYTES];
        let mut data = vec![b'd'];
        data.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        data.extend_from_slice(&body);
        data.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        let mut cursor = std::io::Cursor::new(&data[..]);
        let mut reader = MessageReader::new();
        let msg = reader.read(&mut cursor).await.unwrap();
        assert_eq!(msg.payload.len(), body.len());
        assert!(msg.payload.is_unique());
        let next = reader.read(&mut cursor).await.unwrap();
        assert_eq!((next.tag, &next.payload[..]), (b'Z', &b"I"[..]));
    }

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
