//! The housekeeping task of a session: slot lag and buffer cleanup.

use std::sync::Arc;
use std::sync::atomic::Ordering;
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
        let state = pg::deadline(
            t,
            "reading the slot position",
            catalog::slot_state(&monitor, &cfg.slot),
        )
        .await?;
        let since = pg::lsn_text(shared.durable_lsn.load(Ordering::Relaxed));
        let Some(state) = state else {
            return Err(EngineError::SlotLost {
                slot: cfg.slot.clone(),
                why: "it was dropped outside Philotes, or is missing after a failover".into(),
                since,
            });
        };
        if state.wal_status.as_deref() == Some("lost") {
            return Err(EngineError::SlotLost {
                slot: cfg.slot.clone(),
                why: "wal_status = lost: the WAL it needs was removed (max_slot_wal_keep_size)"
                    .into(),
                since,
            });
        }
        shared.stats.lag_bytes.set(state.lag);
        shared.record_slot(&state, cfg.wal_at_risk_bytes);
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
