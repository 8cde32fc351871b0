//! Messages between nodes, carried by the peer transport (`net`).

use capkv_core::{ApiError, KeyspaceSpec, ValueType};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::ap::replica::StoredObject;
use crate::ap::value::{ApState, Applied, Mutation};
use crate::cp::state_machine::ScanRow;
use crate::cp::{Command, NodeId, TypeConfig, Written};

/// Most bytes of rows one page of any scan carries (cp and ap alike; beyond it the
/// page ends early, says there is more, and the client continues with `after=`), and
/// one anti-entropy answer. Far below the peer frame limit, so a page forwarded
/// between nodes always fits in one frame.
pub const PAGE_BYTES_MAX: usize = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Liveness probe; keeps reachability fresh whatever Raft is doing.
    Ping,
    /// Asked by a node that started without Raft state: the receiver's term and last log
    /// id (see `cp::lost_state`).
    RaftProbe,
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client request a node passes on to the node it believes is the leader.
    Forward(Forward),
    /// ap: issue a new dot for a client write at this home replica and store it.
    ApUpdate {
        keyspace: String,
        key: Vec<u8>,
        value_type: ValueType,
        mutation: Mutation,
        now_ms: u64,
        /// What was left of the coordinator's deadline when it sent this: a home that
        /// cannot apply the write before that long after receiving it refuses it (not
        /// applied), so a write that waited out its deadline never lands late.
        timeout_ms: u64,
    },
    /// ap: hold this object for `home` until it is reachable (hinted handoff).
    ApHint {
        home: NodeId,
        keyspace: String,
        key: Vec<u8>,
        object: ApState,
    },
    /// ap anti-entropy: the sender's tree root and interior hashes for the keys both hold.
    AeCompare {
        root: u64,
        interior: Vec<u64>,
    },
    /// ap anti-entropy: a page of the receiver's objects in these leaves (shared with the
    /// sender), after the storage key `after`.
    AeFetch {
        leaves: Vec<u16>,
        after: Option<Vec<u8>>,
    },
    /// ap: the receiver's page of a keyspace's keys (replica merged with hints).
    ApScan {
        keyspace: String,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    },
    /// ap tombstone collection: per tombstone, does every copy the receiver holds equal it?
    ApReapCheck {
        items: Vec<StoredObject>,
    },
    /// ap tombstone collection: drop the copies that still equal these tombstones.
    ApReap {
        items: Vec<StoredObject>,
    },
    /// ap: the local replica of a key merged with the hints held for it.
    ApRead {
        keyspace: String,
        key: Vec<u8>,
    },
    /// ap: merge these objects into the local replica (one storage batch, one fsync):
    /// a write's copies to a home, batched per peer (`ap::batch`), or an anti-entropy
    /// page; at most [`PAGE_BYTES_MAX`]-ish bytes.
    ApStoreMany {
        objects: Vec<StoredObject>,
    },
}

impl PeerRequest {
    /// Whether it is Raft's own traffic (or a ping): served at once, never queued behind
    /// client work (`Node::handle_peer`).
    pub fn is_raft(&self) -> bool {
        matches!(
            self,
            PeerRequest::Ping
                | PeerRequest::RaftProbe
                | PeerRequest::AppendEntries(_)
                | PeerRequest::Vote(_)
                | PeerRequest::InstallSnapshot(_)
        )
    }
}

impl PeerRequest {
    /// Whether its answer is a page of up to [`PAGE_BYTES_MAX`] bytes.
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            PeerRequest::ApScan { .. }
                | PeerRequest::AeFetch { .. }
                | PeerRequest::Forward(Forward {
                    op: ForwardOp::Scan { .. },
                    ..
                })
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    Pong,
    /// `None`: the receiver cannot vouch for its state (it is rebuilding its own).
    RaftProbe(Option<crate::cp::lost_state::Report>),
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Forward(Result<ForwardReply, ApiError>),
    /// The answer to `ApRead`: what the replica holds of the key.
    ApObject(Result<crate::ap::replica::Held, ApiError>),
    /// The answer to `ApUpdate`: the new state and a register write's dot.
    ApApplied(Result<Applied, ApiError>),
    ApAck(Result<(), ApiError>),
    /// Per differing interior node: its index and the receiver's leaf hashes under it.
    AeDiffer(Result<Vec<(u16, Vec<u64>)>, ApiError>),
    /// A page of objects, and whether more may follow.
    AeObjects(Result<(Vec<StoredObject>, bool), ApiError>),
    /// A page of keys and whether it was cut short.
    ApScanned(Result<(crate::ap::scan::Page, bool), ApiError>),
    ApReapChecked(Result<Vec<bool>, ApiError>),
    /// How many copies the receiver dropped.
    ApReaped(Result<u64, ApiError>),
    /// How many keys an `ApStoreMany` changed.
    ApMerged(Result<u64, ApiError>),
}

/// A forwarded client request, with what is left of its deadline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forward {
    pub op: ForwardOp,
    pub timeout_ms: u64,
    /// How many more times it may be forwarded (bounds forwarding loops while
    /// leadership moves).
    pub hops_left: u8,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardOp {
    Write(Command),
    /// A linearizable point read.
    Get {
        keyspace: String,
        key: Vec<u8>,
    },
    /// A linearizable scan.
    Scan {
        keyspace: String,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    },
    /// A linearizable read of the keyspace registry.
    ListKeyspaces,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ForwardReply {
    Written(Written),
    Value(Option<(u64, Vec<u8>)>),
    Scan { rows: Vec<ScanRow>, more: bool },
    Keyspaces(Vec<KeyspaceSpec>),
}
