//! The initial snapshot: when the pipeline creates its slot, the slot exports a snapshot, and the
//! tables are copied as of that snapshot into the buffer, before any streamed change. The copy is
//! stored at positions just below the slot's consistent point, so streamed transactions (which
//! commit after it) sort after it; rows are read in the text form the types' output functions give,
//! the same form pgoutput sends.
//!
//! A crash in the middle cannot resume an exported snapshot: the half-done copy is discarded, the slot
//! dropped and created again, and the copy starts over (`snapshot_done` in the buffer says where it is).

use std::sync::Arc;

use pgwire_replication::ReplicationClient;
use tokio_postgres::SimpleQueryMessage;

use super::source::catalog;
use crate::engine::Shared;
use crate::engine::buffer::{Buffer, CopyRows};
use crate::engine::config::PipelineConfig;
use crate::engine::error::EngineError;
use crate::engine::event::{Event, Op, Position, RelationInfo};
use crate::engine::pg::{self, ident, literal};

const FETCH: usize = 5000;

/// LSNs below the consistent point the copy's positions may use: each holds 2^31 rows (`ord` is an
/// int4), so a copy of up to 2^41 rows sorts before every streamed transaction.
const SNAPSHOT_LSNS: u64 = 1024;

/// Position of the `n`th copied row (from 0): `lsn` steps up every 2^31 rows, all of them below the
/// consistent point, so streamed transactions (committing at or after it) sort after the copy.
fn snapshot_position(consistent: u64, n: u64) -> Result<Position, EngineError> {
    let base = consistent.saturating_sub(SNAPSHOT_LSNS);
    let lsn = base + (n >> 31);
    if lsn >= consistent {
        return Err(EngineError::invalid(
            format!("the initial snapshot has more than {} rows", n),
            "set spec.source.initialSnapshot: false and copy the tables by other means",
        ));
    }
    Ok(Position {
        lsn,
        ord: (n & 0x7fff_ffff) as i32,
    })
}

/// Where the pipeline's snapshot stands, as recorded in the buffer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    /// A snapshot is still to be done (true also when the pipeline is new).
    pub pending: bool,
    /// The snapshot in progress is a resync: it replaces the sink tables' rows.
    pub replaces: bool,
    /// The `spec.resync` token of the last resync started.
    pub resync_token: Option<String>,
}

impl State {
    /// Whether `wanted` (the spec's token) asks for a resync not started yet.
    pub fn resync_owed(&self, wanted: Option<&str>) -> bool {
        wanted.is_some_and(|w| self.resync_token.as_deref() != Some(w))
    }
}

pub async fn state(buffer: &Buffer) -> Result<State, EngineError> {
    let row = buffer
        .client()
        .query_opt(
            "SELECT snapshot_done, snapshot_replaces, resync_token FROM philotes.pipelines WHERE pipeline_id = $1",
            &[&buffer.pipeline_id()],
        )
        .await
        .map_err(EngineError::pg("reading the snapshot state"))?;
    Ok(match row {
        None => State {
            pending: true,
            ..State::default()
        },
        Some(r) => State {
            pending: !r.get::<_, bool>(0),
            replaces: r.get(1),
            resync_token: r.get(2),
        },
    })
}

/// Records, before the slot exists, that this pipeline creates it and owes a snapshot; so a crash
/// at any later point is recovered by starting over. A resync (`resync` is its token) also records
/// that the snapshot replaces the sink's rows, which stays so until a snapshot completes. Returns
/// whether the snapshot replaces.
async fn begin(
    buffer: &Buffer,
    cfg: &PipelineConfig,
    resync: Option<&str>,
) -> Result<bool, EngineError> {
    let c = buffer.client();
    let epoch = buffer.epoch();
    // Each statement holds only while this owner's epoch owns the pipeline (FOR SHARE waits for a
    // takeover in flight, then sees it).
    let row = c
        .query_opt(
            "INSERT INTO philotes.pipelines AS p (pipeline_id, name, slot_name, publication_name, slot_created, snapshot_done, resync_token, snapshot_replaces)
         VALUES ($1, $2, $3, $4, true, false, $5::text, $5::text IS NOT NULL)
         ON CONFLICT (pipeline_id) DO UPDATE SET slot_name = $3, slot_created = true, snapshot_done = false,
           durable_lsn = 0, processed_lsn = 0, processed_ord = -1, updated_at = now(),
           resync_token = COALESCE($5::text, p.resync_token),
           snapshot_replaces = p.snapshot_replaces OR $5::text IS NOT NULL
         WHERE $6::bigint IS NULL OR p.epoch = $6
         RETURNING snapshot_replaces",
            &[
                &buffer.pipeline_id(),
                &cfg.name,
                &cfg.slot,
                &cfg.publication,
                &resync,
                &epoch,
            ],
        )
        .await
        .map_err(EngineError::pg("recording the snapshot start"))?;
    let Some(row) = row else {
        return Err(buffer.superseded_error().await);
    };
    for table in ["events", "relations"] {
        c.execute(
            &format!(
                "DELETE FROM philotes.{table} WHERE pipeline_id = $1 AND ($2::bigint IS NULL OR EXISTS (
                   SELECT 1 FROM philotes.pipelines WHERE pipeline_id = $1 AND epoch = $2 FOR SHARE))"
            ),
            &[&buffer.pipeline_id(), &epoch],
        )
        .await
        .map_err(EngineError::pg("discarding a half-done snapshot"))?;
    }
    Ok(row.get(0))
}

/// Creates the slot with an exported snapshot and copies `layouts` into the buffer as of it. Drops a
/// slot left by an interrupted earlier attempt (or, for a resync, the old slot) first. Returns the
/// buffer's durable position: the slot's consistent point.
///
/// A resync (`resync` is the new token, or one interrupted earlier) puts a truncate of each table
/// before the copy, at the same source position: the sink applies the truncates and the copy as
/// one source transaction, in one sink transaction.
pub async fn run(
    cfg: &PipelineConfig,
    source: &tokio_postgres::Client,
    buffer: &mut Buffer,
    layouts: &[RelationInfo],
    shared: &Arc<Shared>,
    resync: Option<&str>,
) -> Result<u64, EngineError> {
    catalog::drop_slot(source, &cfg.slot).await?;
    let replaces = begin(buffer, cfg, resync).await?;

    let wire = |context: &str| {
        let context = context.to_string();
        move |source| EngineError::Replication { context, source }
    };
    let replication = cfg
        .source
        .replication(&cfg.slot, &cfg.publication, "philotes-snapshot")?;
    let mut session = ReplicationClient::connect_gated(replication)
        .await
        .map_err(wire("opening a replication session for the snapshot"))?;
    let rows = session
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
            ident(&cfg.slot)
        ))
        .await
        .map_err(wire(
            "creating the replication slot with an exported snapshot",
        ))?;
    let text = |i: usize| -> Option<String> {
        rows.first()?
            .get(i)?
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let (Some(consistent), Some(snapshot)) = (text(1).and_then(|l| pg::parse_lsn(&l)), text(2))
    else {
        return Err(EngineError::Protocol(
            "CREATE_REPLICATION_SLOT returned no consistent point or snapshot".into(),
        ));
    };

    // The exported snapshot lives as long as `session` does.
    let copy = pg::connect(&cfg.source, "snapshot").await?;
    copy.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        literal(&snapshot)
    ))
    .await
    .map_err(EngineError::pg("opening the snapshot"))?;
    buffer.write(layouts, CopyRows::default(), None).await?;
    let mut n: u64 = 0;
    if replaces {
        let mut clear = CopyRows::default();
        for rel in layouts {
            clear.push_event(
                buffer.pipeline_id(),
                &Event {
                    pos: snapshot_position(consistent, n)?,
                    commit_time: 0,
                    rel_ver: rel.rel_ver,
                    op: Op::Truncate,
                    old_key: None,
                    vals: None,
                    unchanged: None,
                },
            );
            n += 1;
        }
        buffer.write(&[], clear, None).await?;
        tracing::info!(pipeline = %cfg.name, tables = layouts.len(), "resync: the sink tables' rows are replaced by the copy");
    }
    for rel in layouts {
        let cols: Vec<String> = rel.columns.iter().map(|c| ident(c)).collect();
        copy.batch_execute(&format!(
            "DECLARE philotes_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}.{}",
            cols.join(", "),
            ident(&rel.schema),
            ident(&rel.name)
        ))
        .await
        .map_err(EngineError::pg(format!(
            "reading {} for the snapshot",
            rel.qualified()
        )))?;
        let mut copied = 0u64;
        loop {
            let fetch = format!("FETCH {FETCH} FROM philotes_snapshot");
            let messages = pg::deadline(cfg.response_timeout, "reading the snapshot", async {
                copy.simple_query(&fetch)
                    .await
                    .map_err(EngineError::pg(format!(
                        "reading {} for the snapshot",
                        rel.qualified()
                    )))
            })
            .await?;
            let mut batch = CopyRows::default();
            for m in &messages {
                if let SimpleQueryMessage::Row(row) = m {
                    batch.begin_row(
                        buffer.pipeline_id(),
                        snapshot_position(consistent, n)?,
                        0,
                        rel.rel_ver,
                        Op::Insert,
                    );
                    batch.null();
                    batch.text_array((0..rel.columns.len()).map(|i| row.get(i).map(str::as_bytes)));
                    batch.null();
                    n += 1;
                }
            }
            if batch.is_empty() {
                break;
            }
            copied += batch.len() as u64;
            shared.stats.events_read.inc_by(batch.len() as u64);
            pg::deadline(
                cfg.response_timeout,
                "writing the snapshot to the buffer",
                buffer.write(&[], batch, None),
            )
            .await?;
            crate::engine::failpoint::crash_point("snapshot-mid-copy");
            shared.set_message(format!(
                "initial snapshot: {} rows of {} copied",
                copied,
                rel.qualified()
            ));
        }
        copy.batch_execute("CLOSE philotes_snapshot")
            .await
            .map_err(EngineError::pg("closing the snapshot cursor"))?;
        tracing::info!(pipeline = %cfg.name, table = %rel.qualified(), rows = copied, "snapshot copied");
    }
    copy.batch_execute("COMMIT")
        .await
        .map_err(EngineError::pg("ending the snapshot"))?;
    // Everything that committed before the consistent point is in the copy.
    buffer
        .write(&[], CopyRows::default(), Some(consistent))
        .await?;
    let marked = buffer
        .client()
        .execute(
            "UPDATE philotes.pipelines SET snapshot_done = true, snapshot_replaces = false
             WHERE pipeline_id = $1 AND ($2::bigint IS NULL OR epoch = $2)",
            &[&buffer.pipeline_id(), &buffer.epoch()],
        )
        .await
        .map_err(EngineError::pg("recording the snapshot as done"))?;
    if marked == 0 {
        return Err(buffer.superseded_error().await);
    }
    drop(session);
    Ok(consistent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_positions_go_past_two_to_the_31_rows_in_order_below_the_consistent_point() {
        let c = 0x1_6000_0000;
        let at = |n| snapshot_position(c, n).unwrap();
        assert!(at(0) < at(1));
        let edge = (1u64 << 31) - 1;
        assert!(at(edge) < at(edge + 1), "{:?} {:?}", at(edge), at(edge + 1));
        assert_eq!(at(edge + 1).ord, 0);
        assert!(at(5 << 31).lsn < c);
        assert!(snapshot_position(c, SNAPSHOT_LSNS << 31).is_err());
    }
}
