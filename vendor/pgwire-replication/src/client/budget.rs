//! A byte budget on the events between the worker and the consumer (added to the vendored copy for
//! Philotes; see `vendor/README.md`). The event channel counts events, so wide rows could pile up in
//! it without bound; with a budget the worker waits (still sending standby feedback, and no longer
//! reading the socket, so TCP holds the rest) before reading the body of a message that would take
//! the bytes in flight past the cap. One message is always let through, however large. The bytes of
//! an event count until the consumer drops its data (every clone and slice of it), not merely until
//! it takes the event off the channel: a wide row being decoded keeps the next one on the wire.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::worker::ReplicationEvent;
use crate::error::PgWireError;

/// Shared by the worker and, through [`ReplicationConfig::with_byte_budget`](crate::ReplicationConfig::with_byte_budget),
/// by a consumer that charges it for row data it holds elsewhere, so that the worker stops reading
/// meanwhile.
#[derive(Debug)]
pub struct ByteBudget {
    cap: usize,
    in_flight: AtomicUsize,
    freed: Notify,
}

impl ByteBudget {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes `n` bytes if they fit (or nothing is in flight). Only the worker takes.
    pub(crate) fn try_take(&self, n: usize) -> bool {
        if self.fits(n) {
            self.in_flight.fetch_add(n, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// Returns `n` bytes the consumer is done with.
    pub(crate) fn give_back(&self, n: usize) {
        if n > 0 {
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_one();
        }
    }

    pub(crate) fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    /// Whether `n` more bytes would be let through now.
    pub(crate) fn fits(&self, n: usize) -> bool {
        let cur = self.in_flight.load(Ordering::Acquire);
        cur == 0 || cur.saturating_add(n) <= self.cap
    }

    /// Waits until `n` more bytes would be let through (takes nothing). Cancel-safe.
    pub(crate) async fn until_fits(&self, n: usize) {
        loop {
            let freed = self.freed();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if self.fits(n) {
                return;
            }
            freed.await;
        }
    }
}

/// Bytes charged to the budget by its consumer, given back when dropped.
#[derive(Debug)]
pub struct BudgetCharge {
    n: usize,
    budget: std::sync::Arc<ByteBudget>,
}

impl Drop for BudgetCharge {
    fn drop(&mut self) {
        self.budget.give_back(self.n);
    }
}

impl ByteBudget {
    /// Counts `n` bytes as in flight until the charge is dropped (not waiting: they are in memory
    /// already). The worker reads no more than the cap lets through meanwhile.
    pub fn charge(self: &std::sync::Arc<Self>, n: usize) -> BudgetCharge {
        self.in_flight.fetch_add(n, Ordering::AcqRel);
        BudgetCharge {
            n,
            budget: self.clone(),
        }
    }
}

/// Event data whose bytes go back to the budget when the last clone or slice of it is dropped.
struct Held {
    data: bytes::Bytes,
    budget: std::sync::Arc<ByteBudget>,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.give_back(self.data.len());
    }
}

/// `data`, whose bytes the budget counts (taken already), given back once it is dropped.
pub(crate) fn hold(data: bytes::Bytes, budget: std::sync::Arc<ByteBudget>) -> bytes::Bytes {
    if data.is_empty() {
        return data;
    }
    bytes::Bytes::from_owner(Held { data, budget })
}

/// The bytes an event holds, as the budget counts them.
pub(crate) fn event_bytes(ev: &std::result::Result<ReplicationEvent, PgWireError>) -> usize {
    match ev {
        Ok(ReplicationEvent::XLogData { data, .. }) => data.len(),
        _ => 0,
    }
}

/// The event, its data counted until dropped (see [`hold`]).
pub(crate) fn hold_event(
    mut ev: std::result::Result<ReplicationEvent, PgWireError>,
    budget: &std::sync::Arc<ByteBudget>,
) -> std::result::Result<ReplicationEvent, PgWireError> {
    if let Ok(ReplicationEvent::XLogData { data, .. }) = &mut ev {
        *data = hold(std::mem::take(data), budget.clone());
    }
    ev
}
