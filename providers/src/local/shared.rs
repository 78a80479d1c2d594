//! What a running listener shares with its connections: the upstreams (updated in place as endpoints change,
//! so established connections are never dropped for it), the source filter, limits and counters.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::Semaphore;

use super::budget::{Admission, Budget};

/// Ready endpoints, picked round-robin; `in_order` gives every endpoint once, starting at the next one, so a
/// caller can fail over to the following one when a connect fails.
#[derive(Debug, Default)]
pub struct Upstreams {
    addrs: RwLock<Vec<SocketAddr>>,
    /// Endpoints the health checks took out of the rotation.
    down: RwLock<BTreeSet<SocketAddr>>,
    next: AtomicUsize,
}

impl Upstreams {
    pub fn set(&self, mut addrs: Vec<SocketAddr>) {
        addrs.sort();
        addrs.dedup();
        *self.addrs.write().unwrap_or_else(|e| e.into_inner()) = addrs;
    }

    pub fn get(&self) -> Vec<SocketAddr> {
        self.addrs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn down(&self) -> BTreeSet<SocketAddr> {
        self.down.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_down(&self, down: BTreeSet<SocketAddr>) {
        *self.down.write().unwrap_or_else(|e| e.into_inner()) = down;
    }

    /// (healthy, all) endpoints.
    pub fn health(&self) -> (usize, usize) {
        let all = self.get();
        let down = self.down();
        (all.iter().filter(|a| !down.contains(a)).count(), all.len())
    }

    /// The endpoints in the rotation, starting at the next one. When every endpoint failed its checks, all of
    /// them (as a cloud's load balancer does): a connect may still succeed, and refusing outright cannot.
    pub fn in_order(&self) -> Vec<SocketAddr> {
        let everyone = self.get();
        let down = self.down();
        let healthy: Vec<SocketAddr> = everyone
            .iter()
            .filter(|a| !down.contains(a))
            .copied()
            .collect();
        let all = if healthy.is_empty() {
            everyone
        } else {
            healthy
        };
        if all.is_empty() {
            return all;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % all.len();
        all[start..].iter().chain(&all[..start]).copied().collect()
    }
}

/// `sourceRanges`, checked on accept (TCP) and on every datagram of a new session (UDP). Empty: open to all.
#[derive(Debug, Default)]
pub struct SourceFilter {
    nets: RwLock<Vec<IpNet>>,
}

impl SourceFilter {
    pub fn set(&self, ranges: &[String]) {
        let nets = ranges
            .iter()
            .filter_map(|r| r.parse::<IpNet>().ok())
            .map(|n| n.trunc())
            .collect();
        *self.nets.write().unwrap_or_else(|e| e.into_inner()) = nets;
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let nets = self.nets.read().unwrap_or_else(|e| e.into_inner());
        nets.is_empty() || nets.iter().any(|n| n.contains(&ip))
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub connections: AtomicU64,
    pub active: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub refused_by_source: AtomicU64,
    pub refused_over_limit: AtomicU64,
    /// Refused because the process's budget (connections, buffer bytes, UDP sessions per source) had no room.
    pub refused_over_budget: AtomicU64,
    pub upstream_failures: AtomicU64,
}

/// One listener's counters at a moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// TCP connections accepted, or UDP sessions opened.
    pub connections: u64,
    /// Open TCP connections, or live UDP sessions.
    pub active: u64,
    /// Client to backend.
    pub bytes_in: u64,
    /// Backend to client.
    pub bytes_out: u64,
    pub refused_by_source: u64,
    pub refused_over_limit: u64,
    pub refused_over_budget: u64,
    pub upstream_failures: u64,
}

impl ListenerStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: l(&self.connections),
            active: l(&self.active),
            bytes_in: l(&self.bytes_in),
            bytes_out: l(&self.bytes_out),
            refused_by_source: l(&self.refused_by_source),
            refused_over_limit: l(&self.refused_over_limit),
            refused_over_budget: l(&self.refused_over_budget),
            upstream_failures: l(&self.upstream_failures),
        }
    }
}

/// Decrements `active` when a connection or session ends, however it ends.
#[derive(Debug)]
pub struct ActiveGuard(pub Arc<Shared>);

impl ActiveGuard {
    pub fn new(shared: Arc<Shared>) -> Self {
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        shared.stats.active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(shared)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Timeouts and limits of the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// A TCP connection with no byte either way, or a UDP session with no datagram, for this long is closed.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Open TCP connections or UDP sessions per listener; more are refused.
    pub max_connections: usize,
    /// How often each endpoint is checked, and how long a check may take.
    pub health_interval: Duration,
    pub health_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(3),
            max_connections: 4096,
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Debug)]
pub struct Shared {
    pub upstreams: Upstreams,
    pub filter: SourceFilter,
    pub stats: ListenerStats,
    pub tuning: Tuning,
    pub limit: Arc<Semaphore>,
    /// Shared by every listener of the process.
    pub budget: Arc<Budget>,
    /// Each TCP connection starts with a PROXY protocol v2 header (set in place, like the upstreams).
    pub proxy_protocol: AtomicBool,
    /// The endpoints' port the health checks connect to; 0: each endpoint's own port.
    health_port: std::sync::atomic::AtomicU16,
    pub is_udp: bool,
    epoch: Instant,
}

impl Shared {
    pub fn new(tuning: Tuning, budget: Arc<Budget>, is_udp: bool) -> Arc<Self> {
        Arc::new(Shared {
            upstreams: Upstreams::default(),
            filter: SourceFilter::default(),
            stats: ListenerStats::default(),
            limit: Arc::new(Semaphore::new(tuning.max_connections)),
            tuning,
            budget,
            proxy_protocol: AtomicBool::new(false),
            health_port: std::sync::atomic::AtomicU16::new(0),
            is_udp,
            epoch: Instant::now(),
        })
    }

    /// What of a listener changes in place: established connections keep flowing.
    pub fn update(&self, l: &crate::ListenerSpec) {
        self.upstreams.set(l.backends.clone());
        self.filter.set(&l.source_ranges);
        self.proxy_protocol
            .store(l.proxy_protocol, Ordering::Relaxed);
        self.health_port
            .store(l.health_port.unwrap_or(0), Ordering::Relaxed);
    }

    pub fn health_port(&self) -> Option<u16> {
        Some(self.health_port.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Room for one more connection or session holding `buffer_bytes`, from the process's budget; a refusal is
    /// counted on this listener too.
    pub fn admit(&self, buffer_bytes: usize) -> Option<Admission> {
        let admitted = self.budget.admit(buffer_bytes);
        if admitted.is_none() {
            self.stats
                .refused_over_budget
                .fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// Milliseconds since the listener started: a cheap clock for "last activity" atomics.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}
