//! The reader: streams the slot with `START_REPLICATION ... LOGICAL` (pgoutput), turns changes into
//! events, writes them to the buffer in batches, and acknowledges a source LSN only after the buffer
//! transaction holding everything up to it has committed.

pub mod catalog;
pub mod pgoutput;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use self::pgoutput::{Message, Value};
use super::Shared;
use super::backpressure::Watermarks;
use super::buffer::Buffer;
use super::config::PipelineConfig;
use super::error::EngineError;
use super::event::{Event, Op, Position, RelationInfo, Row};

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
}

struct State {
    relations: HashMap<u32, RelationInfo>,
    written_rels: HashSet<i64>,
    new_rels: Vec<RelationInfo>,
    pending: Vec<Event>,
    txn: Option<Txn>,
    /// Events of the current transaction, flushed or not.
    txn_events: i64,
    /// End LSN of the last transaction whose commit was seen but is not yet durable, and its events.
    committed: Option<u64>,
    committed_events: i64,
    first_unflushed: Option<Instant>,
}

fn text(v: &Value) -> Result<Option<String>, EngineError> {
    match v {
        Value::Null | Value::UnchangedToast => Ok(None),
        Value::Text(b) | Value::Binary(b) => String::from_utf8(b.to_vec())
            .map(Some)
            .map_err(|_| EngineError::Protocol("a column value is not valid UTF-8".into())),
    }
}

fn row(values: &[Value]) -> Result<Row, EngineError> {
    values.iter().map(text).collect()
}

fn key_of(rel: &RelationInfo, values: &[Value]) -> Result<Row, EngineError> {
    rel.key_indexes()
        .into_iter()
        .map(|i| values.get(i).map(text).unwrap_or(Ok(None)))
        .collect()
}

impl Reader {
    fn replication_config(&self, start: u64) -> ReplicationConfig {
        let s = &self.cfg.source;
        ReplicationConfig::new(
            s.host(),
            s.user(),
            s.password(),
            s.dbname(),
            &self.cfg.slot,
            self.cfg.publication.as_str(),
        )
        .with_port(s.port())
        .with_start_lsn(Lsn(start))
        .with_ack_lsn(Lsn(start))
        .with_status_interval(Duration::from_millis(500))
        .with_wakeup_interval(Duration::from_secs(5))
        .with_buffer_size(16384)
        .with_application_name("philotes-reader")
    }

    pub async fn run(mut self, start: u64) -> Result<(), EngineError> {
        let mut client = ReplicationClient::connect(self.replication_config(start))
            .await
            .map_err(|source| EngineError::Replication {
                context: format!(
                    "starting replication from slot {} on {}",
                    self.cfg.slot, self.cfg.source
                ),
                source,
            })?;
        self.shared.source_connected.store(true, Ordering::Relaxed);
        let result = self.stream(&mut client, start).await;
        self.shared.source_connected.store(false, Ordering::Relaxed);
        let _ = tokio::time::timeout(Duration::from_secs(5), client.shutdown()).await;
        result
    }

    async fn stream(
        &mut self,
        client: &mut ReplicationClient,
        start: u64,
    ) -> Result<(), EngineError> {
        let mut st = State {
            relations: HashMap::new(),
            written_rels: HashSet::new(),
            new_rels: Vec::new(),
            pending: Vec::with_capacity(self.cfg.batch_size),
            txn: None,
            txn_events: 0,
            committed: None,
            committed_events: 0,
            first_unflushed: None,
        };
        let mut durable = start;
        let mut watermarks = Watermarks::new(self.cfg.high_watermark, self.cfg.low_watermark);
        let mut next: Option<ReplicationEvent> = None;
        let wire = |source| EngineError::Replication {
            context: "reading the replication stream".into(),
            source,
        };
        loop {
            let ev = match next.take() {
                Some(ev) => ev,
                None => {
                    let deadline = st.first_unflushed.map(|t| t + self.cfg.flush_interval);
                    tokio::select! {
                        biased;
                        _ = self.cancel.cancelled() => {
                            self.flush(client, &mut st, &mut durable).await?;
                            return Ok(());
                        }
                        r = client.recv() => match r.map_err(wire)? {
                            Some(ev) => ev,
                            None => return Err(EngineError::Protocol("the replication stream ended".into())),
                        },
                        _ = sleep_until(deadline) => {
                            self.flush(client, &mut st, &mut durable).await?;
                            continue;
                        }
                    }
                }
            };
            let at_commit = self.handle(ev, &mut st, client, durable).await?;
            if st.pending.len() >= self.cfg.batch_size {
                self.flush(client, &mut st, &mut durable).await?;
            } else if at_commit {
                // Flush when nothing more is waiting: batches grow under load, latency stays low when idle.
                match client.recv().now_or_never() {
                    Some(r) => match r.map_err(wire)? {
                        Some(ev) => next = Some(ev),
                        None => {
                            return Err(EngineError::Protocol(
                                "the replication stream ended".into(),
                            ));
                        }
                    },
                    None => self.flush(client, &mut st, &mut durable).await?,
                }
            }
            if st.txn.is_none() && next.is_none() {
                self.obey_backpressure(&mut watermarks, client, &mut st, &mut durable)
                    .await?;
            }
        }
    }

    /// Between transactions: while the buffer holds more undelivered events than the high watermark,
    /// stop reading (the slot keeps the WAL) until it drains below the low watermark.
    async fn obey_backpressure(
        &mut self,
        watermarks: &mut Watermarks,
        client: &mut ReplicationClient,
        st: &mut State,
        durable: &mut u64,
    ) -> Result<(), EngineError> {
        let depth = |s: &Shared| s.stats.buffer_depth.get().max(0) as u64;
        if !watermarks.update(depth(&self.shared)) {
            return Ok(());
        }
        self.flush(client, st, durable).await?;
        self.shared.set_backpressured(true);
        tracing::info!(pipeline = %self.cfg.name, depth = depth(&self.shared), "backpressure: reading paused");
        while watermarks.update(depth(&self.shared)) {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.check_interval) => {}
            }
        }
        self.shared.set_backpressured(false);
        tracing::info!(pipeline = %self.cfg.name, "backpressure released: reading resumed");
        Ok(())
    }

    /// Handles one replication event; returns true at a transaction's commit.
    async fn handle(
        &mut self,
        ev: ReplicationEvent,
        st: &mut State,
        client: &ReplicationClient,
        durable: u64,
    ) -> Result<bool, EngineError> {
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
                    st.committed = Some(end_lsn.0);
                    st.committed_events += st.txn_events;
                    st.txn_events = 0;
                    st.first_unflushed.get_or_insert_with(Instant::now);
                    return Ok(true);
                }
            }
            ReplicationEvent::XLogData { data, .. } => self.change(data, st).await?,
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Nothing in flight: everything before wal_end is durable or not ours, so the slot may
                // move on and release WAL written by other tables.
                if st.txn.is_none()
                    && st.pending.is_empty()
                    && st.committed.is_none()
                    && wal_end.0 > durable
                {
                    client.update_applied_lsn(wal_end);
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(false)
    }

    async fn change(&mut self, data: Bytes, st: &mut State) -> Result<(), EngineError> {
        let msg = pgoutput::decode(data)?;
        let (rel_id, op, old_key, vals, unchanged): (
            u32,
            Op,
            Option<Row>,
            Option<Row>,
            Option<Vec<i16>>,
        ) = match msg {
            Message::Relation(r) => {
                let cols: Vec<(String, u32, i32)> = r
                    .columns
                    .iter()
                    .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                    .collect();
                let info =
                    catalog::layout_of(&self.sql, r.id, &r.namespace, &r.name, Some(&cols)).await?;
                if info.key_indexes().is_empty() {
                    return Err(EngineError::invalid(
                        format!(
                            "spec.source.tables: table {}.{} has no primary key",
                            r.namespace, r.name
                        ),
                        "add a primary key to the table",
                    ));
                }
                if st.written_rels.insert(info.rel_ver) {
                    st.new_rels.push(info.clone());
                }
                st.relations.insert(r.id, info);
                return Ok(());
            }
            Message::Insert { rel, new } => (rel, Op::Insert, None, Some(row(&new)?), None),
            Message::Update { rel, old, new } => {
                let info = self.relation(st, rel)?;
                let old_key = match old {
                    Some(old) => Some(key_of(info, &old)?),
                    None => None,
                };
                let unchanged: Vec<i16> = new
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| matches!(v, Value::UnchangedToast))
                    .map(|(i, _)| i as i16)
                    .collect();
                (
                    rel,
                    Op::Update,
                    old_key,
                    Some(row(&new)?),
                    (!unchanged.is_empty()).then_some(unchanged),
                )
            }
            Message::Delete { rel, old } => {
                let key = key_of(self.relation(st, rel)?, &old)?;
                (rel, Op::Delete, Some(key), None, None)
            }
            Message::Truncate { rels, .. } => {
                for rel in rels {
                    self.push(st, rel, Op::Truncate, None, None, None)?;
                }
                return Ok(());
            }
            Message::Begin { .. }
            | Message::Commit { .. }
            | Message::Origin
            | Message::Type { .. }
            | Message::LogicalMessage { .. } => return Ok(()),
        };
        self.push(st, rel_id, op, old_key, vals, unchanged)
    }

    fn relation<'a>(&self, st: &'a State, rel: u32) -> Result<&'a RelationInfo, EngineError> {
        st.relations.get(&rel).ok_or_else(|| {
            EngineError::Protocol(format!(
                "change for relation {rel} before its Relation message"
            ))
        })
    }

    fn push(
        &mut self,
        st: &mut State,
        rel: u32,
        op: Op,
        old_key: Option<Row>,
        vals: Option<Row>,
        unchanged: Option<Vec<i16>>,
    ) -> Result<(), EngineError> {
        let rel_ver = self.relation(st, rel)?.rel_ver;
        let txn = st
            .txn
            .as_mut()
            .ok_or_else(|| EngineError::Protocol("change outside a transaction".into()))?;
        st.pending.push(Event {
            pos: Position {
                lsn: txn.lsn,
                ord: txn.next_ord,
            },
            commit_time: txn.commit_time,
            rel_ver,
            op,
            old_key,
            vals,
            unchanged,
        });
        txn.next_ord += 1;
        st.txn_events += 1;
        self.shared.stats.events_read.inc();
        Ok(())
    }

    /// Writes pending events and moves the durable position to the last complete transaction, then
    /// acknowledges that position to the source.
    async fn flush(
        &mut self,
        client: &ReplicationClient,
        st: &mut State,
        durable: &mut u64,
    ) -> Result<(), EngineError> {
        if st.pending.is_empty() && st.new_rels.is_empty() && st.committed.is_none() {
            return Ok(());
        }
        let lsn = st.committed.take();
        self.buffer.write(&st.new_rels, &st.pending, lsn).await?;
        st.new_rels.clear();
        st.pending.clear();
        st.first_unflushed = None;
        if let Some(lsn) = lsn {
            *durable = lsn;
            self.shared.stats.buffer_depth.inc_by(st.committed_events);
            st.committed_events = 0;
            client.update_applied_lsn(Lsn(lsn));
            self.shared.durable_lsn.store(lsn, Ordering::Relaxed);
            self.durable_tx.send_replace(lsn);
        }
        Ok(())
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
