//! Which nodes a load balancer targets: a stable subset, a few per zone, chosen by rendezvous (highest random
//! weight) hashing. Every load balancer ranks every node of a zone by a hash of (load balancer, node) and takes
//! the best `per_zone`. Adding a node changes only the subsets it ranks into; removing one only those it was in:
//! node churn touches few load balancers, and a load balancer's target count no longer grows with the cluster.
//!
//! The hash is FNV-1a over the two names, finished by SplitMix64's mixer: fixed here (not `std`'s hasher, which
//! may change between Rust releases), so two replicas, and one before and after an upgrade, agree.

use std::collections::BTreeMap;

/// A node as subsets see it: its name, and its zone (`topology.kubernetes.io/zone`; one unnamed zone if none).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ZonedNode<'a> {
    pub name: &'a str,
    pub zone: &'a str,
}

/// The names of the nodes load balancer `lb` targets: in each zone the `per_zone` nodes that rank highest for it
/// (all of a zone's nodes when it has no more); `None` targets every node. Sorted by name.
pub fn node_subset<'a>(lb: &str, nodes: &[ZonedNode<'a>], per_zone: Option<u32>) -> Vec<&'a str> {
    let Some(per_zone) = per_zone else {
        let mut all: Vec<&str> = nodes.iter().map(|n| n.name).collect();
        all.sort_unstable();
        all.dedup();
        return all;
    };
    let mut zones: BTreeMap<&str, Vec<(u64, &'a str)>> = BTreeMap::new();
    for n in nodes {
        zones
            .entry(n.zone)
            .or_default()
            .push((weight(lb, n.name), n.name));
    }
    let mut chosen: Vec<&'a str> = zones
        .into_values()
        .flat_map(|mut ranked| {
            // highest weight first; the name breaks a tie, so the order is total
            ranked.sort_unstable_by(|a, b| b.cmp(a));
            ranked.dedup_by(|a, b| a.1 == b.1);
            ranked.truncate(per_zone as usize);
            ranked.into_iter().map(|(_, name)| name)
        })
        .collect();
    chosen.sort_unstable();
    chosen
}

/// Which of `groups` disjoint node groups `node` belongs to: the group that ranks it highest. A node's group
/// depends on its name alone, so nodes coming and going never move another node. `groups` 0 counts as 1.
pub fn node_group(node: &str, groups: u32) -> u32 {
    (0..groups.max(1))
        .max_by_key(|g| (weight(&format!("group-{g}"), node), std::cmp::Reverse(*g)))
        .unwrap_or(0)
}

/// The rendezvous weight of `node` for `lb`.
fn weight(lb: &str, node: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    // the separator keeps ("ab", "c") and ("a", "bc") apart
    for b in lb.bytes().chain([0xff]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(PRIME);
    }
    mix(h)
}

/// SplitMix64's finaliser: FNV's low bits alone rank poorly.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// Groups split the nodes roughly evenly, and a node's group is the same whatever else is in the cluster.
    #[test]
    fn node_groups_share_the_nodes_out() {
        let mut sizes = [0u32; 3];
        for i in 0..300 {
            sizes[node_group(&format!("node-{i}"), 3) as usize] += 1;
        }
        assert!(sizes.iter().all(|n| (70..=130).contains(n)), "{sizes:?}");
        assert_eq!(node_group("node-7", 1), 0);
        assert_eq!(node_group("node-7", 0), 0);
        assert_eq!(node_group("node-7", 3), node_group("node-7", 3));
    }

    fn cluster(n: usize, zones: usize) -> Vec<(String, String)> {
        (0..n)
            .map(|i| (format!("node-{i}"), format!("zone-{}", i % zones)))
            .collect()
    }

    fn zoned(c: &[(String, String)]) -> Vec<ZonedNode<'_>> {
        c.iter()
            .map(|(name, zone)| ZonedNode { name, zone })
            .collect()
    }

    #[test]
    fn each_zone_gives_per_zone_nodes_or_all_it_has() {
        let c = cluster(10, 3); // zones of 4, 3 and 3
        let picked = node_subset("pool-0", &zoned(&c), Some(2));
        assert_eq!(picked.len(), 6);
        let small = cluster(2, 2);
        assert_eq!(node_subset("pool-0", &zoned(&small), Some(3)).len(), 2);
        assert_eq!(node_subset("pool-0", &zoned(&c), None).len(), 10);
    }

    #[test]
    fn load_balancers_spread_over_a_zones_nodes() {
        // 100 load balancers, 3 of 30 nodes each: every node is somebody's target, none takes them all
        let c = cluster(30, 1);
        let nodes = zoned(&c);
        let mut load: BTreeMap<&str, u32> = BTreeMap::new();
        for lb in 0..100 {
            for n in node_subset(&format!("pool-{lb}"), &nodes, Some(3)) {
                *load.entry(n).or_default() += 1;
            }
        }
        assert_eq!(load.len(), 30, "{load:?}");
        assert!(load.values().all(|&l| l < 30), "{load:?}");
    }

    proptest! {
        #[test]
        fn adding_a_node_changes_only_subsets_it_joins(
            n in 1usize..60, zones in 1usize..4, per_zone in 1u32..5, lbs in 1u32..20,
        ) {
            let before = cluster(n, zones);
            let mut after = before.clone();
            after.push(("node-new".into(), format!("zone-{}", n % zones)));
            for lb in 0..lbs {
                let lb = format!("p-{lb}");
                let old: BTreeSet<&str> = node_subset(&lb, &zoned(&before), Some(per_zone)).into_iter().collect();
                let new: BTreeSet<&str> = node_subset(&lb, &zoned(&after), Some(per_zone)).into_iter().collect();
                if new.contains("node-new") {
                    // it displaced at most one node of its own zone
                    prop_assert!(old.difference(&new).count() <= 1);
                } else {
                    prop_assert_eq!(old, new);
                }
            }
        }

        #[test]
        fn removing_a_node_changes_only_subsets_it_was_in(
            n in 2usize..60, zones in 1usize..4, per_zone in 1u32..5, gone in 0usize..60,
        ) {
            let before = cluster(n, zones);
            let gone = gone % n;
            let mut after = before.clone();
            let removed = after.remove(gone).0;
            for lb in 0..10 {
                let lb = format!("p-{lb}");
                let old: BTreeSet<&str> = node_subset(&lb, &zoned(&before), Some(per_zone)).into_iter().collect();
                let new: BTreeSet<&str> = node_subset(&lb, &zoned(&after), Some(per_zone)).into_iter().collect();
                if old.contains(removed.as_str()) {
                    prop_assert!(new.difference(&old).count() <= 1, "one node replaces it");
                } else {
                    prop_assert_eq!(old, new);
                }
            }
        }

        #[test]
        fn the_order_nodes_come_in_does_not_matter(n in 1usize..40, zones in 1usize..4, seed in any::<u64>()) {
            let c = cluster(n, zones);
            let mut shuffled = c.clone();
            let mut rng = seed;
            for i in (1..shuffled.len()).rev() {
                rng = mix(rng.wrapping_add(1));
                shuffled.swap(i, (rng % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(
                node_subset("p-0", &zoned(&c), Some(2)),
                node_subset("p-0", &zoned(&shuffled), Some(2))
            );
        }
    }
}
