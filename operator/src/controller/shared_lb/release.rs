//! Taking a SharedLB out of its pool: listeners withdrawn, Service deleted, then its ports freed.

use super::*;
use crate::allocator::held_key;
use sharedlb_placement::PoolState;

/// On a passthrough cloud another Service holds a node port this SharedLB was given, before it ever served:
/// the ports are blocked in the pool, the placement released, and the next reconcile places it again around them.
pub(super) async fn place_again_around(
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
pub(super) async fn release(
    ctx: &Context,
    slb: &SharedLB,
    alloc: &PoolAllocator,
    pool: &LoadBalancerPool,
    block: &[u16],
) -> Result<(), Error> {
    let uid = slb.uid().unwrap_or_default();
    // what it holds goes first, the ports last: a port is never free while something of this SharedLB still
    // answers on it; a failure stops here (the status still names the place) and the next reconcile goes on
    note_held(&*alloc.lock(&ctx.client, &pool.spec).await?, alloc, &uid);
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
    let plan = state.plan(&both_places(&uid));
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

/// The listeners the SharedLB's status records (with a move's old place) go into the ledger: the cloud may hold them (written before a
/// restart) even where this process never made them.
pub(super) fn note_recorded_listeners(alloc: &PoolAllocator, slb: &SharedLB) {
    let uid = slb.uid().unwrap_or_default();
    let Some(status) = slb.status.as_ref() else {
        return;
    };
    let recorded = allocation_from_status(status, &alloc.pool);
    let previous = crate::allocator::previous_from_status(status, &alloc.pool);
    for a in recorded.iter().chain(previous.iter()) {
        note_listeners(alloc, &uid, a);
    }
}

/// Notes in the ledger the listeners of what the SharedLB holds: its place, and the old one while it moves.
/// Returns whether it holds anything.
pub(super) fn note_held(state: &PoolState, alloc: &PoolAllocator, uid: &str) -> bool {
    let places = [state.allocation(uid), state.allocation(&held_key(uid))];
    for a in places.iter().flatten() {
        note_listeners(alloc, uid, a);
    }
    places.iter().any(Option::is_some)
}

/// Frees both places of a SharedLB: its own, and the old one it holds while it moves.
pub(super) fn both_places(uid: &str) -> [Change; 2] {
    [
        Change::Remove {
            key: uid.to_string(),
        },
        Change::Remove { key: held_key(uid) },
    ]
}

fn note_listeners(alloc: &PoolAllocator, uid: &str, a: &Allocation) {
    for p in &a.ports {
        alloc.note_listener(uid, ListenerId::of(a.lb, p));
    }
}
