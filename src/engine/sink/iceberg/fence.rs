//! Fencing in the Iceberg SQL catalog. Table `philotes_iceberg_fence`, beside the catalog's own
//! tables, holds per pipeline the ownership epoch that may commit; a new owner claims it when its
//! sink connects. Every connection of an owner's catalog pool carries its epoch in the session
//! setting `philotes.fence` (`<epoch>:<pipeline>`), and a trigger on `iceberg_tables` refuses a
//! commit (the catalog's `UPDATE` of a table's metadata location) from an older epoch than the
//! claimed one. The check is in the catalog's own commit statement, so no retry of iceberg-rust can
//! slip past it; its `FOR SHARE` row lock orders it against a claim: a commit in flight finishes
//! first, every later one of the old owner fails.

use tokio_postgres::Client;

use crate::engine::config::ConnString;
use crate::engine::error::EngineError;
use crate::engine::pg;

/// The SQLSTATE the trigger raises for a superseded writer.
pub const SQLSTATE: &str = "PH001";
/// The session setting that names the writer.
const SETTING: &str = "philotes.fence";

const INSTALL: &str = r#"
CREATE TABLE IF NOT EXISTS philotes_iceberg_fence (
  pipeline_id text PRIMARY KEY,
  epoch bigint NOT NULL,
  owner text,
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE OR REPLACE FUNCTION philotes_iceberg_fence_check_v1() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
  w text := current_setting('philotes.fence', true);
  e bigint;
  p text;
  have bigint;
BEGIN
  IF w IS NULL OR w = '' THEN
    RETURN NEW;
  END IF;
  e := split_part(w, ':', 1)::bigint;
  p := substr(w, strpos(w, ':') + 1);
  SELECT epoch INTO have FROM philotes_iceberg_fence WHERE pipeline_id = p FOR SHARE;
  IF have > e THEN
    RAISE EXCEPTION 'philotes: pipeline % was taken over (epoch %); a writer of epoch % may not commit', p, have, e
      USING ERRCODE = 'PH001';
  END IF;
  RETURN NEW;
END
$f$;
CREATE OR REPLACE TRIGGER philotes_iceberg_fence BEFORE UPDATE ON iceberg_tables
  FOR EACH ROW EXECUTE FUNCTION philotes_iceberg_fence_check_v1();
"#;

/// Who commits, under which epoch.
#[derive(Debug, Clone)]
pub struct CatalogFence {
    pub pipeline_id: String,
    pub owner: String,
    pub epoch: i64,
}

impl CatalogFence {
    /// The catalog URI with this writer's session setting added (as a libpq `options` parameter,
    /// which sqlx appends to any already there).
    pub fn uri(&self, uri: &str) -> String {
        let opt = format!("-c {SETTING}={}:{}", self.epoch, self.pipeline_id);
        match url::Url::parse(uri) {
            Ok(mut u) => {
                u.query_pairs_mut().append_pair("options", &opt);
                u.to_string()
            }
            Err(_) => uri.to_string(),
        }
    }

    /// Installs the fence table and trigger when missing and claims the pipeline for this epoch;
    /// fails with [`EngineError::Superseded`] when a newer owner already has. The catalog's tables
    /// must exist (the catalog creates them when it connects).
    pub async fn claim(&self, catalog: &ConnString) -> Result<(), EngineError> {
        let client = pg::connect(catalog, "the Iceberg catalog").await?;
        install(&client).await?;
        let claimed = client
            .query_opt(
                "INSERT INTO philotes_iceberg_fence AS f (pipeline_id, epoch, owner) VALUES ($1, $2, $3)
                 ON CONFLICT (pipeline_id) DO UPDATE SET epoch = EXCLUDED.epoch, owner = EXCLUDED.owner, updated_at = now()
                 WHERE f.epoch <= EXCLUDED.epoch
                 RETURNING epoch",
                &[&self.pipeline_id, &self.epoch, &self.owner],
            )
            .await
            .map_err(EngineError::pg("claiming the pipeline in the Iceberg catalog"))?;
        if claimed.is_some() {
            return Ok(());
        }
        let row = client
            .query_one(
                "SELECT owner, epoch FROM philotes_iceberg_fence WHERE pipeline_id = $1",
                &[&self.pipeline_id],
            )
            .await
            .map_err(EngineError::pg("reading the Iceberg catalog's fence table"))?;
        Err(EngineError::Superseded {
            owner: row.get::<_, Option<String>>(0).unwrap_or_default(),
            epoch: row.get(1),
            ours: self.epoch,
        })
    }

    /// A failed commit whose cause is the trigger, as [`EngineError::Superseded`] (with the lowest
    /// epoch the newer owner can have).
    pub fn superseded(&self, e: EngineError) -> EngineError {
        if refused_by_fence(&e) {
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

/// Creates the fence table, function and trigger unless they are there (one installer at a time).
async fn install(client: &Client) -> Result<(), EngineError> {
    let present: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid
               WHERE t.tgname = 'philotes_iceberg_fence' AND p.proname = 'philotes_iceberg_fence_check_v1'
                 AND t.tgrelid = to_regclass('iceberg_tables'))",
            &[],
        )
        .await
        .map_err(EngineError::pg("looking up the Iceberg catalog's fence"))?
        .get(0);
    if present {
        return Ok(());
    }
    client
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('philotes_iceberg_fence')); {INSTALL} COMMIT;"
        ))
        .await
        .map_err(EngineError::pg(
            "installing the fence in the Iceberg catalog (the catalog user must own iceberg_tables)",
        ))
}

/// Whether the trigger refused `e`: somewhere in its chain of causes is a database error with the
/// fence's SQLSTATE.
fn refused_by_fence(e: &EngineError) -> bool {
    let EngineError::Iceberg(ie) = e else {
        return false;
    };
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(ie.as_ref());
    while let Some(c) = cause {
        if let Some(sqlx08::Error::Database(db)) = c.downcast_ref::<sqlx08::Error>()
            && db.code().as_deref() == Some(SQLSTATE)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_rides_on_the_catalog_uri() {
        let f = CatalogFence {
            pipeline_id: "5f3c-uid".into(),
            owner: "replica-a".into(),
            epoch: 7,
        };
        let uri = f.uri("postgres://u:p@127.0.0.1:5432/lake?sslmode=disable");
        let u = url::Url::parse(&uri).unwrap();
        let pairs: Vec<(String, String)> = u.query_pairs().into_owned().collect();
        assert_eq!(
            pairs,
            [
                ("sslmode".into(), "disable".into()),
                ("options".into(), "-c philotes.fence=7:5f3c-uid".into())
            ]
        );
    }
}
