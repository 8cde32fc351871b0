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
use crate::message::{ask, Rpc};
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

impl PeerConnection {
    /// Sends one of openraft's messages; its reply, or openraft's error for a peer that
    /// could not answer (or answered another message).
    async fn ask<M, E>(
        &self,
        m: M,
        action: RPCTypes,
        option: &RPCOption,
    ) -> Result<M::Reply, RPCError<NodeId, PeerNode, E>>
    where
        M: Rpc<Request = CpRequest, Response = CpResponse>,
        E: std::error::Error,
    {
        ask(&*self.transport, self.target, m, option.hard_ttl())
            .await
            .map_err(|e| rpc_error(self.me, self.target, action, option, e))
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
        let reply = self.ask(rpc, action, &option).await;
        metrics::histogram!("capkv_raft_append_rpc_seconds").record(began.elapsed().as_secs_f64());
        reply?.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
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
        self.ask(rpc, action, &option)
            .await?
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let action = RPCTypes::Vote;
        self.ask(rpc, action, &option)
            .await?
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}
