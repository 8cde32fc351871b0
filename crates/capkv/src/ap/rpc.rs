//! ap's peer messages: client writes at a home replica, copies, hints, reads, scans,
//! anti-entropy and tombstone collection. Carried in `rpc::PeerRequest::Ap`; ap code sends
//! them through an [`ApNet`], and the node answers them (`Node::serve_ap`).

use capkv_core::{ApiError, ValueType};
use serde::{Deserialize, Serialize};

use super::page::Page;
use super::replica::{Held, StoredObject};
use super::value::{ApState, Applied, Mutation};
use crate::cluster::NodeId;
use crate::net::Peers;

/// The peer network as ap sees it: its own requests, its own responses.
pub type ApNet = dyn Peers<ApRequest, ApResponse>;

#[derive(Debug, Serialize, Deserialize)]
pub enum ApRequest {
    /// Issue a new dot for a client write at this home replica and store it.
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
    /// Hold this object for `home` until it is reachable (hinted handoff).
    ApHint {
        home: NodeId,
        keyspace: String,
        key: Vec<u8>,
        object: ApState,
    },
    /// Anti-entropy: the sender's tree root and interior hashes for the keys both hold.
    AeCompare { root: u64, interior: Vec<u64> },
    /// Anti-entropy: a page of the receiver's objects in these leaves (shared with the
    /// sender), after the storage key `after`.
    AeFetch {
        leaves: Vec<u16>,
        after: Option<Vec<u8>>,
    },
    /// The receiver's page of a keyspace's keys (replica merged with hints).
    ApScan {
        keyspace: String,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
    },
    /// Tombstone collection: per tombstone, does every copy the receiver holds equal it?
    ApReapCheck { items: Vec<StoredObject> },
    /// Tombstone collection: drop the copies that still equal these tombstones.
    ApReap { items: Vec<StoredObject> },
    /// The local replica of a key merged with the hints held for it.
    ApRead { keyspace: String, key: Vec<u8> },
    /// Merge these objects into the local replica (one storage batch, one fsync): a
    /// write's copies to a home, batched per peer (`ap::batch`), or an anti-entropy page;
    /// at most `PAGE_BYTES_MAX`-ish bytes.
    ApStoreMany { objects: Vec<StoredObject> },
}

impl ApRequest {
    /// Whether its answer is a page of up to `PAGE_BYTES_MAX` bytes.
    pub fn is_bulk(&self) -> bool {
        matches!(self, ApRequest::ApScan { .. } | ApRequest::AeFetch { .. })
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ApResponse {
    /// The answer to `ApRead`: what the replica holds of the key.
    ApObject(Result<Held, ApiError>),
    /// The answer to `ApUpdate`: the new state and a register write's dot.
    ApApplied(Result<Applied, ApiError>),
    ApAck(Result<(), ApiError>),
    /// Per differing interior node: its index and the receiver's leaf hashes under it.
    AeDiffer(Result<Vec<(u16, Vec<u64>)>, ApiError>),
    /// A page of objects, and whether more may follow.
    AeObjects(Result<(Vec<StoredObject>, bool), ApiError>),
    /// A page of keys and whether it was cut short.
    ApScanned(Result<(Page, bool), ApiError>),
    ApReapChecked(Result<Vec<bool>, ApiError>),
    /// How many copies the receiver dropped.
    ApReaped(Result<u64, ApiError>),
    /// How many keys an `ApStoreMany` changed.
    ApMerged(Result<u64, ApiError>),
}
