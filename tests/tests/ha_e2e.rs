//! Two real `sharedlb run --leader-elect` processes against the real apiserver: one leads, the other writes
//! nothing; kill -9 the leader mid-burst and the other takes over within the lease, rebuilds, and finishes with
//! no duplicate load balancer or port. Metrics are scraped from /metrics as a user's Prometheus would.

use std::collections::BTreeSet;

use kube::Api;
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::replica::{leads, scrape, start_replica, sum, which_leads};
use sharedlb_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_burst_the_follower_finishes_without_duplicates() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let dir = std::env::temp_dir().join(format!("sharedlb-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let lease = format!("ha-{:06x}", fastrand::u32(..0xff_ffff));
    let (ma, mb) = (free_port(), free_port());
    let mut a = start_replica("replica-a", &lease, "ha", ma, &dir.join("a.log"));
    let mut b = start_replica("replica-b", &lease, "ha", mb, &dir.join("b.log"));

    // exactly one leads
    let (leader_port, follower_port) = which_leads(ma, mb).await;

    let ns = namespace(&client, "ha", &[]).await;
    create_pool(
        &client,
        "ha",
        json!({"provider": local_provider(&(10..15).map(|i| format!("127.0.8.{i}")).collect::<Vec<_>>()),
               "capacity": {"maxPortsPerLoadBalancer": 5}, "portRange": {"min": 4000, "max": 4999}}),
    )
    .await;
    let backend = echo::tcp("ha", 0).await.expect("backend");
    let creates = (0..20).map(|i| {
        let (client, ns) = (client.clone(), ns.clone());
        async move {
            let name = format!("h{i:02}");
            let spec = json!({"pool": "ha", "selector": {"app": "x"}, "ports": [{"name": "tcp", "targetPort": 8080}]});
            create_slb(&client, &ns, &name, spec).await;
            put_endpoints(&client, &ns, &name, "tcp", "TCP", &[backend]).await;
        }
    });
    futures::future::join_all(creates).await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let ready_count = || async {
        api.list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .filter(|s| condition(s, "Ready").is_some_and(|c| c.0 == "True"))
                    .count()
            })
            .unwrap_or(0)
    };
    eventually(60, "a few Ready", || async {
        (ready_count().await >= 2).then_some(())
    })
    .await;

    // the follower has written nothing and called no cloud
    let f = scrape(follower_port).await.expect("follower metrics");
    assert_eq!(
        sum(&f, "sharedlb_reconciles_total", &[]),
        0.0,
        "the follower reconciled: {f:?}"
    );
    assert_eq!(
        sum(&f, "sharedlb_cloud_calls_total", &[]),
        0.0,
        "the follower called the cloud"
    );
    // the leader's metrics move
    let l = scrape(leader_port).await.expect("leader metrics");
    assert!(
        sum(
            &l,
            "sharedlb_reconciles_total",
            &["controller=\"sharedlb\"", "result=\"ok\""]
        ) > 0.0,
        "{l:?}"
    );
    assert!(sum(&l, "sharedlb_allocations_total", &["pool=\"ha\""]) > 0.0);
    assert!(
        sum(
            &l,
            "sharedlb_cloud_calls_total",
            &[
                "provider=\"local\"",
                "operation=\"ensure_listener\"",
                "result=\"ok\""
            ]
        ) > 0.0
    );

    // kill -9 the leader in the middle of the burst
    let at_kill = ready_count().await;
    let leader = if leader_port == ma { &mut a } else { &mut b };
    leader.start_kill().expect("SIGKILL");
    leader.wait().await.expect("reaped");
    eprintln!("ha: {at_kill} of 20 were Ready when the leader was killed");

    leads(follower_port, 60).await;
    let mut seen = BTreeSet::new();
    let mut ips = BTreeSet::new();
    let mut lbs = BTreeSet::new();
    for i in 0..20 {
        let s = ready(&client, &ns, &format!("h{i:02}"), 60).await;
        let st = s.status.as_ref().expect("status");
        let addr = external_addr(&s, None);
        let ip = addr.ip();
        assert!(seen.insert(addr), "duplicate {addr} after failover");
        ips.insert(ip);
        lbs.insert(
            st.load_balancer
                .as_ref()
                .map(|l| l.name.clone())
                .expect("lb"),
        );
        let reply = eventually(10, &format!("{addr} answers"), || async {
            echo::tcp_ask(addr, "p").await.ok()
        })
        .await;
        assert_eq!(reply, "ha:p", "the new leader bound every allocated port");
    }
    assert_eq!(
        (ips.len(), lbs.len()),
        (4, 4),
        "20 at capacity 5 is 4 load balancers after failover: {lbs:?}"
    );
    // the traffic shows on the new leader's /metrics, per listener (sampled every 10 s)
    eventually(30, "listener counters on /metrics", || async {
        let m = scrape(follower_port).await?;
        let conns = sum(
            &m,
            "sharedlb_listener_connections",
            &["pool=\"ha\"", "protocol=\"TCP\""],
        );
        let bytes = sum(&m, "sharedlb_listener_bytes_in", &["pool=\"ha\""]);
        (conns >= 20.0 && bytes >= 20.0).then_some(())
    })
    .await;
    let pool = Api::<sharedlb_crds::LoadBalancerPool>::all(client.clone());
    eventually(30, "pool status shows 4 full load balancers", || async {
        let st = pool.get("ha").await.ok()?.status?;
        (st.load_balancers.len() == 4 && st.totals.ports_used == 20).then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "ha").await;
    let survivor = if leader_port == ma { &mut b } else { &mut a };
    let _ = survivor.start_kill();
    let _ = survivor.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
