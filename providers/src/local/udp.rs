//! The UDP forwarder: one session per client address, each with its own upstream socket connected to one ready
//! endpoint, so replies go back to the client they answer. Sessions end after the idle timeout; a session whose
//! endpoint refuses (ICMP port unreachable) is dropped and the client's next datagram picks another endpoint.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use super::budget::{Admission, UDP_BUFFER};
use super::shared::{ActiveGuard, Shared};

struct Session {
    upstream: Arc<UdpSocket>,
    last: Arc<AtomicU64>,
    dead: Arc<AtomicBool>,
    replies: JoinHandle<()>,
    /// Its share of the process's budget, given back when the session goes.
    _admitted: Admission,
}

/// Whom a session is counted against: the client's IPv4 address, or the /64 of its IPv6 address (one host
/// holds a whole /64 and could vary the rest).
fn source(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The live sessions of one listener, by client address, with how many each client IP holds.
#[derive(Default)]
struct Sessions {
    by_peer: HashMap<SocketAddr, Session>,
    per_source: HashMap<IpAddr, usize>,
}

impl Sessions {
    fn insert(&mut self, peer: SocketAddr, s: Session) {
        if self.by_peer.insert(peer, s).is_none() {
            *self.per_source.entry(source(peer.ip())).or_default() += 1;
        }
    }

    fn remove(&mut self, peer: &SocketAddr) {
        if self.by_peer.remove(peer).is_some() {
            self.forget(source(peer.ip()));
        }
    }

    fn forget(&mut self, ip: IpAddr) {
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
    }

    fn of_source(&self, ip: IpAddr) -> usize {
        self.per_source.get(&ip).copied().unwrap_or(0)
    }

    /// Drops the sessions `keep` refuses.
    fn retain(&mut self, mut keep: impl FnMut(&Session) -> bool) {
        let gone: Vec<SocketAddr> = self
            .by_peer
            .iter()
            .filter(|(_, s)| !keep(s))
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            self.remove(&p);
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.replies.abort();
    }
}

/// Runs until aborted; aborting it closes the socket and every session.
pub async fn serve(socket: UdpSocket, shared: Arc<Shared>) {
    let socket = Arc::new(socket);
    let mut sessions = Sessions::default();
    let mut buf = vec![0u8; UDP_BUFFER];
    let idle = shared.tuning.idle_timeout;
    let mut sweep = tokio::time::interval((idle / 4).max(std::time::Duration::from_millis(100)));
    loop {
        tokio::select! {
            got = socket.recv_from(&mut buf) => {
                let Ok((n, peer)) = got else { continue };
                if !shared.filter.allows(peer.ip()) {
                    shared.stats.refused_by_source.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if sessions.by_peer.get(&peer).is_some_and(|s| s.dead.load(Ordering::Relaxed)) {
                    sessions.remove(&peer);
                }
                if !sessions.by_peer.contains_key(&peer) {
                    if sessions.by_peer.len() >= shared.tuning.max_connections {
                        shared.stats.refused_over_limit.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if sessions.of_source(source(peer.ip())) >= shared.budget.limits().max_udp_sessions_per_source {
                        shared.budget.refuse_udp_per_source();
                        shared.stats.refused_over_budget.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let Some(admitted) = shared.admit(UDP_BUFFER) else { continue };
                    match open(&socket, peer, &shared, admitted).await {
                        Some(s) => sessions.insert(peer, s),
                        None => { shared.stats.upstream_failures.fetch_add(1, Ordering::Relaxed); continue; }
                    }
                }
                if let Some(s) = sessions.by_peer.get(&peer)
                    && s.upstream.send(&buf[..n]).await.is_ok() {
                        shared.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        s.last.store(shared.now_ms(), Ordering::Relaxed);
                    }
            }
            _ = sweep.tick() => {
                let now = shared.now_ms();
                sessions.retain(|s| {
                    !s.dead.load(Ordering::Relaxed)
                        && now.saturating_sub(s.last.load(Ordering::Relaxed)) < idle.as_millis() as u64
                });
            }
        }
    }
}

/// A session to the next ready endpoint, or None when there is none.
async fn open(
    socket: &Arc<UdpSocket>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    admitted: Admission,
) -> Option<Session> {
    let backend = *shared.upstreams.in_order().first()?;
    let local: SocketAddr = match backend.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => (Ipv4Addr::LOCALHOST, 0).into(),
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(ip) if ip.is_loopback() => (Ipv6Addr::LOCALHOST, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let upstream = UdpSocket::bind(local).await.ok()?;
    upstream.connect(backend).await.ok()?;
    let upstream = Arc::new(upstream);
    let last = Arc::new(AtomicU64::new(shared.now_ms()));
    let dead = Arc::new(AtomicBool::new(false));
    let replies = tokio::spawn(replies(
        socket.clone(),
        upstream.clone(),
        peer,
        shared.clone(),
        last.clone(),
        dead.clone(),
    ));
    Some(Session {
        upstream,
        last,
        dead,
        replies,
        _admitted: admitted,
    })
}

async fn replies(
    socket: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    last: Arc<AtomicU64>,
    dead: Arc<AtomicBool>,
) {
    let _active = ActiveGuard::new(shared.clone());
    let mut buf = vec![0u8; UDP_BUFFER];
    loop {
        match upstream.recv(&mut buf).await {
            Ok(n) => {
                if socket.send_to(&buf[..n], peer).await.is_ok() {
                    shared
                        .stats
                        .bytes_out
                        .fetch_add(n as u64, Ordering::Relaxed);
                    last.store(shared.now_ms(), Ordering::Relaxed);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                shared
                    .stats
                    .upstream_failures
                    .fetch_add(1, Ordering::Relaxed);
                dead.store(true, Ordering::Relaxed);
                return;
            }
            Err(_) => {}
        }
    }
}
