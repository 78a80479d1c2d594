//! Nodes: the M Ready ones made first, and the churn of a few added and removed one at a time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use sharedlb_e2e::add_ready_node_at;

use crate::process::OperatorProcess;
use crate::requests::split_series;
use crate::{Config, each, until};

/// Nodes added, then removed, one at a time in the node churn.
pub const CHURN_NODES: usize = 10;
/// The operator sends nodes to its providers on a 5 s tick: each node change is given one tick and a bit.
const CHURN_WAIT: Duration = Duration::from_secs(6);
/// The operator samples its providers' API call counts (`sharedlb_cloud_api_calls`) every 10 s.
const API_CALLS_SAMPLED: Duration = Duration::from_secs(11);

/// Phase 1: M Ready Nodes (create + status), C at a time. Nothing marks them NotReady later: the test env's
/// controller-manager runs no node-lifecycle controller.
pub async fn create_nodes(client: &Client, cfg: &Config) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    each(cfg.nodes, cfg.concurrency, |i| async move {
        add_node(client, &format!("node-{i:05}"), i).await;
        Ok(())
    })
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("scale: {} Ready Nodes in {secs:.2} s", cfg.nodes);
    Ok(secs)
}

pub async fn add_node(client: &Client, name: &str, i: usize) {
    let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
    add_ready_node_at(client, name, &format!("memory:///{name}"), Some(&ip)).await;
}

/// The Nodes that are Ready now (a check that nothing turned them NotReady during the run).
pub async fn ready_nodes(client: &Client) -> anyhow::Result<usize> {
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(nodes
        .items
        .iter()
        .filter(|n| {
            let conditions = n.status.as_ref().and_then(|s| s.conditions.as_ref());
            conditions.is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count())
}

/// Cloud calls per node change, by operation.
#[derive(Debug)]
pub struct Churn {
    pub per_add: BTreeMap<String, f64>,
    pub per_remove: BTreeMap<String, f64>,
}

/// Phase 7: Ready nodes added one at a time, then removed one at a time, each given a node-sync tick; the
/// operator's own count of cloud calls, by operation. Counted from after the (restarted) operator's first node
/// update, which would otherwise fall into the window.
pub async fn node_churn(client: &Client, op: &OperatorProcess) -> anyhow::Result<Churn> {
    let names: Vec<String> = (0..CHURN_NODES).map(|i| format!("churn-{i:02}")).collect();
    until(
        Duration::from_secs(30),
        "the operator's first node update",
        || async { Ok(cloud_calls(&op.metrics().await?).contains_key("update_nodes")) },
    )
    .await?;
    tokio::time::sleep(API_CALLS_SAMPLED).await;
    let start = cloud_calls(&op.metrics().await?);
    for (i, name) in names.iter().enumerate() {
        add_node(client, name, 60000 + i).await;
        tokio::time::sleep(CHURN_WAIT).await;
    }
    tokio::time::sleep(API_CALLS_SAMPLED).await;
    let added = cloud_calls(&op.metrics().await?);
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &names {
        nodes.delete(name, &DeleteParams::default()).await?;
        tokio::time::sleep(CHURN_WAIT).await;
    }
    tokio::time::sleep(API_CALLS_SAMPLED).await;
    let removed = cloud_calls(&op.metrics().await?);
    let per_node = |after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>| {
        after
            .iter()
            .map(|(op, v)| {
                (
                    op.clone(),
                    (v - before.get(op).unwrap_or(&0.0)) / CHURN_NODES as f64,
                )
            })
            .filter(|(_, v)| *v != 0.0)
            .collect()
    };
    Ok(Churn {
        per_add: per_node(&added, &start),
        per_remove: per_node(&removed, &added),
    })
}

/// `sharedlb_cloud_calls_total` by operation (summed over provider and result), and the provider's own count of
/// the cloud API calls under them (`sharedlb_cloud_api_calls`, e.g. `set_targets`: one per load balancer whose
/// targets changed), as `api:<operation>`.
pub fn cloud_calls(metrics: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (series, v) in metrics {
        let (name, labels) = split_series(series);
        let op = match name {
            "sharedlb_cloud_calls_total" => labels.get("operation").cloned(),
            "sharedlb_cloud_api_calls" => labels.get("operation").map(|o| format!("api:{o}")),
            _ => None,
        };
        if let Some(op) = op {
            *out.entry(op).or_default() += v;
        }
    }
    out
}
