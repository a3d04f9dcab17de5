//! SQL on the source: checks, table layouts, publication and slot.

use tokio_postgres::Client;

use crate::engine::config::TableName;
use crate::engine::error::EngineError;
use crate::engine::event::RelationInfo;
use crate::engine::pg::ident;

pub async fn check_wal_level(client: &Client) -> Result<(), EngineError> {
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(EngineError::pg("reading wal_level on the source"))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(EngineError::invalid(
            format!(
                "spec.source: the source database has wal_level={level}, logical replication needs wal_level=logical"
            ),
            "set wal_level=logical in postgresql.conf (or ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL",
        ));
    }
    Ok(())
}

const LAYOUT_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
     coalesce(a.attnum = ANY(i.indkey), false) \
     FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum";

/// Layouts of the spec's tables as the catalog has them now; errors name the spec field.
pub async fn table_layouts(
    client: &Client,
    tables: &[TableName],
) -> Result<Vec<RelationInfo>, EngineError> {
    let mut out = Vec::with_capacity(tables.len());
    let db: String = client
        .query_one("SELECT current_database()::text", &[])
        .await
        .map_err(EngineError::pg("reading the source database name"))?
        .get(0);
    for (i, t) in tables.iter().enumerate() {
        let oid = client
            .query_opt(
                "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(EngineError::pg("looking up a source table"))?;
        let Some(oid) = oid else {
            return Err(EngineError::invalid(
                format!(
                    "spec.source.tables[{i}]: table {t} does not exist in source database {db}"
                ),
                "create the table, or correct or remove the entry in spec.source.tables",
            ));
        };
        let oid: u32 = oid.get(0);
        let rel = layout_of(client, oid, &t.schema, &t.name, None).await?;
        if !rel.key.iter().any(|k| *k) {
            return Err(EngineError::invalid(
                format!("spec.source.tables[{i}]: table {t} has no primary key"),
                format!(
                    "add a primary key (ALTER TABLE {t} ADD PRIMARY KEY (...)) or remove the table from spec.source.tables"
                ),
            ));
        }
        out.push(rel);
    }
    Ok(out)
}

/// Layout of relation `oid`; `columns` (name, type oid, typmod) as a Relation message sent them, or
/// the current catalog when None. The key is the table's primary key.
pub async fn layout_of(
    client: &Client,
    oid: u32,
    schema: &str,
    name: &str,
    columns: Option<&[(String, u32, i32)]>,
) -> Result<RelationInfo, EngineError> {
    let rows = client
        .query(LAYOUT_SQL, &[&oid])
        .await
        .map_err(EngineError::pg(format!(
            "reading the layout of {schema}.{name}"
        )))?;
    let catalog: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let (names, types, key) = match columns {
        None => (
            catalog.iter().map(|c| c.0.clone()).collect(),
            catalog.iter().map(|c| c.1.clone()).collect(),
            catalog.iter().map(|c| c.2).collect(),
        ),
        Some(cols) => {
            let oids: Vec<u32> = cols.iter().map(|c| c.1).collect();
            let mods: Vec<i32> = cols.iter().map(|c| c.2).collect();
            let type_rows = client
                .query(
                    "SELECT format_type(t, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS x(t, m, n) ORDER BY n",
                    &[&oids, &mods],
                )
                .await
                .map_err(EngineError::pg("naming column types"))?;
            let types: Vec<String> = type_rows.iter().map(|r| r.get(0)).collect();
            let key = cols
                .iter()
                .map(|c| catalog.iter().any(|k| k.0 == c.0 && k.2))
                .collect();
            (cols.iter().map(|c| c.0.clone()).collect(), types, key)
        }
    };
    Ok(RelationInfo::new(
        schema.to_string(),
        name.to_string(),
        names,
        types,
        key,
    ))
}

fn table_list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(|t| format!("{}.{}", ident(&t.schema), ident(&t.name)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Makes sure the publication exists and covers `tables`. Returns whether it was created now. A
/// publication the pipeline created before (`owned`) is altered to match; another one is only checked.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[TableName],
    owned: bool,
) -> Result<bool, EngineError> {
    let exists = client
        .query_opt(
            "SELECT puballtables FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(EngineError::pg("looking up the publication"))?;
    match exists {
        None => {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    ident(name),
                    table_list(tables)
                ))
                .await
                .map_err(EngineError::pg(format!("creating publication {name}")))?;
            Ok(true)
        }
        Some(_) if owned => {
            client
                .batch_execute(&format!(
                    "ALTER PUBLICATION {} SET TABLE {}",
                    ident(name),
                    table_list(tables)
                ))
                .await
                .map_err(EngineError::pg(format!(
                    "updating the tables of publication {name}"
                )))?;
            Ok(false)
        }
        Some(_) => {
            let rows = client
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                    &[&name],
                )
                .await
                .map_err(EngineError::pg("reading the publication's tables"))?;
            let have: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            if let Some(t) = tables
                .iter()
                .find(|t| !have.contains(&(t.schema.clone(), t.name.clone())))
            {
                return Err(EngineError::invalid(
                    format!(
                        "spec.source.publication: publication {name} does not include table {t}"
                    ),
                    format!(
                        "ALTER PUBLICATION {} ADD TABLE {t}, or leave spec.source.publication empty so Philotes manages its own",
                        ident(name)
                    ),
                ));
            }
            Ok(false)
        }
    }
}

pub async fn slot_exists(client: &Client, name: &str) -> Result<bool, EngineError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(EngineError::pg("looking up the replication slot"))?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Makes sure the logical slot exists with pgoutput. Returns whether it was created now.
pub async fn ensure_slot(client: &Client, name: &str) -> Result<bool, EngineError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, database::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&name],
        )
        .await
        .map_err(EngineError::pg("looking up the replication slot"))?;
    match row {
        Some(r) => {
            let plugin: Option<String> = r.get(0);
            let db: Option<String> = r.get(1);
            let here: String = client
                .query_one("SELECT current_database()::text", &[])
                .await
                .map_err(EngineError::pg("reading the source database name"))?
                .get(0);
            if plugin.as_deref() != Some("pgoutput") || db.as_deref() != Some(here.as_str()) {
                return Err(EngineError::invalid(
                    format!(
                        "spec.source.slot: slot {name} exists but is not a pgoutput slot of database {here} (plugin {}, database {})",
                        plugin.unwrap_or_default(),
                        db.unwrap_or_default()
                    ),
                    "name another slot in spec.source.slot, or leave it empty for a derived name",
                ));
            }
            Ok(false)
        }
        None => {
            client
                .query_one(
                    "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&name],
                )
                .await
                .map_err(EngineError::pg(format!("creating replication slot {name}")))?;
            Ok(true)
        }
    }
}

/// Confirmed position of the slot and the WAL it retains beyond that, in bytes; None if the slot is gone.
pub async fn slot_lag(client: &Client, slot: &str) -> Result<Option<(String, i64)>, EngineError> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, ''), \
             coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(EngineError::pg("reading the slot position"))?;
    Ok(row.map(|r| (r.get(0), r.get(1))))
}

/// Drops the slot (ending a session still holding it) and tolerates that it is already gone.
pub async fn drop_slot(client: &Client, slot: &str) -> Result<bool, EngineError> {
    for _ in 0..10 {
        let row = client
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .map_err(EngineError::pg("looking up the replication slot"))?;
        let Some(row) = row else { return Ok(false) };
        if let Some(pid) = row.get::<_, Option<i32>>(0) {
            let _ = client
                .execute("SELECT pg_terminate_backend($1)", &[&pid])
                .await;
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        }
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if e.code().map(|c| c.code()) == Some("42704") => return Ok(false),
            Err(e) if e.code().map(|c| c.code()) == Some("55006") => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => return Err(EngineError::pg(format!("dropping replication slot {slot}"))(e)),
        }
    }
    Err(EngineError::invalid(
        format!("replication slot {slot} stays active, so it cannot be dropped"),
        "stop the session using it, then delete again",
    ))
}

pub async fn drop_publication(client: &Client, name: &str) -> Result<(), EngineError> {
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {}", ident(name)))
        .await
        .map_err(EngineError::pg(format!("dropping publication {name}")))
}
