//! Which pool a SharedLB uses, whether that pool admits its namespace, and what happens when it stops admitting it.

use super::*;

/// The pool this SharedLB uses, or why it cannot use one (read from the pool store: no API call).
pub(super) fn resolve_pool(
    ctx: &Context,
    slb: &SharedLB,
) -> Result<Arc<LoadBalancerPool>, Refusal> {
    model::choose_pool(slb.spec.pool.as_deref(), &ctx.pools.state())
        .cloned()
        .map_err(|(reason, message)| Refusal::new(reason, message))
}

/// Whether the pool admits the SharedLB's namespace (its `namespaceSelector` on the Namespace's labels).
pub(super) async fn namespace_admitted(
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
pub(super) async fn not_admitted(
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
    let message = format!(
        "{msg}: its listeners are withdrawn and its ports released; it is placed again once the namespace is admitted"
    );
    withdraw(ctx, slb, pool, Refusal::new("NamespaceNotAllowed", message)).await
}

/// Whether the SharedLB keeps to what a local pool lets tenants take: fixed ports from the pool's ranges and
/// never the operator's own ports (the forwarder binds them on a machine the platform runs). Cloud pools: Ok.
pub(super) fn in_lane(
    ctx: &Context,
    pool: &LoadBalancerPool,
    slb: &SharedLB,
) -> Result<(), Refusal> {
    let Some(local) = &pool.spec.provider.local else {
        return Ok(());
    };
    model::local_port_refusal(
        &slb.spec,
        local,
        spec_port_range(&pool.spec),
        &ctx.settings.own_ports(),
    )
    .map_or(Ok(()), |(reason, message)| {
        Err(Refusal::new(reason, message))
    })
}

/// Refuses a SharedLB that may hold a place in `pool`: the place is released first (listeners withdrawn,
/// ports freed), so nothing keeps serving what the pool no longer allows; it is placed again, as new, once the
/// refusal no longer holds.
pub(super) async fn withdraw(
    ctx: &Context,
    slb: &SharedLB,
    pool: &LoadBalancerPool,
    refusal: Refusal,
) -> Result<Action, Error> {
    let placed_here = slb
        .status
        .as_ref()
        .is_some_and(|s| s.pool.as_deref() == Some(pool.name_any().as_str()));
    if !placed_here {
        return refuse(ctx, slb, refusal.retry(RETRY_REFUSED)).await;
    }
    let alloc = ctx.allocator(pool).await?;
    release(ctx, slb, &alloc, pool, &[]).await?;
    let r = Refusal {
        released: true,
        ..refusal.retry(RETRY_REFUSED)
    };
    refuse(ctx, slb, r).await
}
