//! Dead letters: events the sink refused, kept with the error in `philotes.dead_letters`.

use serde_json::{Map, Value, json};
use tokio_postgres::Client;

use super::error::EngineError;
use super::event::{Event, Op, Position, RelationInfo, Row};

/// Stores `events` as dead letters with `error` (idempotent on the event's position). Under `epoch`,
/// each is written only while that epoch owns the pipeline; returns false when it does not.
pub async fn write(
    client: &Client,
    pipeline_id: &str,
    epoch: Option<i64>,
    dead: &[(&Event, &RelationInfo, String)],
    attempts: i32,
) -> Result<bool, EngineError> {
    for (e, rel, error) in dead {
        let n = client
            .execute(
                "INSERT INTO philotes.dead_letters (pipeline_id, lsn, ord, rel_ver, table_name, op, old_key, vals, unchanged, error, attempts)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11
                 WHERE $12::bigint IS NULL OR EXISTS (
                   SELECT 1 FROM philotes.pipelines WHERE pipeline_id = $1 AND epoch = $12 FOR SHARE)
                 ON CONFLICT (pipeline_id, lsn, ord) DO UPDATE SET error = EXCLUDED.error, attempts = EXCLUDED.attempts, dead_at = now()",
                &[
                    &pipeline_id,
                    &(e.pos.lsn as i64),
                    &e.pos.ord,
                    &e.rel_ver,
                    &rel.qualified(),
                    &e.op.code(),
                    &e.old_key,
                    &e.vals,
                    &e.unchanged,
                    error,
                    &attempts,
                    &epoch,
                ],
            )
            .await
            .map_err(EngineError::pg("writing a dead letter"))?;
        if n == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub pipeline_id: String,
    pub event: Event,
    pub table: String,
    pub error: String,
    pub attempts: i32,
    pub dead_at: String,
}

/// Dead letters of one pipeline (all when `pipeline_id` is None), oldest first.
pub async fn list(
    client: &Client,
    pipeline_id: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, EngineError> {
    let rows = client
        .query(
            "SELECT pipeline_id, lsn, ord, rel_ver, table_name, op, old_key, vals, unchanged, error, attempts, dead_at::text
             FROM philotes.dead_letters WHERE $1::text IS NULL OR pipeline_id = $1 ORDER BY pipeline_id, lsn, ord LIMIT $2",
            &[&pipeline_id, &limit],
        )
        .await
        .map_err(EngineError::pg("listing dead letters"))?;
    rows.iter()
        .map(|r| {
            let code: i8 = r.get(5);
            Ok(DeadLetter {
                pipeline_id: r.get(0),
                event: Event {
                    pos: Position {
                        lsn: r.get::<_, i64>(1) as u64,
                        ord: r.get(2),
                    },
                    commit_time: 0,
                    rel_ver: r.get(3),
                    op: Op::from_code(code)
                        .ok_or_else(|| EngineError::Protocol(format!("unknown op code {code}")))?,
                    old_key: r.get::<_, Option<Row>>(6),
                    vals: r.get::<_, Option<Row>>(7),
                    unchanged: r.get::<_, Option<Vec<i16>>>(8),
                },
                table: r.get(4),
                error: r.get(9),
                attempts: r.get(10),
                dead_at: r.get(11),
            })
        })
        .collect()
}

pub async fn remove(client: &Client, pipeline_id: &str, pos: Position) -> Result<(), EngineError> {
    client
        .execute(
            "DELETE FROM philotes.dead_letters WHERE pipeline_id = $1 AND lsn = $2 AND ord = $3",
            &[&pipeline_id, &(pos.lsn as i64), &pos.ord],
        )
        .await
        .map_err(EngineError::pg("removing a dead letter"))?;
    Ok(())
}

pub async fn purge(client: &Client, pipeline_id: Option<&str>) -> Result<u64, EngineError> {
    client
        .execute(
            "DELETE FROM philotes.dead_letters WHERE $1::text IS NULL OR pipeline_id = $1",
            &[&pipeline_id],
        )
        .await
        .map_err(EngineError::pg("purging dead letters"))
}

/// A dead letter as JSON for people: column names with their values.
pub fn to_json(d: &DeadLetter, rel: Option<&RelationInfo>) -> Value {
    let named = |row: &Option<Row>, key_only: bool| -> Value {
        let Some(row) = row else { return Value::Null };
        let Some(rel) = rel else {
            return json!(row);
        };
        let names: Vec<&String> = if key_only {
            rel.key_indexes()
                .into_iter()
                .map(|i| &rel.columns[i])
                .collect()
        } else {
            rel.columns.iter().collect()
        };
        let mut m = Map::new();
        for (n, v) in names.into_iter().zip(row) {
            m.insert(
                n.clone(),
                v.clone().map(Value::String).unwrap_or(Value::Null),
            );
        }
        Value::Object(m)
    };
    json!({
        "pipeline": d.pipeline_id,
        "lsn": super::pg::lsn_text(d.event.pos.lsn),
        "ord": d.event.pos.ord,
        "table": d.table,
        "op": d.event.op.name(),
        "key": named(&d.event.old_key, true),
        "values": named(&d.event.vals, false),
        "unchanged": d.event.unchanged,
        "error": d.error,
        "attempts": d.attempts,
        "deadAt": d.dead_at,
    })
}
