//! `scripts/bench proxy`: throughput of the local provider's forwarder against a direct connection to the same
//! backend, in the same run, on loopback. Bulk TCP (MiB/s, one connection), TCP connections per second (connect,
//! 1-byte echo, close; 16 clients at once) and UDP round trips per second. The last line is the summary.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sharedlb_providers::local::{Forwarder, LocalProvider, Tuning};
use sharedlb_providers::{ListenerSpec, LoadBalancerKey, LoadBalancerProvider, Owner, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

const BULK_BYTES: u64 = 1 << 30;
const CONNS: usize = 4000;
const CLIENTS: usize = 16;
const DATAGRAMS: usize = 20000;

/// Reads everything, answers each read with its first byte (connection test) and, at EOF, the byte count.
async fn tcp_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            total += n as u64;
                            if n == 1 && s.write_all(&buf[..1]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

async fn udp_backend() -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = s.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let _ = s.send_to(&buf[..n], peer).await;
        }
    });
    addr
}

async fn bulk(addr: SocketAddr) -> f64 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let chunk = vec![7u8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < BULK_BYTES {
        s.write_all(&chunk).await.expect("write");
        sent += chunk.len() as u64;
    }
    s.shutdown().await.expect("half-close");
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.expect("count");
    assert_eq!(u64::from_be_bytes(count), sent, "every byte arrived");
    sent as f64 / (1024.0 * 1024.0) / t.elapsed().as_secs_f64()
}

async fn conns(addr: SocketAddr) -> f64 {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            for _ in 0..CONNS / CLIENTS {
                let mut s = TcpStream::connect(addr).await.expect("connect");
                s.write_all(b"x").await.expect("write");
                let mut b = [0u8; 1];
                s.read_exact(&mut b).await.expect("echo");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    CONNS as f64 / t.elapsed().as_secs_f64()
}

async fn datagrams(addr: SocketAddr) -> f64 {
    let s = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    s.connect(addr).await.expect("connect");
    let mut buf = [0u8; 64];
    let t = Instant::now();
    for _ in 0..DATAGRAMS {
        s.send(b"ping").await.expect("send");
        tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
            .await
            .expect("reply")
            .expect("recv");
    }
    DATAGRAMS as f64 / t.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (tcp, udp) = (tcp_backend().await, udp_backend().await);
    let p = Arc::new(
        LocalProvider::new(
            "bench",
            &["127.0.9.10".to_string()],
            Tuning::default(),
            Forwarder::new(),
        )
        .expect("provider"),
    );
    let key = LoadBalancerKey {
        cluster_id: "bench".into(),
        pool: "bench".into(),
        index: 0,
    };
    p.ensure_load_balancer(&key).await.expect("lb");
    let listener = |protocol, backend| ListenerSpec {
        port: 4999,
        protocol,
        node_port: 30000,
        owner: Owner {
            uid: "bench".into(),
            namespace: "bench".into(),
            name: "bench".into(),
        },
        source_ranges: vec![],
        backends: vec![backend],
        proxy_protocol: false,
        health_port: None,
    };
    p.ensure_listener(&key, &listener(Protocol::Tcp, tcp))
        .await
        .expect("tcp listener");
    p.ensure_listener(&key, &listener(Protocol::Udp, udp))
        .await
        .expect("udp listener");
    let via: SocketAddr = "127.0.9.10:4999".parse().expect("addr");

    let (bulk_direct, bulk_proxy) = (bulk(tcp).await, bulk(via).await);
    println!(
        "tcp bulk, 1 GiB on one connection: direct {bulk_direct:.0} MiB/s, through the proxy {bulk_proxy:.0} MiB/s"
    );
    let (conns_direct, conns_proxy) = (conns(tcp).await, conns(via).await);
    println!(
        "tcp connections ({CONNS}, {CLIENTS} clients): direct {conns_direct:.0}/s, through the proxy {conns_proxy:.0}/s"
    );
    let (udp_direct, udp_proxy) = (datagrams(udp).await, datagrams(via).await);
    println!(
        "udp round trips ({DATAGRAMS}, one client): direct {udp_direct:.0}/s, through the proxy {udp_proxy:.0}/s"
    );
    println!(
        "proxy tcp_mib_s={bulk_proxy:.0} direct_tcp_mib_s={bulk_direct:.0} conns_s={conns_proxy:.0} direct_conns_s={conns_direct:.0} udp_rtt_s={udp_proxy:.0} direct_udp_rtt_s={udp_direct:.0}"
    );
}
