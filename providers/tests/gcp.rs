//! The gcp provider driven through Google's real `google-cloud-compute-v1` client against the project's Compute
//! Engine FAKE (`sharedlb-fakes`, loopback only): there is no Compute Engine emulator. The fake keeps the
//! semantics that matter (operations, 404/409/quota, one forwarding rule per IP + port + protocol, nothing in
//! use deleted), not Google's whole behaviour.
#![cfg(feature = "gcp")]

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sharedlb_fakes::gcp::GcpFake;
use sharedlb_providers::conformance::listener_spec;
use sharedlb_providers::gcp::{GcpPool, GcpProvider, instance_path};
use sharedlb_providers::{
    ListenerSpec, LoadBalancerKey, LoadBalancerProvider, NodeTarget, PortMode, Protocol,
    ProviderError,
};

fn pool(fake: &GcpFake) -> GcpPool {
    GcpPool {
        project: "proj".into(),
        region: "europe-west1".into(),
        network: String::new(),
        node_tag: "gke-nodes".into(),
        endpoint: Some(fake.endpoint()),
        anonymous: true,
        poll_delay: Some(Duration::from_millis(5)),
        target_nodes_per_zone: Some(sharedlb_providers::DEFAULT_TARGET_NODES_PER_ZONE),
    }
}

fn key(pool: &str, index: u32) -> LoadBalancerKey {
    LoadBalancerKey {
        cluster_id: "c1".into(),
        pool: pool.into(),
        index,
    }
}

/// Passthrough: the node port is the external port.
fn spec(port: u16, protocol: Protocol, owner: &str, ranges: &[&str]) -> ListenerSpec {
    listener_spec(port, protocol, port, owner, ranges)
}

fn names(v: &[Value]) -> Vec<String> {
    let mut n: Vec<String> = v
        .iter()
        .filter_map(|x| x["name"].as_str().map(str::to_string))
        .collect();
    n.sort();
    n
}

#[tokio::test]
async fn gcp_provider_is_conformant_on_the_fake() {
    let fake = GcpFake::start().await;
    let settings = pool(&fake);
    sharedlb_providers::conformance::run(|pool| {
        let settings = settings.clone();
        async move {
            Arc::new(
                GcpProvider::new("conformance", &pool, settings)
                    .await
                    .expect("provider"),
            ) as Arc<dyn LoadBalancerProvider>
        }
    })
    .await;
    assert!(fake.resources("forwardingRules").is_empty());
    assert!(fake.resources("addresses").is_empty());
    assert!(fake.resources("targetPools").is_empty());
    assert!(
        fake.resources("firewalls").is_empty(),
        "{:?}",
        names(&fake.resources("firewalls"))
    );
    assert!(fake.resources("httpHealthChecks").is_empty());
}

/// An IP, a target pool of the nodes with kube-proxy's health check, one forwarding rule per port and protocol
/// on that IP (external port = node port), one firewall rule per SharedLB with exactly its ports from exactly its
/// sources; nodes followed with one call per target pool; delete leaves nothing.
#[tokio::test]
async fn ips_rules_target_pools_and_firewalls_are_exactly_what_the_ports_need() {
    let fake = GcpFake::start().await;
    let p = GcpProvider::new("c1", "web", pool(&fake))
        .await
        .expect("provider");
    assert_eq!(
        p.limits().port_mode,
        PortMode::PoolWide,
        "passthrough: the port is the node port"
    );
    assert_eq!(
        instance_path("gce://proj/europe-west1-b/node-1").as_deref(),
        Some("projects/proj/zones/europe-west1-b/instances/node-1")
    );
    p.update_nodes(&[node("n1", "gce://proj/europe-west1-b/node-1")])
        .await
        .expect("nodes");
    let info = p.ensure_load_balancer(&key("web", 0)).await.expect("lb");
    let ip = info.ip.clone().expect("an external IP");
    assert_eq!(
        p.ensure_load_balancer(&key("web", 0)).await.expect("again"),
        info
    );

    p.ensure_listener(&key("web", 0), &spec(30053, Protocol::Tcp, "dns", &[]))
        .await
        .expect("tcp");
    p.ensure_listener(&key("web", 0), &spec(30053, Protocol::Udp, "dns", &[]))
        .await
        .expect("udp");
    let mutating_before: u64 = p
        .api_calls()
        .iter()
        .filter(|c| c.mutating)
        .map(|c| c.calls)
        .sum();
    let before = fake.requests().len();
    p.ensure_listener(
        &key("web", 0),
        &spec(30080, Protocol::Tcp, "web", &["198.51.100.0/24"]),
    )
    .await
    .expect("web");
    let made: Vec<(String, String)> = fake.requests()[before..].to_vec();
    let mutating = made.iter().filter(|(m, _)| m != "GET").count();
    eprintln!(
        "calls for a new port: {} requests, {mutating} mutating (the rest reads and operation polls): {made:?}",
        made.len()
    );
    assert_eq!(
        mutating, 2,
        "a firewall rule and a forwarding rule: {made:?}"
    );
    // the provider's own count (sharedlb_cloud_api_calls) agrees with what the fake saw
    let counted: u64 = p
        .api_calls()
        .iter()
        .filter(|c| c.mutating)
        .map(|c| c.calls)
        .sum();
    assert_eq!(counted - mutating_before, 2, "{:?}", p.api_calls());
    let before = fake.requests().len();
    p.ensure_listener(
        &key("web", 0),
        &spec(30080, Protocol::Tcp, "web", &["198.51.100.0/24"]),
    )
    .await
    .expect("again");
    let again = &fake.requests()[before..];
    assert!(
        again.iter().all(|(m, _)| m == "GET"),
        "a steady-state ensure changes nothing: {again:?}"
    );
    let rules = fake.resources("forwardingRules");
    let mut shape: Vec<(String, String, String)> = rules
        .iter()
        .map(|r| {
            (
                r["IPAddress"].as_str().unwrap_or_default().to_string(),
                r["IPProtocol"].as_str().unwrap_or_default().to_string(),
                r["portRange"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    shape.sort();
    assert_eq!(
        shape,
        vec![
            (ip.clone(), "TCP".to_string(), "30053-30053".to_string()),
            (ip.clone(), "TCP".to_string(), "30080-30080".to_string()),
            (ip.clone(), "UDP".to_string(), "30053-30053".to_string()),
        ],
        "one rule per port and protocol, all on the pool's IP"
    );
    let pools = fake.resources("targetPools");
    assert_eq!(pools.len(), 1);
    assert!(
        rules.iter().all(|r| r["target"] == pools[0]["selfLink"]),
        "every rule forwards to the IP's target pool"
    );
    assert_eq!(pools[0]["instances"].as_array().map(Vec::len), Some(1));
    let hc = fake.resources("httpHealthChecks");
    assert_eq!(
        (hc[0]["port"].as_i64(), hc[0]["requestPath"].as_str()),
        (Some(10256), Some("/healthz"))
    );

    // firewall: one rule per SharedLB, exactly its ports, from exactly its sources, to the nodes' tag
    let fw = fake.resources("firewalls");
    let rule_of = |owner: &str| {
        fw.iter()
            .find(|f| {
                f["name"]
                    .as_str()
                    .is_some_and(|n| n.ends_with(&format!("fw-{owner}")))
            })
            .cloned()
            .unwrap_or_else(|| panic!("a firewall rule for {owner}: {:?}", names(&fw)))
    };
    let dns = rule_of("dns");
    let mut allowed: Vec<(String, Vec<String>)> = dns["allowed"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            (
                a["IPProtocol"].as_str().unwrap_or_default().to_string(),
                a["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(str::to_string))
                    .collect(),
            )
        })
        .collect();
    allowed.sort();
    assert_eq!(
        allowed,
        vec![
            ("tcp".to_string(), vec!["30053".to_string()]),
            ("udp".to_string(), vec!["30053".to_string()])
        ],
        "never the whole NodePort range"
    );
    assert_eq!(dns["sourceRanges"], serde_json::json!(["0.0.0.0/0"]));
    assert_eq!(dns["targetTags"], serde_json::json!(["gke-nodes"]));
    assert_eq!(
        rule_of("web")["sourceRanges"],
        serde_json::json!(["198.51.100.0/24"])
    );
    let health = fw
        .iter()
        .find(|f| f["name"].as_str().is_some_and(|n| n.ends_with("-hc")))
        .expect("the health-check rule");
    assert_eq!(
        health["sourceRanges"],
        serde_json::json!(["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"])
    );

    // another owner's port is not removed by someone else; the owner's removal narrows its firewall rule
    p.remove_listener(&key("web", 0), 30053, Protocol::Udp, "web")
        .await
        .expect("noop");
    assert_eq!(fake.resources("forwardingRules").len(), 3);
    p.remove_listener(&key("web", 0), 30053, Protocol::Udp, "dns")
        .await
        .expect("remove udp");
    let dns = fake
        .resources("firewalls")
        .into_iter()
        .find(|f| f["name"].as_str().is_some_and(|n| n.ends_with("fw-dns")))
        .expect("still there for tcp");
    assert_eq!(dns["allowed"].as_array().map(Vec::len), Some(1));
    assert_eq!(dns["allowed"][0]["IPProtocol"], "tcp");

    // nodes: one call per target pool and direction
    let before = fake.requests().len();
    p.update_nodes(&[
        node("n2", "gce://proj/europe-west1-c/node-2"),
        node("n3", "gce://proj/europe-west1-d/node-3"),
    ])
    .await
    .expect("nodes changed");
    let calls: Vec<(String, String)> = fake.requests()[before..]
        .iter()
        .filter(|(m, path)| m == "POST" && !path.contains("/operations/"))
        .cloned()
        .collect();
    assert_eq!(
        calls.len(),
        2,
        "one addInstance and one removeInstance: {calls:?}"
    );
    let instances: Vec<String> = fake.resources("targetPools")[0]["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str())
        .map(|i| i.rsplit('/').next().unwrap_or_default().to_string())
        .collect();
    assert_eq!(instances, vec!["node-2", "node-3"]);

    p.remove_listener(&key("web", 0), 30053, Protocol::Tcp, "dns")
        .await
        .expect("dns");
    p.delete_load_balancer(&key("web", 0))
        .await
        .expect("delete");
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
            names(&fake.resources(kind))
        );
    }
}

/// The firewall opens a listener's port to exactly its `sourceRanges` (all of IPv4 when there are none), and
/// follows them as they widen, narrow and go: after every change the sources that may reach the node port are
/// exactly the desired ones plus a firewall rule of someone else's for the same port, which is never touched.
/// No health-check source is added to the port: target pools are health-checked on kube-proxy's 10256, which
/// the pool's own `-hc` rule opens to Google's checkers alone. Ensuring an unchanged listener writes nothing;
/// removing the listener leaves only the other rule.
#[tokio::test]
async fn a_changed_source_range_leaves_exactly_the_new_rules() {
    let fake = GcpFake::start().await;
    let p = GcpProvider::new("c1", "ranges", pool(&fake))
        .await
        .expect("provider");
    p.ensure_load_balancer(&key("ranges", 0)).await.expect("lb");
    let theirs = serde_json::json!({
        "name": "their-31100",
        "network": "global/networks/default",
        "direction": "INGRESS",
        "allowed": [{"IPProtocol": "tcp", "ports": ["31100"]}],
        "sourceRanges": ["192.0.2.0/24"],
        "targetTags": ["gke-nodes"],
    });
    fake.plant("projects/proj/global/firewalls", theirs.clone());
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    // a rule opens tcp:31100 on the nodes: ingress, to their tag (or all instances), tcp (or all) on that port
    // (or all ports)
    let opens_31100 = |f: &Value| {
        let port_in = |x: &str| {
            let (a, b) = x.split_once('-').unwrap_or((x, x));
            let (a, b) = (a.parse::<u16>(), b.parse::<u16>());
            a.is_ok_and(|a| a <= 31100) && b.is_ok_and(|b| b >= 31100)
        };
        f["direction"].as_str().unwrap_or("INGRESS") == "INGRESS"
            && f["disabled"].as_bool() != Some(true)
            && {
                let tags = strings(&f["targetTags"]);
                tags.is_empty() || tags.iter().any(|t| t == "gke-nodes")
            }
            && f["allowed"].as_array().into_iter().flatten().any(|a| {
                matches!(a["IPProtocol"].as_str(), Some("tcp" | "all")) && {
                    let ports = strings(&a["ports"]);
                    ports.is_empty() || ports.iter().any(|p| port_in(p))
                }
            })
    };
    // every source any firewall rule lets reach tcp:31100, sorted, duplicates kept
    let sources = || {
        let mut s: Vec<String> = fake
            .resources("firewalls")
            .iter()
            .filter(|f| opens_31100(f))
            .flat_map(|f| strings(&f["sourceRanges"]))
            .collect();
        s.sort();
        s
    };
    let their_rule = || {
        fake.resources("firewalls")
            .into_iter()
            .find(|f| f["name"] == "their-31100")
    };
    let health_rule = || {
        fake.resources("firewalls")
            .into_iter()
            .find(|f| f["name"].as_str() == Some(&format!("{}hc", p.name_prefix())))
    };
    let health = health_rule().expect("the pool's health-check rule");
    assert_eq!(
        strings(&health["sourceRanges"]),
        sharedlb_providers::gcp::HEALTH_CHECK_RANGES,
        "Google's checkers reach kube-proxy"
    );
    assert!(!opens_31100(&health), "and nothing else: {health}");
    let writes = || -> Vec<(String, u64)> {
        p.api_calls()
            .into_iter()
            .filter(|c| c.mutating)
            .map(|c| (c.operation, c.calls))
            .collect()
    };
    let listener = |ranges: &[&str]| spec(31100, Protocol::Tcp, "o1", ranges);
    let steps: [(&[&str], &[&str]); 5] = [
        (&[], &["0.0.0.0/0", "192.0.2.0/24"]),
        (&["198.51.100.0/24"], &["192.0.2.0/24", "198.51.100.0/24"]),
        (
            &["198.51.100.0/24", "203.0.113.0/24"],
            &["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"],
        ),
        (&["203.0.113.0/24"], &["192.0.2.0/24", "203.0.113.0/24"]),
        (&[], &["0.0.0.0/0", "192.0.2.0/24"]),
    ];
    for (ranges, expected) in steps {
        p.ensure_listener(&key("ranges", 0), &listener(ranges))
            .await
            .expect("listener");
        assert_eq!(sources(), expected, "sourceRanges {ranges:?}");
        assert_eq!(
            their_rule(),
            Some(theirs.clone()),
            "their rule is untouched"
        );
        // and again, unchanged: nothing is written, by the provider's count or by the fake's
        let (before, seen) = (writes(), fake.requests().len());
        p.ensure_listener(&key("ranges", 0), &listener(ranges))
            .await
            .expect("listener again");
        assert_eq!(writes(), before, "nothing to write for {ranges:?}");
        let again = &fake.requests()[seen..];
        assert!(
            again.iter().all(|(m, _)| m == "GET"),
            "only reads for {ranges:?}: {again:?}"
        );
        assert_eq!(sources(), expected, "still, for {ranges:?}");
    }
    p.remove_listener(&key("ranges", 0), 31100, Protocol::Tcp, "o1")
        .await
        .expect("remove");
    assert_eq!(sources(), ["192.0.2.0/24"], "only their rule stays");
    assert_eq!(
        their_rule(),
        Some(theirs.clone()),
        "their rule is untouched"
    );
    assert_eq!(
        health_rule(),
        Some(health),
        "the health-check rule is the pool's, untouched"
    );
    p.delete_load_balancer(&key("ranges", 0))
        .await
        .expect("delete");
    assert_eq!(
        names(&fake.resources("firewalls")),
        ["their-31100"],
        "only their rule is left"
    );
}

/// Google's errors by meaning: a quota is a quota with Google's words; a name taken by someone else is not
/// adopted; the passthrough rule (one forwarding rule per IP + port + protocol) is enforced by the fake.
#[tokio::test]
async fn quota_foreign_names_and_bad_settings_are_errors_by_meaning() {
    let fake = GcpFake::start().await;
    let p = GcpProvider::new("c1", "q", pool(&fake))
        .await
        .expect("provider");
    fake.set_quota("addresses", 1);
    p.ensure_load_balancer(&key("q", 0))
        .await
        .expect("the first fits");
    let e = p
        .ensure_load_balancer(&key("q", 1))
        .await
        .expect_err("over quota");
    assert!(
        matches!(e, ProviderError::QuotaExceeded(ref m) if m.contains("Quota")),
        "{e:?}"
    );
    assert_eq!(
        fake.resources("targetPools").len(),
        1,
        "nothing half-made for the refused one"
    );

    let other = GcpProvider::new("c1", "other", pool(&fake))
        .await
        .expect("provider");
    fake.set_quota("addresses", 10);
    fake.plant(
        "projects/proj/regions/europe-west1/addresses",
        serde_json::json!({"name": format!("{}0", other.name_prefix()), "address": "192.0.2.9"}),
    );
    let e = other
        .ensure_load_balancer(&key("other", 0))
        .await
        .expect_err("not ours");
    assert!(matches!(e, ProviderError::AlreadyExists(_)), "{e:?}");

    let mut bad = pool(&fake);
    bad.node_tag = String::new();
    let e = GcpProvider::new("c1", "x", bad)
        .await
        .expect_err("no node tag");
    assert!(
        matches!(e, ProviderError::InvalidConfig(ref m) if m.contains("nodeTag")),
        "{e:?}"
    );
    let e = p
        .ensure_listener(
            &key("q", 0),
            &ListenerSpec {
                node_port: 31000,
                ..spec(30000, Protocol::Tcp, "a", &[])
            },
        )
        .await
        .expect_err("node port must equal the port");
    assert!(matches!(e, ProviderError::InvalidConfig(_)));

    // the fake keeps the passthrough rule: a second forwarding rule on the same IP, port and protocol is refused
    p.ensure_listener(&key("q", 0), &spec(30000, Protocol::Tcp, "a", &[]))
        .await
        .expect("the first rule");
    let ip = fake.resources("addresses")[0]["address"]
        .as_str()
        .expect("ip")
        .to_string();
    let client = google_cloud_compute_v1::client::ForwardingRules::builder()
        .with_endpoint(fake.endpoint())
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .expect("client");
    let clash = client
        .insert()
        .set_project("proj")
        .set_region("europe-west1")
        .set_body(
            google_cloud_compute_v1::model::ForwardingRule::new()
                .set_name("someone-else")
                .set_ip_address(ip)
                .set_ip_protocol(google_cloud_compute_v1::model::forwarding_rule::IPProtocol::Tcp)
                .set_port_range("29990-30010"),
        )
        .send()
        .await
        .expect_err("the IP, port and protocol are taken");
    assert_eq!(clash.http_status_code(), Some(400), "{clash}");
    assert!(clash.to_string().contains("in-use"), "{clash}");
    p.remove_listener(&key("q", 0), 30000, Protocol::Tcp, "a")
        .await
        .expect("remove");

    fake.fail_next("POST", 403, "forbidden");
    let e = p
        .ensure_listener(&key("q", 0), &spec(30001, Protocol::Tcp, "a", &[]))
        .await
        .expect_err("no permission");
    assert!(
        matches!(e, ProviderError::InvalidConfig(ref m) if m.contains("forbidden")),
        "{e:?}"
    );
    p.remove_listener(&key("q", 0), 30001, Protocol::Tcp, "a")
        .await
        .expect("nothing to remove");
    fake.fail_next("GET", 429, "rateLimitExceeded");
    let e = p.inventory().await.expect_err("throttled");
    assert!(matches!(e, ProviderError::Throttled { .. }), "{e:?}");
    p.delete_load_balancer(&key("q", 0)).await.expect("delete");
}

fn node(name: &str, provider_id: &str) -> NodeTarget {
    NodeTarget {
        name: name.into(),
        provider_id: Some(provider_id.into()),
        internal_ip: None,
        zone: None,
    }
}

/// The fake is held to Google's discovery document `compute.v1.json` (from `google-api-python-client`, fetched
/// by `scripts/test-env install`): every request the provider made through Google's client is a method the
/// document describes, with its HTTP verb, and every field of every resource the fake returned is a property of
/// that resource's schema. A fake that drifts from Compute Engine's API fails here.
#[tokio::test]
async fn the_fake_and_the_provider_speak_only_what_googles_discovery_document_describes() {
    let path = std::env::var("SHAREDLB_COMPUTE_DISCOVERY")
        .expect("compute.v1.json: run through scripts/test (scripts/test-env install fetches it)");
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
    // a whole life: load balancer, TCP and UDP, nodes, removal, deletion
    let fake = GcpFake::start().await;
    let p = GcpProvider::new("c1", "doc", pool(&fake))
        .await
        .expect("provider");
    p.update_nodes(&[node("n1", "gce://proj/europe-west1-b/node-1")])
        .await
        .expect("nodes");
    p.ensure_load_balancer(&key("doc", 0)).await.expect("lb");
    p.ensure_listener(
        &key("doc", 0),
        &spec(30100, Protocol::Tcp, "a", &["198.51.100.0/24"]),
    )
    .await
    .expect("tcp");
    p.ensure_listener(&key("doc", 0), &spec(30100, Protocol::Udp, "a", &[]))
        .await
        .expect("udp");
    p.update_nodes(&[node("n2", "gce://proj/europe-west1-c/node-2")])
        .await
        .expect("nodes");
    let mut returned: Vec<(&str, Value)> = Vec::new();
    for (kind, schema) in [
        ("addresses", "Address"),
        ("forwardingRules", "ForwardingRule"),
        ("targetPools", "TargetPool"),
        ("firewalls", "Firewall"),
        ("httpHealthChecks", "HttpHealthCheck"),
    ] {
        for r in fake.resources(kind) {
            returned.push((schema, r));
        }
    }
    p.inventory().await.expect("inventory");
    p.remove_listener(&key("doc", 0), 30100, Protocol::Udp, "a")
        .await
        .expect("remove");
    p.delete_load_balancer(&key("doc", 0))
        .await
        .expect("delete");

    let mut templates: Vec<(String, Vec<String>)> = Vec::new();
    for res in [
        "addresses",
        "forwardingRules",
        "targetPools",
        "firewalls",
        "httpHealthChecks",
        "regions",
        "regionOperations",
        "globalOperations",
    ] {
        for m in doc["resources"][res]["methods"]
            .as_object()
            .expect("methods")
            .values()
        {
            let flat = m["flatPath"].as_str().or(m["path"].as_str()).expect("path");
            templates.push((
                m["httpMethod"].as_str().expect("verb").to_string(),
                flat.split('/').map(str::to_string).collect(),
            ));
        }
    }
    let described = |verb: &str, path: &str| {
        let segs: Vec<&str> = path.split('/').collect();
        templates.iter().any(|(v, t)| {
            v == verb
                && t.len() == segs.len()
                && t.iter()
                    .zip(&segs)
                    .all(|(a, b)| (a.starts_with('{') && a.ends_with('}')) || a == b)
        })
    };
    let requests = fake.requests();
    assert!(
        requests.len() > 20,
        "a whole life makes many calls: {}",
        requests.len()
    );
    for (verb, path) in &requests {
        assert!(
            described(verb, path),
            "{verb} {path} is not a Compute Engine method"
        );
    }
    for (schema, r) in returned {
        let props = doc["schemas"][schema]["properties"]
            .as_object()
            .expect("schema");
        for k in r.as_object().expect("object").keys() {
            assert!(
                props.contains_key(k),
                "{schema}.{k} is not in Google's schema"
            );
        }
    }
}

/// The region's forwarding-rule quota, less the rules others hold, bounds the pool's ports (each is one rule),
/// read at each inventory; no quota listed, no bound.
#[tokio::test]
async fn the_regions_forwarding_rule_quota_bounds_the_pools_ports() {
    let fake = GcpFake::start().await;
    let p = GcpProvider::new("c1", "quota", pool(&fake))
        .await
        .expect("provider");
    p.inventory().await.expect("inventory");
    assert_eq!(p.limits().max_ports_total, None, "no quota listed");

    fake.set_quota("forwardingRules", 8);
    for i in 0..3 {
        fake.plant(
            "projects/proj/regions/europe-west1/forwardingRules",
            serde_json::json!({"name": format!("someone-elses-{i}"), "portRange": "80-80"}),
        );
    }
    p.ensure_load_balancer(&key("quota", 0))
        .await
        .expect("load balancer");
    for port in [30001, 30002] {
        p.ensure_listener(&key("quota", 0), &spec(port, Protocol::Tcp, "o", &[]))
            .await
            .expect("listener");
    }
    p.inventory().await.expect("inventory");
    // 8 in the region, 3 of them someone else's: 5 for the pool, its own 2 included
    assert_eq!(p.limits().max_ports_total, Some(5));
    assert!(
        fake.requests()
            .iter()
            .any(|(m, path)| m == "GET" && path == "projects/proj/regions/europe-west1"),
        "read from the region"
    );
}

/// Each target pool holds its own few nodes per zone; a node's arrival touches only the target pools it joins
/// (one addInstance each, and one removeInstance for the node it displaces), with every other target pool not even
/// read.
#[tokio::test]
async fn each_target_pool_holds_a_few_nodes_per_zone_and_churn_touches_only_its_own() {
    let fake = GcpFake::start().await;
    let mut settings = pool(&fake);
    settings.target_nodes_per_zone = Some(2);
    let p = GcpProvider::new("c1", "subsets", settings)
        .await
        .expect("provider");
    let mut nodes: Vec<NodeTarget> = (0..12)
        .map(|i| {
            node(
                &format!("n{i}"),
                &format!("gce://proj/europe-west1-{}/n{i}", ["b", "c"][i % 2]),
            )
        })
        .collect();
    p.update_nodes(&nodes).await.expect("nodes");
    for i in 0..8 {
        p.ensure_load_balancer(&key("subsets", i))
            .await
            .expect("lb");
    }
    let members = |fake: &GcpFake| -> Vec<Vec<String>> {
        let mut pools = fake.resources("targetPools");
        pools.sort_by_key(|t| t["name"].as_str().unwrap_or_default().to_string());
        pools
            .iter()
            .map(|t| {
                let mut i: Vec<String> = t["instances"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|u| u.as_str()?.rsplit('/').next().map(str::to_string))
                    .collect();
                i.sort();
                i
            })
            .collect()
    };
    let before = members(&fake);
    assert_eq!(before.len(), 8);
    assert!(
        before.iter().all(|m| m.len() == 4),
        "2 per zone, 2 zones: {before:?}"
    );
    let distinct: std::collections::BTreeSet<&Vec<String>> = before.iter().collect();
    assert!(
        distinct.len() > 1,
        "the subsets differ between target pools: {before:?}"
    );

    let calls = fake.requests().len();
    nodes.push(node("n12", "gce://proj/europe-west1-b/n12"));
    p.update_nodes(&nodes).await.expect("a node added");
    let after = members(&fake);
    let changed = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    let joined = after
        .iter()
        .filter(|m| m.contains(&"n12".to_string()))
        .count();
    assert!(
        joined > 0 && joined < 8,
        "n12 is among some subsets, not all: {after:?}"
    );
    assert_eq!(changed, joined, "only the target pools it joined changed");
    assert!(after.iter().all(|m| m.len() == 4), "{after:?}");
    let made: Vec<(String, String)> = fake.requests()[calls..]
        .iter()
        .filter(|(m, _)| m == "POST")
        .cloned()
        .collect();
    let adds = made
        .iter()
        .filter(|(_, p)| p.ends_with("/addInstance"))
        .count();
    let removes = made
        .iter()
        .filter(|(_, p)| p.ends_with("/removeInstance"))
        .count();
    assert_eq!((adds, removes), (joined, joined), "{made:?}");
    let reads = fake.requests()[calls..]
        .iter()
        .filter(|(m, p)| m == "GET" && p.contains("/targetPools/"))
        .count();
    assert_eq!(
        reads, joined,
        "target pools whose subset stayed are not read"
    );
}
