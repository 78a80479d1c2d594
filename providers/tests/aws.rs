//! The aws provider against moto (a real server speaking the EC2 and ELBv2 APIs), started by
//! `WITH_MOTO=1 scripts/test-env up`; the official SDK clients talk to it through AWS_ENDPOINT_URL.
#![cfg(feature = "aws")]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use sharedlb_providers::aws::{AwsPool, AwsProvider, instance_id};
use sharedlb_providers::conformance::listener_spec as spec;
use sharedlb_providers::{
    LoadBalancerKey, LoadBalancerProvider, NodeTarget, Protocol, ProviderError,
};

async fn ec2() -> aws_sdk_ec2::Client {
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        "the aws tests need moto: run them through scripts/test (or eval \"$(WITH_MOTO=1 scripts/test-env up)\")"
    );
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    aws_sdk_ec2::Client::new(&conf)
}

/// A fresh VPC with two subnets and a node security group in moto.
async fn network() -> AwsPool {
    let ec2 = ec2().await;
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.42.0.0/16")
        .send()
        .await
        .expect("vpc")
        .vpc
        .expect("vpc");
    let vpc_id = vpc.vpc_id.expect("id");
    let mut subnets = Vec::new();
    for (i, az) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let s = ec2
            .create_subnet()
            .vpc_id(&vpc_id)
            .cidr_block(format!("10.42.{i}.0/24"))
            .availability_zone(*az)
            .send()
            .await
            .expect("subnet");
        subnets.push(s.subnet.and_then(|s| s.subnet_id).expect("subnet id"));
    }
    let sg = ec2
        .create_security_group()
        .group_name(format!("nodes-{}", fastrand::u32(..)))
        .description("nodes")
        .vpc_id(&vpc_id)
        .send()
        .await
        .expect("sg")
        .group_id
        .expect("sg id");
    AwsPool {
        region: "us-east-1".into(),
        vpc_id,
        subnet_ids: subnets,
        node_security_group_id: Some(sg),
        internal: false,
        ..AwsPool::default()
    }
}

#[tokio::test]
async fn aws_provider_is_conformant_on_moto() {
    let net = network().await;
    sharedlb_providers::conformance::run(|pool| {
        let net = net.clone();
        async move {
            Arc::new(
                AwsProvider::new("conformance", &pool, net)
                    .await
                    .expect("provider"),
            ) as Arc<dyn LoadBalancerProvider>
        }
    })
    .await;
}

#[tokio::test]
async fn listeners_target_groups_and_firewall_are_exactly_what_the_port_needs() {
    let net = network().await;
    let sg = net.node_security_group_id.clone().expect("sg");
    let p = AwsProvider::new("exact", "p1", net.clone())
        .await
        .expect("provider");
    p.update_nodes(&[
        node("n1", "aws:///us-east-1a/i-0000000000000aaaa"),
        node("n2", "aws:///us-east-1b/i-0000000000000bbbb"),
    ])
    .await
    .expect("nodes");
    assert_eq!(
        instance_id("aws:///us-east-1a/i-0000000000000aaaa"),
        Some("i-0000000000000aaaa")
    );
    let key = LoadBalancerKey {
        cluster_id: "exact".into(),
        pool: "p1".into(),
        index: 0,
    };
    let info = p.ensure_load_balancer(&key).await.expect("nlb");
    assert!(
        info.id.starts_with("arn:aws:elasticloadbalancing:"),
        "{info:?}"
    );
    assert!(info.hostname.is_some());
    let l = spec(4000, Protocol::Udp, 31000, "u1", &["203.0.113.0/24"]);
    p.ensure_listener(&key, &l).await.expect("listener");

    let elb = elb().await;
    let (front, backend) = nlb_groups(&elb, &info.id).await;
    assert_eq!(
        ingress(&front).await,
        vec![rule("udp", 4000, "203.0.113.0/24")],
        "the NLB's own group opens exactly the listener port to exactly the sourceRanges"
    );
    assert_eq!(
        ingress(&sg).await,
        vec![],
        "no address rule in the node group"
    );
    assert_eq!(node_access(&sg).await, admits(&backend));

    let inv = p.inventory().await.expect("inventory");
    assert_eq!(inv.load_balancers[0].listeners.len(), 1);
    assert_eq!(inv.load_balancers[0].listeners[0].node_port, 31000);

    // targets: the nodes, on the node port; a node added is registered, a node gone is deregistered
    assert_eq!(
        targets(&elb, "-4000u-31000").await,
        vec![
            ("i-0000000000000aaaa".to_string(), 31000),
            ("i-0000000000000bbbb".to_string(), 31000)
        ]
    );
    p.update_nodes(&[
        node("n2", "aws:///us-east-1b/i-0000000000000bbbb"),
        node("n3", "aws:///us-east-1a/i-0000000000000cccc"),
    ])
    .await
    .expect("nodes changed");
    assert_eq!(
        targets(&elb, "-4000u-31000").await,
        vec![
            ("i-0000000000000bbbb".to_string(), 31000),
            ("i-0000000000000cccc".to_string(), 31000)
        ]
    );

    p.remove_listener(&key, 4000, Protocol::Udp, "u1")
        .await
        .expect("remove");
    assert_eq!(ingress(&front).await, vec![], "the rule goes with the port");
    assert_eq!(
        node_access(&sg).await,
        admits(&backend),
        "the nodes admit the NLBs while one lives"
    );
    p.delete_load_balancer(&key).await.expect("delete");
    assert!(
        p.inventory()
            .await
            .expect("inventory")
            .load_balancers
            .is_empty()
    );
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![],
        "the groups go with the NLB"
    );
    assert_eq!(node_access(&sg).await, vec![]);
}

#[tokio::test]
async fn a_missing_vpc_subnet_or_security_group_is_a_configuration_error_before_anything_is_made() {
    let net = network().await;
    let cases = [
        (
            "subnet",
            AwsPool {
                subnet_ids: vec!["subnet-0000000000000dead".into()],
                ..net.clone()
            },
        ),
        (
            "vpc",
            AwsPool {
                vpc_id: "vpc-0000000000000dead".into(),
                ..net.clone()
            },
        ),
        (
            "group",
            AwsPool {
                node_security_group_id: Some("sg-0000000000000dead".into()),
                ..net.clone()
            },
        ),
    ];
    for (what, pool) in cases {
        let e = AwsProvider::new("bad", "p", pool)
            .await
            .expect_err("refused at construction");
        assert!(
            matches!(e, ProviderError::InvalidConfig(_)),
            "{what}: {e:?}"
        );
        assert!(
            e.to_string().to_lowercase().contains(what),
            "AWS's message names the {what}: {e}"
        );
    }
    let p = AwsProvider::new("bad", "p", net)
        .await
        .expect("the good one");
    assert!(
        p.inventory()
            .await
            .expect("inventory")
            .load_balancers
            .is_empty(),
        "nothing half-made"
    );
    let e = AwsProvider::new("bad", "p", AwsPool::default())
        .await
        .expect_err("no region");
    assert!(matches!(e, ProviderError::InvalidConfig(_)));
}

/// The (instance, port) targets of the target group whose name ends with `suffix`.
async fn targets(elb: &aws_sdk_elasticloadbalancingv2::Client, suffix: &str) -> Vec<(String, i32)> {
    let (_, port, ids) = group_targets(elb, suffix).await;
    assert_eq!(port, Some(31000), "the target group is on the node port");
    ids
}

fn node(name: &str, provider_id: &str) -> NodeTarget {
    NodeTarget {
        name: name.into(),
        provider_id: Some(provider_id.into()),
        internal_ip: None,
        zone: None,
    }
}

async fn elb() -> aws_sdk_elasticloadbalancingv2::Client {
    ec2().await;
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    aws_sdk_elasticloadbalancingv2::Client::new(&conf)
}

/// The security group's inbound rules as (protocol, port, cidr), sorted.
async fn ingress(sg: &str) -> Vec<(String, i32, String)> {
    let g = ec2()
        .await
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

fn rule(protocol: &str, port: i32, cidr: &str) -> (String, i32, String) {
    (protocol.to_string(), port, cidr.to_string())
}

/// The NLB's security groups as (its own, the pool's backend group), told apart by their role tag.
async fn nlb_groups(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    lb_arn: &str,
) -> (String, String) {
    let ids: Vec<String> = elb
        .describe_load_balancers()
        .load_balancer_arns(lb_arn)
        .send()
        .await
        .expect("nlb")
        .load_balancers
        .unwrap_or_default()
        .into_iter()
        .flat_map(|l| l.security_groups.unwrap_or_default())
        .collect();
    assert_eq!(ids.len(), 2, "two groups on the NLB: {ids:?}");
    let groups = ec2()
        .await
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
            .find(|g| role_of(g) == role)
            .and_then(|g| g.group_id.clone())
            .unwrap_or_else(|| panic!("a {role} group on the NLB: {groups:?}"))
    };
    (with_role("frontend"), with_role("backend"))
}

fn role_of(g: &aws_sdk_ec2::types::SecurityGroup) -> &str {
    g.tags()
        .iter()
        .find(|t| t.key() == Some("sharedlb.dev/security-group"))
        .and_then(|t| t.value())
        .unwrap_or("")
}

/// Security groups sharedlb made in this VPC, as (name, role), sorted.
async fn our_groups(vpc: &str) -> Vec<(String, String)> {
    let f = |k: &str, v: &str| {
        aws_sdk_ec2::types::Filter::builder()
            .name(k)
            .values(v)
            .build()
    };
    let mut out: Vec<(String, String)> = ec2()
        .await
        .describe_security_groups()
        .filters(f("vpc-id", vpc))
        .filters(f("tag:sharedlb.dev/managed-by", "sharedlb"))
        .send()
        .await
        .expect("groups")
        .security_groups
        .unwrap_or_default()
        .iter()
        .map(|g| {
            (
                g.group_name().unwrap_or_default().to_string(),
                role_of(g).to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The group's inbound rules whose source is another group, as (protocol, from, to, that group), sorted.
async fn node_access(sg: &str) -> Vec<(String, i32, i32, String)> {
    let g = ec2()
        .await
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

/// What `node_access` shows when the node group admits `backend`: the node-port range in TCP and UDP, and
/// kube-proxy's health port.
fn admits(backend: &str) -> Vec<(String, i32, i32, String)> {
    let mut out = vec![
        ("tcp".to_string(), 10256, 10256, backend.to_string()),
        ("tcp".to_string(), 30000, 32767, backend.to_string()),
        ("udp".to_string(), 30000, 32767, backend.to_string()),
    ];
    out.sort();
    out
}

/// The group's inbound rules whose source is another group, as the API describes them (to revoke them behind
/// the operator's back).
async fn group_sourced_permissions(sg: &str) -> Vec<aws_sdk_ec2::types::IpPermission> {
    ec2()
        .await
        .describe_security_groups()
        .group_ids(sg)
        .send()
        .await
        .expect("sg")
        .security_groups
        .unwrap_or_default()
        .iter()
        .flat_map(|g| g.ip_permissions())
        .filter(|p| !p.user_id_group_pairs().is_empty())
        .cloned()
        .collect()
}

/// The load balancer's listeners as (port, protocol, name of the target group it forwards to), sorted.
async fn listeners(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    lb_arn: &str,
) -> Vec<(i32, String, String)> {
    let tgs = elb
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default();
    let name = |arn: Option<&str>| {
        tgs.iter()
            .find(|t| t.target_group_arn() == arn)
            .and_then(|t| t.target_group_name())
            .unwrap_or("?")
            .to_string()
    };
    let mut out: Vec<(i32, String, String)> = elb
        .describe_listeners()
        .load_balancer_arn(lb_arn)
        .send()
        .await
        .expect("listeners")
        .listeners
        .unwrap_or_default()
        .iter()
        .map(|l| {
            (
                l.port().unwrap_or_default(),
                l.protocol()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default(),
                name(
                    l.default_actions()
                        .first()
                        .and_then(|a| a.target_group_arn()),
                ),
            )
        })
        .collect();
    out.sort();
    out
}

fn mutating(p: &AwsProvider) -> BTreeMap<String, u64> {
    p.api_calls()
        .into_iter()
        .filter(|(op, _)| sharedlb_providers::aws::is_mutating(op))
        .collect()
}

fn diff(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(k, v)| {
            let d = v - before.get(k).copied().unwrap_or(0);
            (d > 0).then(|| (k.clone(), d))
        })
        .collect()
}

/// TCP and UDP of one owner on one port become one TCP_UDP listener and target group (AWS refuses two
/// listeners on one port); removing one protocol splits it back; the firewall follows exactly. A new port
/// costs 4 mutating calls, and ensuring it again costs none.
#[tokio::test]
async fn tcp_and_udp_on_one_port_share_one_tcp_udp_listener_and_split_back() {
    let net = network().await;
    let sg = net.node_security_group_id.clone().expect("sg");
    let p = AwsProvider::new("both", "p1", net).await.expect("provider");
    p.update_nodes(&[node("n1", "aws:///us-east-1a/i-0000000000000d001")])
        .await
        .expect("nodes");
    let key = LoadBalancerKey {
        cluster_id: "both".into(),
        pool: "p1".into(),
        index: 0,
    };
    let lb = p.ensure_load_balancer(&key).await.expect("nlb").id;
    let elb = elb().await;
    // construction made only reads; the NLB came with its groups and the node group's rules for them
    let prefix = p.api_calls();
    let made = [
        "CreateLoadBalancer",
        "CreateSecurityGroup",
        "AuthorizeSecurityGroupIngress",
    ];
    assert!(
        prefix
            .iter()
            .all(|(op, _)| !sharedlb_providers::aws::is_mutating(op) || made.contains(&op.as_str())),
        "{prefix:?}"
    );
    let (front, backend) = nlb_groups(&elb, &lb).await;

    let before = mutating(&p);
    let all_before: u64 = p.api_calls().iter().map(|(_, n)| n).sum();
    p.ensure_listener(&key, &spec(53, Protocol::Tcp, 31053, "dns", &[]))
        .await
        .expect("tcp");
    let all: u64 = p.api_calls().iter().map(|(_, n)| n).sum::<u64>() - all_before;
    eprintln!(
        "calls for a new port: {all} in all, of which mutating: {:?}",
        diff(&mutating(&p), &before)
    );
    let cost = diff(&mutating(&p), &before);
    assert_eq!(
        cost.keys().cloned().collect::<Vec<_>>(),
        [
            "AuthorizeSecurityGroupIngress",
            "CreateListener",
            "CreateTargetGroup",
            "RegisterTargets"
        ],
        "{cost:?}"
    );
    assert_eq!(
        cost.values().sum::<u64>(),
        4,
        "four mutating calls for a new port: {cost:?}"
    );
    let before = mutating(&p);
    p.ensure_listener(&key, &spec(53, Protocol::Tcp, 31053, "dns", &[]))
        .await
        .expect("again");
    assert_eq!(
        diff(&mutating(&p), &before),
        BTreeMap::new(),
        "a steady-state ensure changes nothing"
    );

    p.ensure_listener(&key, &spec(53, Protocol::Udp, 31053, "dns", &[]))
        .await
        .expect("udp");
    let suffix = |n: &str| {
        n.rsplit_once("-0-")
            .map(|(_, s)| s.to_string())
            .unwrap_or_default()
    };
    let got: Vec<(i32, String, String)> = listeners(&elb, &lb)
        .await
        .into_iter()
        .map(|(port, proto, tg)| (port, proto, suffix(&tg)))
        .collect();
    assert_eq!(
        got,
        vec![(53, "TCP_UDP".to_string(), "53b-31053".to_string())],
        "one merged listener"
    );
    let open = "0.0.0.0/0";
    assert_eq!(
        ingress(&front).await,
        vec![rule("tcp", 53, open), rule("udp", 53, open)],
        "both protocols on the listener port, nothing else"
    );
    assert_eq!(
        ingress(&sg).await,
        vec![],
        "no address rule in the node group"
    );
    assert_eq!(
        node_access(&sg).await,
        admits(&backend),
        "the node group admits the NLBs' backend group, kube-proxy's health port included"
    );
    let inv = p.inventory().await.expect("inventory");
    let l: Vec<(u16, Protocol, u16)> = inv.load_balancers[0]
        .listeners
        .iter()
        .map(|l| (l.port, l.protocol, l.node_port))
        .collect();
    assert_eq!(
        l,
        vec![(53, Protocol::Tcp, 31053), (53, Protocol::Udp, 31053)],
        "the inventory sees both"
    );
    assert_eq!(
        tg_names(&elb, &p).await,
        vec!["53b-31053".to_string()],
        "the single-protocol group is gone"
    );

    // a UDP-only port is health-checked on kube-proxy's port, a TCP one on its node port
    p.ensure_listener(
        &key,
        &spec(5000, Protocol::Udp, 31500, "u", &["198.51.100.0/24"]),
    )
    .await
    .expect("udp only");
    let hc = health_check(&elb, "5000u-31500").await;
    assert_eq!(hc, ("HTTP".to_string(), "10256".to_string()));
    assert_eq!(
        health_check(&elb, "53b-31053").await,
        ("TCP".to_string(), "traffic-port".to_string())
    );

    // removing UDP from port 53 leaves a TCP listener and only the TCP rule
    p.remove_listener(&key, 53, Protocol::Udp, "dns")
        .await
        .expect("split");
    let got: Vec<(i32, String, String)> = listeners(&elb, &lb)
        .await
        .into_iter()
        .map(|(port, proto, tg)| (port, proto, suffix(&tg)))
        .collect();
    assert_eq!(
        got,
        vec![
            (53, "TCP".to_string(), "53t-31053".to_string()),
            (5000, "UDP".to_string(), "5000u-31500".to_string())
        ]
    );
    assert_eq!(
        ingress(&front).await,
        vec![rule("tcp", 53, open), rule("udp", 5000, "198.51.100.0/24")],
        "only the TCP rule of port 53 stays"
    );
    // someone else's uid removes nothing
    p.remove_listener(&key, 53, Protocol::Tcp, "not-the-owner")
        .await
        .expect("noop");
    assert_eq!(listeners(&elb, &lb).await.len(), 2);

    p.remove_listener(&key, 53, Protocol::Tcp, "dns")
        .await
        .expect("tcp");
    p.remove_listener(&key, 5000, Protocol::Udp, "u")
        .await
        .expect("udp");
    assert!(listeners(&elb, &lb).await.is_empty());
    assert_eq!(
        ingress(&front).await,
        vec![],
        "every rule went with its port"
    );
    p.delete_load_balancer(&key).await.expect("delete");
    assert_eq!(
        node_access(&sg).await,
        vec![],
        "the node group's rules went with the last NLB"
    );
    assert!(tg_names(&elb, &p).await.is_empty());
}

/// Names (after `<prefix><index>-`) of the provider's target groups.
async fn tg_names(elb: &aws_sdk_elasticloadbalancingv2::Client, p: &AwsProvider) -> Vec<String> {
    let inv_prefix = p.name_prefix().to_string();
    let mut out: Vec<String> = elb
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default()
        .iter()
        .filter_map(|t| t.target_group_name()?.strip_prefix(&inv_prefix))
        .map(|n| {
            n.split_once('-')
                .map(|(_, s)| s.to_string())
                .unwrap_or_default()
        })
        .collect();
    out.sort();
    out
}

/// The target group whose name ends with `suffix`.
async fn target_group(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    suffix: &str,
) -> aws_sdk_elasticloadbalancingv2::types::TargetGroup {
    let tgs = elb
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default();
    tgs.into_iter()
        .find(|t| t.target_group_name().is_some_and(|n| n.ends_with(suffix)))
        .expect("group")
}

/// (protocol, port) of the health check of the target group whose name ends with `suffix`.
async fn health_check(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    suffix: &str,
) -> (String, String) {
    let t = target_group(elb, suffix).await;
    (
        t.health_check_protocol()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        t.health_check_port().unwrap_or_default().to_string(),
    )
}

/// The rule quota (`securityGroupRuleLimit`) bounds the ports of each NLB, in its own group; the node group no
/// longer caps the pool (it used to: 60 rules, less the foreign ones and kube-proxy's, for all NLBs together).
#[tokio::test]
async fn the_rule_quota_bounds_each_nlb_not_the_pool() {
    let mut net = network().await;
    let sg = net.node_security_group_id.clone().expect("sg");
    let ec2 = ec2().await;
    for port in [22, 443, 10250] {
        ec2.authorize_security_group_ingress()
            .group_id(&sg)
            .ip_protocol("tcp")
            .from_port(port)
            .to_port(port)
            .cidr_ip("10.0.0.0/8")
            .send()
            .await
            .expect("someone else's rule");
    }
    let p = AwsProvider::new("budget", "p", net.clone())
        .await
        .expect("provider");
    assert_eq!(p.limits().max_ports_total, None, "no pool-wide budget");
    assert_eq!(p.limits().max_ports_per_lb, 50, "the listener limit");
    net.security_group_rule_limit = Some(20);
    let p = AwsProvider::new("budget", "p", net.clone())
        .await
        .expect("provider");
    assert_eq!(
        p.limits().max_ports_per_lb,
        20,
        "a quota below 50 rules bounds each NLB"
    );
    assert_eq!(p.limits().max_ports_total, None);
    net.node_security_group_id = None;
    let p = AwsProvider::new("budget", "p", net)
        .await
        .expect("provider");
    assert_eq!(p.limits().max_ports_total, None);
    assert_eq!(p.limits().max_ports_per_lb, 20);
}

/// Without subnets, the provider finds the cluster's tagged ones (one per zone) and their VPC; Elastic IPs
/// cap the pool at one NLB per group of as many as there are subnets.
#[tokio::test]
async fn subnets_are_found_by_the_cluster_tag_and_elastic_ips_cap_the_pool() {
    let net = network().await;
    let ec2 = ec2().await;
    let cluster = format!("tagged-{}", fastrand::u32(..));
    let mut tagged = Vec::new();
    for (i, az) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let s = ec2
            .create_subnet()
            .vpc_id(&net.vpc_id)
            .cidr_block(format!("10.42.{}.0/24", 10 + i))
            .availability_zone(*az)
            .send()
            .await
            .expect("subnet")
            .subnet
            .and_then(|s| s.subnet_id)
            .expect("id");
        ec2.create_tags()
            .resources(&s)
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key(format!("kubernetes.io/cluster/{cluster}"))
                    .value("shared")
                    .build(),
            )
            .tags(
                aws_sdk_ec2::types::Tag::builder()
                    .key("kubernetes.io/role/elb")
                    .value("1")
                    .build(),
            )
            .send()
            .await
            .expect("tags");
        tagged.push(s);
    }
    tagged.sort();
    let mut eips = Vec::new();
    for _ in 0..3 {
        eips.push(
            ec2.allocate_address()
                .domain(aws_sdk_ec2::types::DomainType::Vpc)
                .send()
                .await
                .expect("eip")
                .allocation_id
                .expect("allocation"),
        );
    }
    let pool = AwsPool {
        region: "us-east-1".into(),
        eip_allocation_ids: eips,
        ..AwsPool::default()
    };
    let p = AwsProvider::new(&cluster, "p", pool)
        .await
        .expect("provider");
    let mut found = p.subnets().to_vec();
    found.sort();
    assert_eq!(
        found, tagged,
        "the tagged subnets, not the untagged ones of the same VPC"
    );
    assert_eq!(
        p.limits().max_lbs,
        Some(1),
        "3 Elastic IPs over 2 subnets is one NLB"
    );
    let key = |index| LoadBalancerKey {
        cluster_id: cluster.clone(),
        pool: "p".into(),
        index,
    };
    p.ensure_load_balancer(&key(0))
        .await
        .expect("the first NLB has its two EIPs");
    let e = p
        .ensure_load_balancer(&key(1))
        .await
        .expect_err("no EIPs left");
    assert!(matches!(e, ProviderError::QuotaExceeded(_)), "{e:?}");
    p.delete_load_balancer(&key(0)).await.expect("delete");

    let e = AwsProvider::new(
        "no-such-cluster",
        "p",
        AwsPool {
            region: "us-east-1".into(),
            ..AwsPool::default()
        },
    )
    .await
    .expect_err("nothing tagged");
    assert!(
        matches!(e, ProviderError::InvalidConfig(ref m) if m.contains("kubernetes.io/cluster/no-such-cluster")),
        "{e:?}"
    );
}

/// `sourceRanges` land on the NLB's own group, on the listener port (not the node port, not the node group),
/// and a change leaves exactly the new sources: narrowing revokes the wider rule, widening adds, going back to
/// open undoes both; a rule someone else added on the same port stays; ensuring the same ranges again writes
/// nothing.
#[tokio::test]
async fn a_changed_source_range_leaves_exactly_the_new_rules() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let p = AwsProvider::new("ranges", "p1", net.clone())
        .await
        .expect("provider");
    let key = LoadBalancerKey {
        cluster_id: "ranges".into(),
        pool: "p1".into(),
        index: 0,
    };
    let lb = p.ensure_load_balancer(&key).await.expect("nlb").id;
    let (sg, _) = nlb_groups(&elb().await, &lb).await;
    let theirs = aws_sdk_ec2::types::IpPermission::builder()
        .ip_protocol("tcp")
        .from_port(4100)
        .to_port(4100)
        .ip_ranges(
            aws_sdk_ec2::types::IpRange::builder()
                .cidr_ip("192.0.2.0/24")
                .build(),
        )
        .build();
    ec2()
        .await
        .authorize_security_group_ingress()
        .group_id(&sg)
        .ip_permissions(theirs)
        .send()
        .await
        .expect("a rule of someone else's");
    let sources = || async {
        ingress(&sg)
            .await
            .into_iter()
            .filter(|(proto, port, _)| proto == "tcp" && *port == 4100)
            .map(|(_, _, cidr)| cidr)
            .collect::<Vec<_>>()
    };
    let steps: [(&[&str], &[&str]); 4] = [
        (&[], &["0.0.0.0/0", "192.0.2.0/24"]),
        (&["198.51.100.0/24"], &["192.0.2.0/24", "198.51.100.0/24"]),
        (
            &["198.51.100.0/24", "203.0.113.0/24"],
            &["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"],
        ),
        (&[], &["0.0.0.0/0", "192.0.2.0/24"]),
    ];
    for (ranges, expected) in steps {
        p.ensure_listener(&key, &spec(4100, Protocol::Tcp, 31100, "o1", ranges))
            .await
            .expect("listener");
        assert_eq!(sources().await, expected, "sourceRanges {ranges:?}");
        assert_eq!(
            ingress(&sg).await.len(),
            expected.len(),
            "nothing on another port (the node port)"
        );
        assert_eq!(
            ingress(&node_sg).await,
            vec![],
            "nothing from the ranges in the node group"
        );
    }
    let before = mutating(&p);
    p.ensure_listener(&key, &spec(4100, Protocol::Tcp, 31100, "o1", &[]))
        .await
        .expect("listener again");
    assert_eq!(
        diff(&mutating(&p), &before),
        BTreeMap::new(),
        "nothing to write"
    );
    p.remove_listener(&key, 4100, Protocol::Tcp, "o1")
        .await
        .expect("remove");
    assert_eq!(sources().await, ["192.0.2.0/24"], "only their rule stays");
    p.delete_load_balancer(&key).await.expect("delete");
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![],
        "someone else's rule does not keep the group"
    );
}

/// The firewall opening a listener needs is read again once it is older than the recheck interval: a rule
/// deleted behind the operator's back comes back with the next ensure after that, not only after a restart (the
/// provider used to trust what it had opened for as long as it lived). Within the interval the group is not read.
/// The same holds for the node group's rules that admit the NLBs.
#[tokio::test]
async fn a_rule_deleted_behind_the_operators_back_comes_back_after_the_recheck_interval() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let key = LoadBalancerKey {
        cluster_id: "recheck".into(),
        pool: "p1".into(),
        index: 0,
    };
    let opened = |rules: Vec<(String, i32, String)>| {
        rules
            .into_iter()
            .any(|(proto, port, cidr)| proto == "tcp" && port == 4200 && cidr == "0.0.0.0/0")
    };
    let revoke = |sg: String| async move {
        let rule = aws_sdk_ec2::types::IpPermission::builder()
            .ip_protocol("tcp")
            .from_port(4200)
            .to_port(4200)
            .ip_ranges(
                aws_sdk_ec2::types::IpRange::builder()
                    .cidr_ip("0.0.0.0/0")
                    .build(),
            )
            .build();
        ec2()
            .await
            .revoke_security_group_ingress()
            .group_id(sg)
            .ip_permissions(rule)
            .send()
            .await
            .expect("revoke behind the operator's back");
    };
    let listener = spec(4200, Protocol::Tcp, 31200, "o1", &[]);

    // trusted for the interval: the deleted rule stays deleted, and nothing is read
    let trusting = AwsProvider::new("recheck", "p1", net.clone())
        .await
        .expect("provider");
    let lb = trusting.ensure_load_balancer(&key).await.expect("nlb").id;
    let (sg, backend) = nlb_groups(&elb().await, &lb).await;
    trusting
        .ensure_listener(&key, &listener)
        .await
        .expect("listener");
    assert!(opened(ingress(&sg).await));
    revoke(sg.clone()).await;
    let sg_reads = |p: &AwsProvider| {
        p.api_calls()
            .into_iter()
            .find(|(op, _)| op == "DescribeSecurityGroups")
            .map_or(0, |(_, calls)| calls)
    };
    let before = sg_reads(&trusting);
    trusting
        .ensure_listener(&key, &listener)
        .await
        .expect("again");
    assert_eq!(
        sg_reads(&trusting),
        before,
        "within the interval the group is not read"
    );
    assert!(!opened(ingress(&sg).await));

    // past the interval (zero here): read again, and the rule is back
    let rechecking = AwsProvider::new("recheck", "p1", net.clone())
        .await
        .expect("provider")
        .recheck_firewall_after(std::time::Duration::ZERO);
    let before = sg_reads(&rechecking);
    rechecking
        .ensure_listener(&key, &listener)
        .await
        .expect("listener");
    assert!(
        sg_reads(&rechecking) > before,
        "past the interval the group is read"
    );
    assert!(opened(ingress(&sg).await), "restored by the next ensure");
    // the node group's rules for the backend group come back the same way
    ec2()
        .await
        .revoke_security_group_ingress()
        .group_id(&node_sg)
        .set_ip_permissions(Some(group_sourced_permissions(&node_sg).await))
        .send()
        .await
        .expect("revoke the node group's rules behind the operator's back");
    assert_eq!(node_access(&node_sg).await, vec![]);
    rechecking
        .ensure_listener(&key, &listener)
        .await
        .expect("again");
    assert_eq!(node_access(&node_sg).await, admits(&backend));
    revoke(sg.clone()).await;
    rechecking
        .ensure_listener(&key, &listener)
        .await
        .expect("again");
    assert!(opened(ingress(&sg).await), "and again");
    rechecking
        .remove_listener(&key, 4200, Protocol::Tcp, "o1")
        .await
        .expect("remove");
    rechecking.delete_load_balancer(&key).await.expect("delete");
}

/// A pool on AWS's default quota of 60 rules per group holds more than 59 ports: two NLBs of 50 listeners each
/// (the 60th port used to be refused by the node group, which all the pool's NLBs shared). Each NLB's own group
/// holds its 50 rules; the node group holds only the three that admit the NLBs' backend group, however many
/// ports; the pool's deletion path (inventory, then delete each NLB) leaves no group and no rule behind.
#[tokio::test]
async fn a_default_quota_pool_holds_two_nlbs_of_50_ports_and_the_node_group_three_rules() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let p = AwsProvider::new("many", "p1", net.clone())
        .await
        .expect("provider");
    assert_eq!(p.limits().max_ports_per_lb, 50);
    assert_eq!(p.limits().max_ports_total, None, "no pool-wide cap");
    let elb = elb().await;
    let mut lbs = Vec::new();
    for index in 0..2u16 {
        let key = LoadBalancerKey {
            cluster_id: "many".into(),
            pool: "p1".into(),
            index: u32::from(index),
        };
        lbs.push(p.ensure_load_balancer(&key).await.expect("nlb").id);
        for i in 0..50u16 {
            let node_port = 30000 + index * 50 + i;
            let owner = format!("o{node_port}");
            p.ensure_listener(&key, &spec(5000 + i, Protocol::Tcp, node_port, &owner, &[]))
                .await
                .unwrap_or_else(|e| panic!("port {} of NLB {index}: {e}", 5000 + i));
        }
    }
    let mut fronts = Vec::new();
    let mut backends = Vec::new();
    for lb in &lbs {
        let (front, backend) = nlb_groups(&elb, lb).await;
        let rules = ingress(&front).await;
        assert_eq!(rules.len(), 50, "one rule per port in the NLB's own group");
        assert!(
            rules.iter().all(|(proto, port, cidr)| proto == "tcp"
                && (5000..5050).contains(port)
                && cidr == "0.0.0.0/0"),
            "{rules:?}"
        );
        fronts.push(front);
        backends.push(backend);
    }
    assert_ne!(fronts[0], fronts[1], "a group of its own per NLB");
    assert_eq!(backends[0], backends[1], "one backend group for the pool");
    assert_eq!(
        node_access(&node_sg).await,
        admits(&backends[0]),
        "100 ports, three rules in the node group"
    );
    assert_eq!(ingress(&node_sg).await, vec![], "and no address rule");
    let inv = p.inventory().await.expect("inventory");
    let ports: usize = inv.load_balancers.iter().map(|l| l.listeners.len()).sum();
    assert_eq!(ports, 100);

    // the pool's deletion: what the inventory lists is deleted, one NLB after the other
    for lb in &inv.load_balancers {
        let key = LoadBalancerKey {
            cluster_id: "many".into(),
            pool: "p1".into(),
            index: lb.index,
        };
        p.delete_load_balancer(&key).await.expect("delete");
        if lb.index == 0 {
            assert_eq!(
                our_groups(&net.vpc_id).await,
                vec![
                    (format!("{}1", p.name_prefix()), "frontend".to_string()),
                    (format!("{}backend", p.name_prefix()), "backend".to_string()),
                ],
                "the first NLB's group goes with it; the backend group stays for the other"
            );
            assert_eq!(node_access(&node_sg).await, admits(&backends[0]));
        }
    }
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![],
        "no group of ours left"
    );
    assert_eq!(node_access(&node_sg).await, vec![], "no rule of ours left");
    assert!(tg_names(&elb, &p).await.is_empty());
}

/// Makes a group as the provider names and tags it, as a crash right after making it would leave it.
async fn group_left_by_a_crash(
    p: &AwsProvider,
    vpc: &str,
    cluster: &str,
    pool: &str,
    index: u32,
) -> String {
    let tag = |k: &str, v: &str| aws_sdk_ec2::types::Tag::builder().key(k).value(v).build();
    ec2()
        .await
        .create_security_group()
        .group_name(format!("{}{index}", p.name_prefix()))
        .description("left by a crash")
        .vpc_id(vpc)
        .tag_specifications(
            aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::SecurityGroup)
                .tags(tag("sharedlb.dev/managed-by", "sharedlb"))
                .tags(tag("sharedlb.dev/cluster", cluster))
                .tags(tag("sharedlb.dev/pool", pool))
                .tags(tag("sharedlb.dev/security-group", "frontend"))
                .tags(tag("sharedlb.dev/index", &index.to_string()))
                .build(),
        )
        .send()
        .await
        .expect("group")
        .group_id
        .expect("id")
}

/// Level-triggered groups: a group made before a crash kept its NLB from being made is reused by the next
/// ensure (found by its tags, not made twice) or, when that NLB is never made, deleted by the next delete; an
/// NLB deleted before a crash kept its groups from going loses them when its deletion is retried.
#[tokio::test]
async fn groups_a_crash_left_are_reused_or_deleted() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let p = AwsProvider::new("crash", "p1", net.clone())
        .await
        .expect("provider");
    let key = |index| LoadBalancerKey {
        cluster_id: "crash".into(),
        pool: "p1".into(),
        index,
    };
    let elb = elb().await;
    let left = group_left_by_a_crash(&p, &net.vpc_id, "crash", "p1", 0).await;
    let orphan = group_left_by_a_crash(&p, &net.vpc_id, "crash", "p1", 5).await;
    let lb0 = p.ensure_load_balancer(&key(0)).await.expect("nlb 0").id;
    let (front0, backend) = nlb_groups(&elb, &lb0).await;
    assert_eq!(front0, left, "the group left by the crash is reused");
    let lb1 = p.ensure_load_balancer(&key(1)).await.expect("nlb 1").id;
    let (front1, _) = nlb_groups(&elb, &lb1).await;
    let prefix = p.name_prefix().to_string();
    let g = |n: &str, r: &str| (format!("{prefix}{n}"), r.to_string());
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![
            g("0", "frontend"),
            g("1", "frontend"),
            g("5", "frontend"),
            g("backend", "backend")
        ],
        "one group per NLB, one backend group, the orphan still there"
    );

    // NLB 1 deleted, then a crash before its groups went: the retried delete finds the NLB gone, deletes the
    // group, and the orphan of index 5 with it; NLB 0 keeps its groups and the node group's rules
    elb.delete_load_balancer()
        .load_balancer_arn(&lb1)
        .send()
        .await
        .expect("deleted before the crash");
    p.delete_load_balancer(&key(1))
        .await
        .expect("retried delete");
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![g("0", "frontend"), g("backend", "backend")],
        "{front1} and {orphan} are gone"
    );
    assert_eq!(node_access(&node_sg).await, admits(&backend));

    p.delete_load_balancer(&key(0)).await.expect("delete");
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![],
        "the last NLB takes the backend group"
    );
    assert_eq!(node_access(&node_sg).await, vec![]);

    // a group of the name that is not the pool's (no tags) is neither taken nor deleted
    let theirs = ec2()
        .await
        .create_security_group()
        .group_name(format!("{prefix}7"))
        .description("someone else's")
        .vpc_id(&net.vpc_id)
        .send()
        .await
        .expect("group")
        .group_id
        .expect("id");
    let e = p
        .ensure_load_balancer(&key(7))
        .await
        .expect_err("the name is taken");
    assert!(
        matches!(&e, ProviderError::AlreadyExists(m) if m.contains("did not make")),
        "{e:?}"
    );
    p.delete_load_balancer(&key(7)).await.expect("delete");
    assert_eq!(our_groups(&net.vpc_id).await, vec![]);
    ec2()
        .await
        .delete_security_group()
        .group_id(&theirs)
        .send()
        .await
        .expect("theirs is still there");
}

/// An NLB made before NLBs had security groups cannot be given any: its ports stay opened in the node group
/// (node port, from the ranges and the VPC), and while it is in the pool the node group's quota stays a
/// pool-wide budget. An NLB made beside it gets its own group. Deleting both leaves nothing.
#[tokio::test]
async fn an_nlb_made_before_security_groups_keeps_its_rules_in_the_node_group() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let elb = elb().await;
    let prefix = sharedlb_providers::cloud_name_prefix("old", "p1");
    let tag = |k: &str, v: &str| {
        aws_sdk_elasticloadbalancingv2::types::Tag::builder()
            .key(k)
            .value(v)
            .build()
    };
    elb.create_load_balancer()
        .name(format!("{prefix}0"))
        .r#type(aws_sdk_elasticloadbalancingv2::types::LoadBalancerTypeEnum::Network)
        .set_subnets(Some(net.subnet_ids.clone()))
        .tags(tag("sharedlb.dev/managed-by", "sharedlb"))
        .tags(tag("sharedlb.dev/cluster", "old"))
        .tags(tag("sharedlb.dev/pool", "p1"))
        .tags(tag("sharedlb.dev/index", "0"))
        .send()
        .await
        .expect("an NLB as the provider made them before");
    let p = AwsProvider::new("old", "p1", net.clone())
        .await
        .expect("provider");
    assert_eq!(
        p.limits().max_ports_total,
        Some(60 - 1 - 3),
        "the node group's quota, less kube-proxy's rule and the backend group's three"
    );
    let key = |index| LoadBalancerKey {
        cluster_id: "old".into(),
        pool: "p1".into(),
        index,
    };
    p.ensure_load_balancer(&key(0)).await.expect("found");
    p.ensure_listener(
        &key(0),
        &spec(6000, Protocol::Udp, 31600, "old", &["203.0.113.0/24"]),
    )
    .await
    .expect("listener on the old NLB");
    assert_eq!(
        ingress(&node_sg).await,
        vec![
            rule("tcp", 10256, "10.42.0.0/16"),
            rule("udp", 31600, "10.42.0.0/16"),
            rule("udp", 31600, "203.0.113.0/24"),
        ],
        "the node port from the ranges and the VPC, kube-proxy's port from the VPC"
    );
    assert_eq!(
        our_groups(&net.vpc_id).await,
        vec![],
        "no group for the old NLB"
    );

    let lb1 = p.ensure_load_balancer(&key(1)).await.expect("new").id;
    p.ensure_listener(&key(1), &spec(6000, Protocol::Tcp, 31601, "new", &[]))
        .await
        .expect("listener on the new NLB");
    let (front, backend) = nlb_groups(&elb, &lb1).await;
    assert_eq!(ingress(&front).await, vec![rule("tcp", 6000, "0.0.0.0/0")]);
    assert_eq!(node_access(&node_sg).await, admits(&backend));

    p.remove_listener(&key(0), 6000, Protocol::Udp, "old")
        .await
        .expect("remove");
    assert_eq!(
        ingress(&node_sg).await,
        vec![rule("tcp", 10256, "10.42.0.0/16")],
        "the old port's rules go with it"
    );
    p.delete_load_balancer(&key(0)).await.expect("delete old");
    assert_eq!(
        p.limits().max_ports_total,
        None,
        "no pool-wide budget once every NLB has its own group"
    );
    p.delete_load_balancer(&key(1)).await.expect("delete new");
    assert_eq!(ingress(&node_sg).await, vec![]);
    assert_eq!(node_access(&node_sg).await, vec![]);
    assert_eq!(our_groups(&net.vpc_id).await, vec![]);
}

/// Each NLB's target groups hold its few nodes per zone (rendezvous hashing), so ports per NLB no longer shrink
/// as zones grow; a node's arrival reads and changes the target groups of the NLBs it joins only.
#[tokio::test]
async fn each_nlb_targets_a_few_nodes_per_zone_and_churn_touches_only_its_own() {
    let mut net = network().await;
    net.target_nodes_per_zone = Some(1);
    let p = AwsProvider::new("subsets", "p1", net)
        .await
        .expect("provider");
    let zone = |i: usize| ["us-east-1a", "us-east-1b"][i % 2];
    let mut nodes: Vec<NodeTarget> = (0..6)
        .map(|i| {
            node(
                &format!("n{i}"),
                &format!("aws:///{}/i-00000000000{i:05}", zone(i)),
            )
        })
        .collect();
    p.update_nodes(&nodes).await.expect("nodes");
    let key = |index| LoadBalancerKey {
        cluster_id: "subsets".into(),
        pool: "p1".into(),
        index,
    };
    for i in 0..4 {
        p.ensure_load_balancer(&key(i)).await.expect("nlb");
        p.ensure_listener(
            &key(i),
            &spec(4000, Protocol::Tcp, 31000, &format!("o{i}"), &[]),
        )
        .await
        .expect("listener");
    }
    let elb = elb().await;
    let prefix = p.name_prefix().to_string();
    let all_targets = || async {
        let mut out = Vec::new();
        for i in 0..4 {
            out.push(targets(&elb, &format!("{prefix}{i}-4000t-31000")).await);
        }
        out
    };
    let before = all_targets().await;
    for t in &before {
        assert_eq!(t.len(), 2, "one node of each of the two zones: {t:?}");
    }
    let distinct: BTreeSet<&Vec<(String, i32)>> = before.iter().collect();
    assert!(
        distinct.len() > 1,
        "the NLBs share the nodes out: {before:?}"
    );

    let reads = |p: &AwsProvider| {
        p.api_calls()
            .into_iter()
            .find(|(op, _)| op == "DescribeTargetHealth")
            .map_or(0, |(_, n)| n)
    };
    let read_before = reads(&p);
    nodes.push(node("n6", "aws:///us-east-1a/i-0000000000000006"));
    p.update_nodes(&nodes).await.expect("a node added");
    let after = all_targets().await;
    let joined = after
        .iter()
        .filter(|t| t.iter().any(|(id, _)| id == "i-0000000000000006"))
        .count();
    assert!(
        joined > 0 && joined < 4,
        "the new node wins some NLBs: {after:?}"
    );
    for (b, a) in before.iter().zip(&after) {
        if !a.iter().any(|(id, _)| id == "i-0000000000000006") {
            assert_eq!(b, a, "an NLB the node did not join is unchanged");
        }
    }
    assert_eq!(
        reads(&p) - read_before,
        joined as u64,
        "only the target groups of NLBs whose subset moved are read"
    );

    // 600 nodes in one zone: 3 per zone leaves each NLB its 50 listeners (500 targets per zone per NLB)
    let mut big = network().await;
    big.target_nodes_per_zone = Some(3);
    let crowded = AwsProvider::new("subsets-big", "p1", big)
        .await
        .expect("provider");
    let many: Vec<NodeTarget> = (0..600)
        .map(|i| {
            node(
                &format!("m{i}"),
                &format!("aws:///us-east-1a/i-0000000000{i:07}"),
            )
        })
        .collect();
    crowded.update_nodes(&many).await.expect("nodes");
    assert_eq!(crowded.limits().max_ports_per_lb, 50);
}

/// A crash right after an NLB's deletion leaves its target groups and the pool's security groups: the pool's
/// deletion finds and deletes them (`delete_pool_leftovers`), and refuses while an NLB of the pool lives.
#[tokio::test]
async fn the_pools_deletion_removes_what_a_crashed_nlb_deletion_left() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let p = AwsProvider::new("leftovers", "p1", net.clone())
        .await
        .expect("provider");
    p.update_nodes(&[node("n1", "aws:///us-east-1a/i-0000000000000f001")])
        .await
        .expect("nodes");
    let key = LoadBalancerKey {
        cluster_id: "leftovers".into(),
        pool: "p1".into(),
        index: 0,
    };
    let info = p.ensure_load_balancer(&key).await.expect("nlb");
    p.ensure_listener(&key, &spec(4000, Protocol::Tcp, 31000, "o", &[]))
        .await
        .expect("listener");
    let e = p.delete_pool_leftovers().await.expect_err("an NLB lives");
    assert!(e.to_string().contains("still has NLBs"), "{e}");

    // the crash: the NLB is deleted, nothing after it
    let elb = elb().await;
    elb.delete_load_balancer()
        .load_balancer_arn(&info.id)
        .send()
        .await
        .expect("delete the NLB alone");
    assert!(
        !our_groups(&net.vpc_id).await.is_empty(),
        "left: the groups"
    );
    let prefix = p.name_prefix().to_string();
    let ours = || async {
        elb.describe_target_groups()
            .send()
            .await
            .expect("tgs")
            .target_groups
            .unwrap_or_default()
            .into_iter()
            .filter(|t| {
                t.target_group_name()
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .count()
    };
    assert_eq!(ours().await, 1, "left: the port's target group");

    p.delete_pool_leftovers().await.expect("leftovers deleted");
    assert_eq!(our_groups(&net.vpc_id).await, vec![]);
    assert_eq!(ours().await, 0);
    assert_eq!(
        node_access(&node_sg).await,
        vec![],
        "the node group admits nothing of ours"
    );
    p.delete_pool_leftovers()
        .await
        .expect("nothing left is success");
}

/// The target group whose name ends with `suffix`: its target type, its port, and its registered (id, port)
/// pairs, sorted.
async fn group_targets(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    suffix: &str,
) -> (String, Option<i32>, Vec<(String, i32)>) {
    let tg = elb
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default()
        .into_iter()
        .find(|t| t.target_group_name().is_some_and(|n| n.ends_with(suffix)))
        .unwrap_or_else(|| panic!("a target group named *{suffix}"));
    let h = elb
        .describe_target_health()
        .target_group_arn(tg.target_group_arn().expect("arn"))
        .send()
        .await
        .expect("health");
    let mut ids: Vec<(String, i32)> = h
        .target_health_descriptions
        .unwrap_or_default()
        .into_iter()
        .filter_map(|d| d.target)
        .map(|t| (t.id.unwrap_or_default(), t.port.unwrap_or_default()))
        .collect();
    ids.sort();
    let kind = tg.target_type().map(|t| t.as_str().to_string());
    (kind.unwrap_or_default(), tg.port(), ids)
}

fn backends(addrs: &[&str]) -> Vec<std::net::SocketAddr> {
    addrs.iter().map(|a| a.parse().expect("address")).collect()
}

/// `targets: Pods`: a port's target group holds the ready pods' IPs and ports, follows endpoint changes with one
/// register and one deregister, costs nothing when they did not change, ignores node churn, and the nodes' group
/// admits the backend group on every port instead of the node-port range. A pool that switches from node
/// targets gets the pod group behind the same listener, and the node-port rules go.
#[tokio::test]
async fn pod_targets_hold_the_ready_pods_and_follow_their_endpoints() {
    let net = network().await;
    let node_sg = net.node_security_group_id.clone().expect("sg");
    let key = LoadBalancerKey {
        cluster_id: "pods".into(),
        pool: "p1".into(),
        index: 0,
    };
    let nodes = [
        node("n1", "aws:///us-east-1a/i-0000000000000aaaa"),
        node("n2", "aws:///us-east-1b/i-0000000000000bbbb"),
    ];
    // first with node targets, as a pool made before it chose pods
    let by_node = AwsProvider::new("pods", "p1", net.clone())
        .await
        .expect("provider");
    by_node.update_nodes(&nodes).await.expect("nodes");
    let info = by_node.ensure_load_balancer(&key).await.expect("nlb");
    by_node
        .ensure_listener(&key, &spec(4000, Protocol::Tcp, 31000, "o1", &[]))
        .await
        .expect("listener");
    let (_, backend) = nlb_groups(&elb().await, &info.id).await;
    assert_eq!(node_access(&node_sg).await, admits(&backend));

    let p = AwsProvider::new(
        "pods",
        "p1",
        AwsPool {
            pod_targets: true,
            ..net
        },
    )
    .await
    .expect("provider");
    assert!(p.forwards_to_endpoints() && !p.needs_node_ports());
    p.update_nodes(&nodes).await.expect("nodes");
    let mut l = spec(4000, Protocol::Tcp, 31000, "o1", &[]);
    l.backends = backends(&["10.42.0.10:8080", "10.42.1.11:8080"]);
    p.ensure_listener(&key, &l).await.expect("pod listener");
    let elb = elb().await;
    let prefix = p.name_prefix().to_string();
    let (kind, _, ids) = group_targets(&elb, &format!("{prefix}0-4000t-ip")).await;
    assert_eq!(
        (kind.as_str(), ids),
        (
            "ip",
            vec![("10.42.0.10".into(), 8080), ("10.42.1.11".into(), 8080)]
        )
    );
    assert_eq!(
        tg_names(&elb, &p).await,
        vec!["4000t-ip".to_string()],
        "the node-target group is gone"
    );
    let on_port: Vec<_> = listeners(&elb, &info.id).await;
    assert_eq!(on_port.len(), 1, "one listener: {on_port:?}");
    let mut every_port = vec![
        ("tcp".to_string(), 0, 65535, backend.clone()),
        ("udp".to_string(), 0, 65535, backend.clone()),
    ];
    every_port.sort();
    assert_eq!(
        node_access(&node_sg).await,
        every_port,
        "the nodes admit the backend group on every port, and no longer on the node-port range"
    );

    // the endpoints move: one register, one deregister, exactly the new set
    let before = mutating(&p);
    l.backends = backends(&["10.42.1.11:8080", "10.42.0.12:8080"]);
    p.ensure_listener(&key, &l).await.expect("moved endpoints");
    assert_eq!(
        group_targets(&elb, &format!("{prefix}0-4000t-ip")).await.2,
        vec![("10.42.0.12".into(), 8080), ("10.42.1.11".into(), 8080)]
    );
    assert_eq!(
        diff(&mutating(&p), &before),
        BTreeMap::from([
            ("DeregisterTargets".to_string(), 1),
            ("RegisterTargets".to_string(), 1)
        ])
    );
    // the same endpoints again, and node churn: no change, and no target read
    let before = mutating(&p);
    let reads = |p: &AwsProvider| {
        p.api_calls()
            .into_iter()
            .find(|(op, _)| op == "DescribeTargetHealth")
            .map_or(0, |(_, n)| n)
    };
    let reads_before = reads(&p);
    p.ensure_listener(&key, &l).await.expect("same endpoints");
    p.update_nodes(&nodes[..1]).await.expect("a node gone");
    assert_eq!(diff(&mutating(&p), &before), BTreeMap::new());
    assert_eq!(reads(&p), reads_before);

    p.remove_listener(&key, 4000, Protocol::Tcp, "o1")
        .await
        .expect("removed");
    assert_eq!(tg_names(&elb, &p).await, Vec::<String>::new());
    p.delete_load_balancer(&key).await.expect("deleted");
    assert_eq!(node_access(&node_sg).await, vec![]);
}

/// `proxy_protocol_v2.enabled` of the target group whose name ends with `suffix`.
async fn proxy_protocol_attribute(
    elb: &aws_sdk_elasticloadbalancingv2::Client,
    suffix: &str,
) -> String {
    let arn = target_group(elb, suffix)
        .await
        .target_group_arn
        .expect("arn");
    elb.describe_target_group_attributes()
        .target_group_arn(arn)
        .send()
        .await
        .expect("attributes")
        .attributes
        .unwrap_or_default()
        .iter()
        .find(|a| a.key() == Some("proxy_protocol_v2.enabled"))
        .and_then(|a| a.value())
        .unwrap_or("unset")
        .to_string()
}

/// A SharedLB that asks for PROXY protocol v2 gets it on its TCP target groups, and loses it when it stops
/// asking; asking again without a change calls nothing.
#[tokio::test]
async fn proxy_protocol_is_a_target_group_attribute() {
    let net = network().await;
    let p = AwsProvider::new("ppv2", "p1", net).await.expect("provider");
    p.update_nodes(&[node("n1", "aws:///us-east-1a/i-0000000000000aaaa")])
        .await
        .expect("nodes");
    let key = LoadBalancerKey {
        cluster_id: "ppv2".into(),
        pool: "p1".into(),
        index: 0,
    };
    p.ensure_load_balancer(&key).await.expect("nlb");
    let with = |on: bool| sharedlb_providers::ListenerSpec {
        proxy_protocol: on,
        ..spec(4010, Protocol::Tcp, 31010, "pp", &[])
    };
    p.ensure_listener(&key, &with(true))
        .await
        .expect("listener");
    let elb = elb().await;
    assert_eq!(proxy_protocol_attribute(&elb, "4010t-31010").await, "true");
    let before = mutating(&p);
    p.ensure_listener(&key, &with(true)).await.expect("again");
    assert_eq!(
        diff(&mutating(&p), &before),
        BTreeMap::new(),
        "nothing to change, nothing called"
    );
    p.ensure_listener(&key, &with(false)).await.expect("off");
    assert_eq!(proxy_protocol_attribute(&elb, "4010t-31010").await, "false");
}
