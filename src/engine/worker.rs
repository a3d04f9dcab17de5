//! The worker of a pipeline: runs sessions, restarting them with backoff, and publishes progress.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::config::{Delivery, PipelineConfig};
use super::error::{EngineError, ErrorClass};
use super::retry;
use super::session::run_session;
use super::shared::{Progress, Shared};
use super::state::Phase;

/// Runs sessions until stopped, restarting failed ones with backoff; a configuration error ends it.
pub(super) async fn supervise(
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
        // A refused write counts even when the worker is being stopped (as it is when this replica
        // learns of the takeover at the same moment).
        if matches!(result, Err(EngineError::Superseded { .. })) {
            shared.metrics.superseded_writes.inc();
        }
        if cancel.is_cancelled() {
            break false;
        }
        if result.is_ok() && shared.take_restart() {
            continue;
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
