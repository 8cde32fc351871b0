//! The simulated nemesis: a seeded schedule of faults over the safety phase. Each kind of
//! fault is active at most once at a time and heals itself after a random while; the
//! liveness phase begins with [`Nemesis::heal_all`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use capkv_check::NemesisEvent;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::cluster::Cluster;
use super::net::LinkWeather;
use crate::cp::NodeId;
use crate::rt::Instant;
use crate::storage::Tree;

/// The faults the nemesis can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// The nodes split in two groups that hear nothing of each other.
    Partition,
    /// Some links carry nothing one way only.
    OneWay,
    /// Links lose, duplicate (where allowed) and delay messages, reordering them.
    Lossy,
    /// A node crashes (losing what it had not fsynced) and later starts again.
    Crash,
    /// A node crashes right after a storage batch to a random tree (between two batches
    /// of one operation), and later starts again.
    CrashAtWrite,
    /// A node stops gracefully (SIGTERM) and later starts again.
    Restart,
    /// A node stops running for a while (a long GC pause, SIGSTOP), then goes on.
    Pause,
    /// A node's wall clock jumps ahead or behind by up to a minute.
    Skew,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Partition,
        Fault::OneWay,
        Fault::Lossy,
        Fault::Crash,
        Fault::CrashAtWrite,
        Fault::Restart,
        Fault::Pause,
        Fault::Skew,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::Partition => "partition",
            Fault::OneWay => "one-way",
            Fault::Lossy => "lossy",
            Fault::Crash => "crash",
            Fault::CrashAtWrite => "crash-at-write",
            Fault::Restart => "restart",
            Fault::Pause => "pause",
            Fault::Skew => "skew",
        }
    }

    pub fn parse(s: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|f| f.name() == s)
    }
}

/// A fault in force, and how it ends.
struct Active {
    fault: Fault,
    until: Instant,
    /// The node it touches, for node faults.
    node: Option<usize>,
    /// Its entry in the nemesis history.
    event: usize,
}

pub struct Nemesis {
    cluster: Arc<Cluster>,
    rng: StdRng,
    faults: Vec<Fault>,
    active: Vec<Active>,
    pub events: Vec<NemesisEvent>,
}

impl Nemesis {
    pub fn new(cluster: Arc<Cluster>, seed: u64, faults: Vec<Fault>) -> Nemesis {
        Nemesis {
            cluster,
            rng: StdRng::seed_from_u64(seed),
            faults,
            active: Vec::new(),
            events: Vec::new(),
        }
    }

    fn ids(&self) -> Vec<NodeId> {
        self.cluster.nodes.iter().map(|n| n.id).collect()
    }

    fn begin(&mut self, fault: Fault, detail: String, node: Option<usize>, lasts: Duration) {
        self.cluster
            .trace
            .event(format_args!("nemesis {} {detail}", fault.name()));
        self.events.push(NemesisEvent {
            kind: fault.name().into(),
            detail,
            start_us: self.cluster.trace.now_us(),
            end_us: None,
        });
        self.active.push(Active {
            fault,
            until: Instant::now() + lasts,
            node,
            event: self.events.len() - 1,
        });
    }

    /// Injects faults until `until`, each healed after its while.
    pub async fn run(&mut self, until: Instant) {
        while Instant::now() < until {
            let wait = Duration::from_millis(self.rng.gen_range(200..2000));
            let next_heal = self.active.iter().map(|a| a.until).min();
            let at = next_heal.map_or(Instant::now() + wait, |h| h.min(Instant::now() + wait));
            tokio::time::sleep_until(at.min(until)).await;
            self.heal_due(false).await;
            if Instant::now() >= until || self.faults.is_empty() {
                continue;
            }
            if next_heal.is_none_or(|h| h > at) || self.rng.gen_bool(0.5) {
                let fault = *self.faults.choose(&mut self.rng).expect("not empty");
                self.inject(fault).await;
            }
        }
    }

    /// Ends every fault in force: links restored, nodes started and resumed, clocks set
    /// right.
    pub async fn heal_all(&mut self) {
        self.heal_due(true).await;
        self.cluster.net.heal();
        self.cluster.net.set_weather(LinkWeather::calm());
        for i in 0..self.cluster.nodes.len() {
            self.cluster.pause(i, false);
            if !self.cluster.node(i).is_up() {
                if let Err(e) = self.cluster.start(i).await {
                    self.cluster.trace.event(format_args!("heal: {e}"));
                }
            }
            self.cluster.node(i).clock.set_skew_ms(0);
        }
    }

    async fn heal_due(&mut self, all: bool) {
        let now = Instant::now();
        let (due, rest): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| all || a.until <= now);
        self.active = rest;
        for a in due {
            self.heal(&a).await;
            self.events[a.event].end_us = Some(self.cluster.trace.now_us());
        }
    }

    async fn heal(&mut self, a: &Active) {
        let c = self.cluster.clone();
        c.trace.event(format_args!("heal {}", a.fault.name()));
        match (a.fault, a.node) {
            (Fault::Partition | Fault::OneWay, _) => c.net.heal(),
            (Fault::Lossy, _) => c.net.set_weather(LinkWeather::calm()),
            (Fault::CrashAtWrite, Some(i)) if c.disarm(i) => {}
            (Fault::Crash | Fault::CrashAtWrite | Fault::Restart, Some(i)) => {
                if let Err(e) = c.start(i).await {
                    c.trace.event(format_args!("restart failed: {e}"));
                }
            }
            (Fault::Pause, Some(i)) => c.pause(i, false),
            (Fault::Skew, Some(i)) => c.node(i).clock.set_skew_ms(0),
            _ => {}
        }
    }

    fn busy(&self, fault: Fault) -> bool {
        let net = |f: Fault| matches!(f, Fault::Partition | Fault::OneWay);
        self.active
            .iter()
            .any(|a| a.fault == fault || (net(a.fault) && net(fault)))
    }

    /// A node no node fault touches now, and that is up: half the time the Raft leader
    /// if it is free (faults of the leader are what cp's promises hinge on, as Jepsen's
    /// nemeses target primaries), else any.
    fn free_node(&mut self) -> Option<usize> {
        let taken: BTreeSet<usize> = self.active.iter().filter_map(|a| a.node).collect();
        let free: Vec<usize> = (0..self.cluster.nodes.len())
            .filter(|i| !taken.contains(i) && self.cluster.node(*i).is_up())
            .collect();
        let leader = self.cluster.leader().filter(|l| free.contains(l));
        match leader {
            Some(l) if self.rng.gen_bool(0.5) => Some(l),
            _ => free.choose(&mut self.rng).copied(),
        }
    }

    async fn inject(&mut self, fault: Fault) {
        if self.busy(fault) {
            return;
        }
        let lasts = Duration::from_millis(self.rng.gen_range(300..6000));
        let c = self.cluster.clone();
        match fault {
            Fault::Partition => {
                let mut ids = self.ids();
                ids.shuffle(&mut self.rng);
                // Half the time the leader alone on one side (its proposals in flight are
                // then cut off from every follower).
                if let Some(l) = self.cluster.leader().filter(|_| self.rng.gen_bool(0.5)) {
                    let id = self.cluster.node(l).id;
                    ids.retain(|i| *i != id);
                    ids.insert(0, id);
                }
                let cut_at = if ids.len() > 1 && self.rng.gen_bool(0.5) {
                    1
                } else {
                    self.rng.gen_range(1..ids.len().max(2))
                };
                let (a, b) = ids.split_at(cut_at.min(ids.len()));
                let links: Vec<(NodeId, NodeId)> = a
                    .iter()
                    .flat_map(|x| b.iter().flat_map(move |y| [(*x, *y), (*y, *x)]))
                    .collect();
                c.net.cut(links);
                self.begin(fault, format!("{a:?} | {b:?}"), None, lasts);
            }
            Fault::OneWay => {
                let ids = self.ids();
                let from = *ids.choose(&mut self.rng).expect("nodes");
                let to: Vec<NodeId> = ids
                    .iter()
                    .copied()
                    .filter(|t| *t != from && self.rng.gen_bool(0.6))
                    .collect();
                if to.is_empty() {
                    return;
                }
                c.net.cut(to.iter().map(|t| (from, *t)));
                self.begin(fault, format!("{from} -> {to:?} dropped"), None, lasts);
            }
            Fault::Lossy => {
                let w = LinkWeather {
                    delay_min: Duration::from_micros(100),
                    delay_max: Duration::from_millis(self.rng.gen_range(5..300)),
                    drop: self.rng.gen_range(0.01..0.3),
                    duplicate: self.rng.gen_range(0.0..0.3),
                };
                c.net.set_weather(w);
                let detail = format!(
                    "drop {:.2} dup {:.2} delay <= {:?}",
                    w.drop, w.duplicate, w.delay_max
                );
                self.begin(fault, detail, None, lasts);
            }
            Fault::Crash => {
                let Some(i) = self.free_node() else { return };
                c.crash(i, &mut self.rng);
                let name = c.node(i).name.clone();
                self.begin(fault, name, Some(i), lasts);
            }
            Fault::CrashAtWrite => {
                let Some(i) = self.free_node() else { return };
                let tree = *[Tree::Log, Tree::Meta, Tree::Data, Tree::Ap]
                    .choose(&mut self.rng)
                    .expect("trees");
                let deletes = self.rng.gen_bool(if tree == Tree::Log { 0.5 } else { 0.1 });
                let skip = self.rng.gen_range(0..4);
                let keep = if self.rng.gen_bool(0.3) {
                    1.0
                } else {
                    self.rng.gen()
                };
                if !c.crash_after_write(i, tree, deletes, skip, keep) {
                    return;
                }
                let name = c.node(i).name.clone();
                let what = if deletes { "deletion from" } else { "write to" };
                // The crash comes when the point is reached (if it is before the heal);
                // the heal restarts the node, or disarms the point.
                let lasts = Duration::from_millis(self.rng.gen_range(1000..8000));
                self.begin(
                    fault,
                    format!("{name} after a {what} {tree:?}"),
                    Some(i),
                    lasts,
                );
            }
            Fault::Restart => {
                let Some(i) = self.free_node() else { return };
                c.stop(i).await;
                let name = c.node(i).name.clone();
                let lasts = Duration::from_millis(self.rng.gen_range(0..3000));
                self.begin(fault, name, Some(i), lasts);
            }
            Fault::Pause => {
                let Some(i) = self.free_node() else { return };
                c.pause(i, true);
                let name = c.node(i).name.clone();
                self.begin(fault, name, Some(i), lasts);
            }
            Fault::Skew => {
                let Some(i) = self.free_node() else { return };
                let skew = self.rng.gen_range(-60_000..=60_000);
                c.node(i).clock.set_skew_ms(skew);
                let name = c.node(i).name.clone();
                self.begin(fault, format!("{name} {skew:+}ms"), Some(i), lasts);
            }
        }
    }
}
