//! The pure placement core of sharedlb.
//!
//! `PoolState::plan(changes)` returns, as plain values, where each changed SharedLB goes (load balancer and
//! ports), which requests are refused and why, and the cloud actions that follow. `PoolState::apply(plan)`
//! commits a plan once its allocations are durable. There is no I/O here and no kube, tokio or cloud type: the
//! operator's shell does the side effects, and these rules are tested with plain values and proptest.
//!
//! The rules this module keeps, whatever the input:
//! - a load balancer never holds more port/protocol pairs than its capacity, a group of load balancers
//!   (`LbGroups`) never more than its budget, the pool never more than its budget;
//! - a port of a load balancer belongs to one item (one item may use it for both TCP and UDP);
//! - an existing allocation never moves: updates keep the ports that still match and add new ones in place;
//! - planning the same changes again after `apply` is empty.
//!
//! Persistent maps (`imbl`) make cloning the state O(1), so `plan` can work on a scratch copy.

use std::collections::BTreeMap;

use imbl::{OrdMap, OrdSet};

mod subset;
pub use subset::{ZonedNode, node_group, node_subset};

/// The key of an item (a SharedLB): its UID in the operator.
pub type ItemKey = String;
/// A load balancer's index within its pool: `<pool>-<index>` is its name.
pub type LbIndex = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// `TCP` or `UDP`, as Kubernetes spells them.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One requested port: fixed (`port: Some`) or assigned from the pool's range.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortRequest {
    pub name: String,
    pub port: Option<u16>,
    pub protocol: Protocol,
}

/// One allocated port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllocatedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// Where an item lives: one load balancer, and its ports there, sorted by name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Allocation {
    pub lb: LbIndex,
    pub ports: Vec<AllocatedPort>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Fill the lowest-numbered load balancer that fits before opening another: fewest load balancers.
    #[default]
    Pack,
    /// Put each item on the least-used load balancer, opening new ones up to `max_lbs` first.
    Spread,
}

/// How external ports relate across the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PortMode {
    /// Each load balancer has its own port space (AWS, Azure, local, memory).
    #[default]
    PerLoadBalancer,
    /// The external port is also the node port (GCP passthrough), so a port is unique across the whole pool and
    /// auto-assigned ports come from the NodePort range given as `port_range`.
    PoolWide,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Port/protocol pairs per load balancer: the minimum over every hard limit the provider knows.
    pub max_ports_per_lb: u32,
    /// Load balancers the pool may have, counting ones being deleted.
    pub max_lbs: Option<u32>,
    /// Port/protocol pairs the whole pool may hold, whatever the load balancers: a budget shared by all of
    /// them, such as the rules of the one firewall (security group) every port opens a rule in.
    pub max_ports_total: Option<u32>,
    /// Inclusive range for auto-assigned ports.
    pub port_range: (u16, u16),
    pub strategy: Strategy,
    pub port_mode: PortMode,
    /// Load balancers that share a budget by group; `None`: each has only its own `max_ports_per_lb`.
    pub lb_groups: Option<LbGroups>,
    /// Load balancers that take nothing new (drained by an operator): no new item goes there, no item there grows,
    /// and an index not made yet is never made. What is on them stays until it leaves.
    pub draining: std::collections::BTreeSet<LbIndex>,
    /// Empty load balancers kept made ahead of need (warm spares): a plan deletes an emptied one only beyond
    /// these, and `spares_wanted` names the ones to make. A new item that fits nowhere else lands on one at once
    /// instead of waiting for a load balancer to be made.
    pub warm: u32,
}

/// Load balancer `i` is in group `i % count`, and the load balancers of one group hold at most `max_ports`
/// together: a budget of something the group's load balancers share (on Azure, a group's frontends send to the
/// same nodes, and every rule that reaches a node counts against that node's NIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbGroups {
    pub count: u32,
    pub max_ports: u32,
}

/// A change to plan for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Create or update an item with these ports.
    Upsert {
        key: ItemKey,
        ports: Vec<PortRequest>,
    },
    /// The item is gone: free its ports.
    Remove { key: ItemKey },
}

/// A side effect for the shell, in the order to carry it out.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Action {
    CreateLoadBalancer {
        lb: LbIndex,
    },
    RemoveListener {
        lb: LbIndex,
        port: u16,
        protocol: Protocol,
        owner: ItemKey,
    },
    AddListener {
        lb: LbIndex,
        port: u16,
        protocol: Protocol,
        owner: ItemKey,
    },
    DeleteLoadBalancer {
        lb: LbIndex,
    },
}

/// Why an item could not be placed (or its update could not be made) without breaking a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// More ports than one load balancer may hold.
    TooManyPorts { requested: u32, capacity: u32 },
    /// A fixed port is taken everywhere it could go, and the pool cannot open another load balancer.
    PortInUse { port: u16, protocol: Protocol },
    /// No load balancer has room and the pool is at `max_lbs`.
    PoolFull { max_lbs: u32 },
    /// The pool-wide budget (`max_ports_total`) has no room for the ports asked.
    PoolPortBudget { needed: u32, free: u32, budget: u32 },
    /// The pool's range has no free port left where the item could go.
    PortRangeExhausted { range: (u16, u16) },
    /// An update needs more room on the item's load balancer than it has; the item keeps its old allocation
    /// because placements never move.
    NoRoomToGrow { lb: LbIndex, needed: u32, free: u32 },
    /// An update asks for a fixed port that is taken on the item's load balancer.
    PortTakenOnLoadBalancer { lb: LbIndex, port: u16 },
    /// An update needs more ports on the item's load balancer, which is draining.
    LoadBalancerDraining { lb: LbIndex, needed: u32 },
}

impl Refusal {
    /// A CamelCase reason for conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooManyPorts { .. } => "TooManyPorts",
            Refusal::PortInUse { .. } | Refusal::PortTakenOnLoadBalancer { .. } => "PortInUse",
            Refusal::PoolFull { .. } => "PoolFull",
            Refusal::PoolPortBudget { .. } => "PoolPortBudgetExhausted",
            Refusal::PortRangeExhausted { .. } => "PortRangeExhausted",
            Refusal::NoRoomToGrow { .. } => "NoRoomToGrow",
            Refusal::LoadBalancerDraining { .. } => "LoadBalancerDraining",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::TooManyPorts {
                requested,
                capacity,
            } => write!(
                f,
                "{requested} ports requested but a load balancer of this pool holds at most {capacity}"
            ),
            Refusal::PortInUse { port, protocol } => write!(
                f,
                "port {port}/{} is taken on every load balancer that has room, and the pool may not open another",
                protocol.as_str()
            ),
            Refusal::PoolFull { max_lbs } => write!(
                f,
                "every load balancer of the pool is full and the pool is at its maximum of {max_lbs}"
            ),
            Refusal::PoolPortBudget {
                needed,
                free,
                budget,
            } => write!(
                f,
                "{needed} ports asked but the pool's budget of {budget} ports across all its load balancers (a limit of the cloud, such as firewall rules) has {free} left"
            ),
            Refusal::PortRangeExhausted { range } => {
                write!(
                    f,
                    "no free port left in the pool's range {}-{}",
                    range.0, range.1
                )
            }
            Refusal::NoRoomToGrow { lb, needed, free } => write!(
                f,
                "the update needs {needed} more ports on load balancer {lb}, which has {free} free; placements never move, so the old ports stay"
            ),
            Refusal::PortTakenOnLoadBalancer { lb, port } => write!(
                f,
                "port {port} is taken on load balancer {lb}, where this SharedLB lives; placements never move, so the old ports stay"
            ),
            Refusal::LoadBalancerDraining { lb, needed } => write!(
                f,
                "the update needs {needed} more ports on load balancer {lb}, which the pool drains (it takes nothing new); the old ports stay"
            ),
        }
    }
}

/// What a plan decides. `placed` and `released` are the allocations to make durable before `apply`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub placed: Vec<(ItemKey, Allocation)>,
    pub released: Vec<ItemKey>,
    pub refused: Vec<(ItemKey, Refusal)>,
    pub actions: Vec<Action>,
}

impl Plan {
    /// Nothing to write and nothing to do.
    pub fn is_empty(&self) -> bool {
        self.placed.is_empty() && self.released.is_empty() && self.actions.is_empty()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct LbState {
    /// port -> the item owning it (for every protocol it uses on that port)
    owners: OrdMap<u16, ItemKey>,
    /// port/protocol pairs in use
    used: u32,
    deleting: bool,
}

/// One load balancer as the shell sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbSummary {
    pub lb: LbIndex,
    pub ports_used: u32,
    pub capacity: u32,
    pub deleting: bool,
    pub draining: bool,
}

/// One-port items with an auto-assigned port that still fit (`PoolState::headroom`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Headroom {
    /// On the load balancers made now.
    pub on_existing: u64,
    /// In all, counting the load balancers the pool may still make; `None`: no limit (the pool may make load
    /// balancers without bound and nothing pool-wide caps it).
    pub total: Option<u64>,
}

/// What `PoolState::compaction` finds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compaction {
    /// Load balancers holding something, now and after the moves.
    pub before: u32,
    pub after: u32,
    /// In the order to make them.
    pub moves: Vec<Move>,
    /// The load balancers the moves empty (drain these, then move their items).
    pub emptied: Vec<LbIndex>,
}

/// One item to another load balancer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    pub key: ItemKey,
    pub from: Allocation,
    pub to: Allocation,
}

/// An allocation could not be restored because it contradicts one restored before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreConflict {
    pub lb: LbIndex,
    pub port: u16,
    pub held_by: ItemKey,
}

/// The owner recorded for ports blocked by `block_port` (no item key can be empty).
const BLOCKED: &str = "";

/// The occupancy of one pool: its load balancers and every item's allocation.
#[derive(Clone, Debug)]
pub struct PoolState {
    config: PoolConfig,
    lbs: OrdMap<LbIndex, LbState>,
    /// Load balancers that are not being deleted and have room, by index (Pack) and by load (Spread).
    open: OrdSet<LbIndex>,
    by_load: OrdSet<(u32, LbIndex)>,
    allocations: OrdMap<ItemKey, Allocation>,
    /// PortMode::PoolWide only: port -> owner across the pool.
    pool_ports: OrdMap<u16, ItemKey>,
    /// Port/protocol pairs held across the pool.
    total_used: u32,
}

impl PoolState {
    pub fn new(config: PoolConfig) -> Self {
        PoolState {
            config,
            lbs: OrdMap::new(),
            open: OrdSet::new(),
            by_load: OrdSet::new(),
            allocations: OrdMap::new(),
            pool_ports: OrdMap::new(),
            total_used: 0,
        }
    }

    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Changes limits (a pool edit, or a provider whose limits shrink as the cluster grows). Nothing moves: a
    /// load balancer over its new capacity just takes no more.
    pub fn set_config(&mut self, config: PoolConfig) {
        self.config = config;
        let idx: Vec<LbIndex> = self.lbs.keys().copied().collect();
        for i in idx {
            self.reindex(i, |_| {});
        }
    }

    pub fn allocation(&self, key: &str) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    pub fn allocations(&self) -> impl Iterator<Item = (&ItemKey, &Allocation)> {
        self.allocations.iter()
    }

    pub fn load_balancers(&self) -> Vec<LbSummary> {
        self.lbs
            .iter()
            .map(|(i, s)| LbSummary {
                lb: *i,
                ports_used: s.used,
                capacity: self.config.max_ports_per_lb,
                deleting: s.deleting,
                draining: self.config.draining.contains(i),
            })
            .collect()
    }

    /// Load balancers marked for deletion (empty), which the shell deletes and then `forget`s.
    pub fn deleting(&self) -> Vec<LbIndex> {
        self.lbs
            .iter()
            .filter(|(_, s)| s.deleting)
            .map(|(i, _)| *i)
            .collect()
    }

    /// The load balancers to make now so that `warm` empty ones take new items: the lowest indices not in use,
    /// not drained, whose group has room, within `max_lbs`. The shell records each (`restore_load_balancer`)
    /// before making it in the cloud, so placement may use it at once.
    pub fn spares_wanted(&self) -> Vec<LbIndex> {
        let ready = self
            .lbs
            .iter()
            .filter(|(i, s)| s.used == 0 && !s.deleting && !self.config.draining.contains(i))
            .count() as u32;
        let room = self
            .config
            .max_lbs
            .map_or(u32::MAX, |m| m.saturating_sub(self.lbs.len() as u32));
        let want = self.config.warm.saturating_sub(ready).min(room) as usize;
        let free = |i: &LbIndex| {
            !self.lbs.contains_key(i)
                && !self.config.draining.contains(i)
                && self.group_room(*i) > 0
        };
        // past the highest index in use or drained, `count` consecutive indices cover every group
        let highest = self.lbs.keys().max().max(self.config.draining.last());
        let groups = self.config.lb_groups.map_or(1, |g| g.count.max(1));
        let span = highest.map_or(0, |i| i + 1) + groups * self.config.warm.max(1);
        (0..span).filter(free).take(want).collect()
    }

    /// Records a load balancer found in the cloud inventory at rebuild.
    pub fn restore_load_balancer(&mut self, lb: LbIndex) {
        if !self.lbs.contains_key(&lb) {
            self.add_lb(lb);
        }
    }

    /// Records an allocation read from a durable status at rebuild. A contradiction (two items on one port) is
    /// refused, never silently merged: the shell reports it.
    pub fn restore(&mut self, key: ItemKey, alloc: Allocation) -> Result<(), RestoreConflict> {
        if self.allocations.contains_key(&key) {
            self.release(&key);
        }
        self.restore_load_balancer(alloc.lb);
        let lb = self.lbs.get(&alloc.lb).cloned().unwrap_or_default();
        for p in &alloc.ports {
            let holder = match self.config.port_mode {
                PortMode::PerLoadBalancer => lb.owners.get(&p.port),
                PortMode::PoolWide => self.pool_ports.get(&p.port),
            };
            if let Some(h) = holder.filter(|h| **h != key) {
                return Err(RestoreConflict {
                    lb: alloc.lb,
                    port: p.port,
                    held_by: h.clone(),
                });
            }
        }
        if lb.deleting {
            self.reindex(alloc.lb, |s| s.deleting = false);
        }
        self.occupy(key, alloc);
        Ok(())
    }

    /// Whether an allocation read from a status fits the pool's capacity beside what is restored so far: its load
    /// balancer stays within `max_ports_per_lb`, a load balancer not known yet stays within `max_lbs`, and the
    /// pool-wide budget holds. A status is a claim anyone with status access can write; this is how the shell
    /// refuses one that asks for more than the pool would ever have given.
    pub fn fits(&self, alloc: &Allocation) -> bool {
        let n = alloc.ports.len() as u32;
        let used = self.lbs.get(&alloc.lb).map_or(0, |l| l.used);
        let lb_room = used + n <= self.config.max_ports_per_lb;
        let lb_count = self.lbs.contains_key(&alloc.lb)
            || self
                .config
                .max_lbs
                .is_none_or(|m| (self.lbs.len() as u32) < m);
        let budget = self
            .config
            .max_ports_total
            .is_none_or(|m| self.total_used + n <= m);
        lb_room && lb_count && budget && self.group_room(alloc.lb) >= n
    }

    /// Ports load balancer `lb`'s group (`PoolConfig::lb_groups`) can still take; unbounded without groups.
    fn group_room(&self, lb: LbIndex) -> u32 {
        let Some(g) = self.config.lb_groups else {
            return u32::MAX;
        };
        let count = g.count.max(1);
        let used: u32 = self
            .lbs
            .iter()
            .filter(|(i, _)| **i % count == lb % count)
            .map(|(_, s)| s.used)
            .sum();
        g.max_ports.saturating_sub(used)
    }

    /// How many more one-port items with an auto-assigned port the pool takes: on the load balancers it has, and
    /// in all. Counted under every rule `plan` applies (capacity, the range, draining, group budgets, the pool-wide
    /// budget and `max_lbs`), so placing one such item at a time succeeds exactly `total` times. With `Spread` and
    /// budget groups it is an upper bound: spreading may open load balancers in a group that is nearly spent.
    pub fn headroom(&self) -> Headroom {
        let (lo, hi) = self.config.port_range;
        let range_len = u64::from(hi.saturating_sub(lo)) + 1;
        let cap = u64::from(self.config.max_ports_per_lb);
        let mut group_left: BTreeMap<u32, u64> = BTreeMap::new();
        let mut take = |lb: LbIndex, room: u64| -> u64 {
            let Some(g) = self.config.lb_groups else {
                return room;
            };
            let left = group_left
                .entry(lb % g.count.max(1))
                .or_insert_with(|| u64::from(self.group_room(lb)));
            let t = room.min(*left);
            *left -= t;
            t
        };
        let mut on_existing = 0;
        for lb in &self.open {
            let Some(s) = self.lbs.get(lb) else { continue };
            let in_range = s.owners.range(lo..=hi).count() as u64;
            let room = cap
                .saturating_sub(u64::from(s.used))
                .min(range_len.saturating_sub(in_range));
            on_existing += take(*lb, room);
        }
        // new load balancers get the lowest indices not in use and not drained whose group has room
        let makeable = self
            .config
            .max_lbs
            .map(|m| u64::from(m).saturating_sub(self.lbs.len() as u64));
        let more = match (makeable, self.config.lb_groups) {
            (None, None) => None,
            (Some(n), None) => Some(n * cap.min(range_len)),
            // each load balancer made takes at least one port of its group's budget, and a spent group stays
            // spent: the walk ends once every group is
            (makeable, Some(g)) => {
                let count = g.count.max(1);
                let (mut made, mut more, mut index) = (0u64, 0u64, 0 as LbIndex);
                let mut spent = std::collections::BTreeSet::new();
                while makeable.is_none_or(|m| made < m) && (spent.len() as u32) < count {
                    if !self.lbs.contains_key(&index) && !self.config.draining.contains(&index) {
                        match take(index, cap.min(range_len)) {
                            0 => {
                                spent.insert(index % count);
                            }
                            t => (made, more) = (made + 1, more + t),
                        }
                    }
                    index = index.saturating_add(1);
                }
                Some(more)
            }
        };
        let mut limits = vec![
            self.config
                .max_ports_total
                .map(|b| u64::from(b.saturating_sub(self.total_used))),
        ];
        if self.config.port_mode == PortMode::PoolWide {
            limits.push(Some(
                range_len.saturating_sub(self.pool_ports.range(lo..=hi).count() as u64),
            ));
        }
        let bound = limits.into_iter().flatten().min();
        let total = match (more, bound) {
            (Some(m), b) => Some((on_existing + m).min(b.unwrap_or(u64::MAX))),
            (None, b) => b,
        };
        Headroom {
            on_existing: on_existing.min(bound.unwrap_or(u64::MAX)),
            total,
        }
    }

    /// Moves that would empty load balancers: the emptiest first, each emptied only when every item on it fits
    /// on the load balancers that stay (none made, none draining, none emptied before it), honouring its fixed
    /// ports; auto-assigned ports may change, as its address does. `requests` are the items' port requests; an
    /// item without one (a held stray) is never moved, so its load balancer stays. Pure: nothing here changes.
    pub fn compaction(&self, requests: &BTreeMap<ItemKey, Vec<PortRequest>>) -> Compaction {
        let base = self.config.clone();
        let mut now = self.clone();
        let mut moves = Vec::new();
        let mut emptied = Vec::new();
        let mut candidates: Vec<(u32, LbIndex)> = self
            .lbs
            .iter()
            .filter(|(_, s)| !s.deleting && s.used > 0)
            .map(|(i, s)| (s.used, *i))
            .collect();
        // the emptiest first; of two as empty, the higher index (Pack fills low indices first)
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        for (_, lb) in candidates {
            let mut trial = now.clone();
            // targets are the load balancers that hold something and stay: moving onto an empty one (a spare)
            // empties nothing
            let mut config = trial.config.clone();
            config.draining.insert(lb);
            config.draining.extend(
                trial
                    .lbs
                    .iter()
                    .filter(|(_, s)| s.used == 0)
                    .map(|(i, _)| *i),
            );
            config.max_lbs = Some(trial.lbs.len() as u32);
            trial.set_config(config);
            let mut on_lb: Vec<(ItemKey, Allocation)> = trial
                .allocations
                .iter()
                .filter(|(_, a)| a.lb == lb)
                .map(|(k, a)| (k.clone(), a.clone()))
                .collect();
            on_lb.sort_by(|a, b| b.1.ports.len().cmp(&a.1.ports.len()).then(a.0.cmp(&b.0)));
            let mut moved = Vec::new();
            let mut all_fit = true;
            for (key, from) in on_lb {
                let Some(ports) = requests.get(&key) else {
                    all_fit = false;
                    break;
                };
                trial.release(&key);
                match trial.plan_new(ports) {
                    Ok((to, false)) => {
                        trial.occupy(key.clone(), to.clone());
                        moved.push(Move { key, from, to });
                    }
                    _ => {
                        all_fit = false;
                        break;
                    }
                }
            }
            if all_fit {
                let mut config = base.clone();
                config.draining.extend(emptied.iter().copied().chain([lb]));
                trial.set_config(config);
                now = trial;
                // kept in the order found, even when an item moves twice (onto a load balancer emptied later):
                // where ports are unique across the pool, a port one move frees is what a later one takes, so
                // only this order is sure to apply without a clash
                moves.extend(moved);
                emptied.push(lb);
            }
        }
        let in_use =
            |s: &PoolState| s.lbs.values().filter(|l| !l.deleting && l.used > 0).count() as u32;
        Compaction {
            before: in_use(self),
            after: in_use(&now),
            moves,
            emptied,
        }
    }

    /// `PortMode::PoolWide`: a port something outside the pool holds (on GCP, another Service's node port), so
    /// it is never handed out. Ports already held by an item are left to it. Forgotten at rebuild: if the port is
    /// still taken the shell finds out again.
    pub fn block_port(&mut self, port: u16) {
        if self.config.port_mode == PortMode::PoolWide && !self.pool_ports.contains_key(&port) {
            self.pool_ports.insert(port, BLOCKED.to_string());
        }
    }

    /// Drops a load balancer the shell has deleted from the cloud. Only an empty one marked deleting goes.
    pub fn forget_load_balancer(&mut self, lb: LbIndex) -> bool {
        match self.lbs.get(&lb) {
            Some(s) if s.deleting && s.used == 0 => {
                self.lbs.remove(&lb);
                self.open.remove(&lb);
                true
            }
            _ => false,
        }
    }

    /// Plans the changes against this state, which is left as it is.
    pub fn plan(&self, changes: &[Change]) -> Plan {
        let mut scratch = self.clone();
        let mut plan = Plan::default();

        // Removals first (they free room), then updates of placed items, then new items biggest first:
        // first-fit decreasing keeps the load-balancer count at or near the lower bound.
        let mut removes = Vec::new();
        let mut updates = Vec::new();
        let mut creates = Vec::new();
        for c in changes {
            match c {
                Change::Remove { key } => removes.push(key),
                Change::Upsert { key, ports } if scratch.allocations.contains_key(key) => {
                    updates.push((key, ports))
                }
                Change::Upsert { key, ports } => creates.push((key, ports)),
            }
        }
        creates.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(b.0)));

        for key in removes {
            if let Some(old) = scratch.release(key) {
                plan.actions.extend(listeners(&old, key, false));
                plan.released.push(key.clone());
            }
        }
        // An update refused because another update of this batch still holds its port is tried again after
        // the others: the outcome does not depend on the order the changes came in.
        let mut pending = updates;
        loop {
            let mut refused = Vec::new();
            let before = pending.len();
            for (key, ports) in pending {
                match scratch.plan_update(key, ports) {
                    Ok(None) => {}
                    Ok(Some((old, new))) => {
                        diff_listeners(key, &old, &new, &mut plan.actions);
                        plan.placed.push((key.clone(), new));
                    }
                    Err(r) => refused.push((key, ports, r)),
                }
            }
            if refused.len() == before || refused.is_empty() {
                plan.refused
                    .extend(refused.into_iter().map(|(k, _, r)| (k.clone(), r)));
                break;
            }
            pending = refused.into_iter().map(|(k, p, _)| (k, p)).collect();
        }
        for (key, ports) in creates {
            match scratch.plan_new(ports) {
                Ok((alloc, created)) => {
                    if created {
                        plan.actions
                            .push(Action::CreateLoadBalancer { lb: alloc.lb });
                        scratch.add_lb(alloc.lb);
                    }
                    plan.actions.extend(listeners(&alloc, key, true));
                    scratch.occupy(key.clone(), alloc.clone());
                    plan.placed.push((key.clone(), alloc));
                }
                Err(r) => plan.refused.push((key.clone(), r)),
            }
        }
        // Empty load balancers go: ones this plan emptied, and ones found empty (e.g. from the inventory), but
        // for the lowest-numbered `warm` of those that take new items, kept as spares.
        let mut spares = scratch.config.warm;
        for (i, s) in scratch.lbs.iter() {
            if s.used == 0 && !s.deleting {
                if spares > 0 && !scratch.config.draining.contains(i) {
                    spares -= 1;
                    continue;
                }
                plan.actions.push(Action::DeleteLoadBalancer { lb: *i });
            }
        }
        plan.actions.sort();
        plan
    }

    /// A move, make-before-break: the item goes to another load balancer (never its own, never a draining one)
    /// with `ports`, while its old allocation stays held under `held` until the shell releases it (the old
    /// listeners serve meanwhile, so the old ports stay taken). The shell asks for the port numbers the item
    /// has, so only its address changes. Refused when no load balancer may take it; None when it holds nothing.
    pub fn plan_move(
        &self,
        key: &str,
        held: &str,
        ports: &[PortRequest],
    ) -> Option<Result<Plan, Refusal>> {
        let old = self.allocations.get(key)?.clone();
        let mut scratch = self.clone();
        scratch.release(key);
        scratch.occupy(held.to_string(), old.clone());
        let mut config = scratch.config.clone();
        config.draining.insert(old.lb);
        scratch.set_config(config);
        let (new, created) = match scratch.plan_new(ports) {
            Ok(found) => found,
            Err(r) => return Some(Err(r)),
        };
        let mut plan = Plan::default();
        if created {
            plan.actions.push(Action::CreateLoadBalancer { lb: new.lb });
        }
        plan.actions.extend(listeners(&new, key, true));
        // in this order: `apply` frees the old place of `key`, then holds it again under `held`
        plan.placed = vec![(key.to_string(), new), (held.to_string(), old)];
        Some(Ok(plan))
    }

    /// Commits a plan made by `plan` on this same state.
    pub fn apply(&mut self, plan: &Plan) {
        for a in &plan.actions {
            if let Action::CreateLoadBalancer { lb } = a {
                self.restore_load_balancer(*lb);
            }
        }
        for key in &plan.released {
            self.release(key);
        }
        for (key, alloc) in &plan.placed {
            self.release(key);
            self.occupy(key.clone(), alloc.clone());
        }
        for a in &plan.actions {
            if let Action::DeleteLoadBalancer { lb } = a
                && self.lbs.get(lb).is_some_and(|s| s.used == 0)
            {
                self.reindex(*lb, |s| s.deleting = true);
            }
        }
    }

    // --- primitives: every change of occupancy goes through these, so the indexes stay true ---

    fn add_lb(&mut self, lb: LbIndex) {
        self.lbs.insert(lb, LbState::default());
        self.reindex(lb, |_| {});
    }

    /// Applies `f` to a load balancer and keeps `open` and `by_load` in step.
    fn reindex(&mut self, lb: LbIndex, f: impl FnOnce(&mut LbState)) {
        let Some(mut s) = self.lbs.get(&lb).cloned() else {
            return;
        };
        self.by_load.remove(&(s.used, lb));
        self.open.remove(&lb);
        f(&mut s);
        let takes_new = !s.deleting && !self.config.draining.contains(&lb);
        if takes_new && s.used < self.config.max_ports_per_lb {
            self.open.insert(lb);
            self.by_load.insert((s.used, lb));
        }
        self.lbs.insert(lb, s);
    }

    fn occupy(&mut self, key: ItemKey, alloc: Allocation) {
        let lb = alloc.lb;
        let n = alloc.ports.len() as u32;
        let ports: Vec<u16> = alloc.ports.iter().map(|p| p.port).collect();
        self.reindex(lb, |s| {
            for p in &ports {
                s.owners.insert(*p, key.clone());
            }
            s.used += n;
        });
        self.total_used += n;
        if self.config.port_mode == PortMode::PoolWide {
            for p in &ports {
                self.pool_ports.insert(*p, key.clone());
            }
        }
        self.allocations.insert(key, alloc);
    }

    fn release(&mut self, key: &str) -> Option<Allocation> {
        let alloc = self.allocations.remove(key)?;
        let n = alloc.ports.len() as u32;
        self.reindex(alloc.lb, |s| {
            for p in &alloc.ports {
                if s.owners.get(&p.port).is_some_and(|o| o == key) {
                    s.owners.remove(&p.port);
                }
            }
            s.used = s.used.saturating_sub(n);
        });
        self.total_used = self.total_used.saturating_sub(n);
        if self.config.port_mode == PortMode::PoolWide {
            for p in &alloc.ports {
                if self.pool_ports.get(&p.port).is_some_and(|o| o == key) {
                    self.pool_ports.remove(&p.port);
                }
            }
        }
        Some(alloc)
    }

    fn port_free(&self, s: &LbState, port: u16, key: Option<&str>) -> bool {
        let mine = |o: &ItemKey| key.is_some_and(|k| k == o);
        let on_lb = s.owners.get(&port).is_none_or(mine);
        match self.config.port_mode {
            PortMode::PerLoadBalancer => on_lb,
            PortMode::PoolWide => on_lb && self.pool_ports.get(&port).is_none_or(mine),
        }
    }

    /// Ports for `requests` on one load balancer, or why not. `keep` are ports already held (updates);
    /// `avoid` are ports the item is giving up, never handed straight back out.
    fn fit(
        &self,
        lb: LbIndex,
        s: &LbState,
        requests: &[&PortRequest],
        key: Option<&str>,
        avoid: &[u16],
    ) -> Result<Vec<AllocatedPort>, Refusal> {
        let mut out = Vec::with_capacity(requests.len());
        let mut taken: Vec<u16> = Vec::new();
        for r in requests.iter().filter(|r| r.port.is_some()) {
            let port = r.port.unwrap_or_default();
            if !self.port_free(s, port, key) {
                return Err(match key {
                    Some(_) => Refusal::PortTakenOnLoadBalancer { lb, port },
                    None => Refusal::PortInUse {
                        port,
                        protocol: r.protocol,
                    },
                });
            }
            taken.push(port);
            out.push(AllocatedPort {
                name: r.name.clone(),
                port,
                protocol: r.protocol,
            });
        }
        let (lo, hi) = self.config.port_range;
        let mut next = lo;
        for r in requests.iter().filter(|r| r.port.is_none()) {
            let port = loop {
                if next > hi || next < lo {
                    return Err(Refusal::PortRangeExhausted { range: (lo, hi) });
                }
                let p = next;
                next = next.checked_add(1).unwrap_or(0);
                if self.port_free(s, p, None) && !taken.contains(&p) && !avoid.contains(&p) {
                    break p;
                }
            };
            taken.push(port);
            out.push(AllocatedPort {
                name: r.name.clone(),
                port,
                protocol: r.protocol,
            });
        }
        Ok(out)
    }

    /// Room for `more` ports under the pool-wide budget, or why not.
    fn budget_allows(&self, more: u32) -> Result<(), Refusal> {
        match self.config.max_ports_total {
            Some(budget) if self.total_used + more > budget => Err(Refusal::PoolPortBudget {
                needed: more,
                free: budget.saturating_sub(self.total_used),
                budget,
            }),
            _ => Ok(()),
        }
    }

    /// A new item: where it goes, and whether that needs a new load balancer.
    fn plan_new(&self, ports: &[PortRequest]) -> Result<(Allocation, bool), Refusal> {
        let need = ports.len() as u32;
        let cap = self.config.max_ports_per_lb;
        if need > cap {
            return Err(Refusal::TooManyPorts {
                requested: need,
                capacity: cap,
            });
        }
        self.budget_allows(need)?;
        let reqs: Vec<&PortRequest> = ports.iter().collect();
        let mut first_refusal: Option<Refusal> = None;
        let mut try_lb = |lb: LbIndex| -> Option<Vec<AllocatedPort>> {
            let s = self.lbs.get(&lb)?;
            if s.deleting || s.used + need > cap || self.group_room(lb) < need {
                return None;
            }
            match self.fit(lb, s, &reqs, None, &[]) {
                Ok(p) => Some(p),
                Err(r) => {
                    first_refusal.get_or_insert(r);
                    None
                }
            }
        };
        let can_grow = self
            .config
            .max_lbs
            .is_none_or(|m| (self.lbs.len() as u32) < m);
        let found = match self.config.strategy {
            Strategy::Pack => self
                .open
                .iter()
                .find_map(|lb| try_lb(*lb).map(|p| (*lb, p))),
            Strategy::Spread => {
                // Spread opens a new load balancer while the pool may still grow to a set maximum.
                let grow_first = self.config.max_lbs.is_some() && can_grow;
                let least = self
                    .by_load
                    .iter()
                    .find_map(|(_, lb)| try_lb(*lb).map(|p| (*lb, p)));
                least
                    .filter(|(lb, _)| !(grow_first && self.lbs.get(lb).is_some_and(|s| s.used > 0)))
            }
        };
        if let Some((lb, p)) = found {
            return Ok((
                Allocation {
                    lb,
                    ports: sorted(p),
                },
                false,
            ));
        }
        if !can_grow {
            return Err(first_refusal
                .filter(|r| {
                    matches!(
                        r,
                        Refusal::PortInUse { .. } | Refusal::PortRangeExhausted { .. }
                    )
                })
                .unwrap_or(Refusal::PoolFull {
                    max_lbs: self.config.max_lbs.unwrap_or(0),
                }));
        }
        // the lowest free index, not drained, whose group has room: past the highest index in use or drained,
        // `count` consecutive free ones cover every group
        let highest = self.lbs.keys().max().max(self.config.draining.last());
        let span =
            highest.map_or(0, |i| i + 1) + self.config.lb_groups.map_or(1, |g| g.count.max(1));
        let free = |i: &LbIndex| !self.lbs.contains_key(i) && !self.config.draining.contains(i);
        let Some(lb) = (0..span).find(|i| free(i) && self.group_room(*i) >= need) else {
            let free = (0..span).map(|i| self.group_room(i)).max().unwrap_or(0);
            return Err(Refusal::PoolPortBudget {
                needed: need,
                free,
                budget: self.config.lb_groups.map_or(0, |g| g.max_ports),
            });
        };
        let empty = LbState::default();
        let p = self.fit(lb, &empty, &reqs, None, &[])?;
        Ok((
            Allocation {
                lb,
                ports: sorted(p),
            },
            true,
        ))
    }

    /// An update of a placed item, in place. `Ok(None)`: nothing changes.
    fn plan_update(
        &mut self,
        key: &ItemKey,
        ports: &[PortRequest],
    ) -> Result<Option<(Allocation, Allocation)>, Refusal> {
        let Some(old) = self.allocations.get(key).cloned() else {
            return Ok(None);
        };
        let mut kept = Vec::new();
        let mut wanted = Vec::new();
        for r in ports {
            let hit = old.ports.iter().find(|a| {
                a.name == r.name && a.protocol == r.protocol && r.port.is_none_or(|p| p == a.port)
            });
            match hit {
                Some(a) => kept.push(a.clone()),
                None => wanted.push(r),
            }
        }
        if wanted.is_empty() && kept.len() == old.ports.len() {
            return Ok(None);
        }
        let s = self.lbs.get(&old.lb).cloned().unwrap_or_default();
        let cap = self.config.max_ports_per_lb;
        let after = s.used - old.ports.len() as u32 + kept.len() as u32 + wanted.len() as u32;
        if after > cap && wanted.len() as u32 > 0 {
            let free = cap.saturating_sub(s.used);
            return Err(Refusal::NoRoomToGrow {
                lb: old.lb,
                needed: wanted.len() as u32,
                free,
            });
        }
        let grows = (kept.len() + wanted.len()).saturating_sub(old.ports.len()) as u32;
        if grows > 0 && self.config.draining.contains(&old.lb) {
            return Err(Refusal::LoadBalancerDraining {
                lb: old.lb,
                needed: grows,
            });
        }
        if grows > 0 {
            self.budget_allows(grows)?;
            let free = self.group_room(old.lb);
            if free < grows {
                return Err(Refusal::NoRoomToGrow {
                    lb: old.lb,
                    needed: grows,
                    free,
                });
            }
        }
        // Ports the item keeps count as taken; ports it gives up are not handed straight back to it.
        let kept_ports: Vec<u16> = kept.iter().map(|p| p.port).collect();
        let given_up: Vec<u16> = old
            .ports
            .iter()
            .map(|p| p.port)
            .filter(|p| !kept_ports.contains(p))
            .collect();
        let mut view = s.clone();
        for p in &given_up {
            view.owners.remove(p);
        }
        let mut avoid = given_up.clone();
        avoid.extend(&kept_ports);
        let added = self.fit(old.lb, &view, &wanted, Some(key), &avoid)?;
        // a fixed port this item already holds under another name may be taken over; it must not clash with kept
        for a in &added {
            if kept
                .iter()
                .any(|k| k.port == a.port && k.protocol == a.protocol)
            {
                return Err(Refusal::PortTakenOnLoadBalancer {
                    lb: old.lb,
                    port: a.port,
                });
            }
        }
        let mut all = kept;
        all.extend(added);
        let new = Allocation {
            lb: old.lb,
            ports: sorted(all),
        };
        self.release(key);
        self.occupy(key.clone(), new.clone());
        Ok(Some((old, new)))
    }
}

/// An `AddListener` (`add`) or `RemoveListener` per port of an allocation, owned by `key`.
fn listeners<'a>(a: &'a Allocation, key: &'a str, add: bool) -> impl Iterator<Item = Action> + 'a {
    a.ports.iter().map(move |p| {
        let (lb, port, protocol, owner) = (a.lb, p.port, p.protocol, key.to_string());
        match add {
            true => Action::AddListener {
                lb,
                port,
                protocol,
                owner,
            },
            false => Action::RemoveListener {
                lb,
                port,
                protocol,
                owner,
            },
        }
    })
}

fn sorted(mut p: Vec<AllocatedPort>) -> Vec<AllocatedPort> {
    p.sort();
    p
}

fn diff_listeners(key: &ItemKey, old: &Allocation, new: &Allocation, out: &mut Vec<Action>) {
    let pair = |p: &AllocatedPort| (p.port, p.protocol);
    for p in &old.ports {
        if !new.ports.iter().any(|n| pair(n) == pair(p)) {
            out.push(Action::RemoveListener {
                lb: old.lb,
                port: p.port,
                protocol: p.protocol,
                owner: key.clone(),
            });
        }
    }
    for p in &new.ports {
        if !old.ports.iter().any(|o| pair(o) == pair(p)) {
            out.push(Action::AddListener {
                lb: new.lb,
                port: p.port,
                protocol: p.protocol,
                owner: key.clone(),
            });
        }
    }
}

/// The fewest load balancers any placement could use: ceil(total port/protocol pairs / capacity).
pub fn lower_bound(total_ports: u64, capacity: u32) -> u64 {
    total_ports.div_ceil(u64::from(capacity.max(1)))
}

#[cfg(test)]
mod tests;
