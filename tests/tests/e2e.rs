//! End to end against a real kube-apiserver + etcd (+ kube-controller-manager), the operator in-process with the
//! memory provider. Run through `scripts/test`, which starts and stops the test environment.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use sharedlb_crds::{LoadBalancerPool, SharedLB};
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

fn tcp(name: &str, port: Option<u16>) -> serde_json::Value {
    match port {
        Some(p) => json!({"name": name, "port": p, "targetPort": 8080, "protocol": "TCP"}),
        None => json!({"name": name, "targetPort": 8080}),
    }
}

fn spec(pool: &str, ports: Vec<serde_json::Value>) -> serde_json::Value {
    json!({"pool": pool, "selector": {"app": "echo"}, "ports": ports})
}

/// (ip, port) of every status port.
fn endpoints(s: &SharedLB) -> Vec<(String, i32)> {
    let st = s.status.as_ref().expect("status");
    let ip = st
        .load_balancer
        .as_ref()
        .and_then(|l| l.ip.clone())
        .expect("ip");
    st.ports.iter().map(|p| (ip.clone(), p.port)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_created_at_once_fill_exactly_four_load_balancers() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-burst", &[]).await;
    create_pool(
        &client,
        "burst",
        json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 5}}),
    )
    .await;

    create_burst(
        &client,
        &ns,
        "svc-",
        20,
        spec("burst", vec![tcp("web", None)]),
    )
    .await;

    let mut seen = BTreeSet::new();
    for i in 0..20 {
        let s = ready(&client, &ns, &format!("svc-{i:02}"), 60).await;
        for e in endpoints(&s) {
            assert!(seen.insert(e.clone()), "two SharedLBs on {e:?}");
        }
        let st = s.status.as_ref().expect("status");
        assert!(
            st.ports[0]
                .node_port
                .is_some_and(|n| (30000..=32767).contains(&n))
        );
        assert_eq!(
            st.port_summary.as_deref(),
            Some(format!("{}/TCP", st.ports[0].port).as_str())
        );
    }
    assert_eq!(seen.len(), 20);
    let lbs = cloud_pool(&cloud, "burst");
    assert_eq!(
        lbs.len(),
        4,
        "20 single-port SharedLBs at capacity 5 use exactly 4 load balancers: {lbs:?}"
    );
    assert!(
        lbs.values().all(|(_, ls)| ls.len() == 5),
        "each load balancer holds 5 listeners: {lbs:?}"
    );
    let ips: BTreeSet<String> = seen.iter().map(|(ip, _)| ip.clone()).collect();
    assert_eq!(ips.len(), 4);
    assert!(ips.iter().all(|ip| ip.starts_with("198.51.100.")));

    // the backing Services exist, owned, NodePort, one port each
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get("svc-00-sharedlb")
        .await
        .expect("service");
    let sp = svc.spec.expect("spec");
    assert_eq!(sp.type_.as_deref(), Some("NodePort"));
    assert_eq!(
        sp.selector
            .expect("selector")
            .get("app")
            .map(String::as_str),
        Some("echo")
    );
    assert_eq!(
        svc.metadata.owner_references.expect("owner")[0].kind,
        "SharedLB"
    );

    // the pool's status lists its load balancers
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    eventually(30, "pool status with 4 full rows", || async {
        let p = pools.get("burst").await.ok()?;
        let st = p.status?;
        (st.load_balancers.len() == 4
            && st
                .load_balancers
                .iter()
                .all(|l| l.ports_used == 5 && l.capacity == 5 && l.ip.is_some())
            && st.totals.ports_used == 20)
            .then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    eventually(30, "every load balancer of the pool deleted", || async {
        cloud_pool(&cloud, "burst").is_empty().then_some(())
    })
    .await;
    delete_pool(&client, "burst").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_ports_are_honoured_and_a_clash_is_refused_until_the_pool_may_grow() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-fixed", &[]).await;
    create_pool(
        &client,
        "fixed",
        json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 5, "maxLoadBalancers": 1}}),
    )
    .await;

    create_slb(
        &client,
        &ns,
        "a",
        spec("fixed", vec![tcp("web", Some(7000))]),
    )
    .await;
    let a = ready(&client, &ns, "a", 30).await;
    assert_eq!(a.status.as_ref().expect("status").ports[0].port, 7000);

    create_slb(
        &client,
        &ns,
        "b",
        spec("fixed", vec![tcp("web", Some(7000))]),
    )
    .await;
    let msg = refused(&client, &ns, "b", "PortInUse").await;
    assert!(msg.contains("7000"), "{msg}");
    let b: SharedLB = Api::namespaced(client.clone(), &ns)
        .get("b")
        .await
        .expect("b");
    assert_eq!(
        condition(&b, "Allocated").map(|c| c.0),
        Some("False".into())
    );
    event_recorded(&client, &ns, "b", "PortInUse", 10).await;
    assert_eq!(
        cloud_pool(&cloud, "fixed").len(),
        1,
        "a refusal makes no cloud call"
    );

    // the pool may now have two load balancers: b is placed on a second one, same port, another IP
    Api::<LoadBalancerPool>::all(client.clone())
        .patch(
            "fixed",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"capacity": {"maxLoadBalancers": 2}}})),
        )
        .await
        .expect("grow the pool");
    let b = ready(&client, &ns, "b", 60).await;
    assert_eq!(b.status.as_ref().expect("status").ports[0].port, 7000);
    assert_ne!(
        endpoints(&a)[0].0,
        endpoints(&b)[0].0,
        "a clash on one port goes to another address"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "fixed").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_tcp_on_one_port_and_updates_keep_existing_ports() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-update", &[]).await;
    create_pool(
        &client,
        "upd",
        json!({"provider": {"memory": {}}, "portRange": {"min": 5000, "max": 5099}}),
    )
    .await;

    let dns = json!({"pool": "upd", "selector": {"app": "dns"}, "ports": [
        {"name": "dns-udp", "port": 53, "targetPort": 5353, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
    ]});
    create_slb(&client, &ns, "dns", dns).await;
    let d = ready(&client, &ns, "dns", 30).await;
    assert_eq!(
        d.status.as_ref().expect("status").port_summary.as_deref(),
        Some("53/TCP,53/UDP")
    );
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get("dns-sharedlb")
        .await
        .expect("svc");
    let protos: BTreeSet<String> = svc
        .spec
        .expect("spec")
        .ports
        .expect("ports")
        .into_iter()
        .filter_map(|p| p.protocol)
        .collect();
    assert_eq!(
        protos,
        BTreeSet::from(["TCP".to_string(), "UDP".to_string()])
    );
    let lbs = cloud_pool(&cloud, "upd");
    let listeners: Vec<(u16, String)> = lbs
        .values()
        .flat_map(|(_, l)| l.iter().map(|x| (x.0, x.1.clone())))
        .collect();
    assert_eq!(listeners, vec![(53, "Tcp".into()), (53, "Udp".into())]);

    // an update adds a port and keeps the existing one where it is
    create_slb(&client, &ns, "web", spec("upd", vec![tcp("http", None)])).await;
    let w = ready(&client, &ns, "web", 30).await;
    let first = w.status.as_ref().expect("status").ports[0].clone();
    assert!((5000..=5099).contains(&first.port));
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [tcp("http", None), tcp("admin", None)]}})),
    )
    .await
    .expect("add a port");
    let w = eventually(30, "web with two ports, Ready", || async {
        let s = api.get("web").await.ok()?;
        let st = s.status.as_ref()?;
        (st.ports.len() == 2
            && st.observed_generation == s.metadata.generation
            && condition(&s, "Ready")?.0 == "True")
            .then_some(s)
    })
    .await;
    let st = w.status.as_ref().expect("status");
    let http = st.ports.iter().find(|p| p.name == "http").expect("http");
    assert_eq!(
        (http.port, http.node_port),
        (first.port, first.node_port),
        "the existing port did not move"
    );
    let admin = st
        .ports
        .iter()
        .find(|p| p.name == "admin")
        .expect("admin")
        .port;
    assert_ne!(admin, first.port);

    // removing a port removes exactly its listener
    api.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [tcp("admin", None)]}})),
    )
    .await
    .expect("drop a port");
    eventually(30, "http listener removed", || async {
        let ports: Vec<u16> = cloud_pool(&cloud, "upd")
            .values()
            .flat_map(|(_, l)| l.iter().map(|x| x.0))
            .collect();
        (!ports.contains(&(first.port as u16)) && ports.contains(&(admin as u16))).then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "upd").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_frees_the_port_and_the_last_one_deletes_the_load_balancer() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-delete", &[]).await;
    create_pool(&client, "del", json!({"provider": {"memory": {}}})).await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);

    create_slb(&client, &ns, "a", spec("del", vec![tcp("web", None)])).await;
    let a = ready(&client, &ns, "a", 30).await;
    create_slb(&client, &ns, "b", spec("del", vec![tcp("web", None)])).await;
    ready(&client, &ns, "b", 30).await;
    let a_port = endpoints(&a)[0].1;
    let a_uid = a.uid().expect("uid");

    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    eventually(30, "a gone and its listener removed", || async {
        let gone = api.get_opt("a").await.ok()?.is_none();
        let owners: Vec<String> = cloud_pool(&cloud, "del")
            .values()
            .flat_map(|(_, l)| l.iter().map(|x| x.2.clone()))
            .collect();
        (gone && !owners.contains(&a_uid)).then_some(())
    })
    .await;
    // the freed port is handed out again
    create_slb(&client, &ns, "c", spec("del", vec![tcp("web", None)])).await;
    let c = ready(&client, &ns, "c", 30).await;
    assert_eq!(
        endpoints(&c)[0].1,
        a_port,
        "the lowest free port, freed by a, goes to c"
    );
    assert_eq!(cloud_pool(&cloud, "del").len(), 1);

    for n in ["b", "c"] {
        api.delete(n, &DeleteParams::default())
            .await
            .expect("delete");
    }
    eventually(30, "the empty load balancer deleted", || async {
        cloud_pool(&cloud, "del").is_empty().then_some(())
    })
    .await;
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    eventually(30, "pool status empty", || async {
        let st = pools.get("del").await.ok()?.status?;
        (st.load_balancers.is_empty() && st.totals.ports_used == 0).then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "del").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_killed_mid_burst_converges_without_duplicates() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-restart", &[]).await;
    // every cloud call takes 30 ms, so the burst is still in flight when the operator dies
    create_pool(
        &client,
        "restart",
        json!({"provider": {"memory": {"latencyMs": 30}}, "capacity": {"maxPortsPerLoadBalancer": 5}}),
    )
    .await;
    create_burst(
        &client,
        &ns,
        "r-",
        30,
        spec("restart", vec![tcp("p", None)]),
    )
    .await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    eventually(60, "some but not all Ready", || async {
        let n = api
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .filter(|s| condition(s, "Ready").is_some_and(|c| c.0 == "True"))
            .count();
        (n >= 3).then_some(())
    })
    .await;
    op.kill().await;
    let ready_at_kill = api
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .filter(|s| condition(s, "Ready").is_some_and(|c| c.0 == "True"))
        .count();

    let op = Operator::start(&client, &cloud);
    let mut seen = BTreeSet::new();
    for i in 0..30 {
        let s = ready(&client, &ns, &format!("r-{i:02}"), 90).await;
        assert!(
            seen.insert(endpoints(&s)[0].clone()),
            "duplicate (ip, port) after restart"
        );
    }
    eprintln!("restart: {ready_at_kill} of 30 were Ready when the operator was killed");
    let lbs = cloud_pool(&cloud, "restart");
    assert_eq!(
        lbs.len(),
        6,
        "30 at capacity 5 is 6 load balancers, restart or not (ready at kill: {ready_at_kill}): {lbs:?}"
    );
    let listeners: usize = lbs.values().map(|(_, l)| l.len()).sum();
    assert_eq!(listeners, 30, "exactly one listener per SharedLB");
    let owners: BTreeSet<String> = lbs
        .values()
        .flat_map(|(_, l)| l.iter().map(|x| x.2.clone()))
        .collect();
    assert_eq!(owners.len(), 30);

    delete_namespace(&client, &ns).await;
    eventually(60, "all load balancers deleted", || async {
        cloud_pool(&cloud, "restart").is_empty().then_some(())
    })
    .await;
    delete_pool(&client, "restart").await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_input_gets_its_condition_and_event_and_no_cloud_call() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-invalid", &[("team", "a")]).await;
    create_pool(
        &client,
        "small",
        json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 2}}),
    )
    .await;
    create_pool(
        &client,
        "closed",
        json!({"provider": {"memory": {}}, "namespaceSelector": {"matchLabels": {"team": "b"}}}),
    )
    .await;
    create_pool(
        &client,
        "broken",
        json!({"provider": {"memory": {}}, "portRange": {"min": 9000, "max": 8000}}),
    )
    .await;

    // a provider this build does not have: a configuration error of the cloud side
    create_pool(
        &client,
        "unbuilt",
        json!({"provider": {"gcp": {"project": "p", "region": "r"}}}),
    )
    .await;
    let p = |name: &str| tcp(name, None);
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            // a valid object name (DNS subdomain) that cannot name the backing Service; CEL refuses it on 1.25+
            "web.v1",
            json!({"pool": "small", "selector": {"app": "x"}, "ports": [p("a")]}),
            "InvalidName",
        ),
        (
            "bad-selector",
            json!({"pool": "small", "selector": {"bad key!": "x"}, "ports": [p("a")]}),
            "InvalidSelector",
        ),
        (
            "dup-port",
            json!({"pool": "small", "selector": {"app": "x"}, "ports": [tcp("a", Some(80)), tcp("b", Some(80))]}),
            "InvalidPort",
        ),
        (
            "bad-target",
            json!({"pool": "small", "selector": {"app": "x"}, "ports": [{"name": "a", "targetPort": 0}]}),
            "InvalidTargetPort",
        ),
        ("no-pool", spec("nope", vec![p("a")]), "PoolNotFound"),
        (
            "no-default",
            json!({"selector": {"app": "x"}, "ports": [p("a")]}),
            "NoDefaultPool",
        ),
        (
            "not-admitted",
            spec("closed", vec![p("a")]),
            "NamespaceNotAllowed",
        ),
        ("pool-invalid", spec("broken", vec![p("a")]), "PoolInvalid"),
        (
            "over-capacity",
            spec("small", vec![p("a"), p("b"), p("c")]),
            "TooManyPorts",
        ),
        (
            "cloud-unavailable",
            spec("unbuilt", vec![p("a")]),
            "PoolNotReady",
        ),
    ];
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    for (name, s, _) in &cases {
        // the schema cannot say these (or, for the pool cases, cannot know them): the operator must catch them
        if let Err(e) = api
            .create(&PostParams::default(), &shared_lb(&ns, name, s.clone()))
            .await
        {
            panic!("the apiserver refused {name}, so this case does not test the operator: {e}");
        }
    }
    for (name, _, reason) in &cases {
        let msg = refused(&client, &ns, name, reason).await;
        assert!(!msg.is_empty(), "{name}: a message for a person");
        event_recorded(&client, &ns, name, reason, 10).await;
    }
    assert!(
        cloud.load_balancers().is_empty(),
        "no invalid input reached the cloud"
    );
    assert!(
        cloud.mutating_calls().is_empty(),
        "no cloud call at all: {:?}",
        cloud.mutating_calls()
    );

    // what the schema can say, the apiserver refuses before the operator sees it
    let schema_cases = [
        json!({"selector": {"app": "x"}, "ports": []}),
        json!({"selector": {"app": "x"}, "ports": [{"name": "a", "port": 70000, "targetPort": 1}]}),
        json!({"selector": {"app": "x"}, "ports": [{"name": "a", "targetPort": 1, "protocol": "SCTP"}]}),
        json!({"selector": {"app": "x"}, "ports": [{"name": "Bad_Name", "targetPort": 1}]}),
        json!({"selector": {"app": "x"}, "ports": [{"name": "a", "targetPort": 1}], "sourceRanges": ["10.0.0.0/33"]}),
        json!({"selector": {}, "ports": [{"name": "a", "targetPort": 1}]}),
    ];
    // untyped, so that what serde could not even represent reaches the apiserver
    let ar = ApiResource::erase::<SharedLB>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    for (i, s) in schema_cases.into_iter().enumerate() {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "sharedlb.dev/v1alpha1", "kind": "SharedLB",
            "metadata": {"name": format!("schema-{i}"), "namespace": ns}, "spec": s,
        }))
        .expect("dynamic object");
        let r = raw.create(&PostParams::default(), &obj).await;
        assert!(
            matches!(r, Err(kube::Error::Api(ref e)) if e.code == 422),
            "schema case {i} {s}: {r:?}"
        );
    }

    // a Service the operator did not make is never taken over
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "taken-sharedlb", "namespace": ns},
        "spec": {"type": "ClusterIP", "ports": [{"port": 1, "targetPort": 1}], "selector": {"other": "app"}},
    }))
    .expect("svc");
    Api::<Service>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &svc)
        .await
        .expect("svc");
    create_slb(&client, &ns, "taken", spec("small", vec![p("a")])).await;
    refused(&client, &ns, "taken", "ServiceConflict").await;
    assert!(
        cloud.mutating_calls().is_empty() && cloud.load_balancers().is_empty(),
        "a Service conflict is found before the cloud is touched: {:?}",
        cloud.mutating_calls()
    );
    let svc = Api::<Service>::namespaced(client.clone(), &ns)
        .get("taken-sharedlb")
        .await
        .expect("svc");
    assert_eq!(
        svc.spec.expect("spec").type_.as_deref(),
        Some("ClusterIP"),
        "the foreign Service is untouched"
    );
    // the allocation written before the refusal stays recorded (the refusal used to write the status it had read
    // before the allocation, erasing it; every retry wrote it again and erased it again)
    let slbs: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let allocated_since = |s: &SharedLB| {
        s.status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Allocated"))
            .map(|c| (c.status.clone(), c.last_transition_time.clone()))
    };
    let before = allocated_since(&slbs.get("taken").await.expect("taken"));
    let poke = |n: &'static str| json!({"metadata": {"annotations": {"e2e/poke": n}}});
    for n in ["1", "2"] {
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        slbs.patch("taken", &PatchParams::default(), &Patch::Merge(poke(n)))
            .await
            .expect("poke");
    }
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let taken = slbs.get("taken").await.expect("taken");
    let st = taken.status.clone().expect("status");
    assert_eq!(st.pool.as_deref(), Some("small"), "{st:?}");
    assert_eq!(st.ports.len(), 1, "{st:?}");
    assert_eq!(
        allocated_since(&taken),
        before,
        "allocated once, not again on every retry"
    );
    assert_eq!(before.map(|b| b.0).as_deref(), Some("True"));

    delete_namespace(&client, &ns).await;
    let unbuilt = Api::<LoadBalancerPool>::all(client.clone());
    eventually(
        30,
        "the unbuilt pool reports its provider error",
        || async {
            let st = unbuilt.get("unbuilt").await.ok()?.status?;
            st.conditions
                .iter()
                .any(|c| {
                    c.type_ == "Ready" && c.status == "False" && c.reason == "CloudInvalidConfig"
                })
                .then_some(())
        },
    )
    .await;
    // a pool moved to another provider would orphan every load balancer made by the first: 1.20 runs no
    // transition rule, so the operator refuses the change and keeps the provider it has
    let pools = Api::<LoadBalancerPool>::all(client.clone());
    eventually(30, "the pool records its provider", || async {
        let st = pools.get("small").await.ok()?.status?;
        (st.provider.as_deref() == Some("memory")).then_some(())
    })
    .await;
    let to_local =
        json!({"spec": {"provider": {"memory": null, "local": {"addresses": ["127.0.0.10"]}}}});
    pools
        .patch("small", &PatchParams::default(), &Patch::Merge(&to_local))
        .await
        .expect("1.20 accepts the change");
    let (reason, message) = pool_not_ready(&client, "small").await;
    assert_eq!(reason, "ProviderChanged", "{message}");
    let st = pools
        .get("small")
        .await
        .expect("pool")
        .status
        .expect("status");
    assert_eq!(
        st.provider.as_deref(),
        Some("memory"),
        "the recorded provider stays"
    );
    for pool in ["small", "closed", "broken", "unbuilt"] {
        delete_pool(&client, pool).await;
    }
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_in_use_waits_and_an_unused_one_takes_its_load_balancers_with_it() {
    use sharedlb_providers::memory::{Faults, MemoryProvider};
    use sharedlb_providers::{LoadBalancerKey, LoadBalancerProvider};

    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-pooldel", &[]).await;
    create_pool(&client, "doomed", json!({"provider": {"memory": {}}})).await;
    for n in ["a", "b"] {
        create_slb(&client, &ns, n, spec("doomed", vec![tcp("web", None)])).await;
        ready(&client, &ns, n, 30).await;
    }
    // an orphan the pool's inventory finds (a crash between creating it and recording it, say)
    let stray = MemoryProvider::new(cloud.clone(), "e2e", "doomed", Faults::default());
    let key = LoadBalancerKey {
        cluster_id: "e2e".into(),
        pool: "doomed".into(),
        index: 9,
    };
    stray.ensure_load_balancer(&key).await.expect("orphan");
    assert_eq!(cloud_pool(&cloud, "doomed").len(), 2);

    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    pools
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("delete pool");
    let msg = eventually(30, "pool InUse", || async {
        let st = pools.get("doomed").await.ok()?.status?;
        st.conditions
            .iter()
            .find(|c| c.type_ == "Ready" && c.reason == "InUse")
            .map(|c| c.message.clone())
    })
    .await;
    assert!(msg.contains("2 SharedLB(s)"), "{msg}");
    assert_eq!(
        condition(&ready(&client, &ns, "a", 5).await, "Ready").map(|c| c.0),
        Some("True".into())
    );
    create_slb(&client, &ns, "late", spec("doomed", vec![tcp("web", None)])).await;
    refused(&client, &ns, "late", "PoolDeleting").await;

    delete_namespace(&client, &ns).await;
    eventually(60, "the pool gone", || async {
        pools.get_opt("doomed").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        cloud_pool(&cloud, "doomed").is_empty(),
        "nothing of the pool left in the cloud: {:?}",
        cloud_pool(&cloud, "doomed")
    );
    op.kill().await;
}

/// A pool whose cloud answers slowly (30 s a call, as an unreachable endpoint until its timeout) delays no
/// other pool: making its provider and registering its nodes happen outside the lock every pool goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_cloud_delays_no_other_pool() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-isolation", &[]).await;
    create_pool(
        &client,
        "slow",
        json!({"provider": {"memory": {"latencyMs": 30000}}}),
    )
    .await;
    create_pool(&client, "quick", json!({"provider": {"memory": {}}})).await;
    create_slb(&client, &ns, "stuck", spec("slow", vec![tcp("a", None)])).await;
    // the slow pool's provider is being made (its node registration sleeping) when the quick one is needed
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    create_slb(&client, &ns, "fine", spec("quick", vec![tcp("a", None)])).await;
    ready(&client, &ns, "fine", 25).await;
    let took = started.elapsed();
    println!("the quick pool's SharedLB was Ready in {took:?} beside a 30 s cloud");
    assert!(
        took < std::time::Duration::from_secs(5),
        "a slow pool held up another for {took:?}"
    );
    // clean up at normal speed: the provider is made again, from the pool's settings, after a restart
    op.kill().await;
    let fast = json!({"spec": {"provider": {"memory": {"latencyMs": null}}}});
    Api::<LoadBalancerPool>::all(client.clone())
        .patch("slow", &PatchParams::default(), &Patch::Merge(&fast))
        .await
        .expect("latency off");
    let op = Operator::start(&client, &cloud);
    delete_namespace(&client, &ns).await;
    for pool in ["slow", "quick"] {
        delete_pool(&client, pool).await;
    }
    op.kill().await;
}

/// A listener in the cloud that no allocation accounts for (a crash leaves one) and that the cloud refuses to
/// remove used to fail every rebuild of its pool, so the pool placed nothing at all. Now its port stays taken,
/// everything else is placed, the pool says so (InSync=False, the metric), and once the cloud lets go the
/// pool removes it and frees the port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_listener_that_cannot_be_removed_blocks_its_port_not_the_pool() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-stray", &[]).await;
    create_pool(
        &client,
        "strays",
        json!({"provider": {"memory": {}}, "capacity": {"maxLoadBalancers": 1}}),
    )
    .await;
    create_slb(
        &client,
        &ns,
        "first",
        spec("strays", vec![tcp("a", Some(4001))]),
    )
    .await;
    ready(&client, &ns, "first", 30).await;
    op.kill().await;
    let lb = cloud_pool(&cloud, "strays")
        .into_keys()
        .next()
        .expect("the pool's load balancer");
    cloud.plant_listener(&lb, 4002, sharedlb_providers::Protocol::Tcp, "gone-owner");
    cloud.refuse_removal("gone-owner", true);

    let op = Operator::start(&client, &cloud);
    create_slb(
        &client,
        &ns,
        "second",
        spec("strays", vec![tcp("a", Some(4003))]),
    )
    .await;
    ready(&client, &ns, "second", 30).await;
    // never two owners of one port: the stray's port is not handed out
    create_slb(
        &client,
        &ns,
        "third",
        spec("strays", vec![tcp("a", Some(4002))]),
    )
    .await;
    refused(&client, &ns, "third", "PortInUse").await;
    let pools = Api::<LoadBalancerPool>::all(client.clone());
    let in_sync = |want: &'static str| {
        let pools = pools.clone();
        async move {
            let st = pools.get("strays").await.ok()?.status?;
            let c = st.conditions.into_iter().find(|c| c.type_ == "InSync")?;
            (c.status == want).then_some(c.message)
        }
    };
    let msg = eventually(30, "the pool reports the stray", || in_sync("False")).await;
    assert!(
        msg.contains("port 4002") && msg.contains("cannot be removed"),
        "{msg}"
    );

    cloud.refuse_removal("gone-owner", false);
    eventually(
        45,
        "the pool removes the stray once the cloud lets it",
        || in_sync("True"),
    )
    .await;
    let listeners = &cloud_pool(&cloud, "strays")[&lb].1;
    assert!(
        listeners
            .iter()
            .all(|(port, _, owner)| *port != 4002 && owner != "gone-owner"),
        "{listeners:?}"
    );
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "strays").await;
    op.kill().await;
}

/// A port removed from a SharedLB is closed even when the first attempt to remove its listener fails: the
/// removal used to be a plan action run once, so after a failure the next reconcile had nothing to do and the
/// listener kept forwarding to a node port the apiserver could hand to anyone. Now every reconcile removes what
/// the cloud holds for the owner and should not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_port_is_closed_even_when_its_first_removal_fails() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-rm", &[]).await;
    create_pool(&client, "rm", json!({"provider": {"memory": {}}})).await;
    let two = vec![tcp("a", Some(4101)), tcp("b", Some(4102))];
    create_slb(&client, &ns, "x", spec("rm", two)).await;
    ready(&client, &ns, "x", 30).await;

    cloud.fail_next("delete_listener", 1);
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [tcp("a", Some(4101))]}})),
    )
    .await
    .expect("drop port b");
    let ports = || {
        cloud_pool(&cloud, "rm")
            .values()
            .flat_map(|(_, l)| l.iter().map(|x| x.0))
            .collect::<Vec<u16>>()
    };
    eventually(30, "the listener of the removed port is gone", || async {
        (ports() == vec![4101]).then_some(())
    })
    .await;
    assert!(
        cloud.mutating_calls().get("delete_listener") >= Some(&2),
        "the removal failed once and was made again: {:?}",
        cloud.mutating_calls()
    );
    let x = api.get("x").await.expect("x");
    assert_eq!(endpoints(&x).len(), 1, "{:?}", x.status);
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "rm").await;
    op.kill().await;
}

/// An update refused for room (a port added while the load balancer is full) keeps the old allocation — and it
/// is still deployed: a listener deleted behind the operator's back comes back, and a load balancer that changed
/// address is reported at its new address. Before, the refusal returned before programming anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_update_keeps_its_current_allocation_served() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-keep", &[]).await;
    create_pool(
        &client,
        "keep",
        json!({"provider": {"memory": {}},
               "capacity": {"maxLoadBalancers": 1, "maxPortsPerLoadBalancer": 2}}),
    )
    .await;
    create_slb(&client, &ns, "x", spec("keep", vec![tcp("a", Some(4201))])).await;
    create_slb(&client, &ns, "y", spec("keep", vec![tcp("a", Some(4202))])).await;
    let x = ready(&client, &ns, "x", 30).await;
    ready(&client, &ns, "y", 30).await;
    let uid = x.uid().expect("uid");

    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let grown = json!({"spec": {"ports": [tcp("a", Some(4201)), tcp("b", Some(4203))]}});
    api.patch("x", &PatchParams::default(), &Patch::Merge(&grown))
        .await
        .expect("grow x");
    refused(&client, &ns, "x", "NoRoomToGrow").await;

    let (lb, _) = cloud_pool(&cloud, "keep")
        .into_iter()
        .next()
        .expect("the pool's load balancer");
    cloud.drop_listener(&lb, 4201, sharedlb_providers::Protocol::Tcp);
    cloud.set_address(&lb, "198.51.100.200".parse().expect("ip"));
    // any change makes a reconcile; the refusal's own retry would too, later
    let poke = json!({"metadata": {"annotations": {"e2e/poke": "1"}}});
    api.patch("x", &PatchParams::default(), &Patch::Merge(&poke))
        .await
        .expect("poke x");
    eventually(45, "x's listener is back, owned by x", || async {
        let listeners = cloud_pool(&cloud, "keep").remove(&lb)?.1;
        listeners
            .iter()
            .any(|(port, _, owner)| *port == 4201 && *owner == uid)
            .then_some(())
    })
    .await;
    let x = eventually(30, "x reports the load balancer's new address", || async {
        let x = api.get("x").await.ok()?;
        let ip = x.status.as_ref()?.load_balancer.as_ref()?.ip.clone()?;
        (ip == "198.51.100.200").then_some(x)
    })
    .await;
    assert_eq!(endpoints(&x), vec![("198.51.100.200".to_string(), 4201)]);
    let state = |t| condition(&x, t).map(|(status, reason, _)| (status, reason));
    assert_eq!(
        state("Ready"),
        Some(("False".into(), "NoRoomToGrow".into()))
    );
    assert_eq!(
        state("Programmed"),
        Some(("True".into(), "Programmed".into()))
    );
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "keep").await;
    op.kill().await;
}

/// A status is a claim, not the truth. Anyone who may patch `sharedlbs/status` in their namespace used to be
/// able to take another namespace's port: forge a status naming it, wait for a restart, and the rebuild (first in
/// LIST order wins) moved the victim and removed its listener as stray. Now the owner the cloud records wins: the
/// forged claim is rejected with an Event, nothing moves, no listener is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_status_takes_no_port_from_another_namespace() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let one_lb = json!({"provider": {"memory": {}}, "capacity": {"maxLoadBalancers": 1}});
    create_pool(&client, "claims", one_lb).await;
    let victim_ns = namespace(&client, "e2e-team-b", &[]).await;
    // sorts before the victim's namespace in a LIST, as the attacker in the finding chose
    let attacker_ns = namespace(&client, "aaa-e2e", &[]).await;
    let udp = json!({"name": "dns", "port": 8053, "targetPort": 53, "protocol": "UDP"});
    create_slb(
        &client,
        &victim_ns,
        "dns",
        spec("claims", vec![udp.clone()]),
    )
    .await;
    let dns = ready(&client, &victim_ns, "dns", 30).await;
    let dns_uid = dns.uid().expect("uid");
    let before = endpoints(&dns);
    create_slb(&client, &attacker_ns, "x", spec("claims", vec![udp])).await;
    refused(&client, &attacker_ns, "x", "PortInUse").await;

    let lb_name = dns
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.clone())
        .expect("lb")
        .name;
    let forged = json!({"status": {
        "pool": "claims",
        "loadBalancer": {"name": lb_name, "ip": before[0].0},
        "ports": [{"name": "dns", "port": 8053, "protocol": "UDP"}],
    }});
    let attacker: Api<SharedLB> = Api::namespaced(client.clone(), &attacker_ns);
    attacker
        .patch_status("x", &PatchParams::default(), &Patch::Merge(&forged))
        .await
        .expect("forge x's status");
    op.kill().await;
    let removals = |c: &MemoryCloud| c.mutating_calls().get("delete_listener").copied();
    let removed_before = removals(&cloud);

    let op = Operator::start(&client, &cloud);
    let victim: Api<SharedLB> = Api::namespaced(client.clone(), &victim_ns);
    let poke = json!({"metadata": {"annotations": {"e2e/poke": "1"}}});
    victim
        .patch("dns", &PatchParams::default(), &Patch::Merge(&poke))
        .await
        .expect("poke dns");
    for _ in 0..10 {
        let dns = victim.get("dns").await.expect("dns");
        assert_eq!(endpoints(&dns), before, "the victim moved");
        assert_eq!(condition(&dns, "Ready").map(|c| c.0), Some("True".into()));
        let owners: Vec<(u16, String, String)> = cloud_pool(&cloud, "claims")
            .into_values()
            .flat_map(|(_, l)| l)
            .collect();
        assert_eq!(owners, vec![(8053, "Udp".into(), dns_uid.clone())]);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    assert_eq!(removals(&cloud), removed_before, "a listener was removed");
    event_recorded(&client, &attacker_ns, "x", "ClaimRejected", 30).await;
    refused(&client, &attacker_ns, "x", "PortInUse").await;
    delete_namespace(&client, &attacker_ns).await;
    delete_namespace(&client, &victim_ns).await;
    delete_pool(&client, "claims").await;
    op.kill().await;
}

fn served_ports(cloud: &MemoryCloud, pool: &str, owner: &str) -> Vec<u16> {
    cloud_pool(cloud, pool)
        .into_values()
        .flat_map(|(_, l)| l)
        .filter(|(_, _, o)| o == owner)
        .map(|(p, _, _)| p)
        .collect()
}

/// A namespace whose labels no longer match the pool's namespaceSelector used to keep being served (the refusal
/// touched nothing). Now its SharedLB's listeners are withdrawn and its ports released at once (the operator
/// watches Namespaces), and it is served again when the namespace is admitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_loses_admission_is_withdrawn_and_served_again_once_admitted() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-admit", &[("team", "in")]).await;
    let selector = json!({"matchLabels": {"team": "in"}});
    create_pool(
        &client,
        "admit",
        json!({"provider": {"memory": {}}, "namespaceSelector": selector}),
    )
    .await;
    create_slb(&client, &ns, "s", spec("admit", vec![tcp("a", Some(4301))])).await;
    let s = ready(&client, &ns, "s", 30).await;
    let uid = s.uid().expect("uid");
    assert_eq!(served_ports(&cloud, "admit", &uid), vec![4301]);

    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let label = |v: &str| json!({"metadata": {"labels": {"team": v}}});
    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(label("out")))
        .await
        .expect("relabel");
    let msg = refused(&client, &ns, "s", "NamespaceNotAllowed").await;
    assert!(msg.contains("withdrawn"), "{msg}");
    eventually(10, "s's listener is withdrawn", || async {
        served_ports(&cloud, "admit", &uid).is_empty().then_some(())
    })
    .await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let st = api.get("s").await.expect("s").status.expect("status");
    assert!(st.pool.is_none() && st.ports.is_empty(), "released: {st:?}");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    eventually(10, "its Service is gone", || async {
        services
            .get_opt("s-sharedlb")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;

    namespaces
        .patch(&ns, &PatchParams::default(), &Patch::Merge(label("in")))
        .await
        .expect("relabel back");
    ready(&client, &ns, "s", 30).await;
    assert_eq!(served_ports(&cloud, "admit", &uid), vec![4301]);
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "admit").await;
    op.kill().await;
}

/// A tenant whose SharedLB names a pool it holds nothing in (here: a pool that does not admit its namespace)
/// used to hold the pool's deletion up forever. Deletion now waits only for SharedLBs holding ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_a_pool_does_not_hold_up_its_deletion() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let admitted = namespace(&client, "e2e-gone-in", &[("team", "in")]).await;
    let outsider = namespace(&client, "e2e-gone-out", &[]).await;
    let selector = json!({"matchLabels": {"team": "in"}});
    create_pool(
        &client,
        "gone",
        json!({"provider": {"memory": {}}, "namespaceSelector": selector}),
    )
    .await;
    create_slb(&client, &admitted, "a", spec("gone", vec![tcp("a", None)])).await;
    ready(&client, &admitted, "a", 30).await;
    create_slb(&client, &outsider, "b", spec("gone", vec![tcp("a", None)])).await;
    refused(&client, &outsider, "b", "NamespaceNotAllowed").await;

    let pools = Api::<LoadBalancerPool>::all(client.clone());
    pools
        .delete("gone", &DeleteParams::default())
        .await
        .expect("delete the pool");
    let (reason, msg) = pool_not_ready(&client, "gone").await;
    assert_eq!(reason, "InUse", "{msg}");
    assert!(
        msg.contains("1 SharedLB(s)") && msg.contains("/a"),
        "waits for the holder only: {msg}"
    );
    Api::<SharedLB>::namespaced(client.clone(), &admitted)
        .delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    eventually(30, "the pool is gone while b still names it", || async {
        pools.get_opt("gone").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        cloud_pool(&cloud, "gone").is_empty(),
        "the pool's load balancers are deleted"
    );
    delete_namespace(&client, &admitted).await;
    delete_namespace(&client, &outsider).await;
    op.kill().await;
}

/// A pool's provider settings edited in place (not the cloud or its location) used to be ignored until the
/// operator restarted. Now the provider is made anew from them at once and nothing the pool holds moves: a
/// pool whose memory cloud failed every call serves its SharedLB as soon as the failures are switched off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_edit_takes_effect_without_a_restart() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-edit", &[]).await;
    create_pool(
        &client,
        "edit",
        json!({"provider": {"memory": {"errorPerMille": 1000}}}),
    )
    .await;
    create_slb(&client, &ns, "s", spec("edit", vec![tcp("a", Some(4401))])).await;
    not_programmed(&client, &ns, "s").await;
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let placed = api.get("s").await.expect("s").status.expect("status");

    let healthy = json!({"spec": {"provider": {"memory": {"errorPerMille": null}}}});
    Api::<LoadBalancerPool>::all(client.clone())
        .patch("edit", &PatchParams::default(), &Patch::Merge(&healthy))
        .await
        .expect("switch the failures off");
    let s = ready(&client, &ns, "s", 20).await;
    let st = s.status.expect("status");
    assert_eq!(
        (st.pool, st.load_balancer.map(|l| l.name), st.ports[0].port),
        (
            placed.pool,
            placed.load_balancer.map(|l| l.name),
            placed.ports[0].port
        ),
        "nothing moved"
    );
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "edit").await;
    op.kill().await;
}

/// A provider factory whose cloud can be made unreachable, as an outage or lost credentials make it.
#[derive(Debug)]
struct Unreachable {
    inner: sharedlb::BuiltinProviders,
    down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl sharedlb::ProviderFactory for Unreachable {
    async fn make(
        &self,
        cluster_id: &str,
        pool: &str,
        spec: &sharedlb_crds::LoadBalancerPoolSpec,
    ) -> Result<
        std::sync::Arc<dyn sharedlb_providers::LoadBalancerProvider>,
        sharedlb_providers::ProviderError,
    > {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(sharedlb_providers::ProviderError::Other(
                "the cloud cannot be reached (made so by the test)".into(),
            ));
        }
        self.inner.make(cluster_id, pool, spec).await
    }
}

/// A pool deleted while its provider cannot be made used to be taken for one that never made anything: its
/// finalizer went and its load balancers stayed in the cloud. Now, as its status lists a load balancer, the
/// deletion waits until the provider can be made and then deletes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_deleted_while_its_cloud_is_unreachable_waits_and_leaves_nothing() {
    use std::sync::atomic::Ordering;
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let factory = Arc::new(Unreachable {
        inner: sharedlb::BuiltinProviders::new(cloud.clone()),
        down: false.into(),
    });
    let settings = || sharedlb::Settings {
        cluster_id: "e2e".into(),
        ..Default::default()
    };
    let op = Operator::start_with_factory(&client, factory.clone(), settings());
    let ns = namespace(&client, "e2e-outage", &[]).await;
    create_pool(&client, "outage", json!({"provider": {"memory": {}}})).await;
    create_slb(
        &client,
        &ns,
        "s",
        spec("outage", vec![tcp("a", Some(4501))]),
    )
    .await;
    ready(&client, &ns, "s", 30).await;
    // the load balancer outlives its SharedLB here: a listener the cloud will not let go holds it
    let lb = cloud_pool(&cloud, "outage").into_keys().next().expect("lb");
    cloud.plant_listener(&lb, 4502, sharedlb_providers::Protocol::Tcp, "gone-owner");
    cloud.refuse_removal("gone-owner", true);
    op.kill().await;
    let op = Operator::start_with_factory(&client, factory.clone(), settings());
    delete_namespace(&client, &ns).await;
    let pools = Api::<LoadBalancerPool>::all(client.clone());
    eventually(
        30,
        "the pool lists the load balancer it still has",
        || async {
            let st = pools.get("outage").await.ok()?.status?;
            (st.totals.load_balancers == 1 && st.totals.ports_used == 1).then_some(())
        },
    )
    .await;

    op.kill().await;
    factory.down.store(true, Ordering::SeqCst);
    let op = Operator::start_with_factory(&client, factory.clone(), settings());
    pools
        .delete("outage", &DeleteParams::default())
        .await
        .expect("delete the pool");
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(
        pools.get_opt("outage").await.expect("get").is_some(),
        "the deletion waits for the cloud"
    );
    assert_eq!(cloud_pool(&cloud, "outage").len(), 1, "nothing deleted yet");

    factory.down.store(false, Ordering::SeqCst);
    cloud.refuse_removal("gone-owner", false);
    eventually(60, "the pool is gone once its cloud is back", || async {
        pools.get_opt("outage").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        cloud_pool(&cloud, "outage").is_empty(),
        "its load balancer is deleted"
    );
    op.kill().await;
}

/// Taking a SharedLB out of its pool (here: its namespace no longer admitted) stops where a listener removal
/// fails, with the status still naming the place, and the next reconcile finishes it. It used to log the failure,
/// clear the status, and never try again: the listener kept serving a namespace the pool no longer admits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_withdrawal_that_fails_once_is_finished_by_the_next_reconcile() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-withdraw", &[("team", "in")]).await;
    let selector = json!({"matchLabels": {"team": "in"}});
    create_pool(
        &client,
        "withdraw",
        json!({"provider": {"memory": {}}, "namespaceSelector": selector}),
    )
    .await;
    create_slb(
        &client,
        &ns,
        "s",
        spec("withdraw", vec![tcp("a", Some(4601))]),
    )
    .await;
    let uid = ready(&client, &ns, "s", 30).await.uid().expect("uid");
    // another namespace keeps the load balancer in use, so only a removal can close s's port
    let other = namespace(&client, "e2e-withdraw-keep", &[("team", "in")]).await;
    create_slb(
        &client,
        &other,
        "k",
        spec("withdraw", vec![tcp("a", Some(4602))]),
    )
    .await;
    ready(&client, &other, "k", 30).await;

    cloud.fail_next("delete_listener", 1);
    let out = json!({"metadata": {"labels": {"team": "out"}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(&ns, &PatchParams::default(), &Patch::Merge(&out))
        .await
        .expect("relabel");
    refused(&client, &ns, "s", "NamespaceNotAllowed").await;
    eventually(30, "the listener is withdrawn after all", || async {
        served_ports(&cloud, "withdraw", &uid)
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        cloud.mutating_calls().get("delete_listener") >= Some(&2),
        "the removal failed once and was made again: {:?}",
        cloud.mutating_calls()
    );
    assert_eq!(
        cloud_pool(&cloud, "withdraw").len(),
        1,
        "the load balancer stays"
    );
    delete_namespace(&client, &ns).await;
    delete_namespace(&client, &other).await;
    delete_pool(&client, "withdraw").await;
    op.kill().await;
}

/// Each pool's provider is sent the Ready nodes on its own: a pool whose cloud stops answering delays no other
/// pool, a failed update is retried, a provider made anew by a settings edit has the nodes, and a quiet operator
/// sends nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_reach_each_pool_on_its_own() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    delete_nodes(&client, &["e2e-node-a"]).await; // left by an earlier run that failed half-way
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    create_pool(
        &client,
        "nodes-stalled",
        json!({"provider": {"memory": {}}}),
    )
    .await;
    create_pool(&client, "nodes-quick", json!({"provider": {"memory": {}}})).await;
    for pool in ["nodes-stalled", "nodes-quick"] {
        eventually(30, &format!("{pool} is sent the nodes once"), || async {
            (cloud.nodes(pool).1 >= 1).then_some(())
        })
        .await;
    }
    let has_node = |pool: &str| cloud.nodes(pool).0.iter().any(|n| n.name == "e2e-node-a");

    cloud.stall_node_updates("nodes-stalled", true);
    cloud.fail_next("update_nodes", 1);
    add_ready_node(&client, "e2e-node-a", "memory://e2e-node-a").await;
    eventually(30, "the quick pool has the new node", || async {
        has_node("nodes-quick").then_some(())
    })
    .await;
    assert!(
        !has_node("nodes-stalled"),
        "the stalled pool's call is still waiting"
    );

    let sent = cloud.nodes("nodes-quick").1;
    tokio::time::sleep(std::time::Duration::from_secs(12)).await;
    assert_eq!(
        cloud.nodes("nodes-quick").1,
        sent,
        "nothing is sent again while nothing changes"
    );

    let edit = json!({"spec": {"provider": {"memory": {"latencyMs": 1}}}});
    Api::<LoadBalancerPool>::all(client.clone())
        .patch("nodes-quick", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("edit the quick pool's settings");
    eventually(30, "the provider made anew is sent the nodes", || async {
        (cloud.nodes("nodes-quick").1 > sent).then_some(())
    })
    .await;
    assert!(has_node("nodes-quick"));

    cloud.stall_node_updates("nodes-stalled", false);
    eventually(
        30,
        "the stalled pool has the node once its cloud answers",
        || async { has_node("nodes-stalled").then_some(()) },
    )
    .await;
    delete_nodes(&client, &["e2e-node-a"]).await;
    eventually(30, "a removed node leaves both pools", || async {
        (!has_node("nodes-quick") && !has_node("nodes-stalled")).then_some(())
    })
    .await;
    delete_pool(&client, "nodes-stalled").await;
    delete_pool(&client, "nodes-quick").await;
    op.kill().await;
}

/// Each load balancer targets `targetNodesPerZone` of each zone's Ready nodes (zones from the Nodes'
/// `topology.kubernetes.io/zone` label), and a node that joins changes only the load balancers it becomes a target
/// of.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_load_balancer_targets_its_few_nodes_of_each_zone() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let ours: Vec<String> = (0..7).map(|i| format!("zone-node-{i}")).collect();
    let refs: Vec<&str> = ours.iter().map(String::as_str).collect();
    delete_nodes(&client, &refs).await; // left by an earlier run that failed half-way
    let zone_of = |i: usize| format!("zone-{}", i % 2);
    let add = |i: usize| {
        let (client, name, zone) = (client.clone(), ours[i].clone(), zone_of(i));
        async move {
            add_ready_node(&client, &name, &format!("memory://{name}")).await;
            let labels = json!({"metadata": {"labels": {"topology.kubernetes.io/zone": zone}}});
            Api::<k8s_openapi::api::core::v1::Node>::all(client.clone())
                .patch(&name, &PatchParams::default(), &Patch::Merge(&labels))
                .await
                .expect("label the node's zone");
        }
    };
    for i in 0..6 {
        add(i).await;
    }
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let pool = json!({"provider": {"memory": {"targetNodesPerZone": 1}},
        "capacity": {"maxPortsPerLoadBalancer": 1}});
    create_pool(&client, "zones", pool).await;
    let ns = namespace(&client, "zones", &[]).await;
    for name in ["a", "b", "c", "d"] {
        let spec = json!({"pool": "zones", "selector": {"app": name},
            "ports": [{"name": "p", "targetPort": 80}]});
        create_slb(&client, &ns, name, spec).await;
        ready(&client, &ns, name, 30).await;
    }
    // each load balancer's targets among this test's nodes (other tests' nodes may come and go)
    let targets = || -> Vec<BTreeSet<String>> {
        cloud
            .load_balancers()
            .iter()
            .filter(|l| l.tags.get("sharedlb.dev/pool").map(String::as_str) == Some("zones"))
            .map(|l| {
                l.targets
                    .iter()
                    .filter(|t| ours.contains(t))
                    .cloned()
                    .collect()
            })
            .collect()
    };
    let before = eventually(
        30,
        "one node of each zone behind each load balancer",
        || async {
            let t = targets();
            let one_per_zone = |set: &BTreeSet<String>| {
                let zones: BTreeSet<String> = set
                    .iter()
                    .filter_map(|n| ours.iter().position(|o| o == n).map(zone_of))
                    .collect();
                set.len() == 2 && zones.len() == 2
            };
            (t.len() == 4 && t.iter().all(one_per_zone)).then_some(t)
        },
    )
    .await;
    let distinct: BTreeSet<&BTreeSet<String>> = before.iter().collect();
    assert!(
        distinct.len() > 1,
        "load balancers share the nodes out: {before:?}"
    );

    add(6).await;
    eventually(30, "the pool is sent the new node", || async {
        cloud
            .nodes("zones")
            .0
            .iter()
            .any(|n| n.name == "zone-node-6" && n.zone.is_some())
            .then_some(())
    })
    .await;
    let after = targets();
    // (rendezvous hashing is deterministic: with these names the new node wins in some zones, not in all)
    let joined = after.iter().filter(|a| a.contains("zone-node-6")).count();
    assert!(joined > 0 && joined < 4, "{after:?}");
    for (b, a) in before.iter().zip(&after) {
        if !a.contains("zone-node-6") {
            assert_eq!(
                b, a,
                "a load balancer the new node did not join is unchanged"
            );
        }
    }

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "zones").await;
    delete_nodes(&client, &refs).await;
    op.kill().await;
}

/// `spec.drain`: a drained load balancer takes nothing new, though it has room; an index not made yet is never
/// made; a SharedLB on it may not grow there (Ready says why, the old port serves on); the pool's status marks it
/// and names who is still on it; an invalid name is the pool's condition; emptied, it is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_load_balancer_takes_nothing_new_and_shows_who_is_left() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-drain", &[]).await;
    create_pool(
        &client,
        "drn",
        json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 2}}),
    )
    .await;
    for n in ["a", "b", "c"] {
        create_slb(&client, &ns, n, spec("drn", vec![tcp("web", None)])).await;
        ready(&client, &ns, n, 30).await;
    }
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let lb_of = |s: &SharedLB| {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .map(|l| l.name.clone())
            .unwrap_or_default()
    };
    let b = api.get("b").await.expect("b");
    assert_eq!(lb_of(&b), "drn-0");
    let a_ip = endpoints(&api.get("a").await.expect("a"))[0].0.clone();
    let listeners_at = |ip: &str| {
        cloud_pool(&cloud, "drn")
            .into_values()
            .find(|(at, _)| at == ip)
            .map(|(_, l)| l.len())
    };
    api.delete("b", &DeleteParams::default())
        .await
        .expect("delete b");
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    let patch = |drain: serde_json::Value| {
        let pools = pools.clone();
        async move {
            pools
                .patch(
                    "drn",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"drain": drain}})),
                )
                .await
                .expect("patch drain")
        }
    };
    patch(json!(["drn-0", "drn-2"])).await;
    eventually(60, "the pool shows drn-0 draining with a on it", || async {
        let st = pools.get("drn").await.ok()?.status?;
        let row = st.load_balancers.iter().find(|l| l.name == "drn-0")?;
        (row.draining && row.shared_lbs == vec![format!("{ns}/a")]).then_some(())
    })
    .await;
    // drn-0 has room for one more, drn-1 too: d goes to drn-1, e to drn-3 (drn-2 is drained before it exists)
    create_slb(&client, &ns, "d", spec("drn", vec![tcp("web", None)])).await;
    assert_eq!(lb_of(&ready(&client, &ns, "d", 30).await), "drn-1");
    create_slb(&client, &ns, "e", spec("drn", vec![tcp("web", None)])).await;
    assert_eq!(lb_of(&ready(&client, &ns, "e", 30).await), "drn-3");
    // a may not grow on drn-0: refused with the reason, its port still served
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [tcp("web", None), tcp("admin", None)]}})),
    )
    .await
    .expect("grow a");
    let why = refused(&client, &ns, "a", "LoadBalancerDraining").await;
    assert!(why.contains("drains"), "{why}");
    assert_eq!(listeners_at(&a_ip), Some(1), "a's one port is still served");

    patch(json!(["drn-0", "other-1"])).await;
    eventually(
        30,
        "a name of another pool is the pool's condition",
        || async {
            let (reason, message) = pool_not_ready(&client, "drn").await;
            (reason == "InvalidDrain" && message.contains("other-1")).then_some(())
        },
    )
    .await;
    patch(json!(["drn-0"])).await;
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    eventually(
        30,
        "the emptied drained load balancer is deleted",
        || async { listeners_at(&a_ip).is_none().then_some(()) },
    )
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "drn").await;
    op.kill().await;
}

/// The drift audit (every 2 s here): a listener deleted and another planted behind the operator's back, and a
/// load balancer whose address changed, are each found by one audit and mended — the listener made again, the
/// stray removed, the new address in the statuses — counted on /metrics, told in an Event, and the pool's InSync
/// condition says what was mended.
#[tokio::test]
async fn the_drift_audit_mends_a_deleted_listener_a_planted_one_and_a_new_address() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let metrics_port = free_port();
    let settings = sharedlb::Settings {
        cluster_id: "e2e".into(),
        audit_interval: std::time::Duration::from_secs(2),
        metrics_addr: Some(([127, 0, 0, 1], metrics_port).into()),
        ..sharedlb::Settings::default()
    };
    let op = Operator::start_with(&client, &cloud, settings);
    let ns = namespace(&client, "e2e-audit", &[]).await;
    create_pool(&client, "aud", json!({"provider": {"memory": {}}})).await;
    create_slb(
        &client,
        &ns,
        "a",
        spec("aud", vec![tcp("web", None), tcp("api", None)]),
    )
    .await;
    let a = ready(&client, &ns, "a", 30).await;
    let uid = a.uid().unwrap_or_default();
    let (lb, (ip, listeners)) = cloud_pool(&cloud, "aud")
        .into_iter()
        .next()
        .expect("one load balancer");
    assert_eq!(listeners.len(), 2);
    use sharedlb_providers::Protocol::Tcp;
    cloud.drop_listener(&lb, 10001, Tcp);
    cloud.plant_listener(&lb, 10050, Tcp, "someone-else");
    eventually(
        30,
        "the deleted listener is back and the planted one gone",
        || async {
            let (_, ls) = cloud_pool(&cloud, "aud").remove(&lb)?;
            let ports: BTreeSet<(u16, String)> = ls.into_iter().map(|(p, _, o)| (p, o)).collect();
            (ports == BTreeSet::from([(10000, uid.clone()), (10001, uid.clone())])).then_some(())
        },
    )
    .await;
    let count = |m: &std::collections::BTreeMap<String, f64>, kind: &str| {
        m.get(&format!(
            "sharedlb_drift_repairs_total{{pool=\"aud\",kind=\"{kind}\"}}"
        ))
        .copied()
    };
    eventually(30, "both repairs counted", || async {
        let m = sharedlb_e2e::replica::scrape(metrics_port).await?;
        (count(&m, "missing_listener") == Some(1.0) && count(&m, "stray_listener") == Some(1.0))
            .then_some(())
    })
    .await;
    event_recorded(&client, "kube-system", "aud", "DriftRepaired", 30).await;
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    eventually(30, "InSync says what the audit mended", || async {
        let st = pools.get("aud").await.ok()?.status?;
        let c = st.conditions.iter().find(|c| c.type_ == "InSync")?;
        (c.status == "True" && c.reason == "Repaired" && c.message.contains("stray")).then_some(())
    })
    .await;

    // the load balancer gets another address: the status shows it after one audit
    let moved: std::net::Ipv4Addr = "203.0.113.77".parse().expect("ip");
    assert_ne!(ip, moved.to_string());
    cloud.set_address(&lb, moved);
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    eventually(30, "a's status shows the new address", || async {
        let now = api.get("a").await.ok()?;
        endpoints(&now)
            .iter()
            .all(|(at, _)| *at == moved.to_string())
            .then_some(())
    })
    .await;
    let m = sharedlb_e2e::replica::scrape(metrics_port)
        .await
        .expect("metrics");
    assert_eq!(count(&m, "address_changed"), Some(1.0));

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "aud").await;
    op.kill().await;
}

/// Warm spares: in a pool whose load balancers take 3 s to make, `warmLoadBalancers: 1` keeps one made ahead. A
/// SharedLB that needs a new load balancer lands on it (made before the SharedLB was), Ready sooner than its twin
/// in a pool without a spare, which waits the 3 s; the next spare is then made, and once the pool empties, one
/// spare is all that stays.
#[tokio::test]
async fn a_warm_spare_takes_a_shared_lb_that_needs_a_new_load_balancer_at_once() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-warm", &[]).await;
    let slow = json!({"memory": {"provisioningMs": 3000}});
    create_pool(
        &client,
        "warm",
        json!({"provider": slow, "capacity": {"maxPortsPerLoadBalancer": 1, "warmLoadBalancers": 1}}),
    )
    .await;
    create_pool(
        &client,
        "cold",
        json!({"provider": slow, "capacity": {"maxPortsPerLoadBalancer": 1}}),
    )
    .await;
    eventually(30, "the spare is made", || async {
        (cloud_pool(&cloud, "warm").len() == 1).then_some(())
    })
    .await;
    let lb_of = |s: &SharedLB| {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .map(|l| l.name.clone())
            .unwrap_or_default()
    };
    let started = std::time::Instant::now();
    create_slb(&client, &ns, "a", spec("warm", vec![tcp("web", None)])).await;
    let a = ready(&client, &ns, "a", 30).await;
    let on_spare = started.elapsed();
    assert_eq!(lb_of(&a), "warm-0", "a is on the spare made before it");
    eventually(30, "the next spare is made", || async {
        (cloud_pool(&cloud, "warm").len() == 2).then_some(())
    })
    .await;
    let started = std::time::Instant::now();
    create_slb(&client, &ns, "b", spec("cold", vec![tcp("web", None)])).await;
    ready(&client, &ns, "b", 30).await;
    let made_for_it = started.elapsed();
    eprintln!(
        "Ready on a warm spare: {on_spare:?}; with a load balancer made for it: {made_for_it:?}"
    );
    assert!(
        made_for_it >= std::time::Duration::from_secs(3),
        "{made_for_it:?}"
    );
    assert!(on_spare < made_for_it, "{on_spare:?} vs {made_for_it:?}");

    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    api.delete("a", &DeleteParams::default())
        .await
        .expect("delete a");
    eventually(
        30,
        "one spare stays of the two empty load balancers",
        || async { (cloud_pool(&cloud, "warm").len() == 1).then_some(()) },
    )
    .await;
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "warm").await;
    delete_pool(&client, "cold").await;
    op.kill().await;
}

/// Make-before-break moves. `a` allows moves (grace 8 s) and asks for a second port on a full load balancer: it
/// moves to a new one with the port number it had, the status shows the new place only once it serves (load
/// balancers take 1.5 s to make here) and keeps the old one as `previous`, an Event says so, and both load balancers serve it until the grace is over — across a restart of
/// the operator — when the old listener goes. `b`, which does not allow moves, stays. Draining `a`'s new load
/// balancer moves it off again.
#[tokio::test]
async fn a_shared_lb_that_allows_moves_moves_make_before_break() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let cloud = MemoryCloud::new();
    let op = Operator::start(&client, &cloud);
    let ns = namespace(&client, "e2e-move", &[]).await;
    // load balancers take 1.5 s to make: long enough to see the status wait for the new listeners
    create_pool(
        &client,
        "mig",
        json!({"provider": {"memory": {"provisioningMs": 1500}}, "capacity": {"maxPortsPerLoadBalancer": 2}}),
    )
    .await;
    let movable = |ports: Vec<serde_json::Value>| {
        let mut s = spec("mig", ports);
        s["migration"] = json!({"allowed": true, "gracePeriodSeconds": 8});
        s
    };
    create_slb(&client, &ns, "a", movable(vec![tcp("web", None)])).await;
    let a = ready(&client, &ns, "a", 30).await;
    create_slb(&client, &ns, "b", spec("mig", vec![tcp("web", None)])).await;
    ready(&client, &ns, "b", 30).await;
    let a_uid = a.uid().unwrap_or_default();
    let api: Api<SharedLB> = Api::namespaced(client.clone(), &ns);
    let lb_of = |s: &SharedLB| {
        let st = s.status.clone().unwrap_or_default();
        let now = st.load_balancer.map(|l| l.name).unwrap_or_default();
        let before = st.previous.map(|p| p.load_balancer.name);
        (now, before)
    };
    assert_eq!(lb_of(&a), ("mig-0".to_string(), None));
    // a's listeners by load balancer name (the memory cloud's names carry the pool's index last)
    let a_ports_on = |index: &str| {
        let mut ports: Vec<u16> = cloud_pool(&cloud, "mig")
            .into_iter()
            .filter(|(name, _)| name.ends_with(&format!("-{index}")))
            .flat_map(|(_, (_, ls))| ls)
            .filter(|(_, _, owner)| *owner == a_uid)
            .map(|(p, _, _)| p)
            .collect();
        ports.sort();
        ports
    };

    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [tcp("web", None), tcp("admin", None)]}})),
    )
    .await
    .expect("grow a");
    let moved = eventually(30, "a moved to mig-1 and is Ready there", || async {
        let s = api.get("a").await.ok()?;
        // make-before-break: the status never names the new place before it serves
        if lb_of(&s).0 == "mig-1" {
            assert_eq!(
                a_ports_on("1"),
                [10000, 10001],
                "the status showed mig-1 before it served"
            );
        }
        let ready = condition(&s, "Ready")?.0 == "True";
        (ready && lb_of(&s) == ("mig-1".to_string(), Some("mig-0".to_string()))).then_some(s)
    })
    .await;
    let web = |s: &SharedLB| {
        let st = s.status.clone().unwrap_or_default();
        st.ports.iter().find(|p| p.name == "web").map(|p| p.port)
    };
    assert_eq!(
        web(&moved),
        web(&a),
        "the port number stays; only the address changes"
    );
    assert_eq!(
        a_ports_on("1"),
        [10000, 10001],
        "the new place serves both ports"
    );
    assert_eq!(
        a_ports_on("0"),
        [10000],
        "the old place still serves during the grace"
    );
    event_recorded(&client, &ns, "a", "Moved", 10).await;
    assert_eq!(
        lb_of(&api.get("b").await.expect("b")).0,
        "mig-0",
        "b does not move"
    );

    // a restart during the grace holds the old place again from the status: its rebuild (a moment after the
    // start) finds the old listener accounted for, not a stray
    op.kill().await;
    let op = Operator::start(&client, &cloud);
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert_eq!(
        a_ports_on("0"),
        [10000],
        "the old place serves after a restart"
    );
    eventually(30, "after the grace the old listener is gone", || async {
        let s = api.get("a").await.ok()?;
        (a_ports_on("0").is_empty() && lb_of(&s).1.is_none()).then_some(())
    })
    .await;
    assert_eq!(
        cloud_pool(&cloud, "mig").len(),
        2,
        "b's load balancer stays"
    );

    // drain a's load balancer: it moves off (to a new one: b's has one port free, a needs two)
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    pools
        .patch(
            "mig",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"drain": ["mig-1"]}})),
        )
        .await
        .expect("drain mig-1");
    eventually(30, "a moved off the drained load balancer", || async {
        let s = api.get("a").await.ok()?;
        (lb_of(&s) == ("mig-2".to_string(), Some("mig-1".to_string()))).then_some(())
    })
    .await;
    eventually(
        30,
        "the drained load balancer is emptied and deleted after the grace",
        || async {
            (cloud_pool(&cloud, "mig").len() == 2 && a_ports_on("1").is_empty()).then_some(())
        },
    )
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, "mig").await;
    op.kill().await;
}
