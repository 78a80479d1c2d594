//! GCP: each load balancer of a pool is a reserved regional external IP with a target pool of the cluster's
//! nodes; each allocated port is a forwarding rule on that IP (passthrough: the port the client dials is the
//! port the node receives, so external port = node port, `PortMode::PoolWide`); each SharedLB has one firewall
//! rule allowing exactly its ports from its `sourceRanges` to the nodes' network tag. Built behind the `gcp`
//! feature with Google's `google-cloud-compute-v1`.
//!
//! Why target pools and not a backend service: an instance may belong to only one load-balanced instance group,
//! and on GKE the nodes already belong to the cloud controller's `k8s-ig--*` groups, so a backend-service NLB
//! would have to borrow CCM-owned objects; a target pool lists instances directly and owns nothing shared.
//! Target pools take legacy HTTP health checks: one per pool on kube-proxy's health port (10256 `/healthz`),
//! which is what decides whether a node can forward. Node changes are one addInstance/removeInstance call per
//! target pool (calls proportional to load balancers).
//!
//! Every mutation is a long-running operation and is awaited; 404 on delete is success, 409 on insert is "found"
//! (the deterministic name is then checked to be ours), quota and permission errors keep Google's message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use google_cloud_compute_v1::client::{
    Addresses, Firewalls, ForwardingRules, HttpHealthChecks, Regions, TargetPools,
};
use google_cloud_compute_v1::model;
use google_cloud_gax::paginator::Paginator as _;
use google_cloud_lro::Poller;

use crate::{
    ApiCalls, Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec,
    LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, NodeTarget, PortMode, Protocol,
    ProviderError,
};

/// Forwarding rules (ports) the planner puts on one IP. GCP sets no per-IP cap: the region's forwarding-rule
/// quota is the real limit (read by `read_rule_quota`, and a bound on the whole pool); this keeps one target
/// pool's blast radius sane.
pub const MAX_RULES_PER_IP: u32 = 100;
/// Where Google's health checkers for target pools come from.
pub const HEALTH_CHECK_RANGES: [&str; 3] = ["35.191.0.0/16", "209.85.152.0/22", "209.85.204.0/22"];
/// kube-proxy's health server.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;

/// The pool's GCP settings, as the provider needs them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcpPool {
    pub project: String,
    pub region: String,
    /// `global/networks/<name>`; empty: `default`.
    pub network: String,
    /// The nodes' network tag, which the firewall rules target.
    pub node_tag: String,
    /// The Compute Engine endpoint; `None`: Google's. Tests point it at the fake.
    pub endpoint: Option<String>,
    /// Anonymous credentials, for the fake only; otherwise Application Default Credentials (workload identity).
    pub anonymous: bool,
    /// The first wait while polling an operation (Google's default when `None`).
    pub poll_delay: Option<Duration>,
    /// Nodes per zone in each target pool (`crate::target_nodes`); `None`: every node.
    pub target_nodes_per_zone: Option<u32>,
}

#[derive(Debug)]
pub struct GcpProvider {
    addresses: Addresses,
    rules: ForwardingRules,
    pools: TargetPools,
    firewalls: Firewalls,
    checks: HttpHealthChecks,
    regions: Regions,
    /// Forwarding rules the region's quota leaves this pool, its own included, as last read (`u32::MAX`: no
    /// quota read yet, or none applies).
    rule_quota: AtomicU32,
    settings: GcpPool,
    cluster_id: String,
    pool: String,
    prefix: String,
    nodes: crate::HeldNodes,
    creating: tokio::sync::Mutex<()>,
    /// One firewall rule per SharedLB is read-modify-write: one change at a time per provider.
    firewall_lock: tokio::sync::Mutex<()>,
    /// Compute Engine calls by method (`forwardingRules.insert`), counted where each is made.
    calls: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// Maps a Google error to one by meaning, keeping Google's message.
fn classify(op: &str, e: google_cloud_gax::error::Error) -> ProviderError {
    let code = e.http_status_code();
    let msg = format!("gcp {op}: {e}");
    let lower = msg.to_lowercase();
    match code {
        Some(404) => ProviderError::NotFound(msg),
        Some(409) => ProviderError::AlreadyExists(msg),
        Some(429) => ProviderError::Throttled {
            retry_after: Duration::from_secs(5),
            message: msg,
        },
        _ if lower.contains("quota") => ProviderError::QuotaExceeded(msg),
        Some(401 | 403) => ProviderError::InvalidConfig(msg),
        _ if lower.contains("not found") || lower.contains("notfound") => {
            ProviderError::NotFound(msg)
        }
        _ if lower.contains("already exists") || lower.contains("alreadyexists") => {
            ProviderError::AlreadyExists(msg)
        }
        Some(400) if lower.contains("in use") || lower.contains("being used") => {
            ProviderError::Other(msg)
        }
        Some(400) => ProviderError::InvalidConfig(msg),
        _ => ProviderError::Other(msg),
    }
}

/// A finished operation's own error (the poller reports it as an error too).
fn operation_result(
    op: &str,
    r: google_cloud_gax::Result<model::Operation>,
) -> Result<(), ProviderError> {
    match r {
        Ok(o) => match o.error.as_ref().filter(|e| !e.errors.is_empty()) {
            None => Ok(()),
            Some(e) => {
                let m = e
                    .errors
                    .iter()
                    .filter_map(|x| x.message.clone())
                    .collect::<Vec<_>>()
                    .join("; ");
                let code = o.http_error_status_code.unwrap_or(0);
                Err(match code {
                    404 => ProviderError::NotFound(format!("gcp {op}: {m}")),
                    409 => ProviderError::AlreadyExists(format!("gcp {op}: {m}")),
                    _ if m.to_lowercase().contains("quota") => {
                        ProviderError::QuotaExceeded(format!("gcp {op}: {m}"))
                    }
                    _ => ProviderError::Other(format!("gcp {op}: {m}")),
                })
            }
        },
        Err(e) => Err(classify(op, e)),
    }
}

fn optional<T>(r: google_cloud_gax::Result<T>, op: &str) -> Result<Option<T>, ProviderError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) => match classify(op, e) {
            ProviderError::NotFound(_) => Ok(None),
            other => Err(other),
        },
    }
}

/// `gce://project/zone/name` -> `projects/project/zones/zone/instances/name`
pub fn instance_path(provider_id: &str) -> Option<String> {
    let rest = provider_id.strip_prefix("gce://")?;
    let mut p = rest.split('/');
    let (project, zone, name) = (p.next()?, p.next()?, p.next()?);
    (!project.is_empty() && !zone.is_empty() && !name.is_empty())
        .then(|| format!("projects/{project}/zones/{zone}/instances/{name}"))
}

/// What a forwarding rule records about its port (in its description, read back by `inventory`).
fn describe(owner: &str, node_port: u16) -> String {
    format!("sharedlb owner={owner} nodePort={node_port}")
}

fn parse_description(d: &str) -> Option<(String, u16)> {
    let rest = d.strip_prefix("sharedlb owner=")?;
    let (owner, np) = rest.split_once(" nodePort=")?;
    Some((owner.to_string(), np.parse().ok()?))
}

impl GcpProvider {
    pub async fn new(
        cluster_id: &str,
        pool: &str,
        mut settings: GcpPool,
    ) -> Result<Self, ProviderError> {
        if settings.project.is_empty() || settings.region.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "gcp: project and region are required".into(),
            ));
        }
        if settings.node_tag.is_empty() {
            return Err(ProviderError::InvalidConfig(
                "gcp: nodeTag (the nodes' network tag, which firewall rules target) is required"
                    .into(),
            ));
        }
        if settings.network.is_empty() {
            settings.network = "global/networks/default".into();
        } else if !settings.network.contains('/') {
            settings.network = format!("global/networks/{}", settings.network);
        }
        let creds = if settings.anonymous {
            google_cloud_auth::credentials::anonymous::Builder::new().build()
        } else {
            google_cloud_auth::credentials::Builder::default()
                .build()
                .map_err(|e| {
                    ProviderError::InvalidConfig(format!(
                        "gcp: no usable credentials (workload identity or GOOGLE_APPLICATION_CREDENTIALS): {e}"
                    ))
                })?
        };
        let first_poll = settings.poll_delay.unwrap_or(Duration::from_secs(1));
        let polling = || {
            google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder::new()
                .with_initial_delay(first_poll)
                .with_maximum_delay(Duration::from_secs(10))
                .build()
                .map_err(|e| ProviderError::Other(format!("gcp: polling policy: {e}")))
        };
        macro_rules! client {
            ($t:ty) => {{
                let mut b = <$t>::builder()
                    .with_credentials(creds.clone())
                    .with_polling_backoff_policy(polling()?);
                if let Some(e) = &settings.endpoint {
                    b = b.with_endpoint(e.clone());
                }
                b.build()
                    .await
                    .map_err(|e| ProviderError::InvalidConfig(format!("gcp: client: {e}")))?
            }};
        }
        Ok(GcpProvider {
            addresses: client!(Addresses),
            rules: client!(ForwardingRules),
            pools: client!(TargetPools),
            firewalls: client!(Firewalls),
            checks: client!(HttpHealthChecks),
            regions: client!(Regions),
            rule_quota: AtomicU32::new(u32::MAX),
            prefix: crate::cloud_name_prefix(cluster_id, pool),
            cluster_id: cluster_id.into(),
            pool: pool.into(),
            settings,
            nodes: crate::HeldNodes::default(),
            creating: tokio::sync::Mutex::new(()),
            firewall_lock: tokio::sync::Mutex::new(()),
            calls: std::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// `slb-<hash of cluster/pool>-`: every name this provider gives starts so.
    pub fn name_prefix(&self) -> &str {
        &self.prefix
    }

    fn count(&self, op: &str) {
        *self
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(op.to_string())
            .or_default() += 1;
    }

    /// A finished long-running operation (counted as one call of `op`).
    fn done(
        &self,
        op: &str,
        r: google_cloud_gax::Result<model::Operation>,
    ) -> Result<(), ProviderError> {
        self.count(op);
        operation_result(op, r)
    }

    /// A read whose 404 means "not there" (counted as one call of `op`).
    fn found<T>(
        &self,
        r: google_cloud_gax::Result<T>,
        op: &str,
    ) -> Result<Option<T>, ProviderError> {
        self.count(op);
        optional(r, op)
    }

    fn p(&self) -> &str {
        &self.settings.project
    }

    fn r(&self) -> &str {
        &self.settings.region
    }

    fn lb_name(&self, index: u32) -> String {
        format!("{}{index}", self.prefix)
    }

    fn rule_name(&self, index: u32, port: u16, protocol: Protocol) -> String {
        let p = match protocol {
            Protocol::Tcp => 't',
            Protocol::Udp => 'u',
        };
        format!("{}{index}-{port}{p}", self.prefix)
    }

    fn health_name(&self) -> String {
        format!("{}hc", self.prefix)
    }

    /// One firewall rule per SharedLB (by its uid).
    fn firewall_name(&self, owner_uid: &str) -> String {
        let uid: String = owner_uid
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(36)
            .collect::<String>()
            .to_lowercase();
        format!("{}fw-{uid}", self.prefix)
    }

    fn labels(&self, index: Option<u32>) -> Vec<(String, String)> {
        let clean = |s: &str| -> String {
            s.to_lowercase()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(63)
                .collect()
        };
        let mut l = vec![
            ("sharedlb-managed-by".to_string(), "sharedlb".to_string()),
            ("sharedlb-cluster".to_string(), clean(&self.cluster_id)),
            ("sharedlb-pool".to_string(), clean(&self.pool)),
        ];
        if let Some(i) = index {
            l.push(("sharedlb-index".to_string(), i.to_string()));
        }
        l
    }

    fn ours(&self, labels: &std::collections::HashMap<String, String>) -> bool {
        self.labels(None)
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
    }

    async fn address(&self, index: u32) -> Result<Option<model::Address>, ProviderError> {
        self.found(
            self.addresses
                .get()
                .set_project(self.p())
                .set_region(self.r())
                .set_address(self.lb_name(index))
                .send()
                .await,
            "addresses.get",
        )
    }

    async fn target_pool(&self, index: u32) -> Result<Option<model::TargetPool>, ProviderError> {
        self.found(
            self.pools
                .get()
                .set_project(self.p())
                .set_region(self.r())
                .set_target_pool(self.lb_name(index))
                .send()
                .await,
            "targetPools.get",
        )
    }

    /// The pool's health check on kube-proxy, and the firewall rule that lets Google's checkers reach it.
    async fn ensure_health_check(&self) -> Result<String, ProviderError> {
        let name = self.health_name();
        let found = self.found(
            self.checks
                .get()
                .set_project(self.p())
                .set_http_health_check(&name)
                .send()
                .await,
            "httpHealthChecks.get",
        )?;
        if let Some(h) = found {
            return Ok(h.self_link.unwrap_or_default());
        }
        crate::existing_is_ok(
            self.done(
                "httpHealthChecks.insert",
                self.checks
                    .insert()
                    .set_project(self.p())
                    .set_body(
                        model::HttpHealthCheck::new()
                            .set_name(&name)
                            .set_port(i32::from(KUBE_PROXY_HEALTH_PORT))
                            .set_request_path("/healthz")
                            .set_description(format!("sharedlb {}/{}", self.cluster_id, self.pool)),
                    )
                    .poller()
                    .until_done()
                    .await,
            ),
        )?;
        crate::existing_is_ok(
            self.done(
                "firewalls.insert",
                self.firewalls
                    .insert()
                    .set_project(self.p())
                    .set_body(
                        model::Firewall::new()
                            .set_name(&name)
                            .set_network(&self.settings.network)
                            .set_description(format!(
                                "sharedlb {}/{}: health checks to kube-proxy",
                                self.cluster_id, self.pool
                            ))
                            .set_allowed([model::firewall::Allowed::new()
                                .set_ip_protocol("tcp")
                                .set_ports([KUBE_PROXY_HEALTH_PORT.to_string()])])
                            .set_source_ranges(HEALTH_CHECK_RANGES)
                            .set_target_tags([self.settings.node_tag.clone()]),
                    )
                    .poller()
                    .until_done()
                    .await,
            ),
        )?;
        let h = self
            .checks
            .get()
            .set_project(self.p())
            .set_http_health_check(&name)
            .send()
            .await
            .map_err(|e| classify("httpHealthChecks.get", e))?;
        self.count("httpHealthChecks.get");
        Ok(h.self_link.unwrap_or_default())
    }

    /// The instances target pool `index` holds: its subset of the nodes (`crate::target_nodes`).
    fn instance_urls(&self, index: u32) -> Vec<String> {
        self.nodes.with(|nodes| self.subset(index, nodes))
    }

    fn subset(&self, index: u32, nodes: &[NodeTarget]) -> Vec<String> {
        let base = self
            .settings
            .endpoint
            .clone()
            .map(|e| format!("{e}/compute/v1/"))
            .unwrap_or_else(|| "https://compute.googleapis.com/compute/v1/".into());
        let per_zone = self.settings.target_nodes_per_zone;
        crate::target_nodes(&self.lb_name(index), nodes, per_zone)
            .into_iter()
            .filter_map(|n| instance_path(n.provider_id.as_deref()?))
            .map(|p| format!("{base}{p}"))
            .collect()
    }

    /// The pool's load balancers: its reserved addresses (by name prefix, confirmed by labels), by index, with
    /// no listeners filled in.
    async fn our_addresses(&self) -> Result<BTreeMap<u32, InventoryLoadBalancer>, ProviderError> {
        let mut lbs: BTreeMap<u32, InventoryLoadBalancer> = BTreeMap::new();
        let mut pages = self
            .addresses
            .list()
            .set_project(self.p())
            .set_region(self.r())
            .set_filter(format!("name eq \"{}.*\"", self.prefix))
            .by_page();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("addresses.list", e))?;
            self.count("addresses.list");
            for a in page.items {
                if !self.ours(&a.labels) {
                    continue;
                }
                let Some(index) = a
                    .labels
                    .get("sharedlb-index")
                    .and_then(|i| i.parse::<u32>().ok())
                else {
                    continue;
                };
                lbs.insert(
                    index,
                    InventoryLoadBalancer {
                        index,
                        info: LoadBalancerInfo {
                            id: a.self_link.clone().unwrap_or_default(),
                            ip: a.address.clone(),
                            hostname: None,
                        },
                        listeners: Vec::new(),
                    },
                );
            }
        }
        Ok(lbs)
    }

    /// The pool's forwarding rules (by name prefix), all load balancers.
    /// Reads the region's forwarding-rule quotas: each rule of this pool is one port and protocol, so what the
    /// quota leaves after everyone else's rules (`usage` less `ours`) bounds the pool's ports. Read at each
    /// inventory (every rebuild); a rule someone else makes later still fails with QUOTA_EXCEEDED, reported.
    async fn read_rule_quota(&self, ours: usize) -> Result<(), ProviderError> {
        use model::quota::Metric;
        let region = self
            .regions
            .get()
            .set_project(self.p())
            .set_region(self.r())
            .send()
            .await
            .map_err(|e| classify("regions.get", e))?;
        self.count("regions.get");
        let ours = ours as f64;
        let room = region
            .quotas
            .iter()
            .filter(|q| {
                matches!(
                    q.metric,
                    Some(Metric::ForwardingRules | Metric::ExternalNetworkLbForwardingRules)
                )
            })
            .filter_map(|q| {
                let others = (q.usage? - ours).max(0.0);
                Some((q.limit? - others).clamp(0.0, f64::from(u32::MAX - 1)) as u32)
            })
            .min();
        self.rule_quota
            .store(room.unwrap_or(u32::MAX), Ordering::Relaxed);
        Ok(())
    }

    async fn all_rules(&self) -> Result<Vec<model::ForwardingRule>, ProviderError> {
        let mut out = Vec::new();
        let mut pages = self
            .rules
            .list()
            .set_project(self.p())
            .set_region(self.r())
            .set_filter(format!("name eq \"{}.*\"", self.prefix))
            .by_page();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify("forwardingRules.list", e))?;
            self.count("forwardingRules.list");
            out.extend(page.items.into_iter().filter(|r| {
                r.name
                    .as_deref()
                    .is_some_and(|n| n.starts_with(&self.prefix))
            }));
        }
        Ok(out)
    }

    async fn delete_rule(&self, name: &str) -> Result<(), ProviderError> {
        crate::gone_is_ok(
            self.done(
                "forwardingRules.delete",
                self.rules
                    .delete()
                    .set_project(self.p())
                    .set_region(self.r())
                    .set_forwarding_rule(name)
                    .poller()
                    .until_done()
                    .await,
            ),
        )
    }

    /// Makes the SharedLB's firewall rule allow exactly `ports` (protocol -> ports) from `ranges`; deletes it
    /// when nothing is left.
    async fn set_firewall(
        &self,
        owner_uid: &str,
        change: impl FnOnce(&mut BTreeMap<String, BTreeSet<u16>>),
        ranges: Option<&[String]>,
    ) -> Result<(), ProviderError> {
        let _one = self.firewall_lock.lock().await;
        let name = self.firewall_name(owner_uid);
        let found = self.found(
            self.firewalls
                .get()
                .set_project(self.p())
                .set_firewall(&name)
                .send()
                .await,
            "firewalls.get",
        )?;
        let mut ports: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        if let Some(f) = &found {
            for a in &f.allowed {
                let set = ports
                    .entry(a.ip_protocol.clone().unwrap_or_default())
                    .or_default();
                set.extend(a.ports.iter().filter_map(|p| p.parse::<u16>().ok()));
            }
        }
        let before = ports.clone();
        change(&mut ports);
        ports.retain(|_, v| !v.is_empty());
        let sources: Vec<String> = match ranges {
            Some([]) => vec!["0.0.0.0/0".to_string()],
            Some(r) => r.to_vec(),
            None => found
                .as_ref()
                .map(|f| f.source_ranges.clone())
                .unwrap_or_default(),
        };
        let same_sources = found.as_ref().is_some_and(|f| {
            let mut a = f.source_ranges.clone();
            let mut b = sources.clone();
            a.sort();
            b.sort();
            a == b
        });
        if found.is_some() && ports == before && same_sources {
            return Ok(());
        }
        if ports.is_empty() {
            return if found.is_some() {
                crate::gone_is_ok(
                    self.done(
                        "firewalls.delete",
                        self.firewalls
                            .delete()
                            .set_project(self.p())
                            .set_firewall(&name)
                            .poller()
                            .until_done()
                            .await,
                    ),
                )
            } else {
                Ok(())
            };
        }
        let body = model::Firewall::new()
            .set_name(&name)
            .set_network(&self.settings.network)
            .set_description(format!(
                "sharedlb {}/{}: the node ports of SharedLB uid {owner_uid}",
                self.cluster_id, self.pool
            ))
            .set_allowed(ports.iter().map(|(proto, ps)| {
                model::firewall::Allowed::new()
                    .set_ip_protocol(proto)
                    .set_ports(ps.iter().map(|p| p.to_string()))
            }))
            .set_source_ranges(sources)
            .set_target_tags([self.settings.node_tag.clone()]);
        if found.is_some() {
            self.done(
                "firewalls.patch",
                self.firewalls
                    .patch()
                    .set_project(self.p())
                    .set_firewall(&name)
                    .set_body(body)
                    .poller()
                    .until_done()
                    .await,
            )
        } else {
            self.done(
                "firewalls.insert",
                self.firewalls
                    .insert()
                    .set_project(self.p())
                    .set_body(body)
                    .poller()
                    .until_done()
                    .await,
            )
        }
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for GcpProvider {
    fn kind(&self) -> &'static str {
        "gcp"
    }

    fn api_calls(&self) -> Vec<ApiCalls> {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(op, n)| ApiCalls {
                operation: op.clone(),
                mutating: !(op.ends_with(".get") || op.ends_with(".list")),
                calls: *n,
            })
            .collect()
    }

    fn limits(&self) -> Limits {
        let quota = self.rule_quota.load(Ordering::Relaxed);
        Limits {
            max_ports_per_lb: MAX_RULES_PER_IP,
            max_lbs: None,
            max_ports_total: (quota != u32::MAX).then_some(quota),
            port_mode: PortMode::PoolWide,
            lb_groups: None,
        }
    }

    /// Passthrough: packets reach the nodes addressed to the forwarding rule's own IP and port.
    fn needs_node_ports(&self) -> bool {
        false
    }

    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        let _one_at_a_time = self.creating.lock().await;
        let name = self.lb_name(lb.index);
        let address = match self.address(lb.index).await? {
            Some(a) => a,
            None => {
                crate::existing_is_ok(
                    self.done(
                        "addresses.insert",
                        self.addresses
                            .insert()
                            .set_project(self.p())
                            .set_region(self.r())
                            .set_body(
                                model::Address::new()
                                    .set_name(&name)
                                    .set_description(format!("sharedlb {}", lb.name()))
                                    .set_labels(self.labels(Some(lb.index))),
                            )
                            .poller()
                            .until_done()
                            .await,
                    ),
                )?;
                self.address(lb.index).await?.ok_or_else(|| {
                    ProviderError::Other(format!("gcp: address {name} vanished after insert"))
                })?
            }
        };
        if !self.ours(&address.labels) {
            return Err(ProviderError::AlreadyExists(format!(
                "gcp: an address named {name} exists that sharedlb did not make for this cluster and pool"
            )));
        }
        if self.target_pool(lb.index).await?.is_none() {
            let hc = self.ensure_health_check().await?;
            crate::existing_is_ok(
                self.done(
                    "targetPools.insert",
                    self.pools
                        .insert()
                        .set_project(self.p())
                        .set_region(self.r())
                        .set_body(
                            model::TargetPool::new()
                                .set_name(&name)
                                .set_description(format!("sharedlb {}", lb.name()))
                                .set_health_checks([hc])
                                .set_instances(self.instance_urls(lb.index)),
                        )
                        .poller()
                        .until_done()
                        .await,
                ),
            )?;
        }
        Ok(LoadBalancerInfo {
            id: address.self_link.unwrap_or_default(),
            ip: address.address,
            hostname: None,
        })
    }

    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        if l.node_port != l.port {
            return Err(ProviderError::InvalidConfig(format!(
                "gcp: passthrough needs the node port to equal the external port ({} != {})",
                l.node_port, l.port
            )));
        }
        let address = self
            .address(lb.index)
            .await?
            .ok_or_else(|| ProviderError::NotFound(format!("gcp: address of {}", lb.name())))?;
        let pool = self
            .target_pool(lb.index)
            .await?
            .ok_or_else(|| ProviderError::NotFound(format!("gcp: target pool of {}", lb.name())))?;
        // the firewall first: a rule that forwards before the port is open would drop traffic
        let proto = l.protocol.as_str().to_lowercase();
        self.set_firewall(
            &l.owner.uid,
            |ports| {
                ports.entry(proto).or_default().insert(l.port);
            },
            Some(&l.source_ranges),
        )
        .await?;
        let name = self.rule_name(lb.index, l.port, l.protocol);
        let want_desc = describe(&l.owner.uid, l.node_port);
        let existing = self.found(
            self.rules
                .get()
                .set_project(self.p())
                .set_region(self.r())
                .set_forwarding_rule(&name)
                .send()
                .await,
            "forwardingRules.get",
        )?;
        if let Some(r) = &existing {
            if r.description.as_deref() == Some(want_desc.as_str()) && r.target == pool.self_link {
                return Ok(());
            }
            // another owner's leftover, or a different target: replace it
            self.delete_rule(&name).await?;
        }
        let ip_proto = match l.protocol {
            Protocol::Tcp => model::forwarding_rule::IPProtocol::Tcp,
            Protocol::Udp => model::forwarding_rule::IPProtocol::Udp,
        };
        crate::existing_is_ok(
            self.done(
                "forwardingRules.insert",
                self.rules
                    .insert()
                    .set_project(self.p())
                    .set_region(self.r())
                    .set_body(
                        model::ForwardingRule::new()
                            .set_name(&name)
                            .set_description(want_desc)
                            .set_ip_address(address.address.clone().unwrap_or_default())
                            .set_ip_protocol(ip_proto)
                            .set_port_range(format!("{0}-{0}", l.port))
                            .set_target(pool.self_link.clone().unwrap_or_default())
                            .set_load_balancing_scheme(
                                model::forwarding_rule::LoadBalancingScheme::External,
                            )
                            .set_labels(self.labels(Some(lb.index))),
                    )
                    .poller()
                    .until_done()
                    .await,
            ),
        )
    }

    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        let name = self.rule_name(lb.index, port, protocol);
        let existing = self.found(
            self.rules
                .get()
                .set_project(self.p())
                .set_region(self.r())
                .set_forwarding_rule(&name)
                .send()
                .await,
            "forwardingRules.get",
        )?;
        let Some(r) = existing else {
            // the rule is gone; its firewall opening may not be (a crash between the two)
            let proto = protocol.as_str().to_lowercase();
            return self
                .set_firewall(
                    owner_uid,
                    |ports| {
                        if let Some(s) = ports.get_mut(&proto) {
                            s.remove(&port);
                        }
                    },
                    None,
                )
                .await;
        };
        let owner = r
            .description
            .as_deref()
            .and_then(parse_description)
            .map(|(o, _)| o);
        if owner.as_deref() != Some(owner_uid) {
            return Ok(());
        }
        self.delete_rule(&name).await?;
        let proto = protocol.as_str().to_lowercase();
        self.set_firewall(
            owner_uid,
            |ports| {
                if let Some(s) = ports.get_mut(&proto) {
                    s.remove(&port);
                }
            },
            None,
        )
        .await
    }

    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        let mine = format!("{}{}-", self.prefix, lb.index);
        for r in self.all_rules().await? {
            let Some(name) = r.name.as_deref().filter(|n| n.starts_with(&mine)) else {
                continue;
            };
            self.delete_rule(name).await?;
            if let Some((owner, np)) = r.description.as_deref().and_then(parse_description) {
                let proto = match r.ip_protocol {
                    Some(model::forwarding_rule::IPProtocol::Udp) => "udp",
                    _ => "tcp",
                };
                self.set_firewall(
                    &owner,
                    |ports| {
                        if let Some(s) = ports.get_mut(proto) {
                            s.remove(&np);
                        }
                    },
                    None,
                )
                .await?;
            }
        }
        crate::gone_is_ok(
            self.done(
                "targetPools.delete",
                self.pools
                    .delete()
                    .set_project(self.p())
                    .set_region(self.r())
                    .set_target_pool(self.lb_name(lb.index))
                    .poller()
                    .until_done()
                    .await,
            ),
        )?;
        crate::gone_is_ok(
            self.done(
                "addresses.delete",
                self.addresses
                    .delete()
                    .set_project(self.p())
                    .set_region(self.r())
                    .set_address(self.lb_name(lb.index))
                    .poller()
                    .until_done()
                    .await,
            ),
        )?;
        // the last load balancer of the pool takes the health check and its firewall rule with it
        if self.our_addresses().await?.is_empty() {
            crate::gone_is_ok(
                self.done(
                    "firewalls.delete",
                    self.firewalls
                        .delete()
                        .set_project(self.p())
                        .set_firewall(self.health_name())
                        .poller()
                        .until_done()
                        .await,
                ),
            )?;
            crate::gone_is_ok(
                self.done(
                    "httpHealthChecks.delete",
                    self.checks
                        .delete()
                        .set_project(self.p())
                        .set_http_health_check(self.health_name())
                        .poller()
                        .until_done()
                        .await,
                ),
            )?;
        }
        Ok(())
    }

    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let mut lbs = self.our_addresses().await?;
        let rules = self.all_rules().await?;
        self.read_rule_quota(rules.len()).await?;
        for r in rules {
            let Some(rest) = r.name.as_deref().and_then(|n| n.strip_prefix(&self.prefix)) else {
                continue;
            };
            let Some(index) = rest.split('-').next().and_then(|i| i.parse::<u32>().ok()) else {
                continue;
            };
            let Some((owner, node_port)) = r.description.as_deref().and_then(parse_description)
            else {
                continue;
            };
            let Some(port) = r
                .port_range
                .as_deref()
                .and_then(|p| p.split('-').next())
                .and_then(|p| p.parse().ok())
            else {
                continue;
            };
            let protocol = match r.ip_protocol {
                Some(model::forwarding_rule::IPProtocol::Udp) => Protocol::Udp,
                _ => Protocol::Tcp,
            };
            if let Some(lb) = lbs.get_mut(&index) {
                lb.listeners.push(InventoryListener {
                    port,
                    protocol,
                    node_port,
                    owner_uid: owner,
                    serving: true,
                });
            }
        }
        Ok(Inventory {
            load_balancers: lbs
                .into_values()
                .map(|mut l| {
                    l.listeners.sort();
                    l
                })
                .collect(),
        })
    }

    /// Every target pool of the pool gets exactly the nodes: one addInstance and one removeInstance call per
    /// target pool at most, only where something changed.
    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        let before = self.nodes.replace(nodes);
        self.sync_target_pools(nodes, before.as_deref()).await?;
        self.nodes.in_step();
        Ok(())
    }
}

impl GcpProvider {
    /// Brings each target pool to its subset of `now`: those whose subset changed since `before` (every one
    /// when `None`), one addInstance and one removeInstance call each at most.
    async fn sync_target_pools(
        &self,
        now: &[NodeTarget],
        before: Option<&[NodeTarget]>,
    ) -> Result<(), ProviderError> {
        // the target pools to update are the pool's load balancers: its addresses, no need for the rules
        for lb in self.our_addresses().await?.into_values() {
            let want = self.subset(lb.index, now);
            if before.is_some_and(|b| want == self.subset(lb.index, b)) {
                continue;
            }
            let Some(pool) = self.target_pool(lb.index).await? else {
                continue;
            };
            // compare by the instance's path, whatever host the URL was written with
            let path = |u: &str| u.split("/compute/v1/").nth(1).unwrap_or(u).to_string();
            let have: BTreeMap<String, String> = pool
                .instances
                .iter()
                .map(|u| (path(u), u.clone()))
                .collect();
            let want_paths: BTreeMap<String, String> =
                want.iter().map(|u| (path(u), u.clone())).collect();
            let add: Vec<model::InstanceReference> = want_paths
                .iter()
                .filter(|(p, _)| !have.contains_key(*p))
                .map(|(_, u)| model::InstanceReference::new().set_instance(u))
                .collect();
            let gone: Vec<model::InstanceReference> = have
                .iter()
                .filter(|(p, _)| !want_paths.contains_key(*p))
                .map(|(_, u)| model::InstanceReference::new().set_instance(u))
                .collect();
            if !add.is_empty() {
                self.done(
                    "targetPools.addInstance",
                    self.pools
                        .add_instance()
                        .set_project(self.p())
                        .set_region(self.r())
                        .set_target_pool(self.lb_name(lb.index))
                        .set_body(model::TargetPoolsAddInstanceRequest::new().set_instances(add))
                        .poller()
                        .until_done()
                        .await,
                )?;
            }
            if !gone.is_empty() {
                self.done(
                    "targetPools.removeInstance",
                    self.pools
                        .remove_instance()
                        .set_project(self.p())
                        .set_region(self.r())
                        .set_target_pool(self.lb_name(lb.index))
                        .set_body(
                            model::TargetPoolsRemoveInstanceRequest::new().set_instances(gone),
                        )
                        .poller()
                        .until_done()
                        .await,
                )?;
            }
        }
        Ok(())
    }
}
