//! Moving a SharedLB to another load balancer of its pool, make-before-break, when it allows it
//! (`spec.migration.allowed`) and cannot stay as it is: it cannot grow where it is, or its load balancer drains.
//!
//! The move is durable before any cloud call: one status write records the place it moves to (`movingTo`) while
//! `loadBalancer` and `ports` still show where it is served. The pool's state holds the old place under
//! `held_key`, so its ports are never given to anyone else while its listeners serve; a restart holds both again
//! from the status. Once the new listeners are made, the status switches: the new place becomes `loadBalancer`
//! and `ports` (the new address, with an Event), the old one `previous` with `releaseAfter`. The old listeners
//! stay wanted until then; the status then drops them and the next withdrawal removes them.

use super::*;
use crate::allocator::{LockedPool, held_key, previous_from_status};
use sharedlb_crds::{LoadBalancerRef, MovingTo, PortStatus, PreviousPlacement};

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
    let _ = grace;
    let mut st = slb.status.clone().unwrap_or_default();
    st.moving_to = Some(MovingTo {
        load_balancer: alloc.lb_name(new.lb),
        ports: new
            .ports
            .iter()
            .map(|p| PortStatus {
                name: p.name.clone(),
                port: i32::from(p.port),
                node_port: None,
                protocol: model::protocol_from_placement(p.protocol),
                endpoints: None,
                healthy_endpoints: None,
            })
            .collect(),
    });
    // durable first: both places are claimed in the status, so a restart holds them again
    send_status(ctx, slb, &st, Precondition::ResourceVersion).await?;
    state.apply(&plan);
    info!(from = %alloc.lb_name(old.lb), to = %alloc.lb_name(new.lb), "moving");
    Ok(Some(Placement::Held {
        allocation: new,
        refused: None,
        written: Some(Box::new(st)),
    }))
}

/// The listeners of the old place while it serves (they stay wanted), and when that ends: None while the move
/// is under way, `previous.releaseAfter` after it.
pub(super) fn still_serving(
    slb: &SharedLB,
    pool: &str,
) -> Option<(BTreeSet<ListenerId>, Option<k8s_openapi::jiff::Timestamp>)> {
    let status = slb.status.as_ref()?;
    let old = previous_from_status(status, pool)?;
    let until = match status.moving_to {
        Some(_) => None,
        None => status.previous.as_ref()?.release_after.parse().ok(),
    };
    let ids = old
        .ports
        .iter()
        .map(|p| ListenerId::of(old.lb, p))
        .collect();
    Some((ids, until))
}

/// The new listeners are made: the status `st` about to be written shows the new place, and the old one becomes
/// `previous` for the grace. Returns the grace and a note for the `Moved` Event, when this is that switch.
pub(super) fn switch(slb: &SharedLB, st: &mut SharedLBStatus) -> Option<(Duration, String)> {
    let before = slb.status.as_ref()?;
    st.moving_to.take()?;
    let grace = slb.spec.move_grace().unwrap_or(DEFAULT_GRACE);
    let now = k8s_openapi::jiff::Timestamp::now();
    let release_after = now.checked_add(grace).unwrap_or(now);
    let old = before.load_balancer.clone().unwrap_or_default();
    let new = st.load_balancer.clone().unwrap_or_default();
    let address = |l: &LoadBalancerRef| l.ip.clone().or(l.hostname.clone()).unwrap_or_default();
    let note = format!(
        "moved from {} ({}) to {} ({}), same ports; the old address serves until {release_after}",
        old.name,
        address(&old),
        new.name,
        address(&new)
    );
    st.previous = Some(PreviousPlacement {
        load_balancer: old,
        ports: before.ports.clone(),
        release_after: release_after.to_string(),
    });
    Some((grace, note))
}

/// The grace of a move whose SharedLB no longer says (its migration turned off mid-move).
const DEFAULT_GRACE: Duration = Duration::from_secs(300);

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
