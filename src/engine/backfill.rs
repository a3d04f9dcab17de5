//! Tables added to a running pipeline: their existing rows are copied while the stream goes on, on
//! the same slot, in chunks placed into the stream between two watermarks (Netflix's DBLog).
//!
//! For each chunk the backfill task writes a low watermark into the WAL (a transactional logical
//! message, `pg_logical_emit_message`), selects the next rows of the table in key order, hands them
//! to the reader, and writes a high watermark. The reader sees the stream in commit order: every
//! change of the table it reads between the two watermarks committed after the low one, so it is as
//! new as the selected row of that key or newer, and it drops that key from the chunk. At the high
//! watermark the rows left go into the stream as updates without an old key (upserts: a key may be
//! in the sink already, from a change streamed before the low watermark), in the high watermark's
//! transaction. Changes before the low watermark are older than the selected rows;
//! changes after the high one come after them. Every key of the table is therefore applied in an
//! order that ends at its current state, and no other table waits.
//!
//! Progress (the last key copied) is recorded in the buffer only once the reader has acknowledged
//! the high watermark's transaction (it is in the buffer, or with `spec.buffer.bypass` in the sink).
//! The next chunk does not wait for that, up to [`UNACKED`] chunks, so a crash repeats at most those,
//! which is harmless: a repeated chunk is a newer read.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::{Client, SimpleQueryMessage};
use tokio_util::sync::CancellationToken;

use super::buffer::Buffer;
use super::config::PipelineConfig;
use super::error::EngineError;
use super::event::RelationInfo;
use super::pg::{self, ident, literal};
use super::shared::Shared;
use super::source::catalog;
use super::table_name::TableName;

/// Most rows a chunk selects.
pub const CHUNK_ROWS: usize = 1000;

/// Most bytes of values a chunk holds (it holds at least one row).
const CHUNK_BYTES: usize = 4 << 20;

/// Prefix of a pipeline's watermark messages; other messages in the stream are not this
/// pipeline's (every pipeline on the source sees them all).
pub fn prefix(pipeline_id: &str) -> String {
    format!("philotes.backfill.{pipeline_id}")
}

/// A table's backfill as status shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackfillProgress {
    /// `schema.table`.
    pub table: String,
    pub rows_copied: u64,
    /// The source's estimate of the table's rows (`pg_class.reltuples`) when the backfill started.
    pub rows_estimated: u64,
    pub done: bool,
}

/// What a session found when it compared the spec's tables with those the pipeline captured.
#[derive(Debug, Default, PartialEq)]
pub struct Changes {
    /// Tables added since the last session: each owes a backfill (with `initialSnapshot`).
    pub added: Vec<TableName>,
    /// Tables no longer captured; their sink tables stay.
    pub removed: Vec<TableName>,
}

/// Compares the spec's tables with the ones the pipeline captured, and records, before the
/// publication is changed, a backfill for each table added (so a crash after the change still
/// copies it) and the new set. `copies_all`: this session copies every table anyway (a new
/// pipeline's snapshot, or a resync), so nothing is backfilled.
pub async fn record_changes(
    buffer: &Buffer,
    cfg: &PipelineConfig,
    copies_all: bool,
) -> Result<Changes, EngineError> {
    let c = buffer.client();
    let err = || EngineError::pg("recording the pipeline's tables");
    let spec: Vec<String> = cfg.tables.iter().map(TableName::to_string).collect();
    let captured: Option<Vec<String>> = c
        .query_opt(
            "SELECT tables FROM philotes.pipelines WHERE pipeline_id = $1",
            &[&buffer.pipeline_id()],
        )
        .await
        .map_err(err())?
        .and_then(|r| r.get(0));
    let changes = match captured {
        Some(was) if !copies_all => Changes {
            added: cfg
                .tables
                .iter()
                .filter(|t| !was.contains(&t.to_string()))
                .cloned()
                .collect(),
            removed: was
                .iter()
                .filter(|t| !spec.contains(t))
                .filter_map(|t| TableName::parse(t))
                .collect(),
        },
        _ => Changes::default(),
    };
    let epoch = buffer.epoch();
    // One transaction, fenced: the set and the backfills change together or not at all.
    c.batch_execute("BEGIN").await.map_err(err())?;
    let result = async {
        let owned = c
            .execute(
                "UPDATE philotes.pipelines SET tables = $2 WHERE pipeline_id = $1 AND ($3::bigint IS NULL OR epoch = $3)",
                &[&buffer.pipeline_id(), &spec, &epoch],
            )
            .await
            .map_err(err())?;
        if owned == 0 {
            return Err(buffer.superseded_error().await);
        }
        if copies_all {
            c.execute(
                "DELETE FROM philotes.backfills WHERE pipeline_id = $1",
                &[&buffer.pipeline_id()],
            )
            .await
            .map_err(err())?;
        }
        for t in &changes.removed {
            c.execute(
                "DELETE FROM philotes.backfills WHERE pipeline_id = $1 AND schema_name = $2 AND table_name = $3",
                &[&buffer.pipeline_id(), &t.schema, &t.name],
            )
            .await
            .map_err(err())?;
        }
        if cfg.initial_snapshot {
            for t in &changes.added {
                c.execute(
                    "INSERT INTO philotes.backfills (pipeline_id, schema_name, table_name) VALUES ($1, $2, $3)
                     ON CONFLICT (pipeline_id, schema_name, table_name) DO UPDATE SET last_key = NULL, rows_copied = 0, done = false",
                    &[&buffer.pipeline_id(), &t.schema, &t.name],
                )
                .await
                .map_err(err())?;
            }
        }
        Ok(())
    }
    .await;
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    c.batch_execute(end).await.map_err(err())?;
    result.map(|()| changes)
}

/// A backfill still owed: the table, the key of the last row copied and how many were.
#[derive(Debug, Clone)]
pub struct Owed {
    pub table: TableName,
    last_key: Option<Vec<Option<String>>>,
    rows_copied: u64,
}

/// The backfills the pipeline still owes, of tables it captures.
pub async fn owed(buffer: &Buffer, cfg: &PipelineConfig) -> Result<Vec<Owed>, EngineError> {
    let rows = buffer
        .client()
        .query(
            "SELECT schema_name, table_name, last_key, rows_copied FROM philotes.backfills
             WHERE pipeline_id = $1 AND NOT done ORDER BY schema_name, table_name",
            &[&buffer.pipeline_id()],
        )
        .await
        .map_err(EngineError::pg("reading the tables owed a backfill"))?;
    Ok(rows
        .iter()
        .map(|r| Owed {
            table: TableName {
                schema: r.get(0),
                name: r.get(1),
            },
            last_key: r.get(2),
            rows_copied: r.get::<_, i64>(3).max(0) as u64,
        })
        .filter(|o| cfg.tables.contains(&o.table))
        .collect())
}

/// Rows selected between two watermarks, for the reader to place at the high one.
#[derive(Debug)]
pub struct Chunk {
    /// The layout the rows were selected in.
    pub layout: RelationInfo,
    /// Values in the layout's column order, in their text form.
    pub rows: Vec<Vec<Option<String>>>,
}

impl Chunk {
    /// The key of row `i`, encoded as [`encode_key`] encodes a streamed change's.
    pub fn key_of(&self, row: &[Option<String>]) -> Vec<u8> {
        encode_key(
            self.layout
                .key_indexes()
                .into_iter()
                .map(|i| row.get(i).and_then(|v| v.as_deref()).map(str::as_bytes)),
        )
    }
}

/// A key's values as one byte string (each value length-prefixed; NULL as -1).
pub fn encode_key<'a>(values: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<u8> {
    let mut out = Vec::new();
    for v in values {
        match v {
            Some(b) => {
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out
}

#[derive(Debug, Default)]
struct Slot {
    /// The chunk between watermarks now: its id and the table's oid.
    id: String,
    oid: u32,
    chunk: Option<Chunk>,
}

/// Where the backfill task and the reader of one session meet: the chunk in flight, and what
/// became of it.
#[derive(Debug)]
pub struct Board {
    prefix: String,
    slot: Mutex<Option<Slot>>,
    /// Chunk id and the end LSN of the transaction the reader placed it in, at its commit.
    placed: watch::Sender<Option<(String, u64)>>,
}

impl Board {
    pub fn new(pipeline_id: &str) -> Arc<Self> {
        Arc::new(Self {
            prefix: prefix(pipeline_id),
            slot: Mutex::new(None),
            placed: watch::channel(None).0,
        })
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<Slot>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The watermark a message of this pipeline is: `(low, chunk id)`; None for other messages.
    pub fn watermark<'a>(&self, prefix: &str, content: &'a [u8]) -> Option<(bool, &'a str)> {
        if prefix != self.prefix {
            return None;
        }
        let text = std::str::from_utf8(content).ok()?;
        match text.split_once(' ')? {
            ("low", id) => Some((true, id)),
            ("high", id) => Some((false, id)),
            _ => None,
        }
    }

    /// At a low watermark: the table whose changes the reader must note, if the chunk is this
    /// session's.
    pub fn opened(&self, id: &str) -> Option<u32> {
        self.slot().as_ref().filter(|s| s.id == id).map(|s| s.oid)
    }

    /// At a high watermark: the chunk, if it is this session's.
    pub fn take(&self, id: &str) -> Option<Chunk> {
        self.slot()
            .as_mut()
            .filter(|s| s.id == id)
            .and_then(|s| s.chunk.take())
    }

    /// At the commit of the transaction the chunk was placed in.
    pub fn placed(&self, id: String, end_lsn: u64) {
        self.placed.send_replace(Some((id, end_lsn)));
    }
}

/// Copies the tables owed a backfill, chunk by chunk, until done or cancelled. `acked` is what
/// the reader has acknowledged to the source (everything before it is in the buffer, or in the
/// sink when bypassing the buffer).
pub async fn run(
    cfg: Arc<PipelineConfig>,
    owed: Vec<Owed>,
    board: Arc<Board>,
    mut acked: watch::Receiver<u64>,
    buffer: Buffer,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), EngineError> {
    if owed.is_empty() {
        cancel.cancelled().await;
        return Ok(());
    }
    let source = pg::connect(&cfg.source, "backfill").await?;
    let t = cfg.response_timeout;
    // Watermarks of earlier sessions, read again after a restart, name no chunk of this one.
    let nonce = uuid::Uuid::now_v7().simple().to_string();
    let mut seq = 0u64;
    for o in owed {
        let table = o.table.to_string();
        let (layout, oid, estimate) = pg::deadline(t, "reading a table to backfill", async {
            let layout = catalog::table_layouts(&source, std::slice::from_ref(&o.table))
                .await?
                .pop()
                .ok_or_else(|| EngineError::Protocol(format!("no layout of {table}")))?;
            let row = source
                .query_opt(
                    "SELECT c.oid, GREATEST(c.reltuples, 0)::bigint FROM pg_class c WHERE c.oid = to_regclass($1)",
                    &[&table],
                )
                .await
                .map_err(EngineError::pg(format!("looking up {table}")))?
                .ok_or_else(|| {
                    EngineError::invalid(
                        format!("spec.source.tables: table {table} does not exist on the source"),
                        "create the table, or remove it from spec.source.tables",
                    )
                })?;
            Ok((layout, row.get::<_, u32>(0), row.get::<_, i64>(1).max(0) as u64))
        })
        .await?;
        let mut progress = BackfillProgress {
            table: table.clone(),
            rows_copied: o.rows_copied,
            rows_estimated: estimate.max(o.rows_copied),
            done: false,
        };
        shared.set_backfill(progress.clone());
        tracing::info!(pipeline = %cfg.name, table = %table, estimate, from = ?o.last_key, "backfill of an added table");
        let mut last_key = o.last_key;
        let mut unacked: VecDeque<Placed> = VecDeque::new();
        loop {
            seq += 1;
            let id = format!("{nonce}-{seq}");
            *board.slot() = Some(Slot {
                id: id.clone(),
                oid,
                chunk: None,
            });
            emit(&source, &board.prefix, "low", &id, t).await?;
            let (rows, more) = pg::deadline(
                t,
                "selecting rows to backfill",
                select_chunk(&source, &layout, last_key.as_deref()),
            )
            .await?;
            let n = rows.len() as u64;
            let chunk = Chunk {
                layout: layout.clone(),
                rows,
            };
            let next_key = chunk.rows.last().map(|r| {
                chunk
                    .layout
                    .key_indexes()
                    .into_iter()
                    .map(|i| r.get(i).cloned().flatten())
                    .collect::<Vec<_>>()
            });
            if let Some(s) = board.slot().as_mut() {
                s.chunk = Some(chunk);
            }
            emit(&source, &board.prefix, "high", &id, t).await?;
            // The reader places the chunk at the high watermark and reports, at that transaction's
            // commit, where it ends.
            let mut placed = board.placed.subscribe();
            let end = loop {
                if let Some((pid, end)) = placed.borrow_and_update().clone()
                    && pid == id
                {
                    break end;
                }
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    r = placed.changed() => if r.is_err() { return Ok(()) },
                }
            };
            last_key = next_key.or(last_key);
            progress.rows_copied += n;
            progress.rows_estimated = progress.rows_estimated.max(progress.rows_copied);
            unacked.push_back(Placed {
                end,
                last_key: last_key.clone(),
                rows_copied: progress.rows_copied,
                done: !more,
            });
            // The next chunk goes on at once; a chunk is recorded once acknowledged, and at most
            // UNACKED chunks wait for that (a crash copies them again).
            let wait_for = if more {
                unacked.len().saturating_sub(UNACKED)
            } else {
                unacked.len()
            };
            let Some(recorded) = acknowledged(&mut unacked, wait_for, &mut acked, &cancel).await
            else {
                return Ok(());
            };
            if let Some(r) = recorded {
                pg::deadline(
                    t,
                    "recording backfill progress",
                    record(&buffer, &o.table, &r),
                )
                .await?;
                progress.done = r.done;
            }
            shared.set_backfill(progress.clone());
            if !more {
                tracing::info!(pipeline = %cfg.name, table = %table, rows = progress.rows_copied, "backfill done");
                break;
            }
        }
    }
    *board.slot() = None;
    cancel.cancelled().await;
    Ok(())
}

/// Writes a watermark into the source's WAL, in a transaction of its own.
async fn emit(
    source: &Client,
    prefix: &str,
    kind: &str,
    id: &str,
    t: Duration,
) -> Result<(), EngineError> {
    let content = format!("{kind} {id}");
    pg::deadline(t, "writing a backfill watermark", async {
        source
            .execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&prefix, &content],
            )
            .await
            .map_err(EngineError::pg(
                "writing a backfill watermark on the source",
            ))
    })
    .await?;
    Ok(())
}

/// The next rows after `after` in key order (at most [`CHUNK_ROWS`] and about [`CHUNK_BYTES`]),
/// in their text form, and whether more may follow.
async fn select_chunk(
    source: &Client,
    layout: &RelationInfo,
    after: Option<&[Option<String>]>,
) -> Result<(Vec<Vec<Option<String>>>, bool), EngineError> {
    let key = layout.key_indexes();
    let cols: Vec<String> = layout.columns.iter().map(|c| ident(c)).collect();
    let key_cols: Vec<String> = key.iter().map(|&i| ident(&layout.columns[i])).collect();
    let filter = match after {
        Some(values) if values.len() == key.len() => {
            let vals: Vec<String> = key
                .iter()
                .zip(values)
                .map(|(&i, v)| match v {
                    Some(v) => format!("{}::{}", literal(v), layout.types[i]),
                    None => "NULL".into(),
                })
                .collect();
            format!("WHERE ({}) > ({})", key_cols.join(", "), vals.join(", "))
        }
        _ => String::new(),
    };
    let sql = format!(
        "SELECT {} FROM {}.{} {filter} ORDER BY {} LIMIT {CHUNK_ROWS}",
        cols.join(", "),
        ident(&layout.schema),
        ident(&layout.name),
        key_cols.join(", ")
    );
    let messages = source
        .simple_query(&sql)
        .await
        .map_err(EngineError::pg(format!(
            "selecting rows of {} to backfill",
            layout.qualified()
        )))?;
    let mut rows = Vec::new();
    let mut bytes = 0usize;
    let mut selected = 0usize;
    for m in &messages {
        if let SimpleQueryMessage::Row(row) = m {
            selected += 1;
            if !rows.is_empty() && bytes >= CHUNK_BYTES {
                continue;
            }
            let r: Vec<Option<String>> = (0..layout.columns.len())
                .map(|i| row.get(i).map(str::to_string))
                .collect();
            bytes += r
                .iter()
                .map(|v| v.as_ref().map_or(0, String::len))
                .sum::<usize>();
            rows.push(r);
        }
    }
    let more = selected == CHUNK_ROWS || rows.len() < selected;
    Ok((rows, more))
}

/// Records a table's backfill progress (fenced by the owner's epoch).
async fn record(buffer: &Buffer, table: &TableName, p: &Placed) -> Result<(), EngineError> {
    let n = buffer
        .client()
        .execute(
            "UPDATE philotes.backfills b SET last_key = $4, rows_copied = $5, done = $6
             WHERE b.pipeline_id = $1 AND b.schema_name = $2 AND b.table_name = $3
               AND ($7::bigint IS NULL OR EXISTS (
                 SELECT 1 FROM philotes.pipelines p WHERE p.pipeline_id = $1 AND p.epoch = $7 FOR SHARE))",
            &[
                &buffer.pipeline_id(),
                &table.schema,
                &table.name,
                &p.last_key,
                &(p.rows_copied as i64),
                &p.done,
                &buffer.epoch(),
            ],
        )
        .await
        .map_err(EngineError::pg("recording backfill progress"))?;
    if n == 0 {
        return Err(buffer.superseded_error().await);
    }
    Ok(())
}

/// A chunk the reader has placed in the stream, not yet recorded.
#[derive(Debug, Clone, PartialEq)]
struct Placed {
    /// End LSN of the transaction it was placed in.
    end: u64,
    /// Where the table's backfill stands once it is in: the last key copied, the rows so far.
    last_key: Option<Vec<Option<String>>>,
    rows_copied: u64,
    done: bool,
}

/// Most chunks placed but not yet acknowledged while the next one is copied.
const UNACKED: usize = 8;

/// Waits until at least `wait_for` of the chunks in `unacked` are acknowledged (their transaction
/// ended at or before `acked`); takes every acknowledged one off, and returns the last of them, the
/// one to record. None: cancelled.
async fn acknowledged(
    unacked: &mut VecDeque<Placed>,
    wait_for: usize,
    acked: &mut watch::Receiver<u64>,
    cancel: &CancellationToken,
) -> Option<Option<Placed>> {
    loop {
        let upto = *acked.borrow_and_update();
        let ready = unacked.iter().take_while(|p| p.end <= upto).count();
        if ready >= wait_for {
            return Some(unacked.drain(..ready).next_back());
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            r = acked.changed() => if r.is_err() { return None },
        }
    }
}

/// The reader's side: which keys of the table being backfilled changed between the watermarks.
#[derive(Debug, Default)]
pub struct Window {
    pub id: String,
    pub oid: u32,
    pub seen: HashSet<Vec<u8>>,
    /// The table was truncated: no row of the chunk is current.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_encode_alike_from_a_chunk_and_from_the_stream() {
        let layout = RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["a".into(), "v".into(), "b".into()],
            vec!["int".into(), "text".into(), "text".into()],
            vec![true, false, true],
        );
        let chunk = Chunk {
            layout,
            rows: vec![],
        };
        let row = vec![Some("1".to_string()), Some("x".into()), Some("ab".into())];
        let streamed = encode_key([Some(&b"1"[..]), Some(&b"ab"[..])].into_iter());
        assert_eq!(chunk.key_of(&row), streamed);
        // Length prefixes keep ("1", "ab") apart from ("1a", "b").
        let other = encode_key([Some(&b"1a"[..]), Some(&b"b"[..])].into_iter());
        assert_ne!(streamed, other);
    }

    #[test]
    fn only_this_pipelines_watermarks_count() {
        let board = Board::new("p1");
        let p = prefix("p1");
        assert_eq!(board.watermark(&p, b"low 7-1"), Some((true, "7-1")));
        assert_eq!(board.watermark(&p, b"high 7-1"), Some((false, "7-1")));
        assert_eq!(board.watermark(&prefix("p2"), b"low 7-1"), None);
        assert_eq!(board.watermark(&p, b"other"), None);
        assert_eq!(board.opened("7-1"), None);
    }
}
