//! `scripts/bench placement`: places 100,000 SharedLBs and prints the time and the load balancers used against
//! the lower bound. Two passes: one batch (first-fit decreasing), and one plan per item as the controller does it
//! (plan + apply per reconcile). The last line is the machine-readable summary.

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
    println!("placement items={ITEMS} lbs={batch_lbs} lower_bound={bound} seconds={batch_s:.3}");
}
