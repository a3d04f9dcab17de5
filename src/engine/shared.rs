//! The state a pipeline's tasks share: phase, health, position, counters and the texts reported.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

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
}

/// State shared by a pipeline's tasks.
pub struct Shared {
    name: String,
    pub stats: PipelineStats,
    metrics: Arc<Metrics>,
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
        }
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
        }
    }
}
