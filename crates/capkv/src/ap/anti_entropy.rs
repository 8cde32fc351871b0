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
//! trees cost one round trip of 17 hashes.
//!
//! Nothing scans the store per exchange (#9 item 4): the leaves are kept up to date on
//! every write ([`super::merkle`]), and a differing leaf is read from the index by ring
//! hash ([`Tree::ApIndex`](crate::storage::Tree)), so an exchange costs the differing
//! leaves (each 1/256 of the shared keys), not the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::rt::Instant;

use capkv_core::{ApiError, KeyspaceSpec};
use serde::{Deserialize, Serialize};

use super::coordinator::Coordinator;
use super::replica::{index_key, leaf_of, obj_key, split_obj_key_ref, StoredObject, LEAVES};
use super::ring::{hash64, key_hash};
use super::rpc::{AeCompare, AeFetch, ApStoreMany};
use crate::cluster::NodeId;
use crate::cluster::PAGE_BYTES_MAX;
use crate::message::ask;
use crate::net::NetError;

const FANOUT: usize = 16;
pub const AE_INTERVAL: Duration = Duration::from_secs(2);
pub const AE_KEYS_MAX: usize = 1000;
/// Index entries read from storage at a time while collecting a page.
const INDEX_CHUNK: usize = 256;

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

/// This node's tree for `peer`: the leaves kept on every write ([`super::merkle`]),
/// rebuilt from the index only when the ap keyspaces changed.
pub fn build(
    c: &Coordinator,
    specs: &BTreeMap<String, KeyspaceSpec>,
    peer: NodeId,
) -> Result<Tree, ApiError> {
    // Off the async workers: a rebuild reads the whole index.
    let leaves = crate::storage::off_the_workers(|| c.leaves.tree(&c.replica, specs, peer))?;
    Ok(Tree { leaves })
}

/// A page of this node's objects (shared with `peer`) in `leaves`, in index order (ring
/// hash, then storage key) after the index key `after` (exclusive): at most
/// [`AE_KEYS_MAX`] objects and about [`PAGE_BYTES_MAX`] bytes; and whether more may
/// follow. Reads only the index ranges of those leaves (and their objects).
pub fn collect(
    c: &Coordinator,
    peer: NodeId,
    leaves: &[u16],
    after: Option<&[u8]>,
) -> Result<(Vec<StoredObject>, bool), ApiError> {
    crate::storage::off_the_workers(|| collect_page(c, peer, leaves, after))
}

fn collect_page(
    c: &Coordinator,
    peer: NodeId,
    leaves: &[u16],
    after: Option<&[u8]>,
) -> Result<(Vec<StoredObject>, bool), ApiError> {
    let mut wanted: Vec<usize> = leaves
        .iter()
        .map(|l| *l as usize)
        .filter(|l| *l < LEAVES)
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let after_leaf = after
        .and_then(|a| a.get(..8))
        .and_then(|h| h.try_into().ok())
        .map(|h| leaf_of(u64::from_be_bytes(h)));
    let mut objects = Vec::new();
    let mut bytes = 0;
    for leaf in wanted {
        let mut cursor = match after_leaf {
            Some(al) if al > leaf => continue,
            Some(al) if al == leaf => after.map(<[u8]>::to_vec),
            _ => None,
        };
        loop {
            let page = c
                .replica
                .leaf_entries(leaf, cursor.as_deref(), INDEX_CHUNK)?;
            let full = page.len() == INDEX_CHUNK;
            for (ik, hash, k, _) in page {
                cursor = Some(ik);
                let Some((ks, key)) = split_obj_key_ref(&k) else {
                    continue;
                };
                if !c.leaves.shares(peer, ks, hash) {
                    continue;
                }
                if objects.len() == AE_KEYS_MAX || bytes > PAGE_BYTES_MAX {
                    return Ok((objects, true));
                }
                let Some(state) = c.replica.object(&k)? else {
                    continue;
                };
                bytes += k.len() + crate::codec::encode(&state).len();
                objects.push((ks.to_owned(), key.to_vec(), state));
            }
            if !full {
                break;
            }
        }
    }
    Ok((objects, false))
}

/// The index key of an object (the order pages come in).
fn position(ks: &str, key: &[u8]) -> Vec<u8> {
    index_key(key_hash(ks, key), &obj_key(ks, key))
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
    let left = || deadline.saturating_duration_since(Instant::now());
    let unavailable = |e: NetError| ApiError::unavailable(e.to_string());
    let net = &*c.transport;
    let mine = build(c, specs, peer)?;
    metrics::counter!("capkv_ap_ae_exchanges_total").increment(1);
    let compare = AeCompare {
        root: mine.root(),
        interior: mine.interior(),
    };
    let differing = ask(net, peer, compare, left())
        .await
        .map_err(unavailable)??;
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
        let fetch = AeFetch {
            leaves: leaves.clone(),
            after: after.clone(),
        };
        let (theirs, more) = ask(net, peer, fetch, left()).await.map_err(unavailable)??;
        let empty = theirs.is_empty();
        for (ks, key, state) in &theirs {
            let at = position(ks, key);
            if after.as_ref().is_some_and(|a| &at <= a) {
                return Err(ApiError::internal("AeFetch page out of order"));
            }
            their_digests.insert(obj_key(ks, key), state.digest());
            after = Some(at);
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
        let (ours, more) = collect(c, peer, &leaves, after.as_deref())?;
        let empty = ours.is_empty();
        if let Some((ks, key, _)) = ours.last() {
            after = Some(position(ks, key));
        }
        let lacking: Vec<StoredObject> = ours
            .into_iter()
            .filter(|(ks, key, state)| {
                their_digests.get(&obj_key(ks, key)) != Some(&state.digest())
            })
            .collect();
        if !lacking.is_empty() {
            let store = ApStoreMany { objects: lacking };
            count_repairs(ask(net, peer, store, left()).await.map_err(unavailable)??);
        }
        if !more || empty {
            break;
        }
    }
    if repaired == 0 {
        // The leaves differed, yet neither side lacked anything: a leaf drifted (a tree
        // rebuilt while keys changed, a peer's spec view behind ours). Recomputed from
        // the index, so the next exchange does not fetch them again.
        let leaves: Vec<usize> = leaves.iter().map(|l| *l as usize).collect();
        crate::storage::off_the_workers(|| c.leaves.recompute(&c.replica, &leaves))?;
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
