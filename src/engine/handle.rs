//! The owned handle of a running pipeline.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::config::{Delivery, PipelineConfig};
use super::metrics::Metrics;
use super::shared::{Progress, Shared};
use super::state::Phase;
use super::worker::supervise;

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
