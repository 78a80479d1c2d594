//! The conformance suite: what every provider must do, whatever its cloud. A provider's tests call `run` with a
//! factory that makes a provider for a given pool name on a fresh account (moto, a fake, memory). Each check
//! panics with a message naming the rule it broke.

use std::future::Future;
use std::sync::Arc;

use crate::{ListenerSpec, LoadBalancerKey, LoadBalancerProvider, Owner, PortMode, Protocol};

fn key(pool: &str, index: u32) -> LoadBalancerKey {
    LoadBalancerKey {
        cluster_id: "conformance".into(),
        pool: pool.into(),
        index,
    }
}

/// The node port a listener gets on this provider: on passthrough clouds (`PortMode::PoolWide`) it is the
/// external port itself.
fn node_port_on(p: &dyn LoadBalancerProvider, port: u16, node_port: u16) -> u16 {
    match p.limits().port_mode {
        PortMode::PoolWide => port,
        PortMode::PerLoadBalancer => node_port,
    }
}

fn listener_on(
    p: &dyn LoadBalancerProvider,
    port: u16,
    protocol: Protocol,
    node_port: u16,
    uid: &str,
) -> ListenerSpec {
    listener(port, protocol, node_port_on(p, port, node_port), uid)
}

/// A listener for tests: `port`/`protocol` forwarding to `node_port`, owned by `uid` (namespace `ns`, name `uid`),
/// open to `ranges` (none: to everyone).
pub fn listener_spec(
    port: u16,
    protocol: Protocol,
    node_port: u16,
    uid: &str,
    ranges: &[&str],
) -> ListenerSpec {
    ListenerSpec {
        port,
        protocol,
        node_port,
        owner: Owner {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
        },
        source_ranges: ranges.iter().map(|r| r.to_string()).collect(),
        backends: vec![],
        proxy_protocol: false,
        health_port: None,
    }
}

fn listener(port: u16, protocol: Protocol, node_port: u16, uid: &str) -> ListenerSpec {
    listener_spec(port, protocol, node_port, uid, &["203.0.113.0/24"])
}

/// Runs every check. `make(pool)` returns a provider for that pool on the same (initially empty) account.
pub async fn run<F, Fut>(make: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Arc<dyn LoadBalancerProvider>>,
{
    limits_are_sane(make("conf-limits".into()).await).await;
    ensure_is_idempotent(make("conf-ensure".into()).await).await;
    removal_of_missing_is_success(make("conf-missing".into()).await).await;
    listeners_are_removed_only_by_their_owner(make("conf-owner".into()).await).await;
    inventory_finds_exactly_what_was_made(
        make("conf-inv-a".into()).await,
        make("conf-inv-b".into()).await,
    )
    .await;
}

async fn limits_are_sane(p: Arc<dyn LoadBalancerProvider>) {
    let l = p.limits();
    assert!(
        l.max_ports_per_lb >= 1,
        "{}: limits().max_ports_per_lb must be at least 1",
        p.kind()
    );
}

async fn ensure_is_idempotent(p: Arc<dyn LoadBalancerProvider>) {
    let k = key("conf-ensure", 0);
    let a = p
        .ensure_load_balancer(&k)
        .await
        .expect("first ensure_load_balancer");
    let b = p
        .ensure_load_balancer(&k)
        .await
        .expect("second ensure_load_balancer");
    assert_eq!(
        a,
        b,
        "{}: ensure_load_balancer twice must return the same load balancer",
        p.kind()
    );
    assert!(!a.id.is_empty(), "{}: a load balancer has an id", p.kind());
    assert!(
        a.ip.is_some() || a.hostname.is_some(),
        "{}: a load balancer has an address",
        p.kind()
    );

    let l = listener_on(&*p, 4000, Protocol::Tcp, 30080, "uid-1");
    p.ensure_listener(&k, &l)
        .await
        .expect("first ensure_listener");
    p.ensure_listener(&k, &l)
        .await
        .expect("second ensure_listener");
    let inv = p.inventory().await.expect("inventory");
    assert_eq!(
        inv.load_balancers.len(),
        1,
        "{}: one load balancer after two ensures",
        p.kind()
    );
    let ls = &inv.load_balancers[0].listeners;
    assert_eq!(ls.len(), 1, "{}: one listener after two ensures", p.kind());
    assert_eq!(
        (ls[0].port, ls[0].protocol, ls[0].node_port),
        (4000, Protocol::Tcp, node_port_on(&*p, 4000, 30080))
    );
    assert_eq!(ls[0].owner_uid, "uid-1");

    // a changed node port converges in place (passthrough clouds have no node port of their own)
    if p.limits().port_mode == PortMode::PerLoadBalancer {
        p.ensure_listener(&k, &listener(4000, Protocol::Tcp, 30081, "uid-1"))
            .await
            .expect("re-ensure");
        let inv = p.inventory().await.expect("inventory");
        assert_eq!(inv.load_balancers[0].listeners.len(), 1);
        assert_eq!(
            inv.load_balancers[0].listeners[0].node_port,
            30081,
            "{}: ensure converges",
            p.kind()
        );
    }

    p.delete_load_balancer(&k).await.expect("delete");
    p.delete_load_balancer(&k).await.expect("second delete");
    assert!(
        p.inventory()
            .await
            .expect("inventory")
            .load_balancers
            .is_empty(),
        "{}: deleted",
        p.kind()
    );
}

async fn removal_of_missing_is_success(p: Arc<dyn LoadBalancerProvider>) {
    let k = key("conf-missing", 7);
    p.delete_load_balancer(&k)
        .await
        .expect("deleting a load balancer that never existed is success");
    p.remove_listener(&k, 4000, Protocol::Udp, "nobody")
        .await
        .expect("removing a listener of a missing load balancer is success");
    p.ensure_load_balancer(&k).await.expect("ensure");
    p.remove_listener(&k, 4000, Protocol::Udp, "nobody")
        .await
        .expect("removing a missing listener is success");
    p.delete_load_balancer(&k).await.expect("delete");
}

async fn listeners_are_removed_only_by_their_owner(p: Arc<dyn LoadBalancerProvider>) {
    let k = key("conf-owner", 0);
    p.ensure_load_balancer(&k).await.expect("ensure");
    p.ensure_listener(&k, &listener_on(&*p, 5000, Protocol::Udp, 30500, "owner"))
        .await
        .expect("listener");
    p.remove_listener(&k, 5000, Protocol::Udp, "someone-else")
        .await
        .expect("remove by another");
    let inv = p.inventory().await.expect("inventory");
    assert_eq!(
        inv.load_balancers[0].listeners.len(),
        1,
        "{}: a listener is never removed by an item that does not own it",
        p.kind()
    );
    p.remove_listener(&k, 5000, Protocol::Udp, "owner")
        .await
        .expect("remove by owner");
    let inv = p.inventory().await.expect("inventory");
    assert!(
        inv.load_balancers[0].listeners.is_empty(),
        "{}: removed by its owner",
        p.kind()
    );
    p.delete_load_balancer(&k).await.expect("delete");
}

async fn inventory_finds_exactly_what_was_made(
    a: Arc<dyn LoadBalancerProvider>,
    b: Arc<dyn LoadBalancerProvider>,
) {
    for i in [0, 1, 4] {
        a.ensure_load_balancer(&key("conf-inv-a", i))
            .await
            .expect("ensure a");
    }
    a.ensure_listener(
        &key("conf-inv-a", 1),
        &listener_on(&*a, 4001, Protocol::Tcp, 30001, "x"),
    )
    .await
    .expect("l1");
    a.ensure_listener(
        &key("conf-inv-a", 1),
        &listener_on(&*a, 4001, Protocol::Udp, 30002, "x"),
    )
    .await
    .expect("l2");
    b.ensure_load_balancer(&key("conf-inv-b", 0))
        .await
        .expect("ensure b");

    let inv = a.inventory().await.expect("inventory a");
    let mut idx: Vec<u32> = inv.load_balancers.iter().map(|l| l.index).collect();
    idx.sort();
    assert_eq!(
        idx,
        vec![0, 1, 4],
        "{}: inventory lists exactly this pool's load balancers",
        a.kind()
    );
    let one = inv
        .load_balancers
        .iter()
        .find(|l| l.index == 1)
        .expect("lb 1");
    let mut ls: Vec<(u16, Protocol)> = one.listeners.iter().map(|l| (l.port, l.protocol)).collect();
    ls.sort();
    assert_eq!(ls, vec![(4001, Protocol::Tcp), (4001, Protocol::Udp)]);
    let invb = b.inventory().await.expect("inventory b");
    assert_eq!(
        invb.load_balancers.len(),
        1,
        "{}: pools do not see each other's",
        b.kind()
    );

    for i in [0, 1, 4] {
        a.delete_load_balancer(&key("conf-inv-a", i))
            .await
            .expect("delete a");
    }
    b.delete_load_balancer(&key("conf-inv-b", 0))
        .await
        .expect("delete b");
    assert!(a.inventory().await.expect("inv").load_balancers.is_empty());
    assert!(b.inventory().await.expect("inv").load_balancers.is_empty());
}
