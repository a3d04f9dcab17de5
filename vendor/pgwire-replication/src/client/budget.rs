//! A byte budget on the events between the worker and the consumer (added to the vendored copy for
//! Philotes; see `vendor/README.md`). The event channel counts events, so wide rows could pile up in
//! it without bound; with a budget the worker waits (still sending standby feedback, and no longer
//! reading the socket, so TCP holds the rest) before forwarding an event that would take the bytes
//! in flight past the cap. One event is always let through, however large.

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

use super::worker::ReplicationEvent;
use crate::error::PgWireError;

pub(crate) struct ByteBudget {
    cap: usize,
    in_flight: AtomicUsize,
    freed: Notify,
}

impl ByteBudget {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            in_flight: AtomicUsize::new(0),
            freed: Notify::new(),
        }
    }

    /// Takes `n` bytes if they fit (or nothing is in flight). Only the worker takes.
    pub(crate) fn try_take(&self, n: usize) -> bool {
        let cur = self.in_flight.load(Ordering::Acquire);
        if cur == 0 || cur.saturating_add(n) <= self.cap {
            self.in_flight.fetch_add(n, Ordering::AcqRel);
            true
        } else {
            false
        }
    }

    /// Returns `n` bytes the consumer took off the channel.
    pub(crate) fn give_back(&self, n: usize) {
        if n > 0 {
            self.in_flight.fetch_sub(n, Ordering::AcqRel);
            self.freed.notify_one();
        }
    }

    pub(crate) fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

/// The bytes an event holds, as the budget counts them.
pub(crate) fn event_bytes(ev: &std::result::Result<ReplicationEvent, PgWireError>) -> usize {
    match ev {
        Ok(ReplicationEvent::XLogData { data, .. }) => data.len(),
        _ => 0,
    }
}
