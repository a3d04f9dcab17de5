//! Fencing in a PostgreSQL sink: table `philotes_progress` in the sink schema holds, per pipeline,
//! the ownership epoch that may write. A new owner claims it when its session starts; every sink
//! transaction of an owner first sets `writer_epoch` to its own epoch, which the CHECK refuses once
//! a newer owner has claimed. The UPDATE's row lock orders it against a claim: a transaction in
//! flight finishes first, every later one of the old owner fails and rolls back whole.
//!
//! The same row records the position of the last source change each committed sink transaction
//! holds (`lsn`, `ord`), written in that transaction: what the sink has, whatever the buffer says.

use tokio_postgres::Client;

use crate::engine::error::EngineError;
use crate::engine::event::Position;
use crate::engine::pg::{ident, literal};

/// The constraint a superseded owner's transaction violates.
const CONSTRAINT: &str = "philotes_progress_owner_epoch";

/// Who writes, under which epoch.
#[derive(Debug, Clone)]
pub struct Fence {
    pub pipeline_id: String,
    pub owner: String,
    pub epoch: i64,
}

impl Fence {
    /// The statement each sink transaction starts with (a simple query: no parameters).
    pub fn check_sql(&self, schema: &str) -> String {
        format!(
            "UPDATE {}.philotes_progress SET writer_epoch = {}, updated_at = now() WHERE pipeline_id = {}",
            ident(schema),
            self.epoch,
            literal(&self.pipeline_id)
        )
    }

    /// The statement that records, inside a sink transaction, the position of its last change.
    pub fn record_sql(&self, schema: &str, upto: Position) -> String {
        format!(
            "UPDATE {}.philotes_progress SET lsn = {}, ord = {} WHERE pipeline_id = {}",
            ident(schema),
            upto.lsn as i64,
            upto.ord,
            literal(&self.pipeline_id)
        )
    }

    /// One transaction that commits waiting for the disk (it writes the pipeline's row, so it has
    /// a commit to wait for): once it returns, every earlier commit of the sink is durable.
    pub fn durable_sql(&self, schema: &str) -> String {
        format!(
            "BEGIN; SET LOCAL synchronous_commit = on; UPDATE {}.philotes_progress SET updated_at = now() WHERE pipeline_id = {}; COMMIT",
            ident(schema),
            literal(&self.pipeline_id)
        )
    }

    /// Creates the progress table when missing and claims the pipeline for this epoch; returns the
    /// position the sink recorded last (None before the first sink transaction). Fails with
    /// [`EngineError::Superseded`] when a newer owner already has claimed it.
    pub async fn claim(
        &self,
        client: &Client,
        schema: &str,
    ) -> Result<Option<Position>, EngineError> {
        let table = format!("{}.philotes_progress", ident(schema));
        client
            .batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                   pipeline_id text PRIMARY KEY,
                   epoch bigint NOT NULL,
                   writer_epoch bigint NOT NULL,
                   owner text,
                   updated_at timestamptz NOT NULL DEFAULT now(),
                   lsn bigint,
                   ord integer,
                   CONSTRAINT {CONSTRAINT} CHECK (writer_epoch = epoch));
                 ALTER TABLE {table} ADD COLUMN IF NOT EXISTS lsn bigint, ADD COLUMN IF NOT EXISTS ord integer"
            ))
            .await
            .map_err(EngineError::pg("creating the sink's progress table"))?;
        let claimed = client
            .query_opt(
                &format!(
                    "INSERT INTO {table} AS p (pipeline_id, epoch, writer_epoch, owner) VALUES ($1, $2, $2, $3)
                     ON CONFLICT (pipeline_id) DO UPDATE SET epoch = EXCLUDED.epoch, writer_epoch = EXCLUDED.epoch,
                       owner = EXCLUDED.owner, updated_at = now()
                     WHERE p.epoch <= EXCLUDED.epoch
                     RETURNING lsn, ord"
                ),
                &[&self.pipeline_id, &self.epoch, &self.owner],
            )
            .await
            .map_err(EngineError::pg("claiming the pipeline in the sink"))?;
        if let Some(row) = claimed {
            let lsn: Option<i64> = row.get(0);
            let ord: Option<i32> = row.get(1);
            return Ok(lsn.map(|lsn| Position {
                lsn: lsn as u64,
                ord: ord.unwrap_or(i32::MAX),
            }));
        }
        let row = client
            .query_one(
                &format!("SELECT owner, epoch FROM {table} WHERE pipeline_id = $1"),
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading the sink's progress table"))?;
        Err(EngineError::Superseded {
            owner: row.get::<_, Option<String>>(0).unwrap_or_default(),
            epoch: row.get(1),
            ours: self.epoch,
        })
    }

    /// A failed sink transaction whose cause is a newer owner's claim, as [`EngineError::Superseded`]
    /// (with the lowest epoch that newer owner can have).
    pub fn superseded(&self, e: EngineError) -> EngineError {
        let fenced = matches!(&e, EngineError::Postgres { source, .. }
            if source.as_db_error().and_then(|d| d.constraint()) == Some(CONSTRAINT));
        if fenced {
            EngineError::Superseded {
                owner: "a newer owner".into(),
                epoch: self.epoch + 1,
                ours: self.epoch,
            }
        } else {
            e
        }
    }
}
