//! What must hold of SharedLBs and the cloud after any sequence of changes and restarts.

use std::collections::BTreeSet;

use kube::{Api, ResourceExt};
use sharedlb_crds::SharedLB;
use sharedlb_providers::Inventory;

use crate::{condition, eventually};

/// (load balancer name, port, protocol, owner uid)
pub type Held = BTreeSet<(String, i32, String, String)>;

/// What the SharedLBs' statuses hold, asserting every one is Ready and nothing is held twice.
pub async fn held_by_statuses(api: &Api<SharedLB>) -> Held {
    let mut held = Held::new();
    let mut places = BTreeSet::new();
    for s in api.list(&Default::default()).await.expect("list").items {
        assert_eq!(
            condition(&s, "Ready").map(|c| c.0),
            Some("True".into()),
            "{} is not Ready: {:?}",
            s.name_any(),
            s.status
        );
        let st = s.status.as_ref().expect("status");
        let lb = st.load_balancer.as_ref().expect("lb").name.clone();
        for p in &st.ports {
            let place = (lb.clone(), p.port, p.protocol.as_str().to_string());
            assert!(places.insert(place.clone()), "{place:?} is held twice");
            held.insert((place.0, place.1, place.2, s.uid().expect("uid")));
        }
    }
    held
}

/// What a provider's inventory holds for the pool, named as statuses name it.
pub fn held_in(inventory: &Inventory, pool: &str) -> Held {
    inventory
        .load_balancers
        .iter()
        .flat_map(|lb| {
            lb.listeners.iter().map(move |l| {
                let name = format!("{pool}-{}", lb.index);
                let protocol = l.protocol.as_str().to_string();
                (name, i32::from(l.port), protocol, l.owner_uid.clone())
            })
        })
        .collect()
}

/// No load balancer holds more than `per_lb` port/protocol pairs.
pub fn assert_within_capacity(held: &Held, per_lb: usize) {
    let mut count: std::collections::BTreeMap<&str, usize> = Default::default();
    for (lb, ..) in held {
        *count.entry(lb.as_str()).or_default() += 1;
    }
    assert!(
        count.values().all(|n| *n <= per_lb),
        "a load balancer over capacity {per_lb}: {count:?}"
    );
}

/// Waits until every named SharedLB is Ready at its current generation.
pub async fn all_ready(api: &Api<SharedLB>, names: &[String], secs: u64) {
    eventually(secs, "every SharedLB Ready", || async {
        let list = api.list(&Default::default()).await.ok()?;
        let ready: BTreeSet<String> = list
            .items
            .iter()
            .filter(|s| {
                condition(s, "Ready").is_some_and(|c| c.0 == "True")
                    && s.status.as_ref().map(|st| st.observed_generation)
                        == Some(s.metadata.generation)
            })
            .map(|s| s.name_any())
            .collect();
        names.iter().all(|n| ready.contains(n)).then_some(())
    })
    .await;
}
