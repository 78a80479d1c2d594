//! Real operator processes, as a Deployment's replicas run, and their /metrics.

use std::collections::BTreeMap;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::sharedlb_bin;

/// A real `sharedlb run --leader-elect` process (lease 6 s, grace 2 s) with its metrics on `metrics` and its log
/// in `log`; killed when dropped.
pub fn start_replica(
    identity: &str,
    lease: &str,
    cluster_id: &str,
    metrics: u16,
    log: &std::path::Path,
) -> Child {
    let election = [
        "--leader-elect",
        "--lease-name",
        lease,
        "--identity",
        identity,
        "--lease-duration",
        "6",
        "--lease-grace",
        "2",
        "--lease-namespace",
        "default",
    ];
    spawn(cluster_id, metrics, log, &election)
}

/// A real `sharedlb run` process, the only one (no leader election), logging to `log` (appended, so that a
/// process started again after a kill adds to the same file); killed when dropped.
pub fn start_single(cluster_id: &str, metrics: u16, log: &std::path::Path) -> Child {
    spawn(cluster_id, metrics, log, &[])
}

fn spawn(cluster_id: &str, metrics: u16, log: &std::path::Path, extra: &[&str]) -> Child {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(sharedlb_bin())
        .args(["run", "--cluster-id", cluster_id])
        .args(extra)
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .env("RUST_LOG", "info,kube=warn")
        // the log lines (stdout) and the exit error (stderr), both in `log`
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("start sharedlb")
}

/// GET /metrics, parsed into `name{labels}` -> value.
pub async fn scrape(port: u16) -> Option<BTreeMap<String, f64>> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    let (head, text) = body.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then_some(())?;
    Some(
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect(),
    )
}

pub fn sum(m: &BTreeMap<String, f64>, prefix: &str, must_contain: &[&str]) -> f64 {
    m.iter()
        .filter(|(k, _)| k.starts_with(prefix) && must_contain.iter().all(|c| k.contains(c)))
        .map(|(_, v)| v)
        .sum()
}

/// Waits until exactly one of the two replicas (by metrics port) leads: (leader's port, follower's port).
pub async fn which_leads(a: u16, b: u16) -> (u16, u16) {
    crate::eventually(30, "one replica holds the lease", || async {
        let (x, y) = (scrape(a).await?, scrape(b).await?);
        match (
            x.get("sharedlb_leader").copied()?,
            y.get("sharedlb_leader").copied()?,
        ) {
            (l, f) if l == 1.0 && f == 0.0 => Some((a, b)),
            (f, l) if l == 1.0 && f == 0.0 => Some((b, a)),
            _ => None,
        }
    })
    .await
}

/// Waits until the replica on this metrics port leads.
pub async fn leads(port: u16, secs: u64) {
    crate::eventually(secs, "the other replica takes the lease", || async {
        (scrape(port).await?.get("sharedlb_leader").copied()? == 1.0).then_some(())
    })
    .await
}

/// Which of `pids` holds the accepted end of the TCP connection from `client` to `listener` (IPv4): read from
/// /proc/net/tcp (the socket's inode) and each process's open files, as `ss -p` does.
pub fn tcp_carrier(
    listener: std::net::SocketAddr,
    client: std::net::SocketAddr,
    pids: &[u32],
) -> Option<u32> {
    let hex = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(v4) => Some(format!(
            "{:08X}:{:04X}",
            u32::from_le_bytes(v4.ip().octets()),
            v4.port()
        )),
        std::net::SocketAddr::V6(_) => None,
    };
    let (local, remote) = (hex(listener)?, hex(client)?);
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let inode = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&local.as_str()) && f.get(2) == Some(&remote.as_str()))
            .then(|| f.get(9).map(|i| format!("socket:[{i}]")))
            .flatten()
    })?;
    pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.to_string_lossy() == inode))
    })
}
