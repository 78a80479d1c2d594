//! The aws provider end to end: the real apiserver, the operator in-process, moto as EC2/ELBv2 (started by
//! `scripts/test` with WITH_MOTO=1), Node objects with AWS provider IDs.
#![cfg(feature = "aws")]

use std::collections::BTreeSet;

use aws_sdk_elasticloadbalancingv2 as elb;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use sharedlb_e2e::aws::{cloud, cloud_of, conf, network, provider_of};
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

async fn add_node(client: &Client, name: &str, zone: &str, instance: &str) {
    add_ready_node(client, name, &format!("aws:///{zone}/{instance}")).await;
}

/// A pool of NLBs in this VPC, with ports from 4000-4999, under a fresh name.
async fn aws_pool(client: &Client, vpc: &str, subnets: &[String]) -> String {
    let pool = format!("aws-{}", fastrand::u32(..100_000));
    let aws = json!({"region": "us-east-1", "vpcId": vpc, "subnetIds": subnets});
    let spec = json!({"provider": {"aws": aws}, "portRange": {"min": 4000, "max": 4999}});
    create_pool(client, &pool, spec).await;
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_sharedlbs_make_two_nlbs_follow_nodes_and_leave_nothing_behind() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    add_node(&client, "aws-n1", "us-east-1a", "i-00000000000000a01").await;
    add_node(&client, "aws-n2", "us-east-1b", "i-00000000000000b02").await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "aws", &[]).await;
    let pool = aws_pool(&client, &vpc, &subnets).await;
    for i in 0..60 {
        let protocol = if i % 3 == 0 { "UDP" } else { "TCP" };
        let spec = json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80, "protocol": protocol}]});
        create_slb(&client, &ns, &format!("a{i:02}"), spec).await;
    }
    let mut seen = BTreeSet::new();
    for i in 0..60 {
        let s = ready(&client, &ns, &format!("a{i:02}"), 180).await;
        let st = s.status.expect("status");
        let lb = st.load_balancer.expect("lb");
        assert!(
            lb.hostname.as_deref().is_some_and(|h| !h.is_empty()),
            "an NLB has a DNS name"
        );
        assert!(seen.insert((lb.name, st.ports[0].port)), "duplicate port");
    }
    let (nlbs, targets) = cloud("e2e").await;
    assert_eq!(
        nlbs.len(),
        2,
        "60 ports at 50 listeners per NLB is 2 NLBs: {nlbs:?}"
    );
    assert_eq!(targets.len(), 60, "one target group per port");
    assert!(
        targets.iter().all(|t| *t == 2),
        "every target group has both nodes: {targets:?}"
    );

    add_node(&client, "aws-n3", "us-east-1a", "i-00000000000000a03").await;
    eventually(
        60,
        "the new node registered in every target group",
        || async {
            let (_, t) = cloud("e2e").await;
            (t.len() == 60 && t.iter().all(|n| *n == 3)).then_some(())
        },
    )
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    let (nlbs, targets) = cloud("e2e").await;
    assert!(
        nlbs.is_empty() && targets.is_empty(),
        "moto holds nothing of the cluster: {nlbs:?} {}",
        targets.len()
    );
    delete_nodes(&client, &["aws-n1", "aws-n2", "aws-n3"]).await;
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_subnet_is_a_condition_with_the_aws_message_and_nothing_half_made() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, _) = network().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "aws-bad", &[]).await;
    let pool = format!("aws-bad-{}", fastrand::u32(..100_000));
    create_pool(&client, &pool, json!({"provider": {"aws": {"region": "us-east-1", "vpcId": vpc, "subnetIds": ["subnet-0000000000000dead"]}}})).await;
    create_slb(
        &client,
        &ns,
        "x",
        json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    // the pool says what is wrong, in AWS's words
    let (reason, msg) = pool_not_ready(&client, &pool).await;
    assert_eq!(reason, "CloudInvalidConfig");
    assert!(
        msg.contains("InvalidSubnetID") || msg.contains("subnet"),
        "AWS's message reaches the pool: {msg}"
    );
    // and so does the SharedLB, with an Event
    let msg = refused(&client, &ns, "x", "PoolNotReady").await;
    assert!(msg.contains("subnet"), "{msg}");
    event_recorded(&client, &ns, "x", "PoolNotReady", 10).await;
    let (nlbs, _) = cloud_of("e2e", Some(&pool)).await;
    assert!(nlbs.is_empty(), "nothing half-made: {nlbs:?}");
    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    op.kill().await;
}

/// A security group's inbound rules from addresses as (protocol, port, cidr), sorted.
async fn ingress(sg: &str) -> Vec<(String, i32, String)> {
    let ec2 = aws_sdk_ec2::Client::new(&conf().await);
    let g = ec2
        .describe_security_groups()
        .group_ids(sg)
        .send()
        .await
        .expect("sg")
        .security_groups
        .unwrap_or_default();
    let mut out: Vec<(String, i32, String)> = g
        .iter()
        .flat_map(|g| g.ip_permissions())
        .flat_map(|p| {
            p.ip_ranges().iter().map(move |r| {
                (
                    p.ip_protocol().unwrap_or_default().to_string(),
                    p.from_port().unwrap_or_default(),
                    r.cidr_ip().unwrap_or_default().to_string(),
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// Listeners of the NLBs whose name starts with nothing in particular but whose DNS name is `hostname`:
/// (port, protocol, target group port).
/// The ARN of the NLB whose DNS name is `hostname`, and its target groups.
async fn nlb_and_groups(c: &elb::Client, hostname: &str) -> (String, Vec<elb::types::TargetGroup>) {
    let lb = c
        .describe_load_balancers()
        .send()
        .await
        .expect("lbs")
        .load_balancers
        .unwrap_or_default()
        .into_iter()
        .find(|l| l.dns_name() == Some(hostname))
        .expect("the SharedLB's NLB");
    let arn = lb.load_balancer_arn().unwrap_or_default().to_string();
    let tgs = c
        .describe_target_groups()
        .load_balancer_arn(&arn)
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default();
    (arn, tgs)
}

/// The NLB's listeners as moto holds them.
async fn listeners_of(c: &elb::Client, lb_arn: &str) -> Vec<elb::types::Listener> {
    c.describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .expect("listeners")
        .listeners
        .unwrap_or_default()
}

async fn nlb_listeners(hostname: &str) -> Vec<(i32, String, i32)> {
    let c = elb::Client::new(&conf().await);
    let (lb_arn, tgs) = nlb_and_groups(&c, hostname).await;
    let mut out: Vec<(i32, String, i32)> = listeners_of(&c, &lb_arn)
        .await
        .iter()
        .map(|l| {
            let tg = l
                .default_actions()
                .first()
                .and_then(|a| a.target_group_arn());
            (
                l.port().unwrap_or_default(),
                l.protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                tgs.iter()
                    .find(|t| t.target_group_arn() == tg)
                    .and_then(|t| t.port())
                    .unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

/// A security group's inbound rules from other groups as (protocol, from, to, group), sorted.
async fn group_ingress(sg: &str) -> Vec<(String, i32, i32, String)> {
    let ec2 = aws_sdk_ec2::Client::new(&conf().await);
    let g = ec2
        .describe_security_groups()
        .group_ids(sg)
        .send()
        .await
        .expect("sg")
        .security_groups
        .unwrap_or_default();
    let mut out: Vec<(String, i32, i32, String)> = g
        .iter()
        .flat_map(|g| g.ip_permissions())
        .flat_map(|p| {
            p.user_id_group_pairs().iter().map(move |pair| {
                (
                    p.ip_protocol().unwrap_or_default().to_string(),
                    p.from_port().unwrap_or_default(),
                    p.to_port().unwrap_or_default(),
                    pair.group_id().unwrap_or_default().to_string(),
                )
            })
        })
        .collect();
    out.sort();
    out
}

/// The security groups of the NLB whose DNS name is `hostname`, as (its own, the pool's backend group).
async fn nlb_groups(hostname: &str) -> (String, String) {
    let ids: Vec<String> = elb::Client::new(&conf().await)
        .describe_load_balancers()
        .send()
        .await
        .expect("lbs")
        .load_balancers
        .unwrap_or_default()
        .into_iter()
        .find(|l| l.dns_name() == Some(hostname))
        .and_then(|l| l.security_groups)
        .expect("the SharedLB's NLB has security groups");
    let groups = aws_sdk_ec2::Client::new(&conf().await)
        .describe_security_groups()
        .set_group_ids(Some(ids))
        .send()
        .await
        .expect("groups")
        .security_groups
        .unwrap_or_default();
    let with_role = |role: &str| {
        groups
            .iter()
            .find(|g| {
                g.tags().iter().any(|t| {
                    t.key() == Some("sharedlb.dev/security-group") && t.value() == Some(role)
                })
            })
            .and_then(|g| g.group_id.clone())
            .unwrap_or_else(|| panic!("a {role} group on the NLB: {groups:?}"))
    };
    (with_role("frontend"), with_role("backend"))
}

/// Names of the security groups sharedlb made in the VPC.
async fn our_groups(vpc: &str) -> Vec<String> {
    let f = |k: &str, v: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(k)
            .values(v)
            .build()
    };
    aws_sdk_ec2::Client::new(&conf().await)
        .describe_security_groups()
        .filters(f("vpc-id", vpc))
        .filters(f("tag:sharedlb.dev/managed-by", "sharedlb"))
        .send()
        .await
        .expect("groups")
        .security_groups
        .unwrap_or_default()
        .iter()
        .filter_map(|g| g.group_name().map(str::to_string))
        .collect()
}

fn node_port(s: &sharedlb_crds::SharedLB, name: &str) -> i32 {
    s.status
        .as_ref()
        .and_then(|st| st.ports.iter().find(|p| p.name == name))
        .and_then(|p| p.node_port)
        .expect("a node port")
}

fn port(s: &sharedlb_crds::SharedLB, name: &str) -> i32 {
    s.status
        .as_ref()
        .and_then(|st| st.ports.iter().find(|p| p.name == name))
        .map(|p| p.port)
        .expect("a port")
}

/// TCP, UDP and both on one port: one TCP_UDP listener for the pair (one node port for both Service ports); the
/// NLB's own security group opens exactly the listener ports to exactly the sources, the node group holds only
/// the three rules that admit the pool's backend group; the rule quota caps each NLB, so a port over it goes on
/// a second NLB (it used to be refused for the whole pool); dropping a protocol splits the listener and its rule;
/// deleting leaves no rule and no group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_udp_and_both_get_exact_listeners_and_rules_and_the_rule_quota_caps_each_nlb() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    let ec2 = aws_sdk_ec2::Client::new(&conf().await);
    let sg = ec2
        .create_security_group()
        .group_name(format!("e2e-nodes-{}", fastrand::u32(..)))
        .description("nodes")
        .vpc_id(&vpc)
        .send()
        .await
        .expect("sg")
        .group_id
        .expect("sg id");
    add_node(&client, "aws-m1", "us-east-1a", "i-00000000000000c01").await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "aws-mix", &[]).await;
    let pool = format!("aws-mix-{}", fastrand::u32(..100_000));
    // 5 rules per security group: 5 ports per NLB, in its own group
    create_pool(
        &client,
        &pool,
        json!({"provider": {"aws": {"region": "us-east-1", "vpcId": vpc, "subnetIds": subnets,
            "nodeSecurityGroupId": sg, "securityGroupRuleLimit": 5}},
        "portRange": {"min": 7000, "max": 7999}}),
    )
    .await;
    let api: Api<sharedlb_crds::SharedLB> = Api::namespaced(client.clone(), &ns);
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
        json!({"pool": pool, "selector": {"app": "web"}, "ports": [
        {"name": "http", "targetPort": 80}]}),
    )
    .await;
    create_slb(&client, &ns, "game", json!({"pool": pool, "selector": {"app": "game"},
        "sourceRanges": ["198.51.100.0/24"], "ports": [{"name": "g", "targetPort": 7777, "protocol": "UDP"}]})).await;
    let dns = ready(&client, &ns, "dns", 120).await;
    let web = ready(&client, &ns, "web", 120).await;
    let game = ready(&client, &ns, "game", 120).await;
    let (dns_np, web_np, game_np) = (
        node_port(&dns, "dns-tcp"),
        node_port(&web, "http"),
        node_port(&game, "g"),
    );
    assert_eq!(
        dns_np,
        node_port(&dns, "dns-udp"),
        "TCP and UDP of port 53 share one node port"
    );
    let svc: k8s_openapi::api::core::v1::Service = Api::namespaced(client.clone(), &ns)
        .get("dns-sharedlb")
        .await
        .expect("service");
    let nps: BTreeSet<i32> = svc
        .spec
        .and_then(|s| s.ports)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.node_port)
        .collect();
    assert_eq!(nps, BTreeSet::from([dns_np]), "the Service agrees");
    let host = dns
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.clone())
        .and_then(|l| l.hostname)
        .expect("host");
    let mut want_listeners = vec![
        (53, "TCP_UDP".to_string(), dns_np),
        (port(&web, "http"), "TCP".to_string(), web_np),
        (port(&game, "g"), "UDP".to_string(), game_np),
    ];
    want_listeners.sort();
    assert_eq!(
        nlb_listeners(&host).await,
        want_listeners,
        "one listener per port, TCP_UDP for the pair, each to its node port"
    );
    let open = "0.0.0.0/0".to_string();
    let s = |p: &str, n: i32, c: &str| (p.to_string(), n, c.to_string());
    let mut want = vec![
        s("tcp", 53, &open),
        s("udp", 53, &open),
        s("tcp", port(&web, "http"), &open),
        s("udp", port(&game, "g"), "198.51.100.0/24"),
    ];
    want.sort();
    let (front, backend) = nlb_groups(&host).await;
    assert_eq!(
        ingress(&front).await,
        want,
        "exactly the listener ports, from exactly the sources"
    );
    assert_eq!(
        ingress(&sg).await,
        vec![],
        "no address rule in the node group"
    );
    let admits = |proto: &str, from: i32, to: i32| (proto.to_string(), from, to, backend.clone());
    assert_eq!(
        group_ingress(&sg).await,
        vec![
            admits("tcp", 10256, 10256),
            admits("tcp", 30000, 32767),
            admits("udp", 30000, 32767)
        ],
        "the node group admits the NLBs' backend group, and nothing else"
    );

    // the quota: 4 ports on the NLB, 1 left; the sixth goes on a second NLB
    create_slb(
        &client,
        &ns,
        "fifth",
        json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    let hostname = |s: &sharedlb_crds::SharedLB| {
        s.status
            .as_ref()
            .and_then(|s| s.load_balancer.clone())
            .and_then(|l| l.hostname)
            .expect("host")
    };
    let fifth = ready(&client, &ns, "fifth", 60).await;
    assert_eq!(hostname(&fifth), host, "the fifth port fits the first NLB");
    create_slb(
        &client,
        &ns,
        "sixth",
        json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]}),
    )
    .await;
    let sixth = ready(&client, &ns, "sixth", 60).await;
    let second = hostname(&sixth);
    assert_ne!(second, host, "the sixth goes on a second NLB");
    let (front2, backend2) = nlb_groups(&second).await;
    assert_eq!(backend2, backend, "one backend group for the pool");
    assert_eq!(
        ingress(&front2).await.len(),
        1,
        "its own group, its own rule"
    );
    assert_eq!(
        group_ingress(&sg).await.len(),
        3,
        "still three rules in the node group"
    );

    // dropping UDP from port 53 splits the listener and takes the UDP rule away
    api.patch(
        "dns",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"ports": [{"name": "dns-tcp", "port": 53, "targetPort": 5353, "protocol": "TCP"}]}})),
    )
    .await
    .expect("patch");
    eventually(60, "port 53 is TCP only", || async {
        nlb_listeners(&host)
            .await
            .contains(&(53, "TCP".to_string(), dns_np))
            .then_some(())
    })
    .await;
    let rules = ingress(&front).await;
    assert!(
        !rules.contains(&s("udp", 53, &open)) && rules.contains(&s("tcp", 53, &open)),
        "{rules:?}"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    assert_eq!(ingress(&sg).await, vec![], "no rule is left");
    assert_eq!(group_ingress(&sg).await, vec![], "no rule is left");
    assert_eq!(
        our_groups(&vpc).await,
        Vec::<String>::new(),
        "no group is left"
    );
    let (nlbs, tgs) = cloud_of("e2e", Some(&pool)).await;
    assert!(nlbs.is_empty() && tgs.is_empty(), "{nlbs:?} {}", tgs.len());
    delete_nodes(&client, &["aws-m1"]).await;
    op.kill().await;
}

/// `examples/pool-aws.yaml` is a valid pool: the apiserver takes it (server-side dry run) and keeps every field
/// of it (a field the schema does not know would be pruned silently).
#[tokio::test]
async fn the_aws_pool_example_is_accepted_whole() {
    use serde::Deserialize;
    let client = client().await;
    let path = format!("{}/../examples/pool-aws.yaml", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).expect("example");
    let doc: serde_json::Value =
        serde_json::Value::deserialize(serde_yaml::Deserializer::from_str(&text)).expect("yaml");
    let ar = kube::api::ApiResource::erase::<sharedlb_crds::LoadBalancerPool>(&());
    let api: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
    let obj: kube::api::DynamicObject = serde_json::from_value(doc.clone()).expect("object");
    let back = api
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &obj,
        )
        .await
        .expect("the apiserver accepts the example");
    fn within(want: &serde_json::Value, got: &serde_json::Value, at: &str) {
        match (want, got) {
            (serde_json::Value::Object(w), serde_json::Value::Object(g)) => {
                for (k, v) in w {
                    within(
                        v,
                        g.get(k).unwrap_or(&serde_json::Value::Null),
                        &format!("{at}.{k}"),
                    );
                }
            }
            _ => assert_eq!(want, got, "{at} is kept as written"),
        }
    }
    within(&doc["spec"], &back.data["spec"], "spec");
}

/// A real `sharedlb run` process with no AWS credentials at all (and no instance metadata to fall back on):
/// the pool says so, in the SDK's words, instead of panicking or staying silently pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_is_the_pools_condition() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let bin = sharedlb_bin();
    let pool = format!("aws-nocreds-{}", fastrand::u32(..100_000));
    let log = std::env::temp_dir().join(format!("{pool}.log"));
    let mut child = tokio::process::Command::new(bin)
        .args(["run", "--cluster-id", "nocreds"])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "info,kube=warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("start sharedlb");
    create_pool(
        &client,
        &pool,
        json!({"provider": {"aws": {"region": "us-east-1", "vpcId": "vpc-0123456789abcdef0",
            "subnetIds": ["subnet-0123456789abcdef0"]}}}),
    )
    .await;
    let (reason, msg) = pool_not_ready(&client, &pool).await;
    eprintln!("pool condition without credentials: {reason}: {msg}");
    assert_eq!(reason, "CloudInvalidConfig", "{msg}");
    assert!(
        msg.to_lowercase().contains("credential"),
        "the condition says credentials are the problem: {msg}"
    );
    assert!(
        child.try_wait().expect("status").is_none(),
        "the operator is still running, not panicked"
    );
    let _ = child.kill().await;
    // nothing could ever have been made without credentials: let the pool go without its cleanup
    let pools: Api<sharedlb_crds::LoadBalancerPool> = Api::all(client.clone());
    let _ = pools
        .patch(
            &pool,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await;
    delete_pool(&client, &pool).await;
    let _ = std::fs::remove_file(&log);
}

/// The pod targets behind the NLB of the SharedLB whose status names `hostname`: (target type, id:port).
async fn pod_targets(hostname: &str) -> Vec<(String, String)> {
    let c = elb::Client::new(&conf().await);
    let (_, tgs) = nlb_and_groups(&c, hostname).await;
    let mut out = Vec::new();
    for tg in tgs {
        let kind = tg.target_type().map(|t| t.as_str().to_string());
        let h = c
            .describe_target_health()
            .target_group_arn(tg.target_group_arn().unwrap_or_default())
            .send()
            .await
            .expect("health");
        for t in h
            .target_health_descriptions
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| d.target)
        {
            let at = format!("{}:{}", t.id().unwrap_or_default(), t.port().unwrap_or(0));
            out.push((kind.clone().unwrap_or_default(), at));
        }
    }
    out.sort();
    out
}

/// `targets: Pods`: the NLB's target group holds the ready endpoints of the SharedLB's backing Service (its
/// EndpointSlices) and follows them; nothing is left after the SharedLB and pool go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_target_pool_sends_to_the_ready_pods_and_follows_their_endpoints() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "aws-pods", &[]).await;
    let pool = format!("aws-pods-{}", fastrand::u32(..100_000));
    create_pool(
        &client,
        &pool,
        json!({"provider": {"aws": {"region": "us-east-1", "vpcId": vpc, "subnetIds": subnets, "targets": "Pods"}},
        "portRange": {"min": 4000, "max": 4999}}),
    )
    .await;
    let spec = json!({"pool": pool, "selector": {"app": "x"}, "ports": [{"name": "web", "targetPort": 8080, "protocol": "TCP"}]});
    create_slb(&client, &ns, "pods", spec).await;
    let pods = |a: &[&str]| -> Vec<std::net::SocketAddr> {
        a.iter().map(|s| s.parse().expect("address")).collect()
    };
    put_endpoints(
        &client,
        &ns,
        "pods",
        "web",
        "TCP",
        &pods(&["10.77.0.10:8080", "10.77.1.11:8080"]),
    )
    .await;
    let s = ready(&client, &ns, "pods", 120).await;
    let hostname = s
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.hostname)
        .expect("an NLB hostname");
    let want = |a: &[&str]| -> Vec<(String, String)> {
        a.iter()
            .map(|t| ("ip".to_string(), t.to_string()))
            .collect()
    };
    eventually(60, "the pods are the NLB's targets", || async {
        (pod_targets(&hostname).await == want(&["10.77.0.10:8080", "10.77.1.11:8080"]))
            .then_some(())
    })
    .await;
    put_endpoints(
        &client,
        &ns,
        "pods",
        "web",
        "TCP",
        &pods(&["10.77.1.11:8080", "10.77.0.12:8080"]),
    )
    .await;
    eventually(60, "the targets follow the endpoints", || async {
        (pod_targets(&hostname).await == want(&["10.77.0.12:8080", "10.77.1.11:8080"]))
            .then_some(())
    })
    .await;

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    let (nlbs, targets) = cloud_of("e2e", Some(&pool)).await;
    assert!(
        nlbs.is_empty() && targets.is_empty(),
        "moto holds nothing of the pool: {nlbs:?} {targets:?}"
    );
    op.kill().await;
}

/// The drift audit against moto (every 2 s here): an NLB listener deleted behind the operator's back (its target
/// group left) and a stray listener (a whole one, as a crashed operator leaves for an owner that is gone) are
/// both found by one audit and mended: the listener forwards again, the stray and its target group are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drift_audit_mends_a_deleted_nlb_listener_and_removes_a_stray_one() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    add_node(&client, "aws-d1", "us-east-1a", "i-00000000000000d01").await;
    let settings = sharedlb::Settings {
        cluster_id: "e2e".into(),
        audit_interval: std::time::Duration::from_secs(2),
        ..sharedlb::Settings::default()
    };
    let op = Operator::start_with(&client, &MemoryCloud::new(), settings);
    let ns = namespace(&client, "aws-drift", &[]).await;
    let pool = aws_pool(&client, &vpc, &subnets).await;
    let ports = json!([{"name": "a", "targetPort": 80}, {"name": "b", "targetPort": 81}]);
    create_slb(
        &client,
        &ns,
        "d",
        json!({"pool": pool, "selector": {"app": "d"}, "ports": ports}),
    )
    .await;
    let d = ready(&client, &ns, "d", 180).await;
    let hostname = d
        .status
        .and_then(|s| s.load_balancer)
        .and_then(|l| l.hostname)
        .expect("an NLB's DNS name");
    let c = elb::Client::new(&conf().await);
    let (lb_arn, _) = nlb_and_groups(&c, &hostname).await;
    let listeners = || {
        let (c, lb_arn) = (c.clone(), lb_arn.clone());
        async move {
            let mut ports: Vec<i32> = listeners_of(&c, &lb_arn)
                .await
                .iter()
                .filter_map(|l| l.port())
                .collect();
            ports.sort();
            ports
        }
    };
    assert_eq!(listeners().await, [4000, 4001]);
    let second = listeners_of(&c, &lb_arn)
        .await
        .into_iter()
        .find(|l| l.port() == Some(4001))
        .expect("the listener on 4001");
    c.delete_listener()
        .listener_arn(second.listener_arn().unwrap_or_default())
        .send()
        .await
        .expect("delete a listener behind the operator's back");
    let provider = provider_of(&client, "e2e", &pool).await;
    let key = sharedlb_providers::LoadBalancerKey {
        cluster_id: "e2e".into(),
        pool: pool.clone(),
        index: 0,
    };
    let stray = sharedlb_providers::ListenerSpec {
        port: 4050,
        protocol: sharedlb_providers::Protocol::Tcp,
        node_port: 30999,
        owner: sharedlb_providers::Owner {
            uid: "gone-owner".into(),
            namespace: ns.clone(),
            name: "gone".into(),
        },
        source_ranges: Vec::new(),
        backends: Vec::new(),
        proxy_protocol: false,
        health_port: None,
    };
    provider
        .ensure_listener(&key, &stray)
        .await
        .expect("plant a stray listener");
    eventually(60, "4001 forwards again and the stray is gone", || async {
        (listeners().await == [4000, 4001]).then_some(())
    })
    .await;
    let (_, groups) = nlb_and_groups(&c, &hostname).await;
    let group_ports: BTreeSet<i32> = groups.iter().filter_map(|g| g.port()).collect();
    assert_eq!(
        groups.len(),
        2,
        "the stray's target group went with it: {group_ports:?}"
    );

    delete_namespace(&client, &ns).await;
    delete_pool(&client, &pool).await;
    delete_nodes(&client, &["aws-d1"]).await;
    op.kill().await;
}
