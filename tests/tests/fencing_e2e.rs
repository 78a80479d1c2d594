//! Fencing, with two real `sharedlb run --leader-elect` processes, the real apiserver and moto as the one cloud
//! account both reach. The leader is paused (SIGSTOP) past its lease in the middle of a burst of creates,
//! deletes and an update; the other takes over and finishes the burst; then the old leader wakes (SIGCONT) with a
//! belief that is no longer true. It must change nothing: afterwards no (load balancer, port, protocol) is held
//! twice and the cloud's listeners are exactly the ones the SharedLBs hold, each with the owner that holds it.
#![cfg(feature = "aws")]

use std::time::Duration;

use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::aws::{network, provider_of};
use sharedlb_e2e::invariants::{all_ready, held_by_statuses, held_in};
use sharedlb_e2e::replica::{leads, start_replica, which_leads};
use sharedlb_e2e::*;

const CLUSTER: &str = "fence";

fn port(name: &str) -> serde_json::Value {
    json!({"name": name, "targetPort": 8080})
}

fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_changes_nothing_when_it_wakes() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    let dir = std::env::temp_dir().join(format!("sharedlb-fence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let lease = format!("fence-{:06x}", fastrand::u32(..0xff_ffff));
    let (ma, mb) = (free_port(), free_port());
    let mut a = start_replica("replica-a", &lease, CLUSTER, ma, &dir.join("a.log"));
    let mut b = start_replica("replica-b", &lease, CLUSTER, mb, &dir.join("b.log"));
    let (leader_port, follower_port) = which_leads(ma, mb).await;
    let (leader, leader_log) = if leader_port == ma {
        (&mut a, dir.join("a.log"))
    } else {
        (&mut b, dir.join("b.log"))
    };

    let ns = namespace(&client, "fence", &[]).await;
    let pool = format!("fence-{}", fastrand::u32(..100_000));
    let aws = json!({"region": "us-east-1", "vpcId": vpc, "subnetIds": subnets});
    let spec = json!({"provider": {"aws": aws}, "capacity": {"maxPortsPerLoadBalancer": 4}});
    create_pool(&client, &pool, spec).await;
    let slb = |ports: Vec<serde_json::Value>| json!({"pool": pool, "selector": {"app": "x"}, "ports": ports});
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let first: Vec<String> = (0..6).map(|i| format!("f{i:02}")).collect();
    for n in &first {
        create_slb(&client, &ns, n, slb(vec![port("a")])).await;
    }
    all_ready(&api, &first, 90).await;

    // pause the leader, and change things while it sleeps
    signal(leader, "-STOP");
    let paused = std::time::Instant::now();
    let second: Vec<String> = (6..16).map(|i| format!("f{i:02}")).collect();
    for n in &second {
        create_slb(&client, &ns, n, slb(vec![port("a")])).await;
    }
    for n in ["f00", "f01"] {
        api.delete(n, &DeleteParams::default())
            .await
            .expect("delete");
    }
    let narrowed = json!({"spec": {"sourceRanges": ["198.51.100.0/24"]}});
    api.patch("f02", &PatchParams::default(), &Patch::Merge(&narrowed))
        .await
        .expect("narrow f02");
    leads(follower_port, 60).await;
    eprintln!(
        "fence: the follower leads {:?} after the pause",
        paused.elapsed()
    );
    let live: Vec<String> = (2..16).map(|i| format!("f{i:02}")).collect();
    all_ready(&api, &live, 120).await;
    let before = held_by_statuses(&api).await;

    // wake the old leader: it must stop without changing anything
    signal(leader, "-CONT");
    let exited = tokio::time::timeout(Duration::from_secs(60), leader.wait()).await;
    let status = exited
        .expect("the old leader stops once it wakes")
        .expect("reaped");
    assert!(
        !status.success(),
        "it stops as having lost the lease: {status:?}"
    );
    let log = std::fs::read_to_string(&leader_log).unwrap_or_default();
    let fenced = log
        .matches("cannot prove it still holds the leader lease")
        .count();
    eprintln!("fence: the old leader refused {fenced} actions after waking");

    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = held_by_statuses(&api).await;
    assert_eq!(
        after, before,
        "the statuses changed after the old leader woke"
    );
    let provider = provider_of(&client, CLUSTER, &pool).await;
    assert_eq!(
        held_in(&provider.inventory().await.expect("inventory"), &pool),
        after,
        "the cloud's listeners are exactly what the SharedLBs hold"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    let left = held_in(&provider.inventory().await.expect("inventory"), &pool);
    assert!(left.is_empty(), "moto still holds {left:?}");
    let lbs = provider
        .inventory()
        .await
        .expect("inventory")
        .load_balancers;
    assert!(lbs.is_empty(), "moto still holds load balancers: {lbs:?}");
    let survivor = if leader_port == ma { &mut b } else { &mut a };
    let _ = survivor.start_kill();
    let _ = survivor.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
