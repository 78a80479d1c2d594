//! The release `sharedlb` binary, run as a process of its own.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sharedlb_e2e::free_port;
use sharedlb_e2e::replica::scrape;
use tokio::process::{Child, Command};

use crate::Config;

/// The release operator, a process of its own; its metrics on a port of its own, its log in the env dir.
#[derive(Debug)]
pub struct OperatorProcess {
    pub child: Child,
    pub metrics_port: u16,
    pub pid_file: PathBuf,
}

impl OperatorProcess {
    /// Starts it and waits until its metrics answer.
    pub async fn start(cfg: &Config) -> anyhow::Result<OperatorProcess> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.operator_log())?;
        let metrics_port = free_port();
        let child = Command::new(&cfg.sharedlb)
            .args(["run", "--cluster-id", "bench"])
            .args(["--concurrency", &cfg.concurrency.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")])
            .env("RUST_LOG", "info,kube=warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            // a bench that fails half-way leaves no operator behind
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", cfg.sharedlb.display()))?;
        let pid = child.id().context("the operator exited at once")?;
        std::fs::write(cfg.operator_pid_file(), pid.to_string())?;
        let mut op = OperatorProcess {
            child,
            metrics_port,
            pid_file: cfg.operator_pid_file(),
        };
        let t0 = Instant::now();
        while scrape(op.metrics_port).await.is_none() {
            if let Some(status) = op.child.try_wait()? {
                bail!("the operator exited at start: {status}");
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("the operator's metrics did not answer within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(op)
    }

    pub async fn metrics(&self) -> anyhow::Result<BTreeMap<String, f64>> {
        scrape(self.metrics_port)
            .await
            .context("the operator's metrics do not answer")
    }

    /// Its peak resident memory so far (VmHWM), in MB.
    pub fn peak_rss_mb(&self) -> anyhow::Result<f64> {
        let pid = self.child.id().context("the operator has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmHWM in /proc/PID/status")?;
        Ok(kb / 1024.0)
    }

    /// SIGTERM, as a pod is stopped, and waits for it to exit; returns its peak memory in MB.
    pub async fn stop(mut self) -> anyhow::Result<f64> {
        let rss = self.peak_rss_mb()?;
        let pid = self.child.id().context("the operator has exited")?;
        let term = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        anyhow::ensure!(term.success(), "kill -TERM {pid} failed");
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("the operator did not exit within 30 s of SIGTERM")??;
        if !exit.success() {
            eprintln!("scale: the operator exited with {exit} after SIGTERM");
        }
        std::fs::remove_file(&self.pid_file)?;
        Ok(rss)
    }
}
