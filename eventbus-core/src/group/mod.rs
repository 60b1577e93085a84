//! Consumer-group building blocks shared by every backend without a broker-side group
//! protocol (memory, NATS, Redis): deterministic partition assignment over a live member set,
//! and the [`Coordinator`] that runs a member's side of the group over a backend's
//! [`MemberRegistry`] and [`LeaseStore`].
//!
//! Rendezvous (highest random weight) hashing: each partition goes to the member with the
//! highest weight `w(member, partition)`. Every member computes the same assignment from the
//! same member set without talking to the others, and when a member joins or leaves only
//! the partitions it gains or loses move. The ranking also names the *standby* for each
//! partition (the second highest), which takes over when the owner goes.
//!
//! The weight is language-neutral so that services in other languages can join a group:
//! FNV-1a 64 over the member id's UTF-8 bytes followed by the partition as 4 little-endian
//! bytes, then the SplitMix64 finalizer.

use std::collections::BTreeMap;

mod coordinator;

pub use coordinator::{Coordinator, CoordinatorConfig, LeaseStore, MemberRegistry, Placement};

/// The weight of `member` for `partition`.
pub fn weight(member: &str, partition: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in member.bytes().chain(partition.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // SplitMix64 finalizer: spreads FNV's weak low bits.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Members ranked for `partition`, best first (owner, then standby, ...). Ties (equal
/// weights) fall back to the member id, so the order is total.
pub fn ranking<'a>(partition: u32, members: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &str)> = members
        .into_iter()
        .map(|m| (weight(m, partition), m))
        .collect();
    ranked.sort_unstable_by(|a, b| b.cmp(a));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, m)| m).collect()
}

/// The owner of `partition` among `members`, if any.
pub fn owner<'a>(partition: u32, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members
        .into_iter()
        .map(|m| (weight(m, partition), m))
        .max()
        .map(|(_, m)| m)
}

/// The partitions each member owns, for partitions `0..partitions`.
pub fn assignment<'a>(partitions: u32, members: &[&'a str]) -> BTreeMap<&'a str, Vec<u32>> {
    let mut out: BTreeMap<&str, Vec<u32>> = members.iter().map(|m| (*m, Vec::new())).collect();
    for p in 0..partitions {
        if let Some(m) = owner(p, members.iter().copied()) {
            out.entry(m).or_default().push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_balanced() {
        let members = ["a", "b", "c"];
        let a1 = assignment(64, &members);
        assert_eq!(
            a1,
            assignment(64, &["c", "a", "b"]),
            "order of the member list must not matter"
        );
        let sizes: Vec<usize> = a1.values().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 64);
        assert!(sizes.iter().all(|n| *n >= 10), "unbalanced: {sizes:?}");
        // A leaver's partitions move; nobody else's do.
        let a2 = assignment(64, &["a", "b"]);
        for m in ["a", "b"] {
            for p in &a1[m] {
                assert!(a2[m].contains(p), "partition {p} moved away from {m}");
            }
        }
        // A joiner takes some partitions and only from others.
        let a3 = assignment(64, &["a", "b", "c", "d"]);
        assert!(!a3["d"].is_empty());
        for m in members {
            assert!(a3[m].iter().all(|p| a1[m].contains(p)));
        }
        assert_eq!(
            ranking(7, ["a", "b", "c"])[0],
            owner(7, ["a", "b", "c"]).unwrap()
        );
        assert_eq!(ranking(7, ["a", "a"]).len(), 1);
        assert!(owner(0, []).is_none());
    }

    #[test]
    fn reference_weight() {
        // Pinned (computed independently) so that other implementations can check theirs.
        assert_eq!(weight("member-1", 0), 0x3ffc_10b9_e76c_2bdf);
        assert_eq!(weight("member-1", 1), 0x8a43_e2d8_11c5_5b12);
    }
}
