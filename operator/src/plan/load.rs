//! What `plan` reads: the cluster (LIST only: pools, SharedLBs, namespaces) and SharedLB manifests.

use std::sync::Arc;

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::ListParams;
use kube::{Api, Client, Resource};
use sharedlb_crds::{LoadBalancerPool, SharedLB};

use super::Inputs;

/// The pools, the SharedLBs and the namespaces' labels as the cluster has them now.
pub async fn from_cluster(client: &Client) -> anyhow::Result<Inputs> {
    let lp = ListParams::default();
    let pools = Api::<LoadBalancerPool>::all(client.clone())
        .list(&lp)
        .await
        .context("listing LoadBalancerPools")?;
    let live = Api::<SharedLB>::all(client.clone())
        .list(&lp)
        .await
        .context("listing SharedLBs")?;
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&lp)
        .await
        .context("listing Namespaces")?;
    Ok(Inputs {
        pools: pools.items.into_iter().map(Arc::new).collect(),
        live: live.items,
        namespaces: namespaces
            .items
            .into_iter()
            .filter_map(|n| Some((n.metadata.name?, n.metadata.labels.unwrap_or_default())))
            .collect(),
        proposed: Vec::new(),
    })
}

/// The SharedLBs of one manifest text (YAML or JSON, many documents, or a `List`), in their order; a document
/// without a namespace is in `namespace`. Anything that is not a SharedLB is refused: plan places SharedLBs
/// against the pools as they are.
pub fn shared_lbs(text: &str, source: &str, namespace: &str) -> anyhow::Result<Vec<SharedLB>> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = <serde_json::Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("{source}: document {}", i + 1))?;
        collect(value, source, namespace, &mut out)?;
    }
    Ok(out)
}

fn collect(
    value: serde_json::Value,
    source: &str,
    namespace: &str,
    out: &mut Vec<SharedLB>,
) -> anyhow::Result<()> {
    if value.is_null() {
        return Ok(());
    }
    let kind = value.get("kind").and_then(|k| k.as_str()).unwrap_or("");
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or("");
    match kind {
        "List" => {
            let items = value.get("items").and_then(|i| i.as_array()).cloned();
            for item in items.unwrap_or_default() {
                collect(item, source, namespace, out)?;
            }
        }
        "SharedLB" if api_version == SharedLB::api_version(&()) => {
            let mut slb: SharedLB = serde_json::from_value(value)
                .with_context(|| format!("{source}: a SharedLB that does not parse"))?;
            if slb.metadata.name.is_none() {
                bail!("{source}: a SharedLB without metadata.name");
            }
            slb.metadata
                .namespace
                .get_or_insert_with(|| namespace.to_string());
            out.push(slb);
        }
        _ => bail!(
            "{source}: plan reads SharedLBs ({}), not {api_version} {kind}; apply pools and namespaces first",
            SharedLB::api_version(&())
        ),
    }
    Ok(())
}

/// Reads the manifests: file paths, `-` for standard input.
pub fn read_manifests(paths: &[String], namespace: &str) -> anyhow::Result<Vec<SharedLB>> {
    let mut out = Vec::new();
    for path in paths {
        let text = match path.as_str() {
            "-" => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
            p => std::fs::read_to_string(p).with_context(|| format!("reading {p}"))?,
        };
        out.extend(shared_lbs(&text, path, namespace)?);
    }
    Ok(out)
}
