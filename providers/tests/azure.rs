//! The azure provider driven through Microsoft's real `azure_core` pipeline and `azure_identity` client-secret
//! credential against the project's Azure Network FAKE (`sharedlb-fakes::azure`, HTTPS on loopback with a CA made
//! per test): no Azure Network emulator exists. The fake keeps the semantics that matter (ETags and 412, async
//! operations, 404/429, reference checks and limits), not Azure's whole behaviour.
#![cfg(feature = "azure")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use sharedlb_fakes::azure::{AzureFake, CLIENT_SECRET, security_rule_sources};
use sharedlb_providers::azure::{
    AzureAuth, AzurePool, AzureProvider, credential, transport_trusting,
};
use sharedlb_providers::conformance::listener_spec as spec;
use sharedlb_providers::{
    ListenerSpec, LoadBalancerKey, LoadBalancerProvider, NodeTarget, Protocol, ProviderError,
    cloud_name_prefix,
};

const NET: &str = "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network";

fn nsg_id() -> String {
    format!("{NET}/networkSecurityGroups/nodes-nsg")
}

/// The fake with the cluster's virtual network and node NSG (two rules of someone else's, one at priority 500).
async fn fake() -> AzureFake {
    let fake = AzureFake::start().await;
    fake.plant_cluster_network(
        NET,
        "vnet",
        "nodes-nsg",
        json!([
            {"name": "ssh", "properties": {"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "22",
             "sourceAddressPrefix": "10.0.0.0/8", "destinationAddressPrefix": "*", "access": "Allow",
             "priority": 100, "direction": "Inbound"}},
            {"name": "aks-svc", "properties": {"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "443",
             "sourceAddressPrefix": "Internet", "destinationAddressPrefix": "*", "access": "Allow",
             "priority": 500, "direction": "Inbound"}}]),
    );
    fake
}

/// A service principal with this secret, whose Entra ID is the fake.
fn secret_auth(fake: &AzureFake, secret: &str) -> AzureAuth {
    AzureAuth::ClientSecret {
        tenant_id: "tenant".into(),
        client_id: "sharedlb".into(),
        secret: secret.into(),
        authority_host: Some(fake.endpoint()),
    }
}

fn settings(fake: &AzureFake) -> AzurePool {
    let transport = transport_trusting(fake.ca_pem().as_bytes()).expect("transport");
    let auth = secret_auth(fake, CLIENT_SECRET);
    AzurePool {
        subscription_id: "sub".into(),
        resource_group: "rg".into(),
        location: "westeurope".into(),
        load_balancer_name: None,
        network_security_group: "nodes-nsg".into(),
        network_security_group_resource_group: None,
        virtual_network: "vnet".into(),
        node_groups: 1,
        target_nodes_per_zone: None,
        pod_targets: false,
        endpoint: Some(fake.endpoint()),
        credential: credential(&auth, Some(transport.clone())).expect("credential"),
        transport: Some(transport),
        batch_window: Duration::from_millis(30),
        min_poll: Duration::from_millis(5),
    }
}

async fn provider(fake: &AzureFake, pool: &str) -> AzureProvider {
    AzureProvider::new("c1", pool, settings(fake))
        .await
        .expect("provider")
}

fn key(pool: &str, index: u32) -> LoadBalancerKey {
    LoadBalancerKey {
        cluster_id: "c1".into(),
        pool: pool.into(),
        index,
    }
}

/// Ensures every listener at once, each through the provider given with it; all must succeed.
async fn ensure_concurrently(jobs: Vec<(Arc<AzureProvider>, LoadBalancerKey, ListenerSpec)>) {
    let tasks: Vec<_> = jobs
        .into_iter()
        .map(|(p, k, l)| tokio::spawn(async move { p.ensure_listener(&k, &l).await }))
        .collect();
    for t in tasks {
        t.await.expect("task").expect("ensure");
    }
}

/// (port, protocol, node port, owner) as the inventory reports a listener.
type Listener = (u16, Protocol, u16, String);

fn lb(fake: &AzureFake) -> Value {
    let lbs = fake.resources("loadBalancers");
    assert_eq!(lbs.len(), 1, "one Azure load balancer per pool: {lbs:?}");
    lbs[0].clone()
}

/// (frontend, frontend port, protocol, backend port, probe) of every rule.
fn rules(lb: &Value) -> BTreeSet<(String, u64, String, u64, String)> {
    let last = |v: &Value| {
        v.as_str()
            .unwrap_or_default()
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string()
    };
    lb["properties"]["loadBalancingRules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let p = &r["properties"];
            (
                last(&p["frontendIPConfiguration"]["id"]),
                p["frontendPort"].as_u64().unwrap_or_default(),
                p["protocol"].as_str().unwrap_or_default().to_string(),
                p["backendPort"].as_u64().unwrap_or_default(),
                last(&p["probe"]["id"]),
            )
        })
        .collect()
}

/// (protocol, ports, sources, priority) of every sharedlb rule of the NSG.
fn nsg_rules(fake: &AzureFake) -> BTreeSet<(String, Vec<String>, Vec<String>, u64)> {
    let nsg = fake.get(&nsg_id()).expect("nsg");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    nsg["properties"]["securityRules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with("slb-")))
        .map(|r| {
            let p = &r["properties"];
            (
                p["protocol"].as_str().unwrap_or_default().to_string(),
                strings(&p["destinationPortRanges"]),
                security_rule_sources(p),
                p["priority"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn foreign_rules_intact(fake: &AzureFake) {
    let nsg = fake.get(&nsg_id()).expect("nsg");
    let names: BTreeSet<&str> = nsg["properties"]["securityRules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["name"].as_str())
        .filter(|n| !n.starts_with("slb-"))
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["aks-svc", "ssh"]),
        "others' NSG rules are kept"
    );
}

#[tokio::test]
async fn azure_provider_is_conformant_on_the_fake() {
    let fake = fake().await;
    let s = settings(&fake);
    sharedlb_providers::conformance::run(|pool| {
        let s = s.clone();
        async move {
            Arc::new(
                AzureProvider::new("conformance", &pool, s)
                    .await
                    .expect("provider"),
            ) as Arc<dyn LoadBalancerProvider>
        }
    })
    .await;
    assert!(
        fake.resources("loadBalancers").is_empty(),
        "no load balancer left"
    );
    assert!(
        fake.resources("publicIPAddresses").is_empty(),
        "no public IP left"
    );
    assert!(nsg_rules(&fake).is_empty(), "no NSG rule left");
    foreign_rules_intact(&fake);
}

/// Frontends with their own IPs, a rule per port/protocol to the node port with the right probe, one NSG rule per
/// SharedLB and protocol with exactly its node ports and sources, backends from Azure nodes only; calls per new
/// port; nothing written when nothing changes; removal and deletion leave nothing.
#[tokio::test]
async fn frontends_rules_probes_and_nsg_rules_are_exactly_what_the_ports_need() {
    let fake = fake().await;
    let p = provider(&fake, "web").await;
    let vm = |n: &str| {
        format!(
            "azure:///subscriptions/sub/resourceGroups/mc/providers/Microsoft.Compute/virtualMachines/{n}"
        )
    };
    p.update_nodes(&[
        NodeTarget {
            name: "n1".into(),
            provider_id: Some(vm("n1")),
            internal_ip: Some("10.224.0.4".into()),
            zone: None,
        },
        NodeTarget {
            name: "kind".into(),
            provider_id: Some("kind://docker/x".into()),
            internal_ip: Some("172.18.0.2".into()),
            zone: None,
        },
    ])
    .await
    .expect("nodes before the load balancer exists");
    assert!(
        fake.resources("loadBalancers").is_empty(),
        "nodes alone make nothing"
    );

    let a = p.ensure_load_balancer(&key("web", 0)).await.expect("lb 0");
    let b = p.ensure_load_balancer(&key("web", 1)).await.expect("lb 1");
    assert_ne!(
        a.ip, b.ip,
        "each load balancer of the pool has its own public IP"
    );
    assert!(a.id.ends_with("/frontendIPConfigurations/fe-0"), "{}", a.id);

    p.ensure_listener(&key("web", 0), &spec(53, Protocol::Tcp, 30053, "dns", &[]))
        .await
        .expect("dns tcp");
    p.ensure_listener(&key("web", 0), &spec(53, Protocol::Udp, 30053, "dns", &[]))
        .await
        .expect("dns udp");
    p.ensure_listener(
        &key("web", 1),
        &spec(80, Protocol::Tcp, 30080, "web", &["198.51.100.0/24"]),
    )
    .await
    .expect("web");

    let doc = lb(&fake);
    assert_eq!(
        rules(&doc),
        BTreeSet::from([
            ("fe-0".into(), 53, "Tcp".into(), 30053, "probe-30053".into()),
            (
                "fe-0".into(),
                53,
                "Udp".into(),
                30053,
                "probe-kube-proxy".into()
            ),
            ("fe-1".into(), 80, "Tcp".into(), 30080, "probe-30080".into()),
        ])
    );
    let probes: BTreeSet<(String, String, u64)> = doc["properties"]["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or_default().to_string(),
                p["properties"]["protocol"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                p["properties"]["port"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        probes,
        BTreeSet::from([
            ("probe-30053".into(), "Tcp".into(), 30053),
            ("probe-30080".into(), "Tcp".into(), 30080),
            ("probe-kube-proxy".into(), "Http".into(), 10256),
        ])
    );
    let backends =
        &doc["properties"]["backendAddressPools"][0]["properties"]["loadBalancerBackendAddresses"];
    assert_eq!(
        backends.as_array().map(Vec::len),
        Some(1),
        "only the Azure node: {backends}"
    );
    assert_eq!(backends[0]["properties"]["ipAddress"], "10.224.0.4");
    assert_eq!(
        fake.count("PUT", "/backendaddresspools/nodes", Some(200)),
        1,
        "the addresses are written through the backend pool, once"
    );
    assert_eq!(doc["tags"]["sharedlb.dev/pool"], "web");

    let open = vec!["Internet".to_string()];
    let nsg = nsg_rules(&fake);
    let priorities: BTreeSet<u64> = nsg.iter().map(|r| r.3).collect();
    assert_eq!(priorities.len(), 3, "priorities never collide: {nsg:?}");
    assert!(!priorities.contains(&500), "500 is someone else's");
    let shape: BTreeSet<_> = nsg
        .into_iter()
        .map(|(pr, ports, src, _)| (pr, ports, src))
        .collect();
    assert_eq!(
        shape,
        BTreeSet::from([
            ("Tcp".into(), vec!["30053".into()], open.clone()),
            ("Udp".into(), vec!["30053".into()], open.clone()),
            (
                "Tcp".into(),
                vec!["30080".into()],
                vec!["198.51.100.0/24".into()]
            ),
        ])
    );
    foreign_rules_intact(&fake);

    // calls for one more port, and none written for a port that is already there
    let before = p.api_calls();
    p.ensure_listener(
        &key("web", 1),
        &spec(8080, Protocol::Tcp, 30081, "web", &["198.51.100.0/24"]),
    )
    .await
    .expect("web 8080");
    let after = p.api_calls();
    let diff = |m: bool| -> u64 {
        after
            .iter()
            .filter(|c| c.mutating == m)
            .map(|c| c.calls)
            .sum::<u64>()
            - before
                .iter()
                .filter(|c| c.mutating == m)
                .map(|c| c.calls)
                .sum::<u64>()
    };
    println!(
        "azure: a new port costs {} mutating and {} other calls",
        diff(true),
        diff(false)
    );
    assert_eq!(diff(true), 2, "one load balancer PUT and one NSG PUT");
    let nsg_web = nsg_rules(&fake)
        .into_iter()
        .find(|r| r.0 == "Tcp" && r.2[0] == "198.51.100.0/24")
        .expect("web rule");
    assert_eq!(
        nsg_web.1,
        vec!["30080".to_string(), "30081".to_string()],
        "one NSG rule for the SharedLB's ports"
    );
    let writes = p.document_writes();
    p.ensure_listener(
        &key("web", 1),
        &spec(8080, Protocol::Tcp, 30081, "web", &["198.51.100.0/24"]),
    )
    .await
    .expect("again");
    p.ensure_load_balancer(&key("web", 1)).await.expect("again");
    assert_eq!(
        p.document_writes(),
        writes,
        "nothing is written when nothing changes"
    );

    // a moved node port converges; a foreign owner cannot remove
    p.ensure_listener(
        &key("web", 1),
        &spec(8080, Protocol::Tcp, 30082, "web", &["198.51.100.0/24"]),
    )
    .await
    .expect("moved");
    p.remove_listener(&key("web", 1), 8080, Protocol::Tcp, "intruder")
        .await
        .expect("not theirs");
    assert!(rules(&lb(&fake)).contains(&(
        "fe-1".into(),
        8080,
        "Tcp".into(),
        30082,
        "probe-30082".into()
    )));
    assert!(
        !rules(&lb(&fake)).iter().any(|r| r.3 == 30081),
        "the old node port is gone"
    );
    p.remove_listener(&key("web", 1), 8080, Protocol::Tcp, "web")
        .await
        .expect("removed");
    let nsg_web = nsg_rules(&fake)
        .into_iter()
        .find(|r| r.0 == "Tcp" && r.2[0] == "198.51.100.0/24")
        .expect("web rule");
    assert_eq!(
        nsg_web.1,
        vec!["30080".to_string()],
        "the NSG rule shrinks with the ports"
    );
    let udp_priority = nsg_rules(&fake)
        .iter()
        .find(|r| r.0 == "Udp")
        .map(|r| r.3)
        .expect("dns's UDP rule");
    p.remove_listener(&key("web", 0), 53, Protocol::Udp, "dns")
        .await
        .expect("dns udp");
    assert!(
        !nsg_rules(&fake).iter().any(|r| r.0 == "Udp"),
        "the UDP NSG rule goes with the last UDP port"
    );
    // the freed priority is the lowest free one: the next SharedLB's rule takes it
    p.ensure_listener(
        &key("web", 0),
        &spec(7000, Protocol::Tcp, 30070, "next", &[]),
    )
    .await
    .expect("next");
    assert!(
        nsg_rules(&fake)
            .iter()
            .any(|r| r.1 == vec!["30070".to_string()] && r.3 == udp_priority),
        "priority {udp_priority} reclaimed: {:?}",
        nsg_rules(&fake)
    );
    p.remove_listener(&key("web", 0), 7000, Protocol::Tcp, "next")
        .await
        .expect("next removed");
    let probes = lb(&fake)["properties"]["probes"].to_string();
    assert!(
        !probes.contains("probe-kube-proxy"),
        "unused probes go: {probes}"
    );

    let inv = p.inventory().await.expect("inventory");
    let got: Vec<(u32, Vec<Listener>)> = inv
        .load_balancers
        .iter()
        .map(|l| {
            (
                l.index,
                l.listeners
                    .iter()
                    .map(|x| (x.port, x.protocol, x.node_port, x.owner_uid.clone()))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, vec![(53, Protocol::Tcp, 30053, "dns".into())]),
            (1, vec![(80, Protocol::Tcp, 30080, "web".into())]),
        ]
    );

    // an NSG rule left behind by a crash between the load balancer write and the NSG write
    let mut nsg = fake.get(&nsg_id()).expect("nsg");
    let prefix = cloud_name_prefix("c1", "web");
    nsg["properties"]["securityRules"]
        .as_array_mut()
        .expect("rules")
        .push(json!({"name": format!("{prefix}gone-uid-tcp"), "properties": {"protocol": "Tcp",
            "sourcePortRange": "*", "destinationPortRanges": ["31999"], "sourceAddressPrefix": "Internet",
            "destinationAddressPrefix": "*", "access": "Allow", "priority": 4000, "direction": "Inbound"}}));
    fake.plant(&nsg_id(), nsg);
    p.delete_load_balancer(&key("web", 0))
        .await
        .expect("delete 0");
    assert!(
        !nsg_rules(&fake)
            .iter()
            .any(|r| r.1 == vec!["31999".to_string()]),
        "an orphaned NSG rule goes when a load balancer of its pool goes"
    );
    assert_eq!(fake.resources("publicIPAddresses").len(), 1);
    assert!(
        !nsg_rules(&fake)
            .iter()
            .any(|r| r.1 == vec!["30053".to_string()]),
        "dns's NSG rule went with its load balancer"
    );
    p.delete_load_balancer(&key("web", 1))
        .await
        .expect("delete 1");
    assert!(
        fake.resources("loadBalancers").is_empty(),
        "the last frontend takes the load balancer"
    );
    assert!(fake.resources("publicIPAddresses").is_empty());
    assert!(nsg_rules(&fake).is_empty());
    foreign_rules_intact(&fake);
}

/// The NSG opens a listener's node port to exactly its `sourceRanges` (the `Internet` tag, alone in the single
/// field as Azure requires, when there are none; the probes' `AzureLoadBalancer` is the NSG's default rule's), and
/// follows them as they widen,
/// narrow and go: after every change the sources that may reach the node port are exactly those plus an NSG rule
/// of someone else's for the same port, which is never touched. Ensuring an unchanged listener writes nothing;
/// removing the listener leaves only the other rule.
#[tokio::test]
async fn a_changed_source_range_leaves_exactly_the_new_rules() {
    let fake = fake().await;
    let theirs = json!({"protocol": "Tcp", "sourcePortRange": "*", "destinationPortRange": "31100",
        "sourceAddressPrefix": "192.0.2.0/24", "destinationAddressPrefix": "*", "access": "Allow",
        "priority": 200, "direction": "Inbound"});
    let mut nsg = fake.get(&nsg_id()).expect("nsg");
    nsg["properties"]["securityRules"]
        .as_array_mut()
        .expect("rules")
        .push(json!({"name": "their-31100", "properties": theirs}));
    fake.plant(&nsg_id(), nsg);
    let p = provider(&fake, "ranges").await;
    p.ensure_load_balancer(&key("ranges", 0)).await.expect("lb");
    let strings = |v: &Value| -> Vec<String> {
        match v {
            Value::String(s) => vec![s.clone()],
            v => v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect(),
        }
    };
    // a rule lets TCP reach node port 31100: inbound, allowed, Tcp (or any), on that port (or a range holding it)
    let opens_31100 = |r: &Value| {
        let p = &r["properties"];
        let port_in = |x: &str| {
            let (a, b) = x.split_once('-').unwrap_or((x, x));
            let (a, b) = (a.parse::<u16>(), b.parse::<u16>());
            x == "*" || (a.is_ok_and(|a| a <= 31100) && b.is_ok_and(|b| b >= 31100))
        };
        p["direction"] == "Inbound"
            && p["access"] == "Allow"
            && matches!(p["protocol"].as_str(), Some("Tcp" | "*"))
            && strings(&p["destinationPortRange"])
                .into_iter()
                .chain(strings(&p["destinationPortRanges"]))
                .any(|x| port_in(&x))
    };
    let rules_of = || -> Vec<Value> {
        fake.get(&nsg_id()).expect("nsg")["properties"]["securityRules"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    // every source any NSG rule lets reach TCP 31100, sorted, duplicates kept
    let sources = || {
        let mut s: Vec<String> = rules_of()
            .iter()
            .filter(|r| opens_31100(r))
            .flat_map(|r| {
                let p = &r["properties"];
                strings(&p["sourceAddressPrefix"])
                    .into_iter()
                    .chain(strings(&p["sourceAddressPrefixes"]))
            })
            .collect();
        s.sort();
        s
    };
    let their_rule = || {
        rules_of()
            .into_iter()
            .find(|r| r["name"] == "their-31100")
            .map(|r| r["properties"].clone())
    };
    let others = || -> BTreeSet<String> {
        rules_of()
            .iter()
            .filter_map(|r| r["name"].as_str())
            .filter(|n| !n.starts_with("slb-"))
            .map(str::to_string)
            .collect()
    };
    let writes = || -> Vec<(String, u64)> {
        p.api_calls()
            .into_iter()
            .filter(|c| c.mutating)
            .map(|c| (c.operation, c.calls))
            .collect()
    };
    let listener = |ranges: &[&str]| spec(4100, Protocol::Tcp, 31100, "o1", ranges);
    let steps: [(&[&str], &[&str]); 5] = [
        (&[], &["192.0.2.0/24", "Internet"]),
        (&["198.51.100.0/24"], &["192.0.2.0/24", "198.51.100.0/24"]),
        (
            &["198.51.100.0/24", "203.0.113.0/24"],
            &["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"],
        ),
        (&["203.0.113.0/24"], &["192.0.2.0/24", "203.0.113.0/24"]),
        (&[], &["192.0.2.0/24", "Internet"]),
    ];
    for (ranges, expected) in steps {
        p.ensure_listener(&key("ranges", 0), &listener(ranges))
            .await
            .expect("listener");
        assert_eq!(sources(), expected, "sourceRanges {ranges:?}");
        assert_eq!(
            nsg_rules(&fake).len(),
            1,
            "one sharedlb rule: {:?}",
            nsg_rules(&fake)
        );
        assert_eq!(
            their_rule(),
            Some(theirs.clone()),
            "their rule is untouched"
        );
        // and again, unchanged: nothing is written
        let (before, docs) = (writes(), p.document_writes());
        p.ensure_listener(&key("ranges", 0), &listener(ranges))
            .await
            .expect("listener again");
        assert_eq!(writes(), before, "nothing to write for {ranges:?}");
        assert_eq!(p.document_writes(), docs, "no document PUT for {ranges:?}");
        assert_eq!(sources(), expected, "still, for {ranges:?}");
    }
    p.remove_listener(&key("ranges", 0), 4100, Protocol::Tcp, "o1")
        .await
        .expect("remove");
    assert_eq!(sources(), ["192.0.2.0/24"], "only their rule stays");
    assert!(nsg_rules(&fake).is_empty(), "{:?}", nsg_rules(&fake));
    assert_eq!(
        their_rule(),
        Some(theirs.clone()),
        "their rule is untouched"
    );
    assert_eq!(
        others(),
        BTreeSet::from(["aks-svc".into(), "ssh".into(), "their-31100".into()]),
        "others' NSG rules are kept"
    );
    p.delete_load_balancer(&key("ranges", 0))
        .await
        .expect("delete");
    assert_eq!(their_rule(), Some(theirs), "their rule is still untouched");
    assert_eq!(others().len(), 3, "{:?}", others());
}

/// A burst of changes is carried by a few PUTs of the load balancer and of the NSG, not one each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_100_ports_lands_in_a_few_puts() {
    let fake = fake().await;
    let p = Arc::new(provider(&fake, "burst").await);
    p.ensure_load_balancer(&key("burst", 0)).await.expect("lb");
    let lb_puts = fake.count("PUT", "/loadbalancers/", None);
    let nsg_puts = fake.count("PUT", "/networksecuritygroups/", None);
    let started = std::time::Instant::now();
    ensure_concurrently(
        (0..100u16)
            .map(|i| {
                let l = spec(1000 + i, Protocol::Tcp, 30000 + i, &format!("o{i}"), &[]);
                (p.clone(), key("burst", 0), l)
            })
            .collect(),
    )
    .await;
    let lb_puts = fake.count("PUT", "/loadbalancers/", None) - lb_puts;
    let nsg_puts = fake.count("PUT", "/networksecuritygroups/", None) - nsg_puts;
    println!(
        "azure: 100 ports in {lb_puts} load balancer PUTs and {nsg_puts} NSG PUTs, {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(rules(&lb(&fake)).len(), 100, "every port has its rule");
    assert_eq!(
        nsg_rules(&fake).len(),
        100,
        "every SharedLB has its NSG rule"
    );
    assert!(lb_puts <= 5, "{lb_puts} load balancer PUTs for 100 ports");
    assert!(nsg_puts <= 5, "{nsg_puts} NSG PUTs for 100 ports");
}

/// Two writers (two operator replicas during a hand-over, or one replica and a person) edit the same documents
/// at once, and someone changes the load balancer between a read and a write: every change survives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_etag_conflicts_lose_nothing() {
    let fake = fake().await;
    let a = Arc::new(provider(&fake, "race").await);
    let b = Arc::new(provider(&fake, "race").await);
    a.ensure_load_balancer(&key("race", 0)).await.expect("lb");
    fake.touch_after_next_get("/loadbalancers/");
    fake.touch_after_next_get("/networksecuritygroups/");
    ensure_concurrently(
        (0..40u16)
            .map(|i| {
                let p = if i % 2 == 0 { a.clone() } else { b.clone() };
                let l = spec(2000 + i, Protocol::Udp, 31000 + i, &format!("r{i}"), &[]);
                (p, key("race", 0), l)
            })
            .collect(),
    )
    .await;
    let conflicts = fake.count("PUT", "/", Some(412));
    println!("azure: {conflicts} ETag conflicts resolved");
    assert!(
        conflicts >= 1,
        "the touched documents were written with a stale ETag at least once"
    );
    let doc = lb(&fake);
    assert_eq!(rules(&doc).len(), 40, "no rule lost");
    assert_eq!(
        doc["tags"]["touched"], "1",
        "the other writer's change was kept"
    );
    let nsg = fake.get(&nsg_id()).expect("nsg");
    assert_eq!(nsg["tags"]["touched"], "1");
    assert_eq!(nsg_rules(&fake).len(), 40, "no NSG rule lost");
    let priorities: BTreeSet<u64> = nsg_rules(&fake).iter().map(|r| r.3).collect();
    assert_eq!(priorities.len(), 40, "no two writers took one priority");
}

/// Throttling is waited out as Azure asks; errors keep their meaning and Azure's message; nothing half-made.
#[tokio::test]
async fn throttling_errors_and_bad_settings_are_errors_by_meaning() {
    let fake = fake().await;
    let p = provider(&fake, "err").await;
    p.ensure_load_balancer(&key("err", 0)).await.expect("lb");

    // 429 with Retry-After: 1 is retried by the pipeline after a second
    fake.fail_next("PUT", "/loadbalancers/", 429, "RetryableError", Some(1));
    p.ensure_listener(&key("err", 0), &spec(80, Protocol::Tcp, 30080, "o", &[]))
        .await
        .expect("after throttling");
    let puts: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/loadbalancers/"))
        .collect();
    let n = puts.len();
    assert_eq!(puts[n - 2].status, 429);
    assert!(
        puts[n - 1].at.duration_since(puts[n - 2].at) >= Duration::from_millis(950),
        "Retry-After was honoured"
    );

    // a conflict with an operation in progress is an error to retry, not a refusal
    fake.fail_next(
        "PUT",
        "/loadbalancers/",
        409,
        "AnotherOperationInProgress",
        None,
    );
    let e = p
        .ensure_listener(&key("err", 0), &spec(83, Protocol::Tcp, 30083, "o", &[]))
        .await
        .expect_err("conflict");
    assert!(
        matches!(e, ProviderError::Other(ref m) if m.contains("AnotherOperationInProgress")),
        "{e:?}"
    );
    assert!(e.retry_after().is_some(), "retried");
    p.ensure_listener(&key("err", 0), &spec(83, Protocol::Tcp, 30083, "o", &[]))
        .await
        .expect("the retry succeeds");
    p.remove_listener(&key("err", 0), 83, Protocol::Tcp, "o")
        .await
        .expect("removed");

    // a limit Azure reports is a quota error with Azure's words; the document is unchanged
    fake.fail_next(
        "PUT",
        "/loadbalancers/",
        400,
        "LoadBalancingRulesPerLoadBalancerLimitReached",
        None,
    );
    let e = p
        .ensure_listener(&key("err", 0), &spec(81, Protocol::Tcp, 30081, "o", &[]))
        .await
        .expect_err("limit");
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
    assert!(
        e.to_string()
            .contains("LoadBalancingRulesPerLoadBalancerLimitReached"),
        "{e}"
    );
    assert_eq!(rules(&lb(&fake)).len(), 1);

    // a listener on a load balancer or frontend that was never ensured is refused, not half made
    let fresh = provider(&fake, "never").await;
    let e = fresh
        .ensure_listener(&key("never", 0), &spec(80, Protocol::Tcp, 30099, "o", &[]))
        .await
        .expect_err("no load balancer");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e:?}");
    assert!(
        !nsg_rules(&fake)
            .iter()
            .any(|r| r.1 == vec!["30099".to_string()]),
        "no NSG rule for a refused listener"
    );
    let e = p
        .ensure_listener(&key("err", 5), &spec(82, Protocol::Tcp, 30082, "o", &[]))
        .await
        .expect_err("no frontend");
    assert!(matches!(e, ProviderError::NotFound(_)), "{e:?}");

    // deleting what is gone (404 or 204) is success
    fake.fail_next(
        "DELETE",
        "/publicipaddresses/",
        404,
        "ResourceNotFound",
        None,
    );
    p.delete_load_balancer(&key("err", 3))
        .await
        .expect("404 on delete is success");

    // a public IP of the same name that is not ours is never taken
    fake.plant(
        &format!(
            "{NET}/publicIPAddresses/{}ip-7",
            cloud_name_prefix("c1", "err")
        ),
        json!({"location": "westeurope", "tags": {"owner": "someone"}, "properties": {"ipAddress": "20.0.0.7"}}),
    );
    let e = p
        .ensure_load_balancer(&key("err", 7))
        .await
        .expect_err("collision");
    assert!(matches!(e, ProviderError::AlreadyExists(_)), "{e:?}");

    // settings that point at nothing, and a wrong secret, are invalid configuration with Azure's words
    let mut bad = settings(&fake);
    bad.network_security_group = "missing-nsg".into();
    let e = AzureProvider::new("c1", "x", bad)
        .await
        .expect_err("missing nsg");
    assert!(
        matches!(e, ProviderError::InvalidConfig(ref m) if m.contains("missing-nsg")),
        "{e:?}"
    );
    let mut bad = settings(&fake);
    bad.virtual_network = "nope".into();
    let e = AzureProvider::new("c1", "x", bad)
        .await
        .expect_err("missing vnet");
    assert!(matches!(e, ProviderError::InvalidConfig(_)), "{e:?}");
    let mut bad = settings(&fake);
    bad.credential =
        credential(&secret_auth(&fake, "wrong"), bad.transport.clone()).expect("credential");
    let e = AzureProvider::new("c1", "x", bad)
        .await
        .expect_err("wrong secret");
    assert!(
        matches!(e, ProviderError::InvalidConfig(ref m) if m.contains("AADSTS7000215")),
        "{e:?}"
    );
    // a client that does not trust the fake's CA does not talk to it
    let mut bad = settings(&fake);
    bad.transport = None;
    bad.credential = credential(&secret_auth(&fake, CLIENT_SECRET), None).expect("credential");
    assert!(
        AzureProvider::new("c1", "x", bad).await.is_err(),
        "an untrusted certificate is refused"
    );

    p.delete_load_balancer(&key("err", 0))
        .await
        .expect("delete");
    assert!(fake.resources("loadBalancers").is_empty());
    assert!(nsg_rules(&fake).is_empty());
}

/// (name, IPs) of each backend pool of the pool's load balancer.
fn backend_pools(fake: &AzureFake) -> BTreeMap<String, BTreeSet<String>> {
    lb(fake)["properties"]["backendAddressPools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let ips = b["properties"]["loadBalancerBackendAddresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["properties"]["ipAddress"].as_str().map(str::to_string))
                .collect();
            (b["name"].as_str().unwrap_or_default().to_string(), ips)
        })
        .collect()
}

/// Two node groups: each frontend's rules reach only its group's few nodes per zone, so the pool holds 600
/// ports while no NIC is behind more than Azure's 300 rules (the fake counts per address, and refuses the
/// 301st on a group); a new node changes only its own group's pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_groups_hold_600_ports_and_no_nic_is_behind_more_than_300_rules() {
    let fake = fake().await;
    let p = Arc::new(
        AzureProvider::new(
            "c1",
            "groups",
            AzurePool {
                node_groups: 2,
                target_nodes_per_zone: Some(2),
                ..settings(&fake)
            },
        )
        .await
        .expect("provider"),
    );
    let limits = p.limits();
    assert_eq!(
        (limits.max_ports_per_lb, limits.max_ports_total),
        (300, Some(600))
    );
    assert_eq!(
        limits.lb_groups,
        Some(sharedlb_providers::LbGroups {
            count: 2,
            max_ports: 300
        })
    );
    let vm = |i: u32| NodeTarget {
        name: format!("vm{i}"),
        provider_id: Some(format!(
            "azure:///subscriptions/sub/resourceGroups/mc/providers/Microsoft.Compute/virtualMachines/vm{i}"
        )),
        internal_ip: Some(format!("10.224.0.{}", 10 + i)),
        zone: Some(format!("westeurope-{}", 1 + i % 2)),
    };
    let mut nodes: Vec<NodeTarget> = (0..16).map(vm).collect();
    p.update_nodes(&nodes).await.expect("nodes");
    let mut jobs = Vec::new();
    for index in 0..2u32 {
        p.ensure_load_balancer(&key("groups", index))
            .await
            .expect("frontend");
        for i in 0..300u16 {
            let owner = format!("o{index}-{i}");
            let l = spec(1000 + i, Protocol::Tcp, 30000 + i, &owner, &[]);
            jobs.push((p.clone(), key("groups", index), l));
        }
    }
    ensure_concurrently(jobs).await;
    assert_eq!(rules(&lb(&fake)).len(), 600);
    let pools = backend_pools(&fake);
    let (g0, g1) = (&pools["nodes"], &pools["nodes-1"]);
    assert_eq!(
        (g0.len(), g1.len()),
        (4, 4),
        "two nodes of each zone per group: {pools:?}"
    );
    assert!(g0.is_disjoint(g1), "the groups share no node: {pools:?}");
    let to_pool: BTreeSet<(String, String)> = lb(&fake)["properties"]["loadBalancingRules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let fe = r["properties"]["frontendIPConfiguration"]["id"]
                .as_str()
                .and_then(|id| id.rsplit('/').next())
                .unwrap_or_default();
            let pool = r["properties"]["backendAddressPool"]["id"]
                .as_str()
                .and_then(|id| id.rsplit('/').next())
                .unwrap_or_default();
            (fe.to_string(), pool.to_string())
        })
        .collect();
    assert_eq!(
        to_pool,
        BTreeSet::from([
            ("fe-0".to_string(), "nodes".to_string()),
            ("fe-1".to_string(), "nodes-1".to_string())
        ])
    );
    // Azure's limit is real in the fake: a 301st rule on group 0's nodes is refused
    let over = p
        .ensure_listener(
            &key("groups", 2),
            &spec(1000, Protocol::Tcp, 30999, "over", &[]),
        )
        .await;
    assert!(over.is_err(), "no frontend 2 yet: {over:?}");
    p.ensure_load_balancer(&key("groups", 2))
        .await
        .expect("frontend 2, group 0");
    let over = p
        .ensure_listener(
            &key("groups", 2),
            &spec(1000, Protocol::Tcp, 30999, "over", &[]),
        )
        .await
        .expect_err("a 301st rule reaching group 0's nodes");
    assert!(
        over.to_string()
            .contains("LoadBalancingRulesPerNicIpConfigurationLimitReached"),
        "{over}"
    );

    // a node joins: at most its own group's pool is written
    let pool_puts = fake.count("PUT", "/backendaddresspools/", None);
    nodes.push(vm(16));
    p.update_nodes(&nodes).await.expect("a node joins");
    let after = backend_pools(&fake);
    assert!(fake.count("PUT", "/backendaddresspools/", None) - pool_puts <= 1);
    let changed = ["nodes", "nodes-1"]
        .iter()
        .filter(|g| after[**g] != pools[**g])
        .count();
    assert!(changed <= 1, "{pools:?} -> {after:?}");
}

/// `targets: Pods`: each rule sends to a pool of its own holding the ready pods on their port (a TCP probe on
/// it; none for UDP), the NSG opens the pods' port, the pool follows the endpoints in one write, pods on mixed
/// ports are refused by meaning, and a removed port takes its pool with it. No node pool is written.
#[tokio::test]
async fn pod_targets_send_each_port_to_a_pool_of_its_pods() {
    let fake = fake().await;
    let p = AzureProvider::new(
        "c1",
        "pods",
        AzurePool {
            pod_targets: true,
            ..settings(&fake)
        },
    )
    .await
    .expect("provider");
    assert!(p.forwards_to_endpoints() && !p.needs_node_ports());
    assert_eq!(p.limits().lb_groups, None);
    let addrs = |a: &[&str]| -> Vec<std::net::SocketAddr> {
        a.iter().map(|s| s.parse().expect("address")).collect()
    };
    p.ensure_load_balancer(&key("pods", 0)).await.expect("lb");
    let mut web = spec(80, Protocol::Tcp, 30080, "web", &[]);
    web.backends = addrs(&["10.244.1.5:8080", "10.244.2.7:8080"]);
    let mut dns = spec(53, Protocol::Udp, 30053, "dns", &[]);
    dns.backends = addrs(&["10.244.1.5:5353"]);
    p.ensure_listener(&key("pods", 0), &web).await.expect("web");
    p.ensure_listener(&key("pods", 0), &dns).await.expect("dns");
    assert_eq!(
        rules(&lb(&fake)),
        BTreeSet::from([
            ("fe-0".into(), 53, "Udp".into(), 5353, String::new()),
            ("fe-0".into(), 80, "Tcp".into(), 8080, "probe-8080".into()),
        ])
    );
    let ips = |a: &[&str]| -> BTreeSet<String> { a.iter().map(|s| s.to_string()).collect() };
    let pools = backend_pools(&fake);
    assert_eq!(pools["pods-0-80-t"], ips(&["10.244.1.5", "10.244.2.7"]));
    assert_eq!(pools["pods-0-53-u"], ips(&["10.244.1.5"]));
    assert!(
        pools["nodes"].is_empty(),
        "no node is written in: {pools:?}"
    );
    let opened: BTreeSet<Vec<String>> = nsg_rules(&fake).into_iter().map(|r| r.1).collect();
    assert_eq!(
        opened,
        BTreeSet::from([vec!["5353".to_string()], vec!["8080".to_string()]])
    );

    let puts = fake.count("PUT", "/loadbalancers/", None);
    web.backends = addrs(&["10.244.2.7:8080", "10.244.3.9:8080"]);
    p.ensure_listener(&key("pods", 0), &web)
        .await
        .expect("moved pods");
    assert_eq!(
        backend_pools(&fake)["pods-0-80-t"],
        ips(&["10.244.2.7", "10.244.3.9"])
    );
    assert_eq!(fake.count("PUT", "/loadbalancers/", None) - puts, 1);

    web.backends = addrs(&["10.244.2.7:8080", "10.244.3.9:9090"]);
    let mixed = p
        .ensure_listener(&key("pods", 0), &web)
        .await
        .expect_err("pods on two ports");
    assert_eq!(mixed.reason(), "CloudInvalidConfig", "{mixed}");

    p.remove_listener(&key("pods", 0), 80, Protocol::Tcp, "web")
        .await
        .expect("removed");
    let pools = backend_pools(&fake);
    assert!(!pools.contains_key("pods-0-80-t"), "{pools:?}");
    assert!(pools.contains_key("pods-0-53-u"), "{pools:?}");
    p.delete_load_balancer(&key("pods", 0))
        .await
        .expect("deleted");
    assert!(fake.resources("loadBalancers").is_empty());
}
