//! moto as the AWS account (started by `scripts/test` with WITH_MOTO=1).

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
