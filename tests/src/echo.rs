//! Small named echo servers on loopback: every reply is `<name>:<what was sent>`, so a test (or the demo) sees
//! which backend answered. TCP and UDP; they run until the runtime stops.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// A TCP echo server on 127.0.0.1 (port 0: any free one).
pub async fn tcp(name: &str, port: u16) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = l.local_addr()?;
    let name = name.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut out = format!("{name}:").into_bytes();
                    out.extend_from_slice(&buf[..n]);
                    if s.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// A UDP echo server on 127.0.0.1.
pub async fn udp(name: &str, port: u16) -> std::io::Result<SocketAddr> {
    let s = UdpSocket::bind(("127.0.0.1", port)).await?;
    let addr = s.local_addr()?;
    let name = name.to_string();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        while let Ok((n, peer)) = s.recv_from(&mut buf).await {
            let mut out = format!("{name}:").into_bytes();
            out.extend_from_slice(&buf[..n]);
            let _ = s.send_to(&out, peer).await;
        }
    });
    Ok(addr)
}

/// Sends `msg` over a new TCP connection and returns the reply (`<backend>:<msg>`).
pub async fn tcp_ask(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr)).await??;
    s.write_all(msg.as_bytes()).await?;
    read_reply(&mut s, msg).await
}

/// Reads one reply to `msg` on an open connection: the backend's name, a colon and `msg`.
pub async fn read_reply(s: &mut TcpStream, msg: &str) -> std::io::Result<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(msg.as_bytes()) {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await??;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    if !got.ends_with(msg.as_bytes()) {
        // closed before the whole answer came: e.g. a listener with no ready endpoint accepts and closes
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("closed after {:?}", String::from_utf8_lossy(&got)),
        ));
    }
    Ok(String::from_utf8_lossy(&got).into_owned())
}

/// Sends one datagram and returns the reply.
pub async fn udp_ask(addr: SocketAddr, msg: &str) -> std::io::Result<String> {
    let s = UdpSocket::bind("127.0.0.1:0").await?;
    s.send_to(msg.as_bytes(), addr).await?;
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(3), s.recv(&mut buf)).await??;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}
