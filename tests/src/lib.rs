//! Harness for the end-to-end tests: a real kube-apiserver + etcd (+ kube-controller-manager for garbage
//! collection) started by `scripts/test-env up`, reached through KUBECONFIG. The operator runs in-process as a
//! library with the memory provider, sharing one `MemoryCloud` across restarts as a real cloud outlives the
//! operator; "restart" aborts its task mid-flight, as kill -9 would.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use sharedlb::{BuiltinProviders, Settings};
use sharedlb_crds::{LoadBalancerPool, SharedLB};
use sharedlb_providers::memory::MemoryCloud;
use tokio::task::JoinHandle;

#[cfg(feature = "aws")]
pub mod aws;
pub mod echo;
pub mod invariants;
pub mod replica;

/// The tests share one apiserver and each runs its own operator: they take turns.
pub static SERIAL: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

pub async fn client() -> Client {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "the end-to-end tests need a real apiserver: run them through scripts/test (or eval \"$(scripts/test-env up)\")"
    );
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn,sharedlb=info".into()))
        .with_test_writer()
        .try_init();
    sharedlb::install_crypto_provider();
    Client::try_default()
        .await
        .expect("a client from KUBECONFIG")
}

/// The operator, running in this process.
#[derive(Debug)]
pub struct Operator {
    task: JoinHandle<()>,
}

impl Operator {
    pub fn start(client: &Client, cloud: &Arc<MemoryCloud>) -> Operator {
        let settings = Settings {
            cluster_id: "e2e".into(),
            ..Settings::default()
        };
        Self::start_with(client, cloud, settings)
    }

    pub fn start_with(client: &Client, cloud: &Arc<MemoryCloud>, settings: Settings) -> Operator {
        Self::start_with_providers(client, BuiltinProviders::new(cloud.clone()), settings)
    }

    /// With the given providers (e.g. gcp pointed at the fake).
    pub fn start_with_providers(
        client: &Client,
        providers: BuiltinProviders,
        settings: Settings,
    ) -> Operator {
        Self::start_with_factory(client, Arc::new(providers), settings)
    }

    /// With any provider factory (e.g. one a test makes fail).
    pub fn start_with_factory(
        client: &Client,
        factory: Arc<dyn sharedlb::ProviderFactory>,
        settings: Settings,
    ) -> Operator {
        let client = client.clone();
        let task = tokio::spawn(async move {
            if let Err(e) =
                sharedlb::run(client, settings, factory, futures::future::pending()).await
            {
                panic!("operator failed: {e}");
            }
        });
        Operator { task }
    }

    /// Stops it at once, wherever it is.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Polls `f` until it returns Some, or panics after `secs` with `what`.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < end,
            "timed out after {secs}s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh namespace with these labels, named `<prefix>-<random>` so reruns on one apiserver never collide.
pub async fn namespace(client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
    let api: Api<Namespace> = Api::all(client.clone());
    let name = format!("{prefix}-{:06x}", fastrand::u32(..0xff_ffff));
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

pub async fn create_pool(client: &Client, name: &str, spec: serde_json::Value) -> LoadBalancerPool {
    let api: Api<LoadBalancerPool> = Api::all(client.clone());
    let pool: LoadBalancerPool = serde_json::from_value(json!({
        "apiVersion": "sharedlb.dev/v1alpha1", "kind": "LoadBalancerPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("pool json");
    if api.get_opt(name).await.expect("get pool").is_some() {
        // left by an earlier run that failed half-way
        let _ = api.delete(name, &DeleteParams::default()).await;
        eventually(30, &format!("old pool {name} gone"), || async {
            api.get_opt(name).await.ok()?.is_none().then_some(())
        })
        .await;
    }
    api.create(&PostParams::default(), &pool)
        .await
        .expect("create pool")
}

pub fn shared_lb(ns: &str, name: &str, spec: serde_json::Value) -> SharedLB {
    serde_json::from_value(json!({
        "apiVersion": "sharedlb.dev/v1alpha1", "kind": "SharedLB",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .expect("shared lb json")
}

pub async fn create_slb(
    client: &Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> SharedLB {
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    api.create(&PostParams::default(), &shared_lb(ns, name, spec))
        .await
        .expect("create SharedLB")
}

/// Creates `n` SharedLBs named `<prefix>00`, `<prefix>01`, ... with one spec, all at once (a burst).
pub async fn create_burst(
    client: &Client,
    ns: &str,
    prefix: &str,
    n: usize,
    spec: serde_json::Value,
) {
    let creates = (0..n).map(|i| {
        let spec = spec.clone();
        async move { create_slb(client, ns, &format!("{prefix}{i:02}"), spec).await }
    });
    futures::future::join_all(creates).await;
}

pub fn condition(slb: &SharedLB, type_: &str) -> Option<(String, String, String)> {
    slb.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Waits until the SharedLB is Ready and returns it.
pub async fn ready(client: &Client, ns: &str, name: &str, secs: u64) -> SharedLB {
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    eventually(secs, &format!("{ns}/{name} Ready"), || async {
        let s = api.get(name).await.ok()?;
        (condition(&s, "Ready")?.0 == "True").then_some(s)
    })
    .await
}

/// Waits until Ready=False with `reason`; returns the message.
pub async fn refused(client: &Client, ns: &str, name: &str, reason: &str) -> String {
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    eventually(
        30,
        &format!("{ns}/{name} Ready=False reason {reason}"),
        || async {
            let s = api.get(name).await.ok()?;
            let (st, r, m) = condition(&s, "Ready")?;
            (st == "False" && r == reason).then_some(m)
        },
    )
    .await
}

/// A Node object with this provider ID, Ready (the test apiserver runs no kubelet, so the test writes the status).
pub async fn add_ready_node(client: &Client, name: &str, provider_id: &str) {
    add_ready_node_at(client, name, provider_id, None).await;
}

/// A Ready Node with this provider ID and, when given, this InternalIP.
pub async fn add_ready_node_at(
    client: &Client,
    name: &str,
    provider_id: &str,
    internal_ip: Option<&str>,
) {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = serde_json::from_value(json!({
        "metadata": {"name": name}, "spec": {"providerID": provider_id}
    }))
    .expect("node");
    let _ = api.create(&PostParams::default(), &node).await;
    let mut status = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "ready", "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    if let Some(ip) = internal_ip {
        status["status"]["addresses"] = json!([{"type": "InternalIP", "address": ip}]);
    }
    api.patch_status(
        name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&status),
    )
    .await
    .expect("node status");
}

/// The `sharedlb` binary next to the test binaries (`scripts/test` builds it).
pub fn sharedlb_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test path");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("sharedlb");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --bin sharedlb` (scripts/test does)",
        bin.display()
    );
    bin
}

/// Deletes these Nodes (made by `add_ready_node`); ones already gone are fine.
pub async fn delete_nodes(client: &Client, names: &[&str]) {
    let api: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for n in names {
        let _ = api.delete(n, &DeleteParams::default()).await;
    }
}

/// Waits until the pool reports Ready=False; returns (reason, message).
pub async fn pool_not_ready(client: &Client, pool: &str) -> (String, String) {
    let pools: Api<LoadBalancerPool> = Api::all(client.clone());
    eventually(60, &format!("pool {pool} Ready=False"), || async {
        let p = pools.get(pool).await.ok()?;
        let c = p
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.status == "False")?;
        Some((c.reason, c.message))
    })
    .await
}

/// Waits up to `secs` until an Event with `reason` is recorded for the object `ns/name`.
pub async fn event_recorded(client: &Client, ns: &str, name: &str, reason: &str, secs: u64) {
    eventually(secs, &format!("{ns}/{name}: an Event {reason}"), || async {
        event_reasons(client, ns, name)
            .await
            .iter()
            .any(|r| r == reason)
            .then_some(())
    })
    .await;
}

/// Waits until the SharedLB reports Programmed=False; returns (reason, message).
pub async fn not_programmed(client: &Client, ns: &str, name: &str) -> (String, String) {
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    eventually(60, &format!("{ns}/{name} Programmed=False"), || async {
        let (st, r, m) = condition(&api.get(name).await.ok()?, "Programmed")?;
        (st == "False").then_some((r, m))
    })
    .await
}

/// Event reasons recorded for an object.
pub async fn event_reasons(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let api: Api<KubeEvent> = Api::namespaced(client.clone(), ns);
    let list = api.list(&ListParams::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

/// Deletes every SharedLB of the namespace, waits until they are gone (finalizers done), then the namespace.
pub async fn delete_namespace(client: &Client, ns: &str) {
    let api: Api<SharedLB> = Api::namespaced(client.clone(), ns);
    for s in api.list(&ListParams::default()).await.expect("list").items {
        let _ = api.delete(&s.name_any(), &DeleteParams::default()).await;
    }
    eventually(60, &format!("SharedLBs of {ns} gone"), || async {
        api.list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

/// Deletes a pool and waits until it is gone (its finalizer deletes its load balancers first).
pub async fn delete_pool(client: &Client, name: &str) {
    let api = Api::<LoadBalancerPool>::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    eventually(60, &format!("pool {name} gone"), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// A listener as the memory cloud holds it: (port, protocol, owner uid).
pub type CloudListener = (u16, String, String);

/// The memory cloud's load balancers of one pool: name -> (ip, listeners).
pub fn cloud_pool(
    cloud: &MemoryCloud,
    pool: &str,
) -> BTreeMap<String, (String, Vec<CloudListener>)> {
    cloud
        .load_balancers()
        .into_iter()
        .filter(|l| l.tags.get("sharedlb.dev/pool").map(String::as_str) == Some(pool))
        .map(|l| {
            let ls = l
                .listeners
                .iter()
                .map(|((p, proto), x)| (*p, format!("{proto:?}"), x.owner_uid.clone()))
                .collect();
            (l.name.clone(), (l.ip.to_string(), ls))
        })
        .collect()
}

/// The manager of the EndpointSlices tests write (the test apiserver runs no EndpointSlice controller): local
/// test pools name it in `endpointSliceManagers`.
pub const E2E_SLICE_MANAGER: &str = "sharedlb-e2e";

/// The `local` provider of a test pool on these loopback addresses: it trusts the tests' slices and, having no
/// pods, forwards to echo backends on loopback.
pub fn local_provider(addresses: &[String]) -> serde_json::Value {
    json!({"local": {"addresses": addresses, "endpointSliceManagers": [E2E_SLICE_MANAGER],
                     "allowLoopbackEndpoints": true}})
}

/// An EndpointSlice for the backing Service of SharedLB `slb`, as the cluster's EndpointSlice controller would
/// write it (managed by `E2E_SLICE_MANAGER`): one port (`port_name`, `protocol`, `port`) on `addresses`. Served
/// as discovery.k8s.io/v1beta1 by the 1.20 test apiserver.
pub async fn put_endpoints(
    client: &Client,
    ns: &str,
    slb: &str,
    port_name: &str,
    protocol: &str,
    addresses: &[SocketAddr],
) {
    put_endpoints_as(
        E2E_SLICE_MANAGER,
        client,
        ns,
        slb,
        (port_name, protocol),
        addresses,
    )
    .await
}

/// `put_endpoints` with another manager label.
pub async fn put_endpoints_as(
    manager: &str,
    client: &Client,
    ns: &str,
    slb: &str,
    (port_name, protocol): (&str, &str),
    addresses: &[SocketAddr],
) {
    let slices = sharedlb::endpoints::EndpointSlices::discover(client)
        .await
        .expect("discover");
    let api: Api<kube::api::DynamicObject> =
        Api::namespaced_with(client.clone(), ns, slices.resource());
    let name = format!("{slb}-{port_name}-{}-{manager}", protocol.to_lowercase());
    let endpoints: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true}}))
        .collect();
    let port = addresses.first().map_or(1, |a| a.port());
    let obj = json!({
        "apiVersion": slices.resource().api_version, "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": ns, "labels": {
            "kubernetes.io/service-name": format!("{slb}-sharedlb"),
            "endpointslice.kubernetes.io/managed-by": manager,
        }},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": port_name, "protocol": protocol, "port": port}],
    });
    api.patch(
        &name,
        &kube::api::PatchParams::apply("sharedlb-e2e").force(),
        &kube::api::Patch::Apply(&obj),
    )
    .await
    .expect("apply EndpointSlice");
}

/// Where scripts/tools put helm and kubectl.
pub fn tool(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("SHAREDLB_TOOLS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/sharedlb/bin")
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run scripts/tools (scripts/test does)",
        path.display()
    );
    path
}

/// Runs a tool; returns (success, stdout, stderr).
pub async fn run_tool(name: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(tool(name))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tool");
    if let (Some(input), Some(mut si)) = (stdin, child.stdin.take()) {
        si.write_all(input.as_bytes()).await.expect("write stdin");
    }
    let out = child.wait_with_output().await.expect("tool output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The repository root.
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The documents of a multi-document YAML stream (helm template's output, an examples/ file), empty ones left out.
pub fn yaml_docs(yaml: &str) -> Vec<serde_json::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|d| serde_json::Value::deserialize(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// A TCP port free on every address of this machine, for a server a test starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The kubeVersion line of the shipped chart and of the copy the 1.20 test cluster can take.
pub const SHIPPED_KUBE_VERSION: &str = "kubeVersion: \">=1.32.0-0\"";
const HARNESS_KUBE_VERSION: &str = "kubeVersion: \">=1.20.0-0\"";

static HARNESS_CHART: LazyLock<std::path::PathBuf> = LazyLock::new(|| {
    fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read chart dir") {
            let entry = entry.expect("dir entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("file type").is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy chart file");
            }
        }
    }
    // one copy per test process; copies of processes that have ended go
    const PREFIX: &str = "sharedlb-harness-chart-";
    for entry in std::fs::read_dir(std::env::temp_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = name.strip_prefix(PREFIX)
            && !std::path::Path::new("/proc").join(pid).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let shipped = repo_root().join("charts/sharedlb");
    let copy = std::env::temp_dir().join(format!("{PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    copy_dir(&shipped, &copy);
    let manifest = std::fs::read_to_string(copy.join("Chart.yaml")).expect("Chart.yaml");
    assert_eq!(
        manifest.matches(SHIPPED_KUBE_VERSION).count(),
        1,
        "Chart.yaml's kubeVersion changed: update SHIPPED_KUBE_VERSION and the README's supported versions"
    );
    std::fs::write(
        copy.join("Chart.yaml"),
        manifest.replace(SHIPPED_KUBE_VERSION, HARNESS_KUBE_VERSION),
    )
    .expect("write Chart.yaml");
    copy
});

/// The chart as the 1.20 test cluster can take it. The shipped chart refuses Kubernetes before 1.32
/// (`kubeVersion`), which is right for users and would refuse the only full apiserver that can be built here;
/// this copy differs from it in that one line and nothing else.
pub fn harness_chart() -> String {
    HARNESS_CHART.display().to_string()
}

/// Where a Ready SharedLB's port `port_name` (None: its first port) is reachable: status IP and external port.
pub fn external_addr(s: &SharedLB, port_name: Option<&str>) -> SocketAddr {
    let st = s.status.as_ref().expect("status");
    let ip: std::net::IpAddr = st
        .load_balancer
        .as_ref()
        .and_then(|l| l.ip.clone())
        .expect("ip")
        .parse()
        .expect("an IP address");
    let p = match port_name {
        Some(n) => st.ports.iter().find(|p| p.name == n).expect("port"),
        None => st.ports.first().expect("a port"),
    };
    SocketAddr::new(ip, u16::try_from(p.port).expect("port"))
}
