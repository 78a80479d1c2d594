//! `sharedlb plan`: where SharedLBs would go, or why not, and what each pool would then hold and cost — without
//! changing anything. Pure: `load` reads the cluster and the files, this decides with the operator's own placement
//! core, rebuilt the way the operator rebuilds it (the pools' load balancers and limits from their statuses, the
//! SharedLBs' statuses as claims), and `render` prints.
//!
//! The SharedLBs are planned one after the other in the order given, each against the pool as the ones before it
//! left it: what the operator does when they are applied in that order.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::ResourceExt;
use serde::Serialize;
use sharedlb_crds::{LoadBalancerPool, PoolLimits, SharedLB, validate_shared_lb};
use sharedlb_placement::{Change, LbGroups, PoolConfig, PoolState, PortMode, Strategy};

use crate::allocator::{claims_of, held_key};
use crate::claims::{self, CloudOwners};
use crate::controller::pool::{pool_limits, pool_totals};
use crate::cost::PriceTable;
use crate::model;

pub mod load;
pub mod render;

/// What the plan is made from.
#[derive(Debug, Default)]
pub struct Inputs {
    pub pools: Vec<Arc<LoadBalancerPool>>,
    /// The SharedLBs in the cluster, with their statuses.
    pub live: Vec<SharedLB>,
    /// Namespace labels, for the pools' namespace selectors.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The SharedLBs to plan, in order (namespaced).
    pub proposed: Vec<SharedLB>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub shared_lbs: Vec<SharedLbPlan>,
    pub pools: Vec<PoolPlan>,
}

/// What would happen to one SharedLB.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SharedLbPlan {
    pub namespace: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    pub outcome: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PlannedPort>,
    /// Why it is refused (or, for an update, why it keeps what it has).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
pub enum Outcome {
    /// New: placed here.
    Place,
    /// Already placed; its ports change in place.
    Update,
    /// Already placed as asked.
    Unchanged,
    /// Placed, and moves to another load balancer (it allows moves and cannot stay as it is).
    Move,
    /// Not placed (a new one), or its change is not made (a placed one keeps its ports).
    Refused,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PlannedPort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// One pool before and after the plan.
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolPlan {
    pub name: String,
    pub provider: String,
    pub limits: Option<PoolLimits>,
    pub before: PoolFigures,
    pub after: PoolFigures,
    /// Load balancers the plan makes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub new_load_balancers: Vec<String>,
    /// Why the pool cannot be planned on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Default, Clone)]
#[serde(rename_all = "camelCase")]
pub struct PoolFigures {
    pub load_balancers: u32,
    pub ports_used: u32,
    pub ports_free: u32,
    /// One-port SharedLBs that still fit (`37`, or `37+` where new load balancers are not limited).
    pub headroom: String,
    pub hourly_cost: String,
}

/// Plans `inputs.proposed` one after the other.
pub fn plan(inputs: &Inputs, prices: &PriceTable) -> Report {
    let mut pools: BTreeMap<String, PoolModel> = inputs
        .pools
        .iter()
        .map(|p| (p.name_any(), PoolModel::rebuild(p, &inputs.live)))
        .collect();
    let mut before: BTreeMap<String, PoolFigures> = pools
        .iter()
        .map(|(n, m)| (n.clone(), m.figures(prices)))
        .collect();
    let shared_lbs = inputs
        .proposed
        .iter()
        .map(|slb| plan_one(slb, inputs, &mut pools))
        .collect();
    let pools = pools
        .into_iter()
        .map(|(name, m)| PoolPlan {
            after: m.figures(prices),
            before: before.remove(&name).unwrap_or_default(),
            new_load_balancers: m.made.iter().map(|i| format!("{name}-{i}")).collect(),
            provider: m.kind,
            limits: m.state.as_ref().map(|s| pool_limits(s.config())),
            problem: m.problem,
            name,
        })
        .collect();
    Report { shared_lbs, pools }
}

/// `plan --compact`: per pool, the moves that would empty load balancers (see `PoolState::compaction`).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompactionReport {
    pub pools: Vec<PoolCompaction>,
}

#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolCompaction {
    pub name: String,
    /// Load balancers holding something, now and after the moves, and the fewest any placement could use.
    pub load_balancers_now: u32,
    pub load_balancers_after: u32,
    pub lower_bound: u64,
    pub hourly_cost_now: String,
    pub hourly_cost_after: String,
    /// The load balancers the moves empty: drain these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub drain: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<PlannedMove>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// One SharedLB to another load balancer (its address changes, and auto-assigned ports may).
#[derive(Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PlannedMove {
    pub shared_lb: String,
    pub from: String,
    pub to: String,
    pub ports: Vec<PlannedPort>,
}

/// The moves that would bring each pool to fewer load balancers, from the pools as they are.
pub fn compact(inputs: &Inputs, prices: &PriceTable) -> CompactionReport {
    let pools = inputs
        .pools
        .iter()
        .map(|p| compact_pool(p, &inputs.live, prices))
        .collect();
    CompactionReport { pools }
}

fn compact_pool(
    pool: &Arc<LoadBalancerPool>,
    live: &[SharedLB],
    prices: &PriceTable,
) -> PoolCompaction {
    let name = pool.name_any();
    let m = PoolModel::rebuild(pool, live);
    let mut out = PoolCompaction {
        name: name.clone(),
        load_balancers_now: 0,
        load_balancers_after: 0,
        lower_bound: 0,
        hourly_cost_now: String::new(),
        hourly_cost_after: String::new(),
        drain: Vec::new(),
        moves: Vec::new(),
        problem: m.problem.clone(),
    };
    let Some(st) = &m.state else {
        return out;
    };
    let of_pool: BTreeMap<String, &SharedLB> = live
        .iter()
        .filter_map(|s| Some((s.uid()?, s)))
        .filter(|(uid, _)| st.allocation(uid).is_some())
        .collect();
    // as a move asks: the port numbers each has (a move changes only the address)
    let asked = of_pool
        .iter()
        .filter_map(|(uid, s)| {
            let now = st.allocation(uid)?;
            Some((uid.clone(), model::move_requests(&s.spec, now)))
        })
        .collect();
    let c = st.compaction(&asked);
    let ports: u32 = st.allocations().map(|(_, a)| a.ports.len() as u32).sum();
    let cost = |lbs: u32| prices.format(prices.hourly(&m.kind, lbs, ports));
    let lb = |i: u32| format!("{name}-{i}");
    out.load_balancers_now = c.before;
    out.load_balancers_after = c.after;
    out.lower_bound =
        sharedlb_placement::lower_bound(u64::from(ports), st.config().max_ports_per_lb);
    out.hourly_cost_now = cost(c.before);
    out.hourly_cost_after = cost(c.after);
    out.drain = c.emptied.iter().map(|i| lb(*i)).collect();
    out.moves = c
        .moves
        .iter()
        .map(|mv| PlannedMove {
            shared_lb: of_pool
                .get(&mv.key)
                .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
                .unwrap_or_else(|| mv.key.clone()),
            from: lb(mv.from.lb),
            to: lb(mv.to.lb),
            ports: planned_ports(&mv.to),
        })
        .collect();
    out
}

fn planned_ports(a: &sharedlb_placement::Allocation) -> Vec<PlannedPort> {
    a.ports
        .iter()
        .map(|p| PlannedPort {
            name: p.name.clone(),
            port: p.port,
            protocol: p.protocol.as_str().to_string(),
        })
        .collect()
}

/// One pool as the operator would see it.
struct PoolModel {
    pool: Arc<LoadBalancerPool>,
    kind: String,
    /// None: the pool cannot be planned on (`problem` says why).
    state: Option<PoolState>,
    problem: Option<String>,
    made: Vec<u32>,
}

impl PoolModel {
    /// The pool's state from its status (its load balancers, its limits) and the SharedLBs' status claims,
    /// settled as the operator's rebuild settles them (the cloud's records aside: the plan reads no cloud).
    fn rebuild(pool: &Arc<LoadBalancerPool>, live: &[SharedLB]) -> PoolModel {
        let name = pool.name_any();
        let kind = pool.spec.provider.kind().unwrap_or_default().to_string();
        let status = pool.status.as_ref();
        let Some(limits) = status.and_then(|s| s.limits.as_ref()) else {
            let problem = "the operator has not reported this pool's limits yet (status.limits): is it running?";
            return PoolModel {
                pool: pool.clone(),
                kind,
                state: None,
                problem: Some(problem.into()),
                made: Vec::new(),
            };
        };
        let mut st = PoolState::new(config_of(limits, pool));
        for row in status
            .map(|s| s.load_balancers.as_slice())
            .unwrap_or_default()
        {
            if let Some(i) = sharedlb_crds::load_balancer_index(&name, &row.name) {
                st.restore_load_balancer(i);
            }
        }
        let claims: Vec<_> = live
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
            .flat_map(|s| claims_of(s, &name))
            .collect();
        claims::settle(&mut st, claims, &CloudOwners::new());
        PoolModel {
            pool: pool.clone(),
            kind,
            state: Some(st),
            problem: None,
            made: Vec::new(),
        }
    }

    fn figures(&self, prices: &PriceTable) -> PoolFigures {
        let Some(st) = &self.state else {
            return PoolFigures::default();
        };
        let rows: Vec<sharedlb_crds::PoolLoadBalancer> = st
            .load_balancers()
            .iter()
            .filter(|l| !l.deleting)
            .map(|l| sharedlb_crds::PoolLoadBalancer {
                ports_used: l.ports_used,
                capacity: l.capacity,
                ..Default::default()
            })
            .collect();
        let t = pool_totals(&rows, st.headroom(), prices, &self.kind);
        PoolFigures {
            load_balancers: t.load_balancers,
            ports_used: t.ports_used,
            ports_free: t.ports_capacity.saturating_sub(t.ports_used),
            headroom: t.headroom.unwrap_or_default(),
            hourly_cost: t.hourly_cost.unwrap_or_default(),
        }
    }
}

/// The planner's configuration from what the operator reported, with the spec's drain list.
fn config_of(l: &PoolLimits, pool: &LoadBalancerPool) -> PoolConfig {
    let port = |p: i32| u16::try_from(p.clamp(1, 65535)).unwrap_or(u16::MAX);
    PoolConfig {
        max_ports_per_lb: l.max_ports_per_load_balancer,
        max_lbs: l.max_load_balancers,
        max_ports_total: l.max_ports_total,
        port_range: (port(l.port_range.min), port(l.port_range.max)),
        strategy: match pool.spec.placement {
            sharedlb_crds::PlacementStrategy::Pack => Strategy::Pack,
            sharedlb_crds::PlacementStrategy::Spread => Strategy::Spread,
        },
        port_mode: match l.ports_unique_across_pool {
            true => PortMode::PoolWide,
            false => PortMode::PerLoadBalancer,
        },
        lb_groups: l
            .groups
            .zip(l.ports_per_group)
            .map(|(count, max_ports)| LbGroups { count, max_ports }),
        draining: pool.spec.drained(&pool.name_any()),
        warm: pool.spec.capacity.warm_load_balancers.unwrap_or(0),
    }
}

fn plan_one(
    slb: &SharedLB,
    inputs: &Inputs,
    pools: &mut BTreeMap<String, PoolModel>,
) -> SharedLbPlan {
    let ns = slb.namespace().unwrap_or_default();
    let name = slb.name_any();
    let refused = |pool: Option<String>, reason: &str, message: String| SharedLbPlan {
        namespace: ns.clone(),
        name: name.clone(),
        pool,
        outcome: Outcome::Refused,
        load_balancer: None,
        ports: Vec::new(),
        reason: Some(reason.to_string()),
        message: Some(message),
    };
    if let Err(e) = validate_shared_lb(&name, &slb.spec) {
        return refused(None, e.reason(), e.to_string());
    }
    let chosen = match model::choose_pool(slb.spec.pool.as_deref(), &inputs.pools) {
        Ok(p) => p.name_any(),
        Err((reason, message)) => return refused(None, reason, message),
    };
    let Some(m) = pools.get_mut(&chosen) else {
        return refused(
            None,
            "PoolNotFound",
            format!("LoadBalancerPool {chosen:?} does not exist"),
        );
    };
    if let Some(sel) = &m.pool.spec.namespace_selector {
        let labels = inputs.namespaces.get(&ns).cloned().unwrap_or_default();
        if !model::selector_matches(sel, &labels) {
            let msg = format!("LoadBalancerPool {chosen:?} does not admit namespace {ns:?}");
            return refused(Some(chosen), "NamespaceNotAllowed", msg);
        }
    }
    let Some(st) = m.state.as_mut() else {
        let msg = m.problem.clone().unwrap_or_default();
        return refused(Some(chosen), "PoolNotReady", msg);
    };
    // a SharedLB already in the cluster is planned under its own uid, so its place is found
    let live = inputs
        .live
        .iter()
        .find(|l| l.namespace().as_deref() == Some(ns.as_str()) && l.name_any() == name);
    let key = live
        .and_then(|l| l.uid())
        .unwrap_or_else(|| format!("planned:{ns}/{name}"));
    let placed_before = st.allocation(&key).cloned();
    let change = Change::Upsert {
        key: key.clone(),
        ports: model::port_requests(&slb.spec),
    };
    let mut p = st.plan(std::slice::from_ref(&change));
    // as the operator does: one that allows moves and cannot stay as it is moves
    let stuck = p
        .refused
        .first()
        .is_some_and(|(_, r)| matches!(r.reason(), "NoRoomToGrow" | "LoadBalancerDraining"))
        || (p.placed.is_empty()
            && placed_before
                .as_ref()
                .is_some_and(|a| st.config().draining.contains(&a.lb)));
    let movable = slb.spec.move_grace().is_some() && st.allocation(&held_key(&key)).is_none();
    let mut moved = false;
    if let (true, true, Some(old)) = (stuck, movable, &placed_before)
        && let Some(Ok(mv)) =
            st.plan_move(&key, &held_key(&key), &model::move_requests(&slb.spec, old))
    {
        p = mv;
        moved = true;
    }
    st.apply(&p);
    for a in &p.actions {
        if let sharedlb_placement::Action::CreateLoadBalancer { lb } = a {
            m.made.push(*lb);
        }
    }
    let refusal = p.refused.first().map(|(_, r)| r);
    let outcome = match (refusal, &placed_before, p.placed.is_empty()) {
        _ if moved => Outcome::Move,
        (Some(_), _, _) => Outcome::Refused,
        (None, None, _) => Outcome::Place,
        (None, Some(_), false) => Outcome::Update,
        (None, Some(_), true) => Outcome::Unchanged,
    };
    let now = st.allocation(&key);
    SharedLbPlan {
        namespace: ns.clone(),
        name: name.clone(),
        load_balancer: now.map(|a| format!("{chosen}-{}", a.lb)),
        ports: now.map(planned_ports).unwrap_or_default(),
        reason: refusal.map(|r| r.reason().to_string()),
        message: refusal.map(|r| r.to_string()),
        pool: Some(chosen),
        outcome,
    }
}

#[cfg(test)]
mod tests;
