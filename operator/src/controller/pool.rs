//! Reconciling a LoadBalancerPool: validate it, build its allocator (the rebuild), retry deletions of empty
//! load balancers, and show one row per load balancer in its status.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::{Api, Resource, ResourceExt};
use sharedlb_crds::{
    LoadBalancerPool, LoadBalancerPoolStatus, POOL_FINALIZER, PoolLimits, PoolLoadBalancer,
    PoolTotals, PortRange, SharedLB, SpecError, validate_drain, validate_local_addresses,
    validate_pool, validate_provider_change,
};
use sharedlb_placement::{Headroom, LbIndex, PoolConfig, PoolState, PortMode};
use tracing::warn;

use super::Context;
use super::status::{self, READY};
use crate::Error;
use crate::allocator::{PoolAllocator, StrayListener, owner_of};
use crate::cost::PriceTable;
use crate::telemetry::{DriftLabels, PoolLabels};

pub async fn reconcile(pool: Arc<LoadBalancerPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<LoadBalancerPool> = Api::all(ctx.client.clone());
    finalizer(&api, POOL_FINALIZER, pool, |event| async {
        match event {
            FinalizerEvent::Apply(p) => apply(p, ctx.clone()).await,
            FinalizerEvent::Cleanup(p) => cleanup(p, ctx.clone()).await,
        }
    })
    .await
    .map_err(super::finalizer_error)
}

/// Deletion: wait while any SharedLB holds ports in the pool (it needs the pool to release them), then close the
/// pool to placement and delete every load balancer the provider's inventory lists for it, so nothing is left
/// behind in the cloud. Holding is what the pool's state says under its lock, the same lock placement takes: a
/// SharedLB is either placed before the pool closes (and deletion waits for it) or refused after. A SharedLB that
/// only names the pool holds nothing and does not hold deletion up.
async fn cleanup(pool: Arc<LoadBalancerPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = pool.name_any();
    let alloc = match ctx.allocator(&pool).await {
        Ok(a) => a,
        Err(Error::Provider(e)) if never_made_anything(&pool) => {
            warn!(pool = %name, error = %e, "no provider for a deleted pool that never held a load balancer; nothing to clean");
            ctx.drop_allocator(&name).await;
            return Ok(Action::await_change());
        }
        // the provider cannot be made now, but load balancers it made before may exist: retried, never skipped
        Err(e) => return Err(e),
    };
    let state = alloc.lock(&ctx.client, &pool.spec).await?;
    let holders: BTreeSet<String> = state
        .allocations()
        .filter_map(|(key, _)| owner_of(key).map(str::to_string))
        .collect();
    if holders.is_empty() {
        alloc.close();
    }
    drop(state);
    if !holders.is_empty() {
        return wait_for_holders(&ctx, &pool, &holders).await;
    }
    let inventory = alloc.provider().inventory().await?;
    for lb in &inventory.load_balancers {
        alloc
            .provider()
            .delete_load_balancer(&alloc.key(lb.index))
            .await?;
    }
    // what a delete that crashed half-way left (shared groups, target groups): looked for on every attempt, so
    // the pool's finalizer stays until nothing of it is left in the cloud
    alloc.provider().delete_pool_leftovers().await?;
    if !inventory.load_balancers.is_empty() {
        let note = format!(
            "deleted {} load balancer(s) of the pool",
            inventory.load_balancers.len()
        );
        ctx.event(&*pool, EventType::Normal, "Deleted", note).await;
    }
    // the closed allocator stays in its slot: a SharedLB reconciled from a view of the pool that predates its
    // deletion finds it closed, instead of making a new one that would place (and leave a load balancer behind)
    Ok(Action::await_change())
}

/// The pool's own status (which only the operator writes) never listed a load balancer.
fn never_made_anything(pool: &LoadBalancerPool) -> bool {
    pool.status
        .as_ref()
        .is_none_or(|s| s.load_balancers.is_empty() && s.totals.load_balancers == 0)
}

/// The pool says which SharedLBs its deletion waits for.
async fn wait_for_holders(
    ctx: &Context,
    pool: &LoadBalancerPool,
    holders: &BTreeSet<String>,
) -> Result<Action, Error> {
    let all = Api::<SharedLB>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(Error::from_kube)?;
    let users: Vec<String> = all
        .items
        .iter()
        .filter(|s| s.uid().is_some_and(|u| holders.contains(&u)))
        .map(|s| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
        .collect();
    let shown: Vec<&str> = users.iter().take(5).map(String::as_str).collect();
    let msg = format!(
        "deletion waits: {} SharedLB(s) still hold ports in this pool ({}{}); delete them first",
        holders.len(),
        shown.join(", "),
        if holders.len() > 5 { ", ..." } else { "" }
    );
    let old = pool.status.clone().unwrap_or_default();
    let mut st = old.clone();
    status::set(
        &mut st.conditions,
        READY,
        false,
        "InUse",
        &msg,
        pool.meta().generation,
    );
    finish(ctx, pool, &old, st, Action::await_change()).await?;
    Err(Error::PoolInUse(msg))
}

async fn apply(pool: Arc<LoadBalancerPool>, ctx: Arc<Context>) -> Result<Action, Error> {
    let generation = pool.meta().generation;
    let old = pool.status.clone().unwrap_or_default();
    let mut st = old.clone();
    st.observed_generation = generation;

    let valid = validate_pool(&pool.spec)
        .and(validate_drain(&pool.name_any(), &pool.spec))
        .and(provider_unchanged(&ctx, &pool, &old).await);
    if valid.is_ok() {
        st.provider = pool.spec.provider.kind().map(str::to_string);
    }
    if let Err(e) = valid {
        status::set(
            &mut st.conditions,
            READY,
            false,
            e.reason(),
            &e.to_string(),
            generation,
        );
        return finish(&ctx, &pool, &old, st, Action::await_change()).await;
    }
    // The provider is made and the allocator rebuilt (inventory + statuses) on first use; a cloud error on the
    // way is the pool's condition.
    let built = async {
        let alloc = ctx.allocator(&pool).await?;
        let state = alloc.lock(&ctx.client, &pool.spec).await?;
        let rows = (state.load_balancers(), state.deleting());
        let on_draining = holders_of_draining(&state);
        let bounds = (pool_limits(state.config()), state.headroom());
        drop(state);
        Ok::<_, Error>((alloc, rows, on_draining, bounds))
    };
    let (alloc, (rows, deleting), mut on_draining, (limits, headroom)) = match built.await {
        Ok(b) => b,
        Err(Error::Provider(e)) => {
            status::set(
                &mut st.conditions,
                READY,
                false,
                e.reason(),
                &e.to_string(),
                generation,
            );
            let after = e.retry_after().unwrap_or(Duration::from_secs(300));
            return finish(&ctx, &pool, &old, st, Action::requeue(after)).await;
        }
        Err(e) => return Err(e),
    };
    alloc.retry_strays().await;
    // a drain just asked for: those on a draining load balancer that allow it move off (their reconcile moves)
    if old.observed_generation != generation {
        let on_draining: BTreeSet<String> = on_draining.values().flatten().cloned().collect();
        ctx.reconcile_now(&on_draining);
    }
    if alloc.audit_due(ctx.settings.audit_interval) {
        audit(&ctx, &pool, &alloc).await?;
    }
    let strays = alloc.strays();
    ctx.fence.check()?;
    let spares_changed = match alloc.make_spares().await {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, pool = %pool.name_any(), "a warm spare could not be made; retrying");
            ctx.event(
                &*pool,
                EventType::Warning,
                e.reason(),
                format!("a warm spare load balancer could not be made: {e}"),
            )
            .await;
            0
        }
    };
    // spares made or marked now show in the rows of the next pass, soon
    let retry_soon = !deleting.is_empty() || spares_changed > 0;
    if let Err(e) = alloc.delete_marked(deleting).await {
        warn!(error = %e, pool = %pool.name_any(), "deleting an empty load balancer failed; retrying");
    }
    st.load_balancers = rows
        .iter()
        .filter(|l| !l.deleting)
        .map(|l| {
            let info = alloc.info(l.lb);
            PoolLoadBalancer {
                name: alloc.lb_name(l.lb),
                id: info
                    .as_ref()
                    .map(|i| i.id.clone())
                    .filter(|i| !i.is_empty()),
                ip: info.as_ref().and_then(|i| i.ip.clone()),
                hostname: info.as_ref().and_then(|i| i.hostname.clone()),
                ports_used: l.ports_used,
                capacity: l.capacity,
                draining: l.draining,
                shared_lbs: on_draining
                    .remove(&l.lb)
                    .map(|uids| ctx.shared_lb_names(&uids, DRAINING_NAMES_SHOWN))
                    .unwrap_or_default(),
            }
        })
        .collect();
    st.totals = pool_totals(
        &st.load_balancers,
        headroom,
        &ctx.settings.prices,
        &kind_of(&pool),
    );
    st.limits = Some(limits);
    let labels = PoolLabels {
        pool: pool.name_any(),
    };
    let totals = &st.totals;
    let m = &ctx.metrics;
    m.pool_load_balancers
        .get_or_create(&labels)
        .set(i64::from(totals.load_balancers));
    m.pool_ports_used
        .get_or_create(&labels)
        .set(i64::from(totals.ports_used));
    let free = totals.ports_capacity.saturating_sub(totals.ports_used);
    m.pool_ports_free
        .get_or_create(&labels)
        .set(i64::from(free));
    m.pool_stray_listeners
        .get_or_create(&labels)
        .set(strays.len() as i64);
    set_in_sync(&mut st, &strays, alloc.last_repairs(), generation);
    let kind = st.provider.clone().unwrap_or_default();
    status::set(
        &mut st.conditions,
        READY,
        true,
        "Ready",
        &format!("provider {kind} ready"),
        generation,
    );
    let next = if retry_soon {
        Duration::from_secs(5)
    } else if !strays.is_empty() {
        Duration::from_secs(30)
    } else {
        Duration::from_secs(60)
    };
    let next = next.min(ctx.settings.audit_interval);
    finish(&ctx, &pool, &old, st, Action::requeue(next)).await
}

fn kind_of(pool: &LoadBalancerPool) -> String {
    pool.spec.provider.kind().unwrap_or_default().to_string()
}

/// The pool's totals for people: its load balancers, ports, headroom (`37`, or `37+` when new load balancers
/// are not limited) and hourly cost.
pub fn pool_totals(
    rows: &[PoolLoadBalancer],
    headroom: Headroom,
    prices: &PriceTable,
    kind: &str,
) -> PoolTotals {
    let load_balancers = rows.len() as u32;
    let ports_used = rows.iter().map(|l| l.ports_used).sum();
    let headroom = match headroom.total {
        Some(n) => n.to_string(),
        None => format!("{}+", headroom.on_existing),
    };
    PoolTotals {
        load_balancers,
        ports_used,
        ports_capacity: rows.iter().map(|l| l.capacity).sum(),
        headroom: Some(headroom),
        hourly_cost: Some(prices.format(prices.hourly(kind, load_balancers, ports_used))),
    }
}

/// What the planner places under, for the status (and `sharedlb plan`).
pub fn pool_limits(c: &PoolConfig) -> PoolLimits {
    PoolLimits {
        max_ports_per_load_balancer: c.max_ports_per_lb,
        max_load_balancers: c.max_lbs,
        max_ports_total: c.max_ports_total,
        port_range: PortRange {
            min: i32::from(c.port_range.0),
            max: i32::from(c.port_range.1),
        },
        ports_unique_across_pool: c.port_mode == PortMode::PoolWide,
        groups: c.lb_groups.map(|g| g.count),
        ports_per_group: c.lb_groups.map(|g| g.max_ports),
    }
}

/// SharedLBs a draining load balancer's status row names, at most (the pool's status stays small).
const DRAINING_NAMES_SHOWN: usize = 50;

/// The UIDs of the items on each draining load balancer.
fn holders_of_draining(state: &PoolState) -> BTreeMap<LbIndex, Vec<String>> {
    let draining = &state.config().draining;
    let mut out: BTreeMap<LbIndex, Vec<String>> = BTreeMap::new();
    for (key, a) in state.allocations() {
        if let Some(uid) = owner_of(key).filter(|_| draining.contains(&a.lb)) {
            out.entry(a.lb).or_default().push(uid.to_string());
        }
    }
    out
}

/// The drift audit: the cloud's inventory against the allocations. Strays are removed by the audit itself; the
/// SharedLBs with a missing listener, or on a load balancer that is missing or has a new address, are reconciled
/// now, which makes what is missing and writes the address. Each kind is counted and the pool gets an Event.
async fn audit(ctx: &Context, pool: &LoadBalancerPool, alloc: &PoolAllocator) -> Result<(), Error> {
    ctx.fence.check()?;
    let Some((drift, owners)) = alloc.audit().await? else {
        return Ok(());
    };
    if drift.is_empty() {
        return Ok(());
    }
    for (kind, n, _) in drift.kinds().into_iter().filter(|(_, n, _)| *n > 0) {
        let labels = DriftLabels {
            pool: pool.name_any(),
            kind,
        };
        ctx.metrics
            .drift_repairs
            .get_or_create(&labels)
            .inc_by(n as u64);
    }
    let summary = drift.summary();
    warn!(pool = %pool.name_any(), %summary, "the cloud differed from the allocations");
    ctx.reconcile_now(&owners);
    let note = format!("the cloud differed from the allocations: {summary}");
    ctx.event(pool, EventType::Warning, "DriftRepaired", note)
        .await;
    Ok(())
}

/// `InSync`: False while listeners no allocation accounts for could not be removed (their ports stay taken and
/// every reconcile of the pool tries again), each named with the cloud's error; True otherwise, saying what the
/// last drift audit mended when it mended something.
fn set_in_sync(
    st: &mut LoadBalancerPoolStatus,
    strays: &[StrayListener],
    repairs: Option<String>,
    generation: Option<i64>,
) {
    let (ok, reason, message) = match (strays, repairs) {
        ([], None) => (
            true,
            "InSync",
            "every listener in the cloud belongs to an allocation and every allocation's listener is there"
                .to_string(),
        ),
        ([], Some(mended)) => (
            true,
            "Repaired",
            format!("the last drift audit found the cloud differing and mended it: {mended}"),
        ),
        _ => {
            let each: Vec<String> = strays
                .iter()
                .map(|s| {
                    format!(
                        "load balancer {} port {}/{:?} (owner {}): {}",
                        s.lb, s.port, s.protocol, s.owner_uid, s.error
                    )
                })
                .collect();
            (
                false,
                "StrayListenerNotRemoved",
                format!(
                    "{} stray listener(s) could not be removed, their ports stay taken: {}",
                    strays.len(),
                    each.join("; ")
                ),
            )
        }
    };
    status::set(
        &mut st.conditions,
        IN_SYNC,
        ok,
        reason,
        &message,
        generation,
    );
}

const IN_SYNC: &str = "InSync";

/// Apiservers with CEL refuse a change of a pool's provider (the CRD's transition rules); without CEL the
/// operator refuses it itself: against the settings its provider was made with, and after a restart against the
/// provider kind the status recorded.
async fn provider_unchanged(
    ctx: &Context,
    pool: &LoadBalancerPool,
    old: &LoadBalancerPoolStatus,
) -> Result<(), SpecError> {
    let recorded = old.provider.as_deref();
    if recorded.is_some_and(|k| Some(k) != pool.spec.provider.kind()) {
        return Err(SpecError::ProviderChanged("the provider"));
    }
    validate_local_addresses(&pool.name_any(), &old.load_balancers, &pool.spec.provider)?;
    match ctx.existing_allocator(pool).await {
        Some(a) => validate_provider_change(&a.provider_spec(), &pool.spec.provider),
        None => Ok(()),
    }
}

async fn finish(
    ctx: &Context,
    pool: &LoadBalancerPool,
    old: &LoadBalancerPoolStatus,
    new: LoadBalancerPoolStatus,
    action: Action,
) -> Result<Action, Error> {
    let same = old.observed_generation == new.observed_generation
        && old.provider == new.provider
        && old.load_balancers == new.load_balancers
        && old.totals == new.totals
        && old.limits == new.limits
        && status::same_conditions(&old.conditions, &new.conditions);
    if same {
        return Ok(action);
    }
    let was = status::get(&old.conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
    let now = status::get(&new.conditions, READY).map(|c| (c.status.clone(), c.reason.clone()));
    ctx.fence.check()?;
    let patch = status::whole_status_patch(&new, status::POOL_STATUS_KEYS)?;
    Api::<LoadBalancerPool>::all(ctx.client.clone())
        .patch_status(
            &pool.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::from_kube)?;
    if was != now
        && let Some(c) = status::get(&new.conditions, READY).filter(|c| c.status != "True")
    {
        ctx.event(pool, EventType::Warning, &c.reason, c.message.clone())
            .await;
    }
    Ok(action)
}
