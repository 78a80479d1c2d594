//! What a SharedLB is told: refusals and cloud failures as conditions and Events, and status writes (the whole
//! status, only when it changed).

use super::*;

/// A refusal: bad input, a missing or closed pool, no room. Conditions, one Event when it first happens, no cloud call.
pub(super) struct Refusal {
    pub(super) allocated: bool,
    /// The SharedLB was taken out of its pool: its status no longer names a place.
    pub(super) released: bool,
    pub(super) reason: String,
    pub(super) message: String,
    pub(super) requeue: Option<Duration>,
}

impl Refusal {
    pub(super) fn new(reason: &str, message: impl Into<String>) -> Self {
        Refusal {
            allocated: false,
            released: false,
            reason: reason.into(),
            message: message.into(),
            requeue: None,
        }
    }
    pub(super) fn retry(mut self, after: Duration) -> Self {
        self.requeue = Some(after);
        self
    }
}

pub(super) enum Precondition {
    /// The patch fails with 409 (`Error::Conflict`) unless the object is still at the version reconciled.
    ResourceVersion,
    None,
}

/// Replaces the whole status by a merge patch (cleared fields as explicit nulls).
pub(super) async fn send_status(
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
    let made = api
        .patch_status(
            &slb.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(Error::from_kube)?;
    ctx.written.record(slb, st, made.resource_version());
    Ok(())
}

pub(super) fn ready_reason_changed(old: &SharedLBStatus, r: &Refusal) -> bool {
    status::get(&old.conditions, READY)
        .is_none_or(|c| c.status != "False" || c.reason != r.reason || c.message != r.message)
}

pub(super) fn status_equal(a: &SharedLBStatus, b: &SharedLBStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.pool == b.pool
        && a.load_balancer == b.load_balancer
        && a.ports == b.ports
        && a.service_name == b.service_name
        && a.port_summary == b.port_summary
        && a.moving_to == b.moving_to
        && a.previous == b.previous
        && status::same_conditions(&a.conditions, &b.conditions)
}

pub(super) async fn write_status_if_changed(
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
pub(super) async fn refuse(ctx: &Context, slb: &SharedLB, r: Refusal) -> Result<Action, Error> {
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
pub(super) async fn cloud_failed(
    ctx: &Context,
    slb: &SharedLB,
    e: sharedlb_providers::ProviderError,
) -> Result<Action, Error> {
    match e {
        ProviderError::Fenced(_) => return Err(Error::Fenced), // not this replica's to report
        // a throttle is the cloud pacing this operator, not news for the SharedLB's owner: retried, backing off
        // from the cloud's own hint (`error_policy`), without a status write or Event each time
        ProviderError::Throttled { .. } => return Err(Error::Provider(e)),
        _ => {}
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

pub(super) fn is_ready(slb: &SharedLB) -> bool {
    slb.status
        .as_ref()
        .and_then(|s| status::get(&s.conditions, READY))
        .is_some_and(|c| c.status == "True")
}

/// Endpoints named in a refusal, at most: the condition stays short however many a slice lists.
const REFUSED_ENDPOINTS_SHOWN: usize = 8;

/// Sets `EndpointsAccepted`: True, or False with the slices and addresses the pool's policy refused.
pub(super) fn endpoints_accepted(
    st: &mut SharedLBStatus,
    refused: &std::collections::BTreeSet<String>,
    generation: Option<i64>,
) {
    if refused.is_empty() {
        let message = "every endpoint of the backing Service is forwarded to";
        status::set(
            &mut st.conditions,
            ENDPOINTS_ACCEPTED,
            true,
            "Accepted",
            message,
            generation,
        );
        return;
    }
    let shown: Vec<&str> = refused
        .iter()
        .take(REFUSED_ENDPOINTS_SHOWN)
        .map(String::as_str)
        .collect();
    let more = refused.len().saturating_sub(shown.len());
    let tail = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    let message = format!(
        "not forwarded to: {}{tail}; a local pool's listeners send only to pod addresses from the EndpointSlice controller's slices (or a manager the pool names)",
        shown.join(", ")
    );
    status::set(
        &mut st.conditions,
        ENDPOINTS_ACCEPTED,
        false,
        "EndpointRefused",
        &message,
        generation,
    );
}

/// The condition `type_` when `new` holds it False and `old` did not (or with another message): worth an Event.
pub(super) fn newly_false(
    old: &SharedLBStatus,
    new: &SharedLBStatus,
    type_: &str,
) -> Option<sharedlb_crds::Condition> {
    let now = status::get(&new.conditions, type_).filter(|c| c.status == "False")?;
    let before = status::get(&old.conditions, type_);
    (before.map(|c| &c.message) != Some(&now.message)).then(|| now.clone())
}

/// Health of a listener's endpoints: (passing their checks, all), by (port, protocol).
pub(super) type EndpointHealth = BTreeMap<(i32, sharedlb_crds::Protocol), (usize, usize)>;

/// Writes each port's endpoints and how many pass their health checks; a Ready status turns False
/// (`NoHealthyEndpoints`) while a port has endpoints and none passes. A port without endpoints stays as it is:
/// its pods may not exist yet, and its count says so.
pub(super) fn endpoint_health(
    st: &mut SharedLBStatus,
    old: &SharedLBStatus,
    health: &EndpointHealth,
    generation: Option<i64>,
) {
    let mut failing = Vec::new();
    for p in &mut st.ports {
        let Some((healthy, all)) = health.get(&(p.port, p.protocol)) else {
            continue;
        };
        p.endpoints = u32::try_from(*all).ok();
        p.healthy_endpoints = u32::try_from(*healthy).ok();
        if *all > 0 && *healthy == 0 {
            failing.push(format!("{:?} ({all})", p.name));
        }
    }
    let ready = status::get(&st.conditions, READY).is_some_and(|c| c.status == "True");
    if ready && !failing.is_empty() {
        // from the Ready the status had, so that a Ready already False keeps the time it turned False
        if let (Some(was), Some(now)) = (
            status::get(&old.conditions, READY),
            st.conditions.iter_mut().find(|c| c.type_ == READY),
        ) {
            *now = was.clone();
        }
        let message = format!(
            "no endpoint passes its health checks on port {}: its listener still accepts and tries each endpoint",
            failing.join(", ")
        );
        status::set(
            &mut st.conditions,
            READY,
            false,
            "NoHealthyEndpoints",
            &message,
            generation,
        );
    }
}
