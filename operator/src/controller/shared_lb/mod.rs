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
    validate_shared_lb,
};
use sharedlb_placement::{Action as PlanAction, Allocation, Change};
use sharedlb_providers::{LoadBalancerInfo, ProviderError};
use tracing::{info, instrument, warn};

use super::Context;
use super::status::{self, ALLOCATED, ENDPOINTS_ACCEPTED, PROGRAMMED, READY};
use super::written::Seen;
use crate::Error;
use crate::allocator::{PoolAllocator, allocation_from_status, spec_port_range};
use crate::endpoints::{Backends, EndpointPolicy};
use crate::model::{self, ListenerId, ServiceKind};
use crate::telemetry::PoolLabels;

mod allocate;
mod moving;
mod pool_choice;
mod release;
mod report;
mod service;

use allocate::{Placement, allocate, delete_in_background};
use pool_choice::{in_lane, namespace_admitted, not_admitted, resolve_pool, withdraw};
use release::{both_places, note_held, note_recorded_listeners, place_again_around, release};
use report::{
    Precondition, Refusal, cloud_failed, is_ready, ready_reason_changed, refuse, send_status,
    write_status_if_changed,
};
use service::{NODE_PORT_TAKEN, ServiceOutcome, deploy_service, publish_ingress, taken_node_ports};

const FIELD_MANAGER: &str = "sharedlb";

/// A refused allocation is tried again this often (capacity may have been freed).
const RETRY_REFUSED: Duration = Duration::from_secs(30);

/// Ready SharedLBs are checked against the cloud this often (drift).
const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(slb: Arc<SharedLB>, ctx: Arc<Context>) -> Result<Action, Error> {
    // the store may not have this replica's last status write yet: start from what was written
    let (slb, seen) = ctx.written.freshen(slb);
    let api: Api<SharedLB> =
        Api::namespaced(ctx.client.clone(), &slb.namespace().unwrap_or_default());
    finalizer(&api, FINALIZER, slb, |event| async {
        match event {
            FinalizerEvent::Apply(o) => apply(o, ctx.clone(), seen).await,
            FinalizerEvent::Cleanup(o) => cleanup(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(super::finalizer_error)
}

#[instrument(skip_all, fields(shared_lb = %format!("{}/{}", slb.namespace().unwrap_or_default(), slb.name_any())))]
async fn apply(slb: Arc<SharedLB>, ctx: Arc<Context>, seen: Seen) -> Result<Action, Error> {
    let name = slb.name_any();
    // an echo of this replica's own write of Ready for this very spec: the cloud was converged for it moments ago
    let converged = seen == Seen::Echo
        && is_ready(&slb)
        && slb.status.as_ref().and_then(|s| s.observed_generation) == slb.meta().generation;
    if let Err(e) = validate_shared_lb(&name, &slb.spec) {
        return refuse(&ctx, &slb, Refusal::new(e.reason(), e.to_string())).await;
    }
    let pool = match resolve_pool(&ctx, &slb) {
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
    if let Err(r) = in_lane(&ctx, &pool, &slb) {
        return withdraw(&ctx, &slb, &pool, r).await;
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

    if slb.spec.proxy_protocol.is_some() && !alloc.provider().supports_proxy_protocol() {
        let message = format!(
            "spec.proxyProtocol: pool {pool_name:?} ({}) delivers the clients' own packets, so it writes no PROXY header: the client address reaches the nodes as it is; remove proxyProtocol",
            alloc.provider().kind()
        );
        // an update a placed SharedLB cannot have: what it has keeps serving, as with any refused update
        let placed = status.pool.as_deref() == Some(pool_name.as_str());
        let r = Refusal {
            allocated: placed,
            ..Refusal::new("ProxyProtocolUnsupported", message)
        };
        return refuse(&ctx, &slb, r).await;
    }
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
            let deploy = Deploy {
                allocation,
                refused,
                converged,
            };
            program(&ctx, &slb, &alloc, &pool, deploy).await
        }
        Placement::Refused(r) => refuse(&ctx, &slb, r).await,
    }
}

/// What `program` deploys.
struct Deploy {
    allocation: Allocation,
    /// An update that could not be made: the allocation it has is still deployed, and Ready says why the update
    /// was not.
    refused: Option<Refusal>,
    /// The reconcile is an echo of this replica's own Ready write for this spec: the cloud is not asked again.
    converged: bool,
}

/// Deploys the model of a placed SharedLB, comparing with what is there, on every reconcile: listeners the
/// cloud holds for it and should not are removed, the Service is applied if it differs, the load balancer and
/// every wanted listener are ensured, the status says where it is served.
async fn program(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &Arc<PoolAllocator>,
    pool: &LoadBalancerPool,
    deploy: Deploy,
) -> Result<Action, Error> {
    let Deploy {
        allocation,
        refused,
        converged,
    } = deploy;
    let allocation = &allocation;
    let uid = slb.uid().unwrap_or_default();
    // a move's old place serves until its grace is over, then goes
    let ended;
    let now = k8s_openapi::jiff::Timestamp::now();
    let slb = match moving::still_serving(slb, &alloc.pool) {
        Some((_, Some(until))) if until <= now => {
            ended = moving::end_move(ctx, slb, alloc, pool).await?;
            &ended
        }
        _ => slb,
    };
    let mut wanted = model::wanted_listeners(slb, allocation);
    let mut next = RESYNC;
    if let Some((old, until)) = moving::still_serving(slb, &alloc.pool) {
        wanted.extend(old);
        if let Some(until) = until {
            let left = Duration::try_from(now.duration_until(until)).unwrap_or_default();
            next = next.min(left + Duration::from_secs(1));
        }
    }
    // a freed port is closed first, whatever else fails after
    if let Err(e) = withdraw_stale(alloc, &uid, &wanted).await {
        return cloud_failed(ctx, slb, e).await;
    }
    // The Service before the cloud: the apiserver is the last judge of the input (a foreign Service of that
    // name, a node port it refuses), and what it refuses must not have made anything in the cloud.
    let kind = alloc.service_kind();
    let arrival_ports = match deploy_service(ctx, slb, allocation, kind).await? {
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
    // A forwarder's endpoints live outside the SharedLB: a slice or pool change whose reconcile coalesced with
    // the echo must still reach the listeners (and the local provider's calls cost no cloud API call).
    if converged && !alloc.provider().forwards_to_endpoints() {
        return Ok(Action::requeue(next));
    }
    let key = alloc.key(allocation.lb);
    let info = match alloc.provider().ensure_load_balancer(&key).await {
        Ok(i) => i,
        Err(e) => return cloud_failed(ctx, slb, e).await,
    };
    alloc.remember(allocation.lb, info.clone());
    let forwards = alloc.provider().forwards_to_endpoints();
    let backends = if forwards {
        let ns = slb.namespace().unwrap_or_default();
        let policy = pool.spec.provider.local.as_ref().map(EndpointPolicy::of);
        ctx.slices
            .ready_endpoints(
                &ctx.client,
                &ns,
                &service_name(&slb.name_any()),
                &policy.unwrap_or_else(EndpointPolicy::cloud),
            )
            .await?
    } else {
        Backends::default()
    };
    let listeners = model::desired_listeners(slb, allocation, &arrival_ports, &backends.ready)?;
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
        node_ports: kind.has_node_ports(),
    };
    if let ServiceKind::Classed(_) = kind {
        publish_ingress(ctx, slb, &info).await?;
    }
    let old = slb.status.clone().unwrap_or_default();
    let refused_why = refused
        .as_ref()
        .map(|r| (r.reason.as_str(), r.message.as_str()));
    let mut st = model::programmed_status(
        &old,
        &served,
        &listeners,
        allocation,
        slb.meta().generation,
        refused_why,
    );
    if forwards {
        report::endpoints_accepted(&mut st, &backends.refused, slb.meta().generation);
        let mut health = report::EndpointHealth::new();
        for l in &listeners {
            let protocol = model::protocol_from_placement(l.protocol);
            if let Some(h) = alloc
                .provider()
                .endpoint_health(&key, l.port, l.protocol)
                .await
            {
                health.insert((i32::from(l.port), protocol), h);
            }
        }
        report::endpoint_health(&mut st, &old, &health, slb.meta().generation);
    }
    // a move's new listeners are made: the status shows the new address now, the old one for the grace
    let switched = moving::switch(slb, &mut st);
    write_status_if_changed(ctx, slb, &old, &st).await?;
    for type_ in [ENDPOINTS_ACCEPTED, READY] {
        let c = report::newly_false(&old, &st, type_);
        if let Some(c) = c.filter(|c| c.reason == "NoHealthyEndpoints" || c.type_ != READY) {
            ctx.event(slb, EventType::Warning, &c.reason, c.message)
                .await;
        }
    }
    if let Some((grace, note)) = switched {
        ctx.event(slb, EventType::Normal, "Moved", note).await;
        next = next.min(grace + Duration::from_secs(1));
    }
    if let Some(r) = refused {
        if ready_reason_changed(&old, &r) {
            warn!(reason = %r.reason, message = %r.message, "update refused; the current allocation stays served");
            ctx.event(slb, EventType::Warning, &r.reason, r.message.clone())
                .await;
        }
        return Ok(Action::requeue(RETRY_REFUSED.min(next)));
    }
    if !status::is_ready(slb) {
        let ready = status::get(&st.conditions, READY).map(|c| c.message.clone());
        info!(message = ready.as_deref().unwrap_or_default(), "ready");
        // a Warning told of the cloud failure; this closes it. A first success needs no Event: the status says it
        if programming_had_failed(&old) {
            let message = ready.unwrap_or_default();
            ctx.event(slb, EventType::Normal, "Programmed", message)
                .await;
        }
    }
    Ok(Action::requeue(next))
}

/// The status reports a failed cloud call (`cloud_failed` wrote it, with a Warning Event).
fn programming_had_failed(old: &SharedLBStatus) -> bool {
    status::get(&old.conditions, PROGRAMMED).is_some_and(|c| c.status == "False")
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

/// Deletion: remove the listeners this SharedLB owns, free its ports, delete load balancers left empty.
#[instrument(skip_all, fields(shared_lb = %format!("{}/{}", slb.namespace().unwrap_or_default(), slb.name_any())))]
async fn cleanup(slb: Arc<SharedLB>, ctx: Arc<Context>) -> Result<Action, Error> {
    let uid = slb.uid().unwrap_or_default();
    ctx.written.forget(&uid);
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
    let held = note_held(&*alloc.lock(&ctx.client, &pool.spec).await?, &alloc, &uid);
    note_recorded_listeners(&alloc, &slb);
    if let Err(e) = withdraw_stale(&alloc, &uid, &BTreeSet::new()).await {
        return cloud_failed(&ctx, &slb, e).await;
    }
    let mut state = alloc.lock(&ctx.client, &pool.spec).await?;
    let plan = state.plan(&both_places(&uid));
    state.apply(&plan);
    let doomed: Vec<u32> = state.deleting();
    drop(state);
    // no Event: the object is on its way out, and nobody reads the Events of a deleted object
    if held || !status.ports.is_empty() {
        info!(pool = %pool_name, "ports released");
    }
    if let Err(e) = alloc.delete_marked(doomed).await {
        warn!(error = %e, pool = %pool_name, "deleting an empty load balancer failed; the pool retries");
    }
    Ok(Action::await_change())
}
