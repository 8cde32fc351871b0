//! The envelope of every message between nodes, carried by the peer network (`net`):
//! a ping, or a message of one side ([`CpRequest`], [`ApRequest`]), each side owning its
//! messages, each naming its reply (`message`). A side sends through a [`Side`], which wraps
//! its requests and takes back
//! only its own responses, so neither side imports the other (or `node.rs`).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ap::rpc::{ApRequest, ApResponse};
use crate::cluster::NodeId;
use crate::cp::rpc::{CpRequest, CpResponse};
use crate::net::{CallFuture, NetError, Peers};
use crate::PeerNet;

pub use crate::cluster::PAGE_BYTES_MAX;
pub use crate::cp::rpc::{Forward, ForwardOp, ForwardReply};

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    /// Liveness probe; keeps reachability fresh whatever Raft is doing.
    Ping,
    Cp(CpRequest),
    Ap(ApRequest),
}

impl PeerRequest {
    /// Whether it is Raft's own traffic (or a ping): served at once, never queued behind
    /// client work (`Node::handle_peer`).
    pub fn is_raft(&self) -> bool {
        match self {
            PeerRequest::Ping => true,
            PeerRequest::Cp(c) => c.is_raft(),
            PeerRequest::Ap(_) => false,
        }
    }

    /// Whether its answer is a page of up to [`PAGE_BYTES_MAX`] bytes.
    pub fn is_bulk(&self) -> bool {
        match self {
            PeerRequest::Ping => false,
            PeerRequest::Cp(c) => c.is_bulk(),
            PeerRequest::Ap(a) => a.is_bulk(),
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum PeerResponse {
    Pong,
    Cp(CpResponse),
    Ap(ApResponse),
}

impl From<CpRequest> for PeerRequest {
    fn from(r: CpRequest) -> PeerRequest {
        PeerRequest::Cp(r)
    }
}

impl From<ApRequest> for PeerRequest {
    fn from(r: ApRequest) -> PeerRequest {
        PeerRequest::Ap(r)
    }
}

impl TryFrom<PeerResponse> for CpResponse {
    type Error = PeerResponse;
    fn try_from(r: PeerResponse) -> Result<CpResponse, PeerResponse> {
        match r {
            PeerResponse::Cp(c) => Ok(c),
            other => Err(other),
        }
    }
}

impl TryFrom<PeerResponse> for ApResponse {
    type Error = PeerResponse;
    fn try_from(r: PeerResponse) -> Result<ApResponse, PeerResponse> {
        match r {
            PeerResponse::Ap(a) => Ok(a),
            other => Err(other),
        }
    }
}

/// One side's view of the peer network: its requests go out in the envelope, and only a
/// response of its own kind comes back (another kind, which only a broken or hostile peer
/// sends, fails that call as a lost reply: the request may have been applied).
pub struct Side<Req, Resp> {
    net: Arc<PeerNet>,
    _kinds: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> Side<Req, Resp> {
    pub fn new(net: Arc<PeerNet>) -> Side<Req, Resp> {
        Side {
            net,
            _kinds: PhantomData,
        }
    }
}

impl<Req, Resp> Peers<Req, Resp> for Side<Req, Resp>
where
    Req: Into<PeerRequest> + Send + 'static,
    Resp: TryFrom<PeerResponse> + Send + 'static,
{
    fn call(&self, to: NodeId, req: Req, timeout: Duration) -> CallFuture<'_, Resp> {
        Box::pin(async move {
            let reply = self.net.call(to, req.into(), timeout).await?;
            Resp::try_from(reply).map_err(|_| {
                NetError::Lost(to, "the peer answered with a reply of another kind".into())
            })
        })
    }

    fn reachable(&self, peer: NodeId, window: Duration) -> bool {
        self.net.reachable(peer, window)
    }
}
