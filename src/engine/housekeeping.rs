//! The housekeeping task of a session: slot lag and buffer cleanup.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::buffer::Buffer;
use super::config::PipelineConfig;
use super::error::EngineError;
use super::pg;
use super::shared::Shared;
use super::source::catalog;

/// Measures slot lag, and cleans up processed events and old dead letters.
pub(super) async fn housekeeping(
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
        let t = cfg.response_timeout;
        let lag = pg::deadline(
            t,
            "reading the slot position",
            catalog::slot_lag(&monitor, &cfg.slot),
        )
        .await?;
        match lag {
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
            // In chunks, each a short statement.
            const CHUNK: i64 = 20_000;
            loop {
                let n = pg::deadline(
                    t,
                    "cleaning up the buffer",
                    control.cleanup(cfg.retention, cfg.dead_letter_retention, CHUNK),
                )
                .await?;
                if n > 0 {
                    tracing::debug!(pipeline = %cfg.name, rows = n, "buffer cleanup");
                }
                if n < CHUNK as u64 || cancel.is_cancelled() {
                    break;
                }
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
    }
}
