//! Cleanup after a deleted pipeline: its slot, publication and buffer rows.

use super::buffer::Buffer;
use super::config::PipelineConfig;
use super::error::EngineError;
use super::pg;
use super::source::catalog;

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

/// Removes a deleted pipeline's rows from the buffer (events, relations, registration), leaving its
/// slot and publication; dead letters stay.
pub async fn forget_buffer(cfg: &PipelineConfig) -> Result<(), EngineError> {
    let b = Buffer::connect(&cfg.buffer, &cfg.id, "buffer").await?;
    pg::deadline(
        cfg.response_timeout,
        "removing the pipeline from the buffer",
        forget(&b),
    )
    .await
}

/// Removes a pipeline's rows from the buffer (events, relations, registration); dead letters stay.
async fn forget(b: &Buffer) -> Result<(), EngineError> {
    for table in ["events", "relations", "backfills", "pipelines"] {
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
