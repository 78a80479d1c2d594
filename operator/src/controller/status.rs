//! Conditions and status patches. Status is written as a JSON merge patch of the whole status with explicit
//! nulls for cleared fields, and only when it differs from what is there (every write fans out to watchers).

use serde_json::{Value, json};
use sharedlb_crds::{Condition, SharedLB};

pub const READY: &str = "Ready";
pub const ALLOCATED: &str = "Allocated";
pub const PROGRAMMED: &str = "Programmed";
/// Of SharedLBs whose listeners forward to endpoints (local pools): whether every endpoint slice and address of
/// the backing Service was taken, or which were refused.
pub const ENDPOINTS_ACCEPTED: &str = "EndpointsAccepted";

pub fn is_ready(slb: &SharedLB) -> bool {
    slb.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == READY))
        .is_some_and(|c| c.status == "True")
}

/// Sets a condition in `conds`, keeping its transition time when the status did not change.
pub fn set(
    conds: &mut Vec<Condition>,
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let status = if ok { "True" } else { "False" };
    let now = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .ok();
    let time = match conds.iter().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.map(|t| t.to_string()),
    };
    let c = Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: message.to_string(),
        last_transition_time: time,
        observed_generation: generation,
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(old) => *old = c,
        None => conds.push(c),
    }
    conds.sort_by(|a, b| a.type_.cmp(&b.type_));
}

pub fn get<'a>(conds: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// A merge patch that replaces the whole status: every known top-level key is present, null when cleared.
pub fn whole_status_patch<T: serde::Serialize>(
    status: &T,
    keys: &[&str],
) -> Result<Value, serde_json::Error> {
    let mut v = serde_json::to_value(status)?;
    if let Value::Object(m) = &mut v {
        for k in keys {
            m.entry(k.to_string()).or_insert(Value::Null);
        }
    }
    Ok(json!({ "status": v }))
}

pub const SHARED_LB_STATUS_KEYS: &[&str] = &[
    "observedGeneration",
    "conditions",
    "pool",
    "loadBalancer",
    "ports",
    "serviceName",
    "portSummary",
    "movingTo",
    "previous",
];
pub const POOL_STATUS_KEYS: &[&str] = &[
    "observedGeneration",
    "provider",
    "loadBalancers",
    "totals",
    "limits",
    "conditions",
];

/// Two condition lists equal but for transition times (which `set` keeps when nothing changed).
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.type_ == y.type_
                && x.status == y.status
                && x.reason == y.reason
                && x.message == y.message
                && x.observed_generation == y.observed_generation
        })
}
