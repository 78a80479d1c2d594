//! The aws provider against moto (a real server speaking the EC2 and ELBv2 APIs), started by
//! `WITH_MOTO=1 scripts/test-env up`; the official SDK clients talk to it through AWS_ENDPOINT_URL.
#![cfg(feature = "aws")]

use std::sync::Arc;

use sharedlb_providers::aws::{AwsPool, AwsProvider, instance_id};
use sharedlb_providers::{
    ListenerSpec, LoadBalancerKey, LoadBalancerProvider, NodeTarget, Owner, Protocol, ProviderError,
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
    let l = ListenerSpec {
        port: 4000,
        protocol: Protocol::Udp,
        node_port: 31000,
        owner: Owner {
            uid: "u1".into(),
            namespace: "ns".into(),
            name: "dns".into(),
        },
        source_ranges: vec!["203.0.113.0/24".into()],
        backends: vec![],
    };
    p.ensure_listener(&key, &l).await.expect("listener");

    let ec2 = ec2().await;
    let rules = ec2
        .describe_security_groups()
        .group_ids(&sg)
        .send()
        .await
        .expect("sg")
        .security_groups
        .expect("groups");
    let perms: Vec<_> = rules[0]
        .ip_permissions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.from_port == Some(31000))
        .collect();
    assert_eq!(perms.len(), 1, "one rule for the node port: {perms:?}");
    assert_eq!(
        (perms[0].ip_protocol.as_deref(), perms[0].to_port),
        (Some("udp"), Some(31000)),
        "exactly the node port"
    );
    let cidrs: Vec<String> = perms[0]
        .ip_ranges
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.cidr_ip)
        .collect();
    assert!(
        cidrs.contains(&"203.0.113.0/24".to_string())
            && cidrs.contains(&"10.42.0.0/16".to_string()),
        "{cidrs:?}"
    );
    assert!(
        !cidrs.contains(&"0.0.0.0/0".to_string()),
        "not open to the world when sourceRanges say otherwise"
    );

    let inv = p.inventory().await.expect("inventory");
    assert_eq!(inv.load_balancers[0].listeners.len(), 1);
    assert_eq!(inv.load_balancers[0].listeners[0].node_port, 31000);

    // targets: the nodes, on the node port; a node added is registered, a node gone is deregistered
    let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await;
    let elb = aws_sdk_elasticloadbalancingv2::Client::new(&conf);
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
    let rules = ec2
        .describe_security_groups()
        .group_ids(&sg)
        .send()
        .await
        .expect("sg")
        .security_groups
        .expect("groups");
    assert!(
        rules[0]
            .ip_permissions
            .clone()
            .unwrap_or_default()
            .iter()
            .all(|r| r.from_port != Some(31000)),
        "the rule goes with the port"
    );
    p.delete_load_balancer(&key).await.expect("delete");
    assert!(
        p.inventory()
            .await
            .expect("inventory")
            .load_balancers
            .is_empty()
    );
}

#[tokio::test]
async fn a_missing_vpc_or_subnet_is_an_error_by_meaning() {
    let mut net = network().await;
    net.subnet_ids = vec!["subnet-0000000000000dead".into()];
    let p = AwsProvider::new("bad", "p", net).await.expect("provider");
    let key = LoadBalancerKey {
        cluster_id: "bad".into(),
        pool: "p".into(),
        index: 0,
    };
    let e = p
        .ensure_load_balancer(&key)
        .await
        .expect_err("no such subnet");
    assert!(
        matches!(
            e,
            ProviderError::InvalidConfig(_) | ProviderError::NotFound(_)
        ),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("subnet"),
        "AWS's message is kept: {e}"
    );
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
    let tgs = elb
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default();
    let tg = tgs
        .into_iter()
        .find(|t| t.target_group_name().is_some_and(|n| n.ends_with(suffix)))
        .expect("the port's target group");
    assert_eq!(
        tg.port(),
        Some(31000),
        "the target group is on the node port"
    );
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
        .filter_map(|d| {
            d.target
                .map(|t| (t.id.unwrap_or_default(), t.port.unwrap_or_default()))
        })
        .collect();
    ids.sort();
    ids
}

fn node(name: &str, provider_id: &str) -> NodeTarget {
    NodeTarget {
        name: name.into(),
        provider_id: Some(provider_id.into()),
        internal_ip: None,
    }
}
