//! Consumer-group building blocks shared by every backend without a broker-side group
//! protocol (memory, NATS, Redis): deterministic partition assignment over a live member set,
//! and the [`Coordinator`] that runs a member's side of the group over a backend's
//! [`MemberRegistry`] and [`LeaseStore`].
//!
//! Rendezvous (highest random weight) hashing with bounded load: every (member, partition)
//! pair has a weight `w(member, partition)`; [`assignment`] goes through the pairs from the
//! heaviest down and gives a partition to the member of the pair while that member is under
//! its share (`P / N` partitions, one more for the first `P % N` members that reach it).
//! Every member computes the same assignment from the same member set without talking to
//! the others; every member gets its share (plain rendezvous hashing leaves a member
//! without any partition now and then: with 4 partitions and 2 members one time in 8), and
//! a join or a leave moves few partitions besides the ones it must. The ranking names the
//! *standby* for each partition (the second highest).
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

/// The partitions each member owns, for partitions `0..partitions`: rendezvous weights
/// with bounded load (see the module documentation). Each member gets `P / N` or
/// `P / N + 1` partitions; the order of `members` (and repeats in it) does not matter.
///
/// Language-neutral: the pairs are taken by weight, heaviest first, ties by member id and
/// then by partition, ascending.
pub fn assignment<'a>(partitions: u32, members: &[&'a str]) -> BTreeMap<&'a str, Vec<u32>> {
    let mut ids: Vec<&str> = members.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out: BTreeMap<&str, Vec<u32>> = ids.iter().map(|m| (*m, Vec::new())).collect();
    let n = ids.len();
    if n == 0 {
        return out;
    }
    let total = partitions as usize;
    let (share, extra) = (total / n, total % n);
    let mut pairs: Vec<(u64, &str, u32)> = Vec::with_capacity(n * total);
    for m in &ids {
        for p in 0..partitions {
            pairs.push((weight(m, p), m, p));
        }
    }
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)).then(a.2.cmp(&b.2)));
    let mut taken = vec![false; total];
    let mut over_share = 0;
    for (_, m, p) in pairs {
        let slot = &mut taken[p as usize];
        if *slot {
            continue;
        }
        let Some(owned) = out.get_mut(m) else {
            continue;
        };
        let fits = owned.len() < share || (owned.len() == share && over_share < extra);
        if fits {
            if owned.len() == share {
                over_share += 1;
            }
            owned.push(p);
            *slot = true;
        }
    }
    for owned in out.values_mut() {
        owned.sort_unstable();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every partition has one owner, every member its share, whatever the member ids.
    #[test]
    fn every_member_gets_its_share() {
        for partitions in 0..=40u32 {
            for n in 1..=9usize {
                for round in 0..4 {
                    let ids: Vec<String> = (0..n)
                        .map(|i| format!("{:032x}", weight(&format!("{round}-{i}"), partitions)))
                        .collect();
                    let members: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let a = assignment(partitions, &members);
                    let mut all: Vec<u32> = a.values().flatten().copied().collect();
                    all.sort_unstable();
                    assert_eq!(
                        all,
                        (0..partitions).collect::<Vec<_>>(),
                        "{partitions} over {n}"
                    );
                    let share = partitions as usize / n;
                    for (m, owned) in &a {
                        assert!(
                            owned.len() == share || owned.len() == share + 1,
                            "{m}: {} of {partitions} over {n}",
                            owned.len()
                        );
                    }
                    let mut reversed = members.clone();
                    reversed.reverse();
                    reversed.push(members[0]);
                    assert_eq!(assignment(partitions, &reversed), a, "order and repeats");
                }
            }
        }
    }

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
        assert!(
            sizes.iter().all(|n| *n == 21 || *n == 22),
            "unbalanced: {sizes:?}"
        );
        // A leave or a join moves the partitions it must and few others.
        fn of(a: &BTreeMap<&str, Vec<u32>>, p: u32) -> Option<String> {
            a.iter()
                .find(|(_, v)| v.contains(&p))
                .map(|(m, _)| (*m).to_owned())
        }
        let moved = |x: &BTreeMap<&str, Vec<u32>>, y: &BTreeMap<&str, Vec<u32>>| {
            (0..64u32).filter(|&p| of(x, p) != of(y, p)).count()
        };
        let a2 = assignment(64, &["a", "b"]);
        let must = a1["c"].len();
        assert!(
            moved(&a1, &a2) <= must + must / 2,
            "{} moved for {must}",
            moved(&a1, &a2)
        );
        let a3 = assignment(64, &["a", "b", "c", "d"]);
        assert_eq!(a3["d"].len(), 16);
        assert!(
            moved(&a1, &a3) <= 16 + 8,
            "{} moved for 16",
            moved(&a1, &a3)
        );
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
