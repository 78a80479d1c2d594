//! Which provider a pool gets. The built-in factory makes the always-built local and memory providers; each
//! cloud is added behind its cargo feature. Tests pass their own factory to share one `MemoryCloud` across operator restarts.

use std::sync::Arc;
use std::time::Duration;

use sharedlb_crds::LoadBalancerPoolSpec;
use sharedlb_providers::local::{LocalProvider, Tuning};
use sharedlb_providers::memory::{Faults, MemoryCloud, MemoryProvider};
use sharedlb_providers::{LoadBalancerProvider, ProviderError};

#[async_trait::async_trait]
pub trait ProviderFactory: Send + Sync + std::fmt::Debug {
    async fn make(
        &self,
        cluster_id: &str,
        pool: &str,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<Arc<dyn LoadBalancerProvider>, ProviderError>;
}

/// The providers this binary was built with.
pub const BUILT_IN: &[&str] = &[
    "local",
    "memory",
    #[cfg(feature = "aws")]
    "aws",
];

/// The providers built into this binary.
#[derive(Debug, Clone)]
pub struct BuiltinProviders {
    memory: Arc<MemoryCloud>,
}

impl BuiltinProviders {
    /// `memory` is the account every memory pool shares.
    pub fn new(memory: Arc<MemoryCloud>) -> Self {
        BuiltinProviders { memory }
    }
}

impl Default for BuiltinProviders {
    fn default() -> Self {
        Self::new(MemoryCloud::new())
    }
}

#[async_trait::async_trait]
impl ProviderFactory for BuiltinProviders {
    async fn make(
        &self,
        cluster_id: &str,
        pool: &str,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<Arc<dyn LoadBalancerProvider>, ProviderError> {
        if let Some(m) = &spec.provider.memory {
            let faults = Faults {
                latency: Duration::from_millis(u64::from(m.latency_ms.unwrap_or(0))),
                error_per_mille: m.error_per_mille.unwrap_or(0),
                throttle_per_mille: m.throttle_per_mille.unwrap_or(0),
                load_balancer_quota: m.load_balancer_quota,
            };
            return Ok(Arc::new(MemoryProvider::new(
                self.memory.clone(),
                cluster_id,
                pool,
                faults,
            )));
        }
        if let Some(l) = &spec.provider.local {
            let defaults = Tuning::default();
            let tuning = Tuning {
                idle_timeout: l
                    .idle_timeout_seconds
                    .map_or(defaults.idle_timeout, |s| Duration::from_secs(s.into())),
                max_connections: l
                    .max_connections_per_listener
                    .map_or(defaults.max_connections, |m| m as usize),
                ..defaults
            };
            return Ok(Arc::new(LocalProvider::new(pool, &l.addresses, tuning)?));
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
            };
            let p = sharedlb_providers::aws::AwsProvider::new(cluster_id, pool, settings).await?;
            return Ok(Arc::new(p));
        }
        let kind = spec.provider.kind().unwrap_or("none");
        Err(ProviderError::InvalidConfig(format!(
            "provider {kind:?} is not available in this build of sharedlb (built in: {})",
            BUILT_IN.join(", ")
        )))
    }
}
