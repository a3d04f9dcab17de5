//! One pipeline = one supervised set of tasks (reader, processor, housekeeping). Knows nothing of
//! Kubernetes: it is started with a [`PipelineConfig`] and reports through a [`Progress`] watch.

pub mod backpressure;
pub mod buffer;
pub mod config;
pub mod dlq;
pub mod error;
pub mod event;
pub mod metrics;
pub mod pg;
pub mod processor;
pub mod retry;
pub mod sink;
pub mod snapshot;
pub mod source;
pub mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use self::buffer::{Buffer, Ownership};
use self::config::{Delivery, PipelineConfig};
use self::error::{EngineError, ErrorClass};
use self::metrics::{Metrics, PipelineStats};
use self::processor::Processor;
use self::sink::postgres::PostgresSink;
use self::source::{Reader, catalog};
use self::state::Phase;

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
struct Texts {
    last_error: Option<String>,
    fix: Option<String>,
    retrying: bool,
    message: String,
    confirmed_lsn: Option<String>,
    ownership: Ownership,
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
    changed: Notify,
    /// When the worker ended by itself (failed for good).
    ended_at: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    fn new(name: &str, metrics: Arc<Metrics>) -> Self {
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

    fn texts(&self) -> std::sync::MutexGuard<'_, Texts> {
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

    fn fail(&self, e: &EngineError, retrying: bool) {
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

    fn clear_error(&self) {
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

/// The owned handle of a running pipeline: change delivery, watch progress, stop.
pub struct PipelineHandle {
    config: PipelineConfig,
    shared: Arc<Shared>,
    delivery_tx: watch::Sender<Delivery>,
    progress_rx: watch::Receiver<Progress>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl PipelineHandle {
    /// Starts the pipeline's worker; it connects, prepares and streams in the background.
    pub fn start(config: PipelineConfig, metrics: Arc<Metrics>) -> Self {
        let shared = Arc::new(Shared::new(&config.name, metrics));
        let (delivery_tx, delivery_rx) = watch::channel(config.delivery);
        let (progress_tx, progress_rx) = watch::channel(shared.progress());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(supervise(
            Arc::new(config.clone()),
            shared.clone(),
            delivery_rx,
            cancel.clone(),
            progress_tx,
        ));
        Self {
            config,
            shared,
            delivery_tx,
            progress_rx,
            cancel,
            task,
        }
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.config
    }

    /// Pauses or resumes delivery to the sink; the reader keeps filling the buffer meanwhile.
    pub fn set_delivery(&mut self, delivery: Delivery) {
        self.config.delivery = delivery;
        self.delivery_tx.send_replace(delivery);
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress_rx.clone()
    }

    pub fn current(&self) -> Progress {
        self.shared.progress()
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// How long ago the worker gave up by itself (a failure that needs a person), if it did.
    pub fn failed_for(&self) -> Option<Duration> {
        (*self
            .shared
            .ended_at
            .lock()
            .unwrap_or_else(|p| p.into_inner()))
        .map(|t| t.elapsed())
    }

    /// Stops the worker: the reader flushes what it holds, the processor finishes its batch.
    pub async fn stop(self) -> Progress {
        self.shared.set_phase(Phase::Stopping);
        self.cancel.cancel();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(30), &mut task)
            .await
            .is_err()
        {
            tracing::warn!(pipeline = %self.config.name, "worker did not stop within 30s; aborting it");
            task.abort();
            self.shared.set_phase(Phase::Stopped);
        }
        self.shared.progress()
    }
}

async fn supervise(
    cfg: Arc<PipelineConfig>,
    shared: Arc<Shared>,
    delivery_rx: watch::Receiver<Delivery>,
    cancel: CancellationToken,
    progress_tx: watch::Sender<Progress>,
) {
    let done = CancellationToken::new();
    let publisher = tokio::spawn(publish(shared.clone(), progress_tx, done.clone()));
    let mut restarts = retry::backoff(&cfg.retry, None);
    let failed_for_good = loop {
        shared.set_phase(Phase::Starting);
        let result = run_session(&cfg, &shared, delivery_rx.clone(), cancel.clone()).await;
        if cancel.is_cancelled() {
            break false;
        }
        let e = match result {
            Ok(()) => EngineError::Protocol("the pipeline's tasks ended unexpectedly".into()),
            Err(e) => e,
        };
        if e.class() == ErrorClass::Config {
            tracing::error!(pipeline = %cfg.name, error = %e, fix = %e.fix(), "pipeline failed; not retrying");
            shared.fail(&e, false);
            shared.set_message(format!("{e}; fix: {}", e.fix()));
            break true;
        }
        let delay = restarts.next().unwrap_or(cfg.retry.max_interval);
        tracing::warn!(pipeline = %cfg.name, error = %e, ?delay, "pipeline failed; restarting");
        shared.fail(&e, true);
        shared.set_message(format!(
            "{e}; retrying in {}",
            humantime::format_duration(round(delay))
        ));
        tokio::select! {
            _ = cancel.cancelled() => break false,
            _ = tokio::time::sleep(delay) => {}
        }
    };
    if failed_for_good {
        *shared.ended_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(std::time::Instant::now());
    } else {
        shared.set_phase(Phase::Stopping);
        shared.set_phase(Phase::Stopped);
        shared
            .set_message("stopped; the slot is kept and retains WAL until the pipeline runs again");
    }
    done.cancel();
    let _ = publisher.await;
}

fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Sends progress to watchers when it changes: at once on a phase change, else twice a second.
async fn publish(shared: Arc<Shared>, tx: watch::Sender<Progress>, done: CancellationToken) {
    loop {
        let stop = tokio::select! {
            _ = done.cancelled() => true,
            _ = shared.changed.notified() => false,
            _ = tokio::time::sleep(Duration::from_millis(500)) => false,
        };
        let now = shared.progress();
        tx.send_if_modified(|p| {
            if *p != now {
                *p = now;
                true
            } else {
                false
            }
        });
        if stop {
            return;
        }
    }
}

async fn run_session(
    cfg: &Arc<PipelineConfig>,
    shared: &Arc<Shared>,
    delivery_rx: watch::Receiver<Delivery>,
    cancel: CancellationToken,
) -> Result<(), EngineError> {
    shared.set_message("connecting");
    let source = pg::connect(&cfg.source, "source").await?;
    buffer::migrate(&cfg.buffer).await?;
    catalog::check_wal_level(&source).await?;
    let layouts = catalog::table_layouts(&source, &cfg.tables).await?;
    let control = Buffer::connect(&cfg.buffer, &cfg.id, "buffer").await?;
    let previous = control.ownership().await?;
    let owned_publication = previous
        .as_ref()
        .is_some_and(|o| o.publication_created && o.publication_name == cfg.publication);
    let publication_created =
        catalog::ensure_publication(&source, &cfg.publication, &cfg.tables, owned_publication)
            .await?;
    let slot_exists = catalog::slot_exists(&source, &cfg.slot).await?;
    let ours = previous
        .as_ref()
        .is_some_and(|o| o.slot_created && o.slot_name == cfg.slot);
    let snapshot_owed = snapshot::pending(&control).await?;
    let slot_created = if cfg.initial_snapshot && snapshot_owed && (!slot_exists || ours) {
        shared.set_message("initial snapshot");
        let mut writer = Buffer::connect(&cfg.buffer, &cfg.id, "snapshot").await?;
        snapshot::run(cfg, &source, &mut writer, &layouts, shared).await?;
        true
    } else {
        if !slot_exists && !snapshot_owed {
            let cp = control.checkpoint().await?;
            if cp.durable_lsn > 0 {
                return Err(EngineError::invalid(
                    format!(
                        "replication slot {} is gone although this pipeline streamed from it; changes made since it was dropped are lost to the sink",
                        cfg.slot
                    ),
                    "delete and re-create the pipeline (a new slot and initial snapshot), or restore the slot",
                ));
            }
        }
        if cfg.initial_snapshot && snapshot_owed && slot_exists {
            tracing::warn!(pipeline = %cfg.name, slot = %cfg.slot, "the slot was not created by Philotes: no initial snapshot, changes from the slot's position on");
        }
        catalog::ensure_slot(&source, &cfg.slot).await? || ours
    };
    let own = control
        .register(
            &cfg.name,
            &Ownership {
                slot_name: cfg.slot.clone(),
                publication_name: cfg.publication.clone(),
                slot_created,
                publication_created,
            },
        )
        .await?;
    shared.texts().ownership = own;

    let mut sink = PostgresSink::new(cfg.sink.clone(), cfg.sink_schema.clone());
    sink.prepare(&layouts).await?;

    let cp = control.checkpoint().await?;
    control.discard_incomplete(cp.durable_lsn).await?;
    shared.stats.buffer_depth.set(control.depth(&cp).await?);
    shared.durable_lsn.store(cp.durable_lsn, Ordering::Relaxed);
    let (durable_tx, durable_rx) = watch::channel(cp.durable_lsn);
    let monitor = pg::connect(&cfg.source, "monitor").await?;

    let session = cancel.child_token();
    // The writer hands the rows it just committed to the processor, which then need not read them back.
    let (handoff_tx, handoff_rx) = tokio::sync::mpsc::channel(4);
    let reader = Reader {
        cfg: cfg.clone(),
        sql: source,
        buffer: Buffer::connect(&cfg.buffer, &cfg.id, "buffer-writer").await?,
        shared: shared.clone(),
        cancel: session.clone(),
        durable_tx,
        handoff: Some(handoff_tx),
    };
    let processor = Processor {
        cfg: cfg.clone(),
        buffer: Buffer::connect(&cfg.buffer, &cfg.id, "buffer-reader").await?,
        sink,
        shared: shared.clone(),
        cancel: session.clone(),
        durable_rx,
        delivery_rx: delivery_rx.clone(),
        handoffs: Some(handoff_rx),
    };
    let mut tasks = JoinSet::new();
    tasks.spawn(reader.run(cp.durable_lsn));
    tasks.spawn(processor.run());
    tasks.spawn(housekeeping(
        cfg.clone(),
        shared.clone(),
        control,
        monitor,
        session.clone(),
    ));
    tasks.spawn(follow_delivery(
        shared.clone(),
        delivery_rx,
        session.clone(),
    ));

    let mut first_error = None;
    while let Some(res) = tasks.join_next().await {
        let err = match res {
            Ok(Ok(())) if session.is_cancelled() => continue,
            Ok(Ok(())) => EngineError::Protocol("a pipeline task ended unexpectedly".into()),
            Ok(Err(e)) => e,
            Err(join) => EngineError::Protocol(format!("a pipeline task panicked: {join}")),
        };
        if first_error.is_none() {
            first_error = Some(err);
        }
        session.cancel();
    }
    match first_error {
        Some(e) if !cancel.is_cancelled() => Err(e),
        _ => Ok(()),
    }
}

/// Phase follows the delivery setting once the source is connected.
async fn follow_delivery(
    shared: Arc<Shared>,
    mut delivery_rx: watch::Receiver<Delivery>,
    cancel: CancellationToken,
) -> Result<(), EngineError> {
    while !shared.source_connected.load(Ordering::Relaxed) {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    shared.clear_error();
    loop {
        let d = *delivery_rx.borrow_and_update();
        let (phase, msg) = match d {
            Delivery::Running => (Phase::Running, "streaming"),
            Delivery::Paused => (
                Phase::Paused,
                "paused: delivery to the sink stopped; the slot still drains into the buffer",
            ),
        };
        shared.set_phase(phase);
        shared.set_message(msg);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = delivery_rx.changed() => if r.is_err() { return Ok(()) },
        }
    }
}

/// Measures slot lag, and cleans up processed events and old dead letters.
async fn housekeeping(
    cfg: Arc<PipelineConfig>,
    shared: Arc<Shared>,
    control: Buffer,
    monitor: tokio_postgres::Client,
    cancel: CancellationToken,
) -> Result<(), EngineError> {
    let every = cfg
        .check_interval
        .clamp(Duration::from_millis(200), Duration::from_secs(10));
    // Cleanup runs every minute, or at half the shorter retention when that is less.
    let cleanup_every = (cfg.retention.min(cfg.dead_letter_retention) / 2)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut last_cleanup = tokio::time::Instant::now();
    loop {
        match catalog::slot_lag(&monitor, &cfg.slot).await? {
            Some((lsn, lag)) => {
                shared.stats.lag_bytes.set(lag);
                shared.texts().confirmed_lsn = Some(lsn).filter(|l| !l.is_empty());
            }
            None => {
                return Err(EngineError::invalid(
                    format!(
                        "replication slot {} was dropped outside Philotes; changes since then are lost to this pipeline",
                        cfg.slot
                    ),
                    "delete and re-create the pipeline (and re-sync the sink), or restore the slot",
                ));
            }
        }
        if last_cleanup.elapsed() >= cleanup_every {
            last_cleanup = tokio::time::Instant::now();
            let n = control
                .cleanup(cfg.retention, cfg.dead_letter_retention)
                .await?;
            if n > 0 {
                tracing::debug!(pipeline = %cfg.name, rows = n, "buffer cleanup");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Drops the slot and publication this pipeline created (never others), tolerating that they, or the
/// whole source, are already gone. Returns what was dropped, for messages.
pub async fn reclaim(cfg: &PipelineConfig) -> Result<Vec<String>, EngineError> {
    let control = Buffer::connect(&cfg.buffer, &cfg.id, "buffer").await;
    let own = match &control {
        Ok(b) => b.ownership().await.ok().flatten(),
        Err(_) => None,
    };
    let Some(own) = own else {
        return Ok(vec![]);
    };
    let mut dropped = Vec::new();
    if own.slot_created || own.publication_created {
        let source = pg::connect(&cfg.source, "source").await?;
        if own.slot_created && catalog::drop_slot(&source, &own.slot_name).await? {
            dropped.push(format!("slot {}", own.slot_name));
        }
        if own.publication_created {
            catalog::drop_publication(&source, &own.publication_name).await?;
            dropped.push(format!("publication {}", own.publication_name));
        }
    }
    if let Ok(b) = control {
        forget(&b).await?;
    }
    Ok(dropped)
}

/// Removes a pipeline's rows from the buffer (events, relations, registration); dead letters stay.
async fn forget(b: &Buffer) -> Result<(), EngineError> {
    for table in ["events", "relations", "pipelines"] {
        b.client()
            .execute(
                &format!("DELETE FROM philotes.{table} WHERE pipeline_id = $1"),
                &[&b.pipeline_id()],
            )
            .await
            .map_err(EngineError::pg("removing the pipeline from the buffer"))?;
    }
    Ok(())
}
