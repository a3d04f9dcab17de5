//! A captured change as it travels source → buffer → sink, and the table layout it refers to.

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl Op {
    pub fn code(self) -> i8 {
        (match self {
            Op::Insert => b'I',
            Op::Update => b'U',
            Op::Delete => b'D',
            Op::Truncate => b'T',
        }) as i8
    }

    pub fn from_code(c: i8) -> Option<Op> {
        match c as u8 {
            b'I' => Some(Op::Insert),
            b'U' => Some(Op::Update),
            b'D' => Some(Op::Delete),
            b'T' => Some(Op::Truncate),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

/// Text output of each column; `None` is SQL NULL (or an unchanged TOAST value, see `unchanged`).
pub type Row = Vec<Option<String>>;

/// Position of an event: source commit LSN of its transaction, and its index in the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Position {
    pub lsn: u64,
    pub ord: i32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub pos: Position,
    /// Source commit time, microseconds since 2000-01-01.
    pub commit_time: i64,
    pub rel_ver: i64,
    pub op: Op,
    /// Key values before the change: deletes, and updates that changed the key.
    pub old_key: Option<Row>,
    /// New values: inserts and updates.
    pub vals: Option<Row>,
    /// Indexes of columns whose TOASTed value was not sent because it did not change.
    pub unchanged: Option<Vec<i16>>,
}

impl Event {
    /// About the bytes the event takes encoded (buffer rows, handoffs): what queues are capped by.
    pub fn size(&self) -> usize {
        let row = |r: &Option<Row>| {
            r.as_ref().map_or(0, |r| {
                24 + r
                    .iter()
                    .map(|v| 4 + v.as_ref().map_or(0, String::len))
                    .sum::<usize>()
            })
        };
        56 + row(&self.old_key)
            + row(&self.vals)
            + self.unchanged.as_ref().map_or(0, |u| 24 + 6 * u.len())
    }
}

/// A table's layout at some point of the stream. `rel_ver` is a hash of all of it, so the same layout
/// always gets the same version, also when a transaction is read again after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationInfo {
    pub rel_ver: i64,
    pub schema: String,
    pub name: String,
    pub columns: Vec<String>,
    /// `format_type` of each column on the source, e.g. `numeric(12,2)`, `text[]`.
    pub types: Vec<String>,
    pub key: Vec<bool>,
}

impl RelationInfo {
    pub fn new(
        schema: String,
        name: String,
        columns: Vec<String>,
        types: Vec<String>,
        key: Vec<bool>,
    ) -> Self {
        let mut h = Sha256::new();
        for part in [&schema, &name] {
            h.update(part.as_bytes());
            h.update([0]);
        }
        for ((c, t), k) in columns.iter().zip(&types).zip(&key) {
            h.update(c.as_bytes());
            h.update([0]);
            h.update(t.as_bytes());
            h.update([0, *k as u8]);
        }
        let digest = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self {
            rel_ver: i64::from_be_bytes(first),
            schema,
            name,
            columns,
            types,
            key,
        }
    }

    pub fn key_indexes(&self) -> Vec<usize> {
        self.key
            .iter()
            .enumerate()
            .filter(|(_, k)| **k)
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether column `name` is part of the key.
    pub fn key_of(&self, name: &str) -> bool {
        self.columns
            .iter()
            .zip(&self.key)
            .any(|(c, k)| *k && c == name)
    }

    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_version_is_stable_and_layout_sensitive() {
        let a = RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["id".into()],
            vec!["bigint".into()],
            vec![true],
        );
        let b = RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["id".into()],
            vec!["bigint".into()],
            vec![true],
        );
        let c = RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["id".into()],
            vec!["integer".into()],
            vec![true],
        );
        assert_eq!(a.rel_ver, b.rel_ver);
        assert_ne!(a.rel_ver, c.rel_ver);
        assert_eq!(Op::from_code(Op::Update.code()), Some(Op::Update));
    }
}
