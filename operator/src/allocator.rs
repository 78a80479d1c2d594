//! One allocator per pool: the pool's `PoolState` behind an async mutex, so allocation is serialised per pool.
//! It is rebuilt — from every SharedLB status (a consistent LIST) and the provider's inventory — the first time
//! the pool is used, under the same lock, so nothing is placed before the rebuild is complete.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use sharedlb_crds::{LoadBalancerPoolSpec, ProviderSpec, SharedLB, SharedLBStatus};
use sharedlb_placement::{
    AllocatedPort, Allocation, Change, PoolConfig, PoolState, PortMode, Strategy,
};
use sharedlb_providers::{
    Inventory, LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, ProviderError,
};
use tokio::sync::{Mutex, MutexGuard};
use tracing::{info, warn};

use crate::Error;
use crate::claims::{self, Claim, CloudOwners, Rejected};
use crate::drift::{self, Drift};
use crate::model::{
    ClassedServices, ListenerId, ServiceKind, protocol_to_placement, selector_matches,
};

/// How long the drift audit waits before its second look when the first differs from the allocations: a
/// reconcile in flight makes or removes its listeners within this.
pub const AUDIT_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Auto-assigned ports when the pool sets no `portRange`.
pub const DEFAULT_PORT_RANGE: (u16, u16) = (10000, 19999);
/// The cluster's NodePort range, for providers whose external port is the node port.
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);

/// The planner's configuration: the pool's wishes capped by every hard limit the provider knows.
/// `node_ports`: whether the pool's Services take node ports (`ServiceKind::has_node_ports`); a passthrough
/// pool's ports come from the node-port range only when they do.
pub fn pool_config(
    pool: &str,
    spec: &LoadBalancerPoolSpec,
    provider: &dyn LoadBalancerProvider,
    node_ports: bool,
) -> PoolConfig {
    let limits = provider.limits();
    let max_ports = spec
        .capacity
        .max_ports_per_load_balancer
        .map_or(limits.max_ports_per_lb, |m| m.min(limits.max_ports_per_lb))
        .max(1);
    let max_lbs = match (spec.capacity.max_load_balancers, limits.max_lbs) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let port_range = match (limits.port_mode, &spec.port_range) {
        (PortMode::PoolWide, None) if node_ports => NODE_PORT_RANGE,
        _ => spec_port_range(spec),
    };
    PoolConfig {
        max_ports_per_lb: max_ports,
        max_lbs,
        max_ports_total: limits.max_ports_total,
        port_range,
        strategy: match spec.placement {
            sharedlb_crds::PlacementStrategy::Pack => Strategy::Pack,
            sharedlb_crds::PlacementStrategy::Spread => Strategy::Spread,
        },
        port_mode: limits.port_mode,
        lb_groups: limits.lb_groups,
        draining: spec.drained(pool),
        warm: spec.capacity.warm_load_balancers.unwrap_or(0),
    }
}

/// The pool's `portRange`, or the default where it sets none (a pool-wide node-port pool aside: `pool_config`).
pub fn spec_port_range(spec: &LoadBalancerPoolSpec) -> (u16, u16) {
    spec.port_range.as_ref().map_or(DEFAULT_PORT_RANGE, |r| {
        (r.min.clamp(1, 65535) as u16, r.max.clamp(1, 65535) as u16)
    })
}

/// The allocation a status records for `pool`, if any: during a move, the place it moves to.
pub fn allocation_from_status(status: &SharedLBStatus, pool: &str) -> Option<Allocation> {
    if status.pool.as_deref() != Some(pool) {
        return None;
    }
    match &status.moving_to {
        Some(to) => allocation_of(&to.load_balancer, &to.ports, pool),
        None => allocation_of(&status.load_balancer.as_ref()?.name, &status.ports, pool),
    }
}

/// The old place of a moving SharedLB that a status records for `pool`: where it is still served while it
/// moves, and after the move until the grace is over.
pub fn previous_from_status(status: &SharedLBStatus, pool: &str) -> Option<Allocation> {
    if status.pool.as_deref() != Some(pool) {
        return None;
    }
    match (&status.moving_to, &status.previous) {
        (Some(_), _) => allocation_of(&status.load_balancer.as_ref()?.name, &status.ports, pool),
        (None, Some(p)) => allocation_of(&p.load_balancer.name, &p.ports, pool),
        (None, None) => None,
    }
}

fn allocation_of(lb: &str, ports: &[sharedlb_crds::PortStatus], pool: &str) -> Option<Allocation> {
    if ports.is_empty() {
        return None;
    }
    let lb = sharedlb_crds::load_balancer_index(pool, lb)?;
    let mut ports: Vec<AllocatedPort> = ports
        .iter()
        .filter_map(|p| {
            Some(AllocatedPort {
                name: p.name.clone(),
                port: u16::try_from(p.port).ok()?,
                protocol: protocol_to_placement(p.protocol),
            })
        })
        .collect();
    ports.sort();
    Some(Allocation { lb, ports })
}

/// The start of the keys that hold a moved SharedLB's old place in a pool's state until its grace is over.
pub const HELD_KEY_PREFIX: &str = "moving:";

/// The key that holds the old place of the SharedLB `uid` while it moves.
pub fn held_key(uid: &str) -> String {
    format!("{HELD_KEY_PREFIX}{uid}")
}

/// The SharedLB a key of a pool's state stands for: its uid (also for the old place it holds while it moves);
/// None for a stray listener's key.
pub fn owner_of(key: &str) -> Option<&str> {
    match key.starts_with(STRAY_KEY_PREFIX) {
        true => None,
        false => Some(key.strip_prefix(HELD_KEY_PREFIX).unwrap_or(key)),
    }
}

/// A SharedLB's status read as claims on ports of `pool`: its allocation, and the old place it holds while it
/// moves (under `held_key`).
pub fn claims_of(slb: &SharedLB, pool: &str) -> Vec<Claim> {
    let Some(status) = slb.status.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<Claim> = claim_of(slb, pool).into_iter().collect();
    if let (Some(previous), Some(own)) = (previous_from_status(status, pool), out.first().cloned())
    {
        out.push(Claim {
            uid: held_key(&own.uid),
            allocation: previous,
            ..own
        });
    }
    out
}

/// A SharedLB's status read as a claim on ports of `pool` (none when it records no allocation there).
pub fn claim_of(slb: &SharedLB, pool: &str) -> Option<Claim> {
    let allocation = allocation_from_status(slb.status.as_ref()?, pool)?;
    Some(Claim {
        uid: slb.uid()?,
        shared_lb: format!("{}/{}", slb.namespace().unwrap_or_default(), slb.name_any()),
        created: slb
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        allocation,
        spec_ports: slb
            .spec
            .ports
            .iter()
            .map(|p| (p.name.clone(), protocol_to_placement(p.protocol)))
            .collect(),
    })
}

#[derive(Debug)]
pub struct PoolAllocator {
    pub pool: String,
    /// The pool object's UID: a pool deleted and made again gets a new allocator.
    pub pool_uid: String,
    pub cluster_id: String,
    /// The provider and the settings it was made with. A pool edited to another cloud or region keeps these (and
    /// says so) rather than leaving every load balancer made with them behind; other edits of the settings give
    /// it a provider made anew (`replace_provider`), with the pool's state kept as it is.
    provider: SyncMutex<(Arc<dyn LoadBalancerProvider>, ProviderSpec)>,
    state: Mutex<Option<PoolState>>,
    infos: SyncMutex<BTreeMap<u32, LoadBalancerInfo>>,
    strays: SyncMutex<Vec<StrayListener>>,
    /// The listeners the cloud may hold, by owner uid: seeded from the inventory at rebuild, added to before each
    /// ensure (a failed call may still have made it), taken from after each removal. A SharedLB's deploy removes
    /// what is here and not wanted on every reconcile, so a removal that failed is tried until it holds.
    ledger: SyncMutex<BTreeMap<String, BTreeSet<ListenerId>>>,
    /// Status claims the last rebuild did not honour, by uid, with why.
    rejected: SyncMutex<BTreeMap<String, String>>,
    /// Set, under the state's lock, once the pool is being deleted and holds nothing: nothing more is placed.
    closed: AtomicBool,
    /// Held while empty load balancers are deleted (see `delete_marked`).
    deletions: Mutex<()>,
    /// When the drift audit last ran, and what the last one that found drift mended (cleared by one that finds
    /// none).
    audited: SyncMutex<(Option<std::time::Instant>, Option<String>)>,
    /// Whether and how the cluster makes `LoadBalancer` Services of a class without node ports (see
    /// `service_kind`).
    classed_services: Option<ClassedServices>,
}

/// A listener the rebuild found in the cloud that no allocation accounts for and that could not be removed. Its
/// port stays taken in the pool's state (held under `stray:<owner>:<lb>`), so nothing else is placed on it; the pool
/// reports it and tries again. One such listener no longer stops the whole pool from placing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrayListener {
    pub lb: u32,
    pub port: u16,
    pub protocol: sharedlb_placement::Protocol,
    pub owner_uid: String,
    pub error: String,
}

/// The start of the keys that hold stray listeners' ports in a pool's state.
pub const STRAY_KEY_PREFIX: &str = "stray:";

impl StrayListener {
    /// The key that holds its port in the pool's state: never a SharedLB's uid.
    fn key(&self) -> String {
        format!("{STRAY_KEY_PREFIX}{}:{}", self.owner_uid, self.lb)
    }
}

impl PoolAllocator {
    pub fn new(
        pool: &str,
        pool_uid: &str,
        cluster_id: &str,
        provider: Arc<dyn LoadBalancerProvider>,
        provider_spec: ProviderSpec,
    ) -> Self {
        PoolAllocator {
            pool: pool.to_string(),
            pool_uid: pool_uid.to_string(),
            cluster_id: cluster_id.to_string(),
            provider: SyncMutex::new((provider, provider_spec)),
            state: Mutex::new(None),
            infos: SyncMutex::new(BTreeMap::new()),
            strays: SyncMutex::new(Vec::new()),
            ledger: SyncMutex::new(BTreeMap::new()),
            rejected: SyncMutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            deletions: Mutex::new(()),
            audited: SyncMutex::new((None, None)),
            classed_services: None,
        }
    }

    /// On a cluster that makes `LoadBalancer` Services of a class without node ports (1.24+), a provider that
    /// needs none gets such Services (`ServiceKind::Classed`).
    pub fn with_classed_services(mut self, classed: Option<ClassedServices>) -> Self {
        self.classed_services = classed;
        self
    }

    /// The kind of backing Service this pool's SharedLBs get.
    pub fn service_kind(&self) -> ServiceKind {
        match self.classed() {
            Some(c) => ServiceKind::Classed(c),
            None => ServiceKind::NodePort(self.provider().limits().port_mode),
        }
    }

    /// How this pool's Services are classed, if they are: on a cluster that makes such Services, for a provider
    /// that needs no node port. Asks the provider nothing costly (`lock` asks for its limits once already).
    fn classed(&self) -> Option<ClassedServices> {
        self.classed_services
            .filter(|_| !self.provider().needs_node_ports())
    }

    /// The provider to call now.
    pub fn provider(&self) -> Arc<dyn LoadBalancerProvider> {
        self.provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The settings the provider was made with.
    pub fn provider_spec(&self) -> ProviderSpec {
        self.provider
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Calls from now on go to `provider`, made from `spec` (same cloud and location, other settings). Nothing
    /// the pool holds moves: the state, the ledger and the load balancers stay; calls under way finish on the
    /// provider they started with.
    pub fn replace_provider(&self, provider: Arc<dyn LoadBalancerProvider>, spec: ProviderSpec) {
        *self.provider.lock().unwrap_or_else(|e| e.into_inner()) = (provider, spec);
    }

    pub fn key(&self, lb: u32) -> LoadBalancerKey {
        LoadBalancerKey {
            cluster_id: self.cluster_id.clone(),
            pool: self.pool.clone(),
            index: lb,
        }
    }

    pub fn lb_name(&self, lb: u32) -> String {
        self.key(lb).name()
    }

    /// What the cloud last said about a load balancer.
    pub fn info(&self, lb: u32) -> Option<LoadBalancerInfo> {
        self.infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&lb)
            .cloned()
    }

    pub fn remember(&self, lb: u32, info: LoadBalancerInfo) {
        self.infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(lb, info);
    }

    fn forget_info(&self, lb: u32) {
        self.infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&lb);
    }

    /// Closes the pool to placement (its deletion has begun); call with the state locked.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// True once the pool's deletion closed it; read with the state locked.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The listeners the cloud may hold for this owner.
    pub fn listeners_of(&self, owner_uid: &str) -> BTreeSet<ListenerId> {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(owner_uid)
            .cloned()
            .unwrap_or_default()
    }

    /// Records that the cloud may now hold this listener for the owner (called before the cloud call).
    pub fn note_listener(&self, owner_uid: &str, id: ListenerId) {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(owner_uid.to_string())
            .or_default()
            .insert(id);
    }

    /// Records that the cloud no longer holds this listener for the owner (called after a removal held).
    pub fn forget_listener(&self, owner_uid: &str, id: ListenerId) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = ledger.get_mut(owner_uid) {
            held.remove(&id);
            if held.is_empty() {
                ledger.remove(owner_uid);
            }
        }
    }

    /// A deleted load balancer took its listeners with it.
    fn forget_listeners_on(&self, lb: u32) {
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        for held in ledger.values_mut() {
            held.retain(|id| id.lb != lb);
        }
        ledger.retain(|_, held| !held.is_empty());
    }

    /// The pool's state, locked; rebuilt first if this is the first use. The config follows the pool spec.
    pub async fn lock(
        &self,
        client: &Client,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<LockedPool<'_>, Error> {
        let node_ports = self.classed().is_none();
        let config = pool_config(&self.pool, spec, self.provider().as_ref(), node_ports);
        let mut guard = self.state.lock().await;
        match guard.as_mut() {
            None => *guard = Some(self.rebuild(client, spec, config).await?),
            Some(st) if st.config() != &config => st.set_config(config),
            Some(_) => {}
        }
        Ok(LockedPool { guard })
    }

    /// The state as it is, if built, without rebuilding.
    pub async fn peek<T>(&self, f: impl FnOnce(&PoolState) -> T) -> Option<T> {
        self.state.lock().await.as_ref().map(f)
    }

    async fn rebuild(
        &self,
        client: &Client,
        spec: &LoadBalancerPoolSpec,
        config: PoolConfig,
    ) -> Result<PoolState, Error> {
        let mut st = PoolState::new(config);
        let inventory = self.provider().inventory().await?;
        for lb in &inventory.load_balancers {
            st.restore_load_balancer(lb.index);
            self.remember(lb.index, lb.info.clone());
        }
        let (admitted, not_admitted) = self.read_claims(client, spec).await?;
        let mut rejected: Vec<Rejected> = not_admitted
            .into_iter()
            .map(|c| Rejected {
                uid: c.uid,
                shared_lb: c.shared_lb,
                reason: "its namespace is not admitted by the pool".into(),
            })
            .collect();
        let offered = admitted.len();
        let settled = claims::settle(&mut st, admitted, &cloud_owners(&inventory));
        let restored = offered - settled.len();
        rejected.extend(settled);
        for r in &rejected {
            warn!(pool = %self.pool, shared_lb = %r.shared_lb, reason = %r.reason, "a status claim was not honoured; it will be placed again");
        }
        *self.rejected.lock().unwrap_or_else(|e| e.into_inner()) =
            rejected.into_iter().map(|r| (r.uid, r.reason)).collect();
        // The audit: a listener in the cloud that no allocation accounts for is removed (a crash between the
        // status write of a freed port and the cloud call leaves one).
        let mut unaccounted = Vec::new();
        let mut ledger: BTreeMap<String, BTreeSet<ListenerId>> = BTreeMap::new();
        for lb in &inventory.load_balancers {
            for l in &lb.listeners {
                // its own, or the old place a moving SharedLB still serves
                let holds = |a: &Allocation| {
                    a.lb == lb.index
                        && a.ports
                            .iter()
                            .any(|p| p.port == l.port && p.protocol == l.protocol)
                };
                let accounted = st.allocation(&l.owner_uid).is_some_and(holds)
                    || st.allocation(&held_key(&l.owner_uid)).is_some_and(holds);
                let id = ListenerId::listed(lb.index, l);
                if accounted {
                    ledger.entry(l.owner_uid.clone()).or_default().insert(id);
                } else {
                    unaccounted.push((l.owner_uid.clone(), id));
                }
            }
        }
        let strays = self.remove_strays(unaccounted).await;
        hold_stray_ports(&mut st, &strays);
        *self.strays.lock().unwrap_or_else(|e| e.into_inner()) = strays;
        *self.ledger.lock().unwrap_or_else(|e| e.into_inner()) = ledger;
        info!(pool = %self.pool, restored, load_balancers = inventory.load_balancers.len(), "allocator rebuilt");
        Ok(st)
    }

    /// Removes listeners no allocation accounts for (each removal checked against the owner the cloud records);
    /// returns the ones that could not be removed.
    async fn remove_strays(
        &self,
        found: impl IntoIterator<Item = (String, ListenerId)>,
    ) -> Vec<StrayListener> {
        let mut kept = Vec::new();
        for (owner, id) in found {
            info!(pool = %self.pool, lb = id.lb, port = id.port, owner = %owner, "removing a stray listener");
            let removed = self
                .provider()
                .remove_listener(&self.key(id.lb), id.port, id.protocol, &owner)
                .await;
            if let Err(e) = removed {
                warn!(pool = %self.pool, lb = id.lb, port = id.port, error = %e, "a stray listener could not be removed; its port stays taken");
                kept.push(StrayListener {
                    lb: id.lb,
                    port: id.port,
                    protocol: id.protocol,
                    owner_uid: owner,
                    error: e.to_string(),
                });
            }
        }
        kept
    }

    /// One drift audit (see `drift`): the inventory against the allocations and the addresses last seen, taken
    /// again after `AUDIT_SETTLE` when they differ, so what a reconcile in flight is making or removing is not
    /// taken for drift. Strays are removed here (one that cannot be is held like the rebuild's), moved addresses
    /// remembered; returns what was found and the SharedLBs whose reconcile mends the rest. None: the pool's state
    /// is not built yet (nothing to compare with).
    pub async fn audit(&self) -> Result<Option<(Drift, BTreeSet<String>)>, Error> {
        let Some(first) = self.find_drift().await? else {
            return Ok(None);
        };
        if first.is_empty() {
            self.note_repairs(&first);
            return Ok(Some((first, BTreeSet::new())));
        }
        tokio::time::sleep(AUDIT_SETTLE).await;
        let Some(later) = self.find_drift().await? else {
            return Ok(None);
        };
        let drift = first.also_in(&later);
        self.note_repairs(&drift);
        let kept = self.remove_strays(drift.strays.iter().cloned()).await;
        for (lb, info) in &drift.moved {
            self.remember(*lb, info.clone());
        }
        let mut guard = self.state.lock().await;
        let Some(st) = guard.as_mut() else {
            return Ok(None);
        };
        if !kept.is_empty() {
            hold_stray_ports(st, &kept);
            let mut strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
            for k in kept {
                if !strays.contains(&k) {
                    strays.push(k);
                }
            }
        }
        let owners = drift.owners_to_reconcile(st.allocations(), owner_of);
        Ok(Some((drift, owners)))
    }

    /// Keeps the pool's warm spares: extra empty load balancers are marked for deletion, and the spares the
    /// state wants (`PoolState::spares_wanted`) are made, each recorded in the state first, so placement may use
    /// it while the cloud makes it. Returns how many it made or marked. One the cloud refuses is given up (marked
    /// for deletion, as an emptied one is) and the error returned; the next reconcile of the pool tries again.
    pub async fn make_spares(&self) -> Result<usize, ProviderError> {
        let trimmed;
        let wanted = {
            let mut guard = self.state.lock().await;
            let Some(st) = guard.as_mut() else {
                return Ok(0);
            };
            // fewer spares asked for than there are: the extra ones are marked for deletion (a plan of nothing
            // changes no placement, it only collects empty load balancers beyond the warm ones)
            let trim = st.plan(&[]);
            st.apply(&trim);
            trimmed = trim.actions.len();
            let wanted = st.spares_wanted();
            for lb in &wanted {
                st.restore_load_balancer(*lb);
            }
            wanted
        };
        for lb in &wanted {
            match self.provider().ensure_load_balancer(&self.key(*lb)).await {
                Ok(info) => self.remember(*lb, info),
                Err(e) => {
                    if let Some(st) = self.state.lock().await.as_mut() {
                        let give_up = sharedlb_placement::Plan {
                            actions: vec![sharedlb_placement::Action::DeleteLoadBalancer {
                                lb: *lb,
                            }],
                            ..Default::default()
                        };
                        st.apply(&give_up);
                    }
                    return Err(e);
                }
            }
        }
        Ok(wanted.len() + trimmed)
    }

    /// True (and the clock restarts) when the last audit is `every` old or there was none.
    pub fn audit_due(&self, every: std::time::Duration) -> bool {
        let mut audited = self.audited.lock().unwrap_or_else(|e| e.into_inner());
        let due = audited.0.is_none_or(|at| at.elapsed() >= every);
        if due {
            audited.0 = Some(std::time::Instant::now());
        }
        due
    }

    /// What the last audit that found drift mended, until one finds none.
    pub fn last_repairs(&self) -> Option<String> {
        self.audited
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    fn note_repairs(&self, drift: &Drift) {
        let summary = (!drift.is_empty()).then(|| drift.summary());
        self.audited.lock().unwrap_or_else(|e| e.into_inner()).1 = summary;
    }

    async fn find_drift(&self) -> Result<Option<Drift>, Error> {
        let inventory = self.provider().inventory().await?;
        let guard = self.state.lock().await;
        let Some(st) = guard.as_ref() else {
            return Ok(None);
        };
        let seen = self.infos.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(Some(drift::find(
            st.allocations(),
            &inventory,
            &seen,
            owner_of,
        )))
    }

    /// Every SharedLB status that names this pool, as claims: (from admitted namespaces, from others). A
    /// consistent LIST (no resourceVersion), so every allocation a previous leader wrote is in it.
    async fn read_claims(
        &self,
        client: &Client,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<(Vec<Claim>, Vec<Claim>), Error> {
        let admits = self.namespace_admission(client, spec).await?;
        let api: Api<SharedLB> = Api::all(client.clone());
        let mut params = ListParams::default().limit(500);
        let (mut admitted, mut not_admitted) = (Vec::new(), Vec::new());
        loop {
            let page = api.list(&params).await?;
            for slb in &page.items {
                if slb.metadata.deletion_timestamp.is_some() {
                    continue; // being deleted: its ports are on their way out
                }
                let ns = slb.namespace().unwrap_or_default();
                for claim in claims_of(slb, &self.pool) {
                    match admits.as_ref().is_none_or(|a| a.contains(&ns)) {
                        true => admitted.push(claim),
                        false => not_admitted.push(claim),
                    }
                }
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
        Ok((admitted, not_admitted))
    }

    /// Which namespaces the pool admits (None: all), read once per rebuild (one LIST, only when the pool has a
    /// selector).
    async fn namespace_admission(
        &self,
        client: &Client,
        spec: &LoadBalancerPoolSpec,
    ) -> Result<Option<BTreeSet<String>>, Error> {
        let Some(selector) = spec.namespace_selector.as_ref() else {
            return Ok(None);
        };
        let namespaces = Api::<Namespace>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let admitted: BTreeSet<String> = namespaces
            .items
            .into_iter()
            .filter(|n| selector_matches(selector, &n.metadata.labels.clone().unwrap_or_default()))
            .filter_map(|n| n.metadata.name)
            .collect();
        Ok(Some(admitted))
    }

    /// Why this SharedLB's status claim was not honoured at the last rebuild, once: its reconcile tells it.
    pub fn take_rejected(&self, uid: &str) -> Option<String> {
        self.rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid)
    }

    /// The stray listeners that could not be removed yet.
    pub fn strays(&self) -> Vec<StrayListener> {
        self.strays
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tries again to remove the stray listeners; each one removed frees its port in the pool's state.
    pub async fn retry_strays(&self) {
        for stray in self.strays() {
            let removed = self
                .provider()
                .remove_listener(
                    &self.key(stray.lb),
                    stray.port,
                    stray.protocol,
                    &stray.owner_uid,
                )
                .await;
            // what is left of the same key once this one is gone, or None when it stays
            let left = {
                let mut strays = self.strays.lock().unwrap_or_else(|e| e.into_inner());
                let Some(at) = strays.iter().position(|s| s == &stray) else {
                    continue;
                };
                match removed {
                    Ok(()) => {
                        strays.remove(at);
                        let left: Vec<StrayListener> = strays
                            .iter()
                            .filter(|s| s.key() == stray.key())
                            .cloned()
                            .collect();
                        Some(left)
                    }
                    Err(e) => {
                        strays[at].error = e.to_string();
                        None
                    }
                }
            };
            if let Some(left) = left {
                info!(pool = %self.pool, lb = stray.lb, port = stray.port, "removed a stray listener");
                if let Some(st) = self.state.lock().await.as_mut() {
                    // the planner's own release; what it plans for a stray key has no cloud side
                    let _ = st.plan(&[Change::Remove { key: stray.key() }]);
                    hold_stray_ports(st, &left);
                }
            }
        }
    }

    /// Deletes empty load balancers marked for deletion, then forgets them. Failures stay marked and are tried
    /// again by the pool's next reconcile.
    pub async fn delete_marked(&self, lbs: Vec<u32>) -> Result<(), ProviderError> {
        // One deletion at a time, each checked against the state as it is now: a list read earlier may name a
        // load balancer another deletion already forgot, whose index a new one has taken since.
        let _one_at_a_time = self.deletions.lock().await;
        for lb in lbs {
            let still_marked = self
                .state
                .lock()
                .await
                .as_ref()
                .is_some_and(|st| st.deleting().contains(&lb));
            if !still_marked {
                continue;
            }
            self.provider().delete_load_balancer(&self.key(lb)).await?;
            if let Some(st) = self.state.lock().await.as_mut() {
                st.forget_load_balancer(lb);
            }
            self.forget_info(lb);
            self.forget_listeners_on(lb);
            info!(pool = %self.pool, lb, "deleted an empty load balancer");
        }
        Ok(())
    }
}

/// The owner the cloud records for each listener of the pool.
fn cloud_owners(inventory: &Inventory) -> CloudOwners {
    inventory
        .load_balancers
        .iter()
        .flat_map(|lb| {
            lb.listeners
                .iter()
                .map(|l| (ListenerId::listed(lb.index, l), l.owner_uid.clone()))
        })
        .collect()
}

/// Keeps the ports of listeners that could not be removed taken, one item per owner and load balancer.
fn hold_stray_ports(st: &mut PoolState, strays: &[StrayListener]) {
    // the key names the owner and the load balancer, so each key is one allocation
    let mut held: BTreeMap<String, Allocation> = BTreeMap::new();
    for s in strays {
        let alloc = held.entry(s.key()).or_insert_with(|| Allocation {
            lb: s.lb,
            ports: Vec::new(),
        });
        alloc.ports.push(AllocatedPort {
            name: format!("{}-{:?}", s.port, s.protocol).to_lowercase(),
            port: s.port,
            protocol: s.protocol,
        });
    }
    for (key, mut alloc) in held {
        alloc.ports.sort_by(|a, b| a.name.cmp(&b.name));
        if let Err(c) = st.restore(key, alloc) {
            // an allocation the statuses account for holds it already: its own listener replaces the stray
            warn!(lb = c.lb, port = c.port, held_by = %c.held_by, "a stray listener's port is allocated");
        }
    }
}

/// The locked, built state of a pool.
#[derive(Debug)]
pub struct LockedPool<'a> {
    guard: MutexGuard<'a, Option<PoolState>>,
}

impl std::ops::Deref for LockedPool<'_> {
    type Target = PoolState;
    fn deref(&self) -> &PoolState {
        // `lock` only hands out a LockedPool after the state is built
        self.guard
            .as_ref()
            .expect("state is built before LockedPool is made")
    }
}

impl std::ops::DerefMut for LockedPool<'_> {
    fn deref_mut(&mut self) -> &mut PoolState {
        self.guard
            .as_mut()
            .expect("state is built before LockedPool is made")
    }
}

#[cfg(test)]
mod tests;
