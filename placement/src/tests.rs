use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::{Strategy as Gen, *};

use super::Strategy;
use super::*;

fn cfg(cap: u32, max_lbs: Option<u32>) -> PoolConfig {
    PoolConfig {
        max_ports_per_lb: cap,
        max_lbs,
        max_ports_total: None,
        port_range: (4000, 4999),
        strategy: Strategy::Pack,
        port_mode: PortMode::PerLoadBalancer,
        lb_groups: None,
        draining: BTreeSet::new(),
        warm: 0,
    }
}

fn tcp(name: &str, port: Option<u16>) -> PortRequest {
    PortRequest {
        name: name.into(),
        port,
        protocol: Protocol::Tcp,
    }
}

fn up(key: &str, ports: Vec<PortRequest>) -> Change {
    Change::Upsert {
        key: key.into(),
        ports,
    }
}

fn ap(name: &str, port: u16, protocol: Protocol) -> AllocatedPort {
    AllocatedPort {
        name: name.into(),
        port,
        protocol,
    }
}

fn plan_apply(s: &mut PoolState, changes: &[Change]) -> Plan {
    let p = s.plan(changes);
    s.apply(&p);
    p
}

#[test]
fn first_item_opens_a_load_balancer_with_the_lowest_free_port() {
    let s = PoolState::new(cfg(5, None));
    let p = s.plan(&[up("a", vec![tcp("web", None)])]);
    assert_eq!(
        p,
        Plan {
            placed: vec![(
                "a".into(),
                Allocation {
                    lb: 0,
                    ports: vec![ap("web", 4000, Protocol::Tcp)]
                }
            )],
            released: vec![],
            refused: vec![],
            actions: vec![
                Action::CreateLoadBalancer { lb: 0 },
                Action::AddListener {
                    lb: 0,
                    port: 4000,
                    protocol: Protocol::Tcp,
                    owner: "a".into()
                },
            ],
        }
    );
}

#[test]
fn twenty_items_capacity_five_make_four_load_balancers() {
    let mut s = PoolState::new(cfg(5, None));
    for i in 0..20 {
        plan_apply(&mut s, &[up(&format!("i{i:02}"), vec![tcp("p", None)])]);
    }
    let lbs = s.load_balancers();
    assert_eq!(lbs.len(), 4);
    assert!(lbs.iter().all(|l| l.ports_used == 5));
}

#[test]
fn fixed_port_clash_opens_another_lb_or_is_refused_at_max() {
    let mut s = PoolState::new(cfg(5, Some(1)));
    plan_apply(&mut s, &[up("a", vec![tcp("p", Some(80))])]);
    let p = s.plan(&[up("b", vec![tcp("p", Some(80))])]);
    assert_eq!(
        p.refused,
        vec![(
            "b".into(),
            Refusal::PortInUse {
                port: 80,
                protocol: Protocol::Tcp
            }
        )]
    );
    assert!(p.placed.is_empty());

    let mut s = PoolState::new(cfg(5, Some(2)));
    plan_apply(&mut s, &[up("a", vec![tcp("p", Some(80))])]);
    let p = plan_apply(&mut s, &[up("b", vec![tcp("p", Some(80))])]);
    assert_eq!(
        p.placed,
        vec![(
            "b".into(),
            Allocation {
                lb: 1,
                ports: vec![ap("p", 80, Protocol::Tcp)]
            }
        )]
    );
}

#[test]
fn a_port_belongs_to_one_item_even_across_protocols() {
    let mut s = PoolState::new(cfg(5, Some(1)));
    plan_apply(&mut s, &[up("a", vec![tcp("p", Some(53))])]);
    let udp = PortRequest {
        name: "d".into(),
        port: Some(53),
        protocol: Protocol::Udp,
    };
    let p = s.plan(&[up("b", vec![udp.clone()])]);
    assert_eq!(p.refused[0].1.reason(), "PortInUse");
    // the owner itself may add UDP on its port
    let p = plan_apply(&mut s, &[up("a", vec![tcp("p", Some(53)), udp])]);
    assert_eq!(
        p.actions,
        vec![Action::AddListener {
            lb: 0,
            port: 53,
            protocol: Protocol::Udp,
            owner: "a".into()
        }]
    );
}

#[test]
fn update_keeps_existing_ports_and_adds_in_place() {
    let mut s = PoolState::new(cfg(5, None));
    plan_apply(
        &mut s,
        &[
            up("a", vec![tcp("one", None)]),
            up("b", vec![tcp("x", None)]),
        ],
    );
    let before = s.allocation("a").cloned().expect("placed");
    let p = plan_apply(&mut s, &[up("a", vec![tcp("one", None), tcp("two", None)])]);
    let after = s.allocation("a").cloned().expect("placed");
    assert_eq!(after.lb, before.lb);
    assert!(after.ports.contains(&before.ports[0]));
    assert_eq!(after.ports.len(), 2);
    assert_eq!(p.actions.len(), 1);
    // dropping a port removes exactly its listener
    let p = plan_apply(&mut s, &[up("a", vec![tcp("two", None)])]);
    assert_eq!(
        p.actions,
        vec![Action::RemoveListener {
            lb: 0,
            port: before.ports[0].port,
            protocol: Protocol::Tcp,
            owner: "a".into()
        }]
    );
}

#[test]
fn update_that_does_not_fit_keeps_the_old_allocation() {
    let mut s = PoolState::new(cfg(2, None));
    plan_apply(
        &mut s,
        &[
            up("a", vec![tcp("one", None)]),
            up("b", vec![tcp("x", None)]),
        ],
    );
    let before = s.allocation("a").cloned();
    let p = s.plan(&[up("a", vec![tcp("one", None), tcp("two", None)])]);
    assert_eq!(p.refused[0].1.reason(), "NoRoomToGrow");
    assert!(p.placed.is_empty() && p.actions.is_empty());
    assert_eq!(s.allocation("a").cloned(), before);
}

#[test]
fn removing_the_last_item_deletes_the_lb_and_forget_drops_it() {
    let mut s = PoolState::new(cfg(5, None));
    plan_apply(&mut s, &[up("a", vec![tcp("p", None)])]);
    let p = plan_apply(&mut s, &[Change::Remove { key: "a".into() }]);
    assert_eq!(p.released, vec!["a".to_string()]);
    assert_eq!(
        p.actions,
        vec![
            Action::RemoveListener {
                lb: 0,
                port: 4000,
                protocol: Protocol::Tcp,
                owner: "a".into()
            },
            Action::DeleteLoadBalancer { lb: 0 },
        ]
    );
    assert_eq!(s.deleting(), vec![0]);
    // a load balancer being deleted takes nothing new: the next item opens another
    let p = plan_apply(&mut s, &[up("b", vec![tcp("p", None)])]);
    assert_eq!(p.placed[0].1.lb, 1);
    assert!(s.forget_load_balancer(0));
    assert!(s.plan(&[]).is_empty());
}

#[test]
fn a_restored_claim_must_fit_the_pools_capacity() {
    let mut s = PoolState::new(cfg(2, Some(1)));
    let two = Allocation {
        lb: 0,
        ports: vec![ap("a", 4000, Protocol::Tcp), ap("b", 4001, Protocol::Tcp)],
    };
    assert!(s.fits(&two));
    assert_eq!(s.restore("x".into(), two), Ok(()));
    let one_more = Allocation {
        lb: 0,
        ports: vec![ap("c", 4002, Protocol::Tcp)],
    };
    assert!(!s.fits(&one_more), "load balancer 0 is full");
    let elsewhere = Allocation {
        lb: 7,
        ports: vec![ap("c", 4002, Protocol::Tcp)],
    };
    assert!(!s.fits(&elsewhere), "the pool allows one load balancer");
    s.restore_load_balancer(7); // one the cloud has: known, so no new one is asked for
    assert!(s.fits(&elsewhere));
}

#[test]
fn restore_finds_conflicts_and_empty_inventory_lbs_are_collected() {
    let mut s = PoolState::new(cfg(5, None));
    let a = Allocation {
        lb: 0,
        ports: vec![ap("p", 4000, Protocol::Tcp)],
    };
    assert_eq!(s.restore("a".into(), a.clone()), Ok(()));
    assert_eq!(
        s.restore("b".into(), a),
        Err(RestoreConflict {
            lb: 0,
            port: 4000,
            held_by: "a".into()
        })
    );
    s.restore_load_balancer(3);
    assert_eq!(
        s.plan(&[]).actions,
        vec![Action::DeleteLoadBalancer { lb: 3 }]
    );
    // the next new item takes the lowest free port on lb 0, not a port of `a`
    let p = s.plan(&[up("c", vec![tcp("p", None)])]);
    assert_eq!(
        p.placed[0].1,
        Allocation {
            lb: 0,
            ports: vec![ap("p", 4001, Protocol::Tcp)]
        }
    );
}

#[test]
fn spread_uses_every_allowed_lb_before_doubling_up() {
    let mut c = cfg(5, Some(3));
    c.strategy = Strategy::Spread;
    let mut s = PoolState::new(c);
    for i in 0..6 {
        plan_apply(&mut s, &[up(&format!("i{i}"), vec![tcp("p", None)])]);
    }
    let used: Vec<u32> = s.load_balancers().iter().map(|l| l.ports_used).collect();
    assert_eq!(used, vec![2, 2, 2]);
}

#[test]
fn pool_wide_ports_are_unique_across_lbs() {
    let mut c = cfg(2, None);
    c.port_mode = PortMode::PoolWide;
    c.port_range = (30000, 30009);
    let mut s = PoolState::new(c);
    for i in 0..5 {
        plan_apply(&mut s, &[up(&format!("i{i}"), vec![tcp("p", None)])]);
    }
    let ports: BTreeSet<u16> = s.allocations().map(|(_, a)| a.ports[0].port).collect();
    assert_eq!(ports.len(), 5);
    let p = s.plan(&[up("x", vec![tcp("p", Some(30000))])]);
    assert_eq!(p.refused[0].1.reason(), "PortInUse");
}

#[test]
fn too_many_ports_and_exhausted_range_are_refused() {
    let s = PoolState::new(cfg(2, None));
    let p = s.plan(&[up(
        "a",
        vec![tcp("a", None), tcp("b", None), tcp("c", None)],
    )]);
    assert_eq!(
        p.refused,
        vec![(
            "a".into(),
            Refusal::TooManyPorts {
                requested: 3,
                capacity: 2
            }
        )]
    );
    let mut c = cfg(5, Some(1));
    c.port_range = (4000, 4001);
    let mut s = PoolState::new(c);
    plan_apply(&mut s, &[up("a", vec![tcp("a", None), tcp("b", None)])]);
    let p = s.plan(&[up("b", vec![tcp("a", None)])]);
    assert_eq!(
        p.refused[0].1,
        Refusal::PortRangeExhausted {
            range: (4000, 4001)
        }
    );
}

// ---------------------------------------------------------------- properties

/// Checks every rule against the state from scratch, without the state's own indexes.
#[test]
fn the_pool_wide_budget_caps_every_load_balancer_together() {
    let mut c = cfg(5, None);
    c.max_ports_total = Some(7);
    let mut s = PoolState::new(c);
    let plan = plan_apply(
        &mut s,
        &(0..9)
            .map(|i| up(&format!("i{i}"), vec![tcp("p", None)]))
            .collect::<Vec<_>>(),
    );
    assert_eq!(plan.placed.len(), 7, "seven ports fit the budget");
    assert_eq!(s.load_balancers().len(), 2, "across two load balancers");
    assert_eq!(plan.refused.len(), 2);
    assert!(matches!(
        plan.refused[0].1,
        Refusal::PoolPortBudget {
            needed: 1,
            free: 0,
            budget: 7
        }
    ));
    assert_eq!(plan.refused[0].1.reason(), "PoolPortBudgetExhausted");
    // growing a placed item is refused too, and keeps its ports
    let grow = plan_apply(&mut s, &[up("i5", vec![tcp("p", None), tcp("q", None)])]);
    assert!(matches!(grow.refused[0].1, Refusal::PoolPortBudget { .. }));
    assert_eq!(s.allocation("i5").map(|a| a.ports.len()), Some(1));
    // freeing one port makes room for exactly one
    plan_apply(&mut s, &[Change::Remove { key: "i1".into() }]);
    let again = plan_apply(
        &mut s,
        &[
            up("i7", vec![tcp("p", None)]),
            up("i8", vec![tcp("p", None)]),
        ],
    );
    assert_eq!((again.placed.len(), again.refused.len()), (1, 1));
}

#[test]
fn a_blocked_pool_wide_port_is_never_handed_out() {
    let mut c = cfg(5, None);
    c.port_mode = PortMode::PoolWide;
    c.port_range = (30000, 30003);
    let mut s = PoolState::new(c);
    s.block_port(30000);
    s.block_port(30002);
    let plan = plan_apply(
        &mut s,
        &(0..3)
            .map(|i| up(&format!("i{i}"), vec![tcp("p", None)]))
            .collect::<Vec<_>>(),
    );
    let mut ports: Vec<u16> = plan.placed.iter().map(|(_, a)| a.ports[0].port).collect();
    ports.sort();
    assert_eq!(ports, vec![30001, 30003], "the blocked ports are skipped");
    assert!(matches!(
        plan.refused[0].1,
        Refusal::PortRangeExhausted { .. }
    ));
    // a fixed request for a blocked port is refused too
    let fixed = plan_apply(&mut s, &[up("f", vec![tcp("p", Some(30000))])]);
    assert_eq!(fixed.refused.len(), 1);
    // blocking a port an item holds leaves it to the item: re-planning it changes nothing
    let holder = ["i0", "i1", "i2"]
        .into_iter()
        .find(|k| s.allocation(k).is_some_and(|a| a.ports[0].port == 30001))
        .expect("someone holds 30001");
    s.block_port(30001);
    let again = s.plan(&[up(holder, vec![tcp("p", None)])]);
    assert!(again.placed.is_empty() && again.refused.is_empty() && again.actions.is_empty());
    assert_eq!(check_invariants(&s), Ok(()));
}

fn check_invariants(s: &PoolState) -> Result<(), String> {
    let cap = s.config().max_ports_per_lb;
    let mut used: BTreeMap<LbIndex, u32> = BTreeMap::new();
    let mut owner: BTreeMap<(LbIndex, u16), String> = BTreeMap::new();
    let mut pairs: BTreeSet<(LbIndex, u16, Protocol)> = BTreeSet::new();
    for (k, a) in s.allocations() {
        *used.entry(a.lb).or_default() += a.ports.len() as u32;
        for p in &a.ports {
            if !pairs.insert((a.lb, p.port, p.protocol)) {
                return Err(format!(
                    "duplicate ({}, {}, {:?})",
                    a.lb, p.port, p.protocol
                ));
            }
            if let Some(o) = owner.insert((a.lb, p.port), k.clone())
                && &o != k
            {
                return Err(format!(
                    "port {} of lb {} held by {o} and {k}",
                    p.port, a.lb
                ));
            }
        }
    }
    for (lb, n) in &used {
        if *n > cap {
            return Err(format!("lb {lb} holds {n} > {cap}"));
        }
    }
    if let Some(g) = s.config().lb_groups {
        let mut by_group: BTreeMap<u32, u32> = BTreeMap::new();
        for (lb, n) in &used {
            *by_group.entry(lb % g.count).or_default() += n;
        }
        if let Some((group, n)) = by_group.iter().find(|(_, n)| **n > g.max_ports) {
            return Err(format!("group {group} holds {n} > {}", g.max_ports));
        }
    }
    let total: u32 = used.values().sum();
    if let Some(budget) = s.config().max_ports_total
        && total > budget
    {
        return Err(format!(
            "the pool holds {total} ports > its budget {budget}"
        ));
    }
    let summary: BTreeMap<LbIndex, u32> = s
        .load_balancers()
        .iter()
        .map(|l| (l.lb, l.ports_used))
        .collect();
    for (lb, n) in &used {
        if summary.get(lb) != Some(n) {
            return Err(format!(
                "lb {lb}: summary {:?} != recount {n}",
                summary.get(lb)
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    Create(u8, Vec<(Option<u16>, bool)>),
    Update(u8, Vec<(Option<u16>, bool)>),
    Delete(u8),
}

fn ports_strategy() -> impl Gen<Value = Vec<(Option<u16>, bool)>> {
    prop::collection::vec(
        (prop::option::weighted(0.3, 4000u16..4012), any::<bool>()),
        1..4,
    )
}

fn op_strategy() -> impl Gen<Value = Op> {
    prop_oneof![
        4 => (0u8..40, ports_strategy()).prop_map(|(k, p)| Op::Create(k, p)),
        2 => (0u8..40, ports_strategy()).prop_map(|(k, p)| Op::Update(k, p)),
        2 => (0u8..40).prop_map(Op::Delete),
    ]
}

fn requests(ports: &[(Option<u16>, bool)]) -> Vec<PortRequest> {
    let mut seen = BTreeSet::new();
    ports
        .iter()
        .enumerate()
        .filter(|(_, (p, udp))| p.is_none_or(|p| seen.insert((p, *udp))))
        .map(|(i, (port, udp))| PortRequest {
            name: format!("p{i}"),
            port: *port,
            protocol: if *udp { Protocol::Udp } else { Protocol::Tcp },
        })
        .collect()
}

fn strategy_config() -> impl Gen<Value = PoolConfig> {
    (
        1u32..8,
        prop::option::of(1u32..8),
        any::<bool>(),
        any::<bool>(),
        8u16..200,
        prop::option::of(1u32..30),
        prop::option::of((1u32..4, 1u32..12)),
        prop::collection::btree_set(0u32..4, 0..2),
        0u32..3,
    )
        .prop_map(
            |(cap, max_lbs, spread, wide, width, budget, groups, draining, warm)| PoolConfig {
                max_ports_per_lb: cap,
                max_lbs,
                max_ports_total: budget,
                port_range: (4000, 4000 + width),
                strategy: if spread {
                    Strategy::Spread
                } else {
                    Strategy::Pack
                },
                port_mode: if wide {
                    PortMode::PoolWide
                } else {
                    PortMode::PerLoadBalancer
                },
                lb_groups: groups.map(|(count, max_ports)| LbGroups { count, max_ports }),
                draining,
                warm,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random batches of creates, updates and deletes: every rule holds after every batch, placements never
    /// move, the requests are honoured, and planning the applied batch again is empty.
    #[test]
    fn rules_hold_over_random_workloads(
        config in strategy_config(),
        batches in prop::collection::vec(prop::collection::vec(op_strategy(), 1..8), 1..12),
    ) {
        // the drained load balancers are drained after the first batch, when some of them hold items
        let mut config = config;
        let mut drain_later = Some(std::mem::take(&mut config.draining));
        let mut s = PoolState::new(config);
        for (i, batch) in batches.into_iter().enumerate() {
            if i == 1 && let Some(draining) = drain_later.take() {
                let mut c = s.config().clone();
                c.draining = draining;
                s.set_config(c);
            }
            let mut changes = Vec::new();
            let mut seen = BTreeSet::new();
            for op in batch {
                let (k, c) = match op {
                    Op::Create(k, p) | Op::Update(k, p) => (k, up(&format!("k{k}"), requests(&p))),
                    Op::Delete(k) => (k, Change::Remove { key: format!("k{k}") }),
                };
                if seen.insert(k) { changes.push(c); }
            }
            let before: BTreeMap<ItemKey, Allocation> =
                s.allocations().map(|(k, a)| (k.clone(), a.clone())).collect();
            let plan = s.plan(&changes);
            s.apply(&plan);
            prop_assert_eq!(check_invariants(&s), Ok(()));
            for c in &changes {
                match c {
                    Change::Remove { key } => prop_assert!(s.allocation(key).is_none()),
                    Change::Upsert { key, ports } => {
                        let refused = plan.refused.iter().any(|(k, _)| k == key);
                        let drained = |a: &Allocation| s.config().draining.contains(&a.lb);
                        match (s.allocation(key), before.get(key)) {
                            (Some(now), Some(old)) => {
                                prop_assert_eq!(now.lb, old.lb, "an allocation moved");
                                if refused { prop_assert_eq!(now, old); }
                                prop_assert!(!drained(now) || now.ports.len() <= old.ports.len(), "grew on a draining lb");
                            }
                            (None, None) => prop_assert!(refused, "neither placed nor refused"),
                            (None, Some(_)) => prop_assert!(false, "an upsert dropped an allocation"),
                            (Some(now), None) => prop_assert!(!refused && !drained(now), "refused yet placed, or placed on a draining lb"),
                        }
                        if let (Some(now), false) = (s.allocation(key), refused) {
                            let mut want: Vec<(String, Protocol)> =
                                ports.iter().map(|r| (r.name.clone(), r.protocol)).collect();
                            let mut got: Vec<(String, Protocol)> =
                                now.ports.iter().map(|p| (p.name.clone(), p.protocol)).collect();
                            want.sort(); got.sort();
                            prop_assert_eq!(want, got);
                            for r in ports {
                                if let Some(fixed) = r.port {
                                    prop_assert!(now.ports.iter().any(|p| p.name == r.name && p.port == fixed));
                                }
                            }
                        }
                    }
                }
            }
            // items the batch did not name are untouched
            for (k, a) in &before {
                if !changes.iter().any(|c| matches!(c, Change::Upsert { key, .. } | Change::Remove { key } if key == k)) {
                    prop_assert_eq!(s.allocation(k), Some(a));
                }
            }
            let again = s.plan(&changes);
            prop_assert!(again.placed.is_empty() && again.released.is_empty() && again.actions.is_empty(),
                "re-plan not empty: {:?}", again);
        }
    }

    /// After a random workload, one-port items placed one at a time succeed exactly `headroom().total` times
    /// (or at least 300 times when it says there is no limit; at most that many when Spread meets budget groups); packed, the first `on_existing` of them go to load
    /// balancers that were already there.
    #[test]
    fn headroom_counts_what_still_fits(
        config in strategy_config(),
        ops in prop::collection::vec(op_strategy(), 0..30),
    ) {
        let mut s = PoolState::new(config);
        for (i, op) in ops.into_iter().enumerate() {
            let change = match op {
                Op::Create(k, p) | Op::Update(k, p) => up(&format!("k{k}"), requests(&p)),
                Op::Delete(k) => Change::Remove { key: format!("k{k}") },
            };
            plan_apply(&mut s, &[change]);
            if i == 3 { s.block_port(4001); }
        }
        let room = s.headroom();
        let had: BTreeSet<LbIndex> = s.load_balancers().iter().map(|l| l.lb).collect();
        let limit = room.total.unwrap_or(300).min(300);
        let mut on_existing = 0;
        for i in 0..=limit {
            let p = plan_apply(&mut s, &[up(&format!("h{i}"), vec![tcp("p", None)])]);
            match p.placed.first() {
                Some((_, a)) => {
                    prop_assert!(i < limit || room.total.is_none(), "placed past the headroom {room:?}");
                    on_existing += u64::from(had.contains(&a.lb));
                }
                // Spread across budget groups may open load balancers in a group that is nearly spent and leave
                // another group short of load balancers: there the headroom is an upper bound
                None if s.config().strategy == Strategy::Spread && s.config().lb_groups.is_some() => {
                    prop_assert!(room.total.is_some_and(|t| i <= t), "placed past the headroom {room:?}");
                    break;
                }
                None => {
                    prop_assert_eq!(Some(i), room.total, "refused {:?} before the headroom", p.refused);
                    break;
                }
            }
        }
        // Pack fills what is there before opening more (Spread may open new ones first)
        if s.config().strategy == Strategy::Pack {
            prop_assert_eq!(on_existing.min(room.on_existing), room.on_existing, "fewer on existing than said");
        }
    }

    /// Compaction after a random workload: applying its moves in order (each a restore, which refuses a port
    /// clash) keeps every rule, leaves the emptied load balancers empty, keeps each moved item's fixed ports and
    /// leaves nothing on a load balancer that is emptied, and ends with `after` load balancers in use.
    #[test]
    fn compaction_moves_keep_every_rule(
        config in strategy_config(),
        ops in prop::collection::vec(op_strategy(), 1..40),
    ) {
        let mut s = PoolState::new(config);
        let mut asked: BTreeMap<ItemKey, Vec<PortRequest>> = BTreeMap::new();
        for op in ops {
            let (key, change) = match op {
                Op::Create(k, p) | Op::Update(k, p) => (format!("k{k}"), up(&format!("k{k}"), requests(&p))),
                Op::Delete(k) => (format!("k{k}"), Change::Remove { key: format!("k{k}") }),
            };
            let plan = plan_apply(&mut s, std::slice::from_ref(&change));
            match (&change, plan.refused.is_empty()) {
                (Change::Upsert { ports, .. }, true) => { asked.insert(key, ports.clone()); }
                (Change::Remove { .. }, _) => { asked.remove(&key); }
                _ => {}
            }
        }
        let c = s.compaction(&asked);
        prop_assert!(c.after <= c.before);
        prop_assert_eq!(c.after as usize, c.before as usize - c.emptied.len());
        let mut after = s.clone();
        for (i, m) in c.moves.iter().enumerate() {
            let moves_on = c.moves[i + 1..].iter().any(|later| later.key == m.key);
            prop_assert!(!c.emptied.contains(&m.to.lb) || moves_on, "left on an emptied load balancer: {m:?}");
            prop_assert_eq!(after.allocation(&m.key), Some(&m.from));
            prop_assert!(after.restore(m.key.clone(), m.to.clone()).is_ok(), "a move clashes: {m:?}");
            for r in &asked[&m.key] {
                if let Some(fixed) = r.port {
                    prop_assert!(m.to.ports.iter().any(|p| p.name == r.name && p.port == fixed));
                }
            }
        }
        prop_assert_eq!(check_invariants(&after), Ok(()));
        for lb in &c.emptied {
            prop_assert!(after.allocations().all(|(_, a)| a.lb != *lb), "lb {lb} still holds something");
        }
        let in_use = after.load_balancers().iter().filter(|l| l.ports_used > 0).count();
        prop_assert_eq!(in_use, c.after as usize);
    }

    /// Moves after a random workload: each item moved with the port numbers it has (as the shell asks) lands on
    /// another load balancer that does not drain, keeps its ports, and every rule holds while the old place is held
    /// beside it and after the old place is let go.
    #[test]
    fn moves_hold_both_places_under_every_rule(
        config in strategy_config(),
        ops in prop::collection::vec(op_strategy(), 1..30),
    ) {
        let mut s = PoolState::new(config);
        for op in ops {
            let change = match op {
                Op::Create(k, p) | Op::Update(k, p) => up(&format!("k{k}"), requests(&p)),
                Op::Delete(k) => Change::Remove { key: format!("k{k}") },
            };
            plan_apply(&mut s, &[change]);
        }
        let keys: Vec<ItemKey> = s.allocations().map(|(k, _)| k.clone()).collect();
        for key in keys {
            let Some(old) = s.allocation(&key).cloned() else { continue };
            let same: Vec<PortRequest> = old
                .ports
                .iter()
                .map(|p| PortRequest { name: p.name.clone(), port: Some(p.port), protocol: p.protocol })
                .collect();
            let held = format!("moving:{key}");
            let Some(Ok(plan)) = s.plan_move(&key, &held, &same) else { continue };
            s.apply(&plan);
            let new = s.allocation(&key).cloned().expect("moved");
            prop_assert_ne!(new.lb, old.lb);
            prop_assert!(!s.config().draining.contains(&new.lb));
            prop_assert_eq!(&new.ports, &old.ports, "the same ports");
            prop_assert_eq!(s.allocation(&held), Some(&old), "the old place is held");
            prop_assert_eq!(check_invariants(&s), Ok(()));
            plan_apply(&mut s, &[Change::Remove { key: held }]);
            prop_assert_eq!(check_invariants(&s), Ok(()));
        }
    }

    /// Create-only single-port workloads use exactly ceil(n / capacity) load balancers, whether the items come
    /// in one batch or one at a time (the controller's case).
    #[test]
    fn single_port_creates_meet_the_lower_bound(
        cap in 1u32..50, n in 1usize..300, one_at_a_time in any::<bool>(), fixed in prop::collection::vec(any::<bool>(), 300),
    ) {
        let mut c = cfg(cap, None);
        c.port_range = (1024, 65535);
        let mut s = PoolState::new(c);
        let changes: Vec<Change> = (0..n)
            .map(|i| up(&format!("i{i:04}"), vec![tcp("p", fixed[i].then_some(10 + i as u16))]))
            .collect();
        if one_at_a_time {
            for ch in &changes { plan_apply(&mut s, std::slice::from_ref(ch)); }
        } else {
            plan_apply(&mut s, &changes);
        }
        prop_assert_eq!(s.load_balancers().len() as u64, lower_bound(n as u64, cap));
    }

    /// Items of one size that divides the capacity also meet the bound; mixed sizes stay within FFD's bound.
    #[test]
    fn multi_port_creates_stay_near_the_lower_bound(
        cap_mult in 1u32..10, size in 1u32..5, n in 1usize..200, mixed in prop::collection::vec(1u32..5, 200),
    ) {
        let cap = size * cap_mult;
        let mk = |sz: u32| (0..sz).map(|j| tcp(&format!("p{j}"), None)).collect::<Vec<_>>();
        let mut s = PoolState::new(cfg(cap, None));
        plan_apply(&mut s, &(0..n).map(|i| up(&format!("u{i}"), mk(size))).collect::<Vec<_>>());
        prop_assert_eq!(s.load_balancers().len() as u64, lower_bound(n as u64 * u64::from(size), cap));

        let cap = 4 * cap_mult;
        let mut s = PoolState::new(cfg(cap, None));
        let total: u64 = mixed[..n].iter().map(|x| u64::from(*x)).sum();
        plan_apply(&mut s, &(0..n).map(|i| up(&format!("m{i}"), mk(mixed[i]))).collect::<Vec<_>>());
        // first fit never leaves two load balancers both at most half full (else the later one's items would
        // have fitted in the earlier one), so it uses fewer than 2 * lower bound + 1
        let half_full = s.load_balancers().iter().filter(|l| l.ports_used * 2 <= cap).count();
        prop_assert!(half_full <= 1, "{half_full} load balancers at most half full");
        prop_assert!(s.load_balancers().len() as u64 >= lower_bound(total, cap));
    }
}

/// Load balancers of one group share its budget: a new item goes to a load balancer (or opens one) whose group
/// has room, an update grows only within it, and with every group full the item is refused.
#[test]
fn grouped_load_balancers_share_their_groups_budget() {
    let mut c = cfg(3, None);
    c.lb_groups = Some(LbGroups {
        count: 2,
        max_ports: 4,
    });
    let mut s = PoolState::new(c);
    let lb_of = |s: &PoolState, k: &str| s.allocation(k).map(|a| a.lb);
    for i in 0..6 {
        plan_apply(&mut s, &[up(&format!("i{i}"), vec![tcp("p", None)])]);
    }
    // lb 0 and 1 fill to 3; lb 2 (group 0) and lb 3 (group 1) take each group's 4th
    let placed: Vec<Option<u32>> = (0..6).map(|i| lb_of(&s, &format!("i{i}"))).collect();
    assert_eq!(
        placed,
        vec![Some(0), Some(0), Some(0), Some(1), Some(1), Some(1)]
    );
    let p = plan_apply(&mut s, &[up("g0", vec![tcp("p", None)])]);
    assert_eq!(p.placed[0].1.lb, 2, "{p:?}");
    let p = plan_apply(&mut s, &[up("g1", vec![tcp("p", None)])]);
    assert_eq!(p.placed[0].1.lb, 3, "{p:?}");
    let full = s.plan(&[up("late", vec![tcp("p", None)])]);
    assert_eq!(full.refused[0].1.reason(), "PoolPortBudgetExhausted");
    let grow = s.plan(&[up("g0", vec![tcp("p", None), tcp("q", None)])]);
    assert_eq!(grow.refused[0].1.reason(), "NoRoomToGrow", "{grow:?}");
    // a freed port of group 0 lets group 0 take one more, never group 1
    plan_apply(&mut s, &[Change::Remove { key: "i0".into() }]);
    let p = plan_apply(&mut s, &[up("again", vec![tcp("p", None)])]);
    assert_eq!(p.placed[0].1.lb % 2, 0, "{p:?}");
    assert_eq!(check_invariants(&s), Ok(()));
}

/// A draining load balancer takes nothing new: new items go elsewhere (a drained index not made yet is skipped),
/// an item on it may not grow there, what is on it stays, and once emptied it is deleted as any empty one.
#[test]
fn a_draining_load_balancer_takes_nothing_new() {
    let mut s = PoolState::new(cfg(2, None));
    for k in ["a", "b", "c"] {
        plan_apply(&mut s, &[up(k, vec![tcp("p", None)])]);
    }
    let lb_of = |s: &PoolState, k: &str| s.allocation(k).map(|a| a.lb);
    assert_eq!(
        (lb_of(&s, "a"), lb_of(&s, "b"), lb_of(&s, "c")),
        (Some(0), Some(0), Some(1))
    );
    plan_apply(&mut s, &[Change::Remove { key: "b".into() }]);
    let mut c = s.config().clone();
    c.draining = BTreeSet::from([0, 2]);
    s.set_config(c);
    let p = plan_apply(&mut s, &[up("d", vec![tcp("p", None)])]);
    assert_eq!(p.placed[0].1.lb, 1, "lb 0 has room but drains: {p:?}");
    let p = plan_apply(&mut s, &[up("e", vec![tcp("p", None)])]);
    assert_eq!(
        p.placed[0].1.lb, 3,
        "index 2 is drained before it exists: {p:?}"
    );
    let grow = s.plan(&[up("a", vec![tcp("p", None), tcp("q", None)])]);
    assert_eq!(
        grow.refused[0].1.reason(),
        "LoadBalancerDraining",
        "{grow:?}"
    );
    assert!(s.load_balancers().iter().any(|l| l.lb == 0 && l.draining));
    assert_eq!(lb_of(&s, "a"), Some(0), "what is on it stays");
    let p = plan_apply(&mut s, &[Change::Remove { key: "a".into() }]);
    assert!(
        p.actions.contains(&Action::DeleteLoadBalancer { lb: 0 }),
        "{p:?}"
    );
    assert_eq!(check_invariants(&s), Ok(()));
}

/// Warm spares: `warm` empty load balancers are kept (emptied ones beyond that go), `spares_wanted` names the
/// lowest free indices to make within `max_lbs` and never a drained one, and an item that fits nowhere else lands
/// on a spare with no load balancer to make.
#[test]
fn warm_spares_are_kept_made_and_used_first() {
    let mut c = cfg(1, Some(4));
    c.warm = 2;
    c.draining = BTreeSet::from([1]);
    let mut s = PoolState::new(c);
    assert_eq!(s.spares_wanted(), [0, 2], "index 1 is drained");
    for lb in s.spares_wanted() {
        s.restore_load_balancer(lb);
    }
    assert!(s.spares_wanted().is_empty());
    let p = plan_apply(&mut s, &[up("a", vec![tcp("p", None)])]);
    assert_eq!(p.placed[0].1.lb, 0);
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::CreateLoadBalancer { .. })),
        "a spare was there: {p:?}"
    );
    assert!(
        !p.actions
            .iter()
            .any(|a| matches!(a, Action::DeleteLoadBalancer { .. })),
        "the other spare stays: {p:?}"
    );
    assert_eq!(s.spares_wanted(), [3], "one more, within max_lbs 4");
    s.restore_load_balancer(3);
    assert!(
        s.spares_wanted().is_empty(),
        "max_lbs reached: {:?}",
        s.load_balancers()
    );
    plan_apply(&mut s, &[up("b", vec![tcp("p", None)])]);
    // a and b leave: four empty load balancers, two are kept
    let p = plan_apply(
        &mut s,
        &[
            Change::Remove { key: "a".into() },
            Change::Remove { key: "b".into() },
        ],
    );
    let deleted: Vec<LbIndex> = p
        .actions
        .iter()
        .filter_map(|a| match a {
            Action::DeleteLoadBalancer { lb } => Some(*lb),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, [3], "0 and 2 stay as spares: {p:?}");
    assert_eq!(check_invariants(&s), Ok(()));
}

/// After deletes leave four load balancers with one item each (capacity 2), compaction empties two of them, the
/// highest-numbered, by moving their items onto the two that stay.
#[test]
fn compaction_empties_the_load_balancers_deletes_left_half_full() {
    let mut s = PoolState::new(cfg(2, None));
    for k in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        plan_apply(&mut s, &[up(k, vec![tcp("p", None)])]);
    }
    for k in ["b", "d", "f", "h"] {
        plan_apply(&mut s, &[Change::Remove { key: k.into() }]);
    }
    let asked: BTreeMap<ItemKey, Vec<PortRequest>> = ["a", "c", "e", "g"]
        .iter()
        .map(|k| (k.to_string(), vec![tcp("p", None)]))
        .collect();
    let c = s.compaction(&asked);
    assert_eq!((c.before, c.after), (4, 2));
    assert_eq!(c.emptied, [3, 2]);
    let moved: Vec<(&str, LbIndex)> = c.moves.iter().map(|m| (m.key.as_str(), m.to.lb)).collect();
    assert_eq!(moved, [("g", 0), ("e", 1)]);
    assert_eq!(lower_bound(4, 2), u64::from(c.after));
}

/// A move keeps the old place held (under another key) while the item is placed on another load balancer with
/// the same port numbers: never on its own or a draining one, and refused when none has room.
#[test]
fn a_move_holds_the_old_place_and_takes_the_same_ports_elsewhere() {
    let mut s = PoolState::new(cfg(2, Some(3)));
    plan_apply(&mut s, &[up("a", vec![tcp("web", Some(7000))])]);
    plan_apply(&mut s, &[up("b", vec![tcp("web", None)])]);
    let same = vec![tcp("web", Some(7000)), tcp("admin", None)];
    let p = s
        .plan_move("a", "moving:a", &same)
        .expect("a holds a place")
        .expect("room elsewhere");
    assert!(
        p.actions.contains(&Action::CreateLoadBalancer { lb: 1 }),
        "{p:?}"
    );
    s.apply(&p);
    let a = s.allocation("a").expect("a").clone();
    assert_eq!(a.lb, 1);
    assert!(a.ports.iter().any(|x| x.name == "web" && x.port == 7000));
    assert_eq!(
        s.allocation("moving:a").map(|x| x.lb),
        Some(0),
        "the old place is held"
    );
    assert_eq!(check_invariants(&s), Ok(()));
    // b cannot move with a third port: lb 1 is full now, lb 2 may be made
    let p = s
        .plan_move("b", "moving:b", &[tcp("web", Some(10000))])
        .expect("b")
        .expect("lb 2");
    s.apply(&p);
    assert_eq!(s.allocation("b").map(|x| x.lb), Some(2));
    // releasing the held places frees the old load balancer
    let p = plan_apply(
        &mut s,
        &[
            Change::Remove {
                key: "moving:a".into(),
            },
            Change::Remove {
                key: "moving:b".into(),
            },
        ],
    );
    assert!(
        p.actions.contains(&Action::DeleteLoadBalancer { lb: 0 }),
        "{p:?}"
    );
    let full = s.plan_move(
        "a",
        "moving:a",
        &[tcp("web", Some(7000)), tcp("x", None), tcp("y", None)],
    );
    assert!(matches!(full, Some(Err(_))), "{full:?}");
    assert!(s.plan_move("nobody", "moving:nobody", &[]).is_none());
}
