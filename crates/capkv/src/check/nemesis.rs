//! The nemesis: breaks the cluster on a seeded schedule and records what it did.
//!
//! Each enabled nemesis runs its own seeded schedule, concurrently with the others (so a
//! partition can overlap a clock skew, a kill or a pause): a quiet gap, a fault held for a
//! random while, then healed. Network and clock faults are kept as one layer per nemesis
//! and node, and a node is always sent the union of its layers, so healing one nemesis's
//! fault never heals another's. Every fault is recorded as a [`NemesisEvent`] from the
//! moment it began to the moment it was healed.
//!
//! | nemesis | what it does |
//! |---|---|
//! | `partition` | random halves; one node isolated; a majorities ring (each node sees only its neighbours, 5+ nodes); one-way (a node's messages to the others are dropped, theirs still arrive) |
//! | `kill` | SIGKILL a node, later start it again (loses what it had not fsynced) |
//! | `restart` | SIGTERM a node (a graceful stop), wait, start it |
//! | `pause` | SIGSTOP a node, later SIGCONT (a long GC pause, a VM migration) |
//! | `clock` | skew a node's wall clock by seconds to hours (`clock_skew_ms` in `/v1/faults`) |
//! | `snapshot` | nodes run with a tiny `--snapshot-every`; cut one node off until the others have compacted past it, so it catches up by snapshot |

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capkv_check::NemesisEvent;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use super::cluster::Cluster;
use super::workload::Recorder;
use super::NemesisKind;

/// The faults a nemesis has set on one node's `/v1/faults`.
#[derive(Default, Clone, PartialEq, Eq)]
struct NodeFaults {
    isolate_from: BTreeSet<String>,
    drop_to: BTreeSet<String>,
    clock_skew_ms: i64,
}

impl NodeFaults {
    fn union(&mut self, other: &NodeFaults) {
        self.isolate_from.extend(other.isolate_from.iter().cloned());
        self.drop_to.extend(other.drop_to.iter().cloned());
        self.clock_skew_ms += other.clock_skew_ms;
    }
}

/// What every nemesis shares: the cluster, the recorder, and the fault layers.
struct Shared {
    cluster: Arc<Cluster>,
    recorder: Arc<Recorder>,
    http: reqwest::Client,
    /// node -> nemesis -> the faults that nemesis wants on that node.
    layers: tokio::sync::Mutex<BTreeMap<String, BTreeMap<&'static str, NodeFaults>>>,
    /// nemesis -> what it is doing now, for the progress line.
    current: Arc<Mutex<BTreeMap<&'static str, String>>>,
}

impl Shared {
    /// Sends a node the union of its layers (nothing: clears its faults). A node that is
    /// down cannot be told; it starts with no faults, and gets them at the next change.
    async fn send(&self, id: &str, f: &NodeFaults) -> Result<(), String> {
        let Some(node) = self.cluster.nodes.iter().find(|n| n.id == id) else {
            return Err(format!("no node {id}"));
        };
        let url = format!("{}/v1/faults", node.url);
        let req = if *f == NodeFaults::default() {
            self.http.delete(url)
        } else {
            self.http.post(url).json(&serde_json::json!({
                "isolate_from": f.isolate_from,
                "drop_to": f.drop_to,
                "clock_skew_ms": f.clock_skew_ms,
            }))
        };
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("{id} refused it ({})", r.status())),
            Err(e) => Err(format!("{id} did not take it ({e})")),
        }
    }

    /// Sets (or, with the default, clears) one nemesis's layer on the given nodes; returns
    /// the nodes that could not be told (down, or refusing), in words.
    async fn set_layer(
        &self,
        kind: &'static str,
        changes: Vec<(String, NodeFaults)>,
    ) -> Vec<String> {
        let mut failures = Vec::new();
        let mut layers = self.layers.lock().await;
        for (id, f) in changes {
            let node = layers.entry(id.clone()).or_default();
            if f == NodeFaults::default() {
                node.remove(kind);
            } else {
                node.insert(kind, f);
            }
            let mut merged = NodeFaults::default();
            for l in node.values() {
                merged.union(l);
            }
            if let Err(e) = self.send(&id, &merged).await {
                failures.push(e);
            }
        }
        failures
    }

    /// Clears one nemesis's layer everywhere.
    async fn clear_layer(&self, kind: &'static str) -> Vec<String> {
        let ids: Vec<String> = {
            let layers = self.layers.lock().await;
            layers
                .iter()
                .filter(|(_, l)| l.contains_key(kind))
                .map(|(id, _)| id.clone())
                .collect()
        };
        let changes = ids
            .into_iter()
            .map(|id| (id, NodeFaults::default()))
            .collect();
        self.set_layer(kind, changes).await
    }

    fn begin(&self, kind: &'static str, detail: String) -> NemesisEvent {
        self.current
            .lock()
            .expect("current lock")
            .insert(kind, detail.clone());
        NemesisEvent {
            kind: kind.into(),
            detail,
            start_us: self.recorder.now_us(),
            end_us: None,
        }
    }

    /// Records the fault as over; `failures` name the nodes that never got (or never lost)
    /// it, so the history says what really happened.
    fn end(&self, mut ev: NemesisEvent, failures: Vec<String>) {
        if !failures.is_empty() {
            ev.detail.push_str(&format!(
                " [not applied everywhere: {}]",
                failures.join("; ")
            ));
        }
        ev.end_us = Some(self.recorder.now_us());
        self.current
            .lock()
            .expect("current lock")
            .retain(|k, _| *k != ev.kind);
        self.recorder.nemesis(ev);
    }
}

pub struct Nemesis {
    shared: Arc<Shared>,
    kinds: Vec<NemesisKind>,
    seed: u64,
}

impl Nemesis {
    pub fn new(
        cluster: Arc<Cluster>,
        recorder: Arc<Recorder>,
        kinds: Vec<NemesisKind>,
        seed: u64,
    ) -> Nemesis {
        Nemesis {
            shared: Arc::new(Shared {
                cluster,
                recorder,
                http: reqwest::Client::builder()
                    .timeout(Duration::from_secs(2))
                    .build()
                    .expect("building the HTTP client"),
                layers: Default::default(),
                current: Arc::default(),
            }),
            kinds,
            seed,
        }
    }

    /// What the nemeses are doing now, for the progress line.
    pub fn current(&self) -> Arc<Mutex<BTreeMap<&'static str, String>>> {
        self.shared.current.clone()
    }

    /// Clears the network and clock faults of every node.
    pub async fn heal_network(&self) {
        for n in &self.shared.cluster.nodes {
            if let Err(e) = self.shared.send(&n.id, &NodeFaults::default()).await {
                tracing::warn!(error = %e, "could not clear a node's faults");
            }
        }
    }

    /// Runs every nemesis's schedule until `stop`; each heals its own faults as it ends.
    pub async fn run(self, stop: Arc<AtomicBool>) -> Result<(), String> {
        let mut tasks = Vec::new();
        for (i, kind) in self.kinds.iter().enumerate() {
            let actor = Actor {
                shared: self.shared.clone(),
                kind: *kind,
                rng: StdRng::seed_from_u64(
                    self.seed ^ 0x006e_656d_6573_6973 ^ (i as u64).wrapping_mul(0x9e37_79b9),
                ),
                stop: stop.clone(),
            };
            tasks.push(tokio::spawn(actor.run()));
        }
        for t in tasks {
            t.await.map_err(|e| format!("a nemesis panicked: {e}"))??;
        }
        Ok(())
    }
}

/// One nemesis's schedule.
struct Actor {
    shared: Arc<Shared>,
    kind: NemesisKind,
    rng: StdRng,
    stop: Arc<AtomicBool>,
}

impl Actor {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    async fn sleep_ms(&mut self, lo: u64, hi: u64) {
        let ms = self.rng.gen_range(lo..=hi);
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        while tokio::time::Instant::now() < end && !self.stopped() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn run(mut self) -> Result<(), String> {
        while !self.stopped() {
            self.sleep_ms(1000, 4000).await;
            if self.stopped() {
                break;
            }
            self.one().await?;
        }
        Ok(())
    }

    /// Cuts the cluster into `groups` (nodes in different groups cannot talk).
    async fn partition(&self, groups: &[Vec<String>]) -> Vec<String> {
        let mut changes = Vec::new();
        for g in groups {
            let others: BTreeSet<String> = groups
                .iter()
                .filter(|o| *o != g)
                .flatten()
                .cloned()
                .collect();
            for id in g {
                let f = NodeFaults {
                    isolate_from: others.clone(),
                    ..NodeFaults::default()
                };
                changes.push((id.clone(), f));
            }
        }
        self.shared.set_layer(self.kind.name(), changes).await
    }

    async fn one(&mut self) -> Result<(), String> {
        let sh = self.shared.clone();
        let name = self.kind.name();
        let mut ids: Vec<String> = sh.cluster.nodes.iter().map(|n| n.id.clone()).collect();
        ids.shuffle(&mut self.rng);
        let n = ids.len();
        match self.kind {
            NemesisKind::Partition => {
                let variant = self.rng.gen_range(0..4);
                let (ev, mut failures) = if variant == 3 && n >= 2 {
                    // One-way: ids[0]'s messages to everyone else are dropped.
                    let to: BTreeSet<String> = ids[1..].iter().cloned().collect();
                    let detail = format!(
                        "one-way: {} -/-> {}",
                        ids[0],
                        to.iter().cloned().collect::<Vec<_>>().join(",")
                    );
                    let ev = sh.begin(name, detail);
                    let f = NodeFaults {
                        drop_to: to,
                        ..NodeFaults::default()
                    };
                    let failures = sh.set_layer(name, vec![(ids[0].clone(), f)]).await;
                    (ev, failures)
                } else if variant == 2 && n >= 5 {
                    // Majorities ring: each node reaches only its two neighbours.
                    let ev = sh.begin(name, format!("ring {}", ids.join("-")));
                    let mut changes = Vec::new();
                    for (i, id) in ids.iter().enumerate() {
                        let near = [&ids[(i + 1) % n], &ids[(i + n - 1) % n]];
                        let f = NodeFaults {
                            isolate_from: ids
                                .iter()
                                .filter(|o| *o != id && !near.contains(o))
                                .cloned()
                                .collect(),
                            ..NodeFaults::default()
                        };
                        changes.push((id.clone(), f));
                    }
                    let failures = sh.set_layer(name, changes).await;
                    (ev, failures)
                } else {
                    let cut = if variant == 1 || n < 2 {
                        1
                    } else {
                        self.rng.gen_range(1..=n / 2)
                    };
                    let groups = vec![ids[..cut].to_vec(), ids[cut..].to_vec()];
                    let ev = sh.begin(
                        name,
                        format!("{} | {}", groups[0].join(","), groups[1].join(",")),
                    );
                    let failures = self.partition(&groups).await;
                    (ev, failures)
                };
                self.sleep_ms(2000, 6000).await;
                failures.extend(sh.clear_layer(name).await);
                sh.end(ev, failures);
            }
            NemesisKind::Kill => {
                let ev = sh.begin(name, ids[0].clone());
                sh.cluster.kill(&ids[0]).await;
                self.sleep_ms(1000, 4000).await;
                sh.cluster.start(&ids[0]).await?;
                sh.end(ev, Vec::new());
            }
            NemesisKind::Restart => {
                let ev = sh.begin(name, ids[0].clone());
                sh.cluster.stop(&ids[0]).await;
                self.sleep_ms(500, 2000).await;
                sh.cluster.start(&ids[0]).await?;
                sh.end(ev, Vec::new());
            }
            NemesisKind::Pause => {
                let ev = sh.begin(name, ids[0].clone());
                sh.cluster.pause(&ids[0], true).await;
                self.sleep_ms(1000, 5000).await;
                sh.cluster.pause(&ids[0], false).await;
                sh.end(ev, Vec::new());
            }
            NemesisKind::Clock => {
                const SKEWS_MS: [i64; 6] = [-7_200_000, -60_000, -5_000, 5_000, 60_000, 7_200_000];
                let skew = *SKEWS_MS.choose(&mut self.rng).expect("not empty");
                let ev = sh.begin(name, format!("{} {skew:+}ms", ids[0]));
                let f = NodeFaults {
                    clock_skew_ms: skew,
                    ..NodeFaults::default()
                };
                let mut failures = sh.set_layer(name, vec![(ids[0].clone(), f)]).await;
                self.sleep_ms(3000, 8000).await;
                failures.extend(sh.clear_layer(name).await);
                sh.end(ev, failures);
            }
            NemesisKind::Snapshot => {
                let ev = sh.begin(name, format!("{} cut off to fall behind", ids[0]));
                let groups = vec![vec![ids[0].clone()], ids[1..].to_vec()];
                let mut failures = self.partition(&groups).await;
                self.sleep_ms(3000, 6000).await;
                failures.extend(sh.clear_layer(name).await);
                sh.end(ev, failures);
            }
        }
        Ok(())
    }
}
