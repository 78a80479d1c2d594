//! Torture: a seeded churn of creates, updates and deletes with the operator killed at random points in between,
//! then the invariants. Against moto, the real `sharedlb` binary is killed with SIGKILL (no shutdown of any
//! kind) and started again; against a memory pool that fails 10 % and throttles 5 % of its cloud calls, the
//! in-process operator is stopped and started again. Either way, once it settles: every SharedLB Ready, no
//! (load balancer, port, protocol) held twice, no load balancer over capacity, the cloud's listeners exactly the
//! ones the SharedLBs hold (nothing without a live owner), and after deleting everything nothing left.
#![cfg(feature = "aws")]

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;

use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::aws::{cloud_of, network, provider_of};
use sharedlb_e2e::invariants::{all_ready, assert_within_capacity, held_by_statuses, held_in};
use sharedlb_e2e::replica::start_single;
use sharedlb_e2e::*;
use sharedlb_providers::memory::{Faults, MemoryCloud, MemoryProvider};
use sharedlb_providers::{LoadBalancerProvider, ProviderError};
use tokio::sync::Mutex;

const OPS: usize = 110;
const RESTARTS: usize = 22;
const PER_LB: usize = 5;

fn ports(names: &[&str]) -> serde_json::Value {
    names
        .iter()
        .map(|n| json!({"name": n, "targetPort": 8080}))
        .collect()
}

/// Runs `OPS` seeded changes (40 % creates, 20 % deletes, 40 % updates) on SharedLBs in `ns`, calling `restart` before `RESTARTS` of them
/// chosen at random. Updates never grow a SharedLB (growth may be refused for room, which is correct but not
/// Ready). Returns the names that exist at the end and how many of each change was made.
async fn churn<F, Fut>(
    client: &Client,
    ns: &str,
    pool: &str,
    seed: u64,
    mut restart: F,
) -> Vec<String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut at: BTreeSet<usize> = BTreeSet::new();
    while at.len() < RESTARTS {
        at.insert(rng.usize(..OPS));
    }
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    let mut live: BTreeSet<String> = BTreeSet::new();
    let (mut created, mut updated, mut deleted) = (0, 0, 0);
    for i in 0..OPS {
        if at.contains(&i) {
            restart().await;
        }
        let pick = rng.u8(..10);
        let name = match live.iter().nth(rng.usize(..live.len().max(1))) {
            // a deleted name is never used again: its object may still be finishing its deletion
            Some(n) if pick >= 4 => n.clone(),
            _ => format!("t{:03}", created),
        };
        match (live.contains(&name), pick) {
            (false, _) => {
                let p = if rng.bool() {
                    vec!["a"]
                } else {
                    vec!["a", "b"]
                };
                let spec = json!({"pool": pool, "selector": {"app": "x"}, "ports": ports(&p)});
                create_slb(client, ns, &name, spec).await;
                live.insert(name);
                created += 1;
            }
            (true, 4 | 5) => {
                api.delete(&name, &DeleteParams::default())
                    .await
                    .expect("delete");
                live.remove(&name);
                deleted += 1;
            }
            (true, _) => {
                // narrow or open the firewall, or keep only the first port
                let change = match rng.u8(..3) {
                    0 => json!({"spec": {"sourceRanges": ["198.51.100.0/24"]}}),
                    1 => json!({"spec": {"sourceRanges": null}}),
                    _ => json!({"spec": {"ports": ports(&["a"])}}),
                };
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&change))
                    .await
                    .expect("update");
                updated += 1;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(rng.u64(10..120))).await;
    }
    eprintln!(
        "torture: {created} creates, {updated} updates, {deleted} deletes, {RESTARTS} restarts"
    );
    live.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_of_a_churn_against_moto_leaves_no_duplicate_and_no_leak() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    let cluster = format!("torture-{}", fastrand::u32(..100_000));
    let dir = std::env::temp_dir().join(format!("sharedlb-torture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let log = dir.join("operator.log");
    let metrics = free_port();
    let op = Arc::new(Mutex::new(Some(start_single(&cluster, metrics, &log))));

    let ns = namespace(&client, "torture", &[]).await;
    let pool = format!("torture-{}", fastrand::u32(..100_000));
    let aws = json!({"region": "us-east-1", "vpcId": vpc, "subnetIds": subnets});
    let spec = json!({"provider": {"aws": aws}, "capacity": {"maxPortsPerLoadBalancer": PER_LB}});
    create_pool(&client, &pool, spec).await;
    let live = churn(&client, &ns, &pool, 0x5eed_0001, || {
        let (op, cluster, log) = (op.clone(), cluster.clone(), log.clone());
        async move {
            let mut running = op.lock().await;
            if let Some(mut child) = running.take() {
                child.start_kill().expect("SIGKILL");
                child.wait().await.expect("reaped");
            }
            *running = Some(start_single(&cluster, metrics, &log));
        }
    })
    .await;

    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let provider = provider_of(&client, &cluster, &pool).await;
    check(&api, &live, provider.as_ref(), &pool).await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    let (nlbs, target_groups) = cloud_of(&cluster, None).await;
    assert!(
        nlbs.is_empty() && target_groups.is_empty(),
        "moto holds nothing of the cluster after everything is deleted: {nlbs:?}, {} target groups",
        target_groups.len()
    );
    if let Some(mut child) = op.lock().await.take() {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_during_a_churn_on_a_faulty_memory_pool_converge() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Arc::new(Mutex::new(Some(Operator::start(&client, &cloud))));
    let ns = namespace(&client, "torture-mem", &[]).await;
    let faults = json!({"errorPerMille": 100, "throttlePerMille": 50});
    let spec =
        json!({"provider": {"memory": faults}, "capacity": {"maxPortsPerLoadBalancer": PER_LB}});
    create_pool(&client, "torture-mem", spec).await;
    let live = churn(&client, &ns, "torture-mem", 0x5eed_0002, || {
        let (op, client, cloud) = (op.clone(), client.clone(), cloud.clone());
        async move {
            let mut running = op.lock().await;
            if let Some(o) = running.take() {
                o.kill().await;
            }
            *running = Some(Operator::start(&client, &cloud));
        }
    })
    .await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    // the account the operator used, read without faults; "e2e" is the harness operator's cluster id
    let provider = MemoryProvider::new(cloud.clone(), "e2e", "torture-mem", Faults::default());
    check(&api, &live, &provider, "torture-mem").await;
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "torture-mem").await;
    assert!(
        cloud_pool(&cloud, "torture-mem").is_empty(),
        "nothing left in the memory account"
    );
    if let Some(o) = op.lock().await.take() {
        o.kill().await;
    }
}

/// The invariants once the operator has settled.
async fn check(
    api: &Api<SharedLB>,
    live: &[String],
    provider: &dyn LoadBalancerProvider,
    pool: &str,
) {
    all_ready(api, live, 240).await;
    // the deleted ones may still be finishing their deletion (their cleanup retried after a kill)
    let live_set: BTreeSet<String> = live.iter().cloned().collect();
    let names = || async {
        let list = api.list(&Default::default()).await.expect("list");
        list.items
            .iter()
            .map(|s| s.name_any())
            .collect::<BTreeSet<String>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while names().await != live_set && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(
        names().await,
        live_set,
        "exactly the live SharedLBs exist (the deleted ones finished deleting)"
    );
    let held = held_by_statuses(api).await;
    assert_within_capacity(&held, PER_LB);
    // the last removals may still be under way when the last SharedLB turns Ready
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let in_cloud = loop {
        let in_cloud = match provider.inventory().await {
            Ok(i) => held_in(&i, pool),
            Err(ProviderError::Throttled { .. }) => continue,
            Err(e) => panic!("inventory: {e}"),
        };
        if in_cloud == held || std::time::Instant::now() > deadline {
            break in_cloud;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    };
    assert_eq!(
        in_cloud, held,
        "the cloud holds exactly what the SharedLBs hold"
    );
    eprintln!(
        "torture: {} SharedLBs hold {} listeners, the cloud exactly those",
        live.len(),
        in_cloud.len()
    );
}
