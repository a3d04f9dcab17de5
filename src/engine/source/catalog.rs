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

/// Columns with their types and whether each is part of the key Philotes uses: the replica identity
/// index for `REPLICA IDENTITY USING INDEX`, else the primary key (also for FULL, whose old rows
/// carry every column; FULL without a primary key has no key and is refused).
const LAYOUT_SQL: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
     coalesce(a.attnum = ANY(k.indkey), false) \
     FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
     LEFT JOIN LATERAL (SELECT i.indkey FROM pg_index i WHERE i.indrelid = c.oid \
       AND CASE c.relreplident WHEN 'i' THEN i.indisreplident WHEN 'n' THEN false ELSE i.indisprimary END \
       LIMIT 1) k ON true \
     WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' ORDER BY a.attnum";

/// Why a table has no key, and the fix, from its replica identity (`d`, `n`, `f`, `i`).
pub fn no_key(table: &str, identity: u8) -> (String, String) {
    match identity {
        b'n' => (
            format!(
                "table {table} has REPLICA IDENTITY NOTHING, so its updates and deletes carry no key"
            ),
            format!(
                "ALTER TABLE {table} REPLICA IDENTITY DEFAULT (with a primary key), or USING INDEX on a unique index of NOT NULL columns"
            ),
        ),
        b'f' => (
            format!(
                "table {table} has REPLICA IDENTITY FULL but no primary key; Philotes needs a key to apply updates and deletes to the sink"
            ),
            format!(
                "add a primary key to {table}, or ALTER TABLE {table} REPLICA IDENTITY USING INDEX on a unique index of NOT NULL columns"
            ),
        ),
        _ => (
            format!("table {table} has no primary key"),
            format!(
                "add a primary key (ALTER TABLE {table} ADD PRIMARY KEY (...)), or REPLICA IDENTITY USING INDEX on a unique index, or remove the table from spec.source.tables"
            ),
        ),
    }
}

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
        let found = client
            .query_opt(
                "SELECT c.oid, c.relreplident::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                &[&t.schema, &t.name],
            )
            .await
            .map_err(EngineError::pg("looking up a source table"))?;
        let Some(found) = found else {
            return Err(EngineError::invalid(
                format!(
                    "spec.source.tables[{i}]: table {t} does not exist in source database {db}"
                ),
                "create the table, or correct or remove the entry in spec.source.tables",
            ));
        };
        let oid: u32 = found.get(0);
        let identity = found.get::<_, String>(1).bytes().next().unwrap_or(b'd');
        let rel = layout_of(client, oid, &t.schema, &t.name, None).await?;
        if !rel.key.iter().any(|k| *k) {
            let (problem, fix) = no_key(&t.to_string(), identity);
            return Err(EngineError::invalid(
                format!("spec.source.tables[{i}]: {problem}"),
                fix,
            ));
        }
        out.push(rel);
    }
    Ok(out)
}

/// A column as a Relation message describes it.
pub struct SentColumn {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Flagged as part of the replica identity.
    pub is_key: bool,
}

/// Layout of relation `oid`: from the catalog as it is now when `sent` is None; else the columns a
/// Relation message sent, whose key flags are the key (except for REPLICA IDENTITY FULL, which flags
/// every column: then the primary key is looked up by column name). The flags need no catalog, so a
/// table dropped since the change was made still gets its layout.
pub async fn layout_of(
    client: &Client,
    oid: u32,
    schema: &str,
    name: &str,
    sent: Option<(&[SentColumn], u8)>,
) -> Result<RelationInfo, EngineError> {
    let catalog = || async {
        let rows = client
            .query(LAYOUT_SQL, &[&oid])
            .await
            .map_err(EngineError::pg(format!(
                "reading the layout of {schema}.{name}"
            )))?;
        Ok::<Vec<(String, String, bool)>, EngineError>(
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect(),
        )
    };
    let (names, types, key) = match sent {
        None => {
            let catalog = catalog().await?;
            (
                catalog.iter().map(|c| c.0.clone()).collect(),
                catalog.iter().map(|c| c.1.clone()).collect(),
                catalog.iter().map(|c| c.2).collect(),
            )
        }
        Some((cols, identity)) => {
            let oids: Vec<u32> = cols.iter().map(|c| c.type_oid).collect();
            let mods: Vec<i32> = cols.iter().map(|c| c.type_modifier).collect();
            let type_rows = client
                .query(
                    "SELECT format_type(t, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS x(t, m, n) ORDER BY n",
                    &[&oids, &mods],
                )
                .await
                .map_err(EngineError::pg("naming column types"))?;
            let types: Vec<String> = type_rows.iter().map(|r| r.get(0)).collect();
            let key = if identity == b'f' {
                let catalog = catalog().await?;
                cols.iter()
                    .map(|c| catalog.iter().any(|k| k.0 == c.name && k.2))
                    .collect()
            } else {
                cols.iter().map(|c| c.is_key).collect()
            };
            (cols.iter().map(|c| c.name.clone()).collect(), types, key)
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
/// Publications are made with `publish_via_partition_root`, so a partitioned table's changes arrive
/// as changes of the table itself (one sink table), not of its partitions.
pub async fn ensure_publication(
    client: &Client,
    name: &str,
    tables: &[TableName],
    owned: bool,
) -> Result<bool, EngineError> {
    let exists = client
        .query_opt(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(EngineError::pg("looking up the publication"))?;
    match exists {
        None => {
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)",
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
                    "ALTER PUBLICATION {0} SET TABLE {1}; ALTER PUBLICATION {0} SET (publish_via_partition_root = true)",
                    ident(name),
                    table_list(tables)
                ))
                .await
                .map_err(EngineError::pg(format!(
                    "updating the tables of publication {name}"
                )))?;
            Ok(false)
        }
        Some(row) => {
            let via_root: bool = row.get(0);
            let partitioned = client
                .query_opt(
                    "SELECT n.nspname::text || '.' || c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     JOIN unnest($1::text[], $2::text[]) AS t(s, r) ON n.nspname = t.s AND c.relname = t.r WHERE c.relkind = 'p' LIMIT 1",
                    &[
                        &tables.iter().map(|t| t.schema.as_str()).collect::<Vec<_>>(),
                        &tables.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
                    ],
                )
                .await
                .map_err(EngineError::pg("looking up partitioned tables"))?;
            if let (false, Some(p)) = (via_root, partitioned) {
                let p: String = p.get(0);
                return Err(EngineError::invalid(
                    format!(
                        "spec.source.publication: publication {name} publishes the partitions of partitioned table {p}, not the table"
                    ),
                    format!(
                        "ALTER PUBLICATION {} SET (publish_via_partition_root = true), or leave spec.source.publication empty so Philotes manages its own",
                        ident(name)
                    ),
                ));
            }
            let rows = client
                .query(
                    "SELECT schemaname::text, tablename::text, rowfilter IS NOT NULL, \
                       attnames::text[] IS DISTINCT FROM (SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a \
                         WHERE a.attrelid = format('%I.%I', schemaname, tablename)::regclass AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '') \
                     FROM pg_publication_tables WHERE pubname = $1",
                    &[&name],
                )
                .await
                .map_err(EngineError::pg("reading the publication's tables"))?;
            let have: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            // Row filters and column lists: the initial snapshot and the sink tables would not match
            // what the publication sends, so such a publication is refused.
            if let Some(r) = rows.iter().find(|r| {
                tables
                    .iter()
                    .any(|t| t.schema == r.get::<_, String>(0) && t.name == r.get::<_, String>(1))
                    && (r.get::<_, bool>(2) || r.get::<_, bool>(3))
            }) {
                let t = TableName {
                    schema: r.get(0),
                    name: r.get(1),
                };
                return Err(EngineError::invalid(
                    format!(
                        "spec.source.publication: publication {name} has a row filter or column list for table {t}; Philotes copies and replicates whole tables"
                    ),
                    format!(
                        "publish {t} without a WHERE clause or column list, or leave spec.source.publication empty so Philotes manages its own"
                    ),
                ));
            }
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

/// A slot as `pg_replication_slots` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotState {
    /// Confirmed position (empty before the first confirmation).
    pub confirmed: String,
    /// WAL the slot retains beyond its confirmed position, in bytes.
    pub lag: i64,
    pub wal_status: Option<String>,
    pub safe_wal_size: Option<i64>,
}

/// The slot's position and WAL state; None if the slot is gone.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, EngineError> {
    let row = client
        .query_opt(
            "SELECT coalesce(confirmed_flush_lsn::text, ''), \
             coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::int8, \
             wal_status::text, safe_wal_size::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(EngineError::pg("reading the slot position"))?;
    Ok(row.map(|r| SlotState {
        confirmed: r.get(0),
        lag: r.get(1),
        wal_status: r.get(2),
        safe_wal_size: r.get(3),
    }))
}

/// Ends the walsender of an earlier owner still holding the slot (only once this owner has taken
/// the pipeline, so that the earlier one can no longer write). Returns how many were ended.
pub async fn release_slot(client: &Client, slot: &str) -> Result<u64, EngineError> {
    let rows = client
        .query(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active_pid IS NOT NULL",
            &[&slot],
        )
        .await
        .map_err(EngineError::pg("ending an earlier owner's replication session"))?;
    Ok(rows.len() as u64)
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
