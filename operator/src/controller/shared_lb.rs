//! Reconciling one SharedLB: validate -> pool -> allocate (durably, before any cloud call) -> Service -> cloud ->
//! Ready. Deletion: listeners removed (owner-checked) -> ports freed -> empty load balancers deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use sharedlb_crds::{
    FINALIZER, LoadBalancerPool, POOL_FINALIZER, SharedLB, SharedLBStatus, service_name,
    validate_pool, validate_shared_lb,
};
use sharedlb_placement::{Action as PlanAction, Allocation, Change, PortMode, PortRequest};
use sharedlb_providers::ProviderError;
use tracing::{info, instrument, warn};

use super::Context;
use super::status::{self, ALLOCATED, PROGRAMMED, READY};
use crate::Error;
use crate::allocator::{PoolAllocator, allocation_from_status, protocol_to_placement};
use crate::model::{self, ListenerId};
use crate::telemetry::PoolLabels;

const FIELD_MANAGER: &str = "sharedlb";
/// A refused allocation is tried again this often (capacity may have been freed).
const RETRY_REFUSED: Duration = Duration::from_secs(30);
/// Ready SharedLBs are checked against the cloud this often (drift).
const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(slb: Arc<SharedLB>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<SharedLB> =
        Api::namespaced(ctx.client.clone(), &slb.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, slb, |event| async {
        match event {
            FinalizerEvent::Apply(o) => apply(o, ctx.clone()).await,
            FinalizerEvent::Cleanup(o) => cleanup(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(super::finalizer_error)
}

/// A refusal: bad input, a missing or closed pool, no room. Conditions, one Event when it first happens, no cloud call.
struct Refusal {
    allocated: bool,
    /// The SharedLB was taken out of its pool: its status no longer names a place.
    released: bool,
    reason: String,
    message: String,
    requeue: Option<Duration>,
}

impl Refusal {
    fn new(reason: &str, message: impl Into<String>) -> Self {
        Refusal {
            allocated: false,
            released: false,
            reason: reason.into(),
            message: message.into(),
            requeue: None,
        }
    }
    fn retry(mut self, after: Duration) -> Self {
        self.requeue = Some(after);
        self
    }
}

#[instrument(skip_all, fields(shared_lb = %format!("{}/{}", slb.namespace().unwrap_or_default(), slb.name_any())))]
async fn apply(slb: Arc<SharedLB>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = slb.name_any();
    if let Err(e) = validate_shared_lb(&name, &slb.spec) {
        return refuse(&ctx, &slb, Refusal::new(e.reason(), e.to_string())).await;
    }
    let pool = match resolve_pool(&ctx, &slb).await? {
        Ok(p) => p,
        Err(r) => return refuse(&ctx, &slb, r).await,
    };
    let pool_name = pool.name_any();
    // Nothing is placed in a pool before it carries its finalizer: otherwise a pool deleted right after its
    // first use would go without deleting its load balancers. The pool controller adds it within moments.
    if !pool.finalizers().iter().any(|f| f == POOL_FINALIZER) {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let status = slb.status.clone().unwrap_or_default();
    if let Some(old) = status
        .pool
        .as_ref()
        .filter(|p| **p != pool_name && status.load_balancer.is_some())
    {
        let msg = format!(
            "this SharedLB is placed in pool {old:?}; placements never move, so changing the pool to {pool_name:?} is refused: delete and re-create it to move"
        );
        return refuse(&ctx, &slb, Refusal::new("PoolChangeRefused", msg)).await;
    }
    if !namespace_admitted(&ctx, &pool, &slb).await? {
        return not_admitted(&ctx, &slb, &pool).await;
    }
    let alloc = match ctx.allocator(&pool).await {
        Ok(a) => a,
        Err(Error::Provider(e)) => {
            let msg = format!("pool {pool_name:?} cannot be used: {}", e.tenant_message());
            return refuse(
                &ctx,
                &slb,
                Refusal::new("PoolNotReady", msg).retry(e.retry_after().unwrap_or(RETRY_REFUSED)),
            )
            .await;
        }
        Err(e) => return Err(e),
    };

    let placement = allocate(&ctx, &slb, &alloc, &pool).await?;
    if let Some(why) = alloc.take_rejected(&slb.uid().unwrap_or_default()) {
        let message = format!("{why}; it is placed as if new");
        ctx.event(&*slb, EventType::Warning, "ClaimRejected", message)
            .await;
    }
    match placement {
        Placement::Held {
            allocation,
            refused,
            written,
        } => {
            let slb = match written {
                Some(st) => Arc::new(SharedLB {
                    status: Some(*st),
                    ..(*slb).clone()
                }),
                None => slb,
            };
            program(&ctx, &slb, &alloc, &pool, &allocation, refused).await
        }
        Placement::Refused(r) => refuse(&ctx, &slb, r).await,
    }
}

fn pool_mode(alloc: &PoolAllocator) -> PortMode {
    alloc.provider().limits().port_mode
}

/// Where allocation left a SharedLB.
enum Placement {
    /// It holds `allocation` (durably recorded in its status). `refused`: its update could not be made, so it
    /// keeps — and is served on — the allocation it had.
    Held {
        allocation: Allocation,
        refused: Option<Refusal>,
        /// The status this reconcile wrote, when it wrote one: what follows starts from it, not from the object
        /// as it was read (whose status predates the allocation, and would write it away).
        written: Option<Box<SharedLBStatus>>,
    },
    /// It holds nothing and cannot be placed.
    Refused(Refusal),
}

/// Places the SharedLB (or finds its place) and makes the allocation durable before any cloud call.
async fn allocate(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &Arc<PoolAllocator>,
    pool: &LoadBalancerPool,
) -> Result<Placement, Error> {
    let uid = slb.uid().unwrap_or_default();
    let requests: Vec<PortRequest> = slb
        .spec
        .ports
        .iter()
        .map(|p| PortRequest {
            name: p.name.clone(),
            port: p.port.and_then(|x| u16::try_from(x).ok()),
            protocol: protocol_to_placement(p.protocol),
        })
        .collect();
    let mut state = alloc.lock(&ctx.client, &pool.spec).await?;
    if alloc.is_closed() {
        let msg = format!("LoadBalancerPool {:?} is being deleted", pool.name_any());
        return Ok(Placement::Refused(Refusal::new("PoolDeleting", msg)));
    }
    let plan = state.plan(&[Change::Upsert {
        key: uid.clone(),
        ports: requests,
    }]);
    if let Some((_, r)) = plan.refused.first() {
        let refusal = Refusal::new(r.reason(), r.to_string()).retry(RETRY_REFUSED);
        return Ok(match state.allocation(&uid) {
            Some(a) => Placement::Held {
                allocation: a.clone(),
                refused: Some(refusal),
                written: None,
            },
            None => Placement::Refused(refusal),
        });
    }
    let Some(allocation) = plan
        .placed
        .first()
        .map(|(_, a)| a.clone())
        .or_else(|| state.allocation(&uid).cloned())
    else {
        return Err(Error::Planner(format!(
            "an upsert of {uid} was neither placed nor refused"
        )));
    };
    let recorded = slb
        .status
        .as_ref()
        .and_then(|s| allocation_from_status(s, &alloc.pool));
    if recorded.as_ref() == Some(&allocation) {
        state.apply(&plan);
        drop(state);
        delete_in_background(alloc, &plan);
        return Ok(Placement::Held {
            allocation,
            refused: None,
            written: None,
        });
    }
    // A fresh placement is reserved in memory under the lock and written outside it: placement in a pool is
    // serialised, its status writes are not. The write still comes before any cloud call; if it fails, the
    // reservation is rolled back (nothing durable, nothing in the cloud). An update of a placed SharedLB is
    // written under the lock, as its rollback would have to restore the old ports.
    let written = if state.allocation(&uid).is_none() {
        state.apply(&plan);
        drop(state);
        match write_allocation(ctx, slb, alloc, &allocation).await {
            Ok(st) => st,
            Err(e) => {
                let mut state = alloc.lock(&ctx.client, &pool.spec).await?;
                if state.allocation(&uid) == Some(&allocation) {
                    let undo = state.plan(&[Change::Remove { key: uid.clone() }]);
                    state.apply(&undo);
                }
                let doomed = state.deleting();
                drop(state);
                if let Err(d) = alloc.delete_marked(doomed).await {
                    warn!(error = %d, "deleting an empty load balancer failed; the pool retries");
                }
                return Err(e);
            }
        }
    } else {
        let st = write_allocation(ctx, slb, alloc, &allocation).await?;
        state.apply(&plan);
        drop(state);
        st
    };
    delete_in_background(alloc, &plan);
    allocated_event(ctx, slb, alloc, &allocation).await;
    Ok(Placement::Held {
        allocation,
        refused: None,
        written: Some(Box::new(written)),
    })
}

/// Empty load balancers a plan marked for deletion go in the background (the pool retries what fails).
fn delete_in_background(alloc: &Arc<PoolAllocator>, plan: &sharedlb_placement::Plan) {
    let doomed: Vec<u32> = plan
        .actions
        .iter()
        .filter_map(|a| match a {
            PlanAction::DeleteLoadBalancer { lb } => Some(*lb),
            _ => None,
        })
        .collect();
    if doomed.is_empty() {
        return;
    }
    let a = alloc.clone();
    tokio::spawn(async move {
        if let Err(e) = a.delete_marked(doomed).await {
            warn!(error = %e, pool = %a.pool, "deleting an empty load balancer failed; the pool retries");
        }
    });
}

async fn allocated_event(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    allocation: &Allocation,
) {
    let labels = PoolLabels {
        pool: alloc.pool.clone(),
    };
    ctx.metrics.allocations.get_or_create(&labels).inc();
    let ports: Vec<String> = allocation
        .ports
        .iter()
        .map(|p| format!("{}/{}", p.port, p.protocol.as_str()))
        .collect();
    let lb = alloc.lb_name(allocation.lb);
    ctx.event(
        slb,
        EventType::Normal,
        "Allocated",
        format!("placed on {lb} ports {}", ports.join(",")),
    )
    .await;
}

/// Writes the allocation to status with a resourceVersion precondition: a stale view of the object fails with
/// 409 instead of overwriting what a newer reconcile (or another leader) wrote.
async fn write_allocation(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    allocation: &Allocation,
) -> Result<SharedLBStatus, Error> {
    let old = slb.status.clone().unwrap_or_default();
    let info = alloc.info(allocation.lb);
    let st = model::allocated_status(
        &old,
        &alloc.pool,
        &alloc.lb_name(allocation.lb),
        info.as_ref(),
        allocation,
        slb.meta().generation,
    );
    send_status(ctx, slb, &st, Precondition::ResourceVersion).await?;
    Ok(st)
}

enum Precondition {
    /// The patch fails with 409 (`Error::Conflict`) unless the object is still at the version reconciled.
    ResourceVersion,
    None,
}

/// Replaces the whole status by a merge patch (cleared fields as explicit nulls).
async fn send_status(
    ctx: &Context,
    slb: &SharedLB,
    st: &SharedLBStatus,
    pre: Precondition,
) -> Result<(), Error> {
    ctx.fence.check()?;
    let mut patch = status::whole_status_patch(st, status::SHARED_LB_STATUS_KEYS)?;
    if let Precondition::ResourceVersion = pre {
        patch["metadata"] = json!({ "resourceVersion": slb.resource_version() });
    }
    let api: Api<SharedLB> =
        Api::namespaced(ctx.client.clone(), &slb.namespace().unwrap_or_default());
    api.patch_status(
        &slb.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::from_kube)?;
    Ok(())
}

/// Deploys the model of a placed SharedLB, comparing with what is there, on every reconcile: listeners the
/// cloud holds for it and should not are removed, the Service is applied if it differs, the load balancer and
/// every wanted listener are ensured, the status says where it is served. `refused`: an update that could not be
/// made; the allocation it has is still deployed, and Ready says why the update was not.
async fn program(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    pool: &LoadBalancerPool,
    allocation: &Allocation,
    refused: Option<Refusal>,
) -> Result<Action, Error> {
    let uid = slb.uid().unwrap_or_default();
    // a freed port is closed first, whatever else fails after
    if let Err(e) = withdraw_stale(alloc, &uid, &model::wanted_listeners(slb, allocation)).await {
        return cloud_failed(ctx, slb, e).await;
    }
    // The Service before the cloud: the apiserver is the last judge of the input (a foreign Service of that
    // name, a node port it refuses), and what it refuses must not have made anything in the cloud.
    let node_ports = match deploy_service(ctx, slb, allocation, pool_mode(alloc)).await? {
        ServiceOutcome::Applied(p) => p,
        ServiceOutcome::Refused { reason, message } => {
            let taken = taken_node_ports(&message);
            // a placement that never served traffic may still move: placed again, around the taken ports
            let never_served = !is_ready(slb) && alloc.listeners_of(&uid).is_empty();
            if reason == NODE_PORT_TAKEN && !taken.is_empty() && never_served {
                return place_again_around(ctx, slb, alloc, pool, &taken, &message).await;
            }
            let r = Refusal {
                allocated: true,
                ..Refusal::new(reason, message).retry(RETRY_REFUSED)
            };
            return refuse(ctx, slb, r).await;
        }
    };
    let key = alloc.key(allocation.lb);
    let info = match alloc.provider().ensure_load_balancer(&key).await {
        Ok(i) => i,
        Err(e) => return cloud_failed(ctx, slb, e).await,
    };
    alloc.remember(allocation.lb, info.clone());
    let endpoints = if alloc.provider().forwards_to_endpoints() {
        let ns = slb.namespace().unwrap_or_default();
        ctx.slices
            .ready_endpoints(&ctx.client, &ns, &service_name(&slb.name_any()))
            .await?
    } else {
        model::Endpoints::new()
    };
    let listeners = model::desired_listeners(slb, allocation, &node_ports, &endpoints)?;
    for l in &listeners {
        let id = ListenerId {
            lb: allocation.lb,
            port: l.port,
            protocol: l.protocol,
        };
        alloc.note_listener(&uid, id);
        if let Err(e) = alloc.provider().ensure_listener(&key, l).await {
            return cloud_failed(ctx, slb, e).await;
        }
    }
    let served = model::Served {
        pool: &alloc.pool,
        lb_name: alloc.lb_name(allocation.lb),
        info: &info,
        service_name: service_name(&slb.name_any()),
    };
    let old = slb.status.clone().unwrap_or_default();
    let refused_why = refused
        .as_ref()
        .map(|r| (r.reason.as_str(), r.message.as_str()));
    let st = model::programmed_status(
        &old,
        &served,
        &listeners,
        allocation,
        slb.meta().generation,
        refused_why,
    );
    write_status_if_changed(ctx, slb, &old, &st).await?;
    if let Some(r) = refused {
        if ready_reason_changed(&old, &r) {
            warn!(reason = %r.reason, message = %r.message, "update refused; the current allocation stays served");
            ctx.event(slb, EventType::Warning, &r.reason, r.message.clone())
                .await;
        }
        return Ok(Action::requeue(RETRY_REFUSED));
    }
    if !status::is_ready(slb) {
        let ready = status::get(&st.conditions, READY).map(|c| c.message.clone());
        info!(message = ready.as_deref().unwrap_or_default(), "ready");
        ctx.event(
            slb,
            EventType::Normal,
            "Programmed",
            ready.unwrap_or_default(),
        )
        .await;
    }
    Ok(Action::requeue(RESYNC))
}

/// Removes every listener the cloud may hold for `owner_uid` that is not in `wanted`. Each removal is checked
/// against the owner the cloud records, so a port another SharedLB holds by now is left alone.
async fn withdraw_stale(
    alloc: &PoolAllocator,
    owner_uid: &str,
    wanted: &BTreeSet<ListenerId>,
) -> Result<(), ProviderError> {
    for id in model::stale_listeners(&alloc.listeners_of(owner_uid), wanted) {
        alloc
            .provider()
            .remove_listener(&alloc.key(id.lb), id.port, id.protocol, owner_uid)
            .await?;
        alloc.forget_listener(owner_uid, id);
    }
    Ok(())
}

fn ready_reason_changed(old: &SharedLBStatus, r: &Refusal) -> bool {
    status::get(&old.conditions, READY)
        .is_none_or(|c| c.status != "False" || c.reason != r.reason || c.message != r.message)
}

fn status_equal(a: &SharedLBStatus, b: &SharedLBStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.pool == b.pool
        && a.load_balancer == b.load_balancer
        && a.ports == b.ports
        && a.service_name == b.service_name
        && a.port_summary == b.port_summary
        && status::same_conditions(&a.conditions, &b.conditions)
}

async fn write_status_if_changed(
    ctx: &Context,
    slb: &SharedLB,
    old: &SharedLBStatus,
    new: &SharedLBStatus,
) -> Result<(), Error> {
    if status_equal(old, new) {
        return Ok(());
    }
    send_status(ctx, slb, new, Precondition::None).await
}

/// Ready=False with a reason, an Event when the reason or message is new, and no cloud call. The allocation
/// fields stay as they are: a refused update keeps the old, working placement.
async fn refuse(ctx: &Context, slb: &SharedLB, r: Refusal) -> Result<Action, Error> {
    let old = slb.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let generation = slb.meta().generation;
    st.observed_generation = generation;
    let changed = status::get(&old.conditions, READY)
        .is_none_or(|c| c.reason != r.reason || c.message != r.message);
    if r.released {
        st.pool = None;
        st.load_balancer = None;
        st.ports = Vec::new();
        st.port_summary = None;
        st.service_name = None;
    }
    if !r.allocated {
        status::set(
            &mut st.conditions,
            ALLOCATED,
            false,
            &r.reason,
            &r.message,
            generation,
        );
    }
    status::set(
        &mut st.conditions,
        READY,
        false,
        &r.reason,
        &r.message,
        generation,
    );
    write_status_if_changed(ctx, slb, &old, &st).await?;
    if changed {
        warn!(reason = %r.reason, message = %r.message, "refused");
        ctx.event(slb, EventType::Warning, &r.reason, r.message.clone())
            .await;
    }
    Ok(r.requeue.map_or_else(Action::await_change, Action::requeue))
}

/// A cloud call failed: Programmed=False with the cloud's message (without the account's ids: the namespace
/// reads it), an Event, and the error, whole, for the log and the retry policy.
async fn cloud_failed(
    ctx: &Context,
    slb: &SharedLB,
    e: sharedlb_providers::ProviderError,
) -> Result<Action, Error> {
    if let ProviderError::Fenced(_) = e {
        return Err(Error::Fenced); // not this replica's to report
    }
    let old = slb.status.clone().unwrap_or_default();
    let mut st = old.clone();
    let generation = slb.meta().generation;
    let message = e.tenant_message();
    let changed = status::get(&old.conditions, PROGRAMMED)
        .is_none_or(|c| c.reason != e.reason() || c.message != message);
    status::set(
        &mut st.conditions,
        PROGRAMMED,
        false,
        e.reason(),
        &message,
        generation,
    );
    status::set(
        &mut st.conditions,
        READY,
        false,
        e.reason(),
        &message,
        generation,
    );
    write_status_if_changed(ctx, slb, &old, &st).await?;
    if changed {
        ctx.event(slb, EventType::Warning, e.reason(), message)
            .await;
    }
    Err(Error::Provider(e))
}

/// The pool this SharedLB uses, or why it cannot use one.
async fn resolve_pool(
    ctx: &Context,
    slb: &SharedLB,
) -> Result<Result<Arc<LoadBalancerPool>, Refusal>, Error> {
    let pool = match &slb.spec.pool {
        Some(n) => match ctx.pools.get(&ObjectRef::new(n)) {
            Some(p) => p,
            None => {
                return Ok(Err(Refusal::new(
                    "PoolNotFound",
                    format!("LoadBalancerPool {n:?} does not exist"),
                )));
            }
        },
        None => {
            let mut defaults: Vec<_> = ctx
                .pools
                .state()
                .into_iter()
                .filter(|p| p.spec.default)
                .collect();
            defaults.sort_by_key(|p| p.name_any());
            match defaults.len() {
                0 => {
                    return Ok(Err(Refusal::new(
                        "NoDefaultPool",
                        "spec.pool is empty and no LoadBalancerPool is marked default",
                    )));
                }
                1 => defaults.remove(0),
                _ => {
                    let names: Vec<String> = defaults.iter().map(|p| p.name_any()).collect();
                    return Ok(Err(Refusal::new(
                        "AmbiguousDefaultPool",
                        format!(
                            "spec.pool is empty and several pools are marked default: {}",
                            names.join(", ")
                        ),
                    )));
                }
            }
        }
    };
    if pool.metadata.deletion_timestamp.is_some() {
        return Ok(Err(Refusal::new(
            "PoolDeleting",
            format!("LoadBalancerPool {:?} is being deleted", pool.name_any()),
        )));
    }
    if let Err(e) = validate_pool(&pool.spec) {
        return Ok(Err(Refusal::new(
            "PoolInvalid",
            format!("LoadBalancerPool {:?}: {e}", pool.name_any()),
        )));
    }
    Ok(Ok(pool))
}

/// Whether the pool admits the SharedLB's namespace (its `namespaceSelector` on the Namespace's labels).
async fn namespace_admitted(
    ctx: &Context,
    pool: &LoadBalancerPool,
    slb: &SharedLB,
) -> Result<bool, Error> {
    let Some(sel) = &pool.spec.namespace_selector else {
        return Ok(true);
    };
    let ns = slb.namespace().unwrap_or_default();
    let labels = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&ns)
        .await
        .map_err(Error::from_kube)?
        .and_then(|n| n.metadata.labels)
        .unwrap_or_default();
    Ok(model::selector_matches(sel, &labels))
}

/// A SharedLB whose namespace the pool does not admit is not served: if it holds a place there (its namespace
/// lost admission), the place is released — listeners withdrawn, ports freed — and it is placed again, as new,
/// once the namespace is admitted again. Holding nothing, it blocks nothing (the pool's deletion included).
async fn not_admitted(
    ctx: &Context,
    slb: &SharedLB,
    pool: &LoadBalancerPool,
) -> Result<Action, Error> {
    let ns = slb.namespace().unwrap_or_default();
    let msg = format!(
        "LoadBalancerPool {:?} does not admit namespace {ns:?}",
        pool.name_any()
    );
    let placed_here = slb
        .status
        .as_ref()
        .is_some_and(|s| s.pool.as_deref() == Some(pool.name_any().as_str()));
    if !placed_here {
        let said = slb
            .status
            .as_ref()
            .and_then(|s| status::get(&s.conditions, READY))
            .is_some_and(|c| c.reason == "NamespaceNotAllowed");
        if said {
            // already told (maybe with what was withdrawn): a second, shorter message would only churn
            return Ok(Action::requeue(RETRY_REFUSED));
        }
        return refuse(ctx, slb, Refusal::new("NamespaceNotAllowed", msg)).await;
    }
    let alloc = ctx.allocator(pool).await?;
    release(ctx, slb, &alloc, pool, &[]).await?;
    let message = format!(
        "{msg}: its listeners are withdrawn and its ports released; it is placed again once the namespace is admitted"
    );
    let r = Refusal {
        released: true,
        ..Refusal::new("NamespaceNotAllowed", message).retry(RETRY_REFUSED)
    };
    refuse(ctx, slb, r).await
}

/// What became of the backing Service.
enum ServiceOutcome {
    /// The apiserver has it as the model says: its node ports by port name.
    Applied(BTreeMap<String, u16>),
    /// The apiserver, or a Service of that name that this SharedLB did not make, stands in the way: the user's
    /// to fix, told by a condition and an Event.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Makes the backing NodePort Service what the model says, writing only when it differs. A Service of that name
/// that this SharedLB did not create is never taken over.
async fn deploy_service(
    ctx: &Context,
    slb: &SharedLB,
    allocation: &Allocation,
    mode: PortMode,
) -> Result<ServiceOutcome, Error> {
    let ns = slb.namespace().unwrap_or_default();
    let name = service_name(&slb.name_any());
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = api.get_opt(&name).await.map_err(Error::from_kube)?;
    if let Some(s) = &existing
        && !model::made_by(s, &slb.uid().unwrap_or_default())
    {
        let message = format!(
            "Service {ns}/{name} already exists and was not created by this SharedLB; sharedlb does not take over Services it did not make"
        );
        return Ok(ServiceOutcome::Refused {
            reason: "ServiceConflict",
            message,
        });
    }
    let want = model::backing_service(slb, allocation, mode, existing.as_ref());
    if let Some(s) = existing.filter(|s| model::service_is_current(s, &want)) {
        return Ok(ServiceOutcome::Applied(model::node_ports(&s)));
    }
    ctx.fence.check()?;
    let applied = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&want),
        )
        .await;
    match applied {
        Ok(a) => Ok(ServiceOutcome::Applied(model::node_ports(&a))),
        // passthrough: the node port must be the external port, and another Service holds it
        Err(kube::Error::Api(e)) if e.code == 422 && e.message.contains("already allocated") => {
            Ok(ServiceOutcome::Refused {
                reason: NODE_PORT_TAKEN,
                message: format!(
                    "the Service {ns}/{name} cannot have its node port equal to the external port: {}; on this cloud the external port is the node port, so another Service outside sharedlb holds it",
                    e.message
                ),
            })
        }
        // anything else the apiserver finds wrong with it (a fixed port outside its node-port range on a
        // passthrough cloud, ...) is the user's to fix: a condition and an Event, not a silent retry loop
        Err(kube::Error::Api(e)) if e.code == 422 => Ok(ServiceOutcome::Refused {
            reason: "ServiceInvalid",
            message: format!(
                "the apiserver refused the backing Service {ns}/{name}: {}",
                e.message
            ),
        }),
        Err(e) => Err(Error::from_kube(e)),
    }
}

const NODE_PORT_TAKEN: &str = "NodePortTaken";

fn is_ready(slb: &SharedLB) -> bool {
    slb.status
        .as_ref()
        .and_then(|s| status::get(&s.conditions, READY))
        .is_some_and(|c| c.status == "True")
}

/// The node ports the apiserver says are taken: `...nodePort: Invalid value: 31500: provided port is already
/// allocated` (one such cause per port).
fn taken_node_ports(msg: &str) -> Vec<u16> {
    msg.split("Invalid value: ")
        .skip(1)
        .filter_map(|part| {
            let (num, rest) = part.split_once(':')?;
            rest.trim_start()
                .starts_with("provided port is already allocated")
                .then(|| num.trim().parse().ok())?
        })
        .collect()
}

/// On a passthrough cloud another Service holds a node port this SharedLB was given, before it ever served:
/// the ports are blocked in the pool, the placement released, and the next reconcile places it again around them.
async fn place_again_around(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    pool: &LoadBalancerPool,
    taken: &[u16],
    msg: &str,
) -> Result<Action, Error> {
    release(ctx, slb, alloc, pool, taken).await?;
    let message = format!("{msg}; placing it again on another port");
    let r = Refusal {
        released: true,
        ..Refusal::new(NODE_PORT_TAKEN, message).retry(Duration::from_millis(200))
    };
    refuse(ctx, slb, r).await
}

/// Takes the SharedLB out of its pool: its ports freed (`block`: ports kept from anyone after it, on passthrough
/// clouds), every listener the cloud may hold for it removed, load balancers left empty deleted, its Service
/// deleted (on passthrough clouds its node ports are external ports of the pool). The caller says why in the
/// status. A removal that fails is tried again by the next reconcile (the ledger keeps it).
async fn release(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    pool: &LoadBalancerPool,
    block: &[u16],
) -> Result<(), Error> {
    let uid = slb.uid().unwrap_or_default();
    // what it holds goes first, the ports last: a port is never free while something of this SharedLB still
    // answers on it; a failure stops here (the status still names the place) and the next reconcile goes on
    let held = alloc
        .lock(&ctx.client, &pool.spec)
        .await?
        .allocation(&uid)
        .cloned();
    if let Some(a) = &held {
        note_listeners(alloc, &uid, a);
    }
    note_recorded_listeners(alloc, slb);
    withdraw_stale(alloc, &uid, &BTreeSet::new()).await?;
    let ns = slb.namespace().unwrap_or_default();
    let name = service_name(&slb.name_any());
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    if let Some(svc) = services.get_opt(&name).await.map_err(Error::from_kube)?
        && model::made_by(&svc, &uid)
    {
        ctx.fence.check()?;
        services
            .delete(&name, &Default::default())
            .await
            .map_err(Error::from_kube)?;
    }
    let mut state = alloc.lock(&ctx.client, &pool.spec).await?;
    let plan = state.plan(&[Change::Remove { key: uid.clone() }]);
    state.apply(&plan);
    for p in block {
        state.block_port(*p);
    }
    let doomed = state.deleting();
    drop(state);
    if let Err(e) = alloc.delete_marked(doomed).await {
        warn!(error = %e, "deleting an empty load balancer failed; the pool retries");
    }
    Ok(())
}

/// The listeners the SharedLB's status records go into the ledger: the cloud may hold them (written before a
/// restart) even where this process never made them.
fn note_recorded_listeners(alloc: &PoolAllocator, slb: &SharedLB) {
    let uid = slb.uid().unwrap_or_default();
    let recorded = slb
        .status
        .as_ref()
        .and_then(|s| allocation_from_status(s, &alloc.pool));
    if let Some(a) = &recorded {
        note_listeners(alloc, &uid, a);
    }
}

fn note_listeners(alloc: &PoolAllocator, uid: &str, a: &Allocation) {
    for p in &a.ports {
        let id = ListenerId {
            lb: a.lb,
            port: p.port,
            protocol: p.protocol,
        };
        alloc.note_listener(uid, id);
    }
}

/// Deletion: remove the listeners this SharedLB owns, free its ports, delete load balancers left empty.
#[instrument(skip_all, fields(shared_lb = %format!("{}/{}", slb.namespace().unwrap_or_default(), slb.name_any())))]
async fn cleanup(slb: Arc<SharedLB>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = slb.uid().unwrap_or_default();
    let status = slb.status.clone().unwrap_or_default();
    let Some(pool_name) = status.pool.clone() else {
        return Ok(Action::await_change());
    };
    let alloc = match ctx.pools.get(&ObjectRef::new(&pool_name)) {
        Some(pool) => match ctx.allocator(&pool).await {
            Ok(a) => Some((a, pool)),
            Err(Error::Provider(e)) => return cloud_failed(&ctx, &slb, e).await,
            Err(e) => return Err(e),
        },
        None => None,
    };
    let Some((alloc, pool)) = alloc else {
        // The pool is gone, and with it the way to reach its cloud: nothing left to free here.
        warn!(pool = %pool_name, "the SharedLB's pool no longer exists; releasing without cloud calls");
        return Ok(Action::await_change());
    };
    // The listeners first, each only if this SharedLB owns it; then the ports; a crash in between converges:
    // removal is idempotent and the rebuild skips objects being deleted. Removed: what the allocation holds,
    // what the status records, and whatever else the cloud may hold for it (a removal that failed before).
    let state = alloc.lock(&ctx.client, &pool.spec).await?;
    let held = state.allocation(&uid).cloned();
    drop(state);
    if let Some(a) = &held {
        note_listeners(&alloc, &uid, a);
    }
    note_recorded_listeners(&alloc, &slb);
    if let Err(e) = withdraw_stale(&alloc, &uid, &BTreeSet::new()).await {
        return cloud_failed(&ctx, &slb, e).await;
    }
    let mut state = alloc.lock(&ctx.client, &pool.spec).await?;
    let plan = state.plan(&[Change::Remove { key: uid }]);
    state.apply(&plan);
    let doomed: Vec<u32> = state.deleting();
    drop(state);
    if held.is_some() || !status.ports.is_empty() {
        ctx.event(
            &*slb,
            EventType::Normal,
            "Released",
            format!("ports released in pool {pool_name}"),
        )
        .await;
    }
    if let Err(e) = alloc.delete_marked(doomed).await {
        warn!(error = %e, pool = %pool_name, "deleting an empty load balancer failed; the pool retries");
    }
    Ok(Action::await_change())
}
