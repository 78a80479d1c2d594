//! Two real `sharedlb run --leader-elect` processes against the real apiserver: one leads, the other writes
//! nothing; kill -9 the leader mid-burst and the other takes over within the lease, rebuilds, and finishes with
//! no duplicate load balancer or port. Metrics are scraped from /metrics as a user's Prometheus would.

use std::collections::BTreeSet;

use kube::Api;
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::replica::{leads, scrape, start_replica, sum, tcp_carrier, which_leads};
use sharedlb_e2e::*;
use tokio::io::AsyncWriteExt;

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

/// Traffic does not wait for the lease: the replica that does not lead serves the listeners the statuses describe
/// (SO_REUSEPORT lets both replicas serve one address). With a long TCP transfer through that replica, a UDP
/// exchange and a new connection every 100 ms, kill -9 the leader: the transfer goes on, through the lease
/// handover and the new leader taking the listeners over in place; the exchange and the new connections keep
/// being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_survives_the_leader_through_the_replica_that_stays() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let dir = std::env::temp_dir().join(format!("sharedlb-fwd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log dir");
    let lease = format!("fwd-{:06x}", fastrand::u32(..0xff_ffff));
    let (ma, mb) = (free_port(), free_port());
    let mut a = start_replica("fwd-a", &lease, "fwd", ma, &dir.join("a.log"));
    let mut b = start_replica("fwd-b", &lease, "fwd", mb, &dir.join("b.log"));
    let (leader_port, follower_port) = which_leads(ma, mb).await;
    let (leader, follower) = if leader_port == ma {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let follower_pid = follower.id().expect("the follower runs");
    let pids = [leader.id().expect("the leader runs"), follower_pid];

    let ns = namespace(&client, "fwd", &[]).await;
    let pool = json!({"provider": local_provider(&["127.0.18.10".to_string()]),
                      "capacity": {"maxPortsPerLoadBalancer": 5}, "portRange": {"min": 4000, "max": 4999}});
    create_pool(&client, "fwd", pool).await;
    let (stream_backend, dgram_backend) = (
        echo::tcp("stream", 0).await.expect("tcp backend"),
        echo::udp("dgram", 0).await.expect("udp backend"),
    );
    let spec = |proto: &str| json!({"pool": "fwd", "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 8080, "protocol": proto}]});
    create_slb(&client, &ns, "stream", spec("TCP")).await;
    create_slb(&client, &ns, "dgram", spec("UDP")).await;
    put_endpoints(&client, &ns, "stream", "p", "TCP", &[stream_backend]).await;
    put_endpoints(&client, &ns, "dgram", "p", "UDP", &[dgram_backend]).await;
    let tcp_addr = external_addr(&ready(&client, &ns, "stream", 30).await, None);
    let udp_addr = external_addr(&ready(&client, &ns, "dgram", 30).await, None);

    // a connection the follower carries: the kernel spreads connections over both replicas' sockets
    let mut held = eventually(30, "a connection through the follower", || async {
        let mut s = tokio::net::TcpStream::connect(tcp_addr).await.ok()?;
        s.write_all(b"0").await.ok()?;
        (echo::read_reply(&mut s, "0").await.ok()? == "stream:0").then_some(())?;
        let carrier = tcp_carrier(tcp_addr, s.local_addr().ok()?, &pids)?;
        (carrier == follower_pid).then_some(s)
    })
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probes = tokio::spawn({
        let stop = stop.clone();
        async move {
            let (mut asked, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                asked += 1;
                if echo::tcp_ask(tcp_addr, "n").await.ok().as_deref() != Some("stream:n") {
                    failed.push(asked);
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            (asked, failed)
        }
    });
    let exchange = tokio::spawn({
        let stop = stop.clone();
        async move {
            let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("udp client");
            let (mut answered, mut longest_gap) = (0u32, std::time::Duration::ZERO);
            let mut last = std::time::Instant::now();
            let mut buf = [0u8; 256];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = s.send_to(b"u", udp_addr).await;
                let wait = std::time::Duration::from_millis(200);
                if let Ok(Ok(n)) = tokio::time::timeout(wait, s.recv(&mut buf)).await
                    && &buf[..n] == b"dgram:u"
                {
                    answered += 1;
                    longest_gap = longest_gap.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            (answered, longest_gap.max(last.elapsed()))
        }
    });
    for i in 1..=10 {
        transfer(&mut held, i).await;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    leader.start_kill().expect("SIGKILL");
    leader.wait().await.expect("reaped");
    let killed = std::time::Instant::now();
    let mut i = 10;
    // through the lease's expiry (6 s), the follower leading and taking the listeners over, and a while after
    let mut led_at = None;
    while led_at.is_none_or(|t: std::time::Instant| t.elapsed() < std::time::Duration::from_secs(4))
    {
        i += 1;
        transfer(&mut held, i).await;
        if led_at.is_none()
            && scrape(follower_port)
                .await
                .and_then(|m| m.get("sharedlb_leader").copied())
                == Some(1.0)
        {
            led_at = Some(std::time::Instant::now());
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(60),
            "the follower never led"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (asked, failed) = probes.await.expect("probes");
    let (answered, longest_gap) = exchange.await.expect("exchange");
    eprintln!(
        "forwarding: {i} messages on the held connection, {asked} new connections ({} failed), {answered} datagrams answered (longest gap {longest_gap:?}); the follower led {:?} after the kill",
        failed.len(),
        led_at.map(|t| t - killed)
    );
    // the one connection in flight when the leader died may be lost with it; none after
    assert!(
        failed.len() <= 1,
        "new connections failed during the handover: {failed:?} of {asked}"
    );
    assert!(
        longest_gap < std::time::Duration::from_secs(2),
        "the UDP exchange stalled for {longest_gap:?}"
    );
    let st = ready(&client, &ns, "stream", 30).await;
    assert_eq!(
        external_addr(&st, None),
        tcp_addr,
        "the new leader kept the allocation"
    );
    // the forwarder's budget on /metrics: the held connection is in it (sampled every 10 s)
    eventually(25, "the budget in use on /metrics", || async {
        let m = scrape(follower_port).await?;
        let used = sum(
            &m,
            "sharedlb_forwarder_budget_used",
            &["resource=\"connections\""],
        );
        let limit = sum(
            &m,
            "sharedlb_forwarder_budget_limit",
            &["resource=\"connections\""],
        );
        (used >= 1.0 && limit == 16384.0).then_some(())
    })
    .await;
    transfer(&mut held, i + 1).await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "fwd").await;
    let _ = follower.start_kill();
    let _ = follower.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// One message of the long transfer on `held`, answered by the backend through the same connection.
async fn transfer(held: &mut tokio::net::TcpStream, i: u32) {
    let msg = format!("t{i}");
    held.write_all(msg.as_bytes())
        .await
        .expect("the held connection takes data");
    let reply = echo::read_reply(held, &msg)
        .await
        .expect("the held connection answers");
    assert_eq!(reply, format!("stream:{msg}"));
}
