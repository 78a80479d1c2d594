//! The floor: a bare client making the writes any operator must make for N SharedLBs, with nothing else.

use std::time::Instant;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sharedlb_crds::{FINALIZER, SharedLB, service_name};

use crate::requests::Requests;
use crate::{Config, calm, each, ignore_not_found, shared_lb, until};

/// The pool the floor's SharedLBs name: it does not exist, and no operator runs while they do.
const FLOOR_POOL: &str = "floor-pool";

/// The floor: what a bare client takes to make the writes an operator must make for N SharedLBs.
#[derive(Debug)]
pub struct Floor {
    pub secs: f64,
    /// The apiserver's count of them (a check of the counting: 5 writes per SharedLB).
    pub requests: Requests,
}

/// Phase 2: per SharedLB, C at a time: create it, add the finalizer, write the allocation to its status, create
/// the NodePort Service, write Ready. Timed from the first create to the last write. Then, untimed, all of it is
/// taken away again (the namespace stays: deleting it would set the controller-manager writing mid-measurement).
pub async fn floor(client: &Client, cfg: &Config, ns: &str) -> anyhow::Result<Floor> {
    let before = calm(client).await?;
    let t0 = Instant::now();
    each(cfg.n, cfg.concurrency, |i| floor_writes(client, ns, i)).await?;
    let secs = t0.elapsed().as_secs_f64();
    let requests = Requests::scrape(client).await?.since(&before);
    eprintln!("scale: floor: {} SharedLBs written in {secs:.2} s", cfg.n);
    clear_floor(client, cfg, ns).await?;
    Ok(Floor { secs, requests })
}

pub fn floor_name(i: usize) -> String {
    format!("f{i:05}")
}

/// The five writes for SharedLB number `i`, one after the other, as an operator would make them.
pub async fn floor_writes(client: &Client, ns: &str, i: usize) -> anyhow::Result<()> {
    let slbs: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let name = floor_name(i);
    let spec = json!({"pool": FLOOR_POOL, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]});
    let created = slbs
        .create(&PostParams::default(), &shared_lb(ns, &name, spec)?)
        .await?;
    let merge = PatchParams::default();
    let finalizer = json!({"metadata": {"finalizers": [FINALIZER]}});
    slbs.patch(&name, &merge, &Patch::Merge(&finalizer)).await?;
    // packed as the operator would: 50 ports to a load balancer
    let (lb, port) = (format!("{FLOOR_POOL}-{}", i / 50), 10000 + (i % 50) as i32);
    let allocated = json!({"status": {
        "pool": FLOOR_POOL, "loadBalancer": {"name": lb},
        "ports": [{"name": "p", "port": port, "protocol": "TCP"}],
        "conditions": [floor_condition("Allocated", &format!("placed on {lb}"))],
    }});
    slbs.patch_status(&name, &merge, &Patch::Merge(&allocated))
        .await?;
    let service = services
        .create(&PostParams::default(), &floor_service(&created, port)?)
        .await?;
    let node_port = service
        .spec
        .and_then(|s| s.ports?.first()?.node_port)
        .context("the floor Service has no node port")?;
    let ip = format!("198.51.100.{}", 1 + (i / 50) % 254);
    let ready = json!({"status": {
        "observedGeneration": 1, "pool": FLOOR_POOL, "loadBalancer": {"name": lb, "ip": ip},
        "ports": [{"name": "p", "port": port, "nodePort": node_port, "protocol": "TCP"}],
        "serviceName": service_name(&name), "portSummary": format!("{port}/TCP"),
        "conditions": [
            floor_condition("Allocated", &format!("placed on {lb}")),
            floor_condition("Programmed", &format!("listeners programmed on {lb}")),
            floor_condition("Ready", &format!("reachable at {ip} on {port}/TCP")),
        ],
    }});
    slbs.patch_status(&name, &merge, &Patch::Merge(&ready))
        .await?;
    Ok(())
}

pub fn floor_condition(type_: &str, message: &str) -> serde_json::Value {
    json!({"type": type_, "status": "True", "reason": type_, "message": message,
           "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1})
}

/// The backing Service as the operator makes it: NodePort, owned by the SharedLB.
pub fn floor_service(slb: &SharedLB, port: i32) -> anyhow::Result<Service> {
    let name = slb.name_any();
    Ok(serde_json::from_value(json!({
        "metadata": {
            "name": service_name(&name), "namespace": slb.namespace(),
            "labels": {"app.kubernetes.io/managed-by": "sharedlb-floor"},
            "ownerReferences": [{"apiVersion": "sharedlb.dev/v1alpha1", "kind": "SharedLB", "name": name,
                                 "uid": slb.uid(), "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"type": "NodePort", "selector": {"app": "x"},
                 "ports": [{"name": "p", "port": port, "targetPort": 80, "protocol": "TCP"}]},
    }))?)
}

/// Takes the floor's SharedLBs (finalizer off, then deleted) and Services away, and waits until they are gone.
pub async fn clear_floor(client: &Client, cfg: &Config, ns: &str) -> anyhow::Result<()> {
    let slbs: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    each(cfg.n, cfg.concurrency, |i| {
        let (slbs, services) = (slbs.clone(), services.clone());
        async move {
            let name = floor_name(i);
            let no_finalizer = json!({"metadata": {"finalizers": null}});
            let merge = PatchParams::default();
            slbs.patch(&name, &merge, &Patch::Merge(&no_finalizer))
                .await?;
            ignore_not_found(slbs.delete(&name, &DeleteParams::default()).await)?;
            ignore_not_found(
                services
                    .delete(&service_name(&name), &DeleteParams::default())
                    .await,
            )
        }
    })
    .await?;
    let one = ListParams::default().limit(1);
    until(cfg.patience(), "the floor's objects gone", || async {
        let left = slbs.list(&one).await?.items.len() + services.list(&one).await?.items.len();
        Ok(left == 0)
    })
    .await
}
