//! PostgreSQL text values → Arrow arrays of the Iceberg table's Arrow schema: the changelog rows of
//! a table's changes, as one `RecordBatch`. What a column holds is decided by its Arrow type (from
//! the Iceberg schema), so values always fit the file they go to.

use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Date32Builder, Decimal128Builder, FixedSizeBinaryBuilder, Float32Builder,
    Float64Builder, Int32Builder, Int64Builder, LargeBinaryBuilder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow_array::{ArrayRef, ListArray, RecordBatch};
use arrow_buffer::{NullBuffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{DataType, Field, SchemaRef, TimeUnit};

use super::types::{COMMIT_TIME, LSN, OP, SEQ, UNCHANGED, seq};
use crate::engine::event::{Event, Op, RelationInfo};

/// Microseconds between the Unix epoch and 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// One changelog row: values by source column (text form), and the metadata columns.
struct Row<'a> {
    vals: Vec<Option<&'a str>>,
    op: &'static str,
    lsn: i64,
    seq: i64,
    commit_time: i64,
    /// Columns left out: unchanged TOASTed values the source did not send.
    unchanged: Vec<&'a str>,
}

/// Why a value does not fit: the column and the problem.
#[derive(Debug, Clone, PartialEq)]
pub struct BadValue {
    pub column: String,
    pub problem: String,
}

/// The changelog rows of `events` (all of one table, each with its relation layout). A key-changing
/// update writes a delete of the old key first; deletes carry the key; a truncate carries zero
/// values in the key columns (Iceberg identifier fields cannot be null).
pub fn record_batch<'a>(
    schema: &SchemaRef,
    events: &[(&'a Event, &'a RelationInfo)],
) -> Result<RecordBatch, BadValue> {
    let mut rows: Vec<(Row<'a>, &'a RelationInfo)> = Vec::with_capacity(events.len());
    for (e, rel) in events {
        let width = rel.columns.len();
        let keys = rel.key_indexes();
        let meta = |op: &'static str, old: bool| (op, e.pos.lsn as i64, seq(e.pos.ord, old));
        let commit_time = e.commit_time + PG_EPOCH_MICROS;
        let from_key = |key: &'a Option<Vec<Option<String>>>| key_row(&keys, width, key);
        match e.op {
            Op::Insert | Op::Update => {
                if e.op == Op::Update && e.old_key.is_some() {
                    let (op, lsn, seq) = meta("delete", true);
                    rows.push((
                        Row {
                            vals: from_key(&e.old_key),
                            op,
                            lsn,
                            seq,
                            commit_time,
                            unchanged: Vec::new(),
                        },
                        rel,
                    ));
                }
                let unchanged = e
                    .unchanged
                    .iter()
                    .flatten()
                    .filter_map(|&i| rel.columns.get(usize::try_from(i).ok()?))
                    .map(String::as_str)
                    .collect();
                let mut vals: Vec<Option<&str>> = vec![None; width];
                for (v, s) in vals.iter_mut().zip(e.vals.iter().flatten()) {
                    *v = s.as_deref();
                }
                let (op, lsn, seq) = meta(e.op.name(), false);
                rows.push((
                    Row {
                        vals,
                        op,
                        lsn,
                        seq,
                        commit_time,
                        unchanged,
                    },
                    rel,
                ));
            }
            Op::Delete => {
                let (op, lsn, seq) = meta("delete", false);
                rows.push((
                    Row {
                        vals: from_key(&e.old_key),
                        op,
                        lsn,
                        seq,
                        commit_time,
                        unchanged: Vec::new(),
                    },
                    rel,
                ));
            }
            Op::Truncate => {
                let (op, lsn, seq) = meta("truncate", false);
                rows.push((
                    Row {
                        vals: vec![None; width],
                        op,
                        lsn,
                        seq,
                        commit_time,
                        unchanged: Vec::new(),
                    },
                    rel,
                ));
            }
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        let name = field.name().as_str();
        let col: ArrayRef = match name {
            OP => {
                let mut b = StringBuilder::with_capacity(rows.len(), rows.len() * 6);
                for (r, _) in &rows {
                    b.append_value(r.op);
                }
                Arc::new(b.finish())
            }
            LSN | SEQ => {
                let mut b = Int64Builder::with_capacity(rows.len());
                for (r, _) in &rows {
                    b.append_value(if name == LSN { r.lsn } else { r.seq });
                }
                Arc::new(b.finish())
            }
            COMMIT_TIME => {
                let tz = match field.data_type() {
                    DataType::Timestamp(_, tz) => tz.clone(),
                    _ => None,
                };
                let mut b =
                    TimestampMicrosecondBuilder::with_capacity(rows.len()).with_timezone_opt(tz);
                for (r, _) in &rows {
                    b.append_value(r.commit_time);
                }
                Arc::new(b.finish())
            }
            UNCHANGED => {
                let DataType::List(elem) = field.data_type() else {
                    return Err(BadValue {
                        column: name.to_string(),
                        problem: format!("the field is {}, not a list", field.data_type()),
                    });
                };
                names(elem, rows.iter().map(|(r, _)| &r.unchanged[..]))?
            }
            _ => {
                let vals: Vec<Option<&str>> = rows
                    .iter()
                    .map(|(r, rel)| {
                        let i = rel.columns.iter().position(|c| c == name)?;
                        match r.vals.get(i).copied().flatten() {
                            Some(v) => Some(v),
                            // Identifier fields are required: a truncate's row gets zeroes.
                            None if !field.is_nullable() && r.op == "truncate" => {
                                Some(zero(field.data_type()))
                            }
                            None => None,
                        }
                    })
                    .collect();
                if !field.is_nullable() && vals.iter().any(Option::is_none) {
                    return Err(BadValue {
                        column: name.to_string(),
                        problem: "a key column has no value (the source sent none)".into(),
                    });
                }
                array(field.data_type(), &vals).map_err(|problem| BadValue {
                    column: name.to_string(),
                    problem,
                })?
            }
        };
        columns.push(col);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| BadValue {
        column: String::new(),
        problem: e.to_string(),
    })
}

/// The `_unchanged` column: each row's list of names, null when empty.
fn names<'r, 'a: 'r>(
    elem: &Arc<Field>,
    lists: impl Iterator<Item = &'r [&'a str]>,
) -> Result<ArrayRef, BadValue> {
    let bad = |problem: String| BadValue {
        column: UNCHANGED.to_string(),
        problem,
    };
    let mut offsets: Vec<i32> = vec![0];
    let mut valid = Vec::new();
    let mut items: Vec<Option<&str>> = Vec::new();
    for l in lists {
        items.extend(l.iter().map(|n| Some(*n)));
        offsets.push(i32::try_from(items.len()).map_err(|_| bad("too many names".into()))?);
        valid.push(!l.is_empty());
    }
    let child = array(elem.data_type(), &items).map_err(bad)?;
    ListArray::try_new(
        elem.clone(),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        child,
        Some(NullBuffer::from(valid)),
    )
    .map(|a| Arc::new(a) as ArrayRef)
    .map_err(|e| bad(e.to_string()))
}

/// A row of `width` columns holding only the key values (in key order, as deletes carry them).
fn key_row<'a>(
    keys: &[usize],
    width: usize,
    key: &'a Option<Vec<Option<String>>>,
) -> Vec<Option<&'a str>> {
    let mut vals: Vec<Option<&str>> = vec![None; width];
    for (k, v) in keys.iter().zip(key.iter().flatten()) {
        if let Some(slot) = vals.get_mut(*k) {
            *slot = v.as_deref();
        }
    }
    vals
}

/// The text of a zero value of a type (a truncate's key columns).
fn zero(dt: &DataType) -> &'static str {
    match dt {
        DataType::Boolean => "f",
        DataType::Utf8 | DataType::LargeUtf8 => "",
        DataType::Date32 => "1970-01-01",
        DataType::Timestamp(_, None) => "1970-01-01 00:00:00",
        DataType::Timestamp(_, Some(_)) => "1970-01-01 00:00:00+00",
        DataType::FixedSizeBinary(_) => "00000000-0000-0000-0000-000000000000",
        DataType::LargeBinary | DataType::Binary => "\\x",
        DataType::List(_) => "{}",
        _ => "0",
    }
}

/// The array of a column of type `dt` from text values.
fn array(dt: &DataType, vals: &[Option<&str>]) -> Result<ArrayRef, String> {
    fn each<B, T>(
        vals: &[Option<&str>],
        mut b: B,
        parse: impl Fn(&str) -> Result<T, String>,
        append: impl Fn(&mut B, Option<T>) -> Result<(), String>,
    ) -> Result<B, String> {
        for v in vals {
            let parsed = match v {
                Some(t) => Some(parse(t).map_err(|e| format!("{t:?}: {e}"))?),
                None => None,
            };
            append(&mut b, parsed)?;
        }
        Ok(b)
    }
    let n = vals.len();
    Ok(match dt {
        DataType::Int32 => Arc::new(
            each(
                vals,
                Int32Builder::with_capacity(n),
                |t| t.parse::<i32>().map_err(|e| e.to_string()),
                |b, v| {
                    b.append_option(v);
                    Ok(())
                },
            )?
            .finish(),
        ),
        DataType::Int64 => Arc::new(
            each(
                vals,
                Int64Builder::with_capacity(n),
                |t| t.parse::<i64>().map_err(|e| e.to_string()),
                |b, v| {
                    b.append_option(v);
                    Ok(())
                },
            )?
            .finish(),
        ),
        DataType::Float32 => Arc::new(
            each(
                vals,
                Float32Builder::with_capacity(n),
                |t| t.parse::<f32>().map_err(|e| e.to_string()),
                |b, v| {
                    b.append_option(v);
                    Ok(())
                },
            )?
            .finish(),
        ),
        DataType::Float64 => Arc::new(
            each(
                vals,
                Float64Builder::with_capacity(n),
                |t| t.parse::<f64>().map_err(|e| e.to_string()),
                |b, v| {
                    b.append_option(v);
                    Ok(())
                },
            )?
            .finish(),
        ),
        DataType::Boolean => Arc::new(
            each(
                vals,
                BooleanBuilder::with_capacity(n),
                parse_bool,
                |b, v| {
                    b.append_option(v);
                    Ok(())
                },
            )?
            .finish(),
        ),
        DataType::Decimal128(p, s) => {
            let scale = u32::try_from(*s).map_err(|_| "negative scale".to_string())?;
            let b = Decimal128Builder::with_capacity(n)
                .with_precision_and_scale(*p, *s)
                .map_err(|e| e.to_string())?;
            Arc::new(
                each(
                    vals,
                    b,
                    |t| parse_decimal(t, *p as u32, scale),
                    |b, v| {
                        b.append_option(v);
                        Ok(())
                    },
                )?
                .finish(),
            )
        }
        DataType::Utf8 => {
            let bytes = vals.iter().flatten().map(|v| v.len()).sum();
            let mut b = StringBuilder::with_capacity(n, bytes);
            for v in vals {
                b.append_option(*v);
            }
            Arc::new(b.finish())
        }
        DataType::Date32 => Arc::new(
            each(vals, Date32Builder::with_capacity(n), parse_date, |b, v| {
                b.append_option(v);
                Ok(())
            })?
            .finish(),
        ),
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone_opt(tz.clone());
            let with_zone = tz.is_some();
            Arc::new(
                each(
                    vals,
                    b,
                    |t| parse_timestamp(t, with_zone),
                    |b, v| {
                        b.append_option(v);
                        Ok(())
                    },
                )?
                .finish(),
            )
        }
        DataType::FixedSizeBinary(16) => Arc::new(
            each(
                vals,
                FixedSizeBinaryBuilder::with_capacity(n, 16),
                parse_uuid,
                |b, v| match v {
                    Some(u) => b.append_value(u).map_err(|e| e.to_string()),
                    None => {
                        b.append_null();
                        Ok(())
                    }
                },
            )?
            .finish(),
        ),
        DataType::LargeBinary => Arc::new(
            each(
                vals,
                LargeBinaryBuilder::with_capacity(n, 0),
                parse_bytea,
                |b, v| {
                    b.append_option(v);
                    Ok(())
                },
            )?
            .finish(),
        ),
        DataType::List(elem) => list(elem, vals)?,
        other => return Err(format!("the sink cannot write Arrow type {other}")),
    })
}

fn list(elem: &Arc<Field>, vals: &[Option<&str>]) -> Result<ArrayRef, String> {
    let mut offsets: Vec<i32> = Vec::with_capacity(vals.len() + 1);
    offsets.push(0);
    let mut valid = Vec::with_capacity(vals.len());
    let mut items: Vec<Option<String>> = Vec::new();
    for v in vals {
        match v {
            Some(t) => {
                items.extend(parse_array(t).map_err(|e| format!("{t:?}: {e}"))?);
                valid.push(true);
            }
            None => valid.push(false),
        }
        let end = i32::try_from(items.len())
            .map_err(|_| "too many array elements in one batch".to_string())?;
        offsets.push(end);
    }
    let refs: Vec<Option<&str>> = items.iter().map(|i| i.as_deref()).collect();
    let child = array(elem.data_type(), &refs)?;
    let nulls = Some(NullBuffer::from(valid));
    ListArray::try_new(
        elem.clone(),
        OffsetBuffer::new(ScalarBuffer::from(offsets)),
        child,
        nulls,
    )
    .map(|a| Arc::new(a) as ArrayRef)
    .map_err(|e| e.to_string())
}

pub fn parse_bool(t: &str) -> Result<bool, String> {
    match t {
        "t" | "true" => Ok(true),
        "f" | "false" => Ok(false),
        _ => Err("not a boolean".into()),
    }
}

/// `-123.45` with scale 2 → -12345; more fraction digits than the scale, or more digits than the
/// precision, are refused (as are NaN and infinities, which Iceberg decimals cannot hold).
pub fn parse_decimal(t: &str, precision: u32, scale: u32) -> Result<i128, String> {
    let (neg, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err("not a decimal number".into());
    }
    if frac.len() > scale as usize {
        return Err(format!("more than {scale} digits after the point"));
    }
    let int = int.trim_start_matches('0');
    if int.len() + scale as usize > precision as usize {
        return Err(format!("more than {precision} digits"));
    }
    let mut v: i128 = 0;
    for b in int.bytes().chain(frac.bytes()) {
        v = v * 10 + (b - b'0') as i128;
    }
    for _ in frac.len()..scale as usize {
        v *= 10;
    }
    Ok(if neg { -v } else { v })
}

/// Days since 1970-01-01 of an ISO date.
pub fn parse_date(t: &str) -> Result<i32, String> {
    let d = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d")
        .map_err(|_| "not a date Iceberg can hold (BC dates and infinity are not)".to_string())?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).ok_or("no epoch")?;
    i32::try_from((d - epoch).num_days()).map_err(|_| "out of range".into())
}

/// Microseconds since the Unix epoch of `timestamp` (`2024-01-02 03:04:05.123456`) or `timestamptz`
/// text (the same with an offset, `+00` in the UTC sessions Philotes uses).
pub fn parse_timestamp(t: &str, with_zone: bool) -> Result<i64, String> {
    let bad = |_| "not a timestamp Iceberg can hold (BC and infinity are not)".to_string();
    if with_zone {
        let dt = chrono::DateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f%#z").map_err(bad)?;
        Ok(dt.timestamp_micros())
    } else {
        let dt = chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.f").map_err(bad)?;
        Ok(dt.and_utc().timestamp_micros())
    }
}

pub fn parse_uuid(t: &str) -> Result<[u8; 16], String> {
    let hex: Vec<u8> = t.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return Err("not a uuid".into());
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Ok(out)
}

fn nibble(b: u8) -> Result<u8, String> {
    match b {
        b'0'..=b'9' => Ok(b - b'0'),
        b'a'..=b'f' => Ok(b - b'a' + 10),
        b'A'..=b'F' => Ok(b - b'A' + 10),
        _ => Err("not a hex digit".into()),
    }
}

/// `bytea` in hex output (`\x0102`, the `bytea_output` Philotes sets).
pub fn parse_bytea(t: &str) -> Result<Vec<u8>, String> {
    let hex = t
        .strip_prefix("\\x")
        .ok_or("not bytea hex output".to_string())?
        .as_bytes();
    if hex.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    hex.chunks(2)
        .map(|p| Ok((nibble(p[0])? << 4) | nibble(p[1])?))
        .collect()
}

/// The elements of a one-dimensional array's text form (`{1,NULL,"a,b"}`); `None` is NULL.
pub fn parse_array(t: &str) -> Result<Vec<Option<String>>, String> {
    let inner = t
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .ok_or("not an array (or one with explicit bounds)".to_string())?;
    let mut out = Vec::new();
    if inner.is_empty() {
        return Ok(out);
    }
    let mut chars = inner.chars().peekable();
    loop {
        match chars.peek() {
            Some('"') => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('\\') => s.push(chars.next().ok_or("unterminated escape")?),
                        Some('"') => break,
                        Some(c) => s.push(c),
                        None => return Err("unterminated quoted element".into()),
                    }
                }
                out.push(Some(s));
            }
            Some('{') => return Err("multi-dimensional arrays are not supported".into()),
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                let s = s.trim().to_string();
                out.push((!s.eq_ignore_ascii_case("NULL")).then_some(s));
            }
        }
        match chars.next() {
            Some(',') => continue,
            None => break,
            Some(c) => return Err(format!("unexpected {c:?}")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_values_parse_as_postgresql_writes_them() {
        assert_eq!(parse_decimal("12.5", 12, 2), Ok(1250));
        assert_eq!(parse_decimal("-0.01", 12, 2), Ok(-1));
        assert_eq!(parse_decimal("99999999.99", 10, 2), Ok(9_999_999_999));
        assert!(parse_decimal("NaN", 12, 2).is_err());
        assert!(parse_decimal("1.234", 12, 2).is_err());
        assert!(parse_decimal("123", 3, 1).is_err());
        assert_eq!(parse_date("1970-01-02"), Ok(1));
        assert!(parse_date("infinity").is_err());
        assert_eq!(
            parse_timestamp("1970-01-01 00:00:01.5", false),
            Ok(1_500_000)
        );
        assert_eq!(
            parse_timestamp("2024-02-29 23:59:59.123456+05:30", true),
            parse_timestamp("2024-02-29 18:29:59.123456+00", true)
        );
        assert!(parse_timestamp("infinity", true).is_err());
        assert_eq!(
            parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11").map(|u| u[0]),
            Ok(0xa0)
        );
        assert!(parse_uuid("xyz").is_err());
        assert_eq!(parse_bytea("\\x00ff10"), Ok(vec![0, 255, 16]));
        assert_eq!(parse_bytea("\\x"), Ok(vec![]));
        assert!(parse_bytea("\\x0").is_err());
        assert_eq!(parse_bool("t"), Ok(true));
        assert_eq!(
            parse_array(r#"{"a b",NULL,"c\"d","",x}"#),
            Ok(vec![
                Some("a b".into()),
                None,
                Some("c\"d".into()),
                Some(String::new()),
                Some("x".into())
            ])
        );
        assert_eq!(parse_array("{}"), Ok(vec![]));
        assert!(parse_array("{{1,2},{3,4}}").is_err());
        assert!(parse_array("[0:1]={1,2}").is_err());
    }

    #[test]
    fn an_update_names_the_values_it_left_out_in_unchanged() {
        use arrow_array::Array;
        use arrow_array::cast::AsArray;

        use crate::engine::event::Position;
        let rel = RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["id".into(), "n".into(), "body".into()],
            vec!["integer".into(), "integer".into(), "text".into()],
            vec![true, false, false],
        );
        let schema = super::super::types::initial_schema(&rel).unwrap();
        let arrow = Arc::new(iceberg::arrow::schema_to_arrow_schema(&schema).unwrap());
        let event = |op, vals: &[Option<&str>], unchanged: Option<Vec<i16>>| Event {
            pos: Position { lsn: 1, ord: 0 },
            commit_time: 0,
            rel_ver: rel.rel_ver,
            op,
            old_key: None,
            vals: Some(vals.iter().map(|v| v.map(String::from)).collect()),
            unchanged,
        };
        let insert = event(Op::Insert, &[Some("1"), Some("0"), Some("big")], None);
        let update = event(Op::Update, &[Some("1"), Some("1"), None], Some(vec![2]));
        let rb = record_batch(&arrow, &[(&insert, &rel), (&update, &rel)]).unwrap();
        let col = rb.column_by_name(UNCHANGED).unwrap().as_list::<i32>();
        assert!(col.is_null(0));
        let names = col.value(1);
        let names = names.as_string::<i32>();
        assert_eq!(names.iter().collect::<Vec<_>>(), vec![Some("body")]);
        assert!(rb.column_by_name("body").unwrap().is_null(1));
    }
}
