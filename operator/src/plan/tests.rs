use std::sync::Arc;

use sharedlb_crds::Protocol::{Tcp, Udp};
use sharedlb_crds::{
    Capacity, LoadBalancerPool, LoadBalancerPoolSpec, LoadBalancerPoolStatus, MemorySettings,
    PoolLimits, PoolLoadBalancer, PortRange, ProviderSpec,
};

use super::*;
use crate::fixtures::{SharedLBBuilder, shared_lb};

/// A SharedLB of the default pool.
fn slb(name: &str) -> SharedLBBuilder {
    shared_lb(name).pool(None)
}

/// A memory pool the operator has reported on: load balancers of 2 ports, at most 3 of them, its rows named.
fn pool(name: &str, rows: &[u32]) -> Arc<LoadBalancerPool> {
    let mut p = LoadBalancerPool::new(
        name,
        LoadBalancerPoolSpec {
            provider: ProviderSpec {
                memory: Some(MemorySettings::default()),
                ..ProviderSpec::default()
            },
            capacity: Capacity::default(),
            port_range: None,
            placement: Default::default(),
            namespace_selector: None,
            default: true,
            drain: Vec::new(),
        },
    );
    p.status = Some(LoadBalancerPoolStatus {
        load_balancers: rows
            .iter()
            .map(|i| PoolLoadBalancer {
                name: format!("{name}-{i}"),
                ..PoolLoadBalancer::default()
            })
            .collect(),
        limits: Some(PoolLimits {
            max_ports_per_load_balancer: 2,
            max_load_balancers: Some(3),
            max_ports_total: None,
            port_range: PortRange {
                min: 10000,
                max: 10099,
            },
            ports_unique_across_pool: false,
            groups: None,
            ports_per_group: None,
        }),
        ..LoadBalancerPoolStatus::default()
    });
    Arc::new(p)
}

fn inputs() -> Inputs {
    Inputs {
        pools: vec![pool("web", &[0])],
        live: vec![
            slb("a")
                .port("http", None, Tcp)
                .placed("web", 0, &[("http", 10000, Tcp)])
                .build(),
        ],
        ..Inputs::default()
    }
}

fn ports(p: &SharedLbPlan) -> Vec<(String, u16)> {
    p.ports.iter().map(|x| (x.name.clone(), x.port)).collect()
}

/// New SharedLBs go where the operator would put them, one after the other: into the room left on web-0 first,
/// then onto a load balancer made for them; the pool's figures move with them.
#[test]
fn new_shared_lbs_fill_the_room_left_then_open_a_load_balancer() {
    let mut i = inputs();
    i.proposed = vec![
        slb("b").port("http", None, Tcp).build(),
        slb("c")
            .port("dns", Some(53), Udp)
            .port("http", None, Tcp)
            .build(),
    ];
    let r = plan(&i, &PriceTable::default());
    let (b, c) = (&r.shared_lbs[0], &r.shared_lbs[1]);
    assert_eq!(
        (b.outcome, b.load_balancer.as_deref()),
        (Outcome::Place, Some("web-0"))
    );
    assert_eq!(ports(b), [("http".to_string(), 10001)]);
    assert_eq!(
        (c.outcome, c.load_balancer.as_deref()),
        (Outcome::Place, Some("web-1"))
    );
    assert_eq!(
        ports(c),
        [("dns".to_string(), 53), ("http".to_string(), 10000)]
    );
    let web = &r.pools[0];
    assert_eq!(web.new_load_balancers, ["web-1"]);
    assert_eq!(
        (web.before.load_balancers, web.after.load_balancers),
        (1, 2)
    );
    assert_eq!((web.before.ports_used, web.after.ports_used), (1, 4));
    // before: 1 free on web-0 and 2 new load balancers of 2; after: 1 new load balancer of 2
    assert_eq!(
        (web.before.headroom.as_str(), web.after.headroom.as_str()),
        ("5", "2")
    );
    assert_eq!(web.after.hourly_cost, "0.0000 USD");
}

/// A SharedLB already placed is planned under its own uid: an edit grows in place or is refused with the
/// operator's reason, and one without change is Unchanged.
#[test]
fn a_placed_shared_lb_is_updated_in_place_or_refused_as_the_operator_would() {
    let mut i = inputs();
    i.proposed = vec![slb("a").port("http", None, Tcp).build()];
    assert_eq!(
        plan(&i, &PriceTable::default()).shared_lbs[0].outcome,
        Outcome::Unchanged
    );

    i.proposed = vec![
        slb("a")
            .port("http", None, Tcp)
            .port("admin", None, Tcp)
            .build(),
    ];
    let r = plan(&i, &PriceTable::default());
    assert_eq!(r.shared_lbs[0].outcome, Outcome::Update);
    assert_eq!(
        ports(&r.shared_lbs[0]),
        [("admin".to_string(), 10001), ("http".to_string(), 10000)]
    );

    let three = slb("a")
        .port("http", None, Tcp)
        .port("x", None, Tcp)
        .port("y", None, Tcp);
    i.proposed = vec![three.build()];
    let r = plan(&i, &PriceTable::default());
    let a = &r.shared_lbs[0];
    assert_eq!(
        (a.outcome, a.reason.as_deref()),
        (Outcome::Refused, Some("NoRoomToGrow"))
    );
    assert_eq!(
        ports(a),
        [("http".to_string(), 10000)],
        "it keeps what it has"
    );
}

/// Everything the operator refuses, the plan refuses with the same reason, and the pool is left as it was.
#[test]
fn bad_input_is_refused_with_the_operators_reasons() {
    let mut i = inputs();
    i.pools.push({
        let mut p = (*pool("silent", &[])).clone();
        p.spec.default = false;
        p.status = None;
        Arc::new(p)
    });
    i.proposed = vec![
        slb("noports").build(),
        slb("lost")
            .pool(Some("nowhere"))
            .port("http", None, Tcp)
            .build(),
        slb("early")
            .pool(Some("silent"))
            .port("http", None, Tcp)
            .build(),
        slb("clash").port("http", Some(10000), Tcp).build(),
    ];
    let r = plan(&i, &PriceTable::default());
    let reasons: Vec<_> = r
        .shared_lbs
        .iter()
        .map(|s| (s.outcome, s.reason.as_deref()))
        .collect();
    assert_eq!(
        reasons,
        [
            (Outcome::Refused, Some("InvalidPorts")),
            (Outcome::Refused, Some("PoolNotFound")),
            (Outcome::Refused, Some("PoolNotReady")),
            (Outcome::Place, None),
        ]
    );
    assert_eq!(
        r.shared_lbs[3].load_balancer.as_deref(),
        Some("web-1"),
        "10000 is taken on web-0"
    );
    assert!(
        r.pools
            .iter()
            .any(|p| p.name == "silent" && p.problem.is_some())
    );
}

/// Manifests: many documents and Lists, a namespace filled in where none is named, other kinds refused.
#[test]
fn manifests_give_their_shared_lbs_in_order() {
    let text = r#"
apiVersion: sharedlb.dev/v1alpha1
kind: SharedLB
metadata: {name: one}
spec: {selector: {app: x}, ports: [{name: http, targetPort: 80}]}
---
apiVersion: v1
kind: List
items:
- apiVersion: sharedlb.dev/v1alpha1
  kind: SharedLB
  metadata: {name: two, namespace: other}
  spec: {selector: {app: y}, ports: [{name: dns, targetPort: 53, protocol: UDP}]}
"#;
    let slbs = load::shared_lbs(text, "t.yaml", "team-a").expect("parses");
    let names: Vec<_> = slbs
        .iter()
        .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    assert_eq!(names, ["team-a/one", "other/two"]);
    let pool = "apiVersion: sharedlb.dev/v1alpha1\nkind: LoadBalancerPool\nmetadata: {name: p}\n";
    let err = load::shared_lbs(pool, "p.yaml", "x").expect_err("a pool is not planned");
    assert!(err.to_string().contains("apply pools"), "{err}");
}

/// `--compact`: three load balancers each holding one port of two: moving the SharedLB off the highest one onto
/// the lowest brings the pool to two, its lower bound, and says which load balancer to drain.
#[test]
fn compaction_names_the_moves_and_the_load_balancers_they_empty() {
    let i = Inputs {
        pools: vec![pool("web", &[0, 1, 2])],
        live: vec![
            slb("a")
                .port("http", None, Tcp)
                .placed("web", 0, &[("http", 10000, Tcp)])
                .build(),
            slb("b")
                .port("http", None, Tcp)
                .placed("web", 1, &[("http", 10000, Tcp)])
                .build(),
            slb("c")
                .port("dns", Some(53), Udp)
                .placed("web", 2, &[("dns", 53, Udp)])
                .build(),
        ],
        ..Inputs::default()
    };
    let r = compact(&i, &PriceTable::default());
    let web = &r.pools[0];
    assert_eq!(
        (
            web.load_balancers_now,
            web.load_balancers_after,
            web.lower_bound
        ),
        (3, 2, 2)
    );
    assert_eq!(web.drain, ["web-2"]);
    let moves: Vec<_> = web
        .moves
        .iter()
        .map(|m| (m.shared_lb.as_str(), m.from.as_str(), m.to.as_str()))
        .collect();
    assert_eq!(moves, [("team-a/c", "web-2", "web-0")]);
    assert_eq!(web.moves[0].ports[0].port, 53, "a fixed port stays");
    assert!(render::compaction(&r).contains("web-2"));
}

/// A SharedLB that allows moves and cannot grow where it is is planned as the operator moves it: onto another
/// load balancer with the port number it has.
#[test]
fn a_movable_shared_lb_that_cannot_grow_is_planned_as_a_move() {
    let mut i = inputs();
    i.live.push(
        slb("b")
            .port("http", None, Tcp)
            .placed("web", 0, &[("http", 10001, Tcp)])
            .build(),
    );
    let mut grown = slb("a")
        .port("http", None, Tcp)
        .port("admin", None, Tcp)
        .build();
    grown.spec.migration = Some(sharedlb_crds::Migration {
        allowed: true,
        grace_period_seconds: None,
    });
    i.proposed = vec![grown];
    let r = plan(&i, &PriceTable::default());
    let a = &r.shared_lbs[0];
    assert_eq!(
        (a.outcome, a.load_balancer.as_deref()),
        (Outcome::Move, Some("web-1"))
    );
    assert_eq!(
        ports(a),
        [("admin".to_string(), 10001), ("http".to_string(), 10000)]
    );
    assert_eq!(r.pools[0].new_load_balancers, ["web-1"]);
}
