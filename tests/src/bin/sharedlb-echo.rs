//! For the demo: `sharedlb-echo serve NAME=tcp:PORT NAME=udp:PORT ...` runs named echo backends on 127.0.0.1
//! until killed; `sharedlb-echo ask tcp|udp IP:PORT MESSAGE` sends one message and prints the reply, which names
//! the backend that answered.

use std::net::SocketAddr;

use anyhow::{Context, bail};
use sharedlb_e2e::echo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            for spec in &args[1..] {
                let (name, rest) = spec.split_once('=').context("NAME=tcp:PORT")?;
                let (proto, port) = rest.split_once(':').context("NAME=tcp:PORT")?;
                let port: u16 = port.parse()?;
                let addr = match proto {
                    "tcp" => echo::tcp(name, port).await?,
                    "udp" => echo::udp(name, port).await?,
                    _ => bail!("protocol must be tcp or udp"),
                };
                println!("{name} listening on {addr}/{proto}");
            }
            std::future::pending::<()>().await;
            Ok(())
        }
        Some("ask") if args.len() == 4 => {
            let addr: SocketAddr = args[2].parse()?;
            let reply = match args[1].as_str() {
                "tcp" => echo::tcp_ask(addr, &args[3]).await?,
                "udp" => echo::udp_ask(addr, &args[3]).await?,
                _ => bail!("protocol must be tcp or udp"),
            };
            println!("{reply}");
            Ok(())
        }
        _ => {
            bail!("usage: sharedlb-echo serve NAME=tcp|udp:PORT ... | ask tcp|udp IP:PORT MESSAGE")
        }
    }
}
