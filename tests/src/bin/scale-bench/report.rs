//! The readable report, the targets, and the summary line.

use std::collections::BTreeMap;

use crate::Config;
use crate::floor::Floor;
use crate::nodes::{CHURN_NODES, Churn};
use crate::operator::{Burst, Restart};
use crate::requests::{Call, Requests, total};

/// Everything measured.
#[derive(Debug)]
pub struct Report {
    pub nodes_s: f64,
    pub nodes_ready: usize,
    pub floor: Floor,
    pub burst: Burst,
    pub quiet: Requests,
    pub restart: Restart,
    pub churn: Churn,
    pub peak_rss_mb: f64,
    pub delete_s: f64,
}

impl Report {
    pub fn print(&self, cfg: &Config) {
        let n = cfg.n as f64;
        println!();
        println!(
            "scale: {} SharedLBs, concurrency {}, {} Nodes, one apiserver, the release operator as a process",
            cfg.n, cfg.concurrency, cfg.nodes
        );
        self.print_times(cfg);
        self.print_burst(cfg);
        println!();
        print_calls(
            "floor writes per SharedLB (a check of the counting)",
            &self.floor.requests,
            Some(n),
        );
        println!();
        let title = format!("writes in {} quiet seconds", cfg.quiet.as_secs());
        print_calls(&title, &self.quiet, None);
        println!();
        self.print_restart();
        println!();
        println!(
            "cloud calls per node, by operation ({CHURN_NODES} added, then removed, one at a time):"
        );
        println!("  added:   {}", per_op(&self.churn.per_add));
        println!("  removed: {}", per_op(&self.churn.per_remove));
        println!();
        println!(
            "peak RSS of the operator processes: {:.1} MB",
            self.peak_rss_mb
        );
        println!();
        self.print_targets(n);
        self.print_summary(cfg);
    }

    fn ratio(&self) -> f64 {
        self.burst.secs / self.floor.secs
    }

    fn print_times(&self, cfg: &Config) {
        println!("  {:<58} {:>9}", "phase", "seconds");
        let row = |what: &str, secs: f64| println!("  {what:<58} {secs:>9.2}");
        row(&format!("{} Ready Nodes created", cfg.nodes), self.nodes_s);
        row(
            "floor: a bare client's 5 writes per SharedLB",
            self.floor.secs,
        );
        row("operator: first create -> all Ready", self.burst.secs);
        row(
            "restart: start -> every SharedLB reconciled once",
            self.restart.secs,
        );
        row("delete all: first delete -> none left", self.delete_s);
        println!("  operator / floor: {:.2}", self.ratio());
        println!(
            "  Nodes still Ready at the end: {} (of {} made)",
            self.nodes_ready, cfg.nodes
        );
    }

    /// The operator phase's writes and reads, per SharedLB.
    fn print_burst(&self, cfg: &Config) {
        let (n, requests) = (cfg.n as f64, &self.burst.requests);
        println!();
        let title = format!(
            "apiserver writes per SharedLB, operator phase (the bench's own {} creates left out)",
            cfg.n
        );
        print_calls(&title, requests, Some(n));
        let service_gets = requests.get(&Call::new("services", "", "GET"));
        println!("  services GET per SharedLB: {:.2}", service_gets / n);
        let reads: Vec<String> = (requests.reads_by_verb().iter())
            .map(|(verb, v)| format!("{verb} {v:.0} ({:.2}/SharedLB)", v / n))
            .collect();
        println!(
            "  reads by verb (every client; a WATCH is counted when it ends): {}",
            reads.join(", ")
        );
    }

    fn print_restart(&self) {
        print_calls("writes on restart", &self.restart.requests, None);
        let changed = &self.restart.changed;
        println!(
            "  SharedLBs the restart changed: {} (their load balancer's IP alone: {}; more than that: {})",
            changed.ip_only + changed.otherwise,
            changed.ip_only,
            changed.otherwise
        );
        if changed.ip_only > 0 {
            println!(
                "  (the memory cloud lives in the operator's process: a restarted operator finds it empty, makes the load\n   balancers again, and their addresses come in the order it makes them; a real cloud keeps them)"
            );
        }
    }

    fn print_targets(&self, n: f64) {
        println!("targets (printed, not asserted):");
        let target = |what: &str, value: f64, met: bool| {
            let verdict = if met { "met" } else { "missed" };
            println!("  {what:<52} {value:>8.2}  {verdict}");
        };
        let ratio = self.ratio();
        target("operator / floor <= 1.3", ratio, ratio <= 1.3);
        let per_slb = self.burst.requests.total_writes() / n;
        target(
            "writes per new SharedLB <= 4 (leases apart)",
            per_slb,
            per_slb <= 4.0,
        );
        let quiet = self.quiet.total_writes();
        target("writes while quiet = 0 (leases apart)", quiet, quiet == 0.0);
        let restart = self.restart.requests.total_writes();
        target(
            "writes on restart = 0 (leases apart)",
            restart,
            restart == 0.0,
        );
        let rss = self.peak_rss_mb;
        target("peak RSS <= 150 MB", rss, rss <= 150.0);
    }

    /// The last line, for scripts.
    fn print_summary(&self, cfg: &Config) {
        println!(
            "scale n={} c={} nodes={} floor_s={:.2} operator_s={:.2} ratio={:.2} writes_per_slb={:.2} quiet_writes={:.0} restart_s={:.2} restart_writes={:.0} rss_mb={:.1} delete_s={:.2} node_add_calls={:.2} node_remove_calls={:.2} node_add_lb_updates={:.2} node_remove_lb_updates={:.2}",
            cfg.n,
            cfg.concurrency,
            cfg.nodes,
            self.floor.secs,
            self.burst.secs,
            self.ratio(),
            self.burst.requests.total_writes() / cfg.n as f64,
            self.quiet.total_writes(),
            self.restart.secs,
            self.restart.requests.total_writes(),
            self.peak_rss_mb,
            self.delete_s,
            trait_calls(&self.churn.per_add),
            trait_calls(&self.churn.per_remove),
            api_call(&self.churn.per_add, "api:set_targets"),
            api_call(&self.churn.per_remove, "api:set_targets"),
        );
    }
}

/// One row per kind of write, most first: how many, and per SharedLB when `per_slb` (N) is given; failed ones
/// noted; leases on a line of their own.
pub fn print_calls(title: &str, requests: &Requests, per_slb: Option<f64>) {
    println!("{title}:");
    let line = |what: &str, verb: &str, v: f64, note: &str| match per_slb {
        Some(n) => println!("  {what:<28} {verb:<7} {v:>8.0} {:>10.2}{note}", v / n),
        None => println!("  {what:<28} {verb:<7} {v:>8.0}{note}"),
    };
    match per_slb {
        Some(_) => println!(
            "  {:<28} {:<7} {:>8} {:>10}",
            "", "verb", "calls", "/SharedLB"
        ),
        None => println!("  {:<28} {:<7} {:>8}", "", "verb", "calls"),
    }
    let mut rows: Vec<(&Call, f64)> = requests.writes().collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    for (call, v) in rows {
        let failed = requests.failed.get(call).copied().unwrap_or(0.0);
        let note = match failed > 0.0 {
            true => format!("  ({failed:.0} failed)"),
            false => String::new(),
        };
        line(&call.path(), &call.verb, v, &note);
    }
    line("total", "", requests.total_writes(), "");
    line("leases (apart)", "", requests.lease_writes(), "");
}

pub fn per_op(calls: &BTreeMap<String, f64>) -> String {
    if calls.is_empty() {
        return "none".into();
    }
    let ops: Vec<String> = calls.iter().map(|(op, v)| format!("{op} {v:.2}")).collect();
    ops.join(", ")
}

/// Cloud calls per node through the provider trait (`update_nodes`), without the provider's own API counts.
fn trait_calls(per_op: &BTreeMap<String, f64>) -> f64 {
    total(
        per_op
            .iter()
            .filter(|(op, _)| !op.starts_with("api:"))
            .map(|(_, v)| *v),
    )
}

/// One of the provider's own API counts per node, e.g. load balancers whose targets changed.
fn api_call(per_op: &BTreeMap<String, f64>, op: &str) -> f64 {
    per_op.get(op).copied().unwrap_or(0.0)
}
