//! The batch processor: reads durable events from the buffer in order, applies each batch to the sink
//! in one transaction, then records the batch as processed. Sink outages are retried until the sink is
//! back; a batch the sink refuses for its data is retried `maxAttempts` times, then applied change by
//! change so that only the refused changes go to the dead-letter queue.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::buffer::Buffer;
use super::config::{Delivery, PipelineConfig};
use super::dlq;
use super::error::{EngineError, ErrorClass};
use super::event::{Event, Position, RelationInfo};
use super::retry;
use super::sink::Sink;

pub struct Processor<S: Sink> {
    pub cfg: Arc<PipelineConfig>,
    pub buffer: Buffer,
    pub sink: S,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub durable_rx: watch::Receiver<u64>,
    pub delivery_rx: watch::Receiver<Delivery>,
}

/// Whether a delivery finished or was interrupted by shutdown.
enum Outcome {
    Done,
    Cancelled,
}

/// Microseconds between the Unix epoch and 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl<S: Sink> Processor<S> {
    pub async fn run(mut self) -> Result<(), EngineError> {
        let mut rels = self.buffer.relations().await?;
        let mut processed = self.buffer.checkpoint().await?.processed;
        // The batch after `processed`, read while the previous one was being delivered.
        let mut ahead: Option<(Position, Vec<Event>)> = None;
        let limit = self.cfg.batch_size.max(1);
        loop {
            if self.cancel.is_cancelled() {
                return Ok(());
            }
            if *self.delivery_rx.borrow() == Delivery::Paused {
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    r = self.delivery_rx.changed() => { if r.is_err() { return Ok(()) } }
                }
                continue;
            }
            let mut batch = match ahead.take() {
                Some((after, b)) if after == processed => b,
                _ => Vec::new(),
            };
            if batch.len() < limit {
                // Top up with what became durable meanwhile.
                let durable = *self.durable_rx.borrow_and_update();
                let after = batch.last().map(|e| e.pos).unwrap_or(processed);
                if durable > after.lsn {
                    let more = self
                        .buffer
                        .read_batch(after, durable, limit - batch.len())
                        .await?;
                    batch.extend(more);
                }
            }
            if batch.is_empty() {
                tokio::select! {
                    _ = self.cancel.cancelled() => return Ok(()),
                    _ = self.durable_rx.changed() => {}
                    _ = self.delivery_rx.changed() => {}
                    _ = tokio::time::sleep(self.cfg.flush_interval.max(Duration::from_millis(200))) => {}
                }
                continue;
            }
            if batch.iter().any(|e| !rels.contains_key(&e.rel_ver)) {
                rels = self.buffer.relations().await?;
            }
            let started = Instant::now();
            let last = batch.last().map(|e| e.pos).unwrap_or(processed);
            let durable = *self.durable_rx.borrow_and_update();
            // Deliver this batch while the buffer reads the next one.
            let (outcome, next) = {
                let Processor {
                    cfg,
                    buffer,
                    sink,
                    shared,
                    cancel,
                    ..
                } = &mut self;
                let mut d = Deliver {
                    cfg,
                    buffer,
                    sink,
                    shared,
                    cancel,
                };
                let read = async {
                    if durable > last.lsn {
                        buffer.read_batch(last, durable, limit).await
                    } else {
                        Ok(Vec::new())
                    }
                };
                tokio::join!(d.deliver(&batch, &rels), read)
            };
            match outcome? {
                Outcome::Cancelled => return Ok(()),
                Outcome::Done => {}
            }
            self.buffer.mark_processed(last).await?;
            processed = last;
            self.record(&batch, started);
            ahead = Some((last, next?));
        }
    }

    fn record(&self, batch: &[Event], started: Instant) {
        let n = batch.len() as i64;
        let stats = &self.shared.stats;
        stats.events_delivered.inc_by(n as u64);
        stats.buffer_depth.dec_by(n);
        stats.batch_seconds.observe(started.elapsed().as_secs_f64());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or_default();
        for e in batch {
            let lat = (now - PG_EPOCH_MICROS - e.commit_time).max(0) as f64 / 1e6;
            stats.delivery_latency_seconds.observe(lat);
        }
        self.shared.processed_lsn.store(
            batch.last().map(|e| e.pos.lsn).unwrap_or(0),
            Ordering::Relaxed,
        );
    }
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
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Outcome, EngineError> {
        let mut outage = retry::backoff(&self.cfg.retry, None);
        let mut data_delays = retry::backoff(&self.cfg.retry, Some(self.cfg.retry.max_attempts));
        let mut data_attempts = 0u32;
        loop {
            let err = match self.sink.apply(batch, rels).await {
                Ok(()) => {
                    self.shared.set_sink_ok();
                    return Ok(Outcome::Done);
                }
                Err(e) => e,
            };
            self.shared.stats.retries.inc();
            match err.class() {
                ErrorClass::Config => return Err(err),
                ErrorClass::Connection | ErrorClass::Transient => {
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
        let rejected = self.sink.apply_isolated(batch, rels).await?;
        if rejected.is_empty() {
            return Ok(());
        }
        if !self.cfg.dead_letter_enabled {
            let first = &rejected[0];
            return Err(EngineError::invalid(
                format!(
                    "the sink refused a change and the dead-letter queue is disabled: {}",
                    first.error
                ),
                "fix the sink table or the data, or set spec.deadLetter.enabled: true",
            ));
        }
        let mut dead = Vec::new();
        for r in &rejected {
            for &i in &r.events {
                let e = &batch[i];
                if let Some(rel) = rels.get(&e.rel_ver) {
                    dead.push((e, rel, r.error.clone()));
                }
            }
        }
        dlq::write(
            self.buffer.client(),
            self.buffer.pipeline_id(),
            &dead,
            attempts as i32,
        )
        .await?;
        self.shared
            .stats
            .events_dead_lettered
            .inc_by(dead.len() as u64);
        for (e, rel, error) in &dead {
            tracing::warn!(pipeline = %self.cfg.name, table = %rel.qualified(), lsn = %super::pg::lsn_text(e.pos.lsn), ord = e.pos.ord, %error, "event dead-lettered");
        }
        Ok(())
    }

    /// Sleeps; true when shutdown came first.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => true,
            _ = tokio::time::sleep(delay) => false,
        }
    }
}
