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

pub use sharedlb_placement::{PortMode, Protocol};

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
    #[error("{0}")]
    Other(String),
}

impl ProviderError {
    /// A CamelCase reason for conditions and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ProviderError::NotFound(_) => "CloudNotFound",
            ProviderError::AlreadyExists(_) => "CloudAlreadyExists",
            ProviderError::QuotaExceeded(_) => "CloudQuotaExceeded",
            ProviderError::Throttled { .. } => "CloudThrottled",
            ProviderError::InvalidConfig(_) => "CloudInvalidConfig",
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
}

/// A node that receives traffic on node ports.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct NodeTarget {
    pub name: String,
    /// `spec.providerID`, e.g. `aws:///us-east-1a/i-0123` or `gce://project/zone/name`.
    pub provider_id: Option<String>,
    pub internal_ip: Option<String>,
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

    /// Everything this provider owns for its cluster and pool.
    async fn inventory(&self) -> Result<Inventory, ProviderError>;

    /// True when listeners forward to the Service's endpoints (`ListenerSpec::backends`) rather than to the
    /// nodes' node port: the operator then reads EndpointSlices and re-ensures listeners when they change.
    fn forwards_to_endpoints(&self) -> bool {
        false
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

#[cfg(test)]
mod tests {
    /// Existing clouds hold names made with this prefix: it must never change for a given cluster and pool.
    #[test]
    fn the_cloud_name_prefix_is_stable() {
        assert_eq!(super::cloud_name_prefix("c1", "web"), "slb-a47c3254-");
    }
}
