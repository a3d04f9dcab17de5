//! What an Iceberg snapshot's summary says about the buffer: the position of the last change the
//! table holds, and the owner epoch of the writer.

use std::collections::HashMap;

use iceberg::table::Table;

use super::error::IcebergError;
use crate::engine::event::Position;
use crate::engine::pg;

/// The buffer position of the last change in the table: `<commit lsn>:<index>` (decimal).
pub const POSITION: &str = "philotes.position";
/// The owner epoch of the committing writer (the catalog's fence refuses older ones).
pub const EPOCH: &str = "philotes.epoch";
/// The pipeline (its uid) that committed.
pub const PIPELINE: &str = "philotes.pipeline";
/// The commit LSN of `philotes.position` in PostgreSQL's notation, for people.
pub const LSN_TEXT: &str = "philotes.lsn";

/// The summary properties of a commit that holds every change up to `pos`.
pub fn properties(pos: Position, pipeline: &str, epoch: i64) -> HashMap<String, String> {
    HashMap::from([
        (POSITION.to_string(), encode(pos)),
        (EPOCH.to_string(), epoch.to_string()),
        (PIPELINE.to_string(), pipeline.to_string()),
        (LSN_TEXT.to_string(), pg::lsn_text(pos.lsn)),
    ])
}

pub fn encode(pos: Position) -> String {
    format!("{}:{}", pos.lsn, pos.ord)
}

pub fn decode(text: &str) -> Option<Position> {
    let (lsn, ord) = text.split_once(':')?;
    Some(Position {
        lsn: lsn.parse().ok()?,
        ord: ord.parse().ok()?,
    })
}

/// The position the table holds: that of its newest snapshot written by Philotes (the current
/// one, or its nearest ancestor with the property). None: no change of the buffer is in it.
pub fn committed(table: &Table) -> Result<Option<Position>, IcebergError> {
    let meta = table.metadata();
    let mut snap = meta.current_snapshot().cloned();
    while let Some(s) = snap {
        if let Some(v) = s.summary().additional_properties.get(POSITION) {
            return decode(v).map(Some).ok_or_else(|| IcebergError::Summary {
                table: table.identifier().to_string(),
                key: POSITION,
                value: v.clone(),
            });
        }
        snap = s
            .parent_snapshot_id()
            .and_then(|id| meta.snapshot_by_id(id).cloned());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        let p = Position {
            lsn: 0x1_6B37_48A0,
            ord: 41,
        };
        assert_eq!(decode(&encode(p)), Some(p));
        assert_eq!(decode("12"), None);
        assert_eq!(decode("a:1"), None);
        let props = properties(p, "uid", 3);
        assert_eq!(props[EPOCH], "3");
        assert_eq!(props[LSN_TEXT], "1/6B3748A0");
    }
}
