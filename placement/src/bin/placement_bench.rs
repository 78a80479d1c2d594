//! `scripts/bench placement`: places 100,000 SharedLBs and prints the time and the load balancers used against
//! the lower bound. Two passes: one batch (first-fit decreasing), and one plan per item as the controller does it
//! (plan + apply per reconcile). The last line is the machine-readable summary.

use std::collections::BTreeMap;
use std::time::Instant;

use sharedlb_placement::{
    Change, PoolConfig, PoolState, PortMode, PortRequest, Protocol, Strategy, lower_bound,
};

const ITEMS: usize = 100_000;
const CAPACITY: u32 = 50;

/// A deterministic workload: 80% one port, 15% two, 5% three; a tenth of ports fixed; a quarter UDP.
fn workload() -> Vec<Change> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..ITEMS)
        .map(|i| {
            let r = next() % 100;
            let size = if r < 80 {
                1
            } else if r < 95 {
                2
            } else {
                3
            };
            let ports = (0..size)
                .map(|j| PortRequest {
                    name: format!("p{j}"),
                    port: (next() % 10 == 0).then(|| 1000 + (next() % 24) as u16 * 3 + j as u16),
                    protocol: if next() % 4 == 0 {
                        Protocol::Udp
                    } else {
                        Protocol::Tcp
                    },
                })
                .collect();
            Change::Upsert {
                key: format!("{i:06}"),
                ports,
            }
        })
        .collect()
}

fn config() -> PoolConfig {
    PoolConfig {
        max_ports_per_lb: CAPACITY,
        max_lbs: None,
        max_ports_total: None,
        port_range: (10000, 60000),
        strategy: Strategy::Pack,
        port_mode: PortMode::PerLoadBalancer,
        lb_groups: None,
        draining: Default::default(),
        warm: 0,
    }
}

fn main() {
    let changes = workload();
    let total_ports: u64 = changes
        .iter()
        .map(|c| match c {
            Change::Upsert { ports, .. } => ports.len() as u64,
            Change::Remove { .. } => 0,
        })
        .sum();
    let bound = lower_bound(total_ports, CAPACITY);

    let t = Instant::now();
    let mut batch = PoolState::new(config());
    let plan = batch.plan(&changes);
    batch.apply(&plan);
    let batch_s = t.elapsed().as_secs_f64();
    let batch_lbs = batch.load_balancers().len();
    println!(
        "batch: {ITEMS} items, {total_ports} ports, capacity {CAPACITY}: {batch_lbs} load balancers (lower bound {bound}), refused {}, {batch_s:.3} s",
        plan.refused.len()
    );

    let t = Instant::now();
    let mut inc = PoolState::new(config());
    let mut refused = 0;
    for c in &changes {
        let p = inc.plan(std::slice::from_ref(c));
        refused += p.refused.len();
        inc.apply(&p);
    }
    let inc_s = t.elapsed().as_secs_f64();
    println!(
        "one at a time: {} load balancers (lower bound {bound}), refused {refused}, {inc_s:.3} s, {:.1} us per reconcile",
        inc.load_balancers().len(),
        inc_s * 1e6 / ITEMS as f64
    );
    let c = compaction(&changes);
    println!(
        "compaction: {COMPACTED} items one at a time use {} load balancers; after deleting half at random {} (lower bound {}); compaction brings them to {} with {} moves when ports may change ({:.3} s), to {} with {} moves keeping each one's ports (as migration moves)",
        c.before,
        c.after_deletes,
        c.bound,
        c.any_ports.0,
        c.any_ports.1,
        c.secs,
        c.same_ports.0,
        c.same_ports.1
    );
    println!(
        "placement items={ITEMS} lbs={batch_lbs} lower_bound={bound} seconds={batch_s:.3} compact_before={} compact_bound={} compact_after={} compact_moves={} compact_same_ports_after={} compact_same_ports_moves={}",
        c.after_deletes, c.bound, c.any_ports.0, c.any_ports.1, c.same_ports.0, c.same_ports.1
    );
}

/// Items in the compaction pass: the first of the workload, placed one at a time.
const COMPACTED: usize = 10_000;

/// What `compaction` found.
struct Compacted {
    before: usize,
    after_deletes: usize,
    bound: u64,
    /// (load balancers after, moves) when moves may change auto-assigned ports, and when they keep them.
    any_ports: (u32, usize),
    same_ports: (u32, usize),
    secs: f64,
}

/// Places the first `COMPACTED` items one at a time, deletes a random half, and plans the compaction twice:
/// with moves that may change auto-assigned ports, and with moves that keep them (as migration does).
fn compaction(changes: &[Change]) -> Compacted {
    let mut s = PoolState::new(config());
    let mut asked = BTreeMap::new();
    for c in &changes[..COMPACTED] {
        let p = s.plan(std::slice::from_ref(c));
        s.apply(&p);
        if let (Change::Upsert { key, ports }, true) = (c, p.refused.is_empty()) {
            asked.insert(key.clone(), ports.clone());
        }
    }
    let before = s.load_balancers().len();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let gone: Vec<Change> = asked
        .keys()
        .filter(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.is_multiple_of(2)
        })
        .map(|key| Change::Remove { key: key.clone() })
        .collect();
    for c in &gone {
        if let Change::Remove { key } = c {
            asked.remove(key);
        }
    }
    let p = s.plan(&gone);
    s.apply(&p);
    let after_deletes = s.load_balancers().iter().filter(|l| !l.deleting).count();
    let left: u64 = asked.values().map(|p| p.len() as u64).sum();
    let t = Instant::now();
    let any = s.compaction(&asked);
    let secs = t.elapsed().as_secs_f64();
    // as a move asks (sharedlb plan --compact): the port numbers each has
    let same: BTreeMap<String, Vec<PortRequest>> = s
        .allocations()
        .map(|(k, a)| {
            let ports = a
                .ports
                .iter()
                .map(|p| PortRequest {
                    name: p.name.clone(),
                    port: Some(p.port),
                    protocol: p.protocol,
                })
                .collect();
            (k.clone(), ports)
        })
        .collect();
    let kept = s.compaction(&same);
    Compacted {
        before,
        after_deletes,
        bound: lower_bound(left, CAPACITY),
        any_ports: (any.after, any.moves.len()),
        same_ports: (kept.after, kept.moves.len()),
        secs,
    }
}
