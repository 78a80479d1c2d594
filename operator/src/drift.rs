//! The drift audit's judgement, pure: the cloud's inventory of a pool against the pool's allocations (which the
//! SharedLBs' statuses make durable) and the addresses the statuses show. The shell takes the inventory, asks
//! this, and repairs.

use std::collections::{BTreeMap, BTreeSet};

use sharedlb_placement::Allocation;
use sharedlb_providers::{Inventory, LoadBalancerInfo};

use crate::model::ListenerId;

/// What differs between the cloud and the allocations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drift {
    /// Listeners an allocation holds that the cloud lacks, by owner uid.
    pub missing: BTreeSet<(String, ListenerId)>,
    /// Listeners the cloud holds that no allocation accounts for, with the owner the cloud records.
    pub strays: BTreeSet<(String, ListenerId)>,
    /// Load balancers that hold allocations and are not in the cloud at all.
    pub missing_load_balancers: BTreeSet<u32>,
    /// Load balancers whose address is not the one last seen (and shown in statuses), with the new one.
    pub moved: BTreeMap<u32, LoadBalancerInfo>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.strays.is_empty()
            && self.missing_load_balancers.is_empty()
            && self.moved.is_empty()
    }

    /// What both audits found: a listener made or removed by a reconcile in flight shows in one inventory only.
    pub fn also_in(&self, later: &Drift) -> Drift {
        Drift {
            missing: self.missing.intersection(&later.missing).cloned().collect(),
            strays: self.strays.intersection(&later.strays).cloned().collect(),
            missing_load_balancers: self
                .missing_load_balancers
                .intersection(&later.missing_load_balancers)
                .copied()
                .collect(),
            moved: later
                .moved
                .iter()
                .filter(|(lb, _)| self.moved.contains_key(lb))
                .map(|(lb, info)| (*lb, info.clone()))
                .collect(),
        }
    }

    /// The SharedLBs whose reconcile repairs this: owners of missing listeners and everyone on a load balancer
    /// that is missing or moved (their statuses show its address).
    pub fn owners_to_reconcile<'a>(
        &self,
        allocations: impl Iterator<Item = (&'a String, &'a Allocation)>,
        owner_of: impl Fn(&str) -> Option<&str>,
    ) -> BTreeSet<String> {
        let mut owners: BTreeSet<String> = self.missing.iter().map(|(o, _)| o.clone()).collect();
        for (key, a) in allocations {
            let affected =
                self.missing_load_balancers.contains(&a.lb) || self.moved.contains_key(&a.lb);
            if let Some(uid) = owner_of(key).filter(|_| affected) {
                owners.insert(uid.to_string());
            }
        }
        owners
    }

    /// Each kind with its metric label, how many were found, and what mending them did.
    pub fn kinds(&self) -> [(&'static str, usize, &'static str); 4] {
        [
            (
                "missing_listener",
                self.missing.len(),
                "missing listener(s) made again",
            ),
            (
                "stray_listener",
                self.strays.len(),
                "stray listener(s) removed",
            ),
            (
                "missing_load_balancer",
                self.missing_load_balancers.len(),
                "missing load balancer(s) made again",
            ),
            (
                "address_changed",
                self.moved.len(),
                "changed address(es) written to the statuses",
            ),
        ]
    }

    /// One line of the kinds found, for the Event and the condition.
    pub fn summary(&self) -> String {
        let parts: Vec<String> = self
            .kinds()
            .iter()
            .filter(|(_, n, _)| *n > 0)
            .map(|(_, n, what)| format!("{n} {what}"))
            .collect();
        parts.join(", ")
    }
}

/// Compares the inventory with the allocations and with the addresses last seen. `owner_of` names the SharedLB
/// a state key stands for (for a move's held old place, the SharedLB that moved); keys of none, such as held
/// strays, are skipped.
pub fn find<'a>(
    allocations: impl Iterator<Item = (&'a String, &'a Allocation)>,
    inventory: &Inventory,
    seen: &BTreeMap<u32, LoadBalancerInfo>,
    owner_of: impl Fn(&str) -> Option<&str>,
) -> Drift {
    let mut cloud: BTreeMap<ListenerId, &str> = BTreeMap::new();
    let mut serving: BTreeSet<ListenerId> = BTreeSet::new();
    let mut present = BTreeSet::new();
    let mut drift = Drift::default();
    for lb in &inventory.load_balancers {
        present.insert(lb.index);
        for l in &lb.listeners {
            let id = ListenerId::listed(lb.index, l);
            cloud.insert(id, &l.owner_uid);
            if l.serving {
                serving.insert(id);
            }
        }
        let shown = seen.get(&lb.index);
        if shown.is_some_and(|s| (&s.ip, &s.hostname) != (&lb.info.ip, &lb.info.hostname)) {
            drift.moved.insert(lb.index, lb.info.clone());
        }
    }
    let mut wanted: BTreeMap<ListenerId, &str> = BTreeMap::new();
    for (uid, a) in allocations.filter_map(|(k, a)| Some((owner_of(k)?, a))) {
        if !present.contains(&a.lb) {
            drift.missing_load_balancers.insert(a.lb);
        }
        for p in &a.ports {
            let id = ListenerId::of(a.lb, p);
            wanted.insert(id, uid);
            let served = cloud.get(&id) == Some(&uid) && serving.contains(&id);
            if present.contains(&a.lb) && !served {
                drift.missing.insert((uid.to_string(), id));
            }
        }
    }
    for (id, owner) in cloud {
        if wanted.get(&id) != Some(&owner) {
            drift.strays.insert((owner.to_string(), id));
        }
    }
    drift
}

#[cfg(test)]
mod tests {
    use sharedlb_placement::Protocol;
    use sharedlb_providers::{InventoryListener, InventoryLoadBalancer};

    use super::*;
    use crate::allocator::owner_of;
    use crate::fixtures::allocation;

    fn lb(index: u32, ip: &str, listeners: &[(u16, &str)]) -> InventoryLoadBalancer {
        InventoryLoadBalancer {
            index,
            info: LoadBalancerInfo {
                ip: Some(ip.into()),
                ..LoadBalancerInfo::default()
            },
            listeners: listeners
                .iter()
                .map(|(port, owner)| InventoryListener {
                    port: *port,
                    protocol: Protocol::Tcp,
                    node_port: 0,
                    owner_uid: owner.to_string(),
                    serving: true,
                })
                .collect(),
        }
    }

    fn id(lb: u32, port: u16) -> ListenerId {
        ListenerId {
            lb,
            port,
            protocol: Protocol::Tcp,
        }
    }

    #[test]
    fn a_missing_listener_a_stray_a_lost_load_balancer_and_a_new_address_are_each_found() {
        use sharedlb_crds::Protocol::Tcp;
        let allocs: BTreeMap<String, Allocation> = [
            (
                "a".to_string(),
                allocation(0, &[("web", 10000, Tcp), ("api", 10001, Tcp)]),
            ),
            ("b".to_string(), allocation(1, &[("web", 10000, Tcp)])),
            ("stray:x:0".to_string(), allocation(0, &[("h", 10009, Tcp)])),
        ]
        .into();
        let listeners = [(10000, "a"), (10001, "a"), (10002, "z"), (10009, "x")];
        let mut on_0 = lb(0, "203.0.113.9", &listeners);
        // a's 10001 is only half there (a target group no listener forwards to), 10002 was planted, 10000 on lb 0
        // is a's; lb 1 is gone; lb 0 has a new address
        on_0.listeners[1].serving = false;
        let inventory = Inventory {
            load_balancers: vec![on_0],
        };
        let seen = BTreeMap::from([(
            0,
            LoadBalancerInfo {
                ip: Some("203.0.113.1".into()),
                ..LoadBalancerInfo::default()
            },
        )]);
        let d = find(allocs.iter(), &inventory, &seen, owner_of);
        assert_eq!(d.missing, BTreeSet::from([("a".to_string(), id(0, 10001))]));
        assert_eq!(
            d.strays,
            BTreeSet::from([
                ("x".to_string(), id(0, 10009)),
                ("z".to_string(), id(0, 10002))
            ]),
            "a held stray is still a stray in the cloud: removing it is tried again"
        );
        assert_eq!(d.missing_load_balancers, BTreeSet::from([1]));
        assert_eq!(d.moved.keys().copied().collect::<Vec<_>>(), [0]);
        let owners = d.owners_to_reconcile(allocs.iter(), owner_of);
        assert_eq!(owners, BTreeSet::from(["a".to_string(), "b".to_string()]));

        // what a reconcile in flight made meanwhile is not drift
        let mut later = d.clone();
        later.missing.clear();
        assert!(d.also_in(&later).missing.is_empty());
        assert_eq!(d.also_in(&d), d);
    }

    #[test]
    fn a_cloud_as_the_allocations_say_is_in_sync() {
        use sharedlb_crds::Protocol::Tcp;
        let allocs: BTreeMap<String, Allocation> =
            [("a".to_string(), allocation(0, &[("web", 10000, Tcp)]))].into();
        let inventory = Inventory {
            load_balancers: vec![
                lb(0, "203.0.113.1", &[(10000, "a")]),
                lb(2, "203.0.113.2", &[]),
            ],
        };
        let d = find(allocs.iter(), &inventory, &BTreeMap::new(), owner_of);
        assert!(d.is_empty(), "{d:?}");
    }
}
