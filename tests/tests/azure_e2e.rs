//! The azure provider end to end: the real apiserver, the operator in-process, Microsoft's real `azure_core`
//! pipeline and `azure_identity` client-secret credential talking over HTTPS to the project's Azure Network FAKE
//! (`sharedlb-fakes::azure`; no emulator exists), Node objects with Azure provider IDs.
#![cfg(feature = "azure")]

use std::collections::BTreeSet;

use kube::Client;
use serde_json::{Value, json};
use sharedlb::{AzureAccess, BuiltinProviders, Settings};
use sharedlb_e2e::*;
use sharedlb_fakes::azure::{AzureFake, CLIENT_SECRET, security_rule_sources};
use sharedlb_providers::azure::AzureAuth;
use sharedlb_providers::cloud_name_prefix;
use sharedlb_providers::memory::MemoryCloud;

const NET: &str = "/subscriptions/sub/resourceGroups/mc-rg/providers/Microsoft.Network";

fn nsg_id() -> String {
    format!("{NET}/networkSecurityGroups/aks-nsg")
}

/// The fake with the cluster's virtual network and node NSG (one rule of AKS's own).
async fn azure_fake() -> AzureFake {
    let fake = AzureFake::start().await;
    fake.plant_cluster_network(
        NET,
        "aks-vnet",
        "aks-nsg",
        json!([{"name": "aks-kube-api", "properties": {"protocol": "Tcp", "sourcePortRange": "*",
             "destinationPortRange": "443", "sourceAddressPrefix": "*", "destinationAddressPrefix": "*",
             "access": "Allow", "priority": 500, "direction": "Inbound"}}]),
    );
    fake
}

async fn add_node(client: &Client, name: &str, ip: &str) {
    let id = format!(
        "azure:///subscriptions/sub/resourceGroups/mc-rg/providers/Microsoft.Compute/virtualMachines/{name}"
    );
    add_ready_node_at(client, name, &id, Some(ip)).await;
}

/// The operator in-process, its azure pools talking to `fake` with a service principal's secret.
fn operator_on(client: &Client, fake: &AzureFake) -> Operator {
    operator_with(client, fake, Settings::default().concurrency)
}

/// The same, reconciling up to `concurrency` SharedLBs at once.
fn operator_with(client: &Client, fake: &AzureFake, concurrency: u16) -> Operator {
    let access = AzureAccess {
        endpoint: Some(fake.endpoint()),
        extra_ca_pem: Some(fake.ca_pem().as_bytes().to_vec()),
        auth: Some(AzureAuth::ClientSecret {
            tenant_id: "tenant".into(),
            client_id: "sharedlb".into(),
            secret: CLIENT_SECRET.into(),
            authority_host: Some(fake.endpoint()),
        }),
    };
    Operator::start_with_providers(
        client,
        BuiltinProviders::new(MemoryCloud::new()).with_azure(access),
        Settings {
            cluster_id: "e2e".into(),
            concurrency,
            ..Settings::default()
        },
    )
}

/// An azure pool with a random name; `extra` adds to its spec, `azure` to its azure settings.
async fn azure_pool(client: &Client, azure: Value, extra: Value) -> String {
    let pool = format!("az-{}", fastrand::u32(..100_000));
    let mut settings = json!({"subscriptionId": "sub", "resourceGroup": "mc-rg", "location": "westeurope",
        "networkSecurityGroup": "aks-nsg", "virtualNetwork": "aks-vnet"});
    if let (Some(s), Some(e)) = (settings.as_object_mut(), azure.as_object()) {
        s.extend(e.clone());
    }
    let mut spec = json!({"provider": {"azure": settings}});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        s.extend(e.clone());
    }
    create_pool(client, &pool, spec).await;
    pool
}

fn status_port(s: &sharedlb_crds::SharedLB, name: &str) -> (i32, i32) {
    s.status
        .as_ref()
        .and_then(|st| st.ports.iter().find(|p| p.name == name))
        .map(|p| (p.port, p.node_port.unwrap_or_default()))
        .expect("port")
}

fn ip_of(s: &sharedlb_crds::SharedLB) -> String {
    s.status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|l| l.ip.clone())
        .expect("an IP")
}

/// (public IP address, frontend port, protocol, backend port) of every rule of the pool's load balancer.
fn rule_shape(fake: &AzureFake, pool: &str) -> BTreeSet<(String, u64, String, u64)> {
    let ips: Vec<Value> = fake.resources("publicIPAddresses");
    let address_of = |fe: &str, lb: &Value| -> String {
        let ip_id = lb["properties"]["frontendIPConfigurations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["id"].as_str().is_some_and(|i| i.eq_ignore_ascii_case(fe)))
            .and_then(|f| f["properties"]["publicIPAddress"]["id"].as_str())
            .unwrap_or_default()
            .to_lowercase();
        ips.iter()
            .find(|ip| ip["id"].as_str().is_some_and(|i| i.to_lowercase() == ip_id))
            .and_then(|ip| ip["properties"]["ipAddress"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    fake.resources("loadBalancers")
        .iter()
        .filter(|lb| lb["tags"]["sharedlb.dev/pool"] == pool)
        .flat_map(|lb| {
            lb["properties"]["loadBalancingRules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|r| {
                    let p = &r["properties"];
                    (
                        address_of(
                            p["frontendIPConfiguration"]["id"]
                                .as_str()
                                .unwrap_or_default(),
                            lb,
                        ),
                        p["frontendPort"].as_u64().unwrap_or_default(),
                        p["protocol"].as_str().unwrap_or_default().to_string(),
                        p["backendPort"].as_u64().unwrap_or_default(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// (protocol, node ports, sources) of the pool's NSG rules.
fn nsg_shape(fake: &AzureFake, pool: &str) -> BTreeSet<(String, Vec<String>, Vec<String>)> {
    let prefix = cloud_name_prefix("e2e", pool);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    };
    fake.get(&nsg_id()).expect("nsg")["properties"]["securityRules"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with(&prefix)))
        .map(|r| {
            let p = &r["properties"];
            (
                p["protocol"].as_str().unwrap_or_default().to_string(),
                strings(&p["destinationPortRanges"]),
                security_rule_sources(p),
            )
        })
        .collect()
}

fn nothing_left(fake: &AzureFake, pool: &str) {
    for kind in ["loadBalancers", "publicIPAddresses"] {
        let left: Vec<Value> = fake
            .resources(kind)
            .into_iter()
            .filter(|r| r["tags"]["sharedlb.dev/pool"] == pool)
            .collect();
        assert!(left.is_empty(), "{kind} left: {left:?}");
    }
    assert!(
        nsg_shape(fake, pool).is_empty(),
        "{:?}",
        nsg_shape(fake, pool)
    );
    let nsg = fake.get(&nsg_id()).expect("nsg");
    assert_eq!(
        nsg["properties"]["securityRules"][0]["name"], "aks-kube-api",
        "AKS's own rule is kept"
    );
}

/// TCP, UDP and both on one port: a frontend with its own public IP per load balancer of the pool, one rule per
/// port and protocol to the Service's node port, one NSG rule per SharedLB and protocol with exactly its node
/// ports and sources; a capacity of 2 ports opens a second frontend; nodes follow; deleting leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_udp_sharedlbs_get_frontends_rules_and_nsg_rules_and_leave_nothing() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = azure_fake().await;
    add_node(&client, "az-n1", "10.224.0.4").await;
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "azure", &[]).await;
    let pool = azure_pool(
        &client,
        json!({}),
        json!({"capacity": {"maxPortsPerLoadBalancer": 2}}),
    )
    .await;
    create_slb(
        &client,
        &ns,
        "dns",
        json!({"pool": pool, "selector": {"app": "dns"}, "ports": [
        {"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"},
        {"name": "dns-udp", "port": 53, "targetPort": 5353, "protocol": "UDP"}]}),
    )
    .await;
    create_slb(
        &client,
        &ns,
        "web",
        json!({"pool": pool, "selector": {"app": "web"},
        "sourceRanges": ["198.51.100.0/24"], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    )
    .await;
    let dns = ready(&client, &ns, "dns", 120).await;
    let web = ready(&client, &ns, "web", 120).await;
    let (dns_ip, web_ip) = (ip_of(&dns), ip_of(&web));
    assert_ne!(
        dns_ip, web_ip,
        "2 ports per frontend: dns fills one, web opens a second"
    );
    let (dns_np, web_np) = (status_port(&dns, "dns-tcp").1, status_port(&web, "http").1);
    assert_eq!(
        status_port(&dns, "dns-udp").1,
        dns_np,
        "TCP and UDP of one port share a node port"
    );
    let np = |p: i32| u64::try_from(p).unwrap_or_default();
    assert_eq!(
        rule_shape(&fake, &pool),
        BTreeSet::from([
            (dns_ip.clone(), 53, "Tcp".into(), np(dns_np)),
            (dns_ip.clone(), 53, "Udp".into(), np(dns_np)),
            (web_ip.clone(), 80, "Tcp".into(), np(web_np)),
        ]),
        "exactly one rule per port and protocol, frontend port = the SharedLB's, backend port = its node port"
    );
    let open = vec!["Internet".to_string()];
    assert_eq!(
        nsg_shape(&fake, &pool),
        BTreeSet::from([
            ("Tcp".into(), vec![dns_np.to_string()], open.clone()),
            ("Udp".into(), vec![dns_np.to_string()], open.clone()),
            (
                "Tcp".into(),
                vec![web_np.to_string()],
                vec!["198.51.100.0/24".into()]
            ),
        ]),
        "exactly each SharedLB's node ports, never the NodePort range"
    );

    // a new node joins the backend pool: one document write, whatever the number of ports
    let lb_puts = fake.count("PUT", "/loadbalancers/", None);
    add_node(&client, "az-n2", "10.224.0.5").await;
    eventually(60, "both nodes in the backend pool", || async {
        let lbs = fake.resources("loadBalancers");
        let addrs = lbs.first()?["properties"]["backendAddressPools"][0]["properties"]["loadBalancerBackendAddresses"]
            .as_array()?
            .len();
        (addrs == 2).then_some(())
    })
    .await;
    let node_puts = fake.count("PUT", "/loadbalancers/", None) - lb_puts;
    assert!(
        node_puts <= 2,
        "{node_puts} load balancer writes for one node"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    nothing_left(&fake, &pool);
    delete_nodes(&client, &["az-n1", "az-n2"]).await;
    op.kill().await;
}

/// Azure writes a load balancer as one document: 50 SharedLBs created at once become Ready through a handful of
/// load balancer and NSG writes, not 50 each. One write carries at most the changes of the SharedLBs being
/// reconciled at once (`--concurrency`, 16 by default: then 50 take at least 4 writes); here 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_50_sharedlbs_lands_in_a_handful_of_puts() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = azure_fake().await;
    add_node(&client, "az-b1", "10.224.0.9").await;
    let op = operator_with(&client, &fake, 64);
    let ns = namespace(&client, "azure-burst", &[]).await;
    let pool = azure_pool(&client, json!({}), json!({})).await;
    // the pool's frontend first, so the burst measures rule changes
    create_slb(
        &client,
        &ns,
        "first",
        json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    ready(&client, &ns, "first", 120).await;
    let lb_path = format!("/loadbalancers/{}", cloud_name_prefix("e2e", &pool));
    let (lb0, nsg0) = (
        fake.count("PUT", &lb_path, None),
        fake.count("PUT", "/networksecuritygroups/", None),
    );
    let started = std::time::Instant::now();
    create_burst(
        &client,
        &ns,
        "b",
        50,
        json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    for i in 0..50 {
        ready(&client, &ns, &format!("b{i:02}"), 180).await;
    }
    let lb_puts = fake.count("PUT", &lb_path, None) - lb0;
    let nsg_puts = fake.count("PUT", "/networksecuritygroups/", None) - nsg0;
    println!(
        "azure e2e: 50 SharedLBs Ready in {} ms through {lb_puts} load balancer PUTs and {nsg_puts} NSG PUTs",
        started.elapsed().as_millis()
    );
    assert_eq!(
        rule_shape(&fake, &pool).len(),
        51,
        "every SharedLB has its rule"
    );
    assert_eq!(
        nsg_shape(&fake, &pool).len(),
        51,
        "every SharedLB has its NSG rule"
    );
    assert!(
        lb_puts <= 5,
        "{lb_puts} load balancer PUTs for 50 SharedLBs"
    );
    assert!(nsg_puts <= 5, "{nsg_puts} NSG PUTs for 50 SharedLBs");
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    nothing_left(&fake, &pool);
    delete_nodes(&client, &["az-b1"]).await;
    op.kill().await;
}

/// Settings that point at nothing make the pool Ready=False with Azure's words and the SharedLB PoolNotReady;
/// an exceeded quota is the SharedLB's condition and Event with Azure's words; nothing is left half-made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_settings_and_an_exceeded_quota_are_conditions_with_azures_words_and_nothing_half_made()
{
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = azure_fake().await;
    let op = operator_on(&client, &fake);
    let ns = namespace(&client, "azure-err", &[]).await;

    let bad = azure_pool(
        &client,
        json!({"networkSecurityGroup": "no-such-nsg"}),
        json!({}),
    )
    .await;
    let (reason, msg) = pool_not_ready(&client, &bad).await;
    assert_eq!(reason, "CloudInvalidConfig", "{msg}");
    assert!(
        msg.contains("no-such-nsg"),
        "the message names what is missing: {msg}"
    );
    create_slb(
        &client,
        &ns,
        "lost",
        json!({"pool": bad, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    refused(&client, &ns, "lost", "PoolNotReady").await;

    fake.set_public_ip_quota(0);
    let pool = azure_pool(&client, json!({}), json!({})).await;
    create_slb(
        &client,
        &ns,
        "x",
        json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    let (reason, msg) = not_programmed(&client, &ns, "x").await;
    assert_eq!(reason, "CloudQuotaExceeded", "{msg}");
    assert!(
        msg.contains("PublicIPCountLimitReached"),
        "Azure's words reach the user: {msg}"
    );
    event_recorded(&client, &ns, "x", &reason, 10).await;
    assert!(
        fake.resources("loadBalancers").is_empty(),
        "no load balancer without its public IP"
    );
    assert!(
        nsg_shape(&fake, &pool).is_empty(),
        "no NSG rule for what was never made"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    delete_pool(&client, &bad).await;
    nothing_left(&fake, &pool);
    op.kill().await;
}

/// A real `sharedlb run` process configured as a pod would be: `SHAREDLB_AZURE_ENDPOINT`,
/// `SHAREDLB_AZURE_CA_FILE` and a service principal in `AZURE_TENANT_ID`/`AZURE_CLIENT_ID`/`AZURE_CLIENT_SECRET`
/// with `AZURE_AUTHORITY_HOST` (here all pointing at the fake): a SharedLB becomes Ready on the fake's public IP,
/// and deleting it and the pool leaves nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_sharedlb_process_takes_its_azure_access_from_the_environment() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let fake = azure_fake().await;
    add_node(&client, "az-p1", "10.224.0.7").await;
    let ca = std::env::temp_dir().join(format!("azure-fake-ca-{}.pem", fastrand::u32(..)));
    std::fs::write(&ca, fake.ca_pem()).expect("CA file");
    let log = ca.with_extension("log");
    let mut child = tokio::process::Command::new(sharedlb_bin())
        .args(["run", "--cluster-id", "e2e"])
        .env("SHAREDLB_AZURE_ENDPOINT", fake.endpoint())
        .env("SHAREDLB_AZURE_CA_FILE", &ca)
        .env("AZURE_AUTHORITY_HOST", fake.endpoint())
        .env("AZURE_TENANT_ID", "tenant")
        .env("AZURE_CLIENT_ID", "sharedlb")
        .env("AZURE_CLIENT_SECRET", CLIENT_SECRET)
        .env_remove("AZURE_FEDERATED_TOKEN_FILE")
        .env("RUST_LOG", "info,kube=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start sharedlb");
    let ns = namespace(&client, "azure-bin", &[]).await;
    let pool = azure_pool(&client, json!({}), json!({})).await;
    create_slb(
        &client,
        &ns,
        "web",
        json!({"pool": pool, "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}),
    )
    .await;
    let web = ready(&client, &ns, "web", 120).await;
    let ips: Vec<String> = fake
        .resources("publicIPAddresses")
        .iter()
        .filter(|ip| ip["tags"]["sharedlb.dev/pool"] == pool.as_str())
        .filter_map(|ip| ip["properties"]["ipAddress"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        ips,
        vec![ip_of(&web)],
        "the status shows the fake's public IP"
    );
    assert_eq!(rule_shape(&fake, &pool).len(), 1);
    assert!(
        fake.count("POST", "/oauth2/v2.0/token", Some(200)) >= 1,
        "the process got its token from the authority host in its environment"
    );
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    nothing_left(&fake, &pool);
    assert!(child.try_wait().expect("status").is_none(), "still running");
    let _ = child.kill().await;
    delete_nodes(&client, &["az-p1"]).await;
    let _ = std::fs::remove_file(&ca);
    let _ = std::fs::remove_file(&log);
}
