//! The batch processor: takes durable events in order, applies each batch to the sink in one
//! transaction, then records the batch as processed. Sink outages are retried until the sink is back; a
//! batch the sink refuses for its data is retried `maxAttempts` times, then applied change by change so
//! that only the refused changes go to the dead-letter queue.
//!
//! Events come from the buffer. Rows the buffer writer of the same session has just committed are also
//! handed over in memory ([`Handoff`]), and taken when they continue exactly where the processor
//! stands; otherwise (a backlog, a restart, a handoff dropped because the processor was busy) it reads
//! the buffer. Only durable events are delivered either way.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::buffer::{Buffer, decode_rows};
use super::config::{Delivery, PipelineConfig};
use super::dlq;
use super::error::{EngineError, ErrorClass};
use super::event::{Event, Position, RelationInfo};
use super::pg;
use super::retry;
use super::sink::{Part, Sink, rekey};

pub struct Processor<S: Sink> {
    pub cfg: Arc<PipelineConfig>,
    pub buffer: Buffer,
    pub sink: S,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub durable_rx: watch::Receiver<u64>,
    pub delivery_rx: watch::Receiver<Delivery>,
    /// Rows the buffer writer of the same session has just committed (see [`Handoff`]).
    pub handoffs: Option<mpsc::Receiver<Handoff>>,
    /// Delivery starts after the later of this and the buffer's processed position.
    pub delivered: Position,
    /// `spec.buffer.bypass`: the handoffs are the only copy of the rows (none is lost or dropped,
    /// and rows of an open transaction are delivered before its commit arrives); the LSN up to which
    /// the sink holds everything goes back to the reader, which acknowledges it to the source.
    pub bypass: Option<watch::Sender<u64>>,
}

/// Rows the buffer writer has just committed, for the processor of the same session.
pub struct Handoff {
    /// Position of the event the writer wrote just before these (or the newest one in the buffer
    /// when the session began).
    pub after: Position,
    /// The rows, as [`buffer::CopyRows`](super::buffer::CopyRows) encoded them.
    pub rows: Bytes,
    /// Position of the last row.
    pub last: Option<Position>,
    /// The durable position after this batch, when it completed a transaction.
    pub durable: Option<u64>,
}

/// Events known to follow the processed position, in order.
struct Queue {
    events: VecDeque<Event>,
    /// Position of the last known event (the processed position when none is known yet).
    last: Position,
    /// Every event with an LSN up to this one is known (processed, in a batch, or queued).
    covered: u64,
    /// The durable position the handoffs taken announced (they come before the durable watch moves).
    durable: u64,
    /// Most events the queue holds; a handoff that would exceed it is left to the buffer.
    cap: usize,
    /// Encoded bytes of the queued events ([`Event::size`]); a handoff that would take it past
    /// [`QUEUE_BYTES`] is left to the buffer.
    bytes: usize,
    /// Handoffs that start beyond `last` (the processor is reading the buffer behind the writer),
    /// kept until the reads reach them.
    later: VecDeque<Handoff>,
    /// Handoffs are the only copy of their rows (`spec.buffer.bypass`): each is taken whole; the
    /// processor takes one only when it has room and is not reading the buffer behind the writer.
    lossless: bool,
}

/// Most handoffs kept for later (each at most one write batch).
const LATER: usize = 8;

/// Most encoded bytes of events in one batch, and in one read of the buffer (a batch holds at least one
/// event, however large).
const BATCH_BYTES: usize = 8 << 20;

/// Most encoded bytes of events the queue holds.
const QUEUE_BYTES: usize = 16 << 20;

impl Queue {
    /// Takes what a handoff adds after `last` when it starts at or before `last`; keeps it for later
    /// when it starts beyond; drops it when its rows are known already.
    fn offer(&mut self, h: Handoff) -> Result<(), EngineError> {
        match h.last {
            // No rows: only the durable position moved, which tells something only where the queue
            // ends exactly.
            None => {
                if h.after == self.last {
                    self.durable_at(h.durable);
                }
            }
            Some(last) if last <= self.last => {}
            Some(_) if h.after > self.last && self.lossless => {
                return Err(EngineError::Protocol(format!(
                    "rows handed over after {:?} do not follow the processor's {:?}",
                    h.after, self.last
                )));
            }
            Some(_) if h.after > self.last => {
                if self.later.len() == LATER {
                    self.later.pop_front();
                }
                self.later.push_back(h);
            }
            Some(last) => {
                let known = self.last;
                let events: Vec<Event> = decode_rows(&h.rows)?
                    .into_iter()
                    .filter(|e| e.pos > known)
                    .collect();
                let bytes: usize = events.iter().map(Event::size).sum();
                if self.lossless
                    || (self.events.len() + events.len() <= self.cap
                        && self.bytes + bytes <= QUEUE_BYTES)
                {
                    self.bytes += bytes;
                    self.events.extend(events);
                    self.last = last;
                    self.durable_at(h.durable);
                }
            }
        }
        Ok(())
    }

    /// Whether a lossless queue takes another handoff now: it has room, and is not behind the
    /// buffer (whose rows come before any handoff).
    fn takes_handoff(&self, buffer_durable: u64) -> bool {
        self.events.len() < self.cap && self.bytes < QUEUE_BYTES && !self.behind(buffer_durable)
    }

    /// Up to which commit LSN events may be taken: those of durable transactions and, bypassing
    /// the buffer, of one whose commit has not come yet when more than a batch is queued, so that
    /// a full batch of it goes into a sink transaction left open. The last event taken then always
    /// has another after it in the queue (which tells whether its transaction ends there): the
    /// last event of a transaction is never applied before its commit is known.
    fn avail(&self, durable: u64, limit: usize) -> u64 {
        let more_than_a_batch =
            self.events.len() > limit || (self.events.len() >= 2 && self.bytes > BATCH_BYTES);
        if self.lossless && more_than_a_batch {
            u64::MAX
        } else {
            durable
        }
    }

    fn durable_at(&mut self, d: Option<u64>) {
        if let Some(d) = d {
            self.covered = self.covered.max(d);
            self.durable = self.durable.max(d);
        }
    }

    /// Takes the handoffs kept for later that the queue has reached.
    fn settle(&mut self) -> Result<(), EngineError> {
        while let Some(h) = self.later.front() {
            if h.after > self.last {
                break;
            }
            if let Some(h) = self.later.pop_front() {
                self.offer(h)?;
            }
        }
        Ok(())
    }

    /// Up to `n` events and about `max_bytes` (at least one event) from the front whose transactions
    /// are durable: their commit LSN is before the durable position (the end of the last commit in
    /// the buffer, where the next commit may start).
    fn pop_durable(&mut self, durable: u64, n: usize, max_bytes: usize) -> Vec<Event> {
        let (mut k, mut taken) = (0, 0);
        for e in self.events.iter().take(n) {
            let size = e.size();
            if e.pos.lsn >= durable || (k > 0 && taken + size > max_bytes) {
                break;
            }
            k += 1;
            taken += size;
        }
        self.bytes = self.bytes.saturating_sub(taken);
        self.events.drain(..k).collect()
    }

    /// Puts events taken from the front back there, in order.
    fn unpop(&mut self, events: Vec<Event>) {
        self.bytes += events.iter().map(Event::size).sum::<usize>();
        for e in events.into_iter().rev() {
            self.events.push_front(e);
        }
    }

    /// Queues events read from the buffer.
    fn push_read(&mut self, events: Vec<Event>) {
        self.bytes += events.iter().map(Event::size).sum::<usize>();
        self.events.extend(events);
    }

    /// Whether the buffer may hold durable events the queue lacks.
    fn behind(&self, durable: u64) -> bool {
        durable > self.covered && self.events.back().is_none_or(|e| e.pos.lsn < durable)
    }

    /// Whether the source transaction of `last` (durable, so complete in the buffer) ends there:
    /// the next known event belongs to another one, or every durable event is known. None: the
    /// buffer must be read to tell.
    fn ends_txn(&self, last: Position, durable: u64) -> Option<bool> {
        if self.lossless {
            // Rows come before their commit: the transaction ends at `last` when the next row is
            // another's, or when its commit has come (durable is past its commit LSN) and no row
            // of it follows.
            return Some(match self.events.front() {
                Some(e) => e.pos.lsn != last.lsn,
                None => durable > last.lsn,
            });
        }
        match self.events.front() {
            Some(e) => Some(e.pos.lsn != last.lsn),
            None if !self.behind(durable) => Some(true),
            None => None,
        }
    }

    /// Starts over after `pos` (a sink transaction was rolled back): what was queued is read again.
    fn rewind(&mut self, pos: Position) {
        self.events.clear();
        self.later.clear();
        self.bytes = 0;
        self.last = pos;
        self.covered = 0;
    }

    /// Notes a read of the buffer after `last` up to `durable`, whose last event is at `read_last`;
    /// `complete` (the read stopped at neither its limit nor its byte cap) means every durable event
    /// is known now. The rows read must be in place (queued, or in the batch ahead) before
    /// [`settle`](Self::settle).
    fn read(&mut self, read_last: Option<Position>, complete: bool, durable: u64) {
        self.last = read_last.unwrap_or(self.last);
        if complete {
            self.covered = self.covered.max(durable);
        }
    }
}

/// How making the sink's staged transactions durable ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Done,
    /// Failed; what was staged is kept for the next try.
    Failed,
    /// Failed; the sink dropped what it staged and delivery starts again after the durable position.
    Rewound,
}

/// How a delivery ended.
enum Outcome {
    Done,
    Cancelled,
    /// The sink transaction spanned earlier batches and was rolled back: it is applied again from the
    /// last committed position.
    Rewind,
    /// The sink dropped the transactions it had staged (see `Sink::take_lost`): they are applied
    /// again from the last position durable in the sink.
    Lost,
    /// As `Rewind`, for data the sink refused: the source transaction is applied again change by
    /// change, so that only refused changes become dead letters.
    Isolate,
}

/// While batches follow each other, the buffer records the processed position at most this often (a
/// position recorded late only means that a restart applies a few batches again, which is harmless);
/// it is recorded at once when the processor catches up or stops.
const MARK_EVERY: Duration = Duration::from_millis(100);

/// A sink transaction holds at most this many batches' worth of events when it spans source
/// transactions (while a backlog waits); a source transaction larger than that is not cut.
const DEEP_TXN_BATCHES: usize = 8;

/// Microseconds between the Unix epoch and 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl<S: Sink> Processor<S> {
    pub async fn run(mut self) -> Result<(), EngineError> {
        let mut rels = pg::deadline(
            self.cfg.response_timeout,
            "reading relations from the buffer",
            self.buffer.relations(),
        )
        .await?;
        let mut processed = pg::deadline(
            self.cfg.response_timeout,
            "reading the buffer checkpoint",
            self.buffer.checkpoint(),
        )
        .await?
        .processed;
        let mut marked = (processed, Instant::now());
        processed = processed.max(self.delivered);
        // What the sink holds durably: the buffer is marked processed up to here, never beyond.
        let mut durable = processed;
        let result = self
            .deliver_batches(&mut rels, &mut processed, &mut durable, &mut marked)
            .await;
        if result.is_ok() && self.sink.pending() {
            // Stopping: what the sink staged becomes durable now, or is delivered again after the
            // restart.
            match self.sink.flush().await {
                Ok(()) => durable = processed,
                Err(e) => {
                    tracing::warn!(pipeline = %self.cfg.name, error = %e, "the sink could not make its staged changes durable on stop; they are delivered again on start")
                }
            }
        }
        if result.is_ok() && marked.0 != durable {
            pg::deadline(
                self.cfg.response_timeout,
                "marking a batch processed in the buffer",
                self.buffer.mark_processed(durable),
            )
            .await?;
        }
        result
    }

    /// Makes what the sink staged durable (see [`Sink::pending`]). On failure it waits a backoff
    /// delay and, when the sink dropped what it staged, makes delivery start again after the durable
    /// position. Err only for errors a person must fix.
    async fn flush_sink(
        &mut self,
        q: &mut Queue,
        processed: &mut Position,
        durable: &mut Position,
        staged: &mut i64,
        outage: &mut (impl Iterator<Item = Duration> + Send),
    ) -> Result<Flush, EngineError> {
        match self.sink.flush().await {
            Ok(()) => {
                self.shared.set_sink_ok();
                *durable = *processed;
                self.committed(std::mem::take(staged), *processed);
                self.acknowledge(*durable, *processed, None);
                Ok(Flush::Done)
            }
            Err(e) if e.class() == ErrorClass::Config => Err(e),
            Err(e) => {
                self.shared.set_sink_error(&e);
                self.shared.stats.retries.inc();
                let lost = self.sink.take_lost();
                if lost && q.lossless {
                    // Its rows were only in memory: the session starts again from what the
                    // sink holds.
                    return Err(e);
                }
                if lost {
                    *staged = 0;
                    *processed = *durable;
                    q.rewind(*durable);
                }
                let delay = outage.next().unwrap_or(self.cfg.retry.max_interval);
                tracing::warn!(pipeline = %self.cfg.name, error = %e, ?delay, lost, "sink could not make staged changes durable; retrying");
                tokio::select! {
                    _ = self.cancel.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
                Ok(if lost { Flush::Rewound } else { Flush::Failed })
            }
        }
    }

    async fn deliver_batches(
        &mut self,
        rels: &mut HashMap<i64, RelationInfo>,
        processed: &mut Position,
        durable_pos: &mut Position,
        marked: &mut (Position, Instant),
    ) -> Result<(), EngineError> {
        let planner = self.sink.planner();
        let limit = self.cfg.batch_size.max(1);
        let mut q = Queue {
            events: VecDeque::new(),
            last: *processed,
            covered: 0,
            durable: 0,
            cap: (8 * limit).max(16_384),
            bytes: 0,
            later: VecDeque::new(),
            lossless: self.bypass.is_some(),
        };
        let mut handoffs = self.handoffs.take();
        // The next batch, taken (and prepared for the sink) while the previous one was being delivered.
        let mut ahead: Option<(Vec<Event>, Option<S::Prepared>)> = None;
        // A sink transaction is open: earlier batches of it are applied, not committed. `processed`
        // stays at the last commit meanwhile; `open` counts the events applied since.
        let mut open: Option<i64> = None;
        let mut flush_outage = retry::backoff(&self.cfg.retry, None);
        // Events of sink transactions committed but not yet durable in the sink (see
        // `Sink::pending`): they count as delivered once durable.
        let mut staged = 0i64;
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            // A pause waits for the open sink transaction to end.
            if open.is_none() && *self.delivery_rx.borrow() == Delivery::Paused {
                if self.sink.pending() {
                    match self
                        .flush_sink(
                            &mut q,
                            processed,
                            durable_pos,
                            &mut staged,
                            &mut flush_outage,
                        )
                        .await?
                    {
                        Flush::Done => flush_outage = retry::backoff(&self.cfg.retry, None),
                        Flush::Failed => {}
                        Flush::Rewound => ahead = None,
                    }
                    continue;
                }
                if marked.0 != *durable_pos {
                    pg::deadline(
                        self.cfg.response_timeout,
                        "marking a batch processed in the buffer",
                        self.buffer.mark_processed(*durable_pos),
                    )
                    .await?;
                    *marked = (*durable_pos, Instant::now());
                }
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    r = self.delivery_rx.changed() => { if r.is_err() { return Ok(()) } }
                }
                continue;
            }
            let buffer_durable = *self.durable_rx.borrow_and_update();
            if let Some(rx) = &mut handoffs {
                while (!q.lossless || q.takes_handoff(buffer_durable))
                    && let Ok(h) = rx.try_recv()
                {
                    q.offer(h)?;
                }
            }
            let durable = buffer_durable.max(q.durable);
            let (mut batch, mut prepared) = ahead.take().unwrap_or_default();
            if batch.len() < limit {
                let room = BATCH_BYTES.saturating_sub(batch.iter().map(Event::size).sum());
                // Nothing read ahead into the queue beside a full batch (a wide row).
                if q.behind(durable) && room > 0 {
                    self.read_into(&mut q, durable, limit).await?;
                }
                let more = if room > 0 {
                    q.pop_durable(q.avail(durable, limit), limit - batch.len(), room)
                } else {
                    Vec::new()
                };
                if !more.is_empty() {
                    batch.extend(more);
                    prepared = None;
                }
            }
            if batch.is_empty() {
                let flush_at = self.sink.flush_at().filter(|_| self.sink.pending());
                if open.is_none()
                    && (flush_at.is_some_and(|t| t <= Instant::now())
                        || (self.sink.pending() && self.reader_held()))
                {
                    if self
                        .flush_sink(
                            &mut q,
                            processed,
                            durable_pos,
                            &mut staged,
                            &mut flush_outage,
                        )
                        .await?
                        == Flush::Done
                    {
                        flush_outage = retry::backoff(&self.cfg.retry, None);
                        let all_applied =
                            q.events.is_empty() && handoffs.as_ref().is_none_or(|rx| rx.is_empty());
                        self.acknowledge(
                            *durable_pos,
                            *processed,
                            all_applied.then_some(q.durable),
                        );
                    }
                    continue;
                }
                if marked.0 != *durable_pos {
                    pg::deadline(
                        self.cfg.response_timeout,
                        "marking a batch processed in the buffer",
                        self.buffer.mark_processed(*durable_pos),
                    )
                    .await?;
                    *marked = (*durable_pos, Instant::now());
                }
                let flush_due = async {
                    match flush_at {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                };
                let take = !q.lossless || q.takes_handoff(buffer_durable);
                let handoff = async {
                    match &mut handoffs {
                        Some(rx) if take => rx.recv().await,
                        Some(_) => std::future::pending().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return Ok(()),
                    h = handoff => match h {
                        Some(h) => q.offer(h)?,
                        None => handoffs = None,
                    },
                    _ = self.durable_rx.changed() => {}
                    _ = self.delivery_rx.changed() => {}
                    _ = flush_due => {}
                    _ = tokio::time::sleep(self.cfg.flush_interval.max(Duration::from_millis(200))) => {}
                }
                continue;
            }
            if batch.iter().any(|e| !rels.contains_key(&e.rel_ver)) {
                *rels = pg::deadline(
                    self.cfg.response_timeout,
                    "reading relations from the buffer",
                    self.buffer.relations(),
                )
                .await?;
                prepared = None;
            }
            let mut last = batch.last().map(|e| e.pos).unwrap_or(*processed);
            let wide = batch.iter().map(Event::size).sum::<usize>() > BATCH_BYTES;
            // The sink commits only where a source transaction ends. Beside a wide batch the
            // buffer is asked instead of read: the next row may be wide too.
            let mut ends = loop {
                match q.ends_txn(last, durable) {
                    Some(ends) => break ends,
                    None if wide => {
                        let more = pg::deadline(
                            self.cfg.response_timeout,
                            "looking up the rest of a transaction in the buffer",
                            self.buffer.txn_continues(last),
                        )
                        .await?;
                        break !more;
                    }
                    None => self.read_into(&mut q, durable, limit).await?,
                }
            };
            // A batch that ends inside a transaction but holds the end of an earlier one is cut
            // there, so the sink commits at that end; the rest starts the next batch. Only a
            // transaction larger than a batch keeps its sink transaction open across batches.
            if !ends && let Some(cut) = batch.iter().rposition(|e| e.pos.lsn != last.lsn) {
                let rest = batch.split_off(cut + 1);
                q.unpop(rest);
                prepared = None;
                ends = true;
                last = batch.last().map(|e| e.pos).unwrap_or(*processed);
            }
            // A key renamed at the source: what came before commits first (sink/rekey.rs). Inside
            // one source transaction this is the one place it reaches the sink in two transactions.
            if let Some(cut) = rekey::layout_break(&batch, rels).filter(|&i| i > 0) {
                let rest = batch.split_off(cut);
                q.unpop(rest);
                prepared = None;
                ends = true;
                last = batch.last().map(|e| e.pos).unwrap_or(*processed);
            }
            let prepared = match prepared {
                Some(p) => p,
                None => S::prepare(&planner, &batch, rels)?,
            };
            let started = Instant::now();
            // The next batch: from the queue, topped up from the buffer while this one is delivered;
            // none while this one is over BATCH_BYTES (wide rows), so that one is in memory at a time.
            let next = if wide {
                Vec::new()
            } else {
                q.pop_durable(q.avail(durable, limit), limit, BATCH_BYTES)
            };
            // With a full batch waiting behind this one, the sink transaction goes on into it
            // (whole source transactions still: this batch ends one), up to DEEP_TXN_BATCHES
            // batches: fewer sink commits while there is a backlog.
            let deep = ends
                && next.len() >= limit
                && rekey::layout_break(batch.iter().chain(&next), rels).is_none()
                && open.unwrap_or(0) + (batch.len() as i64) < (DEEP_TXN_BATCHES * limit) as i64
                && *self.delivery_rx.borrow() != Delivery::Paused;
            let part = Part {
                begin: open.is_none(),
                commit: ends && !deep,
            };
            let room = BATCH_BYTES.saturating_sub(next.iter().map(Event::size).sum());
            let read_after = (!wide && next.len() < limit && room > 0 && q.behind(durable))
                .then_some((q.last, room));
            let (outcome, next) = {
                let Processor {
                    cfg,
                    buffer,
                    sink,
                    shared,
                    cancel,
                    ..
                } = self;
                let buffer: &Buffer = buffer;
                let mut d = Deliver {
                    cfg,
                    buffer,
                    sink,
                    shared,
                    cancel,
                };
                let (planner, rels) = (&planner, &*rels);
                let response_timeout = cfg.response_timeout;
                let take = async move {
                    let mut next = next;
                    let mut read = None;
                    if let Some((after, room)) = read_after {
                        let more = pg::deadline(
                            response_timeout,
                            "reading events from the buffer",
                            buffer.read_batch(after, durable, limit - next.len(), room),
                        )
                        .await?;
                        read = Some((more.events.last().map(|e| e.pos), more.complete));
                        next.extend(more.events);
                    }
                    // A relation the processor does not know yet is loaded first, at the top.
                    let p = (!next.is_empty())
                        .then(|| S::prepare(planner, &next, rels).ok())
                        .flatten();
                    Ok::<_, EngineError>((next, read, p))
                };
                tokio::join!(d.deliver(&batch, &prepared, rels, part), take)
            };
            match outcome? {
                Outcome::Cancelled => return Ok(()),
                Outcome::Done => {}
                Outcome::Rewind | Outcome::Lost if q.lossless => {
                    // The rows of the rolled-back transaction were only in memory: the session
                    // starts again from what the sink holds, and the source sends them again.
                    return self.restart(
                        "a sink transaction spanning batches was rolled back; delivery starts again from the sink's position",
                        None,
                    );
                }
                Outcome::Rewind => {
                    open = None;
                    q.rewind(*processed);
                    continue;
                }
                Outcome::Isolate if q.lossless => {
                    // Applied change by change, the transaction is read from the buffer: the
                    // sessions store changes in the buffer until it is delivered.
                    return self.restart(
                        "the sink refused a change of a large transaction; it goes through the buffer, to be applied change by change",
                        Some(last.lsn),
                    );
                }
                Outcome::Lost => {
                    // The sink dropped what it staged: from the last durable position.
                    open = None;
                    staged = 0;
                    *processed = *durable_pos;
                    q.rewind(*durable_pos);
                    continue;
                }
                Outcome::Isolate => {
                    open = None;
                    // Isolation starts from a durable position: what the sink staged goes first.
                    if self.sink.pending()
                        && self
                            .flush_sink(
                                &mut q,
                                processed,
                                durable_pos,
                                &mut staged,
                                &mut flush_outage,
                            )
                            .await?
                            != Flush::Done
                    {
                        q.rewind(*processed);
                        continue;
                    }
                    match self.isolate_txn(rels, *processed, last.lsn).await? {
                        Some(upto) if self.sink.pending() => {
                            // Not durable yet: delivered again from the last durable position.
                            return Err(EngineError::Protocol(format!(
                                "the sink left an isolated transaction staged at {}",
                                pg::lsn_text(upto.lsn)
                            )));
                        }
                        Some(upto) => {
                            *processed = upto;
                            *durable_pos = upto;
                            pg::deadline(
                                self.cfg.response_timeout,
                                "marking a batch processed in the buffer",
                                self.buffer.mark_processed(upto),
                            )
                            .await?;
                            *marked = (upto, Instant::now());
                            q.rewind(upto);
                            if self.bypass_resumes(upto) {
                                return self.restart("the refused transaction is delivered; changes skip the buffer again", None);
                            }
                        }
                        None => return Ok(()),
                    }
                    continue;
                }
            }
            self.record(&batch, started);
            let delivered = batch.len() as i64;
            // A wide row's memory is given back before the reader may take in the next one.
            drop((batch, prepared));
            self.buffer.release_wide(last);
            let (next, read, p) = next?;
            if let Some((read_last, complete)) = read {
                q.read(read_last, complete, durable);
                q.settle()?;
            }
            let applied = open.unwrap_or(0) + delivered;
            if !part.commit {
                open = Some(applied);
                ahead = Some((next, p));
                continue;
            }
            open = None;
            *processed = last;
            staged += applied;
            if !self.sink.pending() {
                *durable_pos = last;
                self.committed(std::mem::take(&mut staged), last);
            }
            let all_applied = next.is_empty()
                && q.events.is_empty()
                && handoffs.as_ref().is_none_or(|rx| rx.is_empty());
            // A sink that commits without waiting for its disk (bypassing the buffer) is made
            // durable every so often even while busy, and before the changes it holds would
            // stop the reader.
            let due = self.sink.flush_at().is_some_and(|t| t <= Instant::now())
                || staged >= (self.cfg.high_watermark / 2).max(1) as i64;
            if self.sink.pending() && due {
                match self
                    .flush_sink(
                        &mut q,
                        processed,
                        durable_pos,
                        &mut staged,
                        &mut flush_outage,
                    )
                    .await?
                {
                    Flush::Done => flush_outage = retry::backoff(&self.cfg.retry, None),
                    Flush::Failed => {}
                    Flush::Rewound => continue,
                }
            }
            self.acknowledge(*durable_pos, *processed, all_applied.then_some(q.durable));
            if self.bypass_resumes(last) {
                return self.restart(
                    "the refused transaction is delivered; changes skip the buffer again",
                    None,
                );
            }
            crate::engine::failpoint::crash_point("sink-before-mark");
            let caught_up = next.is_empty();
            if marked.0 != *durable_pos && (caught_up || marked.1.elapsed() >= MARK_EVERY) {
                pg::deadline(
                    self.cfg.response_timeout,
                    "marking a batch processed in the buffer",
                    self.buffer.mark_processed(*durable_pos),
                )
                .await?;
                *marked = (*durable_pos, Instant::now());
            }
            ahead = (!caught_up).then_some((next, p));
        }
    }

    /// Bypassing the buffer: tells the reader how far the sink holds everything, to acknowledge it
    /// to the source: the commit LSN of the last durable transaction or, when the sink has durably
    /// everything handed over, `end` (the end of the last commit handed over).
    fn acknowledge(&self, durable: Position, processed: Position, end: Option<u64>) {
        let Some(ack) = &self.bypass else {
            return;
        };
        let upto = match end {
            Some(end) if durable == processed => end.max(durable.lsn),
            _ => durable.lsn,
        };
        ack.send_if_modified(|a| {
            let moved = upto > *a;
            *a = (*a).max(upto);
            moved
        });
    }

    /// Ends the session so that the worker starts the next one at once (see
    /// [`Shared::request_restart`]); `buffer_until`: its sessions store changes in the buffer, even
    /// with `spec.buffer.bypass`, until the transaction committed at that LSN is delivered.
    fn restart(&self, why: &str, buffer_until: Option<u64>) -> Result<(), EngineError> {
        tracing::info!(pipeline = %self.cfg.name, why, "starting the session again");
        self.shared.request_restart(buffer_until);
        self.cancel.cancel();
        Ok(())
    }

    /// Whether a session that stores changes in the buffer only because of a refused transaction
    /// (see [`restart`](Self::restart)) has delivered it at `upto`, so that changes may skip the
    /// buffer again.
    fn bypass_resumes(&self, upto: Position) -> bool {
        self.bypass.is_none()
            && self.cfg.bypass_buffer
            && self
                .shared
                .buffered_until()
                .is_some_and(|lsn| upto.lsn >= lsn)
    }

    /// Whether backpressure holds the reader, or will at its next transaction boundary. Changes the
    /// sink staged count in the buffer's depth until it makes them durable, so then only a flush
    /// lets the reader go on.
    fn reader_held(&self) -> bool {
        self.shared.backpressured()
            || self.shared.stats.buffer_depth.get() > self.cfg.high_watermark as i64
    }

    /// Reads durable events after the queue's end from the buffer into the queue.
    async fn read_into(
        &self,
        q: &mut Queue,
        durable: u64,
        limit: usize,
    ) -> Result<(), EngineError> {
        let more = pg::deadline(
            self.cfg.response_timeout,
            "reading events from the buffer",
            self.buffer.read_batch(q.last, durable, limit, BATCH_BYTES),
        )
        .await?;
        q.read(more.events.last().map(|e| e.pos), more.complete, durable);
        q.push_read(more.events);
        q.settle()
    }

    /// Applies the source transactions after `from`, up to and including the one committed at
    /// `upto_lsn`, in one sink transaction, change by change, reading them from the buffer in
    /// batches; refused changes become dead letters once it commits. Returns the position reached,
    /// or None on shutdown.
    async fn isolate_txn(
        &mut self,
        rels: &mut HashMap<i64, RelationInfo>,
        from: Position,
        upto_lsn: u64,
    ) -> Result<Option<Position>, EngineError> {
        let limit = self.cfg.batch_size.max(1);
        let mut outage = retry::backoff(&self.cfg.retry, None);
        'attempt: loop {
            let mut after = from;
            let mut dead: Vec<(Event, String)> = Vec::new();
            let mut applied = 0i64;
            let mut begin = true;
            loop {
                let read = pg::deadline(
                    self.cfg.response_timeout,
                    "reading events from the buffer",
                    self.buffer
                        .read_batch(after, upto_lsn + 1, limit, BATCH_BYTES),
                )
                .await?;
                let done = read.complete;
                let mut chunk = read.events;
                chunk.retain(|e| e.pos.lsn <= upto_lsn);
                if chunk.iter().any(|e| !rels.contains_key(&e.rel_ver)) {
                    *rels = pg::deadline(
                        self.cfg.response_timeout,
                        "reading relations from the buffer",
                        self.buffer.relations(),
                    )
                    .await?;
                }
                let part = Part {
                    begin,
                    commit: done || chunk.is_empty(),
                };
                let last = chunk.last().map(|e| e.pos).unwrap_or(after);
                match self.sink.apply_isolated(&chunk, rels, part, true).await {
                    Ok(rejected) => {
                        for r in rejected {
                            for &i in &r.events {
                                dead.push((chunk[i].clone(), r.error.clone()));
                            }
                        }
                    }
                    Err(e) if e.class() == ErrorClass::Config => return Err(e),
                    Err(e) => {
                        self.shared.set_sink_error(&e);
                        self.shared.stats.retries.inc();
                        let delay = outage.next().unwrap_or(self.cfg.retry.max_interval);
                        tracing::warn!(pipeline = %self.cfg.name, error = %e, ?delay, "sink unavailable; retrying the transaction");
                        tokio::select! {
                            _ = self.cancel.cancelled() => return Ok(None),
                            _ = tokio::time::sleep(delay) => {}
                        }
                        continue 'attempt;
                    }
                }
                begin = false;
                applied += chunk.len() as i64;
                after = last;
                self.buffer.release_wide(last);
                if part.commit {
                    break;
                }
            }
            self.shared.set_sink_ok();
            let dead: Vec<(&Event, String)> = dead.iter().map(|(e, r)| (e, r.clone())).collect();
            dead_letter(
                &self.cfg,
                &self.buffer,
                &self.shared,
                &dead,
                rels,
                self.cfg.retry.max_attempts,
            )
            .await?;
            self.committed(applied, after);
            return Ok(Some(after));
        }
    }

    /// Counts `n` events as delivered once their sink transaction is durable in the sink, ending at
    /// `last`.
    fn committed(&self, n: i64, last: Position) {
        let stats = &self.shared.stats;
        stats.events_delivered.inc_by(n as u64);
        stats.buffer_depth.dec_by(n);
        self.shared.processed_lsn.store(last.lsn, Ordering::Relaxed);
    }

    /// Observes a batch applied to the sink (committed or not yet).
    fn record(&self, batch: &[Event], started: Instant) {
        let stats = &self.shared.stats;
        stats.batch_seconds.observe(started.elapsed().as_secs_f64());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default();
        for e in batch {
            let lat = (now - PG_EPOCH_MICROS - e.commit_time).max(0) as f64 / 1e6;
            stats.delivery_latency_seconds.observe(lat);
        }
    }
}

/// Writes changes the sink refused to the dead-letter queue (or fails when it is disabled).
async fn dead_letter(
    cfg: &PipelineConfig,
    buffer: &Buffer,
    shared: &Shared,
    refused: &[(&Event, String)],
    rels: &HashMap<i64, RelationInfo>,
    attempts: u32,
) -> Result<(), EngineError> {
    let Some((_, first)) = refused.first() else {
        return Ok(());
    };
    if !cfg.dead_letter_enabled {
        return Err(EngineError::invalid(
            format!("the sink refused a change and the dead-letter queue is disabled: {first}"),
            "fix the sink table or the data, or set spec.deadLetter.enabled: true",
        ));
    }
    let dead: Vec<(&Event, &RelationInfo, String)> = refused
        .iter()
        .filter_map(|(e, err)| rels.get(&e.rel_ver).map(|r| (*e, r, err.clone())))
        .collect();
    if !dlq::write(
        buffer.client(),
        buffer.pipeline_id(),
        buffer.epoch(),
        &dead,
        attempts as i32,
    )
    .await?
    {
        return Err(buffer.superseded_error().await);
    }
    crate::engine::failpoint::crash_point("dlq-before-mark");
    shared.stats.events_dead_lettered.inc_by(dead.len() as u64);
    for (e, rel, error) in &dead {
        tracing::warn!(pipeline = %cfg.name, table = %rel.qualified(), lsn = %pg::lsn_text(e.pos.lsn), ord = e.pos.ord, %error, "event dead-lettered");
    }
    Ok(())
}

/// What delivering a batch needs, borrowed from the processor so that the buffer can read the next
/// batch meanwhile.
struct Deliver<'a, S: Sink> {
    cfg: &'a PipelineConfig,
    buffer: &'a Buffer,
    sink: &'a mut S,
    shared: &'a Shared,
    cancel: &'a CancellationToken,
}

impl<S: Sink> Deliver<'_, S> {
    /// Applies one batch, retrying as its errors call for. Returns only when the batch is in the sink
    /// (or its refused changes are dead letters), or on shutdown.
    async fn deliver(
        &mut self,
        batch: &[Event],
        prepared: &S::Prepared,
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> Result<Outcome, EngineError> {
        let mut outage = retry::backoff(&self.cfg.retry, None);
        let mut data_delays = retry::backoff(&self.cfg.retry, Some(self.cfg.retry.max_attempts));
        let mut data_attempts = 0u32;
        loop {
            let err = match self.sink.apply_prepared(batch, prepared, rels, part).await {
                Ok(()) => {
                    self.shared.set_sink_ok();
                    return Ok(Outcome::Done);
                }
                Err(e) => e,
            };
            self.shared.stats.retries.inc();
            if self.sink.take_lost() {
                // The sink dropped what it had staged: delivery starts again after its durable
                // position.
                if err.class() == ErrorClass::Config {
                    return Err(err);
                }
                self.shared.set_sink_error(&err);
                let delay = outage.next().unwrap_or(self.cfg.retry.max_interval);
                tracing::warn!(pipeline = %self.cfg.name, error = %err, ?delay, "sink unavailable; retrying from its last durable position");
                return Ok(if self.pause(delay).await {
                    Outcome::Cancelled
                } else {
                    Outcome::Lost
                });
            }
            if !part.is_whole() {
                // The sink transaction spans batches and was rolled back whole: it is applied again
                // from its start, by the processor.
                return match err.class() {
                    ErrorClass::Config => Err(err),
                    ErrorClass::Data => {
                        tracing::warn!(pipeline = %self.cfg.name, error = %err, "sink refused a change of a large transaction; applying it change by change");
                        Ok(Outcome::Isolate)
                    }
                    _ => {
                        self.shared.set_sink_error(&err);
                        let delay = outage.next().unwrap_or(self.cfg.retry.max_interval);
                        tracing::warn!(pipeline = %self.cfg.name, error = %err, ?delay, "sink unavailable; retrying the transaction from its start");
                        Ok(if self.pause(delay).await {
                            Outcome::Cancelled
                        } else {
                            Outcome::Rewind
                        })
                    }
                };
            }
            match err.class() {
                ErrorClass::Config => return Err(err),
                ErrorClass::Connection | ErrorClass::Transient | ErrorClass::Setup => {
                    self.shared.set_sink_error(&err);
                    let delay = outage.next().unwrap_or(self.cfg.retry.max_interval);
                    tracing::warn!(pipeline = %self.cfg.name, error = %err, ?delay, "sink unavailable; retrying");
                    if self.pause(delay).await {
                        return Ok(Outcome::Cancelled);
                    }
                }
                ErrorClass::Data => {
                    data_attempts += 1;
                    tracing::warn!(pipeline = %self.cfg.name, error = %err, attempt = data_attempts, "sink refused a batch");
                    if let Some(delay) = data_delays
                        .next()
                        .filter(|_| data_attempts < self.cfg.retry.max_attempts)
                    {
                        if self.pause(delay).await {
                            return Ok(Outcome::Cancelled);
                        }
                        continue;
                    }
                    match self.isolate(batch, rels, data_attempts).await {
                        Ok(()) => {
                            self.shared.set_sink_ok();
                            return Ok(Outcome::Done);
                        }
                        Err(e) if e.class() == ErrorClass::Config => return Err(e),
                        Err(e) => {
                            self.shared.set_sink_error(&e);
                            let delay = outage.next().unwrap_or(self.cfg.retry.max_interval);
                            if self.pause(delay).await {
                                return Ok(Outcome::Cancelled);
                            }
                        }
                    }
                }
            }
        }
    }

    /// Applies the batch change by change; refused changes become dead letters.
    async fn isolate(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        attempts: u32,
    ) -> Result<(), EngineError> {
        let rejected = self
            .sink
            .apply_isolated(batch, rels, Part::WHOLE, true)
            .await?;
        let dead: Vec<(&Event, String)> = rejected
            .iter()
            .flat_map(|r| r.events.iter().map(|&i| (&batch[i], r.error.clone())))
            .collect();
        dead_letter(self.cfg, self.buffer, self.shared, &dead, rels, attempts).await
    }

    /// Sleeps; true when shutdown came first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::buffer::CopyRows;
    use crate::engine::event::Op;

    fn ev(lsn: u64, ord: i32) -> Event {
        Event {
            pos: Position { lsn, ord },
            commit_time: 0,
            rel_ver: 1,
            op: Op::Insert,
            old_key: None,
            vals: Some(vec![Some(format!("{lsn}/{ord}"))]),
            unchanged: None,
        }
    }

    fn handoff(after: Position, events: &[Event], durable: Option<u64>) -> Handoff {
        let mut rows = CopyRows::default();
        for e in events {
            rows.push_event("p", e);
        }
        Handoff {
            after,
            rows: rows.to_bytes(),
            last: rows.last(),
            durable,
        }
    }

    fn queue(last: Position) -> Queue {
        Queue {
            events: VecDeque::new(),
            last,
            covered: 0,
            durable: 0,
            cap: 100,
            bytes: 0,
            later: VecDeque::new(),
            lossless: false,
        }
    }

    #[test]
    fn bypassing_the_buffer_the_last_event_of_a_transaction_waits_for_its_commit() {
        let start = Position { lsn: 10, ord: 1 };
        let mut q = queue(start);
        q.lossless = true;
        // Five rows of a transaction whose commit (LSN 20) has not come; batches of two.
        let rows: Vec<Event> = (0..5).map(|i| ev(20, i)).collect();
        q.offer(handoff(start, &rows, None)).unwrap();
        let mut taken = Vec::new();
        loop {
            let b = q.pop_durable(q.avail(q.durable, 2), 2, BATCH_BYTES);
            if b.is_empty() {
                break;
            }
            // What is taken before the commit always has a row of it after it in the queue.
            assert_eq!(q.ends_txn(b[b.len() - 1].pos, q.durable), Some(false));
            taken.extend(b);
        }
        assert_eq!(taken.len(), 4, "full batches only, and never the last row");
        // Its commit comes (without rows): the rest is taken, and the transaction ends there.
        q.offer(Handoff {
            after: rows[4].pos,
            rows: CopyRows::default().into_bytes(),
            last: None,
            durable: Some(25),
        })
        .unwrap();
        let b = q.pop_durable(q.avail(q.durable, 2), 2, BATCH_BYTES);
        assert_eq!(b.iter().map(|e| e.pos.ord).collect::<Vec<_>>(), vec![4]);
        assert_eq!(q.ends_txn(b[0].pos, q.durable), Some(true));
        // Handed-over rows that do not continue the queue are an error, never skipped.
        assert!(
            q.offer(handoff(ev(30, 5).pos, &[ev(30, 6)], Some(35)))
                .is_err()
        );
    }

    #[test]
    fn handoffs_continue_the_queue_or_wait_for_the_reads() {
        let start = Position { lsn: 10, ord: 1 };
        let mut q = queue(start);
        // Rows of a transaction (commit LSN 20) still open, then its end, then the next one.
        let a = [ev(20, 0), ev(20, 1)];
        let b = [ev(20, 2)];
        let c = [ev(30, 0), ev(30, 1)];
        q.offer(handoff(start, &a, None)).unwrap();
        assert_eq!((q.events.len(), q.last, q.covered), (2, a[1].pos, 0));
        // Not durable yet: nothing to deliver, and the buffer holds nothing more that is.
        assert!(q.pop_durable(15, 10, BATCH_BYTES).is_empty());
        assert!(!q.behind(15));
        // A handoff after a gap (one was dropped) waits for the reads to reach it.
        q.offer(handoff(b[0].pos, &c, Some(35))).unwrap();
        assert_eq!((q.events.len(), q.later.len()), (2, 1));
        // The durable watch may lag behind the handoffs; they carry the durable position themselves.
        let batch = q.pop_durable(25, 10, BATCH_BYTES);
        assert_eq!(
            batch.iter().map(|e| e.pos).collect::<Vec<_>>(),
            vec![a[0].pos, a[1].pos]
        );
        // The dropped rows come from the buffer (durable moved past what the queue covers); then the
        // waiting handoff continues the queue.
        assert!(q.behind(25));
        q.events.extend(b.iter().cloned());
        q.read(Some(b[0].pos), true, 25);
        q.settle().unwrap();
        assert_eq!((q.last, q.covered, q.durable), (c[1].pos, 35, 35));
        assert!(q.later.is_empty());
        assert_eq!(
            q.pop_durable(35, 10, BATCH_BYTES)
                .iter()
                .map(|e| e.pos)
                .collect::<Vec<_>>(),
            vec![b[0].pos, c[0].pos, c[1].pos]
        );
        // A handoff whose rows are known already is dropped; one that overlaps gives the rest.
        q.offer(handoff(b[0].pos, &c, Some(35))).unwrap();
        assert!(q.events.is_empty());
        let d = [ev(40, 0), ev(40, 1)];
        q.read(Some(d[0].pos), false, 35);
        q.offer(handoff(c[1].pos, &d, Some(45))).unwrap();
        assert_eq!(
            q.events.iter().map(|e| e.pos).collect::<Vec<_>>(),
            vec![d[1].pos]
        );
        assert_eq!((q.last, q.covered), (d[1].pos, 45));
    }

    #[test]
    fn a_transaction_committing_at_the_durable_position_is_not_durable() {
        // T1 ended at 100; T2's commit record starts right there, so T2's rows are keyed 100.
        let mut q = queue(Position::default());
        let t2 = [ev(100, 0), ev(100, 1)];
        q.offer(handoff(Position::default(), &t2, None)).unwrap();
        assert!(q.pop_durable(100, 10, BATCH_BYTES).is_empty());
        assert!(!q.behind(100));
        assert_eq!(q.pop_durable(101, 10, BATCH_BYTES).len(), 2);
    }

    #[test]
    fn a_full_queue_leaves_rows_to_the_buffer() {
        let start = Position::default();
        let mut q = queue(start);
        q.cap = 2;
        let rows = [ev(5, 0), ev(5, 1), ev(5, 2)];
        q.offer(handoff(start, &rows, Some(6))).unwrap();
        assert!(q.events.is_empty());
        assert_eq!((q.last, q.covered), (start, 0));
        assert!(q.behind(6));
        // A full read leaves the rest unknown.
        q.read(Some(rows[1].pos), false, 6);
        assert_eq!((q.last, q.covered), (rows[1].pos, 0));
        q.read(Some(rows[2].pos), true, 6);
        assert_eq!(q.covered, 6);
    }
}
