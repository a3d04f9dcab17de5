//! Which live member runs a pipeline: rendezvous (highest random weight) hashing of the pipeline
//! uid over the members. Every replica computes the same owner from the same member set, and when
//! members change only the pipelines whose highest-weight member changed move.

use std::collections::BTreeSet;

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

/// The member that runs pipeline `uid`; None when there are no members.
pub fn owner<'a>(uid: &str, members: &'a BTreeSet<String>) -> Option<&'a str> {
    members
        .iter()
        .max_by_key(|m| (weight(uid, m), m.as_str()))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn owners_spread_and_only_the_leavers_pipelines_move() {
        let three = set(&["a", "b", "c"]);
        let two = set(&["a", "b"]);
        let uids: Vec<String> = (0..300).map(|i| format!("uid-{i}")).collect();
        let mut per = std::collections::HashMap::new();
        for u in &uids {
            *per.entry(owner(u, &three).unwrap()).or_insert(0) += 1;
        }
        for m in ["a", "b", "c"] {
            assert!(per[m] > 60, "uneven spread: {per:?}");
        }
        for u in &uids {
            let before = owner(u, &three).unwrap();
            let after = owner(u, &two).unwrap();
            if before != "c" {
                assert_eq!(before, after, "{u} moved although its owner stayed");
            }
        }
        assert_eq!(owner("x", &BTreeSet::new()), None);
    }
}
