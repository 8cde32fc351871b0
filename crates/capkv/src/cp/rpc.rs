//! cp's peer messages: Raft's own (openraft's requests and a probe of a peer's Raft state)
//! and client requests forwarded to the leader. Carried in `rpc::PeerRequest::Cp`; cp code
//! sends them through a [`CpNet`], and the node answers them (`Node::serve_cp`).

use capkv_core::{ApiError, KeyspaceSpec};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::state_machine::ScanRow;
use super::{Command, NodeId, TypeConfig, Written};
use crate::net::Peers;

/// The peer network as cp sees it: its own requests, its own responses.
pub type CpNet = dyn Peers<CpRequest, CpResponse>;

#[derive(Debug, Serialize, Deserialize)]
pub enum CpRequest {
    /// Asked by a node that started without Raft state: the receiver's term and last log
    /// id (see `cp::lost_state`).
    RaftProbe,
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A client request a node passes on to the node it believes is the leader.
    Forward(Forward),
}

impl CpRequest {
    /// Whether it is Raft's own traffic: served at once, never queued behind client work.
    pub fn is_raft(&self) -> bool {
        !matches!(self, CpRequest::Forward(_))
    }

    /// Whether its answer is a page (a forwarded scan).
    pub fn is_bulk(&self) -> bool {
        matches!(
            self,
            CpRequest::Forward(Forward {
                op: ForwardOp::Scan { .. },
                ..
            })
        )
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum CpResponse {
    /// `None`: the receiver cannot vouch for its state (it is rebuilding its own).
    RaftProbe(Option<super::lost_state::Report>),
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Forward(Result<ForwardReply, ApiError>),
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
