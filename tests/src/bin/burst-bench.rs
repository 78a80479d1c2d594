//! `scripts/bench burst`: N SharedLBs created at once against the real apiserver (KUBECONFIG), the operator
//! in-process with the memory provider; measures how fast they become Ready, end to end (create -> allocation
//! written -> Service -> cloud -> Ready status). The last line is the summary.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{DeleteParams, ListParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use sharedlb::{BuiltinProviders, Settings};
use sharedlb_crds::SharedLB;
use sharedlb_e2e::{condition, create_pool, create_slb, delete_pool, eventually, namespace};
use sharedlb_providers::memory::MemoryCloud;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    sharedlb::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let cloud = MemoryCloud::new();
    let settings = Settings {
        cluster_id: "bench".into(),
        concurrency: 64,
        ..Settings::default()
    };
    let op = {
        let (client, factory) = (
            client.clone(),
            Arc::new(BuiltinProviders::new(cloud.clone())),
        );
        tokio::spawn(async move {
            sharedlb::run(client, settings, factory, futures::future::pending()).await
        })
    };
    let ns = namespace(&client, "bench", &[]).await;
    // RATE=calls/s: the memory cloud's rate limit on mutating calls (a token bucket, one second's burst)
    let rate: Option<u32> = std::env::var("RATE").ok().and_then(|r| r.parse().ok());
    let memory = match rate {
        Some(r) => json!({"callsPerSecond": r}),
        None => json!({}),
    };
    create_pool(
        &client,
        "bench",
        json!({"provider": {"memory": memory}, "capacity": {"maxPortsPerLoadBalancer": 50}}),
    )
    .await;
    // the pool's finalizer first, so the burst measures placement rather than the pool's first reconcile
    let pools: Api<sharedlb_crds::LoadBalancerPool> = Api::all(client.clone());
    eventually(30, "pool finalizer", || async {
        (!pools.get("bench").await.ok()?.finalizers().is_empty()).then_some(())
    })
    .await;

    let t0 = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (client, ns) = (client.clone(), ns.clone());
            async move {
                let spec = json!({"pool": "bench", "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]});
                create_slb(&client, &ns, &format!("b{i:05}"), spec).await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let created = t0.elapsed();
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let ready_at = loop {
        let list = api.list(&ListParams::default()).await?;
        let ready = list
            .items
            .iter()
            .filter(|s| condition(s, "Ready").is_some_and(|c| c.0 == "True"))
            .count();
        if ready == n {
            break t0.elapsed();
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(600),
            "only {ready} of {n} Ready after 600 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let list = api.list(&ListParams::default()).await?;
    let mut endpoints: Vec<(String, i32)> = list
        .items
        .iter()
        .map(|s| {
            let st = s.status.clone().unwrap_or_default();
            (
                st.load_balancer.and_then(|l| l.ip).unwrap_or_default(),
                st.ports.first().map_or(0, |p| p.port),
            )
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    let lbs = cloud.load_balancers().len();
    println!(
        "{n} SharedLBs: all created in {:.2} s, all Ready in {:.2} s",
        created.as_secs_f64(),
        ready_at.as_secs_f64()
    );
    println!(
        "distinct (ip, port): {}, load balancers: {lbs} (lower bound {})",
        endpoints.len(),
        n.div_ceil(50)
    );
    if let Some(r) = rate {
        // every call that changed the cloud, against what the rate allowed in the time taken
        let made: u64 = cloud.mutating_calls().values().sum();
        let bound = made.saturating_sub(u64::from(r)) as f64 / f64::from(r);
        println!(
            "rate limit {r}/s: {made} calls made, {} throttled; the limit's bound {bound:.2} s, {:.0} % of it",
            cloud.throttled(),
            100.0 * bound / ready_at.as_secs_f64()
        );
    }
    for s in list.items {
        let _ = api.delete(&s.name_any(), &DeleteParams::default()).await;
    }
    eventually(600, "burst deleted", || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    delete_pool(&client, "bench").await;
    op.abort();
    println!(
        "burst items={n} seconds_to_ready={:.2} ready_per_second={:.0} lbs={lbs} lower_bound={} distinct_endpoints={}",
        ready_at.as_secs_f64(),
        n as f64 / ready_at.as_secs_f64(),
        n.div_ceil(50),
        endpoints.len()
    );
    Ok(())
}
