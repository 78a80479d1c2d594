//! The plan as a table for people (`-o json` and `-o yaml` serialize the `Report` itself).

use super::{CompactionReport, Outcome, PoolFigures, Report};

/// Two tables: the SharedLBs, then the pools before -> after.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    if !r.shared_lbs.is_empty() {
        let mut rows = vec![row(&[
            "SHAREDLB",
            "POOL",
            "OUTCOME",
            "LOAD BALANCER",
            "PORTS",
            "WHY",
        ])];
        for s in &r.shared_lbs {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}:{}/{}", p.name, p.port, p.protocol))
                .collect();
            let why = match (&s.reason, &s.message) {
                (Some(r), Some(m)) => format!("{r}: {m}"),
                _ => String::new(),
            };
            rows.push(row(&[
                &format!("{}/{}", s.namespace, s.name),
                s.pool.as_deref().unwrap_or("-"),
                outcome(s.outcome),
                s.load_balancer.as_deref().unwrap_or("-"),
                &ports.join(","),
                &why,
            ]));
        }
        out.push_str(&columns(&rows));
        out.push('\n');
    }
    let mut rows = vec![row(&[
        "POOL",
        "PROVIDER",
        "LBS",
        "PORTS-USED",
        "PORTS-FREE",
        "HEADROOM",
        "COST/H",
        "NEW",
    ])];
    for p in &r.pools {
        let (b, a) = (&p.before, &p.after);
        let change = |f: &dyn Fn(&PoolFigures) -> String| match (f(b), f(a)) {
            (x, y) if x == y => x,
            (x, y) => format!("{x} -> {y}"),
        };
        rows.push(row(&[
            &p.name,
            &p.provider,
            &change(&|f| f.load_balancers.to_string()),
            &change(&|f| f.ports_used.to_string()),
            &change(&|f| f.ports_free.to_string()),
            &change(&|f| f.headroom.clone()),
            &change(&|f| f.hourly_cost.clone()),
            &match &p.problem {
                Some(why) => why.clone(),
                None => p.new_load_balancers.join(","),
            },
        ]));
    }
    out.push_str(&columns(&rows));
    out
}

/// The moves, then each pool now -> after and what to drain.
pub fn compaction(r: &CompactionReport) -> String {
    let mut out = String::new();
    let mut moves = vec![row(&["SHAREDLB", "FROM", "TO", "PORTS"])];
    for p in &r.pools {
        for m in &p.moves {
            let ports: Vec<String> = m
                .ports
                .iter()
                .map(|x| format!("{}:{}/{}", x.name, x.port, x.protocol))
                .collect();
            moves.push(row(&[&m.shared_lb, &m.from, &m.to, &ports.join(",")]));
        }
    }
    if moves.len() > 1 {
        out.push_str(&columns(&moves));
        out.push('\n');
    }
    let mut rows = vec![row(&[
        "POOL",
        "LBS",
        "LOWER-BOUND",
        "MOVES",
        "COST/H",
        "DRAIN",
    ])];
    for p in &r.pools {
        let last = match &p.problem {
            Some(why) => why.clone(),
            None => p.drain.join(","),
        };
        rows.push(row(&[
            &p.name,
            &format!("{} -> {}", p.load_balancers_now, p.load_balancers_after),
            &p.lower_bound.to_string(),
            &p.moves.len().to_string(),
            &format!("{} -> {}", p.hourly_cost_now, p.hourly_cost_after),
            &last,
        ]));
    }
    out.push_str(&columns(&rows));
    out
}

fn outcome(o: Outcome) -> &'static str {
    match o {
        Outcome::Place => "Place",
        Outcome::Update => "Update",
        Outcome::Unchanged => "Unchanged",
        Outcome::Move => "Move",
        Outcome::Refused => "Refused",
    }
}

fn row(cells: &[&str]) -> Vec<String> {
    cells.iter().map(|c| c.to_string()).collect()
}

/// Left-aligned columns, three spaces apart, as kubectl prints; the last column is not padded.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            line.push_str(c);
            if i + 1 < r.len() {
                line.push_str(&" ".repeat(widths[i] - c.chars().count() + 3));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
