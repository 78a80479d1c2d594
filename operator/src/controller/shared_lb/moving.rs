//! Moving a SharedLB to another load balancer of its pool, make-before-break, when it allows it
//! (`spec.migration.allowed`) and cannot stay as it is: it cannot grow where it is, or its load balancer drains.
//!
//! The move is durable before any cloud call: one status write names the new place (`loadBalancer`, `ports`)
//! and the old one (`previous`, with when it goes). The pool's state holds the old place under `held_key` until
//! then, so its ports are never given to anyone else while its listeners still serve; a restart holds it again
//! from the status. The new listeners are made by the reconcile that follows; the old ones stay wanted until
//! `previous.releaseAfter`, when the status drops them and the next withdrawal removes them.

use super::*;
use crate::allocator::{LockedPool, held_key, previous_from_status};
use sharedlb_crds::PreviousPlacement;

/// Moves the SharedLB if it allows it and another load balancer can take it with the port numbers it has.
/// None: it may not move, it is moving already, or nowhere has room (the caller says why it stays).
pub(super) async fn move_off(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    state: &mut LockedPool<'_>,
) -> Result<Option<Placement>, Error> {
    let uid = slb.uid().unwrap_or_default();
    let Some(grace) = slb.spec.move_grace() else {
        return Ok(None);
    };
    let held = held_key(&uid);
    if state.allocation(&held).is_some() {
        return Ok(None);
    }
    let Some(old) = state.allocation(&uid).cloned() else {
        return Ok(None);
    };
    let Some(Ok(plan)) = state.plan_move(&uid, &held, &model::move_requests(&slb.spec, &old))
    else {
        return Ok(None);
    };
    let Some((_, new)) = plan.placed.first().cloned() else {
        return Ok(None);
    };
    let release_after = k8s_openapi::jiff::Timestamp::now()
        .checked_add(grace)
        .map_err(|e| Error::Planner(format!("the grace period: {e}")))?;
    let before = slb.status.clone().unwrap_or_default();
    let mut st = model::allocated_status(
        &before,
        &alloc.pool,
        &alloc.lb_name(new.lb),
        alloc.info(new.lb).as_ref(),
        &new,
        slb.meta().generation,
    );
    st.previous = Some(PreviousPlacement {
        load_balancer: before.load_balancer.clone().unwrap_or_default(),
        ports: before.ports.clone(),
        release_after: release_after.to_string(),
    });
    // durable first: the old place stays claimed in the status, so a restart holds it again
    send_status(ctx, slb, &st, Precondition::ResourceVersion).await?;
    state.apply(&plan);
    let note = format!(
        "moving from {} to {}: the new address is in the status once its listeners are made; the old one serves until {release_after}",
        alloc.lb_name(old.lb),
        alloc.lb_name(new.lb)
    );
    ctx.event(slb, EventType::Normal, "Moved", note).await;
    Ok(Some(Placement::Held {
        allocation: new,
        refused: None,
        written: Some(Box::new(st)),
    }))
}

/// The listeners of the old place while its grace lasts (they stay wanted), and when it ends.
pub(super) fn still_serving(
    slb: &SharedLB,
    pool: &str,
) -> Option<(BTreeSet<ListenerId>, k8s_openapi::jiff::Timestamp)> {
    let status = slb.status.as_ref()?;
    let old = previous_from_status(status, pool)?;
    let until = status.previous.as_ref()?.release_after.parse().ok()?;
    let ids = old
        .ports
        .iter()
        .map(|p| ListenerId::of(old.lb, p))
        .collect();
    Some((ids, until))
}

/// The grace is over: the status drops the old place (durably first), then the pool's state lets its ports go
/// (and deletes a load balancer left empty). The caller's withdrawal then removes the old listeners.
pub(super) async fn end_move(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &Arc<PoolAllocator>,
    pool: &LoadBalancerPool,
) -> Result<SharedLB, Error> {
    let mut st = slb.status.clone().unwrap_or_default();
    st.previous = None;
    send_status(ctx, slb, &st, Precondition::ResourceVersion).await?;
    let uid = slb.uid().unwrap_or_default();
    let mut state = alloc.lock(&ctx.client, &pool.spec).await?;
    let plan = state.plan(&[Change::Remove {
        key: held_key(&uid),
    }]);
    state.apply(&plan);
    drop(state);
    delete_in_background(ctx, alloc, &plan);
    info!("the move's grace is over: the old listeners go");
    Ok(SharedLB {
        status: Some(st),
        ..slb.clone()
    })
}
