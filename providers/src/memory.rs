//! The memory provider: a cloud account in process memory. Always built; used by tests, benchmarks and the
//! quickstart. It hands out addresses from 198.51.100.0/24 (TEST-NET-2, never routed) and carries no traffic.
//! Faults can be injected — latency, server errors, throttling, a load-balancer quota — to prove the operator
//! survives a real cloud's behaviour.
//!
//! A `MemoryCloud` is the account, shared by every pool's `MemoryProvider`; a test that restarts the operator
//! keeps the same `MemoryCloud`, as a real cloud outlives the process that drives it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{
    ApiCalls, Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec,
    LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, NodeTarget, PortMode, Protocol,
    ProviderError, tags,
};

/// The memory provider's own hard limit on listeners per load balancer.
pub const MAX_LISTENERS_PER_LB: u32 = 1000;

/// Injected faults, per provider (that is, per pool).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub latency: Duration,
    /// Added to the making of a load balancer (a real NLB takes minutes to provision).
    pub provisioning: Duration,
    /// Mutating calls failing with a server error, per mille.
    pub error_per_mille: u32,
    /// Mutating calls throttled, per mille.
    pub throttle_per_mille: u32,
    /// Load balancers the account may hold in this pool.
    pub load_balancer_quota: Option<u32>,
    /// Mutating calls per second the account allows this pool, as a token bucket.
    pub rate_limit: Option<RateLimit>,
}

/// A cloud API's rate limit: `per_second` tokens a second, at most `burst` saved up; each mutating call takes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// The token bucket of a `RateLimit`. A throttled call takes no token, as a cloud's refused request costs none.
#[derive(Debug)]
struct Bucket {
    limit: RateLimit,
    tokens: f64,
    filled_at: std::time::Instant,
}

impl Bucket {
    fn new(limit: RateLimit) -> Self {
        Bucket {
            limit,
            tokens: f64::from(limit.burst.max(1)),
            filled_at: std::time::Instant::now(),
        }
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, now: std::time::Instant) -> Result<(), Duration> {
        let rate = f64::from(self.limit.per_second.max(1));
        let elapsed = now.saturating_duration_since(self.filled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(self.limit.burst.max(1)));
        self.filled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
    }
}

/// One stored listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryListener {
    pub node_port: u16,
    pub owner_uid: String,
    pub source_ranges: Vec<String>,
}

/// One stored load balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLoadBalancer {
    pub id: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub tags: BTreeMap<String, String>,
    pub listeners: BTreeMap<(u16, Protocol), MemoryListener>,
    /// The names of the nodes it targets (`target_nodes`).
    pub targets: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct Account {
    lbs: BTreeMap<String, MemoryLoadBalancer>,
    /// mutating calls by operation, counted when they change something or fail
    calls: BTreeMap<&'static str, u64>,
    /// The nodes each pool's provider last set, with how many updates it has made.
    nodes: BTreeMap<String, (Vec<NodeTarget>, u64)>,
    /// Owners whose listeners a test made unremovable.
    unremovable: BTreeSet<String>,
    /// Calls refused by a pool's rate limit.
    throttled: u64,
    /// Pools whose node updates a test made wait.
    stalled_node_updates: BTreeSet<String>,
    /// Load balancers' target sets changed, by pool (each a target registration call on a cloud).
    targets_set: BTreeMap<String, u64>,
    /// Mutating operations a test made fail, with how many more times.
    failing: BTreeMap<&'static str, u32>,
}

/// A cloud account in memory.
#[derive(Debug, Default)]
pub struct MemoryCloud {
    account: Mutex<Account>,
}

impl MemoryCloud {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, Account> {
        // a poisoned lock only means a test panicked mid-call; the data is still consistent per call
        self.account.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every load balancer in the account, by cloud name.
    pub fn load_balancers(&self) -> Vec<MemoryLoadBalancer> {
        self.lock().lbs.values().cloned().collect()
    }

    /// Mutating calls made so far, by operation.
    pub fn mutating_calls(&self) -> BTreeMap<&'static str, u64> {
        self.lock().calls.clone()
    }

    /// Calls refused by a pool's rate limit so far.
    pub fn throttled(&self) -> u64 {
        self.lock().throttled
    }

    /// The nodes this pool's providers last set through `update_nodes`, and how many updates they made: every
    /// successful call counts, changed or not, so a test sees both a provider made anew being sent the nodes and a
    /// quiet operator sending nothing.
    pub fn nodes(&self, pool: &str) -> (Vec<NodeTarget>, u64) {
        self.lock().nodes.get(pool).cloned().unwrap_or_default()
    }

    /// The names of the nodes the load balancer with this cloud name targets.
    pub fn targets(&self, lb: &str) -> BTreeSet<String> {
        self.lock()
            .lbs
            .get(lb)
            .map(|l| l.targets.clone())
            .unwrap_or_default()
    }

    /// For tests: puts a listener on the load balancer with this cloud name, as a crashed operator leaves one.
    pub fn plant_listener(&self, lb: &str, port: u16, protocol: Protocol, owner_uid: &str) {
        if let Some(l) = self.lock().lbs.get_mut(lb) {
            let planted = MemoryListener {
                node_port: 30999,
                owner_uid: owner_uid.to_string(),
                source_ranges: vec![],
            };
            l.listeners.insert((port, protocol), planted);
        }
    }

    /// For tests: removes a listener from the load balancer with this cloud name, as someone with console access
    /// would, behind the operator's back.
    pub fn drop_listener(&self, lb: &str, port: u16, protocol: Protocol) {
        if let Some(l) = self.lock().lbs.get_mut(lb) {
            l.listeners.remove(&(port, protocol));
        }
    }

    /// For tests: the load balancer with this cloud name now has another address, as a cloud's re-created or
    /// re-addressed load balancer does.
    pub fn set_address(&self, lb: &str, ip: Ipv4Addr) {
        if let Some(l) = self.lock().lbs.get_mut(lb) {
            l.ip = ip;
        }
    }

    /// For tests: the next `times` calls of the mutating operation `op` (`delete_listener`, `put_listener`, ...)
    /// fail with a server error, in whichever pool they come from.
    pub fn fail_next(&self, op: &'static str, times: u32) {
        self.lock().failing.insert(op, times);
    }

    /// For tests: this pool's `update_nodes` calls wait, as calls to a cloud that stopped answering do, until
    /// released.
    pub fn stall_node_updates(&self, pool: &str, stall: bool) {
        let mut acc = self.lock();
        if stall {
            acc.stalled_node_updates.insert(pool.to_string());
        } else {
            acc.stalled_node_updates.remove(pool);
        }
    }

    /// For tests: the listeners of this owner cannot be removed (a cloud that keeps refusing) until allowed again.
    pub fn refuse_removal(&self, owner_uid: &str, refuse: bool) {
        let mut acc = self.lock();
        if refuse {
            acc.unremovable.insert(owner_uid.to_string());
        } else {
            acc.unremovable.remove(owner_uid);
        }
    }
}

/// One pool's view of a `MemoryCloud`.
#[derive(Debug)]
pub struct MemoryProvider {
    cloud: Arc<MemoryCloud>,
    cluster_id: String,
    pool: String,
    faults: Faults,
    rng: Mutex<fastrand::Rng>,
    bucket: Option<Mutex<Bucket>>,
    /// Nodes per zone each load balancer targets; `None`: all.
    per_zone: Option<u32>,
}

impl MemoryProvider {
    pub fn new(cloud: Arc<MemoryCloud>, cluster_id: &str, pool: &str, faults: Faults) -> Self {
        // seeded from the pool name so that a fault pattern repeats from run to run
        let seed = pool.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        MemoryProvider {
            cloud,
            cluster_id: cluster_id.to_string(),
            pool: pool.to_string(),
            bucket: faults.rate_limit.map(|l| Mutex::new(Bucket::new(l))),
            faults,
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            per_zone: None,
        }
    }

    /// Each load balancer targets `per_zone` nodes of each zone (`None`: every node), as the clouds' providers do.
    pub fn with_target_nodes_per_zone(mut self, per_zone: Option<u32>) -> Self {
        self.per_zone = per_zone;
        self
    }

    /// The names of the nodes load balancer `name` targets, of the pool's nodes as last set.
    fn targets_of(&self, acc: &Account, name: &str) -> BTreeSet<String> {
        let nodes = acc.nodes.get(&self.pool).map(|(n, _)| n.as_slice());
        crate::target_nodes(name, nodes.unwrap_or_default(), self.per_zone)
            .into_iter()
            .map(|n| n.name.clone())
            .collect()
    }

    fn cloud_name(&self, lb: &LoadBalancerKey) -> String {
        format!("slb-{}-{}-{}", lb.cluster_id, lb.pool, lb.index)
    }

    fn ours(&self, l: &MemoryLoadBalancer) -> bool {
        l.tags.get(tags::CLUSTER) == Some(&self.cluster_id)
            && l.tags.get(tags::POOL) == Some(&self.pool)
    }

    /// Latency, then the injected faults for a mutating call.
    async fn call(&self, op: &'static str) -> Result<(), ProviderError> {
        if !self.faults.latency.is_zero() {
            tokio::time::sleep(self.faults.latency).await;
        }
        if let Some(bucket) = &self.bucket {
            let taken = bucket
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(std::time::Instant::now());
            if let Err(wait) = taken {
                self.cloud.lock().throttled += 1;
                return Err(ProviderError::Throttled {
                    retry_after: wait,
                    message: format!("memory: {op} throttled: the rate limit is exceeded"),
                });
            }
        }
        let roll = self
            .rng
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .u32(0..1000);
        let fail = if roll < self.faults.throttle_per_mille {
            Some(ProviderError::Throttled {
                retry_after: Duration::from_millis(200),
                message: format!("memory: {op} throttled (injected)"),
            })
        } else if roll < self.faults.throttle_per_mille + self.faults.error_per_mille {
            Some(ProviderError::Other(format!(
                "memory: {op} failed with an injected server error"
            )))
        } else {
            None
        };
        let fail = fail.or_else(|| {
            let mut acc = self.cloud.lock();
            let left = acc.failing.get_mut(op).filter(|n| **n > 0)?;
            *left -= 1;
            Some(ProviderError::Other(format!(
                "memory: {op} failed (made to fail by the test)"
            )))
        });
        if let Some(e) = fail {
            *self.cloud.lock().calls.entry(op).or_default() += 1;
            return Err(e);
        }
        Ok(())
    }

    fn info(l: &MemoryLoadBalancer) -> LoadBalancerInfo {
        LoadBalancerInfo {
            id: l.id.clone(),
            ip: Some(l.ip.to_string()),
            hostname: None,
        }
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for MemoryProvider {
    fn kind(&self) -> &'static str {
        "memory"
    }

    /// As AWS: the header is a setting of the listener's target.
    fn supports_proxy_protocol(&self) -> bool {
        true
    }

    fn limits(&self) -> Limits {
        Limits {
            max_ports_per_lb: MAX_LISTENERS_PER_LB,
            max_lbs: self.faults.load_balancer_quota,
            max_ports_total: None,
            port_mode: PortMode::PerLoadBalancer,
            lb_groups: None,
        }
    }

    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        let name = self.cloud_name(lb);
        if let Some(l) = self.cloud.lock().lbs.get(&name) {
            return Ok(Self::info(l));
        }
        self.call("create_load_balancer").await?;
        if !self.faults.provisioning.is_zero() {
            tokio::time::sleep(self.faults.provisioning).await;
        }
        let mut acc = self.cloud.lock();
        if let Some(l) = acc.lbs.get(&name) {
            return Ok(Self::info(l));
        }
        let in_pool = acc.lbs.values().filter(|l| self.ours(l)).count() as u32;
        if self
            .faults
            .load_balancer_quota
            .is_some_and(|q| in_pool >= q)
        {
            return Err(ProviderError::QuotaExceeded(format!(
                "memory: the account allows {} load balancers in pool {}",
                in_pool, self.pool
            )));
        }
        // The id and the address follow from the name: a process that restarts with an empty account (as the
        // benchmark of a restart does) makes its load balancers again as a cloud that kept them would show them,
        // whatever the order
        let used: BTreeSet<u8> = acc.lbs.values().map(|l| l.ip.octets()[3]).collect();
        // (from the pool and the index: a pool's first 254 load balancers never take each other's address)
        let pool_start = format!("{}/{}", lb.cluster_id, lb.pool)
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let start = (pool_start % 254 + lb.index % 254) % 254;
        let candidates = (0..254u32).map(|i| ((start + i) % 254 + 1) as u8);
        let Some(host) = candidates.into_iter().find(|h| !used.contains(h)) else {
            return Err(ProviderError::QuotaExceeded(
                "memory: 198.51.100.0/24 has no free address".into(),
            ));
        };
        let l = MemoryLoadBalancer {
            id: format!("mem-lb-{name}"),
            name: name.clone(),
            ip: Ipv4Addr::new(198, 51, 100, host),
            tags: [
                (tags::MANAGED_BY, "sharedlb".to_string()),
                (tags::CLUSTER, lb.cluster_id.clone()),
                (tags::POOL, lb.pool.clone()),
                (tags::INDEX, lb.index.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            listeners: BTreeMap::new(),
            targets: self.targets_of(&acc, &name),
        };
        let info = Self::info(&l);
        acc.lbs.insert(name, l);
        *acc.calls.entry("create_load_balancer").or_default() += 1;
        Ok(info)
    }

    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        listener: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        let name = self.cloud_name(lb);
        let want = MemoryListener {
            node_port: listener.node_port,
            owner_uid: listener.owner.uid.clone(),
            source_ranges: listener.source_ranges.clone(),
        };
        {
            let acc = self.cloud.lock();
            let l = acc
                .lbs
                .get(&name)
                .ok_or_else(|| ProviderError::NotFound(format!("load balancer {name}")))?;
            if l.listeners.get(&(listener.port, listener.protocol)) == Some(&want) {
                return Ok(());
            }
        }
        self.call("put_listener").await?;
        let mut acc = self.cloud.lock();
        let l = acc
            .lbs
            .get_mut(&name)
            .ok_or_else(|| ProviderError::NotFound(format!("load balancer {name}")))?;
        if l.listeners.len() as u32 >= MAX_LISTENERS_PER_LB
            && !l
                .listeners
                .contains_key(&(listener.port, listener.protocol))
        {
            return Err(ProviderError::QuotaExceeded(format!(
                "memory: {name} has {MAX_LISTENERS_PER_LB} listeners"
            )));
        }
        l.listeners.insert((listener.port, listener.protocol), want);
        *acc.calls.entry("put_listener").or_default() += 1;
        Ok(())
    }

    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        let name = self.cloud_name(lb);
        let present = self
            .cloud
            .lock()
            .lbs
            .get(&name)
            .and_then(|l| l.listeners.get(&(port, protocol)))
            .is_some_and(|x| x.owner_uid == owner_uid);
        if !present {
            return Ok(());
        }
        if self.cloud.lock().unremovable.contains(owner_uid) {
            return Err(ProviderError::Other(format!(
                "memory: the listener on {name} port {port} cannot be removed (refused by the test)"
            )));
        }
        self.call("delete_listener").await?;
        let mut acc = self.cloud.lock();
        if let Some(l) = acc.lbs.get_mut(&name)
            && l.listeners
                .get(&(port, protocol))
                .is_some_and(|x| x.owner_uid == owner_uid)
        {
            l.listeners.remove(&(port, protocol));
            *acc.calls.entry("delete_listener").or_default() += 1;
        }
        Ok(())
    }

    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        let name = self.cloud_name(lb);
        if !self.cloud.lock().lbs.contains_key(&name) {
            return Ok(());
        }
        self.call("delete_load_balancer").await?;
        let mut acc = self.cloud.lock();
        if acc.lbs.remove(&name).is_some() {
            *acc.calls.entry("delete_load_balancer").or_default() += 1;
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        if !self.faults.latency.is_zero() {
            tokio::time::sleep(self.faults.latency).await;
        }
        let acc = self.cloud.lock();
        let mut load_balancers = Vec::new();
        for l in acc.lbs.values().filter(|l| self.ours(l)) {
            let Some(index) = l.tags.get(tags::INDEX).and_then(|i| i.parse().ok()) else {
                continue;
            };
            load_balancers.push(InventoryLoadBalancer {
                index,
                info: Self::info(l),
                listeners: l
                    .listeners
                    .iter()
                    .map(|((port, protocol), x)| InventoryListener {
                        port: *port,
                        protocol: *protocol,
                        node_port: x.node_port,
                        owner_uid: x.owner_uid.clone(),
                        serving: true,
                    })
                    .collect(),
            });
        }
        Ok(Inventory { load_balancers })
    }

    /// The calls a cloud's API would have counted that the trait's do not show: each load balancer whose target
    /// set changed (`update_nodes` is one trait call for the whole pool).
    fn api_calls(&self) -> Vec<ApiCalls> {
        let set = self.cloud.lock().targets_set.get(&self.pool).copied();
        vec![ApiCalls {
            operation: "set_targets".into(),
            mutating: true,
            calls: set.unwrap_or(0),
        }]
    }

    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        while self.cloud.lock().stalled_node_updates.contains(&self.pool) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // registering targets is a cloud call like any other: latency and injected faults apply
        self.call("update_nodes").await?;
        let mut guard = self.cloud.lock();
        let acc = &mut *guard;
        let (held, updates) = acc.nodes.entry(self.pool.clone()).or_default();
        *updates += 1;
        if held != nodes {
            *held = nodes.to_vec();
            *acc.calls.entry("update_nodes").or_default() += 1;
        }
        // each load balancer's targets, set (one call each, as a cloud's target registration) only where its
        // subset changed
        let names: Vec<String> = acc
            .lbs
            .values()
            .filter(|l| self.ours(l))
            .map(|l| l.name.clone())
            .collect();
        for name in names {
            let want = self.targets_of(acc, &name);
            if let Some(l) = acc.lbs.get_mut(&name).filter(|l| l.targets != want) {
                l.targets = want;
                *acc.calls.entry("set_targets").or_default() += 1;
                *acc.targets_set.entry(self.pool.clone()).or_default() += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_bucket_lets_a_burst_through_then_one_call_per_token() {
        let t0 = Instant::now();
        let mut b = Bucket::new(RateLimit {
            per_second: 10,
            burst: 3,
        });
        assert!((0..3).all(|_| b.take(t0).is_ok()), "the burst");
        let wait = b.take(t0).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(100), "one token in 1/10 s");
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(150)).is_err());
        // a long quiet spell saves up no more than the burst
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(later).is_ok()).count(), 3);
    }
}
