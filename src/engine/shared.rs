//! The state a pipeline's tasks share: phase, health, position, counters and the texts reported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use super::backfill::BackfillProgress;
use super::buffer::Ownership;
use super::error::EngineError;
use super::metrics::{Metrics, PipelineStats};
use super::state::{self, Phase};

/// What a pipeline reports: its phase, health, position and counters.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub phase: Phase,
    pub source_connected: bool,
    pub sink_healthy: bool,
    pub backpressured: bool,
    pub ownership: Ownership,
    pub confirmed_lsn: Option<String>,
    pub lag_bytes: i64,
    pub buffer_depth: i64,
    pub events_read: u64,
    pub events_delivered: u64,
    pub events_dead_lettered: u64,
    pub last_error: Option<String>,
    /// What a person can do about `last_error`.
    pub fix: Option<String>,
    /// Whether the worker retries by itself after `last_error`.
    pub retrying: bool,
    pub message: String,
    /// What a Failed phase is, for a condition reason: `SlotLost`, `Superseded`, or None.
    pub reason: Option<String>,
    /// Failed because another process took the pipeline over (a newer ownership epoch).
    pub superseded: bool,
    pub slot: SlotHealth,
    /// The `spec.resync` token of the last resync whose copy is complete.
    pub resynced: Option<String>,
    /// The ownership epoch this worker writes under (0 before it has taken the pipeline).
    pub epoch: i64,
    /// Backfills of tables added while the pipeline ran, this worker's, by table.
    pub backfills: Vec<BackfillProgress>,
    /// Tables the last change of `spec.source.tables` removed (`schema.table`); their sink tables
    /// stay.
    pub tables_removed: Vec<String>,
}

/// The slot's WAL as the source sees it (`pg_replication_slots`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotHealth {
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of losing what it needs
    /// (None without `max_slot_wal_keep_size`).
    pub safe_wal_bytes: Option<i64>,
    /// `wal_status` is `unreserved`, or `safe_wal_bytes` below the pipeline's threshold.
    pub at_risk: bool,
}

#[derive(Debug, Default)]
pub(super) struct Texts {
    last_error: Option<String>,
    fix: Option<String>,
    retrying: bool,
    message: String,
    pub(super) confirmed_lsn: Option<String>,
    pub(super) ownership: Ownership,
    sink_error: bool,
    reason: Option<String>,
    superseded: bool,
    pub(super) slot: SlotHealth,
    pub(super) resynced: Option<String>,
    pub(super) epoch: i64,
    backfills: Vec<BackfillProgress>,
    pub(super) tables_removed: Vec<String>,
}

/// State shared by a pipeline's tasks.
pub struct Shared {
    name: String,
    pub stats: PipelineStats,
    pub(super) metrics: Arc<Metrics>,
    phase: Mutex<Phase>,
    pub source_connected: AtomicBool,
    sink_healthy: AtomicBool,
    backpressured: AtomicBool,
    pub durable_lsn: AtomicU64,
    pub processed_lsn: AtomicU64,
    texts: Mutex<Texts>,
    pub(super) changed: Notify,
    /// When the worker ended by itself (failed for good).
    pub(super) ended_at: Mutex<Option<std::time::Instant>>,
    /// A session asked to be started again at once (not a failure).
    restart: AtomicBool,
    /// With `spec.buffer.bypass`: sessions store changes in the buffer until the transaction
    /// committed at this LSN is delivered (0: none).
    buffered_until: AtomicU64,
}

impl Shared {
    pub(super) fn new(name: &str, metrics: Arc<Metrics>) -> Self {
        metrics.set_phase(name, Phase::Starting);
        Self {
            name: name.to_string(),
            stats: metrics.pipeline(name),
            metrics,
            phase: Mutex::new(Phase::Starting),
            source_connected: AtomicBool::new(false),
            sink_healthy: AtomicBool::new(true),
            backpressured: AtomicBool::new(false),
            durable_lsn: AtomicU64::new(0),
            processed_lsn: AtomicU64::new(0),
            texts: Mutex::new(Texts {
                message: "starting".into(),
                ..Texts::default()
            }),
            changed: Notify::new(),
            ended_at: Mutex::new(None),
            restart: AtomicBool::new(false),
            buffered_until: AtomicU64::new(0),
        }
    }

    /// Asks the worker to start the next session at once; `buffer_until` sets (Some) or clears
    /// (None) [`buffered_until`](Self::buffered_until).
    pub(super) fn request_restart(&self, buffer_until: Option<u64>) {
        self.buffered_until
            .store(buffer_until.unwrap_or(0), Ordering::Relaxed);
        self.restart.store(true, Ordering::Relaxed);
    }

    /// Whether a restart was asked for (and clears it).
    pub(super) fn take_restart(&self) -> bool {
        self.restart.swap(false, Ordering::Relaxed)
    }

    /// Sessions store changes in the buffer, even with `spec.buffer.bypass`, until the transaction
    /// committed at this LSN is delivered.
    pub(super) fn buffered_until(&self) -> Option<u64> {
        Some(self.buffered_until.load(Ordering::Relaxed)).filter(|&l| l > 0)
    }

    pub(super) fn texts(&self) -> std::sync::MutexGuard<'_, Texts> {
        self.texts.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn phase(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves to `to` if the state machine allows it; refused transitions are logged and ignored.
    pub fn set_phase(&self, to: Phase) -> bool {
        let mut p = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        match state::transition(*p, to) {
            Ok(to) => {
                if *p != to {
                    tracing::info!(pipeline = %self.name, from = %*p, to = %to, "phase");
                    *p = to;
                    self.metrics.set_phase(&self.name, to);
                    drop(p);
                    self.changed.notify_one();
                }
                true
            }
            Err(e) => {
                tracing::debug!(pipeline = %self.name, "{e}");
                false
            }
        }
    }

    pub(super) fn fail(&self, e: &EngineError, retrying: bool) {
        {
            let mut t = self.texts();
            t.last_error = Some(e.to_string());
            t.fix = Some(e.fix());
            t.retrying = retrying;
            t.reason = e.reason().map(str::to_string);
            t.superseded = matches!(e, EngineError::Superseded { .. });
        }
        self.set_phase(Phase::Failed);
        self.changed.notify_one();
    }

    pub(crate) fn set_message(&self, m: impl Into<String>) {
        self.texts().message = m.into();
        self.changed.notify_one();
    }

    pub(super) fn clear_error(&self) {
        let mut t = self.texts();
        t.last_error = None;
        t.fix = None;
        t.retrying = false;
        t.reason = None;
        t.superseded = false;
    }

    /// Notes the slot's position and WAL state; WAL at risk when `wal_status` is `unreserved` or
    /// `safe_wal_size` is below `at_risk_below` bytes.
    pub(super) fn record_slot(&self, s: &super::source::catalog::SlotState, at_risk_below: i64) {
        let at_risk = s.wal_status.as_deref() == Some("unreserved")
            || s.safe_wal_size.is_some_and(|b| b < at_risk_below);
        self.stats.safe_wal_bytes.set(s.safe_wal_size.unwrap_or(-1));
        self.stats.wal_at_risk.set(at_risk as i64);
        let mut t = self.texts();
        t.confirmed_lsn = Some(s.confirmed.clone()).filter(|l| !l.is_empty());
        let slot = SlotHealth {
            wal_status: s.wal_status.clone(),
            safe_wal_bytes: s.safe_wal_size,
            at_risk,
        };
        if t.slot != slot {
            if slot.at_risk != t.slot.at_risk {
                tracing::warn!(pipeline = %self.name, at_risk, wal_status = ?slot.wal_status, safe_wal_bytes = ?slot.safe_wal_bytes, "slot WAL at risk changed");
            }
            t.slot = slot;
            drop(t);
            self.changed.notify_one();
        }
    }

    pub fn set_sink_error(&self, e: &EngineError) {
        self.sink_healthy.store(false, Ordering::Relaxed);
        let mut t = self.texts();
        t.last_error = Some(e.to_string());
        t.fix = Some(e.fix());
        t.retrying = true;
        t.sink_error = true;
    }

    pub fn set_sink_ok(&self) {
        self.sink_healthy.store(true, Ordering::Relaxed);
        let mut t = self.texts();
        if t.sink_error {
            t.sink_error = false;
            t.last_error = None;
            t.fix = None;
            t.retrying = false;
        }
    }

    /// Notes where a table's backfill stands.
    pub(super) fn set_backfill(&self, b: BackfillProgress) {
        self.metrics.set_backfill(&self.name, &b);
        let mut t = self.texts();
        match t.backfills.iter_mut().find(|x| x.table == b.table) {
            Some(x) => *x = b,
            None => t.backfills.push(b),
        }
        drop(t);
        self.changed.notify_one();
    }

    /// Whether backpressure holds the reader.
    pub fn backpressured(&self) -> bool {
        self.backpressured.load(Ordering::Relaxed)
    }

    pub fn set_backpressured(&self, on: bool) {
        self.backpressured.store(on, Ordering::Relaxed);
        self.stats.backpressured.set(on as i64);
        self.changed.notify_one();
    }

    pub fn progress(&self) -> Progress {
        let t = self.texts();
        Progress {
            phase: self.phase(),
            source_connected: self.source_connected.load(Ordering::Relaxed),
            sink_healthy: self.sink_healthy.load(Ordering::Relaxed),
            backpressured: self.backpressured.load(Ordering::Relaxed),
            ownership: t.ownership.clone(),
            confirmed_lsn: t.confirmed_lsn.clone(),
            lag_bytes: self.stats.lag_bytes.get(),
            buffer_depth: self.stats.buffer_depth.get(),
            events_read: self.stats.events_read.get(),
            events_delivered: self.stats.events_delivered.get(),
            events_dead_lettered: self.stats.events_dead_lettered.get(),
            last_error: t.last_error.clone(),
            fix: t.fix.clone(),
            retrying: t.retrying,
            message: t.message.clone(),
            reason: t.reason.clone(),
            superseded: t.superseded,
            slot: t.slot.clone(),
            resynced: t.resynced.clone(),
            epoch: t.epoch,
            backfills: t.backfills.clone(),
            tables_removed: t.tables_removed.clone(),
        }
    }
}
