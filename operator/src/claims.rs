//! Statuses are claims, not the truth. At rebuild the pool's state is made from every SharedLB status that names
//! the pool; anyone who may patch `sharedlbs/status` in one namespace can write one. A claim is honoured only
//! for the ports its spec still names, only within the pool's capacity, and when two claims want one port the
//! owner the cloud records wins, then the older SharedLB. Pure: the shell lists, this decides.

use std::collections::BTreeMap;

use sharedlb_placement::{Allocation, PoolState, Protocol};

use crate::model::ListenerId;

/// One SharedLB's status, read as a claim on ports of this pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub uid: String,
    /// `namespace/name`, for messages.
    pub shared_lb: String,
    /// RFC 3339 creation time: orders claims the cloud does not settle (older first).
    pub created: String,
    pub allocation: Allocation,
    /// The ports its spec names: (name, protocol).
    pub spec_ports: Vec<(String, Protocol)>,
}

/// A claim that was not honoured: its SharedLB is placed again, told why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub uid: String,
    pub shared_lb: String,
    pub reason: String,
}

/// The owner uid the cloud records for each listener of the pool.
pub type CloudOwners = BTreeMap<ListenerId, String>;

/// Restores the claims into `st` in an order the cloud and age decide, and returns the ones not honoured.
pub fn settle(st: &mut PoolState, claims: Vec<Claim>, cloud: &CloudOwners) -> Vec<Rejected> {
    let mut rejected = Vec::new();
    let mut ordered: Vec<(Standing, Claim)> = Vec::with_capacity(claims.len());
    for claim in claims {
        match trim_to_spec(claim) {
            Ok(c) => ordered.push((standing(&c, cloud), c)),
            Err(r) => rejected.push(r),
        }
    }
    ordered.sort_by(|(a, x), (b, y)| (a, &x.created, &x.uid).cmp(&(b, &y.created, &y.uid)));
    for (standing, claim) in ordered {
        // what the cloud serves for this owner is trusted as it is; anything more must fit the pool
        if standing != Standing::Confirmed && !st.fits(&claim.allocation) {
            rejected.push(reject(
                &claim,
                "it asks for more than the pool's capacity allows",
            ));
            continue;
        }
        if let Err(c) = st.restore(claim.uid.clone(), claim.allocation.clone()) {
            let why = format!(
                "port {} of load balancer {} is held by another SharedLB the cloud or an older claim backs",
                c.port, c.lb
            );
            rejected.push(reject(&claim, &why));
        }
    }
    rejected
}

/// How far the cloud backs a claim; claims sort in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Standing {
    /// Every port has a listener the cloud records as this owner's.
    Confirmed,
    /// Some ports have this owner's listeners, the others none yet (a port being added), none another owner's:
    /// it is served, so it goes before claims the cloud knows nothing of.
    Partial,
    /// No port has a listener yet (written, not programmed) and none is another owner's.
    Unbacked,
    /// Some port has a listener the cloud records as another owner's.
    Contested,
}

fn standing(claim: &Claim, cloud: &CloudOwners) -> Standing {
    let owners: Vec<Option<&String>> = claim
        .allocation
        .ports
        .iter()
        .map(|p| {
            cloud.get(&ListenerId {
                lb: claim.allocation.lb,
                port: p.port,
                protocol: p.protocol,
            })
        })
        .collect();
    if owners.iter().flatten().any(|o| **o != claim.uid) {
        Standing::Contested
    } else if owners.iter().all(Option::is_some) {
        Standing::Confirmed
    } else if owners.iter().any(Option::is_some) {
        Standing::Partial
    } else {
        Standing::Unbacked
    }
}

/// Keeps the claimed ports the spec still names with the same protocol (a port removed from the spec is not
/// held any more); a claim left with none is rejected.
fn trim_to_spec(mut claim: Claim) -> Result<Claim, Rejected> {
    let named = |name: &str, protocol: Protocol| {
        claim
            .spec_ports
            .iter()
            .any(|(n, p)| n == name && *p == protocol)
    };
    let ports: Vec<_> = claim
        .allocation
        .ports
        .iter()
        .filter(|p| named(&p.name, p.protocol))
        .cloned()
        .collect();
    if ports.is_empty() {
        return Err(reject(&claim, "none of its ports is named by its spec"));
    }
    claim.allocation.ports = ports;
    Ok(claim)
}

fn reject(claim: &Claim, why: &str) -> Rejected {
    Rejected {
        uid: claim.uid.clone(),
        shared_lb: claim.shared_lb.clone(),
        reason: format!("its status claimed {}: {why}", describe(&claim.allocation)),
    }
}

fn describe(a: &Allocation) -> String {
    let ports: Vec<String> = a
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
        .collect();
    format!("load balancer {} ports {}", a.lb, ports.join(","))
}

#[cfg(test)]
mod tests {
    use sharedlb_placement::{AllocatedPort, PoolConfig, PortMode, Strategy};

    use super::*;

    fn pool(cap: u32) -> PoolState {
        PoolState::new(PoolConfig {
            max_ports_per_lb: cap,
            max_lbs: Some(1),
            max_ports_total: None,
            port_range: (4000, 4999),
            strategy: Strategy::Pack,
            port_mode: PortMode::PerLoadBalancer,
            lb_groups: None,
            draining: Default::default(),
            warm: 0,
        })
    }

    fn claim(uid: &str, created: &str, lb: u32, ports: &[(&str, u16)]) -> Claim {
        Claim {
            uid: uid.into(),
            shared_lb: format!("ns/{uid}"),
            created: created.into(),
            allocation: Allocation {
                lb,
                ports: ports
                    .iter()
                    .map(|(n, p)| AllocatedPort {
                        name: n.to_string(),
                        port: *p,
                        protocol: Protocol::Udp,
                    })
                    .collect(),
            },
            spec_ports: ports
                .iter()
                .map(|(n, _)| (n.to_string(), Protocol::Udp))
                .collect(),
        }
    }

    fn cloud(entries: &[(u32, u16, &str)]) -> CloudOwners {
        entries
            .iter()
            .map(|(lb, port, owner)| {
                let id = ListenerId {
                    lb: *lb,
                    port: *port,
                    protocol: Protocol::Udp,
                };
                (id, owner.to_string())
            })
            .collect()
    }

    /// The forged-status attack: a newer or older SharedLB elsewhere writes a status naming a port the cloud
    /// records as another's. Whatever the LIST order, the cloud's owner keeps it.
    #[test]
    fn the_owner_the_cloud_records_wins_a_clash() {
        let dns = claim("dns", "2026-01-02T00:00:00Z", 0, &[("dns", 8053)]);
        let forged = claim("aaa", "2025-01-01T00:00:00Z", 0, &[("x", 8053)]);
        let cloud = cloud(&[(0, 8053, "dns")]);
        let mut st = pool(10);
        let rejected = settle(&mut st, vec![forged, dns], &cloud);
        assert_eq!(st.allocation("dns").map(|a| a.ports[0].port), Some(8053));
        assert!(st.allocation("aaa").is_none());
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].uid, "aaa");
        assert!(rejected[0].reason.contains("8053/UDP"), "{rejected:?}");
    }

    /// A SharedLB serving one port and adding another is not beaten to the new port by an older forged claim.
    #[test]
    fn a_claim_the_cloud_partly_backs_goes_before_one_it_does_not() {
        let growing = claim("x", "2026-01-01T00:00:00Z", 0, &[("a", 4000), ("b", 4001)]);
        let forged = claim("old", "2020-01-01T00:00:00Z", 0, &[("z", 4001)]);
        let cloud = cloud(&[(0, 4000, "x")]);
        let mut st = pool(10);
        let rejected = settle(&mut st, vec![forged, growing], &cloud);
        assert_eq!(st.allocation("x").map(|a| a.ports.len()), Some(2));
        assert_eq!(
            rejected.iter().map(|r| r.uid.as_str()).collect::<Vec<_>>(),
            ["old"]
        );
    }

    #[test]
    fn without_the_cloud_the_older_claim_wins() {
        let old = claim("old", "2025-01-01T00:00:00Z", 0, &[("a", 4000)]);
        let new = claim("new", "2026-01-01T00:00:00Z", 0, &[("a", 4000)]);
        let mut st = pool(10);
        let rejected = settle(&mut st, vec![new, old], &CloudOwners::new());
        assert!(st.allocation("old").is_some());
        assert_eq!(
            rejected.iter().map(|r| r.uid.as_str()).collect::<Vec<_>>(),
            ["new"]
        );
    }

    #[test]
    fn ports_the_spec_no_longer_names_are_not_held() {
        let mut c = claim("x", "2025-01-01T00:00:00Z", 0, &[("a", 4000), ("b", 4001)]);
        c.spec_ports.retain(|(n, _)| n == "a");
        let mut st = pool(10);
        assert!(settle(&mut st, vec![c.clone()], &CloudOwners::new()).is_empty());
        assert_eq!(st.allocation("x").map(|a| a.ports.len()), Some(1));

        c.spec_ports.clear();
        let mut st = pool(10);
        let rejected = settle(&mut st, vec![c], &CloudOwners::new());
        assert_eq!(rejected.len(), 1);
        assert!(st.allocation("x").is_none());
    }

    #[test]
    fn an_unbacked_claim_beyond_capacity_is_refused_a_confirmed_one_kept() {
        // a pool whose capacity was lowered keeps what the cloud serves
        let served = claim(
            "served",
            "2025-01-01T00:00:00Z",
            0,
            &[("a", 4000), ("b", 4001)],
        );
        let greedy = claim("greedy", "2024-01-01T00:00:00Z", 0, &[("a", 4002)]);
        let far = claim("far", "2024-01-01T00:00:00Z", 9, &[("a", 4003)]);
        let cloud = cloud(&[(0, 4000, "served"), (0, 4001, "served")]);
        let mut st = pool(1);
        let rejected = settle(&mut st, vec![greedy, far, served], &cloud);
        assert!(st.allocation("served").is_some());
        let mut uids: Vec<_> = rejected.iter().map(|r| r.uid.as_str()).collect();
        uids.sort();
        assert_eq!(uids, ["far", "greedy"]);
    }
}
