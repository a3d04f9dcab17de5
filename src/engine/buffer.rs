//! The durable buffer in schema `philotes`: events written with binary COPY, the source position
//! acknowledged only after the buffer transaction that holds it commits, and the sink progress.

use std::collections::HashMap;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, pin_mut};
use tokio::sync::OnceCell;
use tokio_postgres::{Client, Statement};

use super::config::ConnString;
use super::error::EngineError;
use super::event::{Event, Op, Position, RelationInfo, Row};
use super::pg;
use super::wide::{WIDE_BYTES, WideGate};

/// Bytes per message of a wide row read back from the buffer.
const WIDE_CHUNK: usize = 1 << 20;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates schema `philotes` and applies the migrations in `migrations/` (idempotent; serialised by an
/// advisory lock so that pipelines starting together do not race).
pub async fn migrate(uri: &ConnString) -> Result<(), EngineError> {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let target = uri.to_string();
    let err = move |e: sqlx::Error| EngineError::Migrate(format!("buffer database {target}: {e}"));
    let opts = sqlx::postgres::PgConnectOptions::from_str(&uri.sqlx_uri()?)
        .map_err(err.clone())?
        .options([("search_path", "philotes")])
        .application_name("philotes-migrate")
        .disable_statement_logging();
    let mut conn = opts.connect().await.map_err(err.clone())?;
    sqlx::query("SELECT pg_advisory_lock(7426001)")
        .execute(&mut conn)
        .await
        .map_err(err.clone())?;
    let result = async {
        // Created only when missing: a buffer user that owns schema philotes needs no CREATE on the
        // database.
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'philotes')",
        )
        .fetch_one(&mut conn)
        .await
        .map_err(err.clone())?;
        if !exists {
            sqlx::query("CREATE SCHEMA IF NOT EXISTS philotes")
                .execute(&mut conn)
                .await
                .map_err(err.clone())?;
        }
        MIGRATOR
            .run_direct(None, &mut conn, false)
            .await
            .map_err(|e| err(e.into()))
    }
    .await;
    let _ = sqlx::query("SELECT pg_advisory_unlock(7426001)")
        .execute(&mut conn)
        .await;
    let _ = conn.close().await;
    result
}

/// Events read from the buffer, and whether they are all the durable events after the position read
/// from (the read stopped at neither its row limit nor its byte cap).
#[derive(Debug, Default)]
pub struct Read {
    pub events: Vec<Event>,
    pub complete: bool,
}

/// Where a pipeline stands in the buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// End LSN of the last source transaction wholly in the buffer.
    pub durable_lsn: u64,
    /// Last event delivered to the sink.
    pub processed: Position,
}

/// What the pipeline created on the source, kept so that delete drops only those.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    pub slot_name: String,
    pub publication_name: String,
    pub slot_created: bool,
    pub publication_created: bool,
}

pub struct Buffer {
    client: Client,
    pipeline_id: String,
    /// The ownership epoch this connection writes under ([`Buffer::take`]); None for tools that
    /// do not write as an owner.
    epoch: Option<i64>,
    /// `read_batch`'s statement, prepared on first use.
    read_stmt: OnceCell<Statement>,
    /// The processor's: a wide row is read only with a pass (see `engine::wide`), held until
    /// [`release_wide`](Self::release_wide) is told the row is delivered.
    wide: Option<WideGate>,
}

/// Rows of `COPY philotes.events (...) FROM STDIN BINARY`, encoded straight from the values' bytes as
/// they arrived from the source (no per-value allocation). Column order: pipeline_id, lsn, ord,
/// commit_time, rel_ver, op, old_key, vals, unchanged, size. `size` (the row's encoded bytes, what
/// reads of the buffer are capped by) comes last: it is written when the row is complete, at the next
/// [`begin_row`](Self::begin_row) or when the rows are taken. A wide value can be kept as a slice of
/// the message it came in ([`text_array_in`](Self::text_array_in)) instead of a copy.
#[derive(Debug, Default)]
pub struct CopyRows {
    data: BytesMut,
    /// What was encoded before `data`, in order: wide values shared with their messages, and the
    /// bytes between them.
    done: Vec<Bytes>,
    done_len: usize,
    rows: usize,
    last: Option<Position>,
    /// Where (counted from the first row) the row still lacking its size field starts.
    open: Option<usize>,
}

/// The binary COPY signature, flags and header extension length.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
const TEXT_OID: i32 = 25;
/// What a row holds besides its values, and more: reserved with a wide value.
const ROW_SLACK: usize = 64 << 10;
const INT2_OID: i32 = 21;

impl CopyRows {
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Encoded size so far, bytes.
    pub fn bytes(&self) -> usize {
        self.done_len + self.data.len()
    }

    /// Position of the last row.
    pub fn last(&self) -> Option<Position> {
        self.last
    }

    /// The encoded rows, to be read back with [`decode_rows`] (one copy when values are shared).
    pub fn into_bytes(mut self) -> Bytes {
        self.seal();
        if self.done.is_empty() {
            return self.data.freeze();
        }
        self.to_bytes()
    }

    /// The encoded rows (a copy), to be read back with [`decode_rows`].
    pub fn to_bytes(&mut self) -> Bytes {
        self.seal();
        let mut b = BytesMut::with_capacity(self.bytes());
        self.done.iter().for_each(|d| b.put_slice(d));
        b.put_slice(&self.data);
        b.freeze()
    }

    /// The encoded rows in order, wide values still shared with their messages.
    fn into_parts(mut self) -> Vec<Bytes> {
        self.seal();
        let mut parts = self.done;
        parts.push(self.data.freeze());
        parts
    }

    /// Completes the last row with its size field.
    fn seal(&mut self) {
        if let Some(start) = self.open.take() {
            let size = (self.bytes() + 8 - start) as i32;
            self.data.put_i32(4);
            self.data.put_i32(size);
        }
    }

    /// Starts a row with its scalar columns; then exactly three array columns follow (old_key, vals,
    /// unchanged), each with [`text_array`](Self::text_array), [`int2_array`](Self::int2_array) or
    /// [`null`](Self::null).
    pub fn begin_row(
        &mut self,
        pipeline_id: &str,
        pos: Position,
        commit_time: i64,
        rel_ver: i64,
        op: Op,
    ) {
        self.seal();
        self.open = Some(self.bytes());
        let d = &mut self.data;
        d.reserve(64 + pipeline_id.len());
        d.put_i16(10);
        d.put_i32(pipeline_id.len() as i32);
        d.put_slice(pipeline_id.as_bytes());
        d.put_i32(8);
        d.put_i64(pos.lsn as i64);
        d.put_i32(4);
        d.put_i32(pos.ord);
        d.put_i32(8);
        d.put_i64(commit_time);
        d.put_i32(8);
        d.put_i64(rel_ver);
        d.put_i32(1);
        d.put_u8(op.code() as u8);
        self.rows += 1;
        self.last = Some(pos);
    }

    pub fn null(&mut self) {
        self.data.put_i32(-1);
    }

    /// A one-dimensional `text[]` (`None` elements are NULL).
    pub fn text_array<'a>(&mut self, items: impl IntoIterator<Item = Option<&'a [u8]>>) {
        let d = &mut self.data;
        let field = d.len();
        d.put_i32(0); // field length, patched below
        d.put_i32(1); // dimensions
        let flags = d.len();
        d.put_i32(0); // has NULLs, patched below
        d.put_i32(TEXT_OID);
        let dim = d.len();
        d.put_i32(0); // elements, patched below
        d.put_i32(1); // lower bound
        let (mut n, mut nulls) = (0i32, false);
        for item in items {
            match item {
                Some(v) => {
                    // Room for the rest of the row too: growing past a wide value doubles it.
                    if v.len() > ROW_SLACK {
                        d.reserve(4 + v.len() + ROW_SLACK);
                    }
                    d.put_i32(v.len() as i32);
                    d.put_slice(v);
                }
                None => {
                    d.put_i32(-1);
                    nulls = true;
                }
            }
            n += 1;
        }
        let len = (d.len() - field - 4) as i32;
        d[field..field + 4].copy_from_slice(&len.to_be_bytes());
        d[flags..flags + 4].copy_from_slice(&(nulls as i32).to_be_bytes());
        d[dim..dim + 4].copy_from_slice(&n.to_be_bytes());
    }

    /// [`text_array`](Self::text_array) of values that are slices of `msg`: when `msg` is wide, the
    /// values over [`ROW_SLACK`] are kept as slices of it, not copied (the message is then held until
    /// the rows are dropped, and counts against the replication budget until then).
    pub fn text_array_in<'a>(
        &mut self,
        msg: &Bytes,
        items: impl IntoIterator<Item = Option<&'a [u8]>>,
    ) {
        if msg.len() <= WIDE_BYTES {
            return self.text_array(items);
        }
        let items: Vec<Option<&[u8]>> = items.into_iter().collect();
        let len: usize = 20
            + items
                .iter()
                .map(|v| 4 + v.map_or(0, <[u8]>::len))
                .sum::<usize>();
        let d = &mut self.data;
        d.put_i32(len as i32);
        d.put_i32(1);
        d.put_i32(items.iter().any(Option::is_none) as i32);
        d.put_i32(TEXT_OID);
        d.put_i32(items.len() as i32);
        d.put_i32(1);
        let within = |v: &[u8]| {
            let (m, v) = (msg.as_ptr_range(), v.as_ptr_range());
            m.start <= v.start && v.end <= m.end
        };
        for item in items {
            match item {
                Some(v) if v.len() > ROW_SLACK && within(v) => {
                    self.data.put_i32(v.len() as i32);
                    let before = self.data.split().freeze();
                    let value = msg.slice_ref(v);
                    self.done_len += before.len() + value.len();
                    self.done.extend([before, value]);
                }
                Some(v) => {
                    self.data.put_i32(v.len() as i32);
                    self.data.put_slice(v);
                }
                None => self.data.put_i32(-1),
            }
        }
    }

    /// A one-dimensional `smallint[]`.
    pub fn int2_array(&mut self, items: &[i16]) {
        let d = &mut self.data;
        d.put_i32(20 + 6 * items.len() as i32);
        d.put_i32(1);
        d.put_i32(0);
        d.put_i32(INT2_OID);
        d.put_i32(items.len() as i32);
        d.put_i32(1);
        for i in items {
            d.put_i32(2);
            d.put_i16(*i);
        }
    }

    /// Encodes a whole [`Event`].
    pub fn push_event(&mut self, pipeline_id: &str, e: &Event) {
        self.begin_row(pipeline_id, e.pos, e.commit_time, e.rel_ver, e.op);
        for row in [&e.old_key, &e.vals] {
            match row {
                Some(r) => self.text_array(r.iter().map(|v| v.as_deref().map(str::as_bytes))),
                None => self.null(),
            }
        }
        match &e.unchanged {
            Some(u) => self.int2_array(u),
            None => self.null(),
        }
    }
}

fn malformed() -> EngineError {
    EngineError::Protocol("malformed buffer rows".into())
}

/// Reads a field of binary COPY: its bytes, or None for NULL.
fn field<'a>(data: &'a [u8], pos: &mut usize) -> Result<Option<&'a [u8]>, EngineError> {
    let len = i32::from_be_bytes(
        data.get(*pos..*pos + 4)
            .ok_or_else(malformed)?
            .try_into()
            .map_err(|_| malformed())?,
    );
    *pos += 4;
    if len < 0 {
        return Ok(None);
    }
    let v = data.get(*pos..*pos + len as usize).ok_or_else(malformed)?;
    *pos += len as usize;
    Ok(Some(v))
}

fn be<const N: usize>(v: Option<&[u8]>) -> Result<[u8; N], EngineError> {
    v.and_then(|v| v.try_into().ok()).ok_or_else(malformed)
}

/// Elements of a one-dimensional binary array (an empty array has no dimension).
fn array_items(v: &[u8]) -> Result<Vec<Option<&[u8]>>, EngineError> {
    let int =
        |at: usize| -> Result<i32, EngineError> { Ok(i32::from_be_bytes(be(v.get(at..at + 4))?)) };
    let dims = int(0)?;
    if dims == 0 {
        return Ok(Vec::new());
    }
    if dims != 1 {
        return Err(malformed());
    }
    let n = int(12)?.max(0) as usize;
    let mut pos = 20;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(field(v, &mut pos)?);
    }
    Ok(out)
}

fn text_row(v: Option<&[u8]>) -> Result<Option<Row>, EngineError> {
    v.map(|v| {
        array_items(v)?
            .into_iter()
            .map(|e| {
                e.map(|b| {
                    String::from_utf8(b.to_vec())
                        .map_err(|_| EngineError::Protocol("a buffered value is not UTF-8".into()))
                })
                .transpose()
            })
            .collect()
    })
    .transpose()
}

/// Reads back rows made by [`CopyRows`], as the events they hold.
pub fn decode_rows(data: &[u8]) -> Result<Vec<Event>, EngineError> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let n = i16::from_be_bytes(be(data.get(pos..pos + 2))?);
        pos += 2;
        if n != 10 {
            return Err(malformed());
        }
        let _pipeline_id = field(data, &mut pos)?;
        let lsn = i64::from_be_bytes(be(field(data, &mut pos)?)?);
        let ord = i32::from_be_bytes(be(field(data, &mut pos)?)?);
        let commit_time = i64::from_be_bytes(be(field(data, &mut pos)?)?);
        let rel_ver = i64::from_be_bytes(be(field(data, &mut pos)?)?);
        let code = be::<1>(field(data, &mut pos)?)?[0] as i8;
        let old_key = text_row(field(data, &mut pos)?)?;
        let vals = text_row(field(data, &mut pos)?)?;
        let unchanged = field(data, &mut pos)?
            .map(|v| {
                array_items(v)?
                    .into_iter()
                    .map(|e| Ok(i16::from_be_bytes(be(e)?)))
                    .collect::<Result<Vec<i16>, EngineError>>()
            })
            .transpose()?;
        let _size = field(data, &mut pos)?;
        out.push(Event {
            pos: Position {
                lsn: lsn as u64,
                ord,
            },
            commit_time,
            rel_ver,
            op: Op::from_code(code).ok_or_else(malformed)?,
            old_key,
            vals,
            unchanged,
        });
    }
    Ok(out)
}

/// Commits `tx` if `epoch` (when given) still owns the pipeline; otherwise rolls it back and says
/// who does.
async fn fenced_commit(
    epoch: Option<i64>,
    pipeline_id: &str,
    tx: tokio_postgres::Transaction<'_>,
) -> Result<(), EngineError> {
    if let Some(ours) = epoch {
        let held = tx
            .query_opt(
                "SELECT owner, epoch FROM philotes.pipelines WHERE pipeline_id = $1 FOR SHARE",
                &[&pipeline_id],
            )
            .await
            .map_err(EngineError::pg("checking the pipeline's owner"))?;
        let (owner, epoch) = held.map_or((String::new(), -1), |r| {
            (r.get::<_, Option<String>>(0).unwrap_or_default(), r.get(1))
        });
        if epoch != ours {
            return Err(EngineError::Superseded { owner, epoch, ours });
        }
    }
    tx.commit()
        .await
        .map_err(EngineError::pg("committing a buffer transaction"))
}

impl Buffer {
    pub async fn connect(
        uri: &ConnString,
        pipeline_id: &str,
        purpose: &str,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            client: pg::connect(uri, purpose).await?,
            pipeline_id: pipeline_id.to_string(),
            epoch: None,
            read_stmt: OnceCell::new(),
            wide: None,
        })
    }

    /// Reads a wide row only with a pass of `gate` (the processor's buffer).
    pub fn with_wide_gate(mut self, gate: WideGate) -> Self {
        self.wide = Some(gate);
        self
    }

    /// The rows up to `upto` are delivered: a wide row's pass among them is given back.
    pub fn release_wide(&self, upto: Position) {
        if let Some(gate) = &self.wide {
            gate.release(upto);
        }
    }

    pub fn pipeline_id(&self) -> &str {
        &self.pipeline_id
    }

    /// Takes the pipeline for `owner`: raises its epoch (creating its row when new: a snapshot is
    /// then owed when `snapshot` is asked for) and writes under the new epoch from now on. Every
    /// write of an earlier owner fails from the moment this commits; one in flight is waited for.
    pub async fn take(
        &mut self,
        name: &str,
        owner: &str,
        snapshot: bool,
    ) -> Result<i64, EngineError> {
        let row = self
            .client
            .query_one(
                "INSERT INTO philotes.pipelines AS p (pipeline_id, name, epoch, owner, snapshot_done)
                 VALUES ($1, $2, 1, $3, NOT $4)
                 ON CONFLICT (pipeline_id) DO UPDATE SET epoch = p.epoch + 1, owner = $3, updated_at = now()
                 RETURNING epoch",
                &[&self.pipeline_id, &name, &owner, &snapshot],
            )
            .await
            .map_err(EngineError::pg("taking the pipeline in the buffer"))?;
        let epoch: i64 = row.get(0);
        self.epoch = Some(epoch);
        Ok(epoch)
    }

    /// Goes on under `epoch`, taken by an earlier session of the same worker: fails with
    /// [`EngineError::Superseded`] when another owner has taken the pipeline since.
    pub async fn resume(&mut self, epoch: i64) -> Result<(), EngineError> {
        let row = self
            .client
            .query_opt(
                "SELECT epoch FROM philotes.pipelines WHERE pipeline_id = $1",
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading the pipeline's owner"))?;
        if row.is_some_and(|r| r.get::<_, i64>(0) == epoch) {
            self.epoch = Some(epoch);
            return Ok(());
        }
        Err(self.superseded(epoch).await)
    }

    /// Writes under `epoch` (taken by another connection of the same owner).
    pub fn with_epoch(mut self, epoch: i64) -> Self {
        self.epoch = Some(epoch);
        self
    }

    pub fn epoch(&self) -> Option<i64> {
        self.epoch
    }

    /// The error for a write refused under this connection's epoch.
    pub async fn superseded_error(&self) -> EngineError {
        self.superseded(self.epoch.unwrap_or(0)).await
    }

    /// The error for a write refused under `ours`: who holds the pipeline now.
    async fn superseded(&self, ours: i64) -> EngineError {
        let row = self
            .client
            .query_opt(
                "SELECT owner, epoch FROM philotes.pipelines WHERE pipeline_id = $1",
                &[&self.pipeline_id],
            )
            .await;
        let (owner, epoch) = match row {
            Ok(Some(r)) => (
                r.get::<_, Option<String>>(0).unwrap_or_default(),
                r.get::<_, i64>(1),
            ),
            _ => ("another process (or a delete)".into(), -1),
        };
        EngineError::Superseded { owner, epoch, ours }
    }

    /// Records the pipeline and what it owns; a `created` flag once true stays true.
    pub async fn register(&self, name: &str, own: &Ownership) -> Result<Ownership, EngineError> {
        let row = self
            .client
            .query_one(
                "INSERT INTO philotes.pipelines AS p (pipeline_id, name, slot_name, publication_name, slot_created, publication_created)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (pipeline_id) DO UPDATE SET name = $2, slot_name = $3, publication_name = $4,
                   slot_created = (p.slot_created AND p.slot_name = $3) OR $5,
                   publication_created = (p.publication_created AND p.publication_name = $4) OR $6,
                   updated_at = now()
                 RETURNING slot_created, publication_created",
                &[&self.pipeline_id, &name, &own.slot_name, &own.publication_name, &own.slot_created, &own.publication_created],
            )
            .await
            .map_err(EngineError::pg("registering the pipeline in the buffer"))?;
        Ok(Ownership {
            slot_created: row.get(0),
            publication_created: row.get(1),
            ..own.clone()
        })
    }

    pub async fn ownership(&self) -> Result<Option<Ownership>, EngineError> {
        let row = self
            .client
            .query_opt(
                "SELECT slot_name, publication_name, slot_created, publication_created FROM philotes.pipelines WHERE pipeline_id = $1",
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading the pipeline row"))?;
        Ok(row.map(|r| Ownership {
            slot_name: r.get::<_, Option<String>>(0).unwrap_or_default(),
            publication_name: r.get::<_, Option<String>>(1).unwrap_or_default(),
            slot_created: r.get(2),
            publication_created: r.get(3),
        }))
    }

    pub async fn checkpoint(&self) -> Result<Checkpoint, EngineError> {
        let row = self
            .client
            .query_one(
                "SELECT durable_lsn, processed_lsn, processed_ord FROM philotes.pipelines WHERE pipeline_id = $1",
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading the buffer checkpoint"))?;
        Ok(Checkpoint {
            durable_lsn: row.get::<_, i64>(0) as u64,
            processed: Position {
                lsn: row.get::<_, i64>(1) as u64,
                ord: row.get(2),
            },
        })
    }

    /// Position of the newest event in the buffer.
    pub async fn last_position(&self) -> Result<Option<Position>, EngineError> {
        let row = self
            .client
            .query_opt(
                "SELECT lsn, ord FROM philotes.events WHERE pipeline_id = $1 ORDER BY lsn DESC, ord DESC LIMIT 1",
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading the newest buffered event"))?;
        Ok(row.map(|r| Position {
            lsn: r.get::<_, i64>(0) as u64,
            ord: r.get(1),
        }))
    }

    /// Drops rows of a transaction whose commit never reached the buffer (the reader stopped inside it);
    /// the source sends that transaction again. Rows are keyed by their transaction's commit LSN and
    /// the durable position is the previous commit's end LSN, which the next commit record may start
    /// at: so a row at exactly `durable_lsn` belongs to an incomplete transaction.
    pub async fn discard_incomplete(&mut self, durable_lsn: u64) -> Result<u64, EngineError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(EngineError::pg("starting a buffer transaction"))?;
        let n = tx
            .execute(
                "DELETE FROM philotes.events WHERE pipeline_id = $1 AND lsn >= $2",
                &[&self.pipeline_id, &(durable_lsn as i64)],
            )
            .await
            .map_err(EngineError::pg(
                "discarding an incomplete transaction from the buffer",
            ))?;
        fenced_commit(self.epoch, &self.pipeline_id, tx).await?;
        Ok(n)
    }

    /// Writes relations and events in one transaction with binary COPY, and moves the durable position
    /// to `durable_lsn` when given. A transaction read again after a restart was first removed by
    /// `discard_incomplete`, so it is stored once.
    pub async fn write(
        &mut self,
        relations: &[RelationInfo],
        rows: CopyRows,
        durable_lsn: Option<u64>,
    ) -> Result<(), EngineError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(EngineError::pg("starting a buffer transaction"))?;
        if let Some(ours) = self.epoch {
            let held = tx
                .query_opt(
                    "SELECT 1 FROM philotes.pipelines WHERE pipeline_id = $1 AND epoch = $2 FOR SHARE",
                    &[&self.pipeline_id, &ours],
                )
                .await
                .map_err(EngineError::pg("checking the pipeline's owner"))?;
            if held.is_none() {
                drop(tx);
                return Err(self.superseded(ours).await);
            }
        }
        for r in relations {
            tx.execute(
                "INSERT INTO philotes.relations (pipeline_id, rel_ver, schema_name, table_name, columns, types, key_columns)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[&self.pipeline_id, &r.rel_ver, &r.schema, &r.name, &r.columns, &r.types, &r.key],
            )
            .await
            .map_err(EngineError::pg("writing a relation to the buffer"))?;
        }
        if !rows.is_empty() {
            let sink = tx
                .copy_in::<_, Bytes>(
                    "COPY philotes.events (pipeline_id, lsn, ord, commit_time, rel_ver, op, old_key, vals, unchanged, size) FROM STDIN BINARY",
                )
                .await
                .map_err(EngineError::pg("starting COPY into the buffer"))?;
            pin_mut!(sink);
            let err = |e| EngineError::pg("writing events to the buffer")(e);
            sink.as_mut()
                .feed(Bytes::from_static(COPY_HEADER))
                .await
                .map_err(err)?;
            // Chunks (slices, no copies), so that the server starts on the rows while the rest is
            // on its way, and the connection's write buffer stays small for wide values.
            let trailer = Bytes::from_static(&[0xff, 0xff]);
            for mut data in rows.into_parts().into_iter().chain([trailer]) {
                while !data.is_empty() {
                    let n = data.len().min(256 * 1024);
                    sink.as_mut().feed(data.split_to(n)).await.map_err(err)?;
                }
            }
            sink.as_mut()
                .finish()
                .await
                .map_err(EngineError::pg("finishing COPY into the buffer"))?;
        }
        if let Some(lsn) = durable_lsn {
            tx.execute(
                "UPDATE philotes.pipelines SET durable_lsn = GREATEST(durable_lsn, $2), updated_at = now() WHERE pipeline_id = $1",
                &[&self.pipeline_id, &(lsn as i64)],
            )
            .await
            .map_err(EngineError::pg("moving the buffer checkpoint"))?;
        }
        crate::engine::failpoint::crash_point("buffer-before-commit");
        tx.commit()
            .await
            .map_err(EngineError::pg("committing a buffer transaction"))
    }

    /// Events after `after` whose transactions are durable (commit LSN before `durable_lsn`), in
    /// order: at most `limit`, and no more than the first that reaches `max_bytes` of encoded size.
    pub async fn read_batch(
        &self,
        after: Position,
        durable_lsn: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Read, EngineError> {
        // A custom plan for each call, with the table's statistics lagging behind a fast-growing
        // backlog, turns to a bitmap scan that sorts the whole backlog for every batch. The generic
        // plan walks the primary key in order and stops after `limit` rows; the running sum of sizes
        // follows that order without a sort.
        let stmt = self
            .read_stmt
            .get_or_try_init(|| async {
                self.client
                    .batch_execute("SET plan_cache_mode = force_generic_plan")
                    .await?;
                self.client
                    .prepare(
                        "SELECT lsn, ord, commit_time, rel_ver, op,
                           CASE WHEN size > $7 THEN NULL ELSE old_key END,
                           CASE WHEN size > $7 THEN NULL ELSE vals END, unchanged, size, size > $7,
                           old_key IS NULL, vals IS NULL FROM (
                           SELECT lsn, ord, commit_time, rel_ver, op, old_key, vals, unchanged, size,
                             sum(size) OVER (ORDER BY lsn, ord ROWS UNBOUNDED PRECEDING) AS upto
                           FROM philotes.events
                           WHERE pipeline_id = $1 AND (lsn, ord) > ($2, $3) AND lsn < $4
                           ORDER BY lsn, ord LIMIT $5) e
                         WHERE upto - size < $6",
                    )
                    .await
            })
            .await
            .map_err(EngineError::pg("preparing to read events from the buffer"))?;
        let mut rows = self
            .client
            .query(
                stmt,
                &[
                    &self.pipeline_id,
                    &(after.lsn as i64),
                    &after.ord,
                    &(durable_lsn as i64),
                    &(limit as i64),
                    &(max_bytes as i64),
                    &(WIDE_BYTES as i32),
                ],
            )
            .await
            .map_err(EngineError::pg("reading events from the buffer"))?;
        // A wide row's values are withheld: the rows before it now; the row alone next, with a
        // pass (the processor's), its values read in chunks.
        let first_wide = rows.iter().position(|r| r.get::<_, bool>(9));
        let mut wide = None;
        if let Some(i) = first_wide.filter(|&i| i > 0) {
            rows.truncate(i);
        } else if first_wide == Some(0) {
            rows.truncate(1);
            let r = &rows[0];
            let pos = Position {
                lsn: r.get::<_, i64>(0) as u64,
                ord: r.get(1),
            };
            if let Some(gate) = &self.wide
                && !gate.holds()
            {
                let pass = gate.enter().await;
                gate.hold(pos, pass, r.get::<_, i32>(8).max(0) as usize);
            }
            let (old_key, vals) = self
                .read_wide(pos, r.get::<_, bool>(10), r.get::<_, bool>(11))
                .await?;
            wide = Some((old_key, vals));
        }
        let bytes: i64 = rows.iter().map(|r| r.get::<_, i32>(8) as i64).sum();
        // Each row is dropped once decoded: a wide one is not held twice.
        let events = rows
            .into_iter()
            .map(|r| {
                let code: i8 = r.get(4);
                // The wide row (alone in the read) has its values read in chunks.
                let (old_key, vals) = wide
                    .take()
                    .unwrap_or_else(|| (r.get::<_, Option<Row>>(5), r.get::<_, Option<Row>>(6)));
                Ok(Event {
                    pos: Position {
                        lsn: r.get::<_, i64>(0) as u64,
                        ord: r.get(1),
                    },
                    commit_time: r.get(2),
                    rel_ver: r.get(3),
                    op: Op::from_code(code).ok_or_else(|| {
                        EngineError::Protocol(format!("unknown op code {code} in the buffer"))
                    })?,
                    old_key,
                    vals,
                    unchanged: r.get::<_, Option<Vec<i16>>>(7),
                })
            })
            .collect::<Result<Vec<Event>, EngineError>>()?;
        // Had there been another event within the limit, it would have started below the cap.
        // The read stopped at a wide row (withheld, or read alone): rows may follow it.
        let complete = first_wide.is_none() && events.len() < limit && bytes < max_bytes as i64;
        Ok(Read { events, complete })
    }

    /// Whether the buffer holds a later row of the (durable) source transaction of `last`.
    pub async fn txn_continues(&self, last: Position) -> Result<bool, EngineError> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM philotes.events WHERE pipeline_id = $1 AND lsn = $2 AND ord > $3)",
                &[&self.pipeline_id, &(last.lsn as i64), &last.ord],
            )
            .await
            .map_err(EngineError::pg("looking up the rest of a transaction in the buffer"))?;
        Ok(row.get(0))
    }

    /// The key and values of the wide row at `pos`, read in chunks of [`WIDE_CHUNK`] bytes so
    /// that no message of the connection is larger (its buffer would grow to the row's size and
    /// stay so). Each value is then held once, in the `String` it is built in.
    async fn read_wide(
        &self,
        pos: Position,
        no_old_key: bool,
        no_vals: bool,
    ) -> Result<(Option<Row>, Option<Row>), EngineError> {
        let pg_err = || EngineError::pg("reading a wide event from the buffer");
        // Materialized once: each chunk is a slice of the value's bytes, not a new scan of it.
        let chunks = self
            .client
            .query_raw(
                "WITH v AS MATERIALIZED (
                   SELECT 0 AS which, n, convert_to(x, 'UTF8') AS b
                     FROM philotes.events, unnest(old_key) WITH ORDINALITY u(x, n)
                    WHERE pipeline_id = $1 AND lsn = $2 AND ord = $3
                   UNION ALL
                   SELECT 1, n, convert_to(x, 'UTF8')
                     FROM philotes.events, unnest(vals) WITH ORDINALITY u(x, n)
                    WHERE pipeline_id = $1 AND lsn = $2 AND ord = $3)
                 SELECT which, n, k, length(b), substring(b FROM k * $4 + 1 FOR $4)
                   FROM v, generate_series(0, greatest((coalesce(length(b), 0) + $4 - 1) / $4 - 1, 0)) k
                  ORDER BY which, n, k",
                [
                    &self.pipeline_id as &(dyn tokio_postgres::types::ToSql + Sync),
                    &(pos.lsn as i64),
                    &pos.ord,
                    &(WIDE_CHUNK as i32),
                ],
            )
            .await
            .map_err(pg_err())?;
        futures::pin_mut!(chunks);
        let mut rows: [Vec<Option<Vec<u8>>>; 2] = [Vec::new(), Vec::new()];
        while let Some(r) = futures::TryStreamExt::try_next(&mut chunks)
            .await
            .map_err(pg_err())?
        {
            let (which, k): (i32, i32) = (r.get(0), r.get(2));
            let row = &mut rows[usize::from(which == 1)];
            let chunk: Option<&[u8]> = r.get(4);
            match (k, chunk) {
                (0, None) => row.push(None),
                (0, Some(c)) => {
                    let len = r.get::<_, Option<i32>>(3).unwrap_or(0).max(0) as usize;
                    let mut v = Vec::with_capacity(len);
                    v.extend_from_slice(c);
                    row.push(Some(v));
                }
                (_, c) => {
                    if let (Some(Some(v)), Some(c)) = (row.last_mut(), c) {
                        v.extend_from_slice(c);
                    }
                }
            }
        }
        let text = |row: Vec<Option<Vec<u8>>>| -> Result<Row, EngineError> {
            row.into_iter()
                .map(|v| {
                    v.map(String::from_utf8).transpose().map_err(|e| {
                        EngineError::Protocol(format!(
                            "a wide value in the buffer is not UTF-8: {e}"
                        ))
                    })
                })
                .collect()
        };
        let [old_key, vals] = rows;
        Ok((
            (!no_old_key).then(|| text(old_key)).transpose()?,
            (!no_vals).then(|| text(vals)).transpose()?,
        ))
    }

    /// Records that everything up to `upto` is in the sink. The commit does not wait for its WAL to
    /// reach disk: losing it in a crash only means the last batches are applied again, which the
    /// idempotent sink makes harmless. (Waiting would mean waiting for the buffer writer's WAL too:
    /// a flush covers everything written before it.)
    /// Under an epoch, only while it owns the pipeline.
    pub async fn mark_processed(&self, upto: Position) -> Result<(), EngineError> {
        let fence = self
            .epoch
            .map_or(String::new(), |e| format!(" AND epoch = {e}"));
        let replies = self
            .client
            .simple_query(&format!(
                "BEGIN; SET LOCAL synchronous_commit = off; \
                 UPDATE philotes.pipelines SET processed_lsn = {}, processed_ord = {}, updated_at = now() WHERE pipeline_id = {}{fence}; \
                 COMMIT",
                upto.lsn as i64,
                upto.ord,
                pg::literal(&self.pipeline_id)
            ))
            .await
            .map_err(EngineError::pg("marking a batch processed"))?;
        // BEGIN, SET, UPDATE n, COMMIT: the UPDATE's count says whether the epoch still owns it.
        let updated = replies
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::CommandComplete(n) => Some(*n),
                _ => None,
            })
            .nth(2);
        match (self.epoch, updated) {
            (Some(ours), Some(0)) => Err(self.superseded(ours).await),
            _ => Ok(()),
        }
    }

    /// Durable events not yet delivered.
    pub async fn depth(&self, cp: &Checkpoint) -> Result<i64, EngineError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM philotes.events WHERE pipeline_id = $1 AND (lsn, ord) > ($2, $3) AND lsn < $4",
                &[&self.pipeline_id, &(cp.processed.lsn as i64), &cp.processed.ord, &(cp.durable_lsn as i64)],
            )
            .await
            .map_err(EngineError::pg("counting buffered events"))?;
        Ok(row.get(0))
    }

    pub async fn relations(&self) -> Result<HashMap<i64, RelationInfo>, EngineError> {
        let rows = self
            .client
            .query(
                "SELECT rel_ver, schema_name, table_name, columns, types, key_columns FROM philotes.relations WHERE pipeline_id = $1",
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading relations from the buffer"))?;
        Ok(rows
            .iter()
            .map(|r| {
                let info = RelationInfo {
                    rel_ver: r.get(0),
                    schema: r.get(1),
                    name: r.get(2),
                    columns: r.get(3),
                    types: r.get(4),
                    key: r.get(5),
                };
                (info.rel_ver, info)
            })
            .collect())
    }

    /// Deletes up to `limit` delivered events older than `retention`, and dead letters older than
    /// `dlq_retention`; returns how many events went. Called again while it returns `limit`, so that no
    /// statement runs long.
    pub async fn cleanup(
        &self,
        retention: Duration,
        dlq_retention: Duration,
        limit: i64,
    ) -> Result<u64, EngineError> {
        let cp = self.checkpoint().await?;
        let n = self
            .client
            .execute(
                "DELETE FROM philotes.events WHERE ctid = ANY(ARRAY(
                   SELECT ctid FROM philotes.events WHERE pipeline_id = $1 AND (lsn, ord) <= ($2, $3)
                     AND buffered_at < now() - make_interval(secs => $4) LIMIT $5))",
                &[
                    &self.pipeline_id,
                    &(cp.processed.lsn as i64),
                    &cp.processed.ord,
                    &retention.as_secs_f64(),
                    &limit,
                ],
            )
            .await
            .map_err(EngineError::pg("cleaning up processed events"))?;
        self.client
            .execute(
                "DELETE FROM philotes.dead_letters WHERE pipeline_id = $1 AND dead_at < now() - make_interval(secs => $2)",
                &[&self.pipeline_id, &dlq_retention.as_secs_f64()],
            )
            .await
            .map_err(EngineError::pg("cleaning up old dead letters"))?;
        Ok(n)
    }

    pub fn client(&self) -> &Client {
        &self.client
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::types::{ToSql, Type};

    /// The field as postgres-types encodes it (what BinaryCopyInWriter sends): length, then bytes.
    fn field<T: ToSql>(v: &T, ty: &Type) -> Vec<u8> {
        let mut b = BytesMut::new();
        match v.to_sql_checked(ty, &mut b).unwrap() {
            tokio_postgres::types::IsNull::Yes => (-1i32).to_be_bytes().to_vec(),
            tokio_postgres::types::IsNull::No => {
                let mut out = (b.len() as i32).to_be_bytes().to_vec();
                out.extend_from_slice(&b);
                out
            }
        }
    }

    #[test]
    fn copy_rows_match_postgres_types_encoding() {
        let e = Event {
            pos: Position {
                lsn: 0x1_0000_0042,
                ord: 7,
            },
            commit_time: 123_456_789,
            rel_ver: -42,
            op: Op::Update,
            old_key: Some(vec![Some("1".into())]),
            vals: Some(vec![
                Some("2".into()),
                None,
                Some("é✓ \\ \"q\"".into()),
                Some(String::new()),
            ]),
            unchanged: Some(vec![1, 3]),
        };
        let mut rows = CopyRows::default();
        rows.push_event("pipe", &e);
        assert_eq!(rows.len(), 1);

        let mut want = 10i16.to_be_bytes().to_vec();
        want.extend(field(&"pipe", &Type::TEXT));
        want.extend(field(&(e.pos.lsn as i64), &Type::INT8));
        want.extend(field(&e.pos.ord, &Type::INT4));
        want.extend(field(&e.commit_time, &Type::INT8));
        want.extend(field(&e.rel_ver, &Type::INT8));
        want.extend(field(&e.op.code(), &Type::CHAR));
        want.extend(field(&e.old_key, &Type::TEXT_ARRAY));
        want.extend(field(&e.vals, &Type::TEXT_ARRAY));
        want.extend(field(&e.unchanged, &Type::INT2_ARRAY));
        want.extend(field(&(want.len() as i32 + 8), &Type::INT4));
        rows.seal();
        assert_eq!(rows.data.to_vec(), want);

        let mut rows = CopyRows::default();
        let d = Event {
            op: Op::Delete,
            vals: None,
            unchanged: None,
            ..e.clone()
        };
        rows.push_event("pipe", &d);
        let empty = Event {
            op: Op::Insert,
            old_key: None,
            vals: Some(vec![]),
            unchanged: None,
            ..e.clone()
        };
        let mut both = CopyRows::default();
        both.push_event("pipe", &e);
        both.push_event("pipe", &d);
        both.push_event("pipe", &empty);
        assert_eq!(both.last(), Some(e.pos));
        assert_eq!(
            decode_rows(&both.to_bytes()).unwrap(),
            vec![e.clone(), d.clone(), empty]
        );
        assert!(decode_rows(&both.to_bytes()[..40]).is_err());
        let tail = [
            field(&d.old_key, &Type::TEXT_ARRAY),
            field(&d.vals, &Type::TEXT_ARRAY),
            field(&d.unchanged, &Type::INT2_ARRAY),
        ]
        .concat();
        rows.seal();
        assert!(rows.data[..rows.data.len() - 8].ends_with(&tail));
    }

    #[test]
    fn a_wide_value_is_kept_as_a_slice_of_its_message_and_encodes_the_same() {
        // A message with a wide value and a small one in it.
        let wide = "x".repeat(WIDE_BYTES + 1);
        let msg = Bytes::from(format!("head{wide}mid7tail"));
        let at = |s: &str| {
            msg.windows(s.len())
                .position(|w| w == s.as_bytes())
                .unwrap()
        };
        let (w, small) = (&msg[4..4 + wide.len()], &msg[at("7")..at("7") + 1]);
        let pos = Position { lsn: 9, ord: 1 };
        let encode = |shared: bool| {
            let mut rows = CopyRows::default();
            rows.begin_row("pipe", pos, 5, 3, Op::Insert);
            rows.null();
            let items = [Some(small), None, Some(w)];
            if shared {
                rows.text_array_in(&msg, items);
            } else {
                rows.text_array(items);
            }
            rows.null();
            rows.begin_row("pipe", Position { lsn: 9, ord: 2 }, 5, 3, Op::Delete);
            rows.text_array_in(&msg, [Some(small)]);
            rows.null();
            rows.null();
            rows
        };
        let (mut copied, shared) = (encode(false), encode(true));
        assert_eq!(shared.bytes(), copied.bytes());
        let parts = shared.into_parts();
        assert!(
            parts.iter().any(|p| p.as_ptr() == w.as_ptr()),
            "the wide value was copied"
        );
        assert_eq!(parts.concat(), copied.to_bytes().to_vec());
        let events = decode_rows(&copied.to_bytes()).unwrap();
        assert_eq!(
            events[0].vals.as_ref().unwrap()[2].as_deref(),
            Some(&wide[..])
        );
        assert_eq!(events[1].pos.ord, 2);
    }
}
