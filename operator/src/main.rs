//! `sharedlb run`: the operator. Kubeconfig from KUBECONFIG or the in-cluster service account.

use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use sharedlb::{BuiltinProviders, Settings};

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
    },
    /// Print the CRDs' YAML (the same as `crdgen`).
    Crds,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => {
            print!("{}", sharedlb_crds::crds_yaml()?);
            Ok(())
        }
        Command::Run {
            cluster_id,
            concurrency,
            log_json,
        } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
            let fmt = tracing_subscriber::fmt().with_env_filter(filter);
            if log_json {
                fmt.json().init()
            } else {
                fmt.init()
            }
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API")?;
            let settings = Settings {
                cluster_id,
                concurrency,
                ..Settings::default()
            };
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("installing a SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            };
            sharedlb::run(
                client,
                settings,
                Arc::new(BuiltinProviders::default()),
                shutdown,
            )
            .await?;
            Ok(())
        }
    }
}
