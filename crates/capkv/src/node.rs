//! A node: storage, the cp Raft group and the peer transport assembled, and the request
//! paths of the API with their deadlines and leader forwarding.
//!
//! Any node serves any request. A write or linearizable read that reaches a follower is
//! forwarded to the leader over the peer transport; the client never looks for the
//! leader. Every path ends in one of three ways, and the error says which:
//!
//! - success;
//! - `unavailable` (503): it certainly did not take effect: this node cannot reach a
//!   majority (checked first, so the minority side of a partition answers at once), or
//!   no leader could be reached before the deadline;
//! - `timeout` (504): the deadline passed after the write may have been proposed: it
//!   may or may not take effect.
//!
//! Reachability is measured, not guessed: every node pings every peer through the same
//! transport (and fault filter) that Raft uses, so a partition shows up within
//! [`REACHABLE_WINDOW`] on both sides. A one-way fault (`drop_to`) makes each side count
//! the other unreachable too, though one still hears the other (see
//! [`crate::net::FaultFilter`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::rt::Instant;

use capkv_core::{ApiError, ClusterInfo, ClusterNode, ErrorCode};
use openraft::error::{CheckIsLeaderError, Fatal, InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{ServerState, SnapshotPolicy};

use crate::ap::coordinator::Coordinator;
use crate::ap::page::Page;
use crate::ap::replica::{Held, StoredObject};
use crate::ap::replica::{Replica, Update, OBJECT_BYTES_MAX};
use crate::ap::ring::{Ring, DEFAULT_VNODES};
use crate::ap::rpc::{
    AeCompare, AeFetch, ApHint, ApRead, ApReap, ApReapCheck, ApScan, ApStoreMany, ApUpdate, ServeAp,
};
use crate::ap::value::Applied;
use crate::ap::{anti_entropy, tombstones};
use crate::clock::WallClock;
use crate::config::{InitialClusterState, NodeConfig, PeerSecurity};
use crate::cp::guard;
use crate::cp::log_store::LogStore;
use crate::cp::lost_state::{LostState, PersistedFloor, Refusal, Report};
use crate::cp::network::NetworkFactory;
use crate::cp::proposer::{ProposeError, Proposer, BATCH_BYTES_MAX};
use crate::cp::rpc::{CpRequest, CpResponse, Forward, ForwardOp, ForwardReply, RaftProbe, ServeCp};
use crate::cp::state_machine::{Reader, StateMachine};
use crate::cp::{NodeId, PeerNode, Raft, TypeConfig, Written};
use crate::message::ask;
use crate::net::{FaultFilter, NetError, PeerTls};
use crate::rpc::{PeerRequest, PeerResponse, Side};
use crate::storage::{Engine, FjallEngine, GroupCommit, Tree, Watched, WriteBatch};
use crate::{PeerNet, PeerTransport};

/// Counts one request in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(n: &'a std::sync::atomic::AtomicUsize) -> InFlight<'a> {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(n)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// How long a stopping node waits for proposals in flight before it stops Raft.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(3);

pub use crate::cluster::REACHABLE_WINDOW;
/// How often every peer is pinged.
const PING_INTERVAL: Duration = Duration::from_millis(200);
/// Pause between attempts while a leader is being elected or moves.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Forwarding hops a request may take while leadership moves.
const FORWARD_HOPS: u8 = 3;
/// Time kept back when forwarding, so the forwarder hears the remote's precise answer
/// (503 or 504) before its own deadline: at most this, and at most a quarter of what is
/// left (so a short `timeout_ms` still leaves the leader most of it).
const FORWARD_MARGIN: Duration = Duration::from_millis(50);

pub struct Node {
    pub config: NodeConfig,
    pub raft: Raft,
    pub reader: Reader,
    pub transport: Arc<PeerNet>,
    pub faults: Arc<FaultFilter>,
    /// The node's wall clock: every read of the time of day for a decision goes through
    /// it, so a fault-injected skew (or, later, a simulated clock) reaches all of them.
    pub clock: Arc<WallClock>,
    proposer: Proposer,
    /// Set when shutdown begins: forwarded requests are refused from then on.
    stopping: std::sync::atomic::AtomicBool,
    /// Forwarded requests being executed (shutdown waits for them).
    forwards_in_flight: std::sync::atomic::AtomicUsize,
    /// ap keyspaces: coordinator, local replica and hints.
    pub ap: Arc<Coordinator>,
    group_commit: GroupCommit,
    /// The store, for its health, gauges and injected stalls.
    pub engine: Arc<Watched>,
    /// What a node that started without Raft state may have lost (see `cp::lost_state`).
    lost: LostState,
    /// The Raft log, read for the state this node reports to peers that rebuild theirs
    /// (and for the log bytes that pace snapshots).
    log_state: LogStore,
    /// The size of the current snapshot's file.
    snapshot_bytes: Arc<std::sync::atomic::AtomicU64>,
    /// Peer requests other than Raft's being served (see `handle_peer`).
    peer_requests: tokio::sync::Semaphore,
    /// Of those, requests answered by a page (see `handle_peer`).
    peer_bulk_requests: tokio::sync::Semaphore,
    /// Every member's id, for checking what peers send (`cp::guard`).
    member_ids: std::collections::BTreeSet<NodeId>,
    /// Whether its Raft state could be trusted when it started (see [`Node::assemble`]).
    trusted: bool,
}

/// What a node is given from outside: its network, its fault filter and its wall clock.
pub struct Wiring {
    pub net: Arc<PeerNet>,
    pub faults: Arc<FaultFilter>,
    pub clock: Arc<WallClock>,
}

/// Largest peer frame: one AppendEntries message of [`MAX_PAYLOAD_ENTRIES`] entries, each a
/// batch of at most [`BATCH_BYTES_MAX`] bytes, or one larger command alone (a value and a
/// CAS value of at most `max_value_bytes` each, a key, names).
pub fn frame_bytes_max(max_value_bytes: usize) -> usize {
    let entry_bytes_max = BATCH_BYTES_MAX + 2 * max_value_bytes + 64 * 1024;
    (MAX_PAYLOAD_ENTRIES as usize + 1) * entry_bytes_max
}

/// Largest snapshot chunk a leader sends (openraft's `snapshot_max_chunk_size`).
const SNAPSHOT_CHUNK_MAX: usize = crate::cp::snapshot::CHUNK_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(String, std::io::Error),
    #[error("peer certificates: {0}")]
    Certs(String),
}

/// How an attempt on the leader failed.
enum AttemptError {
    /// Not the leader (any more): nothing was proposed; try again.
    NotLeader,
    /// A final answer for the client.
    Final(ApiError),
}

impl Node {
    /// Opens storage, starts Raft and the peer listener, and bootstraps the cluster on
    /// first start. The HTTP side is started by the caller.
    pub async fn start(
        config: NodeConfig,
        peer_listener: tokio::net::TcpListener,
    ) -> Result<Arc<Node>, StartError> {
        let engine = FjallEngine::open(&config.data_dir.join("store"))
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let peers: BTreeMap<NodeId, String> = config
            .cluster
            .iter()
            .filter(|m| m.id != config.id)
            .map(|m| (m.id, m.peer_addr.clone()))
            .collect();
        let tls = match &config.peer_security {
            PeerSecurity::Certs(dir) => {
                let names = config
                    .cluster
                    .iter()
                    .filter(|m| m.id != config.id)
                    .map(|m| (m.id, m.name.clone()))
                    .collect();
                Some(PeerTls::load(dir, &config.name, &names).map_err(StartError::Certs)?)
            }
            PeerSecurity::Insecure => {
                tracing::warn!(
                    "--insecure-peers: peer connections are neither encrypted nor \
                     authenticated; anyone who can reach {} controls this cluster",
                    config.peer_addr
                );
                None
            }
        };
        let faults = Arc::new(FaultFilter::default());
        let transport = Arc::new(
            PeerTransport::new(
                config.id,
                peers,
                faults.clone(),
                frame_bytes_max(config.max_value_bytes),
            )
            .with_tls(tls),
        );
        let wiring = Wiring {
            net: transport.clone(),
            faults,
            clock: Arc::new(WallClock::system()),
        };
        let node = Node::assemble(config, engine, wiring).await?;
        crate::rt::spawn(transport.serve(peer_listener, node.peer_handler()));
        node.run().await?;
        Ok(node)
    }

    /// Builds a node on `engine`, talking to its peers through `wiring.net`. Nothing of
    /// it runs until [`Node::run`]; the network should hand it what peers send through
    /// [`Node::peer_handler`].
    pub async fn assemble(
        config: NodeConfig,
        engine: impl Engine,
        wiring: Wiring,
    ) -> Result<Arc<Node>, StartError> {
        let Wiring {
            net: transport,
            faults,
            clock,
        } = wiring;
        let watched = Arc::new(Watched::new(engine));
        let engine: Arc<dyn Engine> = watched.clone();
        let group_commit = GroupCommit::start(engine.clone());
        let log_store = LogStore::new(engine.clone(), group_commit.clone());
        let log_state = log_store.clone();
        let sm = StateMachine::open(engine.clone(), &config.data_dir.join("snapshots"))
            .map_err(|e| StartError::Storage(e.to_string()))?;
        let reader = sm.reader();
        let snapshot_bytes = sm.snapshot_bytes();

        let raft_config = openraft::Config {
            cluster_name: "capkv".into(),
            heartbeat_interval: config.heartbeat_ms,
            election_timeout_min: config.election_timeout_min_ms,
            election_timeout_max: config.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_max_chunk_size: crate::cp::snapshot::CHUNK_BYTES,
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            // Paced by the node (`snapshot_loop`), by entries, log bytes and snapshot size.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: config.snapshot_every.min(1000),
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Raft(e.to_string()))?;
        let network = NetworkFactory {
            me: config.id,
            transport: Arc::new(Side::new(transport.clone())),
        };
        if log_store
            .step_down_on_start(config.id)
            .await
            .map_err(|e| StartError::Storage(e.to_string()))?
        {
            tracing::info!("this node led when it stopped; it starts as a follower");
        }
        let raft = Raft::new(config.id, Arc::new(raft_config), network, log_store, sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let proposer = Proposer::start(
            raft.clone(),
            config.election_timeout_min_ms,
            reader.clone(),
            clock.clone(),
        );
        let replica = Arc::new(
            Replica::new(engine.clone(), group_commit.clone())
                .map_err(|e| StartError::Storage(e.to_string()))?
                .with_object_bytes_max(OBJECT_BYTES_MAX.max(2 * config.max_value_bytes)),
        );
        let ap = Arc::new(Coordinator::new(
            config.id,
            format!("{}.{}", config.name, incarnation(engine.as_ref())?),
            Ring::new(config.cluster.iter().map(|m| m.id), DEFAULT_VNODES),
            Arc::new(Side::new(transport.clone())),
            replica,
            clock.clone(),
        ));
        // Whether this node's Raft state can be trusted: it had some, and it is not a
        // state begun without any whose rebuilding never finished (the marker is written
        // before a stateless node initializes, and removed only once peers vouched).
        let storage = |e: crate::storage::StorageError| StartError::Storage(e.to_string());
        let had_state = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let unverified = engine
            .get(Tree::Meta, RAFT_UNVERIFIED_KEY)
            .map_err(storage)?
            .is_some();
        let floor: Option<PersistedFloor> = engine
            .get(Tree::Meta, RAFT_FLOOR_KEY)
            .map_err(storage)?
            .map(|raw| crate::cp::decode(&raw))
            .transpose()
            .map_err(|e| StartError::Storage(format!("raft floor record: {e}")))?;
        if !had_state && !unverified && floor.is_none() {
            let mut b = WriteBatch::new();
            b.put(Tree::Meta, RAFT_UNVERIFIED_KEY.to_vec(), Vec::new());
            engine.write(b).map_err(storage)?;
            engine.sync().map_err(storage)?;
        }
        let trusted = had_state && !unverified && floor.is_none();
        if !trusted {
            // Nor may it run for leader: a candidate that lost its log can be elected by
            // voters that never had the committed entries it lost (found in CI: a wiped
            // node and a peer that had not yet received any entry elected the wiped node,
            // which then overwrote a write committed on the third). Allowed again once its
            // log reaches what its peers vouched for (`join_after_rebuild`).
            raft.runtime_config().elect(false);
        }
        let lost = match floor {
            Some(f) if !unverified => LostState::with_floor(f),
            _ => LostState::new(trusted),
        };
        let member_ids = config.cluster.iter().map(|m| m.id).collect();
        let node = Arc::new(Node {
            lost,
            log_state,
            snapshot_bytes,
            config,
            raft,
            reader,
            transport,
            faults,
            clock,
            proposer,
            stopping: std::sync::atomic::AtomicBool::new(false),
            forwards_in_flight: std::sync::atomic::AtomicUsize::new(0),
            ap,
            group_commit,
            engine: watched,
            peer_requests: tokio::sync::Semaphore::new(PEER_REQUESTS_MAX),
            peer_bulk_requests: tokio::sync::Semaphore::new(PEER_BULK_REQUESTS_MAX),
            member_ids,
            trusted,
        });

        Ok(node)
    }

    /// What answers the requests peers send this node.
    pub fn peer_handler(self: &Arc<Self>) -> crate::net::Handler<PeerRequest, PeerResponse> {
        let node = self.clone();
        Arc::new(move |from, req| {
            let node = node.clone();
            Box::pin(async move { node.handle_peer(from, req).await })
        })
    }

    /// Starts the node's work: bootstraps the cluster on first start (or rebuilds a lost
    /// Raft state), and starts its background loops.
    pub async fn run(self: &Arc<Self>) -> Result<(), StartError> {
        let node = self;
        if node.trusted {
            node.bootstrap().await?;
        } else if node.lost.waiting() {
            // Initialized (which starts an election at once) only if no peer holds a log.
            crate::rt::spawn(node.clone().rebuild_lost_state());
        } else {
            let n = node.clone();
            crate::rt::spawn(async move { n.join_after_rebuild().await });
        }
        crate::rt::spawn(node.clone().ping_loop());
        crate::rt::spawn(node.clone().metrics_loop());
        crate::rt::spawn(node.clone().core_delay_loop());
        crate::rt::spawn(node.clone().snapshot_loop());
        crate::rt::spawn(node.ap.clone().handoff_loop());
        crate::rt::spawn(node.clone().anti_entropy_loop());
        crate::rt::spawn(node.clone().tombstone_loop());
        Ok(())
    }

    /// On first start every node proposes the same initial membership; openraft accepts
    /// it on pristine nodes and refuses it (harmlessly) once a node has state.
    async fn bootstrap(&self) -> Result<(), StartError> {
        if self
            .raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?
        {
            tracing::info!("resuming existing cluster state");
            return Ok(());
        }
        let members: BTreeMap<NodeId, PeerNode> = self
            .config
            .cluster
            .iter()
            .map(|m| {
                (
                    m.id,
                    PeerNode {
                        name: m.name.clone(),
                        peer_addr: m.peer_addr.clone(),
                        http_addr: m.http_addr.clone(),
                    },
                )
            })
            .collect();
        match self.raft.initialize(members).await {
            Ok(()) => tracing::info!("initialized a new cluster"),
            Err(RaftError::APIError(e)) => {
                tracing::info!(reason = %e, "cluster already initialized")
            }
            Err(RaftError::Fatal(e)) => return Err(StartError::Raft(e.to_string())),
        }
        Ok(())
    }

    /// Stops Raft and makes everything written durable. Order: refuse new forwarded
    /// requests (503: not applied), let proposals in flight get their answers (up to
    /// [`SHUTDOWN_DRAIN`]), then stop Raft; an answer Raft drops after that is a 504, never
    /// "not applied".
    pub async fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        let drain = if crate::rt::reverted(crate::rt::Revert::StopAnswers503) {
            Duration::ZERO
        } else {
            SHUTDOWN_DRAIN
        };
        if !self.proposer.drain(drain).await {
            tracing::warn!("proposals still in flight at shutdown; their clients get 504");
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        // No ap write after this one: each holds its key until it is fsynced, so once
        // every key has been free once, all are durable and the incarnation may be kept.
        self.ap.replica.stop().await;
        if let Err(e) = self.group_commit.sync().await {
            tracing::warn!(error = %e, "final sync");
            return;
        }
        let incarnation = self.ap.actor.rsplit('.').next().unwrap_or_default();
        let mut b = WriteBatch::new();
        b.put(
            Tree::Meta,
            CLEAN_STOP_KEY.to_vec(),
            incarnation.as_bytes().to_vec(),
        );
        if let Err(e) = self.engine.write(b).and_then(|()| self.engine.sync()) {
            tracing::warn!(error = %e, "recording the clean stop");
        }
    }

    /// Batches of cp writes proposed here and not yet answered.
    pub fn proposals_in_flight(&self) -> usize {
        self.proposer.in_flight()
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// Every other node of the cluster.
    fn peer_ids(&self) -> Vec<NodeId> {
        self.config
            .cluster
            .iter()
            .map(|m| m.id)
            .filter(|id| *id != self.id())
            .collect()
    }

    pub fn name_of(&self, id: NodeId) -> String {
        self.config
            .member(id)
            .map_or_else(|| format!("node{id}"), |m| m.name.clone())
    }

    /// The voters of the cp group: Raft's membership, or the configured cluster while
    /// this node has none yet (a node rebuilding lost Raft state joins when the leader
    /// sends it the log, not by initializing; membership is the initial `--cluster`).
    fn voters(&self) -> BTreeSet<NodeId> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let voters: BTreeSet<NodeId> = m.membership_config.membership().voter_ids().collect();
        if voters.is_empty() {
            return self.config.cluster.iter().map(|c| c.id).collect();
        }
        voters
    }

    pub fn reachable(&self, id: NodeId) -> bool {
        id == self.id() || self.transport.reachable(id, REACHABLE_WINDOW)
    }

    /// Whether this node can currently exchange messages with a majority of the voters.
    pub fn has_quorum(&self) -> bool {
        let voters = self.voters();
        if voters.is_empty() {
            return false;
        }
        let up = voters.iter().filter(|v| self.reachable(**v)).count();
        up * 2 > voters.len()
    }

    fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Runs a write (or linearizable read) on the leader, forwarding as needed.
    pub async fn execute(
        &self,
        op: ForwardOp,
        deadline: Instant,
        hops_left: u8,
    ) -> Result<ForwardReply, ApiError> {
        let is_write = matches!(op, ForwardOp::Write(_));
        let mut last = ApiError::unavailable("no leader was reachable before the deadline");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(last);
            }
            if !self.has_quorum() {
                return Err(ApiError::unavailable(format!(
                    "node {} cannot reach a majority of the cluster; the request was not applied",
                    self.config.name
                )));
            }
            match self.leader() {
                Some(l) if l == self.id() => match self.attempt_on_leader(&op, deadline).await {
                    Ok(reply) => return Ok(reply),
                    Err(AttemptError::Final(e)) => return Err(e),
                    Err(AttemptError::NotLeader) => {}
                },
                Some(l) if hops_left > 0 => {
                    let left = deadline.saturating_duration_since(now);
                    let fwd = Forward {
                        op: op.clone(),
                        timeout_ms: left
                            .saturating_sub(FORWARD_MARGIN.min(left / 4))
                            .as_millis() as u64,
                        hops_left: hops_left - 1,
                    };
                    metrics::counter!("capkv_forwarded_requests_total").increment(1);
                    match ask(&self.cp_net(), l, fwd, left).await {
                        Ok(Ok(reply)) => return Ok(reply),
                        // The remote guarantees an unavailable request was not applied.
                        Ok(Err(e)) if e.code == ErrorCode::Unavailable => last = e,
                        Ok(Err(e)) => return Err(e),
                        Err(e) if e.maybe_delivered() => {
                            return Err(if is_write {
                                ApiError::timeout(format!(
                                    "forwarded to the leader, outcome unknown: {e}"
                                ))
                            } else {
                                ApiError::timeout(format!("no answer from the leader: {e}"))
                            });
                        }
                        Err(e) => last = ApiError::unavailable(format!("leader unreachable: {e}")),
                    }
                }
                Some(_) => {
                    last =
                        ApiError::unavailable("leadership is moving; the request was not applied")
                }
                None => {
                    last =
                        ApiError::unavailable("no leader elected yet; the request was not applied")
                }
            }
            tokio::time::sleep(RETRY_PAUSE.min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    async fn attempt_on_leader(
        &self,
        op: &ForwardOp,
        deadline: Instant,
    ) -> Result<ForwardReply, AttemptError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if let ForwardOp::Write(cmd) = op {
            return match self.proposer.propose(cmd.clone(), deadline).await {
                Ok(reply) => reply.map(ForwardReply::Written).map_err(AttemptError::Final),
                Err(ProposeError::NotLeader) => Err(AttemptError::NotLeader),
                Err(ProposeError::Deadline { proposed: true }) => Err(AttemptError::Final(ApiError::timeout(
                    "the write was proposed but not committed before the deadline; it may still take effect",
                ))),
                Err(ProposeError::Deadline { proposed: false }) => Err(AttemptError::Final(ApiError::unavailable(
                    "the deadline passed before the write was proposed; it was not applied",
                ))),
                Err(ProposeError::Stopped(e)) => {
                    Err(AttemptError::Final(ApiError::unavailable(format!("raft is not running: {e}"))))
                }
                Err(ProposeError::Unknown(e)) => Err(AttemptError::Final(ApiError::timeout(format!(
                    "{e}; the write may still take effect"
                )))),
                Err(ProposeError::Internal(e)) => Err(AttemptError::Final(ApiError::internal(e))),
            };
        }
        match tokio::time::timeout(left, self.raft.ensure_linearizable()).await {
            Err(_) => Err(AttemptError::Final(ApiError::timeout(
                "could not confirm leadership before the deadline",
            ))),
            Ok(Ok(_)) => self.read_local(op).map_err(AttemptError::Final),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(AttemptError::NotLeader)
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(_)))) => {
                Err(AttemptError::NotLeader)
            }
            Ok(Err(RaftError::Fatal(e))) => Err(AttemptError::Final(ApiError::unavailable(
                format!("raft is not running: {e}"),
            ))),
        }
    }

    /// Serves a read from this node's replica (serializable; linearizable once the
    /// caller has confirmed leadership).
    pub fn read_local(&self, op: &ForwardOp) -> Result<ForwardReply, ApiError> {
        match op {
            ForwardOp::Get { keyspace, key } => {
                self.require_keyspace(keyspace)?;
                Ok(ForwardReply::Value(self.reader.get(keyspace, key)?))
            }
            ForwardOp::Scan {
                keyspace,
                prefix,
                after,
                limit,
            } => {
                self.require_keyspace(keyspace)?;
                let (rows, more) = self
                    .reader
                    .scan(keyspace, prefix, after.as_deref(), *limit)?;
                Ok(ForwardReply::Scan { rows, more })
            }
            ForwardOp::ListKeyspaces => Ok(ForwardReply::Keyspaces(self.reader.keyspaces()?)),
            ForwardOp::Write(_) => Err(ApiError::internal("a write is not a read")),
        }
    }

    fn require_keyspace(&self, name: &str) -> Result<(), ApiError> {
        match self.reader.keyspace(name)? {
            // Only a node whose registry lags sends an ap keyspace down the cp path.
            Some(spec) if spec.mode == capkv_core::Mode::Ap => Err(ApiError::unavailable(format!(
                "keyspace '{name}' is an ap keyspace the receiving node had not learned yet; retry"
            ))),
            Some(_) => Ok(()),
            None => Err(ApiError::not_found(format!(
                "keyspace '{name}' does not exist"
            ))),
        }
    }

    /// Convenience for the API: run a write and return what the state machine answered.
    pub async fn write(
        &self,
        cmd: crate::cp::Command,
        deadline: Instant,
    ) -> Result<Written, ApiError> {
        match self
            .execute(ForwardOp::Write(cmd), deadline, FORWARD_HOPS)
            .await?
        {
            ForwardReply::Written(w) => Ok(w),
            other => Err(ApiError::internal(format!(
                "unexpected reply to a write: {other:?}"
            ))),
        }
    }

    /// A linearizable read, forwarded to the leader if needed.
    pub async fn linearizable_read(
        &self,
        op: ForwardOp,
        deadline: Instant,
    ) -> Result<ForwardReply, ApiError> {
        self.execute(op, deadline, FORWARD_HOPS).await
    }

    /// Serves a peer's request. Raft's own messages at once; the rest (forwarded client
    /// requests, ap traffic) at most [`PEER_REQUESTS_MAX`] at a time, the others waiting
    /// without a thread: each may hold a thread while storage is slow (see
    /// `api::DATA_REQUESTS_MAX`), and Raft must never wait behind them.
    ///
    /// Requests whose answer is a page of up to [`crate::rpc::PAGE_BYTES_MAX`] bytes are
    /// further held to [`PEER_BULK_REQUESTS_MAX`] at a time, so that a peer asking for many
    /// (and not reading them) cannot make this node build hundreds of pages at once.
    async fn handle_peer(&self, from: NodeId, req: PeerRequest) -> PeerResponse {
        if req.is_raft() {
            return self.serve_peer(from, req).await;
        }
        let _bulk = match req.is_bulk() {
            true => Some(
                self.peer_bulk_requests
                    .acquire()
                    .await
                    .expect("the bulk request semaphore is never closed"),
            ),
            false => None,
        };
        let _permit = self
            .peer_requests
            .acquire()
            .await
            .expect("the peer request semaphore is never closed");
        self.serve_peer(from, req).await
    }

    async fn serve_peer(&self, from: NodeId, req: PeerRequest) -> PeerResponse {
        match req {
            PeerRequest::Ping => PeerResponse::Pong,
            PeerRequest::Cp(r) => PeerResponse::Cp(r.serve(self, from).await),
            PeerRequest::Ap(r) => PeerResponse::Ap(r.serve(self, from).await),
        }
    }

    /// Whether a peer's Raft message failed its check by [`guard`]. One that fails is
    /// never handled, but counted, logged, and answered as a stopped node would (the
    /// sender's openraft then leaves this node alone for a while).
    fn refused(
        &self,
        from: NodeId,
        kind: &'static str,
        checked: Result<(), guard::Refused>,
    ) -> bool {
        let Err(why) = checked else {
            return false;
        };
        metrics::counter!("capkv_peer_messages_refused_total", "kind" => kind).increment(1);
        tracing::warn!(peer = %self.name_of(from), kind, %why, "peer message refused");
        true
    }

    /// The peer network as cp sees it.
    fn cp_net(&self) -> Side<CpRequest, CpResponse> {
        Side::new(self.transport.clone())
    }

    /// Why the Raft core is not running, if it is not: it stopped on an error or a panic
    /// (its metrics' sender is gone: a panicked core never reports), it was shut down,
    /// or, with `probe`, it did not answer within [`RAFT_CORE_ANSWER`].
    pub async fn raft_stopped(&self, probe: bool) -> Option<String> {
        let watch = self.raft.metrics();
        let metrics = watch.borrow().clone();
        if let Err(fatal) = &metrics.running_state {
            return Some(format!("the raft core has stopped: {fatal}"));
        }
        if watch.has_changed().is_err() {
            return Some("the raft core has stopped (it panicked)".into());
        }
        if metrics.state == openraft::ServerState::Shutdown {
            return Some("the raft core is shut down".into());
        }
        if !probe {
            return None;
        }
        match tokio::time::timeout(RAFT_CORE_ANSWER, self.raft.with_raft_state(|_| ())).await {
            Ok(Ok(())) => None,
            Ok(Err(fatal)) => Some(format!("the raft core has stopped: {fatal}")),
            Err(_) => Some(format!(
                "the raft core has not answered for {} ms",
                RAFT_CORE_ANSWER.as_millis()
            )),
        }
    }

    /// A forwarded request gets the checks the HTTP API gives a client's.
    fn check_forwarded(&self, op: &ForwardOp) -> Result<(), ApiError> {
        use capkv_core::validate;
        match op {
            ForwardOp::Write(c) => guard::check_command(
                c,
                self.config.cluster.len() as u32,
                self.config.max_value_bytes,
            ),
            ForwardOp::Get { keyspace, key } => {
                validate::keyspace_name(keyspace)?;
                validate::key(key)
            }
            ForwardOp::Scan {
                keyspace,
                prefix,
                after,
                limit,
            } => {
                validate::keyspace_name(keyspace)?;
                if prefix.len() > validate::MAX_KEY_BYTES
                    || after
                        .as_ref()
                        .is_some_and(|a| a.len() > validate::MAX_KEY_BYTES)
                {
                    return Err(ApiError::too_large(
                        "a scan prefix or cursor over the key limit",
                    ));
                }
                if *limit == 0 || *limit > validate::MAX_SCAN_LIMIT {
                    return Err(ApiError::bad_request("a scan limit out of range"));
                }
                Ok(())
            }
            ForwardOp::ListKeyspaces => Ok(()),
        }
    }

    /// The keyspace registry as this node has applied it (never needs a quorum).
    fn ap_specs(&self) -> Result<BTreeMap<String, capkv_core::KeyspaceSpec>, ApiError> {
        Ok(self
            .reader
            .keyspaces()?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect())
    }

    /// Anti-entropy with one reachable peer after another, one exchange per interval.
    async fn anti_entropy_loop(self: Arc<Self>) {
        let Some(interval) = self.config.anti_entropy_interval else {
            tracing::warn!("anti-entropy is off (--anti-entropy-ms 0)");
            return;
        };
        let peers = self.peer_ids();
        if peers.is_empty() {
            // Alone, there is no one to rebuild from: what it holds is all there is.
            if let Err(e) = self.ap.replica.synced_with(self.id(), &peers) {
                tracing::warn!(error = %e, "recording an anti-entropy sync");
            }
        }
        let mut turn = 0usize;
        let mut pause = interval;
        loop {
            tokio::time::sleep(pause).await;
            if peers.is_empty() {
                continue;
            }
            let peer = peers[turn % peers.len()];
            turn += 1;
            if !self.reachable(peer) {
                continue;
            }
            let started = Instant::now();
            let result = match self.ap_specs() {
                Ok(specs) => anti_entropy::exchange(&self.ap, &specs, peer).await,
                Err(e) => Err(e),
            };
            pause = background_pause(started.elapsed(), interval);
            if result.is_ok() {
                if let Err(e) = self.ap.replica.synced_with(peer, &peers) {
                    tracing::warn!(error = %e, "recording an anti-entropy sync");
                }
            }
            match result {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(peer = %self.name_of(peer), keys = n, "anti-entropy repaired keys")
                }
                Err(e) => {
                    tracing::debug!(peer = %self.name_of(peer), error = %e, "anti-entropy exchange failed")
                }
            }
        }
    }

    /// Collects the tombstones of keys this node is first home of (`ap::tombstones`).
    async fn tombstone_loop(self: Arc<Self>) {
        let mut collector = tombstones::Collector::new(self.config.tombstone_grace);
        let mut pause = tombstones::REAP_INTERVAL;
        loop {
            tokio::time::sleep(pause).await;
            let started = Instant::now();
            let result = match self.ap_specs() {
                Ok(specs) => collector.round(&self.ap, &specs).await,
                Err(e) => Err(e),
            };
            pause = background_pause(started.elapsed(), tombstones::REAP_INTERVAL);
            match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(tombstones = n, "collected tombstones"),
                Err(e) => tracing::warn!(error = %e, "tombstone collection round failed"),
            }
        }
    }

    /// This node's term and the id of its last log entry (read from storage, beside the
    /// Raft core, so a busy core does not delay it).
    async fn raft_report(&self) -> Option<Report> {
        use openraft::storage::RaftLogStorage;
        let term = self.raft.metrics().borrow().current_term;
        let state = self.log_state.clone().get_log_state().await.ok()?;
        Some((term, state.last_log_id))
    }

    /// A node that started without Raft state asks its peers what it may have lost
    /// until enough have answered (see `cp::lost_state`).
    async fn rebuild_lost_state(self: Arc<Self>) {
        let peers = self.peer_ids();
        let mut answers: BTreeMap<NodeId, Option<Report>> = BTreeMap::new();
        let mut tick = tokio::time::interval(PING_INTERVAL);
        let mut waited = Instant::now();
        loop {
            tick.tick().await;
            let mut asks = tokio::task::JoinSet::new();
            // A peer that could not vouch is asked again: it may vouch later.
            for p in peers
                .iter()
                .filter(|p| !matches!(answers.get(p), Some(Some(_))))
            {
                let (net, p) = (self.cp_net(), *p);
                asks.spawn(crate::rt::scoped(async move {
                    (p, ask(&net, p, RaftProbe, REACHABLE_WINDOW).await)
                }));
            }
            while let Some(done) = asks.join_next().await {
                if let Ok((p, Ok(r))) = done {
                    answers.insert(p, r);
                }
            }
            let known: Vec<Option<Report>> = answers.values().copied().collect();
            if waited.elapsed() >= REBUILD_HINT_EVERY {
                waited = Instant::now();
                let missing: Vec<String> = peers
                    .iter()
                    .filter(|p| !answers.contains_key(p))
                    .map(|p| self.name_of(*p))
                    .collect();
                let stateless: Vec<String> = answers
                    .iter()
                    .filter(|(_, r)| r.is_none())
                    .map(|(p, _)| self.name_of(*p))
                    .collect();
                tracing::warn!(
                    ?missing,
                    ?stateless,
                    mode = ?self.config.initial_cluster_state,
                    "started without Raft state; waiting for the members that may hold it \
                     (only if this is a new cluster whose missing members hold nothing: \
                     --initial-cluster-state new)"
                );
            }
            if self.lost.learn(
                &known,
                self.config.cluster.len(),
                self.config.initial_cluster_state,
            ) {
                // The floor is kept: until this node's log reaches it, a restart must not
                // make it look stateless again.
                let mut b = WriteBatch::new();
                if let Some(floor) = self.lost.known_floor() {
                    b.put(
                        Tree::Meta,
                        RAFT_FLOOR_KEY.to_vec(),
                        crate::cp::encode(&floor),
                    );
                }
                b.delete(Tree::Meta, RAFT_UNVERIFIED_KEY.to_vec());
                if let Err(e) = self.engine.write(b).and_then(|()| self.engine.sync()) {
                    // The marker stays: the next start rebuilds again, which is safe.
                    tracing::warn!(error = %e, "could not record that the Raft state was rebuilt");
                }
                tracing::info!(
                    vouched = known.iter().flatten().count(),
                    term = known.iter().flatten().map(|r| r.0).max().unwrap_or(0),
                    "started without Raft state: learned from peers what it may have lost; taking part in Raft"
                );
                self.join_after_rebuild().await;
                return;
            }
        }
    }

    /// After `rebuild_lost_state` learned the floor: a node in a cluster where nobody
    /// holds a log (a new cluster) initializes it; otherwise it waits for the leader to
    /// send it the log, and runs for leader only once its log reaches the floor.
    async fn join_after_rebuild(&self) {
        match self.lost.floor_log() {
            // A replaced disk never initializes: the leader sends it what it needs.
            None if self.config.initial_cluster_state == InitialClusterState::Existing => {}
            None => {
                if let Err(e) = self.bootstrap().await {
                    tracing::error!(error = %e, "initializing the cluster");
                }
            }
            Some(floor) => {
                use openraft::storage::RaftLogStorage;
                // Compared as log ids (term first): entries past the floor's index that a
                // later leader truncated must not keep this node out of elections for ever
                // (found by review).
                let mut rx = self.raft.metrics();
                loop {
                    let last = self
                        .log_state
                        .clone()
                        .get_log_state()
                        .await
                        .ok()
                        .and_then(|s| s.last_log_id);
                    if last >= Some(floor) {
                        break;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
                // Its log now covers all it could have lost: trusted from the next start.
                let mut b = WriteBatch::new();
                b.delete(Tree::Meta, RAFT_FLOOR_KEY.to_vec());
                if let Err(e) = self.engine.write(b).and_then(|()| self.engine.sync()) {
                    tracing::warn!(error = %e, "could not drop the lost-state floor record");
                }
                tracing::info!(
                    floor = %floor,
                    "the log reached what peers vouched for: may run for leader"
                );
            }
        }
        self.raft.runtime_config().elect(true);
    }

    /// One pinger per peer, each waiting for its last ping (at most the reachability
    /// window) before the next: a slow or silent peer never piles up pings.
    async fn ping_loop(self: Arc<Self>) {
        for id in self.peer_ids() {
            let t = self.transport.clone();
            crate::rt::spawn(async move {
                let mut tick = tokio::time::interval(PING_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = t.call(id, PeerRequest::Ping, REACHABLE_WINDOW).await {
                        if !matches!(e, NetError::Isolated(_) | NetError::DropTo(_)) {
                            tracing::trace!(peer = id, error = %e, "ping failed");
                        }
                    }
                }
            });
        }
    }

    /// Keeps the Raft gauges current: on every metrics change (cheap: a watch channel),
    /// plus the commit index and reachable peers at most every [`METRICS_PROBE_EVERY`].
    /// The commit index is asked of RaftCore, and answering makes it publish metrics
    /// again, so asking on every change would be a busy loop starving Raft (it was:
    /// ~13k requests/s, 7 ms per replicated write instead of 1).
    /// Takes snapshots (and so lets the log be purged): once `--snapshot-every` entries or
    /// [`SNAPSHOT_LOG_BYTES`] of log were appended since the last one, but never before
    /// as many log bytes as the last snapshot's size, so a snapshot (which writes the
    /// whole data set) costs at most what the log it lets go cost. Found by measurement
    /// (#9 item 3): with a fixed trigger a 1 GiB data set was rewritten every 15 s, the
    /// disk starved log appends, AppendEntries missed openraft's 100 ms and the leader
    /// changed six times in four minutes. (openraft's own policy counts entries only, and
    /// an entry is a group-committed batch of any size.)
    async fn snapshot_loop(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        let mut last_snapshot = rx.borrow().snapshot;
        let mut baseline = self.log_state.appended_bytes();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let (snapshot, applied) = {
                let m = rx.borrow_and_update();
                (m.snapshot, m.last_applied)
            };
            let appended = self.log_state.appended_bytes();
            if snapshot != last_snapshot {
                last_snapshot = snapshot;
                baseline = appended;
                continue;
            }
            let entries = applied
                .map_or(0, |a| a.index)
                .saturating_sub(snapshot.map_or(0, |s| s.index));
            let bytes = appended.saturating_sub(baseline);
            let last = self
                .snapshot_bytes
                .load(std::sync::atomic::Ordering::Relaxed);
            if snapshot_due(entries, bytes, last, self.config.snapshot_every, self.id()) {
                tracing::info!(entries, bytes, last, "taking a snapshot");
                // Counted from now whether or not the trigger takes (one is under way,
                // or the core stopped): the next try comes after as many bytes again.
                baseline = appended;
                if self.raft.trigger().snapshot().await.is_err() {
                    return;
                }
            }
        }
    }

    /// Measures how long the Raft core takes to answer a request that costs it nothing
    /// (`capkv_raft_core_delay_seconds`): the time its loop is kept from heartbeats and
    /// elections by storage calls it awaits, by CPU starvation, or by a burst of work.
    /// A delay that approaches the election timeout is logged.
    async fn core_delay_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(CORE_PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let began = Instant::now();
            if self.raft.with_raft_state(|_| ()).await.is_err() {
                return;
            }
            let took = began.elapsed();
            metrics::histogram!("capkv_raft_core_delay_seconds").record(took.as_secs_f64());
            if took.as_millis() as u64 >= self.config.election_timeout_min_ms / 2 {
                tracing::warn!(?took, "the Raft core was slow to answer");
            }
        }
    }

    async fn metrics_loop(self: Arc<Self>) {
        let mut rx = self.raft.metrics();
        let mut leader = None;
        let mut probed: Option<Instant> = None;
        loop {
            {
                let m = rx.borrow_and_update();
                metrics::gauge!("capkv_raft_term").set(m.current_term as f64);
                metrics::gauge!("capkv_raft_last_log_index")
                    .set(m.last_log_index.unwrap_or(0) as f64);
                metrics::gauge!("capkv_raft_applied_index")
                    .set(m.last_applied.map_or(0, |l| l.index) as f64);
                // Entries up to here are gone from the log: a peer behind it catches up
                // by snapshot only.
                metrics::gauge!("capkv_raft_purged_index")
                    .set(m.purged.map_or(0, |l| l.index) as f64);
                metrics::gauge!("capkv_raft_is_leader").set(if m.state == ServerState::Leader {
                    1.0
                } else {
                    0.0
                });
                if m.current_leader != leader {
                    leader = m.current_leader;
                    metrics::counter!("capkv_raft_leader_changes_total").increment(1);
                    tracing::info!(leader = ?leader.map(|l| self.name_of(l)), term = m.current_term, "leader changed");
                }
            }
            if probed.is_none_or(|t| t.elapsed() >= METRICS_PROBE_EVERY) {
                probed = Some(Instant::now());
                if let Some(rss) = crate::process::resident_bytes() {
                    metrics::gauge!("capkv_process_resident_bytes").set(rss as f64);
                }
                if let Some(cpu) = crate::process::cpu_seconds() {
                    metrics::gauge!("capkv_process_cpu_seconds").set(cpu);
                }
                if let Some(c) = self.commit_index().await {
                    metrics::gauge!("capkv_raft_commit_index").set(c as f64);
                }
                let reachable = self
                    .config
                    .cluster
                    .iter()
                    .filter(|m| self.reachable(m.id))
                    .count();
                metrics::gauge!("capkv_peers_reachable").set(reachable.saturating_sub(1) as f64);
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(METRICS_PROBE_EVERY) => {}
            }
        }
    }

    /// The commit index as the Raft core knows it, if the core answers within 200 ms (it
    /// does not while it waits on stalled storage, and `/v1/cluster` must still answer).
    async fn commit_index(&self) -> Option<u64> {
        let ask = self
            .raft
            .with_raft_state(|st| st.committed.map_or(0, |l| l.index));
        tokio::time::timeout(Duration::from_millis(200), ask)
            .await
            .ok()?
            .ok()
    }

    /// This node's view of the cluster, for `/v1/cluster` and `capkv status`.
    pub async fn cluster_info(&self) -> ClusterInfo {
        let m = self.raft.metrics().borrow().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let applied_index = m.last_applied.map_or(0, |l| l.index);
        // Every applied entry is committed: a lower bound when the core does not answer.
        let commit_index = self.commit_index().await.unwrap_or(applied_index);
        let ring = self.ap.ring.ownership();
        let raft_stopped = self.raft_stopped(false).await;
        ClusterInfo {
            node: self.config.name.clone(),
            role: if raft_stopped.is_some() {
                "stopped"
            } else {
                role
            }
            .to_owned(),
            leader: m.current_leader.map(|l| self.name_of(l)),
            term: m.current_term,
            applied_index,
            commit_index,
            last_log_index: m.last_log_index.unwrap_or(0),
            has_quorum: self.has_quorum(),
            nodes: self
                .config
                .cluster
                .iter()
                .map(|n| ClusterNode {
                    id: n.name.clone(),
                    peer_addr: n.peer_addr.clone(),
                    http_addr: n.http_addr.clone(),
                    reachable: self.reachable(n.id),
                    ring_share: ring.get(&n.id).copied().unwrap_or(0.0),
                })
                .collect(),
            isolated_from: self
                .faults
                .isolated()
                .into_iter()
                .map(|id| self.name_of(id))
                .collect(),
            hints_held: self.ap.replica.hints_held(),
            raft_stopped,
        }
    }
}

/// cp's messages, answered (`cp::rpc`): Raft's once [`guard`] passed them, and forwarded
/// client requests.
impl ServeCp for Node {
    async fn on_raft_probe(&self, _from: NodeId, _m: RaftProbe) -> Option<Report> {
        match self.raft_report().await {
            Some(own) => self.lost.report(own),
            None => None,
        }
    }

    async fn on_append_entries(
        &self,
        from: NodeId,
        r: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> {
        if self.refused(
            from,
            "append_entries",
            guard::check_append(from, &r, &self.member_ids),
        ) {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        match self.lost.check_leader(r.vote.leader_id().term) {
            Ok(()) => {
                let began = Instant::now();
                let reply = self.raft.append_entries(r).await;
                metrics::histogram!("capkv_raft_append_handle_seconds")
                    .record(began.elapsed().as_secs_f64());
                reply
            }
            Err(Refusal::StaleTerm(term)) => Ok(AppendEntriesResponse::HigherVote(
                openraft::Vote::new(term, self.id()),
            )),
            Err(_) => Err(RaftError::Fatal(Fatal::Stopped)),
        }
    }

    async fn on_vote(
        &self,
        from: NodeId,
        r: VoteRequest<NodeId>,
    ) -> Result<VoteResponse<NodeId>, RaftError<NodeId>> {
        if self.refused(from, "vote", guard::check_vote(from, &r)) {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        match self.lost.check_vote(&r) {
            Ok(()) => {
                let began = Instant::now();
                let reply = self.raft.vote(r).await;
                let took = began.elapsed();
                metrics::histogram!("capkv_raft_vote_handle_seconds").record(took.as_secs_f64());
                tracing::info!(from = %self.name_of(from), ?took, granted = reply.as_ref().is_ok_and(|v| v.vote_granted), "vote asked");
                reply
            }
            Err(why) => {
                tracing::debug!(?why, candidate = ?r.vote, "vote refused: rebuilding lost state");
                Ok(VoteResponse {
                    vote: self.raft.metrics().borrow().vote,
                    vote_granted: false,
                    last_log_id: None,
                })
            }
        }
    }

    async fn on_install_snapshot(
        &self,
        from: NodeId,
        r: InstallSnapshotRequest<TypeConfig>,
    ) -> Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>> {
        let checked = guard::check_snapshot(from, &r, &self.member_ids, SNAPSHOT_CHUNK_MAX);
        if self.refused(from, "install_snapshot", checked) {
            return Err(RaftError::Fatal(Fatal::Stopped));
        }
        match self.lost.check_leader(r.vote.leader_id().term) {
            Ok(()) => self.raft.install_snapshot(r).await,
            Err(Refusal::StaleTerm(term)) => Ok(InstallSnapshotResponse {
                vote: openraft::Vote::new(term, self.id()),
            }),
            Err(_) => Err(RaftError::Fatal(Fatal::Stopped)),
        }
    }

    async fn on_forward(&self, from: NodeId, f: Forward) -> Result<ForwardReply, ApiError> {
        if self.stopping.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ApiError::unavailable(
                "this node is shutting down; the request was not applied",
            ));
        }
        tracing::debug!(from, op = ?std::mem::discriminant(&f.op), "forwarded request");
        if let Err(e) = self.check_forwarded(&f.op) {
            metrics::counter!("capkv_peer_messages_refused_total", "kind" => "forward")
                .increment(1);
            tracing::warn!(peer = %self.name_of(from), error = %e.message, "forwarded request refused");
            return Err(e);
        }
        let _in_flight = InFlight::enter(&self.forwards_in_flight);
        // A peer's deadline is at most a client's.
        let timeout = f.timeout_ms.min(capkv_core::validate::MAX_TIMEOUT_MS);
        let deadline = Instant::now() + Duration::from_millis(timeout);
        self.execute(f.op, deadline, f.hops_left).await
    }
}

/// ap's messages, answered (`ap::rpc`).
impl ServeAp for Node {
    async fn on_update(&self, _from: NodeId, m: ApUpdate) -> Result<Applied, ApiError> {
        self.ap
            .apply_here(Update {
                keyspace: m.keyspace,
                key: m.key,
                value_type: m.value_type,
                mutation: m.mutation,
                actor: self.ap.actor.clone(),
                now_ms: m.now_ms,
                // Counted from now: the peer's clock is not ours to compare with.
                deadline: Some(
                    Instant::now()
                        + Duration::from_millis(
                            m.timeout_ms.min(capkv_core::validate::MAX_TIMEOUT_MS),
                        ),
                ),
            })
            .await
    }

    async fn on_store_many(&self, _from: NodeId, m: ApStoreMany) -> Result<u64, ApiError> {
        self.ap.replica.merge_many(m.objects).await
    }

    async fn on_hint(&self, _from: NodeId, m: ApHint) -> Result<(), ApiError> {
        self.ap
            .replica
            .hold_hint(m.home, &m.keyspace, &m.key, &m.object)
            .await
    }

    async fn on_read(&self, _from: NodeId, m: ApRead) -> Result<Held, ApiError> {
        self.ap.replica.held(&m.keyspace, &m.key, &self.ap.nodes())
    }

    async fn on_ae_compare(
        &self,
        from: NodeId,
        m: AeCompare,
    ) -> Result<Vec<(u16, Vec<u64>)>, ApiError> {
        self.ap_specs()
            .and_then(|specs| anti_entropy::build(&self.ap, &specs, from))
            .map(|tree| anti_entropy::compare(&tree, m.root, &m.interior))
    }

    async fn on_ae_fetch(
        &self,
        from: NodeId,
        m: AeFetch,
    ) -> Result<(Vec<StoredObject>, bool), ApiError> {
        self.ap_specs()
            .and_then(|specs| anti_entropy::build(&self.ap, &specs, from))
            .and_then(|_| anti_entropy::collect(&self.ap, from, &m.leaves, m.after.as_deref()))
    }

    async fn on_scan(&self, _from: NodeId, m: ApScan) -> Result<(Page, bool), ApiError> {
        self.ap.replica.scan(
            &m.keyspace,
            &m.prefix,
            m.after.as_deref(),
            m.limit.clamp(1, capkv_core::validate::MAX_SCAN_LIMIT),
            &self.ap.nodes(),
        )
    }

    async fn on_reap_check(&self, _from: NodeId, m: ApReapCheck) -> Result<Vec<bool>, ApiError> {
        tombstones::check(&self.ap, &m.items)
    }

    async fn on_reap(&self, _from: NodeId, m: ApReap) -> Result<u64, ApiError> {
        tombstones::reap(&self.ap, &m.items).await
    }
}

/// This node's incarnation: a random id made when its data dir is created. Its ap actor
/// id is `name.incarnation`, so a node whose data was wiped is a new actor and never
/// reissues a dot it issued before (see `ap::dvv`).
///
/// A node that stopped without a clean shutdown (a crash, kill -9) takes a new
/// incarnation: an ap write it applied but had not yet fsynced is lost with the crash,
/// while a read may already have copied it elsewhere; reusing the actor would issue that
/// write's dot again for another value, and replicas would drop one of the two. Only a
/// clean shutdown ([`Node::shutdown`], which records [`CLEAN_STOP_KEY`]) keeps it.
fn incarnation(engine: &dyn Engine) -> Result<String, StartError> {
    let storage = |e: crate::storage::StorageError| StartError::Storage(e.to_string());
    let kept = engine.get(Tree::Meta, INCARNATION_KEY).map_err(storage)?;
    let clean = engine.get(Tree::Meta, CLEAN_STOP_KEY).map_err(storage)?;
    let mut b = WriteBatch::new();
    b.delete(Tree::Meta, CLEAN_STOP_KEY.to_vec());
    let id = match kept {
        Some(v) if clean.as_ref() == Some(&v) => String::from_utf8_lossy(&v).into_owned(),
        previous => {
            let id = format!("{:08x}", (crate::rt::random_u64() as u32));
            if previous.is_some() {
                tracing::info!(incarnation = %id, "not stopped cleanly: a new ap actor, so no dot is issued twice");
            }
            b.put(
                Tree::Meta,
                INCARNATION_KEY.to_vec(),
                id.clone().into_bytes(),
            );
            id
        }
    };
    engine.write(b).map_err(storage)?;
    engine.sync().map_err(storage)?;
    Ok(id)
}

const INCARNATION_KEY: &[u8] = b"node_incarnation";
/// Present while a node that started without Raft state has not yet learned what it may
/// have lost (see `cp::lost_state`): a restart in the meantime must not trust the state
/// it began since.
const RAFT_UNVERIFIED_KEY: &[u8] = b"raft_state_unverified";
/// The floor a node that started without Raft state learned from its peers
/// ([`PersistedFloor`]), kept so it survives restarts.
const RAFT_FLOOR_KEY: &[u8] = b"raft_lost_state_floor";
/// Written (holding the incarnation) as the last act of a clean shutdown; removed at start.
const CLEAN_STOP_KEY: &[u8] = b"node_clean_stop";

/// Background rounds (anti-entropy, tombstone collection) read every local object, so
/// their cost grows with the store: after a round that took `work`, pause at least nine
/// times as long (at most ~10 % of the time spent on it), and never less than `interval`.
fn background_pause(work: Duration, interval: Duration) -> Duration {
    interval.max(work * 9)
}

/// Whether a node should take a snapshot now (see `Node::snapshot_loop`): `entries`
/// applied and `bytes` of log appended since the last one, whose file was `last_bytes`.
/// Due after `snapshot_every` entries or [`SNAPSHOT_LOG_BYTES`], but only once the log
/// since the last one is as large as it, times a per-node stagger (x1, x1.15, x1.3): every
/// node reaches the same log position at once, and snapshots written together on one
/// machine's disk starved it (measured).
fn snapshot_due(
    entries: u64,
    bytes: u64,
    last_bytes: u64,
    snapshot_every: u64,
    id: NodeId,
) -> bool {
    let due = entries >= snapshot_every || bytes >= SNAPSHOT_LOG_BYTES;
    let stagger = 1.0 + 0.15 * (id % 3) as f64;
    let paid_for = bytes as f64 >= last_bytes as f64 * stagger;
    due && paid_for && entries > 0
}

/// Log bytes appended since the last snapshot that make a node take one (besides
/// `--snapshot-every` entries). 64 MiB: a follower that lags more than this catches up
/// by snapshot, and the log on disk stays within a few times this.
const SNAPSHOT_LOG_BYTES: u64 = 64 << 20;

const METRICS_PROBE_EVERY: Duration = Duration::from_millis(500);

/// How long the Raft core may take to answer a health probe before the node reports it
/// as not running (it answers within microseconds unless it is wedged).
const RAFT_CORE_ANSWER: Duration = Duration::from_secs(2);

/// Peer requests other than Raft's served at once (see `Node::handle_peer`).
pub const PEER_REQUESTS_MAX: usize = 128;

/// Peer requests answered by a page (scans, anti-entropy fetches) served at once: each
/// page is up to `rpc::PAGE_BYTES_MAX` (4 MiB) in memory.
pub const PEER_BULK_REQUESTS_MAX: usize = 8;

/// How often a node rebuilding lost Raft state says what it waits for.
const REBUILD_HINT_EVERY: Duration = Duration::from_secs(10);

/// How often the Raft core's responsiveness is measured (`core_delay_loop`).
const CORE_PROBE_EVERY: Duration = Duration::from_millis(100);

/// Most log entries in one AppendEntries message (bounds a frame to this many values).
pub const MAX_PAYLOAD_ENTRIES: u64 = 16;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_are_paced_by_entries_log_bytes_and_their_own_size() {
        let mib = 1 << 20;
        // Nothing applied: never.
        assert!(!snapshot_due(0, 10 * SNAPSHOT_LOG_BYTES, 0, 10_000, 1));
        // By entries, or by log bytes, when the last snapshot was small.
        assert!(snapshot_due(10_000, mib, 0, 10_000, 1));
        assert!(!snapshot_due(9_999, mib, 0, 10_000, 1));
        assert!(snapshot_due(5, SNAPSHOT_LOG_BYTES, 0, 10_000, 1));
        // Not before the log since the last one is as large as that snapshot...
        let last = 1024 * mib;
        assert!(!snapshot_due(50_000, 1000 * mib, last, 10_000, 3));
        assert!(snapshot_due(50_000, 1024 * mib, last, 10_000, 3));
        // ...times the node's stagger: n1 x1.15, n2 x1.3, n3 x1.
        assert!(!snapshot_due(50_000, 1024 * mib, last, 10_000, 1));
        assert!(snapshot_due(50_000, 1178 * mib, last, 10_000, 1));
        assert!(!snapshot_due(50_000, 1300 * mib, last, 10_000, 2));
        assert!(snapshot_due(50_000, 1332 * mib, last, 10_000, 2));
    }
}
