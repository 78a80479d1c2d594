//! Standby forwarding: a replica that does not lead serves the local pools' listeners the SharedLBs' statuses
//! describe, so traffic never waits for the leader lease. Allocation stays with the leader; this only reads.
//!
//! Every replica of the Deployment runs it while it waits for the lease (and `sharedlb forward` runs only this,
//! for a DaemonSet on the nodes that hold the addresses). It watches the pools, and — once a local pool exists —
//! the SharedLBs and EndpointSlices, and after each change converges the process's `Forwarder` to exactly the
//! listeners the statuses name: the place each SharedLB is served, and during a move's grace the old place too.
//! When the replica starts leading, this stops and the pools' providers take the bound listeners over in place.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, Stream, StreamExt};
use kube::api::DynamicObject;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use sharedlb_crds::{
    LoadBalancerPool, LoadBalancerRef, LocalSettings, PortStatus, SharedLB, load_balancer_index,
    service_name,
};
use sharedlb_providers::local::{Forwarder, Tuning, WantedListener};
use sharedlb_providers::{ListenerSpec, ProviderError};
use tracing::{info, warn};

use crate::Error;
use crate::controller::local_in_effect;
use crate::endpoints::{EndpointPolicy, EndpointSlices, SERVICE_NAME_LABEL, backends_from};
use crate::model::{self, protocol_to_placement};
use crate::providers::local_tuning;
use crate::telemetry::Metrics;

/// After a change, the listeners are converged this soon (changes in between are taken together).
const SETTLE: Duration = Duration::from_millis(200);
/// And at least this often, so a bind that failed (an address not there yet) is tried again.
const RETRY: Duration = Duration::from_secs(30);

/// The listeners the statuses describe on local pools, as a replica that does not lead should serve them.
pub fn wanted_listeners(
    pools: &[Arc<LoadBalancerPool>],
    slbs: &[Arc<SharedLB>],
    slices: &[Arc<DynamicObject>],
) -> Vec<WantedListener> {
    // once per pool, not per SharedLB: the addresses in effect, what its listeners forward to, their tuning
    let local: BTreeMap<String, (LocalSettings, EndpointPolicy, Tuning)> = pools
        .iter()
        .filter_map(|p| {
            let settings = local_in_effect(p).ok()?.provider.local?;
            let (policy, tuning) = (EndpointPolicy::of(&settings), local_tuning(&settings));
            Some((p.name_any(), (settings, policy, tuning)))
        })
        .collect();
    let mut by_service: BTreeMap<(String, String), Vec<&DynamicObject>> = BTreeMap::new();
    for s in slices {
        if let (Some(ns), Some(svc)) = (s.namespace(), s.labels().get(SERVICE_NAME_LABEL)) {
            by_service.entry((ns, svc.clone())).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for slb in slbs {
        let Some(st) = &slb.status else { continue };
        let Some((pool, (settings, policy, tuning))) =
            st.pool.as_ref().and_then(|p| local.get_key_value(p))
        else {
            continue;
        };
        let ns = slb.namespace().unwrap_or_default();
        let key = (ns, service_name(&slb.name_any()));
        let slices = by_service.get(&key).into_iter().flatten().copied();
        let backends = backends_from(slices, policy).ready;
        let places = st.load_balancer.iter().map(|lb| (lb, &st.ports));
        let previous = st.previous.iter().map(|p| (&p.load_balancer, &p.ports));
        for (lb, ports) in places.chain(previous) {
            let Some(ip) = address_of(pool, lb, &settings.addresses) else {
                continue;
            };
            for spec in ports.iter().filter_map(|p| listener(slb, p, &backends)) {
                out.push(WantedListener {
                    pool: pool.clone(),
                    ip,
                    tuning: *tuning,
                    spec,
                });
            }
        }
    }
    out
}

/// The address load balancer `lb` of the pool is served on.
fn address_of(pool: &str, lb: &LoadBalancerRef, addresses: &[String]) -> Option<std::net::IpAddr> {
    let index = load_balancer_index(pool, &lb.name)?;
    addresses.get(index as usize)?.parse().ok()
}

/// The listener a status port describes; none for a port no socket can have (a forged status).
fn listener(slb: &SharedLB, p: &PortStatus, backends: &model::Endpoints) -> Option<ListenerSpec> {
    let protocol = protocol_to_placement(p.protocol);
    let port = u16::try_from(p.port).ok().filter(|p| *p != 0)?;
    Some(ListenerSpec {
        port,
        protocol,
        node_port: p.node_port.and_then(|n| u16::try_from(n).ok()).unwrap_or(0),
        owner: model::owner(slb),
        source_ranges: slb
            .spec
            .source_ranges
            .iter()
            .flatten()
            .map(|c| c.0.clone())
            .collect(),
        backends: backends
            .get(&(p.name.clone(), protocol.as_str().to_string()))
            .cloned()
            .unwrap_or_default(),
        proxy_protocol: model::proxy_protocol(&slb.spec, protocol),
        health_port: model::health_port(&slb.spec, &p.name),
    })
}

/// A reflector's store and its stream of changes, as unit events.
fn reflect<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
) -> impl Stream<Item = ()> + Send + 'static
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    reflector::reflector(writer, watcher(api, watcher::Config::default()))
        .default_backoff()
        .touched_objects()
        .map(|_| ())
}

/// The SharedLBs and the backing Services' slices, watched once a local pool exists.
struct Watched {
    slbs: Store<SharedLB>,
    slices: Store<DynamicObject>,
}

/// Serves the statuses' listeners until `stop` resolves; the listeners stay bound in `forwarder` after it.
pub async fn follow(
    client: Client,
    forwarder: Arc<Forwarder>,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let (pools, writer) = reflector::store::<LoadBalancerPool>();
    let mut changes: futures::stream::SelectAll<std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>> =
        futures::stream::SelectAll::new();
    changes.push(Box::pin(reflect(Api::all(client.clone()), writer)));
    let mut watched: Option<Watched> = None;
    let mut failing: BTreeSet<SocketAddr> = BTreeSet::new();
    let (mut dirty, mut last) = (true, tokio::time::Instant::now());
    let mut tick = tokio::time::interval(SETTLE);
    let mut sample = tokio::time::interval(Duration::from_secs(10));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            Some(()) = changes.next() => dirty = true,
            _ = sample.tick() => {
                metrics.set_listeners(&forwarder.stats().await);
                let (limits, now) = forwarder.budget();
                metrics.set_forwarder(limits, now);
            }
            _ = tick.tick() => {
                if !dirty && last.elapsed() < RETRY {
                    continue;
                }
                let any_local = pools.state().iter().any(|p| p.spec.provider.local.is_some());
                if watched.is_none() && any_local {
                    match watch_shared_lbs(&client, &mut changes).await {
                        Ok(w) => watched = Some(w),
                        Err(e) => {
                            // tried again after RETRY, not at the next tick
                            warn!(error = %e, "standby forwarding cannot watch the SharedLBs yet; retrying");
                            (dirty, last) = (false, tokio::time::Instant::now());
                            continue;
                        }
                    }
                }
                let Some(w) = &watched else { continue };
                // not awaited: the stores fill only as this loop polls their streams
                let synced = |s: Option<Result<(), _>>| s.is_some_and(|r| r.is_ok());
                if !synced(w.slbs.wait_until_ready().now_or_never())
                    || !synced(w.slices.wait_until_ready().now_or_never())
                {
                    continue;
                }
                let wanted = wanted_listeners(&pools.state(), &w.slbs.state(), &w.slices.state());
                let failed = forwarder.sync(&wanted).await;
                report_failures(&mut failing, &failed);
                (dirty, last) = (false, tokio::time::Instant::now());
            }
        }
    }
}

/// Starts the SharedLB and EndpointSlice watches, their changes joining `changes`.
async fn watch_shared_lbs(
    client: &Client,
    changes: &mut futures::stream::SelectAll<std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>>,
) -> Result<Watched, Error> {
    info!(
        "a local pool exists: serving the listeners its SharedLBs' statuses describe until this replica leads"
    );
    let resource = EndpointSlices::discover(client).await?.resource().clone();
    let (slbs, writer) = reflector::store::<SharedLB>();
    changes.push(Box::pin(reflect(Api::all(client.clone()), writer)));
    let writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
    let slices = writer.as_reader();
    let api = Api::<DynamicObject>::all_with(client.clone(), &resource);
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default().labels(SERVICE_NAME_LABEL)),
    )
    .default_backoff()
    .touched_objects()
    .map(|_| ());
    changes.push(Box::pin(stream));
    Ok(Watched { slbs, slices })
}

/// Logs a listener that cannot be bound once, not on every pass, and when it binds again.
fn report_failures(failing: &mut BTreeSet<SocketAddr>, failed: &[(SocketAddr, ProviderError)]) {
    let now: BTreeSet<SocketAddr> = failed.iter().map(|(a, _)| *a).collect();
    for (address, e) in failed.iter().filter(|(a, _)| !failing.contains(a)) {
        warn!(%address, error = %e, "standby forwarding cannot serve this listener; retrying");
    }
    for address in failing.difference(&now) {
        info!(%address, "standby forwarding serves this listener again");
    }
    *failing = now;
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sharedlb_crds::{LoadBalancerPoolSpec, PreviousPlacement, Protocol};

    use super::*;
    use crate::fixtures::shared_lb;

    fn pool(name: &str, provider: serde_json::Value) -> Arc<LoadBalancerPool> {
        let spec: LoadBalancerPoolSpec =
            serde_json::from_value(json!({ "provider": provider })).expect("pool spec");
        Arc::new(LoadBalancerPool::new(name, spec))
    }

    fn slice(svc: &str, manager: &str, ip: &str, port: u16) -> Arc<DynamicObject> {
        let obj = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{svc}-{manager}"), "namespace": "team-a", "labels": {
                SERVICE_NAME_LABEL: svc, "endpointslice.kubernetes.io/managed-by": manager}},
            "endpoints": [{"addresses": [ip]}], "ports": [{"name": "web", "protocol": "TCP", "port": port}]});
        Arc::new(serde_json::from_value(obj).expect("slice"))
    }

    #[test]
    fn a_standby_replica_serves_what_the_statuses_of_local_pools_name() {
        let pools = [
            pool(
                "default",
                json!({"local": {"addresses": ["192.0.2.10", "192.0.2.11"]}}),
            ),
            pool("cloud", json!({"memory": {}})),
        ];
        let mut moved = shared_lb("moved")
            .port("web", None, Protocol::Tcp)
            .source_range("203.0.113.0/24")
            .placed("default", 1, &[("web", 4000, Protocol::Tcp)])
            .build();
        if let Some(st) = moved.status.as_mut() {
            st.previous = Some(PreviousPlacement {
                load_balancer: LoadBalancerRef {
                    name: "default-0".into(),
                    ..Default::default()
                },
                ports: st.ports.clone(),
                release_after: "2026-12-07T05:00:00Z".into(),
            });
        }
        let elsewhere = shared_lb("elsewhere")
            .placed("cloud", 0, &[("web", 4001, Protocol::Tcp)])
            .build();
        let unplaced = shared_lb("unplaced")
            .port("web", None, Protocol::Tcp)
            .build();
        let slbs = [moved, elsewhere, unplaced].map(Arc::new);
        let slices = [
            slice(
                "moved-sharedlb",
                "endpointslice-controller.k8s.io",
                "10.244.0.7",
                8080,
            ),
            slice("moved-sharedlb", "forger", "10.244.9.9", 8080),
            slice(
                "elsewhere-sharedlb",
                "endpointslice-controller.k8s.io",
                "10.244.0.8",
                8080,
            ),
        ];
        let wanted = wanted_listeners(&pools, &slbs, &slices);
        let seen: Vec<(String, u16, Vec<SocketAddr>, Vec<String>)> = wanted
            .iter()
            .map(|w| {
                let s = &w.spec;
                (
                    w.ip.to_string(),
                    s.port,
                    s.backends.clone(),
                    s.source_ranges.clone(),
                )
            })
            .collect();
        let pod: SocketAddr = "10.244.0.7:8080".parse().expect("addr");
        let ranges = vec!["203.0.113.0/24".to_string()];
        assert_eq!(
            seen,
            vec![
                ("192.0.2.11".into(), 4000, vec![pod], ranges.clone()),
                ("192.0.2.10".into(), 4000, vec![pod], ranges),
            ],
            "where it is served and, during the grace, where it was; only the trusted slice's pod"
        );
        assert!(
            wanted
                .iter()
                .all(|w| w.pool == "default" && w.spec.owner.uid == "uid-moved")
        );
    }
}
