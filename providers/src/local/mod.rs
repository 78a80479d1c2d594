//! The local provider: the operator itself is the load balancer, as a bare-metal cluster or a laptop wants.
//! Load balancer `i` of a pool is the pool's address `i` (on a laptop 127.0.0.10, 127.0.0.11, …: all of 127/8
//! is loopback); each listener binds (address, port) for TCP or UDP in this process and forwards to the
//! Service's ready endpoints, which the operator reads from EndpointSlices and passes in `ListenerSpec::backends`.
//!
//! Its state lives in the process: after a restart the inventory is empty and the operator, rebuilding from the
//! SharedLB statuses, binds every allocated listener again.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::info;

use crate::{
    Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec, ListenerStatsRow,
    LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, PortMode, Protocol, ProviderError,
};

mod shared;
mod tcp;
mod udp;

use shared::Shared;
pub use shared::{StatsSnapshot, Tuning};

/// Listeners per address: a port space holds 65,535; this keeps one process's sockets reasonable.
pub const MAX_LISTENERS_PER_ADDRESS: u32 = 4096;

struct Running {
    owner_uid: String,
    node_port: u16,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// Closes the socket and every connection on it, and returns only once they are closed, so that a connect
    /// right after is refused rather than queued and reset.
    async fn stop(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

struct LocalLb {
    ip: IpAddr,
    listeners: BTreeMap<(u16, Protocol), Running>,
}

pub struct LocalProvider {
    pool: String,
    addresses: Vec<IpAddr>,
    tuning: Tuning,
    lbs: Mutex<BTreeMap<u32, LocalLb>>,
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
    /// `addresses` must be addresses of this machine; each is one load balancer of the pool.
    pub fn new(pool: &str, addresses: &[String], tuning: Tuning) -> Result<Self, ProviderError> {
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
            lbs: Mutex::new(BTreeMap::new()),
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

impl LocalProvider {
    async fn collect_stats(&self) -> Vec<ListenerStatsRow> {
        let lbs = self.lbs.lock().await;
        lbs.values()
            .flat_map(|lb| {
                lb.listeners
                    .iter()
                    .map(move |((port, protocol), r)| ListenerStatsRow {
                        address: SocketAddr::new(lb.ip, *port),
                        protocol: *protocol,
                        stats: r.shared.stats.snapshot(),
                    })
            })
            .collect()
    }

    async fn bind(
        &self,
        ip: IpAddr,
        l: &ListenerSpec,
        shared: Arc<Shared>,
    ) -> Result<JoinHandle<()>, ProviderError> {
        let addr = SocketAddr::new(ip, l.port);
        let in_use = |e: std::io::Error| {
            ProviderError::AlreadyExists(format!(
                "local: cannot listen on {addr}/{}: {e} (another process holds the port?)",
                l.protocol.as_str()
            ))
        };
        Ok(match l.protocol {
            Protocol::Tcp => {
                let listener = TcpListener::bind(addr).await.map_err(in_use)?;
                tokio::spawn(tcp::serve(listener, shared))
            }
            Protocol::Udp => {
                let socket = UdpSocket::bind(addr).await.map_err(in_use)?;
                tokio::spawn(udp::serve(socket, shared))
            }
        })
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

    fn needs_node_ports(&self) -> bool {
        false
    }

    async fn listener_stats(&self) -> Vec<ListenerStatsRow> {
        self.collect_stats().await
    }

    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        let ip = self.address(lb)?;
        let mut lbs = self.lbs.lock().await;
        lbs.entry(lb.index).or_insert_with(|| LocalLb {
            ip,
            listeners: BTreeMap::new(),
        });
        Ok(Self::info(ip))
    }

    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        let mut lbs = self.lbs.lock().await;
        let entry = lbs
            .get_mut(&lb.index)
            .ok_or_else(|| ProviderError::NotFound(format!("local: {}", lb.name())))?;
        let key = (l.port, l.protocol);
        if let Some(r) = entry
            .listeners
            .get_mut(&key)
            .filter(|r| r.owner_uid == l.owner.uid)
        {
            // in place: established connections keep flowing
            r.shared.upstreams.set(l.backends.clone());
            r.shared.filter.set(&l.source_ranges);
            r.node_port = l.node_port;
            return Ok(());
        }
        if let Some(old) = entry.listeners.remove(&key) {
            // another owner's stale listener: close it before binding the port again
            old.stop().await;
        }
        let shared = Shared::new(self.tuning);
        shared.upstreams.set(l.backends.clone());
        shared.filter.set(&l.source_ranges);
        let ip = entry.ip;
        let task = self.bind(ip, l, shared.clone()).await?;
        info!(pool = %self.pool, address = %SocketAddr::new(ip, l.port), protocol = l.protocol.as_str(), "listening");
        entry.listeners.insert(
            key,
            Running {
                owner_uid: l.owner.uid.clone(),
                node_port: l.node_port,
                shared,
                task: Some(task),
            },
        );
        Ok(())
    }

    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        let mut lbs = self.lbs.lock().await;
        if let Some(entry) = lbs.get_mut(&lb.index)
            && entry
                .listeners
                .get(&(port, protocol))
                .is_some_and(|r| r.owner_uid == owner_uid)
            && let Some(r) = entry.listeners.remove(&(port, protocol))
        {
            r.stop().await;
        }
        Ok(())
    }

    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        let removed = self.lbs.lock().await.remove(&lb.index);
        for (_, r) in removed.map(|lb| lb.listeners).unwrap_or_default() {
            r.stop().await;
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let lbs = self.lbs.lock().await;
        Ok(Inventory {
            load_balancers: lbs
                .iter()
                .map(|(index, lb)| InventoryLoadBalancer {
                    index: *index,
                    info: Self::info(lb.ip),
                    listeners: lb
                        .listeners
                        .iter()
                        .map(|((port, protocol), r)| InventoryListener {
                            port: *port,
                            protocol: *protocol,
                            node_port: r.node_port,
                            owner_uid: r.owner_uid.clone(),
                            serving: true,
                        })
                        .collect(),
                })
                .collect(),
        })
    }
}
