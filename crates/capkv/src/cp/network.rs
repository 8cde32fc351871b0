//! openraft's network, carried by the shared peer transport.
//!
//! Transport errors map onto openraft's: a request the fault filter refused or that
//! never connected is `Unreachable` (openraft backs off from the peer), a lost reply is
//! a `Timeout` or a `Network` error.

use std::sync::Arc;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::RPCTypes;

use super::rpc::{CpNet, CpRequest, CpResponse};
use super::{NodeId, PeerNode, TypeConfig};
use crate::net::NetError;

pub struct NetworkFactory {
    pub me: NodeId,
    pub transport: Arc<CpNet>,
}

pub struct PeerConnection {
    me: NodeId,
    target: NodeId,
    transport: Arc<CpNet>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, _node: &PeerNode) -> PeerConnection {
        PeerConnection {
            me: self.me,
            target,
            transport: self.transport.clone(),
        }
    }
}

fn rpc_error<E: std::error::Error>(
    me: NodeId,
    target: NodeId,
    action: RPCTypes,
    option: &RPCOption,
    e: NetError,
) -> RPCError<NodeId, PeerNode, E> {
    match e {
        NetError::Timeout(..) => RPCError::Timeout(Timeout {
            action,
            id: me,
            target,
            timeout: option.hard_ttl(),
        }),
        NetError::Lost(..) | NetError::RequestTooLarge(..) | NetError::ReplyTooLarge(_) => {
            RPCError::Network(NetworkError::new(&e))
        }
        NetError::Isolated(_)
        | NetError::DropTo(_)
        | NetError::UnknownPeer(_)
        | NetError::Connect(..) => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

fn unexpected<E: std::error::Error>(target: NodeId) -> RPCError<NodeId, PeerNode, E> {
    let e = std::io::Error::other(format!(
        "node {target} answered with the wrong message type"
    ));
    RPCError::Network(NetworkError::new(&e))
}

impl PeerConnection {
    async fn call(&self, req: CpRequest, option: &RPCOption) -> Result<CpResponse, NetError> {
        self.transport
            .call(self.target, req, option.hard_ttl())
            .await
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let action = RPCTypes::AppendEntries;
        let began = crate::rt::Instant::now();
        let reply = self.call(CpRequest::AppendEntries(rpc), &option).await;
        metrics::histogram!("capkv_raft_append_rpc_seconds").record(began.elapsed().as_secs_f64());
        match reply {
            Ok(CpResponse::AppendEntries(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected(self.target)),
            Err(e) => Err(rpc_error(self.me, self.target, action, &option, e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, PeerNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let action = RPCTypes::InstallSnapshot;
        match self.call(CpRequest::InstallSnapshot(rpc), &option).await {
            Ok(CpResponse::InstallSnapshot(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected(self.target)),
            Err(e) => Err(rpc_error(self.me, self.target, action, &option, e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let action = RPCTypes::Vote;
        match self.call(CpRequest::Vote(rpc), &option).await {
            Ok(CpResponse::Vote(r)) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Ok(_) => Err(unexpected(self.target)),
            Err(e) => Err(rpc_error(self.me, self.target, action, &option, e)),
        }
    }
}
