//! ap's peer messages: client writes at a home replica, copies, hints, reads, scans,
//! anti-entropy and tombstone collection. Carried in `rpc::PeerRequest::Ap`; ap code sends
//! them through an [`ApNet`] (with `message::ask`), and the node answers them as
//! [`ServeAp`].

use capkv_core::{ApiError, ValueType};
use serde::{Deserialize, Serialize};

use super::page::Page;
use super::replica::{Held, StoredObject};
use super::value::{ApState, Applied, Mutation};
use crate::cluster::NodeId;
use crate::message::messages;
use crate::net::Peers;

/// The peer network as ap sees it: its own requests, its own responses.
pub type ApNet = dyn Peers<ApRequest, ApResponse>;

messages! {
    /// ap's messages, as they travel.
    pub enum ApRequest;
    /// Their replies, as they travel: the variant of a message carries its reply.
    pub enum ApResponse;
    /// What answers ap's messages (the node): one method per message, returning its reply.
    pub trait ServeAp;
    /// The new state, and a register write's dot.
    ApUpdate(ApUpdate) => fn on_update -> Result<Applied, ApiError>;
    ApHint(ApHint) => fn on_hint -> Result<(), ApiError>;
    /// Per differing interior node: its index and the receiver's leaf hashes under it.
    AeCompare(AeCompare) => fn on_ae_compare -> Result<Vec<(u16, Vec<u64>)>, ApiError>;
    /// A page of objects, and whether more may follow.
    AeFetch(AeFetch) => fn on_ae_fetch -> Result<(Vec<StoredObject>, bool), ApiError>;
    /// A page of keys, and whether it was cut short.
    ApScan(ApScan) => fn on_scan -> Result<(Page, bool), ApiError>;
    /// Per tombstone: whether every copy the receiver holds equals it.
    ApReapCheck(ApReapCheck) => fn on_reap_check -> Result<Vec<bool>, ApiError>;
    /// How many copies the receiver dropped.
    ApReap(ApReap) => fn on_reap -> Result<u64, ApiError>;
    /// What the replica holds of the key.
    ApRead(ApRead) => fn on_read -> Result<Held, ApiError>;
    /// How many keys it changed.
    ApStoreMany(ApStoreMany) => fn on_store_many -> Result<u64, ApiError>;
}

/// Issue a new dot for a client write at this home replica and store it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApUpdate {
    pub keyspace: String,
    pub key: Vec<u8>,
    pub value_type: ValueType,
    pub mutation: Mutation,
    pub now_ms: u64,
    /// What was left of the coordinator's deadline when it sent this: a home that cannot
    /// apply the write before that long after receiving it refuses it (not applied), so a
    /// write that waited out its deadline never lands late.
    pub timeout_ms: u64,
}

/// Hold this object for `home` until it is reachable (hinted handoff).
#[derive(Debug, Serialize, Deserialize)]
pub struct ApHint {
    pub home: NodeId,
    pub keyspace: String,
    pub key: Vec<u8>,
    pub object: ApState,
}

/// Anti-entropy: the sender's tree root and interior hashes for the keys both hold.
#[derive(Debug, Serialize, Deserialize)]
pub struct AeCompare {
    pub root: u64,
    pub interior: Vec<u64>,
}

/// Anti-entropy: a page of the receiver's objects in these leaves (shared with the
/// sender), after the storage key `after`.
#[derive(Debug, Serialize, Deserialize)]
pub struct AeFetch {
    pub leaves: Vec<u16>,
    pub after: Option<Vec<u8>>,
}

/// The receiver's page of a keyspace's keys (replica merged with hints).
#[derive(Debug, Serialize, Deserialize)]
pub struct ApScan {
    pub keyspace: String,
    pub prefix: Vec<u8>,
    pub after: Option<Vec<u8>>,
    pub limit: usize,
}

/// Tombstone collection: per tombstone, does every copy the receiver holds equal it?
#[derive(Debug, Serialize, Deserialize)]
pub struct ApReapCheck {
    pub items: Vec<StoredObject>,
}

/// Tombstone collection: drop the copies that still equal these tombstones.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApReap {
    pub items: Vec<StoredObject>,
}

/// The local replica of a key merged with the hints held for it.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApRead {
    pub keyspace: String,
    pub key: Vec<u8>,
}

/// Merge these objects into the local replica (one storage batch, one fsync): a write's
/// copies to a home, batched per peer (`ap::batch`), or an anti-entropy page; at most
/// `PAGE_BYTES_MAX`-ish bytes.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApStoreMany {
    pub objects: Vec<StoredObject>,
}

impl ApRequest {
    /// Whether its answer is a page of up to `PAGE_BYTES_MAX` bytes.
    pub fn is_bulk(&self) -> bool {
        matches!(self, ApRequest::ApScan(_) | ApRequest::AeFetch(_))
    }
}
