//! The local provider: the operator itself is the load balancer, as a bare-metal cluster or a laptop wants.
//! Load balancer `i` of a pool is the pool's address `i` (on a laptop 127.0.0.10, 127.0.0.11, …: all of 127/8
//! is loopback); each listener binds (address, port) for TCP or UDP in this process and forwards to the
//! Service's ready endpoints, which the operator reads from EndpointSlices and passes in `ListenerSpec::backends`.
//!
//! Its state lives in the process: after a restart the inventory is empty and the operator, rebuilding from the
//! SharedLB statuses, binds every allocated listener again.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::{
    Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec, ListenerStatsRow,
    LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, PortMode, Protocol, ProviderError,
};

mod budget;
mod forwarder;
mod health;
mod shared;
mod tcp;
mod udp;

pub use budget::{BudgetLimits, BudgetSnapshot};
pub use forwarder::{BoundListener, Forwarder, WantedListener};
pub use shared::{StatsSnapshot, Tuning};

/// Listeners per address: a port space holds 65,535; this keeps one process's sockets reasonable.
pub const MAX_LISTENERS_PER_ADDRESS: u32 = 4096;

pub struct LocalProvider {
    pool: String,
    addresses: Vec<IpAddr>,
    tuning: Tuning,
    /// The load balancers made (ensured and not deleted); the listeners live in the process's `Forwarder`.
    made: Mutex<BTreeSet<u32>>,
    forwarder: Arc<Forwarder>,
}

impl std::fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalProvider")
            .field("pool", &self.pool)
            .field("addresses", &self.addresses)
            .finish()
    }
}

impl LocalProvider {
    /// `addresses` are this machine's (or, bound with IP_FREEBIND, ones it may come to hold); each is one load
    /// balancer of the pool. The listeners live in `forwarder`, which every local pool of the process shares.
    pub fn new(
        pool: &str,
        addresses: &[String],
        tuning: Tuning,
        forwarder: Arc<Forwarder>,
    ) -> Result<Self, ProviderError> {
        let addresses = addresses
            .iter()
            .map(|a| {
                a.parse::<IpAddr>().map_err(|_| {
                    ProviderError::InvalidConfig(format!("local: {a:?} is not an IP address"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addresses.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "local: the pool lists no addresses".into(),
            ));
        }
        Ok(LocalProvider {
            pool: pool.to_string(),
            addresses,
            tuning,
            made: Mutex::new(BTreeSet::new()),
            forwarder,
        })
    }

    fn address(&self, lb: &LoadBalancerKey) -> Result<IpAddr, ProviderError> {
        self.addresses
            .get(lb.index as usize)
            .copied()
            .ok_or_else(|| {
                ProviderError::QuotaExceeded(format!(
                    "local: pool {} has {} addresses; load balancer {} has none",
                    self.pool,
                    self.addresses.len(),
                    lb.index
                ))
            })
    }

    fn info(ip: IpAddr) -> LoadBalancerInfo {
        LoadBalancerInfo {
            id: format!("local:{ip}"),
            ip: Some(ip.to_string()),
            hostname: None,
        }
    }

    /// Counters of every listener, for metrics and tests.
    pub async fn stats(&self) -> Vec<ListenerStatsRow> {
        self.listener_stats().await
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn limits(&self) -> Limits {
        Limits {
            max_ports_per_lb: MAX_LISTENERS_PER_ADDRESS,
            max_lbs: Some(self.addresses.len() as u32),
            max_ports_total: None,
            port_mode: PortMode::PerLoadBalancer,
            lb_groups: None,
        }
    }

    fn forwards_to_endpoints(&self) -> bool {
        true
    }

    fn supports_proxy_protocol(&self) -> bool {
        true
    }

    async fn endpoint_health(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
    ) -> Option<(usize, usize)> {
        let ip = self.address(lb).ok()?;
        self.forwarder
            .health(std::net::SocketAddr::new(ip, port), protocol)
            .await
    }

    fn needs_node_ports(&self) -> bool {
        false
    }

    async fn listener_stats(&self) -> Vec<ListenerStatsRow> {
        let rows = self.forwarder.stats().await;
        rows.into_iter()
            .filter(|(pool, _)| *pool == self.pool)
            .map(|(_, row)| row)
            .collect()
    }

    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        let ip = self.address(lb)?;
        self.made.lock().await.insert(lb.index);
        Ok(Self::info(ip))
    }

    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        if !self.made.lock().await.contains(&lb.index) {
            return Err(ProviderError::NotFound(format!("local: {}", lb.name())));
        }
        let ip = self.address(lb)?;
        self.forwarder.ensure(&self.pool, ip, l, self.tuning).await
    }

    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        if let Ok(ip) = self.address(lb) {
            let address = std::net::SocketAddr::new(ip, port);
            self.forwarder.remove(address, protocol, owner_uid).await;
        }
        Ok(())
    }

    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        self.made.lock().await.remove(&lb.index);
        if let Ok(ip) = self.address(lb) {
            self.forwarder.remove_all_on(&self.pool, ip).await;
        }
        Ok(())
    }

    /// The load balancers made, and those whose address carries listeners (bound while this replica stood by,
    /// before it led: they are the pool's and are taken over).
    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let made = self.made.lock().await.clone();
        let mut load_balancers = Vec::new();
        for (index, ip) in self.addresses.iter().enumerate() {
            let index = index as u32;
            let listeners: Vec<InventoryListener> = self
                .forwarder
                .on(&self.pool, *ip)
                .await
                .into_iter()
                .map(|b| InventoryListener {
                    port: b.address.port(),
                    protocol: b.protocol,
                    node_port: b.node_port,
                    owner_uid: b.owner_uid,
                    serving: true,
                })
                .collect();
            if made.contains(&index) || !listeners.is_empty() {
                load_balancers.push(InventoryLoadBalancer {
                    index,
                    info: Self::info(*ip),
                    listeners,
                });
            }
        }
        Ok(Inventory { load_balancers })
    }
}
