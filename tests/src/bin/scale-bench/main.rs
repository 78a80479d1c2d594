//! `scripts/bench scale N [C]`: the release `sharedlb` binary, run as a process of its own against one real
//! apiserver (KUBECONFIG), at scale. Measured: how long N SharedLBs take to become Ready, against a floor (a bare
//! client making the writes any operator must make for them); the apiserver writes each costs, from the
//! apiserver's own request counters; what the operator writes when nothing changes and when it restarts; cloud
//! calls per node added or removed; peak memory; deleting them all. Targets are printed as met or missed, never
//! asserted: this is a benchmark, and machines are noisy. The last line is the summary.
//!
//! Usage: scale-bench N C PATH-OF-SHAREDLB (env: NODES, default 100; QUIET_SECS, default 60).

mod census;
mod floor;
mod nodes;
mod operator;
mod process;
mod report;
mod requests;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::{StreamExt, TryStreamExt};
use kube::Client;
use serde_json::json;
use sharedlb_crds::SharedLB;
use sharedlb_e2e::{create_pool, delete_pool, namespace};

use census::Census;
use floor::floor;
use nodes::{create_nodes, node_churn, ready_nodes};
use operator::{delete_all, operator_burst, pool_finalized, quiet, restart_operator};
use process::OperatorProcess;
use report::Report;
use requests::Requests;

/// The pool the operator packs the SharedLBs onto.
const POOL: &str = "bench";
/// After the last SharedLB turns Ready (or the restarted operator has reconciled them all), the writes that
/// follow from it still land: its Event, the pool's debounced status. They are counted with the phase.
const SETTLE: Duration = Duration::from_secs(3);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let cfg = Config::from_env()?;
    sharedlb::install_crypto_provider();
    let client = Client::try_default()
        .await
        .context("a client from KUBECONFIG")?;
    let result = run(&client, &cfg).await;
    if result.is_err() {
        print_log_tail(&cfg.operator_log(), 30);
    }
    result?.print(&cfg);
    Ok(())
}

/// One run, from the command line and the environment.
#[derive(Debug)]
struct Config {
    /// SharedLBs.
    n: usize,
    /// Requests in flight at once, for the bench's own writes and the operator's reconciles.
    concurrency: usize,
    /// The release `sharedlb` binary.
    sharedlb: PathBuf,
    /// Ready Nodes in the cluster.
    nodes: usize,
    /// How long nothing changes in the quiet phase.
    quiet: Duration,
    /// The test env's directory (the kubeconfig's), where the operator logs.
    env_dir: PathBuf,
}

impl Config {
    fn from_env() -> anyhow::Result<Config> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let [n, c, bin] = args.as_slice() else {
            bail!("usage: scale-bench N C PATH-OF-SHAREDLB");
        };
        let number = |name: &str, default: usize| -> anyhow::Result<usize> {
            std::env::var(name).ok().map_or(Ok(default), |v| {
                v.parse().with_context(|| format!("{name}={v}"))
            })
        };
        let kubeconfig = PathBuf::from(std::env::var_os("KUBECONFIG").context("KUBECONFIG")?);
        Ok(Config {
            n: n.parse().context("N")?,
            concurrency: c.parse().context("C")?,
            sharedlb: PathBuf::from(bin),
            nodes: number("NODES", 100)?,
            quiet: Duration::from_secs(number("QUIET_SECS", 60)? as u64),
            env_dir: kubeconfig
                .parent()
                .context("the kubeconfig's directory")?
                .to_path_buf(),
        })
    }

    fn operator_log(&self) -> PathBuf {
        self.env_dir.join("sharedlb-operator.log")
    }

    /// The running operator's PID, for scripts/bench to stop it by if this process is killed.
    fn operator_pid_file(&self) -> PathBuf {
        self.env_dir.join("sharedlb-operator.pid")
    }

    /// Long enough for all N at any sane speed: a stuck run ends instead of hanging.
    fn patience(&self) -> Duration {
        Duration::from_secs(600 + self.n as u64 / 5)
    }
}

/// Every phase, in order; each measures what the report shows.
async fn run(client: &Client, cfg: &Config) -> anyhow::Result<Report> {
    // both namespaces first: the controller-manager's writes for a new namespace (its ServiceAccount and token)
    // land before anything is measured
    let floor_ns = namespace(client, "floor", &[]).await;
    let bench_ns = namespace(client, "bench", &[]).await;
    let nodes_s = create_nodes(client, cfg).await?;
    let floor = floor(client, cfg, &floor_ns).await?;

    let op = OperatorProcess::start(cfg).await?;
    create_pool(
        client,
        POOL,
        json!({"provider": {"memory": {}}, "capacity": {"maxPortsPerLoadBalancer": 50}}),
    )
    .await;
    pool_finalized(client).await?;
    let mut census = Census::follow(client, &bench_ns).await?;
    let burst = operator_burst(client, cfg, &bench_ns, &mut census).await?;
    let quiet = quiet(client, cfg).await?;

    let mut peak_rss_mb = op.stop().await?;
    let (op, restart) = restart_operator(client, cfg, &bench_ns).await?;
    let churn = node_churn(client, &op).await?;
    let delete_s = delete_all(client, cfg, &bench_ns, &mut census).await?;
    delete_pool(client, POOL).await;
    peak_rss_mb = peak_rss_mb.max(op.stop().await?);
    let nodes_ready = ready_nodes(client).await?;
    Ok(Report {
        nodes_s,
        nodes_ready,
        floor,
        burst,
        quiet,
        restart,
        churn,
        peak_rss_mb,
        delete_s,
    })
}

/// Waits until the apiserver has taken no write (leases apart) for a second, so that what earlier steps set off
/// (the controller-manager's ServiceAccount for a new namespace, a pool's first status) is not counted in the
/// window that opens next; returns its counters then. Gives up waiting after 30 s, saying so.
async fn calm(client: &Client) -> anyhow::Result<Requests> {
    let mut last = Requests::scrape(client).await?;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = Requests::scrape(client).await?;
        if now.since(&last).total_writes() == 0.0 {
            return Ok(now);
        }
        last = now;
    }
    eprintln!("scale: the apiserver still takes writes after 30 s; measuring anyway");
    Ok(last)
}

/// Runs `job(i)` for every i in 0..n, `c` at a time; the first error ends it.
async fn each<F, Fut>(n: usize, c: usize, job: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    futures::stream::iter(0..n)
        .map(job)
        .buffer_unordered(c.max(1))
        .try_collect::<()>()
        .await
}

/// Polls `check` every 100 ms until it says true; an error after `patience`.
async fn until<F, Fut>(patience: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let t0 = Instant::now();
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if t0.elapsed() > patience => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(_) => {}
        }
        if t0.elapsed() > patience {
            bail!(
                "timed out after {} s waiting for {what}",
                patience.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ignore_not_found<T>(r: Result<T, kube::Error>) -> anyhow::Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn shared_lb(ns: &str, name: &str, spec: serde_json::Value) -> anyhow::Result<SharedLB> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "sharedlb.dev/v1alpha1", "kind": "SharedLB",
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))?)
}

fn print_log_tail(log: &Path, lines: usize) {
    let Ok(text) = std::fs::read_to_string(log) else {
        return;
    };
    let all: Vec<&str> = text.lines().collect();
    eprintln!("scale: the last lines of {}:", log.display());
    for l in &all[all.len().saturating_sub(lines)..] {
        eprintln!("  {l}");
    }
}
