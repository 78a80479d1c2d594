//! moto as the AWS account (started by `scripts/test` with WITH_MOTO=1).

use std::collections::BTreeSet;
use std::sync::Arc;

use aws_sdk_elasticloadbalancingv2 as elb;
use kube::{Api, Client};
use sharedlb::{BuiltinProviders, ProviderFactory};
use sharedlb_crds::LoadBalancerPool;
use sharedlb_providers::LoadBalancerProvider;
use sharedlb_providers::memory::MemoryCloud;

pub async fn conf() -> aws_config::SdkConfig {
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        "needs moto: run through scripts/test"
    );
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .load()
        .await
}

/// A VPC and two subnets in moto: (vpc id, subnet ids).
pub async fn network() -> (String, Vec<String>) {
    let ec2 = aws_sdk_ec2::Client::new(&conf().await);
    let vpc = ec2
        .create_vpc()
        .cidr_block("10.77.0.0/16")
        .send()
        .await
        .expect("vpc")
        .vpc
        .and_then(|v| v.vpc_id)
        .expect("vpc id");
    let mut subnets = Vec::new();
    for (i, az) in ["us-east-1a", "us-east-1b"].iter().enumerate() {
        let s = ec2
            .create_subnet()
            .vpc_id(&vpc)
            .cidr_block(format!("10.77.{i}.0/24"))
            .availability_zone(*az)
            .send()
            .await;
        subnets.push(
            s.expect("subnet")
                .subnet
                .and_then(|s| s.subnet_id)
                .expect("subnet id"),
        );
    }
    (vpc, subnets)
}

/// Our NLBs (by the tags sharedlb puts on them) and our target groups' target counts.
pub async fn cloud(cluster: &str) -> (Vec<String>, Vec<usize>) {
    cloud_of(cluster, None).await
}

/// The same, for one pool only when `pool` is given.
pub async fn cloud_of(cluster: &str, pool: Option<&str>) -> (Vec<String>, Vec<usize>) {
    let c = elb::Client::new(&conf().await);
    let lbs = c
        .describe_load_balancers()
        .send()
        .await
        .expect("lbs")
        .load_balancers
        .unwrap_or_default();
    let tgs = c
        .describe_target_groups()
        .send()
        .await
        .expect("tgs")
        .target_groups
        .unwrap_or_default();
    let mut arns: Vec<String> = lbs
        .iter()
        .filter_map(|l| l.load_balancer_arn.clone())
        .collect();
    arns.extend(tgs.iter().filter_map(|t| t.target_group_arn.clone()));
    let mut ours = BTreeSet::new();
    for chunk in arns.chunks(20) {
        let d = c
            .describe_tags()
            .set_resource_arns(Some(chunk.to_vec()))
            .send()
            .await
            .expect("tags");
        for td in d.tag_descriptions.unwrap_or_default() {
            let has = |k: &str, v: &str| {
                td.tags()
                    .iter()
                    .any(|t| t.key() == Some(k) && t.value() == Some(v))
            };
            if has("sharedlb.dev/cluster", cluster)
                && pool.is_none_or(|p| has("sharedlb.dev/pool", p))
            {
                ours.insert(td.resource_arn.unwrap_or_default());
            }
        }
    }
    let names = lbs
        .iter()
        .filter(|l| {
            l.load_balancer_arn
                .as_ref()
                .is_some_and(|a| ours.contains(a))
        })
        .filter_map(|l| l.load_balancer_name.clone())
        .collect();
    let mut targets = Vec::new();
    for t in tgs.iter().filter(|t| {
        t.target_group_arn
            .as_ref()
            .is_some_and(|a| ours.contains(a))
    }) {
        let h = c
            .describe_target_health()
            .target_group_arn(t.target_group_arn.clone().unwrap_or_default())
            .send()
            .await
            .expect("health");
        targets.push(h.target_health_descriptions.unwrap_or_default().len());
    }
    (names, targets)
}

/// The operator's own provider for a pool as it stands in the apiserver, to read moto as the operator does.
pub async fn provider_of(
    client: &Client,
    cluster_id: &str,
    pool: &str,
) -> Arc<dyn LoadBalancerProvider> {
    let spec = Api::<LoadBalancerPool>::all(client.clone())
        .get(pool)
        .await
        .expect("pool")
        .spec;
    BuiltinProviders::new(MemoryCloud::new())
        .make(cluster_id, pool, &spec)
        .await
        .expect("the pool's provider")
}
