//! What a placed SharedLB should be, as data: its backing Service, its listeners, and the status that says so.
//!
//! Pure: no API calls, no clock beyond condition times, no cloud. The controller builds from these and deploys by
//! comparing with what is there (the Service the apiserver has, the listeners the pool's ledger says the cloud
//! holds for the owner), on every reconcile — so what one reconcile failed to do, the next does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sharedlb_crds::{
    LoadBalancerPool, LoadBalancerRef, LocalSettings, MANAGED_BY_LABEL, MANAGED_BY_VALUE,
    OWNER_LABEL, PortStatus, SharedLB, SharedLBSpec, SharedLBStatus, port_summary, service_name,
    validate_local_fixed_ports, validate_pool,
};
use sharedlb_placement::{AllocatedPort, Allocation, PortMode, PortRequest, Protocol};
use sharedlb_providers::{ListenerSpec, LoadBalancerInfo, Owner};

/// The CRD's protocol as the placement core names it.
pub fn protocol_to_placement(p: sharedlb_crds::Protocol) -> sharedlb_placement::Protocol {
    match p {
        sharedlb_crds::Protocol::Tcp => sharedlb_placement::Protocol::Tcp,
        sharedlb_crds::Protocol::Udp => sharedlb_placement::Protocol::Udp,
    }
}

/// The placement core's protocol as the CRD names it.
pub fn protocol_from_placement(p: sharedlb_placement::Protocol) -> sharedlb_crds::Protocol {
    match p {
        sharedlb_placement::Protocol::Tcp => sharedlb_crds::Protocol::Tcp,
        sharedlb_placement::Protocol::Udp => sharedlb_crds::Protocol::Udp,
    }
}

/// One listener's place in a pool: which load balancer, which external port and protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ListenerId {
    pub lb: u32,
    pub port: u16,
    pub protocol: Protocol,
}

impl ListenerId {
    /// An allocated port's listener on load balancer `lb`.
    pub fn of(lb: u32, p: &AllocatedPort) -> Self {
        ListenerId {
            lb,
            port: p.port,
            protocol: p.protocol,
        }
    }

    /// A listener the cloud's inventory lists on load balancer `lb`.
    pub fn listed(lb: u32, l: &sharedlb_providers::InventoryListener) -> Self {
        ListenerId {
            lb,
            port: l.port,
            protocol: l.protocol,
        }
    }
}

/// Ready endpoints by (port name, protocol), for providers that forward to them directly.
pub type Endpoints = BTreeMap<(String, String), Vec<SocketAddr>>;

/// Who the cloud records as a listener's owner.
pub fn owner(slb: &SharedLB) -> Owner {
    Owner {
        uid: slb.uid().unwrap_or_default(),
        namespace: slb.namespace().unwrap_or_default(),
        name: slb.name_any(),
    }
}

/// The allocated ports the SharedLB still asks for. After a refused update the allocation may hold a port the
/// spec no longer names: it stays allocated (the update is all or nothing) but is neither served nor open.
pub fn served_ports<'a>(slb: &SharedLB, allocation: &'a Allocation) -> Vec<&'a AllocatedPort> {
    allocation
        .ports
        .iter()
        .filter(|a| slb.spec.ports.iter().any(|p| p.name == a.name))
        .collect()
}

/// The listeners the cloud should hold for this SharedLB, by place.
pub fn wanted_listeners(slb: &SharedLB, allocation: &Allocation) -> BTreeSet<ListenerId> {
    served_ports(slb, allocation)
        .into_iter()
        .map(|p| ListenerId::of(allocation.lb, p))
        .collect()
}

/// What a SharedLB asks its pool for.
pub fn port_requests(spec: &SharedLBSpec) -> Vec<PortRequest> {
    spec.ports
        .iter()
        .map(|p| PortRequest {
            name: p.name.clone(),
            port: p.port.and_then(|x| u16::try_from(x).ok()),
            protocol: protocol_to_placement(p.protocol),
        })
        .collect()
}

/// The requests of a move: the port numbers it has, so nothing in front of it changes but the address (the
/// backing Service keeps its ports, and both load balancers reach the same node ports); a port it does not have
/// yet as the spec asks.
pub fn move_requests(spec: &SharedLBSpec, old: &Allocation) -> Vec<PortRequest> {
    port_requests(spec)
        .into_iter()
        .map(|r| {
            let had = old
                .ports
                .iter()
                .find(|p| p.name == r.name && p.protocol == r.protocol);
            PortRequest {
                port: had.map(|p| p.port).or(r.port),
                ..r
            }
        })
        .collect()
}

/// Why a SharedLB has no pool to use: a condition's reason and message.
pub type NoPool = (&'static str, String);

/// The pool a SharedLB names, or else the one default pool, among `pools`; or why it has none it can use.
pub fn choose_pool<'a>(
    named: Option<&str>,
    pools: &'a [Arc<LoadBalancerPool>],
) -> Result<&'a Arc<LoadBalancerPool>, NoPool> {
    let pool = match named {
        Some(n) => pools.iter().find(|p| p.name_any() == n).ok_or_else(|| {
            (
                "PoolNotFound",
                format!("LoadBalancerPool {n:?} does not exist"),
            )
        })?,
        None => {
            let mut defaults: Vec<_> = pools.iter().filter(|p| p.spec.default).collect();
            defaults.sort_by_key(|p| p.name_any());
            match defaults[..] {
                [] => {
                    return Err((
                        "NoDefaultPool",
                        "spec.pool is empty and no LoadBalancerPool is marked default".into(),
                    ));
                }
                [one] => one,
                _ => {
                    let names: Vec<String> = defaults.iter().map(|p| p.name_any()).collect();
                    return Err((
                        "AmbiguousDefaultPool",
                        format!(
                            "spec.pool is empty and several pools are marked default: {}",
                            names.join(", ")
                        ),
                    ));
                }
            }
        }
    };
    if pool.metadata.deletion_timestamp.is_some() {
        return Err((
            "PoolDeleting",
            format!("LoadBalancerPool {:?} is being deleted", pool.name_any()),
        ));
    }
    if let Err(e) = validate_pool(&pool.spec) {
        return Err((
            "PoolInvalid",
            format!("LoadBalancerPool {:?}: {e}", pool.name_any()),
        ));
    }
    Ok(pool)
}

/// Why a SharedLB may not take its fixed ports on a local pool (reason, message), if it may not: each must lie
/// in the pool's range or its `fixedPortRanges`, and none may be a port the operator itself listens on (`own`:
/// port and what serves there). An assigned port that is one cannot be bound either: the bind fails and says so.
pub fn local_port_refusal(
    spec: &SharedLBSpec,
    local: &LocalSettings,
    range: (u16, u16),
    own: &[(u16, &str)],
) -> Option<(&'static str, String)> {
    let taken = spec.ports.iter().find_map(|p| {
        let port = u16::try_from(p.port?).ok()?;
        let (_, what) = own.iter().find(|(o, _)| *o == port)?;
        Some((p, what))
    });
    if let Some((p, what)) = taken {
        let message = format!(
            "port {:?}: {} is the operator's own {what} port; choose another, or omit `port` to have one assigned",
            p.name,
            p.port.unwrap_or_default()
        );
        return Some(("PortNotAllowed", message));
    }
    validate_local_fixed_ports(spec, local, range)
        .err()
        .map(|e| (e.reason(), e.to_string()))
}

/// A label selector, as the apiserver evaluates it.
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let vals = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| vals.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !vals.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// What the cloud holds for the owner and should not: removed first, so a freed port is closed before anything
/// else is opened.
pub fn stale_listeners(
    held: &BTreeSet<ListenerId>,
    wanted: &BTreeSet<ListenerId>,
) -> Vec<ListenerId> {
    held.difference(wanted).copied().collect()
}

/// The class of the backing `LoadBalancer` Services: no cloud's own controller acts on a Service of another
/// class, so the only load balancer behind it is the shared one.
pub const LOAD_BALANCER_CLASS: &str = "sharedlb.dev/shared";

/// The kind of backing Service a pool's SharedLBs get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    /// `type: NodePort`: the cloud sends the traffic to a node port (on passthrough clouds, `PortMode::PoolWide`,
    /// one equal to the external port).
    NodePort(PortMode),
    /// `type: LoadBalancer` of class `LOAD_BALANCER_CLASS`, without node ports: the traffic reaches the nodes
    /// addressed to the load balancer's IP and port, which kube-proxy routes because the Service's status names
    /// that IP (written by the operator, see `ingress_is_current`). Nothing is taken from the node-port range.
    Classed(ClassedServices),
}

/// How the cluster takes classed Services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassedServices {
    /// The apiserver knows `loadBalancerClass` (1.21+); before, server-side apply refuses the field, so it is left
    /// out, and a cloud controller, if the cluster has one, would act on the Service too.
    pub class_field: bool,
}

impl ServiceKind {
    /// Whether the Service's ports carry node ports.
    pub fn has_node_ports(self) -> bool {
        matches!(self, ServiceKind::NodePort(_))
    }
}

/// The backing Service. `existing` is the one the apiserver has: on clouds where each load balancer has its own
/// ports, its node ports are kept (TCP and UDP on one port share one node port).
pub fn backing_service(
    slb: &SharedLB,
    allocation: &Allocation,
    kind: ServiceKind,
    existing: Option<&Service>,
) -> Service {
    let ports: Vec<ServicePort> = served_ports(slb, allocation)
        .into_iter()
        .filter_map(|a| {
            let spec = slb.spec.ports.iter().find(|p| p.name == a.name)?;
            Some(ServicePort {
                name: Some(a.name.clone()),
                port: i32::from(a.port),
                target_port: Some(spec.target_port.clone()),
                protocol: Some(protocol_from_placement(a.protocol).as_str().to_string()),
                node_port: match kind {
                    // passthrough clouds: the external port is the node port
                    ServiceKind::NodePort(PortMode::PoolWide) => Some(i32::from(a.port)),
                    // one port on both protocols shares one node port (AWS's TCP_UDP listener needs it; the
                    // apiserver does it itself when it creates both at once, not when one is added later)
                    ServiceKind::NodePort(PortMode::PerLoadBalancer) => {
                        shared_node_port(existing, a.port)
                    }
                    ServiceKind::Classed(_) => None,
                },
                ..ServicePort::default()
            })
        })
        .collect();
    let spec = match kind {
        ServiceKind::NodePort(_) => ServiceSpec {
            type_: Some("NodePort".into()),
            ..ServiceSpec::default()
        },
        ServiceKind::Classed(c) => ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: c.class_field.then(|| LOAD_BALANCER_CLASS.into()),
            allocate_load_balancer_node_ports: Some(false),
            ..ServiceSpec::default()
        },
    };
    Service {
        metadata: service_meta(slb),
        spec: Some(ServiceSpec {
            selector: Some(slb.spec.selector.clone()),
            ports: Some(ports),
            ..spec
        }),
        ..Service::default()
    }
}

/// The backing Service's name, labels and controller reference.
fn service_meta(slb: &SharedLB) -> ObjectMeta {
    let owner = OwnerReference {
        api_version: SharedLB::api_version(&()).to_string(),
        kind: SharedLB::kind(&()).to_string(),
        name: slb.name_any(),
        uid: slb.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    ObjectMeta {
        name: Some(service_name(&slb.name_any())),
        namespace: slb.namespace(),
        labels: Some(
            [
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
                (OWNER_LABEL.to_string(), slb.name_any()),
            ]
            .into(),
        ),
        owner_references: Some(vec![owner]),
        ..ObjectMeta::default()
    }
}

/// True when `owner_uid` made the Service (its controller reference): a Service of that name made by anyone
/// else is never taken over.
pub fn made_by(service: &Service, owner_uid: &str) -> bool {
    service
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.uid == owner_uid)
}

/// True when the Service the apiserver has already is what `want` asks for (node ports assigned where `want`
/// leaves them to the apiserver): then it is not written.
pub fn service_is_current(have: &Service, want: &Service) -> bool {
    let (have, want) = (
        have.spec.clone().unwrap_or_default(),
        want.spec.clone().unwrap_or_default(),
    );
    let wants_node_ports = want.type_.as_deref() == Some("NodePort");
    let want_ports = want.ports.unwrap_or_default();
    let same_ports = have.ports.as_ref().is_some_and(|have| {
        have.len() == want_ports.len()
            && want_ports.iter().all(|w| {
                have.iter().any(|h| {
                    h.name == w.name
                        && h.port == w.port
                        && h.target_port == w.target_port
                        && h.protocol == w.protocol
                        && (w.node_port.is_none() || h.node_port == w.node_port)
                        // a classed Service made as a NodePort one before (an older operator, a cluster before
                        // 1.24) keeps the node ports the apiserver gave it, which no apply of ours removes:
                        // asking for their absence would write it on every reconcile
                        && (h.node_port.is_some() || !wants_node_ports)
                })
            })
    });
    same_ports
        && have.selector == want.selector
        && have.type_ == want.type_
        && have.load_balancer_class == want.load_balancer_class
        && (want.allocate_load_balancer_node_ports.is_none()
            || have.allocate_load_balancer_node_ports == want.allocate_load_balancer_node_ports)
}

/// The node port the Service already gives external `port` (its TCP entry's first), so that TCP and UDP on
/// one port converge on one node port.
fn shared_node_port(existing: Option<&Service>, port: u16) -> Option<i32> {
    let have: Vec<&ServicePort> = existing?
        .spec
        .as_ref()?
        .ports
        .iter()
        .flatten()
        .filter(|h| h.port == i32::from(port) && h.node_port.is_some())
        .collect();
    have.iter()
        .find(|h| h.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .or(have.first())
        .and_then(|h| h.node_port)
}

/// The port each of the Service's ports receives traffic on at a node, by port name: its node port, or, for a
/// `Classed` Service, its own port (the load balancer's, which the packets still carry).
pub fn arrival_ports(s: &Service, kind: ServiceKind) -> BTreeMap<String, u16> {
    s.spec
        .iter()
        .flat_map(|sp| sp.ports.iter().flatten())
        .filter_map(|p| {
            let port = match kind {
                ServiceKind::NodePort(_) => p.node_port?,
                ServiceKind::Classed(_) => p.port,
            };
            Some((p.name.clone()?, u16::try_from(port).ok()?))
        })
        .collect()
}

/// The Service status that names where the shared load balancer serves it, so kube-proxy routes the traffic
/// addressed to it, and tools that read Services (`kubectl get svc`, external-dns) see the address.
pub fn ingress_status(info: &LoadBalancerInfo) -> serde_json::Value {
    serde_json::json!({ "status": { "loadBalancer": { "ingress": wanted_ingress(info) } } })
}

/// True when the Service's status already names the load balancer's address (and nothing else).
pub fn ingress_is_current(have: &Service, info: &LoadBalancerInfo) -> bool {
    let address = |i: &LoadBalancerIngress| (i.ip.clone(), i.hostname.clone());
    let have: Vec<_> = have
        .status
        .iter()
        .flat_map(|s| s.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .map(address)
        .collect();
    let want: Vec<_> = wanted_ingress(info).iter().map(address).collect();
    have == want
}

/// The address as a Service's ingress: the IP, else the hostname.
fn wanted_ingress(info: &LoadBalancerInfo) -> Vec<LoadBalancerIngress> {
    let ingress = match (&info.ip, &info.hostname) {
        (Some(ip), _) => LoadBalancerIngress {
            ip: Some(ip.clone()),
            ..LoadBalancerIngress::default()
        },
        (None, Some(host)) => LoadBalancerIngress {
            hostname: Some(host.clone()),
            ..LoadBalancerIngress::default()
        },
        (None, None) => return Vec::new(),
    };
    vec![ingress]
}

/// A served port the Service has no node port for: the apiserver assigns one to every NodePort port, so this
/// means the Service read is not the one applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the backing Service has no node port for port {port_name:?}")]
pub struct NoNodePort {
    pub port_name: String,
}

/// The listeners to ensure: each served port, forwarding to its node port, open to the SharedLB's sources.
pub fn desired_listeners(
    slb: &SharedLB,
    allocation: &Allocation,
    node_ports: &BTreeMap<String, u16>,
    endpoints: &Endpoints,
) -> Result<Vec<ListenerSpec>, NoNodePort> {
    let owner = owner(slb);
    let source_ranges: Vec<String> = slb
        .spec
        .source_ranges
        .iter()
        .flatten()
        .map(|c| c.0.clone())
        .collect();
    served_ports(slb, allocation)
        .into_iter()
        .map(|p| {
            let node_port = *node_ports.get(&p.name).ok_or_else(|| NoNodePort {
                port_name: p.name.clone(),
            })?;
            Ok(ListenerSpec {
                port: p.port,
                protocol: p.protocol,
                node_port,
                owner: owner.clone(),
                source_ranges: source_ranges.clone(),
                backends: endpoints
                    .get(&(p.name.clone(), p.protocol.as_str().to_string()))
                    .cloned()
                    .unwrap_or_default(),
                proxy_protocol: proxy_protocol(&slb.spec, p.protocol),
                health_port: health_port(&slb.spec, &p.name),
            })
        })
        .collect()
}

/// The port the forwarder checks the endpoints of the named port on, if the spec gives one.
pub fn health_port(spec: &SharedLBSpec, port_name: &str) -> Option<u16> {
    let p = spec.ports.iter().find(|p| p.name == port_name)?;
    u16::try_from(p.health_check_port?).ok()
}

/// Whether a port of this protocol carries a PROXY protocol header: TCP ports of a SharedLB that asks for one.
pub fn proxy_protocol(spec: &SharedLBSpec, protocol: Protocol) -> bool {
    spec.proxy_protocol.is_some() && protocol == Protocol::Tcp
}

/// The status that records a new allocation, written (before any cloud call) as the durable claim on its ports.
/// The address is the load balancer's if known; node ports are kept for ports that did not move.
pub fn allocated_status(
    old: &SharedLBStatus,
    pool: &str,
    lb_name: &str,
    info: Option<&LoadBalancerInfo>,
    allocation: &Allocation,
    generation: Option<i64>,
) -> SharedLBStatus {
    use crate::controller::status::{self, READY};
    let mut st = old.clone();
    st.pool = Some(pool.to_string());
    let old_ip = old
        .load_balancer
        .as_ref()
        .filter(|l| l.name == lb_name)
        .and_then(|l| l.ip.clone());
    st.load_balancer = Some(LoadBalancerRef {
        name: lb_name.to_string(),
        ip: info.and_then(|i| i.ip.clone()).or(old_ip),
        hostname: info.and_then(|i| i.hostname.clone()),
    });
    st.ports = allocation
        .ports
        .iter()
        .map(|p| PortStatus {
            name: p.name.clone(),
            port: i32::from(p.port),
            node_port: old
                .ports
                .iter()
                .find(|o| o.name == p.name && o.port == i32::from(p.port))
                .and_then(|o| o.node_port),
            protocol: protocol_from_placement(p.protocol),
            endpoints: None,
            healthy_endpoints: None,
        })
        .collect();
    st.port_summary = Some(port_summary(&st.ports));
    set_allocated(&mut st, lb_name, generation);
    if status::get(&st.conditions, READY).is_none_or(|c| c.status != "True") {
        let message = "allocated; programming the load balancer";
        status::set(
            &mut st.conditions,
            READY,
            false,
            "Programming",
            message,
            generation,
        );
    }
    st
}

fn set_allocated(st: &mut SharedLBStatus, lb_name: &str, generation: Option<i64>) {
    let message = format!("placed on {lb_name}");
    let conds = &mut st.conditions;
    crate::controller::status::set(
        conds,
        crate::controller::status::ALLOCATED,
        true,
        "Allocated",
        &message,
        generation,
    );
}

/// Where the SharedLB is served, for its status: the load balancer's name and what the cloud last said of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<'a> {
    pub pool: &'a str,
    pub lb_name: String,
    pub info: &'a LoadBalancerInfo,
    pub service_name: String,
    /// The backing Service has node ports (`ServiceKind::has_node_ports`), which the status then shows.
    pub node_ports: bool,
}

/// The status of a SharedLB whose listeners are programmed: the address, the ports as served. `refused`: an
/// update that could not be made (the reason and message go to Ready, which stays False while the old
/// allocation keeps serving).
pub fn programmed_status(
    old: &SharedLBStatus,
    served: &Served<'_>,
    listeners: &[ListenerSpec],
    allocation: &Allocation,
    generation: Option<i64>,
    refused: Option<(&str, &str)>,
) -> SharedLBStatus {
    use crate::controller::status::{self, PROGRAMMED, READY};
    let mut st = old.clone();
    st.observed_generation = generation;
    st.pool = Some(served.pool.to_string());
    st.load_balancer = Some(LoadBalancerRef {
        name: served.lb_name.clone(),
        ip: served.info.ip.clone(),
        hostname: served.info.hostname.clone(),
    });
    st.ports = listeners
        .iter()
        .filter_map(|l| {
            let name = allocation
                .ports
                .iter()
                .find(|p| p.port == l.port && p.protocol == l.protocol)?
                .name
                .clone();
            Some(PortStatus {
                name,
                port: i32::from(l.port),
                node_port: served.node_ports.then_some(i32::from(l.node_port)),
                protocol: protocol_from_placement(l.protocol),
                endpoints: None,
                healthy_endpoints: None,
            })
        })
        .collect();
    st.port_summary = Some(port_summary(&st.ports));
    st.service_name = Some(served.service_name.clone());
    let lbn = &served.lb_name;
    set_allocated(&mut st, lbn, generation);
    status::set(
        &mut st.conditions,
        PROGRAMMED,
        true,
        "Programmed",
        &format!("listeners and firewall programmed on {lbn}"),
        generation,
    );
    match refused {
        Some((reason, message)) => status::set(
            &mut st.conditions,
            READY,
            false,
            reason,
            message,
            generation,
        ),
        None => {
            let message = format!("reachable at {} on {}", address(served.info), summary(&st));
            status::set(
                &mut st.conditions,
                READY,
                true,
                "Ready",
                &message,
                generation,
            );
        }
    }
    st
}

/// The address clients connect to: the IP, or the hostname where the cloud gives one.
pub fn address(info: &LoadBalancerInfo) -> String {
    info.ip
        .clone()
        .or(info.hostname.clone())
        .unwrap_or_default()
}

fn summary(st: &SharedLBStatus) -> String {
    st.port_summary.clone().unwrap_or_default()
}

#[cfg(test)]
mod tests;
