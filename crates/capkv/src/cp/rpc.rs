//! cp's peer messages: Raft's own (openraft's requests and a probe of a peer's Raft state)
//! and client requests forwarded to the leader. Carried in `rpc::PeerRequest::Cp`; cp code
//! sends them through a [`CpNet`] (with `message::ask`), and the node answers them as
//! [`ServeCp`].

use capkv_core::{ApiError, KeyspaceSpec};
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use super::state_machine::ScanRow;
use super::{Command, NodeId, TypeConfig, Written};
use crate::message::messages;
use crate::net::Peers;

/// The peer network as cp sees it: its own requests, its own responses.
pub type CpNet = dyn Peers<CpRequest, CpResponse>;

messages! {
    /// cp's messages, as they travel.
    pub enum CpRequest;
    /// Their replies, as they travel: the variant of a message carries its reply.
    pub enum CpResponse;
    /// What answers cp's messages (the node): one method per message, returning its reply.
    pub trait ServeCp;
    /// Asked by a node that started without Raft state: the receiver's term and last log
    /// id (see `cp::lost_state`). `None`: the receiver cannot vouch for its state (it is
    /// rebuilding its own).
    RaftProbe(RaftProbe) => fn on_raft_probe -> Option<super::lost_state::Report>;
    AppendEntries(AppendEntriesRequest<TypeConfig>)
        => fn on_append_entries -> Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>;
    Vote(VoteRequest<NodeId>) => fn on_vote -> Result<VoteResponse<NodeId>, RaftError<NodeId>>;
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>) => fn on_install_snapshot
        -> Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>;
    /// A client request a node passes on to the node it believes is the leader.
    Forward(Forward) => fn on_forward -> Result<ForwardReply, ApiError>;
}

/// See [`CpRequest::RaftProbe`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct RaftProbe;

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
