//! `philotes dlq`: list, replay and purge a pipeline's dead letters.

use crate::engine::buffer::Buffer;
use crate::engine::config::{PipelineConfig, SinkConfig};
use crate::engine::dlq;
use crate::engine::error::EngineError;
use crate::engine::sink::Sink;
use crate::engine::sink::postgres::PostgresSink;

/// Connects to the pipeline's buffer database, and makes sure it is the one the pipeline runs on:
/// a database without the pipeline's row would answer "no dead letters" to the wrong question.
async fn buffer(cfg: &PipelineConfig) -> Result<Buffer, EngineError> {
    let buffer = Buffer::connect(&cfg.buffer, &cfg.id, "dlq").await?;
    // Two statements: a query naming a missing table fails before it runs.
    let client = buffer.client();
    let schema: bool = client
        .query_one("SELECT to_regclass('philotes.pipelines') IS NOT NULL", &[])
        .await
        .map_err(EngineError::pg("looking for the buffer schema"))?
        .get(0);
    let known = schema
        && client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM philotes.pipelines WHERE pipeline_id = $1)",
                &[&cfg.id],
            )
            .await
            .map_err(EngineError::pg("looking the pipeline up in the buffer"))?
            .get::<_, bool>(0);
    if !known {
        return Err(EngineError::invalid(
            format!(
                "buffer database {} holds nothing of pipeline {} (uid {}): it has not run there",
                cfg.buffer, cfg.name, cfg.id
            ),
            "if the operator runs with --default-buffer-secret (chart value defaultBufferSecret.name), pass the same --default-buffer-secret; otherwise wait until the pipeline has started",
        ));
    }
    Ok(buffer)
}

/// Dead letters as JSON lines.
pub async fn list(cfg: &PipelineConfig, limit: i64) -> Result<Vec<serde_json::Value>, EngineError> {
    let buffer = buffer(cfg).await?;
    let rels = buffer.relations().await?;
    let letters = dlq::list(buffer.client(), Some(&cfg.id), limit).await?;
    Ok(letters
        .iter()
        .map(|d| {
            let mut v = dlq::to_json(d, rels.get(&d.event.rel_ver));
            v["pipeline"] = serde_json::Value::String(cfg.name.clone());
            v
        })
        .collect())
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayOutcome {
    pub replayed: usize,
    pub still_failing: usize,
}

/// Applies each dead letter to the sink again, oldest first; those that now succeed are removed,
/// the others stay with their new error. Replay writes the values as they were when the change
/// happened: check `dlq list` first if newer changes to the same rows reached the sink since.
pub async fn replay(cfg: &PipelineConfig) -> Result<ReplayOutcome, EngineError> {
    let buffer = buffer(cfg).await?;
    let rels = buffer.relations().await?;
    let letters = dlq::list(buffer.client(), Some(&cfg.id), i64::MAX).await?;
    let SinkConfig::Postgres { conn, schema } = &cfg.sink else {
        return Err(EngineError::invalid(
            "dlq replay is not supported for the Iceberg sink yet (its tables skip changes at or before their committed position)",
            "inspect the dead letters with `philotes dlq list` and apply them by hand, or purge them",
        ));
    };
    let mut sink = PostgresSink::new(conn.clone(), schema.clone(), cfg.response_timeout);
    let mut out = ReplayOutcome::default();
    for d in letters {
        let batch = [d.event.clone()];
        let rejected = sink
            .apply_isolated(&batch, &rels, crate::engine::sink::Part::WHOLE, false)
            .await?;
        match rejected.first() {
            None => {
                dlq::remove(buffer.client(), &cfg.id, d.event.pos).await?;
                out.replayed += 1;
            }
            Some(r) => {
                if let Some(rel) = rels.get(&d.event.rel_ver) {
                    dlq::write(
                        buffer.client(),
                        &cfg.id,
                        None,
                        &[(&d.event, rel, r.error.clone())],
                        d.attempts + 1,
                    )
                    .await?;
                }
                out.still_failing += 1;
            }
        }
    }
    Ok(out)
}

pub async fn purge(cfg: &PipelineConfig) -> Result<u64, EngineError> {
    let buffer = buffer(cfg).await?;
    dlq::purge(buffer.client(), Some(&cfg.id)).await
}
