//! Which live member runs a pipeline: rendezvous (highest random weight) hashing of the pipeline
//! uid over the members, with bounded loads. Every replica computes the same owners from the same
//! pipelines and members. Pipelines are placed in uid order, each on its highest-weight member that
//! still has room; a member holds at most `ceil(1.25 × pipelines / members)`. Plain rendezvous
//! hashing is binomial (24 pipelines over 3 members put 13 on one about one run in twelve); the
//! bound keeps every replica near its share, and when members change almost only the pipelines of
//! the members that came or went move.

use std::collections::{BTreeMap, BTreeSet};

use sha2::{Digest, Sha256};

fn weight(uid: &str, member: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(uid.as_bytes());
    h.update([0]);
    h.update(member.as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b)
}

/// The most pipelines one member runs: a quarter over an even share, at least one.
pub fn capacity(pipelines: usize, members: usize) -> usize {
    if members == 0 {
        return 0;
    }
    (pipelines * 5).div_ceil(members * 4).max(1)
}

/// The owner of every pipeline in `uids`; empty when there are no members.
pub fn owners<'a>(
    uids: &'a BTreeSet<String>,
    members: &'a BTreeSet<String>,
) -> BTreeMap<&'a str, &'a str> {
    let cap = capacity(uids.len(), members.len());
    let mut load: BTreeMap<&str, usize> = members.iter().map(|m| (m.as_str(), 0)).collect();
    let mut out = BTreeMap::new();
    for uid in uids {
        // Capacity × members ≥ pipelines, so some member always has room.
        let best = load
            .iter_mut()
            .filter(|(_, n)| **n < cap)
            .max_by_key(|(m, _)| (weight(uid, m), **m));
        if let Some((m, n)) = best {
            *n += 1;
            out.insert(uid.as_str(), *m);
        }
    }
    out
}

/// The member that runs pipeline `uid` among all pipelines `uids` (which should hold it; when it
/// does not, it is placed as though it did). None when there are no members.
pub fn owner(uid: &str, uids: &BTreeSet<String>, members: &BTreeSet<String>) -> Option<String> {
    if uids.contains(uid) {
        return owners(uids, members).get(uid).map(|m| m.to_string());
    }
    let mut with = uids.clone();
    with.insert(uid.to_string());
    owners(&with, members).get(uid).map(|m| m.to_string())
}

/// The owners of the last pipelines and members asked about, placed again only when either
/// changed: a reconcile of every pipeline then places them all once, not once per pipeline.
#[derive(Default)]
pub struct Placement {
    uids: BTreeSet<String>,
    members: BTreeSet<String>,
    owners: BTreeMap<String, String>,
}

impl Placement {
    /// As [`owner`], from the cached placement when `uids` and `members` are the last ones seen.
    pub fn owner(
        &mut self,
        uid: &str,
        uids: BTreeSet<String>,
        members: BTreeSet<String>,
    ) -> Option<String> {
        if !uids.contains(uid) {
            return owner(uid, &uids, &members);
        }
        if uids != self.uids || members != self.members {
            self.owners = owners(&uids, &members)
                .into_iter()
                .map(|(u, m)| (u.to_string(), m.to_string()))
                .collect();
            (self.uids, self.members) = (uids, members);
        }
        self.owners.get(uid).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn per_member<'a>(o: &BTreeMap<&'a str, &'a str>) -> BTreeMap<&'a str, usize> {
        let mut per = BTreeMap::new();
        for m in o.values() {
            *per.entry(*m).or_insert(0) += 1;
        }
        per
    }

    #[test]
    fn no_member_runs_more_than_its_bound_whatever_the_uids() {
        // Many random-looking uid sets of 24 over 3 members: plain rendezvous hashing put 13 or
        // more on one member in some of them; the bound never lets one exceed 10.
        let three = set(&["replica-a", "replica-b", "replica-c"]);
        for run in 0..200 {
            let uids: BTreeSet<String> = (0..24).map(|i| format!("{run}-uid-{i}")).collect();
            let o = owners(&uids, &three);
            assert_eq!(o.len(), 24);
            let per = per_member(&o);
            assert!(per.values().all(|n| *n <= 10), "run {run}: {per:?}");
        }
    }

    #[test]
    fn when_a_member_leaves_almost_only_its_pipelines_move() {
        let three = set(&["a", "b", "c"]);
        let two = set(&["a", "b"]);
        let uids: BTreeSet<String> = (0..300).map(|i| format!("uid-{i}")).collect();
        let before = owners(&uids, &three);
        let after = owners(&uids, &two);
        let per = per_member(&before);
        for m in ["a", "b", "c"] {
            assert!(per[m] > 60 && per[m] <= 125, "uneven spread: {per:?}");
        }
        let stayed_but_moved = uids
            .iter()
            .filter(|u| before[u.as_str()] != "c" && before[u.as_str()] != after[u.as_str()])
            .count();
        assert!(
            stayed_but_moved <= 15,
            "{stayed_but_moved} pipelines of the staying members moved"
        );
        assert!(owners(&uids, &BTreeSet::new()).is_empty());
        assert_eq!(owner("x", &uids, &BTreeSet::new()), None);
        // A pipeline not yet in the set is placed as though it were.
        assert!(owner("new", &uids, &three).is_some());
        // The cached placement answers as the function does, before and after the members change.
        let mut cached = Placement::default();
        for (members, want) in [(&three, &before), (&two, &after), (&three, &before)] {
            for u in &uids {
                let got = cached.owner(u, uids.clone(), members.clone());
                assert_eq!(got.as_deref(), Some(want[u.as_str()]), "{u}");
            }
        }
    }
}
