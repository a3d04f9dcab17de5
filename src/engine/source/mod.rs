//! The reader: streams the slot with `START_REPLICATION ... LOGICAL` (pgoutput), encodes each change
//! straight into buffer rows (values stay the bytes the source sent), and hands batches to a writer
//! task that stores them in the buffer, one buffer transaction per batch. Decoding the next batch
//! overlaps writing the previous one; while the writer is busy, the next batch grows. A source LSN is
//! acknowledged only after the buffer transaction holding everything up to it has committed.

pub mod catalog;
pub mod pgoutput;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use self::pgoutput::{ChangeKind, Col, Message};
use super::Shared;
use super::backfill::{Board, Window, encode_key};
use super::backpressure::Watermarks;
use super::buffer::{Buffer, CopyRows};
use super::config::{PipelineConfig, TableName};
use super::error::EngineError;
use super::event::{Op, Position, RelationInfo};
use super::pg;
use super::processor::Handoff;
use super::wide::{WIDE_BYTES, WideGate, WidePass};

/// While the writer is busy the next batch grows up to this many bytes of encoded rows (some 6,000
/// changes of a few hundred bytes); then reading waits for the writer. Larger batches gain little
/// and cost memory twice: here and in the processor's queue, which takes them in memory.
const MAX_BATCH_BYTES: usize = 2 << 20;
/// Most bytes of row data received and not yet dropped by the reader (besides 16,384 events), with
/// the wide row the processor holds (`engine::wide`): past it the replication worker stops reading
/// the socket.
pub const REPLICATION_BUFFER_BYTES: usize = 16 << 20;
/// Received events handled in one go before the reader looks at the writer and at shutdown again.
const DRAIN: usize = 1024;

struct Txn {
    lsn: u64,
    commit_time: i64,
    next_ord: i32,
}

pub struct Reader {
    pub cfg: Arc<PipelineConfig>,
    pub sql: Client,
    pub buffer: Buffer,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    /// The durable position, for the processor.
    pub durable_tx: watch::Sender<u64>,
    /// Where the buffer writer hands its committed rows to the processor; None: the processor reads
    /// them back from the buffer.
    pub handoff: Option<mpsc::Sender<Handoff>>,
    /// `spec.buffer.bypass`: rows are handed to the processor only, never stored in the buffer,
    /// and the source is acknowledged up to what the sink holds, as this watch reports.
    pub sink_ack: Option<watch::Receiver<u64>>,
    /// Where the processor starts: the first rows handed over follow the later of this and the
    /// buffer's newest event.
    pub delivered: Position,
    /// Shared with the processor: one wide row in memory at a time.
    pub wide: WideGate,
    /// Where chunks of a backfill (tables added to the running pipeline) are handed over.
    pub backfill: Arc<Board>,
    /// What the reader has acknowledged to the source, for the backfill.
    pub acked_tx: watch::Sender<u64>,
}

/// One buffer transaction's worth of changes, from the reader to the writer.
#[derive(Default)]
struct Batch {
    relations: Vec<RelationInfo>,
    rows: CopyRows,
    /// End LSN of the last transaction whose commit is in this batch.
    durable_lsn: Option<u64>,
    /// Events of the transactions whose commit is in this batch.
    completed_events: i64,
    /// Held from the first wide change in the batch until the buffer has it.
    pass: Option<WidePass>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.relations.is_empty() && self.durable_lsn.is_none()
    }

    /// Worth a buffer transaction now: a transaction completed, or `batch_size` rows or
    /// [`MAX_BATCH_BYTES`] (of a large transaction) are waiting. A full batch is always ready:
    /// reading waits for it to be sent.
    fn ready(&self, batch_size: usize) -> bool {
        self.durable_lsn.is_some() || self.rows.len() >= batch_size || self.full()
    }

    fn full(&self) -> bool {
        self.rows.bytes() >= MAX_BATCH_BYTES
    }

    /// Past twice [`MAX_BATCH_BYTES`]: rows with wide values. Such a batch goes to the writer only
    /// when it is idle, and nothing more is read while the writer has one, so that one is in memory
    /// at a time instead of one per stage.
    fn oversized(&self) -> bool {
        self.rows.bytes() > 2 * MAX_BATCH_BYTES
    }
}

/// A relation as the reader needs it.
struct Rel {
    info: RelationInfo,
    key: Vec<usize>,
}

struct State {
    relations: HashMap<u32, Rel>,
    written_rels: HashSet<i64>,
    batch: Batch,
    txn: Option<Txn>,
    /// Events of the current transaction, handed over or not.
    txn_events: i64,
    /// Batches handed to the writer, and how many of them it has committed.
    sent: u64,
    acked: u64,
    /// The durable position acknowledged to the source.
    durable: u64,
    /// End LSN of the last transaction handed to the writer.
    handed_end: u64,
    /// The number (as `sent` counts) of the last oversized batch handed to the writer.
    oversized_sent: u64,
    /// `spec.buffer.bypass`: durable means in the sink.
    bypass: bool,
    backpressured: bool,
    old: Vec<Col>,
    new: Vec<Col>,
    unchanged: Vec<i16>,
    /// A backfill chunk's watermarks are open: the keys of its table that changed since.
    window: Option<Window>,
    /// The chunk placed in the current transaction, to report at its commit.
    placed: Option<String>,
}

/// The writer's report after each batch: (batches committed, durable position).
type Ack = (u64, u64);

impl State {
    /// Whether the batch goes to the writer now: it is ready and, when oversized, the writer has
    /// written every batch before it.
    fn sendable(&self, batch_size: usize) -> bool {
        self.batch.ready(batch_size) && (!self.batch.oversized() || self.acked == self.sent)
    }

    /// The batch, for the writer (the caller counts it in `sent`).
    fn take_batch(&mut self) -> Batch {
        if let Some(lsn) = self.batch.durable_lsn {
            self.handed_end = lsn;
        }
        if self.batch.oversized() {
            self.oversized_sent = self.sent + 1;
        }
        std::mem::take(&mut self.batch)
    }
}

/// When the sink's position moves (never, without one).
async fn sink_moved(rx: &mut Option<watch::Receiver<u64>>) {
    let Some(rx) = rx else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn writer_gone() -> EngineError {
    EngineError::Protocol("the buffer writer stopped".into())
}

fn values<'a>(msg: &'a [u8], cols: &'a [Col]) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
    cols.iter().map(move |c| c.is_value().then(|| c.bytes(msg)))
}

/// An update's new values; an unchanged TOASTed value (not sent) is taken from the old row when it
/// carries it (REPLICA IDENTITY FULL sends the old row with its values inline).
fn new_values<'a>(
    msg: &'a [u8],
    new: &'a [Col],
    old: &'a [Col],
) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
    new.iter().enumerate().map(move |(i, c)| match old.get(i) {
        Some(o) if c.kind == b'u' && o.is_value() => Some(o.bytes(msg)),
        _ => c.is_value().then(|| c.bytes(msg)),
    })
}

fn key<'a>(
    msg: &'a [u8],
    cols: &'a [Col],
    key: &'a [usize],
) -> impl Iterator<Item = Option<&'a [u8]>> + 'a {
    key.iter()
        .map(move |&i| cols.get(i).filter(|c| c.is_value()).map(|c| c.bytes(msg)))
}

/// The buffer writer's side of a session.
struct Writer {
    buffer: Buffer,
    shared: Arc<Shared>,
    /// The durable position, for the processor.
    durable_tx: watch::Sender<u64>,
    /// Batches written and the durable position, for the reader.
    ack_tx: watch::Sender<Ack>,
    handoff: Option<mpsc::Sender<Handoff>>,
    timeout: Duration,
    /// `spec.buffer.bypass`: batches are only handed over ([`hand_over`]).
    bypass: bool,
    /// Where the processor starts (see [`Reader::delivered`]).
    delivered: Position,
    /// A batch ending a transaction hands its wide row's pass to the processor (`engine::wide`).
    wide: WideGate,
}

/// Stores the reader's batches in the buffer, each in one transaction, in order. After each commit it
/// moves the durable position (for the processor and, through the reader, for the source), and hands
/// the rows to the processor of this session, which then need not read them back from the buffer.
async fn write_batches(w: Writer, mut rx: mpsc::Receiver<Batch>) -> Result<(), EngineError> {
    let Writer {
        mut buffer,
        shared,
        durable_tx,
        ack_tx,
        mut handoff,
        timeout: shared_timeout,
        bypass,
        delivered,
        wide,
    } = w;
    let (mut seq, mut durable) = *ack_tx.borrow();
    // The newest event already in the buffer: what the first batch follows.
    let t = shared_timeout;
    let processed = pg::deadline(t, "reading the buffer checkpoint", buffer.checkpoint())
        .await?
        .processed
        .max(delivered);
    let mut written = buffer
        .last_position()
        .await?
        .map_or(processed, |p| p.max(processed));
    if bypass {
        return hand_over(buffer, rx, shared, ack_tx, handoff, t, written).await;
    }
    while let Some(mut b) = rx.recv().await {
        let last = b.rows.last();
        let bytes = b.rows.bytes();
        // A copy only when the processor has room for it; else it reads the rows from the buffer.
        // Batches past MAX_BATCH_BYTES (a few wide rows) are left to the buffer too: the
        // processor's queue could not take them, so the copy would only cost memory.
        let copy = handoff
            .as_ref()
            .filter(|h| h.capacity() > 0 && b.rows.bytes() <= 2 * MAX_BATCH_BYTES)
            .map(|_| b.rows.to_bytes());
        pg::deadline(
            t,
            "writing events to the buffer",
            buffer.write(&b.relations, b.rows, b.durable_lsn),
        )
        .await?;
        seq += 1;
        if let (Some(pass), Some(_), Some(pos)) = (b.pass.take(), b.durable_lsn, last) {
            wide.hold(pos, pass, bytes);
        }
        if let (Some(h), Some(rows)) = (&handoff, copy) {
            let sent = h.try_send(Handoff {
                after: written,
                rows,
                last,
                durable: b.durable_lsn,
            });
            if let Err(mpsc::error::TrySendError::Closed(_)) = sent {
                handoff = None;
            }
        }
        crate::engine::failpoint::crash_point("buffer-before-ack");
        written = last.unwrap_or(written);
        if let Some(lsn) = b.durable_lsn {
            durable = lsn;
            shared.stats.buffer_depth.inc_by(b.completed_events);
            shared.durable_lsn.store(lsn, Ordering::Relaxed);
            durable_tx.send_replace(lsn);
        }
        ack_tx.send_replace((seq, durable));
    }
    Ok(())
}

/// `spec.buffer.bypass`: hands every batch to the processor, waiting while it has no room (which
/// stops the reader in turn); only relation layouts go to the buffer. Nothing is durable here: the
/// source is acknowledged from the sink's position instead (see [`Reader::sink_ack`]).
async fn hand_over(
    mut buffer: Buffer,
    mut rx: mpsc::Receiver<Batch>,
    shared: Arc<Shared>,
    ack_tx: watch::Sender<Ack>,
    handoff: Option<mpsc::Sender<Handoff>>,
    t: Duration,
    mut written: Position,
) -> Result<(), EngineError> {
    let (mut seq, durable) = *ack_tx.borrow();
    let handoff = handoff
        .ok_or_else(|| EngineError::Protocol("bypassing the buffer needs a processor".into()))?;
    while let Some(mut b) = rx.recv().await {
        // The processor takes the rows: a wide one is in memory there, not in the buffer.
        b.pass = None;
        if !b.relations.is_empty() {
            pg::deadline(
                t,
                "writing table layouts to the buffer",
                buffer.write(&b.relations, CopyRows::default(), None),
            )
            .await?;
        }
        let last = b.rows.last();
        let h = Handoff {
            after: written,
            rows: b.rows.into_bytes(),
            last,
            durable: b.durable_lsn,
        };
        if handoff.send(h).await.is_err() {
            // The processor stopped: the session is ending.
            return Ok(());
        }
        seq += 1;
        written = last.unwrap_or(written);
        if let Some(lsn) = b.durable_lsn {
            shared.stats.buffer_depth.inc_by(b.completed_events);
            shared.durable_lsn.store(lsn, Ordering::Relaxed);
        }
        ack_tx.send_replace((seq, durable));
    }
    Ok(())
}

impl Reader {
    fn replication_config(&self, start: u64) -> Result<ReplicationConfig, EngineError> {
        Ok(self
            .cfg
            .source
            .replication(&self.cfg.slot, &self.cfg.publication, "philotes-reader")?
            .with_start_lsn(Lsn(start))
            .with_ack_lsn(Lsn(start))
            .with_status_interval(Duration::from_millis(500))
            // Idle for a quarter of the response timeout: ask the server for a reply; silent for the
            // whole of it: the path is dead.
            .with_wakeup_interval((self.cfg.response_timeout / 4).max(Duration::from_millis(250)))
            .with_server_timeout(self.cfg.response_timeout)
            .with_buffer_size(16384)
            .with_byte_budget(self.wide.budget()))
    }

    pub async fn run(self, start: u64) -> Result<(), EngineError> {
        let what = format!(
            "starting replication from slot {} on {}",
            self.cfg.slot, self.cfg.source
        );
        let config = self.replication_config(start)?;
        let connect = async {
            ReplicationClient::connect(config)
                .await
                .map_err(|source| EngineError::Replication {
                    context: what.clone(),
                    source,
                })
        };
        let mut client = pg::deadline(
            self.cfg.source.connect_timeout() + self.cfg.response_timeout,
            &what,
            connect,
        )
        .await?;
        let Reader {
            cfg,
            sql,
            buffer,
            shared,
            cancel,
            durable_tx,
            handoff,
            sink_ack,
            delivered,
            wide,
            backfill,
            acked_tx,
        } = self;
        // The keys of the layouts the buffer knows, for a FULL-identity table dropped since.
        let known = pg::deadline(
            cfg.response_timeout,
            "reading relations from the buffer",
            buffer.relations(),
        )
        .await?;
        let mut known_keys: HashMap<(String, String), Vec<Vec<String>>> = HashMap::new();
        for r in known.into_values() {
            let key: Vec<String> = r
                .key_indexes()
                .iter()
                .map(|&i| r.columns[i].clone())
                .collect();
            known_keys.entry((r.schema, r.name)).or_default().push(key);
        }
        shared.source_connected.store(true, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(1);
        let (ack_tx, mut ack_rx) = watch::channel((0, start));
        let mut writer = tokio::spawn(write_batches(
            Writer {
                buffer,
                shared: shared.clone(),
                durable_tx,
                ack_tx,
                handoff,
                timeout: cfg.response_timeout,
                bypass: sink_ack.is_some(),
                delivered,
                wide: wide.clone(),
            },
            rx,
        ));
        let mut decoder = Decoder {
            known_keys,
            pipeline_id: cfg.id.clone(),
            cfg,
            sql,
            shared: shared.clone(),
            cancel,
            skip_upto: sink_ack.is_some().then_some(delivered),
            wide,
            backfill,
            acked_tx,
        };
        let result = decoder
            .stream(&mut client, &tx, &mut ack_rx, start, sink_ack.clone())
            .await;
        // The writer finishes what it was handed: each batch is a buffer transaction of its own, and
        // a transaction cut off mid-way is discarded on restart.
        drop(tx);
        let written = match tokio::time::timeout(Duration::from_secs(20), &mut writer).await {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(EngineError::Protocol(format!(
                "the buffer writer panicked: {join}"
            ))),
            Err(_) => {
                writer.abort();
                Err(EngineError::Protocol(
                    "the buffer writer did not finish within 20s".into(),
                ))
            }
        };
        if written.is_ok() {
            let durable = match &sink_ack {
                Some(rx) => (*rx.borrow()).max(start),
                None => ack_rx.borrow().1,
            };
            client.update_applied_lsn(Lsn(durable));
        }
        shared.source_connected.store(false, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        // A writer failure is the cause of a reader's "writer stopped".
        written.and(result)
    }
}

struct Decoder {
    /// Key column names of each table's layouts in the buffer at the start of the session.
    known_keys: HashMap<(String, String), Vec<Vec<String>>>,
    cfg: Arc<PipelineConfig>,
    pipeline_id: String,
    sql: Client,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    /// Changes at or before this position are in the sink already (bypassing the buffer, the
    /// source sends again what came after its acknowledged position): skipped, so that they count
    /// nowhere.
    skip_upto: Option<Position>,
    wide: WideGate,
    backfill: Arc<Board>,
    acked_tx: watch::Sender<u64>,
}

impl Decoder {
    /// Whether the change at `pos` is in the sink already (see `skip_upto`).
    fn delivered(&self, pos: Position) -> bool {
        self.skip_upto.is_some_and(|d| pos <= d)
    }

    async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        tx: &mpsc::Sender<Batch>,
        ack_rx: &mut watch::Receiver<Ack>,
        start: u64,
        mut sink_ack: Option<watch::Receiver<u64>>,
    ) -> Result<(), EngineError> {
        let mut st = State {
            relations: HashMap::new(),
            written_rels: HashSet::new(),
            batch: Batch::default(),
            txn: None,
            txn_events: 0,
            sent: 0,
            acked: 0,
            durable: start,
            handed_end: start,
            oversized_sent: 0,
            bypass: sink_ack.is_some(),
            backpressured: false,
            old: Vec::new(),
            new: Vec::new(),
            unchanged: Vec::new(),
            window: None,
            placed: None,
        };
        let mut watermarks = Watermarks::new(self.cfg.high_watermark, self.cfg.low_watermark);
        // The depth is an in-process counter, so looking at it often costs nothing.
        let backpressure_poll = self.cfg.check_interval.min(Duration::from_millis(10));
        let batch_size = self.cfg.batch_size.max(1);
        let wire = |source| EngineError::Replication {
            context: "reading the replication stream".into(),
            source,
        };
        let ended = || EngineError::Protocol("the replication stream ended".into());
        loop {
            self.take_ack(client, ack_rx, &mut sink_ack, &mut st);
            if st.sendable(batch_size) {
                match tx.try_reserve() {
                    Ok(permit) => {
                        permit.send(st.take_batch());
                        st.sent += 1;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => return Err(writer_gone()),
                    Err(mpsc::error::TrySendError::Full(())) => {}
                }
            }
            if st.txn.is_none() {
                self.backpressure(&mut watermarks, &mut st);
            }
            let reading = !st.batch.full() && !st.backpressured && st.acked >= st.oversized_sent;
            if reading {
                // Handle what has arrived already without waiting.
                let mut handled = 0;
                while handled < DRAIN {
                    // Unconstrained: tokio's cooperative budget would report an empty channel
                    // after 128 events.
                    let Some(r) = tokio::task::unconstrained(client.recv()).now_or_never() else {
                        break;
                    };
                    let ev = r.map_err(wire)?.ok_or_else(ended)?;
                    self.handle(ev, &mut st, client).await?;
                    handled += 1;
                    if st.batch.full()
                        || (st.batch.ready(batch_size) && tx.capacity() > 0)
                        || (st.txn.is_none() && self.depth() > self.cfg.high_watermark)
                    {
                        break;
                    }
                }
                if handled > 0 {
                    // Let the writer and the connections run on this thread too.
                    tokio::task::yield_now().await;
                    continue;
                }
            }
            let ready = st.sendable(batch_size);
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    if !st.batch.is_empty() {
                        tx.send(std::mem::take(&mut st.batch)).await.map_err(|_| writer_gone())?;
                    }
                    return Ok(());
                }
                r = ack_rx.changed() => r.map_err(|_| writer_gone())?,
                _ = sink_moved(&mut sink_ack) => {}
                permit = tx.reserve(), if ready => {
                    permit.map_err(|_| writer_gone())?.send(st.take_batch());
                    st.sent += 1;
                }
                r = client.recv(), if reading => {
                    let ev = r.map_err(wire)?.ok_or_else(ended)?;
                    self.handle(ev, &mut st, client).await?;
                }
                _ = tokio::time::sleep(backpressure_poll), if st.backpressured => {}
            }
        }
    }

    fn depth(&self) -> u64 {
        self.shared.stats.buffer_depth.get().max(0) as u64
    }

    /// Acknowledges to the source what the writer has committed (or, bypassing the buffer, what
    /// the sink holds).
    fn take_ack(
        &self,
        client: &ReplicationClient,
        ack_rx: &mut watch::Receiver<Ack>,
        sink_ack: &mut Option<watch::Receiver<u64>>,
        st: &mut State,
    ) {
        // Not `has_changed`: waiting for a change (in `stream`) marks it seen.
        let (seq, d) = *ack_rx.borrow_and_update();
        st.acked = seq;
        let mut durable = Some(d);
        if let Some(rx) = sink_ack {
            durable = Some(*rx.borrow_and_update());
        }
        if let Some(d) = durable.filter(|&d| d > st.durable) {
            st.durable = d;
            client.update_applied_lsn(Lsn(d));
            self.acked_tx.send_replace(d);
        }
    }

    /// Between transactions: while the buffer holds more undelivered events than the high watermark,
    /// stop reading (the slot keeps the WAL) until it drains below the low watermark.
    fn backpressure(&self, watermarks: &mut Watermarks, st: &mut State) {
        let on = watermarks.update(self.depth());
        if on != st.backpressured {
            st.backpressured = on;
            self.shared.set_backpressured(on);
            if on {
                tracing::info!(pipeline = %self.cfg.name, depth = self.depth(), "backpressure: reading paused");
            } else {
                tracing::info!(pipeline = %self.cfg.name, "backpressure released: reading resumed");
            }
        }
    }

    /// Handles one replication event.
    async fn handle(
        &mut self,
        ev: ReplicationEvent,
        st: &mut State,
        client: &ReplicationClient,
    ) -> Result<(), EngineError> {
        match ev {
            ReplicationEvent::Begin {
                final_lsn,
                commit_time_micros,
                ..
            } => {
                st.txn = Some(Txn {
                    lsn: final_lsn.0,
                    commit_time: commit_time_micros,
                    next_ord: 0,
                });
                st.txn_events = 0;
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if st.txn.take().is_some() {
                    st.batch.durable_lsn = Some(end_lsn.0);
                    st.batch.completed_events += st.txn_events;
                    st.txn_events = 0;
                }
                if let Some(id) = st.placed.take() {
                    self.backfill.placed(id, end_lsn.0);
                }
            }
            ReplicationEvent::XLogData { data, .. } => self.change(data, st).await?,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing in flight: everything before wal_end is durable or not ours, so the slot may
                // move on and release WAL written by other tables.
                if st.txn.is_none()
                    && st.batch.is_empty()
                    && st.acked == st.sent
                    && (!st.bypass || st.durable >= st.handed_end)
                    && wal_end.0 > st.durable
                {
                    client.update_applied_lsn(wal_end);
                }
            }
            ReplicationEvent::Message {
                prefix, content, ..
            } => self.watermark(&prefix, &content, st)?,
            ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    async fn change(&mut self, data: Bytes, st: &mut State) -> Result<(), EngineError> {
        let Some((kind, rel)) = pgoutput::parse_change(&data, &mut st.old, &mut st.new)? else {
            return self.other(data, st).await;
        };
        let txn = st
            .txn
            .as_mut()
            .ok_or_else(|| EngineError::Protocol("change outside a transaction".into()))?;
        let r = st.relations.get(&rel).ok_or_else(|| {
            EngineError::Protocol(format!(
                "change for relation {rel} before its Relation message"
            ))
        })?;
        // A backfill chunk of this table is between its watermarks: this key's row in the chunk
        // is older than this change.
        if let Some(w) = st.window.as_mut().filter(|w| w.oid == rel) {
            let (msg, old, new) = (&data[..], &st.old[..], &st.new[..]);
            match kind {
                ChangeKind::Insert => {
                    w.seen.insert(encode_key(key(msg, new, &r.key)));
                }
                ChangeKind::Update { has_old } => {
                    w.seen.insert(encode_key(key(msg, new, &r.key)));
                    if has_old {
                        w.seen.insert(encode_key(key(msg, old, &r.key)));
                    }
                }
                ChangeKind::Delete => {
                    w.seen.insert(encode_key(key(msg, old, &r.key)));
                }
            }
        }
        let pos = Position {
            lsn: txn.lsn,
            ord: txn.next_ord,
        };
        if self.delivered(pos) {
            txn.next_ord += 1;
            return Ok(());
        }
        if data.len() > WIDE_BYTES && st.batch.pass.is_none() {
            // Stopping: the change is left out of a transaction that then never commits here.
            st.batch.pass = tokio::select! {
                p = self.wide.enter() => Some(p),
                _ = self.cancel.cancelled() => return Ok(()),
            };
        }
        let rows = &mut st.batch.rows;
        let (msg, old, new) = (&data[..], &st.old[..], &st.new[..]);
        match kind {
            ChangeKind::Insert => {
                rows.begin_row(
                    &self.pipeline_id,
                    pos,
                    txn.commit_time,
                    r.info.rel_ver,
                    Op::Insert,
                );
                rows.null();
                rows.text_array_in(&data, values(msg, new));
                rows.null();
            }
            ChangeKind::Update { has_old } => {
                rows.begin_row(
                    &self.pipeline_id,
                    pos,
                    txn.commit_time,
                    r.info.rel_ver,
                    Op::Update,
                );
                let old = if has_old {
                    rows.text_array_in(&data, key(msg, old, &r.key));
                    old
                } else {
                    rows.null();
                    &[][..]
                };
                rows.text_array_in(&data, new_values(msg, new, old));
                st.unchanged.clear();
                st.unchanged.extend(
                    new.iter()
                        .enumerate()
                        .filter(|(i, c)| c.kind == b'u' && !old.get(*i).is_some_and(Col::is_value))
                        .map(|(i, _)| i as i16),
                );
                if st.unchanged.is_empty() {
                    rows.null();
                } else {
                    rows.int2_array(&st.unchanged);
                }
            }
            ChangeKind::Delete => {
                rows.begin_row(
                    &self.pipeline_id,
                    pos,
                    txn.commit_time,
                    r.info.rel_ver,
                    Op::Delete,
                );
                rows.text_array_in(&data, key(msg, old, &r.key));
                rows.null();
                rows.null();
            }
        }
        txn.next_ord += 1;
        st.txn_events += 1;
        self.shared.stats.events_read.inc();
        Ok(())
    }

    /// A backfill watermark of this pipeline (see `engine/backfill.rs`): a low one opens the
    /// chunk's window; at the high one the chunk's rows whose keys did not change in between go
    /// into this transaction as upserts.
    fn watermark(
        &mut self,
        prefix: &str,
        content: &[u8],
        st: &mut State,
    ) -> Result<(), EngineError> {
        let Some((low, id)) = self.backfill.watermark(prefix, content) else {
            return Ok(());
        };
        if low {
            st.window = self.backfill.opened(id).map(|oid| Window {
                id: id.to_string(),
                oid,
                ..Window::default()
            });
            return Ok(());
        }
        // A high watermark of an earlier session (read again after a restart) has no chunk.
        let Some(chunk) = self.backfill.take(id) else {
            return Ok(());
        };
        let window = st.window.take().filter(|w| w.id == id).ok_or_else(|| {
            EngineError::Protocol(format!(
                "backfill chunk {id}: its high watermark came without its low one"
            ))
        })?;
        let txn = st.txn.as_mut().ok_or_else(|| {
            EngineError::Protocol("a backfill watermark outside a transaction".into())
        })?;
        // The layout the stream uses for the table when it is the chunk's; else the chunk's own.
        let info = st
            .relations
            .get(&window.oid)
            .map(|r| &r.info)
            .filter(|i| i.columns == chunk.layout.columns && i.key == chunk.layout.key)
            .unwrap_or(&chunk.layout)
            .clone();
        if st.written_rels.insert(info.rel_ver) {
            st.batch.relations.push(info.clone());
        }
        let rows = &mut st.batch.rows;
        for row in &chunk.rows {
            // Truncated since the chunk was selected: none of its rows is current.
            if window.truncated || window.seen.contains(&chunk.key_of(row)) {
                continue;
            }
            let pos = Position {
                lsn: txn.lsn,
                ord: txn.next_ord,
            };
            txn.next_ord += 1;
            if self.delivered(pos) {
                continue;
            }
            // An update without an old key: the sinks upsert it (the key may be in the sink
            // already, from a change streamed before the low watermark).
            rows.begin_row(
                &self.pipeline_id,
                pos,
                txn.commit_time,
                info.rel_ver,
                Op::Update,
            );
            rows.null();
            rows.text_array(row.iter().map(|v| v.as_deref().map(str::as_bytes)));
            rows.null();
            st.txn_events += 1;
            self.shared.stats.events_read.inc();
        }
        st.placed = Some(id.to_string());
        Ok(())
    }

    /// Messages other than row changes: relations, truncates, and the ones Philotes ignores.
    async fn other(&mut self, data: Bytes, st: &mut State) -> Result<(), EngineError> {
        match pgoutput::decode(data)? {
            Message::Relation(r) => {
                let cols: Vec<catalog::SentColumn> = r
                    .columns
                    .iter()
                    .map(|c| catalog::SentColumn {
                        name: c.name.clone(),
                        type_oid: c.type_oid,
                        type_modifier: c.type_modifier,
                        is_key: c.is_key,
                    })
                    .collect();
                let mut info = pg::deadline(
                    self.cfg.response_timeout,
                    "reading a table layout on the source",
                    catalog::layout_of(
                        &self.sql,
                        r.id,
                        &r.namespace,
                        &r.name,
                        Some((&cols, r.replica_identity)),
                    ),
                )
                .await?;
                // FULL identity with the table gone from the catalog: the key it had before.
                if !info.key.contains(&true)
                    && let Some(prev) = st.relations.get(&r.id)
                {
                    let key = info.columns.iter().map(|c| prev.info.key_of(c)).collect();
                    info = RelationInfo::new(info.schema, info.name, info.columns, info.types, key);
                }
                // ... or, after a restart, the key of a layout of it the buffer has.
                if !info.key.contains(&true)
                    && let Some(names) = self
                        .known_keys
                        .get(&(info.schema.clone(), info.name.clone()))
                        .and_then(|keys| {
                            keys.iter().find(|k| {
                                !k.is_empty() && k.iter().all(|c| info.columns.contains(c))
                            })
                        })
                {
                    let key = info.columns.iter().map(|c| names.contains(c)).collect();
                    info = RelationInfo::new(info.schema, info.name, info.columns, info.types, key);
                }
                let key = info.key_indexes();
                if key.is_empty() {
                    let (problem, fix) = catalog::no_key(
                        &TableName {
                            schema: r.namespace.clone(),
                            name: r.name.clone(),
                        }
                        .to_string(),
                        r.replica_identity,
                    );
                    return Err(EngineError::invalid(
                        format!("spec.source.tables: {problem}"),
                        fix,
                    ));
                }
                if st.written_rels.insert(info.rel_ver) {
                    st.batch.relations.push(info.clone());
                }
                st.relations.insert(r.id, Rel { info, key });
            }
            Message::Truncate { rels, .. } => {
                for rel in rels {
                    if let Some(w) = st.window.as_mut().filter(|w| w.oid == rel) {
                        w.truncated = true;
                    }
                    let rel_ver = st
                        .relations
                        .get(&rel)
                        .ok_or_else(|| {
                            EngineError::Protocol(format!(
                                "change for relation {rel} before its Relation message"
                            ))
                        })?
                        .info
                        .rel_ver;
                    let txn = st.txn.as_mut().ok_or_else(|| {
                        EngineError::Protocol("change outside a transaction".into())
                    })?;
                    let pos = Position {
                        lsn: txn.lsn,
                        ord: txn.next_ord,
                    };
                    if self.delivered(pos) {
                        txn.next_ord += 1;
                        continue;
                    }
                    let rows = &mut st.batch.rows;
                    rows.begin_row(
                        &self.pipeline_id,
                        pos,
                        txn.commit_time,
                        rel_ver,
                        Op::Truncate,
                    );
                    rows.null();
                    rows.null();
                    rows.null();
                    txn.next_ord += 1;
                    st.txn_events += 1;
                    self.shared.stats.events_read.inc();
                }
            }
            Message::Insert { .. }
            | Message::Update { .. }
            | Message::Delete { .. }
            | Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Origin
            | Message::Type { .. }
            | Message::LogicalMessage { .. } => {}
        }
        Ok(())
    }
}
