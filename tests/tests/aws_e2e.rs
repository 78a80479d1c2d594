//! The aws provider end to end: the real apiserver, the operator in-process, moto as EC2/ELBv2 (started by
//! `scripts/test` with WITH_MOTO=1), Node objects with AWS provider IDs.
#![cfg(feature = "aws")]

use std::collections::BTreeSet;

use aws_sdk_elasticloadbalancingv2 as elb;
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use sharedlb_e2e::*;
use sharedlb_providers::memory::MemoryCloud;

async fn conf() -> aws_config::SdkConfig {
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
async fn network() -> (String, Vec<String>) {
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

async fn add_node(client: &Client, name: &str, zone: &str, instance: &str) {
    let api: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name}, "spec": {"providerID": format!("aws:///{zone}/{instance}")}
    }))
    .expect("node");
    let _ = api.create(&PostParams::default(), &node).await;
    let status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "ready", "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("node status");
}

/// Our NLBs (by the tags sharedlb puts on them) and our target groups' target counts.
async fn cloud(cluster: &str) -> (Vec<String>, Vec<usize>) {
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
            if td
                .tags
                .unwrap_or_default()
                .iter()
                .any(|t| t.key() == Some("sharedlb.dev/cluster") && t.value() == Some(cluster))
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_sharedlbs_make_two_nlbs_follow_nodes_and_leave_nothing_behind() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, subnets) = network().await;
    add_node(&client, "aws-n1", "us-east-1a", "i-00000000000000a01").await;
    add_node(&client, "aws-n2", "us-east-1b", "i-00000000000000b02").await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "aws", &[]).await;
    create_pool(
        &client,
        "aws",
        json!({"provider": {"aws": {"region": "us-east-1", "vpcId": vpc, "subnetIds": subnets}},
        "portRange": {"min": 4000, "max": 4999}}),
    )
    .await;
    for i in 0..60 {
        let protocol = if i % 3 == 0 { "UDP" } else { "TCP" };
        let spec = json!({"pool": "aws", "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80, "protocol": protocol}]});
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
    delete_pool(&client, "aws").await;
    let (nlbs, targets) = cloud("e2e").await;
    assert!(
        nlbs.is_empty() && targets.is_empty(),
        "moto holds nothing of the cluster: {nlbs:?} {}",
        targets.len()
    );
    for n in ["aws-n1", "aws-n2", "aws-n3"] {
        let _ = Api::<Node>::all(client.clone())
            .delete(n, &DeleteParams::default())
            .await;
    }
    op.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_subnet_is_a_condition_with_the_aws_message_and_nothing_half_made() {
    let _turn = SERIAL.lock().await;
    let client = client().await;
    let (vpc, _) = network().await;
    let op = Operator::start(&client, &MemoryCloud::new());
    let ns = namespace(&client, "aws-bad", &[]).await;
    create_pool(&client, "aws-bad", json!({"provider": {"aws": {"region": "us-east-1", "vpcId": vpc, "subnetIds": ["subnet-0000000000000dead"]}}})).await;
    create_slb(&client, &ns, "x", json!({"pool": "aws-bad", "selector": {"app": "x"}, "ports": [{"name": "p", "targetPort": 80}]})).await;
    let api: Api<sharedlb_crds::SharedLB> = Api::namespaced(client.clone(), &ns);
    let (reason, msg) = eventually(60, "a cloud condition", || async {
        let (st, r, m) = condition(&api.get("x").await.ok()?, "Programmed")?;
        (st == "False").then_some((r, m))
    })
    .await;
    assert!(reason.starts_with("Cloud"), "{reason}");
    assert!(
        msg.contains("subnet"),
        "AWS's message reaches the user: {msg}"
    );
    eventually(10, "an Event with the cloud reason", || async {
        event_reasons(&client, &ns, "x")
            .await
            .contains(&reason)
            .then_some(())
    })
    .await;
    // the other aws test deletes all it makes, so any NLB of the cluster now would be this pool's
    let (nlbs, _) = cloud("e2e").await;
    assert!(nlbs.is_empty(), "nothing half-made: {nlbs:?}");
    delete_namespace(&client, &ns).await;
    delete_pool(&client, "aws-bad").await;
    op.kill().await;
}
