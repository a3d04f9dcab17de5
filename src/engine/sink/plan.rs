//! Turns an ordered batch of events into the fewest sink statements that give the same end state:
//! per table and key only the last change counts (an upsert of the final row, or a delete); a
//! truncate, and an update that changes a key while some TOASTed values were not sent, are barriers.
//! Values are borrowed from the batch; a row is copied only when unchanged TOASTed columns are filled
//! in from an earlier change of the same batch.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::engine::event::{Event, Op, RelationInfo};

/// Column values (text form, `None` for NULL), borrowed from the batch where possible.
pub type Vals<'a> = Cow<'a, [Option<String>]>;

#[derive(Debug, Clone, PartialEq)]
pub enum Change<'a> {
    Delete {
        key: Vals<'a>,
    },
    /// `unchanged` lists columns to leave as they are in the sink (an UPDATE of the other columns).
    Upsert {
        vals: Vals<'a>,
        unchanged: Vec<i16>,
    },
    /// Key change with unchanged TOASTed columns: must move the row in place.
    Rekey {
        old_key: Vals<'a>,
        vals: Vals<'a>,
        unchanged: Vec<i16>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Action<'a> {
    pub rel_ver: i64,
    pub change: Change<'a>,
    /// Indexes into the batch of the events this action stands for.
    pub events: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Step<'a> {
    Apply(Vec<Action<'a>>),
    Truncate { rel_ver: i64, event: usize },
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("event at index {index} refers to relation {rel_ver:x}, which the buffer does not know")]
pub struct UnknownRelation {
    pub index: usize,
    pub rel_ver: i64,
}

/// A row of a table: (schema, table) and its key values.
type SlotKey<'a> = ((&'a str, &'a str), Vec<Option<&'a str>>);

fn key_view(row: &[Option<String>]) -> Vec<Option<&str>> {
    row.iter().map(|v| v.as_deref()).collect()
}

pub fn plan<'a>(
    batch: &'a [Event],
    rels: &'a HashMap<i64, RelationInfo>,
) -> Result<Vec<Step<'a>>, UnknownRelation> {
    let mut steps = Vec::new();
    let mut actions: Vec<Action<'a>> = Vec::new();
    let mut slot: HashMap<SlotKey<'a>, usize> = HashMap::with_capacity(batch.len());
    let mut key_indexes: HashMap<i64, Vec<usize>> = HashMap::new();

    fn flush<'a>(
        steps: &mut Vec<Step<'a>>,
        actions: &mut Vec<Action<'a>>,
        slot: &mut HashMap<SlotKey<'a>, usize>,
    ) {
        if !actions.is_empty() {
            steps.push(Step::Apply(std::mem::take(actions)));
        }
        slot.clear();
    }

    for (i, e) in batch.iter().enumerate() {
        let rel = rels.get(&e.rel_ver).ok_or(UnknownRelation {
            index: i,
            rel_ver: e.rel_ver,
        })?;
        let table = (rel.schema.as_str(), rel.name.as_str());
        let keys = key_indexes
            .entry(e.rel_ver)
            .or_insert_with(|| rel.key_indexes());
        match e.op {
            Op::Truncate => {
                flush(&mut steps, &mut actions, &mut slot);
                steps.push(Step::Truncate {
                    rel_ver: e.rel_ver,
                    event: i,
                });
            }
            Op::Delete => {
                let key: &[Option<String>] = e.old_key.as_deref().unwrap_or_default();
                put(
                    &mut actions,
                    &mut slot,
                    (table, key_view(key)),
                    e.rel_ver,
                    Change::Delete {
                        key: Cow::Borrowed(key),
                    },
                    i,
                );
            }
            Op::Insert | Op::Update => {
                let row: &[Option<String>] = e.vals.as_deref().unwrap_or_default();
                let mut unchanged = e.unchanged.clone().unwrap_or_default();
                let new_key: Vec<Option<&str>> = keys
                    .iter()
                    .map(|&k| row.get(k).and_then(|v| v.as_deref()))
                    .collect();
                let old_key = e
                    .old_key
                    .as_deref()
                    .filter(|k| k.len() != new_key.len() || key_view(k) != new_key);
                let mut vals: Vals<'a> = Cow::Borrowed(row);
                if let Some(old_key) = old_key {
                    if !unchanged.is_empty() {
                        flush(&mut steps, &mut actions, &mut slot);
                        steps.push(Step::Apply(vec![Action {
                            rel_ver: e.rel_ver,
                            change: Change::Rekey {
                                old_key: Cow::Borrowed(old_key),
                                vals,
                                unchanged,
                            },
                            events: vec![i],
                        }]));
                        continue;
                    }
                    put(
                        &mut actions,
                        &mut slot,
                        (table, key_view(old_key)),
                        e.rel_ver,
                        Change::Delete {
                            key: Cow::Borrowed(old_key),
                        },
                        i,
                    );
                }
                let new_slot = (table, new_key);
                if !unchanged.is_empty() {
                    // Fill unchanged columns from an earlier change of the same row in this batch.
                    if let Some(&at) = slot.get(&new_slot)
                        && let Action {
                            rel_ver,
                            change:
                                Change::Upsert {
                                    vals: prev,
                                    unchanged: prev_unchanged,
                                },
                            ..
                        } = &actions[at]
                        && *rel_ver == e.rel_ver
                    {
                        let mut still = Vec::new();
                        for &c in &unchanged {
                            if prev_unchanged.contains(&c) {
                                still.push(c);
                            } else if let Some(v) = prev.get(c as usize)
                                && let Some(slot) = vals.to_mut().get_mut(c as usize)
                            {
                                *slot = v.clone();
                            }
                        }
                        unchanged = still;
                    }
                }
                put(
                    &mut actions,
                    &mut slot,
                    new_slot,
                    e.rel_ver,
                    Change::Upsert { vals, unchanged },
                    i,
                );
            }
        }
    }
    flush(&mut steps, &mut actions, &mut slot);
    Ok(steps)
}

fn put<'a>(
    actions: &mut Vec<Action<'a>>,
    slot: &mut HashMap<SlotKey<'a>, usize>,
    key: SlotKey<'a>,
    rel_ver: i64,
    change: Change<'a>,
    event: usize,
) {
    match slot.get(&key) {
        Some(&at) => {
            let a = &mut actions[at];
            a.rel_ver = rel_ver;
            a.change = change;
            a.events.push(event);
        }
        None => {
            slot.insert(key, actions.len());
            actions.push(Action {
                rel_ver,
                change,
                events: vec![event],
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::event::Position;

    fn rel() -> RelationInfo {
        RelationInfo::new(
            "public".into(),
            "t".into(),
            vec!["id".into(), "v".into(), "doc".into()],
            vec!["bigint".into(), "text".into(), "text".into()],
            vec![true, false, false],
        )
    }

    fn ev(
        i: i32,
        op: Op,
        old_key: Option<&str>,
        vals: Option<[&str; 3]>,
        unchanged: Option<Vec<i16>>,
    ) -> Event {
        Event {
            pos: Position { lsn: 1, ord: i },
            commit_time: 0,
            rel_ver: rel().rel_ver,
            op,
            old_key: old_key.map(|k| vec![Some(k.to_string())]),
            vals: vals.map(|v| v.iter().map(|s| Some(s.to_string())).collect()),
            unchanged,
        }
    }

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn last_change_per_key_wins_and_truncate_is_a_barrier() {
        let rels = HashMap::from([(rel().rel_ver, rel())]);
        let batch = vec![
            ev(0, Op::Insert, None, Some(["1", "a", "x"]), None),
            ev(1, Op::Update, None, Some(["1", "b", "x"]), None),
            ev(2, Op::Insert, None, Some(["2", "c", "y"]), None),
            ev(3, Op::Delete, Some("2"), None, None),
            ev(4, Op::Update, Some("1"), Some(["3", "b", "x"]), None),
            ev(5, Op::Truncate, None, None, None),
            ev(6, Op::Insert, None, Some(["9", "z", "z"]), None),
        ];
        let steps = plan(&batch, &rels).unwrap();
        assert_eq!(steps.len(), 3);
        let Step::Apply(first) = &steps[0] else {
            panic!("{steps:?}")
        };
        assert_eq!(first.len(), 3);
        assert_eq!(
            first[0].change,
            Change::Delete {
                key: vec![s("1")].into()
            }
        );
        assert_eq!(first[0].events, vec![0, 1, 4]);
        assert_eq!(
            first[1].change,
            Change::Delete {
                key: vec![s("2")].into()
            }
        );
        assert_eq!(
            first[2].change,
            Change::Upsert {
                vals: vec![s("3"), s("b"), s("x")].into(),
                unchanged: vec![]
            }
        );
        assert!(matches!(steps[1], Step::Truncate { event: 5, .. }));
        assert!(matches!(&steps[2], Step::Apply(a) if a.len() == 1));
    }

    #[test]
    fn unchanged_toast_is_filled_from_the_same_batch_or_left_to_the_sink() {
        let rels = HashMap::from([(rel().rel_ver, rel())]);
        let mut u = ev(1, Op::Update, None, Some(["1", "b", ""]), Some(vec![2]));
        u.vals.as_mut().unwrap()[2] = None;
        let both = [
            ev(0, Op::Insert, None, Some(["1", "a", "big"]), None),
            u.clone(),
        ];
        let steps = plan(&both, &rels).unwrap();
        let Step::Apply(a) = &steps[0] else { panic!() };
        assert_eq!(
            a[0].change,
            Change::Upsert {
                vals: vec![s("1"), s("b"), s("big")].into(),
                unchanged: vec![]
            }
        );
        let alone = [u];
        let steps = plan(&alone, &rels).unwrap();
        let Step::Apply(a) = &steps[0] else { panic!() };
        assert_eq!(
            a[0].change,
            Change::Upsert {
                vals: vec![s("1"), s("b"), None].into(),
                unchanged: vec![2]
            }
        );
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let e = ev(0, Op::Insert, None, Some(["1", "a", "x"]), None);
        assert_eq!(plan(&[e], &HashMap::new()).unwrap_err().index, 0);
    }
}
