//! Active health checks of a listener's endpoints: each is connected to by TCP every `Tuning::health_interval`
//! (on its own port, or on the listener's health port; a UDP listener without one is not checked). Two failures
//! in a row take an endpoint out of the rotation, two successes bring it back; a change is announced, so the
//! operator writes the endpoints' health into the SharedLB's status.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::shared::Shared;

/// Consecutive results that change an endpoint's state.
const FLIP_AFTER: u32 = 2;

/// Checks the endpoints of `shared` until aborted, announcing each change through `changed`.
pub async fn check(shared: Arc<Shared>, changed: impl Fn()) {
    let mut streak: HashMap<SocketAddr, (bool, u32)> = HashMap::new();
    let mut tick = tokio::time::interval(shared.tuning.health_interval);
    loop {
        tick.tick().await;
        let Some(targets) = targets(&shared) else {
            // no longer checked (a UDP port's health port was removed): every endpoint is in the rotation
            streak.clear();
            if !shared.upstreams.down().is_empty() {
                shared.upstreams.set_down(BTreeSet::new());
                changed();
            }
            continue;
        };
        let results = probe_all(&targets, shared.tuning.health_timeout).await;
        let before = shared.upstreams.down();
        let mut down = before.clone();
        for (endpoint, ok) in results {
            let (last, n) = streak.entry(endpoint).or_insert((ok, 0));
            if *last == ok {
                *n += 1;
            } else {
                (*last, *n) = (ok, 1);
            }
            if *n >= FLIP_AFTER {
                if ok {
                    down.remove(&endpoint);
                } else {
                    down.insert(endpoint);
                }
            }
        }
        let current: BTreeSet<SocketAddr> = targets.iter().map(|(e, _)| *e).collect();
        streak.retain(|e, _| current.contains(e));
        down.retain(|e| current.contains(e));
        if down != before {
            shared.upstreams.set_down(down);
            changed();
        }
    }
}

/// Each endpoint and the address its check connects to; None when this listener's endpoints are not checked.
fn targets(shared: &Shared) -> Option<Vec<(SocketAddr, SocketAddr)>> {
    let health_port = shared.health_port();
    if shared.is_udp && health_port.is_none() {
        return None;
    }
    let all = shared.upstreams.get();
    Some(
        all.into_iter()
            .map(|e| (e, SocketAddr::new(e.ip(), health_port.unwrap_or(e.port()))))
            .collect(),
    )
}

/// One round: every endpoint connected to at once, each waiting at most `timeout`. (endpoint, reachable)
async fn probe_all(
    targets: &[(SocketAddr, SocketAddr)],
    timeout: std::time::Duration,
) -> Vec<(SocketAddr, bool)> {
    let mut round = tokio::task::JoinSet::new();
    for (endpoint, probe) in targets.iter().copied() {
        round.spawn(async move {
            let connected = tokio::time::timeout(timeout, TcpStream::connect(probe)).await;
            (endpoint, matches!(connected, Ok(Ok(_))))
        });
    }
    round.join_all().await
}
