//! The sink table's primary key follows the source's replica identity. pgoutput sends a relation's
//! current layout only, so a renamed key column arrives as a key column the sink table lacks while
//! the sink's primary key names a column the relation no longer has; and a replica identity moved to
//! another index arrives as other key flags. Left alone, either refuses every upsert (SQLSTATE 42P10).

use std::collections::HashMap;

use crate::engine::event::{Event, RelationInfo};
use crate::engine::pg::ident;
use crate::engine::sink::sql::table;

/// One column of an existing sink table.
#[derive(Debug, Clone, PartialEq)]
pub struct SinkColumn {
    pub name: String,
    /// `format_type` in the sink.
    pub ty: String,
    /// 1-based place in the primary key, if in it.
    pub pk_pos: Option<i32>,
}

/// The catalog query [`SinkColumn`]s are read with: `$1` the table (`regclass` text), in column order.
pub const COLUMNS: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), \
     array_position(i.indkey::int2[], a.attnum)::int4 \
     FROM pg_attribute a LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
     WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum";

/// What to change in the sink table before missing columns are added (`renames`) and after
/// (`new_key`, the primary key made again on the relation's key columns).
#[derive(Debug, Default, PartialEq)]
pub struct KeyChange {
    pub renames: Vec<String>,
    pub new_key: Option<String>,
}

/// Compares the relation's key with the sink table's primary key.
///
/// The rule for a rename: the relation's key names columns the sink table lacks, the sink's
/// primary key names as many columns the relation lacks, with the same types in key order. A key
/// column cannot be dropped at the source without the table losing its identity, so these are the
/// same columns under new names, renamed in the sink (their values kept). Any other difference of
/// key columns rebuilds the primary key on the relation's key columns.
pub fn plan(schema: &str, rel: &RelationInfo, sink: &[SinkColumn], pk_name: &str) -> KeyChange {
    let t = table(schema, rel);
    let has = |name: &str| sink.iter().any(|c| c.name == name);
    let in_rel = |name: &str| rel.columns.iter().any(|c| c == name);
    let mut sink_key: Vec<&SinkColumn> = sink.iter().filter(|c| c.pk_pos.is_some()).collect();
    sink_key.sort_by_key(|c| c.pk_pos);
    let rel_key: Vec<(&str, &str)> = rel
        .key_indexes()
        .into_iter()
        .map(|i| (rel.columns[i].as_str(), rel.types[i].as_str()))
        .collect();

    let new_names: Vec<(&str, &str)> = rel_key.iter().copied().filter(|(c, _)| !has(c)).collect();
    let gone: Vec<&SinkColumn> = sink_key
        .iter()
        .copied()
        .filter(|c| !in_rel(&c.name))
        .collect();
    let mut change = KeyChange::default();
    let mut key_after: Vec<String> = sink_key.iter().map(|c| c.name.clone()).collect();
    if !new_names.is_empty()
        && new_names.len() == gone.len()
        && new_names
            .iter()
            .zip(&gone)
            .all(|((_, ty), old)| *ty == old.ty)
    {
        for ((new, _), old) in new_names.iter().zip(&gone) {
            change.renames.push(format!(
                "ALTER TABLE {t} RENAME COLUMN {} TO {}",
                ident(&old.name),
                ident(new)
            ));
            for k in key_after.iter_mut().filter(|k| **k == old.name) {
                *k = new.to_string();
            }
        }
    }
    let mut want: Vec<&str> = rel_key.iter().map(|(c, _)| *c).collect();
    let mut have: Vec<&str> = key_after.iter().map(String::as_str).collect();
    want.sort_unstable();
    have.sort_unstable();
    if want != have && !want.is_empty() {
        let cols: Vec<String> = rel_key.iter().map(|(c, _)| ident(c)).collect();
        let drop = if sink_key.is_empty() {
            String::new()
        } else {
            format!("DROP CONSTRAINT {}, ", ident(pk_name))
        };
        change.new_key = Some(format!(
            "ALTER TABLE {t} {drop}ADD PRIMARY KEY ({})",
            cols.join(", ")
        ));
    }
    change
}

/// The key column names of `rel`, in key order.
fn key_names(rel: &RelationInfo) -> Vec<&str> {
    rel.key_indexes()
        .into_iter()
        .map(|i| rel.columns[i].as_str())
        .collect()
}

/// The index of the first event whose table's key columns have other names than in an earlier
/// event of `events`: a key renamed at the source. The sink renames its columns when it meets the
/// new layout, outside any transaction, so the changes before this point must be committed first.
pub fn layout_break<'a>(
    events: impl IntoIterator<Item = &'a Event>,
    rels: &HashMap<i64, RelationInfo>,
) -> Option<usize> {
    // Cheap for the common case: no table has had two layouts with different keys.
    let mut keys: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    let renamed = rels.values().any(|r| {
        let k = key_names(r);
        keys.insert((r.schema.as_str(), r.name.as_str()), k.clone())
            .is_some_and(|old| old != k)
    });
    if !renamed {
        return None;
    }
    let mut seen: HashMap<(&str, &str), (i64, Vec<&str>)> = HashMap::new();
    for (i, e) in events.into_iter().enumerate() {
        let Some(rel) = rels.get(&e.rel_ver) else {
            continue;
        };
        match seen.get(&(rel.schema.as_str(), rel.name.as_str())) {
            Some((v, _)) if *v == e.rel_ver => {}
            Some((_, keys)) if *keys != key_names(rel) => return Some(i),
            _ => {
                seen.insert(
                    (rel.schema.as_str(), rel.name.as_str()),
                    (e.rel_ver, key_names(rel)),
                );
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(cols: &[&str], key: &[bool]) -> RelationInfo {
        RelationInfo::new(
            "public".into(),
            "k".into(),
            cols.iter().map(|c| c.to_string()).collect(),
            cols.iter().map(|_| "integer".to_string()).collect(),
            key.to_vec(),
        )
    }

    fn col(name: &str, pk_pos: Option<i32>) -> SinkColumn {
        SinkColumn {
            name: name.into(),
            ty: "integer".into(),
            pk_pos,
        }
    }

    #[test]
    fn the_same_key_changes_nothing() {
        let sink = [col("id", Some(1)), col("v", None)];
        let got = plan("r", &rel(&["id", "v"], &[true, false]), &sink, "k_pkey");
        assert_eq!(got, KeyChange::default());
    }

    #[test]
    fn a_renamed_key_column_is_renamed() {
        let sink = [col("id", Some(1)), col("v", None)];
        let got = plan("r", &rel(&["kid", "v"], &[true, false]), &sink, "k_pkey");
        assert_eq!(
            got.renames,
            [r#"ALTER TABLE "r"."k" RENAME COLUMN "id" TO "kid""#]
        );
        assert_eq!(got.new_key, None);
    }

    #[test]
    fn a_renamed_key_column_of_another_type_rebuilds_the_key() {
        let sink = [
            SinkColumn {
                ty: "text".into(),
                ..col("id", Some(1))
            },
            col("v", None),
        ];
        let got = plan("r", &rel(&["kid", "v"], &[true, false]), &sink, "k_pkey");
        assert!(got.renames.is_empty());
        assert_eq!(
            got.new_key.as_deref(),
            Some(r#"ALTER TABLE "r"."k" DROP CONSTRAINT "k_pkey", ADD PRIMARY KEY ("kid")"#)
        );
    }

    #[test]
    fn a_key_moved_to_other_columns_rebuilds_the_key() {
        let sink = [col("id", Some(1)), col("code", None)];
        let got = plan("r", &rel(&["id", "code"], &[false, true]), &sink, "k_pkey");
        assert!(got.renames.is_empty());
        assert_eq!(
            got.new_key.as_deref(),
            Some(r#"ALTER TABLE "r"."k" DROP CONSTRAINT "k_pkey", ADD PRIMARY KEY ("code")"#)
        );
    }

    #[test]
    fn one_of_two_key_columns_renamed() {
        let sink = [col("a", Some(1)), col("b", Some(2)), col("v", None)];
        let got = plan(
            "r",
            &rel(&["a", "b2", "v"], &[true, true, false]),
            &sink,
            "k_pkey",
        );
        assert_eq!(
            got.renames,
            [r#"ALTER TABLE "r"."k" RENAME COLUMN "b" TO "b2""#]
        );
        assert_eq!(got.new_key, None);
    }

    #[test]
    fn a_batch_breaks_where_a_key_is_renamed() {
        use crate::engine::event::{Op, Position};
        let a = rel(&["id", "v"], &[true, false]);
        let b = rel(&["kid", "v"], &[true, false]);
        let wider = rel(&["id", "v", "w"], &[true, false, false]);
        let rels: HashMap<i64, RelationInfo> = [&a, &b, &wider]
            .into_iter()
            .map(|r| (r.rel_ver, r.clone()))
            .collect();
        let ev = |ord: i32, r: &RelationInfo| Event {
            pos: Position { lsn: 1, ord },
            commit_time: 0,
            rel_ver: r.rel_ver,
            op: Op::Insert,
            old_key: None,
            vals: None,
            unchanged: None,
        };
        // An added column keeps the key: no break.
        assert_eq!(layout_break(&[ev(0, &a), ev(1, &wider)], &rels), None);
        assert_eq!(
            layout_break(&[ev(0, &a), ev(1, &wider), ev(2, &b), ev(3, &a)], &rels),
            Some(2)
        );
    }
}
