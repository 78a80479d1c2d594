//! `sharedlb run`: the operator. Kubeconfig from KUBECONFIG or the in-cluster service account.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sharedlb::cost::PriceTable;
use sharedlb::plan;
use sharedlb::{BackingService, BuiltinProviders, LeaderElection, Settings};
use sharedlb_providers::local::BudgetLimits;

#[derive(Parser, Debug)]
#[command(
    name = "sharedlb",
    version,
    about = "Packs SharedLBs onto a pool of shared cloud L4 load balancers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controllers until SIGINT/SIGTERM.
    Run {
        /// Written into every cloud object's tags and names, so clusters sharing an account stay apart.
        #[arg(long, env = "SHAREDLB_CLUSTER_ID", default_value = "default")]
        cluster_id: String,
        /// Reconciles at once, per controller.
        #[arg(long, env = "SHAREDLB_CONCURRENCY", default_value_t = 16)]
        concurrency: u16,
        /// Log as JSON lines instead of text.
        #[arg(long, env = "SHAREDLB_LOG_JSON")]
        log_json: bool,
        /// Serve /metrics, /healthz and /readyz here, e.g. 0.0.0.0:8080.
        #[arg(long, env = "SHAREDLB_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        /// Run only while holding the leader Lease (for more than one replica).
        #[arg(long, env = "SHAREDLB_LEADER_ELECT")]
        leader_elect: bool,
        #[arg(long, env = "SHAREDLB_LEASE_NAME", default_value = "sharedlb-leader")]
        lease_name: String,
        /// The Lease's namespace: the operator's own.
        #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
        lease_namespace: String,
        /// This replica's identity in the Lease: its pod name.
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Seconds the lease is valid after a renewal: a follower takes over within this after the leader dies.
        #[arg(long, env = "SHAREDLB_LEASE_DURATION", default_value_t = 15)]
        lease_duration: u64,
        /// Seconds before expiry that the leader renews.
        #[arg(long, env = "SHAREDLB_LEASE_GRACE", default_value_t = 5)]
        lease_grace: u64,
        /// The backing Services where the cloud needs no node port (GCP, local): `auto` makes them `LoadBalancer`
        /// Services of class sharedlb.dev/shared without node ports on Kubernetes 1.24+, `NodePort` before;
        /// `node-port` and `load-balancer-class` choose one for every cluster.
        #[arg(long, env = "SHAREDLB_BACKING_SERVICE", value_enum, default_value_t = ServiceChoice::Auto)]
        backing_service: ServiceChoice,
        /// Prices laid over the built-in table for the pools' cost estimate: YAML or JSON such as
        /// `{currency: EUR, aws: {loadBalancerHour: 0.025}}`, or `@file`.
        #[arg(long, env = "SHAREDLB_PRICES", value_parser = PriceTable::with_overrides)]
        prices: Option<PriceTable>,
        /// Seconds between drift audits: each pool's cloud inventory against its allocations; what differs is
        /// mended, counted (sharedlb_drift_repairs_total) and told in an Event.
        #[arg(long, env = "SHAREDLB_AUDIT_INTERVAL", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
        audit_interval: u64,
        #[command(flatten)]
        budget: ForwardBudget,
    },
    /// Where SharedLBs would go, or why not, and what each pool would then hold and cost. Reads the cluster
    /// (list only) and changes nothing. Installed as `kubectl-sharedlb`, it is `kubectl sharedlb plan`.
    Plan {
        /// SharedLB manifests to plan, in the order they would be applied (`-` reads standard input). Without
        /// any, only the pools are shown.
        #[arg(short = 'f', long = "filename", conflicts_with = "compact")]
        files: Vec<String>,
        /// Instead: the moves that would bring each pool to fewer load balancers (the emptiest emptied first, each
        /// only when all it holds fits on the others), and the load balancers they empty.
        #[arg(long)]
        compact: bool,
        /// The namespace of manifests that name none (default: the kubeconfig context's).
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Prices laid over the built-in table (as for `run`).
        #[arg(long, env = "SHAREDLB_PRICES", value_parser = PriceTable::with_overrides)]
        prices: Option<PriceTable>,
    },
    /// Serve the local pools' listeners that the SharedLBs' statuses describe, and nothing else: no leader
    /// election, no writes. For a DaemonSet on the nodes that hold the pools' addresses; every `run` replica
    /// does the same while it waits for the lease.
    Forward {
        #[arg(long, env = "SHAREDLB_LOG_JSON")]
        log_json: bool,
        /// Where to serve /metrics (the listeners' counters), /healthz and /readyz.
        #[arg(long, env = "SHAREDLB_METRICS_ADDR")]
        metrics_addr: Option<std::net::SocketAddr>,
        #[command(flatten)]
        budget: ForwardBudget,
    },
    /// Print the CRDs' YAML (the same as `crdgen`).
    Crds,
}

/// Logs to stdout: JSON for collectors, colour only for a person at a terminal.
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if json { fmt.json().init() } else { fmt.init() }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}

/// The local forwarder's budget across all its listeners: connections and sessions past it are refused and
/// counted (`sharedlb_forwarder_budget_refused`), so its memory stays bounded.
#[derive(clap::Args, Debug, Clone, Copy)]
struct ForwardBudget {
    /// Open TCP connections and live UDP sessions, all listeners together.
    #[arg(
        long,
        env = "SHAREDLB_FORWARD_MAX_CONNECTIONS",
        default_value_t = 16384,
        value_parser = clap::value_parser!(u64).range(1..=10_000_000)
    )]
    forward_max_connections: u64,
    /// MiB of copy buffers (64 KiB per TCP connection, 64 KiB per UDP session), all listeners together.
    #[arg(long, env = "SHAREDLB_FORWARD_MAX_BUFFER_MIB", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=1048576))]
    forward_max_buffer_mib: u64,
    /// Live UDP sessions one client IP may hold on one listener (sources can be spoofed).
    #[arg(
        long,
        env = "SHAREDLB_FORWARD_UDP_SESSIONS_PER_SOURCE",
        default_value_t = 64,
        value_parser = clap::value_parser!(u64).range(1..=1_000_000)
    )]
    forward_udp_sessions_per_source: u64,
}

impl From<ForwardBudget> for BudgetLimits {
    fn from(b: ForwardBudget) -> Self {
        BudgetLimits {
            max_connections: usize::try_from(b.forward_max_connections).unwrap_or(usize::MAX),
            max_buffer_bytes: usize::try_from(b.forward_max_buffer_mib << 20).unwrap_or(usize::MAX),
            max_udp_sessions_per_source: usize::try_from(b.forward_udp_sessions_per_source)
                .unwrap_or(usize::MAX),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum ServiceChoice {
    Auto,
    NodePort,
    LoadBalancerClass,
}

impl From<ServiceChoice> for BackingService {
    fn from(c: ServiceChoice) -> Self {
        match c {
            ServiceChoice::Auto => BackingService::Auto,
            ServiceChoice::NodePort => BackingService::NodePort,
            ServiceChoice::LoadBalancerClass => BackingService::LoadBalancerClass,
        }
    }
}

/// A report as a table, JSON or YAML.
fn print_report<R: serde::Serialize>(
    output: Output,
    report: &R,
    table: fn(&R) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Table => print!("{}", table(report)),
        Output::Json => println!("{}", serde_json::to_string_pretty(report)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(report)?),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    sharedlb::install_crypto_provider();
    match cli.command {
        Command::Plan {
            files,
            compact,
            namespace,
            output,
            prices,
        } => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let namespace = namespace.unwrap_or_else(|| client.default_namespace().to_string());
            let mut inputs = plan::load::from_cluster(&client).await?;
            let prices = prices.unwrap_or_default();
            if compact {
                let report = plan::compact(&inputs, &prices);
                return print_report(output, &report, plan::render::compaction);
            }
            inputs.proposed = plan::load::read_manifests(&files, &namespace)?;
            let report = plan::plan(&inputs, &prices);
            print_report(output, &report, plan::render::table)
        }
        Command::Forward {
            log_json,
            metrics_addr,
            budget,
        } => {
            init_logging(log_json);
            sharedlb::install_crypto_provider();
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let metrics = Arc::new(sharedlb::telemetry::Metrics::new());
            if let Some(addr) = metrics_addr {
                let serve = sharedlb::telemetry::serve(addr, metrics.clone(), shutdown_signal());
                tokio::spawn(serve);
            }
            metrics.set_ready(true);
            let forwarder = sharedlb_providers::local::Forwarder::with_budget(budget.into());
            sharedlb::forward::follow(client, forwarder, metrics, shutdown_signal()).await?;
            Ok(())
        }
        Command::Crds => {
            print!("{}", sharedlb_crds::crds_yaml()?);
            Ok(())
        }
        Command::Run {
            cluster_id,
            concurrency,
            log_json,
            metrics_addr,
            leader_elect,
            lease_name,
            lease_namespace,
            identity,
            lease_duration,
            lease_grace,
            backing_service,
            prices,
            audit_interval,
            budget,
        } => {
            init_logging(log_json);
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let leader_election = leader_elect.then(|| LeaderElection {
                lease_name,
                namespace: lease_namespace,
                identity: identity.unwrap_or_else(|| {
                    let host =
                        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
                    format!("{}-{}", host.trim(), std::process::id())
                }),
                duration_secs: lease_duration,
                grace_secs: lease_grace,
            });
            let settings = Settings {
                cluster_id,
                concurrency,
                metrics_addr,
                leader_election,
                backing_service: backing_service.into(),
                prices: prices.unwrap_or_default(),
                audit_interval: std::time::Duration::from_secs(audit_interval),
                ..Settings::default()
            };
            let shutdown = shutdown_signal();
            let providers = BuiltinProviders::default()
                .with_forward_budget(budget.into())
                .with_gcp_endpoint(std::env::var("SHAREDLB_GCP_ENDPOINT").ok());
            #[cfg(feature = "azure")]
            let providers = providers.with_azure(sharedlb::AzureAccess::from_env()?);
            sharedlb::run(client, settings, Arc::new(providers), shutdown).await?;
            Ok(())
        }
    }
}
