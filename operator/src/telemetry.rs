//! Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness (`/readyz`).
//!
//! Cloud calls are counted by a decorator around every provider, so each backend — and each one added later —
//! is measured the same way, by provider, operation and result.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sharedlb_providers::local::{BudgetLimits, BudgetSnapshot};
use sharedlb_providers::{
    ApiCalls, Inventory, Limits, ListenerSpec, ListenerStatsRow, LoadBalancerInfo, LoadBalancerKey,
    LoadBalancerProvider, NodeTarget, Protocol, ProviderError,
};
use tracing::{debug, info, warn};

use crate::fence::Fence;
use crate::pacer::Pacer;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloudLabels {
    pub provider: &'static str,
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub pool: String,
    /// `missing_listener`, `stray_listener`, `missing_load_balancer` or `address_changed`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiCallLabels {
    pub pool: String,
    pub provider: &'static str,
    pub operation: String,
    pub mutating: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub pool: String,
    pub address: String,
    pub protocol: &'static str,
}

/// Traffic counters of listeners the operator carries itself (local provider), sampled every few seconds.
#[derive(Debug, Default)]
pub struct ListenerMetrics {
    pub connections: Family<ListenerLabels, Gauge>,
    pub active: Family<ListenerLabels, Gauge>,
    pub bytes_in: Family<ListenerLabels, Gauge>,
    pub bytes_out: Family<ListenerLabels, Gauge>,
    pub refused: Family<ListenerLabels, Gauge>,
    /// Cloud API calls by operation, as the cloud SDK counted them (sampled).
    pub api_calls: Family<ApiCallLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `connections` or `buffer_bytes`; for refusals also `udp_sessions_per_source`.
    pub resource: &'static str,
}

/// The process-wide budget of the local forwarder (sampled).
#[derive(Debug, Default)]
pub struct ForwarderMetrics {
    pub used: Family<BudgetLabels, Gauge>,
    pub limit: Family<BudgetLabels, Gauge>,
    pub refused: Family<BudgetLabels, Gauge>,
}

fn reconcile_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Every metric the operator exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub reconcile_seconds: Family<ControllerLabels, Histogram, fn() -> Histogram>,
    pub in_flight: Family<ControllerLabels, Gauge>,
    pub cloud_calls: Family<CloudLabels, Counter>,
    pub allocations: Family<PoolLabels, Counter>,
    pub pool_load_balancers: Family<PoolLabels, Gauge>,
    pub pool_ports_used: Family<PoolLabels, Gauge>,
    pub pool_ports_free: Family<PoolLabels, Gauge>,
    pub pool_stray_listeners: Family<PoolLabels, Gauge>,
    pub drift_repairs: Family<DriftLabels, Counter>,
    pub leader: Gauge,
    pub listeners: ListenerMetrics,
    pub forwarder: ForwarderMetrics,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sharedlb");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let reconcile_seconds =
            Family::<ControllerLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                reconcile_histogram,
            );
        let in_flight = Family::<ControllerLabels, Gauge>::default();
        let cloud_calls = Family::<CloudLabels, Counter>::default();
        let allocations = Family::<PoolLabels, Counter>::default();
        let pool_load_balancers = Family::<PoolLabels, Gauge>::default();
        let pool_ports_used = Family::<PoolLabels, Gauge>::default();
        let pool_ports_free = Family::<PoolLabels, Gauge>::default();
        let pool_stray_listeners = Family::<PoolLabels, Gauge>::default();
        let drift_repairs = Family::<DriftLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time per reconcile",
            reconcile_seconds.clone(),
        );
        registry.register(
            "reconciles_in_flight",
            "Reconciles running now (the work queue's active part)",
            in_flight.clone(),
        );
        registry.register(
            "cloud_calls",
            "Provider calls by provider, operation and result",
            cloud_calls.clone(),
        );
        registry.register(
            "allocations",
            "SharedLB allocations written, by pool",
            allocations.clone(),
        );
        registry.register(
            "pool_load_balancers",
            "Load balancers per pool",
            pool_load_balancers.clone(),
        );
        registry.register(
            "pool_ports_used",
            "Allocated port/protocol pairs per pool",
            pool_ports_used.clone(),
        );
        registry.register(
            "pool_ports_free",
            "Free port/protocol pairs on the pool's existing load balancers",
            pool_ports_free.clone(),
        );
        registry.register(
            "pool_stray_listeners",
            "Listeners in the cloud that no allocation accounts for and that could not be removed yet (their ports stay taken)",
            pool_stray_listeners.clone(),
        );
        registry.register(
            "drift_repairs",
            "Differences between the cloud and the allocations that the drift audit found and mended, by kind",
            drift_repairs.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease (or runs without election)",
            leader.clone(),
        );
        let listeners = ListenerMetrics::default();
        registry.register(
            "listener_connections",
            "TCP connections accepted or UDP sessions opened since the listener started (sampled)",
            listeners.connections.clone(),
        );
        registry.register(
            "listener_active",
            "Open TCP connections or live UDP sessions (sampled)",
            listeners.active.clone(),
        );
        registry.register(
            "listener_bytes_in",
            "Bytes from clients to endpoints (sampled)",
            listeners.bytes_in.clone(),
        );
        registry.register(
            "listener_bytes_out",
            "Bytes from endpoints to clients (sampled)",
            listeners.bytes_out.clone(),
        );
        registry.register(
            "listener_refused",
            "Connections or sessions refused: outside sourceRanges or over the limit (sampled)",
            listeners.refused.clone(),
        );
        let forwarder = ForwarderMetrics::default();
        registry.register(
            "forwarder_budget_used",
            "What the local forwarder's connections and sessions hold, across all listeners (sampled)",
            forwarder.used.clone(),
        );
        registry.register(
            "forwarder_budget_limit",
            "The local forwarder's budget across all listeners (--forward-max-connections, --forward-max-buffer-mib)",
            forwarder.limit.clone(),
        );
        registry.register(
            "forwarder_budget_refused",
            "Connections and UDP sessions the local forwarder refused since it started, by the budget that had no room (sampled)",
            forwarder.refused.clone(),
        );
        registry.register(
            "cloud_api_calls",
            "Cloud API calls by pool, provider and the cloud's operation name, mutating or not, sampled every 10 s (AWS: every SDK call, by an interceptor; GCP: every Compute Engine call the provider makes)",
            listeners.api_calls.clone(),
        );
        Metrics {
            registry,
            listeners,
            forwarder,
            reconciles,
            reconcile_seconds,
            in_flight,
            cloud_calls,
            allocations,
            pool_load_balancers,
            pool_ports_used,
            pool_ports_free,
            pool_stray_listeners,
            drift_repairs,
            leader,
            ready: AtomicBool::new(false),
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Ready: caught up and either leading or standing by for the lease.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// Runs a reconcile, counting it by result and timing it.
    pub async fn reconcile<T, E: std::fmt::Display>(
        &self,
        controller: &'static str,
        fut: impl std::future::Future<Output = Result<T, E>>,
        result_of: impl Fn(&E) -> String,
    ) -> Result<T, E> {
        let labels = ControllerLabels { controller };
        self.in_flight.get_or_create(&labels).inc();
        let t = Instant::now();
        let r = fut.await;
        self.in_flight.get_or_create(&labels).dec();
        self.reconcile_seconds
            .get_or_create(&labels)
            .observe(t.elapsed().as_secs_f64());
        let result = match &r {
            Ok(_) => "ok".to_string(),
            Err(e) => result_of(e),
        };
        self.reconciles
            .get_or_create(&ReconcileLabels { controller, result })
            .inc();
        r
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready_handler))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(address = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
}

async fn ready_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if m.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The provider as the operator calls it: a change is made only while the fence proves this replica leads
/// (refused before the cloud otherwise, and not counted as a cloud call), and every call is counted.
#[derive(Debug)]
pub struct GuardedProvider {
    inner: Arc<dyn LoadBalancerProvider>,
    metrics: Arc<Metrics>,
    fence: Fence,
    /// The pool's changes, spaced to the rate its cloud allows once it throttles (see `pacer`).
    pacer: std::sync::Mutex<Pacer>,
}

impl GuardedProvider {
    pub fn wrap(
        inner: Arc<dyn LoadBalancerProvider>,
        metrics: Arc<Metrics>,
        fence: Fence,
    ) -> Arc<dyn LoadBalancerProvider> {
        Arc::new(GuardedProvider {
            inner,
            metrics,
            fence,
            pacer: std::sync::Mutex::default(),
        })
    }

    fn may_change(&self) -> Result<(), ProviderError> {
        match self.fence.is_current() {
            true => Ok(()),
            false => Err(Fence::refusal()),
        }
    }

    /// A change to the cloud: in its paced slot, if this replica still leads once the slot comes, counted.
    async fn change<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let wait = self.pace().slot(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.may_change()?;
        let started = Instant::now();
        let r = call.await;
        match &r {
            Ok(_) => self.pace().accepted(started),
            Err(ProviderError::Throttled { retry_after, .. }) => {
                self.pace().throttled(Instant::now(), *retry_after)
            }
            Err(_) => {}
        }
        self.count(operation, &r);
        r
    }

    fn pace(&self) -> std::sync::MutexGuard<'_, Pacer> {
        self.pacer.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count<T>(&self, operation: &'static str, r: &Result<T, ProviderError>) {
        let result = match r {
            Ok(_) => "ok",
            Err(e) => e.reason(),
        };
        match r {
            Err(ProviderError::Throttled { .. }) => {
                debug!(
                    provider = self.inner.kind(),
                    operation, "cloud call throttled"
                )
            }
            Err(e) => {
                warn!(provider = self.inner.kind(), operation, error = %e, "cloud call failed")
            }
            Ok(_) => {}
        }
        self.metrics
            .cloud_calls
            .get_or_create(&CloudLabels {
                provider: self.inner.kind(),
                operation,
                result,
            })
            .inc();
    }
}

#[async_trait::async_trait]
impl LoadBalancerProvider for GuardedProvider {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn limits(&self) -> Limits {
        self.inner.limits()
    }
    fn forwards_to_endpoints(&self) -> bool {
        self.inner.forwards_to_endpoints()
    }

    fn supports_proxy_protocol(&self) -> bool {
        self.inner.supports_proxy_protocol()
    }

    async fn endpoint_health(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
    ) -> Option<(usize, usize)> {
        self.inner.endpoint_health(lb, port, protocol).await
    }

    fn needs_node_ports(&self) -> bool {
        self.inner.needs_node_ports()
    }
    async fn ensure_load_balancer(
        &self,
        lb: &LoadBalancerKey,
    ) -> Result<LoadBalancerInfo, ProviderError> {
        self.change("ensure_load_balancer", self.inner.ensure_load_balancer(lb))
            .await
    }
    async fn ensure_listener(
        &self,
        lb: &LoadBalancerKey,
        l: &ListenerSpec,
    ) -> Result<(), ProviderError> {
        self.change("ensure_listener", self.inner.ensure_listener(lb, l))
            .await
    }
    async fn remove_listener(
        &self,
        lb: &LoadBalancerKey,
        port: u16,
        protocol: Protocol,
        owner_uid: &str,
    ) -> Result<(), ProviderError> {
        let call = self.inner.remove_listener(lb, port, protocol, owner_uid);
        self.change("remove_listener", call).await
    }
    async fn delete_load_balancer(&self, lb: &LoadBalancerKey) -> Result<(), ProviderError> {
        self.change("delete_load_balancer", self.inner.delete_load_balancer(lb))
            .await
    }
    async fn delete_pool_leftovers(&self) -> Result<(), ProviderError> {
        self.change("delete_pool_leftovers", self.inner.delete_pool_leftovers())
            .await
    }
    async fn inventory(&self) -> Result<Inventory, ProviderError> {
        let r = self.inner.inventory().await;
        self.count("inventory", &r);
        r
    }
    async fn listener_stats(&self) -> Vec<ListenerStatsRow> {
        self.inner.listener_stats().await
    }
    fn api_calls(&self) -> Vec<ApiCalls> {
        self.inner.api_calls()
    }
    async fn update_nodes(&self, nodes: &[NodeTarget]) -> Result<(), ProviderError> {
        self.change("update_nodes", self.inner.update_nodes(nodes))
            .await
    }
}

impl Metrics {
    /// Sets the cloud API call counts of one pool's provider.
    pub fn set_api_calls(&self, pool: &str, provider: &'static str, rows: &[ApiCalls]) {
        for r in rows {
            let labels = ApiCallLabels {
                pool: pool.to_string(),
                provider,
                operation: r.operation.clone(),
                mutating: if r.mutating { "true" } else { "false" },
            };
            self.listeners
                .api_calls
                .get_or_create(&labels)
                .set(i64::try_from(r.calls).unwrap_or(i64::MAX));
        }
    }

    /// Replaces the listener series with these rows (listeners that went away disappear).
    pub fn set_listeners(&self, rows: &[(String, ListenerStatsRow)]) {
        let l = &self.listeners;
        for f in [
            &l.connections,
            &l.active,
            &l.bytes_in,
            &l.bytes_out,
            &l.refused,
        ] {
            f.clear();
        }
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (pool, r) in rows {
            let labels = ListenerLabels {
                pool: pool.clone(),
                address: r.address.to_string(),
                protocol: r.protocol.as_str(),
            };
            l.connections
                .get_or_create(&labels)
                .set(g(r.stats.connections));
            l.active.get_or_create(&labels).set(g(r.stats.active));
            l.bytes_in.get_or_create(&labels).set(g(r.stats.bytes_in));
            l.bytes_out.get_or_create(&labels).set(g(r.stats.bytes_out));
            l.refused
                .get_or_create(&labels)
                .set(g(r.stats.refused_by_source
                    + r.stats.refused_over_limit
                    + r.stats.refused_over_budget));
        }
    }

    /// The forwarder's budget, in use and refused.
    pub fn set_forwarder(&self, limits: BudgetLimits, now: BudgetSnapshot) {
        let g = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let f = &self.forwarder;
        let set = |family: &Family<BudgetLabels, Gauge>, resource, v| {
            family.get_or_create(&BudgetLabels { resource }).set(g(v));
        };
        set(&f.used, "connections", now.connections);
        set(&f.used, "buffer_bytes", now.buffer_bytes);
        set(&f.limit, "connections", limits.max_connections as u64);
        set(&f.limit, "buffer_bytes", limits.max_buffer_bytes as u64);
        set(&f.refused, "connections", now.refused_connections);
        set(&f.refused, "buffer_bytes", now.refused_buffer_bytes);
        set(
            &f.refused,
            "udp_sessions_per_source",
            now.refused_udp_per_source,
        );
    }
}
