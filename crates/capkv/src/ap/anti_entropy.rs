//! Anti-entropy: replicas compare Merkle trees and exchange only the ranges that differ.
//!
//! For a pair of nodes (A, B), the tree covers the keys both should hold (both are in
//! the key's preference list). Leaf `i` (of [`LEAVES`]) is the XOR of
//! `hash(key, digest(state))` over the keys whose ring hash falls in range `i`; XOR makes
//! a leaf independent of scan order. Sixteen interior nodes cover sixteen leaves each.
//!
//! ```text
//!   A ── AeCompare {root, 16 interior hashes} ──────────────▶ B
//!   A ◀── leaf hashes of the interior nodes that differ ────── B
//!   A ── AeFetch {differing leaves, after} ──────────────────▶ B    ┐ page by page
//!   A ◀── a page of B's objects in those leaves, more? ─────── B    ┘
//!   A merges each page in one batch                                 (one fsync a page)
//!   A ── ApStoreMany (a page of its objects B lacks) ───────▶ B    (one fsync a page)
//! ```
//!
//! Rate-limited: one exchange per [`AE_INTERVAL`], peers in turn, each within a 5 s
//! deadline (what it did not finish, the next one does). Every answer is a page of at
//! most [`AE_KEYS_MAX`] objects and about [`PAGE_BYTES_MAX`] bytes, so one large object or
//! a large range never makes a reply the transport cannot carry (#8 item 15). Equal
//! trees cost one round trip of 17 hashes. Caveat: trees are rebuilt by scanning the
//! local replica each exchange (fine at the sizes we test; large stores want trees
//! maintained on write).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv_core::{ApiError, KeyspaceSpec, Mode};
use serde::{Deserialize, Serialize};

use super::coordinator::Coordinator;
use super::replica::{obj_key, StoredObject};
use super::ring::{hash64, key_hash};
use crate::cp::NodeId;
use crate::rpc::{PeerRequest, PeerResponse, PAGE_BYTES_MAX};

pub const LEAVES: usize = 256;
const FANOUT: usize = 16;
pub const AE_INTERVAL: Duration = Duration::from_secs(2);
pub const AE_KEYS_MAX: usize = 1000;
/// Objects scanned per storage read while building a tree.
const SCAN_CHUNK: usize = 1024;

/// The Merkle tree of what one node holds in common with one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tree {
    pub leaves: Vec<u64>,
}

impl Tree {
    pub fn interior(&self) -> Vec<u64> {
        self.leaves
            .chunks(FANOUT)
            .map(|c| {
                c.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, l| {
                    hash64(&[h.to_be_bytes(), l.to_be_bytes()].concat())
                })
            })
            .collect()
    }
    pub fn root(&self) -> u64 {
        hash64(
            &self
                .interior()
                .iter()
                .flat_map(|h| h.to_be_bytes())
                .collect::<Vec<u8>>(),
        )
    }
}

fn leaf_of(hash: u64) -> usize {
    (hash >> 56) as usize % LEAVES
}

/// Which keys `me` and `peer` share, per the keyspace specs (ap keyspaces only).
fn shared(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
    ks: &str,
    key: &[u8],
) -> Option<u64> {
    let spec = specs.get(ks).filter(|s| s.mode == Mode::Ap)?;
    let h = key_hash(ks, key);
    let pl = c.ring.preference_list(h, spec.n.unwrap_or(3) as usize);
    (pl.contains(&c.me) && pl.contains(&peer)).then_some(h)
}

/// Walks this node's objects shared with `peer`, in storage-key order after `after` (a
/// storage key, exclusive), calling `visit` with each and its ring hash until it returns
/// false. Returns whether the walk stopped early (more may follow).
fn walk_shared(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
    mut after: Option<Vec<u8>>,
    mut visit: impl FnMut(StoredObject, u64) -> bool,
) -> Result<bool, ApiError> {
    loop {
        let (chunk, more) = c.replica.objects(after.as_deref(), SCAN_CHUNK)?;
        for (ks, key, state) in chunk {
            after = Some(obj_key(&ks, &key));
            if let Some(h) = shared(c, specs, peer, &ks, &key) {
                if !visit((ks, key, state), h) {
                    return Ok(true);
                }
            }
        }
        if !more {
            return Ok(false);
        }
    }
}

/// Builds this node's tree for `peer`.
pub fn build(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
) -> Result<Tree, ApiError> {
    let mut leaves = vec![0u64; LEAVES];
    walk_shared(c, specs, peer, None, |(ks, key, state), h| {
        let mut entry = obj_key(&ks, &key);
        entry.extend_from_slice(&state.digest().to_be_bytes());
        leaves[leaf_of(h)] ^= hash64(&entry);
        true
    })?;
    Ok(Tree { leaves })
}

/// A page of this node's objects (shared with `peer`) in `leaves`, in storage-key order
/// after `after` (a storage key, exclusive): at most [`AE_KEYS_MAX`] objects and about
/// [`PAGE_BYTES_MAX`] bytes; and whether more may follow.
pub fn collect(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
    leaves: &[u16],
    after: Option<&[u8]>,
) -> Result<(Vec<StoredObject>, bool), ApiError> {
    let mut objects = Vec::new();
    let mut bytes = 0;
    let more = walk_shared(c, specs, peer, after.map(<[u8]>::to_vec), |object, h| {
        if !leaves.contains(&(leaf_of(h) as u16)) {
            return true;
        }
        if objects.len() == AE_KEYS_MAX || bytes > PAGE_BYTES_MAX {
            return false;
        }
        bytes += object.0.len() + object.1.len() + crate::cp::encode(&object.2).len();
        objects.push(object);
        true
    })?;
    Ok((objects, more))
}

/// B's side of step 1: the leaves under each interior node whose hash differs from A's.
pub fn compare(mine: &Tree, their_root: u64, their_interior: &[u64]) -> Vec<(u16, Vec<u64>)> {
    if mine.root() == their_root {
        return Vec::new();
    }
    mine.interior()
        .iter()
        .enumerate()
        .filter(|(i, h)| their_interior.get(*i) != Some(h))
        .map(|(i, _)| (i as u16, mine.leaves[i * FANOUT..(i + 1) * FANOUT].to_vec()))
        .collect()
}

/// One exchange with `peer`, driven by this node. Returns the number of keys repaired
/// on either side.
pub async fn exchange(
    c: &Arc<Coordinator>,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
) -> Result<u64, ApiError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let call = |req: PeerRequest| {
        let left = deadline.saturating_duration_since(Instant::now());
        let t = c.transport.clone();
        async move {
            t.call(peer, req, left)
                .await
                .map_err(|e| ApiError::unavailable(e.to_string()))
        }
    };
    let mine = build(c, specs, peer)?;
    metrics::counter!("capkv_ap_ae_exchanges_total").increment(1);
    let differing = match call(PeerRequest::AeCompare {
        root: mine.root(),
        interior: mine.interior(),
    })
    .await?
    {
        PeerResponse::AeDiffer(r) => r?,
        _ => return Err(ApiError::internal("wrong reply to AeCompare")),
    };
    let mut leaves: Vec<u16> = Vec::new();
    for (i, theirs) in differing {
        for (j, h) in theirs.iter().enumerate() {
            let leaf = i as usize * FANOUT + j;
            if mine.leaves.get(leaf) != Some(h) {
                leaves.push(leaf as u16);
            }
        }
    }
    if leaves.is_empty() {
        return Ok(0);
    }
    // Their objects, page by page, each merged here in one batch; their digests kept to
    // tell what they lack. Counted as they happen: an exchange its deadline cuts short
    // has still repaired them.
    let mut repaired = 0u64;
    let mut count_repairs = |n: u64| {
        repaired += n;
        metrics::counter!("capkv_ap_ae_keys_repaired_total").increment(n);
    };
    let mut their_digests: BTreeMap<Vec<u8>, u64> = BTreeMap::new();
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (theirs, more) = match call(PeerRequest::AeFetch {
            leaves: leaves.clone(),
            after: after.clone(),
        })
        .await?
        {
            PeerResponse::AeObjects(r) => r?,
            _ => return Err(ApiError::internal("wrong reply to AeFetch")),
        };
        let empty = theirs.is_empty();
        for (ks, key, state) in &theirs {
            let k = obj_key(ks, key);
            if after.as_ref().is_some_and(|a| &k <= a) {
                return Err(ApiError::internal("AeFetch page out of order"));
            }
            their_digests.insert(k.clone(), state.digest());
            after = Some(k);
        }
        count_repairs(c.replica.merge_many(theirs).await?);
        if !more || empty {
            break;
        }
    }
    // Ours, merged with theirs, so ours covers theirs: where the two differ, they lack
    // something. Sent a page at a time (one message, one batch on their side).
    let mut after: Option<Vec<u8>> = None;
    loop {
        let (ours, more) = collect(c, specs, peer, &leaves, after.as_deref())?;
        let empty = ours.is_empty();
        if let Some((ks, key, _)) = ours.last() {
            after = Some(obj_key(ks, key));
        }
        let lacking: Vec<StoredObject> = ours
            .into_iter()
            .filter(|(ks, key, state)| {
                their_digests.get(&obj_key(ks, key)) != Some(&state.digest())
            })
            .collect();
        if !lacking.is_empty() {
            match call(PeerRequest::ApStoreMany { objects: lacking }).await? {
                PeerResponse::ApMerged(r) => count_repairs(r?),
                _ => return Err(ApiError::internal("wrong reply to ApStoreMany")),
            }
        }
        if !more || empty {
            break;
        }
    }
    Ok(repaired)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_differing_interior_nodes_are_sent_back() {
        let a = Tree {
            leaves: vec![0; LEAVES],
        };
        let mut b = a.clone();
        assert!(
            compare(&b, a.root(), &a.interior()).is_empty(),
            "equal trees: nothing to exchange"
        );
        b.leaves[17] = 42; // interior node 1
        b.leaves[200] = 7; // interior node 12
        let d = compare(&b, a.root(), &a.interior());
        assert_eq!(d.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![1, 12]);
        assert_eq!(d[0].1[1], 42);
    }
}
