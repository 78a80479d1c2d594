//! The local provider end to end: a real apiserver, the operator in-process binding real sockets on loopback
//! addresses, EndpointSlices pointing at real echo backends, and real bytes through every shared IP:port.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams};
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `n` loopback addresses of a block no other test uses.
fn addresses(block: u8, n: u8) -> Vec<String> {
    (10..10 + n).map(|i| format!("127.0.{block}.{i}")).collect()
}

fn local_pool(block: u8, n: u8, capacity: u32) -> serde_json::Value {
    json!({
        "provider": local_provider(&addresses(block, n)),
        "capacity": {"maxPortsPerLoadBalancer": capacity},
        "portRange": {"min": 4000, "max": 4999},
    })
}

fn one_port(pool: &str, name: &str, protocol: &str, port: Option<u16>) -> serde_json::Value {
    let mut p = json!({"name": name, "targetPort": 8080, "protocol": protocol});
    if let Some(port) = port {
        p["port"] = json!(port);
    }
    json!({"pool": pool, "selector": {"app": "echo"}, "ports": [p]})
}

/// Waits until connecting to `addr` is refused: nothing listens there any more.
async fn closed(addr: SocketAddr, what: &str) {
    eventually(15, what, || async {
        match tokio::net::TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Some(()),
            _ => None,
        }
    })
    .await;
}

/// The SharedLB's external address for its first port.
fn external(s: &SharedLB) -> SocketAddr {
    external_addr(s, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_through_tcp_and_udp_reach_the_right_backend_and_never_cross() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let (ns_a, ns_b) = (
        namespace(&client, "local-a", &[]).await,
        namespace(&client, "local-b", &[]).await,
    );
    create_pool(&client, "local-bytes", local_pool(3, 2, 5)).await;

    let alpha = echo::tcp("alpha", 0).await.expect("alpha");
    let beta = echo::tcp("beta", 0).await.expect("beta");
    let gamma = echo::udp("gamma", 0).await.expect("gamma");
    create_slb(
        &client,
        &ns_a,
        "alpha",
        one_port("local-bytes", "tcp", "TCP", None),
    )
    .await;
    create_slb(
        &client,
        &ns_b,
        "beta",
        one_port("local-bytes", "tcp", "TCP", None),
    )
    .await;
    create_slb(
        &client,
        &ns_b,
        "gamma",
        one_port("local-bytes", "dns", "UDP", None),
    )
    .await;
    put_endpoints(&client, &ns_a, "alpha", "tcp", "TCP", &[alpha]).await;
    put_endpoints(&client, &ns_b, "beta", "tcp", "TCP", &[beta]).await;
    put_endpoints(&client, &ns_b, "gamma", "dns", "UDP", &[gamma]).await;

    let a = external(&ready(&client, &ns_a, "alpha", 30).await);
    let b = external(&ready(&client, &ns_b, "beta", 30).await);
    let g = external(&ready(&client, &ns_b, "gamma", 30).await);
    assert_eq!(a.ip(), b.ip(), "capacity 5: all three share one address");
    assert_eq!(a.ip(), g.ip());
    assert!(addresses(3, 2).contains(&a.ip().to_string()));
    for _ in 0..3 {
        assert_eq!(
            eventually(10, "alpha answers", || async {
                echo::tcp_ask(a, "hi").await.ok()
            })
            .await,
            "alpha:hi"
        );
        assert_eq!(
            echo::tcp_ask(b, "hi").await.expect("beta"),
            "beta:hi",
            "two SharedLBs on one IP never cross"
        );
        assert_eq!(
            eventually(10, "gamma answers", || async {
                echo::udp_ask(g, "q").await.ok()
            })
            .await,
            "gamma:q"
        );
    }

    delete_namespace(&client, &ns_a).await;
    delete_namespace(&client, &ns_b).await;
    delete_pool(&client, "local-bytes").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_changes_are_followed_without_dropping_established_connections() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-ep", &[]).await;
    create_pool(&client, "local-ep", local_pool(4, 1, 5)).await;
    let (old, new) = (
        echo::tcp("old", 0).await.expect("old"),
        echo::tcp("new", 0).await.expect("new"),
    );
    create_slb(
        &client,
        &ns,
        "web",
        one_port("local-ep", "http", "TCP", None),
    )
    .await;
    put_endpoints(&client, &ns, "web", "http", "TCP", &[old]).await;
    let addr = external(&ready(&client, &ns, "web", 30).await);
    let mut held = eventually(10, "a connection to old", || async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"1").await.ok()?;
        (echo::read_reply(&mut s, "1").await.ok()? == "old:1").then_some(s)
    })
    .await;

    put_endpoints(&client, &ns, "web", "http", "TCP", &[new]).await;
    eventually(15, "new connections reach the new endpoint", || async {
        (echo::tcp_ask(addr, "x").await.ok()? == "new:x").then_some(())
    })
    .await;
    held.write_all(b"2")
        .await
        .expect("the established connection is still open");
    assert_eq!(
        echo::read_reply(&mut held, "2").await.expect("reply"),
        "old:2",
        "and still talks to its endpoint"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-ep").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_closes_the_port_and_frees_it_for_the_next() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-del", &[]).await;
    create_pool(&client, "local-del", local_pool(5, 1, 5)).await;
    let backend = echo::tcp("one", 0).await.expect("backend");
    create_slb(
        &client,
        &ns,
        "first",
        one_port("local-del", "tcp", "TCP", None),
    )
    .await;
    put_endpoints(&client, &ns, "first", "tcp", "TCP", &[backend]).await;
    let addr = external(&ready(&client, &ns, "first", 30).await);
    eventually(10, "first answers", || async {
        echo::tcp_ask(addr, "a").await.ok()
    })
    .await;

    Api::<SharedLB>::namespaced(client.clone(), &ns)
        .delete("first", &DeleteParams::default())
        .await
        .expect("delete");
    closed(addr, "connect refused after delete").await;

    let second = echo::tcp("two", 0).await.expect("backend");
    create_slb(
        &client,
        &ns,
        "second",
        one_port("local-del", "tcp", "TCP", None),
    )
    .await;
    put_endpoints(&client, &ns, "second", "tcp", "TCP", &[second]).await;
    let again = external(&ready(&client, &ns, "second", 30).await);
    assert_eq!(again, addr, "the freed port is the lowest free one again");
    let reply = eventually(10, "second answers on the same port", || async {
        echo::tcp_ask(again, "b").await.ok()
    })
    .await;
    assert_eq!(reply, "two:b");

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-del").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twelve_on_capacity_five_use_exactly_three_addresses() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-12", &[]).await;
    create_pool(&client, "local-12", local_pool(6, 5, 5)).await;
    let backend = echo::tcp("b", 0).await.expect("backend");
    for i in 0..12 {
        let name = format!("s{i:02}");
        create_slb(
            &client,
            &ns,
            &name,
            one_port("local-12", "tcp", "TCP", None),
        )
        .await;
        put_endpoints(&client, &ns, &name, "tcp", "TCP", &[backend]).await;
    }
    let mut ips = BTreeSet::new();
    let mut all = BTreeSet::new();
    for i in 0..12 {
        let a = external(&ready(&client, &ns, &format!("s{i:02}"), 30).await);
        ips.insert(a.ip());
        assert!(all.insert(a), "duplicate {a}");
        let reply = eventually(10, &format!("{a} answers"), || async {
            echo::tcp_ask(a, "z").await.ok()
        })
        .await;
        assert_eq!(reply, "b:z");
    }
    assert_eq!(ips.len(), 3, "ceil(12 / 5) addresses: {ips:?}");

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-12").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_by_another_process_is_a_condition_and_recovers() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-bind", &[]).await;
    create_pool(&client, "local-bind", local_pool(7, 1, 5)).await;
    let squatter = tokio::net::TcpListener::bind("127.0.7.10:4321")
        .await
        .expect("squat");
    create_slb(
        &client,
        &ns,
        "fixed",
        one_port("local-bind", "tcp", "TCP", Some(4321)),
    )
    .await;
    let msg = refused(&client, &ns, "fixed", "CloudAlreadyExists").await;
    assert!(msg.contains("127.0.7.10:4321"), "{msg}");
    event_recorded(&client, &ns, "fixed", "CloudAlreadyExists", 10).await;
    drop(squatter);
    let backend = echo::tcp("f", 0).await.expect("backend");
    put_endpoints(&client, &ns, "fixed", "tcp", "TCP", &[backend]).await;
    let addr = external(&ready(&client, &ns, "fixed", 30).await);
    assert_eq!(addr, "127.0.7.10:4321".parse().expect("addr"));
    assert_eq!(
        eventually(10, "answers", || async {
            echo::tcp_ask(addr, "k").await.ok()
        })
        .await,
        "f:k"
    );

    // updating sourceRanges to exclude loopback shuts this client out without rebinding
    Api::<SharedLB>::namespaced(client.clone(), &ns)
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"sourceRanges": ["203.0.113.0/24"]}})),
        )
        .await
        .expect("patch");
    eventually(15, "a client outside sourceRanges gets nothing", || async {
        echo::tcp_ask(addr, "k").await.is_err().then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-bind").await;
    op.kill().await;
}

/// Applies every document of an examples/ file to the apiserver (server-side apply).
async fn apply_example(client: &kube::Client, file: &str) {
    use serde::Deserialize;
    let path = format!("{}/../examples/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example file");
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let obj = kube::api::DynamicObject::deserialize(doc).expect("a Kubernetes object");
        let gvk = kube::core::GroupVersionKind::try_from(obj.types.as_ref().expect("types"))
            .expect("gvk");
        let (ar, caps) = discovery.resolve_gvk(&gvk).expect("served");
        let api: Api<kube::api::DynamicObject> =
            match (caps.scope, obj.metadata.namespace.as_deref()) {
                (kube::discovery::Scope::Namespaced, Some(ns)) => {
                    Api::namespaced_with(client.clone(), ns, &ar)
                }
                _ => Api::all_with(client.clone(), &ar),
            };
        let name = obj.metadata.name.clone().expect("name");
        api.patch(
            &name,
            &PatchParams::apply("sharedlb-e2e").force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap_or_else(|e| panic!("{file}: {name}: {e}"));
    }
}

/// The quickstart's files, as `scripts/demo` uses them: they stay true because this test applies them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_work_as_the_demo_uses_them() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    for (name, proto, port) in [
        ("echo", "tcp", 17000),
        ("game-play", "udp", 19000),
        ("game-admin", "tcp", 19001),
        ("dns-udp", "udp", 15353),
        ("dns-tcp", "tcp", 15353),
    ] {
        match proto {
            "tcp" => echo::tcp(name, port).await.expect("backend"),
            _ => echo::udp(name, port).await.expect("backend"),
        };
    }
    for f in [
        "pool-local.yaml",
        "pool-memory.yaml",
        "sharedlb-team-a.yaml",
        "sharedlb-team-b.yaml",
        "demo-endpoints.yaml",
    ] {
        apply_example(&client, f).await;
    }
    let expect = [
        ("team-a", "echo", "tcp", "echo"),
        ("team-a", "game", "play", "game-play"),
        ("team-a", "game", "admin", "game-admin"),
        ("team-b", "dns", "dns-udp", "dns-udp"),
        ("team-b", "dns", "dns-tcp", "dns-tcp"),
    ];
    for (ns, slb, port_name, backend) in expect {
        let s = ready(&client, ns, slb, 30).await;
        let p = s
            .status
            .as_ref()
            .and_then(|st| st.ports.iter().find(|p| p.name == port_name))
            .expect("port");
        let addr = external_addr(&s, Some(port_name));
        let reply = eventually(10, &format!("{ns}/{slb} {port_name} answers"), || async {
            match p.protocol {
                sharedlb_crds::Protocol::Tcp => echo::tcp_ask(addr, "hi").await.ok(),
                sharedlb_crds::Protocol::Udp => echo::udp_ask(addr, "hi").await.ok(),
            }
        })
        .await;
        assert_eq!(reply, format!("{backend}:hi"));
    }
    for ns in ["team-a", "team-b"] {
        delete_namespace(&client, ns).await;
    }
    for pool in ["default", "memory"] {
        delete_pool(&client, pool).await;
    }
    op.kill().await;
}

/// A local pool's address that carries SharedLBs cannot be taken out of the list (its load balancer would move
/// to another address): the edit is refused with a pool condition, the SharedLB keeps answering where it was,
/// and an operator started with the refused edit in place still serves it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_address_in_use_is_refused_and_moves_nothing() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-addr", &[]).await;
    create_pool(&client, "local-addr", local_pool(9, 2, 1)).await;
    let backend = echo::tcp("kept", 0).await.expect("backend");
    for name in ["first", "second"] {
        create_slb(
            &client,
            &ns,
            name,
            one_port("local-addr", "tcp", "TCP", None),
        )
        .await;
        put_endpoints(&client, &ns, name, "tcp", "TCP", &[backend]).await;
    }
    let first = external(&ready(&client, &ns, "first", 30).await);
    let second = external(&ready(&client, &ns, "second", 30).await);
    assert_ne!(
        first.ip(),
        second.ip(),
        "one port per address: two addresses in use"
    );
    let pools = Api::<sharedlb_crds::LoadBalancerPool>::all(client.clone());
    eventually(15, "the pool's rows show both in use", || async {
        let st = pools.get("local-addr").await.ok()?.status?;
        (st.totals.ports_used == 2).then_some(())
    })
    .await;

    let dropped = first.ip().to_string();
    let keep: Vec<String> = addresses(9, 2)
        .into_iter()
        .filter(|a| *a != dropped)
        .collect();
    let edit = json!({"spec": {"provider": {"local": {"addresses": keep}}}});
    pools
        .patch("local-addr", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("drop an address in use");
    let (reason, msg) = pool_not_ready(&client, "local-addr").await;
    assert_eq!(reason, "AddressInUse", "{msg}");
    assert!(msg.contains(&dropped), "{msg}");
    for addr in [first, second] {
        let reply = eventually(10, &format!("{addr} still answers"), || async {
            echo::tcp_ask(addr, "k").await.ok()
        })
        .await;
        assert_eq!(reply, "kept:k");
    }

    // a restart with the refused edit in place serves both where they were
    op.kill().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    for addr in [first, second] {
        let reply = eventually(30, &format!("{addr} answers after a restart"), || async {
            echo::tcp_ask(addr, "r").await.ok()
        })
        .await;
        assert_eq!(reply, "kept:r");
    }
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-addr").await;
    op.kill().await;
}

/// The backing Service as the apiserver has it.
async fn backing(
    client: &kube::Client,
    ns: &str,
    slb: &str,
) -> k8s_openapi::api::core::v1::Service {
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), ns)
        .get(&format!("{slb}-sharedlb"))
        .await
        .expect("the backing Service")
}

/// The addresses the Service's status names.
fn ingress_ips(s: &k8s_openapi::api::core::v1::Service) -> Vec<String> {
    s.status
        .iter()
        .flat_map(|st| st.load_balancer.iter())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.clone())
        .collect()
}

/// With classed backing Services (what `auto` chooses on 1.24+; forced here, the 1.20 test apiserver keeping
/// `allocateLoadBalancerNodePorts` through its ServiceLBNodePortControl gate but not knowing `loadBalancerClass`):
/// no node port is taken, the Service's status names the shared address (and is put back when changed), and bytes
/// still flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classed_service_takes_no_node_port_and_names_the_shared_address() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let settings = sharedlb::Settings {
        cluster_id: "e2e".into(),
        backing_service: sharedlb::BackingService::LoadBalancerClass,
        ..sharedlb::Settings::default()
    };
    let op = Operator::start_with(&client, &MemoryCloud::new(), settings);
    let ns = namespace(&client, "local-classed", &[]).await;
    create_pool(&client, "local-classed", local_pool(11, 1, 5)).await;
    let backend = echo::tcp("classed", 0).await.expect("backend");
    create_slb(
        &client,
        &ns,
        "web",
        one_port("local-classed", "tcp", "TCP", None),
    )
    .await;
    put_endpoints(&client, &ns, "web", "tcp", "TCP", &[backend]).await;
    let slb = ready(&client, &ns, "web", 30).await;
    let addr = external(&slb);
    let reply = eventually(10, "the classed SharedLB answers", || async {
        echo::tcp_ask(addr, "c").await.ok()
    })
    .await;
    assert_eq!(reply, "classed:c");
    let status = slb.status.expect("a Ready SharedLB has a status");
    assert_eq!(status.ports[0].node_port, None, "{status:?}");

    let svc = eventually(10, "the Service names the shared address", || async {
        let s = backing(&client, &ns, "web").await;
        (!ingress_ips(&s).is_empty()).then_some(s)
    })
    .await;
    let spec = svc.spec.clone().expect("a Service has a spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.allocate_load_balancer_node_ports, Some(false));
    let ports = spec.ports.expect("ports");
    assert!(ports.iter().all(|p| p.node_port.is_none()), "{ports:?}");
    assert_eq!(ports[0].port, i32::from(addr.port()));
    assert_eq!(ingress_ips(&svc), vec![addr.ip().to_string()]);

    // someone else's write to the Service's status is undone
    let forged = json!({"status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.66"}]}}});
    Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns)
        .patch_status(
            "web-sharedlb",
            &PatchParams::default(),
            &Patch::Merge(&forged),
        )
        .await
        .expect("forge the Service's status");
    eventually(15, "the shared address is put back", || async {
        let s = backing(&client, &ns, "web").await;
        (ingress_ips(&s) == vec![addr.ip().to_string()]).then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-classed").await;
    op.kill().await;
}

/// The `EndpointsAccepted` condition once it is False: its message.
async fn endpoints_refused(client: &kube::Client, ns: &str, name: &str, naming: &str) -> String {
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    eventually(
        20,
        &format!("{ns}/{name}: endpoints refused, naming {naming}"),
        || async {
            let (st, reason, message) = condition(&api.get(name).await.ok()?, "EndpointsAccepted")?;
            (st == "False" && reason == "EndpointRefused" && message.contains(naming))
                .then_some(message)
        },
    )
    .await
}

/// A connection through `addr` reaches no backend: it is accepted, then closed without a reply.
async fn reaches_no_backend(addr: SocketAddr) -> bool {
    echo::tcp_ask(addr, "x").await.is_err()
}

/// A local pool keeps tenants to what it hands out: fixed ports only from its ranges and never the operator's
/// own; backends only from trusted slices and never metadata, link-local or (unless allowed) loopback addresses.
/// Each refusal is a condition and an Event; narrowing the pool withdraws a listener it no longer allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_pool_keeps_tenants_in_their_lane() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let settings = sharedlb::Settings {
        cluster_id: "e2e".into(),
        metrics_addr: Some(metrics),
        ..sharedlb::Settings::default()
    };
    let op = Operator::start_with(&client, &MemoryCloud::new(), settings);
    let ns = namespace(&client, "local-lane", &[]).await;
    create_pool(&client, "local-lane", local_pool(12, 1, 5)).await;
    let backend = echo::tcp("lane", 0).await.expect("backend");

    // a fixed port outside the pool's range, and the operator's own port
    create_slb(
        &client,
        &ns,
        "fixed",
        one_port("local-lane", "tcp", "TCP", Some(3999)),
    )
    .await;
    put_endpoints(&client, &ns, "fixed", "tcp", "TCP", &[backend]).await;
    let message = refused(&client, &ns, "fixed", "PortNotAllowed").await;
    assert!(message.contains("4000-4999"), "{message}");
    event_recorded(&client, &ns, "fixed", "PortNotAllowed", 10).await;
    create_slb(
        &client,
        &ns,
        "own",
        one_port("local-lane", "tcp", "TCP", Some(metrics.port())),
    )
    .await;
    let message = refused(&client, &ns, "own", "PortNotAllowed").await;
    assert!(message.contains("operator's own"), "{message}");

    // the pool lets 3999 be fixed: served; it takes it back: withdrawn
    let pools: &Api<sharedlb_crds::LoadBalancerPool> = &Api::all(client.clone());
    let allow = |ranges: serde_json::Value| json!({"spec": {"provider": {"local": {"fixedPortRanges": ranges}}}});
    let merge = |v: serde_json::Value| async move {
        pools
            .patch("local-lane", &PatchParams::default(), &Patch::Merge(&v))
            .await
            .expect("patch the pool");
    };
    merge(allow(json!([{"min": 3999, "max": 3999}]))).await;
    let addr = external(&ready(&client, &ns, "fixed", 30).await);
    assert_eq!(addr.port(), 3999);
    let reply = eventually(10, "3999 answers", || async {
        echo::tcp_ask(addr, "f").await.ok()
    })
    .await;
    assert_eq!(reply, "lane:f");
    merge(allow(json!(null))).await;
    refused(&client, &ns, "fixed", "PortNotAllowed").await;
    closed(addr, "3999 is closed once the pool takes it back").await;

    // backends: an untrusted manager's slice and a metadata address are refused, the trusted pod address kept
    create_slb(
        &client,
        &ns,
        "aimed",
        one_port("local-lane", "tcp", "TCP", None),
    )
    .await;
    put_endpoints_as("forger", &client, &ns, "aimed", ("tcp", "TCP"), &[backend]).await;
    let addr = external(&ready(&client, &ns, "aimed", 30).await);
    let message = endpoints_refused(&client, &ns, "aimed", "managed by \"forger\"").await;
    event_recorded(&client, &ns, "aimed", "EndpointRefused", 10).await;
    assert!(
        reaches_no_backend(addr).await,
        "the forged slice is not followed: {message}"
    );
    // one slice, one port: the metadata address on the backend's port
    let metadata: SocketAddr = ([169, 254, 169, 254], backend.port()).into();
    put_endpoints(&client, &ns, "aimed", "tcp", "TCP", &[metadata, backend]).await;
    let message = endpoints_refused(&client, &ns, "aimed", "169.254.169.254 (link-local").await;
    assert!(
        message.contains("forger"),
        "both refusals are named: {message}"
    );
    let reply = eventually(10, "the trusted endpoint answers", || async {
        echo::tcp_ask(addr, "a").await.ok()
    })
    .await;
    assert_eq!(reply, "lane:a");

    // a pool that does not allow loopback endpoints refuses the echo backend on 127.0.0.1 as well
    merge(json!({"spec": {"provider": {"local": {"allowLoopbackEndpoints": false}}}})).await;
    endpoints_refused(&client, &ns, "aimed", "127.0.0.1 (loopback").await;
    eventually(10, "nothing is forwarded to loopback", || async {
        reaches_no_backend(addr).await.then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-lane").await;
    op.kill().await;
}

/// `proxyProtocol: v2`: each TCP connection reaches the endpoint behind a PROXY v2 header carrying the client's
/// address and port; turning it off takes effect in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_lb_asking_for_proxy_protocol_sends_the_client_address() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-pp", &[]).await;
    create_pool(&client, "local-pp", local_pool(13, 1, 5)).await;
    let backend = echo::tcp("pp", 0).await.expect("backend");
    let mut spec = one_port("local-pp", "tcp", "TCP", None);
    spec["proxyProtocol"] = json!("v2");
    create_slb(&client, &ns, "pp", spec).await;
    put_endpoints(&client, &ns, "pp", "tcp", "TCP", &[backend]).await;
    let addr = external(&ready(&client, &ns, "pp", 30).await);
    // the raw bytes: the echo sends the header back as it got it, and its bytes are not text
    let (port, bytes) = eventually(10, "an answer through the listener", || async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let port = s.local_addr().ok()?.port();
        s.write_all(b"hello").await.ok()?;
        let mut got = Vec::new();
        while !got.ends_with(b"hello") {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(3), s.read(&mut buf));
            match read.await.ok()?.ok()? {
                0 => return None,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
        Some((port, got))
    })
    .await;
    let at = bytes
        .windows(12)
        .position(|w| w == b"\r\n\r\n\0\r\nQUIT\n")
        .unwrap_or_else(|| panic!("a PROXY v2 signature in {bytes:?}"));
    let h = &bytes[at..at + 28];
    assert_eq!(h[12..16], [0x21, 0x11, 0, 12], "v2, PROXY, TCP over IPv4");
    assert_eq!(h[16..20], [127, 0, 0, 1], "the client's address");
    assert_eq!(
        u16::from_be_bytes([h[24], h[25]]),
        port,
        "the client's port"
    );
    assert_eq!(
        u16::from_be_bytes([h[26], h[27]]),
        addr.port(),
        "the listener's port"
    );

    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let off = json!({"spec": {"proxyProtocol": null}});
    api.patch("pp", &PatchParams::default(), &Patch::Merge(&off))
        .await
        .expect("turn it off");
    let reply = eventually(15, "no header once it is off", || async {
        let r = echo::tcp_ask(addr, "plain").await.ok()?;
        (r == "pp:plain").then_some(r)
    })
    .await;
    assert_eq!(reply, "pp:plain");

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-pp").await;
    op.kill().await;
}

/// (endpoints, healthy endpoints) of the SharedLB's first port, as its status says.
fn port_health(s: &SharedLB) -> Option<(u32, u32)> {
    let p = s.status.as_ref()?.ports.first()?;
    Some((p.endpoints?, p.healthy_endpoints?))
}

/// A TCP echo on `addr` that stops (its port refusing connections) when the handle is aborted.
async fn stoppable_echo(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = tokio::net::TcpListener::bind(addr).await.expect("bind");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Endpoints are checked: the status counts them and the healthy ones per port; when none passes, Ready turns
/// False (`NoHealthyEndpoints`, with an Event) and comes back when one passes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_health_is_in_the_status_and_ready_says_when_none_is_healthy() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "local-health", &[]).await;
    create_pool(&client, "local-health", local_pool(14, 1, 5)).await;
    let port = free_port();
    let (alive, dead): (SocketAddr, SocketAddr) =
        (([127, 0, 0, 1], port).into(), ([127, 0, 0, 2], port).into());
    let mut echo = stoppable_echo(alive).await;
    create_slb(
        &client,
        &ns,
        "checked",
        one_port("local-health", "tcp", "TCP", None),
    )
    .await;
    put_endpoints(&client, &ns, "checked", "tcp", "TCP", &[alive, dead]).await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let status_says = |want: (u32, u32), ready: &'static str| {
        let api = api.clone();
        async move {
            eventually(20, &format!("health {want:?}, Ready {ready}"), || async {
                let s = api.get("checked").await.ok()?;
                let r = condition(&s, "Ready")?;
                (port_health(&s) == Some(want) && r.0 == ready).then_some(r)
            })
            .await
        }
    };
    status_says((2, 1), "True").await;

    echo.abort();
    let _ = (&mut echo).await;
    let (_, reason, message) = status_says((2, 0), "False").await;
    assert_eq!(reason, "NoHealthyEndpoints", "{message}");
    event_recorded(&client, &ns, "checked", "NoHealthyEndpoints", 10).await;

    let _back = stoppable_echo(alive).await;
    status_says((2, 1), "True").await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "local-health").await;
    op.kill().await;
}
