//! The PostgreSQL sink: one statement per table and kind of change per batch, in one transaction.

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, GenericClient, Statement};

use super::plan::{Action, Change, Step, plan};
use super::{Rejected, Sink, sql};
use crate::engine::config::ConnString;
use crate::engine::error::{EngineError, ErrorClass};
use crate::engine::event::{Event, RelationInfo};
use crate::engine::pg;

pub struct PostgresSink {
    uri: ConnString,
    schema: String,
    client: Option<Client>,
    ensured: HashSet<i64>,
    statements: HashMap<String, Statement>,
}

impl PostgresSink {
    pub fn new(uri: ConnString, schema: String) -> Self {
        Self {
            uri,
            schema,
            client: None,
            ensured: HashSet::new(),
            statements: HashMap::new(),
        }
    }

    async fn connect(&mut self) -> Result<(), EngineError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            self.statements.clear();
            self.client = Some(pg::connect(&self.uri, "sink").await?);
        }
        Ok(())
    }

    /// Drops a broken connection so that the next attempt reconnects.
    fn on_error(&mut self, e: EngineError) -> EngineError {
        if e.class() == ErrorClass::Connection {
            self.client = None;
        }
        e
    }

    /// Creates the target schema and the tables for `rels` (adding columns they lack).
    pub async fn prepare(&mut self, rels: &[RelationInfo]) -> Result<(), EngineError> {
        self.connect().await.map_err(|e| self.on_error(e))?;
        let r = self.prepare_inner(rels).await;
        r.map_err(|e| self.on_error(e))
    }

    async fn prepare_inner(&mut self, rels: &[RelationInfo]) -> Result<(), EngineError> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| EngineError::Protocol("sink not connected".into()))?;
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
        for rel in rels {
            if self.ensured.contains(&rel.rel_ver) {
                continue;
            }
            client
                .batch_execute(&sql::create_table(&self.schema, rel))
                .await
                .map_err(EngineError::pg(format!(
                    "creating sink table for {}",
                    rel.qualified()
                )))?;
            for stmt in sql::add_columns(&self.schema, rel) {
                client
                    .batch_execute(&stmt)
                    .await
                    .map_err(EngineError::pg(format!(
                        "adding columns to the sink table for {}",
                        rel.qualified()
                    )))?;
            }
            self.ensured.insert(rel.rel_ver);
        }
        Ok(())
    }

    async fn plan_and_prepare<'a>(
        &mut self,
        batch: &'a [Event],
        rels: &'a HashMap<i64, RelationInfo>,
    ) -> Result<Vec<Step<'a>>, EngineError> {
        let steps = plan(batch, rels).map_err(|e| EngineError::Protocol(e.to_string()))?;
        let needed: Vec<RelationInfo> = batch
            .iter()
            .map(|e| e.rel_ver)
            .collect::<HashSet<_>>()
            .into_iter()
            .filter(|v| !self.ensured.contains(v))
            .filter_map(|v| rels.get(&v).cloned())
            .collect();
        if !needed.is_empty() {
            self.prepare(&needed).await?;
        }
        self.connect().await.map_err(|e| self.on_error(e))?;
        Ok(steps)
    }
}

/// Prepared statements, cached per connection.
async fn statement<C: GenericClient>(
    cache: &mut HashMap<String, Statement>,
    client: &C,
    sql: String,
) -> Result<Statement, EngineError> {
    if let Some(s) = cache.get(&sql) {
        return Ok(s.clone());
    }
    let s = client
        .prepare(&sql)
        .await
        .map_err(EngineError::pg("preparing a sink statement"))?;
    cache.insert(sql, s.clone());
    Ok(s)
}

async fn execute_rows<C: GenericClient>(
    cache: &mut HashMap<String, Statement>,
    client: &C,
    sql: String,
    rows: &[&[Option<String>]],
    width: usize,
    what: &str,
) -> Result<(), EngineError> {
    let columns: Vec<Vec<Option<&str>>> = (0..width)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).and_then(|v| v.as_deref()))
                .collect()
        })
        .collect();
    let params: Vec<&(dyn ToSql + Sync)> =
        columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
    let stmt = statement(cache, client, sql).await?;
    client
        .execute(&stmt, &params)
        .await
        .map_err(EngineError::pg(what.to_string()))?;
    Ok(())
}

fn rel(rels: &HashMap<i64, RelationInfo>, v: i64) -> Result<&RelationInfo, EngineError> {
    rels.get(&v)
        .ok_or_else(|| EngineError::Protocol(format!("relation {v:x} unknown to the sink")))
}

/// Runs a group of actions; they touch distinct keys, so grouping by statement keeps the end state.
async fn run_actions<C: GenericClient>(
    cache: &mut HashMap<String, Statement>,
    client: &C,
    schema: &str,
    actions: &[&Action<'_>],
    rels: &HashMap<i64, RelationInfo>,
) -> Result<(), EngineError> {
    type Rows<'a> = Vec<&'a [Option<String>]>;
    let mut deletes: BTreeMap<i64, Rows> = BTreeMap::new();
    let mut upserts: BTreeMap<i64, Rows> = BTreeMap::new();
    let mut partial: BTreeMap<(i64, &[i16]), Rows> = BTreeMap::new();
    for a in actions {
        match &a.change {
            Change::Delete { key } => deletes.entry(a.rel_ver).or_default().push(key),
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
                let what = format!("moving a row of {} to a new key", r.qualified());
                execute_rows(
                    cache,
                    client,
                    sql::update_partial(schema, r, unchanged, true),
                    &[&row],
                    width,
                    &what,
                )
                .await?;
            }
        }
    }
    for (v, rows) in deletes {
        let r = rel(rels, v)?;
        let what = format!("deleting from {}", sql::table(schema, r));
        execute_rows(
            cache,
            client,
            sql::delete(schema, r),
            &rows,
            r.key_indexes().len(),
            &what,
        )
        .await?;
    }
    for (v, rows) in upserts {
        let r = rel(rels, v)?;
        let what = format!("upserting into {}", sql::table(schema, r));
        execute_rows(
            cache,
            client,
            sql::upsert(schema, r),
            &rows,
            r.columns.len(),
            &what,
        )
        .await?;
    }
    for ((v, unchanged), rows) in partial {
        let r = rel(rels, v)?;
        let what = format!("updating {}", sql::table(schema, r));
        execute_rows(
            cache,
            client,
            sql::update_partial(schema, r, unchanged, false),
            &rows,
            r.columns.len(),
            &what,
        )
        .await?;
    }
    Ok(())
}

async fn run_truncate<C: GenericClient>(
    client: &C,
    schema: &str,
    r: &RelationInfo,
) -> Result<(), EngineError> {
    client
        .batch_execute(&sql::truncate(schema, r))
        .await
        .map_err(EngineError::pg(format!(
            "truncating {}",
            sql::table(schema, r)
        )))
}

impl Sink for PostgresSink {
    async fn apply(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<(), EngineError> {
        let steps = self.plan_and_prepare(batch, rels).await?;
        let result = async {
            let client = self
                .client
                .as_mut()
                .ok_or_else(|| EngineError::Protocol("sink not connected".into()))?;
            let tx = client
                .transaction()
                .await
                .map_err(EngineError::pg("starting a sink transaction"))?;
            for step in &steps {
                match step {
                    Step::Apply(actions) => {
                        let refs: Vec<&Action> = actions.iter().collect();
                        run_actions(&mut self.statements, &tx, &self.schema, &refs, rels).await?
                    }
                    Step::Truncate { rel_ver, .. } => {
                        run_truncate(&tx, &self.schema, rel(rels, *rel_ver)?).await?
                    }
                }
            }
            tx.commit()
                .await
                .map_err(EngineError::pg("committing a sink transaction"))
        }
        .await;
        result.map_err(|e| self.on_error(e))
    }

    async fn apply_isolated(
        &mut self,
        batch: &[Event],
        rels: &HashMap<i64, RelationInfo>,
    ) -> Result<Vec<Rejected>, EngineError> {
        let steps = self.plan_and_prepare(batch, rels).await?;
        let result = async {
            let client = self
                .client
                .as_mut()
                .ok_or_else(|| EngineError::Protocol("sink not connected".into()))?;
            let mut tx = client
                .transaction()
                .await
                .map_err(EngineError::pg("starting a sink transaction"))?;
            let mut rejected = Vec::new();
            for step in &steps {
                let singles: Vec<(Vec<usize>, Option<&Action>, Option<i64>)> = match step {
                    Step::Apply(actions) => actions
                        .iter()
                        .map(|a| (a.events.clone(), Some(a), None))
                        .collect(),
                    Step::Truncate { rel_ver, event } => vec![(vec![*event], None, Some(*rel_ver))],
                };
                for (events, action, truncate) in singles {
                    let sp = tx
                        .savepoint("philotes_one")
                        .await
                        .map_err(EngineError::pg("starting a savepoint"))?;
                    let r = match (action, truncate) {
                        (Some(a), _) => {
                            run_actions(&mut self.statements, &sp, &self.schema, &[a], rels).await
                        }
                        (None, Some(v)) => run_truncate(&sp, &self.schema, rel(rels, v)?).await,
                        (None, None) => Ok(()),
                    };
                    match r {
                        Ok(()) => sp
                            .commit()
                            .await
                            .map_err(EngineError::pg("releasing a savepoint"))?,
                        Err(e) if e.class() == ErrorClass::Data => {
                            sp.rollback()
                                .await
                                .map_err(EngineError::pg("rolling back a savepoint"))?;
                            rejected.push(Rejected {
                                events,
                                error: e.to_string(),
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            tx.commit()
                .await
                .map_err(EngineError::pg("committing a sink transaction"))?;
            Ok(rejected)
        }
        .await;
        result.map_err(|e| self.on_error(e))
    }
}
