//! The simulated cluster: real [`Node`]s, each on its own in-memory disk with the fsync
//! line, attached to the simulated network, with its HTTP API (the real router) called
//! in process. Each node runs in a [`NodeScope`], so it can be paused, crashed (every
//! task ended, unsynced writes lost) and restarted on what its disk kept.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use rand::Rng;
use tower::ServiceExt;

use super::net::Network;
use super::trace::Trace;
use crate::api::{router, AppState};
use crate::clock::WallClock;
use crate::config::{Member, NodeConfig};
use crate::cp::NodeId;
use crate::net::FaultFilter;
use crate::node::{Node, Wiring};
use crate::rt::NodeScope;
use crate::storage::{MemoryEngine, Tree};

/// The time of day every simulated clock starts from (2027-01-15), before skew.
const EPOCH_MS: u64 = 1_800_000_000_000;

/// An HTTP answer, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

/// Why a request got no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAnswer {
    /// The node is down: the connection was refused (certainly not applied).
    Refused,
    /// The node crashed while handling it, or the client gave up waiting: it may or
    /// may not have taken effect.
    Lost(&'static str),
}

enum Life {
    Up {
        scope: Arc<NodeScope>,
        node: Arc<Node>,
        app: axum::Router,
    },
    Down,
}

pub struct SimNode {
    pub id: NodeId,
    pub name: String,
    config: NodeConfig,
    /// The node's disk: kept across crashes and restarts.
    disk: Arc<MemoryEngine>,
    /// The machine's clock (its skew outlives a restart of the process).
    pub clock: Arc<WallClock>,
    life: Mutex<Life>,
}

impl SimNode {
    fn life(&self) -> std::sync::MutexGuard<'_, Life> {
        self.life.lock().expect("sim node lock poisoned")
    }

    pub fn is_up(&self) -> bool {
        matches!(*self.life(), Life::Up { .. })
    }

    /// The Raft leader this node knows of, if it is up and knows one.
    pub fn leader(&self) -> Option<NodeId> {
        match &*self.life() {
            Life::Up { node, .. } => node.raft.metrics().borrow().current_leader,
            Life::Down => None,
        }
    }

    /// Batches of cp writes proposed at this node and not yet answered (0 if down).
    pub fn proposals_in_flight(&self) -> usize {
        match &*self.life() {
            Life::Up { node, .. } => node.proposals_in_flight(),
            Life::Down => 0,
        }
    }

    /// Copies this node holds for unreachable homes (hinted handoff; 0 if down).
    pub fn hints_held(&self) -> u64 {
        match &*self.life() {
            Life::Up { node, .. } => node.ap.replica.hints_held(),
            Life::Down => 0,
        }
    }

    pub fn scope(&self) -> Option<Arc<NodeScope>> {
        match &*self.life() {
            Life::Up { scope, .. } => Some(scope.clone()),
            Life::Down => None,
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<Arc<SimNode>>,
    /// Why nodes failed to start, each time one did.
    failures: Mutex<Vec<String>>,
    pub net: Arc<Network>,
    pub trace: Arc<Trace>,
    dir: PathBuf,
}

/// Tunings of the simulated nodes: those of `capkv dev`, except anti-entropy, which runs
/// more often so a short liveness phase can show convergence.
fn node_config(name: &str, members: &[Member], dir: &std::path::Path) -> NodeConfig {
    let mut c = NodeConfig::new(
        name.to_owned(),
        members.to_vec(),
        dir.join(name),
        None,
        None,
    )
    .expect("a member of its own cluster");
    c.enable_faults = true;
    c.snapshot_every = 50;
    c.anti_entropy_interval = Some(Duration::from_millis(1500));
    c.tombstone_grace = Duration::from_secs(20);
    c
}

impl Cluster {
    /// `size` nodes, n1..nN, none started yet.
    pub fn new(size: u32, net: Arc<Network>, trace: Arc<Trace>, dir: PathBuf) -> Cluster {
        let members: Vec<Member> = (1..=size)
            .map(|i| Member {
                name: format!("n{i}"),
                id: u64::from(i),
                peer_addr: format!("sim:{i}"),
                http_addr: format!("sim:{i}"),
            })
            .collect();
        // The time of day: EPOCH_MS plus the simulated time since the cluster was made.
        let origin = crate::rt::Instant::now();
        let nodes = members
            .iter()
            .map(|m| {
                let clock = Arc::new(WallClock::with_source(move || {
                    EPOCH_MS + origin.elapsed().as_millis() as u64
                }));
                Arc::new(SimNode {
                    id: m.id,
                    name: m.name.clone(),
                    config: node_config(&m.name, &members, &dir),
                    disk: Arc::new(MemoryEngine::with_fsync_line()),
                    clock,
                    life: Mutex::new(Life::Down),
                })
            })
            .collect();
        Cluster {
            nodes,
            failures: Mutex::default(),
            net,
            trace,
            dir,
        }
    }

    pub fn node(&self, i: usize) -> &Arc<SimNode> {
        &self.nodes[i]
    }

    /// The index of the node the up nodes most often name as the Raft leader.
    pub fn leader(&self) -> Option<usize> {
        let mut votes: std::collections::BTreeMap<NodeId, usize> = Default::default();
        for l in self.nodes.iter().filter_map(|n| n.leader()) {
            *votes.entry(l).or_default() += 1;
        }
        let (id, _) = votes
            .into_iter()
            .max_by_key(|(id, n)| (*n, std::cmp::Reverse(*id)))?;
        self.nodes.iter().position(|n| n.id == id)
    }

    pub fn names(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// Starts node `i` on what its disk holds.
    pub async fn start(&self, i: usize) -> Result<(), String> {
        let n = self.nodes[i].clone();
        if n.is_up() {
            return Ok(());
        }
        self.trace.event(format_args!("start {}", n.name));
        n.disk.revive();
        if let Err(e) = crate::cp::log_store::verify(n.disk.as_ref()) {
            let e = format!("{}'s disk after its crash: {e}", n.name);
            self.trace.event(format_args!("{e}"));
            self.failures
                .lock()
                .expect("failures lock poisoned")
                .push(e);
        }
        let scope = NodeScope::new(n.name.clone());
        let faults = Arc::new(FaultFilter::default());
        let wiring = Wiring {
            net: self.net.attach(n.id),
            faults: faults.clone(),
            clock: n.clock.clone(),
        };
        let (config, disk, net, s) = (
            n.config.clone(),
            n.disk.clone(),
            self.net.clone(),
            scope.clone(),
        );
        let started = scope.spawn(async move {
            let node = Node::assemble(config, disk, wiring)
                .await
                .map_err(|e| e.to_string())?;
            net.up(node.id(), node.peer_handler(), s, faults);
            node.run().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(node)
        });
        let failed = |e: String| {
            let e = format!("{} did not start: {e}", n.name);
            self.trace.event(format_args!("{e}"));
            self.failures
                .lock()
                .expect("failures lock poisoned")
                .push(e.clone());
            e
        };
        let node = match started.await {
            Ok(Ok(node)) => node,
            Ok(Err(e)) => {
                self.crash_scope(&n, &scope, |_| 0);
                return Err(failed(e));
            }
            Err(e) => {
                self.crash_scope(&n, &scope, |_| 0);
                return Err(failed(e.to_string()));
            }
        };
        let app = router(AppState::new(node.clone(), None));
        *n.life() = Life::Up { scope, node, app };
        Ok(())
    }

    fn crash_scope(
        &self,
        n: &SimNode,
        scope: &NodeScope,
        keep: impl FnOnce(usize) -> usize,
    ) -> usize {
        scope.kill();
        self.net.down(n.id);
        *n.life() = Life::Down;
        n.disk.crash(keep)
    }

    /// Crashes node `i`: every task ends where it is, and of the writes not yet fsynced
    /// a random prefix survives. (After [`Cluster::crash_after_write`], its tasks have
    /// ended already; this decides what its disk kept.)
    pub fn crash(&self, i: usize, rng: &mut impl Rng) {
        let n = self.nodes[i].clone();
        let scope = match &*n.life() {
            Life::Up { scope, .. } => scope.clone(),
            Life::Down => NodeScope::new(n.name.clone()),
        };
        let keep_all = rng.gen_bool(0.3);
        let cut = rng.gen::<f64>();
        let lost = self.crash_scope(&n, &scope, |unsynced| {
            if keep_all {
                unsynced
            } else {
                (unsynced as f64 * cut) as usize
            }
        });
        self.trace.event(format_args!(
            "crash {} (lost {lost} unsynced batches)",
            n.name
        ));
    }

    /// Arms a crash of node `i` right after the `skip + 1`-th storage batch from now that
    /// writes to `tree` (deletes from it, if `deletes`): a crash between two batches of
    /// one operation. Its tasks end within that write, before any other task runs, and of
    /// its unsynced batches the first `keep` (a fraction) survive. False if it is down.
    pub fn crash_after_write(
        &self,
        i: usize,
        tree: Tree,
        deletes: bool,
        skip: u32,
        keep: f64,
    ) -> bool {
        let n = self.nodes[i].clone();
        let Some(scope) = n.scope() else {
            return false;
        };
        let (net, node, trace) = (self.net.clone(), n.clone(), self.trace.clone());
        n.disk.crash_after_write(tree, deletes, skip, move || {
            scope.kill();
            net.down(node.id);
            *node.life() = Life::Down;
            // What the disk kept is settled once the poll the node died in has ended (the
            // engine refuses its writes meanwhile): by a task of no node, which runs next.
            tokio::spawn(async move {
                let lost = node
                    .disk
                    .crash(|unsynced| (unsynced as f64 * keep).round() as usize);
                trace.event(format_args!(
                    "{} died after a write to {tree:?} (deletes {deletes}; lost {lost} unsynced \
                     batches)",
                    node.name
                ));
            });
        });
        true
    }

    /// Takes back the crash point of node `i`; true if it was never reached.
    pub fn disarm(&self, i: usize) -> bool {
        self.nodes[i].disk.disarm()
    }

    /// Stops node `i` as SIGTERM does: it takes no new HTTP request, `Node::shutdown`
    /// drains proposals, stops Raft and fsyncs while its peers can still reach it, then
    /// its tasks end.
    pub async fn stop(&self, i: usize) {
        let n = self.nodes[i].clone();
        let (scope, node) = match &*n.life() {
            Life::Up { scope, node, .. } => (scope.clone(), node.clone()),
            Life::Down => return,
        };
        // The HTTP listener closes first (as in `server::run`); the peer port stays open.
        *n.life() = Life::Down;
        self.trace.event(format_args!("stop {}", n.name));
        let _ = scope.spawn(async move { node.shutdown().await }).await;
        let lost = self.crash_scope(&n, &scope, |unsynced| unsynced);
        debug_assert_eq!(lost, 0);
    }

    pub fn pause(&self, i: usize, paused: bool) {
        if let Some(scope) = self.nodes[i].scope() {
            self.trace.event(format_args!(
                "{} {}",
                if paused { "pause" } else { "resume" },
                self.nodes[i].name
            ));
            scope.pause(paused);
        }
    }

    /// Sends one HTTP request to node `i`'s API; gives up after `wait`.
    pub async fn request(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        wait: Duration,
    ) -> Result<Answer, NoAnswer> {
        self.request_with(i, method, path, body, &[], wait).await
    }

    /// [`Cluster::request`] with extra headers (`Idempotency-Key`, `X-Capkv-Context`).
    pub async fn request_with(
        &self,
        i: usize,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, String)],
        wait: Duration,
    ) -> Result<Answer, NoAnswer> {
        let (scope, app) = match &*self.nodes[i].life() {
            Life::Up { scope, app, .. } => (scope.clone(), app.clone()),
            Life::Down => return Err(NoAnswer::Refused),
        };
        let mut req = Request::builder().method(method).uri(path);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        for (name, value) in headers {
            req = req.header(*name, value.as_str());
        }
        let req = req
            .body(body.map_or_else(Body::empty, Body::from))
            .expect("a well-formed request");
        let handled = scope.spawn(async move {
            let resp = app.oneshot(req).await.expect("the router is infallible");
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        });
        let abort = handled.abort_handle();
        match tokio::time::timeout(wait, handled).await {
            // An answer finished in the instant its node died never left it.
            Ok(Ok(_)) if scope.is_killed() => Err(NoAnswer::Lost("the node crashed")),
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(NoAnswer::Lost("the node crashed")),
            Err(_) => {
                abort.abort(); // the client closes its connection
                Err(NoAnswer::Lost("no answer in time"))
            }
        }
    }

    /// Every failure to start a node so far.
    pub fn start_failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .expect("failures lock poisoned")
            .clone()
    }

    /// Removes the snapshot files of every node.
    pub fn remove_files(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
