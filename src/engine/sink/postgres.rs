//! The PostgreSQL sink: one statement per table and kind of change per batch, in one transaction.
//! A batch is first prepared without I/O (plan, SQL, parameters encoded as `text[]`), so that the
//! processor prepares the next batch while this one is applied; BEGIN, the statements and COMMIT
//! then go to the server in one pipelined round trip.
//!
//! Rows whose first change in the batch is an INSERT are absent from the sink as long as the sink
//! matches the source where the batch starts, which it does except after a crash (batches applied
//! again) or when the sink table held rows of its own. They go in with `COPY` (half the server's
//! work of an upsert); when one is there after all, the COPY fails (unique violation), the attempt
//! is rolled back, and the batch is applied again with upserts only, which give the same end state
//! as a COPY that succeeds. Upserts only are then used for a while ([`CopyPause`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use futures::SinkExt;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, GenericClient, Statement};

use super::fence::Fence;
use super::plan::{Action, Change, Step, Vals, plan};
use super::{Part, Rejected, Sink, rekey, sql};
use crate::engine::config::ConnString;
use crate::engine::error::{EngineError, ErrorClass};
use crate::engine::event::{Event, Op, Position, RelationInfo};
use crate::engine::pg;
use crate::engine::wide::WIDE_BYTES;

pub struct PostgresSink {
    uri: ConnString,
    schema: String,
    timeout: Duration,
    client: Option<Client>,
    /// Relation versions whose layout the sink table has, with their table.
    ensured: HashMap<i64, (String, String)>,
    statements: HashMap<String, Statement>,
    /// Each sink transaction is refused once a newer owner has claimed the pipeline.
    fence: Option<Fence>,
    pause: CopyPause,
    /// The position the sink recorded last, read when the pipeline was claimed.
    recorded: Option<Position>,
    /// The last change of the open sink transaction, recorded (under a fence) when it commits.
    open_upto: Option<Position>,
    /// Commits do not wait for the sink's disk (`synchronous_commit = off`, as a native
    /// subscription's apply worker commits); [`Sink::flush`] makes them durable.
    async_commit: bool,
    /// Since when commits not yet known to be on disk have been made.
    staged_since: Option<Instant>,
    /// Commits not known to be on disk were lost with the connection.
    lost: bool,
}

/// How often commits made without waiting for the disk are made durable.
const ASYNC_FLUSH_EVERY: Duration = Duration::from_millis(200);

/// After a COPY met a row already in the sink: batches applied with upserts only before COPY is
/// tried again; doubles each time (at most [`CopyPause::MAX`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CopyPause {
    left: u32,
    next: u32,
}

impl CopyPause {
    const FIRST: u32 = 16;
    const MAX: u32 = 1 << 14;

    fn new() -> Self {
        CopyPause {
            left: 0,
            next: Self::FIRST,
        }
    }

    /// Whether the next batch may use COPY; counts the batch.
    fn copy_allowed(&mut self) -> bool {
        if self.left == 0 {
            return true;
        }
        self.left -= 1;
        false
    }

    /// A COPY met a row already there.
    fn conflict(&mut self) {
        self.left = self.next;
        self.next = (self.next * 2).min(Self::MAX);
    }
}

/// Whether a failed attempt that held a COPY may succeed with upserts only: a key already in the
/// sink (23505), or a table COPY cannot write (0A000: row-level security; 42809: a view).
fn copy_refused(e: &EngineError) -> bool {
    let EngineError::Postgres { source, .. } = e else {
        return false;
    };
    source
        .code()
        .is_some_and(|c| matches!(c.code(), "23505" | "0A000" | "42809"))
}

impl PostgresSink {
    /// A sink that takes a request unanswered for `timeout` for a dead connection.
    pub fn new(uri: ConnString, schema: String, timeout: Duration) -> Self {
        Self {
            uri,
            schema,
            timeout,
            client: None,
            ensured: HashMap::new(),
            statements: HashMap::new(),
            fence: None,
            pause: CopyPause::new(),
            recorded: None,
            open_upto: None,
            async_commit: false,
            staged_since: None,
            lost: false,
        }
    }

    /// Commits without waiting for the sink's disk, made durable by [`Sink::flush`] (which the
    /// processor calls every [`ASYNC_FLUSH_EVERY`] and before acknowledging the source). Only
    /// under a fence: the flush writes the pipeline's progress row.
    pub fn committing_asynchronously(mut self) -> Self {
        self.async_commit = self.fence.is_some();
        self
    }

    /// After an attempt: a commit made without waiting for the disk is staged.
    fn note_commit<T>(&mut self, result: &Result<T, EngineError>, part: Part) {
        if self.async_commit && part.commit && result.is_ok() {
            self.staged_since.get_or_insert_with(Instant::now);
        }
    }

    /// Writes as `owner` under ownership `epoch` of pipeline `pipeline_id` (see [`Fence`]): claims
    /// the pipeline in the sink when prepared, and every transaction fails once a newer owner did.
    pub fn fenced(mut self, pipeline_id: &str, owner: &str, epoch: i64) -> Self {
        self.fence = Some(Fence {
            pipeline_id: pipeline_id.to_string(),
            owner: owner.to_string(),
            epoch,
        });
        self
    }

    /// Notes the last change of `batch` as part of the open sink transaction; at its commit, the
    /// statement that records where the transaction ends (under a fence).
    fn record_stmt(&mut self, batch: &[Event], part: Part) -> Option<String> {
        if part.begin {
            self.open_upto = None;
        }
        if let Some(e) = batch.last() {
            self.open_upto = Some(e.pos);
        }
        let upto = self.open_upto.filter(|_| part.commit)?;
        self.fence
            .as_ref()
            .map(|f| f.record_sql(&self.schema, upto))
    }

    /// The statement that opens each sink transaction under a fence.
    fn fence_stmt(&self) -> Option<Stmt> {
        self.fence.as_ref().map(|f| Stmt {
            sql: f.check_sql(&self.schema),
            kind: Kind::Simple,
            what: "checking the pipeline's owner in the sink".into(),
        })
    }

    async fn connect(&mut self) -> Result<(), EngineError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            if self.staged_since.take().is_some() {
                // Whether the server kept them is unknown (it may have crashed).
                self.lost = true;
            }
            let client = pg::connect(&self.uri, "sink").await?;
            if self.async_commit {
                client
                    .batch_execute("SET synchronous_commit = off")
                    .await
                    .map_err(EngineError::pg("setting synchronous_commit in the sink"))?;
            }
            self.client = Some(client);
        }
        Ok(())
    }

    /// Drops a broken connection so that the next attempt reconnects.
    fn on_error(&mut self, e: EngineError) -> EngineError {
        if e.class() == ErrorClass::Connection {
            self.client = None;
            if self.staged_since.take().is_some() {
                self.lost = true;
            }
        }
        e
    }

    /// Ends an attempt: after a failure no transaction stays open (a dead connection is dropped).
    async fn after<T>(&mut self, result: Result<T, EngineError>) -> Result<T, EngineError> {
        let result = match &self.fence {
            Some(f) => result.map_err(|e| f.superseded(e)),
            None => result,
        };
        if let Err(e) = &result
            && e.class() != ErrorClass::Connection
        {
            self.roll_back().await;
        }
        result.map_err(|e| self.on_error(e))
    }

    /// After a failed attempt: ends the transaction the attempt was in, if any (a warning only when
    /// there is none), so that no transaction stays open; a connection that cannot is dropped.
    async fn roll_back(&mut self) {
        if let Some(c) = self.client.as_ref().filter(|c| !c.is_closed())
            && tokio::time::timeout(self.timeout, c.batch_execute("ROLLBACK"))
                .await
                .is_ok_and(|r| r.is_ok())
        {
            return;
        }
        self.client = None;
    }

    /// Creates the target schema and the tables for `rels` that are missing. Existing tables are
    /// changed (columns added, keys followed) only when a batch first meets a layout: the buffer may
    /// still hold changes made under an older one.
    pub async fn prepare(&mut self, rels: &[RelationInfo]) -> Result<(), EngineError> {
        self.prepare_layouts(rels, false).await
    }

    async fn prepare_layouts(
        &mut self,
        rels: &[RelationInfo],
        follow: bool,
    ) -> Result<(), EngineError> {
        self.connect().await.map_err(|e| self.on_error(e))?;
        let t = self.timeout;
        let r = pg::deadline(
            t,
            "preparing the sink tables",
            self.prepare_inner(rels, follow),
        )
        .await;
        r.map_err(|e| self.on_error(e))
    }

    async fn prepare_inner(
        &mut self,
        rels: &[RelationInfo],
        follow: bool,
    ) -> Result<(), EngineError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| EngineError::Protocol("sink not connected".into()))?;
        // Created only when missing: a sink user that owns its schema needs no CREATE on the database.
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
                &[&self.schema],
            )
            .await
            .map_err(EngineError::pg(format!(
                "looking up sink schema {}",
                self.schema
            )))?
            .get(0);
        if !exists {
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA IF NOT EXISTS {}",
                    pg::ident(&self.schema)
                ))
                .await
                .map_err(EngineError::pg(format!(
                    "creating sink schema {}",
                    self.schema
                )))?;
        }
        if let Some(f) = &self.fence {
            self.recorded = f.claim(client, &self.schema).await?;
        }
        for rel in rels {
            if self.ensured.contains_key(&rel.rel_ver) {
                continue;
            }
            client
                .batch_execute(&sql::create_table(&self.schema, rel))
                .await
                .map_err(EngineError::pg(format!(
                    "creating sink table for {}",
                    rel.qualified()
                )))?;
            if !follow {
                continue;
            }
            let key = key_change(client, &self.schema, rel).await?;
            if !key.renames.is_empty() {
                // Other layouts of the table must be checked again when met (a rename back).
                self.ensured
                    .retain(|_, t| *t != (rel.schema.clone(), rel.name.clone()));
                client
                    .batch_execute(&key.renames.join("; "))
                    .await
                    .map_err(EngineError::pg(format!(
                        "renaming key columns of the sink table for {}",
                        rel.qualified()
                    )))?;
            }
            for stmt in sql::add_columns(&self.schema, rel) {
                client
                    .batch_execute(&stmt)
                    .await
                    .map_err(EngineError::pg(format!(
                        "adding columns to the sink table for {}",
                        rel.qualified()
                    )))?;
            }
            if let Some(stmt) = key.new_key {
                client.batch_execute(&stmt).await.map_err(|e| {
                    EngineError::invalid(
                        format!(
                            "the sink table {} cannot take the new key of {} ({}): {}",
                            sql::table(&self.schema, rel),
                            rel.qualified(),
                            rel.key_indexes()
                                .iter()
                                .map(|&i| rel.columns[i].as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            crate::engine::error::describe_pg(&e)
                        ),
                        "the sink rows lack values for the new key columns (or repeat them): fill them in the sink \
                         table, or drop the sink table and resync the pipeline (spec.resync)",
                    )
                })?;
            }
            self.ensured
                .insert(rel.rel_ver, (rel.schema.clone(), rel.name.clone()));
        }
        Ok(())
    }

    /// Makes sure the sink tables of these relation versions exist, and that there is a connection.
    async fn ensure(
        &mut self,
        rel_vers: impl IntoIterator<Item = i64>,
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<(), EngineError> {
        let needed: Vec<RelationInfo> = rel_vers
            .into_iter()
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|v| !self.ensured.contains_key(v))
            .filter_map(|v| rels.get(&v).cloned())
            .collect();
        if !needed.is_empty() {
            self.prepare_layouts(&needed, true).await?;
        }
        self.connect().await.map_err(|e| self.on_error(e))
    }

    /// Makes sure the sink tables exist before a batch is sent as `part`. Tables are created between
    /// transactions only (and a reconnect inside one would lose it): a batch that continues a
    /// transaction and meets a table not yet there rolls the transaction back, creates the table,
    /// and fails, so that the transaction is applied again from its start.
    async fn ready_for(
        &mut self,
        rel_vers: impl IntoIterator<Item = i64>,
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> Result<(), EngineError> {
        if part.begin {
            return self.ensure(rel_vers, rels).await;
        }
        let rel_vers: Vec<i64> = rel_vers.into_iter().collect();
        if rel_vers.iter().all(|v| self.ensured.contains_key(v))
            && self.client.as_ref().is_some_and(|c| !c.is_closed())
        {
            return Ok(());
        }
        self.roll_back().await;
        self.ensure(rel_vers, rels).await?;
        Err(EngineError::Protocol(
            "a sink transaction met a new table; it is applied again from its start".into(),
        ))
    }
}

/// How the sink table's primary key must change to follow `rel`'s key (see [`rekey`]).
async fn key_change(
    client: &Client,
    schema: &str,
    rel: &RelationInfo,
) -> Result<rekey::KeyChange, EngineError> {
    let t = sql::table(schema, rel);
    let what = || format!("reading the key of the sink table for {}", rel.qualified());
    let cols: Vec<rekey::SinkColumn> = client
        .query(rekey::COLUMNS, &[&t])
        .await
        .map_err(EngineError::pg(what()))?
        .iter()
        .map(|r| rekey::SinkColumn {
            name: r.get(0),
            ty: r.get(1),
            pk_pos: r.get(2),
        })
        .collect();
    let pk: Option<String> = client
        .query_opt(
            "SELECT conname::text FROM pg_constraint WHERE conrelid = $1::text::regclass AND contype = 'p'",
            &[&t],
        )
        .await
        .map_err(EngineError::pg(what()))?
        .map(|r| r.get(0));
    Ok(rekey::plan(schema, rel, &cols, pk.as_deref().unwrap_or("")))
}

/// The I/O-free part of applying batches to a PostgreSQL sink.
#[derive(Debug, Clone)]
pub struct Planner {
    schema: String,
}

/// A `text[]` parameter, encoded when the batch is prepared.
#[derive(Debug, Clone)]
struct TextArray(Bytes);

impl ToSql for TextArray {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(&self.0);
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::TEXT_ARRAY
    }

    to_sql_checked!();
}

/// Column `col` of `rows` as a one-dimensional `text[]` in binary form (rows shorter than `col` give
/// NULL).
fn text_array(rows: &[&[Option<String>]], col: usize) -> TextArray {
    let size: usize = rows
        .iter()
        .map(|r| 4 + r.get(col).and_then(|v| v.as_ref()).map_or(0, |v| v.len()))
        .sum();
    let mut b = BytesMut::with_capacity(20 + size);
    let mut nulls = false;
    b.put_i32(1);
    b.put_i32(0);
    b.put_i32(Type::TEXT.oid() as i32);
    b.put_i32(rows.len() as i32);
    b.put_i32(1);
    for r in rows {
        match r.get(col).and_then(|v| v.as_deref()) {
            Some(v) => {
                b.put_i32(v.len() as i32);
                b.put_slice(v.as_bytes());
            }
            None => {
                b.put_i32(-1);
                nulls = true;
            }
        }
    }
    b[4..8].copy_from_slice(&(nulls as i32).to_be_bytes());
    TextArray(b.freeze())
}

/// How a statement is sent.
#[derive(Debug, Clone)]
enum Kind {
    /// An extended query with `text[]` parameters.
    Params(Vec<TextArray>),
    /// A simple query (TRUNCATE).
    Simple,
    /// `COPY ... FROM STDIN` with these rows (text format).
    Copy(CopyData),
}

/// The data of a `COPY ... FROM STDIN` (text format). Rows are encoded when the batch is prepared,
/// except wide ones (over [`WIDE_BYTES`]), which are encoded from the batch while they are sent, a
/// slice at a time: their text is never held whole beside their values.
#[derive(Debug, Clone)]
struct CopyData {
    parts: Vec<CopyPart>,
    width: usize,
}

#[derive(Debug, Clone)]
enum CopyPart {
    Encoded(Bytes),
    /// The values of the batch's event at this index.
    Event(usize),
}

/// One statement of a prepared batch.
#[derive(Debug, Clone)]
struct Stmt {
    sql: String,
    kind: Kind,
    what: String,
}

impl Stmt {
    fn truncate(schema: &str, r: &RelationInfo) -> Stmt {
        Stmt {
            sql: sql::truncate(schema, r),
            kind: Kind::Simple,
            what: format!("truncating {}", sql::table(schema, r)),
        }
    }
}

/// A batch ready to be sent: its statements in order, and the relations they need.
#[derive(Debug, Clone)]
pub struct Prepared {
    rel_vers: Vec<i64>,
    stmts: Vec<Stmt>,
    /// Some statement is a COPY (see the module documentation).
    copies: bool,
}

impl Planner {
    pub fn prepare(
        &self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Prepared, EngineError> {
        self.prepare_with(batch, rels, true)
    }

    /// With `copy`, rows the sink lacks go in with COPY; otherwise every row is upserted.
    fn prepare_with(
        &self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        copy: bool,
    ) -> Result<Prepared, EngineError> {
        let steps = plan(batch, rels).map_err(|e| EngineError::Protocol(e.to_string()))?;
        let mut stmts = Vec::new();
        for step in &steps {
            match step {
                Step::Apply(actions) => {
                    let refs: Vec<&Action> = actions.iter().collect();
                    let absent = |a: &Action| copy && batch[a.events[0]].op == Op::Insert;
                    stmts.extend(statements(&self.schema, batch, &refs, rels, absent)?);
                }
                Step::Truncate { rel_ver, .. } => {
                    stmts.push(Stmt::truncate(&self.schema, rel(rels, *rel_ver)?));
                }
            }
        }
        let mut rel_vers: Vec<i64> = batch.iter().map(|e| e.rel_ver).collect();
        rel_vers.sort_unstable();
        rel_vers.dedup();
        let copies = stmts.iter().any(|s| matches!(s.kind, Kind::Copy(_)));
        Ok(Prepared {
            rel_vers,
            stmts,
            copies,
        })
    }
}

/// Prepared statements, cached per connection.
async fn statement<C: GenericClient>(
    cache: &mut HashMap<String, Statement>,
    client: &C,
    sql: &str,
) -> Result<Statement, EngineError> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = client
        .prepare(sql)
        .await
        .map_err(EngineError::pg("preparing a sink statement"))?;
    cache.insert(sql.to_string(), s.clone());
    Ok(s)
}

fn rel(rels: &HashMap<i64, RelationInfo>, v: i64) -> Result<&RelationInfo, EngineError> {
    rels.get(&v)
        .ok_or_else(|| EngineError::Protocol(format!("relation {v:x} unknown to the sink")))
}

fn stmt(sql: String, rows: &[&[Option<String>]], width: usize, what: String) -> Stmt {
    Stmt {
        sql,
        kind: Kind::Params((0..width).map(|i| text_array(rows, i)).collect()),
        what,
    }
}

/// Appends `bytes` in COPY's text format: backslash, newline, carriage return and tab escaped
/// (bytes of a value may be escaped in pieces: only single ASCII bytes are escaped).
fn copy_value(b: &mut BytesMut, bytes: &[u8]) {
    let mut start = 0;
    for (i, &c) in bytes.iter().enumerate() {
        let esc = match c {
            b'\\' => b'\\',
            b'\n' => b'n',
            b'\r' => b'r',
            b'\t' => b't',
            _ => continue,
        };
        b.put_slice(&bytes[start..i]);
        b.put_u8(b'\\');
        b.put_u8(esc);
        start = i + 1;
    }
    b.put_slice(&bytes[start..]);
}

/// A row to copy, with the index of the batch event it is borrowed from when it is wide.
type CopyRow<'a> = (&'a [Option<String>], Option<usize>);

/// Bytes of a row's text in COPY (before escapes).
fn row_size(r: &[Option<String>], width: usize) -> usize {
    width
        + r.iter()
            .map(|v| v.as_ref().map_or(2, |v| v.len()))
            .sum::<usize>()
}

/// `rows` as COPY text data of `width` columns (`\N` for NULL and for columns a row lacks). A row
/// with the index of the batch event it is borrowed from, when wide, is left to be encoded while sent.
fn copy_rows(rows: &[CopyRow], width: usize) -> CopyData {
    let mut parts = Vec::new();
    let mut b = BytesMut::new();
    for (r, wide) in rows {
        if let Some(i) = wide {
            if !b.is_empty() {
                parts.push(CopyPart::Encoded(b.split().freeze()));
            }
            parts.push(CopyPart::Event(*i));
            continue;
        }
        if b.is_empty() {
            let size: usize = rows.iter().map(|(r, _)| row_size(r, width)).sum();
            b.reserve((size + size / 32).min(BATCH_RESERVE));
        }
        row_pieces(r, width).for_each(|p| put_piece(&mut b, p));
    }
    if !b.is_empty() {
        parts.push(CopyPart::Encoded(b.freeze()));
    }
    CopyData { parts, width }
}

/// Most bytes reserved up front for a batch's COPY text.
const BATCH_RESERVE: usize = 16 << 20;

/// A piece of a row in COPY's text format: written as it is, or a slice of a value, escaped.
enum Piece<'r> {
    Raw(&'static [u8]),
    Value(&'r [u8]),
}

/// Row `r` as pieces of COPY text of `width` columns (`\N` for NULL and for columns it lacks),
/// values in slices of at most half of [`COPY_CHUNK`].
fn row_pieces(r: &[Option<String>], width: usize) -> impl Iterator<Item = Piece<'_>> {
    (0..width)
        .flat_map(move |c| {
            let v = r.get(c).and_then(|v| v.as_deref());
            let null = v.is_none().then_some(Piece::Raw(b"\\N"));
            let slices = v
                .map(str::as_bytes)
                .unwrap_or_default()
                .chunks(COPY_CHUNK / 2)
                .map(Piece::Value);
            (c > 0)
                .then_some(Piece::Raw(b"\t"))
                .into_iter()
                .chain(null)
                .chain(slices)
        })
        .chain(std::iter::once(Piece::Raw(b"\n")))
}

fn put_piece(b: &mut BytesMut, p: Piece<'_>) {
    match p {
        Piece::Raw(x) => b.put_slice(x),
        Piece::Value(x) => copy_value(b, x),
    }
}

/// The index of the batch event whose values `vals` are, when they are borrowed and wide.
fn wide_event(batch: &[Event], a: &Action<'_>, vals: &Vals<'_>) -> Option<usize> {
    let Cow::Borrowed(v) = vals else { return None };
    if row_size(v, v.len()) <= WIDE_BYTES {
        return None;
    }
    a.events.iter().copied().find(|&i| {
        batch
            .get(i)
            .and_then(|e| e.vals.as_deref())
            .is_some_and(|e| std::ptr::eq(e, *v))
    })
}

/// The statements for a group of actions; they touch distinct keys, so grouping by statement keeps
/// the end state. Whole rows of keys `absent` says the sink lacks go in with COPY.
fn statements(
    schema: &str,
    batch: &[Event],
    actions: &[&Action<'_>],
    rels: &HashMap<i64, RelationInfo>,
    absent: impl Fn(&Action<'_>) -> bool,
) -> Result<Vec<Stmt>, EngineError> {
    type Rows<'a> = Vec<&'a [Option<String>]>;
    let mut out = Vec::new();
    let mut deletes: BTreeMap<i64, Rows> = BTreeMap::new();
    let mut copies: BTreeMap<i64, Vec<CopyRow>> = BTreeMap::new();
    let mut upserts: BTreeMap<i64, Rows> = BTreeMap::new();
    let mut partial: BTreeMap<(i64, &[i16]), Rows> = BTreeMap::new();
    for a in actions {
        match &a.change {
            Change::Delete { key } => deletes.entry(a.rel_ver).or_default().push(key),
            Change::Upsert { vals, unchanged } if unchanged.is_empty() && absent(a) => copies
                .entry(a.rel_ver)
                .or_default()
                .push((vals, wide_event(batch, a, vals))),
            Change::Upsert { vals, unchanged } if unchanged.is_empty() => {
                upserts.entry(a.rel_ver).or_default().push(vals)
            }
            Change::Upsert { vals, unchanged } => partial
                .entry((a.rel_ver, unchanged))
                .or_default()
                .push(vals),
            Change::Rekey {
                old_key,
                vals,
                unchanged,
            } => {
                let r = rel(rels, a.rel_ver)?;
                let mut row = vals.to_vec();
                row.extend(old_key.iter().cloned());
                let width = row.len();
                out.push(stmt(
                    sql::update_partial(schema, r, unchanged, true),
                    &[&row],
                    width,
                    format!("moving a row of {} to a new key", r.qualified()),
                ));
            }
        }
    }
    for (v, rows) in deletes {
        let r = rel(rels, v)?;
        out.push(stmt(
            sql::delete(schema, r),
            &rows,
            r.key_indexes().len(),
            format!("deleting from {}", sql::table(schema, r)),
        ));
    }
    for (v, rows) in copies {
        let r = rel(rels, v)?;
        out.push(Stmt {
            sql: sql::copy_in(schema, r),
            kind: Kind::Copy(copy_rows(&rows, r.columns.len())),
            what: format!("copying rows into {}", sql::table(schema, r)),
        });
    }
    for (v, rows) in upserts {
        let r = rel(rels, v)?;
        out.push(stmt(
            sql::upsert(schema, r),
            &rows,
            r.columns.len(),
            format!("upserting into {}", sql::table(schema, r)),
        ));
    }
    for ((v, unchanged), rows) in partial {
        let r = rel(rels, v)?;
        out.push(stmt(
            sql::update_partial(schema, r, unchanged, false),
            &rows,
            r.columns.len(),
            format!("updating {}", sql::table(schema, r)),
        ));
    }
    Ok(out)
}

/// Runs one statement and waits for it.
async fn run_stmt(
    cache: &mut HashMap<String, Statement>,
    client: &Client,
    batch: &[Event],
    s: &Stmt,
) -> Result<(), EngineError> {
    match &s.kind {
        Kind::Simple => client
            .batch_execute(&s.sql)
            .await
            .map_err(EngineError::pg(s.what.clone())),
        Kind::Params(params) => {
            let stmt = statement(cache, client, &s.sql).await?;
            let params: Vec<&(dyn ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn ToSql + Sync)).collect();
            client
                .execute(&stmt, &params)
                .await
                .map_err(EngineError::pg(s.what.clone()))?;
            Ok(())
        }
        Kind::Copy(data) => {
            let stmt = statement(cache, client, &s.sql).await?;
            copy(client, &stmt, data, batch, &s.what).await
        }
    }
}

/// Bytes of COPY data sent in one message.
const COPY_CHUNK: usize = 256 * 1024;

/// Runs a `COPY ... FROM STDIN` with `data` (of `batch`, which it was prepared from).
async fn copy(
    client: &Client,
    stmt: &Statement,
    data: &CopyData,
    batch: &[Event],
    what: &str,
) -> Result<(), EngineError> {
    let sink = client
        .copy_in::<_, Bytes>(stmt)
        .await
        .map_err(EngineError::pg(what))?;
    futures::pin_mut!(sink);
    // In slices (no copies), so that the connection's write buffer stays small for wide rows.
    for part in &data.parts {
        match part {
            CopyPart::Encoded(data) => {
                let mut at = 0;
                while at < data.len() {
                    let end = (at + COPY_CHUNK).min(data.len());
                    sink.as_mut()
                        .feed(data.slice(at..end))
                        .await
                        .map_err(EngineError::pg(what))?;
                    at = end;
                }
            }
            CopyPart::Event(i) => {
                let row = batch
                    .get(*i)
                    .and_then(|e| e.vals.as_deref())
                    .ok_or_else(|| {
                        EngineError::Protocol(format!(
                            "a wide row to copy (event {i}) is not in its batch"
                        ))
                    })?;
                let mut b = BytesMut::with_capacity(COPY_CHUNK + 64);
                for p in row_pieces(row, data.width) {
                    put_piece(&mut b, p);
                    if b.len() >= COPY_CHUNK {
                        let full = b.split().freeze();
                        b.reserve(COPY_CHUNK + 64);
                        sink.as_mut()
                            .feed(full)
                            .await
                            .map_err(EngineError::pg(what))?;
                    }
                }
                sink.as_mut()
                    .feed(b.freeze())
                    .await
                    .map_err(EngineError::pg(what))?;
            }
        }
    }
    sink.as_mut()
        .finish()
        .await
        .map_err(EngineError::pg(what))?;
    Ok(())
}

type Pending<'a> = Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>>;

/// BEGIN (when `part` opens the transaction), the statements and COMMIT (when it ends it) sent at
/// once and answered in order. When a statement fails the server aborts the transaction, and its
/// error is the one returned; the caller then rolls back.
async fn run_transaction(
    cache: &mut HashMap<String, Statement>,
    client: &Client,
    batch: &[Event],
    fence: Option<&Stmt>,
    stmts: &[Stmt],
    part: Part,
    record: Option<&str>,
) -> Result<(), EngineError> {
    let mut prepared = Vec::with_capacity(stmts.len());
    for s in stmts {
        prepared.push(match s.kind {
            Kind::Simple => None,
            _ => Some(statement(cache, client, &s.sql).await?),
        });
    }
    let params: Vec<Vec<&(dyn ToSql + Sync)>> = stmts
        .iter()
        .map(|s| match &s.kind {
            Kind::Params(p) => p.iter().map(|p| p as &(dyn ToSql + Sync)).collect(),
            _ => Vec::new(),
        })
        .collect();
    let mut steps: Vec<Pending> = Vec::with_capacity(stmts.len() + 2);
    if part.begin {
        steps.push(Box::pin(async {
            client
                .batch_execute("BEGIN")
                .await
                .map_err(EngineError::pg("starting a sink transaction"))
        }));
        if let Some(f) = fence {
            steps.push(Box::pin(async move {
                client
                    .batch_execute(&f.sql)
                    .await
                    .map_err(EngineError::pg(f.what.clone()))
            }));
        }
    }
    for ((s, st), p) in stmts.iter().zip(&prepared).zip(&params) {
        steps.push(match (st, &s.kind) {
            (None, _) => Box::pin(async move {
                client
                    .batch_execute(&s.sql)
                    .await
                    .map_err(EngineError::pg(s.what.clone()))
            }),
            // Statements after it are queued behind its rows.
            (Some(st), Kind::Copy(data)) => Box::pin(copy(client, st, data, batch, &s.what)),
            (Some(st), _) => Box::pin(async move {
                client
                    .execute(st, p)
                    .await
                    .map(|_| ())
                    .map_err(EngineError::pg(s.what.clone()))
            }),
        });
    }
    if part.commit {
        // Where the transaction ends, recorded in it: one simple query, so a failed UPDATE skips
        // the COMMIT.
        let commit = match record {
            Some(r) => format!("{r}; COMMIT"),
            None => "COMMIT".to_string(),
        };
        steps.push(Box::pin(async move {
            client
                .batch_execute(&commit)
                .await
                .map_err(EngineError::pg("committing a sink transaction"))
        }));
    }
    futures::future::try_join_all(steps).await?;
    Ok(())
}

impl Sink for PostgresSink {
    type Planner = Planner;
    type Prepared = Prepared;

    fn recorded(&self) -> Option<Position> {
        self.recorded
    }

    fn planner(&self) -> Planner {
        Planner {
            schema: self.schema.clone(),
        }
    }

    fn prepare(
        planner: &Planner,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Prepared, EngineError> {
        planner.prepare(batch, rels)
    }

    async fn apply_prepared(
        &mut self,
        batch: &[Event],
        p: &Prepared,
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> Result<(), EngineError> {
        let r = self.apply_batch(batch, p, rels, part).await;
        self.note_commit(&r, part);
        r
    }

    async fn apply_isolated(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
        breaker: bool,
    ) -> Result<Vec<Rejected>, EngineError> {
        let r = self.apply_one_by_one(batch, rels, part, breaker).await;
        self.note_commit(&r, part);
        r
    }

    fn pending(&self) -> bool {
        self.staged_since.is_some()
    }

    fn flush_at(&self) -> Option<Instant> {
        self.staged_since.map(|t| t + ASYNC_FLUSH_EVERY)
    }

    /// A transaction that commits waiting for the disk, which then holds every commit before it.
    async fn flush(&mut self) -> Result<(), EngineError> {
        if self.staged_since.is_none() {
            return Ok(());
        }
        let (Some(f), Some(client)) = (&self.fence, self.client.as_ref()) else {
            self.staged_since = None;
            self.lost = true;
            return Err(EngineError::Protocol(
                "the sink connection closed with commits not yet on disk".into(),
            ));
        };
        let sql = f.durable_sql(&self.schema);
        let r = pg::deadline(self.timeout, "making sink commits durable", async {
            client
                .batch_execute(&sql)
                .await
                .map_err(EngineError::pg("making sink commits durable"))
        })
        .await;
        if r.is_ok() {
            self.staged_since = None;
        }
        self.after(r).await
    }

    fn take_lost(&mut self) -> bool {
        std::mem::take(&mut self.lost)
    }
}

impl PostgresSink {
    async fn apply_batch(
        &mut self,
        batch: &[Event],
        p: &Prepared,
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> Result<(), EngineError> {
        self.ready_for(p.rel_vers.iter().copied(), rels, part)
            .await?;
        let fence = self.fence_stmt();
        let record = self.record_stmt(batch, part);
        let upserts;
        let mut p = p;
        if p.copies && !self.pause.copy_allowed() {
            upserts = self.planner().prepare_with(batch, rels, false)?;
            p = &upserts;
        }
        let result = match self.client.as_ref() {
            Some(client) => {
                pg::deadline(
                    self.timeout,
                    "applying a batch to the sink",
                    run_transaction(
                        &mut self.statements,
                        client,
                        batch,
                        fence.as_ref(),
                        &p.stmts,
                        part,
                        record.as_deref(),
                    ),
                )
                .await
            }
            None => Err(EngineError::Protocol("sink not connected".into())),
        };
        match result {
            Err(e) if p.copies && copy_refused(&e) => {
                // Nothing of this attempt stays: the transaction is rolled back whole.
                self.roll_back().await;
                self.pause.conflict();
                tracing::info!(error = %e, "a COPY into the sink met a row already there (or a table it cannot write); applying with upserts");
                if !part.begin {
                    // Earlier batches of this sink transaction went with it.
                    return Err(EngineError::Protocol(
                        "a COPY into the sink met a row already there; the sink transaction is applied again from its start, with upserts".into(),
                    ));
                }
                let upserts = self.planner().prepare_with(batch, rels, false)?;
                self.ready_for(upserts.rel_vers.iter().copied(), rels, part)
                    .await?;
                let result = match self.client.as_ref() {
                    Some(client) => {
                        pg::deadline(
                            self.timeout,
                            "applying a batch to the sink",
                            run_transaction(
                                &mut self.statements,
                                client,
                                batch,
                                fence.as_ref(),
                                &upserts.stmts,
                                part,
                                record.as_deref(),
                            ),
                        )
                        .await
                    }
                    None => Err(EngineError::Protocol("sink not connected".into())),
                };
                self.after(result).await
            }
            result => self.after(result).await,
        }
    }

    async fn apply_one_by_one(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
        breaker: bool,
    ) -> Result<Vec<Rejected>, EngineError> {
        let steps = plan(batch, rels).map_err(|e| EngineError::Protocol(e.to_string()))?;
        self.ready_for(batch.iter().map(|e| e.rel_ver), rels, part)
            .await?;
        let timeout = self.timeout;
        let fence = self.fence_stmt();
        let record = self.record_stmt(batch, part);
        let result = pg::deadline(
            timeout,
            "applying a batch to the sink change by change",
            async {
                let client = self
                    .client
                    .as_ref()
                    .ok_or_else(|| EngineError::Protocol("sink not connected".into()))?;
                let sql = |q: &'static str, what: &'static str| async move {
                    client.batch_execute(q).await.map_err(EngineError::pg(what))
                };
                if part.begin {
                    sql("BEGIN", "starting a sink transaction").await?;
                    if let Some(f) = &fence {
                        client
                            .batch_execute(&f.sql)
                            .await
                            .map_err(EngineError::pg(f.what.clone()))?;
                    }
                }
                let mut rejected = Vec::new();
                for step in &steps {
                    let singles: Vec<(Vec<usize>, Option<&Action>, Option<i64>)> = match step {
                        Step::Apply(actions) => actions
                            .iter()
                            .map(|a| (a.events.clone(), Some(a), None))
                            .collect(),
                        Step::Truncate { rel_ver, event } => {
                            vec![(vec![*event], None, Some(*rel_ver))]
                        }
                    };
                    for (events, action, truncate) in singles {
                        sql("SAVEPOINT philotes_one", "starting a savepoint").await?;
                        let r = async {
                            let stmts = match (action, truncate) {
                                (Some(a), _) => {
                                    statements(&self.schema, batch, &[a], rels, |_| false)?
                                }
                                (None, Some(v)) => {
                                    vec![Stmt::truncate(&self.schema, rel(rels, v)?)]
                                }
                                (None, None) => Vec::new(),
                            };
                            for s in &stmts {
                                run_stmt(&mut self.statements, client, batch, s).await?;
                            }
                            Ok::<(), EngineError>(())
                        }
                        .await;
                        match r {
                            Ok(()) => {
                                sql("RELEASE SAVEPOINT philotes_one", "releasing a savepoint")
                                    .await?
                            }
                            Err(e) if e.class() == ErrorClass::Data => {
                                sql(
                                    "ROLLBACK TO SAVEPOINT philotes_one",
                                    "rolling back a savepoint",
                                )
                                .await?;
                                rejected.push(Rejected {
                                    events,
                                    error: e.to_string(),
                                });
                            }
                            Err(e) => return Err(e),
                        }
                    }
                }
                let refused: usize = rejected.iter().map(|r| r.events.len()).sum();
                if breaker && super::breaker_trips(refused, batch.len()) {
                    let first = rejected.first().map_or("", |r| r.error.as_str());
                    return Err(super::breaker_error(refused, batch.len(), first));
                }
                if part.commit {
                    if let Some(r) = &record {
                        client
                            .batch_execute(r)
                            .await
                            .map_err(EngineError::pg("recording the sink's position"))?;
                    }
                    sql("COMMIT", "committing a sink transaction").await?;
                }
                Ok(rejected)
            },
        )
        .await;
        self.after(result).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> RelationInfo {
        RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["id".into(), "v".into()],
            vec!["bigint".into(), "text".into()],
            vec![true, false],
        )
    }

    fn ev(ord: i32, op: Op, id: &str, v: Option<&str>) -> Event {
        let row = || Some(vec![Some(id.to_string()), v.map(String::from)]);
        Event {
            pos: Position { lsn: 1, ord },
            commit_time: 0,
            rel_ver: rel().rel_ver,
            op,
            old_key: (op == Op::Delete).then(|| vec![Some(id.to_string())]),
            vals: (op != Op::Delete).then(row).flatten(),
            unchanged: None,
        }
    }

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        let a = [Some("1".to_string()), Some("a\tb\nc\rd\\e \\N".to_string())];
        let b = [Some("2".to_string()), None];
        let short = [Some("3".to_string())];
        let rows: Vec<CopyRow> = vec![(&a, None), (&b, None), (&short, None)];
        assert_eq!(
            encoded(&copy_rows(&rows, 2)),
            b"1\ta\\tb\\nc\\rd\\\\e \\\\N\n2\t\\N\n3\t\\N\n"
        );
    }

    /// The encoded parts of COPY data, one after the other.
    fn encoded(d: &CopyData) -> Vec<u8> {
        d.parts
            .iter()
            .flat_map(|p| match p {
                CopyPart::Encoded(b) => b.to_vec(),
                CopyPart::Event(_) => Vec::new(),
            })
            .collect()
    }

    #[test]
    fn a_wide_row_is_left_to_be_encoded_while_sent_and_escaped_across_its_slices() {
        let r = rel();
        let rels = HashMap::from([(r.rel_ver, r)]);
        let planner = Planner {
            schema: "replica".into(),
        };
        // Escapes on each side of every slice boundary.
        let wide: String = "ab\t\n\\".repeat(WIDE_BYTES / 4);
        let mut batch = vec![
            ev(0, Op::Insert, "1", Some("a")),
            ev(1, Op::Insert, "2", Some("x")),
            ev(2, Op::Insert, "3", Some("c")),
        ];
        batch[1].vals = Some(vec![Some("2".into()), Some(wide.clone())]);
        let p = planner.prepare(&batch, &rels).unwrap();
        let Kind::Copy(data) = &p.stmts[0].kind else {
            panic!("{:?}", p.stmts)
        };
        let parts: Vec<Option<usize>> = data
            .parts
            .iter()
            .map(|p| match p {
                CopyPart::Event(i) => Some(*i),
                CopyPart::Encoded(_) => None,
            })
            .collect();
        assert_eq!(parts, vec![None, Some(1), None]);
        assert_eq!(encoded(data), b"1\ta\n3\tc\n");
        // What is sent for it, slice by slice, is what encoding it whole gives.
        let mut whole = BytesMut::new();
        whole.put_slice(b"2\t");
        copy_value(&mut whole, wide.as_bytes());
        whole.put_u8(b'\n');
        let mut sliced = BytesMut::new();
        let pieces: Vec<Piece> = row_pieces(batch[1].vals.as_deref().unwrap(), 2).collect();
        assert!(pieces.len() > 4, "{} pieces", pieces.len());
        pieces.into_iter().for_each(|p| put_piece(&mut sliced, p));
        assert_eq!(sliced, whole);
    }

    #[test]
    fn rows_first_inserted_in_the_batch_are_copied_the_rest_upserted() {
        let r = rel();
        let rels = HashMap::from([(r.rel_ver, r)]);
        let planner = Planner {
            schema: "replica".into(),
        };
        let batch = [
            ev(0, Op::Insert, "1", Some("a")),
            ev(1, Op::Update, "1", Some("b")),
            ev(2, Op::Update, "2", Some("c")),
            ev(3, Op::Delete, "3", None),
            ev(4, Op::Insert, "3", Some("d")),
            ev(5, Op::Insert, "4", Some("e")),
            ev(6, Op::Delete, "4", None),
        ];
        let p = planner.prepare(&batch, &rels).unwrap();
        assert!(p.copies);
        let kinds: Vec<(&str, String)> = p
            .stmts
            .iter()
            .map(|s| {
                (
                    s.sql.split_whitespace().next().unwrap(),
                    match &s.kind {
                        Kind::Copy(d) => String::from_utf8(encoded(d)).unwrap(),
                        _ => String::new(),
                    },
                )
            })
            .collect();
        // Key 1: inserted then updated, copied as its last row; key 2: updated, upserted; key 3:
        // deleted then inserted (it may be in the sink), upserted; key 4: inserted then deleted, a
        // delete (of a row that is not there).
        assert_eq!(
            kinds,
            vec![
                ("DELETE", String::new()),
                ("COPY", "1\tb\n".into()),
                ("INSERT", String::new())
            ]
        );
        let Kind::Params(upsert) = &p.stmts[2].kind else {
            panic!()
        };
        assert_eq!(upsert.len(), 2);
        let p = planner.prepare_with(&batch, &rels, false).unwrap();
        assert!(!p.copies);
        assert!(!p.stmts.iter().any(|s| matches!(s.kind, Kind::Copy(_))));
    }

    #[test]
    fn copy_pauses_after_a_conflict_and_longer_each_time() {
        let mut p = CopyPause::new();
        assert!(p.copy_allowed());
        p.conflict();
        for _ in 0..CopyPause::FIRST {
            assert!(!p.copy_allowed());
        }
        assert!(p.copy_allowed());
        p.conflict();
        assert_eq!(p.left, 2 * CopyPause::FIRST);
        for _ in 0..20 {
            p.conflict();
        }
        assert_eq!(p.left, CopyPause::MAX);
    }
}
