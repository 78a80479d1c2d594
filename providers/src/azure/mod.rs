//! Azure Standard Load Balancer through Microsoft's `azure_core` 1.x pipeline and `azure_identity` 1.x, with the
//! provider's own typed ARM models ([`arm`]).
//!
//! One pool is one Standard Load Balancer that the operator owns (tagged). Each load balancer *of the pool* is a
//! frontend IP configuration `fe-<index>` on it with its own Standard public IP; each allocated port/protocol is
//! a load-balancing rule `r-<index>-<port>-<t|u>-<owner uid>` from that frontend to its node group's backend pool
//! on the Service's node port, with a TCP probe on the node port (UDP rules use kube-proxy's `/healthz` on 10256:
//! nothing answers TCP on a UDP node port). The node security group gets one rule per SharedLB and protocol
//! allowing exactly its node ports from its `sourceRanges` (the `Internet` tag when open; the health probes'
//! `AzureLoadBalancer` is admitted by every NSG's default rule).
//!
//! Azure lets 300 rules reach one NIC. The nodes are split into `node_groups` disjoint groups (by a hash of the
//! name, so churn never moves another node); frontend `i` sends to group `i % node_groups`, whose backend pool
//! (`nodes`, `nodes-1`, ...) holds a few of the group's nodes per zone. The planner keeps each group's frontends
//! within 300 ports together (`Limits::lb_groups`), so no NIC is behind more, and the pool holds
//! `300 x node_groups` ports up to the load balancer's 1,500 rules.
//!
//! Azure writes a load balancer or an NSG as one document. Rule changes are therefore queued per document and
//! written together: whoever gets the document's turn waits a short window, reads it, applies every queued edit,
//! and PUTs it once with `If-Match: <etag>`, reading and applying again on 412. A burst of SharedLBs costs a few
//! PUTs, and a concurrent writer (another operator replica, a human) never loses a change.

pub mod arm;
pub mod client;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use azure_core::credentials::{Secret, TokenCredential};
use azure_core::http::Transport;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Map;
use tokio::sync::oneshot;

use crate::{
    ApiCalls, Inventory, InventoryListener, InventoryLoadBalancer, Limits, ListenerSpec,
    LoadBalancerInfo, LoadBalancerKey, LoadBalancerProvider, NodeTarget, PortMode, Protocol,
    ProviderError, cloud_name_prefix, tags,
};
use arm::{
    BackendAddressProperties, BackendPoolProperties, Child, FrontendProperties, LoadBalancer,
    LoadBalancerProperties, NetworkSecurityGroup, ProbeProperties, PublicIpAddress,
    PublicIpProperties, Resource, RuleProperties, SecurityRuleProperties, Sku, SubResource,
};
use client::{ArmClient, Precondition, is_precondition_failed};

/// Load-balancing rules one Standard Load Balancer may hold.
pub const MAX_RULES_PER_LB: u32 = 1500;
/// Frontend IP configurations one Standard Load Balancer may hold.
pub const MAX_FRONTENDS_PER_LB: u32 = 600;
/// Load-balancing rules that may reach one NIC IP configuration: a node is behind every rule of its group's
/// frontends, so this caps the ports of each node group (`AzurePool::node_groups`).
pub const MAX_RULES_PER_NIC: u32 = 300;
/// Security rules one NSG may hold.
pub const MAX_NSG_RULES: u32 = 1000;
/// The NSG priorities sharedlb takes its rules from (lower is evaluated first; 100-499 are left to people).
pub const PRIORITIES: std::ops::RangeInclusive<u32> = 500..=4096;
/// kube-proxy's health endpoint, which UDP rules are probed on.
pub const KUBE_PROXY_HEALTH_PORT: u16 = 10256;
/// The backend pool of node group 0 (and of pools made before groups); group `g` > 0 has `nodes-<g>`.
const BACKEND_POOL: &str = "nodes";
const UDP_PROBE: &str = "probe-kube-proxy";

/// How the provider gets its Azure token. Its `Debug` never shows the secret.
#[derive(Clone)]
pub enum AzureAuth {
    /// What the pod has: workload identity when `AZURE_FEDERATED_TOKEN_FILE` is set, a client secret when
    /// `AZURE_CLIENT_SECRET` is (with `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`), else the managed identity
    /// (`AZURE_CLIENT_ID` picks a user-assigned one). `AZURE_AUTHORITY_HOST` names another Entra ID.
    Environment,
    /// A service principal's secret, from an explicit authority host (a sovereign cloud, or the tests' fake).
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: String,
        authority_host: Option<String>,
    },
}

impl std::fmt::Debug for AzureAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AzureAuth::Environment => f.write_str("Environment"),
            AzureAuth::ClientSecret {
                tenant_id,
                client_id,
                authority_host,
                secret: _,
            } => f
                .debug_struct("ClientSecret")
                .field("tenant_id", tenant_id)
                .field("client_id", client_id)
                .field("secret", &"<redacted>")
                .field("authority_host", authority_host)
                .finish(),
        }
    }
}

#[cfg(test)]
mod auth_debug_tests {
    use super::AzureAuth;

    #[test]
    fn debug_never_shows_the_secret() {
        let auth = AzureAuth::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: "hunter2-the-secret".into(),
            authority_host: None,
        };
        let shown = format!("{auth:?} {auth:#?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("client_id"),
            "{shown}"
        );
    }
}

/// An HTTP transport that trusts `ca_pem` besides the system's roots (a private ARM endpoint or proxy; the tests'
/// fake). Certificates are still verified.
pub fn transport_trusting(ca_pem: &[u8]) -> Result<Transport, ProviderError> {
    let cert = reqwest::Certificate::from_pem(ca_pem)
        .map_err(|e| ProviderError::InvalidConfig(format!("extra root CA: {e}")))?;
    let client = reqwest::Client::builder()
        .add_root_certificate(cert)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| ProviderError::InvalidConfig(format!("HTTP client: {e}")))?;
    Ok(Transport::new(Arc::new(client)))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn credential_error(e: azure_core::Error) -> ProviderError {
    ProviderError::InvalidConfig(format!("Azure credentials: {e}"))
}

/// The token credential for `auth`, its own HTTP calls going through `transport`.
pub fn credential(
    auth: &AzureAuth,
    transport: Option<Transport>,
) -> Result<Arc<dyn TokenCredential>, ProviderError> {
    use azure_core::cloud::{CloudConfiguration, CustomConfiguration};
    use azure_core::http::ClientOptions;
    use azure_identity::*;
    let options = |authority: Option<&str>| {
        let cloud = authority.map(|a| {
            let mut c = CustomConfiguration::default();
            c.authority_host = a.to_string();
            Arc::new(CloudConfiguration::from(c))
        });
        ClientOptions {
            transport: transport.clone(),
            retry: client::retry_options(),
            cloud,
            ..ClientOptions::default()
        }
    };
    match auth {
        AzureAuth::ClientSecret {
            tenant_id,
            client_id,
            secret,
            authority_host,
        } => {
            let c = ClientSecretCredential::new(
                tenant_id,
                client_id.clone(),
                Secret::new(secret.clone()),
                Some(ClientSecretCredentialOptions {
                    client_options: options(authority_host.as_deref()),
                }),
            )
            .map_err(credential_error)?;
            Ok(c)
        }
        AzureAuth::Environment => {
            if env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
                let c = WorkloadIdentityCredential::new(Some(WorkloadIdentityCredentialOptions {
                    credential_options: ClientAssertionCredentialOptions {
                        client_options: options(None),
                    },
                    ..Default::default()
                }))
                .map_err(credential_error)?;
                return Ok(c);
            }
            if let Some(secret) = env("AZURE_CLIENT_SECRET") {
                let (Some(tenant_id), Some(client_id)) =
                    (env("AZURE_TENANT_ID"), env("AZURE_CLIENT_ID"))
                else {
                    return Err(ProviderError::InvalidConfig(
                        "AZURE_CLIENT_SECRET is set but AZURE_TENANT_ID or AZURE_CLIENT_ID is not"
                            .into(),
                    ));
                };
                return credential(
                    &AzureAuth::ClientSecret {
                        tenant_id,
                        client_id,
                        secret,
                        authority_host: env("AZURE_AUTHORITY_HOST"),
                    },
                    transport,
                );
            }
            let c = ManagedIdentityCredential::new(Some(ManagedIdentityCredentialOptions {
                user_assigned_id: env("AZURE_CLIENT_ID").map(UserAssignedId::ClientId),
                client_options: options(None),
            }))
            .map_err(credential_error)?;
            Ok(c)
        }
    }
}

/// One pool's Azure settings.
#[derive(Clone)]
pub struct AzurePool {
    pub subscription_id: String,
    pub resource_group: String,
    pub location: String,
    /// The Standard Load Balancer this pool owns; default `<prefix>lb`.
    pub load_balancer_name: Option<String>,
    /// The nodes' network security group, which gets one rule per SharedLB.
    pub network_security_group: String,
    /// Its resource group, when not `resource_group`.
    pub network_security_group_resource_group: Option<String>,
    /// The nodes' virtual network (name in `resource_group`, or a full resource id): backend addresses are the
    /// nodes' IPs in it.
    pub virtual_network: String,
    /// Disjoint node groups (`placement::node_group`), one backend pool each; frontend `i` sends to group
    /// `i % node_groups`. 0 counts as 1.
    pub node_groups: u32,
    /// Nodes per zone each group's backend pool holds (`crate::target_nodes`); `None`: every node of the group.
    pub target_nodes_per_zone: Option<u32>,
    /// Each rule sends to a backend pool of its own holding the ready pods' IPs (`ListenerSpec::backends`) on
    /// their port, instead of a node group's pool on the node port.
    pub pod_targets: bool,
    /// ARM's endpoint; default `https://management.azure.com`.
    pub endpoint: Option<String>,
    pub credential: Arc<dyn TokenCredential>,
    pub transport: Option<Transport>,
    /// How long the first queued edit of a document waits for others before the write (again while more come,
    /// up to four times).
    pub batch_window: Duration,
    /// The shortest wait between polls of a long-running operation.
    pub min_poll: Duration,
}

impl std::fmt::Debug for AzurePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzurePool")
            .field("subscription_id", &self.subscription_id)
            .field("resource_group", &self.resource_group)
            .field("location", &self.location)
            .field("load_balancer_name", &self.load_balancer_name)
            .field("network_security_group", &self.network_security_group)
            .field("virtual_network", &self.virtual_network)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

type Edit<T> = Box<dyn Fn(&mut T) -> Result<(), ProviderError> + Send + Sync>;

struct Queued<T> {
    edit: Edit<T>,
    /// The result when the document does not exist and there is no fresh one to start from.
    if_missing: Result<(), ProviderError>,
    done: oneshot::Sender<Result<(), ProviderError>>,
}

/// The queue of edits to one ARM document and its write turn (see the module doc).
struct DocWriter<T> {
    path: String,
    /// `LoadBalancers`, `NetworkSecurityGroups`: the operation names' stem.
    kind: &'static str,
    queue: Mutex<Vec<Queued<T>>>,
    turn: tokio::sync::Mutex<()>,
    /// The document as last read or written by this process.
    last: Arc<Mutex<Option<T>>>,
    writes: AtomicU64,
}

impl<T> std::fmt::Debug for DocWriter<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DocWriter")
            .field("path", &self.path)
            .field("writes", &self.writes)
            .finish_non_exhaustive()
    }
}

trait Etagged {
    fn etag(&self) -> Option<&str>;
}

impl<P> Etagged for Resource<P> {
    fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }
}

impl<T> DocWriter<T>
where
    T: Clone + PartialEq + Serialize + DeserializeOwned + Etagged + Send + Sync,
{
    fn new(path: String, kind: &'static str) -> Self {
        DocWriter {
            path,
            kind,
            queue: Mutex::new(Vec::new()),
            turn: tokio::sync::Mutex::new(()),
            last: Arc::new(Mutex::new(None)),
            writes: AtomicU64::new(0),
        }
    }

    fn remember(&self, doc: Option<T>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = doc;
    }

    async fn read(&self, arm: &ArmClient) -> Result<Option<T>, ProviderError> {
        let doc: Option<T> = arm.get(&format!("{}.Get", self.kind), &self.path).await?;
        self.remember(doc.clone());
        Ok(doc)
    }

    /// Applies `edit` to the document together with every edit queued meanwhile, in one PUT: the write waits
    /// `window`, and again while more edits arrived in the last one (at most four windows). `fresh` is
    /// the document to start from when it does not exist; without one, an edit of a missing document has no
    /// effect and gives `if_missing`.
    async fn edit(
        &self,
        arm: &ArmClient,
        window: Duration,
        fresh: Option<T>,
        if_missing: Result<(), ProviderError>,
        edit: Edit<T>,
    ) -> Result<(), ProviderError> {
        let (tx, mut rx) = oneshot::channel();
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Queued {
                edit,
                if_missing,
                done: tx,
            });
        let _turn = self.turn.lock().await;
        match rx.try_recv() {
            Ok(r) => return r,
            Err(oneshot::error::TryRecvError::Closed) => {
                return Err(ProviderError::Other(format!(
                    "{}: the write that carried this change was cancelled",
                    self.kind
                )));
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // wait while edits keep coming, up to four windows: a burst becomes one write
        let queued = || self.queue.lock().unwrap_or_else(|e| e.into_inner()).len();
        let mut seen = queued();
        for _ in 0..4 {
            tokio::time::sleep(window).await;
            let now = queued();
            if now == seen {
                break;
            }
            seen = now;
        }
        let batch = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|e| e.into_inner()));
        let results = self.write(arm, fresh, &batch).await;
        for (q, r) in batch.into_iter().zip(results) {
            let _ = q.done.send(r);
        }
        rx.await.unwrap_or_else(|_| {
            Err(ProviderError::Other(format!(
                "{}: the change was not carried",
                self.kind
            )))
        })
    }

    /// One read-modify-write of `batch`, retried on 412; a result per edit.
    async fn write(
        &self,
        arm: &ArmClient,
        fresh: Option<T>,
        batch: &[Queued<T>],
    ) -> Vec<Result<(), ProviderError>> {
        let fail = |e: ProviderError| batch.iter().map(|_| Err(e.clone())).collect();
        for _ in 0..8 {
            let current = match self.read(arm).await {
                Ok(d) => d,
                Err(e) => return fail(e),
            };
            let Some(mut doc) = current.clone().or_else(|| fresh.clone()) else {
                return batch.iter().map(|q| q.if_missing.clone()).collect();
            };
            let mut results = Vec::with_capacity(batch.len());
            for q in batch {
                let mut trial = doc.clone();
                match (q.edit)(&mut trial) {
                    Ok(()) => {
                        doc = trial;
                        results.push(Ok(()));
                    }
                    Err(e) => results.push(Err(e)),
                }
            }
            let nothing_to_write = match &current {
                Some(c) => *c == doc,
                None => results.iter().all(Result::is_err),
            };
            if nothing_to_write {
                return results;
            }
            let precondition = match current.as_ref().and_then(Etagged::etag) {
                Some(etag) => Precondition::IfMatch(etag),
                None if current.is_none() => Precondition::IfNoneMatch,
                None => Precondition::None,
            };
            self.writes.fetch_add(1, Ordering::Relaxed);
            let put = arm
                .put(
                    &format!("{}.CreateOrUpdate", self.kind),
                    &self.path,
                    &doc,
                    precondition,
                )
                .await;
            match put {
                Ok(()) => {
                    self.remember(Some(doc));
                    return results;
                }
                Err(e) if is_precondition_failed(&e) => {
                    tracing::debug!(path = %self.path, "the document changed since it was read; again");
                }
                Err(e) => {
                    return results.into_iter().map(|r| r.and(Err(e.clone()))).collect();
                }
            }
        }
        fail(ProviderError::Other(format!(
            "{}: the document kept changing under every write (8 ETag conflicts)",
            self.kind
        )))
    }
}

/// `azure:///subscriptions/.../virtualMachines/<name>` or a scale set's VM: a node Azure can send traffic to.
pub fn is_azure_node(provider_id: &str) -> bool {
    provider_id.starts_with("azure://") && provider_id.contains("/virtualMachine")
}

fn proto_letter(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "t",
        Protocol::Udp => "u",
    }
}

fn arm_protocol(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "Tcp",
        Protocol::Udp => "Udp",
    }
}

/// `r-<index>-<port>-<t|u>-<uid>` -> (index, port, protocol, uid)
fn parse_rule_name(name: &str) -> Option<(u32, u16, Protocol, String)> {
    let mut it = name.splitn(5, '-');
    if it.next()? != "r" {
        return None;
    }
    let index = it.next()?.parse().ok()?;
    let port = it.next()?.parse().ok()?;
    let protocol = match it.next()? {
        "t" => Protocol::Tcp,
        "u" => Protocol::Udp,
        _ => return None,
    };
    Some((index, port, protocol, it.next()?.to_string()))
}

/// The node ports the load balancer's rules forward to, by owner and protocol: what the NSG must allow.
fn forwarded_node_ports(lb: Option<&LoadBalancer>) -> BTreeMap<(String, Protocol), BTreeSet<u16>> {
    let mut out: BTreeMap<(String, Protocol), BTreeSet<u16>> = BTreeMap::new();
    for r in lb
        .map(|lb| lb.properties.rules.as_slice())
        .unwrap_or_default()
    {
        if let Some((_, _, protocol, owner)) = parse_rule_name(&r.name) {
            out.entry((owner, protocol))
                .or_default()
                .insert(r.properties.backend_port);
        }
    }
    out
}

fn rule_prefix(index: u32, port: u16, protocol: Protocol) -> String {
    format!("r-{index}-{port}-{}-", proto_letter(protocol))
}

/// `<prefix><uid>-tcp|udp`: the NSG rule of one owner and protocol.
fn nsg_rule_name(prefix: &str, uid: &str, protocol: Protocol) -> String {
    format!("{prefix}{uid}-{}", arm_protocol(protocol).to_lowercase())
}

/// (owner uid, protocol) of an NSG rule named by `nsg_rule_name` with this prefix.
fn parse_nsg_rule_name(prefix: &str, name: &str) -> Option<(String, Protocol)> {
    let (uid, protocol) = name.strip_prefix(prefix)?.rsplit_once('-')?;
    let protocol = match protocol {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return None,
    };
    Some((uid.to_string(), protocol))
}

/// The backend pool of the pods behind one port of frontend `index` (pod targets).
fn pod_pool_name(index: u32, port: u16, protocol: Protocol) -> String {
    format!("pods-{index}-{port}-{}", proto_letter(protocol))
}

/// Node group `group`'s backend pool.
fn backend_pool_name(group: u32) -> String {
    match group {
        0 => BACKEND_POOL.to_string(),
        g => format!("{BACKEND_POOL}-{g}"),
    }
}

fn frontend_name(index: u32) -> String {
    format!("fe-{index}")
}

/// The frontend carries this public IP (ARM ids compare without case).
fn frontend_uses(f: &Child<FrontendProperties>, ip_id: &str) -> bool {
    f.properties
        .public_ip
        .as_ref()
        .is_some_and(|p| p.id.eq_ignore_ascii_case(ip_id))
}

/// What no rule refers to any more goes, in the same write as the rules: sharedlb's probes (`probe-*`) and pod
/// pools (`pods-*`). A rule names them by id, whose last segment is the name (ARM names compare without case).
fn drop_unreferenced(lb: &mut LoadBalancer) {
    let referenced = |pick: fn(&RuleProperties) -> Option<&SubResource>| -> BTreeSet<String> {
        lb.properties
            .rules
            .iter()
            .filter_map(|r| pick(&r.properties))
            .filter_map(|p| p.id.rsplit('/').next())
            .map(str::to_lowercase)
            .collect()
    };
    let probes = referenced(|r| r.probe.as_ref());
    let pools = referenced(|r| r.backend_pool.as_ref());
    lb.properties
        .probes
        .retain(|p| !p.name.starts_with("probe-") || probes.contains(&p.name.to_lowercase()));
    lb.properties
        .backend_pools
        .retain(|b| !b.name.starts_with("pods-") || pools.contains(&b.name.to_lowercase()));
}

/// Where one load-balancing rule sends: a backend pool, the port on its members, the health probe (name and
/// settings; none for UDP to pods, which answer nothing Azure can ask), and for pod targets the addresses that
/// pool holds (written with the rule, in the same document).
struct RuleTarget {
    pool: String,
    port: u16,
    probe: Option<(String, ProbeProperties)>,
    pod_addresses: Option<Vec<Child<BackendAddressProperties>>>,
}

impl RuleTarget {
    /// Puts the probe and the pod pool this rule needs into the load balancer.
    fn put_into(&self, doc: &mut LoadBalancer) {
        if let Some((name, props)) = &self.probe
            && !doc.properties.probes.iter().any(|p| &p.name == name)
        {
            doc.properties
                .probes
                .push(Child::new(name.clone(), props.clone()));
        }
        let Some(addresses) = &self.pod_addresses else {
            return;
        };
        match doc
            .properties
            .backend_pools
            .iter_mut()
            .find(|b| b.name == self.pool)
        {
            Some(b) => b.properties.addresses = addresses.clone(),
            None => {
                let mut b = Child::new(self.pool.clone(), BackendPoolProperties::default());
                b.properties.addresses = addresses.clone();
                doc.properties.backend_pools.push(b);
            }
        }
    }
}

fn probe_settings(protocol: &str, port: u16, path: Option<&str>) -> ProbeProperties {
    ProbeProperties {
        protocol: protocol.into(),
        port,
        interval_seconds: Some(5),
        number_of_probes: Some(2),
        request_path: path.map(str::to_string),
        other: Map::new(),
    }
}

/// One Azure account's view for one pool.
#[derive(Debug)]
pub struct AzureProvider {
    cluster_id: String,
    pool: String,
    prefix: String,
    arm: ArmClient,
    location: String,
    /// `/subscriptions/<s>/resourceGroups/<rg>/providers/Microsoft.Network`
    network: String,
    lb_id: String,
    vnet_id: String,
    lb: DocWriter<LoadBalancer>,
    nsg: DocWriter<NetworkSecurityGroup>,
    window: Duration,
    node_groups: u32,
    target_nodes_per_zone: Option<u32>,
    pod_targets: bool,
    /// The nodes last given.
    nodes: Mutex<Vec<NodeTarget>>,
    /// NSG rules that are not this pool's (they share the NSG's 1,000).
    foreign_nsg_rules: AtomicU32,
}

impl AzureProvider {
    /// Checks the settings against Azure (the NSG and virtual network exist) before anything is made.
    pub async fn new(
        cluster_id: &str,
        pool: &str,
        settings: AzurePool,
    ) -> Result<Self, ProviderError> {
        for (what, v) in [
            ("subscriptionId", &settings.subscription_id),
            ("resourceGroup", &settings.resource_group),
            ("location", &settings.location),
            ("networkSecurityGroup", &settings.network_security_group),
            ("virtualNetwork", &settings.virtual_network),
        ] {
            if v.is_empty() || v.contains(['?', '#']) {
                return Err(ProviderError::InvalidConfig(format!(
                    "azure.{what} is required (got {v:?})"
                )));
            }
        }
        let endpoint = settings
            .endpoint
            .clone()
            .unwrap_or_else(|| "https://management.azure.com".into());
        let arm = ArmClient::new(
            &endpoint,
            settings.credential.clone(),
            settings.transport.clone(),
            settings.min_poll,
        )?;
        let prefix = cloud_name_prefix(cluster_id, pool);
        let rg = |g: &str| {
            format!(
                "/subscriptions/{}/resourceGroups/{g}",
                settings.subscription_id
            )
        };
        let network = format!(
            "{}/providers/Microsoft.Network",
            rg(&settings.resource_group)
        );
        let lb_name = settings
            .load_balancer_name
            .clone()
            .unwrap_or_else(|| format!("{prefix}lb"));
        let lb_id = format!("{network}/loadBalancers/{lb_name}");
        let nsg_rg = settings
            .network_security_group_resource_group
            .clone()
            .unwrap_or_else(|| settings.resource_group.clone());
        let nsg_id = format!(
            "{}/providers/Microsoft.Network/networkSecurityGroups/{}",
            rg(&nsg_rg),
            settings.network_security_group
        );
        let vnet_id = if settings.virtual_network.starts_with("/subscriptions/") {
            settings.virtual_network.clone()
        } else {
            format!("{network}/virtualNetworks/{}", settings.virtual_network)
        };
        let p = AzureProvider {
            cluster_id: cluster_id.to_string(),
            pool: pool.to_string(),
            prefix,
            location: settings.location.clone(),
            network,
            lb: DocWriter::new(lb_id.clone(), "LoadBalancers"),
            nsg: DocWriter::new(nsg_id.clone(), "NetworkSecurityGroups"),
            lb_id,
            vnet_id: vnet_id.clone(),
            arm,
            window: settings.batch_window,
            node_groups: settings.node_groups.max(1),
            target_nodes_per_zone: settings.target_nodes_per_zone,
            pod_targets: settings.pod_targets,
            nodes: Mutex::new(Vec::new()),
            foreign_nsg_rules: AtomicU32::new(0),
        };
        let vnet: Option<serde_json::Value> = p.arm.get("VirtualNetworks.Get", &vnet_id).await?;
        if vnet.is_none() {
            return Err(ProviderError::InvalidConfig(format!(
                "virtual network {vnet_id} not found"
            )));
        }
        let nsg = p.nsg.read(&p.arm).await?.ok_or_else(|| {
            ProviderError::InvalidConfig(format!("network security group {nsg_id} not found"))
        })?;
        p.count_foreign(&nsg);
        // a load balancer of the same name that is not this pool's is never taken over
        if let Some(lb) = p.lb.read(&p.arm).await?
            && !p.ours(&lb.tags)
        {
            return Err(ProviderError::InvalidConfig(format!(
                "load balancer {} exists and is not this pool's (tags {:?})",
                p.lb_id, lb.tags
            )));
        }
        Ok(p)
    }

    /// How many times a load balancer and an NSG document were written (PUT), for the batching figures.
    pub fn document_writes(&self) -> (u64, u64) {
        (
            self.lb.writes.load(Ordering::Relaxed),
            self.nsg.writes.load(Ordering::Relaxed),
        )
    }

    fn tags(&self, index: Option<u32>) -> BTreeMap<String, String> {
        let mut t = BTreeMap::from([
            (tags::MANAGED_BY.to_string(), "sharedlb".to_string()),
            (tags::CLUSTER.to_string(), self.cluster_id.clone()),
            (tags::POOL.to_string(), self.pool.clone()),
        ]);
        if let Some(i) = index {
            t.insert(tags::INDEX.to_string(), i.to_string());
        }
        t
    }

    fn ours(&self, t: &BTreeMap<String, String>) -> bool {
        t.get(tags::MANAGED_BY).map(String::as_str) == Some("sharedlb")
            && t.get(tags::CLUSTER) == Some(&self.cluster_id)
            && t.get(tags::POOL) == Some(&self.pool)
    }

    fn ip_name(&self, index: u32) -> String {
        format!("{}ip-{index}", self.prefix)
    }

    fn ip_path(&self, index: u32) -> String {
        format!("{}/publicIPAddresses/{}", self.network, self.ip_name(index))
    }

    fn frontend_id(&self, index: u32) -> String {
        format!(
            "{}/frontendIPConfigurations/{}",
            self.lb_id,
            frontend_name(index)
        )
    }

    fn nsg_rule_name(&self, uid: &str, protocol: Protocol) -> String {
        nsg_rule_name(&self.prefix, uid, protocol)
    }

    fn count_foreign(&self, nsg: &NetworkSecurityGroup) {
        let foreign = nsg
            .properties
            .security_rules
            .iter()
            .filter(|r| !r.name.starts_with(&self.prefix))
            .count();
        self.foreign_nsg_rules.store(
            u32::try_from(foreign).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
    }

    /// Where listener `l` of frontend `index` sends: its node group's pool on the node port (a TCP probe on it,
    /// kube-proxy's health port for UDP), or with pod targets a pool of its own holding the ready pods on their
    /// port, which must be one port (a rule has one backend port).
    fn rule_target(&self, index: u32, l: &ListenerSpec) -> Result<RuleTarget, ProviderError> {
        if !self.pod_targets {
            let probe = match l.protocol {
                Protocol::Tcp => (
                    format!("probe-{}", l.node_port),
                    probe_settings("Tcp", l.node_port, None),
                ),
                Protocol::Udp => (
                    UDP_PROBE.to_string(),
                    probe_settings("Http", KUBE_PROXY_HEALTH_PORT, Some("/healthz")),
                ),
            };
            return Ok(RuleTarget {
                pool: self.backend_pool_of(index),
                port: l.node_port,
                probe: Some(probe),
                pod_addresses: None,
            });
        }
        let ports: BTreeSet<u16> = l.backends.iter().map(|a| a.port()).collect();
        if ports.len() > 1 {
            return Err(ProviderError::InvalidConfig(format!(
                "azure: the ready pods behind port {} listen on different ports {ports:?}; a load-balancing rule sends to one",
                l.port
            )));
        }
        // no ready pod yet: an empty pool, on the listener's own port until one comes
        let port = ports.first().copied().unwrap_or(l.port);
        let mut addresses: Vec<Child<BackendAddressProperties>> = l
            .backends
            .iter()
            .map(|a| {
                Child::new(
                    a.ip().to_string(),
                    BackendAddressProperties {
                        ip_address: Some(a.ip().to_string()),
                        virtual_network: Some(SubResource {
                            id: self.vnet_id.clone(),
                        }),
                        other: Map::new(),
                    },
                )
            })
            .collect();
        addresses.sort_by(|a, b| a.name.cmp(&b.name));
        addresses.dedup_by(|a, b| a.name == b.name);
        let probe = (l.protocol == Protocol::Tcp)
            .then(|| (format!("probe-{port}"), probe_settings("Tcp", port, None)));
        Ok(RuleTarget {
            pool: pod_pool_name(index, l.port, l.protocol),
            port,
            probe,
            pod_addresses: Some(addresses),
        })
    }

    /// The backend pool frontend `index` sends to: its node group's.
    fn backend_pool_of(&self, index: u32) -> String {
        backend_pool_name(index % self.node_groups)
    }

    /// The addresses group `group`'s backend pool holds: the group's Azure nodes with an internal IP, a few
    /// per zone, sorted by name.
    fn group_backends(&self, group: u32) -> Vec<Child<BackendAddressProperties>> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let members: Vec<NodeTarget> = nodes
            .iter()
            .filter(|n| n.provider_id.as_deref().is_some_and(is_azure_node))
            .filter(|n| n.internal_ip.is_some())
            .filter(|n| sharedlb_placement::node_group(&n.name, self.node_groups) == group)
            .cloned()
            .collect();
        let name = backend_pool_name(group);
        let mut out: Vec<Child<BackendAddressProperties>> =
            crate::target_nodes(&name, &members, self.target_nodes_per_zone)
                .into_iter()
                .map(|n| {
                    Child::new(
                        n.name.clone(),
                        BackendAddressProperties {
                            ip_address: n.internal_ip.clone(),
                            virtual_network: Some(SubResource {
                                id: self.vnet_id.clone(),
                            }),
                            other: Map::new(),
                        },
                    )
                })
                .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The load balancer as first written: Standard SKU, tagged, an empty backend pool per node group (their
    /// addresses are written through the backend pools themselves, see `sync_backends`).
    fn fresh_lb(&self) -> LoadBalancer {
        Resource {
            id: None,
            name: None,
            location: Some(self.location.clone()),
            tags: self.tags(None),
            etag: None,
            sku: Some(Sku {
                name: "Standard".into(),
                tier: Some("Regional".into()),
            }),
            properties: LoadBalancerProperties {
                backend_pools: (0..self.node_groups)
                    .map(|g| Child::new(backend_pool_name(g), BackendPoolProperties::default()))
                    .collect(),
                ..LoadBalancerProperties::default()
            },
            other: Map::new(),
        }
    }

    /// Queues `edit` of the load balancer; `create` starts a missing one afresh, else a missing one gives
    /// `if_missing`.
    async fn edit_lb(
        &self,
        create: bool,
        if_missing: Result<(), ProviderError>,
        edit: impl Fn(&mut LoadBalancer) -> Result<(), ProviderError> + Send + Sync + 'static,
    ) -> Result<(), ProviderError> {
        let fresh = create.then(|| self.fresh_lb());
        self.lb
            .edit(&self.arm, self.window, fresh, if_missing, Box::new(edit))
            .await
    }

    /// Makes the owner's NSG rules (one per protocol) allow exactly the node ports its load-balancing rules
    /// forward to, as the load balancer was last read or written; `sources` replaces the allowed sources
    /// (`None` keeps them).
    async fn sync_nsg_owner(
        &self,
        uid: &str,
        description: Option<String>,
        sources: Option<Vec<String>>,
    ) -> Result<(), ProviderError> {
        let last_lb = self.lb.last.clone();
        let uid = uid.to_string();
        // what is removed from an NSG that vanished is gone; what is added is not
        let if_missing = match sources {
            Some(_) => Err(ProviderError::InvalidConfig(format!(
                "network security group {} not found",
                self.nsg.path
            ))),
            None => Ok(()),
        };
        let names = [Protocol::Tcp, Protocol::Udp].map(|p| (p, self.nsg_rule_name(&uid, p)));
        let edit = move |nsg: &mut NetworkSecurityGroup| {
            let ports =
                forwarded_node_ports(last_lb.lock().unwrap_or_else(|e| e.into_inner()).as_ref());
            for (protocol, name) in &names {
                let rules = &mut nsg.properties.security_rules;
                let at = rules.iter().position(|r| &r.name == name);
                let wanted = ports.get(&(uid.clone(), *protocol));
                let Some(wanted) = wanted else {
                    if let Some(i) = at {
                        rules.remove(i);
                    }
                    continue;
                };
                let existing = at.map(|i| rules[i].properties.clone());
                let cidrs: Vec<String> = match &sources {
                    Some(s) => s.clone(),
                    // earlier versions put the tags in the list too; only addresses are the user's
                    None => existing
                        .as_ref()
                        .map(|e| {
                            e.source_address_prefixes
                                .iter()
                                .filter(|p| *p != "AzureLoadBalancer" && *p != "Internet")
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                // Azure takes a service tag only alone, in the single field; the health probes come from
                // AzureLoadBalancer, which every NSG's default rule 65001 admits
                let (prefix, prefixes) = match cidrs.is_empty() {
                    true => (Some("Internet".to_string()), Vec::new()),
                    false => (None, cidrs),
                };
                let priority =
                    match &existing {
                        Some(e) => e.priority,
                        None => {
                            let used: BTreeSet<u32> = rules
                                .iter()
                                .filter(|r| r.properties.direction.eq_ignore_ascii_case("Inbound"))
                                .map(|r| r.properties.priority)
                                .collect();
                            PRIORITIES.clone().find(|p| !used.contains(p)).ok_or_else(|| {
                            ProviderError::QuotaExceeded(format!(
                                "network security group: no free inbound priority in {}..={}",
                                PRIORITIES.start(),
                                PRIORITIES.end()
                            ))
                        })?
                        }
                    };
                let props = SecurityRuleProperties {
                    protocol: arm_protocol(*protocol).into(),
                    source_port_range: Some("*".into()),
                    destination_port_range: None,
                    destination_port_ranges: wanted.iter().map(u16::to_string).collect(),
                    source_address_prefix: prefix,
                    source_address_prefixes: prefixes,
                    destination_address_prefix: Some("*".into()),
                    access: "Allow".into(),
                    priority,
                    direction: "Inbound".into(),
                    description: description
                        .clone()
                        .or_else(|| existing.as_ref().and_then(|e| e.description.clone())),
                    other: existing.map(|e| e.other).unwrap_or_default(),
                };
                match at {
                    Some(i) => rules[i].properties = props,
                    None => rules.push(Child::new(name.clone(), props)),
                }
            }
            Ok(())
        };
        self.nsg
            .edit(&self.arm, self.window, None, if_missing, Box::new(edit))
            .await
    }

    /// Makes each node group's backend pool hold exactly its nodes of those last given, through the backend
    /// pool's own resource (how Azure updates IP-based pools): one GET of the load balancer, and one PUT per pool
    /// that differs. In the load balancer's write turn; its next batched write reads the result.
    async fn sync_backends(&self) -> Result<(), ProviderError> {
        let _turn = self.lb.turn.lock().await;
        let Some(doc) = self.lb.read(&self.arm).await? else {
            return Ok(());
        };
        let mut wrote = false;
        let mut result = Ok(());
        for group in 0..self.node_groups {
            let name = backend_pool_name(group);
            let wanted = self.group_backends(group);
            let existing = doc.properties.backend_pools.iter().find(|b| b.name == name);
            let held = |a: &Child<BackendAddressProperties>| {
                (a.name.clone(), a.properties.ip_address.clone())
            };
            let mut have: Vec<_> = existing
                .map(|p| p.properties.addresses.iter().map(held).collect())
                .unwrap_or_default();
            have.sort();
            let want: Vec<_> = wanted.iter().map(held).collect();
            if existing.is_some() && have == want {
                continue;
            }
            let mut pool = existing
                .cloned()
                .unwrap_or_else(|| Child::new(name.clone(), BackendPoolProperties::default()));
            pool.properties.addresses = wanted;
            wrote = true;
            result = self
                .arm
                .put(
                    "LoadBalancerBackendAddressPools.CreateOrUpdate",
                    &format!("{}/backendAddressPools/{name}", self.lb_id),
                    &pool,
                    Precondition::None,
                )
                .await;
            if result.is_err() {
                break;
            }
        }
        if wrote {
            // what this process holds of the document is stale now
            let _ = self.lb.read(&self.arm).await;
        }
        result
    }

    /// Shrinks or removes this pool's NSG rules to the node ports the load balancer (as last read or written)
    /// still forwards to; never adds.
    async fn prune_nsg(&self) -> Result<(), ProviderError> {
        let last_lb = self.lb.last.clone();
        let prefix = self.prefix.clone();
        let edit = move |nsg: &mut NetworkSecurityGroup| {
            let live =
                forwarded_node_ports(last_lb.lock().unwrap_or_else(|e| e.into_inner()).as_ref());
            nsg.properties.security_rules.retain_mut(|r| {
                let Some(owner) = parse_nsg_rule_name(&prefix, &r.name) else {
                    return true;
                };
                let Some(ports) = live.get(&owner) else {
                    return false;
                };
                r.properties
                    .destination_port_ranges
                    .retain(|p| p.parse().is_ok_and(|p| ports.contains(&p)));
                !r.properties.destination_port_ranges.is_empty()
            });
            Ok(())
        };
        self.nsg
            .edit(&self.arm, self.window, None, Ok(()), Box::new(edit))
            .await
    }

    async fn public_ip(&self, index: u32) -> Result<Option<PublicIpAddress>, ProviderError> {
        self.arm
            .get("PublicIPAddresses.Get", &self.ip_path(index))
            .await
    }

    async fn ensure_public_ip(&self, index: u32) -> Result<PublicIpAddress, ProviderError> {
        if let Some(ip) = self.public_ip(index).await? {
            if !self.ours(&ip.tags) {
                return Err(ProviderError::AlreadyExists(format!(
                    "public IP {} exists and is not this pool's",
                    self.ip_name(index)
                )));
            }
            if ip.properties.ip_address.is_some() {
                return Ok(ip);
            }
        } else {
            let ip = Resource {
                id: None,
                name: None,
                location: Some(self.location.clone()),
                tags: self.tags(Some(index)),
                etag: None,
                sku: Some(Sku {
                    name: "Standard".into(),
                    tier: Some("Regional".into()),
                }),
                properties: PublicIpProperties {
                    allocation_method: Some("Static".into()),
                    version: Some("IPv4".into()),
                    ip_address: None,
                    other: Map::new(),
                },
                other: Map::new(),
            };
            let put = self
                .arm
                .put(
                    "PublicIPAddresses.CreateOrUpdate",
                    &self.ip_path(index),
                    &ip,
                    Precondition::IfNoneMatch,
                )
                .await;
            // made meanwhile by another ensure: read it
            if let Err(e) = put
                && !is_precondition_failed(&e)
            {
                return Err(e);
            }
        }
        let ip = self.public_ip(index).await?.ok_or_else(|| {
            ProviderError::Other(format!("public IP {} vanished", self.ip_name(index)))
        })?;
        if ip.properties.ip_address.is_none() {
            return Err(ProviderError::Other(format!(
                "public IP {} has no address yet",
                self.ip_name(index)
            )));
        }
        Ok(ip)
    }

    /// The load balancer's frontend indexes and listeners.
    fn listeners_of(lb: &LoadBalancer) -> BTreeMap<u32, Vec<InventoryListener>> {
        let mut out: BTreeMap<u32, Vec<InventoryListener>> = BTreeMap::new();
        for f in &lb.properties.frontends {
            if let Some(i) = f.name.strip_prefix("fe-").and_then(|i| i.parse().ok()) {
                out.entry(i).or_default();
            }
        }
        for r in &lb.properties.rules {
            if let Some((index, port, protocol, owner_uid)) = parse_rule_name(&r.name) {
                out.entry(index).or_default().push(InventoryListener {
                    port,
                    protocol,
                    node_port: r.properties.backend_port,
                    owner_uid,
                    serving: true,
                });
            }
        }
        for ls in out.values_mut() {
            ls.sort();
        }
        out
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for AzureProvider {
    fn kind(&self) -> &'static str {
        "azure"
    }

    fn api_calls(&self) -> Vec<ApiCalls> {
        self.arm.api_calls()
    }

    fn forwards_to_endpoints(&self) -> bool {
        self.pod_targets
    }

    fn needs_node_ports(&self) -> bool {
        !self.pod_targets
    }

    fn limits(&self) -> Limits {
        let nsg_room = MAX_NSG_RULES.saturating_sub(self.foreign_nsg_rules.load(Ordering::Relaxed));
        // every rule of the pool is on one Azure load balancer; a group's rules reach each of its nodes' NICs,
        // while a pod is behind the rules of its own Service's ports only
        if self.pod_targets {
            let total = MAX_RULES_PER_LB.min(nsg_room).max(1);
            return Limits {
                max_ports_per_lb: total,
                max_lbs: Some(MAX_FRONTENDS_PER_LB),
                max_ports_total: Some(total),
                port_mode: PortMode::PerLoadBalancer,
                lb_groups: None,
            };
        }
        let total = MAX_RULES_PER_LB
            .min(MAX_RULES_PER_NIC * self.node_groups)
            .min(nsg_room)
            .max(1);
        Limits {
            max_ports_per_lb: MAX_RULES_PER_NIC.min(total),
            max_lbs: Some(MAX_FRONTENDS_PER_LB),
            max_ports_total: Some(total),
            port_mode: PortMode::PerLoadBalancer,
            // one group's budget is the pool's own (`total`): no group bookkeeping for the planner then
            lb_groups: (self.node_groups > 1).then_some(crate::LbGroups {
                count: self.node_groups,
                max_ports: MAX_RULES_PER_NIC,
            }),
        }
    }

    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        let index = lb.index;
        let backend_pool = self.backend_pool_of(index);
        let ip = self.ensure_public_ip(index).await?;
        let ip_id = ip.id.clone().unwrap_or_else(|| self.ip_path(index));
        let name = frontend_name(index);
        let info = LoadBalancerInfo {
            id: self.frontend_id(index),
            ip: ip.properties.ip_address.clone(),
            hostname: None,
        };
        // the frontend as last read or written: nothing to do (a frontend removed behind our back fails the next
        // rule edit, which reads the document afresh, so this is asked again)
        let known = self
            .lb
            .last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|doc| {
                doc.properties
                    .frontends
                    .iter()
                    .any(|f| f.name == name && frontend_uses(f, &ip_id))
            });
        if known {
            return Ok(info);
        }
        self.edit_lb(true, Ok(()), move |doc| {
            let public_ip = Some(SubResource { id: ip_id.clone() });
            match doc.properties.frontends.iter_mut().find(|f| f.name == name) {
                Some(f) if frontend_uses(f, &ip_id) => {}
                Some(f) => f.properties.public_ip = public_ip,
                None => doc.properties.frontends.push(Child::new(
                    name.clone(),
                    FrontendProperties {
                        public_ip,
                        other: Map::new(),
                    },
                )),
            }
            if !doc
                .properties
                .backend_pools
                .iter()
                .any(|b| b.name == backend_pool)
            {
                doc.properties.backend_pools.push(Child::new(
                    backend_pool.clone(),
                    BackendPoolProperties::default(),
                ));
            }
            Ok(())
        })
        .await?;
        // a load balancer made just now gets the nodes' addresses (pod pools come with their rules)
        if !self.pod_targets {
            self.sync_backends().await?;
        }
        Ok(info)
    }

    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        let (index, port, protocol) = (lb.index, l.port, l.protocol);
        let uid = l.owner.uid.clone();
        let lb_id = self.lb_id.clone();
        let target = self.rule_target(index, l)?;
        let missing = ProviderError::NotFound(format!(
            "load balancer {} (ensure the load balancer first)",
            self.lb_id
        ));
        self.edit_lb(false, Err(missing), move |doc| {
            let fe = frontend_name(index);
            if !doc.properties.frontends.iter().any(|f| f.name == fe) {
                return Err(ProviderError::NotFound(format!(
                    "frontend {fe} of {lb_id} (ensure the load balancer first)"
                )));
            }
            let prefix = rule_prefix(index, port, protocol);
            let name = format!("{prefix}{uid}");
            // the planner gave this port to `uid`: a rule of a previous owner goes
            doc.properties
                .rules
                .retain(|r| !r.name.starts_with(&prefix) || r.name == name);
            target.put_into(doc);
            let props = RuleProperties {
                frontend: SubResource {
                    id: format!("{lb_id}/frontendIPConfigurations/{fe}"),
                },
                backend_pool: Some(SubResource {
                    id: format!("{lb_id}/backendAddressPools/{}", target.pool),
                }),
                probe: target.probe.as_ref().map(|(probe, _)| SubResource {
                    id: format!("{lb_id}/probes/{probe}"),
                }),
                protocol: arm_protocol(protocol).into(),
                frontend_port: port,
                backend_port: target.port,
                floating_ip: false,
                disable_outbound_snat: true,
                other: Map::new(),
            };
            match doc.properties.rules.iter_mut().find(|r| r.name == name) {
                Some(r) => {
                    let other = std::mem::take(&mut r.properties.other);
                    r.properties = RuleProperties { other, ..props };
                }
                None => doc.properties.rules.push(Child::new(name, props)),
            }
            drop_unreferenced(doc);
            Ok(())
        })
        .await?;
        let description = format!(
            "sharedlb {}/{} {}",
            l.owner.namespace, l.owner.name, l.owner.uid
        );
        let description: String = description.chars().take(140).collect();
        self.sync_nsg_owner(
            &l.owner.uid,
            Some(description),
            Some(l.source_ranges.clone()),
        )
        .await
    }

    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        let name = format!("{}{owner_uid}", rule_prefix(lb.index, port, protocol));
        self.edit_lb(false, Ok(()), move |doc| {
            doc.properties.rules.retain(|r| r.name != name);
            drop_unreferenced(doc);
            Ok(())
        })
        .await?;
        self.sync_nsg_owner(owner_uid, None, None).await
    }

    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        let index = lb.index;
        let fe = frontend_name(index);
        self.edit_lb(false, Ok(()), move |doc| {
            doc.properties
                .rules
                .retain(|r| parse_rule_name(&r.name).is_none_or(|(i, ..)| i != index));
            doc.properties.frontends.retain(|f| f.name != fe);
            drop_unreferenced(doc);
            Ok(())
        })
        .await?;
        // the NSG rules follow what the load balancer still forwards: those of this frontend's rules go, and
        // any orphaned by a crash between a load balancer write and its NSG write
        self.prune_nsg().await?;
        {
            // the last frontend gone: the load balancer goes, in its write turn so no edit races it
            let _turn = self.lb.turn.lock().await;
            if let Some(doc) = self.lb.read(&self.arm).await?
                && doc.properties.frontends.is_empty()
            {
                self.arm.delete("LoadBalancers.Delete", &self.lb_id).await?;
                self.lb.remember(None);
            }
        }
        self.arm
            .delete("PublicIPAddresses.Delete", &self.ip_path(index))
            .await
    }

    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let lb = {
            let _turn = self.lb.turn.lock().await;
            self.lb.read(&self.arm).await?
        };
        if let Some(nsg) = self.nsg.read(&self.arm).await? {
            self.count_foreign(&nsg);
        }
        let mut by_index = lb.as_ref().map(Self::listeners_of).unwrap_or_default();
        let ips: Vec<PublicIpAddress> = self
            .arm
            .list(
                "PublicIPAddresses.List",
                &format!("{}/publicIPAddresses", self.network),
            )
            .await?;
        let mut addresses = BTreeMap::new();
        for ip in ips.into_iter().filter(|ip| self.ours(&ip.tags)) {
            if let Some(i) = ip.tags.get(tags::INDEX).and_then(|i| i.parse::<u32>().ok()) {
                by_index.entry(i).or_default();
                addresses.insert(i, ip.properties.ip_address.clone());
            }
        }
        Ok(Inventory {
            load_balancers: by_index
                .into_iter()
                .map(|(index, listeners)| InventoryLoadBalancer {
                    index,
                    info: LoadBalancerInfo {
                        id: self.frontend_id(index),
                        ip: addresses.get(&index).cloned().flatten(),
                        hostname: None,
                    },
                    listeners,
                })
                .collect(),
        })
    }

    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        *self.nodes.lock().unwrap_or_else(|e| e.into_inner()) = nodes.to_vec();
        if self.pod_targets {
            // no rule sends to the nodes
            return Ok(());
        }
        self.sync_backends().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_names_carry_index_port_protocol_and_owner() {
        let uid = "0c6f1e9a-3b1d-4e57-9a4c-1f1f1f1f1f1f";
        let name = format!("{}{uid}", rule_prefix(12, 5353, Protocol::Udp));
        assert!(name.len() <= 80, "Azure names are at most 80 characters");
        assert_eq!(
            parse_rule_name(&name),
            Some((12, 5353, Protocol::Udp, uid.to_string()))
        );
        assert_eq!(parse_rule_name("fe-1"), None);
        assert_eq!(parse_rule_name("r-1-x-t-u"), None);
    }

    #[test]
    fn nsg_rule_names_carry_owner_and_protocol() {
        let name = nsg_rule_name("slb-1-", "a-b-c", Protocol::Udp);
        assert_eq!(name, "slb-1-a-b-c-udp");
        assert_eq!(
            parse_nsg_rule_name("slb-1-", &name),
            Some(("a-b-c".to_string(), Protocol::Udp))
        );
        assert_eq!(parse_nsg_rule_name("slb-2-", &name), None, "another pool's");
        assert_eq!(parse_nsg_rule_name("slb-1-", "slb-1-x-icmp"), None);
    }

    #[test]
    fn azure_nodes_are_vms_and_scale_set_vms() {
        assert!(is_azure_node(
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/n1"
        ));
        assert!(is_azure_node(
            "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/ss/virtualMachines/3"
        ));
        assert!(!is_azure_node("aws:///us-east-1a/i-0123"));
        assert!(!is_azure_node("kind://docker/kind/kind-worker"));
    }
}
