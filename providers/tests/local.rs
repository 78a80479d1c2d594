//! The local provider: conformance, and real bytes through real sockets on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use sharedlb_providers::conformance::listener_spec;
use sharedlb_providers::local::{Forwarder, LocalProvider, Tuning};
use sharedlb_providers::{
    ListenerSpec, LoadBalancerKey, LoadBalancerProvider, Protocol, ProviderError,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A fresh loopback /29-ish block per provider, so tests in this binary never share an address.
fn addresses(n: u8) -> Vec<String> {
    static NEXT: AtomicU8 = AtomicU8::new(100);
    let start = NEXT.fetch_add(n, Ordering::SeqCst);
    (start..start + n).map(|i| format!("127.0.1.{i}")).collect()
}

fn key(i: u32) -> LoadBalancerKey {
    LoadBalancerKey {
        cluster_id: "t".into(),
        pool: "p".into(),
        index: i,
    }
}

fn spec(port: u16, protocol: Protocol, owner: &str, backends: Vec<SocketAddr>) -> ListenerSpec {
    ListenerSpec {
        backends,
        ..listener_spec(port, protocol, 30000, owner, &[])
    }
}

/// A TCP backend that answers every read with `<name>:<bytes>`, and says nothing more after the client's EOF
/// until it has answered, then closes: a test of half-close.
async fn tcp_backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got.extend_from_slice(&buf[..n]);
                            let _ = s.write_all(format!("{name}:").as_bytes()).await;
                            let _ = s.write_all(&buf[..n]).await;
                        }
                    }
                }
                // after the client's half-close, one more line proves the other direction still works
                let _ = s
                    .write_all(format!("|{name} saw {} bytes", got.len()).as_bytes())
                    .await;
            });
        }
    });
    addr
}

async fn udp_backend(name: &'static str) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let mut out = format!("{name}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, peer).await;
        }
    });
    addr
}

async fn tcp_roundtrip(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(msg.as_bytes()).await?;
    s.shutdown().await?; // half-close: the reply must still arrive
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

async fn udp_roundtrip(addr: SocketAddr, msg: &str) -> String {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.send_to(msg.as_bytes(), addr).await.expect("send");
    let mut buf = [0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), s.recv(&mut buf))
        .await
        .expect("reply in time")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// A provider with one address and its load balancer 0 made: the provider and the address.
async fn one_load_balancer(tuning: Tuning) -> (LocalProvider, std::net::IpAddr) {
    made(LocalProvider::new("p", &addresses(1), tuning, Forwarder::new()).expect("provider")).await
}

/// `p` with its load balancer 0 made, and that load balancer's address.
async fn made(p: LocalProvider) -> (LocalProvider, std::net::IpAddr) {
    let info = p.ensure_load_balancer(&key(0)).await.expect("lb");
    let ip = info.ip.expect("ip").parse().expect("an IP address");
    (p, ip)
}

#[tokio::test]
async fn local_provider_is_conformant() {
    sharedlb_providers::conformance::run(|pool| async move {
        // the suite uses load balancer indexes up to 7
        Arc::new(
            LocalProvider::new(&pool, &addresses(8), Tuning::default(), Forwarder::new())
                .expect("provider"),
        ) as Arc<dyn LoadBalancerProvider>
    })
    .await;
}

#[tokio::test]
async fn tcp_and_udp_bytes_reach_the_right_backend_and_come_back() {
    let p = LocalProvider::new("p", &addresses(1), Tuning::default(), Forwarder::new())
        .expect("provider");
    let info = p.ensure_load_balancer(&key(0)).await.expect("lb");
    let ip: std::net::IpAddr = info.ip.expect("ip").parse().expect("ip");
    let (a, b) = (tcp_backend("a").await, tcp_backend("b").await);
    let u = udp_backend("u").await;
    p.ensure_listener(&key(0), &spec(4100, Protocol::Tcp, "A", vec![a]))
        .await
        .expect("A");
    p.ensure_listener(&key(0), &spec(4101, Protocol::Tcp, "B", vec![b]))
        .await
        .expect("B");
    p.ensure_listener(&key(0), &spec(4100, Protocol::Udp, "U", vec![u]))
        .await
        .expect("U");

    // two SharedLBs on one IP never cross, and the reply after a half-close still arrives
    assert_eq!(
        tcp_roundtrip((ip, 4100).into(), "hello").await.expect("A"),
        "a:hello|a saw 5 bytes"
    );
    assert_eq!(
        tcp_roundtrip((ip, 4101).into(), "hi").await.expect("B"),
        "b:hi|b saw 2 bytes"
    );
    assert_eq!(udp_roundtrip((ip, 4100).into(), "ping").await, "u:ping");

    let stats = p.stats().await;
    let a_stats = stats
        .iter()
        .find(|r| r.address.port() == 4100 && r.protocol == Protocol::Tcp)
        .expect("row");
    assert_eq!(a_stats.stats.connections, 1);
    assert_eq!(a_stats.stats.bytes_in, 5);
    assert_eq!(
        a_stats.stats.bytes_out,
        "a:hello|a saw 5 bytes".len() as u64
    );
    let u_stats = stats
        .iter()
        .find(|r| r.protocol == Protocol::Udp)
        .expect("udp row");
    assert_eq!(
        (u_stats.stats.connections, u_stats.stats.active),
        (1, 1),
        "one live UDP session"
    );
}

#[tokio::test]
async fn a_dead_endpoint_fails_over_and_endpoint_changes_keep_established_connections() {
    let (p, ip) = one_load_balancer(Tuning::default()).await;
    let dead: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        l.local_addr().expect("addr") // dropped: connections to it are refused
    };
    let live = tcp_backend("live").await;
    p.ensure_listener(&key(0), &spec(4200, Protocol::Tcp, "X", vec![dead, live]))
        .await
        .expect("listener");
    for _ in 0..4 {
        assert!(
            tcp_roundtrip((ip, 4200).into(), "x")
                .await
                .expect("fails over")
                .starts_with("live:x")
        );
    }
    // an established connection survives an endpoint change
    let mut held = TcpStream::connect((ip, 4200)).await.expect("connect");
    held.write_all(b"one").await.expect("write");
    let mut buf = [0u8; 8];
    held.read_exact(&mut buf).await.expect("read");
    assert_eq!(&buf, b"live:one");
    let other = tcp_backend("other").await;
    p.ensure_listener(&key(0), &spec(4200, Protocol::Tcp, "X", vec![other]))
        .await
        .expect("new endpoints");
    held.write_all(b"two").await.expect("still open");
    held.read_exact(&mut buf).await.expect("read");
    assert_eq!(
        &buf, b"live:two",
        "the held connection still talks to its endpoint"
    );
    assert!(
        tcp_roundtrip((ip, 4200).into(), "y")
            .await
            .expect("new")
            .starts_with("other:y"),
        "new ones go to the new set"
    );
}

#[tokio::test]
async fn source_ranges_are_enforced_and_removal_closes_the_port() {
    let (p, ip) = one_load_balancer(Tuning::default()).await;
    let b = tcp_backend("b").await;
    let mut l = spec(4300, Protocol::Tcp, "S", vec![b]);
    l.source_ranges = vec!["203.0.113.0/24".into()];
    p.ensure_listener(&key(0), &l).await.expect("listener");
    let r = tcp_roundtrip((ip, 4300).into(), "x").await;
    assert!(
        r.as_ref().map(|s| s.is_empty()).unwrap_or(true),
        "a client outside sourceRanges gets no bytes: {r:?}"
    );
    l.source_ranges = vec!["127.0.0.0/8".into()];
    p.ensure_listener(&key(0), &l).await.expect("update ranges");
    assert_eq!(
        tcp_roundtrip((ip, 4300).into(), "x")
            .await
            .expect("allowed"),
        "b:x|b saw 1 bytes"
    );
    assert!(p.stats().await[0].stats.refused_by_source >= 1);

    // only the owner removes it; then connect is refused at once
    p.remove_listener(&key(0), 4300, Protocol::Tcp, "someone-else")
        .await
        .expect("no-op");
    assert!(TcpStream::connect((ip, 4300)).await.is_ok());
    p.remove_listener(&key(0), 4300, Protocol::Tcp, "S")
        .await
        .expect("remove");
    let e = TcpStream::connect((ip, 4300)).await.expect_err("closed");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn a_port_held_by_another_process_is_an_error_not_a_panic() {
    let addrs = addresses(1);
    let squatter = TcpListener::bind((addrs[0].parse::<std::net::IpAddr>().expect("ip"), 4400))
        .await
        .expect("squat");
    let p = LocalProvider::new("p", &addrs, Tuning::default(), Forwarder::new()).expect("provider");
    p.ensure_load_balancer(&key(0)).await.expect("lb");
    let e = p
        .ensure_listener(&key(0), &spec(4400, Protocol::Tcp, "Q", vec![]))
        .await
        .expect_err("taken");
    assert!(
        matches!(e, ProviderError::AlreadyExists(ref m) if m.contains("4400")),
        "{e}"
    );
    drop(squatter);
    p.ensure_listener(&key(0), &spec(4400, Protocol::Tcp, "Q", vec![]))
        .await
        .expect("free again");
    let e = p
        .ensure_load_balancer(&key(1))
        .await
        .expect_err("one address, one load balancer");
    assert!(matches!(e, ProviderError::QuotaExceeded(_)));
}

#[tokio::test]
async fn idle_tcp_connections_and_udp_sessions_are_closed() {
    let tuning = Tuning {
        idle_timeout: Duration::from_millis(300),
        ..Tuning::default()
    };
    let (p, ip) = one_load_balancer(tuning).await;
    let (b, u) = (tcp_backend("b").await, udp_backend("u").await);
    p.ensure_listener(&key(0), &spec(4500, Protocol::Tcp, "I", vec![b]))
        .await
        .expect("tcp");
    p.ensure_listener(&key(0), &spec(4500, Protocol::Udp, "I", vec![u]))
        .await
        .expect("udp");
    let mut s = TcpStream::connect((ip, 4500)).await.expect("connect");
    assert_eq!(udp_roundtrip((ip, 4500).into(), "x").await, "u:x");
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("closed before 3 s");
    assert!(
        matches!(r, Ok(0) | Err(_)),
        "the idle connection is closed: {r:?}"
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let rows = p.stats().await;
    assert!(
        rows.iter().all(|r| r.stats.active == 0),
        "no live connection or session: {rows:?}"
    );
}

/// A spoofer varying its source port cannot take every session: one client IP holds a few per listener, the
/// rest are refused and counted, and another IP is still served.
#[tokio::test]
async fn udp_sessions_per_source_are_capped() {
    let forwarder = Forwarder::with_budget(sharedlb_providers::local::BudgetLimits {
        max_udp_sessions_per_source: 4,
        ..Default::default()
    });
    let provider = LocalProvider::new("p", &addresses(1), Tuning::default(), forwarder.clone());
    let (p, ip) = made(provider.expect("provider")).await;
    let u = udp_backend("u").await;
    p.ensure_listener(&key(0), &spec(4400, Protocol::Udp, "U", vec![u]))
        .await
        .expect("listener");
    let listener = SocketAddr::new(ip, 4400);
    let mut answered = 0;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        s.send_to(b"x", listener).await.expect("send");
        let mut buf = [0u8; 64];
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf)).await
        {
            answered += 1;
        }
        clients.push(s); // each keeps its session alive
    }
    assert_eq!(answered, 4, "one source IP holds four sessions");
    let (_, used) = forwarder.budget();
    assert_eq!(used.refused_udp_per_source, 6);
    let other = UdpSocket::bind("127.0.0.2:0").await.expect("bind");
    other.send_to(b"y", listener).await.expect("send");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), other.recv(&mut buf))
        .await
        .expect("another source is answered")
        .expect("recv");
    assert_eq!(&buf[..n], b"u:y");
}

/// Tuning whose health checks run every 100 ms.
fn quick_checks() -> Tuning {
    Tuning {
        health_interval: Duration::from_millis(100),
        health_timeout: Duration::from_millis(200),
        ..Tuning::default()
    }
}

/// Waits until the listener on `port` reports (healthy, all) endpoints.
async fn health_becomes(p: &LocalProvider, port: u16, protocol: Protocol, want: (usize, usize)) {
    for _ in 0..50 {
        if p.endpoint_health(&key(0), port, protocol).await == Some(want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "health of {port}: {:?}, not {want:?}",
        p.endpoint_health(&key(0), port, protocol).await
    );
}

/// An endpoint that refuses connections leaves the rotation: once its checks fail, no connection is tried on it
/// (no upstream failure is counted); when it listens again it comes back. A UDP listener is checked only where a
/// health port is given, on that port.
#[tokio::test]
async fn endpoints_failing_their_checks_leave_the_rotation() {
    let (p, ip) = one_load_balancer(quick_checks()).await;
    let alive = tcp_backend("alive").await;
    // nothing listens here yet (a port just freed)
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    p.ensure_listener(&key(0), &spec(4450, Protocol::Tcp, "H", vec![alive, dead]))
        .await
        .expect("listener");
    health_becomes(&p, 4450, Protocol::Tcp, (1, 2)).await;
    let addr = SocketAddr::new(ip, 4450);
    let failures = || async { p.stats().await[0].stats.upstream_failures };
    let before = failures().await;
    for i in 0..6 {
        let reply = tcp_roundtrip(addr, &format!("m{i}")).await.expect("reply");
        assert!(reply.starts_with("alive:"), "{reply}");
    }
    assert_eq!(
        failures().await,
        before,
        "the failing endpoint is not tried"
    );

    // it comes back once it listens
    let back = TcpListener::bind(dead)
        .await
        .expect("listen on the dead endpoint");
    health_becomes(&p, 4450, Protocol::Tcp, (2, 2)).await;
    drop(back);

    // UDP: a health port with nothing on it fails the endpoint; without one, nothing is checked
    let u = udp_backend("u").await;
    let with_port = |hp: Option<u16>| ListenerSpec {
        health_port: hp,
        ..spec(4451, Protocol::Udp, "U", vec![u])
    };
    p.ensure_listener(&key(0), &with_port(Some(dead.port())))
        .await
        .expect("udp listener");
    health_becomes(&p, 4451, Protocol::Udp, (0, 1)).await;
    let checked = TcpListener::bind(dead)
        .await
        .expect("the health port listens");
    health_becomes(&p, 4451, Protocol::Udp, (1, 1)).await;
    drop(checked);
    health_becomes(&p, 4451, Protocol::Udp, (0, 1)).await;
    p.ensure_listener(&key(0), &with_port(None))
        .await
        .expect("no health port");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        p.endpoint_health(&key(0), 4451, Protocol::Udp).await,
        Some((1, 1)),
        "unchecked: it stays in"
    );
}

/// Two pools that list one address would both bind it under SO_REUSEPORT: the second is refused instead, the
/// first keeps serving, and deleting the second's load balancer leaves the first's listener alone.
#[tokio::test]
async fn pools_sharing_an_address_are_refused_not_mixed() {
    let forwarder = Forwarder::new();
    let shared = addresses(1);
    let provider = |pool| LocalProvider::new(pool, &shared, Tuning::default(), forwarder.clone());
    let (first, ip) = made(provider("first").expect("provider")).await;
    let (second, _) = made(provider("second").expect("provider")).await;
    let a = tcp_backend("a").await;
    first
        .ensure_listener(&key(0), &spec(4460, Protocol::Tcp, "A", vec![a]))
        .await
        .expect("first");
    let e = second
        .ensure_listener(&key(0), &spec(4460, Protocol::Tcp, "B", vec![a]))
        .await
        .expect_err("the same address and port for another pool");
    assert!(
        matches!(e, ProviderError::AlreadyExists(ref m) if m.contains("\"first\"")),
        "{e:?}"
    );
    second.delete_load_balancer(&key(0)).await.expect("delete");
    let reply = tcp_roundtrip(SocketAddr::new(ip, 4460), "x")
        .await
        .expect("still served");
    assert!(reply.starts_with("a:x"), "{reply}");
}
