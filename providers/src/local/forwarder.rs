//! The listeners one process serves, across its local pools: one per (address, port, protocol).
//!
//! Two drivers share it. The leader's `LocalProvider`s ensure and remove listeners as they program SharedLBs;
//! a replica that does not lead converges it to what the SharedLBs' statuses describe (`sync`), so traffic does
//! not wait for the lease. When that replica starts leading, its providers find the listeners bound and take
//! them over in place: established connections go on.
//!
//! Sockets are bound with SO_REUSEPORT, so the replicas on one machine (or a forwarder beside them) serve the same
//! address together and the kernel spreads new connections over them; when one dies, its sockets leave the group
//! and the others take every new connection. And with IP_FREEBIND, so a replica binds an address its node does not
//! hold (yet): where the address moves to a node (keepalived, a BGP announcement), the listeners are already there.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::info;

use super::budget::{Budget, BudgetLimits, BudgetSnapshot};
use super::shared::{Shared, Tuning};
use super::{health, tcp, udp};
use crate::{ListenerSpec, ListenerStatsRow, Owner, Protocol, ProviderError};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// A listener, as the inventory reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundListener {
    pub address: SocketAddr,
    pub protocol: Protocol,
    pub owner_uid: String,
    pub node_port: u16,
}

/// A listener a replica should serve: where, for which pool, and what it forwards.
#[derive(Debug, Clone, PartialEq)]
pub struct WantedListener {
    pub pool: String,
    pub ip: IpAddr,
    pub tuning: Tuning,
    pub spec: ListenerSpec,
}

struct Running {
    pool: String,
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

type Key = (SocketAddr, Protocol);

pub struct Forwarder {
    listeners: Mutex<BTreeMap<Key, Running>>,
    /// What all its listeners may hold together.
    budget: Arc<Budget>,
    /// Told the owner of a listener whose endpoints' health changed (`watch_health`).
    health_changes: HealthChanges,
}

/// Where the health checks announce a change: the owner whose listener it was.
type HealthChanges = Arc<std::sync::Mutex<Option<UnboundedSender<Owner>>>>;

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    /// With the default budget.
    pub fn new() -> Arc<Self> {
        Self::with_budget(BudgetLimits::default())
    }

    pub fn with_budget(limits: BudgetLimits) -> Arc<Self> {
        Arc::new(Forwarder {
            listeners: Mutex::new(BTreeMap::new()),
            budget: Budget::new(limits),
            health_changes: HealthChanges::default(),
        })
    }

    /// From now on, the owner of each listener whose endpoints' health changes (replacing an earlier watcher).
    pub fn watch_health(&self) -> UnboundedReceiver<Owner> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self
            .health_changes
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(tx);
        rx
    }

    /// The endpoints of the listener on `address` that pass their health checks, and all of them.
    pub async fn health(&self, address: SocketAddr, protocol: Protocol) -> Option<(usize, usize)> {
        let all = self.listeners.lock().await;
        all.get(&(address, protocol))
            .map(|r| r.shared.upstreams.health())
    }

    /// The budget in use and what it refused.
    pub fn budget(&self) -> (BudgetLimits, BudgetSnapshot) {
        (self.budget.limits(), self.budget.snapshot())
    }

    /// Serves `l` on `ip`: updated in place when its owner already serves it there (established connections
    /// keep flowing), bound afresh otherwise (another owner's stale listener is closed first).
    pub async fn ensure(
        &self,
        pool: &str,
        ip: IpAddr,
        l: &ListenerSpec,
        tuning: Tuning,
    ) -> Result<(), ProviderError> {
        let mut all = self.listeners.lock().await;
        let key = (SocketAddr::new(ip, l.port), l.protocol);
        if let Some(r) = all.get_mut(&key).filter(|r| r.owner_uid == l.owner.uid) {
            r.shared.update(l);
            r.node_port = l.node_port;
            return Ok(());
        }
        if let Some(other) = all.get(&key).filter(|r| r.pool != pool) {
            // two pools list one address: SO_REUSEPORT would let both bind, so the clash is refused here
            return Err(ProviderError::AlreadyExists(format!(
                "local: {}/{} is served for pool {:?}; pools must not share an address",
                key.0,
                l.protocol.as_str(),
                other.pool
            )));
        }
        if let Some(old) = all.remove(&key) {
            old.stop().await;
        }
        let shared = Shared::new(tuning, self.budget.clone(), l.protocol == Protocol::Udp);
        shared.update(l);
        let (changes, owner) = (self.health_changes.clone(), l.owner.clone());
        let announce = move || {
            let tx = changes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = tx.as_ref() {
                let _ = tx.send(owner.clone());
            }
        };
        let task = bind(key.0, l.protocol, shared.clone(), announce)?;
        info!(pool, address = %key.0, protocol = l.protocol.as_str(), "listening");
        all.insert(
            key,
            Running {
                pool: pool.to_string(),
                owner_uid: l.owner.uid.clone(),
                node_port: l.node_port,
                shared,
                task: Some(task),
            },
        );
        Ok(())
    }

    /// Closes the listener on `address` if `owner_uid` owns it.
    pub async fn remove(&self, address: SocketAddr, protocol: Protocol, owner_uid: &str) {
        let mut all = self.listeners.lock().await;
        let owned = all
            .get(&(address, protocol))
            .is_some_and(|r| r.owner_uid == owner_uid);
        if owned && let Some(r) = all.remove(&(address, protocol)) {
            r.stop().await;
        }
    }

    /// Closes every listener of `pool` on `ip`.
    pub async fn remove_all_on(&self, pool: &str, ip: IpAddr) {
        let mut all = self.listeners.lock().await;
        let keys: Vec<Key> = all
            .iter()
            .filter(|((a, _), r)| a.ip() == ip && r.pool == pool)
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(r) = all.remove(&k) {
                r.stop().await;
            }
        }
    }

    /// The listeners of `pool` on `ip`.
    pub async fn on(&self, pool: &str, ip: IpAddr) -> Vec<BoundListener> {
        let all = self.listeners.lock().await;
        all.iter()
            .filter(|((a, _), r)| a.ip() == ip && r.pool == pool)
            .map(|((address, protocol), r)| BoundListener {
                address: *address,
                protocol: *protocol,
                owner_uid: r.owner_uid.clone(),
                node_port: r.node_port,
            })
            .collect()
    }

    /// Every listener's counters, with its pool.
    pub async fn stats(&self) -> Vec<(String, ListenerStatsRow)> {
        let all = self.listeners.lock().await;
        all.iter()
            .map(|((address, protocol), r)| {
                let row = ListenerStatsRow {
                    address: *address,
                    protocol: *protocol,
                    stats: r.shared.stats.snapshot(),
                };
                (r.pool.clone(), row)
            })
            .collect()
    }

    /// Serves exactly `wanted`: each is ensured, every other listener closed. What could not be bound is
    /// returned with why; the rest is served regardless.
    pub async fn sync(&self, wanted: &[WantedListener]) -> Vec<(SocketAddr, ProviderError)> {
        let keep: std::collections::BTreeSet<Key> = wanted
            .iter()
            .map(|w| (SocketAddr::new(w.ip, w.spec.port), w.spec.protocol))
            .collect();
        let stale: Vec<Key> = {
            let all = self.listeners.lock().await;
            all.keys().filter(|k| !keep.contains(k)).copied().collect()
        };
        for (address, protocol) in stale {
            let removed = self.listeners.lock().await.remove(&(address, protocol));
            if let Some(r) = removed {
                r.stop().await;
            }
        }
        let mut failed = Vec::new();
        for w in wanted {
            if let Err(e) = self.ensure(&w.pool, w.ip, &w.spec, w.tuning).await {
                failed.push((SocketAddr::new(w.ip, w.spec.port), e));
            }
        }
        failed
    }
}

/// Binds `address` with SO_REUSEPORT and IP_FREEBIND (see the module's comment) and starts serving it.
fn bind(
    address: SocketAddr,
    protocol: Protocol,
    shared: Arc<Shared>,
    health_changed: impl Fn() + Send + 'static,
) -> Result<JoinHandle<()>, ProviderError> {
    let in_use = |e: std::io::Error| {
        ProviderError::AlreadyExists(format!(
            "local: cannot listen on {address}/{}: {e} (another process holds the port?)",
            protocol.as_str()
        ))
    };
    let kind = match protocol {
        Protocol::Tcp => Type::STREAM,
        Protocol::Udp => Type::DGRAM,
    };
    let socket = Socket::new(Domain::for_address(address), kind, None).map_err(in_use)?;
    socket.set_reuse_address(true).map_err(in_use)?;
    socket.set_reuse_port(true).map_err(in_use)?;
    // best effort: without it (IPv6 before Linux 4.15) an address must be on this machine to be bound
    let _ = match address {
        SocketAddr::V4(_) => socket.set_freebind_v4(true),
        SocketAddr::V6(_) => socket.set_freebind_v6(true),
    };
    socket.set_nonblocking(true).map_err(in_use)?;
    socket.bind(&address.into()).map_err(in_use)?;
    // serving and checking end together: aborting the task stops both
    let checks = health::check(shared.clone(), health_changed);
    Ok(match protocol {
        Protocol::Tcp => {
            socket.listen(1024).map_err(in_use)?;
            let listener = TcpListener::from_std(socket.into()).map_err(in_use)?;
            tokio::spawn(async move {
                tokio::join!(tcp::serve(listener, shared), checks);
            })
        }
        Protocol::Udp => {
            let udp = UdpSocket::from_std(socket.into()).map_err(in_use)?;
            tokio::spawn(async move {
                tokio::join!(udp::serve(udp, shared), checks);
            })
        }
    })
}
