//! The local forwarder across real interfaces: four network namespaces — a client, the load balancer's host and
//! two backends — joined by veth pairs. Each party runs on a thread inside its namespace (its sockets belong to
//! it), so every byte crosses a veth: client -> host on 10.77.1.0/24, host -> backend 1 on 10.77.2.0/24, host ->
//! backend 2 on 10.77.3.0/24. Needs root and `ip` (iproute2, which scripts/test-env installs); it fails, saying
//! so, where namespaces cannot be made.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use sharedlb_providers::conformance::listener_spec;
use sharedlb_providers::local::{Forwarder, LocalProvider, Tuning};
use sharedlb_providers::{ListenerSpec, LoadBalancerKey, LoadBalancerProvider, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

const LB: &str = "10.77.1.1";
const CLIENT: &str = "10.77.1.10";
/// A second address of the client, outside the listener's `sourceRanges`.
const OUTSIDER: &str = "10.77.1.20";
const PORT: u16 = 4500;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("`ip` (iproute2) is needed to build network namespaces: {e}"));
    assert!(
        out.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces and links, deleted when dropped.
struct Topology {
    names: Vec<String>,
}

impl Topology {
    /// `<tag>-c`, `<tag>-lb`, `<tag>-b1`, `<tag>-b2`.
    fn build(tag: &str) -> Topology {
        let ns = |n: &str| format!("{tag}-{n}");
        let t = Topology {
            names: ["c", "lb", "b1", "b2"].iter().map(|n| ns(n)).collect(),
        };
        for n in &t.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        // (peer namespace, its address, the host's end and address)
        for (peer, addr, host_dev, host_addr) in [
            ("c", "10.77.1.10/24", "l0", "10.77.1.1/24"),
            ("b1", "10.77.2.10/24", "l1", "10.77.2.1/24"),
            ("b2", "10.77.3.10/24", "l2", "10.77.3.1/24"),
        ] {
            let peer_ns = ns(peer);
            ip(&[
                "link",
                "add",
                host_dev,
                "netns",
                &ns("lb"),
                "type",
                "veth",
                "peer",
                "name",
                "e0",
                "netns",
                &peer_ns,
            ]);
            ip(&["-n", &ns("lb"), "addr", "add", host_addr, "dev", host_dev]);
            ip(&["-n", &ns("lb"), "link", "set", host_dev, "up"]);
            ip(&["-n", &peer_ns, "addr", "add", addr, "dev", "e0"]);
            ip(&["-n", &peer_ns, "link", "set", "e0", "up"]);
        }
        ip(&["-n", &ns("c"), "addr", "add", "10.77.1.20/24", "dev", "e0"]);
        t
    }

    fn ns(&self, i: usize) -> &str {
        &self.names[i]
    }

    /// Bytes the host's end of a link has sent (to the peer) and received.
    fn counters(&self, dev: &str) -> (u64, u64) {
        let read = |what: &str| -> u64 {
            let path = format!("/sys/class/net/{dev}/statistics/{what}");
            let out = Command::new("ip")
                .args(["netns", "exec", self.ns(1), "cat", &path])
                .output()
                .expect("ip netns exec");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        };
        (read("tx_bytes"), read("rx_bytes"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Runs `f` on a thread of its own inside network namespace `ns`, with a runtime of its own; returns its output.
fn in_netns<F, Fut, T>(ns: &str, f: F) -> std::thread::JoinHandle<T>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("the namespace's file");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

/// A backend that reads the PROXY v2 header, then answers each read with `<name> saw <client>:<bytes>`.
async fn backend(name: &'static str, ready: std::sync::mpsc::Sender<()>) {
    let l = TcpListener::bind("0.0.0.0:8080")
        .await
        .expect("bind backend");
    let _ = ready.send(());
    while let Ok((mut s, _)) = l.accept().await {
        tokio::spawn(async move {
            let mut head = [0u8; 16];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
            let mut rest = vec![0u8; len];
            if s.read_exact(&mut rest).await.is_err() {
                return;
            }
            let header = [head.as_slice(), rest.as_slice()].concat();
            let client = match ppp::v2::Header::try_from(header.as_slice()).map(|h| h.addresses) {
                Ok(ppp::v2::Addresses::IPv4(a)) => {
                    format!("{}:{}", a.source_address, a.source_port)
                }
                other => format!("no PROXY header ({other:?})"),
            };
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0
                    || s.write_all(format!("{name} saw {client}:{n};").as_bytes())
                        .await
                        .is_err()
                {
                    break;
                }
            }
        });
    }
}

/// Connects from `from`, sends `payload`, returns what came back before the close (empty if refused).
async fn ask(from: &str, payload: &[u8]) -> (u16, String) {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("addr"))
        .expect("bind the client address");
    let local = socket.local_addr().expect("local").port();
    let target: SocketAddr = format!("{LB}:{PORT}").parse().expect("addr");
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(3), socket.connect(target)).await
    else {
        return (local, String::new());
    };
    let _ = s.write_all(payload).await;
    let _ = s.shutdown().await;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut out)).await;
    (local, out)
}

#[test]
fn bytes_cross_real_interfaces_with_source_ranges_and_the_client_address_kept() {
    let t = Topology::build(&format!("slb{}", std::process::id() % 100_000));
    let (ready_tx, ready) = std::sync::mpsc::channel();
    for (i, name) in [(2, "b1"), (3, "b2")] {
        let tx = ready_tx.clone();
        drop(in_netns(t.ns(i), move || backend(name, tx)));
    }
    for _ in 0..2 {
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("a backend listening");
    }

    // the load balancer's host: one address, one TCP listener for the client's /32, with PROXY v2, to both backends
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let (up_tx, up) = std::sync::mpsc::channel();
    let host = in_netns(t.ns(1), move || async move {
        let p = LocalProvider::new(
            "netns",
            &[LB.to_string()],
            Tuning::default(),
            Forwarder::new(),
        )
        .expect("provider");
        let key = LoadBalancerKey {
            cluster_id: "t".into(),
            pool: "netns".into(),
            index: 0,
        };
        p.ensure_load_balancer(&key).await.expect("lb");
        let spec = ListenerSpec {
            backends: vec![
                "10.77.2.10:8080".parse().expect("b1"),
                "10.77.3.10:8080".parse().expect("b2"),
            ],
            proxy_protocol: true,
            ..listener_spec(PORT, Protocol::Tcp, 0, "owner", &["10.77.1.10/32"])
        };
        p.ensure_listener(&key, &spec).await.expect("listener");
        let _ = up_tx.send(());
        let _ = stop.await;
        p.stats().await
    });
    up.recv_timeout(Duration::from_secs(5))
        .expect("the listener is up");
    let (b1_before, b2_before) = (t.counters("l1").0, t.counters("l2").0);

    let payload = vec![b'x'; 200 * 1024];
    let client = in_netns(t.ns(0), move || async move {
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(ask(CLIENT, &payload).await);
        }
        let outsider = ask(OUTSIDER, b"let me in").await;
        (answers, outsider)
    });
    let (answers, outsider) = client.join().expect("client");
    let _ = stop_tx.send(());
    let stats = host.join().expect("host");

    for (port, answer) in &answers {
        // the backend saw the client's real address and port in the PROXY header, and every byte
        let seen = answer
            .split(';')
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>();
        assert!(
            !seen.is_empty(),
            "the client from {CLIENT} was answered: {answer:?}"
        );
        let who = format!("saw {CLIENT}:{port}:");
        assert!(
            seen.iter().all(|s| s.contains(&who)),
            "{answer:?} should name {who}"
        );
        let total: usize = seen
            .iter()
            .filter_map(|s| s.rsplit(':').next()?.parse::<usize>().ok())
            .sum();
        assert_eq!(total, 200 * 1024, "every byte reached the backend");
    }
    let backends: std::collections::BTreeSet<&str> = answers
        .iter()
        .filter_map(|(_, a)| a.split(' ').next())
        .collect();
    assert_eq!(
        backends,
        ["b1", "b2"].into(),
        "round robin over both backends"
    );
    assert_eq!(outsider.1, "", "a client outside sourceRanges gets nothing");
    assert_eq!(stats[0].stats.refused_by_source, 1, "and is counted");
    let (b1_after, b2_after) = (t.counters("l1").0, t.counters("l2").0);
    eprintln!(
        "netns: towards backend 1 {} bytes, towards backend 2 {} bytes; listener {:?}",
        b1_after - b1_before,
        b2_after - b2_before,
        stats[0].stats
    );
    assert!(
        b1_after - b1_before >= 2 * 200 * 1024,
        "two connections' bytes crossed the host's link to backend 1"
    );
    assert!(
        b2_after - b2_before >= 2 * 200 * 1024,
        "and two to backend 2"
    );
}
