//! The backing Service: made what the model says, written only when it differs, never taken over; a classed one
//! also gets the shared address in its status.

use super::*;

/// What became of the backing Service.
pub(super) enum ServiceOutcome {
    /// The apiserver has it as the model says: the port each port's traffic arrives on at a node, by port name
    /// (`model::arrival_ports`).
    Applied(BTreeMap<String, u16>),
    /// The apiserver, or a Service of that name that this SharedLB did not make, stands in the way: the user's
    /// to fix, told by a condition and an Event.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Makes the backing Service what the model says, writing only when it differs. A Service of that name that this
/// SharedLB did not create is never taken over.
pub(super) async fn deploy_service(
    ctx: &Context,
    slb: &SharedLB,
    allocation: &Allocation,
    kind: ServiceKind,
) -> Result<ServiceOutcome, Error> {
    let ns = slb.namespace().unwrap_or_default();
    let name = service_name(&slb.name_any());
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    // Ours is in the store; a Service of that name that is not there may still exist, made by someone else (or
    // by us, moments ago): asked for, once, before anything is written.
    let stored = ctx.services.get(&ObjectRef::new(&name).within(&ns));
    let existing = match stored {
        Some(s) => Some((*s).clone()),
        None => api.get_opt(&name).await.map_err(Error::from_kube)?,
    };
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
    let want = model::backing_service(slb, allocation, kind, existing.as_ref());
    if let Some(s) = existing.filter(|s| model::service_is_current(s, &want)) {
        return Ok(ServiceOutcome::Applied(model::arrival_ports(&s, kind)));
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
        Ok(a) => Ok(ServiceOutcome::Applied(model::arrival_ports(&a, kind))),
        // every port of the cluster's node-port range is taken: waits for one to be freed, or for the cluster's
        // admin (the range is the apiserver's `--service-node-port-range`)
        Err(kube::Error::Api(e)) if e.message.contains("range is full") => {
            Ok(ServiceOutcome::Refused {
                reason: NODE_PORTS_EXHAUSTED,
                message: format!(
                    "the cluster has no node port left for the Service {ns}/{name}: {}; each port of a SharedLB on this cloud takes one from the apiserver's node-port range (--service-node-port-range), shared with every NodePort and LoadBalancer Service of the cluster. Tried again every {}s",
                    e.message,
                    RETRY_REFUSED.as_secs()
                ),
            })
        }
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

pub(super) const NODE_PORT_TAKEN: &str = "NodePortTaken";
pub(super) const NODE_PORTS_EXHAUSTED: &str = "NodePortsExhausted";

/// Names the shared load balancer's address in a classed Service's status (`model::ingress_status`), unless it
/// already does: what kube-proxy routes by, and what `kubectl get svc` shows.
pub(super) async fn publish_ingress(
    ctx: &Context,
    slb: &SharedLB,
    info: &LoadBalancerInfo,
) -> Result<(), Error> {
    let ns = slb.namespace().unwrap_or_default();
    let name = service_name(&slb.name_any());
    let stored = ctx.services.get(&ObjectRef::new(&name).within(&ns));
    if stored.is_some_and(|s| model::ingress_is_current(&s, info)) {
        return Ok(());
    }
    ctx.fence.check()?;
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(model::ingress_status(info)),
    )
    .await
    .map_err(Error::from_kube)?;
    Ok(())
}

/// The node ports the apiserver says are taken: `...nodePort: Invalid value: 31500: provided port is already
/// allocated` (one such cause per port).
pub(super) fn taken_node_ports(msg: &str) -> Vec<u16> {
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
