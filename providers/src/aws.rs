//! AWS: each load balancer of a pool is a Network Load Balancer the operator creates and owns; each allocated
//! port is a target group (instance targets on the node port, TCP health check) and a listener forwarding to it;
//! the nodes' security group gets exactly the node port, from `sourceRanges`, plus the VPC for health checks.
//!
//! Names are deterministic (`slb-<hash of cluster/pool>-<index>`, target groups add port, protocol and node
//! port), so a retry after a crash finds what exists instead of duplicating it; everything carries the
//! sharedlb tags, which is how `inventory` finds it. Built behind the `aws` feature with the official SDK.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;
use std::time::Duration;

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elb;
use elb::error::{DisplayErrorContext, ProvideErrorMetadata};
use elb::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum, Tag,
    TargetDescription, TargetTypeEnum,
};

use crate::{
    Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec, LoadBalancerInfo,
    LoadBalancerKey, LoadBalancerProvider, NodeTarget, PortMode, Protocol, ProviderError, tags,
};

/// AWS's hard limit on listeners per Network Load Balancer (moto does not enforce it: the planner must).
pub const MAX_LISTENERS_PER_NLB: u32 = 50;
/// Registered targets per Availability Zone per NLB, counted as nodes x target groups.
pub const MAX_TARGETS_PER_AZ: u32 = 500;

const TAG_PORT: &str = "sharedlb.dev/port";
const TAG_PROTOCOL: &str = "sharedlb.dev/protocol";
const TAG_NODE_PORT: &str = "sharedlb.dev/node-port";

/// The pool's AWS settings, as the provider needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsPool {
    pub region: String,
    pub vpc_id: String,
    pub subnet_ids: Vec<String>,
    pub node_security_group_id: Option<String>,
    pub internal: bool,
}

#[derive(Debug)]
pub struct AwsProvider {
    elb: elb::Client,
    ec2: ec2::Client,
    cluster_id: String,
    pool: String,
    settings: AwsPool,
    prefix: String,
    nodes: RwLock<Vec<NodeTarget>>,
    /// Find-or-create of a load balancer is one step at a time: SharedLBs placed on one new load balancer
    /// reconcile concurrently, and each would otherwise create it (moto makes duplicates; AWS is idempotent by
    /// name only while the settings match).
    creating: tokio::sync::Mutex<()>,
    vpc_cidr: tokio::sync::OnceCell<Option<String>>,
}

/// Maps any SDK error to an error by meaning, keeping AWS's code and message for the condition.
fn classify<E, R>(op: &str, e: elb::error::SdkError<E, R>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().unwrap_or("").to_string();
    let msg = format!("aws {op}: {}", DisplayErrorContext(&e));
    match code.as_str() {
        c if c.contains("NotFound") => ProviderError::NotFound(msg),
        "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TooManyRequestsException" => ProviderError::Throttled {
            retry_after: Duration::from_secs(2),
            message: msg,
        },
        c if c.contains("Duplicate") || c.contains("AlreadyExists") => {
            ProviderError::AlreadyExists(msg)
        }
        c if c.starts_with("TooMany") || c.contains("LimitExceeded") => {
            ProviderError::QuotaExceeded(msg)
        }
        c if c.starts_with("Invalid")
            || c.starts_with("AuthFailure")
            || c.contains("AccessDenied")
            || c.contains("UnrecognizedClient")
            || c == "ValidationError" =>
        {
            ProviderError::InvalidConfig(msg)
        }
        _ => ProviderError::Other(msg),
    }
}

/// What an idempotent step may find already done.
#[derive(Debug, Clone, Copy)]
enum Already {
    /// a delete or revoke of something that is not there
    Gone,
    /// an opening or create of something that is there
    Exists,
}

/// An idempotent step: the error that means "already as wanted" is success; every other error stays one.
fn already_done(r: Result<(), ProviderError>, already: Already) -> Result<(), ProviderError> {
    match (r, already) {
        (Err(ProviderError::NotFound(_)), Already::Gone)
        | (Err(ProviderError::AlreadyExists(_)), Already::Exists) => Ok(()),
        (other, _) => other,
    }
}

fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

fn proto(p: Protocol) -> ProtocolEnum {
    match p {
        Protocol::Tcp => ProtocolEnum::Tcp,
        Protocol::Udp => ProtocolEnum::Udp,
    }
}

fn tag(k: &str, v: impl Into<String>) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// `aws:///us-east-1a/i-0123456789abcdef0` -> `i-0123456789abcdef0`
pub fn instance_id(provider_id: &str) -> Option<&str> {
    provider_id
        .strip_prefix("aws://")?
        .rsplit('/')
        .next()
        .filter(|i| i.starts_with("i-"))
}

impl AwsProvider {
    /// Credentials and endpoint from the environment (IRSA, instance profile, or `AWS_ENDPOINT_URL` for moto).
    pub async fn new(
        cluster_id: &str,
        pool: &str,
        settings: AwsPool,
    ) -> Result<Self, ProviderError> {
        if settings.region.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "aws: region is required".into(),
            ));
        }
        if settings.vpc_id.is_empty() || settings.subnet_ids.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "aws: vpcId and subnetIds are required (discovery by cluster tag is not implemented yet)".into(),
            ));
        }
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .load()
            .await;
        Ok(AwsProvider {
            elb: elb::Client::new(&conf),
            ec2: ec2::Client::new(&conf),
            cluster_id: cluster_id.into(),
            pool: pool.into(),
            prefix: format!("slb-{:08x}-", fnv(&format!("{cluster_id}/{pool}"))),
            settings,
            nodes: RwLock::new(Vec::new()),
            creating: tokio::sync::Mutex::new(()),
            vpc_cidr: tokio::sync::OnceCell::new(),
        })
    }

    fn lb_name(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    fn tg_name(&self, index: u32, port: u16, protocol: Protocol, node_port: u16) -> String {
        let p = match protocol {
            Protocol::Tcp => 't',
            Protocol::Udp => 'u',
        };
        format!("{}{index}-{port}{p}-{node_port}", self.prefix)
    }

    fn base_tags(&self, index: u32) -> Vec<Tag> {
        vec![
            tag(tags::MANAGED_BY, "sharedlb"),
            tag(tags::CLUSTER, &self.cluster_id),
            tag(tags::POOL, &self.pool),
            tag(tags::INDEX, index.to_string()),
        ]
    }

    async fn find_lb(&self, index: u32) -> Result<Option<elb::types::LoadBalancer>, ProviderError> {
        match self
            .elb
            .describe_load_balancers()
            .names(self.lb_name(index))
            .send()
            .await
        {
            Ok(out) => Ok(out.load_balancers.unwrap_or_default().into_iter().next()),
            Err(e) => match classify("describe_load_balancers", e) {
                ProviderError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn tags_of(
        &self,
        arns: &[String],
    ) -> Result<BTreeMap<String, BTreeMap<String, String>>, ProviderError> {
        let mut out = BTreeMap::new();
        for chunk in arns.chunks(20) {
            let r = self
                .elb
                .describe_tags()
                .set_resource_arns(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| classify("describe_tags", e))?;
            for d in r.tag_descriptions.unwrap_or_default() {
                let t = d
                    .tags
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|t| Some((t.key?, t.value?)))
                    .collect();
                out.insert(d.resource_arn.unwrap_or_default(), t);
            }
        }
        Ok(out)
    }

    fn ours(&self, t: &BTreeMap<String, String>) -> bool {
        t.get(tags::CLUSTER) == Some(&self.cluster_id) && t.get(tags::POOL) == Some(&self.pool)
    }

    /// This load balancer's target groups (by name prefix, confirmed by tags), with their tags.
    async fn target_groups(
        &self,
        index: u32,
    ) -> Result<Vec<(elb::types::TargetGroup, BTreeMap<String, String>)>, ProviderError> {
        self.target_groups_named(&format!("{}{index}-", self.prefix))
            .await
    }

    /// Target groups whose name starts with `prefix` and whose tags say they are this pool's, with the tags.
    async fn target_groups_named(
        &self,
        prefix: &str,
    ) -> Result<Vec<(elb::types::TargetGroup, BTreeMap<String, String>)>, ProviderError> {
        let mut all = Vec::new();
        let mut pages = self.elb.describe_target_groups().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("describe_target_groups", e))?;
            all.extend(
                page.target_groups
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.target_group_name().is_some_and(|n| n.starts_with(prefix))),
            );
        }
        let arns: Vec<String> = all
            .iter()
            .filter_map(|t| t.target_group_arn().map(str::to_string))
            .collect();
        let tags = self.tags_of(&arns).await?;
        Ok(all
            .into_iter()
            .filter_map(|t| {
                let tg_tags = tags.get(t.target_group_arn()?)?.clone();
                self.ours(&tg_tags).then_some((t, tg_tags))
            })
            .collect())
    }

    fn targets(&self, node_port: u16) -> Vec<TargetDescription> {
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        nodes
            .iter()
            .filter_map(|n| instance_id(n.provider_id.as_deref()?))
            .map(|id| {
                TargetDescription::builder()
                    .id(id)
                    .port(i32::from(node_port))
                    .build()
            })
            .collect()
    }

    /// The VPC's CIDR (health checks come from it): asked once, as it does not change under a pool.
    async fn vpc_cidr(&self) -> Result<Option<String>, ProviderError> {
        self.vpc_cidr
            .get_or_try_init(|| async {
                let r = self
                    .ec2
                    .describe_vpcs()
                    .vpc_ids(&self.settings.vpc_id)
                    .send()
                    .await
                    .map_err(|e| classify("describe_vpcs", e))?;
                Ok(r.vpcs
                    .unwrap_or_default()
                    .into_iter()
                    .next()
                    .and_then(|v| v.cidr_block))
            })
            .await
            .cloned()
    }

    /// The ingress one listener needs: its node port from the client ranges (the NLB keeps client IPs) and from
    /// the VPC (health checks). Nothing wider.
    async fn permissions(
        &self,
        l_protocol: Protocol,
        node_port: u16,
        ranges: &[String],
    ) -> Result<Vec<ec2::types::IpPermission>, ProviderError> {
        let mut cidrs: BTreeSet<String> = if ranges.is_empty() {
            ["0.0.0.0/0".to_string()].into()
        } else {
            ranges.iter().cloned().collect()
        };
        if let Some(vpc) = self.vpc_cidr().await? {
            cidrs.insert(vpc);
        }
        let ip_ranges = cidrs
            .into_iter()
            .filter(|c| !c.contains(':'))
            .map(|c| {
                ec2::types::IpRange::builder()
                    .cidr_ip(c)
                    .description(format!("sharedlb {}/{}", self.cluster_id, self.pool))
                    .build()
            })
            .collect();
        Ok(vec![
            ec2::types::IpPermission::builder()
                .ip_protocol(l_protocol.as_str().to_lowercase())
                .from_port(i32::from(node_port))
                .to_port(i32::from(node_port))
                .set_ip_ranges(Some(ip_ranges))
                .build(),
        ])
    }

    async fn open_firewall(
        &self,
        protocol: Protocol,
        node_port: u16,
        ranges: &[String],
    ) -> Result<(), ProviderError> {
        let Some(sg) = &self.settings.node_security_group_id else {
            return Ok(());
        };
        let perms = self.permissions(protocol, node_port, ranges).await?;
        already_done(
            self.ec2
                .authorize_security_group_ingress()
                .group_id(sg)
                .set_ip_permissions(Some(perms))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("authorize_security_group_ingress", e)),
            Already::Exists,
        )
    }

    async fn close_firewall(
        &self,
        protocol: Protocol,
        node_port: u16,
    ) -> Result<(), ProviderError> {
        let Some(sg) = &self.settings.node_security_group_id else {
            return Ok(());
        };
        // revoke exactly the rules sharedlb added for this node port, whatever their sources
        let r = self
            .ec2
            .describe_security_groups()
            .group_ids(sg)
            .send()
            .await
            .map_err(|e| classify("describe_security_groups", e))?;
        let mine = format!("sharedlb {}/{}", self.cluster_id, self.pool);
        let perms: Vec<ec2::types::IpPermission> = r
            .security_groups
            .unwrap_or_default()
            .into_iter()
            .flat_map(|g| g.ip_permissions.unwrap_or_default())
            .filter(|p| {
                p.from_port == Some(i32::from(node_port))
                    && p.ip_protocol.as_deref() == Some(protocol.as_str().to_lowercase().as_str())
            })
            .filter_map(|p| {
                let ranges: Vec<_> = p
                    .ip_ranges
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| r.description.as_deref() == Some(&mine))
                    .collect();
                (!ranges.is_empty()).then(|| {
                    ec2::types::IpPermission::builder()
                        .ip_protocol(protocol.as_str().to_lowercase())
                        .from_port(i32::from(node_port))
                        .to_port(i32::from(node_port))
                        .set_ip_ranges(Some(ranges))
                        .build()
                })
            })
            .collect();
        if perms.is_empty() {
            return Ok(());
        }
        already_done(
            self.ec2
                .revoke_security_group_ingress()
                .group_id(sg)
                .set_ip_permissions(Some(perms))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("revoke_security_group_ingress", e)),
            Already::Gone,
        )
    }

    /// Deletes a target group and its firewall opening (its listener must be gone).
    async fn drop_target_group(
        &self,
        tg: &elb::types::TargetGroup,
        t: &BTreeMap<String, String>,
    ) -> Result<(), ProviderError> {
        if let Some(arn) = tg.target_group_arn() {
            already_done(
                self.elb
                    .delete_target_group()
                    .target_group_arn(arn)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("delete_target_group", e)),
                Already::Gone,
            )?;
        }
        let protocol = if t.get(TAG_PROTOCOL).map(String::as_str) == Some("UDP") {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        if let Some(np) = t.get(TAG_NODE_PORT).and_then(|p| p.parse().ok()) {
            self.close_firewall(protocol, np).await?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for AwsProvider {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn limits(&self) -> Limits {
        // targets per AZ are nodes x target groups: the busiest zone's node count bounds target groups per NLB
        let nodes = self.nodes.read().unwrap_or_else(|e| e.into_inner());
        let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
        for n in nodes.iter() {
            let zone = n
                .provider_id
                .as_deref()
                .and_then(|p| p.strip_prefix("aws:///")?.split('/').next())
                .unwrap_or("");
            *per_zone.entry(zone).or_default() += 1;
        }
        let busiest = per_zone.values().copied().max().unwrap_or(1).max(1);
        Limits {
            max_ports_per_lb: MAX_LISTENERS_PER_NLB
                .min(MAX_TARGETS_PER_AZ / busiest)
                .max(1),
            max_lbs: None,
            port_mode: PortMode::PerLoadBalancer,
        }
    }

    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        let _one_at_a_time = self.creating.lock().await;
        let existing = match self.find_lb(lb.index).await? {
            Some(l) => l,
            None => {
                let scheme = if self.settings.internal {
                    LoadBalancerSchemeEnum::Internal
                } else {
                    LoadBalancerSchemeEnum::InternetFacing
                };
                let out = self
                    .elb
                    .create_load_balancer()
                    .name(self.lb_name(lb.index))
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(scheme)
                    .set_subnets(Some(self.settings.subnet_ids.clone()))
                    .set_tags(Some(self.base_tags(lb.index)))
                    .send()
                    .await
                    .map_err(|e| classify("create_load_balancer", e))?;
                out.load_balancers
                    .unwrap_or_default()
                    .into_iter()
                    .next()
                    .ok_or_else(|| {
                        ProviderError::Other("aws: create_load_balancer returned nothing".into())
                    })?
            }
        };
        let arn = existing.load_balancer_arn().unwrap_or_default().to_string();
        let t = self.tags_of(std::slice::from_ref(&arn)).await?;
        if !t.get(&arn).is_some_and(|t| self.ours(t)) {
            return Err(ProviderError::AlreadyExists(format!(
                "aws: a load balancer named {} exists that sharedlb did not make for this cluster and pool",
                self.lb_name(lb.index)
            )));
        }
        Ok(LoadBalancerInfo {
            id: arn,
            ip: None,
            hostname: existing.dns_name().map(str::to_string),
        })
    }

    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        let nlb = self
            .find_lb(lb.index)
            .await?
            .ok_or_else(|| ProviderError::NotFound(format!("aws: {}", lb.name())))?;
        let lb_arn = nlb.load_balancer_arn().unwrap_or_default().to_string();
        let name = self.tg_name(lb.index, l.port, l.protocol, l.node_port);
        let tgs = self.target_groups(lb.index).await?;
        let tg_arn = match tgs
            .iter()
            .find(|(t, _)| t.target_group_name() == Some(name.as_str()))
        {
            Some((t, _)) => t.target_group_arn().unwrap_or_default().to_string(),
            None => {
                let mut t = self.base_tags(lb.index);
                t.push(tag(tags::OWNER_UID, &l.owner.uid));
                t.push(tag(TAG_PORT, l.port.to_string()));
                t.push(tag(TAG_PROTOCOL, l.protocol.as_str()));
                t.push(tag(TAG_NODE_PORT, l.node_port.to_string()));
                let out = self
                    .elb
                    .create_target_group()
                    .name(&name)
                    .protocol(proto(l.protocol))
                    .port(i32::from(l.node_port))
                    .vpc_id(&self.settings.vpc_id)
                    .target_type(TargetTypeEnum::Instance)
                    .health_check_protocol(ProtocolEnum::Tcp)
                    .set_tags(Some(t))
                    .send()
                    .await
                    .map_err(|e| classify("create_target_group", e))?;
                out.target_groups
                    .unwrap_or_default()
                    .into_iter()
                    .next()
                    .and_then(|t| t.target_group_arn)
                    .ok_or_else(|| {
                        ProviderError::Other("aws: create_target_group returned nothing".into())
                    })?
            }
        };
        let targets = self.targets(l.node_port);
        if !targets.is_empty() {
            self.elb
                .register_targets()
                .target_group_arn(&tg_arn)
                .set_targets(Some(targets))
                .send()
                .await
                .map_err(|e| classify("register_targets", e))?;
        }
        self.open_firewall(l.protocol, l.node_port, &l.source_ranges)
            .await?;
        let listeners = self
            .elb
            .describe_listeners()
            .load_balancer_arn(&lb_arn)
            .send()
            .await
            .map_err(|e| classify("describe_listeners", e))?
            .listeners
            .unwrap_or_default();
        let forward = Action::builder()
            .r#type(ActionTypeEnum::Forward)
            .target_group_arn(&tg_arn)
            .build();
        let existing = listeners.iter().find(|x| {
            x.port == Some(i32::from(l.port)) && x.protocol.as_ref() == Some(&proto(l.protocol))
        });
        match existing {
            None => {
                self.elb
                    .create_listener()
                    .load_balancer_arn(&lb_arn)
                    .port(i32::from(l.port))
                    .protocol(proto(l.protocol))
                    .default_actions(forward)
                    .send()
                    .await
                    .map_err(|e| classify("create_listener", e))?;
            }
            Some(x) => {
                let current = x
                    .default_actions()
                    .first()
                    .and_then(|a| a.target_group_arn());
                if current != Some(tg_arn.as_str()) {
                    self.elb
                        .modify_listener()
                        .listener_arn(x.listener_arn().unwrap_or_default())
                        .default_actions(forward)
                        .send()
                        .await
                        .map_err(|e| classify("modify_listener", e))?;
                }
            }
        }
        // target groups of this port/protocol for an older node port are now unused
        for (t, tt) in &tgs {
            let same_port = tt.get(TAG_PORT) == Some(&l.port.to_string())
                && tt.get(TAG_PROTOCOL).map(String::as_str) == Some(l.protocol.as_str());
            if same_port && t.target_group_arn() != Some(tg_arn.as_str()) {
                self.drop_target_group(t, tt).await?;
            }
        }
        Ok(())
    }

    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        let Some(nlb) = self.find_lb(lb.index).await? else {
            return Ok(());
        };
        let lb_arn = nlb.load_balancer_arn().unwrap_or_default().to_string();
        let tgs: Vec<_> = self
            .target_groups(lb.index)
            .await?
            .into_iter()
            .filter(|(_, t)| {
                t.get(TAG_PORT) == Some(&port.to_string())
                    && t.get(TAG_PROTOCOL).map(String::as_str) == Some(protocol.as_str())
                    && t.get(tags::OWNER_UID).map(String::as_str) == Some(owner_uid)
            })
            .collect();
        if tgs.is_empty() {
            return Ok(());
        }
        let listeners = self
            .elb
            .describe_listeners()
            .load_balancer_arn(&lb_arn)
            .send()
            .await
            .map_err(|e| classify("describe_listeners", e))?
            .listeners
            .unwrap_or_default();
        for x in listeners.iter().filter(|x| {
            x.port == Some(i32::from(port)) && x.protocol.as_ref() == Some(&proto(protocol))
        }) {
            let forwards_to_ours = x.default_actions().iter().any(|a| {
                tgs.iter()
                    .any(|(t, _)| a.target_group_arn() == t.target_group_arn())
            });
            if forwards_to_ours {
                already_done(
                    self.elb
                        .delete_listener()
                        .listener_arn(x.listener_arn().unwrap_or_default())
                        .send()
                        .await
                        .map(|_| ())
                        .map_err(|e| classify("delete_listener", e)),
                    Already::Gone,
                )?;
            }
        }
        for (t, tt) in &tgs {
            self.drop_target_group(t, tt).await?;
        }
        Ok(())
    }

    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        if let Some(nlb) = self.find_lb(lb.index).await? {
            // deleting an NLB deletes its listeners; its target groups and firewall rules go after
            already_done(
                self.elb
                    .delete_load_balancer()
                    .load_balancer_arn(nlb.load_balancer_arn().unwrap_or_default())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("delete_load_balancer", e)),
                Already::Gone,
            )?;
        }
        for (t, tt) in self.target_groups(lb.index).await? {
            self.drop_target_group(&t, &tt).await?;
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let mut lbs = Vec::new();
        let mut pages = self.elb.describe_load_balancers().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("describe_load_balancers", e))?;
            lbs.extend(
                page.load_balancers
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|l| {
                        l.load_balancer_name()
                            .is_some_and(|n| n.starts_with(&self.prefix))
                    }),
            );
        }
        let arns: Vec<String> = lbs
            .iter()
            .filter_map(|l| l.load_balancer_arn().map(str::to_string))
            .collect();
        let tags = self.tags_of(&arns).await?;
        let mut out = Vec::new();
        for l in lbs {
            let Some(t) = l
                .load_balancer_arn()
                .and_then(|a| tags.get(a))
                .filter(|t| self.ours(t))
            else {
                continue;
            };
            let Some(index) = t.get(tags::INDEX).and_then(|i| i.parse().ok()) else {
                continue;
            };
            let listeners = self
                .target_groups(index)
                .await?
                .into_iter()
                .filter_map(|(_, tt)| {
                    Some(InventoryListener {
                        port: tt.get(TAG_PORT)?.parse().ok()?,
                        protocol: if tt.get(TAG_PROTOCOL)? == "UDP" {
                            Protocol::Udp
                        } else {
                            Protocol::Tcp
                        },
                        node_port: tt.get(TAG_NODE_PORT)?.parse().ok()?,
                        owner_uid: tt.get(tags::OWNER_UID)?.clone(),
                    })
                })
                .collect();
            out.push(InventoryLoadBalancer {
                index,
                info: LoadBalancerInfo {
                    id: l.load_balancer_arn().unwrap_or_default().into(),
                    ip: None,
                    hostname: l.dns_name().map(str::to_string),
                },
                listeners,
            });
        }
        Ok(Inventory {
            load_balancers: out,
        })
    }

    /// Every target group of the pool gets exactly the Ready nodes: one register and one deregister call per
    /// target group at most, only where something changed.
    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        *self.nodes.write().unwrap_or_else(|e| e.into_inner()) = nodes.to_vec();
        let want: BTreeSet<String> = nodes
            .iter()
            .filter_map(|n| instance_id(n.provider_id.as_deref()?))
            .map(str::to_string)
            .collect();
        let groups = self.target_groups_named(&self.prefix).await?;
        for (tg, _) in groups {
            let Some(arn) = tg.target_group_arn() else {
                continue;
            };
            let port = tg.port().unwrap_or_default();
            let health = self
                .elb
                .describe_target_health()
                .target_group_arn(arn)
                .send()
                .await
                .map_err(|e| classify("describe_target_health", e))?;
            let have: BTreeSet<String> = health
                .target_health_descriptions
                .unwrap_or_default()
                .into_iter()
                .filter_map(|d| d.target?.id)
                .collect();
            let target = |id: &String| TargetDescription::builder().id(id).port(port).build();
            let add: Vec<_> = want.difference(&have).map(target).collect();
            let gone: Vec<_> = have.difference(&want).map(target).collect();
            if !add.is_empty() {
                self.elb
                    .register_targets()
                    .target_group_arn(arn)
                    .set_targets(Some(add))
                    .send()
                    .await
                    .map_err(|e| classify("register_targets", e))?;
            }
            if !gone.is_empty() {
                self.elb
                    .deregister_targets()
                    .target_group_arn(arn)
                    .set_targets(Some(gone))
                    .send()
                    .await
                    .map_err(|e| classify("deregister_targets", e))?;
            }
        }
        Ok(())
    }
}
