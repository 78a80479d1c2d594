//! The gcp provider end to end: the real apiserver, the operator in-process, Google's real
//! `google-cloud-compute-v1` client talking to the project's Compute Engine FAKE (`sharedlb-fakes`; no emulator
//! exists), Node objects with GCE provider IDs.
#![cfg(feature = "gcp")]

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Service;
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::{Value, json};
use sharedlb::{BuiltinProviders, Settings};
use sharedlb_e2e::*;
use sharedlb_fakes::gcp::GcpFake;
use sharedlb_providers::memory::MemoryCloud;

async fn add_node(client: &Client, name: &str, zone: &str) {
    add_ready_node(client, name, &format!("gce://proj/{zone}/{name}")).await;
}

/// The operator in-process, its gcp pools talking to `fake`.
fn operator_on(client: &Client, fake: &GcpFake) -> Operator {
    operator_making(client, fake, sharedlb::BackingService::default())
}

/// The operator in-process, its gcp pools talking to `fake`, making this kind of backing Service.
fn operator_making(
    client: &Client,
    fake: &GcpFake,
    backing_service: sharedlb::BackingService,
) -> Operator {
    Operator::start_with_providers(
        client,
        BuiltinProviders::new(MemoryCloud::new()).with_gcp_endpoint(Some(fake.endpoint())),
        Settings {
            cluster_id: "e2e".into(),
            backing_service,
            ..Settings::default()
        },
    )
}

/// A gcp pool with a random name on project `proj`, region europe-west1, nodes tagged `nodes`; `extra` adds
/// to its spec.
async fn gcp_pool(client: &Client, extra: Value) -> String {
    let pool = format!("gcp-{}", fastrand::u32(..100_000));
    let mut spec = json!({"provider": {"gcp": {"project": "proj", "region": "europe-west1", "nodeTag": "nodes"}}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    create_pool(client, &pool, spec).await;
    pool
}

fn rule_shape(fake: &GcpFake) -> BTreeSet<(String, String, String)> {
    fake.resources("forwardingRules")
        .iter()
        .map(|r| {
            (
                r["IPAddress"].as_str().unwrap_or_default().to_string(),
                r["IPProtocol"].as_str().unwrap_or_default().to_string(),
                r["portRange"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn status_port(s: &sharedlb_crds::SharedLB, name: &str) -> (i32, Option<i32>) {
    s.status
        .as_ref()
        .and_then(|st| st.ports.iter().find(|p| p.name == name))
        .map(|p| (p.port, p.node_port))
        .expect("port")
}

/// TCP, UDP and both on one port: an IP per load balancer, one forwarding rule per port and protocol on it, the
/// external port equal to the Service's node port, one firewall rule per SharedLB with exactly its ports; a
/// capacity of 3 ports opens a second IP; nodes follow; deleting leaves nothing in the fake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_udp_sharedlbs_get_ips_rules_and_firewalls_and_leave_nothing() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    add_node(&client, "gce-n1", "europe-west1-b").await;
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "gcp", &[]).await;
    let pool = gcp_pool(&client, json!({"capacity": {"maxPortsPerLoadBalancer": 2}})).await;
    create_slb(
        &client,
        &ns,
        "dns",
        json!({"pool": pool, "selector": {"app": "dns"}, "ports": [
        {"name": "dns-tcp", "targetPort": 5353, "protocol": "TCP"},
        {"name": "dns-udp", "targetPort": 5353, "protocol": "UDP"}]}),
    )
    .await;
    create_slb(
        &client,
        &ns,
        "web",
        json!({"pool": pool, "selector": {"app": "web"},
        "sourceRanges": ["198.51.100.0/24"], "ports": [{"name": "http", "targetPort": 80}]}),
    )
    .await;
    let dns = ready(&client, &ns, "dns", 120).await;
    let web = ready(&client, &ns, "web", 120).await;

    // passthrough: the external port is the node port, in the status and in the Service
    for (s, names) in [(&dns, vec!["dns-tcp", "dns-udp"]), (&web, vec!["http"])] {
        for n in names {
            let (port, node_port) = status_port(s, n);
            assert_eq!(Some(port), node_port, "{n}: external port = node port");
            assert!(
                (30000..=32767).contains(&port),
                "{n}: in the NodePort range: {port}"
            );
        }
    }
    let svc: Service = Api::namespaced(client.clone(), &ns)
        .get("dns-sharedlb")
        .await
        .expect("service");
    for p in svc.spec.and_then(|s| s.ports).unwrap_or_default() {
        assert_eq!(Some(p.port), p.node_port, "the Service agrees: {p:?}");
    }

    let ip_of = |s: &sharedlb_crds::SharedLB| {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|l| l.ip.clone())
            .expect("an IP")
    };
    let (dns_ip, web_ip) = (ip_of(&dns), ip_of(&web));
    assert_ne!(
        dns_ip, web_ip,
        "2 ports per IP: dns fills one, web opens a second"
    );
    let range = |p: i32| format!("{p}-{p}");
    let want: BTreeSet<(String, String, String)> = [
        (
            dns_ip.clone(),
            "TCP".to_string(),
            range(status_port(&dns, "dns-tcp").0),
        ),
        (
            dns_ip.clone(),
            "UDP".to_string(),
            range(status_port(&dns, "dns-udp").0),
        ),
        (
            web_ip.clone(),
            "TCP".to_string(),
            range(status_port(&web, "http").0),
        ),
    ]
    .into();
    assert_eq!(
        rule_shape(&fake),
        want,
        "exactly one forwarding rule per port and protocol"
    );
    let fw = fake.resources("firewalls");
    let web_fw: &Value = fw
        .iter()
        .find(|f| f["sourceRanges"] == json!(["198.51.100.0/24"]))
        .expect("web's firewall rule");
    assert_eq!(
        web_fw["allowed"],
        json!([{"IPProtocol": "tcp", "ports": [status_port(&web, "http").0.to_string()]}]),
        "exactly web's port, never the NodePort range"
    );
    assert_eq!(fw.len(), 3, "dns, web and the pool's health-check rule");

    // a new node is added to every target pool
    add_node(&client, "gce-n2", "europe-west1-c").await;
    eventually(60, "both nodes in both target pools", || async {
        let pools = fake.resources("targetPools");
        (pools.len() == 2
            && pools
                .iter()
                .all(|p| p["instances"].as_array().map(Vec::len) == Some(2)))
        .then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    for kind in [
        "forwardingRules",
        "addresses",
        "targetPools",
        "firewalls",
        "httpHealthChecks",
    ] {
        assert!(
            fake.resources(kind).is_empty(),
            "{kind} left: {:?}",
            fake.resources(kind)
        );
    }
    delete_nodes(&client, &["gce-n1", "gce-n2"]).await;
    op.kill().await;
}

/// A NodePort Service outside sharedlb holding `node_port`.
fn someone_elses_service(node_port: i32) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": "someone-else"},
        "spec": {"type": "NodePort", "selector": {"app": "x"},
            "ports": [{"port": 80, "targetPort": 80, "nodePort": node_port}]}
    }))
    .expect("service")
}

/// The SharedLB `game`: one auto-assigned port `g` in `pool`.
async fn create_game(client: &Client, ns: &str, pool: &str) {
    let spec = json!({"pool": pool, "selector": {"app": "game"},
        "ports": [{"name": "g", "targetPort": 7777}]});
    create_slb(client, ns, "game", spec).await;
}

/// On a passthrough cloud the external port is the node port: when a Service outside sharedlb holds the one a
/// new SharedLB was given, the apiserver refuses the node port; the SharedLB says so (condition + Event with the
/// apiserver's words) and is placed again on a free port; the other Service is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_port_held_by_another_service_makes_the_sharedlb_move_before_it_serves() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "gcp-taken", &[]).await;
    let pool = gcp_pool(&client, json!({"portRange": {"min": 31500, "max": 31599}})).await;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services
        .create(&PostParams::default(), &someone_elses_service(31500))
        .await
        .expect("a Service outside sharedlb on 31500");
    create_game(&client, &ns, &pool).await;
    let s = ready(&client, &ns, "game", 60).await;
    assert_eq!(
        status_port(&s, "g"),
        (31501, Some(31501)),
        "placed again on the next free port, external = node port"
    );
    event_recorded(&client, &ns, "game", "NodePortTaken", 10).await;
    let held = services.get("someone-else").await.expect("still there");
    assert_eq!(
        held.spec.and_then(|s| s.ports).unwrap_or_default()[0].node_port,
        Some(31500),
        "the other Service keeps its port"
    );
    let rules = rule_shape(&fake);
    assert_eq!(
        rules.len(),
        1,
        "one forwarding rule, on the new port: {rules:?}"
    );
    assert!(
        rules.iter().all(|(_, _, r)| r == "31501-31501"),
        "{rules:?}"
    );
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    assert!(fake.resources("forwardingRules").is_empty());
    assert!(fake.resources("addresses").is_empty());
    op.kill().await;
}

/// A quota Google refuses becomes the SharedLB's condition and Event with Google's words, and nothing is left
/// half-made (no target pool, rule, firewall or health check for an address that was never granted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exceeded_quota_is_a_condition_with_googles_message_and_nothing_half_made() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    fake.set_quota("addresses", 0);
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "gcp-quota", &[]).await;
    let pool = gcp_pool(&client, json!({})).await;
    create_slb(
        &client,
        &ns,
        "x",
        json!({"pool": pool, "selector": {"app": "x"},
        "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    let (reason, msg) = not_programmed(&client, &ns, "x").await;
    assert_eq!(reason, "CloudQuotaExceeded", "{msg}");
    assert!(
        msg.contains("Quota 'ADDRESSES' exceeded"),
        "Google's words reach the user: {msg}"
    );
    event_recorded(&client, &ns, "x", &reason, 10).await;
    for kind in [
        "addresses",
        "forwardingRules",
        "targetPools",
        "firewalls",
        "httpHealthChecks",
    ] {
        assert!(
            fake.resources(kind).is_empty(),
            "{kind} half-made: {:?}",
            fake.resources(kind)
        );
    }
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    op.kill().await;
}

/// On GCP the external port is the node port, so a fixed port outside the cluster's node-port range cannot be
/// served: the apiserver refuses the Service, and the SharedLB says so (ServiceInvalid, the apiserver's words,
/// an Event) before anything is made in the cloud, instead of retrying in silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_port_outside_the_node_port_range_is_refused_before_the_cloud() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "gcp-range", &[]).await;
    let pool = gcp_pool(&client, json!({})).await;
    create_slb(
        &client,
        &ns,
        "web",
        json!({"pool": pool, "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 8080, "targetPort": 80}]}),
    )
    .await;
    let msg = refused(&client, &ns, "web", "ServiceInvalid").await;
    assert!(msg.contains("valid range"), "the apiserver's words: {msg}");
    event_recorded(&client, &ns, "web", "ServiceInvalid", 10).await;
    // passthrough delivers the client's own packets: a PROXY header is refused, not silently left out
    create_slb(
        &client,
        &ns,
        "proxied",
        json!({"pool": pool, "selector": {"app": "web"}, "proxyProtocol": "v2",
        "ports": [{"name": "http", "targetPort": 80}]}),
    )
    .await;
    let msg = refused(&client, &ns, "proxied", "ProxyProtocolUnsupported").await;
    assert!(msg.contains("client address reaches the nodes"), "{msg}");
    event_recorded(&client, &ns, "proxied", "ProxyProtocolUnsupported", 10).await;
    for kind in ["addresses", "forwardingRules", "firewalls"] {
        assert!(
            fake.resources(kind).is_empty(),
            "{kind} made: {:?}",
            fake.resources(kind)
        );
    }
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    op.kill().await;
}

/// A SharedLB that has served keeps its port even when the apiserver refuses its node port: clients hold that
/// address, so it is never moved behind their backs. Its Service was deleted while the operator was down and
/// another Service took the node port; the SharedLB says NodePortTaken, keeps saying it past the refusal's retry
/// (when Ready is already False), and is served on the same port once the port is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_sharedlb_whose_node_port_is_taken_keeps_its_port() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "gcp-served", &[]).await;
    let pool = gcp_pool(&client, json!({"portRange": {"min": 31600, "max": 31699}})).await;
    create_game(&client, &ns, &pool).await;
    let served = status_port(&ready(&client, &ns, "game", 60).await, "g");
    op.kill().await;

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    services
        .delete(
            &sharedlb_crds::service_name("game"),
            &kube::api::DeleteParams::default(),
        )
        .await
        .expect("delete the backing Service behind the operator's back");
    services
        .create(&PostParams::default(), &someone_elses_service(served.0))
        .await
        .expect("another Service takes the node port");

    let op = operator_on(&client, &fake);
    let api: Api<sharedlb_crds::SharedLB> = Api::namespaced(client.clone(), &ns);
    let refused_with = |s: &sharedlb_crds::SharedLB| {
        condition(s, "Ready")
            .is_some_and(|(st, reason, _)| st == "False" && reason == "NodePortTaken")
    };
    eventually(60, "game says NodePortTaken", || async {
        refused_with(&api.get("game").await.ok()?).then_some(())
    })
    .await;
    // past the refusal's 30 s retry: that reconcile sees Ready=False, and must still not move a served SharedLB
    tokio::time::sleep(std::time::Duration::from_secs(35)).await;
    let s = api.get("game").await.expect("game");
    assert!(refused_with(&s), "{:?}", condition(&s, "Ready"));
    assert_eq!(status_port(&s, "g"), served, "the served port is kept");

    services
        .delete("someone-else", &kube::api::DeleteParams::default())
        .await
        .expect("the other Service leaves");
    let s = ready(&client, &ns, "game", 60).await;
    assert_eq!(status_port(&s, "g"), served, "served again on its port");
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    assert!(fake.resources("forwardingRules").is_empty());
    op.kill().await;
}

/// With classed backing Services (forced: `auto` chooses them on 1.24+; the 1.20 test apiserver keeps
/// `allocateLoadBalancerNodePorts: false` through its ServiceLBNodePortControl gate): the external port comes
/// from the pool's own range, not the cluster's node-port range, the Service takes no node port and its status
/// names the forwarding rule's IP (what kube-proxy routes the passthrough packets by), and the forwarding rule and
/// the firewall carry the external port itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classed_gcp_pool_takes_ports_outside_the_node_port_range() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    add_node(&client, "gce-classed", "europe-west1-b").await;
    let op = operator_making(&client, &fake, sharedlb::BackingService::LoadBalancerClass);
    let ns = namespace(&client, "gcp-classed", &[]).await;
    let pool = gcp_pool(&client, json!({})).await;
    create_slb(
        &client,
        &ns,
        "web",
        json!({"pool": pool, "selector": {"app": "web"},
        "sourceRanges": ["198.51.100.0/24"], "ports": [{"name": "http", "targetPort": 80}]}),
    )
    .await;
    let web = ready(&client, &ns, "web", 120).await;
    let (port, node_port) = status_port(&web, "http");
    assert_eq!(node_port, None);
    assert!(
        (10000..=19999).contains(&port),
        "the pool's default range: {port}"
    );
    let ip = web
        .status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ip.clone())
        .expect("an IP");

    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc = eventually(30, "the Service names the forwarding rule's IP", || async {
        let s = api.get("web-sharedlb").await.ok()?;
        let ingress = s.status.clone()?.load_balancer?.ingress?;
        (ingress.first()?.ip.as_deref() == Some(ip.as_str())).then_some(s)
    })
    .await;
    let spec = svc.spec.expect("spec");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let ports = spec.ports.expect("ports");
    assert!(ports.iter().all(|p| p.node_port.is_none()), "{ports:?}");

    let range = format!("{port}-{port}");
    assert_eq!(
        rule_shape(&fake),
        [(ip, "TCP".to_string(), range)].into(),
        "one forwarding rule, for the external port"
    );
    let fw = fake.resources("firewalls");
    let web_fw = fw
        .iter()
        .find(|f| f["sourceRanges"] == json!(["198.51.100.0/24"]))
        .expect("web's firewall rule");
    assert_eq!(
        web_fw["allowed"],
        json!([{"IPProtocol": "tcp", "ports": [port.to_string()]}]),
        "the nodes are opened on the external port, which the packets still carry"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    delete_nodes(&client, &["gce-classed"]).await;
    for kind in ["addresses", "forwardingRules", "firewalls"] {
        assert!(fake.resources(kind).is_empty(), "{kind} left behind");
    }
    op.kill().await;
}

/// A SharedLB served with a NodePort Service (a cluster before 1.24, or `node-port`) keeps its place when the
/// operator next makes classed Services: the same external port and forwarding rule, its Service now a
/// LoadBalancer one naming the IP, and the node ports the operator had set given back to the cluster (server-side
/// apply drops the fields it alone owned, and `allocateLoadBalancerNodePorts: false` takes no new ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_port_sharedlb_becomes_classed_in_place() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = GcpFake::start().await;
    add_node(&client, "gce-migrate", "europe-west1-b").await;
    let op = operator_making(&client, &fake, sharedlb::BackingService::NodePort);
    let ns = namespace(&client, "gcp-migrate", &[]).await;
    let pool = gcp_pool(&client, json!({})).await;
    create_slb(
        &client,
        &ns,
        "web",
        json!({"pool": pool, "selector": {"app": "web"}, "ports": [{"name": "http", "targetPort": 80}]}),
    )
    .await;
    let before = ready(&client, &ns, "web", 120).await;
    let (port, node_port) = status_port(&before, "http");
    assert_eq!(
        node_port,
        Some(port),
        "NodePort: the external port is the node port"
    );
    let rules = rule_shape(&fake);
    op.kill().await;

    let op = operator_making(&client, &fake, sharedlb::BackingService::LoadBalancerClass);
    let api: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc = eventually(60, "the Service is classed and names the IP", || async {
        let s = api.get("web-sharedlb").await.ok()?;
        let classed = s.spec.as_ref()?.type_.as_deref() == Some("LoadBalancer");
        let named = s
            .status
            .clone()?
            .load_balancer?
            .ingress?
            .first()?
            .ip
            .is_some();
        (classed && named).then_some(s)
    })
    .await;
    let ports = svc.spec.and_then(|s| s.ports).unwrap_or_default();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, port, "the external port stays");
    assert_eq!(
        ports[0].node_port, None,
        "the node port it had is given back"
    );
    let after = eventually(30, "the status says so", || async {
        let s = Api::<sharedlb_crds::SharedLB>::namespaced(client.clone(), &ns)
            .get("web")
            .await
            .ok()?;
        (status_port(&s, "http").1.is_none()).then_some(s)
    })
    .await;
    assert_eq!(status_port(&after, "http").0, port);
    assert_eq!(
        rule_shape(&fake),
        rules,
        "the forwarding rule is where it was"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    delete_nodes(&client, &["gce-migrate"]).await;
    op.kill().await;
}
