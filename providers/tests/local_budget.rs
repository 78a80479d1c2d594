//! The local forwarder's memory is bounded by its budget, whatever the clients do: a process of its own (this test
//! binary holds one test), so that its resident memory is this test's alone.

use std::net::SocketAddr;
use std::time::Duration;

use sharedlb_providers::conformance::listener_spec;
use sharedlb_providers::local::{BudgetLimits, Forwarder, LocalProvider, Tuning};
use sharedlb_providers::{ListenerSpec, LoadBalancerKey, LoadBalancerProvider, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes each side sends on every connection: enough to fill the forwarder's copy buffer of that direction.
const SENT: usize = 64 * 1024;
const CONNECTIONS: usize = 1000;
const BUDGET: usize = 16 << 20;

fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Accepts, sends `SENT` bytes at once and then reads slowly: the forwarder's buffers of both directions fill.
async fn chatty_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        static HELLO: [u8; SENT] = [b'h'; SENT];
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(&HELLO).await;
                let mut one = [0u8; 1];
                let _ = s.read(&mut one).await; // keeps the connection open, reading almost nothing
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_budget_are_refused_and_memory_stays_under_it() {
    let forwarder = Forwarder::with_budget(BudgetLimits {
        max_connections: 100_000,
        max_buffer_bytes: BUDGET,
        max_udp_sessions_per_source: 64,
    });
    let tuning = Tuning {
        max_connections: 100_000,
        ..Tuning::default()
    };
    let p = LocalProvider::new(
        "budget",
        &["127.0.1.250".to_string()],
        tuning,
        forwarder.clone(),
    )
    .expect("provider");
    let key = LoadBalancerKey {
        cluster_id: "t".into(),
        pool: "budget".into(),
        index: 0,
    };
    p.ensure_load_balancer(&key).await.expect("lb");
    let backend = chatty_backend().await;
    let spec = ListenerSpec {
        backends: vec![backend],
        ..listener_spec(4300, Protocol::Tcp, 30000, "owner", &[])
    };
    p.ensure_listener(&key, &spec).await.expect("listener");
    let listener: SocketAddr = "127.0.1.250:4300".parse().expect("addr");

    let before = resident_bytes();
    static PAYLOAD: [u8; SENT] = [b'c'; SENT];
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        let Ok(mut s) = TcpStream::connect(listener).await else {
            continue;
        };
        // the forwarder may have closed a refused one already: a failed write is fine
        let _ = tokio::time::timeout(Duration::from_millis(200), s.write_all(&PAYLOAD)).await;
        clients.push(s);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown = resident_bytes().saturating_sub(before);
    let (limits, used) = forwarder.budget();
    let refused = p
        .stats()
        .await
        .iter()
        .map(|r| r.stats.refused_over_budget)
        .sum::<u64>();
    eprintln!(
        "budget: {} connections admitted of {CONNECTIONS}, {refused} refused; buffers {} KiB of {} KiB; resident memory grew {} KiB",
        used.connections,
        used.buffer_bytes / 1024,
        limits.max_buffer_bytes / 1024,
        grown / 1024
    );
    let per_connection = 64 * 1024;
    assert_eq!(
        used.connections as usize,
        BUDGET / per_connection,
        "the budget is full"
    );
    assert_eq!(
        refused as usize,
        CONNECTIONS - BUDGET / per_connection,
        "the rest refused and counted"
    );
    assert_eq!(used.refused_buffer_bytes, refused);
    // the unbounded forwarder held CONNECTIONS x 64 KiB = 62.5 MiB here; the budget's 16 MiB plus the tasks,
    // sockets and this test's own clients stay well under that
    let slack = 12 << 20;
    assert!(
        grown < BUDGET + slack,
        "resident memory grew {grown} bytes, past the budget {BUDGET} + {slack}"
    );

    // closing them gives the budget back: a new connection gets through
    drop(clients);
    let mut s = TcpStream::connect(listener).await.expect("connect");
    let mut first = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut first))
        .await
        .expect("the backend's bytes come through in time")
        .expect("read");
    assert_eq!(first, [b'h']);
}
