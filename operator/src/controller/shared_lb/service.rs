//! The backing NodePort Service: made what the model says, written only when it differs, never taken over.

use super::*;

/// What became of the backing Service.
pub(super) enum ServiceOutcome {
    /// The apiserver has it as the model says: its node ports by port name.
    Applied(BTreeMap<String, u16>),
    /// The apiserver, or a Service of that name that this SharedLB did not make, stands in the way: the user's
    /// to fix, told by a condition and an Event.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Makes the backing NodePort Service what the model says, writing only when it differs. A Service of that name
/// that this SharedLB did not create is never taken over.
pub(super) async fn deploy_service(
    ctx: &Context,
    slb: &SharedLB,
    allocation: &Allocation,
    mode: PortMode,
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
    let want = model::backing_service(slb, allocation, mode, existing.as_ref());
    if let Some(s) = existing.filter(|s| model::service_is_current(s, &want)) {
        return Ok(ServiceOutcome::Applied(model::node_ports(&s)));
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
        Ok(a) => Ok(ServiceOutcome::Applied(model::node_ports(&a))),
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
