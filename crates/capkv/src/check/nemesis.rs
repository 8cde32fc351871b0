//! The nemesis: breaks the cluster on a seeded schedule and records what it did.
//!
//! It runs one fault at a time: a quiet gap, then a fault chosen at random among the
//! enabled ones, held for a random while, then healed. Every fault is recorded as a
//! [`NemesisEvent`] from the moment it began to the moment it was healed.
//!
//! | nemesis | what it does |
//! |---|---|
//! | `partition` | random halves; one node isolated; a majorities ring (each node sees only its neighbours, 5+ nodes); one-way (a node's messages to the others are dropped, theirs still arrive) |
//! | `kill` | SIGKILL a node, later start it again (loses what it had not fsynced) |
//! | `restart` | SIGTERM a node (a graceful stop), wait, start it |
//! | `pause` | SIGSTOP a node, later SIGCONT (a long GC pause, a VM migration) |
//! | `clock` | skew a node's wall clock by seconds to hours (`clock_skew_ms` in `/v1/faults`) |
//! | `snapshot` | nodes run with a tiny `--snapshot-every`; cut one node off until the others have compacted past it, so it catches up by snapshot |

use std::collections::BTreeSet;
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

/// The faults the nemesis has set on one node's `/v1/faults`, sent whole each time.
#[derive(Default, Clone, PartialEq, Eq)]
struct NodeFaults {
    isolate_from: BTreeSet<String>,
    drop_to: BTreeSet<String>,
    clock_skew_ms: i64,
}

pub struct Nemesis {
    cluster: Arc<Cluster>,
    recorder: Arc<Recorder>,
    kinds: Vec<NemesisKind>,
    rng: StdRng,
    http: reqwest::Client,
    /// What the nemesis is doing now, for the progress line.
    pub current: Arc<Mutex<String>>,
}

impl Nemesis {
    pub fn new(
        cluster: Arc<Cluster>,
        recorder: Arc<Recorder>,
        kinds: Vec<NemesisKind>,
        seed: u64,
    ) -> Nemesis {
        Nemesis {
            cluster,
            recorder,
            kinds,
            rng: StdRng::seed_from_u64(seed ^ 0x006e_656d_6573_6973),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()
                .expect("building the HTTP client"),
            current: Arc::default(),
        }
    }

    fn ids(&self) -> Vec<String> {
        self.cluster.nodes.iter().map(|n| n.id.clone()).collect()
    }

    async fn sleep_ms(&mut self, lo: u64, hi: u64, stop: &AtomicBool) {
        let ms = self.rng.gen_range(lo..=hi);
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        while tokio::time::Instant::now() < end && !stop.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a node its whole fault state (an empty one clears it). A node that is down
    /// cannot be told; it starts with no faults anyway.
    async fn send(&self, id: &str, f: &NodeFaults) {
        let Some(node) = self.cluster.nodes.iter().find(|n| n.id == id) else {
            return;
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
            Ok(r) if r.status().is_success() => {}
            Ok(r) => tracing::warn!(node = id, status = %r.status(), "fault request refused"),
            Err(e) => tracing::debug!(node = id, error = %e, "fault request not delivered"),
        }
    }

    /// Clears the network and clock faults of every node.
    pub async fn heal_network(&self) {
        for id in self.ids() {
            self.send(&id, &NodeFaults::default()).await;
        }
    }

    /// Cuts the cluster into `groups`: nodes in different groups cannot talk.
    async fn partition(&self, groups: &[Vec<String>]) {
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
                self.send(id, &f).await;
            }
        }
    }

    fn begin(&self, kind: &str, detail: String) -> NemesisEvent {
        *self.current.lock().expect("current lock") = format!("{kind} {detail}");
        NemesisEvent {
            kind: kind.into(),
            detail,
            start_us: self.recorder.now_us(),
            end_us: None,
        }
    }

    fn end(&self, mut ev: NemesisEvent) {
        ev.end_us = Some(self.recorder.now_us());
        self.current.lock().expect("current lock").clear();
        self.recorder.nemesis(ev);
    }

    /// Runs faults until `stop`, then heals everything.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> Result<(), String> {
        if self.kinds.is_empty() {
            return Ok(());
        }
        while !stop.load(Ordering::Relaxed) {
            self.sleep_ms(1000, 3000, &stop).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let kind = *self
                .kinds
                .choose(&mut self.rng)
                .expect("kinds is not empty");
            self.one(kind, &stop).await?;
        }
        Ok(())
    }

    async fn one(&mut self, kind: NemesisKind, stop: &AtomicBool) -> Result<(), String> {
        let mut ids = self.ids();
        ids.shuffle(&mut self.rng);
        let n = ids.len();
        match kind {
            NemesisKind::Partition => {
                let variant = self.rng.gen_range(0..4);
                if variant == 3 && n >= 2 {
                    // One-way: ids[0]'s messages to everyone else are dropped.
                    let to: BTreeSet<String> = ids[1..].iter().cloned().collect();
                    let ev = self.begin(
                        "partition",
                        format!(
                            "one-way: {} -/-> {}",
                            ids[0],
                            to.iter().cloned().collect::<Vec<_>>().join(",")
                        ),
                    );
                    let f = NodeFaults {
                        drop_to: to,
                        ..NodeFaults::default()
                    };
                    self.send(&ids[0], &f).await;
                    self.sleep_ms(2000, 6000, stop).await;
                    self.heal_network().await;
                    self.end(ev);
                } else if variant == 2 && n >= 5 {
                    // Majorities ring: each node reaches only its two neighbours.
                    let ev = self.begin("partition", format!("ring {}", ids.join("-")));
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
                        self.send(id, &f).await;
                    }
                    self.sleep_ms(2000, 6000, stop).await;
                    self.heal_network().await;
                    self.end(ev);
                } else {
                    let cut = if variant == 1 || n < 2 {
                        1
                    } else {
                        self.rng.gen_range(1..=n / 2)
                    };
                    let groups = vec![ids[..cut].to_vec(), ids[cut..].to_vec()];
                    let ev = self.begin(
                        "partition",
                        format!("{} | {}", groups[0].join(","), groups[1].join(",")),
                    );
                    self.partition(&groups).await;
                    self.sleep_ms(2000, 6000, stop).await;
                    self.heal_network().await;
                    self.end(ev);
                }
            }
            NemesisKind::Kill => {
                let ev = self.begin("kill", ids[0].clone());
                self.cluster.kill(&ids[0]).await;
                self.sleep_ms(1000, 4000, stop).await;
                self.cluster.start(&ids[0]).await?;
                self.end(ev);
            }
            NemesisKind::Restart => {
                let ev = self.begin("restart", ids[0].clone());
                self.cluster.stop(&ids[0]).await;
                self.sleep_ms(500, 2000, stop).await;
                self.cluster.start(&ids[0]).await?;
                self.end(ev);
            }
            NemesisKind::Pause => {
                let ev = self.begin("pause", ids[0].clone());
                self.cluster.pause(&ids[0], true).await;
                self.sleep_ms(1000, 5000, stop).await;
                self.cluster.pause(&ids[0], false).await;
                self.end(ev);
            }
            NemesisKind::Clock => {
                const SKEWS_MS: [i64; 6] = [-7_200_000, -60_000, -5_000, 5_000, 60_000, 7_200_000];
                let skew = *SKEWS_MS.choose(&mut self.rng).expect("not empty");
                let ev = self.begin("clock", format!("{} {skew:+}ms", ids[0]));
                let f = NodeFaults {
                    clock_skew_ms: skew,
                    ..NodeFaults::default()
                };
                self.send(&ids[0], &f).await;
                self.sleep_ms(3000, 8000, stop).await;
                self.send(&ids[0], &NodeFaults::default()).await;
                self.end(ev);
            }
            NemesisKind::Snapshot => {
                let ev = self.begin("snapshot", format!("{} cut off to fall behind", ids[0]));
                let groups = vec![vec![ids[0].clone()], ids[1..].to_vec()];
                self.partition(&groups).await;
                self.sleep_ms(3000, 6000, stop).await;
                self.heal_network().await;
                self.end(ev);
            }
        }
        Ok(())
    }
}
