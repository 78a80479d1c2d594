//! The sharedlb custom resources, group `sharedlb.dev`, version `v1alpha1`.
//!
//! Doc comments on fields become the CRD's descriptions, so they are written for `kubectl explain` readers.
//! The schema says what OpenAPI and CEL can say (ranges, enums, list-map uniqueness, `x-kubernetes-validations`
//! rules, which every supported Kubernetes (1.32+) compiles when the CRD is created and enforces on write).
//! `validate` says it again in the operator, because a cluster without CEL (the 1.20 test cluster) keeps none of
//! it, and because a rule the apiserver did not run must not be trusted.
//!
//! A CEL rule's `self` is the node it is attached to: rules about ports sit on `ports`, rules about the name on
//! the root (where only `metadata.name` and `metadata.generateName` are visible). Transition rules (`oldSelf`)
//! make the identity of a pool's cloud resources immutable: changing a region or project would orphan every load
//! balancer made in the old one.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::CustomResource;
use kube::core::CustomResourceExt;
use schemars::JsonSchema;
use schemars::transform::{RecursiveTransform, Transform};
use serde::{Deserialize, Serialize};

mod validate;
pub use validate::{
    SpecError, is_concrete_unicast, load_balancer_index, local_addresses_in_effect, validate_drain,
    validate_local_addresses, validate_local_fixed_ports, validate_pool, validate_provider_change,
    validate_shared_lb,
};

pub const GROUP: &str = "sharedlb.dev";
pub const VERSION: &str = "v1alpha1";
/// Finalizer that keeps a SharedLB until its listeners and ports are released.
pub const FINALIZER: &str = "sharedlb.dev/cleanup";
/// Finalizer that keeps a pool until no SharedLB uses it and its load balancers are deleted from the cloud.
pub const POOL_FINALIZER: &str = "sharedlb.dev/pool-cleanup";
/// Label the operator puts on every object it creates, so it never adopts one it did not make.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "sharedlb";
/// Label on the backing Service naming the SharedLB it serves.
pub const OWNER_LABEL: &str = "sharedlb.dev/owner";
/// The suffix of the backing NodePort Service's name: `<name>-sharedlb`.
pub const SERVICE_SUFFIX: &str = "-sharedlb";

/// A set of ports, for pods selected in this namespace, exposed on a load balancer shared with other SharedLBs.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sharedlb.dev",
    version = "v1alpha1",
    kind = "SharedLB",
    plural = "sharedlbs",
    shortname = "slb",
    namespaced,
    status = "SharedLBStatus",
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".status.pool"}"#,
    printcolumn = r#"{"name":"External-IP","type":"string","jsonPath":".status.loadBalancer.ip"}"#,
    printcolumn = r#"{"name":"Ports","type":"string","jsonPath":".status.portSummary"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    doc = "A set of ports, for pods selected in its namespace, exposed on a load balancer shared with other SharedLBs.",
    // the backing Service is named `<name>-sharedlb`: a Service name is a DNS-1035 label of at most 63 characters
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 54")
        .message("the name must be a DNS-1035 label (lower case letters, digits, '-', starting with a letter) of at most 54 characters, so that the backing Service `<name>-sharedlb` is a valid Service name")
)]
#[serde(rename_all = "camelCase")]
pub struct SharedLBSpec {
    /// Labels of the pods that receive the traffic, in this SharedLB's own namespace only.
    #[schemars(extend("minProperties" = 1))]
    pub selector: BTreeMap<String, String>,
    /// The ports to expose. Each gets a listener on the shared load balancer and a port on the backing Service.
    /// Names are unique (a list map keyed by `name`); a fixed `port` appears once per protocol.
    #[schemars(length(min = 1, max = 64))]
    #[schemars(extend(
        "x-kubernetes-list-type" = "map",
        "x-kubernetes-list-map-keys" = ["name"],
        "x-kubernetes-validations" = [{
            "rule": "self.all(p, !has(p.port) || self.exists_one(q, has(q.port) && q.port == p.port && q.protocol == p.protocol))",
            "message": "a fixed port may appear once per protocol",
        }]
    ))]
    pub ports: Vec<SharedLBPort>,
    /// The LoadBalancerPool to use. Omitted: the pool marked `default: true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Client CIDRs allowed to connect, as on a LoadBalancer Service. Omitted or empty: open to all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub source_ranges: Option<Vec<Cidr>>,
    /// Whether the operator may move this SharedLB to another load balancer of its pool. A move changes its
    /// address (its ports stay), so only its owner can allow it. Omitted: it never moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// `v2`: each TCP connection reaches the pods behind a PROXY protocol v2 header carrying the client's address
    /// and port (the pods must expect it). On `local` pools the forwarder writes it; on `aws` pools each TCP
    /// target group gets `proxy_protocol_v2.enabled`. GCP's passthrough and Azure's load balancers deliver the
    /// client's own packets, so they refuse it (`ProxyProtocolUnsupported`): there the client address reaches the
    /// node as it is. UDP ports carry no header. Omitted: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// `v2`: each TCP connection reaches the pods behind a PROXY protocol v2 header carrying the client's address
/// and port (the pods must expect it). On `local` pools the forwarder writes it; on `aws` pools each TCP target
/// group gets `proxy_protocol_v2.enabled`. GCP's passthrough and Azure's load balancers deliver the client's own
/// packets, so they refuse it (`ProxyProtocolUnsupported`). UDP ports carry no header. Omitted: none.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ProxyProtocol {
    /// Version 2, the binary header (HAProxy's specification), as AWS's target groups send it.
    #[serde(rename = "v2")]
    V2,
}

/// Moves, make-before-break: the new listeners and firewall openings are made first, the status then shows the
/// new address (with an Event), and the old listeners serve for `gracePeriodSeconds` more, so clients can switch.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_integer_formats)]
pub struct Migration {
    /// Moved when it cannot grow where it is (`NoRoomToGrow`) or its load balancer drains.
    #[serde(default)]
    pub allowed: bool,
    /// How long the old address keeps serving after a move. Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub grace_period_seconds: Option<u32>,
}

impl SharedLBSpec {
    /// The grace period of a move, when moves are allowed.
    pub fn move_grace(&self) -> Option<std::time::Duration> {
        let m = self.migration.as_ref().filter(|m| m.allowed)?;
        Some(std::time::Duration::from_secs(u64::from(
            m.grace_period_seconds.unwrap_or(300),
        )))
    }
}

/// One exposed port.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedLBPort {
    /// A DNS-1123 label naming this port; unique within the SharedLB.
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// The external port on the shared load balancer. Omitted: the operator assigns one from the pool's range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// The pods' port: a number or a named container port.
    #[schemars(extend("maxLength" = 15, "x-kubernetes-validations" = [{
        "rule": "type(self) == int ? self >= 1 && self <= 65535 : self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 15 && self.matches('[a-z]')",
        "message": "targetPort must be 1-65535 or a container port name (an IANA_SVC_NAME: at most 15 lower case letters, digits and '-', with a letter)",
    }]))]
    pub target_port: IntOrString,
    /// TCP or UDP.
    #[serde(default)]
    pub protocol: Protocol,
    /// The pods' port a `local` pool's forwarder checks each endpoint on, by TCP connect; an endpoint failing two
    /// checks in a row leaves the rotation until it passes two. Omitted: a TCP port's endpoints are checked on
    /// their own port, a UDP port's not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub health_check_port: Option<i32>,
}

/// The transport protocol of a port.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    JsonSchema,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// An IPv4 or IPv6 CIDR such as `203.0.113.0/24`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(transparent)]
pub struct Cidr(#[schemars(length(min = 3, max = 43), extend("format" = "cidr"))] pub String);

/// What the operator has allocated and programmed for a SharedLB. `pool`, `loadBalancer.name` and `ports[].port`
/// are the durable allocation: they are written before any cloud call and rebuilt from on restart.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedLBStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Allocated` and `Programmed`, each with a reason and message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// The pool the allocation lives in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The shared load balancer this SharedLB is placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<LoadBalancerRef>,
    /// The allocated ports: external port on the load balancer and the backing Service's node port.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortStatus>,
    /// The backing NodePort Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// The ports for humans, e.g. `4001/TCP,4002/UDP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_summary: Option<String>,
    /// A move under way: the place it moves to, recorded before any cloud call while `loadBalancer` and `ports`
    /// still show where it is served. Once the new listeners are made, they become `loadBalancer` and `ports`,
    /// and the old place becomes `previous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moving_to: Option<MovingTo>,
    /// Where a moved SharedLB was: its old listeners serve until `releaseAfter`, then go. Durable like the
    /// allocation, and held again after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousPlacement>,
}

/// The load balancer and ports a SharedLB is moving to.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MovingTo {
    pub load_balancer: String,
    pub ports: Vec<PortStatus>,
}

/// The load balancer and ports a SharedLB moved off.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviousPlacement {
    pub load_balancer: LoadBalancerRef,
    pub ports: Vec<PortStatus>,
    /// RFC 3339: when the old listeners go.
    pub release_after: String,
}

/// Where a SharedLB is reachable.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerRef {
    /// The load balancer's name within its pool, e.g. `default-0`.
    pub name: String,
    /// The external IP address, once the load balancer exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// The external DNS name, for clouds that give one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// One allocated port.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_integer_formats)]
pub struct PortStatus {
    /// The spec port's name.
    pub name: String,
    /// The external port on the load balancer.
    pub port: i32,
    /// The backing Service's node port, once the Service exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<i32>,
    pub protocol: Protocol,
    /// Of `local` pools: the endpoints this port forwards to, and how many pass their health checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy_endpoints: Option<u32>,
}

/// A status condition, shaped like `metav1.Condition`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word a program can branch on.
    pub reason: String,
    /// What happened, for a person.
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A pool of cloud load balancers that the operator owns and packs SharedLBs onto.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sharedlb.dev",
    version = "v1alpha1",
    kind = "LoadBalancerPool",
    plural = "loadbalancerpools",
    shortname = "lbpool",
    status = "LoadBalancerPoolStatus",
    printcolumn = r#"{"name":"Provider","type":"string","jsonPath":".status.provider"}"#,
    printcolumn = r#"{"name":"Default","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"LBs","type":"integer","jsonPath":".status.totals.loadBalancers"}"#,
    printcolumn = r#"{"name":"Ports-Used","type":"integer","jsonPath":".status.totals.portsUsed"}"#,
    printcolumn = r#"{"name":"Capacity","type":"integer","jsonPath":".status.totals.portsCapacity"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Headroom","type":"string","priority":1,"jsonPath":".status.totals.headroom"}"#,
    printcolumn = r#"{"name":"Cost/h","type":"string","priority":1,"jsonPath":".status.totals.hourlyCost"}"#,
    printcolumn = r#"{"name":"Draining","type":"string","priority":1,"jsonPath":".spec.drain"}"#,
    doc = "A pool of cloud load balancers that the operator owns and packs SharedLBs onto."
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_integer_formats)]
pub struct LoadBalancerPoolSpec {
    /// The cloud (or local) provider and its settings: exactly one key.
    pub provider: ProviderSpec,
    /// How much the pool may hold. Defaults and ceilings come from the provider's hard limits.
    #[serde(default)]
    pub capacity: Capacity,
    /// External ports handed out when a SharedLB port omits `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
    /// `Pack` fills each load balancer before opening another; `Spread` puts each SharedLB on the least-used one.
    #[serde(default)]
    pub placement: PlacementStrategy,
    /// Namespaces allowed to use this pool. Omitted: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// The pool for SharedLBs that name none. At most one pool should set it.
    #[serde(default)]
    pub default: bool,
    /// Load balancers of this pool that take nothing new, by name (`<pool>-<index>`, as the pool's status and the
    /// SharedLBs' statuses show them): no SharedLB is placed there and none already there gains a port; those on
    /// it stay until they are deleted, and an emptied one is deleted. The pool's status lists who is still on each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 600), inner(length(min = 1, max = 80)))]
    pub drain: Vec<String>,
}

impl LoadBalancerPoolSpec {
    /// The indices of the load balancers `drain` names; names that are not this pool's are left out
    /// (`validate_drain` refuses them).
    pub fn drained(&self, pool: &str) -> std::collections::BTreeSet<u32> {
        self.drain
            .iter()
            .filter_map(|n| validate::load_balancer_index(pool, n))
            .collect()
    }
}

// The messages of the transition rules that keep a pool's cloud objects where they are.
const AWS_IDENTITY: &str =
    "region, vpcId and scheme cannot change: the pool's NLBs live there; make a new pool";
const GCP_IDENTITY: &str = "project, region and network cannot change: the pool's addresses and rules live there; make a new pool";
const AZURE_IDENTITY: &str = "subscriptionId, resourceGroup, location and loadBalancerName cannot change: the pool's load balancer lives there; make a new pool";
const AZURE_NODE_GROUPS: &str = "nodeGroups cannot change: each frontend's rules reach its group's nodes, and another split would put more than 300 rules on some; make a new pool";

/// Exactly one provider. It cannot change: the load balancers the pool made live in that provider's cloud.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend(
    "minProperties" = 1,
    "maxProperties" = 1,
    "x-kubernetes-validations" = [{
        "rule": "[has(self.aws), has(self.gcp), has(self.azure), has(self.local), has(self.memory)] == [has(oldSelf.aws), has(oldSelf.gcp), has(oldSelf.azure), has(oldSelf.local), has(oldSelf.memory)]",
        "message": "the provider cannot change: the pool's load balancers live in its cloud; make a new pool",
    }]
))]
pub struct ProviderSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gcp: Option<GcpSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalSettings>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySettings>,
}

impl ProviderSpec {
    /// The name of the one provider set, or None when zero or several are set.
    pub fn kind(&self) -> Option<&'static str> {
        let set: Vec<&'static str> = [
            ("aws", self.aws.is_some()),
            ("gcp", self.gcp.is_some()),
            ("azure", self.azure.is_some()),
            ("local", self.local.is_some()),
            ("memory", self.memory.is_some()),
        ]
        .into_iter()
        .filter_map(|(n, s)| s.then_some(n))
        .collect();
        match set.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// AWS Network Load Balancers. `region`, `vpcId` and `scheme` cannot change.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.vpcId) == has(oldSelf.vpcId) && has(self.scheme) == has(oldSelf.scheme)",
    "message": AWS_IDENTITY,
}]))]
pub struct AwsSettings {
    #[schemars(length(min = 1, max = 32), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AWS_IDENTITY}]))]
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AWS_IDENTITY}]))]
    pub vpc_id: Option<String>,
    /// Subnets for the NLBs. Omitted: discovered by the cluster tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnet_ids: Vec<String>,
    /// The nodes' security group. Each NLB the pool makes has a security group of its own, which opens exactly
    /// its listener ports to `sourceRanges`, and all carry the pool's backend security group; this group gets
    /// three rules that admit the backend group (the NodePort range 30000-32767 in TCP and UDP, and kube-proxy's
    /// health port 10256), however many ports the pool serves. NLBs made before NLBs had security groups keep
    /// one rule per node port and source range here. Omitted: the operator changes no rule here (the nodes must
    /// admit the NLBs' traffic some other way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_security_group_id: Option<String>,
    /// `internet-facing` (default) or `internal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AWS_IDENTITY}]))]
    pub scheme: Option<String>,
    /// Elastic IP allocation ids for internet-facing NLBs: one per subnet per NLB, in order (NLB i takes
    /// the i-th group of as many as there are subnets); the pool then has at most `len / subnets` NLBs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub eip_allocation_ids: Vec<String>,
    /// Inbound rules a security group may hold (AWS's default quota is 60, raisable per account). Each port of
    /// an NLB opens one rule per source CIDR (at least one) in that NLB's own security group, so this bounds the
    /// ports of each NLB (counted as one rule per port: SharedLBs with several `sourceRanges` can still meet
    /// AWS's refusal on a full NLB). While the pool still has an NLB made without security groups, whose ports
    /// open rules in the node security group, it also caps the ports of the whole pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub security_group_rule_limit: Option<u32>,
    /// Ready nodes each NLB targets in each zone, chosen by rendezvous hashing so a node's arrival or departure
    /// changes only the NLBs it is (or becomes) a target of; AWS allows 500 targets per zone per NLB, so few
    /// per zone leave each NLB its 50 listeners however large the cluster. Default 3; 0: every Ready node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub target_nodes_per_zone: Option<u32>,
    /// What the NLBs' target groups hold. `Nodes` (default): a few nodes per zone on the backing Service's node
    /// port, through kube-proxy. `Pods`: the ready pods' IPs and ports, read from the backing Service's
    /// EndpointSlices (the pods' IPs must be VPC addresses, as with the VPC CNI): no node port is taken (on
    /// 1.24+ the backing Service is a classed `LoadBalancer` without node ports), there is no second hop, and
    /// the nodes' security group admits the backend group on every port instead of the node-port range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
}

/// What a cloud load balancer sends traffic to.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Targets {
    /// The nodes, on the backing Service's node port (kube-proxy takes it to a pod).
    #[default]
    Nodes,
    /// The ready pods' IPs directly.
    Pods,
}

/// GCP passthrough Network Load Balancers. `project`, `region` and `network` cannot change.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.network) == has(oldSelf.network)",
    "message": GCP_IDENTITY,
}]))]
pub struct GcpSettings {
    #[schemars(length(min = 1, max = 30), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": GCP_IDENTITY}]))]
    pub project: String,
    #[schemars(length(min = 1, max = 32), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": GCP_IDENTITY}]))]
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": GCP_IDENTITY}]))]
    pub network: Option<String>,
    /// The network tag on the cluster's nodes, which firewall rules target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_tag: Option<String>,
    /// Ready nodes each load balancer targets in each zone, chosen by rendezvous hashing so a node's arrival or
    /// departure changes only the load balancers it is (or becomes) a target of. Default 3; 0: every Ready node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub target_nodes_per_zone: Option<u32>,
}

/// Azure Standard Load Balancer: the pool is one Standard Load Balancer the operator owns, each load balancer of
/// the pool one frontend with its own Standard public IP. `subscriptionId`, `resourceGroup`, `location`,
/// `loadBalancerName` and `nodeGroups` cannot change.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.loadBalancerName) == has(oldSelf.loadBalancerName)",
    "message": AZURE_IDENTITY,
}, {
    "rule": "has(self.nodeGroups) == has(oldSelf.nodeGroups)",
    "message": AZURE_NODE_GROUPS,
}]))]
pub struct AzureSettings {
    #[schemars(length(min = 1, max = 36), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AZURE_IDENTITY}]))]
    pub subscription_id: String,
    /// Where the load balancer and public IPs are made (on AKS: the node resource group, `MC_...`).
    #[schemars(length(min = 1, max = 90), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AZURE_IDENTITY}]))]
    pub resource_group: String,
    #[schemars(length(min = 1, max = 64), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AZURE_IDENTITY}]))]
    pub location: String,
    /// The Standard Load Balancer this pool owns (made and deleted by the operator, tagged); default derived
    /// from the cluster id and pool name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 80), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AZURE_IDENTITY}]))]
    pub load_balancer_name: Option<String>,
    /// The nodes' network security group: one rule per SharedLB and protocol is added to it.
    pub network_security_group: String,
    /// The NSG's resource group, when not `resourceGroup`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_security_group_resource_group: Option<String>,
    /// The nodes' virtual network (a name in `resourceGroup`, or a full resource id): the backend pool holds the
    /// nodes' internal IPs in it (nodes whose `spec.providerID` is an Azure VM or scale-set VM).
    pub virtual_network: String,
    /// Disjoint groups the nodes are split into, by a hash of each node's name: frontend `i` sends to group
    /// `i mod nodeGroups`. Azure lets at most 300 load-balancing rules reach one NIC, so the frontends of one
    /// group hold 300 ports together, and the pool `300 x nodeGroups` (at most the load balancer's 1,500).
    /// Each group needs nodes in every zone it should serve: a few nodes per group is enough. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5), extend("x-kubernetes-validations" = [{"rule": "self == oldSelf", "message": AZURE_NODE_GROUPS}]))]
    pub node_groups: Option<u32>,
    /// Ready nodes of its group each backend pool holds per zone, chosen by rendezvous hashing so a node's
    /// arrival or departure changes only the pool it is (or becomes) in. Default 3; 0: every Ready node of the
    /// group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub target_nodes_per_zone: Option<u32>,
    /// What the load-balancing rules send to. `Nodes` (default): a node group's backend pool on the backing
    /// Service's node port. `Pods`: each rule has a backend pool of its own holding the ready pods' IPs (from
    /// the backing Service's EndpointSlices; with Azure CNI they are virtual network addresses) on their port:
    /// no node port is taken (on 1.24+ the backing Service is a classed `LoadBalancer` without node ports), a
    /// pod is behind only its own Service's rules (so `nodeGroups` plays no part and the pool holds the load
    /// balancer's 1,500 rules), and the NSG opens the pods' port. UDP rules to pods have no health probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
}

/// The operator itself forwards traffic, from addresses of this machine (bare metal, laptops).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalSettings {
    /// One address of this machine per load balancer, e.g. `127.0.0.10`; the pool has as many load balancers
    /// as addresses. Each a concrete unicast address: not unspecified (`0.0.0.0`, `::`), multicast, broadcast or
    /// link-local.
    #[schemars(length(min = 1, max = 1024), inner(length(max = 45)))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(a, isIP(a) && (ip(a).isLoopback() || ip(a).isGlobalUnicast()))",
        "message": "each address must be a concrete unicast IPv4 or IPv6 address: not 0.0.0.0 or ::, multicast, broadcast or link-local",
    }]))]
    pub addresses: Vec<String>,
    /// Ranges a SharedLB's fixed `port` may also come from, besides `portRange`. The forwarder binds on this
    /// machine, so the pool decides which ports tenants may take: a fixed port outside `portRange` and these
    /// ranges is refused (`PortNotAllowed`), a port below 1024 included. The operator's own ports never are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub fixed_port_ranges: Vec<PortRange>,
    /// Managers (the `endpointslice.kubernetes.io/managed-by` label) whose EndpointSlices of a backing Service
    /// the forwarder trusts, besides the EndpointSlice controller (`endpointslice-controller.k8s.io`). Slices
    /// of other managers are refused: whoever can write an EndpointSlice could otherwise aim a listener anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), inner(length(min = 1, max = 63)))]
    pub endpoint_slice_managers: Vec<String>,
    /// Forward to endpoints on loopback addresses, for a single machine without pods (the demo, tests). Never
    /// on a cluster: a tenant's listener would reach the services of the machine the forwarder runs on.
    /// Link-local and cloud metadata addresses are refused whatever this says. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_loopback_endpoints: bool,
    /// A TCP connection with no byte either way, or a UDP session with no datagram, for this long is closed.
    /// Default 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub idle_timeout_seconds: Option<u32>,
    /// Open TCP connections or UDP sessions per listener; more are refused. Default 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections_per_listener: Option<u32>,
}

/// An in-process provider for tests and demos: addresses from 198.51.100.0/24 (TEST-NET-2), no data path,
/// with fault injection.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemorySettings {
    /// Added to every call, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 60000))]
    pub latency_ms: Option<u32>,
    /// Added to the making of a load balancer, in milliseconds, as a cloud takes minutes to provision one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 600000))]
    pub provisioning_ms: Option<u32>,
    /// Share of mutating calls that fail with a server error, 0 to 1000 per mille.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub error_per_mille: Option<u32>,
    /// Share of mutating calls throttled, 0 to 1000 per mille.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub throttle_per_mille: Option<u32>,
    /// The account's quota of load balancers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub load_balancer_quota: Option<u32>,
    /// A rate limit on mutating calls, as a cloud's API has: a token bucket refilled at this many calls per
    /// second. A call finding it empty is throttled, with the wait until the next token as its retry-after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub calls_per_second: Option<u32>,
    /// The bucket's size: calls that may go at once after a quiet spell. Default: one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100000))]
    pub burst: Option<u32>,
    /// Ready nodes each load balancer targets in each zone, chosen by rendezvous hashing so a node's arrival or
    /// departure changes only the load balancers it is (or becomes) a target of. Default 3; 0: every Ready node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1000))]
    pub target_nodes_per_zone: Option<u32>,
}

/// The subset size a pool's `targetNodesPerZone` asks for: `None` for every node.
pub fn target_nodes_per_zone(setting: Option<u32>, default: u32) -> Option<u32> {
    match setting.unwrap_or(default) {
        0 => None,
        n => Some(n),
    }
}

/// Pool capacity.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Listeners (port/protocol pairs) per load balancer. Omitted: the provider's hard limit, which is also
    /// the ceiling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub max_ports_per_load_balancer: Option<u32>,
    /// Load balancers the pool may create. Omitted: no limit but the provider's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_load_balancers: Option<u32>,
    /// Empty load balancers kept made ahead of need (warm spares), within `maxLoadBalancers`: a SharedLB that
    /// needs a new load balancer lands on one at once instead of waiting while the cloud makes one (an NLB takes
    /// minutes); another spare is then made. Each is paid for while it waits. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 20))]
    pub warm_load_balancers: Option<u32>,
}

/// An inclusive range of ports.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "self.min <= self.max", "message": "min must not exceed max"}]))]
pub struct PortRange {
    #[schemars(range(min = 1, max = 65535))]
    pub min: i32,
    #[schemars(range(min = 1, max = 65535))]
    pub max: i32,
}

/// Where new SharedLBs go.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PlacementStrategy {
    #[default]
    Pack,
    Spread,
}

/// What the pool holds now.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = kubernetes_integer_formats)]
pub struct LoadBalancerPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The provider in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// One row per load balancer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancers: Vec<PoolLoadBalancer>,
    #[serde(default)]
    pub totals: PoolTotals,
    /// The limits the operator places under: the provider's hard limits (some learnt from the cloud) capped by
    /// the spec. `sharedlb plan` plans with these, so its answer is the operator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<PoolLimits>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// What the placement of a pool is bound by.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolLimits {
    /// Port/protocol pairs one load balancer holds.
    pub max_ports_per_load_balancer: u32,
    /// Load balancers the pool may have; omitted: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_load_balancers: Option<u32>,
    /// Port/protocol pairs the whole pool may hold (a budget all its load balancers share, such as firewall rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ports_total: Option<u32>,
    /// Where auto-assigned ports come from.
    pub port_range: PortRange,
    /// A port is unique across the pool, not per load balancer (the external port is the node port).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ports_unique_across_pool: bool,
    /// Load balancer `i` is in group `i mod groups`, and one group's load balancers hold at most
    /// `portsPerGroup` together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports_per_group: Option<u32>,
}

/// One load balancer of a pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolLoadBalancer {
    pub name: String,
    /// The cloud's id for it, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub ports_used: u32,
    pub capacity: u32,
    /// Listed in `spec.drain`: it takes nothing new.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
    /// Of a draining load balancer: the SharedLBs still on it (`<namespace>/<name>`, at most 50).
    #[serde(default, rename = "sharedLBs", skip_serializing_if = "Vec::is_empty")]
    pub shared_lbs: Vec<String>,
}

/// Pool totals.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolTotals {
    pub load_balancers: u32,
    pub ports_used: u32,
    pub ports_capacity: u32,
    /// One-port SharedLBs (auto-assigned port) that still fit, counting the load balancers the pool may still
    /// make: `37`, or `37+` when nothing limits new load balancers (37 fit on the ones made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headroom: Option<String>,
    /// What the pool's load balancers cost per hour, estimated from the price table (`sharedlb plan` prints it;
    /// the operator's `--prices` overrides it), e.g. `0.0450 USD`. Traffic charges are not in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly_cost: Option<String>,
}

/// Kubernetes knows the integer formats `int32` and `int64` only; schemars writes `uint32` for a `u32`, which a
/// current apiserver accepts with a warning on every apply (`unrecognized format "uint32"`). Every unsigned field
/// here is at most `u32::MAX`, which `int64` holds; `minimum: 0` stays.
fn kubernetes_integer_formats(schema: &mut schemars::Schema) {
    RecursiveTransform(|s: &mut schemars::Schema| {
        let unsigned = s
            .get("format")
            .and_then(|f| f.as_str())
            .is_some_and(|f| f.starts_with("uint"));
        if unsigned {
            s.insert("format".into(), "int64".into());
        }
    })
    .transform(schema);
}

/// Both CRDs as one multi-document YAML, exactly as committed in `charts/sharedlb/crds/crds.yaml`.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let header = "# Generated by `cargo run --bin crdgen` from crds/src/lib.rs. Do not edit.\n";
    let mut out = String::from(header);
    for crd in [SharedLB::crd(), LoadBalancerPool::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

/// The backing Service's name for a SharedLB.
pub fn service_name(shared_lb_name: &str) -> String {
    format!("{shared_lb_name}{SERVICE_SUFFIX}")
}

/// `4001/TCP,4002/UDP`.
pub fn port_summary(ports: &[PortStatus]) -> String {
    let mut sorted: Vec<&PortStatus> = ports.iter().collect();
    sorted.sort_by_key(|p| (p.port, p.protocol));
    sorted
        .into_iter()
        .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
        .collect::<Vec<_>>()
        .join(",")
}
