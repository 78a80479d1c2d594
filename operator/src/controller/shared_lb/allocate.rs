//! Placing a SharedLB in its pool's state and making the allocation durable (its status) before any cloud call.

use super::*;

/// Where allocation left a SharedLB.
pub(super) enum Placement {
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
pub(super) async fn allocate(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &Arc<PoolAllocator>,
    pool: &LoadBalancerPool,
) -> Result<Placement, Error> {
    let uid = slb.uid().unwrap_or_default();
    let requests = model::port_requests(&slb.spec);
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
        // it cannot grow where it is: one that allows it moves to where it can
        let stuck = matches!(r.reason(), "NoRoomToGrow" | "LoadBalancerDraining");
        if stuck && let Some(moved) = moving::move_off(ctx, slb, alloc, &mut state).await? {
            return Ok(moved);
        }
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
    // its load balancer drains: one that allows it moves off
    let draining = state.config().draining.contains(&allocation.lb);
    if draining
        && plan.placed.is_empty()
        && let Some(moved) = moving::move_off(ctx, slb, alloc, &mut state).await?
    {
        return Ok(moved);
    }
    let recorded = slb
        .status
        .as_ref()
        .and_then(|s| allocation_from_status(s, &alloc.pool));
    if recorded.as_ref() == Some(&allocation) {
        state.apply(&plan);
        drop(state);
        delete_in_background(ctx, alloc, &plan);
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
    delete_in_background(ctx, alloc, &plan);
    count_allocation(ctx, alloc);
    Ok(Placement::Held {
        allocation,
        refused: None,
        written: Some(Box::new(written)),
    })
}

/// Empty load balancers a plan marked for deletion go in the background (the pool retries what fails).
pub(super) fn delete_in_background(
    ctx: &Context,
    alloc: &Arc<PoolAllocator>,
    plan: &sharedlb_placement::Plan,
) {
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
    let (a, fence) = (alloc.clone(), ctx.fence.clone());
    tokio::spawn(async move {
        let deleted = fence.guard(async { Ok(a.delete_marked(doomed).await?) });
        if let Err(e) = deleted.await {
            warn!(error = %e, pool = %a.pool, "deleting an empty load balancer failed; the pool retries");
        }
    });
}

/// Counts a new or changed allocation. No Event: the status says where the SharedLB is placed, and every write
/// fans out to every watcher of Events; Events are kept for what needs a person (refusals, cloud failures).
pub(super) fn count_allocation(ctx: &Context, alloc: &PoolAllocator) {
    let labels = PoolLabels {
        pool: alloc.pool.clone(),
    };
    ctx.metrics.allocations.get_or_create(&labels).inc();
}

/// Writes the allocation to status with a resourceVersion precondition: a stale view of the object fails with
/// 409 instead of overwriting what a newer reconcile (or another leader) wrote.
pub(super) async fn write_allocation(
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
