//! SQL text for the PostgreSQL sink. Values travel as `text[]` parameters, one per column, and are cast
//! to the source column type, so every type round-trips through its own text form.

use crate::engine::event::RelationInfo;
use crate::engine::pg::ident;

pub fn table(schema: &str, rel: &RelationInfo) -> String {
    format!("{}.{}", ident(schema), ident(&rel.name))
}

pub fn create_table(schema: &str, rel: &RelationInfo) -> String {
    let cols: Vec<String> = rel
        .columns
        .iter()
        .zip(&rel.types)
        .zip(&rel.key)
        .map(|((c, t), k)| format!("{} {}{}", ident(c), t, if *k { " NOT NULL" } else { "" }))
        .collect();
    let keys: Vec<String> = rel
        .key_indexes()
        .into_iter()
        .map(|i| ident(&rel.columns[i]))
        .collect();
    format!(
        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))",
        table(schema, rel),
        cols.join(", "),
        keys.join(", ")
    )
}

pub fn add_columns(schema: &str, rel: &RelationInfo) -> Vec<String> {
    rel.columns
        .iter()
        .zip(&rel.types)
        .map(|(c, t)| {
            format!(
                "ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}",
                table(schema, rel),
                ident(c),
                t
            )
        })
        .collect()
}

fn unnest(n: usize) -> String {
    let params: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    format!("unnest({}) AS u({})", params.join(", "), names.join(", "))
}

/// Upsert of whole rows: every column, in relation order.
pub fn upsert(schema: &str, rel: &RelationInfo) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| ident(c)).collect();
    let casts: Vec<String> = rel
        .types
        .iter()
        .enumerate()
        .map(|(i, t)| format!("u.c{i}::{t}"))
        .collect();
    let keys: Vec<String> = rel
        .key_indexes()
        .into_iter()
        .map(|i| ident(&rel.columns[i]))
        .collect();
    let sets: Vec<String> = rel
        .columns
        .iter()
        .zip(&rel.key)
        .filter(|(_, k)| !**k)
        .map(|(c, _)| format!("{0} = EXCLUDED.{0}", ident(c)))
        .collect();
    let on_conflict = if sets.is_empty() {
        format!("ON CONFLICT ({}) DO NOTHING", keys.join(", "))
    } else {
        format!(
            "ON CONFLICT ({}) DO UPDATE SET {}",
            keys.join(", "),
            sets.join(", ")
        )
    };
    format!(
        "INSERT INTO {} ({}) SELECT {} FROM {} {}",
        table(schema, rel),
        cols.join(", "),
        casts.join(", "),
        unnest(rel.columns.len()),
        on_conflict
    )
}

/// Bulk insert of whole rows whose keys the sink lacks: every column, in relation order, in COPY's
/// text format (each column's input function reads the same text form the casts of [`upsert`] read).
pub fn copy_in(schema: &str, rel: &RelationInfo) -> String {
    let cols: Vec<String> = rel.columns.iter().map(|c| ident(c)).collect();
    format!(
        "COPY {} ({}) FROM STDIN",
        table(schema, rel),
        cols.join(", ")
    )
}

/// Update of existing rows leaving `unchanged` columns alone. Parameters: every column in order (the
/// unchanged ones are passed but unused), then, when `rekey`, the old key columns.
pub fn update_partial(schema: &str, rel: &RelationInfo, unchanged: &[i16], rekey: bool) -> String {
    let n = rel.columns.len();
    let keys = rel.key_indexes();
    let sets: Vec<String> = (0..n)
        .filter(|i| !unchanged.contains(&(*i as i16)) && (rekey || !rel.key[*i]))
        .map(|i| format!("{} = u.c{i}::{}", ident(&rel.columns[i]), rel.types[i]))
        .collect();
    let total = if rekey { n + keys.len() } else { n };
    let cond: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(j, &i)| {
            let src = if rekey {
                format!("c{}", n + j)
            } else {
                format!("c{i}")
            };
            format!("t.{} = u.{src}::{}", ident(&rel.columns[i]), rel.types[i])
        })
        .collect();
    format!(
        "UPDATE {} AS t SET {} FROM {} WHERE {}",
        table(schema, rel),
        if sets.is_empty() {
            format!("{0} = t.{0}", ident(&rel.columns[keys[0]]))
        } else {
            sets.join(", ")
        },
        unnest(total),
        cond.join(" AND ")
    )
}

/// Delete by key. Parameters: the key columns in key order.
pub fn delete(schema: &str, rel: &RelationInfo) -> String {
    let keys = rel.key_indexes();
    let cond: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(j, &i)| format!("t.{} = u.c{j}::{}", ident(&rel.columns[i]), rel.types[i]))
        .collect();
    format!(
        "DELETE FROM {} AS t USING {} WHERE {}",
        table(schema, rel),
        unnest(keys.len()),
        cond.join(" AND ")
    )
}

/// A source TRUNCATE (or a resync's replace) as a DELETE of every row: TRUNCATE is not MVCC-safe
/// (a reader whose snapshot predates it would see the table empty) and locks readers out until the
/// sink transaction ends; a DELETE leaves readers the old rows until it commits.
pub fn truncate(schema: &str, rel: &RelationInfo) -> String {
    format!("DELETE FROM {}", table(schema, rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel() -> RelationInfo {
        RelationInfo::new(
            "public".into(),
            "orders".into(),
            vec!["id".into(), "amount".into()],
            vec!["bigint".into(), "numeric(12,2)".into()],
            vec![true, false],
        )
    }

    #[test]
    fn statements() {
        assert_eq!(
            create_table("replica", &rel()),
            r#"CREATE TABLE IF NOT EXISTS "replica"."orders" ("id" bigint NOT NULL, "amount" numeric(12,2), PRIMARY KEY ("id"))"#
        );
        assert_eq!(
            upsert("replica", &rel()),
            r#"INSERT INTO "replica"."orders" ("id", "amount") SELECT u.c0::bigint, u.c1::numeric(12,2) FROM unnest($1::text[], $2::text[]) AS u(c0, c1) ON CONFLICT ("id") DO UPDATE SET "amount" = EXCLUDED."amount""#
        );
        assert_eq!(
            copy_in("replica", &rel()),
            r#"COPY "replica"."orders" ("id", "amount") FROM STDIN"#
        );
        assert_eq!(
            delete("replica", &rel()),
            r#"DELETE FROM "replica"."orders" AS t USING unnest($1::text[]) AS u(c0) WHERE t."id" = u.c0::bigint"#
        );
        assert_eq!(
            update_partial("replica", &rel(), &[1], false),
            r#"UPDATE "replica"."orders" AS t SET "id" = t."id" FROM unnest($1::text[], $2::text[]) AS u(c0, c1) WHERE t."id" = u.c0::bigint"#
        );
        assert_eq!(
            update_partial("replica", &rel(), &[1], true),
            r#"UPDATE "replica"."orders" AS t SET "id" = u.c0::bigint FROM unnest($1::text[], $2::text[], $3::text[]) AS u(c0, c1, c2) WHERE t."id" = u.c2::bigint"#
        );
    }
}
