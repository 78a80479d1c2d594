//! The two controllers — SharedLB and LoadBalancerPool — and what they share.

use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::channel::mpsc::UnboundedSender;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::api::DynamicObject;
use kube::runtime::controller::{Action, Config as ControllerConfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use sharedlb_crds::{
    LoadBalancerPool, LoadBalancerPoolSpec, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SERVICE_SUFFIX,
    SharedLB, local_addresses_in_effect, validate_local_addresses, validate_provider_change,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::allocator::PoolAllocator;
use crate::endpoints::{EndpointSlices, SERVICE_NAME_LABEL};
use crate::fence::Fence;
pub use crate::fence::LeaderElection;
use crate::model::ClassedServices;
use crate::telemetry::{self, GuardedProvider, Metrics};
use crate::{Error, ProviderFactory};
use sharedlb_providers::{LoadBalancerProvider, NodeTarget, ProviderError};

mod backoff;
pub(crate) mod pool;
mod shared_lb;
pub(crate) mod status;
pub(crate) mod written;

/// Where Events about cluster-scoped objects (pools) are written.
pub const CLUSTER_EVENTS_NAMESPACE: &str = "kube-system";

/// How the operator runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Put in every cloud object's tags/names, so two clusters can share an account.
    pub cluster_id: String,
    /// Reconciles running at once per controller.
    pub concurrency: u16,
    /// The Events' reporting controller.
    pub controller_name: String,
    /// Where to serve /metrics, /healthz and /readyz; None: not served.
    pub metrics_addr: Option<SocketAddr>,
    /// None: this process is the only one (tests, a single replica).
    pub leader_election: Option<LeaderElection>,
    /// Which kind of backing Service to make where the cloud needs no node port.
    pub backing_service: BackingService,
    /// Prices for the pools' cost estimate (their status's `hourlyCost`).
    pub prices: crate::cost::PriceTable,
    /// How often each pool's cloud inventory is compared with its allocations (the drift audit).
    pub audit_interval: Duration,
}

impl Settings {
    /// The ports this process listens on, and what serves there: a local pool never hands them to a SharedLB.
    pub fn own_ports(&self) -> Vec<(u16, &'static str)> {
        self.metrics_addr
            .iter()
            .map(|a| (a.port(), "metrics and health"))
            .collect()
    }
}

/// The backing Services' kind where the cloud needs no node port (`LoadBalancerProvider::needs_node_ports`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackingService {
    /// `LoadBalancer` of sharedlb's class without node ports where the apiserver is 1.24 or later (both fields
    /// GA there), `NodePort` before.
    #[default]
    Auto,
    /// Always `NodePort`: every port takes one from the cluster's node-port range.
    NodePort,
    /// Always `LoadBalancer` of sharedlb's class without node ports. On an apiserver that drops
    /// `loadBalancerClass` (before 1.21), a cloud controller would also act on these Services: only for clusters
    /// without one.
    LoadBalancerClass,
}

impl BackingService {
    /// Whether (and how) the Services are `ServiceKind::Classed`, for an apiserver of this version.
    pub fn classed(
        self,
        version: &k8s_openapi::apimachinery::pkg::version::Info,
    ) -> Option<ClassedServices> {
        let minor = minor_version(version);
        let classed = match self {
            BackingService::NodePort => false,
            BackingService::LoadBalancerClass => true,
            BackingService::Auto => minor.is_some_and(|m| m >= 24),
        };
        classed.then_some(ClassedServices {
            class_field: minor.is_none_or(|m| m >= 21),
        })
    }
}

/// The minor version of a 1.x apiserver; managed clusters report it with a suffix, e.g. `"29+"`.
fn minor_version(version: &k8s_openapi::apimachinery::pkg::version::Info) -> Option<u32> {
    if version.major.trim_end_matches('+') != "1" {
        return None;
    }
    let digits: String = version
        .minor
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            cluster_id: "default".into(),
            concurrency: 16,
            controller_name: "sharedlb".into(),
            metrics_addr: None,
            leader_election: None,
            backing_service: BackingService::Auto,
            prices: crate::cost::PriceTable::default(),
            audit_interval: Duration::from_secs(300),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
    recorder: Recorder,
    pools: Store<LoadBalancerPool>,
    nodes: Store<Node>,
    /// The backing Services this operator made (by label), so a reconcile reads its Service without a GET.
    services: Store<Service>,
    slices: EndpointSlices,
    factory: Arc<dyn ProviderFactory>,
    /// One slot per pool name. The map's lock is held only to find a slot, never while a provider is made or
    /// called, so a pool whose cloud is slow or unreachable delays no other pool.
    allocators: Mutex<HashMap<String, Arc<AllocatorSlot>>>,
    /// Consecutive failures per object, for retries that back off.
    backoff: backoff::Backoff,
    /// Statuses written and not yet seen in the store (see `written`).
    written: written::WrittenStatuses,
    /// Whether this replica may act: checked before each reconcile, status write, Service write and cloud change.
    fence: Fence,
    /// Backing Services are `ServiceKind::Classed` where the cloud needs no node port (`BackingService`).
    classed_services: Option<ClassedServices>,
    /// SharedLBs to reconcile now (the drift audit's repairs).
    resync: futures::channel::mpsc::UnboundedSender<ObjectRef<SharedLB>>,
}

/// A pool object's allocator, made once by the first reconcile that needs it (the others of that pool wait for
/// it; a failed attempt leaves the slot empty for the next).
#[derive(Debug)]
struct AllocatorSlot {
    pool_uid: String,
    allocator: tokio::sync::OnceCell<Arc<PoolAllocator>>,
}

impl AllocatorSlot {
    fn new(pool_uid: &str) -> Arc<Self> {
        Arc::new(AllocatorSlot {
            pool_uid: pool_uid.to_string(),
            allocator: tokio::sync::OnceCell::new(),
        })
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// `<namespace>/<name>` of the SharedLBs with these UIDs, found through the backing Services they own (the
    /// store this replica already holds), sorted, at most `max`; a SharedLB whose Service is not there yet shows
    /// as its UID.
    fn shared_lb_names(&self, uids: &[String], max: usize) -> Vec<String> {
        let found = self.shared_lb_refs(uids.iter());
        let mut names: Vec<String> = uids
            .iter()
            .map(|u| match found.get(u) {
                Some(r) => format!("{}/{}", r.namespace.clone().unwrap_or_default(), r.name),
                None => u.clone(),
            })
            .collect();
        names.sort();
        names.truncate(max);
        names
    }

    /// The SharedLBs of these uids, found through their backing Services' owner references (no API call).
    fn shared_lb_refs<'a>(
        &self,
        uids: impl Iterator<Item = &'a String>,
    ) -> BTreeMap<String, ObjectRef<SharedLB>> {
        let wanted: BTreeSet<&str> = uids.map(String::as_str).collect();
        let mut found = BTreeMap::new();
        for svc in self.services.state() {
            for owner in svc.owner_references() {
                if owner.kind == "SharedLB" && wanted.contains(owner.uid.as_str()) {
                    let ns = svc.namespace().unwrap_or_default();
                    found.insert(owner.uid.clone(), ObjectRef::new(&owner.name).within(&ns));
                }
            }
        }
        found
    }

    /// Has these SharedLBs reconciled now (the cloud call each makes mends what the audit found).
    fn reconcile_now(&self, uids: &BTreeSet<String>) {
        for r in self.shared_lb_refs(uids.iter()).into_values() {
            let _ = self.resync.unbounded_send(r);
        }
    }

    /// The allocator of a pool, made on first use (and again if the pool was deleted and made anew).
    async fn allocator(&self, pool: &LoadBalancerPool) -> Result<Arc<PoolAllocator>, Error> {
        let uid = pool.uid().unwrap_or_default();
        let slot = {
            let mut all = self.allocators.lock().await;
            let slot = all
                .entry(pool.name_any())
                .or_insert_with(|| AllocatorSlot::new(&uid));
            if slot.pool_uid != uid {
                *slot = AllocatorSlot::new(&uid);
            }
            slot.clone()
        };
        let alloc = slot
            .allocator
            .get_or_try_init(|| self.make_allocator(pool))
            .await
            .cloned()?;
        self.follow_settings(&alloc, pool).await?;
        Ok(alloc)
    }

    /// Settings edited in place take effect at once: the provider is made anew from them, and nothing the pool
    /// holds moves. The cloud and its location cannot change this way (the pool is refused; see
    /// `validate_provider_change`). The local provider carries the traffic on sockets it holds, so its edits wait
    /// for a restart.
    async fn follow_settings(
        &self,
        alloc: &PoolAllocator,
        pool: &LoadBalancerPool,
    ) -> Result<(), Error> {
        let have = alloc.provider_spec();
        let want = &pool.spec.provider;
        if have == *want || have.local.is_some() || validate_provider_change(&have, want).is_err() {
            return Ok(());
        }
        let provider = self.make_provider(pool).await?;
        alloc.replace_provider(provider, want.clone());
        info!(pool = %pool.name_any(), "the pool's provider settings changed; its provider is made anew from them");
        Ok(())
    }

    /// The pool's provider as the operator calls it (fenced, metered), given the cluster's nodes.
    async fn make_provider(
        &self,
        pool: &LoadBalancerPool,
    ) -> Result<Arc<dyn LoadBalancerProvider>, Error> {
        let name = pool.name_any();
        let spec = local_in_effect(pool)?;
        let provider = GuardedProvider::wrap(
            self.factory
                .make(&self.settings.cluster_id, &name, &spec)
                .await?,
            self.metrics.clone(),
            self.fence.clone(),
        );
        if let Err(e) = provider.update_nodes(&node_targets(&self.nodes)).await {
            warn!(pool = %name, error = %e, "could not give the provider the cluster's nodes; retrying soon");
        }
        Ok(provider)
    }

    async fn make_allocator(&self, pool: &LoadBalancerPool) -> Result<Arc<PoolAllocator>, Error> {
        let name = pool.name_any();
        let provider = self.make_provider(pool).await?;
        Ok(Arc::new(
            PoolAllocator::new(
                &name,
                &pool.uid().unwrap_or_default(),
                &self.settings.cluster_id,
                provider,
                pool.spec.provider.clone(),
            )
            .with_classed_services(self.classed_services),
        ))
    }

    /// The allocator of this pool object, if one was made.
    async fn existing_allocator(&self, pool: &LoadBalancerPool) -> Option<Arc<PoolAllocator>> {
        let uid = pool.uid().unwrap_or_default();
        let all = self.allocators.lock().await;
        let slot = all.get(&pool.name_any()).filter(|s| s.pool_uid == uid)?;
        slot.allocator.get().cloned()
    }

    /// Every allocator made so far.
    async fn all_allocators(&self) -> Vec<Arc<PoolAllocator>> {
        let all = self.allocators.lock().await;
        all.values()
            .filter_map(|s| s.allocator.get().cloned())
            .filter(|a| !a.is_closed())
            .collect()
    }

    /// Forgets a deleted pool's allocator.
    async fn drop_allocator(&self, pool: &str) {
        self.allocators.lock().await.remove(pool);
    }

    /// Publishes an Event; a failure to publish is logged, never fatal.
    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_string(),
            secondary: None,
        };
        let reference = obj.object_ref(&());
        let published = match reference.namespace {
            Some(_) => self.recorder.publish(&ev, &reference).await,
            None => self.publish_cluster_scoped(&ev, reference).await,
        };
        if let Err(e) = published {
            warn!(error = %e, reason, "could not publish an Event");
        }
    }

    /// An Event about a cluster-scoped object (a pool) goes to kube-system: apiservers before 1.22 refuse a new-style
    /// Event about one anywhere else (the Recorder's choice, `default`, is refused there), and later ones take it.
    /// `kubectl describe lbpool` finds it, since it looks in every namespace for a cluster-scoped object.
    async fn publish_cluster_scoped(
        &self,
        ev: &Event,
        regarding: k8s_openapi::api::core::v1::ObjectReference,
    ) -> Result<(), kube::Error> {
        use k8s_openapi::api::events::v1::Event as K8sEvent;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
        let now = k8s_openapi::jiff::Timestamp::now();
        let controller = self.settings.controller_name.clone();
        let event = K8sEvent {
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(MicroTime(now)),
            metadata: kube::api::ObjectMeta {
                namespace: Some(CLUSTER_EVENTS_NAMESPACE.into()),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.clone().unwrap_or_default(),
                    now.as_nanosecond()
                )),
                ..Default::default()
            },
            regarding: Some(regarding),
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(controller),
            type_: Some(match ev.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            ..Default::default()
        };
        Api::<K8sEvent>::namespaced(self.client.clone(), CLUSTER_EVENTS_NAMESPACE)
            .create(&kube::api::PostParams::default(), &event)
            .await
            .map(|_| ())
    }
}

/// The pool's settings to make its provider with. For a local pool, the addresses that carry ports keep their
/// positions even when an edit (refused, see the pool's AddressInUse) asks otherwise, so that starting with
/// such an edit in place moves nothing; when no address list can honour both, the provider is not made.
pub(crate) fn local_in_effect(pool: &LoadBalancerPool) -> Result<LoadBalancerPoolSpec, Error> {
    let mut spec = pool.spec.clone();
    let Some(local) = spec.provider.local.as_mut() else {
        return Ok(spec);
    };
    let name = pool.name_any();
    let rows = pool.status.as_ref().map(|s| s.load_balancers.as_slice());
    let rows = rows.unwrap_or_default();
    match local_addresses_in_effect(&name, rows, &local.addresses) {
        Some(addresses) => {
            local.addresses = addresses;
            Ok(spec)
        }
        None => {
            let why = validate_local_addresses(&name, rows, &pool.spec.provider)
                .err()
                .map_or_else(|| "the address list".to_string(), |e| e.to_string());
            let msg = format!("{why}; no address list keeps every address in use where it is");
            Err(Error::Provider(ProviderError::InvalidConfig(msg)))
        }
    }
}

/// The nodes each provider was last given, by (pool, provider instance).
type SentNodes = BTreeMap<(String, usize), Vec<NodeTarget>>;

/// Gives every pool's provider the cluster's nodes when they change. Each pool's update runs on its own, so a
/// slow or unreachable cloud delays no other pool's; a pool whose update is still under way is not asked again
/// until it finishes. The updates end with this task (they are in its JoinSet).
async fn sync_nodes(ctx: Arc<Context>) {
    // by pool and provider instance: a provider made anew (settings edited, pool made again) is sent the nodes
    let sent: Arc<std::sync::Mutex<SentNodes>> = Arc::default();
    let mut updates = tokio::task::JoinSet::new();
    let mut busy: BTreeMap<String, tokio::task::AbortHandle> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        while updates.try_join_next().is_some() {}
        busy.retain(|_, h| !h.is_finished());
        let now = node_targets(&ctx.nodes);
        for a in ctx.all_allocators().await {
            let provider = a.provider();
            let key = (a.pool.clone(), Arc::as_ptr(&provider) as *const () as usize);
            let done = sent.lock().unwrap_or_else(|e| e.into_inner()).get(&key) == Some(&now);
            if done || busy.contains_key(&a.pool) {
                continue;
            }
            let (sent, now) = (sent.clone(), now.clone());
            let pool = a.pool.clone();
            let fence = ctx.fence.clone();
            let handle = updates.spawn(async move {
                let updated = fence.guard(async { Ok(provider.update_nodes(&now).await?) });
                match updated.await {
                    Ok(()) => {
                        sent.lock().unwrap_or_else(|e| e.into_inner()).insert(key, now);
                    }
                    Err(e) => {
                        warn!(pool = %a.pool, error = %e, "updating the provider's nodes failed; retrying")
                    }
                }
            });
            busy.insert(pool, handle);
        }
    }
}

/// The nodes that receive load-balancer traffic: Ready, and not excluded by the well-known label.
fn node_targets(nodes: &Store<Node>) -> Vec<NodeTarget> {
    let mut out: Vec<NodeTarget> = nodes
        .state()
        .iter()
        .filter(|n| !n.labels().contains_key(EXCLUDE_LABEL))
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|n| NodeTarget {
            name: n.name_any(),
            provider_id: n.spec.as_ref().and_then(|s| s.provider_id.clone()),
            internal_ip: n
                .status
                .as_ref()
                .and_then(|s| s.addresses.as_ref())
                .and_then(|a| {
                    a.iter()
                        .find(|a| a.type_ == "InternalIP")
                        .map(|a| a.address.clone())
                }),
            zone: n.labels().get(ZONE_LABEL).cloned(),
        })
        .collect();
    out.sort();
    out
}

/// EndpointSlices are watched only while a pool's provider forwards to endpoints itself (local): every Service in
/// a cluster has slices, and a cloud pool needs none of them. The watch's first listing starts every SharedLB with
/// slices, so what changed before it started is seen too.
async fn follow_slices(ctx: Arc<Context>, owners: UnboundedSender<ObjectRef<SharedLB>>) {
    let mut watch: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let needed = ctx
            .all_allocators()
            .await
            .iter()
            .any(|a| a.provider().forwards_to_endpoints());
        let running = watch.as_ref().is_some_and(|w| !w.is_finished());
        if needed && !running {
            info!("a pool forwards to endpoints: watching EndpointSlices");
            watch = Some(tokio::spawn(watch_slices(ctx.clone(), owners.clone())));
        } else if !needed && let Some(w) = watch.take() {
            info!("no pool forwards to endpoints: no longer watching EndpointSlices");
            w.abort();
        }
    }
}

/// Each change in the health of a local listener's endpoints starts its owner's reconcile, which writes it.
async fn follow_health(ctx: Arc<Context>) {
    let Some(forwarder) = ctx.factory.forwarder() else {
        return;
    };
    let mut changes = forwarder.watch_health();
    while let Some(owner) = changes.recv().await {
        let slb = ObjectRef::<SharedLB>::new(&owner.name).within(&owner.namespace);
        // the controller is gone only when shutting down
        let _ = ctx.resync.unbounded_send(slb);
    }
}

/// Each change of a slice of a backing Service starts its SharedLB's reconcile.
async fn watch_slices(ctx: Arc<Context>, owners: UnboundedSender<ObjectRef<SharedLB>>) {
    let resource = ctx.slices.resource().clone();
    let api = Api::<DynamicObject>::all_with(ctx.client.clone(), &resource);
    watcher(api, watcher::Config::default().labels(SERVICE_NAME_LABEL))
        .default_backoff()
        .touched_objects()
        .for_each(|slice| {
            if let Some(owner) = slice.ok().as_ref().and_then(slice_owner) {
                // the controller is gone only when shutting down
                let _ = owners.unbounded_send(owner);
            }
            futures::future::ready(())
        })
        .await;
}

/// The SharedLB whose backing Service a slice belongs to.
fn slice_owner(slice: &DynamicObject) -> Option<ObjectRef<SharedLB>> {
    let ns = slice.namespace()?;
    let svc = slice.labels().get(SERVICE_NAME_LABEL)?;
    let owner = svc.strip_suffix(SERVICE_SUFFIX)?;
    Some(ObjectRef::<SharedLB>::new(owner).within(&ns))
}

/// What of a pool its SharedLBs wait on: its spec, its finalizer (nothing is placed before it), its deletion.
fn pool_settings(pool: &LoadBalancerPool) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    pool.meta().generation.hash(&mut h);
    pool.finalizers().hash(&mut h);
    pool.meta().deletion_timestamp.is_some().hash(&mut h);
    Some(h.finish())
}

/// A Node as the store keeps it: only what `node_targets` reads (and the labels, for zones). A kubelet's Node
/// carries its images, capacity and system info, many kilobytes each: at thousands of nodes the store would hold
/// tens of megabytes nobody reads.
/// The node's zone, by which each load balancer's target nodes are chosen.
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Nodes with this label are never load-balancer targets (as for Kubernetes' own Service load balancers).
const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

fn trim_node(n: &mut Node) {
    n.managed_fields_mut().clear();
    n.annotations_mut().clear();
    n.labels_mut()
        .retain(|k, _| k == ZONE_LABEL || k == EXCLUDE_LABEL);
    if let Some(spec) = n.spec.as_mut() {
        *spec = k8s_openapi::api::core::v1::NodeSpec {
            provider_id: spec.provider_id.take(),
            ..Default::default()
        };
    }
    if let Some(st) = n.status.as_mut() {
        let ready = st
            .conditions
            .take()
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect());
        *st = k8s_openapi::api::core::v1::NodeStatus {
            conditions: ready,
            addresses: st.addresses.take(),
            ..Default::default()
        };
    }
}

/// A SharedLB as the store keeps it: without the field managers' records and kubectl's copy of the last applied
/// manifest, which together are often larger than the object.
fn trim_shared_lb(s: &mut SharedLB) {
    s.managed_fields_mut().clear();
    s.annotations_mut()
        .remove("kubectl.kubernetes.io/last-applied-configuration");
}

/// The error of a reconcile wrapped by kube-runtime's finalizer helper, unwrapped to its meaning.
fn finalizer_error(e: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as F;
    match e {
        F::ApplyFailed(e) | F::CleanupFailed(e) => e,
        // the finalizer JSON patch carries a `test` operation: 422 means the object changed meanwhile, a race
        // like a 409, retried at once with the new version
        F::AddFinalizer(kube::Error::Api(s)) | F::RemoveFinalizer(kube::Error::Api(s))
            if s.code == 422 =>
        {
            Error::Conflict
        }
        F::AddFinalizer(e) | F::RemoveFinalizer(e) => Error::from_kube(e),
        other => Error::Finalizer(other.to_string()),
    }
}

/// The `result` label of a failed reconcile: what kind of failure, never a message (bounded cardinality).
fn result_label(e: &Error) -> String {
    match e {
        Error::Provider(p) => p.reason().to_string(),
        Error::Conflict => "Conflict".into(),
        Error::Fenced => "Fenced".into(),
        Error::Kube(_) => "KubeError".into(),
        _ => "Error".into(),
    }
}

/// The shortest wait after a throttle, whatever the cloud hints.
const THROTTLE_MIN_DELAY: Duration = Duration::from_millis(100);

/// Retries back off per object (see `backoff`): the base says how soon this kind of failure is worth another
/// try, a cloud's Retry-After is honoured.
fn error_policy<K: Resource>(obj: Arc<K>, err: &Error, ctx: Arc<Context>) -> Action {
    let (base, at_least) = match err {
        Error::Conflict => (Duration::from_millis(200), None),
        Error::Fenced => (Duration::from_secs(1), None),
        Error::PoolInUse(_) => (Duration::from_secs(10), None),
        // throttled: the pool's calls are paced already (`pacer`), which is the back-off; the object only waits the
        // cloud's hint, spread, rather than a delay that doubles and leaves it last when the cloud has room again
        Error::Provider(ProviderError::Throttled { retry_after, .. }) => {
            let wait = (*retry_after).max(THROTTLE_MIN_DELAY);
            return Action::requeue(wait.mul_f64(1.0 + fastrand::f64()));
        }
        Error::Provider(e) => (Duration::from_secs(5), e.retry_after()),
        Error::Kube(_)
        | Error::Finalizer(_)
        | Error::Store { .. }
        | Error::Planner(_)
        | Error::NoNodePort(_)
        | Error::Json(_)
        | Error::Lease(_)
        | Error::LostLeadership
        | Error::Io(_) => (Duration::from_secs(5), None),
    };
    Action::requeue(ctx.backoff.failed(&backoff_key(&*obj), base, at_least))
}

/// One reconcile, counted and timed in the metrics; a success starts the object's backoff over.
async fn measured(
    controller: &'static str,
    key: &str,
    ctx: Arc<Context>,
    reconcile: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    // a replica that cannot prove it leads does nothing, not even look (a rebuild would act on what it sees), and
    // a reconcile under way stops where it is once the proof runs out
    let fence = ctx.fence.clone();
    let r = ctx
        .metrics
        .reconcile(controller, fence.guard(reconcile), result_label)
        .await;
    if r.is_ok() {
        ctx.backoff.succeeded(key);
    }
    r
}

fn backoff_key<K: Resource>(obj: &K) -> String {
    obj.meta().uid.clone().unwrap_or_default()
}

/// Runs the operator until `shutdown` resolves: metrics and health, then — with leader election — waits for the
/// lease and runs the controllers only while holding it. The CRDs must be installed.
pub async fn run(
    client: Client,
    settings: Settings,
    factory: Arc<dyn ProviderFactory>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    crate::install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let shutdown = shutdown.shared();
    if let Some(addr) = settings.metrics_addr {
        let (m, s) = (metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve(addr, m, s).await {
                warn!(error = %e, %addr, "cannot serve metrics");
            }
        });
    }
    let Some(le) = settings.leader_election.clone() else {
        metrics.leader.set(1);
        let fence = Fence::open();
        return run_controllers(client, settings, factory, metrics, fence, shutdown).await;
    };
    let fence = Fence::closed();
    let fence_task = tokio::spawn(fence.clone().follow(client.clone(), le.clone()));
    let manager = LeaseManagerBuilder::new(client.clone(), &le.lease_name)
        .with_namespace(&le.namespace)
        .with_identity(&le.identity)
        .with_duration(le.duration_secs)
        .with_grace(le.grace_secs)
        .build()
        .await
        .map_err(|e| Error::Lease(e.to_string()))?;
    let (mut leading, lease_task) = manager.watch().await;
    // a replica standing by is healthy and ready: it is doing its job, forwarding included
    metrics.set_ready(true);
    let standby = standby_forwarding(&client, factory.as_ref(), &metrics);
    info!(lease = %le.lease_name, identity = %le.identity, "waiting for the leader lease");
    while !*leading.borrow_and_update() {
        tokio::select! {
            changed = leading.changed() => if changed.is_err() {
                return Err(Error::Lease("the lease manager stopped".into()));
            },
            _ = shutdown.clone() => return Ok(()),
        }
    }
    // the providers drive the listeners from now on: standby forwarding stops first, leaving them bound
    if let Some((stop, task)) = standby {
        let _ = stop.send(());
        let _ = task.await;
    }
    info!(identity = %le.identity, "holding the leader lease: rebuilding and reconciling");
    metrics.leader.set(1);
    let lost = Arc::new(AtomicBool::new(false));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let monitor = {
        let (lost, shutdown) = (lost.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = async {
                    loop {
                        if leading.changed().await.is_err() || !*leading.borrow() {
                            break;
                        }
                    }
                } => lost.store(true, Ordering::SeqCst),
                _ = shutdown => {}
            }
            let _ = stop_tx.send(());
            leading
        })
    };
    let stop = stop_rx.map(|_| ());
    let result = run_controllers(client, settings, factory, metrics.clone(), fence, stop).await;
    fence_task.abort();
    metrics.leader.set(0);
    // dropping the last receiver ends the lease task, which hands back the manager to release the lease
    drop(monitor.await);
    if let Ok(Ok(manager)) = lease_task.await
        && let Err(e) = manager.release().await
    {
        warn!(error = %e, "could not release the leader lease; the next leader waits for it to expire");
    }
    if lost.load(Ordering::SeqCst) {
        warn!("lost the leader lease");
        return Err(Error::LostLeadership);
    }
    result
}

type StandbyTask = tokio::task::JoinHandle<Result<(), Error>>;

/// Serves the local pools' listeners from the statuses while this replica waits for the lease (`forward`);
/// the sender stops it.
fn standby_forwarding(
    client: &Client,
    factory: &dyn ProviderFactory,
    metrics: &Arc<Metrics>,
) -> Option<(tokio::sync::oneshot::Sender<()>, StandbyTask)> {
    let forwarder = factory.forwarder()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let follow = crate::forward::follow(
        client.clone(),
        forwarder,
        metrics.clone(),
        stopped.map(|_| ()),
    );
    let task = tokio::spawn(follow.inspect(|r| {
        if let Err(e) = r {
            warn!(error = %e, "standby forwarding stopped; the listeners wait for the lease");
        }
    }));
    Some((stop, task))
}

async fn run_controllers(
    client: Client,
    settings: Settings,
    factory: Arc<dyn ProviderFactory>,
    metrics: Arc<Metrics>,
    fence: Fence,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), Error> {
    let pools_api: Api<LoadBalancerPool> = Api::all(client.clone());
    let slb_api: Api<SharedLB> = Api::all(client.clone());
    let (pools, writer) = reflector::store();
    let pool_reflector = reflector(
        writer,
        watcher(pools_api.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    let pool_reflector = tokio::spawn(pool_reflector);
    pools.wait_until_ready().await.map_err(|e| Error::Store {
        what: "LoadBalancerPool",
        message: e.to_string(),
    })?;

    let slices = EndpointSlices::discover(&client).await?;
    // nodes, for providers whose targets are the cluster's nodes; synced before anything runs, so a missing
    // permission shows at once instead of as a silent empty target list
    let (nodes, node_writer) = reflector::store();
    let node_reflector = reflector(
        node_writer,
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default()).modify(trim_node),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| futures::future::ready(()));
    let node_reflector = tokio::spawn(node_reflector);
    nodes.wait_until_ready().await.map_err(|e| Error::Store {
        what: "Node",
        message: e.to_string(),
    })?;
    // the Services it made: a store for the reconciles to read, whose every change also triggers their owner
    let (services, service_writer) = reflector::store();
    let managed =
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"));
    let owned_services = reflector(
        service_writer,
        watcher(Api::<Service>::all(client.clone()), managed)
            .modify(|s: &mut Service| s.managed_fields_mut().clear()),
    )
    .default_backoff()
    .touched_objects();
    let version = client.apiserver_version().await.map_err(Error::from_kube)?;
    let classed_services = settings.backing_service.classed(&version);
    info!(
        apiserver = %version.git_version,
        backing_service = if classed_services.is_some() { "LoadBalancer (classed, no node ports) where the cloud needs none" } else { "NodePort" },
        "backing Services"
    );
    let reporter = Reporter {
        controller: settings.controller_name.clone(),
        instance: None,
    };
    let (resync, resync_rx) = futures::channel::mpsc::unbounded();
    let ctx = Arc::new(Context {
        client: client.clone(),
        metrics: metrics.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        pools,
        nodes,
        services,
        slices: slices.clone(),
        factory,
        allocators: Mutex::new(HashMap::new()),
        backoff: backoff::Backoff::default(),
        written: written::WrittenStatuses::default(),
        settings: settings.clone(),
        fence,
        classed_services,
        resync,
    });
    let shutdown = shutdown.shared();
    let config = ControllerConfig::default().concurrency(settings.concurrency);

    // SharedLBs as the store keeps them: without what the operator never reads
    let (slb_store, slb_writer) = reflector::store();
    let slb_stream = reflector(
        slb_writer,
        watcher(slb_api.clone(), watcher::Config::default()).modify(trim_shared_lb),
    )
    .default_backoff()
    .touched_objects();
    let slb_controller =
        Controller::for_stream(slb_stream, slb_store.clone()).with_config(config.clone());
    let slbs_by_namespace = slb_store.clone();
    let (slice_tx, slice_owners) = futures::channel::mpsc::unbounded();
    let audit_owners = resync_rx;
    let slice_watch = tokio::spawn(follow_slices(ctx.clone(), slice_tx));
    let slbs = slb_controller
        .owns_stream(owned_services)
        // a pool that appears or changes retries the SharedLBs waiting on a pool. Changes, not status writes: the
        // pool's status follows every allocation, and each write would start every unready SharedLB of the pool
        // again (at 1,000 placed at once, several reconciles each, every one asking the cloud)
        .watches_stream(
            watcher(pools_api.clone(), watcher::Config::default())
                .touched_objects()
                .predicate_filter(pool_settings, Default::default()),
            move |pool: LoadBalancerPool| {
                let name = pool.name_any();
                // a local pool's spec also says what its placed SharedLBs may keep (fixed ports, endpoints)
                let local = pool.spec.provider.local.is_some();
                let placed_here = move |s: &SharedLB| {
                    s.status.as_ref().and_then(|st| st.pool.as_ref()) == Some(&name)
                };
                let name = pool.name_any();
                slb_store
                    .state()
                    .into_iter()
                    .filter(|s| {
                        let waiting =
                            !status::is_ready(s) && s.spec.pool.as_ref().is_none_or(|p| *p == name);
                        waiting || (local && placed_here(s))
                    })
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        // a namespace's labels decide which pools admit it: its SharedLBs are looked at again when they change
        .watches(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            move |ns: Namespace| {
                let name = ns.name_any();
                slbs_by_namespace
                    .state()
                    .into_iter()
                    .filter(|s| s.namespace().as_deref() == Some(name.as_str()))
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        // endpoints changed: providers that forward to endpoints (local) update their listeners in place
        // and the drift audit's repairs
        .reconcile_on(futures::stream::select(slice_owners, audit_owners))
        .graceful_shutdown_on(shutdown.clone())
        .run(
            |obj, ctx: Arc<Context>| async move {
                let key = backoff_key(&*obj);
                measured(
                    "sharedlb",
                    &key,
                    ctx.clone(),
                    shared_lb::reconcile(obj, ctx.clone()),
                )
                .await
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "SharedLB reconcile failed");
            }
            futures::future::ready(())
        });

    let pool_config = config.debounce(Duration::from_millis(500));
    let pools_loop = Controller::new(pools_api, watcher::Config::default())
        .with_config(pool_config)
        // allocations change a pool's status: map each SharedLB to its pool (deduplicated by the queue)
        .watches(slb_api, watcher::Config::default(), |slb: SharedLB| {
            slb.status
                .and_then(|s| s.pool)
                .map(|p| ObjectRef::<LoadBalancerPool>::new(&p))
        })
        .graceful_shutdown_on(shutdown)
        .run(
            |obj, ctx: Arc<Context>| async move {
                let key = backoff_key(&*obj);
                measured(
                    "loadbalancerpool",
                    &key,
                    ctx.clone(),
                    pool::reconcile(obj, ctx.clone()),
                )
                .await
            },
            error_policy,
            ctx.clone(),
        )
        .for_each(|r| {
            if let Err(e) = r {
                warn!(error = %e, "LoadBalancerPool reconcile failed");
            }
            futures::future::ready(())
        });

    // node changes reach every provider (target registration), checked every few seconds
    let node_sync = tokio::spawn(sync_nodes(ctx.clone()));
    // an endpoint passing or failing its health checks: its SharedLB's status says so
    let health_watch = tokio::spawn(follow_health(ctx.clone()));
    // listener traffic counters, for providers that carry traffic themselves
    let sampler = {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                let allocators = ctx.all_allocators().await;
                let mut rows = Vec::new();
                for a in allocators {
                    ctx.metrics.set_api_calls(
                        &a.pool,
                        a.provider().kind(),
                        &a.provider().api_calls(),
                    );
                    rows.extend(
                        a.provider()
                            .listener_stats()
                            .await
                            .into_iter()
                            .map(|r| (a.pool.clone(), r)),
                    );
                }
                ctx.metrics.set_listeners(&rows);
                if let Some(f) = ctx.factory.forwarder() {
                    let (limits, now) = f.budget();
                    ctx.metrics.set_forwarder(limits, now);
                }
            }
        })
    };
    metrics.set_ready(true);
    info!(cluster_id = %settings.cluster_id, "sharedlb controllers started");
    futures::join!(slbs, pools_loop);
    sampler.abort();
    health_watch.abort();
    slice_watch.abort();
    node_sync.abort();
    node_reflector.abort();
    pool_reflector.abort();
    info!("sharedlb controllers stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::version::Info;

    use super::BackingService;
    use crate::model::ClassedServices;

    fn version(major: &str, minor: &str) -> Info {
        Info {
            major: major.into(),
            minor: minor.into(),
            ..Info::default()
        }
    }

    #[test]
    fn auto_makes_classed_services_from_kubernetes_1_24() {
        let auto = BackingService::Auto;
        let named = Some(ClassedServices { class_field: true });
        assert_eq!(auto.classed(&version("1", "20")), None);
        assert_eq!(auto.classed(&version("1", "23+")), None);
        assert_eq!(auto.classed(&version("1", "24")), named);
        assert_eq!(auto.classed(&version("1", "36+")), named);
        assert_eq!(
            auto.classed(&version("", "")),
            None,
            "unknown: the path every cluster has"
        );
        assert_eq!(BackingService::NodePort.classed(&version("1", "36")), None);
        // forced on a cluster whose apiserver refuses the class field in an apply
        let forced = BackingService::LoadBalancerClass;
        assert_eq!(
            forced.classed(&version("1", "20")),
            Some(ClassedServices { class_field: false })
        );
        assert_eq!(forced.classed(&version("1", "21")), named);
    }
}
