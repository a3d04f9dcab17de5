//! The Apache Iceberg sink: each source table becomes an append-only changelog table
//! `<namespace>.<table>` (see [`types`] for the layout and type mapping), written exactly once.
//!
//! - **Staging.** Committed sink transactions are written into Parquet data files (one open writer
//!   per table, rolled at `targetFileSize`) and staged. Every `commitInterval`, or when the staged
//!   changes reach `targetFileSize`, each table with staged files gets one Iceberg snapshot (a fast
//!   append); never one per buffer batch. A snapshot therefore holds whole source transactions.
//!   Staged changes count in the buffer's depth, so the processor also flushes once they reach half
//!   of `highWatermark`, and when they hold the reader: a backlog commits about half of
//!   `highWatermark` changes at a time.
//! - **Exactly once.** Each snapshot's summary carries the buffer position of the last change it
//!   holds (`philotes.position`) and the writer's owner epoch (`philotes.epoch`). On start, and
//!   after every failed commit, the sink reads each table's position from its current snapshot
//!   and skips the changes at or before it. The processor marks the buffer
//!   processed only up to what is committed ([`Sink::pending`]), so a crash between an Iceberg
//!   commit and the processed mark redelivers changes that the tables then skip.
//! - **Fencing.** A new owner claims the pipeline in the catalog when it connects; from then on
//!   the catalog refuses every commit of an older epoch ([`fence`]).
//! - **Failures.** Any failure drops everything staged (the files written stay in storage as
//!   orphans, unreferenced) and the processor delivers again from the last committed position.
//!   Concurrent commit conflicts are retried by iceberg-rust against the refreshed table.
//! - **Across tables.** Iceberg commits one table at a time: a source transaction that changes two
//!   tables lands whole in each table, but a reader may see one table's snapshot before the other's.

pub mod catalog;
pub mod convert;
pub mod error;
pub mod fence;
pub mod summary;
pub mod types;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_schema::SchemaRef;
use iceberg::spec::{DataFile, DataFileFormat};
use iceberg::table::Table;
use iceberg::transaction::{ApplyTransactionAction, Transaction};
use iceberg::writer::base_writer::data_file_writer::{DataFileWriter, DataFileWriterBuilder};
use iceberg::writer::file_writer::ParquetWriterBuilder;
use iceberg::writer::file_writer::location_generator::{
    DefaultFileNameGenerator, DefaultLocationGenerator,
};
use iceberg::writer::file_writer::rolling_writer::RollingFileWriterBuilder;
use iceberg::writer::{IcebergWriter, IcebergWriterBuilder};
use iceberg::{Catalog, NamespaceIdent, TableCreation, TableIdent};
use iceberg_catalog_sql::SqlCatalog;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

pub use error::IcebergError;
use fence::CatalogFence;

use super::{Part, Rejected, Sink, breaker_error, breaker_trips};
use crate::engine::config::IcebergConfig;
use crate::engine::error::EngineError;
use crate::engine::event::{Event, Position, RelationInfo};
use crate::engine::pg;

/// Changes by table name, each with its relation layout.
type TableRows<'a> = Vec<(String, Vec<(&'a Event, &'a RelationInfo)>)>;

type Writer =
    DataFileWriter<ParquetWriterBuilder, DefaultLocationGenerator, DefaultFileNameGenerator>;

/// Rows per Parquet row group: bounds what a writer holds in memory.
const ROW_GROUP_ROWS: usize = 64 * 1024;
/// Bytes per Parquet row group, for wide rows.
const ROW_GROUP_BYTES: usize = 16 << 20;

/// A value only ever reached through `&mut` (so the sink is `Sync` although Parquet's writers are
/// not): the lock is never taken.
struct Exclusive<T>(std::sync::Mutex<T>);

impl<T> Exclusive<T> {
    fn new(v: T) -> Self {
        Exclusive(std::sync::Mutex::new(v))
    }

    fn get(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(|e| e.into_inner())
    }
}

struct TableState {
    table: Table,
    arrow: SchemaRef,
    /// Every change of the buffer up to here is in the table.
    position: Option<Position>,
    writer: Exclusive<Option<Writer>>,
    /// Closed data files, staged for the next commit.
    files: Vec<DataFile>,
    /// The open writer and closed files of a transaction that spans batches, kept apart until it
    /// commits, so that a failure in one of its batches drops only it.
    txn_writer: Exclusive<Option<Writer>>,
    txn_files: Vec<DataFile>,
    /// Relation versions checked against the schema.
    layouts: HashSet<i64>,
}

pub struct IcebergSink {
    cfg: IcebergConfig,
    /// Commits are refused once a newer owner has claimed the pipeline.
    fence: CatalogFence,
    pipeline_id: String,
    pipeline: String,
    timeout: Duration,
    catalog: Arc<SqlCatalog>,
    namespace: NamespaceIdent,
    /// By source table name (validation keeps names unique within a pipeline).
    tables: HashMap<String, TableState>,
    props: WriterProperties,
    /// Position of the last committed sink transaction staged (None: nothing committed is staged).
    staged_upto: Option<Position>,
    /// When the first staged transaction was staged.
    staged_since: Option<Instant>,
    /// Encoded size of the staged changes ([`Event::size`]).
    staged_bytes: usize,
    /// Rows are staged (committed or not).
    dirty: bool,
    /// A transaction that spans batches is open (its rows go to the `txn_` writers).
    in_txn: bool,
    /// Rows of the open transaction are written.
    txn_dirty: bool,
    lost: bool,
    /// The tables' positions must be read again (a commit failed: it may have gone through).
    reload: bool,
}

impl IcebergSink {
    /// Connects to the catalog and makes sure the namespace exists.
    /// Connects to the catalog, makes sure the namespace exists, and claims the pipeline for
    /// `owner` at `epoch` in the catalog's fence.
    pub async fn connect(
        cfg: &IcebergConfig,
        pipeline_id: &str,
        pipeline: &str,
        owner: &str,
        epoch: i64,
        timeout: Duration,
    ) -> Result<Self, EngineError> {
        let fence = CatalogFence {
            pipeline_id: pipeline_id.to_string(),
            owner: owner.to_string(),
            epoch,
        };
        let catalog = pg::deadline(timeout, "connecting to the Iceberg catalog", async {
            Ok(catalog::connect(cfg, Some(&fence)).await?)
        })
        .await?;
        pg::deadline(
            timeout,
            "claiming the pipeline in the Iceberg catalog",
            fence.claim(&cfg.catalog),
        )
        .await?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
            .build();
        Ok(Self {
            cfg: cfg.clone(),
            fence,
            pipeline_id: pipeline_id.to_string(),
            pipeline: pipeline.to_string(),
            timeout,
            catalog,
            namespace: NamespaceIdent::new(cfg.namespace.clone()),
            tables: HashMap::new(),
            props,
            staged_upto: None,
            staged_since: None,
            staged_bytes: 0,
            dirty: false,
            in_txn: false,
            txn_dirty: false,
            lost: false,
            reload: false,
        })
    }

    /// Creates the tables of `rels` when missing and adds the columns they lack.
    pub async fn prepare(&mut self, rels: &[RelationInfo]) -> Result<(), EngineError> {
        for rel in rels {
            self.ensure(rel).await?;
        }
        Ok(())
    }

    /// The position a table holds, as last read (for tests and logs).
    pub fn table_position(&self, table: &str) -> Option<Position> {
        self.tables.get(table).and_then(|t| t.position)
    }

    fn ident(&self, rel: &RelationInfo) -> TableIdent {
        TableIdent::new(self.namespace.clone(), rel.name.clone())
    }

    /// Loads (or creates) the table of `rel` and fits its schema to `rel`'s columns.
    async fn ensure(&mut self, rel: &RelationInfo) -> Result<(), EngineError> {
        if self
            .tables
            .get(&rel.name)
            .is_some_and(|t| t.layouts.contains(&rel.rel_ver))
        {
            return Ok(());
        }
        if !self.tables.contains_key(&rel.name) {
            let table = self.load_or_create(rel).await?;
            let state = self.state_of(table)?;
            tracing::info!(pipeline = %self.pipeline, table = %state.table.identifier(), position = ?state.position, "Iceberg table ready");
            self.tables.insert(rel.name.clone(), state);
        }
        let Some(st) = self.tables.get(&rel.name) else {
            return Ok(());
        };
        let added = types::added_columns(st.table.metadata().current_schema(), rel)?;
        if !added.is_empty() {
            self.add_columns(rel, added).await?;
        }
        if let Some(st) = self.tables.get_mut(&rel.name) {
            st.layouts.insert(rel.rel_ver);
        }
        Ok(())
    }

    async fn load_or_create(&self, rel: &RelationInfo) -> Result<Table, EngineError> {
        let ident = self.ident(rel);
        let catalog = self.catalog.clone();
        let t = self.timeout;
        let exists = deadline(t, "looking up an Iceberg table", async {
            catalog
                .table_exists(&ident)
                .await
                .map_err(IcebergError::iceberg(format!("looking up {ident}")))
        })
        .await?;
        if exists {
            return deadline(t, "loading an Iceberg table", async {
                catalog
                    .load_table(&ident)
                    .await
                    .map_err(IcebergError::iceberg(format!("loading {ident}")))
            })
            .await;
        }
        let schema = types::initial_schema(rel)?;
        let creation = TableCreation::builder()
            .name(rel.name.clone())
            .schema(schema)
            .properties(HashMap::from([(
                "write.parquet.compression-codec".to_string(),
                "snappy".to_string(),
            )]))
            .build();
        let ns = self.namespace.clone();
        deadline(t, "creating an Iceberg table", async {
            catalog
                .create_table(&ns, creation)
                .await
                .map_err(IcebergError::iceberg(format!("creating {ident}")))
        })
        .await
    }

    fn state_of(&self, table: Table) -> Result<TableState, EngineError> {
        let arrow = arrow_schema_of(&table)?;
        let position = summary::committed(&table)?;
        Ok(TableState {
            table,
            arrow,
            position,
            writer: Exclusive::new(None),
            files: Vec::new(),
            txn_writer: Exclusive::new(None),
            txn_files: Vec::new(),
            layouts: HashSet::new(),
        })
    }

    /// Schema evolution: adds `added` (optional columns) to the table of `rel`. Rows staged under
    /// the old schema stay valid (Iceberg matches columns by field id); the open writer is closed
    /// so that the next rows are written with the new schema.
    async fn add_columns(
        &mut self,
        rel: &RelationInfo,
        added: Vec<(String, types::ColType)>,
    ) -> Result<(), EngineError> {
        let t = self.timeout;
        let catalog = self.catalog.clone();
        let Some(st) = self.tables.get_mut(&rel.name) else {
            return Ok(());
        };
        st.files.extend(close(st.writer.get(), t).await?);
        let txn_files = close(st.txn_writer.get(), t).await?;
        st.txn_files.extend(txn_files);
        let names: Vec<&str> = added.iter().map(|(n, _)| n.as_str()).collect();
        tracing::info!(pipeline = %self.pipeline, table = %st.table.identifier(), columns = ?names, "adding columns to the Iceberg schema");
        let table = st.table.clone();
        let updated = deadline(t, "evolving an Iceberg schema", async {
            let tx = Transaction::new(&table);
            let mut action = tx.update_schema();
            for (name, ct) in &added {
                // Ids are placeholders: the action assigns fresh ones.
                action = action.add_column(iceberg::transaction::AddColumn::optional(
                    name,
                    ct.iceberg(&mut || 0),
                ));
            }
            let tx = action
                .apply(tx)
                .map_err(IcebergError::iceberg("adding columns"))?;
            tx.commit(&*catalog)
                .await
                .map_err(IcebergError::iceberg(format!(
                    "adding columns to {}",
                    table.identifier()
                )))
        })
        .await?;
        st.arrow = arrow_schema_of(&updated)?;
        st.table = updated;
        Ok(())
    }

    /// Reads every table's position again, after a failure dropped what was staged.
    async fn reload_tables(&mut self) -> Result<(), EngineError> {
        let t = self.timeout;
        let names: Vec<String> = self.tables.keys().cloned().collect();
        for name in names {
            let ident = TableIdent::new(self.namespace.clone(), name.clone());
            let catalog = self.catalog.clone();
            let table = deadline(t, "loading an Iceberg table", async {
                catalog
                    .load_table(&ident)
                    .await
                    .map_err(IcebergError::iceberg(format!("loading {ident}")))
            })
            .await?;
            let mut st = self.state_of(table)?;
            if let Some(old) = self.tables.get(&name) {
                st.layouts = old.layouts.clone();
            }
            self.tables.insert(name, st);
        }
        self.reload = false;
        Ok(())
    }

    /// Drops everything staged after a failure; whether committed transactions were among it.
    fn drop_staged(&mut self) {
        self.drop_txn();
        for st in self.tables.values_mut() {
            *st.writer.get() = None;
            st.files.clear();
        }
        self.lost = self.staged_upto.is_some();
        self.staged_upto = None;
        self.staged_since = None;
        self.staged_bytes = 0;
        self.dirty = false;
        self.reload = true;
    }

    /// Drops the rows of the open transaction that spans batches (a rollback of it); what earlier
    /// transactions staged stays.
    fn drop_txn(&mut self) {
        for st in self.tables.values_mut() {
            *st.txn_writer.get() = None;
            st.txn_files.clear();
        }
        self.in_txn = false;
        self.txn_dirty = false;
    }

    /// Ends an attempt: a failure drops what is staged (see [`drop_staged`](Self::drop_staged)).
    fn after<T>(&mut self, r: Result<T, EngineError>) -> Result<T, EngineError> {
        if r.is_err() {
            self.drop_staged();
        }
        r
    }

    /// The changelog rows of `batch` by table, without the changes a table already holds.
    fn rows_by_table<'a>(
        &self,
        batch: &'a [Event],
        rels: &'a HashMap<i64, RelationInfo>,
    ) -> Result<TableRows<'a>, EngineError> {
        let mut out: Vec<(String, Vec<(&Event, &RelationInfo)>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for e in batch {
            let rel = rels.get(&e.rel_ver).ok_or_else(|| {
                EngineError::Protocol(format!(
                    "event refers to relation {:x}, which the buffer does not know",
                    e.rel_ver
                ))
            })?;
            if self
                .tables
                .get(&rel.name)
                .and_then(|t| t.position)
                .is_some_and(|p| e.pos <= p)
            {
                continue;
            }
            let i = *index.entry(rel.name.as_str()).or_insert_with(|| {
                out.push((rel.name.clone(), Vec::new()));
                out.len() - 1
            });
            out[i].1.push((e, rel));
        }
        Ok(out)
    }

    /// Writes a batch's rows into the tables' open data files (opening them as needed).
    async fn stage(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> Result<(), EngineError> {
        if self.reload {
            self.reload_tables().await?;
        }
        if part.begin && !part.commit {
            self.in_txn = true;
        }
        for e in batch {
            if let Some(rel) = rels.get(&e.rel_ver) {
                self.ensure(rel).await?;
            }
        }
        let grouped = self.rows_by_table(batch, rels)?;
        // Every value is converted before anything is written: a refused value leaves the staged
        // state as it was.
        let mut converted = Vec::with_capacity(grouped.len());
        for (name, rows) in &grouped {
            let Some(st) = self.tables.get(name) else {
                continue;
            };
            let rb = convert::record_batch(&st.arrow, rows).map_err(|b| {
                EngineError::from(IcebergError::Value {
                    table: format!("{}.{name}", self.cfg.namespace),
                    column: b.column,
                    problem: b.problem,
                })
            })?;
            converted.push((name.clone(), rb));
        }
        let t = self.timeout;
        for (name, rb) in converted {
            let props = self.props.clone();
            let target = self.cfg.target_file_size as usize;
            let Some(st) = self.tables.get_mut(&name) else {
                continue;
            };
            let slot = if self.in_txn {
                st.txn_writer.get()
            } else {
                st.writer.get()
            };
            if slot.is_none() {
                *slot = Some(new_writer(&st.table, props, target).await?);
            }
            if let Some(w) = slot.as_mut() {
                deadline(t, "writing an Iceberg data file", async {
                    w.write(rb)
                        .await
                        .map_err(IcebergError::iceberg(format!("writing rows of {name}")))
                })
                .await?;
            }
            if self.in_txn {
                self.txn_dirty = true;
            } else {
                self.dirty = true;
            }
        }
        self.staged_bytes += batch.iter().map(Event::size).sum::<usize>();
        if part.commit && self.in_txn {
            // The transaction that spanned batches commits: its files join the staged ones.
            for st in self.tables.values_mut() {
                let files = close(st.txn_writer.get(), t).await?;
                st.files.append(&mut st.txn_files);
                st.files.extend(files);
            }
            self.dirty |= self.txn_dirty;
            self.in_txn = false;
            self.txn_dirty = false;
        }
        if self.staged_since.is_none() && self.dirty {
            self.staged_since = Some(Instant::now());
        }
        if part.commit
            && self.dirty
            && let Some(last) = batch.last()
        {
            self.staged_upto = Some(last.pos);
        }
        Ok(())
    }

    /// Ends an attempt of [`stage`](Self::stage): a failure in a transaction that spans batches
    /// rolls back only it; one elsewhere drops what is staged, except a refused value, which
    /// changed nothing (values are converted before anything is written).
    fn after_stage(&mut self, in_txn: bool, r: Result<(), EngineError>) -> Result<(), EngineError> {
        if let Err(e) = &r {
            if in_txn {
                self.drop_txn();
            } else if e.class() != crate::engine::error::ErrorClass::Data {
                self.drop_staged();
            }
        }
        r
    }

    fn due(&self) -> bool {
        self.staged_upto.is_some()
            && (self.staged_bytes as u64 >= self.cfg.target_file_size
                || self
                    .staged_since
                    .is_some_and(|s| s.elapsed() >= self.cfg.commit_interval))
    }

    /// Commits what is staged: one snapshot per table with staged files, each carrying the
    /// position of the last staged transaction.
    async fn commit_staged(&mut self) -> Result<(), EngineError> {
        let Some(upto) = self.staged_upto else {
            return Ok(());
        };
        let t = self.timeout;
        let names: Vec<String> = self.tables.keys().cloned().collect();
        let mut snapshots = 0usize;
        let mut files_total = 0usize;
        for name in names {
            let catalog = self.catalog.clone();
            let props = summary::properties(upto, &self.pipeline_id, self.fence.epoch);
            let Some(st) = self.tables.get_mut(&name) else {
                continue;
            };
            st.files.extend(close(st.writer.get(), t).await?);
            if st.files.is_empty() {
                continue;
            }
            let files = std::mem::take(&mut st.files);
            files_total += files.len();
            let table = st.table.clone();
            let committed = deadline(t, "committing an Iceberg snapshot", async {
                let tx = Transaction::new(&table);
                let tx = tx
                    .fast_append()
                    .with_check_duplicate(false)
                    .add_data_files(files)
                    .set_snapshot_properties(props)
                    .apply(tx)
                    .map_err(IcebergError::iceberg("preparing a snapshot"))?;
                tx.commit(&*catalog)
                    .await
                    .map_err(IcebergError::iceberg(format!(
                        "committing a snapshot of {}",
                        table.identifier()
                    )))
            })
            .await
            .map_err(|e| self.fence.superseded(e))?;
            crate::engine::failpoint::crash_point("iceberg-after-commit");
            st.arrow = arrow_schema_of(&committed)?;
            st.table = committed;
            st.position = Some(upto);
            snapshots += 1;
        }
        tracing::debug!(pipeline = %self.pipeline, snapshots, files = files_total, position = %summary::encode(upto), "Iceberg snapshots committed");
        self.staged_upto = None;
        self.staged_since = None;
        self.staged_bytes = 0;
        self.dirty = false;
        Ok(())
    }
}

/// Closes the writer in `slot`, if any: its data files.
async fn close(slot: &mut Option<Writer>, t: Duration) -> Result<Vec<DataFile>, EngineError> {
    match slot.take() {
        Some(mut w) => {
            deadline(t, "closing an Iceberg data file", async {
                w.close()
                    .await
                    .map_err(IcebergError::iceberg("closing a data file"))
            })
            .await
        }
        None => Ok(Vec::new()),
    }
}

fn arrow_schema_of(table: &Table) -> Result<SchemaRef, EngineError> {
    iceberg::arrow::schema_to_arrow_schema(table.metadata().current_schema())
        .map(Arc::new)
        .map_err(|e| {
            IcebergError::Iceberg {
                context: format!("the Arrow schema of {}", table.identifier()),
                source: Box::new(e),
            }
            .into()
        })
}

async fn new_writer(
    table: &Table,
    props: WriterProperties,
    target_file_size: usize,
) -> Result<Writer, EngineError> {
    let schema = table.metadata().current_schema().clone();
    let location = DefaultLocationGenerator::new(table.metadata())
        .map_err(IcebergError::iceberg("the table's data location"))?;
    // A fresh prefix per writer: files of a dropped attempt are never overwritten or reused.
    let names = DefaultFileNameGenerator::new(
        format!("philotes-{}", uuid::Uuid::now_v7()),
        None,
        DataFileFormat::Parquet,
    );
    let rolling = RollingFileWriterBuilder::new(
        ParquetWriterBuilder::new(props, schema),
        target_file_size,
        table.file_io().clone(),
        location,
        names,
    );
    // Building the data file writer does no I/O (the first file opens on the first write).
    DataFileWriterBuilder::new(rolling)
        .build(None)
        .await
        .map_err(|e| IcebergError::iceberg("opening a data file writer")(e).into())
}

/// [`pg::deadline`] for the sink's own errors.
async fn deadline<T>(
    after: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, IcebergError>>,
) -> Result<T, EngineError> {
    pg::deadline(after, what, async { fut.await.map_err(EngineError::from) }).await
}

impl Sink for IcebergSink {
    type Planner = ();
    type Prepared = Vec<Event>;

    fn planner(&self) -> Self::Planner {}

    fn prepare(
        _planner: &Self::Planner,
        batch: &[Event],
        _rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Self::Prepared, EngineError> {
        Ok(batch.to_vec())
    }

    async fn apply_prepared(
        &mut self,
        _batch: &[Event],
        prepared: &Self::Prepared,
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
    ) -> Result<(), EngineError> {
        let in_txn = self.in_txn || (part.begin && !part.commit);
        let r = self.stage(prepared, rels, part).await;
        self.after_stage(in_txn, r)?;
        if part.commit && self.due() {
            let r = self.commit_staged().await;
            return self.after(r);
        }
        Ok(())
    }

    async fn apply_isolated(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
        part: Part,
        breaker: bool,
    ) -> Result<Vec<Rejected>, EngineError> {
        let r = async {
            if self.reload {
                self.reload_tables().await?;
            }
            for e in batch {
                if let Some(rel) = rels.get(&e.rel_ver) {
                    self.ensure(rel).await?;
                }
            }
            // Each change converted on its own: those refused are left out.
            let mut rejected = Vec::new();
            let mut good = Vec::with_capacity(batch.len());
            for (i, e) in batch.iter().enumerate() {
                let one = std::slice::from_ref(e);
                let refused =
                    self.rows_by_table(one, rels)?
                        .into_iter()
                        .find_map(|(name, rows)| {
                            let st = self.tables.get(&name)?;
                            convert::record_batch(&st.arrow, &rows).err().map(|b| {
                                IcebergError::Value {
                                    table: format!("{}.{name}", self.cfg.namespace),
                                    column: b.column,
                                    problem: b.problem,
                                }
                                .to_string()
                            })
                        });
                match refused {
                    Some(error) => rejected.push(Rejected {
                        events: vec![i],
                        error,
                    }),
                    None => good.push(e.clone()),
                }
            }
            if breaker && breaker_trips(rejected.len(), batch.len()) {
                let first = rejected
                    .first()
                    .map(|r| r.error.clone())
                    .unwrap_or_default();
                return Err(breaker_error(rejected.len(), batch.len(), &first));
            }
            let in_txn = self.in_txn || !part.is_whole();
            // The good changes, as this part of the transaction (its last event's position
            // stands for the part, refused or not).
            let r = self.stage(&good, rels, part).await;
            self.after_stage(in_txn, r)?;
            if part.commit {
                if let Some(last) = batch.last()
                    && self.dirty
                {
                    self.staged_upto = Some(last.pos);
                }
                // Isolated transactions are made durable at once: their dead letters follow.
                self.commit_staged().await?;
            }
            Ok(rejected)
        }
        .await;
        self.after(r)
    }

    fn pending(&self) -> bool {
        self.staged_upto.is_some()
    }

    fn flush_at(&self) -> Option<Instant> {
        self.staged_since
            .filter(|_| self.staged_upto.is_some())
            .map(|s| s + self.cfg.commit_interval)
    }

    async fn flush(&mut self) -> Result<(), EngineError> {
        let r = self.commit_staged().await;
        self.after(r)
    }

    fn take_lost(&mut self) -> bool {
        std::mem::take(&mut self.lost)
    }
}
