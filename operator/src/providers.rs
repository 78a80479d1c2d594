//! Which provider a pool gets. The built-in factory makes the always-built local and memory providers; each
//! cloud is added behind its cargo feature. Tests pass their own factory to share one `MemoryCloud` across operator restarts.

use std::sync::Arc;
use std::time::Duration;

use sharedlb_crds::{LoadBalancerPoolSpec, target_nodes_per_zone};
use sharedlb_providers::local::{BudgetLimits, Forwarder, LocalProvider, Tuning};
use sharedlb_providers::memory::{Faults, MemoryCloud, MemoryProvider, RateLimit};
use sharedlb_providers::{DEFAULT_TARGET_NODES_PER_ZONE, LoadBalancerProvider, ProviderError};

#[async_trait::async_trait]
pub trait ProviderFactory: Send + Sync + std::fmt::Debug {
    async fn make(
        &self,
        cluster_id: &str,
        pool: &str,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<Arc<dyn LoadBalancerProvider>, ProviderError>;

    /// Where this process's local pools keep their listeners, which a replica that does not lead serves from
    /// the SharedLBs' statuses (`forward::follow`). None: no local pools.
    fn forwarder(&self) -> Option<Arc<Forwarder>> {
        None
    }
}

/// The providers this binary was built with.
pub const BUILT_IN: &[&str] = &[
    "local",
    "memory",
    #[cfg(feature = "aws")]
    "aws",
    #[cfg(feature = "gcp")]
    "gcp",
    #[cfg(feature = "azure")]
    "azure",
];

/// How azure pools reach Azure.
#[cfg(feature = "azure")]
#[derive(Debug, Clone, Default)]
pub struct AzureAccess {
    /// ARM's endpoint (`SHAREDLB_AZURE_ENDPOINT`); default the public cloud's, `https://management.azure.com`.
    pub endpoint: Option<String>,
    /// PEM of a root CA to trust besides the system's (`SHAREDLB_AZURE_CA_FILE`): a private endpoint or proxy,
    /// or the tests' fake. Certificates are always verified.
    pub extra_ca_pem: Option<Vec<u8>>,
    /// `None`: what the pod has (workload identity, `AZURE_CLIENT_SECRET`, managed identity).
    pub auth: Option<sharedlb_providers::azure::AzureAuth>,
}

#[cfg(feature = "azure")]
impl AzureAccess {
    /// From `SHAREDLB_AZURE_ENDPOINT` and `SHAREDLB_AZURE_CA_FILE`.
    pub fn from_env() -> std::io::Result<Self> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        Ok(AzureAccess {
            endpoint: var("SHAREDLB_AZURE_ENDPOINT"),
            extra_ca_pem: var("SHAREDLB_AZURE_CA_FILE")
                .map(std::fs::read)
                .transpose()?,
            auth: None,
        })
    }
}

/// A local pool's forwarder settings.
pub fn local_tuning(l: &sharedlb_crds::LocalSettings) -> Tuning {
    let defaults = Tuning::default();
    Tuning {
        idle_timeout: l
            .idle_timeout_seconds
            .map_or(defaults.idle_timeout, |s| Duration::from_secs(s.into())),
        max_connections: l
            .max_connections_per_listener
            .map_or(defaults.max_connections, |m| m as usize),
        ..defaults
    }
}

/// The providers built into this binary.
#[derive(Debug, Clone)]
pub struct BuiltinProviders {
    memory: Arc<MemoryCloud>,
    /// The listeners of every local pool of this process, shared with standby forwarding (`forward`).
    forwarder: Arc<Forwarder>,
    /// Another Compute Engine endpoint than Google's (`SHAREDLB_GCP_ENDPOINT`; the tests' fake).
    gcp_endpoint: Option<String>,
    #[cfg(feature = "azure")]
    azure: AzureAccess,
}

impl BuiltinProviders {
    /// `memory` is the account every memory pool shares.
    pub fn new(memory: Arc<MemoryCloud>) -> Self {
        BuiltinProviders {
            memory,
            forwarder: Forwarder::new(),
            gcp_endpoint: None,
            #[cfg(feature = "azure")]
            azure: AzureAccess::default(),
        }
    }

    /// The budget every local pool's listeners share in this process (the forwarder is made anew: call this
    /// before any provider is made).
    pub fn with_forward_budget(mut self, limits: BudgetLimits) -> Self {
        self.forwarder = Forwarder::with_budget(limits);
        self
    }

    /// Sends gcp pools' Compute Engine calls to `endpoint` (a fake, in tests). Only a loopback endpoint is
    /// called without credentials.
    pub fn with_gcp_endpoint(mut self, endpoint: Option<String>) -> Self {
        self.gcp_endpoint = endpoint;
        self
    }

    /// How azure pools reach Azure (another endpoint, an extra CA, explicit credentials).
    #[cfg(feature = "azure")]
    pub fn with_azure(mut self, access: AzureAccess) -> Self {
        self.azure = access;
        self
    }
}

impl Default for BuiltinProviders {
    fn default() -> Self {
        Self::new(MemoryCloud::new())
    }
}

#[async_trait::async_trait]
impl ProviderFactory for BuiltinProviders {
    fn forwarder(&self) -> Option<Arc<Forwarder>> {
        Some(self.forwarder.clone())
    }

    async fn make(
        &self,
        cluster_id: &str,
        pool: &str,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<Arc<dyn LoadBalancerProvider>, ProviderError> {
        if let Some(m) = &spec.provider.memory {
            let faults = Faults {
                latency: Duration::from_millis(u64::from(m.latency_ms.unwrap_or(0))),
                provisioning: Duration::from_millis(u64::from(m.provisioning_ms.unwrap_or(0))),
                error_per_mille: m.error_per_mille.unwrap_or(0),
                throttle_per_mille: m.throttle_per_mille.unwrap_or(0),
                load_balancer_quota: m.load_balancer_quota,
                rate_limit: m.calls_per_second.map(|per_second| RateLimit {
                    per_second,
                    burst: m.burst.unwrap_or(per_second),
                }),
            };
            let per_zone =
                target_nodes_per_zone(m.target_nodes_per_zone, DEFAULT_TARGET_NODES_PER_ZONE);
            return Ok(Arc::new(
                MemoryProvider::new(self.memory.clone(), cluster_id, pool, faults)
                    .with_target_nodes_per_zone(per_zone),
            ));
        }
        if let Some(l) = &spec.provider.local {
            let forwarder = self.forwarder.clone();
            let provider = LocalProvider::new(pool, &l.addresses, local_tuning(l), forwarder)?;
            return Ok(Arc::new(provider));
        }
        #[cfg(feature = "aws")]
        if let Some(a) = &spec.provider.aws {
            let settings = sharedlb_providers::aws::AwsPool {
                region: a.region.clone(),
                vpc_id: a.vpc_id.clone().unwrap_or_default(),
                subnet_ids: a.subnet_ids.clone(),
                node_security_group_id: a.node_security_group_id.clone(),
                internal: a.scheme.as_deref() == Some("internal"),
                eip_allocation_ids: a.eip_allocation_ids.clone(),
                security_group_rule_limit: a.security_group_rule_limit,
                target_nodes_per_zone: target_nodes_per_zone(
                    a.target_nodes_per_zone,
                    DEFAULT_TARGET_NODES_PER_ZONE,
                ),
                pod_targets: a.targets == Some(sharedlb_crds::Targets::Pods),
            };
            let p = sharedlb_providers::aws::AwsProvider::new(cluster_id, pool, settings).await?;
            return Ok(Arc::new(p));
        }
        #[cfg(feature = "gcp")]
        if let Some(g) = &spec.provider.gcp {
            // SHAREDLB_GCP_ENDPOINT points the client elsewhere (the tests' fake); only a loopback endpoint
            // goes without credentials, so Google's API is always called with real ones
            let endpoint = self.gcp_endpoint.clone();
            let anonymous = endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://127.0.0.1:"));
            let settings = sharedlb_providers::gcp::GcpPool {
                project: g.project.clone(),
                region: g.region.clone(),
                network: g.network.clone().unwrap_or_default(),
                node_tag: g.node_tag.clone().unwrap_or_default(),
                endpoint,
                anonymous,
                poll_delay: anonymous.then(|| Duration::from_millis(20)),
                target_nodes_per_zone: target_nodes_per_zone(
                    g.target_nodes_per_zone,
                    DEFAULT_TARGET_NODES_PER_ZONE,
                ),
            };
            let p = sharedlb_providers::gcp::GcpProvider::new(cluster_id, pool, settings).await?;
            return Ok(Arc::new(p));
        }
        #[cfg(feature = "azure")]
        if let Some(a) = &spec.provider.azure {
            use sharedlb_providers::azure::{
                AzureAuth, AzurePool, AzureProvider, credential, transport_trusting,
            };
            let transport = self
                .azure
                .extra_ca_pem
                .as_deref()
                .map(transport_trusting)
                .transpose()?;
            let auth = self.azure.auth.clone().unwrap_or(AzureAuth::Environment);
            let loopback = self
                .azure
                .endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("https://127.0.0.1:"));
            let settings = AzurePool {
                subscription_id: a.subscription_id.clone(),
                resource_group: a.resource_group.clone(),
                location: a.location.clone(),
                load_balancer_name: a.load_balancer_name.clone(),
                network_security_group: a.network_security_group.clone(),
                network_security_group_resource_group: a
                    .network_security_group_resource_group
                    .clone(),
                virtual_network: a.virtual_network.clone(),
                node_groups: a.node_groups.unwrap_or(1),
                pod_targets: a.targets == Some(sharedlb_crds::Targets::Pods),
                target_nodes_per_zone: target_nodes_per_zone(
                    a.target_nodes_per_zone,
                    DEFAULT_TARGET_NODES_PER_ZONE,
                ),
                endpoint: self.azure.endpoint.clone(),
                credential: credential(&auth, transport.clone())?,
                transport,
                batch_window: Duration::from_millis(100),
                // ARM asks for ~10 s between polls; the loopback fake for none
                min_poll: if loopback {
                    Duration::from_millis(10)
                } else {
                    Duration::from_secs(1)
                },
            };
            return Ok(Arc::new(
                AzureProvider::new(cluster_id, pool, settings).await?,
            ));
        }
        let kind = spec.provider.kind().unwrap_or("none");
        Err(ProviderError::InvalidConfig(format!(
            "provider {kind:?} is not available in this build of sharedlb (built in: {})",
            BUILT_IN.join(", ")
        )))
    }
}
