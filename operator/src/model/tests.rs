use std::collections::{BTreeMap, BTreeSet};

use sharedlb_crds::Protocol::{Tcp, Udp};
use sharedlb_placement::{PortMode, Protocol as P};
use sharedlb_providers::LoadBalancerInfo;

use super::*;
use crate::controller::status::{self, ALLOCATED, PROGRAMMED, READY};
use crate::fixtures::{allocation, service, shared_lb};

/// The listeners for `slb` with these node ports and no endpoints.
fn listeners(slb: &SharedLB, a: &Allocation, node_ports: &[(&str, u16)]) -> Vec<ListenerSpec> {
    let node_ports = node_ports
        .iter()
        .map(|(n, p)| (n.to_string(), *p))
        .collect();
    desired_listeners(slb, a, &node_ports, &Endpoints::new()).expect("every node port given")
}

fn id(lb: u32, port: u16, protocol: P) -> ListenerId {
    ListenerId { lb, port, protocol }
}

#[test]
fn the_service_serves_exactly_the_allocated_ports_the_spec_still_names() {
    // an update that was refused keeps "old" allocated, but the spec no longer asks for it
    let slb = shared_lb("web")
        .port("http", Some(80), Tcp)
        .port("dns", Some(53), Udp)
        .build();
    let a = allocation(0, &[("http", 80, Tcp), ("dns", 53, Udp), ("old", 81, Tcp)]);
    let svc = backing_service(
        &slb,
        &a,
        ServiceKind::NodePort(PortMode::PerLoadBalancer),
        None,
    );
    let ports = svc
        .spec
        .as_ref()
        .expect("set by the model")
        .ports
        .clone()
        .expect("set by the model");
    let names: BTreeSet<_> = ports.iter().filter_map(|p| p.name.clone()).collect();
    assert_eq!(names, ["dns", "http"].map(String::from).into());
    assert!(ports.iter().all(|p| p.node_port.is_none()), "{ports:?}");
    assert_eq!(svc.metadata.name.as_deref(), Some("web-sharedlb"));
    assert!(made_by(&svc, "uid-web") && !made_by(&svc, "uid-other"));
    assert_eq!(
        wanted_listeners(&slb, &a),
        [id(0, 53, P::Udp), id(0, 80, P::Tcp)].into()
    );
}

#[test]
fn passthrough_clouds_get_the_external_port_as_node_port() {
    let slb = shared_lb("web").port("http", Some(30080), Tcp).build();
    let a = allocation(2, &[("http", 30080, Tcp)]);
    let svc = backing_service(&slb, &a, ServiceKind::NodePort(PortMode::PoolWide), None);
    let port = &svc
        .spec
        .expect("set by the model")
        .ports
        .expect("set by the model")[0];
    assert_eq!(port.node_port, Some(30080));
}

#[test]
fn a_classed_service_takes_no_node_port_and_traffic_arrives_on_the_external_port() {
    let slb = shared_lb("web").port("http", Some(12080), Tcp).build();
    let a = allocation(2, &[("http", 12080, Tcp)]);
    let kind = ServiceKind::Classed(ClassedServices { class_field: true });
    let want = backing_service(&slb, &a, kind, None);
    let spec = want.spec.clone().expect("set by the model");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(
        spec.load_balancer_class.as_deref(),
        Some(LOAD_BALANCER_CLASS)
    );
    assert_eq!(spec.allocate_load_balancer_node_ports, Some(false));
    assert_eq!(spec.ports.expect("set by the model")[0].node_port, None);
    // what the apiserver returns: no node port assigned, and so current
    assert!(service_is_current(&want, &want));
    assert_eq!(
        arrival_ports(&want, kind),
        BTreeMap::from([("http".into(), 12080)])
    );
    // a NodePort Service of the same ports is not what a classed pool asks for
    let node_port = service("uid-web", &[("http", 12080, "TCP", 31000)]);
    assert!(!service_is_current(&node_port, &want));
    // but once it is a classed one, node ports the apiserver gave it before are no reason to write it again: no
    // apply of ours removes them (the apiserver assigned them), so every reconcile would write it
    let mut with_node_port = want.clone();
    with_node_port
        .spec
        .as_mut()
        .expect("set")
        .ports
        .as_mut()
        .expect("set")[0]
        .node_port = Some(31000);
    assert!(service_is_current(&with_node_port, &want));
    // an apiserver before 1.21 refuses the class field in an apply: it is left out
    let unnamed = ServiceKind::Classed(ClassedServices { class_field: false });
    let old_cluster = backing_service(&slb, &a, unnamed, None);
    assert_eq!(old_cluster.spec.expect("set").load_balancer_class, None);
}

#[test]
fn the_service_status_names_the_shared_address_and_only_it() {
    let info = LoadBalancerInfo {
        ip: Some("203.0.113.7".into()),
        ..LoadBalancerInfo::default()
    };
    let mut svc = service("uid-web", &[("http", 80, "TCP", 31000)]);
    assert!(!ingress_is_current(&svc, &info), "no status yet");
    let patch = ingress_status(&info);
    svc.status = Some(serde_json::from_value(patch["status"].clone()).expect("a ServiceStatus"));
    assert!(ingress_is_current(&svc, &info));
    let moved = LoadBalancerInfo {
        ip: Some("203.0.113.8".into()),
        ..LoadBalancerInfo::default()
    };
    assert!(!ingress_is_current(&svc, &moved), "another address");
    let host = LoadBalancerInfo {
        hostname: Some("lb.example.com".into()),
        ..LoadBalancerInfo::default()
    };
    assert!(!ingress_is_current(&svc, &host));
    assert_eq!(
        ingress_status(&host)["status"]["loadBalancer"]["ingress"][0]["hostname"],
        "lb.example.com"
    );
}

#[test]
fn tcp_and_udp_on_one_port_share_the_node_port_the_service_has() {
    let slb = shared_lb("dns")
        .port("dns-tcp", Some(53), Tcp)
        .port("dns-udp", Some(53), Udp)
        .build();
    let a = allocation(0, &[("dns-tcp", 53, Tcp), ("dns-udp", 53, Udp)]);
    let have = service("uid-dns", &[("dns-tcp", 53, "TCP", 31053)]);
    let svc = backing_service(
        &slb,
        &a,
        ServiceKind::NodePort(PortMode::PerLoadBalancer),
        Some(&have),
    );
    let node_ports: Vec<_> = svc
        .spec
        .expect("set by the model")
        .ports
        .expect("set by the model")
        .iter()
        .map(|p| p.node_port)
        .collect();
    assert_eq!(node_ports, vec![Some(31053), Some(31053)]);
}

#[test]
fn a_service_is_written_only_when_it_differs() {
    let slb = shared_lb("web").port("http", Some(80), Tcp).build();
    let a = allocation(0, &[("http", 80, Tcp)]);
    let want = backing_service(
        &slb,
        &a,
        ServiceKind::NodePort(PortMode::PerLoadBalancer),
        None,
    );
    // what the apiserver returns: the same, with a node port assigned
    let mut have = want.clone();
    have.spec
        .as_mut()
        .expect("set by the model")
        .ports
        .as_mut()
        .expect("set by the model")[0]
        .node_port = Some(31000);
    assert!(service_is_current(&have, &want));
    assert_eq!(
        arrival_ports(&have, ServiceKind::NodePort(PortMode::PerLoadBalancer)),
        BTreeMap::from([("http".into(), 31000)])
    );

    let moved = shared_lb("web").port("http", Some(80), Tcp).build();
    let mut moved = moved;
    moved.spec.selector = [("app".to_string(), "web-v2".to_string())].into();
    let want2 = backing_service(
        &moved,
        &a,
        ServiceKind::NodePort(PortMode::PerLoadBalancer),
        Some(&have),
    );
    assert!(!service_is_current(&have, &want2), "selector changed");

    let grown = allocation(0, &[("http", 80, Tcp), ("admin", 81, Tcp)]);
    let grown_slb = shared_lb("web")
        .port("http", Some(80), Tcp)
        .port("admin", Some(81), Tcp)
        .build();
    let want3 = backing_service(
        &grown_slb,
        &grown,
        ServiceKind::NodePort(PortMode::PerLoadBalancer),
        Some(&have),
    );
    assert!(!service_is_current(&have, &want3), "a port added");

    let mut no_node_port = have.clone();
    no_node_port
        .spec
        .as_mut()
        .expect("set by the model")
        .ports
        .as_mut()
        .expect("set by the model")[0]
        .node_port = None;
    assert!(!service_is_current(&no_node_port, &want));
}

#[test]
fn listeners_forward_to_node_ports_open_to_the_source_ranges() {
    let slb = shared_lb("web")
        .port("http", Some(80), Tcp)
        .port("dns", Some(53), Udp)
        .source_range("198.51.100.0/24")
        .build();
    let a = allocation(1, &[("http", 80, Tcp), ("dns", 53, Udp)]);
    let node_ports = BTreeMap::from([("http".into(), 31080), ("dns".into(), 31053)]);
    let backend: std::net::SocketAddr = "10.0.0.7:8080".parse().expect("an address");
    let endpoints = Endpoints::from([(("http".into(), "TCP".into()), vec![backend])]);
    let ls = desired_listeners(&slb, &a, &node_ports, &endpoints).expect("set by the model");
    let got: Vec<_> = ls
        .iter()
        .map(|l| (l.port, l.protocol, l.node_port, l.backends.clone()))
        .collect();
    assert_eq!(
        got,
        vec![
            (53, P::Udp, 31053, vec![]),
            (80, P::Tcp, 31080, vec![backend])
        ]
    );
    assert!(ls.iter().all(|l| l.source_ranges == ["198.51.100.0/24"]
        && l.owner.uid == "uid-web"
        && l.owner.namespace == "team-a"));

    let missing =
        desired_listeners(&slb, &a, &BTreeMap::new(), &endpoints).expect_err("no node port");
    assert_eq!(missing.port_name, "dns");
}

#[test]
fn what_is_held_and_not_wanted_is_stale() {
    let held = BTreeSet::from([id(0, 80, P::Tcp), id(0, 81, P::Tcp), id(3, 80, P::Udp)]);
    let wanted = BTreeSet::from([id(0, 80, P::Tcp), id(0, 82, P::Tcp)]);
    assert_eq!(
        stale_listeners(&held, &wanted),
        vec![id(0, 81, P::Tcp), id(3, 80, P::Udp)]
    );
    assert!(stale_listeners(&wanted, &wanted).is_empty());
    // deletion: everything held is stale
    assert_eq!(stale_listeners(&held, &BTreeSet::new()).len(), 3);
}

fn served(info: &LoadBalancerInfo) -> Served<'_> {
    Served {
        pool: "default",
        lb_name: "default-1".into(),
        info,
        service_name: "web-sharedlb".into(),
        node_ports: true,
    }
}

#[test]
fn a_programmed_status_says_where_it_is_served() {
    let slb = shared_lb("web").port("http", Some(80), Tcp).build();
    let a = allocation(1, &[("http", 80, Tcp)]);
    let ls = listeners(&slb, &a, &[("http", 31080)]);
    let info = LoadBalancerInfo {
        id: "lb-1".into(),
        ip: Some("198.51.100.7".into()),
        hostname: None,
    };
    let st = programmed_status(
        &SharedLBStatus::default(),
        &served(&info),
        &ls,
        &a,
        Some(3),
        None,
    );
    let lb = st.load_balancer.clone().expect("set by the model");
    assert_eq!(
        (lb.name.as_str(), lb.ip.as_deref()),
        ("default-1", Some("198.51.100.7"))
    );
    assert_eq!(st.ports.len(), 1);
    assert_eq!(
        (
            st.ports[0].name.as_str(),
            st.ports[0].port,
            st.ports[0].node_port
        ),
        ("http", 80, Some(31080))
    );
    assert_eq!(st.observed_generation, Some(3));
    let ready = status::get(&st.conditions, READY).expect("set by the model");
    assert_eq!(ready.status, "True");
    assert_eq!(ready.message, "reachable at 198.51.100.7 on 80/TCP");
    assert_eq!(ready.observed_generation, Some(3));
}

/// A refused update still reports the allocation that is served, at the address the cloud has now.
#[test]
fn a_refused_update_reports_the_served_allocation_and_why_the_update_was_not_made() {
    let slb = shared_lb("web")
        .port("http", Some(80), Tcp)
        .port("more", Some(81), Tcp)
        .build();
    let a = allocation(1, &[("http", 80, Tcp)]);
    let ls = listeners(&slb, &a, &[("http", 31080)]);
    let old = SharedLBStatus {
        load_balancer: Some(sharedlb_crds::LoadBalancerRef {
            name: "default-1".into(),
            ip: Some("198.51.100.11".into()),
            hostname: None,
        }),
        ..SharedLBStatus::default()
    };
    let info = LoadBalancerInfo {
        id: "lb-1".into(),
        ip: Some("198.51.100.23".into()),
        hostname: None,
    };
    let st = programmed_status(
        &old,
        &served(&info),
        &ls,
        &a,
        Some(2),
        Some(("NoRoomToGrow", "load balancer default-1 is full")),
    );
    assert_eq!(
        st.load_balancer.expect("set by the model").ip.as_deref(),
        Some("198.51.100.23")
    );
    let cond = |t| {
        status::get(&st.conditions, t)
            .expect("set by the model")
            .clone()
    };
    assert_eq!(cond(ALLOCATED).status, "True");
    assert_eq!(cond(PROGRAMMED).status, "True");
    let ready = cond(READY);
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "NoRoomToGrow")
    );
    assert_eq!(st.port_summary.as_deref(), Some("80/TCP"));
}

/// The allocation's record keeps what did not move (the address of the same load balancer, node ports of ports
/// that stay) and says programming is under way unless the SharedLB is already serving.
#[test]
fn an_allocation_record_keeps_what_did_not_move() {
    let old = SharedLBStatus {
        load_balancer: Some(sharedlb_crds::LoadBalancerRef {
            name: "default-1".into(),
            ip: Some("198.51.100.11".into()),
            hostname: None,
        }),
        ports: vec![sharedlb_crds::PortStatus {
            name: "http".into(),
            port: 80,
            node_port: Some(31080),
            protocol: Tcp,
            endpoints: None,
            healthy_endpoints: None,
        }],
        ..SharedLBStatus::default()
    };
    let grown = allocation(1, &[("http", 80, Tcp), ("admin", 81, Tcp)]);
    let st = allocated_status(&old, "default", "default-1", None, &grown, Some(2));
    let lb = st.load_balancer.clone().expect("a load balancer");
    assert_eq!(lb.ip.as_deref(), Some("198.51.100.11"));
    let node_ports: Vec<_> = st.ports.iter().map(|p| (p.port, p.node_port)).collect();
    assert_eq!(node_ports, vec![(81, None), (80, Some(31080))]);
    let ready = status::get(&st.conditions, READY).expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "Programming")
    );
    assert_eq!(
        status::get(&st.conditions, ALLOCATED)
            .expect("Allocated")
            .status,
        "True"
    );

    // another load balancer: the old address is not carried over
    let elsewhere = allocation(2, &[("http", 80, Tcp)]);
    let st = allocated_status(&old, "default", "default-2", None, &elsewhere, Some(2));
    assert_eq!(st.load_balancer.expect("a load balancer").ip, None);
}

#[test]
fn a_local_pool_keeps_fixed_ports_in_its_ranges_and_off_the_operators_own() {
    let local = LocalSettings {
        addresses: vec!["127.0.0.10".into()],
        ..Default::default()
    };
    let own = [(9090, "metrics and health")];
    let refusal = |ports: &[Option<i32>]| {
        let slb = ports
            .iter()
            .enumerate()
            .fold(shared_lb("web"), |b, (i, p)| {
                b.port(&format!("p{i}"), *p, Tcp)
            })
            .build();
        local_port_refusal(&slb.spec, &local, (9000, 9999), &own)
    };
    assert_eq!(refusal(&[Some(9000), None]), None);
    let (reason, message) = refusal(&[Some(9090)]).expect("the metrics port");
    assert_eq!(reason, "PortNotAllowed");
    assert!(
        message.contains("operator's own metrics and health port"),
        "{message}"
    );
    let (reason, message) = refusal(&[None, Some(80)]).expect("below the range");
    assert_eq!(reason, "PortNotAllowed");
    assert!(message.contains("\"p1\": 80"), "{message}");
}
