//! The one interface between the operator and a cloud: `LoadBalancerProvider`.
//!
//! Every call is idempotent ("ensure", never "create"): the operator may crash between any two calls and simply
//! call again. Every object a provider makes is found again by its tags/names (cluster id, pool, index, owner),
//! which is what `inventory` returns and what the allocator is rebuilt from.
//!
//! Shaped for the clouds: a listener carries its node port (AWS target groups and Azure rules forward to it; on
//! GCP passthrough the external port *is* the node port, which `Limits::port_mode` tells the planner); nodes come
//! in through `update_nodes` (AWS targets, GCP instance groups, Azure backend pools); a provider whose API updates
//! a whole load balancer per call (Azure) may batch concurrent `ensure_listener` calls into one write.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::time::Duration;

pub use sharedlb_placement::{LbGroups, PortMode, Protocol};

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod conformance;
#[cfg(feature = "gcp")]
pub mod gcp;
pub mod local;
pub mod memory;

/// Tag keys every provider puts on what it makes.
pub mod tags {
    pub const MANAGED_BY: &str = "sharedlb.dev/managed-by";
    pub const CLUSTER: &str = "sharedlb.dev/cluster";
    pub const POOL: &str = "sharedlb.dev/pool";
    pub const INDEX: &str = "sharedlb.dev/index";
    pub const OWNER_UID: &str = "sharedlb.dev/owner-uid";
}

/// `slb-<8 hex digits>-`: the start of every cloud name a provider gives for one cluster's pool. Cloud names are
/// short (32 characters for AWS target groups), so the cluster and pool are hashed (FNV-1a, stable across
/// releases: changing it would orphan what exists).
pub fn cloud_name_prefix(cluster_id: &str, pool: &str) -> String {
    let h = format!("{cluster_id}/{pool}")
        .bytes()
        .fold(0x811c_9dc5u32, |h, b| {
            (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
        });
    format!("slb-{h:08x}-")
}

/// Errors by meaning, so the controller can branch on them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    #[error("throttled (retry after {}ms): {message}", retry_after.as_millis())]
    Throttled {
        retry_after: Duration,
        message: String,
    },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The caller may not make changes now (the operator's leader fence is closed); nothing reached the cloud.
    #[error("fenced: {0}")]
    Fenced(String),
    #[error("{0}")]
    Other(String),
}

impl ProviderError {
    /// The message for tenants (a SharedLB's status and Events, which its namespace reads): the cloud's words
    /// with the account's identifiers taken out. The operator's logs and the pool's status keep the whole text.
    pub fn tenant_message(&self) -> String {
        redact_account_ids(&self.to_string())
    }

    /// A CamelCase reason for conditions and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::NotFound(_) => "CloudNotFound",
            ProviderError::AlreadyExists(_) => "CloudAlreadyExists",
            ProviderError::QuotaExceeded(_) => "CloudQuotaExceeded",
            ProviderError::Throttled { .. } => "CloudThrottled",
            ProviderError::InvalidConfig(_) => "CloudInvalidConfig",
            ProviderError::Fenced(_) => "Fenced",
            ProviderError::Other(_) => "CloudError",
        }
    }

    /// How long to wait before trying again; `None` for errors that a retry will not fix without a change.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Throttled { retry_after, .. } => Some(*retry_after),
            ProviderError::Other(_)
            | ProviderError::NotFound(_)
            | ProviderError::AlreadyExists(_) => Some(Duration::from_secs(2)),
            ProviderError::QuotaExceeded(_) => Some(Duration::from_secs(60)),
            ProviderError::Fenced(_) => Some(Duration::from_secs(1)),
            ProviderError::InvalidConfig(_) => None,
        }
    }
}

/// An idempotent delete: what is already gone is success; every other error stays one.
pub fn gone_is_ok(r: Result<(), ProviderError>) -> Result<(), ProviderError> {
    match r {
        Err(ProviderError::NotFound(_)) => Ok(()),
        other => other,
    }
}

/// An idempotent create or opening: what already exists is success; every other error stays one.
pub fn existing_is_ok(r: Result<(), ProviderError>) -> Result<(), ProviderError> {
    match r {
        Err(ProviderError::AlreadyExists(_)) => Ok(()),
        other => other,
    }
}

/// Who a listener belongs to: recorded in the cloud so that a port is only ever removed by its owner.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Owner {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

/// Which load balancer of which pool of which cluster. Providers derive deterministic cloud names from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoadBalancerKey {
    pub cluster_id: String,
    pub pool: String,
    pub index: u32,
}

impl LoadBalancerKey {
    /// The name inside the pool, as shown in statuses: `<pool>-<index>`.
    pub fn name(&self) -> String {
        format!("{}-{}", self.pool, self.index)
    }
}

/// What the cloud says about a load balancer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadBalancerInfo {
    pub id: String,
    pub ip: Option<String>,
    pub hostname: Option<String>,
}

/// One listener to ensure: external port and protocol, forwarding to the nodes' `node_port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: u16,
    pub owner: Owner,
    /// Client CIDRs; empty means open to all. The firewall opens exactly this port to exactly these.
    pub source_ranges: Vec<String>,
    /// The ready endpoints behind this port, for providers that forward to them directly (`local`); clouds
    /// forward to `node_port` and ignore this.
    pub backends: Vec<SocketAddr>,
    /// Each TCP connection reaches the backends behind a PROXY protocol v2 header with the client's address.
    pub proxy_protocol: bool,
    /// The endpoints' port that forwarders check them on by TCP (`local`); None: a TCP listener checks each
    /// endpoint's own port, a UDP listener does not check.
    pub health_port: Option<u16>,
}

/// A node that receives traffic on node ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct NodeTarget {
    pub name: String,
    /// `spec.providerID`, e.g. `aws:///us-east-1a/i-0123` or `gce://project/zone/name`.
    pub provider_id: Option<String>,
    pub internal_ip: Option<String>,
    /// The `topology.kubernetes.io/zone` label, if the node has it.
    pub zone: Option<String>,
}

impl NodeTarget {
    /// The node's zone: its label, else the zone its providerID names (AWS and GCE name one), else `""`.
    pub fn zone(&self) -> &str {
        if let Some(z) = &self.zone {
            return z;
        }
        let id = self.provider_id.as_deref().unwrap_or_default();
        let zone = match (id.strip_prefix("aws:///"), id.strip_prefix("gce://")) {
            (Some(rest), _) => rest.split('/').next(),
            (_, Some(rest)) => rest.split('/').nth(1),
            _ => None,
        };
        zone.unwrap_or_default()
    }
}

/// The cluster's nodes as a provider last set them, and whether every load balancer's targets were brought in
/// step with them since: until then a node change checks every load balancer (a failed update, a provider just
/// made), after it only those whose subset moved.
#[derive(Debug, Default)]
pub struct HeldNodes {
    held: std::sync::RwLock<(Vec<NodeTarget>, bool)>,
}

impl HeldNodes {
    /// Reads the nodes as last set.
    pub fn with<R>(&self, f: impl FnOnce(&[NodeTarget]) -> R) -> R {
        f(&self.held.read().unwrap_or_else(|e| e.into_inner()).0)
    }

    /// Sets the nodes; returns the ones before if every load balancer was in step with them (`None`: check all).
    /// Out of step until `in_step`.
    pub fn replace(&self, nodes: &[NodeTarget]) -> Option<Vec<NodeTarget>> {
        let mut held = self.held.write().unwrap_or_else(|e| e.into_inner());
        let before = std::mem::replace(&mut held.0, nodes.to_vec());
        std::mem::replace(&mut held.1, false).then_some(before)
    }

    /// Every load balancer's targets now follow the nodes as set.
    pub fn in_step(&self) {
        self.held.write().unwrap_or_else(|e| e.into_inner()).1 = true;
    }
}

/// Ready nodes a load balancer targets when its pool says nothing (`targetNodesPerZone`): enough that a node's
/// loss or drain leaves each zone served, few enough that a load balancer's targets do not grow with the cluster.
pub const DEFAULT_TARGET_NODES_PER_ZONE: u32 = 3;

/// The nodes the load balancer with cloud name `lb` targets: `per_zone` of each zone, chosen by rendezvous hashing
/// (`sharedlb_placement::node_subset`), so a node's arrival or departure changes only the subsets it is in;
/// `None`: every node.
pub fn target_nodes<'a>(
    lb: &str,
    nodes: &'a [NodeTarget],
    per_zone: Option<u32>,
) -> Vec<&'a NodeTarget> {
    let zoned: Vec<sharedlb_placement::ZonedNode<'_>> = nodes
        .iter()
        .map(|n| sharedlb_placement::ZonedNode {
            name: &n.name,
            zone: n.zone(),
        })
        .collect();
    let chosen: std::collections::BTreeSet<&str> =
        sharedlb_placement::node_subset(lb, &zoned, per_zone)
            .into_iter()
            .collect();
    nodes
        .iter()
        .filter(|n| chosen.contains(n.name.as_str()))
        .collect()
}

/// Everything a provider owns in one pool, found by tags.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Inventory {
    pub load_balancers: Vec<InventoryLoadBalancer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryLoadBalancer {
    pub index: u32,
    pub info: LoadBalancerInfo,
    pub listeners: Vec<InventoryListener>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct InventoryListener {
    pub port: u16,
    pub protocol: Protocol,
    pub node_port: u16,
    pub owner_uid: String,
    /// False when the cloud holds only part of it, which serves nothing (on AWS, a target group no listener
    /// forwards to, as a listener deleted behind the operator's back leaves): it is made whole again when wanted,
    /// removed when not.
    pub serving: bool,
}

/// Hard limits the planner must respect; capacity is the minimum over all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Port/protocol pairs one load balancer can hold.
    pub max_ports_per_lb: u32,
    /// Load balancers the account allows, if the provider knows.
    pub max_lbs: Option<u32>,
    /// Port/protocol pairs the whole pool may hold, when one budget is shared by all its load balancers (the
    /// rules of the node security group on AWS).
    pub max_ports_total: Option<u32>,
    pub port_mode: PortMode,
    /// Load balancers whose ports share one budget by group (Azure: frontends that send to the same nodes).
    pub lb_groups: Option<LbGroups>,
}

/// Calls of one cloud API operation since the provider was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiCalls {
    pub operation: String,
    pub mutating: bool,
    pub calls: u64,
}

/// Counters of one listener that carries traffic itself (the local provider).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStatsRow {
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub stats: local::StatsSnapshot,
}

/// One cloud's load balancers for one pool. Object-safe: the operator holds `Arc<dyn LoadBalancerProvider>`.
#[async_trait::async_trait]
pub trait LoadBalancerProvider: Send + Sync + Debug {
    /// `aws`, `gcp`, `azure`, `local` or `memory`.
    fn kind(&self) -> &'static str;

    fn limits(&self) -> Limits;

    /// Makes the load balancer exist (found by its deterministic name/tags, or created) and returns it.
    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError>;

    /// Makes one listener (and its firewall opening) exist exactly as specified.
    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        listener: &ListenerSpec,
    ) -> Result<(), ProviderError>;

    /// Removes a listener and its firewall opening if it exists *and* belongs to `owner_uid`. Missing is success.
    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError>;

    /// Deletes the load balancer and everything under it. Missing is success.
    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError>;

    /// The pool is being deleted and none of its load balancers is left: deletes whatever else the provider made
    /// for it (shared groups, target groups of a load balancer deleted before its crash, ...). Called on every
    /// attempt of the pool's deletion, so what one delete left behind the next finds. Nothing left is success.
    async fn delete_pool_leftovers(&self) -> Result<(), ProviderError> {
        Ok(())
    }

    /// Everything this provider owns for its cluster and pool.
    async fn inventory(&self) -> Result<Inventory, ProviderError>;

    /// True when listeners forward to the Service's endpoints (`ListenerSpec::backends`) rather than to the
    /// nodes' node port: the operator then reads EndpointSlices and re-ensures listeners when they change.
    fn forwards_to_endpoints(&self) -> bool {
        false
    }

    /// True when a listener can put a PROXY protocol v2 header in front of each TCP connection
    /// (`ListenerSpec::proxy_protocol`). Passthrough clouds cannot: they deliver the client's own packets.
    fn supports_proxy_protocol(&self) -> bool {
        false
    }

    /// Of providers that check endpoints themselves (`local`): the endpoints of a listener that pass their
    /// health checks, and all of them. None: not known here (a cloud checks its own targets).
    async fn endpoint_health(
        &self,
        _lb: &LoadBalancerKey,
        _port: u16,
        _protocol: Protocol,
    ) -> Option<(usize, usize)> {
        None
    }

    /// True when the cloud sends a listener's traffic to the nodes' node port (instance targets, NIC backends).
    /// False where it never uses one: passthrough clouds deliver packets still addressed to the load balancer's
    /// IP and port, which kube-proxy routes once the backing Service's status names that IP, and providers that
    /// forward to endpoints reach the pods themselves. Then, on clusters that can make a `LoadBalancer` Service
    /// without node ports (1.24+), the operator takes none from the cluster's node-port range.
    fn needs_node_ports(&self) -> bool {
        true
    }

    /// Per-listener traffic counters, for providers that carry the traffic themselves; clouds report none.
    async fn listener_stats(&self) -> Vec<ListenerStatsRow> {
        Vec::new()
    }

    /// The cloud API calls this provider made so far, by the cloud's operation name (`CreateListener`), with
    /// whether the operation changes something; clouds whose SDK can count them report, others report none.
    fn api_calls(&self) -> Vec<ApiCalls> {
        Vec::new()
    }

    /// The cluster's nodes changed: update backends. Clouds without node backends ignore it.
    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        let _ = nodes;
        Ok(())
    }
}

/// Takes the cloud account's identifiers out of a cloud's message: the account id field of AWS ARNs
/// (`arn:aws:elasticloadbalancing:eu-west-1:123456789012:...`), every GUID (Azure subscription and tenant ids) and
/// GCP project ids in resource paths (`projects/my-project/...`).
pub fn redact_account_ids(msg: &str) -> String {
    let arns = redact_arn_accounts(msg);
    let guids = redact_guids(&arns);
    redact_after(&guids, "projects/")
}

fn redact_arn_accounts(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find("arn:") {
        let (before, arn) = rest.split_at(at);
        out.push_str(before);
        // arn:partition:service:region:account:resource
        let fields: Vec<&str> = arn.splitn(6, ':').collect();
        if fields.len() == 6
            && fields[4].len() == 12
            && fields[4].bytes().all(|b| b.is_ascii_digit())
        {
            out.push_str(&fields[..4].join(":"));
            out.push_str(":<account>:");
            rest = fields[5];
        } else {
            out.push_str("arn:");
            rest = &arn[4..];
        }
    }
    out.push_str(rest);
    out
}

fn redact_guids(msg: &str) -> String {
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let is_guid = |w: &str| {
        let parts: Vec<&str> = w.split('-').collect();
        parts.len() == 5
            && parts
                .iter()
                .zip(SHAPE)
                .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
    };
    let mut out = String::with_capacity(msg.len());
    let mut word = String::new();
    for c in msg.chars().chain(std::iter::once('\0')) {
        if c.is_ascii_hexdigit() || c == '-' {
            word.push(c);
            continue;
        }
        if is_guid(&word) {
            out.push_str("<id>");
        } else {
            out.push_str(&word);
        }
        word.clear();
        if c != '\0' {
            out.push(c);
        }
    }
    out
}

/// Replaces the path segment after each `marker` (up to the next `/`, quote or space).
fn redact_after(msg: &str, marker: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(at) = rest.find(marker) {
        let (before, tail) = rest.split_at(at + marker.len());
        out.push_str(before);
        let end = tail
            .find(|c: char| c == '/' || c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(tail.len());
        out.push_str(if end == 0 { "" } else { "<project>" });
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {

    #[test]
    fn tenant_messages_carry_no_account_ids() {
        use crate::ProviderError;
        let aws = ProviderError::InvalidConfig("User: arn:aws:sts::123456789012:assumed-role/sharedlb/i-1 is not authorized to perform: elasticloadbalancing:CreateListener on resource: arn:aws:elasticloadbalancing:eu-west-1:123456789012:loadbalancer/net/x/abc".into());
        let m = aws.tenant_message();
        assert!(!m.contains("123456789012"), "{m}");
        assert!(
            m.contains("arn:aws:sts::<account>:assumed-role/sharedlb/i-1")
                && m.contains("CreateListener"),
            "{m}"
        );
        let azure = ProviderError::InvalidConfig("AADSTS90002: Tenant '72f988bf-86f1-41af-91ab-2d7cd011db47' not found; /subscriptions/0b1f6471-1bf0-4dda-aec3-cb9272f09590/resourceGroups/rg".into());
        let m = azure.tenant_message();
        assert!(!m.contains("72f988bf") && !m.contains("0b1f6471"), "{m}");
        assert!(
            m.contains("Tenant '<id>' not found; /subscriptions/<id>/resourceGroups/rg"),
            "{m}"
        );
        let gcp = ProviderError::QuotaExceeded("Quota 'ADDRESSES' exceeded. Limit: 0.0 in region europe-west1 of projects/acme-prod-42/regions/x".into());
        let m = gcp.tenant_message();
        assert!(
            m.contains("Quota 'ADDRESSES' exceeded") && m.contains("projects/<project>/regions/x"),
            "{m}"
        );
        // words that only look like ids stay
        let plain = ProviderError::Other("port 31000-31002 deadbeef arn: none".into());
        assert_eq!(plain.tenant_message(), plain.to_string());
    }
    /// Existing clouds hold names made with this prefix: it must never change for a given cluster and pool.
    #[test]
    fn the_cloud_name_prefix_is_stable() {
        assert_eq!(super::cloud_name_prefix("c1", "web"), "slb-a47c3254-");
    }

    #[test]
    fn a_nodes_zone_is_its_label_else_what_its_provider_id_names() {
        let node = |id: &str, zone: Option<&str>| super::NodeTarget {
            name: "n".into(),
            provider_id: Some(id.into()),
            zone: zone.map(str::to_string),
            ..Default::default()
        };
        assert_eq!(node("aws:///us-east-1a/i-0123", None).zone(), "us-east-1a");
        assert_eq!(
            node("gce://proj/europe-west1-b/n1", None).zone(),
            "europe-west1-b"
        );
        assert_eq!(
            node("azure:///subscriptions/s/x", Some("eastus-2")).zone(),
            "eastus-2"
        );
        assert_eq!(node("kind://docker/x", None).zone(), "");
    }

    #[test]
    fn a_load_balancer_targets_its_few_nodes_of_each_zone() {
        let nodes: Vec<super::NodeTarget> = (0..9)
            .map(|i| super::NodeTarget {
                name: format!("n{i}"),
                zone: Some(format!("z{}", i % 3)),
                ..Default::default()
            })
            .collect();
        let picked = super::target_nodes("lb-0", &nodes, Some(2));
        assert_eq!(picked.len(), 6);
        for z in ["z0", "z1", "z2"] {
            assert_eq!(picked.iter().filter(|n| n.zone() == z).count(), 2);
        }
        assert_eq!(super::target_nodes("lb-0", &nodes, None).len(), 9);
    }
}
