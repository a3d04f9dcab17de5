//! The durable buffer in schema `philotes`: events written with binary COPY, the source position
//! acknowledged only after the buffer transaction that holds it commits, and the sink progress.

use std::collections::HashMap;
use std::time::Duration;

use futures::pin_mut;
use tokio_postgres::Client;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::config::ConnString;
use super::error::EngineError;
use super::event::{Event, Op, Position, RelationInfo, Row};
use super::pg;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Creates schema `philotes` and applies the migrations in `migrations/` (idempotent; serialised by an
/// advisory lock so that pipelines starting together do not race).
pub async fn migrate(uri: &ConnString) -> Result<(), EngineError> {
    use sqlx::{ConnectOptions, Connection};
    use std::str::FromStr;
    let target = uri.to_string();
    let err = move |e: sqlx::Error| EngineError::Migrate(format!("buffer database {target}: {e}"));
    let opts = sqlx::postgres::PgConnectOptions::from_str(uri.expose())
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
        sqlx::query("CREATE SCHEMA IF NOT EXISTS philotes")
            .execute(&mut conn)
            .await
            .map_err(err.clone())?;
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
}

const EVENT_TYPES: [Type; 9] = [
    Type::TEXT,
    Type::INT8,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::CHAR,
    Type::TEXT_ARRAY,
    Type::TEXT_ARRAY,
    Type::INT2_ARRAY,
];

impl Buffer {
    pub async fn connect(
        uri: &ConnString,
        pipeline_id: &str,
        purpose: &str,
    ) -> Result<Self, EngineError> {
        Ok(Self {
            client: pg::connect(uri, purpose).await?,
            pipeline_id: pipeline_id.to_string(),
        })
    }

    pub fn pipeline_id(&self) -> &str {
        &self.pipeline_id
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

    /// Drops rows of a transaction whose commit never reached the buffer (the reader stopped inside it);
    /// the source sends that transaction again.
    pub async fn discard_incomplete(&self, durable_lsn: u64) -> Result<u64, EngineError> {
        self.client
            .execute(
                "DELETE FROM philotes.events WHERE pipeline_id = $1 AND lsn > $2",
                &[&self.pipeline_id, &(durable_lsn as i64)],
            )
            .await
            .map_err(EngineError::pg(
                "discarding an incomplete transaction from the buffer",
            ))
    }

    /// Writes relations and events in one transaction with binary COPY, and moves the durable position
    /// to `durable_lsn` when given. A transaction read again after a restart was first removed by
    /// `discard_incomplete`, so it is stored once.
    pub async fn write(
        &mut self,
        relations: &[RelationInfo],
        events: &[Event],
        durable_lsn: Option<u64>,
    ) -> Result<(), EngineError> {
        let tx = self
            .client
            .transaction()
            .await
            .map_err(EngineError::pg("starting a buffer transaction"))?;
        for r in relations {
            tx.execute(
                "INSERT INTO philotes.relations (pipeline_id, rel_ver, schema_name, table_name, columns, types, key_columns)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                &[&self.pipeline_id, &r.rel_ver, &r.schema, &r.name, &r.columns, &r.types, &r.key],
            )
            .await
            .map_err(EngineError::pg("writing a relation to the buffer"))?;
        }
        if !events.is_empty() {
            let sink = tx
                .copy_in(
                    "COPY philotes.events (pipeline_id, lsn, ord, commit_time, rel_ver, op, old_key, vals, unchanged) FROM STDIN BINARY",
                )
                .await
                .map_err(EngineError::pg("starting COPY into the buffer"))?;
            let writer = BinaryCopyInWriter::new(sink, &EVENT_TYPES);
            pin_mut!(writer);
            for e in events {
                let lsn = e.pos.lsn as i64;
                writer
                    .as_mut()
                    .write(&[
                        &self.pipeline_id,
                        &lsn,
                        &e.pos.ord,
                        &e.commit_time,
                        &e.rel_ver,
                        &e.op.code(),
                        &e.old_key,
                        &e.vals,
                        &e.unchanged,
                    ])
                    .await
                    .map_err(EngineError::pg("writing events to the buffer"))?;
            }
            writer
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
        tx.commit()
            .await
            .map_err(EngineError::pg("committing a buffer transaction"))
    }

    /// Events after `after`, up to the durable position, in order.
    pub async fn read_batch(
        &self,
        after: Position,
        durable_lsn: u64,
        limit: usize,
    ) -> Result<Vec<Event>, EngineError> {
        let rows = self
            .client
            .query(
                "SELECT lsn, ord, commit_time, rel_ver, op, old_key, vals, unchanged FROM philotes.events
                 WHERE pipeline_id = $1 AND (lsn, ord) > ($2, $3) AND lsn <= $4
                 ORDER BY lsn, ord LIMIT $5",
                &[&self.pipeline_id, &(after.lsn as i64), &after.ord, &(durable_lsn as i64), &(limit as i64)],
            )
            .await
            .map_err(EngineError::pg("reading events from the buffer"))?;
        rows.iter()
            .map(|r| {
                let code: i8 = r.get(4);
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
                    old_key: r.get::<_, Option<Row>>(5),
                    vals: r.get::<_, Option<Row>>(6),
                    unchanged: r.get::<_, Option<Vec<i16>>>(7),
                })
            })
            .collect()
    }

    pub async fn mark_processed(&self, upto: Position) -> Result<(), EngineError> {
        self.client
            .execute(
                "UPDATE philotes.pipelines SET processed_lsn = $2, processed_ord = $3, updated_at = now() WHERE pipeline_id = $1",
                &[&self.pipeline_id, &(upto.lsn as i64), &upto.ord],
            )
            .await
            .map_err(EngineError::pg("marking a batch processed"))?;
        Ok(())
    }

    /// Durable events not yet delivered.
    pub async fn depth(&self, cp: &Checkpoint) -> Result<i64, EngineError> {
        let row = self
            .client
            .query_one(
                "SELECT count(*) FROM philotes.events WHERE pipeline_id = $1 AND (lsn, ord) > ($2, $3) AND lsn <= $4",
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

    /// Deletes delivered events older than `retention`, and dead letters older than `dlq_retention`.
    pub async fn cleanup(
        &self,
        retention: Duration,
        dlq_retention: Duration,
    ) -> Result<u64, EngineError> {
        let cp = self.checkpoint().await?;
        let n = self
            .client
            .execute(
                "DELETE FROM philotes.events WHERE pipeline_id = $1 AND (lsn, ord) <= ($2, $3)
                   AND buffered_at < now() - make_interval(secs => $4)",
                &[
                    &self.pipeline_id,
                    &(cp.processed.lsn as i64),
                    &cp.processed.ord,
                    &retention.as_secs_f64(),
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
