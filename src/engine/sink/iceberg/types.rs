//! PostgreSQL column types (as `format_type` names them) → Iceberg types, and the changelog
//! table's schema: the source's columns, then `_op`, `_lsn`, `_seq`, `_commit_time` and
//! `_unchanged`.
//!
//! | PostgreSQL | Iceberg |
//! |---|---|
//! | smallint, integer | int |
//! | bigint | long |
//! | numeric(p,s), p ≤ 38 | decimal(p,s) |
//! | numeric without a typmod (or p > 38) | string (its text form) |
//! | real / double precision | float / double |
//! | boolean | boolean |
//! | text, varchar(n), char(n), name | string |
//! | date | date |
//! | timestamp [without time zone] | timestamp (µs) |
//! | timestamp with time zone | timestamptz (µs, UTC) |
//! | uuid | uuid |
//! | bytea | binary |
//! | json, jsonb | string |
//! | `t[]` (one dimension) of a type above | list of that type |
//! | anything else (time, interval, inet, enums, ...) | string (its text form) |

use iceberg::spec::{ListType, NestedField, NestedFieldRef, PrimitiveType, Schema, Type};

use super::error::IcebergError;
use crate::engine::event::RelationInfo;

/// The change's kind: insert, update, delete or truncate.
pub const OP: &str = "_op";
/// The commit LSN of the change's source transaction.
pub const LSN: &str = "_lsn";
/// The change's order within its transaction (see [`seq`]).
pub const SEQ: &str = "_seq";
/// The source transaction's commit time.
pub const COMMIT_TIME: &str = "_commit_time";

/// The columns an update left out because their TOASTed values did not change and the source did
/// not send them (null when every value is there): the row's values before hold them.
pub const UNCHANGED: &str = "_unchanged";

/// The required metadata columns.
pub const META: [&str; 4] = [OP, LSN, SEQ, COMMIT_TIME];

/// [`UNCHANGED`]'s type: a list of column names.
fn unchanged_type() -> ColType {
    ColType::List(Box::new(ColType::String))
}

/// Whether `name` is one of the changelog's own columns (a source column may not be).
fn is_meta(name: &str) -> bool {
    META.contains(&name) || name == UNCHANGED
}

/// `_seq` of a change: twice its index in the transaction plus one; the delete of the old key that
/// a key-changing update writes comes just before it, at twice the index. (`_lsn`, `_seq`) is
/// unique and orders the changelog as the source applied it.
pub fn seq(ord: i32, old_key_row: bool) -> i64 {
    2 * ord as i64 + if old_key_row { 0 } else { 1 }
}

/// What a source column's text values become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColType {
    Int,
    Long,
    Decimal { precision: u32, scale: u32 },
    Float,
    Double,
    Bool,
    String,
    Date,
    Timestamp,
    Timestamptz,
    Uuid,
    Binary,
    List(Box<ColType>),
}

impl ColType {
    /// The mapping of a `format_type` name (see the module's table).
    pub fn of(pg: &str) -> ColType {
        let t = pg.trim();
        if let Some(elem) = t.strip_suffix("[]") {
            return match ColType::of(elem) {
                // Nested arrays come as `t[]` too (PostgreSQL does not track dimensions); their
                // elements are parsed as one dimension, so a multi-dimensional value is refused.
                ColType::List(_) => ColType::String,
                e => ColType::List(Box::new(e)),
            };
        }
        let (base, typmod) = match t.split_once('(') {
            Some((b, rest)) => {
                let close = rest.find(')').unwrap_or(rest.len());
                let after = rest.get(close + 1..).unwrap_or("").trim();
                (
                    format!("{} {}", b.trim(), after).trim().to_string(),
                    Some(&rest[..close]),
                )
            }
            None => (t.to_string(), None),
        };
        match base.as_str() {
            "smallint" | "integer" => ColType::Int,
            "bigint" => ColType::Long,
            "numeric" => match typmod.map(|m| m.split(',').map(str::trim).collect::<Vec<_>>()) {
                Some(parts) => {
                    let p = parts.first().and_then(|p| p.parse::<u32>().ok());
                    let s = parts
                        .get(1)
                        .and_then(|s| s.parse::<u32>().ok())
                        .unwrap_or(0);
                    match p {
                        Some(p) if (1..=38).contains(&p) && s <= p => ColType::Decimal {
                            precision: p,
                            scale: s,
                        },
                        _ => ColType::String,
                    }
                }
                None => ColType::String,
            },
            "real" => ColType::Float,
            "double precision" => ColType::Double,
            "boolean" => ColType::Bool,
            "date" => ColType::Date,
            "timestamp without time zone" | "timestamp" => ColType::Timestamp,
            "timestamp with time zone" => ColType::Timestamptz,
            "uuid" => ColType::Uuid,
            "bytea" => ColType::Binary,
            _ => ColType::String,
        }
    }

    /// The Iceberg type; list elements get `element_id`.
    pub fn iceberg(&self, element_id: &mut impl FnMut() -> i32) -> Type {
        let p = |t| Type::Primitive(t);
        match self {
            ColType::Int => p(PrimitiveType::Int),
            ColType::Long => p(PrimitiveType::Long),
            ColType::Decimal { precision, scale } => p(PrimitiveType::Decimal {
                precision: *precision,
                scale: *scale,
            }),
            ColType::Float => p(PrimitiveType::Float),
            ColType::Double => p(PrimitiveType::Double),
            ColType::Bool => p(PrimitiveType::Boolean),
            ColType::String => p(PrimitiveType::String),
            ColType::Date => p(PrimitiveType::Date),
            ColType::Timestamp => p(PrimitiveType::Timestamp),
            ColType::Timestamptz => p(PrimitiveType::Timestamptz),
            ColType::Uuid => p(PrimitiveType::Uuid),
            ColType::Binary => p(PrimitiveType::Binary),
            ColType::List(e) => {
                let id = element_id();
                let elem = e.iceberg(element_id);
                Type::List(ListType::new(
                    NestedField::list_element(id, elem, false).into(),
                ))
            }
        }
    }

    /// What an existing Iceberg field of this column may hold: its type for the values of this
    /// layout, or why not.
    fn fits(&self, existing: &Type) -> bool {
        let mut no_ids = || 0;
        match (self, existing) {
            (ColType::List(e), Type::List(l)) => e.fits(&l.element_field.field_type),
            (c, t) => c.iceberg(&mut no_ids) == *t,
        }
    }

    /// Whether Iceberg may use a column of this type as an identifier field.
    fn identifier_ok(&self) -> bool {
        !matches!(self, ColType::Float | ColType::Double | ColType::List(_))
    }
}

/// The changelog schema of a new table: the source's columns (key columns required and identifier
/// fields, the others optional), then the metadata columns.
pub fn initial_schema(rel: &RelationInfo) -> Result<Schema, IcebergError> {
    let mut next = 0;
    let mut id = || {
        next += 1;
        next
    };
    let mut fields: Vec<NestedFieldRef> = Vec::new();
    let mut identifiers = Vec::new();
    // Ids: one per column first (stable whatever the element ids), element ids after.
    let col_ids: Vec<i32> = rel.columns.iter().map(|_| id()).collect();
    let meta_ids: Vec<i32> = META.iter().map(|_| id()).collect();
    let unchanged_id = id();
    if let Some(name) = rel.columns.iter().find(|c| is_meta(c)) {
        return Err(meta_name(rel, name));
    }
    for ((name, ty), (is_key, fid)) in rel
        .columns
        .iter()
        .zip(&rel.types)
        .zip(rel.key.iter().zip(&col_ids))
    {
        let ct = ColType::of(ty);
        let t = ct.iceberg(&mut id);
        let key = *is_key && ct.identifier_ok();
        fields.push(NestedField::new(*fid, name, t, key).into());
        if key {
            identifiers.push(*fid);
        }
    }
    for (name, fid) in META.iter().zip(&meta_ids) {
        fields.push(NestedField::required(*fid, *name, meta_type(name)).into());
    }
    fields.push(
        NestedField::optional(unchanged_id, UNCHANGED, unchanged_type().iceberg(&mut id)).into(),
    );
    Schema::builder()
        .with_schema_id(0)
        .with_fields(fields)
        .with_identifier_field_ids(identifiers)
        .build()
        .map_err(IcebergError::iceberg(format!(
            "building the Iceberg schema of {}",
            rel.qualified()
        )))
}

fn meta_name(rel: &RelationInfo, name: &str) -> IcebergError {
    IcebergError::Schema {
        table: rel.qualified(),
        column: name.to_string(),
        problem: "the name is one of the changelog's own columns (_op, _lsn, _seq, _commit_time, _unchanged)".into(),
    }
}

fn meta_type(name: &str) -> Type {
    Type::Primitive(match name {
        OP => PrimitiveType::String,
        LSN | SEQ => PrimitiveType::Long,
        _ => PrimitiveType::Timestamptz,
    })
}

/// Columns the table's schema lacks, with their Iceberg types, in order: `_unchanged` (tables
/// created before it), then source columns of `rel`. A column whose type no longer fits its field,
/// or named like a changelog column, is refused.
pub fn added_columns(
    schema: &Schema,
    rel: &RelationInfo,
) -> Result<Vec<(String, ColType)>, IcebergError> {
    let mut added = Vec::new();
    if schema.field_by_name(UNCHANGED).is_none() {
        added.push((UNCHANGED.to_string(), unchanged_type()));
    }
    for (name, ty) in rel.columns.iter().zip(&rel.types) {
        let ct = ColType::of(ty);
        if is_meta(name) {
            return Err(meta_name(rel, name));
        }
        match schema.field_by_name(name) {
            None => added.push((name.clone(), ct)),
            Some(f) if !ct.fits(&f.field_type) => {
                return Err(IcebergError::Schema {
                    table: rel.qualified(),
                    column: name.clone(),
                    problem: format!(
                        "the source type {ty} maps to {}, but the Iceberg field is {}",
                        ct.iceberg(&mut || 0),
                        f.field_type
                    ),
                });
            }
            Some(_) => {}
        }
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(cols: &[(&str, &str, bool)]) -> RelationInfo {
        RelationInfo::new(
            "public".into(),
            "t".into(),
            cols.iter().map(|c| c.0.to_string()).collect(),
            cols.iter().map(|c| c.1.to_string()).collect(),
            cols.iter().map(|c| c.2).collect(),
        )
    }

    #[test]
    fn postgres_types_map_as_the_table_says() {
        use ColType::*;
        for (pg, want) in [
            ("smallint", Int),
            ("integer", Int),
            ("bigint", Long),
            (
                "numeric(12,2)",
                Decimal {
                    precision: 12,
                    scale: 2,
                },
            ),
            (
                "numeric(5)",
                Decimal {
                    precision: 5,
                    scale: 0,
                },
            ),
            ("numeric", String),
            ("numeric(60,2)", String),
            ("real", Float),
            ("double precision", Double),
            ("boolean", Bool),
            ("text", String),
            ("character varying(20)", String),
            ("character(3)", String),
            ("date", Date),
            ("timestamp without time zone", Timestamp),
            ("timestamp(3) without time zone", Timestamp),
            ("timestamp with time zone", Timestamptz),
            ("uuid", Uuid),
            ("bytea", Binary),
            ("json", String),
            ("jsonb", String),
            ("integer[]", List(Box::new(Int))),
            ("text[]", List(Box::new(String))),
            ("interval", String),
            ("time without time zone", String),
            ("inet", String),
        ] {
            assert_eq!(ColType::of(pg), want, "{pg}");
        }
    }

    #[test]
    fn the_key_becomes_the_identifier_fields_and_added_columns_are_found() {
        let r = rel(&[
            ("id", "bigint", true),
            ("name", "text", false),
            ("tags", "text[]", false),
        ]);
        let s = initial_schema(&r).unwrap();
        let id = s.field_by_name("id").unwrap();
        assert!(id.required);
        assert_eq!(s.identifier_field_ids().collect::<Vec<_>>(), vec![id.id]);
        assert!(!s.field_by_name("name").unwrap().required);
        for m in META {
            assert!(s.field_by_name(m).unwrap().required, "{m}");
        }
        let unchanged = s.field_by_name(UNCHANGED).unwrap();
        assert!(!unchanged.required);
        assert!(unchanged_type().fits(&unchanged.field_type));
        assert!(added_columns(&s, &r).unwrap().is_empty());
        // A table from before `_unchanged` gets it.
        let older = Schema::builder()
            .with_fields(
                s.as_struct()
                    .fields()
                    .iter()
                    .filter(|f| f.name != UNCHANGED)
                    .cloned(),
            )
            .build()
            .unwrap();
        assert_eq!(
            added_columns(&older, &r).unwrap(),
            vec![(UNCHANGED.to_string(), unchanged_type())]
        );
        let clash = rel(&[("id", "bigint", true), ("_unchanged", "text", false)]);
        assert!(matches!(
            initial_schema(&clash),
            Err(IcebergError::Schema { .. })
        ));
        assert!(matches!(
            added_columns(&s, &clash),
            Err(IcebergError::Schema { .. })
        ));
        let r2 = rel(&[
            ("id", "bigint", true),
            ("name", "text", false),
            ("tags", "text[]", false),
            ("note", "varchar(10)", false),
        ]);
        assert_eq!(
            added_columns(&s, &r2).unwrap(),
            vec![("note".to_string(), ColType::String)]
        );
        let r3 = rel(&[("id", "bigint", true), ("name", "integer", false)]);
        assert!(matches!(
            added_columns(&s, &r3),
            Err(IcebergError::Schema { .. })
        ));
        assert_eq!(seq(0, true), 0);
        assert_eq!(seq(0, false), 1);
        assert!(seq(3, true) < seq(3, false) && seq(3, false) < seq(4, true));
    }
}
