//! Typed test fixtures: SharedLBs, allocations and Services built in a line, with the fields a test cares about
//! named and everything else a valid default.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use sharedlb_crds::{
    Cidr, LoadBalancerRef, PortStatus, Protocol, SharedLB, SharedLBPort, SharedLBSpec,
    SharedLBStatus,
};
use sharedlb_placement::{AllocatedPort, Allocation};

/// A SharedLB in namespace `team-a`, uid `uid-<name>`, selecting `app=<name>`, with no ports until added.
pub struct SharedLBBuilder {
    slb: SharedLB,
}

pub fn shared_lb(name: &str) -> SharedLBBuilder {
    let mut slb = SharedLB::new(
        name,
        SharedLBSpec {
            selector: [("app".to_string(), name.to_string())].into(),
            ports: Vec::new(),
            pool: Some("default".into()),
            source_ranges: None,
            migration: None,
            proxy_protocol: None,
        },
    );
    slb.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("team-a".into()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        ..ObjectMeta::default()
    };
    SharedLBBuilder { slb }
}

impl SharedLBBuilder {
    /// A port forwarding to the same number on the pods; `port: None` asks the pool to assign one.
    pub fn port(mut self, name: &str, port: Option<i32>, protocol: Protocol) -> Self {
        self.slb.spec.ports.push(SharedLBPort {
            name: name.into(),
            port,
            target_port: IntOrString::Int(port.unwrap_or(8080)),
            protocol,
            health_check_port: None,
        });
        self
    }

    pub fn source_range(mut self, cidr: &str) -> Self {
        self.slb
            .spec
            .source_ranges
            .get_or_insert_with(Vec::new)
            .push(Cidr(cidr.into()));
        self
    }

    /// Names another pool (or, with `None`, the default one).
    pub fn pool(mut self, pool: Option<&str>) -> Self {
        self.slb.spec.pool = pool.map(str::to_string);
        self
    }

    /// A status that records these ports on load balancer `<pool>-<lb>`.
    pub fn placed(mut self, pool: &str, lb: u32, ports: &[(&str, u16, Protocol)]) -> Self {
        self.slb.status = Some(SharedLBStatus {
            pool: Some(pool.into()),
            load_balancer: Some(LoadBalancerRef {
                name: format!("{pool}-{lb}"),
                ..LoadBalancerRef::default()
            }),
            ports: ports
                .iter()
                .map(|(name, port, protocol)| PortStatus {
                    name: name.to_string(),
                    port: i32::from(*port),
                    node_port: None,
                    protocol: *protocol,
                    endpoints: None,
                    healthy_endpoints: None,
                })
                .collect(),
            ..SharedLBStatus::default()
        });
        self
    }

    pub fn build(self) -> SharedLB {
        self.slb
    }
}

/// An allocation on load balancer `lb` of `(name, port, protocol)`s.
pub fn allocation(lb: u32, ports: &[(&str, u16, Protocol)]) -> Allocation {
    let mut ports: Vec<AllocatedPort> = ports
        .iter()
        .map(|(name, port, protocol)| AllocatedPort {
            name: name.to_string(),
            port: *port,
            protocol: crate::model::protocol_to_placement(*protocol),
        })
        .collect();
    ports.sort();
    Allocation { lb, ports }
}

/// A Service as the apiserver returns it: the given ports with node ports assigned, owned by `owner_uid`.
pub fn service(owner_uid: &str, ports: &[(&str, i32, &str, i32)]) -> Service {
    Service {
        metadata: ObjectMeta {
            owner_references: Some(vec![
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    uid: owner_uid.into(),
                    ..Default::default()
                },
            ]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("NodePort".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port, protocol, node_port)| ServicePort {
                        name: Some(name.to_string()),
                        port: *port,
                        protocol: Some(protocol.to_string()),
                        node_port: Some(*node_port),
                        target_port: Some(IntOrString::Int(*port)),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
