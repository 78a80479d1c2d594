//! The TCP forwarder: accept, check the source, pick a ready endpoint (failing over to the next when a connect
//! fails), then copy both ways with half-close until both sides are done or the connection sits idle.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::debug;

use super::budget::TCP_BUFFER;
use super::shared::{ActiveGuard, Shared};

/// Runs until aborted; aborting it drops the listening socket and every connection it carries.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    if !shared.filter.allows(peer.ip()) {
                        shared.stats.refused_by_source.fetch_add(1, Ordering::Relaxed);
                        continue; // dropping the socket closes it
                    }
                    let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
                        shared.stats.refused_over_limit.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let Some(admitted) = shared.admit(2 * TCP_BUFFER) else {
                        continue;
                    };
                    let shared = shared.clone();
                    conns.spawn(async move {
                        let _permit = (permit, admitted);
                        let _active = ActiveGuard::new(shared.clone());
                        if let Err(e) = forward(client, &shared).await {
                            debug!(error = %e, %peer, "connection ended with an error");
                        }
                    });
                }
                // out of file descriptors and the like: back off instead of spinning
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// The PROXY protocol v2 header of a TCP connection from `client` to `listener`, as HAProxy's specification
/// lays it out (IPv4-mapped addresses are written as IPv4, so both ends have one family).
pub fn proxy_v2_header(client: SocketAddr, listener: SocketAddr) -> io::Result<Vec<u8>> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let addresses = (canonical(client), canonical(listener));
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, addresses).build()
}

async fn connect_any(shared: &Shared) -> Option<TcpStream> {
    for addr in shared.upstreams.in_order() {
        match tokio::time::timeout(shared.tuning.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Some(s);
            }
            _ => {
                shared
                    .stats
                    .upstream_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    None
}

async fn forward(client: TcpStream, shared: &Arc<Shared>) -> io::Result<()> {
    let Some(upstream) = connect_any(shared).await else {
        return Err(io::Error::new(
            io::ErrorKind::NotConnected,
            "no ready endpoint accepted the connection",
        ));
    };
    let _ = client.set_nodelay(true);
    let mut upstream = upstream;
    if shared.proxy_protocol.load(Ordering::Relaxed) {
        let header = proxy_v2_header(client.peer_addr()?, client.local_addr()?)?;
        upstream.write_all(&header).await?;
    }
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let last = AtomicU64::new(shared.now_ms());
    tokio::try_join!(
        pump(cr, uw, shared, &last, &shared.stats.bytes_in),
        pump(ur, cw, shared, &last, &shared.stats.bytes_out),
    )?;
    Ok(())
}

/// One direction. EOF is passed on as a half-close (shutdown of the write side) and the other direction goes
/// on; the connection is idle only when neither direction moved a byte for the idle timeout.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    last: &AtomicU64,
    counter: &AtomicU64,
) -> io::Result<()> {
    let idle = shared.tuning.idle_timeout;
    let mut buf = vec![0u8; TCP_BUFFER];
    loop {
        match tokio::time::timeout(idle, from.read(&mut buf)).await {
            Ok(Ok(0)) => {
                let _ = to.shutdown().await;
                return Ok(());
            }
            Ok(Ok(n)) => {
                to.write_all(&buf[..n]).await?;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                last.store(shared.now_ms(), Ordering::Relaxed);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let quiet = shared.now_ms().saturating_sub(last.load(Ordering::Relaxed));
                if quiet >= idle.as_millis() as u64 {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_header_carries_the_client_and_the_listener() {
        let client: SocketAddr = "203.0.113.7:51000".parse().expect("addr");
        let listener: SocketAddr = "[::ffff:192.0.2.10]:443".parse().expect("addr");
        let h = proxy_v2_header(client, listener).expect("header");
        // the signature, v2 PROXY, TCP over IPv4, 12 address bytes (HAProxy's proxy-protocol.txt, section 2.2)
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        assert_eq!(h[12..16], [0x21, 0x11, 0, 12]);
        assert_eq!(h[16..20], [203, 0, 113, 7]);
        assert_eq!(h[20..24], [192, 0, 2, 10]);
        assert_eq!(h[24..28], [0xc7, 0x38, 0x01, 0xbb]);
        assert_eq!(h.len(), 28);
    }
}
