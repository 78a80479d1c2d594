//! AWS: each load balancer of a pool is a Network Load Balancer the operator creates and owns; each allocated
//! port is a target group and a listener forwarding to it. The target group holds a few nodes per zone on the
//! node port (instance targets), or with `pod_targets` the ready pods' IPs and ports (`ip` targets, fed from the
//! backing Service's EndpointSlices through `ListenerSpec::backends`), so no node port and no second hop.
//!
//! Firewall (`security_groups`): each NLB has its own ("frontend") security group that opens exactly its listener
//! ports to `sourceRanges`, and all NLBs of the pool share one "backend" group, which the nodes' security group
//! admits on the node-port range and kube-proxy's health port, as AWS's Load Balancer Controller does. The nodes'
//! group so holds a constant 3 rules of the pool's, and its 60-rule quota no longer caps the pool's ports. An NLB
//! made before NLBs had security groups cannot be given any (AWS allows groups only at creation): such an NLB
//! keeps the old way, each node port opened in the nodes' group to `sourceRanges` (and the VPC for health checks).
//!
//! When one SharedLB asks TCP and UDP on one port, the two become ONE `TCP_UDP` listener and target group (AWS
//! refuses a TCP and a UDP listener on the same port of an NLB): the operator gives both Service ports the same
//! node port, and the provider merges on the second `ensure_listener` and splits on `remove_listener`.
//!
//! Names are deterministic (`slb-<hash of cluster/pool>-<index>`, target groups add port, protocol and node
//! port), so a retry after a crash finds what exists instead of duplicating it; everything carries the
//! sharedlb tags, which is how `inventory` finds it. Built behind the `aws` feature with the official SDK; every
//! SDK call is counted by operation (`api_calls`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_ec2 as ec2;
use aws_sdk_elasticloadbalancingv2 as elb;
use elb::error::{DisplayErrorContext, ProvideErrorMetadata};
use elb::types::{
    Action, ActionTypeEnum, LoadBalancerSchemeEnum, LoadBalancerTypeEnum, ProtocolEnum,
    SubnetMapping, Tag, TargetDescription, TargetTypeEnum,
};

mod security_groups;
use security_groups::{Firewall, SecurityGroupRole};

use crate::{
    ApiCalls, Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec,
    LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, NodeTarget, PortMode, Protocol,
    ProviderError, tags,
};

/// AWS's hard limit on listeners per Network Load Balancer (moto does not enforce it: the planner must).
pub const MAX_LISTENERS_PER_NLB: u32 = 50;
/// Registered targets per Availability Zone per NLB, counted as nodes x target groups.
pub const MAX_TARGETS_PER_AZ: u32 = 500;
/// Inbound rules per security group, AWS's default quota (each CIDR of a permission is one rule).
pub const DEFAULT_SECURITY_GROUP_RULES: u32 = 60;
/// kube-proxy's health server: UDP target groups are health-checked here (a UDP node port answers no TCP).
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;
/// Kubernetes' default NodePort range, which the nodes' group opens to the pool's backend group.
pub const NODE_PORT_RANGE: (u16, u16) = (30000, 32767);
/// How long deleting a security group waits for AWS to let go of it: the ENIs of a deleted NLB outlive it for
/// a while, and until they are gone, deleting its groups fails with `DependencyViolation`.
pub const SECURITY_GROUP_RELEASE_WAIT: Duration = Duration::from_secs(120);

const TAG_PORT: &str = "sharedlb.dev/port";
const TAG_PROTOCOL: &str = "sharedlb.dev/protocol";
const TAG_NODE_PORT: &str = "sharedlb.dev/node-port";
/// On a target group whose `proxy_protocol_v2.enabled` the provider turned on: `v2`.
const TAG_PROXY_PROTOCOL: &str = "sharedlb.dev/proxy-protocol";

/// The pool's AWS settings, as the provider needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AwsPool {
    pub region: String,
    /// Empty: the subnets' VPC.
    pub vpc_id: String,
    /// Empty: discovered by the tags `kubernetes.io/cluster/<cluster id>` and `kubernetes.io/role/elb` (or
    /// `internal-elb`), one subnet per Availability Zone.
    pub subnet_ids: Vec<String>,
    pub node_security_group_id: Option<String>,
    pub internal: bool,
    /// Elastic IP allocations, one per subnet per NLB in order: NLB i takes
    /// `[i * subnets, (i + 1) * subnets)`, so the pool has at most `len / subnets` NLBs.
    pub eip_allocation_ids: Vec<String>,
    /// Inbound rules one security group may hold (AWS default 60; `None` is the default): it bounds the
    /// ports of each NLB (in its own group), and the ports of the whole pool only while an NLB made before
    /// NLBs had security groups still opens its ports in the node group.
    pub security_group_rule_limit: Option<u32>,
    /// Nodes per zone each NLB's target groups hold (`crate::target_nodes`); `None`: every node.
    pub target_nodes_per_zone: Option<u32>,
    /// Target groups hold the ready pods' IPs (`ListenerSpec::backends`) instead of nodes on the node port.
    pub pod_targets: bool,
}

/// A pod-target group's targets as last synced: (IP, port) pairs, and when.
type PodTargets = (BTreeSet<(String, i32)>, std::time::Instant);
/// A firewall opening as last synced: the client ranges and when.
type Opened = (Vec<String>, std::time::Instant);
/// Which opening: (security group, protocol, port) - the listener port in an NLB's own group, the node port in
/// the node group.
type OpeningKey = (String, Protocol, u16);

/// How long a firewall opening read or made is trusted before the security group is read again.
pub const FIREWALL_RECHECK: std::time::Duration = std::time::Duration::from_secs(600);

#[derive(Debug)]
pub struct AwsProvider {
    elb: elb::Client,
    ec2: ec2::Client,
    cluster_id: String,
    pool: String,
    settings: AwsPool,
    prefix: String,
    nodes: crate::HeldNodes,
    /// Find-or-create of a load balancer is one step at a time: SharedLBs placed on one new load balancer
    /// reconcile concurrently, and each would otherwise create it (moto makes duplicates; AWS is idempotent by
    /// name only while the settings match).
    creating: tokio::sync::Mutex<()>,
    vpc_cidr: tokio::sync::OnceCell<Option<String>>,
    /// Firewall openings this process made or found, and when it last read them, so a steady-state reconcile
    /// makes no EC2 call; older than `firewall_recheck`, the group is read again (a rule deleted behind the
    /// operator's back comes back within that).
    opened: Mutex<BTreeMap<OpeningKey, Opened>>,
    firewall_recheck: std::time::Duration,
    /// Whether kube-proxy's health port is open to the VPC (for UDP target groups' health checks on NLBs
    /// without security groups).
    health_rule: tokio::sync::Mutex<bool>,
    /// Rules in the node security group that are not this pool's (other pools, the cluster's own).
    foreign_rules: AtomicU32,
    /// The pool's NLBs without security groups (made before they had them), as last counted.
    legacy_lbs: AtomicU32,
    /// The pool's security groups by id, as last read (by tags) or made.
    groups: Mutex<BTreeMap<String, SecurityGroupRole>>,
    /// The backend group the node group was last seen (or made) to admit, and when.
    node_access: tokio::sync::Mutex<Option<(String, std::time::Instant)>>,
    group_release_wait: Duration,
    /// Pod-target groups' targets by target group ARN as this process last set or read them, so a reconcile
    /// whose endpoints did not change makes no call; older than `firewall_recheck`, they are read again.
    pod_targets: Mutex<BTreeMap<String, PodTargets>>,
    calls: Arc<CallCounter>,
}

/// Counts every SDK call by operation name (an SDK interceptor, so retries are one call and nothing escapes).
#[derive(Debug, Default)]
pub struct CallCounter {
    by_op: Mutex<BTreeMap<String, u64>>,
}

impl CallCounter {
    /// (operation, calls so far), e.g. ("CreateListener", 3).
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        self.by_op
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

#[derive(Debug)]
struct Counting(Arc<CallCounter>);

impl elb::config::Intercept for Counting {
    fn name(&self) -> &'static str {
        "sharedlb-call-counter"
    }

    // once per call, after the operation's own configuration (its name) is in the bag
    fn read_before_serialization(
        &self,
        _context: &elb::config::interceptors::BeforeSerializationInterceptorContextRef<'_>,
        _components: &elb::config::RuntimeComponents,
        cfg: &mut elb::config::ConfigBag,
    ) -> Result<(), elb::error::BoxError> {
        let op = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map_or("unknown", |m| m.name())
            .to_string();
        *self
            .0
            .by_op
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op)
            .or_default() += 1;
        Ok(())
    }
}

/// True for API operations that change something (everything but Describe*, Get*, List*).
pub fn is_mutating(operation: &str) -> bool {
    !["Describe", "Get", "List"]
        .iter()
        .any(|p| operation.starts_with(p))
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
            || c.contains("SignatureDoesNotMatch")
            || c == "ValidationError" =>
        {
            ProviderError::InvalidConfig(msg)
        }
        // no credentials at all: nothing a quick retry fixes
        "" if msg.contains("credential") => ProviderError::InvalidConfig(format!(
            "{msg} (the operator finds credentials by IRSA, an instance profile, or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )),
        "" if matches!(e, elb::error::SdkError::ConstructionFailure(_)) => {
            ProviderError::InvalidConfig(msg)
        }
        _ => ProviderError::Other(msg),
    }
}

/// At construction, something the pool names that does not exist is a configuration error.
fn config_error(e: ProviderError) -> ProviderError {
    match e {
        ProviderError::NotFound(m) => ProviderError::InvalidConfig(m),
        other => other,
    }
}

/// What one target group and listener carry: one protocol, or both on one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wire {
    Tcp,
    Udp,
    TcpUdp,
}

impl Wire {
    fn of(p: Protocol) -> Self {
        match p {
            Protocol::Tcp => Wire::Tcp,
            Protocol::Udp => Wire::Udp,
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Wire::Tcp),
            "UDP" => Some(Wire::Udp),
            "TCP_UDP" => Some(Wire::TcpUdp),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Wire::Tcp => "TCP",
            Wire::Udp => "UDP",
            Wire::TcpUdp => "TCP_UDP",
        }
    }

    fn elb(self) -> ProtocolEnum {
        match self {
            Wire::Tcp => ProtocolEnum::Tcp,
            Wire::Udp => ProtocolEnum::Udp,
            Wire::TcpUdp => ProtocolEnum::TcpUdp,
        }
    }

    fn protocols(self) -> &'static [Protocol] {
        match self {
            Wire::Tcp => &[Protocol::Tcp],
            Wire::Udp => &[Protocol::Udp],
            Wire::TcpUdp => &[Protocol::Tcp, Protocol::Udp],
        }
    }

    fn covers(self, p: Protocol) -> bool {
        self.protocols().contains(&p)
    }

    fn overlaps(self, o: Wire) -> bool {
        o.protocols().iter().any(|p| self.covers(*p))
    }
}

fn other(p: Protocol) -> Protocol {
    match p {
        Protocol::Tcp => Protocol::Udp,
        Protocol::Udp => Protocol::Tcp,
    }
}

/// Security-group rules here are written as IPv4 `IpRanges` only; an IPv6 source has no place in them.
fn is_ipv4_range(cidr: &str) -> bool {
    !cidr.contains(':')
}

fn tag(k: &str, v: impl Into<String>) -> Tag {
    Tag::builder().key(k).value(v).build()
}

/// One of the pool's target groups, read from its tags.
#[derive(Debug, Clone)]
struct Group {
    arn: String,
    /// the load balancer it belongs to
    index: u32,
    /// the traffic port (the node port) targets are registered on
    target_port: i32,
    port: u16,
    wire: Wire,
    /// 0 for a group of pod targets
    node_port: u16,
    owner_uid: String,
    /// whether its targets are pod IPs (target type `ip`) rather than instances
    pod_targets: bool,
    /// whether the provider turned its PROXY protocol v2 attribute on (as its tag records)
    proxy_protocol: bool,
}

impl Group {
    fn from(tg: &elb::types::TargetGroup, t: &BTreeMap<String, String>) -> Option<Self> {
        Some(Group {
            arn: tg.target_group_arn()?.to_string(),
            index: t.get(tags::INDEX)?.parse().ok()?,
            target_port: tg.port().unwrap_or_default(),
            port: t.get(TAG_PORT)?.parse().ok()?,
            wire: Wire::parse(t.get(TAG_PROTOCOL)?)?,
            node_port: t.get(TAG_NODE_PORT)?.parse().ok()?,
            owner_uid: t.get(tags::OWNER_UID)?.clone(),
            pod_targets: tg.target_type() == Some(&TargetTypeEnum::Ip),
            proxy_protocol: t.get(TAG_PROXY_PROTOCOL).is_some_and(|v| v == "v2"),
        })
    }
}

/// `aws:///us-east-1a/i-0123456789abcdef0` -> `i-0123456789abcdef0`
pub fn instance_id(provider_id: &str) -> Option<&str> {
    provider_id
        .strip_prefix("aws://")?
        .rsplit('/')
        .next()
        .filter(|i| i.starts_with("i-"))
}

/// Rules in a security group: each CIDR, prefix list and group reference of a permission counts as one.
fn rule_count(p: &ec2::types::IpPermission, only_described: Option<&str>) -> u32 {
    let ours = |d: Option<&str>| only_described.is_none_or(|m| d == Some(m));
    let n = p
        .ip_ranges()
        .iter()
        .filter(|r| ours(r.description()))
        .count()
        + p.ipv6_ranges()
            .iter()
            .filter(|r| ours(r.description()))
            .count()
        + p.prefix_list_ids()
            .iter()
            .filter(|r| ours(r.description()))
            .count()
        + p.user_id_group_pairs()
            .iter()
            .filter(|r| ours(r.description()))
            .count();
    n as u32
}

impl AwsProvider {
    /// Reads the security group again when an opening is older than this (default `FIREWALL_RECHECK`).
    pub fn recheck_firewall_after(mut self, after: std::time::Duration) -> Self {
        self.firewall_recheck = after;
        self
    }

    /// How long deleting a security group still in use waits (default `SECURITY_GROUP_RELEASE_WAIT`).
    pub fn wait_for_security_group_release(mut self, wait: Duration) -> Self {
        self.group_release_wait = wait;
        self
    }

    /// Credentials and endpoint from the environment (IRSA, instance profile, or `AWS_ENDPOINT_URL` for moto).
    /// Finds the subnets (and VPC) when not given, and reads the node security group once: a wrong id or
    /// missing network fails here, as a pool condition, before anything is made.
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
        // throttling and 5xx are retried by the SDK with jittered exponential backoff; what still fails becomes
        // an error by meaning (Throttled -> requeued later); no call waits forever
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(settings.region.clone()))
            .retry_config(
                aws_config::retry::RetryConfig::standard()
                    .with_max_attempts(5)
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(30))
                    .operation_timeout(Duration::from_secs(90))
                    .build(),
            )
            .load()
            .await;
        let calls = Arc::new(CallCounter::default());
        let elb_conf = elb::config::Builder::from(&conf)
            .interceptor(Counting(calls.clone()))
            .build();
        let ec2_conf = ec2::config::Builder::from(&conf)
            .interceptor(Counting(calls.clone()))
            .build();
        let mut p = AwsProvider {
            elb: elb::Client::from_conf(elb_conf),
            ec2: ec2::Client::from_conf(ec2_conf),
            cluster_id: cluster_id.into(),
            pool: pool.into(),
            prefix: crate::cloud_name_prefix(cluster_id, pool),
            settings,
            nodes: crate::HeldNodes::default(),
            creating: tokio::sync::Mutex::new(()),
            vpc_cidr: tokio::sync::OnceCell::new(),
            opened: Mutex::new(BTreeMap::new()),
            firewall_recheck: FIREWALL_RECHECK,
            health_rule: tokio::sync::Mutex::new(false),
            foreign_rules: AtomicU32::new(0),
            legacy_lbs: AtomicU32::new(0),
            groups: Mutex::new(BTreeMap::new()),
            node_access: tokio::sync::Mutex::new(None),
            group_release_wait: SECURITY_GROUP_RELEASE_WAIT,
            pod_targets: Mutex::new(BTreeMap::new()),
            calls,
        };
        p.discover_network().await?;
        p.vpc_cidr().await.map_err(config_error)?;
        p.count_foreign_rules().await.map_err(config_error)?;
        // before the first placement: whether the node group's quota still caps the pool (`limits`)
        p.our_lbs().await?;
        Ok(p)
    }

    /// The SDK calls made so far, by operation.
    pub fn api_calls(&self) -> Vec<(String, u64)> {
        self.calls.snapshot()
    }

    /// Subnets by the cluster's role tags when none are given, one per Availability Zone; the VPC from them.
    async fn discover_network(&mut self) -> Result<(), ProviderError> {
        let f = |k: &str, v: &[&str]| {
            ec2::types::Filter::builder()
                .name(k)
                .set_values(Some(v.iter().map(|v| v.to_string()).collect()))
                .build()
        };
        let mut req = self.ec2.describe_subnets();
        if self.settings.subnet_ids.is_empty() {
            let role = if self.settings.internal {
                "kubernetes.io/role/internal-elb"
            } else {
                "kubernetes.io/role/elb"
            };
            req = req
                .filters(f(
                    "tag-key",
                    &[&format!("kubernetes.io/cluster/{}", self.cluster_id)],
                ))
                .filters(f(&format!("tag:{role}"), &["1", ""]));
            if !self.settings.vpc_id.is_empty() {
                req = req.filters(f("vpc-id", &[&self.settings.vpc_id]));
            }
        } else {
            // given subnets are checked: a wrong id is the pool's condition before anything is made
            req = req.set_subnet_ids(Some(self.settings.subnet_ids.clone()));
        }
        let found = req
            .send()
            .await
            .map_err(|e| config_error(classify("describe_subnets", e)))?
            .subnets
            .unwrap_or_default();
        let mut by_zone: BTreeMap<String, (String, String)> = BTreeMap::new();
        for s in &found {
            let (Some(id), Some(zone), Some(vpc)) =
                (s.subnet_id(), s.availability_zone(), s.vpc_id())
            else {
                continue;
            };
            let e = by_zone
                .entry(zone.to_string())
                .or_insert_with(|| (id.to_string(), vpc.to_string()));
            if id < e.0.as_str() {
                *e = (id.to_string(), vpc.to_string());
            }
        }
        let vpcs: BTreeSet<&String> = by_zone.values().map(|(_, v)| v).collect();
        if !self.settings.subnet_ids.is_empty() {
            let wrong_vpc = !self.settings.vpc_id.is_empty()
                && vpcs.iter().any(|v| **v != self.settings.vpc_id);
            if vpcs.len() != 1 || wrong_vpc {
                return Err(ProviderError::InvalidConfig(format!(
                    "aws: subnets {:?} are in VPCs {vpcs:?}, not all in one VPC{}",
                    self.settings.subnet_ids,
                    if wrong_vpc {
                        format!(" {}", self.settings.vpc_id)
                    } else {
                        String::new()
                    }
                )));
            }
        }
        if vpcs.len() != 1 {
            return Err(ProviderError::InvalidConfig(format!(
                "aws: no single VPC for the load balancers: subnets {} found in VPCs {vpcs:?} (tag the subnets kubernetes.io/cluster/{} and kubernetes.io/role/{}elb, or set vpcId and subnetIds)",
                found.len(),
                self.cluster_id,
                if self.settings.internal {
                    "internal-"
                } else {
                    ""
                }
            )));
        }
        if self.settings.vpc_id.is_empty() {
            self.settings.vpc_id = vpcs.into_iter().next().cloned().unwrap_or_default();
        }
        if self.settings.subnet_ids.is_empty() {
            self.settings.subnet_ids = by_zone.into_values().map(|(id, _)| id).collect();
        }
        Ok(())
    }

    /// `slb-<hash of cluster/pool>-`: every name this provider gives starts so.
    pub fn name_prefix(&self) -> &str {
        &self.prefix
    }

    /// The pool's NLBs (by name prefix, confirmed by tags), with their index.
    async fn our_lbs(&self) -> Result<Vec<(u32, elb::types::LoadBalancer)>, ProviderError> {
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
        let ours: Vec<(u32, elb::types::LoadBalancer)> = lbs
            .into_iter()
            .filter_map(|l| {
                let t = tags.get(l.load_balancer_arn()?).filter(|t| self.ours(t))?;
                Some((t.get(tags::INDEX)?.parse().ok()?, l))
            })
            .collect();
        let legacy = ours
            .iter()
            .filter(|(_, l)| l.security_groups().is_empty())
            .count();
        self.legacy_lbs.store(legacy as u32, Ordering::Relaxed);
        Ok(ours)
    }

    /// The subnets the pool's NLBs use (given or discovered).
    pub fn subnets(&self) -> &[String] {
        &self.settings.subnet_ids
    }

    fn description(&self) -> String {
        format!("sharedlb {}/{}", self.cluster_id, self.pool)
    }

    /// The pool-wide port budget, while an NLB without security groups is in the pool: its ports open rules in
    /// the node group, which all the pool's NLBs share. The old budget stays (it counts every port of the pool,
    /// so it is conservative for a pool that also has NLBs with groups), less kube-proxy's health rule and the
    /// backend group's rules. `None` once every NLB has its own group.
    fn node_group_budget(&self, quota: u32) -> Option<u32> {
        let legacy = self.legacy_lbs.load(Ordering::Relaxed) > 0;
        self.settings
            .node_security_group_id
            .as_ref()
            .filter(|_| legacy)
            .map(|_| {
                quota
                    .saturating_sub(self.foreign_rules.load(Ordering::Relaxed))
                    .saturating_sub(1 + security_groups::NODE_ACCESS_RULES)
            })
    }

    /// Counts the node security group's rules that are not this pool's: the rest of the quota is the pool's.
    async fn count_foreign_rules(&self) -> Result<(), ProviderError> {
        let Some(sg) = &self.settings.node_security_group_id else {
            return Ok(());
        };
        let r = self
            .ec2
            .describe_security_groups()
            .group_ids(sg)
            .send()
            .await
            .map_err(|e| classify("describe_security_groups", e))?;
        let mine = self.description();
        let (all, ours) = r
            .security_groups()
            .iter()
            .flat_map(|g| g.ip_permissions())
            .fold((0, 0), |(a, o), p| {
                (a + rule_count(p, None), o + rule_count(p, Some(&mine)))
            });
        self.foreign_rules.store(all - ours, Ordering::Relaxed);
        Ok(())
    }

    fn lb_name(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    fn tg_name(&self, index: u32, port: u16, wire: Wire, node_port: u16) -> String {
        let p = match wire {
            Wire::Tcp => 't',
            Wire::Udp => 'u',
            Wire::TcpUdp => 'b',
        };
        match self.settings.pod_targets {
            true => format!("{}{index}-{port}{p}-ip", self.prefix),
            false => format!("{}{index}-{port}{p}-{node_port}", self.prefix),
        }
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

    /// This load balancer's target groups (by name prefix, confirmed by tags).
    async fn target_groups(&self, index: u32) -> Result<Vec<Group>, ProviderError> {
        self.target_groups_named(&format!("{}{index}-", self.prefix))
            .await
    }

    /// The target groups this load balancer's listeners use: the hot path (every ensure) costs calls in
    /// proportion to one NLB's ports, not to every target group of the account.
    async fn lb_groups(&self, index: u32, lb_arn: &str) -> Result<Vec<Group>, ProviderError> {
        self.groups_where(&format!("{}{index}-", self.prefix), Some(lb_arn))
            .await
    }

    /// The one target group of this name, if it exists and is this pool's (made but not yet used by a
    /// listener when a crash came between the two).
    async fn named_group(&self, name: &str) -> Result<Option<Group>, ProviderError> {
        let found = match self.elb.describe_target_groups().names(name).send().await {
            Ok(r) => r.target_groups.unwrap_or_default(),
            Err(e) => match classify("describe_target_groups", e) {
                ProviderError::NotFound(_) => return Ok(None),
                other => return Err(other),
            },
        };
        self.ours_of(found).await.map(|g| g.into_iter().next())
    }

    /// Target groups whose name starts with `prefix` and whose tags say they are this pool's: every target
    /// group of the account is listed (the API filters by name, ARN or load balancer only), so this is for
    /// rebuilds, deletes and node changes, not for every reconcile.
    async fn target_groups_named(&self, prefix: &str) -> Result<Vec<Group>, ProviderError> {
        self.groups_where(prefix, None).await
    }

    async fn groups_where(
        &self,
        prefix: &str,
        lb_arn: Option<&str>,
    ) -> Result<Vec<Group>, ProviderError> {
        let mut all = Vec::new();
        let mut pages = self
            .elb
            .describe_target_groups()
            .set_load_balancer_arn(lb_arn.map(str::to_string))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = match page.map_err(|e| classify("describe_target_groups", e)) {
                Ok(p) => p,
                // a load balancer without target groups (moto says "not found" rather than nothing)
                Err(ProviderError::NotFound(_)) if lb_arn.is_some() => break,
                Err(e) => return Err(e),
            };
            all.extend(
                page.target_groups
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| t.target_group_name().is_some_and(|n| n.starts_with(prefix))),
            );
        }
        self.ours_of(all).await
    }

    /// The given target groups that are this pool's, read from their tags.
    async fn ours_of(
        &self,
        all: Vec<elb::types::TargetGroup>,
    ) -> Result<Vec<Group>, ProviderError> {
        let arns: Vec<String> = all
            .iter()
            .filter_map(|t| t.target_group_arn().map(str::to_string))
            .collect();
        let tags = self.tags_of(&arns).await?;
        Ok(all
            .iter()
            .filter_map(|t| {
                let tg_tags = tags.get(t.target_group_arn()?)?;
                if !self.ours(tg_tags) {
                    return None;
                }
                Group::from(t, tg_tags)
            })
            .collect())
    }

    /// The targets a new target group of NLB `index` gets: its subset of the nodes, on the node port.
    fn targets(&self, index: u32, node_port: u16) -> Vec<TargetDescription> {
        self.nodes
            .with(|nodes| self.instances(index, nodes))
            .into_iter()
            .map(|id| {
                TargetDescription::builder()
                    .id(id)
                    .port(i32::from(node_port))
                    .build()
            })
            .collect()
    }

    /// The instance ids NLB `index` targets, of `nodes` (`crate::target_nodes`).
    fn instances(&self, index: u32, nodes: &[NodeTarget]) -> BTreeSet<String> {
        let per_zone = self.settings.target_nodes_per_zone;
        crate::target_nodes(&self.lb_name(index), nodes, per_zone)
            .into_iter()
            .filter_map(|n| instance_id(n.provider_id.as_deref()?))
            .map(str::to_string)
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

    fn permission(
        &self,
        protocol: Protocol,
        port: u16,
        cidrs: impl IntoIterator<Item = String>,
    ) -> ec2::types::IpPermission {
        let ip_ranges = cidrs
            .into_iter()
            .filter(|c| is_ipv4_range(c))
            .map(|c| {
                ec2::types::IpRange::builder()
                    .cidr_ip(c)
                    .description(self.description())
                    .build()
            })
            .collect();
        ec2::types::IpPermission::builder()
            .ip_protocol(protocol.as_str().to_lowercase())
            .from_port(i32::from(port))
            .to_port(i32::from(port))
            .set_ip_ranges(Some(ip_ranges))
            .build()
    }

    async fn authorize(
        &self,
        sg: &str,
        perms: Vec<ec2::types::IpPermission>,
    ) -> Result<(), ProviderError> {
        crate::existing_is_ok(
            self.ec2
                .authorize_security_group_ingress()
                .group_id(sg)
                .set_ip_permissions(Some(perms))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("authorize_security_group_ingress", e)),
        )
    }

    /// Where a listener's opening lives: (group, port) - the listener port in the NLB's own group, or the node
    /// port in the node group for an NLB without groups (nowhere when the pool names no node group).
    fn opening(&self, fw: &Firewall, port: u16, node_port: u16) -> Option<(String, u16)> {
        match fw {
            Firewall::Frontend { group, .. } => Some((group.clone(), port)),
            Firewall::Nodes => self
                .settings
                .node_security_group_id
                .clone()
                .map(|sg| (sg, node_port)),
        }
    }

    /// The ingress one listener needs. On an NLB with its own group: the listener port from the client ranges
    /// (everyone when none), and the nodes admitting the pool's backend group. On an NLB without groups: its
    /// node port from the client ranges (the NLB keeps client IPs), and from the VPC for health checks unless the
    /// ranges are open anyway; UDP ports are health-checked on kube-proxy's port, opened to the VPC once for the
    /// pool. Nothing wider, and nothing left of what an earlier `sourceRanges` opened.
    async fn open_firewall(&self, fw: &Firewall, l: &ListenerSpec) -> Result<(), ProviderError> {
        if let Firewall::Frontend { backend, .. } = fw {
            self.ensure_node_access(backend).await?;
        }
        let Some((sg, port)) = self.opening(fw, l.port, l.node_port) else {
            return Ok(());
        };
        let key = (sg.clone(), l.protocol, port);
        let ranges = &l.source_ranges;
        let fresh = self
            .opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .is_some_and(|(r, at)| r == ranges && at.elapsed() < self.firewall_recheck);
        if fresh {
            return Ok(());
        }
        let mut cidrs: BTreeSet<String> = ranges.iter().cloned().collect();
        if cidrs.is_empty() {
            cidrs.insert("0.0.0.0/0".into());
        } else if matches!(fw, Firewall::Nodes)
            && let Some(vpc) = self.vpc_cidr().await?
        {
            cidrs.insert(vpc);
        }
        if matches!(fw, Firewall::Nodes) && l.protocol == Protocol::Udp {
            self.open_health_port(&sg).await?;
        }
        self.sync_firewall(&sg, l.protocol, port, cidrs).await?;
        let now = std::time::Instant::now();
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, (ranges.to_vec(), now));
        Ok(())
    }

    /// kube-proxy's health port, open to the VPC in the node group, for NLBs without groups of their own.
    async fn open_health_port(&self, node_sg: &str) -> Result<(), ProviderError> {
        let mut open = self.health_rule.lock().await;
        if !*open {
            let vpc = self.vpc_cidr().await?.into_iter();
            let perm = self.permission(Protocol::Tcp, KUBE_PROXY_HEALTH_PORT, vpc);
            self.authorize(node_sg, vec![perm]).await?;
            *open = true;
        }
        Ok(())
    }

    /// Revokes exactly the rules sharedlb added for this listener (or node port), whatever their sources.
    async fn close_firewall(
        &self,
        fw: &Firewall,
        protocol: Protocol,
        port: u16,
        node_port: u16,
    ) -> Result<(), ProviderError> {
        let Some((sg, port)) = self.opening(fw, port, node_port) else {
            return Ok(());
        };
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(sg.clone(), protocol, port));
        self.sync_firewall(&sg, protocol, port, BTreeSet::new())
            .await
    }

    /// Makes sharedlb's rules for this port of this group (known by their description) open it to exactly
    /// `want`: what is missing is authorised first, so a changed range never closes the port in between, then
    /// what is no longer wanted is revoked, so a narrowed `sourceRanges` closes the wider rule. IPv6 sources are
    /// left out, as `permission` leaves them out (both by `is_ipv4_range`).
    async fn sync_firewall(
        &self,
        sg: &str,
        protocol: Protocol,
        port: u16,
        want: BTreeSet<String>,
    ) -> Result<(), ProviderError> {
        let want: BTreeSet<String> = want.into_iter().filter(|c| is_ipv4_range(c)).collect();
        let have = self.opened_sources(sg, protocol, port).await?;
        let missing: Vec<String> = want.difference(&have).cloned().collect();
        if !missing.is_empty() {
            self.authorize(sg, vec![self.permission(protocol, port, missing)])
                .await?;
        }
        let extra: Vec<String> = have.difference(&want).cloned().collect();
        if extra.is_empty() {
            return Ok(());
        }
        crate::gone_is_ok(
            self.ec2
                .revoke_security_group_ingress()
                .group_id(sg)
                .ip_permissions(self.permission(protocol, port, extra))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("revoke_security_group_ingress", e)),
        )
    }

    /// The sources sharedlb's rules open this port of this group to.
    async fn opened_sources(
        &self,
        sg: &str,
        protocol: Protocol,
        port: u16,
    ) -> Result<BTreeSet<String>, ProviderError> {
        let r = self
            .ec2
            .describe_security_groups()
            .group_ids(sg)
            .send()
            .await
            .map_err(|e| classify("describe_security_groups", e))?;
        let mine = self.description();
        let wire = protocol.as_str().to_lowercase();
        Ok(r.security_groups()
            .iter()
            .flat_map(|g| g.ip_permissions())
            .filter(|p| {
                p.from_port == Some(i32::from(port)) && p.ip_protocol() == Some(wire.as_str())
            })
            .flat_map(|p| p.ip_ranges())
            .filter(|r| r.description() == Some(&mine))
            .filter_map(|r| r.cidr_ip().map(str::to_string))
            .collect())
    }

    /// Turns the target group's PROXY protocol v2 on or off when it `has` not what is wanted; the tag that
    /// records it follows the attribute, so a crash in between sets the attribute again next time.
    async fn set_proxy_protocol(
        &self,
        tg_arn: &str,
        has: bool,
        wanted: bool,
    ) -> Result<(), ProviderError> {
        if has == wanted {
            return Ok(());
        }
        let attribute = elb::types::TargetGroupAttribute::builder()
            .key("proxy_protocol_v2.enabled")
            .value(wanted.to_string())
            .build();
        self.elb
            .modify_target_group_attributes()
            .target_group_arn(tg_arn)
            .attributes(attribute)
            .send()
            .await
            .map_err(|e| classify("modify_target_group_attributes", e))?;
        if wanted {
            self.elb
                .add_tags()
                .resource_arns(tg_arn)
                .tags(tag(TAG_PROXY_PROTOCOL, "v2"))
                .send()
                .await
                .map_err(|e| classify("add_tags", e))?;
        } else {
            self.elb
                .remove_tags()
                .resource_arns(tg_arn)
                .tag_keys(TAG_PROXY_PROTOCOL)
                .send()
                .await
                .map_err(|e| classify("remove_tags", e))?;
        }
        Ok(())
    }

    /// Finds or creates the target group for one port, protocol(s) and node port, with the nodes registered
    /// when it is new (`update_nodes` keeps existing ones in step); with pod targets, an `ip` group (node port
    /// 0) whose targets `sync_pod_targets` sets.
    async fn ensure_target_group(
        &self,
        index: u32,
        groups: &[Group],
        port: u16,
        wire: Wire,
        node_port: u16,
        owner_uid: &str,
    ) -> Result<String, ProviderError> {
        let pods = self.settings.pod_targets;
        let same = |g: &Group| {
            g.port == port
                && g.wire == wire
                && g.node_port == node_port
                && g.owner_uid == owner_uid
                && g.pod_targets == pods
        };
        if let Some(g) = groups.iter().find(|g| same(g)) {
            return Ok(g.arn.clone());
        }
        let name = self.tg_name(index, port, wire, node_port);
        if let Some(g) = self.named_group(&name).await?.filter(same) {
            return Ok(g.arn);
        }
        let mut t = self.base_tags(index);
        t.push(tag(tags::OWNER_UID, owner_uid));
        t.push(tag(TAG_PORT, port.to_string()));
        t.push(tag(TAG_PROTOCOL, wire.as_str()));
        t.push(tag(TAG_NODE_PORT, node_port.to_string()));
        let mut req = self
            .elb
            .create_target_group()
            .name(name)
            .protocol(wire.elb())
            .vpc_id(&self.settings.vpc_id)
            .set_tags(Some(t));
        req = match (pods, wire) {
            // every pod target is registered with its own port, and checked by TCP on it (a UDP-only pod fails
            // that, and an NLB whose targets all fail sends to all of them)
            (true, _) => req
                .port(i32::from(port))
                .target_type(TargetTypeEnum::Ip)
                .health_check_protocol(ProtocolEnum::Tcp),
            (false, Wire::Udp) => req
                .port(i32::from(node_port))
                .target_type(TargetTypeEnum::Instance)
                .health_check_protocol(ProtocolEnum::Http)
                .health_check_port(KUBE_PROXY_HEALTH_PORT.to_string())
                .health_check_path("/healthz"),
            (false, _) => req
                .port(i32::from(node_port))
                .target_type(TargetTypeEnum::Instance)
                .health_check_protocol(ProtocolEnum::Tcp),
        };
        let arn = req
            .send()
            .await
            .map_err(|e| classify("create_target_group", e))?
            .target_groups
            .unwrap_or_default()
            .into_iter()
            .next()
            .and_then(|t| t.target_group_arn)
            .ok_or_else(|| {
                ProviderError::Other("aws: create_target_group returned nothing".into())
            })?;
        let targets = match pods {
            true => Vec::new(),
            false => self.targets(index, node_port),
        };
        if !targets.is_empty() {
            self.elb
                .register_targets()
                .target_group_arn(&arn)
                .set_targets(Some(targets))
                .send()
                .await
                .map_err(|e| classify("register_targets", e))?;
        }
        Ok(arn)
    }

    async fn listeners(&self, lb_arn: &str) -> Result<Vec<elb::types::Listener>, ProviderError> {
        Ok(self
            .elb
            .describe_listeners()
            .load_balancer_arn(lb_arn)
            .send()
            .await
            .map_err(|e| classify("describe_listeners", e))?
            .listeners
            .unwrap_or_default())
    }

    async fn delete_listener(&self, l: &elb::types::Listener) -> Result<(), ProviderError> {
        crate::gone_is_ok(
            self.elb
                .delete_listener()
                .listener_arn(l.listener_arn().unwrap_or_default())
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("delete_listener", e)),
        )
    }

    async fn create_listener(
        &self,
        lb_arn: &str,
        port: u16,
        wire: Wire,
        tg_arn: &str,
    ) -> Result<(), ProviderError> {
        self.elb
            .create_listener()
            .load_balancer_arn(lb_arn)
            .port(i32::from(port))
            .protocol(wire.elb())
            .default_actions(forward(tg_arn))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| classify("create_listener", e))
    }

    /// Makes the listener on `port` carry `wire` to `tg_arn`. Listeners on the port that overlap it in
    /// protocol go first (AWS allows one listener per port and protocol family), so a TCP listener becomes a
    /// TCP_UDP one by delete and create (ModifyListener cannot change it on moto; a gap of one call).
    async fn point_listener(
        &self,
        lb_arn: &str,
        port: u16,
        wire: Wire,
        tg_arn: &str,
    ) -> Result<(), ProviderError> {
        let on_port: Vec<_> = self
            .listeners(lb_arn)
            .await?
            .into_iter()
            .filter(|x| x.port == Some(i32::from(port)))
            .collect();
        let mut exact = None;
        for x in &on_port {
            let Some(w) = x.protocol().and_then(|p| Wire::parse(p.as_str())) else {
                continue;
            };
            if w == wire && exact.is_none() {
                exact = Some(x);
            } else if w.overlaps(wire) {
                self.delete_listener(x).await?;
            }
        }
        match exact {
            None => self.create_listener(lb_arn, port, wire, tg_arn).await,
            Some(x)
                if x.default_actions()
                    .first()
                    .and_then(|a| a.target_group_arn())
                    == Some(tg_arn) =>
            {
                Ok(())
            }
            Some(x) => self
                .elb
                .modify_listener()
                .listener_arn(x.listener_arn().unwrap_or_default())
                .default_actions(forward(tg_arn))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("modify_listener", e)),
        }
    }

    /// Deletes a target group (no listener may use it) and closes the firewall (`fw`; none when the NLB's own
    /// group goes with it) for what it carried, except what `keep` (protocols on a node port) still needs.
    async fn drop_group(
        &self,
        g: &Group,
        keep: Option<(Wire, u16)>,
        fw: Option<&Firewall>,
    ) -> Result<(), ProviderError> {
        self.pod_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&g.arn);
        crate::gone_is_ok(
            self.elb
                .delete_target_group()
                .target_group_arn(&g.arn)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| classify("delete_target_group", e)),
        )?;
        let Some(fw) = fw else {
            return Ok(());
        };
        for p in g.wire.protocols() {
            // an NLB's own group opens the listener port, which the listener that stays keeps whatever its
            // node port; the node group opens the node port itself
            let same_opening = |np| matches!(fw, Firewall::Frontend { .. }) || np == g.node_port;
            let kept = keep.is_some_and(|(w, np)| w.covers(*p) && same_opening(np));
            if !kept {
                self.close_firewall(fw, *p, g.port, g.node_port).await?;
            }
        }
        Ok(())
    }
}

fn forward(tg_arn: &str) -> Action {
    Action::builder()
        .r#type(ActionTypeEnum::Forward)
        .target_group_arn(tg_arn)
        .build()
}

#[async_trait::async_trait]
impl LoadBalancerProvider for AwsProvider {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn limits(&self) -> Limits {
        // targets per AZ are the NLB's nodes in that zone x its target groups: the most an NLB targets in one
        // zone (its subset's share, at most `target_nodes_per_zone`) bounds its target groups. Pod targets
        // count pods, which no limit known ahead can bound: an NLB past 500 in a zone gets AWS's refusal.
        let cap = match self.settings.pod_targets {
            true => 1,
            false => self.settings.target_nodes_per_zone.unwrap_or(u32::MAX),
        };
        let busiest = self.nodes.with(|nodes| {
            let mut per_zone: BTreeMap<&str, u32> = BTreeMap::new();
            for n in nodes {
                *per_zone.entry(n.zone()).or_default() += 1;
            }
            per_zone
                .values()
                .map(|&n| n.min(cap))
                .max()
                .unwrap_or(1)
                .max(1)
        });
        let quota = self
            .settings
            .security_group_rule_limit
            .unwrap_or(DEFAULT_SECURITY_GROUP_RULES);
        let max_ports_total = self.node_group_budget(quota);
        // with Elastic IPs, each NLB takes one per subnet
        let subnets = self.settings.subnet_ids.len().max(1);
        let max_lbs = (!self.settings.eip_allocation_ids.is_empty())
            .then(|| (self.settings.eip_allocation_ids.len() / subnets) as u32);
        // Each port/protocol pair opens one rule per source range (at least one) in its NLB's own group, which
        // holds nothing else. Limits counts ports, not rules, so this assumes one rule per port: exact for ports
        // open to all or to one range (the common case), and with the default quota of 60 the 10 rules beyond
        // 50 listeners absorb some extra ranges. A bound that holds for every SharedLB does not exist (one may
        // name 64 ranges, more than a default group holds); an NLB whose group runs out gets AWS's refusal,
        // shown as CloudQuotaExceeded on the SharedLB that asked. Raise the quota (`securityGroupRuleLimit`) or
        // lower `maxPortsPerLoadBalancer` for pools of many-range SharedLBs.
        Limits {
            max_ports_per_lb: MAX_LISTENERS_PER_NLB
                .min(MAX_TARGETS_PER_AZ / busiest)
                .min(quota)
                .max(1),
            max_lbs,
            max_ports_total,
            port_mode: PortMode::PerLoadBalancer,
            lb_groups: None,
        }
    }

    fn forwards_to_endpoints(&self) -> bool {
        self.settings.pod_targets
    }

    fn supports_proxy_protocol(&self) -> bool {
        true
    }

    fn needs_node_ports(&self) -> bool {
        !self.settings.pod_targets
    }

    fn api_calls(&self) -> Vec<ApiCalls> {
        self.calls
            .snapshot()
            .into_iter()
            .map(|(operation, calls)| ApiCalls {
                mutating: is_mutating(&operation),
                operation,
                calls,
            })
            .collect()
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
                let mut req = self
                    .elb
                    .create_load_balancer()
                    .name(self.lb_name(lb.index))
                    .r#type(LoadBalancerTypeEnum::Network)
                    .scheme(scheme)
                    .set_tags(Some(self.base_tags(lb.index)));
                let subnets = &self.settings.subnet_ids;
                if self.settings.eip_allocation_ids.is_empty() {
                    req = req.set_subnets(Some(subnets.clone()));
                } else {
                    let from = lb.index as usize * subnets.len();
                    let eips = self
                        .settings
                        .eip_allocation_ids
                        .get(from..from + subnets.len())
                        .ok_or_else(|| {
                            ProviderError::QuotaExceeded(format!(
                                "aws: {} needs {} Elastic IP allocations from eipAllocationIds[{from}..], which has {}",
                                lb.name(),
                                subnets.len(),
                                self.settings.eip_allocation_ids.len()
                            ))
                        })?;
                    for (subnet, eip) in subnets.iter().zip(eips) {
                        req = req.subnet_mappings(
                            SubnetMapping::builder()
                                .subnet_id(subnet)
                                .allocation_id(eip)
                                .build(),
                        );
                    }
                }
                // the groups come last: nothing is made for an NLB whose request cannot be built
                let groups = self.groups_for_new_lb(lb.index).await?;
                let out = req
                    .set_security_groups(Some(groups))
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

    /// One target group and listener per port; when the owner already has the other protocol on this port on
    /// the same node port, the two become one TCP_UDP target group and listener. With pod targets the node
    /// port plays no part (0), and the group's targets become the listener's backends.
    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        let pods = self.settings.pod_targets;
        let l = &ListenerSpec {
            node_port: if pods { 0 } else { l.node_port },
            ..l.clone()
        };
        let nlb = self
            .find_lb(lb.index)
            .await?
            .ok_or_else(|| ProviderError::NotFound(format!("aws: {}", lb.name())))?;
        let lb_arn = nlb.load_balancer_arn().unwrap_or_default().to_string();
        let groups: Vec<Group> = self
            .lb_groups(lb.index, &lb_arn)
            .await?
            .into_iter()
            .filter(|g| g.port == l.port)
            .collect();
        let paired = groups.iter().any(|g| {
            g.wire.covers(other(l.protocol))
                && g.owner_uid == l.owner.uid
                && g.node_port == l.node_port
        });
        let wire = if paired {
            Wire::TcpUdp
        } else {
            Wire::of(l.protocol)
        };
        let fw = self.firewall_of(lb.index, &nlb).await?;
        if pods && fw == Firewall::Nodes {
            return Err(ProviderError::InvalidConfig(format!(
                "aws: {} was made before NLBs had security groups and opens node ports in the nodes' group; pod targets need an NLB with its own groups (delete the NLB's SharedLBs or use targets: Nodes)",
                lb.name()
            )));
        }
        let tg_arn = self
            .ensure_target_group(lb.index, &groups, l.port, wire, l.node_port, &l.owner.uid)
            .await?;
        if pods {
            // a TCP_UDP group takes the endpoints of the protocol being ensured: TCP and UDP of one port must
            // reach the same pods on the same port (one NLB listener carries both)
            self.sync_pod_targets(&tg_arn, &l.backends).await?;
        }
        if wire == Wire::Tcp {
            let has = groups.iter().any(|g| g.arn == tg_arn && g.proxy_protocol);
            self.set_proxy_protocol(&tg_arn, has, l.proxy_protocol)
                .await?;
        } else if l.proxy_protocol {
            // one TCP_UDP listener carries both protocols of the port: its UDP half could not take the header
            return Err(ProviderError::InvalidConfig(format!(
                "aws: port {} serves TCP and UDP through one TCP_UDP listener, whose target group cannot send a PROXY header; serve the two on different ports or drop proxyProtocol",
                l.port
            )));
        }
        self.open_firewall(&fw, l).await?;
        self.point_listener(&lb_arn, l.port, wire, &tg_arn).await?;
        // groups this one replaces: the single-protocol halves of a merge, or an older node port
        for g in groups
            .iter()
            .filter(|g| g.arn != tg_arn && g.wire.overlaps(wire))
        {
            self.drop_group(g, Some((wire, l.node_port)), Some(&fw))
                .await?;
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
        let fw = self.firewall_of(lb.index, &nlb).await?;
        let is_mine =
            |g: &&Group| g.port == port && g.wire.covers(protocol) && g.owner_uid == owner_uid;
        let mut all = self.lb_groups(lb.index, &lb_arn).await?;
        if !all.iter().any(|g| is_mine(&g)) {
            // not behind a listener: look through every group of this NLB, made but never used
            all = self.target_groups(lb.index).await?;
        }
        for g in all.iter().filter(is_mine) {
            let keep = if g.wire == Wire::TcpUdp {
                // split: what stays gets its own group and listener, which replaces the merged listener
                // (point_listener deletes the overlapping TCP_UDP one), then the merged group goes
                let rest = Wire::of(other(protocol));
                let arn = self
                    .ensure_target_group(lb.index, &all, port, rest, g.node_port, owner_uid)
                    .await?;
                self.point_listener(&lb_arn, port, rest, &arn).await?;
                Some((rest, g.node_port))
            } else {
                for x in self.listeners(&lb_arn).await? {
                    if x.port == Some(i32::from(port))
                        && x.default_actions()
                            .iter()
                            .any(|a| a.target_group_arn() == Some(g.arn.as_str()))
                    {
                        self.delete_listener(&x).await?;
                    }
                }
                None
            };
            self.drop_group(g, keep, Some(&fw)).await?;
        }
        Ok(())
    }

    /// Deletes the NLB, its target groups, and the security groups no NLB of the pool uses any more: its own,
    /// any left by a crash between making a group and its NLB, and with the pool's last NLB the backend group
    /// (after the node group's rules that admit it). One at a time with `ensure_load_balancer`, so a group is
    /// never deleted under an NLB being made with it.
    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        let _one_at_a_time = self.creating.lock().await;
        let nlb = self.find_lb(lb.index).await?;
        // an NLB's own group goes as a whole; the node group's rules go port by port (also when the NLB is
        // already gone and what it was is unknown: no rule of sharedlb's on a port, nothing revoked)
        let fw = match &nlb {
            Some(n) if !n.security_groups().is_empty() => None,
            _ => Some(Firewall::Nodes),
        };
        if let Some(nlb) = nlb {
            // deleting an NLB deletes its listeners; its target groups and firewall rules go after
            crate::gone_is_ok(
                self.elb
                    .delete_load_balancer()
                    .load_balancer_arn(nlb.load_balancer_arn().unwrap_or_default())
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify("delete_load_balancer", e)),
            )?;
        }
        for g in self.target_groups(lb.index).await? {
            self.drop_group(&g, None, fw.as_ref()).await?;
        }
        let mut live: BTreeSet<u32> = self.our_lbs().await?.into_iter().map(|(i, _)| i).collect();
        // gone, even if a listing made right after its deletion still shows it
        live.remove(&lb.index);
        self.release_groups(&live).await?;
        // the last NLB of the pool takes the pool's health-check rule with it
        if live.is_empty() {
            let mut open = self.health_rule.lock().await;
            self.close_firewall(&Firewall::Nodes, Protocol::Tcp, 0, KUBE_PROXY_HEALTH_PORT)
                .await?;
            *open = false;
        }
        Ok(())
    }

    /// Target groups of NLBs already gone, the pool's security groups, the node group's rules for them: what a
    /// crash between an NLB's deletion and the rest of its `delete_load_balancer` leaves.
    async fn delete_pool_leftovers(&self) -> Result<(), ProviderError> {
        let _one_at_a_time = self.creating.lock().await;
        if !self.our_lbs().await?.is_empty() {
            return Err(ProviderError::Other(
                "aws: the pool still has NLBs; its leftovers go after them".into(),
            ));
        }
        for g in self.target_groups_named(&self.prefix).await? {
            self.drop_group(&g, None, Some(&Firewall::Nodes)).await?;
        }
        self.release_groups(&BTreeSet::new()).await?;
        let mut open = self.health_rule.lock().await;
        self.close_firewall(&Firewall::Nodes, Protocol::Tcp, 0, KUBE_PROXY_HEALTH_PORT)
            .await?;
        *open = false;
        Ok(())
    }

    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let lbs = self.our_lbs().await?;
        // one walk over the account's target groups for all of the pool's NLBs
        let groups = self.target_groups_named(&self.prefix).await?;
        let mut out = Vec::new();
        for (index, l) in lbs {
            // a group serves only while a listener forwards to it: one read of the NLB's listeners each
            let lb_arn = l.load_balancer_arn().unwrap_or_default();
            let forwarded: BTreeSet<String> = self
                .listeners(lb_arn)
                .await?
                .iter()
                .flat_map(|x| x.default_actions().iter())
                .filter_map(|a| a.target_group_arn().map(str::to_string))
                .collect();
            let mut listeners: Vec<InventoryListener> = groups
                .iter()
                .filter(|g| g.index == index)
                .flat_map(|g| {
                    let serving = forwarded.contains(&g.arn);
                    g.wire.protocols().iter().map(move |p| InventoryListener {
                        port: g.port,
                        protocol: *p,
                        node_port: g.node_port,
                        owner_uid: g.owner_uid.clone(),
                        serving,
                    })
                })
                .collect();
            listeners.sort();
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
        self.count_foreign_rules().await?;
        Ok(Inventory {
            load_balancers: out,
        })
    }

    /// Every target group of the pool gets exactly its NLB's subset of the Ready nodes: one register and one
    /// deregister call per target group at most, and only target groups of NLBs whose subset changed are read.
    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        let before = self.nodes.replace(nodes);
        self.sync_targets(nodes, before.as_deref()).await?;
        self.nodes.in_step();
        Ok(())
    }
}

impl AwsProvider {
    /// Makes a pod-target group hold exactly `backends` (IPv4: the groups are made for IPv4 addresses): what is
    /// missing is registered before what is gone is deregistered, so the group is never emptier than both.
    async fn sync_pod_targets(
        &self,
        tg_arn: &str,
        backends: &[std::net::SocketAddr],
    ) -> Result<(), ProviderError> {
        let want: BTreeSet<(String, i32)> = backends
            .iter()
            .filter(|a| a.is_ipv4())
            .map(|a| (a.ip().to_string(), i32::from(a.port())))
            .collect();
        let known = self
            .pod_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tg_arn)
            .filter(|(_, at)| at.elapsed() < self.firewall_recheck)
            .map(|(t, _)| t.clone());
        let have = match known {
            Some(t) => t,
            None => self.registered(tg_arn).await?,
        };
        self.retarget(tg_arn, &want, &have).await?;
        self.pod_targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tg_arn.to_string(), (want, std::time::Instant::now()));
        Ok(())
    }

    /// Takes a target group from the (id, port) targets it `have`s to those it should: the missing registered
    /// first, then the gone deregistered, so it is never emptier than both; at most one call each.
    async fn retarget(
        &self,
        tg_arn: &str,
        want: &BTreeSet<(String, i32)>,
        have: &BTreeSet<(String, i32)>,
    ) -> Result<(), ProviderError> {
        let target =
            |(id, port): &(String, i32)| TargetDescription::builder().id(id).port(*port).build();
        let add: Vec<_> = want.difference(have).map(target).collect();
        let gone: Vec<_> = have.difference(want).map(target).collect();
        if !add.is_empty() {
            self.elb
                .register_targets()
                .target_group_arn(tg_arn)
                .set_targets(Some(add))
                .send()
                .await
                .map_err(|e| classify("register_targets", e))?;
        }
        if !gone.is_empty() {
            self.elb
                .deregister_targets()
                .target_group_arn(tg_arn)
                .set_targets(Some(gone))
                .send()
                .await
                .map_err(|e| classify("deregister_targets", e))?;
        }
        Ok(())
    }

    /// The (id, port) pairs registered in a target group.
    async fn registered(&self, tg_arn: &str) -> Result<BTreeSet<(String, i32)>, ProviderError> {
        let health = self
            .elb
            .describe_target_health()
            .target_group_arn(tg_arn)
            .send()
            .await
            .map_err(|e| classify("describe_target_health", e))?;
        Ok(health
            .target_health_descriptions
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| {
                let t = d.target?;
                Some((t.id?, t.port.unwrap_or_default()))
            })
            .collect())
    }

    /// Brings each target group to its NLB's subset of `now`: those of NLBs whose subset changed since `before`
    /// (every one when `None`).
    async fn sync_targets(
        &self,
        now: &[NodeTarget],
        before: Option<&[NodeTarget]>,
    ) -> Result<(), ProviderError> {
        // per NLB, once: the subset it targets now, and whether that moved (an NLB has up to 50 target groups)
        let mut subsets: BTreeMap<u32, (BTreeSet<String>, bool)> = BTreeMap::new();
        for g in self.target_groups_named(&self.prefix).await? {
            if g.pod_targets {
                continue;
            }
            let (want, moved) = subsets
                .entry(g.index)
                .or_insert_with(|| {
                    let want = self.instances(g.index, now);
                    let moved = before.is_none_or(|b| want != self.instances(g.index, b));
                    (want, moved)
                })
                .clone();
            if !moved {
                continue;
            }
            let want: BTreeSet<(String, i32)> =
                want.into_iter().map(|id| (id, g.target_port)).collect();
            let have = self.registered(&g.arn).await?;
            self.retarget(&g.arn, &want, &have).await?;
        }
        Ok(())
    }
}
